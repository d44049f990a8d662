'use strict';
// The Node.js client for dxserve.v1: classify a file, stream files or a folder (with specimen
// summaries and explanations), over plaintext, TLS or mutual TLS, and read the typed
// google.rpc error details of failed calls and of failed stream items. See README.md.
//
// The .proto files are in protos/ (regenerated from the repository's protos/ by
// scripts/generate_protos.py, with the google.rpc ones they need).

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTOS = path.join(__dirname, 'protos');
const IMAGE_SUFFIXES = new Set(['.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff']);

const definition = protoLoader.loadSync(['dxserve/v1/diagnostics.proto', 'dxserve/v1/admin.proto'], {
  includeDirs: [PROTOS], keepCase: false, longs: Number, enums: String, defaults: true, oneofs: true,
});
const loaded = grpc.loadPackageDefinition(definition);

// google.rpc.Status and its detail messages, to decode `grpc-status-details-bin` and Any.
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => {
  const vendored = path.join(PROTOS, target);
  return fs.existsSync(vendored) ? vendored : protobuf.util.path.resolve(_origin, target);
};
root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto']);
const Status = root.lookupType('google.rpc.Status');
const DETAIL_TYPES = ['BadRequest', 'ErrorInfo', 'ResourceInfo', 'RetryInfo', 'QuotaFailure', 'PreconditionFailure', 'DebugInfo'];

/** The typed details of a google.rpc.Status (an object, or its encoded bytes): [{type, ...fields}]. */
function decodeDetails(status) {
  const message = Buffer.isBuffer(status) ? Status.decode(status) : status;
  return (message.details || []).map((any) => {
    const typeUrl = any.typeUrl || any.type_url;
    const name = typeUrl.split('/').pop().replace('google.rpc.', '');
    if (!DETAIL_TYPES.includes(name)) return { type: name };
    const type = root.lookupType(`google.rpc.${name}`);
    const value = Buffer.from(any.value);
    return { type: name, ...type.toObject(type.decode(value), { longs: Number, defaults: true }) };
  });
}

/** An Error for a failed call, with its gRPC code name, message and typed details. */
class DxServeError extends Error {
  constructor(code, message, details) {
    super(`${code}: ${message}`);
    this.code = code;
    this.details = details;
  }

  /** The google.rpc.ErrorInfo reason, e.g. "VERSION_UNGATED", "QUEUE_FULL"; "" without one. */
  get reason() {
    const info = this.details.find((d) => d.type === 'ErrorInfo');
    return info ? info.reason : '';
  }

  /**
   * For a stream the server ended with a resume point (a stopping server, SERVER_DRAINING; an
   * idle or too old stream, STREAM_IDLE / STREAM_MAX_AGE): the first item it did not answer.
   */
  get resumeIndex() {
    const info = this.details.find((d) => d.type === 'ErrorInfo' && d.metadata && 'resume_index' in d.metadata);
    return info ? Number(info.metadata.resume_index) : undefined;
  }
}

const CODE_NAMES = Object.fromEntries(Object.entries(grpc.status).map(([name, number]) => [number, name]));

function callError(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  return new DxServeError(CODE_NAMES[error.code] || String(error.code), error.details || error.message, raw ? decodeDetails(raw) : []);
}

/** A ClassifyResponse as a plain result object. */
function toResult(r) {
  return {
    requestId: r.requestId, plugin: r.plugin, modelVersion: r.modelVersion, weightsSha256: r.weightsSha256,
    probabilities: Object.fromEntries(r.probabilities.map((p) => [p.label, p.probability])),
    topLabel: r.topLabel, confidence: r.confidence,
    decision: r.decision.label, indeterminate: r.decision.indeterminate, reason: r.decision.reason,
    screenPositive: r.decision.screenPositive, rule: r.decision.rule,
    qualityPassed: r.quality ? r.quality.passed : true,
    qualityIssues: r.quality ? r.quality.issues.map((i) => i.code) : [],
    specimenId: r.specimenId,
    // What drove the score, when asked for (`explain: true`): PNGs of the image's size.
    explanation: r.explanation ? {
      method: r.explanation.method, label: r.explanation.label,
      heatmapPng: Buffer.from(r.explanation.heatmapPng), overlayPng: Buffer.from(r.explanation.overlayPng),
    } : null,
    // A field plugin's objects (e.g. the cells of a microscope field), each with its own
    // result or error, and its counts: {found, classified, indeterminate, failed, objectsPlugin}.
    objects: (r.objects || []).map((o) => ({
      index: o.index, box: { x: o.box.x, y: o.box.y, width: o.box.width, height: o.box.height }, plugin: o.plugin,
      maskPng: Buffer.from(o.maskPng || []),
      result: o.result ? toResult(o.result) : null,
      error: o.error ? { code: CODE_NAMES[o.error.code] || String(o.error.code), message: o.error.message } : null,
    })),
    field: r.field ? {
      found: r.field.found, classified: r.field.classified, indeterminate: r.field.indeterminate, failed: r.field.failed,
      objectsPlugin: r.field.objectsPlugin, objectsModelVersion: r.field.objectsModelVersion,
    } : null,
    auditSeq: Number(r.auditSeq || 0), inputSha256: r.inputSha256 || '',
  };
}

/** A SpecimenSummary as a plain object (decision support, not a diagnosis). */
function toSpecimen(s) {
  return {
    specimenId: s.specimenId, plugin: s.plugin, modelVersion: s.modelVersion, cellsSeen: s.cellsSeen,
    cellsFailed: s.cellsFailed, cellsPassedGate: s.cellsPassedGate, indeterminate: s.indeterminate,
    // label -> {count, fraction of called cells, ciLow, ciHigh (95 % Wilson interval)}
    labels: Object.fromEntries(s.labels.map((l) => [l.label, { count: l.count, fraction: l.fraction, ciLow: l.ciLow, ciHigh: l.ciHigh }])),
    call: s.decision ? s.decision.label : '', callReason: s.decision ? s.decision.reason : '',
    rule: s.decision ? s.decision.rule : '', final: s.final,
  };
}

function imageFiles(folder) {
  const found = [];
  for (const entry of fs.readdirSync(folder, { withFileTypes: true })) {
    const full = path.join(folder, entry.name);
    if (entry.isDirectory()) found.push(...imageFiles(full));
    else if (IMAGE_SUFFIXES.has(path.extname(entry.name).toLowerCase())) found.push(full);
  }
  return found.sort();
}

class Client {
  /**
   * @param {string} address host:port
   * @param {{token?: string, rootCerts?: Buffer, privateKey?: Buffer, certChain?: Buffer, tls?: boolean,
   *          timeoutMs?: number}} options
   *   token: a bearer token from `dxserve tokens add` (send it over TLS only);
   *   rootCerts: PEM roots to trust (TLS); privateKey + certChain: a client certificate (mutual TLS);
   *   tls: TLS with the system roots; timeoutMs: the deadline of unary calls.
   */
  constructor(address, { token, rootCerts, privateKey, certChain, tls = false, timeoutMs = 30000 } = {}) {
    if (Boolean(privateKey) !== Boolean(certChain)) throw new TypeError('privateKey and certChain go together');
    const secure = tls || rootCerts || privateKey;
    const credentials = secure ? grpc.credentials.createSsl(rootCerts || null, privateKey || null, certChain || null)
      : grpc.credentials.createInsecure();
    this.stub = new loaded.dxserve.v1.DiagnosticsService(address, credentials, {
      'grpc.max_send_message_length': 16 * 1024 * 1024, 'grpc.max_receive_message_length': 16 * 1024 * 1024,
    });
    this.timeoutMs = timeoutMs;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
  }

  close() { this.stub.close(); }

  listPlugins() {
    return new Promise((resolve, reject) => {
      this.stub.listPlugins({}, this.metadata, { deadline: Date.now() + this.timeoutMs },
        (error, response) => (error ? reject(callError(error)) : resolve(response.plugins)));
    });
  }

  /**
   * Resolve once `plugin` is READY (just after a restart it is LOADING); reject when it FAILED,
   * is unknown, or is still loading after `timeoutMs`.
   */
  async waitUntilServing(plugin = 'lymphoblast', timeoutMs = 60000) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      let plugins = null;
      try {
        plugins = await this.listPlugins();
      } catch (error) {
        if (error.code !== 'UNAVAILABLE' || Date.now() > deadline) throw error;  // not listening yet
      }
      const info = plugins && plugins.find((p) => p.name === plugin);
      if (plugins && !info) throw new DxServeError('NOT_FOUND', `no plugin ${plugin}`, []);
      if (info && info.state === 'PLUGIN_STATE_READY') return;
      if (info && info.state === 'PLUGIN_STATE_FAILED') throw new DxServeError('UNAVAILABLE', info.stateReason, []);
      if (Date.now() > deadline) throw new DxServeError('DEADLINE_EXCEEDED', `${plugin} not ready after ${timeoutMs} ms`, []);
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
  }

  /**
   * Classify one image file (or Buffer); rejects with a DxServeError when the call fails.
   * `explain: true` also asks what drove the score (result.explanation). Sent to a field
   * plugin (e.g. smear-field), result.objects holds what it found, each with its own result;
   * `micronsPerPixel` tells it the image's pixel size when known.
   */
  classifyFile(file, { plugin = 'lymphoblast', modelVersion = '', requestId = '', specimenId = '', explain = false,
    micronsPerPixel = 0 } = {}) {
    const encoded = Buffer.isBuffer(file) ? file : fs.readFileSync(file);
    const request = { requestId, plugin, modelVersion, specimenId, explain, micronsPerPixel, image: { encoded } };
    return new Promise((resolve, reject) => {
      this.stub.classify(request, this.metadata, { deadline: Date.now() + this.timeoutMs },
        (error, response) => (error ? reject(callError(error)) : resolve(toResult(response))));
    });
  }

  /**
   * Stream image files and yield one result per file, in order: {path, ...result} or
   * {path, requestId, error: {code, message, details}} for a failed item (the stream goes on).
   * With `specimenId` every result carries its specimen's running summary (`specimen`), and
   * the final summary of each specimen is pushed onto `finalSummaries` when given.
   * Rejects with a DxServeError when the whole stream fails.
   */
  async * classifyFiles(files, { plugin = 'lymphoblast', modelVersion = '', specimenId = '', explain = false,
    finalSummaries = null } = {}) {
    const call = this.stub.classifyStream(this.metadata);
    const failure = new Promise((_, reject) => call.on('error', (error) => reject(callError(error))));
    failure.catch(() => {});
    files.forEach((file, index) => {
      call.write({ requestId: `${index}:${path.basename(file)}`, plugin, modelVersion, specimenId, explain,
        image: { encoded: fs.readFileSync(file) } });
    });
    call.end();
    const responses = call[Symbol.asyncIterator]();
    while (true) {
      const next = await Promise.race([responses.next(), failure]);
      if (next.done) return;
      const r = next.value;
      if (r.outcome === 'finalSummary') {
        if (finalSummaries) finalSummaries.push(toSpecimen(r.finalSummary));
        continue;
      }
      const file = files[Number(r.index)];
      const specimen = r.specimen ? toSpecimen(r.specimen) : null;
      if (r.outcome === 'result') yield { path: file, ...toResult(r.result), specimen };
      else {
        const code = CODE_NAMES[r.error.code] || String(r.error.code);
        yield { path: file, requestId: r.requestId, specimen, error: { code, message: r.error.message, details: decodeDetails(r.error) } };
      }
    }
  }

  /** Stream every image in a folder (recursively, sorted): see classifyFiles. */
  classifyFolder(folder, options = {}) {
    return this.classifyFiles(imageFiles(folder), options);
  }
}

module.exports = { Client, DxServeError, decodeDetails, imageFiles };

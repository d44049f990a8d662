'use strict';
// A small Node.js client for dxserve.v1: classify a file, stream a folder, and read the
// google.rpc error details of failed calls and of failed stream items.
//
//   const { Client } = require('dxserve-client');
//   const client = new Client('localhost:50051');
//   const result = await client.classifyFile('cell.png');           // { decision, probabilities, ... }
//   for await (const r of client.classifyFolder('smear/')) { ... }  // one per image, in order; r.error on failure
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

  /** For a stream ended by a stopping server: the index of the first item it did not read. */
  get resumeIndex() {
    const info = this.details.find((d) => d.type === 'ErrorInfo' && d.reason === 'SERVER_DRAINING');
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
   * @param {{token?: string, rootCerts?: Buffer, timeoutMs?: number}} options bearer token
   *   (send it over TLS only), PEM roots for TLS, deadline of unary calls
   */
  constructor(address, { token, rootCerts, timeoutMs = 30000 } = {}) {
    const credentials = rootCerts ? grpc.credentials.createSsl(rootCerts) : grpc.credentials.createInsecure();
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

  /** Classify one image file (or Buffer); rejects with a DxServeError when the call fails. */
  classifyFile(file, { plugin = 'lymphoblast', modelVersion = '', requestId = '', specimenId = '' } = {}) {
    const encoded = Buffer.isBuffer(file) ? file : fs.readFileSync(file);
    const request = { requestId, plugin, modelVersion, specimenId, image: { encoded } };
    return new Promise((resolve, reject) => {
      this.stub.classify(request, this.metadata, { deadline: Date.now() + this.timeoutMs },
        (error, response) => (error ? reject(callError(error)) : resolve(toResult(response))));
    });
  }

  /**
   * Stream image files and yield one result per file, in order: {path, ...result} or
   * {path, requestId, error: {code, message, details}} for a failed item (the stream goes on).
   * Rejects with a DxServeError when the whole stream fails.
   */
  async * classifyFiles(files, { plugin = 'lymphoblast', modelVersion = '', specimenId = '' } = {}) {
    const call = this.stub.classifyStream(this.metadata);
    const failure = new Promise((_, reject) => call.on('error', (error) => reject(callError(error))));
    failure.catch(() => {});
    files.forEach((file, index) => {
      call.write({ requestId: `${index}:${path.basename(file)}`, plugin, modelVersion, specimenId,
        image: { encoded: fs.readFileSync(file) } });
    });
    call.end();
    const responses = call[Symbol.asyncIterator]();
    while (true) {
      const next = await Promise.race([responses.next(), failure]);
      if (next.done) return;
      const r = next.value;
      if (r.outcome === 'finalSummary') continue;
      const file = files[Number(r.index)];
      if (r.outcome === 'result') yield { path: file, ...toResult(r.result) };
      else {
        const code = CODE_NAMES[r.error.code] || String(r.error.code);
        yield { path: file, requestId: r.requestId, error: { code, message: r.error.message, details: decodeDetails(r.error) } };
      }
    }
  }

  /** Stream every image in a folder (recursively, sorted): see classifyFiles. */
  classifyFolder(folder, options = {}) {
    return this.classifyFiles(imageFiles(folder), options);
  }
}

module.exports = { Client, DxServeError, decodeDetails, imageFiles };

'use strict';
// Runs against a real dxserve server at $DXSERVE_ADDRESS with the sample cells in
// $DXSERVE_CELLS (tests/test_node_client.py starts both and runs `node --test`).
const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { Client, DxServeError } = require('..');

const address = process.env.DXSERVE_ADDRESS;
const cells = process.env.DXSERVE_CELLS;

test('lists the plugins with their model versions', async () => {
  const client = new Client(address);
  const plugins = await client.listPlugins();
  const lymphoblast = plugins.find((p) => p.name === 'lymphoblast');
  assert.ok(lymphoblast, 'lymphoblast listed');
  assert.deepStrictEqual(lymphoblast.labels, ['lymphoblast', 'normal']);
  assert.strictEqual(lymphoblast.modelVersions[0].weightsSha256.length, 64);
  client.close();
});

test('classifies a file with a decision, probabilities and the weights that produced it', async () => {
  const client = new Client(address);
  const file = path.join(cells, fs.readdirSync(cells).filter((f) => f.endsWith('.png')).sort()[0]);
  const result = await client.classifyFile(file, { requestId: 'node-1' });
  assert.strictEqual(result.requestId, 'node-1');
  assert.ok(Math.abs(result.probabilities.lymphoblast + result.probabilities.normal - 1) < 1e-5);
  assert.ok(['lymphoblast', 'normal', 'indeterminate'].includes(result.decision));
  assert.strictEqual(result.weightsSha256.length, 64);
  client.close();
});

test('a failed call carries its code and typed google.rpc details', async () => {
  const client = new Client(address);
  await assert.rejects(client.classifyFile(Buffer.from('not an image')), (error) => {
    assert.ok(error instanceof DxServeError);
    assert.strictEqual(error.code, 'INVALID_ARGUMENT');
    const badRequest = error.details.find((d) => d.type === 'BadRequest');
    assert.ok(badRequest.fieldViolations[0].field.startsWith('image'));
    assert.ok(error.details.find((d) => d.type === 'ErrorInfo').reason.startsWith('IMAGE_'));
    return true;
  });
  await assert.rejects(client.classifyFile(Buffer.from('x'), { plugin: 'no-such-plugin' }), (error) => {
    assert.strictEqual(error.code, 'NOT_FOUND');
    assert.strictEqual(error.details.find((d) => d.type === 'ResourceInfo').resourceType, 'plugin');
    return true;
  });
  client.close();
});

test('streams a folder: one result per image, in order, a bad file failing alone', async () => {
  const folder = fs.mkdtempSync(path.join(os.tmpdir(), 'dxserve-node-'));
  const pngs = fs.readdirSync(cells).filter((f) => f.endsWith('.png')).sort().slice(0, 3);
  pngs.forEach((f, i) => fs.copyFileSync(path.join(cells, f), path.join(folder, `${i}-${f}`)));
  fs.writeFileSync(path.join(folder, '1b-broken.png'), 'not an image');
  const client = new Client(address);
  const results = [];
  for await (const r of client.classifyFolder(folder)) results.push(r);
  assert.deepStrictEqual(results.map((r) => path.basename(r.path)),
    ['0-' + pngs[0], '1-' + pngs[1], '1b-broken.png', '2-' + pngs[2]]);
  assert.strictEqual(results[2].error.code, 'INVALID_ARGUMENT');
  assert.ok(results[2].error.details.find((d) => d.type === 'BadRequest').fieldViolations[0].field.startsWith('image'));
  for (const r of [results[0], results[1], results[3]]) assert.ok(r.decision && !r.error);
  client.close();
});

test('a specimen stream: each result with its running summary, then the final summary', async () => {
  const pngs = fs.readdirSync(cells).filter((f) => f.endsWith('.png')).sort().map((f) => path.join(cells, f));
  const client = new Client(address);
  await client.waitUntilServing('lymphoblast', 60000);
  const finals = [];
  const results = [];
  for await (const r of client.classifyFiles(pngs, { specimenId: 'node-smear', finalSummaries: finals })) results.push(r);
  assert.strictEqual(results.length, pngs.length);
  results.forEach((r, i) => assert.strictEqual(r.specimen.cellsSeen, i + 1));
  assert.strictEqual(finals.length, 1);
  const final = finals[0];
  assert.ok(final.final && final.specimenId === 'node-smear' && final.cellsSeen === pngs.length);
  const called = Object.values(final.labels).reduce((n, l) => n + l.count, 0);
  assert.strictEqual(called + final.indeterminate, pngs.length - final.cellsFailed);
  client.close();
});

test('explains a result: heatmap and overlay PNGs of the label it explains', async () => {
  const client = new Client(address, { timeoutMs: 120000 });
  const file = path.join(cells, fs.readdirSync(cells).filter((f) => f.endsWith('.png')).sort()[0]);
  const result = await client.classifyFile(file, { explain: true });
  assert.ok(['lymphoblast', 'normal'].includes(result.explanation.label) && result.explanation.method);
  const png = Buffer.from([0x89, 0x50, 0x4e, 0x47]);
  assert.ok(result.explanation.overlayPng.subarray(0, 4).equals(png) && result.explanation.heatmapPng.subarray(0, 4).equals(png));
  const plain = await client.classifyFile(file);
  assert.strictEqual(plain.explanation, null);
  await assert.rejects(client.waitUntilServing('no-such-plugin', 1000), (error) => error.code === 'NOT_FOUND');
  client.close();
});

test('a field plugin answers with the objects it found, each classified by another plugin', async () => {
  const client = new Client(address, { timeoutMs: 60000 });
  const field = path.join(process.env.DXSERVE_FIELDS, 'BloodImage_00007.jpg');
  const result = await client.classifyFile(field, { plugin: 'smear-field', requestId: 'node-field' });
  assert.strictEqual(result.field.objectsPlugin, 'lymphoblast');
  assert.strictEqual(result.objects.length, result.field.found);
  assert.ok(result.field.found >= 1 && result.objects[0].box.width > 50);
  const cell = result.objects[0].result;
  assert.strictEqual(cell.plugin, 'lymphoblast');
  assert.strictEqual(cell.requestId, 'node-field/0');
  assert.strictEqual(cell.indeterminate, true);  // another lab's stain: lymphoblast's gate declines
  const plain = await client.classifyFile(path.join(cells, fs.readdirSync(cells).filter((f) => f.endsWith('.png')).sort()[0]));
  assert.deepStrictEqual(plain.objects, []);
  assert.strictEqual(plain.field, null);
  client.close();
});

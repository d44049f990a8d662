'use strict';
// Mutual TLS against a real server at $DXSERVE_TLS_ADDRESS whose CA, and a client certificate
// it accepts, are in $DXSERVE_TLS_DIR (ca.pem, client.pem, client.key); tests/test_node_client.py
// makes them and starts the server.
const test = require('node:test');
const assert = require('node:assert');
const fs = require('node:fs');
const path = require('node:path');
const { Client } = require('..');

const address = process.env.DXSERVE_TLS_ADDRESS;
const dir = process.env.DXSERVE_TLS_DIR;
const read = (name) => fs.readFileSync(path.join(dir, name));
const grey = Buffer.from(process.env.DXSERVE_PNG_BASE64, 'base64');

test('classifies over mutual TLS with a client certificate', async () => {
  const client = new Client(address, { rootCerts: read('ca.pem'), privateKey: read('client.key'), certChain: read('client.pem') });
  const result = await client.classifyFile(grey, { plugin: 'brightness' });
  assert.ok(['dark', 'bright'].includes(result.decision));
  client.close();
});

test('without a client certificate the server refuses the connection', async () => {
  const client = new Client(address, { rootCerts: read('ca.pem'), timeoutMs: 5000 });
  await assert.rejects(client.classifyFile(grey, { plugin: 'brightness' }), (error) => error.code === 'UNAVAILABLE');
  client.close();
  assert.throws(() => new Client(address, { privateKey: read('client.key') }), TypeError);
});

import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { startStack, storageToken } from '/work/main/dev/stack.mjs';
import { blobRequest } from '/work/main/dev/azurite.mjs';
const stack = await startStack({ policyPath: '/work/main/dev/policy.json', ports: { issuer: 18950, azurite: 21500 }, stateDir: '/tmp/probe-state', gateway: false, serviceBus: false, queue: false });
try {
  const token = await storageToken(stack.issuer, stack.clientSecret);
  const ca = stack.azurite.ca;
  const base = stack.azurite.url; // .../devstoreaccount1
  const iso = (ms) => new Date(ms).toISOString().replace(/\.\d+Z$/, 'Z');
  const now = Date.now();
  const body = `<?xml version="1.0" encoding="utf-8"?><KeyInfo><Start>${iso(now - 60000)}</Start><Expiry>${iso(now + 3600000)}</Expiry></KeyInfo>`;
  const k = await blobRequest(`${base}/?restype=service&comp=userdelegationkey`, { method: 'POST', token, ca, body, headers: { 'x-ms-version': '2025-11-05' } });
  console.log('key', k.status);
  writeFileSync('/tmp/udk.xml', k.body);
  const mint = (blob, perm, extra = []) => execFileSync('/tmp/sasprobe/target/debug/sasprobe', ['/tmp/udk.xml', blob, perm, iso(now - 60000), iso(now + 600000), ...extra]).toString().trim();
  const name = `probe/valet ${now}.bin`;
  const enc = name.split('/').map(encodeURIComponent).join('/');
  const q = mint(name, 'c');
  const put = await blobRequest(`${base}/uploads/${enc}?${q}`, { method: 'PUT', ca, body: 'hello valet', headers: { 'x-ms-blob-type': 'BlockBlob', 'x-ms-version': '2025-11-05' } });
  console.log('create PUT', put.status, put.headers['x-ms-error-code'] ?? '');
  const again = await blobRequest(`${base}/uploads/${enc}?${q}`, { method: 'PUT', ca, body: 'overwrite', headers: { 'x-ms-blob-type': 'BlockBlob', 'x-ms-version': '2025-11-05' } });
  console.log('create PUT again', again.status, again.headers['x-ms-error-code'] ?? '');
  const bad = q.replace(/sig=(.)/, (m, c) => `sig=${c === 'A' ? 'B' : 'A'}`);
  const forged = await blobRequest(`${base}/uploads/${enc}x?${bad}`, { method: 'PUT', ca, body: 'x', headers: { 'x-ms-blob-type': 'BlockBlob', 'x-ms-version': '2025-11-05' } });
  console.log('tampered', forged.status, forged.headers['x-ms-error-code'] ?? '');
  const r = mint(name, 'r', ['attachment; filename="v.bin"']);
  const get = await blobRequest(`${base}/uploads/${enc}?${r}`, { ca, headers: { 'x-ms-version': '2025-11-05' } });
  console.log('read GET', get.status, get.body.toString(), get.headers['content-disposition']);
} finally { await stack.stop(); }

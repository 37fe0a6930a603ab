/**
 * Valet-key routes (blob_sas) end to end: the worker in workerd asks Azurite (OAuth over HTTPS)
 * for a user delegation key and answers with a URL; the client then talks to Azurite directly
 * with it, and Azurite, which verifies user delegation SAS signatures, permissions, names and
 * expiry, is the judge of what the URL allows. Azurite does not enforce `sip`: that is checked
 * in the host tests (tests/valet.rs) and on paper only.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { blobRequest, gatewayClient, startStack } from './stack.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const sha = (buf) => createHash('sha256').update(buf).digest('hex');
const MiB = 1024 * 1024;

describe('valet-key routes against Azurite', () => {
  let stack;
  const { call, logOf } = gatewayClient(() => stack);
  /** Every URL the gateway answered with in this run: none of their signatures may be logged. */
  const minted = [];
  let expiring; // minted in before(), used after its 60 s in the last test
  const mint = async (method, path, headers) => {
    const res = await call(method, path, { headers });
    if (res.json?.url) minted.push(res.json.url);
    return res;
  };
  /** A request straight to Azurite with a minted URL (no token: the URL is the credential). */
  const direct = (url, { method = 'PUT', body, headers = {} } = {}) =>
    blobRequest(url, { method, body, headers, ca: stack.azurite.ca, timeoutMs: 60_000 });
  const sig = (url) => new URL(url).searchParams.get('sig');

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'valet-policy.json'),
      ports: { issuer: 18860, azurite: 20400, gateway: 18798 },
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'valet'),
      serviceBus: false,
      queue: false,
    });
  });
  after(async () => {
    await stack?.stop();
  });

  test('200 cold callers at once make one user delegation key request and one token request', async () => {
    const tokensBefore = stack.issuer.stats().tokenRequests;
    // The identity provider takes its time: every caller arrives while the first one fetches.
    stack.issuer.setFault({ delayMs: 1500, count: 1 });
    const answers = await Promise.all(Array.from({ length: 200 }, (_, i) =>
      mint('POST', `/upload-url/cold/f${i}.bin`, { 'x-request-id': `valet-cold-${i}` })));
    for (const res of answers) assert.equal(res.status, 200, res.text);
    assert.equal(new Set(answers.map((r) => r.json.url)).size, 200, 'a URL per name');
    assert.equal(stack.issuer.stats().tokenRequests - tokensBefore, 1, 'one token request');
    const logs = await Promise.all(answers.map(logOf));
    const keys = {};
    for (const log of logs) keys[log.key] = (keys[log.key] ?? 0) + 1;
    // One Get User Delegation Key; the others waited for it (a straggler on a slow machine may
    // come after it and find the key cached: that is still no second request).
    assert.equal(keys.fetched, 1, JSON.stringify(keys));
    assert.equal((keys.waited ?? 0) + (keys.cache ?? 0), 199, JSON.stringify(keys));
    assert.ok((keys.waited ?? 0) >= 150, `most callers were cold together: ${JSON.stringify(keys)}`);
    assert.equal(logs.filter((l) => l.token === 'fetched').length, 1);
    // Each URL works, for its own name only.
    const r = await direct(answers[7].json.url, { body: 'seven', headers: answers[7].json.headers });
    assert.equal(r.status, 201, r.body.toString());
    // Two URLs of the 60-second route, minted together: one used now, one after it expired.
    const [now, later] = await Promise.all([mint('POST', '/short-url/now.bin'), mint('POST', '/short-url/late.bin')]);
    expiring = { ...later.json, mintedAt: Date.now() };
    const used = await direct(now.json.url, { body: 'in time', headers: now.json.headers });
    assert.equal(used.status, 201, 'a URL of the 60-second route works at once');
  });

  test('a create URL uploads directly, byte-identical, once, for its name only, and cannot read', async () => {
    const body = randomBytes(3 * MiB + 17);
    const res = await mint('POST', '/upload-url/t1/report%201.bin', { 'x-request-id': 'valet-create-1' });
    assert.equal(res.status, 200, res.text);
    assert.equal(res.headers.get('cache-control'), 'no-store');
    const a = res.json;
    assert.deepEqual(Object.keys(a).sort(), ['blob', 'container', 'expires', 'headers', 'method', 'permission', 'url']);
    assert.equal(a.method, 'PUT');
    assert.deepEqual(a.headers, { 'x-ms-blob-type': 'BlockBlob' });
    assert.equal(a.blob, 'valet/t1/report 1.bin');
    const lifetime = (Date.parse(a.expires) - Date.now()) / 1000;
    assert.ok(lifetime > 280 && lifetime <= 300, `expires in ${lifetime} s`);
    const url = new URL(a.url);
    assert.equal(`${url.origin}${url.pathname}`, `${stack.azurite.url}/uploads/valet/t1/report%201.bin`);
    assert.equal(url.searchParams.get('sp'), 'c');

    const put = await direct(a.url, { body, headers: a.headers });
    assert.equal(put.status, 201, put.body.toString());
    // Read back through the gateway's own read route: the same bytes.
    const got = await fetch(`${stack.gateway.url}/files/t1/report%201.bin`, { headers: { 'x-api-key': stack.apiKey } });
    assert.equal(got.status, 200);
    assert.equal(sha(Buffer.from(await got.arrayBuffer())), sha(body));

    const again = await direct(a.url, { body: 'overwrite', headers: a.headers });
    assert.equal(again.status, 403, 'the same URL cannot overwrite');
    assert.equal(again.headers['x-ms-error-code'], 'AuthorizationPermissionMismatch');
    const other = new URL(a.url);
    other.pathname = other.pathname.replace('report%201.bin', 'other.bin');
    const elsewhere = await direct(other.toString(), { body: 'x', headers: a.headers });
    assert.equal(elsewhere.status, 403, 'the URL is for its own name only');
    const read = await direct(a.url, { method: 'GET' });
    assert.equal(read.status, 403, 'a create URL cannot read');
    // One character of the signature changed.
    const tampered = new URL(a.url);
    const s = sig(a.url);
    tampered.searchParams.set('sig', (s[0] === 'A' ? 'B' : 'A') + s.slice(1));
    const forged = await direct(tampered.toString(), { body: 'x', headers: a.headers });
    assert.equal(forged.status, 403, 'a changed signature is refused');
    const log = await logOf(res);
    assert.equal(log.blob, 'valet/t1/report 1.bin');
    assert.equal(log.sas_permission, 'create');
    assert.equal(log.sas_expires, a.expires);
  });

  test('a create_write URL uploads in blocks and overwrites, byte-identical', async () => {
    const { json: a, status } = await mint('POST', '/replace-url/big.bin');
    assert.equal(status, 200);
    assert.equal(new URL(a.url).searchParams.get('sp'), 'cw');
    const parts = [randomBytes(MiB), randomBytes(MiB), randomBytes(123)];
    const ids = parts.map((_, i) => Buffer.from(`block-${String(i).padStart(6, '0')}`).toString('base64'));
    for (const [i, part] of parts.entries()) {
      const r = await direct(`${a.url}&comp=block&blockid=${encodeURIComponent(ids[i])}`, { body: part });
      assert.equal(r.status, 201, r.body.toString());
    }
    const list = `<?xml version="1.0" encoding="utf-8"?><BlockList>${ids.map((id) => `<Latest>${id}</Latest>`).join('')}</BlockList>`;
    const commit = await direct(`${a.url}&comp=blocklist`, { body: list });
    assert.equal(commit.status, 201, commit.body.toString());
    const token = await import('../../dev/stack.mjs').then((m) => m.storageToken(stack.issuer, stack.clientSecret));
    const blocks = await blobRequest(`${stack.azurite.url}/uploads/valet/cw/big.bin`, { token, ca: stack.azurite.ca });
    assert.equal(sha(blocks.body), sha(Buffer.concat(parts)));
    const replaced = await direct(a.url, { body: 'second', headers: a.headers });
    assert.equal(replaced.status, 201, 'create_write overwrites');
    const again = await blobRequest(`${stack.azurite.url}/uploads/valet/cw/big.bin`, { token, ca: stack.azurite.ca });
    assert.equal(again.body.toString(), 'second');
  });

  test('a read URL downloads with the route\'s Content-Disposition and Content-Type, and cannot write', async () => {
    const up = (await mint('POST', '/upload-url/t2/r.pdf')).json;
    const body = randomBytes(70_000);
    assert.equal((await direct(up.url, { body, headers: up.headers })).status, 201);
    const res = await mint('GET', '/download-url/t2/r.pdf');
    assert.equal(res.status, 200, res.text);
    assert.equal(res.json.method, 'GET');
    assert.deepEqual(res.json.headers, {});
    const got = await direct(res.json.url, { method: 'GET' });
    assert.equal(got.status, 200);
    assert.equal(got.headers['content-disposition'], 'attachment; filename="r.pdf"');
    assert.equal(got.headers['content-type'], 'application/x-report');
    assert.equal(sha(got.body), sha(body));
    const write = await direct(res.json.url, { body: 'x', headers: { 'x-ms-blob-type': 'BlockBlob' } });
    assert.equal(write.status, 403, 'a read URL cannot write');
  });

  test('a name that leaves the template is refused as on blob routes, and nothing is minted', async () => {
    for (const name of ['..', '%2E%2E', 'a%2F..%2F..%2Fb', 'a%5Cb', 'a%00b', '%2F']) {
      const res = await mint('POST', `/upload-url/t1/${name}`, { 'x-request-id': `valet-bad-${minted.length}-${name.length}` });
      assert.ok([400, 404].includes(res.status), `${name}: ${res.status} ${res.text}`);
      assert.equal(res.json?.url, undefined, name);
      assert.match(res.headers.get('content-type'), /problem\+json/);
      if (res.status === 400) {
        const log = await logOf(res);
        assert.equal(log.sas_permission, undefined, name);
        assert.equal(log.key, undefined, `${name}: no key looked up before the name passed`);
      }
    }
    const noKey = await fetch(`${stack.gateway.url}/upload-url/t1/x`, { method: 'POST' });
    assert.equal(noKey.status, 401, 'the route is not open');
  });

  test('an expired URL is refused, and no signature of any minted URL is in any log line', async () => {
    const wait = expiring.mintedAt + 62_000 - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    const late = await direct(expiring.url, { body: 'late', headers: expiring.headers });
    assert.equal(late.status, 403, 'expired');
    assert.equal(late.headers['x-ms-error-code'], 'AuthorizationFailure', late.body.toString());
    console.log(`# expired URL: ${late.status} ${late.body.toString().replace(/\s+/g, ' ').slice(0, 300)}`);
    assert.ok(minted.length >= 205, `${minted.length} URLs minted`);
    const logs = stack.gateway.logs.join('\n');
    for (const url of minted) {
      const s = sig(url);
      for (const form of [s, encodeURIComponent(s)]) assert.ok(!logs.includes(form), 'a signature in the logs');
    }
    assert.ok(!/[?&]sig=/.test(logs), 'a sig= parameter in the logs');
  });
});

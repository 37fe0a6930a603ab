/**
 * The holes found by attacking the gateway as a hostile caller would, each pinned end to end under
 * workerd against the real peers of the local stack (Azurite for Blob, the Service Bus stand-in,
 * the issuer): what the attacker gets back, and what reached Azure (which must be nothing, or
 * exactly the honest caller's bytes).
 */
import { after, before, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { blobRequest, requestToken, startStack } from './stack.mjs';
import { storageToken } from '../../dev/stack.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const KEY_A = randomBytes(18).toString('base64url');
const KEY_B = randomBytes(18).toString('base64url');
const CALLER_SECRET = randomBytes(18).toString('base64url');
const KiB = 1024;
const sha = (buf) => createHash('sha256').update(buf).digest('hex');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * A raw HTTP/1.1 request, so header values go out as the bytes given (fetch would refuse or
 * re-encode them). Resolves { status, headers, text, json }.
 */
function rawRequest(url, { method = 'POST', headers = {}, body = '' } = {}) {
  return new Promise((resolve, reject) => {
    const u = new URL(url);
    const req = httpRequest({ host: u.hostname, port: u.port, path: u.pathname + u.search, method, headers: { 'content-length': Buffer.byteLength(body), ...headers }, insecureHTTPParser: true }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let json = null;
        try { json = JSON.parse(text); } catch { /* not JSON */ }
        resolve({ status: res.statusCode, headers: res.headers, text, json });
      });
    });
    req.on('error', reject);
    req.setTimeout(60_000, () => req.destroy(new Error('timed out')));
    req.end(body);
  });
}

/** A body that yields `chunks` (Buffers), waiting for `gates[i]` (a promise) before chunk i if given. */
function gatedStream(chunks, gates = []) {
  let i = 0;
  return new ReadableStream({
    async pull(controller) {
      if (i >= chunks.length) return controller.close();
      if (gates[i]) await gates[i];
      controller.enqueue(new Uint8Array(chunks[i]));
      i += 1;
    },
  });
}

describe('hardening: what a hostile caller can no longer do', () => {
  let stack;
  let gw;
  let sb;
  let storage;
  const url = (path) => `${gw.url}${path}`;
  const result = async (res) => {
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, headers: res.headers, text, json };
  };
  const put = async (path, body, headers = {}) => result(await fetch(url(path), { method: 'PUT', body, headers, duplex: 'half' }));
  const post = async (path, body, headers = {}) => result(await fetch(url(path), { method: 'POST', body, headers }));
  /** Straight from Azurite: { status, body }. */
  const stored = (blob) => blobRequest(`${stack.azurite.url}/uploads/${blob}`, { token: storage, ca: stack.azurite.ca });
  const sends = async () => (await sb.stats()).requests;
  /** A blob's block ids in Azurite, `which` = committed | uncommitted, in order. */
  const blockIds = async (blob, which) => {
    const list = await stored(`${blob}?comp=blocklist&blocklisttype=${which}`);
    if (list.status === 404) return [];
    assert.equal(list.status, 200, list.body.toString());
    const tag = which === 'committed' ? 'CommittedBlocks' : 'UncommittedBlocks';
    const section = new RegExp(`<${tag}>(.*?)</${tag}>`, 's').exec(list.body.toString())?.[1] ?? '';
    return [...section.matchAll(/<Name>([^<]*)<\/Name>/g)].map((m) => m[1]);
  };
  /** Polls `check()` every 50 ms until it is truthy (resolves it) or fails after `ms`. */
  const within = async (ms, what, check) => {
    const end = Date.now() + ms;
    for (;;) {
      const value = await check();
      if (value) return value;
      if (Date.now() >= end) assert.fail(`not within ${ms} ms: ${what}`);
      await sleep(50);
    }
  };
  const logOf = async (res) => {
    const id = res.headers.get('x-request-id');
    return JSON.parse(await gw.waitForLog((_l, j) => j?.request_id === id && 'status' in j, 10_000));
  };

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'hardening-policy.json'),
      ports: { issuer: 18500, azurite: 20100, serviceBus: 18510, gateway: 18795 },
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'hardening'),
      serviceBus: { entities: ['orders'] },
      clients: { 'caller-app': CALLER_SECRET },
      gatewaySecrets: { KEY_A, KEY_B },
    });
    gw = stack.gateway;
    sb = stack.serviceBus;
    storage = await storageToken(stack.issuer, stack.clientSecret);
  });
  beforeEach(async () => {
    await sb.clearFaults();
    await sb.purge();
  });
  after(async () => {
    await stack?.stop();
  });

  test('hole 1: a second caller cannot slip a block into another caller\'s upload of the same name', async () => {
    // A streams a chunked upload (no Content-Length: blocks of 64 KiB); once A's first block is
    // in Azure (Azurite lists it uncommitted), B (another key) uploads to the same name and runs
    // over the route's limit.
    const a = [randomBytes(64 * KiB), randomBytes(64 * KiB)];
    let releaseA;
    const bDone = new Promise((r) => { releaseA = r; });
    const aUpload = put('/race/shared.bin', gatedStream(a, [null, bDone]), { 'x-api-key': KEY_A });
    const aFirst = await within(10_000, "A's first block uncommitted in Azure before B starts", async () => {
      const ids = await blockIds('race/shared.bin', 'uncommitted');
      return ids.length === 1 && ids;
    }).catch(async (e) => {
      releaseA();
      await aUpload.catch(() => {});
      throw e;
    });
    const b = await put('/race/shared.bin', gatedStream([randomBytes(64 * KiB), randomBytes(64 * KiB), randomBytes(64 * KiB)]), { 'x-api-key': KEY_B });
    assert.equal(b.status, 413, b.text);
    assert.match(b.json.detail, /Nothing was committed/);
    releaseA();
    const aRes = await aUpload;
    assert.equal(aRes.status, 201, aRes.text);
    const blob = await stored('race/shared.bin');
    assert.equal(blob.status, 200);
    assert.equal(sha(blob.body), sha(Buffer.concat(a)), 'the stored blob is exactly A\'s bytes');
    // A's commit lists its own blocks: the one B's upload ran beside, then its second.
    const committed = await blockIds('race/shared.bin', 'committed');
    assert.equal(committed.length, 2, committed.join(' '));
    assert.equal(committed[0], aFirst[0], "A's first block is the one seen before B started");
  });

  test('hole 2: a broker property or content type HTTP cannot carry is refused with 400, nothing sent', async () => {
    const before = await sends();
    const cases = [
      [{ 'x-label': 'caf\u00e9' }, /BrokerProperties\.Label/],
      [{ 'x-session': 'sessi\u00f6n' }, /BrokerProperties\.SessionId/],
      [{ 'idempotency-key': 'order-\u00e9' }, /BrokerProperties\.MessageId/],
      [{ 'content-type': 'application/json; note=\u00fc' }, /Content-Type/],
    ];
    for (const [headers, field] of cases) {
      const res = await rawRequest(url('/send/contoso'), { headers: { 'x-label': 'ok', 'x-session': 's1', 'content-type': 'application/json', ...headers }, body: '{"n":1}' });
      assert.equal(res.status, 400, `${JSON.stringify(headers)}: ${res.text}`);
      assert.equal(res.headers['content-type'], 'application/problem+json');
      assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:unsendable-value');
      assert.match(res.json.detail, field);
    }
    assert.equal(await sends(), before, 'nothing reached Service Bus');
    // The same on a blob route: a caller's content type is checked before anything is written.
    const blob = await rawRequest(url('/notes/ct.txt'), { method: 'PUT', headers: { 'content-type': 'text/plain; x=\u00fc', 'x-note': 'n' }, body: 'hello' });
    assert.equal(blob.status, 400, blob.text);
    assert.match(blob.json.detail, /Content-Type/);
    assert.equal((await stored('notes/ct.txt')).status, 404, 'nothing was written');
    // And an honest message still goes through.
    const ok = await post('/send/contoso', '{"n":2}', { 'x-label': 'ok', 'x-session': 's1', 'content-type': 'application/json' });
    assert.equal(ok.status, 202, ok.text);
  });

  test('hole 3: metadata over 8 KB and names past Azure\'s limits are refused with 400 before anything is written', async () => {
    const big = await put('/notes/big.txt', 'hello', { 'x-note': 'x'.repeat(9 * KiB) });
    assert.equal(big.status, 400, big.text);
    assert.equal(big.json.type, 'urn:azure-edge-gateway:problem:metadata-too-large');
    assert.match(big.json.detail, /8192/);
    assert.equal((await stored('notes/big.txt')).status, 404, 'nothing was written');
    const fits = await put('/notes/fits.txt', 'hello', { 'x-note': 'x'.repeat(8 * KiB - 'note'.length) });
    assert.equal(fits.status, 201, fits.text);

    const deep = await put('/named', 'hello', { 'x-blob-name': Array(255).fill('d').join('/') });
    assert.equal(deep.status, 400, deep.text);
    assert.match(deep.json.detail, /254 path segments/);
    const long = await put('/named', 'hello', { 'x-blob-name': 'n'.repeat(1025) });
    assert.equal(long.status, 400, long.text);
    assert.match(long.json.detail, /1024 characters/);
    const ok = await put('/named', 'hello', { 'x-blob-name': Array(254).fill('d').join('/') });
    assert.equal(ok.status, 201, ok.text);
  });

  test('hole 5: a batch element cannot replace what the route maps (its session or tenant)', async () => {
    const before = await sends();
    for (const element of [
      { Body: 'evil', BrokerProperties: { SessionId: 'fabrikam' } },
      { Body: 'evil', UserProperties: { tenant: 'fabrikam' } },
      { Body: 'evil', UserProperties: { TENANT: 'fabrikam' } },
    ]) {
      const res = await post('/batch/contoso', JSON.stringify([{ Body: 'ok' }, element]), { 'content-type': 'application/json' });
      assert.equal(res.status, 400, res.text);
      assert.match(res.json.detail, /^batch\[1\]\.(BrokerProperties\.SessionId|UserProperties\.tenant|UserProperties\.TENANT) is set by this route/);
    }
    assert.equal(await sends(), before, 'nothing reached Service Bus');
    // What the route leaves unmapped, an element may still set.
    const ok = await post('/batch/contoso', JSON.stringify([{ Body: 'ok', BrokerProperties: { Label: 'own' }, UserProperties: { color: 'red' } }]), { 'content-type': 'application/json' });
    assert.equal(ok.status, 202, ok.text);
    const [m] = await sb.messages('orders');
    assert.equal(m.brokerProperties.SessionId, 'contoso');
    assert.equal(m.brokerProperties.Label, 'own');
    assert.equal(m.userProperties.tenant, 'contoso');
    assert.equal(m.userProperties.color, 'red');
  });

  test('Service Bus\'s own error text stays in the log line; the caller gets what it can act on', async () => {
    await sb.setFault({ status: 400, count: 1 });
    const res = await post('/send/contoso', '{"n":3}', { 'x-label': 'ok', 'x-session': 's1', 'content-type': 'application/json' });
    assert.equal(res.status, 400, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:bad-message');
    assert.doesNotMatch(res.text, /TrackingId|servicebus|127\.0\.0\.1/i);
    const log = await logOf(res);
    assert.equal(log.backend_status, 400);
    assert.ok(log.backend_detail, `the log line keeps Service Bus's reason: ${JSON.stringify(log)}`);
  });

  test('a streamed upload is timed by its progress: slow but moving completes, stalled is cut off', async () => {
    // The route's idle limit is 1.5 s, and a streamed body has that plus its length at
    // 64 KiB/s: this one, 512 KiB in 8 chunks over ~3.5 s (~140 KiB/s), is far slower than a
    // whole-transfer limit of 1.5 s would allow, and completes.
    const chunks = Array.from({ length: 8 }, () => randomBytes(64 * KiB));
    const total = chunks.reduce((n, c) => n + c.length, 0);
    const gates = chunks.map((_, i) => (i === 0 ? null : sleep(500 * i)));
    const t0 = performance.now();
    const slow = await put('/slow/moving.bin', gatedStream(chunks, gates), { 'content-length': String(total) });
    const took = performance.now() - t0;
    assert.equal(slow.status, 201, slow.text);
    assert.ok(took > 3000, `the transfer took ${took.toFixed(0)} ms: longer than the idle limit`);
    assert.equal(sha((await stored('slow/moving.bin')).body), sha(Buffer.concat(chunks)));

    // 64 KiB of a declared 128 KiB, then nothing for 8 s: cut off after 1.5 s + 2 s, nothing committed.
    const t1 = performance.now();
    const stalled = await put('/slow/stalled.bin', gatedStream([randomBytes(64 * KiB), randomBytes(64 * KiB)], [null, sleep(8000)]), { 'content-length': String(128 * KiB) }).catch((e) => ({ status: 0, text: String(e) }));
    const cut = performance.now() - t1;
    assert.equal(stalled.status, 504, stalled.text);
    assert.ok(cut < 6000, `cut off after ${cut.toFixed(0)} ms`);
    assert.equal((await stored('slow/stalled.bin')).status, 404, 'nothing was committed');
  });

  test('concurrent requests on an empty key set cache fetch the JWKS once', async () => {
    const res = await requestToken(stack.issuer.tokenUrlV2, { clientId: 'caller-app', secret: CALLER_SECRET, scope: 'api://orders/.default' });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    const token = res.body.access_token;
    const before = stack.issuer.stats().jwksRequests;
    // The backend is Azurite (a blob per request): what is counted is the key set fetches.
    const answers = await Promise.all(Array.from({ length: 20 }, () => put('/jwt', '{}', { authorization: `Bearer ${token}`, 'content-type': 'application/json' })));
    for (const a of answers) assert.equal(a.status, 201, a.text);
    assert.equal(stack.issuer.stats().jwksRequests - before, 1, 'one key set fetch for 20 cold callers');
  });
});

/**
 * Identities end to end: the worker in workerd gets tokens from the Entra-like issuer of the
 * local stack and writes to Azurite with them. The issuer counts every token request, so the
 * cache's promises are checked by counting: one request for a cold burst, a refresh ahead of
 * expiry, stale-but-valid tokens while the issuer is down, then 503.
 *
 * Tokens live LIFETIME_S seconds here (Entra's are an hour) so three lifetimes fit in a test.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startStack } from './stack.mjs';
import { secretFingerprint } from '../../dev/issuer.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const LIFETIME_S = 8;
const STATE = join(REPO_ROOT, 'target', 'e2e', 'identity');
const secrets = {
  V1_SECRET: randomBytes(24).toString('base64url'),
  WRONG_SECRET: randomBytes(24).toString('base64url'),
  ROTATING_OLD: randomBytes(24).toString('base64url'),
  ROTATING_NEW: randomBytes(24).toString('base64url'),
  SLOW_SECRET: randomBytes(24).toString('base64url'),
  CACHED_SECRET: randomBytes(24).toString('base64url'),
};
const report = []; // figures for the closing note, printed at the end

function certificate() {
  mkdirSync(STATE, { recursive: true });
  const key = join(STATE, 'client-key.pem');
  const cert = join(STATE, 'client-cert.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '1', '-subj', '/CN=cert-client'], { stdio: 'ignore' });
  return { keyPem: readFileSync(key, 'utf8'), certPem: readFileSync(cert, 'utf8') };
}

describe('identities', () => {
  let stack;
  let gw;
  let n = 0;
  const unique = () => `${process.pid}-${Date.now()}-${n++}`;
  const put = async (route, name = unique(), headers = {}) => {
    const t0 = performance.now();
    const res = await fetch(`${gw.url}/${route}/${name}`, { method: 'PUT', body: `body of ${name}`, headers: { 'content-type': 'text/plain', ...headers } });
    const text = await res.text();
    return { status: res.status, headers: res.headers, text, ms: performance.now() - t0, name };
  };
  const logOf = async (requestId) => JSON.parse(await gw.waitForLog((_l, j) => j?.request_id === requestId && 'status' in j, 10_000));
  const tokenRequests = (client) => stack.issuer.stats().byClient?.[client] ?? 0;
  /** What the issuer saw from `client` since request number `since`: [credential, status] each. */
  const presentedSince = (client, since) => stack.issuer.tokenRequestLog()
    .filter((r) => r.client === client && r.n > since)
    .map((r) => [r.credential, r.status]);
  const presented = (secret) => `secret:${secretFingerprint(secret)}`;

  before(async () => {
    const { keyPem, certPem } = certificate();
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'identity-policy.json'),
      ports: { issuer: 18400, azurite: 20000, gateway: 18790 },
      stateDir: STATE,
      issuerOptions: { lifetimeSeconds: LIFETIME_S },
      clients: {
        'v1-client': secrets.V1_SECRET,
        'wrong-client': randomBytes(24).toString('base64url'),
        'rotating-client': secrets.ROTATING_NEW,
        'slow-client': secrets.SLOW_SECRET,
        'cached-client': secrets.CACHED_SECRET,
        'cert-client': { certificatePem: certPem },
      },
      gatewaySecrets: { ...secrets, CERT_KEY: keyPem, CERT_PEM: certPem },
    });
    gw = stack.gateway;
  });
  after(async () => {
    await stack?.stop();
    if (report.length) console.log(`\n# identity figures\n${report.map((l) => `#   ${l}`).join('\n')}`);
  });

  test('200 concurrent requests on a cold cache make exactly one token request', async () => {
    const before = stack.issuer.stats().tokenRequests;
    const results = await Promise.all(Array.from({ length: 200 }, () => put('main')));
    const statuses = new Map();
    for (const r of results) statuses.set(r.status, (statuses.get(r.status) ?? 0) + 1);
    assert.deepEqual([...statuses], [[201, 200]], results.find((r) => r.status !== 201)?.text);
    const made = stack.issuer.stats().tokenRequests - before;
    assert.equal(made, 1);
    report.push(`token requests for 200 concurrent cold requests: ${made}`);
    const sources = await Promise.all(results.map((r) => logOf(r.headers.get('x-request-id')).then((l) => l.token)));
    assert.equal(sources.filter((s) => s === 'fetched').length, 1, 'one leader fetched');
  });

  test('the blob written with the token reads back through the gateway', async () => {
    const w = await put('main', 'readback.txt');
    assert.equal(w.status, 201, w.text);
    assert.equal(JSON.parse(w.text).blob, 'main/readback.txt');
    const r = await fetch(`${gw.url}/main/readback.txt`);
    assert.equal(r.status, 200);
    assert.equal(await r.text(), 'body of readback.txt');
    assert.equal(r.headers.get('content-type'), 'text/plain');
  });

  test('a short-lived token is refreshed ahead, and no request ever carries an expired token', async () => {
    const before = tokenRequests('dev-gateway');
    const until = Date.now() + 3 * LIFETIME_S * 1000;
    const ids = [];
    let sent = 0;
    // 1,000 requests spread over three token lifetimes, four at a time.
    const interval = (3 * LIFETIME_S * 1000) / 1000;
    const worker = async (w) => {
      for (let i = w; i < 1000; i += 4) {
        const due = until - 3 * LIFETIME_S * 1000 + i * interval;
        if (due > Date.now()) await new Promise((r) => setTimeout(r, due - Date.now()));
        const r = await put('main');
        sent++;
        assert.equal(r.status, 201, r.text);
        ids.push(r.headers.get('x-request-id'));
      }
    };
    await Promise.all([0, 1, 2, 3].map(worker));
    const made = tokenRequests('dev-gateway') - before;
    const logs = await Promise.all(ids.map(logOf));
    const sources = {};
    for (const l of logs) sources[l.token] = (sources[l.token] ?? 0) + 1;
    const minTtl = Math.min(...logs.map((l) => l.token_ttl_s));
    // Logged lifetimes are whole seconds computed from expires_in, itself rounded down by the
    // issuer: at least 1 s left means the token's own exp was still ahead.
    assert.ok(minTtl >= 1, `a request carried a token with ${minTtl} s left`);
    assert.ok(sources.cache_refresh_ahead >= 2, JSON.stringify(sources));
    assert.equal(sources.fetched ?? 0, 0, 'refresh ahead keeps every request off the identity provider');
    assert.ok(made >= 3 && made <= 8, `token requests over three lifetimes: ${made}`);
    report.push(`token requests for ${sent} requests over three ${LIFETIME_S} s lifetimes: ${made} (sources ${JSON.stringify(sources)}; least remaining lifetime when sent: ${minTtl} s)`);
  });

  test('a wrong secret gives 502 with AADSTS7000215, and the secret is nowhere', async () => {
    const r = await put('wrong');
    assert.equal(r.status, 502, r.text);
    const body = JSON.parse(r.text);
    assert.equal(body.type, 'urn:azure-edge-gateway:problem:identity-rejected');
    assert.equal(body.aadsts, 'AADSTS7000215');
    assert.equal(body.identity, 'wrong');
    assert.match(body.detail, /invalid_client \(AADSTS7000215\)/);
    await logOf(r.headers.get('x-request-id'));
    for (const text of [r.text, ...gw.logs]) assert.ok(!text.includes(secrets.WRONG_SECRET), 'secret leaked');
    // The refusal is remembered briefly: a second request is answered without a token request.
    const count = tokenRequests('wrong-client');
    assert.equal((await put('wrong')).status, 502);
    assert.equal(tokenRequests('wrong-client'), count);
  });

  test('an Entra v1-style endpoint (resource=, string expires_in, Basic auth) works', async () => {
    // Its client is cold: the first request is a miss, the next ones hit. Same route, one by one.
    const miss = await put('v1');
    assert.equal(miss.status, 201, miss.text);
    const missLog = await logOf(miss.headers.get('x-request-id'));
    assert.equal(missLog.token, 'fetched');
    const hits = [];
    for (let i = 0; i < 21; i++) {
      const hit = await put('v1');
      assert.equal(hit.status, 201, hit.text);
      hits.push(hit.ms);
    }
    hits.sort((a, b) => a - b);
    report.push(`latency of one request, miss vs hit: ${miss.ms.toFixed(1)} ms (identity provider ${missLog.idp_ms} ms) vs median hit ${hits[10].toFixed(1)} ms`);
  });

  test('a certificate client assertion is accepted by an issuer that verifies its signature', async () => {
    const r = await put('cert');
    assert.equal(r.status, 201, r.text);
  });

  test('during a rotation the second secret is used when the first is refused', async () => {
    const since = stack.issuer.stats().tokenRequests;
    const r = await put('rotating');
    assert.equal(r.status, 201, r.text);
    // The issuer's own record: the first secret was presented and refused, then the second taken.
    assert.deepEqual(presentedSince('rotating-client', since), [
      [presented(secrets.ROTATING_OLD), 401],
      [presented(secrets.ROTATING_NEW), 200],
    ], 'the old secret first (refused), then the new one');
    for (const text of gw.logs) {
      assert.ok(!text.includes(secrets.ROTATING_OLD) && !text.includes(secrets.ROTATING_NEW), 'secret leaked');
    }
  });

  test('after a rotation, the secret that worked is tried first: no refused sign-in per token fetch', async () => {
    // Let the rotating identity's token expire, so the next request fetches a new one.
    await new Promise((r) => setTimeout(r, (LIFETIME_S + 1) * 1000));
    const before = stack.issuer.stats();
    const r = await put('rotating');
    assert.equal(r.status, 201, r.text);
    assert.equal((await logOf(r.headers.get('x-request-id'))).token, 'fetched', 'the request fetched a new token');
    const after = stack.issuer.stats();
    assert.deepEqual(presentedSince('rotating-client', before.tokenRequests), [[presented(secrets.ROTATING_NEW), 200]],
      'only the secret that worked last time was presented');
    assert.equal(after.tokenRequests - before.tokenRequests, 1, 'one token request, with the secret that worked last time');
    assert.equal(after.errors - before.errors, 0, 'the retired secret was not offered again');
  });

  test('a token request slower than its timeout is aborted, retried, then 503', async () => {
    // The identity allows 300 ms; the issuer now takes 3 s for each of the next requests.
    await stack.issuer.setFault({ delayMs: 3000, count: 3 });
    const t0 = performance.now();
    const r = await put('slow');
    const ms = performance.now() - t0;
    await stack.issuer.clearFaults();
    assert.equal(r.status, 503, r.text);
    assert.equal(JSON.parse(r.text).type, 'urn:azure-edge-gateway:problem:identity-unavailable');
    assert.ok(ms < 3000, `answered after ${ms.toFixed(0)} ms: the slow requests were not aborted`);
    assert.match((await logOf(r.headers.get('x-request-id'))).token_error, /timed out/);
  });

  test('with the issuer stopped, a cached token serves until it expires, then 503 with Retry-After', async () => {
    // Start from a token fetched just now, while the issuer is up: the `cached` identity is used
    // by this test only, so its first request fetches.
    const issuedBefore = stack.issuer.stats().tokensIssued;
    const warmSentAt = Date.now();
    const warm = await put('cached');
    assert.equal(warm.status, 201, warm.text);
    assert.equal((await logOf(warm.headers.get('x-request-id'))).token, 'fetched', 'the run starts from a freshly fetched token');
    assert.equal(tokenRequests('cached-client'), 1);
    await stack.issuer.stop();
    const requestsAtStop = stack.issuer.stats().tokenRequests;
    const results = [];
    const deadline = Date.now() + (LIFETIME_S + 3) * 1000;
    while (Date.now() < deadline) {
      const sentAt = Date.now();
      const r = await put('cached');
      results.push({ ...r, sentAt });
      if (r.status === 503 && results.filter((x) => x.status === 503).length >= 5) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    const statuses = results.map((r) => r.status);
    const first503 = statuses.indexOf(503);
    assert.ok(first503 >= 0, `never 503: ${statuses.join(',')}`);
    const odd = results.find((r) => r.status !== 201 && r.status !== 503);
    assert.equal(odd, undefined, `${odd?.status} ${odd?.text}`);
    assert.ok(first503 >= 1, `no request was served from the cached token: ${statuses.join(',')}`);
    assert.ok(statuses.slice(first503).every((s) => s === 503), `a 201 after the first 503: ${statuses.join(',')}`);
    for (const r of results.slice(first503)) {
      assert.ok(Number(r.headers.get('retry-after')) >= 1, `Retry-After: ${r.headers.get('retry-after')}`);
      assert.equal(JSON.parse(r.text).type, 'urn:azure-edge-gateway:problem:identity-unavailable');
    }
    // Each 201 carried the cached token: none was fetched, each had time left.
    const served = await Promise.all(results.slice(0, first503).map((r) => logOf(r.headers.get('x-request-id'))));
    const sources = [...new Set(served.map((l) => l.token))];
    assert.ok(sources.every((s) => s === 'cache' || s === 'cache_refresh_ahead'), `token sources of the 201s: ${sources}`);
    assert.ok(served.every((l) => l.token_ttl_s >= 1), 'a token at or past its expiry was sent');
    // Served until it expired: the cache stops serving a token a margin before its expiry, a
    // margin under half its lifetime, so the 201s cover at least half of it.
    const servedFor = results[first503 - 1].sentAt - warmSentAt;
    assert.ok(servedFor >= (LIFETIME_S / 2) * 1000, `the cached token was served for ${servedFor} ms of its ${LIFETIME_S} s`);
    // The issuer was really down: no token request reached it, and no token was issued since the warm one.
    assert.equal(stack.issuer.stats().tokenRequests, requestsAtStop, 'a token request reached the stopped issuer');
    assert.equal(stack.issuer.stats().tokensIssued, issuedBefore + 1, 'a token was issued while the issuer was stopped');
    report.push(`issuer stopped: ${first503} requests served from the cached token over ${(servedFor / 1000).toFixed(1)} s, then 503 with Retry-After`);
  });
});

/**
 * Whose failures open which circuit breaker, end to end (issue 20): the gateway in workerd
 * (wrangler dev) in front of a stub Azure REST API (node:http, here) that fails, throttles or
 * stalls chosen resources, with several callers (API keys a to g). A caller whose own resource
 * fails must be refused alone; a real outage seen by several callers on several resources must
 * still open the host's breaker; a caller whose resource still fails when the cool-down ends must
 * not keep the host closed to the others by being the probe that fails.
 * Policy: tests/e2e/fixtures/breaker-scope-policy.json (routes items, other: cool-down 4 s;
 * strict: {"failures": 1, "cooldown_seconds": 3600}; timeout_ms 1000 everywhere).
 * Own ports: issuer 21400, stub 21430, gateway 21787; state in target/e2e/breaker-scope.
 * Run: source scripts/env.sh && node --test --test-concurrency=1 --test-timeout=600000 tests/e2e/breaker-scope.test.mjs
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:http';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import { startGateway } from '../../dev/gateway.mjs';
import { startIssuer } from '../../dev/issuer.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const TENANT = '11111111-2222-3333-4444-555555555555';
const PORTS = { issuer: 21400, stub: 21430, gateway: 21787 };
const CALLERS = ['a', 'b', 'c', 'd', 'e', 'f', 'g'];
const KEYS = Object.fromEntries(CALLERS.map((c) => [c, randomBytes(18).toString('base64url')]));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * The stub Azure: every request's path is recorded; `faults` (path → { status, headers, delayMs })
 * answers chosen paths, `fallback` all others (default 200 {}).
 */
function startStub(port) {
  const state = { hits: [], faults: new Map(), fallback: { status: 200 } };
  const server = createServer((req, res) => {
    const path = new URL(req.url, 'http://stub').pathname;
    state.hits.push(path);
    const reply = state.faults.get(path) ?? state.fallback;
    const send = () => {
      if (res.destroyed) return;
      res.writeHead(reply.status, { 'content-type': 'application/json', ...(reply.headers ?? {}) });
      res.end(reply.status < 300 ? '{"ok":true}' : '{"error":{"code":"Stubbed","message":"stub"}}');
    };
    if (reply.delayMs) {
      const timer = setTimeout(send, reply.delayMs);
      res.on('close', () => clearTimeout(timer));
    } else {
      send();
    }
  });
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => resolve({
      state,
      /** How many requests for `path` reached the stub. */
      hits: (path) => state.hits.filter((p) => p === path).length,
      stop: () => new Promise((r) => { server.closeAllConnections(); server.close(() => r()); }),
    }));
  });
}

describe('circuit breakers: no single caller, resource or route opens one for others', { timeout: 600_000 }, () => {
  let issuer;
  let stub;
  let gw;
  /** One call as caller `who`: { status, headers, json, text, id }. */
  const call = async (who, path) => {
    const res = await fetch(`${gw.url}${path}`, {
      headers: { 'x-api-key': KEYS[who] },
      signal: AbortSignal.timeout(30_000),
    });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, headers: res.headers, text, json, id: res.headers.get('x-request-id') };
  };
  const logOf = async (res) => JSON.parse(await gw.waitForLog((_l, j) => j?.request_id === res.id && 'status' in j, 10_000));
  /** Asserts that b's calls (another resource of the route, another route of the host) are made and answered. */
  const othersServed = async (label, calls) => {
    for (const [who, path] of calls) {
      const before = stub.hits(path);
      const res = await call(who, path);
      assert.equal(res.status, 200, `${label}: ${who} ${path} was refused: ${res.text}`);
      assert.equal(stub.hits(path), before + 1, `${label}: ${who} ${path} reached Azure`);
    }
  };
  /** Asserts that the call is refused by an open breaker of `scope`, nothing sent. */
  const refused = async (who, path, scope) => {
    const before = stub.hits(path);
    const res = await call(who, path);
    assert.equal(res.status, 503, res.text);
    assert.equal(res.json?.type, 'urn:azure-edge-gateway:problem:backend-circuit-open', res.text);
    assert.equal(stub.hits(path), before, `${who} ${path}: nothing sent`);
    assert.equal(res.json.breaker_scope, scope, res.text);
    assert.equal((await logOf(res)).breaker_scope, scope);
    return res;
  };

  before(async () => {
    const clientSecret = randomBytes(32).toString('base64url');
    stub = await startStub(PORTS.stub);
    issuer = await startIssuer({ port: PORTS.issuer, tenant: TENANT, clients: { 'dev-gateway': clientSecret } });
    gw = await startGateway({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'breaker-scope-policy.json'),
      port: PORTS.gateway,
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'breaker-scope', 'gateway'),
      secrets: {
        DEV_CLIENT_SECRET: clientSecret,
        ...Object.fromEntries(CALLERS.map((c) => [`KEY_${c.toUpperCase()}`, KEYS[c]])),
      },
    });
  });
  after(async () => {
    await gw?.stop();
    await issuer?.stop();
    await stub?.stop();
  });

  test('a caller hammering a resource Azure fails (500) is refused for it alone', async () => {
    stub.state.faults.set('/items/bad', { status: 500 });
    for (let i = 0; i < 8; i++) assert.equal((await call('a', '/items/bad')).status, 503);
    await othersServed('after a hammered /items/bad', [['b', '/items/good'], ['b', '/other/x'], ['a', '/items/good']]);
    await refused('a', '/items/bad', 'caller_resource');
    // b's own call of that resource is made (and fails as Azure fails it).
    const before = stub.hits('/items/bad');
    const res = await call('b', '/items/bad');
    assert.equal(res.json?.type, 'urn:azure-edge-gateway:problem:backend-unavailable', res.text);
    assert.ok(stub.hits('/items/bad') > before);
  });

  test('a caller whose resource answers past the route\'s timeout is refused for it alone', async () => {
    stub.state.faults.set('/items/slow', { status: 200, delayMs: 3_000 });
    const answers = await Promise.all(Array.from({ length: 6 }, () => call('c', '/items/slow')));
    for (const res of answers) assert.equal(res.status, 503, res.text);
    await othersServed('after slow /items/slow', [['b', '/items/fine'], ['b', '/other/y']]);
    await refused('c', '/items/slow', 'caller_resource');
  });

  test('a caller throttled on one resource is refused alone, for as long as Azure asked (clamped)', async () => {
    stub.state.faults.set('/items/hot', { status: 429, headers: { 'retry-after': '99999999999' } });
    const answers = [];
    for (let i = 0; i < 5; i++) answers.push(await call('d', '/items/hot'));
    await othersServed('after throttled /items/hot', [['b', '/items/cool'], ['b', '/other/z']]);
    for (const res of answers) {
      assert.equal(res.status, 503, res.text);
      assert.equal(res.headers.get('retry-after'), '300', 'Azure\'s 99999999999 s, clamped');
    }
    const res = await refused('d', '/items/hot', 'caller_resource');
    const wait = Number(res.headers.get('retry-after'));
    assert.ok(wait > 290 && wait <= 300, `Azure's wait, not the 4 s cool-down: ${wait}`);
  });

  test('one failure on a route with {"failures": 1, "cooldown_seconds": 3600} refuses that caller there, nobody else', async () => {
    stub.state.faults.set('/strict/x', { status: 500 });
    assert.equal((await call('e', '/strict/x')).status, 503);
    await othersServed('after one /strict/x failure', [['b', '/items/w'], ['b', '/other/w'], ['b', '/strict/w'], ['e', '/strict/w']]);
    const res = await refused('e', '/strict/x', 'caller_resource');
    assert.equal(res.headers.get('retry-after'), '3600');
  });

  /** Azure fails everything; three callers fail on five resources of two routes. */
  const outage = async (tag) => {
    stub.state.fallback = { status: 503 };
    for (const [who, path] of [['a', `/items/${tag}1`], ['b', `/other/${tag}2`], ['c', `/items/${tag}3`], ['a', `/other/${tag}4`], ['b', `/items/${tag}5`]]) {
      const res = await call(who, path);
      assert.equal(res.json?.type, 'urn:azure-edge-gateway:problem:backend-unavailable', `${who} ${path}: ${res.text}`);
    }
  };

  test('a real outage seen by several callers on several resources opens the host for everyone', async () => {
    await outage('o');
    const open = await refused('f', '/other/new', 'host');
    assert.ok(Number(open.headers.get('retry-after')) <= 4, 'the route\'s 4 s cool-down');
    await refused('f', '/items/new', 'host');
    // Azure is back: after the cool-down the next call probes, is answered, and closes it.
    stub.state.fallback = { status: 200 };
    await sleep(4_500);
    await othersServed('after the outage', [['f', '/items/new'], ['g', '/other/new']]);
  });

  test('after an outage, a caller whose own resource still fails cannot reopen the host by being the failing probe', async () => {
    await outage('p');
    const open = await call('f', '/other/p-new');
    assert.equal(open.json?.type, 'urn:azure-edge-gateway:problem:backend-circuit-open', open.text);
    // Azure is back, except for a's resource; a fires first as the cool-down ends.
    stub.state.fallback = { status: 200 };
    stub.state.faults.set('/items/bad2', { status: 503 });
    await sleep(4_500);
    const before = stub.hits('/items/bad2');
    const probe = await call('a', '/items/bad2');
    assert.equal(probe.status, 503, probe.text);
    assert.ok(stub.hits('/items/bad2') > before, 'a\'s probe was sent');
    assert.equal((await logOf(probe)).breaker, 'probe');
    await othersServed('after a\'s failed probe', [['b', '/items/good2'], ['g', '/other/back']]);
  });
});

/**
 * Nothing lost (issue 13), end to end through workerd (wrangler dev simulates the Cloudflare
 * Queue: the real binding, producer and consumer of this worker): while Azure (the Service Bus
 * stand-in) or the identity provider is unavailable, routes with "when_unavailable": "queue"
 * answer 202 queued; when it is back, the worker's queue consumer delivers each stored request
 * with the same MessageId / create-only blob name, and each is stored exactly once.
 * Policy: tests/e2e/fixtures/store-forward-policy.json. Own ports (issuer 19200, Service Bus
 * stand-in 19210, Azurite 20700, gateway 19287).
 * Run: source scripts/env.sh && node --test tests/e2e/store-forward.test.mjs
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { after, before, beforeEach, describe, test } from 'node:test';
import { REPO_ROOT } from '../../dev/proc.mjs';
import { blobRequest, startStack, storageToken } from './stack.mjs';

const PORTS = { issuer: 19200, serviceBus: 19210, azurite: 20700, queue: 20701, gateway: 19287 };

describe('store-and-forward', { timeout: 600_000 }, () => {
  let stack;
  let gw;
  let sb;
  const call = async (method, path, body, headers = {}) => {
    const res = await fetch(`${gw.url}${path}`, {
      method,
      body,
      headers: { 'x-api-key': stack.apiKey, ...headers },
      signal: AbortSignal.timeout(60_000),
    });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, headers: res.headers, text, json };
  };
  const logOf = async (res) => {
    const id = res.headers.get('x-request-id');
    return JSON.parse(await gw.waitForLog((_l, j) => j?.request_id === id && 'status' in j, 10_000));
  };
  /** Polls until `check()` is true, or fails after `ms`. */
  const eventually = async (what, check, ms = 60_000) => {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      if (await check()) return;
      await sleep(250);
    }
    assert.fail(`not within ${ms} ms: ${what}`);
  };
  const storedIds = async () => (await sb.messages('orders-dedup')).map((m) => {
    const props = typeof m.brokerProperties === 'string' ? JSON.parse(m.brokerProperties) : m.brokerProperties;
    return props?.MessageId;
  });
  /** The stand-in's counters of orders-dedup: { accepted, duplicates, … }. */
  const counters = async () => (await sb.stats()).entities['orders-dedup'];
  /** The worker's delivery log lines for the stored requests of these request ids. */
  const deliveries = (requestIds) => gw.logs
    .map((l) => { try { return JSON.parse(l); } catch { return null; } })
    .filter((j) => j?.kind === 'delivery' && requestIds.includes(j.request_id));

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'store-forward-policy.json'),
      ports: PORTS,
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'store-forward'),
      serviceBus: { entities: ['orders-dedup:duplicate-detection=60'] },
      queue: false,
    });
    gw = stack.gateway;
    sb = stack.serviceBus;
  });
  beforeEach(async () => {
    await sb.clearFaults();
    await stack.issuer.clearFaults();
  });
  after(async () => {
    await stack?.stop();
  });

  test('while Service Bus is down, sends are queued (202) and delivered once each when it is back', async () => {
    // The identity provider is up: a token is cached first.
    const warm = await call('POST', '/orders/warm', 'warm', { 'idempotency-key': 'sf-warm' });
    assert.equal(warm.status, 202, warm.text);
    assert.equal(warm.json.status, 'accepted');
    await sb.purge();
    await sb.setFault({ status: 503, retryAfter: 1, count: 100_000, entity: 'orders-dedup' });
    const keys = ['sf-1', 'sf-2', 'sf-3', 'sf-4'];
    const answers = [];
    for (const key of keys) answers.push(await call('POST', '/orders/t', `body of ${key}`, { 'idempotency-key': key }));
    // The same request twice (a client retrying after a timeout): both acknowledged.
    answers.push(await call('POST', '/orders/t', 'body of sf-1', { 'idempotency-key': 'sf-1' }));
    for (const [i, res] of answers.entries()) {
      assert.equal(res.status, 202, `${i}: ${res.text}`);
      assert.equal(res.json.status, 'queued');
      assert.equal(res.json.messageId, keys[i] ?? 'sf-1');
    }
    const first = await logOf(answers[0]);
    assert.equal(first.stored, 'queued');
    assert.equal(first.unavailable, 'backend-unavailable');
    // With the breaker open, later ones are queued without calling Azure at all.
    assert.equal((await logOf(answers[3])).unavailable, 'backend-circuit-open');
    // A route that does not store requests answers 503 as before.
    const plain = await call('POST', '/plain/t', 'x', { 'idempotency-key': 'sf-plain' });
    assert.equal(plain.status, 503, plain.text);
    assert.ok(plain.headers.get('retry-after'));
    assert.deepEqual(await storedIds(), [], 'nothing stored while down');

    // Five stored requests (sf-1 twice) are delivered once each: the stand-in stores four
    // messages and drops exactly one duplicate, the caller's own resend of sf-1. Duplicate
    // detection is on for this entity (store-and-forward requires it), so its `duplicates`
    // counter is what shows a second delivery or a doubled send.
    const before = await counters();
    const requestIds = answers.map((r) => r.headers.get('x-request-id'));
    await sb.clearFaults();
    const delivered = () => deliveries(requestIds).filter((j) => j.outcome === 'delivered');
    await eventually('every queued send delivered', async () => delivered().length >= answers.length);
    // A delivery acknowledged late or sent twice would show within moments; none may.
    await sleep(3_000);
    const after = await counters();
    assert.equal(after.accepted - before.accepted, keys.length, 'messages stored');
    assert.equal(after.duplicates - before.duplicates, 1, "duplicates dropped: only the caller's resend of sf-1");
    assert.deepEqual(delivered().map((j) => j.request_id).sort(), [...requestIds].sort(), 'one delivery per stored request');
    const ids = await storedIds();
    assert.deepEqual([...ids].sort(), [...keys].sort(), 'each MessageId exactly once');
    const bodies = (await sb.messages('orders-dedup')).map((m) => m.body.toString());
    assert.ok(bodies.includes('body of sf-3'));
    assert.ok(delivered().every((j) => j.route === 'orders'), JSON.stringify(delivered()));
  });

  test('with the identity provider down and no token cached, a blob write is queued and written once later', async () => {
    await stack.issuer.setFault({ status: 503, count: 100_000 });
    const small = randomBytes(5_000);
    const res = await call('PUT', '/files/a.bin', small, { 'content-type': 'application/octet-stream' });
    assert.equal(res.status, 202, res.text);
    assert.deepEqual(res.json, { status: 'queued', container: 'uploads', blob: 'store-forward/a.bin' });
    // Too large for a queue message: the 503 of today, and the log says why.
    const big = await call('PUT', '/files/big.bin', randomBytes(100 * 1024), { 'content-type': 'application/octet-stream' });
    assert.equal(big.status, 503, big.text);
    assert.match((await logOf(big)).stored ?? '', /not stored/);
    await stack.issuer.clearFaults();
    const token = await storageToken(stack.issuer, stack.clientSecret);
    const read = () => blobRequest(`${stack.azurite.url}/uploads/store-forward/a.bin`, { token, ca: stack.azurite.ca });
    await eventually('the blob written', async () => (await read()).status === 200);
    const blob = await read();
    assert.ok(blob.body.equals(small), 'the same bytes');
    const missing = await blobRequest(`${stack.azurite.url}/uploads/store-forward/big.bin`, { token, ca: stack.azurite.ca });
    assert.equal(missing.status, 404);
  });
});

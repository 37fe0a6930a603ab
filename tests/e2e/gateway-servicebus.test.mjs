/**
 * Service Bus routes end to end: the worker in workerd sends to the Service Bus stand-in of the
 * local stack (which checks the token's signature, audience and expiry, the properties and the
 * sizes like Azure), and the tests read what arrived from the stand-in, and its counters: how
 * many messages each entity stored (`accepted`), dropped as duplicates, and refused by status.
 * Route `recorded` reaches the stand-in through a recording front (RECORDER_PORT), which keeps
 * every request as the gateway sent it, headers included, whatever the stand-in answered.
 */
import { after, before, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { createServer, request as httpRequest } from 'node:http';
import { join } from 'node:path';
import { requestToken, SERVICEBUS_AUDIENCE, startStack } from './stack.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const KEY = randomBytes(18).toString('base64url');
const RECORDER_PORT = 18412;
const report = [];

/**
 * A front for the stand-in on 127.0.0.1:port that forwards each request unchanged and records it:
 * { method, path, headers: [[name, value], ...] as received (repeated headers kept), status }.
 * The stand-in keeps neither a request's Authorization nor a refused request's BrokerProperties;
 * this record does.
 */
async function startRecorder(port, target) {
  const seen = [];
  const upstream = new URL(target);
  const server = createServer((req, res) => {
    const headers = [];
    for (let i = 0; i < req.rawHeaders.length; i += 2) headers.push([req.rawHeaders[i], req.rawHeaders[i + 1]]);
    const entry = { method: req.method, path: req.url, headers, status: null };
    seen.push(entry);
    const forwarded = {};
    for (const [name, value] of headers) {
      const lower = name.toLowerCase();
      if (lower === 'host' || lower === 'connection') continue;
      forwarded[lower] = lower in forwarded ? [].concat(forwarded[lower], value) : value;
    }
    const out = httpRequest({ host: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers: forwarded }, (answer) => {
      entry.status = answer.statusCode;
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    out.setTimeout(30_000, () => out.destroy(new Error('the stand-in did not answer')));
    out.on('error', () => { if (!res.headersSent) res.writeHead(502); res.end(); });
    req.pipe(out);
  });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  return {
    seen,
    stop: () => new Promise((resolve) => { server.close(() => resolve()); server.closeAllConnections(); }),
  };
}

/** Values of a header in a recorded request, by name (any case). */
const headerValues = (entry, name) => entry.headers.filter(([n]) => n.toLowerCase() === name).map(([, v]) => v);

describe('Service Bus routes', () => {
  let stack;
  let gw;
  let sb;
  let recorder;
  const send = async (path, body, headers = {}) => {
    const res = await fetch(`${gw.url}${path}`, { method: 'POST', body, headers });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, headers: res.headers, text, json };
  };
  const logOf = async (res) => {
    const id = res.headers.get('x-request-id');
    return JSON.parse(await gw.waitForLog((_l, j) => j?.request_id === id && 'status' in j, 10_000));
  };
  const stored = (entity) => sb.messages(entity);
  /** An entity's counters: { accepted, duplicates, rejected: { status: n }, … }. */
  const counters = async (entity) => (await sb.stats()).entities[entity];
  /** What changed in an entity's counters since `before` (a counters() result). */
  const countedSince = async (entity, before) => {
    const now = await counters(entity);
    const rejected = {};
    for (const [status, n] of Object.entries(now.rejected)) {
      if (n !== (before.rejected[status] ?? 0)) rejected[status] = n - (before.rejected[status] ?? 0);
    }
    return { accepted: now.accepted - before.accepted, duplicates: now.duplicates - before.duplicates, rejected };
  };
  const sendCount = async () => {
    const s = await sb.stats();
    return Object.values(s.entities).reduce((n, e) => n + e.accepted + Object.values(e.rejected).reduce((a, b) => a + b, 0), 0);
  };

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'servicebus-policy.json'),
      ports: { issuer: 18400, azurite: 20000, serviceBus: 18410, gateway: 18791 },
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'servicebus'),
      serviceBus: { entities: ['orders', 'orders-dedup:duplicate-detection=60', 'events', 'load:duplicate-detection=600', 'direct'] },
      gatewaySecrets: { E2E_KEY: KEY },
    });
    gw = stack.gateway;
    sb = stack.serviceBus;
    recorder = await startRecorder(RECORDER_PORT, sb.url);
  });
  beforeEach(async () => {
    await sb.clearFaults();
    await sb.purge();
  });
  after(async () => {
    await recorder?.stop();
    await stack?.stop();
    if (report.length) console.log(`\n# service bus figures\n${report.map((l) => `#   ${l}`).join('\n')}`);
  });

  test('a JSON message arrives byte-identical with every mapped property', async () => {
    const body = JSON.stringify({ order: 42, items: ['a', 'b'], note: 'ünïcödé' });
    const traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
    const res = await send('/orders/contoso', body, { 'x-api-key': KEY, 'content-type': 'application/json', 'idempotency-key': 'order-42', traceparent, authorization: 'Bearer caller-token-never-forwarded' });
    assert.equal(res.status, 202, res.text);
    assert.deepEqual(res.json, { status: 'accepted', entity: 'orders', messageId: 'order-42' });
    const msgs = await stored('orders');
    assert.equal(msgs.length, 1);
    const [m] = msgs;
    assert.equal(m.body.toString('utf8'), body);
    assert.equal(m.contentType, 'application/json');
    assert.equal(m.brokerProperties.MessageId, 'order-42');
    assert.equal(m.brokerProperties.CorrelationId, '4bf92f3577b34da6a3ce929d0e0e4736');
    assert.equal(m.brokerProperties.Label, 'order-created');
    assert.equal(m.brokerProperties.TimeToLive, 3600);
    assert.equal(m.userProperties.tenant, 'contoso');
    assert.equal(m.userProperties.source, 'edge');
    const log = await logOf(res);
    assert.equal(log.backend_status, 201);
    assert.equal(log.identity, 'main');
  });

  test("the caller's Authorization and API key never reach Service Bus: the gateway's own token does", async () => {
    // The stand-in drops an Authorization header before it keeps properties, and keeps no
    // request headers: what the gateway sent is read from the recording front instead.
    const callerToken = `caller-${randomBytes(12).toString('base64url')}`;
    const from = recorder.seen.length;
    const res = await send('/recorded/contoso', '{"order": 43}', { 'x-api-key': KEY, 'content-type': 'application/json', authorization: `Bearer ${callerToken}` });
    assert.equal(res.status, 202, res.text);
    const sent = recorder.seen.slice(from);
    assert.deepEqual(sent.map((r) => [r.method, r.path, r.status]), [['POST', '/orders/messages', 201]]);
    const auth = headerValues(sent[0], 'authorization');
    assert.equal(auth.length, 1, `Authorization headers sent: ${auth.length}`);
    const [, payload] = auth[0].replace(/^Bearer /, '').split('.');
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
    assert.equal(claims.aud, SERVICEBUS_AUDIENCE, "the gateway's Service Bus token");
    assert.equal(claims.appid, stack.clientId);
    for (const [name, value] of sent[0].headers) {
      assert.ok(!value.includes(callerToken), `the caller's token went out in ${name}`);
      assert.ok(!value.includes(KEY), `the caller's API key went out in ${name}`);
    }
    assert.deepEqual(headerValues(sent[0], 'x-api-key'), []);
    const [m] = await stored('orders');
    assert.deepEqual(Object.keys(m.userProperties).sort(), ['source', 'tenant'], 'only the mapped properties');
  });

  test('a binary message arrives byte-identical', async () => {
    const body = randomBytes(64 * 1024);
    const res = await send('/orders/fabrikam', body, { 'x-api-key': KEY, 'content-type': 'application/octet-stream' });
    assert.equal(res.status, 202, res.text);
    const msgs = await stored('orders');
    assert.equal(msgs.length, 1);
    const [m] = msgs;
    assert.ok(m.body.equals(body), 'bytes differ');
    assert.equal(m.brokerProperties.MessageId, res.json.messageId);
    assert.match(res.json.messageId, /^[0-9a-f-]{36}$/);
  });

  test('the same Idempotency-Key twice yields one message', async () => {
    const before = await counters('orders-dedup');
    for (let i = 0; i < 2; i++) {
      const res = await send('/dedup/contoso', 'pay once', { 'idempotency-key': 'pay-7' });
      assert.equal(res.status, 202, res.text);
    }
    assert.equal((await stored('orders-dedup')).length, 1);
    // Two sends, one each: the second is the caller's, dropped by duplicate detection.
    assert.deepEqual(await countedSince('orders-dedup', before), { accepted: 1, duplicates: 1, rejected: {} });
  });

  test('a batch of 100 arrives in order, as one send', async () => {
    const batch = Array.from({ length: 100 }, (_, i) => ({ Body: { n: i }, UserProperties: { n: i } }));
    const before = (await sb.stats()).requests;
    const res = await send('/batch/contoso', JSON.stringify(batch), { 'content-type': 'application/json', 'idempotency-key': 'b1' });
    assert.equal(res.status, 202, res.text);
    assert.equal(res.json.messageIds.length, 100);
    assert.equal(res.json.messageIds[99], 'b1-99');
    assert.equal((await sb.stats()).requests - before, 1);
    const msgs = await stored('events');
    assert.deepEqual(msgs.map((m) => JSON.parse(m.body.toString()).n), [...Array(100).keys()]);
    assert.equal(msgs[7].userProperties.tenant, 'contoso');
    assert.equal(msgs[7].userProperties.n, '7');
  });

  test('every validation rule answers its 4xx and sends nothing', async () => {
    const sends = await sendCount();
    const at = { 'x-deliver-at': 'Sun, 06 Nov 1994 08:49:37 GMT' };
    const cases = [
      ['/sessions/' + 'x'.repeat(129) + '?pk=' + 'x'.repeat(129), 'b', at, 400, /SessionId must be 1 to 128 characters/],
      ['/sessions/a?pk=b', 'b', at, 400, /SessionId and PartitionKey must be equal/],
      ['/sessions/a?pk=a', 'b', { 'x-deliver-at': 'tomorrow' }, 400, /RFC 1123/],
      ['/sessions/a', 'b', at, 400, /query parameter pk is required/],
      ['/sessions/a?pk=a', 'b', {}, 400, /header x-deliver-at is required/],
      ['/dedup/a', 'b', { 'idempotency-key': 'k'.repeat(129) }, 400, /MessageId must be 1 to 128/],
      ['/small', 'x'.repeat(2000), {}, 413, /at most 1024/],
      ['/small', 'x'.repeat(980), {}, 413, /with its properties/], // 980 + ~110 bytes of BrokerProperties
      ['/batch/a', JSON.stringify([{ Body: 'ok' }, { Body: 'bad', BrokerProperties: { TimeToLive: 'soon' } }]), {}, 400, /batch\[1\]\.BrokerProperties\.TimeToLive/],
      ['/batch/a', '{"not": "an array"}', {}, 400, /non-empty JSON array/],
      ['/orders/a', 'b', {}, 401, /x-api-key/],
    ];
    for (const [path, body, headers, status, detail] of cases) {
      const res = await send(path, body, headers);
      assert.equal(res.status, status, `${path}: ${res.text}`);
      assert.equal(res.headers.get('content-type'), 'application/problem+json');
      assert.match(res.json.detail, detail, path);
    }
    // A body streamed without Content-Length is cut off at the limit, too.
    const stream = new ReadableStream({ start(c) { c.enqueue(new Uint8Array(800)); c.enqueue(new Uint8Array(800)); c.close(); } });
    const chunked = await fetch(`${gw.url}/small`, { method: 'POST', body: stream, duplex: 'half' });
    assert.equal(chunked.status, 413, await chunked.text());
    assert.equal(await sendCount(), sends, 'nothing reached Service Bus');
    assert.equal((await stored('orders')).length + (await stored('events')).length, 0);
  });

  test('Service Bus failures map as specified', async () => {
    // 503 twice with Retry-After, then accepted: three attempts, all with the MessageId the
    // gateway chose (no Idempotency-Key), stored once. `orders` has no duplicate detection, so a
    // second copy would be stored; the recording front sees the refused attempts' BrokerProperties,
    // which the stand-in never reads (a fault answers before the message is parsed).
    await sb.setFault({ status: 503, retryAfter: 1, count: 2, entity: 'orders' });
    const before = await counters('orders');
    const from = recorder.seen.length;
    let res = await send('/recorded/a', 'retry me', { 'x-api-key': KEY });
    assert.equal(res.status, 202, res.text);
    const attempts = recorder.seen.slice(from);
    assert.deepEqual(attempts.map((r) => r.status), [503, 503, 201]);
    const ids = attempts.map((r) => headerValues(r, 'brokerproperties').map((b) => JSON.parse(b).MessageId));
    assert.deepEqual(ids, [[res.json.messageId], [res.json.messageId], [res.json.messageId]], 'every attempt carried the MessageId the caller was told');
    assert.deepEqual(await countedSince('orders', before), { accepted: 1, duplicates: 0, rejected: { 503: 2 } });
    const msgs = await stored('orders');
    assert.equal(msgs.length, 1);
    assert.equal(msgs[0].brokerProperties.MessageId, res.json.messageId);

    // Failing on and on: 503 with Retry-After, never a 2xx.
    await sb.setFault({ status: 429, retryAfter: 2, count: 10, entity: 'orders' });
    res = await send('/orders/a', 'x', { 'x-api-key': KEY });
    assert.equal(res.status, 503, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-unavailable');
    assert.ok(Number(res.headers.get('retry-after')) >= 1);
    await sb.clearFaults();

    const mapped = [[400, 400, 'bad-message'], [403, 502, 'backend-authorization-failed'], [413, 413, 'body-too-large'], [410, 502, 'backend-entity-not-found']];
    for (const [fault, status, kind] of mapped) {
      await sb.setFault({ status: fault, count: 1, entity: 'orders' });
      res = await send('/orders/a', 'x', { 'x-api-key': KEY });
      assert.equal(res.status, status, `${fault}: ${res.text}`);
      assert.equal(res.json.type, `urn:azure-edge-gateway:problem:${kind}`);
    }
    // An entity that does not exist: the stand-in answers 410 like Azure.
    res = await send('/missing', 'x');
    assert.equal(res.status, 502, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-entity-not-found');

    // A 401 evicts the token and the same request is replayed once with a fresh one.
    await sb.setFault({ status: 401, count: 1, entity: 'orders' });
    res = await send('/orders/a', 'x', { 'x-api-key': KEY });
    assert.equal(res.status, 202, res.text);
    assert.equal((await logOf(res)).token_renewed, true);
    // Refused twice: the caller's 502, and no token in the answer.
    await sb.setFault({ status: 401, count: 2, entity: 'orders' });
    res = await send('/orders/a', 'x', { 'x-api-key': KEY });
    assert.equal(res.status, 502, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-authorization-failed');
    assert.ok(!res.text.includes('eyJ'), 'no token in the answer');
    res = await send('/orders/a', 'x', { 'x-api-key': KEY });
    assert.equal(res.status, 202, res.text);
    assert.equal((await logOf(res)).token, 'fetched');
  });

  /** Sends `count` messages with 32 in flight through `sendOne(id)`; returns messages per second. */
  async function pump(prefix, count, sendOne) {
    const ids = Array.from({ length: count }, (_, i) => `${prefix}-${i}`);
    let next = 0;
    const failures = [];
    const t0 = performance.now();
    await Promise.all(Array.from({ length: 32 }, async () => {
      while (next < ids.length) {
        const id = ids[next++];
        const status = await sendOne(id);
        if (status !== 202 && status !== 201) failures.push(`${id}: ${status}`);
      }
    }));
    assert.deepEqual(failures, []);
    return { ids, rate: count / ((performance.now() - t0) / 1000) };
  }

  test('1,000 messages sent with 32 in flight all arrive exactly once', async () => {
    const before = await counters('load');
    const { ids, rate } = await pump('load', 1000, async (id) => (await send('/load', `message ${id}`, { 'idempotency-key': id })).status);
    const msgs = await stored('load');
    assert.equal(msgs.length, 1000);
    // Once each by the gateway, not thanks to the entity's duplicate detection: nothing was dropped.
    assert.deepEqual(await countedSince('load', before), { accepted: 1000, duplicates: 0, rejected: {} });
    assert.deepEqual(new Set(msgs.map((m) => m.brokerProperties.MessageId)), new Set(ids));
    for (const m of msgs) assert.equal(m.body.toString(), `message ${m.brokerProperties.MessageId}`);
    report.push(`1000 messages, 32 in flight: all stored once (${rate.toFixed(0)} msg/s)`);
  });

  // A measurement, not an assertion: gateway and direct alternate in one run on one machine.
  test('throughput through the gateway versus straight to the stand-in (reported)', async () => {
    const token = (await requestToken(stack.issuer.tokenUrlV2, { clientId: stack.clientId, secret: stack.clientSecret, scope: 'https://servicebus.azure.net/.default' })).body.access_token;
    const direct = (id) => fetch(`${sb.url}/direct/messages`, {
      method: 'POST',
      body: `message ${id}`,
      headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain', brokerproperties: JSON.stringify({ MessageId: id }) },
    }).then(async (r) => { await r.arrayBuffer(); return r.status; });
    const viaGateway = async (id) => (await send('/load', `message ${id}`, { 'idempotency-key': id })).status;
    // The floor of the local runtime itself: a 404 through wrangler dev and workerd, no I/O.
    const floor = async () => { const r = await fetch(`${gw.url}/nothing`, { method: 'POST', body: 'x' }); await r.arrayBuffer(); return r.status === 404 ? 202 : r.status; };
    const rates = { gateway: [], direct: [], floor: [] };
    for (let round = 0; round < 3; round++) {
      rates.gateway.push((await pump(`gw${round}`, 500, viaGateway)).rate);
      rates.direct.push((await pump(`direct${round}`, 500, direct)).rate);
      rates.floor.push((await pump(`floor${round}`, 500, floor)).rate);
    }
    const median = (xs) => [...xs].sort((a, b) => a - b)[1];
    const [g, d, f] = [median(rates.gateway), median(rates.direct), median(rates.floor)];
    report.push(`32 in flight, 3 alternating rounds of 500: gateway ${g.toFixed(0)} msg/s, direct ${d.toFixed(0)} msg/s, gateway/direct ${(g / d).toFixed(2)}; a 404 through the same wrangler dev: ${f.toFixed(0)} req/s`);
  });
});

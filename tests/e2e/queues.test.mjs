/**
 * Storage queue and Event Hubs routes end to end: the worker in workerd puts messages on
 * Azurite's real Queue service (HTTPS, `--oauth basic`) and sends events to the event hub of the
 * Service Bus stand-in (which checks the token's signature and its Event Hubs audience, and
 * refuses Service Bus-only properties like Azure). Every check reads back what the peer stored
 * through the peer's own API: Azurite's Peek Messages, the stand-in's control routes.
 * Own ports (issuer 18900, Service Bus stand-in 18910, Azurite Blob 20500 and Queue 20501,
 * gateway 18987), so neither a dev stack nor the other suites interfere.
 * Run: source scripts/env.sh && node --test --test-concurrency=1 tests/e2e/queues.test.mjs
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { REPO_ROOT } from '../../dev/proc.mjs';
import { blobRequest, decodeBase64Text, peekQueueMessages, startStack, storageToken } from './stack.mjs';

const PORTS = { issuer: 18900, serviceBus: 18910, azurite: 20500, queue: 20501, gateway: 18987 };
const KEY = randomBytes(18).toString('base64url');
const PARTITIONS = 4;

let stack;
let gw;
let sb;
let storageTok;

const send = async (path, body, headers = {}) => {
  const res = await fetch(`${gw.url}${path}`, { method: 'POST', body, headers: { 'x-api-key': KEY, ...headers } });
  const text = await res.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, text, json };
};
const logOf = async (res) => {
  const id = res.headers.get('x-request-id');
  return JSON.parse(await gw.waitForLog((_l, j) => j?.request_id === id && 'status' in j, 10_000));
};
const peek = (queue) => peekQueueMessages(stack.queue.url, queue, storageTok, { ca: stack.queue.ca });
/** Clear Messages (Azurite's own REST API): empties a queue between tests. */
const clearQueue = async (queue) => {
  const cleared = await blobRequest(`${stack.queue.url}/${queue}/messages`, { method: 'DELETE', token: storageTok, ca: stack.queue.ca });
  assert.equal(cleared.status, 204, `clear ${queue}: ${cleared.body}`);
};
/** The stand-in's partition for a PartitionKey (a stable hash, as its store.rs documents). */
const partitionOf = (key) => String(createHash('sha256').update(key).digest().readUInt32BE(0) % PARTITIONS);
const seconds = (a, b) => (Date.parse(b) - Date.parse(a)) / 1000;

before(async () => {
  stack = await startStack({
    policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'queues-policy.json'),
    ports: PORTS,
    stateDir: join(REPO_ROOT, 'target', 'e2e', 'queues'),
    queues: ['jobs', 'delayed', 'notes'],
    serviceBus: { entities: ['orders', `telemetry:partitions=${PARTITIONS}`] },
    gatewaySecrets: { E2E_KEY: KEY },
  });
  gw = stack.gateway;
  sb = stack.serviceBus;
  storageTok = await storageToken(stack.issuer, stack.clientSecret);
});
after(async () => {
  await stack?.stop();
});

describe('Storage queue routes', () => {
  beforeEach(async () => {
    for (const q of ['jobs', 'delayed', 'notes']) await clearQueue(q);
  });

  test('a message arrives base64-encoded with the body\'s exact bytes, and the answer matches what Azurite stored', async () => {
    const body = Buffer.concat([Buffer.from('{"job":"resize","note":"ünï <&>"}'), randomBytes(2048)]);
    const res = await send('/jobs', body, { 'content-type': 'application/octet-stream' });
    assert.equal(res.status, 202, res.text);
    assert.equal(res.headers.get('content-type'), 'application/json');
    assert.deepEqual(Object.keys(res.json).sort(), ['expiration_time', 'insertion_time', 'message_id', 'queue', 'status', 'time_next_visible']);
    assert.equal(res.json.status, 'accepted');
    assert.equal(res.json.queue, 'jobs');
    assert.doesNotMatch(res.text, /PopReceipt|pop_receipt/i);
    const [m, ...rest] = await peek('jobs');
    assert.equal(rest.length, 0);
    assert.equal(m.messageId, res.json.message_id);
    assert.equal(m.insertionTime, res.json.insertion_time);
    assert.ok(Buffer.from(m.messageText, 'base64').equals(body), 'stored bytes differ from the body');
    assert.equal(seconds(m.insertionTime, m.expirationTime), 7 * 24 * 3600, "Azure's default time to live");
    const log = await logOf(res);
    assert.equal(log.backend_status, 201);
    assert.equal(log.identity, 'main');
    // A text body written the SDKs' way reads back with the SDKs' default decoding.
    const again = await send('/jobs', 'hello queue');
    assert.equal(again.status, 202, again.text);
    assert.equal(decodeBase64Text((await peek('jobs'))[1].messageText), 'hello queue');
  });

  test('a message with a visibility timeout is not visible at once, then is; its time to live is the route\'s', async () => {
    const res = await send('/delayed', 'later');
    assert.equal(res.status, 202, res.text);
    const sentAt = Date.now();
    assert.equal(seconds(res.json.insertion_time, res.json.time_next_visible), 2);
    assert.equal(seconds(res.json.insertion_time, res.json.expiration_time), 3600);
    assert.deepEqual(await peek('delayed'), [], 'hidden right after the put');
    let seen = [];
    while (seen.length === 0 && Date.now() - sentAt < 10_000) {
      await new Promise((r) => setTimeout(r, 250));
      seen = await peek('delayed');
    }
    assert.equal(seen.length, 1, 'visible after the timeout');
    assert.ok(Date.now() - sentAt >= 1000, 'not visible before the timeout had mostly passed');
    assert.equal(decodeBase64Text(seen[0].messageText), 'later');
    assert.equal(seconds(seen[0].insertionTime, seen[0].expirationTime), 3600);
    // message_ttl_seconds -1: a message that never expires.
    const forever = await send('/forever', 'keep');
    assert.equal(forever.status, 202, forever.text);
    assert.equal(forever.json.expiration_time, 'Fri, 31 Dec 9999 23:59:59 GMT');
  });

  test('a text route stores the body as it is, markup, line breaks and all', async () => {
    const body = 'a < b && c > d </MessageText><x/>\r\n\t"quoted" \'single\' ünï 🦀';
    const res = await send('/notes', body, { 'content-type': 'text/plain; charset=utf-8' });
    assert.equal(res.status, 202, res.text);
    const [m] = await peek('notes');
    assert.equal(m.messageText, body);
    // Bytes XML cannot carry are refused before anything is sent.
    const bad = await send('/notes', Buffer.from('bell\x07'));
    assert.equal(bad.status, 400, bad.text);
    assert.equal(bad.headers.get('content-type'), 'application/problem+json');
    assert.match(bad.json.detail, /U\+0007 at byte 4/);
    const notUtf8 = await send('/notes', Buffer.from([0x61, 0xc3, 0x28]));
    assert.equal(notUtf8.status, 400, notUtf8.text);
    assert.match(notUtf8.json.detail, /must be UTF-8/);
    assert.equal((await peek('notes')).length, 1, 'nothing more stored');
  });

  test('a body over 64 KiB once encoded is refused with 413 and nothing is stored; the largest that fits is stored whole', async () => {
    const tooLarge = await send('/jobs', randomBytes(49_153));
    assert.equal(tooLarge.status, 413, tooLarge.text);
    assert.equal(tooLarge.headers.get('content-type'), 'application/problem+json');
    assert.match(tooLarge.json.detail, /at most 49152/);
    const log = await logOf(tooLarge);
    assert.equal(log.token, undefined, 'no token was fetched');
    assert.equal(log.backend_status, undefined, 'nothing was sent');
    // Streamed without Content-Length: cut off at the limit too.
    const stream = new ReadableStream({ start(c) { c.enqueue(new Uint8Array(40_000)); c.enqueue(new Uint8Array(40_000)); c.close(); } });
    const chunked = await fetch(`${gw.url}/jobs`, { method: 'POST', body: stream, duplex: 'half', headers: { 'x-api-key': KEY } });
    assert.equal(chunked.status, 413, await chunked.text());
    assert.deepEqual(await peek('jobs'), [], 'nothing stored');
    const largest = randomBytes(49_152);
    const ok = await send('/jobs', largest);
    assert.equal(ok.status, 202, ok.text);
    const [m] = await peek('jobs');
    assert.equal(m.messageText.length, 65_536);
    assert.ok(Buffer.from(m.messageText, 'base64').equals(largest));
  });

  test('a queue that does not exist is the operator\'s 502, with Azure\'s code in the log only', async () => {
    const res = await send('/missing', 'x');
    assert.equal(res.status, 502, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-entity-not-found');
    assert.match(res.json.detail, /no queue 'no-such-queue'/);
    assert.doesNotMatch(res.text, /QueueNotFound/);
    const log = await logOf(res);
    assert.equal(log.backend_status, 404);
    assert.match(log.backend_detail, /^QueueNotFound/);
  });
});

describe('Event Hubs routes', () => {
  beforeEach(async () => {
    await sb.clearFaults();
    await sb.purge();
  });

  test('one event goes to the partition of the route\'s key, with its properties and no Service Bus defaults', async () => {
    const body = JSON.stringify({ t: 21.5, unit: '°C' });
    const res = await send('/telemetry/dev-7', body, { 'content-type': 'application/json', 'idempotency-key': 'k-1' });
    assert.equal(res.status, 202, res.text);
    assert.deepEqual(res.json, { status: 'accepted', hub: 'telemetry', count: 1 });
    const [e, ...rest] = await sb.messages('telemetry');
    assert.equal(rest.length, 0);
    assert.equal(e.body.toString('utf8'), body);
    assert.equal(e.contentType, 'application/json');
    assert.equal(e.brokerProperties.PartitionKey, 'dev-7');
    assert.equal(e.brokerProperties.MessageId, undefined, 'no Service Bus default MessageId');
    assert.equal(e.brokerProperties.CorrelationId, undefined, 'no Service Bus default CorrelationId');
    assert.equal(e.userProperties.device, 'dev-7');
    assert.equal(e.partitionId, partitionOf('dev-7'));
    const log = await logOf(res);
    assert.equal(log.backend_status, 201);
  });

  test('a batch of several events is one send, every event on the key\'s partition', async () => {
    const before = (await sb.stats()).requests;
    const batch = [{ Body: { t: 1 } }, { Body: 'two', UserProperties: { n: 2 } }, { Body: { t: 3 } }];
    const res = await send('/telemetry/dev-9/batch', JSON.stringify(batch), { 'content-type': 'application/json' });
    assert.equal(res.status, 202, res.text);
    assert.deepEqual(res.json, { status: 'accepted', hub: 'telemetry', count: 3 });
    assert.equal((await sb.stats()).requests - before, 1, 'one request to the hub');
    const events = await sb.messages('telemetry');
    assert.deepEqual(events.map((e) => e.body.toString()), ['{"t":1}', 'two', '{"t":3}']);
    assert.ok(events.every((e) => e.partitionId === partitionOf('dev-9') && e.brokerProperties.PartitionKey === 'dev-9'));
    assert.equal(events[1].userProperties.n, '2');
  });

  test('without a route key, each event of a batch goes to the partition of its own key', async () => {
    // Two keys the stand-in's hash puts on different partitions.
    const keys = ['a', 'b', 'c', 'd', 'e', 'f'];
    const [k1] = keys;
    const k2 = keys.find((k) => partitionOf(k) !== partitionOf(k1));
    const batch = [k1, k2, k1].map((k, i) => ({ Body: `e${i}`, BrokerProperties: { PartitionKey: k } }));
    const res = await send('/spread', JSON.stringify(batch));
    assert.equal(res.status, 202, res.text);
    const events = await sb.messages('telemetry');
    assert.deepEqual(events.map((e) => [e.body.toString(), e.partitionId]),
      [['e0', partitionOf(k1)], ['e1', partitionOf(k2)], ['e2', partitionOf(k1)]]);
  });

  test('an event with a Service Bus-only property, or another key than the route\'s, is refused before anything is sent', async () => {
    const before = await sb.stats();
    const cases = [
      ['/spread', [{ Body: 'ok' }, { Body: 'x', BrokerProperties: { SessionId: 's-1' } }], /^batch\[1\]\.BrokerProperties\.SessionId is a Service Bus property/],
      ['/spread', [{ Body: 'x', BrokerProperties: { TimeToLive: 60 } }], /^batch\[0\]\.BrokerProperties\.TimeToLive is a Service Bus property/],
      ['/telemetry/dev-9/batch', [{ Body: 'x', BrokerProperties: { PartitionKey: 'dev-1' } }], /^batch\[0\]\.BrokerProperties\.PartitionKey is set by this route/],
    ];
    for (const [path, batch, detail] of cases) {
      const res = await send(path, JSON.stringify(batch));
      assert.equal(res.status, 400, res.text);
      assert.equal(res.headers.get('content-type'), 'application/problem+json');
      assert.equal(res.json.title, 'The event would be refused by Event Hubs');
      assert.match(res.json.detail, detail);
      const log = await logOf(res);
      assert.equal(log.token, undefined, 'no token was fetched');
    }
    const afterStats = await sb.stats();
    assert.equal(afterStats.requests, before.requests, 'nothing reached the hub');
    assert.deepEqual(await sb.messages('telemetry'), []);
  });

  test('a hub that keeps failing is retried, then 503 with Retry-After', async () => {
    await sb.setFault({ status: 503, retryAfter: 1, count: 5, entity: 'telemetry' });
    const before = (await sb.stats()).requests;
    const res = await send('/telemetry/dev-7', 'x');
    assert.equal(res.status, 503, res.text);
    assert.equal(res.json.title, 'Event Hubs is unavailable');
    assert.ok(Number(res.headers.get('retry-after')) >= 1);
    assert.equal((await sb.stats()).requests - before, 3, 'three attempts');
    assert.deepEqual(await sb.messages('telemetry'), []);
  });
});

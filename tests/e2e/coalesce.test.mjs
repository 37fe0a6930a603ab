/**
 * Group commit end to end: single-message sends that arrive while one is in flight leave as one
 * Send Message Batch, and a receiver cannot tell them from messages sent alone. The worker runs in
 * workerd against the Service Bus stand-in, which stores each message of a batch with what the
 * batch element carried (its ContentType from BrokerProperties, as a batch has one Content-Type
 * header for all). A send is held in flight by a stand-in fault that delays its answer, so that
 * the requests sent meanwhile queue behind it.
 *
 * Routes (tests/e2e/fixtures/coalesce-policy.json): `coalesced` (queue co), `alone` (queue
 * co-solo, "coalesce": false, the same mapping), `small` (queue co-small, whose stand-in entity
 * takes at most 2048 bytes per send while the route allows 256 KiB), `hub` (event hub co-hub).
 */
import { after, before, beforeEach, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { gatewayClient, serviceBusToken, startStack } from './stack.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
/** What a stored message says beyond what the store adds (sequence numbers, enqueue time). */
const SYSTEM = ['SequenceNumber', 'EnqueuedSequenceNumber', 'EnqueuedTimeUtc', 'DeliveryCount', 'State', 'LockToken', 'LockedUntilUtc'];
const seen = (m) => {
  const broker = { ...m.brokerProperties };
  for (const name of SYSTEM) delete broker[name];
  return { body: m.body.toString('base64'), contentType: m.contentType, broker, user: m.userProperties };
};

describe('coalesced sends (group commit)', () => {
  let stack;
  let sb;
  const { call, logOf } = gatewayClient(() => stack);
  const post = (path, body, headers = {}, signal) => call('POST', path, { body, headers: { 'x-note': 'n', ...headers }, signal });
  const requests = async () => (await sb.stats()).requests;
  /** Holds the next `count` sends to `entity` for `ms` before the stand-in stores and answers them. */
  const holdSends = (entity, ms, count = 1) => sb.setFault({ entity, delayMs: ms, count });

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'coalesce-policy.json'),
      ports: { issuer: 25400, azurite: 25000, gateway: 25787 },
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'coalesce'),
      queue: false,
      serviceBus: {
        entities: [
          'co:duplicate-detection=600', 'co-solo:duplicate-detection=600',
          'co-small:duplicate-detection=600,max-size=2048', 'co-hub:partitions=2',
        ],
      },
    });
    sb = stack.serviceBus;
  });
  beforeEach(async () => {
    await sb.clearFaults();
    await sb.purge();
  });
  after(async () => {
    await stack?.stop();
  });

  test('messages that queue behind a send leave as one batch, and arrive as if each was sent alone', async () => {
    // Bodies and values that try to close the batch's JSON: the batch is the serializer's.
    const hostile = [
      '"}],[{"Body":"injected","BrokerProperties":{"MessageId":"x"}}]',
      '{"order": 1, "note": "ünïcödé \\u0000 \u2028"}',
      '\\"}]}',
      '',
      'plain text\nwith lines\r\n',
      ']',
      '{"Body": "not a field"}',
      'x'.repeat(20_000),
    ];
    const types = ['application/json', 'text/plain; charset=utf-8', 'application/x-custom', 'application/octet-stream'];
    const tenants = ['%22%7D%5D%2C%5B%7B', 'contoso', '%5D', 'fabrikam'];
    const message = (i) => ({
      body: hostile[i % hostile.length],
      headers: {
        'content-type': types[i % types.length],
        'idempotency-key': `same-${i}-${randomBytes(4).toString('hex')}`,
        traceparent: `00-${randomBytes(16).toString('hex')}-00f067aa0ba902b7-01`,
        'x-note': i % 2 ? '","Body":"x' : 'note ] } value',
      },
      tenant: tenants[i % tenants.length],
    });
    const messages = Array.from({ length: 12 }, (_, i) => message(i));

    await holdSends('co', 800);
    const before = await requests();
    const first = post('/co/first', 'the send in flight', { 'content-type': 'text/plain' });
    await sleep(200);
    const queued = await Promise.all(messages.map((m) => post(`/co/${m.tenant}`, m.body, m.headers)));
    const firstRes = await first;
    assert.equal(firstRes.status, 202, firstRes.text);
    for (const res of queued) assert.equal(res.status, 202, res.text);
    assert.equal(await requests() - before, 2, 'one send alone, then one batch for the twelve that queued behind it');

    const logs = await Promise.all(queued.map(logOf));
    const leaders = new Set(logs.map((l) => l.batch_leader));
    assert.equal(leaders.size, 1, `one batch: ${JSON.stringify(logs.map((l) => [l.batch, l.batch_leader]))}`);
    for (const log of logs) assert.equal(log.batch, 12);
    assert.ok(queued.some((r) => r.headers.get('x-request-id') === [...leaders][0]), 'the leader is one of the waiting requests');
    const firstLog = await logOf(firstRes);
    assert.equal(firstLog.batch, undefined, 'the send to an idle entity went alone');

    // The same twelve sent alone, one after the other, to an entity that never coalesces.
    for (const m of messages) {
      const res = await post(`/solo/${m.tenant}`, m.body, m.headers);
      assert.equal(res.status, 202, res.text);
    }
    const byId = (list) => Object.fromEntries(list.map((m) => [m.brokerProperties.MessageId, seen(m)]));
    const coalesced = byId((await sb.messages('co')).filter((m) => m.brokerProperties.MessageId.startsWith('same-')));
    const alone = byId(await sb.messages('co-solo'));
    assert.equal(Object.keys(coalesced).length, 12);
    assert.deepEqual(coalesced, alone, 'a receiver sees the same message either way');
    // And as a receiver gets them, the Azure way (receive and delete): the Content-Type, the
    // BrokerProperties header and each application property as a header of its own.
    const token = await serviceBusToken(stack.issuer, stack.clientSecret);
    const receiveAll = async (entity) => {
      const out = {};
      for (;;) {
        const got = await sb.receive(entity, token);
        if (got.status !== 200) break;
        const broker = { ...got.brokerProperties };
        for (const name of SYSTEM) delete broker[name];
        const headers = {};
        for (const [name, value] of got.headers) if (!['date', 'content-length', 'brokerproperties', 'connection', 'keep-alive'].includes(name)) headers[name] = value;
        out[broker.MessageId] = { body: got.body.toString('base64'), broker, headers };
      }
      return out;
    };
    const receivedCoalesced = await receiveAll('co');
    const receivedAlone = await receiveAll('co-solo');
    for (const id of Object.keys(alone)) assert.deepEqual(receivedCoalesced[id], receivedAlone[id], `received ${id}`);
  });

  test('a body the batch format cannot carry byte for byte is sent alone', async () => {
    const binary = Buffer.from([0xff, 0xfe, 0x00, 0x80, 0xc3, 0x28]);
    await holdSends('co', 600);
    const first = post('/co/t', 'in flight');
    await sleep(150);
    const [bin, text] = await Promise.all([
      post('/co/t', binary, { 'content-type': 'application/octet-stream' }),
      post('/co/t', 'text waits', { 'content-type': 'text/plain' }),
    ]);
    assert.equal((await first).status, 202);
    assert.equal(bin.status, 202, bin.text);
    assert.equal(text.status, 202, text.text);
    const stored = (await sb.messages('co')).find((m) => m.brokerProperties.MessageId === bin.json.messageId);
    assert.ok(stored.body.equals(binary), 'the bytes arrived as sent');
    assert.equal(stored.contentType, 'application/octet-stream');
    assert.equal((await logOf(bin)).batch, undefined);
  });

  test("a batch refused for one message's size is sent again alone: each caller gets its own answer", async () => {
    // The stand-in's co-small takes 2048 bytes per send: each of these fits alone, two do not fit
    // together, and the last is over the limit even alone.
    await holdSends('co-small', 600);
    const first = post('/small/t', 'in flight');
    await sleep(150);
    const sizes = [900, 900, 900, 3000];
    const results = await Promise.all(sizes.map((n, i) => post('/small/t', String(i).repeat(n), { 'content-type': 'text/plain' })));
    assert.equal((await first).status, 202);
    assert.deepEqual(results.map((r) => r.status), [202, 202, 202, 413], results.map((r) => r.text).join('\n'));
    assert.equal(results[3].json.type, 'urn:azure-edge-gateway:problem:body-too-large');
    const stored = await sb.messages('co-small');
    const ids = stored.map((m) => m.brokerProperties.MessageId);
    for (const r of results.slice(0, 3)) assert.equal(ids.filter((id) => id === r.json.messageId).length, 1, 'stored once');
    assert.equal(stored.length, 4, 'the send in flight and the three that fit');
    const logs = await Promise.all(results.map(logOf));
    assert.ok(logs.some((l) => /refused as a whole/.test(l.backend_detail ?? '')), JSON.stringify(logs));
  });

  test("the batch survives its leader's caller going away; every other caller is answered and every message is stored once", async () => {
    // The send alone and the batch after it are each held 1200 ms.
    await holdSends('co', 1200, 2);
    const first = post('/co/t', 'in flight');
    await sleep(200);
    const leaderAbort = new AbortController();
    const leader = post('/co/t', 'the leader', { 'idempotency-key': 'leader-1' }, leaderAbort.signal).catch((e) => ({ aborted: e.name }));
    await sleep(100);
    const followers = Array.from({ length: 6 }, (_, i) => post('/co/t', `follower ${i}`, { 'idempotency-key': `follower-${i}` }));
    // The batch leaves when the first send completes (~1200 ms) and is held 1200 ms more: the
    // leader's caller hangs up while it is in flight.
    await sleep(1500);
    leaderAbort.abort();
    assert.deepEqual(await leader, { aborted: 'AbortError' });
    const answered = await Promise.all(followers);
    for (const res of answered) assert.equal(res.status, 202, res.text);
    assert.equal((await first).status, 202);
    const logs = await Promise.all(answered.map(logOf));
    for (const log of logs) assert.equal(log.batch, 7, JSON.stringify(log));
    const stored = (await sb.messages('co')).map((m) => m.brokerProperties.MessageId);
    for (const id of ['leader-1', ...answered.map((_, i) => `follower-${i}`)]) {
      assert.equal(stored.filter((s) => s === id).length, 1, `${id} stored once: ${JSON.stringify(stored)}`);
    }
    const arrivals = await sb.arrivals('co');
    assert.equal(arrivals['leader-1']?.arrived, 1, `the leader's message went out once: ${JSON.stringify(arrivals['leader-1'])}`);
  });

  test('events with one partition key leave as one batch; another key travels in its own', async () => {
    await holdSends('co-hub', 600, 2);
    const before = await requests();
    const firstA = post('/hub/a', 'a0');
    const firstB = post('/hub/b', 'b0');
    await sleep(150);
    const queued = await Promise.all([
      ...Array.from({ length: 4 }, (_, i) => post('/hub/a', `a${i + 1}`, { 'content-type': 'application/json' })),
      ...Array.from({ length: 3 }, (_, i) => post('/hub/b', `b${i + 1}`)),
    ]);
    for (const res of [await firstA, await firstB, ...queued]) assert.equal(res.status, 202, res.text);
    assert.equal(await requests() - before, 4, 'each key: one send alone, then one batch');
    const events = await sb.messages('co-hub');
    assert.equal(events.length, 9);
    for (const key of ['a', 'b']) {
      const mine = events.filter((e) => e.brokerProperties.PartitionKey === key);
      assert.equal(new Set(mine.map((e) => e.partitionId)).size, 1, 'one partition per key');
      for (const e of mine) assert.equal(e.userProperties.device, key);
    }
    const a1 = events.find((e) => e.body.toString() === 'a1');
    assert.equal(a1.contentType, 'application/json');
  });
});

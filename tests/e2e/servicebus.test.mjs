/**
 * The Service Bus stand-in's contract (dev/servicebus), without the gateway: what it accepts and
 * refuses must be what Service Bus accepts and refuses, or the gateway's end-to-end tests prove
 * nothing. Tokens come from the stack's Entra-like issuer; bad ones are made with its signing hook.
 * Ports 18400/20000/18410 so a running dev stack (8400/10000/8410) does not interfere.
 * Run: source scripts/env.sh && node --test tests/e2e/servicebus.test.mjs
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes, sign } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { Events } from 'oauth2-mock-server';
import { startServiceBus } from '../../dev/servicebus.mjs';
import { serviceBusToken } from '../../dev/stack.mjs';
import { CLIENT_ID, requestToken, SERVICEBUS_AUDIENCE, startStack, STORAGE_AUDIENCE } from './stack.mjs';

const PORTS = { issuer: 18400, azurite: 20000, serviceBus: 18410 };
const ENTITIES = ['orders', 'dedup:duplicate-detection=60', 'small:max-size=1024,lock-duration=2'];
const BATCH = 'application/vnd.microsoft.servicebus.json';
let stack;
let sb;
let stateDir;
let token;

before(async () => {
  stateDir = mkdtempSync(join(tmpdir(), 'aeg-servicebus-test-'));
  stack = await startStack({ ports: PORTS, stateDir, gateway: false, serviceBus: { entities: ENTITIES } });
  sb = stack.serviceBus;
  token = await serviceBusToken(stack.issuer, stack.clientSecret);
}, { timeout: 300_000 });

after(async () => {
  await stack?.stop();
  if (stateDir) rmSync(stateDir, { recursive: true, force: true });
});

beforeEach(async () => {
  await sb.clearFaults();
  await sb.purge();
  await sb.resetStats();
});

/** POST /{entity}/messages with a Service Bus token unless headers.authorization says otherwise. */
async function send(entity, body, headers = {}) {
  const res = await fetch(`${sb.url}/${entity}/messages?timeout=60&api-version=2021-05`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain', ...headers },
    body,
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

/** A Service Bus token whose claims the test rewrites just before the issuer signs it. */
async function tokenWith(edit) {
  stack.issuer.service.once(Events.BeforeTokenSigning, (t) => edit(t.payload));
  const res = await requestToken(stack.issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: stack.clientSecret, scope: `${SERVICEBUS_AUDIENCE}/.default` });
  assert.equal(res.status, 200);
  return res.body.access_token;
}

/** Azure's error shape: XML, <Code> the status, <Detail> "Word: message TrackingId:…, SystemTracker:…, Timestamp:…". */
function assertAzureError(res, status, word) {
  assert.equal(res.status, status, res.text);
  assert.equal(res.headers.get('content-type'), 'application/xml; charset=utf-8');
  const m = /^<Error><Code>(\d+)<\/Code><Detail>(.*)<\/Detail><\/Error>$/s.exec(res.text);
  assert.ok(m, res.text);
  assert.equal(Number(m[1]), status);
  assert.match(m[2], new RegExp(`^${word}: .+ TrackingId:[0-9a-f-]{36}_G0, SystemTracker:[^,]+, Timestamp:\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d$`));
}

describe('send and read back', () => {
  test('one message: byte-identical binary body, BrokerProperties and custom properties round-trip', async () => {
    const body = Buffer.concat([Buffer.from([0, 1, 2, 0xff, 0xfe, 0x0d, 0x0a]), randomBytes(4096)]);
    const broker = { MessageId: 'order-1', CorrelationId: 'corr-1', Label: 'created', SessionId: 's1', PartitionKey: 's1', TimeToLive: 600, ForcePersistence: true };
    const res = await send('orders', body, {
      'content-type': 'application/octet-stream',
      BrokerProperties: JSON.stringify(broker),
      Priority: 'High',
      'x-request-id': 'req-42',
      'x-forwarded-for': '203.0.113.9',
    });
    assert.equal(res.status, 201, res.text);
    assert.equal(res.text, '');

    const [stored] = await sb.messages('orders');
    assert.ok(stored.body.equals(body), 'stored bytes are the sent bytes');
    assert.equal(stored.contentType, 'application/octet-stream');
    assert.deepEqual(stored.userProperties, { priority: 'High', 'x-request-id': 'req-42' });

    const got = await sb.receive('orders', token);
    assert.equal(got.status, 200);
    assert.ok(got.body.equals(body), 'received bytes are the sent bytes');
    assert.equal(got.headers.get('content-type'), 'application/octet-stream');
    assert.equal(got.headers.get('priority'), 'High');
    assert.equal(got.headers.get('x-request-id'), 'req-42');
    const props = got.brokerProperties;
    for (const [k, v] of Object.entries(broker)) assert.deepEqual(props[k], v, k);
    assert.ok(props.SequenceNumber >= 1);
    assert.equal(props.DeliveryCount, 1);
    assert.match(props.EnqueuedTimeUtc, /^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$/);
    assert.ok(Math.abs(Date.parse(props.EnqueuedTimeUtc) - Date.now()) < 5_000);

    assert.equal((await sb.receive('orders', token)).status, 204, 'received and deleted');
    const stats = await sb.stats();
    assert.equal(stats.entities.orders.accepted, 1);
    assert.equal(stats.entities.orders.depth, 0);
  });

  test('a MessageId is generated when absent; sequence numbers increase', async () => {
    assert.equal((await send('orders', 'a')).status, 201);
    assert.equal((await send('orders', 'b')).status, 201);
    const [a, b] = await sb.messages('orders');
    assert.match(a.brokerProperties.MessageId, /^[0-9a-f]{32}$/);
    assert.notEqual(a.brokerProperties.MessageId, b.brokerProperties.MessageId);
    assert.ok(b.sequenceNumber > a.sequenceNumber);
  });

  test('batch of 3 is stored in order with its properties; header properties do not apply', async () => {
    const batch = [
      { Body: 'first', BrokerProperties: { MessageId: 'b1', Label: 'one' }, UserProperties: { tenant: 'acme', n: 1 } },
      { Body: 'second', BrokerProperties: { MessageId: 'b2' } },
      { Body: 'third' },
    ];
    const res = await send('orders', JSON.stringify(batch), { 'content-type': BATCH, Priority: 'High' });
    assert.equal(res.status, 201, res.text);
    const stored = await sb.messages('orders');
    assert.deepEqual(stored.map((m) => m.body.toString()), ['first', 'second', 'third']);
    assert.deepEqual(stored.map((m) => m.brokerProperties.MessageId).slice(0, 2), ['b1', 'b2']);
    assert.equal(stored[0].brokerProperties.Label, 'one');
    assert.deepEqual(stored[0].userProperties, { n: '1', tenant: 'acme' });
    assert.deepEqual(stored[1].userProperties, {});
    assert.ok(stored[0].sequenceNumber < stored[1].sequenceNumber && stored[1].sequenceNumber < stored[2].sequenceNumber);
    assert.equal((await sb.receive('orders', token)).body.toString(), 'first');
    assert.equal((await sb.stats()).entities.orders.accepted, 3);
  });

  test('a batch with one invalid element is refused whole', async () => {
    const batch = [{ Body: 'ok' }, { Body: 'bad', BrokerProperties: { SessionId: 'a', PartitionKey: 'b' } }];
    assertAzureError(await send('orders', JSON.stringify(batch), { 'content-type': BATCH }), 400, 'BadRequest');
    assertAzureError(await send('orders', '[{"Body": 5}]', { 'content-type': BATCH }), 400, 'BadRequest');
    assertAzureError(await send('orders', '{"Body": "x"}', { 'content-type': BATCH }), 400, 'BadRequest');
    assert.deepEqual(await sb.messages('orders'), []);
  });

  test('duplicate detection: same MessageId answered 201 but stored once; plain entity stores both', async () => {
    const headers = { BrokerProperties: JSON.stringify({ MessageId: 'dup-1' }) };
    assert.equal((await send('dedup', 'one', headers)).status, 201);
    assert.equal((await send('dedup', 'two', headers)).status, 201);
    assert.equal((await send('dedup', 'three', { BrokerProperties: JSON.stringify({ MessageId: 'dup-2' }) })).status, 201);
    assert.deepEqual((await sb.messages('dedup')).map((m) => m.body.toString()), ['one', 'three']);
    const { dedup } = (await sb.stats()).entities;
    assert.equal(dedup.accepted, 2);
    assert.equal(dedup.duplicates, 1);

    assert.equal((await send('orders', 'one', headers)).status, 201);
    assert.equal((await send('orders', 'two', headers)).status, 201);
    assert.equal((await sb.messages('orders')).length, 2);
  });

  test('receive waits up to timeout for a message, then 204', async () => {
    const t0 = Date.now();
    assert.equal((await sb.receive('orders', token, { timeout: 1 })).status, 204);
    assert.ok(Date.now() - t0 >= 900, 'waited about a second');
    setTimeout(() => send('orders', 'late'), 300);
    const got = await sb.receive('orders', token, { timeout: 5 });
    assert.equal(got.status, 200);
    assert.equal(got.body.toString(), 'late');
  });

  test('peek-lock: 201 with LockToken and Location; complete deletes; twice is 404', async () => {
    assert.equal((await send('orders', 'locked one')).status, 201);
    const got = await sb.receive('orders', token, { peekLock: true });
    assert.equal(got.status, 201);
    assert.equal(got.body.toString(), 'locked one');
    const { LockToken, SequenceNumber } = got.brokerProperties;
    assert.match(LockToken, /^[0-9a-f-]{36}$/);
    assert.equal(got.location, `/orders/messages/${SequenceNumber}/${LockToken}`);
    assert.equal((await sb.receive('orders', token, { peekLock: true })).status, 204, 'locked: not delivered again');
    assert.equal((await sb.stats()).entities.orders.depth, 1);
    assert.equal(await sb.complete(got.location, token), 200);
    assert.equal(await sb.complete(got.location, token), 404);
    assert.equal((await sb.stats()).entities.orders.depth, 0);
  });

  test('peek-lock: an expired lock makes the message deliverable again', async () => {
    assert.equal((await send('small', 'x')).status, 201);
    const first = await sb.receive('small', token, { peekLock: true });
    assert.equal(first.status, 201);
    const again = await sb.receive('small', token, { timeout: 4 }); // lock-duration=2
    assert.equal(again.status, 200);
    assert.equal(again.brokerProperties.DeliveryCount, 2);
    assert.equal(await sb.complete(first.location, token), 404, 'the old lock is gone');
  });
});

describe('tokens', () => {
  test('missing Authorization: 401 MissingToken; another scheme: 401 MalformedToken', async () => {
    assertAzureError(await send('orders', 'x', { authorization: '' }), 401, 'MalformedToken');
    const res = await fetch(`${sb.url}/orders/messages`, { method: 'POST', body: 'x' });
    assertAzureError({ status: res.status, headers: res.headers, text: await res.text() }, 401, 'MissingToken');
    assertAzureError(await send('orders', 'x', { authorization: token }), 401, 'MalformedToken');
    assertAzureError(await send('orders', 'x', { authorization: `SharedAccessSignature sr=x&sig=y&se=1&skn=k` }), 401, 'MalformedToken');
    assertAzureError(await send('orders', 'x', { authorization: 'Bearer not-a-jwt' }), 401, 'MalformedToken');
  });

  test('a storage token (wrong audience): 401 InvalidAudience', async () => {
    const res = await requestToken(stack.issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: stack.clientSecret, scope: `${STORAGE_AUDIENCE}/.default` });
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${res.body.access_token}` }), 401, 'InvalidAudience');
  });

  test('the namespace URL is an accepted audience, with or without trailing slash', async () => {
    for (const aud of [sb.url, `${sb.url}/`, `${SERVICEBUS_AUDIENCE}/`]) {
      const t = await tokenWith((p) => { p.aud = aud; });
      assert.equal((await send('orders', 'x', { authorization: `Bearer ${t}` })).status, 201, aud);
    }
  });

  test('expired and not-yet-valid tokens: 401, with no clock skew allowed', async () => {
    const now = Math.floor(Date.now() / 1000);
    const expired = await tokenWith((p) => { p.iat = now - 3600; p.nbf = now - 3600; p.exp = now - 1; });
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${expired}` }), 401, 'ExpiredToken');
    const early = await tokenWith((p) => { p.nbf = now + 60; p.exp = now + 3600; });
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${early}` }), 401, 'TokenNotYetValid');
    const noExp = await tokenWith((p) => { delete p.exp; });
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${noExp}` }), 401, 'MalformedToken');
  });

  test('issuer outside https://sts.windows.net/: 401 InvalidIssuer', async () => {
    const t = await tokenWith((p) => { p.iss = 'https://login.example.com/tenant/'; });
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${t}` }), 401, 'InvalidIssuer');
  });

  test('bad signatures: tampered payload, flipped signature, unknown key: 401 InvalidSignature', async () => {
    const [h, p, s] = token.split('.');
    const claims = JSON.parse(Buffer.from(p, 'base64url').toString());
    const tampered = `${h}.${Buffer.from(JSON.stringify({ ...claims, appid: 'someone-else' })).toString('base64url')}.${s}`;
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${tampered}` }), 401, 'InvalidSignature');
    const sig = Buffer.from(s, 'base64url');
    sig[5] ^= 1;
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${h}.${p}.${sig.toString('base64url')}` }), 401, 'InvalidSignature');

    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const header = JSON.parse(Buffer.from(h, 'base64url').toString());
    for (const kid of [header.kid, 'unknown-kid']) {
      const unsigned = `${Buffer.from(JSON.stringify({ ...header, kid })).toString('base64url')}.${p}`;
      const forged = `${unsigned}.${sign('sha256', Buffer.from(unsigned), privateKey).toString('base64url')}`;
      assertAzureError(await send('orders', 'x', { authorization: `Bearer ${forged}` }), 401, 'InvalidSignature');
    }
    const none = `${Buffer.from(JSON.stringify({ alg: 'none', typ: 'JWT' })).toString('base64url')}.${p}.`;
    assertAzureError(await send('orders', 'x', { authorization: `Bearer ${none}` }), 401, 'InvalidSignature');
  });

  test('the read side needs a token too; refusals are counted per entity', async () => {
    const res = await sb.receive('orders', 'x.y.z');
    assert.equal(res.status, 401);
    await sb.resetStats();
    await send('orders', 'x', { authorization: '' });
    await send('orders', 'x', { BrokerProperties: '{' });
    assert.deepEqual((await sb.stats()).entities.orders.rejected, { 400: 1, 401: 1 });
    assert.deepEqual(await sb.messages('orders'), []);
  });
});

describe('what a send may carry', () => {
  test('BrokerProperties: not JSON, not an object, wrong types, unknown fields: 400', async () => {
    for (const value of [
      'not json',
      '[]',
      '{"MessageId": 5}',
      '{"TimeToLive": "60"}',
      '{"ForcePersistence": "yes"}',
      '{"Lable": "typo"}',
      '{"SequenceNumber": 3}',
      '{"ScheduledEnqueueTimeUtc": "2030-01-01T00:00:00Z"}',
      `{"MessageId": "${'m'.repeat(129)}"}`,
    ]) {
      assertAzureError(await send('orders', 'x', { BrokerProperties: value }), 400, 'BadRequest');
    }
    assert.deepEqual(await sb.messages('orders'), []);
  });

  test('SessionId and PartitionKey must be equal when both are set', async () => {
    const res = await send('orders', 'x', { BrokerProperties: JSON.stringify({ SessionId: 'a', PartitionKey: 'b' }) });
    assertAzureError(res, 400, 'BadRequest');
    assert.match(res.text, /SessionId .*PartitionKey/);
    assert.equal((await send('orders', 'x', { BrokerProperties: JSON.stringify({ SessionId: 'a', PartitionKey: 'a' }) })).status, 201);
  });

  test('a scheduled message is stored but not delivered before its time', async () => {
    const later = new Date(Date.now() + 3_600_000).toUTCString();
    assert.equal((await send('orders', 'later', { BrokerProperties: JSON.stringify({ ScheduledEnqueueTimeUtc: later }) })).status, 201);
    assert.equal((await sb.messages('orders')).length, 1);
    assert.equal((await sb.receive('orders', token)).status, 204);
  });

  test('unknown entity: 410', async () => {
    assertAzureError(await send('no-such-queue', 'x'), 410, 'EntityNotFound');
    const receive = await sb.receive('no-such-queue', token);
    assertAzureError({ ...receive, text: receive.body.toString() }, 410, 'EntityNotFound');
    assert.equal((await sb.stats()).unknownEntity, 2);
  });

  test('over the entity size (body + properties): 413; one property over 32 KB: 400', async () => {
    assertAzureError(await send('orders', randomBytes(256 * 1024 + 1)), 413, 'MessageSizeExceeded');
    assert.equal((await send('orders', randomBytes(200 * 1024))).status, 201);
    assert.equal((await send('small', 'x'.repeat(1000))).status, 201);
    assertAzureError(await send('small', 'x'.repeat(1000), { 'x-padding': 'p'.repeat(100) }), 413, 'MessageSizeExceeded');
    assertAzureError(await send('orders', 'x', { 'x-big': 'p'.repeat(32 * 1024 + 1) }), 400, 'BadRequest');
    const batch = JSON.stringify([{ Body: 'y'.repeat(600) }, { Body: 'z'.repeat(600) }]);
    assertAzureError(await send('small', batch, { 'content-type': BATCH }), 413, 'MessageSizeExceeded');
  });
});

describe('control surface', () => {
  test('fault: 503 with Retry-After for the next send, then success', async () => {
    await sb.setFault({ status: 503, retryAfter: 2, count: 1, entity: 'orders' });
    assert.equal((await send('dedup', 'other entity')).status, 201, 'a fault for orders leaves dedup alone');
    const busy = await send('orders', 'x');
    assertAzureError(busy, 503, 'ServerBusy');
    assert.equal(busy.headers.get('retry-after'), '2');
    assert.equal((await send('orders', 'x')).status, 201);
    assert.equal((await sb.messages('orders')).length, 1);
    assert.equal((await sb.stats()).entities.orders.rejected['503'], 1);
  });

  test('fault: count, delay, clear, validation', async () => {
    await sb.setFault({ status: 429, count: 2 });
    assert.equal((await send('orders', 'x')).status, 429);
    assert.equal((await send('dedup', 'x')).status, 429);
    assert.equal((await send('orders', 'x')).status, 201);
    await sb.setFault({ delayMs: 300 });
    const t0 = Date.now();
    assert.equal((await send('orders', 'x')).status, 201);
    assert.ok(Date.now() - t0 >= 290, 'delayed');
    await sb.setFault({ status: 500, count: 5 });
    await sb.clearFaults();
    assert.equal((await send('orders', 'x')).status, 201);
    await assert.rejects(sb.setFault({ status: 99 }), /HTTP 400/);
    await assert.rejects(sb.setFault({ status: 503, colour: 'red' }), /HTTP 400/);
  });

  test('purge empties every entity; messages of an unknown entity is 404', async () => {
    await send('orders', 'x');
    await send('dedup', 'y', { BrokerProperties: '{"MessageId":"p1"}' });
    await sb.purge();
    assert.deepEqual(await sb.messages('orders'), []);
    assert.equal((await send('dedup', 'y', { BrokerProperties: '{"MessageId":"p1"}' })).status, 201);
    assert.equal((await sb.messages('dedup')).length, 1, 'purge also forgets remembered MessageIds');
    await assert.rejects(sb.messages('nope'), /HTTP 404/);
  });
});

test('a second stand-in starts from the built binary, takes a free port, and exits 0 on SIGTERM', async () => {
  const other = await startServiceBus({ port: 0, jwksUrl: stack.issuer.jwksUrl, entities: ['q'], build: false });
  assert.notEqual(other.port, PORTS.serviceBus);
  assert.equal((await fetch(`${other.url}/__control/stats`)).status, 200);
  await other.stop();
  assert.deepEqual(await other.exited, { code: 0, signal: null });
});

/**
 * The fault knobs the fault and load suite (bench/faults) relies on, in the stand-ins themselves:
 * a seeded share of requests failed (the same ones by position for the same seed), a full
 * outage for N seconds, and nothing failed ever stored or forwarded. No gateway: the issuer, the
 * Service Bus stand-in and the fault proxy are driven directly. Faults after storing (the
 * message kept, the answer lost) and the arrivals ledgers that count every arrival before
 * duplicate detection are checked here too: the fault suite's duplicate verdict rests on them.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { join } from 'node:path';
import { blobRequest, ensureCertificate } from '../../dev/azurite.mjs';
import { startFaultProxy } from '../../dev/faultproxy.mjs';
import { faultSwitch } from '../../dev/faults.mjs';
import { requestToken, startIssuer } from '../../dev/issuer.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';
import { startServiceBus } from '../../dev/servicebus.mjs';

// The fault suite's ports (bench/faults/run.mjs); the two never run at once.
const PORTS = { issuer: 19400, serviceBus: 19410, proxy: 20800, target: 20801 };
const TENANT = '11111111-2222-3333-4444-555555555555';
const SECRET = 'knob-secret';
const SB_AUDIENCE = 'https://servicebus.azure.net';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** A stand-in that cannot store (faultSwitch without `storable`) refuses a fault after storing. */
const issuerRefusesStored = () => faultSwitch().setFault({ status: 503, storedShare: 0.5 });

describe('fault knobs of the stand-ins', () => {
  let issuer;
  let sb;
  let proxy;
  let target;
  const received = [];
  const token = (scope = `${SB_AUDIENCE}/.default`) => requestToken(issuer.tokenUrlV2, { clientId: 'app', secret: SECRET, scope });
  const send = async (id, bearer) => {
    const res = await fetch(`${sb.url}/q/messages`, {
      method: 'POST',
      headers: { authorization: `Bearer ${bearer}`, brokerproperties: JSON.stringify({ MessageId: id }) },
      body: id,
      signal: AbortSignal.timeout(10_000),
    });
    await res.arrayBuffer();
    return res.status;
  };

  before(async () => {
    issuer = await startIssuer({ port: PORTS.issuer, tenant: TENANT, clients: { app: SECRET } });
    sb = await startServiceBus({ port: PORTS.serviceBus, jwksUrl: issuer.jwksUrl, entities: ['q:duplicate-detection=60'], stateDir: join(REPO_ROOT, 'target') });
    const dir = join(REPO_ROOT, 'target', 'e2e', 'fault-knobs');
    const { certPath, keyPath } = ensureCertificate(dir);
    target = createServer({ cert: readFileSync(certPath), key: readFileSync(keyPath) }, (req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        received.push(`${req.method} ${req.url} ${Buffer.concat(chunks)}`);
        res.writeHead(201, { 'content-type': 'text/plain' });
        res.end('stored');
      });
    });
    await new Promise((r) => target.listen(PORTS.target, '127.0.0.1', r));
    proxy = await startFaultProxy({ port: PORTS.proxy, target: `https://127.0.0.1:${PORTS.target}`, certPath, keyPath, ca: readFileSync(certPath) });
  });
  after(async () => {
    await proxy?.stop();
    await new Promise((r) => (target ? target.close(r) : r()));
    target?.closeAllConnections();
    await sb?.stop();
    await issuer?.stop();
  });

  test('issuer: a seeded share of token requests fails, the same ones for the same seed', async () => {
    const pattern = async (seed) => {
      issuer.setFault({ status: 503, probability: 0.2, seed });
      const out = [];
      for (let i = 0; i < 100; i += 1) out.push((await token()).status);
      issuer.clearFaults();
      return out;
    };
    const first = await pattern(5);
    const failed = first.filter((s) => s === 503).length;
    assert.ok(failed >= 8 && failed <= 35, `${failed} of 100 failed`);
    assert.ok(first.every((s) => s === 200 || s === 503));
    assert.deepEqual(await pattern(5), first, 'same seed, same requests failed');
    assert.notDeepEqual(await pattern(6), first);
    const set = await fetch(`${issuer.url}/__control/faults`, { method: 'POST', body: JSON.stringify({ status: 503, probability: 2 }) });
    assert.equal(set.status, 400);
  });

  test('issuer: an outage fails every token request for its seconds (503, or a reset), then ends', async () => {
    const before = issuer.stats().faultsInjected;
    const set = await fetch(`${issuer.url}/__control/outage`, { method: 'POST', body: JSON.stringify({ seconds: 1, retryAfter: 1 }) });
    assert.equal(set.status, 200);
    assert.equal((await set.json()).outage.status, 503);
    const down = await token();
    assert.equal(down.status, 503);
    assert.equal(down.body.error, 'temporarily_unavailable');
    assert.equal(down.headers.get('retry-after'), '1');
    assert.equal((await fetch(issuer.jwksUrl)).status, 200, 'the JWKS stays up');
    await sleep(1100);
    assert.equal((await token()).status, 200, 'over after its seconds');
    assert.equal(issuer.stats().faultsInjected, before + 1);

    issuer.setOutage({ seconds: 5, mode: 'reset' });
    await assert.rejects(token(), /fetch failed/);
    issuer.clearOutage();
    assert.equal((await token()).status, 200);
  });

  test('service bus stand-in: a seeded share of sends fails and none of them is stored', async () => {
    const bearer = (await token()).body.access_token;
    await sb.setFault({ status: 503, probability: 0.3, seed: 11 });
    const statuses = [];
    for (let i = 0; i < 60; i += 1) statuses.push(await send(`m${i}`, bearer));
    await sb.clearFaults();
    const failed = statuses.filter((s) => s === 503).length;
    assert.ok(failed >= 6 && failed <= 35, `${failed} of 60`);
    const stored = (await sb.messages('q')).map((m) => m.brokerProperties.MessageId);
    assert.deepEqual(stored, statuses.map((s, i) => (s === 201 ? `m${i}` : null)).filter(Boolean));
    // What failed left no MessageId behind: resent now, each is stored once.
    for (let i = 0; i < 60; i += 1) if (statuses[i] === 503) assert.equal(await send(`m${i}`, bearer), 201);
    assert.equal((await sb.messages('q')).length, 60);
    assert.equal((await sb.stats()).faultsInjected, failed);
  });

  test('service bus stand-in: an outage refuses every request for its seconds', async () => {
    const bearer = (await token()).body.access_token;
    await sb.purge();
    const { outage } = await sb.setOutage({ seconds: 1 });
    assert.equal(outage.status, 503);
    assert.equal(await send('o1', bearer), 503);
    assert.ok((await sb.outage()).outage.remainingSeconds > 0);
    await sleep(1100);
    assert.equal((await sb.outage()).outage, null);
    assert.equal(await send('o1', bearer), 201);
    assert.equal((await sb.messages('q')).length, 1);
  });

  test('fault proxy: failed writes are answered with Storage\'s 503 and never forwarded; reads pass', async () => {
    // Through node:https, trusting the proxy's (the target's) certificate.
    const ca = readFileSync(ensureCertificate(join(REPO_ROOT, 'target', 'e2e', 'fault-knobs')).certPath);
    const call = (method, path) => blobRequest(`${proxy.url}${path}`, { method, body: method === 'PUT' ? path : undefined, ca });
    proxy.setFault({ probability: 0.5, seed: 3 });
    const statuses = [];
    for (let i = 0; i < 40; i += 1) statuses.push((await call('PUT', `/c/b${i}`)).status);
    const failed = statuses.filter((s) => s === 503).length;
    assert.ok(failed >= 8 && failed <= 32, `${failed} of 40`);
    assert.deepEqual(received.filter((r) => r.startsWith('PUT')), statuses.map((s, i) => (s === 201 ? `PUT /c/b${i} /c/b${i}` : null)).filter(Boolean));
    const gets = await Promise.all([1, 2, 3].map(() => call('GET', '/c/b0')));
    assert.ok(gets.every((g) => g.status === 201), 'reads are not faulted');
    proxy.clearFault();

    proxy.setOutage({ seconds: 1 });
    const down = await call('GET', '/c/b0');
    assert.equal(down.status, 503);
    assert.equal(down.headers['x-ms-error-code'], 'ServerBusy');
    await sleep(1100);
    assert.equal((await call('PUT', '/c/after')).status, 201);
    assert.equal(proxy.stats().faultsInjected, failed);
    assert.equal(proxy.stats().outageRejected, 1);
  });

  test('service bus stand-in: a fault after storing keeps the message, loses the answer, and the ledger counts the resend', async () => {
    const bearer = (await token()).body.access_token;
    await sb.purge();
    await sb.setFault({ storedShare: 1 });
    assert.equal(await send('lost-1', bearer), 500, 'stored, then answered 500');
    assert.deepEqual((await sb.messages('q')).map((m) => m.brokerProperties.MessageId), ['lost-1'], 'kept');
    assert.equal(await send('lost-1', bearer), 201, 'the resend is answered');
    assert.equal(await send('lost-1', bearer), 201, 'a resend after a 201');
    assert.equal((await sb.messages('q')).length, 1, 'duplicate detection drops both resends');
    const ledger = await sb.arrivals('q');
    assert.deepEqual(ledger['lost-1'], { arrived: 3, refused: 0, stored: 1, duplicates: 2, answersLost: 1, acknowledged: 2, afterAck: 1 });
    const stats = await sb.stats();
    assert.equal(stats.faultsAfterStore, 1);
    assert.equal(stats.entities.q.arrivedAfterAck, 1);
  });

  test('fault proxy: a fault after storing forwards the write and loses its answer (500, or a reset); the ledger counts per blob', async () => {
    const ca = readFileSync(ensureCertificate(join(REPO_ROOT, 'target', 'e2e', 'fault-knobs')).certPath);
    const call = (method, path) => blobRequest(`${proxy.url}${path}`, { method, body: method === 'PUT' ? path : undefined, ca });
    proxy.resetStats();
    received.length = 0;
    proxy.setFault({ count: 1, storedShare: 1 });
    const lost = await call('PUT', '/c/s1');
    assert.equal(lost.status, 500);
    assert.equal(lost.headers['x-ms-error-code'], 'OperationTimedOut');
    assert.deepEqual(received, ['PUT /c/s1 /c/s1'], 'forwarded');
    assert.equal((await call('PUT', '/c/s1')).status, 201);
    proxy.setFault({ count: 1, storedShare: 1, storedMode: 'reset' });
    await assert.rejects(call('PUT', '/c/s2'), /socket hang up|ECONNRESET/);
    assert.equal(received.length, 3, 'the reset one was forwarded too');
    proxy.setFault({ count: 1 });
    assert.equal((await call('PUT', '/c/s3')).status, 503);
    assert.equal((await call('PUT', '/c/s3?comp=block&blockid=AAAA')).status, 201, 'a Put Block is no write of the blob');
    const ledger = proxy.arrivals();
    assert.deepEqual(ledger.get('/c/s1'), { arrived: 2, refused: 0, stored: 2, conflicts: 0, answersLost: 1, acknowledged: 1, afterAck: 0 });
    assert.deepEqual(ledger.get('/c/s2'), { arrived: 1, refused: 0, stored: 1, conflicts: 0, answersLost: 1, acknowledged: 0, afterAck: 0 });
    assert.deepEqual(ledger.get('/c/s3'), { arrived: 1, refused: 1, stored: 0, conflicts: 0, answersLost: 0, acknowledged: 0, afterAck: 0 });
    assert.equal(proxy.stats().faultsAfterStore, 2);
    assert.throws(() => issuerRefusesStored(), /cannot fail after storing/);
  });
});

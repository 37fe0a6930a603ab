/**
 * A request Azure may have carried out is never sent twice (issue 20, hole 1). The Resource
 * Manager stand-in restarts the site and then answers too late (past the route's 1 s limit) or
 * drops the connection; the Service Bus stand-in stores the message and then answers 500. A POST
 * (a restart, a message to an entity without duplicate detection) must reach Azure exactly once
 * and the caller be told the outcome is unknown (`backend-outcome-unknown`, 504 or 502, no
 * Retry-After); a read is sent again; a message to an entity the route declares with duplicate
 * detection is sent again with its MessageId, and the stand-in's ledger shows the copy dropped.
 * Counted at the stand-ins (every arrival, before duplicate detection), not from what they stored.
 * Policy: tests/e2e/fixtures/unknown-outcome-policy.json. Own ports: issuer 23400, Service Bus
 * stand-in 23410, ARM 23420, Azurite 23000/23001, gateway 23787.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { REPO_ROOT } from '../../dev/proc.mjs';
import { gatewayClient, startStack } from './stack.mjs';

const PORTS = { issuer: 23400, serviceBus: 23410, arm: 23420, azurite: 23000, queue: 23001, gateway: 23787 };
const SUB = '11111111-aaaa-4bbb-8ccc-000000000001';
const SITE = 'shop-api';
const SUBSCRIPTIONS = { [SUB]: { resourceGroups: { 'rg-web': { location: 'westeurope', sites: { [SITE]: {} } } } } };

describe('requests whose outcome is unknown', { timeout: 600_000 }, () => {
  let stack;
  let arm;
  let sb;
  const { call, logOf } = gatewayClient(() => stack, { timeoutMs: 30_000 });
  /** The restarts (or reads) the ARM stand-in received, answered or not, once late resends had time to come. */
  const armReceived = async (method, suffix) => {
    await sleep(3_000);
    return (await arm.requests()).filter((r) => r.method === method && r.path.endsWith(suffix));
  };

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'unknown-outcome-policy.json'),
      ports: PORTS,
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'unknown-outcome'),
      queue: false,
      serviceBus: { entities: ['plain', 'dedup:duplicate-detection=60'] },
      arm: { subscriptions: SUBSCRIPTIONS, pollsBeforeDone: 1 },
    });
    arm = stack.arm;
    sb = stack.serviceBus;
  });
  beforeEach(async () => {
    await arm.clearRequests();
    await arm.clearFaults();
    await sb.clearFaults();
    await sb.purge();
    await sb.resetStats();
  });
  after(async () => {
    await stack?.stop();
  });

  test('a restart that Azure carried out but answered too late is sent once, and the caller is told the outcome is unknown', async () => {
    // Every attempt would be slow: the gateway gives up on each after 1 s.
    await arm.setFault({ after: true, delayMs: 2_500, status: 500, match: '/restart', count: 3 });
    const res = await call('POST', `/sites/${SITE}/restart`);
    assert.equal(res.status, 504, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-outcome-unknown');
    assert.match(res.json.detail, /not send it again/);
    assert.equal(res.headers.get('retry-after'), null, 'no invitation to send it again');
    const restarts = await armReceived('POST', '/restart');
    assert.equal(restarts.length, 1, `restarts Azure received: ${restarts.length}`);
    assert.equal(restarts[0].carriedOut, 202, 'the one restart was carried out');
    const log = await logOf(res);
    assert.equal(log.problem, 'backend-outcome-unknown');
    assert.match(log.backend_detail, /^outcome unknown/);
  });

  test('a restart whose connection is dropped after it was carried out is sent once (502)', async () => {
    await arm.setFault({ after: true, reset: true, match: '/restart', count: 3 });
    const res = await call('POST', `/sites/${SITE}/restart`);
    assert.equal(res.status, 502, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-outcome-unknown');
    assert.equal((await armReceived('POST', '/restart')).length, 1);
  });

  test('a read that timed out is sent again', async () => {
    await arm.setFault({ delayMs: 2_500, status: 500, match: `/sites/${SITE}`, count: 1 });
    const res = await call('GET', `/sites/${SITE}`);
    assert.equal(res.status, 200, res.text);
    assert.equal((await armReceived('GET', `/sites/${SITE}`)).length, 2, 'the slow read and its retry');
  });

  test('a message stored but answered 500 is not sent again to an entity without duplicate detection', async () => {
    await sb.setFault({ storedShare: 1, entity: 'plain' });
    const res = await call('POST', '/plain', { body: 'once', headers: { 'idempotency-key': 'plain-1' } });
    assert.equal(res.status, 502, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-outcome-unknown');
    await sleep(1_000);
    const ledger = await sb.arrivals('plain');
    assert.deepEqual(ledger['plain-1'], { arrived: 1, refused: 0, stored: 1, duplicates: 0, answersLost: 1, acknowledged: 0, afterAck: 0 });
    assert.equal((await sb.messages('plain')).length, 1, 'one copy, stored by the one send');
  });

  test('a message stored but answered 500 is sent again, same MessageId, where the route declares duplicate detection', async () => {
    await sb.setFault({ storedShare: 1, entity: 'dedup' });
    const res = await call('POST', '/dedup', { body: 'twice, kept once', headers: { 'idempotency-key': 'dedup-1' } });
    assert.equal(res.status, 202, res.text);
    const ledger = await sb.arrivals('dedup');
    assert.deepEqual(ledger['dedup-1'], { arrived: 2, refused: 0, stored: 1, duplicates: 1, answersLost: 1, acknowledged: 1, afterAck: 0 });
    const stored = await sb.messages('dedup');
    assert.equal(stored.length, 1);
    assert.equal(stored[0].body.toString(), 'twice, kept once');
  });
});

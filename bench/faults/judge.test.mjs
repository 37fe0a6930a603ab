/**
 * The fault suite's verdict (bench/faults/judge.mjs) on made-up runs: it must fail a run that
 * loses, alters, stores twice or resends what the backend had taken, and one that met none of
 * the faults it claims; and pass a run whose resends each follow a refusal or a lost answer.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { countPhase, faultsNotMet } from './judge.mjs';

const keyOf = (i) => `run-sb-${String(i).padStart(6, '0')}`;
const bodyOf = (k) => `{"key":"${k}"}`;
const ledger = (over = {}) => ({ arrived: 1, refused: 0, stored: 1, duplicates: 0, answersLost: 0, acknowledged: 1, afterAck: 0, ...over });

/** n requests, all acknowledged and stored once with their own body; `change` edits the parts. */
function run(n, change = () => {}) {
  const records = Array.from({ length: n }, (_, i) => ({ i, status: 201, json: { status: 'accepted' } }));
  const stored = new Map(records.map((r) => [keyOf(r.i), { count: 1, body: Buffer.from(bodyOf(keyOf(r.i))) }]));
  const arrivals = new Map(records.map((r) => [keyOf(r.i), ledger()]));
  change({ records, stored, arrivals });
  return countPhase({ records, keyOf, bodyOf, stored, arrivals });
}
const codes = (r) => r.failures.map((f) => f.code);

test('a clean run passes, and counts what arrived', () => {
  const r = run(10);
  assert.deepEqual(codes(r), []);
  assert.equal(r.counts.received, 10);
  assert.equal(r.counts.acknowledged, 10);
});

test('an acknowledged message never stored is lost', () => {
  const r = run(10, ({ stored, arrivals }) => { stored.delete(keyOf(3)); arrivals.delete(keyOf(3)); });
  assert.deepEqual(codes(r), ['lost']);
  assert.equal(r.counts.lost, 1);
});

test('a stored body other than the one sent is altered', () => {
  const r = run(10, ({ stored }) => { stored.get(keyOf(4)).body = Buffer.from('{"key":"other"}'); });
  assert.deepEqual(codes(r), ['altered']);
});

test('a resend after a 201, dropped by duplicate detection, still fails the run', () => {
  const r = run(10, ({ arrivals }) => arrivals.set(keyOf(5), ledger({ arrived: 2, duplicates: 1, acknowledged: 2, afterAck: 1 })));
  assert.deepEqual(codes(r), ['resent']);
  assert.equal(r.counts.unexplainedResends, 1);
  assert.equal(r.counts.dedupDropped, 1);
});

test('a key stored twice (no duplicate detection) fails', () => {
  const r = run(10, ({ stored }) => { stored.get(keyOf(6)).count = 2; });
  assert.deepEqual(codes(r), ['stored-twice']);
});

test('a blob written twice (listed once, taken twice) is stored twice', () => {
  const r = run(10, ({ arrivals }) => arrivals.set(keyOf(8), ledger({ arrived: 2, stored: 2, answersLost: 1 })));
  assert.deepEqual(codes(r), ['stored-twice']);
});

test('resends after a refusal or a lost answer are expected, and counted apart', () => {
  const r = run(10, ({ arrivals }) => {
    arrivals.set(keyOf(1), ledger({ arrived: 2, refused: 1 }));
    arrivals.set(keyOf(2), ledger({ arrived: 2, duplicates: 1, answersLost: 1 }));
    arrivals.set(keyOf(3), ledger({ arrived: 3, refused: 1, duplicates: 1, answersLost: 1 }));
  });
  assert.deepEqual(codes(r), []);
  assert.equal(r.counts.resendsAfterRefusal, 2);
  assert.equal(r.counts.resendsAfterLostAnswer, 2);
  assert.equal(r.counts.received, 14);
});

test('one lost answer explains one resend, not two', () => {
  const r = run(10, ({ arrivals }) => arrivals.set(keyOf(2), ledger({ arrived: 3, duplicates: 2, answersLost: 1 })));
  assert.deepEqual(codes(r), ['resent']);
});

test('a refused request stored anyway is "stored but unacknowledged", not lost', () => {
  const r = run(10, ({ records }) => { records[7] = { i: 7, status: 503, json: null }; });
  assert.deepEqual(codes(r), []);
  assert.equal(r.counts.storedUnacknowledged, 1);
});

test('faults not met: a run that refused everything, or met no fault, fails', () => {
  const o = { idpFail: 0.2, backendFail: 0.1, storedShare: 0.3, outageSeconds: 3, storeAndForward: true };
  const met = { sent: 100, acknowledged: 90, queued: 5, backendFaults: 3, backendAfterStore: 1, backendOutageRejected: 4, issuerFaults: 2 };
  assert.deepEqual(faultsNotMet(o, met), []);
  const none = { sent: 100, acknowledged: 0, queued: 0, backendFaults: 0, backendAfterStore: 0, backendOutageRejected: 0, issuerFaults: 0 };
  assert.deepEqual(faultsNotMet(o, none).map((f) => f.code), ['too-few-acknowledged', 'backend-faults-not-met', 'lost-answers-not-met', 'backend-outage-not-met', 'nothing-queued', 'issuer-faults-not-met']);
  assert.deepEqual(faultsNotMet({ ...o, idpFail: 0, outageSeconds: 0 }, { ...met, issuerFaults: 0, queued: 0 }), [], 'only the faults configured are required');
});

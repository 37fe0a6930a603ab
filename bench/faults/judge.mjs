/**
 * The fault and load suite's verdict (bench/faults/run.mjs), as plain functions of what was sent,
 * what the callers were answered, and what the backend received and stored, so that the verdict
 * itself is tested (bench/faults/judge.test.mjs) against runs that lose, alter, double or test
 * nothing.
 *
 * What counts as a duplicate. The backend's arrivals ledger (the Service Bus stand-in's, the Blob
 * fault proxy's) records every arrival of a MessageId / blob before duplicate detection, and how
 * it was answered. A gateway may send a message again only when the backend's answer told it
 * the message was not taken (`refused`: an error before storing) or left the outcome unknown
 * (`answersLost`: stored, then a 500 or no answer). So, per key:
 *   explained resends = min(arrived - 1, refused + answersLost)
 *   unexplained       = arrived - 1 - explained   (a resend no failure accounts for)
 *   afterAck          = arrivals after the backend had answered 2xx for the key
 * Unexplained resends, arrivals after a 2xx, and keys stored more than once (held twice, or
 * taken twice: a blob overwritten) all fail the run, whatever duplicate detection then dropped.
 */

/** One failure of the verdict: a stable code (for scripts), and what it says. */
const reason = (code, text) => ({ code, text });

/**
 * Count one phase. Inputs:
 * - records: [{ i, status, json }] (status 0: no answer), one per request sent;
 * - keyOf(i): the key (MessageId / blob name) of request i; bodyOf(key): the body sent under it;
 * - stored: Map key → { count, body: Buffer | null } (what the backend holds; body null: not read);
 * - arrivals: Map key → { arrived, refused, stored, duplicates, answersLost, acknowledged, afterAck }.
 * Returns the counts and `failures` (reasons: lost, altered, stored twice, resent).
 */
export function countPhase({ records, keyOf, bodyOf, stored, arrivals }) {
  const c = {
    sent: records.length, acknowledged: 0, accepted: 0, queued: 0, refusedTotal: 0,
    stored: stored.size, storedTwice: 0, lost: 0, altered: 0, unread: 0, storedUnacknowledged: 0,
    received: 0, receivedKeys: 0, refusedBeforeStore: 0, answersLost: 0, dedupDropped: 0, conflicts: 0,
    resends: 0, resendsAfterRefusal: 0, resendsAfterLostAnswer: 0, unexplainedResends: 0, afterAck: 0,
  };
  const keys = { lost: [], altered: [], storedTwice: [], unexplained: [] };
  const note = (list, k) => { if (list.length < 20) list.push(k); };
  const sentKeys = new Set();
  for (const r of records) {
    const k = keyOf(r.i);
    sentKeys.add(k);
    const ok = r.status >= 200 && r.status < 300;
    const s = stored.get(k);
    if (!ok) {
      c.refusedTotal += 1;
      if (s) c.storedUnacknowledged += 1;
      continue;
    }
    c.acknowledged += 1;
    if (r.json?.status === 'queued') c.queued += 1;
    else c.accepted += 1;
    if (!s) {
      c.lost += 1;
      note(keys.lost, k);
    }
  }
  for (const k of sentKeys) {
    // Stored more than once: copies the backend holds (a queue without duplicate detection), or
    // writes it took (a blob overwritten: its name is listed once).
    const extra = Math.max((stored.get(k)?.count ?? 0) - 1, (arrivals.get(k)?.stored ?? 0) - 1);
    if (extra > 0) {
      c.storedTwice += extra;
      note(keys.storedTwice, k);
    }
  }
  for (const [k, s] of stored) {
    if (!sentKeys.has(k)) continue;
    if (s.body === null || s.body === undefined) {
      c.unread += 1;
    } else if (!Buffer.from(bodyOf(k)).equals(s.body)) {
      c.altered += 1;
      note(keys.altered, k);
    }
  }
  for (const [k, a] of arrivals) {
    if (!sentKeys.has(k)) continue;
    c.receivedKeys += 1;
    c.received += a.arrived;
    c.refusedBeforeStore += a.refused;
    c.answersLost += a.answersLost;
    c.dedupDropped += a.duplicates ?? 0;
    c.conflicts += a.conflicts ?? 0;
    c.afterAck += a.afterAck;
    const resends = Math.max(0, a.arrived - 1);
    const afterRefusal = Math.min(resends, a.refused);
    const afterLost = Math.min(resends - afterRefusal, a.answersLost);
    c.resends += resends;
    c.resendsAfterRefusal += afterRefusal;
    c.resendsAfterLostAnswer += afterLost;
    const unexplained = resends - afterRefusal - afterLost;
    if (unexplained > 0 || a.afterAck > 0) note(keys.unexplained, k);
    c.unexplainedResends += unexplained;
  }
  const failures = [];
  if (c.lost) failures.push(reason('lost', `${c.lost} acknowledged, never stored (${keys.lost.slice(0, 5).join(', ')})`));
  if (c.altered) failures.push(reason('altered', `${c.altered} stored with a body other than the one sent (${keys.altered.slice(0, 5).join(', ')})`));
  if (c.storedTwice) failures.push(reason('stored-twice', `${c.storedTwice} extra copies stored (${keys.storedTwice.slice(0, 5).join(', ')})`));
  if (c.unexplainedResends || c.afterAck) {
    failures.push(reason('resent', `${c.unexplainedResends} resends no refusal or lost answer explains, ${c.afterAck} arrivals after a 2xx for the same key (${keys.unexplained.slice(0, 5).join(', ')})`));
  }
  return { counts: c, keys, failures };
}

/**
 * Were the faults met? A run that refused everything, or never met the faults it claims to
 * inject, proves nothing. `o`: the run's options (idpFail, backendFail, storedShare,
 * outageSeconds, storeAndForward); `p`: the phase's counts plus backendFaults (injected before
 * storing), backendAfterStore, backendOutageRejected, issuerFaults (token requests failed by
 * faults and the outage). Returns reasons (empty when every configured fault was met).
 */
export function faultsNotMet(o, p) {
  const out = [];
  const need = (cond, code, text) => { if (!cond) out.push(reason(code, text)); };
  need(p.sent > 0 && p.acknowledged >= p.sent / 2, 'too-few-acknowledged', `${p.acknowledged} of ${p.sent} acknowledged: under half, so little was tested`);
  if (o.backendFail > 0) {
    need(p.backendFaults >= 1, 'backend-faults-not-met', 'no send met a backend fault');
    if (o.storedShare > 0) need(p.backendAfterStore >= 1, 'lost-answers-not-met', 'no send had its answer lost after storing');
  }
  if (o.outageSeconds > 0) {
    need(p.backendOutageRejected >= 1, 'backend-outage-not-met', 'no send met the backend outage');
    if (o.storeAndForward) need(p.queued >= 1, 'nothing-queued', 'nothing was queued, so store-and-forward was not tested');
  }
  if (o.idpFail > 0 || o.outageSeconds > 0) need(p.issuerFaults >= 1, 'issuer-faults-not-met', 'no token request met an issuer fault or outage');
  return out;
}

#!/usr/bin/env node
/**
 * The fault and load suite (issue 13, item 4): drive the gateway at load while the identity
 * provider and the backend fail a share of requests and each goes fully down once, then count
 * what the backend actually stored against what the gateway acknowledged.
 *
 * It starts its own stack (issuer, Azurite behind a fault proxy, the Service Bus stand-in with
 * duplicate detection, the gateway under wrangler dev with bench/faults/policy.json), and for each
 * backend (Service Bus, then Blob):
 *   1. sets the faults: the issuer fails `--idp-fail` of token requests with 503 and the backend
 *      `--backend-fail` of sends, both from seeded generators (dev/faults.mjs, the stand-in's
 *      splitmix64), so a rerun fails the same requests by position. Of the backend's failures,
 *      `--stored-share` come after storing: Azure kept the message and the answer is lost (the
 *      Service Bus stand-in answers 500; the Blob proxy drops the connection), the one case that
 *      can make a duplicate; the others are 503s before anything is stored;
 *   2. drives `--requests` requests at `--concurrency` in flight (fetch, each bounded by
 *      `--timeout-ms`; at most `--rate` per second when given), each with a unique
 *      Idempotency-Key (Service Bus: the MessageId) or blob name; when `--idp-outage-at` (15 %)
 *      of the requests have started the issuer goes fully down for `--outage-seconds`, and at
 *      `--backend-outage-at` (65 %) the backend does. Staggered, with room between: after the
 *      issuer's outage the gateway may wait out a 5 s back-off before it asks for a token
 *      again, and with no token it sends nothing, so a backend outage too close behind would
 *      meet no send (the verdict's `backend-outage-not-met`);
 *   3. clears every fault and outage, then waits for any store-and-forward backlog to drain: it
 *      polls what the backend holds until the count has not changed for `--settle-seconds`,
 *      at most `--max-drain-seconds`;
 *   4. counts, per backend: sent, acknowledged (2xx, split into `accepted` and `queued` by the
 *      answer's JSON `status`), refused (by status; `error:timeout`/`error:network` for no
 *      answer), stored (distinct MessageIds / blob names the backend holds, read from the
 *      backend, not from what it answered, each body compared with the one sent), what the
 *      backend *received* (its arrivals ledger, before duplicate detection: resends after a
 *      refusal, after a lost answer, and unexplained ones), lost (acknowledged, not stored),
 *      stored-but-unacknowledged, the drain time, and token requests per 1,000 requests;
 *   5. judges (bench/faults/judge.mjs): the run fails on any acknowledged message lost or
 *      altered, any key stored twice, any resend that no refusal or lost answer explains (or
 *      that follows a 2xx), and on faults not met (too few acknowledged; a configured fault, lost
 *      answer, outage or issuer fault that no request met; nothing queued), so it cannot pass
 *      with nothing tested.
 *
 * `--sabotage drop:N | double:N` runs it against a gateway built to drop or double its N-th
 * send (scripts/sabotage.mjs): the run then exits 0 only when the verdict failed for that reason
 * (lost / resent), showing the suite can fail.
 *
 * Prints a table, writes <out>/<label>.json and .md, and exits 1 when the verdict fails (2 when
 * the global deadline stopped it, 3 on a setup error). It stops everything it started, also on
 * Ctrl-C. See bench/faults/README.md.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { blobRequest } from '../../dev/azurite.mjs';
import { startFaultProxy } from '../../dev/faultproxy.mjs';
import { requestToken } from '../../dev/issuer.mjs';
import { REPO_ROOT, after } from '../../dev/proc.mjs';
import { CLIENT_ID, CONTAINER, STORAGE_AUDIENCE, startStack } from '../../dev/stack.mjs';
import { parseSabotage } from '../../scripts/sabotage.mjs';
import { countPhase, faultsNotMet } from './judge.mjs';

// Ports of this suite (bench/faults/policy.json names them): Azurite itself listens on 20801 and
// the fault proxy in front of it on 20800, where the policy's blob endpoint points.
const PORTS = { issuer: 19400, serviceBus: 19410, azurite: 20801, gateway: 19487 };
const PROXY_PORT = 20800;
const ENTITY = 'faults';
const BLOB_PREFIX = 'faults/';
const AZURITE_ACCOUNT = 'devstoreaccount1';

/** After the deadline: how long a stack start may take to finish before it is stopped, and the backstop. */
const STARTUP_GRACE_SECONDS = 40;
const BACKSTOP_SECONDS = 60;

// The CI form: 900 requests paced at 60/s (15 s of load per backend) with 5 s tokens, so the
// gateway refreshes its token during the issuer's 3 s outage and meets its faults, and has its
// token back (after the 5 s back-off that may follow) well before the backend's outage.
// The short form's stored share is 0.5, not the long form's 0.3: coalescing makes Service Bus
// sends few (about 130 for 900 requests, so about 13 failures), and at 0.3 a short run met one
// lost answer, or none (which fails the run as lost-answers-not-met: nothing proven).
const SHORT = { requests: 900, concurrency: 16, rate: 60, 'outage-seconds': 3, backend: 'both', 'stored-share': 0.5, 'token-lifetime': 5, 'breaker-cooldown': 5, 'settle-seconds': 2, 'max-drain-seconds': 45, 'deadline-seconds': 180 };
const OPTIONS = {
  requests: { type: 'string', default: '10000', env: 'FAULTS_REQUESTS', help: 'requests per backend' },
  concurrency: { type: 'string', default: '64', env: 'FAULTS_CONCURRENCY', help: 'requests in flight' },
  'idp-fail': { type: 'string', default: '0.2', env: 'FAULTS_IDP_FAIL', help: 'share of token requests the issuer fails with 503' },
  'backend-fail': { type: 'string', default: '0.1', env: 'FAULTS_BACKEND_FAIL', help: 'share of sends/writes the backend fails' },
  'stored-share': { type: 'string', default: '0.3', env: 'FAULTS_STORED_SHARE', help: 'share of the backend\'s failures that come after storing (the answer lost)' },
  rate: { type: 'string', default: '0', env: 'FAULTS_RATE', help: 'requests started per second at most (0: as fast as the concurrency allows)' },
  sabotage: { type: 'string', env: 'FAULTS_SABOTAGE', help: 'drop:N | double:N: run against a gateway built to drop or double its N-th send; exits 0 only when the verdict catches it' },
  'outage-seconds': { type: 'string', default: '10', env: 'FAULTS_OUTAGE_SECONDS', help: 'length of the one full outage of each (0: none)' },
  'idp-outage-at': { type: 'string', default: '0.15', env: 'FAULTS_IDP_OUTAGE_AT', help: 'share of the requests started when the issuer goes down' },
  'backend-outage-at': { type: 'string', default: '0.65', env: 'FAULTS_BACKEND_OUTAGE_AT', help: 'share of the requests started when the backend goes down' },
  backend: { type: 'string', default: 'both', env: 'FAULTS_BACKEND', help: 'sb | blob | both' },
  'timeout-ms': { type: 'string', default: '30000', env: 'FAULTS_TIMEOUT_MS', help: 'bound of each request' },
  'token-lifetime': { type: 'string', default: '30', env: 'FAULTS_TOKEN_LIFETIME', help: 'seconds; short, so the gateway refreshes during the run and meets the issuer\'s faults' },
  'settle-seconds': { type: 'string', default: '3', env: 'FAULTS_SETTLE_SECONDS', help: 'drained when the stored count is unchanged this long' },
  'max-drain-seconds': { type: 'string', default: '180', env: 'FAULTS_MAX_DRAIN_SECONDS', help: 'longest wait for the backlog' },
  'breaker-cooldown': { type: 'string', env: 'FAULTS_BREAKER_COOLDOWN', help: 'seconds; sets every route\'s breaker.cooldown_seconds (default: the policy\'s, i.e. the gateway\'s 30)' },
  'store-and-forward': { type: 'string', default: 'policy', env: 'FAULTS_STORE_AND_FORWARD', help: 'policy (as the policy says) | off (its when_unavailable and store_and_forward taken out)' },
  'deadline-seconds': { type: 'string', default: '1200', env: 'FAULTS_DEADLINE_SECONDS', help: 'the whole run, stack start included' },
  'body-bytes': { type: 'string', default: '256', env: 'FAULTS_BODY_BYTES', help: 'size of each body' },
  seed: { type: 'string', default: '1', env: 'FAULTS_SEED', help: 'seed of the injected faults' },
  out: { type: 'string', default: join(REPO_ROOT, 'bench', 'faults', 'results'), env: 'FAULTS_OUT', help: 'results directory' },
  label: { type: 'string', env: 'FAULTS_LABEL', help: 'results file name (default: short, long or custom)' },
  policy: { type: 'string', default: join(REPO_ROOT, 'bench', 'faults', 'policy.json'), env: 'FAULTS_POLICY', help: 'gateway policy' },
  short: { type: 'boolean', default: false, help: `the CI form: ${JSON.stringify(SHORT)} (flags given win)` },
  verbose: { type: 'boolean', default: false, help: 'echo the stack\'s log lines' },
  help: { type: 'boolean', default: false },
};

const startedAt = Date.now();
const log = (msg) => console.log(`[faults ${((Date.now() - startedAt) / 1000).toFixed(1).padStart(6)} s] ${msg}`);

function usage() {
  const lines = Object.entries(OPTIONS).map(([name, o]) => `  --${name}${o.type === 'string' ? ' V' : ''}  ${o.help ?? ''}${o.default !== undefined && o.type === 'string' ? ` (default ${o.default}${o.env ? `, env ${o.env}` : ''})` : ''}`);
  return `usage: node bench/faults/run.mjs [options]\n${lines.join('\n')}`;
}

function readOptions(argv) {
  const { values } = parseArgs({ args: argv, options: Object.fromEntries(Object.entries(OPTIONS).map(([k, o]) => [k, { type: o.type }])), strict: true });
  if (values.help) {
    console.log(usage());
    process.exit(0);
  }
  const given = (k) => values[k] !== undefined || (OPTIONS[k].env && process.env[OPTIONS[k].env] !== undefined);
  const pick = (k) => values[k] ?? (OPTIONS[k].env ? process.env[OPTIONS[k].env] : undefined) ?? (values.short && k in SHORT ? String(SHORT[k]) : OPTIONS[k].default);
  const num = (k, { min = 0, max = Infinity, int = false } = {}) => {
    const v = Number(pick(k));
    if (!Number.isFinite(v) || v < min || v > max || (int && !Number.isInteger(v))) throw new Error(`--${k}: ${pick(k)} is not ${int ? 'an integer' : 'a number'} in ${min}..${max}`);
    return v;
  };
  const backend = pick('backend');
  if (!['sb', 'blob', 'both'].includes(backend)) throw new Error(`--backend: ${backend} is not sb, blob or both`);
  const o = {
    requests: num('requests', { min: 1, int: true }),
    concurrency: num('concurrency', { min: 1, max: 1024, int: true }),
    idpFail: num('idp-fail', { max: 1 }),
    backendFail: num('backend-fail', { max: 1 }),
    storedShare: num('stored-share', { max: 1 }),
    rate: num('rate', { max: 100_000 }),
    sabotage: pick('sabotage') ? parseSabotage(pick('sabotage')) : null,
    outageSeconds: num('outage-seconds', { max: 3600 }),
    idpOutageAt: num('idp-outage-at', { max: 1 }),
    backendOutageAt: num('backend-outage-at', { max: 1 }),
    backends: backend === 'both' ? ['sb', 'blob'] : [backend],
    timeoutMs: num('timeout-ms', { min: 100 }),
    tokenLifetime: num('token-lifetime', { min: 5, int: true }),
    settleSeconds: num('settle-seconds', { min: 0.5 }),
    maxDrainSeconds: num('max-drain-seconds', { min: 1 }),
    deadlineSeconds: num('deadline-seconds', { min: 10 }),
    bodyBytes: num('body-bytes', { min: 16, max: 200_000, int: true }),
    seed: num('seed', { min: 0, max: 2 ** 31, int: true }),
    out: resolve(pick('out')),
    policy: resolve(pick('policy')),
    breakerCooldown: pick('breaker-cooldown') === undefined ? null : num('breaker-cooldown', { min: 1, max: 3600, int: true }),
    storeAndForward: pick('store-and-forward'),
    verbose: values.verbose,
  };
  if (!['policy', 'off'].includes(o.storeAndForward)) throw new Error(`--store-and-forward: ${o.storeAndForward} is not policy or off`);
  const isShort = values.short && !Object.keys(SHORT).some((k) => given(k));
  const isLong = !values.short && !['requests', 'concurrency', 'idp-fail', 'backend-fail', 'stored-share', 'rate', 'outage-seconds', 'idp-outage-at', 'backend-outage-at', 'backend'].some(given);
  o.label = pick('label') ?? (o.sabotage ? `sabotage-${o.sabotage.mode}` : isShort ? 'short' : isLong ? 'long' : 'custom');
  return o;
}

// ---------------------------------------------------------------------------------------------
// Load

/** Numbers of a sorted sample. */
function percentile(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

/**
 * Drive `n` requests at `concurrency` in flight; `send(i, signal)` performs request i and
 * resolves its record. `onStart(i)` runs as request i starts (the outage triggers).
 */
async function drive({ n, concurrency, rate, send, onStart, signal }) {
  const records = new Array(n);
  let next = 0;
  const start = Date.now();
  const worker = async () => {
    while (!signal.aborted) {
      const i = next++;
      if (i >= n) return;
      // Paced: request i starts no earlier than i / rate seconds into the load.
      if (rate > 0) {
        const wait = start + (i / rate) * 1000 - Date.now();
        if (wait > 0) await sleep(wait);
      }
      onStart(i);
      records[i] = await send(i, signal);
    }
  };
  await Promise.all(Array.from({ length: Math.min(concurrency, n) }, worker));
  return records.filter(Boolean);
}

/** One request to the gateway, bounded by timeoutMs and the run's signal; never throws. */
async function call(url, init, { timeoutMs, signal }) {
  const t0 = performance.now();
  try {
    const res = await fetch(url, { ...init, signal: AbortSignal.any([AbortSignal.timeout(timeoutMs), signal]) });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, json, ms: performance.now() - t0 };
  } catch (err) {
    const kind = signal.aborted ? 'aborted' : err.name === 'TimeoutError' ? 'timeout' : 'network';
    return { status: 0, error: kind, detail: err.cause?.code ?? err.message, ms: performance.now() - t0 };
  }
}

// ---------------------------------------------------------------------------------------------
// What each backend holds

/** Service Bus: MessageId → { count (times stored), body (the first copy's) } (our run's only). */
async function storedMessages(sb, prefix) {
  const stored = new Map();
  for (const m of await sb.messages(ENTITY)) {
    const id = m.brokerProperties?.MessageId;
    if (typeof id !== 'string' || !id.startsWith(prefix)) continue;
    const seen = stored.get(id);
    stored.set(id, { count: (seen?.count ?? 0) + 1, body: seen?.body ?? m.body });
  }
  return stored;
}

/** The arrivals ledger of our run's keys: Map key → { arrived, refused, stored, … }. */
async function arrivalsOf(kind, { sb, proxy, prefix }) {
  const out = new Map();
  if (kind === 'sb') {
    for (const [id, a] of Object.entries(await sb.arrivals(ENTITY))) if (id.startsWith(prefix)) out.set(id, a);
  } else {
    const head = `/${AZURITE_ACCOUNT}/${CONTAINER}/${BLOB_PREFIX}`;
    for (const [path, a] of proxy.arrivals()) {
      const name = decodeURIComponent(path.startsWith(head) ? path.slice(head.length) : '');
      if (name.startsWith(prefix)) out.set(name, a);
    }
  }
  return out;
}

/** Each stored blob's body, read from Azurite itself (not through the fault proxy), 16 at a time. */
async function readBlobBodies(stack, token, blobs) {
  const names = [...blobs.keys()];
  let next = 0;
  const reader = async () => {
    while (next < names.length) {
      const name = names[next++];
      const res = await blobRequest(`${stack.azurite.url}/${CONTAINER}/${BLOB_PREFIX}${encodeURIComponent(name)}`, { token, ca: stack.azurite.ca, timeoutMs: 30_000 });
      blobs.get(name).body = res.status === 200 ? res.body : null;
    }
  };
  await Promise.all(Array.from({ length: 16 }, reader));
  return blobs;
}

/** Blob: name (without the route's folder) → { count, etag } from Azurite's own listing. */
async function storedBlobs(stack, token, prefix) {
  const blobs = new Map();
  let marker = '';
  for (let page = 0; page < 1000; page += 1) {
    const url = `${stack.azurite.url}/${CONTAINER}?restype=container&comp=list&maxresults=5000&prefix=${encodeURIComponent(BLOB_PREFIX + prefix)}${marker ? `&marker=${encodeURIComponent(marker)}` : ''}`;
    const res = await blobRequest(url, { token, ca: stack.azurite.ca, timeoutMs: 30_000 });
    if (res.status !== 200) throw new Error(`list blobs: HTTP ${res.status} ${res.body.toString('utf8').slice(0, 200)}`);
    const xml = res.body.toString('utf8');
    for (const [, block] of xml.matchAll(/<Blob>([\s\S]*?)<\/Blob>/g)) {
      const name = /<Name>([\s\S]*?)<\/Name>/.exec(block)?.[1]?.slice(BLOB_PREFIX.length);
      const etag = /<Etag>([\s\S]*?)<\/Etag>/.exec(block)?.[1];
      const seen = blobs.get(name);
      blobs.set(name, { count: (seen?.count ?? 0) + 1, etag });
    }
    marker = /<NextMarker>([\s\S]*?)<\/NextMarker>/.exec(xml)?.[1] ?? '';
    if (!marker) break;
  }
  return blobs;
}

// ---------------------------------------------------------------------------------------------
// One backend's phase

/**
 * Group commit, from the gateway's log lines: requests whose message left in a batch of more than
 * one (`batch`, `batch_leader`), the batches (distinct leaders) and the largest. Counted for the
 * phase running; reset at its start.
 */
const coalesced = { requests: 0, leaders: new Set(), largest: 0 };
function noteBatch(line) {
  if (!line.includes('"batch":')) return;
  try {
    const j = JSON.parse(line.slice(line.indexOf('{')));
    if (!j.batch || !('status' in j)) return;
    coalesced.requests += 1;
    coalesced.leaders.add(j.batch_leader);
    coalesced.largest = Math.max(coalesced.largest, j.batch);
  } catch { /* not a log line */ }
}

async function runPhase(kind, ctx) {
  coalesced.requests = 0;
  coalesced.leaders.clear();
  coalesced.largest = 0;
  const { o, stack, proxy, runId, signal } = ctx;
  const sb = stack.serviceBus;
  const issuer = stack.issuer;
  const prefix = `${runId}-${kind}-`;
  const key = (i) => `${prefix}${String(i).padStart(6, '0')}`;
  const body = (i) => JSON.stringify({ key: key(i), pad: 'x'.repeat(Math.max(0, o.bodyBytes - 40)) }).slice(0, Math.max(o.bodyBytes, 40));
  const backend = kind === 'sb'
    ? { setFault: (f) => sb.setFault(f), clearFault: () => sb.clearFaults(), setOutage: (x) => sb.setOutage(x), clearOutage: () => sb.clearOutage(), stats: () => sb.stats() }
    : { setFault: async (f) => proxy.setFault(f), clearFault: async () => proxy.clearFault(), setOutage: async (x) => proxy.setOutage(x), clearOutage: async () => proxy.clearOutage(), stats: async () => proxy.stats() };
  const headers = { 'x-api-key': stack.apiKey, 'content-type': 'application/json' };
  const request = kind === 'sb'
    ? (i) => [`${stack.gateway.url}/sb/contoso`, { method: 'POST', headers: { ...headers, 'idempotency-key': key(i) }, body: body(i) }]
    : (i) => [`${stack.gateway.url}/blob/${key(i)}`, { method: 'PUT', headers, body: body(i) }];

  // The harness's own token requests (for listing blobs) are left out of the issuer's count.
  let ownTokenRequests = 0;
  const storageTokenNow = async () => {
    ownTokenRequests += 1;
    const res = await requestToken(issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: stack.clientSecret, scope: `${STORAGE_AUDIENCE}/.default` });
    if (res.status !== 200) throw new Error(`storage token for the listing: HTTP ${res.status}`);
    return res.body.access_token;
  };
  const readStored = kind === 'sb'
    ? async () => storedMessages(sb, prefix)
    : async () => storedBlobs(stack, await storageTokenNow(), prefix);
  const readArrivals = () => arrivalsOf(kind, { sb, proxy, prefix });
  const arrivedTotal = (arrivals) => [...arrivals.values()].reduce((n, a) => n + a.arrived, 0);

  issuer.resetStats();
  await sb.resetStats();
  proxy.resetStats();
  if (o.idpFail > 0) issuer.setFault({ status: 503, probability: o.idpFail, seed: o.seed });
  // The Service Bus stand-in answers a failure after storing with 500 (InternalServerError), the
  // Blob proxy drops the connection: both leave the gateway not knowing whether it was taken.
  const afterStore = o.storedShare > 0 ? (kind === 'sb' ? { storedShare: o.storedShare, storedStatus: 500 } : { storedShare: o.storedShare, storedMode: 'reset' }) : {};
  if (o.backendFail > 0) await backend.setFault({ status: 503, probability: o.backendFail, seed: o.seed + 1, ...afterStore });

  const outages = [];
  const trigger = (who, at) => ({ who, at, fired: false });
  const plan = o.outageSeconds > 0 ? [trigger('idp', Math.floor(o.requests * o.idpOutageAt)), trigger('backend', Math.floor(o.requests * o.backendOutageAt))] : [];
  const onStart = (i) => {
    for (const t of plan) {
      if (t.fired || i < t.at) continue;
      t.fired = true;
      const begin = Date.now();
      const set = t.who === 'idp' ? Promise.resolve(issuer.setOutage({ seconds: o.outageSeconds, status: 503 })) : backend.setOutage({ seconds: o.outageSeconds, status: 503 });
      set.then(() => log(`${kind}: ${t.who} down for ${o.outageSeconds} s (request ${i})`), (err) => log(`${kind}: ${t.who} outage not set: ${err.message}`));
      outages.push({ who: t.who, atRequest: i, startedMs: begin - loadStart, seconds: o.outageSeconds });
    }
  };

  log(`${kind}: ${o.requests} requests at ${o.concurrency} in flight; issuer fails ${o.idpFail * 100} %, backend ${o.backendFail * 100} %, outages ${o.outageSeconds} s`);
  const loadStart = Date.now();
  const records = await drive({
    n: o.requests,
    concurrency: o.concurrency,
    rate: o.rate,
    signal,
    onStart,
    send: async (i, sig) => ({ i, ...(await call(...request(i), { timeoutMs: o.timeoutMs, signal: sig })) }),
  });
  const loadSeconds = (Date.now() - loadStart) / 1000;
  const issuerAtLoadEnd = issuer.stats();
  const backendAtLoadEnd = await backend.stats();
  log(`${kind}: load done in ${loadSeconds.toFixed(1)} s (${(records.length / loadSeconds).toFixed(0)} req/s)`);

  // Healthy again: whatever was stored for later can now be delivered.
  issuer.clearFaults();
  issuer.clearOutage();
  await backend.clearFault();
  await backend.clearOutage();

  // Drained: every acknowledged request is stored and the count has not changed for
  // settle-seconds (late copies would show as duplicates); or max-drain-seconds have passed
  // (what is still missing then is lost). A consumer backing off (Retry-After, an open
  // breaker) pauses deliveries, so a quiet spell alone does not end the wait while
  // acknowledged requests are missing.
  const acknowledgedKeys = records.filter((r) => r.status >= 200 && r.status < 300).map((r) => key(r.i));
  const drainStart = Date.now();
  let stored = await readStored();
  let lastChange = drainStart;
  // Settled: neither what is stored nor what arrived (a late resend that duplicate detection
  // drops changes only the latter) has changed for settle-seconds.
  let lastCount = `${stored.size}/${arrivedTotal(await readArrivals())}`;
  let drainBounded = false;
  while (!signal.aborted) {
    const outstanding = acknowledgedKeys.filter((k) => !stored.has(k)).length;
    if (outstanding === 0 && Date.now() - lastChange >= o.settleSeconds * 1000) break;
    if (Date.now() - drainStart >= o.maxDrainSeconds * 1000) { drainBounded = outstanding > 0; break; }
    await sleep(500);
    stored = await readStored();
    const count = `${stored.size}/${arrivedTotal(await readArrivals())}`;
    if (count !== lastCount) {
      lastCount = count;
      lastChange = Date.now();
    }
  }
  const drainSeconds = (lastChange - drainStart) / 1000;
  const issuerAtEnd = issuer.stats();

  // Count and judge (bench/faults/judge.mjs).
  if (kind === 'blob') await readBlobBodies(stack, await storageTokenNow(), stored);
  const arrivals = await readArrivals();
  const bodies = new Map(records.map((r) => [key(r.i), body(r.i)]));
  const { counts, keys, failures } = countPhase({ records, keyOf: key, bodyOf: (k) => bodies.get(k), stored, arrivals });
  const byKey = new Map(records.map((r) => [key(r.i), r]));
  const refused = {};
  const refusedByType = {};
  for (const r of records) {
    if (r.status >= 200 && r.status < 300) continue;
    const label = r.status ? String(r.status) : `error:${r.error}`;
    refused[label] = (refused[label] ?? 0) + 1;
    const type = r.status ? `${r.status} ${String(r.json?.type ?? 'no problem type').replace('urn:azure-edge-gateway:problem:', '')}` : `error:${r.error} ${r.detail}`;
    refusedByType[type] = (refusedByType[type] ?? 0) + 1;
  }
  const strays = [...stored.keys()].filter((k) => !byKey.has(k)).length;
  const latencies = records.filter((r) => r.status).map((r) => r.ms).sort((a, b) => a - b);
  const ackLatencies = records.filter((r) => r.status >= 200 && r.status < 300).map((r) => r.ms).sort((a, b) => a - b);
  const gatewayTokenRequests = issuerAtEnd.tokenRequests - ownTokenRequests;
  const sbStats = kind === 'sb' ? (await sb.stats()).entities[ENTITY] : null;
  // What the faults met during the load: before storing, after storing, outage; the issuer's.
  // Each counted by the stand-in when applied (a lost answer only once the backend took it).
  const met = { backendFaults: backendAtLoadEnd.faultsBeforeStore, backendAfterStore: backendAtLoadEnd.faultsAfterStore, backendOutageRejected: backendAtLoadEnd.outageRejected };
  const issuerFaults = issuerAtLoadEnd.faultsInjected;
  const notMet = faultsNotMet({ ...o, storeAndForward: ctx.storeAndForward }, { ...counts, ...met, issuerFaults });

  return {
    backend: kind === 'sb' ? 'service bus' : 'blob',
    ...counts,
    unsent: o.requests - records.length,
    refused,
    refusedByType,
    keys,
    failures: [...failures, ...notMet],
    strays,
    drainSeconds,
    drainBounded,
    loadSeconds,
    requestsPerSecond: records.length / loadSeconds,
    latencyMs: { p50: percentile(latencies, 50), p95: percentile(latencies, 95), p99: percentile(latencies, 99), max: latencies.at(-1) ?? null },
    acknowledgedLatencyMs: { p50: percentile(ackLatencies, 50), p99: percentile(ackLatencies, 99) },
    tokenRequests: gatewayTokenRequests,
    tokenRequestsDuringLoad: issuerAtLoadEnd.tokenRequests,
    tokenRequestsPer1000: (gatewayTokenRequests / Math.max(1, records.length)) * 1000,
    coalesced: { requests: coalesced.requests, batches: coalesced.leaders.size, largest: coalesced.largest },
    issuer: { ...issuerAtEnd, tokenRequests: gatewayTokenRequests, ownTokenRequests },
    issuerFaults,
    ...met,
    backendStats: kind === 'sb' ? { ...backendAtLoadEnd, entities: undefined, entity: sbStats } : backendAtLoadEnd,
    outages,
  };
}

// ---------------------------------------------------------------------------------------------
// Report

const fmt = (x, d = 0) => (x == null ? '–' : Number(x).toLocaleString('en-US', { maximumFractionDigits: d, minimumFractionDigits: d }));
const refusedText = (r) => Object.entries(r.refused).sort(([a], [b]) => a.localeCompare(b)).map(([s, n]) => `${s}×${fmt(n)}`).join(', ') || '0';

function tableRows(phases) {
  const rows = [
    ['sent', (p) => fmt(p.sent)],
    ['acknowledged (2xx)', (p) => fmt(p.acknowledged)],
    ['of which accepted', (p) => fmt(p.accepted)],
    ['of which queued', (p) => fmt(p.queued)],
    ['refused (by status)', (p) => `${fmt(p.refusedTotal)}: ${refusedText(p)}`],
    ['stored (distinct), bodies compared', (p) => `${fmt(p.stored)}, ${fmt(p.stored - p.unread)}`],
    ['lost (acknowledged, not stored)', (p) => fmt(p.lost)],
    ['altered (stored body ≠ sent)', (p) => fmt(p.altered)],
    ['stored more than once', (p) => fmt(p.storedTwice)],
    ['stored but unacknowledged', (p) => fmt(p.storedUnacknowledged)],
    ['received by the backend (before dedup)', (p) => fmt(p.received)],
    ['resends after a refusal (503 before storing)', (p) => fmt(p.resendsAfterRefusal)],
    ['resends after a lost answer (stored, then 500 / reset)', (p) => fmt(p.resendsAfterLostAnswer)],
    ['resends unexplained / after a 2xx', (p) => `${fmt(p.unexplainedResends)} / ${fmt(p.afterAck)}`],
    ['dropped by duplicate detection; create refused (409)', (p) => `${fmt(p.dedupDropped)}; ${fmt(p.conflicts)}`],
    ['faults met: before storing / lost answers / outage', (p) => `${fmt(p.backendFaults)} / ${fmt(p.backendAfterStore)} / ${fmt(p.backendOutageRejected)}`],
    ['issuer faults met (token requests failed)', (p) => fmt(p.issuerFaults)],
    ['drained in (s)', (p) => `${fmt(p.drainSeconds, 1)}${p.drainBounded ? ' (not drained: bounded)' : ''}`],
    ['token requests per 1,000', (p) => fmt(p.tokenRequestsPer1000, 1)],
    ['coalesced: requests in batches / batches / largest', (p) => `${fmt(p.coalesced.requests)} / ${fmt(p.coalesced.batches)} / ${fmt(p.coalesced.largest)}`],
    ['load (s), req/s', (p) => `${fmt(p.loadSeconds, 1)}, ${fmt(p.requestsPerSecond)}`],
    ['latency p50 / p99 (ms)', (p) => `${fmt(p.latencyMs.p50)} / ${fmt(p.latencyMs.p99)}`],
  ];
  return rows.map(([name, f]) => [name, ...phases.map(f)]);
}

function printTable(phases) {
  const rows = [['', ...phases.map((p) => p.backend)], ...tableRows(phases)];
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => String(r[c]).length)));
  for (const r of rows) console.log(r.map((cell, c) => String(cell).padEnd(widths[c])).join('  '));
  for (const p of phases) console.log(`refusals, ${p.backend}: ${typesText(p) || 'none'}`);
}

const typesText = (p) => Object.entries(p.refusedByType).sort(([, a], [, b]) => b - a).map(([t, n]) => `${t} ×${fmt(n)}`).join('; ');

function markdown(result) {
  const { options: o, phases } = result;
  const head = `| | ${phases.map((p) => p.backend).join(' | ')} |\n|---|${phases.map(() => '--:').join('|')}|`;
  const body = tableRows(phases).map((r) => `| ${r.join(' | ')} |`).join('\n');
  return `# Fault and load suite: ${result.label} (${result.date})

${o.requests} requests per backend at ${o.concurrency} in flight${o.rate ? ` (at most ${o.rate}/s)` : ''}; the issuer fails ${o.idpFail * 100} % of token
requests and the backend ${o.backendFail * 100} % of sends (seed ${o.seed}), ${o.storedShare * 100} % of those after storing
the message (its answer lost: Service Bus 500, Blob a dropped connection), the rest with 503; one full outage of
${o.outageSeconds} s of each (issuer at ${o.idpOutageAt * 100} % of the requests, backend at ${o.backendOutageAt * 100} %); token lifetime ${o.tokenLifetime} s;
breaker cool-down ${o.breakerCooldown === null ? 'the policy\'s (default 30 s)' : `${o.breakerCooldown} s`}.
Gateway commit ${result.commit}; store-and-forward in the policy: ${result.storeAndForward ? 'yes' : 'no'}.
${o.sabotage ? `Sabotaged gateway: ${o.sabotage.mode} of its send ${o.sabotage.nth} (scripts/sabotage.mjs).\n` : ''}Verdict: **${result.verdict}** (${result.seconds.toFixed(0)} s in all).
${result.failures.length ? `\nWhy:\n${result.failures.map((f) => `- ${f}`).join('\n')}\n` : ''}

${head}
${body}

Refusals by status and problem type:
${phases.map((p) => `- ${p.backend}: ${typesText(p) || 'none'}`).join('\n')}
${result.notes.length ? `\n${result.notes.map((n) => `- ${n}`).join('\n')}\n` : ''}`;
}

// ---------------------------------------------------------------------------------------------
// Main

async function main() {
  let o;
  try {
    o = readOptions(process.argv.slice(2));
  } catch (err) {
    console.error(`${err.message}\n${usage()}`);
    process.exit(3);
  }
  const abort = new AbortController();
  let deadlineHit = false;
  const deadline = setTimeout(() => {
    deadlineHit = true;
    log(`global deadline of ${o.deadlineSeconds} s reached: stopping`);
    abort.abort();
  }, o.deadlineSeconds * 1000);
  // A backstop: if stopping itself hangs, leave anyway (dev/proc.mjs kills the stack's processes on exit).
  const backstop = setTimeout(() => {
    console.error(`faults: could not stop within ${BACKSTOP_SECONDS} s of the deadline; exiting`);
    process.exit(2);
  }, (o.deadlineSeconds + BACKSTOP_SECONDS) * 1000);
  backstop.unref();
  for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => { log(`${sig}: stopping`); abort.abort(); });

  // A sabotaged gateway is built into a state directory of its own.
  const stateDir = join(REPO_ROOT, 'target', o.sabotage ? 'faults-sabotage' : 'faults');
  mkdirSync(stateDir, { recursive: true });
  const policyPath = derivePolicy(o, stateDir);
  const policyText = readFileSync(policyPath, 'utf8');
  // Store-and-forward (issue 13, item 3): the policy's routes carry "when_unavailable": "queue" and
  // the top level "store_and_forward": {"binding": "DELIVERIES"}; the queue's producer and consumer
  // are declared in wrangler.toml (startGateway copies it). A 202 with {"status": "queued"} counts
  // as `queued`, and the drain wait covers the consumer's deliveries. A policy without them (pass
  // --policy) measures the gateway without store-and-forward: an outage is then a refusal.
  const storeAndForward = /"store_and_forward"/.test(policyText) && /"when_unavailable"\s*:\s*"queue"/.test(policyText);

  let starting;
  let stack;
  let proxy;
  const phases = [];
  const notes = [];
  let setupError = null;
  try {
    log(`starting the stack (gateway build included) with ${policyPath}`);
    // wrangler dev persists its simulated queue here: a backlog left by an earlier run must not
    // be delivered into this one.
    rmSync(join(stateDir, 'gateway', 'wrangler-state'), { recursive: true, force: true });
    const echo = o.verbose ? (line) => console.log(`  | ${line}`) : undefined;
    starting = startStack({
        policyPath,
        ports: PORTS,
        stateDir,
        queue: false,
        serviceBus: { entities: [`${ENTITY}:duplicate-detection=3600`] },
        issuerOptions: { lifetimeSeconds: o.tokenLifetime },
        gatewayOptions: o.sabotage ? { sabotage: `${o.sabotage.mode}:${o.sabotage.nth}` } : {},
        log: (m) => { if (o.verbose || !m.startsWith('issuer: ')) log(`  ${m}`); },
        onLog: {
          gateway: (line) => {
            noteBatch(line);
            if (echo) echo(line);
            else if (line.includes('aeg sabotage')) log(`  | ${line}`);
          },
          serviceBus: echo,
          azurite: echo,
        },
      });
    stack = await Promise.race([
      starting,
      new Promise((_, reject) => abort.signal.addEventListener('abort', () => reject(new Error('stopped before the stack was up')), { once: true })),
    ]);
    proxy = await startFaultProxy({ port: PROXY_PORT, target: new URL(stack.azurite.url).origin, certPath: stack.azurite.certPath, keyPath: stack.azurite.keyPath, ca: stack.azurite.ca, log });
    const runId = randomBytes(4).toString('hex');
    for (const kind of o.backends) {
      if (abort.signal.aborted) break;
      phases.push(await runPhase(kind, { o, stack, proxy, runId, storeAndForward, signal: abort.signal }));
    }
  } catch (err) {
    if (!abort.signal.aborted) {
      setupError = err;
      console.error(`faults: ${err.stack ?? err.message}`);
    } else {
      log(err.message);
    }
  } finally {
    clearTimeout(deadline);
    // Stopped while the stack was starting: let the start finish (bounded), then stop it.
    if (!stack && starting) {
      stack = await Promise.race([starting.catch(() => null), after(STARTUP_GRACE_SECONDS * 1000, null)]);
    }
    await proxy?.stop().catch(() => {});
    await stack?.stop().catch(() => {});
  }

  const failures = phases.flatMap((p) => p.failures.map((f) => `${p.backend}: ${f.code}: ${f.text}`));
  for (const p of phases) {
    if (p.unsent) notes.push(`${p.backend}: ${p.unsent} requests never sent (stopped by the deadline)`);
    if (p.strays) notes.push(`${p.backend}: ${p.strays} stored entries of this run that the harness never sent`);
    if (p.drainBounded) notes.push(`${p.backend}: acknowledged requests were still missing after ${o.maxDrainSeconds} s of drain (counted as lost)`);
    const upstream = p.backendStats?.upstreamErrors;
    if (upstream) notes.push(`${p.backend}: ${upstream} writes failed between the fault proxy and Azurite (connection closed by Azurite; a stand-in artifact, answered 502 to the gateway and counted as refused)`);
    if (!storeAndForward && p.queued) notes.push(`${p.backend}: ${p.queued} answers said queued although the policy asks for no store-and-forward`);
  }
  if (!storeAndForward) notes.push('The policy has no store-and-forward: an outage is a refusal (503), nothing is queued, so nothing drains.');
  if (storeAndForward && phases.length && phases.every((p) => !p.queued)) notes.push('Store-and-forward is in the policy but nothing was queued.');
  // A sabotaged run passes only when the verdict caught the sabotage, for the reason it causes.
  const expected = o.sabotage ? { drop: 'lost', double: 'resent' }[o.sabotage.mode] : null;
  const caught = expected !== null && phases.some((p) => p.failures.some((f) => f.code === expected));
  const judged = failures.length ? `FAIL (${[...new Set(phases.flatMap((p) => p.failures.map((f) => f.code)))].join(', ')})` : 'pass (nothing lost, altered or resent unexplained; every fault met)';
  const verdict = setupError ? 'error' : deadlineHit ? 'stopped by the deadline' : o.sabotage ? `${judged}; sabotage ${o.sabotage.mode}:${o.sabotage.nth} ${caught ? 'caught' : 'NOT caught'}` : judged;
  const result = {
    label: o.label,
    date: new Date().toISOString(),
    commit: gitCommit(),
    storeAndForward,
    options: { ...o, out: undefined },
    seconds: (Date.now() - startedAt) / 1000,
    verdict,
    failures,
    deadlineHit,
    error: setupError ? String(setupError.message).slice(0, 2000) : null,
    phases,
    notes,
  };

  if (phases.length) {
    console.log('');
    printTable(phases);
    console.log('');
  }
  for (const n of notes) console.log(`note: ${n}`);
  for (const f of failures) console.log(`failed: ${f}`);
  mkdirSync(o.out, { recursive: true });
  writeFileSync(join(o.out, `${o.label}.json`), `${JSON.stringify(result, null, 2)}\n`);
  writeFileSync(join(o.out, `${o.label}.md`), markdown(result));
  log(`${verdict}; results in ${join(o.out, `${o.label}.{json,md}`)}`);
  process.exitCode = setupError ? 3 : deadlineHit ? 2 : o.sabotage ? (caught ? 0 : 1) : failures.length ? 1 : 0;
}

/**
 * The policy to run: --policy as it is, or (with --breaker-cooldown, --store-and-forward off) a
 * copy with those changes in <stateDir>/policy.json (its $schema path dropped).
 */
function derivePolicy(o, stateDir) {
  if (o.breakerCooldown === null && o.storeAndForward === 'policy') return o.policy;
  const policy = JSON.parse(readFileSync(o.policy, 'utf8'));
  delete policy.$schema;
  for (const route of policy.routes ?? []) {
    if (o.breakerCooldown !== null) route.breaker = { ...route.breaker, cooldown_seconds: o.breakerCooldown };
    if (o.storeAndForward === 'off') delete route.when_unavailable;
  }
  if (o.storeAndForward === 'off') delete policy.store_and_forward;
  const path = join(stateDir, 'policy.json');
  writeFileSync(path, `${JSON.stringify(policy, null, 2)}\n`);
  return path;
}

/** The short commit of the checkout, for the report. */
function gitCommit() {
  try {
    const git = (...args) => execFileSync('git', ['-C', REPO_ROOT, ...args], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 5000 }).trim();
    const changed = git('status', '--porcelain', '--untracked-files=no', '--', 'src', 'crates', 'dev', 'scripts', 'bench/faults/run.mjs', 'bench/faults/policy.json', 'wrangler.toml', 'Cargo.toml');
    return `${git('rev-parse', '--short', 'HEAD')}${changed ? ' (with uncommitted changes)' : ''}`;
  } catch {
    return 'unknown';
  }
}

await main();

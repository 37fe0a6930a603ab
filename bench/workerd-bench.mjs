/**
 * The bare-workerd part of bench/run (BENCH_SCENARIOS key `workerd`): the gateway and the peer,
 * each on its own bare workerd (bench/workerd.mjs), measured the way Cloudflare runs them, without
 * wrangler dev's proxy and Node process.
 *
 * 1. Scenarios at each level of BENCH_WORKERD_CONCURRENCY (16 and 64), alternating gateway →
 *    peer in every round: a 404 (no I/O), a Service Bus send of 1 KB (also with the peer's
 *    `?hold`, and through azure_rest), a 1 KB blob write, an Event Hubs send of 1 KB; and
 *    sb-single, a send with one request in flight (gateway, gateway-solo: the route with
 *    `"coalesce": false`, peer `?hold`). Per way, scenario and level: CPU ms per request
 *    (workerd utime+stime over the round / requests), req/s, p50/p99 (medians of the rounds),
 *    errors, gateway/peer ratios; where the stand-in is called, Azure requests per caller request
 *    and bytes per Azure request (stand-in stats), the stand-in's CPU per request, and from the
 *    gateway's log lines of the round the share of requests that left in a batch and the batch
 *    sizes. Both workers write one JSON log line per request (checked: lines / requests).
 *    Then, with BENCH_WORKERD_LONG=N, N sends at 16 and at 64 in flight to the gateway's sb
 *    route: every answer 2xx and every 202 stored, or the run fails.
 * 2. Memory: 16 concurrent chunked uploads (no Content-Length) of 1 MiB, then of 50 MB, through the
 *    gateway's `PUT /blob-default/{kind}` route (bench/policy.json, default block size and limits,
 *    so the gateway cuts them into Put Block calls of the default block size, 1 MiB), workerd's RSS sampled every 20 ms: baseline,
 *    peak, peak − baseline against the isolate's 128 MB limit; every blob HEADed on Azurite for its
 *    size, then deleted.
 *
 * Knobs: BENCH_WORKERD_ROUNDS (default BENCH_ROUNDS when set, else 5), BENCH_WORKERD_SECONDS (2),
 * BENCH_WORKERD_CONCURRENCY (comma list, 16,64), BENCH_WORKERD_LONG (0: off),
 * BENCH_WORKERD_LONG_CONCURRENCY (16,64), BENCH_WORKERD_LONG_PATH (/sb/contoso),
 * BENCH_WORKERD_MEM_MB (50; 0 skips the memory part).
 * BENCH_WORKERD_ROUNDS=0 skips the scenarios (and their smoke requests): memory runs only.
 * BENCH_WORKERD_MEM_RUNS (small,chunked,length,peer), BENCH_WORKERD_MEM_N (16),
 * BENCH_WORKERD_MEM_PATH (/blob-default: the routes of the chunked runs, comma-separated),
 * BENCH_WORKERD_PIN (default on where `taskset` works and there are 2+ CPUs; 0: unpinned): each
 * workerd on the last CPU, oha, the stand-ins, Azurite and this process on the others.
 */
import { execFileSync } from 'node:child_process';
import { request as httpRequest } from 'node:http';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { REPO_ROOT } from '../dev/proc.mjs';
import { BLOB_API_VERSION, blobRequest } from '../dev/azurite.mjs';
import { CLIENT_ID, CONTAINER, storageToken } from '../dev/stack.mjs';
import { DEFAULT_ENTITIES } from '../dev/servicebus.mjs';
import { WORKERD_BIN, compatFromWranglerToml, cpuPinning, processCpuMs, rssSampler } from './workerd.mjs';

/** The event hub of the `eh` scenario, and the stand-in's entities on the bench stack (bench/run, compare.mjs, profile.mjs). */
export const BENCH_HUB = 'bench-hub';
export const BENCH_SB_ENTITIES = [...DEFAULT_ENTITIES, `${BENCH_HUB}:partitions=4`];
/** gateway and peer for the scenarios; memory: a fresh worker for each memory run, one at a time. */
export const WORKERD_PORTS = { gateway: 28800, peer: 28801, memory: 28802 };
const WAYS = ['gateway', 'peer'];
const MB = 1024 * 1024;
const ISOLATE_LIMIT_MB = 128;

const median = (xs) => { const s = [...xs].filter((x) => x != null && !Number.isNaN(x)).sort((a, b) => a - b); if (!s.length) return null; const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

const numberList = (text, name) => {
  const xs = String(text).split(',').map((x) => x.trim()).filter(Boolean).map(Number);
  if (!xs.length || xs.some((x) => !Number.isInteger(x) || x < 1)) throw new Error(`${name}: a comma list of positive integers, got ${JSON.stringify(text)}`);
  return xs;
};

export function workerdKnobs(env = process.env) {
  return {
    rounds: Number(env.BENCH_WORKERD_ROUNDS ?? env.BENCH_ROUNDS ?? 5),
    seconds: Number(env.BENCH_WORKERD_SECONDS ?? 2),
    // Every scenario at each of these levels (in flight), except sb-single (always 1).
    levels: numberList(env.BENCH_WORKERD_CONCURRENCY ?? '16,64', 'BENCH_WORKERD_CONCURRENCY'),
    // After the rounds: this many sends to the gateway's sb route at each long level (0: off).
    long: Number(env.BENCH_WORKERD_LONG ?? 0),
    longLevels: numberList(env.BENCH_WORKERD_LONG_CONCURRENCY ?? '16,64', 'BENCH_WORKERD_LONG_CONCURRENCY'),
    // The gateway route of the long run (a queue `orders` route of bench/policy.json: /sb/contoso, or /sb-solo/contoso).
    longPath: env.BENCH_WORKERD_LONG_PATH ?? '/sb/contoso',
    memMb: Number(env.BENCH_WORKERD_MEM_MB ?? 50),
    memN: Number(env.BENCH_WORKERD_MEM_N ?? 16),
    // Which memory runs (default all): small (16 × 1 MiB chunked), chunked (the 50 MiB in blocks),
    // length (the gateway's single Put Blob), peer. BENCH_WORKERD_MEM_PATH: the chunked runs' route.
    memRuns: (env.BENCH_WORKERD_MEM_RUNS ?? 'small,chunked,length,peer').split(',').map((x) => x.trim()),
    memPaths: (env.BENCH_WORKERD_MEM_PATH ?? '/blob-default').split(',').map((x) => x.trim()),
  };
}

/**
 * Run the whole part. stack: startStack's handle (issuer, Azurite, Service Bus stand-in);
 * gatewayBuildDir: the built gateway (index.js + index_bg.wasm); policyPath: the policy it was
 * built with (checked for rate limits, which need bindings this harness does not provide);
 * oha(args): the bench's oha runner;
 * body1k: path of the 1 KB JSON body; stateDir: where configs and logs go; log: progress lines.
 * Resolves { knobs, workerd, rounds: [...], summary: [...], logCheck, memory: [...], failures: [...] }.
 */
export async function runWorkerdBench({ stack, gatewayBuildDir, policyPath, oha, body1k, stateDir, log }) {
  const knobs = workerdKnobs();
  // This harness binds secrets only: a policy route with a rate limit would need a ratelimit
  // binding, which plain workerd has no built-in for (wrangler dev provides one).
  if (policyPath && /"rate_limit"\s*:/.test(readFileSync(policyPath, 'utf8'))) {
    throw new Error(`${policyPath} names a rate limit: bench/workerd.mjs provides no ratelimit bindings (use a bench policy without rate_limit)`);
  }
  const failures = [];
  // The workers on a CPU of their own, the rest on the others, for this part only.
  const pinning = cpuPinning();
  pinning.pinStack(stack);
  const { startWorkerd } = pinning;
  const started = [];
  try {
    const options = {
      gateway: benchWorker(stack, { way: 'gateway', entry: join(gatewayBuildDir, 'index.js'), port: WORKERD_PORTS.gateway, stateDir: join(stateDir, 'gateway') }),
      peer: benchWorker(stack, { way: 'peer', port: WORKERD_PORTS.peer, stateDir: join(stateDir, 'peer') }),
    };
    log(`bare workerd: starting the gateway (${WORKERD_PORTS.gateway}) and the peer (${WORKERD_PORTS.peer})`);
    const gateway = await startWorkerd(options.gateway);
    started.push(gateway);
    const peer = await startWorkerd(options.peer);
    started.push(peer);
    const workers = { gateway, peer };

    const all = benchScenarios(body1k);
    const workerOf = (way) => (way === 'peer' ? workers.peer : workers.gateway);
    const scenarios = Object.fromEntries(Object.entries(all).map(([name, s]) => [name, {
      ...s, ways: s.ways ?? WAYS, levels: s.levels ?? knobs.levels,
      args: (way) => s.args(workerOf(way).url, way === 'peer', way),
    }]));
    const standIn = stack.serviceBus;

    // Smoke (a broken path fails in seconds; it also fetches each worker's tokens), then one
    // second of load per way and scenario so that V8 has compiled the hot paths before round 1.
    for (const [name, s] of knobs.rounds > 0 ? Object.entries(scenarios) : []) {
      for (const way of s.ways) {
        const r = await oha(['-n', '1', '-c', '1', ...s.args(way)]);
        const codes = Object.keys(r.statusCodeDistribution ?? {});
        if (codes.length !== 1 || isError(s.expect, codes[0])) {
          throw new Error(`bare workerd smoke ${name}/${way}: ${JSON.stringify(r.statusCodeDistribution)} ${JSON.stringify(r.errorDistribution)}\n${workerOf(way).tail(10)}`);
        }
        await oha(['-z', '1s', '-c', String(Math.max(...s.levels)), '-w', '-t', '30s', ...s.args(way)]);
      }
    }
    if (standIn) await standIn.purge();
    log('bare workerd: smoke requests answered as expected; warmed up');

    const logFrom = { gateway: gateway.logSize(), peer: peer.logSize() };
    // Where each worker's log was read up to: each round's lines are the gateway's batch figures.
    const logAt = { ...logFrom };
    const rounds = [];
    for (const [name, s] of Object.entries(scenarios)) {
      for (const c of s.levels) {
        for (let rnd = 0; rnd < knobs.rounds; rnd++) {
          for (const way of s.ways) {
            const w = workerOf(way);
            const wkey = w === workers.peer ? 'peer' : 'gateway';
            const sb0 = s.standIn && standIn ? await standIn.stats() : null;
            const sbCpu0 = standIn ? processCpuMs(standIn.pid) : null;
            const cpu0 = w.cpuMs();
            const rssStart = w.rssKb();
            let rssPeak = rssStart;
            const timer = setInterval(() => { rssPeak = Math.max(rssPeak, w.rssKb()); }, 25);
            let r;
            try {
              r = await oha(['-z', `${knobs.seconds}s`, '-c', String(c), '-w', '-t', '30s', ...s.args(way)]);
            } finally {
              clearInterval(timer);
            }
            const cpuMs = w.cpuMs() - cpu0;
            const sbCpuMs = standIn ? processCpuMs(standIn.pid) - sbCpu0 : null;
            const sb1 = sb0 ? await standIn.stats() : null;
            const codes = r.statusCodeDistribution ?? {};
            const errs = r.errorDistribution ?? {};
            const requests = Object.values(codes).reduce((a, b) => a + b, 0);
            const errors = Object.entries(codes).filter(([k]) => isError(s.expect, k)).reduce((a, [, v]) => a + v, 0)
              + Object.values(errs).reduce((a, b) => a + b, 0);
            const m = {
              scenario: name, way, round: rnd, c, requests, seconds: r.summary.total,
              rps: r.summary.requestsPerSec, p50_ms: (r.latencyPercentiles?.p50 ?? NaN) * 1000, p99_ms: (r.latencyPercentiles?.p99 ?? NaN) * 1000,
              cpuMs, cpuMsPerReq: cpuMs / Math.max(requests, 1), status: codes, errorKinds: errs, errors,
              rssStartMb: rssStart / 1024, rssPeakMb: rssPeak / 1024,
              standInCpuMs: sbCpuMs, standInCpuMsPerReq: sbCpuMs == null ? null : sbCpuMs / Math.max(requests, 1),
            };
            if (sb1) {
              m.azureRequests = sb1.requests - sb0.requests;
              m.azurePerReq = m.azureRequests / Math.max(requests, 1);
              if (sb1.bytesReceived != null) {
                m.azureBytes = sb1.bytesReceived - sb0.bytesReceived;
                m.bytesPerAzureReq = m.azureBytes / Math.max(m.azureRequests, 1);
              }
              await standIn.purge(); // keep the stand-in's memory flat over the run (it stores every message)
            }
            // The gateway's log lines of this round: which requests left in a batch, and how large.
            await sleep(20);
            const read = w.logRead(logAt[wkey]);
            logAt[wkey] = read.next;
            m.logLines = read.lines.length;
            // Answers the worker logged as 2xx against those oha got: an exception workerd
            // answers with 500 after the worker logged its answer shows as a difference.
            m.logged2xx = read.lines.filter((l) => l.status >= 200 && l.status < 300).length;
            m.uncaught = read.uncaught;
            if (wkey === 'gateway') m.batches = batchFigures(read.lines);
            if (errors) {
              const got2xx = Object.entries(codes).filter(([k]) => k.startsWith('2')).reduce((a, [, v]) => a + v, 0);
              failures.push(`workerd/${name}/${way}/c${c}/round${rnd}: ${JSON.stringify(codes)} ${JSON.stringify(errs)}`
                + `${read.uncaught ? `; workerd logged ${read.uncaught} uncaught exceptions (first: ${read.firstUncaught}); the worker logged ${m.logged2xx} answers 2xx, oha got ${got2xx}` : ''}`);
            }
            rounds.push(m);
            const b = m.batches;
            log(`workerd ${name.padEnd(9)} c=${String(c).padEnd(3)} ${way.padEnd(12)} r${rnd} ${m.rps.toFixed(0).padStart(6)} req/s  p50 ${m.p50_ms.toFixed(1)} ms  p99 ${m.p99_ms.toFixed(1)} ms  cpu/req ${m.cpuMsPerReq.toFixed(3)} ms  errors ${errors}`
              + `${m.azurePerReq != null ? `  azure/req ${m.azurePerReq.toFixed(3)}` : ''}${b?.inBatch ? `  in batch ${((100 * b.inBatch) / b.lines).toFixed(0)} % (mean ${(b.inBatch / b.batches).toFixed(1)}, max ${b.max})` : ''}`
              + `${m.standInCpuMsPerReq != null ? `  stand-in cpu/req ${m.standInCpuMsPerReq.toFixed(3)} ms` : ''}`);
          }
        }
      }
    }

    // Both workers wrote one log line per request (read after the load, not during it).
    const logCheck = {};
    for (const way of WAYS) {
      const lines = workers[way].logLines(logFrom[way]);
      const requests = rounds.filter((m) => workerOf(m.way) === workers[way]).reduce((a, m) => a + m.requests, 0);
      logCheck[way] = { requests, lines: lines.length, bytesPerLine: lines.length ? Math.round(lines.reduce((a, l) => a + JSON.stringify(l).length + 1, 0) / lines.length) : null };
    }

    // The long run: N sends at each long level to the gateway's sb route; every answer 2xx, no
    // connection error, and the stand-in stored exactly as many messages as were answered 202.
    const long = [];
    if (knobs.long > 0) {
      if (!standIn) throw new Error('BENCH_WORKERD_LONG needs the Service Bus stand-in');
      for (const c of knobs.longLevels) {
        const args = scenarios.sb.args('gateway');
        args[args.length - 1] = `${gateway.url}${knobs.longPath}`;
        const m = await longRun({ oha, standIn, gateway, n: knobs.long, c, args, path: knobs.longPath, log });
        long.push(m);
        if (!m.ok) failures.push(`workerd/long/c${c}: ${m.problems.join('; ')}`);
      }
    }

    for (const w of started.splice(0)) await w.stop();

    // Memory: each run on a fresh workerd (wasm memory and V8's heap do not shrink back, and both
    // workers' RSS grows over the rounds above), so that its baseline is that of a started worker.
    const memory = [];
    if (knobs.memMb > 0) {
      const size = knobs.memMb * MB;
      const runs = [
        ...knobs.memPaths.map((path) => ({ name: 'small', way: 'gateway', path, chunked: true, sizeBytes: 1 * MB })),
        ...knobs.memPaths.map((path) => ({ name: 'chunked', way: 'gateway', path, chunked: true, sizeBytes: size })),
        { name: 'length', way: 'gateway', path: '/blob', chunked: false, sizeBytes: size },
        { name: 'peer', way: 'peer', path: '/blob', chunked: false, sizeBytes: size },
      ].filter((r) => knobs.memRuns.includes(r.name));
      for (const run of runs) {
        const worker = await startWorkerd({ ...options[run.way], port: WORKERD_PORTS.memory, stateDir: join(stateDir, `memory-${run.way}`) });
        started.push(worker);
        try {
          const m = await memoryRun({ stack, worker, n: knobs.memN, ...run, log });
          memory.push(m);
          if (!m.ok) failures.push(`workerd/memory/${m.way} ${m.label}: ${m.problems.join('; ')}`);
        } finally {
          await started.pop().stop();
        }
      }
    }

    const versionOut = { binary: 'node_modules/workerd/bin/workerd', version: execFileSync(WORKERD_BIN, ['--version']).toString().trim(), compat: compatFromWranglerToml(join(REPO_ROOT, 'wrangler.toml')) };
    return { knobs, workerd: versionOut, rounds, summary: summarize(rounds, scenarios), logCheck, long, memory, failures, ports: WORKERD_PORTS, cpus: pinning.cpus };
  } finally {
    for (const w of started.reverse()) await w.stop().catch(() => {});
    pinning.release();
  }
}

/** Whether oha's status `code` is an error in a scenario that expects `expect`. */
export const isError = (expect, code) => (expect === '404' ? code !== '404' : !code.startsWith('2'));

/**
 * The bare-workerd scenarios (also bench/compare.mjs's and bench/profile.mjs's): label, the
 * status expected, and oha's arguments for a worker at `url` (`peer`: the peer, whose routes
 * differ; `way`: the way's name, for a scenario with more than gateway and peer).
 * `body1k`: the path of the 1 KB JSON body. Optional: `standIn` (the requests reach the Service
 * Bus stand-in: Azure requests, bytes and its CPU are counted), `levels` (the concurrency levels,
 * instead of BENCH_WORKERD_CONCURRENCY's), `ways` (instead of gateway and peer; a way other than
 * `peer` runs on the gateway's workerd).
 */
export function benchScenarios(body1k) {
  const post = ['-m', 'POST', '-T', 'application/json', '-D', body1k];
  return {
    404: { label: '404 (no I/O)', expect: '404', args: (url) => [`${url}/nothing-here`] },
    sb: { label: 'Service Bus send 1 KB', expect: '2xx', standIn: true, args: (url) => [...post, `${url}/sb/contoso`] },
    // One request in flight, so every send finds its entity idle: what the coalescing path costs
    // when it has nothing to group. gateway-solo: the same queue through a route with
    // `"coalesce": false` (sb-solo); the peer in its `?hold` mode.
    'sb-single': {
      label: 'Service Bus send 1 KB, one in flight (peer: `?hold`; gateway-solo: route with `"coalesce": false`)', expect: '2xx', standIn: true,
      levels: [1], ways: ['gateway', 'gateway-solo', 'peer'],
      args: (url, peer, way) => [...post, `${url}/${way === 'gateway-solo' ? 'sb-solo' : 'sb'}/contoso${peer ? '?hold' : ''}`],
    },
    // The same send, the peer doing what the gateway must do to keep its guarantees (the body
    // read whole and size-checked so that a retry or a replay sends the same bytes, a 30 s
    // deadline per attempt, redirects not followed): what the guarantees cost, apart from what
    // the gateway costs.
    sbhold: { label: 'Service Bus send 1 KB (peer: `?hold`, body held, deadline, as the gateway)', expect: '2xx', standIn: true, args: (url, peer) => [...post, `${url}/sb/contoso${peer ? '?hold' : ''}`] },
    // The same send through the general azure_rest backend (the gateway's route rest-send, to
    // the same entity); the peer has no such route and does its Service Bus send.
    rest: { label: 'azure_rest send 1 KB (peer: its Service Bus send)', expect: '2xx', standIn: true, args: (url, peer) => [...post, `${url}/${peer ? 'sb' : 'rest'}/contoso`] },
    blob1k: { label: 'Blob write 1 KB', expect: '2xx', args: (url) => ['-m', 'PUT', '-T', 'application/json', '-D', body1k, `${url}/blob/small`] },
    // One event of 1 KB to the bench's event hub (4 partitions), no partition key in either
    // worker: the gateway's events without a key share one lane (one batch at a time), the
    // stand-in spreads them over the partitions.
    eh: { label: 'Event Hubs send 1 KB (no partition key)', expect: '2xx', standIn: true, args: (url) => [...post, `${url}/eh/dev-1`] },
  };
}

/**
 * startWorkerd's options for a worker of the bench against the stack started with
 * bench/policy.json: `way` 'gateway' (a build's `entry`, the client secret as DEV_CLIENT_SECRET)
 * or 'peer' (bench/peer/index.js, or `entry`, with its URLs as text bindings).
 */
export function benchWorker(stack, { way, entry, port, stateDir, name = `workerd-${way}`, v8Flags }) {
  const secretVar = 'AEG_BENCH_CLIENT_SECRET';
  const common = {
    ...compatFromWranglerToml(join(REPO_ROOT, 'wrangler.toml')), name, port, stateDir, v8Flags,
    env: { [secretVar]: stack.clientSecret }, caCertPaths: [stack.azurite.certPath],
  };
  if (way === 'gateway') return { ...common, entry, fromEnv: { DEV_CLIENT_SECRET: secretVar } };
  return {
    ...common, entry: entry ?? join(REPO_ROOT, 'bench', 'peer', 'index.js'), fromEnv: { CLIENT_SECRET: secretVar },
    text: {
      TOKEN_URL: stack.issuer.tokenUrlV2, CLIENT_ID, SB_URL: stack.serviceBus.url, SB_QUEUE: 'orders',
      BLOB_URL: stack.azurite.url, BLOB_CONTAINER: CONTAINER, EH_URL: stack.serviceBus.url, EH_HUB: BENCH_HUB,
    },
  };
}

/**
 * The gateway's log lines of one round: how many, how many left in a batch of more than one
 * (`batch` is on those only), the number of batches (distinct `batch_leader`s) and their
 * sizes, min and max.
 */
export function batchFigures(lines) {
  const sizes = new Map(); // leader -> batch size
  let inBatch = 0;
  for (const l of lines) {
    if (!(l.batch > 1)) continue;
    inBatch += 1;
    sizes.set(l.batch_leader ?? `?${inBatch}`, l.batch);
  }
  const all = [...sizes.values()];
  return { lines: lines.length, inBatch, batches: sizes.size, messagesInBatches: all.reduce((a, b) => a + b, 0), min: all.length ? Math.min(...all) : null, max: all.length ? Math.max(...all) : null };
}

function summarize(rounds, scenarios) {
  const out = [];
  for (const [name, s] of Object.entries(scenarios)) {
    for (const c of s.levels) {
      const row = { scenario: name, label: s.label, c, ways: {}, ratios: {} };
      for (const way of s.ways) {
        const rs = rounds.filter((m) => m.scenario === name && m.c === c && m.way === way);
        if (!rs.length) continue;
        const x = {
          rounds: rs.length, requests: rs.reduce((a, m) => a + m.requests, 0), errors: rs.reduce((a, m) => a + m.errors, 0),
          cpuMsPerReq: median(rs.map((m) => m.cpuMsPerReq)), cpuMsPerReqRange: [Math.min(...rs.map((m) => m.cpuMsPerReq)), Math.max(...rs.map((m) => m.cpuMsPerReq))],
          rps: median(rs.map((m) => m.rps)), p50_ms: median(rs.map((m) => m.p50_ms)), p99_ms: median(rs.map((m) => m.p99_ms)),
          rssPeakMb: Math.max(...rs.map((m) => m.rssPeakMb)),
          standInCpuMsPerReq: median(rs.map((m) => m.standInCpuMsPerReq)),
          azurePerReq: median(rs.map((m) => m.azurePerReq)),
          bytesPerAzureReq: median(rs.map((m) => m.bytesPerAzureReq)),
        };
        const bs = rs.map((m) => m.batches).filter(Boolean);
        if (bs.length) {
          const sum = (k) => bs.reduce((a, b) => a + b[k], 0);
          const mins = bs.map((b) => b.min).filter((v) => v != null);
          const maxs = bs.map((b) => b.max).filter((v) => v != null);
          x.batches = {
            lines: sum('lines'), inBatch: sum('inBatch'), batches: sum('batches'),
            share: sum('lines') ? sum('inBatch') / sum('lines') : null,
            mean: sum('batches') ? sum('messagesInBatches') / sum('batches') : null,
            min: mins.length ? Math.min(...mins) : null, max: maxs.length ? Math.max(...maxs) : null,
          };
        }
        row.ways[way] = x;
      }
      const p = row.ways.peer;
      for (const [way, g] of Object.entries(row.ways)) {
        if (way !== 'peer' && p) row.ratios[way] = { cpuMsPerReq: g.cpuMsPerReq / p.cpuMsPerReq, rps: g.rps / p.rps, p50: g.p50_ms / p.p50_ms };
      }
      if (row.ratios.gateway) row.gatewayVsPeer = row.ratios.gateway;
      // One in flight: what the coalescing path adds to an idle entity's send (on − off).
      if (row.ways.gateway && row.ways['gateway-solo']) {
        row.coalesceIdle = { p50DeltaMs: row.ways.gateway.p50_ms - row.ways['gateway-solo'].p50_ms, cpuDeltaMs: row.ways.gateway.cpuMsPerReq - row.ways['gateway-solo'].cpuMsPerReq };
      }
      out.push(row);
    }
  }
  return out;
}

/**
 * The long run: `n` requests at concurrency `c` (oha -n, a 30 s timeout per request) to the
 * gateway's Service Bus route, on a purged stand-in. ok when every answer is 2xx, there is no
 * connection error, all n were answered, and the queue stored exactly as many messages as were
 * answered 202. Also: duration, req/s, p50/p99/p99.9/max latency (the largest gap a caller saw),
 * Azure requests per caller request, the gateway's CPU per request.
 */
async function longRun({ oha, standIn, gateway, n, c, args, path, log, queue = 'orders' }) {
  await standIn.purge();
  const st0 = await standIn.stats();
  const cpu0 = gateway.cpuMs();
  const sbCpu0 = processCpuMs(standIn.pid);
  const logFrom = gateway.logSize();
  log(`workerd long run: ${n} sends at ${c} in flight to the gateway's ${path}`);
  const r = await oha(['-n', String(n), '-c', String(c), '-t', '30s', ...args]);
  const cpuMs = gateway.cpuMs() - cpu0;
  const sbCpuMs = processCpuMs(standIn.pid) - sbCpu0;
  const st1 = await standIn.stats();
  const codes = r.statusCodeDistribution ?? {};
  const errs = r.errorDistribution ?? {};
  const answered = Object.values(codes).reduce((a, b) => a + b, 0);
  const accepted = codes['202'] ?? 0;
  const stored = (st1.entities?.[queue]?.accepted ?? 0) - (st0.entities?.[queue]?.accepted ?? 0);
  const depth = st1.entities?.[queue]?.depth ?? null;
  const lp = r.latencyPercentiles ?? {};
  await sleep(200);
  const problems = [];
  const non2xx = Object.entries(codes).filter(([k]) => !k.startsWith('2'));
  if (non2xx.length) problems.push(`non-2xx answers ${JSON.stringify(Object.fromEntries(non2xx))}`);
  if (Object.keys(errs).length) problems.push(`connection errors ${JSON.stringify(errs)}`);
  if (answered !== n) problems.push(`${answered} of ${n} answered`);
  if (stored !== accepted) problems.push(`the stand-in stored ${stored} messages for ${accepted} answers 202`);
  const m = {
    n, c, path, answered, accepted, stored, depth, status: codes, errorKinds: errs,
    seconds: r.summary.total, rps: r.summary.requestsPerSec,
    p50_ms: (lp.p50 ?? NaN) * 1000, p99_ms: (lp.p99 ?? NaN) * 1000, p999_ms: (lp['p99.9'] ?? NaN) * 1000, max_ms: (r.summary.slowest ?? NaN) * 1000,
    azureRequests: st1.requests - st0.requests, azurePerReq: (st1.requests - st0.requests) / Math.max(answered, 1),
    cpuMsPerReq: cpuMs / Math.max(answered, 1), standInCpuMsPerReq: sbCpuMs / Math.max(answered, 1),
    ok: problems.length === 0, problems,
  };
  const read = gateway.logRead(logFrom);
  m.batches = batchFigures(read.lines);
  m.logged2xx = read.lines.filter((l) => l.status >= 200 && l.status < 300).length;
  m.uncaught = read.uncaught;
  if (read.uncaught) problems.push(`workerd logged ${read.uncaught} uncaught exceptions (first: ${read.firstUncaught}); the gateway logged ${m.logged2xx} answers 2xx, oha got ${Object.entries(codes).filter(([k]) => k.startsWith('2')).reduce((a, [, v]) => a + v, 0)}`);
  m.ok = problems.length === 0;
  await standIn.purge();
  log(`workerd long run c=${c}: ${answered}/${n} answered in ${m.seconds.toFixed(1)} s (${m.rps.toFixed(0)} req/s), 202: ${accepted}, stored ${stored}, p50 ${m.p50_ms.toFixed(1)} ms, p99.9 ${m.p999_ms.toFixed(1)} ms, max ${m.max_ms.toFixed(1)} ms, azure/req ${m.azurePerReq.toFixed(3)}${problems.length ? `; PROBLEMS: ${problems.join('; ')}` : ''}`);
  return m;
}

/**
 * n concurrent PUTs of sizeBytes each to `${path}/{kind}` on a fresh worker: chunked
 * (Transfer-Encoding: chunked, no Content-Length) or with Content-Length. workerd's RSS is sampled
 * every 20 ms by a separate process; then every blob is HEADed on Azurite (size) and DELETEd.
 * Bounded: 180 s for the uploads.
 */
async function memoryRun({ stack, worker, way, path, chunked, n, sizeBytes, log, timeoutMs = 180_000 }) {
  const label = `${n} x ${sizeBytes % MB === 0 ? `${sizeBytes / MB} MiB` : `${sizeBytes} B`} ${chunked ? 'chunked' : 'with Content-Length'}`;
  const kind = `mem-${way}-${chunked ? 'chunked' : 'length'}-${sizeBytes}-${Date.now().toString(36)}`;
  const url = `${worker.url}${path}/${kind}`;
  // One small write first (the token, the isolate's first request), then RSS over half a second of quiet.
  const first = await put(url, 1024, { chunked, signal: AbortSignal.timeout(30_000) });
  const quiet = [];
  for (let i = 0; i < 25; i++) { quiet.push(worker.rssKb()); await sleep(20); }
  const baselineKb = median(quiet);
  const sampler = rssSampler(worker.pid, { intervalMs: 20, maxMs: timeoutMs + 10_000 });
  await sleep(100); // the sampler's Node has started
  const t0 = performance.now();
  const deadline = AbortSignal.timeout(timeoutMs);
  let results;
  let sampled;
  try {
    results = await Promise.all(Array.from({ length: n }, () => put(url, sizeBytes, { chunked, signal: deadline })));
  } finally {
    sampled = await sampler.stop();
  }
  const seconds = (performance.now() - t0) / 1000;
  await sleep(500);
  const afterKb = worker.rssKb();
  const peakKb = Math.max(baselineKb, sampled.peakKb);

  // Every blob stored, with the right size: HEAD on Azurite, then DELETE (Azurite keeps them in memory).
  const problems = [];
  const token = await storageToken(stack.issuer, stack.clientSecret);
  let stored = 0;
  for (const r of [first, ...results]) {
    const expected = r === first ? 1024 : sizeBytes;
    if (r.error || r.status !== 201) { problems.push(r.error ?? `HTTP ${r.status} ${r.body.slice(0, 200)}`); continue; }
    let name;
    try { name = JSON.parse(r.body).blob; } catch { /* below */ }
    if (!name) { problems.push(`201 without a blob name: ${r.body.slice(0, 200)}`); continue; }
    const blobUrl = `${stack.azurite.url}/${CONTAINER}/${name.split('/').map(encodeURIComponent).join('/')}`;
    let head;
    try {
      head = await blobRequest(blobUrl, { method: 'HEAD', token, ca: stack.azurite.ca, timeoutMs: 30_000 });
    } catch (err) {
      problems.push(`${name}: HEAD failed: ${err.message}`);
      continue;
    }
    const size = Number(head.headers['content-length']);
    if (head.status !== 200 || size !== expected) problems.push(`${name}: HEAD ${head.status}, ${size} bytes (sent ${expected})`);
    else if (r !== first) stored += 1;
    await blobRequest(blobUrl, { method: 'DELETE', token, ca: stack.azurite.ca, timeoutMs: 30_000, headers: { 'x-ms-version': BLOB_API_VERSION } }).catch(() => {});
  }
  const m = {
    way, label, path, chunked, n, sizeBytes, seconds, mbPerS: (stored * sizeBytes) / MB / seconds,
    baselineMb: baselineKb / 1024, peakMb: peakKb / 1024, deltaMb: (peakKb - baselineKb) / 1024, afterMb: afterKb / 1024,
    isolateLimitMb: ISOLATE_LIMIT_MB, samples: sampled.samples, maxSampleGapMs: sampled.maxGapMs,
    // RSS over time, one sample per 250 ms: "ms:MB ms:MB …" (a string keeps latest.json short).
    rssSeries: sampled.series.filter((_, i) => i % 12 === 0).map(([t, kb]) => `${t}:${Math.round(kb / 1024)}`).join(' '), stored, statuses: results.map((r) => r.status ?? r.error),
    ok: problems.length === 0, problems,
  };
  log(`workerd memory ${way} ${path} ${label}: RSS ${m.baselineMb.toFixed(0)} → peak ${m.peakMb.toFixed(0)} MB (+${m.deltaMb.toFixed(0)} MB; 0.5 s after: ${m.afterMb.toFixed(0)} MB), ${stored}/${n} stored with the right size, ${seconds.toFixed(1)} s${problems.length ? `; PROBLEMS: ${problems.join('; ')}` : ''}`);
  return m;
}

/** One PUT of `size` bytes (64 KiB writes from a 1 MiB random pattern), chunked or with Content-Length; resolves { status, body } or { error }. */
function put(url, size, { chunked, signal }) {
  const pattern = randomBytes(MB);
  const headers = { 'content-type': 'application/octet-stream', ...(chunked ? {} : { 'content-length': String(size) }) };
  return new Promise((resolve) => {
    const req = httpRequest(url, { method: 'PUT', headers, signal }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode, body }));
      res.on('error', (e) => resolve({ error: e.message }));
    });
    req.on('error', (e) => resolve({ error: e.message }));
    let sent = 0;
    const CHUNK = 64 * 1024;
    const pump = () => {
      while (sent < size) {
        const n = Math.min(CHUNK, size - sent);
        const off = sent % MB;
        const chunk = off + n <= MB ? pattern.subarray(off, off + n) : Buffer.concat([pattern.subarray(off), pattern.subarray(0, n - (MB - off))]);
        sent += n;
        if (!req.write(chunk)) return void req.once('drain', pump);
      }
      req.end();
    };
    pump();
  });
}

// ---------------------------------------------------------------------------------------------

const f = (x, d = 1) => (x == null || Number.isNaN(x) ? '–' : x.toFixed(d));

/** The markdown section of latest.md. */
export function workerdMarkdown(w) {
  const k = w.knobs;
  const out = [];
  const levels = k.levels ?? [k.concurrency];
  out.push(`## Bare workerd: gateway vs peer (${k.rounds} alternating rounds of ${k.seconds} s at concurrency ${levels.join(' and ')}, medians)`, '');
  const pinned = w.cpus ? ` Each workerd pinned to CPU ${w.cpus.workers}, and oha, the stand-ins, Azurite and the runner to CPU ${w.cpus.others} (\`BENCH_WORKERD_PIN=0\`: unpinned).` : ' Unpinned: the workers share their cores with oha and the stand-ins.';
  out.push(`Each worker on its own \`workerd serve\` (${w.workerd.version}; no wrangler: no entry proxy, no Node process), compatibility date ${w.workerd.compat.compatibilityDate}; ports ${w.ports.gateway} (gateway) and ${w.ports.peer} (peer).${pinned} CPU ms/req: utime+stime of that workerd process over the round, divided by the requests it answered. Both workers print one JSON log line per request (lines / requests: gateway ${w.logCheck.gateway.lines} / ${w.logCheck.gateway.requests}, ${w.logCheck.gateway.bytesPerLine ?? '–'} bytes per line; peer ${w.logCheck.peer.lines} / ${w.logCheck.peer.requests}, ${w.logCheck.peer.bytesPerLine ?? '–'} bytes).`, '');
  out.push('| scenario | in flight | way | CPU ms/req (min–max) | req/s | p50 ms | p99 ms | requests | errors | gw/peer CPU/req | gw/peer req/s | Azure req. per request | in a batch | batch size mean (min–max) | bytes per Azure req. | stand-in CPU ms/req |');
  out.push('|---|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|');
  for (const row of w.summary) {
    for (const [way, x] of Object.entries(row.ways)) {
      const ratio = row.ratios?.[way] ?? (way === 'gateway' ? row.gatewayVsPeer : null);
      const b = x.azurePerReq != null ? x.batches : null; // batch figures where the stand-in is called
      out.push(`| ${row.label} | ${row.c ?? k.concurrency} | ${way} | ${f(x.cpuMsPerReq, 3)} (${f(x.cpuMsPerReqRange[0], 3)}–${f(x.cpuMsPerReqRange[1], 3)}) | ${f(x.rps, 0)} | ${f(x.p50_ms)} | ${f(x.p99_ms)} | ${x.requests} | ${x.errors} | ${ratio ? f(ratio.cpuMsPerReq, 2) : ''} | ${ratio ? f(ratio.rps, 2) : ''} | ${f(x.azurePerReq, 3)} | ${b ? `${f(100 * b.share, 0)} %` : ''} | ${b?.batches ? `${f(b.mean)} (${b.min}–${b.max})` : (b ? '–' : '')} | ${f(x.bytesPerAzureReq, 0)} | ${f(x.standInCpuMsPerReq, 3)} |`);
    }
  }
  out.push('', `Errors: any answer other than 404 in the 404 scenario, any non-2xx elsewhere, and connection errors. ${w.cpus ? 'oha, Azurite, the stand-in and the issuer share one core: in the scenarios that call them, req/s is bounded by that core, and a worker\'s CPU per request moves with how many requests each wake-up finds (the rounds\' min–max shows how much).' : 'Everything (oha, both workerd, Azurite, the stand-in, the issuer) shares the same cores: req/s moves with whatever else runs, CPU per request much less.'}`);
  out.push('', 'Azure req. per request: the Service Bus stand-in\'s `stats().requests` difference over the round (the sends it received) divided by the requests answered; below 1 when sends left in batches (the peer sends each request on its own: 1). In a batch: the share of the gateway\'s requests whose log line has `batch` (their message left in a batch of more than one); batch size: messages per batch (one per distinct `batch_leader`), mean over the batches of the rounds, min–max. Bytes per Azure req.: the stand-in\'s `stats().bytesReceived` difference (request bodies: a message, or a batch\'s JSON array) / its requests. Stand-in CPU: utime+stime of the stand-in process over the round / requests answered (it shares its core with oha: when that core is saturated, req/s is the stand-in\'s or oha\'s limit, not the worker\'s). The stand-in is purged after every round (it keeps every message in memory). – where it does not apply (404, blob: no stand-in).');
  const idle = w.summary.find((row) => row.coalesceIdle);
  if (idle) {
    const g = idle.ways.gateway; const solo = idle.ways['gateway-solo'];
    out.push('', `**Coalescing on an idle entity** (one request in flight, \`sb-single\`): gateway p50 ${f(g.p50_ms, 2)} ms with coalescing (route \`sb\`), ${f(solo.p50_ms, 2)} ms without (route \`sb-solo\`, \`"coalesce": false\`): **${idle.coalesceIdle.p50DeltaMs >= 0 ? '+' : ''}${f(idle.coalesceIdle.p50DeltaMs, 2)} ms** p50; CPU per request ${f(g.cpuMsPerReq, 3)} against ${f(solo.cpuMsPerReq, 3)} ms (${idle.coalesceIdle.cpuDeltaMs >= 0 ? '+' : ''}${f(idle.coalesceIdle.cpuDeltaMs * 1000, 0)} µs). oha's latencies at one in flight, medians of the rounds; the rounds' own spread is of the same order on this machine.`);
  }
  if (w.long?.length) {
    out.push('', `## Bare workerd: long run, ${w.long[0].n} sends to the gateway's \`POST ${w.long[0].path ?? '/sb/contoso'}\` at each level`, '');
    out.push('oha `-n N -c C -t 30s` on a purged stand-in; it fails the run unless every answer is 2xx, there is no connection error, all were answered and the queue stored exactly as many messages as were answered 202.', '');
    out.push('| in flight | answered / sent | 202 | stored | s | req/s | p50 ms | p99 ms | p99.9 ms | max ms | Azure req. per request | in a batch | batch size mean (max) | gateway CPU ms/req | stand-in CPU ms/req | ok |');
    out.push('|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|');
    for (const m of w.long) {
      const b = m.batches;
      out.push(`| ${m.c} | ${m.answered} / ${m.n} | ${m.accepted} | ${m.stored} | ${f(m.seconds)} | ${f(m.rps, 0)} | ${f(m.p50_ms)} | ${f(m.p99_ms)} | ${f(m.p999_ms)} | ${f(m.max_ms)} | ${f(m.azurePerReq, 3)} | ${b.lines ? `${f((100 * b.inBatch) / b.lines, 0)} %` : '–'} | ${b.batches ? `${f(b.messagesInBatches / b.batches)} (${b.max})` : '–'} | ${f(m.cpuMsPerReq, 3)} | ${f(m.standInCpuMsPerReq, 3)} | ${m.ok ? 'yes' : `**no**: ${m.problems.join('; ')}`} |`);
    }
  }
  if (w.memory?.length) {
    out.push('', `## Bare workerd: memory, ${w.memory[0].n} concurrent uploads, each run on a fresh workerd`, '');
    out.push('Chunked: no Content-Length, so the gateway cuts the body into Put Block calls of the default 1 MiB (route `PUT /blob-default/{kind}`, default limits) and commits them with Put Block List. With Content-Length: one streamed Put Blob (route `PUT /blob/{kind}`, `single_put_max_bytes` 64 MiB), for reference, in the gateway and in the peer.', '');
    out.push('| worker | uploads | RSS baseline MB | peak MB | peak − baseline MB | of the 128 MB isolate limit | RSS 0.5 s after MB | stored, right size | s | MB/s |');
    out.push('|---|---|--:|--:|--:|--:|--:|--:|--:|--:|');
    for (const m of w.memory) {
      out.push(`| ${m.way} | ${m.label} | ${f(m.baselineMb, 0)} | ${f(m.peakMb, 0)} | ${f(m.deltaMb, 0)} | ${f((100 * m.deltaMb) / m.isolateLimitMb, 0)} % | ${f(m.afterMb, 0)} | ${m.stored}/${m.n} | ${f(m.seconds)} | ${f(m.mbPerS)} |`);
    }
    out.push('', `RSS of the whole workerd process (runtime, isolate, wasm memory, socket and stream buffers), sampled every 20 ms by a separate process (largest gap between samples: ${w.memory.map((m) => `${f(m.maxSampleGapMs, 0)} ms`).join(', ')}); baseline: median over 0.5 s after one 1 KiB write to the fresh worker. Each blob was checked with HEAD on Azurite (size) and then deleted. Local workerd does not enforce the 128 MB isolate limit (which counts the isolate's heap and wasm memory, not workerd's own buffers); the column only says how large the growth is next to it.`);
  }
  return out.join('\n');
}

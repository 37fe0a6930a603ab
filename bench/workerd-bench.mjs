/**
 * The bare-workerd part of bench/run (BENCH_SCENARIOS key `workerd`): the gateway and the peer,
 * each on its own bare workerd (bench/workerd.mjs), measured the way Cloudflare runs them, without
 * wrangler dev's proxy and Node process.
 *
 * 1. Scenarios at concurrency 16, alternating gateway → peer in every round: a 404 (no I/O), a
 *    Service Bus send of 1 KB, a 1 KB blob write. Per way and scenario: CPU ms per request
 *    (workerd utime+stime over the round / requests), req/s, p50/p99 (medians of the rounds),
 *    errors, and gateway/peer ratios. Both workers write one JSON log line per request (checked
 *    afterwards from their log files: lines / requests).
 * 2. Memory: 16 concurrent chunked uploads (no Content-Length) of 1 MiB, then of 50 MB, through the
 *    gateway's `PUT /blob-default/{kind}` route (bench/policy.json, default block size and limits,
 *    so the gateway cuts them into Put Block calls of the default block size, 1 MiB), workerd's RSS sampled every 20 ms: baseline,
 *    peak, peak − baseline against the isolate's 128 MB limit; every blob HEADed on Azurite for its
 *    size, then deleted.
 *
 * Knobs: BENCH_WORKERD_ROUNDS (default BENCH_ROUNDS when set, else 5), BENCH_WORKERD_SECONDS (2),
 * BENCH_WORKERD_CONCURRENCY (16), BENCH_WORKERD_MEM_MB (50; 0 skips the memory part).
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
import { WORKERD_BIN, compatFromWranglerToml, cpuPinning, rssSampler } from './workerd.mjs';

/** gateway and peer for the scenarios; memory: a fresh worker for each memory run, one at a time. */
export const WORKERD_PORTS = { gateway: 28800, peer: 28801, memory: 28802 };
const WAYS = ['gateway', 'peer'];
const MB = 1024 * 1024;
const ISOLATE_LIMIT_MB = 128;

const median = (xs) => { const s = [...xs].filter((x) => x != null && !Number.isNaN(x)).sort((a, b) => a - b); if (!s.length) return null; const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

export function workerdKnobs(env = process.env) {
  return {
    rounds: Number(env.BENCH_WORKERD_ROUNDS ?? env.BENCH_ROUNDS ?? 5),
    seconds: Number(env.BENCH_WORKERD_SECONDS ?? 2),
    concurrency: Number(env.BENCH_WORKERD_CONCURRENCY ?? 16),
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
    const scenarios = Object.fromEntries(Object.entries(all).map(([name, s]) => [name, { ...s, args: (w) => s.args(w.url, w === workers.peer) }]));

    // Smoke (a broken path fails in seconds; it also fetches each worker's tokens), then one
    // second of load per way and scenario so that V8 has compiled the hot paths before round 1.
    for (const [name, s] of knobs.rounds > 0 ? Object.entries(scenarios) : []) {
      for (const way of WAYS) {
        const r = await oha(['-n', '1', '-c', '1', ...s.args(workers[way])]);
        const codes = Object.keys(r.statusCodeDistribution ?? {});
        if (codes.length !== 1 || isError(s.expect, codes[0])) {
          throw new Error(`bare workerd smoke ${name}/${way}: ${JSON.stringify(r.statusCodeDistribution)} ${JSON.stringify(r.errorDistribution)}\n${workers[way].tail(10)}`);
        }
        await oha(['-z', '1s', '-c', String(knobs.concurrency), '-w', '-t', '30s', ...s.args(workers[way])]);
      }
    }
    log('bare workerd: smoke requests answered as expected; warmed up');

    const logFrom = { gateway: gateway.logSize(), peer: peer.logSize() };
    const rounds = [];
    for (const [name, s] of Object.entries(scenarios)) {
      for (let rnd = 0; rnd < knobs.rounds; rnd++) {
        for (const way of WAYS) {
          const w = workers[way];
          const cpu0 = w.cpuMs();
          const rssStart = w.rssKb();
          let rssPeak = rssStart;
          const timer = setInterval(() => { rssPeak = Math.max(rssPeak, w.rssKb()); }, 25);
          let r;
          try {
            r = await oha(['-z', `${knobs.seconds}s`, '-c', String(knobs.concurrency), '-w', '-t', '30s', ...s.args(w)]);
          } finally {
            clearInterval(timer);
          }
          const cpuMs = w.cpuMs() - cpu0;
          const codes = r.statusCodeDistribution ?? {};
          const errs = r.errorDistribution ?? {};
          const requests = Object.values(codes).reduce((a, b) => a + b, 0);
          const errors = Object.entries(codes).filter(([k]) => isError(s.expect, k)).reduce((a, [, v]) => a + v, 0)
            + Object.values(errs).reduce((a, b) => a + b, 0);
          const m = {
            scenario: name, way, round: rnd, c: knobs.concurrency, requests, seconds: r.summary.total,
            rps: r.summary.requestsPerSec, p50_ms: (r.latencyPercentiles?.p50 ?? NaN) * 1000, p99_ms: (r.latencyPercentiles?.p99 ?? NaN) * 1000,
            cpuMs, cpuMsPerReq: cpuMs / Math.max(requests, 1), status: codes, errorKinds: errs, errors,
            rssStartMb: rssStart / 1024, rssPeakMb: rssPeak / 1024,
          };
          if (errors) failures.push(`workerd/${name}/${way}/round${rnd}: ${JSON.stringify(codes)} ${JSON.stringify(errs)}`);
          rounds.push(m);
          log(`workerd ${name.padEnd(6)} ${way.padEnd(7)} r${rnd} ${m.rps.toFixed(0).padStart(6)} req/s  p50 ${m.p50_ms.toFixed(1)} ms  p99 ${m.p99_ms.toFixed(1)} ms  cpu/req ${m.cpuMsPerReq.toFixed(3)} ms  errors ${errors}`);
        }
      }
    }

    // Both workers wrote one log line per request (read after the load, not during it).
    const logCheck = {};
    for (const way of WAYS) {
      const lines = workers[way].logLines(logFrom[way]);
      const requests = rounds.filter((m) => m.way === way).reduce((a, m) => a + m.requests, 0);
      logCheck[way] = { requests, lines: lines.length, bytesPerLine: lines.length ? Math.round(lines.reduce((a, l) => a + JSON.stringify(l).length + 1, 0) / lines.length) : null };
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
    return { knobs, workerd: versionOut, rounds, summary: summarize(rounds, scenarios), logCheck, memory, failures, ports: WORKERD_PORTS, cpus: pinning.cpus };
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
 * differ). `body1k`: the path of the 1 KB JSON body.
 */
export function benchScenarios(body1k) {
  const post = ['-m', 'POST', '-T', 'application/json', '-D', body1k];
  return {
    404: { label: '404 (no I/O)', expect: '404', args: (url) => [`${url}/nothing-here`] },
    sb: { label: 'Service Bus send 1 KB', expect: '2xx', args: (url) => [...post, `${url}/sb/contoso`] },
    // The same send, the peer doing what the gateway must do to keep its guarantees (the body
    // read whole and size-checked so that a retry or a replay sends the same bytes, a 30 s
    // deadline per attempt, redirects not followed): what the guarantees cost, apart from what
    // the gateway costs.
    sbhold: { label: 'Service Bus send 1 KB (peer: `?hold`, body held, deadline, as the gateway)', expect: '2xx', args: (url, peer) => [...post, `${url}/sb/contoso${peer ? '?hold' : ''}`] },
    // The same send through the general azure_rest backend (the gateway's route rest-send, to
    // the same entity); the peer has no such route and does its Service Bus send.
    rest: { label: 'azure_rest send 1 KB (peer: its Service Bus send)', expect: '2xx', args: (url, peer) => [...post, `${url}/${peer ? 'sb' : 'rest'}/contoso`] },
    blob1k: { label: 'Blob write 1 KB', expect: '2xx', args: (url) => ['-m', 'PUT', '-T', 'application/json', '-D', body1k, `${url}/blob/small`] },
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
      BLOB_URL: stack.azurite.url, BLOB_CONTAINER: CONTAINER,
    },
  };
}

function summarize(rounds, scenarios) {
  return Object.entries(scenarios).map(([name, s]) => {
    const row = { scenario: name, label: s.label, ways: {} };
    for (const way of WAYS) {
      const rs = rounds.filter((m) => m.scenario === name && m.way === way);
      if (!rs.length) continue;
      row.ways[way] = {
        rounds: rs.length, requests: rs.reduce((a, m) => a + m.requests, 0), errors: rs.reduce((a, m) => a + m.errors, 0),
        cpuMsPerReq: median(rs.map((m) => m.cpuMsPerReq)), cpuMsPerReqRange: [Math.min(...rs.map((m) => m.cpuMsPerReq)), Math.max(...rs.map((m) => m.cpuMsPerReq))],
        rps: median(rs.map((m) => m.rps)), p50_ms: median(rs.map((m) => m.p50_ms)), p99_ms: median(rs.map((m) => m.p99_ms)),
        rssPeakMb: Math.max(...rs.map((m) => m.rssPeakMb)),
      };
    }
    const { gateway: g, peer: p } = row.ways;
    if (g && p) row.gatewayVsPeer = { cpuMsPerReq: g.cpuMsPerReq / p.cpuMsPerReq, rps: g.rps / p.rps, p50: g.p50_ms / p.p50_ms };
    return row;
  });
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
  out.push(`## Bare workerd: gateway vs peer (${k.rounds} alternating rounds of ${k.seconds} s at concurrency ${k.concurrency}, medians)`, '');
  const pinned = w.cpus ? ` Each workerd pinned to CPU ${w.cpus.workers}, and oha, the stand-ins, Azurite and the runner to CPU ${w.cpus.others} (\`BENCH_WORKERD_PIN=0\`: unpinned).` : ' Unpinned: the workers share their cores with oha and the stand-ins.';
  out.push(`Each worker on its own \`workerd serve\` (${w.workerd.version}; no wrangler: no entry proxy, no Node process), compatibility date ${w.workerd.compat.compatibilityDate}; ports ${w.ports.gateway} (gateway) and ${w.ports.peer} (peer).${pinned} CPU ms/req: utime+stime of that workerd process over the round, divided by the requests it answered. Both workers print one JSON log line per request (lines / requests: gateway ${w.logCheck.gateway.lines} / ${w.logCheck.gateway.requests}, ${w.logCheck.gateway.bytesPerLine ?? '–'} bytes per line; peer ${w.logCheck.peer.lines} / ${w.logCheck.peer.requests}, ${w.logCheck.peer.bytesPerLine ?? '–'} bytes).`, '');
  out.push('| scenario | way | CPU ms/req (min–max) | req/s | p50 ms | p99 ms | requests | errors | gw/peer CPU/req | gw/peer req/s |');
  out.push('|---|---|--:|--:|--:|--:|--:|--:|--:|--:|');
  for (const row of w.summary) {
    for (const way of WAYS) {
      const x = row.ways[way];
      if (!x) continue;
      const g = way === 'gateway';
      out.push(`| ${row.label} | ${way} | ${f(x.cpuMsPerReq, 3)} (${f(x.cpuMsPerReqRange[0], 3)}–${f(x.cpuMsPerReqRange[1], 3)}) | ${f(x.rps, 0)} | ${f(x.p50_ms)} | ${f(x.p99_ms)} | ${x.requests} | ${x.errors} | ${g ? f(row.gatewayVsPeer?.cpuMsPerReq, 2) : ''} | ${g ? f(row.gatewayVsPeer?.rps, 2) : ''} |`);
    }
  }
  out.push('', `Errors: any answer other than 404 in the 404 scenario, any non-2xx elsewhere, and connection errors. ${w.cpus ? 'oha, Azurite, the stand-in and the issuer share one core: in the scenarios that call them, req/s is bounded by that core, and a worker\'s CPU per request moves with how many requests each wake-up finds (the rounds\' min–max shows how much).' : 'Everything (oha, both workerd, Azurite, the stand-in, the issuer) shares the same cores: req/s moves with whatever else runs, CPU per request much less.'}`);
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

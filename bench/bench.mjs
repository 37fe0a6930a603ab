/**
 * Benchmark harness (issue 7). Run through bench/run, which installs oha and sets the environment.
 *
 * Starts the local stack on bench ports with bench/policy.json (the gateway is built in release by
 * startGateway), starts the peer JavaScript worker (bench/peer/index.js) under wrangler dev too,
 * then drives every scenario with oha, alternating direct → gateway → peer, and writes
 * bench/results/latest.{json,md} and latency.svg. Then (key `workerd`) the gateway and the peer
 * on bare workerd, without wrangler dev (bench/workerd-bench.mjs). Any non-2xx answer or
 * connection error in a scenario fails the run (exit 1, after the results are written).
 *
 * Knobs (environment): BENCH_SECONDS (per small-body measurement, default 4), BENCH_ROUNDS
 * (alternating rounds of small-body measurements, default 3; the median is reported), BENCH_BIG_N ("2,16,24": requests
 * of 50 MB at concurrency 1, 16, 64), BENCH_COLD (cold starts, default 3), BENCH_SCENARIOS
 * (comma list of sb,blob1k,blob50m,workerd; default all; without any of the first three, wrangler
 * dev is not started at all: no floor, no cold starts), and the BENCH_WORKERD_* knobs of
 * bench/workerd-bench.mjs.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cpus, totalmem } from 'node:os';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { gzipSync } from 'node:zlib';
import { setTimeout as sleep } from 'node:timers/promises';
import { REPO_ROOT, workerdRss } from '../dev/proc.mjs';
import { buildWorker, startGateway } from '../dev/gateway.mjs';
import { CLIENT_ID, CONTAINER, TENANT, serviceBusToken, startStack, storageToken } from '../dev/stack.mjs';
import { BLOB_API_VERSION } from '../dev/azurite.mjs';
import { BENCH_HUB, BENCH_SB_ENTITIES, runWorkerdBench, workerdMarkdown } from './workerd-bench.mjs';
import { BENCH_STACK_PORTS, body1k as writeBody1k, oha as runOha } from './compare.mjs';

const BENCH = join(REPO_ROOT, 'bench');
const STATE = join(REPO_ROOT, 'target', 'bench');
const RESULTS = join(BENCH, 'results');
const OHA = process.env.OHA_BIN;
const PORTS = BENCH_STACK_PORTS;
const PEER_PORT = 28788;
const CONCURRENCY = [1, 16, 64];
const WAYS = ['direct', 'gateway', 'peer'];
const SECONDS = Number(process.env.BENCH_SECONDS ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const BIG_N = (process.env.BENCH_BIG_N ?? '2,16,24').split(',').map(Number);
const COLD = Number(process.env.BENCH_COLD ?? 3);
const ONLY = (process.env.BENCH_SCENARIOS ?? 'sb,blob1k,blob50m,workerd').split(',').map((x) => x.trim()).filter(Boolean);
const WRANGLER = ONLY.some((x) => ['sb', 'blob1k', 'blob50m'].includes(x)); // the wrangler dev part (and floor, cold starts)
const WORKERD = ONLY.includes('workerd'); // the bare-workerd part
const MB = 1024 * 1024;

const log = (msg) => console.log(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}`);
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };
const round = (x, d = 1) => (x == null || Number.isNaN(x) ? null : Number(x.toFixed(d)));

// ---------------------------------------------------------------------------------------------
// oha

/** Run oha with args (plus JSON output); resolves its parsed JSON report. */
const oha = (args) => runOha(OHA, args);


/**
 * CPU time (ms, utime + stime) used so far by the processes of process group `pgid`, split into
 * workerd and the rest (wrangler's Node process). Ticks of processes that exit meanwhile are lost.
 */
const TICK_MS = 1000 / Number(execFileSync('getconf', ['CLK_TCK']).toString().trim() || 100);
function groupCpu(pgid) {
  const cpu = { workerd: 0, wrangler: 0, workerdPids: [] };
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[2]) !== pgid) continue;
      const ms = (Number(fields[11]) + Number(fields[12])) * TICK_MS;
      if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('workerd')) { cpu.workerd += ms; cpu.workerdPids.push(Number(pid)); } else cpu.wrangler += ms;
    } catch { /* gone */ }
  }
  return cpu;
}

/** The worker's JSON log lines (the gateway logs one per request) from wrangler's output lines. */
function jsonLines(lines) {
  const out = [];
  for (const line of lines) {
    const i = line.indexOf('{"');
    if (i < 0) continue;
    try { const v = JSON.parse(line.slice(i)); if (v && typeof v === 'object' && 'duration_ms' in v) out.push(v); } catch { /* not ours */ }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------

async function main() {
  if (!OHA || !existsSync(OHA)) throw new Error('OHA_BIN is not set to an oha binary: run bench/run');
  mkdirSync(STATE, { recursive: true });
  mkdirSync(RESULTS, { recursive: true });
  const ohaVersion = execFileSync(OHA, ['--version']).toString().trim();

  const body1k = writeBody1k(STATE); // 1024 bytes of JSON
  const body1kBytes = statSync(body1k).size;
  const body50m = join(STATE, 'body-50m.bin');
  if (!existsSync(body50m) || statSync(body50m).size !== 50 * MB) writeFileSync(body50m, randomBytes(50 * MB));

  const cleanup = [];
  const stopAll = async () => { for (const stop of cleanup.reverse()) await stop().catch(() => {}); cleanup.length = 0; };
  for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => { log(`${sig}: stopping`); stopAll().finally(() => process.exit(130)); });

  const results = { ok: true, failures: [] };
  try {
    // --- stack, then the gateway's release build with bench/policy.json ---
    log('starting the stack and building the gateway (release)');
    const stack = await startStack({
      policyPath: join(BENCH, 'policy.json'),
      ports: PORTS,
      stateDir: STATE,
      gateway: false,
      serviceBus: { entities: BENCH_SB_ENTITIES },
      log: (m) => log(m),
    });
    cleanup.push(stack.stop);
    const t0 = Date.now();
    await buildWorker({ policyPath: join(BENCH, 'policy.json'), dir: join(STATE, 'gateway') });
    log(`gateway built in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    // What startStack would give the gateway under wrangler dev (dev/stack.mjs), on the bench port.
    const gwOptions = {
      port: PORTS.gateway, stateDir: join(STATE, 'gateway'), build: false,
      secrets: { DEV_CLIENT_SECRET: stack.clientSecret, DEV_API_KEY: stack.apiKey }, caCertPaths: [stack.azurite.certPath],
    };

    // --- bare workerd: the gateway and the peer without wrangler dev (bench/workerd-bench.mjs) ---
    // First, while Azurite is fresh (it keeps every blob in memory: the wrangler dev part's 50 MB
    // bodies make it several GB, and slow) and no wrangler dev runs.
    if (WORKERD) {
      const tokensBefore = stack.issuer.stats().tokenRequests;
      try {
        results.workerd = await runWorkerdBench({
          stack, gatewayBuildDir: join(STATE, 'gateway', 'build'), policyPath: join(BENCH, 'policy.json'), oha, body1k, stateDir: join(STATE, 'workerd'), log,
        });
        results.workerd.tokenRequests = stack.issuer.stats().tokenRequests - tokensBefore;
        if (results.workerd.failures.length) { results.ok = false; results.failures.push(...results.workerd.failures); }
      } catch (err) {
        // The wrangler dev part still runs and the results are still written.
        log(`bare workerd part FAILED: ${err.message}`);
        results.ok = false;
        results.failures.push(`workerd: ${err.message.split('\n')[0]}`);
      }
    }

    if (WRANGLER) {
      log('starting the gateway under wrangler dev');
      const gw = await startGateway(gwOptions);
      cleanup.push(() => gw.stop());

      // --- peer JavaScript worker ---
      const peerDir = join(STATE, 'peer');
      const peerMain = relative(peerDir, join(BENCH, 'peer', 'index.js'));
      mkdirSync(peerDir, { recursive: true });
      const peerToml = join(STATE, 'peer.wrangler.toml');
      writeFileSync(peerToml, [
        '# Generated by bench/bench.mjs: the peer JavaScript worker (no build step).',
        'name = "aeg-bench-peer"',
        `main = "${peerMain}"`,
        'compatibility_date = "2026-11-01"',
        '',
        '[vars]',
        `TOKEN_URL = "${stack.issuer.tokenUrlV2}"`,
        `CLIENT_ID = "${CLIENT_ID}"`,
        `SB_URL = "${stack.serviceBus.url}"`,
        'SB_QUEUE = "orders"',
        `BLOB_URL = "${stack.azurite.url}"`,
        `BLOB_CONTAINER = "${CONTAINER}"`,
        `EH_URL = "${stack.serviceBus.url}"`,
        `EH_HUB = "${BENCH_HUB}"`,
        '',
      ].join('\n'));
      const peerOptions = {
        port: PEER_PORT, stateDir: peerDir, build: false, wranglerToml: peerToml,
        secrets: { CLIENT_SECRET: stack.clientSecret }, caCertPaths: [stack.azurite.certPath],
      };
      log('starting the peer worker');
      let peer = await startGateway(peerOptions);
      cleanup.push(() => peer.stop());

      // --- tokens for direct calls, fetched beforehand ---
      const sbToken = await serviceBusToken(stack.issuer, stack.clientSecret);
      const stToken = await storageToken(stack.issuer, stack.clientSecret);

      // Smoke: one request each way so a broken path fails in seconds, not after a minute of load.
      const targets = {
        sb: {
          label: 'Service Bus send, 1 KB JSON', bodyFile: body1k, bytes: body1kBytes,
          direct: ['-m', 'POST', '-T', 'application/json', '-H', `Authorization: Bearer ${sbToken}`,
            '-H', 'BrokerProperties: {"MessageId":"bench-direct"}', `${stack.serviceBus.url}/orders/messages`],
          gateway: ['-m', 'POST', '-T', 'application/json', `${gw.url}/sb/contoso`],
          peer: ['-m', 'POST', '-T', 'application/json', `${peer.url}/sb/contoso`],
        },
        blob1k: {
          label: 'Blob write, 1 KB', bodyFile: body1k, bytes: body1kBytes,
          direct: blobDirect(stack, stToken, 'small', 'application/json'),
          gateway: ['-m', 'PUT', '-T', 'application/json', `${gw.url}/blob/small`],
          peer: ['-m', 'PUT', '-T', 'application/json', `${peer.url}/blob/small`],
        },
        blob50m: {
          label: 'Blob write, 50 MB', bodyFile: body50m, bytes: 50 * MB, big: true,
          direct: blobDirect(stack, stToken, 'big', 'application/octet-stream'),
          gateway: ['-m', 'PUT', '-T', 'application/octet-stream', `${gw.url}/blob/big`],
          peer: ['-m', 'PUT', '-T', 'application/octet-stream', `${peer.url}/blob/big`],
        },
      };
      for (const [name, t] of Object.entries(targets)) {
        if (t.big) continue;
        for (const way of WAYS) {
          const r = await oha(['-n', '1', '-c', '1', '--insecure', '-D', t.bodyFile, ...t[way]]);
          const codes = Object.keys(r.statusCodeDistribution ?? {});
          if (codes.length !== 1 || !codes[0].startsWith('2')) {
            throw new Error(`smoke ${name}/${way}: ${JSON.stringify(r.statusCodeDistribution)} ${JSON.stringify(r.errorDistribution)}`);
          }
        }
      }
      log('smoke requests: all 2xx');

      const pgids = { gateway: gw.pid, peer: peer.pid, 'peer-nolog': peer.pid };
      /** One oha measurement with token, memory and gateway-log accounting. */
      const measure = async (scenario, way, c, args, { expect2xx = true } = {}) => {
        const before = stack.issuer.stats().tokenRequests;
        const logFrom = gw.logs.length;
        const pgid = pgids[way];
        const cpu0 = pgid ? groupCpu(pgid) : null;
        let peakKb = pgid ? workerdRss(pgid) : 0;
        const startKb = peakKb;
        const timer = pgid ? setInterval(() => { peakKb = Math.max(peakKb, workerdRss(pgid)); }, 25) : null;
        let r;
        try {
          r = await oha(args);
        } finally {
          if (timer) clearInterval(timer);
        }
        const cpu1 = pgid ? groupCpu(pgid) : null;
        const codes = r.statusCodeDistribution ?? {};
        const errs = r.errorDistribution ?? {};
        const total = Object.values(codes).reduce((a, b) => a + b, 0);
        const ok = Object.entries(codes).filter(([k]) => k.startsWith('2')).reduce((a, [, v]) => a + v, 0);
        const errors = (total - ok) + Object.values(errs).reduce((a, b) => a + b, 0);
        const m = {
          scenario, way, c, requests: total, ok,
          rps: r.summary.requestsPerSec, seconds: r.summary.total,
          p50_ms: (r.latencyPercentiles?.p50 ?? NaN) * 1000, p99_ms: (r.latencyPercentiles?.p99 ?? NaN) * 1000,
          status: codes, errorKinds: errs, errors: expect2xx ? errors : Object.values(errs).reduce((a, b) => a + b, 0),
          tokenRequests: stack.issuer.stats().tokenRequests - before,
          workerdPeakMb: pgid ? peakKb / 1024 : null,
          workerdStartMb: pgid ? startKb / 1024 : null,
          workerdPids: cpu1?.workerdPids ?? null,
        };
        if (cpu1) {
          m.workerdCpuMsPerReq = (cpu1.workerd - cpu0.workerd) / Math.max(total, 1);
          m.wranglerCpuMsPerReq = (cpu1.wrangler - cpu0.wrangler) / Math.max(total, 1);
        }
        if (way === 'gateway') {
          const lines = jsonLines(gw.logs.slice(logFrom));
          m.log = {
            lines: lines.length,
            duration_ms_p50: lines.length ? median(lines.map((l) => l.duration_ms)) : null,
            idp_ms_sum: lines.reduce((a, l) => a + (l.idp_ms ?? 0), 0),
            fetched: lines.filter((l) => l.token === 'fetched').length,
          };
        }
        if (m.errors) {
          results.ok = false;
          results.failures.push(`${scenario}/${way}/c${c}: ${JSON.stringify(codes)} ${JSON.stringify(errs)}`);
        }
        log(`${scenario.padEnd(7)} ${way.padEnd(7)} c=${String(c).padEnd(2)} ${m.rps.toFixed(1).padStart(8)} req/s  p50 ${m.p50_ms.toFixed(1)} ms  p99 ${m.p99_ms.toFixed(1)} ms  tokens ${m.tokenRequests}  errors ${m.errors}${pgid ? `  workerd ${m.workerdPeakMb.toFixed(0)} MB, cpu/req workerd ${m.workerdCpuMsPerReq.toFixed(2)} ms + wrangler ${m.wranglerCpuMsPerReq.toFixed(2)} ms` : ''}`);
        return m;
      };

      // --- the scenarios: per concurrency level, rounds of direct → gateway → peer ---
      const runs = [];
      for (const [name, t] of Object.entries(targets)) {
        if (!ONLY.includes(name)) continue;
        for (const [i, c] of CONCURRENCY.entries()) {
          const rounds = t.big ? 1 : ROUNDS;
          for (let rnd = 0; rnd < rounds; rnd++) {
            for (const way of WAYS) {
              const load = t.big
                ? ['-n', String(BIG_N[i]), '-c', String(Math.min(c, BIG_N[i])), '-t', '300s']
                : ['-z', `${SECONDS}s`, '-c', String(c), '-w', '-t', '30s'];
              const m = await measure(name, way, c, [...load, '--insecure', '-D', t.bodyFile, ...t[way]]);
              m.round = rnd;
              m.inFlight = t.big ? Math.min(c, BIG_N[i]) : c;
              if (t.big) m.mb_per_s = (m.ok * t.bytes) / MB / m.seconds;
              runs.push(m);
            }
          }
        }
      }

      // --- floor: a 404 (no I/O) through the same wrangler dev, next to the Service Bus route ---
      const floorRuns = [];
      for (const c of [16, 64]) {
        for (let rnd = 0; rnd < ROUNDS; rnd++) {
          for (const way of ['gateway', 'peer', 'peer-nolog']) {
            const url = way === 'gateway' ? `${gw.url}/nothing-here` : `${peer.url}/nothing-here${way === 'peer-nolog' ? '?nolog' : ''}`;
            const m = await measure('floor', way, c, ['-z', `${SECONDS}s`, '-c', String(c), '-w', '-t', '30s', url], { expect2xx: false });
            m.way = way;
            m.round = rnd;
            m.inFlight = c;
            m.status404 = m.status['404'] ?? 0;
            if (m.status404 !== m.requests) { results.ok = false; results.failures.push(`floor/${way}/c${c}: ${JSON.stringify(m.status)}`); }
            floorRuns.push(m);
          }
        }
      }
      const floor = summarizeFloor(floorRuns);
      const issuerStats = stack.issuer.stats();

      // --- cold start: spawn wrangler dev on the built worker until the first answered request ---
      const gatewayLogs = gw.logs;
      await peer.stop();
      await gw.stop();
      const cold = { gateway: [], peer: [] };
      for (let i = 0; i < COLD; i++) {
        for (const [way, opts] of [['gateway', gwOptions], ['peer', peerOptions]]) {
          cold[way].push(await coldStart(opts));
          log(`cold start ${way} #${i + 1}: ${cold[way].at(-1)} ms`);
        }
      }

      results.coldStartMs = { gateway: { runs: cold.gateway, median: median(cold.gateway) }, peer: { runs: cold.peer, median: median(cold.peer) } };
      results.runs = runs;
      results.summary = summarize(runs);
      results.floor = floor;
      results.floorRuns = floorRuns;
      results.issuerTotal = { tokenRequests: issuerStats.tokenRequests, byAudience: issuerStats.byAudience, byClient: issuerStats.byClient };
      results.phases = phases(jsonLines(gatewayLogs));
    }

    // --- sizes of the upload ---
    const buildDir = join(STATE, 'gateway', 'build');
    const files = walk(buildDir);
    const wasm = files.find((f) => f.endsWith('.wasm'));
    const wasmBytes = readFileSync(wasm);
    const allBytes = files.map((f) => readFileSync(f));
    const sizes = {
      wasmFile: relative(REPO_ROOT, wasm),
      wasmRaw: wasmBytes.length, wasmGzip: gzipSync(wasmBytes, { level: 9 }).length,
      buildRaw: allBytes.reduce((a, b) => a + b.length, 0),
      buildGzip: allBytes.reduce((a, b) => a + gzipSync(b, { level: 9 }).length, 0),
      peerRaw: statSync(join(BENCH, 'peer', 'index.js')).size,
      peerGzip: gzipSync(readFileSync(join(BENCH, 'peer', 'index.js')), { level: 9 }).length,
    };


    results.meta = {
      date: new Date().toISOString(), cpus: cpus().length, cpu: cpus()[0]?.model, memGb: round(totalmem() / 2 ** 30, 1),
      oha: ohaVersion, node: process.version, scenarios: ONLY, secondsPerMeasurement: SECONDS, rounds: ROUNDS, bigRequests: BIG_N,
      body1kBytes, note: 'load generator, workerd (gateway and peer), Azurite, the Service Bus stand-in and the issuer all share the same cores',
    };
    results.sizes = sizes;
    writeOutputs(results);
  } finally {
    await stopAll();
  }
  if (!results.ok) {
    console.error(`bench: FAILED: non-2xx answers or connection errors:\n  ${results.failures.join('\n  ')}`);
    process.exit(1);
  }
  log(`done: ${relative(REPO_ROOT, RESULTS)}/latest.{md,json}${WRANGLER ? ', latency.svg' : ''}`);
}

function blobDirect(stack, token, kind, type) {
  // oha's --rand-regex-url: every request writes a new blob, like the gateway's {uuid}.
  const url = `${stack.azurite.url}/${CONTAINER}/bench/direct/${kind}/[a-z0-9]{24}`.replace(/\./g, '[.]'); // oha's regex: '\\.' misparses, '[.]' works
  return ['-m', 'PUT', '-T', type, '-H', `Authorization: Bearer ${token}`, '-H', `x-ms-version: ${BLOB_API_VERSION}`,
    '-H', `x-ms-date: ${new Date().toUTCString()}`, '-H', 'x-ms-blob-type: BlockBlob', '--rand-regex-url', url];
}

function walk(dir) {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(dir, e.name)) : [join(dir, e.name)]));
}

/** ms from calling startGateway (it spawns wrangler dev at once) to the first answer of a 20 ms poll. */
async function coldStart(options) {
  const t0 = performance.now();
  let answered = null;
  let done = false;
  const poll = (async () => {
    while (!done) {
      try {
        const res = await fetch(`http://127.0.0.1:${options.port}/cold-start-probe`, { signal: AbortSignal.timeout(1000) });
        await res.body?.cancel();
        answered = performance.now() - t0;
        return;
      } catch { await sleep(20); }
    }
  })();
  const handle = await startGateway(options);
  await poll;
  done = true;
  await handle.stop();
  return Math.round(answered);
}

function summarize(runs) {
  const out = [];
  const keys = [...new Set(runs.map((r) => `${r.scenario}|${r.c}`))];
  for (const key of keys) {
    const [scenario, c] = key.split('|');
    const row = { scenario, c: Number(c), ways: {} };
    for (const way of WAYS) {
      const rs = runs.filter((r) => r.scenario === scenario && r.c === Number(c) && r.way === way);
      if (!rs.length) continue;
      row.inFlight = rs[0].inFlight;
      row.ways[way] = {
        rps: median(rs.map((r) => r.rps)), p50_ms: median(rs.map((r) => r.p50_ms)), p99_ms: median(rs.map((r) => r.p99_ms)),
        mb_per_s: rs[0].mb_per_s != null ? median(rs.map((r) => r.mb_per_s)) : null,
        requests: rs.reduce((a, r) => a + r.requests, 0), errors: rs.reduce((a, r) => a + r.errors, 0),
        tokenRequests: rs.reduce((a, r) => a + r.tokenRequests, 0),
        workerdPeakMb: rs[0].workerdPeakMb != null ? Math.max(...rs.map((r) => r.workerdPeakMb)) : null,
        workerdStartMb: rs[0].workerdStartMb ?? null,
        workerdCpuMsPerReq: rs[0].workerdCpuMsPerReq != null ? median(rs.map((r) => r.workerdCpuMsPerReq)) : null,
        wranglerCpuMsPerReq: rs[0].wranglerCpuMsPerReq != null ? median(rs.map((r) => r.wranglerCpuMsPerReq)) : null,
      };
    }
    const { direct, gateway, peer } = row.ways;
    if (gateway && peer) row.gatewayVsPeer = { rps: gateway.rps / peer.rps, p50: gateway.p50_ms / peer.p50_ms };
    if (gateway && direct) row.gatewayVsDirect = { rps: gateway.rps / direct.rps, p50: gateway.p50_ms / direct.p50_ms };
    out.push(row);
  }
  return out;
}

function summarizeFloor(runs) {
  const out = [];
  for (const c of [...new Set(runs.map((r) => r.c))]) {
    for (const way of [...new Set(runs.map((r) => r.way))]) {
      const rs = runs.filter((r) => r.c === c && r.way === way);
      out.push({
        way, c, rounds: rs.length, rps: median(rs.map((r) => r.rps)), p50_ms: median(rs.map((r) => r.p50_ms)),
        workerdCpuMsPerReq: median(rs.map((r) => r.workerdCpuMsPerReq)), wranglerCpuMsPerReq: median(rs.map((r) => r.wranglerCpuMsPerReq)),
      });
    }
  }
  return out;
}

/** The gateway's own per-request log: duration_ms (workerd's clock, which moves only across I/O) per route. */
function phases(lines) {
  const byRoute = {};
  for (const l of lines) {
    const k = `${l.route ?? '(none)'} ${l.status}`;
    (byRoute[k] ??= []).push(l);
  }
  return Object.fromEntries(Object.entries(byRoute).map(([k, ls]) => [k, {
    requests: ls.length,
    duration_ms_p50: median(ls.map((l) => l.duration_ms)),
    duration_ms_p99: [...ls.map((l) => l.duration_ms)].sort((a, b) => a - b)[Math.floor(ls.length * 0.99)],
    token_fetched: ls.filter((l) => l.token === 'fetched').length,
    idp_ms: ls.filter((l) => l.idp_ms != null).map((l) => l.idp_ms),
  }]));
}

// ---------------------------------------------------------------------------------------------
// outputs

function writeOutputs(results) {
  writeFileSync(join(RESULTS, 'latest.json'), `${JSON.stringify(results, null, 2)}\n`);
  writeFileSync(join(RESULTS, 'latest.md'), markdown(results));
  if (results.summary?.length) writeFileSync(join(RESULTS, 'latency.svg'), svg(results)); // wrangler dev part only
}

const f = (x, d = 1) => (x == null || Number.isNaN(x) ? '–' : x.toFixed(d));

function markdown(r) {
  const m = r.meta;
  const out = [];
  out.push(`# Benchmark results (${m.date.slice(0, 16).replace('T', ' ')} UTC)`, '');
  out.push(`Machine: ${m.cpus} cores (${m.cpu}), ${m.memGb} GB. **oha, workerd (gateway and peer), Azurite, the Service Bus stand-in and the issuer all share these ${m.cpus} cores**: figures compare the ways with each other on this machine, not what Azure or Cloudflare would do. Scenarios run: \`${m.scenarios.join(',')}\`.`, '');
  if (r.workerd) out.push(workerdMarkdown(r.workerd), '', `Token requests during the bare-workerd part: ${r.workerd.tokenRequests} (one per audience for each worker, fetched by its smoke request; per memory run, one by the fresh worker and one for the HEAD checks on Azurite).`, '');
  if (r.summary?.length) markdownWrangler(r, out);
  const s = r.sizes;
  out.push('## Size and start', '');
  out.push(`- wasm upload: ${s.wasmRaw} bytes raw, ${s.wasmGzip} bytes gzip (\`${s.wasmFile}\`); whole build dir ${s.buildRaw} raw / ${s.buildGzip} gzip. Peer index.js: ${s.peerRaw} raw / ${s.peerGzip} gzip.`);
  if (r.coldStartMs) out.push(`- spawn of \`wrangler dev\` on an already-built worker to its first answered request (median of ${r.coldStartMs.gateway.runs.length}): gateway ${r.coldStartMs.gateway.median} ms (${r.coldStartMs.gateway.runs.join(', ')}), peer ${r.coldStartMs.peer.median} ms (${r.coldStartMs.peer.runs.join(', ')}).`);
  if (!r.summary?.length) out.push('', '(The wrangler dev part did not run: `latency.svg` is from an earlier run.)');
  if (!r.ok) out.push('', `**FAILED**: ${r.failures.join('; ')}`);
  return `${out.join('\n')}\n`;
}

/** The wrangler dev part of latest.md: direct / gateway / peer, the floor, the gateway's log phases. */
function markdownWrangler(r, out) {
  const m = r.meta;
  out.push('## wrangler dev: direct, gateway, peer', '');
  out.push(`${m.oha}, wrangler dev (local workerd). Small bodies: ${m.rounds} alternating rounds of ${m.secondsPerMeasurement} s per way and level (median of rounds). 50 MB: ${m.bigRequests.join(' / ')} requests at levels 1 / 16 / 64 (in flight = min(level, requests)).`, '');
  out.push('| scenario | conc. (in flight) | way | req/s | MB/s | p50 ms | p99 ms | gw/peer req/s | gw/direct req/s | gw/peer p50 | gw/direct p50 | token req. | errors | workerd RSS MB: start → peak | CPU ms/req workerd + wrangler |');
  out.push('|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|');
  const labels = { sb: 'Service Bus send 1 KB', blob1k: 'Blob write 1 KB', blob50m: 'Blob write 50 MB' };
  for (const row of r.summary) {
    for (const way of WAYS) {
      const w = row.ways[way];
      if (!w) continue;
      const g = way === 'gateway';
      out.push(`| ${labels[row.scenario]} | ${row.c}${row.inFlight !== row.c ? ` (${row.inFlight})` : ''} | ${way} | ${f(w.rps)} | ${f(w.mb_per_s)} | ${f(w.p50_ms)} | ${f(w.p99_ms)} | ${g ? f(row.gatewayVsPeer?.rps, 2) : ''} | ${g ? f(row.gatewayVsDirect?.rps, 2) : ''} | ${g ? f(row.gatewayVsPeer?.p50, 2) : ''} | ${g ? f(row.gatewayVsDirect?.p50, 2) : ''} | ${way === 'direct' ? '(1 before)' : w.tokenRequests} | ${w.errors} | ${w.workerdPeakMb == null ? '–' : `${f(w.workerdStartMb, 0)} → ${f(w.workerdPeakMb, 0)}`} | ${w.workerdCpuMsPerReq == null ? '–' : `${f(w.workerdCpuMsPerReq, 2)} + ${f(w.wranglerCpuMsPerReq, 2)}`} |`);
    }
  }
  out.push('', 'workerd RSS: both workerd processes of that wrangler dev (its entry proxy and the worker), sampled every 25 ms, at the start of the first round and the peak over the rounds; it grows over the run in the gateway and the peer alike. CPU ms/req: utime+stime of the workerd processes and of wrangler\'s Node process over the measurement, divided by the requests.');
  out.push('', `Token requests: issuer \`stats().tokenRequests\` difference over each way's measurements (direct used one token per audience fetched before the load). Whole run up to the end of this part: ${r.issuerTotal.tokenRequests} (${Object.entries(r.issuerTotal.byAudience).map(([k, v]) => `${k}: ${v}`).join(', ')}): the container creation, ${r.workerd ? `the bare-workerd part's ${r.workerd.tokenRequests}, ` : ''}direct's two, and one per audience for each of the gateway and the peer, fetched by their first (smoke) request.`, '');
  out.push(`## Floor: a 404 (no I/O) through the same wrangler dev (median of ${r.meta.rounds} alternating rounds of ${r.meta.secondsPerMeasurement} s)`, '');
  out.push('`peer`: the peer answering the same 404 with its one JSON log line per request, shaped like the gateway\'s; `peer-nolog`: without it (`?nolog`).', '');
  out.push('Machine time per request is 1000/req/s ms at saturation. The last column is the part of a Service Bus send\'s machine time that a request doing no I/O already costs (runtime + routing + logging), the rest being the token lookup, the backend call and the stand-in.', '');
  out.push('| way | conc. | 404 req/s | 404 p50 ms | 404 CPU ms/req workerd + wrangler | SB send req/s | SB send CPU ms/req workerd + wrangler | no-I/O floor / send time |', '|---|--:|--:|--:|--:|--:|--:|--:|');
  for (const fl of r.floor) {
    const sb = fl.way === 'peer-nolog' ? null : r.summary.find((s) => s.scenario === 'sb' && s.c === fl.c)?.ways[fl.way];
    out.push(`| ${fl.way} | ${fl.c} | ${f(fl.rps)} | ${f(fl.p50_ms)} | ${f(fl.workerdCpuMsPerReq, 2)} + ${f(fl.wranglerCpuMsPerReq, 2)} | ${f(sb?.rps)} | ${sb ? `${f(sb.workerdCpuMsPerReq, 2)} + ${f(sb.wranglerCpuMsPerReq, 2)}` : '–'} | ${sb ? `${f(100 * (sb.rps / fl.rps), 0)} %` : '–'} |`);
  }
  out.push('', '## Gateway log phases (`duration_ms` per route, workerd clock: advances only across I/O)', '');
  out.push('| route status | requests | duration_ms p50 | p99 | tokens fetched | idp_ms |', '|---|--:|--:|--:|--:|---|');
  for (const [k, p] of Object.entries(r.phases)) out.push(`| ${k} | ${p.requests} | ${f(p.duration_ms_p50)} | ${f(p.duration_ms_p99)} | ${p.token_fetched} | ${p.idp_ms.map((x) => f(x)).join(', ')} |`);
  out.push('');
}

function svg(r) {
  const colors = { direct: '#666666', gateway: '#d62728', peer: '#1f77b4' };
  const labels = { sb: 'Service Bus send 1 KB', blob1k: 'Blob write 1 KB', blob50m: 'Blob write 50 MB' };
  const scenarios = [...new Set(r.summary.map((s) => s.scenario))];
  const W = 300, H = 240, pad = { l: 50, r: 15, t: 30, b: 40 };
  const xs = (c) => pad.l + (Math.log2(c) / 6) * (W - pad.l - pad.r);
  const parts = [];
  scenarios.forEach((sc, i) => {
    const rows = r.summary.filter((s) => s.scenario === sc);
    const max = Math.max(...rows.flatMap((row) => WAYS.map((w) => row.ways[w]?.p50_ms ?? 0))) * 1.1 || 1;
    const ys = (v) => H - pad.b - (v / max) * (H - pad.t - pad.b);
    const g = [`<g transform="translate(${i * W},0)">`, `<text x="${W / 2}" y="18" text-anchor="middle" font-weight="bold">${labels[sc]}</text>`];
    g.push(`<line x1="${pad.l}" y1="${H - pad.b}" x2="${W - pad.r}" y2="${H - pad.b}" stroke="#000"/><line x1="${pad.l}" y1="${pad.t}" x2="${pad.l}" y2="${H - pad.b}" stroke="#000"/>`);
    for (const c of CONCURRENCY) g.push(`<text x="${xs(c)}" y="${H - pad.b + 15}" text-anchor="middle">${c}</text>`);
    for (let k = 0; k <= 4; k++) {
      const v = (max * k) / 4;
      g.push(`<text x="${pad.l - 4}" y="${ys(v) + 4}" text-anchor="end">${v >= 100 ? v.toFixed(0) : v.toFixed(1)}</text><line x1="${pad.l}" y1="${ys(v)}" x2="${W - pad.r}" y2="${ys(v)}" stroke="#eee"/>`);
    }
    g.push(`<text x="${W / 2}" y="${H - 8}" text-anchor="middle">concurrency</text>`);
    for (const way of WAYS) {
      const pts = rows.filter((row) => row.ways[way]).map((row) => [xs(row.c), ys(row.ways[way].p50_ms)]);
      g.push(`<polyline fill="none" stroke="${colors[way]}" stroke-width="2" points="${pts.map((p) => p.map((v) => v.toFixed(1)).join(',')).join(' ')}"/>`);
      for (const [x, y] of pts) g.push(`<circle cx="${x.toFixed(1)}" cy="${y.toFixed(1)}" r="3" fill="${colors[way]}"/>`);
    }
    g.push('</g>');
    parts.push(g.join('\n'));
  });
  const width = scenarios.length * W;
  const legend = WAYS.map((w, i) => `<rect x="${10 + i * 90}" y="${H + 8}" width="12" height="12" fill="${colors[w]}"/><text x="${26 + i * 90}" y="${H + 18}">${w}</text>`).join('');
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${H + 50}" font-family="sans-serif" font-size="11">
<rect width="100%" height="100%" fill="#fff"/>
<text x="8" y="${H + 40}" fill="#444">p50 latency (ms) against concurrency (50 MB: in flight capped, see latest.md). ${r.meta.cpus} cores shared by oha, workerd and the local stack. ${r.meta.date.slice(0, 10)}</text>
${parts.join('\n')}
${legend}
</svg>
`;
}

main().catch((err) => {
  console.error(`bench: ${err.stack ?? err.message}`);
  process.exit(1);
});

/**
 * What worker-build's entry shim costs per request, against the lean entry (scripts/lean-entry.mjs,
 * AEG_LEAN_ENTRY=1). Issue 11, item 3.
 *
 *   source scripts/env.sh
 *   node bench/entry-shim.mjs             # Node microbenchmark, a few seconds
 *   node bench/entry-shim.mjs --workerd   # also CPU per request of workerd, both entries, ~4 minutes
 *
 * 1. Node: worker-build's own shim.js (read from the cargo registry, the version scripts/env.sh
 *    pins), with the handlers worker-build generates for this worker (fetch, start), against the
 *    lean handler object, both around a stand-in wasm fetch that returns a settled promise. A
 *    "request" is what workerd does with each: `new Default(ctx, env).fetch(request)` (a class
 *    entrypoint is constructed per request) or `lean.fetch(request, env, ctx)`.
 * 2. --workerd: the release worker (tests/e2e/fixtures/crossings-policy.json) built once, its
 *    index.js copied and given the lean entry, both under wrangler dev side by side (ports 28797,
 *    28798); oha sends GET /nowhere (a 404: no I/O, the cheapest path, so the entry's share is
 *    the largest) to each in alternating rounds; reported: utime+stime of the workerd processes of
 *    each wrangler process group per request (/proc, clock ticks), median of the rounds.
 *    Knobs: SHIM_N (requests per round, default 5000), SHIM_ROUNDS (4), SHIM_C (concurrency, 8).
 *    Under wrangler dev a 404 costs workerd ~2.5 ms of CPU (bench/results/latest.md: the JS peer
 *    too), and rounds of the same entry differ by ±10 %: a difference of a few µs does not show.
 */
import { execFileSync, spawn } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { REPO_ROOT, workerdCpuMs } from '../dev/proc.mjs';
import { startGateway } from '../dev/gateway.mjs';

const STATE = join(REPO_ROOT, 'target', 'entry-shim');
const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

function findShim() {
  const version = process.env.WORKER_BUILD_VERSION;
  if (!version) throw new Error('WORKER_BUILD_VERSION is not set: source scripts/env.sh first');
  const registry = join(process.env.CARGO_HOME ?? join(homedir(), '.cargo'), 'registry', 'src');
  for (const index of existsSync(registry) ? readdirSync(registry) : []) {
    const path = join(registry, index, `worker-build-${version}`, 'src', 'js', 'shim.js');
    if (existsSync(path)) return { path, version };
  }
  throw new Error(`worker-build ${version}'s src/js/shim.js not found under ${registry} (scripts/setup installs it)`);
}

/** The two entries as ES modules in target/entry-shim/micro, around the same stand-in wasm exports. */
async function loadEntries() {
  const { path, version } = findShim();
  const dir = join(STATE, 'micro');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'workers.mjs'), 'export class WorkerEntrypoint { constructor(ctx, env) { this.ctx = ctx; this.env = env; } }\n');
  writeFileSync(join(dir, 'index.js'), [
    'const state = { criticalError: false, instanceId: 0 };',
    'export function __worker_init_state() { return state; }',
    'export function __wbg_reset_state() {}',
    'const answer = Promise.resolve("response");',
    'export function fetch(request, env, ctx) { return answer; }',
    'export function start() {}',
  ].join('\n'));
  // What worker-build 0.8.7's generate_handlers writes for the exports fetch and start.
  const handlers = 'Entrypoint.prototype.fetch = function fetch (arg) {\n  return exports.fetch.call(this, arg, this.env, this.ctx);\n}\n'
    + 'Entrypoint.prototype.start = exports.start;\n';
  const shim = readFileSync(path, 'utf8').replace('"cloudflare:workers"', '"./workers.mjs"').replace('$HANDLERS', handlers);
  if (!shim.includes('classProxyHooks')) throw new Error(`${path} is not the Proxy-based shim this benchmark expects`);
  writeFileSync(join(dir, 'shim.mjs'), shim);
  // The lean entry as scripts/lean-entry.mjs writes it, with the shim's two checks.
  writeFileSync(join(dir, 'lean.mjs'), [
    'import * as exports from "./index.js";',
    'const initState = exports.__worker_init_state();',
    'function checkReinitialize() { if (initState.criticalError) { exports.__wbg_reset_state(); initState.criticalError = false; initState.instanceId++; } }',
    'function handleMaybeCritical(e) { if (e instanceof WebAssembly.RuntimeError) initState.criticalError = true; }',
    'export default { fetch(request, env, ctx) { checkReinitialize(); try { return exports.fetch(request, env, ctx); } catch (e) { handleMaybeCritical(e); throw e; } } };',
  ].join('\n'));
  globalThis.addEventListener ??= () => {}; // the shim's global `error` listener
  const shimDefault = (await import(pathToFileURL(join(dir, 'shim.mjs')).href)).default;
  const lean = (await import(pathToFileURL(join(dir, 'lean.mjs')).href)).default;
  const wasm = await import(pathToFileURL(join(dir, 'index.js')).href);
  return { shimDefault, lean, wasm, version };
}

async function micro() {
  const { shimDefault, lean, wasm, version } = await loadEntries();
  const env = { VAR: 'x' };
  const ctx = { waitUntil() {}, passThroughOnException() {} };
  const request = { url: 'http://127.0.0.1/nowhere' };
  const ways = {
    'worker-build shim (new Proxy(class) per request)': () => new shimDefault(ctx, env).fetch(request),
    'lean entry ({ fetch } object)': () => lean.fetch(request, env, ctx),
    'wasm fetch wrapper alone': () => wasm.fetch(request, env, ctx),
  };
  const sink = [];
  const ITER = 1_000_000;
  const results = {};
  for (let round = 0; round < 7; round++) {
    for (const [name, run] of Object.entries(ways)) {
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < ITER; i++) sink[i & 1023] = run();
      const ns = Number(process.hrtime.bigint() - t0) / ITER;
      (results[name] ??= []).push(ns);
    }
  }
  console.log(`Node ${process.version}, worker-build ${version}'s shim.js, ${ITER} calls per round, median of 7 rounds:`);
  for (const [name, xs] of Object.entries(results)) console.log(`  ${name.padEnd(52)} ${median(xs).toFixed(1).padStart(7)} ns per request`);
  const shimNs = median(results[Object.keys(ways)[0]]);
  const leanNs = median(results[Object.keys(ways)[1]]);
  console.log(`  the shim's entry costs ${(shimNs - leanNs).toFixed(0)} ns more per request than the lean entry (JS only, not workerd's side)`);
  return { shimNs, leanNs };
}

// ---------------------------------------------------------------------------------------------
// workerd


function oha(url, n, c) {
  const bin = process.env.OHA_BIN ?? join(process.env.AEG_TOOLS ?? '', 'oha-1.16.0', 'bin', 'oha');
  if (!existsSync(bin)) throw new Error(`oha not found at ${bin}: run bench/run once (it installs oha), or set OHA_BIN`);
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['--no-tui', '--output-format', 'json', '-n', String(n), '-c', String(c), url], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.once('error', reject);
    child.once('exit', (code) => (code === 0 ? resolve(JSON.parse(out)) : reject(new Error(`oha exited ${code}`))));
  });
}

async function workerd() {
  const N = Number(process.env.SHIM_N ?? 5000);
  const ROUNDS = Number(process.env.SHIM_ROUNDS ?? 4);
  const C = Number(process.env.SHIM_C ?? 8);
  const policyPath = join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'crossings-policy.json');
  const secrets = { DEV_CLIENT_SECRET: 'unused', E2E_KEY: 'unused' };
  const started = [];
  try {
    console.log('\nworkerd: building the release worker once (scripts/build), then a lean copy...');
    const shimGw = await startGateway({ policyPath, port: 28797, stateDir: join(STATE, 'shim'), secrets, leanEntry: false });
    started.push(shimGw);
    const leanDir = join(STATE, 'lean');
    rmSync(join(leanDir, 'build'), { recursive: true, force: true });
    mkdirSync(leanDir, { recursive: true });
    cpSync(join(STATE, 'shim', 'build'), join(leanDir, 'build'), { recursive: true });
    execFileSync(process.execPath, [join(REPO_ROOT, 'scripts', 'lean-entry.mjs'), join(leanDir, 'build')], { stdio: 'inherit' });
    const leanGw = await startGateway({ policyPath, port: 28798, stateDir: leanDir, secrets, build: false });
    started.push(leanGw);
    const ways = { shim: shimGw, lean: leanGw };
    for (const gw of Object.values(ways)) await oha(`${gw.url}/nowhere`, 2000, C); // warm-up (JIT)
    const perReq = { shim: [], lean: [] };
    const rps = { shim: [], lean: [] };
    for (let round = 0; round < ROUNDS; round++) {
      for (const [name, gw] of Object.entries(ways)) {
        const cpu0 = workerdCpuMs(gw.pid);
        const report = await oha(`${gw.url}/nowhere`, N, C);
        const cpu1 = workerdCpuMs(gw.pid);
        const got = report.statusCodeDistribution?.['404'] ?? 0;
        if (got !== N) throw new Error(`${name}: ${got} of ${N} answers were 404`);
        perReq[name].push(((cpu1 - cpu0) / N) * 1000);
        rps[name].push(report.summary.requestsPerSec);
        console.log(`  round ${round + 1} ${name.padEnd(4)} ${(((cpu1 - cpu0) / N) * 1000).toFixed(1).padStart(7)} µs workerd CPU per request, ${report.summary.requestsPerSec.toFixed(0)} req/s`);
      }
    }
    console.log(`workerd, GET /nowhere (404), ${N} requests x ${ROUNDS} rounds per entry at concurrency ${C}, median:`);
    for (const name of Object.keys(ways)) {
      const xs = perReq[name];
      console.log(`  ${name.padEnd(4)} ${median(xs).toFixed(1).padStart(7)} µs CPU per request (rounds ${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}), ${median(rps[name]).toFixed(0)} req/s`);
    }
    console.log(`  medians differ by ${(median(perReq.shim) - median(perReq.lean)).toFixed(1)} µs per request; compare with the spread of the rounds before reading anything into it`);
  } finally {
    for (const gw of started.reverse()) await gw.stop().catch(() => {});
  }
}

await micro();
if (process.argv.includes('--workerd')) await workerd();

#!/usr/bin/env node
/**
 * Where a worker's CPU goes on bare workerd, per request: `perf record` of the workerd process
 * under oha load, V8 naming its JIT code (`--perf-basic-prof`), the samples sorted into wasm,
 * JavaScript, V8's runtime and builtins, workerd's API objects, the HTTP and promise plumbing
 * (kj, hyper), malloc, the kernel; then the wasm functions that cost most.
 *
 *   node bench/profile.mjs <gateway|peer> <scenario> [buildDir]
 *
 * scenario: as bench/compare.mjs. buildDir: a gateway built with bench/policy.json; for wasm
 * function names build it with its symbols:
 *   GATEWAY_POLICY=bench/policy.json CARGO_PROFILE_RELEASE_STRIP=none scripts/build --out-dir DIR
 * (without them the wasm functions show as numbers; the sums are the same).
 * Knobs: PROFILE_SECONDS (8), PROFILE_HZ (5000). Needs `perf` (Debian: linux-perf) allowed to
 * record a process of the same user. perf's own overhead inflates every figure by ~10–30 %:
 * compare ways in the same kind of run, not with bench/run's CPU per request.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT } from '../dev/proc.mjs';
import { startStack } from '../dev/stack.mjs';
import { BENCH_STACK_PORTS, body1k, oha, ohaBin } from './compare.mjs';
import { cpuPinning } from './workerd.mjs';
import { BENCH_SB_ENTITIES, benchScenarios, benchWorker } from './workerd-bench.mjs';

const STATE = join(REPO_ROOT, 'target', 'bench-profile');
const PORT = 29880;

/** The category of a `perf report` symbol of workerd's process. */
export function category(dso, symbol) {
  if (dso.includes('JIT')) {
    // Rust functions (the wasm) have paths; JavaScript shows as `JS:*name file:line`.
    return /::|__wbindgen|-turbofan$|-liftoff$/.test(symbol) && !/ index\.js:| node-internal:/.test(symbol) ? 'wasm' : 'JavaScript';
  }
  if (dso.includes('kernel')) return 'kernel';
  if (dso !== 'workerd') return `other (${dso})`;
  if (symbol.startsWith('Builtins_')) return 'V8 builtins';
  if (/tcmalloc|TCMalloc/.test(symbol)) return 'malloc';
  if (/\bkj\b|kj::|hyper|tokio/.test(symbol)) return 'kj/hyper (I/O, promises)';
  if (/v8::|cppgc/.test(symbol)) return 'V8 runtime (GC, handles)';
  if (symbol.includes('workerd::')) return 'workerd API';
  return 'workerd, other';
}

async function main() {
  const [way, scenarioName, buildDir] = process.argv.slice(2);
  const scenario = benchScenarios(body1k((mkdirSync(STATE, { recursive: true }), STATE)))[scenarioName];
  if (!['gateway', 'peer'].includes(way) || !scenario || (way === 'gateway' && !buildDir)) {
    console.error('usage: node bench/profile.mjs <gateway|peer> <404|sb|sb-single|sbhold|rest|blob1k|eh> [buildDir (gateway)]');
    process.exit(2);
  }
  try {
    execFileSync('perf', ['--version'], { stdio: 'ignore' });
  } catch {
    throw new Error('perf is not installed (Debian: apt-get install linux-perf)');
  }
  const bin = ohaBin();
  const seconds = Number(process.env.PROFILE_SECONDS ?? 8);
  const hz = Number(process.env.PROFILE_HZ ?? 5000);
  const stack = await startStack({ policyPath: join(REPO_ROOT, 'bench', 'policy.json'), ports: BENCH_STACK_PORTS, stateDir: STATE, gateway: false, serviceBus: { entities: BENCH_SB_ENTITIES }, log: () => {} });
  const pinning = cpuPinning();
  pinning.pinStack(stack);
  let w;
  try {
    const options = benchWorker(stack, { way, entry: buildDir ? join(buildDir, 'index.js') : undefined, port: PORT, stateDir: join(STATE, way), v8Flags: ['--perf-basic-prof'] });
    w = await pinning.startWorkerd(options);
    const args = scenario.args(w.url, way === 'peer');
    await oha(bin, ['-z', '3s', '-c', '16', ...args]);
    const data = join(STATE, `${way}-${scenarioName}.perf.data`);
    // perf stops a second before oha does: every sample falls under load.
    const perf = spawn('perf', ['record', '-q', '-e', 'cpu-clock', '-F', String(hz), '-o', data, '-p', String(w.pid), '--', 'sleep', String(seconds)], { stdio: 'ignore' });
    const perfDone = new Promise((res) => perf.on('exit', res));
    const load = await oha(bin, ['-z', `${seconds + 1}s`, '-c', '16', ...args]);
    await perfDone;
    const report = execFileSync('perf', ['report', '-i', data, '--no-children', '--sort', 'dso,sym', '-F', 'sample,dso,sym', '--stdio'], { maxBuffer: 256 * 1024 * 1024 }).toString();
    const requests = load.summary.requestsPerSec * seconds;
    const usPerSample = 1e6 / hz;
    const cats = new Map();
    const wasm = new Map();
    let total = 0;
    for (const line of report.split('\n')) {
      const m = /^\s*(\d+)\s+(\S.*?)\s+\[.\]\s+(.*)$/.exec(line);
      if (!m) continue;
      const n = Number(m[1]);
      const symbol = m[3].trim();
      const cat = category(m[2].trim(), symbol);
      total += n;
      cats.set(cat, (cats.get(cat) ?? 0) + n);
      if (cat === 'wasm') {
        const name = symbol.replace(/^JS:/, '').replace(/-\d+-(turbofan|liftoff)$/, '').replace(/::h[0-9a-f]{16}$/, '').replace(/\[[0-9a-f]{16}\]/g, '');
        wasm.set(name, (wasm.get(name) ?? 0) + n);
      }
    }
    const per = (n) => ((n * usPerSample) / requests).toFixed(1).padStart(7);
    console.log(`${way}, ${scenario.label}: ${Math.round(requests)} requests in ${seconds} s sampled at ${hz} Hz; ${per(total).trim()} µs of workerd CPU per request (perf's overhead included)`);
    for (const [cat, n] of [...cats].sort((a, b) => b[1] - a[1])) console.log(`${per(n)} µs  ${cat}`);
    if (wasm.size) {
      console.log('\nwasm functions, µs per request:');
      for (const [name, n] of [...wasm].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log(`${per(n)}  ${name.slice(0, 140)}`);
    }
    writeFileSync(join(STATE, `${way}-${scenarioName}.report.txt`), report);
  } finally {
    await w?.stop().catch(() => {});
    await stack.stop();
  }
}

main().catch((e) => {
  console.error(e.message);
  process.exit(1);
});

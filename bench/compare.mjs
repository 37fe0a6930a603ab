#!/usr/bin/env node
/**
 * Side by side on bare workerd: the peer and one or more gateway builds (or peer variants), the
 * same scenario, alternating rounds, each worker pinned to a CPU of its own as in bench/run. For
 * telling whether a change to the gateway made a request cheaper, which one bench/run at ±5 %
 * between runs cannot: every way runs in the same minutes, on the same stack, in turn.
 *
 *   node bench/compare.mjs <scenario> [name=dir ...]
 *
 * scenario: 404 | sb | sb-single | sbhold | rest | blob1k | eh (bench/workerd-bench.mjs `benchScenarios`;
 * sb-single and eh: their gateway way is the /sb or /eh route, their levels are COMPARE_CONCURRENCY's).
 * name=dir: a gateway built with bench/policy.json into dir (`GATEWAY_POLICY=bench/policy.json
 * scripts/build --out-dir dir`); a name starting with `peer` runs dir/index.js as a peer (a
 * variant of bench/peer/index.js). The peer of bench/peer always runs, as the reference.
 * Prints, per way, CPU µs per request of each round, the median, req/s, and the ratio to the
 * peer. Knobs: COMPARE_ROUNDS (7), COMPARE_SECONDS (2), COMPARE_CONCURRENCY (16), COMPARE_QPS
 * (unset: as fast as they go; a rate below what every way sustains makes CPU per request of a
 * send steadier, as it then does not follow how fast the stand-ins answer).
 *
 * It starts the stack on bench/run's ports (the bench policy names them): not while bench/run
 * runs. Needs bench/run's oha (OHA_BIN, or it is looked up where bench/run installs it).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { REPO_ROOT } from '../dev/proc.mjs';
import { startStack } from '../dev/stack.mjs';
import { cpuPinning } from './workerd.mjs';
import { BENCH_SB_ENTITIES, benchScenarios, benchWorker, isError } from './workerd-bench.mjs';

export const BENCH_STACK_PORTS = { issuer: 28400, azurite: 30000, serviceBus: 28410, gateway: 28787 };
const STATE = join(REPO_ROOT, 'target', 'bench-compare');
const FIRST_PORT = 29860;

/** bench/run's oha: $OHA_BIN, else where bench/run installs it. */
export function ohaBin() {
  const tools = process.env.AEG_TOOLS ?? join(homedir(), '.cache', 'azure-edge-gateway', 'tools');
  const bin = process.env.OHA_BIN ?? join(tools, 'oha-1.16.0', 'bin', 'oha');
  if (!existsSync(bin)) throw new Error(`no oha at ${bin}: run bench/run once (it installs oha) or set OHA_BIN`);
  return bin;
}

/** Runs oha (`bin`) with args (plus JSON output); resolves its parsed JSON report. */
export function oha(bin, args) {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ['--no-tui', '--output-format', 'json', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { err += d; });
    child.once('error', reject);
    child.once('exit', (code) => {
      if (code !== 0) return reject(new Error(`oha exited ${code}: ${err.slice(-2000)}`));
      try { resolve(JSON.parse(out)); } catch (e) { reject(new Error(`oha output is not JSON: ${e.message}\n${out.slice(0, 500)}`)); }
    });
  });
}

/** The 1 KB JSON body of the bench's writes, written under `dir`. */
export function body1k(dir) {
  const path = join(dir, 'body-1k.json');
  const skeleton = JSON.stringify({ order: 1, sku: 'ABC-123', qty: 1, pad: '' });
  writeFileSync(path, JSON.stringify({ order: 1, sku: 'ABC-123', qty: 1, pad: 'x'.repeat(1024 - skeleton.length) }));
  return path;
}

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); return s[s.length >> 1]; };

async function main() {
  const [scenarioName, ...specs] = process.argv.slice(2);
  const bin = ohaBin();
  mkdirSync(STATE, { recursive: true });
  const scenario = benchScenarios(body1k(STATE))[scenarioName];
  if (!scenario || specs.some((s) => !s.includes('='))) {
    console.error('usage: node bench/compare.mjs <404|sb|sb-single|sbhold|rest|blob1k|eh> [name=dir ...]');
    process.exit(2);
  }
  const rounds = Number(process.env.COMPARE_ROUNDS ?? 7);
  const seconds = Number(process.env.COMPARE_SECONDS ?? 2);
  const concurrency = String(process.env.COMPARE_CONCURRENCY ?? 16);
  // A fixed rate (req/s) instead of as fast as they go: every way then gets the same load, and
  // its CPU per request does not depend on how fast the stand-ins answer.
  const rate = process.env.COMPARE_QPS ? ['-q', String(Number(process.env.COMPARE_QPS))] : [];
  const stack = await startStack({ policyPath: join(REPO_ROOT, 'bench', 'policy.json'), ports: BENCH_STACK_PORTS, stateDir: STATE, gateway: false, serviceBus: { entities: BENCH_SB_ENTITIES }, log: () => {} });
  const pinning = cpuPinning();
  pinning.pinStack(stack);
  const workers = [];
  try {
    let port = FIRST_PORT;
    for (const [name, dir] of [['peer', null], ...specs.map((s) => s.split('='))]) {
      const peer = name.startsWith('peer');
      const options = benchWorker(stack, { way: peer ? 'peer' : 'gateway', entry: dir ? join(dir, 'index.js') : undefined, port: port++, stateDir: join(STATE, name), name });
      const w = await pinning.startWorkerd(options);
      workers.push({ name, peer, w, cpu: [], rps: [] });
    }
    for (const x of workers) await oha(bin, ['-z', '1s', '-c', concurrency, ...scenario.args(x.w.url, x.peer)]);
    for (let r = 0; r < rounds; r++) {
      for (const x of workers) {
        const cpu0 = x.w.cpuMs();
        const o = await oha(bin, ['-z', `${seconds}s`, '-c', concurrency, ...rate, '-w', '-t', '30s', ...scenario.args(x.w.url, x.peer)]);
        const codes = o.statusCodeDistribution ?? {};
        const requests = Object.values(codes).reduce((a, b) => a + b, 0);
        const bad = Object.entries(codes).filter(([k]) => isError(scenario.expect, k));
        if (bad.length || Object.keys(o.errorDistribution ?? {}).length) throw new Error(`${x.name}: ${JSON.stringify(codes)} ${JSON.stringify(o.errorDistribution)}\n${x.w.tail(10)}`);
        x.cpu.push(((x.w.cpuMs() - cpu0) * 1000) / Math.max(requests, 1));
        x.rps.push(o.summary.requestsPerSec);
      }
    }
    const ref = median(workers[0].cpu);
    const refRps = median(workers[0].rps);
    console.log(`${scenario.label}: ${rounds} alternating rounds of ${seconds} s at concurrency ${concurrency}${rate.length ? `, ${rate[1]} req/s` : ''}${pinning.cpus ? `, workers on CPU ${pinning.cpus.workers}` : ', unpinned'}`);
    for (const x of workers) {
      console.log(`${x.name.padEnd(12)} CPU µs/req ${x.cpu.map((v) => v.toFixed(1)).join(' ')}  median ${median(x.cpu).toFixed(1)} (×${(median(x.cpu) / ref).toFixed(3)})  req/s ${median(x.rps).toFixed(0)} (×${(median(x.rps) / refRps).toFixed(3)})`);
    }
  } finally {
    for (const x of workers) await x.w.stop().catch(() => {});
    await stack.stop();
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e) => {
    console.error(e.message);
    process.exit(1);
  });
}

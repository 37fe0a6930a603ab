/**
 * A built worker on bare workerd (what Cloudflare runs), without wrangler dev: no entry proxy (a
 * second workerd) and no Node process carrying the log lines, both of which cost more CPU per
 * request than a small worker itself (see bench/README.md, "Bare workerd").
 *
 * startWorkerd() writes a Cap'n Proto config next to its state (`<stateDir>/config.capnp`) that
 * - serves HTTP on 127.0.0.1:<port> (socket "http" → service "main");
 * - runs the entry as an ES module worker with the compatibility date and flags given (read them
 *   from a wrangler.toml with compatFromWranglerToml), its modules named as the entry imports
 *   them: every relative `import … from "./x"` / `import("./x")` of the entry (and of the JS
 *   modules it imports) becomes a module named by its path relative to the entry's directory,
 *   `.wasm` as a compiled wasm module, `.js`/`.mjs` as ES modules, `.json` as JSON, others as data;
 * - binds `text` as text bindings and `fromEnv` as fromEnvironment bindings (secrets: their
 *   values reach workerd in its environment, never in the config file);
 * - gives the worker one outbound service, "loopback": a network limited to 127.0.0.0/8 and ::1
 *   that trusts the PEM certificates of `caCertPaths` (Azurite's self-signed one), and no browser CAs.
 * Modules and certificates are `embed`ded from where they are (paths relative to the config), so
 * the worker run is exactly the files scripts/build produced.
 *
 * workerd runs in its own process group (spawnService); its stdout and stderr (console.log of the
 * worker) go to `<stateDir>/workerd.log` through the shell that execs it, so the kernel drains
 * them and nothing parses them during a load; read the file afterwards (logLines()).
 * Returns { url, pid, configPath, logPath, cpuMs(), rssKb(), logLines(), logRead(), logSize(), tail(), exited, stop }.
 */
import { execFileSync, spawn } from 'node:child_process';
import { closeSync, existsSync, fstatSync, mkdirSync, openSync, readFileSync, readSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, extname, join, relative, resolve } from 'node:path';
import { availableParallelism } from 'node:os';
import { NODE_BIN, REPO_ROOT, spawnService, waitUntil } from '../dev/proc.mjs';

export const WORKERD_BIN = join(REPO_ROOT, 'node_modules', 'workerd', 'bin', 'workerd');
const TICK_MS = 1000 / Number(execFileSync('getconf', ['CLK_TCK']).toString().trim() || 100);

/** compatibility_date and compatibility_flags of a wrangler.toml (top-level keys). */
export function compatFromWranglerToml(path) {
  const toml = readFileSync(path, 'utf8');
  const date = /^\s*compatibility_date\s*=\s*["']([^"']+)["']/m.exec(toml)?.[1];
  if (!date) throw new Error(`${path} has no compatibility_date`);
  const flagsText = /^\s*compatibility_flags\s*=\s*\[([^\]]*)\]/m.exec(toml)?.[1] ?? '';
  const flags = [...flagsText.matchAll(/["']([^"']+)["']/g)].map((m) => m[1]);
  return { compatibilityDate: date, compatibilityFlags: flags };
}

/** The entry and every module it imports by relative path, as [{ name, path, type }], entry first. */
export function workerModules(entryPath) {
  const entry = resolve(entryPath);
  const root = dirname(entry);
  const seen = new Map();
  const visit = (path) => {
    const name = relative(root, path).split('\\').join('/');
    if (seen.has(name)) return;
    if (name.startsWith('..')) throw new Error(`module ${path} is outside the entry's directory ${root}`);
    if (!existsSync(path)) throw new Error(`module ${name} imported by the worker is missing (${path})`);
    const type = moduleType(path);
    seen.set(name, { name, path, type });
    if (type !== 'esModule') return;
    const source = readFileSync(path, 'utf8');
    const specifiers = [
      ...source.matchAll(/\bfrom\s*["'](\.{1,2}\/[^"']+)["']/g),
      ...source.matchAll(/\bimport\s*\(\s*["'](\.{1,2}\/[^"']+)["']\s*\)/g),
      ...source.matchAll(/\bimport\s*["'](\.{1,2}\/[^"']+)["']/g),
    ].map((m) => m[1]);
    for (const spec of specifiers) visit(resolve(dirname(path), spec));
  };
  visit(entry);
  return [...seen.values()];
}

function moduleType(path) {
  switch (extname(path)) {
    case '.js': case '.mjs': return 'esModule';
    case '.wasm': return 'wasm';
    case '.json': return 'json';
    case '.txt': case '.html': return 'text';
    default: return 'data';
  }
}

const capnpString = (s) => JSON.stringify(String(s)); // Cap'n Proto text literals use C escapes, JSON's are a subset

/** The config text for startWorkerd's options (exported for inspection and tests). */
export function workerdConfig({ configDir, entry, port, compatibilityDate, compatibilityFlags = [], text = {}, fromEnv = {}, caCertPaths = [], allow = ['127.0.0.0/8', '::1/128'], v8Flags = [] }) {
  const rel = (p) => capnpString(relative(configDir, p));
  const modules = workerModules(entry).map((m) => `    (name = ${capnpString(m.name)}, ${m.type} = embed ${rel(m.path)}),`);
  const bindings = [
    ...Object.entries(text).map(([k, v]) => `    (name = ${capnpString(k)}, text = ${capnpString(v)}),`),
    ...Object.entries(fromEnv).map(([k, v]) => `    (name = ${capnpString(k)}, fromEnvironment = ${capnpString(v)}),`),
  ];
  const certs = caCertPaths.map((p) => `embed ${rel(p)}`).join(', ');
  return `# Generated by bench/workerd.mjs: ${relative(REPO_ROOT, entry)} on bare workerd.
using Workerd = import "/workerd/workerd.capnp";

const config :Workerd.Config = (${v8Flags.length ? `
  v8Flags = [${v8Flags.map(capnpString).join(', ')}],` : ''}
  services = [
    (name = "main", worker = .mainWorker),
    (name = "loopback", network = (
      allow = [${allow.map(capnpString).join(', ')}],
      tlsOptions = (trustBrowserCas = false, trustedCertificates = [${certs}]),
    )),
  ],
  sockets = [
    (name = "http", address = ${capnpString(`127.0.0.1:${port}`)}, http = (), service = "main"),
  ],
);

const mainWorker :Workerd.Worker = (
  modules = [
${modules.join('\n')}
  ],
  compatibilityDate = ${capnpString(compatibilityDate)},
  compatibilityFlags = [${compatibilityFlags.map(capnpString).join(', ')}],
  bindings = [
${bindings.join('\n')}
  ],
  globalOutbound = "loopback",
);
`;
}

/**
 * CPU pinning for the bare-workerd measurements: the workers under measurement get the last CPU
 * to themselves and everything else (this process with the in-process issuer, the stand-ins,
 * Azurite, and oha, which inherits this process's affinity) the others, so that a worker's CPU
 * per request is not inflated by sharing its core with the load generator. Off (`cpus` null,
 * every method as if unpinned) with BENCH_WORKERD_PIN=0, one CPU, not Linux, or no `taskset`.
 * - pinStack(stack): this process and the stack's processes onto the other CPUs;
 * - startWorkerd(options): startWorkerd, the worker (all its threads) onto its CPU;
 * - release(): what pinStack pinned, back onto every CPU.
 */
export function cpuPinning(env = process.env) {
  const n = availableParallelism();
  const usable = env.BENCH_WORKERD_PIN !== '0' && process.platform === 'linux' && n >= 2 && (() => {
    try {
      execFileSync('taskset', ['-p', String(process.pid)], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  })();
  if (!usable) return { cpus: null, pinStack() {}, startWorkerd, release() {} };
  const last = n - 1;
  const cpus = { workers: String(last), others: last === 1 ? '0' : `0-${last - 1}` };
  const pin = (pid, set) => execFileSync('taskset', ['-a', '-p', '-c', set, String(pid)], { stdio: 'ignore' });
  const pinned = [];
  return {
    cpus,
    pinStack(stack) {
      for (const pid of [process.pid, stack.serviceBus?.pid, stack.azurite?.pid].filter(Boolean)) {
        pin(pid, cpus.others);
        pinned.push(pid);
      }
    },
    async startWorkerd(options) {
      const w = await startWorkerd(options);
      pin(w.pid, cpus.workers);
      return w;
    },
    release() {
      for (const pid of pinned.splice(0)) {
        try { pin(pid, `0-${last}`); } catch { /* it has exited */ }
      }
    },
  };
}

/** utime+stime (ms) of process `pid`, all its threads (the process total in /proc/PID/stat). */
export function processCpuMs(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) * TICK_MS;
}

/** VmRSS (kB) of process `pid`, 0 when it is gone. */
export function processRssKb(pid) {
  try {
    return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

/**
 * Sample the RSS of `pid` every intervalMs from a separate Node process, so that a busy event loop
 * here (an upload client) does not thin the samples. stop() resolves { samples, peakKb, maxGapMs,
 * series: [[ms since start, kB], …] }. The sampler exits when its stdin closes, or after maxMs.
 */
export function rssSampler(pid, { intervalMs = 20, maxMs = 300_000 } = {}) {
  const script = `
    const fs = require('node:fs');
    const pid = ${Number(pid)}, t0 = performance.now();
    let last = t0, maxGapMs = 0, peakKb = 0;
    const series = [];
    const read = () => { try { return Number(/VmRSS:\\s+(\\d+)/.exec(fs.readFileSync('/proc/' + pid + '/status', 'utf8'))[1]); } catch { return 0; } };
    const tick = () => { const now = performance.now(); maxGapMs = Math.max(maxGapMs, now - last); last = now; const kb = read(); peakKb = Math.max(peakKb, kb); series.push([Math.round(now - t0), kb]); };
    tick();
    const timer = setInterval(tick, ${Number(intervalMs)});
    const done = () => { clearInterval(timer); tick(); process.stdout.write(JSON.stringify({ samples: series.length, peakKb, maxGapMs, series })); process.exit(0); };
    process.stdin.on('data', () => {}); process.stdin.on('end', done);
    setTimeout(done, ${Number(maxMs)}).unref();
  `;
  const child = spawn(NODE_BIN, ['-e', script], { stdio: ['pipe', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (d) => { out += d; });
  const exited = new Promise((res) => child.once('exit', res));
  return {
    pid: child.pid,
    stop: async () => {
      child.stdin.end();
      await Promise.race([exited, new Promise((res) => setTimeout(res, 5_000))]);
      if (child.exitCode === null) child.kill('SIGKILL');
      return JSON.parse(out || '{"samples":0,"peakKb":0,"maxGapMs":null,"series":[]}');
    },
  };
}

/**
 * Start `entry` (a built worker's main module) on bare workerd on 127.0.0.1:port; resolves once
 * it answers any HTTP request. env: extra environment for workerd (the values of fromEnv).
 */
export async function startWorkerd({
  name = 'workerd', entry, port, stateDir, compatibilityDate, compatibilityFlags = [],
  text = {}, fromEnv = {}, env = {}, caCertPaths = [], allow, startTimeoutMs = 30_000, v8Flags = [],
}) {
  const dir = resolve(stateDir);
  mkdirSync(dir, { recursive: true });
  const configPath = join(dir, 'config.capnp');
  const logPath = join(dir, 'workerd.log');
  writeFileSync(configPath, workerdConfig({ configDir: dir, entry: resolve(entry), port, compatibilityDate, compatibilityFlags, text, fromEnv, caCertPaths, allow, v8Flags }));
  writeFileSync(logPath, '');
  for (const [binding, variable] of Object.entries(fromEnv)) {
    if (env[variable] === undefined) throw new Error(`startWorkerd: binding ${binding} reads $${variable}, which env does not set`);
  }
  // sh execs workerd (same PID, its own process group) with stdout+stderr appended to the log file.
  const service = spawnService({
    name,
    command: '/bin/sh',
    args: ['-c', 'exec "$0" serve "$1" >>"$2" 2>&1', WORKERD_BIN, basename(configPath), logPath],
    cwd: dir,
    env: { ...process.env, ...env },
  });
  const tail = (n = 30) => readFileSync(logPath, 'utf8').split('\n').slice(-n - 1).join('\n');
  const url = `http://127.0.0.1:${port}`;
  try {
    await waitUntil(async () => {
      if (!service.isRunning()) throw new Error('workerd exited');
      const res = await fetch(`${url}/__bench/ready`, { signal: AbortSignal.timeout(2_000) });
      await res.body?.cancel();
      return true;
    }, { timeoutMs: startTimeoutMs, intervalMs: 50, what: `${name} (workerd) on ${url}` });
  } catch (err) {
    await service.stop();
    err.message += `\n--- workerd output (${logPath}) ---\n${tail()}`;
    throw err;
  }
  return {
    name, url, pid: service.pid, configPath, logPath,
    cpuMs: () => processCpuMs(service.pid),
    rssKb: () => processRssKb(service.pid),
    /** The worker's JSON log lines (objects with duration_ms) written since byte `from` of the log. */
    logLines: (from = 0) => jsonLogLines(readFrom(logPath, from).toString('utf8')),
    /**
     * The complete lines written since byte `from` (only those: a line still being written is
     * left for the next read): { lines (the JSON log lines), next (the byte after the last
     * complete line), uncaught (lines of workerd's "Uncaught exception"), firstUncaught }. Reads only what is new, for reading the log round by round.
     */
    logRead: (from = 0) => {
      const buf = readFrom(logPath, from);
      const end = buf.lastIndexOf(10) + 1;
      const text = buf.subarray(0, end).toString('utf8');
      // workerd's own errors (an exception out of the fetch handler, answered 500 by workerd
      // without the worker's log line): how many, and the first.
      const uncaught = text.split('\n').filter((l) => l.includes('Uncaught exception'));
      return { lines: jsonLogLines(text), next: from + end, uncaught: uncaught.length, firstUncaught: uncaught[0] == null ? null : uncaught[0].length > 320 ? `${uncaught[0].slice(0, 200)} … ${uncaught[0].slice(-100)}` : uncaught[0] };
    },
    logSize: () => statSync(logPath).size,
    tail,
    exited: service.exited,
    isRunning: service.isRunning,
    stop: () => service.stop(),
  };
}

/** The bytes of file `path` from offset `from` to its current end. */
function readFrom(path, from) {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const buf = Buffer.alloc(Math.max(0, size - from));
    let got = 0;
    while (got < buf.length) {
      const n = readSync(fd, buf, got, buf.length - got, from + got);
      if (n === 0) break;
      got += n;
    }
    return buf.subarray(0, got);
  } finally {
    closeSync(fd);
  }
}

function jsonLogLines(text) {
  const out = [];
  for (const line of text.split('\n')) {
    const i = line.indexOf('{"');
    if (i < 0) continue;
    try {
      const v = JSON.parse(line.slice(i));
      if (v && typeof v === 'object' && 'duration_ms' in v) out.push(v);
    } catch { /* not a log line of the worker */ }
  }
  return out;
}

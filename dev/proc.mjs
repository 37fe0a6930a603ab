/**
 * Child-process plumbing shared by the local stack (Azurite, wrangler dev).
 *
 * Why: every service of the stack is a long-running child that must (a) be started with Node 22
 * and an offline wrangler environment, (b) have its output captured line by line so tests and the
 * orchestrator can read it, (c) be stopped reliably, together with its own children (wrangler
 * starts workerd), and never anything else. Children are spawned detached, so each leads its own
 * process group and `process.kill(-pid)` reaches exactly that group. A process 'exit' hook kills
 * any group still alive when the parent dies (test failure, Ctrl-C, uncaught error).
 */
import { execFileSync, spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as sleep } from 'node:timers/promises';

/** Repository root, computed from this file's location (dev/ is one level below it). */
export const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
/** Node 22 from the npm package `node`; wrangler and Azurite need it whatever PATH says. */
export const NODE_BIN = join(REPO_ROOT, 'node_modules', '.bin', 'node');

/** Environment that keeps wrangler offline and quiet (mirrors scripts/env.sh). */
export function offlineEnv(extra = {}) {
  const env = {
    ...process.env,
    PATH: `${join(REPO_ROOT, 'node_modules', '.bin')}:${process.env.PATH ?? ''}`,
    WRANGLER_SEND_METRICS: 'false',
    WRANGLER_SEND_ERROR_REPORTS: 'false',
    CLOUDFLARE_CF_FETCH_ENABLED: 'false',
    NO_UPDATE_NOTIFIER: '1',
    NO_COLOR: '1',
    FORCE_COLOR: '0',
    CI: '1',
    ...extra,
  };
  for (const name of ['CLOUDFLARE_API_TOKEN', 'CLOUDFLARE_ACCOUNT_ID', 'CF_API_TOKEN']) delete env[name];
  return env;
}

/** A promise of `value` after ms that does not keep the process alive (for Promise.race). */
export const after = (ms, value) => sleep(ms, value, { ref: false });

const live = new Set();
process.once('exit', () => {
  for (const pid of live) killGroup(pid, 'SIGKILL');
});

function killGroup(pid, signal) {
  try {
    process.kill(-pid, signal);
    return true;
  } catch {
    return false; // already gone
  }
}

/** Poll `probe` until it returns a truthy value or `timeoutMs` passes; throws with `what` on timeout. */
export async function waitUntil(probe, { timeoutMs, intervalMs = 200, what }) {
  const deadline = Date.now() + timeoutMs;
  let lastError;
  while (Date.now() < deadline) {
    try {
      const value = await probe();
      if (value) return value;
    } catch (err) {
      lastError = err;
    }
    await sleep(intervalMs);
  }
  const cause = lastError ? `: ${lastError.message}` : '';
  throw new Error(`${what} not ready after ${timeoutMs} ms${cause}`);
}

/**
 * Spawn a service in its own process group and capture its output.
 * Returns { pid, logs, waitForLog, exited, tail, stop }.
 * - logs: every stdout/stderr line, in order (ANSI colour codes stripped).
 * - waitForLog(predicate, timeoutMs, { from }): first line at index >= from for which
 *   predicate(line, json) is truthy; json is the line parsed as JSON or null.
 * - exited: a promise of { code, signal } when the child ends.
 * onLine(line), when given, sees each line as it arrives (to echo it live).
 */
export function spawnService({ name, command, args, env, cwd, onLine: echo }) {
  const child = spawn(command, args, { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  const logs = [];
  const lines = new EventEmitter();
  lines.setMaxListeners(0);
  const onLine = (line) => {
    logs.push(line);
    echo?.(line);
    lines.emit('line', line);
  };
  captureLines(child.stdout, onLine);
  captureLines(child.stderr, onLine);

  let exitInfo = null;
  const exited = new Promise((resolveExit) => {
    child.once('exit', (code, signal) => {
      exitInfo = { code, signal };
      live.delete(child.pid);
      lines.emit('exit', exitInfo);
      resolveExit(exitInfo);
    });
    child.once('error', (err) => {
      onLine(`[${name}] spawn error: ${err.message}`);
      exitInfo = { code: -1, signal: null };
      resolveExit(exitInfo);
    });
  });
  if (child.pid) live.add(child.pid);

  const waitForLog = (predicate, timeoutMs = 10_000, { from = 0 } = {}) =>
    new Promise((resolveWait, rejectWait) => {
      const test = (line) => predicate(line, parseJson(line));
      const hit = logs.slice(from).find(test);
      if (hit !== undefined) return resolveWait(hit);
      const cleanup = () => {
        clearTimeout(timer);
        lines.off('line', onNew);
        lines.off('exit', onExit);
      };
      const onNew = (line) => {
        if (test(line)) {
          cleanup();
          resolveWait(line);
        }
      };
      const onExit = () => {
        cleanup();
        rejectWait(new Error(`${name} exited while waiting for a log line`));
      };
      const timer = setTimeout(() => {
        cleanup();
        rejectWait(new Error(`${name}: no matching log line within ${timeoutMs} ms`));
      }, timeoutMs);
      lines.on('line', onNew);
      lines.once('exit', onExit);
    });

  /** Stop the process group: SIGTERM, then SIGKILL after graceMs. Idempotent. */
  const stop = async (graceMs = 5_000) => {
    if (exitInfo || !child.pid) return;
    killGroup(child.pid, 'SIGTERM');
    const timedOut = Symbol('timeout');
    const result = await Promise.race([exited, after(graceMs, timedOut)]);
    if (result === timedOut) {
      killGroup(child.pid, 'SIGKILL');
      await Promise.race([exited, after(2_000)]);
    }
    // Grandchildren that ignored SIGTERM (workerd) still share the group id.
    killGroup(child.pid, 'SIGKILL');
  };

  const tail = (n = 20) => logs.slice(-n).join('\n');
  return { pid: child.pid, logs, waitForLog, exited, isRunning: () => !exitInfo, tail, stop };
}

function captureLines(stream, onLine) {
  let pending = '';
  stream.setEncoding('utf8');
  stream.on('data', (chunk) => {
    pending += chunk;
    const parts = pending.split(/\r?\n/);
    pending = parts.pop();
    for (const part of parts) onLine(stripAnsi(part));
  });
  stream.on('end', () => {
    if (pending) onLine(stripAnsi(pending));
  });
}

// eslint-disable-next-line no-control-regex
const stripAnsi = (text) => text.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '');

function parseJson(line) {
  const start = line.indexOf('{');
  if (start < 0) return null;
  try {
    return JSON.parse(line.slice(start));
  } catch {
    return null;
  }
}

/** The `/proc/{pid}/stat` fields (after the command) of every workerd process in process group `pgid`. */
function workerdStats(pgid) {
  const found = [];
  for (const pid of readdirSync('/proc').filter((d) => /^\d+$/.test(d))) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(fields[2]) !== pgid) continue;
      if (!readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('workerd')) continue;
      found.push({ pid, fields });
    } catch { /* gone */ }
  }
  return found;
}

/** Resident memory (kB) of every workerd process in process group `pgid` (a `wrangler dev` started by spawnService). */
export function workerdRss(pgid) {
  let total = 0;
  for (const { pid } of workerdStats(pgid)) {
    try {
      total += Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? 0);
    } catch { /* gone */ }
  }
  return total;
}

const TICK_MS = 1000 / (Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100);

/** CPU time (user + system, ms, at the clock tick's resolution) of the workerd processes in process group `pgid`. */
export function workerdCpuMs(pgid) {
  return workerdStats(pgid).reduce((ms, { fields }) => ms + (Number(fields[11]) + Number(fields[12])) * TICK_MS, 0);
}

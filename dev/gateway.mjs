/**
 * The gateway worker under `wrangler dev --local`, built with a chosen policy, for the local stack.
 *
 * Why a state directory: each stack (dev on 8787, tests on other ports) may bundle a different
 * policy, so the worker is built into `<stateDir>/build` (scripts/build with GATEWAY_POLICY) and
 * run from a copy of the repository's wrangler.toml placed in `<stateDir>` without its [build]
 * section (wrangler must not rebuild into the repository). Secrets go to `<stateDir>/.dev.vars`,
 * which wrangler reads next to the config it is given.
 *
 * Why NODE_EXTRA_CA_CERTS: miniflare (node_modules/miniflare/dist/src/index.js, the `internet`
 * network service of the workerd config) reads that file when it loads and adds every PEM
 * certificate in it to workerd's `tlsOptions.trustedCertificates` for outbound fetch. That is how
 * the worker trusts the self-signed certificate of the local Azurite (and any other local TLS
 * stand-in): pass their certificate paths as `caCertPaths`.
 */
import { mkdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { createServer } from 'node:net';
import { join, resolve } from 'node:path';
import { NODE_BIN, REPO_ROOT, after, offlineEnv, spawnService, waitUntil } from './proc.mjs';

const WRANGLER_JS = join(REPO_ROOT, 'node_modules', 'wrangler', 'bin', 'wrangler.js');
const BUILD_SCRIPT = join(REPO_ROOT, 'scripts', 'build');

/**
 * Build and start the gateway. Returns { url, logs, buildLogs, pid (of wrangler, the leader of
 * the process group workerd runs in), waitForLog, tail, exited, stop }.
 * - vars: plain-text Worker vars (passed as --var); secrets: written to .dev.vars.
 * - caCertPaths: PEM files the worker must trust for outbound HTTPS (bundled into one file).
 * - env: extra environment for wrangler. build: false reuses an existing <stateDir>/build.
 * - onLog(line): sees each wrangler/worker output line live (dev/up.mjs echoes them).
 * - wranglerToml / buildCommand: for running a stand-in worker; default the repository's.
 * - extraToml: TOML appended to the generated config (e.g. [[ratelimits]] bindings a test policy names).
 * - countCrossings: build with AEG_COUNT_CROSSINGS=1 (scripts/build), so each response carries
 *   x-wasm-crossings (tests/e2e/crossings.test.mjs). Off, the build runs with it unset whatever
 *   the environment says, and a build found instrumented is refused.
 * - sabotage: 'drop:N' | 'double:N' builds a deliberately broken gateway (AEG_SABOTAGE,
 *   scripts/sabotage.mjs) whose N-th message send is dropped or doubled; off (default), the build
 *   runs with it unset and a sabotaged build is refused.
 * - leanEntry: build with the lean entry (true, scripts/build's default) or with worker-build's
 *   entry (false, AEG_LEAN_ENTRY=0); default: as the environment says (so `AEG_LEAN_ENTRY=0
 *   scripts/test` runs every suite on worker-build's entry).
 * - frontConfig: the wrangler config of a test worker run in front of the gateway in the same
 *   `wrangler dev` (`-c front -c gateway`): it serves the port and reaches the gateway through a
 *   service binding, and shares wrangler's simulated queues with it (a queue exists only inside
 *   one wrangler dev). tests/e2e/dead-letters.test.mjs reads the dead-letter queue this way.
 */
export async function startGateway({
  policyPath,
  port = 8787,
  stateDir,
  vars = {},
  secrets = {},
  env = {},
  caCertPaths = [],
  build = true,
  wranglerToml = join(REPO_ROOT, 'wrangler.toml'),
  buildCommand = BUILD_SCRIPT,
  extraToml = '',
  countCrossings = false,
  sabotage = null,
  leanEntry,
  frontConfig,
  buildTimeoutMs = 300_000,
  startTimeoutMs = 30_000,
  onLog,
}) {
  const dir = resolve(stateDir);
  mkdirSync(dir, { recursive: true });
  await assertPortFree(port);

  const buildLogs = build
    ? await buildWorker({ policyPath, dir, buildCommand, timeoutMs: buildTimeoutMs, onLog, countCrossings, sabotage, leanEntry })
    : [];
  assertInstrumentation(join(dir, 'build', 'index.js'), countCrossings, build);
  assertSabotage(join(dir, 'build', 'index.js'), sabotage);
  const configPath = writeWranglerConfig(wranglerToml, dir, extraToml);
  writeDevVars(join(dir, '.dev.vars'), secrets);
  const extraCa = writeCaBundle(join(dir, 'extra-ca.pem'), caCertPaths);

  const wrangler = spawnService({
    name: 'wrangler',
    command: NODE_BIN,
    args: [
      WRANGLER_JS, 'dev',
      ...(frontConfig ? ['--config', resolve(frontConfig)] : []),
      '--config', configPath,
      '--ip', '127.0.0.1', '--port', String(port),
      '--inspector-ip', '127.0.0.1',
      '--local',
      '--show-interactive-dev-session=false',
      '--persist-to', join(dir, 'wrangler-state'),
      ...Object.entries(vars).flatMap(([k, v]) => ['--var', `${k}:${v}`]),
    ],
    cwd: dir,
    env: offlineEnv({
      WRANGLER_LOG_PATH: join(dir, 'wrangler-logs'),
      ...(extraCa ? { NODE_EXTRA_CA_CERTS: extraCa } : {}),
      ...env,
    }),
    onLine: onLog,
  });

  const url = `http://127.0.0.1:${port}`;
  try {
    await waitUntil(async () => {
      if (!wrangler.isRunning()) throw new Error('wrangler exited');
      return (await httpStatus(`${url}/__stack/ready`)) > 0; // any answer; the worker logs it as a 404
    }, { timeoutMs: startTimeoutMs, what: `wrangler dev on ${url}` });
  } catch (err) {
    await wrangler.stop();
    err.message += `\n--- wrangler output ---\n${wrangler.tail(30)}`;
    throw err;
  }
  return {
    url, logs: wrangler.logs, buildLogs, pid: wrangler.pid,
    waitForLog: wrangler.waitForLog, tail: wrangler.tail, exited: wrangler.exited,
    stop: () => wrangler.stop(),
  };
}

/** scripts/build --out-dir <dir>/build with GATEWAY_POLICY; resolves its output lines or throws. */
export async function buildWorker({ policyPath, dir, buildCommand = BUILD_SCRIPT, timeoutMs = 300_000, onLog, countCrossings, sabotage, leanEntry }) {
  if (!policyPath) throw new Error('startGateway: policyPath is required');
  const policy = resolve(policyPath);
  if (!existsSync(policy)) throw new Error(`policy file not found: ${policy}`);
  const proc = spawnService({
    name: 'build',
    command: buildCommand,
    args: ['--out-dir', join(dir, 'build')],
    cwd: REPO_ROOT,
    env: offlineEnv({
      GATEWAY_POLICY: policy,
      AEG_COUNT_CROSSINGS: countCrossings ? '1' : '',
      AEG_SABOTAGE: sabotage ?? '',
      ...(leanEntry === undefined ? {} : { AEG_LEAN_ENTRY: leanEntry ? '1' : '0' }),
    }),
    onLine: onLog && ((line) => onLog(`[build] ${line}`)),
  });
  const result = await Promise.race([proc.exited, after(timeoutMs, 'timeout')]);
  if (result === 'timeout') {
    await proc.stop();
    throw new Error(`worker build did not finish within ${timeoutMs} ms\n--- build output ---\n${proc.tail(30)}`);
  }
  if (result.code !== 0) {
    throw new Error(`worker build failed (exit ${result.code ?? result.signal})\n--- build output ---\n${proc.tail(30)}`);
  }
  return proc.logs;
}

/**
 * The crossing counter (scripts/instrument-crossings.mjs) is in the built worker exactly when it
 * was asked for; an instrumented build left in a state dir is never run as a normal one.
 */
function assertInstrumentation(indexPath, countCrossings, built) {
  if (!existsSync(indexPath)) return; // a stand-in worker built elsewhere; writeWranglerConfig checks main
  const instrumented = readFileSync(indexPath, 'utf8').includes('/* aeg:instrumented-crossings */');
  if (instrumented && !countCrossings) {
    throw new Error(`${indexPath} counts wasm->JS crossings (AEG_COUNT_CROSSINGS=1) but countCrossings is off: rebuild it`);
  }
  if (!instrumented && countCrossings && !built) {
    throw new Error(`${indexPath} is not instrumented: start with build: true and countCrossings: true`);
  }
  if (!instrumented && countCrossings) throw new Error(`the build with AEG_COUNT_CROSSINGS=1 did not instrument ${indexPath}`);
}

/** A sabotaged build (scripts/sabotage.mjs) runs only when asked for, and only then. */
function assertSabotage(indexPath, sabotage) {
  if (!existsSync(indexPath)) return;
  const sabotaged = readFileSync(indexPath, 'utf8').startsWith('/* aeg:sabotage */');
  if (sabotaged && !sabotage) throw new Error(`${indexPath} is a sabotaged build (AEG_SABOTAGE) but sabotage is off: rebuild it`);
  if (!sabotaged && sabotage) throw new Error(`${indexPath} is not sabotaged although sabotage ${sabotage} was asked for`);
}

/** Copy wrangler.toml into dir without its [build] section; check that `main` was built there. */
function writeWranglerConfig(sourcePath, dir, extraToml = '') {
  if (!existsSync(sourcePath)) throw new Error(`wrangler config not found: ${sourcePath}`);
  const toml = withoutBuildSection(readFileSync(sourcePath, 'utf8'));
  const main = /^\s*main\s*=\s*["']([^"']+)["']/m.exec(toml)?.[1];
  if (!main) throw new Error(`${sourcePath} has no main = "…"`);
  if (!existsSync(join(dir, main))) throw new Error(`built entry point ${join(dir, main)} is missing (main = "${main}")`);
  const target = join(dir, 'wrangler.toml');
  writeFileSync(target, `# Generated by dev/gateway.mjs from ${sourcePath}; [build] removed.\n${toml}\n${extraToml}`);
  return target;
}

/** Drop the [build] table (and [build.*] sub-tables, and top-level build.* keys) from TOML text. */
export function withoutBuildSection(toml) {
  const out = [];
  let inBuild = false;
  let sawTable = false;
  for (const line of toml.split('\n')) {
    const header = /^\s*\[\[?\s*([^\]\s]+)\s*\]\]?/.exec(line);
    if (header) {
      sawTable = true;
      inBuild = header[1] === 'build' || header[1].startsWith('build.');
      if (inBuild) continue;
    }
    if (inBuild) continue;
    if (!sawTable && /^\s*build(\.|\s*=)/.test(line)) continue;
    out.push(line);
  }
  return out.join('\n');
}

function writeDevVars(path, secrets) {
  const lines = Object.entries(secrets).map(([key, value]) => {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new Error(`invalid secret name ${key}`);
    // Double-quoted dotenv values turn \n back into newlines (PEM secrets have them).
    const text = String(value);
    if (/["\\]/.test(text)) throw new Error(`secret ${key} contains a quote or backslash`);
    return `${key}="${text.replace(/\r?\n/g, '\\n')}"`;
  });
  writeFileSync(path, lines.length ? `${lines.join('\n')}\n` : '', { mode: 0o600 });
}

/** Our certificates plus any NODE_EXTRA_CA_CERTS inherited from the environment (kept trusted). */
function writeCaBundle(path, certPaths) {
  if (!certPaths.length) return null;
  const inherited = process.env.NODE_EXTRA_CA_CERTS;
  const files = inherited && existsSync(inherited) ? [...certPaths, inherited] : certPaths;
  writeFileSync(path, files.map((p) => readFileSync(p, 'utf8').trim()).join('\n') + '\n');
  return path;
}

/** Fail fast if something already listens on the port (wrangler would otherwise pick another). */
function assertPortFree(port) {
  return new Promise((resolvePort, rejectPort) => {
    const probe = createServer();
    probe.once('error', (err) => rejectPort(new Error(`port ${port} on 127.0.0.1 is not free: ${err.code}`)));
    probe.listen(port, '127.0.0.1', () => probe.close(resolvePort));
  });
}

/** Status of GET url (any answer counts), 0 when nothing answers within 2 s. */
async function httpStatus(url) {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(2_000) });
    await res.body?.cancel();
    return res.status;
  } catch {
    return 0;
  }
}

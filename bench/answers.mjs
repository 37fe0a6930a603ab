/**
 * Memory of large answers and template bodies on bare workerd (what Cloudflare runs): the
 * gateway built with bench/answers-policy.json in front of a stub Azure API (dev/answers-stub.mjs)
 * that answers as large as it is asked to and counts what it sent and received.
 *
 * Each run starts a fresh workerd (bench/workerd.mjs), makes one small request (the token, the
 * isolate's first request), takes the RSS baseline (median over 0.5 s), then sends its requests at
 * once while a separate process samples workerd's RSS every 20 ms; it reports baseline, peak,
 * peak − baseline next to the isolate's 128 MB limit, RSS 0.5 s after, the statuses, the problem
 * types, and what the stub sent (answers) or received (bodies).
 *
 * Runs (BENCH_ANSWERS_RUNS, comma-separated; default all):
 *   get100       1 × projected GET of a 100 MB JSON answer (with Content-Length)
 *   get100c      1 × the same, chunked (no Content-Length: the edge cannot refuse it by its length)
 *   get10x16    16 × projected GETs of 10 MB answers, chunked, at once
 *   get100x16   16 × projected GETs of 100 MB answers, chunked, at once
 *   xml6x16     16 × POSTs of 1 MiB through an XML template that writes {body} six times
 *   b64x16      16 × POSTs of 700 KiB through an XML template with {body_base64} (within the limit)
 *   jsonx16     16 × POSTs of 900 KiB of text through a JSON body template ({"properties":{"text":"{body}"}})
 *   b64maxx16   16 × POSTs of 1 MiB (the default max_body_bytes) through the {body_base64} template
 *   callerx16   16 × POSTs of 1 MiB passed on as they are (`body: caller`): what holding a body costs
 *   xml2x16     16 × POSTs of 1,000,000 bytes through an XML template writing {body} twice: about
 *               2 MB built, just within the default max_built_body_bytes (twice max_body_bytes)
 * With --policy limits (bench/answers-limits-policy.json: routes that raise the new limits, which
 * older builds do not know), the runs marked `limits`:
 *   get1mx16    16 × projected GETs of 1,000,000-byte answers on a route with max_answer_bytes 1 MiB
 *               (the most a route may set)
 *   get1mcx16   16 × the same, chunked
 *   pass1mx16   16 × GETs of 1,000,000-byte answers streamed through unread, for reference
 *   b64max2mx16 16 × POSTs of 1,500,000 bytes through {body_base64} (2 MB built) with
 *               max_built_body_bytes 2 MiB (the most a route may set)
 * A watchdog kills workerd when its RSS passes BENCH_ANSWERS_MAX_RSS_MB (default 4096): the run then
 * says so instead of taking the machine down.
 *
 * Usage:
 *   source scripts/env.sh
 *   node bench/answers.mjs [--build DIR] [--label NAME] [--policy limits]
 * Without --build it builds the current tree (release, scripts/build) into
 * target/bench-answers/<label>/build; --build reuses a build (e.g. of an older commit, for "before").
 * Results: target/bench-answers/<label>/results.json and a markdown table on stdout.
 * Ports (127.0.0.1): issuer 24800, stub 24801, workerd 24802. Bounded: 180 s per run.
 */
import { request as httpRequest } from 'node:http';
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import { REPO_ROOT } from '../dev/proc.mjs';
import { buildWorker } from '../dev/gateway.mjs';
import { startIssuer } from '../dev/issuer.mjs';
import { startAnswersStub } from '../dev/answers-stub.mjs';
import { CLIENT_ID, TENANT } from '../dev/stack.mjs';
import { compatFromWranglerToml, cpuPinning, processRssKb, rssSampler } from './workerd.mjs';

const PORTS = { issuer: 24800, stub: 24801, workerd: 24802 };
const MB = 1_000_000;
const MiB = 1024 * 1024;
const ISOLATE_LIMIT_MB = 128;
const RUN_TIMEOUT_MS = 180_000;

const { values: args } = parseArgs({ options: { build: { type: 'string' }, label: { type: 'string', default: 'current' }, policy: { type: 'string', default: 'answers' } } });
const STATE = join(REPO_ROOT, 'target', 'bench-answers', args.label);
const POLICY = join(REPO_ROOT, 'bench', args.policy === 'limits' ? 'answers-limits-policy.json' : 'answers-policy.json');
const MAX_RSS_KB = Number(process.env.BENCH_ANSWERS_MAX_RSS_MB ?? 4096) * 1024;

const RUNS = {
  get100: { label: '1 × projected GET, 100 MB answer (Content-Length)', n: 1, req: () => ({ method: 'GET', path: `/projected/${100 * MB}` }) },
  get100c: { label: '1 × projected GET, 100 MB answer (chunked)', n: 1, req: () => ({ method: 'GET', path: `/projected-chunked/${100 * MB}` }) },
  get10x16: { label: '16 × projected GET, 10 MB answers (chunked)', n: 16, req: () => ({ method: 'GET', path: `/projected-chunked/${10 * MB}` }) },
  get100x16: { label: '16 × projected GET, 100 MB answers (chunked)', n: 16, req: () => ({ method: 'GET', path: `/projected-chunked/${100 * MB}` }) },
  xml6x16: { label: '16 × POST 1 MiB, XML template writing {body} 6 times', n: 16, req: () => ({ method: 'POST', path: '/xml-six', body: Buffer.alloc(MiB, 'x'), type: 'text/plain' }) },
  b64x16: { label: '16 × POST 700 KiB, XML template with {body_base64}', n: 16, req: () => ({ method: 'POST', path: '/xml-base64', body: randomBytes(700 * 1024), type: 'application/octet-stream' }) },
  jsonx16: { label: '16 × POST 900 KiB of text, JSON body template', n: 16, req: () => ({ method: 'POST', path: '/json-text', body: Buffer.alloc(900 * 1024, 'y'), type: 'text/plain' }) },
  b64maxx16: { label: '16 × POST 1 MiB (the default max_body_bytes), XML template with {body_base64}', n: 16, req: () => ({ method: 'POST', path: '/xml-base64', body: randomBytes(MiB), type: 'application/octet-stream' }) },
  callerx16: { label: '16 × POST 1 MiB passed on as it is (`body: caller`, held), for reference', n: 16, req: () => ({ method: 'POST', path: '/caller', body: randomBytes(MiB), type: 'application/octet-stream' }) },
  get1mx16: { policy: 'limits', label: '16 × projected GET, 1,000,000-byte answers (Content-Length), route max_answer_bytes 1 MiB (read and projected)', n: 16, req: () => ({ method: 'GET', path: `/projected-1m/${MB}` }) },
  get1mcx16: { policy: 'limits', label: '16 × the same, chunked (no Content-Length)', n: 16, req: () => ({ method: 'GET', path: `/projected-1m-chunked/${MB}` }) },
  pass1mx16: { policy: 'limits', label: '16 × GET, 1,000,000-byte answers streamed through unread (no project), for reference', n: 16, req: () => ({ method: 'GET', path: `/passthrough/${MB}` }) },
  b64max2mx16: { policy: 'limits', label: '16 × POST 1,500,000 bytes, {body_base64} template (2 MB built), max_built_body_bytes 2 MiB (the most a route may set)', n: 16, req: () => ({ method: 'POST', path: '/xml-base64-2m', body: randomBytes(1.5 * MB), type: 'application/octet-stream' }) },
  xml2x16: { label: '16 × POST 1,000,000 bytes, XML template writing {body} twice (2 MB built)', n: 16, req: () => ({ method: 'POST', path: '/xml-twice', body: Buffer.alloc(MB, 'z'), type: 'text/plain' }) },
};

const median = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2; };

/** One request; resolves { status, type (problem type, if any), bytes, text (first 300 chars) } or { error }. */
function call(base, { method, path, body, type }, signal) {
  return new Promise((resolveCall) => {
    const headers = body ? { 'content-type': type, 'content-length': String(body.length) } : {};
    const req = httpRequest(`${base}${path}`, { method, headers, signal }, (res) => {
      const chunks = [];
      let bytes = 0;
      res.on('data', (d) => { bytes += d.length; if (bytes <= 65536) chunks.push(d); });
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let problem = null;
        try { problem = JSON.parse(text).type ?? null; } catch { /* not JSON */ }
        resolveCall({ status: res.statusCode, type: problem, bytes, text: text.slice(0, 300) });
      });
      res.on('error', (e) => resolveCall({ error: e.message }));
    });
    req.on('error', (e) => resolveCall({ error: e.message }));
    req.end(body);
  });
}

async function main() {
  const kind = args.policy === 'limits' ? 'limits' : undefined;
  const only = (process.env.BENCH_ANSWERS_RUNS ?? Object.keys(RUNS).filter((k) => RUNS[k].policy === kind).join(',')).split(',').map((s) => s.trim()).filter(Boolean);
  for (const name of only) if (!RUNS[name]) throw new Error(`unknown run ${name}; runs: ${Object.keys(RUNS).join(', ')}`);
  mkdirSync(STATE, { recursive: true });
  let buildDir = args.build ? resolve(args.build) : join(STATE, 'build');
  if (!args.build) {
    console.error(`building the gateway (release) with ${POLICY} into ${buildDir}`);
    await buildWorker({ policyPath: POLICY, dir: STATE });
    buildDir = join(STATE, 'build');
  }
  const clientSecret = randomBytes(32).toString('base64url');
  const issuer = await startIssuer({ port: PORTS.issuer, tenant: TENANT, clients: { [CLIENT_ID]: clientSecret } });
  const stub = await startAnswersStub({ port: PORTS.stub });
  const pinning = cpuPinning();
  pinning.pinStack({});
  const results = [];
  try {
    for (const name of only) {
      results.push(await run(name, RUNS[name], { buildDir, clientSecret, stub, startWorkerd: pinning.startWorkerd }));
    }
  } finally {
    pinning.release();
    await stub.stop();
    await issuer.stop();
  }
  const out = { label: args.label, build: buildDir, date: new Date().toISOString(), ports: PORTS, results };
  writeFileSync(join(STATE, 'results.json'), `${JSON.stringify(out, null, 2)}\n`);
  console.log(markdown(out));
  console.error(`results: ${join(STATE, 'results.json')}`);
}

async function run(name, spec, { buildDir, clientSecret, stub, startWorkerd }) {
  const secretVar = 'AEG_BENCH_CLIENT_SECRET';
  const worker = await startWorkerd({
    ...compatFromWranglerToml(join(REPO_ROOT, 'wrangler.toml')),
    name: `answers-${name}`, entry: join(buildDir, 'index.js'), port: PORTS.workerd,
    stateDir: join(STATE, 'workerd', name), env: { [secretVar]: clientSecret }, fromEnv: { DEV_CLIENT_SECRET: secretVar },
  });
  let killed = false;
  try {
    // The isolate's first request (and its token), then half a second of quiet for the baseline.
    const first = await call(worker.url, { method: 'GET', path: '/projected/1024' }, AbortSignal.timeout(30_000));
    if (first.status !== 200) throw new Error(`warm-up: ${JSON.stringify(first)}\n${worker.tail(10)}`);
    const quiet = [];
    for (let i = 0; i < 25; i++) { quiet.push(worker.rssKb()); await sleep(20); }
    const baselineKb = median(quiet);
    stub.clear();
    const requests = Array.from({ length: spec.n }, () => spec.req());
    const sampler = rssSampler(worker.pid, { intervalMs: 20, maxMs: RUN_TIMEOUT_MS + 10_000 });
    await sleep(100);
    const watchdog = setInterval(() => {
      if (processRssKb(worker.pid) > MAX_RSS_KB) {
        killed = true;
        try { process.kill(worker.pid, 'SIGKILL'); } catch { /* gone */ }
      }
    }, 20);
    const t0 = performance.now();
    const deadline = AbortSignal.timeout(RUN_TIMEOUT_MS);
    let answers;
    let sampled;
    try {
      answers = await Promise.all(requests.map((r) => call(worker.url, r, deadline)));
    } finally {
      clearInterval(watchdog);
      sampled = await sampler.stop();
    }
    const seconds = (performance.now() - t0) / 1000;
    await sleep(500);
    const afterKb = killed ? 0 : worker.rssKb();
    const seen = stub.requests();
    const tally = (xs) => Object.entries(xs.reduce((a, x) => { a[x] = (a[x] ?? 0) + 1; return a; }, {})).map(([k, v]) => `${v} × ${k}`).join(', ');
    const r = {
      run: name, label: spec.label, n: spec.n, seconds, killed,
      baselineMb: baselineKb / 1024, peakMb: Math.max(baselineKb, sampled.peakKb) / 1024,
      deltaMb: (Math.max(baselineKb, sampled.peakKb) - baselineKb) / 1024, afterMb: afterKb / 1024,
      isolateLimitMb: ISOLATE_LIMIT_MB, samples: sampled.samples, maxSampleGapMs: sampled.maxGapMs,
      statuses: tally(answers.map((a) => a.status ?? `error: ${a.error}`)),
      problems: tally(answers.filter((a) => a.type).map((a) => a.type.replace('urn:azure-edge-gateway:problem:', ''))),
      example: answers[0]?.text ?? answers[0]?.error,
      stubRequests: seen.length,
      stubSentMb: seen.reduce((a, s) => a + s.sentBytes, 0) / MB,
      stubReceivedMb: seen.reduce((a, s) => a + s.receivedBytes, 0) / MB,
      stubAborted: seen.filter((s) => s.aborted).length,
      rssSeries: sampled.series.filter((_, i) => i % 12 === 0).map(([t, kb]) => `${t}:${Math.round(kb / 1024)}`).join(' '),
    };
    console.error(`${name}: RSS ${r.baselineMb.toFixed(0)} → peak ${r.peakMb.toFixed(0)} MB (+${r.deltaMb.toFixed(0)})${killed ? ' KILLED by the watchdog' : ''}; ${r.statuses}; stub sent ${r.stubSentMb.toFixed(1)} MB, received ${r.stubReceivedMb.toFixed(1)} MB; ${seconds.toFixed(1)} s`);
    return r;
  } finally {
    await worker.stop();
  }
}

const f = (x, d = 0) => (x == null || Number.isNaN(x) ? '–' : x.toFixed(d));

function markdown(out) {
  const lines = [`Bare workerd, ${out.label} (${out.build}), ${out.date}`, ''];
  lines.push('| run | RSS baseline MB | peak MB | peak − baseline MB | of 128 MB | after MB | answers | problems | stub sent MB | stub received MB | s |');
  lines.push('|---|--:|--:|--:|--:|--:|---|---|--:|--:|--:|');
  for (const r of out.results) {
    const peak = r.killed ? `> ${f(r.peakMb)} (killed)` : f(r.peakMb);
    lines.push(`| ${r.label} | ${f(r.baselineMb)} | ${peak} | ${f(r.deltaMb)} | ${f((100 * r.deltaMb) / r.isolateLimitMb)} % | ${r.killed ? '–' : f(r.afterMb)} | ${r.statuses} | ${r.problems || '–'} | ${f(r.stubSentMb, 1)} | ${f(r.stubReceivedMb, 1)} | ${f(r.seconds, 1)} |`);
  }
  return lines.join('\n');
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});

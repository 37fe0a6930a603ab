/**
 * Calls from wasm into JavaScript per request (issue 11, item 3). The worker is built with
 * AEG_COUNT_CROSSINGS=1 (scripts/instrument-crossings.mjs): every function the wasm module imports
 * counts its calls, and each response carries x-wasm-crossings, the calls made from the request's
 * start until the worker returned its Response. Each request path below must stay within its
 * budget; lower a budget when the path gets cheaper, never raise it without a reason.
 *
 * Not counted: calls after the Response is returned (a streamed body, waitUntil work). The line
 * printed per path shows them as `after` (the next request's x-wasm-crossings-prior), for
 * information only. Requests are sequential: the counter is global to the isolate.
 *
 * Own ports and state dir (target/e2e/crossings): the instrumented build never replaces the
 * build another suite runs.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startStack } from './stack.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';
import { instrument, MARKER } from '../../scripts/instrument-crossings.mjs';
import { exportsVar } from '../../scripts/worker-glue.mjs';
import { leanEntry, MARKER as LEAN_MARKER } from '../../scripts/lean-entry.mjs';

/**
 * Crossings (wasm -> JS calls) allowed per request, by path. The target for a Service Bus
 * send was 20; it was 122 when this test was written (a 404: 28). JavaScript now drives each
 * request and the wasm decides, so a request costs the call that starts it (`edge:drive`), and a
 * fresh UUID for each one it needs past the first (which `drive` hands over with the head): a
 * Service Bus send without Idempotency-Key needs one for its request id and one for its MessageId.
 */
const BUDGET = {
  '404': 1,
  '405': 1,
  'servicebus-send-1k': 2,
  'servicebus-send-1k-api-key': 2,
  'blob-write-1k': 1,
  'blob-read-1k': 1,
};

/** AEG_CROSSINGS_VERBOSE=1 also prints every import each path calls, with its count. */
const VERBOSE = process.env.AEG_CROSSINGS_VERBOSE === '1';
const KEY = randomBytes(18).toString('base64url');
const BLOB = randomBytes(1024);
const MESSAGE = JSON.stringify({ order: BLOB.toString('hex').slice(0, 1024 - '{"order":""}'.length) }); // 1024 bytes
const report = [];
const STATE_DIR = join(REPO_ROOT, 'target', 'e2e', 'crossings');

describe('wasm -> JS crossings per request', () => {
  let stack;
  let gw;
  let written;
  /** One request of each path, by name: { method, path, headers, body, status }. */
  const requests = () => ({
    '404': { method: 'GET', path: '/nowhere/at/all', status: 404 },
    '405': { method: 'GET', path: '/orders/contoso', status: 405 },
    'servicebus-send-1k': {
      method: 'POST', path: '/orders/contoso', status: 202,
      headers: { 'content-type': 'application/json' }, body: MESSAGE,
    },
    'servicebus-send-1k-api-key': {
      method: 'POST', path: '/keyed/contoso', status: 202,
      headers: { 'content-type': 'application/json', 'x-api-key': KEY }, body: MESSAGE,
    },
    'blob-write-1k': {
      method: 'PUT', path: `/files/${randomBytes(8).toString('hex')}.bin`, status: 201,
      headers: { 'content-type': 'application/octet-stream' }, body: BLOB,
    },
    'blob-read-1k': { method: 'GET', path: `/files/${written}`, status: 200 },
  });
  /** Sends one request, reads its body; { status, text, crossings, top, prior }. */
  const send = async ({ method, path, headers = {}, body }) => {
    const res = await fetch(`${gw.url}${path}`, { method, headers, body });
    const bytes = Buffer.from(await res.arrayBuffer());
    const crossings = res.headers.get('x-wasm-crossings');
    return {
      status: res.status, text: bytes.toString('utf8'), bytes: bytes.length,
      crossings: crossings === null ? null : Number(crossings),
      top: res.headers.get('x-wasm-crossings-top'),
      all: res.headers.get('x-wasm-crossings-all'),
      prior: Number(res.headers.get('x-wasm-crossings-prior')),
    };
  };
  /** The crossings after the last response (its body, waitUntil work): the next request's prior count. */
  const afterLast = async () => {
    await sleep(50);
    return (await send({ method: 'GET', path: '/__crossings/probe' })).prior;
  };

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'crossings-policy.json'),
      ports: { issuer: 18600, azurite: 20200, serviceBus: 18610, gateway: 18796 },
      stateDir: STATE_DIR,
      serviceBus: { entities: ['orders'] },
      gatewaySecrets: { E2E_KEY: KEY },
      // worker-build's own entry (AEG_LEAN_ENTRY=0), so that the lean entry step's refusals below
      // are tried on the output it rewrites; the entry makes no wasm->JS calls either way.
      gatewayOptions: { countCrossings: true, leanEntry: false },
    });
    gw = stack.gateway;
    // A 1 KB blob to read back.
    const w = await send({ ...requests()['blob-write-1k'], path: '/files/read-me.bin' });
    assert.equal(w.status, 201, w.text);
    written = 'read-me.bin';
    // Warm-up, one request of each path: the isolate's first request loads the policy, the first
    // request of each audience fetches its token.
    for (const [name, req] of Object.entries(requests())) {
      const res = await send(req);
      assert.equal(res.status, req.status, `warm-up ${name}: ${res.text}`);
    }
  });
  after(async () => {
    await stack?.stop();
    if (!report.length) return;
    // What the labels in `top:` call (the import's JS glue, minified), from the instrumented build.
    const legend = JSON.parse(readFileSync(join(STATE_DIR, 'gateway', 'build', 'crossings-legend.json'), 'utf8'));
    const shown = new Set(report.flatMap((l) => [...l.matchAll(/([\w~]+)=\d+/g)].map((m) => m[1])));
    const lines = [...shown].sort().map((label) => `#   ${label}: ${legend[label]?.js ?? '?'}`);
    console.log(`\n${report.join('\n')}\n# crossings legend:\n${lines.join('\n')}`);
  });

  test('the instrumentation refuses a worker-build output of another shape, and a second run', () => {
    const build = join(STATE_DIR, 'gateway', 'build');
    const src = readFileSync(join(build, 'index.uninstrumented.js'), 'utf8');
    const wasm = join(build, 'index_bg.wasm');
    const { js } = instrument(src, wasm);
    assert.ok(js.includes(MARKER));
    assert.equal(js.match(/__aeg_countImports\(/g).length - 1, src.match(/new WebAssembly\.Instance\(/g).length, 'every instantiation is counted');
    const refused = (mutated, message) => assert.throws(() => instrument(mutated, wasm), message);
    refused(js, /already instrumented/);
    refused(src.replace('"./index_bg.js":{', '"./glue.js":{'), /import-object factory/);
    refused(src.replaceAll('new WebAssembly.Instance(', 'new WebAssembly.Instance( '), /WebAssembly\.Instance/);
    refused(src.replace(`${exportsVar(src, 'test')}.fetch(`, 'fetch2('), /wasm fetch export/);
  });

  test('the lean entry step refuses what it cannot rewrite faithfully', () => {
    const build = join(STATE_DIR, 'gateway', 'build');
    const src = readFileSync(join(build, 'index.uninstrumented.js'), 'utf8');
    // The stack is built with worker-build's own entry (leanEntry: false above), the glue this
    // step rewrites. A build that has the lean entry already leaves nothing to try it on: that
    // is a failure of the build, not a reason to skip.
    assert.ok(!src.includes(LEAN_MARKER), 'the worker was built with the lean entry although leanEntry: false (AEG_LEAN_ENTRY=0) was asked: the refusals below cannot be tried');
    const lean = leanEntry(src);
    assert.match(lean, /export\{[^}]*__aeg_lean_entry as default[^}]*\}/);
    assert.throws(() => leanEntry(lean), /already has the lean entry/);
    assert.throws(() => leanEntry(instrument(src, join(build, 'index_bg.wasm')).js), /run the lean entry step first/);
    const entry = /([A-Za-z_$][\w$]*)\.prototype\.fetch=function/.exec(src)[1];
    assert.throws(() => leanEntry(src.replace(`${entry}.prototype.fetch=`, `${entry}.prototype.scheduled=()=>{};${entry}.prototype.fetch=`)), /handlers the lean entry does not forward: scheduled/);
    assert.throws(() => leanEntry(src.replace('"Reinitializing Wasm application"', '"Reinitialising"')), /reinit check/);
  });

  for (const name of Object.keys(BUDGET)) {
    test(`${name}: at most ${BUDGET[name]} crossings`, async () => {
      const req = requests()[name];
      const res = await send(req);
      assert.equal(res.status, req.status, res.text);
      assert.equal(typeof res.crossings, 'number', 'no x-wasm-crossings header: the worker is not instrumented');
      if (name === 'blob-read-1k') assert.equal(res.bytes, BLOB.length);
      // The same request again counts the same: the figure is the path's, not a warm-up's.
      const again = await send(requests()[name]);
      const late = await afterLast();
      report.push(`# crossings: ${name} ${res.crossings} (budget ${BUDGET[name]}) top: ${res.top}; after the response: ${late}`);
      if (VERBOSE) report.push(`#   all: ${res.all}`);
      assert.equal(again.crossings, res.crossings, `${name}: ${res.crossings} then ${again.crossings} crossings`);
      assert.ok(res.crossings <= BUDGET[name], `${name}: ${res.crossings} crossings, budget ${BUDGET[name]} (top: ${res.top})`);
    });
  }
});

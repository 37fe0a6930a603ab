#!/usr/bin/env node
/**
 * Post-build step of scripts/build, only when AEG_COUNT_CROSSINGS=1: rewrites <out-dir>/index.js
 * so that the worker counts its calls from wasm into JavaScript (the crossings) per request.
 *
 *   node scripts/instrument-crossings.mjs <out-dir>
 *
 * What it changes, found by structure (scripts/worker-glue.mjs; the build fails when not found):
 * - every `new WebAssembly.Instance(m, factory())` gets `__aeg_countImports(factory())`, which
 *   replaces each function of the "./index_bg.js" namespace (what the wasm imports) with a
 *   wrapper that counts the call, in total and per import name. The reinstantiation after a
 *   critical error goes through the same call, so it is counted too;
 * - the JS wrapper of the wasm `fetch` export is wrapped: each request starts from zero, and the
 *   response carries
 *     x-wasm-crossings        calls from wasm into JS from the request's start until the worker
 *                             returned its Response (the wasm future resolved);
 *     x-wasm-crossings-top    the 5 most-called imports, `name=count` (names without the
 *                             `__wbg_` prefix and hash suffix);
 *     x-wasm-crossings-all    every import called, the same way, most-called first;
 *     x-wasm-crossings-prior  calls counted after the previous response was returned and before
 *                             this request started (a streamed body, waitUntil work, timers of
 *                             earlier requests; for the first request, the module's start).
 *   and <out-dir>/crossings-legend.json says, per label, the full import name and its JS glue;
 *   <out-dir>/index.uninstrumented.js keeps worker-build's file as it was.
 * Calls made after the response is returned belong to no request's x-wasm-crossings. The counter
 * is global to the isolate: concurrent requests mix their counts, so measure with sequential
 * requests.
 *
 * The result is for measurement only: never deploy it (scripts/build instruments nothing unless
 * AEG_COUNT_CROSSINGS=1, and a file instrumented twice is refused).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { escape, fetchWrapper, GlueError, instanceCalls, wasmImports } from './worker-glue.mjs';

const STEP = 'instrument-crossings';
export const MARKER = '/* aeg:instrumented-crossings */';

/**
 * Short labels for import names: `__wbg_<name>_<16 hex>` -> `<name>`, with `~<last 4 hex>` when two
 * imports share a name (e.g. two different `set`s); `__wbindgen_generic_000…05` -> `generic_5`;
 * other names as they are. Runs in the worker and here (for the legend), from one source.
 */
function __aeg_labels(names) {
  const short = new Map();
  for (const name of names) {
    const m = /^__wbg_(.+)_([0-9a-f]{16})$/.exec(name);
    const g = /^__wbindgen_generic_0*(\d+)$/.exec(name);
    short.set(name, m ? m[1] : g ? "generic_" + g[1] : name);
  }
  const seen = new Map();
  for (const s of short.values()) seen.set(s, (seen.get(s) || 0) + 1);
  const labels = new Map();
  for (const name of names) {
    const s = short.get(name);
    labels.set(name, seen.get(s) > 1 ? s + "~" + name.slice(-4) : s);
  }
  return labels;
}
const labelsSource = __aeg_labels.toString();

const RUNTIME = `${MARKER}
var __aeg_crossings = { total: 0, prior: 0, byName: new Map() };
function __aeg_countImports(imports) {
  if (!imports || typeof imports["./index_bg.js"] !== "object") throw new Error('instrument-crossings: the wasm import object has no "./index_bg.js" namespace');
  // Every namespace the wasm imports from: the glue's, and any snippet module's (their calls
  // are labelled "module:name").
  for (const key of Object.keys(imports)) {
    const ns = imports[key];
    if (!ns || typeof ns !== "object") continue;
    const glue = key === "./index_bg.js";
    const labels = glue ? __aeg_labels(Object.keys(ns)) : null;
    const wrapped = { __proto__: null };
    for (const name of Object.keys(ns)) {
      const f = ns[name];
      if (typeof f !== "function") { wrapped[name] = f; continue; }
      const label = glue ? labels.get(name) : key.slice(key.lastIndexOf("/") + 1).replace(".js", "") + ":" + name;
      wrapped[name] = function () {
        const c = __aeg_crossings;
        c.total++;
        c.byName.set(label, (c.byName.get(label) || 0) + 1);
        return f.apply(this, arguments);
      };
    }
    imports[key] = wrapped;
  }
  return imports;
}
${labelsSource}
function __aeg_wrapFetch(inner) {
  return function (request, env, ctx) {
    const c = __aeg_crossings;
    c.prior = c.total;
    c.total = 0;
    c.byName.clear();
    return Promise.resolve(inner.call(this, request, env, ctx)).then(__aeg_stamp);
  };
}
function __aeg_stamp(response) {
  const c = __aeg_crossings;
  const all = [...c.byName].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).map(([name, n]) => name + "=" + n);
  const headers = [
    ["x-wasm-crossings", String(c.total)],
    ["x-wasm-crossings-top", all.slice(0, 5).join(",")],
    ["x-wasm-crossings-all", all.join(",")],
    ["x-wasm-crossings-prior", String(c.prior)],
  ];
  // From here on, calls count towards the next request's x-wasm-crossings-prior.
  c.byName.clear();
  c.total = 0;
  try {
    for (const [k, v] of headers) response.headers.set(k, v);
    return response;
  } catch {
    const copy = new Response(response.body, response); // immutable headers (a fetched response)
    for (const [k, v] of headers) copy.headers.set(k, v);
    return copy;
  }
}
`;

export function instrument(src, wasmPath) {
  if (src.includes(MARKER)) throw new GlueError(STEP, 'index.js is already instrumented (run on a fresh worker-build output)', { shape: false });
  for (const name of ['__aeg_crossings', '__aeg_countImports', '__aeg_labels', '__aeg_wrapFetch', '__aeg_stamp']) {
    if (src.includes(name)) throw new GlueError(STEP, `index.js already uses the name ${name}`, { shape: false });
  }

  const calls = instanceCalls(src, STEP);
  // Every function the wasm imports must come from the factory: the glue's namespace by name, and
  // each snippet module as a whole namespace, so wrapping them all counts every crossing.
  const { glue: imports, modules } = wasmImports(wasmPath, STEP);
  const missing = imports.filter((name) => !src.includes(`${name}:`));
  if (missing.length) throw new GlueError(STEP, `the import factory does not provide ${missing.length} wasm import(s), e.g. ${missing.slice(0, 3).join(', ')}`);
  const absent = modules.filter((module) => !src.includes(`"${module}":`));
  if (absent.length) throw new GlueError(STEP, `the import factory does not provide the module(s) ${absent.join(', ')}`);
  const fetchFn = fetchWrapper(src, STEP);

  let out = src;
  for (const call of calls) {
    const re = new RegExp(`new WebAssembly\\.Instance\\(${escape(call.moduleVar)},${escape(call.factory)}\\(\\)\\)`, 'g');
    out = out.replace(re, () => `new WebAssembly.Instance(${call.moduleVar},__aeg_countImports(${call.factory}()))`);
  }
  // Function declarations are mutable bindings: every caller (the entry shim or the lean entry)
  // looks the name up at call time and gets the wrapper.
  return {
    js: `${RUNTIME}${out}\n${fetchFn}=__aeg_wrapFetch(${fetchFn});\n`,
    legend: legend(src, imports),
  };
}

/**
 * label -> { import, js }: each import's full name and the start of its JS glue (what it calls),
 * to read x-wasm-crossings-top by. The glue is the factory's text from the import's key to the next
 * import's key (the keys are the import names, so no parsing of the minified code).
 */
export function legend(src, imports) {
  const at = imports.map((name) => ({ name, index: src.indexOf(`${name}:`) })).sort((a, b) => a.index - b.index);
  const labels = __aeg_labels(imports);
  const out = {};
  at.forEach(({ name, index }, i) => {
    const end = i + 1 < at.length ? at[i + 1].index : index + 300;
    let js = src.slice(index + name.length + 1, end).replace(/,$/, '');
    if (js.length > 240) js = `${js.slice(0, 240)}…`;
    out[labels.get(name)] = { import: name, js };
  });
  return out;
}

function main() {
  const [outDir] = process.argv.slice(2);
  if (!outDir) {
    console.error('usage: node scripts/instrument-crossings.mjs <worker-build out dir>');
    process.exit(2);
  }
  const jsPath = join(outDir, 'index.js');
  try {
    const src = readFileSync(jsPath, 'utf8');
    const { js, legend: labels } = instrument(src, join(outDir, 'index_bg.wasm'));
    writeFileSync(join(outDir, 'index.uninstrumented.js'), src); // to diff, and for the test of this step
    writeFileSync(jsPath, js);
    writeFileSync(join(outDir, 'crossings-legend.json'), `${JSON.stringify(labels, null, 1)}\n`);
    console.error(`${STEP}: ${jsPath} now counts wasm->JS calls per request (x-wasm-crossings); for measurement only, never deploy it`);
  } catch (err) {
    console.error(err instanceof GlueError ? err.message : err);
    process.exit(1);
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) main();

#!/usr/bin/env node
/**
 * Post-build step of scripts/build, unless AEG_LEAN_ENTRY=0 (on by default since it measured ~5 us
 * of CPU per request less on bare workerd, bench/README.md):
 * replaces the default export of worker-build's entry shim with a plain module handler.
 *
 *   node scripts/lean-entry.mjs <out-dir>
 *
 * worker-build 0.8.7 exports `new Proxy(EntryClass, handler)`: workerd constructs the
 * WorkerEntrypoint class per request through a `construct` trap that runs the reinit check and
 * wraps the instance in a Proxy whose `get` trap wraps every method read (here `fetch`) in
 * another Proxy that runs the check again and marks a WebAssembly.RuntimeError thrown
 * synchronously as critical. The lean default export keeps that behaviour in one object:
 *
 *   export default { fetch(request, env, ctx) { reinitIfCritical(); try { return wasmFetch(request, env, ctx) }
 *                                                catch (e) { markIfCritical(e); throw e } } }
 *
 * calling the shim's own functions (found by structure, see scripts/worker-glue.mjs): the check
 * that logs "Reinitializing Wasm application" and reinstantiates the module after a critical
 * error, the marker the shim's global `error` listener calls, and wasm-bindgen's wrapper of the
 * wasm fetch export. Everything else (the other exports, the `error` listener, wasm-bindgen's own
 * termination check before each export call) is left as built. The build fails when the shim's
 * entry class has any handler besides `fetch` (and `start`, the `#[event(start)]` export, which
 * the module already runs at load and which workerd never calls on a module handler object).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { enclosingFunction, escape, fetchWrapper, GlueError, indexesOf } from './worker-glue.mjs';

const STEP = 'lean-entry';
export const MARKER = '/* aeg:lean-entry */';
const ID = '[A-Za-z_$][\\w$]*';

export function leanEntry(src) {
  if (src.includes(MARKER)) throw new GlueError(STEP, 'index.js already has the lean entry (run on a fresh worker-build output)', { shape: false });
  if (src.includes('__aeg_lean_entry')) throw new GlueError(STEP, 'index.js already uses the name __aeg_lean_entry', { shape: false });
  if (src.includes('/* aeg:instrumented-crossings */')) throw new GlueError(STEP, 'index.js is instrumented already: run the lean entry step first', { shape: false });

  const fetchFn = fetchWrapper(src, STEP);

  const reinitAt = indexesOf(src, '"Reinitializing Wasm application"');
  if (reinitAt.length !== 1) throw new GlueError(STEP, `expected one "Reinitializing Wasm application" (the shim's reinit check), found ${reinitAt.length}`);
  const reinit = enclosingFunction(src, reinitAt[0], STEP, 'the reinit check');
  if (!new RegExp(`function ${escape(reinit)}\\(\\)\\{`).test(src)) throw new GlueError(STEP, `the reinit check ${reinit} takes arguments`);

  const listener = [...src.matchAll(new RegExp(`addEventListener\\("error",\\(?(${ID})\\)?=>\\{(${ID})\\(\\1\\.error\\)\\}\\)`, 'g'))];
  if (listener.length !== 1) throw new GlueError(STEP, `expected one \`addEventListener("error", e => mark(e.error))\` (the shim's critical-error marker), found ${listener.length}`);
  const mark = listener[0][2];

  const entries = [...src.matchAll(new RegExp(`(${ID})\\.prototype\\.fetch=function\\((${ID})\\)\\{return (${ID})\\.call\\(this,\\2,this\\.env,this\\.ctx\\)\\}`, 'g'))];
  if (entries.length !== 1) throw new GlueError(STEP, `expected one \`<Entry>.prototype.fetch=function(r){return <wasmFetch>.call(this,r,this.env,this.ctx)}\`, found ${entries.length}`);
  const [, entryClass, , shimFetch] = entries[0];
  if (shimFetch !== fetchFn) throw new GlueError(STEP, `the entry's fetch calls ${shimFetch}, not the wasm fetch wrapper ${fetchFn}`);
  const handlers = new Set([...src.matchAll(new RegExp(`\\b${escape(entryClass)}\\.prototype\\.(${ID})=`, 'g'))].map((m) => m[1]));
  const unsupported = [...handlers].filter((h) => h !== 'fetch' && h !== 'start' && h !== 'queue');
  if (unsupported.length) throw new GlueError(STEP, `the entry class has handlers the lean entry does not forward: ${unsupported.join(', ')}`, { shape: false });

  // The queue handler (store-and-forward's consumer), forwarded like fetch when there is one.
  let queueFn = null;
  if (handlers.has('queue')) {
    const queues = [...src.matchAll(new RegExp(`${escape(entryClass)}\\.prototype\\.queue=function\\((${ID})\\)\\{return (${ID})\\.call\\(this,\\1,this\\.env,this\\.ctx\\)\\}`, 'g'))];
    if (queues.length !== 1) throw new GlueError(STEP, `expected one \`${entryClass}.prototype.queue=function(b){return <wasmQueue>.call(this,b,this.env,this.ctx)}\`, found ${queues.length}`);
    queueFn = queues[0][2];
  }

  const proxies = [...src.matchAll(new RegExp(`(${ID})=new Proxy\\(${escape(entryClass)},(${ID})\\)`, 'g'))];
  if (proxies.length !== 1) throw new GlueError(STEP, `expected one \`<default>=new Proxy(${entryClass}, <handler>)\`, found ${proxies.length}`);
  const proxied = proxies[0][1];

  const exportClauses = [...src.matchAll(/export\{([^}]*)\}/g)];
  if (exportClauses.length !== 1) throw new GlueError(STEP, `expected one \`export{…}\` clause, found ${exportClauses.length}`);
  const clause = exportClauses[0];
  const specifiers = clause[1].split(',');
  const dflt = specifiers.findIndex((s) => s.trim() === `${proxied} as default`);
  if (dflt < 0) throw new GlueError(STEP, `the default export is not ${proxied} (the Proxy of the entry class): export{${clause[1]}}`);
  specifiers[dflt] = '__aeg_lean_entry as default';
  const newClause = `export{${specifiers.join(',')}}`;

  const entry = `${MARKER}
const __aeg_lean_entry = {
  fetch(request, env, ctx) {
    ${reinit}();
    try {
      return ${fetchFn}(request, env, ctx);
    } catch (e) {
      ${mark}(e);
      throw e;
    }
  },${queueFn === null ? '' : `
  queue(batch, env, ctx) {
    ${reinit}();
    try {
      return ${queueFn}(batch, env, ctx);
    } catch (e) {
      ${mark}(e);
      throw e;
    }
  },`}
};
`;
  const start = clause.index;
  return `${src.slice(0, start)}${newClause}${src.slice(start + clause[0].length)}\n${entry}`;
}

function main() {
  const [outDir] = process.argv.slice(2);
  if (!outDir) {
    console.error('usage: node scripts/lean-entry.mjs <worker-build out dir>');
    process.exit(2);
  }
  const jsPath = join(outDir, 'index.js');
  try {
    writeFileSync(jsPath, leanEntry(readFileSync(jsPath, 'utf8')));
    console.error(`${STEP}: ${jsPath} now exports a plain { fetch } handler instead of the Proxy of the entry class`);
  } catch (err) {
    console.error(err instanceof GlueError ? err.message : err);
    process.exit(1);
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) main();

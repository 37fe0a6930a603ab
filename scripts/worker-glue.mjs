/**
 * Finds, by structure, the parts of worker-build's bundled `index.js` that the opt-in post-build
 * steps (scripts/instrument-crossings.mjs, scripts/lean-entry.mjs) rewrite. The file is one
 * esbuild-minified ES module: wasm-bindgen's glue (an import-object factory returning
 * `{__proto__:null,"./index_bg.js":{…}}`, the `new WebAssembly.Instance(module, factory())` calls,
 * one JS wrapper per wasm export) followed by worker-build's entry shim.
 *
 * Minified names change from build to build, so nothing here names them: every pattern is
 * anchored on what wasm-bindgen and worker-build always write (property names, strings, the
 * `.exports` read). When a pattern is not found, or found more often than expected, these
 * functions throw a GlueError that says what was looked for: worker-build's output changed and the
 * post-build step must be revisited, never silently skipped.
 */
import { readFileSync } from 'node:fs';

export class GlueError extends Error {
  constructor(step, message, { shape = true } = {}) {
    super(shape
      ? `${step}: ${message}\n${step}: worker-build's index.js no longer has the expected shape `
        + '(worker-build or wasm-bindgen changed?); the post-build step must be updated.'
      : `${step}: ${message}`);
    this.name = 'GlueError';
  }
}

const ID = '[A-Za-z_$][\\w$]*';

/** Every `new WebAssembly.Instance(<module>,<factory>())`: [{ index, text, moduleVar, factory }]. */
export function instanceCalls(src, step) {
  const re = new RegExp(`new WebAssembly\\.Instance\\((${ID}),(${ID})\\(\\)\\)`, 'g');
  const calls = [...src.matchAll(re)].map((m) => ({ index: m.index, text: m[0], moduleVar: m[1], factory: m[2] }));
  if (calls.length === 0) throw new GlueError(step, 'no `new WebAssembly.Instance(<module>, <factory>())` call found');
  const factories = new Set(calls.map((c) => c.factory));
  if (factories.size !== 1) throw new GlueError(step, `the wasm instance is built from ${factories.size} different import factories (${[...factories].join(', ')}), expected one`);
  const [factory] = factories;
  const decl = new RegExp(`function ${escape(factory)}\\(\\)\\{return\\{__proto__:null,"\\./index_bg\\.js":\\{`, 'g');
  const found = [...src.matchAll(decl)].length;
  if (found !== 1) throw new GlueError(step, `expected one \`function ${factory}(){return{__proto__:null,"./index_bg.js":{…}}}\` (the import-object factory), found ${found}`);
  return calls;
}

/** The variable holding the wasm exports: the `X` of `J=new WebAssembly.Instance(m,f()),X=J.exports`. */
export function exportsVar(src, step) {
  const re = new RegExp(`(${ID})=new WebAssembly\\.Instance\\(${ID},${ID}\\(\\)\\),(${ID})=\\1\\.exports`, 'g');
  const names = new Set([...src.matchAll(re)].map((m) => m[2]));
  if (names.size !== 1) throw new GlueError(step, `expected one variable assigned \`<instance>.exports\` after \`new WebAssembly.Instance\`, found ${names.size}`);
  return [...names][0];
}

/**
 * The JS wrapper of the wasm `fetch` export (`edge::fetch`): the one function
 * declaration whose body calls `<exports>.fetch(`. Returns its name.
 */
export function fetchWrapper(src, step) {
  const exp = exportsVar(src, step);
  const call = `${exp}.fetch(`;
  const hits = indexesOf(src, call);
  if (hits.length !== 1) throw new GlueError(step, `expected one call \`${call}…)\` (the wrapper of the wasm fetch export), found ${hits.length}`);
  return enclosingFunction(src, hits[0], step, `the call \`${call}…)\``);
}

/**
 * The name of the function declaration nearest before `index` (the one that contains it, in the
 * flat top-level layout of the minified glue).
 */
export function enclosingFunction(src, index, step, what) {
  const re = new RegExp(`function (${ID})\\(`, 'g');
  let name = null;
  for (const m of src.slice(0, index).matchAll(re)) name = m[1];
  if (!name) throw new GlueError(step, `no function declaration encloses ${what}`);
  return name;
}

/**
 * The functions the wasm module imports: `glue`, the names it takes from "./index_bg.js" (the
 * factory's own namespace), and `modules`, the other modules (wasm-bindgen snippets, such as the
 * edge's own JavaScript), which the factory supplies as whole namespaces.
 */
export function wasmImports(wasmPath, step) {
  const imports = parseImports(readFileSync(wasmPath), step).filter((i) => i.kind === 'function');
  return {
    glue: imports.filter((i) => i.module === './index_bg.js').map((i) => i.name),
    modules: [...new Set(imports.filter((i) => i.module !== './index_bg.js').map((i) => i.module))],
  };
}

/** The import section of a wasm binary: [{ module, name, kind }] (no compilation, so no feature flags needed). */
export function parseImports(bytes, step = 'wasm') {
  if (bytes.readUInt32LE(0) !== 0x6d736100) throw new GlueError(step, 'not a wasm binary (bad magic)');
  let pos = 8;
  const u32 = () => {
    let result = 0;
    let shift = 0;
    for (;;) {
      const byte = bytes[pos++];
      result += (byte & 0x7f) * 2 ** shift;
      if (!(byte & 0x80)) return result;
      shift += 7;
    }
  };
  const name = () => {
    const len = u32();
    const text = bytes.toString('utf8', pos, pos + len);
    pos += len;
    return text;
  };
  while (pos < bytes.length) {
    const id = bytes[pos++];
    const size = u32();
    const end = pos + size;
    if (id !== 2) {
      pos = end;
      continue;
    }
    const kinds = ['function', 'table', 'memory', 'global', 'tag'];
    const out = [];
    for (let n = u32(); n > 0; n--) {
      const module = name();
      const field = name();
      const kind = bytes[pos++];
      out.push({ module, name: field, kind: kinds[kind] ?? `kind ${kind}` });
      // Skip the import's type: its encoding depends on the kind; only the names matter here, and
      // the section's entries are parsed in order, so decode just enough to find the next entry.
      if (kind === 0) u32(); // type index
      else if (kind === 1) { pos++; limits(); } // reftype, limits
      else if (kind === 2) limits();
      else if (kind === 3) { valType(); pos++; } // valtype, mutability
      else if (kind === 4) { pos++; u32(); } // attribute, type index
      else throw new GlueError(step, `unknown import kind ${kind} in the wasm import section`);
    }
    if (pos !== end) throw new GlueError(step, 'could not parse the wasm import section');
    return out;
  }
  return [];

  function limits() {
    const flags = bytes[pos++];
    u32();
    if (flags & 1) u32();
  }
  function valType() {
    const t = bytes[pos++];
    // (ref null? ht) carries a heap type (a signed LEB): skip it.
    if (t === 0x63 || t === 0x64) u32();
  }
}

export function indexesOf(src, needle) {
  const out = [];
  for (let i = src.indexOf(needle); i >= 0; i = src.indexOf(needle, i + 1)) out.push(i);
  return out;
}

export function escape(name) {
  return name.replace(/\$/g, '\\$');
}

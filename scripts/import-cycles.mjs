#!/usr/bin/env node
/**
 * Import circles among the files of the core (crates/core/src): fails when a file depends,
 * through any chain of others, on itself.
 *
 *   node scripts/import-cycles.mjs [--edges] [src-dir]
 *
 * A file depends on the file that defines each module item it names in code: `use crate::a::b`
 * (every leaf of a use tree), paths in code (`crate::a::b::c(…)`, `super::x`, `self::x`, and
 * paths through a module brought in by `use` or a child module, `blob::f()`), each mapped to
 * the file of the innermost module the path walks through (`crate::backend::azure_rest::x` →
 * backend/azure_rest.rs; an inline `mod` belongs to its file). A name taken from a module root
 * (lib.rs or a mod.rs) is followed through that root's `pub use` re-exports, named or glob, to
 * the file that defines or re-exports it (`crate::policy::Foo` → policy/model.rs when
 * policy/mod.rs has `pub use model::*` and model.rs has Foo); a root's re-exports and every `mod`
 * declaration are no dependency. A re-export from any other file is a dependency of that file
 * and stops there: importing a type through a file that re-exports it depends on that file.
 *
 * Not counted: comments (doc links included), strings, items under `#[cfg(test)]` (the test
 * modules), `use` of a module alone (only the paths through it count), external crates.
 *
 * Prints every circle (strongly connected component of more than one file) with the
 * dependencies that close it, each with its first place (file:line and the path as written);
 * exits 1 when there is one, 0 otherwise. --edges also prints every file's dependencies.
 * No dependencies; a lexer and a shallow item parser, not a Rust parser.
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const args = process.argv.slice(2);
const showEdges = args.includes('--edges');
const rest = args.filter((a) => a !== '--edges');
const root = rest[0] ?? join(fileURLToPath(new URL('..', import.meta.url)), 'crates', 'core', 'src');

// ---- files and their module paths -----------------------------------------------------------

function rsFiles(dir) {
  const out = [];
  for (const name of readdirSync(dir).sort()) {
    const path = join(dir, name);
    if (statSync(path).isDirectory()) out.push(...rsFiles(path));
    else if (name.endsWith('.rs')) out.push(path);
  }
  return out;
}

/** lib.rs → [], a.rs → [a], a/mod.rs → [a], a/b.rs → [a, b]. */
function modulePathOf(rel) {
  const parts = rel.split(sep);
  const last = parts.pop().replace(/\.rs$/, '');
  if (parts.length === 0 && (last === 'lib' || last === 'main')) return [];
  if (last === 'mod') return parts;
  return [...parts, last];
}

// ---- lexer ----------------------------------------------------------------------------------

const IDENT = /[A-Za-z_][A-Za-z0-9_]*/y;

/** Tokens: { t: 'id' | 'p', v, line }; comments, strings and chars dropped; `::` one token. */
function lex(src) {
  const toks = [];
  let i = 0;
  let line = 1;
  const n = src.length;
  const count = (from, to) => {
    for (let k = from; k < to; k++) if (src.charCodeAt(k) === 10) line++;
  };
  while (i < n) {
    const c = src[i];
    if (c === '\n') { line++; i++; continue; }
    if (c === ' ' || c === '\t' || c === '\r') { i++; continue; }
    if (c === '/' && src[i + 1] === '/') {
      while (i < n && src[i] !== '\n') i++;
      continue;
    }
    if (c === '/' && src[i + 1] === '*') {
      let depth = 1;
      let j = i + 2;
      while (j < n && depth > 0) {
        if (src[j] === '/' && src[j + 1] === '*') { depth++; j += 2; }
        else if (src[j] === '*' && src[j + 1] === '/') { depth--; j += 2; }
        else j++;
      }
      count(i, j);
      i = j;
      continue;
    }
    // raw strings: r"…", r#"…"#, br#"…"#
    const raw = /(?:b|c)?r(#*)"/y;
    raw.lastIndex = i;
    const rm = raw.exec(src);
    if (rm) {
      const close = '"' + rm[1];
      const end = src.indexOf(close, i + rm[0].length);
      const j = end < 0 ? n : end + close.length;
      count(i, j);
      i = j;
      continue;
    }
    if (c === '"' || ((c === 'b' || c === 'c') && src[i + 1] === '"')) {
      let j = c === '"' ? i + 1 : i + 2;
      while (j < n && src[j] !== '"') j += src[j] === '\\' ? 2 : 1;
      count(i, j + 1);
      i = j + 1;
      continue;
    }
    if (c === "'" || (c === 'b' && src[i + 1] === "'")) {
      // a char literal ('x', '\n', '\u{..}', b'x') or a lifetime ('a, 'static)
      const s = c === 'b' ? i + 1 : i;
      const ch = /'(?:\\(?:u\{[0-9A-Fa-f_]*\}|x[0-9A-Fa-f]{2}|.)|[^\\'\n])'/y;
      ch.lastIndex = s;
      const m = ch.exec(src);
      if (m) { i = s + m[0].length; continue; }
      IDENT.lastIndex = s + 1;
      const lt = IDENT.exec(src);
      i = lt ? s + 1 + lt[0].length : s + 1;
      continue;
    }
    IDENT.lastIndex = i;
    const id = IDENT.exec(src);
    if (id) {
      toks.push({ t: 'id', v: id[0], line });
      i += id[0].length;
      continue;
    }
    if (/[0-9]/.test(c)) {
      const num = /[0-9][0-9A-Za-z_]*(?:\.[0-9][0-9A-Za-z_]*)?/y;
      num.lastIndex = i;
      i += num.exec(src)[0].length;
      continue;
    }
    if (c === ':' && src[i + 1] === ':') {
      toks.push({ t: 'p', v: '::', line });
      i += 2;
      continue;
    }
    toks.push({ t: 'p', v: c, line });
    i++;
  }
  return toks;
}

// ---- modules --------------------------------------------------------------------------------

/** name → module: { path, file, parent, children, defines, exported, reexports, globs, uses, paths, root } */
const modules = new Map();
const key = (path) => path.join('::');

function module(path, file, root) {
  const k = key(path);
  let m = modules.get(k);
  if (!m) {
    m = {
      path, file, root, children: new Map(), defines: new Set(), exported: new Set(),
      reexports: new Map(), globs: [], uses: [], paths: [], parent: null,
    };
    modules.set(k, m);
  }
  return m;
}

const ITEM = new Set(['fn', 'struct', 'enum', 'trait', 'type', 'const', 'static', 'union', 'mod']);

/** Parses one file into its module (and inline modules): items, uses and paths in code. */
function parseFile(file, rel) {
  const toks = lex(readFileSync(file, 'utf8'));
  const top = module(modulePathOf(rel), rel, false);
  // stack of brace contexts: { mod } for a module body, {} for any other block
  const stack = [{ mod: top }];
  const cur = () => {
    for (let k = stack.length - 1; k >= 0; k--) if (stack[k].mod) return stack[k].mod;
    return top;
  };
  const atTop = () => !!stack[stack.length - 1].mod;
  let i = 0;
  const at = (k, v) => toks[k] && toks[k].v === v;

  /** Skips the item starting at i (after a #[cfg(test)]): to `;`, `,` or the end of its block. */
  function skipItem() {
    let depth = 0;
    while (i < toks.length) {
      const v = toks[i].v;
      if (toks[i].t === 'p') {
        if (v === '{' || v === '(' || v === '[') depth++;
        else if (v === '}' || v === ')' || v === ']') {
          if (depth === 0) return; // the end of the enclosing block: not ours
          depth--;
          if (depth === 0 && v === '}') { i++; return; }
        } else if ((v === ';' || v === ',') && depth === 0) { i++; return; }
      }
      i++;
    }
  }

  /** Parses a use tree at i, calling leaf(segments, alias, line) / glob(segments, line). */
  function useTree(prefix, leaf, glob) {
    if (at(i, '{')) {
      i++;
      while (i < toks.length && !at(i, '}')) {
        useTree(prefix, leaf, glob);
        if (at(i, ',')) i++;
      }
      i++;
      return;
    }
    if (at(i, '*')) { glob(prefix, toks[i].line); i++; return; }
    const tok = toks[i++];
    if (!tok || tok.t !== 'id') return;
    if (at(i, '::')) { i++; useTree([...prefix, tok.v], leaf, glob); return; }
    let alias = tok.v === 'self' ? prefix[prefix.length - 1] : tok.v;
    if (at(i, 'as')) { alias = toks[i + 1].v; i += 2; }
    leaf(tok.v === 'self' ? prefix : [...prefix, tok.v], alias, tok.line);
  }

  while (i < toks.length) {
    const tok = toks[i];
    const v = tok.v;
    if (tok.t === 'p') {
      if (v === '#' && (at(i + 1, '[') || (at(i + 1, '!') && at(i + 2, '[')))) {
        const inner = at(i + 1, '!');
        const s = i + (inner ? 3 : 2);
        const isCfgTest = at(s, 'cfg') && at(s + 1, '(') && at(s + 2, 'test') && at(s + 3, ')') && at(s + 4, ']');
        // skip the attribute itself
        let depth = 0;
        i = s - 1;
        do {
          if (at(i, '[')) depth++;
          else if (at(i, ']')) depth--;
          i++;
        } while (i < toks.length && depth > 0);
        if (isCfgTest && !inner) {
          while (at(i, '#') && at(i + 1, '[')) { // further attributes of the same item
            let d = 0;
            do { if (at(i, '[')) d++; else if (at(i, ']')) d--; i++; } while (i < toks.length && d > 0);
          }
          skipItem();
        }
        continue;
      }
      if (v === '{') stack.push({});
      else if (v === '}') { if (stack.length > 1) stack.pop(); }
      i++;
      continue;
    }
    // identifiers
    const pub = i > 0 && (at(i - 1, 'pub') || (at(i - 1, ')') && at(i - 3, '(') && at(i - 4, 'pub')));
    if (v === 'mod' && toks[i + 1]?.t === 'id') {
      const name = toks[i + 1].v;
      const m = cur();
      if (atTop()) m.defines.add(name);
      if (at(i + 2, '{')) {
        const child = module([...m.path, name], rel, false);
        m.children.set(name, child);
        child.parent = m;
        stack.push({ mod: child });
        i += 3;
      } else {
        i += 2; // a file submodule: its declaration is no dependency
      }
      continue;
    }
    if (v === 'use') {
      const m = cur();
      i++;
      if (at(i, '::')) i++;
      const line = tok.line;
      useTree(
        [],
        (segs, alias, l) => m.uses.push({ segs, alias, pub, line: l ?? line }),
        (segs, l) => m.uses.push({ segs, glob: true, pub, line: l ?? line }),
      );
      continue;
    }
    if (ITEM.has(v) && atTop() && toks[i + 1]?.t === 'id' && !ITEM.has(toks[i + 1].v)) {
      cur().defines.add(toks[i + 1].v);
      i += 2;
      continue;
    }
    if (v === 'macro_rules' && at(i + 1, '!') && atTop()) {
      cur().defines.add(toks[i + 2].v);
      i += 3;
      continue;
    }
    // a path in code: ident (:: ident)*, not continuing one (`a::b` is read once, from `a`)
    if (at(i + 1, '::') && !(i > 0 && at(i - 1, '::')) && v !== 'Self') {
      const segs = [v];
      let j = i + 1;
      while (at(j, '::') && toks[j + 1]?.t === 'id') {
        segs.push(toks[j + 1].v);
        j += 2;
      }
      cur().paths.push({ segs, line: tok.line });
      i = j;
      continue;
    }
    i++;
  }
}

// ---- resolution -----------------------------------------------------------------------------

const crateRoot = () => modules.get('');

/** The module a path's leading segments name from module m: [module, index of the first item]. */
function walk(m, segs, depth = 0) {
  if (depth > 16) return null;
  let k = 0;
  let mod;
  if (segs[0] === 'crate') { mod = crateRoot(); k = 1; }
  else if (segs[0] === 'self') { mod = m; k = 1; }
  else if (segs[0] === 'super') {
    mod = m;
    while (segs[k] === 'super') { mod = mod.parent ?? mod; k++; }
  } else if (m.children.has(segs[0])) { mod = m; }
  else {
    const alias = aliasOf(m, segs[0], depth);
    if (!alias) return null;
    mod = alias;
    k = 1;
  }
  while (k < segs.length && mod.children.has(segs[k])) { mod = mod.children.get(segs[k]); k++; }
  return [mod, k];
}

/** A module that one of m's `use`s brought in under `name`. */
function aliasOf(m, name, depth) {
  for (const u of m.uses) {
    if (u.glob || u.alias !== name) continue;
    const r = walk(m, u.segs, depth + 1);
    if (r && r[1] === u.segs.length) return r[0];
  }
  return null;
}

/** The file that defines (or, outside module roots, re-exports) `name` in module m. */
function itemFile(m, name, seen = new Set()) {
  if (seen.has(m)) return null;
  seen.add(m);
  if (!m.root) return m.exported.has(name) || m.defines.has(name) ? m.file : null;
  if (m.defines.has(name)) return m.file;
  const target = m.reexports.get(name);
  if (target) return resolve(m, target, seen)?.file ?? m.file;
  for (const g of m.globs) {
    const r = walk(m, g);
    if (!r || r[1] !== g.length) continue;
    const f = itemFile(r[0], name, seen);
    if (f) return f;
  }
  return null;
}

/** { file, module? } for a path as written in module m, or null for external paths. */
function resolve(m, segs, seen = new Set()) {
  const r = walk(m, segs);
  if (!r) return null;
  const [mod, k] = r;
  if (k === segs.length) return { file: mod.file, module: mod };
  return { file: itemFile(mod, segs[k], seen) ?? mod.file };
}

// ---- main -----------------------------------------------------------------------------------

const files = rsFiles(root).map((f) => [f, relative(root, f)]);
for (const [f, rel] of files) parseFile(f, rel);
for (const m of modules.values()) {
  if (m.file === 'lib.rs' && m.path.length === 0) m.root = true;
  if (/(^|\/)mod\.rs$/.test(m.file.split(sep).join('/')) && m.path.length === modulePathOf(m.file).length) m.root = true;
  for (const u of m.uses) {
    if (!u.pub) continue;
    if (u.glob) m.globs.push(u.segs);
    else { m.exported.add(u.alias); m.reexports.set(u.alias, u.segs); }
  }
  if (m.path.length > 0 && !m.parent) {
    const p = modules.get(key(m.path.slice(0, -1)));
    if (p) { m.parent = p; p.children.set(m.path[m.path.length - 1], m); }
  }
}

/** file → Map(dep file → first place) */
const deps = new Map(files.map(([, rel]) => [rel, new Map()]));
function edge(from, to, line, written) {
  if (!to || to === from) return;
  const d = deps.get(from);
  if (!d.has(to)) d.set(to, `${from}:${line} ${written}`);
}
for (const m of modules.values()) {
  for (const u of m.uses) {
    if (u.pub && m.root) continue; // a root's re-exports: followed by its users, not its own
    const r = resolve(m, u.segs);
    if (!r) continue;
    if (r.module && !u.glob) continue; // a module alone: the paths through it count
    edge(m.file, r.file, u.line, `use ${u.segs.join('::')}${u.glob ? '::*' : ''}`);
  }
  for (const p of m.paths) {
    const r = resolve(m, p.segs);
    if (r) edge(m.file, r.file, p.line, p.segs.join('::'));
  }
}

// Tarjan's strongly connected components
const index = new Map();
const low = new Map();
const onStack = new Set();
const stack = [];
const sccs = [];
let counter = 0;
function strong(v) {
  index.set(v, counter);
  low.set(v, counter++);
  stack.push(v);
  onStack.add(v);
  for (const w of deps.get(v).keys()) {
    if (!index.has(w)) { strong(w); low.set(v, Math.min(low.get(v), low.get(w))); }
    else if (onStack.has(w)) low.set(v, Math.min(low.get(v), index.get(w)));
  }
  if (low.get(v) === index.get(v)) {
    const scc = [];
    let w;
    do { w = stack.pop(); onStack.delete(w); scc.push(w); } while (w !== v);
    if (scc.length > 1) sccs.push(scc.sort());
  }
}
for (const v of [...deps.keys()].sort()) if (!index.has(v)) strong(v);

const shown = (f) => f.split(sep).join('/');
if (showEdges) {
  for (const [from, d] of [...deps].sort()) {
    console.log(`${shown(from)}:`);
    for (const [to, place] of [...d].sort()) console.log(`  → ${shown(to)}   (${shown(place)})`);
  }
  console.log();
}
const edges = [...deps.values()].reduce((s, d) => s + d.size, 0);
if (sccs.length === 0) {
  console.log(`import-cycles: no circles among ${deps.size} files (${edges} dependencies) of ${shown(relative(process.cwd(), root) || '.')}`);
  process.exit(0);
}
console.log(`import-cycles: ${sccs.length} circle(s) among the files of ${shown(relative(process.cwd(), root) || '.')}:`);
sccs.sort((a, b) => a[0].localeCompare(b[0]));
/** Every pair of files that read each other, and the shortest circle through each file of a
 * component; each circle once. */
function shortestCircles(scc) {
  const inside = new Set(scc);
  const seen = new Set();
  const out = [];
  for (const v of scc) {
    for (const w of deps.get(v).keys()) {
      if (v < w && inside.has(w) && deps.get(w).has(v)) { seen.add(`${v}>${w}`); out.push([v, w]); }
    }
  }
  for (const start of scc) {
    const back = new Map([[start, null]]);
    const queue = [start];
    let found = null;
    while (queue.length && !found) {
      const v = queue.shift();
      for (const w of [...deps.get(v).keys()].sort()) {
        if (!inside.has(w)) continue;
        if (w === start) { found = v; break; }
        if (!back.has(w)) { back.set(w, v); queue.push(w); }
      }
    }
    if (!found) continue;
    const path = [];
    for (let v = found; v !== null; v = back.get(v)) path.unshift(v);
    const k = path.indexOf([...path].sort()[0]);
    const norm = [...path.slice(k), ...path.slice(0, k)];
    const id = norm.join('>');
    if (!seen.has(id)) { seen.add(id); out.push(norm); }
  }
  return out.sort((a, b) => a.length - b.length || a.join().localeCompare(b.join()));
}

for (const [n, scc] of sccs.entries()) {
  const inside = new Set(scc);
  console.log(`\n${n + 1}. ${scc.map(shown).join(', ')}`);
  console.log('   circles (files that read each other, and the shortest circle through each file):');
  for (const c of shortestCircles(scc)) console.log(`     ${[...c, c[0]].map(shown).join(' → ')}`);
  console.log('   dependencies inside:');
  for (const from of scc) {
    for (const [to, place] of [...deps.get(from)].sort()) {
      if (inside.has(to)) console.log(`   ${shown(from)} → ${shown(to)}   (${shown(place)})`);
    }
  }
}
process.exit(1);

#!/usr/bin/env node
// Checks the documentation, with Node alone (no dependencies); exits 1 with a list of what is broken:
// - every relative link in the repository's Markdown files (README.md, docs/, bench/, …; not
//   node_modules/, target/, dev/.state/) names a file or directory that exists, and every
//   `#anchor` (on the same page or another .md) matches a heading there, as GitHub makes
//   anchors: lowercase, punctuation dropped except `-` and `_`, spaces to `-`, repeats `-1`, `-2`;
// - README.md stays a front door: at most 15,360 bytes;
// - docs/policy-reference.md is what scripts/policy-reference.mjs writes from policy.schema.json.
//
//   node scripts/check-docs.mjs
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { OUT as REFERENCE, renderFromRepo } from './policy-reference.mjs';

const ROOT = resolve(dirname(new URL(import.meta.url).pathname), '..');
const README_MAX_BYTES = 15360;
const EXCLUDED = [/(^|\/)node_modules\//, /^target\//, /^dev\/\.state\//, /^\.git\//];

const problems = [];
const problem = (where, what) => problems.push(`${where}: ${what}`);

/** The Markdown files to check, relative to the root, with `/` separators. */
function markdownFiles() {
  let files;
  try {
    // Tracked files and new ones not ignored, so a page is checked before its first commit.
    files = execFileSync('git', ['ls-files', '-co', '--exclude-standard', '--', '*.md'], {
      cwd: ROOT,
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
    })
      .split('\n')
      .filter(Boolean);
  } catch {
    files = [];
    const walk = (dir) => {
      for (const entry of readdirSync(join(ROOT, dir), { withFileTypes: true })) {
        const path = dir ? `${dir}/${entry.name}` : entry.name;
        if (EXCLUDED.some((re) => re.test(`${path}/`))) continue;
        if (entry.isDirectory()) walk(path);
        else if (entry.name.endsWith('.md')) files.push(path);
      }
    };
    walk('');
  }
  return files.filter((f) => !EXCLUDED.some((re) => re.test(f)) && existsSync(join(ROOT, f))).sort();
}

/** The text with fenced code blocks blanked, and inline code spans unless `keepCode` (line breaks kept). */
function prose(text, keepCode = false) {
  const lines = text.split('\n');
  let fence = null;
  return lines
    .map((line) => {
      const open = line.match(/^ {0,3}(`{3,}|~{3,})/);
      if (fence) {
        if (open && open[1][0] === fence[0] && open[1].length >= fence.length && !line.trim().slice(open[1].length).trim()) fence = null;
        return '';
      }
      if (open) {
        fence = open[1];
        return '';
      }
      return keepCode ? line : line.replace(/(`+)(.+?)\1/g, (m) => ' '.repeat(m.length));
    })
    .join('\n');
}

/** GitHub's anchor for a heading's text. */
export function slug(heading) {
  const text = heading
    .replace(/!?\[([^\]]*)\]\([^)]*\)/g, '$1') // links and images: their text
    .replace(/<[^>]+>/g, '') // inline HTML
    .replace(/(`+)(.+?)\1/g, '$2') // code spans: their content
    .replace(/\*+|~~/g, '') // emphasis
    .replace(/(^|\s)_+(\S(?:.*?\S)?)_+(?=\s|$)/g, '$1$2'); // _emphasis_, not snake_case
  return text
    .trim()
    .toLowerCase()
    .replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '')
    .replace(/ /g, '-');
}

const anchorCache = new Map();
/** The anchors a Markdown file defines: its headings' slugs (repeats numbered) and HTML ids. */
function anchorsOf(file) {
  if (anchorCache.has(file)) return anchorCache.get(file);
  const anchors = new Set();
  const seen = new Map();
  const add = (base) => {
    const n = seen.get(base) || 0;
    seen.set(base, n + 1);
    anchors.add(n ? `${base}-${n}` : base);
  };
  const lines = prose(readFileSync(file, 'utf8'), true).split('\n');
  lines.forEach((line, i) => {
    const atx = line.match(/^ {0,3}#{1,6}(?:\s+(.*?))?\s*$/);
    if (atx) return add(slug((atx[1] || '').replace(/\s+#+$/, '')));
    const next = lines[i + 1];
    const listOrQuote = /^\s*([-*+>]|\d+[.)])\s/.test(line);
    if (next !== undefined && line.trim() && !listOrQuote && !line.includes('|') && /^ {0,3}(=+|-+)\s*$/.test(next)) add(slug(line));
    for (const m of line.matchAll(/<a\s[^>]*(?:name|id)="([^"]+)"/gi)) anchors.add(m[1]);
  });
  anchorCache.set(file, anchors);
  return anchors;
}

/** Every link of a Markdown text: [text](target), ![alt](target), and [label]: target. */
function linksOf(text) {
  const body = prose(text);
  const lineAt = (index) => body.slice(0, index).split('\n').length;
  const out = [];
  const inline = /!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*(<[^>\n]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+(?:"[^"]*"|'[^']*'|\([^)]*\)))?\s*\)/g;
  for (const m of body.matchAll(inline)) out.push({ target: m[2].replace(/^<|>$/g, ''), line: lineAt(m.index) });
  const definition = /^ {0,3}\[[^\]]+\]:\s*(<[^>\n]*>|\S+)/gm;
  for (const m of body.matchAll(definition)) out.push({ target: m[1].replace(/^<|>$/g, ''), line: lineAt(m.index) });
  return out;
}

function checkLinks(file) {
  const path = join(ROOT, file);
  for (const { target, line } of linksOf(readFileSync(path, 'utf8'))) {
    const where = `${file}:${line}`;
    if (!target) {
      problem(where, 'empty link target');
      continue;
    }
    if (/^[a-z][a-z0-9+.-]*:/i.test(target) || target.startsWith('//')) continue; // https:, mailto:, …
    const hash = target.indexOf('#');
    const rawPath = hash < 0 ? target : target.slice(0, hash);
    const fragment = hash < 0 ? null : target.slice(hash + 1);
    let filePart;
    try {
      filePart = decodeURIComponent(rawPath.split('?')[0]);
    } catch {
      problem(where, `\`${target}\`: a malformed percent-escape`);
      continue;
    }
    const resolved = filePart === '' ? path : filePart.startsWith('/') ? join(ROOT, filePart) : resolve(dirname(path), filePart);
    const shown = relative(ROOT, resolved).split(sep).join('/') || '.';
    if (!resolved.startsWith(ROOT)) {
      problem(where, `\`${target}\` leaves the repository`);
      continue;
    }
    if (!existsSync(resolved)) {
      problem(where, `\`${target}\`: ${shown} does not exist`);
      continue;
    }
    if (fragment === null) continue;
    if (fragment === '') {
      problem(where, `\`${target}\`: an empty #anchor`);
      continue;
    }
    if (statSync(resolved).isDirectory() || !resolved.endsWith('.md')) {
      // GitHub's line anchors on a source file are fine; any other anchor there cannot be checked.
      if (!/^L\d+(-L\d+)?$/.test(fragment)) problem(where, `\`${target}\`: #${fragment} on ${shown}, which is not a Markdown page`);
      continue;
    }
    let anchor;
    try {
      anchor = decodeURIComponent(fragment);
    } catch {
      anchor = fragment;
    }
    if (!anchorsOf(resolved).has(anchor)) problem(where, `\`${target}\`: no heading of ${shown} has the anchor #${anchor}`);
  }
}

const files = markdownFiles();
for (const file of files) checkLinks(file);

const readme = join(ROOT, 'README.md');
if (existsSync(readme)) {
  const size = statSync(readme).size;
  if (size > README_MAX_BYTES) problem('README.md', `${size} bytes, over the front door's ${README_MAX_BYTES}: move the detail to a page under docs/`);
} else problem('README.md', 'missing');

const referencePath = join(ROOT, REFERENCE);
const fresh = renderFromRepo(ROOT);
const committed = existsSync(referencePath) ? readFileSync(referencePath, 'utf8') : null;
if (committed !== fresh) {
  problem(REFERENCE, `${committed === null ? 'missing' : 'differs from policy.schema.json'}: run node scripts/policy-reference.mjs`);
}

if (problems.length) {
  console.error(`check-docs: ${problems.length} problem${problems.length === 1 ? '' : 's'} in ${files.length} Markdown files:`);
  for (const p of problems) console.error(`  ${p}`);
  process.exit(1);
}
console.log(`check-docs: ${files.length} Markdown files, every relative link and anchor resolves; README.md within ${README_MAX_BYTES} bytes; ${REFERENCE} up to date`);

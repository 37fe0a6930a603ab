#!/usr/bin/env node
// Writes docs/policy-reference.md from policy.schema.json, the source of truth for policy fields
// (itself generated from the Rust types: `cargo run --bin policy -- schema > policy.schema.json`).
// One section per definition, in the order a reader meets them from the top level, each with a
// table of its fields: type, default, allowed values, description. scripts/check-docs.mjs fails
// when the committed page differs from what this writes.
//
//   node scripts/policy-reference.mjs          # rewrite docs/policy-reference.md
import { readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
export const SCHEMA = 'policy.schema.json';
export const OUT = 'docs/policy-reference.md';

const TOP = 'Policy';

/** The page for a parsed schema. */
export function render(schema) {
  const defs = schema.$defs || {};
  const refName = (ref) => ref.replace(/^#\/\$defs\//, '');
  // GitHub's heading anchors: lowercase, punctuation dropped but `-` and `_`, spaces to `-`.
  const anchor = (heading) => heading.toLowerCase().replace(/[^\p{L}\p{M}\p{N}\p{Pc} -]/gu, '').replace(/ /g, '-');
  const inlineHeading = (name, key) => `${name}: \`${key}\``;
  const link = (name) => `[${name}](#${anchor(name)})`;
  const text = (s) => (s || '').replace(/\s*\n\s*/g, ' ').trim();
  const cell = (s) => text(s).replace(/\|/g, '\\|');
  const code = (v) => '`' + JSON.stringify(v).replace(/\|/g, '\\|') + '`';

  // Definitions in the order a reader meets them, starting from the top level.
  const order = [];
  const queued = new Set();
  const visit = (node) => {
    if (Array.isArray(node)) return node.forEach(visit);
    if (!node || typeof node !== 'object') return;
    if (typeof node.$ref === 'string') {
      const name = refName(node.$ref);
      if (!queued.has(name) && defs[name]) {
        queued.add(name);
        order.push(name);
      }
    }
    for (const [k, v] of Object.entries(node)) if (k !== '$defs') visit(v);
  };
  // Breadth first: the top level's references, then theirs.
  visit(schema);
  for (let i = 0; i < order.length; i++) visit(defs[order[i]]);
  for (const name of Object.keys(defs).sort()) if (!queued.has(name)) order.push(name);

  // A string definition's values (an enum, or a oneOf of consts), or null.
  const valuesOf = (s) => {
    if (!s) return null;
    if (Array.isArray(s.enum)) return s.enum;
    if (Array.isArray(s.oneOf) && s.oneOf.every((v) => 'const' in v)) return s.oneOf.map((v) => v.const);
    return null;
  };

  const typeOf = (s) => {
    if (s === true || (s && Object.keys(s).length === 0)) return 'any JSON';
    if (s.$ref) return link(refName(s.$ref));
    if (s.anyOf) return s.anyOf.map(typeOf).join(' or ');
    if (s.oneOf) return s.oneOf.map(typeOf).join(' or ');
    if ('const' in s) return code(s.const);
    const types = Array.isArray(s.type) ? s.type : [s.type];
    return types
      .map((t) => {
        if (t === 'array') return `array of ${s.items ? typeOf(s.items) : 'any JSON'}`;
        if (t === 'object' && s.additionalProperties && typeof s.additionalProperties === 'object')
          return `map of name to ${typeOf(s.additionalProperties)}`;
        if ((t === 'integer' || t === 'number') && s.format) return `${t} (${s.format})`;
        return t === undefined ? 'any JSON' : t;
      })
      .join(' or ');
  };

  const allowedOf = (s) => {
    const out = [];
    if (s.minimum !== undefined) out.push(`≥ ${s.minimum}`);
    if (s.exclusiveMinimum !== undefined) out.push(`> ${s.exclusiveMinimum}`);
    if (s.maximum !== undefined) out.push(`≤ ${s.maximum}`);
    if (s.exclusiveMaximum !== undefined) out.push(`< ${s.exclusiveMaximum}`);
    if (s.minLength !== undefined) out.push(`length ≥ ${s.minLength}`);
    if (s.maxLength !== undefined) out.push(`length ≤ ${s.maxLength}`);
    if (s.minItems !== undefined) out.push(`≥ ${s.minItems} items`);
    if (s.maxItems !== undefined) out.push(`≤ ${s.maxItems} items`);
    if (s.pattern !== undefined) out.push(`matches \`${s.pattern}\``);
    let values = valuesOf(s);
    const refs = [s, ...(s.anyOf || []), ...(s.items ? [s.items] : [])].filter((x) => x && x.$ref);
    for (const r of refs) values = values || valuesOf(defs[refName(r.$ref)]);
    if (values) out.push(values.map(code).join(', '));
    return out.join('; ');
  };

  const defaultOf = (s, required) => {
    if (required) return '**required**';
    if (s === true || !('default' in s) || s.default === null) return '';
    return code(s.default);
  };

  const fieldTable = (s) => {
    const props = Object.entries(s.properties || {});
    if (!props.length) return [];
    const required = new Set(s.required || []);
    const rows = ['| field | type | default | allowed | description |', '|---|---|---|---|---|'];
    for (const [name, p] of props) {
      const d = p === true ? '' : cell(p.description);
      rows.push(`| \`${name}\` | ${typeOf(p)} | ${defaultOf(p, required.has(name))} | ${p === true ? '' : allowedOf(p)} | ${d} |`);
    }
    if (s.additionalProperties === false) rows.push('', 'No other fields are accepted.');
    return rows;
  };

  const section = (name, s) => {
    const out = [`## ${name}`, ''];
    if (s.description) out.push(text(s.description), '');
    const values = valuesOf(s);
    if (values && s.enum) {
      out.push(`A string, one of: ${values.map(code).join(', ')}.`, '');
    } else if (values) {
      out.push('| value | meaning |', '|---|---|');
      for (const v of s.oneOf) out.push(`| ${code(v.const)} | ${cell(v.description)} |`);
      out.push('');
    } else if (Array.isArray(s.oneOf)) {
      // Externally tagged variants: an object with one member naming the kind.
      out.push('Exactly one of:', '', '| form | fields | description |', '|---|---|---|');
      const inline = [];
      for (const v of s.oneOf) {
        if ('const' in v) {
          out.push(`| ${code(v.const)} | | ${cell(v.description)} |`);
          continue;
        }
        const [key, inner] = Object.entries(v.properties || {})[0] || [];
        if (key === undefined) {
          out.push(`| ${typeOf(v)} | | ${cell(v.description)} |`);
          continue;
        }
        let fields;
        if (inner === true) fields = 'any JSON';
        else if (inner.$ref) fields = link(refName(inner.$ref));
        else if (inner.properties) {
          fields = `[below](#${anchor(inlineHeading(name, key))})`;
          inline.push([key, inner]);
        } else fields = typeOf(inner);
        out.push(`| \`{"${key}": …}\` | ${fields} | ${cell(v.description)} |`);
      }
      out.push('');
      for (const [key, inner] of inline) {
        out.push(`### ${inlineHeading(name, key)}`, '');
        if (inner.description) out.push(text(inner.description), '');
        out.push(...fieldTable(inner), '');
      }
    } else {
      if (s.type && s.type !== 'object') out.push(`Type: ${typeOf(s)}.`, '');
      const allowed = s.type !== 'object' ? allowedOf(s) : '';
      if (allowed && !values) out.push(`Allowed: ${allowed}.`, '');
      const table = fieldTable(s);
      if (table.length) out.push(...table, '');
    }
    return out;
  };

  const lines = [
    '<!-- Generated by scripts/policy-reference.mjs from policy.schema.json: do not edit by hand. -->',
    '',
    '# Policy field reference',
    '',
    'Every field of `policy.json`, generated from [`policy.schema.json`](../policy.schema.json) (which is',
    'generated from the Rust types in `crates/core/src/policy/model.rs`). What the fields do together, with',
    'examples: [policy.md](policy.md) and the page of each backend it links to. A default left empty means',
    'the field is optional and its description gives the value used; `policy check` enforces the rules the',
    'descriptions state beyond the types.',
    '',
    `Sections: ${[TOP, ...order].map(link).join(', ')}.`,
    '',
    ...section(TOP, { ...schema, description: `${text(schema.description)} The top level of \`policy.json\`.` }),
  ];
  for (const name of order) lines.push(...section(name, defs[name]));
  while (lines[lines.length - 1] === '') lines.pop();
  return lines.join('\n') + '\n';
}

/** The page as the schema in the working tree would make it. */
export function renderFromRepo(root = ROOT) {
  return render(JSON.parse(readFileSync(join(root, SCHEMA), 'utf8')));
}

if (import.meta.url === pathToFileURL(process.argv[1] || '').href) {
  writeFileSync(join(ROOT, OUT), renderFromRepo());
  console.log(`wrote ${OUT}`);
}

#!/usr/bin/env node
/**
 * Post-build step of scripts/build, only when AEG_SABOTAGE is set: a deliberately broken gateway,
 * to show that the fault suite (bench/faults) and the "exactly once" tests fail when a message is
 * lost or sent twice. Never deploy it (scripts/build refuses it for anything but `wrangler dev`).
 *
 *   AEG_SABOTAGE=drop:N    the N-th message send (a POST to .../messages, a Put Blob or Put Block
 *                          List) is not sent; the gateway is told 201, as if Azure took it;
 *   AEG_SABOTAGE=double:N  the N-th message send goes out twice: after Azure answered 2xx, the
 *                          same request again (its answer thrown away).
 *
 *   node scripts/sabotage.mjs <out-dir>
 *
 * It wraps globalThis.fetch at the top of <out-dir>/index.js (the glue calls the global `fetch`
 * for every outbound request), and logs one line `aeg sabotage: ...` when it strikes. The wasm
 * is untouched: the broken gateway is the real one with one send dropped or doubled.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

export const MARKER = '/* aeg:sabotage */';

/** `drop:N` / `double:N` → { mode, nth }; throws on anything else. */
export function parseSabotage(spec) {
  const m = /^(drop|double):([1-9][0-9]{0,6})$/.exec(String(spec ?? ''));
  if (!m) throw new Error(`AEG_SABOTAGE must be drop:N or double:N (N from 1), not ${JSON.stringify(spec)}`);
  return { mode: m[1], nth: Number(m[2]) };
}

/** The code put in front of index.js. */
function runtime({ mode, nth }) {
  return `${MARKER}
{
  const mode = ${JSON.stringify(mode)};
  const nth = ${nth};
  const original = globalThis.fetch;
  let sends = 0;
  const isSend = (url, method) => {
    const u = new URL(url);
    const comp = u.searchParams.get("comp");
    return (method === "POST" && u.pathname.endsWith("/messages")) || (method === "PUT" && (comp === null || comp === "blocklist"));
  };
  globalThis.fetch = async function (input, init) {
    const url = typeof input === "string" ? input : input.url;
    const method = String((init && init.method) || (typeof input === "string" ? "GET" : input.method)).toUpperCase();
    if (!isSend(url, method) || ++sends !== nth) return original(input, init);
    console.log("aeg sabotage: " + mode + " of send " + nth + ": " + method + " " + url);
    if (mode === "drop") {
      return new Response(null, { status: 201, headers: { etag: '"0x8DSABOTAGE0000"', "last-modified": new Date().toUTCString() } });
    }
    let body = init && init.body;
    if (body instanceof ReadableStream) body = await new Response(body).arrayBuffer();
    const again = { ...init, body, signal: undefined };
    const first = await original(input, { ...init, body });
    if (first.ok) {
      try { await (await original(input, again)).arrayBuffer(); } catch (e) { console.log("aeg sabotage: the second send failed: " + e); }
    }
    return first;
  };
}
`;
}

export function sabotage(source, spec) {
  if (source.includes(MARKER)) throw new Error('sabotage: index.js is sabotaged already');
  return runtime(parseSabotage(spec)) + source;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  const dir = process.argv[2];
  if (!dir) {
    console.error('usage: node scripts/sabotage.mjs <out-dir> (with AEG_SABOTAGE=drop:N | double:N)');
    process.exit(2);
  }
  try {
    const path = join(dir, 'index.js');
    writeFileSync(path, sabotage(readFileSync(path, 'utf8'), process.env.AEG_SABOTAGE));
    console.log(`sabotage: ${path} ${process.env.AEG_SABOTAGE} (for showing that the tests fail; never deploy it)`);
  } catch (err) {
    console.error(`sabotage: ${err.message}`);
    process.exit(1);
  }
}

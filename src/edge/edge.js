// The edge's JavaScript half: everything the core asks of the platform, one call each.
//
// Each call from wasm into JavaScript costs; the functions here take and return few, flat values
// (strings, numbers, byte arrays) so that one request crosses the boundary a handful of times:
// its head is read once as one string, each backend call is one call (its reply summarised as
// one string), bodies stay on this side (a block or a caller's body is a Uint8Array the wasm
// only holds a handle to, and a reply body streams to the caller without entering the wasm).
//
// A per-request context `c` (made by `begin`) holds the request, its env and execution context,
// the body reader and the replies of backend calls, so nothing is shared between requests.

/** The per-request context. */
export function begin(request, env, ctx) {
  return { request, env, ctx, reader: null, leftover: null, total: 0, replies: [] };
}

/** The request's head as one string: [method, url, hasBody, [name, value, …]]. */
export function head(c) {
  const flat = [];
  for (const [name, value] of c.request.headers) flat.push(name, value);
  return JSON.stringify([c.request.method, c.request.url, c.request.body !== null, flat]);
}

/** A Worker secret (or plain var) by name, or undefined. */
export function secret(c, name) {
  const value = c.env[name];
  return typeof value === 'string' ? value : (value == null ? undefined : String(value));
}

/** Counts against a rate-limiting binding: 1 allowed, 0 over the limit, -1 no such binding, -2 no answer. */
export async function rateLimit(c, binding, key) {
  const limiter = c.env[binding];
  if (!limiter || typeof limiter.limit !== 'function') return -1;
  try {
    const { success } = await limiter.limit({ key });
    return success ? 1 : 0;
  } catch {
    return -2;
  }
}

/** Runs a promise past the response (a token refreshed ahead of expiry). */
export function waitUntil(c, promise) {
  c.ctx.waitUntil(promise);
}

function reader(c) {
  if (c.reader === null && c.request.body !== null) c.reader = c.request.body.getReader();
  return c.reader;
}

/**
 * The whole body, or null without one; the number of bytes seen (more than `limit`) as soon as
 * it passes the limit, without reading further.
 */
export async function readBody(c, limit) {
  const r = reader(c);
  if (r === null) return null;
  const chunks = [];
  let total = 0;
  for (;;) {
    const { done, value } = await r.read();
    if (done) break;
    total += value.byteLength;
    if (total > limit) {
      r.cancel().catch(() => {});
      return total;
    }
    chunks.push(value);
  }
  if (chunks.length === 1) return chunks[0];
  const body = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    body.set(chunk, at);
    at += chunk.byteLength;
  }
  return body;
}

/**
 * The next `size` bytes of the body as one Uint8Array (fewer at its end), null after the end, or
 * the number of bytes seen when the body passes `limit` in all. One block in memory at a time.
 */
export async function nextBlock(c, size, limit) {
  const r = reader(c);
  if (r === null) return null;
  const block = new Uint8Array(size);
  let filled = 0;
  if (c.leftover !== null) {
    const take = Math.min(size, c.leftover.byteLength);
    block.set(c.leftover.subarray(0, take), 0);
    filled = take;
    c.leftover = take < c.leftover.byteLength ? c.leftover.subarray(take) : null;
  }
  while (filled < size) {
    const { done, value } = await r.read();
    if (done) break;
    c.total += value.byteLength;
    if (c.total > limit) {
      r.cancel().catch(() => {});
      return c.total;
    }
    const take = Math.min(size - filled, value.byteLength);
    block.set(value.subarray(0, take), filled);
    filled += take;
    if (take < value.byteLength) c.leftover = value.subarray(take);
  }
  if (filled === 0) return null;
  return filled === size ? block : block.subarray(0, filled);
}

/** Throws this (name 'TimeoutError') when a limit cut the call off. */
function timeoutError(what) {
  return new DOMException(what, 'TimeoutError');
}

/** A pass-through stream that calls `progress` on each chunk and `end` when it closes. */
function watched(progress, end) {
  return new TransformStream({
    transform(chunk, controller) {
      progress();
      controller.enqueue(chunk);
    },
    flush() {
      end();
    },
  });
}

// The reply headers the core reads (pipeline::REPLY_HEADERS).
const REPLY_HEADERS = ['retry-after', 'x-ms-error-code', 'etag', 'content-type', 'content-length', 'last-modified'];

/**
 * One outbound request. `headers` is `name\nvalue\n…`; `body` is null, a string, a Uint8Array,
 * or `true` for the caller's own body stream (then `length` keeps its Content-Length).
 * Time limits:
 * - deadlineMs (whole calls): the request, the reply's headers and, for replies read whole, its
 *   body must be done within it;
 * - idleMs (streamed calls): cut off only when no bytes move for idleMs, in either direction.
 * Resolves to one string, [reply id, status, [name, value, …]] (the headers the core reads); the
 * reply itself stays here, under its id, for `text` or `respond`.
 */
export async function send(c, url, method, headers, body, length, deadlineMs, idleMs) {
  const init = { method, headers: pairs(headers) };
  let response;
  if (!(idleMs > 0)) {
    init.signal = AbortSignal.timeout(Math.max(1, deadlineMs));
    if (body !== null) init.body = body === true ? c.request.body : body;
    try {
      response = await fetch(url, init);
    } catch (e) {
      if (init.signal.aborted) throw timeoutError('no answer within the time limit');
      throw e;
    }
  } else {
    const controller = new AbortController();
    let timer;
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => controller.abort(timeoutError('no bytes moved within the idle time limit')), idleMs);
    };
    const disarm = () => clearTimeout(timer);
    init.signal = controller.signal;
    arm();
    const stream = body === true ? c.request.body : body;
    if (stream instanceof ReadableStream) {
      // Waiting for the answer after the last byte went out counts as idle time too.
      const progress = stream.pipeThrough(watched(arm, arm));
      if (length >= 0) {
        // A fixed length keeps the Content-Length (Put Blob needs it) instead of chunked encoding.
        const fixed = new FixedLengthStream(length);
        progress.pipeTo(fixed.writable).catch(() => {});
        init.body = fixed.readable;
      } else {
        init.body = progress;
      }
    } else if (stream !== null) {
      init.body = stream;
    } else if (body === true) {
      init.body = new Uint8Array(0);
    }
    try {
      response = await fetch(url, init);
    } catch (e) {
      disarm();
      if (controller.signal.aborted) throw timeoutError('no bytes moved within the idle time limit');
      throw e;
    }
    if (response.body === null) {
      disarm();
    } else {
      arm();
      response = new Response(response.body.pipeThrough(watched(arm, disarm)), response);
    }
  }
  const id = c.replies.push(response) - 1;
  const flat = [];
  for (const name of REPLY_HEADERS) {
    const value = response.headers.get(name);
    if (value !== null) flat.push(name, value);
  }
  return JSON.stringify([id, response.status, flat]);
}

/** A reply's body as text (at most 64 KiB kept), draining it. */
export async function text(c, id) {
  const response = c.replies[id];
  c.replies[id] = undefined;
  if (!response) return '';
  try {
    const all = await response.text();
    return all.length > 65536 ? all.slice(0, 65536) : all;
  } catch {
    return '';
  }
}

/** Headers from the wasm's one string, `name\nvalue\n…` (a value never holds a line break). */
function pairs(joined) {
  const out = new Headers();
  if (!joined) return out;
  const flat = joined.split('\n');
  for (let i = 0; i + 1 < flat.length; i += 2) out.set(flat[i], flat[i + 1]);
  return out;
}

/**
 * The caller's response: `headers` is `name\nvalue\n…`; the body is a string, or (when `text` is
 * null and `stream` is a reply id) that reply's body streamed through, or nothing.
 */
export function respond(c, status, headers, text, stream) {
  let body = null;
  if (text !== undefined && text !== null) body = text;
  else if (stream >= 0 && c.replies[stream]) body = c.replies[stream].body;
  // The other replies' bodies are not read: let the runtime release them.
  for (const [i, reply] of c.replies.entries()) {
    if (reply && i !== stream && reply.body && !reply.bodyUsed) reply.body.cancel().catch(() => {});
  }
  c.replies = [];
  return new Response(body, { status, headers: pairs(headers) });
}

/** WebCrypto verification of a JWS signature with a public JWK (`jwk` as JSON). */
export async function verify(alg, jwk, data, signature) {
  let importParams;
  let verifyParams;
  if (alg === 'RS256') {
    importParams = verifyParams = { name: 'RSASSA-PKCS1-v1_5', hash: 'SHA-256' };
  } else if (alg === 'PS256') {
    importParams = { name: 'RSA-PSS', hash: 'SHA-256' };
    verifyParams = { name: 'RSA-PSS', saltLength: 32 };
  } else if (alg === 'ES256') {
    importParams = { name: 'ECDSA', namedCurve: 'P-256' };
    verifyParams = { name: 'ECDSA', hash: 'SHA-256' };
  } else {
    return false;
  }
  try {
    const key = await crypto.subtle.importKey('jwk', JSON.parse(jwk), importParams, false, ['verify']);
    return await crypto.subtle.verify(verifyParams, key, signature, data);
  } catch {
    return false;
  }
}

/** A GET whose body is read whole as text, with a deadline: [status, retry-after, text] as one string. */
export async function fetchText(url, method, headers, body, deadlineMs) {
  const init = { method, headers: pairs(headers), signal: AbortSignal.timeout(Math.max(1, deadlineMs)) };
  if (body !== null) init.body = body;
  let response;
  let text;
  try {
    response = await fetch(url, init);
    text = await response.text();
  } catch (e) {
    if (init.signal.aborted) throw timeoutError('no answer within the time limit');
    throw e;
  }
  return JSON.stringify([response.status, response.headers.get('retry-after'), text]);
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

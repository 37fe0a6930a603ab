// The edge's JavaScript half: it drives each request, and the wasm decides.
//
// `drive` reads the request's head, starts the core's driver as a task in the wasm through the
// stepper, and then performs each op the task stops on (read the body, send a request, count a
// rate limit, …), resuming the task with the result, until the task is done: then it builds the
// Response and writes the log line. A step is a call from JavaScript into the wasm, which costs
// little; the wasm calls out into JavaScript only for what cannot wait for the next step. Bodies
// stay on this side: the caller's body and its blocks are buffers here that the wasm names by
// id, and a backend's reply streams to the caller without entering the wasm.

let stepper = null;
/** Per-request contexts, by task id, while the request is in flight (and for its background work). */
const contexts = new Map();
let nextTask = 1;

/**
 * The wasm's one import that takes its arguments as they are (src/edge/mod.rs, `edge`): 0 drive
 * (request, env, ctx), 1 consume (batch, env, ctx), 2 waitUntil (context, promise), 3 sleep (ms),
 * 4 setStepper (f). One such import, not five: wasm-bindgen lists each one under this module's
 * name in the imports object, and five were duplicate keys esbuild warned about.
 */
export function edge(kind, a, b, c) {
  switch (kind) {
    case 0: return drive(a, b, c);
    case 1: return consume(a, b, c);
    case 2: a.ctx.waitUntil(b); return undefined;
    case 3: return sleep(a);
    case 4: stepper = a; return undefined;
    default: throw new Error(`edge: unknown kind ${kind}`);
  }
}

/** One step of a task: the next op, as its fields. */
function step(kind, task, payload) {
  return parseOp(stepper(kind, task, Date.now(), payload));
}

/**
 * An op from the wasm: its kind and its fields, separated by line breaks (src/edge/mod.rs, `Op`).
 * No field holds a line break but an op's last, which the ops that may have one (a text body, a
 * rate-limit key, a key) put last: it is taken whole, as one slice of the op, without splitting
 * it (a body of megabytes with many lines is neither cut into pieces nor joined back).
 */
function parseOp(out) {
  const first = out.indexOf('\n');
  const n = LAST_FIELD[first < 0 ? out : out.slice(0, first)];
  if (n === undefined) return out.split('\n');
  const fields = [];
  let at = 0;
  // A send's and a done's last field follows their headers: known once their count is read.
  let last = n >= 0 ? n : Infinity;
  while (fields.length < last) {
    const end = out.indexOf('\n', at);
    if (end < 0) {
      fields.push(out.slice(at));
      return fields;
    }
    fields.push(out.slice(at, end));
    at = end + 1;
    if (n < 0 && fields.length === COUNT_AT[fields[0]] + 1) last = lastField(fields);
  }
  fields.push(out.slice(at));
  return fields;
}

/** Index of the field that runs to the end of the op, by kind (-1: it follows the headers). */
const LAST_FIELD = { done: -1, send: -1, sendh: -1, rate: 2, verify: 4, enqueue: 6, deadletter: 2, keep: 2 };
/** Where a done's and a send's header count is. */
const COUNT_AT = { done: 4, send: 9, sendh: 9 };

function lastField(fields) {
  // done: kind, status, hasText, stream, count, headers…, log line, text.
  // send: kind, url, method, kind, id, length, deadline, idle, more, count, headers…, text.
  return fields[0] === 'done' ? 6 + 2 * Number(fields[4]) : 10 + 2 * Number(fields[9]);
}

/** The request's head as one string: method, URL, 1 or 0 (a body or not), then each header's name and value, separated by line breaks. */
export function headOf(request) {
  let head = `${request.method}\n${request.url}\n${request.body !== null ? 1 : 0}`;
  // forEach, not the iterator: one call into the runtime instead of one per header and an array
  // per entry (measured on workerd: half the cost). Same entries, in the same order.
  request.headers.forEach((value, name) => { head += `\n${name}\n${value}`; });
  return head;
}

/**
 * Runs one request through the wasm's driver: its Response, or a promise of it. An answer that
 * needs no I/O (a 404, a refused key, a 405) is returned as it is, without a promise: most
 * refusals cost one step and no await.
 */
function drive(request, env, ctx) {
  const c = { request, env, ctx, reader: null, total: 0, ended: false, buffers: [], replies: [], wake: null, woken: false, release: null };
  // The context is known before the first step: the task may read a secret in it.
  const task = nextTask;
  nextTask = nextTask >= 0x7fffffff ? 1 : nextTask + 1;
  contexts.set(task, c);
  let op;
  try {
    // A fresh UUID rides with the head: the request's first one (its id, unless the caller sent
    // one) needs no call out of the wasm.
    op = step(0, task, `${crypto.randomUUID()}\n${headOf(request)}`);
    if (op[0] === 'done') {
      contexts.delete(task);
      return finish(c, op);
    }
  } catch (e) {
    return failed500(task, e);
  }
  return driveRest(c, task, op);
}

/** The rest of a request whose first step asked for I/O. */
async function driveRest(c, task, op) {
  try {
    return finish(c, await run(c, task, op));
  } catch (e) {
    return failed500(task, e);
  } finally {
    contexts.delete(task);
    if (c.release) c.release();
  }
}

/** A request that failed inside the gateway: its task dropped, the error logged, a 500 problem. */
function failed500(task, e) {
  contexts.delete(task);
  try { step(2, task, null); } catch { /* the task is gone with the instance */ }
  console.error(JSON.stringify({ level: 'error', message: 'the request failed inside the gateway', error: String(e && e.message || e) }));
  return new Response(JSON.stringify({ type: 'urn:azure-edge-gateway:problem:internal-error', title: 'Internal error', status: 500, detail: 'The gateway failed; nothing was forwarded after the failure.' }), { status: 500, headers: { 'content-type': 'application/problem+json' } });
}

/** Performs a task's ops, resuming it with each result, until its final op, which it resolves. */
async function run(c, task, op) {
  for (;;) {
    if (op[0] === 'done') return op;
    let result = null;
    if (op[0] === 'wait') {
      // The task awaits a promise of its own (a token fetch): its waker resumes it.
      if (!c.woken) await new Promise((resolve) => { c.wake = resolve; });
      c.woken = false;
    } else {
      result = await perform(c, op);
    }
    op = step(1, task, result);
  }
}

/**
 * Keeps the request running until its task ends, even if its caller goes away: others wait on
 * its send (a coalesced batch it leads, or the send they queue behind). Without it, a caller that
 * disconnects tears the request's context down with the send in flight.
 */
function hold(c) {
  if (c.release || !c.ctx || typeof c.ctx.waitUntil !== 'function') return;
  c.ctx.waitUntil(new Promise((resolve) => { c.release = resolve; }));
}

/** A task's waker. */
export function schedule(task) {
  const c = contexts.get(task);
  if (!c) return;
  if (c.wake) {
    const wake = c.wake;
    c.wake = null;
    queueMicrotask(wake);
  } else {
    c.woken = true;
  }
}

export function contextOf(task) {
  return contexts.get(task);
}

/** The final op (done, status, hasText, stream, count, headers…, log line, text) as the Response. */
function finish(c, op) {
  const response = respond(op, c);
  const line = op[5 + 2 * Number(op[4])];
  if (line) console.log(line);
  return response;
}

/** The Response of a final op as the wasm writes it (for the wasm tests). */
export function responseOf(done) {
  return respond(parseOp(done), null);
}

function respond(op, c) {
  const count = Number(op[4]);
  const stream = op[3] === '' ? null : Number(op[3]);
  let body = null;
  if (op[2] === '1') body = op[6 + 2 * count];
  else if (stream !== null && c && c.replies[stream]) body = c.replies[stream].body;
  // Replies whose bodies nobody reads: let the runtime release them.
  if (c) {
    const replies = c.replies;
    for (let i = 0; i < replies.length; i++) {
      const reply = replies[i];
      if (reply && i !== stream && reply.body && !reply.bodyUsed) reply.body.cancel().catch(() => {});
    }
    if (replies.length) c.replies = [];
    if (c.buffers.length) c.buffers = [];
  }
  return new Response(body, { status: Number(op[1]), headers: headersOf(op, 5, count) });
}

/**
 * `count` headers from the fields of an op, names and values from `at` on, as a plain object (the
 * runtime reads it into the Response's or request's headers in one call). Names are lowercase
 * (the wasm's own, or the policy's, lowercased here), so a later value replaces an earlier one
 * as Headers.set would; the object has no prototype, so that any name is a plain member.
 */
function headersOf(fields, at, count) {
  const out = Object.create(null);
  for (let i = at; i < at + 2 * count; i += 2) out[fields[i].toLowerCase()] = fields[i + 1];
  return out;
}

/** Headers from one string, `name\nvalue\n…` (a value never holds a line break). */
function pairs(joined) {
  const out = new Headers();
  if (!joined) return out;
  const flat = joined.split('\n');
  for (let i = 0; i + 1 < flat.length; i += 2) out.set(flat[i], flat[i + 1]);
  return out;
}

/**
 * Performs an op: a promise of its result, the string the wasm reads (src/edge/mod.rs, `Io for
 * Edge`). Not an async function itself: the op's own promise is handed on as it is, without
 * wrapping it in another one (each wrapping costs the request's promise ticks).
 */
function perform(c, op) {
  switch (op[0]) {
    case 'read': return readBody(c, Number(op[1]));
    case 'block': return nextBlock(c, Number(op[1]), Number(op[2]));
    case 'send': return send(c, op);
    case 'sendh': hold(c); return send(c, op);
    case 'text': return text(c, Number(op[1]), Number(op[2]));
    case 'rate': return rateLimit(c, op[1], op[2]).then(String);
    case 'jwks': return fetchJwks(op[1], Number(op[2]), Number(op[3]));
    case 'verify': return verify(op[1], op[4], op[2], op[3]).then((ok) => (ok ? '1' : '0'));
    case 'sleep': return sleep(Number(op[1])).then(() => '');
    case 'keep': return Promise.resolve(keepText(c, op[1], op[2]));
    case 'enqueue': return enqueue(c, op);
    case 'deadletter': return deadLetter(c, op);
    default: return Promise.reject(new Error(`unknown op ${op[0]}`));
  }
}

/**
 * Store-and-forward: puts a stored request on the queue of a binding as { stored (JSON text),
 * body (bytes, text or null) }, structured-cloned ('v8'), so bytes stay bytes. The op's fields:
 * enqueue, binding, maxBody, kind (none | buffer | text), id, stored, text. Resolves `1`, or
 * `error\n{why}`.
 */
async function enqueue(c, op) {
  const [, binding, maxBody, kind, id, stored, text] = op;
  const queue = c.env[binding];
  if (!queue || typeof queue.send !== 'function') return `error\nno queue binding ${binding}`;
  const body = kind === 'buffer' ? c.buffers[Number(id)] : kind === 'text' ? text : null;
  const size = body === null ? 0 : typeof body === 'string' ? new TextEncoder().encode(body).byteLength : body.byteLength;
  if (size > Number(maxBody)) return `error\nthe body is over the ${maxBody} bytes a queue message may carry`;
  try {
    await queue.send({ stored, body }, { contentType: 'v8' });
    return '1';
  } catch (e) {
    return `error\nthe queue refused it: ${String(e && e.message || e)}`;
  }
}

/**
 * Store-and-forward's consumer: puts the message being delivered on the dead-letter queue of a
 * binding, as it came off the deliveries queue (its `stored` and `body` unchanged, so an operator
 * can send it back as it is), with `dead_letter` beside them: the reason, as JSON. A message that
 * is not an object is kept whole under `original`. The op's fields: deadletter, binding, why.
 * Resolves `1`, or `error\n{why}` (then the message stays on the deliveries queue).
 */
async function deadLetter(c, op) {
  const [, binding, why] = op;
  const queue = c.env[binding];
  if (!queue || typeof queue.send !== 'function') return `error\nno queue binding ${binding}`;
  if (!c.message) return 'error\nno message is being delivered';
  let reason;
  try { reason = JSON.parse(why); } catch { reason = why; }
  const original = c.message.body;
  const plain = original !== null && typeof original === 'object' && Object.getPrototypeOf(original) === Object.prototype;
  const letter = plain ? { ...original, dead_letter: reason } : { original, dead_letter: reason };
  try {
    await queue.send(letter, { contentType: 'v8' });
    return '1';
  } catch (e) {
    return `error\nthe dead-letter queue refused it: ${String(e && e.message || e)}`;
  }
}

/**
 * The queue handler: each message of the batch is one stored request, delivered as a task of
 * its own (concurrently), started with `attempt\nkind\nid\nstored\ntext`; the task's final
 * status says what to do with the message: 200 acknowledge, 503 retry after the seconds in
 * retry-after, 410 acknowledge (it is on the dead-letter queue with its reason, which the log
 * line says too). One log line per delivery.
 */
async function consume(batch, env, ctx) {
  await Promise.all(batch.messages.map(async (message) => {
    const c = { request: null, message, env, ctx, reader: null, total: 0, ended: false, buffers: [], replies: [], wake: null, woken: false, release: null };
    const task = nextTask;
    nextTask = nextTask >= 0x7fffffff ? 1 : nextTask + 1;
    contexts.set(task, c);
    const { stored, body } = message.body ?? {};
    let kind = 'none';
    let id = '';
    let text = '';
    if (body instanceof Uint8Array || body instanceof ArrayBuffer) {
      kind = 'buffer';
      id = c.buffers.push(body instanceof ArrayBuffer ? new Uint8Array(body) : body) - 1;
    } else if (typeof body === 'string') {
      kind = 'text';
      text = body;
    }
    try {
      const op = await run(c, task, step(3, task, `${message.attempts ?? 1}\n${kind}\n${id}\n${String(stored ?? '').replace(/\n/g, ' ')}\n${text}`));
      const count = Number(op[4]);
      const line = op[5 + 2 * count];
      if (line) console.log(line);
      for (const reply of c.replies) if (reply && reply.body && !reply.bodyUsed) reply.body.cancel().catch(() => {});
      if (op[1] === '503') {
        const after = Number(headersOf(op, 5, count)['retry-after'] ?? 5);
        message.retry({ delaySeconds: Math.max(0, Math.min(after, 43200)) });
      } else {
        message.ack();
      }
    } catch (e) {
      try { step(2, task, null); } catch { /* the task is gone with the instance */ }
      console.error(JSON.stringify({ level: 'error', kind: 'delivery', message: 'the delivery failed inside the gateway', error: String(e && e.message || e) }));
      message.retry();
    } finally {
      contexts.delete(task);
    }
  }));
}

/** A Worker secret (or plain var) by name, or undefined. */
export function secret(c, name) {
  const value = c && c.env ? c.env[name] : undefined;
  return typeof value === 'string' ? value : (value == null ? undefined : String(value));
}

/** The bytes of a buffer, for the few bodies the wasm must parse (a batch). */
export function bufferBytes(c, id) {
  return c.buffers[id] || new Uint8Array(0);
}

/** Counts against a rate-limiting binding: 1 allowed, 0 over the limit, -1 no such binding, -2 no answer. */
async function rateLimit(c, binding, key) {
  const limiter = c.env[binding];
  if (!limiter || typeof limiter.limit !== 'function') return -1;
  try {
    const { success } = await limiter.limit({ key });
    return success ? 1 : 0;
  } catch {
    return -2;
  }
}

function reader(c) {
  if (c.reader === null && c.request.body !== null) c.reader = c.request.body.getReader();
  return c.reader;
}

/**
 * A body the wasm built (a template's), kept here as the string it is (fetch encodes it when it
 * sends it; encoding it here too would hold it twice): `{id}\n{length}`. The caller's body it
 * was built from, `release`, is let go of.
 */
function keepText(c, release, text) {
  if (release !== '') c.buffers[Number(release)] = undefined;
  return `${c.buffers.push(text) - 1}\n${text.length}`;
}

/** A body read: `{id}\n{length}`; the bytes stay here under the id. */
function keep(c, bytes) {
  return `${c.buffers.push(bytes) - 1}\n${bytes.byteLength}`;
}

const seen = (n) => `seen\n${n}`;
const failed = (e) => `error\n${String(e && e.message || e)}`;

/** The whole body (`{id}\n{length}`), `none` without one, or `seen\n{n}` as soon as it passes the limit. */
async function readBody(c, limit) {
  if (c.request.body === null) return 'none';
  // A body of declared length (the wasm has already refused one over the limit) is read in one
  // native call; a chunked one chunk by chunk, so that it is never read past the limit.
  const declared = c.request.headers.get('content-length');
  if (declared !== null && c.reader === null && Number(declared) <= limit) {
    try {
      const bytes = new Uint8Array(await c.request.arrayBuffer());
      return bytes.byteLength > limit ? seen(bytes.byteLength) : keep(c, bytes);
    } catch (e) {
      return failed(e);
    }
  }
  const r = reader(c);
  const chunks = [];
  let total = 0;
  try {
    for (;;) {
      const { done, value } = await r.read();
      if (done) break;
      total += value.byteLength;
      if (total > limit) {
        r.cancel().catch(() => {});
        return seen(total);
      }
      chunks.push(value);
    }
  } catch (e) {
    return failed(e);
  }
  if (chunks.length === 1) return keep(c, chunks[0]);
  const body = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    body.set(chunk, at);
    at += chunk.byteLength;
  }
  return keep(c, body);
}

/**
 * The next `size` bytes of the body (`{id}\n{length}`; fewer at its end), `none` after the end,
 * or `seen\n{n}` when the body passes `limit` in all (it is never read more than one byte past
 * it). The body is read with a BYOB reader straight into one buffer per upload, reused block
 * after block (the previous block's calls are over when the next is read): the runtime copies
 * its bytes into that buffer, so no chunk of the caller's body is kept or left behind as
 * garbage (with a default reader, every chunk is a new buffer, and 16 uploads of 50 MiB grew
 * workerd by ~300 MB). The first read is into 64 KiB: only a body that does not end there gets
 * a buffer of the block's size, so a small body costs about what it is.
 */
async function nextBlock(c, size, limit) {
  if (c.request.body === null) return 'none';
  if (c.reader === null) c.reader = c.request.body.getReader({ mode: 'byob' });
  const r = c.reader;
  c.buffers = [];
  let buf = c.block ?? new ArrayBuffer(Math.min(size, 64 * 1024));
  c.block = undefined;
  let filled = 0;
  try {
    while (filled < size && !c.ended) {
      if (filled === buf.byteLength) {
        // The first 64 KiB did not hold the body: from here on, one buffer of the block's size.
        const whole = new Uint8Array(size);
        whole.set(new Uint8Array(buf));
        buf = whole.buffer;
      }
      // Never more than one byte past the limit; readAtLeast (workerd's) fills the view in one call.
      const room = Math.min(buf.byteLength - filled, limit + 1 - c.total);
      const view = new Uint8Array(buf, filled, room);
      const { done, value } = r.readAtLeast ? await r.readAtLeast(room, view) : await r.read(view);
      if (value === undefined) return failed('the body was cancelled');
      // The view's buffer was handed over (detached) and comes back in `value`.
      buf = value.buffer;
      filled += value.byteLength;
      c.total += value.byteLength;
      if (c.total > limit) {
        r.cancel().catch(() => {});
        return seen(c.total);
      }
      if (done) c.ended = true;
    }
  } catch (e) {
    return failed(e);
  }
  c.block = buf;
  if (filled === 0) return 'none';
  return keep(c, new Uint8Array(buf, 0, filled));
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

// The reply headers the core reads (through `Reply::header`): the only ones handed to the wasm.
const REPLY_HEADERS = ['retry-after', 'x-ms-error-code', 'etag', 'content-type', 'content-length', 'last-modified'];

/**
 * One outbound request: the op's fields are send, url, method, kind, id, length, deadlineMs,
 * idleMs, more reply header names (comma-separated, lowercase), the header count, the headers,
 * and a text body. `kind` none | buffer (`id`: its id) | text | caller (the caller's own stream;
 * `length` keeps its Content-Length). Time limits:
 * - deadlineMs (whole calls): the request, the reply's headers and, for replies read whole, its
 *   body must be done within it;
 * - idleMs (streamed calls): cut off only when no bytes move for idleMs, in either direction.
 * Resolves `{reply id}\n{status}` and the headers the core reads (`\n{name}\n{value}` each; the
 * reply stays here, under its id, for 'text' or the answer), or `error\n{timeout | what failed}`.
 */
async function send(c, op) {
  const [, url, method, kind] = op;
  const length = Number(op[5]);
  let deadlineMs = Number(op[6]);
  let idleMs = Number(op[7]);
  const more = op[8];
  const count = Number(op[9]);
  // Never follow a backend's redirect: it would carry the token to wherever it points. A 3xx is
  // the core's to answer.
  const init = { method, headers: headersOf(op, 10, count), redirect: 'manual' };
  const body = kind === 'buffer' ? c.buffers[Number(op[4])] : kind === 'text' ? op[10 + 2 * count] : kind === 'caller' ? (c.request.body ?? new Uint8Array(0)) : null;
  let response;
  // A reply streamed back to the caller (a GET) is watched for progress, chunk by chunk. The
  // caller's own body going out is not: a JavaScript stream in its path costs every chunk a trip
  // through the JavaScript heap (measured: 16 uploads of 50 MB grew workerd by 380 MB instead of
  // 30, at a third of the speed). It goes natively, with a deadline that grows with its length:
  // the idle limit plus its length at 64 KiB/s, so only a transfer slower than that on average,
  // or stalled, is cut off.
  const watchDown = method === 'GET';
  if (idleMs > 0 && !watchDown) {
    deadlineMs = idleMs + (length > 0 ? length / 65.536 : 0);
    idleMs = 0;
  }
  try {
    if (!(idleMs > 0)) {
      init.signal = AbortSignal.timeout(Math.max(1, deadlineMs));
      if (body !== null) init.body = body;
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
      if (body instanceof ReadableStream) {
        // Waiting for the answer after the last byte went out counts as idle time too.
        const progress = body.pipeThrough(watched(arm, arm));
        if (length >= 0) {
          // A fixed length keeps the Content-Length (Put Blob needs it) instead of chunked encoding.
          const fixed = new FixedLengthStream(length);
          progress.pipeTo(fixed.writable).catch(() => {});
          init.body = fixed.readable;
        } else {
          init.body = progress;
        }
      } else if (body !== null) {
        init.body = body;
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
        let body = response.body.pipeThrough(watched(arm, disarm));
        // The watch must not cost the caller Azure's length: a plain stream is answered chunked.
        // A FixedLengthStream of that length keeps it (and errors if fewer bytes come). Not when
        // the body is content-encoded: fetch decodes it, and the length is the encoded one.
        const declared = response.headers.get('content-length');
        const encoding = response.headers.get('content-encoding');
        if (declared !== null && /^\d+$/.test(declared) && (encoding === null || encoding === 'identity')) {
          body = body.pipeThrough(new FixedLengthStream(Number(declared)));
        }
        response = new Response(body, response);
      }
    }
  } catch (e) {
    if (e && e.name === 'TimeoutError') return 'error\ntimeout';
    return failed(e);
  }
  let result = `${c.replies.push(response) - 1}\n${response.status}`;
  for (const name of REPLY_HEADERS) {
    const value = response.headers.get(name);
    if (value !== null) result += `\n${name}\n${value}`;
  }
  if (more) {
    for (const name of more.split(',')) {
      const value = response.headers.get(name);
      if (value !== null && !REPLY_HEADERS.includes(name)) result += `\n${name}\n${value}`;
    }
  }
  return result;
}

const decoder = new TextDecoder();

/**
 * A reply's body, read only up to `limit` bytes: `{ bytes }`, or `{ over: n }` as soon as it
 * passes the limit (n: the bytes seen, at least). Past the limit nothing more is read: the body is
 * cancelled, so an answer of any size costs at most the limit here, and a body whose declared
 * length is over the limit is refused without reading a byte of it. All of it runs here, chunk by
 * chunk, with no call into or out of the wasm. Throws when the body breaks off.
 */
async function readLimited(response, limit) {
  const body = response.body;
  if (body === null) return { bytes: new Uint8Array(0) };
  const declared = response.headers.get('content-length');
  if (declared !== null && Number(declared) > limit) {
    body.cancel().catch(() => {});
    return { over: Number(declared) };
  }
  const reader = body.getReader();
  // With a declared length, chunks are copied into one buffer of that length as they come (each
  // is garbage at once, not kept to the end and copied again); what does not fit (a body that
  // is longer once decoded) is kept as chunks after it.
  const whole = declared !== null && Number(declared) > 0 ? new Uint8Array(Number(declared)) : null;
  let filled = 0;
  const chunks = [];
  let total = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    total += value.byteLength;
    if (total > limit) {
      reader.cancel().catch(() => {});
      return { over: total };
    }
    if (whole !== null && chunks.length === 0 && filled + value.byteLength <= whole.byteLength) {
      whole.set(value, filled);
      filled += value.byteLength;
    } else {
      chunks.push(value);
    }
  }
  if (whole !== null) {
    if (chunks.length === 0) return { bytes: filled === whole.byteLength ? whole : whole.subarray(0, filled) };
    chunks.unshift(whole.subarray(0, filled));
  }
  if (chunks.length === 1) return { bytes: chunks[0] };
  const bytes = new Uint8Array(total);
  let at = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, at);
    at += chunk.byteLength;
  }
  chunks.length = 0;
  return { bytes };
}

/** Answers up to this size go to the wasm as text in the op's result; larger ones as bytes. */
const TEXT_IN_RESULT = 16 * 1024;

/**
 * A reply's body, up to `limit` bytes (readLimited): `text\n{text}` for a small one; `bytes\n{id}`
 * for a larger one, kept here until the wasm takes its bytes (`takeBytes`: one call, and no
 * string of it on either side); `over\n{bytes seen}` past the limit; or `error\n{timeout | what
 * failed}` when it broke off.
 */
async function text(c, id, limit) {
  const response = c.replies[id];
  c.replies[id] = undefined;
  if (!response) return 'text\n';
  try {
    const read = await readLimited(response, limit);
    if (read.over !== undefined) return `over\n${read.over}`;
    if (read.bytes.byteLength <= TEXT_IN_RESULT) return `text\n${decoder.decode(read.bytes)}`;
    return `bytes\n${c.buffers.push(read.bytes) - 1}`;
  } catch (e) {
    return e && e.name === 'TimeoutError' ? 'error\ntimeout' : failed(e);
  }
}

/** The bytes the wasm asked for (a large answer `text` kept), let go of here. */
export function takeBytes(c, id) {
  const bytes = c.buffers[id] || new Uint8Array(0);
  c.buffers[id] = undefined;
  return bytes;
}

/** A key set of at most `limit` bytes: `{status}\n{text}`, `over\n{bytes seen}`, or `error\n{timeout | what failed}`. */
async function fetchJwks(url, deadlineMs, limit) {
  try {
    const [status, , text, over] = JSON.parse(await fetchText(url, 'GET', 'accept\napplication/json', null, deadlineMs, limit));
    return over !== null ? `over\n${over}` : `${status}\n${text}`;
  } catch (e) {
    return e && e.name === 'TimeoutError' ? 'error\ntimeout' : failed(e);
  }
}

function fromBase64url(text) {
  const b64 = text.replace(/-/g, '+').replace(/_/g, '/');
  const bin = atob(b64 + '==='.slice((b64.length + 3) % 4));
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

/** WebCrypto verification of a JWS signature with a public JWK (JSON); data and signature base64url. */
async function verify(alg, jwk, data, signature) {
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
    return await crypto.subtle.verify(verifyParams, key, fromBase64url(signature), fromBase64url(data));
  } catch {
    return false;
  }
}

/**
 * A request whose answer is read as text up to `limit` bytes (readLimited), with a deadline:
 * [status, retry-after, text, null] as one string, or [status, retry-after, '', bytes seen] for
 * an answer past the limit.
 */
export async function fetchText(url, method, headers, body, deadlineMs, limit) {
  const init = { method, headers: pairs(headers), signal: AbortSignal.timeout(Math.max(1, deadlineMs)) };
  // A token request carries the client's credential: a redirect must not take it elsewhere.
  if (method !== 'GET') init.redirect = 'manual';
  if (body !== null && body !== undefined) init.body = body;
  let response;
  let read;
  try {
    response = await fetch(url, init);
    read = await readLimited(response, limit);
  } catch (e) {
    if (init.signal.aborted) throw timeoutError('no answer within the time limit');
    throw e;
  }
  const text = read.bytes ? decoder.decode(read.bytes) : '';
  return JSON.stringify([response.status, response.headers.get('retry-after'), text, read.over ?? null]);
}

/** Resolves after `ms` milliseconds. */
function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

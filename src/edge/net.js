// Outbound fetch for the edge, in one call from wasm: the headers go over as one array, and the
// time limits are watched here, on the JavaScript side, so no bytes of a streamed body cross into
// wasm memory and no timer crosses back per chunk.
//
// Two kinds of limit:
// - deadlineMs (a whole call): the request, the answer's headers and, for answers the wasm reads
//   whole, its body must be done within it (AbortSignal.timeout).
// - idleMs (a streamed call): the call is cut off only when no bytes move for idleMs, in either
//   direction: request body chunks handed to the runtime, or answer body chunks handed on. A slow
//   50 MB transfer that keeps moving is never cut off; a stalled one is, after idleMs.

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

/**
 * fetch(url) with `method`, `headers` ([[name, value], …]) and `body` (null, bytes, a string or a
 * ReadableStream). `length`: the body's length for a stream (it keeps its Content-Length), or -1.
 */
export async function send(url, method, headers, body, length, deadlineMs, idleMs) {
  const init = { method, headers: new Headers(headers) };
  if (!(idleMs > 0)) {
    init.signal = AbortSignal.timeout(Math.max(1, deadlineMs));
    if (body != null) init.body = body;
    try {
      return await fetch(url, init);
    } catch (e) {
      if (init.signal.aborted) throw timeoutError('no answer within the time limit');
      throw e;
    }
  }

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
  } else if (body != null) {
    init.body = body;
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (e) {
    disarm();
    if (controller.signal.aborted) throw timeoutError('no bytes moved within the idle time limit');
    throw e;
  }
  if (response.body === null) {
    disarm();
    return response;
  }
  arm();
  const streamed = response.body.pipeThrough(watched(arm, disarm));
  return new Response(streamed, response);
}

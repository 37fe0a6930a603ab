/**
 * The peer: what an idiomatic JavaScript Worker doing the gateway's two writes looks like, to
 * compare the Rust/wasm gateway against on the same runtime (wrangler dev, bare workerd).
 * - POST /sb/{tenant}  -> Service Bus Send Message (BrokerProperties with a fresh MessageId);
 *                         `?hold`: as the gateway must send it (body read whole and checked
 *                         against Service Bus's 256 KiB, a 30 s deadline, redirects not followed),
 *                         to tell what those guarantees cost from what the gateway costs
 * - PUT  /blob/{kind}  -> Blob Put Blob, body streamed through (bench/peer/{kind}/{uuid})
 * - POST /eh/{device}  -> Event Hubs send of one event (the body streamed through, no partition
 *                         key: Event Hubs spreads the events), answered like the gateway's 202
 * - anything else      -> 404 application/problem+json, shaped like the gateway's
 * Tokens: OAuth2 client credentials, cached per audience at module level (one fetch in flight
 * per audience; refreshed 5 minutes before expiry).
 * Every request writes one JSON console.log line shaped like the gateway's (src/pipeline.rs
 * LogLine: level, request_id, method, path, route, status, duration_ms, and problem / identity /
 * token / idp_ms / token_ttl_s / backend_status when they apply), so that both pay for a log line.
 * `?nolog` skips it (bench only: what the line costs under wrangler dev).
 * Every answer carries x-request-id (the caller's when it is sane, else a fresh UUID), and the
 * answers are the gateway's byte for byte where both answer (the 404 problem with its detail and
 * Cache-Control: no-store, the send's {entity, messageId, status}): the comparison is of the same
 * answer, written two ways.
 * Vars: TOKEN_URL, CLIENT_ID, SB_URL, SB_QUEUE, BLOB_URL, BLOB_CONTAINER, EH_URL, EH_HUB; secret
 * CLIENT_SECRET.
 */
const SB_AUDIENCE = 'https://servicebus.azure.net';
const STORAGE_AUDIENCE = 'https://storage.azure.com';
const EVENTHUBS_AUDIENCE = 'https://eventhubs.azure.net';
const tokens = new Map(); // audience -> { token, expiresAt } | { pending: Promise }

/** A token for `audience` and where it came from (cache / fetched / waited), noted in `log`. */
async function token(env, audience, log) {
  log.identity = 'bench';
  const hit = tokens.get(audience);
  if (hit?.token && hit.expiresAt - 300_000 > Date.now()) return noteToken(log, 'cache', hit);
  if (hit?.pending) return noteToken(log, 'waited', await hit.pending);
  const started = Date.now();
  const pending = (async () => {
    const res = await fetch(env.TOKEN_URL, {
      method: 'POST',
      headers: { 'content-type': 'application/x-www-form-urlencoded' },
      body: new URLSearchParams({
        grant_type: 'client_credentials',
        client_id: env.CLIENT_ID,
        client_secret: env.CLIENT_SECRET,
        scope: `${audience}/.default`,
      }),
    });
    if (!res.ok) throw new Error(`token endpoint: HTTP ${res.status}`);
    const body = await res.json();
    const entry = { token: body.access_token, expiresAt: Date.now() + Number(body.expires_in) * 1000 };
    tokens.set(audience, entry);
    return entry;
  })();
  tokens.set(audience, { pending });
  try {
    const entry = await pending;
    log.idp_ms = Date.now() - started;
    return noteToken(log, 'fetched', entry);
  } catch (err) {
    tokens.delete(audience);
    log.token_error = err.message;
    throw err;
  }
}

function noteToken(log, source, entry) {
  log.token = source;
  log.token_ttl_s = Math.floor((entry.expiresAt - Date.now()) / 1000);
  return entry.token;
}

const json = (status, value) => new Response(JSON.stringify(value), { status, headers: { 'content-type': 'application/json' } });
const problem = (status, kind, title, detail, instance, requestId) => new Response(JSON.stringify({
  type: `urn:azure-edge-gateway:problem:${kind}`, title, status, detail, instance, request_id: requestId,
}), { status, headers: { 'content-type': 'application/problem+json', 'cache-control': 'no-store' } });

async function sendMessage(request, env, tenant, log, hold) {
  const messageId = request.headers.get('idempotency-key') ?? crypto.randomUUID();
  const init = {
    method: 'POST',
    headers: {
      authorization: `Bearer ${await token(env, SB_AUDIENCE, log)}`,
      'content-type': request.headers.get('content-type') ?? 'application/octet-stream',
      brokerproperties: JSON.stringify({ MessageId: messageId }),
      tenant,
    },
    body: request.body,
  };
  if (hold) {
    // What the gateway does to be able to send the same bytes again and to bound each attempt.
    const body = new Uint8Array(await request.arrayBuffer());
    if (body.byteLength > 262_144) return json(413, { error: 'too large' });
    init.body = body;
    init.signal = AbortSignal.timeout(30_000);
    init.redirect = 'manual';
  }
  const res = await fetch(`${env.SB_URL}/${env.SB_QUEUE}/messages`, init);
  await res.arrayBuffer();
  log.backend_status = res.status;
  if (res.status !== 201) return json(502, { error: 'backend', backend_status: res.status });
  return json(202, { entity: env.SB_QUEUE, messageId, status: 'accepted' });
}

async function sendEvent(request, env, log) {
  const res = await fetch(`${env.EH_URL}/${env.EH_HUB}/messages`, {
    method: 'POST',
    headers: {
      authorization: `Bearer ${await token(env, EVENTHUBS_AUDIENCE, log)}`,
      'content-type': request.headers.get('content-type') ?? 'application/octet-stream',
    },
    body: request.body,
  });
  await res.arrayBuffer();
  log.backend_status = res.status;
  if (res.status !== 201) return json(502, { error: 'backend', backend_status: res.status });
  return json(202, { count: 1, hub: env.EH_HUB, status: 'accepted' });
}

async function putBlob(request, env, kind, log) {
  const blob = `bench/peer/${kind}/${crypto.randomUUID()}`;
  const res = await fetch(`${env.BLOB_URL}/${env.BLOB_CONTAINER}/${blob}`, {
    method: 'PUT',
    headers: {
      authorization: `Bearer ${await token(env, STORAGE_AUDIENCE, log)}`,
      'x-ms-version': '2021-08-06',
      'x-ms-date': new Date().toUTCString(),
      'x-ms-blob-type': 'BlockBlob',
      'content-type': request.headers.get('content-type') ?? 'application/octet-stream',
    },
    body: request.body, // streamed; workerd keeps the incoming Content-Length
  });
  await res.arrayBuffer();
  log.backend_status = res.status;
  if (res.status !== 201) return json(502, { error: 'backend', backend_status: res.status });
  return json(201, { container: env.BLOB_CONTAINER, blob, etag: res.headers.get('etag') });
}

async function handle(request, env, log, requestId, url) {
  const [, first, param, extra] = log.path.split('/');
  if (param && extra === undefined) {
    if (first === 'sb' && request.method === 'POST') {
      log.route = 'sb-send';
      return sendMessage(request, env, decodeURIComponent(param), log, url.searchParams.has('hold'));
    }
    if (first === 'eh' && request.method === 'POST') {
      log.route = 'eh-send';
      return sendEvent(request, env, log);
    }
    if (first === 'blob' && request.method === 'PUT') {
      log.route = 'blob-write';
      return putBlob(request, env, decodeURIComponent(param), log);
    }
  }
  log.problem = 'route-not-found';
  return problem(404, 'route-not-found', 'No route for this path',
    `No route of this gateway matches the path ${log.path}; check the URL against the routes in policy.json (\`policy explain\` lists them).`, log.path, requestId);
}

const SANE_ID = /^[A-Za-z0-9._:-]{1,128}$/;

export default {
  async fetch(request, env) {
    const started = Date.now();
    const url = new URL(request.url);
    const callerId = request.headers.get('x-request-id');
    const requestId = callerId && SANE_ID.test(callerId) ? callerId : crypto.randomUUID();
    const log = { request_id: requestId, method: request.method, path: url.pathname, route: null };
    let response;
    try {
      response = await handle(request, env, log, requestId, url);
    } catch (err) {
      log.problem = 'internal';
      response = problem(500, 'internal', 'Internal error', 'The peer failed.', log.path, requestId);
    }
    response.headers.set('x-request-id', requestId);
    if (!url.searchParams.has('nolog')) {
      const { request_id, method, path, route, ...rest } = log;
      console.log(JSON.stringify({
        level: response.status >= 500 ? 'error' : 'info', request_id, method, path, route,
        status: response.status, duration_ms: Date.now() - started, ...rest,
      }));
    }
    return response;
  },
};

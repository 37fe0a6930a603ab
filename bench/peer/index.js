/**
 * The peer: what an idiomatic JavaScript Worker doing the gateway's two writes looks like, to
 * compare the Rust/wasm gateway against under the same wrangler dev / workerd.
 * - POST /sb/{tenant}  -> Service Bus Send Message (BrokerProperties with a fresh MessageId)
 * - PUT  /blob/{kind}  -> Blob Put Blob, body streamed through (bench/peer/{kind}/{uuid})
 * Tokens: OAuth2 client credentials, cached per audience at module level (one fetch in flight
 * per audience; refreshed 5 minutes before expiry).
 * Vars: TOKEN_URL, CLIENT_ID, SB_URL, SB_QUEUE, BLOB_URL, BLOB_CONTAINER; secret CLIENT_SECRET.
 */
const SB_AUDIENCE = 'https://servicebus.azure.net';
const STORAGE_AUDIENCE = 'https://storage.azure.com';
const tokens = new Map(); // audience -> { token, expiresAt } | { pending: Promise }

async function token(env, audience) {
  const hit = tokens.get(audience);
  if (hit?.token && hit.expiresAt - 300_000 > Date.now()) return hit.token;
  if (hit?.pending) return hit.pending;
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
    tokens.set(audience, { token: body.access_token, expiresAt: Date.now() + Number(body.expires_in) * 1000 });
    return body.access_token;
  })();
  tokens.set(audience, { pending });
  try {
    return await pending;
  } catch (err) {
    tokens.delete(audience);
    throw err;
  }
}

const json = (status, value) => new Response(JSON.stringify(value), { status, headers: { 'content-type': 'application/json' } });

async function sendMessage(request, env, tenant) {
  const messageId = request.headers.get('idempotency-key') ?? crypto.randomUUID();
  const res = await fetch(`${env.SB_URL}/${env.SB_QUEUE}/messages`, {
    method: 'POST',
    headers: {
      authorization: `Bearer ${await token(env, SB_AUDIENCE)}`,
      'content-type': request.headers.get('content-type') ?? 'application/octet-stream',
      brokerproperties: JSON.stringify({ MessageId: messageId }),
      tenant,
    },
    body: request.body,
  });
  await res.arrayBuffer();
  if (res.status !== 201) return json(502, { error: 'backend', backend_status: res.status });
  return json(202, { entity: env.SB_QUEUE, messageId });
}

async function putBlob(request, env, kind) {
  const blob = `bench/peer/${kind}/${crypto.randomUUID()}`;
  const res = await fetch(`${env.BLOB_URL}/${env.BLOB_CONTAINER}/${blob}`, {
    method: 'PUT',
    headers: {
      authorization: `Bearer ${await token(env, STORAGE_AUDIENCE)}`,
      'x-ms-version': '2021-08-06',
      'x-ms-date': new Date().toUTCString(),
      'x-ms-blob-type': 'BlockBlob',
      'content-type': request.headers.get('content-type') ?? 'application/octet-stream',
    },
    body: request.body, // streamed; workerd keeps the incoming Content-Length
  });
  await res.arrayBuffer();
  if (res.status !== 201) return json(502, { error: 'backend', backend_status: res.status });
  return json(201, { container: env.BLOB_CONTAINER, blob, etag: res.headers.get('etag') });
}

export default {
  async fetch(request, env) {
    const { pathname, searchParams } = new URL(request.url);
    // Bench only: ?log makes the peer print one JSON line like the gateway's per-request log, to
    // measure what a log line costs under wrangler dev (the idiomatic peer logs nothing).
    if (searchParams.has('log')) {
      console.log(JSON.stringify({ duration_ms: 0, level: 'info', method: request.method, path: pathname, problem: 'route-not-found', request_id: crypto.randomUUID(), route: null, status: 404 }));
    }
    const [, first, param, extra] = pathname.split('/');
    if (param && extra === undefined) {
      if (first === 'sb' && request.method === 'POST') return sendMessage(request, env, decodeURIComponent(param));
      if (first === 'blob' && request.method === 'PUT') return putBlob(request, env, decodeURIComponent(param));
    }
    return json(404, { error: 'not found' });
  },
};

/**
 * A stub Azure API for the tests and the bench of answer and body sizes: a plain node:http server
 * on 127.0.0.1 that answers as large as it is asked to, records what it sent and received, and
 * starts and reports long-running operations whose answers carry secrets. It checks no token
 * (the gateway's token handling is tested against the Resource Manager stand-in, dev/arm.mjs).
 *
 * Routes (any query string is ignored, the gateway's api-version too):
 *   GET  /big/{bytes}          200 application/json, a JSON document of exactly {bytes} bytes
 *                              ({"name":"big","id":"…","properties":{"secret":"…","padding":"xxx…"}}),
 *                              with Content-Length; /big/{bytes}/chunked without it (chunked).
 *                              Written in 64 KiB writes that wait for the socket (backpressure), so
 *                              what it "sent" is what the client took, give or take socket buffers.
 *   GET  /error/{bytes}        400 with an ARM error body ({"error":{"code":"BadThing","message":…}})
 *                              padded to {bytes}, x-ms-error-code: BadThing.
 *   POST|PUT /sink             reads the body whole, 201 {"received": n}.
 *   POST /start                202, Azure-AsyncOperation: {url}/ops/{id}, Retry-After: 1, no body.
 *   GET  /ops/{id}             200 {"id","name","status":"Succeeded","startTime","endTime",
 *                              "percentComplete":100,"error":{"code","message","details"},
 *                              "properties":{"connectionString":SECRET,"adminPassword":SECRET}}
 *   GET  /ops-big/{bytes}      200, an operation answer padded to {bytes} (properties.padding).
 * Each request is recorded: { method, path, status, sentBytes (body bytes written), finished
 * (the whole answer written), aborted (the client closed the connection first), receivedBytes }.
 *
 * startAnswersStub({ port }) resolves { url, port, requests(), clear(), stop() }.
 */
import { randomUUID } from 'node:crypto';
import { createServer } from 'node:http';

export const SECRET = 'Server=tcp:db;Password=not-for-callers';
const CHUNK = 64 * 1024;

export async function startAnswersStub({ port, host = '127.0.0.1' }) {
  const records = [];
  const sockets = new Set();
  const url = `http://${host}:${port}`;
  const server = createServer((req, res) => {
    const path = new URL(req.url, url).pathname;
    const record = { method: req.method, path, status: 0, sentBytes: 0, finished: false, aborted: false, receivedBytes: 0 };
    records.push(record);
    if (records.length > 200) records.shift();
    res.on('close', () => { if (!record.finished) record.aborted = true; });
    handle(req, res, path, record, url).catch((err) => {
      if (!res.headersSent) answer(res, record, 500, { error: { code: 'StubFailed', message: err.message } });
      else res.destroy();
    });
  });
  server.on('connection', (s) => { sockets.add(s); s.on('close', () => sockets.delete(s)); });
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, resolve);
  });
  return {
    url,
    port,
    requests: () => records.map((r) => ({ ...r })),
    clear: () => { records.length = 0; },
    stop: () => new Promise((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
}

async function handle(req, res, path, record, url) {
  const seg = path.split('/').filter(Boolean);
  if ((req.method === 'POST' || req.method === 'PUT') && path === '/sink') {
    for await (const chunk of req) record.receivedBytes += chunk.length;
    return answer(res, record, 201, { received: record.receivedBytes });
  }
  for await (const chunk of req) record.receivedBytes += chunk.length;
  if (req.method === 'GET' && seg[0] === 'big' && seg.length >= 2) {
    return padded(res, record, 200, { name: 'big', id: '/big/1', properties: { secret: SECRET } }, Number(seg[1]), seg[2] === 'chunked');
  }
  if (req.method === 'GET' && seg[0] === 'error' && seg.length === 2) {
    return padded(res, record, 400, { error: { code: 'BadThing', message: 'The request was bad.' } }, Number(seg[1]), false, { 'x-ms-error-code': 'BadThing' });
  }
  if (req.method === 'POST' && path === '/start') {
    res.writeHead(202, { 'azure-asyncoperation': `${url}/ops/${randomUUID()}`, 'retry-after': '1', 'content-length': '0' });
    record.status = 202;
    record.finished = true;
    return res.end();
  }
  if (req.method === 'GET' && seg[0] === 'ops' && seg.length === 2) {
    return answer(res, record, 200, operation(seg[1]));
  }
  if (req.method === 'GET' && seg[0] === 'ops-big' && seg.length === 2) {
    return padded(res, record, 200, operation('big'), Number(seg[1]), false);
  }
  return answer(res, record, 404, { error: { code: 'NotFound', message: `no stub route ${req.method} ${path}` } });
}

function operation(id) {
  return {
    id: `/subscriptions/s1/providers/Microsoft.Stub/locations/westeurope/operationResults/${id}`,
    name: id,
    status: 'Succeeded',
    startTime: '2026-12-01T10:00:00.0000000Z',
    endTime: '2026-12-01T10:00:05.0000000Z',
    percentComplete: 100,
    error: { code: 'None', message: 'no error', details: [{ code: 'Inner', message: SECRET }] },
    properties: { connectionString: SECRET, adminPassword: SECRET },
  };
}

function answer(res, record, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': String(Buffer.byteLength(text)), 'x-ms-request-id': randomUUID() });
  record.status = status;
  record.sentBytes = Buffer.byteLength(text);
  record.finished = true;
  res.end(text);
}

/** `doc` with `properties.padding` (or a top-level padding) so that its JSON text is `bytes` long. */
function padded(res, record, status, doc, bytes, chunked, headers = {}) {
  const target = doc.properties ?? doc.error ?? doc;
  target.padding = '';
  const bare = Buffer.byteLength(JSON.stringify(doc));
  const pad = Math.max(0, bytes - bare);
  const text = JSON.stringify(doc);
  const at = text.indexOf('"padding":""') + '"padding":"'.length;
  const head = Buffer.from(text.slice(0, at));
  const tail = Buffer.from(text.slice(at));
  const total = head.length + pad + tail.length;
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'x-ms-request-id': randomUUID(),
    ...(chunked ? {} : { 'content-length': String(total) }),
    ...headers,
  });
  record.status = status;
  const fill = Buffer.alloc(CHUNK, 0x78);
  let left = pad;
  const write = (buf) => { record.sentBytes += buf.length; return res.write(buf); };
  return new Promise((resolve) => {
    res.on('close', resolve);
    write(head);
    const pump = () => {
      while (left > 0) {
        if (res.destroyed) return;
        const n = Math.min(CHUNK, left);
        left -= n;
        if (!write(n === CHUNK ? fill : fill.subarray(0, n))) return void res.once('drain', pump);
      }
      write(tail);
      record.finished = true;
      res.end();
    };
    pump();
  });
}

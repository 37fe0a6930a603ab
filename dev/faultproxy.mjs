/**
 * A fault-injecting HTTPS front for a local TLS service (Azurite), for the fault and load suite
 * (bench/faults): Azurite has no way to fail requests on demand, so the gateway is pointed at
 * this proxy, which forwards everything to Azurite except the requests it is told to fail.
 *
 * - A fault ({ status = 503, probability?, seed?, count?, retryAfter? }, see faultSwitch in
 *   dev/faults.mjs) hits writes only (PUT, POST, DELETE by default: `faultMethods`): the request
 *   is answered with Storage's error shape (`<Error><Code>ServerBusy</Code>…`, x-ms-error-code)
 *   and never forwarded, so what it failed is never stored.
 * - With `storedShare`, that share of the failures comes after the write: it is forwarded, and
 *   when Azurite took it (2xx) its answer is replaced by `storedStatus` (default 500,
 *   OperationTimedOut: Storage's "may or may not have completed") after `storedDelayMs`, or, with
 *   `storedMode: 'reset'`, the connection is dropped unanswered. Azurite's refusals pass through.
 * - The arrivals ledger (`arrivals()`, GET /__control/arrivals): per blob path, every write of
 *   the blob (Put Blob, Put Block List) that reached the proxy and its outcome: { arrived,
 *   refused (by a fault, not forwarded), stored (Azurite answered 2xx), conflicts (Azurite
 *   answered 409), answersLost (stored, then failed; or Azurite dropped the connection, so that
 *   it may have stored it), acknowledged (2xx delivered), afterAck
 *   (arrived after a 2xx for that path had been delivered: a write no failure explains) }.
 * - An outage ({ seconds, status = 503, mode = 'status' | 'reset' }) fails every request for that
 *   long ('reset': the connection is dropped unanswered).
 * Control, in process (setFault, clearFault, setOutage, clearOutage, stats) and over HTTPS
 * (/__control/faults, /__control/outage, /__control/stats; GET, POST, DELETE as the issuer's).
 * It serves with the certificate given (Azurite's, which the worker already trusts) and trusts
 * `ca` towards the target.
 */
import { readFileSync } from 'node:fs';
import { Agent, createServer, request } from 'node:https';
import { faultSwitch } from './faults.mjs';

const STORAGE_MESSAGES = {
  500: ['InternalError', 'The server encountered an internal error. Please retry the request.'],
  'after-store': ['OperationTimedOut', 'Operation could not be completed within the specified time.'],
  503: ['ServerBusy', 'The server is currently unable to receive requests. Please retry your request.'],
};

/**
 * Start the proxy on 127.0.0.1:port in front of `target` (an https origin such as
 * https://127.0.0.1:10000). Returns { url (origin), port, setFault, clearFault, setOutage,
 * clearOutage, outage, stats, arrivals, resetStats, stop }.
 */
export async function startFaultProxy({ port, target, certPath, keyPath, ca, faultMethods = ['PUT', 'POST', 'DELETE'], log = () => {} }) {
  const to = new URL(target);
  const switches = faultSwitch({ storable: true });
  const stats = { requests: 0, forwarded: 0, upstreamErrors: 0, faultsBeforeStore: 0, faultsAfterStore: 0 };
  /** path → the arrivals of writes of that blob (see above). */
  const ledger = new Map();
  const blank = () => ({ arrived: 0, refused: 0, stored: 0, conflicts: 0, answersLost: 0, acknowledged: 0, afterAck: 0 });
  const agent = new Agent({ keepAlive: true, maxSockets: 256, ca });
  const server = createServer({ cert: readFileSync(certPath), key: readFileSync(keyPath) }, (req, res) => {
    if (req.url.startsWith('/__control/')) {
      control(req, res).catch((err) => sendJson(res, 500, { error: err.message }));
      return;
    }
    stats.requests += 1;
    const decision = switches.decide(faultMethods.includes(req.method));
    const entry = blobWrite(req) ? arrival(req.url) : null;
    if (decision?.mode === 'reset') {
      req.socket.destroy();
      return;
    }
    if (decision && !decision.afterStore) {
      if (entry) entry.refused += 1;
      if (!switches.outage()) stats.faultsBeforeStore += 1;
      // Read the body away first: answering mid-upload makes some clients see a reset.
      req.resume();
      req.on('end', () => storageError(res, decision));
      return;
    }
    stats.forwarded += 1;
    const upstream = request({
      host: to.hostname, port: to.port, method: req.method, path: req.url, agent,
      headers: { ...req.headers, host: to.host },
    }, (answer) => {
      const ok = answer.statusCode >= 200 && answer.statusCode < 300;
      if (entry && ok) entry.stored += 1;
      if (entry && answer.statusCode === 409) entry.conflicts += 1;
      if (decision?.afterStore && ok) {
        // Taken by Azurite; the answer is lost.
        stats.faultsAfterStore += 1;
        if (entry) entry.answersLost += 1;
        answer.resume();
        answer.on('end', () => setTimeout(() => {
          if (decision.afterStore.mode === 'reset') req.socket.destroy();
          else storageError(res, { status: decision.afterStore.status, code: 'after-store' });
        }, decision.afterStore.delayMs));
        return;
      }
      if (entry && ok) entry.acknowledged += 1;
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    upstream.on('error', (err) => {
      stats.upstreamErrors += 1;
      // Azurite dropped the connection (it does under load): the write may or may not have
      // landed, and the gateway gets a 502 (or a reset) for it, as for a lost answer. A resend
      // after it is explained by it.
      if (entry) entry.answersLost += 1;
      log(`faultproxy: upstream ${req.method} ${req.url}: ${err.message}`);
      if (!res.headersSent) storageError(res, { status: 502 });
      else res.destroy();
    });
    req.pipe(upstream);
  });

  /** A write of a whole blob: Put Blob or Put Block List (not Put Block, nor a read). */
  function blobWrite(req) {
    if (req.method !== 'PUT') return false;
    const comp = new URL(req.url, 'https://x').searchParams.get('comp');
    return comp === null || comp === 'blocklist';
  }
  function arrival(url) {
    const path = new URL(url, 'https://x').pathname;
    let entry = ledger.get(path);
    if (!entry) ledger.set(path, (entry = blank()));
    entry.arrived += 1;
    if (entry.acknowledged > 0) entry.afterAck += 1;
    return entry;
  }

  async function control(req, res) {
    const path = new URL(req.url, 'https://x').pathname.replace(/\/$/, '');
    const body = req.method === 'POST' ? JSON.parse((await readAll(req)) || '{}') : null;
    try {
      switch (`${req.method} ${path}`) {
        case 'GET /__control/stats': return sendJson(res, 200, { ...stats, ...switches.counts() });
        case 'GET /__control/arrivals': return sendJson(res, 200, Object.fromEntries(ledger));
        case 'DELETE /__control/stats': resetStats(); return sendJson(res, 200, { ...stats, ...switches.counts() });
        case 'GET /__control/faults': return sendJson(res, 200, { fault: switches.fault() });
        case 'POST /__control/faults': return sendJson(res, 200, { fault: switches.setFault(body) });
        case 'DELETE /__control/faults': switches.clearFault(); return sendJson(res, 200, { fault: null });
        case 'GET /__control/outage': return sendJson(res, 200, { outage: switches.outage() });
        case 'POST /__control/outage': return sendJson(res, 200, { outage: switches.setOutage(body) });
        case 'DELETE /__control/outage': switches.clearOutage(); return sendJson(res, 200, { outage: null });
        default: return sendJson(res, 404, { error: `no control route ${req.method} ${path}` });
      }
    } catch (err) {
      return sendJson(res, 400, { error: err.message });
    }
  }
  function resetStats() {
    Object.assign(stats, { requests: 0, forwarded: 0, upstreamErrors: 0, faultsBeforeStore: 0, faultsAfterStore: 0 });
    switches.resetCounts();
    ledger.clear();
  }

  await new Promise((resolveListen, rejectListen) => {
    server.once('error', (err) => rejectListen(new Error(`faultproxy cannot listen on 127.0.0.1:${port}: ${err.message}`)));
    server.listen(port, '127.0.0.1', resolveListen);
  });
  const url = `https://127.0.0.1:${server.address().port}`;
  return {
    url,
    port: server.address().port,
    setFault: (f) => switches.setFault(f),
    clearFault: () => switches.clearFault(),
    setOutage: (o) => switches.setOutage(o),
    clearOutage: () => switches.clearOutage(),
    outage: () => switches.outage(),
    stats: () => ({ ...stats, ...switches.counts() }),
    /** The arrivals ledger: blob path → { arrived, refused, stored, conflicts, answersLost, acknowledged, afterAck }. */
    arrivals: () => new Map([...ledger].map(([k, v]) => [k, { ...v }])),
    resetStats,
    stop: () => new Promise((resolveStop) => {
      agent.destroy();
      server.close(() => resolveStop());
      server.closeAllConnections();
    }),
  };
}

function storageError(res, { status, retryAfter, code: kind }) {
  const [code, message] = STORAGE_MESSAGES[kind ?? status] ?? ['InjectedFault', 'Injected fault.'];
  const body = `<?xml version="1.0" encoding="utf-8"?><Error><Code>${code}</Code><Message>${message} (injected)</Message></Error>`;
  const headers = { 'content-type': 'application/xml', 'content-length': Buffer.byteLength(body), 'x-ms-error-code': code };
  if (retryAfter !== undefined) headers['retry-after'] = String(retryAfter);
  res.writeHead(status, headers);
  res.end(body);
}

function sendJson(res, status, value) {
  const text = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function readAll(req) {
  return new Promise((resolveBody, rejectBody) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolveBody(Buffer.concat(chunks).toString('utf8')));
    req.on('error', rejectBody);
  });
}

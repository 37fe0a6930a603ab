/**
 * Azurite (the real Storage emulator: Blob, and Queue for the azure_rest backend) over HTTPS on
 * 127.0.0.1, for the local stack.
 *
 * Why HTTPS: Azurite accepts `Authorization: Bearer` tokens only over HTTPS and only with
 * `--oauth basic`; over HTTP it answers 403. So we make a self-signed certificate for
 * 127.0.0.1/localhost with the openssl CLI (kept in stateDir and reused while it is valid) and
 * hand the same file to whoever must trust it (Node's `ca` option here, NODE_EXTRA_CA_CERTS for
 * wrangler/workerd in dev/gateway.mjs). Blob and Queue are two processes sharing that certificate.
 *
 * What `--oauth basic` checks in a token (Azurite 3.37, measured by tests/e2e/arm.test.mjs for
 * the queue service and tests/e2e/stack.test.mjs for blob; see also QueueTokenAuthenticator.js):
 * the scheme `Bearer`, HTTPS, `iat`/`nbf`/`exp` present with now inside nbf..exp, `iss` under
 * https://sts.windows.net/ (or another Azure cloud's STS), `aud` https://storage.azure.com[/],
 * e406a681-f3d4-42a8-90b6-c2b029497af1 or https://{account}.queue.core.windows.net[/]. It does
 * NOT verify the signature (a token with a forged signature is accepted) and does not enforce
 * the x-ms-version minimum (2017-11-09) that Azure requires for OAuth. Gateway tests must cover
 * those two themselves.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { request } from 'node:https';
import { join, resolve } from 'node:path';
import { NODE_BIN, REPO_ROOT, spawnService, waitUntil } from './proc.mjs';

export const ACCOUNT = 'devstoreaccount1';
/** x-ms-version used for Bearer requests (OAuth needs 2017-11-09 or later). */
export const BLOB_API_VERSION = '2021-08-06';
/** x-ms-version of the queue helpers (OAuth needs 2017-11-09 or later). */
export const QUEUE_API_VERSION = '2021-08-06';
const AZURITE_BLOB = join(REPO_ROOT, 'node_modules', 'azurite', 'dist', 'src', 'blob', 'main.js');
const AZURITE_QUEUE = join(REPO_ROOT, 'node_modules', 'azurite', 'dist', 'src', 'queue', 'main.js');
const CERT_DAYS = 30;
const MIN_VALID_SECONDS = 24 * 3600;

/**
 * Ensure `${dir}/azurite-cert.pem` and `${dir}/azurite-key.pem` exist and stay valid for a day.
 * The certificate is self-signed (no separate CA) with SAN IP:127.0.0.1, DNS:localhost.
 */
export function ensureCertificate(dir) {
  mkdirSync(dir, { recursive: true });
  const certPath = join(dir, 'azurite-cert.pem');
  const keyPath = join(dir, 'azurite-key.pem');
  if (existsSync(certPath) && existsSync(keyPath) && certStillValid(certPath)) return { certPath, keyPath };
  execFileSync('openssl', [
    'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-sha256',
    '-days', String(CERT_DAYS),
    '-keyout', keyPath, '-out', certPath,
    '-subj', '/CN=127.0.0.1',
    // A leaf, not a CA: workerd's TLS (rustls) rejects a CA certificate used as a server certificate.
    '-addext', 'basicConstraints=critical,CA:FALSE',
    '-addext', 'keyUsage=critical,digitalSignature,keyEncipherment',
    '-addext', 'extendedKeyUsage=serverAuth',
    '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost',
  ], { stdio: ['ignore', 'ignore', 'pipe'] });
  return { certPath, keyPath };
}

function certStillValid(certPath) {
  try {
    execFileSync('openssl', ['x509', '-in', certPath, '-noout', '-checkend', String(MIN_VALID_SECONDS)], { stdio: 'ignore' });
    return true;
  } catch {
    return false; // expiring, expired or unreadable: regenerate
  }
}

/**
 * Start azurite-blob on 127.0.0.1:port over HTTPS with OAuth; resolves when it answers.
 * Returns { url, certPath, keyPath, ca (Buffer, for node:https), logs, tail, exited, stop }.
 */
export function startAzurite({ port = 10000, stateDir, timeoutMs = 20_000, onLog }) {
  return startService({ service: 'blob', main: AZURITE_BLOB, port, stateDir, timeoutMs, onLog });
}

/**
 * Start azurite-queue on 127.0.0.1:port over HTTPS with OAuth (in memory, the same certificate
 * as the blob service in the same stateDir); resolves when it answers.
 * Returns { url (https://127.0.0.1:port/devstoreaccount1), certPath, keyPath, ca, logs, tail, exited, stop }.
 */
export function startAzuriteQueue({ port = 10001, stateDir, timeoutMs = 20_000, onLog }) {
  return startService({ service: 'queue', main: AZURITE_QUEUE, port, stateDir, timeoutMs, onLog });
}

async function startService({ service: kind, main, port, stateDir, timeoutMs, onLog }) {
  const dir = resolve(stateDir);
  const { certPath, keyPath } = ensureCertificate(dir);
  const ca = await readFile(certPath);
  const name = kind === 'blob' ? 'azurite' : `azurite-${kind}`;
  const service = spawnService({
    name,
    command: NODE_BIN,
    args: [
      main,
      `--${kind}Host`, '127.0.0.1', `--${kind}Port`, String(port),
      '--oauth', 'basic', '--cert', certPath, '--key', keyPath,
      '--inMemoryPersistence', '--disableTelemetry',
    ],
    cwd: dir, // Azurite may still drop debug files in its working directory
    env: { ...process.env, NO_COLOR: '1' },
    onLine: onLog,
  });
  const url = `https://127.0.0.1:${port}/${ACCOUNT}`;
  try {
    await waitUntil(async () => {
      if (!service.isRunning()) throw new Error(`${name} exited:\n${service.tail()}`);
      return (await blobRequest(`${url}?comp=list`, { ca })).status > 0;
    }, { timeoutMs, what: `Azurite ${kind} on ${url}` });
  } catch (err) {
    await service.stop();
    err.message += `\n--- ${name} output ---\n${service.tail()}`;
    throw err;
  }
  return {
    url, certPath, keyPath, ca, pid: service.pid,
    logs: service.logs, tail: service.tail, exited: service.exited,
    stop: () => service.stop(),
  };
}

/**
 * One Storage REST call (Blob or Queue) over HTTPS trusting `ca`, with Bearer auth when `token`
 * is given.
 * Resolves { status, headers, body } (body as a Buffer). Bounded by timeoutMs.
 */
export function blobRequest(url, { method = 'GET', token, headers = {}, body, ca, timeoutMs = 10_000 } = {}) {
  const allHeaders = {
    'x-ms-version': BLOB_API_VERSION,
    'x-ms-date': new Date().toUTCString(),
    ...(token ? { authorization: `Bearer ${token}` } : {}),
    ...(body !== undefined ? { 'content-length': Buffer.byteLength(body) } : {}),
    ...headers,
  };
  return new Promise((resolveReq, rejectReq) => {
    const req = request(url, { method, headers: allHeaders, ca, timeout: timeoutMs }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolveReq({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
      res.on('error', rejectReq);
    });
    req.on('timeout', () => req.destroy(new Error(`${method} ${url} timed out after ${timeoutMs} ms`)));
    req.on('error', rejectReq);
    req.end(body);
  });
}

/** Create a blob container with a Bearer token; 201 created or 409 ContainerAlreadyExists are fine. */
export async function createContainer(url, name, token, { ca } = {}) {
  const res = await blobRequest(`${url}/${name}?restype=container`, { method: 'PUT', token, ca, body: '' });
  if (res.status !== 201 && res.status !== 409) {
    throw new Error(`create container ${name}: HTTP ${res.status} ${res.headers['x-ms-error-code'] ?? ''} ${res.body}`);
  }
  return res.status;
}

// ---------------------------------------------------------------------------------------------
// Queue helpers (Azurite's own REST API, so tests read back what the gateway sent)

/** Create a queue with a Bearer token; 201 created or 204 already there (same metadata) are fine. */
export async function createQueue(url, name, token, { ca } = {}) {
  const res = await blobRequest(`${url}/${name}`, { method: 'PUT', token, ca, body: '', headers: { 'x-ms-version': QUEUE_API_VERSION } });
  if (res.status !== 201 && res.status !== 204) {
    throw new Error(`create queue ${name}: HTTP ${res.status} ${res.headers['x-ms-error-code'] ?? ''} ${res.body}`);
  }
  return res.status;
}

/**
 * Put Message: POST {url}/{queue}/messages with <QueueMessage><MessageText>text</MessageText>.
 * `text` goes in as given (XML-escaped); base64-encode it first if the reader expects that.
 * Resolves { status, headers, body } like blobRequest.
 */
export function putQueueMessage(url, queue, text, token, { ca, headers = {}, query = '' } = {}) {
  const body = `<?xml version="1.0" encoding="utf-8"?><QueueMessage><MessageText>${xmlEscape(text)}</MessageText></QueueMessage>`;
  return blobRequest(`${url}/${queue}/messages${query ? `?${query}` : ''}`, {
    method: 'POST', token, ca, body, headers: { 'x-ms-version': QUEUE_API_VERSION, 'content-type': 'application/xml', ...headers },
  });
}

/**
 * Peek up to 32 messages without dequeuing them (GET …/messages?numofmessages=32&peekonly=true).
 * Resolves [{ messageId, insertionTime, expirationTime, dequeueCount, messageText }], oldest
 * first. messageText is the raw text Azurite stored, XML-unescaped and NOT base64-decoded: the
 * caller knows whether the sender encoded it (decodeBase64Text helps). Throws on a non-200.
 */
export async function peekQueueMessages(url, queue, token, { ca, max = 32 } = {}) {
  const res = await blobRequest(`${url}/${queue}/messages?numofmessages=${max}&peekonly=true`, {
    token, ca, headers: { 'x-ms-version': QUEUE_API_VERSION },
  });
  if (res.status !== 200) {
    throw new Error(`peek ${queue}: HTTP ${res.status} ${res.headers['x-ms-error-code'] ?? ''} ${res.body}`);
  }
  return parseQueueMessagesList(res.body.toString('utf8'));
}

/** Parse Azure's <QueueMessagesList> answer (peek or get). Exported for unit use. */
export function parseQueueMessagesList(xml) {
  if (!/<QueueMessagesList\s*\/>|<QueueMessagesList>/.test(xml)) throw new Error(`not a QueueMessagesList: ${xml.slice(0, 200)}`);
  const field = (block, name) => {
    const m = new RegExp(`<${name}>([\\s\\S]*?)</${name}>`).exec(block);
    return m ? xmlUnescape(m[1]) : undefined;
  };
  return [...xml.matchAll(/<QueueMessage>([\s\S]*?)<\/QueueMessage>/g)].map(([, block]) => ({
    messageId: field(block, 'MessageId'),
    insertionTime: field(block, 'InsertionTime'),
    expirationTime: field(block, 'ExpirationTime'),
    dequeueCount: Number(field(block, 'DequeueCount') ?? 0),
    messageText: field(block, 'MessageText') ?? '',
  }));
}

/** Strict base64 decode of a MessageText to UTF-8 text; null when it is not canonical base64. */
export function decodeBase64Text(text) {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) return null;
  const bytes = Buffer.from(text, 'base64');
  return bytes.toString('base64') === text ? bytes.toString('utf8') : null;
}

function xmlEscape(text) {
  return String(text).replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c]);
}

function xmlUnescape(text) {
  return text.replace(/&(lt|gt|amp|apos|quot|#x[0-9a-f]+|#\d+);/gi, (whole, e) => {
    const named = { lt: '<', gt: '>', amp: '&', apos: "'", quot: '"' }[e.toLowerCase()];
    if (named) return named;
    const code = e[1].toLowerCase() === 'x' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
    return Number.isFinite(code) ? String.fromCodePoint(code) : whole;
  });
}

/**
 * Azurite (the real Blob Storage emulator) over HTTPS on 127.0.0.1, for the local stack.
 *
 * Why HTTPS: Azurite accepts `Authorization: Bearer` tokens only over HTTPS and only with
 * `--oauth basic`; over HTTP it answers 403. So we make a self-signed certificate for
 * 127.0.0.1/localhost with the openssl CLI (kept in stateDir and reused while it is valid) and
 * hand the same file to whoever must trust it (Node's `ca` option here, NODE_EXTRA_CA_CERTS for
 * wrangler/workerd in dev/gateway.mjs).
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
const AZURITE_BLOB = join(REPO_ROOT, 'node_modules', 'azurite', 'dist', 'src', 'blob', 'main.js');
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
export async function startAzurite({ port = 10000, stateDir, timeoutMs = 20_000, onLog }) {
  const dir = resolve(stateDir);
  const { certPath, keyPath } = ensureCertificate(dir);
  const ca = await readFile(certPath);
  const service = spawnService({
    name: 'azurite',
    command: NODE_BIN,
    args: [
      AZURITE_BLOB,
      '--blobHost', '127.0.0.1', '--blobPort', String(port),
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
      if (!service.isRunning()) throw new Error(`azurite exited:\n${service.tail()}`);
      return (await blobRequest(`${url}?comp=list`, { ca })).status > 0;
    }, { timeoutMs, what: `Azurite on ${url}` });
  } catch (err) {
    await service.stop();
    err.message += `\n--- azurite output ---\n${service.tail()}`;
    throw err;
  }
  return {
    url, certPath, keyPath, ca,
    logs: service.logs, tail: service.tail, exited: service.exited,
    stop: () => service.stop(),
  };
}

/**
 * One Blob REST call over HTTPS trusting `ca`, with Bearer auth when `token` is given.
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

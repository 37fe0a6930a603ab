#!/usr/bin/env node
/**
 * A large upload done directly to Azurite with a URL from a valet-key route (blob_sas): the
 * gateway mints the URL, the client PUTs the file to Storage in one Put Blob, and the worker
 * sees none of it. Prints the upload's time and the worker's CPU time and memory (workerd's
 * processes, from /proc) before, during and after, and checks the blob read back is
 * byte-identical (SHA-256 of both streams).
 *
 *   node bench/valet-upload.mjs [MiB]     (default 1024; writes bench/results/valet-upload.md)
 *
 * Uses the ports of tests/e2e/fixtures/valet-policy.json (issuer 18860, Azurite 20400, gateway
 * 18798): do not run it beside that test. Bounded: it stops the stack when done or failed.
 */
import { createHash, randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { request } from 'node:https';
import { join } from 'node:path';
import { startStack, storageToken } from '../dev/stack.mjs';
import { REPO_ROOT, workerdCpuMs, workerdRss } from '../dev/proc.mjs';

const MiB = 1024 * 1024;
const size = Number(process.argv[2] ?? 1024) * MiB;


/** PUTs `size` bytes (1 MiB of random bytes, each copy stamped with its index) to `url`. */
function upload(url, headers, ca) {
  const chunk = randomBytes(MiB);
  const hash = createHash('sha256');
  return new Promise((resolve, reject) => {
    const req = request(url, { method: 'PUT', ca, headers: { ...headers, 'content-length': size }, timeout: 600_000 }, (res) => {
      const body = [];
      res.on('data', (d) => body.push(d));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(body).toString(), sha: hash.digest('hex') }));
    });
    req.on('timeout', () => req.destroy(new Error('upload timed out')));
    req.on('error', reject);
    let sent = 0;
    const pump = () => {
      while (sent < size) {
        const part = Buffer.from(chunk.subarray(0, Math.min(MiB, size - sent)));
        part.writeUInt32LE(sent / MiB, 0);
        hash.update(part);
        sent += part.length;
        if (!req.write(part)) return req.once('drain', pump);
      }
      req.end();
    };
    pump();
  });
}

/** SHA-256 and length of a blob read back from Azurite with a bearer token. */
function readBack(url, token, ca) {
  const hash = createHash('sha256');
  let length = 0;
  return new Promise((resolve, reject) => {
    const req = request(url, { ca, headers: { authorization: `Bearer ${token}`, 'x-ms-version': '2021-08-06', 'x-ms-date': new Date().toUTCString() }, timeout: 600_000 }, (res) => {
      res.on('data', (d) => { hash.update(d); length += d.length; });
      res.on('end', () => resolve({ status: res.statusCode, length, sha: hash.digest('hex') }));
    });
    req.on('timeout', () => req.destroy(new Error('read timed out')));
    req.on('error', reject);
    req.end();
  });
}

const stack = await startStack({
  policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'valet-policy.json'),
  ports: { issuer: 18860, azurite: 20400, gateway: 18798 },
  stateDir: join(REPO_ROOT, 'target', 'bench', 'valet'),
  serviceBus: false,
  queue: false,
});
try {
  const pgid = stack.gateway.pid;
  const name = `big-${Date.now()}.bin`;
  const minted = await fetch(`${stack.gateway.url}/upload-url/bench/${name}`, { method: 'POST', headers: { 'x-api-key': stack.apiKey } });
  const answer = await minted.json();
  if (minted.status !== 200) throw new Error(`mint: ${minted.status} ${JSON.stringify(answer)}`);
  const before = { cpu: workerdCpuMs(pgid), rss: workerdRss(pgid) };
  let peakRss = before.rss;
  const sampler = setInterval(() => { peakRss = Math.max(peakRss, workerdRss(pgid)); }, 50);
  const t0 = performance.now();
  const put = await upload(answer.url, answer.headers, stack.azurite.ca);
  const seconds = (performance.now() - t0) / 1000;
  clearInterval(sampler);
  const afterUpload = { cpu: workerdCpuMs(pgid), rss: workerdRss(pgid) };
  if (put.status !== 201) throw new Error(`upload: ${put.status} ${put.body}`);
  const token = await storageToken(stack.issuer, stack.clientSecret);
  const back = await readBack(`${stack.azurite.url}/uploads/${answer.blob.split('/').map(encodeURIComponent).join('/')}`, token, stack.azurite.ca);
  const identical = back.status === 200 && back.length === size && back.sha === put.sha;
  const lines = [
    `# A ${size / MiB} MiB upload straight to Azurite with a minted create URL`,
    '',
    `Run: \`node bench/valet-upload.mjs ${size / MiB}\` on ${new Date().toISOString().slice(0, 10)} (Azurite 3.35 over HTTPS on loopback, one Put Blob).`,
    '',
    '| what | figure |',
    '|---|--:|',
    `| bytes uploaded | ${size} |`,
    `| upload time | ${seconds.toFixed(1)} s (${(size / MiB / seconds).toFixed(0)} MiB/s) |`,
    `| read back | ${back.status}, ${back.length} bytes, SHA-256 ${identical ? 'identical' : 'DIFFERENT'} |`,
    `| workerd CPU during the upload | ${(afterUpload.cpu - before.cpu).toFixed(0)} ms |`,
    `| workerd RSS before / peak during / after | ${(before.rss / 1024).toFixed(1)} / ${(peakRss / 1024).toFixed(1)} / ${(afterUpload.rss / 1024).toFixed(1)} MB |`,
    '',
    'The worker answered one request (the URL) before the upload and none during it: the file never',
    'passed through it. CPU is user + system time of workerd\'s processes from /proc, at 10 ms',
    'resolution.',
    '',
  ];
  writeFileSync(join(REPO_ROOT, 'bench', 'results', 'valet-upload.md'), lines.join('\n'));
  console.log(lines.join('\n'));
  if (!identical) process.exitCode = 1;
} finally {
  await stack.stop();
}

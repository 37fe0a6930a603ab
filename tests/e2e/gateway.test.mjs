/**
 * The worker under workerd (wrangler dev), over real HTTP: routing answers, problem+json,
 * x-request-id, the API key check, the one JSON log line per request; and that no worker can be
 * built from an invalid policy. No backend is called by anything here.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { startGateway } from '../../dev/gateway.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const fixture = (name) => join(REPO_ROOT, 'tests', 'e2e', 'fixtures', name);
const stateDir = (name) => join(REPO_ROOT, 'target', 'e2e', name);
const KEYS = { E2E_KEY_OLD: 'key-old-4b1d', E2E_KEY_NEW: 'key-new-93ac' };
const SECRETS = { ...KEYS, DEV_CLIENT_SECRET: 'client-secret-e2e' };

async function call(gateway, method, path, headers = {}) {
  const res = await fetch(gateway.url + path, { method, headers });
  const text = await res.text();
  let body = null;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, body, text };
}

/** The worker's JSON log line for a request id. */
function logLine(gateway, requestId) {
  return gateway
    .waitForLog((_line, json) => json?.request_id === requestId && 'status' in json, 10_000)
    .then((line) => JSON.parse(line));
}

function assertProblem(res, status, kind) {
  assert.equal(res.status, status, res.text);
  assert.equal(res.headers.get('content-type'), 'application/problem+json');
  assert.equal(res.body.status, status);
  assert.equal(res.body.type, `urn:azure-edge-gateway:problem:${kind}`);
  assert.ok(res.body.title && res.body.detail, 'a title and a detail that says what to do');
  assert.equal(res.body.request_id, res.headers.get('x-request-id'));
}

describe('a worker built with a valid policy', () => {
  let gw;
  before(async () => {
    gw = await startGateway({ policyPath: fixture('gateway-policy.json'), port: 18787, stateDir: stateDir('valid'), secrets: SECRETS });
  });
  after(() => gw?.stop());

  test('a matched route with a valid key passes the checks and goes for a token', async () => {
    const res = await call(gw, 'PUT', '/files/contoso/report.pdf', { 'x-api-key': KEYS.E2E_KEY_NEW, 'x-request-id': 'e2e-match-1' });
    // No identity provider runs for this suite: the request gets as far as the token, and stops.
    assertProblem(res, 503, 'identity-unavailable');
    assert.ok(Number(res.headers.get('retry-after')) >= 1);
    const log = await logLine(gw, 'e2e-match-1');
    assert.equal(log.route, 'upload');
    assert.equal(log.api_key, 'new', 'the log names the key, never its value');
    assert.equal(log.identity, 'e2e');
    assert.equal(log.status, 503);
    assert.match(log.token_error, /^unavailable: /);
    assert.equal(log.method, 'PUT');
    assert.equal(typeof log.duration_ms, 'number');
  });

  test('percent-encoded segments match one parameter each', async () => {
    const res = await call(gw, 'PUT', '/files/contoso/a%2Fb%20c', { 'x-api-key': KEYS.E2E_KEY_OLD, 'x-request-id': 'e2e-pct' });
    assert.equal((await logLine(gw, 'e2e-pct')).route, 'upload', res.text);
    await call(gw, 'GET', '/files/contoso/', { 'x-request-id': 'e2e-slash' });
    assert.equal((await logLine(gw, 'e2e-slash')).route, 'status', 'a trailing slash is ignored');
  });

  test('a missing or wrong API key is 401 with a challenge and reaches nothing', async () => {
    for (const headers of [{}, { 'x-api-key': 'key-new-93a' }, { 'x-api-key': KEYS.E2E_KEY_NEW + 'x' }]) {
      const res = await call(gw, 'PUT', '/files/contoso/x', { ...headers, 'x-request-id': `e2e-401-${Object.keys(headers).length}` });
      assertProblem(res, 401, headers['x-api-key'] ? 'api-key-invalid' : 'api-key-missing');
      assert.equal(res.headers.get('www-authenticate'), 'ApiKey header="x-api-key"');
      if (headers['x-api-key']) assert.ok(!res.text.includes(headers['x-api-key']), 'no key value in the answer');
    }
  });

  test('an unknown path is 404 problem+json', async () => {
    const res = await call(gw, 'GET', '/nothing/here?x=1');
    assertProblem(res, 404, 'route-not-found');
    assert.equal(res.body.instance, '/nothing/here');
  });

  test('a wrong method is 405 with Allow', async () => {
    const res = await call(gw, 'DELETE', '/files/contoso');
    assertProblem(res, 405, 'method-not-allowed');
    assert.equal(res.headers.get('allow'), 'GET, HEAD');
    const put = await call(gw, 'POST', '/files/contoso/x');
    assert.equal(put.headers.get('allow'), 'PUT');
  });

  test('x-request-id is echoed when sane and generated otherwise', async () => {
    const sane = await call(gw, 'GET', '/nothing', { 'x-request-id': '0af7651916cd43dd8448eb211c80319c' });
    assert.equal(sane.headers.get('x-request-id'), '0af7651916cd43dd8448eb211c80319c');
    const uuid = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
    const ids = [];
    for (const headers of [{}, { 'x-request-id': 'has spaces' }, { 'x-request-id': 'x'.repeat(200) }, { 'x-request-id': '{"forged":true}' }]) {
      const res = await call(gw, 'GET', '/nothing', headers);
      assert.match(res.headers.get('x-request-id'), uuid);
      ids.push(res.headers.get('x-request-id'));
    }
    assert.equal(new Set(ids).size, ids.length, 'each generated id is new');
    // The log line carries the generated id, so a caller can quote it to an operator.
    const log = await logLine(gw, ids[0]);
    assert.equal(log.status, 404);
    assert.equal(log.route, null);
  });

  test('every request writes exactly one JSON log line', async () => {
    const id = 'e2e-one-line';
    await call(gw, 'GET', '/files/contoso', { 'x-request-id': id });
    await logLine(gw, id);
    // A later request's line, waited for (at most 10 s, else the test fails): the worker's lines
    // arrive in the order it wrote them, so once the later one is read, every line the first
    // request wrote while it was answered has been read too.
    const next = 'e2e-one-line-next';
    await call(gw, 'GET', '/files/contoso', { 'x-request-id': next });
    await logLine(gw, next);
    const at = (rid) => gw.logs.flatMap((l, i) => (l.includes(`"request_id":"${rid}"`) ? [i] : []));
    const lines = at(id).map((i) => gw.logs[i]);
    assert.equal(lines.length, 1, lines.join('\n'));
    assert.ok(at(id)[0] < at(next)[0], 'the lines in the order of their requests');
    assert.equal(JSON.parse(lines[0]).route, 'status');
  });
});

/** Values pasted into the invalid policy where a secret *name* belongs, in every wrong shape. */
const PASTED = ['Sup3r~Secret.Value-That-Was-Pasted', 'Xq8~SuperSecretValue.123', '98765432101234', 'Yz9~AnotherPastedSecret.456', 'Wq7~AuthFieldSecret.789', 'Kk5~PastedApiKeyValue.321'];

describe('building a worker from an invalid policy', () => {
  test('fails with exactly what `policy check` prints, quoting no secret, and leaves no worker', () => {
    const policy = fixture('invalid-policy.json');
    const out = join(stateDir('invalid'), 'build');
    rmSync(out, { recursive: true, force: true });
    const build = spawnSync('bash', [join(REPO_ROOT, 'scripts', 'build'), '--out-dir', out], {
      cwd: REPO_ROOT, env: { ...process.env, GATEWAY_POLICY: policy }, encoding: 'utf8', timeout: 600_000,
    });
    assert.notEqual(build.status, 0, 'the build must fail');
    const check = spawnSync('cargo', ['run', '--quiet', '--bin', 'policy', '--', 'check', policy], { cwd: REPO_ROOT, encoding: 'utf8' });
    assert.equal(check.status, 1, check.stderr);
    const output = build.stdout + build.stderr;
    const reported = check.stdout.trim().split('\n');
    assert.ok(reported.length >= 9, check.stdout);
    for (const line of reported) assert.ok(output.includes(line), `the build reports: ${line}\n---\n${output}`);
    // Each pasted secret is reported at its place, and quoted nowhere.
    for (const id of ['pasted-string', 'pasted-number', 'pasted-variant', 'pasted-auth']) {
      assert.ok(reported.some((e) => e.includes(`identities.${id}.credential`)), id);
    }
    for (const secret of PASTED) assert.ok(!output.includes(secret), `${secret} is not in the build's output`);
    assert.ok(!existsSync(join(out, 'index_bg.wasm')), 'no worker was built');
  });
});

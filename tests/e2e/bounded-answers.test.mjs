/**
 * What the gateway reads of Azure's answers, and what a template builds, end to end: the gateway
 * in workerd (wrangler dev) in front of a stub Azure API (dev/answers-stub.mjs) that answers as
 * large as it is asked to (100 MB), counts what it sent and whether the gateway hung up first,
 * and starts operations whose answers carry secrets. Policy:
 * tests/e2e/fixtures/bounded-answers-policy.json (default limits only: max_answer_bytes 64 KiB,
 * max_built_body_bytes a third more than max_body_bytes and 64 KiB: 1,463,638 bytes).
 * Own ports (issuer 24400, Azurite 24000, stub 24430, gateway 24787).
 * Run: source scripts/env.sh && node --test tests/e2e/bounded-answers.test.mjs
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { REPO_ROOT } from '../../dev/proc.mjs';
import { SECRET, startAnswersStub } from '../../dev/answers-stub.mjs';
import { startStack } from './stack.mjs';

const PORTS = { issuer: 24400, azurite: 24000, queue: 24001, gateway: 24787 };
const STUB_PORT = 24430;
const MB = 1_000_000;
const PROBLEM = 'urn:azure-edge-gateway:problem:';

describe('bounded answers and built bodies', { timeout: 600_000 }, () => {
  let stack;
  let gw;
  let stub;
  const call = async (method, path, { body, headers = {} } = {}) => {
    const t0 = performance.now();
    const res = await fetch(`${gw.url}${path}`, { method, body, headers, redirect: 'manual', signal: AbortSignal.timeout(60_000) });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, headers: res.headers, text, json, ms: performance.now() - t0 };
  };
  const logOf = async (res) => {
    const id = res.headers.get('x-request-id');
    return JSON.parse(await gw.waitForLog((_l, j) => j?.request_id === id && 'status' in j, 10_000));
  };
  /** The stub's record of the one request to `path`, once its connection has closed. */
  const stubSaw = async (path) => {
    for (let i = 0; i < 100; i++) {
      const seen = stub.requests().filter((r) => r.path === path);
      if (seen.length && seen.every((r) => r.finished || r.aborted)) return seen;
      await new Promise((r) => setTimeout(r, 50));
    }
    return stub.requests().filter((r) => r.path === path);
  };

  before(async () => {
    stub = await startAnswersStub({ port: STUB_PORT });
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'bounded-answers-policy.json'),
      ports: PORTS,
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'bounded-answers'),
      serviceBus: false,
      queue: false,
    });
    gw = stack.gateway;
  });
  beforeEach(() => stub.clear());
  after(async () => {
    await stack?.stop();
    await stub?.stop();
  });

  for (const [route, how] of [['projected', 'with Content-Length'], ['projected-chunked', 'chunked']]) {
    test(`a projected GET whose answer is 100 MB (${how}) is refused as soon as it passes the limit, without reading it`, async () => {
      const res = await call('GET', `/${route}/${100 * MB}`);
      assert.equal(res.status, 502, res.text);
      assert.equal(res.json.type, `${PROBLEM}backend-answer-too-large`);
      assert.match(res.json.detail, /65536 bytes \(max_answer_bytes\)/);
      assert.ok(!res.text.includes(SECRET), 'nothing of the answer is passed on');
      const [seen] = await stubSaw(`/big/${100 * MB}${route === 'projected' ? '' : '/chunked'}`);
      assert.equal(seen.aborted, true, 'the gateway hung up before the end of the answer');
      assert.ok(seen.sentBytes < 20 * MB, `the stub got rid of ${seen.sentBytes} bytes of 100 MB before the gateway hung up`);
      const line = await logOf(res);
      assert.equal(line.problem, 'backend-answer-too-large');
      assert.match(line.backend_detail, /over max_answer_bytes \(65536\): not read/);
    });
  }

  test('a small answer is still projected', async () => {
    const res = await call('GET', '/projected/5000');
    assert.equal(res.status, 200, res.text);
    assert.deepEqual(res.json, { name: 'big' });
  });

  test('an error answer of 100 MB is mapped by its status and error code header, not read', async () => {
    const res = await call('GET', `/error/${100 * MB}`);
    assert.equal(res.status, 400, res.text);
    assert.equal(res.json.type, `${PROBLEM}azure-rejected`);
    assert.equal(res.json.azure_error_code, 'BadThing');
    const [seen] = await stubSaw(`/error/${100 * MB}`);
    assert.equal(seen.aborted, true, 'the gateway hung up before the end of the error answer');
    assert.ok(seen.sentBytes < 20 * MB, `${seen.sentBytes} bytes sent`);
    const line = await logOf(res);
    assert.match(line.backend_detail, /not read/);
  });

  test('a followed operation shows its status, error code and message, and times; never the secrets of its answer', async () => {
    const started = await call('POST', '/start');
    assert.equal(started.status, 202, started.text);
    const location = started.headers.get('location');
    assert.match(location, /^\/operations\/[A-Za-z0-9_-]+$/);
    const poll = await call('GET', location);
    assert.equal(poll.status, 200, poll.text);
    assert.deepEqual(poll.json, {
      status: 'Succeeded',
      error: { code: 'None', message: 'no error' },
      startTime: '2026-12-01T10:00:00.0000000Z',
      endTime: '2026-12-01T10:00:05.0000000Z',
    });
    assert.ok(!poll.text.includes(SECRET), 'no secret of the operation\'s answer');
    assert.match(poll.headers.get('content-type'), /^application\/json/);
  });

  test('a template that would build 6 MiB from 1 MiB is refused with 413 before anything is sent', async () => {
    const res = await call('POST', '/six', { body: 'x'.repeat(1024 * 1024), headers: { 'content-type': 'text/plain' } });
    assert.equal(res.status, 413, res.text);
    assert.equal(res.json.type, `${PROBLEM}body-too-large`);
    assert.match(res.json.detail, /at most 1463638 bytes \(max_built_body_bytes\)/);
    assert.equal(stub.requests().filter((r) => r.path === '/sink').length, 0, 'nothing reached the backend');
    // Within the limit, the same template is sent as built.
    const ok = await call('POST', '/six', { body: 'y'.repeat(100 * 1024), headers: { 'content-type': 'text/plain' } });
    assert.equal(ok.status, 201, ok.text);
    const [sent] = await stubSaw('/sink');
    assert.equal(sent.receivedBytes, 6 * 100 * 1024 + '<M><A></A><B></B><C></C><D></D><E></E><F></F></M>'.length);
  });

  test('a JSON body that escaping makes larger than the limit is refused while it is written', async () => {
    // 400 KB of a control character: each is \u0001 (6 bytes) in JSON, 2.4 MB in all.
    const res = await call('POST', '/json', { body: '\u0001'.repeat(400_000), headers: { 'content-type': 'text/plain' } });
    assert.equal(res.status, 413, res.text);
    assert.equal(res.json.type, `${PROBLEM}body-too-large`);
    assert.equal(stub.requests().filter((r) => r.path === '/sink').length, 0, 'nothing reached the backend');
  });

  test('a key set URL answering 100 MB is refused without reading it', async () => {
    // A well-formed RS256 token for the route: the gateway must fetch the key set to check it.
    const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
    const now = Math.floor(Date.now() / 1000);
    const jwt = `${b64({ alg: 'RS256', kid: 'k1', typ: 'JWT' })}.${b64({ iss: 'https://issuer.example/', aud: 'api://bounded', sub: 's', iat: now, nbf: now, exp: now + 600 })}.${Buffer.alloc(256, 1).toString('base64url')}`;
    const res = await call('GET', '/secured', { headers: { authorization: `Bearer ${jwt}` } });
    assert.equal(res.status, 503, res.text);
    assert.equal(res.json.type, `${PROBLEM}jwks-unavailable`);
    const [seen] = await stubSaw(`/big/${100 * MB}`);
    assert.equal(seen.aborted, true, 'the gateway hung up before the end of the key set');
    assert.ok(seen.sentBytes < 20 * MB, `${seen.sentBytes} bytes sent`);
  });
});

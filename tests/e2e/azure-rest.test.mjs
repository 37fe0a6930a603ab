/**
 * The azure_rest backend end to end: the gateway in workerd (wrangler dev) in front of the
 * Resource Manager stand-in (dev/arm.mjs: it checks the token's signature against the issuer's
 * keys, the audience and the api-version, as management.azure.com does) and Azurite's Queue
 * service over HTTPS with OAuth. Policy: tests/e2e/fixtures/azure-rest-policy.json.
 * Own ports (issuer 19000, Service Bus stand-in 19010, ARM 19020, Azurite 20600/20601, gateway
 * 19087) so that no other suite or dev stack interferes.
 * Run: source scripts/env.sh && node --test tests/e2e/azure-rest.test.mjs
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { manySites } from '../../dev/arm.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';
import { decodeBase64Text, gatewayClient, peekQueueMessages, startStack, storageToken } from './stack.mjs';

const PORTS = { issuer: 19000, serviceBus: 19010, arm: 19020, azurite: 20600, queue: 20601, gateway: 19087 };
const SUB = '11111111-aaaa-4bbb-8ccc-000000000001';
const RG = 'rg-web';
const SITE = 'shop-api';
const SUBSCRIPTIONS = {
  [SUB]: {
    resourceGroups: {
      [RG]: { location: 'westeurope', sites: { [SITE]: { appSettings: { GREETING: 'hello', DB_PASSWORD: 'not-for-callers' } } } },
      // Ten sites: five pages of the stand-in's two.
      'rg-many': { location: 'westeurope', sites: manySites(10) },
      'rg-few': { location: 'westeurope', sites: manySites(3, { prefix: 'few' }) },
    },
  },
};
const SITE_PATH = `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.Web/sites/${SITE}`;

describe('azure_rest through the gateway', { timeout: 600_000 }, () => {
  let stack;
  let arm;
  const { call, logOf } = gatewayClient(() => stack, { timeoutMs: 20_000 });
  /** What the ARM stand-in received since the last clear (its own log). */
  const armSaw = async () => arm.requests();

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'azure-rest-policy.json'),
      ports: PORTS,
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'azure-rest'),
      serviceBus: false,
      arm: { subscriptions: SUBSCRIPTIONS, pollsBeforeDone: 2 },
    });
    arm = stack.arm;
  });
  beforeEach(async () => {
    await arm.clearRequests();
    await arm.clearFaults();
  });
  after(async () => {
    await stack?.stop();
  });

  test('a Resource Manager read with the caller\'s path value, projected to what the route keeps', async () => {
    const res = await call('GET', `/sites/${SITE}`);
    assert.equal(res.status, 200, res.text);
    // Only the two pointers the route keeps: no appSettings, ids or anything else of the site.
    assert.deepEqual(res.json, { name: SITE, properties: { state: 'Running' } });
    assert.match(res.headers.get('content-type'), /^application\/json/);
    assert.ok(res.headers.get('x-ms-request-id'), 'x-ms-request-id is passed back');
    assert.equal(res.headers.get('x-ms-correlation-request-id'), null, 'not in the allow-list');
    const [seen] = await armSaw();
    assert.equal(seen.path, SITE_PATH);
    assert.equal(seen.query['api-version'], '2022-09-01');
    assert.equal(seen.authorization.audience, 'https://management.azure.com');
    const line = await logOf(res);
    assert.equal(line.route, 'site');
    assert.equal(line.backend_status, 200);
  });

  test('path values with /, .., ?, # and %2F are refused or encoded, never changing the URL\'s shape', async () => {
    for (const raw of ['a%2Fb', '..', '%2E%2E', 'a%5Cb']) {
      const res = await call('GET', `/sites/${raw}`);
      assert.ok([400, 404].includes(res.status), `${raw}: ${res.status} ${res.text}`);
      if (res.status === 400) assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:bad-path-value', raw);
    }
    assert.equal((await armSaw()).length, 0, 'nothing with a refused value reached Azure');
    for (const [raw, encoded] of [['a%3Fb', 'a%3Fb'], ['a%23b', 'a%23b'], ['a%252Fb', 'a%252Fb'], ['x%20y', 'x%20y']]) {
      await arm.clearRequests();
      const res = await call('GET', `/sites/${raw}`);
      assert.equal(res.status, 404, `${raw}: ${res.text}`);
      assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:azure-rejected');
      assert.equal(res.json.azure_error_code, 'ResourceNotFound');
      const [seen] = await armSaw();
      assert.equal(seen.path, `${SITE_PATH.slice(0, -SITE.length)}${encoded}`, `${raw}: one segment, encoded`);
      assert.deepEqual(Object.keys(seen.query), ['api-version'], `${raw}: the query is the route's only`);
    }
  });

  test('a long-running restart is followed through the gateway to completion', async () => {
    const started = await call('POST', `/sites/${SITE}/restart`);
    assert.equal(started.status, 202, started.text);
    const location = started.headers.get('location');
    assert.match(location, /^\/operations\/[A-Za-z0-9_-]+$/);
    assert.equal(started.headers.get('azure-asyncoperation'), null, 'Azure\'s URL is never passed back');
    assert.ok(!started.text.includes('127.0.0.1:19020'));
    assert.equal(started.headers.get('retry-after'), '1');
    assert.equal((await call('GET', `/sites/${SITE}`)).json.properties.state, 'Stopped');
    const statuses = [];
    for (let i = 0; i < 6; i++) {
      const poll = await call('GET', location);
      assert.equal(poll.status, 200, poll.text);
      statuses.push(poll.json.status);
      if (poll.json.status === 'Succeeded') break;
    }
    assert.deepEqual(statuses, ['InProgress', 'InProgress', 'Succeeded']);
    assert.equal((await call('GET', `/sites/${SITE}`)).json.properties.state, 'Running');
    const polls = (await armSaw()).filter((r) => r.route === 'operation status');
    assert.equal(polls.length, 3, 'each poll was one GET of Azure\'s operation URL');
    // A handle the gateway did not sign is not followed: nothing reaches Azure.
    await arm.clearRequests();
    const sealed = location.slice('/operations/'.length);
    const bytes = Buffer.from(sealed, 'base64url');
    assert.ok(!/operation|subscriptions|127\.0\.0\.1/.test(bytes.toString('latin1')), 'the handle is encrypted');
    // version 2 ‖ 24-byte nonce ‖ ciphertext ‖ 16-byte tag (XChaCha20-Poly1305)
    assert.equal(bytes[0], 2);
    assert.ok(bytes.subarray(1, 25).some((b) => b !== 0), 'the nonce came from crypto.getRandomValues, not zeros');
    const changed = (at) => { const b = Buffer.from(bytes); b[at] ^= 1; return b.toString('base64url'); };
    const olderFormat = `${bytes.subarray(25, -16).toString('base64url')}.${bytes.subarray(-16).toString('base64url')}`;
    for (const bad of [changed(bytes.length - 3), changed(5), changed(0), sealed.slice(0, -4), olderFormat, 'nonsense']) {
      const res = await call('GET', `/operations/${bad}`);
      assert.equal(res.status, 404, res.text);
      assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:operation-not-found');
    }
    assert.equal((await armSaw()).length, 0);
  });

  test('header and query allow-lists, both ways; errors passed through when the route says so', async () => {
    const res = await call('GET', `/raw/sites/${SITE}?$expand=none&evil=1&api-version=1999-01-01`, {
      headers: { 'x-ms-client-request-id': 'caller-req-1', 'x-secret-header': 'no', authorization: 'Bearer caller-token' },
    });
    assert.equal(res.status, 200, res.text);
    assert.ok(res.headers.get('x-ms-ratelimit-remaining-subscription-reads'), 'allowed reply header passed');
    assert.equal(res.headers.get('x-ms-correlation-request-id'), null);
    const [seen] = await armSaw();
    assert.deepEqual(seen.query, { 'api-version': '2022-09-01', $expand: 'none' });
    assert.equal(seen.headers['x-ms-client-request-id'], 'caller-req-1');
    assert.equal(seen.headers['x-secret-header'], undefined);
    assert.equal(seen.headers['x-api-key'], undefined, 'the caller\'s key never reaches Azure');
    assert.equal(seen.authorization.audience, 'https://management.azure.com', 'the gateway\'s token, not the caller\'s');
    // errors: pass gives Azure's own status and error JSON.
    const missing = await call('GET', '/raw/sites/nope');
    assert.equal(missing.status, 404);
    assert.equal(missing.json.error.code, 'ResourceNotFound');
  });

  test('a caller body passes through; a JSON body template escapes the caller\'s text', async () => {
    const put = await call('PUT', `/sites/${SITE}/settings`, {
      body: JSON.stringify({ properties: { GREETING: 'hi', MODE: 'blue' } }),
      headers: { 'content-type': 'application/json' },
    });
    assert.equal(put.status, 200, put.text);
    const [seen] = await armSaw();
    assert.equal(seen.method, 'PUT');
    assert.deepEqual(JSON.parse(seen.body), { properties: { GREETING: 'hi', MODE: 'blue' } });
    const tooBig = await call('PUT', `/sites/${SITE}/settings`, { body: 'x'.repeat(5000), headers: { 'content-type': 'application/json' } });
    assert.equal(tooBig.status, 413);
    await arm.clearRequests();
    const tricky = 'he said "hi"\n{"x":1}\\';
    const greet = await call('POST', `/sites/${SITE}/greeting`, { body: tricky, headers: { 'x-caller': 'tests' } });
    assert.equal(greet.status, 200, greet.text);
    const [sent] = await armSaw();
    assert.deepEqual(JSON.parse(sent.body), { properties: { GREETING: tricky, SET_BY: 'tests' } });
    assert.equal((await armSaw()).length, 1);
  });

  test('a token of the wrong audience is refused by Resource Manager: the caller gets the mapped error', async () => {
    const res = await call('GET', `/vault-token/sites/${SITE}`);
    assert.equal(res.status, 502, res.text);
    assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:backend-auth');
    assert.equal(res.json.azure_error_code, 'InvalidAuthenticationTokenAudience');
    assert.ok(!/vault\.azure\.net|Bearer|eyJ/.test(res.text), 'no audience, scheme or token in the answer');
    const line = await logOf(res);
    assert.equal(line.backend_status, 401);
    assert.match(line.backend_detail, /audience/i);
  });

  test('a 5-page list is followed through the gateway: every element once, projected, never Azure\'s URL', async () => {
    const seen = [];
    let path = '/lists/rg-many/sites';
    for (let page = 1; path; page += 1) {
      assert.ok(page <= 5, 'at most 5 pages');
      const res = await call('GET', path);
      assert.equal(res.status, 200, res.text);
      assert.ok(!/127\.0\.0\.1|skiptoken|subscriptions/i.test(res.text), `Azure's URL or ids in page ${page}: ${res.text}`);
      for (const site of res.json.value) {
        assert.deepEqual(Object.keys(site), ['name', 'properties']);
        assert.deepEqual(site.properties, { state: 'Running' });
        seen.push(site.name);
      }
      path = res.json.nextLink ?? null;
      if (path) {
        assert.match(path, /^\/lists\/rg-many\/sites\?page=[A-Za-z0-9_-]+$/);
        assert.equal(res.headers.get('link'), `<${path}>; rel="next"`);
      } else {
        assert.equal(page, 5);
        assert.equal(res.headers.get('link'), null);
      }
    }
    assert.deepEqual(seen, Array.from({ length: 10 }, (_, i) => `site-${String(i + 1).padStart(2, '0')}`));
    // Azure was asked for each page once: the first by the route's URL, then by its nextLinks.
    const asked = await armSaw();
    assert.equal(asked.length, 5);
    assert.equal(asked[0].query.$skiptoken, undefined);
    assert.ok(asked.slice(1).every((r) => r.query.$skiptoken && r.query['api-version'] === '2022-09-01'), JSON.stringify(asked.map((r) => r.query)));
  });

  test('a next-page link forged, changed, used on another path or route is refused and nothing is sent', async () => {
    const first = await call('GET', '/lists/rg-few/sites');
    const next = first.json.nextLink;
    const handle = next.split('?page=')[1];
    const flip = (h, i) => h.slice(0, i) + (h[i] === 'A' ? 'B' : 'A') + h.slice(i + 1);
    await arm.clearRequests();
    for (const [path, why] of [
      [`/lists/rg-few/sites?page=${flip(handle, 10)}`, 'one character changed'],
      [`/lists/rg-few/sites?page=${handle.slice(0, -3)}`, 'cut short'],
      [`/lists/rg-many/sites?page=${handle}`, 'another path'],
      [`/whole/rg-few/sites?page=${handle}`, 'another route'],
      ['/lists/rg-few/sites?page=AgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA', 'made up'],
    ]) {
      const res = await call('GET', path);
      assert.equal(res.status, 404, `${why}: ${res.text}`);
      assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:page-not-found', why);
    }
    assert.equal((await armSaw()).length, 0, 'nothing reached Azure');
    const ok = await call('GET', next);
    assert.equal(ok.status, 200, ok.text);
    assert.deepEqual(ok.json.value.map((s) => s.name), ['few-03']);
  });

  test('an unprojected paged list is Azure\'s body with the gateway\'s link in place of nextLink', async () => {
    const res = await call('GET', '/whole/rg-few/sites');
    assert.equal(res.status, 200, res.text);
    assert.equal(res.json.value.length, 2);
    assert.match(res.json.value[0].id, /\/sites\/few-01$/, 'the elements are Azure\'s, whole');
    assert.match(res.json.nextLink, /^\/whole\/rg-few\/sites\?page=/);
    assert.ok(!res.text.includes('127.0.0.1'), res.text);
  });

  test('a Storage answer without its body: no PopReceipt reaches the caller', async () => {
    const payload = randomBytes(64);
    const loud = await call('POST', '/jobs', { body: payload });
    assert.equal(loud.status, 201);
    assert.match(loud.text, /<PopReceipt>/, 'the route that passes the body shows the receipt');
    const quiet = await call('POST', '/quiet/jobs', { body: payload });
    assert.equal(quiet.status, 201, quiet.text);
    assert.equal(quiet.text, '');
    assert.equal(quiet.headers.get('content-type'), null);
    const token = await storageToken(stack.issuer, stack.clientSecret);
    const messages = await peekQueueMessages(stack.queue.url, 'jobs', token, { ca: stack.queue.ca });
    assert.equal(messages.filter((m) => Buffer.from(m.messageText, 'base64').equals(payload)).length, 2, 'both were put');
  });

  test('a Storage Queue message built from an XML template is read back with Azurite\'s own API', async () => {
    const payload = randomBytes(700);
    const res = await call('POST', '/jobs', { body: payload, headers: { 'content-type': 'application/octet-stream' } });
    assert.equal(res.status, 201, res.text);
    const token = await storageToken(stack.issuer, stack.clientSecret);
    const messages = await peekQueueMessages(stack.queue.url, 'jobs', token, { ca: stack.queue.ca });
    const found = messages.find((m) => Buffer.from(m.messageText, 'base64').equals(payload));
    assert.ok(found, `the message is in the queue: ${messages.length} messages`);
    assert.equal(decodeBase64Text(Buffer.from('ok').toString('base64')), 'ok');
    const tooBig = await call('POST', '/jobs', { body: randomBytes(49153) });
    assert.equal(tooBig.status, 413);
  });
});

/**
 * The local peers of the azure_rest backend, without the gateway:
 *   - the Resource Manager stand-in (dev/arm.mjs): what it accepts and refuses must be what
 *     management.azure.com accepts and refuses, or gateway tests against it prove nothing;
 *   - Azurite's Queue service over HTTPS with `--oauth basic` (dev/azurite.mjs): the queue helpers,
 *     and what Azurite actually checks in a Bearer token, measured (the answers below are pinned, so
 *     an Azurite upgrade that changes them fails here first);
 *   - Event Hubs sends on the Service Bus stand-in (an entity with partitions=N), with the
 *     issuer's Event Hubs tokens (the stand-in's own Rust tests cover the rest).
 * Tokens come from the stack's Entra-like issuer; bad ones are made with its signing hook.
 * Own ports (issuer 18700, Service Bus stand-in 18710, ARM 18720, Azurite Blob 20300 and Queue
 * 20301) so that neither a dev stack nor the other test files interfere.
 * Run: source scripts/env.sh && node --test tests/e2e/arm.test.mjs
 */
import assert from 'node:assert/strict';
import { generateKeyPairSync, randomBytes, sign } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, beforeEach, describe, test } from 'node:test';
import { Events } from 'oauth2-mock-server';
import { startArm } from '../../dev/arm.mjs';
import {
  ARM_AUDIENCE, blobRequest, CLIENT_ID, EVENTHUBS_AUDIENCE, SERVICEBUS_AUDIENCE, createQueue, decodeBase64Text, parseQueueMessagesList, peekQueueMessages,
  putQueueMessage, QUEUES, requestToken, startStack, STORAGE_AUDIENCE, TENANT,
} from './stack.mjs';

const PORTS = { issuer: 18700, serviceBus: 18710, arm: 18720, azurite: 20300, queue: 20301 };
const SUB = '11111111-aaaa-4bbb-8ccc-000000000001';
const TENANT_BOUND_SUB = '22222222-aaaa-4bbb-8ccc-000000000002';
const RG = 'rg-web';
const SITE = 'shop-api';
const SUBSCRIPTIONS = {
  [SUB]: {
    resourceGroups: {
      [RG]: { location: 'westeurope', sites: { [SITE]: { appSettings: { GREETING: 'hello' } }, 'shop-worker': { state: 'Stopped' } } },
      'rg-empty': { location: 'northeurope', sites: {} },
    },
  },
  [TENANT_BOUND_SUB]: { tenantId: '99999999-8888-7777-6666-555555555555', resourceGroups: {} },
};
const SITE_PATH = `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.Web/sites/${SITE}`;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const T = { timeout: 30_000 };

let stack;
let arm;
let stateDir;
let armTok;
let storageTok;

before(async () => {
  stateDir = mkdtempSync(join(tmpdir(), 'aeg-arm-test-'));
  stack = await startStack({
    ports: PORTS,
    stateDir,
    gateway: false,
    serviceBus: { entities: ['orders', 'telemetry:partitions=4'] },
    arm: { subscriptions: SUBSCRIPTIONS, pollsBeforeDone: 2 },
  });
  arm = stack.arm;
  armTok = await token(`${ARM_AUDIENCE}/.default`);
  storageTok = await token(`${STORAGE_AUDIENCE}/.default`);
}, { timeout: 300_000 }); // the Service Bus stand-in may need a cargo build

after(async () => {
  await stack?.stop();
  if (stateDir) rmSync(stateDir, { recursive: true, force: true });
});

/** A v2 token for dev-gateway; `edit(payload)` rewrites the claims just before the issuer signs. */
async function token(scope, edit) {
  if (edit) stack.issuer.service.once(Events.BeforeTokenSigning, (t) => edit(t.payload));
  const res = await requestToken(stack.issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: stack.clientSecret, scope });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.access_token;
}
const armTokenWith = (edit) => token(`${ARM_AUDIENCE}/.default`, edit);

/** One call to the ARM stand-in; auth defaults to a good management token. Bounded by 10 s. */
async function call(method, path, { auth = `Bearer ${armTok}`, apiVersion = '2023-01-01', headers = {}, body, query = '' } = {}) {
  const qs = [apiVersion === null ? null : `api-version=${apiVersion}`, query || null].filter(Boolean).join('&');
  const url = path.startsWith('http') ? path : `${arm.url}${path}${qs ? `?${qs}` : ''}`;
  const res = await fetch(url, {
    method,
    headers: { ...(auth ? { authorization: auth } : {}), ...headers },
    body,
    signal: AbortSignal.timeout(10_000),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, text, json };
}

/** ARM's error shape: exactly {"error": {"code", "message"}}, JSON, with the request ids. */
function assertArmError(res, status, code, messagePattern) {
  assert.equal(res.status, status, res.text);
  assert.match(res.headers.get('content-type'), /^application\/json; charset=utf-8$/);
  assert.deepEqual(Object.keys(res.json), ['error']);
  assert.deepEqual(Object.keys(res.json.error).sort(), ['code', 'message']);
  assert.equal(res.json.error.code, code, res.text);
  if (messagePattern) assert.match(res.json.error.message, messagePattern);
  assert.match(res.headers.get('x-ms-request-id'), UUID);
  assert.match(res.headers.get('x-ms-correlation-request-id'), UUID);
}

/** A 401 also carries ARM's Bearer challenge. */
function assertChallenge(res, code, messagePattern) {
  assertArmError(res, 401, code, messagePattern);
  const challenge = res.headers.get('www-authenticate');
  assert.match(challenge, /^Bearer authorization_uri="[^"]+", error="invalid_token", error_description="[^"]+"$/, challenge);
  assert.ok(challenge.includes(`authorization_uri="${stack.issuer.url}/${TENANT}"`), challenge);
}

/** The token with its payload replaced and the original signature kept. */
function withPayload(jwt, edit) {
  const [h, p, s] = jwt.split('.');
  const payload = JSON.parse(Buffer.from(p, 'base64url').toString('utf8'));
  edit(payload);
  return `${h}.${Buffer.from(JSON.stringify(payload)).toString('base64url')}.${s}`;
}

describe('Resource Manager stand-in: tokens', () => {
  beforeEach(() => {
    arm.clearFaults();
    arm.reset();
  });

  test('a management token reads the site: 200, the resource, ARM headers', T, async () => {
    const correlation = '0f0e0d0c-0b0a-4908-8706-050403020100';
    const res = await call('GET', SITE_PATH, { headers: { 'x-ms-correlation-request-id': correlation } });
    assert.equal(res.status, 200, res.text);
    assert.equal(res.headers.get('x-ms-correlation-request-id'), correlation, 'the caller\'s correlation id comes back');
    assert.match(res.headers.get('x-ms-request-id'), UUID);
    assert.match(res.headers.get('x-ms-ratelimit-remaining-subscription-reads'), /^\d+$/);
    const site = res.json;
    assert.equal(site.id, SITE_PATH);
    assert.equal(site.name, SITE);
    assert.equal(site.type, 'Microsoft.Web/sites');
    assert.equal(site.location, 'West Europe');
    assert.equal(site.properties.state, 'Running');
    assert.deepEqual(site.properties.hostNames, [`${SITE}.azurewebsites.net`]);
    assert.equal(site.properties.defaultHostName, `${SITE}.azurewebsites.net`);
    assert.equal(site.properties.resourceGroup, RG);
    assert.equal(site.properties.siteConfig.linuxFxVersion, 'NODE|20-lts');
    assert.ok(Object.keys(site.properties.siteConfig).length > 50, 'lots of siteConfig, as ARM returns it');
    assert.equal(site.properties.siteConfig.appSettings, null, 'GET site does not reveal app settings');

    const other = await call('GET', SITE_PATH, { auth: `Bearer ${armTok}` });
    assert.notEqual(other.headers.get('x-ms-correlation-request-id'), correlation, 'a fresh correlation id otherwise');
  });

  test('resource group and subscription reads; names are case-insensitive', T, async () => {
    const rg = await call('GET', `/subscriptions/${SUB}/resourceGroups/${RG}`, { apiVersion: '2021-04-01' });
    assert.equal(rg.status, 200, rg.text);
    assert.deepEqual(rg.json, {
      id: `/subscriptions/${SUB}/resourceGroups/${RG}`, name: RG, type: 'Microsoft.Resources/resourceGroups',
      location: 'westeurope', properties: { provisioningState: 'Succeeded' },
    });
    const lower = await call('GET', `/SUBSCRIPTIONS/${SUB.toUpperCase()}/resourcegroups/RG-WEB/providers/microsoft.web/SITES/Shop-Api`);
    assert.equal(lower.status, 200, lower.text);
    assert.equal(lower.json.id, SITE_PATH, 'the stored casing comes back');
    const sub = await call('GET', `/subscriptions/${SUB}`, { apiVersion: '2022-12-01' });
    assert.equal(sub.status, 200, sub.text);
    assert.equal(sub.json.subscriptionId, SUB);
    assert.equal(sub.json.state, 'Enabled');
  });

  test('every management audience ARM lists is accepted', T, async () => {
    for (const aud of ['https://management.azure.com/', 'https://management.core.windows.net/', 'https://management.core.windows.net']) {
      const res = await call('GET', SITE_PATH, { auth: `Bearer ${await armTokenWith((p) => { p.aud = aud; })}` });
      assert.equal(res.status, 200, `${aud}: ${res.text}`);
    }
  });

  test('a token for another audience: 401 InvalidAuthenticationTokenAudience', T, async () => {
    const res = await call('GET', SITE_PATH, { auth: `Bearer ${storageTok}` });
    assertChallenge(res, 'InvalidAuthenticationTokenAudience',
      /^The access token has been obtained for wrong audience or resource 'https:\/\/storage\.azure\.com'\. It should exactly match with one of the allowed audiences 'https:\/\/management\.core\.windows\.net\/','https:\/\/management\.core\.windows\.net','https:\/\/management\.azure\.com\/','https:\/\/management\.azure\.com'\.$/);
    const near = await call('GET', SITE_PATH, { auth: `Bearer ${await armTokenWith((p) => { p.aud = 'https://management.azure.com//'; })}` });
    assertChallenge(near, 'InvalidAuthenticationTokenAudience');
  });

  test('an expired token: 401 ExpiredAuthenticationToken; exp is the first invalid second', T, async () => {
    const now = Math.floor(Date.now() / 1000);
    const expired = await armTokenWith((p) => { p.iat = now - 3600; p.nbf = now - 3600; p.exp = now - 1; });
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${expired}` }), 'ExpiredAuthenticationToken',
      /^The access token expiry UTC time '\d{1,2}\/\d{1,2}\/\d{4} \d{1,2}:\d\d:\d\d [AP]M' is earlier than current UTC time '\d{1,2}\/\d{1,2}\/\d{4} \d{1,2}:\d\d:\d\d [AP]M'\.$/);
    const atExp = await armTokenWith((p) => { p.exp = Math.floor(Date.now() / 1000); });
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${atExp}` }), 'ExpiredAuthenticationToken');
    const notYet = await armTokenWith((p) => { p.nbf = Math.floor(Date.now() / 1000) + 60; });
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${notYet}` }), 'InvalidAuthenticationToken', /not yet valid/);
  });

  test('a tampered token: 401 InvalidAuthenticationToken (payload changed, signature changed, foreign key, alg)', T, async () => {
    const payloadChanged = withPayload(armTok, (p) => { p.appid = 'someone-else'; });
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${payloadChanged}` }), 'InvalidAuthenticationToken', /signature is invalid/);
    const [h, p, s] = armTok.split('.');
    const sig = Buffer.from(s, 'base64url');
    sig[sig.length - 1] ^= 1;
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${h}.${p}.${sig.toString('base64url')}` }), 'InvalidAuthenticationToken');
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${h}.${p}.` }), 'InvalidAuthenticationToken');

    // Signed by a key of our own under the issuer's kid: the JWKS key does not verify it.
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const forged = `${h}.${p}.${sign('sha256', Buffer.from(`${h}.${p}`), privateKey).toString('base64url')}`;
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${forged}` }), 'InvalidAuthenticationToken');

    const none = `${Buffer.from(JSON.stringify({ alg: 'none', typ: 'JWT' })).toString('base64url')}.${p}.`;
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${none}` }), 'InvalidAuthenticationToken', /algorithm 'none'/);
  });

  test('an unknown kid refetches the key set at most once per 10 s', T, async () => {
    const before0 = arm.stats().jwksFetches;
    const [h, p, s] = armTok.split('.');
    const header = JSON.parse(Buffer.from(h, 'base64url').toString('utf8'));
    const unknown = `${Buffer.from(JSON.stringify({ ...header, kid: `nope-${randomBytes(4).toString('hex')}` })).toString('base64url')}.${p}.${s}`;
    for (let i = 0; i < 3; i += 1) {
      assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${unknown}` }), 'InvalidAuthenticationToken', /signing key/);
    }
    assert.ok(arm.stats().jwksFetches - before0 <= 1, `at most one refetch, got ${arm.stats().jwksFetches - before0}`);
    assert.equal((await call('GET', SITE_PATH)).status, 200, 'the known key still works');
  });

  test('missing or malformed Authorization: 401 AuthenticationFailed', T, async () => {
    assertChallenge(await call('GET', SITE_PATH, { auth: null }), 'AuthenticationFailed', /^Authentication failed\. The 'Authorization' header is missing\.$/);
    for (const auth of [`bearer ${armTok}`, armTok, `Bearer  ${armTok}`, 'Bearer abc', `SharedAccessSignature sr=x&sig=y`]) {
      assertChallenge(await call('GET', SITE_PATH, { auth }), 'AuthenticationFailed', /^Authentication failed\. The 'Authorization' header is provided in an invalid format\.$/);
    }
  });

  test('issuer outside the prefix, no object id, another tenant\'s subscription: 401', T, async () => {
    const evil = await armTokenWith((p) => { p.iss = 'https://evil.example/tenant/'; });
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${evil}` }), 'InvalidAuthenticationToken', /invalid issuer/);
    const noOid = await armTokenWith((p) => { delete p.oid; });
    assertChallenge(await call('GET', SITE_PATH, { auth: `Bearer ${noOid}` }), 'InvalidAuthenticationToken', /'puid' or 'altsecid' or 'oid'/);
    const res = await call('GET', `/subscriptions/${TENANT_BOUND_SUB}`, { apiVersion: '2022-12-01' });
    assertChallenge(res, 'InvalidAuthenticationTokenTenant', /^The access token is from the wrong issuer 'https:\/\/sts\.windows\.net\/11111111-2222-3333-4444-555555555555\/'/);
  });

  test('authentication comes before the api-version check', T, async () => {
    assertChallenge(await call('GET', SITE_PATH, { auth: null, apiVersion: null }), 'AuthenticationFailed');
  });
});

describe('Resource Manager stand-in: api-version and 404 shapes', () => {
  beforeEach(() => arm.reset());

  test('missing api-version: 400 MissingApiVersionParameter, exactly ARM\'s body', T, async () => {
    for (const path of [SITE_PATH, `/subscriptions/${SUB}/resourceGroups/${RG}`, `/subscriptions/${SUB}/resourceGroups/nope`, '/anything']) {
      const res = await call('GET', path, { apiVersion: null });
      assert.equal(res.status, 400, res.text);
      assert.deepEqual(res.json, { error: { code: 'MissingApiVersionParameter', message: 'The api-version query parameter (?api-version=) is required for all requests.' } });
    }
    assertArmError(await call('GET', SITE_PATH, { apiVersion: '' }), 400, 'MissingApiVersionParameter');
  });

  test('unsupported api-versions: per resource type', T, async () => {
    assert.equal((await call('GET', SITE_PATH, { apiVersion: '2022-09-01' })).status, 200);
    assertArmError(await call('GET', SITE_PATH, { apiVersion: '2021-04-01' }), 400, 'NoRegisteredProviderFound',
      /^No registered resource provider found for location 'westeurope' and API version '2021-04-01' for type 'sites'\. The supported api-versions are '2023-01-01, 2022-09-01'\./);
    assertArmError(await call('GET', SITE_PATH, { apiVersion: 'latest' }), 400, 'InvalidApiVersionParameter', /^The api-version 'latest' is invalid\./);
    const rg = `/subscriptions/${SUB}/resourceGroups/${RG}`;
    assert.equal((await call('GET', rg, { apiVersion: '2022-09-01' })).status, 200);
    assertArmError(await call('GET', rg, { apiVersion: '2023-01-01' }), 400, 'InvalidApiVersionParameter',
      /^The api-version '2023-01-01' is invalid\. The supported versions are '2022-09-01,2021-04-01'\.$/);
  });

  test('404s: resource, resource group, subscription, resource type, provider', T, async () => {
    assertArmError(await call('GET', `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.Web/sites/x`), 404, 'ResourceNotFound',
      /^The Resource 'Microsoft\.Web\/sites\/x' under resource group 'rg-web' was not found\. For more details please go to https:\/\/aka\.ms\/ARMResourceNotFoundFix$/);
    assertArmError(await call('GET', `/subscriptions/${SUB}/resourceGroups/rg-gone/providers/Microsoft.Web/sites/${SITE}`), 404, 'ResourceGroupNotFound',
      /^Resource group 'rg-gone' could not be found\.$/);
    assertArmError(await call('GET', `/subscriptions/${SUB}/resourceGroups/rg-gone`, { apiVersion: '2021-04-01' }), 404, 'ResourceGroupNotFound');
    assertArmError(await call('POST', `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.Web/sites/x/restart`), 404, 'ResourceNotFound');
    const otherSub = '33333333-aaaa-4bbb-8ccc-000000000003';
    assertArmError(await call('GET', `/subscriptions/${otherSub}/resourceGroups/${RG}`), 404, 'SubscriptionNotFound', new RegExp(`^The subscription '${otherSub}' could not be found\\.$`));
    assertArmError(await call('GET', `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.Web/serverfarms/plan`), 404, 'InvalidResourceType',
      /^The resource type 'serverfarms' could not be found in the namespace 'Microsoft\.Web' for api version '2023-01-01'\.$/);
    assertArmError(await call('GET', `${SITE_PATH}/slots/staging`), 404, 'InvalidResourceType', /'sites\/slots'/);
    assertArmError(await call('GET', `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.KeyVault/vaults/kv`), 404, 'NoRegisteredProviderFound');
    assertArmError(await call('GET', '/tenants'), 404, 'InvalidResourceType');
  });

  test('a method the resource does not take: 405', T, async () => {
    const res = await call('DELETE', SITE_PATH);
    assertArmError(res, 405, 'MethodNotAllowed');
    assert.equal(res.headers.get('allow'), 'GET');
  });
});

describe('Resource Manager stand-in: actions', () => {
  beforeEach(() => arm.reset());

  const state = async (path = SITE_PATH) => (await call('GET', path)).json.properties.state;

  test('restart is long-running: 202 + Azure-AsyncOperation, InProgress twice, then Succeeded; Stopped → Running', T, async () => {
    const res = await call('POST', `${SITE_PATH}/restart`, { query: 'softRestart=false' });
    assert.equal(res.status, 202, res.text);
    assert.equal(res.text, '');
    const asyncUrl = res.headers.get('azure-asyncoperation');
    const prefix = `${arm.url}/subscriptions/${SUB}/providers/Microsoft.Web/locations/westeurope`;
    assert.match(asyncUrl, new RegExp(`^${prefix.replace(/[.]/g, '\\.')}/operationResults/[0-9a-f-]{36}\\?api-version=2023-01-01$`));
    assert.match(res.headers.get('location'), new RegExp(`^${prefix.replace(/[.]/g, '\\.')}/operations/[0-9a-f-]{36}\\?api-version=2023-01-01$`));
    assert.equal(res.headers.get('retry-after'), '1');
    assert.equal(await state(), 'Stopped', 'stopped while the restart runs');

    const poll = () => call('GET', asyncUrl);
    for (let i = 0; i < 2; i += 1) {
      const p = await poll();
      assert.equal(p.status, 200, p.text);
      assert.equal(p.json.status, 'InProgress');
      assert.equal(p.headers.get('retry-after'), '1');
    }
    const done = await poll();
    assert.equal(done.json.status, 'Succeeded');
    assert.ok(done.json.endTime);
    assert.equal(await state(), 'Running');
    assert.equal((await poll()).json.status, 'Succeeded', 'stays succeeded');

    assertChallenge(await call('GET', asyncUrl, { auth: null }), 'AuthenticationFailed');
    const unknownOp = asyncUrl.replace(/operationResults\/[^?]+/, 'operationResults/00000000-0000-4000-8000-000000000000');
    assertArmError(await call('GET', unknownOp), 404, 'NotFound');
  });

  test('the Location URL of a restart: 202 while in progress, 204 when done', T, async () => {
    const res = await call('POST', `${SITE_PATH}/restart`);
    const location = res.headers.get('location');
    const first = await call('GET', location);
    assert.equal(first.status, 202);
    assert.equal(first.headers.get('location'), location);
    assert.equal((await call('GET', location)).status, 202);
    const done = await call('GET', location);
    assert.equal(done.status, 204);
    assert.equal(done.text, '');
    assert.equal(await state(), 'Running');
  });

  test('stop and start are synchronous: 200, empty', T, async () => {
    const stop = await call('POST', `${SITE_PATH}/stop`);
    assert.equal(stop.status, 200, stop.text);
    assert.equal(stop.text, '');
    assert.match(stop.headers.get('x-ms-ratelimit-remaining-subscription-writes'), /^\d+$/);
    assert.equal(await state(), 'Stopped');
    assert.equal((await call('POST', `${SITE_PATH}/start`)).status, 200);
    assert.equal(await state(), 'Running');
    assert.equal(arm.resources().subscriptions[SUB].resourceGroups[RG].sites['shop-worker'].state, 'Stopped', 'other sites untouched');
  });

  test('PUT appsettings: JSON {"properties": {string values}} replaces the settings; anything else is refused', T, async () => {
    const path = `${SITE_PATH}/config/appsettings`;
    const json = { 'content-type': 'application/json' };
    const ok = await call('PUT', path, { headers: json, body: JSON.stringify({ properties: { MODE: 'blue', EMPTY: '' } }) });
    assert.equal(ok.status, 200, ok.text);
    assert.deepEqual(ok.json.properties, { MODE: 'blue', EMPTY: '' });
    assert.equal(ok.json.id, `${SITE_PATH}/config/appsettings`);
    assert.equal(ok.json.type, 'Microsoft.Web/sites/config');
    const list = await call('POST', `${path}/list`);
    assert.deepEqual(list.json.properties, { MODE: 'blue', EMPTY: '' });

    for (const body of ['{"properties": {"N": 5}}', '{"properties": ["a"]}', '{"MODE": "x"}', '{"properties": {"A": "b"}', '[]', '']) {
      assertArmError(await call('PUT', path, { headers: json, body }), 400, 'InvalidRequestContent', /^The request content was invalid and could not be deserialized: /);
    }
    assertArmError(await call('PUT', path, { headers: { 'content-type': 'text/plain' }, body: '{"properties": {}}' }), 415, 'UnsupportedMediaType');
    assert.deepEqual((await call('POST', `${path}/list`)).json.properties, { MODE: 'blue', EMPTY: '' }, 'refused bodies changed nothing');
  });
});

describe('Resource Manager stand-in: control surface', () => {
  beforeEach(() => {
    arm.clearFaults();
    arm.clearRequests();
    arm.resetStats();
    arm.reset();
  });

  test('faults: the next N calls answer the status with an ARM error body and Retry-After', T, async () => {
    arm.setFault({ status: 429, retryAfter: 7, count: 2 });
    for (let i = 0; i < 2; i += 1) {
      const res = await call('GET', SITE_PATH);
      assertArmError(res, 429, 'SubscriptionRequestsThrottled');
      assert.equal(res.headers.get('retry-after'), '7');
    }
    assert.equal((await call('GET', SITE_PATH)).status, 200);

    arm.setFault({ status: 503, match: '/restart' });
    assert.equal((await call('GET', SITE_PATH)).status, 200, 'a fault for another path leaves this one alone');
    assertArmError(await call('POST', `${SITE_PATH}/restart`), 503, 'ServiceUnavailable');
    assert.equal((await call('POST', `${SITE_PATH}/restart`)).status, 202);

    arm.setFault({ status: 409, code: 'Conflict', message: 'The site is busy.', count: 1 });
    assert.deepEqual((await call('GET', SITE_PATH, { auth: null })).json, { error: { code: 'Conflict', message: 'The site is busy.' } }, 'faults come before authentication');
    assert.equal(arm.stats().faultsInjected, 4);
    assert.throws(() => arm.setFault({ status: 99 }), /400\.\.599/);
    assert.throws(() => arm.setFault({ status: 500, colour: 'red' }), /unknown fault field/);
  });

  test('faults over HTTP: set, delay, clear, refuse nonsense', T, async () => {
    const control = `${arm.url}/__control/faults`;
    const post = (body) => fetch(control, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    assert.equal((await post({ status: 500, count: 3 })).status, 200);
    assertArmError(await call('GET', SITE_PATH), 500, 'InternalServerError');
    assert.equal((await fetch(control, { method: 'DELETE' })).status, 200);
    assert.equal((await call('GET', SITE_PATH)).status, 200);
    assert.equal((await post({ status: 502, delayMs: 300 })).status, 200);
    const t0 = Date.now();
    assert.equal((await call('GET', SITE_PATH)).status, 502);
    assert.ok(Date.now() - t0 >= 290, 'delayed');
    assert.equal((await post({ status: 'soon' })).status, 400);
    assert.equal((await fetch(control, { method: 'POST', body: 'not json' })).status, 400);
    assert.equal((await fetch(`${arm.url}/__control/nope`)).status, 404);
  });

  test('requests log: method, path, query, headers without the token, audience, body; the last 100', T, async () => {
    await call('PUT', `${SITE_PATH}/config/appsettings`, {
      headers: { 'content-type': 'application/json', 'x-trace': 't-1' },
      body: '{"properties": {"A": "1"}}',
    });
    await call('GET', SITE_PATH, { auth: `Bearer ${storageTok}` });
    await call('GET', SITE_PATH, { auth: null, apiVersion: null });
    const log = await (await fetch(`${arm.url}/__control/requests`)).json();
    assert.deepEqual(log, arm.requests());
    assert.equal(log.length, 3);
    const [put, wrongAudience, anonymous] = log;
    assert.equal(put.method, 'PUT');
    assert.equal(put.path, `${SITE_PATH}/config/appsettings`);
    assert.deepEqual(put.query, { 'api-version': '2023-01-01' });
    assert.equal(put.headers['x-trace'], 't-1');
    assert.equal(put.headers.authorization, undefined, 'the token is never logged');
    assert.ok(!JSON.stringify(log).includes(armTok.split('.')[2]), 'no signature anywhere in the log');
    assert.deepEqual(put.authorization, { present: true, scheme: 'Bearer', audience: ARM_AUDIENCE });
    assert.equal(put.body, '{"properties": {"A": "1"}}');
    assert.equal(put.route, 'site appsettings');
    assert.equal(put.status, 200);
    assert.deepEqual(wrongAudience.authorization, { present: true, scheme: 'Bearer', audience: STORAGE_AUDIENCE });
    assert.equal(wrongAudience.status, 401);
    assert.deepEqual(anonymous.authorization, { present: false });
    assert.equal(anonymous.body, null);

    for (let i = 0; i < 105; i += 1) await call('GET', `/subscriptions/${SUB}/resourceGroups/${RG}`, { apiVersion: '2021-04-01', query: `n=${i}` });
    const last = arm.requests();
    assert.equal(last.length, 100);
    assert.equal(last.at(-1).query.n, '104');
    assert.equal((await fetch(`${arm.url}/__control/requests`, { method: 'DELETE' })).status, 200);
    assert.deepEqual(arm.requests(), []);
  });

  test('stats: per route and per status, over HTTP too', T, async () => {
    await call('GET', SITE_PATH);
    await call('GET', SITE_PATH);
    await call('POST', `${SITE_PATH}/stop`);
    await call('GET', SITE_PATH, { apiVersion: null });
    await call('GET', `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.Web/sites/gone`);
    const stats = arm.stats();
    assert.equal(stats.requests, 5);
    assert.deepEqual(stats.byRoute, { site: 3, 'site stop': 1, unknown: 1 });
    assert.deepEqual(stats.byStatus, { 200: 3, 400: 1, 404: 1 });
    assert.deepEqual(await (await fetch(`${arm.url}/__control/stats`)).json(), stats);
    assert.equal((await fetch(`${arm.url}/__control/stats`, { method: 'DELETE' })).status, 200);
    assert.equal(arm.stats().requests, 0);
  });

  test('resources: the model as it is now; reset restores the seed', T, async () => {
    await call('POST', `${SITE_PATH}/stop`);
    const snapshot = await (await fetch(`${arm.url}/__control/resources`)).json();
    assert.equal(snapshot.subscriptions[SUB].resourceGroups[RG].sites[SITE].state, 'Stopped');
    assert.deepEqual(snapshot.subscriptions[SUB].resourceGroups[RG].sites[SITE].appSettings, { GREETING: 'hello' });
    arm.reset();
    assert.equal(arm.resources().subscriptions[SUB].resourceGroups[RG].sites[SITE].state, 'Running');
  });

  test('a second stand-in takes a free port, uses the default model, and stops', T, async () => {
    const other = await startArm({ port: 0, jwksUrl: stack.issuer.jwksUrl, pollsBeforeDone: 0 });
    try {
      assert.notEqual(other.port, PORTS.arm);
      const path = '/subscriptions/00000000-aaaa-bbbb-cccc-000000000001/resourceGroups/rg-edge/providers/Microsoft.Web/sites/contoso-api';
      const restart = await call('POST', `${other.url}${path}/restart?api-version=2022-09-01`);
      assert.equal(restart.status, 202);
      assert.equal((await call('GET', restart.headers.get('azure-asyncoperation'))).json.status, 'Succeeded', 'pollsBeforeDone: 0');
    } finally {
      await other.stop();
    }
    await assert.rejects(fetch(`${other.url}/__control/stats`, { signal: AbortSignal.timeout(2_000) }));
    await assert.rejects(startArm({ port: 0 }), /jwksUrl is required/);
  });
});

describe('Azurite Queue over HTTPS with issuer tokens', () => {
  const ca = () => stack.queue.ca;

  test('the stack created its queues; a storage token creates another, puts and peeks messages', T, async () => {
    assert.equal(stack.queue.url, `https://127.0.0.1:${PORTS.queue}/devstoreaccount1`);
    for (const q of QUEUES) assert.deepEqual(await peekQueueMessages(stack.queue.url, q, storageTok, { ca: ca() }), []);
    const name = `q-${randomBytes(4).toString('hex')}`;
    assert.equal(await createQueue(stack.queue.url, name, storageTok, { ca: ca() }), 201);
    assert.equal(await createQueue(stack.queue.url, name, storageTok, { ca: ca() }), 204, 'already there, same metadata');

    const plain = 'order <1> & "two"';
    const put1 = await putQueueMessage(stack.queue.url, name, plain, storageTok, { ca: ca() });
    assert.equal(put1.status, 201, put1.body.toString());
    const encoded = Buffer.from('{"order": 2, "note": "ünïcödé"}').toString('base64');
    assert.equal((await putQueueMessage(stack.queue.url, name, encoded, storageTok, { ca: ca() })).status, 201);

    const messages = await peekQueueMessages(stack.queue.url, name, storageTok, { ca: ca() });
    assert.equal(messages.length, 2);
    assert.equal(messages[0].messageText, plain, 'raw text, XML-unescaped');
    assert.equal(decodeBase64Text(messages[0].messageText), null, 'not base64');
    assert.equal(messages[1].messageText, encoded, 'raw: not decoded by the helper');
    assert.equal(decodeBase64Text(messages[1].messageText), '{"order": 2, "note": "ünïcödé"}');
    assert.match(messages[0].messageId, UUID);
    assert.equal(messages[0].dequeueCount, 0, 'peek does not dequeue');
    assert.equal((await peekQueueMessages(stack.queue.url, name, storageTok, { ca: ca() })).length, 2, 'still there');
  });

  test('parseQueueMessagesList: empty list, entities, several messages', () => {
    assert.deepEqual(parseQueueMessagesList('<?xml version="1.0"?><QueueMessagesList />'), []);
    assert.deepEqual(parseQueueMessagesList('<QueueMessagesList></QueueMessagesList>'), []);
    const xml = '<QueueMessagesList><QueueMessage><MessageId>a</MessageId><DequeueCount>2</DequeueCount><MessageText>x &amp;lt; &#65;&#x42;</MessageText></QueueMessage>'
      + '<QueueMessage><MessageId>b</MessageId><MessageText></MessageText></QueueMessage></QueueMessagesList>';
    assert.deepEqual(parseQueueMessagesList(xml).map((m) => [m.messageId, m.dequeueCount, m.messageText]), [['a', 2, 'x &lt; AB'], ['b', 0, '']]);
    assert.throws(() => parseQueueMessagesList('<Error/>'), /not a QueueMessagesList/);
  });

  /**
   * What Azurite 3.37's queue service checks with `--oauth basic`, measured: one request per
   * token variant against the same queue, answer pinned. Summary (also in dev/azurite.mjs):
   * audience, issuer prefix and lifetime are checked (403 AuthenticationFailed with an
   * AuthenticationErrorDetail); the signature and the x-ms-version minimum for OAuth are not.
   */
  test('what Azurite\'s queue OAuth checks: audience, issuer, lifetime — not the signature or x-ms-version', T, async () => {
    const name = QUEUES[0];
    const peek = (tok, headers = {}) => blobRequest(`${stack.queue.url}/${name}/messages?numofmessages=1&peekonly=true`, {
      token: tok, ca: ca(), headers: { 'x-ms-version': '2021-08-06', ...headers },
    });
    const refused = async (res, detail) => {
      assert.equal(res.status, 403, res.body.toString());
      assert.equal(res.headers['x-ms-error-code'], 'AuthenticationFailed');
      if (detail) assert.ok(res.body.toString().includes(`<AuthenticationErrorDetail>${detail}</AuthenticationErrorDetail>`), res.body.toString());
    };
    const storageWith = (edit) => token(`${STORAGE_AUDIENCE}/.default`, edit);

    assert.equal((await peek(storageTok)).status, 200, 'baseline');
    // Audience: checked. Resource Manager, Service Bus and the emulator's own URL are refused;
    // https://storage.azure.com/ and the account's production-style queue URL are accepted.
    await refused(await peek(armTok), 'Invalid token audience.');
    await refused(await peek(await token('https://servicebus.azure.net/.default')), 'Invalid token audience.');
    await refused(await peek(await storageWith((p) => { p.aud = stack.queue.url; })), 'Invalid token audience.');
    assert.equal((await peek(await storageWith((p) => { p.aud = 'https://storage.azure.com/'; }))).status, 200);
    assert.equal((await peek(await storageWith((p) => { p.aud = 'https://devstoreaccount1.queue.core.windows.net'; }))).status, 200);
    await refused(await peek(await storageWith((p) => { p.aud = 'https://otheraccount.queue.core.windows.net'; })), 'Invalid token audience.');
    // Issuer: only its prefix (sts.windows.net and other clouds' STS).
    await refused(await peek(await storageWith((p) => { p.iss = 'https://evil.example/t/'; })), 'Invalid token issuer.');
    // Lifetime: nbf, exp (and iat) must be present; now inside them.
    const now = Math.floor(Date.now() / 1000);
    await refused(await peek(await storageWith((p) => { p.exp = now - 60; })), 'Lifetime validation failed. The token is expired.');
    await refused(await peek(await storageWith((p) => { p.nbf = now + 600; })), 'Lifetime validation failed.');
    await refused(await peek(await storageWith((p) => { delete p.iat; })));
    // Signature: NOT checked. A payload changed under the old signature, or no signature, passes.
    assert.equal((await peek(withPayload(storageTok, (p) => { p.appid = 'forged'; }))).status, 200, 'a forged token is accepted');
    const [h, p] = storageTok.split('.');
    assert.equal((await peek(`${h}.${p}.`)).status, 200, 'an unsigned token is accepted');
    // x-ms-version minimum for OAuth (2017-11-09): NOT enforced.
    assert.equal((await peek(storageTok, { 'x-ms-version': '2016-05-31' })).status, 200, 'an OAuth request at 2016-05-31 is accepted');
    // Scheme and presence: no token is 403; a lower-case `bearer` is 400 InvalidAuthenticationInfo.
    await refused(await blobRequest(`${stack.queue.url}/${name}/messages?peekonly=true`, { ca: ca() }));
    const lower = await blobRequest(`${stack.queue.url}/${name}/messages?peekonly=true`, { ca: ca(), headers: { authorization: `bearer ${storageTok}` } });
    assert.equal(lower.status, 400, lower.body.toString());
    assert.equal(lower.headers['x-ms-error-code'], 'InvalidAuthenticationInfo');
  });
});

describe('Event Hubs on the Service Bus stand-in', () => {
  const ATOM = 'application/atom+xml;type=entry;charset=utf-8';
  const send = async (path, tok, { headers = {}, body = '{"t": 21.5}' } = {}) => {
    const res = await fetch(`${stack.serviceBus.url}${path}?timeout=60&api-version=2014-01`, {
      method: 'POST',
      headers: { authorization: `Bearer ${tok}`, 'content-type': ATOM, ...headers },
      body,
      signal: AbortSignal.timeout(10_000),
    });
    return { status: res.status, text: await res.text() };
  };
  beforeEach(() => stack.serviceBus.purge());

  test('an Event Hubs token sends single, keyed, partition and batch events; they are read back with their partition', T, async () => {
    const hubTok = await token(`${EVENTHUBS_AUDIENCE}/.default`);
    assert.equal(JSON.parse(Buffer.from(hubTok.split('.')[1], 'base64url')).aud, EVENTHUBS_AUDIENCE);
    assert.equal((await send('/telemetry/messages', hubTok, { headers: { BrokerProperties: '{"PartitionKey":"device-7"}', Site: 'north' } })).status, 201);
    assert.equal((await send('/telemetry/messages', hubTok, { headers: { BrokerProperties: '{"PartitionKey":"device-7"}' } })).status, 201);
    assert.equal((await send('/telemetry/partitions/3/messages', hubTok)).status, 201);
    const batch = JSON.stringify([{ Body: 'a', UserProperties: { Alert: 'Strong Wind' } }, { Body: 'b' }]);
    assert.equal((await send('/telemetry/messages', hubTok, { headers: { 'content-type': 'application/vnd.microsoft.servicebus.json' }, body: batch })).status, 201);

    const events = await stack.serviceBus.messages('telemetry');
    assert.equal(events.length, 5);
    assert.equal(events[0].partitionId, events[1].partitionId, 'one key, one partition');
    assert.equal(events[2].partitionId, '3');
    assert.ok(events.every((e) => ['0', '1', '2', '3'].includes(e.partitionId)));
    assert.equal(events[0].body.toString(), '{"t": 21.5}');
    assert.equal(events[0].contentType, ATOM);
    assert.equal(events[0].brokerProperties.PartitionKey, 'device-7');
    assert.deepEqual(events[0].userProperties, { site: 'north' });
    assert.deepEqual(events[3].userProperties, { Alert: 'Strong Wind' });
    const stats = await stack.serviceBus.stats();
    assert.equal(stats.entities.telemetry.accepted, 5);
    assert.equal(Object.values(stats.entities.telemetry.partitions).reduce((a, b) => a + b, 0), 5);
  });

  test('audiences do not cross: Service Bus token on the hub, Event Hubs token on a queue: 401', T, async () => {
    const hubTok = await token(`${EVENTHUBS_AUDIENCE}/.default`);
    const sbTok = await token(`${SERVICEBUS_AUDIENCE}/.default`);
    const onHub = await send('/telemetry/messages', sbTok);
    assert.equal(onHub.status, 401);
    assert.match(onHub.text, /InvalidAudience: .*expected &apos;https:\/\/eventhubs\.azure\.net&apos;/);
    assert.equal((await send('/orders/messages', hubTok)).status, 401);
    assert.equal((await send('/orders/messages', sbTok)).status, 201, 'Service Bus unchanged');
    assert.equal((await send('/telemetry/partitions/4/messages', hubTok)).status, 400, 'partitions 0..3 only');
    assert.equal((await send('/telemetry/messages', hubTok, { headers: { BrokerProperties: '{"SessionId":"s"}' } })).status, 400);
  });
});

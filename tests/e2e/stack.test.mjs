/**
 * Tests of the local stack itself (no gateway worker needed): the Entra-like issuer answers like
 * Entra, its tokens work against Azurite over HTTPS (and the wrong audience does not), and the
 * control surface (faults, stats) that later gateway tests rely on behaves as documented.
 * Ports 18400/20000 so a running dev stack (8400/10000) does not interfere.
 * Run: source scripts/env.sh && node --test tests/e2e/
 */
import assert from 'node:assert/strict';
import { createPublicKey, generateKeyPairSync, randomBytes, sign, verify } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import {
  blobRequest, CLIENT_ID, createContainer, requestToken, SERVICEBUS_AUDIENCE, startStack, STORAGE_AUDIENCE, TENANT,
} from './stack.mjs';
import { secretFingerprint } from '../../dev/issuer.mjs';

const PORTS = { issuer: 18400, azurite: 20000 };
const STORAGE_SCOPE = `${STORAGE_AUDIENCE}/.default`;
let stack;
let stateDir;

before(async () => {
  stateDir = mkdtempSync(join(tmpdir(), 'aeg-stack-test-'));
  stack = await startStack({ ports: PORTS, stateDir, gateway: false });
}, { timeout: 60_000 });

after(async () => {
  await stack?.stop();
  if (stateDir) rmSync(stateDir, { recursive: true, force: true });
});

/** v2 client-credentials request for dev-gateway with the stack's secret, overridable. */
const tokenV2 = (overrides = {}) =>
  requestToken(stack.issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: stack.clientSecret, scope: STORAGE_SCOPE, ...overrides });

function decodeJwt(jwt) {
  const [header, payload] = jwt.split('.').slice(0, 2).map((p) => JSON.parse(Buffer.from(p, 'base64url').toString('utf8')));
  return { header, payload };
}

/** Assert an Entra error answer: status, error, AADSTS code, and the exact body shape. */
function assertEntraError(res, status, error, code) {
  assert.equal(res.status, status, JSON.stringify(res.body));
  assert.deepEqual(Object.keys(res.body).sort(), ['correlation_id', 'error', 'error_codes', 'error_description', 'timestamp', 'trace_id']);
  assert.equal(res.body.error, error);
  assert.deepEqual(res.body.error_codes, [code]);
  assert.match(res.body.error_description, new RegExp(`^AADSTS${code}: `));
  assert.match(res.body.trace_id, /^[0-9a-f-]{36}$/);
  assert.match(res.body.correlation_id, /^[0-9a-f-]{36}$/);
}

describe('issuer tokens', () => {
  test('v2 token: Entra issuer, storage audience, numeric expires_in, signature checks against JWKS', async () => {
    const res = await tokenV2();
    assert.equal(res.status, 200);
    assert.equal(res.body.token_type, 'Bearer');
    assert.equal(res.body.expires_in, 3599);
    const { header, payload } = decodeJwt(res.body.access_token);
    assert.equal(header.alg, 'RS256');
    assert.equal(payload.iss, `https://sts.windows.net/${TENANT}/`);
    assert.equal(payload.aud, STORAGE_AUDIENCE);
    assert.equal(payload.appid, CLIENT_ID);
    assert.equal(payload.azp, CLIENT_ID);
    assert.equal(payload.tid, TENANT);
    assert.equal(payload.exp - payload.iat, 3599);
    assert.ok(payload.oid && payload.sub && payload.nbf <= payload.iat);

    const jwks = await (await fetch(stack.issuer.jwksUrl)).json();
    const jwk = jwks.keys.find((k) => k.kid === header.kid);
    assert.ok(jwk, 'kid is in the tenant JWKS');
    const [h, p, s] = res.body.access_token.split('.');
    const key = createPublicKey({ key: jwk, format: 'jwk' });
    assert.ok(verify('sha256', Buffer.from(`${h}.${p}`), key, Buffer.from(s, 'base64url')));
    assert.deepEqual(await (await fetch(`${stack.issuer.url}/jwks`)).json(), jwks);
  });

  test('v1 token: resource= gives aud, string expires_in and expires_on', async () => {
    const res = await requestToken(stack.issuer.tokenUrlV1, { clientId: CLIENT_ID, secret: stack.clientSecret, resource: SERVICEBUS_AUDIENCE });
    assert.equal(res.status, 200);
    assert.equal(res.body.expires_in, '3599');
    assert.equal(typeof res.body.expires_on, 'string');
    assert.ok(Number(res.body.expires_on) > Date.now() / 1000);
    assert.equal(decodeJwt(res.body.access_token).payload.aud, SERVICEBUS_AUDIENCE);
  });

  test('client_secret_basic works', async () => {
    const res = await tokenV2({ basic: true });
    assert.equal(res.status, 200);
    assert.equal(decodeJwt(res.body.access_token).payload.appid, CLIENT_ID);
  });

  test('wrong secret: 401 invalid_client AADSTS7000215, no secret in the answer', async () => {
    const wrong = `wrong-${randomBytes(8).toString('hex')}`;
    const res = await tokenV2({ secret: wrong });
    assertEntraError(res, 401, 'invalid_client', 7000215);
    const text = JSON.stringify(res.body);
    assert.ok(!text.includes(wrong) && !text.includes(stack.clientSecret));
  });

  test('scope without /.default: 400 invalid_scope', async () => {
    assertEntraError(await tokenV2({ scope: STORAGE_AUDIENCE }), 400, 'invalid_scope', 1002012);
  });

  test('other Entra errors', async () => {
    assertEntraError(await tokenV2({ clientId: 'nobody' }), 400, 'unauthorized_client', 700016);
    assertEntraError(await tokenV2({ scope: undefined }), 400, 'invalid_request', 90014);
    assertEntraError(await tokenV2({ extra: { grant_type: 'password' } }), 400, 'unsupported_grant_type', 70003);
    const otherTenant = stack.issuer.tokenUrlV2.replace(TENANT, '99999999-2222-3333-4444-555555555555');
    assertEntraError(await requestToken(otherTenant, { clientId: CLIENT_ID, secret: stack.clientSecret, scope: STORAGE_SCOPE }), 400, 'invalid_request', 90002);
  });

  test('client assertion signed by a registered key is accepted; wrong audience is not', async () => {
    const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    stack.issuer.setClient('cert-client', { publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }) });
    const assertion = (aud) => {
      const now = Math.floor(Date.now() / 1000);
      const enc = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
      const unsigned = `${enc({ alg: 'RS256', typ: 'JWT' })}.${enc({ aud, iss: 'cert-client', sub: 'cert-client', jti: randomBytes(8).toString('hex'), nbf: now, exp: now + 600 })}`;
      return `${unsigned}.${sign('sha256', Buffer.from(unsigned), privateKey).toString('base64url')}`;
    };
    const withAssertion = (aud) => requestToken(stack.issuer.tokenUrlV2, {
      clientId: 'cert-client',
      scope: STORAGE_SCOPE,
      extra: { client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer', client_assertion: assertion(aud) },
    });
    const ok = await withAssertion(stack.issuer.tokenUrlV2);
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.equal(decodeJwt(ok.body.access_token).payload.appidacr, '2');
    assertEntraError(await withAssertion('https://elsewhere.example/token'), 401, 'invalid_client', 700027);
  });
});

describe('Azurite over HTTPS with issuer tokens', () => {
  test('a storage token creates a container and puts and gets a blob', async () => {
    const token = (await tokenV2()).body.access_token;
    const { url, ca } = stack.azurite;
    const container = `e2e-${randomBytes(4).toString('hex')}`;
    assert.equal(await createContainer(url, container, token, { ca }), 201);
    const blobUrl = `${url}/${container}/dir/hello.txt`;
    const put = await blobRequest(blobUrl, { method: 'PUT', token, ca, body: 'hello azurite', headers: { 'x-ms-blob-type': 'BlockBlob', 'content-type': 'text/plain' } });
    assert.equal(put.status, 201, put.body.toString());
    const get = await blobRequest(blobUrl, { token, ca });
    assert.equal(get.status, 200);
    assert.equal(get.body.toString(), 'hello azurite');
  });

  test('the stack created container uploads', async () => {
    const token = (await tokenV2()).body.access_token;
    const res = await blobRequest(`${stack.azurite.url}/uploads?restype=container`, { token, ca: stack.azurite.ca });
    assert.equal(res.status, 200);
  });

  test('a Service Bus-audience token is refused with 403 where a storage token is accepted', async () => {
    const list = async (scope) => {
      const token = (await tokenV2({ scope })).body.access_token;
      return blobRequest(`${stack.azurite.url}?comp=list`, { token, ca: stack.azurite.ca });
    };
    assert.equal((await list(STORAGE_SCOPE)).status, 200);
    const refused = await list(`${SERVICEBUS_AUDIENCE}/.default`);
    assert.equal(refused.status, 403);
    assert.equal(refused.headers['x-ms-error-code'], 'AuthenticationFailed');
  });
});

describe('issuer control surface', () => {
  test('setFault: next request 429 with Retry-After, the one after succeeds', async () => {
    stack.issuer.setFault({ status: 429, retryAfter: 60 });
    const throttled = await tokenV2();
    assertEntraError(throttled, 429, 'temporarily_unavailable', 90055);
    assert.equal(throttled.headers.get('retry-after'), '60');
    assert.equal((await tokenV2()).status, 200);
  });

  test('faults over HTTP: count, delay, clear', async () => {
    const control = `${stack.issuer.url}/__control/faults`;
    const set = await fetch(control, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ status: 503, count: 2 }) });
    assert.equal(set.status, 200);
    assert.equal((await tokenV2()).status, 503);
    assert.equal((await tokenV2()).status, 503);
    assert.equal((await tokenV2()).status, 200);

    await fetch(control, { method: 'POST', body: JSON.stringify({ delayMs: 300 }) });
    const t0 = Date.now();
    assert.equal((await tokenV2()).status, 200);
    assert.ok(Date.now() - t0 >= 290, 'delayed answer');

    await fetch(control, { method: 'POST', body: JSON.stringify({ status: 500, count: 5 }) });
    assert.equal((await fetch(control, { method: 'DELETE' })).status, 200);
    assert.equal((await tokenV2()).status, 200);
    assert.equal((await fetch(control, { method: 'POST', body: '{"status": 99}' })).status, 400);
  });

  test('stats count requests, issued tokens, errors, per client and audience', async () => {
    stack.issuer.resetStats();
    await tokenV2();
    await tokenV2({ scope: `${SERVICEBUS_AUDIENCE}/.default` });
    await tokenV2({ secret: 'nope' });
    await fetch(`${stack.issuer.url}/${TENANT}/discovery/v2.0/keys`);
    const stats = stack.issuer.stats();
    assert.deepEqual(stats, {
      tokenRequests: 3,
      tokensIssued: 2,
      jwksRequests: 1,
      errors: 1,
      faultsInjected: 0,
      byClient: { [CLIENT_ID]: 2 },
      byAudience: { [STORAGE_AUDIENCE]: 1, [SERVICEBUS_AUDIENCE]: 1 },
    });
    assert.deepEqual(await (await fetch(`${stack.issuer.url}/__control/stats`)).json(), stats);
  });

  test('the token request log names the client and a fingerprint of the secret presented, never the secret', async () => {
    stack.issuer.resetStats();
    await tokenV2();
    await tokenV2({ secret: 'nope' });
    await tokenV2({ basic: true });
    const log = stack.issuer.tokenRequestLog();
    assert.deepEqual(log, [
      { n: 1, client: CLIENT_ID, credential: `secret:${secretFingerprint(stack.clientSecret)}`, status: 200 },
      { n: 2, client: CLIENT_ID, credential: `secret:${secretFingerprint('nope')}`, status: 401, aadsts: 7000215 },
      { n: 3, client: CLIENT_ID, credential: `secret:${secretFingerprint(stack.clientSecret)}`, status: 200 },
    ]);
    const served = await (await fetch(`${stack.issuer.url}/__control/token-requests`)).text();
    assert.deepEqual(JSON.parse(served), log);
    assert.ok(!served.includes(stack.clientSecret) && !served.includes('nope'), 'a secret in the log');
  });
});

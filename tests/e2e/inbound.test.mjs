/**
 * Inbound protection end to end, under workerd: every rejection with its status and headers,
 * and proof that a rejected request reached neither the identity provider's token endpoint
 * nor Service Bus (both count what they receive). JWTs come from the local issuer (valid ones)
 * or are forged here (wrong key, alg none, HS256 with the RSA public key, expired, wrong aud).
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac, createPublicKey, generateKeyPairSync, randomBytes, sign } from 'node:crypto';
import { join } from 'node:path';
import { requestToken, startStack } from './stack.mjs';
import { REPO_ROOT } from '../../dev/proc.mjs';

const KEY = randomBytes(18).toString('base64url');
const CALLER_SECRET = randomBytes(18).toString('base64url');
const RATE_TOML = `
[[ratelimits]]
name = "E2E_RATE"
namespace_id = "9001"
simple = { limit = 3, period = 10 }
`;
const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

describe('inbound protection', () => {
  let stack;
  let gw;
  const call = async (path, { method = 'POST', body = '{}', headers = {} } = {}) => {
    const res = await fetch(`${gw.url}${path}`, { method, body: method === 'POST' ? body : undefined, headers: { 'content-type': 'application/json', ...headers } });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, headers: res.headers, text, json };
  };
  /** Calls made downstream so far: token requests to the issuer, sends to Service Bus. */
  const downstream = async () => ({ tokens: stack.issuer.stats().tokenRequests, sends: (await stack.serviceBus.stats()).requests });
  const callerToken = async (client, scope = 'api://orders/.default') => {
    const res = await requestToken(stack.issuer.tokenUrlV2, { clientId: client, secret: CALLER_SECRET, scope });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    return res.body.access_token;
  };

  before(async () => {
    stack = await startStack({
      policyPath: join(REPO_ROOT, 'tests', 'e2e', 'fixtures', 'inbound-policy.json'),
      ports: { issuer: 18400, azurite: 20000, serviceBus: 18410, gateway: 18793 },
      stateDir: join(REPO_ROOT, 'target', 'e2e', 'inbound'),
      clients: { 'caller-app': CALLER_SECRET, 'no-role-app': CALLER_SECRET, 'expired-app': CALLER_SECRET },
      gatewaySecrets: { E2E_KEY: KEY },
      gatewayOptions: { extraToml: RATE_TOML },
    });
    gw = stack.gateway;
    stack.issuer.service.on('beforeTokenSigning', (token, req) => {
      const client = req.body?.client_id;
      if (client === 'caller-app') token.payload.roles = ['Orders.Write'];
      if (client === 'expired-app') {
        token.payload.roles = ['Orders.Write'];
        token.payload.nbf = token.payload.iat - 7200;
        token.payload.exp = token.payload.iat - 3600;
      }
    });
  });
  after(() => stack?.stop());

  test('cheap checks answer 403, 413, 415 and 400, and reach nothing', async () => {
    const before = await downstream();
    const ip = await call('/ip');
    assert.equal(ip.status, 403, ip.text);
    assert.equal(ip.json.type, 'urn:azure-edge-gateway:problem:ip-forbidden');
    const denied = await call('/ip-deny', { headers: { 'x-api-key': KEY } });
    assert.equal(denied.status, 403, denied.text);
    const base = { 'x-api-key': KEY, 'x-tenant': 'contoso' };
    const big = await call('/limits', { body: JSON.stringify({ pad: 'x'.repeat(2000) }), headers: base });
    assert.equal(big.status, 413, big.text);
    const type = await call('/limits', { body: 'a=1', headers: { ...base, 'content-type': 'application/x-www-form-urlencoded' } });
    assert.equal(type.status, 415, type.text);
    assert.equal(type.headers.get('accept'), 'application/json');
    const header = await call('/limits', { headers: { 'x-api-key': KEY, 'x-tenant': 'fabrikam' } });
    assert.equal(header.status, 400, header.text);
    assert.equal(header.json.type, 'urn:azure-edge-gateway:problem:header-required');
    // The IP check comes before the key: a wrong key from a denied address is still 403.
    assert.equal((await call('/ip-deny', { headers: { 'x-api-key': 'wrong' } })).status, 403);
    assert.deepEqual(await downstream(), before);
    // The same request, correct in every way, goes through.
    const ok = await call('/limits', { headers: base });
    assert.equal(ok.status, 202, ok.text);
  });

  test('API keys: 401 with a challenge when missing or wrong', async () => {
    const before = await downstream();
    for (const headers of [{}, { 'x-api-key': KEY.slice(1) }]) {
      const res = await call('/limits', { headers: { 'x-tenant': 'contoso', ...headers } });
      assert.equal(res.status, 401, res.text);
      assert.equal(res.headers.get('www-authenticate'), 'ApiKey header="x-api-key"');
    }
    assert.deepEqual(await downstream(), before);
  });

  test('JWT: a valid token passes and its claims reach the message', async () => {
    const token = await callerToken('caller-app');
    const res = await call('/jwt', { headers: { authorization: `Bearer ${token}` } });
    assert.equal(res.status, 202, res.text);
    const [m] = (await stack.serviceBus.messages('orders')).filter((x) => x.brokerProperties.MessageId === res.json.messageId);
    assert.equal(m.userProperties.caller, 'caller-app');
  });

  test('JWT: forged, expired, misaddressed and under-privileged tokens are refused and reach nothing', async () => {
    const good = await callerToken('caller-app');
    const [h, p] = good.split('.');
    const header = JSON.parse(Buffer.from(h, 'base64url'));
    const jwks = await (await fetch(`${stack.issuer.url}/${stack.tenant}/discovery/v2.0/keys`)).json();
    const publicPem = createPublicKey({ key: jwks.keys.find((k) => k.kid === header.kid), format: 'jwk' }).export({ type: 'spki', format: 'pem' });
    const { privateKey: otherKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
    const wrongKey = `${h}.${p}.${sign('sha256', Buffer.from(`${h}.${p}`), otherKey).toString('base64url')}`;
    const none = `${b64url({ alg: 'none', typ: 'JWT', kid: header.kid })}.${p}.`;
    const hsHeader = b64url({ alg: 'HS256', typ: 'JWT', kid: header.kid });
    const hs256 = `${hsHeader}.${p}.${createHmac('sha256', publicPem).update(`${hsHeader}.${p}`).digest('base64url')}`;
    const tampered = `${h}.${b64url({ ...JSON.parse(Buffer.from(p, 'base64url')), roles: ['Admin'] })}.${good.split('.')[2]}`;
    const expired = await callerToken('expired-app');
    const wrongAud = await callerToken('caller-app', 'https://storage.azure.com/.default');
    const noRole = await callerToken('no-role-app');

    const before = await downstream();
    const cases = [
      ['no token', null, 401, 'jwt-missing'],
      ['wrong key', wrongKey, 401, 'jwt-invalid'],
      ['alg none', none, 401, 'jwt-invalid'],
      ['HS256 with the RSA public key', hs256, 401, 'jwt-invalid'],
      ['tampered payload', tampered, 401, 'jwt-invalid'],
      ['expired', expired, 401, 'jwt-invalid'],
      ['wrong audience', wrongAud, 401, 'jwt-invalid'],
      ['missing role', noRole, 403, 'jwt-insufficient'],
    ];
    for (const [what, token, status, kind] of cases) {
      const res = await call('/jwt', { headers: token ? { authorization: `Bearer ${token}` } : {} });
      assert.equal(res.status, status, `${what}: ${res.text}`);
      assert.equal(res.json.type, `urn:azure-edge-gateway:problem:${kind}`, what);
      assert.match(res.headers.get('www-authenticate') ?? '', /^Bearer/, what);
      if (token) assert.ok(!res.text.includes(token.split('.')[2] || token), `${what}: token echoed`);
    }
    assert.deepEqual(await downstream(), before, 'no token request and no send for a refused caller');
  });

  test('rate limit: 429 with Retry-After past the limit, and recovery after the period', async () => {
    // The local limiter counts in windows aligned to the wall clock (10 s here): start well inside
    // one, so that the burst below cannot straddle two windows and pass twice the limit.
    const into = Date.now() % 10_000;
    if (into > 7_000) await new Promise((r) => setTimeout(r, 10_000 - into + 200));
    const statuses = [];
    for (let i = 0; i < 6; i++) {
      const res = await call('/rated', { headers: { 'x-api-key': KEY } });
      statuses.push(res.status);
      if (res.status === 429) {
        assert.equal(res.headers.get('retry-after'), '10');
        assert.equal(res.json.type, 'urn:azure-edge-gateway:problem:rate-limited');
      }
    }
    assert.deepEqual(statuses.filter((s) => s === 202).length, 3, statuses.join(','));
    assert.ok(statuses.slice(3).every((s) => s === 429), statuses.join(','));
    const sendsBefore = (await stack.serviceBus.stats()).requests;
    assert.equal((await call('/rated', { headers: { 'x-api-key': KEY } })).status, 429);
    assert.equal((await stack.serviceBus.stats()).requests, sendsBefore, 'a limited request sends nothing');
    await new Promise((r) => setTimeout(r, 11_000));
    assert.equal((await call('/rated', { headers: { 'x-api-key': KEY } })).status, 202, 'allowed again after the period');
  });

  test('CORS: preflights are answered by the gateway, and answers carry the origin', async () => {
    const before = await downstream();
    const preflight = await fetch(`${gw.url}/cors`, {
      method: 'OPTIONS',
      headers: { origin: 'https://app.example.com', 'access-control-request-method': 'POST', 'access-control-request-headers': 'x-api-key, content-type' },
    });
    assert.equal(preflight.status, 204);
    assert.equal(preflight.headers.get('access-control-allow-origin'), 'https://app.example.com');
    assert.equal(preflight.headers.get('access-control-allow-methods'), 'POST');
    assert.equal(preflight.headers.get('access-control-allow-headers'), 'x-api-key, content-type');
    const evil = await fetch(`${gw.url}/cors`, { method: 'OPTIONS', headers: { origin: 'https://evil.example', 'access-control-request-method': 'POST' } });
    assert.equal(evil.status, 403);
    assert.equal(evil.headers.get('access-control-allow-origin'), null);
    // A method the route does not have is a CORS refusal too (403, as docs/inbound.md says), not 405.
    const wrongMethod = await fetch(`${gw.url}/cors`, { method: 'OPTIONS', headers: { origin: 'https://app.example.com', 'access-control-request-method': 'DELETE' } });
    assert.equal(wrongMethod.status, 403);
    assert.equal((await wrongMethod.json()).type, 'urn:azure-edge-gateway:problem:cors-rejected');
    assert.deepEqual(await downstream(), before, 'preflights reach nothing');
    const actual = await call('/cors', { headers: { 'x-api-key': KEY, origin: 'https://app.example.com' } });
    assert.equal(actual.status, 202, actual.text);
    assert.equal(actual.headers.get('access-control-allow-origin'), 'https://app.example.com');
    assert.match(actual.headers.get('access-control-expose-headers'), /x-request-id/);
    const refused = await call('/cors', { headers: { origin: 'https://app.example.com' } });
    assert.equal(refused.status, 401);
    assert.equal(refused.headers.get('access-control-allow-origin'), 'https://app.example.com', 'a browser can read the 401');
  });
});

/**
 * An Entra-ID-like token issuer for local runs and tests, built on oauth2-mock-server.
 *
 * Why: the gateway gets OAuth2 client-credentials tokens from Entra ID; Azurite and our own
 * Service Bus stand-in accept only tokens that look like Entra's (issuer
 * https://sts.windows.net/{tenant}/, aud = the resource). oauth2-mock-server gives us real RS256
 * keys, signing, JWKS and its event hooks, but checks no client credential and has no Entra paths,
 * so a small node:http front on the same port adds what Entra does:
 *   - POST /{tenant}/oauth2/v2.0/token (scope=<aud>/.default) and /{tenant}/oauth2/token (resource=<aud>,
 *     string expires_in/expires_on like v1), client_secret_post, client_secret_basic or an RS256
 *     client assertion (certificate credential);
 *   - Entra error bodies (error, error_description "AADSTSnnn: …", error_codes, timestamp,
 *     trace_id, correlation_id) with Entra's status codes; secrets never appear in answers or logs;
 *   - JWKS at /{tenant}/discovery/v2.0/keys as well as the library's /jwks;
 *   - a control surface for tests: stats and injected faults (status + Retry-After, delay),
 *     in-process (stats(), setFault()) and over HTTP (/__control/stats, /__control/faults);
 *     the last TOKEN_REQUEST_LOG token requests, each with its client, which credential it
 *     presented (a fingerprint of a secret, never the secret) and the answer
 *     (tokenRequestLog(), /__control/token-requests), so a test can tell which secret was tried;
 *     a fault may fail a share of token requests (`probability`, drawn from a seeded generator,
 *     so the same seed fails the same requests by position), and a full outage of the token
 *     endpoint lasts N seconds (setOutage(), /__control/outage), answering 503 or resetting the
 *     connection. JWKS and discovery stay up: they are served from elsewhere in Entra.
 * Everything else (/jwks, /.well-known/openid-configuration, …) is the library's own handler.
 */
import { constants, createHash, createPublicKey, randomUUID, timingSafeEqual, verify, X509Certificate } from 'node:crypto';
import { createServer } from 'node:http';
import { Events, OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';
import { seededRandom } from './faults.mjs';

const DEFAULT_LIFETIME = 3599;
const MAX_BODY = 64 * 1024;
const MAX_FAULT_DELAY_MS = 120_000;
const MAX_OUTAGE_SECONDS = 3600;
const ASSERTION_TYPE = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
const CLOCK_SKEW_S = 300;
/** How many token requests tokenRequestLog() keeps (the latest). */
const TOKEN_REQUEST_LOG = 100;

/** Entra's answer to each failure we reproduce: HTTP status, `error`, AADSTS code, message. */
const ENTRA_ERRORS = {
  badTenant: [400, 'invalid_request', 90002, (c) => `Tenant '${c.tenant}' not found. Check to make sure you have the correct tenant ID and are signing in to the correct cloud.`],
  badGrant: [400, 'unsupported_grant_type', 70003, (c) => `The app requested an unsupported grant type '${c.grantType}'.`],
  noClientId: [400, 'invalid_request', 900144, () => "The request body must contain the following parameter: 'client_id'."],
  unknownClient: [400, 'unauthorized_client', 700016, (c) => `Application with identifier '${c.clientId}' was not found in the directory '${c.tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant.`],
  noCredential: [401, 'invalid_client', 7000218, () => "The request body must contain the following parameter: 'client_assertion' or 'client_secret'."],
  badSecret: [401, 'invalid_client', 7000215, (c) => `Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '${c.clientId}'.`],
  badAssertion: [401, 'invalid_client', 700027, (c) => `Client assertion failed signature validation. [Reason - ${c.reason}]`],
  assertionTime: [401, 'invalid_client', 700024, () => 'Client assertion is not within its valid time range.'],
  missingScope: [400, 'invalid_request', 90014, (c) => `The required field '${c.field}' is missing from the credential. Ensure that you have all the necessary parameters for the login request.`],
  scopeNotDefault: [400, 'invalid_scope', 1002012, (c) => `The provided value for scope ${c.scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).`],
  badScope: [400, 'invalid_scope', 70011, (c) => `The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope ${c.scope} is not valid.`],
  // Injected faults. Entra documents "429 with Retry-After" for throttled client-credentials
  // calls but not the body; we use its usual error shape with the throttling code.
  throttled: [429, 'temporarily_unavailable', 90055, (c) => `The request was throttled: too many incoming requests. Retry after ${c.retryAfter ?? 60} seconds.`],
  unavailable: [503, 'temporarily_unavailable', 90033, () => 'A transient error has occurred. Please try again.'],
  serverError: [500, 'server_error', 90033, () => 'A transient error has occurred. Please try again.'],
};

/**
 * Start the issuer. clients: { [clientId]: secret | { secret } | { certificatePem } | { publicKeyPem } }.
 * Options: lifetimeSeconds (default 3599), log (function of one line, default silent).
 */
export async function startIssuer({ port = 8400, host = '127.0.0.1', tenant, clients = {}, lifetimeSeconds = DEFAULT_LIFETIME, log = () => {} }) {
  if (!tenant) throw new Error('startIssuer: tenant is required');
  const url = `http://${host}:${port}`;
  const issuerClaim = `https://sts.windows.net/${tenant}/`;
  const credentials = new Map(Object.entries(clients).map(([id, cred]) => [id, normalizeCredential(cred)]));

  const issuer = new OAuth2Issuer();
  issuer.url = issuerClaim;
  await issuer.keys.generate('RS256');
  const service = new OAuth2Service(issuer);
  advertiseLocalEndpoints(service, url, tenant);

  const state = { stats: emptyStats(), requestLog: [], fault: null, outage: null, timers: new Set() };
  const ctx = { url, tenant, issuerClaim, credentials, lifetimeSeconds, service, state, log };
  const server = createServer((req, res) => {
    route(ctx, req, res).catch((err) => {
      log(`issuer: internal error ${err.message}`);
      if (!res.headersSent) sendJson(res, 500, { error: 'server_error', error_description: 'internal error' });
    });
  });
  await listen(server, port, host);

  return {
    url,
    tenant,
    issuerClaim,
    tokenUrlV2: `${url}/${tenant}/oauth2/v2.0/token`,
    tokenUrlV1: `${url}/${tenant}/oauth2/token`,
    jwksUrl: `${url}/${tenant}/discovery/v2.0/keys`,
    /** the oauth2-mock-server service, for per-test hooks (service.once(Events.BeforeTokenSigning, …)) */
    service,
    stats: () => structuredClone(state.stats),
    /**
     * The latest token requests, oldest first: { n, client, credential, status, aadsts? }.
     * n: the request's number (stats().tokenRequests when it came, so `n > before` picks the
     * ones since); credential: `secret:<secretFingerprint(secret)>`, 'assertion' or 'none';
     * status 0 when the connection was reset (an outage). Cleared with the stats.
     */
    tokenRequestLog: () => structuredClone(state.requestLog),
    resetStats: () => { state.stats = emptyStats(); state.requestLog = []; },
    setFault: (fault) => { state.fault = normalizeFault(fault); },
    clearFaults: () => { state.fault = null; },
    /** { seconds, status = 503, retryAfter?, mode = 'status' | 'reset' }: the token endpoint is down that long. */
    setOutage: (outage) => { state.outage = normalizeOutage(outage); return describeOutage(state.outage); },
    clearOutage: () => { state.outage = null; },
    outage: () => describeOutage(activeOutage(state, false)),
    setClient: (id, cred) => credentials.set(id, normalizeCredential(cred)),
    stop: () => stopServer(server, state),
  };
}

/**
 * Client side, for the stack and tests: one client-credentials request.
 * Give scope (v2 URL) or resource (v1 URL); basic: true sends the secret as HTTP Basic.
 * Resolves { status, headers, body } with body parsed as JSON.
 */
export async function requestToken(tokenUrl, { clientId, secret, scope, resource, basic = false, extra = {}, timeoutMs = 10_000 }) {
  const form = new URLSearchParams({ grant_type: 'client_credentials', ...extra });
  if (scope !== undefined) form.set('scope', scope);
  if (resource !== undefined) form.set('resource', resource);
  const headers = { 'content-type': 'application/x-www-form-urlencoded' };
  if (basic) {
    headers.authorization = `Basic ${Buffer.from(`${encodeURIComponent(clientId)}:${encodeURIComponent(secret)}`).toString('base64')}`;
  } else {
    if (clientId !== undefined) form.set('client_id', clientId);
    if (secret !== undefined) form.set('client_secret', secret);
  }
  const res = await fetch(tokenUrl, { method: 'POST', headers, body: form, signal: AbortSignal.timeout(timeoutMs) });
  return { status: res.status, headers: res.headers, body: await res.json() };
}

// ---------------------------------------------------------------------------------------------
// Routing

const TOKEN_PATH = /^\/([^/]+)\/oauth2\/(v2\.0\/)?token\/?$/;
const KEYS_PATH = /^\/([^/]+)\/discovery\/(v2\.0\/)?keys\/?$/;
const OPENID_PATH = /^\/([^/]+)\/(v2\.0\/)?\.well-known\/openid-configuration\/?$/;

async function route(ctx, req, res) {
  const { pathname } = new URL(req.url, ctx.url);
  let m;
  if (pathname.startsWith('/__control/')) return control(ctx, req, res, pathname);
  if (req.method === 'POST' && (m = TOKEN_PATH.exec(pathname))) {
    return tokenEndpoint(ctx, req, res, { tenant: m[1], version: m[2] ? 2 : 1 });
  }
  // Entra's tenant-scoped discovery paths are served by the library's own handlers.
  if (req.method === 'GET' && KEYS_PATH.test(pathname)) {
    ctx.state.stats.jwksRequests += 1;
    req.url = '/jwks';
  }
  else if (req.method === 'GET' && OPENID_PATH.test(pathname)) req.url = '/.well-known/openid-configuration';
  ctx.service.requestHandler(req, res);
}

/** The library's discovery document would name sts.windows.net URLs; point them at this server. */
function advertiseLocalEndpoints(service, url, tenant) {
  service.on(Events.BeforeWellKnownOpenIdConfiguration, (doc) => {
    Object.assign(doc.body, {
      token_endpoint: `${url}/${tenant}/oauth2/v2.0/token`,
      jwks_uri: `${url}/${tenant}/discovery/v2.0/keys`,
      token_endpoint_auth_methods_supported: ['client_secret_post', 'client_secret_basic', 'private_key_jwt'],
    });
  });
}

async function control(ctx, req, res, pathname) {
  const { state } = ctx;
  const key = `${req.method} ${pathname.replace(/\/$/, '')}`;
  switch (key) {
    case 'GET /__control/stats': return sendJson(res, 200, state.stats);
    case 'DELETE /__control/stats': state.stats = emptyStats(); state.requestLog = []; return sendJson(res, 200, state.stats);
    case 'GET /__control/token-requests': return sendJson(res, 200, state.requestLog);
    case 'GET /__control/faults': return sendJson(res, 200, { fault: state.fault });
    case 'DELETE /__control/faults': state.fault = null; return sendJson(res, 200, { fault: null });
    case 'POST /__control/faults': {
      try {
        state.fault = normalizeFault(JSON.parse((await readBody(req)) || '{}'));
      } catch (err) {
        return sendJson(res, 400, { error: err.message });
      }
      return sendJson(res, 200, { fault: state.fault });
    }
    case 'GET /__control/outage': return sendJson(res, 200, { outage: describeOutage(activeOutage(state, false)) });
    case 'DELETE /__control/outage': state.outage = null; return sendJson(res, 200, { outage: null });
    case 'POST /__control/outage': {
      try {
        state.outage = normalizeOutage(JSON.parse((await readBody(req)) || '{}'));
      } catch (err) {
        return sendJson(res, 400, { error: err.message });
      }
      return sendJson(res, 200, { outage: describeOutage(state.outage) });
    }
    default: return sendJson(res, 404, { error: `no control route ${key}` });
  }
}

// ---------------------------------------------------------------------------------------------
// Token endpoint

async function tokenEndpoint(ctx, req, res, { tenant, version }) {
  const { state } = ctx;
  state.stats.tokenRequests += 1;
  const n = state.stats.tokenRequests;
  const body = await readBody(req);
  const form = Object.fromEntries(new URLSearchParams(body));
  req.body = form; // what the library's hooks read
  const presented = { n, ...presentedCredential(req, form) };
  const record = (status, err) => {
    state.requestLog.push({ ...presented, status, ...(err ? { aadsts: err.number } : {}) });
    if (state.requestLog.length > TOKEN_REQUEST_LOG) state.requestLog.shift();
  };
  const refuse = (err, options) => {
    record(err.status, err);
    return sendEntraError(ctx, req, res, err, options);
  };

  const outage = activeOutage(state, true);
  if (outage?.mode === 'reset') {
    ctx.log('issuer: outage, connection reset');
    record(0);
    req.socket.destroy();
    return;
  }
  if (outage) return refuse(faultError(outage), { retryAfter: outage.retryAfter });

  const fault = await takeFault(state);
  if (fault?.status) return refuse(faultError(fault), { retryAfter: fault.retryAfter });

  const outcome = checkTokenRequest(ctx, req, form, { tenant, version });
  if (outcome.error) return refuse(outcome.error);

  const { clientId, audience } = outcome;
  const now = Math.floor(Date.now() / 1000);
  const accessToken = await ctx.service.buildToken(req, ctx.lifetimeSeconds, (_header, payload) => {
    Object.assign(payload, entraClaims(ctx, { clientId, audience, version, now, viaCertificate: outcome.viaCertificate }));
  });
  const response = { statusCode: 200, body: tokenBody({ accessToken, audience, version, now, lifetime: ctx.lifetimeSeconds }) };
  ctx.service.emit(Events.BeforeResponse, response, req);

  state.stats.tokensIssued += 1;
  record(response.statusCode);
  bump(state.stats.byClient, clientId);
  bump(state.stats.byAudience, audience);
  ctx.log(`issuer: token v${version} client=${clientId} aud=${audience}`);
  sendJson(res, response.statusCode, response.body, { 'cache-control': 'no-store, no-cache', pragma: 'no-cache' });
}

/** Validate a token request in Entra's order; returns { clientId, audience } or { error }. */
function checkTokenRequest(ctx, req, form, { tenant, version }) {
  if (tenant.toLowerCase() !== ctx.tenant.toLowerCase()) return fail('badTenant', { tenant });
  if (form.grant_type !== 'client_credentials') return fail('badGrant', { grantType: form.grant_type ?? '' });

  const basic = parseBasicAuth(req.headers.authorization);
  const clientId = basic?.id ?? form.client_id;
  if (!clientId) return fail('noClientId');
  const credential = ctx.credentials.get(clientId);
  if (!credential) return fail('unknownClient', { clientId, tenant });

  const authError = authenticate(ctx, credential, { clientId, secret: basic?.secret ?? form.client_secret, form });
  if (authError) return { error: authError };

  const audience = version === 2 ? scopeAudience(form.scope) : form.resource;
  if (audience?.error) return audience;
  if (!audience) return fail('missingScope', { field: version === 2 ? 'scope' : 'resource' });
  return { clientId, audience, viaCertificate: !form.client_secret && !basic };
}

function authenticate(ctx, credential, { clientId, secret, form }) {
  if (form.client_assertion_type === ASSERTION_TYPE && form.client_assertion) {
    return checkAssertion(ctx, credential, clientId, form.client_assertion);
  }
  if (secret === undefined || secret === '') return error('noCredential');
  if (!credential.secret || !sameSecret(secret, credential.secret)) return error('badSecret', { clientId });
  return null;
}

/** v2: exactly one scope "<resource>/.default"; answers the resource (the token's aud). */
function scopeAudience(scope) {
  if (!scope) return null;
  const scopes = scope.trim().split(/\s+/);
  if (scopes.length !== 1) return fail('badScope', { scope });
  if (!scopes[0].endsWith('/.default')) return fail('scopeNotDefault', { scope });
  const resource = scopes[0].slice(0, -'/.default'.length);
  return resource || fail('badScope', { scope });
}

function entraClaims(ctx, { clientId, audience, version, now, viaCertificate }) {
  const objectId = stableUuid(`${ctx.tenant}/${clientId}`);
  return {
    iss: ctx.issuerClaim,
    aud: audience,
    iat: now,
    nbf: now,
    exp: now + ctx.lifetimeSeconds,
    appid: clientId,
    azp: clientId,
    appidacr: viaCertificate ? '2' : '1',
    idp: ctx.issuerClaim,
    idtyp: 'app',
    oid: objectId,
    sub: objectId,
    tid: ctx.tenant,
    uti: randomUUID().replaceAll('-', ''),
    ver: version === 2 ? '2.0' : '1.0',
  };
}

/** v1 answers numbers as strings (and expires_on); v2 answers numbers. */
function tokenBody({ accessToken, audience, version, now, lifetime }) {
  if (version === 2) {
    return { token_type: 'Bearer', expires_in: lifetime, ext_expires_in: lifetime, access_token: accessToken };
  }
  return {
    token_type: 'Bearer',
    expires_in: String(lifetime),
    ext_expires_in: String(lifetime),
    expires_on: String(now + lifetime),
    not_before: String(now),
    resource: audience,
    access_token: accessToken,
  };
}

// ---------------------------------------------------------------------------------------------
// Client credentials

function normalizeCredential(cred) {
  if (typeof cred === 'string') return { secret: cred };
  if (cred?.secret) return { secret: cred.secret };
  const pem = cred?.certificatePem ?? cred?.publicKeyPem;
  if (!pem) throw new Error('client credential must be a secret, { certificatePem } or { publicKeyPem }');
  const thumbprints = cred.certificatePem ? certificateThumbprints(cred.certificatePem) : null;
  return { publicKey: createPublicKey(pem), thumbprints };
}

function certificateThumbprints(pem) {
  const raw = new X509Certificate(pem).raw;
  return {
    x5t: createHash('sha1').update(raw).digest('base64url'),
    'x5t#S256': createHash('sha256').update(raw).digest('base64url'),
  };
}

/**
 * What a token request presented, for the request log: its client id and which credential, a
 * secret only as its fingerprint (the secret itself is never kept). Read like authenticate():
 * an assertion wins over a secret, HTTP Basic over the form.
 */
function presentedCredential(req, form) {
  const basic = parseBasicAuth(req.headers.authorization);
  const secret = basic?.secret ?? form.client_secret;
  let credential = 'none';
  if (form.client_assertion_type === ASSERTION_TYPE && form.client_assertion) credential = 'assertion';
  else if (secret) credential = `secret:${secretFingerprint(secret)}`;
  return { client: basic?.id ?? form.client_id ?? null, credential };
}

/** The first 12 hex digits of a secret's SHA-256: tells secrets apart in the request log without keeping them. */
export function secretFingerprint(secret) {
  return createHash('sha256').update(String(secret)).digest('hex').slice(0, 12);
}

function sameSecret(given, expected) {
  const digest = (s) => createHash('sha256').update(String(s)).digest();
  return timingSafeEqual(digest(given), digest(expected));
}

/** Verify an RS256/PS256 client assertion: signature, x5t, aud = our token URL, iss = sub = client, time. */
function checkAssertion(ctx, credential, clientId, assertion) {
  const bad = (reason) => error('badAssertion', { reason });
  if (!credential.publicKey) return bad('No certificate or key is registered for the client');
  const parts = assertion.split('.');
  if (parts.length !== 3) return bad('The assertion is not a JWT');
  let header;
  let claims;
  try {
    [header, claims] = parts.slice(0, 2).map((p) => JSON.parse(Buffer.from(p, 'base64url').toString('utf8')));
  } catch {
    return bad('The assertion is not a JWT');
  }
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`);
  const signature = Buffer.from(parts[2], 'base64url');
  const options = { RS256: { key: credential.publicKey }, PS256: { key: credential.publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: 32 } }[header.alg];
  if (!options) return bad(`Unsupported algorithm ${header.alg}`);
  if (!verify('sha256', signed, options, signature)) return bad('The signature does not match the registered key');
  for (const name of ['x5t', 'x5t#S256']) {
    if (header[name] && credential.thumbprints && header[name] !== credential.thumbprints[name]) {
      return bad(`Header ${name} does not match the registered certificate`);
    }
  }
  const tokenUrls = [`${ctx.url}/${ctx.tenant}/oauth2/v2.0/token`, `${ctx.url}/${ctx.tenant}/oauth2/token`];
  if (!tokenUrls.includes(claims.aud)) return bad('The audience is not the token endpoint');
  if (claims.iss !== clientId || claims.sub !== clientId) return bad('iss and sub must be the client id');
  const now = Math.floor(Date.now() / 1000);
  if (typeof claims.exp !== 'number' || claims.exp + CLOCK_SKEW_S < now) return error('assertionTime');
  if (typeof claims.nbf === 'number' && claims.nbf - CLOCK_SKEW_S > now) return error('assertionTime');
  return null;
}

function parseBasicAuth(header) {
  const m = /^Basic\s+(\S+)$/i.exec(header ?? '');
  if (!m) return null;
  const decoded = Buffer.from(m[1], 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  if (colon < 0) return null;
  const unform = (s) => {
    try {
      return decodeURIComponent(s.replaceAll('+', ' '));
    } catch {
      return s;
    }
  };
  return { id: unform(decoded.slice(0, colon)), secret: unform(decoded.slice(colon + 1)) };
}

// ---------------------------------------------------------------------------------------------
// Errors, faults and stats

function error(kind, details = {}) {
  const [status, code, number, describe] = ENTRA_ERRORS[kind];
  return { status, code, number, message: describe(details) };
}
const fail = (kind, details) => ({ error: error(kind, details) });

function sendEntraError(ctx, req, res, err, { retryAfter } = {}) {
  ctx.state.stats.errors += 1;
  const traceId = randomUUID();
  const requested = req.headers['client-request-id'];
  const correlationId = /^[0-9a-f-]{36}$/i.test(requested ?? '') ? requested : randomUUID();
  const timestamp = new Date().toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
  const body = {
    error: err.code,
    error_description: `AADSTS${err.number}: ${err.message} Trace ID: ${traceId} Correlation ID: ${correlationId} Timestamp: ${timestamp}`,
    error_codes: [err.number],
    timestamp,
    trace_id: traceId,
    correlation_id: correlationId,
  };
  const headers = { 'cache-control': 'no-store, no-cache', 'x-ms-request-id': traceId };
  if (retryAfter !== undefined) headers['retry-after'] = String(retryAfter);
  ctx.log(`issuer: ${err.status} ${err.code} AADSTS${err.number}`);
  sendJson(res, err.status, body, headers);
}

/**
 * { status?, retryAfter?, delayMs = 0, count = 1 } applies to the next `count` token requests.
 * With `probability` (0..1), each token request is failed with that probability, drawn from a
 * generator seeded with `seed` (default 1); `count` then caps the faults (default: no cap).
 * `remaining` is null when uncapped.
 */
function normalizeFault(f) {
  if (!f || typeof f !== 'object') throw new Error('fault must be an object');
  const { status, retryAfter, delayMs = 0, probability, seed } = f;
  const count = f.count ?? (probability === undefined ? 1 : null);
  if (status !== undefined && !(Number.isInteger(status) && status >= 400 && status <= 599)) throw new Error('fault.status must be 400..599');
  if (count !== null && (!Number.isInteger(count) || count < 1)) throw new Error('fault.count must be a positive integer');
  if (!(delayMs >= 0 && delayMs <= MAX_FAULT_DELAY_MS)) throw new Error(`fault.delayMs must be 0..${MAX_FAULT_DELAY_MS}`);
  if (status === undefined && !delayMs) throw new Error('fault needs a status or a delayMs');
  if (probability !== undefined && !(typeof probability === 'number' && probability >= 0 && probability <= 1)) throw new Error('fault.probability must be 0..1');
  if (seed !== undefined && (probability === undefined || !Number.isInteger(seed))) throw new Error('fault.seed must be an integer, with a probability');
  const fault = { status, retryAfter, delayMs, remaining: count };
  if (probability !== undefined) Object.assign(fault, { probability, seed: seed ?? 1 });
  // Not shown (non-enumerable): the generator of the draws.
  if (probability !== undefined) Object.defineProperty(fault, 'draw', { value: seededRandom(seed ?? 1) });
  return fault;
}

/** { seconds, status = 503, retryAfter?, mode = 'status' | 'reset' } from now. */
function normalizeOutage(o) {
  if (!o || typeof o !== 'object') throw new Error('outage must be an object');
  const { seconds, status = 503, retryAfter, mode = 'status' } = o;
  if (!(typeof seconds === 'number' && seconds > 0 && seconds <= MAX_OUTAGE_SECONDS)) throw new Error(`outage.seconds must be above 0 and at most ${MAX_OUTAGE_SECONDS}`);
  if (!(Number.isInteger(status) && status >= 400 && status <= 599)) throw new Error('outage.status must be 400..599');
  if (mode !== 'status' && mode !== 'reset') throw new Error("outage.mode must be 'status' or 'reset'");
  return { status, retryAfter, mode, until: Date.now() + seconds * 1000 };
}

/** The outage in force now, or null (an ended one is forgotten); `count` counts it as a fault. */
function activeOutage(state, count) {
  const { outage } = state;
  if (!outage) return null;
  if (Date.now() >= outage.until) {
    state.outage = null;
    return null;
  }
  if (count) state.stats.faultsInjected += 1;
  return outage;
}

function describeOutage(outage) {
  if (!outage) return null;
  const { status, retryAfter, mode, until } = outage;
  return { status, retryAfter, mode, remainingSeconds: Math.max(0, (until - Date.now()) / 1000) };
}

/** Consume one use of the active fault (waiting its delay); returns it or null. */
async function takeFault(state) {
  const fault = state.fault;
  if (!fault) return null;
  if (fault.draw && fault.draw() >= fault.probability) return null;
  if (fault.remaining !== null) {
    fault.remaining -= 1;
    if (fault.remaining <= 0) state.fault = null;
  }
  state.stats.faultsInjected += 1;
  if (fault.delayMs) {
    await new Promise((resolveDelay) => {
      const timer = setTimeout(() => {
        state.timers.delete(timer);
        resolveDelay();
      }, fault.delayMs);
      state.timers.add(timer);
    });
  }
  return fault;
}

function faultError(fault) {
  if (fault.status === 429) return error('throttled', fault);
  if (fault.status === 500) return error('serverError');
  if (fault.status >= 500) return { ...error('unavailable'), status: fault.status };
  return { status: fault.status, code: 'invalid_request', number: 90000, message: 'Injected fault.' };
}

function emptyStats() {
  return { tokenRequests: 0, tokensIssued: 0, jwksRequests: 0, errors: 0, faultsInjected: 0, byClient: {}, byAudience: {} };
}
const bump = (counts, key) => { counts[key] = (counts[key] ?? 0) + 1; };

/** A UUID-shaped id that stays the same for the same input (object id of a client). */
function stableUuid(input) {
  const h = createHash('sha256').update(input).digest('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers

function readBody(req) {
  return new Promise((resolveBody, rejectBody) => {
    let size = 0;
    const chunks = [];
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        rejectBody(new Error('request body too large'));
        req.destroy();
      } else chunks.push(chunk);
    });
    req.on('end', () => resolveBody(Buffer.concat(chunks).toString('utf8')));
    req.on('error', rejectBody);
  });
}

function sendJson(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function listen(server, port, host) {
  return new Promise((resolveListen, rejectListen) => {
    server.once('error', (err) => rejectListen(new Error(`issuer cannot listen on ${host}:${port}: ${err.message}`)));
    server.listen(port, host, resolveListen);
  });
}

function stopServer(server, state) {
  for (const timer of state.timers) clearTimeout(timer);
  state.timers.clear();
  return new Promise((resolveStop) => {
    if (!server.listening) return resolveStop();
    server.close(() => resolveStop());
    server.closeAllConnections();
  });
}

/**
 * The Resource Manager stand-in's paged lists (dev/arm.mjs), on their own: only the Entra-like
 * issuer (for tokens and the JWKS the stand-in checks them against) and the stand-in, no Azurite,
 * no Service Bus stand-in, no worker. What is pinned here is what a gateway following nextLink
 * will meet: pages of at most pageSize elements, an absolute nextLink on the origin the request
 * reached with the same path and api-version and an opaque $skiptoken, no nextLink on the last
 * page, and 400 InvalidSkipToken for a token the stand-in did not issue for that list.
 * Own ports (issuer 18740, ARM 18741) so that neither a dev stack nor the other test files interfere.
 * Run: source scripts/env.sh && node --test tests/e2e/arm-paging.test.mjs
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { request as httpRequest } from 'node:http';
import { after, before, beforeEach, describe, test } from 'node:test';
import { manySites, startArm } from '../../dev/arm.mjs';
import { requestToken, startIssuer } from '../../dev/issuer.mjs';

const PORTS = { issuer: 18740, arm: 18741 };
const TENANT = '11111111-2222-3333-4444-555555555555';
const CLIENT_ID = 'dev-gateway';
const SECRET = randomBytes(32).toString('base64url');
const SUB = '11111111-aaaa-4bbb-8ccc-000000000001';
const RG = 'rg-many';
const SUBSCRIPTIONS = {
  [SUB]: {
    resourceGroups: {
      [RG]: { location: 'westeurope', sites: manySites(10, { tags: { env: 'test' } }) },
      'rg-two': { location: 'northeurope', tags: { team: 'edge' }, sites: { 'only-one': { state: 'Stopped' } } },
      'rg-empty': { location: 'northeurope', sites: {} },
    },
  },
};
const SITES = `/subscriptions/${SUB}/resourceGroups/${RG}/providers/Microsoft.Web/sites`;
const GROUPS = `/subscriptions/${SUB}/resourcegroups`;
const T = { timeout: 30_000 };

let issuer;
let arm;
let tok;

before(async () => {
  issuer = await startIssuer({ port: PORTS.issuer, tenant: TENANT, clients: { [CLIENT_ID]: SECRET } });
  try {
    arm = await startArm({ port: PORTS.arm, jwksUrl: issuer.jwksUrl, subscriptions: SUBSCRIPTIONS, pageSize: 2 });
  } catch (err) {
    await issuer.stop();
    throw err;
  }
  const res = await requestToken(issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: SECRET, scope: 'https://management.azure.com/.default' });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  tok = res.body.access_token;
});

after(async () => {
  await arm?.stop();
  await issuer?.stop();
});

/** GET an absolute URL, or a path on the stand-in with api-version; a good token unless auth says otherwise. */
async function get(pathOrUrl, { apiVersion = '2023-01-01', query = '', auth = `Bearer ${tok}`, method = 'GET' } = {}) {
  const qs = [apiVersion === null ? null : `api-version=${apiVersion}`, query || null].filter(Boolean).join('&');
  const url = pathOrUrl.startsWith('http') ? pathOrUrl : `${arm.url}${pathOrUrl}${qs ? `?${qs}` : ''}`;
  const res = await fetch(url, { method, headers: auth ? { authorization: auth } : {}, signal: AbortSignal.timeout(10_000) });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch { /* not JSON */ }
  return { status: res.status, headers: res.headers, text, json };
}

/** Follow nextLink from `first` to the end; every page must be 200 {value, nextLink?} with at most `max` elements. */
async function allPages(first, max) {
  const pages = [];
  let res = await get(first);
  for (;;) {
    assert.equal(res.status, 200, res.text);
    const keys = Object.keys(res.json).sort();
    assert.ok(keys.join() === 'value' || keys.join() === 'nextLink,value', `page keys: ${keys}`);
    assert.ok(Array.isArray(res.json.value));
    assert.ok(res.json.value.length <= max, `at most ${max} per page, got ${res.json.value.length}`);
    pages.push(res.json);
    if (res.json.nextLink === undefined) return pages;
    assert.ok(pages.length < 50, 'the list ends');
    res = await get(res.json.nextLink);
  }
}

function assertArmError(res, status, code) {
  assert.equal(res.status, status, res.text);
  assert.match(res.headers.get('content-type'), /^application\/json; charset=utf-8$/);
  assert.deepEqual(Object.keys(res.json), ['error']);
  assert.deepEqual(Object.keys(res.json.error).sort(), ['code', 'message']);
  assert.equal(res.json.error.code, code, res.text);
  assert.equal(typeof res.json.error.message, 'string');
}

/** GET with a Host header of our choosing (fetch does not let us set it). */
function getWithHost(path, host) {
  return new Promise((resolveGet, rejectGet) => {
    const req = httpRequest({ host: '127.0.0.1', port: PORTS.arm, path, headers: { host, authorization: `Bearer ${tok}` } }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolveGet({ status: res.statusCode, json: JSON.parse(Buffer.concat(chunks).toString('utf8')) }));
    });
    req.on('error', rejectGet);
    req.setTimeout(10_000, () => req.destroy(new Error('timeout')));
    req.end();
  });
}

const skiptokenOf = (nextLink) => new URL(nextLink).searchParams.get('$skiptoken');

describe('Resource Manager stand-in: paged lists', () => {
  beforeEach(() => {
    arm.reset();
    arm.clearRequests();
  });

  test('10 sites at pageSize 2: 5 pages by nextLink, every site once, ARM-shaped; the last page has no nextLink', T, async () => {
    const pages = await allPages(`${arm.url}${SITES}?api-version=2023-01-01`, 2);
    assert.equal(pages.length, 5);
    assert.deepEqual(pages.map((p) => p.value.length), [2, 2, 2, 2, 2]);
    assert.equal(pages.at(-1).nextLink, undefined);
    const sites = pages.flatMap((p) => p.value);
    const names = sites.map((s) => s.name);
    assert.deepEqual(names, Array.from({ length: 10 }, (_, i) => `site-${String(i + 1).padStart(2, '0')}`), 'each once, in seed order');
    for (const [i, site] of sites.entries()) {
      assert.equal(site.id, `${SITES}/${site.name}`);
      assert.equal(site.type, 'Microsoft.Web/sites');
      assert.equal(site.location, 'West Europe');
      assert.equal(site.properties.state, 'Running');
      assert.equal(site.properties.resourceGroup, RG);
      assert.deepEqual(site.tags, { env: 'test', seq: String(i + 1) });
    }
    const single = await get(`${SITES}/site-07`);
    assert.deepEqual(sites[6], single.json, 'a list element is what GET of the site answers');

    for (const [i, page] of pages.slice(0, -1).entries()) {
      const link = new URL(page.nextLink);
      assert.equal(link.origin, arm.url, 'absolute, on the stand-in\'s origin');
      assert.equal(link.pathname, SITES, 'the same path');
      assert.deepEqual([...link.searchParams.keys()], ['api-version', '$skiptoken']);
      assert.equal(link.searchParams.get('api-version'), '2023-01-01');
      assert.ok(page.nextLink.includes('%24skiptoken='), 'encoded as ARM encodes it');
      const token = skiptokenOf(page.nextLink);
      assert.match(token, /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/);
      assert.ok(!/^\d+$/.test(token) && token !== String((i + 1) * 2), 'opaque, not a bare offset');
    }
    const log = arm.requests();
    assert.equal(log.length, 6);
    assert.deepEqual(log.slice(0, 5).map((e) => [e.route, e.status]), Array(5).fill(['site list', 200]));
  });

  test('the api-version of the first call is kept; $top sets the page size and stays in nextLink', T, async () => {
    const old = await allPages(`${arm.url}${SITES}?api-version=2022-09-01`, 2);
    assert.equal(old.length, 5);
    for (const p of old.slice(0, -1)) assert.equal(new URL(p.nextLink).searchParams.get('api-version'), '2022-09-01');

    const byThree = await allPages(`${arm.url}${SITES}?api-version=2023-01-01&$top=3`, 3);
    assert.deepEqual(byThree.map((p) => p.value.length), [3, 3, 3, 1]);
    for (const p of byThree.slice(0, -1)) assert.equal(new URL(p.nextLink).searchParams.get('$top'), '3');
    assert.equal(new Set(byThree.flatMap((p) => p.value.map((s) => s.name))).size, 10);

    const whole = await get(SITES, { query: '$top=10' });
    assert.equal(whole.json.value.length, 10);
    assert.equal(whole.json.nextLink, undefined, 'exactly the rest: no nextLink');
    for (const top of ['0', '-1', 'x', '1001', '2.5', '']) assertArmError(await get(SITES, { query: `$top=${top}` }), 400, 'InvalidParameter');
  });

  test('nextLink is on the origin the request reached (its Host header)', T, async () => {
    const res = await getWithHost(`${SITES}?api-version=2023-01-01`, `localhost:${PORTS.arm}`);
    assert.equal(res.status, 200);
    assert.ok(res.json.nextLink.startsWith(`http://localhost:${PORTS.arm}${SITES}?`), res.json.nextLink);
    const odd = await getWithHost(`${SITES}?api-version=2023-01-01`, 'evil.example/x?');
    assert.ok(odd.json.nextLink.startsWith(`${arm.url}${SITES}?`), `a malformed Host falls back to the stand-in's own URL: ${odd.json.nextLink}`);
  });

  test('a tampered, made-up or foreign $skiptoken: 400 InvalidSkipToken', T, async () => {
    const first = await get(SITES);
    const good = skiptokenOf(first.json.nextLink);
    const [payload, mac] = good.split('.');
    const decoded = JSON.parse(Buffer.from(payload, 'base64url').toString('utf8'));
    assert.deepEqual(Object.keys(decoded).sort(), ['listId', 'offset']);
    const reoffset = Buffer.from(JSON.stringify({ ...decoded, offset: 0 })).toString('base64url');
    const flipped = `${payload.slice(0, -1)}${payload.at(-1) === 'A' ? 'B' : 'A'}.${mac}`;
    const groups = await get(GROUPS, { apiVersion: '2022-09-01' });
    const foreign = skiptokenOf(groups.json.nextLink);
    for (const token of [`${reoffset}.${mac}`, flipped, `${payload}.${mac.slice(0, -1)}${mac.at(-1) === 'x' ? 'y' : 'x'}`, payload, '2', '', 'not a token', foreign]) {
      assertArmError(await get(SITES, { query: `$skiptoken=${encodeURIComponent(token)}` }), 400, 'InvalidSkipToken');
    }
    // A token from another start of the stand-in (its key differs), on the same path.
    const other = await startArm({ port: PORTS.arm + 1, jwksUrl: issuer.jwksUrl, subscriptions: SUBSCRIPTIONS });
    try {
      const elsewhere = skiptokenOf((await get(`${other.url}${SITES}?api-version=2023-01-01`)).json.nextLink);
      assertArmError(await get(SITES, { query: `$skiptoken=${elsewhere}` }), 400, 'InvalidSkipToken');
    } finally {
      await other.stop();
    }
    assert.equal((await get(SITES, { query: `$skiptoken=${good}` })).status, 200, 'the real one still works');
    assert.equal((await get(SITES.toUpperCase().replace(SUB.toUpperCase(), SUB), { query: `$skiptoken=${good}` })).status, 200, 'names are case-insensitive, so is the list a token belongs to');
  });

  test('resource groups list: pages too; tags as seeded; an empty list is one page with no nextLink', T, async () => {
    const pages = await allPages(`${arm.url}${GROUPS}?api-version=2021-04-01`, 2);
    assert.deepEqual(pages.map((p) => p.value.length), [2, 1]);
    const groups = pages.flatMap((p) => p.value);
    assert.deepEqual(groups.map((g) => g.name), [RG, 'rg-two', 'rg-empty']);
    assert.deepEqual(groups[1], {
      id: `/subscriptions/${SUB}/resourceGroups/rg-two`, name: 'rg-two', type: 'Microsoft.Resources/resourceGroups',
      location: 'northeurope', tags: { team: 'edge' }, properties: { provisioningState: 'Succeeded' },
    });
    const empty = await get(`/subscriptions/${SUB}/resourceGroups/rg-empty/providers/Microsoft.Web/sites`);
    assert.equal(empty.status, 200, empty.text);
    assert.deepEqual(empty.json, { value: [] });
  });

  test('lists stay strict: token, api-version, 404s and methods as on single resources', T, async () => {
    const first = await get(SITES);
    const next = first.json.nextLink;
    assert.equal((await get(next, { auth: null })).status, 401, 'a nextLink needs a token too');
    assertArmError(await get(SITES, { apiVersion: null }), 400, 'MissingApiVersionParameter');
    assertArmError(await get(SITES, { apiVersion: '2021-04-01' }), 400, 'NoRegisteredProviderFound');
    assertArmError(await get(GROUPS, { apiVersion: '2023-01-01' }), 400, 'InvalidApiVersionParameter');
    assertArmError(await get(`/subscriptions/${SUB}/resourceGroups/rg-gone/providers/Microsoft.Web/sites`), 404, 'ResourceGroupNotFound');
    assertArmError(await get('/subscriptions/33333333-aaaa-4bbb-8ccc-000000000003/resourcegroups', { apiVersion: '2022-09-01' }), 404, 'SubscriptionNotFound');
    assertArmError(await get(SITES, { method: 'POST' }), 405, 'MethodNotAllowed');
  });

  test('options: pageSize is checked; manySites names and tags', () => {
    assert.deepEqual(Object.keys(manySites(3)), ['site-01', 'site-02', 'site-03']);
    assert.equal(Object.keys(manySites(100, { prefix: 'app' }))[0], 'app-001');
    assert.deepEqual(manySites(1, { state: 'Stopped' })['site-01'], { state: 'Stopped', tags: { seq: '1' } });
    return Promise.all([0, 1.5, 1001].map((pageSize) => assert.rejects(startArm({ port: PORTS.arm + 2, jwksUrl: issuer.jwksUrl, pageSize }), /pageSize must be 1\.\.1000/)));
  });
});

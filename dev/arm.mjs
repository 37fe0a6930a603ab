/**
 * A Resource Manager (ARM) stand-in for the local stack: a plain node:http server on 127.0.0.1
 * that checks what management.azure.com checks, answers the way it answers, and keeps what it
 * accepted, so the gateway's azure_rest backend can be tested against it. It shares no code with
 * the gateway (nor with the other stand-ins): a bug copied into both would prove nothing.
 *
 * Authentication, on every route but /__control/* (in this order):
 *   - `Authorization` present (else 401 AuthenticationFailed "… header is missing") and exactly
 *     `Bearer <jwt>` (else 401 AuthenticationFailed "… invalid format");
 *   - an RS256 JWT whose `kid` is in the issuer's JWKS (fetched from jwksUrl, cached, refetched on
 *     an unknown kid at most every 10 s) and whose signature verifies (node:crypto) — else 401
 *     InvalidAuthenticationToken;
 *   - `aud` exactly https://management.azure.com[/] or https://management.core.windows.net[/] —
 *     else 401 InvalidAuthenticationTokenAudience (ARM's own code for this case, with its message
 *     listing the allowed audiences);
 *   - `iss` starting with issuerPrefix (default https://sts.windows.net/), and, when the
 *     subscription is seeded with a tenantId, exactly https://sts.windows.net/{tenantId}/ (else
 *     401 InvalidAuthenticationTokenTenant);
 *   - `oid` (or `puid`/`altsecid`) present, as ARM requires of an application's token;
 *   - time without skew: valid while nbf <= now < exp; expired → 401 ExpiredAuthenticationToken
 *     "The access token expiry UTC time '…' is earlier than current UTC time '…'."
 *   Every 401 carries `WWW-Authenticate: Bearer authorization_uri="…", error="invalid_token",
 *   error_description="…"` and the JSON body {"error": {"code", "message"}}.
 * Then `api-version` is required on every call (400 MissingApiVersionParameter); a malformed one
 * is 400 InvalidApiVersionParameter; a well-formed one the resource type does not support is 400
 * InvalidApiVersionParameter for ARM's own types (subscriptions, resource groups) and 400
 * NoRegisteredProviderFound for Microsoft.Web types, as ARM answers for provider types.
 *
 * Resource model (in memory, seeded by `subscriptions`, case-insensitive names like ARM):
 *   GET  /subscriptions/{sub}                                                 (2020-01-01, 2022-12-01)
 *   GET  /subscriptions/{sub}/resourceGroups/{rg}                             (2021-04-01, 2022-09-01)
 *   GET  /subscriptions/{sub}/resourcegroups                     (list; resource groups' api-versions)
 *   GET  …/resourceGroups/{rg}/providers/Microsoft.Web/sites     (list; the sites' api-versions)
 *   GET  …/resourceGroups/{rg}/providers/Microsoft.Web/sites/{name}          (2022-09-01, 2023-01-01)
 *   POST …/sites/{name}/restart   202 Accepted, Azure-AsyncOperation + Location + Retry-After: 1;
 *                                 the site is "Stopped" until the operation succeeds, then "Running"
 *   POST …/sites/{name}/stop      200, state "Stopped";   POST …/sites/{name}/start   200, "Running"
 *   PUT  …/sites/{name}/config/appsettings   body {"properties": {name: string}} (else 400
 *                                 InvalidRequestContent; non-JSON media type 415); 200 with the settings
 *   POST …/sites/{name}/config/appsettings/list   200 with the stored settings
 *   GET  /subscriptions/{sub}/providers/Microsoft.Web/locations/{loc}/operationResults/{id}
 *        (the Azure-AsyncOperation URL): 200 {"status":"InProgress"} for the first `pollsBeforeDone`
 *        polls (default 2), then 200 {"status":"Succeeded"};
 *   GET  …/locations/{loc}/operations/{id} (the Location URL): 202 (Location, Retry-After) while in
 *        progress, then 204. Both URLs count polls on the same operation.
 * Lists are paged as ARM pages them: {"value": [at most pageSize elements, each as its GET answers
 *   it]} and, while more remain, "nextLink": an absolute URL on the origin the request reached
 *   (http:// + its Host header) with the same path, the same api-version, `$top` when given, and
 *   `%24skiptoken=<token>` (ARM's own encoding of `$skiptoken`). The token is opaque: base64url of
 *   {"offset", "listId"} (listId: a hash of the lower-cased collection path) and an HMAC under a
 *   key drawn per start, so a token altered, made up, from another list or from another start of
 *   the stand-in is 400 InvalidSkipToken. The last page has no nextLink. `$top` (1..1000, else 400
 *   InvalidParameter, a stand-in choice) sets the page size of this request and is carried in its
 *   nextLink. Elements come in seed order; offsets are not a snapshot (a list changed between
 *   pages shifts, as ARM does not promise otherwise either).
 * Errors: 404 SubscriptionNotFound, ResourceGroupNotFound, ResourceNotFound ("The Resource
 * 'Microsoft.Web/sites/x' under resource group 'rg' was not found. …"), InvalidResourceType (an
 * unknown type), NoRegisteredProviderFound (a namespace other than Microsoft.Web); 405 for a
 * method a known resource does not take (a stand-in choice). Every answer has x-ms-request-id and
 * x-ms-correlation-request-id (the caller's, when it sent a UUID one) and, on subscription
 * routes, x-ms-ratelimit-remaining-subscription-reads|writes.
 *
 * Control surface (no token), over HTTP and in process:
 *   GET /__control/stats (requests, byRoute, byStatus, faultsInjected, jwksFetches), DELETE resets;
 *   GET /__control/requests (the last 100: method, path, query, headers without Authorization,
 *   authorization {present, scheme, audience}, body, route, status), DELETE clears;
 *   GET|POST|DELETE /__control/faults: {status, code?, message?, retryAfter?, count = 1, delayMs?,
 *   match? (a substring of the path), after?, reset?} — the next `count` matching calls answer
 *   `status` with an ARM error body (before any other check). With `after: true` the call is
 *   carried out first (a restart restarts) and only then answered with the fault, after
 *   `delayMs`: Azure did it, the answer is lost or late. With `reset: true` the connection is
 *   dropped instead of answered (after the call when `after`);
 *   GET /__control/resources (the model as it is now), DELETE restores the seed.
 *
 * Seeding a long list: `manySites(n, fields?)` gives n sites (`site-01`…, each tagged {seq}) to put
 * in a resource group's `sites` in `subscriptions`; reset() restores them like the rest of the seed.
 *
 * startArm({ port, jwksUrl, issuerPrefix, subscriptions, pollsBeforeDone, pageSize }) resolves
 * { url, port, stats(), resetStats(), requests(), clearRequests(), setFault(), clearFaults(),
 *   resources(), reset(), stop() }.
 */
import { createHash, createHmac, createPublicKey, randomBytes, randomUUID, verify } from 'node:crypto';
import { createServer } from 'node:http';

export const ARM_AUDIENCES = [
  'https://management.core.windows.net/',
  'https://management.core.windows.net',
  'https://management.azure.com/',
  'https://management.azure.com',
];
export const DEFAULT_SUBSCRIPTION = '00000000-aaaa-bbbb-cccc-000000000001';
export const DEFAULT_RESOURCE_GROUP = 'rg-edge';
export const DEFAULT_SITE = 'contoso-api';
/** The model of the dev stack unless `subscriptions` says otherwise. */
export const DEFAULT_SUBSCRIPTIONS = {
  [DEFAULT_SUBSCRIPTION]: {
    displayName: 'Local stand-in subscription',
    resourceGroups: {
      [DEFAULT_RESOURCE_GROUP]: {
        location: 'westeurope',
        sites: { [DEFAULT_SITE]: {}, 'contoso-worker': { state: 'Stopped' } },
      },
    },
  },
};
/**
 * n sites for a resource group's `sites` seed, named `${prefix}-01`… (zero-padded so they sort as
 * they are numbered), each with `fields` and the tag {seq: "1"…} added to fields.tags.
 */
export function manySites(n, { prefix = 'site', ...fields } = {}) {
  if (!Number.isInteger(n) || n < 0) throw new Error('manySites: n must be a whole number');
  const width = Math.max(2, String(n).length);
  return Object.fromEntries(Array.from({ length: n }, (_, i) => [
    `${prefix}-${String(i + 1).padStart(width, '0')}`,
    { ...fields, tags: { ...(fields.tags ?? {}), seq: String(i + 1) } },
  ]));
}
/** api-versions the stand-in supports, by resource type. */
export const API_VERSIONS = {
  subscriptions: ['2022-12-01', '2020-01-01'],
  resourceGroups: ['2022-09-01', '2021-04-01'],
  'Microsoft.Web/sites': ['2023-01-01', '2022-09-01'],
};
const JWKS_REFETCH_MS = 10_000;
const MAX_BODY = 4 * 1024 * 1024;
const MAX_LOGGED_REQUESTS = 100;
const MAX_FAULT_DELAY_MS = 120_000;
const API_VERSION_SHAPE = /^\d{4}-\d{2}-\d{2}(-(preview|beta|alpha|privatepreview))?$/;
const READ_LIMIT = 12_000;
/** Elements per page of a list unless startArm's pageSize or the request's $top says otherwise. */
export const DEFAULT_PAGE_SIZE = 2;
const MAX_TOP = 1000;
const WRITE_LIMIT = 1_200;

/** The ARM-style display name of a location (westeurope → West Europe), for site bodies. */
const LOCATION_NAMES = {
  westeurope: 'West Europe', northeurope: 'North Europe', eastus: 'East US', eastus2: 'East US 2',
  westus: 'West US', westus2: 'West US 2', uksouth: 'UK South', francecentral: 'France Central',
  germanywestcentral: 'Germany West Central', swedencentral: 'Sweden Central',
};

/**
 * Start the stand-in. subscriptions: { [subscriptionId]: { tenantId?, displayName?, resourceGroups:
 * { [name]: { location, tags?, sites: { [name]: { location?, state?, kind?, hostNames?, siteConfig?,
 * appSettings?, tags? } } } } } }. Options: port (0 = any free port), host, jwksUrl (required),
 * issuerPrefix, authorizationUri (for WWW-Authenticate; default the issuer's tenant URL derived from
 * jwksUrl), pollsBeforeDone (InProgress polls before Succeeded, default 2), retryAfterSeconds
 * (default 1), apiVersions (overrides of API_VERSIONS), pageSize (elements per page of a list,
 * default DEFAULT_PAGE_SIZE), log (one line per request; default silent).
 */
export async function startArm({
  port = 8420,
  host = '127.0.0.1',
  jwksUrl,
  issuerPrefix = 'https://sts.windows.net/',
  authorizationUri,
  subscriptions = DEFAULT_SUBSCRIPTIONS,
  pollsBeforeDone = 2,
  retryAfterSeconds = 1,
  apiVersions = {},
  pageSize = DEFAULT_PAGE_SIZE,
  log = () => {},
} = {}) {
  if (!jwksUrl) throw new Error('startArm: jwksUrl is required');
  if (!Number.isInteger(pollsBeforeDone) || pollsBeforeDone < 0) throw new Error('startArm: pollsBeforeDone must be a whole number');
  if (!Number.isInteger(pageSize) || pageSize < 1 || pageSize > MAX_TOP) throw new Error(`startArm: pageSize must be 1..${MAX_TOP}`);
  const seed = structuredClone(subscriptions);
  const ctx = {
    url: null,
    jwks: { url: jwksUrl, keys: new Map(), lastFetch: 0, pending: null },
    issuerPrefix,
    authorizationUri: authorizationUri ?? defaultAuthorizationUri(jwksUrl),
    pollsBeforeDone,
    retryAfterSeconds,
    apiVersions: { ...API_VERSIONS, ...apiVersions },
    pageSize,
    skipKey: randomBytes(32),
    model: buildModel(seed),
    operations: new Map(),
    limits: new Map(),
    stats: emptyStats(),
    requests: [],
    fault: null,
    timers: new Set(),
    log,
  };
  const server = createServer((req, res) => {
    handle(ctx, req, res).catch((err) => {
      log(`arm: internal error ${err.stack ?? err.message}`);
      if (!res.headersSent) send(res, 500, { error: { code: 'InternalServerError', message: 'The stand-in failed internally.' } }, baseHeaders(req));
    });
  });
  await new Promise((resolveListen, rejectListen) => {
    server.once('error', (err) => rejectListen(new Error(`arm stand-in cannot listen on ${host}:${port}: ${err.message}`)));
    server.listen(port, host, resolveListen);
  });
  const actualPort = server.address().port;
  ctx.url = `http://${host}:${actualPort}`;

  return {
    url: ctx.url,
    port: actualPort,
    stats: () => structuredClone(ctx.stats),
    resetStats: () => { ctx.stats = emptyStats(); },
    requests: () => structuredClone(ctx.requests),
    clearRequests: () => { ctx.requests.length = 0; },
    setFault: (fault) => { ctx.fault = normalizeFault(fault); },
    clearFaults: () => { ctx.fault = null; },
    resources: () => modelSnapshot(ctx),
    reset: () => {
      ctx.model = buildModel(seed);
      ctx.operations.clear();
      ctx.limits.clear();
    },
    stop: () => new Promise((resolveStop) => {
      for (const timer of ctx.timers) clearTimeout(timer);
      ctx.timers.clear();
      if (!server.listening) return resolveStop();
      server.close(() => resolveStop());
      server.closeAllConnections();
    }),
  };
}

// ---------------------------------------------------------------------------------------------
// The model

function buildModel(subscriptions) {
  const model = new Map();
  for (const [subId, sub] of Object.entries(subscriptions)) {
    const groups = new Map();
    for (const [rgName, rg] of Object.entries(sub.resourceGroups ?? {})) {
      const location = rg.location ?? 'westeurope';
      const sites = new Map();
      for (const [siteName, site] of Object.entries(rg.sites ?? {})) {
        sites.set(siteName.toLowerCase(), {
          name: siteName,
          location: site.location ?? location,
          kind: site.kind ?? 'app,linux',
          state: site.state ?? 'Running',
          hostNames: site.hostNames ?? [`${siteName.toLowerCase()}.azurewebsites.net`],
          siteConfig: site.siteConfig ?? {},
          appSettings: { ...(site.appSettings ?? {}) },
          tags: site.tags ?? {},
          lastModified: new Date().toISOString(),
        });
      }
      groups.set(rgName.toLowerCase(), { name: rgName, location, tags: rg.tags, sites });
    }
    model.set(subId.toLowerCase(), {
      id: subId,
      tenantId: sub.tenantId,
      displayName: sub.displayName ?? `Subscription ${subId}`,
      groups,
    });
  }
  return model;
}

function modelSnapshot(ctx) {
  const out = {};
  for (const sub of ctx.model.values()) {
    const groups = {};
    for (const rg of sub.groups.values()) {
      const sites = {};
      for (const site of rg.sites.values()) {
        sites[site.name] = { state: site.state, location: site.location, appSettings: { ...site.appSettings }, lastModified: site.lastModified };
      }
      groups[rg.name] = { location: rg.location, sites };
    }
    out[sub.id] = { tenantId: sub.tenantId, resourceGroups: groups };
  }
  const operations = {};
  for (const [id, op] of ctx.operations) operations[id] = { status: op.status, polls: op.polls, site: op.siteId };
  return { subscriptions: out, operations };
}

const subscriptionBody = (sub) => ({
  id: `/subscriptions/${sub.id}`,
  authorizationSource: 'RoleBased',
  managedByTenants: [],
  subscriptionId: sub.id,
  tenantId: sub.tenantId ?? '00000000-0000-0000-0000-000000000000',
  displayName: sub.displayName,
  state: 'Enabled',
  subscriptionPolicies: { locationPlacementId: 'Public_2014-09-01', quotaId: 'PayAsYouGo_2014-09-01', spendingLimit: 'Off' },
});

const resourceGroupBody = (sub, rg) => ({
  id: `/subscriptions/${sub.id}/resourceGroups/${rg.name}`,
  name: rg.name,
  type: 'Microsoft.Resources/resourceGroups',
  location: rg.location,
  ...(rg.tags ? { tags: rg.tags } : {}),
  properties: { provisioningState: 'Succeeded' },
});

const siteId = (sub, rg, site) => `/subscriptions/${sub.id}/resourceGroups/${rg.name}/providers/Microsoft.Web/sites/${site.name}`;
const displayLocation = (loc) => LOCATION_NAMES[loc.toLowerCase().replaceAll(' ', '')] ?? loc;
const normalLocation = (loc) => loc.toLowerCase().replaceAll(' ', '');

/** A web app the way GET Microsoft.Web/sites answers (the common fields, siteConfig mostly null as ARM returns it). */
function siteBody(sub, rg, site) {
  const id = siteId(sub, rg, site);
  const defaultHost = site.hostNames[0];
  const scmHost = defaultHost.replace(/^([^.]+)\./, '$1.scm.');
  const digest = createHash('sha256').update(id.toLowerCase()).digest('hex');
  const ips = [20, 21, 22].map((n) => `${n}.${parseInt(digest.slice(0, 2), 16)}.${parseInt(digest.slice(2, 4), 16)}.${parseInt(digest.slice(4, 6), 16)}`).join(',');
  const location = displayLocation(site.location);
  return {
    id,
    name: site.name,
    type: 'Microsoft.Web/sites',
    kind: site.kind,
    location,
    tags: site.tags,
    properties: {
      name: site.name,
      state: site.state,
      hostNames: [...site.hostNames],
      webSpace: `${rg.name}-${location.replaceAll(' ', '')}webspace-Linux`,
      selfLink: `https://waws-prod-local-001.api.azurewebsites.windows.net:454/subscriptions/${sub.id}/webspaces/${rg.name}-${location.replaceAll(' ', '')}webspace-Linux/sites/${site.name}`,
      repositorySiteName: site.name,
      owner: null,
      usageState: 'Normal',
      enabled: true,
      adminEnabled: true,
      enabledHostNames: [...site.hostNames, scmHost],
      siteProperties: { metadata: null, properties: [{ name: 'LinuxFxVersion', value: site.siteConfig.linuxFxVersion ?? 'NODE|20-lts' }, { name: 'WindowsFxVersion', value: null }], appSettings: null },
      availabilityState: 'Normal',
      sslCertificates: null,
      csrs: [],
      cers: null,
      siteMode: null,
      hostNameSslStates: [
        { name: defaultHost, sslState: 'Disabled', ipBasedSslResult: null, virtualIP: null, thumbprint: null, toUpdate: null, toUpdateIpBasedSsl: null, ipBasedSslState: 'NotConfigured', hostType: 'Standard' },
        { name: scmHost, sslState: 'Disabled', ipBasedSslResult: null, virtualIP: null, thumbprint: null, toUpdate: null, toUpdateIpBasedSsl: null, ipBasedSslState: 'NotConfigured', hostType: 'Repository' },
      ],
      computeMode: null,
      serverFarm: null,
      serverFarmId: `/subscriptions/${sub.id}/resourceGroups/${rg.name}/providers/Microsoft.Web/serverfarms/${rg.name}-plan`,
      reserved: true,
      isXenon: false,
      hyperV: false,
      lastModifiedTimeUtc: site.lastModified,
      storageRecoveryDefaultState: 'Running',
      contentAvailabilityState: 'Normal',
      runtimeAvailabilityState: 'Normal',
      dnsConfiguration: {},
      vnetRouteAllEnabled: false,
      containerAllocationSubnet: null,
      useContainerLocalhostBindings: null,
      vnetImagePullEnabled: false,
      vnetContentShareEnabled: false,
      siteConfig: {
        numberOfWorkers: 1,
        defaultDocuments: null,
        netFrameworkVersion: null,
        phpVersion: null,
        pythonVersion: null,
        nodeVersion: null,
        powerShellVersion: null,
        linuxFxVersion: 'NODE|20-lts',
        windowsFxVersion: null,
        windowsConfiguredStacks: null,
        requestTracingEnabled: null,
        remoteDebuggingEnabled: null,
        remoteDebuggingVersion: null,
        httpLoggingEnabled: null,
        azureMonitorLogCategories: null,
        acrUseManagedIdentityCreds: false,
        acrUserManagedIdentityID: null,
        logsDirectorySizeLimit: null,
        detailedErrorLoggingEnabled: null,
        publishingUsername: null,
        publishingPassword: null,
        appSettings: null,
        metadata: null,
        connectionStrings: null,
        machineKey: null,
        handlerMappings: null,
        documentRoot: null,
        scmType: null,
        use32BitWorkerProcess: null,
        webSocketsEnabled: null,
        alwaysOn: false,
        javaVersion: null,
        javaContainer: null,
        javaContainerVersion: null,
        appCommandLine: null,
        managedPipelineMode: null,
        virtualApplications: null,
        winAuthAdminState: null,
        winAuthTenantState: null,
        customAppPoolIdentityAdminState: null,
        customAppPoolIdentityTenantState: null,
        runtimeADUser: null,
        runtimeADUserPassword: null,
        loadBalancing: null,
        routingRules: null,
        experiments: null,
        limits: null,
        autoHealEnabled: null,
        autoHealRules: null,
        tracingOptions: null,
        vnetName: null,
        vnetRouteAllEnabled: null,
        vnetPrivatePortsCount: null,
        publicNetworkAccess: null,
        cors: null,
        push: null,
        apiDefinition: null,
        apiManagementConfig: null,
        autoSwapSlotName: null,
        localMySqlEnabled: null,
        managedServiceIdentityId: null,
        xManagedServiceIdentityId: null,
        keyVaultReferenceIdentity: null,
        ipSecurityRestrictions: null,
        ipSecurityRestrictionsDefaultAction: null,
        scmIpSecurityRestrictions: null,
        scmIpSecurityRestrictionsDefaultAction: null,
        scmIpSecurityRestrictionsUseMain: null,
        http20Enabled: false,
        minTlsVersion: null,
        minTlsCipherSuite: null,
        scmMinTlsCipherSuite: null,
        supportedTlsCipherSuites: null,
        scmSupportedTlsCipherSuites: null,
        scmMinTlsVersion: null,
        ftpsState: null,
        preWarmedInstanceCount: null,
        functionAppScaleLimit: 0,
        elasticWebAppScaleLimit: null,
        healthCheckPath: null,
        fileChangeAuditEnabled: null,
        functionsRuntimeScaleMonitoringEnabled: null,
        websiteTimeZone: null,
        minimumElasticInstanceCount: 1,
        azureStorageAccounts: null,
        http20ProxyFlag: null,
        sitePort: null,
        antivirusScanEnabled: null,
        storageType: null,
        sitePrivateLinkHostEnabled: null,
        clusteringEnabled: false,
        ...site.siteConfig,
      },
      functionAppConfig: null,
      daprConfig: null,
      deploymentId: site.name,
      slotName: null,
      trafficManagerHostNames: null,
      sku: 'Basic',
      scmSiteAlsoStopped: false,
      targetSwapSlot: null,
      hostingEnvironment: null,
      hostingEnvironmentProfile: null,
      clientAffinityEnabled: false,
      clientCertEnabled: false,
      clientCertMode: 'Required',
      clientCertExclusionPaths: null,
      hostNamesDisabled: false,
      ipMode: 'IPv4',
      vnetBackupRestoreEnabled: false,
      domainVerificationIdentifiers: null,
      customDomainVerificationId: digest.slice(0, 64).toUpperCase(),
      kind: site.kind,
      managedEnvironmentId: null,
      workloadProfileName: null,
      resourceConfig: null,
      inboundIpAddress: ips.split(',')[0],
      possibleInboundIpAddresses: ips.split(',')[0],
      inboundIpv6Address: null,
      possibleInboundIpv6Addresses: null,
      ftpUsername: `${site.name}\\$${site.name}`,
      ftpsHostName: `ftps://waws-prod-local-001.ftp.azurewebsites.windows.net/site/wwwroot`,
      outboundIpAddresses: ips,
      possibleOutboundIpAddresses: ips,
      outboundIpv6Addresses: null,
      possibleOutboundIpv6Addresses: null,
      containerSize: 0,
      dailyMemoryTimeQuota: 0,
      suspendedTill: null,
      siteDisabledReason: 0,
      functionExecutionUnitsCache: null,
      maxNumberOfWorkers: null,
      homeStamp: 'waws-prod-local-001',
      cloningInfo: null,
      hostingEnvironmentId: null,
      tags: site.tags,
      resourceGroup: rg.name,
      defaultHostName: defaultHost,
      slotSwapStatus: null,
      httpsOnly: true,
      endToEndEncryptionEnabled: false,
      functionsRuntimeAdminIsolationEnabled: false,
      redundancyMode: 'None',
      inProgressOperationId: null,
      geoDistributions: null,
      privateEndpointConnections: [],
      publicNetworkAccess: 'Enabled',
      buildVersion: null,
      targetBuildVersion: null,
      migrationState: null,
      eligibleLogCategories: 'AppServiceAppLogs,AppServiceAuditLogs,AppServiceConsoleLogs,AppServiceHTTPLogs,AppServiceIPSecAuditLogs,AppServicePlatformLogs',
      inFlightFeatures: ['SiteContainers'],
      storageAccountRequired: false,
      virtualNetworkSubnetId: null,
      keyVaultReferenceIdentity: 'SystemAssigned',
      autoGeneratedDomainNameLabelScope: null,
      privateLinkIdentifiers: null,
      sshEnabled: null,
    },
  };
}

const appSettingsBody = (sub, rg, site) => ({
  id: `${siteId(sub, rg, site)}/config/appsettings`,
  name: 'appsettings',
  type: 'Microsoft.Web/sites/config',
  location: displayLocation(site.location),
  tags: site.tags,
  properties: { ...site.appSettings },
});

// ---------------------------------------------------------------------------------------------
// Errors, the ARM way

const ALLOWED_AUDIENCES_TEXT = ARM_AUDIENCES.map((a) => `'${a}'`).join(',');

class ArmError extends Error {
  constructor(status, code, message, headers = {}) {
    super(message);
    this.status = status;
    this.code = code;
    this.headers = headers;
  }
}
const armError = (status, code, message, headers) => new ArmError(status, code, message, headers);

/** A 401 with ARM's WWW-Authenticate challenge. */
function authError(ctx, code, message) {
  const description = message.replaceAll('"', "'");
  return armError(401, code, message, {
    'www-authenticate': `Bearer authorization_uri="${ctx.authorizationUri}", error="invalid_token", error_description="${description}"`,
  });
}

/** ARM prints times as .NET's invariant culture does: M/d/yyyy h:mm:ss AM. */
function dotnetTime(seconds) {
  const d = new Date(seconds * 1000);
  const h = d.getUTCHours();
  const pad = (n) => String(n).padStart(2, '0');
  return `${d.getUTCMonth() + 1}/${d.getUTCDate()}/${d.getUTCFullYear()} ${h % 12 || 12}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())} ${h < 12 ? 'AM' : 'PM'}`;
}

const FAULT_CODES = {
  400: ['BadRequest', 'The request is invalid (injected fault).'],
  404: ['NotFound', 'The requested resource was not found (injected fault).'],
  409: ['Conflict', 'The request conflicts with the current state of the resource (injected fault).'],
  429: ['SubscriptionRequestsThrottled', 'Number of requests for the subscription exceeded the limit. Please try again later (injected fault).'],
  500: ['InternalServerError', 'Encountered internal server error (injected fault).'],
  502: ['BadGateway', 'The gateway did not receive a response from the service (injected fault).'],
  503: ['ServiceUnavailable', 'The service is unavailable. Please retry the request (injected fault).'],
  504: ['GatewayTimeout', 'The gateway did not receive a response within the specified time period (injected fault).'],
};

function normalizeFault(fault) {
  if (!fault || typeof fault !== 'object' || Array.isArray(fault)) throw new Error('fault must be an object');
  const known = new Set(['status', 'code', 'message', 'retryAfter', 'count', 'delayMs', 'match', 'after', 'reset']);
  const unknown = Object.keys(fault).find((k) => !known.has(k));
  if (unknown) throw new Error(`unknown fault field ${unknown}`);
  const { status = 500, code, message, retryAfter, count = 1, delayMs = 0, match, after = false, reset = false } = fault;
  if (typeof after !== 'boolean' || typeof reset !== 'boolean') throw new Error('fault.after and fault.reset must be booleans');
  if (!(Number.isInteger(status) && status >= 400 && status <= 599)) throw new Error('fault.status must be 400..599');
  if (!Number.isInteger(count) || count < 1) throw new Error('fault.count must be a positive integer');
  if (!(Number.isInteger(delayMs) && delayMs >= 0 && delayMs <= MAX_FAULT_DELAY_MS)) throw new Error(`fault.delayMs must be 0..${MAX_FAULT_DELAY_MS}`);
  if (retryAfter !== undefined && !(Number.isInteger(retryAfter) && retryAfter >= 0)) throw new Error('fault.retryAfter must be a whole number of seconds');
  for (const [name, value] of [['code', code], ['message', message], ['match', match]]) {
    if (value !== undefined && typeof value !== 'string') throw new Error(`fault.${name} must be a string`);
  }
  const [defaultCode, defaultMessage] = FAULT_CODES[status] ?? ['InjectedFault', 'Injected fault.'];
  return { status, code: code ?? defaultCode, message: message ?? defaultMessage, retryAfter, remaining: count, delayMs, match, after, reset };
}

// ---------------------------------------------------------------------------------------------
// Request handling

function baseHeaders(req) {
  const given = req.headers['x-ms-correlation-request-id'];
  const correlation = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(given ?? '') ? given : randomUUID();
  const requestId = randomUUID();
  return {
    'x-ms-request-id': requestId,
    'x-ms-correlation-request-id': correlation,
    'x-ms-routing-request-id': `LOCAL:${new Date().toISOString().replace(/[-:]/g, '').replace(/\.\d+Z$/, 'Z')}:${requestId}`,
    'cache-control': 'no-cache',
    pragma: 'no-cache',
    expires: '-1',
  };
}

function send(res, status, body, headers = {}) {
  if (body === undefined) {
    res.writeHead(status, { 'content-length': 0, ...headers });
    res.end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

async function handle(ctx, req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const path = url.pathname;
  if (path.startsWith('/__control/')) return control(ctx, req, res, path.slice('/__control/'.length).replace(/\/$/, ''));

  const headers = baseHeaders(req);
  const entry = {
    time: new Date().toISOString(),
    method: req.method,
    path,
    query: Object.fromEntries(url.searchParams),
    headers: Object.fromEntries(Object.entries(req.headers).filter(([name]) => name !== 'authorization')),
    authorization: describeAuthorization(req.headers.authorization),
    body: null,
    route: 'unknown',
    status: 0,
  };
  let answer;
  try {
    const body = await readBody(req);
    entry.body = body.length ? body.toString('utf8') : null;
    answer = await respond(ctx, req, url, body, entry);
  } catch (err) {
    if (err instanceof ConnectionReset) {
      entry.status = 0;
      record(ctx, entry);
      ctx.log(`arm: ${req.method} ${path}${url.search} -> connection dropped (injected)`);
      req.socket.destroy();
      return;
    }
    if (!(err instanceof ArmError)) throw err;
    answer = { status: err.status, body: { error: { code: err.code, message: err.message } }, headers: err.headers };
  }
  entry.status = answer.status;
  record(ctx, entry);
  ctx.log(`arm: ${req.method} ${path}${url.search} -> ${answer.status}${answer.body?.error ? ` ${answer.body.error.code}` : ''}`);
  send(res, answer.status, answer.body, { ...headers, ...(answer.headers ?? {}) });
}

function record(ctx, entry) {
  const { stats } = ctx;
  stats.requests += 1;
  bump(stats.byRoute, entry.route);
  bump(stats.byStatus, String(entry.status));
  ctx.requests.push(entry);
  if (ctx.requests.length > MAX_LOGGED_REQUESTS) ctx.requests.splice(0, ctx.requests.length - MAX_LOGGED_REQUESTS);
}

/** What the log keeps of the Authorization header: never the token. */
function describeAuthorization(header) {
  if (header === undefined) return { present: false };
  const [scheme, token] = header.split(' ', 2);
  const out = { present: true, scheme };
  try {
    const payload = JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8'));
    if (payload.aud !== undefined) out.audience = payload.aud;
  } catch { /* not a JWT: no audience */ }
  return out;
}

async function respond(ctx, req, url, body, entry) {
  if (ctx.fault && (!ctx.fault.match || url.pathname.includes(ctx.fault.match))) {
    const fault = ctx.fault;
    fault.remaining -= 1;
    if (fault.remaining <= 0) ctx.fault = null;
    ctx.stats.faultsInjected += 1;
    if (fault.after) {
      // Carried out, then the answer is lost: late, an error, or no answer at all.
      const done = await carryOut(ctx, req, url, body, entry);
      entry.carriedOut = done.status;
    } else {
      entry.route = 'fault';
    }
    if (fault.delayMs) await delay(ctx, fault.delayMs);
    if (fault.reset) throw new ConnectionReset();
    throw armError(fault.status, fault.code, fault.message, fault.retryAfter === undefined ? {} : { 'retry-after': String(fault.retryAfter) });
  }
  return carryOut(ctx, req, url, body, entry);
}

/** A fault that drops the connection instead of answering. */
class ConnectionReset extends Error {}

async function carryOut(ctx, req, url, body, entry) {
  const claims = await authenticate(ctx, req.headers.authorization);
  const apiVersion = url.searchParams.get('api-version');
  if (apiVersion === null || apiVersion === '') {
    throw armError(400, 'MissingApiVersionParameter', 'The api-version query parameter (?api-version=) is required for all requests.');
  }
  const route = parseRoute(req.method, url.pathname);
  entry.route = route.name;
  return dispatch(ctx, { req, url, body, route, apiVersion, claims });
}

// ---------------------------------------------------------------------------------------------
// Tokens

async function authenticate(ctx, header) {
  if (header === undefined) throw authError(ctx, 'AuthenticationFailed', "Authentication failed. The 'Authorization' header is missing.");
  const m = /^Bearer ([A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)$/.exec(header);
  if (!m) throw authError(ctx, 'AuthenticationFailed', "Authentication failed. The 'Authorization' header is provided in an invalid format.");
  const invalid = (why) => authError(ctx, 'InvalidAuthenticationToken', `The access token is invalid. ${why}`.trim());
  const [h, p, s] = m[1].split('.');
  let header0;
  let claims;
  try {
    header0 = JSON.parse(Buffer.from(h, 'base64url').toString('utf8'));
    claims = JSON.parse(Buffer.from(p, 'base64url').toString('utf8'));
  } catch {
    throw invalid('It is not a JWT.');
  }
  if (!claims || typeof claims !== 'object' || Array.isArray(claims)) throw invalid('It is not a JWT.');
  if (header0?.alg !== 'RS256') throw invalid(`The signing algorithm '${header0?.alg}' is not supported.`);
  const key = await signingKey(ctx, header0.kid);
  if (!key) throw invalid(`The signing key '${header0.kid}' is not known.`);
  if (!verify('sha256', Buffer.from(`${h}.${p}`), key, Buffer.from(s, 'base64url'))) throw invalid('The signature is invalid.');

  const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (!audiences.some((a) => ARM_AUDIENCES.includes(a))) {
    throw authError(ctx, 'InvalidAuthenticationTokenAudience',
      `The access token has been obtained for wrong audience or resource '${audiences.join(',')}'. It should exactly match with one of the allowed audiences ${ALLOWED_AUDIENCES_TEXT}.`);
  }
  if (typeof claims.iss !== 'string' || !claims.iss.startsWith(ctx.issuerPrefix)) {
    throw authError(ctx, 'InvalidAuthenticationToken', `The access token is from an invalid issuer '${claims.iss}'.`);
  }
  if (claims.oid === undefined && claims.puid === undefined && claims.altsecid === undefined) {
    throw authError(ctx, 'InvalidAuthenticationToken',
      "The received access token is not valid: at least one of the claims 'puid' or 'altsecid' or 'oid' should be present. If you are accessing as application please make sure service principal is properly created in the tenant.");
  }
  const now = Math.floor(Date.now() / 1000);
  if (typeof claims.exp !== 'number') throw invalid('The token has no expiry (exp).');
  if (now >= claims.exp) {
    throw authError(ctx, 'ExpiredAuthenticationToken', `The access token expiry UTC time '${dotnetTime(claims.exp)}' is earlier than current UTC time '${dotnetTime(now)}'.`);
  }
  if (claims.nbf !== undefined && (typeof claims.nbf !== 'number' || claims.nbf > now)) {
    throw authError(ctx, 'InvalidAuthenticationToken', `The access token is not yet valid: its validity starts at UTC time '${dotnetTime(Number(claims.nbf))}', current UTC time is '${dotnetTime(now)}'.`);
  }
  return claims;
}

/** The key for kid; an unknown kid refetches the JWKS at most every 10 s. */
async function signingKey(ctx, kid) {
  const { jwks } = ctx;
  if (typeof kid !== 'string' || !kid) return null;
  if (jwks.keys.has(kid)) return jwks.keys.get(kid);
  if (jwks.pending) {
    await jwks.pending; // a fetch under way may bring the key
    if (jwks.keys.has(kid)) return jwks.keys.get(kid);
  }
  if (Date.now() - jwks.lastFetch < JWKS_REFETCH_MS) return null;
  if (!jwks.pending) {
    jwks.lastFetch = Date.now();
    jwks.pending = fetchJwks(ctx).finally(() => { jwks.pending = null; });
  }
  await jwks.pending;
  return jwks.keys.get(kid) ?? null;
}

async function fetchJwks(ctx) {
  ctx.stats.jwksFetches += 1;
  try {
    const res = await fetch(ctx.jwks.url, { signal: AbortSignal.timeout(5_000) });
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    const { keys } = await res.json();
    const fresh = new Map();
    for (const jwk of keys ?? []) {
      if (jwk.kty !== 'RSA' || !jwk.kid || (jwk.use && jwk.use !== 'sig')) continue;
      try {
        fresh.set(jwk.kid, createPublicKey({ key: { kty: jwk.kty, n: jwk.n, e: jwk.e }, format: 'jwk' }));
      } catch { /* not a usable key */ }
    }
    ctx.jwks.keys = fresh;
    ctx.log(`arm: JWKS fetched from ${ctx.jwks.url}: ${fresh.size} RSA key(s)`);
  } catch (err) {
    ctx.log(`arm: JWKS fetch from ${ctx.jwks.url} failed: ${err.message}`); // keys kept
  }
}

// ---------------------------------------------------------------------------------------------
// Routes

const eq = (a, b) => a.toLowerCase() === b.toLowerCase();
const safeDecode = (s) => {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
};

/** ARM's URL grammar as far as the stand-in models it. Keywords and names are case-insensitive. */
function parseRoute(method, pathname) {
  const seg = pathname.replace(/^\/+|\/+$/g, '').split('/').map(safeDecode);
  const r = (name, fields = {}) => ({ name, method, ...fields });
  if (seg.length < 2 || !eq(seg[0], 'subscriptions') || !seg[1]) return r('unknown', { typeName: seg[0] || '', namespace: 'Microsoft.Resources' });
  const sub = seg[1];
  if (seg.length === 2) return r('subscription', { sub });
  if (eq(seg[2], 'providers')) {
    // /subscriptions/{sub}/providers/{ns}/locations/{loc}/(operationResults|operations)/{id}
    const ns = seg[3] ?? '';
    if (!eq(ns, 'Microsoft.Web')) return r('unknown provider', { sub, namespace: ns, typeName: seg[4] ?? '' });
    if (seg.length === 8 && eq(seg[4], 'locations') && eq(seg[6], 'operationResults')) return r('operation status', { sub, location: seg[5], id: seg[7] });
    if (seg.length === 8 && eq(seg[4], 'locations') && eq(seg[6], 'operations')) return r('operation location', { sub, location: seg[5], id: seg[7] });
    return r('unknown type', { sub, namespace: 'Microsoft.Web', typeName: seg.slice(4).filter((_, i) => i % 2 === 0).join('/') });
  }
  if (seg.length === 3 && eq(seg[2], 'resourceGroups')) return r('resource group list', { sub });
  if (!eq(seg[2], 'resourceGroups') || !seg[3]) return r('unknown type', { sub, namespace: 'Microsoft.Resources', typeName: seg[2] });
  const rg = seg[3];
  if (seg.length === 4) return r('resource group', { sub, rg });
  if (!eq(seg[4], 'providers') || !seg[5]) return r('unknown type', { sub, rg, namespace: 'Microsoft.Resources', typeName: seg[4] });
  const ns = seg[5];
  if (!eq(ns, 'Microsoft.Web')) return r('unknown provider', { sub, rg, namespace: ns, typeName: seg[6] ?? '' });
  if (seg.length === 7 && eq(seg[6], 'sites')) return r('site list', { sub, rg });
  if (!seg[6] || !eq(seg[6], 'sites') || !seg[7]) return r('unknown type', { sub, rg, namespace: 'Microsoft.Web', typeName: seg[6] ?? '' });
  const site = seg[7];
  const rest = seg.slice(8).map((s) => s.toLowerCase()).join('/');
  const known = {
    '': 'site',
    restart: 'site restart',
    stop: 'site stop',
    start: 'site start',
    'config/appsettings': 'site appsettings',
    'config/appsettings/list': 'site appsettings list',
  }[rest];
  if (!known) return r('unknown type', { sub, rg, site, namespace: 'Microsoft.Web', typeName: ['sites', ...seg.slice(8).filter((_, i) => i % 2 === 0)].join('/') });
  return r(known, { sub, rg, site });
}

/** Which methods each route takes. */
const METHODS = {
  subscription: ['GET'],
  'resource group': ['GET'],
  'resource group list': ['GET'],
  'site list': ['GET'],
  site: ['GET'],
  'site restart': ['POST'],
  'site stop': ['POST'],
  'site start': ['POST'],
  'site appsettings': ['PUT'],
  'site appsettings list': ['POST'],
  'operation status': ['GET'],
  'operation location': ['GET'],
};

function checkApiVersion(ctx, kind, apiVersion, { typeLabel, location }) {
  const supported = ctx.apiVersions[kind];
  if (!API_VERSION_SHAPE.test(apiVersion)) {
    throw armError(400, 'InvalidApiVersionParameter', `The api-version '${apiVersion}' is invalid. The supported versions are '${supported.join(',')}'.`);
  }
  if (supported.includes(apiVersion)) return;
  if (kind.includes('/')) {
    throw armError(400, 'NoRegisteredProviderFound',
      `No registered resource provider found for location '${location}' and API version '${apiVersion}' for type '${typeLabel}'. The supported api-versions are '${supported.join(', ')}'. The supported locations are '${Object.values(LOCATION_NAMES).join(', ')}'.`);
  }
  throw armError(400, 'InvalidApiVersionParameter', `The api-version '${apiVersion}' is invalid. The supported versions are '${supported.join(',')}'.`);
}

function rateLimitHeaders(ctx, subId, method) {
  const key = subId.toLowerCase();
  const counts = ctx.limits.get(key) ?? { reads: READ_LIMIT, writes: WRITE_LIMIT };
  ctx.limits.set(key, counts);
  if (method === 'GET' || method === 'HEAD') {
    counts.reads = Math.max(0, counts.reads - 1);
    return { 'x-ms-ratelimit-remaining-subscription-reads': String(counts.reads) };
  }
  counts.writes = Math.max(0, counts.writes - 1);
  return { 'x-ms-ratelimit-remaining-subscription-writes': String(counts.writes) };
}

async function dispatch(ctx, { req, url, body, route, apiVersion, claims }) {
  const { name } = route;
  if (name === 'unknown' || name === 'unknown type' || name === 'unknown provider') {
    if (route.sub) findSubscription(ctx, route.sub, claims);
    if (name === 'unknown provider') {
      const location = route.rg ? findGroup(ctx, route.sub, route.rg).location : 'global';
      throw armError(404, 'NoRegisteredProviderFound',
        `No registered resource provider found for location '${location}' and API version '${apiVersion}' for type '${route.typeName}' in namespace '${route.namespace}'. The supported api-versions are ''. The supported locations are ''.`);
    }
    throw armError(404, 'InvalidResourceType',
      `The resource type '${route.typeName}' could not be found in the namespace '${route.namespace}' for api version '${apiVersion}'.`);
  }
  const sub = findSubscription(ctx, route.sub, claims);
  const limits = rateLimitHeaders(ctx, sub.id, req.method);
  const withLimits = (answer) => ({ ...answer, headers: { ...limits, ...(answer.headers ?? {}) } });
  if (!METHODS[name].includes(req.method)) {
    throw armError(405, 'MethodNotAllowed', `The requested resource does not support http method '${req.method}'.`, { allow: METHODS[name].join(', ') });
  }

  if (name === 'subscription') {
    checkApiVersion(ctx, 'subscriptions', apiVersion, {});
    return withLimits({ status: 200, body: subscriptionBody(sub) });
  }
  if (name === 'resource group') {
    checkApiVersion(ctx, 'resourceGroups', apiVersion, {});
    return withLimits({ status: 200, body: resourceGroupBody(sub, findGroup(ctx, route.sub, route.rg)) });
  }
  if (name === 'resource group list') {
    checkApiVersion(ctx, 'resourceGroups', apiVersion, {});
    return withLimits({ status: 200, body: listPage(ctx, req, url, [...sub.groups.values()], (rg) => resourceGroupBody(sub, rg)) });
  }
  if (name === 'operation status' || name === 'operation location') {
    checkApiVersion(ctx, 'Microsoft.Web/sites', apiVersion, { typeLabel: 'locations/operationResults', location: route.location });
    return withLimits(pollOperation(ctx, sub, route, apiVersion));
  }

  // Microsoft.Web/sites and its actions. The resource group is checked before the api-version
  // for the type, as ARM resolves the group first.
  const rg = findGroup(ctx, route.sub, route.rg);
  checkApiVersion(ctx, 'Microsoft.Web/sites', apiVersion, { typeLabel: 'sites', location: rg.location });
  if (name === 'site list') {
    return withLimits({ status: 200, body: listPage(ctx, req, url, [...rg.sites.values()], (site) => siteBody(sub, rg, site)) });
  }
  const site = rg.sites.get(route.site.toLowerCase());
  if (!site) {
    throw armError(404, 'ResourceNotFound',
      `The Resource 'Microsoft.Web/sites/${route.site}' under resource group '${rg.name}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix`);
  }
  switch (name) {
    case 'site':
      return withLimits({ status: 200, body: siteBody(sub, rg, site) });
    case 'site stop':
    case 'site start':
      site.state = name === 'site stop' ? 'Stopped' : 'Running';
      site.lastModified = new Date().toISOString();
      return withLimits({ status: 200, body: undefined });
    case 'site restart':
      return withLimits(startRestart(ctx, sub, rg, site, apiVersion));
    case 'site appsettings':
      site.appSettings = parseAppSettings(req, body);
      site.lastModified = new Date().toISOString();
      return withLimits({ status: 200, body: appSettingsBody(sub, rg, site) });
    case 'site appsettings list':
      return withLimits({ status: 200, body: appSettingsBody(sub, rg, site) });
    default:
      throw new Error(`unhandled route ${name}`);
  }
}

function findSubscription(ctx, subId, claims) {
  const sub = ctx.model.get(subId.toLowerCase());
  if (!sub) throw armError(404, 'SubscriptionNotFound', `The subscription '${subId}' could not be found.`);
  if (sub.tenantId && claims.iss !== `https://sts.windows.net/${sub.tenantId}/`) {
    throw authError(ctx, 'InvalidAuthenticationTokenTenant',
      `The access token is from the wrong issuer '${claims.iss}'. It must match the tenant 'https://sts.windows.net/${sub.tenantId}/' associated with this subscription. Please use the authority (URL) 'https://login.windows.net/${sub.tenantId}' to get the token. Note, if the subscription is transferred to another tenant there is no impact to the services, but information about new tenant could take time to propagate (up to an hour). If you just transferred your subscription and see this error message, please try back later.`);
  }
  return sub;
}

function findGroup(ctx, subId, rgName) {
  const rg = ctx.model.get(subId.toLowerCase())?.groups.get(rgName.toLowerCase());
  if (!rg) throw armError(404, 'ResourceGroupNotFound', `Resource group '${rgName}' could not be found.`);
  return rg;
}

/** PUT appsettings: a JSON body {"properties": {name: string value}}, nothing else. */
function parseAppSettings(req, body) {
  const type = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  if (body.length && type !== 'application/json') {
    throw armError(415, 'UnsupportedMediaType', `The content media type '${type || '(none)'}' is not supported. Only 'application/json' is supported.`);
  }
  const invalid = (why) => armError(400, 'InvalidRequestContent', `The request content was invalid and could not be deserialized: '${why}'.`);
  if (!body.length) throw invalid('The request content is empty');
  let parsed;
  try {
    parsed = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw invalid(err.message);
  }
  if (!parsed || typeof parsed !== 'object' || Array.isArray(parsed)) throw invalid('The request content must be a JSON object');
  const extra = Object.keys(parsed).filter((k) => !['properties', 'kind', 'id', 'name', 'type', 'location', 'tags'].includes(k));
  if (extra.length) throw invalid(`Could not find member '${extra[0]}' on object of type 'StringDictionary'`);
  const { properties } = parsed;
  if (!properties || typeof properties !== 'object' || Array.isArray(properties)) throw invalid("The member 'properties' must be a JSON object of string values");
  for (const [k, v] of Object.entries(properties)) {
    if (typeof v !== 'string') throw invalid(`The value of app setting '${k}' must be a string, got ${v === null ? 'null' : typeof v}`);
  }
  return { ...properties };
}

// ---------------------------------------------------------------------------------------------
// Paged lists

/**
 * One page of `items` (each answered as `body(item)`): from the offset in the request's
 * $skiptoken, at most $top or ctx.pageSize of them, and a nextLink while more remain.
 */
function listPage(ctx, req, url, items, body) {
  const list = listId(url.pathname);
  const token = url.searchParams.get('$skiptoken');
  const offset = token === null ? 0 : readSkipToken(ctx, token, list);
  const top = readTop(url.searchParams.get('$top'));
  const size = top ?? ctx.pageSize;
  const page = { value: items.slice(offset, offset + size).map(body) };
  if (offset + size < items.length) {
    const query = new URLSearchParams({ 'api-version': url.searchParams.get('api-version') });
    if (top !== null) query.set('$top', String(top));
    query.set('$skiptoken', skipToken(ctx, list, offset + size));
    page.nextLink = `${requestOrigin(ctx, req)}${url.pathname}?${query}`;
  }
  return page;
}

/** Which list a token belongs to: the collection path, case-insensitive as ARM's names are. */
const listId = (pathname) => createHash('sha256').update(pathname.toLowerCase().replace(/\/+$/, '')).digest('base64url').slice(0, 16);

const skipTokenMac = (ctx, payload) => createHmac('sha256', ctx.skipKey).update(payload).digest('base64url').slice(0, 22);

function skipToken(ctx, list, offset) {
  const payload = Buffer.from(JSON.stringify({ offset, listId: list })).toString('base64url');
  return `${payload}.${skipTokenMac(ctx, payload)}`;
}

/** The offset of a token this start issued for this list; anything else is 400 InvalidSkipToken. */
function readSkipToken(ctx, token, list) {
  const invalid = () => armError(400, 'InvalidSkipToken', "The value of the '$skiptoken' query parameter is not valid. Use the nextLink of the previous page as it was returned.");
  const m = /^([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]{22})$/.exec(token);
  if (!m || skipTokenMac(ctx, m[1]) !== m[2]) throw invalid();
  let parsed;
  try {
    parsed = JSON.parse(Buffer.from(m[1], 'base64url').toString('utf8'));
  } catch {
    throw invalid();
  }
  if (parsed?.listId !== list || !Number.isInteger(parsed.offset) || parsed.offset < 0) throw invalid();
  return parsed.offset;
}

/** $top: absent (null) or a page size 1..MAX_TOP. */
function readTop(raw) {
  if (raw === null) return null;
  if (!/^\d{1,4}$/.test(raw) || Number(raw) < 1 || Number(raw) > MAX_TOP) {
    throw armError(400, 'InvalidParameter', `The value '${raw.slice(0, 40)}' of the '$top' query parameter is not valid. It must be an integer between 1 and ${MAX_TOP}.`);
  }
  return Number(raw);
}

/** The origin the request reached: http:// and its Host header; the stand-in's own when absent or odd. */
function requestOrigin(ctx, req) {
  const host = req.headers.host;
  return typeof host === 'string' && /^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:\d{1,5})?$/.test(host) ? `http://${host}` : ctx.url;
}

// ---------------------------------------------------------------------------------------------
// Long-running operations

function operationUrls(ctx, sub, location, id, apiVersion) {
  const base = `${ctx.url}/subscriptions/${sub.id}/providers/Microsoft.Web/locations/${location}`;
  const q = `api-version=${encodeURIComponent(apiVersion)}`;
  return { status: `${base}/operationResults/${id}?${q}`, location: `${base}/operations/${id}?${q}` };
}

function startRestart(ctx, sub, rg, site, apiVersion) {
  const id = randomUUID();
  const location = normalLocation(site.location);
  site.state = 'Stopped';
  site.lastModified = new Date().toISOString();
  ctx.operations.set(id, {
    id, sub: sub.id, location, status: 'InProgress', polls: 0, startTime: new Date().toISOString(), endTime: null,
    siteId: siteId(sub, rg, site), site,
  });
  const urls = operationUrls(ctx, sub, location, id, apiVersion);
  return {
    status: 202,
    body: undefined,
    headers: { 'azure-asyncoperation': urls.status, location: urls.location, 'retry-after': String(ctx.retryAfterSeconds) },
  };
}

/** One poll of an operation (either URL): InProgress for the first pollsBeforeDone polls. */
function pollOperation(ctx, sub, route, apiVersion) {
  const op = ctx.operations.get(route.id.toLowerCase()) ?? ctx.operations.get(route.id);
  if (!op || op.sub.toLowerCase() !== sub.id.toLowerCase() || op.location !== normalLocation(route.location)) {
    throw armError(404, 'NotFound', `The operation '${route.id}' was not found.`);
  }
  op.polls += 1;
  if (op.status === 'InProgress' && op.polls > ctx.pollsBeforeDone) {
    op.status = 'Succeeded';
    op.endTime = new Date().toISOString();
    op.site.state = 'Running';
    op.site.lastModified = op.endTime;
  }
  const urls = operationUrls(ctx, sub, op.location, op.id, apiVersion);
  const retry = { 'retry-after': String(ctx.retryAfterSeconds) };
  if (route.name === 'operation location') {
    return op.status === 'InProgress'
      ? { status: 202, body: undefined, headers: { location: urls.location, ...retry } }
      : { status: 204, body: undefined };
  }
  const body = {
    id: `/subscriptions/${sub.id}/providers/Microsoft.Web/locations/${op.location}/operationResults/${op.id}`,
    name: op.id,
    status: op.status,
    startTime: op.startTime,
    ...(op.endTime ? { endTime: op.endTime } : {}),
  };
  return { status: 200, body, headers: op.status === 'InProgress' ? retry : {} };
}

// ---------------------------------------------------------------------------------------------
// Control surface

async function control(ctx, req, res, path) {
  const ok = (body) => send(res, 200, body);
  const bad = (status, message) => send(res, status, { error: message });
  try {
    switch (`${req.method} ${path}`) {
      case 'GET stats': return ok(ctx.stats);
      case 'DELETE stats': ctx.stats = emptyStats(); return ok(ctx.stats);
      case 'GET requests': return ok(ctx.requests);
      case 'DELETE requests': ctx.requests.length = 0; return ok([]);
      case 'GET faults': return ok({ fault: ctx.fault });
      case 'DELETE faults': ctx.fault = null; return ok({ fault: null });
      case 'POST faults': {
        let parsed;
        try {
          parsed = JSON.parse((await readBody(req)).toString('utf8'));
        } catch {
          return bad(400, 'the fault must be JSON');
        }
        try {
          ctx.fault = normalizeFault(parsed);
        } catch (err) {
          return bad(400, err.message);
        }
        return ok({ fault: ctx.fault });
      }
      case 'GET resources': return ok(modelSnapshot(ctx));
      default: return bad(404, `no control route ${req.method} /__control/${path}`);
    }
  } catch (err) {
    return bad(500, err.message);
  }
}

function emptyStats() {
  return { requests: 0, byRoute: {}, byStatus: {}, faultsInjected: 0, jwksFetches: 0 };
}
const bump = (counts, key) => { counts[key] = (counts[key] ?? 0) + 1; };

function delay(ctx, ms) {
  return new Promise((resolveDelay) => {
    const timer = setTimeout(() => {
      ctx.timers.delete(timer);
      resolveDelay();
    }, ms);
    ctx.timers.add(timer);
  });
}

function readBody(req) {
  return new Promise((resolveBody, rejectBody) => {
    let size = 0;
    const chunks = [];
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        rejectBody(armError(413, 'RequestEntityTooLarge', `The request content is larger than ${MAX_BODY} bytes.`));
        req.resume();
      } else chunks.push(chunk);
    });
    req.on('end', () => resolveBody(Buffer.concat(chunks)));
    req.on('error', rejectBody);
  });
}

/** http://127.0.0.1:8400/{tenant}/discovery/v2.0/keys → http://127.0.0.1:8400/{tenant} */
function defaultAuthorizationUri(jwksUrl) {
  const u = new URL(jwksUrl);
  const tenant = u.pathname.split('/').filter(Boolean)[0];
  return tenant ? `${u.origin}/${tenant}` : u.origin;
}

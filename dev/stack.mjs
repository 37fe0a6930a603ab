/**
 * The whole local Azure-like stack: Entra-like issuer, Azurite (Blob and Queue) over HTTPS, the
 * Service Bus stand-in (dev/servicebus), optionally the Resource Manager stand-in (dev/arm.mjs),
 * and the gateway worker.
 *
 * Why one function: the dev orchestrator (dev/up.mjs) and the end-to-end tests must run the very
 * same wiring — a fresh random client secret per start, registered in the issuer for client
 * `dev-gateway` and handed to the worker as the secret DEV_CLIENT_SECRET; Azurite trusted by
 * workerd; container `uploads` created with a real storage token; the Service Bus stand-in checking
 * tokens against the issuer's JWKS. If any part fails, the parts already started are stopped
 * before the error (labelled with the part's name) propagates.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { startArm } from './arm.mjs';
import { createContainer, createQueue, startAzurite, startAzuriteQueue } from './azurite.mjs';
import { startGateway } from './gateway.mjs';
import { requestToken, startIssuer } from './issuer.mjs';
import { REPO_ROOT } from './proc.mjs';
import { DEFAULT_ENTITIES, startServiceBus } from './servicebus.mjs';

export const TENANT = '11111111-2222-3333-4444-555555555555';
export const CLIENT_ID = 'dev-gateway';
export const STORAGE_AUDIENCE = 'https://storage.azure.com';
export const SERVICEBUS_AUDIENCE = 'https://servicebus.azure.net';
export const EVENTHUBS_AUDIENCE = 'https://eventhubs.azure.net';
export const ARM_AUDIENCE = 'https://management.azure.com';
export const CONTAINER = 'uploads';
/** Storage queues the stack creates in Azurite's queue service unless `queues` says otherwise. */
export const QUEUES = ['jobs'];
export const DEFAULT_PORTS = { issuer: 8400, azurite: 10000, queue: 10001, serviceBus: 8410, arm: 8420, gateway: 8787 };
/** Queues of the Service Bus stand-in unless serviceBus.entities says otherwise. */
export const SERVICEBUS_ENTITIES = DEFAULT_ENTITIES;
export const DEFAULT_STATE_DIR = join(REPO_ROOT, 'dev', '.state');

/**
 * Start issuer, Azurite Blob, Azurite Queue (unless queue: false), the Service Bus stand-in (unless
 * serviceBus: false), the Resource Manager stand-in (only with arm: true or arm: { …startArm
 * options }) and (unless gateway: false) the worker.
 * Returns { tenant, clientId, clientSecret, secretPath, apiKey, apiKeyPath, stateDir, issuer, azurite,
 * queue, serviceBus, arm, gateway, stop } (queue and arm null when left out). The worker gets secrets DEV_CLIENT_SECRET and DEV_API_KEY
 * (dev/policy.json's inbound key), both random per start and also written to
 * <stateDir>/client-secret and /api-key.
 * Options passed through: gatewayVars / gatewaySecrets (more Worker vars and secrets),
 * clients (more issuer clients, as startIssuer takes them), issuerOptions (e.g. lifetimeSeconds),
 * gatewayOptions (extra startGateway options), log (one-line progress messages),
 * onLog ({ azurite, serviceBus, gateway } line callbacks),
 * serviceBus (options of startServiceBus in dev/servicebus.mjs, e.g. { entities: ['orders',
 * 'dedup:duplicate-detection=60'] }; default SERVICEBUS_ENTITIES; false to leave it out).
 * ports.serviceBus defaults to ports.issuer + 10 when only the issuer's port is given (tests on
 * 18400 get 18410), else 8410; likewise ports.arm to ports.issuer + 20 (else 8420) and ports.queue
 * to ports.azurite + 1 (else 10001). The stand-ins' URLs are handed to nothing: tests and policies
 * that use them name them themselves.
 * queues: names created in the queue service with a storage token (default QUEUES). The queue
 * service shares Azurite's certificate, so the worker trusts both.
 * arm: the Resource Manager stand-in checks tokens against this issuer's JWKS; its options
 * (subscriptions, pollsBeforeDone, …) pass through, jwksUrl and port are set here.
 */
export async function startStack({
  policyPath,
  ports = {},
  stateDir = DEFAULT_STATE_DIR,
  gateway: withGateway = true,
  gatewayVars = {},
  gatewaySecrets = {},
  gatewayOptions = {},
  clients = {},
  issuerOptions = {},
  serviceBus: serviceBusOptions = {},
  queue: withQueue = true,
  queues = QUEUES,
  arm: armOptions = false,
  log = () => {},
  onLog = {},
} = {}) {
  const port = { ...DEFAULT_PORTS, ...ports };
  if (ports.serviceBus === undefined && ports.issuer !== undefined) port.serviceBus = ports.issuer + 10;
  if (ports.arm === undefined && ports.issuer !== undefined) port.arm = ports.issuer + 20;
  if (ports.queue === undefined && ports.azurite !== undefined) port.queue = ports.azurite + 1;
  const dir = resolve(stateDir);
  mkdirSync(dir, { recursive: true });
  const clientSecret = randomBytes(32).toString('base64url');
  const secretPath = writeSecret(dir, 'client-secret', clientSecret);
  const apiKey = randomBytes(24).toString('base64url');
  const apiKeyPath = writeSecret(dir, 'api-key', apiKey);

  const started = [];
  const stop = async () => {
    for (const part of started.reverse()) await part.stop().catch(() => {});
    started.length = 0;
  };
  const step = async (name, start) => {
    const t0 = Date.now();
    try {
      const handle = await start();
      if (handle?.stop) started.push(handle);
      log(`${name} ready in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      return handle;
    } catch (err) {
      await stop();
      err.message = `[${name}] ${err.message}`;
      err.part = name;
      throw err;
    }
  };

  const issuer = await step('issuer', () =>
    startIssuer({ port: port.issuer, tenant: TENANT, clients: { [CLIENT_ID]: clientSecret, ...clients }, log, ...issuerOptions }));
  const arm = armOptions
    ? await step('arm', () => startArm({
      port: port.arm,
      jwksUrl: issuer.jwksUrl,
      log: onLog.arm,
      ...(armOptions === true ? {} : armOptions),
    }))
    : null;
  const azurite = await step('azurite', () => startAzurite({ port: port.azurite, stateDir: dir, onLog: onLog.azurite }));
  await step('container', async () => {
    const token = await storageToken(issuer, clientSecret);
    await createContainer(azurite.url, CONTAINER, token, { ca: azurite.ca });
  });
  const queue = withQueue
    ? await step('azurite-queue', () => startAzuriteQueue({ port: port.queue, stateDir: dir, onLog: onLog.queue }))
    : null;
  if (queue && queues.length) {
    await step('queues', async () => {
      const token = await storageToken(issuer, clientSecret);
      for (const name of queues) await createQueue(queue.url, name, token, { ca: queue.ca });
    });
  }
  const serviceBus = serviceBusOptions === false
    ? null
    : await step('servicebus', () => startServiceBus({
      port: port.serviceBus,
      jwksUrl: issuer.jwksUrl,
      stateDir: dir,
      onLog: onLog.serviceBus,
      ...serviceBusOptions,
    }));
  const gateway = withGateway
    ? await step('gateway', () => startGateway({
      policyPath,
      port: port.gateway,
      stateDir: join(dir, 'gateway'),
      secrets: { DEV_CLIENT_SECRET: clientSecret, DEV_API_KEY: apiKey, ...gatewaySecrets },
      vars: gatewayVars,
      caCertPaths: [azurite.certPath],
      onLog: onLog.gateway,
      ...gatewayOptions,
    }))
    : null;

  return {
    tenant: TENANT, clientId: CLIENT_ID, clientSecret, secretPath, apiKey, apiKeyPath,
    stateDir: dir, issuer, azurite, queue, serviceBus, arm, gateway, stop,
  };
}

/** A storage-audience access token for `dev-gateway` (v2 endpoint). */
export async function storageToken(issuer, clientSecret) {
  const res = await requestToken(issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: clientSecret, scope: `${STORAGE_AUDIENCE}/.default` });
  if (res.status !== 200) throw new Error(`storage token: HTTP ${res.status} ${res.body.error}`);
  return res.body.access_token;
}

/** A Service Bus-audience access token for `dev-gateway` (v2 endpoint). */
export async function serviceBusToken(issuer, clientSecret) {
  const res = await requestToken(issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: clientSecret, scope: `${SERVICEBUS_AUDIENCE}/.default` });
  if (res.status !== 200) throw new Error(`service bus token: HTTP ${res.status} ${res.body.error}`);
  return res.body.access_token;
}

/** A Resource Manager-audience access token for `dev-gateway` (v2 endpoint). */
export async function armToken(issuer, clientSecret) {
  const res = await requestToken(issuer.tokenUrlV2, { clientId: CLIENT_ID, secret: clientSecret, scope: `${ARM_AUDIENCE}/.default` });
  if (res.status !== 200) throw new Error(`resource manager token: HTTP ${res.status} ${res.body.error}`);
  return res.body.access_token;
}

/** A secret goes to a 0600 file without trailing newline, so curl can read it with @file. */
function writeSecret(dir, name, secret) {
  const path = join(dir, name);
  writeFileSync(path, secret, { mode: 0o600 });
  return path;
}

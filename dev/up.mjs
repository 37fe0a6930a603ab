#!/usr/bin/env node
/**
 * `node dev/up.mjs [--policy FILE] [--no-gateway]`: run the local Azure-like stack until Ctrl-C.
 *
 * Why: one command gives a developer the same stack the end-to-end tests use (issuer on 8400,
 * Azurite Blob on 10000 and Queue on 10001, the Service Bus stand-in on 8410, the Resource Manager
 * stand-in on 8420, the gateway worker on 8787, state in dev/.state), prints where each part listens plus ready-to-paste curl commands, echoes the
 * worker's and the stand-in's log lines, and on SIGINT/SIGTERM
 * stops everything it started and exits 0. If a part does not become healthy in time (or dies
 * later), it says which one and why, stops the rest and exits 1.
 * Run it with scripts/env.sh sourced (Node 22 first on PATH).
 */
import { existsSync } from 'node:fs';
import { relative, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { BLOB_API_VERSION } from './azurite.mjs';
import { REPO_ROOT } from './proc.mjs';
import { DEFAULT_RESOURCE_GROUP, DEFAULT_SITE, DEFAULT_SUBSCRIPTION } from './arm.mjs';
import {
  ARM_AUDIENCE, CLIENT_ID, CONTAINER, DEFAULT_PORTS, QUEUES, SERVICEBUS_AUDIENCE, SERVICEBUS_ENTITIES, STORAGE_AUDIENCE, startStack,
} from './stack.mjs';

const BUILD_TIMEOUT_MS = 300_000; // a cold cargo build of the worker on 2 shared cores
const WRANGLER_START_TIMEOUT_MS = 30_000;

const { values: args } = parseArgs({
  options: {
    policy: { type: 'string', default: resolve(REPO_ROOT, 'dev', 'policy.json') },
    'no-gateway': { type: 'boolean', default: false },
    help: { type: 'boolean', short: 'h', default: false },
  },
});
if (args.help) {
  console.log('usage: node dev/up.mjs [--policy FILE] [--no-gateway]');
  process.exit(0);
}

const say = (line) => console.log(`[up] ${line}`);
if (!args['no-gateway'] && !existsSync(resolve(args.policy))) {
  console.error(`[up] policy file not found: ${resolve(args.policy)}`);
  process.exit(1);
}
const t0 = Date.now();
let stack;
try {
  stack = await startStack({
    policyPath: resolve(args.policy),
    gateway: !args['no-gateway'],
    log: say,
    onLog: { gateway: (line) => console.log(`[gateway] ${line}`), serviceBus: (line) => console.log(`[servicebus] ${line}`) },
    gatewayOptions: { buildTimeoutMs: BUILD_TIMEOUT_MS, startTimeoutMs: WRANGLER_START_TIMEOUT_MS },
    serviceBus: { buildTimeoutMs: BUILD_TIMEOUT_MS },
    arm: { log: (line) => console.log(`[arm] ${line.replace(/^arm: /, '')}`) },
  });
} catch (err) {
  console.error(`[up] ${err.part ?? 'stack'} did not become healthy; everything started was stopped.\n${err.message}`);
  process.exit(1);
}

printSummary(stack, ((Date.now() - t0) / 1000).toFixed(1));
watchForCrashes(stack);
for (const signal of ['SIGINT', 'SIGTERM']) process.once(signal, () => shutdown(0, `${signal} received`));

let stopping = false;
async function shutdown(code, why) {
  if (stopping) return;
  stopping = true;
  say(`${why}; stopping the stack`);
  await stack.stop();
  say('stopped');
  process.exit(code);
}

/** A child that exits while the stack is up is a failure: report its last lines and stop. */
function watchForCrashes({ azurite, queue, serviceBus, gateway }) {
  const watch = (name, part) => part?.exited.then((info) => {
    if (stopping) return;
    console.error(`[up] ${name} exited unexpectedly (${info.code ?? info.signal}); last lines:\n${part.tail(20)}`);
    shutdown(1, `${name} died`);
  });
  watch('azurite', azurite);
  watch('azurite-queue', queue);
  watch('servicebus', serviceBus);
  watch('gateway', gateway);
}

function printSummary({ issuer, azurite, queue, serviceBus, arm, gateway, secretPath, apiKeyPath, stateDir }, seconds) {
  const rel = (p) => relative(process.cwd(), p) || '.';
  const cert = rel(azurite.certPath);
  const tokenCmd = [
    `curl -s ${issuer.tokenUrlV2}`,
    '-d grant_type=client_credentials',
    `-d client_id=${CLIENT_ID}`,
    `--data-urlencode client_secret@${rel(secretPath)}`,
    `-d scope=${STORAGE_AUDIENCE}/.default`,
  ].join(' ');
  const sbTokenCmd = tokenCmd.replace(`scope=${STORAGE_AUDIENCE}/.default`, `scope=${SERVICEBUS_AUDIENCE}/.default`);
  const armTokenCmd = tokenCmd.replace(`scope=${STORAGE_AUDIENCE}/.default`, `scope=${ARM_AUDIENCE}/.default`);
  const siteUrl = `${arm.url}/subscriptions/${DEFAULT_SUBSCRIPTION}/resourceGroups/${DEFAULT_RESOURCE_GROUP}/providers/Microsoft.Web/sites/${DEFAULT_SITE}`;
  console.log(`
Local stack ready in ${seconds} s (state in ${rel(stateDir)})
  issuer   token v2  ${issuer.tokenUrlV2}
           token v1  ${issuer.tokenUrlV1}
           JWKS      ${issuer.jwksUrl}
           control   ${issuer.url}/__control/stats  (POST/DELETE ${issuer.url}/__control/faults)
           client    ${CLIENT_ID}, secret in ${rel(secretPath)} (new each start)
  azurite  ${azurite.url}  (container ${CONTAINER}; certificate ${cert})
  queue    ${queue.url}  (Azurite's queue service; queues ${QUEUES.join(', ')}; same certificate)
  servicebus ${serviceBus.url}  (stand-in; ${SERVICEBUS_ENTITIES.map(describeEntity).join(', ')}; control ${serviceBus.url}/__control/stats)
  arm      ${arm.url}  (Resource Manager stand-in; site ${DEFAULT_SITE} in ${DEFAULT_RESOURCE_GROUP}; control ${arm.url}/__control/requests)
  gateway  ${gateway ? `${gateway.url}  (policy ${rel(resolve(args.policy))}; API key in ${rel(apiKeyPath)})` : 'not started (--no-gateway)'}

Try:
  ${tokenCmd} | jq .
  TOKEN=$(${tokenCmd} | jq -r .access_token)
  curl -s --cacert ${cert} -H "Authorization: Bearer $TOKEN" -H "x-ms-version: ${BLOB_API_VERSION}" "${azurite.url}/${CONTAINER}?restype=container&comp=list"
  ${gateway ? gatewayCommands(gateway.url, rel(apiKeyPath)) : `# (gateway not started; default port ${DEFAULT_PORTS.gateway})`}
  SBTOKEN=$(${sbTokenCmd} | jq -r .access_token)
  curl -i -X DELETE -H "Authorization: Bearer $SBTOKEN" "${serviceBus.url}/orders/messages/head?timeout=5"   # read one message back (204: none)
  ARMTOKEN=$(${armTokenCmd} | jq -r .access_token)
  curl -s -H "Authorization: Bearer $ARMTOKEN" "${siteUrl}?api-version=2023-01-01" | jq .properties.state
  curl -s -H "Authorization: Bearer $TOKEN" -H "x-ms-version: ${BLOB_API_VERSION}" --cacert ${cert} "${queue.url}/${QUEUES[0]}/messages?numofmessages=32&peekonly=true"
  curl -s ${issuer.url}/__control/stats | jq .

Ctrl-C stops everything.`);
}

/** 'orders' → queue orders; 'telemetry:partitions=4' → event hub telemetry (4 partitions). */
function describeEntity(spec) {
  const [name, options = ''] = spec.split(':');
  const partitions = /(?:^|,)partitions=(\d+)/.exec(options)?.[1];
  return partitions ? `event hub ${name} (${partitions} partitions)` : `queue ${name}`;
}

/**
 * Requests matching dev/policy.json's routes: upload a file, read it back, a refusal, an order,
 * a Storage queue message (read back with the peek line above) and events to the event hub.
 */
function gatewayCommands(url, apiKeyPath) {
  const key = `-H "x-api-key: $(cat ${apiKeyPath})"`;
  return [
    `curl -i -X PUT ${url}/files/hello.txt ${key} -H 'content-type: text/plain' --data-binary 'hello from the gateway'`,
    `curl -i ${url}/files/hello.txt ${key}`,
    `curl -i -X PUT ${url}/files/hello.txt --data-binary 'no key'   # 401 problem+json`,
    `curl -i -X POST ${url}/orders/contoso ${key} -H 'content-type: application/json' -H 'idempotency-key: order-1' --data-binary '{"order": 1}'`,
    `curl -i -X POST ${url}/jobs ${key} --data-binary '{"job": "resize", "id": 7}'   # 202 {"status","queue","message_id",…}`,
    `curl -i -X POST ${url}/telemetry/dev-7 ${key} -H 'content-type: application/json' --data-binary '{"t": 21.5}'   # 202 {"status","hub","count":1}`,
    `curl -i -X POST ${url}/telemetry/dev-7/batch ${key} --data-binary '[{"Body": {"t": 21.5}}, {"Body": {"t": 21.7}}]'`,
    `curl -s ${url}/webapps/${DEFAULT_SITE} ${key}   # Resource Manager, projected: name, state, last modified`,
    `curl -si -X POST ${url}/webapps/${DEFAULT_SITE}/restart ${key} | grep -i '^location'   # 202; follow it:`,
    `curl -s ${url}$(curl -si -X POST ${url}/webapps/${DEFAULT_SITE}/restart ${key} | tr -d '\\r' | sed -n 's/^location: //Ip') ${key}   # {"status": "InProgress"}, then "Succeeded"`,
  ].join('\n  ');
}

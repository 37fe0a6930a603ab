/**
 * The Service Bus stand-in (dev/servicebus, a small Rust server) for the local stack.
 *
 * Why a stand-in: no Service Bus emulator speaks the REST API (Microsoft's is a container and
 * AMQP-only), so dev/servicebus enforces the documented send contract strictly (Entra tokens
 * checked against the issuer's JWKS, BrokerProperties, sizes, duplicate detection) and keeps what
 * it accepted in memory. Tests send through the gateway and read messages back from it, either
 * the Azure way (receive with a Service Bus token) or from its control surface (/__control/*).
 *
 * The binary is built with `cargo build --release -p servicebus-standin` (a no-op when up to
 * date) into target/release/servicebus-standin, then run on 127.0.0.1:port.
 */
import { existsSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { REPO_ROOT, after, spawnService } from './proc.mjs';

/** Where `cargo build --release` puts it: under $CARGO_TARGET_DIR when set (relative to the repository), else target/. */
export const SERVICEBUS_BIN = join(resolve(REPO_ROOT, process.env.CARGO_TARGET_DIR || 'target'), 'release', 'servicebus-standin');
/** Entities of the dev stack: queues (plain, with duplicate detection (60 s), plain) and an event hub of 4 partitions. */
export const DEFAULT_ENTITIES = ['orders', 'orders-dedup:duplicate-detection=60', 'events', 'telemetry:partitions=4'];
const READY = /^servicebus-standin listening on (http:\/\/\S+)$/;

/**
 * Start the stand-in. entities: strings in the binary's `NAME[:option=value,...]` syntax, or
 * objects { name, duplicateDetectionSeconds, maxSizeBytes, lockDurationSeconds, partitions }
 * (partitions: an event hub, sent to with an https://eventhubs.azure.net token).
 * Options: build (default true: run cargo first), buildTimeoutMs, startTimeoutMs, issuerPrefix,
 * stateDir (its working directory; it writes nothing), onLog (each output line).
 * Returns { url, port, pid, logs, tail, exited, stop, stats, resetStats, setFault, clearFaults,
 * setOutage, clearOutage, outage, messages, purge, receive, complete }.
 */
export async function startServiceBus({
  port = 8410,
  jwksUrl,
  entities = DEFAULT_ENTITIES,
  stateDir = REPO_ROOT,
  issuerPrefix,
  onLog,
  build = true,
  buildTimeoutMs = 300_000,
  startTimeoutMs = 10_000,
} = {}) {
  if (!jwksUrl) throw new Error('startServiceBus: jwksUrl is required');
  if (build) await buildStandIn({ timeoutMs: buildTimeoutMs, onLog });
  else if (!existsSync(SERVICEBUS_BIN)) throw new Error(`${SERVICEBUS_BIN} not built (build: false)`);

  const args = ['--port', String(port), '--jwks-url', jwksUrl];
  if (issuerPrefix) args.push('--issuer-prefix', issuerPrefix);
  for (const entity of entities) args.push('--entity', entitySpec(entity));
  const service = spawnService({ name: 'servicebus', command: SERVICEBUS_BIN, args, cwd: stateDir, env: process.env, onLine: onLog });
  let url;
  try {
    url = READY.exec(await service.waitForLog((line) => READY.test(line), startTimeoutMs))[1];
  } catch (err) {
    await service.stop();
    err.message += `\n--- servicebus-standin output ---\n${service.tail()}`;
    throw err;
  }
  return {
    url,
    port: Number(new URL(url).port),
    pid: service.pid,
    logs: service.logs,
    tail: service.tail,
    exited: service.exited,
    stop: () => service.stop(),
    ...controlClient(url),
  };
}

/** `cargo build --release -p servicebus-standin`, bounded by timeoutMs; throws with its output. */
export async function buildStandIn({ timeoutMs = 300_000, onLog } = {}) {
  const cargo = spawnService({
    name: 'cargo build servicebus-standin',
    command: 'cargo',
    args: ['build', '--release', '-p', 'servicebus-standin'],
    cwd: REPO_ROOT,
    env: process.env,
    onLine: onLog && ((line) => onLog(`[build] ${line}`)),
  });
  const result = await Promise.race([cargo.exited, after(timeoutMs, 'timeout')]);
  if (result === 'timeout') {
    await cargo.stop();
    throw new Error(`servicebus-standin build did not finish within ${timeoutMs} ms\n--- build output ---\n${cargo.tail(30)}`);
  }
  if (result.code !== 0) {
    throw new Error(`servicebus-standin build failed (exit ${result.code ?? result.signal})\n--- build output ---\n${cargo.tail(30)}`);
  }
  return SERVICEBUS_BIN;
}

/** An entity as the binary's --entity value. */
export function entitySpec(entity) {
  if (typeof entity === 'string') return entity;
  const { name, duplicateDetectionSeconds, maxSizeBytes, lockDurationSeconds, partitions } = entity;
  const options = [
    duplicateDetectionSeconds !== undefined && `duplicate-detection=${duplicateDetectionSeconds}`,
    maxSizeBytes !== undefined && `max-size=${maxSizeBytes}`,
    lockDurationSeconds !== undefined && `lock-duration=${lockDurationSeconds}`,
    partitions !== undefined && `partitions=${partitions}`,
  ].filter(Boolean);
  return options.length ? `${name}:${options.join(',')}` : name;
}

/** Helpers over a running stand-in's HTTP surface (control routes and the Azure read side). */
export function controlClient(url) {
  const control = async (method, path, body) => {
    const res = await fetch(`${url}/__control/${path}`, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(10_000),
    });
    const json = await res.json();
    if (!res.ok) throw new Error(`${method} /__control/${path}: HTTP ${res.status} ${json.error ?? ''}`);
    return json;
  };
  return {
    /** { requests, bytesReceived (their bodies), unknownEntity, faultsInjected, faultsAfterStore, entities: { name: { accepted, duplicates, rejected: { status: n }, received, completed, arrived, answersLost, arrivedAfterAck, depth, locked } } } */
    stats: () => control('GET', 'stats'),
    resetStats: () => control('DELETE', 'stats'),
    /**
     * { status?, retryAfter?, delayMs?, count = 1, entity? }: the next count sends answer status
     * (after delayMs). With probability (and seed), each send fails with that probability. With
     * storedShare (0..1; storedStatus = 500, storedDelayMs), that share of the failures comes
     * after the message is stored: the answer is lost, the message kept.
     */
    setFault: (fault) => control('POST', 'faults', fault),
    clearFaults: () => control('DELETE', 'faults'),
    /** { seconds, status = 503, retryAfter? }: every request but /__control/* answers status that long. */
    setOutage: (outage) => control('POST', 'outage', outage),
    clearOutage: () => control('DELETE', 'outage'),
    /** { outage: { status, retryAfter, remainingSeconds } | null } */
    outage: () => control('GET', 'outage'),
    /** Every stored message of an entity (not removed), oldest first; body decoded to a Buffer (an event hub's have partitionId). */
    messages: async (entity) => (await control('GET', `messages/${encodeURIComponent(entity)}`))
      .map((m) => ({ ...m, body: Buffer.from(m.body, 'base64') })),
    /**
     * The arrivals ledger of an entity: MessageId → { arrived, refused, stored, duplicates,
     * answersLost, acknowledged, afterAck }, counted before duplicate detection (see
     * dev/servicebus/src/lib.rs).
     */
    arrivals: (entity) => control('GET', `arrivals/${encodeURIComponent(entity)}`),
    /** Drop every message, lock, remembered MessageId and arrival of every entity. */
    purge: () => control('DELETE', 'messages'),
    /**
     * Receive the Azure way with a Service Bus token: receive-and-delete, or peek-lock with
     * peekLock: true. Resolves { status, headers, body (Buffer), brokerProperties, location }.
     */
    receive: async (entity, token, { timeout = 0, peekLock = false } = {}) => {
      const res = await fetch(`${url}/${entity}/messages/head?timeout=${timeout}`, {
        method: peekLock ? 'POST' : 'DELETE',
        headers: { authorization: `Bearer ${token}` },
        signal: AbortSignal.timeout((timeout + 10) * 1000),
      });
      const body = Buffer.from(await res.arrayBuffer());
      const broker = res.headers.get('brokerproperties');
      return { status: res.status, headers: res.headers, body, brokerProperties: broker ? JSON.parse(broker) : null, location: res.headers.get('location') };
    },
    /** Complete a peek-locked message by its Location; resolves the HTTP status. */
    complete: async (location, token) => {
      const res = await fetch(new URL(location, url), { method: 'DELETE', headers: { authorization: `Bearer ${token}` } });
      await res.arrayBuffer();
      return res.status;
    },
  };
}

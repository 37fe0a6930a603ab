/**
 * Entry point of the local stack for end-to-end tests. The implementation lives in dev/ so that the
 * dev orchestrator (dev/up.mjs) and the tests share one wiring; this module only re-exports it.
 */
export {
  startStack,
  storageToken,
  armToken,
  serviceBusToken,
  TENANT,
  CLIENT_ID,
  STORAGE_AUDIENCE,
  SERVICEBUS_AUDIENCE,
  EVENTHUBS_AUDIENCE,
  ARM_AUDIENCE,
  CONTAINER,
  QUEUES,
  DEFAULT_PORTS,
} from '../../dev/stack.mjs';
export { requestToken } from '../../dev/issuer.mjs';
export {
  blobRequest, createContainer, BLOB_API_VERSION,
  createQueue, putQueueMessage, peekQueueMessages, parseQueueMessagesList, decodeBase64Text, QUEUE_API_VERSION,
} from '../../dev/azurite.mjs';

/**
 * A caller of a running stack's gateway, with its API key: `call(method, path, { body, headers,
 * signal })` (`signal`: the caller hangs up when it aborts) resolves { status, headers, text, json (null when not JSON) }, never following a redirect;
 * `logOf(res)` the gateway's log line of that answer (by its x-request-id). `stack()` is read at
 * each call, so the client can be made before the stack is up.
 */
export function gatewayClient(stack, { timeoutMs = 30_000 } = {}) {
  const call = async (method, path, { body, headers = {}, signal } = {}) => {
    const { gateway, apiKey } = stack();
    const timeout = AbortSignal.timeout(timeoutMs);
    const res = await fetch(`${gateway.url}${path}`, {
      method,
      body,
      headers: { 'x-api-key': apiKey, ...headers },
      redirect: 'manual',
      signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
    });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, headers: res.headers, text, json };
  };
  const logOf = async (res) => {
    const id = res.headers.get('x-request-id');
    return JSON.parse(await stack().gateway.waitForLog((_l, j) => j?.request_id === id && 'status' in j, 10_000));
  };
  return { call, logOf };
}

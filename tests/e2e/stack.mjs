/**
 * Entry point of the local stack for end-to-end tests. The implementation lives in dev/ so that the
 * dev orchestrator (dev/up.mjs) and the tests share one wiring; this module only re-exports it.
 */
export {
  startStack,
  storageToken,
  TENANT,
  CLIENT_ID,
  STORAGE_AUDIENCE,
  SERVICEBUS_AUDIENCE,
  CONTAINER,
  DEFAULT_PORTS,
} from '../../dev/stack.mjs';
export { requestToken } from '../../dev/issuer.mjs';
export { blobRequest, createContainer, BLOB_API_VERSION } from '../../dev/azurite.mjs';

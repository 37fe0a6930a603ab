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

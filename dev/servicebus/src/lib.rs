//! `servicebus-standin`: a local stand-in for the Azure Service Bus REST API, for the gateway's
//! end-to-end tests. No Service Bus emulator speaks the HTTP API (Microsoft's is a container and
//! AMQP-only), so this one enforces the documented REST contract strictly and keeps what it
//! accepted in memory, so tests can read it back.
//!
//! # Command line
//!
//! ```text
//! servicebus-standin --jwks-url http://127.0.0.1:8400/{tenant}/discovery/v2.0/keys \
//!     --entity orders --entity dedup:duplicate-detection=60 --entity events:max-size=262144 \
//!     [--port 8410] [--issuer-prefix https://sts.windows.net/]
//! ```
//!
//! `--entity NAME[:OPTION=VALUE[,OPTION=VALUE...]]`, repeatable, at least one. Options:
//! `duplicate-detection=SECONDS` (off by default), `max-size=BYTES` (body and properties,
//! default 262144), `lock-duration=SECONDS` (peek-lock, default 60), `partitions=N` (the entity
//! is an event hub with N partitions, max-size default 1048576). `--port 0` takes any free
//! port. It binds 127.0.0.1 only, prints `servicebus-standin listening on http://127.0.0.1:PORT`
//! when ready, one line per request after that, and exits 0 on SIGTERM or SIGINT.
//!
//! # Contract
//!
//! Every route but `/__control/*` needs `Authorization: Bearer <jwt>`: RS256, `kid` in the JWKS
//! (refetched at most every 10 s on an unknown kid), `aud` `https://servicebus.azure.net[/]` or
//! `http://127.0.0.1:PORT[/]`, `iss` under the issuer prefix, `nbf <= now < exp` with no skew.
//! Errors are Service Bus's XML: `<Error><Code>401</Code><Detail>ExpiredToken: … TrackingId:…,
//! SystemTracker:…, Timestamp:…</Detail></Error>`.
//!
//! - `POST /{entity}/messages` sends one message (body, `Content-Type`, optional
//!   `BrokerProperties` JSON header, other headers as custom properties) or, with
//!   `Content-Type: application/vnd.microsoft.servicebus.json`, a batch. 201 empty; 400 invalid;
//!   410 unknown entity; 413 over the entity's size. Duplicates (entity with duplicate detection)
//!   are answered 201 and not stored.
//! - `DELETE /{entity}/messages/head?timeout=N`: receive and delete (200, or 204 after waiting up
//!   to N s, default 0, at most 10). `POST` on the same path: peek-lock (201, `Location` of the
//!   lock); `DELETE` on that location completes, `PUT` abandons (200, or 404).
//! - `/__control/`: `GET stats` (`requests` and their body bytes `bytesReceived`, control
//!   requests not counted; per entity below), `DELETE stats`, `GET|POST|DELETE faults`,
//!   `GET|POST|DELETE outage`, `DELETE messages` (purge all), `GET messages/{entity}`
//!   (everything stored, body in base64; an event's `partitionId` too), `GET arrivals/{entity}`
//!   (the arrivals ledger below).
//!
//! # Faults (for the fault and load suite, `bench/faults`)
//!
//! - `POST /__control/faults {"status": 503, "count": 2, "retryAfter": 1, "delayMs": 0,
//!   "entity": "orders"}`: the next `count` sends (default 1) answer `status`.
//! - `{"status": 503, "probability": 0.1, "seed": 7}`: each send fails with that probability,
//!   drawn from a generator seeded with `seed` (default 1), so the same seed fails the same
//!   sends by position; until cleared, or `count` faults if given.
//! - `POST /__control/outage {"seconds": 10, "status": 503, "retryAfter": 2}`: every request
//!   but `/__control/*` answers `status` (default 503) for that long; `DELETE` ends it.
//!
//! - `{"status": 503, "probability": 0.1, "storedShare": 0.3, "storedStatus": 500,
//!   "storedDelayMs": 0}`: of the failures drawn, a seeded share comes *after* the message is
//!   stored (through duplicate detection): it is kept, then answered `storedStatus` (default 500,
//!   InternalServerError) after `storedDelayMs`. The sender cannot know it was taken, as when
//!   Azure stores a message and its answer is lost; `{"storedShare": 1}` alone does it to the
//!   next send.
//!
//! Any other send failed by a fault or an outage is answered before it is stored.
//! `stats.faultsInjected` counts the requests failed by either, `stats.faultsAfterStore` those
//! failed after storing, `stats.outageRejected` those an outage answered.
//!
//! # The arrivals ledger
//!
//! With duplicate detection on, what is stored cannot show a message sent twice. So each entity
//! also records, per MessageId and before duplicate detection, every arrival and its outcome:
//! `{"arrived", "refused" (by a fault or an outage, before storing), "stored", "duplicates" (dropped by
//! duplicate detection), "answersLost" (failed after storing), "acknowledged" (answered 201),
//! "afterAck" (arrived after a 201 for that id: a resend no failure explains)}`, and totals in
//! the entity's stats (`arrived`, `answersLost`, `arrivedAfterAck`). `DELETE stats` and
//! `DELETE messages` clear it.
//!
//! # Event hubs (`--entity NAME:partitions=N`)
//!
//! Event Hubs' REST send shares Service Bus's wire format, so an event hub is an entity with
//! partitions. Its requests need `aud` `https://eventhubs.azure.net[/]` (or the namespace URL); a
//! Service Bus token is refused there, and an Event Hubs token on a queue.
//! - `POST /{hub}/messages`: one event (any `Content-Type`; Azure's examples use
//!   `application/atom+xml;type=entry;charset=utf-8`) or a batch
//!   (`application/vnd.microsoft.servicebus.json`, same JSON as Service Bus). `BrokerProperties`
//!   `PartitionKey` picks the partition (a stable hash, not Azure's); otherwise round-robin.
//! - `POST /{hub}/partitions/{id}/messages`: to partition `id` (decimal, below N; else 400);
//!   a `PartitionKey` there is 400.
//! - Service Bus-only broker properties (`SessionId`, `ReplyToSessionId`, `TimeToLive`,
//!   `ScheduledEnqueueTimeUtc`, `ForcePersistence`) are 400. Stricter than Azure may be.
//! - No receive routes (Event Hubs has no REST receive): read events back with
//!   `GET /__control/messages/{hub}`. Not modelled: publisher sends
//!   (`/{hub}/publishers/{id}/messages`), SAS tokens, per-partition sequence numbers and offsets.

pub mod config;
pub mod jwt;
pub mod message;
pub mod server;
pub mod store;
pub mod util;

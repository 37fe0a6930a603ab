//! What the stand-in accepted: per entity, an ordered queue of messages with sequence numbers,
//! duplicate detection, peek-locks, and counters (for an event hub: events with the partition
//! each went to); plus injected faults for the control surface.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::config::EntityConfig;
use crate::message::NewMessage;
use crate::util::{parse_rfc1123, rfc1123, uuid_v4};

/// Azure's duplicate detection: a MessageId first accepted within the window makes a later
/// message with that id a duplicate (dropped, but answered 201). Duplicates do not extend it.
#[derive(Debug)]
pub struct DedupWindow {
    window: Duration,
    first_seen: HashMap<String, Instant>,
}

impl DedupWindow {
    pub fn new(window: Duration) -> Self {
        DedupWindow {
            window,
            first_seen: HashMap::new(),
        }
    }

    /// True when `id` was accepted less than `window` before `now`; otherwise records it.
    pub fn is_duplicate(&mut self, id: &str, now: Instant) -> bool {
        if self.first_seen.len() > 4096 {
            let window = self.window;
            self.first_seen
                .retain(|_, seen| now.saturating_duration_since(*seen) < window);
        }
        match self.first_seen.get(id) {
            Some(seen) if now.saturating_duration_since(*seen) < self.window => true,
            _ => {
                self.first_seen.insert(id.to_string(), now);
                false
            }
        }
    }

    pub fn clear(&mut self) {
        self.first_seen.clear();
    }
}

/// A message as stored: numbered, with its MessageId filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    pub sequence_number: u64,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub broker: crate::message::BrokerProperties,
    pub user: Vec<(String, String)>,
    pub enqueued: SystemTime,
    pub delivery_count: u32,
    /// The partition an event went to (event hubs only).
    pub partition: Option<u32>,
}

impl StoredMessage {
    fn scheduled(&self) -> Option<SystemTime> {
        self.broker
            .scheduled_enqueue_time_utc
            .as_deref()
            .and_then(parse_rfc1123)
    }

    fn expired(&self, now: SystemTime) -> bool {
        let ttl = self.broker.time_to_live.as_ref().and_then(|n| n.as_f64());
        let start = self.scheduled().unwrap_or(self.enqueued).max(self.enqueued);
        ttl.is_some_and(|s| start + Duration::from_secs_f64(s.min(1e10)) <= now)
    }

    /// The `BrokerProperties` a receiver sees: what the sender set plus what the broker adds.
    pub fn broker_json(&self, lock: Option<(&str, SystemTime)>) -> Map<String, Value> {
        let mut map = self.broker.to_map();
        map.insert("SequenceNumber".into(), self.sequence_number.into());
        map.insert("EnqueuedSequenceNumber".into(), self.sequence_number.into());
        map.insert("EnqueuedTimeUtc".into(), rfc1123(self.enqueued).into());
        map.insert("DeliveryCount".into(), self.delivery_count.into());
        map.insert("State".into(), "Active".into());
        if let Some((token, until)) = lock {
            map.insert("LockToken".into(), token.into());
            map.insert("LockedUntilUtc".into(), rfc1123(until).into());
        }
        map
    }
}

#[derive(Debug, Clone)]
struct Lock {
    token: String,
    until: Instant,
    message: StoredMessage,
}

/// Counters of one entity. `rejected` counts send requests answered with an error, by status.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EntityStats {
    pub accepted: u64,
    pub duplicates: u64,
    pub rejected: BTreeMap<String, u64>,
    pub received: u64,
    pub completed: u64,
    /// Messages that reached the entity, before duplicate detection (a batch counts each), and
    /// of those the ones whose answer an injected fault lost after storing them.
    pub arrived: u64,
    pub answers_lost: u64,
    /// Messages that arrived with a MessageId this entity had already answered 201 for: a
    /// resend that no failure explains (see [`Arrivals`]).
    pub arrived_after_ack: u64,
}

/// Everything that reached an entity with one MessageId, before duplicate detection, and how
/// each arrival was answered. The fault and load suite and the "exactly once" tests judge the
/// gateway by it: with duplicate detection on, `stored` alone cannot show a message sent twice.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Arrivals {
    /// Sends that carried this id, whatever their outcome.
    pub arrived: u32,
    /// Answered with an injected fault before anything was stored.
    pub refused: u32,
    /// Stored (not dropped by duplicate detection).
    pub stored: u32,
    /// Dropped by duplicate detection (answered 201 all the same, as Azure does).
    pub duplicates: u32,
    /// Stored or dropped as a duplicate, then answered with an injected fault: the sender cannot
    /// know it was taken.
    pub answers_lost: u32,
    /// Answered 201.
    pub acknowledged: u32,
    /// Arrived after this id had already been answered 201.
    pub after_ack: u32,
}

/// The most MessageIds one entity keeps arrivals for (a long fault run sends 10,000 per phase).
pub const MAX_ARRIVAL_IDS: usize = 1_000_000;

#[derive(Debug)]
pub struct Entity {
    pub config: EntityConfig,
    queue: VecDeque<StoredMessage>,
    locked: Vec<Lock>,
    next_sequence: u64,
    dedup: Option<DedupWindow>,
    /// Round-robin position for events sent with neither partition nor PartitionKey.
    next_partition: u32,
    pub stats: EntityStats,
    /// Per MessageId, what arrived (messages without one are not recorded).
    arrivals: HashMap<String, Arrivals>,
}

/// The partition of a PartitionKey: the same key always lands on the same partition. (Event
/// Hubs' own hash is not reproduced; only its stability is.)
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    let digest = Sha256::digest(key.as_bytes());
    let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    n % partitions.max(1)
}

/// A received message and, for peek-lock, its lock token and lock expiry.
pub type Received = (StoredMessage, Option<(String, SystemTime)>);

impl Entity {
    pub fn new(config: EntityConfig) -> Self {
        let dedup = config.duplicate_detection.map(DedupWindow::new);
        Entity {
            config,
            queue: VecDeque::new(),
            locked: Vec::new(),
            next_sequence: 1,
            dedup,
            next_partition: 0,
            stats: EntityStats::default(),
            arrivals: HashMap::new(),
        }
    }

    /// The ledger entry of `id`, unless the ledger is full.
    fn arrival(&mut self, id: &str) -> Option<&mut Arrivals> {
        if !self.arrivals.contains_key(id) && self.arrivals.len() >= MAX_ARRIVAL_IDS {
            return None;
        }
        Some(self.arrivals.entry(id.to_string()).or_default())
    }

    /// Record that messages with these ids arrived (before duplicate detection).
    fn note_arrived(&mut self, id: Option<&str>) {
        self.stats.arrived += 1;
        let Some(a) = id.and_then(|id| self.arrival(id)) else {
            return;
        };
        a.arrived += 1;
        if a.acknowledged > 0 {
            a.after_ack += 1;
            self.stats.arrived_after_ack += 1;
        }
    }

    /// Messages answered with an injected fault before anything was stored.
    pub fn note_refused(&mut self, ids: &[Option<String>]) {
        for id in ids {
            self.note_arrived(id.as_deref());
            if let Some(a) = id.as_deref().and_then(|id| self.arrival(id)) {
                a.refused += 1;
            }
        }
    }

    /// How the send that carried these (stored or deduplicated) messages was answered: 201
    /// (`acknowledged`) or an injected fault after storing (the answer lost).
    pub fn note_answered(&mut self, ids: &[Option<String>], acknowledged: bool) {
        for id in ids {
            if !acknowledged {
                self.stats.answers_lost += 1;
            }
            if let Some(a) = id.as_deref().and_then(|id| self.arrival(id)) {
                if acknowledged {
                    a.acknowledged += 1;
                } else {
                    a.answers_lost += 1;
                }
            }
        }
    }

    /// The arrivals ledger, by MessageId.
    pub fn arrivals(&self) -> &HashMap<String, Arrivals> {
        &self.arrivals
    }

    /// Store events of an event hub in order, each on `partition` when the send named one, else
    /// on its PartitionKey's partition, else round-robin. No MessageId is made up and nothing
    /// is a duplicate (Event Hubs has no duplicate detection). Returns how many were stored.
    pub fn enqueue_events(
        &mut self,
        events: Vec<NewMessage>,
        partition: Option<u32>,
        now: SystemTime,
    ) -> usize {
        let partitions = self.config.partitions.unwrap_or(1).max(1);
        let count = events.len();
        for m in events {
            let id = m.broker.message_id.clone();
            self.note_arrived(id.as_deref());
            if let Some(a) = id.as_deref().and_then(|id| self.arrival(id)) {
                a.stored += 1;
            }
            let chosen = match (partition, m.broker.partition_key.as_deref()) {
                (Some(p), _) => p,
                (None, Some(key)) => partition_for_key(key, partitions),
                (None, None) => {
                    let p = self.next_partition % partitions;
                    self.next_partition = (p + 1) % partitions;
                    p
                }
            };
            self.queue.push_back(StoredMessage {
                sequence_number: self.next_sequence,
                body: m.body,
                content_type: m.content_type,
                broker: m.broker,
                user: m.user,
                enqueued: now,
                delivery_count: 0,
                partition: Some(chosen),
            });
            self.next_sequence += 1;
        }
        self.stats.accepted += count as u64;
        count
    }

    /// Stored events per partition ("0", "1", …), for an event hub's stats.
    fn per_partition(&self) -> Option<Map<String, Value>> {
        let partitions = self.config.partitions?;
        let mut counts = vec![0u64; partitions as usize];
        for m in &self.queue {
            if let Some(p) = m.partition {
                if let Some(c) = counts.get_mut(p as usize) {
                    *c += 1;
                }
            }
        }
        Some(
            counts
                .into_iter()
                .enumerate()
                .map(|(i, c)| (i.to_string(), Value::from(c)))
                .collect(),
        )
    }

    /// Store messages in order (all or, for duplicates, some); returns (stored, duplicates).
    /// Each arrival is recorded in the ledger under its MessageId (given, or made up here).
    pub fn enqueue(
        &mut self,
        messages: Vec<NewMessage>,
        now: SystemTime,
        mono: Instant,
    ) -> (usize, usize) {
        let (mut stored, mut duplicates) = (0, 0);
        for m in messages {
            let mut broker = m.broker;
            let id = broker
                .message_id
                .get_or_insert_with(|| uuid_v4().replace('-', ""))
                .clone();
            self.note_arrived(Some(&id));
            let duplicate = self
                .dedup
                .as_mut()
                .is_some_and(|dedup| dedup.is_duplicate(&id, mono));
            if let Some(a) = self.arrival(&id) {
                if duplicate {
                    a.duplicates += 1;
                } else {
                    a.stored += 1;
                }
            }
            if duplicate {
                duplicates += 1;
                continue;
            }
            self.queue.push_back(StoredMessage {
                sequence_number: self.next_sequence,
                body: m.body,
                content_type: m.content_type,
                broker,
                user: m.user,
                enqueued: now,
                delivery_count: 0,
                partition: None,
            });
            self.next_sequence += 1;
            stored += 1;
        }
        self.stats.accepted += stored as u64;
        self.stats.duplicates += duplicates as u64;
        (stored, duplicates)
    }

    /// Take the first deliverable message: expired locks return first, messages whose
    /// TimeToLive has passed are dropped, scheduled ones wait for their time.
    pub fn take(&mut self, peek_lock: bool, now: SystemTime, mono: Instant) -> Option<Received> {
        self.release_expired_locks(mono);
        self.queue.retain(|m| !m.expired(now));
        let index = self
            .queue
            .iter()
            .position(|m| m.scheduled().is_none_or(|t| t <= now))?;
        let mut message = self.queue.remove(index)?;
        message.delivery_count += 1;
        self.stats.received += 1;
        if !peek_lock {
            return Some((message, None));
        }
        let token = uuid_v4();
        let duration = self.config.lock_duration;
        self.locked.push(Lock {
            token: token.clone(),
            until: mono + duration,
            message: message.clone(),
        });
        Some((message, Some((token, now + duration))))
    }

    fn release_expired_locks(&mut self, mono: Instant) {
        let (expired, live): (Vec<Lock>, Vec<Lock>) =
            self.locked.drain(..).partition(|l| l.until <= mono);
        self.locked = live;
        for lock in expired {
            self.requeue(lock.message);
        }
    }

    fn requeue(&mut self, message: StoredMessage) {
        let at = self
            .queue
            .partition_point(|m| m.sequence_number < message.sequence_number);
        self.queue.insert(at, message);
    }

    fn lock_index(&mut self, sequence: u64, token: &str, mono: Instant) -> Option<usize> {
        self.release_expired_locks(mono);
        self.locked.iter().position(|l| {
            l.message.sequence_number == sequence && l.token.eq_ignore_ascii_case(token)
        })
    }

    /// Complete (delete) a peek-locked message; false when there is no such live lock.
    pub fn complete(&mut self, sequence: u64, token: &str, mono: Instant) -> bool {
        let Some(i) = self.lock_index(sequence, token, mono) else {
            return false;
        };
        self.locked.remove(i);
        self.stats.completed += 1;
        true
    }

    /// Abandon a peek-lock: the message is deliverable again.
    pub fn unlock(&mut self, sequence: u64, token: &str, mono: Instant) -> bool {
        let Some(i) = self.lock_index(sequence, token, mono) else {
            return false;
        };
        let lock = self.locked.remove(i);
        self.requeue(lock.message);
        true
    }

    /// Drop every message, lock, remembered MessageId and arrival (sequence numbers keep
    /// counting).
    pub fn purge(&mut self) {
        self.queue.clear();
        self.locked.clear();
        self.arrivals.clear();
        if let Some(d) = &mut self.dedup {
            d.clear();
        }
    }

    /// Everything stored, locked or not, by sequence number, with its state.
    pub fn snapshot(&self) -> Vec<(&StoredMessage, &'static str)> {
        let mut all: Vec<(&StoredMessage, &'static str)> =
            self.queue.iter().map(|m| (m, "active")).collect();
        all.extend(self.locked.iter().map(|l| (&l.message, "locked")));
        all.sort_by_key(|(m, _)| m.sequence_number);
        all
    }

    pub fn depth(&self) -> usize {
        self.queue.len() + self.locked.len()
    }

    pub fn locked_count(&self) -> usize {
        self.locked.len()
    }

    pub fn reject(&mut self, status: u16) {
        *self.stats.rejected.entry(status.to_string()).or_insert(0) += 1;
    }
}

/// An injected fault: the next `count` send requests (to `entity`, or any) wait `delayMs` and
/// then answer `status` (with `Retry-After` when given), or, without status, go on normally.
///
/// With `probability` (0..=1), each send is failed with that probability instead, drawn from a
/// seeded generator (`seed`, default 1), so a run with the same seed and the same number of
/// sends fails the same sends by position; `count` then caps how many are failed (default: no
/// cap, until the fault is cleared). A failed send is answered before the message is parsed:
/// it is never stored.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    #[serde(default)]
    pub delay_ms: u64,
    /// Faults left to inject; `None`: no cap (only with `probability`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The share of the failures this fault injects that come *after* the message is stored
    /// (drawn from the same generator): the message is kept (through duplicate detection) and
    /// then answered `storedStatus` after `storedDelayMs`, so the sender cannot know it was
    /// taken, as when Azure stores a message and its answer is a 500 or comes too late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_share: Option<f64>,
    /// The status of a failure after storing (default 500, InternalServerError).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_status: Option<u16>,
    #[serde(default)]
    pub stored_delay_ms: u64,
    /// On the copy taken for one send: this failure comes after storing.
    #[serde(skip)]
    pub after_store: bool,
    /// The generator's state (splitmix64), from `seed`.
    #[serde(skip)]
    rng: u64,
}

pub const MAX_FAULT_DELAY_MS: u64 = 120_000;
/// The longest outage one request may declare.
pub const MAX_OUTAGE_SECONDS: f64 = 3600.0;

impl Fault {
    pub fn parse(body: &[u8]) -> Result<Fault, String> {
        let mut fault: Fault =
            serde_json::from_slice(body).map_err(|e| format!("invalid fault: {e}"))?;
        if let Some(s) = fault.status {
            if !(400..=599).contains(&s) {
                return Err("fault.status must be 400..599".into());
            }
        }
        if fault.count == Some(0) {
            return Err("fault.count must be a positive integer".into());
        }
        if fault.delay_ms > MAX_FAULT_DELAY_MS {
            return Err(format!("fault.delayMs must be 0..{MAX_FAULT_DELAY_MS}"));
        }
        if fault.status.is_none() && fault.delay_ms == 0 && fault.stored_share.is_none() {
            return Err("a fault needs a status, a delayMs or a storedShare".into());
        }
        if let Some(share) = fault.stored_share {
            if !(0.0..=1.0).contains(&share) {
                return Err("fault.storedShare must be 0..1".into());
            }
        }
        if let Some(s) = fault.stored_status {
            if !(400..=599).contains(&s) {
                return Err("fault.storedStatus must be 400..599".into());
            }
        }
        if fault.stored_delay_ms > MAX_FAULT_DELAY_MS {
            return Err(format!(
                "fault.storedDelayMs must be 0..{MAX_FAULT_DELAY_MS}"
            ));
        }
        match fault.probability {
            Some(p) if !(0.0..=1.0).contains(&p) => {
                return Err("fault.probability must be 0..1".into())
            }
            Some(_) => {}
            None if fault.seed.is_some() => return Err("fault.seed needs a probability".into()),
            None => fault.count = Some(fault.count.unwrap_or(1)),
        }
        fault.rng = fault.seed.unwrap_or(1);
        Ok(fault)
    }

    fn applies_to(&self, entity: &str) -> bool {
        self.entity
            .as_deref()
            .is_none_or(|e| e.eq_ignore_ascii_case(entity))
    }

    /// The next draw in [0, 1) (splitmix64).
    fn draw(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A full outage: until `until`, every request but `/__control/*` answers `status` (default
/// 503, with `Retry-After` when given) before anything is read into the broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Outage {
    pub status: u16,
    pub retry_after: Option<u64>,
    pub until: Instant,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutageRequest {
    seconds: f64,
    #[serde(default)]
    status: Option<u16>,
    #[serde(default)]
    retry_after: Option<u64>,
}

impl Outage {
    /// `{"seconds": 10, "status": 503, "retryAfter": 2}` from `now`.
    pub fn parse(body: &[u8], now: Instant) -> Result<Outage, String> {
        let req: OutageRequest =
            serde_json::from_slice(body).map_err(|e| format!("invalid outage: {e}"))?;
        if !(req.seconds > 0.0 && req.seconds <= MAX_OUTAGE_SECONDS) {
            return Err(format!(
                "outage.seconds must be above 0 and at most {MAX_OUTAGE_SECONDS}"
            ));
        }
        let status = req.status.unwrap_or(503);
        if !(400..=599).contains(&status) {
            return Err("outage.status must be 400..599".into());
        }
        Ok(Outage {
            status,
            retry_after: req.retry_after,
            until: now + Duration::from_secs_f64(req.seconds),
        })
    }

    /// What the control surface shows: status, Retry-After and the seconds left.
    pub fn describe(&self, now: Instant) -> Value {
        serde_json::json!({
            "status": self.status,
            "retryAfter": self.retry_after,
            "remainingSeconds": self.until.saturating_duration_since(now).as_secs_f64(),
        })
    }
}

/// Everything mutable, behind one mutex.
#[derive(Debug, Default)]
pub struct Broker {
    entities: Vec<Entity>,
    pub fault: Option<Fault>,
    pub outage: Option<Outage>,
    pub requests: u64,
    /// Body bytes of those requests (sends: the message or the batch as sent), for the bench's
    /// bytes per Azure request.
    pub bytes_received: u64,
    pub unknown_entity: u64,
    /// Requests answered by an injected fault or an outage (not reset with the messages).
    pub faults_injected: u64,
    /// Of those, the faults that came after storing the message (the answer lost), and the
    /// requests an outage answered.
    pub faults_after_store: u64,
    pub outage_rejected: u64,
    /// Sends answered with a fault before anything was stored.
    pub faults_before_store: u64,
}

impl Broker {
    pub fn new(configs: Vec<EntityConfig>) -> Self {
        Broker {
            entities: configs.into_iter().map(Entity::new).collect(),
            ..Default::default()
        }
    }

    /// Entity names are case-insensitive, as in Azure.
    pub fn entity(&mut self, name: &str) -> Option<&mut Entity> {
        self.entities
            .iter_mut()
            .find(|e| e.config.name.eq_ignore_ascii_case(name))
    }

    pub fn entity_ref(&self, name: &str) -> Option<&Entity> {
        self.entities
            .iter()
            .find(|e| e.config.name.eq_ignore_ascii_case(name))
    }

    /// Use up one application of the fault for a send to `entity`, if one applies (for a
    /// fault with a probability: if this send's draw falls under it).
    pub fn take_fault(&mut self, entity: &str) -> Option<Fault> {
        let fault = self.fault.as_mut().filter(|f| f.applies_to(entity))?;
        if let Some(p) = fault.probability {
            if fault.draw() >= p {
                return None;
            }
        }
        let left = fault.count.map(|c| c.saturating_sub(1));
        fault.count = left;
        let after_store = match fault.stored_share {
            Some(share) if share >= 1.0 => true,
            Some(share) if share > 0.0 => fault.draw() < share,
            _ => false,
        };
        let mut taken = fault.clone();
        // Counted in faults_after_store when it is applied: a send refused on its way to the
        // store (its token, its body) loses no answer.
        taken.after_store = after_store;
        if left == Some(0) {
            self.fault = None;
        }
        self.faults_injected += 1;
        Some(taken)
    }

    /// The outage in force at `now`, if any (an ended one is forgotten).
    pub fn active_outage(&mut self, now: Instant) -> Option<Outage> {
        match &self.outage {
            Some(o) if now < o.until => {
                self.faults_injected += 1;
                self.outage_rejected += 1;
                Some(o.clone())
            }
            Some(_) => {
                self.outage = None;
                None
            }
            None => None,
        }
    }

    pub fn purge(&mut self) {
        for e in &mut self.entities {
            e.purge();
        }
    }

    pub fn reset_stats(&mut self) {
        for e in &mut self.entities {
            e.stats = EntityStats::default();
            e.arrivals.clear();
        }
        self.requests = 0;
        self.bytes_received = 0;
        self.unknown_entity = 0;
        self.faults_injected = 0;
        self.faults_after_store = 0;
        self.outage_rejected = 0;
        self.faults_before_store = 0;
    }

    pub fn stats(&self) -> Value {
        let mut entities = Map::new();
        for e in &self.entities {
            let mut v = serde_json::to_value(&e.stats).unwrap_or(Value::Null);
            v["depth"] = e.depth().into();
            v["locked"] = e.locked_count().into();
            if let Some(per_partition) = e.per_partition() {
                v["partitions"] = Value::Object(per_partition);
            }
            entities.insert(e.config.name.clone(), v);
        }
        serde_json::json!({
            "requests": self.requests,
            "bytesReceived": self.bytes_received,
            "unknownEntity": self.unknown_entity,
            "faultsInjected": self.faults_injected,
            "faultsAfterStore": self.faults_after_store,
            "outageRejected": self.outage_rejected,
            "faultsBeforeStore": self.faults_before_store,
            "entities": entities,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::BrokerProperties;

    fn config(name: &str, dedup: Option<u64>) -> EntityConfig {
        EntityConfig {
            name: name.into(),
            duplicate_detection: dedup.map(Duration::from_secs),
            max_size: 1024,
            lock_duration: Duration::from_secs(30),
            partitions: None,
        }
    }

    fn msg(body: &str, id: Option<&str>) -> NewMessage {
        NewMessage {
            body: body.as_bytes().to_vec(),
            content_type: Some("text/plain".into()),
            broker: BrokerProperties {
                message_id: id.map(String::from),
                ..Default::default()
            },
            user: vec![],
        }
    }

    #[test]
    fn duplicate_window() {
        let t0 = Instant::now();
        let mut w = DedupWindow::new(Duration::from_secs(60));
        assert!(!w.is_duplicate("a", t0));
        assert!(w.is_duplicate("a", t0 + Duration::from_secs(59)));
        assert!(!w.is_duplicate("b", t0 + Duration::from_secs(59)));
        // The window runs from the first acceptance; the duplicate at 59 s did not extend it.
        assert!(!w.is_duplicate("a", t0 + Duration::from_secs(60)));
        assert!(w.is_duplicate("a", t0 + Duration::from_secs(61)));
        w.clear();
        assert!(!w.is_duplicate("a", t0 + Duration::from_secs(62)));
    }

    #[test]
    fn enqueue_numbers_in_order_and_drops_duplicates() {
        let (now, mono) = (SystemTime::now(), Instant::now());
        let mut e = Entity::new(config("d", Some(60)));
        assert_eq!(
            e.enqueue(
                vec![
                    msg("1", Some("x")),
                    msg("2", Some("y")),
                    msg("3", Some("x"))
                ],
                now,
                mono
            ),
            (2, 1)
        );
        assert_eq!(
            e.enqueue(vec![msg("4", None), msg("5", None)], now, mono),
            (2, 0),
            "generated ids differ"
        );
        let seqs: Vec<u64> = e
            .snapshot()
            .iter()
            .map(|(m, _)| m.sequence_number)
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4]);
        assert_eq!(e.stats.accepted, 4);
        assert_eq!(e.stats.duplicates, 1);
        assert_eq!(
            e.snapshot()[2].0.broker.message_id.as_ref().unwrap().len(),
            32
        );

        let mut plain = Entity::new(config("p", None));
        assert_eq!(
            plain.enqueue(vec![msg("1", Some("x")), msg("2", Some("x"))], now, mono),
            (2, 0)
        );
    }

    #[test]
    fn receive_peek_lock_complete_and_expiry() {
        let (now, mono) = (SystemTime::now(), Instant::now());
        let mut e = Entity::new(config("q", None));
        e.enqueue(vec![msg("a", None), msg("b", None)], now, mono);
        let (first, lock) = e.take(true, now, mono).unwrap();
        assert_eq!(first.body, b"a");
        let (token, _) = lock.unwrap();
        assert_eq!(e.depth(), 2);
        assert_eq!(e.take(false, now, mono).unwrap().0.body, b"b");
        assert!(
            e.take(false, now, mono).is_none(),
            "the locked message is not delivered again"
        );
        assert!(!e.complete(first.sequence_number, "wrong", mono));
        assert!(e.complete(first.sequence_number, &token, mono));
        assert!(
            !e.complete(first.sequence_number, &token, mono),
            "completed once"
        );
        assert_eq!(e.depth(), 0);

        e.enqueue(vec![msg("c", None)], now, mono);
        let (c, lock) = e.take(true, now, mono).unwrap();
        let later = mono + Duration::from_secs(31);
        let (again, _) = e.take(false, now, later).unwrap();
        assert_eq!(
            (again.body.as_slice(), again.delivery_count),
            (b"c".as_slice(), 2),
            "an expired lock returns the message"
        );
        assert!(!e.complete(c.sequence_number, &lock.unwrap().0, later));
    }

    #[test]
    fn scheduled_and_expired_messages() {
        let (now, mono) = (SystemTime::now(), Instant::now());
        let mut e = Entity::new(config("s", None));
        let mut later = msg("later", None);
        later.broker.scheduled_enqueue_time_utc = Some(rfc1123(now + Duration::from_secs(3600)));
        let mut short = msg("short", None);
        short.broker.time_to_live = Some(1.into());
        e.enqueue(vec![later, short, msg("now", None)], now, mono);
        let t = now + Duration::from_secs(2);
        assert_eq!(e.take(false, t, mono).unwrap().0.body, b"now");
        assert!(e.take(false, t, mono).is_none());
        assert_eq!(
            e.take(false, now + Duration::from_secs(3601), mono)
                .unwrap()
                .0
                .body,
            b"later"
        );
    }

    #[test]
    fn events_go_to_the_named_partition_the_key_s_or_round_robin() {
        let now = SystemTime::now();
        let mut hub = Entity::new(EntityConfig {
            partitions: Some(4),
            ..config("hub", None)
        });
        let keyed = |body: &str, key: &str| {
            let mut m = msg(body, None);
            m.broker.partition_key = Some(key.into());
            m
        };
        assert_eq!(
            hub.enqueue_events(
                vec![msg("a", None), msg("b", None), msg("c", None)],
                None,
                now
            ),
            3
        );
        assert_eq!(
            hub.enqueue_events(
                vec![keyed("d", "device-1"), keyed("e", "device-1")],
                None,
                now
            ),
            2
        );
        assert_eq!(hub.enqueue_events(vec![msg("f", None)], Some(3), now), 1);
        let parts: Vec<Option<u32>> = hub.snapshot().iter().map(|(m, _)| m.partition).collect();
        let k = partition_for_key("device-1", 4);
        assert_eq!(
            parts,
            [Some(0), Some(1), Some(2), Some(k), Some(k), Some(3)]
        );
        assert!(
            hub.snapshot()
                .iter()
                .all(|(m, _)| m.broker.message_id.is_none()),
            "no MessageId made up for events"
        );
        assert_eq!(hub.stats.accepted, 6);
        let counts = hub.per_partition().unwrap();
        assert_eq!(counts.len(), 4);
        assert_eq!(counts.values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 6);
        assert!(Entity::new(config("q", None)).per_partition().is_none());
        assert_eq!(partition_for_key("device-1", 4), k, "stable");
        assert!((0..100).all(|i| partition_for_key(&format!("k{i}"), 3) < 3));
    }

    #[test]
    fn faults_count_down_per_entity() {
        let mut b = Broker::new(vec![config("a", None), config("b", None)]);
        assert!(Fault::parse(br#"{"status":99}"#).is_err());
        assert!(Fault::parse(br#"{"count":2}"#).is_err());
        assert!(Fault::parse(br#"{"status":503,"bogus":1}"#).is_err());
        b.fault =
            Some(Fault::parse(br#"{"status":503,"retryAfter":2,"count":2,"entity":"b"}"#).unwrap());
        assert!(b.take_fault("a").is_none());
        assert_eq!(b.take_fault("B").unwrap().retry_after, Some(2));
        assert!(b.take_fault("b").is_some());
        assert!(b.take_fault("b").is_none());
        assert!(b.fault.is_none());
        assert!(b.entity("A").is_some());
        assert!(b.entity("c").is_none());
        assert_eq!(b.faults_injected, 2);
    }

    #[test]
    fn a_fault_with_a_probability_fails_that_share_the_same_way_for_the_same_seed() {
        let run = |seed: u64| {
            let mut b = Broker::new(vec![config("a", None)]);
            b.fault = Some(
                Fault::parse(
                    format!(r#"{{"status":503,"probability":0.1,"seed":{seed}}}"#).as_bytes(),
                )
                .unwrap(),
            );
            (0..10_000)
                .map(|_| b.take_fault("a").is_some())
                .collect::<Vec<bool>>()
        };
        let failed = run(7);
        let n = failed.iter().filter(|f| **f).count();
        assert!((900..1100).contains(&n), "{n} of 10000 failed");
        assert_eq!(run(7), failed, "same seed, same sends failed");
        assert_ne!(run(8), failed, "another seed, other sends");

        let mut b = Broker::new(vec![config("a", None)]);
        b.fault = Some(Fault::parse(br#"{"status":503,"probability":1,"count":3}"#).unwrap());
        assert_eq!((0..10).filter(|_| b.take_fault("a").is_some()).count(), 3);
        assert!(b.fault.is_none(), "a capped fault ends");
        assert!(Fault::parse(br#"{"status":503,"probability":1.5}"#).is_err());
        assert!(Fault::parse(br#"{"status":503,"seed":3}"#).is_err());
        assert!(Fault::parse(br#"{"status":503,"count":0}"#).is_err());
    }

    #[test]
    fn an_outage_lasts_its_seconds() {
        let now = Instant::now();
        let mut b = Broker::new(vec![config("a", None)]);
        b.outage = Some(Outage::parse(br#"{"seconds":2,"retryAfter":1}"#, now).unwrap());
        let o = b.active_outage(now + Duration::from_secs(1)).unwrap();
        assert_eq!((o.status, o.retry_after), (503, Some(1)));
        assert!(b.active_outage(now + Duration::from_secs(2)).is_none());
        assert!(b.outage.is_none(), "an ended outage is forgotten");
        assert_eq!(b.faults_injected, 1);
        for bad in [
            &br#"{"seconds":0}"#[..],
            br#"{"seconds":3601}"#,
            br#"{"seconds":1,"status":200}"#,
            br#"{"seconds":1,"mode":"x"}"#,
            br#"{}"#,
        ] {
            assert!(Outage::parse(bad, now).is_err());
        }
    }
}

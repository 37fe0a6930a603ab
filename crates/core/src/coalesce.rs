//! Group commit for sends: requests that arrive together leave together.
//!
//! Per isolate and per lane (a route's entity, and within it one session or partition key):
//! when a send arrives and none is in flight on its lane, it goes at once, alone, as it would
//! without coalescing. While one is in flight, the sends that arrive wait in the lane's queue.
//! When the send in flight completes, its request hands the lane to the first waiter, which
//! wakes and becomes the *leader* of the next batch: it takes the waiters in order up to the
//! route's limits (messages, bytes after encoding), sends them as one batch in its own
//! request's context, and hands each its outcome. So a batch always starts from a request that
//! waits on it (never from the completion of another request that has already answered), and
//! the lane is handed on exactly once per send.
//!
//! This module is the lanes' state; the send itself is the backend's
//! ([`crate::backend::service_bus`]). A waiting request is never woken by another: on Cloudflare,
//! what one request's code resolves runs on behalf of that request, and a waiter resumed from the
//! leader's request would build its answer as the leader's (workerd refuses it: "Cannot perform
//! I/O on behalf of a different request"). So each waiter looks at its state on a timer of its
//! own ([`Lanes::poll_ms`]): when the send it waits on should be over, by the lane's typical send
//! time, then backing off. A waiter finds its outcome here, or that it was handed the lane, or
//! the lane or its batch stale (a leader that went away), and takes over or gives up.

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use crate::problem::Problem;

/// How long a send in flight (alone or a batch, its retries and a token renewal included) may
/// hold its lane before waiters stop waiting for it: its request has gone without handing the
/// lane on. A send's attempts end within the retry budget (10 s) plus one attempt's deadline
/// (30 s); this leaves room over that.
pub const STALE_MS: f64 = 60_000.0;

/// A message waiting to join a batch, and what became of it.
pub struct Waiter {
    /// The batch element as JSON: `{"Body", "BrokerProperties", "UserProperties"}`, one complete
    /// object written by the backend's JSON writer.
    pub element: String,
    /// What it adds to the batch body (with its comma).
    pub bytes: usize,
    /// The waiting request's id (its log line names the batch's leader).
    pub request_id: String,
    state: RefCell<State>,
}

/// Where a waiter is.
#[derive(Clone)]
pub enum State {
    /// In its lane's queue.
    Queued { since: f64 },
    /// Handed the lane: it leads the next batch.
    Lead,
    /// Taken into a batch that is in flight.
    InBatch { since: f64 },
    /// Its batch completed (or its leader went away).
    Done(Rc<Outcome>),
}

/// What a batch came to, for every message in it.
#[derive(Debug)]
pub struct Outcome {
    /// Messages in the batch.
    pub size: usize,
    /// The request id of the request that sent it.
    pub leader: String,
    pub result: BatchResult,
}

/// What a batch's send came to.
#[derive(Debug)]
pub enum BatchResult {
    /// Azure took every message.
    Accepted,
    /// Azure refused the batch for something about its content (400, 403, 413): each message
    /// is sent again alone, and each caller gets its own answer.
    Alone,
    /// The batch failed as a whole (unavailable after its retries, an unknown outcome, a
    /// refused identity): each caller gets what it would have got alone.
    Failed {
        problem: Problem,
        detail: Option<String>,
        backend_status: Option<u16>,
        retry_after: Option<u64>,
    },
    /// The leader's request went away before it said what became of the batch: the outcome is
    /// unknown.
    Orphaned,
}

impl Waiter {
    pub fn new(element: String, request_id: &str, now: f64) -> Rc<Waiter> {
        let bytes = element.len() + 1;
        Rc::new(Waiter {
            element,
            bytes,
            request_id: request_id.to_owned(),
            state: RefCell::new(State::Queued { since: now }),
        })
    }

    pub fn state(&self) -> State {
        self.state.borrow().clone()
    }

    fn set(&self, state: State) {
        *self.state.borrow_mut() = state;
    }
}

/// The lanes of one route: the lane of messages without a session or partition key (most
/// routes' only one), and one per key in use, forgotten when idle (a list: only the keys with a
/// send in flight are in it, and it is searched where a map would hash).
#[derive(Default)]
pub struct Lanes {
    unkeyed: RefCell<Lane>,
    keyed: RefCell<Vec<(String, Lane)>>,
    /// How long a send on this route takes, lately (a moving average, in milliseconds; 0 before
    /// the first): when waiters look first.
    typical_ms: Cell<f64>,
}

/// The longest a waiter sleeps between two looks at its state.
const MAX_POLL_MS: f64 = 25.0;

// Per-isolate state, never part of the compiled policy: a copy starts empty.
impl Clone for Lanes {
    fn clone(&self) -> Lanes {
        Lanes::default()
    }
}

impl std::fmt::Debug for Lanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lanes")
    }
}

#[derive(Default)]
struct Lane {
    /// Since when a send has held the lane (alone, a batch, or a leader handed the lane and
    /// not yet sending); `None` when idle.
    held_since: Option<f64>,
    /// The waiters, first in line first (a handful to a few hundred: a list).
    queue: Vec<Rc<Waiter>>,
}

/// What [`Lanes::enter`] decided.
pub enum Entry {
    /// The lane was idle: send at once, alone, and hand the lane on with [`Lanes::release`].
    Alone,
    /// A send is in flight: wait with this [`Waiter`] (queued).
    Wait,
}

impl Lanes {
    /// Runs `f` on lane `key` (made if absent); a keyed lane left idle is forgotten.
    fn with<R>(&self, key: &str, f: impl FnOnce(&mut Lane) -> R) -> R {
        if key.is_empty() {
            return f(&mut self.unkeyed.borrow_mut());
        }
        let mut keyed = self.keyed.borrow_mut();
        let at = match keyed.iter().position(|(k, _)| k == key) {
            Some(at) => at,
            None => {
                keyed.push((key.to_owned(), Lane::default()));
                keyed.len() - 1
            }
        };
        let lane = &mut keyed[at].1;
        let out = f(lane);
        if lane.held_since.is_none() && lane.queue.is_empty() {
            keyed.swap_remove(at);
        }
        out
    }

    /// A send arrives on `lane` at `now`.
    pub fn enter(&self, lane: &str, now: f64) -> Entry {
        self.with(lane, |l| {
            let stale = l.held_since.is_some_and(|t| now - t > STALE_MS);
            if (l.held_since.is_none() || stale) && l.queue.is_empty() {
                l.held_since = Some(now);
                Entry::Alone
            } else {
                Entry::Wait
            }
        })
    }

    /// Queues a waiter on `lane` (after [`Entry::Wait`]).
    pub fn queue(&self, lane: &str, waiter: Rc<Waiter>) {
        self.with(lane, |l| l.queue.push(waiter));
    }

    /// The send holding `lane` is over: the first waiter (if any) is handed the lane and woken
    /// to lead the next batch; otherwise the lane is idle.
    pub fn release(&self, lane: &str, now: f64) {
        let next = self.with(lane, |l| {
            // Waiters that went away (their request dropped) are no one's to lead.
            let gone = l
                .queue
                .iter()
                .take_while(|w| Rc::strong_count(w) == 1)
                .count();
            l.queue.drain(..gone);
            let next = l.queue.first().cloned();
            l.held_since = next.is_some().then_some(now);
            next
        });
        if let Some(next) = next {
            next.set(State::Lead);
        }
    }

    /// A waiter whose timer ran out while queued, on a lane held for longer than a send can
    /// take: its holder went away without handing it on. The waiter takes the lane.
    pub fn take_over(&self, lane: &str, waiter: &Rc<Waiter>, now: f64) -> bool {
        let taken = self.with(lane, |l| {
            if l.held_since.is_some_and(|t| now - t <= STALE_MS) {
                return false;
            }
            l.held_since = Some(now);
            // It leads from the front of the queue, where a leader is.
            l.queue.retain(|w| !Rc::ptr_eq(w, waiter));
            l.queue.insert(0, waiter.clone());
            true
        });
        if taken {
            waiter.set(State::Lead);
        }
        taken
    }

    /// How long a waiter on `lane` sleeps before it looks at its state again: until the send
    /// holding the lane should be over (by the route's typical send), at least 1 ms; once that is
    /// past, 1, 2, 4, … ms (`overdue`: its looks since), at most [`MAX_POLL_MS`].
    pub fn poll_ms(&self, lane: &str, now: f64, overdue: &mut u32) -> f64 {
        let typical = self.typical_ms.get();
        let held = self.with(lane, |l| l.held_since);
        let left = held.map_or(0.0, |t| t + typical - now);
        if left >= 1.0 {
            return left.min(MAX_POLL_MS);
        }
        *overdue += 1;
        f64::from(1u32 << (*overdue - 1).min(5)).min(MAX_POLL_MS)
    }

    /// A send on this route took `ms`: the typical send moves towards it.
    fn note_sent(&self, ms: f64) {
        let typical = self.typical_ms.get();
        let ms = crate::time::within(ms, 0.0, STALE_MS);
        self.typical_ms.set(if typical == 0.0 {
            ms
        } else {
            typical + (ms - typical) / 8.0
        });
    }

    /// The leader takes its batch: itself first (wherever it stands in the queue: its message
    /// is always in the batch it sends), then the waiters at the front of the queue, in order,
    /// while the batch stays within `max_messages` and `max_bytes` (of JSON, the brackets
    /// included). Each waiter taken besides the leader is in the batch from `now`.
    pub fn take_batch(
        &self,
        lane: &str,
        leader: &Rc<Waiter>,
        max_messages: usize,
        max_bytes: usize,
        now: f64,
    ) -> Vec<Rc<Waiter>> {
        let batch = self.with(lane, |l| {
            // The leader, and waiters whose requests went away (no one's to send), leave the
            // queue.
            l.queue
                .retain(|w| !Rc::ptr_eq(w, leader) && Rc::strong_count(w) > 1);
            let mut bytes = 1 + leader.bytes;
            let mut taken = 0;
            for next in &l.queue {
                if taken + 1 >= max_messages || bytes + next.bytes > max_bytes {
                    break;
                }
                bytes += next.bytes;
                taken += 1;
            }
            l.held_since = Some(now);
            let mut batch = Vec::with_capacity(taken + 1);
            batch.push(leader.clone());
            batch.extend(l.queue.drain(..taken));
            batch
        });
        for w in batch.iter().skip(1) {
            *w.state.borrow_mut() = State::InBatch { since: now };
        }
        batch
    }
}

/// A leader's batch in flight: when it ends (sent, or dropped with its request), every member
/// that has not been told an outcome is told `Orphaned`, and the lane is handed on.
pub struct Flight<'l> {
    lanes: &'l Lanes,
    lane: &'l str,
    members: Vec<Rc<Waiter>>,
    started: f64,
    now: f64,
}

impl<'l> Flight<'l> {
    /// The lane `lane` is held by this request's send (alone, or leading `members`; the
    /// leader's own waiter, if any, is not among them).
    pub fn new(lanes: &'l Lanes, lane: &'l str, members: Vec<Rc<Waiter>>, now: f64) -> Flight<'l> {
        Flight {
            lanes,
            lane,
            members,
            started: now,
            now,
        }
    }

    /// The send is over at `now` (the lane's typical send learns how long it took when the
    /// flight is dropped).
    pub fn ended(&mut self, now: f64) {
        self.now = now;
    }

    /// Tells every member the batch's outcome (each finds it at its next look); the lane is
    /// handed on when the flight is dropped.
    pub fn finish(&mut self, outcome: Rc<Outcome>, now: f64) {
        self.now = now;
        for member in self.members.drain(..) {
            member.set(State::Done(outcome.clone()));
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.now > self.started {
            self.lanes.note_sent(self.now - self.started);
        }
        if self.members.is_empty() {
            self.lanes.release(self.lane, self.now);
            return;
        }
        let orphaned = Rc::new(Outcome {
            size: self.members.len(),
            leader: String::new(),
            result: BatchResult::Orphaned,
        });
        for member in self.members.drain(..) {
            member.set(State::Done(orphaned.clone()));
        }
        self.lanes.release(self.lane, self.now);
    }
}

/// A batch's body: its members' elements as one JSON array. Each element is one complete JSON
/// object (a caller's values only ever inside its strings, escaped); the array around them is
/// the brackets and commas a serializer writes between values.
pub fn batch_body(members: &[Rc<Waiter>]) -> String {
    let mut out = String::with_capacity(1 + members.iter().map(|w| w.bytes).sum::<usize>());
    out.push('[');
    for (i, member) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&member.element);
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn waiter(n: usize) -> Rc<Waiter> {
        Waiter::new(json!({ "Body": "x".repeat(n) }).to_string(), "r", 0.0)
    }

    #[test]
    fn an_idle_lane_sends_alone_and_a_busy_one_queues() {
        let lanes = Lanes::default();
        assert!(matches!(lanes.enter("a", 0.0), Entry::Alone));
        assert!(matches!(lanes.enter("a", 1.0), Entry::Wait));
        // Another lane (another session or partition key) is not held by it.
        assert!(matches!(lanes.enter("b", 1.0), Entry::Alone));
        lanes.release("a", 2.0);
        assert!(matches!(lanes.enter("a", 3.0), Entry::Alone));
    }

    #[test]
    fn the_lane_is_handed_to_the_first_waiter_which_takes_the_batch_within_its_limits() {
        let lanes = Lanes::default();
        assert!(matches!(lanes.enter("a", 0.0), Entry::Alone));
        let ws: Vec<_> = (0..5).map(|_| waiter(10)).collect();
        for w in &ws {
            assert!(matches!(lanes.enter("a", 1.0), Entry::Wait));
            lanes.queue("a", w.clone());
        }
        lanes.release("a", 2.0);
        assert!(matches!(ws[0].state(), State::Lead));
        assert!(matches!(ws[1].state(), State::Queued { .. }));
        // While the leader sends, the lane stays held: a newcomer waits.
        assert!(matches!(lanes.enter("a", 2.5), Entry::Wait));
        let batch = lanes.take_batch("a", &ws[0], 3, 10_000, 3.0);
        assert_eq!(batch.len(), 3);
        assert!(Rc::ptr_eq(&batch[0], &ws[0]));
        assert!(matches!(ws[2].state(), State::InBatch { .. }));
        let mut flight = Flight::new(&lanes, "a", batch[1..].to_vec(), 3.0);
        let outcome = Outcome {
            size: 3,
            leader: "r0".into(),
            result: BatchResult::Accepted,
        };
        flight.finish(Rc::new(outcome), 4.0);
        assert!(matches!(ws[1].state(), State::Done(_)));
        drop(flight);
        // Handed on to the next in line, which leads the rest.
        assert!(matches!(ws[3].state(), State::Lead));
        let rest = lanes.take_batch("a", &ws[3], 3, 10_000, 5.0);
        assert_eq!(rest.len(), 2);
    }

    #[test]
    fn a_batch_stops_at_its_byte_limit_but_always_takes_its_leader() {
        let lanes = Lanes::default();
        lanes.enter("a", 0.0);
        let big = waiter(300);
        let small = waiter(10);
        lanes.queue("a", big.clone());
        lanes.queue("a", small.clone());
        lanes.release("a", 1.0);
        let batch = lanes.take_batch("a", &big, 100, 100, 1.0);
        assert_eq!(
            batch.len(),
            1,
            "the leader goes even over the limit (it goes alone)"
        );
        assert!(matches!(small.state(), State::Queued { .. }));
    }

    #[test]
    fn a_leader_s_own_message_is_always_in_its_batch_wherever_it_stood() {
        let lanes = Lanes::default();
        lanes.enter("a", 0.0);
        let ws: Vec<_> = (0..3).map(|_| waiter(5)).collect();
        for w in &ws {
            lanes.queue("a", w.clone());
        }
        let batch = lanes.take_batch("a", &ws[2], 2, 10_000, 1.0);
        assert!(Rc::ptr_eq(&batch[0], &ws[2]));
        assert!(Rc::ptr_eq(&batch[1], &ws[0]));
        assert_eq!(batch.len(), 2);
        assert!(matches!(ws[1].state(), State::Queued { .. }));
    }

    #[test]
    fn a_leader_that_goes_away_orphans_its_batch_and_still_hands_the_lane_on() {
        let lanes = Lanes::default();
        lanes.enter("a", 0.0);
        let ws: Vec<_> = (0..3).map(|_| waiter(5)).collect();
        for w in &ws {
            lanes.queue("a", w.clone());
        }
        lanes.release("a", 1.0);
        let batch = lanes.take_batch("a", &ws[0], 2, 10_000, 1.0);
        let flight = Flight::new(&lanes, "a", batch[1..].to_vec(), 1.0);
        drop(flight);
        match ws[1].state() {
            State::Done(o) => assert!(matches!(o.result, BatchResult::Orphaned)),
            _ => panic!("the member was not told"),
        }
        assert!(matches!(ws[2].state(), State::Lead));
    }

    #[test]
    fn a_waiter_takes_over_a_lane_whose_holder_vanished_only_once_it_is_stale() {
        let lanes = Lanes::default();
        lanes.enter("a", 0.0);
        let w = waiter(5);
        lanes.queue("a", w.clone());
        assert!(!lanes.take_over("a", &w, 1_000.0));
        assert!(lanes.take_over("a", &w, STALE_MS + 1.0));
        assert!(matches!(w.state(), State::Lead));
        assert_eq!(
            lanes.take_batch("a", &w, 10, 10_000, STALE_MS + 2.0).len(),
            1
        );
    }

    #[test]
    fn a_waiter_looks_when_the_send_should_be_over_then_backs_off() {
        let lanes = Lanes::default();
        lanes.enter("a", 0.0);
        let mut flight = Flight::new(&lanes, "a", Vec::new(), 0.0);
        flight.ended(12.0);
        drop(flight); // a send of 12 ms
        lanes.enter("a", 100.0);
        let mut overdue = 0;
        assert_eq!(lanes.poll_ms("a", 104.0, &mut overdue), 8.0, "until 112");
        assert_eq!(overdue, 0);
        let later: Vec<f64> = (0..7)
            .map(|_| lanes.poll_ms("a", 120.0, &mut overdue))
            .collect();
        assert_eq!(later, [1.0, 2.0, 4.0, 8.0, 16.0, 25.0, 25.0]);
    }

    #[test]
    fn waiters_whose_requests_went_away_are_skipped() {
        let lanes = Lanes::default();
        lanes.enter("a", 0.0);
        lanes.queue("a", waiter(5)); // nobody holds it but the queue
        let w = waiter(5);
        lanes.queue("a", w.clone());
        lanes.release("a", 1.0);
        assert!(matches!(w.state(), State::Lead));
    }

    #[test]
    fn the_batch_body_is_one_array_of_its_elements_in_order() {
        let hostile =
            json!({ "Body": "\"}],[{\"Body\":\"injected", "UserProperties": { "a\"": "]}" } });
        let plain = json!({ "Body": "ok" });
        let members = [
            Waiter::new(hostile.to_string(), "a", 0.0),
            Waiter::new(plain.to_string(), "b", 0.0),
        ];
        let body = batch_body(&members);
        let back: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
        assert_eq!(back, vec![hostile, plain]);
        assert_eq!(
            body.len(),
            1 + members.iter().map(|w| w.bytes).sum::<usize>()
        );
    }
}

//! The linearizability checker of the register workloads.
//!
//! Every key is an independent register of `Option<Value>` (absent at
//! first, never deleted; see [`model`]), so the history is partitioned by
//! key and each key is checked on its own: a history is linearizable iff
//! every key's sub-history is (linearizability is local). Per key:
//!
//! 1. Its operations are sorted out (`prepare`): serializable reads are
//!    skipped, `fail` operations dropped, `unknown` writes and
//!    compare-and-sets kept as pending (responding after everything else)
//!    or dropped when provably irrelevant. A key with a malformed record
//!    is `Unknown`.
//! 2. A fast check (`sanity`) looks for the classic violations that real
//!    time alone proves (a value never written, read before its write, a
//!    stale read); it needs no search and explains itself with the few
//!    operations involved.
//! 3. Otherwise Wing & Gong's search (`todc-utils`' [`WGLChecker`]) decides,
//!    on worker threads, under the time budget of [`check`]. When it finds
//!    no linearization, a binary search for the shortest failing prefix
//!    names the first operation that cannot be linearized (`wgl`).
//!
//! Invariants:
//! - `Ok` means the search found a linearization of every key (or a key
//!   had nothing to check); `Invalid` means the fast check or the search
//!   proved there is none for some key; a key still running when the
//!   budget is spent is `Unknown`, never `Ok`.
//! - The verdict is exact given the history's promises: times from one
//!   monotonic clock (operations touching at the same microsecond count as
//!   concurrent), `fail` certainly did not take effect, values are unique
//!   per write, and keys start absent.
//! - The search cannot be interrupted: a key still being searched at the
//!   deadline keeps its worker thread busy after [`check`] returns, until
//!   the search ends or the process exits; no further key is started.
//!
//! [`WGLChecker`]: todc_utils::WGLChecker

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{MAX_LISTED, OpListing, Verdict, by_time, describe};
use crate::history::Op;

pub mod model;
mod prepare;
mod sanity;
mod wgl;

use prepare::CheckedOp;

/// What happened to the operations of a key (or of the whole history).
///
/// `ops = checked + serializable_reads_skipped + failed_dropped +
/// unknown_dropped + malformed`; `unknown_kept` is part of `checked`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Operations recorded.
    pub ops: usize,
    /// Operations given to the search (`ok` ones and kept `unknown` ones).
    pub checked: usize,
    /// Serializable reads, not part of the search.
    pub serializable_reads_skipped: usize,
    /// `fail` operations, which did not take effect.
    pub failed_dropped: usize,
    /// `unknown` reads, and `unknown` writes and compare-and-sets no
    /// operation could depend on.
    pub unknown_dropped: usize,
    /// `unknown` writes and compare-and-sets checked as pending until the
    /// end of the history.
    pub unknown_kept: usize,
    /// Records missing what their kind and status need.
    pub malformed: usize,
}

impl Counts {
    /// Adds `other` to these counts.
    fn add(&mut self, other: &Counts) {
        self.ops += other.ops;
        self.checked += other.checked;
        self.serializable_reads_skipped += other.serializable_reads_skipped;
        self.failed_dropped += other.failed_dropped;
        self.unknown_dropped += other.unknown_dropped;
        self.unknown_kept += other.unknown_kept;
        self.malformed += other.malformed;
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops: {} checked ({} unknown kept), {} serializable reads skipped, {} failed dropped, \
             {} unknown dropped, {} malformed",
            self.ops,
            self.checked,
            self.unknown_kept,
            self.serializable_reads_skipped,
            self.failed_dropped,
            self.unknown_dropped,
            self.malformed
        )
    }
}

/// Why a key is not `Ok`, for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// What was found, in a sentence.
    pub summary: String,
    /// The operations that show it, by time.
    pub ops: OpListing,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.summary)?;
        write!(f, "{}", self.ops)
    }
}

/// The verdict on one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyReport {
    /// The key.
    pub key: String,
    /// Its verdict.
    pub verdict: Verdict,
    /// What happened to its operations.
    pub counts: Counts,
    /// Why it is not `Ok` (`None` when it is).
    pub explanation: Option<Explanation>,
}

impl fmt::Display for KeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key {:?}: {}", self.key, self.verdict)?;
        match &self.explanation {
            Some(explanation) => write!(f, ": {explanation}"),
            None => writeln!(f),
        }
    }
}

/// The verdict on a history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// `Ok` iff every key is; `Invalid` if any key is; else `Unknown`.
    pub verdict: Verdict,
    /// What happened to the operations, over all keys.
    pub counts: Counts,
    /// Every key, in key order.
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// The keys with this verdict.
    pub fn keys_with(&self, verdict: Verdict) -> impl Iterator<Item = &KeyReport> {
        self.keys.iter().filter(move |k| k.verdict == verdict)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |v| self.keys_with(v).count();
        writeln!(
            f,
            "linearizability: {}: {} keys ({} ok, {} invalid, {} unknown); {}",
            self.verdict,
            self.keys.len(),
            count(Verdict::Ok),
            count(Verdict::Invalid),
            count(Verdict::Unknown),
            self.counts
        )?;
        for key in self.keys_with(Verdict::Invalid).chain(self.keys_with(Verdict::Unknown)) {
            write!(f, "{key}")?;
        }
        Ok(())
    }
}

/// Checks that `ops` (a whole history, any order) is linearizable, key by
/// key, spending at most about `budget` on the search: keys not decided by
/// then are `Unknown`. See the module documentation for what the verdict
/// proves. A search still running at the deadline goes on in its detached
/// worker thread until it ends or the process exits.
pub fn check(ops: &[Op], budget: Duration) -> Report {
    let deadline = Instant::now().checked_add(budget);
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let mut keys = Vec::with_capacity(by_key.len());
    let mut jobs = Vec::new();
    for (key, ops) in by_key {
        let facts = sanity::Facts::new(&ops);
        let prepared = prepare::prepare(&ops, &facts);
        let (verdict, explanation) = if !prepared.malformed.is_empty() {
            (
                Verdict::Unknown,
                Some(Explanation {
                    summary: "not checked: malformed records".to_owned(),
                    ops: OpListing::first(by_time(&prepared.malformed), MAX_LISTED),
                }),
            )
        } else if let Some(violation) = facts.violation() {
            (
                Verdict::Invalid,
                Some(Explanation {
                    summary: violation.summary,
                    ops: OpListing::first(&violation.ops, MAX_LISTED),
                }),
            )
        } else if prepared.checked.is_empty() {
            (Verdict::Ok, None)
        } else {
            let summary = format!(
                "not decided within the time budget ({} operations to search)",
                prepared.checked.len()
            );
            jobs.push(Job {
                slot: keys.len(),
                ops: prepared.checked,
            });
            (
                Verdict::Unknown,
                Some(Explanation {
                    summary,
                    ops: OpListing::default(),
                }),
            )
        };
        keys.push(KeyReport {
            key: key.to_owned(),
            verdict,
            counts: prepared.counts,
            explanation,
        });
    }
    search_all(jobs, deadline, &mut keys);
    let mut counts = Counts::default();
    for key in &keys {
        counts.add(&key.counts);
    }
    Report {
        verdict: keys.iter().fold(Verdict::Ok, |v, k| v.and(k.verdict)),
        counts,
        keys,
    }
}

/// One key for the search.
struct Job {
    /// Its index in the report's keys.
    slot: usize,
    /// Its checked operations.
    ops: Vec<CheckedOp>,
}

/// Whether a worker will send more about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finality {
    /// This is the last message about it.
    Final,
    /// A better explanation follows.
    MoreToCome,
}

/// A worker's word on a key.
struct Message {
    /// The key's index in the report's keys.
    slot: usize,
    /// Its verdict.
    verdict: Verdict,
    /// Why, when not `Ok`.
    explanation: Option<Explanation>,
    /// Whether more follows.
    finality: Finality,
}

/// Searches every job on worker threads, smallest first, writing the
/// verdicts into `keys` until all are in or `deadline` passes.
fn search_all(mut jobs: Vec<Job>, deadline: Option<Instant>, keys: &mut [KeyReport]) {
    if jobs.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
        return;
    }
    jobs.sort_by_key(|j| j.ops.len());
    let mut outstanding = jobs.len();
    let workers = std::thread::available_parallelism()
        .map_or(1, NonZeroUsize::get)
        .min(jobs.len());
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let (sender, receiver) = mpsc::channel::<Message>();
    let mut started = 0;
    for i in 0..workers {
        let queue = Arc::clone(&queue);
        let sender = sender.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("wgl-{i}"))
            .spawn(move || work(&queue, &sender, deadline));
        if spawned.is_ok() {
            started += 1;
        }
    }
    drop(sender);
    if started == 0 {
        for key in keys.iter_mut().filter(|k| k.verdict == Verdict::Unknown) {
            if let Some(explanation) = &mut key.explanation {
                explanation.summary = "not checked: no worker thread could be started".to_owned();
            }
        }
    }
    while outstanding > 0 {
        let received = match deadline {
            Some(deadline) => match deadline.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => receiver.recv_timeout(left),
                _ => Err(RecvTimeoutError::Timeout),
            },
            None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let Ok(message) = received else {
            break;
        };
        if let Some(key) = keys.get_mut(message.slot) {
            key.verdict = message.verdict;
            key.explanation = message.explanation;
        }
        if message.finality == Finality::Final {
            outstanding -= 1;
        }
    }
    // Keys not started are not started any more.
    if let Ok(mut queue) = queue.lock() {
        queue.clear();
    }
}

/// A worker: searches jobs from `queue` until it is empty or nobody
/// listens.
fn work(queue: &Mutex<VecDeque<Job>>, sender: &mpsc::Sender<Message>, deadline: Option<Instant>) {
    loop {
        let job = match queue.lock() {
            Ok(mut queue) => queue.pop_front(),
            Err(_) => None,
        };
        let Some(job) = job else {
            return;
        };
        let events = wgl::events(&job.ops);
        let outcome = wgl::search_prefix(&job.ops, &events, events.len());
        let (verdict, explanation, finality) = match outcome {
            wgl::Outcome::Linearizable => (Verdict::Ok, None, Finality::Final),
            wgl::Outcome::Panicked => (
                Verdict::Unknown,
                Some(Explanation {
                    summary: "the search panicked".to_owned(),
                    ops: OpListing::default(),
                }),
                Finality::Final,
            ),
            wgl::Outcome::NotLinearizable => (
                Verdict::Invalid,
                Some(Explanation {
                    summary: "no linearization exists (Wing & Gong search); the operations checked:".to_owned(),
                    ops: OpListing::first(job.ops.iter().map(|c| &c.op), MAX_LISTED),
                }),
                Finality::MoreToCome,
            ),
        };
        let message = Message {
            slot: job.slot,
            verdict,
            explanation,
            finality,
        };
        if sender.send(message).is_err() {
            return;
        }
        if finality == Finality::MoreToCome {
            let prefix = wgl::shortest_failing_prefix(&job.ops, &events, deadline);
            let message = Message {
                slot: job.slot,
                verdict: Verdict::Invalid,
                explanation: Some(explain_prefix(&job.ops, &events, prefix)),
                finality: Finality::Final,
            };
            if sender.send(message).is_err() {
                return;
            }
        }
    }
}

/// The explanation of a failing prefix: the operation whose response ends
/// it, and the operations invoked last before it.
fn explain_prefix(ops: &[CheckedOp], events: &[wgl::Event], prefix: wgl::FailingPrefix) -> Explanation {
    let last = ops.get(prefix.last_op).map(|c| describe(&c.op)).unwrap_or_default();
    let which = match prefix.shortest {
        wgl::Shortest::Yes => "the shortest failing prefix",
        wgl::Shortest::NotProven => "a failing prefix (its search was cut short)",
    };
    let before: Vec<&Op> = wgl::ops_called_in(events, prefix.len)
        .into_iter()
        .filter(|&i| i != prefix.last_op)
        .filter_map(|i| ops.get(i).map(|c| &c.op))
        .collect();
    Explanation {
        summary: format!(
            "no linearization exists (Wing & Gong search); {which} of the history ends with the response of \
             [{last}]; the operations invoked before it:"
        ),
        ops: OpListing::last(&before, MAX_LISTED - 1),
    }
}

#[cfg(test)]
mod tests {
    //! Random histories of a correct register must pass; mutated ones must
    //! get the same answer from the search with and without the dropping of
    //! `unknown` operations, and the fast check may only reject what the
    //! search rejects.

    use std::collections::BTreeMap;

    use super::prepare::{Unknowns, prepare_with};
    use super::*;
    use crate::history::{OpKind, ReadConsistency, Status, Value};

    /// xorshift64*: enough randomness for generating histories.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A history of `clients` clients doing `per_client` operations each on
    /// `keys` keys of a correct register: every operation takes effect at
    /// a point inside its interval (an `unknown` one possibly later, or
    /// never), in one total order.
    fn correct_history(seed: u64, clients: u32, per_client: usize, keys: u64, unknown_percent: u64) -> Vec<Op> {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        // (linearization point, op, takes effect)
        let mut planned: Vec<(u64, Op, bool)> = Vec::new();
        for client in 0..clients {
            let mut t = rng.below(10);
            for _ in 0..per_client {
                let invoke = t;
                let complete = invoke + 1 + rng.below(30);
                t = complete + rng.below(5);
                let kind = match rng.below(3) {
                    0 => OpKind::Read,
                    1 => OpKind::Write,
                    _ => OpKind::Cas,
                };
                let status = match rng.below(100) {
                    0..10 => Status::Fail,
                    n if n < 10 + unknown_percent && kind != OpKind::Read => Status::Unknown,
                    _ => Status::Ok,
                };
                let consistency = (kind == OpKind::Read).then(|| {
                    if rng.chance(15) {
                        ReadConsistency::Serializable
                    } else {
                        ReadConsistency::Linearizable
                    }
                });
                let (point, effect) = match status {
                    Status::Ok => (invoke + rng.below(complete - invoke + 1), true),
                    Status::Fail => (0, false),
                    Status::Unknown => (invoke + rng.below(complete - invoke + 100), rng.chance(50)),
                };
                let op = Op {
                    client,
                    kind,
                    key: format!("k{}", rng.below(keys)),
                    consistency,
                    value: None,
                    expect: None,
                    read: None,
                    succeeded: None,
                    invoke_us: invoke,
                    complete_us: complete,
                    status,
                    node: 0,
                    error: None,
                };
                planned.push((point, op, effect));
            }
        }
        planned.sort_by_key(|(point, op, _)| (*point, op.client));
        let mut next_value: Value = 1;
        let mut states: BTreeMap<String, Vec<Option<Value>>> = BTreeMap::new();
        let mut ops = Vec::with_capacity(planned.len());
        for (_, mut op, effect) in planned {
            let past = states.entry(op.key.clone()).or_insert_with(|| vec![None]);
            let state = past.last().copied().flatten();
            if op.kind != OpKind::Read {
                op.value = Some(next_value);
                next_value += 1;
            }
            if op.kind == OpKind::Cas {
                let pick = rng.below(past.len() as u64) as usize;
                op.expect = if rng.chance(60) {
                    state
                } else {
                    past.get(pick).copied().flatten()
                };
            }
            match (op.kind, op.status) {
                (OpKind::Read, Status::Ok) => {
                    op.read = Some(match op.consistency {
                        Some(ReadConsistency::Serializable) => {
                            past.get(rng.below(past.len() as u64) as usize).copied().flatten()
                        }
                        _ => state,
                    });
                }
                (OpKind::Read, _) => {}
                (OpKind::Write, _) if effect => past.push(op.value),
                (OpKind::Cas, _) if effect => {
                    let replaced = state == op.expect;
                    if replaced {
                        past.push(op.value);
                    }
                    if op.status == Status::Ok {
                        op.succeeded = Some(replaced);
                    }
                }
                _ => {}
            }
            ops.push(op);
        }
        ops
    }

    /// One random change that may break a history.
    fn mutate(ops: &mut [Op], rng: &mut Rng) {
        let values: Vec<Value> = ops.iter().filter_map(|op| op.value).collect();
        let Some(i) = (!ops.is_empty()).then(|| rng.below(ops.len() as u64) as usize) else {
            return;
        };
        let Some(op) = ops.get_mut(i) else {
            return;
        };
        match (op.kind, op.status) {
            (OpKind::Read, Status::Ok) => {
                let pick = values.get(rng.below(values.len() as u64 + 1) as usize).copied();
                op.read = Some(pick);
            }
            (OpKind::Cas, Status::Ok) if rng.chance(50) => op.succeeded = op.succeeded.map(|s| !s),
            (_, Status::Ok) if rng.chance(50) => op.status = Status::Fail,
            (_, Status::Ok) => op.status = Status::Unknown,
            (_, Status::Unknown) => op.status = Status::Fail,
            (_, Status::Fail) if op.kind != OpKind::Read => op.status = Status::Unknown,
            (_, Status::Fail) => {}
        }
    }

    /// The search's answer on one key's operations.
    fn search(ops: &[&Op], unknowns: Unknowns) -> wgl::Outcome {
        let prepared = prepare_with(ops, &sanity::Facts::new(ops), unknowns);
        let events = wgl::events(&prepared.checked);
        wgl::search_prefix(&prepared.checked, &events, events.len())
    }

    fn by_key(ops: &[Op]) -> BTreeMap<&str, Vec<&Op>> {
        let mut keys: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in ops {
            keys.entry(op.key.as_str()).or_default().push(op);
        }
        keys
    }

    #[test]
    fn histories_of_a_correct_register_are_linearizable() {
        for seed in 0..300 {
            let ops = correct_history(seed, 4, 12, 2, 5 + seed % 30);
            let report = check(&ops, Duration::from_secs(60));
            assert_eq!(report.verdict, Verdict::Ok, "seed {seed}: {report}");
            for (key, key_ops) in by_key(&ops) {
                assert!(
                    sanity::Facts::new(&key_ops).violation().is_none(),
                    "seed {seed} key {key}"
                );
                assert_eq!(search(&key_ops, Unknowns::KeepAll), wgl::Outcome::Linearizable);
            }
        }
    }

    #[test]
    fn the_fast_check_and_dropping_unknowns_agree_with_the_plain_search() {
        let (mut invalid, mut fast) = (0, 0);
        for seed in 0..400 {
            let mut ops = correct_history(seed, 4, 10, 1, 5 + seed % 30);
            let mut rng = Rng(seed + 7);
            for _ in 0..=rng.below(3) {
                mutate(&mut ops, &mut rng);
            }
            for (key, key_ops) in by_key(&ops) {
                let plain = search(&key_ops, Unknowns::KeepAll);
                let dropped = search(&key_ops, Unknowns::DropIrrelevant);
                assert_eq!(plain, dropped, "seed {seed} key {key}: {ops:#?}");
                // Serializable reads are outside the search: compare
                // without them.
                let searched: Vec<&Op> = key_ops
                    .iter()
                    .copied()
                    .filter(|op| op.consistency != Some(ReadConsistency::Serializable))
                    .collect();
                if let Some(violation) = sanity::Facts::new(&searched).violation() {
                    assert_eq!(
                        plain,
                        wgl::Outcome::NotLinearizable,
                        "seed {seed} key {key}: the fast check claims {}",
                        violation.summary
                    );
                    fast += 1;
                }
                if plain == wgl::Outcome::NotLinearizable {
                    invalid += 1;
                }
            }
            let report = check(&ops, Duration::from_secs(60));
            let expected = if by_key(&ops).values().any(|k| {
                sanity::Facts::new(k).violation().is_some()
                    || search(k, Unknowns::KeepAll) == wgl::Outcome::NotLinearizable
            }) {
                Verdict::Invalid
            } else {
                Verdict::Ok
            };
            assert_eq!(report.verdict, expected, "seed {seed}: {report}");
        }
        // The mutations break histories often enough, and the fast check
        // catches a good share of the breaks.
        assert!(invalid > 100, "{invalid} invalid");
        assert!(fast > invalid / 4, "{fast} of {invalid} caught fast");
    }

    #[test]
    fn a_failing_prefix_ends_with_the_operation_that_breaks_it() {
        let op = |kind, value: Option<Value>, read: Option<Option<Value>>, span: (u64, u64)| Op {
            client: 0,
            kind,
            key: "k".into(),
            consistency: (kind == OpKind::Read).then_some(ReadConsistency::Linearizable),
            value,
            expect: None,
            read,
            succeeded: None,
            invoke_us: span.0,
            complete_us: span.1,
            status: Status::Ok,
            node: 0,
            error: None,
        };
        let mut ops = vec![
            op(OpKind::Write, Some(1), None, (0, 10)),
            op(OpKind::Write, Some(2), None, (0, 10)),
            op(OpKind::Read, None, Some(Some(2)), (20, 30)),
            op(OpKind::Read, None, Some(Some(1)), (40, 50)),
        ];
        // Later operations do not move the point of failure.
        for i in 0..30 {
            ops.push(op(OpKind::Write, Some(100 + i), None, (60 + 10 * i, 65 + 10 * i)));
        }
        let refs: Vec<&Op> = ops.iter().collect();
        let prepared = prepare::prepare(&refs, &sanity::Facts::new(&refs));
        let events = wgl::events(&prepared.checked);
        let prefix = wgl::shortest_failing_prefix(&prepared.checked, &events, None);
        assert_eq!(prefix.shortest, wgl::Shortest::Yes);
        assert_eq!(prefix.len, 8);
        let last = prepared.checked.get(prefix.last_op).map(|c| &c.op);
        assert_eq!(last, ops.get(3));
        let explanation = explain_prefix(&prepared.checked, &events, prefix);
        assert_eq!(explanation.ops.lines.len(), 3, "{explanation}");
    }
}

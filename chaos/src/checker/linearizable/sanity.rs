//! Facts every linearization of a key must respect, proven from real-time
//! order alone, and the classic violations they expose: caught (and
//! explained by the few operations involved) even when the full search
//! runs out of time.
//!
//! An *observation* is an `ok` read's value, or the expected value of an
//! `ok` compare-and-set that replaced (it found that value). A *writer* of
//! `v` is a write of `v` or a compare-and-set to `v` that did not certainly
//! fail (`ok` and replaced, or `unknown`). `v` is *in effect by* time `t`
//! when an `ok` writer of `v`, or a linearizable observation of `v`,
//! completed by `t`: a writer of `v` has taken effect by then. *Evidence*
//! of `v` is a time by which the key held `v` with every writer of `v`
//! before that point: the earliest completion of a linearizable
//! observation of `v` or of an `ok` writer when `v` has one writer, the
//! latest completion of its writers when it has several and all are `ok`.
//!
//! `v` is **certainly replaced** from time `t` on when some value `u` was in
//! effect before `t` and every writer of `u` was invoked after the evidence
//! of `v`: in any linearization the write of `u` comes after every write
//! of `v`, so the key never holds `v` again. "Absent" is certainly
//! replaced once any value was in effect (keys are never deleted), and a
//! value nothing wrote is never held at all. Three rules, each a proof:
//!
//! 1. **Never written.** An observation of `v` (any consistency) with no
//!    writer of `v`: nothing could have put `v` there. With a `fail`
//!    writer, the failed operation took effect.
//! 2. **From the future.** An observation of `v` (any consistency) that
//!    completed before every writer of `v` was invoked.
//! 3. **Stale.** A linearizable observation of `v` invoked when `v` was
//!    certainly replaced (rules 1 and 2 hold everywhere first, so the
//!    evidence and the replacement both precede it).
//!
//! Every comparison of times is strict: operations touching at the same
//! microsecond count as concurrent. Serializable reads are held to rules 1
//! and 2 only (a replica may lag, but cannot invent values), and are no
//! evidence of anything. Several writers of one value weaken the facts
//! (minimum invocations, maximum completions) but never break them.
//!
//! [`Facts::certainly_replaced`] also serves the dropping of `unknown`
//! operations in [`super::prepare`]: a failed compare-and-set that expected
//! a certainly replaced value needs no write to explain its failure.

use std::collections::BTreeMap;

use crate::history::{Op, OpKind, ReadConsistency, Status, Value};

/// A violation the fast check proved.
#[derive(Debug, Clone)]
pub(super) struct Violation {
    /// What was violated, in a sentence.
    pub summary: String,
    /// The operations involved, by time.
    pub ops: Vec<Op>,
}

/// What the writers of one value did, over all of them.
#[derive(Debug, Clone, Copy)]
struct Writers<'a> {
    /// How many there are.
    count: usize,
    /// The earliest invocation, and its writer.
    first_invoke: (u64, &'a Op),
    /// The latest completion and its writer; `None` if some writer's
    /// outcome is unknown (it may take effect arbitrarily late).
    last_complete: Option<(u64, &'a Op)>,
}

/// Something an operation found in the key.
#[derive(Debug, Clone, Copy)]
struct Observation<'a> {
    /// The value found (`None`: absent).
    value: Option<Value>,
    /// The read or compare-and-set.
    op: &'a Op,
    /// Whether it promised recency.
    recency: Recency,
}

/// Whether an observation promises to reflect everything before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recency {
    /// Linearizable reads and compare-and-sets.
    Linearizable,
    /// Serializable reads: possibly stale.
    Stale,
}

/// A sign that a value was in effect by some time.
#[derive(Debug, Clone, Copy)]
struct Witness<'a> {
    /// When it completed.
    at: u64,
    /// The value.
    value: Value,
    /// The operation.
    op: &'a Op,
}

/// The newest value in effect by some time, for the replacement rule.
#[derive(Debug, Clone, Copy)]
struct Newest<'a> {
    /// Up to this witness time.
    at: u64,
    /// The latest first invocation among the witnessed values' writers.
    invoked: u64,
    /// The witness of that value.
    witness: Witness<'a>,
}

/// Why a value is certainly replaced from some time on.
#[derive(Debug, Clone, Copy)]
enum Replaced<'a> {
    /// Nothing ever wrote it.
    NeverWritten,
    /// The key was absent, and `by` shows a value in effect.
    Absent {
        /// The value in effect.
        by: Witness<'a>,
    },
    /// `by` shows a value in effect whose writers were all invoked after
    /// `evidence` showed the old one.
    Overwritten {
        /// The value in effect.
        by: Witness<'a>,
        /// Its earliest writer.
        by_writer: &'a Op,
        /// The evidence of the old value.
        evidence: &'a Op,
    },
}

/// What real time proves about one key's operations.
#[derive(Debug)]
pub(super) struct Facts<'a> {
    /// Writers by value.
    writers: BTreeMap<Value, Writers<'a>>,
    /// Certainly failed writers by value, to name them.
    failed_writers: BTreeMap<Value, &'a Op>,
    /// Every observation, by completion.
    observations: Vec<Observation<'a>>,
    /// The evidence of each value that has some, and the operation that
    /// gives it.
    evidence: BTreeMap<Value, (u64, &'a Op)>,
    /// For every prefix of the witnesses by time, the value whose writers
    /// were invoked latest.
    newest: Vec<Newest<'a>>,
}

impl<'a> Facts<'a> {
    /// Gathers the facts of the operations of one key.
    pub(super) fn new(ops: &[&'a Op]) -> Self {
        let mut writers: BTreeMap<Value, Writers<'a>> = BTreeMap::new();
        let mut failed_writers: BTreeMap<Value, &'a Op> = BTreeMap::new();
        let mut observations: Vec<Observation<'a>> = Vec::new();
        let mut witnesses: Vec<Witness<'a>> = Vec::new();
        for &op in ops {
            if op.kind == OpKind::Read {
                if op.status == Status::Ok
                    && let Some(found) = op.read
                {
                    let recency = match op.consistency {
                        Some(ReadConsistency::Linearizable) => Recency::Linearizable,
                        Some(ReadConsistency::Serializable) | None => Recency::Stale,
                    };
                    observations.push(Observation {
                        value: found,
                        op,
                        recency,
                    });
                }
                continue;
            }
            let Some(value) = op.value else {
                continue;
            };
            let replaced = match op.status {
                Status::Fail => false,
                Status::Unknown => true,
                Status::Ok => op.kind == OpKind::Write || op.succeeded == Some(true),
            };
            if !replaced {
                failed_writers.insert(value, op);
                continue;
            }
            let complete = match op.status {
                Status::Ok => {
                    witnesses.push(Witness {
                        at: op.complete_us,
                        value,
                        op,
                    });
                    if op.kind == OpKind::Cas {
                        observations.push(Observation {
                            value: op.expect,
                            op,
                            recency: Recency::Linearizable,
                        });
                    }
                    Some((op.complete_us, op))
                }
                Status::Fail | Status::Unknown => None,
            };
            writers
                .entry(value)
                .and_modify(|w| {
                    w.count += 1;
                    if op.invoke_us < w.first_invoke.0 {
                        w.first_invoke = (op.invoke_us, op);
                    }
                    w.last_complete = match (w.last_complete, complete) {
                        (Some(a), Some(b)) if b.0 > a.0 => Some(b),
                        (Some(a), Some(_)) => Some(a),
                        _ => None,
                    };
                })
                .or_insert(Writers {
                    count: 1,
                    first_invoke: (op.invoke_us, op),
                    last_complete: complete,
                });
        }
        observations.sort_by_key(|o| (o.op.complete_us, o.op.invoke_us, o.op.client));

        let mut evidence: BTreeMap<Value, (u64, &'a Op)> = BTreeMap::new();
        for (&value, w) in &writers {
            if let Some(last) = w.last_complete {
                evidence.insert(value, last);
            }
        }
        for o in &observations {
            if o.recency != Recency::Linearizable {
                continue;
            }
            let Some(value) = o.value else {
                continue;
            };
            let Some(w) = writers.get(&value) else {
                continue;
            };
            witnesses.push(Witness {
                at: o.op.complete_us,
                value,
                op: o.op,
            });
            if w.count == 1 {
                let seen = (o.op.complete_us, o.op);
                evidence
                    .entry(value)
                    .and_modify(|e| {
                        if seen.0 < e.0 {
                            *e = seen;
                        }
                    })
                    .or_insert(seen);
            }
        }
        // Evidence is never taken before the first writer was invoked (it
        // could only be, in a history that rule 2 rejects anyway).
        for (value, e) in &mut evidence {
            if let Some(w) = writers.get(value)
                && e.0 < w.first_invoke.0
            {
                *e = w.first_invoke;
            }
        }

        witnesses.sort_by_key(|w| w.at);
        let mut newest: Vec<Newest<'a>> = Vec::with_capacity(witnesses.len());
        let mut best: Option<(u64, Witness<'a>)> = None;
        for w in witnesses {
            let Some(invoked) = writers.get(&w.value).map(|ws| ws.first_invoke.0) else {
                continue;
            };
            if best.is_none_or(|(b, _)| invoked > b) {
                best = Some((invoked, w));
            }
            if let Some((invoked, witness)) = best {
                newest.push(Newest {
                    at: w.at,
                    invoked,
                    witness,
                });
            }
        }
        Facts {
            writers,
            failed_writers,
            observations,
            evidence,
            newest,
        }
    }

    /// Whether the key certainly never holds `value` at or after `t`.
    pub(super) fn certainly_replaced(&self, value: Option<Value>, t: u64) -> bool {
        self.replaced(value, t).is_some()
    }

    /// Why the key certainly never holds `value` at or after `t`, if it
    /// certainly does not.
    fn replaced(&self, value: Option<Value>, t: u64) -> Option<Replaced<'a>> {
        if let Some(v) = value
            && !self.writers.contains_key(&v)
        {
            return Some(Replaced::NeverWritten);
        }
        let before = self.newest.partition_point(|n| n.at < t);
        let newest = *self.newest.get(before.checked_sub(1)?)?;
        let Some(v) = value else {
            return Some(Replaced::Absent { by: newest.witness });
        };
        let (evidence_at, evidence) = *self.evidence.get(&v)?;
        let by_writer = self.writers.get(&newest.witness.value)?.first_invoke.1;
        (newest.invoked > evidence_at).then_some(Replaced::Overwritten {
            by: newest.witness,
            by_writer,
            evidence,
        })
    }

    /// The first violation of the three rules: rules 1 and 2 over every
    /// observation, then rule 3.
    pub(super) fn violation(&self) -> Option<Violation> {
        self.observations
            .iter()
            .find_map(|o| self.impossible(o))
            .or_else(|| self.observations.iter().find_map(|o| self.stale(o)))
    }

    /// Rules 1 and 2 for one observation.
    fn impossible(&self, o: &Observation<'a>) -> Option<Violation> {
        let v = o.value?;
        let what = describe_observer(o);
        let Some(w) = self.writers.get(&v) else {
            return Some(match self.failed_writers.get(&v) {
                Some(failed) => violation(
                    format!("{what} {v}, which only a failed operation wrote"),
                    [o.op, *failed],
                ),
                None => violation(format!("{what} {v}, which no operation wrote"), [o.op]),
            });
        };
        (w.first_invoke.0 > o.op.complete_us).then(|| {
            violation(
                format!("{what} {v} before its write was invoked"),
                [o.op, w.first_invoke.1],
            )
        })
    }

    /// Rule 3 for one observation.
    fn stale(&self, o: &Observation<'a>) -> Option<Violation> {
        if o.recency != Recency::Linearizable {
            return None;
        }
        let what = describe_observer(o);
        match self.replaced(o.value, o.op.invoke_us)? {
            Replaced::NeverWritten => None,
            Replaced::Absent { by } => Some(violation(
                format!(
                    "{what} the key absent after {} was in effect (keys are never deleted)",
                    by.value
                ),
                [o.op, by.op],
            )),
            Replaced::Overwritten {
                by,
                by_writer,
                evidence,
            } => {
                let v = o.value.map_or_else(|| "absent".to_owned(), |v| v.to_string());
                let u = by.value;
                Some(violation(
                    format!(
                        "{what} {v}, which is stale: {u} replaced it before this began (every write of {u} \
                         began after {v} was known to be in effect)"
                    ),
                    [o.op, by.op, by_writer, evidence],
                ))
            }
        }
    }
}

/// The subject of a sentence about an observation.
fn describe_observer(o: &Observation<'_>) -> &'static str {
    match (o.op.kind, o.recency) {
        (OpKind::Cas, _) => "a compare-and-set found",
        (_, Recency::Linearizable) => "a linearizable read observed",
        (_, Recency::Stale) => "a serializable read observed",
    }
}

/// A violation of these operations, each listed once, by time.
fn violation<'a>(summary: String, ops: impl IntoIterator<Item = &'a Op>) -> Violation {
    let mut unique: Vec<&Op> = Vec::new();
    for op in ops {
        if !unique.iter().any(|u| std::ptr::eq(*u, op)) {
            unique.push(op);
        }
    }
    Violation {
        summary,
        ops: super::super::by_time(unique).into_iter().cloned().collect(),
    }
}

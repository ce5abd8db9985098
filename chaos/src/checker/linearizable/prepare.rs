//! From the recorded operations of one key to the operations the search
//! checks: which are dropped, which are kept, and when each one responds.
//!
//! The rules, and why each keeps the verdict exact (the checked history has
//! a linearization iff the recorded one does, reading an `unknown`
//! operation as *pending*: it may or may not have taken effect, at any
//! point after its invocation):
//!
//! - Serializable reads are skipped: they promise nothing about recency.
//!   (The fast check still holds them to values that exist, see
//!   [`super::sanity`].)
//! - `fail` operations are dropped: the history promises they did not take
//!   effect, and a failed read observed nothing.
//! - `unknown` reads are dropped: a read changes nothing.
//! - An `ok` operation responds at its `complete_us`.
//! - A kept `unknown` write or compare-and-set responds at [`Moment::End`],
//!   after every other operation: pending, it may be linearized anywhere
//!   after its invocation, and linearizing it last is the same as it never
//!   taking effect, since nothing after it observes it. A kept
//!   compare-and-set whose new value some `ok` read (or succeeded
//!   compare-and-set) observed certainly replaced, [`CasOutcome::Succeeded`];
//!   any other is [`CasOutcome::Unobserved`] (replaces iff the state matches).
//! - An `unknown` write or compare-and-set of value `v` is *dropped* when
//!   (a) no `ok` read observed `v`, no `ok` succeeded compare-and-set and no
//!   `unknown` compare-and-set expected `v`, and (b) no `ok` compare-and-set
//!   that did *not* replace completed at or after its invocation, unless
//!   the value it expected was certainly replaced by the time it was
//!   invoked ([`Facts::certainly_replaced`]: then its failure needs no
//!   write to explain it).
//!   Dropping is sound (it cannot make a linearizable history look
//!   invalid): in any linearization that includes it, remove it; the state
//!   it set is replaced by the state before it until the next write, and
//!   during that stretch, by (a), there is no read of `v` and no
//!   compare-and-set expecting `v`, by (b) no failed compare-and-set whose
//!   "state differs from expect" could flip (the key cannot hold a
//!   certainly replaced value in any linearization), and any kept `unknown`
//!   compare-and-set there did not replace (its expect is not `v`) so it
//!   can move to the end, where it may respond. Condition (b) is the
//!   subtle one: a timed-out write of `x`, then a compare-and-set from
//!   "absent" that fails, is linearizable only *with* that write. (The
//!   facts behind "certainly replaced" assume the fast check's rules 1
//!   and 2 hold; where they do not, the key is `Invalid` without a search.)
//!
//! Invariants: a key with a malformed operation (a missing field its kind
//! and status need, or `invoke_us > complete_us`) is not checked at all
//! ([`Prepared::malformed`] is not empty); every checked operation is a
//! call that gets exactly one response.

use std::collections::BTreeSet;

use super::Counts;
use super::model::{CasOutcome, RegisterOp};
use super::sanity::Facts;
use crate::history::{Op, OpKind, ReadConsistency, Status, Value};

/// When an operation's response is placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Moment {
    /// At this time (microseconds since the workload started).
    At(u64),
    /// After every timed response of the history.
    End,
}

/// One operation the search checks.
#[derive(Debug, Clone)]
pub(super) struct CheckedOp {
    /// As recorded.
    pub op: Op,
    /// As the model applies it.
    pub model: RegisterOp,
    /// When it responds.
    pub response: Moment,
}

/// The operations of one key, sorted out.
#[derive(Debug, Default)]
pub(super) struct Prepared {
    /// What happened to each operation.
    pub counts: Counts,
    /// Operations missing what their kind and status need; the key is not
    /// checked when there is one.
    pub malformed: Vec<Op>,
    /// The operations to check, sorted by invocation.
    pub checked: Vec<CheckedOp>,
}

/// What to do with `unknown` writes and compare-and-sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unknowns {
    /// Drop those no operation can depend on (the module's rule).
    DropIrrelevant,
    /// Keep all (the plain reading, for tests of the rule).
    #[cfg(test)]
    KeepAll,
}

/// Sorts out the operations of one key (see the module's rules), given
/// what real time proves about them.
pub(super) fn prepare(ops: &[&Op], facts: &Facts<'_>) -> Prepared {
    prepare_with(ops, facts, Unknowns::DropIrrelevant)
}

/// Sorts out the operations of one key, treating `unknown` writes and
/// compare-and-sets as `unknowns` says.
pub(super) fn prepare_with(ops: &[&Op], facts: &Facts<'_>, unknowns: Unknowns) -> Prepared {
    let mut prepared = Prepared {
        counts: Counts {
            ops: ops.len(),
            ..Counts::default()
        },
        ..Prepared::default()
    };
    // `unknown` writes and compare-and-sets, as the model would apply them
    // without an answer.
    let mut pending: Vec<(&Op, RegisterOp)> = Vec::new();
    for &op in ops {
        if op.kind == OpKind::Read && op.consistency == Some(ReadConsistency::Serializable) {
            prepared.counts.serializable_reads_skipped += 1;
            continue;
        }
        if op.status == Status::Fail {
            prepared.counts.failed_dropped += 1;
            continue;
        }
        if op.invoke_us > op.complete_us {
            prepared.malformed.push(op.clone());
            continue;
        }
        let model = match (op.status, op.kind) {
            (Status::Unknown, OpKind::Read) => {
                prepared.counts.unknown_dropped += 1;
                continue;
            }
            (Status::Unknown, OpKind::Write) => {
                match op.value {
                    Some(value) => pending.push((op, RegisterOp::Write(value))),
                    None => prepared.malformed.push(op.clone()),
                }
                continue;
            }
            (Status::Unknown, OpKind::Cas) => {
                match op.value {
                    Some(new) => pending.push((
                        op,
                        RegisterOp::Cas {
                            expect: op.expect,
                            new,
                            outcome: CasOutcome::Unobserved,
                        },
                    )),
                    None => prepared.malformed.push(op.clone()),
                }
                continue;
            }
            (_, OpKind::Read) => match (op.consistency, op.read) {
                (Some(ReadConsistency::Linearizable), Some(observed)) => Some(RegisterOp::Read(observed)),
                _ => None,
            },
            (_, OpKind::Write) => op.value.map(RegisterOp::Write),
            (_, OpKind::Cas) => match (op.value, op.succeeded) {
                (Some(new), Some(succeeded)) => Some(RegisterOp::Cas {
                    expect: op.expect,
                    new,
                    outcome: if succeeded {
                        CasOutcome::Succeeded
                    } else {
                        CasOutcome::Failed
                    },
                }),
                _ => None,
            },
        };
        match model {
            Some(model) => prepared.checked.push(CheckedOp {
                op: op.clone(),
                model,
                response: Moment::At(op.complete_us),
            }),
            None => prepared.malformed.push(op.clone()),
        }
    }

    // Values some `ok` operation observed: their writes took effect.
    let mut seen: BTreeSet<Value> = BTreeSet::new();
    // The last completion of a failed compare-and-set that may need an
    // `unknown` write to explain it.
    let mut last_failed_cas: Option<u64> = None;
    for checked in &prepared.checked {
        match checked.model {
            RegisterOp::Read(Some(value))
            | RegisterOp::Cas {
                expect: Some(value),
                outcome: CasOutcome::Succeeded,
                ..
            } => {
                seen.insert(value);
            }
            RegisterOp::Cas {
                expect,
                outcome: CasOutcome::Failed,
                ..
            } if !facts.certainly_replaced(expect, checked.op.invoke_us) => {
                last_failed_cas = last_failed_cas.max(Some(checked.op.complete_us));
            }
            _ => {}
        }
    }
    // Values anything might depend on: also what pending compare-and-sets
    // expected.
    let mut referenced = seen.clone();
    referenced.extend(pending.iter().filter_map(|(_, model)| match *model {
        RegisterOp::Cas { expect, .. } => expect,
        RegisterOp::Read(_) | RegisterOp::Write(_) => None,
    }));

    for (op, mut model) in pending {
        let value = match &mut model {
            RegisterOp::Write(value) => *value,
            RegisterOp::Cas { new, outcome, .. } => {
                if seen.contains(new) {
                    *outcome = CasOutcome::Succeeded;
                }
                *new
            }
            RegisterOp::Read(_) => continue,
        };
        let failed_cas_after = last_failed_cas.is_some_and(|t| t >= op.invoke_us);
        let irrelevant = !referenced.contains(&value) && !failed_cas_after;
        if irrelevant && unknowns == Unknowns::DropIrrelevant {
            prepared.counts.unknown_dropped += 1;
            continue;
        }
        prepared.counts.unknown_kept += 1;
        prepared.checked.push(CheckedOp {
            op: op.clone(),
            model,
            response: Moment::End,
        });
    }
    prepared.counts.checked = prepared.checked.len();
    prepared.counts.malformed = prepared.malformed.len();
    prepared
        .checked
        .sort_by_key(|c| (c.op.invoke_us, c.response, c.op.client));
    prepared
}

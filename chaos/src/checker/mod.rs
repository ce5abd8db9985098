//! Checkers: what a recorded [history](crate::history) proves about the
//! system that produced it.
//!
//! The checkers share the vocabulary of this module:
//!
//! - [`linearizable`] checks the register workloads: every key is a
//!   register of `Option<Value>` (absent, or the value of one write), and
//!   the writes, compare-and-sets and linearizable reads of a key must be
//!   explainable by one total order that respects real time (Wing & Gong's
//!   search, from `todc-utils`, behind a fast check of the classic stale
//!   reads).
//! - [`set`] checks the set workload: unique keys written once each and
//!   read back at the end as one set.
//! - [`agents`] checks the agent workload: no lost agent or task, every
//!   result committed once and only from the current incarnation, memory
//!   written only with its task's accepted result.
//!
//! Both answer with a [`Verdict`]. The invariant every checker keeps is
//! that **`Invalid` is a proof**: it is only given when no execution of a
//! correct system could have produced the history, given the history's own
//! promises (times from one monotonic clock, `fail` means it certainly did
//! not happen, values unique per write). Whatever the checker cannot
//! decide — a search past its time budget, a malformed record — is
//! `Unknown`, never `Ok`: an `Ok` is also a proof, the other way round.
//!
//! Reports print as one summary line followed by details (only of what is
//! not `Ok`), and serialize to JSON for the harness's result files.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::history::{Op, OpKind, ReadConsistency, Status};

pub mod agents;
pub mod linearizable;
pub mod set;

/// At most this many operations or keys are listed in one detail of a
/// report.
pub const MAX_LISTED: usize = 20;

/// What a checker concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The history is consistent with the model: proven.
    Ok,
    /// The history violates the model: proven, with an explanation.
    Invalid,
    /// Not decided (time budget exhausted, malformed records).
    Unknown,
}

impl Verdict {
    /// The verdict of a whole from the verdicts of its parts: `Invalid` if
    /// either is, else `Unknown` if either is, else `Ok`.
    #[must_use]
    pub fn and(self, other: Verdict) -> Verdict {
        match (self, other) {
            (Verdict::Invalid, _) | (_, Verdict::Invalid) => Verdict::Invalid,
            (Verdict::Unknown, _) | (_, Verdict::Unknown) => Verdict::Unknown,
            (Verdict::Ok, Verdict::Ok) => Verdict::Ok,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Ok => "ok",
            Verdict::Invalid => "invalid",
            Verdict::Unknown => "unknown",
        })
    }
}

/// Operations shown as one line each, at most [`MAX_LISTED`] of them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpListing {
    /// How many operations before the listed ones were left out.
    pub omitted_before: usize,
    /// One line per operation shown (see [`describe`]).
    pub lines: Vec<String>,
    /// How many operations after the listed ones were left out.
    pub omitted_after: usize,
}

impl OpListing {
    /// Lists the first `max` of `ops`, in the order given.
    pub fn first<'a>(ops: impl IntoIterator<Item = &'a Op>, max: usize) -> Self {
        let mut listing = OpListing::default();
        for op in ops {
            if listing.lines.len() < max {
                listing.lines.push(describe(op));
            } else {
                listing.omitted_after += 1;
            }
        }
        listing
    }

    /// Lists the last `max` of `ops`, in the order given.
    pub fn last(ops: &[&Op], max: usize) -> Self {
        let skip = ops.len().saturating_sub(max);
        OpListing {
            omitted_before: skip,
            lines: ops.iter().skip(skip).map(|op| describe(op)).collect(),
            omitted_after: 0,
        }
    }

    /// Whether nothing is listed or left out.
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty() && self.omitted_before == 0 && self.omitted_after == 0
    }
}

impl fmt::Display for OpListing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.omitted_before > 0 {
            writeln!(f, "    ... {} earlier", self.omitted_before)?;
        }
        for line in &self.lines {
            writeln!(f, "    {line}")?;
        }
        if self.omitted_after > 0 {
            writeln!(f, "    ... and {} more", self.omitted_after)?;
        }
        Ok(())
    }
}

/// One operation on one line: its times, client and node, what it asked
/// and what it got, e.g. `120..340us client 3 node 1: cas 41 -> 42 replaced, ok`.
pub fn describe(op: &Op) -> String {
    let what = match op.kind {
        OpKind::Read => {
            let consistency = match op.consistency {
                Some(ReadConsistency::Linearizable) => "linearizable",
                Some(ReadConsistency::Serializable) => "serializable",
                None => "consistency?",
            };
            match op.read {
                Some(read) => format!("read ({consistency}) = {}", shown(read)),
                None => format!("read ({consistency})"),
            }
        }
        OpKind::Write => format!("write {}", shown(op.value)),
        OpKind::Cas => {
            let outcome = match op.succeeded {
                Some(true) => " replaced",
                Some(false) => " not replaced",
                None => "",
            };
            format!("cas {} -> {}{outcome}", shown(op.expect), shown(op.value))
        }
    };
    let status = match op.status {
        Status::Ok => "ok",
        Status::Fail => "fail",
        Status::Unknown => "unknown",
    };
    format!(
        "{}..{}us client {} node {}: {what}, {status}",
        op.invoke_us, op.complete_us, op.client, op.node
    )
}

/// A register value as reports show it: the number, or `absent`.
fn shown(value: Option<u64>) -> String {
    value.map_or_else(|| "absent".to_owned(), |v| v.to_string())
}

/// Operations in time order: by invocation, then completion, then client.
pub(crate) fn by_time<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Vec<&'a Op> {
    let mut ops: Vec<&Op> = ops.into_iter().collect();
    ops.sort_by_key(|op| (op.invoke_us, op.complete_us, op.client));
    ops
}

/// `items` joined with `, `, at most [`MAX_LISTED`] of them and a count of
/// the rest.
pub(crate) fn capped_list(items: &[String]) -> String {
    let mut out = items.iter().take(MAX_LISTED).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > MAX_LISTED {
        out.push_str(&format!(" and {} more", items.len() - MAX_LISTED));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_combine_invalid_over_unknown_over_ok() {
        use Verdict::{Invalid, Ok, Unknown};
        assert_eq!(Ok.and(Ok), Ok);
        assert_eq!(Ok.and(Unknown), Unknown);
        assert_eq!(Unknown.and(Invalid), Invalid);
        assert_eq!(Invalid.and(Ok), Invalid);
        assert_eq!(serde_json::to_string(&Unknown).unwrap(), "\"unknown\"");
    }

    #[test]
    fn listings_cap_and_count_the_rest() {
        let op = Op {
            client: 3,
            kind: OpKind::Cas,
            key: "k".into(),
            consistency: None,
            value: Some(42),
            expect: None,
            read: None,
            succeeded: Some(true),
            invoke_us: 120,
            complete_us: 340,
            status: Status::Ok,
            node: 1,
            error: None,
        };
        assert_eq!(
            describe(&op),
            "120..340us client 3 node 1: cas absent -> 42 replaced, ok"
        );
        let ops = vec![op; MAX_LISTED + 3];
        let listing = OpListing::first(&ops, MAX_LISTED);
        assert_eq!(listing.lines.len(), MAX_LISTED);
        assert_eq!(listing.omitted_after, 3);
        assert!(listing.to_string().ends_with("... and 3 more\n"));
        let refs: Vec<&Op> = ops.iter().collect();
        let listing = OpListing::last(&refs, 2);
        assert_eq!((listing.omitted_before, listing.lines.len()), (MAX_LISTED + 1, 2));
        assert!(listing.to_string().starts_with("    ... 21 earlier\n"));
    }
}

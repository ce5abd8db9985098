//! Running `todc-utils`' Wing & Gong search on the checked operations of
//! one key, and finding the shortest failing prefix to explain a failure.
//!
//! The search takes a sequence of calls and responses in time order, each
//! tagged with a process. Every checked operation gets a process of its
//! own (its index), so the crate's rule that a process's calls and
//! responses pair up in order holds trivially, whatever the clients did.
//! Events are ordered by time, and at equal times **calls before
//! responses**: two operations that touch at the same microsecond are
//! treated as concurrent, the order that claims the least (the clock
//! cannot tell which came first). Responses at [`Moment::End`] come after
//! every timed event.
//!
//! A *prefix* of the history is its first `n` events; an operation whose
//! call is in it but whose response is not is pending there: a pending
//! read is left out (it constrains nothing), a pending write or
//! compare-and-set responds at the end, the compare-and-set as
//! [`CasOutcome::Unobserved`]. Linearizability is prefix-closed, so if the
//! whole history fails, a binary search finds the shortest failing prefix;
//! its last event is the response of the first operation that cannot be
//! linearized with what came before.
//!
//! Invariants: the search is never given an empty or incomplete sequence
//! (the crate panics on both); a panic inside it anyway is caught and
//! reported as [`Outcome::Panicked`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use todc_utils::{Action, History, WGLChecker};

use super::model::{CasOutcome, RegisterOp, RegisterSpec};
use super::prepare::{CheckedOp, Moment};

/// What one search answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A linearization exists.
    Linearizable,
    /// None exists.
    NotLinearizable,
    /// The search panicked.
    Panicked,
}

/// Whether an event starts or ends its operation; calls sort first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// The call.
    Call,
    /// The response.
    Response,
}

/// A call or response of one checked operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Event {
    /// When.
    at: Moment,
    /// Call or response.
    phase: Phase,
    /// The operation's index among the checked ones.
    op: usize,
}

/// The events of `ops` in the order the search takes them.
pub(super) fn events(ops: &[CheckedOp]) -> Vec<Event> {
    let mut events: Vec<Event> = ops
        .iter()
        .enumerate()
        .flat_map(|(i, c)| {
            [
                Event {
                    at: Moment::At(c.op.invoke_us),
                    phase: Phase::Call,
                    op: i,
                },
                Event {
                    at: c.response,
                    phase: Phase::Response,
                    op: i,
                },
            ]
        })
        .collect();
    events.sort();
    events
}

/// Searches the first `len` events of `ops` (all of them: `events.len()`).
pub(super) fn search_prefix(ops: &[CheckedOp], events: &[Event], len: usize) -> Outcome {
    let prefix = events.get(..len).unwrap_or(events);
    let mut responded = vec![false; ops.len()];
    for e in prefix {
        if e.phase == Phase::Response
            && let Some(r) = responded.get_mut(e.op)
        {
            *r = true;
        }
    }
    let mut actions: Vec<(usize, Action<RegisterOp>)> = Vec::with_capacity(prefix.len());
    let mut pending: Vec<(usize, RegisterOp)> = Vec::new();
    for e in prefix {
        let Some(checked) = ops.get(e.op) else {
            continue;
        };
        let complete = responded.get(e.op).copied().unwrap_or(false);
        let model = match (complete, checked.model) {
            (true, model) => model,
            (false, RegisterOp::Read(_)) => continue,
            (false, RegisterOp::Write(value)) => RegisterOp::Write(value),
            (false, RegisterOp::Cas { expect, new, .. }) => RegisterOp::Cas {
                expect,
                new,
                outcome: CasOutcome::Unobserved,
            },
        };
        match e.phase {
            Phase::Call => {
                actions.push((e.op, Action::Call(model)));
                if !complete {
                    pending.push((e.op, model));
                }
            }
            Phase::Response => actions.push((e.op, Action::Response(model))),
        }
    }
    actions.extend(pending.into_iter().map(|(op, model)| (op, Action::Response(model))));
    search(actions)
}

/// Runs the search on a complete sequence of actions.
fn search(actions: Vec<(usize, Action<RegisterOp>)>) -> Outcome {
    if actions.is_empty() {
        return Outcome::Linearizable;
    }
    match catch_unwind(AssertUnwindSafe(|| {
        WGLChecker::<RegisterSpec>::is_linearizable(History::from_actions(actions))
    })) {
        Ok(true) => Outcome::Linearizable,
        Ok(false) => Outcome::NotLinearizable,
        Err(_) => Outcome::Panicked,
    }
}

/// The shortest failing prefix found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FailingPrefix {
    /// Its length in events.
    pub len: usize,
    /// The operation of its last event.
    pub last_op: usize,
    /// Whether the search ran to the end (else the deadline or a panic cut
    /// it short and a shorter one may exist).
    pub shortest: Shortest,
}

/// Whether a failing prefix is known to be the shortest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shortest {
    /// Proven shortest.
    Yes,
    /// Cut short.
    NotProven,
}

/// Binary search for the shortest failing prefix of a history that fails
/// as a whole, stopping (with the best so far) past `deadline`.
pub(super) fn shortest_failing_prefix(ops: &[CheckedOp], events: &[Event], deadline: Option<Instant>) -> FailingPrefix {
    // Invariant: the first `good` events are linearizable, the first `bad`
    // are not.
    let mut good = 0;
    let mut bad = events.len();
    let mut shortest = Shortest::Yes;
    while bad - good > 1 {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            shortest = Shortest::NotProven;
            break;
        }
        let mid = good + (bad - good) / 2;
        match search_prefix(ops, events, mid) {
            Outcome::Linearizable => good = mid,
            Outcome::NotLinearizable => bad = mid,
            Outcome::Panicked => {
                shortest = Shortest::NotProven;
                break;
            }
        }
    }
    let last_op = bad.checked_sub(1).and_then(|i| events.get(i)).map_or(0, |e| e.op);
    FailingPrefix {
        len: bad,
        last_op,
        shortest,
    }
}

/// The operations whose calls are in the first `len` events, in event order.
pub(super) fn ops_called_in(events: &[Event], len: usize) -> Vec<usize> {
    events
        .iter()
        .take(len)
        .filter(|e| e.phase == Phase::Call)
        .map(|e| e.op)
        .collect()
}

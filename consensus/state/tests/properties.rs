//! Property tests of the replicated state machine over [`MemTxn`]:
//!
//! - `prefix_end` bounds exactly the keys that start with a prefix;
//! - `validate` (checked before proposing) agrees with `apply`: a valid
//!   command is never refused, a structurally broken one is refused by both
//!   and changes nothing, and apply never fails on a `MemTxn`;
//! - apply is deterministic: the same log (sent through its postcard
//!   encoding) gives the same responses, events and rows;
//! - the request window: every answer to a request id equals its first, and
//!   a retry changes nothing.
//!
//! Commands are random Put/Delete/Cas (keys of 0..=MAX_KEY_BYTES+1 bytes,
//! values of a few bytes and, for the validate test, now and then
//! MAX_VALUE_BYTES or one byte more), InitCluster (0 or not), nested Batches
//! and Request wrappers (Request in Request too), with request ids from a
//! small pool so that retries are common.
//! Deterministic: fixed case counts and seed, no clock, no sleeps.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cell0_state::command::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use cell0_state::{Applied, Command, Limits, MemTxn, RequestId, Response, apply, prefix_end};
use proptest::prelude::*;
use proptest::test_runner::{RngSeed, TestCaseError};

/// `cases` cases from a fixed seed, so every run checks the same cases;
/// `PROPTEST_RNG_SEED=<n>` explores others.
fn config(cases: u32) -> ProptestConfig {
    let default = ProptestConfig::default();
    let seed = if let RngSeed::Fixed(seed) = default.rng_seed {
        seed
    } else {
        0xce11_0000
    };
    ProptestConfig {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        ..default
    }
}

/// Bytes that make prefixes and keys interesting: 0x00 and 0xff ends.
fn edge_bytes(len: std::ops::Range<usize>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![0x00u8, 0x01, 0x7f, 0xfe, 0xff]), len)
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        16 => prop::collection::vec(prop::sample::select(vec![0x00u8, b'a', b'b', 0xff]), 0..3),
        1 => Just(MAX_KEY_BYTES).prop_map(|n| vec![b'k'; n]),
        1 => Just(MAX_KEY_BYTES + 1).prop_map(|n| vec![b'k'; n]),
    ]
}

/// Small values, and with `big` now and then the largest valid one or one
/// byte more.
fn value(big: bool) -> BoxedStrategy<Vec<u8>> {
    let small = prop::collection::vec(any::<u8>(), 0..4);
    if big {
        prop_oneof![
            60 => small,
            1 => Just(MAX_VALUE_BYTES).prop_map(|n| vec![b'v'; n]),
            1 => Just(MAX_VALUE_BYTES + 1).prop_map(|n| vec![b'v'; n]),
        ]
        .boxed()
    } else {
        small.boxed()
    }
}

fn request_id() -> impl Strategy<Value = RequestId> {
    (0u64..2, 1u64..4).prop_map(|(client, seq)| RequestId { client, seq })
}

fn leaf(big: bool) -> impl Strategy<Value = Command> {
    prop_oneof![
        4 => (key(), value(big)).prop_map(|(key, value)| Command::Put { key, value }),
        2 => key().prop_map(|key| Command::Delete { key }),
        3 => (key(), 0u64..4, value(big)).prop_map(|(key, expected_revision, value)| Command::Cas {
            key,
            expected_revision,
            value,
        }),
        1 => prop_oneof![Just(0u64), any::<u64>()].prop_map(|cluster_id| Command::InitCluster { cluster_id }),
    ]
}

/// Any command these tests cover: leaves under up to four levels of Batch and
/// Request wrappers, so batch nesting depth 0..=3 (2 and more is refused)
/// and Request in Request (refused). About 35% of them are valid, 45% are
/// structurally broken, 4% hold a batch at depth 3.
fn command(big: bool) -> impl Strategy<Value = Command> {
    leaf(big).prop_recursive(4, 48, 2, |inner| {
        prop_oneof![
            3 => prop::collection::vec(inner.clone(), 0..4).prop_map(Command::Batch),
            2 => (request_id(), inner).prop_map(|(id, cmd)| Command::Request { id, cmd: Box::new(cmd) }),
        ]
    })
}

fn apply_ok(state: &mut MemTxn, cmd: &Command) -> Result<Applied, TestCaseError> {
    apply(state, cmd).map_err(|e| TestCaseError::fail(format!("apply failed on a MemTxn: {e}; command {cmd:?}")))
}

/// The deepest Batch in `cmd`, counted as `validate` does: a top-level
/// batch is at depth 0, its inner batches at 1, and a Request wrapper adds
/// nothing. `None` without a batch.
fn deepest_batch(cmd: &Command, depth: usize) -> Option<usize> {
    match cmd {
        Command::Batch(cmds) => cmds
            .iter()
            .filter_map(|c| deepest_batch(c, depth + 1))
            .max()
            .max(Some(depth)),
        Command::Request { cmd, .. } => deepest_batch(cmd, depth),
        _ => None,
    }
}

/// Walks `cmd` and its response in apply order, checking every request's
/// answer against the first answer `first` holds for its id and recording
/// first answers. A retried request was not applied again, so its inner
/// command is not walked.
fn check_answers(
    cmd: &Command,
    resp: &Response,
    first: &mut BTreeMap<RequestId, Response>,
) -> Result<(), TestCaseError> {
    match cmd {
        Command::Request { id, cmd: inner } => match first.get(id) {
            Some(answer) => {
                prop_assert_eq!(resp, answer, "request {:?} answered differently", id);
            }
            None => {
                check_answers(inner, resp, first)?;
                first.insert(*id, resp.clone());
            }
        },
        Command::Batch(cmds) => {
            let Response::Batch(parts) = resp else {
                return Err(TestCaseError::fail(format!("a batch answered {resp:?}")));
            };
            prop_assert_eq!(parts.len(), cmds.len());
            for (c, r) in cmds.iter().zip(parts) {
                check_answers(c, r, first)?;
            }
        }
        _ => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(4096))]

    /// `k` starts with `p` exactly when `p <= k < prefix_end(p)` (no upper
    /// bound when `prefix_end` is `None`).
    #[test]
    fn prefix_end_bounds_exactly_the_keys_with_the_prefix(
        p in edge_bytes(0..4),
        suffix in edge_bytes(0..3),
        other in edge_bytes(0..6),
        extend in any::<bool>(),
    ) {
        let k = if extend { [p.as_slice(), suffix.as_slice()].concat() } else { other };
        let end = prefix_end(&p);
        let in_range = p <= k && end.as_ref().is_none_or(|e| k < *e);
        prop_assert_eq!(k.starts_with(&p), in_range, "p={:?} k={:?} end={:?}", p, k, end);
        if let Some(e) = &end {
            prop_assert!(*e > p);
        } else {
            prop_assert!(p.iter().all(|&b| b == 0xff));
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// A valid command is never refused; a structurally broken one is
    /// invalid too, refused, and changes nothing; apply never fails.
    #[test]
    fn validate_agrees_with_apply(cmds in prop::collection::vec(command(true), 1..6)) {
        let limits = Limits::default();
        let mut state = MemTxn::new();
        for cmd in &cmds {
            let structure = cmd.check_structure();
            let valid = cmd.validate(&limits);
            if structure.is_err() {
                prop_assert!(valid.is_err(), "check_structure refuses but validate accepts {:?}", cmd);
            }
            let before = state.clone();
            let applied = apply_ok(&mut state, cmd)?;
            let rejected = matches!(applied.response, Response::Rejected(_));
            if valid.is_ok() {
                prop_assert!(!rejected, "a valid command was refused: {:?}", applied.response);
                let deepest = deepest_batch(cmd, 0);
                prop_assert!(deepest.is_none_or(|d| d < 2), "validate accepted a batch at depth {:?}", deepest);
            }
            prop_assert_eq!(rejected, structure.is_err(), "{:?} -> {:?}", structure, applied.response);
            if rejected {
                prop_assert!(state == before, "a refused command changed the state");
                prop_assert!(applied.events.is_empty() && applied.changed.is_empty());
            }
        }
    }

    /// Two replicas applying the same log, one through the entries' postcard
    /// encoding, agree on every response, event and row.
    #[test]
    fn apply_is_deterministic(cmds in prop::collection::vec(command(false), 0..12)) {
        let mut a = MemTxn::new();
        let mut b = MemTxn::new();
        for cmd in &cmds {
            let entry = postcard::to_stdvec(cmd).unwrap();
            let decoded: Command = postcard::from_bytes(&entry).unwrap();
            prop_assert_eq!(&decoded, cmd);
            let on_a = apply_ok(&mut a, cmd)?;
            let on_b = apply_ok(&mut b, &decoded)?;
            prop_assert_eq!(on_a, on_b);
            prop_assert!(a == b, "states differ after {:?}", cmd);
        }
        prop_assert!(a.rows().eq(b.rows()));
    }

    /// Every answer to a request id equals its first answer, also for
    /// retries inside batches and inside other requests, and a retried
    /// top-level request changes nothing. Sequences stay far inside the
    /// window (REQUEST_WINDOW_ENTRIES answers, REQUEST_WINDOW_BYTES bytes).
    #[test]
    fn a_request_id_always_gets_its_first_answer(
        cmds in prop::collection::vec(
            command(false),
            1..16,
        ),
    ) {
        let mut state = MemTxn::new();
        let mut first = BTreeMap::new();
        for cmd in &cmds {
            let retry = matches!(cmd, Command::Request { id, .. } if first.contains_key(id));
            let before = state.clone();
            let applied = apply_ok(&mut state, cmd)?;
            if matches!(applied.response, Response::Rejected(_)) {
                // Refused before anything was applied: no request was answered.
                continue;
            }
            check_answers(cmd, &applied.response, &mut first)?;
            if retry {
                prop_assert!(state == before, "a retry changed the state: {:?}", cmd);
                prop_assert!(applied.events.is_empty() && applied.changed.is_empty());
            }
        }
    }
}

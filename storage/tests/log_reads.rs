//! Reads of the log store: openraft's `limited_get_log_entries` stops at the
//! store's byte budget, always returns at least one entry, and returns
//! entries in order from the start asked for; and whatever the store's
//! recent entries (in memory) hold, every read returns what the engine
//! holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use cell0_storage::{LogStore, MemEngine};
use common::{Set, TestConfig, config, set_entry};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftLogReader};
use proptest::prelude::*;

/// A store holding entries 1..=20, each with a 1,000-byte value, that reads
/// at most `budget` bytes per replication read.
async fn store(budget: usize) -> LogStore<TestConfig, MemEngine> {
    let mut log = LogStore::new(Arc::new(MemEngine::new())).with_read_budget(budget);
    let value = "v".repeat(1000);
    let entries: Vec<_> = (1..=20).map(|i| set_entry(i, &format!("k{i}"), &value)).collect();
    log.blocking_append(entries).await.unwrap();
    log
}

fn indexes(entries: &[openraft::Entry<TestConfig>]) -> Vec<u64> {
    entries.iter().map(|e| e.log_id.index).collect()
}

#[tokio::test]
async fn replication_reads_stop_at_the_byte_budget() {
    // Each encoded entry is a little over 1,000 bytes: three fit in 3,500.
    let mut log = store(3_500).await;
    assert_eq!(
        indexes(&log.limited_get_log_entries(5, 21).await.unwrap()),
        vec![5, 6, 7]
    );
    // The end of the range still bounds it.
    assert_eq!(
        indexes(&log.limited_get_log_entries(19, 21).await.unwrap()),
        vec![19, 20]
    );
    // Pages of the engine scan join up: a budget over many pages.
    let mut log = store(1 << 20).await;
    assert_eq!(
        indexes(&log.limited_get_log_entries(1, 21).await.unwrap()),
        (1..=20).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn a_replication_read_returns_one_entry_even_over_the_budget() {
    let mut log = store(10).await;
    assert_eq!(indexes(&log.limited_get_log_entries(4, 21).await.unwrap()), vec![4]);
}

/// A change to the log, as openraft makes them.
#[derive(Debug, Clone)]
enum Change {
    /// Appends this many entries after the last one, in a new term when
    /// `new_term` says so.
    Append { entries: u64, new_term: bool },
    /// Truncates from `last + 1 - back` on.
    Truncate { back: u64 },
    /// Purges up to `first - 1 + ahead`: past the last entry, it is a
    /// snapshot install, and the next append starts after it.
    Purge { ahead: u64 },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (1..6u64, any::<bool>()).prop_map(|(entries, new_term)| Change::Append { entries, new_term }),
        1 => (0..5u64).prop_map(|back| Change::Truncate { back }),
        1 => (0..9u64).prop_map(|ahead| Change::Purge { ahead }),
    ]
}

/// The log's entries as `(index, term, key)`.
fn described(entries: &[Entry<TestConfig>]) -> Vec<(u64, u64, String)> {
    entries
        .iter()
        .map(|e| {
            let key = match &e.payload {
                EntryPayload::Normal(set) => set.key.clone(),
                _ => String::new(),
            };
            (e.log_id.index, e.log_id.leader_id.term, key)
        })
        .collect()
}

/// Applies `changes` to a store keeping `recent` bytes of entries in
/// memory, and after each compares every read with a store over the same
/// engine that keeps none.
async fn reads_match_the_engine(changes: Vec<Change>, recent: usize, read_budget: usize) {
    let engine = Arc::new(MemEngine::new());
    let mut log = LogStore::<TestConfig, _>::new(engine.clone())
        .with_recent_entries(recent)
        .with_read_budget(read_budget);
    let mut plain = LogStore::<TestConfig, _>::new(engine)
        .with_recent_entries(0)
        .with_read_budget(read_budget);
    let (mut first, mut next, mut term) = (1u64, 1u64, 1u64);
    for (step, change) in changes.into_iter().enumerate() {
        match change {
            Change::Append { entries, new_term } => {
                term += u64::from(new_term);
                let appended: Vec<_> = (next..next + entries)
                    .map(|index| Entry {
                        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
                        payload: EntryPayload::Normal(Set {
                            key: format!("s{step}i{index}"),
                            value: "v".repeat(index as usize % 7 * 50),
                        }),
                    })
                    .collect();
                log.blocking_append(appended).await.unwrap();
                next += entries;
            }
            Change::Truncate { back } => {
                let at = next.saturating_sub(back).max(first);
                log.truncate(LogId::new(CommittedLeaderId::new(term, 1), at))
                    .await
                    .unwrap();
                next = at;
            }
            Change::Purge { ahead } => {
                let upto = (first + ahead).saturating_sub(1);
                if upto == 0 {
                    continue;
                }
                log.purge(LogId::new(CommittedLeaderId::new(term, 1), upto))
                    .await
                    .unwrap();
                first = upto + 1;
                next = next.max(first);
            }
        }
        for start in first.saturating_sub(1)..=next {
            for end in start..=next + 1 {
                assert_eq!(
                    described(&log.try_get_log_entries(start..end).await.unwrap()),
                    described(&plain.try_get_log_entries(start..end).await.unwrap()),
                    "entries {start}..{end} after step {step}"
                );
                assert_eq!(
                    described(&log.limited_get_log_entries(start, end).await.unwrap()),
                    described(&plain.limited_get_log_entries(start, end).await.unwrap()),
                    "replication read {start}..{end} after step {step}"
                );
            }
            assert_eq!(
                described(&log.try_get_log_entries(start..).await.unwrap()),
                described(&plain.try_get_log_entries(start..).await.unwrap()),
                "entries from {start} after step {step}"
            );
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn reads_return_what_the_engine_holds_whatever_is_in_memory(
        changes in proptest::collection::vec(change(), 1..24),
        recent in prop_oneof![Just(usize::MAX), 0..2_000usize],
        read_budget in prop_oneof![Just(usize::MAX), 1..1_000usize],
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(reads_match_the_engine(changes, recent, read_budget));
    }
}

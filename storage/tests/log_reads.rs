//! Replication reads of the log store: openraft's `limited_get_log_entries`
//! stops at the store's byte budget, always returns at least one entry, and
//! returns entries in order from the start asked for.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use cell0_storage::{LogStore, MemEngine};
use common::{TestConfig, set_entry};
use openraft::RaftLogReader;
use openraft::storage::RaftLogStorageExt;

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

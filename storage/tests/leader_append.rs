//! What the log store shows a [`LeaderAppend`] observer (early
//! replication): a leader's entries with the exact log id before them,
//! under its committed vote, and nothing it does not know for sure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use cell0_storage::{LeaderAppend, LogStore, MemEngine};
use common::{TestConfig, set_entry};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, Entry, LogId, Vote};

/// One observed call: the vote, the log id before, the entries' indexes.
type Seen = (Vote<u64>, Option<LogId<u64>>, Vec<u64>);

/// Records what it is shown, as node `node`.
struct Recorder {
    node: u64,
    seen: Mutex<Vec<Seen>>,
}

impl LeaderAppend<TestConfig> for Recorder {
    fn node(&self) -> u64 {
        self.node
    }

    fn appending(&self, vote: &Vote<u64>, prev: Option<LogId<u64>>, entries: &[Entry<TestConfig>], bytes: usize) {
        assert!(bytes > 0);
        let indexes = entries.iter().map(|e| e.log_id.index).collect();
        self.seen.lock().unwrap().push((*vote, prev, indexes));
    }
}

fn entries(range: std::ops::RangeInclusive<u64>) -> Vec<Entry<TestConfig>> {
    range.map(|i| set_entry(i, &format!("k{i}"), "v")).collect()
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

#[tokio::test]
async fn a_leaders_entries_are_shown_with_the_log_id_before_them() {
    let recorder = Arc::new(Recorder {
        node: 1,
        seen: Mutex::default(),
    });
    let engine = Arc::new(MemEngine::new());
    let mut log = LogStore::<TestConfig, _>::new(engine.clone()).with_leader_append(recorder.clone());
    log.get_log_state().await.unwrap();

    // Not a leader yet: a vote that is not committed, then one for another node.
    log.save_vote(&Vote::new(1, 1)).await.unwrap();
    log.blocking_append(entries(0..=1)).await.unwrap();
    log.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
    log.blocking_append(entries(2..=2)).await.unwrap();
    assert!(recorder.seen.lock().unwrap().is_empty(), "a follower's appends are not shown");

    // Leader: every append is shown, each with the entry before it.
    let vote = Vote::new_committed(1, 1);
    log.save_vote(&vote).await.unwrap();
    log.blocking_append(entries(3..=4)).await.unwrap();
    log.blocking_append(entries(5..=5)).await.unwrap();
    assert_eq!(
        *recorder.seen.lock().unwrap(),
        vec![
            (vote, Some(log_id(2)), vec![3, 4]),
            (vote, Some(log_id(4)), vec![5])
        ]
    );

    // After a truncation the store no longer knows the entry before for
    // sure: that append is not shown, the next one is again.
    log.truncate(log_id(5)).await.unwrap();
    log.blocking_append(entries(5..=5)).await.unwrap();
    log.blocking_append(entries(6..=6)).await.unwrap();
    assert_eq!(recorder.seen.lock().unwrap().last(), Some(&(vote, Some(log_id(5)), vec![6])));
    assert_eq!(recorder.seen.lock().unwrap().len(), 3);

    // A store opened again learns the last entry from the engine.
    let recorder = Arc::new(Recorder {
        node: 1,
        seen: Mutex::default(),
    });
    let mut log = LogStore::<TestConfig, _>::new(engine).with_leader_append(recorder.clone());
    log.get_log_state().await.unwrap();
    log.read_vote().await.unwrap();
    log.blocking_append(entries(7..=7)).await.unwrap();
    assert_eq!(*recorder.seen.lock().unwrap(), vec![(vote, Some(log_id(6)), vec![7])]);
}

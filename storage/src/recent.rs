//! The newest entries of a node's Raft log, in memory next to the engine's
//! copy, so that apply and replication read back what the node just
//! appended instead of decoding it from the engine again.
//!
//! A follower decodes every entry once, from the AppendEntries call; before
//! this it decoded each again when openraft read committed entries back
//! for apply. A leader decoded each entry once more per follower
//! (replication reads) and once for apply; now it decodes none. Entries
//! are cloned out, so the entry's application data should be cheap to
//! clone (Cell0 shares its command behind a reference count).
//!
//! Invariants (kept by [`crate::LogStore`], which owns it):
//! - The entries are at consecutive indexes, each one the entry the log
//!   holds at that index: appends enter after their engine write
//!   succeeded; truncation and purge leave before theirs runs, so a failed
//!   engine write leaves a subset of the log here, never an entry the log
//!   lacks.
//! - At most [`RecentEntries::budget`] bytes of encoded entries; the oldest
//!   leave first. A read that starts before the first entry held goes to
//!   the engine: lagging followers catch up from there.

use std::collections::VecDeque;
use std::sync::Mutex;

use openraft::{Entry, RaftTypeConfig};

/// An entry with its encoded size (what budgets count).
pub(crate) struct SizedEntry<C: RaftTypeConfig> {
    /// The entry.
    pub entry: Entry<C>,
    /// Bytes of its encoding in the log.
    pub encoded_len: usize,
}

struct Window<C: RaftTypeConfig> {
    entries: VecDeque<SizedEntry<C>>,
    /// Sum of the held entries' encoded sizes.
    bytes: usize,
}

impl<C: RaftTypeConfig> Window<C> {
    /// Moves every entry to `evicted`.
    fn clear(&mut self, evicted: &mut Vec<SizedEntry<C>>) {
        evicted.extend(self.entries.drain(..));
        self.bytes = 0;
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|h| h.entry.log_id.index)
    }

    /// Moves the entries from `index` on to `evicted`.
    fn evict_from(&mut self, index: u64, evicted: &mut Vec<SizedEntry<C>>) {
        while let Some(last) = self.entries.back()
            && last.entry.log_id.index >= index
            && let Some(last) = self.entries.pop_back()
        {
            self.bytes -= last.encoded_len;
            evicted.push(last);
        }
    }

    /// Moves the oldest entries to `evicted` while `evict` says so (given
    /// the entry and the bytes held).
    fn evict_oldest(&mut self, evict: impl Fn(&SizedEntry<C>, usize) -> bool, evicted: &mut Vec<SizedEntry<C>>) {
        while let Some(first) = self.entries.front()
            && evict(first, self.bytes)
            && let Some(first) = self.entries.pop_front()
        {
            self.bytes -= first.encoded_len;
            evicted.push(first);
        }
    }
}

/// The newest entries of one log; shared by the log store's clones.
pub(crate) struct RecentEntries<C: RaftTypeConfig> {
    window: Mutex<Window<C>>,
    /// Most encoded bytes held.
    budget: usize,
}

/// What a read took from the recent entries.
pub(crate) struct Served<C: RaftTypeConfig> {
    /// The entries, from the index asked for on, in order.
    pub entries: Vec<Entry<C>>,
    /// Their encoded bytes.
    pub bytes: usize,
    /// Whether the next entry held was left out for the byte budget.
    pub budget_spent: bool,
}

impl<C: RaftTypeConfig> RecentEntries<C> {
    /// Holding at most `budget` bytes of encoded entries (0: none).
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            window: Mutex::new(Window {
                entries: VecDeque::new(),
                bytes: 0,
            }),
            budget,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window<C>> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes entries the log now holds (written), in index order with their
    /// encoded sizes. Entries held from the first one's index on are
    /// replaced; entries held before a gap are dropped.
    pub(crate) fn appended(&self, entries: Vec<SizedEntry<C>>) {
        let Some(first) = entries.first().map(|s| s.entry.log_id.index) else {
            return;
        };
        let mut evicted = Vec::new();
        let mut window = self.lock();
        window.evict_from(first, &mut evicted);
        if let Some(back) = window.entries.back()
            && back.entry.log_id.index + 1 != first
        {
            window.clear(&mut evicted);
        }
        for sized in entries {
            window.bytes += sized.encoded_len;
            window.entries.push_back(sized);
        }
        window.evict_oldest(|_, bytes| bytes > self.budget, &mut evicted);
        // Freed once readers may go on: the oldest entries' memory is long
        // cold, and freeing it took most of this call's time in a profile.
        drop(window);
        drop(evicted);
    }

    /// The log is about to lose its entries from `index` on.
    pub(crate) fn truncate(&self, index: u64) {
        let mut evicted = Vec::new();
        self.lock().evict_from(index, &mut evicted);
    }

    /// The log is about to lose its entries up to `index`.
    pub(crate) fn purge(&self, index: u64) {
        let mut evicted = Vec::new();
        self.lock()
            .evict_oldest(|held, _| held.entry.log_id.index <= index, &mut evicted);
    }

    /// The log is about to be rewritten outside Raft.
    pub(crate) fn clear(&self) {
        let mut evicted = Vec::new();
        self.lock().clear(&mut evicted);
    }

    /// The entries held from `start` on, before `end`, stopping before the
    /// one that would take the served bytes past `byte_budget` (though
    /// always serving one when it can). Nothing when `start` is not held.
    pub(crate) fn read(&self, start: u64, end: u64, byte_budget: usize) -> Served<C>
    where
        C::D: Clone,
    {
        let mut served = Served {
            entries: Vec::new(),
            bytes: 0,
            budget_spent: false,
        };
        let window = self.lock();
        let Some(first) = window.first_index() else {
            return served;
        };
        let Some(offset) = start.checked_sub(first).and_then(|o| usize::try_from(o).ok()) else {
            return served;
        };
        for held in window.entries.iter().skip(offset) {
            if held.entry.log_id.index >= end {
                break;
            }
            let bytes = served.bytes.saturating_add(held.encoded_len);
            if bytes > byte_budget && !served.entries.is_empty() {
                served.budget_spent = true;
                break;
            }
            served.bytes = bytes;
            served.entries.push(held.entry.clone());
        }
        served
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;

    openraft::declare_raft_types!(
        Config:
            D = u64,
            R = (),
            NodeId = u64,
            Node = openraft::BasicNode,
            Entry = openraft::Entry<Config>,
            SnapshotData = std::io::Cursor<Vec<u8>>,
            AsyncRuntime = openraft::TokioRuntime,
    );

    /// Entry `index` of `term`, carrying its term as data; 10 bytes.
    fn entry(term: u64, index: u64) -> SizedEntry<Config> {
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Normal(term),
        };
        SizedEntry { entry, encoded_len: 10 }
    }

    fn appended(recent: &RecentEntries<Config>, term: u64, indexes: std::ops::RangeInclusive<u64>) {
        recent.appended(indexes.map(|i| entry(term, i)).collect());
    }

    /// (index, term) of what a read from `start` serves.
    fn held(recent: &RecentEntries<Config>, start: u64) -> Vec<(u64, u64)> {
        let served = recent.read(start, u64::MAX, usize::MAX);
        assert_eq!(served.bytes, served.entries.len() * 10);
        served
            .entries
            .iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect()
    }

    #[test]
    fn appends_replace_what_they_overlap_and_a_gap_drops_the_older_entries() {
        let recent = RecentEntries::new(usize::MAX);
        appended(&recent, 1, 1..=4);
        appended(&recent, 2, 3..=5);
        assert_eq!(held(&recent, 1), vec![(1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]);
        appended(&recent, 3, 8..=9);
        assert_eq!(held(&recent, 1), vec![]);
        assert_eq!(held(&recent, 8), vec![(8, 3), (9, 3)]);
    }

    #[test]
    fn truncation_purge_and_clear_drop_their_entries() {
        let recent = RecentEntries::new(usize::MAX);
        appended(&recent, 1, 1..=6);
        recent.truncate(5);
        recent.purge(2);
        assert_eq!(held(&recent, 3), vec![(3, 1), (4, 1)]);
        assert_eq!(held(&recent, 2), vec![], "a read from before the first entry held");
        recent.clear();
        assert_eq!(held(&recent, 3), vec![]);
    }

    #[test]
    fn the_budget_drops_the_oldest_entries_and_bounds_reads() {
        let recent = RecentEntries::new(35);
        appended(&recent, 1, 1..=5);
        assert_eq!(held(&recent, 3), vec![(3, 1), (4, 1), (5, 1)]);
        let two = recent.read(3, 6, 25);
        assert_eq!((two.entries.len(), two.budget_spent), (2, true));
        assert!(
            !recent.read(3, 6, 30).budget_spent,
            "the end, not the budget, stopped it"
        );
        let one = recent.read(3, 6, 1);
        assert_eq!(
            (one.entries.len(), one.bytes),
            (1, 10),
            "one entry even over the budget"
        );
        let bounded = recent.read(4, 5, usize::MAX);
        assert_eq!(bounded.entries.len(), 1, "the end bounds the read");
        assert_eq!(RecentEntries::<Config>::new(0).read(1, 2, 100).entries.len(), 0);
        let none = RecentEntries::new(0);
        appended(&none, 1, 1..=2);
        assert_eq!(held(&none, 1), vec![]);
    }
}

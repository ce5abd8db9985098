//! Transactions of the replicated state machine over named tables.
//!
//! The state machine sees its world as named tables of ordered byte keys.
//! All tables share the [`Cf::State`] column family, each key prefixed by its
//! table name and a NUL byte, so that a snapshot is one scan of one column
//! family. An [`EngineTxn`] buffers the writes of one apply call on top of the
//! engine (reads see earlier writes of the same call) and turns them into a
//! single atomic [`WriteBatch`]. The [`Txn`] trait itself belongs to the
//! state machine (`cell0-state`); this is its storage implementation.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

pub use cell0_state::Txn;
use cell0_state::{StateError, prefix_end};

use crate::engine::{Cf, ReadView, WriteBatch};
use crate::row_cache::RowCache;
use crate::{Error, Result};

/// The [`Cf::State`] key of `key` in `table`.
pub(crate) fn table_key(table: &str, key: &[u8]) -> Result<Vec<u8>> {
    if table.is_empty() || table.as_bytes().contains(&0) {
        return Err(Error::InvalidTable(table.to_string()));
    }
    let mut k = Vec::with_capacity(table.len() + 1 + key.len());
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    Ok(k)
}

/// A [`Txn`] buffering writes over an engine's current state, or over a
/// point-in-time view of it (`Engine::with_view`) for reads that must all see
/// one state.
pub struct EngineTxn<'e, E: ReadView + ?Sized> {
    engine: &'e E,
    /// Pending writes by full key; `None` is a delete.
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Full-key ranges `[start, end)` deleted in this step. A pending write
    /// inside one was made after it (deleting a range drops the pending
    /// writes it covers), so it wins.
    deleted: Vec<(Vec<u8>, Vec<u8>)>,
    /// Apply's row cache, kept equal to the engine's rows (see
    /// [`crate::row_cache`]): point reads check it before the engine, and
    /// [`EngineTxn::into_batch`] passes the writes on to it.
    cache: Option<&'e Mutex<RowCache>>,
}

/// Locks `cache`; one poisoned by a panic halfway through an update is
/// emptied, as it may no longer match the engine.
pub(crate) fn lock_cache(cache: &Mutex<RowCache>) -> MutexGuard<'_, RowCache> {
    cache.lock().unwrap_or_else(|poisoned| {
        let mut guard = poisoned.into_inner();
        guard.clear();
        cache.clear_poison();
        guard
    })
}

impl<'e, E: ReadView + ?Sized> EngineTxn<'e, E> {
    /// A transaction with no pending writes.
    pub fn new(engine: &'e E) -> Self {
        Self {
            engine,
            pending: BTreeMap::new(),
            deleted: Vec::new(),
            cache: None,
        }
    }

    /// The same transaction reading through, and writing through to,
    /// apply's row cache. The batch of [`EngineTxn::into_batch`] must then
    /// be written before the next read of the cache, or the cache cleared.
    pub(crate) fn with_cache(mut self, cache: &'e Mutex<RowCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Moves the pending writes into `batch` (and into the row cache, if
    /// the transaction has one).
    pub fn into_batch(self, batch: &mut WriteBatch) {
        if let Some(cache) = self.cache {
            let mut cache = lock_cache(cache);
            for (start, end) in &self.deleted {
                cache.remove_range(start, end);
            }
            for (k, v) in &self.pending {
                cache.write(k, v.as_deref());
            }
        }
        // Ranges first: a batch applies in order, so the pending writes
        // made after a range was deleted stay.
        for (start, end) in self.deleted {
            batch.delete_range(Cf::State, start, end);
        }
        for (k, v) in self.pending {
            match v {
                Some(v) => batch.put(Cf::State, k, v),
                None => batch.delete(Cf::State, k),
            }
        }
    }
}

impl<E: ReadView + ?Sized> Txn for EngineTxn<'_, E> {
    fn get(&self, table: &str, key: &[u8]) -> cell0_state::Result<Option<Vec<u8>>> {
        let mut row = None;
        self.read(table, key, &mut |value| {
            row = Some(value.to_vec());
            Ok(())
        })?;
        Ok(row)
    }

    fn read(
        &self,
        table: &str,
        key: &[u8],
        visit: &mut dyn FnMut(&[u8]) -> cell0_state::Result<()>,
    ) -> cell0_state::Result<()> {
        let k = table_key(table, key).map_err(StateError::storage)?;
        match self.pending.get(&k) {
            Some(Some(value)) => visit(value),
            Some(None) => Ok(()),
            None if self.deleted_range_end(&k).is_some() => Ok(()),
            None => self.stored(k, visit),
        }
    }

    fn put(&mut self, table: &str, key: &[u8], value: Vec<u8>) -> cell0_state::Result<()> {
        self.pending
            .insert(table_key(table, key).map_err(StateError::storage)?, Some(value));
        Ok(())
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> cell0_state::Result<()> {
        self.pending
            .insert(table_key(table, key).map_err(StateError::storage)?, None);
        Ok(())
    }

    fn delete_range(&mut self, table: &str, start: &[u8], end: Option<&[u8]>) -> cell0_state::Result<()> {
        let lo = table_key(table, start).map_err(StateError::storage)?;
        let hi = match end {
            Some(e) => table_key(table, e),
            // A table name holds no NUL, so its prefix always has an end.
            None => table_key(table, b"").map(|p| prefix_end(&p).unwrap_or_default()),
        }
        .map_err(StateError::storage)?;
        if hi <= lo {
            return Ok(());
        }
        let covered: Vec<Vec<u8>> = self
            .pending
            .range(lo.clone()..hi.clone())
            .map(|(k, _)| k.clone())
            .collect();
        for k in covered {
            self.pending.remove(&k);
        }
        self.deleted.push((lo, hi));
        Ok(())
    }

    fn scan(
        &self,
        table: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> cell0_state::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan_state(table, start, end, limit).map_err(StateError::storage)
    }
}

impl<E: ReadView + ?Sized> EngineTxn<'_, E> {
    /// Visits the stored row under the full key `k`, if there is one: from
    /// the row cache if it knows the key, else from the engine (and then
    /// cached, absence too).
    fn stored(&self, k: Vec<u8>, visit: &mut dyn FnMut(&[u8]) -> cell0_state::Result<()>) -> cell0_state::Result<()> {
        let Some(cache) = self.cache else {
            let row = self.engine.get(Cf::State, &k).map_err(StateError::storage)?;
            return row.as_deref().map_or(Ok(()), visit);
        };
        let mut cache = lock_cache(cache);
        if let Some(visited) = cache.read(&k, |row| row.map_or(Ok(()), &mut *visit)) {
            return visited;
        }
        let row = self.engine.get(Cf::State, &k).map_err(StateError::storage)?;
        let visited = row.as_deref().map_or(Ok(()), &mut *visit);
        cache.insert(k, row);
        visited
    }

    /// The end of a range deleted in this step that holds `key`.
    fn deleted_range_end(&self, key: &[u8]) -> Option<&[u8]> {
        self.deleted
            .iter()
            .find(|(s, e)| s.as_slice() <= key && key < e.as_slice())
            .map(|(_, e)| e.as_slice())
    }

    fn scan_state(
        &self,
        table: &str,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        let prefix_len = table.len() + 1;
        let lo = table_key(table, start)?;
        let hi = match end {
            Some(e) => Some(table_key(table, e)?),
            None => prefix_end(&table_key(table, b"")?),
        };
        let upper = match &hi {
            Some(h) => Bound::Excluded(h.clone()),
            None => Bound::Unbounded,
        };
        let overlay: Vec<(&Vec<u8>, &Option<Vec<u8>>)> =
            self.pending.range((Bound::Included(lo.clone()), upper)).collect();
        // Each pending delete can hide at most one stored pair, so this many
        // stored pairs always fill `limit` after merging.
        let deletes = overlay.iter().filter(|(_, v)| v.is_none()).count();
        let want = limit.saturating_add(deletes);
        // Stored pairs outside the ranges deleted in this step: read in
        // pieces that stop at each such range and resume after it.
        let mut stored = Vec::new();
        let mut from = lo.clone();
        while stored.len() < want {
            if let Some(end) = self.deleted_range_end(&from) {
                from = end.to_vec();
                continue;
            }
            if hi.as_ref().is_some_and(|h| from >= *h) {
                break;
            }
            let next_deleted = self.deleted.iter().map(|(s, _)| s).filter(|s| **s > from).min();
            let piece_end = match (next_deleted, &hi) {
                (Some(d), Some(h)) => Some(d.min(h).clone()),
                (Some(d), None) => Some(d.clone()),
                (None, h) => h.clone(),
            };
            let need = want - stored.len();
            let rows = self.engine.scan(Cf::State, &from, piece_end.as_deref(), need)?;
            let full = rows.len() == need;
            stored.extend(rows);
            match piece_end {
                Some(end) if !full => from = end,
                _ => break,
            }
        }

        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = stored.into_iter().collect();
        for (k, v) in overlay {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        Ok(merged
            .into_iter()
            .take(limit)
            .map(|(k, v)| (k[prefix_len..].to_vec(), v))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Durability, Engine, MemEngine};

    #[test]
    fn reads_see_pending_writes_and_tables_are_disjoint() {
        let engine = MemEngine::new();
        let mut b = WriteBatch::new();
        b.put(Cf::State, table_key("t", b"a").unwrap(), b"1".to_vec());
        b.put(Cf::State, table_key("t", b"b").unwrap(), b"2".to_vec());
        b.put(Cf::State, table_key("u", b"a").unwrap(), b"9".to_vec());
        engine.write(b, Durability::Sync).unwrap();

        let mut txn = EngineTxn::new(&engine);
        txn.delete("t", b"a").unwrap();
        txn.put("t", b"c", b"3".to_vec()).unwrap();
        assert_eq!(txn.get("t", b"a").unwrap(), None);
        assert_eq!(txn.get("u", b"a").unwrap(), Some(b"9".to_vec()));
        let all = txn.scan("t", b"", None, 10).unwrap();
        assert_eq!(
            all,
            vec![(b"b".to_vec(), b"2".to_vec()), (b"c".to_vec(), b"3".to_vec())]
        );
        assert_eq!(txn.scan("t", b"", None, 1).unwrap().len(), 1);
        assert!(txn.put("", b"x", b"y".to_vec()).is_err());
        assert!(txn.put("a\0b", b"x", b"y".to_vec()).is_err());
    }

    /// Steps of random puts, deletes and range deletes through a cached
    /// transaction over one engine and an uncached one over another: every
    /// read agrees, across generations of a cache far smaller than the rows.
    #[test]
    fn reads_through_the_row_cache_match_the_engine() {
        let (cached_engine, plain_engine) = (MemEngine::new(), MemEngine::new());
        let cache = Mutex::new(RowCache::with_limit(8 * 80));
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for step in 0..3_000 {
            let mut cached = EngineTxn::new(&cached_engine).with_cache(&cache);
            let mut plain = EngineTxn::new(&plain_engine);
            for _ in 0..1 + next(4) {
                let table = ["t", "u"][next(2) as usize];
                let key = format!("k{}", next(12)).into_bytes();
                match next(10) {
                    0..=3 => assert_eq!(
                        cached.get(table, &key).unwrap(),
                        plain.get(table, &key).unwrap(),
                        "step {step}"
                    ),
                    4..=6 => {
                        let value = format!("v{step}").into_bytes();
                        cached.put(table, &key, value.clone()).unwrap();
                        plain.put(table, &key, value).unwrap();
                    }
                    7 | 8 => {
                        cached.delete(table, &key).unwrap();
                        plain.delete(table, &key).unwrap();
                    }
                    _ => {
                        let end = format!("k{}", next(12)).into_bytes();
                        cached.delete_range(table, &key, Some(&end)).unwrap();
                        plain.delete_range(table, &key, Some(&end)).unwrap();
                    }
                }
            }
            for (txn, engine) in [(cached, &cached_engine), (plain, &plain_engine)] {
                let mut batch = WriteBatch::new();
                txn.into_batch(&mut batch);
                engine.write(batch, Durability::Buffered).unwrap();
            }
        }
        let cached = EngineTxn::new(&cached_engine).with_cache(&cache);
        for table in ["t", "u"] {
            for k in 0..12 {
                let key = format!("k{k}").into_bytes();
                assert_eq!(
                    cached.get(table, &key).unwrap(),
                    plain_engine.get(Cf::State, &table_key(table, &key).unwrap()).unwrap()
                );
            }
        }
    }

    #[test]
    fn a_deleted_range_hides_stored_and_earlier_pending_rows_but_not_later_ones() {
        let engine = MemEngine::new();
        let mut b = WriteBatch::new();
        for k in [b"a", b"b", b"c", b"d", b"e"] {
            b.put(Cf::State, table_key("t", k).unwrap(), b"old".to_vec());
        }
        b.put(Cf::State, table_key("u", b"b").unwrap(), b"9".to_vec());
        engine.write(b, Durability::Sync).unwrap();

        let mut txn = EngineTxn::new(&engine);
        txn.put("t", b"bb", b"pending".to_vec()).unwrap();
        txn.delete_range("t", b"b", Some(b"d")).unwrap();
        txn.put("t", b"c", b"new".to_vec()).unwrap();
        assert_eq!(txn.get("t", b"b").unwrap(), None);
        assert_eq!(txn.get("t", b"bb").unwrap(), None);
        assert_eq!(txn.get("t", b"c").unwrap(), Some(b"new".to_vec()));
        assert_eq!(txn.get("t", b"d").unwrap(), Some(b"old".to_vec()));
        assert_eq!(txn.get("u", b"b").unwrap(), Some(b"9".to_vec()));
        let keys = |rows: Vec<(Vec<u8>, Vec<u8>)>| rows.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        let expect: Vec<Vec<u8>> = vec![b"a".to_vec(), b"c".to_vec(), b"d".to_vec(), b"e".to_vec()];
        assert_eq!(keys(txn.scan("t", b"", None, 10).unwrap()), expect);
        assert_eq!(keys(txn.scan("t", b"", None, 2).unwrap()), expect[..2].to_vec());
        assert_eq!(keys(txn.scan("t", b"b", None, 1).unwrap()), expect[1..2].to_vec());

        // The same result once written, and a whole table at once.
        let mut batch = WriteBatch::new();
        txn.into_batch(&mut batch);
        engine.write(batch, Durability::Sync).unwrap();
        let mut txn = EngineTxn::new(&engine);
        assert_eq!(keys(txn.scan("t", b"", None, 10).unwrap()), expect);
        txn.delete_range("t", b"", None).unwrap();
        assert!(txn.scan("t", b"", None, 10).unwrap().is_empty());
        assert_eq!(txn.get("u", b"b").unwrap(), Some(b"9".to_vec()));
    }
}

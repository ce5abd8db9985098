//! The storage interface of the state machine: named tables of ordered byte
//! keys, read and written through one transaction per apply.
//!
//! The state machine sees nothing else of storage. `cell0-storage` implements
//! [`Txn`] over RocksDB or memory; [`MemTxn`] is a plain in-memory table set
//! for unit tests and the simulator. Implementations must be deterministic:
//! the same calls on the same state give the same results on every node.

use std::collections::BTreeMap;
use std::ops::Bound;

use crate::error::Result;

/// Reads and writes of one state-machine step.
pub trait Txn {
    /// The value of `key` in `table`.
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// Calls `visit` with the value of `key` in `table`, in place, if the
    /// key has one: for a reader that needs a few fields of a row, not a
    /// copy of it.
    fn read(&self, table: &str, key: &[u8], visit: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        match self.get(table, key)? {
            Some(value) => visit(&value),
            None => Ok(()),
        }
    }
    /// Sets `key` in `table` to `value` (taken: rows are encoded for the
    /// write, so the transaction keeps the buffer instead of a copy).
    fn put(&mut self, table: &str, key: &[u8], value: Vec<u8>) -> Result<()>;
    /// Removes `key` from `table`.
    fn delete(&mut self, table: &str, key: &[u8]) -> Result<()>;
    /// Removes every key of `table` with `start <= key < end` (to the
    /// table's end when `end` is `None`): one write however many keys, for
    /// dropping a whole generation of old rows at once.
    fn delete_range(&mut self, table: &str, start: &[u8], end: Option<&[u8]>) -> Result<()>;
    /// Up to `limit` pairs of `table` with `start <= key < end` (unbounded
    /// when `end` is `None`), in key order; nothing when `end <= start`.
    fn scan(&self, table: &str, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
}

/// The smallest key greater than every key starting with `prefix`, or `None`
/// when no such key exists (a prefix of only 0xff bytes).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Tables in memory: a [`Txn`] whose writes apply at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemTxn {
    tables: BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>,
}

impl MemTxn {
    /// No tables.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every row, as `(table, key, value)`, tables and keys in order.
    pub fn rows(&self) -> impl Iterator<Item = (&str, &[u8], &[u8])> {
        self.tables
            .iter()
            .flat_map(|(t, rows)| rows.iter().map(move |(k, v)| (t.as_str(), k.as_slice(), v.as_slice())))
    }
}

impl Txn for MemTxn {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tables.get(table).and_then(|t| t.get(key).cloned()))
    }

    fn read(&self, table: &str, key: &[u8], visit: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
        match self.tables.get(table).and_then(|t| t.get(key)) {
            Some(value) => visit(value),
            None => Ok(()),
        }
    }

    fn put(&mut self, table: &str, key: &[u8], value: Vec<u8>) -> Result<()> {
        self.tables
            .entry(table.to_string())
            .or_default()
            .insert(key.to_vec(), value);
        Ok(())
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<()> {
        if let Some(t) = self.tables.get_mut(table) {
            t.remove(key);
        }
        Ok(())
    }

    fn delete_range(&mut self, table: &str, start: &[u8], end: Option<&[u8]>) -> Result<()> {
        if let Some(t) = self.tables.get_mut(table) {
            t.retain(|k, _| k.as_slice() < start || end.is_some_and(|e| k.as_slice() >= e));
        }
        Ok(())
    }

    fn scan(&self, table: &str, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let Some(t) = self.tables.get(table) else {
            return Ok(Vec::new());
        };
        if end.is_some_and(|e| e <= start) {
            return Ok(Vec::new());
        }
        let upper = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec()));
        Ok(t.range((Bound::Included(start.to_vec()), upper))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_carries_over_0xff() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}

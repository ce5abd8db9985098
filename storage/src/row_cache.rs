//! A cache of state rows for apply's point reads.
//!
//! Applying a put reads the key's stored pair (its previous value, version
//! and creation revision) before it writes the new one, on every replica.
//! A RocksDB point read searches the memtables, which hold every table's
//! recent rows, then the table files: it was a fifth of a follower's CPU
//! under a write load over 100,000 keys (docs/benchmarks.md). This cache
//! answers such reads from memory.
//!
//! What enters: a row that apply read from the engine, or the fact that
//! the key has none. Apply's writes then update the rows already cached
//! (a delete leaves the fact that the key has none), and its range deletes
//! drop theirs, in the same step as they go into the engine's write batch.
//! Rows apply only writes (history events, request answers) never enter,
//! so the cache holds the rows apply reads again: keys that get written
//! and overwritten, and a few bookkeeping rows.
//!
//! Invariant: every cached row equals the engine's row under the same key,
//! as of the last apply step written. Only apply (one step at a time, on
//! openraft's state machine worker) reads and changes the cache; anything
//! else that replaces state (a snapshot install or restore) clears it, and
//! so does a failed write of an apply step. The cache never changes a
//! result, only where it comes from, so replicas need not cache alike.
//!
//! Rows sit in hash maps by table (a lookup touches a few cache lines,
//! where an ordered map or a memtable compares the key along a path of
//! nodes), hashed with foldhash, seeded per process: SipHash, the standard
//! map's, took a fifth of the cache's time (`cell0 bench apply`, see
//! docs/benchmarks.md). The few tables are found by a scan of their
//! prefixes, without hashing.
//! Bounded by [`ROW_CACHE_BYTES`] in two generations: rows enter the young
//! one; when it holds half the bound it becomes the old one and the older
//! rows leave; a hit in the old generation moves the row back to the young
//! one. So rows read again within about half the bound stay. (A single row
//! larger than half the bound, which a value of up to 1 MiB never is, makes
//! up the young generation alone.)

use std::collections::HashMap;

use cell0_state::prefix_end;
use foldhash::fast::RandomState;

/// Most bytes of keys, values and bookkeeping the cache holds.
pub(crate) const ROW_CACHE_BYTES: usize = 64 << 20;
/// Counter of apply's point reads the cache answered (`result="hit"`) or
/// passed to the engine (`result="miss"`).
pub const ROW_CACHE_READS_METRIC: &str = "cell0_state_row_cache_reads_total";
/// Bytes counted per row besides its key and value: two vectors' headers
/// and the map's share of a bucket.
const ROW_OVERHEAD_BYTES: usize = 64;

/// Rows by table, then by full state key; see the module docs.
#[derive(Debug)]
pub(crate) struct RowCache {
    /// By table prefix: a key up to and including its first NUL (every
    /// state key has one after its table's name). A handful of tables.
    tables: Vec<(Vec<u8>, Generations)>,
    /// Bytes of the young generations of all tables.
    young_bytes: usize,
    /// Bytes one generation may hold.
    generation_bytes: usize,
    /// Reads answered and missed since [`RowCache::publish_reads`].
    hits: u64,
    misses: u64,
}

/// Rows by full state key.
type Rows = HashMap<Vec<u8>, Row, RandomState>;

/// One table's rows.
#[derive(Debug, Default)]
struct Generations {
    young: Rows,
    old: Rows,
}

/// A cached row: its value, or `None` for a key known to have none.
type Row = Option<Vec<u8>>;

impl Default for RowCache {
    fn default() -> Self {
        Self::with_limit(ROW_CACHE_BYTES)
    }
}

fn row_bytes(key: &[u8], row: &Row) -> usize {
    key.len() + row.as_ref().map_or(0, Vec::len) + ROW_OVERHEAD_BYTES
}

/// The table prefix of a state key (the whole key if it has no NUL).
fn table_of(key: &[u8]) -> &[u8] {
    let end = key.iter().position(|b| *b == 0).map_or(key.len(), |nul| nul + 1);
    &key[..end]
}

impl RowCache {
    /// The rows of the table `prefix`, if any are cached.
    fn table(&mut self, prefix: &[u8]) -> Option<&mut Generations> {
        self.tables.iter_mut().find(|(p, _)| p == prefix).map(|(_, t)| t)
    }

    /// An empty cache of at most `limit_bytes`.
    pub(crate) fn with_limit(limit_bytes: usize) -> Self {
        Self {
            tables: Vec::new(),
            young_bytes: 0,
            generation_bytes: limit_bytes / 2,
            hits: 0,
            misses: 0,
        }
    }

    /// Adds the reads counted since the last call to
    /// [`ROW_CACHE_READS_METRIC`].
    pub(crate) fn publish_reads(&mut self) {
        for (result, count) in [("hit", &mut self.hits), ("miss", &mut self.misses)] {
            if *count > 0 {
                metrics::counter!(ROW_CACHE_READS_METRIC, "result" => result).increment(std::mem::take(count));
            }
        }
    }

    /// The cached row under `key`, if any (`Some(None)`: the key is known
    /// to have no row).
    #[cfg(test)]
    pub(crate) fn get(&mut self, key: &[u8]) -> Option<Row> {
        self.read(key, |row| row.map(<[u8]>::to_vec))
    }

    /// `f` of the cached row under `key` (`None`: the key is known to have
    /// no row), read in place; `None` if the key is not cached.
    pub(crate) fn read<R>(&mut self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> Option<R> {
        let out = self.lookup(key, f);
        match out {
            Some(_) => self.hits += 1,
            None => self.misses += 1,
        }
        out
    }

    fn lookup<R>(&mut self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> R) -> Option<R> {
        let table = self.table(table_of(key))?;
        if let Some(row) = table.young.get(key) {
            return Some(f(row.as_deref()));
        }
        let (key, row) = table.old.remove_entry(key)?;
        let out = f(row.as_deref());
        self.admit(key, row);
        Some(out)
    }

    /// Caches `row`, just read from the engine under `key`.
    pub(crate) fn insert(&mut self, key: Vec<u8>, row: Row) {
        if let Some(table) = self.table(table_of(&key)) {
            table.old.remove(&key);
        }
        self.admit(key, row);
    }

    /// Applies a write of `key` going into the engine (`None`: a delete)
    /// to a cached row; keys not cached stay so.
    pub(crate) fn write(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Some(table) = self.table(table_of(key)) else {
            return;
        };
        if let Some(row) = table.young.get_mut(key) {
            // Replaced where it is: one lookup for the common case, a row
            // apply has just read. The generations turn if the young one
            // outgrew its share.
            let new = value.map(<[u8]>::to_vec);
            let (was, now) = (row_bytes(key, row), row_bytes(key, &new));
            *row = new;
            self.young_bytes = self.young_bytes - was + now;
            if self.young_bytes > self.generation_bytes {
                self.turn();
            }
            return;
        }
        if let Some((key, _)) = table.old.remove_entry(key) {
            self.admit(key, value.map(<[u8]>::to_vec));
        }
    }

    /// Drops the rows of `[start, end)`. It visits the cached rows of the
    /// range's table (of every table, for a range across tables), in no
    /// particular order (nothing depends on it); apply deletes ranges
    /// seldom (a chunk of history, a generation of request answers), and
    /// in tables whose rows it rarely reads.
    pub(crate) fn remove_range(&mut self, start: &[u8], end: &[u8]) {
        let prefix = table_of(start);
        let within_table = prefix.last() == Some(&0) && prefix_end(prefix).is_some_and(|e| end <= e.as_slice());
        let outside = |k: &[u8]| k < start || k >= end;
        let mut freed = 0;
        let mut visit = |table: &mut Generations| {
            table.young.retain(|k, v| {
                let keep = outside(k);
                if !keep {
                    freed += row_bytes(k, v);
                }
                keep
            });
            table.old.retain(|k, _| outside(k));
        };
        if within_table {
            if let Some(table) = self.table(prefix) {
                visit(table);
            }
        } else {
            self.tables.iter_mut().for_each(|(_, table)| visit(table));
        }
        self.young_bytes -= freed;
    }

    /// Drops every row.
    pub(crate) fn clear(&mut self) {
        self.tables.clear();
        self.young_bytes = 0;
    }

    /// Bytes held, as counted against the bound.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        let old: usize = self
            .tables
            .iter()
            .flat_map(|(_, t)| t.old.iter())
            .map(|(k, v)| row_bytes(k, v))
            .sum();
        self.young_bytes + old
    }

    /// Puts a row (absent from the old generation) into the young one,
    /// turning generations first when it would pass its share of the bound.
    fn admit(&mut self, key: Vec<u8>, row: Row) {
        let prefix = table_of(&key);
        if let Some(prev) = self.table(prefix).and_then(|t| t.young.remove(&key)) {
            self.young_bytes -= row_bytes(&key, &prev);
        }
        let size = row_bytes(&key, &row);
        if self.young_bytes + size > self.generation_bytes && self.young_bytes > 0 {
            self.turn();
        }
        let at = match self.tables.iter().position(|(p, _)| p == prefix) {
            Some(at) => at,
            None => {
                self.tables.push((prefix.to_vec(), Generations::default()));
                self.tables.len() - 1
            }
        };
        self.tables[at].1.young.insert(key, row);
        self.young_bytes += size;
    }

    /// Makes every young generation the old one; the older rows leave.
    /// Their map, emptied, becomes the young one: it keeps its buckets, so
    /// the young generation refills without growing (rehashing every row,
    /// touching fresh pages) again.
    fn turn(&mut self) {
        for (_, table) in &mut self.tables {
            std::mem::swap(&mut table.old, &mut table.young);
            table.young.clear();
        }
        self.young_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_update_only_cached_rows_and_deletes_drop_them() {
        let mut c = RowCache::default();
        c.insert(b"t\0a".to_vec(), Some(b"1".to_vec()));
        c.write(b"t\0a", Some(b"2"));
        c.write(b"t\0b", Some(b"9"));
        assert_eq!(c.get(b"t\0a"), Some(Some(b"2".to_vec())));
        assert_eq!(c.get(b"t\0b"), None, "a key not cached stays so");
        c.write(b"t\0a", None);
        assert_eq!(c.get(b"t\0a"), Some(None), "a deleted key is known to have no row");
        c.insert(b"t\0c".to_vec(), None);
        c.write(b"t\0c", Some(b"3"));
        assert_eq!(c.get(b"t\0c"), Some(Some(b"3".to_vec())));
    }

    #[test]
    fn range_deletes_drop_rows_of_both_generations() {
        let key = |k: &str| format!("t\0{k}").into_bytes();
        let mut c = RowCache::with_limit(2 * (row_bytes(&key("k1"), &Some(b"v".to_vec())) * 3));
        for k in ["k1", "k2", "k3", "k4"] {
            c.insert(key(k), Some(b"v".to_vec()));
        }
        c.insert(b"u\0k2".to_vec(), Some(b"v".to_vec()));
        assert!(
            c.tables.iter().any(|(_, t)| !t.old.is_empty()),
            "the first rows moved to the old generation"
        );
        c.remove_range(&key("k2"), &key("k4"));
        assert_eq!(c.get(&key("k1")), Some(Some(b"v".to_vec())));
        assert_eq!(c.get(&key("k2")), None);
        assert_eq!(c.get(&key("k3")), None);
        assert_eq!(c.get(&key("k4")), Some(Some(b"v".to_vec())));
        assert_eq!(c.get(b"u\0k2"), Some(Some(b"v".to_vec())));
        // A whole table, and a range across tables.
        c.remove_range(b"t\0", b"t\x01");
        assert_eq!(c.get(&key("k1")), None);
        assert_eq!(c.get(b"u\0k2"), Some(Some(b"v".to_vec())));
        c.insert(key("k1"), Some(b"v".to_vec()));
        c.remove_range(b"a\0", b"z\0");
        assert_eq!(c.get(&key("k1")), None);
        assert_eq!(c.get(b"u\0k2"), None);
        c.insert(key("k1"), Some(b"v".to_vec()));
        c.clear();
        assert_eq!(c.get(&key("k1")), None);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn it_stays_within_its_bound_and_keeps_rows_read_again() {
        let limit = 100 * row_bytes(b"key-0000", &Some(vec![0; 100]));
        let mut c = RowCache::with_limit(limit);
        for i in 0..10_000u32 {
            c.insert(format!("key-{i:04}").into_bytes(), Some(vec![0; 100]));
            // One row read between every insert never leaves.
            assert!(c.get(b"key-0000").is_some(), "after {i} inserts");
            assert!(c.bytes() <= limit, "{} bytes after {i} inserts", c.bytes());
        }
        c.write(b"key-0000", Some(&[1; 200]));
        assert_eq!(c.get(b"key-0000"), Some(Some(vec![1; 200])));
        assert!(c.bytes() <= limit);
    }
}

//! In-memory engine for unit tests and the deterministic simulator.
//!
//! Same semantics as [`crate::RocksEngine`] except durability: everything is
//! lost when the value is dropped. Never used on the real path.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use crate::Result;
use crate::engine::{Cf, Durability, Engine, ReadView, WriteBatch, WriteOp};

type Table = BTreeMap<Vec<u8>, Vec<u8>>;

/// Ordered maps per column family behind one lock.
#[derive(Debug, Default)]
pub struct MemEngine {
    tables: Mutex<BTreeMap<Cf, Table>>,
}

impl MemEngine {
    /// An empty engine.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<Cf, Table>> {
        // A panic while holding the lock can only come from a bug in this
        // module's plain map operations; the maps stay consistent, so recover.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn scan_table(t: Option<&Table>, start: &[u8], end: Option<&[u8]>, limit: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Some(t) = t else { return Vec::new() };
    let upper = match end {
        Some(e) => Bound::Excluded(e.to_vec()),
        None => Bound::Unbounded,
    };
    t.range((Bound::Included(start.to_vec()), upper))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// A frozen copy of the maps, for [`Engine::with_view`].
struct MemView(BTreeMap<Cf, Table>);

impl ReadView for MemView {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.0.get(&cf).and_then(|t| t.get(key).cloned()))
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(scan_table(self.0.get(&cf), start, end, limit))
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .0
            .get(&cf)
            .and_then(|t| t.last_key_value().map(|(k, v)| (k.clone(), v.clone()))))
    }
}

impl ReadView for MemEngine {
    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.lock().get(&cf).and_then(|t| t.get(key).cloned()))
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(scan_table(self.lock().get(&cf), start, end, limit))
    }

    fn last(&self, cf: Cf) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .lock()
            .get(&cf)
            .and_then(|t| t.last_key_value().map(|(k, v)| (k.clone(), v.clone()))))
    }
}

impl Engine for MemEngine {
    fn write(&self, batch: WriteBatch, _durability: Durability) -> Result<()> {
        let mut tables = self.lock();
        for op in batch.ops() {
            match op {
                WriteOp::Put { cf, key, value } => {
                    tables.entry(*cf).or_default().insert(key.clone(), value.clone());
                }
                WriteOp::Delete { cf, key } => {
                    tables.entry(*cf).or_default().remove(key);
                }
                WriteOp::DeleteRange { cf, start, end } => {
                    if start >= end {
                        continue;
                    }
                    let t = tables.entry(*cf).or_default();
                    let doomed: Vec<Vec<u8>> = t.range(start.clone()..end.clone()).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        t.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }

    fn with_view(&self, f: &mut dyn FnMut(&dyn ReadView) -> Result<()>) -> Result<()> {
        let view = MemView(self.lock().clone());
        f(&view)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

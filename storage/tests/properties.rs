//! Property tests of [`EngineTxn`]: its overlay of pending writes over an
//! engine must read like one ordered map per table.
//!
//! Each case writes random rows to a [`MemEngine`] (through an `EngineTxn`
//! turned into a batch, the way the state machine commits), then runs random
//! puts, deletes, gets and scans on a new `EngineTxn` over the engine, and the
//! same operations on a second one over a point-in-time view, checking every
//! read against a `BTreeMap` model. Finally it commits the pending writes and
//! checks the engine's state-table rows against the model. Keys are 0..=2 of
//! four bytes (0x00 and 0xff among them; 21 keys per table), so pending puts
//! and deletes often overwrite or hide stored rows inside a scanned range, and
//! the tables `a` and `ab` share a name prefix.
//!
//! Deterministic: a fixed case count and seed, no clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::ops::Bound;

mod common;

use cell0_storage::{Cf, Durability, Engine, EngineTxn, MemEngine, ReadView, Txn, WriteBatch};
use common::config;
use proptest::prelude::*;

/// Tables with a shared name prefix, to catch a table's scan reading into
/// its neighbour's rows.
const TABLES: [&str; 3] = ["a", "ab", "b"];

type Model = BTreeMap<&'static str, BTreeMap<Vec<u8>, Vec<u8>>>;

#[derive(Debug, Clone)]
enum Op {
    Put(usize, Vec<u8>, Vec<u8>),
    Delete(usize, Vec<u8>),
    Get(usize, Vec<u8>),
    Scan {
        table: usize,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
        limit: usize,
    },
}

fn key() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(vec![0x00u8, 0x01, b'a', 0xff]), 0..3)
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..4)
}

fn table() -> impl Strategy<Value = usize> {
    0..TABLES.len()
}

fn limit() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..6, 1 => Just(usize::MAX)]
}

/// A scan's bounds, with `start <= end` (the `Txn` contract's ranges; see the
/// test below for reversed ones).
fn bounds() -> impl Strategy<Value = (Vec<u8>, Option<Vec<u8>>)> {
    (key(), prop::option::weighted(0.6, key())).prop_map(|(a, b)| match b {
        Some(b) if b < a => (b, Some(a)),
        b => (a, b),
    })
}

fn write() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (table(), key(), value()).prop_map(|(t, k, v)| Op::Put(t, k, v)),
        2 => (table(), key()).prop_map(|(t, k)| Op::Delete(t, k)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => write(),
        2 => (table(), key()).prop_map(|(t, k)| Op::Get(t, k)),
        4 => (table(), bounds(), limit()).prop_map(|(table, (start, end), limit)| Op::Scan {
            table,
            start,
            end,
            limit,
        }),
    ]
}

/// Applies a write to the model; reads return `None`.
fn model_write(model: &mut Model, op: &Op) {
    match op {
        Op::Put(t, k, v) => {
            model.entry(TABLES[*t]).or_default().insert(k.clone(), v.clone());
        }
        Op::Delete(t, k) => {
            if let Some(rows) = model.get_mut(TABLES[*t]) {
                rows.remove(k);
            }
        }
        Op::Get(..) | Op::Scan { .. } => {}
    }
}

type Rows = Vec<(Vec<u8>, Vec<u8>)>;

fn model_scan(model: &Model, table: &str, start: &[u8], end: Option<&[u8]>, limit: usize) -> Rows {
    let Some(rows) = model.get(table) else {
        return Vec::new();
    };
    let upper = end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec()));
    rows.range((Bound::Included(start.to_vec()), upper))
        .take(limit)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Runs `ops` on `txn` and on `model`, checking every read.
fn run_ops<E: ReadView + ?Sized>(
    txn: &mut EngineTxn<'_, E>,
    model: &mut Model,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Put(t, k, v) => txn.put(TABLES[*t], k, v.clone()).unwrap(),
            Op::Delete(t, k) => txn.delete(TABLES[*t], k).unwrap(),
            Op::Get(t, k) => {
                let want = model.get(TABLES[*t]).and_then(|rows| rows.get(k).cloned());
                prop_assert_eq!(txn.get(TABLES[*t], k).unwrap(), want, "op {}: {:?}", i, op);
            }
            Op::Scan {
                table,
                start,
                end,
                limit,
            } => {
                let t = TABLES[*table];
                let got = txn.scan(t, start, end.as_deref(), *limit).unwrap();
                let want = model_scan(model, t, start, end.as_deref(), *limit);
                prop_assert_eq!(got, want, "op {}: {:?}", i, op);
            }
        }
        model_write(model, op);
    }
    Ok(())
}

/// Every state-table row of the engine as `(table, key, value)`, split at the
/// first NUL (table names hold none).
fn engine_rows(engine: &MemEngine) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    engine
        .scan(Cf::State, b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            let nul = k.iter().position(|&b| b == 0).expect("a table key has a NUL");
            (String::from_utf8(k[..nul].to_vec()).unwrap(), k[nul + 1..].to_vec(), v)
        })
        .collect()
}

fn model_rows(model: &Model) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let mut rows: Vec<_> = model
        .iter()
        .flat_map(|(t, rows)| rows.iter().map(|(k, v)| (t.to_string(), k.clone(), v.clone())))
        .collect();
    // Raw keys order by table name bytes, then NUL, then key: "a\0..." sorts
    // before "ab\0...", the same order as (name, key) for these names.
    rows.sort();
    rows
}

/// Commits `txn`'s pending writes to `engine` in one batch.
fn commit<E: ReadView + ?Sized>(engine: &MemEngine, txn: EngineTxn<'_, E>) {
    let mut batch = WriteBatch::new();
    txn.into_batch(&mut batch);
    engine.write(batch, Durability::Sync).unwrap();
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn engine_txn_reads_like_a_map(
        stored in prop::collection::vec(write(), 0..24),
        ops in prop::collection::vec(op(), 0..32),
    ) {
        let engine = MemEngine::new();
        let mut model = Model::new();

        // The stored rows, committed the way the state machine commits.
        let mut setup = EngineTxn::new(&engine);
        run_ops(&mut setup, &mut model, &stored)?;
        commit(&engine, setup);
        prop_assert_eq!(engine_rows(&engine), model_rows(&model));
        let stored_model = model.clone();

        // Over the engine itself.
        let mut txn = EngineTxn::new(&engine);
        run_ops(&mut txn, &mut model, &ops)?;

        // The same operations over a point-in-time view agree.
        engine
            .with_view(&mut |view| {
                let mut view_model = stored_model.clone();
                let mut over_view = EngineTxn::new(view);
                run_ops(&mut over_view, &mut view_model, &ops)
                    .map_err(|e| cell0_storage::Error::Io(e.to_string()))
            })
            .unwrap();

        // Nothing pending reached the engine before the commit.
        prop_assert_eq!(engine_rows(&engine), model_rows(&stored_model));
        commit(&engine, txn);
        prop_assert_eq!(engine_rows(&engine), model_rows(&model));

        // A fresh transaction reads the committed state per table.
        let fresh = EngineTxn::new(&engine);
        for t in TABLES {
            prop_assert_eq!(
                fresh.scan(t, b"", None, usize::MAX).unwrap(),
                model_scan(&model, t, b"", None, usize::MAX)
            );
        }
    }
}

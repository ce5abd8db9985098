//! The replicated key-value state machine and its read side.
//!
//! Tables (all in the storage crate's state column family):
//! - `kv`: user key -> its value and etcd-style revisions,
//! - `kv_events`: revision (big-endian) -> [`StateEvent`], the last
//!   [`WATCH_HISTORY`] changes, so watchers can resume from a revision,
//! - `meta`: `revision` -> the store's current revision,
//! - `models`: the model registry (see [`crate::registry`]),
//! - `node_resources`: what each node offers (see [`crate::nodes`]).
//!
//! Revisions work like etcd's: a store-wide counter that every mutation
//! increments, so a key's `mod_revision` orders all writes of the cluster.
//! Everything here is deterministic: no clock, no randomness, ordered maps only.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use cell0_storage::{Apply, Txn};
use openraft::LogId;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::command::{Command, KeyValue, Limits, Response};
use crate::error::{ConsensusError, Result};
use crate::types::TypeConfig;
use crate::{nodes, registry};

const KV_TABLE: &str = "kv";
const EVENTS_TABLE: &str = "kv_events";
const META_TABLE: &str = "meta";
const REVISION_KEY: &[u8] = b"revision";

/// How many of the latest changes are kept for watchers resuming from an old
/// revision. Part of the replicated logic: every node must use the same value.
pub const WATCH_HISTORY: u64 = 10_000;
/// Most pairs one range read returns.
pub const MAX_RANGE_LIMIT: usize = 10_000;

/// A stored value with its revisions; the key is the table key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

impl Record {
    fn into_kv(self, key: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: self.value,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
}

/// The kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A key was created or overwritten.
    Put,
    /// A key was removed.
    Delete,
}

/// One applied change, as watchers see it. Its revision is `kv.mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The pair after the change; for deletes the value is empty.
    pub kv: KeyValue,
}

impl StateEvent {
    /// The revision of the change.
    pub fn revision(&self) -> u64 {
        self.kv.mod_revision
    }
}

/// What the state machine publishes after each stored apply.
#[derive(Debug, Clone)]
pub enum Applied {
    /// Changes of one apply call, in revision order (possibly empty).
    Events(Arc<[StateEvent]>),
    /// A snapshot replaced the state: subscribers must re-read from history.
    Reset {
        /// The store revision after the install.
        revision: u64,
    },
}

/// The KV state machine: applies [`Command`]s and publishes [`Applied`].
pub struct KvStateMachine {
    events: broadcast::Sender<Applied>,
    /// Cached current revision, for status reports without a read.
    revision: AtomicU64,
    /// Set by an apply that touched the registry; cleared when published.
    registry_dirty: AtomicBool,
    /// Bumped after every stored change of the registry (and snapshot
    /// install): a hint to re-read it, which cannot lag like a broadcast.
    registry_changes: watch::Sender<u64>,
}

impl KvStateMachine {
    /// A state machine whose broadcast buffers `capacity` apply notifications
    /// per subscriber before it lags.
    pub fn new(capacity: usize) -> Self {
        let (events, _) = broadcast::channel(capacity.max(1));
        Self {
            events,
            revision: AtomicU64::new(0),
            registry_dirty: AtomicBool::new(false),
            registry_changes: watch::Sender::new(0),
        }
    }

    /// A receiver that sees a new value after each stored registry change.
    pub fn watch_registry(&self) -> watch::Receiver<u64> {
        self.registry_changes.subscribe()
    }

    fn registry_changed(&self) {
        self.registry_changes.send_modify(|generation| *generation += 1);
    }

    /// Subscribes to apply notifications.
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.events.subscribe()
    }

    /// The revision of the last stored apply, as cached.
    pub fn cached_revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Loads the cached revision from storage (after open).
    pub fn load_revision(&self, txn: &dyn Txn) -> Result<()> {
        self.revision.store(revision(txn)?, Ordering::Release);
        Ok(())
    }
}

/// The store's current revision.
pub fn revision(txn: &dyn Txn) -> Result<u64> {
    match txn.get(META_TABLE, REVISION_KEY)? {
        Some(b) => decode_u64(&b),
        None => Ok(0),
    }
}

fn decode_u64(b: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = b
        .try_into()
        .map_err(|_| ConsensusError::Internal("stored revision is not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(arr))
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| ConsensusError::Internal(format!("corrupted {what}: {e}")))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| ConsensusError::Internal(format!("encode: {e}")))
}

/// The pair stored under `key`.
pub fn get(txn: &dyn Txn, key: &[u8]) -> Result<Option<KeyValue>> {
    match txn.get(KV_TABLE, key)? {
        Some(b) => Ok(Some(decode::<Record>("record", &b)?.into_kv(key))),
        None => Ok(None),
    }
}

/// A page of pairs whose keys start with `prefix` and sort after
/// `start_after` (if not empty), and whether more pairs match.
pub fn range(txn: &dyn Txn, prefix: &[u8], start_after: &[u8], limit: usize) -> Result<(Vec<KeyValue>, bool)> {
    let limit = if limit == 0 {
        MAX_RANGE_LIMIT
    } else {
        limit.min(MAX_RANGE_LIMIT)
    };
    let start = if start_after.is_empty() || start_after < prefix {
        prefix.to_vec()
    } else {
        let mut s = start_after.to_vec();
        s.push(0);
        s
    };
    let end = cell0_storage::prefix_end(prefix);
    let rows = txn.scan(KV_TABLE, &start, end.as_deref(), limit + 1)?;
    let more = rows.len() > limit;
    let kvs = rows
        .into_iter()
        .take(limit)
        .map(|(k, v)| Ok(decode::<Record>("record", &v)?.into_kv(&k)))
        .collect::<Result<Vec<_>>>()?;
    Ok((kvs, more))
}

/// Changes with revision >= `from` under `prefix`, at most `limit`, in
/// revision order. Fails with [`ConsensusError::Compacted`] when `from` is
/// older than the retained history.
pub fn history(txn: &dyn Txn, prefix: &[u8], from: u64, limit: usize) -> Result<Vec<StateEvent>> {
    let current = revision(txn)?;
    let oldest = current.saturating_sub(WATCH_HISTORY) + 1;
    if from < oldest && from <= current {
        return Err(ConsensusError::Compacted {
            requested: from,
            oldest,
        });
    }
    let mut out = Vec::new();
    let mut start = from.max(1);
    // Scanning pages keeps memory bounded when the prefix filter rejects most
    // events.
    while out.len() < limit {
        let rows = txn.scan(EVENTS_TABLE, &start.to_be_bytes(), None, 1024)?;
        let Some((last, _)) = rows.last() else { break };
        start = decode_u64(last)?.saturating_add(1);
        let page_full = rows.len() == 1024;
        for (_, v) in rows {
            let ev: StateEvent = decode("event", &v)?;
            if ev.kv.key.starts_with(prefix) {
                out.push(ev);
                if out.len() == limit {
                    break;
                }
            }
        }
        if !page_full {
            break;
        }
    }
    Ok(out)
}

/// Applies `cmd` at `rev` (the revision before it), bumping `rev` per
/// mutation.
fn apply_command(txn: &mut dyn Txn, cmd: &Command, rev: &mut u64, events: &mut Vec<StateEvent>) -> Result<Response> {
    match cmd {
        Command::Put { key, value } => {
            let prev = get(txn, key)?;
            let kv = write(txn, key, value, prev.as_ref(), rev, events)?;
            Ok(Response::Put { kv, prev })
        }
        Command::Delete { key } => {
            let prev = get(txn, key)?;
            if prev.is_some() {
                *rev += 1;
                txn.delete(KV_TABLE, key)?;
                record_event(
                    txn,
                    events,
                    StateEvent {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key: key.clone(),
                            value: Vec::new(),
                            create_revision: 0,
                            mod_revision: *rev,
                            version: 0,
                        },
                    },
                )?;
            }
            Ok(Response::Delete { revision: *rev, prev })
        }
        Command::Cas {
            key,
            expected_revision,
            value,
        } => {
            let current = get(txn, key)?;
            let current_rev = current.as_ref().map_or(0, |kv| kv.mod_revision);
            if current_rev != *expected_revision {
                return Ok(Response::Cas {
                    revision: *rev,
                    succeeded: false,
                    kv: current,
                });
            }
            let kv = write(txn, key, value, current.as_ref(), rev, events)?;
            Ok(Response::Cas {
                revision: *rev,
                succeeded: true,
                kv: Some(kv),
            })
        }
        Command::Batch(cmds) => {
            let mut out = Vec::with_capacity(cmds.len());
            for c in cmds {
                out.push(apply_command(txn, c, rev, events)?);
            }
            Ok(Response::Batch(out))
        }
        Command::Model(m) => Ok(Response::Model(registry::apply(txn, m)?)),
        Command::Node(n) => Ok(Response::Node {
            stored: nodes::apply(txn, n)?,
        }),
    }
}

fn touches_registry(cmd: &Command) -> bool {
    match cmd {
        Command::Model(_) => true,
        Command::Batch(cmds) => cmds.iter().any(touches_registry),
        Command::Put { .. } | Command::Delete { .. } | Command::Cas { .. } | Command::Node(_) => false,
    }
}

fn write(
    txn: &mut dyn Txn,
    key: &[u8],
    value: &[u8],
    prev: Option<&KeyValue>,
    rev: &mut u64,
    events: &mut Vec<StateEvent>,
) -> Result<KeyValue> {
    *rev += 1;
    let record = Record {
        value: value.to_vec(),
        create_revision: prev.map_or(*rev, |p| p.create_revision),
        mod_revision: *rev,
        version: prev.map_or(1, |p| p.version + 1),
    };
    txn.put(KV_TABLE, key, &encode(&record)?)?;
    let kv = record.into_kv(key);
    record_event(
        txn,
        events,
        StateEvent {
            kind: EventKind::Put,
            kv: kv.clone(),
        },
    )?;
    Ok(kv)
}

fn record_event(txn: &mut dyn Txn, events: &mut Vec<StateEvent>, ev: StateEvent) -> Result<()> {
    let rev = ev.revision();
    txn.put(EVENTS_TABLE, &rev.to_be_bytes(), &encode(&ev)?)?;
    if rev > WATCH_HISTORY {
        txn.delete(EVENTS_TABLE, &(rev - WATCH_HISTORY).to_be_bytes())?;
    }
    events.push(ev);
    Ok(())
}

impl Apply<TypeConfig> for KvStateMachine {
    type Event = StateEvent;

    fn apply(
        &self,
        txn: &mut dyn Txn,
        _log_id: &LogId<u64>,
        cmd: &Command,
        events: &mut Vec<StateEvent>,
    ) -> cell0_storage::Result<Response> {
        // Node-local limits may differ between nodes, so apply checks only the
        // fixed ones: every replica must reach the same verdict.
        let fixed = Limits {
            max_batch_commands: usize::MAX,
        };
        if let Err(e) = cmd.validate(&fixed) {
            return Ok(Response::Rejected(e.to_string()));
        }
        if touches_registry(cmd) {
            self.registry_dirty.store(true, Ordering::Release);
        }
        let run = |txn: &mut dyn Txn, events: &mut Vec<StateEvent>| -> Result<Response> {
            let mut rev = revision(txn)?;
            let response = apply_command(txn, cmd, &mut rev, events)?;
            txn.put(META_TABLE, REVISION_KEY, &rev.to_be_bytes())?;
            Ok(response)
        };
        run(txn, events).map_err(|e| cell0_storage::Error::Io(e.to_string()))
    }

    fn empty_response(&self) -> Response {
        Response::Empty
    }

    fn publish(&self, events: Vec<StateEvent>) {
        if let Some(last) = events.last() {
            self.revision.store(last.revision(), Ordering::Release);
        }
        // No subscriber is not an error: watchers come and go.
        let _ = self.events.send(Applied::Events(events.into()));
        if self.registry_dirty.swap(false, Ordering::AcqRel) {
            self.registry_changed();
        }
    }

    fn snapshot_installed(&self, state: &dyn Txn) {
        match revision(state) {
            Ok(rev) => self.revision.store(rev, Ordering::Release),
            Err(e) => tracing::error!(error = %e, "reading the revision of an installed snapshot"),
        }
        // Subscribers missed the changes the snapshot covers: they resync
        // from the retained history.
        let _ = self.events.send(Applied::Reset {
            revision: self.cached_revision(),
        });
        self.registry_changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cell0_storage::{Durability, EngineTxn, MemEngine, WriteBatch};

    fn put(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        }
    }

    /// Applies `cmds` as separate entries, committing each like the store does.
    fn run(engine: &MemEngine, sm: &KvStateMachine, cmds: &[Command]) -> Vec<Response> {
        let mut out = Vec::new();
        for (i, c) in cmds.iter().enumerate() {
            let mut txn = EngineTxn::new(engine);
            let mut events = Vec::new();
            let log_id = LogId::new(openraft::CommittedLeaderId::new(1, 1), i as u64 + 1);
            out.push(sm.apply(&mut txn, &log_id, c, &mut events).unwrap());
            let mut batch = WriteBatch::new();
            txn.into_batch(&mut batch);
            cell0_storage::Engine::write(engine, batch, Durability::Sync).unwrap();
            sm.publish(events);
        }
        out
    }

    #[test]
    fn revisions_count_mutations_like_etcd() {
        let engine = MemEngine::new();
        let sm = KvStateMachine::new(16);
        let out = run(&engine, &sm, &[put("a", "1"), put("b", "1"), put("a", "2")]);
        let Response::Put { kv, prev } = &out[2] else {
            panic!("{out:?}")
        };
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 3, 2));
        assert_eq!(prev.as_ref().unwrap().value, b"1");
        let txn = EngineTxn::new(&engine);
        assert_eq!(revision(&txn).unwrap(), 3);
        // Deleting an absent key changes nothing.
        let out = run(&engine, &sm, &[Command::Delete { key: b"zz".to_vec() }]);
        assert_eq!(
            out[0],
            Response::Delete {
                revision: 3,
                prev: None
            }
        );
        let out = run(&engine, &sm, &[Command::Delete { key: b"a".to_vec() }, put("a", "3")]);
        assert!(matches!(
            &out[0],
            Response::Delete {
                revision: 4,
                prev: Some(_)
            }
        ));
        let Response::Put { kv, .. } = &out[1] else { panic!() };
        assert_eq!((kv.create_revision, kv.version), (5, 1), "recreated key starts over");
    }

    #[test]
    fn cas_compares_mod_revision_and_zero_means_absent() {
        let engine = MemEngine::new();
        let sm = KvStateMachine::new(16);
        let cas = |rev, v: &str| Command::Cas {
            key: b"k".to_vec(),
            expected_revision: rev,
            value: v.as_bytes().to_vec(),
        };
        let out = run(&engine, &sm, &[cas(0, "a"), cas(0, "b"), cas(1, "c"), cas(1, "d")]);
        assert!(matches!(&out[0], Response::Cas { succeeded: true, .. }));
        let Response::Cas { succeeded, kv, .. } = &out[1] else {
            panic!()
        };
        assert!(!succeeded);
        assert_eq!(kv.as_ref().unwrap().value, b"a", "failure reports the current pair");
        assert!(matches!(
            &out[2],
            Response::Cas {
                succeeded: true,
                revision: 2,
                ..
            }
        ));
        assert!(matches!(&out[3], Response::Cas { succeeded: false, .. }));
    }

    #[test]
    fn batch_is_one_atomic_step_with_ordered_effects() {
        let engine = MemEngine::new();
        let sm = KvStateMachine::new(16);
        let mut rx = sm.subscribe();
        let batch = Command::Batch(vec![
            put("x", "1"),
            Command::Cas {
                key: b"x".to_vec(),
                expected_revision: 1,
                value: b"2".to_vec(),
            },
            Command::Delete { key: b"x".to_vec() },
        ]);
        let out = run(&engine, &sm, &[batch]);
        let Response::Batch(parts) = &out[0] else { panic!() };
        assert!(
            matches!(&parts[1], Response::Cas { succeeded: true, .. }),
            "sees the earlier put"
        );
        assert!(matches!(&parts[2], Response::Delete { prev: Some(_), .. }));
        let Applied::Events(evs) = rx.try_recv().unwrap() else {
            panic!()
        };
        let revs: Vec<u64> = evs.iter().map(StateEvent::revision).collect();
        assert_eq!(revs, vec![1, 2, 3], "one notification for the whole batch");
    }

    #[test]
    fn oversize_input_is_rejected_identically_by_apply() {
        let engine = MemEngine::new();
        let sm = KvStateMachine::new(16);
        let out = run(
            &engine,
            &sm,
            &[Command::Batch(vec![
                put("ok", "1"),
                Command::Put {
                    key: vec![1; crate::command::MAX_KEY_BYTES + 1],
                    value: vec![],
                },
            ])],
        );
        assert!(
            matches!(&out[0], Response::Rejected(m) if m.contains("batch[1].key")),
            "{out:?}"
        );
        let txn = EngineTxn::new(&engine);
        assert_eq!(
            get(&txn, b"ok").unwrap(),
            None,
            "nothing of a rejected batch is applied"
        );
    }

    #[test]
    fn range_pages_and_history_resumes() {
        let engine = MemEngine::new();
        let sm = KvStateMachine::new(16);
        let cmds: Vec<Command> = (0..25)
            .map(|i| put(&format!("p/{i:02}"), "v"))
            .chain([put("q", "v")])
            .collect();
        run(&engine, &sm, &cmds);
        let txn = EngineTxn::new(&engine);
        let (page, more) = range(&txn, b"p/", b"", 10).unwrap();
        assert_eq!(page.len(), 10);
        assert!(more);
        let (page2, _) = range(&txn, b"p/", &page[9].key, 10).unwrap();
        assert_eq!(page2[0].key, b"p/10");
        let (all, more) = range(&txn, b"p/", b"", 0).unwrap();
        assert_eq!((all.len(), more), (25, false));
        let evs = history(&txn, b"p/", 20, 100).unwrap();
        assert_eq!(
            evs.iter().map(StateEvent::revision).collect::<Vec<_>>(),
            vec![20, 21, 22, 23, 24, 25]
        );
        assert!(
            history(&txn, b"", 27, 100).unwrap().is_empty(),
            "future revisions are empty, not errors"
        );
    }

    #[test]
    fn history_is_bounded_and_compaction_is_reported() {
        let engine = MemEngine::new();
        let sm = KvStateMachine::new(16);
        let n = WATCH_HISTORY + 5;
        let batch = Command::Batch((0..n).map(|i| put(&format!("k{}", i % 7), "v")).collect());
        run(&engine, &sm, &[batch]);
        let txn = EngineTxn::new(&engine);
        let err = history(&txn, b"", 3, 10).unwrap_err();
        assert_eq!(
            err,
            ConsensusError::Compacted {
                requested: 3,
                oldest: 6
            }
        );
        assert_eq!(history(&txn, b"", 6, 1).unwrap()[0].revision(), 6);
        let stored = txn.scan(EVENTS_TABLE, b"", None, usize::MAX).unwrap().len() as u64;
        assert_eq!(stored, WATCH_HISTORY);
    }
}

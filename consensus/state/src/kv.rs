//! The key-value table with etcd-style revisions, its change history, the
//! dispatch of requests to the request window that makes writes
//! exactly-once, and the read side.
//!
//! Tables (all in the storage crate's state column family):
//! - `kv`: user key -> its value and etcd-style revisions,
//! - `kv_events`: revision (big-endian) -> a [`StateEvent`], or in the
//!   third layout the last revision of an apply step -> its events; the
//!   newest changes: [`WATCH_HISTORY`] of them (in chunks, up to a chunk
//!   more) and at most [`WATCH_HISTORY_BYTES`] of stored rows (always at
//!   least the newest one), so watchers can resume from a revision,
//! - `kv_event_values` (third layout): revision -> the value a retained
//!   event's pair held when a later write replaced or deleted it,
//! - `meta`: `revision` -> the store's current revision, `cluster_id` -> the
//!   cluster's id, the history's bookkeeping (`history_window`,
//!   `history_chunks` or `history_groups`, see "The history's bounds"
//!   below), and the request window's,
//! - the request window (exactly-once writes), in [`crate::requests`],
//! - `models`: the model registry (see [`crate::registry`]),
//! - `node_resources`: what each node offers (see [`crate::nodes`]).
//!
//! Revisions work like etcd's: a store-wide counter that every mutation
//! increments, so a key's `mod_revision` orders all writes of the cluster.
//! Everything here is deterministic: no clock, no randomness, ordered maps only.
//! Apply checks no size limit (those are checked before proposing, and may
//! change between versions); the constants it does use (history length and
//! bytes, request window) are part of the log format and change only with a
//! new command variant.
//!
//! The history's bounds come in three layouts, and the log decides which
//! one a replica uses (the first `Command::RequestV2` switches to the
//! second, as it switches the request window, see [`crate::requests`]; the
//! first `Command::RequestV3` to the third):
//!
//! - **Event by event** (`history_window`): every event row is counted by
//!   its stored length (layout byte included), and after each new event the
//!   oldest events leave, in revision order, until at most [`WATCH_HISTORY`]
//!   remain and their rows hold at most [`WATCH_HISTORY_BYTES`] (the newest
//!   always stays). The `history_window` row keeps the oldest retained
//!   revision and the running byte total, so apply never rescans the table,
//!   and [`history`] reports compaction from that oldest revision. Once the
//!   history is full, every event deletes one row and reads it first.
//! - **In chunks** (`history_chunks`): events are counted in chunks of
//!   consecutive revisions; a chunk closes at [`HISTORY_CHUNK_EVENTS`] events
//!   or [`HISTORY_CHUNK_BYTES`]. The oldest chunk leaves whole, with one
//!   range delete, when the younger chunks alone hold [`WATCH_HISTORY`]
//!   events or all of them more than [`WATCH_HISTORY_BYTES`] (the newest
//!   chunk always stays). So the history keeps at least the newest
//!   [`WATCH_HISTORY`] events within the byte bound, as before, and at most
//!   a chunk more; an event writes one row. The switch turns the retained
//!   events into the first chunk.
//! - **In groups** (`history_groups`, the same chunks): an apply step's
//!   events are one row under the revision of its last event (their
//!   revisions are consecutive), holding each event's kind, key and
//!   revisions but no value: a put's value is its pair's for as long as
//!   the pair is of that revision. A write that replaces or deletes a pair
//!   whose event the history keeps first copies the pair's value to
//!   `kv_event_values` under that revision, counted in the event's chunk.
//!   A chunk closes only between steps, so evicting it (one range delete
//!   in each of the two tables) drops whole groups and exactly their kept
//!   values; and a scan from any revision finds the group holding it
//!   first, as groups are keyed by their last revision. A step writes one
//!   history row instead of one per event, and no copy of a value its pair
//!   still holds: under puts to many keys only the fraction of writes that
//!   replace a pair written within the history's span copy a value (about
//!   a tenth at 10,000 events over 100,000 keys). The switch keeps the
//!   chunks; events stored before it keep their own rows and values, and
//!   a step that switches groups only the events after the switch.
//!
//! State written before the byte bound (an older data dir, or a snapshot from an
//! older build) has no `history_window` row. Then [`history`] uses the count
//! bound alone, which is exactly what older builds kept, and the first event
//! applied rebuilds the row inside apply by scanning `kv_events` once (in
//! key order, summing stored lengths), then evicts as usual. Every replica
//! holds the same rows at the same log index, so every replica rebuilds the
//! same row. The result does not depend on when the row was built either:
//! incremental eviction always keeps the longest run of newest events that
//! fits both bounds, and so does a rebuild followed by eviction, because
//! the count-only history of an older build holds every event the bounded
//! one keeps. A replica upgraded late therefore converges to the rows of
//! one that has run this build all along. The bound changes only which old
//! events are kept: no key, revision, response or other row depends on it.

use serde::{Deserialize, Serialize};

use crate::codec::{Counter, decode_row, decode_row_view, encode_row};
use crate::command::{Command, KeyValue, Response};
use crate::error::{Result, StateError};
use crate::requests::{Carrier, RequestIndex, WindowBook};
use crate::txn::Txn;
use crate::{Table, agents, nodes, registry, tasks};

const KV_TABLE: &str = "kv";
const EVENTS_TABLE: &str = "kv_events";
pub(crate) const META_TABLE: &str = "meta";
pub(crate) const REVISION_KEY: &[u8] = b"revision";
const CLUSTER_ID_KEY: &[u8] = b"cluster_id";
const HISTORY_WINDOW_KEY: &[u8] = b"history_window";
const HISTORY_CHUNKS_KEY: &[u8] = b"history_chunks";
const HISTORY_GROUPS_KEY: &[u8] = b"history_groups";
const EVENT_VALUES_TABLE: &str = "kv_event_values";

pub use crate::requests::{REQUEST_WINDOW_BYTES, REQUEST_WINDOW_ENTRIES};
/// Most bytes of keys and values one range page holds (always at least one
/// pair), so a response stays far below the gRPC message limit.
pub const MAX_RANGE_BYTES: usize = 2 * 1024 * 1024;
/// How many of the latest changes are kept for watchers resuming from an old
/// revision. Part of the replicated logic: every node must use the same value.
pub const WATCH_HISTORY: u64 = 10_000;
/// Most bytes of stored event rows the history keeps (the newest event
/// always stays, however large); the oldest leave first. Part of the
/// replicated logic, like [`WATCH_HISTORY`]: changing it changes which
/// events every replica keeps.
pub const WATCH_HISTORY_BYTES: u64 = 64 * 1024 * 1024;
/// Most pairs one range read returns.
pub const MAX_RANGE_LIMIT: usize = 10_000;
/// Most events of one chunk of the history (second layout). Part of the
/// replicated logic, like [`WATCH_HISTORY`].
pub const HISTORY_CHUNK_EVENTS: u64 = 1_000;
/// A chunk of the history closes once its rows hold this many bytes.
pub const HISTORY_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

/// A stored value with its revisions; the key is the table key.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    #[serde(with = "crate::codec::bytes")]
    value: Vec<u8>,
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

/// [`Record`]'s revisions, read in place: its value is borrowed, not
/// copied. Must list `Record`'s fields in order (a test checks it).
#[derive(Deserialize)]
struct RecordRevisions<'a> {
    #[serde(borrow)]
    value: &'a [u8],
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

/// What a write of a key carries over from the pair it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lineage {
    create_revision: u64,
    version: u64,
}

impl From<&KeyValue> for Lineage {
    fn from(kv: &KeyValue) -> Self {
        Self {
            create_revision: kv.create_revision,
            version: kv.version,
        }
    }
}

impl From<&Record> for Lineage {
    fn from(r: &Record) -> Self {
        Self {
            create_revision: r.create_revision,
            version: r.version,
        }
    }
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

/// The retained history's bookkeeping, one `meta` row. Absent in state
/// written before the history had a byte bound; rebuilt from `kv_events`
/// by the first event applied after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct HistoryWindow {
    /// Revision of the oldest retained event.
    oldest: u64,
    /// Bytes of the retained event rows, as stored (layout byte included).
    bytes: u64,
}

/// Consecutive events of the history, counted together (second layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct HistoryChunk {
    /// Revision of its first event; it ends where the next chunk starts.
    first: u64,
    /// Its events.
    events: u64,
    /// Bytes of its event rows, as stored.
    bytes: u64,
}

/// The retained history's bookkeeping in the second layout, one `meta`
/// row: its chunks, oldest first (about a dozen).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct HistoryChunks {
    chunks: Vec<HistoryChunk>,
}

/// An event in a group row (the third layout): its revision is its
/// place in the group, and a put's value is its pair's, or else kept in
/// `kv_event_values` under the revision (see the module's docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct GroupedEvent {
    kind: EventKind,
    #[serde(with = "crate::codec::bytes")]
    key: Vec<u8>,
    create_revision: u64,
    version: u64,
}

/// [`GroupedEvent`] encoded from a [`StateEvent`] in place: the same bytes.
#[derive(Serialize)]
struct GroupedEventRef<'a> {
    kind: EventKind,
    #[serde(serialize_with = "crate::codec::bytes::serialize")]
    key: &'a [u8],
    create_revision: u64,
    version: u64,
}

/// One apply step's events (layout 2 of a `kv_events` row), stored under
/// the revision of the last one; the revisions are consecutive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EventGroup {
    events: Vec<GroupedEvent>,
}

/// An [`EventGroup`] encoded from the step's events without copying them.
struct EventGroupRef<'a>(&'a [StateEvent]);

impl EventGroupRef<'_> {
    const WHAT: &'static str = "event group";
}

impl Serialize for EventGroupRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|e| GroupedEventRef {
            kind: e.kind,
            key: &e.kv.key,
            create_revision: e.kv.create_revision,
            version: e.kv.version,
        }))
    }
}

/// A value a retained event's pair held before it was replaced or deleted
/// (`kv_event_values`, under the event's revision; layout 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct EventValue {
    #[serde(with = "crate::codec::bytes")]
    value: Vec<u8>,
}

/// [`EventValue`] encoded from a borrowed value.
#[derive(Serialize)]
struct EventValueRef<'a> {
    #[serde(serialize_with = "crate::codec::bytes::serialize")]
    value: &'a [u8],
}

impl EventValueRef<'_> {
    const WHAT: &'static str = "event value";
}

/// A `kv_events` row: one event (layout 1, written by the first two
/// layouts of the history) or one apply step's events (layout 2, groups).
#[derive(Debug, Clone, PartialEq, Eq)]
enum HistoryRow {
    Event(StateEvent),
    Group(EventGroup),
}

impl crate::codec::Row for HistoryRow {
    const WHAT: &'static str = "history row";
    const VERSION: u8 = 2;

    fn encode_body(&self) -> Result<Vec<u8>> {
        match self {
            HistoryRow::Event(ev) => crate::codec::encode("event", ev),
            HistoryRow::Group(g) => crate::codec::encode(EventGroupRef::WHAT, g),
        }
    }

    /// An event keeps layout 1: the first two layouts of the history write
    /// it, as earlier builds did.
    fn encode_framed(&self) -> Result<Vec<u8>> {
        let version = match self {
            HistoryRow::Event(_) => 1,
            HistoryRow::Group(_) => Self::VERSION,
        };
        Ok(crate::codec::frame(version, &self.encode_body()?))
    }

    fn decode_body(version: u8, body: &[u8]) -> Result<Self> {
        if version == 1 {
            Ok(HistoryRow::Event(crate::codec::decode("event", body)?))
        } else {
            Ok(HistoryRow::Group(crate::codec::decode(EventGroupRef::WHAT, body)?))
        }
    }
}

crate::row_v1!(Record, "record");
crate::row_v1!(StateEvent, "event");
crate::row_v1!(EventValue, "event value");
crate::row_v1!(HistoryWindow, "history window");
crate::row_v1!(HistoryChunks, "history chunks");

/// The bookkeeping rows every command of one apply step would otherwise
/// read and rewrite: the history's chunks and the request window's
/// generations. Each is read at its first use in the step, kept decoded,
/// and stored once, when the step ends ([`Books::store`]), as the revision
/// is. During a step nothing reads them but apply, through here, so a step
/// stores exactly what storing them after every command would.
#[derive(Debug)]
pub(crate) struct Books {
    history: HistoryBook,
    window: WindowBook,
}

impl Books {
    /// The books of one step over the replica's request `index`.
    pub(crate) fn new(index: RequestIndex) -> Self {
        Self {
            history: HistoryBook::default(),
            window: WindowBook::new(index),
        }
    }

    /// Stores what the step changed (`events` are the step's events);
    /// gives back the request index.
    pub(crate) fn store(self, txn: &mut dyn Txn, events: &[StateEvent]) -> Result<RequestIndex> {
        self.history.store(txn, events)?;
        self.window.store(txn)
    }
}

/// The history's bookkeeping during one apply step: its layout and, from
/// the second layout on, its chunks, read at the first use in the step and
/// stored (if changed) when the step ends.
#[derive(Debug, Default)]
struct HistoryBook {
    /// The layout and chunks, once read in this step.
    kept: Option<HistoryLayout>,
    /// Whether the chunks differ from the stored row.
    changed: bool,
    /// In groups: where this step's group starts in the step's events
    /// (events before it were stored one by one, before the switch).
    group_from: usize,
    /// In groups: bytes of replaced values kept for events of this step's
    /// group, which its chunk counts once the group is stored.
    group_value_bytes: u64,
}

/// How the history is stored (see the module's "The history's bounds").
#[derive(Debug, Clone, PartialEq, Eq)]
enum HistoryLayout {
    /// One row per event, with the `history_window` row (or none).
    ByEvent,
    /// One row per event, counted in chunks (`history_chunks`).
    Chunks(HistoryChunks),
    /// One row per apply step, counted in chunks (`history_groups`).
    Groups(HistoryChunks),
}

impl HistoryBook {
    /// The layout, read once per step.
    fn layout(&mut self, txn: &dyn Txn) -> Result<&mut HistoryLayout> {
        let kept = match self.kept.take() {
            Some(kept) => kept,
            None => stored_layout(txn)?,
        };
        Ok(self.kept.insert(kept))
    }

    /// In groups, the oldest revision the history keeps, counting this
    /// step's group (`events` are the step's): a pair of that revision or
    /// newer that is replaced must leave its value to the history. `None`
    /// in the other layouts, whose rows hold their values, and while the
    /// history is empty.
    fn keeps_from(&mut self, txn: &dyn Txn, events: &[StateEvent]) -> Result<Option<u64>> {
        let from = self.group_from;
        Ok(match self.layout(txn)? {
            HistoryLayout::Groups(h) => h
                .chunks
                .first()
                .map(|c| c.first)
                .or_else(|| events.get(from).map(StateEvent::revision)),
            _ => None,
        })
    }

    /// Keeps `value`, which the pair of revision `rev` (retained, by
    /// [`HistoryBook::keeps_from`]) held until now, for the history; it
    /// leaves with its event's chunk. Groups only; `events` are the step's.
    fn keep_replaced(&mut self, txn: &mut dyn Txn, rev: u64, value: &[u8], events: &[StateEvent]) -> Result<()> {
        let row = crate::codec::encode_framed(EventValueRef::WHAT, 1, &EventValueRef { value })?;
        let size = row.len() as u64;
        txn.put(EVENT_VALUES_TABLE, &rev.to_be_bytes(), row)?;
        let Some(HistoryLayout::Groups(h)) = self.kept.as_mut() else {
            return Err(StateError::Corrupt {
                what: "history",
                detail: "a replaced value kept outside the grouped layout".into(),
            });
        };
        // Its event is in this step's group, or else in a stored chunk.
        let in_group = events.get(self.group_from).is_some_and(|first| rev >= first.revision());
        match h.chunks.iter_mut().rev().find(|c| c.first <= rev) {
            Some(c) if !in_group => {
                c.bytes = c.bytes.saturating_add(size);
                self.changed = true;
            }
            _ => self.group_value_bytes = self.group_value_bytes.saturating_add(size),
        }
        Ok(())
    }

    /// Stores what the step changed: in groups, its events from
    /// `group_from` on as one row under the last one's revision, counted
    /// in the newest chunk or a new one (evicting the oldest chunks the
    /// bounds no longer keep); then the chunks, if they changed.
    fn store(mut self, txn: &mut dyn Txn, events: &[StateEvent]) -> Result<()> {
        match self.kept.take() {
            Some(HistoryLayout::Groups(mut h)) => {
                let group = events.get(self.group_from..).unwrap_or_default();
                if let (Some(first), Some(last)) = (group.first(), group.last()) {
                    let row = crate::codec::encode_framed(EventGroupRef::WHAT, 2, &EventGroupRef(group))?;
                    let size = (row.len() as u64).saturating_add(self.group_value_bytes);
                    txn.put(EVENTS_TABLE, &last.revision().to_be_bytes(), row)?;
                    add_to_chunks(
                        txn,
                        &mut h,
                        first.revision(),
                        group.len() as u64,
                        size,
                        ChunkRows::EventsAndValues,
                    )?;
                    self.changed = true;
                }
                if self.changed {
                    txn.put(META_TABLE, HISTORY_GROUPS_KEY, encode_row(&h)?)?;
                }
                Ok(())
            }
            Some(HistoryLayout::Chunks(h)) if self.changed => txn.put(META_TABLE, HISTORY_CHUNKS_KEY, encode_row(&h)?),
            _ => Ok(()),
        }
    }
}

/// The cluster's id, 0 before the cluster recorded one.
pub fn cluster_id(txn: &dyn Txn) -> Result<u64> {
    meta_u64(txn, CLUSTER_ID_KEY)
}

/// Replaces the cluster's id. Only for offline tools (`cell0 snapshot
/// restore` gives a restored state a new cluster); never from apply, where
/// the id is set once by `Command::InitCluster`.
pub fn replace_cluster_id(txn: &mut dyn Txn, id: u64) -> Result<()> {
    put_meta_u64(txn, CLUSTER_ID_KEY, id)
}

pub(crate) fn meta_u64(txn: &dyn Txn, key: &[u8]) -> Result<u64> {
    match txn.get(META_TABLE, key)? {
        Some(b) => Ok(decode_row::<Counter>(&b)?.0),
        None => Ok(0),
    }
}

/// Stores a counter row under `key` in `meta`.
pub(crate) fn put_meta_u64(txn: &mut dyn Txn, key: &[u8], value: u64) -> Result<()> {
    txn.put(META_TABLE, key, encode_row(&Counter(value))?)
}

/// The store's current revision.
pub fn revision(txn: &dyn Txn) -> Result<u64> {
    meta_u64(txn, REVISION_KEY)
}

/// A big-endian u64 table key.
fn decode_key_u64(b: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = b.try_into().map_err(|_| StateError::Corrupt {
        what: "revision key",
        detail: format!("{} bytes, not 8", b.len()),
    })?;
    Ok(u64::from_be_bytes(arr))
}

/// The pair stored under `key`.
pub fn get(txn: &dyn Txn, key: &[u8]) -> Result<Option<KeyValue>> {
    match txn.get(KV_TABLE, key)? {
        Some(b) => Ok(Some(decode_row::<Record>(&b)?.into_kv(key))),
        None => Ok(None),
    }
}

/// What a write of `key` carries over from its stored pair, read in place
/// (a put that reports no previous pair copies no value), and the pair's
/// value if the history keeps its event (revision `keeps_from` or newer).
fn lineage(txn: &dyn Txn, key: &[u8], keeps_from: Option<u64>) -> Result<Option<(Lineage, Option<Replaced>)>> {
    let kept = |mod_revision: u64, value: &[u8]| {
        keeps_from.filter(|from| mod_revision >= *from).map(|_| Replaced {
            revision: mod_revision,
            value: value.to_vec(),
        })
    };
    let mut found = None;
    txn.read(KV_TABLE, key, &mut |row| {
        found = Some(match decode_row_view::<Record, RecordRevisions<'_>>(row)? {
            Some(r) => (
                Lineage {
                    create_revision: r.create_revision,
                    version: r.version,
                },
                kept(r.mod_revision, r.value),
            ),
            None => {
                let r = decode_row::<Record>(row)?;
                (Lineage::from(&r), kept(r.mod_revision, &r.value))
            }
        });
        Ok(())
    })?;
    Ok(found)
}

/// A replaced pair's value and revision, which the history still needs.
struct Replaced {
    revision: u64,
    value: Vec<u8>,
}

/// Keeps the value of `replaced`, a pair about to be overwritten or
/// deleted, if the history keeps its event without the value (groups).
fn leave_to_history(txn: &mut dyn Txn, books: &mut Books, events: &[StateEvent], replaced: &KeyValue) -> Result<()> {
    match books.history.keeps_from(txn, events)? {
        Some(from) if replaced.mod_revision >= from => {
            books
                .history
                .keep_replaced(txn, replaced.mod_revision, &replaced.value, events)
        }
        _ => Ok(()),
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
    let end = crate::txn::prefix_end(prefix);
    let mut kvs = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    // Scan in small pages so a byte-bounded page never loads `limit` values.
    let mut from = start;
    'pages: loop {
        let rows = txn.scan(KV_TABLE, &from, end.as_deref(), RANGE_SCAN_PAGE)?;
        let page_full = rows.len() == RANGE_SCAN_PAGE;
        for (k, v) in rows {
            if kvs.len() == limit || (!kvs.is_empty() && bytes + k.len() + v.len() > MAX_RANGE_BYTES) {
                more = true;
                break 'pages;
            }
            bytes += k.len() + v.len();
            let kv = decode_row::<Record>(&v)?.into_kv(&k);
            from = k;
            from.push(0);
            kvs.push(kv);
        }
        if !page_full {
            break;
        }
    }
    Ok((kvs, more))
}

/// Rows read per scan of the history.
const HISTORY_SCAN_PAGE: usize = 256;

/// Rows read per scan when rebuilding the history's bookkeeping: few, as
/// each may hold a value of up to a MiB.
const HISTORY_REBUILD_PAGE: usize = 16;

/// The revision of the oldest retained event (1 while there is none).
/// Without the `history_window` row (state from before the byte
/// bound) the count bound alone applies, as it did when that state was
/// written.
fn oldest_retained(txn: &dyn Txn, current: u64) -> Result<u64> {
    if let HistoryLayout::Chunks(h) | HistoryLayout::Groups(h) = stored_layout(txn)? {
        return Ok(h.chunks.first().map_or(1, |c| c.first));
    }
    let by_count = current.saturating_sub(WATCH_HISTORY) + 1;
    Ok(match txn.get(META_TABLE, HISTORY_WINDOW_KEY)? {
        Some(b) => decode_row::<HistoryWindow>(&b)?.oldest.max(by_count),
        None => by_count,
    })
}

/// Rows read per scan of a range page.
const RANGE_SCAN_PAGE: usize = 256;

/// Changes with revision >= `from` under `prefix`, at most `limit`, in
/// revision order. Fails with [`StateError::Compacted`] when `from` is
/// older than the retained history. Callers pass one point-in-time view, so
/// the compaction check and the pages read agree: an event that was there
/// when the check passed is returned, never silently skipped.
///
/// A page also ends before it would pass `max_bytes` of keys and values
/// (it always holds at least one event), so one page fits a watch message.
pub fn history(txn: &dyn Txn, prefix: &[u8], from: u64, limit: usize, max_bytes: usize) -> Result<Vec<StateEvent>> {
    let current = revision(txn)?;
    let oldest = oldest_retained(txn, current)?;
    if from < oldest && from <= current {
        return Err(StateError::Compacted {
            requested: from,
            oldest,
        });
    }
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut start = from.max(1);
    // Scanning small pages keeps memory bounded when the prefix filter
    // rejects most events or the values are large.
    'pages: while out.len() < limit {
        let rows = txn.scan(EVENTS_TABLE, &start.to_be_bytes(), None, HISTORY_SCAN_PAGE)?;
        let Some((last, _)) = rows.last() else { break };
        start = decode_key_u64(last)?.saturating_add(1);
        let page_full = rows.len() == HISTORY_SCAN_PAGE;
        for (k, v) in rows {
            let events = match decode_row::<HistoryRow>(&v)? {
                HistoryRow::Event(ev) => vec![ev],
                HistoryRow::Group(g) => ungroup(txn, decode_key_u64(&k)?, g, from, prefix)?,
            };
            for ev in events {
                if ev.kv.key.starts_with(prefix) {
                    let size = ev.kv.key.len() + ev.kv.value.len();
                    if !out.is_empty() && bytes + size > max_bytes {
                        break 'pages;
                    }
                    bytes += size;
                    out.push(ev);
                    if out.len() == limit {
                        break 'pages;
                    }
                }
            }
        }
        if !page_full {
            break;
        }
    }
    Ok(out)
}

/// The events of a group row stored under `last` with revision `from` or
/// newer under `prefix`, with their values: a delete's is empty; a put's
/// is its pair's while the pair is of the event's revision, and was kept
/// in `kv_event_values` when the pair was replaced.
fn ungroup(txn: &dyn Txn, last: u64, group: EventGroup, from: u64, prefix: &[u8]) -> Result<Vec<StateEvent>> {
    let first = (last + 1)
        .checked_sub(group.events.len() as u64)
        .ok_or_else(|| StateError::Corrupt {
            what: EventGroupRef::WHAT,
            detail: format!("{} events under revision {last}", group.events.len()),
        })?;
    let mut out = Vec::new();
    for (rev, e) in (first..).zip(group.events) {
        if rev < from || !e.key.starts_with(prefix) {
            continue;
        }
        let value = match e.kind {
            EventKind::Delete => Vec::new(),
            // A pair still of the event's revision was never replaced, so
            // no value was kept for it: it holds the event's value.
            EventKind::Put => match get(txn, &e.key)? {
                Some(kv) if kv.mod_revision == rev => kv.value,
                _ => match txn.get(EVENT_VALUES_TABLE, &rev.to_be_bytes())? {
                    Some(row) => decode_row::<EventValue>(&row)?.value,
                    None => {
                        return Err(StateError::Corrupt {
                            what: EventGroupRef::WHAT,
                            detail: format!("the value of revision {rev} is neither kept nor its pair's"),
                        });
                    }
                },
            },
        };
        out.push(StateEvent {
            kind: e.kind,
            kv: KeyValue {
                key: e.key,
                value,
                create_revision: e.create_revision,
                mod_revision: rev,
                version: e.version,
            },
        });
    }
    Ok(out)
}

/// Applies `cmd` at `rev` (the revision before it), bumping `rev` per
/// mutation, and notes every table it changed in `changed`. The step's
/// bookkeeping rows go through `books`, which the caller stores.
pub(crate) fn apply_command(
    txn: &mut dyn Txn,
    cmd: &Command,
    rev: &mut u64,
    books: &mut Books,
    events: &mut Vec<StateEvent>,
    changed: &mut std::collections::BTreeSet<Table>,
) -> Result<Response> {
    match cmd {
        Command::Put { key, value } => {
            changed.insert(Table::Kv);
            let prev = get(txn, key)?;
            if let Some(p) = &prev {
                leave_to_history(txn, books, events, p)?;
            }
            let kv = write(txn, key, value, prev.as_ref().map(Lineage::from), rev, books, events)?;
            Ok(Response::Put { kv, prev })
        }
        Command::PutWithoutPrev { key, value } => {
            changed.insert(Table::Kv);
            let keeps_from = books.history.keeps_from(txn, events)?;
            let prev = lineage(txn, key, keeps_from)?;
            if let Some((_, Some(replaced))) = &prev {
                books
                    .history
                    .keep_replaced(txn, replaced.revision, &replaced.value, events)?;
            }
            let kv = write(txn, key, value, prev.map(|(l, _)| l), rev, books, events)?;
            Ok(Response::Put { kv, prev: None })
        }
        Command::Delete { key } => {
            let prev = get(txn, key)?;
            if let Some(p) = &prev {
                leave_to_history(txn, books, events, p)?;
                *rev += 1;
                changed.insert(Table::Kv);
                txn.delete(KV_TABLE, key)?;
                record_event(
                    txn,
                    books,
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
            changed.insert(Table::Kv);
            if let Some(c) = &current {
                leave_to_history(txn, books, events, c)?;
            }
            let kv = write(txn, key, value, current.as_ref().map(Lineage::from), rev, books, events)?;
            Ok(Response::Cas {
                revision: *rev,
                succeeded: true,
                kv: Some(KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    ..kv
                }),
            })
        }
        Command::Batch(cmds) => {
            let mut out = Vec::with_capacity(cmds.len());
            for c in cmds {
                out.push(apply_command(txn, c, rev, books, events, changed)?);
            }
            Ok(Response::Batch(out))
        }
        Command::Model(m) => {
            changed.insert(Table::Models);
            Ok(Response::Model(registry::apply(txn, m)?))
        }
        Command::Agent(a) => {
            changed.insert(Table::Agents);
            Ok(Response::Agent(agents::apply(txn, a)?))
        }
        Command::Task(t) => {
            changed.insert(Table::Tasks);
            Ok(Response::Task(tasks::apply(txn, t)?))
        }
        Command::Handoff(h) => {
            changed.insert(Table::Agents);
            changed.insert(Table::Tasks);
            Ok(Response::Handoff(crate::handoff::apply(txn, h)?))
        }
        Command::Acl(a) => {
            let outcome = crate::acl::apply(txn, a)?;
            if outcome.changed() {
                changed.insert(Table::Acl);
            }
            Ok(Response::Acl(outcome))
        }
        Command::Node(n) => {
            changed.insert(Table::Nodes);
            changed.insert(Table::Agents);
            let stored = nodes::apply(txn, n)?;
            // New or changed capacity: agents that did not fit may now.
            agents::unblock_all(txn)?;
            Ok(Response::Node { stored })
        }
        Command::Request { id, cmd: inner }
        | Command::RequestV2 { id, cmd: inner }
        | Command::RequestV3 { id, cmd: inner } => {
            let carrier = if matches!(cmd, Command::Request { .. }) {
                Carrier::Request
            } else {
                Carrier::RequestV2
            };
            let window = books.window.open(txn, carrier)?;
            // Once the window's row is stored the history has switched too:
            // a put then reads no `meta` row to find that out again.
            if carrier == Carrier::RequestV2 && window.may_need_switch() {
                switch_history_to_chunks(txn, &mut books.history, *rev)?;
            }
            if matches!(cmd, Command::RequestV3 { .. }) {
                switch_history_to_groups(txn, &mut books.history, *rev, events)?;
            }
            if let Some(first) = books.window.answered(&window, txn, id, inner)? {
                books.window.give_back(window);
                return Ok(first);
            }
            let mut response = apply_command(txn, inner, rev, books, events, changed)?;
            books.window.remember(window, txn, id, inner, &mut response)?;
            Ok(response)
        }
        Command::InitCluster { cluster_id: id } => {
            let stored = cluster_id(txn)?;
            if stored != 0 {
                return Ok(Response::ClusterId(stored));
            }
            put_meta_u64(txn, CLUSTER_ID_KEY, *id)?;
            changed.insert(Table::Cluster);
            Ok(Response::ClusterId(*id))
        }
    }
}

/// Writes `key` = `value` over `prev` at the next revision and records
/// the event. Returns the written pair's revisions, without its key and
/// value (empty): a put's answer leaves them out (the command carries
/// them), so that the pair is not copied into every replica's answer
/// (answers are dropped on followers).
fn write(
    txn: &mut dyn Txn,
    key: &[u8],
    value: &[u8],
    prev: Option<Lineage>,
    rev: &mut u64,
    books: &mut Books,
    events: &mut Vec<StateEvent>,
) -> Result<KeyValue> {
    *rev += 1;
    let record = Record {
        value: value.to_vec(),
        create_revision: prev.map_or(*rev, |p| p.create_revision),
        mod_revision: *rev,
        version: prev.map_or(1, |p| p.version + 1),
    };
    txn.put(KV_TABLE, key, encode_row(&record)?)?;
    let kv = record.into_kv(key);
    let revisions = KeyValue {
        key: Vec::new(),
        value: Vec::new(),
        ..kv
    };
    record_event(
        txn,
        books,
        events,
        StateEvent {
            kind: EventKind::Put,
            kv,
        },
    )?;
    Ok(revisions)
}

/// Stores `ev` in the history, then drops the oldest events until the
/// history fits [`WATCH_HISTORY`] and [`WATCH_HISTORY_BYTES`]. In groups
/// the event is only noted: the step's events are stored together when it
/// ends ([`Books::store`]).
fn record_event(txn: &mut dyn Txn, books: &mut Books, events: &mut Vec<StateEvent>, ev: StateEvent) -> Result<()> {
    let rev = ev.revision();
    match books.history.layout(txn)? {
        HistoryLayout::Groups(_) => {
            events.push(ev);
            return Ok(());
        }
        HistoryLayout::Chunks(h) => {
            let row = encode_row(&ev)?;
            let size = row.len() as u64;
            txn.put(EVENTS_TABLE, &rev.to_be_bytes(), row)?;
            add_to_chunks(txn, h, rev, 1, size, ChunkRows::Events)?;
            events.push(ev);
            books.history.changed = true;
            return Ok(());
        }
        HistoryLayout::ByEvent => {}
    }
    let row = encode_row(&ev)?;
    let size = row.len() as u64;
    txn.put(EVENTS_TABLE, &rev.to_be_bytes(), row)?;
    let mut window = match txn.get(META_TABLE, HISTORY_WINDOW_KEY)? {
        Some(b) => {
            let mut w: HistoryWindow = decode_row(&b)?;
            w.bytes = w.bytes.saturating_add(size);
            w
        }
        // Counts the row just stored too.
        None => rebuild_history_window(txn, rev)?,
    };
    evict_history(txn, &mut window, rev)?;
    txn.put(META_TABLE, HISTORY_WINDOW_KEY, encode_row(&window)?)?;
    events.push(ev);
    Ok(())
}

/// How the stored history is laid out, with its chunks.
fn stored_layout(txn: &dyn Txn) -> Result<HistoryLayout> {
    if let Some(b) = txn.get(META_TABLE, HISTORY_GROUPS_KEY)? {
        return Ok(HistoryLayout::Groups(decode_row(&b)?));
    }
    Ok(match txn.get(META_TABLE, HISTORY_CHUNKS_KEY)? {
        Some(b) => HistoryLayout::Chunks(decode_row(&b)?),
        None => HistoryLayout::ByEvent,
    })
}

/// The rows a chunk of the history has, which leave with it.
#[derive(Debug, Clone, Copy)]
enum ChunkRows {
    /// Its event rows (the second layout).
    Events,
    /// Its event rows and the values kept for its events (groups).
    EventsAndValues,
}

/// Counts `events` events from revision `first` on, stored in `size`
/// bytes, in the newest chunk or a new one starting at `first`, then drops
/// the oldest chunks the bounds no longer keep, each with one range delete
/// per table of `rows`.
fn add_to_chunks(
    txn: &mut dyn Txn,
    h: &mut HistoryChunks,
    first: u64,
    events: u64,
    size: u64,
    rows: ChunkRows,
) -> Result<()> {
    match h.chunks.last_mut() {
        Some(c) if c.events < HISTORY_CHUNK_EVENTS && c.bytes < HISTORY_CHUNK_BYTES => {
            c.events += events;
            c.bytes = c.bytes.saturating_add(size);
        }
        _ => h.chunks.push(HistoryChunk {
            first,
            events,
            bytes: size,
        }),
    }
    let mut events: u64 = h.chunks.iter().map(|c| c.events).sum();
    let mut bytes = h.chunks.iter().fold(0u64, |sum, c| sum.saturating_add(c.bytes));
    while let [oldest, next, ..] = h.chunks.as_slice() {
        if events - oldest.events < WATCH_HISTORY && bytes <= WATCH_HISTORY_BYTES {
            break;
        }
        let (from, to) = (oldest.first.to_be_bytes(), next.first.to_be_bytes());
        txn.delete_range(EVENTS_TABLE, &from, Some(&to))?;
        if let ChunkRows::EventsAndValues = rows {
            txn.delete_range(EVENT_VALUES_TABLE, &from, Some(&to))?;
        }
        events -= oldest.events;
        bytes = bytes.saturating_sub(oldest.bytes);
        h.chunks.remove(0);
    }
    Ok(())
}

/// Switches the history to chunks, once (at the first `RequestV2`, with
/// `current` the store's revision): the events the first layout retains
/// become the first chunk.
fn switch_history_to_chunks(txn: &mut dyn Txn, book: &mut HistoryBook, current: u64) -> Result<()> {
    if *book.layout(txn)? != HistoryLayout::ByEvent {
        return Ok(());
    }
    let first = if current == 0 {
        HistoryChunks::default()
    } else {
        let window = match txn.get(META_TABLE, HISTORY_WINDOW_KEY)? {
            Some(b) => decode_row::<HistoryWindow>(&b)?,
            None => rebuild_history_window(txn, current)?,
        };
        HistoryChunks {
            chunks: vec![HistoryChunk {
                first: window.oldest,
                events: current - window.oldest + 1,
                bytes: window.bytes,
            }],
        }
    };
    txn.delete(META_TABLE, HISTORY_WINDOW_KEY)?;
    book.kept = Some(HistoryLayout::Chunks(first));
    book.changed = true;
    Ok(())
}

/// Switches the history from chunks to groups, once (at the first
/// `RequestV3`, after [`switch_history_to_chunks`]): the chunks stay as
/// they are, and the step's events from here on (`events` are those before)
/// form its first group.
fn switch_history_to_groups(
    txn: &mut dyn Txn,
    book: &mut HistoryBook,
    current: u64,
    events: &[StateEvent],
) -> Result<()> {
    let chunks = match book.layout(txn)? {
        HistoryLayout::Groups(_) => return Ok(()),
        HistoryLayout::Chunks(h) => std::mem::take(h),
        HistoryLayout::ByEvent => {
            return Err(StateError::Corrupt {
                what: "history",
                detail: format!("switching to groups at revision {current} before switching to chunks"),
            });
        }
    };
    txn.delete(META_TABLE, HISTORY_CHUNKS_KEY)?;
    book.kept = Some(HistoryLayout::Groups(chunks));
    book.changed = true;
    book.group_from = events.len();
    Ok(())
}

/// The bookkeeping of the events stored up to `newest` (which is stored),
/// from one scan in revision order: for state written before the history
/// had a byte bound. Deterministic, as every replica holds the same rows.
fn rebuild_history_window(txn: &dyn Txn, newest: u64) -> Result<HistoryWindow> {
    let end = newest.saturating_add(1).to_be_bytes();
    let mut oldest = None;
    let mut bytes = 0u64;
    let mut start = 0u64;
    loop {
        let rows = txn.scan(EVENTS_TABLE, &start.to_be_bytes(), Some(&end), HISTORY_REBUILD_PAGE)?;
        let Some((last, _)) = rows.last() else { break };
        let last = decode_key_u64(last)?;
        if oldest.is_none() {
            oldest = Some(decode_key_u64(&rows[0].0)?);
        }
        bytes = rows
            .iter()
            .fold(bytes, |sum, (_, v)| sum.saturating_add(v.len() as u64));
        if rows.len() < HISTORY_REBUILD_PAGE || last >= newest {
            break;
        }
        start = last + 1;
    }
    Ok(HistoryWindow {
        oldest: oldest.unwrap_or(newest),
        bytes,
    })
}

/// Drops the oldest events, in revision order, while more than
/// [`WATCH_HISTORY`] revisions or more than [`WATCH_HISTORY_BYTES`] are
/// kept, never the newest (`newest`).
fn evict_history(txn: &mut dyn Txn, window: &mut HistoryWindow, newest: u64) -> Result<()> {
    while window.oldest < newest && (newest - window.oldest + 1 > WATCH_HISTORY || window.bytes > WATCH_HISTORY_BYTES) {
        let key = window.oldest.to_be_bytes();
        if let Some(row) = txn.get(EVENTS_TABLE, &key)? {
            txn.delete(EVENTS_TABLE, &key)?;
            window.bytes = window.bytes.saturating_sub(row.len() as u64);
        }
        window.oldest += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemTxn;

    fn put(k: &str, v: &str) -> Command {
        Command::Put {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        }
    }

    /// Applies `cmds` as separate entries.
    fn run(state: &mut MemTxn, cmds: &[Command]) -> Vec<Response> {
        cmds.iter().map(|c| crate::apply(state, c).unwrap().response).collect()
    }

    /// The in-place view of a stored pair reads the revisions its full
    /// decoding reads, and a put that reports no previous pair carries them
    /// over as one that does.
    #[test]
    fn a_pairs_revisions_read_in_place_match_its_decoding() {
        let record = Record {
            value: vec![7; 300],
            create_revision: 3,
            mod_revision: 1 << 40,
            version: 129,
        };
        let row = encode_row(&record).unwrap();
        let view: RecordRevisions<'_> = decode_row_view::<Record, _>(&row).unwrap().unwrap();
        assert_eq!(
            (view.value, view.create_revision, view.mod_revision, view.version),
            (&record.value[..], 3, 1 << 40, 129)
        );

        let (mut with_prev, mut without_prev) = (MemTxn::new(), MemTxn::new());
        for (i, value) in ["a", "b", "c"].into_iter().enumerate() {
            let put = put("k", value);
            let Command::Put { key, value } = put.clone() else {
                unreachable!()
            };
            let a = crate::apply(&mut with_prev, &put).unwrap().response;
            let b = crate::apply(&mut without_prev, &Command::PutWithoutPrev { key, value })
                .unwrap()
                .response;
            let (Response::Put { kv: a, prev }, Response::Put { kv: b, prev: none }) = (a, b) else {
                panic!("not put answers")
            };
            assert_eq!((a.create_revision, a.version), (b.create_revision, b.version));
            assert_eq!((a.version, prev.is_some(), none), (i as u64 + 1, i > 0, None));
        }
        assert_eq!(with_prev, without_prev, "both store the same rows");
    }

    /// Keeping the bookkeeping rows for a whole apply step stores what
    /// storing them after every command stores: a state fed batches ends
    /// with the rows, and gave the answers, of one fed the same commands an
    /// entry each. The commands cross the switch from the first layouts to
    /// the second inside a batch, retry earlier requests, delete, and
    /// close and evict history chunks.
    #[test]
    fn a_step_stores_the_rows_that_command_by_command_steps_store() {
        let mut cmds = Vec::new();
        for i in 0..12_000u64 {
            let id = crate::command::RequestId {
                client: i % 3,
                seq: i / 3 + 1,
            };
            let key = format!("k{}", i % 500);
            let cmd = Box::new(match i % 7 {
                3 => Command::Delete { key: key.into_bytes() },
                5 => Command::PutWithoutPrev {
                    key: key.into_bytes(),
                    value: i.to_string().into_bytes(),
                },
                _ => put(&key, &i.to_string()),
            });
            let request = if i < 300 {
                Command::Request { id, cmd }
            } else {
                Command::RequestV2 { id, cmd }
            };
            if i % 11 == 5 {
                cmds.push(request.clone());
            }
            cmds.push(request);
        }
        let mut batched = MemTxn::new();
        let mut single = MemTxn::new();
        for group in cmds.chunks(97) {
            let Response::Batch(answers) = crate::apply(&mut batched, &Command::Batch(group.to_vec()))
                .unwrap()
                .response
            else {
                panic!("a batch is answered with a batch");
            };
            assert_eq!(answers, run(&mut single, group));
        }
        let HistoryLayout::Chunks(h) = stored_layout(&batched).unwrap() else {
            panic!("not in chunks")
        };
        assert!(h.chunks.len() > 1);
        assert!(oldest_retained(&batched, revision(&batched).unwrap()).unwrap() > 1);
        assert_eq!(batched, single);
    }

    /// A mixed load of requests over `keys` keys, as the third layout's
    /// tests feed it: puts with and without the previous pair, deletes,
    /// compare-and-swaps that succeed and fail, and retries; the first
    /// `v2` requests are `RequestV2`, the rest `RequestV3` unless `v3` is
    /// false.
    fn mixed_requests(n: u64, keys: u64, v2: u64, v3: bool) -> Vec<Command> {
        let mut cmds = Vec::new();
        for i in 0..n {
            let id = crate::command::RequestId {
                client: i % 3,
                seq: i / 3 + 1,
            };
            let key = format!(
                "{}/k{}",
                ["a", "b"][(i % 2) as usize],
                ((i ^ (i >> 3)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % keys
            )
            .into_bytes();
            let value = format!("v{i}").repeat(1 + (i % 5) as usize).into_bytes();
            let cmd = Box::new(match i % 11 {
                3 => Command::Delete { key },
                5 | 9 => Command::Cas {
                    key,
                    expected_revision: i % 4,
                    value,
                },
                7 => Command::Put { key, value },
                _ => Command::PutWithoutPrev { key, value },
            });
            let request = if i < v2 || !v3 {
                Command::RequestV2 { id, cmd }
            } else {
                Command::RequestV3 { id, cmd }
            };
            if i % 13 == 4 {
                cmds.push(request.clone());
            }
            cmds.push(request);
        }
        cmds
    }

    /// Applies `cmds` in batches of 1 to 96 commands (a fixed sequence).
    fn apply_in_batches(state: &mut MemTxn, cmds: &[Command], mut each: impl FnMut(&MemTxn, Vec<Response>)) {
        let mut at = 0;
        let mut size = 1;
        while at < cmds.len() {
            let group = &cmds[at..(at + size).min(cmds.len())];
            let answer = crate::apply(state, &Command::Batch(group.to_vec())).unwrap().response;
            let Response::Batch(answers) = answer else {
                panic!("a batch is answered with a batch")
            };
            each(state, answers);
            at += group.len();
            size = size * 37 % 97;
        }
    }

    /// The history in groups (switched in the middle of a batch) reads
    /// back exactly what the history in chunks reads, from every revision
    /// both keep, under a prefix too, in pages bounded by count and bytes,
    /// while old events leave; answers and pairs are the same; and it
    /// stores far fewer event rows.
    #[test]
    fn the_history_in_groups_reads_what_the_history_in_chunks_reads() {
        let chunked_cmds = mixed_requests(24_000, 300, 400, false);
        let grouped_cmds = mixed_requests(24_000, 300, 400, true);
        let mut chunked = MemTxn::new();
        let mut answers = Vec::new();
        apply_in_batches(&mut chunked, &chunked_cmds, |_, a| answers.extend(a));
        let mut grouped = MemTxn::new();
        let mut grouped_answers = Vec::new();
        let mut checks = 0;
        let mut steps = 0;
        apply_in_batches(&mut grouped, &grouped_cmds, |state, a| {
            grouped_answers.extend(a);
            steps += 1;
            // The chunks count exactly the bytes of the rows they keep.
            if let HistoryLayout::Groups(h) = stored_layout(state).unwrap() {
                let stored = |table| -> u64 {
                    state
                        .scan(table, b"", None, usize::MAX)
                        .unwrap()
                        .iter()
                        .map(|(_, v)| v.len() as u64)
                        .sum()
                };
                assert_eq!(
                    h.chunks.iter().map(|c| c.bytes).sum::<u64>(),
                    stored(EVENTS_TABLE) + stored(EVENT_VALUES_TABLE),
                    "after step {steps}"
                );
            }
            if steps % 23 != 0 {
                return;
            }
            // The same commands applied to the chunked layout up to here.
            let mut reference = MemTxn::new();
            let upto = grouped_answers.len();
            apply_in_batches(&mut reference, &chunked_cmds[..upto], |_, _| {});
            let current = revision(state).unwrap();
            assert_eq!(current, revision(&reference).unwrap());
            let oldest = oldest_retained(state, current)
                .unwrap()
                .max(oldest_retained(&reference, current).unwrap());
            for from in [oldest, oldest + 1, (oldest + current) / 2, current, current + 1] {
                for (prefix, limit, bytes) in [(&b""[..], 1000, usize::MAX), (b"b/", 300, 2000)] {
                    assert_eq!(
                        history(state, prefix, from, limit, bytes).unwrap(),
                        history(&reference, prefix, from, limit, bytes).unwrap(),
                        "from {from} at revision {current}"
                    );
                }
            }
            let before = oldest_retained(state, current).unwrap();
            if before > 1 {
                assert!(matches!(
                    history(state, b"", before - 1, 10, usize::MAX),
                    Err(StateError::Compacted { .. })
                ));
            }
            checks += 1;
        });
        assert!(checks > 5, "{checks} checks");
        assert_eq!(grouped_answers, answers);
        let pairs = |t: &MemTxn| t.scan(KV_TABLE, b"", None, usize::MAX).unwrap();
        assert_eq!(pairs(&grouped), pairs(&chunked));

        let current = revision(&grouped).unwrap();
        let oldest = oldest_retained(&grouped, current).unwrap();
        assert!(
            oldest > 1 && current - oldest + 1 >= WATCH_HISTORY,
            "{oldest}..={current}"
        );
        let rows = |t: &MemTxn, table| t.scan(table, b"", None, usize::MAX).unwrap();
        assert!(rows(&grouped, EVENTS_TABLE).len() * 10 < rows(&chunked, EVENTS_TABLE).len());
        // Kept values leave with their events' chunks.
        let values = rows(&grouped, EVENT_VALUES_TABLE);
        assert!(!values.is_empty());
        for (k, _) in values {
            assert!(decode_key_u64(&k).unwrap() >= oldest);
        }
    }

    /// A group row's encoding from the step's events is the layout its
    /// reader decodes.
    #[test]
    fn a_group_written_from_events_decodes_as_a_group() {
        let ev = |kind, key: &str, rev| StateEvent {
            kind,
            kv: KeyValue {
                key: key.as_bytes().to_vec(),
                value: b"not stored".to_vec(),
                create_revision: 1,
                mod_revision: rev,
                version: rev,
            },
        };
        let events = [ev(EventKind::Put, "a", 4), ev(EventKind::Delete, "b", 5)];
        let row = crate::codec::encode_framed(EventGroupRef::WHAT, 2, &EventGroupRef(&events)).unwrap();
        let group = EventGroup {
            events: events
                .iter()
                .map(|e| GroupedEvent {
                    kind: e.kind,
                    key: e.kv.key.clone(),
                    create_revision: 1,
                    version: e.kv.version,
                })
                .collect(),
        };
        assert_eq!(row, encode_row(&HistoryRow::Group(group.clone())).unwrap());
        assert_eq!(decode_row::<HistoryRow>(&row).unwrap(), HistoryRow::Group(group));
        let one = encode_row(&events[0]).unwrap();
        assert_eq!(one[0], 1, "a single event keeps layout 1");
        assert_eq!(
            decode_row::<HistoryRow>(&one).unwrap(),
            HistoryRow::Event(events[0].clone())
        );
    }

    #[test]
    fn revisions_count_mutations_like_etcd() {
        let mut state = MemTxn::new();
        let out = run(&mut state, &[put("a", "1"), put("b", "1"), put("a", "2")]);
        let Response::Put { kv, prev } = &out[2] else {
            panic!("{out:?}")
        };
        assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (1, 3, 2));
        assert_eq!(prev.as_ref().unwrap().value, b"1");
        let txn = &state;
        assert_eq!(revision(txn).unwrap(), 3);
        // Deleting an absent key changes nothing.
        let out = run(&mut state, &[Command::Delete { key: b"zz".to_vec() }]);
        assert_eq!(
            out[0],
            Response::Delete {
                revision: 3,
                prev: None
            }
        );
        let out = run(&mut state, &[Command::Delete { key: b"a".to_vec() }, put("a", "3")]);
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
    fn a_put_without_prev_writes_like_a_put_and_a_retry_gets_its_answer() {
        let quiet = |k: &str, v: &str| Command::PutWithoutPrev {
            key: k.as_bytes().to_vec(),
            value: v.as_bytes().to_vec(),
        };
        let request = |seq, cmd| Command::RequestV2 {
            id: crate::command::RequestId { client: 9, seq },
            cmd: Box::new(cmd),
        };
        let mut state = MemTxn::new();
        let out = run(
            &mut state,
            &[
                put("a", "1"),
                request(1, quiet("a", "2")),
                request(2, put("a", "3")),
                request(1, quiet("a", "2")),
            ],
        );
        let Response::Put { kv, prev } = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(
            (kv.value.as_slice(), kv.create_revision, kv.mod_revision, kv.version),
            (&b""[..], 1, 2, 2),
            "the answer leaves the written pair out"
        );
        assert_eq!(*prev, None);
        let Response::Put { prev, .. } = &out[2] else {
            panic!("{out:?}")
        };
        assert_eq!(prev.as_ref().map(|p| p.value.as_slice()), Some(&b"2"[..]));
        assert_eq!(out[3], out[1], "a retry gets the first answer");
        assert_eq!(get(&state, b"a").unwrap().unwrap().value, b"3");
        assert_eq!(revision(&state).unwrap(), 3);
    }

    #[test]
    fn cas_compares_mod_revision_and_zero_means_absent() {
        let mut state = MemTxn::new();
        let cas = |rev, v: &str| Command::Cas {
            key: b"k".to_vec(),
            expected_revision: rev,
            value: v.as_bytes().to_vec(),
        };
        let out = run(&mut state, &[cas(0, "a"), cas(0, "b"), cas(1, "c"), cas(1, "d")]);
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
        let mut state = MemTxn::new();
        let batch = Command::Batch(vec![
            put("x", "1"),
            Command::Cas {
                key: b"x".to_vec(),
                expected_revision: 1,
                value: b"2".to_vec(),
            },
            Command::Delete { key: b"x".to_vec() },
        ]);
        let applied = crate::apply(&mut state, &batch).unwrap();
        let Response::Batch(parts) = &applied.response else {
            panic!()
        };
        assert!(
            matches!(&parts[1], Response::Cas { succeeded: true, .. }),
            "sees the earlier put"
        );
        assert!(matches!(&parts[2], Response::Delete { prev: Some(_), .. }));
        let revs: Vec<u64> = applied.events.iter().map(StateEvent::revision).collect();
        assert_eq!(revs, vec![1, 2, 3], "one apply reports the whole batch in order");
        assert_eq!(applied.changed, [crate::Table::Kv].into());
    }

    #[test]
    fn apply_checks_structure_not_size_limits() {
        let mut state = MemTxn::new();
        let too_deep = Command::Batch(vec![
            put("ok", "1"),
            Command::Batch(vec![Command::Batch(vec![put("deep", "1")])]),
        ]);
        // Size limits may differ between versions; apply never depends on
        // them, so replicas of different versions agree.
        let big_key = Command::Put {
            key: vec![1; crate::command::MAX_KEY_BYTES + 1],
            value: vec![],
        };
        let out = run(&mut state, &[too_deep, big_key]);
        assert!(
            matches!(&out[0], Response::Rejected(m) if m.contains("nested too deeply")),
            "{out:?}"
        );
        assert!(matches!(&out[1], Response::Put { .. }), "{out:?}");
        let txn = &state;
        assert_eq!(get(txn, b"ok").unwrap(), None, "nothing of a rejected batch is applied");
    }

    fn request(client: u64, seq: u64, cmd: Command) -> Command {
        Command::Request {
            id: crate::command::RequestId { client, seq },
            cmd: Box::new(cmd),
        }
    }

    fn request_v2(client: u64, seq: u64, cmd: Command) -> Command {
        Command::RequestV2 {
            id: crate::command::RequestId { client, seq },
            cmd: Box::new(cmd),
        }
    }

    #[test]
    fn a_retried_request_applies_once_and_gets_the_first_answer() {
        for carrier in [request, request_v2] {
            let mut state = MemTxn::new();
            let first = carrier(7, 1, put("k", "first"));
            let out = run(
                &mut state,
                &[
                    put("k", "before"),
                    first.clone(),
                    put("k", "other"),
                    // The retry arrives in another entry, even inside a group.
                    Command::Batch(vec![first.clone(), carrier(7, 2, put("j", "1"))]),
                ],
            );
            let Response::Batch(parts) = &out[3] else {
                panic!("{out:?}")
            };
            let Response::Put { kv, prev } = &out[1] else {
                panic!("{out:?}")
            };
            assert_eq!(
                (kv.key.as_slice(), kv.value.as_slice(), kv.mod_revision),
                (&b""[..], &b""[..], 2),
                "the answer leaves the written pair out"
            );
            assert_eq!(prev.as_ref().unwrap().value, b"before");
            assert_eq!(parts[0], out[1], "the retry is answered with the first response");
            let txn = &state;
            assert_eq!(get(txn, b"k").unwrap().unwrap().value, b"other", "not applied twice");
            assert_eq!(revision(txn).unwrap(), 4, "k three times and j once");
        }
    }

    #[test]
    fn the_cluster_id_is_recorded_once() {
        let mut state = MemTxn::new();
        let out = run(
            &mut state,
            &[
                Command::InitCluster { cluster_id: 11 },
                Command::InitCluster { cluster_id: 12 },
            ],
        );
        assert_eq!(out, vec![Response::ClusterId(11), Response::ClusterId(11)]);
        assert_eq!(cluster_id(&state).unwrap(), 11);
    }

    #[test]
    fn a_range_starting_after_its_prefix_is_empty() {
        let mut state = MemTxn::new();
        run(&mut state, &[put("a1", "v"), put("b1", "v")]);
        assert_eq!(range(&state, b"a", b"z", 10).unwrap(), (Vec::new(), false));
    }

    #[test]
    fn a_request_inside_a_request_is_refused() {
        let inner = request(1, 1, put("k", "v"));
        let nested = request(1, 1, Command::Batch(vec![inner]));
        assert!(nested.validate(&crate::Limits::default()).is_err());
        let mut state = MemTxn::new();
        let out = run(&mut state, &[nested]);
        assert!(
            matches!(&out[0], Response::Rejected(m) if m.contains("inside another request")),
            "{out:?}"
        );
    }

    #[test]
    fn range_and_history_pages_are_bounded_in_bytes() {
        let mut state = MemTxn::new();
        let big = "v".repeat(700 * 1024);
        let cmds: Vec<Command> = (0..5).map(|i| put(&format!("b/{i}"), &big)).collect();
        run(&mut state, &cmds);
        let txn = &state;
        let (page, more) = range(txn, b"b/", b"", 0).unwrap();
        assert_eq!(page.len(), 2, "three 700 KiB values pass 2 MiB");
        assert!(more);
        let (rest, more) = range(txn, b"b/", &page[1].key, 0).unwrap();
        assert_eq!((rest.len(), more), (2, true));
        let evs = history(txn, b"", 1, 1000, MAX_RANGE_BYTES).unwrap();
        assert_eq!(evs.len(), 2);
        let one = history(txn, b"", 1, 1000, 1).unwrap();
        assert_eq!(one.len(), 1, "a page always holds one event");
    }

    #[test]
    fn range_pages_and_history_resumes() {
        let mut state = MemTxn::new();
        let cmds: Vec<Command> = (0..25)
            .map(|i| put(&format!("p/{i:02}"), "v"))
            .chain([put("q", "v")])
            .collect();
        run(&mut state, &cmds);
        let txn = &state;
        let (page, more) = range(txn, b"p/", b"", 10).unwrap();
        assert_eq!(page.len(), 10);
        assert!(more);
        let (page2, _) = range(txn, b"p/", &page[9].key, 10).unwrap();
        assert_eq!(page2[0].key, b"p/10");
        let (all, more) = range(txn, b"p/", b"", 0).unwrap();
        assert_eq!((all.len(), more), (25, false));
        let evs = history(txn, b"p/", 20, 100, usize::MAX).unwrap();
        assert_eq!(
            evs.iter().map(StateEvent::revision).collect::<Vec<_>>(),
            vec![20, 21, 22, 23, 24, 25]
        );
        assert!(
            history(txn, b"", 27, 100, usize::MAX).unwrap().is_empty(),
            "future revisions are empty, not errors"
        );
    }

    #[test]
    fn history_is_bounded_and_compaction_is_reported() {
        let mut state = MemTxn::new();
        let n = WATCH_HISTORY + 5;
        let batch = Command::Batch((0..n).map(|i| put(&format!("k{}", i % 7), "v")).collect());
        run(&mut state, &[batch]);
        let txn = &state;
        let err = history(txn, b"", 3, 10, usize::MAX).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Compacted {
                    requested: 3,
                    oldest: 6
                }
            ),
            "{err}"
        );
        assert_eq!(history(txn, b"", 6, 1, usize::MAX).unwrap()[0].revision(), 6);
        let stored = txn.scan(EVENTS_TABLE, b"", None, usize::MAX).unwrap().len() as u64;
        assert_eq!(stored, WATCH_HISTORY);
    }

    /// The oldest revision kept after `n` puts by [`put_big`]: as many of
    /// the newest as fit in [`WATCH_HISTORY_BYTES`] (all its rows have one
    /// size).
    fn big_oldest(n: u64) -> u64 {
        let ev = StateEvent {
            kind: EventKind::Put,
            kv: KeyValue {
                key: b"big/000".to_vec(),
                value: vec![b'v'; 1024 * 1024],
                create_revision: 1,
                mod_revision: 1,
                version: 1,
            },
        };
        let row = encode_row(&ev).unwrap().len() as u64;
        n - WATCH_HISTORY_BYTES / row + 1
    }

    fn window(txn: &dyn Txn) -> Option<HistoryWindow> {
        txn.get(META_TABLE, HISTORY_WINDOW_KEY)
            .unwrap()
            .map(|b| decode_row(&b).unwrap())
    }

    fn stored_events(txn: &dyn Txn) -> Vec<(Vec<u8>, Vec<u8>)> {
        txn.scan(EVENTS_TABLE, b"", None, usize::MAX).unwrap()
    }

    /// Puts of 1 MiB values, one entry each; every event applied.
    fn put_big(state: &mut MemTxn, from: usize, to: usize) -> Vec<StateEvent> {
        let big = vec![b'v'; 1024 * 1024];
        (from..to)
            .flat_map(|i| {
                let cmd = Command::Put {
                    key: format!("big/{i:03}").into_bytes(),
                    value: big.clone(),
                };
                crate::apply(state, &cmd).unwrap().events
            })
            .collect()
    }

    #[test]
    fn history_is_bounded_in_bytes_and_compaction_is_reported() {
        let mut state = MemTxn::new();
        put_big(&mut state, 0, 68);
        let oldest = big_oldest(68);
        assert!(oldest > 1, "the byte bound evicted");
        let txn = &state;
        let stored = stored_events(txn);
        assert_eq!(stored.len() as u64, 68 - oldest + 1);
        assert_eq!(decode_key_u64(&stored[0].0).unwrap(), oldest);
        let bytes: u64 = stored.iter().map(|(_, v)| v.len() as u64).sum();
        assert!(bytes <= WATCH_HISTORY_BYTES);
        assert_eq!(window(txn), Some(HistoryWindow { oldest, bytes }));
        let err = history(txn, b"", oldest - 1, 10, usize::MAX).unwrap_err();
        assert!(
            matches!(err, StateError::Compacted { requested, oldest: o } if requested == oldest - 1 && o == oldest),
            "{err}"
        );
        assert!(matches!(
            history(txn, b"", 1, 10, usize::MAX),
            Err(StateError::Compacted { .. })
        ));
        let evs = history(txn, b"", oldest, 1000, usize::MAX).unwrap();
        assert_eq!(evs.len() as u64, 68 - oldest + 1);
        assert_eq!(evs[0].revision(), oldest);
    }

    #[test]
    fn the_newest_event_stays_however_large() {
        let mut state = MemTxn::new();
        let huge = Command::Put {
            key: b"huge".to_vec(),
            value: vec![0; WATCH_HISTORY_BYTES as usize + 1],
        };
        // The huge event alone passes the bound: it stays, alone; the next
        // event pushes it out.
        for (cmd, rev) in [(put("a", "1"), 1), (put("b", "1"), 2), (huge, 3), (put("c", "1"), 4)] {
            run(&mut state, &[cmd]);
            let stored = stored_events(&state);
            let kept: Vec<u64> = stored.iter().map(|(k, _)| decode_key_u64(k).unwrap()).collect();
            let oldest = if rev < 3 { 1 } else { rev };
            assert_eq!(kept, (oldest..=rev).collect::<Vec<_>>());
            let bytes = stored.iter().map(|(_, v)| v.len() as u64).sum();
            assert_eq!(window(&state), Some(HistoryWindow { oldest, bytes }));
        }
        let err = history(&state, b"", 3, 10, usize::MAX).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Compacted {
                    requested: 3,
                    oldest: 4
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn state_without_the_history_window_row_evicts_like_state_with_it() {
        let mut with_row = MemTxn::new();
        let all = put_big(&mut with_row, 0, 70);
        let kept = big_oldest(70);
        assert!(kept > 1, "the byte bound evicted");
        assert_eq!(window(&with_row).unwrap().oldest, kept);

        // What a build without the byte bound kept at the same log index:
        // every event of the count bound, and no `history_window` row.
        let mut old = with_row.clone();
        old.delete(META_TABLE, HISTORY_WINDOW_KEY).unwrap();
        for ev in all.iter().filter(|ev| ev.revision() < kept) {
            old.put(EVENTS_TABLE, &ev.revision().to_be_bytes(), encode_row(ev).unwrap())
                .unwrap();
        }
        assert_eq!(stored_events(&old).len(), 70);
        // Only the row lost: as after a snapshot of a mixed-version cluster.
        let mut no_row = with_row.clone();
        no_row.delete(META_TABLE, HISTORY_WINDOW_KEY).unwrap();

        // Before the next event, the old state reports compaction by count
        // alone, exactly as the build that wrote it did, and serves it all.
        assert_eq!(history(&old, b"", 1, 1000, usize::MAX).unwrap().len(), 70);
        assert!(history(&with_row, b"", 1, 1000, usize::MAX).is_err());

        // The next event rebuilds the row in each, and all three agree, then
        // and after more events.
        for n in [71, 72] {
            put_big(&mut with_row, n - 1, n);
            put_big(&mut old, n - 1, n);
            put_big(&mut no_row, n - 1, n);
            assert!(old == with_row, "rebuilt from the full old history");
            assert!(no_row == with_row, "rebuilt from the bounded history");
            let oldest = big_oldest(n as u64);
            assert_eq!(window(&old).unwrap().oldest, oldest);
            let err = history(&old, b"", oldest - 1, 10, usize::MAX).unwrap_err();
            assert!(
                matches!(err, StateError::Compacted { oldest: o, .. } if o == oldest),
                "{err}"
            );
        }

        // A fresh state's first event builds the row from an empty history.
        let mut fresh = MemTxn::new();
        run(&mut fresh, &[put("a", "1")]);
        let stored = stored_events(&fresh);
        assert_eq!(
            window(&fresh),
            Some(HistoryWindow {
                oldest: 1,
                bytes: stored[0].1.len() as u64
            })
        );
    }
}

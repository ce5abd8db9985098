//! The request window: the first answer to each client request, kept so
//! that a retry of the same [`RequestId`] is answered from here instead of
//! applied again (exactly-once writes; Raft's client sessions, Ongaro's
//! thesis section 6.3).
//!
//! Two layouts. The log decides which one a replica uses, so every replica
//! switches at the same entry:
//! - **In arrival order** (the first layout), for `Command::Request` on
//!   state that never applied a `Command::RequestV2`. `requests`: request id
//!   -> the first answer, with the pairs it reports as written (as builds
//!   before put answers left them out stored it; a retry is answered
//!   without a put's pair); `request_order`: arrival number -> the request id
//!   and the answer's size; `meta`/`request_window`: the next and oldest
//!   arrival numbers and the bytes kept. It keeps the newest
//!   [`REQUEST_WINDOW_ENTRIES`] answers (at most [`REQUEST_WINDOW_BYTES`]):
//!   once full, every request writes two rows and deletes two.
//! - **In generations** (the second layout), from the first
//!   `Command::RequestV2` on, for both variants. `request_gens`:
//!   (generation, request id) -> the first answer, without the key and value
//!   of a pair it reports as written (the retried command carries them; a
//!   compare-and-swap's are put back when a retry is answered, a put's
//!   answer never has them); `meta`/`request_gens`: the
//!   current generation, its answers and bytes, and the highest sequence
//!   number of each client in it and in the one before (so a first try,
//!   newer than all of its client's answers, reads no row; the clients are
//!   the node processes that wrote in the two generations). A generation
//!   closes at
//!   [`REQUEST_WINDOW_ENTRIES`] answers or [`REQUEST_WINDOW_BYTES`]; closing
//!   it deletes the one before it with one range delete. So the window always
//!   holds at least the newest [`REQUEST_WINDOW_ENTRIES`] answers (or
//!   [`REQUEST_WINDOW_BYTES`]), as the first layout did, and at most twice
//!   that; a request writes one row, and a retry's lookup reads at most two.
//!
//! A first try that reaches the log after a later request of its client
//! (concurrent requests of one node take different paths to the log) is
//! not newer than its client's newest kept answer, so the rule above would
//! look it up in both generations: a point read of a row that does not
//! exist, on every replica. A [`RequestIndex`] (in memory, one per replica
//! process, not replicated) notes every answer kept while it watches, so
//! such a request is known not to be kept without a read; see its
//! invariant.
//!
//! Switching: the first `RequestV2` starts generation 0 and notes whether
//! answers of the first layout remain (`legacy`). Lookups still read those
//! until generation 0 closes, which deletes both of their tables and their
//! `meta` row (range deletes again). Nothing here reads a clock or iterates
//! an unordered map: every replica keeps the same rows.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::codec::{Row, decode_row, encode_framed, encode_row};
use crate::command::{Command, KeyValue, RequestId, Response};
use crate::error::Result;
use crate::kv::META_TABLE;
use crate::txn::Txn;

const REQUESTS_TABLE: &str = "requests";
const REQUEST_ORDER_TABLE: &str = "request_order";
const REQUEST_WINDOW_KEY: &[u8] = b"request_window";
const GENERATIONS_TABLE: &str = "request_gens";
const GENERATIONS_KEY: &[u8] = b"request_gens";

/// Most requests whose first answer is kept for deduplicating retries (in
/// the second layout: at least this many, per generation). Part of the
/// replicated logic, like [`crate::kv::WATCH_HISTORY`].
pub const REQUEST_WINDOW_ENTRIES: u64 = 100_000;
/// Most bytes of kept answers in the first layout, and of one generation in
/// the second.
pub const REQUEST_WINDOW_BYTES: u64 = 64 * 1024 * 1024;

/// The first answer to a request, kept for its retries.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestRow {
    response: Response,
}

/// A [`RequestRow`] to encode from a borrowed response (the same bytes).
#[derive(Serialize)]
struct RequestRowRef<'a> {
    response: &'a Response,
}

/// The first layout's bookkeeping, one `meta` row.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct RequestWindow {
    /// Order number of the next kept answer.
    next: u64,
    /// Order number of the oldest kept answer.
    oldest: u64,
    /// Bytes of kept answers.
    bytes: u64,
}

/// Where a kept answer of the first layout is, in arrival order.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RequestOrderRow {
    key: Vec<u8>,
    bytes: u64,
}

/// The second layout's bookkeeping, one `meta` row.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Generations {
    /// The generation new answers go to; the one before it is kept too.
    current: u64,
    /// Answers in the current generation.
    entries: u64,
    /// Bytes of the current generation's rows, as stored.
    bytes: u64,
    /// Whether answers of the first layout may remain.
    legacy: bool,
    /// The highest sequence number of each client with an answer in the
    /// current generation.
    newest: BTreeMap<u64, u64>,
    /// The same for the previous generation.
    previous_newest: BTreeMap<u64, u64>,
}

impl Generations {
    /// Whether a generation whose highest sequence numbers are `newest`
    /// may hold an answer to `id`: a client's sequence numbers only grow,
    /// so a request newer than its newest kept answer (every first try, in
    /// practice) is looked up nowhere.
    fn may_hold(newest: &BTreeMap<u64, u64>, id: &RequestId) -> bool {
        newest.get(&id.client).is_some_and(|seq| id.seq <= *seq)
    }
}

/// Clients whose kept answers one [`RequestIndex`] follows; past this,
/// it forgets them all and starts again (each node process is a client).
const INDEX_CLIENTS: usize = 256;
/// Sequence numbers one client's index spans (a bit each): how far a
/// request may trail its client's newest kept answer and still be known
/// as not kept without a read.
const INDEX_SPAN: u64 = 1 << 14;
/// Words of one client's marks.
const INDEX_WORDS: usize = (INDEX_SPAN / 64) as usize;

/// The answers the request window kept while this index watched, per
/// client, so that a request known not to be kept is answered "not kept"
/// without reading the window (module docs). Not replicated: it changes
/// which rows apply reads, never what apply writes or answers.
///
/// Invariant: for a client it follows, every answer the window holds with
/// a sequence number at or above the client's `from` is marked. A client
/// is followed from its first lookup on, with `from` one past its newest
/// answer the window then held, and every answer kept after that is
/// marked (as apply keeps it). Marks are never wrong in the other
/// direction: a marked request (kept in a step that then failed, or in a
/// generation since dropped) is only looked up. The index must be emptied
/// ([`RequestIndex::clear`]) whenever the state is replaced other than by
/// apply (a snapshot installed).
#[derive(Debug, Default)]
pub struct RequestIndex {
    clients: BTreeMap<u64, KeptSeqs>,
}

/// One client's marks: bit `i` of `bits` is sequence number `from + i`.
#[derive(Debug)]
struct KeptSeqs {
    from: u64,
    bits: Box<[u64; INDEX_WORDS]>,
}

impl KeptSeqs {
    fn new(from: u64) -> Self {
        Self {
            from,
            bits: Box::new([0; INDEX_WORDS]),
        }
    }

    /// Whether `seq` is known not to be held: at or above `from`, unmarked.
    fn rules_out(&self, seq: u64) -> bool {
        match seq.checked_sub(self.from) {
            None => false,
            Some(at) if at >= INDEX_SPAN => true,
            Some(at) => self.bits[(at / 64) as usize] & (1 << (at % 64)) == 0,
        }
    }

    /// Marks `seq` kept, moving the span up (forgetting its oldest marks,
    /// whose sequence numbers then fall below `from`) if `seq` lies past
    /// it.
    fn mark(&mut self, seq: u64) {
        let Some(mut at) = seq.checked_sub(self.from) else {
            return;
        };
        if at >= INDEX_SPAN {
            // `from` moves up by whole words until `seq` lies in the span's
            // lower half; the marks of the words still spanned move along.
            let words = (at - INDEX_SPAN / 2) / 64 + 1;
            let still = (INDEX_WORDS as u64).saturating_sub(words) as usize;
            self.bits.copy_within(INDEX_WORDS - still.., 0);
            self.bits[still..].fill(0);
            self.from += words * 64;
            at -= words * 64;
        }
        self.bits[(at / 64) as usize] |= 1 << (at % 64);
    }
}

impl RequestIndex {
    /// Forgets every client (the state was replaced).
    pub fn clear(&mut self) {
        self.clients.clear();
    }

    /// Whether the generations `g` surely hold no answer to `id`, following
    /// `id`'s client from here on if it was not yet.
    fn rules_out(&mut self, g: &Generations, id: &RequestId) -> bool {
        if !self.clients.contains_key(&id.client) && self.clients.len() >= INDEX_CLIENTS {
            self.clients.clear();
        }
        self.clients
            .entry(id.client)
            .or_insert_with(|| {
                let newest = [&g.newest, &g.previous_newest]
                    .into_iter()
                    .filter_map(|n| n.get(&id.client).copied())
                    .max();
                KeptSeqs::new(newest.map_or(0, |n| n.saturating_add(1)))
            })
            .rules_out(id.seq)
    }

    /// Marks `id` kept, if its client is followed.
    fn mark(&mut self, id: &RequestId) {
        if let Some(seen) = self.clients.get_mut(&id.client) {
            seen.mark(id.seq);
        }
    }
}

crate::row_v1!(RequestRow, "request");
crate::row_v1!(RequestWindow, "request window");
crate::row_v1!(RequestOrderRow, "request order");
crate::row_v1!(Generations, "request generations");

/// Which command carried a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Carrier {
    /// `Command::Request`: the layout the state already has.
    Request,
    /// `Command::RequestV2`: generations, switching to them if needed.
    RequestV2,
}

/// The request window as one apply step found it.
pub(crate) enum Window {
    /// The first layout.
    InOrder,
    /// The second layout.
    Generations {
        /// Its bookkeeping.
        row: Generations,
        /// Whether the bookkeeping row is already stored. It is not only at
        /// the first `RequestV2` (and at retries answered before any new
        /// request of that layout was kept).
        stored: bool,
    },
}

impl Window {
    /// The window of `txn`'s state, switched to generations if `carrier` is
    /// the first `RequestV2`.
    pub(crate) fn open(txn: &dyn Txn, carrier: Carrier) -> Result<Self> {
        if let Some(b) = txn.get(META_TABLE, GENERATIONS_KEY)? {
            return Ok(Window::Generations {
                row: decode_row(&b)?,
                stored: true,
            });
        }
        Ok(match carrier {
            Carrier::Request => Window::InOrder,
            Carrier::RequestV2 => Window::Generations {
                row: Generations {
                    legacy: txn.get(META_TABLE, REQUEST_WINDOW_KEY)?.is_some(),
                    ..Generations::default()
                },
                stored: false,
            },
        })
    }

    /// Whether the state may not have switched to the second layout yet:
    /// true unless a generations row is stored. That row is first written
    /// in the same apply step as every other switch of the first
    /// `RequestV2` (the watch history's, see `kv`), so a stored row proves
    /// all of them done.
    pub(crate) fn may_need_switch(&self) -> bool {
        !matches!(self, Window::Generations { stored: true, .. })
    }

    /// The first answer to request `id` (whose command is `cmd`), if kept.
    pub(crate) fn answered(&self, txn: &dyn Txn, id: &RequestId, cmd: &Command) -> Result<Option<Response>> {
        let Window::Generations { row: g, .. } = self else {
            return answered_in_order(txn, id);
        };
        let newest_first = [
            Some(g.current).filter(|_| Generations::may_hold(&g.newest, id)),
            g.current
                .checked_sub(1)
                .filter(|_| Generations::may_hold(&g.previous_newest, id)),
        ];
        for generation in newest_first.into_iter().flatten() {
            if let Some(b) = txn.get(GENERATIONS_TABLE, &generation_key(generation, id))? {
                let mut response = decode_row::<RequestRow>(&b)?.response;
                restore_written_where(cmd, &mut response, |by| by == WrittenBy::Cas);
                return Ok(Some(response));
            }
        }
        if g.legacy {
            return answered_in_order(txn, id);
        }
        Ok(None)
    }

    /// Keeps `response` as the first answer to request `id` (whose command
    /// is `cmd`), then drops what the window no longer keeps. In the second
    /// layout the generations row is returned, for the caller to store
    /// ([`WindowBook`]); the first layout's rows are all written here.
    fn remember(
        self,
        txn: &mut dyn Txn,
        id: &RequestId,
        cmd: &Command,
        response: &mut Response,
    ) -> Result<Option<Generations>> {
        let Window::Generations { row: mut g, .. } = self else {
            remember_in_order(txn, id, cmd, response)?;
            return Ok(None);
        };
        // The kept answer is the response without the written pairs, which
        // move out for the encoding and back (no copy of them is made).
        let taken = take_written(cmd, response);
        let row = encode_framed(RequestRow::WHAT, RequestRow::VERSION, &RequestRowRef { response });
        put_back(cmd, response, taken);
        let row = row?;
        let bytes = row.len() as u64;
        txn.put(GENERATIONS_TABLE, &generation_key(g.current, id), row)?;
        g.entries += 1;
        g.bytes = g.bytes.saturating_add(bytes);
        let newest = g.newest.entry(id.client).or_insert(id.seq);
        *newest = (*newest).max(id.seq);
        if g.entries >= REQUEST_WINDOW_ENTRIES || g.bytes >= REQUEST_WINDOW_BYTES {
            if let Some(previous) = g.current.checked_sub(1) {
                txn.delete_range(
                    GENERATIONS_TABLE,
                    &previous.to_be_bytes(),
                    Some(&g.current.to_be_bytes()),
                )?;
            }
            if g.legacy {
                txn.delete_range(REQUESTS_TABLE, b"", None)?;
                txn.delete_range(REQUEST_ORDER_TABLE, b"", None)?;
                txn.delete(META_TABLE, REQUEST_WINDOW_KEY)?;
                g.legacy = false;
            }
            g = Generations {
                current: g.current + 1,
                previous_newest: std::mem::take(&mut g.newest),
                ..Generations::default()
            };
        }
        Ok(Some(g))
    }
}

/// The generations row during one apply step (`kv::Books`): read at the
/// step's first request, kept decoded, and stored once when the step ends,
/// instead of read and rewritten by every request.
///
/// Invariant: a window opened here is what [`Window::open`] would return if
/// the row had been stored after every request. The row kept here is the
/// current one (stored, or to be stored); while none is kept, the stored
/// row is current. A window that kept no answer (a retry answered from it)
/// goes back unchanged, or, if its row was never stored, is dropped, as
/// [`Window::open`] would not see it either.
#[derive(Debug, Default)]
pub(crate) struct WindowBook {
    /// The current row, once read or changed in this step.
    kept: Option<Generations>,
    /// Whether `kept` differs from the stored row.
    changed: bool,
    /// The replica's index of kept answers, for this step.
    index: RequestIndex,
}

impl WindowBook {
    /// A book for one step, over the replica's `index` ([`Self::store`]
    /// gives it back).
    pub(crate) fn new(index: RequestIndex) -> Self {
        Self {
            index,
            ..Self::default()
        }
    }

    /// The first answer to request `id` in `window` ([`Window::answered`]),
    /// without reading the window when the index rules it out.
    pub(crate) fn answered(
        &mut self,
        window: &Window,
        txn: &dyn Txn,
        id: &RequestId,
        cmd: &Command,
    ) -> Result<Option<Response>> {
        if let Window::Generations { row, .. } = window
            && !row.legacy
            && self.index.rules_out(row, id)
        {
            return Ok(None);
        }
        window.answered(txn, id, cmd)
    }

    /// The window for a request of `carrier` ([`Window::open`]), from the
    /// row kept here if there is one. Give it back with [`Self::give_back`]
    /// or [`Self::remember`].
    pub(crate) fn open(&mut self, txn: &dyn Txn, carrier: Carrier) -> Result<Window> {
        if let Some(row) = self.kept.take() {
            return Ok(Window::Generations { row, stored: true });
        }
        Window::open(txn, carrier)
    }

    /// Takes back a window that kept no answer.
    pub(crate) fn give_back(&mut self, window: Window) {
        if let Window::Generations { row, stored: true } = window {
            self.kept = Some(row);
        }
    }

    /// Keeps `response` as the first answer to request `id` in `window`
    /// ([`Window::remember`]) and takes the window back.
    pub(crate) fn remember(
        &mut self,
        window: Window,
        txn: &mut dyn Txn,
        id: &RequestId,
        cmd: &Command,
        response: &mut Response,
    ) -> Result<()> {
        if let Some(row) = window.remember(txn, id, cmd, response)? {
            self.index.mark(id);
            self.kept = Some(row);
            self.changed = true;
        }
        Ok(())
    }

    /// Stores the kept row if this step changed it; gives back the index.
    pub(crate) fn store(self, txn: &mut dyn Txn) -> Result<RequestIndex> {
        if let Some(row) = self.kept
            && self.changed
        {
            txn.put(META_TABLE, GENERATIONS_KEY, encode_row(&row)?)?;
        }
        Ok(self.index)
    }
}

/// The second layout's key: the generation, then the request id, all
/// big-endian, so a generation is one contiguous range.
fn generation_key(generation: u64, id: &RequestId) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..8].copy_from_slice(&generation.to_be_bytes());
    key[8..16].copy_from_slice(&id.client.to_be_bytes());
    key[16..].copy_from_slice(&id.seq.to_be_bytes());
    key
}

/// The first layout's key: the request id, big-endian.
fn request_key(id: &RequestId) -> Vec<u8> {
    let mut key = Vec::with_capacity(16);
    key.extend_from_slice(&id.client.to_be_bytes());
    key.extend_from_slice(&id.seq.to_be_bytes());
    key
}

/// The first layout's answer to request `id`, without the pairs a put's
/// answer leaves out.
fn answered_in_order(txn: &dyn Txn, id: &RequestId) -> Result<Option<Response>> {
    match txn.get(REQUESTS_TABLE, &request_key(id))? {
        Some(b) => {
            let mut response = decode_row::<RequestRow>(&b)?.response;
            leave_out_put_pairs(&mut response);
            Ok(Some(response))
        }
        None => Ok(None),
    }
}

/// The first layout: keeps `response`, then drops the oldest kept answers
/// while the window holds too many or too large ones.
fn remember_in_order(txn: &mut dyn Txn, id: &RequestId, cmd: &Command, response: &Response) -> Result<()> {
    let key = request_key(id);
    // This layout keeps the written pairs, as builds before answers left
    // them out did: the same rows on every replica.
    let mut response = response.clone();
    restore_written(cmd, &mut response);
    let row = encode_row(&RequestRow { response })?;
    // The window counts body bytes, without the layout byte, exactly as
    // before rows carried one, so replicas of either build evict alike.
    let bytes = row.len().saturating_sub(1) as u64;
    let mut window: RequestWindow = match txn.get(META_TABLE, REQUEST_WINDOW_KEY)? {
        Some(b) => decode_row(&b)?,
        None => RequestWindow::default(),
    };
    txn.put(REQUESTS_TABLE, &key, row)?;
    txn.put(
        REQUEST_ORDER_TABLE,
        &window.next.to_be_bytes(),
        encode_row(&RequestOrderRow { key, bytes })?,
    )?;
    window.next += 1;
    window.bytes += bytes;
    while window.oldest + 1 < window.next
        && (window.next - window.oldest > REQUEST_WINDOW_ENTRIES || window.bytes > REQUEST_WINDOW_BYTES)
    {
        let order_key = window.oldest.to_be_bytes();
        if let Some(b) = txn.get(REQUEST_ORDER_TABLE, &order_key)? {
            let old: RequestOrderRow = decode_row(&b)?;
            txn.delete(REQUESTS_TABLE, &old.key)?;
            txn.delete(REQUEST_ORDER_TABLE, &order_key)?;
            window.bytes = window.bytes.saturating_sub(old.bytes);
        }
        window.oldest += 1;
    }
    txn.put(META_TABLE, REQUEST_WINDOW_KEY, encode_row(&window)?)?;
    Ok(())
}

/// Calls `f` with every pair `response` reports as written by a put or a
/// successful compare-and-swap of `cmd`, and the key and value that command
/// carried.
fn each_written(cmd: &Command, response: &mut Response, f: &mut impl FnMut(WrittenBy, &mut KeyValue, &[u8], &[u8])) {
    match (cmd, response) {
        (Command::Put { key, value } | Command::PutWithoutPrev { key, value }, Response::Put { kv, .. }) => {
            f(WrittenBy::Put, kv, key, value)
        }
        (
            Command::Cas { key, value, .. },
            Response::Cas {
                succeeded: true,
                kv: Some(kv),
                ..
            },
        ) => f(WrittenBy::Cas, kv, key, value),
        (Command::Batch(cmds), Response::Batch(parts)) => {
            for (c, part) in cmds.iter().zip(parts) {
                each_written(c, part, f);
            }
        }
        _ => {}
    }
}

/// A written pair [`take_written`] moved out of a response: its key and
/// value.
type Taken = Option<(Vec<u8>, Vec<u8>)>;

/// Moves out of `response` the key and value of each written pair that
/// are exactly the command's (keys are never empty, so an empty key marks
/// a pair left out); [`put_back`] returns them.
fn take_written(cmd: &Command, response: &mut Response) -> Vec<Taken> {
    let mut taken = Vec::new();
    each_written(cmd, response, &mut |_, kv, key, value| {
        let exact = kv.key == key && kv.value == value;
        taken.push(exact.then(|| (std::mem::take(&mut kv.key), std::mem::take(&mut kv.value))));
    });
    taken
}

/// Returns the pairs [`take_written`] moved out of `response` (the same
/// command visits the same pairs in the same order).
fn put_back(cmd: &Command, response: &mut Response, taken: Vec<Taken>) {
    let mut taken = taken.into_iter();
    each_written(cmd, response, &mut |_, kv, _, _| {
        if let Some(Some((key, value))) = taken.next() {
            kv.key = key;
            kv.value = value;
        }
    });
}

/// Puts back into `response` the key and value of every pair `cmd` wrote
/// that the answer leaves out, through request and batch wrappers.
pub(crate) fn restore_written_pairs(cmd: &Command, response: &mut Response) {
    match (cmd, response) {
        (Command::Request { cmd, .. } | Command::RequestV2 { cmd, .. }, response) => {
            restore_written_pairs(cmd, response)
        }
        (Command::Batch(cmds), Response::Batch(parts)) => {
            for (cmd, part) in cmds.iter().zip(parts) {
                restore_written_pairs(cmd, part);
            }
        }
        (cmd, response) => restore_written(cmd, response),
    }
}

/// Puts back what [`take_written`] left out of a kept answer.
fn restore_written(cmd: &Command, response: &mut Response) {
    restore_written_where(cmd, response, |_| true);
}

/// Puts back what [`take_written`] left out of a kept answer, for the
/// pairs written by the commands `restore` names.
fn restore_written_where(cmd: &Command, response: &mut Response, restore: impl Fn(WrittenBy) -> bool) {
    each_written(cmd, response, &mut |by, kv, key, value| {
        if restore(by) && kv.key.is_empty() {
            kv.key = key.to_vec();
            kv.value = value.to_vec();
        }
    });
}

/// Empties the pairs puts' answers leave out (answers the first layout
/// kept have them). Whatever command a retry carries: the answer is the
/// first one.
fn leave_out_put_pairs(response: &mut Response) {
    match response {
        Response::Put { kv, .. } => {
            kv.key = Vec::new();
            kv.value = Vec::new();
        }
        Response::Batch(parts) => parts.iter_mut().for_each(leave_out_put_pairs),
        _ => {}
    }
}

/// Which command wrote a pair an answer reports: a put's answer leaves the
/// pair out, a compare-and-swap's has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WrittenBy {
    Put,
    Cas,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemTxn;

    fn id(seq: u64) -> RequestId {
        RequestId { client: 7, seq }
    }

    fn put(k: &str) -> Command {
        Command::Put {
            key: k.as_bytes().to_vec(),
            value: b"v".to_vec(),
        }
    }

    /// A put's answer, as apply gives it: the pair left out.
    fn written(rev: u64) -> Response {
        Response::Put {
            kv: KeyValue {
                key: Vec::new(),
                value: Vec::new(),
                create_revision: rev,
                mod_revision: rev,
                version: 1,
            },
            prev: None,
        }
    }

    fn remember(txn: &mut MemTxn, carrier: Carrier, seq: u64) {
        let cmd = put("k");
        let mut book = WindowBook::default();
        let window = book.open(txn, carrier).unwrap();
        book.remember(window, txn, &id(seq), &cmd, &mut written(seq)).unwrap();
        book.store(txn).unwrap();
    }

    fn answered(txn: &MemTxn, seq: u64) -> Option<Response> {
        Window::open(txn, Carrier::Request)
            .unwrap()
            .answered(txn, &id(seq), &put("k"))
            .unwrap()
    }

    fn rows(txn: &MemTxn, table: &str) -> usize {
        txn.rows().filter(|(t, _, _)| *t == table).count()
    }

    #[test]
    fn the_first_layout_keeps_the_newest_answers() {
        let mut txn = MemTxn::new();
        let n = REQUEST_WINDOW_ENTRIES;
        for seq in 1..=n + 2 {
            remember(&mut txn, Carrier::Request, seq);
        }
        let kept = txn.scan(REQUESTS_TABLE, b"", None, usize::MAX).unwrap();
        assert_eq!(kept.len() as u64, n);
        assert_eq!(kept[0].0, request_key(&id(3)));
        assert_eq!(rows(&txn, REQUEST_ORDER_TABLE) as u64, n);
        assert_eq!(answered(&txn, 2), None);
        assert_eq!(answered(&txn, 3), Some(written(3)));
        assert_eq!(rows(&txn, GENERATIONS_TABLE), 0);
    }

    /// The pair a kept answer reports as written, as stored in `table`.
    fn stored_pair(txn: &MemTxn, table: &str) -> (Vec<u8>, Vec<u8>) {
        let (_, _, row) = txn.rows().find(|(t, _, _)| *t == table).unwrap();
        let stored = decode_row::<RequestRow>(row).unwrap().response;
        let Response::Put { kv, .. } = stored else {
            panic!("{stored:?}")
        };
        (kv.key, kv.value)
    }

    /// A [`MemTxn`] that counts the reads of the window's generations.
    struct CountingTxn {
        inner: MemTxn,
        generation_reads: std::cell::Cell<usize>,
    }

    impl Txn for CountingTxn {
        fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
            if table == GENERATIONS_TABLE {
                self.generation_reads.set(self.generation_reads.get() + 1);
            }
            self.inner.get(table, key)
        }
        fn put(&mut self, table: &str, key: &[u8], value: Vec<u8>) -> Result<()> {
            self.inner.put(table, key, value)
        }
        fn delete(&mut self, table: &str, key: &[u8]) -> Result<()> {
            self.inner.delete(table, key)
        }
        fn delete_range(&mut self, table: &str, start: &[u8], end: Option<&[u8]>) -> Result<()> {
            self.inner.delete_range(table, start, end)
        }
        fn scan(&self, table: &str, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            self.inner.scan(table, start, end, limit)
        }
    }

    /// Applies a put under request `seq` of client 7 as `RequestV2`.
    fn request(txn: &mut dyn Txn, index: &mut RequestIndex, seq: u64) -> Response {
        let cmd = Command::RequestV2 {
            id: id(seq),
            cmd: Box::new(put(&format!("k{seq}"))),
        };
        crate::apply_indexed(txn, &cmd, index).unwrap().response
    }

    #[test]
    fn a_first_try_behind_its_clients_newest_answer_reads_no_window_row() {
        let mut txn = CountingTxn {
            inner: MemTxn::new(),
            generation_reads: std::cell::Cell::new(0),
        };
        let mut index = RequestIndex::default();
        request(&mut txn, &mut index, 5);
        request(&mut txn, &mut index, 9);
        let before = txn.generation_reads.get();
        // First tries that arrive after a later request of their client.
        for seq in [6, 8, 7] {
            request(&mut txn, &mut index, seq);
        }
        assert_eq!(txn.generation_reads.get(), before, "no lookups for first tries");
        // Retries are still looked up and answered from the window.
        let first = request(&mut txn, &mut index, 8);
        assert!(txn.generation_reads.get() > before);
        assert_eq!(request(&mut txn, &mut index, 8), first);
        // Without the index the same first try is looked up.
        let before = txn.generation_reads.get();
        request(&mut txn, &mut RequestIndex::default(), 4);
        assert!(txn.generation_reads.get() > before);
    }

    /// The sequence numbers 0..n in an order where each trails the newest
    /// by up to `spread` (a fixed pseudo-random shuffle of nearby ones),
    /// with every third one retried a little later.
    fn arrivals(n: u64, spread: u64) -> Vec<u64> {
        let mut order: Vec<u64> = (0..n).collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..order.len() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let j = (i + (x % spread) as usize).min(order.len() - 1);
            order.swap(i, j);
        }
        let mut out = Vec::new();
        for (i, seq) in order.iter().enumerate() {
            out.push(*seq);
            if seq % 3 == 0 {
                out.push(order[i.saturating_sub(5)]);
            }
        }
        out
    }

    #[test]
    fn the_index_never_rules_out_a_kept_request() {
        // Requests in a scrambled order, with retries; with and without the
        // index, across a process restart (a new index over kept answers)
        // and past the index's span: every answer and every row must be the
        // same.
        let (mut with, mut without) = (MemTxn::new(), MemTxn::new());
        let mut index = RequestIndex::default();
        let all = arrivals(2 * INDEX_SPAN + 1000, 300);
        let half = all.len() / 2;
        // Then retries of early requests, long kept.
        let retried = all[..half].iter().rev().take(2000);
        for (i, &seq) in all.iter().chain(retried).enumerate() {
            if i == half {
                // A restarted process's index knows nothing of the kept
                // answers.
                index = RequestIndex::default();
            }
            let answer = request(&mut without, &mut RequestIndex::default(), seq);
            assert_eq!(request(&mut with, &mut index, seq), answer, "seq {seq}");
        }
        assert!(with.rows().eq(without.rows()), "the same rows");
    }

    /// The answer to request `seq`, through a book over `index` or, without
    /// one, from the window's rows alone; kept if there was none: what
    /// apply does with a request.
    fn look_up_or_keep(txn: &mut MemTxn, index: Option<&mut RequestIndex>, seq: u64) -> Option<Response> {
        let cmd = put("k");
        let mut own = RequestIndex::default();
        let indexed = index.is_some();
        let index = index.unwrap_or(&mut own);
        let mut book = WindowBook::new(std::mem::take(index));
        let window = book.open(txn, Carrier::RequestV2).unwrap();
        let answer = if indexed {
            book.answered(&window, txn, &id(seq), &cmd).unwrap()
        } else {
            window.answered(txn, &id(seq), &cmd).unwrap()
        };
        match answer {
            Some(_) => book.give_back(window),
            None => book.remember(window, txn, &id(seq), &cmd, &mut written(seq)).unwrap(),
        }
        *index = book.store(txn).unwrap();
        answer
    }

    #[test]
    fn the_index_follows_the_window_across_generation_closes() {
        // Enough requests for two generations to close (the second close
        // drops the first generation's answers), scrambled, with retries.
        // The indexed side restarts (a new, empty index) right after each
        // close, when the client's newest answers are all in the closed
        // generation, and every so often besides.
        let (mut with, mut without) = (MemTxn::new(), MemTxn::new());
        let mut index = RequestIndex::default();
        let mut kept = 0;
        for (i, seq) in arrivals(2 * REQUEST_WINDOW_ENTRIES + 2000, 300).into_iter().enumerate() {
            let answer = look_up_or_keep(&mut without, None, seq);
            assert_eq!(look_up_or_keep(&mut with, Some(&mut index), seq), answer, "seq {seq}");
            if answer.is_none() {
                kept += 1;
            }
            if (answer.is_none() && kept % REQUEST_WINDOW_ENTRIES == 0) || i % 10_007 == 0 {
                index = RequestIndex::default();
            }
        }
        assert!(with.rows().eq(without.rows()), "the same rows");
    }

    #[test]
    fn the_index_span_moves_with_the_newest_request() {
        let mut seen = KeptSeqs::new(10);
        assert!(!seen.rules_out(9), "below the span: unknown");
        assert!(seen.rules_out(10));
        seen.mark(10);
        assert!(!seen.rules_out(10));
        seen.mark(10 + INDEX_SPAN + 100);
        assert!(!seen.rules_out(10 + INDEX_SPAN + 100));
        assert!(!seen.rules_out(10), "forgotten, so unknown again");
        assert!(seen.rules_out(10 + INDEX_SPAN + 99));
        assert!(seen.rules_out(10 + 3 * INDEX_SPAN), "past the span: never kept");
        // A jump far past the span forgets every mark.
        seen.mark(u64::MAX / 2);
        assert!(!seen.rules_out(u64::MAX / 2));
        assert!(seen.rules_out(u64::MAX / 2 - 1));
        assert!(!seen.rules_out(10 + INDEX_SPAN + 100));
    }

    #[test]
    fn a_kept_answer_leaves_out_the_written_pair() {
        let mut txn = MemTxn::new();
        remember(&mut txn, Carrier::RequestV2, 1);
        assert_eq!(stored_pair(&txn, GENERATIONS_TABLE), (Vec::new(), Vec::new()));
        assert_eq!(answered(&txn, 1), Some(written(1)));
        assert_eq!(answered(&txn, 2), None);
    }

    #[test]
    fn the_first_layout_stores_the_written_pair_as_older_builds_did_and_answers_without_it() {
        let mut txn = MemTxn::new();
        remember(&mut txn, Carrier::Request, 1);
        assert_eq!(stored_pair(&txn, REQUESTS_TABLE), (b"k".to_vec(), b"v".to_vec()));
        assert_eq!(answered(&txn, 1), Some(written(1)));
    }

    #[test]
    fn older_nodes_get_the_written_pairs_put_back_through_requests_and_batches() {
        let request = Command::RequestV2 {
            id: id(1),
            cmd: Box::new(put("k")),
        };
        let cmd = Command::Batch(vec![request, put("j")]);
        let mut answer = Response::Batch(vec![written(1), written(2)]);
        answer.put_back_written_pairs(&cmd);
        let Response::Batch(parts) = answer else { panic!() };
        let pairs: Vec<_> = parts
            .into_iter()
            .map(|p| match p {
                Response::Put { kv, .. } => (kv.key, kv.value, kv.mod_revision),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            pairs,
            vec![(b"k".to_vec(), b"v".to_vec(), 1), (b"j".to_vec(), b"v".to_vec(), 2)]
        );
    }

    #[test]
    fn generations_keep_at_least_a_window_of_answers_and_at_most_two() {
        let mut txn = MemTxn::new();
        let n = REQUEST_WINDOW_ENTRIES;
        for seq in 0..2 * n + 5 {
            remember(&mut txn, Carrier::RequestV2, seq);
        }
        // Generations 0 and 1 closed; closing 1 deleted 0.
        assert_eq!(rows(&txn, GENERATIONS_TABLE), n as usize + 5);
        assert_eq!(answered(&txn, n - 1), None);
        assert!(answered(&txn, n).is_some());
        assert!(answered(&txn, 2 * n + 4).is_some());
    }

    #[test]
    fn a_request_applied_out_of_order_is_found_across_a_closed_generation() {
        let mut txn = MemTxn::new();
        let n = REQUEST_WINDOW_ENTRIES;
        // Seq 1,000,000 is applied before seqs below it, then the
        // generation closes.
        remember(&mut txn, Carrier::RequestV2, 1_000_000);
        for seq in 0..n - 1 {
            remember(&mut txn, Carrier::RequestV2, seq);
        }
        assert_eq!(rows(&txn, GENERATIONS_TABLE), n as usize);
        remember(&mut txn, Carrier::RequestV2, n - 1);
        assert_eq!(
            answered(&txn, 1_000_000),
            Some(written(1_000_000)),
            "found in the previous generation"
        );
        assert!(answered(&txn, 5).is_some());
        assert_eq!(answered(&txn, 1_000_001), None);
        let other_client = RequestId { client: 8, seq: 5 };
        let none = Window::open(&txn, Carrier::Request)
            .unwrap()
            .answered(&txn, &other_client, &put("k"))
            .unwrap();
        assert_eq!(none, None);
    }

    #[test]
    fn switching_keeps_answering_the_first_layouts_answers_until_the_first_generation_closes() {
        let mut txn = MemTxn::new();
        let n = REQUEST_WINDOW_ENTRIES;
        remember(&mut txn, Carrier::Request, 0);
        remember(&mut txn, Carrier::Request, 1);
        assert_eq!(rows(&txn, REQUESTS_TABLE), 2);
        // After the switch, the old variant uses generations too.
        remember(&mut txn, Carrier::RequestV2, 2);
        remember(&mut txn, Carrier::Request, 3);
        assert_eq!(rows(&txn, REQUESTS_TABLE), 2);
        assert_eq!(rows(&txn, GENERATIONS_TABLE), 2);
        for seq in 0..4 {
            assert_eq!(answered(&txn, seq), Some(written(seq)), "request {seq}");
        }
        for seq in 4..n + 2 {
            remember(&mut txn, Carrier::Request, seq);
        }
        assert_eq!(rows(&txn, REQUESTS_TABLE), 0);
        assert_eq!(rows(&txn, REQUEST_ORDER_TABLE), 0);
        assert_eq!(txn.get(META_TABLE, REQUEST_WINDOW_KEY).unwrap(), None);
        assert_eq!(answered(&txn, 1), None);
        assert!(answered(&txn, 2).is_some());
    }
}

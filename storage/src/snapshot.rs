//! Snapshot files: the replicated state streamed to and from disk.
//!
//! A snapshot is never held in memory whole: it is written from a
//! point-in-time view straight into a file, sent in chunks read from that
//! file, received into a file, checked, and loaded row by row. The same
//! file is what `cell0 snapshot save` writes and `cell0 snapshot restore`
//! reads.
//!
//! Layout of a file (snapshot format 3; formats 1 and 2 were one postcard
//! payload held in memory, still installed when an older node sends one):
//!
//! ```text
//! magic          8 bytes  "CELL0SNP"
//! format         u32 LE   3
//! header length  u32 LE   then the header: postcard `FileHeader`
//! rows           repeated [1] [key length u32 LE] [key] [value length u32 LE] [value]
//! end            [0] [rows u64 LE] [row bytes u64 LE]
//! checksum       32 bytes SHA-256 of every byte before it
//! ```
//!
//! Invariants:
//! - A file is only ever read as valid once its last byte is checked: a
//!   reader reports a truncated, damaged or foreign file as
//!   [`Error::BadSnapshot`] naming the file and what is wrong, never as data.
//! - A file is written under a `.part` name, fsynced, and renamed; its
//!   directory is fsynced before anything refers to it.
//! - Rows come in strictly increasing key order (a scan of one keyspace);
//!   a reader refuses anything else.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{decode, encode};
use crate::live::{LivePipe, PipeSink};
use crate::preload::Growth;
use crate::{Error, Result};

/// First bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"CELL0SNP";
/// The snapshot format of files this build writes.
pub const FILE_FORMAT: u32 = 3;
/// Longest key a snapshot file may hold (state keys are far shorter).
pub const MAX_KEY_BYTES: usize = 1 << 20;
/// Longest value a snapshot file may hold.
pub const MAX_VALUE_BYTES: usize = 256 << 20;
/// Longest header.
const MAX_HEADER_BYTES: usize = 16 << 20;
/// I/O buffer of readers and writers.
const BUFFER_BYTES: usize = 1 << 20;
const ROW: u8 = 1;
const END: u8 = 0;

/// What a snapshot file says about itself before its rows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileHeader {
    /// openraft's snapshot meta (last log id, membership, id), encoded by
    /// the state machine store.
    pub meta: Vec<u8>,
    /// The cluster the state belongs to (0 before it had one).
    pub cluster_id: u64,
    /// When the file was written, in milliseconds since the Unix epoch
    /// (informational; never read by the state machine).
    pub created_unix_ms: u64,
}

/// What a complete, checked snapshot file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    /// Its header.
    pub header: FileHeader,
    /// Number of rows.
    pub rows: u64,
    /// Bytes of keys and values.
    pub row_bytes: u64,
    /// Size of the file.
    pub file_bytes: u64,
    /// SHA-256 of the file up to its checksum, in hex.
    pub sha256: String,
}

/// Maps an I/O error on the file at `path`.
pub(crate) fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::SnapshotIo {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, detail: impl Into<String>) -> Error {
    Error::BadSnapshot {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// Whether the file at `path` starts with [`MAGIC`] (a streamed snapshot)
/// rather than an older in-memory payload.
pub fn is_snapshot_file(path: &Path) -> Result<bool> {
    let mut magic = [0u8; 8];
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut read = 0;
    while read < magic.len() {
        match f.read(&mut magic[read..]).map_err(io_err(path))? {
            0 => return Ok(false),
            n => read += n,
        }
    }
    Ok(&magic == MAGIC)
}

/// Fsyncs the directory `dir`, so a rename or removal in it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// A `Write` that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Where a [`SnapshotWriter`] writes: a file, or the pipe of a live
/// snapshot.
enum Sink {
    File(File),
    Pipe(PipeSink),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::File(f) => f.write(buf),
            Sink::Pipe(p) => p.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::File(f) => f.flush(),
            Sink::Pipe(p) => p.flush(),
        }
    }
}

/// Writes one snapshot file: under a temporary name that
/// [`SnapshotWriter::finish`] makes durable under its final name, or, for a
/// live snapshot, into its pipe (`create_live`, `finish_live`).
pub struct SnapshotWriter {
    out: Hashing<BufWriter<Sink>>,
    part: PathBuf,
    path: PathBuf,
    header: FileHeader,
    rows: u64,
    row_bytes: u64,
    last_key: Option<Vec<u8>>,
}

impl SnapshotWriter {
    /// Starts the file that will be `path` (written as `path` + `.part`).
    pub fn create(path: &Path, header: FileHeader) -> Result<Self> {
        let part = part_path(path);
        let file = File::create(&part).map_err(io_err(&part))?;
        Self::start(Sink::File(file), part, path, header)
    }

    /// Starts a live snapshot known as `name`, written into `pipe` (see
    /// [`crate::live`]).
    pub(crate) fn create_live(name: &Path, header: FileHeader, pipe: Arc<LivePipe>) -> Result<Self> {
        Self::start(Sink::Pipe(PipeSink(pipe)), name.to_path_buf(), name, header)
    }

    fn start(sink: Sink, part: PathBuf, path: &Path, header: FileHeader) -> Result<Self> {
        let mut out = Hashing {
            inner: BufWriter::with_capacity(BUFFER_BYTES, sink),
            hash: Sha256::new(),
            bytes: 0,
        };
        let head = encode(&header)?;
        let head_len = u32::try_from(head.len()).map_err(|_| bad(path, "header too large"))?;
        {
            let err = io_err(&part);
            out.write_all(MAGIC).map_err(&err)?;
            out.write_all(&FILE_FORMAT.to_le_bytes()).map_err(&err)?;
            out.write_all(&head_len.to_le_bytes()).map_err(&err)?;
            out.write_all(&head).map_err(&err)?;
        }
        Ok(Self {
            out,
            part,
            path: path.to_path_buf(),
            header,
            rows: 0,
            row_bytes: 0,
            last_key: None,
        })
    }

    /// Appends one row; keys must come in increasing order.
    pub fn row(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if key.len() > MAX_KEY_BYTES || value.len() > MAX_VALUE_BYTES {
            return Err(bad(
                &self.path,
                format!("row of {} + {} bytes is over the limits", key.len(), value.len()),
            ));
        }
        if self.last_key.as_deref().is_some_and(|last| last >= key) {
            return Err(bad(&self.path, "rows out of key order"));
        }
        let err = io_err(&self.part);
        self.out.write_all(&[ROW]).map_err(&err)?;
        self.out.write_all(&(key.len() as u32).to_le_bytes()).map_err(&err)?;
        self.out.write_all(key).map_err(&err)?;
        self.out.write_all(&(value.len() as u32).to_le_bytes()).map_err(&err)?;
        self.out.write_all(value).map_err(&err)?;
        self.rows += 1;
        self.row_bytes += (key.len() + value.len()) as u64;
        match &mut self.last_key {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last_key = Some(key.to_vec()),
        }
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.out.bytes
    }

    /// Writes the end and checksum, fsyncs the file, renames it to its final
    /// name and fsyncs the directory.
    pub fn finish(self) -> Result<FileSummary> {
        let (part, path) = (self.part.clone(), self.path.clone());
        let (sink, summary) = self.write_end()?;
        let err = io_err(&part);
        let Sink::File(file) = sink else {
            return Err(Error::Io(format!("{} is a live snapshot, not a file", path.display())));
        };
        file.sync_all().map_err(&err)?;
        std::fs::rename(&part, &path).map_err(&err)?;
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(summary)
    }

    /// Writes the end and checksum of a live snapshot and tells its
    /// transfer it is complete.
    pub(crate) fn finish_live(self) -> Result<FileSummary> {
        let (sink, summary) = self.write_end()?;
        if let Sink::Pipe(PipeSink(pipe)) = sink {
            pipe.complete();
        }
        Ok(summary)
    }

    /// Writes the end record and checksum and flushes them to the sink.
    fn write_end(mut self) -> Result<(Sink, FileSummary)> {
        let err = io_err(&self.part);
        self.out.write_all(&[END]).map_err(&err)?;
        self.out.write_all(&self.rows.to_le_bytes()).map_err(&err)?;
        self.out.write_all(&self.row_bytes.to_le_bytes()).map_err(&err)?;
        let digest = self.out.hash.clone().finalize();
        self.out.write_all(&digest).map_err(&err)?;
        let file_bytes = self.out.bytes;
        let sink = self.out.inner.into_inner().map_err(|e| err(e.into_error()))?;
        Ok((
            sink,
            FileSummary {
                header: self.header,
                rows: self.rows,
                row_bytes: self.row_bytes,
                file_bytes,
                sha256: hex(&digest),
            },
        ))
    }
}

/// The temporary name a file is written under.
pub fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A `Read` that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> HashingReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hash.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }
}

/// Reads a snapshot file row by row; the file counts as valid only once
/// [`SnapshotReader::next_row`] returned `None` (end and checksum checked).
pub struct SnapshotReader<R = File> {
    input: HashingReader<BufReader<R>>,
    path: PathBuf,
    header: FileHeader,
    file_bytes: u64,
    rows: u64,
    row_bytes: u64,
    last_key: Option<Vec<u8>>,
    summary: Option<FileSummary>,
}

impl SnapshotReader {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        let file_bytes = file.metadata().map_err(io_err(path))?.len();
        SnapshotReader::from_reader(file, path, file_bytes)
    }
}

impl<R: Read> SnapshotReader<R> {
    /// Reads a snapshot file from `input` (`path` names it in errors;
    /// `file_bytes` is its size, for progress) and reads its header.
    pub fn from_reader(input: R, path: &Path, file_bytes: u64) -> Result<Self> {
        let mut input = HashingReader {
            inner: BufReader::with_capacity(BUFFER_BYTES, input),
            hash: Sha256::new(),
            bytes: 0,
        };
        let truncated = |_| bad(path, "truncated (it ends inside its header)");
        let mut magic = [0u8; 8];
        input.exact(&mut magic).map_err(truncated)?;
        if &magic != MAGIC {
            return Err(bad(path, "not a Cell0 snapshot file (wrong magic bytes)"));
        }
        let mut word = [0u8; 4];
        input.exact(&mut word).map_err(truncated)?;
        let format = u32::from_le_bytes(word);
        if format != FILE_FORMAT {
            return Err(bad(
                path,
                format!("snapshot format {format}; this build reads format {FILE_FORMAT}: upgrade cell0"),
            ));
        }
        input.exact(&mut word).map_err(truncated)?;
        let head_len = u32::from_le_bytes(word) as usize;
        if head_len > MAX_HEADER_BYTES {
            return Err(bad(path, format!("header of {head_len} bytes is over the limit")));
        }
        let mut head = vec![0u8; head_len];
        input.exact(&mut head).map_err(truncated)?;
        let header: FileHeader = decode("snapshot file header", &head).map_err(|e| bad(path, e.to_string()))?;
        Ok(Self {
            input,
            path: path.to_path_buf(),
            header,
            file_bytes,
            rows: 0,
            row_bytes: 0,
            last_key: None,
            summary: None,
        })
    }

    /// The file's header.
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// Bytes read so far and the file's size (progress).
    pub fn progress(&self) -> (u64, u64) {
        (self.input.bytes, self.file_bytes)
    }

    /// The next row, or `None` after the end and checksum were checked.
    pub fn next_row(&mut self) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        if self.summary.is_some() {
            return Ok(None);
        }
        let path = self.path.clone();
        let truncated = |_| bad(&path, "truncated (it ends before its checksum)");
        let mut tag = [0u8; 1];
        self.input.exact(&mut tag).map_err(truncated)?;
        match tag[0] {
            ROW => {
                let key = self.field(MAX_KEY_BYTES, "key")?;
                let value = self.field(MAX_VALUE_BYTES, "value")?;
                if self.last_key.as_deref().is_some_and(|last| last >= key.as_slice()) {
                    return Err(bad(&self.path, "rows out of key order"));
                }
                self.last_key = Some(key.clone());
                self.rows += 1;
                self.row_bytes += (key.len() + value.len()) as u64;
                Ok(Some((key, value)))
            }
            END => {
                let mut word = [0u8; 8];
                self.input.exact(&mut word).map_err(truncated)?;
                let rows = u64::from_le_bytes(word);
                self.input.exact(&mut word).map_err(truncated)?;
                let row_bytes = u64::from_le_bytes(word);
                let expected = self.input.hash.clone().finalize();
                let mut digest = [0u8; 32];
                self.input.inner.read_exact(&mut digest).map_err(truncated)?;
                if digest.as_slice() != expected.as_slice() {
                    return Err(bad(&self.path, "checksum mismatch (the file is damaged)"));
                }
                if rows != self.rows || row_bytes != self.row_bytes {
                    return Err(bad(
                        &self.path,
                        format!(
                            "it says {rows} rows of {row_bytes} bytes but holds {} of {}",
                            self.rows, self.row_bytes
                        ),
                    ));
                }
                let mut rest = [0u8; 1];
                if self.input.inner.read(&mut rest).map_err(io_err(&self.path))? != 0 {
                    return Err(bad(&self.path, "bytes after the checksum"));
                }
                self.summary = Some(FileSummary {
                    header: self.header.clone(),
                    rows,
                    row_bytes,
                    file_bytes: self.input.bytes + 32,
                    sha256: hex(&digest),
                });
                Ok(None)
            }
            other => Err(bad(
                &self.path,
                format!("unknown record tag {other} (the file is damaged)"),
            )),
        }
    }

    fn field(&mut self, max: usize, what: &str) -> Result<Vec<u8>> {
        let path = self.path.clone();
        let truncated = |_| bad(&path, "truncated (it ends inside a row)");
        let mut word = [0u8; 4];
        self.input.exact(&mut word).map_err(truncated)?;
        let len = u32::from_le_bytes(word) as usize;
        if len > max {
            return Err(bad(
                &self.path,
                format!("a {what} of {len} bytes is over the limit (the file is damaged)"),
            ));
        }
        let mut buf = vec![0u8; len];
        self.input.exact(&mut buf).map_err(truncated)?;
        Ok(buf)
    }

    /// The summary, once every row was read and the checksum checked.
    pub fn summary(&self) -> Option<&FileSummary> {
        self.summary.as_ref()
    }
}

/// Reads all of `path` and checks it, calling `progress(read, total)` now
/// and then; returns its summary.
pub fn verify(path: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<FileSummary> {
    let mut reader = SnapshotReader::open(path)?;
    let mut last = 0;
    while reader.next_row()?.is_some() {
        let (read, total) = reader.progress();
        if read - last >= 16 << 20 {
            progress(read, total);
            last = read;
        }
    }
    let (_, total) = reader.progress();
    progress(total, total);
    reader
        .summary()
        .cloned()
        .ok_or_else(|| bad(path, "ended without a summary"))
}

/// openraft's snapshot data: a snapshot file, read when sending and written
/// at chunk offsets when receiving. It knows its path so the store can
/// install or remove it.
///
/// A live snapshot (`SnapshotFile::live`) has no file: its bytes come
/// from its build through a [`LivePipe`] and are read once, in order, with
/// [`SnapshotFile::read_chunk`]; dropping it stops the build. openraft's
/// own reads, writes and seeks are refused on it.
///
/// Besides openraft's async read, write and seek (through tokio's file, which
/// copies every buffer and moves at most 2 MiB per blocking call), a
/// transfer reads and appends whole chunks with positioned I/O on a second
/// handle of the same file ([`SnapshotFile::read_chunk`],
/// [`SnapshotFile::append`]): one blocking call per chunk, no copy.
#[derive(Debug)]
pub struct SnapshotFile {
    backing: Backing,
    /// Where the file is (what a live snapshot is known as).
    path: PathBuf,
    /// Bytes written into it (receiving), and since when.
    written: u64,
    opened: std::time::Instant,
    /// While receiving: how far the file grew, for a preload reading it.
    growth: Option<Arc<Growth>>,
    /// The preload loading it into staging meanwhile, if one runs.
    preload: Option<crate::preload::Preload>,
}

#[derive(Debug)]
enum Backing {
    File {
        file: tokio::fs::File,
        /// The same open file, for positioned reads and writes.
        raw: Arc<File>,
    },
    Live(LiveBuild),
}

/// The build behind a live [`SnapshotFile`]; dropping it stops the build
/// if it still runs.
#[derive(Debug)]
pub(crate) struct LiveBuild(pub(crate) Arc<LivePipe>);

impl Drop for LiveBuild {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

fn not_a_file() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "a live snapshot is only read in order, with read_chunk",
    )
}

impl SnapshotFile {
    /// Opens an existing file for reading.
    pub async fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(io_err(path))?;
        Self::from_std(file, path.to_path_buf())
    }

    /// Creates (or empties) a file to receive into.
    pub async fn create(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        Self::from_std(file, path.to_path_buf())
    }

    /// Wraps a file opened by blocking code.
    pub fn from_std(file: File, path: PathBuf) -> Result<Self> {
        let raw = Arc::new(file.try_clone().map_err(io_err(&path))?);
        Ok(Self::with_backing(
            Backing::File {
                file: tokio::fs::File::from_std(file),
                raw,
            },
            path,
        ))
    }

    /// A live snapshot known as `name`, its bytes coming through `build`.
    pub(crate) fn live(build: LiveBuild, name: PathBuf) -> Self {
        Self::with_backing(Backing::Live(build), name)
    }

    fn with_backing(backing: Backing, path: PathBuf) -> Self {
        Self {
            backing,
            path,
            written: 0,
            opened: std::time::Instant::now(),
            growth: None,
            preload: None,
        }
    }

    /// Whether this is a live snapshot (no file: read once, in order).
    pub fn is_live(&self) -> bool {
        matches!(self.backing, Backing::Live(_))
    }

    fn tokio_file(&mut self) -> std::io::Result<&mut tokio::fs::File> {
        match &mut self.backing {
            Backing::File { file, .. } => Ok(file),
            Backing::Live(_) => Err(not_a_file()),
        }
    }

    /// The open file, for positioned reads and writes.
    pub(crate) fn raw(&self) -> std::io::Result<Arc<File>> {
        match &self.backing {
            Backing::File { raw, .. } => Ok(raw.clone()),
            Backing::Live(_) => Err(not_a_file()),
        }
    }

    /// Reads the next bytes after `offset`, up to `max`, in one blocking
    /// call; `None` at the end. A live snapshot is read in order (`offset`
    /// is what was read so far) and waited for while its build runs.
    pub async fn read_chunk(&self, offset: u64, max: usize) -> std::io::Result<Option<Vec<u8>>> {
        use std::os::unix::fs::FileExt;
        let raw = match &self.backing {
            Backing::Live(LiveBuild(pipe)) => {
                let pipe = pipe.clone();
                return blocking(move || pipe.pop(max)).await;
            }
            Backing::File { raw, .. } => raw.clone(),
        };
        blocking(move || {
            let left = raw.metadata()?.len().saturating_sub(offset);
            if left == 0 {
                return Ok(None);
            }
            let mut buf = vec![0; usize::try_from(left).unwrap_or(usize::MAX).min(max)];
            raw.read_exact_at(&mut buf, offset)?;
            Ok(Some(buf))
        })
        .await
    }

    /// The size of the file; an error for a live snapshot, whose size is
    /// known only at its end.
    pub async fn size(&self) -> std::io::Result<u64> {
        let raw = self.raw()?;
        blocking(move || Ok(raw.metadata()?.len())).await
    }

    /// Lets `preload` read this file as it is appended to.
    pub(crate) fn attach_preload(&mut self, growth: Arc<Growth>, preload: crate::preload::Preload) {
        self.growth = Some(growth);
        self.preload = Some(preload);
    }

    /// The preload attached to this file, if any.
    pub(crate) fn take_preload(&mut self) -> Option<crate::preload::Preload> {
        self.preload.take()
    }

    /// Says that nothing more will be appended: a preload reading behind
    /// the transfer finishes with what is there.
    pub fn finish_writing(&self) {
        if let Some(growth) = &self.growth {
            growth.complete();
        }
    }

    /// Writes `data` after everything written so far, in one blocking call.
    pub async fn append<B: AsRef<[u8]> + Send + 'static>(&mut self, data: B) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let raw = self.raw()?;
        let offset = self.written;
        let len = data.as_ref().len() as u64;
        blocking(move || raw.write_all_at(data.as_ref(), offset)).await?;
        self.written += len;
        crate::crash::point(crate::crash::SNAPSHOT_RECEIVE, self.written);
        if let Some(growth) = &self.growth {
            growth.grew(self.written);
        }
        Ok(())
    }

    /// Bytes written into the file through this handle, and when it was
    /// opened (transfer rates in logs).
    pub fn written(&self) -> (u64, std::time::Instant) {
        (self.written, self.opened)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Runs blocking file I/O off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(format!("file I/O task failed: {e}")))?
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        // A file dropped before it was complete: its preload gives up.
        if let Some(growth) = &self.growth {
            growth.abandon();
        }
    }
}

impl tokio::io::AsyncRead for SnapshotFile {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.tokio_file() {
            Ok(file) => Pin::new(file).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncWrite for SnapshotFile {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        // Chunks written at offsets: a preload cannot follow them.
        if let Some(growth) = self.growth.take() {
            growth.abandon();
        }
        let polled = match self.tokio_file() {
            Ok(file) => Pin::new(file).poll_write(cx, buf),
            Err(e) => return Poll::Ready(Err(e)),
        };
        if let Poll::Ready(Ok(n)) = &polled {
            self.written += *n as u64;
            crate::crash::point(crate::crash::SNAPSHOT_RECEIVE, self.written);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.tokio_file() {
            Ok(file) => Pin::new(file).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.tokio_file() {
            Ok(file) => Pin::new(file).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl tokio::io::AsyncSeek for SnapshotFile {
    fn start_seek(mut self: Pin<&mut Self>, position: std::io::SeekFrom) -> std::io::Result<()> {
        Pin::new(self.tokio_file()?).start_seek(position)
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<u64>> {
        match self.tokio_file() {
            Ok(file) => Pin::new(file).poll_complete(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> FileHeader {
        FileHeader {
            meta: vec![1, 2, 3],
            cluster_id: 7,
            created_unix_ms: 1,
        }
    }

    fn write(path: &Path, rows: &[(&[u8], &[u8])]) -> FileSummary {
        let mut w = SnapshotWriter::create(path, header()).unwrap();
        for (k, v) in rows {
            w.row(k, v).unwrap();
        }
        w.finish().unwrap()
    }

    fn read_all(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut r = SnapshotReader::open(path)?;
        let mut rows = Vec::new();
        while let Some(row) = r.next_row()? {
            rows.push(row);
        }
        Ok(rows)
    }

    #[test]
    fn a_file_reads_back_its_rows_and_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.snap");
        let summary = write(&path, &[(b"a", b"1"), (b"b", b"22")]);
        assert_eq!((summary.rows, summary.row_bytes), (2, 5));
        assert!(!part_path(&path).exists());
        assert_eq!(
            read_all(&path).unwrap(),
            vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), b"22".to_vec())]
        );
        assert_eq!(verify(&path, &mut |_, _| {}).unwrap(), summary);
        assert!(is_snapshot_file(&path).unwrap());

        let bytes = std::fs::read(&path).unwrap();
        // Every truncation and every flipped byte is refused, never read as data.
        for cut in 0..bytes.len() {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            let err = verify(&path, &mut |_, _| {}).unwrap_err();
            assert!(matches!(err, Error::BadSnapshot { .. }), "cut at {cut}: {err}");
        }
        for i in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x40;
            std::fs::write(&path, &damaged).unwrap();
            let err = verify(&path, &mut |_, _| {}).unwrap_err();
            assert!(matches!(err, Error::BadSnapshot { .. }), "byte {i}: {err}");
        }
        std::fs::write(&path, b"something else entirely").unwrap();
        let err = verify(&path, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("not a Cell0 snapshot file"), "{err}");
    }

    #[test]
    fn rows_out_of_order_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SnapshotWriter::create(&dir.path().join("a.snap"), header()).unwrap();
        w.row(b"b", b"").unwrap();
        assert!(w.row(b"a", b"").is_err());
    }
}

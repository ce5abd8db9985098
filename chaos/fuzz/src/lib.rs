//! cell0-fuzz: the fuzz targets of Cell0's decoders and of its public
//! request handling.
//!
//! Each target takes arbitrary bytes and must neither panic nor hang,
//! whatever they are. `scripts/fuzz.sh` runs them under AFL++ through the
//! small `afl/` package next to this crate (cargo-afl, stable Rust); the
//! tests of this crate replay every input in `corpus/<target>/` (seeds and
//! every crash ever found, kept as regressions) through the same functions,
//! so CI checks them without AFL.
//!
//! - [`log_entry`]: a stored Raft log entry (openraft's entry with Cell0's
//!   command), and the command alone, applied twice to fresh states: the
//!   same answer and rows both times, and its encoding decodes back.
//! - [`snapshot`]: a snapshot file (`cell0 snapshot save`, and what a
//!   follower installs): header, openraft meta and every row.
//! - [`config`]: a node's configuration file, parsed and validated.
//! - [`RequestTarget`]: one public gRPC call to a real node in this
//!   process (ACLs on), the method chosen by the first byte.

// A fuzz target reports a broken invariant by panicking.
#![allow(clippy::expect_used)]

use std::io::Cursor;
use std::path::Path;

use cell0_consensus::{NodeId, NodeInfo, TypeConfig};
use cell0_state::codec;
use cell0_state::{Command, Limits, MemTxn};

pub mod request;

pub use request::RequestTarget;

/// The targets, by name (the corpus directories and AFL binaries).
pub const TARGETS: [&str; 4] = ["log_entry", "snapshot", "config", "request"];

/// A stored log entry, then the command alone.
pub fn log_entry(data: &[u8]) {
    if let Ok(entry) = codec::decode::<openraft::Entry<TypeConfig>>("log entry", data) {
        let again = codec::encode("log entry", &entry).expect("a decoded entry encodes");
        let back: openraft::Entry<TypeConfig> = codec::decode("log entry", &again).expect("its encoding decodes");
        assert_eq!(back, entry, "an entry changed through encode and decode");
    }
    let Ok(cmd) = codec::decode::<Command>("command", data) else {
        return;
    };
    let _ = cmd.validate(&Limits::default());
    let (mut first, mut second) = (MemTxn::new(), MemTxn::new());
    let a = cell0_state::apply(&mut first, &cmd).map_err(|e| e.to_string());
    let b = cell0_state::apply(&mut second, &cmd).map_err(|e| e.to_string());
    assert_eq!(a, b, "apply answered differently on equal states");
    assert!(first == second, "apply wrote different rows on equal states");
    // Applied again (a replayed entry): still no panic.
    let _ = cell0_state::apply(&mut first, &cmd);
    let again = codec::encode("command", &cmd).expect("a decoded command encodes");
    assert_eq!(codec::decode::<Command>("command", &again).ok(), Some(cmd));
}

/// A snapshot file, read as a node restoring or installing it would.
pub fn snapshot(data: &[u8]) {
    let Ok(mut reader) = cell0_storage::snapshot::SnapshotReader::from_reader(
        Cursor::new(data),
        Path::new("fuzz.snap"),
        data.len() as u64,
    ) else {
        return;
    };
    let _ = codec::decode::<openraft::SnapshotMeta<NodeId, NodeInfo>>("snapshot meta", &reader.header().meta);
    let mut rows = 0u64;
    while let Ok(Some(_row)) = reader.next_row() {
        rows += 1;
        let (read, total) = reader.progress();
        assert!(read <= total, "read {read} of {total} bytes after {rows} rows");
    }
}

/// A configuration file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = cell0::config::NodeConfig::from_toml(text, "fuzz.toml") {
        let _ = config.validate();
    }
}

/// Valid inputs to start `target` from: AFL mutates these, and the tests
/// run them.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "log_entry" => log_entry_seeds(),
        "snapshot" => snapshot_seeds(),
        "config" => config_seeds(),
        "request" => request::seeds(),
        _ => Vec::new(),
    }
}

fn log_entry_seeds() -> Vec<Vec<u8>> {
    use cell0_state::acl::{AccessorId, AclCommand, SecretHash, Token};
    use cell0_state::command::RequestId;
    let put = Command::Put {
        key: b"app/x".to_vec(),
        value: b"v".to_vec(),
    };
    let commands = [
        put.clone(),
        Command::Delete { key: b"app/x".to_vec() },
        Command::Cas {
            key: b"k".to_vec(),
            expected_revision: 0,
            value: b"v".to_vec(),
        },
        Command::Batch(vec![put.clone(), Command::Batch(vec![put.clone()])]),
        Command::Request {
            id: RequestId { client: 7, seq: 1 },
            cmd: Box::new(put.clone()),
        },
        Command::RequestV2 {
            id: RequestId { client: 7, seq: 2 },
            cmd: Box::new(Command::Batch(vec![put.clone()])),
        },
        Command::InitCluster { cluster_id: 9 },
        Command::RequestV2 {
            id: RequestId { client: 7, seq: 3 },
            cmd: Box::new(Command::PutWithoutPrev {
                key: b"app/y".to_vec(),
                value: b"w".to_vec(),
            }),
        },
        Command::RequestV3 {
            id: RequestId { client: 7, seq: 4 },
            cmd: Box::new(Command::PutWithoutPrev {
                key: b"app/z".to_vec(),
                value: b"w".to_vec(),
            }),
        },
        Command::Acl(AclCommand::Bootstrap {
            token: Token {
                accessor: AccessorId([1; 16]),
                description: "seed".into(),
                policies: Vec::new(),
                management: true,
                secret: SecretHash::new([2; 16], &[3; 32]),
                created_ms: 1,
            },
        }),
    ];
    let mut out: Vec<Vec<u8>> = commands
        .iter()
        .map(|c| codec::encode("command", c).expect("a seed encodes"))
        .collect();
    let entry = openraft::Entry::<TypeConfig> {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(3, 1), 42),
        payload: openraft::EntryPayload::Normal(put.into()),
    };
    out.push(codec::encode("log entry", &entry).expect("a seed encodes"));
    out
}

fn snapshot_seeds() -> Vec<Vec<u8>> {
    use cell0_storage::snapshot::{FileHeader, SnapshotWriter};
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("seed.snap");
    let meta = openraft::SnapshotMeta::<NodeId, NodeInfo>::default();
    let header = FileHeader {
        meta: codec::encode("snapshot meta", &meta).expect("meta encodes"),
        cluster_id: 9,
        created_unix_ms: 1,
    };
    let mut writer = SnapshotWriter::create(&path, header).expect("a snapshot file");
    for (k, v) in [(&b"a"[..], &b"1"[..]), (b"b", b"22"), (b"c", b"")] {
        writer.row(k, v).expect("a row");
    }
    writer.finish().expect("the file is written");
    vec![std::fs::read(&path).expect("the seed file")]
}

fn config_seeds() -> Vec<Vec<u8>> {
    let text = r#"
data_dir = "/var/lib/cell0"
name = "a"
site = "eu-1"
join = ["10.0.0.2:7102"]
bootstrap_expect = 3

[listen]
public = "127.0.0.1:7100"

[raft]
voters = 3

[tls]
insecure = true

[limits]
client_rate = 100
token_rate = 10

[acl]
enabled = true

[audit]
enabled = true
max_files = 3

[gossip]
enabled = true
allow_no_secret = true
"#;
    vec![
        text.as_bytes().to_vec(),
        b"[limits]\nclient_rate = -1\n".to_vec(),
        Vec::new(),
    ]
}

/// Every input of `target` in `corpus/<target>/` under `root` (this
/// crate's directory).
pub fn corpus(root: &Path, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = root.join("corpus").join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            Some((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).ok()?,
            ))
        })
        .collect();
    out.sort();
    out
}

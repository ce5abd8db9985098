//! The data dir and wire formats stay readable.
//!
//! `data/format0.dump` is every record (log, meta, state) of a real
//! single-node data dir written by the build before state rows carried a
//! layout byte (data dir format none, snapshot format 1): commands of every
//! kind, a snapshot, then more commands. Opening it with this build must
//! upgrade it in place and keep every value, the request window, the watch
//! history and the log. `data/entries.golden` holds the bytes of log
//! entries and responses as this build writes them: a change to a frozen
//! layout fails here (regenerate with `CELL0_BLESS=1` only when adding new
//! variants, never for existing ones).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use cell0_consensus::state::{EventKind, StateEvent};
use cell0_consensus::{
    Command, Consensus, ConsensusConfig, ConsensusError, Consistency, KeyValue, ModelCommand, ModelFile, ModelManifest,
    ModelOutcome, NodeCommand, NodeInfo, NodeResources, RequestId, Response, StorageBackend, TypeConfig, nodes,
    registry,
};
use cell0_state::{MemTxn, Txn as _};
use cell0_storage::{Cf, Durability, Engine as _, ReadView as _, RocksEngine, WriteBatch};
use openraft::{Entry, EntryPayload, LogId, Membership};

const DEADLINE: Duration = Duration::from_secs(30);

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The records of the dump: column family, key, value.
fn dump() -> Vec<(Cf, Vec<u8>, Vec<u8>)> {
    include_str!("data/format0.dump")
        .lines()
        .map(|line| {
            let mut parts = line.split(' ');
            let cf = match parts.next().unwrap() {
                "log" => Cf::Log,
                "meta" => Cf::Meta,
                "state" => Cf::State,
                other => panic!("unknown column family {other}"),
            };
            (cf, unhex(parts.next().unwrap()), unhex(parts.next().unwrap_or("")))
        })
        .collect()
}

fn info() -> NodeInfo {
    NodeInfo {
        name: "n1".into(),
        site: "local".into(),
        public_addr: "127.0.0.1:7001".into(),
        internal_addr: "127.0.0.1:7101".into(),
    }
}

fn config() -> ConsensusConfig {
    ConsensusConfig {
        heartbeat_ms: 100,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        ..Default::default()
    }
}

async fn start(dir: &Path) -> Consensus {
    let c = Consensus::start(1, info(), config(), StorageBackend::Rocks(dir.to_path_buf()))
        .await
        .unwrap();
    c.wait_for_leader(DEADLINE).await.unwrap();
    c
}

async fn value(c: &Consensus, key: &str) -> Option<Vec<u8>> {
    c.get(key.as_bytes(), Consistency::Linearizable)
        .await
        .unwrap()
        .0
        .map(|kv| kv.value)
}

async fn assert_state_kept(c: &Consensus) {
    assert_eq!(value(c, "alpha").await.as_deref(), Some(&b"1b"[..]));
    assert_eq!(value(c, "beta").await, None);
    assert_eq!(value(c, "gamma").await.as_deref(), Some(&b"3"[..]));
    assert_eq!(value(c, "delta").await, None, "deleted by the second request");
    assert_eq!(value(c, "epsilon").await.as_deref(), Some(&b"5"[..]));
    assert_eq!(value(c, "req").await.as_deref(), Some(&b"once"[..]));
    let models = c.read(Consistency::Linearizable, registry::list).await.unwrap();
    assert_eq!(models.len(), 1, "{models:?}");
    assert_eq!(models[0].manifest.name, "mini");
    assert_eq!(models[0].holders.iter().copied().collect::<Vec<_>>(), vec![1, 2]);
    let records = c.read(Consistency::Linearizable, nodes::resources).await.unwrap();
    assert_eq!(records.get(&1).map(|r| r.cpu_cores), Some(2));
    assert_ne!(c.cluster_id(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_from_before_versioned_rows_opens_and_keeps_everything() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("n1");
    {
        let engine = RocksEngine::open(&dir, 1).unwrap();
        let mut batch = WriteBatch::new();
        for (cf, k, v) in dump() {
            batch.put(cf, k, v);
        }
        engine.write(batch, Durability::Sync).unwrap();
    }

    let c = start(&dir).await;
    assert_state_kept(&c).await;
    // The snapshot stored whole in the meta records moved into a file.
    let files: Vec<String> = std::fs::read_dir(dir.join(cell0_storage::SNAPSHOT_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with(".snap"), "{files:?}");
    assert!(
        cell0_storage::snapshot::verify(&dir.join(cell0_storage::SNAPSHOT_DIR).join(&files[0]), &mut |_, _| {}).is_ok()
    );

    // The watch history survived and continues.
    let before = c.history(b"", 1, 100).unwrap();
    assert!(before.iter().any(|e| e.kv.key == b"alpha" && e.kind == EventKind::Put));
    c.propose(Command::Put {
        key: b"zeta".to_vec(),
        value: b"6".to_vec(),
    })
    .await
    .unwrap();
    let after: Vec<StateEvent> = c.history(b"zeta", 1, 100).unwrap();
    assert_eq!(after.len(), 1);
    assert!(after[0].revision() > before.last().unwrap().revision());

    // A snapshot of the upgraded state builds, and the upgraded dir opens again.
    c.raft().trigger().snapshot().await.unwrap();
    let want = c.raft().metrics().borrow().last_applied;
    c.raft()
        .wait(Some(DEADLINE))
        .metrics(
            |m| m.snapshot.is_some() && m.snapshot >= want,
            "snapshot of the upgraded state",
        )
        .await
        .unwrap();
    c.shutdown().await;
    drop(c);
    let c = start(&dir).await;
    assert_state_kept(&c).await;
    assert_eq!(value(&c, "zeta").await.as_deref(), Some(&b"6"[..]));
    c.shutdown().await;
    drop(c);

    // The request window survived: a retry of the old write of `req`,
    // applied to the upgraded rows, is answered from it, not applied again.
    let engine = RocksEngine::open(&dir, 1).unwrap();
    let mut state = MemTxn::new();
    for (k, v) in engine.scan(Cf::State, b"", None, 100_000).unwrap() {
        let nul = k.iter().position(|b| *b == 0).unwrap();
        let table = std::str::from_utf8(&k[..nul]).unwrap();
        state.put(table, &k[nul + 1..], v).unwrap();
    }
    let id = old_request_id(b"req");
    let again = || {
        Box::new(Command::Put {
            key: b"req".to_vec(),
            value: b"again".to_vec(),
        })
    };
    assert_answered_from_window(&mut state, &Command::Request { id, cmd: again() });

    // The first `RequestV2` switches the request window and the history to
    // their second layouts: the old answers and events stay readable.
    let events_before = cell0_state::kv::history(&state, b"", 1, 1000, usize::MAX).unwrap();
    assert_answered_from_window(&mut state, &Command::RequestV2 { id, cmd: again() });
    let fresh = Command::RequestV2 {
        id: RequestId {
            client: id.client,
            seq: id.seq + 1000,
        },
        cmd: Box::new(Command::Put {
            key: b"req".to_vec(),
            value: b"new".to_vec(),
        }),
    };
    assert_eq!(cell0_state::apply(&mut state, &fresh).unwrap().events.len(), 1);
    let events_after = cell0_state::kv::history(&state, b"", 1, 1000, usize::MAX).unwrap();
    assert_eq!(events_after.len(), events_before.len() + 1);
    assert_eq!(events_after[..events_before.len()], events_before[..]);
    // The upgraded node proposed its writes as `RequestV3`, whose first one
    // switched the history to groups.
    assert!(state.get("meta", b"history_groups").unwrap().is_some());
    assert!(state.get("meta", b"history_chunks").unwrap().is_none());
    assert!(state.get("meta", b"history_window").unwrap().is_none());

    // Grouped steps read back after the events before them, with the
    // values their pairs held before a later write replaced them.
    let v3 = |seq, value: &str| Command::RequestV3 {
        id: RequestId {
            client: id.client,
            seq: id.seq + seq,
        },
        cmd: Box::new(Command::PutWithoutPrev {
            key: b"req".to_vec(),
            value: value.as_bytes().to_vec(),
        }),
    };
    let step = Command::Batch(vec![v3(1001, "g1"), v3(1002, "g2")]);
    assert_eq!(cell0_state::apply(&mut state, &step).unwrap().events.len(), 2);
    assert_eq!(cell0_state::apply(&mut state, &v3(1003, "g3")).unwrap().events.len(), 1);
    let grouped = cell0_state::kv::history(&state, b"", 1, 1000, usize::MAX).unwrap();
    assert_eq!(grouped[..events_after.len()], events_after[..]);
    let values: Vec<&[u8]> = grouped[events_after.len()..]
        .iter()
        .map(|ev| ev.kv.value.as_slice())
        .collect();
    assert_eq!(values, [&b"g1"[..], b"g2", b"g3"]);
}

/// The request id the old node gave its write of `key`.
fn old_request_id(key: &[u8]) -> RequestId {
    old_commands()
        .into_iter()
        .find_map(|c| match c {
            Command::Request { id, cmd } => match *cmd {
                Command::Put { key: k, .. } if k == key => Some(id),
                _ => None,
            },
            _ => None,
        })
        .unwrap()
}

/// The commands in the old data dir's log.
fn old_commands() -> Vec<Command> {
    dump()
        .into_iter()
        .filter(|(cf, _, _)| *cf == Cf::Log)
        .filter_map(|(_, _, v)| {
            let entry: Entry<TypeConfig> = cell0_state::codec::decode("log entry", &v).unwrap();
            match entry.payload {
                EntryPayload::Normal(c) => Some(Command::clone(&c)),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn the_log_of_the_old_data_dir_decodes() {
    // Every client write is wrapped in a request id.
    let commands: Vec<Command> = old_commands()
        .into_iter()
        .map(|c| match c {
            Command::Request { cmd, .. } => *cmd,
            other => other,
        })
        .collect();
    let has = |f: &dyn Fn(&Command) -> bool| commands.iter().any(f);
    assert!(has(&|c| matches!(c, Command::InitCluster { .. })));
    assert!(has(&|c| matches!(c, Command::Cas { .. })));
    assert!(has(&|c| matches!(c, Command::Batch(_))));
    assert!(has(&|c| matches!(c, Command::Model(ModelCommand::Remove { .. }))));
    assert!(has(&|c| matches!(c, Command::Node(_))));
    assert_eq!(commands.len(), 14, "{commands:?}");
}

/// Named values whose bytes are pinned.
type Named<T> = Vec<(&'static str, T)>;

/// One value of every log payload and response variant, nested types
/// included.
fn golden_values() -> (Named<Entry<TypeConfig>>, Named<Response>) {
    let put = Command::Put {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
    };
    let manifest = ModelManifest {
        name: "mini".into(),
        version: 1,
        architecture: "all-minilm-l6-v2".into(),
        files: vec![ModelFile {
            path: "model.bin".into(),
            sha256: "ab".repeat(32),
            size: 42,
        }],
    };
    let resources = NodeResources {
        cpu_cores: 2,
        memory_bytes: 1 << 30,
        inference_backend: "wgpu".into(),
        adapter: "gpu0".into(),
        device_type: "discrete-gpu".into(),
        gpu: true,
        gpu_memory_bytes: 8 << 30,
    };
    let commands = vec![
        ("put", put.clone()),
        ("delete", Command::Delete { key: b"k".to_vec() }),
        (
            "cas",
            Command::Cas {
                key: b"k".to_vec(),
                expected_revision: 3,
                value: b"w".to_vec(),
            },
        ),
        (
            "batch",
            Command::Batch(vec![put.clone(), Command::Delete { key: b"j".to_vec() }]),
        ),
        (
            "model-add",
            ModelCommand::Add {
                manifest: manifest.clone(),
                holder: 1,
            }
            .into_command(),
        ),
        (
            "model-remove",
            ModelCommand::Remove {
                name: "mini".into(),
                version: 1,
            }
            .into_command(),
        ),
        (
            "model-held",
            ModelCommand::Held {
                name: "mini".into(),
                version: 1,
                node: 2,
            }
            .into_command(),
        ),
        ("node", NodeCommand::SetResources { node: 1, resources }.into_command()),
        (
            "request",
            Command::Request {
                id: RequestId { client: 9, seq: 4 },
                cmd: Box::new(put),
            },
        ),
        ("init-cluster", Command::InitCluster { cluster_id: 0xc1 }),
        (
            "request-v2",
            Command::RequestV2 {
                id: RequestId { client: 9, seq: 5 },
                cmd: Box::new(Command::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                }),
            },
        ),
        (
            "handoff-begin",
            cell0_consensus::handoff::HandoffCommand::Begin {
                agent: "a".into(),
                to_site: "west".into(),
                at_ms: 5,
            }
            .into_command(),
        ),
        (
            "handoff-map-tasks",
            cell0_consensus::handoff::HandoffCommand::MapTasks {
                agent: "a".into(),
                id: 1,
                moved: vec![cell0_consensus::handoff::TaskMove { from: 3, to: 9 }],
            }
            .into_command(),
        ),
        (
            "put-without-prev",
            Command::PutWithoutPrev {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
        ),
    ];
    let log_id = LogId::new(openraft::CommittedLeaderId::new(2, 1), 7);
    let mut entries: Named<Entry<TypeConfig>> = commands
        .into_iter()
        .map(|(name, c)| {
            (
                name,
                Entry {
                    log_id,
                    payload: EntryPayload::Normal(c.into()),
                },
            )
        })
        .collect();
    entries.push((
        "blank",
        Entry {
            log_id,
            payload: EntryPayload::Blank,
        },
    ));
    entries.push((
        "membership",
        Entry {
            log_id,
            payload: EntryPayload::Membership(Membership::new(
                vec![[1u64].into_iter().collect()],
                [(1u64, info())]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )),
        },
    ));
    let kv = KeyValue {
        key: b"k".to_vec(),
        value: b"v".to_vec(),
        create_revision: 1,
        mod_revision: 2,
        version: 2,
    };
    let responses = vec![
        ("empty", Response::Empty),
        (
            "put",
            Response::Put {
                kv: kv.clone(),
                prev: Some(kv.clone()),
            },
        ),
        (
            "delete",
            Response::Delete {
                revision: 3,
                prev: None,
            },
        ),
        (
            "cas",
            Response::Cas {
                revision: 3,
                succeeded: true,
                kv: Some(kv),
            },
        ),
        ("batch", Response::Batch(vec![Response::Empty])),
        ("model", Response::Model(ModelOutcome::Held)),
        ("node", Response::Node { stored: true }),
        ("rejected", Response::Rejected("too big".into())),
        ("cluster-id", Response::ClusterId(0xc1)),
        (
            "handoff",
            Response::Handoff(cell0_consensus::handoff::HandoffOutcome::Begun { id: 1 }),
        ),
    ];
    (entries, responses)
}

#[test]
fn log_entries_and_responses_keep_their_golden_bytes() {
    let (entries, responses) = golden_values();
    let mut lines = Vec::new();
    for (name, e) in &entries {
        lines.push(format!(
            "entry {name} {}",
            hex(&cell0_state::codec::encode("entry", e).unwrap())
        ));
    }
    for (name, r) in &responses {
        lines.push(format!(
            "response {name} {}",
            hex(&cell0_state::codec::encode("response", r).unwrap())
        ));
    }
    let errors = [
        ("not-leader", ConsensusError::not_leader(Some(1), Some(info()))),
        ("invalid", ConsensusError::invalid("key", "must not be empty")),
    ];
    for (name, e) in &errors {
        lines.push(format!(
            "error {name} {}",
            hex(&cell0_state::codec::encode("error", e).unwrap())
        ));
    }
    let text = lines.join("\n") + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/entries.golden");
    if std::env::var_os("CELL0_BLESS").is_some() {
        std::fs::write(&path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text, golden,
        "a frozen layout changed: add a variant instead (see cell0_state::codec)"
    );

    // And the checked-in bytes decode to the same values.
    let by_name = |kind: &str, name: &str| {
        golden
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{kind} {name} ")).map(unhex))
            .unwrap()
    };
    for (name, e) in entries {
        let decoded: Entry<TypeConfig> = cell0_state::codec::decode("entry", &by_name("entry", name)).unwrap();
        assert_eq!(format!("{decoded:?}"), format!("{e:?}"), "{name}");
    }
    for (name, r) in responses {
        let decoded: Response = cell0_state::codec::decode("response", &by_name("response", name)).unwrap();
        assert_eq!(decoded, r, "{name}");
    }
}

/// Applies `retry`, a retry of the old data dir's write of `req` = `once`,
/// and checks that the request window answers it: the old answer (the
/// revisions of that write; a put's answer leaves the pair out), nothing
/// applied again.
fn assert_answered_from_window(state: &mut MemTxn, retry: &Command) {
    let written = cell0_state::kv::get(state, b"req").unwrap().unwrap();
    assert_eq!(written.value, b"once");
    let applied = cell0_state::apply(state, retry).unwrap();
    match applied.response {
        Response::Put { kv, .. } => assert_eq!(
            (kv.value.as_slice(), kv.mod_revision, kv.version),
            (&b""[..], written.mod_revision, written.version)
        ),
        other => panic!("unexpected {other:?}"),
    }
    assert!(applied.events.is_empty(), "the retry was applied again");
    assert_eq!(cell0_state::kv::get(state, b"req").unwrap().unwrap(), written);
}

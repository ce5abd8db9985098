//! Golden tests of the replicated state machine (toydb's goldenscript idea).
//!
//! `tests/golden/*.script` holds commands, one per line. Running a script
//! applies them to an empty state and writes, into the `.golden` file next
//! to it: each command's log-entry bytes, its response and events, then every
//! stored row as bytes, then what the read functions return from those rows.
//!
//! The test fails when anything differs from the checked-in file, so a
//! change of the log format, of a row encoding, of a table key layout or of
//! apply's behaviour cannot land unnoticed. It also decodes the checked-in
//! bytes (entries and rows) with today's code, so an existing data dir and
//! log keep reading. After an intended change, regenerate with
//! `CELL0_BLESS=1 cargo nextest run --workspace -E 'test(golden)'` and
//! review the diff; a change to existing bytes means a new versioned
//! variant or row format is needed instead.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use cell0_state::acl::{self, AccessorId, AclCommand, Policy, Resource, Rule, SecretHash, Token};
use cell0_state::agents::{
    AgentCommand, AgentKind, AgentSpec, AllocStatus, Constraints, DrainSpec, NodeState, Placement, Plan, Resources,
    RestartPolicy, Unplaced,
};
use cell0_state::command::RequestId;
use cell0_state::handoff::{self, HandoffCommand, TaskMove};
use cell0_state::nodes::{Liveness, NodeCommand, NodeLiveness, NodeResources};
use cell0_state::registry::{ModelCommand, ModelFile, ModelManifest};
use cell0_state::tasks::{self, MemoryChange, TaskCommand, TaskResult};
use cell0_state::{Command, MemTxn, Txn, agents, kv, nodes, registry};

fn parse_command(words: &[&str]) -> Command {
    let text = |i: usize| words[i].as_bytes().to_vec();
    let num = |i: usize| {
        words[i]
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{words:?}: word {i} is not a number"))
    };
    match words[0] {
        "put" => Command::Put {
            key: text(1),
            value: text(2),
        },
        "put-without-prev" => Command::PutWithoutPrev {
            key: text(1),
            value: text(2),
        },
        "delete" => Command::Delete { key: text(1) },
        "cas" => Command::Cas {
            key: text(1),
            expected_revision: num(2),
            value: text(3),
        },
        "batch" => Command::Batch(words[1..].split(|w| *w == ";").map(parse_command).collect()),
        "request" => Command::Request {
            id: RequestId {
                client: num(1),
                seq: num(2),
            },
            cmd: Box::new(parse_command(&words[3..])),
        },
        "request2" => Command::RequestV2 {
            id: RequestId {
                client: num(1),
                seq: num(2),
            },
            cmd: Box::new(parse_command(&words[3..])),
        },
        "request3" => Command::RequestV3 {
            id: RequestId {
                client: num(1),
                seq: num(2),
            },
            cmd: Box::new(parse_command(&words[3..])),
        },
        "init-cluster" => Command::InitCluster { cluster_id: num(1) },
        "model-add" => Command::Model(ModelCommand::Add {
            manifest: ModelManifest {
                name: words[1].into(),
                version: num(2) as u32,
                architecture: "all-minilm-l6-v2".into(),
                files: vec![
                    ModelFile {
                        path: "config.json".into(),
                        sha256: "a".repeat(64),
                        size: 10,
                    },
                    ModelFile {
                        path: "model.safetensors".into(),
                        sha256: "b".repeat(64),
                        size: 20,
                    },
                ],
            },
            holder: num(3),
        }),
        "model-held" => Command::Model(ModelCommand::Held {
            name: words[1].into(),
            version: num(2) as u32,
            node: num(3),
        }),
        "model-remove" => Command::Model(ModelCommand::Remove {
            name: words[1].into(),
            version: num(2) as u32,
        }),
        "node-set" => Command::Node(NodeCommand::SetResources {
            node: num(1),
            resources: NodeResources {
                cpu_cores: num(2) as u32,
                memory_bytes: 1 << 30,
                inference_backend: "cpu".into(),
                adapter: "llvmpipe".into(),
                device_type: "cpu".into(),
                gpu: words[3] == "gpu",
                gpu_memory_bytes: 0,
            },
        }),
        "node-labels" => Command::Node(NodeCommand::SetLabels {
            node: num(1),
            labels: words[2..]
                .iter()
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect(),
        }),
        "node-liveness" => Command::Node(NodeCommand::SetLiveness {
            node: num(1),
            liveness: NodeLiveness {
                liveness: match words[2] {
                    "alive" => Liveness::Alive,
                    "dead" => Liveness::Dead,
                    other => panic!("unknown liveness {other:?}"),
                },
                reason: words[3..].join(" "),
                since_ms: 7,
            },
        }),
        "agent-run" => Command::Agent(AgentCommand::Run {
            spec: AgentSpec {
                name: words[1].into(),
                kind: AgentKind::Exec {
                    command: vec!["/bin/cat".into()],
                    timeout_ms: 1000,
                    max_output_bytes: 1024,
                },
                resources: Resources {
                    cpu_millis: num(2),
                    memory_mb: num(3),
                    gpu_memory_mb: 0,
                },
                constraints: Constraints::default(),
                restart: RestartPolicy::Always,
            },
            at_ms: 100,
        }),
        // agent-run-in NAME SITE...
        "agent-run-in" => {
            let Command::Agent(AgentCommand::Run { spec, at_ms }) =
                parse_command(&["agent-run", words[1], "500", "64"])
            else {
                unreachable!()
            };
            Command::Agent(AgentCommand::RunIn {
                spec,
                sites: words[2..].iter().map(|w| w.to_string()).collect(),
                at_ms,
            })
        }
        "agent-stop" => Command::Agent(AgentCommand::Stop {
            agent: words[1].into(),
            at_ms: 200,
        }),
        // agent-plan AGENT:GENERATION:NODE... [stop AGENT...]
        "agent-plan" => {
            let mut plan = Plan::default();
            let mut stops = false;
            for w in &words[1..] {
                if *w == "stop" {
                    stops = true;
                } else if stops {
                    plan.stops.push((*w).into());
                } else {
                    let parts: Vec<&str> = w.split(':').collect();
                    plan.placements.push(Placement {
                        agent: parts[0].into(),
                        generation: parts[1].parse().unwrap(),
                        node: parts[2].parse().unwrap(),
                    });
                }
            }
            Command::Agent(AgentCommand::Plan { plan, at_ms: 300 })
        }
        "agent-plan-unplaced" => Command::Agent(AgentCommand::Plan {
            plan: Plan {
                unplaced: vec![Unplaced {
                    agent: words[1].into(),
                    generation: num(2),
                    reason: words[3..].join(" "),
                }],
                ..Plan::default()
            },
            at_ms: 300,
        }),
        "agent-migrate" => Command::Agent(AgentCommand::Migrate {
            agent: words[1].into(),
            to: num(2),
        }),
        "agent-report" => Command::Agent(AgentCommand::Report {
            agent: words[1].into(),
            incarnation: num(2),
            status: match words[3] {
                "running" => AllocStatus::Running,
                "failed" => AllocStatus::Failed,
                other => panic!("unknown status {other:?}"),
            },
            reason: words[4..].join(" "),
            at_ms: 400,
        }),
        "node-state" => Command::Agent(AgentCommand::SetNodeState {
            node: num(1),
            state: match words[2] {
                "ready" => NodeState::Ready,
                "draining" => NodeState::Draining,
                "down" => NodeState::Down,
                other => panic!("unknown node state {other:?}"),
            },
            reason: words[3..].join(" "),
            at_ms: 500,
        }),
        "node-drain" => Command::Agent(AgentCommand::Drain {
            node: num(1),
            drain: DrainSpec {
                max_parallel: num(2) as u32,
                deadline_ms: num(3),
            },
            reason: words[4..].join(" "),
            at_ms: 550,
        }),
        "agent-unblock" => Command::Agent(AgentCommand::Unblock { at_ms: 650 }),
        "agent-release" => Command::Agent(AgentCommand::Released {
            agent: words[1].into(),
            incarnation: num(2),
            node: num(3),
        }),
        "task-submit" => Command::Task(TaskCommand::Submit {
            agent: words[1].into(),
            idempotency_key: if words[2] == "-" {
                String::new()
            } else {
                words[2].into()
            },
            input: text(3),
            at_ms: 600,
        }),
        "handoff-begin" => Command::Handoff(HandoffCommand::Begin {
            agent: words[1].into(),
            to_site: words[2].into(),
            at_ms: 700,
        }),
        // handoff-map AGENT ID FROM:TO...
        "handoff-map" => Command::Handoff(HandoffCommand::MapTasks {
            agent: words[1].into(),
            id: num(2),
            moved: words[3..]
                .iter()
                .map(|w| {
                    let (from, to) = w.split_once(':').expect("FROM:TO");
                    TaskMove {
                        from: from.parse().unwrap(),
                        to: to.parse().unwrap(),
                    }
                })
                .collect(),
        }),
        "handoff-commit" => Command::Handoff(HandoffCommand::Commit {
            agent: words[1].into(),
            id: num(2),
            at_ms: 710,
        }),
        "handoff-abort" => Command::Handoff(HandoffCommand::Abort {
            agent: words[1].into(),
            id: num(2),
            reason: "refused".into(),
            at_ms: 715,
        }),
        "handoff-finish" => Command::Handoff(HandoffCommand::Finish {
            agent: words[1].into(),
            id: num(2),
            at_ms: 720,
        }),
        // handoff-import-begin FROM_SITE ID AGENT INCARNATION
        "handoff-import-begin" => {
            let Command::Agent(AgentCommand::Run { spec, .. }) = parse_command(&["agent-run", words[3], "500", "64"])
            else {
                unreachable!()
            };
            Command::Handoff(HandoffCommand::ImportBegin {
                from_site: words[1].into(),
                id: num(2),
                spec,
                sites: vec![words[1].into(), "here".into()],
                desired: agents::Desired::Running,
                incarnation: num(4),
                created_at_ms: 50,
                at_ms: 730,
            })
        }
        // handoff-import-memory FROM_SITE ID AGENT KEY=VALUE...
        "handoff-import-memory" => Command::Handoff(HandoffCommand::ImportMemory {
            from_site: words[1].into(),
            id: num(2),
            agent: words[3].into(),
            entries: words[4..]
                .iter()
                .map(|w| {
                    let (key, value) = w.split_once('=').expect("KEY=VALUE");
                    let entry = tasks::MemoryEntry {
                        value: value.into(),
                        embedding: tasks::encode_embedding(&[0.5]),
                        incarnation: 2,
                        written_at_ms: 40,
                    };
                    (key.to_string(), entry)
                })
                .collect(),
        }),
        // handoff-import-tasks FROM_SITE ID AGENT SOURCE_ID:queued|succeeded:KEY|-...
        "handoff-import-tasks" => Command::Handoff(HandoffCommand::ImportTasks {
            from_site: words[1].into(),
            id: num(2),
            agent: words[3].into(),
            tasks: words[4..]
                .iter()
                .map(|w| {
                    let parts: Vec<&str> = w.split(':').collect();
                    let done = parts[1] == "succeeded";
                    tasks::TaskRecord {
                        id: parts[0].parse().unwrap(),
                        agent: words[3].into(),
                        input: b"in".to_vec(),
                        idempotency_key: if parts[2] == "-" {
                            String::new()
                        } else {
                            parts[2].into()
                        },
                        status: if done {
                            tasks::TaskStatus::Succeeded
                        } else {
                            tasks::TaskStatus::Queued
                        },
                        output: if done { b"out".to_vec() } else { Vec::new() },
                        error: String::new(),
                        incarnation: if done { 2 } else { 0 },
                        submitted_at_ms: 30,
                        completed_at_ms: if done { 35 } else { 0 },
                    }
                })
                .collect(),
        }),
        "handoff-activate" => Command::Handoff(HandoffCommand::Activate {
            from_site: words[1].into(),
            id: num(2),
            agent: words[3].into(),
            at_ms: 740,
        }),
        // task-complete AGENT TASK INCARNATION ok|fail TEXT [+key=value | -key]...
        "task-complete" => Command::Task(TaskCommand::Complete {
            agent: words[1].into(),
            task: num(2),
            incarnation: num(3),
            result: match words[4] {
                "ok" => TaskResult::Succeeded { output: text(5) },
                "fail" => TaskResult::Failed { error: words[5].into() },
                other => panic!("unknown result {other:?}"),
            },
            memory: words[6..]
                .iter()
                .map(|w| match w.split_at(1) {
                    ("+", kv) => {
                        let (key, value) = kv.split_once('=').expect("+key=value");
                        MemoryChange::Put {
                            key: key.into(),
                            value: value.into(),
                            embedding: tasks::encode_embedding(&[1.0, -0.5]),
                        }
                    }
                    ("-", key) => MemoryChange::Delete { key: key.into() },
                    _ => panic!("memory change {w:?}: +key=value or -key"),
                })
                .collect(),
            at_ms: 700,
        }),
        // acl-bootstrap N | acl-token N POLICY... (accessor, salt and secret are N repeated)
        "acl-bootstrap" | "acl-token" => {
            let n = num(1) as u8;
            let token = Token {
                accessor: AccessorId([n; acl::ACCESSOR_BYTES]),
                description: format!("token {n}"),
                policies: words[2..].iter().map(|w| w.to_string()).collect(),
                management: words[0] == "acl-bootstrap",
                secret: SecretHash::new([n; acl::SALT_BYTES], &[n; acl::SECRET_BYTES]),
                created_ms: 800,
            };
            Command::Acl(if words[0] == "acl-bootstrap" {
                AclCommand::Bootstrap { token }
            } else {
                AclCommand::CreateToken { token }
            })
        }
        // acl-policy NAME RESOURCE[:PREFIX]=ACCESS...
        "acl-policy" => Command::Acl(AclCommand::SetPolicy {
            policy: Policy {
                name: words[1].into(),
                description: "golden".into(),
                rules: words[2..]
                    .iter()
                    .map(|w| {
                        let (target, access) = w.split_once('=').expect("RESOURCE[:PREFIX]=ACCESS");
                        let (resource, prefix) = target.split_once(':').unwrap_or((target, ""));
                        Rule {
                            resource: Resource::parse(resource).expect("resource"),
                            prefix: prefix.as_bytes().to_vec(),
                            access: acl::Access::parse(access).expect("access"),
                        }
                    })
                    .collect(),
            },
        }),
        "acl-policy-delete" => Command::Acl(AclCommand::DeletePolicy { name: words[1].into() }),
        "acl-token-delete" => Command::Acl(AclCommand::DeleteToken {
            accessor: AccessorId([num(1) as u8; acl::ACCESSOR_BYTES]),
        }),
        other => panic!("unknown command {other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| panic!("bad hex {s:?}")))
        .collect()
}

/// What the read functions return from `state`.
fn reads(state: &MemTxn) -> String {
    let mut out = String::new();
    let (kvs, more) = kv::range(state, b"", b"", 0).unwrap();
    writeln!(out, "range: more={more}").unwrap();
    for kv in kvs {
        writeln!(out, "  {kv:?}").unwrap();
    }
    writeln!(out, "revision: {}", kv::revision(state).unwrap()).unwrap();
    writeln!(out, "cluster_id: {}", kv::cluster_id(state).unwrap()).unwrap();
    for ev in kv::history(state, b"", 1, 1000, usize::MAX).unwrap() {
        writeln!(out, "history: {ev:?}").unwrap();
    }
    for entry in registry::list(state).unwrap() {
        writeln!(out, "model: {entry:?}").unwrap();
    }
    for (id, r) in nodes::resources(state).unwrap() {
        writeln!(out, "node {id}: {r:?}").unwrap();
        writeln!(out, "  labels: {:?}", nodes::labels_of(state, id).unwrap()).unwrap();
        writeln!(out, "  liveness: {:?}", nodes::liveness(state).unwrap().get(&id)).unwrap();
        writeln!(out, "  status: {:?}", agents::node_status(state, id).unwrap()).unwrap();
        writeln!(out, "  usage: {:?}", agents::node_usage(state, id).unwrap()).unwrap();
        writeln!(out, "  agents: {:?}", agents::agents_on(state, id, 100).unwrap()).unwrap();
        writeln!(out, "  drain moves: {:?}", agents::drain_moves(state, id).unwrap()).unwrap();
    }
    for (id, drain) in agents::drains(state).unwrap() {
        writeln!(out, "drain {id}: {drain:?}").unwrap();
    }
    for a in agents::agents_after(state, "", 1000).unwrap() {
        writeln!(out, "agent: {a:?}").unwrap();
        writeln!(
            out,
            "  allocation: {:?}",
            agents::allocation(state, &a.spec.name).unwrap()
        )
        .unwrap();
        writeln!(out, "  blocked: {}", agents::is_blocked(state, &a.spec.name).unwrap()).unwrap();
        let sites = agents::sites_of(state, &a.spec.name).unwrap();
        if !sites.is_empty() {
            writeln!(out, "  sites: {sites:?}").unwrap();
        }
        writeln!(
            out,
            "  stopping: {:?}",
            agents::stopping_of(state, &a.spec.name).unwrap()
        )
        .unwrap();
        writeln!(out, "  counts: {:?}", tasks::counts(state, &a.spec.name).unwrap()).unwrap();
        for t in tasks::tasks_of(state, &a.spec.name, 0, 1000).unwrap() {
            writeln!(out, "  task: {t:?}").unwrap();
        }
        let queued: Vec<u64> = tasks::inbox(state, &a.spec.name, 0, 1000)
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        writeln!(out, "  inbox: {queued:?}").unwrap();
        for (key, entry) in tasks::memory_list(state, &a.spec.name, "", 1000).unwrap() {
            writeln!(out, "  memory {key}: {entry:?}").unwrap();
        }
        let name = a.spec.name.as_str();
        let handoffs = (
            handoff::outgoing(state, name).unwrap(),
            handoff::moved(state, name).unwrap(),
            handoff::incoming(state, name).unwrap(),
        );
        if handoffs != (None, None, None) {
            writeln!(out, "  handoff: {handoffs:?}").unwrap();
            writeln!(out, "  frozen: {:?}", handoff::frozen(state, name).unwrap()).unwrap();
            for t in tasks::tasks_of(state, name, 0, 1000).unwrap() {
                if let Some(m) = handoff::moved_task(state, t.id).unwrap() {
                    writeln!(out, "  task {} moved: {m:?}", t.id).unwrap();
                }
            }
        }
    }
    for (name, eval) in agents::pending_evals(state, "", 1000).unwrap() {
        writeln!(out, "eval {name}: {eval:?}").unwrap();
    }
    writeln!(out, "acl bootstrapped: {}", acl::bootstrapped(state).unwrap()).unwrap();
    for p in acl::policies(state).unwrap() {
        writeln!(out, "acl policy: {p:?}").unwrap();
    }
    for t in acl::tokens(state).unwrap() {
        let (_, authorizer) = acl::resolve(state, &t.accessor).unwrap().unwrap();
        writeln!(out, "acl token: {t:?}").unwrap();
        writeln!(out, "  authorizer: {authorizer:?}").unwrap();
    }
    out
}

/// Runs `script`: the entries, responses and rows part of the golden file,
/// and the final state.
fn run(script: &str) -> (String, MemTxn) {
    let mut state = MemTxn::new();
    let mut out = String::new();
    for line in script
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let words: Vec<&str> = line.split_whitespace().collect();
        let cmd = parse_command(&words);
        let applied = cell0_state::apply(&mut state, &cmd).unwrap();
        writeln!(out, "> {line}").unwrap();
        writeln!(out, "entry {}", hex(&postcard::to_stdvec(&cmd).unwrap())).unwrap();
        writeln!(out, "-> {:?}", applied.response).unwrap();
        for ev in &applied.events {
            writeln!(out, "event {ev:?}").unwrap();
        }
        writeln!(out, "changed {:?}", applied.changed).unwrap();
    }
    writeln!(out, "== rows").unwrap();
    for (table, key, value) in state.rows() {
        writeln!(out, "{table} {} {}", hex(key), hex(value)).unwrap();
    }
    (out, state)
}

fn check(script_path: &Path) {
    let script = std::fs::read_to_string(script_path).unwrap();
    let golden_path = script_path.with_extension("golden");
    let (applied, state) = run(&script);
    let fresh = format!("{applied}== reads\n{}", reads(&state));
    if std::env::var_os("CELL0_BLESS").is_some() {
        std::fs::write(&golden_path, &fresh).unwrap();
        return;
    }
    let golden = std::fs::read_to_string(&golden_path)
        .unwrap_or_else(|e| panic!("{}: {e}; run with CELL0_BLESS=1 to create it", golden_path.display()));
    let (golden_applied, golden_reads) = golden
        .split_once("== reads\n")
        .unwrap_or_else(|| panic!("{} has no reads section", golden_path.display()));

    // The checked-in entries decode, with today's code, to the commands the
    // script names.
    let mut lines = golden_applied.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(cmd_line) = line.strip_prefix("> ") {
            let entry = lines.next().and_then(|l| l.strip_prefix("entry ")).unwrap();
            let decoded: Command = postcard::from_bytes(&unhex(entry))
                .unwrap_or_else(|e| panic!("the stored entry of {cmd_line:?} no longer decodes: {e}"));
            let words: Vec<&str> = cmd_line.split_whitespace().collect();
            assert_eq!(decoded, parse_command(&words), "entry of {cmd_line:?}");
        }
    }
    // The checked-in rows decode, with today's code, to the same reads.
    let (_, rows) = golden_applied.split_once("== rows\n").unwrap();
    let mut stored = MemTxn::new();
    for line in rows.lines() {
        let parts: Vec<&str> = line.split(' ').collect();
        stored.put(parts[0], &unhex(parts[1]), unhex(parts[2])).unwrap();
    }
    assert_eq!(
        reads(&stored),
        golden_reads,
        "{}: the checked-in rows read differently with today's code",
        golden_path.display()
    );
    // And today's code writes exactly the checked-in bytes.
    assert!(
        applied == golden_applied,
        "{} differs from what today's code writes (entries, responses or rows); if the change is intended \
         and keeps old data readable, regenerate with CELL0_BLESS=1 and review the diff.\n--- today:\n{applied}",
        golden_path.display()
    );
}

fn scripts() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "script"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no scripts in {}", dir.display());
    out
}

#[test]
fn golden_scripts_match_and_their_bytes_still_decode() {
    for script in scripts() {
        check(&script);
    }
}

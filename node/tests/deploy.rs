//! The deployment files under deploy/ agree with the node: the Docker image,
//! the compose cluster and the Kubernetes StatefulSet use the node's ports
//! and probe `/ready`; their config files parse and validate with the
//! node's own configuration code once the environment they set is applied;
//! every `CELL0_*` variable they set is one `cell0 run` reads; and the
//! Grafana dashboard queries only metrics documented in docs/operations.md.
//!
//! `scripts/check-deploy.sh` validates the same files with the tools of
//! each format (hadolint, promtool, kubernetes-validate, ...).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use cell0::config::NodeConfig;

/// A valid cluster secret for the tests (64 hex digits).
const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The node's default ports (what DESIGN.md section 3 names): public gRPC,
/// internal gRPC, gossip, HTTP.
fn ports() -> BTreeMap<&'static str, u16> {
    let c = NodeConfig::default();
    BTreeMap::from([
        ("public", c.listen.public.port()),
        ("internal", c.listen.internal.port()),
        ("gossip", c.gossip.listen.port()),
        ("http", c.listen.http.port()),
    ])
}

/// The `CELL0_*` variables `cell0 run` reads, from its own help text.
fn run_env_vars() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_cell0"))
        .args(["run", "--help"])
        .env_clear()
        .output()
        .unwrap();
    assert!(out.status.success(), "cell0 run --help failed");
    let help = String::from_utf8(out.stdout).unwrap();
    let vars: BTreeSet<String> = help
        .split("[env: ")
        .skip(1)
        .map(|s| {
            s.chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    assert!(vars.contains("CELL0_GOSSIP_SECRET") && vars.len() > 20, "{vars:?}");
    vars
}

/// What `cell0 run` does with the variables these files set (main.rs's
/// `RunArgs::into_config`, for the subset used here). An unknown variable
/// fails, so a new one is added here on purpose.
fn apply_env(c: &mut NodeConfig, env: &BTreeMap<String, String>) {
    for (k, v) in env {
        match k.as_str() {
            "CELL0_CONFIG" | "POD_NAME" => {}
            "CELL0_NAME" => c.name = Some(v.clone()),
            "CELL0_ADVERTISE_PUBLIC" => c.advertise.public = Some(v.clone()),
            "CELL0_ADVERTISE_INTERNAL" => c.advertise.internal = Some(v.clone()),
            "CELL0_ADVERTISE_GOSSIP" => c.gossip.advertise = Some(v.clone()),
            "CELL0_LISTEN_GOSSIP" => {
                c.gossip.enabled = true;
                c.gossip.listen = v.parse().unwrap();
            }
            "CELL0_GOSSIP_SECRET" => c.gossip.secret = Some(v.clone()),
            "CELL0_BOOTSTRAP_EXPECT" => c.bootstrap_expect = Some(v.parse().unwrap()),
            "CELL0_INSECURE" => c.tls.insecure |= v == "true",
            "CELL0_JOIN" => c.join = v.split(',').map(str::to_string).collect(),
            "CELL0_LOG_LEVEL" => c.log_level = v.clone(),
            other => panic!("apply_env does not know {other}: add it as main.rs handles it"),
        }
    }
}

/// The lines of the block under `key:` (more indented than the key),
/// dedented: enough YAML for the files here, which keep one key per line.
fn yaml_block<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    let mut lines = text.lines();
    let start = lines
        .by_ref()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no {key}"));
    let indent = start.len() - start.trim_start().len();
    let block: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .collect();
    let inner = block
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    block
        .iter()
        .map(|l| if l.len() >= inner { &l[inner..] } else { "" })
        .collect()
}

/// `KEY: value` pairs of the CELL0_* lines in a block (quotes removed).
fn env_lines(block: &[&str]) -> BTreeMap<String, String> {
    block
        .iter()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(": ")?;
            k.starts_with("CELL0_")
                .then(|| (k.to_string(), v.trim_matches('"').to_string()))
        })
        .collect()
}

#[test]
fn the_image_exposes_the_node_ports_probes_ready_and_ships_a_valid_config() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let p = ports();
    let expose: BTreeSet<u16> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace())
        .map(|p| p.trim_end_matches("/tcp").parse().unwrap())
        .collect();
    assert_eq!(expose, p.values().copied().collect(), "EXPOSE vs the node's ports");
    // The HEALTHCHECK instruction, continuation lines included.
    let mut health = String::new();
    for line in dockerfile.lines().skip_while(|l| !l.starts_with("HEALTHCHECK ")) {
        health.push_str(line);
        if !line.ends_with('\\') {
            break;
        }
    }
    assert!(!health.is_empty(), "no HEALTHCHECK");
    assert!(
        health.contains(&format!("http://127.0.0.1:{}/ready", p["http"])),
        "the HEALTHCHECK must GET /ready on the HTTP port: {health}"
    );
    for line in [
        "ENTRYPOINT [\"cell0\"]",
        "USER 10001:10001",
        "VOLUME [\"/var/lib/cell0\"]",
    ] {
        assert!(dockerfile.contains(line), "Dockerfile: no {line}");
    }
    assert!(dockerfile.contains("cargo build --release --locked -p cell0"));
    assert!(
        dockerfile.contains("scripts/fetch-model.sh") && dockerfile.contains("scripts/model-manifest.sha256"),
        "the model is fetched and verified by the repository's script"
    );

    // The image's config file: container defaults that validate once a
    // node adds what compose adds.
    let text = read("deploy/docker/cell0.toml");
    let c = NodeConfig::from_toml(&text, "deploy/docker/cell0.toml").unwrap();
    assert_eq!(c.listen.public.port(), p["public"]);
    assert_eq!(c.listen.internal.port(), p["internal"]);
    assert_eq!(c.listen.http.port(), p["http"]);
    assert_eq!(c.gossip.listen.port(), p["gossip"]);
    assert!(
        c.listen.http.ip().is_unspecified(),
        "the HTTP port must be reachable from outside the container"
    );
    assert!(
        c.data_dir.starts_with("/var/lib/cell0/") && c.data_dir != Path::new("/var/lib/cell0"),
        "the data dir must be a subdirectory of the volume: {}",
        c.data_dir.display()
    );
}

#[test]
fn the_compose_nodes_form_one_cluster_with_valid_settings() {
    let compose = read("deploy/docker/compose.yaml");
    let image_config = read("deploy/docker/cell0.toml");
    let vars = run_env_vars();
    let p = ports();
    let common = env_lines(&yaml_block(&compose, "environment: &node-env"));
    for name in ["node1", "node2", "node3"] {
        let service = yaml_block(&compose, &format!("{name}:"));
        let mut env = common.clone();
        env.extend(env_lines(&yaml_block(&service.join("\n"), "environment:")));
        for k in env.keys() {
            assert!(vars.contains(k), "compose {name}: `cell0 run` reads no {k}");
        }
        let env: BTreeMap<String, String> = env
            .into_iter()
            .map(|(k, v)| {
                let v = if v.starts_with("${CELL0_GOSSIP_SECRET:?") {
                    SECRET.to_string()
                } else if let Some(default) = v.strip_prefix("${").and_then(|v| v.split_once(":-")) {
                    default.1.trim_end_matches('}').to_string()
                } else {
                    v
                };
                (k, v)
            })
            .collect();
        let mut c = NodeConfig::from_toml(&image_config, "deploy/docker/cell0.toml").unwrap();
        apply_env(&mut c, &env);
        c.validate().unwrap_or_else(|e| panic!("compose {name}: {e}"));
        assert_eq!(c.bootstrap_expect, Some(3), "{name}");
        assert_eq!(c.name.as_deref(), Some(name));
        assert_eq!(c.advertise_internal(), format!("{name}:{}", p["internal"]));
        assert_eq!(
            c.gossip.advertise.as_deref(),
            Some(format!("{name}:{}", p["gossip"]).as_str())
        );
        let mut joins = c.join.clone();
        joins.sort();
        let others: Vec<String> = ["node1", "node2", "node3"]
            .iter()
            .filter(|n| **n != name)
            .map(|n| format!("{n}:{}", p["gossip"]))
            .collect();
        assert_eq!(joins, others, "{name} joins the other nodes' gossip ports");
        // Published container ports: the public API and the HTTP port only.
        let published: BTreeSet<u16> = service
            .iter()
            .filter_map(|l| l.trim().strip_prefix("- \"127.0.0.1:"))
            .map(|l| l.trim_end_matches('"').rsplit(':').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(published, BTreeSet::from([p["public"], p["http"]]), "{name}");
    }
    let prometheus = read("deploy/docker/prometheus.yml");
    assert!(
        prometheus.contains("job_name: cell0"),
        "the alerts expect job=\"cell0\""
    );
    for name in ["node1", "node2", "node3"] {
        assert!(
            prometheus.contains(&format!("\"{name}:{}\"", p["http"])),
            "Prometheus scrapes {name}"
        );
    }
    assert!(prometheus.contains("../prometheus/alerts.yml"));
}

#[test]
fn the_statefulset_uses_the_node_ports_probes_and_a_valid_config() {
    let sts = read("deploy/k8s/statefulset.yaml");
    let vars = run_env_vars();
    let p = ports();
    // Named container ports.
    let lines: Vec<&str> = sts.lines().map(str::trim).collect();
    let mut named = BTreeMap::new();
    for w in lines.windows(2) {
        if let (Some(name), Some(port)) = (w[0].strip_prefix("- name: "), w[1].strip_prefix("containerPort: ")) {
            named.insert(name.to_string(), port.parse::<u16>().unwrap());
        }
    }
    assert_eq!(
        named.values().copied().collect::<BTreeSet<_>>(),
        p.values().copied().collect(),
        "container ports {named:?}"
    );
    for (probe, path) in [
        ("readinessProbe:", "/ready"),
        ("livenessProbe:", "/health"),
        ("startupProbe:", "/health"),
    ] {
        let block = yaml_block(&sts, probe);
        let get = |key: &str| {
            block
                .iter()
                .find_map(|l| l.trim().strip_prefix(key))
                .unwrap_or_else(|| panic!("{probe} has no {key}"))
                .to_string()
        };
        assert_eq!(get("path: "), path, "{probe}");
        assert_eq!(
            named.get(&get("port: ")),
            Some(&p["http"]),
            "{probe} must use the HTTP port"
        );
    }
    let headless = read("deploy/k8s/service-headless.yaml");
    assert!(sts.contains("serviceName: cell0-headless") && headless.contains("name: cell0-headless"));
    assert!(
        headless.contains("publishNotReadyAddresses: true") && headless.contains("clusterIP: None"),
        "nodes must find each other before they are ready"
    );
    let prestop = yaml_block(&sts, "preStop:").join(" ");
    assert!(
        prestop.contains(&format!(
            "[\"cell0\", \"node\", \"leave\", \"--endpoint\", \"127.0.0.1:{}\"",
            p["public"]
        )),
        "preStop: {prestop}"
    );
    // `cell0 node leave` drains for up to --drain-deadline, then gives the
    // agents left up to 60 s to move (node/src/cli/leave.rs); the node's
    // own drain on SIGTERM takes up to 10 s more.
    let drain: u64 = prestop
        .split("\"--drain-deadline\", \"")
        .nth(1)
        .and_then(|s| s.split("s\"").next())
        .expect("preStop sets --drain-deadline in seconds")
        .parse()
        .unwrap();
    let grace: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("terminationGracePeriodSeconds: "))
        .expect("terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    assert!(
        grace >= drain + 60 + 10,
        "terminationGracePeriodSeconds {grace} < drain {drain} s + 70 s"
    );
    assert!(sts.contains("podManagementPolicy: Parallel"));

    // The ConfigMap's file with the StatefulSet's environment, for pod 0.
    let configmap = read("deploy/k8s/configmap.yaml");
    let toml = yaml_block(&configmap, "cell0.toml: |").join("\n");
    let mut env = BTreeMap::new();
    for w in lines.windows(2) {
        if let (Some(k), Some(v)) = (w[0].strip_prefix("- name: "), w[1].strip_prefix("value: ")) {
            env.insert(k.to_string(), v.replace("$(POD_NAME)", "cell0-0"));
        }
        if let Some(k) = w[0].strip_prefix("- name: ")
            && w[1] == "valueFrom:"
            && k.starts_with("CELL0_")
        {
            env.insert(k.to_string(), SECRET.to_string());
        }
    }
    for k in env.keys().filter(|k| k.starts_with("CELL0_")) {
        assert!(vars.contains(k), "statefulset: `cell0 run` reads no {k}");
    }
    assert_eq!(
        env.get("CELL0_CONFIG").map(String::as_str),
        Some("/etc/cell0/config/cell0.toml")
    );
    let mut c = NodeConfig::from_toml(&toml, "deploy/k8s/configmap.yaml").unwrap();
    apply_env(&mut c, &env);
    c.validate().unwrap_or_else(|e| panic!("k8s: {e}"));
    assert_eq!(c.bootstrap_expect, Some(3));
    assert!(c.tls.files().is_some(), "k8s nodes use mutual TLS");
    assert!(c.gossip.enabled && c.gossip.listen.port() == p["gossip"]);
    let joins: Vec<String> = (0..3)
        .map(|i| format!("cell0-{i}.cell0-headless:{}", p["gossip"]))
        .collect();
    assert_eq!(c.join, joins);
    assert_eq!(
        c.advertise_internal(),
        format!("cell0-0.cell0-headless:{}", p["internal"])
    );
    assert!(c.data_dir.starts_with("/var/lib/cell0/") && c.data_dir != Path::new("/var/lib/cell0"));
}

/// `{name: type}` of docs/operations.md's metrics table.
fn documented_metrics() -> BTreeMap<String, String> {
    let docs = read("docs/operations.md");
    let (_, section) = docs.split_once("## Metrics").expect("a metrics section");
    let section = section.split("\n## ").next().unwrap();
    let mut out = BTreeMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 3 {
            continue;
        }
        for name in cells[0].split('`').filter(|s| s.starts_with("cell0_")) {
            let name = name.split('{').next().unwrap();
            out.insert(name.to_string(), cells[1].to_string());
        }
    }
    out
}

/// Every `expr` of the dashboard, panels inside rows included.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::String(e)) = m.get("expr") {
                out.push(e.clone());
            }
            m.values().for_each(|v| exprs(v, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_documented_metrics() {
    let dash: serde_json::Value = serde_json::from_str(&read("deploy/grafana/cell0.json")).unwrap();
    assert!(dash["uid"].is_string() && dash["schemaVersion"].as_u64().unwrap() >= 36);
    let vars: Vec<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert!(vars.contains(&"datasource") && vars.contains(&"instance"), "{vars:?}");
    let docs = documented_metrics();
    assert!(docs.len() > 30 && docs["cell0_write_duration_seconds"] == "histogram");
    let mut all = Vec::new();
    exprs(&dash, &mut all);
    let mut used = BTreeSet::new();
    for expr in &all {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("cell0_") {
            let metric: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + metric.len()..];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    metric
                        .strip_suffix(s)
                        .filter(|b| docs.get(*b).is_some_and(|t| t == "histogram"))
                })
                .unwrap_or(&metric);
            assert!(
                docs.contains_key(base),
                "{metric} (in `{expr}`) is not in docs/operations.md's metrics table"
            );
            used.insert(base.to_string());
        }
    }
    for needed in [
        "cell0_raft_leader_changes_total",
        "cell0_write_duration_seconds",
        "cell0_raft_commit_index",
        "cell0_raft_applied_index",
        "cell0_grpc_requests_total",
        "cell0_grpc_request_duration_seconds",
        "cell0_inference_batch_size",
        "cell0_scheduler_unplaced_agents",
        "cell0_agents_running",
    ] {
        assert!(used.contains(needed), "the dashboard shows no {needed}");
    }
}

//! cell0-chaos: workloads that drive real clusters.
//!
//! This crate holds the side-by-side load harness (issue #18): a closed-loop
//! load generator, [`load`], with two targets, Cell0's public KV API
//! (`cell0.v1.Kv`) and etcd's v3 KV API (`etcdserverpb.KV`, from a vendored
//! subset of etcd's `.proto` files, [`etcd`]). Every client owns one gRPC
//! connection, client *i* talks to endpoint *i* mod *n*, latencies go into an
//! HDR histogram and the CPU time of the server processes is read from
//! `/proc` ([`procstat`]) so that runs against both systems can be compared
//! per operation ([`report`]). The `cell0-load` binary is its command line
//! and `scripts/bench-vs-etcd.sh` runs the whole comparison.
//!
//! Chaos testing (issue #24, docs/chaos.md) lives here too: a cluster of
//! real `cell0` processes ([`cluster`]), network namespaces whose links can
//! be cut ([`lab`]), workloads that record histories ([`workload`],
//! [`history`]), named scenarios of faults ([`scenario`]), the run that
//! ties them together ([`run`]) and the checkers ([`checker`]):
//! linearizability of a register and no lost acknowledged write of a set.
//! An optional agent workload ([`agents`]) runs agents and their tasks
//! while agents are moved, drained and stopped; [`checker::agents`] checks
//! that no agent or task is lost and only current incarnations count.
//! The `cell0-chaos` binary is its command line and `scripts/chaos.sh` runs
//! the CI subset and the soak.

pub mod agents;
pub mod checker;
pub mod cluster;
pub mod config;
pub mod etcd;
pub mod etcd_cluster;
pub mod failover;
pub mod history;
pub mod kv;
pub mod lab;
pub mod load;
pub mod procstat;
pub mod proxy;
pub mod report;
pub mod run;
pub mod scenario;
pub mod unary;
pub mod workload;

//! `cell0`: the Cell0 node and its command-line client, as a library.
//!
//! The `cell0` binary (src/main.rs) parses arguments, installs logging and
//! signal handling, and calls into this crate: [`server::run`] for
//! `cell0 run`, [`cli`] for every client command. Tests run whole nodes in
//! one process through [`server::run_with`] and read what their background
//! tasks did from a [`supervisor::Supervisor`].
//!
//! Invariants for several nodes in one process: a node's state lives in the
//! values [`server::run`] creates (its data dir, Raft, servers, supervisor),
//! never in statics; the process-global pieces are installed once and shared
//! (the metrics recorder, see [`telemetry::init_metrics`]; the log
//! subscriber, which only the binary installs). The public API's
//! concurrent-request budget is per node: each [`server::run`] makes its own
//! `RequestGate`, shared by that node's services only.

// The client commands are the binary's, public only so that it can call them:
// hidden from the library's documentation, whose links into private items
// are for readers of the source.
#[doc(hidden)]
#[allow(rustdoc::private_intra_doc_links)]
pub mod cli;
pub mod config;
pub mod server;
pub mod supervisor;
pub mod telemetry;

mod api;
mod audit;
mod autopilot;
mod datadir;
mod federation;
mod gossip;
mod handoff;
mod internal_tls;
mod leases;
mod models;
mod ops;
mod resources;
mod runner;
mod scheduling;
mod sdnotify;

//! The simulated clients: the register and set workloads of
//! [`cell0_chaos::workload`], through [`Consensus`]'s own API instead of the
//! public gRPC API, recorded in the [history format](cell0_chaos::history).
//!
//! A client talks to its home member, or to the next member that is up
//! when its home crashed (a client that fails over); the member it used is
//! the operation's `node`. Clients reach every member that is up, also one
//! cut off from the others (the clients of the chaos tests do too).
//!
//! Invariants: one operation in flight per client; a write that returned
//! an error other than a refused argument, or did not return within
//! [`OP_TIMEOUT`], is `unknown`; a read that did not return is `fail`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cell0_consensus::{Command, Consensus, ConsensusError, Consistency, NodeId, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use cell0_chaos::history::{Op, OpKind, ReadConsistency, Status, Value};

/// How long one operation may take before it counts as timed out.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the clients use one generation of register keys (short key
/// histories keep the linearizability search small).
pub const KEY_GENERATION: Duration = Duration::from_secs(1);

/// Key prefix of the register workload.
pub const REGISTER_PREFIX: &str = "sim/reg/";

/// Key prefix of the set workload.
pub const SET_PREFIX: &str = "sim/set/";

/// The members' consensus handles that clients may use: a crashed member
/// is removed before it stops.
#[derive(Clone, Default)]
pub struct Handles(Arc<Mutex<BTreeMap<NodeId, Consensus>>>);

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Handles").field(&self.up()).finish()
    }
}

impl Handles {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Consensus>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers member `id`'s handle.
    pub fn insert(&self, id: NodeId, consensus: Consensus) {
        self.lock().insert(id, consensus);
    }

    /// Withdraws member `id`'s handle.
    pub fn remove(&self, id: NodeId) {
        self.lock().remove(&id);
    }

    /// Members offered, in order.
    pub fn up(&self) -> Vec<NodeId> {
        self.lock().keys().copied().collect()
    }

    /// `home`'s handle, or the next member's (by id, wrapping) if `home`
    /// is gone.
    pub fn pick(&self, home: NodeId) -> Option<(NodeId, Consensus)> {
        let map = self.lock();
        map.range(home..)
            .chain(map.range(..home))
            .next()
            .map(|(id, c)| (*id, c.clone()))
    }
}

/// The clock every client records times on: the chaos harness's, on the
/// runtime's (here simulated) time. Tokio's timers fire on whole
/// milliseconds, and tasks woken at the same instant may run in an order
/// that tokio draws at random (see the crate documentation), so every actor
/// (client or nemesis) waits with [`Clock::sleep_in_slot`] and no two ever
/// start something at the same millisecond.
pub use cell0_chaos::workload::Clock;

/// One client.
#[derive(Debug, Clone, Copy)]
pub struct ClientSpec {
    /// Its number (also in its values).
    pub id: u32,
    /// The member it talks to while that is up.
    pub home: NodeId,
    /// Register keys per generation.
    pub keys: u32,
    /// Actors that share the clock's milliseconds ([`Clock::sleep_in_slot`];
    /// this client is actor `id`).
    pub slots: u64,
    /// Longest pause between two operations.
    pub think: Duration,
    /// Its random choices.
    pub seed: u64,
}

/// What one client recorded.
#[derive(Debug, Default)]
pub struct ClientHistory {
    /// Register operations, in completion order.
    pub register: Vec<Op>,
    /// Set writes, in completion order.
    pub set: Vec<Op>,
}

fn base(client: u32) -> Op {
    Op::blank(client, 0)
}

fn parse_value(bytes: &[u8]) -> Value {
    // Every value written is a decimal number; anything else is recorded as
    // a value no write wrote, which the checker rejects.
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(Value::MAX)
}

/// The status of a write that returned `e`: only a refused argument
/// certainly did not reach the log.
fn write_failure(e: &ConsensusError) -> Status {
    match e {
        ConsensusError::InvalidArgument { .. } => Status::Fail,
        _ => Status::Unknown,
    }
}

/// Reads `op.key` at `op.consistency` through `c`, filling in `op`; the
/// key's mod revision (0 when absent) when the read returned.
pub async fn read(c: &Consensus, op: &mut Op, clock: Clock) -> Option<u64> {
    let consistency = match op.consistency {
        Some(ReadConsistency::Serializable) => Consistency::Serializable,
        _ => Consistency::Linearizable,
    };
    op.kind = OpKind::Read;
    op.invoke_us = clock.now_us();
    let answer = tokio::time::timeout(OP_TIMEOUT, c.get(op.key.as_bytes(), consistency)).await;
    op.complete_us = clock.now_us();
    match answer {
        Ok(Ok((kv, _))) => {
            op.read = Some(kv.as_ref().map(|kv| parse_value(&kv.value)));
            Some(kv.map_or(0, |kv| kv.mod_revision))
        }
        Ok(Err(e)) => {
            op.status = Status::Fail;
            op.error = Some(e.to_string());
            None
        }
        Err(_) => {
            op.status = Status::Fail;
            op.error = Some("timed out".into());
            None
        }
    }
}

/// Proposes `cmd` through `c`, recording the outcome in `op`; the response
/// when it was applied.
async fn write(c: &Consensus, op: &mut Op, cmd: Command, clock: Clock) -> Option<Response> {
    op.invoke_us = clock.now_us();
    let answer = tokio::time::timeout(OP_TIMEOUT, c.propose(cmd)).await;
    op.complete_us = clock.now_us();
    match answer {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            op.status = write_failure(&e);
            op.error = Some(e.to_string());
            None
        }
        Err(_) => {
            op.status = Status::Unknown;
            op.error = Some("timed out".into());
            None
        }
    }
}

/// Runs one client until `until`.
pub async fn client(spec: ClientSpec, handles: Handles, clock: Clock, until: Instant) -> ClientHistory {
    let mut out = ClientHistory::default();
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut counter: u64 = 0;
    while Instant::now() < until {
        let think = u64::try_from(spec.think.as_micros()).unwrap_or(u64::MAX).max(1);
        let think = Duration::from_micros(rng.random_range(0..think));
        clock.sleep_in_slot(think, u64::from(spec.id), spec.slots).await;
        let Some((node, c)) = handles.pick(spec.home) else {
            continue;
        };
        let mut op = base(spec.id);
        op.node = u32::try_from(node).unwrap_or(u32::MAX);
        let generation = clock.now_us() / KEY_GENERATION.as_micros() as u64;
        op.key = format!(
            "{REGISTER_PREFIX}{generation}/{}",
            rng.random_range(0..spec.keys.max(1))
        );
        counter += 1;
        let value = (u64::from(spec.id) + 1) << 32 | counter;
        let pick = rng.random_range(0..100);
        if pick < 50 {
            op.consistency = Some(if pick < 40 {
                ReadConsistency::Linearizable
            } else {
                ReadConsistency::Serializable
            });
            read(&c, &mut op, clock).await;
            out.register.push(op);
        } else if pick < 75 {
            op.kind = OpKind::Write;
            op.value = Some(value);
            // Both puts the API proposes: with the previous pair (asked
            // for) and without (the default).
            let (key, value) = (op.key.clone().into_bytes(), value.to_string().into_bytes());
            let cmd = if pick < 62 {
                Command::Put { key, value }
            } else {
                Command::PutWithoutPrev { key, value }
            };
            write(&c, &mut op, cmd, clock).await;
            out.register.push(op);
        } else if pick < 90 {
            // Read the key, then ask to replace exactly what was read.
            let mut seen = op.clone();
            seen.consistency = Some(ReadConsistency::Linearizable);
            let revision = read(&c, &mut seen, clock).await;
            let expect = seen.read;
            out.register.push(seen);
            let (Some(revision), Some(expect)) = (revision, expect) else {
                continue;
            };
            op.kind = OpKind::Cas;
            op.value = Some(value);
            op.expect = expect;
            let cmd = Command::Cas {
                key: op.key.clone().into_bytes(),
                expected_revision: revision,
                value: value.to_string().into_bytes(),
            };
            if let Some(r) = write(&c, &mut op, cmd, clock).await {
                match r {
                    Response::Cas { succeeded, .. } => op.succeeded = Some(succeeded),
                    other => {
                        op.status = Status::Unknown;
                        op.error = Some(format!("unexpected response {other:?}"));
                    }
                }
            }
            out.register.push(op);
        } else {
            op.kind = OpKind::Write;
            op.key = format!("{SET_PREFIX}{}/{counter}", spec.id);
            op.value = Some(value);
            let cmd = Command::PutWithoutPrev {
                key: op.key.clone().into_bytes(),
                value: value.to_string().into_bytes(),
            };
            write(&c, &mut op, cmd, clock).await;
            out.set.push(op);
        }
    }
    out
}

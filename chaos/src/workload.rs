//! Workloads that record histories against a real cluster's `Kv` API.
//!
//! - **register**: clients read (linearizable and serializable), write and
//!   compare-and-set a few keys, each write with a value no other write
//!   uses; a compare-and-set first reads the key (a recorded read) and then
//!   asks to replace the revision it saw. Every [`KEY_GENERATION`] all
//!   clients move to fresh keys (`chaos/reg/<generation>/<k>`), which keeps
//!   each key's history short enough to search.
//! - **set**: clients write keys of their own, once each; at the end one
//!   linearizable scan of the prefix says which exist.
//!
//! Invariants: one operation in flight per client; a write whose outcome
//! the client cannot know is recorded `unknown`, never `fail` (only errors
//! the node returns before proposing anything, such as a refused argument,
//! are `fail`); a read that did not return is `fail` (it changed nothing).

use std::collections::BTreeSet;
use std::time::Duration;

use cell0_proto::v1::kv_client::KvClient;
use cell0_proto::v1::{CasRequest, Consistency, GetRequest, PutRequest, RangeRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::history::{Op, OpKind, ReadConsistency, Status, Value};

/// How long one operation may take before it counts as timed out.
pub const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the register workload uses one generation of keys.
pub const KEY_GENERATION: Duration = Duration::from_secs(1);

/// Key prefix of the register workload.
pub const REGISTER_PREFIX: &str = "chaos/reg/";

/// Key prefix of the set workload.
pub const SET_PREFIX: &str = "chaos/set/";

/// The clock every client records times on.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Self(Instant::now())
    }

    /// Microseconds since the start.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Sleeps at least `delay`, until the next millisecond of actor `slot`
    /// of `slots`: actors that must never act at the same instant (the
    /// simulator's clients and nemesis, whose order within one millisecond
    /// tokio would draw at random) act only at milliseconds congruent to
    /// their slot.
    pub async fn sleep_in_slot(&self, delay: Duration, slot: u64, slots: u64) {
        let slots = slots.max(1);
        let earliest = (self.now_us() + u64::try_from(delay.as_micros()).unwrap_or(u64::MAX)).div_ceil(1_000);
        let ms = earliest + (slot % slots + slots - earliest % slots) % slots;
        tokio::time::sleep_until(self.0 + Duration::from_millis(ms)).await;
    }
}

/// One client's connection: lazy, so a node that is down does not hold the
/// client up (its calls fail and the client moves on).
fn client(endpoint: &str) -> Option<KvClient<Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    Some(KvClient::new(channel))
}

fn request<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(OP_TIMEOUT);
    r
}

/// How long a client waits after an error before its next operation, so
/// that a node that is down is not asked in a tight loop.
const ERROR_PAUSE: Duration = Duration::from_millis(20);

/// Whether a failed write certainly did not take effect: the node refused
/// it before anything reached the log, or the connection was never made
/// (the request was not sent).
pub(crate) fn certainly_not_applied(status: &tonic::Status) -> bool {
    let never_sent = status.code() == tonic::Code::Unavailable && {
        let m = status.message().to_ascii_lowercase();
        m.contains("tcp connect error") || m.contains("connection refused")
    };
    never_sent
        || matches!(
            status.code(),
            tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition
                | tonic::Code::ResourceExhausted
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::OutOfRange
        )
}

/// Records in `op` that its write failed with `status`: `fail` when it
/// certainly did not take effect, else `unknown`.
fn write_failed(op: &mut Op, status: &tonic::Status) {
    op.status = if certainly_not_applied(status) {
        Status::Fail
    } else {
        Status::Unknown
    };
    op.error = Some(format!("{:?}: {}", status.code(), status.message()));
}

/// Appends `op` to `ops`; after a failed operation the client pauses.
async fn record(ops: &mut Vec<Op>, op: Op) {
    let failed = op.status != Status::Ok;
    ops.push(op);
    if failed {
        tokio::time::sleep(ERROR_PAUSE).await;
    }
}

fn parse_value(bytes: &[u8]) -> Value {
    // Every value of the workload is a decimal number; anything else is
    // recorded as a value no write wrote, which the checker rejects.
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(Value::MAX)
}

/// What a register client needs.
pub struct RegisterClient {
    /// Its number (also in its values).
    pub id: u32,
    /// The node it talks to.
    pub node: u32,
    /// That node's public address.
    pub endpoint: String,
    /// Keys to use (`REGISTER_PREFIX` + index).
    pub keys: u32,
    /// Its random choices.
    pub seed: u64,
}

/// Runs one register client until `until`; its operations, in completion
/// order.
pub async fn register_client(c: RegisterClient, clock: Clock, until: Instant) -> Vec<Op> {
    let mut ops = Vec::new();
    let Some(mut kv) = client(&c.endpoint) else {
        return ops;
    };
    let mut rng = StdRng::seed_from_u64(c.seed);
    let mut counter: u64 = 0;
    let base = |client: u32| Op::blank(client, c.node);
    while Instant::now() < until {
        // Every client moves to fresh keys each generation, so that no key
        // gathers more operations than the checker can search.
        let generation = clock.now_us() / KEY_GENERATION.as_micros() as u64;
        let key = format!("{REGISTER_PREFIX}{generation}/{}", rng.random_range(0..c.keys.max(1)));
        let pick = rng.random_range(0..100);
        if pick < 50 {
            let consistency = if pick < 40 {
                ReadConsistency::Linearizable
            } else {
                ReadConsistency::Serializable
            };
            let mut op = base(c.id);
            op.key = key;
            op.consistency = Some(consistency);
            read(&mut kv, &mut op, clock).await;
            record(&mut ops, op).await;
        } else if pick < 80 {
            counter += 1;
            let value = (u64::from(c.id) + 1) << 32 | counter;
            let mut op = base(c.id);
            op.kind = OpKind::Write;
            op.key = key.clone();
            op.value = Some(value);
            op.invoke_us = clock.now_us();
            let answer = kv
                .put(request(PutRequest {
                    key: key.into_bytes().into(),
                    value: value.to_string().into_bytes().into(),
                    prev_kv: false,
                }))
                .await;
            op.complete_us = clock.now_us();
            if let Err(s) = answer {
                write_failed(&mut op, &s);
            }
            record(&mut ops, op).await;
        } else {
            // Read the key, then ask to replace exactly what was read.
            let mut seen = base(c.id);
            seen.key = key.clone();
            seen.consistency = Some(ReadConsistency::Linearizable);
            let revision = read(&mut kv, &mut seen, clock).await;
            let expect = seen.read;
            ops.push(seen);
            let (Some(revision), Some(expect)) = (revision, expect) else {
                tokio::time::sleep(ERROR_PAUSE).await;
                continue;
            };
            counter += 1;
            let value = (u64::from(c.id) + 1) << 32 | counter;
            let mut op = base(c.id);
            op.kind = OpKind::Cas;
            op.key = key.clone();
            op.value = Some(value);
            op.expect = expect;
            op.invoke_us = clock.now_us();
            let answer = kv
                .cas(request(CasRequest {
                    key: key.into_bytes().into(),
                    expected_revision: revision,
                    value: value.to_string().into_bytes().into(),
                }))
                .await;
            op.complete_us = clock.now_us();
            match answer {
                Ok(r) => op.succeeded = Some(r.into_inner().succeeded),
                Err(s) => write_failed(&mut op, &s),
            }
            record(&mut ops, op).await;
        }
    }
    ops
}

/// Reads `op.key` into `op`; the key's mod revision (0: absent) when the
/// read returned.
async fn read(kv: &mut KvClient<Channel>, op: &mut Op, clock: Clock) -> Option<u64> {
    let consistency = match op.consistency {
        Some(ReadConsistency::Serializable) => Consistency::Serializable,
        _ => Consistency::Linearizable,
    };
    op.invoke_us = clock.now_us();
    let answer = kv
        .get(request(GetRequest {
            key: op.key.clone().into_bytes().into(),
            consistency: consistency as i32,
        }))
        .await;
    op.complete_us = clock.now_us();
    match answer {
        Ok(r) => {
            let kv = r.into_inner().kv;
            op.read = Some(kv.as_ref().map(|kv| parse_value(&kv.value)));
            Some(kv.map_or(0, |kv| kv.mod_revision))
        }
        Err(s) => {
            op.status = Status::Fail;
            op.error = Some(format!("{:?}: {}", s.code(), s.message()));
            None
        }
    }
}

/// Runs one set client until `until`: writes `SET_PREFIX<client>/<n>` for
/// n = 1, 2, ...
pub async fn set_client(id: u32, node: u32, endpoint: String, clock: Clock, until: Instant) -> Vec<Op> {
    let mut ops = Vec::new();
    let Some(mut kv) = client(&endpoint) else {
        return ops;
    };
    let mut n: u64 = 0;
    while Instant::now() < until {
        n += 1;
        let key = format!("{SET_PREFIX}{id}/{n}");
        let value = (u64::from(id) + 1) << 32 | n;
        let invoke_us = clock.now_us();
        let answer = kv
            .put(request(PutRequest {
                key: key.clone().into_bytes().into(),
                value: value.to_string().into_bytes().into(),
                prev_kv: false,
            }))
            .await;
        let mut op = Op {
            client: id,
            kind: OpKind::Write,
            key,
            consistency: None,
            value: Some(value),
            expect: None,
            read: None,
            succeeded: None,
            invoke_us,
            complete_us: clock.now_us(),
            status: Status::Ok,
            node,
            error: None,
        };
        if let Err(s) = answer {
            write_failed(&mut op, &s);
        }
        record(&mut ops, op).await;
    }
    ops
}

/// Every key under `prefix`, read linearizably through `endpoint`, page by
/// page; `None` if a page could not be read.
pub async fn scan(endpoint: &str, prefix: &str) -> Option<BTreeSet<String>> {
    let mut kv = client(endpoint)?;
    let mut keys = BTreeSet::new();
    let mut after = Vec::new();
    loop {
        let page = kv
            .range(request(RangeRequest {
                prefix: prefix.as_bytes().to_vec().into(),
                limit: 0,
                start_after: after.clone().into(),
                consistency: Consistency::Linearizable as i32,
            }))
            .await
            .ok()?
            .into_inner();
        for pair in &page.kvs {
            keys.insert(String::from_utf8_lossy(&pair.key).into_owned());
        }
        match (page.more, page.kvs.last()) {
            (true, Some(last)) => after = last.key.to_vec(),
            _ => return Some(keys),
        }
    }
}

//! The closed-loop load generator.
//!
//! [`run`] opens one connection per client (client *i* to endpoint *i* mod
//! *n*, so that requests reach followers as well as the leader, the way
//! etcd's own `benchmark` tool spreads its clients), optionally writes the
//! whole key space once ([`LoadConfig::prefill`]), and then lets every
//! client issue one request after another for the configured duration:
//! each request picks a key uniformly at random from the key space
//! (`load/000000000000` ...), puts carry a fixed pseudo-random
//! (incompressible) value. Latencies of successful requests go into one HDR
//! histogram per client (1 µs to 1 h, 3 significant digits), merged at the
//! end; failed requests are counted, and the client pauses 10 ms after one
//! so that a node that refuses connections is not spun on. The CPU time of
//! the given server processes is read from `/proc` right before the clients
//! start and right after the last one finished.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use prost::bytes::Bytes;

use crate::config::{Consistency, LoadConfig, Op};
use crate::kv::{ConnectError, KvClient, error_chain};
use crate::procstat::{self, CpuSampler, ProcError};
use crate::report::{RunReport, thousands};

/// Highest latency the histograms hold, in microseconds (one hour); longer
/// requests are recorded as this.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Pause of a client after a failed request.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Attempts per key while prefilling.
const PREFILL_ATTEMPTS: usize = 3;

/// Why a run could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A client could not connect.
    #[error("{0}")]
    Connect(ConnectError),
    /// A server process could not be read at the start.
    #[error("--pids: {0}")]
    Proc(ProcError),
    /// Writing the key space failed.
    #[error("prefill: writing {key} failed {PREFILL_ATTEMPTS} times, last: {status}")]
    Prefill {
        /// The key.
        key: String,
        /// The last error.
        status: String,
    },
    /// A client task failed (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The key with index `i`: `load/` and twelve digits (17 bytes).
pub fn key(i: u64) -> Bytes {
    Bytes::from(format!("load/{i:012}"))
}

/// SplitMix64: a small, fast, seedable generator, good enough to pick keys
/// and fill values.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0), by multiply-shift (bias below 2^-32
    /// for the key spaces used here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// `size` pseudo-random bytes (the same for every run).
pub fn value(size: usize) -> Bytes {
    let mut rng = SplitMix64::new(0x00C0_FFEE);
    let mut v = Vec::with_capacity(size + 8);
    while v.len() < size {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(size);
    Bytes::from(v)
}

fn new_histogram() -> Result<Histogram<u64>, LoadError> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).map_err(|e| LoadError::Internal(e.to_string()))
}

/// A failed request as `Code: message`, with the transport's causes when
/// the status carries them.
fn status_line(s: &tonic::Status) -> String {
    let mut line = format!("{:?}: {}", s.code(), s.message());
    if let Some(cause) = std::error::Error::source(s) {
        let cause = error_chain(cause);
        if cause != s.message() {
            line = format!("{line}: {cause}");
        }
    }
    line
}

/// What one client measured.
struct ClientStats {
    hist: Histogram<u64>,
    not_found: u64,
    first_error: Option<String>,
}

/// Counters the clients share with the progress printer.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    done: AtomicU64,
    errors: AtomicU64,
}

struct ClientJob {
    client: KvClient,
    op: Op,
    consistency: Consistency,
    keys: u64,
    value: Bytes,
    seed: u64,
    shared: Arc<Shared>,
}

async fn client_loop(job: ClientJob) -> Result<ClientStats, LoadError> {
    let ClientJob {
        client,
        op,
        consistency,
        keys,
        value,
        seed,
        shared,
    } = job;
    let mut rng = SplitMix64::new(seed);
    let mut stats = ClientStats {
        hist: new_histogram()?,
        not_found: 0,
        first_error: None,
    };
    while !shared.stop.load(Ordering::Relaxed) {
        let k = key(rng.below(keys));
        let started = Instant::now();
        let result = match op {
            Op::Put => client.put(k, value.clone()).await.map(|()| true),
            Op::Get => client.get(k, consistency).await,
        };
        match result {
            Ok(found) => {
                let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.hist.saturating_record(us.clamp(1, MAX_LATENCY_US));
                shared.done.fetch_add(1, Ordering::Relaxed);
                if !found {
                    stats.not_found += 1;
                }
            }
            Err(status) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if stats.first_error.is_none() {
                    stats.first_error = Some(status_line(&status));
                }
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    Ok(stats)
}

/// Prints one progress line to stderr: in place on a terminal, one line per
/// second otherwise.
struct Progress {
    enabled: bool,
    terminal: bool,
    label: String,
}

impl Progress {
    fn line(&self, text: &str) {
        if !self.enabled {
            return;
        }
        if self.terminal {
            eprint!("\r{}: {text}    ", self.label);
        } else {
            eprintln!("{}: {text}", self.label);
        }
    }

    fn end(&self) {
        if self.enabled && self.terminal {
            eprintln!();
        }
    }
}

/// Writes every key once with all clients, client `c` taking keys `c`,
/// `c + clients`, ...; returns the seconds it took.
async fn prefill(clients: &[KvClient], keys: u64, value: &Bytes, progress: &Progress) -> Result<f64, LoadError> {
    let started = Instant::now();
    let written = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let n = clients.len() as u64;
    for (c, client) in clients.iter().enumerate() {
        let (client, value, written) = (client.clone(), value.clone(), written.clone());
        tasks.spawn(async move {
            let mut k = c as u64;
            while k < keys {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match client.put(key(k), value.clone()).await {
                        Ok(()) => break,
                        Err(s) if attempt >= PREFILL_ATTEMPTS => {
                            return Err(LoadError::Prefill {
                                key: format!("load/{k:012}"),
                                status: status_line(&s),
                            });
                        }
                        Err(_) => tokio::time::sleep(ERROR_PAUSE * 10).await,
                    }
                }
                written.fetch_add(1, Ordering::Relaxed);
                k += n;
            }
            Ok(())
        });
    }
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(result)) => result?,
                Some(Err(e)) => return Err(LoadError::Internal(e.to_string())),
            },
            _ = tick.tick() => {
                progress.line(&format!("prefill {}/{} keys", written.load(Ordering::Relaxed), keys));
            }
        }
    }
    progress.line(&format!("prefill {keys}/{keys} keys"));
    progress.end();
    Ok(started.elapsed().as_secs_f64())
}

/// Carries out one run and reports what it measured.
pub async fn run(config: &LoadConfig) -> Result<RunReport, LoadError> {
    let progress = Progress {
        enabled: config.progress,
        terminal: std::io::stderr().is_terminal(),
        label: format!(
            "{} {} {} clients",
            config.target.name(),
            match config.consistency {
                Some(c) => format!("{} ({})", config.op.name(), c.name()),
                None => config.op.name().to_string(),
            },
            config.clients
        ),
    };
    // Fail on a wrong pid before connecting anything.
    CpuSampler::start(&config.pids).map_err(LoadError::Proc)?;

    let mut clients = Vec::with_capacity(config.clients);
    for c in 0..config.clients {
        let endpoint = &config.endpoints[c % config.endpoints.len()];
        clients.push(
            KvClient::connect(config.target, endpoint, config.timeout)
                .await
                .map_err(LoadError::Connect)?,
        );
    }
    let value = value(config.value_size);
    let prefill_seconds = if config.prefill {
        Some(prefill(&clients, config.keys, &value, &progress).await?)
    } else {
        None
    };

    let load_average_start = procstat::load_average();
    let sampler = CpuSampler::start(&config.pids).map_err(LoadError::Proc)?;
    let shared = Arc::new(Shared::default());
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for (c, client) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(client_loop(ClientJob {
            client,
            op: config.op,
            consistency: config.consistency.unwrap_or(Consistency::Linearizable),
            keys: config.keys,
            value: value.clone(),
            seed: 0x5EED_0000 + c as u64,
            shared: shared.clone(),
        })));
    }

    let deadline = started + config.duration;
    let total = config.duration.as_secs();
    let mut last = 0;
    let mut second = 0;
    loop {
        let next = (started + Duration::from_secs(second + 1)).min(deadline);
        tokio::time::sleep_until(next.into()).await;
        if Instant::now() >= deadline {
            break;
        }
        second += 1;
        let done = shared.done.load(Ordering::Relaxed);
        progress.line(&format!(
            "{second}/{total} s  {} ops/s  {} errors",
            thousands((done - last) as f64),
            shared.errors.load(Ordering::Relaxed)
        ));
        last = done;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut hist = new_histogram()?;
    let mut not_found = 0;
    let mut first_error = None;
    for t in tasks {
        let stats = t.await.map_err(|e| LoadError::Internal(e.to_string()))??;
        hist.add(&stats.hist).map_err(|e| LoadError::Internal(e.to_string()))?;
        not_found += stats.not_found;
        first_error = first_error.or(stats.first_error);
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = sampler.finish();
    let load_average_end = procstat::load_average();

    let ops = hist.len();
    let errors = shared.errors.load(Ordering::Relaxed);
    progress.line(&format!(
        "done: {} ops/s over {seconds:.2} s, {errors} errors",
        thousands(ops as f64 / seconds)
    ));
    progress.end();
    for p in cpu.processes.iter().filter(|p| p.seconds.is_none()) {
        eprintln!(
            "warning: process {} could not be read after the run (did it exit?)",
            p.pid
        );
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let server_cpu_seconds = cpu.total_seconds();
    Ok(RunReport {
        target: config.target,
        op: config.op,
        consistency: config.consistency,
        clients: config.clients,
        endpoints: config.endpoints.clone(),
        duration_s: config.duration.as_secs_f64(),
        seconds,
        value_size: config.value_size,
        keys: config.keys,
        prefill_seconds,
        ops,
        errors,
        not_found,
        first_error,
        ops_per_second: ops as f64 / seconds,
        mean_ms: hist.mean() / 1000.0,
        p50_ms: ms(hist.value_at_quantile(0.5)),
        p99_ms: ms(hist.value_at_quantile(0.99)),
        p999_ms: ms(hist.value_at_quantile(0.999)),
        max_ms: ms(hist.max()),
        server_cpu: cpu.processes.clone(),
        server_cpu_seconds,
        cpu_us_per_op: server_cpu_seconds.filter(|_| ops > 0).map(|s| s * 1e6 / ops as f64),
        client_cpu_seconds: cpu.own_seconds,
        clock_ticks_per_second: cpu.ticks_per_second,
        load_average_start,
        load_average_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_fixed_width() {
        assert_eq!(&key(0)[..], b"load/000000000000");
        assert_eq!(&key(99_999)[..], b"load/000000099999");
        assert_eq!(key(crate::config::MAX_KEYS - 1).len(), 17);
    }

    #[test]
    fn values_are_deterministic_and_sized() {
        assert_eq!(value(0).len(), 0);
        assert_eq!(value(13).len(), 13);
        assert_eq!(value(256), value(256));
        assert_eq!(value(256)[..13], value(13)[..]);
        // Incompressible: not one repeated byte.
        assert!(value(256).iter().any(|b| *b != value(256)[0]));
    }

    #[test]
    fn random_keys_cover_the_space() {
        let mut rng = SplitMix64::new(1);
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[rng.below(10) as usize] += 1;
        }
        assert!(seen.iter().all(|n| (800..1200).contains(n)), "{seen:?}");
        assert_eq!(SplitMix64::new(7).next_u64(), SplitMix64::new(7).next_u64());
        assert_eq!(SplitMix64::new(7).below(1), 0);
    }
}

//! `cell0 bench sites`: two sites' link ends in this process (the real
//! QUIC and mutual-TLS stack, certificates from a throwaway CA), joined
//! through a UDP relay that holds every datagram `--delay-ms` each way, as
//! a long link between regions would. Measures
//! - the round-trip time the QUIC connection estimates;
//! - propagation: from one site publishing a changed summary until the
//!   other site's catalog shows it. In a node, a change waits up to
//!   another 100 ms to be noticed (`federation-summary` builds the
//!   summary that often);
//! - a forwarded call: from one site sending a call until the other
//!   site's answer is back (the other end answers at once; in a node it
//!   replays the call on its own public port, which adds that call's
//!   time).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cell0_federation::{Federation, LinkConfig};
use cell0_proto::federation::v1::SiteSummary;
use cell0_tls::certs::{create_ca, create_node_cert};
use cell0_tls::{CaFiles, NodeCertRequest, NodeFiles, TlsFiles, TlsMaterial, Validity};
use clap::Args;
use serde::Serialize;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use super::{Output, print_json, print_table};

/// Most samples one run takes.
const MAX_SAMPLES: usize = 10_000;

/// Most delay the relay adds each way, in milliseconds.
const MAX_DELAY_MS: u64 = 10_000;

/// Options of `cell0 bench sites`.
#[derive(Args)]
pub struct SitesBench {
    /// Milliseconds the relay holds every datagram, each way.
    #[arg(long, default_value_t = 50)]
    delay_ms: u64,
    /// Changed summaries to time.
    #[arg(long, default_value_t = 50)]
    samples: usize,
    /// Seconds to wait for the link, and for each sample, before giving up.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

#[derive(Debug, Serialize)]
struct SitesReport {
    delay_ms: u64,
    samples: usize,
    rtt_ms: f64,
    link_seconds: f64,
    propagation_ms_p50: f64,
    propagation_ms_p99: f64,
    propagation_ms_max: f64,
    forward_ms_p50: f64,
    forward_ms_p99: f64,
}

/// Answers every forwarded call at once with an empty message.
struct Answer;

impl cell0_federation::ForwardHandler for Answer {
    fn serve(
        &self,
        _from_site: &str,
        request: cell0_proto::federation::v1::ForwardRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = cell0_proto::federation::v1::ForwardResponse> + Send>> {
        Box::pin(async move {
            cell0_proto::federation::v1::ForwardResponse {
                request_id: request.request_id,
                ..Default::default()
            }
        })
    }
}

/// Forwards datagrams between the first sender on `front` and `target`,
/// each one `delay` later, until `stop`.
async fn relay(
    front: UdpSocket,
    target: SocketAddr,
    delay: Duration,
    mut stop: oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let front = Arc::new(front);
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    back.connect(target).await?;
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            got = front.recv_from(&mut up) => {
                let (n, from) = got?;
                *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(from);
                let (data, back) = (up[..n].to_vec(), back.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = back.send(&data).await;
                });
            }
            got = back.recv(&mut down) => {
                let n = got?;
                let to = *client.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(to) = to {
                    let (data, front) = (down[..n].to_vec(), front.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = front.send_to(&data, to).await;
                    });
                }
            }
        }
    }
}

/// The TLS material of a node of `site`, from `ca`, in `dir`.
fn material(ca: &CaFiles, dir: &std::path::Path, site: &str) -> anyhow::Result<TlsMaterial> {
    let out = NodeFiles::in_dir(dir, site);
    create_node_cert(
        ca,
        &out,
        &NodeCertRequest {
            node: site.into(),
            site: site.into(),
            sans: vec![],
            validity: Validity::days(1)?,
        },
    )?;
    Ok(TlsMaterial::load(TlsFiles {
        ca: ca.cert.clone(),
        cert: out.cert,
        key: out.key,
    })?)
}

fn link_config(site: &str, id: u64, join: Vec<String>) -> LinkConfig {
    LinkConfig {
        site: site.into(),
        node_id: id,
        node_name: site.into(),
        version: env!("CARGO_PKG_VERSION").into(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        advertise: "127.0.0.1:0".into(),
        join,
        site_timeout: Duration::from_secs(30),
        allowed_sites: vec![],
    }
}

fn summary(site: &str, sample: u64) -> SiteSummary {
    SiteSummary {
        site: site.into(),
        cluster_id: 1,
        seq: sample,
        leader_name: format!("leader-{sample}"),
        ..SiteSummary::default()
    }
}

/// The leader name site `site` shows in `federation`'s catalog.
fn shown(federation: &Federation, site: &str) -> Option<String> {
    federation
        .sites()
        .into_iter()
        .find(|v| v.summary.site == site)
        .map(|v| v.summary.leader_name)
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() >= deadline {
            anyhow::bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Runs the benchmark.
pub async fn run(output: Output, b: SitesBench) -> anyhow::Result<()> {
    if !(1..=MAX_SAMPLES).contains(&b.samples) {
        anyhow::bail!("--samples must be 1 to {MAX_SAMPLES}");
    }
    if b.delay_ms > MAX_DELAY_MS {
        anyhow::bail!("--delay-ms must be at most {MAX_DELAY_MS}");
    }
    let timeout = Duration::from_secs(b.timeout.max(1));
    let dir = tempfile::tempdir().context("making a temporary directory")?;
    let ca = CaFiles::in_dir(dir.path());
    create_ca(&ca, "bench", Validity::days(1)?)?;

    let a = Federation::bind(link_config("a", 1, vec![]), material(&ca, dir.path(), "a")?)?;
    let front = UdpSocket::bind("127.0.0.1:0").await?;
    let relay_addr = front.local_addr()?;
    let (stop_relay, relay_stopped) = oneshot::channel();
    let relay = tokio::spawn(relay(
        front,
        a.local_addr()?,
        Duration::from_millis(b.delay_ms),
        relay_stopped,
    ));
    let b_site = Federation::bind(
        link_config("b", 2, vec![relay_addr.to_string()]),
        material(&ca, dir.path(), "b")?,
    )?;
    let (stop_a, a_stopped) = oneshot::channel::<()>();
    let (stop_b, b_stopped) = oneshot::channel::<()>();
    let run_a = tokio::spawn(a.clone().run(async {
        let _ = a_stopped.await;
    }));
    let run_b = tokio::spawn(b_site.clone().run(async {
        let _ = b_stopped.await;
    }));

    let started = Instant::now();
    b_site.publish(summary("b", 0));
    wait_for("site a hears of site b", timeout, || shown(&a, "b").is_some()).await?;
    let link_seconds = started.elapsed().as_secs_f64();

    let mut propagation = Vec::with_capacity(b.samples);
    for sample in 1..=b.samples as u64 {
        let want = format!("leader-{sample}");
        let sent = Instant::now();
        b_site.publish(summary("b", sample));
        wait_for("the changed summary arrives", timeout, || {
            shown(&a, "b").as_deref() == Some(want.as_str())
        })
        .await?;
        propagation.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    let rtt_ms = a.rtts().get("b").map_or(0.0, |r| r.as_secs_f64() * 1000.0);

    a.serve_forwarded(Arc::new(Answer));
    let mut forward = Vec::with_capacity(b.samples);
    for sample in 0..b.samples {
        let request = cell0_proto::federation::v1::ForwardRequest {
            target_site: "a".into(),
            origin_site: "b".into(),
            request_id: sample.to_string(),
            method: "/cell0.v1.Kv/Get".into(),
            body: vec![0u8; 64].into(),
            ..Default::default()
        };
        let sent = Instant::now();
        let answer = b_site.forward(request, timeout).await?;
        anyhow::ensure!(answer.code == 0, "the forwarded call failed: {}", answer.message);
        forward.push(sent.elapsed().as_secs_f64() * 1000.0);
    }
    forward.sort_by(f64::total_cmp);

    let _ = stop_b.send(());
    let _ = stop_a.send(());
    run_b.await??;
    run_a.await??;
    let _ = stop_relay.send(());
    relay.await??;

    propagation.sort_by(f64::total_cmp);
    let report = SitesReport {
        delay_ms: b.delay_ms,
        samples: b.samples,
        rtt_ms,
        link_seconds,
        propagation_ms_p50: percentile(&propagation, 0.5),
        propagation_ms_p99: percentile(&propagation, 0.99),
        propagation_ms_max: propagation.last().copied().unwrap_or(0.0),
        forward_ms_p50: percentile(&forward, 0.5),
        forward_ms_p99: percentile(&forward, 0.99),
    };
    match output {
        Output::Json => print_json(&report),
        Output::Table => {
            let rows = vec![
                vec!["delay each way".into(), format!("{} ms", report.delay_ms)],
                vec!["QUIC round trip".into(), format!("{:.1} ms", report.rtt_ms)],
                vec![
                    "link up and first summary".into(),
                    format!("{:.3} s", report.link_seconds),
                ],
                vec!["propagation p50".into(), format!("{:.1} ms", report.propagation_ms_p50)],
                vec!["propagation p99".into(), format!("{:.1} ms", report.propagation_ms_p99)],
                vec!["propagation max".into(), format!("{:.1} ms", report.propagation_ms_max)],
                vec!["forwarded call p50".into(), format!("{:.1} ms", report.forward_ms_p50)],
                vec!["forwarded call p99".into(), format!("{:.1} ms", report.forward_ms_p99)],
                vec!["samples".into(), report.samples.to_string()],
            ];
            print_table(&["MEASURE", "VALUE"], &rows);
            Ok(())
        }
    }
}

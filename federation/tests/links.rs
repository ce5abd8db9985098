//! Site links on loopback with real certificates: two sites learn each
//! other's summaries; a peer with a certificate of another CA, an expired
//! one, or one for another site than it claims is refused; a silent site
//! turns unreachable and heals when it comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cell0_federation::{Federation, ForwardError, ForwardHandler, LinkConfig, SiteStatus};
use cell0_proto::federation::v1::{ForwardRequest, ForwardResponse, SiteSummary};
use cell0_tls::certs::{create_ca, create_node_cert};
use cell0_tls::{CaFiles, NodeCertRequest, NodeFiles, TlsFiles, TlsMaterial, Validity};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const DEADLINE: Duration = Duration::from_secs(30);

fn ca(dir: &Path) -> CaFiles {
    std::fs::create_dir_all(dir).unwrap();
    let files = CaFiles::in_dir(dir);
    create_ca(&files, "test", Validity::days(30).unwrap()).unwrap();
    files
}

/// TLS material of a node `name` of `site` with a certificate of `ca`.
fn material(ca: &CaFiles, dir: &Path, name: &str, site: &str, validity: Validity) -> TlsMaterial {
    let out = NodeFiles::in_dir(dir, name);
    let req = NodeCertRequest {
        node: name.into(),
        site: site.into(),
        sans: vec![],
        validity,
    };
    create_node_cert(ca, &out, &req).unwrap();
    TlsMaterial::load(TlsFiles {
        ca: ca.cert.clone(),
        cert: out.cert,
        key: out.key,
    })
    .unwrap()
}

fn config(site: &str, id: u64, join: Vec<String>) -> LinkConfig {
    LinkConfig {
        site: site.into(),
        node_id: id,
        node_name: format!("{site}-{id}"),
        version: "test".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise: "127.0.0.1:0".into(),
        join,
        site_timeout: Duration::from_millis(1500),
        allowed_sites: vec![],
    }
}

fn summary(site: &str, applied: u64) -> SiteSummary {
    SiteSummary {
        site: site.into(),
        cluster_id: 1,
        term: 1,
        applied_index: applied,
        node_id: 1,
        ..SiteSummary::default()
    }
}

/// A running federation, a task publishing its summary every 100 ms as a
/// node does, and the way to stop both.
struct Running {
    federation: Federation,
    applied: Arc<AtomicU64>,
    publisher: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    fn start(config: LinkConfig, material: TlsMaterial, applied: u64) -> Running {
        let site = config.site.clone();
        let federation = Federation::bind(config, material).unwrap();
        let applied = Arc::new(AtomicU64::new(applied));
        let publisher = tokio::spawn({
            let (federation, applied) = (federation.clone(), applied.clone());
            async move {
                loop {
                    federation.publish(summary(&site, applied.load(Ordering::Relaxed)));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(federation.clone().run(async {
            let _ = stopped.await;
        }));
        Running {
            federation,
            applied,
            publisher,
            stop: Some(stop),
            task: Some(tokio::spawn(async move {
                task.await.unwrap().unwrap();
            })),
        }
    }

    fn addr(&self) -> String {
        self.federation.local_addr().unwrap().to_string()
    }

    async fn stop(&mut self) {
        self.publisher.abort();
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
        }
    }

    fn status_of(&self, site: &str) -> Option<(SiteStatus, u64)> {
        self.federation
            .sites()
            .into_iter()
            .find(|v| v.summary.site == site)
            .map(|v| (v.status, v.summary.applied_index))
    }

    fn dial_error(&self) -> Option<String> {
        self.federation.dials().into_iter().find_map(|d| d.last_error)
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_learn_each_other_and_a_silent_site_turns_unreachable_then_heals() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(&dir.path().join("ca"));
    let valid = || Validity::days(30).unwrap();
    let mut a = Running::start(
        config("a", 1, vec![]),
        material(&ca, dir.path(), "a1", "a", valid()),
        10,
    );
    let b_material = material(&ca, dir.path(), "b1", "b", valid());
    let mut b = Running::start(config("b", 2, vec![a.addr()]), b_material.clone(), 20);

    wait_until("each site lists the other alive", || {
        a.status_of("b") == Some((SiteStatus::Alive, 20)) && b.status_of("a") == Some((SiteStatus::Alive, 10))
    })
    .await;
    assert!(a.federation.rtts().contains_key("b"), "{:?}", a.federation.rtts());
    assert_eq!(b.federation.dials()[0].linked_site.as_deref(), Some("a"));
    // Newer summaries replace older ones.
    b.applied.store(21, Ordering::Relaxed);
    wait_until("the newer summary arrives", || {
        a.status_of("b") == Some((SiteStatus::Alive, 21))
    })
    .await;

    // Site b goes away: a keeps its last summary, marked unreachable.
    b.stop().await;
    wait_until("b is unreachable from a", || {
        a.status_of("b") == Some((SiteStatus::Unreachable, 21))
    })
    .await;

    // b comes back (same address book: it dials a again).
    let mut b = Running::start(config("b", 2, vec![a.addr()]), b_material, 30);
    wait_until("b is alive again", || a.status_of("b") == Some((SiteStatus::Alive, 30))).await;
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_expired_and_mislabelled_certificates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster_ca = ca(&dir.path().join("ca"));
    let other_ca = ca(&dir.path().join("other-ca"));
    let valid = || Validity::days(30).unwrap();
    let mut a = Running::start(
        config("a", 1, vec![]),
        material(&cluster_ca, dir.path(), "a1", "a", valid()),
        10,
    );

    // A certificate of another CA.
    let foreign = Running::start(
        config("c", 3, vec![a.addr()]),
        material(&other_ca, dir.path(), "c1", "c", valid()),
        1,
    );
    // An expired certificate of the right CA.
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        from: now - time::Duration::days(10),
        until: now - time::Duration::days(1),
    };
    let stale = Running::start(
        config("d", 4, vec![a.addr()]),
        material(&cluster_ca, dir.path(), "d1", "d", expired),
        1,
    );
    // A certificate for site x, from a node that says it is of site e.
    let mislabelled = Running::start(
        config("e", 5, vec![a.addr()]),
        material(&cluster_ca, dir.path(), "e1", "x", valid()),
        1,
    );
    // A node of a's own site on the federation port.
    let same_site = Running::start(
        config("a", 6, vec![a.addr()]),
        material(&cluster_ca, dir.path(), "a6", "a", valid()),
        1,
    );

    let mut refused = [foreign, stale, mislabelled, same_site];
    wait_until("every dialer saw its link fail", || {
        refused.iter().all(|r| r.dial_error().is_some())
    })
    .await;
    let errors: Vec<String> = refused.iter().map(|r| r.dial_error().unwrap()).collect();
    // Each refused end hears why.
    assert!(errors[0].contains("invalid peer certificate"), "{errors:?}");
    assert!(errors[1].contains("certificate expired"), "{errors:?}");
    assert!(errors[2].contains("certificate is for site \"x\""), "{errors:?}");
    assert!(errors[3].contains("own site"), "{errors:?}");
    assert!(a.federation.sites().is_empty(), "{:?}", a.federation.sites());
    for r in &mut refused {
        assert!(r.federation.sites().is_empty());
        r.stop().await;
    }
    a.stop().await;
}

/// Answers every forwarded call with its method and body reversed.
struct Echo;

impl ForwardHandler for Echo {
    fn serve(
        &self,
        from_site: &str,
        request: ForwardRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ForwardResponse> + Send>> {
        let message = format!("{from_site} asked {}", request.method);
        let body: Vec<u8> = request.body.iter().rev().copied().collect();
        Box::pin(async move {
            ForwardResponse {
                request_id: request.request_id,
                message,
                body: body.into(),
                ..ForwardResponse::default()
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_call_is_served_by_the_target_site_and_an_unknown_site_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let cluster_ca = ca(&dir.path().join("ca"));
    let valid = || Validity::days(30).unwrap();
    let mut a = Running::start(
        config("a", 1, vec![]),
        material(&cluster_ca, dir.path(), "a1", "a", valid()),
        1,
    );
    a.federation.serve_forwarded(std::sync::Arc::new(Echo));
    let mut b = Running::start(
        config("b", 2, vec![a.addr()]),
        material(&cluster_ca, dir.path(), "b1", "b", valid()),
        1,
    );
    wait_until("b hears a", || b.status_of("a").is_some()).await;
    let request = |site: &str| ForwardRequest {
        target_site: site.into(),
        origin_site: "b".into(),
        request_id: "r1".into(),
        method: "/cell0.v1.Kv/Get".into(),
        body: vec![1u8, 2, 3].into(),
        ..ForwardRequest::default()
    };
    let answer = b.federation.forward(request("a"), DEADLINE).await.unwrap();
    assert_eq!(answer.code, 0);
    assert_eq!(answer.request_id, "r1");
    assert_eq!(answer.message, "b asked /cell0.v1.Kv/Get");
    assert_eq!(&answer.body[..], &[3, 2, 1]);
    let err = b.federation.forward(request("c"), DEADLINE).await.unwrap_err();
    assert!(
        matches!(err, ForwardError::Unreachable { ref site, .. } if site == "c"),
        "{err}"
    );
    b.stop().await;
    a.stop().await;
}

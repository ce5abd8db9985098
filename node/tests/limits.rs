//! Rate limits per client address on the public port, with a real node:
//! an address over its budget gets RESOURCE_EXHAUSTED with the reason and
//! a retry hint, while another address keeps being served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::IpAddr;

use cell0_proto::v1::StatusRequest;
use cell0_proto::v1::cluster_client::ClusterClient;
use common::*;
use tonic::transport::Endpoint;

/// A Cluster client whose connection comes from `source`.
async fn client_from(endpoint: &str, source: IpAddr) -> ClusterClient<tonic::transport::Channel> {
    let channel = Endpoint::from_shared(format!("http://{endpoint}"))
        .unwrap()
        .local_address(Some(source))
        .connect()
        .await
        .unwrap();
    ClusterClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_rate_is_refused_while_another_is_served() {
    let root = tempfile::tempdir().unwrap();
    let ports = Ports::new();
    let flags = ["--bootstrap", "--client-rate", "1"].map(String::from).to_vec();
    let mut node = Node::start_flags("node1", &root.path().join("node1"), ports, flags, &[]);
    node.wait_ready();
    let endpoint = node.endpoint();
    let [a, b]: [IpAddr; 2] = [Ports::new().ip.into(), Ports::new().ip.into()];

    // One request per second, a burst of one: of ten quick requests from a
    // the first passes and later ones are refused (unless seconds pass
    // between them, which the count allows for).
    let mut from_a = client_from(&endpoint, a).await;
    let started = std::time::Instant::now();
    let mut refused = None;
    let mut passed = 0;
    for _ in 0..10 {
        match from_a.status(StatusRequest {}).await {
            Ok(_) => passed += 1,
            Err(s) => refused = Some(s),
        }
    }
    let allowed = 1 + started.elapsed().as_secs() as usize;
    assert!(passed <= allowed, "{passed} passed, at most {allowed} allowed");
    let status = refused.expect("no request was refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert!(status.message().contains("rate limit"), "{}", status.message());
    let details = tonic_types::StatusExt::get_error_details(&status);
    assert_eq!(details.error_info().unwrap().reason, "RATE_LIMITED");
    assert!(
        details.retry_info().and_then(|r| r.retry_delay).is_some(),
        "no retry hint"
    );

    // Another address has its own budget; health checks are never limited.
    let mut from_b = client_from(&endpoint, b).await;
    from_b.status(StatusRequest {}).await.unwrap();
    assert!(node.is_ready());
    node.sigterm();
}

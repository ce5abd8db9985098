//! Generated gRPC code for the subset of etcd v3.4's API the harness uses:
//! `etcdserverpb.KV` with `Range` and `Put`, `etcdserverpb.Maintenance`
//! with `Status` (which member leads, for `cell0-chaos failover`), and
//! `mvccpb.KeyValue`.
//!
//! The `.proto` files under `chaos/proto/` keep etcd's package names, message
//! names and field numbers, so requests are byte for byte what an etcd client
//! sends.

/// etcd's `etcdserverpb` package: the `KV` service (`Range`, `Put`) and
/// the `Maintenance` service (`Status`).
pub mod etcdserverpb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("etcdserverpb");
}

/// etcd's `mvccpb` package: `KeyValue`.
pub mod mvccpb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("mvccpb");
}

//! cell0-proto: the wire contract of Cell0.
//!
//! Generated from the `.proto` files next to this crate, which are the source
//! of truth for clients in every language. Besides generated code and the
//! descriptor set for gRPC reflection, only [`wire`] lives here: how every
//! gRPC connection's bytes are handed to HTTP/2.

pub mod wire;

/// Public API, package `cell0.v1`.
pub mod v1 {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("cell0.v1");
}

/// Node-to-node API, package `cell0.internal.v1`.
pub mod internal {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("cell0.internal.v1");
}

/// Site-to-site messages, package `cell0.federation.v1` (protobuf end to
/// end: sites upgrade independently).
pub mod federation {
    /// Version 1 of the site link messages.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("cell0.federation.v1");
    }
}

/// Encoded `FileDescriptorSet` of every Cell0 service, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cell0_descriptor.bin"));

//! Compiles the .proto files with protox (pure Rust, no protoc) and generates
//! tonic clients and servers plus the descriptor set for gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "cell0/v1/kv.proto",
        "cell0/v1/cluster.proto",
        "cell0/v1/inference.proto",
        "cell0/v1/models.proto",
        "cell0/v1/agents.proto",
        "cell0/v1/acl.proto",
        "cell0/v1/sites.proto",
        "cell0/internal/v1/raft.proto",
        "cell0/internal/v1/blobs.proto",
        "cell0/internal/v1/leases.proto",
        "cell0/federation/v1/federation.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("cell0_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}

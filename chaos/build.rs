//! Compiles the vendored etcd .proto subset (`proto/`) with protox (pure
//! Rust, no protoc) and generates tonic clients and servers, the same way as
//! the `cell0-proto` crate does for Cell0's own API.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["etcdserverpb/rpc.proto", "mvccpb/kv.proto"];
    for f in files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}

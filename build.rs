//! Generates the peer protocol's Rust types and gRPC service from `proto/ctsync.proto`.
//!
//! `protox` compiles the schema in pure Rust, so no `protoc` binary is needed on a developer
//! machine or in CI.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["ctsync.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}

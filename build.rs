//! Generates the peer protocol's Rust types and gRPC service from `proto/ctsync.proto`.
//!
//! `protox` compiles the schema in pure Rust, so no `protoc` binary is needed on a developer
//! machine or in CI.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["ctsync.proto"], ["proto"])?;
    // `bytes` fields as `Bytes` rather than `Vec<u8>`: tonic decodes from a `BytesMut`, so prost
    // then takes them out of the received buffer without an allocation each (IPv6 addresses,
    // labels). Measured with `examples/wire_cost.rs`.
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}

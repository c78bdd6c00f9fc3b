//! Compiles the .proto files with protox (pure Rust), so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/flotilla/v1/flotilla.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    // Small starting buffers per stream (see src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(descriptors)?;
    Ok(())
}

//! Generates the NRI, ttrpc and SPIRE message types from `proto/` at build time. `protox` parses
//! the files in Rust, so no `protoc` is needed on the machine.

use std::error::Error;

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");

    // NRI and ttrpc: messages only. ttrpc over NRI's multiplexed socket is framed by hand in
    // `ttrpc.rs`, so no service code is generated for them.
    let nri = protox::compile(["nri.proto", "ttrpc.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(nri)?;

    // SPIRE: a gRPC client for the agent, and a server for the test double.
    let types = protox::compile(["spire/types.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(types)?;
    let spire = protox::compile(["spire/delegatedidentity.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .extern_path(".spire.api.types", "crate::proto::spire_types")
        .build_server(true)
        .build_client(true)
        .compile_fds(spire)?;
    Ok(())
}

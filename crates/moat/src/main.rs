//! The `moat` command. All wiring lives in the library so tests can call it.

use std::process::ExitCode;

/// Reviews are allocation-heavy (JSON trees in, JSON out); glibc's allocator spent a fifth of the
/// server's CPU time in malloc and free under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // One TLS implementation for the server and the Kubernetes client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    moat::Args::parse_and_run()
}

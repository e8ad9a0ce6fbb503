//! The `moat` command. All wiring lives in the library so tests can call it.

use std::process::ExitCode;

fn main() -> ExitCode {
    // One TLS implementation for the server and the Kubernetes client.
    let _ = rustls::crypto::ring::default_provider().install_default();
    moat::Args::parse_and_run()
}

//! The `moat` command. All wiring lives in the library so tests can call it.

use std::process::ExitCode;

fn main() -> ExitCode {
    moat::Args::parse_and_run()
}

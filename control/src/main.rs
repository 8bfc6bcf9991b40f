//! `atoll`: the control plane CLI.
//!
//! The control plane (clouds, VMs, volumes, DNS, tokens, exposures) is tracked as its own issue;
//! this binary already exists so the workspace layout and install paths are final. Today it only
//! reports its version; the host-local demo lives in `atoll-agent demo`.

use clap::Parser;

/// atoll control plane CLI.
#[derive(Parser)]
#[command(version, about)]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    eprintln!("atoll: the control plane API is not available yet; see `atoll-agent --help`");
    std::process::exit(2);
}

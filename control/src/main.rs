//! `atoll`: the control plane CLI.
//!
//! Today it prices usage records (`atoll usage`); the control plane API (clouds, VMs, volumes,
//! DNS, tokens, exposures) is tracked as its own issue.

use std::path::PathBuf;

use anyhow::Result;
use atoll_control::usage::{focus_csv, parse_rfc3339, report, table, Prices};
use clap::{Parser, Subcommand, ValueEnum};

/// atoll control plane CLI.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Usage and cost per cloud for a period, from usage record files (CloudEvents JSON lines).
    Usage {
        /// Usage record files (the agent's file sink or journal); duplicates are ignored.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Price file (TOML): currency and per-GB prices per direction and class.
        #[arg(long)]
        prices: PathBuf,
        /// Start of the period (inclusive), RFC 3339 UTC.
        #[arg(long, default_value = "1970-01-01T00:00:00Z")]
        from: String,
        /// End of the period (exclusive), RFC 3339 UTC.
        #[arg(long, default_value = "9999-12-31T23:59:59Z")]
        to: String,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    /// FinOps FOCUS-style CSV.
    Focus,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("atoll: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    match Cli::parse().command {
        Cmd::Usage {
            files,
            prices,
            from,
            to,
            format,
        } => {
            let prices = Prices::load(&prices)?;
            let r = report(&files, &prices, parse_rfc3339(&from)?, parse_rfc3339(&to)?)?;
            print!(
                "{}",
                match format {
                    Format::Table => table(&r),
                    Format::Focus => focus_csv(&r),
                }
            );
            Ok(())
        }
    }
}

//! Diagnostics of atoll's services (`atoll serve`, `atoll-agent run`): `tracing` events with
//! structured fields (`cloud`, `vm`, `host`, `endpoint`, ...), filtered by `RUST_LOG`
//! (`info` when unset; e.g. `RUST_LOG=atoll_agent::converge=debug,info`).
//!
//! Decisions:
//! - **Diagnostics go to stderr; what a command produces goes to stdout.** Listings, JSON, the
//!   OpenAPI document, `doctor`'s report and a one-shot command's result stay plain `println!`
//!   output that scripts parse; every message about the service's own life (where it listens,
//!   what it adopted, what it refused, what failed) is an event.
//! - **journald-friendly**: under systemd (`JOURNAL_STREAM` is set for units whose stderr is
//!   the journal) events carry no timestamp (journald stamps each line) and no colours; colours
//!   only when stderr is a terminal.
//! - Libraries only emit events; the binaries call [`init`] once.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the process's subscriber: stderr, `RUST_LOG` (default `info`), no timestamps under
/// journald. An invalid `RUST_LOG` is reported and replaced by the default, never fatal.
pub fn init() {
    let (filter, invalid) = match std::env::var("RUST_LOG") {
        Ok(spec) => match EnvFilter::try_new(&spec) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some((spec, e))),
        },
        Err(_) => (EnvFilter::new("info"), None),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let set = if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
    if set.is_ok() {
        if let Some((spec, e)) = invalid {
            tracing::warn!(rust_log = %spec, "RUST_LOG is not a valid filter ({e}); logging at info");
        }
    }
}

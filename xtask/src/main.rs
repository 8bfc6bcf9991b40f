//! `cargo xtask`: atoll's developer and operator entry points.
//!
//! - `setup`: installs what a fresh Debian 12 host lacks (apt packages, bpf-linker built against
//!   LLVM 22) and mounts bpffs. Idempotent: checks first, so it is quick when all is present.
//! - `build`: release build of every crate (the agent's build script compiles the eBPF object).
//! - `demo`: setup + build + `atoll-agent demo` (the README's first command).
//! - `test`: setup, the guest image, formatting and clippy (`-D warnings`) on every crate (the
//!   eBPF crate also for its bpfel target), the whole test suite as root, a smoke run of the
//!   benchmarks and the demo (the README's second command; CI).
//! - `bench`: full benchmarks, written to docs/benchmarks.md.
//! - `image`: QEMU 7.2, the guest kernel and initramfs under /var/lib/atoll (docs/vm.md, "Guest
//!   image"). Cached: a rerun with unchanged inputs only probe-boots the result.
//! - `install` / `uninstall`: binaries, systemd units and default configs (see `install`).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod image;
mod install;

#[derive(Parser)]
#[command(about = "atoll build, test and setup tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and system packages atoll needs (Debian 12).
    Setup,
    /// Build all crates in release mode.
    Build,
    /// Set up, build, and run the two-cloud isolation demo.
    Demo,
    /// Set up, lint, and run every test (needs root).
    Test,
    /// Run the benchmarks and write docs/benchmarks.md (needs root).
    Bench,
    /// Build QEMU 7.2, the guest kernel and initramfs for microVMs (cached; needs root).
    Image,
    /// Build release binaries and install them with the systemd units and default configs.
    Install {
        /// Install under this directory instead of `/` (packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Install the binaries already in target/release.
        #[arg(long)]
        no_build: bool,
    },
    /// Remove what `install` wrote (edited configs and state are kept and listed).
    Uninstall {
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

/// Debian packages: the eBPF toolchain (Debian's rustc ships `core` for bpfel), LLVM 22 for
/// bpf-linker, and the network tools the tests and demo use.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    // Clippy for Debian's rustc: the only clippy that can check the bpfel target (it needs the
    // same compiler as the prebuilt `core`).
    "rust-web-clippy",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "pkg-config",
    "bpftool",
    "iproute2",
    "iputils-ping",
    // The multi-host store backend; the tests start it on loopback in a namespace.
    "etcd-server",
    // The benchmarks' baseline: taps on a Linux bridge isolated by nftables.
    "nftables",
    // The hostile VMM of the jail test (agent/tests/vm_jail.rs) is a Python script; the MCP
    // test's client is the official Python SDK, in a venv (`venv_with`); so is the FOCUS validator.
    "python3",
    "python3-venv",
    // systemd-analyze verifies the installed units (systemd need not run as PID 1).
    "systemd",
    // promtool (checks and unit-tests deploy/prometheus/; tests/tests/dashboards.rs).
    "prometheus",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build => build(),
        Cmd::Demo => {
            setup()?;
            build()?;
            run(Command::new("target/release/atoll-agent").arg("demo"))
        }
        Cmd::Test => test(),
        Cmd::Bench => {
            setup()?;
            require_root("benchmarks")?;
            run(cargo().args(["build", "--release", "-p", "atoll-tests", "--bin", "bench"]))?;
            run(Command::new("target/release/bench").args(["--out", "docs/benchmarks.md"]))
        }
        Cmd::Image => {
            require_root("guest image builds")?;
            image::image(&root)
        }
        Cmd::Install { root: to, no_build } => {
            if !no_build {
                run(cargo().args([
                    "build",
                    "--release",
                    "-p",
                    "atoll-agent",
                    "-p",
                    "atoll-control",
                ]))?;
            }
            install::install(&root, &to)
        }
        Cmd::Uninstall { root: from } => install::uninstall(&root, &from).map(drop),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ is in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn require_root(what: &str) -> Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("{what} need root (CAP_BPF, CAP_NET_ADMIN, network namespaces): run as root");
    }
    Ok(())
}

fn setup() -> Result<()> {
    require_root("setup, tests and benchmarks")?;
    apt_install(APT_PACKAGES)?;
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if linker_ok {
        eprintln!("xtask setup: bpf-linker {BPF_LINKER_VERSION} present");
    } else {
        // Both variables are needed: otherwise the build script finds the system's LLVM 14.
        run(cargo()
            .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
            ])
            .args(["--no-default-features", "--features", "llvm-22"]))?;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    for module in ["tun", "veth"] {
        // Built in on some kernels, modules on others; modprobe failing is fine if present.
        let _ = succeeds(Command::new("modprobe").arg(module));
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("/dev/net/tun is missing: the kernel lacks tun/tap support");
    }
    venv_with("mcp-venv", MCP_SDK)?;
    focus_validator()
}

/// The MCP test's client (control/tests/mcp.rs): the official Python SDK, pinned.
const MCP_SDK: (&str, &str) = ("mcp", "2.3.0");

/// A Python package, pinned, in its own venv `target/<dir>` (PyPI is reachable; nothing is
/// installed system-wide).
fn venv_with(dir: &str, (package, version): (&str, &str)) -> Result<()> {
    let venv = workspace_root().join("target").join(dir);
    let python = venv.join("bin/python");
    let present = Command::new(&python)
        .args([
            "-c",
            &format!("import importlib.metadata as m; print(m.version('{package}'))"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == version)
        .unwrap_or(false);
    if present {
        eprintln!(
            "xtask setup: {package}=={version} present in {}",
            venv.display()
        );
        return Ok(());
    }
    run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        &format!("{package}=={version}"),
    ]))
}

/// The FOCUS export tests' validator (control/src/focus.rs, the spend end-to-end test): the
/// FinOps Foundation's focus-validator and every package it pulls in, pinned as tested, in a
/// venv under `target/`. focus-validator 2.x (the first to check FOCUS 1.2) needs Python >=
/// 3.12, and its `numpy<2` has wheels up to 3.12 only, so the venv is made with a Python 3.12
/// (this machine kind's pyenv has one; Debian 12's is 3.11: ../shared/FACTS.md). pyarrow is
/// pinned below 22: newer ones refuse numpy < 2.
const FOCUS_VALIDATOR: &[&str] = &[
    "focus_validator==2.2.1",
    "annotated-types==0.8.0",
    "attrs==26.1.0",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "ddt==1.7.2",
    "duckdb==1.5.6",
    "graphviz==0.21",
    "idna==3.21",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "multimethod==2.0.2",
    "mypy_extensions==1.2.0",
    "numpy==1.26.4",
    "packaging==26.4",
    "pandas==2.3.3",
    "pandasql==0.7.3",
    "pandera==0.26.1",
    "polars==1.44.2",
    "polars-runtime-32==1.44.2",
    "pyarrow==21.0.0",
    "pydantic==2.14.4",
    "pydantic_core==2.50.5",
    "python-dateutil==4.0.0",
    "pytz==2025.2",
    "PyYAML==6.0.4",
    "referencing==0.37.0",
    "requests==2.34.2",
    "rpds-py==2026.9.1",
    "SQLAlchemy==2.1.9",
    "sqlglot==27.29.0",
    "tabulate==0.10.0",
    "typeguard==4.6.1",
    "typing-inspect==0.9.0",
    "typing-inspection==0.4.5",
    "typing_extensions==4.16.0",
    "tzdata==2026.6",
    "urllib3==2.8.0",
];

fn focus_validator() -> Result<()> {
    let venv = workspace_root().join("target/focus-venv");
    // Exactly the pinned set (as `pip freeze` spells it), or the venv is made anew.
    let present = Command::new(venv.join("bin/pip"))
        .arg("freeze")
        .output()
        .map(|o| {
            let have: std::collections::BTreeSet<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            o.status.success() && have == FOCUS_VALIDATOR.iter().map(|p| p.to_string()).collect()
        })
        .unwrap_or(false);
    if present {
        eprintln!(
            "xtask setup: {} present in {}",
            FOCUS_VALIDATOR[0],
            venv.display()
        );
        return Ok(());
    }
    let python = python312()?;
    if venv.exists() {
        std::fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    run(Command::new(&python).arg("-m").arg("venv").arg(&venv))?;
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet"])
        .args(FOCUS_VALIDATOR))
}

/// A Python 3.12: `python3.12` when it runs (a pyenv shim fails unless 3.12 is a global
/// version), else the newest 3.12 under pyenv's root.
fn python312() -> Result<PathBuf> {
    if let Ok(o) = Command::new("python3.12")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
    {
        if o.status.success() {
            return Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
        }
    }
    let root = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".pyenv")
        });
    let mut found: Vec<PathBuf> = std::fs::read_dir(root.join("versions"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("3.12."))
        .map(|e| e.path().join("bin/python3.12"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    match found.pop() {
        Some(p) => Ok(p),
        None => bail!(
            "focus-validator needs Python 3.12: no `python3.12` runs and {} has none",
            root.join("versions").display()
        ),
    }
}

/// Installs the Debian packages of `packages` that are not installed yet.
fn apt_install(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            let out = Command::new("dpkg-query").args(["-W", "-f=${Status}", p]).output();
            !matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: apt packages present ({} checked)", packages.len());
    } else {
        eprintln!("xtask: installing {}", missing.join(" "));
        run(Command::new("apt-get").args(["update", "-q"]))?;
        run(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            // Waits for another apt or dpkg (a concurrent CI run) instead of failing.
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
    }
    Ok(())
}

/// Clippy on the eBPF crate as the kernel gets it: Debian's toolchain for `bpfel-unknown-none`,
/// with the flags of `agent/build.rs`. `cargo-clippy` is called by its path: through `cargo`,
/// the subcommand would resolve to rustup's clippy, whose compiler cannot read Debian's
/// prebuilt `core`. Its own target directory keeps the checks from invalidating the build's.
fn clippy_bpf() -> Result<()> {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let root = workspace_root();
    run(Command::new("/usr/bin/cargo-clippy")
        .env_clear()
        .env("PATH", format!("{cargo_home}/bin:/usr/bin:/bin"))
        .env("HOME", &home)
        .env("CARGO_HOME", &cargo_home)
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_BOOTSTRAP", "1")
        .env("RUSTFLAGS", "--cfg=bpf_target_arch=\"x86_64\"")
        .current_dir(root.join("dataplane-ebpf"))
        .args(["clippy", "--release", "--target", "bpfel-unknown-none"])
        .arg("--target-dir")
        .arg(root.join("target/bpf-clippy"))
        .args(["--", "-D", "warnings"]))
}

fn build() -> Result<()> {
    run(cargo().args(["build", "--release", "--workspace"]))
}

/// The features that build the tests needing root (agent/Cargo.toml, control/Cargo.toml).
const ROOT_TESTS: &str = "atoll-agent/root-tests,atoll-control/root-tests";

fn test() -> Result<()> {
    setup()?;
    image::image(&workspace_root())?;
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The eBPF crate compiles for the host too, so clippy covers it with the rest; the kernel
    // build (`cfg(target_arch = "bpf")` code, the program entry points) is checked on its own.
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--features",
        ROOT_TESTS,
        "--",
        "-D",
        "warnings",
    ]))?;
    clippy_bpf()?;
    // The agent without its embedded control plane: the library and the remote-only binary
    // must not need `atoll-control` (see agent/Cargo.toml).
    run(cargo().args([
        "clippy",
        "-p",
        "atoll-agent",
        "--no-default-features",
        "--lib",
        "--bins",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "atoll-agent",
        "-p",
        "atoll-tests",
        "--bins",
    ]))?;
    // `root-tests`: the suites that need root and the kernel, left out of a plain `cargo test`.
    let (passed, failed) = run_counting_tests(cargo().args([
        "test",
        "--workspace",
        "--features",
        ROOT_TESTS,
        "--",
        "--test-threads=2",
    ]))?;
    if passed == 0 {
        bail!("cargo test ran no test");
    }
    without_root()?;
    run(Command::new("target/release/bench").arg("--smoke"))?;
    run(Command::new("target/release/atoll-agent").arg("demo"))?;
    leftovers()?;
    // One plain closing line for whoever reads the log last (CI counts it).
    println!("atoll: {passed} passed, {failed} failed");
    Ok(())
}

/// Runs `cargo test`, echoing its output, and sums the `test result:` lines of every test
/// binary. Fails if the command fails.
fn run_counting_tests(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status} ({passed} passed, {failed} failed)");
    }
    Ok((passed, failed))
}

/// What a plain `cargo test` builds (no `root-tests`), run without capabilities: the default
/// members' tests must pass without root (README, Tests), so none of them may start needing it
/// unnoticed.
fn without_root() -> Result<()> {
    let out = cargo()
        .args(["test", "--no-run"])
        .stderr(std::process::Stdio::piped())
        .output()
        .context("cargo test --no-run")?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("cargo test --no-run failed:\n{log}");
    }
    // `  Executable tests/cli.rs (target/debug/deps/cli-0123abcd)`
    let bins: Vec<PathBuf> = log
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Executable "))
        .filter_map(|l| l.rsplit_once(" (")?.1.strip_suffix(')'))
        .map(|p| workspace_root().join(p))
        .collect();
    if bins.is_empty() {
        bail!("cargo test --no-run named no test binary:\n{log}");
    }
    let (mut passed, mut failed) = (0, 0);
    for bin in &bins {
        // setpriv (util-linux): the same uid, but an empty bounding set and `noroot`, so the
        // binary runs without a single capability (no namespaces, no bpf, no raw sockets),
        // as an unprivileged user would, while still reading the checkout wherever it is.
        let (p, f) = run_counting_tests(
            Command::new("setpriv")
                .args([
                    "--bounding-set=-all",
                    "--inh-caps=-all",
                    "--securebits=+noroot,+noroot_locked",
                    "--no-new-privs",
                    "--",
                ])
                .arg(bin)
                .arg("--test-threads=2"),
        )?;
        passed += p;
        failed += f;
    }
    if passed == 0 {
        bail!("no test ran without root");
    }
    eprintln!("xtask: without root: {passed} passed, {failed} failed");
    Ok(())
}

/// Fails if anything with atoll's test prefix survived the tests.
fn leftovers() -> Result<()> {
    let mut left = Vec::new();
    let links = Command::new("ip").args(["-o", "link", "show"]).output()?;
    for line in String::from_utf8_lossy(&links.stdout).lines() {
        if let Some(name) = line.split(": ").nth(1) {
            if name.starts_with("atl") {
                left.push(format!("link {}", name.split('@').next().unwrap_or(name)));
            }
        }
    }
    let ns = Command::new("ip").args(["netns", "list"]).output()?;
    for line in String::from_utf8_lossy(&ns.stdout).lines() {
        if line.starts_with("atl") {
            left.push(format!("netns {line}"));
        }
    }
    for e in std::fs::read_dir("/sys/fs/bpf")
        .into_iter()
        .flatten()
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("atl") {
            left.push(format!("pin {}", e.path().display()));
        }
    }
    if !left.is_empty() {
        bail!("tests left behind: {}", left.join(", "));
    }
    eprintln!("xtask test: nothing left behind");
    Ok(())
}

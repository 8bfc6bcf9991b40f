//! Builds the eBPF object (`dataplane-ebpf`) so the agent can embed it.
//!
//! The eBPF crate needs Debian's rustc (it ships a prebuilt `core` for `bpfel-unknown-none`),
//! `bpf-linker` and a few flags; `cargo xtask setup` installs all of it. The nested cargo runs
//! with a cleared environment (the outer cargo's variables, such as clippy's wrapper, must not
//! leak in) and its own target directory.

use std::{env, path::PathBuf, process::Command};

const RUSTC: &str = "/usr/bin/rustc";
const CARGO: &str = "/usr/bin/cargo";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf();
    let ebpf_dir = root.join("dataplane-ebpf");
    for p in ["src", "Cargo.toml", "common/src", "common/Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=ATOLL_BPF_OBJECT");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("set by cargo"));
    let dest = out_dir.join("atoll-dataplane.o");

    // A prebuilt object (e.g. from a packaging step) short-circuits the nested build.
    if let Ok(prebuilt) = env::var("ATOLL_BPF_OBJECT") {
        std::fs::copy(&prebuilt, &dest)
            .unwrap_or_else(|e| panic!("copying ATOLL_BPF_OBJECT={prebuilt}: {e}"));
        // The baseline object is only used by benchmarks; an empty file makes them fail loudly.
        std::fs::write(out_dir.join("atoll-baseline.o"), b"").expect("writing OUT_DIR");
        return;
    }

    for tool in [RUSTC, CARGO] {
        if !std::path::Path::new(tool).exists() {
            panic!(
                "{tool} is missing: the eBPF toolchain is not installed; run `cargo xtask setup`"
            );
        }
    }
    let home = env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cargo_home = env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let path = format!(
        "{cargo_home}/bin:{}",
        env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
    );
    let target_dir = root.join("target").join("bpf");
    let status = Command::new(CARGO)
        .env_clear()
        .env("PATH", path)
        .env("HOME", &home)
        .env("CARGO_HOME", &cargo_home)
        .env("RUSTC", RUSTC)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\" -Cdebuginfo=2 -Clink-arg=--btf",
        )
        .current_dir(&ebpf_dir)
        .args([
            "build",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir)
        .status()
        .unwrap_or_else(|e| panic!("running {CARGO}: {e}"));
    if !status.success() {
        panic!("building the eBPF dataplane failed ({status}); is `cargo xtask setup` done?");
    }
    for (bin, file) in [
        ("atoll-dataplane", "atoll-dataplane.o"),
        ("atoll-baseline", "atoll-baseline.o"),
    ] {
        let built = target_dir.join("bpfel-unknown-none/release").join(bin);
        let dest = out_dir.join(file);
        std::fs::copy(&built, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", built.display()));
    }
}

//! `atoll-agent doctor` on this host, and the operator-facing errors and exit codes of
//! `atoll-agent run` (bad config, no bpffs). Needs root.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

mod support;

use atoll_agent::{config::DataplaneConfig, endpoint::Host, types::radix36};
use atoll_testbed::{unique_name, unique_prefix, LinksWithPrefix, PinRoot};
use support::{require_root, tap};

fn agent(config: &Path, args: &[&str]) -> (Output, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_atoll-agent"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("running atoll-agent");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Runs the doctor and returns its output; checks that nothing it made is left (its throwaway
/// devices and namespaces carry `atldr<its pid>`).
fn doctor(config: &Path) -> (Option<i32>, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_atoll-agent"))
        .arg("--config")
        .arg(config)
        .arg("doctor")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let theirs = format!("atldr{:0>5}", radix36(u64::from(child.id())));
    let out = child.wait_with_output().unwrap();
    let links = Command::new("ip").args(["-o", "link"]).output().unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(&theirs), "doctor left a device: {links}");
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(
        !netns.iter().any(|n| n.starts_with(&theirs)),
        "doctor left a namespace: {netns:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.stderr.is_empty(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), stdout)
}

fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| {
            l.get(6..)
                .is_some_and(|r| r.starts_with(&format!("{name} ")))
        })
        .unwrap_or_else(|| panic!("no {name} line in:\n{out}"))
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join(format!("{}.toml", unique_name("dk")));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn doctor_passes_its_required_checks_here_and_warns_of_full_maps() {
    require_root();
    let pins = PinRoot::new("dk");
    let _links = LinksWithPrefix(unique_prefix("dk"));
    let dp = DataplaneConfig {
        bpffs_root: pins.path().into(),
        max_endpoints: 2,
        max_routes: 4,
        tap_pool: 0,
        ..DataplaneConfig::default()
    };
    let mut host = Host::open(&dp).unwrap();
    for n in 2..4 {
        host.create_endpoint(&tap(&unique_name("dk"), 3, n))
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &format!(
            "[dataplane]\nbpffs_root = \"{}\"\nmax_endpoints = 2\nmax_routes = 4\n\
             [vm]\ndriver = \"none\"\n",
            pins.path().display()
        ),
    );
    let (code, out) = tokio::task::spawn_blocking(move || doctor(&config))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}");
    for name in [
        "kernel",
        "btf",
        "privileges",
        "bpffs",
        "bpffs_root",
        "programs",
        "tcx",
        "tun",
        "netns",
    ] {
        assert!(line(&out, name).starts_with("ok "), "{out}");
    }
    assert!(
        line(&out, "pins").contains("programs of this build"),
        "{out}"
    );
    for name in ["vmm", "image", "kvm"] {
        assert!(line(&out, name).starts_with("skip "), "{out}");
    }
    let capacity: Vec<&str> = out.lines().filter(|l| l.contains(" capacity ")).collect();
    assert_eq!(capacity.len(), 3, "{out}");
    assert!(
        capacity[0].starts_with("warn ")
            && capacity[0].contains("ENDPOINTS 2 of 2 entries (100%)")
            && capacity[0].contains("dataplane.max_endpoints"),
        "{out}"
    );
    assert!(
        capacity[1].starts_with("ok ") && capacity[1].contains("ROUTES 2 of 4 entries (50%)"),
        "{out}"
    );
    assert!(out.ends_with("all required checks passed\n"), "{out}");
    host.destroy().await.unwrap();
}

#[test]
fn doctor_checks_the_vmm_and_image_when_they_are_installed() {
    require_root();
    let defaults = atoll_agent::config::VmConfig::default();
    let qemu = defaults.qemu_root.join("usr/bin/qemu-system-x86_64");
    let image = defaults.images_dir.join(&defaults.default_image);
    if !qemu.is_file() || !image.join("vmlinux").is_file() {
        eprintln!("skipped: no VMM or guest image installed (cargo xtask image)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pins = PinRoot::new("dk");
    // The agent's KVM probe cache of this boot, if any, is what the doctor reports.
    let config = write(
        dir.path(),
        &format!("[dataplane]\nbpffs_root = \"{}\"\n", pins.path().display()),
    );
    let (code, out) = doctor(&config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        line(&out, "vmm").starts_with("ok    vmm        QEMU emulator version"),
        "{out}"
    );
    assert!(line(&out, "image").starts_with("ok "), "{out}");
    let kvm = line(&out, "kvm");
    assert!(
        kvm.starts_with("ok ")
            || kvm.contains("KVM present but cannot run guests: VMs will use TCG")
            || kvm.contains("no /dev/kvm: VMs will use TCG"),
        "{out}"
    );
}

#[test]
fn doctor_fails_with_fixes_for_a_bad_bpffs_root_and_missing_vmm() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-qemu");
    let config = write(
        dir.path(),
        &format!(
            "[dataplane]\nbpffs_root = \"{}\"\n[vm]\ndriver = \"qemu\"\nqemu_root = \"{}\"\n\
             images_dir = \"{}\"\nrun_dir = \"{}\"\n",
            dir.path().join("atoll").display(),
            missing.display(),
            dir.path().join("no-images").display(),
            dir.path().join("run").display(),
        ),
    );
    let (code, out) = doctor(&config);
    assert_eq!(code, Some(1), "{out}");
    let bpffs = line(&out, "bpffs_root");
    assert!(
        bpffs.starts_with("FAIL ")
            && bpffs.contains("is not on a bpffs")
            && bpffs.contains("fix: set dataplane.bpffs_root to a directory under /sys/fs/bpf"),
        "{out}"
    );
    let vmm = line(&out, "vmm");
    assert!(
        vmm.starts_with("FAIL ")
            && vmm.contains(&missing.display().to_string())
            && vmm.contains("fix: cargo xtask image"),
        "{out}"
    );
    let image = line(&out, "image");
    assert!(
        image.starts_with("FAIL ") && image.contains("fix: cargo xtask image"),
        "{out}"
    );
    // Checks that do not depend on the config still pass.
    assert!(line(&out, "tcx").starts_with("ok "), "{out}");
    assert!(out.ends_with("3 required checks failed\n"), "{out}");
}

#[test]
fn run_with_an_unknown_key_exits_2_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), "[dataplane]\nbpffs_rot = \"/sys/fs/bpf/x\"\n");
    for cmd in [&["run"][..], &["doctor"], &["migrate"]] {
        let (out, _, stderr) = agent(&config, cmd);
        assert_eq!(out.status.code(), Some(2), "{cmd:?}: {stderr}");
        assert!(stderr.contains("bpffs_rot"), "names the key: {stderr}");
        assert!(
            stderr.contains(&config.display().to_string()),
            "names the file: {stderr}"
        );
    }
    let (out, _, stderr) = agent(&dir.path().join("missing.toml"), &["run"]);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("missing.toml"), "{stderr}");
}

#[test]
fn run_outside_bpffs_is_a_clear_error() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("atoll");
    let config = write(
        dir.path(),
        &format!(
            "[dataplane]\nbpffs_root = \"{}\"\n[control]\nmode = \"off\"\n[vm]\n\
             driver = \"none\"\n[metrics]\nenabled = false\n[usage]\nenabled = false\n",
            root.display()
        ),
    );
    let (out, _, stderr) = agent(&config, &["run"]);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("is not on a bpffs")
            && stderr.contains("dataplane.bpffs_root")
            && stderr.contains("mount -t bpf bpf /sys/fs/bpf"),
        "{stderr}"
    );
    assert!(!root.exists(), "nothing was created outside bpffs");
}

/// The doctor's control check for a remote agent, against a real control plane on loopback:
/// its own token passes; another host's, a replaced one, a missing file and an unreachable
/// control plane fail with a fix; the operator token and a world-readable file warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_remote_control_link() {
    use atoll_agent::{
        config::AgentConfig,
        doctor::{control, Status},
    };
    use atoll_control::core::{Command as Cmd, Principal, Reply};
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let core = support::control_plane(dir.path()).await;
    let api = support::serve_api(core.clone()).await;
    let issue = |host: &str| {
        let core = core.clone();
        let host = host.to_string();
        async move {
            match core
                .execute(Principal::Operator, Cmd::IssueHostToken { host })
                .await
                .unwrap()
            {
                Reply::HostToken(t) => t.token,
                _ => panic!("no token"),
            }
        }
    };
    let token_file = dir.path().join("host.token");
    let mut cfg = AgentConfig::default();
    cfg.control.mode = atoll_agent::config::ControlMode::Remote;
    cfg.control.url = api.url.clone().into();
    cfg.control.ca_file = Some(api.ca_file.clone());
    cfg.control.host = Some("dh1".into());
    cfg.control.token_file = token_file.clone();
    let put = |text: &str, mode: u32| {
        std::fs::write(&token_file, text).unwrap();
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(mode)).unwrap();
    };

    let missing = control(&cfg).await;
    assert_eq!(missing.status, Status::Fail, "{missing}");
    assert!(
        missing.to_string().contains("atoll host token dh1"),
        "{missing}"
    );

    let first = issue("dh1").await;
    put(&first, 0o600);
    let good = control(&cfg).await;
    assert_eq!(good.status, Status::Ok, "{good}");

    put(&first, 0o644);
    let readable = control(&cfg).await;
    assert_eq!(readable.status, Status::Warn, "{readable}");
    assert!(readable.to_string().contains("chmod 600"), "{readable}");

    let other = issue("dh2").await;
    put(&other, 0o600);
    let wrong = control(&cfg).await;
    assert_eq!(wrong.status, Status::Fail, "{wrong}");
    assert!(wrong.to_string().contains("\"dh2\""), "{wrong}");

    let _rotated = issue("dh1").await;
    put(&first, 0o600);
    let replaced = control(&cfg).await;
    assert_eq!(replaced.status, Status::Fail, "{replaced}");
    assert!(replaced.to_string().contains("replaced"), "{replaced}");

    put(
        &std::fs::read_to_string(dir.path().join("operator.token")).unwrap(),
        0o600,
    );
    let operator = control(&cfg).await;
    assert_eq!(operator.status, Status::Warn, "{operator}");
    assert!(
        operator.to_string().contains("operator token"),
        "{operator}"
    );

    // A port nothing listens on any more.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    cfg.control.url = format!("http://{closed}").into();
    let unreachable = control(&cfg).await;
    assert_eq!(unreachable.status, Status::Fail, "{unreachable}");
    assert!(
        unreachable.to_string().contains("cannot sync"),
        "{unreachable}"
    );

    // Two control planes listed, one of which does not answer: a warning naming it, since
    // the agent uses the other.
    put(&issue("dh1").await, 0o600);
    cfg.control.url =
        atoll_agent::config::ControlUrls(vec![format!("http://{closed}"), api.url.clone()]);
    let one_down = control(&cfg).await;
    assert_eq!(one_down.status, Status::Warn, "{one_down}");
    assert!(
        one_down.to_string().contains(&closed.to_string())
            && one_down.to_string().contains("uses the others"),
        "{one_down}"
    );
}

//! The VMM jail against a hostile VMM: a process running as the VM's uid that plants links to a
//! canary file everywhere it can write (and tries where it cannot), forges pid records naming
//! another process, crashes, and is adopted by a restarted agent. The agent must never write,
//! chown or kill through anything the VMM controls (docs/design.md, "Trust boundaries").
//!
//! The "VMM" is a Python script run by a [`Driver`] of this test through the agent's own
//! supervisor, so it is started, jailed, restarted and adopted exactly as QEMU is.

mod support;

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::Duration,
};

use atoll_agent::{
    config::VmConfig,
    device::{delete_tap_now, Devices},
    types::MacAddr,
    vm::{qemu::Accel, Driver, VmError, VmEvent, VmManager, VmPlan, VmSpec, VmmCommand},
};
use atoll_control::model::VmState;
use atoll_testbed::unique_name;
use support::require_root;
use tokio::sync::mpsc;

const PYTHON: &str = "/usr/bin/python3";

/// Plants a link to the canary in every entry it can reach, tries to overwrite the agent's
/// records, forges pid records, then connects its console and says ready. `crash` exits at
/// once after that; `stay` keeps running.
const HOSTILE: &str = r#"
import os, socket, sys, time
console, shell, name, canary, forged, mode = sys.argv[1:7]
vmm = os.getcwd()
slot = os.path.dirname(vmm)
run = os.path.dirname(slot)
names = ["identity", "vmm.pid", "config.tar", "console.sock", "shell.sock", "vmm", "kvm-probe",
         "vmm.log", "console.log"]
for d in (vmm, slot, run):
    for n in names:
        p = os.path.join(d, n)
        try:
            if os.path.lexists(p) and not os.path.isdir(p):
                os.unlink(p)
            os.symlink(canary, p)
        except OSError:
            pass
for d in (slot, vmm):
    try:
        with open(os.path.join(d, "vmm.pid"), "w") as f:
            f.write(forged)
    except OSError:
        pass
for p in (slot, run):
    try:
        os.chmod(p, 0o777)
    except OSError:
        pass
s = socket.socket(socket.AF_UNIX)
s.connect(console)
s.sendall(b"atoll-guest: ready\n")
if mode == "crash":
    sys.exit(3)
time.sleep(3600)
"#;

/// Runs [`HOSTILE`]: the first launch crashes, later ones stay.
struct Hostile {
    canary: PathBuf,
    forged: String,
    launches: AtomicU32,
}

impl Driver for Hostile {
    fn command(&self, plan: &VmPlan) -> VmmCommand {
        let n = self.launches.fetch_add(1, Ordering::SeqCst);
        let mode = if n == 0 { "crash" } else { "stay" };
        VmmCommand {
            program: PYTHON.into(),
            args: vec![
                "-c".into(),
                HOSTILE.into(),
                plan.console_socket.clone().into(),
                plan.shell_socket.clone().into(),
                // The name on the command line, as QEMU's `-name` carries it.
                format!("{},debug-threads=off", plan.name).into(),
                self.canary.clone().into(),
                self.forged.clone().into(),
                mode.into(),
            ],
            env: vec![],
        }
    }

    fn accel(&self, _kernel: &Path, _initrd: &Path) -> Result<Accel, VmError> {
        Ok(Accel::Tcg)
    }

    fn check(&self) -> Result<(), VmError> {
        Ok(())
    }

    fn program(&self) -> PathBuf {
        PYTHON.into()
    }
}

/// A persistent tap, deleted on drop.
struct Tap(String);

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = delete_tap_now(&self.0);
    }
}

/// A process the forged records name; killed on drop.
struct Victim(std::process::Child);

impl Victim {
    fn alive(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills every process of a VM uid on drop, so a failing test leaves no hostile VMM behind.
struct KillUid(u32);

impl Drop for KillUid {
    fn drop(&mut self) {
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if e.metadata().is_ok_and(|m| m.uid() == self.0) {
                // SAFETY: kill(2) with a pid and a signal number; no memory is passed.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

async fn next_state(
    rx: &mut mpsc::UnboundedReceiver<VmEvent>,
    want: VmState,
    restarts: u32,
) -> VmEvent {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {want:?} event within 60 s"))
            .expect("the supervisor's channel stays open");
        assert_ne!(ev.state, VmState::Failed, "{ev:?}");
        if ev.state == want && ev.restarts == restarts {
            return ev;
        }
    }
}

fn canary_state(p: &Path) -> (String, u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (
        std::fs::read_to_string(p).unwrap(),
        m.uid(),
        m.gid(),
        m.mode() & 0o7777,
    )
}

fn recorded_pid(slot_dir: &Path) -> u32 {
    let text = std::fs::read_to_string(slot_dir.join("vmm.pid")).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_vmm_cannot_steer_the_agent() {
    require_root();
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is missing (cargo xtask setup installs it)"
    );
    let top = tempfile::tempdir().unwrap();
    // The VMM's uid must traverse to its runtime directory and reach the canary.
    std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let canary = top.path().join("canary");
    std::fs::write(&canary, "untouched\n").unwrap();
    std::fs::set_permissions(&canary, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = canary_state(&canary);

    let images = top.path().join("images");
    std::fs::create_dir_all(images.join("default")).unwrap();
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        std::fs::write(images.join("default").join(f), "").unwrap();
    }
    let run_dir = top.path().join("run");
    let uid_base = 2_100_000_000 + (std::process::id() % 1000) * 1000;
    let cfg = VmConfig {
        images_dir: images,
        run_dir: run_dir.clone(),
        state_dir: top.path().join("state"),
        uid_base,
        ..VmConfig::default()
    };

    let tap = Tap(unique_name("atlj"));
    Devices::new().unwrap().create_tap(&tap.0, None).unwrap();
    let slot = 7;
    let uid = uid_base + slot;
    let _vmms = KillUid(uid);
    let spec = VmSpec {
        key: (1, "web".into()),
        fqdn: "web.c1.atoll.internal.".into(),
        zone: "c1.atoll.internal.".into(),
        ipv4: "10.0.0.2".parse().unwrap(),
        gateway: "10.0.0.1".parse().unwrap(),
        mac: MacAddr::local(2),
        vcpus: 1,
        memory_mib: 64,
        tap: tap.0.clone(),
        slot,
        volumes: vec![],
        image: "default".into(),
        kernel: None,
        user_data: Some("secret tenant data".into()),
    };

    // A runtime directory of the older layout, owned by the VM's uid, as a hostile VMM left it:
    // records naming another process (with its real start time, and this VM's identity) and
    // links to the canary where the agent used to write.
    let mut victim = Victim(
        std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .unwrap(),
    );
    let forged = format!("{} {}\n", victim.0.id(), start_time(victim.0.id()));
    let slot_dir = run_dir.join(format!("s{slot}"));
    std::fs::create_dir_all(&slot_dir).unwrap();
    std::fs::write(slot_dir.join("vmm.pid"), &forged).unwrap();
    std::fs::write(
        slot_dir.join("identity"),
        format!("1 web 10.0.0.2 {}\n", tap.0),
    )
    .unwrap();
    for n in ["config.tar", "console.sock"] {
        std::os::unix::fs::symlink(&canary, slot_dir.join(n)).unwrap();
    }
    std::os::unix::fs::chown(&slot_dir, Some(uid), Some(uid)).unwrap();

    let driver = Arc::new(Hostile {
        canary: canary.clone(),
        forged: forged.clone(),
        launches: AtomicU32::new(0),
    });
    let (mut vms, mut rx) = VmManager::with_driver(cfg.clone(), driver.clone());
    vms.start(spec.clone());
    // Launch (refusing the forged records), crash, restart: all through planted links.
    next_state(&mut rx, VmState::Running, 0).await;
    next_state(&mut rx, VmState::Crashed, 1).await;
    next_state(&mut rx, VmState::Running, 1).await;
    assert_eq!(driver.launches.load(Ordering::SeqCst), 2);
    assert!(
        victim.alive(),
        "the process the forged record named was killed"
    );
    let vmm = recorded_pid(&slot_dir);
    assert_ne!(vmm, victim.0.id(), "the forged record was adopted");
    let status = std::fs::read_to_string(format!("/proc/{vmm}/status")).unwrap();
    assert!(
        status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")),
        "{status}"
    );

    // The agent restarts: the VMM runs on and is adopted by facts only root could record.
    vms.detach();
    let (mut vms, mut rx) = VmManager::with_driver(cfg.clone(), driver.clone());
    vms.start(spec.clone());
    let ev = next_state(&mut rx, VmState::Running, 0).await;
    assert_eq!(ev.boot_ms, None, "adopted, not booted again: {ev:?}");
    assert_eq!(driver.launches.load(Ordering::SeqCst), 2, "no second VMM");
    assert_eq!(recorded_pid(&slot_dir), vmm);

    // Another VM in the same slot: the agent kills the recorded VMM (it is the slot's), and
    // only it.
    let (mut other_vms, mut other_rx) = {
        vms.detach();
        VmManager::with_driver(cfg.clone(), driver.clone())
    };
    let other = VmSpec {
        key: (2, "db".into()),
        ..spec.clone()
    };
    other_vms.start(other.clone());
    next_state(&mut other_rx, VmState::Running, 0).await;
    assert_eq!(driver.launches.load(Ordering::SeqCst), 3);
    assert!(
        !Path::new(&format!("/proc/{vmm}")).exists()
            || std::fs::read_to_string(format!("/proc/{vmm}/status"))
                .is_ok_and(|s| s.contains("State:\tZ")),
        "the slot's previous VMM still runs"
    );
    other_vms.kill(&other.key).await;

    assert!(
        victim.alive(),
        "the process the forged record named was killed"
    );
    assert_eq!(
        canary_state(&canary),
        before,
        "the canary was written or chowned"
    );
    // Nothing the agent keeps for the VM is a link or the VMM's.
    for n in ["identity", "config.tar", "console.sock"] {
        let m = std::fs::symlink_metadata(slot_dir.join(n)).unwrap();
        assert!(!m.file_type().is_symlink(), "{n} is a link");
        assert_eq!(m.uid(), 0, "{n}");
    }
    let m = std::fs::symlink_metadata(&slot_dir).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, uid, 0o710));
    assert_eq!(
        std::fs::symlink_metadata(&run_dir).unwrap().mode() & 0o7777,
        0o711
    );
}

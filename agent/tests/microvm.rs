//! Real microVMs, end to end: the agent binary with its embedded control plane boots VMs
//! created through the API as QEMU microvms on their taps (TCG here: this host's KVM cannot
//! run stock guests), with their volumes and their cloud's DNS. Commands run inside the
//! guests over their control shell (`hvc0`, a unix socket on the host).
//!
//! Two VMs in cloud A and one in cloud B: A1 reaches A2 by name (ping, TCP), B reaches
//! neither (addresses and names), A1 reaches a service B exposes and grants to A through its
//! VIP and its name, a volume written in A1 survives a stop and start, a killed VMM is
//! reported crashed and restarted, each VMM runs unprivileged, and the kernel's counters match
//! the traffic on both sides. Needs root and `cargo xtask image`.

use atoll_api::Command;
use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

mod support;

use atoll_agent::{
    common::{Direction, TrafficClass, TrafficCounter},
    config::DataplaneConfig,
    metrics::Exporter,
};
use atoll_control::{
    client::{Client, ClientError},
    model::*,
};
use serde_json::{json, Value};
use support::{require_root, EmbeddedAgent};

const IMAGE: &str = "/var/lib/atoll/images/default";
const QEMU: &str = "/var/lib/atoll/vmm/qemu-7.2/usr/bin/qemu-system-x86_64";

/// The guest's control shell: one command at a time, its output and exit status.
struct Shell {
    sock: UnixStream,
    n: u32,
    name: String,
}

impl Shell {
    fn connect(path: &Path, name: &str) -> Shell {
        let deadline = Instant::now() + Duration::from_secs(30);
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "{name}: shell {path:?}: {e}");
                    // The socket appears when QEMU starts; there is no event to wait on.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        let mut sh = Shell {
            sock,
            n: 0,
            name: name.into(),
        };
        // The first command also proves the shell answers.
        sh.run("stty -echo 2>/dev/null; true", Duration::from_secs(30));
        sh
    }

    /// Runs `cmd` in the guest; returns its exit status and output.
    fn run(&mut self, cmd: &str, timeout: Duration) -> (i32, String) {
        self.n += 1;
        let n = self.n;
        let line = format!("echo __B{n}; {{ {cmd} ; }} 2>&1; echo __E{n}:$?\n");
        self.sock.write_all(line.as_bytes()).unwrap();
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{}: `{cmd}` did not finish in {timeout:?}; got {:?}",
                self.name,
                String::from_utf8_lossy(&got)
            );
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.read(&mut buf) {
                Ok(0) => panic!("{}: shell closed", self.name),
                Ok(k) => got.extend_from_slice(&buf[..k]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => continue,
                Err(e) => panic!("{}: shell: {e}", self.name),
            }
            let text = String::from_utf8_lossy(&got).replace('\r', "");
            // Only lines that end in the markers count (after the shell's prompt); an echo of
            // the command line would hold them unexpanded and followed by more.
            let lines: Vec<&str> = text.lines().collect();
            let begin = format!("__B{n}");
            let Some(b) = lines.iter().position(|l| l.ends_with(&begin)) else {
                continue;
            };
            let end = format!("__E{n}:");
            let rc_of = |l: &str| {
                l.rsplit_once(&end)
                    .and_then(|(_, rc)| rc.parse::<i32>().ok())
            };
            if let Some(e) = lines[b + 1..].iter().position(|l| rc_of(l).is_some()) {
                let rc = rc_of(lines[b + 1 + e]).unwrap();
                let out = lines[b + 1..b + 1 + e].join("\n");
                return (rc, out);
            }
        }
    }

    fn ok(&mut self, cmd: &str) -> String {
        let (rc, out) = self.run(cmd, Duration::from_secs(60));
        assert_eq!(rc, 0, "{}: `{cmd}` failed: {out}", self.name);
        out
    }
}

/// The runtime directory of VM `vm` of cloud `cloud`: it records the VM's identity.
fn vm_dir(run_dir: &Path, cloud: CloudId, vm: &str) -> PathBuf {
    for e in std::fs::read_dir(run_dir).unwrap().flatten() {
        let id = std::fs::read_to_string(e.path().join("identity")).unwrap_or_default();
        let mut f = id.split_whitespace();
        if f.next() == Some(&cloud.get().to_string()) && f.next() == Some(vm) {
            return e.path();
        }
    }
    panic!("no runtime directory for {cloud}/{vm} under {run_dir:?}");
}

/// The operator shell socket QEMU listens on, in the VMM's own directory.
fn shell_path(run_dir: &Path, cloud: CloudId, vm: &str) -> PathBuf {
    vm_dir(run_dir, cloud, vm).join("vmm/shell.sock")
}

async fn get_vm(c: &Client, cloud: CloudId, vm: &str) -> Vm {
    c.run(&Command::GetVm {
        cloud,
        vm: vm.to_string(),
    })
    .await
    .unwrap()
}

/// Polls the API until the VM's status satisfies `want` (the API has no watch on VMs).
async fn wait_state(c: &Client, cloud: CloudId, vm: &str, want: VmState) -> VmStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = get_vm(c, cloud, vm).await;
        let st = v.status.expect("status");
        if st.state == want {
            return st;
        }
        assert!(
            st.state != VmState::Failed,
            "{vm} failed: {:?}\nconsole:\n{}",
            st.message,
            console(c, cloud, vm).await
        );
        assert!(
            Instant::now() < deadline,
            "{vm} not {want:?} within 120 s: {st:?}\nconsole:\n{}",
            console(c, cloud, vm).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn console(c: &Client, cloud: CloudId, vm: &str) -> String {
    let r: Result<Console, _> = c
        .run(&Command::GetConsole {
            cloud,
            vm: vm.to_string(),
        })
        .await;
    r.map(|c| c.text).unwrap_or_else(|e| format!("({e})"))
}

fn counter(
    exporter: &Exporter,
    device: &str,
    dir: Direction,
    class: TrafficClass,
) -> TrafficCounter {
    let snap = exporter.snapshot().unwrap();
    let ep = snap
        .endpoints
        .iter()
        .find(|e| e.name.as_deref() == Some(device))
        .unwrap_or_else(|| panic!("no endpoint {device}"));
    ep.counters.traffic[dir as usize][class as usize]
}

/// What `from` sent and `to` received in `class`, once the traffic between them has stopped:
/// the two counters are read from one snapshot, which itself reads endpoints one after the
/// other, so a frame still in flight (a TCP teardown after `nc` exits, slow under TCG) could
/// land between the two reads.
fn paired(
    exporter: &Exporter,
    from: &str,
    to: &str,
    class: TrafficClass,
) -> (TrafficCounter, TrafficCounter) {
    support::settled(|| {
        let snap = exporter.snapshot().unwrap();
        let of = |device: &str, dir: Direction| {
            snap.endpoints
                .iter()
                .find(|e| e.name.as_deref() == Some(device))
                .unwrap_or_else(|| panic!("no endpoint {device}"))
                .counters
                .traffic[dir as usize][class as usize]
        };
        (of(from, Direction::FromGuest), of(to, Direction::ToGuest))
    })
}

/// Fields of `/proc/<pid>/status`.
fn proc_status(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    tree(dir).into_iter().filter(|p| !p.is_dir()).collect()
}

/// Everything under `dir`, directories included (links are not followed).
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(tree(&p));
        }
        out.push(p);
    }
    out
}

/// `(uid, gid, permission bits)` of `p` itself (a link is not followed).
fn owner_mode(p: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn vmm_pid(run_dir: &Path, cloud: CloudId, vm: &str) -> u32 {
    let dir = vm_dir(run_dir, cloud, vm);
    let pid = std::fs::read_to_string(dir.join("vmm.pid")).unwrap_or_else(|e| {
        let listing: Vec<String> = std::fs::read_dir(run_dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let files: Vec<String> = std::fs::read_dir(e.path())
                    .map(|d| {
                        d.flatten()
                            .map(|f| f.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let id = std::fs::read_to_string(e.path().join("identity")).unwrap_or_default();
                format!("{}: {:?} {files:?}", e.path().display(), id.trim())
            })
            .collect();
        let mut logs = String::new();
        let state = run_dir.parent().unwrap().join("state");
        for d in walk(&state) {
            if d.to_string_lossy().contains(vm) {
                let text = std::fs::read_to_string(&d).unwrap_or_default();
                let tail: String = text
                    .chars()
                    .rev()
                    .take(1500)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                logs.push_str(&format!("\n--- {}:\n{tail}", d.display()));
            }
        }
        panic!(
            "no vmm.pid for {cloud}/{vm} beside {}: {e}; run dir: {listing:#?}{logs}",
            dir.display()
        )
    });
    pid.split_whitespace().next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn microvms_boot_resolve_isolate_expose_persist_and_meter() {
    require_root();
    for p in [
        format!("{IMAGE}/vmlinux"),
        format!("{IMAGE}/initramfs.cpio.gz"),
        QEMU.into(),
    ] {
        assert!(
            Path::new(&p).exists(),
            "{p} is missing: run `cargo xtask image` (cargo xtask test does)"
        );
    }
    let vmdir = tempfile::tempdir().unwrap();
    let run_dir = vmdir.path().join("run");
    let mut agent = EmbeddedAgent::start(
        "mv",
        &format!(
            "[vm]\ndriver = \"qemu\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nstop_timeout_secs = 20\n\
             [usage]\njournal_dir = \"{}\"\ninterval_secs = 1\nfile_sink = \"{}\"\n",
            run_dir.display(),
            vmdir.path().join("state").display(),
            vmdir.path().join("usage").display(),
            vmdir.path().join("records.jsonl").display(),
        ),
    );
    let op = agent.client(&agent.token);
    let a: CreatedCloud = op
        .run(&Command::CreateCloud {
            spec: serde_json::from_value(json!({"name": "alpha"})).unwrap(),
        })
        .await
        .unwrap();
    // B's range is apart from A's, so B trying A's addresses is a cross-cloud attempt, not a
    // packet to a B address that happens to be the same.
    let b: CreatedCloud = op
        .run(&Command::CreateCloud {
            spec: serde_json::from_value(json!({"name": "beta", "cidr": "10.1.0.0/16"})).unwrap(),
        })
        .await
        .unwrap();
    let (ac, bc) = (agent.client(&a.token), agent.client(&b.token));
    let (aid, bid) = (a.cloud.id, b.cloud.id);
    let _: Volume = ac
        .run(&Command::CreateVolume {
            cloud: aid,
            spec: serde_json::from_value(json!({"name": "data", "size_gib": 1})).unwrap(),
        })
        .await
        .unwrap();
    // busybox nc: `-ll -e PROG` is a persistent server, PROG run per connection.
    let echo = "nc -ll -p 7000 -e cat &";
    let web = "printf '#!/bin/sh\\necho hello-from-b1\\n' >/root/web && chmod +x /root/web \
               && nc -ll -p 8080 -e /root/web &";
    let create = |c: &Client, cloud: CloudId, body: Value| {
        let c = c.clone();
        async move {
            let v: Vm = c
                .run(&Command::CreateVm {
                    cloud,
                    spec: serde_json::from_value(body.clone()).unwrap(),
                })
                .await
                .unwrap();
            v
        }
    };
    let a1 = create(
        &ac,
        aid,
        json!({"name": "a1", "memory_mib": 64, "volumes": ["data"]}),
    )
    .await;
    let a2 = create(
        &ac,
        aid,
        json!({"name": "a2", "memory_mib": 64, "user_data": echo}),
    )
    .await;
    let b1 = create(
        &bc,
        bid,
        json!({"name": "b1", "memory_mib": 64, "user_data": web}),
    )
    .await;
    // The accelerator is the KVM probe's verdict, cached per host boot (TCG on a host whose
    // /dev/kvm cannot run the guest, as on the machine these tests were written on).
    let mut boot = Vec::new();
    let mut accel = None;
    for (c, cloud, vm) in [(&ac, aid, "a1"), (&ac, aid, "a2"), (&bc, bid, "b1")] {
        let st = wait_state(c, cloud, vm, VmState::Running).await;
        let probe = std::fs::read_to_string(run_dir.join("kvm-probe")).unwrap_or_default();
        let want = match probe.lines().nth(1) {
            Some("kvm") => "kvm",
            _ => "tcg",
        };
        assert_eq!(st.accel.as_deref(), Some(want), "{vm}: {st:?}");
        accel = Some(want);
        boot.push(st.boot_ms.expect("boot time measured"));
    }
    eprintln!("boot to ready under {accel:?} (ms): {boot:?}");

    // Each VMM runs as its own unprivileged uid, with no capabilities, no_new_privs and seccomp.
    let pids: Vec<u32> = [(aid, "a1"), (aid, "a2"), (bid, "b1")]
        .iter()
        .map(|(c, v)| vmm_pid(&run_dir, *c, v))
        .collect();
    let mut uids = Vec::new();
    for &pid in &pids {
        let uid = proc_status(pid, "Uid");
        let first: u32 = uid.split_whitespace().next().unwrap().parse().unwrap();
        assert!(first >= 2_000_000_000, "VMM {pid} runs as {uid}");
        assert!(
            uid.split_whitespace().all(|u| u == first.to_string()),
            "{uid}"
        );
        assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
        assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
        assert_eq!(proc_status(pid, "Seccomp"), "2");
        // Under KVM a VMM also holds /dev/kvm's group, and nothing else.
        let groups = match accel {
            Some("kvm") => {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata("/dev/kvm").unwrap().gid().to_string()
            }
            _ => String::new(),
        };
        assert_eq!(proc_status(pid, "Groups"), groups);
        uids.push(first);
    }
    uids.sort();
    uids.dedup();
    assert_eq!(uids.len(), 3, "one uid per VM");

    // The jail: each VMM can write only its own `vmm/`; everything the agent keeps for a VM is
    // root's. And the agent, started under umask 000, created nothing others can read or write.
    for (c, v) in [(aid, "a1"), (aid, "a2"), (bid, "b1")] {
        let dir = vm_dir(&run_dir, c, v);
        let pid = vmm_pid(&run_dir, c, v);
        let uid: u32 = proc_status(pid, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(owner_mode(&dir), (0, uid, 0o710), "{}", dir.display());
        assert_eq!(owner_mode(&dir.join("vmm")), (uid, uid, 0o700));
        assert_eq!(owner_mode(&dir.join("console.sock")), (0, uid, 0o660));
        for record in ["identity", "vmm.pid", "config.tar"] {
            assert_eq!(owner_mode(&dir.join(record)), (0, 0, 0o600), "{record}");
        }
    }
    assert_eq!(owner_mode(&run_dir).2, 0o711);
    let journal = vmdir.path().join("usage");
    let sink = vmdir.path().join("records.jsonl");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sink.exists() {
        assert!(Instant::now() < deadline, "no usage delivered to {sink:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut checked = 0;
    for top in [
        vmdir.path().join("state"),
        journal,
        sink,
        agent.dir.path().join("volumes"),
        agent.dir.path().join("control.db"),
        agent.dir.path().join("control.db-wal"),
        agent.dir.path().join("op.token"),
    ] {
        for p in std::iter::once(top.clone()).chain(tree(&top)) {
            let mode = owner_mode(&p).2;
            assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", p.display());
            checked += 1;
        }
    }
    assert!(checked > 10, "only {checked} paths checked");

    let mut sa1 = Shell::connect(&shell_path(&run_dir, aid, "a1"), "a1");
    let mut sb1 = Shell::connect(&shell_path(&run_dir, bid, "b1"), "b1");
    // The guest configured itself from the config drive.
    assert_eq!(sa1.ok("hostname"), "a1");
    assert!(sa1
        .ok("ip -4 addr show dev eth0")
        .contains(&format!("{}/32", a1.ipv4)));
    assert!(sa1
        .ok("cat /etc/resolv.conf")
        .contains(&format!("nameserver {}", a.cloud.gateway)));

    // A1 reaches A2 by name: DNS, ping and a TCP exchange.
    let looked = sa1.ok("nslookup a2");
    assert!(looked.contains(&a2.ipv4.to_string()), "{looked}");
    sa1.ok("ping -c 2 -W 2 a2");
    let out = sa1.ok("echo over-tcp | nc -w 3 a2 7000");
    assert!(out.contains("over-tcp"), "{out}");

    // Exactly measured intra-cloud traffic: 10 echo requests of 100 data bytes each way.
    let exporter = Exporter::open(&DataplaneConfig {
        bpffs_root: agent.pins_path().to_path_buf(),
        ..DataplaneConfig::default()
    })
    .unwrap();
    let a1_dev = get_vm(&ac, aid, "a1").await.status.unwrap().device.unwrap();
    let a2_dev = get_vm(&ac, aid, "a2").await.status.unwrap().device.unwrap();
    let b1_dev = get_vm(&bc, bid, "b1").await.status.unwrap().device.unwrap();
    let intra = TrafficClass::IntraCloud;
    let before = (
        counter(&exporter, &a1_dev, Direction::FromGuest, intra),
        counter(&exporter, &a2_dev, Direction::ToGuest, intra),
    );
    sa1.ok(&format!("ping -c 10 -i 0.2 -s 100 -W 2 {}", a2.ipv4));
    let after = (
        counter(&exporter, &a1_dev, Direction::FromGuest, intra),
        counter(&exporter, &a2_dev, Direction::ToGuest, intra),
    );
    // 14 Ethernet + 20 IPv4 + 8 ICMP + 100 bytes per frame.
    for (b, a) in [(before.0, after.0), (before.1, after.1)] {
        assert_eq!(a.packets - b.packets, 10, "{b:?} -> {a:?}");
        assert_eq!(a.bytes - b.bytes, 10 * 142, "{b:?} -> {a:?}");
    }

    // B reaches neither A VM: not their addresses, not their names.
    for ip in [a1.ipv4, a2.ipv4] {
        let (rc, out) = sb1.run(&format!("ping -c 1 -W 1 {ip}"), Duration::from_secs(20));
        assert_ne!(rc, 0, "b1 reached {ip}: {out}");
    }
    let (rc, out) = sb1.run(
        &format!("echo x | nc -w 2 {} 7000", a2.ipv4),
        Duration::from_secs(20),
    );
    assert!(rc != 0 || !out.contains('x'), "b1 reached a2:7000: {out}");
    let (rc, out) = sb1.run(&format!("nslookup {}", a2.fqdn), Duration::from_secs(20));
    assert!(
        rc != 0 && !out.contains(&a2.ipv4.to_string()),
        "b1 resolved a2: {out}"
    );

    // B exposes its web service and offers it to A, A accepts: A1 reaches it by VIP and by name.
    let _: Exposure = bc
        .run(&Command::CreateExposure {
            cloud: bid,
            spec: serde_json::from_value(json!({"name": "web", "protocol": "tcp", "port": 80,
                         "backends": [{"vm": "b1", "port": 8080}]}))
            .unwrap(),
        })
        .await
        .unwrap();
    let _: Offer = bc
        .run(&Command::CreateGrant {
            cloud: bid,
            exposure: "web".to_string(),
            spec: serde_json::from_value(json!({"consumer": aid.to_string()})).unwrap(),
        })
        .await
        .unwrap();
    // A consents: its VIP and name exist from here on.
    let grant: Grant = ac
        .run(&Command::AcceptOffer {
            cloud: aid,
            provider: bid,
            exposure: "web".to_string(),
        })
        .await
        .unwrap();
    let exp = TrafficClass::Exposure;
    let before = paired(&exporter, &a1_dev, &b1_dev, exp);
    // The grant reaches the host through the next sync; the first try may race it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out) = sa1.run(
            &format!("nc -w 3 {} 80 </dev/null", grant.vip),
            Duration::from_secs(20),
        );
        if out.contains("hello-from-b1") {
            break;
        }
        assert!(Instant::now() < deadline, "a1 never reached the VIP: {out}");
    }
    let name = grant.fqdn.trim_end_matches('.');
    let out = sa1.ok(&format!("nc -w 3 {name} 80 </dev/null"));
    assert!(out.contains("hello-from-b1"), "by name {name}: {out}");
    // The provider's side metered what the consumer's sent, frame for frame.
    let after = paired(&exporter, &a1_dev, &b1_dev, exp);
    let sent = after.0.packets - before.0.packets;
    assert!(sent >= 6, "two TCP connections at least: {sent}");
    assert_eq!(
        sent,
        after.1.packets - before.1.packets,
        "{before:?} {after:?}"
    );
    assert_eq!(
        after.0.bytes - before.0.bytes,
        after.1.bytes - before.1.bytes
    );
    // B's real address stays unreachable from A: only the VIP crosses.
    let (rc, out) = sa1.run(
        &format!("ping -c 1 -W 1 {}", b1.ipv4),
        Duration::from_secs(20),
    );
    assert_ne!(rc, 0, "a1 reached b1's real address: {out}");

    // The volume: written, the VM stopped and started, still there.
    sa1.ok("echo persisted-across-restart > /mnt/data/marker && sync");
    drop(sa1);
    let _: Vm = ac
        .run(&Command::StopVm {
            cloud: aid,
            vm: "a1".to_string(),
        })
        .await
        .unwrap();
    wait_state(&ac, aid, "a1", VmState::Stopped).await;
    assert!(console(&ac, aid, "a1")
        .await
        .contains("atoll-guest: poweroff"));
    let _: Vm = ac
        .run(&Command::StartVm {
            cloud: aid,
            vm: "a1".to_string(),
        })
        .await
        .unwrap();
    wait_state(&ac, aid, "a1", VmState::Running).await;
    let mut sa1 = Shell::connect(&shell_path(&run_dir, aid, "a1"), "a1");
    assert_eq!(sa1.ok("cat /mnt/data/marker"), "persisted-across-restart");

    // The agent killed and restarted: the VMs run on (same VMM processes), the new agent
    // adopts them (still running, console and shell back) and can stop and start them.
    drop(sa1);
    drop(sb1);
    let vms = [(aid, "a1"), (aid, "a2"), (bid, "b1")];
    let before: Vec<u32> = vms.iter().map(|(c, v)| vmm_pid(&run_dir, *c, v)).collect();
    let restarted_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    agent.restart_after_kill();
    // The store still holds the killed agent's last reports: wait for the new agent's own.
    for (c, cloud, vm) in [(&ac, aid, "a1"), (&ac, aid, "a2"), (&bc, bid, "b1")] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            let st = wait_state(c, cloud, vm, VmState::Running).await;
            if st.updated_at >= restarted_at {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "{vm}: no report from the new agent"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(st.restarts, 0, "{vm} was not restarted: {st:?}");
    }
    let after: Vec<u32> = vms.iter().map(|(c, v)| vmm_pid(&run_dir, *c, v)).collect();
    assert_eq!(before, after, "the same VMMs run after the agent's restart");
    let mut sa1 = Shell::connect(&shell_path(&run_dir, aid, "a1"), "a1");
    let out = sa1.ok("echo again | nc -w 3 a2 7000");
    assert!(out.contains("again"), "{out}");
    let mut sa2 = Shell::connect(&shell_path(&run_dir, aid, "a2"), "a2");
    // The adopted VMM's console reconnects to the new agent (QEMU retries every second;
    // what the guest prints before that is lost, by design): its output reaches the API.
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in 0.. {
        sa2.ok(&format!("echo a2-says-hi-{n} >/dev/ttyS0"));
        let seen = Instant::now() + Duration::from_secs(3);
        while Instant::now() < seen {
            if console(&ac, aid, "a2").await.contains("a2-says-hi-") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if console(&ac, aid, "a2").await.contains("a2-says-hi-") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a2's console not back after the restart"
        );
    }
    drop(sa2);

    // A VMM killed behind the agent's back is reported and restarted.
    let pid = vmm_pid(&run_dir, bid, "b1");
    // SAFETY: kill(2) on a pid with a signal number; no memory is passed.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // The crash is visible for the restart backoff (1 s) at least.
    let st = wait_state(&bc, bid, "b1", VmState::Crashed).await;
    assert_eq!(st.restarts, 1, "{st:?}");
    assert!(st.message.is_some_and(|m| m.contains("exited")));
    let st = wait_state(&bc, bid, "b1", VmState::Running).await;
    assert_eq!(st.restarts, 1, "{st:?}");
    let b1_restarted = vmm_pid(&run_dir, bid, "b1");
    assert_ne!(b1_restarted, pid);

    // Deleting the clouds stops their VMMs (and their supervisors remove the pid files, so
    // they are read before).
    let a1_restarted = vmm_pid(&run_dir, aid, "a1");
    for (c, id) in [(&ac, aid), (&bc, bid)] {
        let _: () = c.run(&Command::DeleteCloud { cloud: id }).await.unwrap();
    }
    for &pid in [a1_restarted, pids[1], b1_restarted].iter() {
        vmm_gone(pid, "its cloud").await;
    }
}

/// Fails loudly without the image and QEMU of `cargo xtask image`.
fn require_image() {
    for p in [format!("{IMAGE}/vmlinux"), QEMU.into()] {
        assert!(
            Path::new(&p).exists(),
            "{p} is missing: run `cargo xtask image` (cargo xtask test does)"
        );
    }
}

/// An agent with its embedded control plane running VMs under QEMU, their runtime and state
/// directories in `dir` (`run`, `state`).
fn qemu_agent(tag: &str, dir: &Path) -> EmbeddedAgent {
    EmbeddedAgent::start(
        tag,
        &format!(
            "[vm]\ndriver = \"qemu\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nstop_timeout_secs = 20\n",
            dir.join("run").display(),
            dir.join("state").display(),
        ),
    )
}

/// Creates cloud `name` as the operator: the cloud's own client and its id.
async fn cloud(agent: &EmbeddedAgent, name: &str) -> (Client, CloudId) {
    let a: CreatedCloud = agent
        .client(&agent.token)
        .run(&Command::CreateCloud {
            spec: serde_json::from_value(json!({ "name": name })).unwrap(),
        })
        .await
        .unwrap();
    (agent.client(&a.token), a.cloud.id)
}

/// Waits (30 s at most) until VMM `pid` has exited (gone, or a zombie), after `what`.
async fn vmm_gone(pid: u32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(format!("/proc/{pid}/status"))
        .is_ok_and(|s| !s.contains("State:\tZ"))
    {
        assert!(Instant::now() < deadline, "VMM {pid} outlived {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A VM with an idle timeout (issue 19): it keeps running while an operator shell session is
/// open, or an exec runs, however long nothing else happens; once the session is gone and no packet moves for
/// the timeout, its host reports it idle and the control plane stops it (`stopped_by: idle`,
/// the VMM gone, address and name kept); starting it again is an API call, and it boots at the
/// same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microvm_with_an_idle_timeout_stops_when_idle_and_starts_again() {
    use atoll_control::model::{Power, StopReason};
    require_root();
    require_image();
    const IDLE_SECS: u64 = 4;
    let vmdir = tempfile::tempdir().unwrap();
    let run_dir = vmdir.path().join("run");
    let mut agent = qemu_agent("mz", vmdir.path());
    let (ac, aid) = cloud(&agent, "alpha").await;
    let created: Vm = ac
        .run(&Command::CreateVm {
            cloud: aid,
            spec: serde_json::from_value(
                json!({"name": "lazy", "memory_mib": 64, "idle_timeout_secs": IDLE_SECS}),
            )
            .unwrap(),
        })
        .await
        .unwrap();
    assert_eq!(created.idle_timeout_secs, Some(IDLE_SECS as u32));
    wait_state(&ac, aid, "lazy", VmState::Running).await;
    let pid = vmm_pid(&run_dir, aid, "lazy");

    // A shell session keeps it: twice the timeout with the session open and nothing else.
    let mut sh = Shell::connect(&shell_path(&run_dir, aid, "lazy"), "lazy");
    assert!(sh.ok("echo here").contains("here"));
    tokio::time::sleep(Duration::from_secs(2 * IDLE_SECS + 2)).await;
    let v = get_vm(&ac, aid, "lazy").await;
    assert_eq!(
        (v.power, v.status.as_ref().map(|s| s.state)),
        (Power::Running, Some(VmState::Running)),
        "stopped during a shell session: {v:?}"
    );
    assert!(
        !proc_status(pid, "State").starts_with('Z'),
        "the VMM is gone"
    );
    drop(sh);

    // So does an exec session (which moves no packet: it travels the guest agent's port).
    let nap = (2 * IDLE_SECS + 2).to_string();
    let (_, _, last, _) = exec_in(&ac, aid, "lazy", ExecVm::argv(["sleep", nap.as_str()])).await;
    assert_eq!(last, exited(0));
    let v = get_vm(&ac, aid, "lazy").await;
    assert_eq!(v.power, Power::Running, "stopped during an exec: {v:?}");

    // Then idle: stopped by its host's report.
    let st = wait_state(&ac, aid, "lazy", VmState::Stopped).await;
    let v = get_vm(&ac, aid, "lazy").await;
    assert_eq!(
        (v.power, v.stopped_by),
        (Power::Stopped, Some(StopReason::Idle)),
        "{v:?} {st:?}"
    );
    assert_eq!(v.ipv4, created.ipv4);
    vmm_gone(pid, "the idle stop").await;

    // Started again by the API: same address, no stop reason, a new VMM.
    let started: Vm = ac
        .run(&Command::StartVm {
            cloud: aid,
            vm: "lazy".into(),
        })
        .await
        .unwrap();
    assert_eq!((started.power, started.stopped_by), (Power::Running, None));
    wait_state(&ac, aid, "lazy", VmState::Running).await;
    assert_eq!(get_vm(&ac, aid, "lazy").await.ipv4, created.ipv4);
    let restarted = vmm_pid(&run_dir, aid, "lazy");
    assert_ne!(restarted, pid);
    let _: () = ac.run(&Command::DeleteCloud { cloud: aid }).await.unwrap();
    vmm_gone(restarted, "its cloud").await;
    let out = agent.cleanup();
    assert!(out.status.success(), "{out:?}");
}

/// A real VM reaches the internet by an allowlisted name: the agent runs inside a test's own
/// internet (`atoll_testbed::internet`) with egress on; the cloud's policy allows one name on
/// one port; the guest resolves it through its gateway (the agent's DNS server forwards it to
/// the internet's resolver and installs the answer for the cloud) and talks to the server
/// there over TCP. A name the policy does not allow never reaches the resolver, and the
/// server's address on another port stays closed.
#[test]
fn a_microvm_resolves_an_allowlisted_name_and_fetches_from_the_internet() {
    use atoll_testbed::{
        guest::in_netns,
        internet::{Echo, Internet, Upstream},
        leaves_nothing, unique_prefix,
    };
    use std::net::{Ipv4Addr, SocketAddrV4};
    require_root();
    require_image();
    const WEB: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
    const RESOLVER: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 53);
    let prefixes: Vec<String> = ["mi", "me"].iter().map(|t| unique_prefix(t)).collect();
    leaves_nothing(&prefixes, || {
        let net = Internet::build("mi").expect("building the internet");
        net.add_server(WEB).unwrap();
        net.add_server(RESOLVER).unwrap();
        let echo = Echo::start(&net, SocketAddrV4::new(WEB, 7)).unwrap();
        let upstream = Upstream::start(
            &net,
            SocketAddrV4::new(RESOLVER, 53),
            &[("pkg.example", &[WEB], 30), ("evil.example", &[WEB], 30)],
        )
        .unwrap();
        let asked = upstream.asked.clone();
        in_netns(&net.host, move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(vm_egress(asked));
        });
        drop((echo, upstream));
    });
}

async fn vm_egress(asked: std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let vmdir = tempfile::tempdir().unwrap();
    let run_dir = vmdir.path().join("run");
    let mut agent = EmbeddedAgent::start_with_dns(
        "me",
        &format!(
            "[vm]\ndriver = \"qemu\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nstop_timeout_secs = 20\n\
             [egress]\nenabled = true\n",
            run_dir.display(),
            vmdir.path().join("state").display(),
        ),
        "forward = [\"198.19.0.53:53\"]\n",
    );
    let (ac, aid) = cloud(&agent, "alpha").await;
    let _: EgressPolicy = ac
        .run(&Command::PutEgressPolicy {
            cloud: aid,
            policy: serde_json::from_value(
                json!({"mode": "allowlist", "allow": [{"domain": "pkg.example", "protocol": "tcp", "ports": {"first": 7, "last": 7}}]}),
            )
            .unwrap(),
        })
        .await
        .unwrap();
    let _: Vm = ac
        .run(&Command::CreateVm {
            cloud: aid,
            spec: serde_json::from_value(json!({"name": "a1", "memory_mib": 64})).unwrap(),
        })
        .await
        .unwrap();
    wait_state(&ac, aid, "a1", VmState::Running).await;
    let mut sh = Shell::connect(&shell_path(&run_dir, aid, "a1"), "a1");

    // Over TCP to the allowlisted name's address and port.
    let out = sh.ok("echo hello-internet | nc -w 3 pkg.example 7");
    assert!(
        out.contains("hello-internet"),
        "the echo came back: {out:?}"
    );
    // The same address on another port, and a name the policy does not allow: nothing.
    let (rc, out) = sh.run("echo no | nc -w 2 198.19.0.10 8", Duration::from_secs(20));
    assert!(
        rc != 0 || !out.contains("no"),
        "port 8 stays closed: {rc} {out:?}"
    );
    let (rc, out) = sh.run("nslookup evil.example", Duration::from_secs(20));
    assert!(
        rc != 0 && !out.contains("198.19.0.10"),
        "evil.example is not resolved: {rc} {out:?}"
    );
    let asked = asked.lock().unwrap().clone();
    assert!(asked.iter().any(|n| n == "pkg.example"), "{asked:?}");
    assert!(
        !asked.iter().any(|n| n.starts_with("evil.example")),
        "an unlisted name is never forwarded: {asked:?}"
    );
    drop(sh);
    let out = agent.cleanup();
    assert!(out.status.success(), "cleanup: {out:?}");
}

/// One microVM on each of two hosts, connected over the overlay: two agents, each in a host
/// namespace of its own joined by an underlay veth; host A runs the embedded control plane
/// on its underlay address, host B follows it with its own host token. A cloud's two VMs,
/// one anti-affinity group, land on different hosts; each reaches the other by address and
/// by name (its cloud's DNS, served on its own host), over TCP too, with the MTU the config
/// drive gave it (the underlay's less the encapsulation); an exec in each, through the one
/// control plane, reaches the VM's own host's guest access.
#[test]
fn a_microvm_on_each_of_two_hosts_connects_across_the_overlay() {
    use atoll_testbed::{leaves_nothing, unique_name, unique_prefix, NetNs};
    use std::net::{Ipv4Addr, SocketAddr};
    use support::AgentRole;
    const A: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
    require_root();
    require_image();
    let prefixes: Vec<String> = ["m2", "m2h"].iter().map(|t| unique_prefix(t)).collect();
    leaves_nothing(&prefixes, || {
        let a_ns = NetNs::new(&unique_name("m2h")).unwrap();
        let b_ns = NetNs::new(&unique_name("m2h")).unwrap();
        a_ns.sh(&format!(
            "ip link set lo up && ip link add under0 type veth peer name under0 netns {b} && \
             ip addr add {A}/24 dev under0 && ip link set under0 up",
            b = b_ns.name()
        ))
        .unwrap();
        b_ns.sh(&format!(
            "ip link set lo up && ip addr add {B}/24 dev under0 && ip link set under0 up"
        ))
        .unwrap();
        let vmdir = tempfile::tempdir().unwrap();
        // Each host's directory, which the VMMs traverse to their run directory (the agent
        // would create a missing one for its private state dir, 0700).
        for h in ["ha", "hb"] {
            std::fs::create_dir(vmdir.path().join(h)).unwrap();
        }
        let vm_section = |host: &str, underlay: Ipv4Addr| {
            format!(
                "[vm]\ndriver = \"qemu\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nstop_timeout_secs = 20\n\
                 [overlay]\nenabled = true\nunderlay = \"{underlay}\"\ndevice = \"vx0\"\n\
                 [guest_access]\nlisten = \"{underlay}:0\"\n",
                vmdir.path().join(host).join("run").display(),
                vmdir.path().join(host).join("state").display(),
            )
        };
        let mut a = support::EmbeddedAgent::start_as(
            "m2",
            AgentRole {
                host: "ha",
                netns: Some(&a_ns),
                listen: Some(SocketAddr::from((A, 7480))),
                remote: None,
            },
            &vm_section("ha", A),
            "",
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // API calls are made from host A's namespace (the API listens on its underlay).
        let on_a = |f: &(dyn Fn() -> Result<atoll_api::Reply, atoll_api::client::ClientError>
                          + Sync)| {
            atoll_agent::dns::netns::run_in(&a_ns.path(), f)
                .unwrap()
                .expect("an API call")
        };
        let op = a.client(&a.token);
        let run = |cmd: Command| on_a(&|| rt.block_on(op.execute(&cmd)));
        let atoll_api::Reply::HostToken(t) = run(Command::IssueHostToken { host: "hb".into() })
        else {
            panic!("a host token")
        };
        let ca = a.dir.path().join("tls/ca.pem");
        let mut b = support::EmbeddedAgent::start_as(
            "m2",
            AgentRole {
                host: "hb",
                netns: Some(&b_ns),
                listen: None,
                remote: Some((&a.url, &ca, &t.token)),
            },
            &vm_section("hb", B),
            "",
        );
        let atoll_api::Reply::CreatedCloud(x) = run(Command::CreateCloud {
            spec: serde_json::from_value(json!({"name": "across"})).unwrap(),
        }) else {
            panic!("a cloud")
        };
        let xid = x.cloud.id;
        let echo = "nc -ll -p 7000 -e cat &";
        let mut vms = Vec::new();
        for (name, user_data) in [("v1", Some(echo)), ("v2", None)] {
            let atoll_api::Reply::Vm(vm) = run(Command::CreateVm {
                cloud: xid,
                spec: serde_json::from_value(json!({
                    "name": name, "memory_mib": 64, "user_data": user_data,
                    "anti_affinity": "pair",
                }))
                .unwrap(),
            }) else {
                panic!("a VM")
            };
            vms.push(*vm);
        }
        let mut hosts: Vec<&str> = vms.iter().map(|v| v.host.as_str()).collect();
        hosts.sort_unstable();
        assert_eq!(hosts, ["ha", "hb"], "one VM per host: {vms:?}");
        for vm in &vms {
            let c = op.clone();
            let name = vm.name.clone();
            atoll_agent::dns::netns::run_in(&a_ns.path(), || {
                rt.block_on(wait_state(&c, xid, &name, VmState::Running))
            })
            .unwrap();
        }
        let shell = |vm: &Vm| {
            let run_dir = vmdir.path().join(&vm.host).join("run");
            Shell::connect(&shell_path(&run_dir, xid, &vm.name), &vm.name)
        };
        let (v1, v2) = (&vms[0], &vms[1]);
        let mut s2 = shell(v2);
        let mut s1 = shell(v1);
        // The config drive's MTU: the underlay's 1500 less the encapsulation.
        assert_eq!(s2.ok("cat /sys/class/net/eth0/mtu").trim(), "1450");
        for (s, to) in [(&mut s2, v1), (&mut s1, v2)] {
            s.ok(&format!("ping -c 1 -W 5 {}", to.ipv4));
            // By name: the cloud's zone is on both hosts, whichever runs the asker.
            let out = s.ok(&format!("ping -c 1 -W 5 {}", to.fqdn));
            assert!(out.contains(&to.ipv4.to_string()), "{out}");
        }
        // TCP to v1's echo server, with a payload of several full-size segments.
        let out = s2.ok(&format!(
            "head -c 20000 /dev/zero | tr '\\0' x > /tmp/p && nc -w 5 {} 7000 < /tmp/p > /tmp/r; \
             wc -c < /tmp/r",
            v1.fqdn
        ));
        assert_eq!(out.trim(), "20000", "the echo came back whole");
        // Exec in each VM through the one control plane, which forwards to the VM's host's
        // guest access over the underlay: each answers with its own MAC.
        for vm in &vms {
            let (c, name) = (op.clone(), vm.name.clone());
            let (out, _, last, _) = atoll_agent::dns::netns::run_in(&a_ns.path(), || {
                rt.block_on(exec_in(
                    &c,
                    xid,
                    &name,
                    ExecVm::argv(["cat", "/sys/class/net/eth0/address"]),
                ))
            })
            .unwrap();
            assert_eq!(
                (String::from_utf8_lossy(&out).trim(), last),
                (guest_mac(vm.ipv4).as_str(), exited(0))
            );
        }
        drop((s1, s2));
        let out = b.cleanup();
        assert!(out.status.success(), "{out:?}");
        let out = a.cleanup();
        assert!(out.status.success(), "{out:?}");
        drop((a, b));
    });
}

/// Runs `argv` in the VM through the API; returns (stdout, stderr, the last event, events).
async fn exec_in(
    c: &Client,
    cloud: CloudId,
    vm: &str,
    spec: ExecVm,
) -> (Vec<u8>, Vec<u8>, ExecEvent, Vec<ExecEvent>) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let cmd = Command::ExecVm {
        cloud,
        vm: vm.into(),
        spec: spec.clone(),
    };
    let mut s = c
        .exec(&cmd)
        .await
        .unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let (mut out, mut err, mut all) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(e) = s.next().await {
        let e = e.unwrap();
        match &e {
            ExecEvent::Stdout { data } => out.extend(b64.decode(data).unwrap()),
            ExecEvent::Stderr { data } => err.extend(b64.decode(data).unwrap()),
            _ => {}
        }
        all.push(e);
    }
    let last = all.last().cloned().expect("an exec ends with an event");
    (out, err, last, all)
}

fn exited(code: i32) -> ExecEvent {
    ExecEvent::Exit {
        code: Some(code),
        signal: None,
        timed_out: false,
    }
}

/// Waits (30 s at most) until no process whose command line contains `pattern` runs in the
/// VM (`ps` through exec; other processes of the guest may be named alike, so tests use
/// unique arguments).
async fn no_process(c: &Client, cloud: CloudId, vm: &str, pattern: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (out, _, last, _) = exec_in(c, cloud, vm, ExecVm::argv(["ps"])).await;
        assert_eq!(last, exited(0));
        let ps = String::from_utf8_lossy(&out);
        if !ps.contains(pattern) {
            return;
        }
        assert!(Instant::now() < deadline, "{pattern} still runs: {ps}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Exec and files through the guest agent (issue 19), on a real VM with egress off: output
/// streamed with the exit code, stdin, environment and directory, output capped with a marker
/// (and a flood drained), a timeout and a cancelled request that kill their command, several
/// execs at once, a program that does not exist; a 3 MiB file up and down byte for byte with
/// mode and owner, a missing file, a bad directory; another cloud's token and a stopped VM
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microvm_runs_commands_and_moves_files_through_its_guest_agent() {
    use base64::Engine;
    require_root();
    require_image();
    let vmdir = tempfile::tempdir().unwrap();
    let mut agent = qemu_agent("mx", vmdir.path());
    let (ac, aid) = cloud(&agent, "alpha").await;
    let (bc, _) = cloud(&agent, "beta").await;
    let _: Vm = ac
        .run(&Command::CreateVm {
            cloud: aid,
            spec: serde_json::from_value(json!({"name": "box", "memory_mib": 96})).unwrap(),
        })
        .await
        .unwrap();
    wait_state(&ac, aid, "box", VmState::Running).await;

    // Output, exit code.
    let (out, _, last, all) = exec_in(&ac, aid, "box", ExecVm::argv(["uname", "-a"])).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("Linux "),
        "{all:?}"
    );
    assert_eq!(last, exited(0));
    assert!(
        matches!(all[0], ExecEvent::Started { pid, exec_id: None } if pid > 1),
        "{all:?}"
    );
    let (out, err, last, _) = exec_in(
        &ac,
        aid,
        "box",
        ExecVm::argv(["sh", "-c", "echo out; echo err >&2; exit 3"]),
    )
    .await;
    assert_eq!(
        (&out[..], &err[..], last),
        (&b"out\n"[..], &b"err\n"[..], exited(3))
    );

    // Stdin, environment, directory.
    let mut spec = ExecVm::argv(["sh", "-c", "cat; echo \"$FOO\"; pwd"]);
    spec.stdin_base64 = Some(base64::engine::general_purpose::STANDARD.encode("from stdin\n"));
    spec.env.insert("FOO".into(), "bar baz".into());
    spec.cwd = Some("/tmp".into());
    let (out, _, last, _) = exec_in(&ac, aid, "box", spec).await;
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), last),
        ("from stdin\nbar baz\n/tmp\n", exited(0))
    );

    // Stdin as a stream: the command answers each line while its stdin is still open; the
    // stream's end closes it; an exec's stdin is claimed once.
    let mut spec = ExecVm::argv([
        "sh",
        "-c",
        "while read l; do echo \"got $l\"; done; echo end",
    ]);
    spec.stdin_stream = true;
    let talk = Command::ExecVm {
        cloud: aid,
        vm: "box".into(),
        spec,
    };
    let mut s = ac.exec(&talk).await.unwrap();
    let Some(Ok(ExecEvent::Started {
        exec_id: Some(id), ..
    })) = s.next().await
    else {
        panic!("no exec id")
    };
    let stdin_of = Command::WriteExecStdin {
        cloud: aid,
        vm: "box".into(),
        exec: id,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let feeder = {
        let (ac, to) = (ac.clone(), stdin_of.clone());
        tokio::spawn(async move { ac.exec_stdin(&to, rx).await })
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut out = Vec::new();
    for line in ["one", "two"] {
        tx.send(Ok(bytes::Bytes::from(format!("{line}\n"))))
            .await
            .unwrap();
        let want = format!("got {line}\n");
        while !out.ends_with(want.as_bytes()) {
            match s.next().await {
                Some(Ok(ExecEvent::Stdout { data })) => out.extend(b64.decode(data).unwrap()),
                other => panic!("waiting for {want:?}: {other:?}"),
            }
        }
    }
    drop(tx);
    let mut last = None;
    while let Some(e) = s.next().await {
        match e.unwrap() {
            ExecEvent::Stdout { data } => out.extend(b64.decode(data).unwrap()),
            e => last = Some(e),
        }
    }
    assert_eq!(
        (String::from_utf8_lossy(&out).as_ref(), last),
        ("got one\ngot two\nend\n", Some(exited(0)))
    );
    feeder.await.unwrap().unwrap();
    let (_, rx) = tokio::sync::mpsc::channel(1);
    let again = ac.exec_stdin(&stdin_of, rx).await.unwrap_err();
    assert!(
        matches!(&again, ClientError::Api { status, body } if status.as_u16() == 404 && body.error.code == "no_such_exec"),
        "{again:?}"
    );

    // Output capped with a marker; a flood past the cap drains and exits.
    let mut spec = ExecVm::argv(["sh", "-c", "head -c 3000000 /dev/zero; echo done >&2"]);
    spec.max_output_bytes = Some(1000);
    let (out, err, last, all) = exec_in(&ac, aid, "box", spec).await;
    assert_eq!(
        (out.len(), &err[..], last),
        (1000, &b"done\n"[..], exited(0))
    );
    let marks: Vec<_> = all
        .iter()
        .filter(|e| matches!(e, ExecEvent::Truncated { .. }))
        .collect();
    assert_eq!(
        marks,
        [&ExecEvent::Truncated {
            stream: "stdout".into(),
            limit: 1000
        }]
    );

    // A timeout kills the command (and its process group).
    let mut spec = ExecVm::argv(["sh", "-c", "sleep 300 & sleep 301"]);
    spec.timeout_secs = Some(2);
    let (_, _, last, _) = exec_in(&ac, aid, "box", spec).await;
    assert_eq!(
        last,
        ExecEvent::Exit {
            code: None,
            signal: Some(9),
            timed_out: true
        }
    );
    no_process(&ac, aid, "box", "sleep 30").await;

    // A cancelled request kills its command.
    let cmd = Command::ExecVm {
        cloud: aid,
        vm: "box".into(),
        spec: ExecVm::argv(["sleep", "302"]),
    };
    let mut s = ac.exec(&cmd).await.unwrap();
    assert!(matches!(
        s.next().await,
        Some(Ok(ExecEvent::Started { .. }))
    ));
    let (out, _, _, _) = exec_in(&ac, aid, "box", ExecVm::argv(["ps"])).await;
    assert!(
        String::from_utf8_lossy(&out).contains("sleep 302"),
        "the command is not running"
    );
    drop(s);
    no_process(&ac, aid, "box", "sleep 302").await;

    // A cloud's requests in flight through a control plane are capped; dropping them kills
    // their commands.
    let sleeper = Command::ExecVm {
        cloud: aid,
        vm: "box".into(),
        spec: ExecVm::argv(["sleep", "303"]),
    };
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(ac.exec(&sleeper).await.unwrap());
    }
    let over = ac.exec(&sleeper).await.unwrap_err();
    assert!(
        matches!(&over, ClientError::Api { status, body } if status.as_u16() == 429 && body.error.code == "too_many_sessions"),
        "{over:?}"
    );
    drop(held);
    // The control plane lets the permits go as it sees the connections close.
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = ac
        .exec(&Command::ExecVm {
            cloud: aid,
            vm: "box".into(),
            spec: ExecVm::argv(["true"]),
        })
        .await
    {
        assert!(Instant::now() < deadline, "still refused: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    no_process(&ac, aid, "box", "sleep 303").await;

    // Several at once.
    let runs = (0..4).map(|i| {
        let ac = ac.clone();
        async move {
            exec_in(
                &ac,
                aid,
                "box",
                ExecVm::argv(["sh", "-c", &format!("sleep 1; echo {i}")]),
            )
            .await
        }
    });
    for (i, (out, _, last, _)) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!((out, last), (format!("{i}\n").into_bytes(), exited(0)));
    }

    // A program that does not exist.
    let (_, _, last, _) = exec_in(&ac, aid, "box", ExecVm::argv(["/no/such/program"])).await;
    assert!(
        matches!(&last, ExecEvent::Error { message } if message.contains("/no/such/program")),
        "{last:?}"
    );

    // Files: up and down, byte for byte, with mode and owner.
    let mut blob = vec![0u8; 3 << 20];
    getrandom::fill(&mut blob).unwrap();
    let put = |path: &str, mode, data: Vec<u8>| {
        let ac = ac.clone();
        let path = path.to_string();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let len = data.len() as u64;
            tokio::spawn(async move {
                for chunk in data.chunks(100_000) {
                    let _ = tx.send(Ok(bytes::Bytes::copy_from_slice(chunk))).await;
                }
            });
            let cmd = Command::WriteFile {
                cloud: aid,
                vm: "box".into(),
                spec: FileSpec {
                    path,
                    mode: Some(mode),
                    uid: Some(1000),
                    gid: Some(100),
                },
            };
            ac.upload(&cmd, len, rx).await
        }
    };
    put("/root/blob", 0o600, blob.clone()).await.unwrap();
    let get = |path: &str| Command::ReadFile {
        cloud: aid,
        vm: "box".into(),
        spec: FileSpec {
            path: path.into(),
            mode: None,
            uid: None,
            gid: None,
        },
    };
    let mut d = ac.download(&get("/root/blob")).await.unwrap();
    assert_eq!(
        (d.size, d.mode, d.uid, d.gid),
        (blob.len() as u64, 0o600, 1000, 100)
    );
    let mut back = Vec::new();
    while let Some(chunk) = d.chunk().await {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert!(back == blob, "{} bytes back, not the same", back.len());
    let (out, _, _, _) = exec_in(
        &ac,
        aid,
        "box",
        ExecVm::argv(["stat", "-c", "%a %u %g %s", "/root/blob"]),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("600 1000 100 {}\n", 3 << 20)
    );
    let missing = ac.download(&get("/root/nothing")).await.unwrap_err();
    assert!(
        matches!(&missing, ClientError::Api { status, body } if status.as_u16() == 404 && body.error.code == "no_such_file"),
        "{missing:?}"
    );
    let bad = put("/no/dir/x", 0o644, b"x".to_vec()).await.unwrap_err();
    assert!(
        matches!(&bad, ClientError::Api { status, body } if status.as_u16() == 404 && body.error.message.starts_with("/no/dir/x: ")),
        "{bad:?}"
    );
    let bad = put("/root", 0o644, b"x".to_vec()).await.unwrap_err();
    assert!(
        matches!(&bad, ClientError::Api { status, body } if status.as_u16() == 400 && body.error.code == "file_error"),
        "{bad:?}"
    );
    // Nothing half-written stays behind.
    let (out, _, _, _) = exec_in(&ac, aid, "box", ExecVm::argv(["ls", "-a", "/", "/root"])).await;
    assert!(
        !String::from_utf8_lossy(&out).contains(".atoll-"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // The CLI: the command's exit code is the CLI's, stdin goes in, output streams out;
    // `vm cp` both ways, with a mode.
    let atoll = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("atoll");
    assert!(
        atoll.exists(),
        "{} is missing: `cargo test --workspace` (cargo xtask test) builds it",
        atoll.display()
    );
    let ca = agent.dir.path().join("tls/ca.pem");
    let cli = |args: &[&str], stdin: &[u8]| {
        let mut child = std::process::Command::new(&atoll)
            .arg("--url")
            .arg(&agent.url)
            .arg("--ca-file")
            .arg(&ca)
            .args(["--token", ac.token()])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    let cloud_arg = aid.to_string();
    let out = cli(
        &[
            "vm",
            "exec",
            &cloud_arg,
            "box",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo oops >&2; exit 7",
        ],
        b"piped in\n",
    );
    assert_eq!(
        (out.status.code(), &out.stdout[..], &out.stderr[..]),
        (Some(7), &b"PIPED IN\n"[..], &b"oops\n"[..]),
        "{out:?}"
    );
    let local = vmdir.path().join("local.txt");
    std::fs::write(&local, "a line\n").unwrap();
    let out = cli(
        &[
            "vm",
            "cp",
            &cloud_arg,
            local.to_str().unwrap(),
            "box:/root/c.txt",
            "--mode",
            "640",
        ],
        b"",
    );
    assert!(out.status.success(), "{out:?}");
    let out = cli(&["vm", "cp", &cloud_arg, "box:/root/c.txt", "-"], b"");
    assert_eq!(
        (out.status.code(), &out.stdout[..]),
        (Some(0), &b"a line\n"[..]),
        "{out:?}"
    );
    let (out, _, _, _) = exec_in(
        &ac,
        aid,
        "box",
        ExecVm::argv(["stat", "-c", "%a", "/root/c.txt"]),
    )
    .await;
    assert_eq!(out, b"640\n");
    let out = cli(&["cloud", "usage", &cloud_arg, "--from", "0"], b"");
    let u: CloudUsage = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("`atoll cloud usage`: {e}: {out:?}"));
    assert_eq!((u.cloud, u.from), (aid, 0));
    let out = cli(&["vm", "cp", &cloud_arg, "box:/root/none", "-"], b"");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No such file"),
        "{out:?}"
    );

    // Another cloud's token; a stopped VM.
    let refused = bc.exec(&cmd).await.unwrap_err();
    assert!(
        matches!(&refused, ClientError::Api { status, .. } if status.as_u16() == 403),
        "{refused:?}"
    );
    let _: Vm = ac
        .run(&Command::StopVm {
            cloud: aid,
            vm: "box".into(),
        })
        .await
        .unwrap();
    let stopped = ac.exec(&cmd).await.unwrap_err();
    assert!(
        matches!(&stopped, ClientError::Api { status, body } if status.as_u16() == 409 && body.error.code == "vm_not_running"),
        "{stopped:?}"
    );
    let _: () = ac.run(&Command::DeleteCloud { cloud: aid }).await.unwrap();
    let out = agent.cleanup();
    assert!(out.status.success(), "{out:?}");
}

const MCP_WALKTHROUGH: &str = r##"
import asyncio, json, sys, time
from mcp import ClientSession, StdioServerParameters, stdio_client

ATOLL, URL, CA, OP = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]

def ok(res, what):
    assert not res.is_error, f"{what}: {res.content[0].text}"
    return json.loads(res.content[0].text)

def err(res, what):
    assert res.is_error, f"{what} succeeded: {res.content[0].text}"
    return json.loads(res.content[0].text)

async def session(token, fn):
    params = StdioServerParameters(command=ATOLL, args=["--url", URL, "--ca-file", CA, "mcp"],
                                   env={"ATOLL_TOKEN": token})
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            return await fn(s)

async def running(s, cloud, vm):
    deadline = time.time() + 120
    while True:
        v = ok(await s.call_tool("get_vm", {"cloud": cloud, "vm": vm}), "get vm")
        if (v.get("status") or {}).get("state") == "running":
            return v
        assert time.time() < deadline, f"{vm} did not boot: {v}"
        await asyncio.sleep(0.5)

async def run(s, cloud, vm, argv):
    r = ok(await s.call_tool("exec_vm", {"cloud": cloud, "vm": vm, "body": {"argv": argv}}), f"exec {argv}")
    return r

async def main():
    async def operator(s):
        a = ok(await s.call_tool("create_cloud", {"body": {"name": "alpha"}}), "cloud alpha")
        b = ok(await s.call_tool("create_cloud", {"body": {"name": "beta"}}), "cloud beta")
        return a, b
    a, b = await session(OP, operator)
    aid, bid = a["cloud"]["id"], b["cloud"]["id"]

    async def alpha(s):
        ok(await s.call_tool("create_vm", {"cloud": aid, "body": {"name": "web", "memory_mib": 64}}), "create vm")
        await running(s, aid, "web")
        r = await run(s, aid, "web", ["uname", "-a"])
        assert r["exit"] == {"code": 0, "timed_out": False} and r["stdout"].startswith("Linux "), r
        assert (await run(s, aid, "web", ["mkdir", "-p", "/www"]))["exit"]["code"] == 0
        ok(await s.call_tool("write_file", {"cloud": aid, "vm": "web", "path": "/www/index.html",
                                             "content": "hello from alpha\n"}), "write a file")
        f = ok(await s.call_tool("read_file", {"cloud": aid, "vm": "web", "path": "/www/index.html"}), "read it")
        assert f["content"] == "hello from alpha\n" and f["mode"] == "644", f
        # A web server of sorts (busybox nc answering each connection with the page).
        ok(await s.call_tool("write_file", {"cloud": aid, "vm": "web", "path": "/root/page", "mode": "755",
                                             "content": "#!/bin/sh\ncat /www/index.html\n"}), "write a script")
        r = await run(s, aid, "web", ["sh", "-c", "nc -ll -p 8080 -e /root/page </dev/null >/dev/null 2>&1 &"])
        assert r["exit"]["code"] == 0, r
        ok(await s.call_tool("create_exposure", {"cloud": aid, "body": {
            "name": "site", "protocol": "tcp", "port": 80, "backends": [{"vm": "web", "port": 8080}]}}), "expose")
        ok(await s.call_tool("create_grant", {"cloud": aid, "exposure": "site", "body": {"consumer": bid}}), "grant")
    await session(a["token"], alpha)

    async def beta(s):
        ok(await s.call_tool("create_vm", {"cloud": bid, "body": {"name": "client", "memory_mib": 64}}), "create vm")
        ok(await s.call_tool("accept_offer", {"cloud": bid, "provider": aid, "exposure": "site"}), "accept")
        imports = ok(await s.call_tool("list_imports", {"cloud": bid}), "imports")
        name = imports[0]["fqdn"].rstrip(".")
        await running(s, bid, "client")
        deadline = time.time() + 60
        while True:
            r = await run(s, bid, "client", ["sh", "-c", f"nc -w 3 {name} 80 </dev/null"])
            if r["stdout"]:
                break
            assert time.time() < deadline, f"{name} unreachable: {r}"
            await asyncio.sleep(0.5)
        assert r["stdout"] == "hello from alpha\n", r
        # The usage its host delivered: what the client VM sent to the service.
        deadline = time.time() + 60
        while True:
            u = ok(await s.call_tool("get_usage", {"cloud": bid}), "usage")
            sent = sum(t["bytes"] for t in u["traffic"]
                       if t["class"] == "exposure" and t["direction"] == "from_guest")
            if sent > 0:
                break
            assert time.time() < deadline, f"no exposure usage: {u}"
            await asyncio.sleep(0.5)
        other = err(await s.call_tool("get_usage", {"cloud": aid}), "another cloud's usage")
        assert other["status"] == 403, other
        return name
    name = await session(b["token"], beta)
    print(json.dumps({"reached": name}))
    print("WALKTHROUGH OK")

asyncio.run(main())
"##;

/// An agent's first minutes through MCP with real VMs (issue 19), the official Python SDK as
/// the client over `atoll mcp`: the operator creates two clouds; the first cloud's token boots
/// a VM, runs `uname -a` in it, writes and reads a file, starts a web server by exec, exposes
/// it and grants it to the second cloud; the second cloud's token boots a VM, accepts the
/// grant, fetches the page by the service's name from inside its VM and reads its usage (what
/// its host metered and delivered to the control plane), and not the other cloud's.
#[test]
fn an_mcp_client_boots_vms_runs_commands_and_reaches_a_granted_service_by_name() {
    require_root();
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/mcp-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `cargo xtask setup` (cargo xtask test does)",
        python.display()
    );
    let atoll = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("atoll");
    assert!(atoll.exists(), "{} is missing", atoll.display());
    let vmdir = tempfile::tempdir().unwrap();
    let mut agent = EmbeddedAgent::start(
        "mm",
        &format!(
            "[vm]\ndriver = \"qemu\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nstop_timeout_secs = 20\n\
             [usage]\njournal_dir = \"{}\"\ninterval_secs = 1\n",
            vmdir.path().join("run").display(),
            vmdir.path().join("state").display(),
            vmdir.path().join("usage").display(),
        ),
    );
    let script = vmdir.path().join("walkthrough.py");
    std::fs::write(&script, MCP_WALKTHROUGH).unwrap();
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&atoll)
        .arg(&agent.url)
        .arg(agent.dir.path().join("tls/ca.pem"))
        .arg(&agent.token)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let cleaned = agent.cleanup();
    assert!(
        out.status.success() && stdout.contains("WALKTHROUGH OK"),
        "the MCP walk-through failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cleaned.status.success(), "{cleaned:?}");
}

/// A control plane of its own (`atoll serve`), so that it can be killed apart from the agent:
/// killed with SIGKILL when dropped.
struct ControlPlane {
    config: PathBuf,
    url: String,
    ca: PathBuf,
    token: String,
    child: std::process::Child,
}

impl ControlPlane {
    fn start(dir: &Path, prices: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.join("control.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\noperator_token_file = \"{}\"\n\
                 [store]\npath = \"{}\"\n[tls]\ndir = \"{}\"\n[billing]\naccount = \"atoll test\"\n{prices}",
                dir.join("op.token").display(),
                dir.join("control.db").display(),
                dir.join("tls").display(),
            ),
        )
        .unwrap();
        let mut cp = ControlPlane {
            url: format!("https://127.0.0.1:{port}"),
            ca: dir.join("tls/ca.pem"),
            token: String::new(),
            child: Self::spawn(&config),
            config,
        };
        cp.wait_serving();
        cp.token = std::fs::read_to_string(dir.join("op.token")).unwrap();
        cp
    }

    fn spawn(config: &Path) -> std::process::Child {
        std::process::Command::new(atoll_cli())
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("starting atoll serve")
    }

    /// Waits for the line the server prints once it listens.
    fn wait_serving(&mut self) {
        let stderr = self.child.stderr.take().unwrap();
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok);
        let mut seen = Vec::new();
        let found = lines.by_ref().any(|l| {
            let hit = l.contains("control plane API on");
            seen.push(l);
            hit
        });
        assert!(found, "atoll serve did not start:\n{}", seen.join("\n"));
        std::thread::spawn(move || lines.for_each(drop));
    }

    /// SIGKILL: nothing of it runs on.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The same config and store again (after [`ControlPlane::kill`]).
    fn restart(&mut self) {
        self.child = Self::spawn(&self.config);
        self.wait_serving();
    }

    fn client(&self, token: &str) -> Client {
        let tls = atoll_control::tls::ClientTls {
            trust: atoll_control::tls::Trust::CaFile(self.ca.clone()),
            setting: String::new(),
            identity: None,
        };
        Client::with_tls(&self.url, token, Some(&tls)).unwrap()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `atoll` CLI beside this test's binary (`cargo xtask test` builds the workspace).
fn atoll_cli() -> PathBuf {
    let p = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("atoll");
    assert!(p.exists(), "{} is missing", p.display());
    p
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

const PRICES: &str = "[prices]\ncurrency = \"EUR\"\nvcpu_hour = 0.04\nmemory_gib_hour = 0.005\n\
    volume_gib_month = 0.1\n[prices.from_guest]\nintra_cloud = 0.02\nhost = 0.03\n\
    [prices.to_guest]\nintra_cloud = 0.01\nhost = 0.01\n";

/// `quantity × price / per` in 10^-9 of the currency, rounded down: the price list's
/// arithmetic, done by the test on its own.
fn nanos(quantity: u64, price: f64, per: u128) -> u64 {
    (u128::from(quantity) * (price * 1e9).round() as u128 / per) as u64
}

/// The numbers add up (issue 20): two VMs and a volume run and talk under an agent and a
/// control plane that are each killed with SIGKILL on the way, until a budget the operator sets
/// below the cloud's spend stops the VMs (`stopped_by: budget`, and they may not start); the API's cost for the cloud is
/// what the test computes on its own from the price list and what it observed: network bytes
/// exactly the kernel's counters of the cloud's endpoints (with the payload the test sent
/// within them), vCPU and memory time between the lifetimes the test saw (created … stopped
/// and running … asked to stop), volume time between its create and its removal. Nothing is
/// counted twice (the agent redelivers what it had not acknowledged; the control plane keeps
/// each record once). The operator's FOCUS export of the run passes the FinOps Foundation's
/// validator and adds up to the same cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clouds_spend_adds_up_across_kills_of_the_agent_and_the_control_plane() {
    require_root();
    require_image();
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/focus-venv");
    assert!(
        venv.join("bin/focus-validator").exists(),
        "{} is missing the FOCUS validator: run `cargo xtask setup` (cargo xtask test does)",
        venv.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cp = ControlPlane::start(dir.path(), PRICES);
    let op = cp.client(&cp.token);
    let host_token: HostToken = op
        .run(&Command::IssueHostToken { host: "hs1".into() })
        .await
        .unwrap();
    let vmdir = dir.path().join("host");
    std::fs::create_dir(&vmdir).unwrap();
    let journal = dir.path().join("usage");
    let mut agent = EmbeddedAgent::start_as(
        "sp",
        support::AgentRole {
            host: "hs1",
            netns: None,
            listen: None,
            remote: Some((&cp.url, &cp.ca, &host_token.token)),
        },
        &format!(
            "[vm]\ndriver = \"qemu\"\nrun_dir = \"{}\"\nstate_dir = \"{}\"\nstop_timeout_secs = 20\n\
             [usage]\nenabled = true\ninterval_secs = 1\njournal_dir = \"{}\"\n",
            vmdir.join("run").display(),
            vmdir.join("state").display(),
            journal.display(),
        ),
        "",
    );
    let created: CreatedCloud = op
        .run(&Command::CreateCloud {
            spec: serde_json::from_value(json!({"name": "spender"})).unwrap(),
        })
        .await
        .unwrap();
    let cid = created.cloud.id;
    let cc = cp.client(&created.token);

    // A volume, unattached: provisioned from its create to its removal on the host.
    let v0 = now_ms();
    let _: Volume = cc
        .run(&Command::CreateVolume {
            cloud: cid,
            spec: CreateVolume {
                name: "data".into(),
                size_gib: 2,
                format: VolumeFormat::Raw,
            },
        })
        .await
        .unwrap();
    let v1 = now_ms();
    // Two VMs of different sizes; a1 echoes what it is sent.
    let c0 = now_ms();
    let sizes = [("a1", 1u64, 96u64), ("a2", 2, 128)];
    let mut vms = Vec::new();
    for (name, vcpus, memory_mib) in sizes {
        let vm: Vm = cc
            .run(&Command::CreateVm {
                cloud: cid,
                spec: serde_json::from_value(json!({
                    "name": name, "vcpus": vcpus, "memory_mib": memory_mib,
                    "user_data": "nc -ll -p 7000 -e cat &",
                }))
                .unwrap(),
            })
            .await
            .unwrap();
        vms.push(vm);
    }
    for (name, _, _) in sizes {
        wait_state(&cc, cid, name, VmState::Running).await;
    }
    let running = now_ms();
    let to = vms[0].ipv4;
    let talk = |bytes: u32| {
        let cc = cc.clone();
        async move {
            let (out, _, last, _) = exec_in(
                &cc,
                cid,
                "a2",
                ExecVm::argv([
                    "sh",
                    "-c",
                    &format!("head -c {bytes} /dev/zero | nc -w 3 {to} 7000 | wc -c"),
                ]),
            )
            .await;
            assert_eq!(
                (String::from_utf8_lossy(&out).trim().to_string(), last),
                (bytes.to_string(), exited(0)),
                "the echo came back whole"
            );
        }
    };
    talk(300_000).await;

    // SIGKILL the agent (its VMMs run on; it adopts them), and talk more.
    agent.restart_after_kill();
    // It adopts the VMMs on its first sync; exec reaches them again once it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let probe = Command::ExecVm {
            cloud: cid,
            vm: "a2".into(),
            spec: ExecVm::argv(["true"]),
        };
        match cc.exec(&probe).await {
            Ok(mut s) => {
                while s.next().await.is_some() {}
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "exec after the agent's restart: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    talk(200_000).await;

    // SIGKILL the control plane; the agent keeps collecting (and fails to deliver) for a few
    // intervals; then the control plane comes back on its store.
    cp.kill();
    let before = usage_journal_bytes(&journal);
    let deadline = Instant::now() + Duration::from_secs(30);
    while usage_journal_bytes(&journal) < before + 4_000 {
        assert!(Instant::now() < deadline, "the agent stopped journaling");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cp.restart();

    // The operator gives the cloud a budget it has spent already: at the next delivery its
    // VMs stop (their compute ends; their endpoints stay, and stay silent) and they may not
    // start again.
    let s0 = now_ms();
    let st: BudgetStatus = op
        .run(&Command::SetBudget {
            cloud: cid,
            budget: Budget {
                amount: 0.000_001,
                warn_percent: 50,
            },
        })
        .await
        .unwrap();
    assert_eq!(st.state, BudgetState::Exceeded, "{st:?}");
    for (name, _, _) in sizes {
        wait_state(&cc, cid, name, VmState::Stopped).await;
        assert_eq!(
            get_vm(&cc, cid, name).await.stopped_by,
            Some(StopReason::Budget)
        );
    }
    let s1 = now_ms();
    let refused = cc
        .run::<Vm>(&Command::StartVm {
            cloud: cid,
            vm: "a1".into(),
        })
        .await
        .expect_err("a VM of a cloud over its budget does not start");
    assert!(refused.to_string().contains("budget"), "{refused}");
    // What the kernel counted for the cloud's endpoints, all told.
    let exporter = Exporter::open(&DataplaneConfig {
        bpffs_root: agent.pins_path().to_path_buf(),
        ..DataplaneConfig::default()
    })
    .unwrap();
    let kernel = support::settled(|| {
        let snap = exporter.snapshot().unwrap();
        let mut sums = std::collections::BTreeMap::new();
        for e in snap.endpoints.iter().filter(|e| e.cloud == cid.get()) {
            for d in Direction::ALL {
                for k in TrafficClass::ALL {
                    let b = e.counters.traffic[d as usize][k as usize].bytes;
                    if b > 0 {
                        *sums
                            .entry((d.name().to_string(), k.name().to_string()))
                            .or_insert(0u64) += b;
                    }
                }
            }
        }
        sums
    });
    assert!(
        kernel[&("from_guest".to_string(), "intra_cloud".to_string())] > 2 * 500_000,
        "the payload went both ways: {kernel:?}"
    );

    // Remove the volume (its storage ends when the host removes the file) and the VMs (their
    // endpoints' final records).
    let d0 = now_ms();
    let _: () = cc
        .run(&Command::DeleteVolume {
            cloud: cid,
            volume: "data".into(),
        })
        .await
        .unwrap();
    let file = agent
        .dir
        .path()
        .join("volumes")
        .join(cid.to_string())
        .join("data.raw");
    let deadline = Instant::now() + Duration::from_secs(30);
    while file.exists() {
        assert!(
            Instant::now() < deadline,
            "{} outlived its delete",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d1 = now_ms();
    for (name, _, _) in sizes {
        let _: () = cc
            .run(&Command::DeleteVm {
                cloud: cid,
                vm: name.into(),
            })
            .await
            .unwrap();
    }
    let deleted = now_ms();
    // Every record is in once the host's usage is complete past the deletes.
    let period = |u: &CloudUsage| (u.from, u.to);
    let from = c0 / 1000 - 5;
    let deadline = Instant::now() + Duration::from_secs(60);
    let usage = loop {
        let u: CloudUsage = cc
            .run(&Command::GetUsage {
                cloud: cid,
                from,
                to: now_ms() / 1000 + 1,
            })
            .await
            .unwrap();
        if u.complete_to * 1000 > deleted + 1000 {
            break u;
        }
        assert!(Instant::now() < deadline, "usage not complete: {u:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let item = |sku: &str| {
        usage
            .items
            .iter()
            .find(|i| i.sku == sku)
            .unwrap_or_else(|| panic!("no {sku} in {:?}", usage.items))
            .clone()
    };

    // Network: exactly the kernel's counters.
    let api: std::collections::BTreeMap<(String, String), u64> = usage
        .traffic
        .iter()
        .filter(|t| t.bytes > 0)
        .map(|t| ((t.direction.clone(), t.class.clone()), t.bytes))
        .collect();
    assert_eq!(api, kernel, "network bytes, to the byte");
    // Compute: between what the test saw of the VMs' lives.
    let (vcpus, mib): (u64, u64) = sizes.iter().fold((0, 0), |a, s| (a.0 + s.1, a.1 + s.2));
    let (short, long) = (s0 - running, s1 - c0);
    let vcpu_ms = item("compute-vcpu").quantity;
    assert!(
        (vcpus * short..=vcpus * long).contains(&vcpu_ms),
        "vCPU time {vcpu_ms} ms not within {}..{} ms",
        vcpus * short,
        vcpus * long
    );
    let mib_ms = item("compute-memory").quantity;
    assert!(
        (mib * short..=mib * long).contains(&mib_ms),
        "memory {mib_ms} MiB-ms not within {}..{}",
        mib * short,
        mib * long
    );
    // Storage: between its create and its removal.
    let gib_ms = item("storage-volume").quantity;
    assert!(
        (2 * (d0 - v1)..=2 * (d1 - v0)).contains(&gib_ms),
        "volume {gib_ms} GiB-ms not within {}..{}",
        2 * (d0 - v1),
        2 * (d1 - v0)
    );
    // Cost: the test's own arithmetic on the same quantities, per hour (each hour is priced
    // on its own, rounded down: at most one nano per SKU and hour apart).
    let hours = (usage.to - usage.from) / 3600;
    let mut expected = nanos(vcpu_ms, 0.04, 3_600_000)
        + nanos(mib_ms, 0.005, 3_600_000 * 1024)
        + nanos(gib_ms, 0.1, 3_600_000 * 730);
    let price = |d: &str, k: &str| match (d, k) {
        ("from_guest", "intra_cloud") => 0.02,
        ("from_guest", "host") => 0.03,
        ("to_guest", "intra_cloud") | ("to_guest", "host") => 0.01,
        _ => 0.0,
    };
    for ((d, k), b) in &kernel {
        expected += nanos(*b, price(d, k), 1_000_000_000);
    }
    let slack = hours * usage.items.len() as u64;
    assert!(
        usage.cost_nanos.abs_diff(expected) <= slack,
        "API cost {} ({}), the test's {expected} nanos",
        usage.cost_nanos,
        usage.cost
    );
    assert_eq!(usage.currency, "EUR");
    // And the cost of what the test saw bounds it (compute and storage are time).
    let bound = |t: u64, v: u64, g: u64| {
        nanos(vcpus * t, 0.04, 3_600_000)
            + nanos(mib * t, 0.005, 3_600_000 * 1024)
            + nanos(2 * g, 0.1, 3_600_000 * 730)
            + (expected
                - nanos(vcpu_ms, 0.04, 3_600_000)
                - nanos(mib_ms, 0.005, 3_600_000 * 1024)
                - nanos(gib_ms, 0.1, 3_600_000 * 730))
            + v
    };
    assert!(
        (bound(short, 0, d0 - v1).saturating_sub(slack)..=bound(long, slack, d1 - v0))
            .contains(&usage.cost_nanos),
        "cost {} outside what the test observed",
        usage.cost_nanos
    );

    // The operator's FOCUS export of the same hours passes the FinOps Foundation's validator
    // and its BilledCost for the cloud adds up to the API's.
    let (pf, pt) = period(&usage);
    let csv = match op
        .execute(&Command::GetFleetUsage {
            from: pf,
            to: pt,
            focus: true,
        })
        .await
        .unwrap()
    {
        atoll_api::Reply::Csv(csv) => csv,
        other => panic!("a FOCUS export, not {other:?}"),
    };
    focus_validate(&venv, &csv);
    // No field of this run needs quoting, so a split reads it.
    assert!(!csv.contains('"'), "{csv}");
    let mut rows = csv.lines().map(|l| l.split(',').collect::<Vec<_>>());
    let header = rows.next().unwrap();
    let col = |n: &str| {
        header
            .iter()
            .position(|h| *h == n)
            .unwrap_or_else(|| panic!("no {n}"))
    };
    let (sub, billed) = (col("SubAccountId"), col("BilledCost"));
    let mut total = 0u64;
    for r in rows.filter(|r| r[sub] == cid.to_string()) {
        let (w, f) = r[billed].split_once('.').unwrap_or((r[billed], "0"));
        total += w.parse::<u64>().unwrap() * 1_000_000_000
            + format!("{f:0<9}")[..9].parse::<u64>().unwrap();
    }
    assert_eq!(
        total, usage.cost_nanos,
        "FOCUS adds up to the API's cost:\n{csv}"
    );

    // The CLI shows the same: the operator's table and FOCUS, and a budget set and lifted.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(atoll_cli())
            .arg("--url")
            .arg(&cp.url)
            .arg("--ca-file")
            .arg(&cp.ca)
            .args(["--token", cp.token.trim()])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "atoll {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let (from_arg, to_arg) = (
        atoll_control::usage::rfc3339(pf * 1000),
        atoll_control::usage::rfc3339(pt * 1000),
    );
    let table = cli(&["usage", "--from", &from_arg, "--to", &to_arg]);
    assert!(
        table.contains(&cid.to_string()) && table.contains(&usage.cost) && table.contains("EUR"),
        "{table}"
    );
    let focus_cli = cli(&[
        "usage", "--from", &from_arg, "--to", &to_arg, "--format", "focus",
    ]);
    assert_eq!(focus_cli, csv, "the CLI writes the API's export");
    let status = cli(&["cloud", "budget", &cid.to_string(), "--amount", "1000"]);
    assert!(status.contains("\"ok\""), "{status}");
    cli(&["cloud", "budget", &cid.to_string(), "--lift"]);

    let out = agent.cleanup();
    assert!(out.status.success(), "{out:?}");
    drop(agent);
    drop(cp);
}

/// Bytes the usage journal's segments hold.
fn usage_journal_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("usage"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Runs the FinOps Foundation's validator (`cargo xtask setup` installs it) on a FOCUS 1.2
/// export: only the rule it fails whatever the data may fail.
fn focus_validate(venv: &Path, csv: &str) {
    use atoll_control::focus::validator;
    let dir = tempfile::tempdir().unwrap();
    let (verdicts, report) =
        validator::run(venv, csv, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let failed = validator::failed(&verdicts, validator::DEFECTS);
    assert!(
        failed.is_empty(),
        "FOCUS 1.2 rules failed: {failed:?}\n{report}\n--- the export ---\n{csv}"
    );
    assert_eq!(
        verdicts.get("BilledCost-C-002-M").map(String::as_str),
        Some("PASS"),
        "{report}"
    );
}

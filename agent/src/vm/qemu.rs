//! The QEMU `microvm` driver: the command line for one VM, and how to tell whether KVM really
//! works on this host.
//!
//! Decisions:
//! - **Everything by file descriptor.** The tap queue, the config drive and every volume are
//!   opened by the agent and inherited at fixed numbers (`-netdev tap,fd=`, `-add-fd` +
//!   `/dev/fdset/N`), so the VMM, running as its own unprivileged uid, needs no access to
//!   `/dev/net/tun` or to the volume directory. Only the kernel, initramfs and QEMU's own
//!   files (world-readable) are opened by path.
//! - **The console is a socket the agent listens on** (`-chardev socket,...,reconnect=1`, QEMU
//!   as the client): QEMU connects before the guest runs, so no early output is lost, and it
//!   reconnects to a restarted agent by itself.
//! - **`-no-reboot` + `reboot=t`**: a guest that resets (its poweroff, or a panic with
//!   `panic=-1`) makes QEMU exit, which the supervisor sees; microvm has no ACPI power-off
//!   path the guest would need userspace for.
//! - **`-sandbox on`** with every optional restriction (seccomp): QEMU cannot spawn
//!   processes, raise privileges or change resource limits.
//! - **KVM is probed, not assumed**: `/dev/kvm` may exist and still fail on real guests (a
//!   nested PVM here fails stock kernels with emulation errors). [`probe_kvm`] boots the guest
//!   kernel in probe mode under KVM once; only a boot that prints the probe line counts.

use std::{
    ffi::OsString,
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use atoll_api::model::VolumeFormat;

use super::VmPlan;

/// How the VMM runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Where QEMU and its files are.
#[derive(Debug, Clone)]
pub struct QemuInstall {
    pub root: PathBuf,
}

impl QemuInstall {
    pub fn binary(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }

    /// The environment QEMU runs with: nothing of the agent's but the library path.
    pub fn env(&self) -> Vec<(OsString, OsString)> {
        let libs = ["usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"]
            .iter()
            .map(|d| self.root.join(d).display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        vec![
            ("LD_LIBRARY_PATH".into(), libs.into()),
            ("PATH".into(), "/usr/bin:/bin".into()),
        ]
    }

    /// `-L` firmware directories.
    pub fn firmware_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        for d in ["usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"] {
            let p = self.root.join(d);
            if p.is_dir() {
                args.push("-L".into());
                args.push(p.into());
            }
        }
        args
    }
}

/// The host's TSC frequency in kHz, as the guest's kernel command line needs it under TCG
/// (without `tsc_early_khz` and `lpj`, some TCG boots hang calibrating timers).
pub fn host_tsc_khz() -> u64 {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "cpu MHz").then(|| v.trim().parse::<f64>().ok())?
        })
        .map(|mhz| (mhz * 1000.0).round() as u64)
        .filter(|&k| k > 0)
        .unwrap_or(2_000_000)
}

/// The guest kernel command line.
pub fn kernel_cmdline(probe: bool) -> String {
    let khz = host_tsc_khz();
    let mut s = format!(
        "console=ttyS0 reboot=t panic=-1 quiet tsc_early_khz={khz} lpj={}",
        khz * 4
    );
    if probe {
        s.push_str(" atoll.probe=1");
    }
    s
}

impl QemuInstall {
    /// The command line that runs `plan`.
    pub fn args(&self, plan: &VmPlan) -> Vec<OsString> {
        let install = self;
        let vm = plan;
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        push("-name".into());
        push(format!("{},debug-threads=off", vm.name));
        push("-M".into());
        push("microvm,acpi=off".into());
        match vm.accel {
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"].map(|s| push(s.into())),
            Accel::Tcg => ["-accel", "tcg", "-cpu", "max"].map(|s| push(s.into())),
        };
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ] {
            push(s.into());
        }
        push("-m".into());
        push(format!("{}M", vm.memory_mib));
        push("-smp".into());
        push(vm.vcpus.to_string());
        push("-kernel".into());
        a.push(vm.kernel.clone().into());
        a.push("-initrd".into());
        a.push(vm.initrd.clone().into());
        a.push("-append".into());
        a.push(kernel_cmdline(false).into());
        a.push("-chardev".into());
        a.push(
            format!(
                "socket,id=con0,path={},reconnect=1",
                vm.console_socket.display()
            )
            .into(),
        );
        a.extend(["-serial".into(), "chardev:con0".into()]);
        for (i, d) in vm.disks.iter().enumerate() {
            let set = i + 1;
            let fmt = match d.format {
                VolumeFormat::Raw => "raw",
                VolumeFormat::Qcow2 => "qcow2",
            };
            for fd in std::iter::once(d.fd).chain(d.ro_fd) {
                a.push("-add-fd".into());
                a.push(format!("fd={fd},set={set}").into());
            }
            a.push("-drive".into());
            a.push(
                format!(
                    "id=d{i},file=/dev/fdset/{set},format={fmt},if=none,readonly={}",
                    if d.read_only { "on" } else { "off" }
                )
                .into(),
            );
            a.push("-device".into());
            a.push(format!("virtio-blk-device,drive=d{i},serial={}", d.serial).into());
        }
        a.push("-netdev".into());
        a.push(format!("tap,id=n0,fd={}", vm.tap_fd).into());
        a.push("-device".into());
        a.push(format!("virtio-net-device,netdev=n0,mac={}", vm.mac).into());
        a.push("-device".into());
        a.push("virtio-serial-device".into());
        a.push("-chardev".into());
        a.push(
            format!(
                "socket,id=sh0,path={},server=on,wait=off",
                vm.shell_socket.display()
            )
            .into(),
        );
        a.push("-device".into());
        a.push("virtconsole,chardev=sh0".into());
        // The guest agent's port (exec and files): its own socket, the guest finds it by name.
        a.push("-chardev".into());
        a.push(
            format!(
                "socket,id=ga0,path={},server=on,wait=off",
                vm.guest_socket.display()
            )
            .into(),
        );
        a.push("-device".into());
        a.push(format!("virtserialport,chardev=ga0,name={}", atoll_guest::PORT_NAME).into());
        a.extend(install.firmware_args());
        a
    }
}

/// Whether guests boot under KVM here: boots `kernel`/`initrd` in probe mode under KVM (as
/// root, no devices) and waits up to `timeout` for the probe line. Returns why not, if not.
pub fn probe_kvm(
    install: &QemuInstall,
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
) -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("/dev/kvm: {e}"));
    }
    let mut child = Command::new(install.binary())
        .env_clear()
        .envs(install.env())
        .args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "64",
        ])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(kernel_cmdline(true))
        .args(install.firmware_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", install.binary().display()))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    // Readers on their own threads: the probe ends on the line, on exit, or on the deadline.
    let (tx, rx) = std::sync::mpsc::channel::<(bool, Vec<u8>)>();
    let tx2 = tx.clone();
    std::thread::spawn(move || forward(&mut out, true, tx));
    std::thread::spawn(move || forward(&mut err, false, tx2));
    let deadline = Instant::now() + timeout;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let verdict = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => {
                stdout.extend_from_slice(&b);
                if contains(&stdout, b"atoll-guest: probe ok") {
                    break Ok(());
                }
            }
            Ok((false, b)) => {
                stderr.extend_from_slice(&b);
                // KVM reports an emulation failure and pauses the guest; no need to wait.
                if contains(&stderr, b"KVM internal error") || contains(&stderr, b"emulation") {
                    break Err(format!(
                        "KVM cannot run the guest: {}",
                        String::from_utf8_lossy(&stderr)
                            .lines()
                            .next()
                            .unwrap_or("")
                    ));
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                break Err(format!("no probe boot under KVM within {timeout:?}"))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                break Err(format!(
                    "QEMU exited under KVM: {}",
                    String::from_utf8_lossy(&stderr).trim()
                ))
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    verdict
}

fn forward(r: &mut impl Read, is_stdout: bool, tx: std::sync::mpsc::Sender<(bool, Vec<u8>)>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = r.read(&mut buf) {
        if n == 0 || tx.send((is_stdout, buf[..n].to_vec())).is_err() {
            return;
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_passes_everything_by_fd() {
        let vm = VmPlan {
            name: "atoll-c1-web".into(),
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 96,
            kernel: "/img/vmlinux".into(),
            initrd: "/img/initramfs.cpio.gz".into(),
            mac: "02:a8:0a:00:00:02".into(),
            tap_fd: 7,
            disks: vec![
                super::super::Disk {
                    fd: 4,
                    ro_fd: None,
                    format: VolumeFormat::Raw,
                    serial: "atoll-config".into(),
                    read_only: true,
                },
                super::super::Disk {
                    fd: 5,
                    ro_fd: Some(6),
                    format: VolumeFormat::Qcow2,
                    serial: "atoll-v0".into(),
                    read_only: false,
                },
            ],
            console_socket: "/run/x/console.sock".into(),
            shell_socket: "/run/x/shell.sock".into(),
            guest_socket: "/run/x/guest.sock".into(),
        };
        let args: Vec<String> = QemuInstall {
            root: "/nonexistent".into(),
        }
        .args(&vm)
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
        let line = args.join(" ");
        assert!(line.contains("-accel tcg -cpu max"), "{line}");
        assert!(line.contains(
            "-add-fd fd=4,set=1 -drive id=d0,file=/dev/fdset/1,format=raw,if=none,readonly=on"
        ));
        assert!(line.contains(
            "-add-fd fd=5,set=2 -add-fd fd=6,set=2 -drive id=d1,file=/dev/fdset/2,format=qcow2,if=none,readonly=off"
        ));
        assert!(line.contains("serial=atoll-v0"));
        assert!(line.contains("-netdev tap,id=n0,fd=7"));
        assert!(line.contains("socket,id=con0,path=/run/x/console.sock,reconnect=1"));
        assert!(line.contains("-m 96M -smp 2"));
        assert!(!line.contains("/dev/net/tun"));
        let append = args.iter().position(|a| a == "-append").unwrap();
        assert!(args[append + 1].contains("tsc_early_khz="));
        assert!(!args[append + 1].contains("atoll.probe"));
    }
}

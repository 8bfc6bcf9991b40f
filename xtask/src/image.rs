//! `cargo xtask image`: everything a host needs to boot atoll's microVMs (docs/vm.md, "Layout
//! on a host" and "Guest image"):
//!
//! - QEMU 7.2 from Debian bookworm, unpacked with `dpkg -x` under [`VMM_DIR`];
//! - the guest kernel, `make tinyconfig` of Debian's `linux-source-6.1` plus
//!   `guest/kernel.config`, as an uncompressed `vmlinux` with a PVH entry;
//! - the initramfs: Debian's `busybox-static`, e2fsprogs' `mke2fs`, `guest/init` and the guest
//!   agent (`guest/agent`, built here as a static binary: glibc's static libraries, no
//!   loader), which serves exec and files over the VM's own virtio-serial port.
//!
//! Each step is cached: a stamp file next to its output records the inputs it was built from,
//! and a step whose stamp matches does nothing. A probe boot of the result under TCG ends it.

use std::{
    collections::{HashSet, VecDeque},
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};

use crate::{apt_install, run};

/// QEMU 7.2's `dpkg -x` tree.
pub const VMM_DIR: &str = "/var/lib/atoll/vmm/qemu-7.2";
/// The default guest image: `vmlinux` and `initramfs.cpio.gz`.
pub const IMAGE_DIR: &str = "/var/lib/atoll/images/default";
/// Downloads and the kernel build tree.
pub const BUILD_DIR: &str = "/var/cache/atoll/build";

/// Bump when the QEMU recipe changes (package selection, unpacking), to redo the step.
const QEMU_RECIPE: u32 = 1;
/// Bump when the kernel build recipe changes (make targets, merge of the fragment).
const KERNEL_RECIPE: u32 = 1;
/// Bump when the initramfs layout changes.
const INITRAMFS_RECIPE: u32 = 2;

/// The Debian package QEMU comes from, and the version it must have.
const QEMU_PACKAGE: &str = "qemu-system-x86";
const QEMU_VERSION_PREFIX: &str = "1:7.2+";
/// Packages unpacked without their dependencies: qemu-system-common's are those of its
/// helpers and UI/audio modules (spice, GL, USB...), which atoll does not use; its
/// `accel-tcg-x86_64.so` module needs nothing the binary does not.
const QEMU_NO_DEPENDS: &[&str] = &["qemu-system-common"];

/// What the kernel and initramfs steps install with apt.
const IMAGE_APT_PACKAGES: &[&str] = &[
    "linux-source-6.1",
    "gcc",
    "libc6-dev",
    "make",
    "bc",
    "flex",
    "bison",
    "libelf-dev",
    "cpio",
    "xz-utils",
    "gzip",
    "busybox-static",
    "e2fsprogs",
    "binutils",
];
const LINUX_SOURCE: &str = "linux-source-6.1";

/// The kernel command line the driver uses (docs/vm.md), less the TSC values.
const CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet";

/// Builds (or finds cached) QEMU, the kernel and the initramfs, then probe-boots them.
pub fn image(root: &Path) -> Result<()> {
    fs::create_dir_all(BUILD_DIR)?;
    let _lock = BuildLock::acquire()?;
    apt_install(IMAGE_APT_PACKAGES)?;
    fs::create_dir_all(IMAGE_DIR)?;
    let qemu = qemu()?;
    let vmlinux = kernel(root)?;
    let initramfs = initramfs(root)?;
    probe(&qemu, &vmlinux, &initramfs)?;
    eprintln!("xtask image: done");
    println!("qemu:      {}", qemu.binary.display());
    println!("firmware:  -L {}", qemu.firmware.display());
    println!("libraries: LD_LIBRARY_PATH={}", qemu.library_path);
    println!("kernel:    {}", vmlinux.display());
    println!("initramfs: {}", initramfs.display());
    Ok(())
}

/// Serializes `cargo xtask image` on one host: a developer's run and a CI run share
/// /var/lib/atoll and the build tree, and two kernel builds in one tree break each other.
/// The lock is util-linux `flock` on `<BUILD_DIR>/.lock`, held by a child process until our
/// end of its stdin pipe closes, so it is released even if xtask dies.
struct BuildLock(std::process::Child);

impl BuildLock {
    fn acquire() -> Result<BuildLock> {
        use std::io::BufRead;
        let path = Path::new(BUILD_DIR).join(".lock");
        if !crate::succeeds(Command::new("flock").arg("-n").arg(&path).arg("true")) {
            eprintln!(
                "xtask image: waiting for another `cargo xtask image` ({} is locked)",
                path.display()
            );
        }
        let mut child = Command::new("flock")
            .arg(&path)
            .args(["-c", "echo locked && exec cat >/dev/null"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting flock")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("flock stdout")?;
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        ensure!(line.trim() == "locked", "flock {} failed", path.display());
        Ok(BuildLock(child))
    }
}

impl Drop for BuildLock {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// How to run the unpacked QEMU.
pub struct Qemu {
    pub binary: PathBuf,
    /// Passed as `-L`: qboot (microvm's `bios-microvm.bin`), `linuxboot_dma.bin`, `pvh.bin`.
    pub firmware: PathBuf,
    /// `LD_LIBRARY_PATH` for the libraries the host lacks.
    pub library_path: String,
}

impl Qemu {
    fn at(dir: &Path) -> Qemu {
        Qemu {
            binary: dir.join("usr/bin/qemu-system-x86_64"),
            firmware: dir.join("usr/share/qemu"),
            library_path: format!(
                "{}:{}",
                dir.join("usr/lib/x86_64-linux-gnu").display(),
                dir.join("lib/x86_64-linux-gnu").display()
            ),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.env("LD_LIBRARY_PATH", &self.library_path)
            .arg("-L")
            .arg(&self.firmware);
        cmd
    }
}

/// Reads a stamp file; `None` if absent.
fn read_stamp(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok()
}

/// Writes `contents` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The installed version of a Debian package.
fn installed_version(package: &str) -> Result<String> {
    let v = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", package]))?;
    ensure!(!v.trim().is_empty(), "{package} is not installed");
    Ok(v.trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// QEMU

fn qemu() -> Result<Qemu> {
    let dir = Path::new(VMM_DIR);
    let stamp_path = dir.join(".atoll-stamp");
    let qemu = Qemu::at(dir);
    let recipe = format!("recipe {QEMU_RECIPE}\n");
    if let Some(stamp) = read_stamp(&stamp_path) {
        if stamp.starts_with(&recipe) && qemu.binary.exists() {
            eprintln!("xtask image: QEMU present in {VMM_DIR}");
            return Ok(qemu);
        }
    }
    eprintln!(
        "xtask image: resolving {QEMU_PACKAGE} and the packages it needs that the host lacks"
    );
    let packages = qemu_packages()?;
    let main_version = packages
        .iter()
        .find(|(p, _)| p == QEMU_PACKAGE)
        .map(|(_, v)| v.clone())
        .context("no qemu-system-x86 candidate")?;
    ensure!(
        main_version.starts_with(QEMU_VERSION_PREFIX),
        "apt's {QEMU_PACKAGE} candidate is {main_version}, not QEMU 7.2 (bookworm)"
    );
    for (p, v) in &packages {
        // qemu-system-common must be the build of the same source upload.
        if QEMU_NO_DEPENDS.contains(&p.as_str()) {
            ensure!(
                *v == main_version,
                "{p} candidate {v} does not match {QEMU_PACKAGE} {main_version}"
            );
        }
    }
    let debs_dir = Path::new(BUILD_DIR).join("debs");
    fs::create_dir_all(&debs_dir)?;
    let mut debs = Vec::new();
    for (p, v) in &packages {
        debs.push(download(&debs_dir, p, v)?);
    }

    let tmp = dir.with_extension("new");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    for deb in &debs {
        eprintln!("xtask image: unpacking {}", deb.display());
        run(Command::new("dpkg").arg("-x").arg(deb).arg(&tmp))?;
    }
    let staged = Qemu::at(&tmp);
    check_libraries(&staged, &tmp)?;
    let version = output(staged.command().arg("-version"))?;
    ensure!(
        version.contains("version 7.2"),
        "unexpected QEMU version: {version}"
    );
    let mut stamp = recipe;
    for (p, v) in &packages {
        stamp.push_str(&format!("{p} {v}\n"));
    }
    fs::write(tmp.join(".atoll-stamp"), stamp)?;
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::rename(&tmp, dir)?;
    eprintln!(
        "xtask image: QEMU {} in {VMM_DIR} ({} packages)",
        version.lines().next().unwrap_or("").trim(),
        packages.len()
    );
    Ok(qemu)
}

/// `qemu-system-x86` and the closure of its dependencies (Depends and Pre-Depends) that are
/// not installed on the host, with apt's candidate versions. An alternative or a virtual
/// package is satisfied by any installed member, else by its first one.
fn qemu_packages() -> Result<Vec<(String, String)>> {
    let listing =
        output(Command::new("dpkg-query").args(["-W", "-f=${Package} ${db:Status-Status}\n"]))?;
    let installed: HashSet<&str> = listing
        .lines()
        .filter_map(|l| l.strip_suffix(" installed"))
        .collect();
    let mut queued: HashSet<String> = HashSet::from([QEMU_PACKAGE.to_string()]);
    let mut queue = VecDeque::from([QEMU_PACKAGE.to_string()]);
    let mut packages = Vec::new();
    while let Some(package) = queue.pop_front() {
        packages.push((package.clone(), candidate(&package)?));
        if QEMU_NO_DEPENDS.contains(&package.as_str()) {
            continue;
        }
        for group in depends(&package)? {
            if group
                .iter()
                .any(|p| installed.contains(p.as_str()) || queued.contains(p))
            {
                continue;
            }
            let first = group[0].clone();
            queued.insert(first.clone());
            queue.push_back(first);
        }
    }
    packages.sort();
    Ok(packages)
}

/// apt's candidate version of a package.
fn candidate(package: &str) -> Result<String> {
    let policy = output(Command::new("apt-cache").args(["policy", package]))?;
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)")
        .with_context(|| format!("apt has no candidate for {package} (run apt-get update?)"))
}

/// The dependency groups of a package (`apt-cache depends -i`): each group is a list of
/// alternatives, a virtual package standing for its providers.
fn depends(package: &str) -> Result<Vec<Vec<String>>> {
    let text = output(Command::new("apt-cache").args(["depends", "-i", package]))?;
    let mut groups = Vec::new();
    let mut group: Vec<String> = Vec::new();
    // Whether the last dependency line ended its group (no leading `|`).
    let mut closed = true;
    for line in text.lines().skip(1) {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if indent >= 4 {
            // A provider of the virtual package above.
            group.push(trimmed.trim().to_string());
            continue;
        }
        if closed && !group.is_empty() {
            groups.push(std::mem::take(&mut group));
        }
        let (alternative, rest) = match trimmed.strip_prefix('|') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        let Some(name) = rest
            .strip_prefix("Depends:")
            .or_else(|| rest.strip_prefix("PreDepends:"))
        else {
            continue;
        };
        let name = name.trim();
        if !(name.starts_with('<') && name.ends_with('>')) {
            group.push(name.to_string());
        }
        closed = !alternative;
    }
    if !group.is_empty() {
        groups.push(group);
    }
    Ok(groups)
}

/// The `.deb` of `package` at `version` in `dir`, downloaded unless already there.
fn download(dir: &Path, package: &str, version: &str) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            if !name.starts_with(&format!("{package}_")) || !name.ends_with(".deb") {
                continue;
            }
            let fields = output(
                Command::new("dpkg-deb")
                    .args(["-f"])
                    .arg(&path)
                    .args(["Package", "Version"]),
            )?;
            if fields.contains(&format!("Package: {package}\n"))
                && fields.contains(&format!("Version: {version}\n"))
            {
                return Ok(Some(path));
            }
        }
        Ok(None)
    };
    if let Some(path) = find()? {
        return Ok(path);
    }
    eprintln!("xtask image: downloading {package} {version}");
    run(Command::new("apt-get")
        .current_dir(dir)
        .args(["download", "-q"])
        .arg(format!("{package}={version}")))?;
    find()?.with_context(|| format!("apt-get download {package}={version} left no .deb"))
}

/// Fails if the QEMU binary or its TCG module needs a library neither the host nor the tree
/// has.
fn check_libraries(qemu: &Qemu, tree: &Path) -> Result<()> {
    let module = tree.join("usr/lib/x86_64-linux-gnu/qemu/accel-tcg-x86_64.so");
    for object in [qemu.binary.as_path(), module.as_path()] {
        let out = output(
            Command::new("ldd")
                .env("LD_LIBRARY_PATH", &qemu.library_path)
                .arg(object),
        )?;
        let missing: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("not found"))
            .map(str::trim)
            .collect();
        ensure!(
            missing.is_empty(),
            "{} lacks libraries: {}",
            object.display(),
            missing.join(", ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Kernel

fn kernel(root: &Path) -> Result<PathBuf> {
    let fragment_path = root.join("guest/kernel.config");
    let fragment = fs::read_to_string(&fragment_path)
        .with_context(|| format!("reading {}", fragment_path.display()))?;
    let source_version = installed_version(LINUX_SOURCE)?;
    let gcc = output(Command::new("gcc").arg("--version"))?;
    let stamp = format!(
        "recipe {KERNEL_RECIPE}\n{LINUX_SOURCE} {source_version}\n{}\n--- guest/kernel.config\n{fragment}",
        gcc.lines().next().unwrap_or("gcc")
    );
    let out = Path::new(IMAGE_DIR).join("vmlinux");
    let stamp_path = Path::new(IMAGE_DIR).join("vmlinux.stamp");
    if out.exists() && read_stamp(&stamp_path).as_deref() == Some(stamp.as_str()) {
        eprintln!("xtask image: kernel up to date ({})", out.display());
        return Ok(out);
    }

    let tree = Path::new(BUILD_DIR).join(LINUX_SOURCE);
    let tree_stamp = Path::new(BUILD_DIR).join(format!("{LINUX_SOURCE}.version"));
    if read_stamp(&tree_stamp).as_deref() != Some(source_version.as_str()) || !tree.exists() {
        if tree.exists() {
            fs::remove_dir_all(&tree)?;
        }
        eprintln!("xtask image: unpacking {LINUX_SOURCE} {source_version} into {BUILD_DIR}");
        run(Command::new("tar")
            .arg("-xf")
            .arg(format!("/usr/src/{LINUX_SOURCE}.tar.xz"))
            .arg("-C")
            .arg(BUILD_DIR))?;
        ensure!(
            tree.join("Makefile").exists(),
            "no {} after unpacking",
            tree.display()
        );
        fs::write(&tree_stamp, &source_version)?;
    }

    eprintln!("xtask image: configuring the kernel (tinyconfig + guest/kernel.config)");
    let make = || {
        let mut cmd = Command::new("make");
        cmd.current_dir(&tree).arg("ARCH=x86_64");
        cmd
    };
    run(make().args(["-s", "tinyconfig"]))?;
    run(Command::new("scripts/kconfig/merge_config.sh")
        .current_dir(&tree)
        .env("ARCH", "x86_64")
        .args(["-m", ".config"])
        .arg(&fragment_path))?;
    run(make().args(["-s", "olddefconfig"]))?;
    check_config(&tree.join(".config"), &fragment)?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!("xtask image: building vmlinux with -j{jobs} (a few minutes on 2 cores)");
    let started = Instant::now();
    run(make().arg(format!("-j{jobs}")).arg("vmlinux"))?;
    let built = tree.join("vmlinux");
    let notes = output(Command::new("readelf").arg("-n").arg(&built))?;
    // XEN_ELFNOTE_PHYS32_ENTRY (18): the PVH entry point QEMU's -kernel looks for.
    ensure!(
        notes
            .lines()
            .any(|l| l.contains("Xen") && l.contains("0x00000012")),
        "{} has no PVH entry note (CONFIG_PVH)",
        built.display()
    );
    write_atomic(&out, &fs::read(&built)?)?;
    fs::write(&stamp_path, stamp)?;
    eprintln!(
        "xtask image: kernel built in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(out)
}

/// Fails unless every `CONFIG_X=v` and `# CONFIG_X is not set` line of the fragment holds in
/// the final `.config` (Kconfig silently drops values whose dependencies are missing).
fn check_config(config: &Path, fragment: &str) -> Result<()> {
    let config = fs::read_to_string(config)?;
    let set: HashSet<&str> = config
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .collect();
    let mut wrong = Vec::new();
    for line in fragment.lines().map(str::trim) {
        if line.starts_with("CONFIG_") {
            if !set.contains(line) {
                wrong.push(line.to_string());
            }
        } else if let Some(name) = line
            .strip_prefix("# ")
            .and_then(|l| l.strip_suffix(" is not set"))
        {
            let prefix = format!("{name}=");
            if set.iter().any(|l| l.starts_with(&prefix)) {
                wrong.push(format!("{name} unset"));
            }
        }
    }
    ensure!(
        wrong.is_empty(),
        "the kernel config does not hold: {}",
        wrong.join(", ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Initramfs

fn initramfs(root: &Path) -> Result<PathBuf> {
    let init_path = root.join("guest/init");
    let init = fs::read_to_string(&init_path)
        .with_context(|| format!("reading {}", init_path.display()))?;
    let agent = guest_agent(root)?;
    let agent_sum = output(Command::new("sha256sum").arg(&agent))?;
    let stamp = format!(
        "recipe {INITRAMFS_RECIPE}\nbusybox-static {}\ne2fsprogs {}\nguest agent {}\n--- guest/init\n{init}",
        installed_version("busybox-static")?,
        installed_version("e2fsprogs")?,
        agent_sum.split_whitespace().next().unwrap_or_default(),
    );
    let out = Path::new(IMAGE_DIR).join("initramfs.cpio.gz");
    let stamp_path = Path::new(IMAGE_DIR).join("initramfs.stamp");
    if out.exists() && read_stamp(&stamp_path).as_deref() == Some(stamp.as_str()) {
        eprintln!("xtask image: initramfs up to date ({})", out.display());
        return Ok(out);
    }
    eprintln!("xtask image: assembling the initramfs (busybox-static, mke2fs, guest/init)");
    let staging = Path::new(BUILD_DIR).join("initramfs");
    if staging.exists() {
        fs::remove_dir_all(&staging)?;
    }
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "dev", "proc", "sys", "run", "tmp", "mnt",
        "root", "var",
    ] {
        fs::create_dir_all(staging.join(dir))?;
    }
    std::os::unix::fs::symlink("../run", staging.join("var/run"))?;

    // e2fsprogs' mke2fs, with the shared libraries it loads: busybox's only makes ext2.
    let mke2fs = Path::new("/sbin/mke2fs");
    copy_into(&staging, mke2fs)?;
    for lib in shared_libraries(mke2fs)? {
        copy_into(&staging, &lib)?;
    }
    copy_into(&staging, Path::new("/etc/mke2fs.conf"))?;
    for alias in ["mkfs.ext4", "mkfs.ext2"] {
        std::os::unix::fs::symlink("mke2fs", staging.join("sbin").join(alias))?;
    }

    fs::copy("/bin/busybox", staging.join("bin/busybox"))?;
    let applets = output(Command::new("/bin/busybox").arg("--list-full"))?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = staging.join(applet);
        if link.exists() || link.is_symlink() {
            continue; // mke2fs from e2fsprogs, and bin/busybox itself
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }

    fs::copy(&agent, staging.join("sbin/atoll-guest-agent"))?;

    fs::write(
        staging.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\n",
    )?;
    fs::write(staging.join("etc/group"), "root:x:0:\ntty:x:5:\n")?;
    let init_dest = staging.join("init");
    fs::write(&init_dest, &init)?;
    fs::set_permissions(
        &init_dest,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    // Without /dev/console in the initramfs, PID 1 starts with no stdin, stdout or stderr.
    run(Command::new("mknod")
        .args(["-m", "600"])
        .arg(staging.join("dev/console"))
        .args(["c", "5", "1"]))?;

    let tmp = out.with_extension("tmp");
    run(Command::new("sh")
        .args([
            "-c",
            "cd \"$1\" && find . -print0 | LC_ALL=C sort -z \
             | cpio --null --create --format=newc --owner=0:0 --quiet | gzip -9 -n > \"$2\"",
            "sh",
        ])
        .arg(&staging)
        .arg(&tmp))?;
    fs::rename(&tmp, &out)?;
    fs::write(&stamp_path, stamp)?;
    eprintln!(
        "xtask image: initramfs {} ({} KiB)",
        out.display(),
        fs::metadata(&out)?.len() / 1024
    );
    Ok(out)
}

/// Builds the guest agent as a static executable (its own target directory: the flags differ
/// from the workspace's) and returns its path.
fn guest_agent(root: &Path) -> Result<PathBuf> {
    const TARGET: &str = "x86_64-unknown-linux-gnu";
    let target_dir = root.join("target/guest");
    run(crate::cargo()
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-q",
            "-p",
            "atoll-guest",
            "--bin",
            "atoll-guest-agent",
        ])
        .args(["--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=symbols",
        ))?;
    let bin = target_dir.join(TARGET).join("release/atoll-guest-agent");
    // A dynamic executable has a PT_INTERP program header (its loader); the initramfs has
    // no loader. ELF64 little-endian: e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38.
    let bytes = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    let field = |at: usize, n: usize| -> Result<u64> {
        let b = bytes.get(at..at + n).context("a truncated ELF file")?;
        Ok(b.iter().rev().fold(0u64, |acc, x| (acc << 8) | *x as u64))
    };
    ensure!(
        bytes.starts_with(b"\x7fELF\x02\x01"),
        "{} is not an ELF64 LE file",
        bin.display()
    );
    let (phoff, phentsize, phnum) = (field(0x20, 8)?, field(0x36, 2)?, field(0x38, 2)?);
    for i in 0..phnum {
        const PT_INTERP: u64 = 3;
        ensure!(
            field((phoff + i * phentsize) as usize, 4)? != PT_INTERP,
            "{} is not static (it has a program interpreter)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Copies a file to the same path under `staging`, following symlinks.
fn copy_into(staging: &Path, file: &Path) -> Result<()> {
    let dest = staging.join(file.strip_prefix("/").unwrap_or(file));
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(file, &dest).with_context(|| format!("copying {}", file.display()))?;
    Ok(())
}

/// The shared libraries (and the dynamic loader) a binary loads, from `ldd`.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = output(Command::new("ldd").arg(binary))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        ensure!(
            !line.contains("not found"),
            "{}: {}",
            binary.display(),
            line.trim()
        );
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x...)"
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

// ---------------------------------------------------------------------------------------------
// Probe boot

/// Boots the image once in probe mode under TCG, with the sandbox on, as the driver's KVM
/// probe does: proves QEMU, firmware, kernel and init work together.
fn probe(qemu: &Qemu, vmlinux: &Path, initramfs: &Path) -> Result<()> {
    let khz = host_khz()?;
    let started = Instant::now();
    let mut cmd = qemu.command();
    cmd.args([
        "-M",
        "microvm,acpi=off",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-m",
        "64",
    ])
    .args(["-smp", "1", "-nodefaults", "-no-user-config", "-nographic"])
    .args(["-no-reboot", "-serial", "stdio"])
    .args([
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ])
    .arg("-kernel")
    .arg(vmlinux)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(format!(
        "{CMDLINE} tsc_early_khz={khz} lpj={} atoll.probe=1",
        4 * khz
    ));
    let mut timeout = Command::new("timeout");
    timeout
        .arg("120")
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            timeout.env(k, v);
        }
    }
    eprintln!("xtask image: probe boot (TCG, sandbox on)");
    let out = timeout
        .stdin(std::process::Stdio::null())
        .output()
        .context("starting the probe boot")?;
    let console = String::from_utf8_lossy(&out.stdout);
    if !console.contains("atoll-guest: probe ok") || !out.status.success() {
        bail!(
            "the probe boot failed ({}); console:\n{console}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "xtask image: probe boot ok in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

/// The host's TSC frequency in kHz, from /proc/cpuinfo's "cpu MHz".
pub fn host_khz() -> Result<u64> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo")?;
    let mhz: f64 = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("cpu MHz")
                .and_then(|r| r.split(':').nth(1))
                .and_then(|v| v.trim().parse().ok())
        })
        .context("no \"cpu MHz\" in /proc/cpuinfo")?;
    Ok((mhz * 1000.0).round() as u64)
}

//! The pinned layout on bpffs, one level below the `Dataplane`: its directories, loading the
//! object with its maps pinned or private, pinning its programs, and the build marker. The
//! layout checks and migrations (`layout`), the in-place upgrade (`upgrade`) and the links
//! (`links`) are built on it; it depends on none of them.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{links::FdLink, BtfTracePoint, ProgramError, SchedClassifier},
    Btf, EbpfLoader,
};

use atoll_dataplane_common::LAYOUT_VERSION;

use super::{
    error::DataplaneError,
    kernel::{self, permission_error},
    maps,
};
use crate::config::DataplaneConfig;

/// Prefix of the pinned TCX link of `from_dns` (`dns-<ifindex>`).
pub(super) const DNS_LINK_PREFIX: &str = "dns-";

/// Prefix of the pinned TCX link of `from_uplink` (`uplink-<ifindex>`).
pub(super) const UPLINK_LINK_PREFIX: &str = "uplink-";

/// Prefix of the pinned TCX link of `from_overlay` (`overlay-<ifindex>`).
pub(super) const OVERLAY_LINK_PREFIX: &str = "overlay-";

/// Prefix of the pinned TCX link of `from_underlay` (`underlay-<ifindex>`).
pub(super) const UNDERLAY_LINK_PREFIX: &str = "underlay-";

/// Directory of carried maps inside a layout directory (see `carry`).
pub(super) const CARRY_DIR: &str = "carry";

/// The compiled eBPF object, built by this crate's build script from `dataplane-ebpf/`.
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/atoll-dataplane.o"));

/// Program names in the object.
pub const PROG_FROM_VM: &str = "from_vm";

pub const PROG_TO_VM: &str = "to_vm";

pub const PROG_FROM_DNS: &str = "from_dns";

pub const PROG_FROM_UPLINK: &str = "from_uplink";

pub const PROG_FROM_OVERLAY: &str = "from_overlay";

pub const PROG_FROM_UNDERLAY: &str = "from_underlay";

/// The program on the kernel's `kfree_skb` tracepoint (and the tracepoint's name).
pub const PROG_KFREE_SKB: &str = "kfree_skb";

/// The pin of `kfree_skb`'s link in `links/`.
pub const KFREE_SKB_LINK: &str = "kfree-skb";

/// The read-only global holding `kfree_skb`'s `KfreeSkbConfig`.
pub(super) const KFREE_SKB_CONFIG: &str = "KFREE_SKB_CONFIG";

/// Every TCX program.
pub(super) const PROGS: [&str; 6] = [
    PROG_FROM_VM,
    PROG_TO_VM,
    PROG_FROM_DNS,
    PROG_FROM_UPLINK,
    PROG_FROM_OVERLAY,
    PROG_FROM_UNDERLAY,
];

/// Every program pinned under `progs/`.
pub(super) const PINNED_PROGS: [&str; 7] = [
    PROG_FROM_VM,
    PROG_TO_VM,
    PROG_FROM_DNS,
    PROG_FROM_UPLINK,
    PROG_FROM_OVERLAY,
    PROG_FROM_UNDERLAY,
    PROG_KFREE_SKB,
];

pub(super) const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// `<root>/v<LAYOUT_VERSION>`.
pub fn layout_dir(root: &Path) -> PathBuf {
    root.join(format!("v{LAYOUT_VERSION}"))
}

/// Checks that `root` (or its closest existing ancestor) is on a bpffs.
pub fn check_bpffs(root: &Path) -> Result<(), DataplaneError> {
    // The root may not exist yet: check the closest existing ancestor.
    let mut probe = root;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    let c = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes())
        .map_err(|_| DataplaneError::BpffsNotMounted { path: root.into() })?;
    // SAFETY: an all-zero `statfs` is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs writes into the struct we own; `c` is a valid NUL-terminated path.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != BPF_FS_MAGIC {
        return Err(DataplaneError::BpffsNotMounted { path: probe.into() });
    }
    Ok(())
}

pub(super) fn create_pins(cfg: &DataplaneConfig, dir: &Path) -> Result<(), DataplaneError> {
    let tmp = tmp_dir(dir);
    let result = (|| {
        create_layout_dirs(&tmp)?;
        // aya creates each map and pins it at its path (none exists yet).
        let mut ebpf = load_object(cfg, &tmp.join("maps"))?;
        pin_programs(&mut ebpf, &tmp.join("progs"), "")?;
        attach_kfree_skb(&mut ebpf, &tmp.join("links"))?;
        mark_build(&tmp)?;
        rename(&tmp, dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another process created the layout meanwhile: use that one.
        if dir.join("progs").join(PROG_FROM_DNS).exists() {
            return Ok(());
        }
    }
    result
}

/// `<dir>-tmp-<pid>`: where a layout is built before it is renamed into place.
pub(super) fn tmp_dir(dir: &Path) -> PathBuf {
    dir.with_file_name(format!(
        "{}-tmp-{}",
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("v"),
        std::process::id()
    ))
}

pub(super) fn create_layout_dirs(dir: &Path) -> Result<(), DataplaneError> {
    for sub in ["maps", "progs", "links", CARRY_DIR] {
        let p = dir.join(sub);
        atoll_api::private::create_dir_all(&p, 0o700)
            .map_err(|source| DataplaneError::CreatePinDir { path: p, source })?;
    }
    Ok(())
}

/// Loads the embedded object with private, unpinned maps (the configurable ones sized
/// `entries`) and verifies its programs; nothing is pinned or attached (`atoll-agent doctor`).
pub fn load_unpinned(entries: u32) -> Result<aya::Ebpf, DataplaneError> {
    let cfg = DataplaneConfig {
        max_endpoints: entries,
        max_routes: entries,
        max_vips: entries,
        max_flows: entries,
        ..DataplaneConfig::default()
    };
    load_object_with(&cfg, None)
}

/// Loads the object with every map pinned under `maps` (aya opens a map pinned there and
/// creates and pins a missing one) and loads (verifies) its programs, unpinned.
pub(super) fn load_object(cfg: &DataplaneConfig, maps: &Path) -> Result<aya::Ebpf, DataplaneError> {
    load_object_with(cfg, Some(maps))
}

pub(super) fn load_object_with(
    cfg: &DataplaneConfig,
    maps: Option<&Path>,
) -> Result<aya::Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    for m in &maps::REGISTRY {
        if let maps::Capacity::Config(setting) = m.capacity {
            loader.map_max_entries(m.name, setting.get(cfg));
        }
    }
    let kfree_skb = kernel::kfree_skb_config()?;
    loader.override_global(KFREE_SKB_CONFIG, &kfree_skb, true);
    if let Some(dir) = maps {
        for m in &maps::REGISTRY {
            loader.map_pin_path(m.name, dir.join(m.name));
        }
    }
    let mut ebpf = loader
        .load(OBJECT)
        .map_err(|source| match permission_error(&source) {
            Some(e) => DataplaneError::MissingCapability {
                operation: "loading eBPF maps".into(),
                source: e,
            },
            None => DataplaneError::LoadObject {
                source: Box::new(source),
            },
        })?;
    for name in PROGS {
        program_mut(&mut ebpf, name)?
            .load()
            .map_err(|source| DataplaneError::LoadProgram {
                program: static_name(name),
                source: Box::new(source),
            })?;
    }
    let btf = Btf::from_sys_fs().map_err(|e| DataplaneError::KernelBtf {
        btf: kernel::VMLINUX_BTF,
        problem: e.to_string(),
    })?;
    tracepoint_mut(&mut ebpf)?
        .load(PROG_KFREE_SKB, &btf)
        .map_err(|source| DataplaneError::LoadProgram {
            program: PROG_KFREE_SKB,
            source: Box::new(source),
        })?;
    Ok(ebpf)
}

pub(super) fn tracepoint_mut(ebpf: &mut aya::Ebpf) -> Result<&mut BtfTracePoint, DataplaneError> {
    let err = |source| DataplaneError::LoadProgram {
        program: PROG_KFREE_SKB,
        source: Box::new(source),
    };
    ebpf.program_mut(PROG_KFREE_SKB)
        .ok_or(err(ProgramError::NotLoaded))?
        .try_into()
        .map_err(err)
}

/// Attaches the loaded `kfree_skb` to its tracepoint and pins the link as
/// `<links>/kfree-skb`, replacing a pinned one (an upgrade) only once the new link is attached
/// (the rename over the old pin detaches the old program).
pub(super) fn attach_kfree_skb(ebpf: &mut aya::Ebpf, links: &Path) -> Result<(), DataplaneError> {
    let prog = tracepoint_mut(ebpf)?;
    let attach = |source| DataplaneError::Attach {
        program: PROG_KFREE_SKB,
        device: "the kfree_skb tracepoint".into(),
        source: Box::new(source),
    };
    let id = prog.attach().map_err(attach)?;
    let link = FdLink::from(prog.take_link(id).map_err(attach)?);
    let new = links.join(format!("{KFREE_SKB_LINK}-new"));
    // A pin left by an upgrade that crashed here: its link goes, the old one still counts.
    remove_pin(&new)?;
    link.pin(&new).map_err(|e| DataplaneError::Pin {
        path: new.clone(),
        source: io::Error::other(e.to_string()),
    })?;
    let current = links.join(KFREE_SKB_LINK);
    // Held across the rename: the pin's reference then is not the last, and closing this fd
    // releases the old link at once (the last reference of a pin is put from a kernel work
    // queue, later), so the old program has stopped when this returns.
    let old = aya::programs::links::PinnedLink::from_pin(&current).ok();
    rename(&new, &current)?;
    drop(old);
    Ok(())
}

pub(super) fn program_mut<'a>(
    ebpf: &'a mut aya::Ebpf,
    name: &str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    ebpf.program_mut(name)
        .ok_or(DataplaneError::LoadProgram {
            program: static_name(name),
            source: Box::new(ProgramError::NotLoaded),
        })?
        .try_into()
        .map_err(|source| DataplaneError::LoadProgram {
            program: static_name(name),
            source: Box::new(source),
        })
}

/// Pins every loaded program as `<progs>/<name><suffix>`.
pub(super) fn pin_programs(
    ebpf: &mut aya::Ebpf,
    progs: &Path,
    suffix: &str,
) -> Result<(), DataplaneError> {
    for name in PROGS {
        let path = progs.join(format!("{name}{suffix}"));
        remove_pin(&path)?;
        program_mut(ebpf, name)?
            .pin(&path)
            .map_err(|e| DataplaneError::Pin {
                path: path.clone(),
                source: io::Error::other(e.to_string()),
            })?;
    }
    let path = progs.join(format!("{PROG_KFREE_SKB}{suffix}"));
    remove_pin(&path)?;
    tracepoint_mut(ebpf)?
        .pin(&path)
        .map_err(|e| DataplaneError::Pin {
            path: path.clone(),
            source: io::Error::other(e.to_string()),
        })
}

/// Renames a pin or pin directory (atomic on bpffs; replaces a pin at `to`).
pub(super) fn rename(from: &Path, to: &Path) -> Result<(), DataplaneError> {
    std::fs::rename(from, to).map_err(|source| DataplaneError::Rename {
        from: from.into(),
        to: to.into(),
        source,
    })
}

pub(super) fn static_name(name: &str) -> &'static str {
    PINNED_PROGS
        .into_iter()
        .find(|p| *p == name)
        .unwrap_or(PROG_FROM_VM)
}

pub(super) fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Unpin {
            path: path.into(),
            source,
        }),
    }
}

/// Entries of a pin directory (none if it does not exist).
pub(super) fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(|e| e.ok()).map(|e| e.path()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(DataplaneError::ReadPinDir {
            path: dir.into(),
            source,
        }),
    }
}

pub(super) fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Name prefix of the build marker directory.
pub const BUILD_MARKER_PREFIX: &str = "build-";

/// The identity of the embedded eBPF object: 16 hex digits of its FNV-1a 64 hash.
pub fn build_id() -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in OBJECT {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Build ids recorded in the layout directory `dir` (normally one).
pub fn pinned_builds(dir: &Path) -> Result<Vec<String>, DataplaneError> {
    Ok(read_dir(dir)?
        .iter()
        .filter_map(|p| {
            file_name(p)
                .strip_prefix(BUILD_MARKER_PREFIX)
                .map(str::to_string)
        })
        .collect())
}

/// Records this build as the pinned one in `dir`, removing other markers.
pub(super) fn mark_build(dir: &Path) -> Result<(), DataplaneError> {
    let id = build_id();
    let marker = dir.join(format!("{BUILD_MARKER_PREFIX}{id}"));
    atoll_api::private::create_dir_all(&marker, 0o700).map_err(|source| {
        DataplaneError::CreatePinDir {
            path: marker.clone(),
            source,
        }
    })?;
    for other in pinned_builds(dir)? {
        if other != id {
            let path = dir.join(format!("{BUILD_MARKER_PREFIX}{other}"));
            std::fs::remove_dir(&path).map_err(|source| DataplaneError::Unpin { path, source })?;
        }
    }
    Ok(())
}

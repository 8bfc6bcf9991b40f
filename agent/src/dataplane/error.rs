//! The dataplane's one error type, and the helpers that build it from map operations (a
//! leaf: every other module of `dataplane` uses it, it uses none of them).

use std::{io, path::PathBuf};

use aya::{maps::MapError, programs::ProgramError, EbpfError};

use atoll_dataplane_common::LAYOUT_VERSION;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "{path} is not on a bpffs: set dataplane.bpffs_root to a directory under a mounted \
         bpffs (default /sys/fs/bpf/atoll; mount it with `mount -t bpf bpf /sys/fs/bpf`)"
    )]
    BpffsNotMounted { path: PathBuf },
    #[error("missing capability: {operation} needs CAP_BPF and CAP_NET_ADMIN (run as root)")]
    MissingCapability {
        operation: String,
        source: io::Error,
    },
    #[error("creating pin directory {path}: {source}")]
    CreatePinDir { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object: {source}")]
    LoadObject { source: Box<EbpfError> },
    #[error("loading program {program} into the kernel: {source}")]
    LoadProgram {
        program: &'static str,
        source: Box<ProgramError>,
    },
    #[error("pinning {path}: {source}")]
    Pin { path: PathBuf, source: io::Error },
    #[error("opening pinned map {path}: {source}")]
    OpenMap {
        path: PathBuf,
        source: Box<MapError>,
    },
    #[error("opening pinned program {path}: {source}")]
    OpenProgram {
        path: PathBuf,
        source: Box<ProgramError>,
    },
    #[error("kernel feature missing: {feature} ({source})")]
    KernelFeatureMissing {
        feature: &'static str,
        source: Box<ProgramError>,
    },
    #[error("attaching {program} to {device}: {source}")]
    Attach {
        program: &'static str,
        device: String,
        source: Box<ProgramError>,
    },
    #[error("taking the TCX link of {program} on {device}: {source}")]
    AttachLink {
        program: &'static str,
        device: String,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("map {map} is full ({capacity} entries); raise dataplane.{setting}")]
    MapFull {
        map: &'static str,
        capacity: u32,
        setting: &'static str,
    },
    #[error("{what} already exists in map {map}")]
    EntryExists { map: &'static str, what: String },
    #[error("updating map {map}: {source}")]
    UpdateMap {
        map: &'static str,
        source: Box<MapError>,
    },
    #[error("reading map {map}: {source}")]
    ReadMap {
        map: &'static str,
        source: Box<MapError>,
    },
    #[error("removing {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("reading {path}: {source}")]
    ReadPinDir { path: PathBuf, source: io::Error },
    #[error("renaming {from} to {to}: {source}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error(
        "pinned map {path} does not match this build (layout v{LAYOUT_VERSION}): {problem}; \
         pins of another shape under the same layout version are a bug (the layout changed \
         without a LAYOUT_VERSION bump) or were made by another program: drain the host and \
         recreate the dataplane (`atoll-agent cleanup`, then `atoll-agent run`)"
    )]
    MapMismatch { path: PathBuf, problem: String },
    #[error(
        "pinned map {path} has {pinned} entries, but the dataplane's other maps sized by \
         dataplane.{setting} hold {expected}: the pins are inconsistent; drain the host and \
         recreate the dataplane (`atoll-agent cleanup`, then `atoll-agent run`)"
    )]
    MapCapacity {
        path: PathBuf,
        pinned: u32,
        expected: u32,
        setting: &'static str,
    },
    #[error(
        "pins of map layout v{found} exist under {root}: run `atoll-agent migrate` (or \
         `atoll-agent run`, which migrates on start) to move them to layout v{LAYOUT_VERSION}"
    )]
    MigrationPending { root: PathBuf, found: u32 },
    #[error(
        "pins of map layout v{found} exist under {root}, and this agent migrates only from \
         v{supported} (or later) to v{LAYOUT_VERSION}: drain the host (move its VMs away), remove them with \
         `rm -r {root}/v{found}` (this detaches their programs) and delete their devices, or \
         migrate with an agent release in between"
    )]
    MigrationUnsupported {
        root: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "pins of map layout v{found} under {root} are newer than this agent (layout \
         v{LAYOUT_VERSION}): install the newer agent again; downgrading across a layout change \
         is not supported"
    )]
    NewerLayout { root: PathBuf, found: u32 },
    #[error(
        "{new} and {old} hold different dataplanes (their ENDPOINTS maps differ), so the \
         migration from {old} cannot be resumed: drain the host and remove one of them"
    )]
    MigrationDiverged { old: PathBuf, new: PathBuf },
    #[error("opening pinned link {path}: {source}")]
    OpenLink {
        path: PathBuf,
        source: Box<aya::programs::links::LinkError>,
    },
    #[error(
        "reading the kernel's BTF ({btf}) for the kfree_skb program: {problem}; atoll needs a \
         kernel built with CONFIG_DEBUG_INFO_BTF"
    )]
    KernelBtf { btf: &'static str, problem: String },
    #[error("replacing the program of link {path} (BPF_LINK_UPDATE): {source}")]
    UpdateLink {
        path: PathBuf,
        source: Box<ProgramError>,
    },
}

pub(super) fn insert_error(
    e: MapError,
    map: &'static str,
    what: String,
    capacity: u32,
    setting: &'static str,
) -> DataplaneError {
    if let MapError::SyscallError(s) = &e {
        match s.io_error.raw_os_error() {
            Some(libc::EEXIST) => return DataplaneError::EntryExists { map, what },
            Some(libc::E2BIG) | Some(libc::ENOMEM) => {
                return DataplaneError::MapFull {
                    map,
                    capacity,
                    setting,
                }
            }
            _ => {}
        }
    }
    DataplaneError::UpdateMap {
        map,
        source: Box::new(e),
    }
}

pub(super) fn ignore_missing(
    r: Result<(), MapError>,
    map: &'static str,
) -> Result<(), DataplaneError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(DataplaneError::UpdateMap {
            map,
            source: Box::new(source),
        }),
    }
}

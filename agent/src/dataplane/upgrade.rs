//! Hitless program upgrades: a new build of the eBPF object takes over the pinned maps and
//! every pinned TCX link without a device ever being without a program.
//!
//! Decisions:
//! - **Which build is pinned** is recorded as an empty directory `build-<id>` in the layout
//!   directory, `<id>` being [`build_id`] (FNV-1a 64 of the embedded object's bytes: an
//!   identity, not a security check). A directory is what bpffs holds besides pins, and it lives
//!   and dies with the pins (a reboot clears both). Program tags would need the new programs
//!   loaded (verified) on every start just to compare.
//! - **Order of an upgrade:** check the pinned maps against this build (every start does);
//!   load the new object against them (`EbpfLoader::map_pin_path` for every map: aya reuses
//!   a pinned map), which verifies the programs; pin them beside the old ones (`<name>-new`);
//!   give every pinned link its new program with `BPF_LINK_UPDATE` (aya's
//!   `SchedClassifier::attach_to_link`), which swaps the program atomically under the link,
//!   keeping its place among TCX programs; attach the new `kfree_skb` beside the old one and
//!   rename its link pin over the old link's (tracing links take no `BPF_LINK_UPDATE`; the
//!   rename detaches the old program, so a frame freed in between is counted twice, never
//!   missed); rename the new program pins over the old ones; last, replace the marker. A crash anywhere leaves the old marker, so the next start
//!   repeats the (idempotent) upgrade.
//! - **A link whose device is gone** (`ENOLINK`) is left to `Host::reconcile`, which removes it.
//! - Both builds share the maps during the upgrade, which is sound because they share the
//!   layout version (a layout change goes through a migration, see `layout`).

use std::path::{Path, PathBuf};

use super::{
    error::DataplaneError,
    layout,
    links::{switch_links, Programs, Switched},
    pins::*,
};
use crate::config::DataplaneConfig;
use atoll_dataplane_common::LAYOUT_VERSION;

/// What [`prepare`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prepared {
    /// The dataplane was created (nothing was pinned).
    pub created: bool,
    /// Pins of this layout version were migrated into the current one.
    pub migrated_from: Option<u32>,
    /// Counter maps frozen under `carry/` by the migration.
    pub carried: Vec<String>,
    /// The programs were upgraded from these builds (empty: none recorded).
    pub upgraded_from: Option<Vec<String>>,
    /// Links given new programs (migration and upgrade).
    pub links_switched: usize,
    /// Links whose device is gone.
    pub stale_links: usize,
}

impl std::fmt::Display for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let build = build_id();
        if self.created {
            return write!(f, "created layout v{LAYOUT_VERSION}, build {build}");
        }
        if let Some(v) = self.migrated_from {
            write!(f, "migrated layout v{v} to v{LAYOUT_VERSION}")?;
            if !self.carried.is_empty() {
                write!(f, " (frozen counters carried: {})", self.carried.join(", "))?;
            }
            write!(f, ", ")?;
        }
        match &self.upgraded_from {
            Some(old) if self.migrated_from.is_none() => write!(
                f,
                "upgraded programs from build {} to {build}, ",
                if old.is_empty() {
                    "(unrecorded)".to_string()
                } else {
                    old.join("+")
                }
            )?,
            _ if self.migrated_from.is_none() => {
                return write!(f, "layout v{LAYOUT_VERSION}, build {build} (current)")
            }
            _ => write!(f, "build {build}, ")?,
        }
        write!(
            f,
            "{} links switched atomically ({} stale)",
            self.links_switched, self.stale_links
        )
    }
}

/// Brings the pins under `cfg.bpffs_root` to this agent: migrates the previous layout's pins
/// (see `layout`), creates the dataplane if nothing is pinned, and upgrades pinned programs
/// of another build in place. Traffic keeps flowing throughout. `atoll-agent run` calls it
/// before opening the dataplane; nothing else should run agent commands meanwhile.
pub fn prepare(cfg: &DataplaneConfig) -> Result<Prepared, DataplaneError> {
    let root = &cfg.bpffs_root;
    check_bpffs(root)?;
    remove_stale_tmp(root)?;
    let mut out = Prepared::default();
    for v in layout::layout_versions(root)? {
        if v > LAYOUT_VERSION {
            return Err(DataplaneError::NewerLayout {
                root: root.clone(),
                found: v,
            });
        }
        if v < LAYOUT_VERSION {
            let m = layout::migrate(cfg, root, v)?;
            out.migrated_from = Some(v);
            out.carried = m.carried;
            out.links_switched += m.links;
            out.stale_links += m.stale_links;
        }
    }
    let dir = layout_dir(root);
    if !dir.join("progs").join(PROG_FROM_DNS).exists() {
        create_pins(cfg, &dir)?;
        out.created = out.migrated_from.is_none();
        return Ok(out);
    }
    layout::check_maps(&dir.join("maps"), cfg)?;
    let builds = pinned_builds(&dir)?;
    if builds != [build_id()] {
        let s = upgrade(cfg, &dir)?;
        out.upgraded_from = Some(builds.into_iter().filter(|b| *b != build_id()).collect());
        out.links_switched += s.switched;
        out.stale_links += s.stale;
    }
    Ok(out)
}

/// Replaces the pinned programs of `dir` with this build's (see module docs).
fn upgrade(cfg: &DataplaneConfig, dir: &Path) -> Result<Switched, DataplaneError> {
    let maps = dir.join("maps");
    let progs = dir.join("progs");
    let sizes = layout::pinned_sizes(&maps, cfg);
    let mut ebpf = load_object(&sizes, &maps)?;
    pin_programs(&mut ebpf, &progs, "-new")?;
    let mut programs = Programs::open(&progs, "-new")?;
    let switched = switch_links(&mut programs, &dir.join("links"), None)?;
    // Not updatable in place: attached beside the old link, whose pin it then replaces.
    attach_kfree_skb(&mut ebpf, &dir.join("links"))?;
    for name in PINNED_PROGS {
        rename(&progs.join(format!("{name}-new")), &progs.join(name))?;
    }
    mark_build(dir)?;
    Ok(switched)
}

/// Removes `v<N>-tmp-<pid>` directories of processes that are gone (a crash while creating or
/// migrating a layout; nothing outside them refers to their pins).
fn remove_stale_tmp(root: &Path) -> Result<(), DataplaneError> {
    for path in read_dir(root)? {
        let name = file_name(&path);
        let Some(pid) = name
            .split_once("-tmp-")
            .and_then(|(_, pid)| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            remove_tree(&path)?;
        }
    }
    Ok(())
}

fn remove_tree(path: &PathBuf) -> Result<(), DataplaneError> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Unpin {
            path: path.clone(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_id_is_stable_hex() {
        let id = build_id();
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, build_id());
    }

    #[test]
    fn prepared_says_what_happened() {
        let p = Prepared {
            upgraded_from: Some(vec!["00000000deadbeef".into()]),
            links_switched: 4,
            ..Prepared::default()
        };
        let s = p.to_string();
        assert!(
            s.contains("upgraded programs from build 00000000deadbeef"),
            "{s}"
        );
        assert!(s.contains("4 links switched atomically"), "{s}");
        let m = Prepared {
            migrated_from: Some(3),
            carried: vec!["COUNTERS".into()],
            links_switched: 2,
            ..Prepared::default()
        };
        let s = m.to_string();
        assert!(
            s.contains(&format!("migrated layout v3 to v{LAYOUT_VERSION}")),
            "{s}"
        );
        assert!(s.contains("COUNTERS"), "{s}");
        assert!(Prepared::default().to_string().contains("(current)"));
    }
}

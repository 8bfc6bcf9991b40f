//! The TCX and tracepoint links pinned under `links/`, and switching them to other programs
//! in place (`BPF_LINK_UPDATE`): what an upgrade and a migration share.

use std::path::Path;

use aya::programs::{
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    ProgramError, SchedClassifier,
};

use super::{error::DataplaneError, pins::*};

/// Links switched by [`switch_links`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Switched {
    pub switched: usize,
    /// Links whose device is gone (left to reconcile, or removed with their directory).
    pub stale: usize,
}

/// The TCX programs, opened from pins.
pub(super) struct Programs {
    from_vm: SchedClassifier,
    to_vm: SchedClassifier,
    from_dns: SchedClassifier,
    from_uplink: SchedClassifier,
    from_overlay: SchedClassifier,
    from_underlay: SchedClassifier,
}

impl Programs {
    /// Opens `<progs>/<name><suffix>` for every program.
    pub(super) fn open(progs: &Path, suffix: &str) -> Result<Self, DataplaneError> {
        let open = |name: &str| {
            let path = progs.join(format!("{name}{suffix}"));
            SchedClassifier::from_pin(&path).map_err(|source| DataplaneError::OpenProgram {
                path,
                source: Box::new(source),
            })
        };
        Ok(Programs {
            from_vm: open(PROG_FROM_VM)?,
            to_vm: open(PROG_TO_VM)?,
            from_dns: open(PROG_FROM_DNS)?,
            from_uplink: open(PROG_FROM_UPLINK)?,
            from_overlay: open(PROG_FROM_OVERLAY)?,
            from_underlay: open(PROG_FROM_UNDERLAY)?,
        })
    }

    /// The program a link pin of this name carries (see [`program_of_link`]).
    pub(super) fn for_link(&mut self, pin: &str) -> Option<&mut SchedClassifier> {
        match program_of_link(pin)? {
            PROG_FROM_VM => Some(&mut self.from_vm),
            PROG_TO_VM => Some(&mut self.to_vm),
            PROG_FROM_UPLINK => Some(&mut self.from_uplink),
            PROG_FROM_OVERLAY => Some(&mut self.from_overlay),
            PROG_FROM_UNDERLAY => Some(&mut self.from_underlay),
            _ => Some(&mut self.from_dns),
        }
    }
}

/// The program of a link pin: `<ifindex>-in` → `from_vm`, `<ifindex>-out` → `to_vm`,
/// `dns-<ifindex>` → `from_dns`, `uplink-<ifindex>` → `from_uplink`, `overlay-<ifindex>` →
/// `from_overlay`, `underlay-<ifindex>` → `from_underlay`.
pub(super) fn program_of_link(pin: &str) -> Option<&'static str> {
    if pin.starts_with(DNS_LINK_PREFIX) {
        Some(PROG_FROM_DNS)
    } else if pin.starts_with(UPLINK_LINK_PREFIX) {
        Some(PROG_FROM_UPLINK)
    } else if pin.starts_with(OVERLAY_LINK_PREFIX) {
        Some(PROG_FROM_OVERLAY)
    } else if pin.starts_with(UNDERLAY_LINK_PREFIX) {
        Some(PROG_FROM_UNDERLAY)
    } else if pin.ends_with("-in") {
        Some(PROG_FROM_VM)
    } else if pin.ends_with("-out") {
        Some(PROG_TO_VM)
    } else {
        None
    }
}

/// Gives every link pinned in `links` its program from `programs` with `BPF_LINK_UPDATE`, and
/// moves the pin into `move_to` if given (a migration).
pub(super) fn switch_links(
    programs: &mut Programs,
    links: &Path,
    move_to: Option<&Path>,
) -> Result<Switched, DataplaneError> {
    let mut out = Switched::default();
    for path in read_dir(links)? {
        let name = file_name(&path);
        let Some(prog) = programs.for_link(&name) else {
            continue;
        };
        if update_link(prog, &path)? {
            out.switched += 1;
        } else {
            out.stale += 1;
            continue;
        }
        if let Some(dir) = move_to {
            let target = dir.join(&name);
            if target.exists() {
                // Already moved once (a resumed migration re-attached it): the old pin goes with
                // the old directory.
                continue;
            }
            rename(&path, &target)?;
        }
    }
    Ok(out)
}

/// Replaces the program of the TCX link pinned at `path` with `prog`, atomically. Returns
/// false if the link's device is gone.
pub(super) fn update_link(prog: &mut SchedClassifier, path: &Path) -> Result<bool, DataplaneError> {
    let open = |source| DataplaneError::OpenLink {
        path: path.into(),
        source: Box::new(source),
    };
    let pinned = PinnedLink::from_pin(path).map_err(open)?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(open)?;
    match prog.attach_to_link(link) {
        Ok(id) => {
            // Only the fd is closed: the pin keeps the link (and now the new program) attached.
            drop(prog.take_link(id));
            Ok(true)
        }
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOLINK) => {
            Ok(false)
        }
        Err(source) => Err(DataplaneError::UpdateLink {
            path: path.into(),
            source: Box::new(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_pins_name_their_program() {
        assert_eq!(program_of_link("12-in"), Some(PROG_FROM_VM));
        assert_eq!(program_of_link("12-out"), Some(PROG_TO_VM));
        assert_eq!(program_of_link("dns-7"), Some(PROG_FROM_DNS));
        assert_eq!(program_of_link("uplink-3"), Some(PROG_FROM_UPLINK));
        assert_eq!(program_of_link("overlay-4"), Some(PROG_FROM_OVERLAY));
        assert_eq!(program_of_link("underlay-5"), Some(PROG_FROM_UNDERLAY));
        assert_eq!(program_of_link("stray"), None);
        // Not a TCX link: an upgrade replaces it (`attach_kfree_skb`), `switch_links` skips it.
        assert_eq!(program_of_link(super::super::KFREE_SKB_LINK), None);
    }
}

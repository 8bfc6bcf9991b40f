//! The config drive: a ustar archive of plain files, one value each, that the guest's init
//! extracts from the read-only disk with serial `atoll-config` (docs/vm.md, "Host → guest
//! contract").
//!
//! Decisions:
//! - **One value per file**, so the guest never parses or evaluates a string the API
//!   accepted: it reads each file whole.
//! - **ustar, written here** (about 40 lines): busybox `tar` reads it straight off the block
//!   device, the archive is padded to whole 512-byte blocks as a disk must be, and atoll needs
//!   no archive dependency for a format it fully controls.

use std::net::Ipv4Addr;

/// What the guest configures itself from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub hostname: String,
    pub fqdn: String,
    pub ipv4: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub nameserver: Ipv4Addr,
    /// The DNS search domain, without a trailing dot.
    pub search: String,
    /// `(virtio serial, volume name)`: mounted at `/mnt/<name>`.
    pub volumes: Vec<(String, String)>,
    pub user_data: Option<String>,
    /// The interface's MTU (the overlay's room for encapsulation); `None`: the default.
    pub mtu: Option<u32>,
}

impl GuestConfig {
    /// The archive's files, in a fixed order.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let line = |s: String| format!("{s}\n").into_bytes();
        let mut files = vec![
            ("hostname", line(self.hostname.clone())),
            ("fqdn", line(self.fqdn.trim_end_matches('.').to_string())),
            ("ipv4", line(self.ipv4.to_string())),
            ("gateway", line(self.gateway.to_string())),
            ("nameserver", line(self.nameserver.to_string())),
            (
                "search",
                line(self.search.trim_end_matches('.').to_string()),
            ),
            (
                "volumes",
                self.volumes
                    .iter()
                    .map(|(serial, name)| format!("{serial} {name}\n"))
                    .collect::<String>()
                    .into_bytes(),
            ),
        ];
        if let Some(m) = self.mtu {
            files.push(("mtu", line(m.to_string())));
        }
        if let Some(u) = &self.user_data {
            files.push(("user-data", u.as_bytes().to_vec()));
        }
        files
    }

    /// The config drive's bytes: a ustar archive (a multiple of 512 bytes).
    pub fn archive(&self) -> Vec<u8> {
        ustar(&self.files())
    }
}

/// A ustar archive of regular files (mode 0644, owner 0, mtime 0: the same config gives the
/// same bytes), ended by two zero blocks.
pub fn ustar(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        let mut h = [0u8; 512];
        let name = name.as_bytes();
        h[..name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
        octal(&mut h[100..108], 0o644);
        octal(&mut h[108..116], 0);
        octal(&mut h[116..124], 0);
        octal(&mut h[124..136], data.len() as u64);
        octal(&mut h[136..148], 0);
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        // The checksum is computed with its own field as spaces.
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// Zero-padded octal digits filling `field` but for a terminating NUL.
fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_block_aligned_and_checksummed() {
        let cfg = GuestConfig {
            hostname: "web".into(),
            fqdn: "web.prod.atoll.internal.".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 2),
            gateway: Ipv4Addr::new(10, 0, 0, 1),
            nameserver: Ipv4Addr::new(10, 0, 0, 1),
            search: "prod.atoll.internal.".into(),
            volumes: vec![("atoll-v0".into(), "data".into())],
            user_data: Some("echo hi\n".into()),
            mtu: Some(1450),
        };
        assert!(cfg.files().contains(&("mtu", b"1450\n".to_vec())));
        let a = cfg.archive();
        assert_eq!(a.len() % 512, 0);
        // First header: name, size and a checksum that verifies.
        assert_eq!(&a[..8], b"hostname");
        assert_eq!(&a[124..135], b"00000000004");
        let mut h = a[..512].to_vec();
        let stored = u64::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        h[148..156].fill(b' ');
        assert_eq!(stored, h.iter().map(|&b| u64::from(b)).sum::<u64>());
        assert_eq!(&a[512..516], b"web\n");
        let names: Vec<_> = cfg.files().iter().map(|f| f.0).collect();
        assert_eq!(names.last(), Some(&"user-data"));
        assert_eq!(cfg.files()[1].1, b"web.prod.atoll.internal\n");
    }
}

//! Files and directories that hold tenant or operator data (volumes, console and VMM logs,
//! usage journals and sinks, the store, tokens) are created with explicit modes, so what they
//! get does not depend on the umask the process was started with: an agent started under
//! umask 000 creates nothing that another local user can read or write.
//!
//! `mode` on create is still masked by the umask, which can only remove bits: 0600 and 0700 are
//! therefore exact under any umask. Directories are given their mode again after `mkdir`, so
//! modes that others need (such as the VMM runtime root's 0711) are exact too.

use std::{
    fs::{DirBuilder, File, OpenOptions},
    io,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::Path,
};

/// Creates `dir` and each missing parent with exactly `mode`; existing directories are left as
/// they are.
pub fn create_dir_all(dir: &Path, mode: u32) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_all(parent, mode)?;
    }
    match DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)),
        // Created meanwhile by someone else: theirs to keep.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Options that create a file readable and writable by its owner only (0600).
pub fn file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(0o600);
    o
}

/// Creates (or truncates) `path` as a private file (0600 when created).
pub fn create_file(path: &Path) -> io::Result<File> {
    file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn modes_are_exact_whatever_the_umask() {
        let base = std::env::temp_dir().join(format!("atl-private-{}", std::process::id()));
        // SAFETY: umask only changes this process's file-creation mask; it is restored below
        // and no other test of this crate creates files whose mode it asserts.
        let old = unsafe { libc::umask(0) };
        let deep = base.join("a/b");
        create_dir_all(&deep, 0o700).unwrap();
        let f = deep.join("f");
        create_file(&f).unwrap();
        let root = base.join("root");
        create_dir_all(&root, 0o711).unwrap();
        // SAFETY: restores the mask saved above.
        unsafe { libc::umask(old) };
        for (p, want) in [
            (base.clone(), 0o700),
            (base.join("a"), 0o700),
            (deep.clone(), 0o700),
            (f, 0o600),
            (root, 0o711),
        ] {
            let mode = std::fs::metadata(&p).unwrap().mode() & 0o7777;
            assert_eq!(mode, want, "{}", p.display());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}

//! A VM's serial console as the agent keeps it: a log file capped at a size (the current file
//! and one rotated `.1`, each at most half the budget), the last bytes in memory for the control
//! plane's console API, and the guest's status lines.
//!
//! A guest controls everything it prints, so nothing here grows with its output: the log
//! rotates, the tail is a fixed window, and a line is only scanned up to a bounded length.

use std::{
    collections::VecDeque,
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

/// What the guest's init prints once its network and volumes are up.
pub const READY_LINE: &[u8] = b"atoll-guest: ready";
/// What it prints, followed by the reason, when it cannot configure itself.
pub const FAILED_PREFIX: &[u8] = b"atoll-guest: failed: ";
/// Lines longer than this are not status lines; only their start is kept for matching.
const MAX_LINE: usize = 256;

/// The console of one VM.
pub struct Console {
    path: PathBuf,
    file: Option<File>,
    written: u64,
    half_budget: u64,
    tail: VecDeque<u8>,
    tail_max: usize,
    changed: bool,
    line: Vec<u8>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// Appends to the log at `path` (created with its directory), keeping at most
    /// `max_bytes` on disk and `tail_max` bytes in memory.
    pub fn open(path: &Path, max_bytes: u64, tail_max: usize) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            atoll_api::private::create_dir_all(dir, 0o700)?;
        }
        let file = atoll_api::private::file_options()
            .create(true)
            .append(true)
            .open(path)?;
        let written = file.metadata()?.len();
        Ok(Console {
            path: path.to_path_buf(),
            file: Some(file),
            written,
            half_budget: max_bytes / 2,
            tail: VecDeque::with_capacity(tail_max),
            tail_max,
            changed: false,
            line: Vec::new(),
        })
    }

    /// Takes bytes the guest printed; returns the complete lines among them that start with
    /// `atoll-guest:` (the guest's status lines).
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Vec<u8>> {
        self.write_log(bytes);
        for &b in bytes {
            if self.tail.len() == self.tail_max {
                self.tail.pop_front();
            }
            self.tail.push_back(b);
        }
        self.changed |= !bytes.is_empty();
        let mut status = Vec::new();
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                if line.starts_with(b"atoll-guest:") {
                    status.push(line.to_vec());
                }
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
        status
    }

    fn write_log(&mut self, bytes: &[u8]) {
        if self.written + bytes.len() as u64 > self.half_budget {
            // Rotate: the current file becomes `.1` (replacing the older one).
            self.file = None;
            let old = self.path.with_extension("log.1");
            let _ = std::fs::rename(&self.path, old);
            self.file = atoll_api::private::file_options()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
            self.written = 0;
        }
        if let Some(f) = &mut self.file {
            // A full disk loses console output, never the VM.
            if f.write_all(bytes).is_ok() {
                self.written += bytes.len() as u64;
            }
        }
    }

    /// The last bytes, as text, if they changed since the last call.
    pub fn take_changed_tail(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.changed) {
            return None;
        }
        Some(self.tail_text())
    }

    pub fn tail_text(&self) -> String {
        let (a, b) = self.tail.as_slices();
        let mut v = Vec::with_capacity(a.len() + b.len());
        v.extend_from_slice(a);
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_tail_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c/console.log");
        let mut c = Console::open(&path, 64 * 1024, 16).unwrap();
        assert!(c.push(b"booting\r\natoll-gue").is_empty());
        assert_eq!(
            c.push(b"st: ready\r\nmore\n"),
            vec![b"atoll-guest: ready".to_vec()]
        );
        assert_eq!(c.take_changed_tail().unwrap(), "st: ready\r\nmore\n");
        assert_eq!(c.take_changed_tail(), None);
        // A long line is not a status line and does not grow memory.
        let long = vec![b'x'; 10_000];
        assert!(c.push(&long).is_empty());
        assert!(c.line.len() <= MAX_LINE);
        // Past half the budget the log rotates.
        for _ in 0..10 {
            c.push(&long);
        }
        let cur = std::fs::metadata(&path).unwrap().len();
        let old = std::fs::metadata(path.with_extension("log.1"))
            .unwrap()
            .len();
        assert!(cur <= 32 * 1024 && old <= 32 * 1024, "{cur} {old}");
    }
}

//! One process per output: an advisory lock (`flock`) on a file, held for as long as the
//! [`Lock`] lives and released by the operating system when the process ends, however it ends
//! (`kill -9` included), so a stale lock never blocks anyone.
//!
//! The holder writes its pid (and host) into the file, so a second process is told who holds
//! it, and removes the file when it lets go (a killed holder leaves it, unlocked, for the next
//! one to take). Removing a lock file is safe because a taker checks, once it holds the lock,
//! that the path still names the file it locked, and starts again if not. Advisory: only ipr
//! honours it. On network file systems `flock` is only as good as the file system's lock support
//! (Lustre with `flock`, NFS v4 and GPFS support it).

use crate::error::{Error, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// A held lock; dropping it releases it.
#[derive(Debug)]
pub struct Lock {
    // The lock lives as long as this open file.
    _file: File,
    pub path: PathBuf,
}

impl Lock {
    /// Takes the lock file `path` (created when missing) for `what` (e.g. "the run runs/demo"),
    /// or fails at once, naming the process that holds it, what it guards, and what to do.
    pub fn acquire(path: &Path, what: &str) -> Result<Lock> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let mut file = loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            match file.try_lock() {
                // A releasing holder may have removed the file after we opened it: the lock is
                // then on a file no one else will see, so take the path's new file instead.
                Ok(()) if same_file(&file, path) => break file,
                Ok(()) => continue,
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    let who = if holder.is_empty() { "another process".to_string() } else { holder.to_string() };
                    return Err(Error::file(
                        path,
                        format!(
                            "{what} is in use by {who}: wait for it to end, or stop it, before starting another \
                             (two processes writing one output would spoil it)"
                        ),
                    ));
                }
                Err(TryLockError::Error(e)) => return Err(Error::io(path, e)),
            }
        };
        let me = format!("process {} on {}\n", std::process::id(), host());
        let written =
            file.set_len(0).and_then(|()| file.seek(SeekFrom::Start(0))).and_then(|_| file.write_all(me.as_bytes()));
        written.map_err(|e| Error::io(path, e))?;
        Ok(Lock { _file: file, path: path.to_path_buf() })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held; the lock itself goes when the file closes, just after.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether `path` names the open `file` (same device and inode).
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "this machine".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out").join(".lock");
        let first = Lock::acquire(&path, "the run out").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(&format!("process {}", std::process::id())), "{text}");
        // flock locks belong to the open file: a second open in the same process conflicts too.
        let e = Lock::acquire(&path, "the run out").unwrap_err().to_string();
        assert!(e.contains(".lock") && e.contains("the run out is in use by process") && e.contains("wait"), "{e}");
        drop(first);
        assert!(!path.exists(), "the holder removes the file when it lets go");
        let again = Lock::acquire(&path, "the run out").unwrap();
        assert_eq!(again.path, path);
        // A file left by a killed holder is not locked: it is taken over.
        drop(again);
        std::fs::write(&path, "process 1 on elsewhere\n").unwrap();
        let taken = Lock::acquire(&path, "the run out").unwrap();
        assert!(std::fs::read_to_string(&taken.path).unwrap().contains(&std::process::id().to_string()));
    }
}

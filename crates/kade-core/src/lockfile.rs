//! Exclusive advisory locks on files (`flock(2)`), to serialise work across processes: the
//! index's schema migrations (a `kade` command started while `kade serve` starts), a node's
//! exchange receives. The lock is released when the [`FileLock`] is dropped or the process
//! ends, however it ends. Elsewhere than on Unix the locks are no-ops.

use std::io;
use std::path::Path;

/// A held lock.
#[derive(Debug)]
pub struct FileLock(#[allow(dead_code)] std::fs::File);

fn open(path: &Path) -> io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
}

impl FileLock {
    /// Takes the lock of `path` (the file is created if missing), waiting while another
    /// process or another open file holds it. Blocks the thread.
    ///
    /// # Errors
    /// When the file cannot be opened or locked.
    pub fn acquire(path: &Path) -> io::Result<FileLock> {
        let file = open(path)?;
        lock(&file, true)?;
        Ok(FileLock(file))
    }

    /// Takes the lock of `path` if it is free; `Ok(None)` when another holds it.
    ///
    /// # Errors
    /// When the file cannot be opened or locked.
    pub fn try_acquire(path: &Path) -> io::Result<Option<FileLock>> {
        let file = open(path)?;
        Ok(lock(&file, false)?.then_some(FileLock(file)))
    }
}

/// `Ok(false)` when `wait` is false and another holds the lock.
#[cfg(unix)]
fn lock(file: &std::fs::File, wait: bool) -> io::Result<bool> {
    use rustix::fs::{FlockOperation, flock};
    let op = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    match flock(file, op) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

#[cfg(not(unix))]
fn lock(_: &std::fs::File, _: bool) -> io::Result<bool> {
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = std::env::temp_dir().join(format!("kade-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.lock");
        let held = FileLock::acquire(&path).unwrap();
        assert!(FileLock::try_acquire(&path).unwrap().is_none(), "held");
        drop(held);
        let again = FileLock::try_acquire(&path).unwrap();
        assert!(again.is_some(), "free once released");
        drop(again);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Staging of incoming bytes: written and hashed as they arrive, then handed to the store.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncWriteExt, BufWriter};

use crate::StoreError;

/// A spool file being written. Dropping it without [`Spool::finish`] deletes the file, so an
/// aborted transfer leaves no trace.
#[derive(Debug)]
pub struct Spool {
    file: BufWriter<tokio::fs::File>,
    guard: SpooledFile,
}

/// A complete spool file, its bytes on disk (fsynced). Dropping it deletes the file.
#[derive(Debug)]
pub struct SpooledFile {
    path: PathBuf,
    len: u64,
    keep: bool,
}

impl Spool {
    pub(crate) async fn create(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(temp_name());
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(|e| StoreError::io("create", &path, e))?;
        Ok(Spool {
            file: BufWriter::with_capacity(1024 * 1024, file),
            guard: SpooledFile {
                path,
                len: 0,
                keep: false,
            },
        })
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// When the write fails (for example, the disk is full).
    pub async fn write(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        self.guard.len += buf.len() as u64;
        self.file
            .write_all(buf)
            .await
            .map_err(|e| StoreError::io("write", &self.guard.path, e))
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.guard.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.guard.len == 0
    }

    /// Flushes and fsyncs the file.
    ///
    /// # Errors
    /// When flushing or syncing fails.
    pub async fn finish(mut self) -> Result<SpooledFile, StoreError> {
        let path = self.guard.path.clone();
        self.file
            .flush()
            .await
            .map_err(|e| StoreError::io("write", &path, e))?;
        self.file
            .get_mut()
            .sync_all()
            .await
            .map_err(|e| StoreError::io("fsync", &path, e))?;
        let empty = SpooledFile {
            path: PathBuf::new(),
            len: 0,
            keep: true,
        };
        Ok(std::mem::replace(&mut self.guard, empty))
    }
}

fn temp_name() -> String {
    format!(
        "in-{:016x}{:016x}.part",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

impl SpooledFile {
    /// Where the bytes are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for SpooledFile {
    fn drop(&mut self) {
        if !self.keep && !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes `bytes` to a new file in `spool_dir`, fsyncs it and moves it to `dest` (blocking).
pub(crate) fn write_local(
    bytes: &[u8],
    spool_dir: &Path,
    root: &Path,
    dest: &Path,
) -> Result<(), StoreError> {
    let path = spool_dir.join(temp_name());
    let file = SpooledFile {
        path: path.clone(),
        len: bytes.len() as u64,
        keep: false,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| StoreError::io("create", &path, e))?;
    std::io::Write::write_all(&mut f, bytes).map_err(|e| StoreError::io("write", &path, e))?;
    f.sync_all()
        .map_err(|e| StoreError::io("fsync", &path, e))?;
    persist_local(file, root, dest)
}

/// Moves a synced spool file to `dest` under `root` and fsyncs every directory that changed.
pub(crate) fn persist_local(
    mut file: SpooledFile,
    root: &Path,
    dest: &Path,
) -> Result<(), StoreError> {
    let dir = dest.parent().expect("blob keys have a directory");
    let created = create_dirs(root, dir)?;
    std::fs::rename(&file.path, dest).map_err(|e| StoreError::io("rename into", dest, e))?;
    file.keep = true;
    sync_dir(dir)?;
    // A directory created just now is only durable once its parent's entry is synced.
    for d in created {
        if let Some(parent) = d.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// `create_dir_all`, returning the directories it created (deepest last).
fn create_dirs(root: &Path, dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() && d != root {
        missing.push(d.to_owned());
        d = match d.parent() {
            Some(p) => p,
            None => break,
        };
    }
    missing.reverse();
    for m in &missing {
        match std::fs::create_dir(m) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(StoreError::io("create directory", m, e)),
        }
    }
    Ok(missing)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Deletes every `*.part` file in `dir`.
pub(crate) fn clean_dir(dir: &Path) -> Result<usize, StoreError> {
    let mut n = 0;
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io("read directory", dir, e))?;
    for entry in entries.flatten() {
        let p = entry.path();
        if p.extension().is_some_and(|e| e == "part") && std::fs::remove_file(&p).is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

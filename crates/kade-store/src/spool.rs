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
/// With `uncached`, its pages then leave the page cache ([`drop_cache`]).
pub(crate) fn write_local(
    bytes: &[u8],
    spool_dir: &Path,
    root: &Path,
    dest: &Path,
    uncached: bool,
) -> Result<(), StoreError> {
    persist_local(write_synced(bytes, spool_dir, uncached)?, root, dest)
}

/// Writes `bytes` to a new file in `spool_dir` and fsyncs it (blocking); with `uncached`, its
/// pages then leave the page cache ([`drop_cache`]).
fn write_synced(bytes: &[u8], spool_dir: &Path, uncached: bool) -> Result<SpooledFile, StoreError> {
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
    if uncached {
        drop_cache(&f);
    }
    Ok(file)
}

/// Writes `bytes` straight to `dest` under `root` and names it in the journal (a hard link at
/// `marker`), then syncs the file and the journal directory (blocking). Returns the
/// directories whose new entries are not synced yet (`dest`'s, and the parents of directories
/// created for it): [`sync_dirs`] them before the marker goes.
///
/// As durable as [`write_local`] with two syncs instead of four: the blob's data and inode, and
/// the marker's name, are on disk; should a power cut lose its name under `root`, start-up
/// recovery links it again from the marker ([`relink`]). A crash part-way leaves a partial
/// file under its final key, named by its marker: recovery sees that its content does not
/// match the digest in its key and deletes it. Returns `None` (and stores the blob with
/// [`write_local`], unmarked) when `dest` exists already, which two concurrent stores of the
/// same object can cause.
pub(crate) fn write_journaled(
    bytes: &[u8],
    spool_dir: &Path,
    root: &Path,
    dest: &Path,
    marker: &Path,
) -> Result<Option<Vec<PathBuf>>, StoreError> {
    let dir = dest.parent().expect("blob keys have a directory");
    let created = create_dirs(root, dir)?;
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return write_local(bytes, spool_dir, root, dest, false).map(|()| None);
        }
        Err(e) => return Err(StoreError::io("create", dest, e)),
    };
    let undo = |op, path: &Path, e| {
        let _ = std::fs::remove_file(marker);
        let _ = std::fs::remove_file(dest);
        StoreError::io(op, path, e)
    };
    link_marker(dest, marker).map_err(|e| undo("link", marker, e))?;
    std::io::Write::write_all(&mut f, bytes).map_err(|e| undo("write", dest, e))?;
    f.sync_all().map_err(|e| undo("fsync", dest, e))?;
    sync_dir(marker.parent().expect("markers are in a directory"))?;
    Ok(Some(unsynced(dir, created)))
}

/// Moves a synced spool file to `dest` under `root` and names it in the journal, like
/// [`write_journaled`]. Falls back to [`persist_local`] (returning `None`) when `dest` exists.
pub(crate) fn persist_journaled(
    mut file: SpooledFile,
    root: &Path,
    dest: &Path,
    marker: &Path,
) -> Result<Option<Vec<PathBuf>>, StoreError> {
    if dest.exists() {
        return persist_local(file, root, dest).map(|()| None);
    }
    let dir = dest.parent().expect("blob keys have a directory");
    let created = create_dirs(root, dir)?;
    link_marker(&file.path, marker).map_err(|e| StoreError::io("link", marker, e))?;
    if let Err(e) = std::fs::rename(&file.path, dest) {
        let _ = std::fs::remove_file(marker);
        return Err(StoreError::io("rename into", dest, e));
    }
    file.keep = true;
    sync_dir(marker.parent().expect("markers are in a directory"))?;
    Ok(Some(unsynced(dir, created)))
}

/// Writes `bytes` to a new file in `spool_dir`, fsyncs it, drops it from the page cache
/// ([`drop_cache`]: a bulk import) and renames it to `dest` (blocking), without syncing any
/// directory. Returns the directories whose entries changed: `dest`'s and
/// the parents of directories created for it.
pub(crate) fn write_staged(
    bytes: &[u8],
    spool_dir: &Path,
    root: &Path,
    dest: &Path,
) -> Result<Vec<PathBuf>, StoreError> {
    persist_staged(write_synced(bytes, spool_dir, true)?, root, dest)
}

/// Renames a synced spool file to `dest` under `root` without syncing any directory; returns
/// the directories whose entries changed.
pub(crate) fn persist_staged(
    mut file: SpooledFile,
    root: &Path,
    dest: &Path,
) -> Result<Vec<PathBuf>, StoreError> {
    let dir = dest.parent().expect("blob keys have a directory");
    let created = create_dirs(root, dir)?;
    std::fs::rename(&file.path, dest).map_err(|e| StoreError::io("rename into", dest, e))?;
    file.keep = true;
    Ok(unsynced(dir, created))
}

/// `dir` and the parents of the directories created for it.
fn unsynced(dir: &Path, created: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut dirs = vec![dir.to_owned()];
    dirs.extend(
        created
            .iter()
            .filter_map(|d| d.parent().map(Path::to_owned)),
    );
    dirs
}

/// Gives the blob named by `marker` its name `dest` under `root` again, if a power cut lost
/// it, and syncs the directories. Returns whether it had to.
pub(crate) fn relink(marker: &Path, root: &Path, dest: &Path) -> Result<bool, StoreError> {
    if dest.exists() {
        return Ok(false);
    }
    let dir = dest.parent().expect("blob keys have a directory");
    let created = create_dirs(root, dir)?;
    std::fs::hard_link(marker, dest).map_err(|e| StoreError::io("link", dest, e))?;
    sync_dirs(&unsynced(dir, created))?;
    Ok(true)
}

/// A hard link; an existing marker of the same name (the same key) is kept.
fn link_marker(target: &Path, marker: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(target, marker) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
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
    // A directory created just now is only durable once its parent's entry is synced.
    sync_dirs(&unsynced(dir, created))
}

/// Syncs directories (each once).
pub(crate) fn sync_dirs(dirs: &[PathBuf]) -> Result<(), StoreError> {
    let mut done: Vec<&PathBuf> = Vec::with_capacity(dirs.len());
    for d in dirs {
        if !done.contains(&d) {
            sync_dir(d)?;
            done.push(d);
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

/// Asks the kernel to drop a synced file's pages from the page cache (Linux; elsewhere
/// nothing). For bytes that will not be read again soon: the cache keeps what readers use, and
/// on machines that hand freed memory back to their host (virtual machines with free page
/// reporting) growing the cache costs about 3 s of CPU per GB in the kernel, where reusing
/// pages just dropped costs a tenth of that (BENCHMARKS.md, exchange).
pub(crate) fn drop_cache(f: &std::fs::File) {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed) {
        tracing::debug!(error = %e, "could not drop a file from the page cache");
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

/// Reads a whole file without going through the page cache where the filesystem allows
/// direct I/O (Linux), else with ordinary reads and then [`drop_cache`].
pub(crate) fn read_uncached(path: &Path) -> std::io::Result<Vec<u8>> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path);
        if let Ok(f) = direct {
            if let Ok(v) = read_direct(&f) {
                return Ok(v);
            }
        }
    }
    let mut f = std::fs::File::open(path)?;
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut v)?;
    drop_cache(&f);
    Ok(v)
}

/// Direct I/O wants buffers, offsets and lengths aligned to the device's block size; 4096
/// covers the usual 512- and 4096-byte blocks.
#[cfg(target_os = "linux")]
const DIRECT_ALIGN: usize = 4096;

/// Reads all of `f` (opened with `O_DIRECT`) into an aligned part of a buffer.
#[cfg(target_os = "linux")]
fn read_direct(f: &std::fs::File) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let len = usize::try_from(f.metadata()?.len()).map_err(std::io::Error::other)?;
    let padded = len.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
    let mut buf = vec![0u8; padded + DIRECT_ALIGN];
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
    let mut done = 0;
    let mut r = f;
    while done < padded {
        match r.read(&mut buf[start + done..start + padded])? {
            0 => break,
            n => done += n,
        }
    }
    if done != len {
        return Err(std::io::Error::other("the file changed while it was read"));
    }
    buf.truncate(start + len);
    buf.drain(..start);
    Ok(buf)
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

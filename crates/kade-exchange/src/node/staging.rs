//! What a receive stopped half way leaves behind, and how the next one clears it.
//!
//! A matched bundle's instances are staged (written to the store, not indexed) while later
//! chunks are still arriving, and indexed only after the last chunk verified (see
//! [`super::receive`]). A receive that fails discards its staged blobs itself; one that is
//! stopped (the process killed, the machine restarted) cannot. So each staged blob's key is
//! appended to `DATA_DIR/exchange/staging/{bundle}.keys` just before it is written, and the
//! record is removed once the bundle is committed or discarded. The next receive first deletes
//! every recorded blob that no index row refers to, then the record.
//!
//! Receives of one node are serialised across processes (`kade serve` and
//! `kade exchange receive` / `reconcile`) by an exclusive lock on
//! `DATA_DIR/exchange/receive.lock`, so the clean-up never meets a blob that another receive
//! is about to index. Keys are appended without a sync: after a power cut the last few may be
//! missing, and those blobs are orphans for `kade fsck`.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use kade_core::lockfile::FileLock;
use kade_index::Index;
use kade_store::{BlobStore, StoreError};

/// Held while a receive runs; dropping it releases the lock.
#[derive(Debug)]
pub(crate) struct ReceiveLock(#[allow(dead_code)] FileLock);

/// Takes the node's receive lock, waiting for another process's receive to end.
pub(crate) async fn receive_lock(work_dir: &Path) -> anyhow::Result<ReceiveLock> {
    let path = work_dir.join("receive.lock");
    let cannot = |e| anyhow::Error::new(e).context(format!("cannot lock {}", path.display()));
    if let Some(l) = FileLock::try_acquire(&path).map_err(cannot)? {
        return Ok(ReceiveLock(l));
    }
    tracing::warn!(
        "another receive of this node is running (kade serve, or kade exchange receive); waiting for it to end"
    );
    let p = path.clone();
    let held = tokio::task::spawn_blocking(move || FileLock::acquire(&p))
        .await
        .context("lock task")?;
    Ok(ReceiveLock(held.map_err(cannot)?))
}

fn staging_dir(work_dir: &Path) -> PathBuf {
    work_dir.join("staging")
}

/// The record of one bundle's staged blobs.
#[derive(Debug)]
pub(crate) struct StagingRecord {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl StagingRecord {
    /// Starts the record of `bundle` (durable, empty).
    pub(crate) fn create(work_dir: &Path, bundle: &str) -> anyhow::Result<Arc<Self>> {
        let dir = staging_dir(work_dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{bundle}.keys"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
        Ok(Arc::new(StagingRecord {
            path,
            file: Mutex::new(file),
        }))
    }

    /// Records a staged blob's key; a failure is logged (the blob is then an orphan for
    /// `kade fsck` should this receive be stopped).
    pub(crate) fn add(&self, key: &str) {
        let line = format!("{key}\n");
        let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = f.write_all(line.as_bytes()) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot record a staged blob");
        }
    }

    /// Removes the record: every staged blob is now indexed or deleted.
    pub(crate) fn done(&self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(file = %self.path.display(), error = %e, "cannot remove the staging record; the next receive will");
        }
    }
}

/// Deletes the blobs that stopped receives staged and never indexed, then their records;
/// returns how many blobs were deleted. Call with the [`ReceiveLock`] held.
pub(crate) async fn clean(
    _lock: &ReceiveLock,
    work_dir: &Path,
    index: &Index,
    store: &BlobStore,
) -> anyhow::Result<usize> {
    let dir = staging_dir(work_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut deleted = 0;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "keys") {
            continue;
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut here = 0;
        for key in text.lines().map(str::trim).filter(|k| !k.is_empty()) {
            if index.blob_is_referenced(key).await? {
                continue;
            }
            match store.delete(key).await {
                Ok(()) => here += 1,
                Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e).with_context(|| format!("cannot delete {key}")),
            }
        }
        if here > 0 {
            tracing::info!(
                record = %path.display(),
                blobs = here,
                "deleted the blobs an interrupted receive had staged"
            );
        }
        deleted += here;
        std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_receive_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let held = receive_lock(dir.path()).await.unwrap();
        let path = dir.path().join("receive.lock");
        assert!(
            FileLock::try_acquire(&path).unwrap().is_none(),
            "taken while held"
        );
        drop(held);
        assert!(
            FileLock::try_acquire(&path).unwrap().is_some(),
            "free once released"
        );
    }

    #[test]
    fn a_record_lists_its_keys_until_done() {
        let dir = tempfile::tempdir().unwrap();
        let r = StagingRecord::create(dir.path(), "b1").unwrap();
        r.add("dicom/1/2/3.aa.dcm");
        r.add("dicom/1/2/4.bb.dcm");
        let path = dir.path().join("staging/b1.keys");
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "dicom/1/2/3.aa.dcm\ndicom/1/2/4.bb.dcm\n"
        );
        r.done();
        assert!(!path.exists());
    }
}

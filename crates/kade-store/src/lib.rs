//! Blob storage for Kade: the instances exactly as received, in a local directory (the
//! embedded default) or an S3-compatible bucket.
//!
//! # Layout
//! - [`key`]: [`BlobKey`], object keys built from validated UIDs only.
//! - [`spool`]: [`Spool`], where large incoming objects are staged before they are stored.
//! - [`BlobStore`] (this module): put bytes or a spooled file durably, read, list, delete.
//!
//! # Durability
//! [`BlobStore::put_spooled`] returns only once the blob would survive a power cut: on the
//! local backend the spooled file is fsynced, renamed into place and every directory whose
//! entries changed is fsynced; on S3 the PUT (or multipart completion) has been acknowledged.
//!
//! # The journal of unsettled blobs
//! [`BlobStore::put_journaled`] is as durable, and on the local backend it also names the blob
//! in the journal directory (a hard link whose name is the key) and returns a [`Marker`]. Two
//! syncs make it durable: the file, and the journal directory; the blob's own directory entry
//! is synced later, once for all the blobs of a series, when the marker is settled (a power
//! cut before that can lose the name, and [`BlobStore::relink`] restores it from the marker).
//! The ingest pipeline also commits index rows without waiting for the database's own sync:
//! as long as its marker exists, a blob counts as "maybe not indexed", and start-up recovery
//! re-indexes it from the blob if its row was lost with the database's unsynced tail (power
//! cut, kernel crash). Once a database sync covers the row, [`BlobStore::settle`] syncs the
//! blob directories and removes the markers. S3 has no journal: there `put_journaled` returns
//! no marker and the row is committed with a full sync.
//!
//! # Staged blobs
//! [`BlobStore::put_staged`] writes a blob whose index row may never come (the exchange
//! stages a bundle's instances while later chunks are still being verified). On the local
//! backend the file is written in the spool directory, fsynced and renamed to its key, so its
//! key never names a partial file; its directory entry is synced only by
//! [`BlobStore::sync_staged`], once for all the blobs that are then indexed. No journal
//! marker names it: recovery never indexes a staged blob, and one whose row never came is an
//! orphan for `kade fsck` (the caller deletes it at once when it gives up on it).

pub mod key;
pub mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::{
    ObjectStore, PutPayload, WriteMultipart, aws::AmazonS3Builder, path::Path as ObjPath,
};

pub use key::BlobKey;
pub use spool::{Spool, SpooledFile};

/// Errors from blob storage.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local file operation failed (includes a full disk: `ENOSPC`).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating-system error.
        source: std::io::Error,
    },
    /// The object store (S3 or local) reported an error.
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    /// The blob does not exist.
    #[error("blob {0} not found")]
    NotFound(String),
    /// The store configuration is unusable.
    #[error("invalid blob store configuration: {0}")]
    Config(String),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// Connection settings for an S3-compatible bucket.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct S3Options {
    /// Endpoint URL, e.g. `http://127.0.0.1:3900`. Path-style requests are used.
    pub endpoint: String,
    /// Bucket name.
    pub bucket: String,
    /// Region name the server expects (`us-east-1` if the server does not care).
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Key prefix inside the bucket (e.g. `site-a/`), so several nodes or test runs can share
    /// one bucket. Empty by default.
    #[serde(default)]
    pub prefix: String,
}

/// A listed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// A handle on the blob store; cheap to clone.
#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    /// Set for the local backend: blobs are files under this directory.
    local_root: Option<PathBuf>,
    spool_dir: PathBuf,
    description: String,
    /// Local backend: blobs stay out of the page cache (see [`BlobStore::uncached`]).
    uncached: bool,
}

/// A blob named in the journal of unsettled blobs (see the module docs). Dropping it keeps the
/// marker; [`BlobStore::settle`] removes it.
#[derive(Debug)]
pub struct Marker {
    path: PathBuf,
    /// Directories whose entries for this blob are not synced yet.
    dirs: Vec<PathBuf>,
}

impl Marker {
    /// The key of the blob it names.
    pub fn key(&self) -> String {
        let name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name.replace('+', "/")
    }
}

/// A staged blob's directories whose entries are not synced yet (empty on S3); give it to
/// [`BlobStore::sync_staged`] before indexing the blob.
#[derive(Debug, Default)]
pub struct Staging {
    dirs: Vec<PathBuf>,
}

/// What [`BlobStore::put_journaled`] and [`BlobStore::put_staged`] store.
#[derive(Debug)]
pub enum Payload {
    /// Bytes in memory.
    Bytes(Bytes),
    /// A finished spool file.
    Spooled(SpooledFile),
}

/// Size of the parts of a multipart upload, and the threshold above which one is used.
const PART_SIZE: usize = 8 * 1024 * 1024;

impl BlobStore {
    /// Opens (creating it if needed) a local blob store rooted at `root`, spooling in
    /// `spool_dir`, which must be on the same filesystem so that storing is a rename.
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub fn local(root: &Path, spool_dir: &Path) -> Result<Self, StoreError> {
        let journal = spool_dir.join("journal");
        for d in [root, spool_dir, &journal] {
            std::fs::create_dir_all(d).map_err(|e| StoreError::io("create directory", d, e))?;
        }
        let root = root
            .canonicalize()
            .map_err(|e| StoreError::io("resolve", root, e))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&root)?;
        Ok(BlobStore {
            store: Arc::new(store),
            description: format!("local directory {}", root.display()),
            local_root: Some(root),
            spool_dir: spool_dir.to_owned(),
            uncached: false,
        })
    }

    /// Connects to an S3-compatible bucket; incoming data is spooled in `spool_dir` first.
    ///
    /// # Errors
    /// When the options are rejected by the S3 client or the spool directory cannot be made.
    pub fn s3(opts: &S3Options, spool_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(spool_dir)
            .map_err(|e| StoreError::io("create directory", spool_dir, e))?;
        let store = AmazonS3Builder::new()
            .with_endpoint(&opts.endpoint)
            .with_bucket_name(&opts.bucket)
            .with_region(&opts.region)
            .with_access_key_id(&opts.access_key_id)
            .with_secret_access_key(&opts.secret_access_key)
            .with_allow_http(opts.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false)
            .build()?;
        let prefix = opts.prefix.trim_matches('/');
        let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
            Arc::new(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        Ok(BlobStore {
            store,
            local_root: None,
            spool_dir: spool_dir.to_owned(),
            description: format!("S3 bucket {}/{} at {}", opts.bucket, prefix, opts.endpoint),
            uncached: false,
        })
    }

    /// This store with blobs kept out of the page cache on the local backend: [`put_bytes`]
    /// drops each blob from the cache once it is synced, and [`get`] reads with direct I/O
    /// where the filesystem allows it. For the exchange mailbox, which writes each chunk once
    /// and reads it once: caching them only pushes out what others read, and on a virtual
    /// machine that hands freed memory back to its host, growing the cache costs about 3 s
    /// of CPU per GB (BENCHMARKS.md, exchange). No effect on S3.
    ///
    /// [`put_bytes`]: BlobStore::put_bytes
    /// [`get`]: BlobStore::get
    pub fn uncached(mut self) -> Self {
        self.uncached = true;
        self
    }

    /// A human-readable description of the backend, for logs and `kade stats`.
    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Starts a new spool file for incoming data.
    ///
    /// # Errors
    /// When the file cannot be created (for example, the disk is full).
    pub async fn spool(&self) -> Result<Spool, StoreError> {
        Spool::create(&self.spool_dir).await
    }

    /// Removes spool files left behind by a crash. Call once at start-up, before accepting work.
    ///
    /// # Errors
    /// When the spool directory cannot be read.
    pub fn clean_spool(&self) -> Result<usize, StoreError> {
        spool::clean_dir(&self.spool_dir)
    }

    /// Stores a finished spool file under `key`, durably, and consumes it.
    ///
    /// # Errors
    /// When the file cannot be moved or uploaded; the blob is then absent and the spool removed.
    pub async fn put_spooled(&self, key: &BlobKey, file: SpooledFile) -> Result<(), StoreError> {
        match &self.local_root {
            Some(root) => {
                let dest = root.join(key.as_str());
                let root = root.clone();
                tokio::task::spawn_blocking(move || spool::persist_local(file, &root, &dest))
                    .await
                    .expect("persist task panicked")
            }
            None => self.upload(key, file).await,
        }
    }

    /// Stores a blob durably, like [`BlobStore::put_bytes`] and [`BlobStore::put_spooled`],
    /// and on the local backend names it in the journal of unsettled blobs (see the module
    /// docs). `None` when the blob is durable but unmarked: on S3, or when a file of that key
    /// existed already.
    ///
    /// # Errors
    /// When writing or uploading fails; the blob and its marker are then absent.
    pub async fn put_journaled(
        &self,
        key: &BlobKey,
        payload: Payload,
    ) -> Result<Option<Marker>, StoreError> {
        let Some(root) = &self.local_root else {
            match payload {
                Payload::Bytes(b) => self.put_bytes(key, b).await?,
                Payload::Spooled(f) => self.upload(key, f).await?,
            }
            return Ok(None);
        };
        let dest = root.join(key.as_str());
        let marker_path = self.marker_path(key.as_str());
        let marker = marker_path.clone();
        let (root, spool) = (root.clone(), self.spool_dir.clone());
        let dirs = tokio::task::spawn_blocking(move || match payload {
            Payload::Bytes(b) => spool::write_journaled(&b, &spool, &root, &dest, &marker),
            Payload::Spooled(f) => spool::persist_journaled(f, &root, &dest, &marker),
        })
        .await
        .expect("write task panicked")?;
        Ok(dirs.map(|dirs| Marker {
            path: marker_path,
            dirs,
        }))
    }

    /// Writes a staged blob (see the module docs): its content is durable when this returns,
    /// its name only after [`BlobStore::sync_staged`] on what this returns.
    ///
    /// # Errors
    /// When writing or uploading fails; the blob is then absent.
    pub async fn put_staged(&self, key: &BlobKey, payload: Payload) -> Result<Staging, StoreError> {
        let Some(root) = &self.local_root else {
            match payload {
                Payload::Bytes(b) => self.put_bytes(key, b).await?,
                Payload::Spooled(f) => self.upload(key, f).await?,
            }
            return Ok(Staging { dirs: Vec::new() });
        };
        let dest = root.join(key.as_str());
        let (root, spool) = (root.clone(), self.spool_dir.clone());
        let dirs = tokio::task::spawn_blocking(move || match payload {
            Payload::Bytes(b) => spool::write_staged(&b, &spool, &root, &dest),
            Payload::Spooled(f) => spool::persist_staged(f, &root, &dest),
        })
        .await
        .expect("write task panicked")?;
        Ok(Staging { dirs })
    }

    /// Makes the names of staged blobs durable: syncs each directory they were written to,
    /// once.
    ///
    /// # Errors
    /// When a directory cannot be synced.
    pub async fn sync_staged(&self, staged: Vec<Staging>) -> Result<(), StoreError> {
        let mut dirs: Vec<PathBuf> = staged.into_iter().flat_map(|s| s.dirs).collect();
        if dirs.is_empty() {
            return Ok(());
        }
        dirs.sort();
        dirs.dedup();
        tokio::task::spawn_blocking(move || spool::sync_dirs(&dirs))
            .await
            .expect("sync task panicked")
    }

    /// Removes the markers of blobs whose index rows are now durable, after syncing the
    /// directories that name those blobs (once each: one sync covers every blob of a series
    /// stored since the last settling). If that fails, the markers stay, for recovery.
    pub async fn settle(&self, markers: Vec<Marker>) {
        if markers.is_empty() {
            return;
        }
        tokio::task::spawn_blocking(move || {
            let mut dirs: Vec<PathBuf> = markers.iter().flat_map(|m| m.dirs.clone()).collect();
            dirs.sort();
            dirs.dedup();
            if let Err(e) = spool::sync_dirs(&dirs) {
                tracing::warn!(error = %e, "could not sync blob directories; keeping their journal markers for recovery");
                return;
            }
            for m in markers {
                if let Err(e) = std::fs::remove_file(&m.path) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(marker = %m.path.display(), error = %e, "could not remove a journal marker; recovery will at the next start");
                    }
                }
            }
        })
        .await
        .expect("settle task panicked");
    }

    /// The markers left in the journal of unsettled blobs (by an earlier run that stopped
    /// before settling them). Files whose names are not blob keys are ignored.
    ///
    /// # Errors
    /// When the journal directory cannot be read.
    pub fn journaled(&self) -> Result<Vec<Marker>, StoreError> {
        if self.local_root.is_none() {
            return Ok(Vec::new());
        }
        let dir = self.journal_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(StoreError::io("read directory", &dir, e)),
        };
        let mut markers = Vec::new();
        for entry in entries.flatten() {
            let m = Marker {
                path: entry.path(),
                dirs: Vec::new(),
            };
            if BlobKey::instance_parts(&m.key()).is_some() {
                markers.push(m);
            } else {
                tracing::warn!(file = %m.path.display(), "ignoring a file in the journal directory that names no blob");
            }
        }
        Ok(markers)
    }

    /// Gives the blob a marker names its key again if a power cut lost the name (its
    /// directory entry is synced only when the marker is settled). Start-up recovery only.
    /// Returns whether it had to.
    ///
    /// # Errors
    /// When the link or a directory sync fails.
    pub fn relink(&self, marker: &Marker) -> Result<bool, StoreError> {
        match &self.local_root {
            Some(root) => spool::relink(&marker.path, root, &root.join(marker.key())),
            None => Ok(false),
        }
    }

    fn journal_dir(&self) -> PathBuf {
        self.spool_dir.join("journal")
    }

    fn marker_path(&self, key: &str) -> PathBuf {
        self.journal_dir().join(key.replace('/', "+"))
    }

    /// Stores `bytes` under `key`, durably (local: written, fsynced and renamed into place in
    /// one blocking task; S3: one PUT).
    ///
    /// # Errors
    /// When writing or uploading fails; the blob is then absent.
    pub async fn put_bytes(&self, key: &BlobKey, bytes: Bytes) -> Result<(), StoreError> {
        match &self.local_root {
            Some(root) => {
                let dest = root.join(key.as_str());
                let (root, spool, uncached) = (root.clone(), self.spool_dir.clone(), self.uncached);
                tokio::task::spawn_blocking(move || {
                    spool::write_local(&bytes, &spool, &root, &dest, uncached)
                })
                .await
                .expect("write task panicked")
            }
            None => {
                self.store
                    .put(&ObjPath::from(key.as_str()), PutPayload::from(bytes))
                    .await?;
                Ok(())
            }
        }
    }

    async fn upload(&self, key: &BlobKey, file: SpooledFile) -> Result<(), StoreError> {
        let path = ObjPath::from(key.as_str());
        let mut f = tokio::fs::File::open(file.path())
            .await
            .map_err(|e| StoreError::io("open", file.path(), e))?;
        if file.len() <= PART_SIZE as u64 {
            let mut buf = Vec::with_capacity(file.len() as usize);
            tokio::io::AsyncReadExt::read_to_end(&mut f, &mut buf)
                .await
                .map_err(|e| StoreError::io("read", file.path(), e))?;
            self.store.put(&path, PutPayload::from(buf)).await?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&path).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf)
                .await
                .map_err(|e| StoreError::io("read", file.path(), e))?;
            if n == 0 {
                break;
            }
            w.wait_for_capacity(2).await?;
            w.write(&buf[..n]);
        }
        w.finish().await?;
        Ok(())
    }

    /// Reads a whole blob into memory. Use [`BlobStore::get_stream`] for large blobs.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when absent, or the backend's error.
    pub async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        if let (true, Some(root)) = (self.uncached, &self.local_root) {
            let (path, key) = (root.join(key), key.to_owned());
            return tokio::task::spawn_blocking(move || match spool::read_uncached(&path) {
                Ok(v) => Ok(Bytes::from(v)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(StoreError::NotFound(key))
                }
                Err(e) => Err(StoreError::io("read", &path, e)),
            })
            .await
            .expect("read task panicked");
        }
        let r = self
            .store
            .get(&ObjPath::from(key))
            .await
            .map_err(|e| not_found(key, e))?;
        Ok(r.bytes().await?)
    }

    /// The file that holds blob `key` on the local backend (`None` on S3), for readers that
    /// lay a blob out themselves, such as the DIMSE retrieve, which reads a data set straight
    /// into P-DATA-TF PDUs. Keys are validated UIDs, so the path stays under the root.
    pub fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.local_root.as_ref().map(|root| root.join(key))
    }

    /// Streams a blob in chunks.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when absent, or the backend's error.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        if let Some(root) = &self.local_root {
            // Local files are read in large pieces, each in one blocking task (open and first
            // piece together), and the first piece before this returns: a caller that asks for
            // the next blob's stream while sending the current one reads ahead. The object
            // store's file stream yields small chunks, each through a blocking task, which
            // capped WADO-RS at a few hundred MB/s; tokio's file reads cost a task apiece too.
            let path = root.join(key);
            let opened = tokio::task::spawn_blocking(move || {
                let first = std::fs::File::open(&path).and_then(|mut f| {
                    let size = f.metadata()?.len();
                    let first = read_piece(&mut f, size)?;
                    Ok((f, size - first.len() as u64, first))
                });
                (first, path)
            })
            .await
            .map_err(|e| StoreError::io("read", root, std::io::Error::other(e)))?;
            let (file, left, first, path) = match opened {
                (Ok((f, left, first)), path) => (f, left, first, path),
                (Err(e), _) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StoreError::NotFound(key.to_owned()));
                }
                (Err(e), path) => return Err(StoreError::io("read", &path, e)),
            };
            let rest = futures::stream::try_unfold((file, left, path), |(mut f, left, path)| {
                async move {
                    if left == 0 {
                        return Ok(None);
                    }
                    let (f, piece, path) = tokio::task::spawn_blocking(move || {
                        let r = read_piece(&mut f, left);
                        (f, r, path)
                    })
                    .await
                    .map_err(|e| StoreError::io("read", Path::new(""), std::io::Error::other(e)))?;
                    let piece = piece.map_err(|e| StoreError::io("read", &path, e))?;
                    if piece.is_empty() {
                        // The file is shorter than it was: end here rather than loop.
                        return Ok(None);
                    }
                    let left = left.saturating_sub(piece.len() as u64);
                    Ok(Some((piece, (f, left, path))))
                }
            });
            let first = (!first.is_empty()).then_some(Ok(first));
            return Ok(futures::stream::iter(first).chain(rest).boxed());
        }
        let r = self
            .store
            .get(&ObjPath::from(key))
            .await
            .map_err(|e| not_found(key, e))?;
        Ok(r.into_stream().map(|c| c.map_err(StoreError::from)).boxed())
    }

    /// The size of a blob, or `None` when it does not exist.
    ///
    /// # Errors
    /// The backend's error other than "not found".
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match self.store.head(&ObjPath::from(key)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a blob; deleting an absent blob succeeds.
    ///
    /// # Errors
    /// The backend's error.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        if self.local_root.is_some() {
            // A journal marker would give the blob its name back at the next start.
            let marker = self.marker_path(key);
            if let Err(e) = tokio::fs::remove_file(&marker).await {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(StoreError::io("remove", &marker, e));
                }
            }
        }
        match self.store.delete(&ObjPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists every blob under `prefix` (e.g. `dicom/`).
    pub fn list(&self, prefix: &str) -> BoxStream<'static, Result<BlobInfo, StoreError>> {
        let p = ObjPath::from(prefix.trim_end_matches('/'));
        self.store
            .list(Some(&p))
            .map(|m| {
                m.map(|m| BlobInfo {
                    key: m.location.to_string(),
                    size: m.size,
                    modified: m.last_modified,
                })
                .map_err(StoreError::from)
            })
            .boxed()
    }
}

/// How much of a local blob [`BlobStore::get_stream`] reads at a time.
const PIECE: usize = 4 << 20;

/// Reads the next piece of a file with `left` bytes still to read: up to [`PIECE`] bytes,
/// without zeroing the buffer first.
fn read_piece(f: &mut std::fs::File, left: u64) -> std::io::Result<Bytes> {
    use std::io::Read;
    let want = left.min(PIECE as u64);
    let mut buf = Vec::with_capacity(want as usize);
    f.take(want).read_to_end(&mut buf)?;
    Ok(Bytes::from(buf))
}

fn not_found(key: &str, e: object_store::Error) -> StoreError {
    match e {
        object_store::Error::NotFound { .. } => StoreError::NotFound(key.to_owned()),
        e => StoreError::ObjectStore(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mailbox's store: blobs of every size come back as written, with direct I/O where
    /// the filesystem has it (not tmpfs: then the ordinary read), and a missing one is
    /// `NotFound`.
    #[tokio::test]
    async fn uncached_blobs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::local(&dir.path().join("blobs"), &dir.path().join("spool"))
            .unwrap()
            .uncached();
        for (i, len) in [1usize, 4095, 4096, 4097, 3 * 1024 * 1024 + 16]
            .into_iter()
            .enumerate()
        {
            let bytes: Vec<u8> = (0..len).map(|j| (j * 31 + i) as u8).collect();
            let key = BlobKey::exchange_chunk("0123456789abcdef0123456789abcdef", i as u32);
            store
                .put_bytes(&key, Bytes::from(bytes.clone()))
                .await
                .unwrap();
            assert_eq!(store.get(key.as_str()).await.unwrap(), bytes, "{len} bytes");
        }
        let missing = BlobKey::exchange_chunk("0123456789abcdef0123456789abcdef", 99);
        assert!(matches!(
            store.get(missing.as_str()).await,
            Err(StoreError::NotFound(k)) if k == missing.as_str()
        ));
    }
}

//! The sender's side: [`Sealer`] turns a manifest draft into a signed [`BundleHeader`] and
//! seals payload chunks; [`ChunkWriter`] streams instance bytes into sealed chunks.

use std::collections::HashSet;
use std::fmt;

use ed25519_dalek::Signer as _;
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::chunk::{self, ContentCipher, InstanceTracker, SealedChunk, TAG_LEN};
use super::codec;
use super::directory::DirectoryEntry;
use super::manifest::{Envelope, Manifest, ManifestDraft};
use super::{
    BundleHeader, BundleId, DEFAULT_CHUNK_SIZE, DEFAULT_LIFETIME_SECS, FORMAT_VERSION,
    MAX_MANIFEST_BYTES, NodeKeys, content_key_info, wrap,
};
use crate::{ExchangeError, Result};

/// How to seal a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealOptions {
    chunk_size: u32,
    lifetime_secs: u64,
}

impl Default for SealOptions {
    fn default() -> Self {
        SealOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            lifetime_secs: DEFAULT_LIFETIME_SECS,
        }
    }
}

impl SealOptions {
    /// The defaults: [`DEFAULT_CHUNK_SIZE`] chunks, valid for [`DEFAULT_LIFETIME_SECS`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Plaintext bytes per chunk, between [`MIN_CHUNK_SIZE`](super::MIN_CHUNK_SIZE) and
    /// [`MAX_CHUNK_SIZE`](super::MAX_CHUNK_SIZE) (checked by [`Sealer::new`]).
    pub fn chunk_size(mut self, bytes: u32) -> Self {
        self.chunk_size = bytes;
        self
    }

    /// How long the bundle may be opened after creation, in seconds.
    pub fn lifetime_secs(mut self, secs: u64) -> Self {
        self.lifetime_secs = secs;
        self
    }
}

/// Seals one bundle. Holds the bundle's content key (see [`ContentCipher`] on wiping);
/// `Debug` does not show it.
pub struct Sealer {
    cipher: ContentCipher,
    header: BundleHeader,
    manifest: Manifest,
    manifest_sha256: [u8; 32],
    /// The chunk indexes handed out for sealing so far: each is sealed at most once, so no
    /// nonce ever seals two plaintexts.
    sealed: HashSet<u32>,
}

impl Sealer {
    /// Seals a bundle for `recipient` from `sender`: picks a random bundle id and content key,
    /// lays out the payload, seals the manifest, wraps the key to the recipient and signs the
    /// header. `now` is the current unix time.
    ///
    /// # Errors
    /// [`ExchangeError::EntryExpired`] when the recipient's directory entry has expired;
    /// [`ExchangeError::Malformed`] when the draft or options are not valid (see
    /// [`Manifest::validate`]); [`ExchangeError::BadKey`] or [`ExchangeError::Seal`] when the
    /// recipient's encryption key is unusable.
    pub fn new(
        sender: &NodeKeys,
        recipient: &DirectoryEntry,
        draft: ManifestDraft,
        options: SealOptions,
        now: u64,
    ) -> Result<Self> {
        if !recipient.is_valid_at(now) {
            return Err(ExchangeError::EntryExpired {
                org_id: recipient.org_id.clone(),
                not_after: recipient.not_after,
            });
        }
        let not_after = now
            .checked_add(options.lifetime_secs)
            .ok_or_else(|| ExchangeError::malformed("seal options", "lifetime overflows"))?;
        let env = Envelope {
            bundle_id: BundleId::random(),
            sender: sender.org_id(),
            recipient: &recipient.org_id,
            created_at: now,
            not_after,
            chunk_size: options.chunk_size,
        };
        let manifest = Manifest::from_draft(draft, env)?;
        Self::from_manifest(sender, recipient, manifest)
    }

    /// Seals an already complete manifest (tests build inconsistent ones through this).
    pub(crate) fn from_manifest(
        sender: &NodeKeys,
        recipient: &DirectoryEntry,
        manifest: Manifest,
    ) -> Result<Self> {
        let json = Zeroizing::new(manifest.to_json_bytes());
        if json.len() > MAX_MANIFEST_BYTES {
            return Err(ExchangeError::malformed(
                "manifest",
                format!("{} bytes of JSON", json.len()),
            ));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut());
        let cipher = ContentCipher::new(&key);
        let id = manifest.bundle_id;
        let sealed_manifest = chunk::seal_manifest(&cipher, &id, &json)?;
        let info = content_key_info(&id, sender.org_id(), &recipient.org_id);
        let wrapped_key = wrap::seal_to(
            &recipient.encryption_key,
            &info,
            key.as_ref(),
            "content key",
        )?;
        let mut header = BundleHeader {
            version: FORMAT_VERSION,
            bundle_id: id,
            sender: sender.org_id().to_owned(),
            recipient: recipient.org_id.clone(),
            total_chunks: manifest.total_chunks,
            chunk_size: manifest.chunk_size,
            payload_size: manifest.payload_size,
            wrapped_key,
            sealed_manifest,
            signature: [0; 64],
            created_at: manifest.created_at,
            expires_at: manifest.not_after,
        };
        header.signature = sender.signing_key().sign(&header.signed_bytes()).to_bytes();
        let sealed = HashSet::new();
        Ok(Sealer {
            cipher,
            header,
            manifest_sha256: codec::sha256(&json),
            manifest,
            sealed,
        })
    }

    /// The signed header, for the mailbox.
    pub fn header(&self) -> &BundleHeader {
        &self.header
    }

    /// The completed manifest (bundle id, layout), to keep at the sender.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// SHA-256 of the manifest JSON that was sealed; the recipient's receipt names it.
    pub fn manifest_sha256(&self) -> [u8; 32] {
        self.manifest_sha256
    }

    /// Seals chunk `index`. Its plaintext must be exactly
    /// [`Manifest::chunk_len`]`(index)` bytes of the payload; `is_last` is implied by
    /// `index == total_chunks - 1`. Each index is sealed once: a second call for an index
    /// (here or through a [`ChunkWriter`]) is refused, since different content would reuse
    /// the nonce. A failed upload is retried with the ciphertext it already has.
    ///
    /// # Errors
    /// [`ExchangeError::ChunkOutOfRange`], [`ExchangeError::ChunkLength`] or
    /// [`ExchangeError::ChunkResealed`].
    pub fn seal_chunk(&mut self, index: u32, plaintext: &[u8]) -> Result<SealedChunk> {
        let total = self.manifest.total_chunks;
        if index >= total {
            return Err(ExchangeError::ChunkOutOfRange { index, total });
        }
        let expected = self.manifest.chunk_len(index);
        if plaintext.len() != expected {
            return Err(ExchangeError::ChunkLength {
                index,
                expected,
                actual: plaintext.len(),
            });
        }
        self.claim(index)?;
        let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
        buf.extend_from_slice(plaintext);
        self.chunk_sealer().seal(PlainChunk {
            index,
            plaintext: buf,
        })
    }

    /// Marks `index` as sealed; refuses an index sealed before.
    fn claim(&mut self, index: u32) -> Result<()> {
        if self.sealed.insert(index) {
            Ok(())
        } else {
            Err(ExchangeError::ChunkResealed { index })
        }
    }

    /// A sealer of the chunks a [`ChunkWriter`] cuts, to use on any thread.
    pub fn chunk_sealer(&self) -> ChunkSealer {
        ChunkSealer {
            cipher: self.cipher.clone(),
            bundle_id: self.header.bundle_id,
            total: self.manifest.total_chunks,
        }
    }

    /// A writer that takes the instances' bytes in manifest order and cuts them into chunks,
    /// checking each instance's size and SHA-256 against the manifest.
    pub fn writer(&mut self) -> ChunkWriter<'_> {
        let tracker = InstanceTracker::new(&self.manifest.instances);
        let cap = self.manifest.chunk_len(0) + TAG_LEN;
        ChunkWriter {
            sealer: self,
            buf: Vec::with_capacity(cap),
            next: 0,
            tracker,
        }
    }
}

/// One chunk's plaintext, cut by a [`ChunkWriter`] and not yet sealed. Only the writer makes
/// them, one per index, so sealing one can never reuse a nonce.
pub struct PlainChunk {
    index: u32,
    /// The plaintext, with room for the tag.
    plaintext: Vec<u8>,
}

impl PlainChunk {
    /// Its index in the bundle.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl fmt::Debug for PlainChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainChunk")
            .field("index", &self.index)
            .field("len", &self.plaintext.len())
            .finish()
    }
}

/// Seals [`PlainChunk`]s under a bundle's content key; cheap to clone and to send to other
/// threads, so chunks are encrypted in parallel.
#[derive(Clone)]
pub struct ChunkSealer {
    cipher: ContentCipher,
    bundle_id: BundleId,
    total: u32,
}

impl ChunkSealer {
    /// Encrypts the chunk in place.
    ///
    /// # Errors
    /// [`ExchangeError::Seal`] (not expected: only for chunks beyond the AEAD's length limit).
    pub fn seal(&self, chunk: PlainChunk) -> Result<SealedChunk> {
        let PlainChunk {
            index,
            plaintext: mut buf,
        } = chunk;
        chunk::seal(&self.cipher, &self.bundle_id, index, self.total, &mut buf)?;
        Ok(SealedChunk {
            index,
            ciphertext: buf,
        })
    }
}

impl fmt::Debug for ChunkSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkSealer")
            .field("bundle_id", &self.bundle_id)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("bundle_id", &self.header.bundle_id)
            .field("recipient", &self.header.recipient)
            .field("total_chunks", &self.header.total_chunks)
            .finish_non_exhaustive()
    }
}

/// Streams payload bytes into chunks. Memory: one chunk of plaintext, plus whatever the
/// returned chunks hold (write at most a chunk's worth at a time to keep it at one).
pub struct ChunkWriter<'s> {
    sealer: &'s mut Sealer,
    buf: Vec<u8>,
    next: u32,
    tracker: InstanceTracker,
}

impl ChunkWriter<'_> {
    /// Takes the next payload bytes (instances back to back, in manifest order); returns the
    /// chunks they completed, in order, to be sealed by a [`ChunkSealer`].
    ///
    /// # Errors
    /// [`ExchangeError::InstanceMismatch`] when an instance's bytes do not hash to the
    /// manifest's SHA-256 (the blob changed since the manifest was made);
    /// [`ExchangeError::PayloadLength`] when more bytes arrive than the manifest declares;
    /// [`ExchangeError::ChunkResealed`] when [`Sealer::seal_chunk`] already sealed an index.
    pub fn cut(&mut self, mut data: &[u8]) -> Result<Vec<PlainChunk>> {
        self.tracker.feed(data)?;
        let mut out = Vec::new();
        while !data.is_empty() {
            let want = self.sealer.manifest.chunk_len(self.next) - self.buf.len();
            let take = want.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if take == want {
                self.sealer.claim(self.next)?;
                let m = &self.sealer.manifest;
                let cap = if self.next + 1 < m.total_chunks {
                    m.chunk_len(self.next + 1) + TAG_LEN
                } else {
                    0
                };
                out.push(PlainChunk {
                    index: self.next,
                    plaintext: std::mem::replace(&mut self.buf, Vec::with_capacity(cap)),
                });
                self.next += 1;
            }
        }
        Ok(out)
    }

    /// [`cut`](Self::cut), then seals each chunk on this thread.
    ///
    /// # Errors
    /// As [`cut`](Self::cut).
    pub fn write(&mut self, data: &[u8]) -> Result<Vec<SealedChunk>> {
        let sealer = self.sealer.chunk_sealer();
        self.cut(data)?
            .into_iter()
            .map(|c| sealer.seal(c))
            .collect()
    }

    /// Checks that the whole payload was written (every chunk was returned by
    /// [`cut`](Self::cut) or [`write`](Self::write)).
    ///
    /// # Errors
    /// [`ExchangeError::PayloadLength`] when bytes are missing.
    pub fn finish(self) -> Result<()> {
        self.tracker.finish()
    }
}

impl fmt::Debug for ChunkWriter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkWriter")
            .field("bundle_id", &self.sealer.header.bundle_id)
            .field("next", &self.next)
            .field("buffered", &self.buf.len())
            .finish_non_exhaustive()
    }
}

//! The sender's side: [`Sealer`] turns a manifest draft into a signed [`BundleHeader`] and
//! seals payload chunks; [`ChunkWriter`] streams instance bytes into sealed chunks.

use std::collections::HashMap;
use std::fmt;

use chacha20poly1305::{ChaCha20Poly1305, KeyInit as _};
use ed25519_dalek::Signer as _;
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::chunk::{self, InstanceTracker, SealedChunk};
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

/// Seals one bundle. Holds the bundle's content key (wiped on drop); `Debug` does not show it.
pub struct Sealer {
    cipher: ChaCha20Poly1305,
    header: BundleHeader,
    manifest: Manifest,
    manifest_sha256: [u8; 32],
    /// SHA-256 of the plaintext sealed at each index so far, to refuse a second, different
    /// plaintext under the same nonce.
    sealed: HashMap<u32, [u8; 32]>,
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
        let cipher = ChaCha20Poly1305::new(key.as_ref().into());
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
        let sealed = HashMap::new();
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
    /// `index == total_chunks - 1`. Sealing the same index again with the same plaintext
    /// gives the same ciphertext (for retries); with different plaintext it is refused, since
    /// that would reuse the nonce.
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
        let digest = codec::sha256(plaintext);
        if *self.sealed.entry(index).or_insert(digest) != digest {
            return Err(ExchangeError::ChunkResealed { index });
        }
        let ciphertext = chunk::seal(
            &self.cipher,
            &self.header.bundle_id,
            index,
            total,
            plaintext,
        )?;
        Ok(SealedChunk { index, ciphertext })
    }

    /// A writer that takes the instances' bytes in manifest order and returns sealed chunks
    /// as they fill, checking each instance's size and SHA-256 against the manifest.
    pub fn writer(&mut self) -> ChunkWriter<'_> {
        let tracker = InstanceTracker::new(&self.manifest.instances);
        let cap = self.manifest.chunk_len(0);
        ChunkWriter {
            sealer: self,
            buf: Vec::with_capacity(cap),
            next: 0,
            tracker,
        }
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

/// Streams payload bytes into sealed chunks. Memory: one chunk of plaintext, plus whatever
/// the returned chunks hold (write at most a chunk's worth at a time to keep it at one).
pub struct ChunkWriter<'s> {
    sealer: &'s mut Sealer,
    buf: Vec<u8>,
    next: u32,
    tracker: InstanceTracker,
}

impl ChunkWriter<'_> {
    /// Takes the next payload bytes (instances back to back, in manifest order); returns the
    /// chunks they completed, in order.
    ///
    /// # Errors
    /// [`ExchangeError::InstanceMismatch`] when an instance's bytes do not hash to the
    /// manifest's SHA-256 (the blob changed since the manifest was made);
    /// [`ExchangeError::PayloadLength`] when more bytes arrive than the manifest declares.
    pub fn write(&mut self, mut data: &[u8]) -> Result<Vec<SealedChunk>> {
        self.tracker.feed(data)?;
        let mut out = Vec::new();
        while !data.is_empty() {
            let want = self.sealer.manifest.chunk_len(self.next) - self.buf.len();
            let take = want.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if take == want {
                out.push(self.sealer.seal_chunk(self.next, &self.buf)?);
                self.buf.clear();
                self.next += 1;
            }
        }
        Ok(out)
    }

    /// Checks that the whole payload was written (every chunk was returned by
    /// [`write`](Self::write)).
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

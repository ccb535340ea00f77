//! The recipient's side: [`Opener::open`] checks a bundle header and decrypts the manifest;
//! [`ChunkAssembler`] opens the chunks in order and checks every instance.

use std::fmt;

use ed25519_dalek::Signature;
use zeroize::Zeroizing;

use super::chunk::{self, ContentCipher, InstancePiece, InstanceTracker};
use super::codec;
use super::directory::Directory;
use super::manifest::Manifest;
use super::{
    BundleHeader, BundleId, MAX_CLOCK_SKEW_SECS, MAX_MANIFEST_BYTES, NodeKeys, content_key_info,
    wrap,
};
use crate::{ExchangeError, Result};

/// An opened bundle: holds its content key (see [`ContentCipher`] on wiping); `Debug` does
/// not show it.
pub struct Opener {
    cipher: ContentCipher,
    bundle_id: BundleId,
    sender: String,
    total_chunks: u32,
    manifest_sha256: [u8; 32],
}

impl Opener {
    /// Opens a bundle addressed to `keys`' organisation, in this order:
    /// 1. the header's version and recipient (must be us);
    /// 2. the sender's directory entry (must exist and be valid at `now`);
    /// 3. the sender's signature over the header, **before anything is decrypted**;
    /// 4. the chunk layout, `created_at` (at most [`MAX_CLOCK_SKEW_SECS`] ahead of `now`) and
    ///    `expires_at` (`now` must be before it);
    /// 5. the content key (HPKE), then the manifest (AEAD), which must be valid and agree
    ///    with the header on bundle id, organisations, times and layout.
    ///
    /// # Errors
    /// In check order: [`ExchangeError::UnsupportedVersion`], [`ExchangeError::NotForUs`],
    /// [`ExchangeError::UnknownSender`] / [`ExchangeError::EntryExpired`],
    /// [`ExchangeError::BadSignature`], [`ExchangeError::Malformed`],
    /// [`ExchangeError::NotYetValid`], [`ExchangeError::Stale`], [`ExchangeError::KeyUnwrap`],
    /// [`ExchangeError::ManifestTampered`], [`ExchangeError::HeaderMismatch`].
    pub fn open(
        header: &BundleHeader,
        keys: &NodeKeys,
        directory: &Directory,
        now: u64,
    ) -> Result<(Self, Manifest)> {
        header.check_version()?;
        if header.recipient != keys.org_id() {
            return Err(ExchangeError::NotForUs {
                recipient: header.recipient.clone(),
                us: keys.org_id().to_owned(),
            });
        }
        let sender = directory.sender(&header.sender, now)?;
        sender
            .verifying_key()?
            .verify_strict(
                &header.signed_bytes(),
                &Signature::from_bytes(&header.signature),
            )
            .map_err(|_| ExchangeError::BadSignature {
                what: "bundle header",
            })?;
        header.check_layout()?;
        if header.created_at > now.saturating_add(MAX_CLOCK_SKEW_SECS) {
            return Err(ExchangeError::NotYetValid {
                created_at: header.created_at,
                now,
            });
        }
        if now >= header.expires_at {
            return Err(ExchangeError::Stale {
                not_after: header.expires_at,
                now,
            });
        }
        if header.sealed_manifest.len() > MAX_MANIFEST_BYTES + 16 {
            return Err(ExchangeError::malformed(
                "bundle header",
                "sealed manifest too large",
            ));
        }
        let info = content_key_info(&header.bundle_id, &header.sender, &header.recipient);
        let key = Zeroizing::new(
            wrap::open_from(keys.encryption_key(), &info, &header.wrapped_key)
                .ok_or(ExchangeError::KeyUnwrap)?,
        );
        let key: Zeroizing<[u8; 32]> = Zeroizing::new(
            key.as_slice()
                .try_into()
                .map_err(|_| ExchangeError::KeyUnwrap)?,
        );
        let cipher = ContentCipher::new(&key);
        let json = Zeroizing::new(chunk::open_manifest(
            &cipher,
            &header.bundle_id,
            &header.sealed_manifest,
        )?);
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|e| ExchangeError::malformed("manifest", e))?;
        check_agreement(header, &manifest)?;
        manifest.validate()?;
        let opener = Opener {
            cipher,
            bundle_id: header.bundle_id,
            sender: header.sender.clone(),
            total_chunks: header.total_chunks,
            manifest_sha256: codec::sha256(&json),
        };
        Ok((opener, manifest))
    }

    /// The bundle's id.
    pub fn bundle_id(&self) -> BundleId {
        self.bundle_id
    }

    /// The sending organisation (verified against the directory).
    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// SHA-256 of the decrypted manifest JSON, for the receipt.
    pub fn manifest_sha256(&self) -> [u8; 32] {
        self.manifest_sha256
    }

    /// Decrypts chunk `index` on its own. The AEAD binds the bundle id, the index, the chunk
    /// count and the last-chunk flag, so a chunk moved to another index or bundle, or a chunk
    /// count cut short, fails here. Order and completeness are [`ChunkAssembler`]'s job.
    ///
    /// # Errors
    /// [`ExchangeError::ChunkOutOfRange`] or [`ExchangeError::Tampered`].
    pub fn open_chunk(&self, index: u32, ciphertext: &[u8]) -> Result<Vec<u8>> {
        self.chunk_opener()
            .open(index, ciphertext.to_vec())
            .map(|c| c.plaintext)
    }

    /// An opener of this bundle's chunks, to use on any thread: chunks are decrypted in
    /// parallel and then given to the [`ChunkAssembler`] in order.
    pub fn chunk_opener(&self) -> ChunkOpener {
        ChunkOpener {
            cipher: self.cipher.clone(),
            bundle_id: self.bundle_id,
            total: self.total_chunks,
        }
    }

    /// An assembler for this bundle's chunks; `manifest` is the one [`open`](Self::open)
    /// returned.
    ///
    /// # Errors
    /// [`ExchangeError::HeaderMismatch`] when `manifest` belongs to another bundle.
    pub fn assembler<'o>(&'o self, manifest: &Manifest) -> Result<ChunkAssembler<'o>> {
        if manifest.bundle_id != self.bundle_id || manifest.total_chunks != self.total_chunks {
            return Err(ExchangeError::HeaderMismatch { field: "bundle_id" });
        }
        Ok(ChunkAssembler {
            opener: self,
            manifest_chunk_len: (manifest.payload_size, manifest.chunk_size),
            next: 0,
            tracker: InstanceTracker::new(&manifest.instances),
            failed: false,
        })
    }
}

/// Checks that the decrypted manifest says what the signed header says.
fn check_agreement(h: &BundleHeader, m: &Manifest) -> Result<()> {
    let checks: [(&'static str, bool); 8] = [
        ("bundle_id", m.bundle_id == h.bundle_id),
        ("sender", m.sender == h.sender),
        ("recipient", m.recipient == h.recipient),
        ("created_at", m.created_at == h.created_at),
        ("not_after", m.not_after == h.expires_at),
        ("total_chunks", m.total_chunks == h.total_chunks),
        ("chunk_size", m.chunk_size == h.chunk_size),
        ("payload_size", m.payload_size == h.payload_size),
    ];
    match checks.iter().find(|(_, ok)| !ok) {
        Some((field, _)) => Err(ExchangeError::HeaderMismatch { field }),
        None => Ok(()),
    }
}

impl fmt::Debug for Opener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Opener")
            .field("bundle_id", &self.bundle_id)
            .field("sender", &self.sender)
            .field("total_chunks", &self.total_chunks)
            .finish_non_exhaustive()
    }
}

/// Decrypts chunks of one bundle (see [`Opener::open_chunk`]); cheap to clone and to send to
/// other threads.
#[derive(Clone)]
pub struct ChunkOpener {
    cipher: ContentCipher,
    bundle_id: BundleId,
    total: u32,
}

impl ChunkOpener {
    /// Authenticates and decrypts chunk `index` in place.
    ///
    /// # Errors
    /// [`ExchangeError::ChunkOutOfRange`] or [`ExchangeError::Tampered`].
    pub fn open(&self, index: u32, ciphertext: Vec<u8>) -> Result<DecryptedChunk> {
        if index >= self.total {
            return Err(ExchangeError::ChunkOutOfRange {
                index,
                total: self.total,
            });
        }
        let mut buf = ciphertext;
        chunk::open(&self.cipher, &self.bundle_id, index, self.total, &mut buf)?;
        Ok(DecryptedChunk {
            index,
            plaintext: buf,
        })
    }
}

impl fmt::Debug for ChunkOpener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkOpener")
            .field("bundle_id", &self.bundle_id)
            .finish_non_exhaustive()
    }
}

/// A chunk that passed authentication, not yet placed by the [`ChunkAssembler`]. Only a
/// [`ChunkOpener`] makes them.
pub struct DecryptedChunk {
    index: u32,
    plaintext: Vec<u8>,
}

impl DecryptedChunk {
    /// Its index in the bundle.
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl fmt::Debug for DecryptedChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecryptedChunk")
            .field("index", &self.index)
            .field("len", &self.plaintext.len())
            .finish()
    }
}

/// A decrypted chunk and the instance pieces it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenedChunk {
    /// The chunk's index.
    pub index: u32,
    /// The decrypted bytes.
    pub plaintext: Vec<u8>,
    /// The instance pieces, in order; a piece with `completes` set ends a verified instance.
    pub pieces: Vec<InstancePiece>,
}

impl OpenedChunk {
    /// The bytes of `piece`.
    ///
    /// # Panics
    /// When `piece` is not one of this chunk's pieces.
    pub fn bytes(&self, piece: &InstancePiece) -> &[u8] {
        &self.plaintext[piece.range.clone()]
    }
}

/// Opens a bundle's chunks strictly in order 0, 1, …, `total_chunks - 1`, each exactly once,
/// and checks every instance's size and SHA-256 as its last byte passes (streaming: memory is
/// one chunk). Chunks may be downloaded in any order; feed them here in order.
///
/// A chunk that fails authentication ([`ExchangeError::Tampered`]) leaves the assembler where
/// it was, so a re-downloaded copy can be pushed; an instance mismatch ends it for good.
/// Nothing may be imported before [`finish`](Self::finish) succeeds.
pub struct ChunkAssembler<'o> {
    opener: &'o Opener,
    manifest_chunk_len: (u64, u32),
    next: u32,
    tracker: InstanceTracker,
    failed: bool,
}

impl ChunkAssembler<'_> {
    /// The index expected next.
    pub fn next_index(&self) -> u32 {
        self.next
    }

    /// Opens the chunk at `index`, which must be the next one.
    ///
    /// # Errors
    /// [`ExchangeError::DuplicateChunk`] for an index already taken,
    /// [`ExchangeError::MissingChunk`] when `index` skips the expected one,
    /// [`ExchangeError::ChunkOutOfRange`], [`ExchangeError::Tampered`],
    /// [`ExchangeError::InstanceMismatch`], or [`ExchangeError::Malformed`] after an earlier
    /// instance mismatch.
    pub fn push(&mut self, index: u32, ciphertext: &[u8]) -> Result<OpenedChunk> {
        self.check_next(index)?;
        let chunk = self
            .opener
            .chunk_opener()
            .open(index, ciphertext.to_vec())?;
        self.push_decrypted(chunk)
    }

    /// Places a chunk decrypted by a [`ChunkOpener`] (possibly on another thread), which must
    /// be the next one; checks as [`push`](Self::push) does.
    ///
    /// # Errors
    /// As [`push`](Self::push), except [`ExchangeError::Tampered`], which the opener reports.
    pub fn push_decrypted(&mut self, chunk: DecryptedChunk) -> Result<OpenedChunk> {
        let DecryptedChunk { index, plaintext } = chunk;
        self.check_next(index)?;
        let total = self.opener.total_chunks;
        let (payload_size, chunk_size) = self.manifest_chunk_len;
        let expected = super::manifest::chunk_len(payload_size, chunk_size, total, index);
        if plaintext.len() != expected {
            self.failed = true;
            return Err(ExchangeError::ChunkLength {
                index,
                expected,
                actual: plaintext.len(),
            });
        }
        let pieces = self
            .tracker
            .feed(&plaintext)
            .inspect_err(|_| self.failed = true)?;
        self.next += 1;
        Ok(OpenedChunk {
            index,
            plaintext,
            pieces,
        })
    }

    fn check_next(&self, index: u32) -> Result<()> {
        if self.failed {
            return Err(ExchangeError::malformed(
                "bundle",
                "an earlier instance failed verification",
            ));
        }
        let total = self.opener.total_chunks;
        if index >= total {
            return Err(ExchangeError::ChunkOutOfRange { index, total });
        }
        if index < self.next {
            return Err(ExchangeError::DuplicateChunk { index });
        }
        if index > self.next {
            return Err(ExchangeError::MissingChunk { index: self.next });
        }
        Ok(())
    }

    /// Checks that every chunk arrived and every instance verified.
    ///
    /// # Errors
    /// [`ExchangeError::MissingChunk`] naming the first chunk that did not arrive.
    pub fn finish(self) -> Result<()> {
        if self.failed {
            return Err(ExchangeError::malformed(
                "bundle",
                "an instance failed verification",
            ));
        }
        if self.next < self.opener.total_chunks {
            return Err(ExchangeError::MissingChunk { index: self.next });
        }
        self.tracker.finish()
    }
}

impl fmt::Debug for ChunkAssembler<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkAssembler")
            .field("bundle_id", &self.opener.bundle_id)
            .field("next", &self.next)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signer as _;

    use super::*;
    use crate::bundle::manifest::tests::draft;
    use crate::bundle::{SealOptions, Sealer, SignedDirectoryEntry, SigningKey};

    const NOW: u64 = 1_000_000;

    struct Fixture {
        a: NodeKeys,
        b: NodeKeys,
        dir: Directory,
    }

    fn fixture() -> Fixture {
        let auth = SigningKey::generate(&mut rand::rngs::OsRng);
        let a = NodeKeys::generate("org-a").unwrap();
        let b = NodeKeys::generate("org-b").unwrap();
        let signed: Vec<_> = [&a, &b]
            .into_iter()
            .map(|k| {
                SignedDirectoryEntry::sign(k.public("x", "https://mb.example/", NOW * 2), &auth)
            })
            .collect();
        let dir = Directory::from_signed(&signed, &auth.verifying_key()).unwrap();
        Fixture { a, b, dir }
    }

    fn sealer(f: &Fixture) -> Sealer {
        let entry = f.dir.recipient("org-b", NOW).unwrap();
        Sealer::new(
            &f.a,
            entry,
            draft(&[3000]),
            SealOptions::new().chunk_size(1024),
            NOW,
        )
        .unwrap()
    }

    /// Re-signs a header with A's real key, as a compromised or buggy sender would.
    fn resign(f: &Fixture, h: &mut BundleHeader) {
        h.signature = f.a.signing_key().sign(&h.signed_bytes()).to_bytes();
    }

    #[test]
    fn manifest_that_disagrees_with_the_header_is_refused() {
        let f = fixture();
        let mut m = sealer(&f).manifest().clone();
        m.recipient = "org-c".into();
        let s = Sealer::from_manifest(&f.a, f.dir.get("org-b").unwrap(), m).unwrap();
        let err = Opener::open(s.header(), &f.b, &f.dir, NOW).unwrap_err();
        assert!(
            matches!(err, ExchangeError::HeaderMismatch { field: "recipient" }),
            "{err}"
        );
    }

    #[test]
    fn signed_but_garbled_key_and_manifest_are_refused() {
        let f = fixture();
        let s = sealer(&f);
        let mut h = s.header().clone();
        h.wrapped_key[50] ^= 1;
        resign(&f, &mut h);
        assert!(matches!(
            Opener::open(&h, &f.b, &f.dir, NOW),
            Err(ExchangeError::KeyUnwrap)
        ));

        let mut h = s.header().clone();
        h.sealed_manifest[0] ^= 1;
        resign(&f, &mut h);
        assert!(matches!(
            Opener::open(&h, &f.b, &f.dir, NOW),
            Err(ExchangeError::ManifestTampered)
        ));

        let mut h = s.header().clone();
        h.total_chunks += 1;
        resign(&f, &mut h);
        assert!(matches!(
            Opener::open(&h, &f.b, &f.dir, NOW),
            Err(ExchangeError::Malformed { .. })
        ));

        let mut h = s.header().clone();
        h.version = crate::bundle::FORMAT_VERSION + 1;
        assert!(matches!(
            Opener::open(&h, &f.b, &f.dir, NOW),
            Err(ExchangeError::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn an_index_is_sealed_once() {
        let f = fixture();
        let mut s = sealer(&f);
        s.seal_chunk(0, &[1; 1024]).unwrap();
        for content in [[1u8; 1024], [2u8; 1024]] {
            let err = s.seal_chunk(0, &content).unwrap_err();
            assert!(
                matches!(err, ExchangeError::ChunkResealed { index: 0 }),
                "{err}"
            );
        }
        // A writer cannot cut the index again either.
        let len = s.manifest().chunk_len(0);
        let err = s.writer().cut(&vec![1; len]).unwrap_err();
        assert!(
            matches!(err, ExchangeError::ChunkResealed { index: 0 }),
            "{err}"
        );
        assert!(matches!(
            s.seal_chunk(3, &[0; 1]),
            Err(ExchangeError::ChunkOutOfRange { .. })
        ));
    }

    #[test]
    fn debug_output_hides_the_content_key() {
        let f = fixture();
        let s = sealer(&f);
        let (o, m) = Opener::open(s.header(), &f.b, &f.dir, NOW).unwrap();
        assert!(format!("{s:?}").starts_with("Sealer { bundle_id"));
        assert!(!format!("{o:?}").contains("cipher"));
        assert!(o.assembler(&m).is_ok());
    }
}

//! Chunk encryption and the walk over the payload's instances.
//!
//! Nonces and AADs are defined in the `bundle` module docs. An internal tracker follows the
//! payload bytes in order, splits them into [`InstancePiece`]s and checks each instance's size
//! and SHA-256 when its last byte has passed; the sender and the recipient both use it.

use std::ops::Range;

use chacha20poly1305::aead::{Aead as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use sha2::{Digest, Sha256};

use super::BundleId;
use super::manifest::Instance;
use crate::{ExchangeError, Result};

/// Nonce purpose of the sealed manifest.
const PURPOSE_MANIFEST: u32 = 0;
/// Nonce purpose of the payload chunks.
const PURPOSE_CHUNK: u32 = 1;

/// The 96-bit nonce: `purpose (u32 BE) ‖ counter (u64 BE)`.
fn nonce(purpose: u32, counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&purpose.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n.into()
}

/// AAD of the sealed manifest: `bundle_id (16) ‖ "manifest"`.
fn manifest_aad(id: &BundleId) -> Vec<u8> {
    [id.as_bytes().as_slice(), b"manifest"].concat()
}

/// AAD of chunk `index`: `bundle_id (16) ‖ index (u32 BE) ‖ total_chunks (u32 BE) ‖ is_last (u8)`.
pub fn chunk_aad(id: &BundleId, index: u32, total: u32) -> [u8; 25] {
    let mut a = [0u8; 25];
    a[..16].copy_from_slice(id.as_bytes());
    a[16..20].copy_from_slice(&index.to_be_bytes());
    a[20..24].copy_from_slice(&total.to_be_bytes());
    a[24] = u8::from(index + 1 == total);
    a
}

/// Seals the manifest JSON.
pub(crate) fn seal_manifest(c: &ChaCha20Poly1305, id: &BundleId, json: &[u8]) -> Result<Vec<u8>> {
    let aad = manifest_aad(id);
    c.encrypt(
        &nonce(PURPOSE_MANIFEST, 0),
        Payload {
            msg: json,
            aad: &aad,
        },
    )
    .map_err(|_| ExchangeError::Seal { what: "manifest" })
}

/// Opens the sealed manifest.
pub(crate) fn open_manifest(c: &ChaCha20Poly1305, id: &BundleId, sealed: &[u8]) -> Result<Vec<u8>> {
    let aad = manifest_aad(id);
    c.decrypt(
        &nonce(PURPOSE_MANIFEST, 0),
        Payload {
            msg: sealed,
            aad: &aad,
        },
    )
    .map_err(|_| ExchangeError::ManifestTampered)
}

/// Seals chunk `index` of `total`.
pub(crate) fn seal(
    c: &ChaCha20Poly1305,
    id: &BundleId,
    index: u32,
    total: u32,
    pt: &[u8],
) -> Result<Vec<u8>> {
    let aad = chunk_aad(id, index, total);
    c.encrypt(
        &nonce(PURPOSE_CHUNK, u64::from(index)),
        Payload { msg: pt, aad: &aad },
    )
    .map_err(|_| ExchangeError::Seal { what: "chunk" })
}

/// Opens chunk `index` of `total`.
pub(crate) fn open(
    c: &ChaCha20Poly1305,
    id: &BundleId,
    index: u32,
    total: u32,
    ct: &[u8],
) -> Result<Vec<u8>> {
    let aad = chunk_aad(id, index, total);
    c.decrypt(
        &nonce(PURPOSE_CHUNK, u64::from(index)),
        Payload { msg: ct, aad: &aad },
    )
    .map_err(|_| ExchangeError::Tampered { chunk: index })
}

/// One sealed chunk, ready for upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// Index in the bundle, from 0.
    pub index: u32,
    /// The AEAD ciphertext: plaintext length + 16 bytes of tag.
    pub ciphertext: Vec<u8>,
}

/// A run of bytes of one instance inside a chunk's plaintext.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePiece {
    /// Position of the instance in [`Manifest::instances`](super::Manifest::instances).
    pub instance: usize,
    /// The bytes' range in the chunk's plaintext.
    pub range: Range<usize>,
    /// Whether this piece starts the instance.
    pub starts: bool,
    /// Whether this piece ends the instance, whose size and SHA-256 have then been verified.
    pub completes: bool,
}

/// Follows the payload through the manifest's instances, hashing each one.
#[derive(Debug, Clone)]
pub(crate) struct InstanceTracker {
    /// (SOP Instance UID, size, SHA-256) in payload order.
    instances: Vec<(String, u64, [u8; 32])>,
    current: usize,
    done: u64,
    total_seen: u64,
    payload_size: u64,
    hasher: Sha256,
}

impl InstanceTracker {
    /// A tracker at the start of the payload.
    pub(crate) fn new(instances: &[Instance]) -> Self {
        InstanceTracker {
            instances: instances
                .iter()
                .map(|i| (i.sop_instance_uid.clone(), i.size, i.sha256))
                .collect(),
            current: 0,
            done: 0,
            total_seen: 0,
            payload_size: instances.iter().map(|i| i.size).sum(),
            hasher: Sha256::new(),
        }
    }

    /// Takes the next payload bytes; returns the pieces they form.
    ///
    /// # Errors
    /// [`ExchangeError::InstanceMismatch`] when an instance ends with the wrong SHA-256;
    /// [`ExchangeError::PayloadLength`] when the bytes go past the payload's end.
    pub(crate) fn feed(&mut self, data: &[u8]) -> Result<Vec<InstancePiece>> {
        let mut pieces = Vec::new();
        let mut pos = 0usize;
        while pos < data.len() {
            let Some((uid, size, sha)) = self.instances.get(self.current) else {
                return Err(ExchangeError::PayloadLength {
                    expected: self.payload_size,
                    actual: self.total_seen + (data.len() - pos) as u64,
                });
            };
            let left = size - self.done;
            let take = left.min((data.len() - pos) as u64) as usize;
            self.hasher.update(&data[pos..pos + take]);
            let starts = self.done == 0;
            self.done += take as u64;
            self.total_seen += take as u64;
            let completes = self.done == *size;
            if completes {
                let digest: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
                if digest != *sha {
                    return Err(ExchangeError::InstanceMismatch {
                        sop_instance_uid: uid.clone(),
                    });
                }
            }
            pieces.push(InstancePiece {
                instance: self.current,
                range: pos..pos + take,
                starts,
                completes,
            });
            if completes {
                self.current += 1;
                self.done = 0;
            }
            pos += take;
        }
        Ok(pieces)
    }

    /// Checks that the whole payload has passed.
    ///
    /// # Errors
    /// [`ExchangeError::PayloadLength`] when bytes are still missing.
    pub(crate) fn finish(&self) -> Result<()> {
        if self.current == self.instances.len() {
            Ok(())
        } else {
            Err(ExchangeError::PayloadLength {
                expected: self.payload_size,
                actual: self.total_seen,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20poly1305::KeyInit as _;

    fn inst(uid: &str, data: &[u8], offset: u64) -> Instance {
        Instance {
            sop_instance_uid: uid.into(),
            study_uid: "1.2".into(),
            series_uid: "1.2.3".into(),
            sha256: Sha256::digest(data).into(),
            size: data.len() as u64,
            offset,
        }
    }

    #[test]
    fn nonces_never_collide_between_manifest_and_chunks() {
        assert_ne!(nonce(PURPOSE_MANIFEST, 0), nonce(PURPOSE_CHUNK, 0));
        assert_ne!(nonce(PURPOSE_CHUNK, 1), nonce(PURPOSE_CHUNK, 2));
    }

    #[test]
    fn aad_marks_only_the_last_chunk() {
        let id = BundleId::from_bytes([1; 16]);
        assert_eq!(chunk_aad(&id, 0, 3)[24], 0);
        assert_eq!(chunk_aad(&id, 2, 3)[24], 1);
        assert_eq!(&chunk_aad(&id, 2, 3)[16..24], &[0, 0, 0, 2, 0, 0, 0, 3]);
    }

    #[test]
    fn chunk_round_trip_and_binding() {
        let c = ChaCha20Poly1305::new(&[9u8; 32].into());
        let id = BundleId::from_bytes([1; 16]);
        let ct = seal(&c, &id, 1, 3, b"hello").unwrap();
        assert_eq!(open(&c, &id, 1, 3, &ct).unwrap(), b"hello");
        assert!(matches!(
            open(&c, &id, 0, 3, &ct),
            Err(ExchangeError::Tampered { chunk: 0 })
        ));
        assert!(open(&c, &id, 1, 2, &ct).is_err(), "total_chunks is bound");
        assert!(
            open(&c, &BundleId::from_bytes([2; 16]), 1, 3, &ct).is_err(),
            "bundle id is bound"
        );
    }

    #[test]
    fn tracker_splits_and_verifies() {
        let (a, b) = (b"aaaaa".as_slice(), b"bbb".as_slice());
        let mut t = InstanceTracker::new(&[inst("1.1", a, 0), inst("1.2", b, 5)]);
        let p = t.feed(b"aaa").unwrap();
        assert_eq!(
            p,
            [InstancePiece {
                instance: 0,
                range: 0..3,
                starts: true,
                completes: false
            }]
        );
        assert!(t.finish().is_err());
        let p = t.feed(b"aabbb").unwrap();
        assert_eq!(p.len(), 2);
        assert!(p[0].completes && !p[0].starts && p[1].starts && p[1].completes);
        assert_eq!(p[1].range, 2..5);
        t.finish().unwrap();
        assert!(matches!(
            t.feed(b"x"),
            Err(ExchangeError::PayloadLength { .. })
        ));

        let mut t = InstanceTracker::new(&[inst("1.1", a, 0)]);
        let err = t.feed(b"aaaab").unwrap_err();
        assert!(
            matches!(err, ExchangeError::InstanceMismatch { ref sop_instance_uid } if sop_instance_uid == "1.1")
        );
    }
}

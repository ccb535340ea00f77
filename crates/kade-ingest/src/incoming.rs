//! One instance as it arrives: spooled to disk and hashed on the way.
//!
//! Only the whole object is hashed as it arrives. The File Meta group in front of the data set
//! is Kade's own (built from the request, Kade's implementation UID and version), so two
//! objects with the same data set have the same SHA-256 as long as Kade's version is the same;
//! the data set's own digest is needed only to tell a resend from a different object when the
//! two SHA-256 differ, and is computed then ([`DatasetDigest`]). This halves the hashing of
//! every instance (SHA-256 was about a quarter of Kade's CPU time while storing).

use bytes::Bytes;
use dicom_object::meta::FileMetaTableBuilder;
use kade_core::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, InstanceAttributes, Uid};
use kade_store::{BlobStore, Spool, SpooledFile};
use sha2::{Digest, Sha256};

use crate::IngestError;

/// What the request announced about the instance (C-STORE: Affected SOP Class and Instance
/// UID, and the transfer syntax of the presentation context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Affected SOP Class UID.
    pub sop_class_uid: Uid,
    /// Affected SOP Instance UID.
    pub sop_instance_uid: Uid,
    /// Transfer syntax the dataset is encoded in.
    pub transfer_syntax: Uid,
    /// The study the instance must belong to (STOW-RS `POST /studies/{study}`), if any.
    pub study_uid: Option<Uid>,
}

impl Expected {
    pub(crate) fn check(&self, a: &InstanceAttributes) -> Result<(), IngestError> {
        if a.sop_class_uid != self.sop_class_uid {
            return Err(IngestError::Mismatch(format!(
                "SOP Class UID is {} in the dataset but {} in the command",
                a.sop_class_uid, self.sop_class_uid
            )));
        }
        if a.sop_instance_uid != self.sop_instance_uid {
            return Err(IngestError::Mismatch(format!(
                "SOP Instance UID is {} in the dataset but {} in the command",
                a.sop_instance_uid, self.sop_instance_uid
            )));
        }
        if let Some(study) = &self.study_uid {
            if &a.study.study_uid != study {
                return Err(IngestError::Mismatch(format!(
                    "Study Instance UID is {} in the dataset but {study} in the request",
                    a.study.study_uid
                )));
            }
        }
        Ok(())
    }
}

/// Instances up to this size are kept in memory while they arrive and written with one
/// system call; larger ones are spooled to disk as they arrive, so memory stays bounded.
pub const MEMORY_LIMIT: usize = 4 * 1024 * 1024;

/// An instance being received, hashed on the way. Dropping it discards everything received.
#[derive(Debug)]
pub struct Incoming {
    body: Body,
    len: u64,
    whole: Sha256,
    expected: Expected,
    store: BlobStore,
}

#[derive(Debug)]
enum Body {
    Memory(Vec<u8>),
    File(Spool),
}

/// A completely received instance.
#[derive(Debug)]
pub(crate) enum Received {
    /// Small: the bytes.
    Memory(Bytes),
    /// Large: a synced spool file.
    File(SpooledFile),
}

/// The SHA-256 of a Part 10 object's data set, fed the object's bytes in pieces of any size
/// (a stream from the object store holds no more than one piece in memory).
#[derive(Debug, Default)]
pub(crate) struct DatasetDigest {
    /// The first 144 bytes: preamble, `DICM`, File Meta Information Group Length.
    head: Vec<u8>,
    /// File Meta bytes still to skip, once the head is complete.
    skip: Option<u64>,
    hash: Sha256,
    not_part10: bool,
}

impl DatasetDigest {
    /// Feeds the next bytes of the object.
    pub(crate) fn update(&mut self, mut buf: &[u8]) {
        if self.not_part10 {
            return;
        }
        let skip = match &mut self.skip {
            Some(skip) => skip,
            None => {
                let take = (kade_core::part10::HEAD - self.head.len()).min(buf.len());
                self.head.extend_from_slice(&buf[..take]);
                buf = &buf[take..];
                if self.head.len() < kade_core::part10::HEAD {
                    return;
                }
                let Some(start) = kade_core::part10::data_set_start(&self.head) else {
                    self.not_part10 = true;
                    return;
                };
                self.skip.insert(start - kade_core::part10::HEAD as u64)
            }
        };
        let n = (*skip).min(buf.len() as u64);
        *skip -= n;
        self.hash.update(&buf[n as usize..]);
    }

    /// The digest (lowercase hex); `None` when the bytes were not a whole Part 10 header.
    pub(crate) fn finish(self) -> Option<String> {
        (!self.not_part10 && self.skip == Some(0)).then(|| hex::encode(self.hash.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part10(meta: &[u8], dataset: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; 128];
        v.extend_from_slice(b"DICM");
        v.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0]);
        v.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        v.extend_from_slice(meta);
        v.extend_from_slice(dataset);
        v
    }

    fn digest(bytes: &[u8]) -> Option<String> {
        let mut d = DatasetDigest::default();
        d.update(bytes);
        d.finish()
    }

    #[test]
    fn data_set_digest_is_the_same_in_any_pieces() {
        let dataset: Vec<u8> = (0..10_000u32).map(|i| (i * 31) as u8).collect();
        let bytes = part10(&[7u8; 90], &dataset);
        let want = hex::encode(Sha256::digest(&dataset));
        for piece in [1, 7, 143, 144, 145, 4096, bytes.len()] {
            let mut d = DatasetDigest::default();
            bytes.chunks(piece).for_each(|c| d.update(c));
            assert_eq!(
                d.finish().as_deref(),
                Some(want.as_str()),
                "pieces of {piece}"
            );
        }

        // An empty data set has the digest of nothing.
        let empty = part10(&[1, 2], &[]);
        assert_eq!(digest(&empty), Some(hex::encode(Sha256::digest(b""))));
        // Not Part 10, a head cut short, a File Meta group longer than the object: no digest.
        let mut not = bytes.clone();
        not[128] = b'X';
        assert_eq!(digest(&not), None);
        assert_eq!(digest(&bytes[..100]), None);
        assert_eq!(digest(&bytes[..200]), None);
    }
}

/// What [`Incoming::finish`] returns.
#[derive(Debug)]
pub(crate) struct Complete {
    pub received: Received,
    pub len: u64,
    pub sha256: String,
    pub expected: Expected,
}

impl Incoming {
    /// Starts a Part 10 object for a bare data set: zero preamble, `DICM`, a File Meta group
    /// built from `expected`, then the data set bytes as they arrive.
    pub(crate) fn dataset(store: BlobStore, expected: Expected) -> Result<Self, IngestError> {
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(expected.sop_class_uid.as_str())
            .media_storage_sop_instance_uid(expected.sop_instance_uid.as_str())
            .transfer_syntax(expected.transfer_syntax.as_str())
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
            .build()
            .map_err(|e| IngestError::Invalid(format!("cannot build File Meta group: {e}")))?;
        let mut head = Vec::with_capacity(64 * 1024);
        head.resize(128, 0);
        head.extend_from_slice(b"DICM");
        meta.write(&mut head)
            .map_err(|e| IngestError::Invalid(format!("cannot write File Meta group: {e}")))?;
        let mut whole = Sha256::new();
        whole.update(&head);
        Ok(Incoming {
            len: head.len() as u64,
            body: Body::Memory(head),
            whole,
            expected,
            store,
        })
    }

    /// Appends received data set bytes.
    ///
    /// # Errors
    /// When the spool cannot be written (disk full).
    pub async fn write(&mut self, buf: &[u8]) -> Result<(), IngestError> {
        self.whole.update(buf);
        self.len += buf.len() as u64;
        match &mut self.body {
            Body::Memory(v) if v.len() + buf.len() <= MEMORY_LIMIT => v.extend_from_slice(buf),
            Body::Memory(v) => {
                let mut spool = self.store.spool().await?;
                spool.write(v).await?;
                spool.write(buf).await?;
                self.body = Body::File(spool);
            }
            Body::File(spool) => spool.write(buf).await?,
        }
        Ok(())
    }

    /// Bytes received so far, File Meta included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) async fn finish(self) -> Result<Complete, IngestError> {
        let received = match self.body {
            Body::Memory(v) => Received::Memory(Bytes::from(v)),
            Body::File(spool) => Received::File(spool.finish().await?),
        };
        Ok(Complete {
            received,
            len: self.len,
            sha256: hex::encode(self.whole.finalize()),
            expected: self.expected,
        })
    }
}

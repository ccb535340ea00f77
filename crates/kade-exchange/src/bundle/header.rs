//! [`BundleId`] and [`BundleHeader`]: what the mailbox stores next to the chunks.

use std::fmt;
use std::str::FromStr;

use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use super::codec::{self, Canon};
use super::{FORMAT_VERSION, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::{ExchangeError, Result};

/// A bundle's identity: 128 random bits, written as 32 lowercase hex digits. Never derived
/// from study identifiers; single-use per sender and recipient.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BundleId([u8; 16]);

impl BundleId {
    /// A fresh random id from the operating system's generator.
    pub fn random() -> Self {
        let mut b = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut b);
        BundleId(b)
    }

    /// The id from its 16 bytes.
    pub fn from_bytes(b: [u8; 16]) -> Self {
        BundleId(b)
    }

    /// The 16 bytes, as they enter AADs and signatures.
    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BundleId({self})")
    }
}

impl FromStr for BundleId {
    type Err = ExchangeError;

    /// Parses 32 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self> {
        let mut b = [0u8; 16];
        if s.len() != 32 || s.bytes().any(|c| c.is_ascii_uppercase()) {
            return Err(ExchangeError::malformed(
                "bundle id",
                "expected 32 lowercase hex digits",
            ));
        }
        hex::decode_to_slice(s, &mut b).map_err(|e| ExchangeError::malformed("bundle id", e))?;
        Ok(BundleId(b))
    }
}

impl Serialize for BundleId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for BundleId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The public part of a bundle, stored by the mailbox next to the chunks. It holds routing
/// data and ciphertext only: no patient name, national id or DICOM UID ever appears here.
///
/// Every field is covered by [`signature`](Self::signature); see the module docs for the
/// signed byte layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleHeader {
    /// Format version, [`FORMAT_VERSION`].
    pub version: u32,
    /// The bundle's identity.
    pub bundle_id: BundleId,
    /// Sending organisation (e.g. URA number).
    pub sender: String,
    /// Receiving organisation.
    pub recipient: String,
    /// Number of chunks, at least 1.
    pub total_chunks: u32,
    /// Plaintext bytes per chunk; the last chunk holds the remainder.
    pub chunk_size: u32,
    /// Plaintext payload bytes (all instances concatenated).
    pub payload_size: u64,
    /// HPKE encapsulated key (32 bytes) followed by the HPKE ciphertext of the content key
    /// (48 bytes); base64 in JSON.
    #[serde(with = "codec::b64")]
    pub wrapped_key: Vec<u8>,
    /// The manifest JSON sealed under the content key; base64 in JSON.
    #[serde(with = "codec::b64")]
    pub sealed_manifest: Vec<u8>,
    /// The sender's Ed25519 signature over [`signed_bytes`](Self::signed_bytes); base64.
    #[serde(with = "codec::b64_array")]
    pub signature: [u8; 64],
    /// Creation time (unix seconds); equals the manifest's.
    pub created_at: u64,
    /// End of validity (unix seconds); equals the manifest's `not_after`.
    pub expires_at: u64,
}

impl BundleHeader {
    /// The canonical bytes the sender signs (layout in the module docs).
    pub fn signed_bytes(&self) -> Vec<u8> {
        Canon::new(super::HEADER_SIGNATURE_TAG)
            .u32(self.version)
            .fixed(self.bundle_id.as_bytes())
            .str(&self.sender)
            .str(&self.recipient)
            .u32(self.total_chunks)
            .u32(self.chunk_size)
            .u64(self.payload_size)
            .u64(self.created_at)
            .u64(self.expires_at)
            .fixed(&codec::sha256(&self.wrapped_key))
            .fixed(&codec::sha256(&self.sealed_manifest))
            .finish()
    }

    /// The header as JSON, for the mailbox.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("bundle header serialises")
    }

    /// Parses a header from JSON.
    ///
    /// # Errors
    /// [`ExchangeError::Malformed`] when the JSON does not describe a header.
    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| ExchangeError::malformed("bundle header", e))
    }

    /// Checks that this code reads the header's version.
    pub(crate) fn check_version(&self) -> Result<()> {
        if self.version != FORMAT_VERSION {
            return Err(ExchangeError::UnsupportedVersion {
                what: "bundle",
                version: self.version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(())
    }

    /// Checks that the chunk layout is self-consistent and within limits.
    pub(crate) fn check_layout(&self) -> Result<()> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(ExchangeError::malformed(
                "bundle header",
                format!(
                    "chunk size {} outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}",
                    self.chunk_size
                ),
            ));
        }
        let expected = super::chunk_count(self.payload_size, self.chunk_size)?;
        if expected != self.total_chunks {
            return Err(ExchangeError::malformed(
                "bundle header",
                format!(
                    "{} chunks declared, the payload size needs {expected}",
                    self.total_chunks
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_id_round_trips_as_hex() {
        let id = BundleId::random();
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<BundleId>().unwrap(), id);
        assert!(
            "ABCDEF00000000000000000000000000"
                .parse::<BundleId>()
                .is_err()
        );
        assert!("abc".parse::<BundleId>().is_err());
        assert_ne!(BundleId::random(), BundleId::random());
    }
}

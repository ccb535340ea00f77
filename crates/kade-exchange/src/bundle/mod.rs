//! Bundles: the sealed, signed unit of exchange between two nodes.
//!
//! # Layout
//! - [`keys`]: [`NodeKeys`], a node's Ed25519 signing and X25519 encryption keys, and their
//!   0600 key file.
//! - [`directory`]: [`DirectoryEntry`] (a node's public keys and mailbox),
//!   [`SignedDirectoryEntry`] (signed by the directory authority), [`Directory`] (verified).
//! - [`manifest`]: [`Manifest`], the patient, studies, instances (SHA-256, size, offset) and
//!   reason for referral; [`ManifestDraft`] is what the sender fills in.
//! - [`header`]: [`BundleId`] and [`BundleHeader`], the only part the mailbox can read.
//! - [`seal`]: [`Sealer`], [`ChunkWriter`] and [`ChunkSealer`] (sender).
//! - [`open`]: [`Opener`], [`ChunkOpener`] and [`ChunkAssembler`] (recipient).
//! - [`chunk`]: nonces, AADs, [`SealedChunk`], [`InstancePiece`].
//! - [`receipt`]: [`Receipt`], [`SignedReceipt`].
//!
//! # Flow
//! The sender looks the recipient up in the [`Directory`] (no entry, no bundle), builds a
//! [`Sealer`] from a [`ManifestDraft`], uploads [`Sealer::header`] and the chunks that
//! [`Sealer::writer`] cuts and a [`ChunkSealer`] seals (on any thread, so in parallel). The
//! recipient calls [`Opener::open`] on the header (signature first, then decryption),
//! decrypts chunks with a [`ChunkOpener`] (in parallel too), feeds them in order to a
//! [`ChunkAssembler`], makes nothing visible before [`ChunkAssembler::finish`], and returns a
//! [`SignedReceipt`] sealed to the sender.
//!
//! # Payload
//! The instances' Part 10 bytes are concatenated in manifest order into one payload
//! ([`Instance::offset`]) and cut into chunks of `chunk_size` bytes (default 4 MiB; the last
//! chunk holds the remainder, at least one byte). One payload rather than chunks per instance
//! keeps a study of many small instances at few chunks.
//!
//! # Keys and encryption
//! Each bundle has a fresh random 256-bit content key. It is wrapped to the recipient with
//! HPKE (RFC 9180) mode Base, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305:
//! - `info` = `"kade-exchange/v1/content-key" 0x00 ‖ bundle_id (16) ‖ str(sender) ‖ str(recipient)`,
//!   empty AAD;
//! - `wrapped_key` = `enc (32) ‖ ciphertext (32 + 16)`, 80 bytes.
//!
//! The manifest JSON and the chunks are sealed with AES-256-GCM (96-bit nonce, 128-bit tag)
//! under the content key (format 1 used ChaCha20-Poly1305; see `ContentCipher` for why):
//! - nonce = `purpose (u32 BE) ‖ counter (u64 BE)`: purpose 0, counter 0 for the manifest;
//!   purpose 1, counter = chunk index for chunk *i*;
//! - manifest AAD = `bundle_id (16) ‖ "manifest"`;
//! - chunk AAD = `bundle_id (16) ‖ index (u32 BE) ‖ total_chunks (u32 BE) ‖ is_last (u8)`,
//!   `is_last` = 1 exactly when `index == total_chunks - 1`.
//!
//! A counter nonce is safe because the key is random and used for one bundle only, and within
//! that bundle every (purpose, counter) pair seals exactly one plaintext: the manifest once,
//! each chunk index once. A [`Sealer`] hands out each chunk index once ([`Sealer::seal_chunk`]
//! and [`ChunkWriter::cut`] refuse an index already taken). Because the AAD binds the bundle, the index, the count and the
//! last flag, a chunk moved to another index, taken from another bundle, or presented as the
//! end of a truncated bundle fails authentication; [`ChunkAssembler`] rejects duplicates and
//! gaps.
//!
//! # Signed bytes
//! Signatures are Ed25519, verified strictly (`verify_strict`: no small-order keys, no
//! malleable signatures), over canonical bytes: an ASCII domain tag and a zero byte, then the
//! fields in order. Integers are big-endian; `str(s)` is the UTF-8 byte length as u32 BE
//! followed by the bytes; `opt(s)` is `0x00` when absent or `0x01 ‖ str(s)`.
//! - Bundle header (signed by the sender): `"kade-exchange/v1/bundle-header" 0x00 ‖
//!   version (u32) ‖ bundle_id (16) ‖ str(sender) ‖ str(recipient) ‖ total_chunks (u32) ‖
//!   chunk_size (u32) ‖ payload_size (u64) ‖ created_at (u64) ‖ expires_at (u64) ‖
//!   SHA-256(wrapped_key) (32) ‖ SHA-256(sealed_manifest) (32)`.
//! - Directory entry (signed by the authority): `"kade-exchange/v1/directory-entry" 0x00 ‖
//!   str(org_id) ‖ str(display_name) ‖ str(mailbox_url) ‖ signing_key (32) ‖
//!   encryption_key (32) ‖ opt(tls_cert_sha256) ‖ not_after (u64)`.
//! - Receipt (signed by the recipient): `"kade-exchange/v1/receipt" 0x00 ‖ bundle_id (16) ‖
//!   manifest_sha256 (32) ‖ str(sender) ‖ str(recipient) ‖ at (u64) ‖ opt(refused) ‖
//!   count (u32) ‖ count × (str(sop_instance_uid) ‖ outcome (u8: 0 imported, 1 already
//!   present, 2 rejected) ‖ str(reason, empty unless rejected))`.
//!
//! A sealed receipt is HPKE (same suite) to the bundle's sender with `info` =
//! `"kade-exchange/v1/receipt-seal" 0x00 ‖ bundle_id (16) ‖ str(signer) ‖ str(addressee)`,
//! as `enc (32) ‖ ciphertext` of the [`SignedReceipt`] JSON.
//!
//! # Time
//! Times are unix seconds passed in by the caller (`now`), so tests control the clock. A
//! bundle opens while `created_at <= now + 5 min` and `now < not_after`.

pub mod chunk;
mod codec;
pub mod directory;
pub mod header;
pub mod keys;
pub mod manifest;
pub mod open;
pub mod receipt;
pub mod seal;
mod wrap;

pub use chunk::{InstancePiece, SealedChunk};
pub use directory::{Directory, DirectoryEntry, DirectoryFile, SignedDirectoryEntry};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use header::{BundleHeader, BundleId};
pub use keys::NodeKeys;
pub use manifest::{
    BSN_ISSUER_OID, Instance, InstanceDraft, Manifest, ManifestDraft, Patient, Study,
};
pub use open::{ChunkAssembler, ChunkOpener, DecryptedChunk, OpenedChunk, Opener};
pub use receipt::{InstanceOutcome, OutcomeEntry, Receipt, SignedReceipt};
pub use seal::{ChunkSealer, ChunkWriter, PlainChunk, SealOptions, Sealer};

use crate::{ExchangeError, Result};

/// Bundle format version written into every header.
pub const FORMAT_VERSION: u32 = 2;
/// Default plaintext bytes per chunk: 4 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Smallest chunk size accepted.
pub const MIN_CHUNK_SIZE: u32 = 1024;
/// Largest chunk size accepted (bounds the recipient's memory per chunk).
pub const MAX_CHUNK_SIZE: u32 = 64 * 1024 * 1024;
/// Default bundle lifetime: 30 days, the mailbox's retention for unfetched bundles (E15).
pub const DEFAULT_LIFETIME_SECS: u64 = 30 * 24 * 3600;
/// How far in the future `created_at` may lie, for clock skew: 5 minutes (E10).
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// Largest manifest JSON accepted: 32 MiB (some 100 000 instances).
pub const MAX_MANIFEST_BYTES: usize = 32 * 1024 * 1024;

/// Domain tag of the header signature.
const HEADER_SIGNATURE_TAG: &str = "kade-exchange/v1/bundle-header";
/// Domain tag of the directory entry signature.
const DIRECTORY_SIGNATURE_TAG: &str = "kade-exchange/v1/directory-entry";
/// Domain tag of the receipt signature.
const RECEIPT_SIGNATURE_TAG: &str = "kade-exchange/v1/receipt";
/// Domain tag of the content key's HPKE `info`.
const CONTENT_KEY_TAG: &str = "kade-exchange/v1/content-key";
/// Domain tag of a sealed receipt's HPKE `info`.
const RECEIPT_SEAL_TAG: &str = "kade-exchange/v1/receipt-seal";

/// HPKE KEM: DHKEM(X25519, HKDF-SHA256).
type HpkeKem = hpke::kem::X25519HkdfSha256;
/// HPKE KDF: HKDF-SHA256.
type HpkeKdf = hpke::kdf::HkdfSha256;
/// HPKE AEAD: ChaCha20-Poly1305.
type HpkeAead = hpke::aead::ChaCha20Poly1305;

/// HPKE `info` for a bundle's content key.
fn content_key_info(id: &BundleId, sender: &str, recipient: &str) -> Vec<u8> {
    codec::Canon::new(CONTENT_KEY_TAG)
        .fixed(id.as_bytes())
        .str(sender)
        .str(recipient)
        .finish()
}

/// Number of chunks for `payload_size` bytes in chunks of `chunk_size`.
///
/// # Errors
/// [`ExchangeError::Malformed`] for an empty payload, a zero chunk size or more than
/// `u32::MAX` chunks.
pub fn chunk_count(payload_size: u64, chunk_size: u32) -> Result<u32> {
    if payload_size == 0 || chunk_size == 0 {
        return Err(ExchangeError::malformed(
            "payload",
            "empty payload or zero chunk size",
        ));
    }
    u32::try_from(payload_size.div_ceil(u64::from(chunk_size)))
        .map_err(|_| ExchangeError::malformed("payload", "more than 2^32 - 1 chunks"))
}

/// An organisation id: 1–64 ASCII letters, digits, `.`, `-` or `_` (a URA number, an OID).
///
/// # Errors
/// [`ExchangeError::Malformed`] otherwise.
pub fn check_org_id(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(ExchangeError::malformed(
            "organisation id",
            format!("{s:?}"),
        ))
    }
}

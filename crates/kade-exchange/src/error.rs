//! [`ExchangeError`]: what can go wrong while sealing, opening or verifying.

use std::path::PathBuf;

/// Everything that can fail in the exchange core. Each variant names what failed; none carries
/// patient data, so messages may be logged and audited as they are.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// The bundle or receipt names a sender that has no entry in the peer directory.
    #[error("the sender {org_id} has no entry in the peer directory")]
    UnknownSender {
        /// The organisation the bundle claims to come from.
        org_id: String,
    },
    /// A bundle was addressed to an organisation that has no entry in the peer directory.
    #[error("the recipient {org_id} has no entry in the peer directory; nothing can be sent to it")]
    UnknownRecipient {
        /// The organisation asked for.
        org_id: String,
    },
    /// The directory entry of a peer is past its `not_after`.
    #[error("the directory entry of {org_id} expired at {not_after}")]
    EntryExpired {
        /// The peer.
        org_id: String,
        /// When the entry stopped being valid (unix seconds).
        not_after: u64,
    },
    /// A signature did not verify with the key it must come from.
    #[error("the signature on the {what} does not verify")]
    BadSignature {
        /// What was signed: "bundle header", "receipt" or "directory entry".
        what: &'static str,
    },
    /// The bundle is addressed to another organisation.
    #[error("the bundle is addressed to {recipient}, not to this node ({us})")]
    NotForUs {
        /// The recipient named in the bundle.
        recipient: String,
        /// This node's organisation.
        us: String,
    },
    /// The bundle is past its `not_after`.
    #[error("the bundle expired at {not_after} (now {now})")]
    Stale {
        /// End of validity (unix seconds).
        not_after: u64,
        /// The time of the check (unix seconds).
        now: u64,
    },
    /// The bundle claims to have been created further in the future than the allowed skew.
    #[error(
        "the bundle claims creation at {created_at}, more than the allowed clock skew after now ({now})"
    )]
    NotYetValid {
        /// Claimed creation time (unix seconds).
        created_at: u64,
        /// The time of the check (unix seconds).
        now: u64,
    },
    /// HPKE could not recover the content key: not encrypted to this node's key.
    #[error("the content key could not be unwrapped with this node's encryption key")]
    KeyUnwrap,
    /// The sealed manifest failed authentication.
    #[error("the manifest could not be decrypted: tampered, or sealed under another key")]
    ManifestTampered,
    /// A chunk failed authentication: altered, moved to another index, or from another bundle.
    #[error("chunk {chunk} failed authentication: altered, moved, or from another bundle")]
    Tampered {
        /// The index the chunk was presented at.
        chunk: u32,
    },
    /// The signed manifest and the bundle header disagree.
    #[error("the manifest's {field} differs from the bundle header's")]
    HeaderMismatch {
        /// The field that differs.
        field: &'static str,
    },
    /// A chunk is missing (a gap, or the bundle ended early).
    #[error("chunk {index} is missing")]
    MissingChunk {
        /// The first index that did not arrive.
        index: u32,
    },
    /// A chunk arrived a second time.
    #[error("chunk {index} arrived twice")]
    DuplicateChunk {
        /// The repeated index.
        index: u32,
    },
    /// A chunk index beyond the bundle's chunk count.
    #[error("chunk {index} is out of range: the bundle has {total} chunks")]
    ChunkOutOfRange {
        /// The index given.
        index: u32,
        /// The bundle's chunk count.
        total: u32,
    },
    /// A chunk's plaintext length does not fit the bundle layout.
    #[error("chunk {index} holds {actual} bytes where the bundle layout needs {expected}")]
    ChunkLength {
        /// The chunk.
        index: u32,
        /// Length the layout requires.
        expected: usize,
        /// Length given.
        actual: usize,
    },
    /// The sender tried to seal different content under a chunk index already used, which
    /// would reuse a nonce.
    #[error("chunk {index} was already sealed with different content")]
    ChunkResealed {
        /// The chunk.
        index: u32,
    },
    /// An instance's bytes do not match the SHA-256 or size in the manifest.
    #[error("instance {sop_instance_uid} does not match the SHA-256 or size in the manifest")]
    InstanceMismatch {
        /// The SOP Instance UID.
        sop_instance_uid: String,
    },
    /// The payload holds more or fewer bytes than the manifest declares.
    #[error("the payload holds {actual} bytes where the manifest declares {expected}")]
    PayloadLength {
        /// Bytes declared.
        expected: u64,
        /// Bytes seen (so far, when too many).
        actual: u64,
    },
    /// Key material could not be decoded or used.
    #[error("bad key: {what}")]
    BadKey {
        /// Which key, and why.
        what: String,
    },
    /// Encryption failed (a recipient key that yields no shared secret, or an oversized input).
    #[error("could not encrypt the {what}")]
    Seal {
        /// What was being encrypted.
        what: &'static str,
    },
    /// A structure is not well formed.
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What: "manifest", "bundle header", "directory", "key file", …
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A format version this code does not read.
    #[error("unsupported {what} version {version} (this node reads version {supported})")]
    UnsupportedVersion {
        /// The structure.
        what: &'static str,
        /// The version found.
        version: u32,
        /// The version this code reads.
        supported: u32,
    },
    /// A secret key file may be read by group or others.
    #[error("key file {path} is readable by group or others (mode {mode:o}); run chmod 600")]
    InsecureKeyFile {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Reading or writing a file failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// "read", "create", "write".
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ExchangeError {
    /// A [`ExchangeError::Malformed`] with its detail.
    pub(crate) fn malformed(what: &'static str, detail: impl std::fmt::Display) -> Self {
        ExchangeError::Malformed {
            what,
            detail: detail.to_string(),
        }
    }
}

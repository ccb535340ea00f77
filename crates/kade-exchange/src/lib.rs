//! Kade's hospital-to-hospital exchange: the bundle format (a pure library), the node side
//! (send, receive, reconcile, receipts) and the mailbox service.
//!
//! Hospital A's node seals a study for hospital B into a *bundle*: an encrypted, signed
//! manifest (patient, reason for referral, instance list with SHA-256) and a payload cut into
//! chunks, each sealed with an AEAD bound to the bundle, its index and the chunk count. The
//! mailbox in between stores only ciphertext and the [`bundle::BundleHeader`] (routing data, no
//! patient data). B verifies the sender's signature before decrypting anything, opens the
//! chunks in order, checks every instance's hash and answers with a signed
//! [`bundle::Receipt`].
//!
//! # Layout
//! - [`bundle`]: keys, peer directory, manifest, sealing, opening, chunks and receipts; its
//!   module docs define every byte layout that is signed or authenticated.
//! - [`node`]: a node's sending, receiving, reconciliation and status, over the mailbox API.
//! - [`mailbox`]: the mailbox service (`kade mailbox serve`): ciphertext and routing data only.
//! - [`ExchangeError`]: the one error type, each variant naming what failed.
//!
//! # Primitives
//! Ed25519 (`ed25519-dalek`, strict verification) for signatures; HPKE (RFC 9180, `hpke`)
//! with DHKEM(X25519, HKDF-SHA256), HKDF-SHA256 and ChaCha20-Poly1305 in mode Base to wrap
//! each bundle's content key for its recipient; AES-256-GCM (`ring`) for the manifest and
//! the chunks; SHA-256 for instance and transcript hashes.

#![warn(missing_docs)]

pub mod bundle;
mod error;
pub mod mailbox;
pub mod node;

pub use error::ExchangeError;

/// Result with [`ExchangeError`].
pub type Result<T, E = ExchangeError> = std::result::Result<T, E>;

//! The peer directory: [`DirectoryEntry`] publishes a node's keys, [`SignedDirectoryEntry`]
//! carries the directory authority's signature over it, and [`Directory`] is the verified map
//! from organisation id to entry that sealing and opening look keys up in.
//!
//! # Directory file
//! JSON: `{"version": 1, "entries": [{"entry": {…}, "signature": "<base64>"}, …]}`
//! ([`DirectoryFile`]). Loading verifies every entry against the authority's public key and
//! fails as a whole when any signature is bad or an organisation appears twice.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::codec::{self, Canon};
use super::{DIRECTORY_SIGNATURE_TAG, check_org_id};
use crate::{ExchangeError, Result};

/// Version of the directory file format.
const DIRECTORY_FILE_VERSION: u32 = 1;

/// One node as published in the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    /// Organisation id (e.g. URA number).
    pub org_id: String,
    /// Name shown to users ("Ziekenhuis Oost, radiologie").
    pub display_name: String,
    /// Base URL of the mailbox that holds bundles for this organisation.
    pub mailbox_url: String,
    /// Ed25519 public key that signs bundle headers and receipts (base64 in JSON).
    #[serde(with = "codec::b64_array")]
    pub signing_key: [u8; 32],
    /// X25519 public key that content keys are wrapped to (base64 in JSON).
    #[serde(with = "codec::b64_array")]
    pub encryption_key: [u8; 32],
    /// SHA-256 (hex) of the node's mTLS client certificate, when bound (E1/E3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_sha256: Option<String>,
    /// End of validity (unix seconds).
    pub not_after: u64,
}

impl DirectoryEntry {
    /// The canonical bytes the authority signs (layout in the `bundle` module docs).
    pub fn signed_bytes(&self) -> Vec<u8> {
        Canon::new(DIRECTORY_SIGNATURE_TAG)
            .str(&self.org_id)
            .str(&self.display_name)
            .str(&self.mailbox_url)
            .fixed(&self.signing_key)
            .fixed(&self.encryption_key)
            .opt_str(self.tls_cert_sha256.as_deref())
            .u64(self.not_after)
            .finish()
    }

    /// The signing key as an Ed25519 verifying key.
    ///
    /// # Errors
    /// [`ExchangeError::BadKey`] when the bytes are not a valid Ed25519 point or are a weak
    /// (small-order) key.
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        let key =
            VerifyingKey::from_bytes(&self.signing_key).map_err(|e| ExchangeError::BadKey {
                what: format!("signing key of {}: {e}", self.org_id),
            })?;
        if key.is_weak() {
            return Err(ExchangeError::BadKey {
                what: format!("signing key of {} is weak", self.org_id),
            });
        }
        Ok(key)
    }

    /// Checks the field formats: organisation id, key validity, certificate hash.
    fn check(&self) -> Result<()> {
        check_org_id(&self.org_id)?;
        self.verifying_key()?;
        if let Some(fp) = &self.tls_cert_sha256 {
            if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ExchangeError::malformed(
                    "directory entry",
                    "tls_cert_sha256 is not 64 hex digits",
                ));
            }
        }
        Ok(())
    }

    /// Whether the entry is still valid at `now`.
    pub fn is_valid_at(&self, now: u64) -> bool {
        now < self.not_after
    }
}

/// A directory entry with the directory authority's Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDirectoryEntry {
    /// The entry.
    pub entry: DirectoryEntry,
    /// Authority signature over [`DirectoryEntry::signed_bytes`] (base64 in JSON).
    #[serde(with = "codec::b64_array")]
    pub signature: [u8; 64],
}

impl SignedDirectoryEntry {
    /// Signs `entry` with the directory authority's key.
    pub fn sign(entry: DirectoryEntry, authority: &SigningKey) -> Self {
        let signature = authority.sign(&entry.signed_bytes()).to_bytes();
        SignedDirectoryEntry { entry, signature }
    }

    /// Verifies the authority's signature (strictly) and the entry's fields.
    ///
    /// # Errors
    /// [`ExchangeError::BadSignature`] when the signature is not the authority's over this
    /// entry; [`ExchangeError::BadKey`] or [`ExchangeError::Malformed`] for bad fields.
    pub fn verify(&self, authority: &VerifyingKey) -> Result<&DirectoryEntry> {
        let sig = Signature::from_bytes(&self.signature);
        authority
            .verify_strict(&self.entry.signed_bytes(), &sig)
            .map_err(|_| ExchangeError::BadSignature {
                what: "directory entry",
            })?;
        self.entry.check()?;
        Ok(&self.entry)
    }
}

/// The directory file (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryFile {
    /// Format version, 1.
    pub version: u32,
    /// The signed entries.
    pub entries: Vec<SignedDirectoryEntry>,
}

impl DirectoryFile {
    /// A version-1 file holding `entries`.
    pub fn new(entries: Vec<SignedDirectoryEntry>) -> Self {
        DirectoryFile {
            version: DIRECTORY_FILE_VERSION,
            entries,
        }
    }

    /// The file as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("directory file serialises")
    }
}

/// Verified directory entries by organisation id.
#[derive(Debug, Clone, Default)]
pub struct Directory {
    entries: BTreeMap<String, DirectoryEntry>,
}

impl Directory {
    /// Verifies every entry against the authority key and builds the map.
    ///
    /// # Errors
    /// The first failing entry's error from [`SignedDirectoryEntry::verify`], or
    /// [`ExchangeError::Malformed`] when an organisation appears twice.
    pub fn from_signed<'a>(
        entries: impl IntoIterator<Item = &'a SignedDirectoryEntry>,
        authority: &VerifyingKey,
    ) -> Result<Self> {
        let mut map = BTreeMap::new();
        for signed in entries {
            let entry = signed.verify(authority)?;
            if map.insert(entry.org_id.clone(), entry.clone()).is_some() {
                return Err(ExchangeError::malformed(
                    "directory",
                    format!("{} appears more than once", entry.org_id),
                ));
            }
        }
        Ok(Directory { entries: map })
    }

    /// Parses and verifies a directory file's text.
    ///
    /// # Errors
    /// [`ExchangeError::Malformed`] or [`ExchangeError::UnsupportedVersion`] for a bad file,
    /// and the errors of [`from_signed`](Self::from_signed).
    pub fn from_json(text: &str, authority: &VerifyingKey) -> Result<Self> {
        let file: DirectoryFile =
            serde_json::from_str(text).map_err(|e| ExchangeError::malformed("directory", e))?;
        if file.version != DIRECTORY_FILE_VERSION {
            return Err(ExchangeError::UnsupportedVersion {
                what: "directory",
                version: file.version,
                supported: DIRECTORY_FILE_VERSION,
            });
        }
        Self::from_signed(&file.entries, authority)
    }

    /// Reads, parses and verifies the directory file at `path`.
    ///
    /// # Errors
    /// [`ExchangeError::Io`] when the file cannot be read, and those of
    /// [`from_json`](Self::from_json).
    pub fn load(path: &Path, authority: &VerifyingKey) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ExchangeError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, authority)
    }

    /// The entry of `org_id`, valid or not.
    pub fn get(&self, org_id: &str) -> Option<&DirectoryEntry> {
        self.entries.get(org_id)
    }

    /// Every entry, valid or not, by organisation id.
    pub fn entries(&self) -> impl Iterator<Item = &DirectoryEntry> {
        self.entries.values()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the directory has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of a recipient to seal a bundle for (E1: no entry, no bundle).
    ///
    /// # Errors
    /// [`ExchangeError::UnknownRecipient`] when absent, [`ExchangeError::EntryExpired`] when
    /// past its `not_after`.
    pub fn recipient(&self, org_id: &str, now: u64) -> Result<&DirectoryEntry> {
        let entry = self
            .get(org_id)
            .ok_or_else(|| ExchangeError::UnknownRecipient {
                org_id: org_id.to_owned(),
            })?;
        live(entry, now)
    }

    /// The entry of a sender whose bundle is being opened.
    ///
    /// # Errors
    /// [`ExchangeError::UnknownSender`] when absent, [`ExchangeError::EntryExpired`] when past
    /// its `not_after`.
    pub fn sender(&self, org_id: &str, now: u64) -> Result<&DirectoryEntry> {
        let entry = self
            .get(org_id)
            .ok_or_else(|| ExchangeError::UnknownSender {
                org_id: org_id.to_owned(),
            })?;
        live(entry, now)
    }
}

/// `entry` if still valid at `now`.
fn live(entry: &DirectoryEntry, now: u64) -> Result<&DirectoryEntry> {
    if entry.is_valid_at(now) {
        Ok(entry)
    } else {
        Err(ExchangeError::EntryExpired {
            org_id: entry.org_id.clone(),
            not_after: entry.not_after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::NodeKeys;

    fn authority() -> SigningKey {
        SigningKey::generate(&mut rand::rngs::OsRng)
    }

    #[test]
    fn signed_entries_load_and_tampering_is_caught() {
        let auth = authority();
        let a = NodeKeys::generate("org-a").unwrap();
        let signed = SignedDirectoryEntry::sign(a.public("A", "https://mb.example/a", 2000), &auth);
        let text = DirectoryFile::new(vec![signed.clone()]).to_json();
        let dir = Directory::from_json(&text, &auth.verifying_key()).unwrap();
        assert_eq!(dir.len(), 1);
        assert_eq!(dir.recipient("org-a", 1000).unwrap().display_name, "A");
        assert!(matches!(
            dir.recipient("org-a", 2000),
            Err(ExchangeError::EntryExpired { .. })
        ));
        assert!(matches!(
            dir.recipient("org-b", 1000),
            Err(ExchangeError::UnknownRecipient { .. })
        ));
        assert!(matches!(
            dir.sender("org-b", 1000),
            Err(ExchangeError::UnknownSender { .. })
        ));

        let mut forged = signed.clone();
        forged.entry.mailbox_url = "https://evil.example/".into();
        let err = Directory::from_signed([&forged], &auth.verifying_key()).unwrap_err();
        assert!(
            matches!(
                err,
                ExchangeError::BadSignature {
                    what: "directory entry"
                }
            ),
            "{err}"
        );

        let err = Directory::from_signed([&signed, &signed], &auth.verifying_key()).unwrap_err();
        assert!(matches!(err, ExchangeError::Malformed { .. }), "{err}");
    }
}

//! [`NodeKeys`]: a node's organisation id with its Ed25519 signing key and X25519 encryption
//! key, and the key file `kade exchange init` writes into the data directory.
//!
//! # Key file
//! JSON, written with mode 0600 and refused on load when group or others may read it:
//! ```json
//! {
//!   "format": "kade-exchange-node-keys",
//!   "version": 1,
//!   "org_id": "00001234",
//!   "signing_key": "<base64 of the 32-byte Ed25519 secret seed>",
//!   "encryption_key": "<base64 of the 32-byte X25519 secret scalar>",
//!   "signing_public": "<base64 of the 32-byte Ed25519 public key>",
//!   "encryption_public": "<base64 of the 32-byte X25519 public key>"
//! }
//! ```
//! The two public keys are there for operators (to publish them); on load they must match the
//! secrets.

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use ed25519_dalek::{SigningKey, VerifyingKey};
use hpke::{Deserializable as _, Kem as _, Serializable as _};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize as _, Zeroizing};

use super::codec;
use super::directory::DirectoryEntry;
use super::{HpkeKem, check_org_id};
use crate::{ExchangeError, Result};

/// `format` value of a key file.
const KEY_FILE_FORMAT: &str = "kade-exchange-node-keys";
/// `version` value of a key file.
const KEY_FILE_VERSION: u32 = 1;

/// The private keys of one node. `Debug` shows the organisation and the public keys only; the
/// secrets are wiped from memory when the value is dropped.
pub struct NodeKeys {
    org_id: String,
    signing: SigningKey,
    encryption: <HpkeKem as hpke::Kem>::PrivateKey,
}

/// The key file as stored (see the module docs). The secret fields are wiped on drop.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    version: u32,
    org_id: String,
    signing_key: String,
    encryption_key: String,
    signing_public: String,
    encryption_public: String,
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        self.signing_key.zeroize();
        self.encryption_key.zeroize();
    }
}

impl NodeKeys {
    /// New random keys for `org_id` (e.g. the URA number).
    ///
    /// # Errors
    /// [`ExchangeError::Malformed`] when `org_id` is empty, longer than 64 characters or holds
    /// characters other than ASCII letters, digits, `.`, `-` and `_`.
    pub fn generate(org_id: &str) -> Result<Self> {
        check_org_id(org_id)?;
        let mut rng = rand::rngs::OsRng;
        let signing = SigningKey::generate(&mut rng);
        let (encryption, _) = HpkeKem::gen_keypair(&mut rng);
        Ok(NodeKeys {
            org_id: org_id.to_owned(),
            signing,
            encryption,
        })
    }

    /// The organisation these keys belong to.
    pub fn org_id(&self) -> &str {
        &self.org_id
    }

    /// The Ed25519 public key (published in the directory).
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The X25519 public key (published in the directory).
    pub fn encryption_public_key(&self) -> [u8; 32] {
        HpkeKem::sk_to_pk(&self.encryption).to_bytes().into()
    }

    /// The signing key, for the sealer and receipts.
    pub(crate) fn signing_key(&self) -> &SigningKey {
        &self.signing
    }

    /// The HPKE private key, for unwrapping content keys.
    pub(crate) fn encryption_key(&self) -> &<HpkeKem as hpke::Kem>::PrivateKey {
        &self.encryption
    }

    /// The directory entry that publishes these keys, to be signed by the directory authority.
    pub fn public(&self, display_name: &str, mailbox_url: &str, not_after: u64) -> DirectoryEntry {
        DirectoryEntry {
            org_id: self.org_id.clone(),
            display_name: display_name.to_owned(),
            mailbox_url: mailbox_url.to_owned(),
            signing_key: self.verifying_key().to_bytes(),
            encryption_key: self.encryption_public_key(),
            tls_cert_sha256: None,
            not_after,
        }
    }

    /// The key file text (see the module docs). Holds secrets: the returned string is wiped
    /// when dropped.
    pub fn to_file_text(&self) -> Zeroizing<String> {
        let file = KeyFile {
            format: KEY_FILE_FORMAT.to_owned(),
            version: KEY_FILE_VERSION,
            org_id: self.org_id.clone(),
            signing_key: codec::b64_encode(self.signing.as_bytes()),
            encryption_key: codec::b64_encode(&self.encryption.to_bytes()),
            signing_public: codec::b64_encode(self.verifying_key().as_bytes()),
            encryption_public: codec::b64_encode(&self.encryption_public_key()),
        };
        // A struct of strings always serialises.
        let mut text = serde_json::to_string_pretty(&file).expect("key file serialises");
        text.push('\n');
        Zeroizing::new(text)
    }

    /// Parses key file text.
    ///
    /// # Errors
    /// [`ExchangeError::Malformed`] for text that is not a key file,
    /// [`ExchangeError::UnsupportedVersion`] for another version, [`ExchangeError::BadKey`]
    /// when a key has the wrong length or a public key does not match its secret.
    pub fn from_file_text(text: &str) -> Result<Self> {
        let file: KeyFile =
            serde_json::from_str(text).map_err(|e| ExchangeError::malformed("key file", e))?;
        if file.format != KEY_FILE_FORMAT {
            return Err(ExchangeError::malformed(
                "key file",
                format!("format {:?}", file.format),
            ));
        }
        if file.version != KEY_FILE_VERSION {
            return Err(ExchangeError::UnsupportedVersion {
                what: "key file",
                version: file.version,
                supported: KEY_FILE_VERSION,
            });
        }
        check_org_id(&file.org_id)?;
        let seed = Zeroizing::new(secret_32("signing_key", &file.signing_key)?);
        let signing = SigningKey::from_bytes(&seed);
        let scalar = Zeroizing::new(secret_32("encryption_key", &file.encryption_key)?);
        let encryption = <HpkeKem as hpke::Kem>::PrivateKey::from_bytes(scalar.as_slice())
            .map_err(|e| ExchangeError::BadKey {
                what: format!("encryption_key: {e}"),
            })?;
        let keys = NodeKeys {
            org_id: file.org_id.clone(),
            signing,
            encryption,
        };
        if codec::b64_encode(keys.verifying_key().as_bytes()) != file.signing_public.trim()
            || codec::b64_encode(&keys.encryption_public_key()) != file.encryption_public.trim()
        {
            return Err(ExchangeError::BadKey {
                what: "a public key in the key file does not match its secret key".into(),
            });
        }
        Ok(keys)
    }

    /// Writes the key file at `path`, readable by the owner only (mode 0600 on unix), and
    /// syncs it to disk. Refuses to overwrite an existing file.
    ///
    /// # Errors
    /// [`ExchangeError::Io`] when the file exists or cannot be written.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |action, source| ExchangeError::Io {
            action,
            path: path.to_owned(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path).map_err(|e| io("create", e))?;
        f.write_all(self.to_file_text().as_bytes())
            .map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("write", e))
    }

    /// Reads the key file at `path`.
    ///
    /// # Errors
    /// [`ExchangeError::InsecureKeyFile`] when group or others have any permission on it
    /// (unix), [`ExchangeError::Io`] when it cannot be read, and the errors of
    /// [`from_file_text`](Self::from_file_text).
    pub fn load(path: &Path) -> Result<Self> {
        let io = |source| ExchangeError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(ExchangeError::InsecureKeyFile {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Self::from_file_text(&text)
    }
}

/// Decodes a base64 secret of 32 bytes, wiping the intermediate buffer.
fn secret_32(what: &'static str, s: &str) -> Result<[u8; 32]> {
    let v = Zeroizing::new(codec::b64_decode(what, s)?);
    v.as_slice().try_into().map_err(|_| ExchangeError::BadKey {
        what: format!("{what}: {} bytes, expected 32", v.len()),
    })
}

impl fmt::Debug for NodeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeKeys")
            .field("org_id", &self.org_id)
            .field(
                "signing_public",
                &hex::encode(self.verifying_key().as_bytes()),
            )
            .field(
                "encryption_public",
                &hex::encode(self.encryption_public_key()),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_text_round_trips() {
        let k = NodeKeys::generate("00001234").unwrap();
        let text = k.to_file_text();
        let back = NodeKeys::from_file_text(&text).unwrap();
        assert_eq!(back.org_id(), "00001234");
        assert_eq!(back.verifying_key(), k.verifying_key());
        assert_eq!(back.encryption_public_key(), k.encryption_public_key());
        assert_eq!(back.signing.to_bytes(), k.signing.to_bytes());
    }

    #[test]
    fn debug_hides_secrets() {
        let k = NodeKeys::generate("org-a").unwrap();
        let dbg = format!("{k:?}");
        let secret = codec::b64_encode(k.signing.as_bytes());
        let secret_hex = hex::encode(k.signing.as_bytes());
        assert!(!dbg.contains(&secret) && !dbg.contains(&secret_hex));
        assert!(dbg.contains("org-a"));
    }

    #[test]
    fn mismatched_public_key_is_refused() {
        let a = NodeKeys::generate("org-a").unwrap();
        let b = NodeKeys::generate("org-a").unwrap();
        let mut file: serde_json::Value = serde_json::from_str(&a.to_file_text()).unwrap();
        file["signing_public"] = codec::b64_encode(b.verifying_key().as_bytes()).into();
        let err = NodeKeys::from_file_text(&file.to_string()).unwrap_err();
        assert!(matches!(err, ExchangeError::BadKey { .. }), "{err}");
    }

    #[test]
    fn bad_org_ids_are_refused() {
        for bad in ["", "has space", "../etc", &"9".repeat(65)] {
            assert!(NodeKeys::generate(bad).is_err(), "{bad:?}");
        }
    }
}

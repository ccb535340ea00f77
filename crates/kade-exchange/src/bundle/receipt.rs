//! Delivery receipts (E13): the recipient signs the bundle id, the manifest hash and the
//! outcome per SOP instance, and seals the signed receipt to the sender, since SOP Instance
//! UIDs must not be readable by the mailbox.

use ed25519_dalek::{Signature, Signer as _};
use serde::{Deserialize, Serialize};

use super::codec::{self, Canon};
use super::directory::{Directory, DirectoryEntry};
use super::{BundleId, NodeKeys, RECEIPT_SEAL_TAG, RECEIPT_SIGNATURE_TAG, wrap};
use crate::{ExchangeError, Result};

/// What happened to one instance at the recipient.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum InstanceOutcome {
    /// Stored and indexed.
    Imported,
    /// An identical instance was already there (idempotent re-delivery).
    AlreadyPresent,
    /// Not imported.
    Rejected {
        /// Why, in plain words; never patient data.
        reason: String,
    },
}

impl InstanceOutcome {
    /// Code in the signed bytes: 0 imported, 1 already present, 2 rejected.
    fn code(&self) -> u8 {
        match self {
            InstanceOutcome::Imported => 0,
            InstanceOutcome::AlreadyPresent => 1,
            InstanceOutcome::Rejected { .. } => 2,
        }
    }
}

/// One instance's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeEntry {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// What happened.
    #[serde(flatten)]
    pub outcome: InstanceOutcome,
}

/// The recipient's account of one bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The bundle.
    pub bundle_id: BundleId,
    /// SHA-256 of the decrypted manifest JSON ([`Opener::manifest_sha256`](super::Opener::manifest_sha256)),
    /// hex in JSON; the sender compares it with [`Sealer::manifest_sha256`](super::Sealer::manifest_sha256).
    #[serde(with = "codec::hex32")]
    pub manifest_sha256: [u8; 32],
    /// The bundle's sender, to whom the receipt goes.
    pub sender: String,
    /// The bundle's recipient, who signs the receipt.
    pub recipient: String,
    /// Set when the whole bundle was refused (then `outcomes` may be empty).
    pub refused: Option<String>,
    /// Outcome per instance.
    pub outcomes: Vec<OutcomeEntry>,
    /// When the receipt was made (unix seconds).
    pub at: u64,
}

impl Receipt {
    /// The canonical bytes the recipient signs (layout in the `bundle` module docs).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let count = u32::try_from(self.outcomes.len()).unwrap_or(u32::MAX);
        let mut c = Canon::new(RECEIPT_SIGNATURE_TAG)
            .fixed(self.bundle_id.as_bytes())
            .fixed(&self.manifest_sha256)
            .str(&self.sender)
            .str(&self.recipient)
            .u64(self.at)
            .opt_str(self.refused.as_deref())
            .u32(count);
        for o in &self.outcomes {
            let reason = match &o.outcome {
                InstanceOutcome::Rejected { reason } => reason.as_str(),
                _ => "",
            };
            c = c.str(&o.sop_instance_uid).u8(o.outcome.code()).str(reason);
        }
        c.finish()
    }

    /// Signs the receipt with the recipient node's key.
    ///
    /// # Errors
    /// [`ExchangeError::BadKey`] when `keys` are not those of [`recipient`](Self::recipient).
    pub fn sign(self, keys: &NodeKeys) -> Result<SignedReceipt> {
        if keys.org_id() != self.recipient {
            return Err(ExchangeError::BadKey {
                what: format!(
                    "receipt of {} signed with the keys of {}",
                    self.recipient,
                    keys.org_id()
                ),
            });
        }
        let signature = keys.signing_key().sign(&self.signed_bytes()).to_bytes();
        Ok(SignedReceipt {
            receipt: self,
            signature,
        })
    }
}

/// A receipt with the recipient's Ed25519 signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// The receipt.
    pub receipt: Receipt,
    /// Signature over [`Receipt::signed_bytes`] (base64 in JSON).
    #[serde(with = "codec::b64_array")]
    pub signature: [u8; 64],
}

impl SignedReceipt {
    /// Verifies the signature with the signer's ([`Receipt::recipient`]) directory key, also
    /// when that entry has expired since (a receipt stays evidence). The caller then checks
    /// `bundle_id` and `manifest_sha256` against its own record of the bundle.
    ///
    /// # Errors
    /// [`ExchangeError::UnknownSender`] when the signer has no directory entry,
    /// [`ExchangeError::BadKey`] for an unusable key, [`ExchangeError::BadSignature`].
    pub fn verify(&self, directory: &Directory) -> Result<&Receipt> {
        let signer = &self.receipt.recipient;
        let entry = directory
            .get(signer)
            .ok_or_else(|| ExchangeError::UnknownSender {
                org_id: signer.clone(),
            })?;
        entry
            .verifying_key()?
            .verify_strict(
                &self.receipt.signed_bytes(),
                &Signature::from_bytes(&self.signature),
            )
            .map_err(|_| ExchangeError::BadSignature { what: "receipt" })?;
        Ok(&self.receipt)
    }

    /// Encrypts the signed receipt to the bundle's sender for transport through the mailbox
    /// (HPKE, `info` binding the bundle id and both organisations; layout in the module docs
    /// of `bundle`).
    ///
    /// # Errors
    /// [`ExchangeError::HeaderMismatch`] when `sender` is not the receipt's addressee;
    /// [`ExchangeError::BadKey`] or [`ExchangeError::Seal`] for an unusable key.
    pub fn seal_for(&self, sender: &DirectoryEntry) -> Result<Vec<u8>> {
        if sender.org_id != self.receipt.sender {
            return Err(ExchangeError::HeaderMismatch { field: "sender" });
        }
        let json = serde_json::to_vec(self).expect("receipt serialises");
        let r = &self.receipt;
        wrap::seal_to(
            &sender.encryption_key,
            &seal_info(&r.bundle_id, &r.recipient, &r.sender),
            &json,
            "receipt",
        )
    }

    /// Decrypts a receipt sealed for `keys`' organisation by `from` about `bundle_id`. The
    /// result still has to be [`verify`](Self::verify)'d.
    ///
    /// # Errors
    /// [`ExchangeError::KeyUnwrap`] when it was not sealed for us, for this bundle, by this
    /// peer, or was altered; [`ExchangeError::Malformed`] when the content is not a receipt;
    /// [`ExchangeError::HeaderMismatch`] when its fields disagree with the ones given.
    pub fn open_sealed(
        sealed: &[u8],
        keys: &NodeKeys,
        from: &str,
        bundle_id: &BundleId,
    ) -> Result<Self> {
        let info = seal_info(bundle_id, from, keys.org_id());
        let json = wrap::open_from(keys.encryption_key(), &info, sealed)
            .ok_or(ExchangeError::KeyUnwrap)?;
        let signed: SignedReceipt =
            serde_json::from_slice(&json).map_err(|e| ExchangeError::malformed("receipt", e))?;
        let r = &signed.receipt;
        if r.bundle_id != *bundle_id {
            return Err(ExchangeError::HeaderMismatch { field: "bundle_id" });
        }
        if r.recipient != from || r.sender != keys.org_id() {
            return Err(ExchangeError::HeaderMismatch { field: "sender" });
        }
        Ok(signed)
    }
}

/// HPKE `info` of a sealed receipt.
fn seal_info(bundle_id: &BundleId, signer: &str, addressee: &str) -> Vec<u8> {
    Canon::new(RECEIPT_SEAL_TAG)
        .fixed(bundle_id.as_bytes())
        .str(signer)
        .str(addressee)
        .finish()
}

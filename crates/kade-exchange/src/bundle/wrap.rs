//! HPKE (RFC 9180) single-shot encryption to a node's X25519 key, mode Base, suite
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305. Output layout:
//! `enc (32 bytes) ‖ ciphertext (plaintext length + 16)`.

use hpke::{Deserializable as _, OpModeR, OpModeS, Serializable as _};

use super::{HpkeAead, HpkeKdf, HpkeKem};
use crate::{ExchangeError, Result};

/// Length of the encapsulated key.
const ENC_LEN: usize = 32;

/// Encrypts `plaintext` to the X25519 public key `recipient`, binding `info`.
///
/// # Errors
/// [`ExchangeError::Seal`] when the key yields no shared secret (a low-order point).
pub(crate) fn seal_to(
    recipient: &[u8; 32],
    info: &[u8],
    plaintext: &[u8],
    what: &'static str,
) -> Result<Vec<u8>> {
    let pk = <HpkeKem as hpke::Kem>::PublicKey::from_bytes(recipient).map_err(|e| {
        ExchangeError::BadKey {
            what: format!("recipient encryption key: {e}"),
        }
    })?;
    let (enc, ct) = hpke::single_shot_seal::<HpkeAead, HpkeKdf, HpkeKem, _>(
        &OpModeS::Base,
        &pk,
        info,
        plaintext,
        b"",
        &mut rand::rngs::OsRng,
    )
    .map_err(|_| ExchangeError::Seal { what })?;
    Ok([enc.to_bytes().as_slice(), &ct].concat())
}

/// Decrypts what [`seal_to`] produced for our key; `None` when it was not for us, altered or
/// bound to another `info`.
pub(crate) fn open_from(
    sk: &<HpkeKem as hpke::Kem>::PrivateKey,
    info: &[u8],
    sealed: &[u8],
) -> Option<Vec<u8>> {
    if sealed.len() < ENC_LEN {
        return None;
    }
    let (enc, ct) = sealed.split_at(ENC_LEN);
    let enc = <HpkeKem as hpke::Kem>::EncappedKey::from_bytes(enc).ok()?;
    hpke::single_shot_open::<HpkeAead, HpkeKdf, HpkeKem>(&OpModeR::Base, sk, &enc, info, ct, b"")
        .ok()
}

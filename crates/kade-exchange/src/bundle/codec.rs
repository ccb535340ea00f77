//! Encodings shared by the bundle modules: serde helpers for base64 and hex fields, and the
//! canonical byte writer used for everything that is signed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serializer};
use sha2::{Digest, Sha256};

/// SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Standard base64 with padding.
pub(crate) fn b64_encode(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// Decodes standard base64; `what` names the field for the error.
pub(crate) fn b64_decode(what: &'static str, s: &str) -> crate::Result<Vec<u8>> {
    STANDARD
        .decode(s.trim())
        .map_err(|e| crate::ExchangeError::malformed(what, e))
}

/// Serde for `Vec<u8>` as standard base64.
pub(crate) mod b64 {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Serde for `[u8; N]` as standard base64.
pub(crate) mod b64_array {
    use super::*;

    pub(crate) fn serialize<S: Serializer, const N: usize>(
        v: &[u8; N],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = String::deserialize(d)?;
        let v = STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)?;
        let len = v.len();
        v.try_into()
            .map_err(|_| serde::de::Error::custom(format!("{len} bytes, expected {N}")))
    }
}

/// Serde for `[u8; 32]` as lowercase hex (SHA-256 digests).
pub(crate) mod hex32 {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// Builds the canonical bytes that a signature covers: a domain tag, then fields in a fixed
/// order. Integers are big-endian; strings are a `u32` big-endian byte length followed by
/// UTF-8; optional strings are a `u8` (0 absent, 1 present) followed by the string when
/// present; fixed-size byte arrays are written as they are.
#[derive(Debug)]
pub(crate) struct Canon(Vec<u8>);

impl Canon {
    /// Starts with `tag` followed by a zero byte (domain separation: a signature over one kind
    /// of structure can never be taken for another).
    pub(crate) fn new(tag: &str) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(tag.as_bytes());
        v.push(0);
        Canon(v)
    }

    pub(crate) fn u8(mut self, x: u8) -> Self {
        self.0.push(x);
        self
    }

    pub(crate) fn u32(mut self, x: u32) -> Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }

    pub(crate) fn u64(mut self, x: u64) -> Self {
        self.0.extend_from_slice(&x.to_be_bytes());
        self
    }

    pub(crate) fn fixed(mut self, bytes: &[u8]) -> Self {
        self.0.extend_from_slice(bytes);
        self
    }

    pub(crate) fn str(self, s: &str) -> Self {
        // Every string here is bounded far below 4 GiB by validation; saturate regardless.
        let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
        self.u32(len).fixed(s.as_bytes())
    }

    pub(crate) fn opt_str(self, s: Option<&str>) -> Self {
        match s {
            None => self.u8(0),
            Some(s) => self.u8(1).str(s),
        }
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canon_is_length_prefixed_and_tagged() {
        let a = Canon::new("t").str("ab").str("c").finish();
        let b = Canon::new("t").str("a").str("bc").finish();
        assert_ne!(a, b, "field boundaries must be unambiguous");
        assert_eq!(a, [b't', 0, 0, 0, 0, 2, b'a', b'b', 0, 0, 0, 1, b'c']);
        assert_ne!(Canon::new("x").finish(), Canon::new("y").finish());
        assert_eq!(Canon::new("t").opt_str(None).finish(), [b't', 0, 0]);
    }
}

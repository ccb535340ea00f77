//! Object keys. Every key is built from validated [`Uid`]s and a hex digest, so no key can
//! contain anything but `[0-9a-f./]` in a fixed shape: network input never becomes a path.

use kade_core::Uid;

/// The key of a blob in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BlobKey(String);

impl BlobKey {
    /// The key of a stored instance:
    /// `dicom/{study}/{series}/{sop}.{first 16 hex digits of the blob's SHA-256}.dcm`.
    ///
    /// The digest suffix keeps two different objects that claim the same SOP Instance UID
    /// from ever overwriting each other's blob; the index decides which one is current.
    ///
    /// # Panics
    /// If `sha256_hex` is shorter than 16 characters or not lowercase hex (a programming error).
    pub fn instance(study: &Uid, series: &Uid, sop: &Uid, sha256_hex: &str) -> Self {
        let digest = &sha256_hex[..16];
        assert!(
            digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        );
        BlobKey(format!("dicom/{study}/{series}/{sop}.{digest}.dcm"))
    }

    /// The key of one ciphertext chunk of an exchange bundle held by the mailbox:
    /// `exchange/{bundle_id}/{index, 8 digits}.chunk`.
    ///
    /// # Panics
    /// If `bundle_id` is not 32 lowercase hex digits (a programming error: callers parse it).
    pub fn exchange_chunk(bundle_id: &str, index: u32) -> Self {
        assert!(
            bundle_id.len() == 32
                && bundle_id
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        );
        BlobKey(format!("exchange/{bundle_id}/{index:08}.chunk"))
    }

    /// The SOP Instance UID and digest prefix named by an instance key (the inverse of
    /// [`BlobKey::instance`]); `None` for any string that is not one.
    pub fn instance_parts(key: &str) -> Option<(&str, &str)> {
        let rest = key.strip_prefix("dicom/")?.strip_suffix(".dcm")?;
        let mut parts = rest.split('/');
        let (study, series, file) = (parts.next()?, parts.next()?, parts.next()?);
        let (sop, digest) = file.rsplit_once('.')?;
        let well_formed = parts.next().is_none()
            && [study, series, sop]
                .into_iter()
                .all(|u| Uid::new(u).is_ok())
            && digest.len() == 16
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        well_formed.then_some((sop, digest))
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_key_shape() {
        let u = |s: &str| Uid::new(s).unwrap();
        let k = BlobKey::instance(&u("1.2"), &u("1.2.3"), &u("1.2.3.4"), &"ab".repeat(32));
        assert_eq!(k.as_str(), "dicom/1.2/1.2.3/1.2.3.4.abababababababab.dcm");
        assert_eq!(
            BlobKey::instance_parts(k.as_str()),
            Some(("1.2.3.4", "abababababababab"))
        );
        for bad in [
            "dicom/1.2/1.2.3/1.2.3.4.abababababababab",
            "dicom/1.2/1.2.3/x/1.2.3.4.abababababababab.dcm",
            "dicom/1.2/1.2.3/1.2.3.4.ababababababab.dcm",
            "dicom/1.2/1.2.3/1.2.3.4.ABABABABABABABAB.dcm",
            "dicom/1.2/../1.2.3.4.abababababababab.dcm",
            "exchange/00/00000001.chunk",
        ] {
            assert_eq!(BlobKey::instance_parts(bad), None, "{bad}");
        }
    }
}

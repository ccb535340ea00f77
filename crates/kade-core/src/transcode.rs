//! Re-encoding an instance between the native (uncompressed) transfer syntaxes, for peers that
//! did not accept the stored one: WADO-RS asking for Explicit VR Little Endian, a C-MOVE or
//! C-GET destination that only takes Implicit VR Little Endian.
//!
//! Only the encoding changes: the data set's elements, values and pixel bytes are the same
//! (Big Endian values are read as numbers and written little-endian). Compressed pixel data
//! needs a codec and is refused with [`TranscodeError::Compressed`].

use dicom_encoding::TransferSyntaxIndex;
use dicom_object::{OpenFileOptions, file::ReadPreamble};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// Implicit VR Little Endian.
pub const IMPLICIT_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
/// Explicit VR Big Endian (retired, still found in archives).
pub const EXPLICIT_BE: &str = "1.2.840.10008.1.2.2";
/// Deflated Explicit VR Little Endian.
pub const DEFLATED_LE: &str = "1.2.840.10008.1.2.1.99";

/// Why an instance could not be re-encoded.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The stored pixel data is compressed.
    #[error("the instance is stored compressed ({0}); decompression is not supported yet")]
    Compressed(String),
    /// The target is not a native transfer syntax Kade writes.
    #[error("Kade re-encodes only to Implicit or Explicit VR Little Endian, not {0}")]
    UnsupportedTarget(String),
    /// The stored object could not be read or written.
    #[error("cannot re-encode the instance: {0}")]
    Failed(String),
}

/// Whether `ts` stores pixel data uncompressed.
pub fn is_native(ts: &str) -> bool {
    matches!(
        ts.trim_end_matches('\0'),
        IMPLICIT_LE | EXPLICIT_LE | EXPLICIT_BE | DEFLATED_LE
    )
}

/// The Part 10 object `part10` re-encoded in `target` (Implicit or Explicit VR Little
/// Endian), with a zeroed preamble and its File Meta group's transfer syntax updated.
///
/// # Errors
/// See [`TranscodeError`].
pub fn to_native(part10: &[u8], target: &str) -> Result<Vec<u8>, TranscodeError> {
    if !matches!(target, IMPLICIT_LE | EXPLICIT_LE) {
        return Err(TranscodeError::UnsupportedTarget(target.to_owned()));
    }
    let mut obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Always)
        .from_reader(part10)
        .map_err(|e| TranscodeError::Failed(e.to_string()))?;
    let source = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    if !is_native(&source) {
        return Err(TranscodeError::Compressed(source));
    }
    let ts = TransferSyntaxRegistry
        .get(target)
        .ok_or_else(|| TranscodeError::UnsupportedTarget(target.to_owned()))?;
    obj.meta_mut().set_transfer_syntax(ts);
    let mut out = Vec::with_capacity(part10.len() + 64);
    obj.write_all(&mut out)
        .map_err(|e| TranscodeError::Failed(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_dictionary_std::tags;

    fn testdata(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../testdata/pydicom")
            .join(name);
        std::fs::read(p).unwrap()
    }

    fn open(b: &[u8]) -> dicom_object::DefaultDicomObject {
        OpenFileOptions::new()
            .read_preamble(ReadPreamble::Always)
            .from_reader(b)
            .unwrap()
    }

    #[test]
    fn big_endian_and_explicit_become_little_endian_with_the_same_pixels() {
        for (name, target) in [
            ("MR_small_bigendian.dcm", EXPLICIT_LE),
            ("MR_small.dcm", IMPLICIT_LE),
            ("MR_small_implicit.dcm", EXPLICIT_LE),
        ] {
            let src = testdata(name);
            let out = to_native(&src, target).unwrap();
            let (a, b) = (open(&src), open(&out));
            assert_eq!(b.meta().transfer_syntax().trim_end_matches('\0'), target);
            assert_eq!(
                a.element(tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap(),
                b.element(tags::SOP_INSTANCE_UID).unwrap().to_str().unwrap()
            );
            let px = |o: &dicom_object::DefaultDicomObject| {
                o.element(tags::PIXEL_DATA)
                    .unwrap()
                    .to_multi_int::<u16>()
                    .unwrap()
            };
            assert_eq!(px(&a), px(&b), "{name}: pixel values changed");
            assert_eq!(&out[..128], &[0u8; 128][..]);
        }
    }

    #[test]
    fn compressed_and_unknown_targets_are_refused() {
        let jpeg = testdata("JPEG2000.dcm");
        assert!(matches!(
            to_native(&jpeg, EXPLICIT_LE),
            Err(TranscodeError::Compressed(_))
        ));
        assert!(matches!(
            to_native(&testdata("MR_small.dcm"), "1.2.840.10008.1.2.4.50"),
            Err(TranscodeError::UnsupportedTarget(_))
        ));
    }
}

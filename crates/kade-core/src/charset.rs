//! Text decoding for elements whose VR arrived as UN (PS3.5 §6.2.2), using the dataset's
//! Specific Character Set (0008,0005).

use dicom_encoding::text::{SpecificCharacterSet, TextCodec};

/// Decodes raw element bytes as text in the character set named by `specific_character_set`
/// (the first value of (0008,0005); empty or unknown means the default repertoire, read as
/// Latin-1 so that no byte is lost).
pub fn decode_text(bytes: &[u8], specific_character_set: Option<&str>) -> String {
    let code = specific_character_set
        .and_then(|s| s.split('\\').find(|v| !v.trim().is_empty()))
        .map(str::trim)
        .unwrap_or("");
    if let Some(cs) = SpecificCharacterSet::from_code(code)
        && let Ok(s) = cs.decode(bytes)
    {
        return s;
    }
    bytes.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_latin1_and_utf8() {
        assert_eq!(decode_text(b"M\xfcller", Some("ISO_IR 100")), "Müller");
        assert_eq!(
            decode_text("Müller".as_bytes(), Some("ISO_IR 192")),
            "Müller"
        );
        assert_eq!(decode_text(b"Smith", None), "Smith");
    }
}

//! A structural pre-check of a data set before any DICOM library reads it: every element
//! length must fit inside the bytes that were received, sequences and items must nest and
//! end properly. It reads tags and lengths only and seeks over values, so a hostile or
//! damaged length (say 4 GB in a 30 kB file) is refused before anything is allocated for it.
//!
//! Encodings (PS3.5 §7.1): explicit VR little or big endian, implicit VR little endian.
//! Undefined-length UN elements (CP-246) are refused for now: the parser behind the index
//! misreads them (dicom-rs #169) and would allocate gigabytes for a kilobyte file.

use std::io::{BufReader, Read, Seek, SeekFrom};

const UNDEFINED: u32 = 0xFFFF_FFFF;
const MAX_DEPTH: usize = 64;

/// How the elements at one nesting level are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Explicit VR, little endian.
    ExplicitLe,
    /// Explicit VR, big endian.
    ExplicitBe,
    /// Implicit VR, little endian.
    ImplicitLe,
}

impl Encoding {
    /// The encoding of a transfer syntax's data set, or `None` when it cannot be scanned
    /// (deflated data sets are compressed as a whole).
    pub fn of_transfer_syntax(ts: &str) -> Option<Self> {
        match ts {
            "1.2.840.10008.1.2" => Some(Encoding::ImplicitLe),
            "1.2.840.10008.1.2.2" => Some(Encoding::ExplicitBe),
            "1.2.840.10008.1.2.1.99" | "1.2.840.10008.1.2.4.95" => None,
            _ => Some(Encoding::ExplicitLe),
        }
    }
}

struct Scanner<R> {
    r: BufReader<R>,
    pos: u64,
    len: u64,
    pixel_data: Option<PixelData>,
}

/// The top-level Pixel Data element, as the scan saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelData {
    /// Its VR (`OB` or `OW`), when the encoding is explicit.
    pub vr: Option<[u8; 2]>,
    /// Where its tag starts, from the start of the file; every element after it belongs to
    /// the top level too.
    pub offset: u64,
}

/// Checks the data set from byte `start` to the end of `file` (`len` bytes in all) and
/// reports the top-level Pixel Data element, if there is one.
///
/// # Errors
/// A sentence saying which element is wrong and how.
pub fn check<R: Read + Seek>(
    file: R,
    start: u64,
    len: u64,
    enc: Encoding,
) -> Result<Option<PixelData>, String> {
    let mut r = BufReader::with_capacity(16 * 1024, file);
    r.seek(SeekFrom::Start(start)).map_err(|e| e.to_string())?;
    let mut s = Scanner {
        r,
        pos: start,
        len,
        pixel_data: None,
    };
    s.level(None, enc, 0, false)?;
    Ok(s.pixel_data)
}

impl<R: Read + Seek> Scanner<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(|_| {
            format!(
                "data set ends inside an element header at byte {}",
                self.pos
            )
        })?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u16(&mut self, enc: Encoding) -> Result<u16, String> {
        let b = self.bytes::<2>()?;
        Ok(if enc == Encoding::ExplicitBe {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&mut self, enc: Encoding) -> Result<u32, String> {
        let b = self.bytes::<4>()?;
        Ok(if enc == Encoding::ExplicitBe {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn skip(&mut self, n: u64) -> Result<(), String> {
        self.r.seek_relative(n as i64).map_err(|e| e.to_string())?;
        self.pos += n;
        Ok(())
    }

    /// Scans elements until `end` (defined length), a delimiter (undefined length) or, at the
    /// top level, the end of the data. `fragments`: the items at this level are encapsulated
    /// pixel data fragments (raw bytes), not data sets.
    fn level(
        &mut self,
        end: Option<u64>,
        enc: Encoding,
        depth: usize,
        fragments: bool,
    ) -> Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("sequences nested deeper than {MAX_DEPTH} levels"));
        }
        loop {
            match end {
                Some(e) if self.pos == e => return Ok(()),
                Some(e) if self.pos > e => {
                    return Err(format!(
                        "an element runs past the end of its item at byte {e}"
                    ));
                }
                None if depth == 0 && self.pos == self.len => return Ok(()),
                _ => {}
            }
            let at = self.pos;
            let group = self.u16(enc)?;
            let elem = self.u16(enc)?;
            let tag = format!("({group:04X},{elem:04X})");
            if group == 0xFFFE {
                let l = self.u32(enc)?;
                match elem {
                    0xE000 if l == UNDEFINED && !fragments => {
                        self.level(None, enc, depth + 1, false)?
                    }
                    0xE000 if fragments => {
                        self.fits(&tag, l)?;
                        self.skip(u64::from(l))?;
                    }
                    0xE000 => {
                        let e = self.fits(&tag, l)?;
                        self.level(Some(e), enc, depth + 1, false)?;
                    }
                    0xE00D | 0xE0DD if depth > 0 && end.is_none() => return Ok(()),
                    _ => {
                        return Err(format!(
                            "unexpected delimiter {tag} at byte {}",
                            self.pos - 8
                        ));
                    }
                }
                continue;
            }
            let (vr, l) = match enc {
                Encoding::ImplicitLe => (None, self.u32(enc)?),
                _ => {
                    let vr = self.bytes::<2>()?;
                    let long = matches!(
                        &vr,
                        b"OB"
                            | b"OD"
                            | b"OF"
                            | b"OL"
                            | b"OV"
                            | b"OW"
                            | b"SQ"
                            | b"SV"
                            | b"UC"
                            | b"UN"
                            | b"UR"
                            | b"UT"
                            | b"UV"
                    );
                    let l = if long {
                        self.skip(2)?;
                        self.u32(enc)?
                    } else {
                        u32::from(self.u16(enc)?)
                    };
                    (Some(vr), l)
                }
            };
            if depth == 0 && group == 0x7FE0 && elem == 0x0010 {
                self.pixel_data = Some(PixelData { vr, offset: at });
            }
            if l == UNDEFINED {
                // A sequence, encapsulated pixel data, or a CP-246 UN sequence (implicit VR inside).
                if vr.as_ref() == Some(b"UN") {
                    // Well-formed per CP-246, but the DICOM library Kade parses with misreads it
                    // (dicom-rs #169) and would try to allocate gigabytes: refuse it clearly.
                    return Err(format!(
                        "element {tag} is an undefined-length UN sequence (CP-246), which this version of Kade cannot index"
                    ));
                }
                let inner = enc;
                let fragments = matches!(vr.as_ref(), Some(b"OB" | b"OW"));
                self.level(None, inner, depth + 1, fragments)?;
                continue;
            }
            let e = self.fits(&tag, l)?;
            if is_sequence(vr, group, elem) {
                self.level(Some(e), enc, depth + 1, false)?;
            } else {
                self.skip(u64::from(l))?;
            }
        }
    }

    /// Checks that `l` bytes remain; returns where they end.
    fn fits(&self, tag: &str, l: u32) -> Result<u64, String> {
        let remaining = self.len - self.pos;
        if u64::from(l) > remaining {
            return Err(format!(
                "element {tag} claims {l} bytes but only {remaining} remain"
            ));
        }
        Ok(self.pos + u64::from(l))
    }
}

/// Whether a defined-length element is a sequence whose items must be scanned too: its VR
/// says so or, in implicit VR, the data dictionary does. The parser behind the index reads an
/// implicit VR element the dictionary calls SQ as a sequence, and allocates every length it
/// finds inside it before reading the value: left unscanned, one item element claiming 4 GB
/// in a 100-byte data set had it zero-fill gigabytes for a minute before it failed.
fn is_sequence(vr: Option<[u8; 2]>, group: u16, elem: u16) -> bool {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    match vr {
        Some(vr) => &vr == b"SQ",
        None => dicom_dictionary_std::StandardDataDictionary
            .by_tag(dicom_core::Tag(group, elem))
            .is_some_and(|e| e.vr().relaxed() == dicom_core::VR::SQ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(v);
    }

    fn run(b: &[u8], enc: Encoding) -> Result<(), String> {
        check(Cursor::new(b), 0, b.len() as u64, enc).map(|_| ())
    }

    #[test]
    fn accepts_well_formed_and_refuses_overlong_lengths() {
        let mut d = Vec::new();
        el(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3\0");
        el(&mut d, 0x0010, 0x0010, b"PN", b"Doe^J ");
        assert_eq!(run(&d, Encoding::ExplicitLe), Ok(()));
        // Pixel data claiming 4 GB.
        let mut bad = d.clone();
        bad.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 0xFE, 0xFF, 0xFF, 0xDF,
        ]);
        // (an encapsulated pixel data element with one fragment is fine)
        let mut enc = d.clone();
        enc.extend_from_slice(&[
            0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        enc.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 4, 0, 0, 0, 0xFE, 0xFF, 0xDD, 0xE0]);
        enc.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        let px = check(Cursor::new(&enc), 0, enc.len() as u64, Encoding::ExplicitLe).unwrap();
        assert_eq!(
            px,
            Some(PixelData {
                vr: Some(*b"OB"),
                offset: d.len() as u64
            })
        );
        bad.extend_from_slice(&[0u8; 16]);
        let err = run(&bad, Encoding::ExplicitLe).unwrap_err();
        assert!(
            err.contains("(7FE0,0010) claims 3758096382 bytes but only 16 remain"),
            "{err}"
        );
        // Cut inside a header.
        assert!(run(&d[..d.len() - 9], Encoding::ExplicitLe).is_err());
    }

    #[test]
    fn walks_undefined_length_sequences_and_cp246() {
        let mut d = Vec::new();
        // (0008,1115) SQ undefined length, one undefined-length item with one element.
        d.extend_from_slice(&[
            0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        el(&mut d, 0x0008, 0x1150, b"UI", b"1.2\0");
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        assert_eq!(run(&d, Encoding::ExplicitLe), Ok(()));
        // The same sequence as UN with undefined length (CP-246) is refused with a reason.
        let mut u = Vec::new();
        u.extend_from_slice(&[
            0x08, 0x00, 0x15, 0x11, b'U', b'N', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
        ]);
        u.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        u.extend_from_slice(&[0x08, 0x00, 0x50, 0x11, 4, 0, 0, 0]);
        u.extend_from_slice(b"1.2\0");
        u.extend_from_slice(&[
            0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0, 0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0,
        ]);
        assert!(
            run(&u, Encoding::ExplicitLe)
                .unwrap_err()
                .contains("CP-246")
        );
        // Missing sequence delimiter.
        assert!(run(&d[..d.len() - 8], Encoding::ExplicitLe).is_err());
    }

    #[test]
    fn implicit_vr_sequences_are_scanned_by_the_dictionary() {
        let implicit = |g: u16, e: u16, v: &[u8]| {
            let mut out = Vec::new();
            out.extend_from_slice(&g.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
            out
        };
        // (0008,1115) Referenced Series Sequence, defined length, one defined-length item.
        let sequence = |inner: &[u8]| {
            let mut item = vec![0xFE, 0xFF, 0x00, 0xE0];
            item.extend_from_slice(&(inner.len() as u32).to_le_bytes());
            item.extend_from_slice(inner);
            let mut d = implicit(0x0008, 0x0018, b"1.2\0");
            d.extend(implicit(0x0008, 0x1115, &item));
            d
        };
        let good = sequence(&implicit(0x0020, 0x000E, b"1.2.3\0"));
        assert_eq!(run(&good, Encoding::ImplicitLe), Ok(()));
        // An element inside the item claiming 4 GB: the parser would allocate it.
        let mut huge = vec![0x10, 0x00, 0x10, 0x00];
        huge.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        let err = run(&sequence(&huge), Encoding::ImplicitLe).unwrap_err();
        assert!(err.contains("(0010,0010) claims 4294967280 bytes"), "{err}");
        // A private element of the same shape is a value, not a sequence.
        let mut private = implicit(0x0008, 0x0018, b"1.2\0");
        private.extend(implicit(
            0x0009,
            0x1010,
            &[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0xF0],
        ));
        assert_eq!(run(&private, Encoding::ImplicitLe), Ok(()));
    }
}

//! Parsing and validating a spooled Part 10 file.

use std::io::{Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, file::ReadPreamble};
use kade_core::{InstanceAttributes, json};

use crate::scan;

use crate::IngestError;

/// Deflated data sets inflating to more than this are refused: deflate inflates up to about
/// a thousand times, and no modality sends a data set this large deflated.
pub const MAX_INFLATED: u64 = 4 << 30;

/// Checks the data set's structure (see [`crate::scan`]) before a DICOM library reads it, and
/// returns its top-level Pixel Data element, if any. A deflated data set is checked as the
/// stream it inflates to.
fn prescan<R: Read + Seek>(mut f: R, size: u64) -> Result<Option<scan::PixelData>, IngestError> {
    let invalid = IngestError::Invalid;
    let mut head = vec![0u8; kade_core::part10::HEAD];
    f.read_exact(&mut head)
        .map_err(|_| invalid("shorter than a DICOM header".into()))?;
    let meta_end = kade_core::part10::data_set_start(&head)
        .ok_or_else(|| invalid("no File Meta group with group length".into()))?;
    let group_len = meta_end - kade_core::part10::HEAD as u64;
    if group_len > 64 * 1024 || meta_end > size {
        return Err(invalid(format!(
            "File Meta group length {group_len} is impossible"
        )));
    }
    head.resize(meta_end as usize, 0);
    f.read_exact(&mut head[144..])
        .map_err(|e| invalid(e.to_string()))?;
    let meta = dicom_object::meta::FileMetaTable::from_reader(&head[128..])
        .map_err(|e| invalid(format!("File Meta group: {e}")))?;
    let ts = meta.transfer_syntax().trim_end_matches('\0');
    match scan::Encoding::of_transfer_syntax(ts) {
        Some(enc) => scan::check(f, meta_end, size, enc),
        None => scan_deflated(&mut f, meta_end, ts),
    }
    .map_err(invalid)
}

/// Scans the deflated data set after `meta_end`: inflated once to learn its length, then
/// again through the scan. Without this, the parser would read a deflated data set unchecked
/// and allocate whatever length an element claims (4 GB from a 100-byte stream).
fn scan_deflated<R: Read + Seek>(
    f: &mut R,
    meta_end: u64,
    ts: &str,
) -> Result<Option<scan::PixelData>, String> {
    let len = std::io::copy(
        &mut inflated(f, meta_end, ts)?.take(MAX_INFLATED + 1),
        &mut std::io::sink(),
    )
    .map_err(|e| format!("deflated data set: {e}"))?;
    if len > MAX_INFLATED {
        return Err(format!(
            "deflated data set inflates to more than {MAX_INFLATED} bytes"
        ));
    }
    let stream = Forward {
        inner: inflated(f, meta_end, ts)?,
        pos: 0,
    };
    scan::check(stream, 0, len, scan::Encoding::ExplicitLe)
}

/// The data set after `meta_end`, inflated as transfer syntax `ts` says.
fn inflated<'r, R: Read + Seek>(
    f: &'r mut R,
    meta_end: u64,
    ts: &str,
) -> Result<Box<dyn Read + 'r>, String> {
    use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
    f.seek(SeekFrom::Start(meta_end))
        .map_err(|e| e.to_string())?;
    match dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts)
        .map(|t| t.codec())
    {
        Some(Codec::Dataset(Some(adapter))) => Ok(adapter.adapt_reader(Box::new(f))),
        _ => Err(format!("data sets in transfer syntax {ts} cannot be read")),
    }
}

/// A stream that seeks only forward, by reading and dropping bytes: what the scan needs to
/// skip over values in an inflating stream.
struct Forward<R> {
    inner: R,
    pos: u64,
}

impl<R: Read> Read for Forward<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<R: Read> Seek for Forward<R> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(_) => None,
        }
        .filter(|t| *t >= self.pos)
        .ok_or_else(|| std::io::Error::other("an inflating stream seeks only forward"))?;
        let skipped = std::io::copy(
            &mut (&mut self.inner).take(target - self.pos),
            &mut std::io::sink(),
        )?;
        self.pos += skipped;
        Ok(self.pos)
    }
}

/// What ingest needs from a parsed instance.
#[derive(Debug)]
pub struct Parsed {
    /// The indexed attributes.
    pub attrs: InstanceAttributes,
    /// Transfer syntax from the File Meta group.
    pub transfer_syntax: String,
    /// DICOM JSON without bulk data.
    pub metadata_json: String,
}

/// Parses a Part 10 object held in memory.
///
/// # Errors
/// [`IngestError::Invalid`] when it is not well-formed DICOM or lacks a required UID.
pub fn parse_bytes(bytes: &[u8]) -> Result<Parsed, IngestError> {
    let pixel_data = prescan(Cursor::new(bytes), bytes.len() as u64)?;
    let opts = options().read_preamble(ReadPreamble::Always);
    finish_parse(opts.from_reader(bytes).map_err(invalid)?, pixel_data)
}

/// Parses the file at `path` (of `size` bytes).
///
/// # Errors
/// [`IngestError::Invalid`] when the file is not well-formed DICOM or lacks a required UID.
pub fn parse(path: &Path, size: u64) -> Result<Parsed, IngestError> {
    let pixel_data = prescan(std::fs::File::open(path).map_err(invalid)?, size)?;
    finish_parse(options().open_file(path).map_err(invalid)?, pixel_data)
}

fn invalid(e: impl std::fmt::Display) -> IngestError {
    IngestError::Invalid(e.to_string())
}

/// Data sets are read up to Pixel Data only: the scan proved their structure.
fn options() -> OpenFileOptions {
    OpenFileOptions::new().read_until(tags::PIXEL_DATA)
}

fn finish_parse(
    mut file: DefaultDicomObject,
    pixel_data: Option<scan::PixelData>,
) -> Result<Parsed, IngestError> {
    let guess = |file: &DefaultDicomObject| {
        let bits = file
            .get(tags::BITS_ALLOCATED)
            .and_then(|e| e.to_int::<u16>().ok());
        if bits.unwrap_or(8) > 8 { "OW" } else { "OB" }.to_owned()
    };
    // The Pixel Data VR: as parsed, as the scan saw it, or by PS3.5 §8.2 rules.
    let pixel_vr = match (file.take(tags::PIXEL_DATA), pixel_data) {
        (Some(e), _) => Some(e.vr().to_string().to_owned()),
        (None, Some(px)) => Some(
            px.vr
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| guess(&file)),
        ),
        (None, None) => None,
    };
    file.remove_element(tags::FLOAT_PIXEL_DATA);
    file.remove_element(tags::DOUBLE_FLOAT_PIXEL_DATA);
    let transfer_syntax = file
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    let mut obj = file.into_inner();
    // Text in ISO 2022 code extensions (Japanese, Korean, Chinese), which dicom-rs leaves
    // undecoded, is decoded here, so that the index and the DICOM JSON hold UTF-8.
    kade_core::charset::decode_code_extensions(&mut obj);
    let attrs = InstanceAttributes::from_dataset(&obj).map_err(invalid)?;
    let metadata_json = json::metadata_json(&obj, pixel_vr.as_deref()).map_err(invalid)?;
    Ok(Parsed {
        attrs,
        transfer_syntax,
        metadata_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    fn explicit(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
        out.extend_from_slice(&g.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
        out.extend_from_slice(vr);
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
        out.extend_from_slice(v);
    }

    /// A Part 10 object in Deflated Explicit VR Little Endian holding `dataset`.
    fn deflated(dataset: &[u8]) -> Vec<u8> {
        use dicom_encoding::transfer_syntax::{Codec, TransferSyntaxIndex};
        use std::io::Write;
        let meta = dicom_object::meta::FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(CT)
            .media_storage_sop_instance_uid("1.2.3.4")
            .transfer_syntax(DEFLATED)
            .implementation_class_uid("1.2.3")
            .build()
            .unwrap();
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        meta.write(&mut out).unwrap();
        let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
            .get(DEFLATED)
            .unwrap();
        let Codec::Dataset(Some(adapter)) = ts.codec() else {
            panic!("no deflate adapter");
        };
        let mut w = adapter.adapt_writer(Box::new(&mut out));
        w.write_all(dataset).unwrap();
        drop(w);
        out
    }

    fn head() -> Vec<u8> {
        let mut d = Vec::new();
        explicit(
            &mut d,
            0x0008,
            0x0016,
            b"UI",
            b"1.2.840.10008.5.1.4.1.1.2\0",
        );
        explicit(&mut d, 0x0008, 0x0018, b"UI", b"1.2.3.4\0");
        explicit(&mut d, 0x0010, 0x0020, b"LO", b"P1");
        explicit(&mut d, 0x0020, 0x000D, b"UI", b"1.2.3.5\0");
        explicit(&mut d, 0x0020, 0x000E, b"UI", b"1.2.3.6\0");
        d
    }

    #[test]
    fn deflated_data_sets_are_scanned_before_they_are_parsed() {
        let good = parse_bytes(&deflated(&head())).unwrap();
        assert_eq!(good.attrs.sop_instance_uid.as_str(), "1.2.3.4");

        // A value claiming 4 GB at the end of a 100-byte stream: refused at once, where the
        // parser would have allocated the 4 GB first.
        let mut overrun = head();
        overrun.extend_from_slice(&[0x09, 0x00, 0x10, 0x10, b'O', b'B', 0, 0]);
        overrun.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        overrun.extend_from_slice(b"abcd");
        let t = std::time::Instant::now();
        let err = parse_bytes(&deflated(&overrun)).unwrap_err().to_string();
        assert!(err.contains("(0009,1010) claims 4294967280 bytes"), "{err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));

        // Bytes that are no deflate stream at all.
        let mut garbage = deflated(&head());
        let start = kade_core::part10::data_set_start(&garbage).unwrap() as usize;
        garbage.truncate(start);
        garbage.extend((0..1000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        assert!(parse_bytes(&garbage).is_err());
    }
}

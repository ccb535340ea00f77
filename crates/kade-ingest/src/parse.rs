//! Parsing and validating a spooled Part 10 file.

use std::io::{Cursor, Read, Seek};
use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, file::ReadPreamble};
use kade_core::{InstanceAttributes, json};

use crate::scan;

use crate::IngestError;

/// Deflated data sets (which the structural scan cannot read) up to this size are parsed
/// completely, which proves they are complete; larger ones are parsed up to Pixel Data.
pub const FULL_PARSE_LIMIT: u64 = 32 * 1024 * 1024;

/// What the structural scan found.
enum Scanned {
    /// The structure is sound; the top-level Pixel Data element, if any.
    Checked(Option<scan::PixelData>),
    /// The data set is deflated and could not be scanned.
    Deflated,
}

/// Checks the data set's structure (see [`crate::scan`]) before a DICOM library reads it.
fn prescan<R: Read + Seek>(mut f: R, size: u64) -> Result<Scanned, IngestError> {
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
    match scan::Encoding::of_transfer_syntax(meta.transfer_syntax().trim_end_matches('\0')) {
        Some(enc) => scan::check(f, meta_end, size, enc)
            .map(Scanned::Checked)
            .map_err(invalid),
        None => Ok(Scanned::Deflated),
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
    let scanned = prescan(Cursor::new(bytes), bytes.len() as u64)?;
    let opts = options(&scanned, bytes.len() as u64).read_preamble(ReadPreamble::Always);
    finish_parse(opts.from_reader(bytes).map_err(invalid)?, &scanned)
}

/// Parses the file at `path` (of `size` bytes).
///
/// # Errors
/// [`IngestError::Invalid`] when the file is not well-formed DICOM or lacks a required UID.
pub fn parse(path: &Path, size: u64) -> Result<Parsed, IngestError> {
    let scanned = prescan(std::fs::File::open(path).map_err(invalid)?, size)?;
    finish_parse(
        options(&scanned, size).open_file(path).map_err(invalid)?,
        &scanned,
    )
}

fn invalid(e: impl std::fmt::Display) -> IngestError {
    IngestError::Invalid(e.to_string())
}

/// Scanned data sets are read up to Pixel Data only (their structure is proven); small
/// deflated ones completely, which proves they are complete.
fn options(scanned: &Scanned, size: u64) -> OpenFileOptions {
    match scanned {
        Scanned::Deflated if size <= FULL_PARSE_LIMIT => OpenFileOptions::new(),
        _ => OpenFileOptions::new().read_until(tags::PIXEL_DATA),
    }
}

fn finish_parse(mut file: DefaultDicomObject, scanned: &Scanned) -> Result<Parsed, IngestError> {
    let guess = |file: &DefaultDicomObject| {
        let bits = file
            .get(tags::BITS_ALLOCATED)
            .and_then(|e| e.to_int::<u16>().ok());
        if bits.unwrap_or(8) > 8 { "OW" } else { "OB" }.to_owned()
    };
    // The Pixel Data VR: as parsed, as the scan saw it, or by PS3.5 §8.2 rules.
    let pixel_vr = match (file.take(tags::PIXEL_DATA), scanned) {
        (Some(e), _) => Some(e.vr().to_string().to_owned()),
        (None, Scanned::Checked(Some(px))) => Some(
            px.vr
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_else(|| guess(&file)),
        ),
        (None, Scanned::Checked(None)) => None,
        (None, Scanned::Deflated) => file.get(tags::ROWS).map(|_| guess(&file)),
    };
    file.remove_element(tags::FLOAT_PIXEL_DATA);
    file.remove_element(tags::DOUBLE_FLOAT_PIXEL_DATA);
    let transfer_syntax = file
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    let obj = file.into_inner();
    let attrs = InstanceAttributes::from_dataset(&obj).map_err(invalid)?;
    let metadata_json = json::metadata_json(&obj, pixel_vr.as_deref()).map_err(invalid)?;
    Ok(Parsed {
        attrs,
        transfer_syntax,
        metadata_json,
    })
}

//! Splitting a DICOM Part 10 file into File Meta facts and the raw data set bytes.

use std::path::Path;

use anyhow::{Context, bail};
use dicom_object::meta::FileMetaTable;

/// A Part 10 file, split.
#[derive(Debug, Clone)]
pub struct Part10 {
    /// Transfer Syntax UID from the meta group.
    pub transfer_syntax: String,
    /// Media Storage SOP Class UID.
    pub sop_class: String,
    /// Media Storage SOP Instance UID.
    pub sop_instance: String,
    /// The bytes after the meta group, exactly as in the file.
    pub dataset: Vec<u8>,
    /// The whole file.
    pub bytes: Vec<u8>,
}

impl Part10 {
    /// Reads and splits a file that has a preamble, `DICM` and a meta group with group length.
    ///
    /// # Errors
    /// When the file has no meta group or it cannot be parsed.
    pub fn read(path: &Path) -> anyhow::Result<Part10> {
        let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        Self::parse(bytes)
    }

    /// Splits file bytes.
    ///
    /// # Errors
    /// When the bytes lack a meta group with group length.
    pub fn parse(bytes: Vec<u8>) -> anyhow::Result<Part10> {
        if bytes.len() < 144 || &bytes[128..132] != b"DICM" {
            bail!("no DICM prefix");
        }
        // (0002,0000) UL, explicit VR little endian: tag 4, "UL" 2, length 2, value 4.
        if bytes[132..136] != [2, 0, 0, 0] || &bytes[136..138] != b"UL" {
            bail!("meta group does not start with its group length");
        }
        let glen = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
        let end = 144 + glen;
        let meta = FileMetaTable::from_reader(&bytes[128..end]).context("parse meta group")?;
        let clean = |s: &str| s.trim_end_matches(['\0', ' ']).to_owned();
        Ok(Part10 {
            transfer_syntax: clean(meta.transfer_syntax()),
            sop_class: clean(meta.media_storage_sop_class_uid()),
            sop_instance: clean(meta.media_storage_sop_instance_uid()),
            dataset: bytes[end..].to_vec(),
            bytes,
        })
    }
}

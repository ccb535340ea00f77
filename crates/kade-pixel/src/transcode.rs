//! Whole instances re-encoded in a native transfer syntax (Explicit or Implicit VR Little
//! Endian), decompressing pixel data when needed (PS3.5 §8.2, §A.1–A.2): what a DIMSE peer
//! that accepts no compressed transfer syntax gets on C-MOVE/C-GET, and what DICOMweb serves
//! for `transfer-syntax=1.2.840.10008.1.2.1`.

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder, InMemDicomObject};
use kade_core::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

use crate::PixelError;
use crate::decode::{decode_frame, is_lossy};
use crate::frames::native_le;
use crate::instance::{self, Instance};

/// The whole instance re-encoded in Explicit VR Little Endian (1.2.840.10008.1.2.1).
///
/// Encapsulated pixel data is decompressed (every frame, see
/// [`decoded_frame`](crate::decoded_frame)) and the pixel attributes are fixed to match:
/// Photometric Interpretation (e.g. YBR_FULL_422 → RGB after lossy JPEG), Planar
/// Configuration 0, Pixel Data as OW (Bits Allocated > 8) or OB, the Extended Offset Table
/// and Encapsulated Pixel Data Value Total Length removed, Lossy Image Compression "01" kept
/// or added for lossy sources. Native pixel data is only converted to little endian.
/// Instances without pixel data (reports, plans) are re-encoded as they are.
///
/// The File Meta group is new: Transfer Syntax UID Explicit VR LE, the same Media Storage SOP
/// Class/Instance UIDs, Kade's Implementation Class UID and version name; the preamble is
/// zeroed. Group length elements (gggg,0000) outside the meta group are dropped, and
/// sequences are written with undefined length, since both would be stale.
///
/// # Errors
/// [`PixelError::NotDicom`] for unparsable input, the [`decoded_frame`](crate::decoded_frame)
/// errors for pixel data that cannot be decompressed, [`PixelError::Encode`] if writing fails.
pub fn to_explicit_le(part10: &[u8]) -> Result<Vec<u8>, PixelError> {
    to_native(part10, uids::EXPLICIT_VR_LITTLE_ENDIAN)
}

/// The whole instance re-encoded in Implicit VR Little Endian (1.2.840.10008.1.2), the one
/// transfer syntax every DIMSE peer accepts; otherwise as [`to_explicit_le`].
///
/// # Errors
/// As [`to_explicit_le`].
pub fn to_implicit_le(part10: &[u8]) -> Result<Vec<u8>, PixelError> {
    to_native(part10, uids::IMPLICIT_VR_LITTLE_ENDIAN)
}

fn to_native(part10: &[u8], target: &str) -> Result<Vec<u8>, PixelError> {
    let (obj, ts) = instance::open(part10)?;
    let obj = if obj.get(tags::PIXEL_DATA).is_some() {
        native_pixels(Instance::from_object(obj, ts)?)?
    } else {
        obj
    };
    let meta = obj.meta();
    let sop_class = non_empty(meta.media_storage_sop_class_uid())
        .map(str::to_owned)
        .or_else(|| string(&obj, tags::SOP_CLASS_UID))
        .ok_or(PixelError::MissingAttribute("SOP Class UID (0008,0016)"))?;
    let sop_instance = non_empty(meta.media_storage_sop_instance_uid())
        .map(str::to_owned)
        .or_else(|| string(&obj, tags::SOP_INSTANCE_UID))
        .ok_or(PixelError::MissingAttribute("SOP Instance UID (0008,0018)"))?;
    let mut builder = FileMetaTableBuilder::new()
        .transfer_syntax(target)
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(IMPLEMENTATION_VERSION_NAME);
    if let Some(ae) = meta.source_application_entity_title().and_then(non_empty) {
        builder = builder.source_application_entity_title(ae.to_owned());
    }
    let mut data = obj.into_inner();
    drop_group_lengths(&mut data);
    let file = data
        .with_meta(builder)
        .map_err(|e| PixelError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(part10.len());
    file.write_all(&mut out)
        .map_err(|e| PixelError::Encode(e.to_string()))?;
    Ok(out)
}

/// Replaces the pixel data with native little-endian bytes and fixes the attributes.
fn native_pixels(inst: Instance) -> Result<DefaultDicomObject, PixelError> {
    let before = inst.info.clone();
    let (after, bytes) = if before.encapsulated {
        let mut all = Vec::new();
        let mut after = before.clone();
        for index in 0..before.number_of_frames as usize {
            let (info, frame) = decode_frame(&inst, index)?;
            all.extend_from_slice(&frame);
            after = info;
        }
        (after, all)
    } else {
        let Value::Primitive(p) = inst.pixel_data().value() else {
            return Err(PixelError::Corrupt(
                "native Pixel Data is not a plain value".into(),
            ));
        };
        (before.clone(), native_le(&inst, p)?)
    };
    let source_ts = inst.ts.uid().to_owned();
    let mut obj = inst.obj;
    put_pixel_data(&mut obj, bytes, after.bits_allocated);
    if after.photometric_interpretation != before.photometric_interpretation {
        obj.put(DataElement::new(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            after.photometric_interpretation.as_str(),
        ));
    }
    if after.samples_per_pixel > 1 || obj.get(tags::PLANAR_CONFIGURATION).is_some() {
        obj.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(after.planar_configuration),
        ));
    }
    for tag in [
        tags::EXTENDED_OFFSET_TABLE,
        tags::EXTENDED_OFFSET_TABLE_LENGTHS,
        tags::ENCAPSULATED_PIXEL_DATA_VALUE_TOTAL_LENGTH,
    ] {
        obj.remove_element(tag);
    }
    if before.encapsulated && is_lossy(&source_ts) {
        mark_lossy(&mut obj, &source_ts);
    }
    Ok(obj)
}

/// Pixel Data as OW (16-bit words) or OB, padded to an even length.
fn put_pixel_data(obj: &mut DefaultDicomObject, mut bytes: Vec<u8>, bits_allocated: u16) {
    if bytes.len() % 2 == 1 {
        bytes.push(0);
    }
    let element = if bits_allocated > 8 {
        let words: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.into()))
    } else {
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.into()))
    };
    obj.put(element);
}

/// Lossy Image Compression "01" and its method, unless the data set already says so
/// (PS3.3 §C.7.6.1.1.5).
fn mark_lossy(obj: &mut DefaultDicomObject, source_ts: &str) {
    if string(obj, tags::LOSSY_IMAGE_COMPRESSION).as_deref() != Some("01") {
        obj.put(DataElement::new(
            tags::LOSSY_IMAGE_COMPRESSION,
            VR::CS,
            "01",
        ));
    }
    let method = match source_ts {
        uids::JPEG_BASELINE8_BIT | uids::JPEG_EXTENDED12_BIT => "ISO_10918_1",
        uids::JPEG2000 | uids::JPEG2000MC => "ISO_15444_1",
        uids::HTJ2K => "ISO_15444_15",
        uids::JPEGLS_NEAR_LOSSLESS => "ISO_14495_1",
        _ => "ISO_18181_1",
    };
    if obj.get(tags::LOSSY_IMAGE_COMPRESSION_METHOD).is_none() {
        obj.put(DataElement::new(
            tags::LOSSY_IMAGE_COMPRESSION_METHOD,
            VR::CS,
            method,
        ));
    }
}

/// Removes group length elements (gggg,0000), at every nesting level.
fn drop_group_lengths(obj: &mut InMemDicomObject) {
    let tags: Vec<(Tag, VR)> = obj.iter().map(|e| (e.header().tag, e.vr())).collect();
    for (tag, vr) in tags {
        if tag.element() == 0 {
            obj.remove_element(tag);
        } else if vr == VR::SQ {
            obj.update_value(tag, |v| {
                if let Some(items) = v.items_mut() {
                    items.iter_mut().for_each(drop_group_lengths);
                }
            });
        }
    }
}

fn string(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .and_then(|s| non_empty(&s).map(str::to_owned))
}

fn non_empty(s: &str) -> Option<&str> {
    let s = s.trim_end_matches(['\0', ' ']).trim_start();
    (!s.is_empty()).then_some(s)
}

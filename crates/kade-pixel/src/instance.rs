//! Parsing a Part 10 file held in memory, and the attributes that describe its pixels
//! (PS3.3 §C.7.6.3, Image Pixel Module).

use std::borrow::Cow;

use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataDictionary, Tag};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntax;
use dicom_encoding::transfer_syntax::{Endianness, TransferSyntaxIndex};
use dicom_object::file::ReadPreamble;
use dicom_object::mem::InMemElement;
use dicom_object::{DefaultDicomObject, InMemDicomObject, OpenFileOptions};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::{FrameInfo, PixelError};

static REGISTRY: TransferSyntaxRegistry = TransferSyntaxRegistry;

/// A parsed instance with pixel data, and the facts about its frames.
pub(crate) struct Instance {
    /// The whole object.
    pub obj: DefaultDicomObject,
    /// Its transfer syntax (from the File Meta group).
    pub ts: &'static TransferSyntax,
    /// The frame description, as stored.
    pub info: FrameInfo,
}

impl Instance {
    /// Parses `part10` (preamble + "DICM" + meta + data set) and reads the pixel attributes.
    ///
    /// # Errors
    /// [`PixelError::NotDicom`], [`PixelError::NoPixelData`],
    /// [`PixelError::MissingAttribute`], or [`PixelError::Unsupported`] for a transfer syntax
    /// that is not known.
    pub fn parse(part10: &[u8]) -> Result<Instance, PixelError> {
        let (obj, ts) = open(part10)?;
        Instance::from_object(obj, ts)
    }

    /// Reads the pixel attributes of a parsed object.
    ///
    /// # Errors
    /// [`PixelError::NoPixelData`], [`PixelError::MissingAttribute`].
    pub fn from_object(
        obj: DefaultDicomObject,
        ts: &'static TransferSyntax,
    ) -> Result<Instance, PixelError> {
        if obj.get(tags::PIXEL_DATA).is_none() {
            return Err(PixelError::NoPixelData);
        }
        let info = frame_info(&obj, ts)?;
        Ok(Instance { obj, ts, info })
    }

    /// The Pixel Data element (present: checked by [`parse`](Self::parse)).
    pub fn pixel_data(&self) -> &InMemElement {
        self.obj
            .get(tags::PIXEL_DATA)
            .expect("checked when the instance was parsed")
    }

    /// Whether the data set is encoded big endian (Explicit VR Big Endian, retired).
    pub fn big_endian(&self) -> bool {
        self.ts.endianness() == Endianness::Big
    }

    /// Checks a 1-based frame number and returns the 0-based index.
    ///
    /// # Errors
    /// [`PixelError::FrameOutOfRange`].
    pub fn frame_index(&self, n: u32) -> Result<usize, PixelError> {
        if n == 0 || n > self.info.number_of_frames {
            return Err(PixelError::FrameOutOfRange {
                requested: n,
                frames: self.info.number_of_frames,
            });
        }
        Ok((n - 1) as usize)
    }
}

/// Parses `part10` (preamble + "DICM" + meta + data set) and finds its transfer syntax.
///
/// # Errors
/// [`PixelError::NotDicom`], or [`PixelError::Unsupported`] for a transfer syntax that is not
/// known.
pub(crate) fn open(
    part10: &[u8],
) -> Result<(DefaultDicomObject, &'static TransferSyntax), PixelError> {
    if part10.len() < 132 || &part10[128..132] != b"DICM" {
        return Err(PixelError::NotDicom(
            "there is no \"DICM\" prefix after a 128-byte preamble".into(),
        ));
    }
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(&part10[128..])
        .map_err(|e| PixelError::NotDicom(e.to_string()))?;
    let uid = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    let ts = REGISTRY.get(uid).ok_or_else(|| {
        PixelError::Unsupported(format!("the transfer syntax {uid} is not known to Kade"))
    })?;
    Ok((obj, ts))
}

/// Reads the Image Pixel Module attributes into a [`FrameInfo`].
fn frame_info(obj: &InMemDicomObject, ts: &TransferSyntax) -> Result<FrameInfo, PixelError> {
    let rows = required_u16(obj, tags::ROWS, "Rows (0028,0010)")?;
    let columns = required_u16(obj, tags::COLUMNS, "Columns (0028,0011)")?;
    let bits_allocated = required_u16(obj, tags::BITS_ALLOCATED, "Bits Allocated (0028,0100)")?;
    if rows == 0 || columns == 0 || bits_allocated == 0 {
        return Err(PixelError::Corrupt(format!(
            "Rows {rows}, Columns {columns}, Bits Allocated {bits_allocated}: none may be 0"
        )));
    }
    let samples_per_pixel = optional_int(
        obj,
        tags::SAMPLES_PER_PIXEL,
        "Samples per Pixel (0028,0002)",
    )?
    .unwrap_or(1);
    let number_of_frames =
        optional_int(obj, tags::NUMBER_OF_FRAMES, "Number of Frames (0028,0008)")?.unwrap_or(1);
    let bits_stored = optional_int(obj, tags::BITS_STORED, "Bits Stored (0028,0101)")?
        .unwrap_or(bits_allocated)
        .clamp(1, bits_allocated);
    let photometric_interpretation = obj
        .get(tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_uppercase())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "MONOCHROME2".to_owned());
    Ok(FrameInfo {
        transfer_syntax: ts.uid().to_owned(),
        encapsulated: ts.is_encapsulated_pixel_data(),
        number_of_frames: number_of_frames.max(1),
        rows,
        columns,
        samples_per_pixel: samples_per_pixel.max(1),
        bits_allocated,
        bits_stored,
        pixel_representation: optional_int(
            obj,
            tags::PIXEL_REPRESENTATION,
            "Pixel Representation",
        )?
        .unwrap_or(0),
        photometric_interpretation,
        planar_configuration: optional_int(
            obj,
            tags::PLANAR_CONFIGURATION,
            "Planar Configuration",
        )?
        .unwrap_or(0),
    })
}

fn required_u16(obj: &InMemDicomObject, tag: Tag, name: &'static str) -> Result<u16, PixelError> {
    optional_int(obj, tag, name)?.ok_or(PixelError::MissingAttribute(name))
}

/// An integer attribute: `None` when absent or empty, an error when present but unreadable.
fn optional_int<T>(
    obj: &InMemDicomObject,
    tag: Tag,
    name: &'static str,
) -> Result<Option<T>, PixelError>
where
    T: num_like::FromI64,
{
    let Some(e) = obj.get(tag) else {
        return Ok(None);
    };
    if e.value().primitive().is_none_or(|p| p.multiplicity() == 0) {
        return Ok(None);
    }
    e.to_int::<i64>()
        .ok()
        .and_then(T::from_i64)
        .map(Some)
        .ok_or(PixelError::MissingAttribute(name))
}

/// Conversion of the integer attribute types used here, without a numeric-traits crate.
mod num_like {
    pub trait FromI64: Sized {
        fn from_i64(v: i64) -> Option<Self>;
    }
    impl FromI64 for u16 {
        fn from_i64(v: i64) -> Option<Self> {
            u16::try_from(v).ok()
        }
    }
    impl FromI64 for u32 {
        fn from_i64(v: i64) -> Option<Self> {
            u32::try_from(v).ok()
        }
    }
}

/// Finds `tag` for frame `index` (0-based): at the top level, else in the frame's item of the
/// Per-frame Functional Groups Sequence, else in the Shared Functional Groups Sequence
/// (PS3.3 §C.7.6.16), looking one macro sequence deep (e.g. Pixel Value Transformation).
pub(crate) fn find_for_frame<'a, D>(
    obj: &'a InMemDicomObject<D>,
    tag: Tag,
    index: usize,
) -> Option<&'a InMemElement<D>>
where
    D: DataDictionary + Clone,
{
    if let Some(e) = obj.get(tag) {
        return Some(e);
    }
    let in_group = |group: &'a InMemDicomObject<D>| {
        group.iter().find_map(|macro_seq| match macro_seq.value() {
            Value::Sequence(seq) => seq.items().iter().find_map(|item| item.get(tag)),
            _ => None,
        })
    };
    let item = |seq_tag: Tag, i: usize| {
        obj.get(seq_tag)
            .and_then(|e| e.items())
            .and_then(|items| items.get(i))
    };
    item(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, index)
        .and_then(in_group)
        .or_else(|| item(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, 0).and_then(in_group))
}

/// The bytes of a primitive value in little-endian order, as a Part 10 file in Explicit VR
/// Little Endian would hold them.
///
/// `swap_words` repairs 32-bit samples read from a big-endian file as OW: the parser turned
/// each 16-bit word around, so the two halves of every 32-bit sample are still reversed.
pub(crate) fn le_bytes(
    value: &PrimitiveValue,
    swap_words: bool,
) -> Result<Cow<'_, [u8]>, PixelError> {
    fn flat<const N: usize, T: Copy>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        v.iter().flat_map(|x| f(*x)).collect()
    }
    let bytes: Cow<'_, [u8]> = match value {
        PrimitiveValue::Empty => Cow::Borrowed(&[]),
        PrimitiveValue::U8(v) => Cow::Borrowed(&v[..]),
        PrimitiveValue::U16(v) if swap_words => Cow::Owned(
            v.chunks(2)
                .flat_map(|w| {
                    let (hi, lo) = (w[0], w.get(1).copied().unwrap_or(0));
                    [lo.to_le_bytes(), hi.to_le_bytes()].concat()
                })
                .collect(),
        ),
        PrimitiveValue::U16(v) => Cow::Owned(flat(v, u16::to_le_bytes)),
        PrimitiveValue::I16(v) => Cow::Owned(flat(v, i16::to_le_bytes)),
        PrimitiveValue::U32(v) => Cow::Owned(flat(v, u32::to_le_bytes)),
        PrimitiveValue::I32(v) => Cow::Owned(flat(v, i32::to_le_bytes)),
        PrimitiveValue::F32(v) => Cow::Owned(flat(v, f32::to_le_bytes)),
        PrimitiveValue::U64(v) => Cow::Owned(flat(v, u64::to_le_bytes)),
        other => {
            return Err(PixelError::Corrupt(format!(
                "Pixel Data holds a {:?} value instead of bytes or words",
                dicom_core::value::DicomValueType::value_type(other)
            )));
        }
    };
    Ok(bytes)
}

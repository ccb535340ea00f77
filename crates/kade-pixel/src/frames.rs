//! Frames as stored: a slice of native pixel data, or one frame's compressed bitstream taken
//! from the encapsulated fragments (PS3.5 §A.4, Basic and Extended Offset Tables).

use std::borrow::Cow;

use dicom_core::value::{PixelFragmentSequence, PrimitiveValue, Value};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::instance::{Instance, le_bytes};
use crate::{FrameInfo, PixelError};

/// Frame `n` (1-based) as stored, with the instance's [`FrameInfo`].
///
/// For native (uncompressed) transfer syntaxes: the frame's bytes in little-endian order (a
/// big-endian file's 16- and 32-bit samples are byte-swapped), in the instance's Planar
/// Configuration; 1-bit frames that do not start on a byte boundary are shifted to start at
/// bit 0. For a native YBR_FULL_422 frame: 2 samples per pixel, as stored.
///
/// For encapsulated transfer syntaxes: the frame's compressed bitstream, i.e. the fragments of
/// that frame concatenated. Which fragments belong to the frame comes from the Extended Offset
/// Table when present, else the Basic Offset Table, else one fragment per frame when there are
/// as many fragments as frames, else all fragments for a single-frame image, else the
/// fragments that open with a JPEG or JPEG 2000 start marker.
///
/// # Errors
/// [`PixelError::NotDicom`], [`PixelError::NoPixelData`], [`PixelError::MissingAttribute`],
/// [`PixelError::FrameOutOfRange`] for `n == 0` or `n > NumberOfFrames`, and
/// [`PixelError::Corrupt`] when the pixel data is shorter than its attributes say or the
/// frame's fragments cannot be told apart.
pub fn stored_frame(part10: &[u8], n: u32) -> Result<(FrameInfo, Vec<u8>), PixelError> {
    let inst = Instance::parse(part10)?;
    let index = inst.frame_index(n)?;
    let bytes = frame_bytes(&inst, index)?.into_owned();
    Ok((inst.info, bytes))
}

/// Frame `index` (0-based) of a parsed instance, as stored.
pub(crate) fn frame_bytes(inst: &Instance, index: usize) -> Result<Cow<'_, [u8]>, PixelError> {
    match (inst.pixel_data().value(), inst.info.encapsulated) {
        (Value::PixelSequence(seq), true) => encapsulated_frame(&inst.obj, &inst.info, seq, index),
        (Value::Primitive(p), false) => native_frame(inst, p, index).map(Cow::Owned),
        (Value::PixelSequence(_), false) => Err(PixelError::Corrupt(
            "Pixel Data is encapsulated but the transfer syntax is not".into(),
        )),
        (_, true) => Err(PixelError::Corrupt(
            "the transfer syntax is encapsulated but Pixel Data is not".into(),
        )),
        (Value::Sequence(_), false) => Err(PixelError::Corrupt(
            "Pixel Data holds a sequence of items".into(),
        )),
    }
}

/// Bytes of one native frame (bits allocated ≥ 8), as the attributes say.
pub(crate) fn native_frame_len(info: &FrameInfo) -> usize {
    let samples = match info.photometric_interpretation.as_str() {
        // Two luminance samples share one pair of chrominance samples (PS3.3 §C.7.6.3.1.2).
        "YBR_FULL_422" | "YBR_PARTIAL_422" if info.samples_per_pixel == 3 => 2,
        _ => usize::from(info.samples_per_pixel),
    };
    usize::from(info.rows)
        * usize::from(info.columns)
        * samples
        * usize::from(info.bits_allocated).div_ceil(8)
}

/// Native pixel data of the whole instance in little-endian order.
pub(crate) fn native_le(inst: &Instance, p: &PrimitiveValue) -> Result<Vec<u8>, PixelError> {
    let swap_words = inst.big_endian() && inst.info.bits_allocated == 32;
    Ok(le_bytes(p, swap_words)?.into_owned())
}

fn native_frame(inst: &Instance, p: &PrimitiveValue, index: usize) -> Result<Vec<u8>, PixelError> {
    let info = &inst.info;
    let swap_words = inst.big_endian() && info.bits_allocated == 32;
    let all = le_bytes(p, swap_words)?;
    if info.bits_allocated == 1 {
        let bits = usize::from(info.rows)
            * usize::from(info.columns)
            * usize::from(info.samples_per_pixel);
        return bit_frame(&all, index * bits, bits).ok_or_else(|| short(info, all.len(), index));
    }
    let len = native_frame_len(info);
    all.get(index * len..(index + 1) * len)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| short(info, all.len(), index))
}

fn short(info: &FrameInfo, have: usize, index: usize) -> PixelError {
    PixelError::Corrupt(format!(
        "Pixel Data holds {have} bytes, too few for frame {} of {} ({}×{}, {} sample(s) of {} bits)",
        index + 1,
        info.number_of_frames,
        info.columns,
        info.rows,
        info.samples_per_pixel,
        info.bits_allocated
    ))
}

/// `bits` bits starting at bit `start` (LSB first, PS3.5 §D.2), repacked from bit 0.
fn bit_frame(all: &[u8], start: usize, bits: usize) -> Option<Vec<u8>> {
    if (start + bits).div_ceil(8) > all.len() {
        return None;
    }
    if start % 8 == 0 {
        let mut out = all[start / 8..(start + bits).div_ceil(8)].to_vec();
        if bits % 8 != 0 {
            // The next frame's bits share the last byte: clear them.
            if let Some(last) = out.last_mut() {
                *last &= (1u8 << (bits % 8)) - 1;
            }
        }
        return Some(out);
    }
    let mut out = vec![0u8; bits.div_ceil(8)];
    for i in 0..bits {
        let src = start + i;
        let bit = (all[src / 8] >> (src % 8)) & 1;
        out[i / 8] |= bit << (i % 8);
    }
    Some(out)
}

/// The fragments of frame `index`, concatenated.
fn encapsulated_frame<'a>(
    obj: &InMemDicomObject,
    info: &FrameInfo,
    seq: &'a PixelFragmentSequence<Vec<u8>>,
    index: usize,
) -> Result<Cow<'a, [u8]>, PixelError> {
    let fragments = seq.fragments();
    let frames = info.number_of_frames as usize;
    if fragments.is_empty() {
        return Err(PixelError::Corrupt(
            "the pixel sequence has no fragments".into(),
        ));
    }
    if frames == 1 {
        return Ok(concat(fragments));
    }
    // Position of each fragment's item tag, counted from the first fragment (PS3.5 §A.4).
    let positions: Vec<u64> = fragments
        .iter()
        .scan(0u64, |pos, f| {
            let at = *pos;
            *pos += 8 + f.len() as u64;
            Some(at)
        })
        .collect();
    let eot = u64_values(obj, tags::EXTENDED_OFFSET_TABLE);
    if let Some(eot) = eot.filter(|t| t.len() == frames) {
        let i = positions.binary_search(&eot[index]).map_err(|_| {
            PixelError::Corrupt(format!(
                "the Extended Offset Table entry of frame {} does not point at a fragment",
                index + 1
            ))
        })?;
        let lengths = u64_values(obj, tags::EXTENDED_OFFSET_TABLE_LENGTHS);
        let frag = &fragments[i][..];
        let len = lengths
            .and_then(|l| l.get(index).copied())
            .map_or(frag.len(), |l| (l as usize).min(frag.len()));
        return Ok(Cow::Borrowed(&frag[..len]));
    }
    let bot = seq.offset_table();
    if bot.len() == frames {
        let start = u64::from(bot[index]);
        let end = bot.get(index + 1).map_or(u64::MAX, |&e| u64::from(e));
        let parts: Vec<&Vec<u8>> = positions
            .iter()
            .zip(fragments)
            .filter(|(p, _)| (start..end).contains(*p))
            .map(|(_, f)| f)
            .collect();
        if parts.is_empty() {
            return Err(PixelError::Corrupt(format!(
                "the Basic Offset Table entry of frame {} does not point at a fragment",
                index + 1
            )));
        }
        return Ok(concat(parts));
    }
    if fragments.len() == frames {
        return Ok(Cow::Borrowed(&fragments[index]));
    }
    let starts: Vec<usize> = (0..fragments.len())
        .filter(|&i| opens_codestream(&fragments[i]))
        .collect();
    if starts.len() == frames {
        let end = starts.get(index + 1).copied().unwrap_or(fragments.len());
        return Ok(concat(&fragments[starts[index]..end]));
    }
    Err(PixelError::Corrupt(format!(
        "cannot tell which fragments hold frame {}: {} frames in {} fragments, with no offset table",
        index + 1,
        frames,
        fragments.len()
    )))
}

fn concat<'a, F: AsRef<[u8]>>(parts: impl IntoIterator<Item = F>) -> Cow<'a, [u8]> {
    let mut out = Vec::new();
    for p in parts {
        out.extend_from_slice(p.as_ref());
    }
    Cow::Owned(out)
}

/// Whether a fragment opens a JPEG (SOI), JPEG 2000 codestream (SOC+SIZ) or JP2 file.
fn opens_codestream(f: &[u8]) -> bool {
    f.starts_with(&[0xFF, 0xD8, 0xFF])
        || f.starts_with(&[0xFF, 0x4F, 0xFF, 0x51])
        || f.starts_with(&[0, 0, 0, 0x0C, b'j', b'P', b' ', b' '])
}

/// The values of an OV attribute (the Extended Offset Table and its lengths).
fn u64_values(obj: &InMemDicomObject, tag: dicom_core::Tag) -> Option<Vec<u64>> {
    match obj.get(tag)?.value().primitive()? {
        PrimitiveValue::U64(v) => Some(v.to_vec()),
        PrimitiveValue::U8(b) => Some(
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
                .collect(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_frames_are_repacked_from_bit_zero() {
        // Two 12-bit frames: 0xABC then 0x123 (LSB first).
        let all = [0xBC, 0x3A, 0x12];
        assert_eq!(bit_frame(&all, 0, 12).unwrap(), vec![0xBC, 0x0A]);
        assert_eq!(bit_frame(&all, 12, 12).unwrap(), vec![0x23, 0x01]);
        assert!(bit_frame(&all, 24, 12).is_none());
    }

    #[test]
    fn codestream_starts() {
        assert!(opens_codestream(&[0xFF, 0xD8, 0xFF, 0xE0]));
        assert!(opens_codestream(&[0xFF, 0x4F, 0xFF, 0x51, 0]));
        assert!(!opens_codestream(&[0x02, 0, 0, 0]));
    }
}

//! Frames decoded to native little-endian pixels: JPEG through [`crate::jpeg`], the other
//! encapsulated transfer syntaxes through the codecs registered in
//! `dicom-transfer-syntax-registry` (RLE, JPEG 2000/HTJ2K via OpenJPEG, JPEG-LS via CharLS
//! with the `jpeg-ls` feature, deflated frames, encapsulated uncompressed).

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};

use dicom_dictionary_std::uids;
use dicom_encoding::Codec;
use dicom_encoding::adapters::{PixelDataObject, RawPixelData};

use crate::frames::frame_bytes;
use crate::instance::Instance;
use crate::{FrameInfo, PixelError, jpeg};

/// Frame `n` (1-based) decoded to native little-endian pixel bytes: what WADO-RS returns for
/// `application/octet-stream` with an uncompressed transfer syntax.
///
/// Native input is returned as [`stored_frame`](crate::stored_frame) returns it. Decompressed
/// frames have interleaved colour samples (Planar Configuration 0), and the returned
/// [`FrameInfo`] gives the Photometric Interpretation of the decoded samples: RGB after lossy
/// JPEG or JPEG 2000 with a colour transform, unchanged otherwise (e.g. YBR_FULL stays
/// YBR_FULL after RLE).
///
/// # Errors
/// As [`stored_frame`](crate::stored_frame), plus [`PixelError::Unsupported`] for transfer
/// syntaxes or layouts without a decoder here (12-bit JPEG Extended, 32-bit RLE, JPEG-LS
/// without the `jpeg-ls` feature, JPEG XL, video…) and [`PixelError::Decode`] when a codec
/// rejects the frame.
pub fn decoded_frame(part10: &[u8], n: u32) -> Result<(FrameInfo, Vec<u8>), PixelError> {
    let inst = Instance::parse(part10)?;
    let index = inst.frame_index(n)?;
    decode_frame(&inst, index)
}

/// Frame `index` (0-based) of a parsed instance, decoded.
pub(crate) fn decode_frame(
    inst: &Instance,
    index: usize,
) -> Result<(FrameInfo, Vec<u8>), PixelError> {
    let stored = frame_bytes(inst, index)?;
    if !inst.info.encapsulated {
        return Ok((inst.info.clone(), stored.into_owned()));
    }
    let frame = index as u32 + 1;
    let info = &inst.info;
    let uid = info.transfer_syntax.as_str();
    let name = inst.ts.name();
    let out = if is_jpeg(uid) {
        jpeg::decode(&stored, info, frame, name)?
    } else {
        if uid == uids::RLE_LOSSLESS {
            check_rle(&stored, info, frame)?;
        }
        with_registry_codec(inst, &stored, frame)?
    };
    let expected = decoded_len(info);
    if out.len() != expected {
        return Err(PixelError::Corrupt(format!(
            "frame {frame} decoded to {} bytes where Rows, Columns, Samples per Pixel and Bits \
             Allocated call for {expected}",
            out.len()
        )));
    }
    Ok((decoded_info(info), out))
}

/// Bytes of one decoded frame: codecs never return subsampled (4:2:2) data.
fn decoded_len(info: &FrameInfo) -> usize {
    usize::from(info.rows)
        * usize::from(info.columns)
        * usize::from(info.samples_per_pixel)
        * usize::from(info.bits_allocated).div_ceil(8)
}

/// The JPEG transfer syntaxes that `jpeg-decoder` reads (PS3.5 §A.4.1).
fn is_jpeg(uid: &str) -> bool {
    [
        uids::JPEG_BASELINE8_BIT,
        uids::JPEG_EXTENDED12_BIT,
        uids::JPEG_LOSSLESS,
        uids::JPEG_LOSSLESS_SV1,
    ]
    .contains(&uid)
}

/// Whether a transfer syntax is lossy, so decoded output must keep Lossy Image Compression
/// "01" (PS3.3 §C.7.6.1.1.5).
pub(crate) fn is_lossy(uid: &str) -> bool {
    [
        uids::JPEG_BASELINE8_BIT,
        uids::JPEG_EXTENDED12_BIT,
        uids::JPEG2000,
        uids::JPEG2000MC,
        uids::JPEGLS_NEAR_LOSSLESS,
        uids::HTJ2K,
        uids::JPEGXL,
    ]
    .contains(&uid)
}

/// How decoded frames are described: what the codec did to colour and planes.
pub(crate) fn decoded_info(info: &FrameInfo) -> FrameInfo {
    let mut out = info.clone();
    let uid = info.transfer_syntax.as_str();
    let interleaves = uid != uids::ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN
        && uid != uids::DEFLATED_IMAGE_FRAME_COMPRESSION;
    if interleaves {
        out.planar_configuration = 0;
    }
    if info.samples_per_pixel == 3 {
        let lossy_jpeg = uid == uids::JPEG_BASELINE8_BIT || uid == uids::JPEG_EXTENDED12_BIT;
        let j2k_transform = matches!(
            info.photometric_interpretation.as_str(),
            "YBR_ICT" | "YBR_RCT"
        );
        if lossy_jpeg || j2k_transform {
            out.photometric_interpretation = "RGB".to_owned();
        }
    }
    out
}

/// RLE header checks (PS3.5 §G.5) that the registry's decoder would panic on.
fn check_rle(data: &[u8], info: &FrameInfo, frame: u32) -> Result<(), PixelError> {
    if info.bits_allocated != 8 && info.bits_allocated != 16 {
        return Err(PixelError::Unsupported(format!(
            "RLE Lossless with {}-bit samples (Bits Allocated {}) is not supported for decompression",
            info.bits_allocated, info.bits_allocated
        )));
    }
    let bad = |why: &str| PixelError::Corrupt(format!("frame {frame}: RLE header {why}"));
    let word = |i: usize| u32::from_le_bytes(data[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    if data.len() < 64 {
        return Err(bad("is shorter than 64 bytes"));
    }
    let segments = word(0) as usize;
    let wanted = usize::from(info.samples_per_pixel) * usize::from(info.bits_allocated / 8);
    if segments != wanted || segments > 15 {
        return Err(bad(&format!(
            "declares {segments} segments, {wanted} expected"
        )));
    }
    let offsets: Vec<usize> = (1..=segments).map(|i| word(i) as usize).collect();
    if offsets[0] != 64
        || offsets.windows(2).any(|w| w[0] > w[1])
        || offsets.last().is_some_and(|&o| o > data.len())
    {
        return Err(bad(
            "has segment offsets out of order or beyond the fragment",
        ));
    }
    Ok(())
}

/// Runs the registry's decoder for the instance's transfer syntax on one frame.
fn with_registry_codec(inst: &Instance, stored: &[u8], frame: u32) -> Result<Vec<u8>, PixelError> {
    let name = inst.ts.name();
    let Codec::EncapsulatedPixelData(Some(reader), _) = inst.ts.codec() else {
        return Err(PixelError::Unsupported(format!(
            "{name} ({}) is not supported for decompression",
            inst.ts.uid()
        )));
    };
    let info = &inst.info;
    if info.bits_allocated != 8 && info.bits_allocated != 16 {
        return Err(PixelError::Unsupported(format!(
            "{name} with {}-bit samples (Bits Allocated) is not supported for decompression",
            info.bits_allocated
        )));
    }
    let one = OneFrame { info, data: stored };
    let mut out = Vec::new();
    let failed = |reason: String| PixelError::Decode {
        frame,
        transfer_syntax: name.to_owned(),
        reason,
    };
    // The codecs index slices from header fields; a damaged bitstream must not take the
    // server down.
    catch_unwind(AssertUnwindSafe(|| reader.decode_frame(&one, 0, &mut out)))
        .map_err(|_| failed("the decoder stopped on malformed data".into()))?
        .map_err(|e| failed(e.to_string()))?;
    Ok(out)
}

/// One frame's bitstream presented to a registry codec as a single-frame, single-fragment
/// object, so that every codec sees exactly the fragments [`frame_bytes`] chose.
struct OneFrame<'a> {
    info: &'a FrameInfo,
    data: &'a [u8],
}

impl PixelDataObject for OneFrame<'_> {
    fn transfer_syntax_uid(&self) -> &str {
        &self.info.transfer_syntax
    }
    fn rows(&self) -> Option<u16> {
        Some(self.info.rows)
    }
    fn cols(&self) -> Option<u16> {
        Some(self.info.columns)
    }
    fn samples_per_pixel(&self) -> Option<u16> {
        Some(self.info.samples_per_pixel)
    }
    fn bits_allocated(&self) -> Option<u16> {
        Some(self.info.bits_allocated)
    }
    fn bits_stored(&self) -> Option<u16> {
        Some(self.info.bits_stored)
    }
    fn photometric_interpretation(&self) -> Option<&str> {
        Some(&self.info.photometric_interpretation)
    }
    fn number_of_frames(&self) -> Option<u32> {
        Some(1)
    }
    fn number_of_fragments(&self) -> Option<u32> {
        Some(1)
    }
    fn fragment(&self, fragment: usize) -> Option<Cow<'_, [u8]>> {
        (fragment == 0).then_some(Cow::Borrowed(self.data))
    }
    fn offset_table(&self) -> Option<Cow<'_, [u32]>> {
        Some(Cow::Borrowed(&[]))
    }
    fn raw_pixel_data(&self) -> Option<RawPixelData> {
        Some(RawPixelData {
            fragments: vec![self.data.to_vec()].into(),
            offset_table: Vec::new().into(),
        })
    }
}

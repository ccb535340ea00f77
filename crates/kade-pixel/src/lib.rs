//! Pixel data for Kade: frames as stored or decoded, whole instances decompressed to a native
//! transfer syntax, and frames rendered to PNG/JPEG.
//!
//! Shared by the DICOMweb layer (WADO-RS frames, `/rendered`, `/thumbnail`, decompression on
//! retrieve) and the DIMSE layer (transcoding on C-MOVE/C-GET when a peer does not accept the
//! stored transfer syntax). Every function is synchronous and CPU-bound — call it from
//! `spawn_blocking` — and takes a whole Part 10 file in memory (128-byte preamble, `DICM`,
//! File Meta group, data set).
//!
//! # Layout
//! - [`stored_frame`] (`frames.rs`): one frame as stored; native slices or the encapsulated
//!   fragments of a frame, located with the Basic/Extended Offset Tables (PS3.5 §A.4).
//! - [`decoded_frame`] (`decode.rs`, `jpeg.rs`): one frame as native little-endian pixels.
//! - [`to_explicit_le`], [`to_implicit_le`] (`transcode.rs`): the whole instance re-encoded,
//!   pixel data decompressed and its attributes fixed.
//! - [`render`] (`render.rs`, `voi.rs`): Modality LUT, VOI window, colour, resize, encode.
//! - `instance.rs`: parsing and the Image Pixel Module attributes ([`FrameInfo`]).
//! - [`PixelError`] (`error.rs`): the one error type.
//!
//! # Codecs
//! | transfer syntax | decode |
//! |---|---|
//! | Implicit/Explicit VR Little Endian, Explicit VR Big Endian, Deflated Explicit VR LE | native |
//! | JPEG Baseline (.4.50), JPEG Extended 8-bit (.4.51), JPEG Lossless (.4.57, .4.70) | `jpeg-decoder` (pure Rust) |
//! | RLE Lossless (.5), 8 and 16 bits | pure Rust |
//! | JPEG 2000 (.4.90–.4.93), HTJ2K (.4.201–.4.203) | OpenJPEG (vendored C, built by `openjpeg-sys`) |
//! | JPEG-LS lossless and near-lossless (.4.80, .4.81), with the `jpeg-ls` feature | CharLS (vendored C++, built by `charls-sys` with cmake) |
//! | Deflated Image Frame (.8.1), Encapsulated Uncompressed (.1.98) | pure Rust |
//!
//! Not decoded (a [`PixelError::Unsupported`] names the case): 12-bit JPEG Extended,
//! JPEG-LS in a build without the `jpeg-ls` feature, JPEG XL, video (MPEG-2/4, HEVC), 32-bit
//! RLE.
//! [`stored_frame`] works for every transfer syntax.

mod decode;
mod error;
mod frames;
mod instance;
mod jpeg;
mod render;
mod transcode;
mod voi;

pub use decode::decoded_frame;
pub use error::PixelError;
pub use frames::stored_frame;
pub use render::{ImageFormat, RenderOptions, render};
pub use transcode::{to_explicit_le, to_implicit_le};

/// Where the frames of an instance are and how they are encoded (PS3.3 §C.7.6.3).
///
/// Returned with each frame: for [`stored_frame`] it describes the instance as stored; for
/// [`decoded_frame`], [`photometric_interpretation`](Self::photometric_interpretation) and
/// [`planar_configuration`](Self::planar_configuration) describe the decoded bytes (e.g. RGB
/// and 0 after a YBR_FULL_422 JPEG), the other fields stay those of the stored instance.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FrameInfo {
    /// Transfer Syntax UID of the stored instance.
    pub transfer_syntax: String,
    /// Whether the stored pixel data is encapsulated (compressed).
    pub encapsulated: bool,
    /// Number of Frames (1 when absent).
    pub number_of_frames: u32,
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub columns: u16,
    /// Samples per Pixel (1 when absent).
    pub samples_per_pixel: u16,
    /// Bits Allocated.
    pub bits_allocated: u16,
    /// Bits Stored (Bits Allocated when absent).
    pub bits_stored: u16,
    /// Pixel Representation: 0 unsigned, 1 two's complement.
    pub pixel_representation: u16,
    /// Photometric Interpretation (MONOCHROME2 when absent), upper case, trimmed.
    pub photometric_interpretation: String,
    /// Planar Configuration: 0 colour-by-pixel, 1 colour-by-plane.
    pub planar_configuration: u16,
}

/// `part10`, stored in transfer syntax `stored`, in the native transfer syntax `target`
/// (Explicit or Implicit VR Little Endian): re-encoded without a codec when `stored` is native
/// ([`kade_core::transcode::to_native`]), decompressed ([`to_explicit_le`],
/// [`to_implicit_le`]) otherwise. The one place WADO-RS and C-MOVE/C-GET turn an instance into
/// what the client accepts.
///
/// # Errors
/// The reason, as text, when the instance cannot be re-encoded or decoded.
pub fn to_native(part10: &[u8], stored: &str, target: &str) -> Result<Vec<u8>, String> {
    use kade_core::transcode::{IMPLICIT_LE, is_native};
    if is_native(stored) {
        return kade_core::transcode::to_native(part10, target).map_err(|e| e.to_string());
    }
    let out = if target == IMPLICIT_LE {
        to_implicit_le(part10)
    } else {
        to_explicit_le(part10)
    };
    out.map_err(|e| e.to_string())
}

/// Whether an instance stored in transfer syntax `ts` with `bits_allocated` (when known) can be
/// decoded here: [`can_decode`] without the layouts known to fail (JPEG Extended with more than
/// 8 bits, RLE with 32-bit samples).
pub fn can_decode_layout(ts: &str, bits_allocated: Option<i64>) -> bool {
    use dicom_dictionary_std::uids;
    let ts = ts.trim_end_matches('\0');
    let bits = bits_allocated.unwrap_or(8);
    if (ts == uids::JPEG_EXTENDED12_BIT || ts == uids::JPEG_BASELINE8_BIT) && bits > 8 {
        return false;
    }
    if ts == uids::RLE_LOSSLESS && bits > 16 {
        return false;
    }
    can_decode(ts)
}

/// Whether frames stored in transfer syntax `ts` can be decoded here (see the table above).
/// Some instances of these syntaxes can still fail (12-bit JPEG Extended, 32-bit RLE; see
/// [`can_decode_layout`]): the decoding functions then return [`PixelError::Unsupported`].
pub fn can_decode(ts: &str) -> bool {
    use dicom_dictionary_std::uids;
    let ts = ts.trim_end_matches('\0');
    kade_core::transcode::is_native(ts)
        || [
            uids::JPEG_BASELINE8_BIT,
            uids::JPEG_EXTENDED12_BIT,
            uids::JPEG_LOSSLESS,
            uids::JPEG_LOSSLESS_SV1,
            uids::RLE_LOSSLESS,
            uids::JPEG2000_LOSSLESS,
            uids::JPEG2000,
            uids::JPEG2000MC_LOSSLESS,
            uids::JPEG2000MC,
            uids::HTJ2K_LOSSLESS,
            uids::HTJ2K_LOSSLESS_RPCL,
            uids::HTJ2K,
            uids::DEFLATED_IMAGE_FRAME_COMPRESSION,
            uids::ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN,
        ]
        .contains(&ts)
        || (cfg!(feature = "jpeg-ls")
            && [uids::JPEGLS_LOSSLESS, uids::JPEGLS_NEAR_LOSSLESS].contains(&ts))
}

//! The one error type of this crate.

/// Why a pixel-data operation failed, in words an administrator can act on.
///
/// Callers pick their status from the variant: [`NotDicom`](Self::NotDicom),
/// [`NoPixelData`](Self::NoPixelData) and [`FrameOutOfRange`](Self::FrameOutOfRange) are about
/// the request or the stored object; [`Unsupported`](Self::Unsupported) means "Kade cannot do
/// this yet" (HTTP 406 / a DIMSE refusal); [`Corrupt`](Self::Corrupt) and
/// [`Decode`](Self::Decode) mean the stored pixel data is damaged or inconsistent;
/// [`Encode`](Self::Encode) should not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PixelError {
    /// The bytes are not a Part 10 file that can be parsed.
    #[error("not a readable DICOM Part 10 file: {0}")]
    NotDicom(String),

    /// The instance has no Pixel Data (7FE0,0010), e.g. a structured report.
    #[error("the instance has no Pixel Data (7FE0,0010)")]
    NoPixelData,

    /// An attribute needed to locate or decode the pixels is missing or unusable.
    #[error("the instance has pixel data but its {0} is missing or unusable")]
    MissingAttribute(&'static str),

    /// The requested frame number is 0 or greater than Number of Frames.
    #[error(
        "frame {requested} does not exist: the instance has {frames} frame(s), numbered from 1"
    )]
    FrameOutOfRange {
        /// The frame asked for (1-based).
        requested: u32,
        /// Number of Frames of the instance.
        frames: u32,
    },

    /// A transfer syntax or pixel layout that Kade cannot decode or render.
    #[error("{0}")]
    Unsupported(String),

    /// The pixel data does not match the attributes that describe it.
    #[error("the pixel data is damaged or inconsistent: {0}")]
    Corrupt(String),

    /// A codec rejected a frame.
    #[error("decompressing frame {frame} ({transfer_syntax}) failed: {reason}")]
    Decode {
        /// The frame (1-based).
        frame: u32,
        /// The transfer syntax name.
        transfer_syntax: String,
        /// What the codec said.
        reason: String,
    },

    /// Writing the output (a Part 10 file or an image) failed.
    #[error("could not write the result: {0}")]
    Encode(String),
}

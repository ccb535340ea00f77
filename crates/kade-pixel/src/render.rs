//! Frames rendered to 8-bit PNG or JPEG for WADO-RS `/rendered` and `/thumbnail`
//! (PS3.18 §8.3.5.1, §10.4.1.1.3): Modality LUT, VOI window, MONOCHROME1 inversion, colour
//! conversion, then scaling to the viewport.

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, RgbImage};

use crate::decode::decode_frame;
use crate::instance::Instance;
use crate::voi::{self, Grey};
use crate::{FrameInfo, PixelError};

/// Output format of [`render`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFormat {
    /// `image/jpeg` (baseline, 4:2:0 for colour).
    #[default]
    Jpeg,
    /// `image/png` (8-bit grey or RGB).
    Png,
}

/// How [`render`] turns a frame into an image.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderOptions {
    /// Window center and width for grey-scale images, in rescaled (Modality LUT) units; `None`
    /// uses the data set's first Window Center/Width, else the frame's minimum and maximum.
    pub window: Option<(f64, f64)>,
    /// Fit the image inside this many columns and rows, keeping its aspect ratio (scaling
    /// up or down); `None` keeps the stored size.
    pub viewport: Option<(u32, u32)>,
    /// Output format.
    pub format: ImageFormat,
    /// JPEG quality, 1..=100 (values outside are clamped); ignored for PNG.
    pub quality: u8,
}

impl Default for RenderOptions {
    /// No window or viewport, JPEG at quality 90.
    fn default() -> Self {
        RenderOptions {
            window: None,
            viewport: None,
            format: ImageFormat::Jpeg,
            quality: 90,
        }
    }
}

/// Renders frame `n` (1-based) to an 8-bit JPEG or PNG.
///
/// Grey-scale (MONOCHROME1/2): stored value → Modality LUT (Rescale Slope/Intercept, also from
/// functional groups) → VOI window (`opts.window`, else the data set's first Window
/// Center/Width with its VOI LUT Function, else the frame's minimum to maximum) → 0..=255,
/// inverted for MONOCHROME1. Colour: RGB as decoded, YBR_FULL and native YBR_FULL_422
/// converted to RGB, PALETTE COLOR looked up; 16-bit colour is narrowed to 8 bits. The
/// image is then scaled into `opts.viewport` with a triangle (bilinear) filter.
///
/// # Errors
/// As [`decoded_frame`](crate::decoded_frame), plus [`PixelError::Unsupported`] for layouts
/// that cannot be shown (32-bit samples, segmented palettes, other colour models) and
/// [`PixelError::Encode`] if the image encoder fails.
pub fn render(part10: &[u8], n: u32, opts: &RenderOptions) -> Result<Vec<u8>, PixelError> {
    let inst = Instance::parse(part10)?;
    let index = inst.frame_index(n)?;
    let (info, frame) = decode_frame(&inst, index)?;
    let img = to_image(&inst, &info, &frame, index, opts.window)?;
    let img = match opts.viewport {
        Some((w, h)) if (w, h) != (img.width(), img.height()) => {
            img.resize(w.max(1), h.max(1), FilterType::Triangle)
        }
        _ => img,
    };
    encode(&img, opts)
}

/// One decoded frame as an 8-bit grey or RGB image.
fn to_image(
    inst: &Instance,
    info: &FrameInfo,
    frame: &[u8],
    index: usize,
    window: Option<(f64, f64)>,
) -> Result<DynamicImage, PixelError> {
    let (w, h) = (u32::from(info.columns), u32::from(info.rows));
    if !matches!(info.bits_allocated, 1 | 8 | 16) {
        return Err(PixelError::Unsupported(format!(
            "{}-bit pixel data (Bits Allocated {}) cannot be rendered",
            info.bits_allocated, info.bits_allocated
        )));
    }
    let pi = info.photometric_interpretation.as_str();
    let data = match (info.samples_per_pixel, pi) {
        (1, "MONOCHROME1" | "MONOCHROME2") => {
            let grey = Grey::for_frame(&inst.obj, info, index, window);
            return Ok(DynamicImage::ImageLuma8(
                GrayImage::from_raw(w, h, grey.render(info, frame)?).ok_or_else(short)?,
            ));
        }
        (1, "PALETTE COLOR") => voi::palette(&inst.obj, info, frame)?,
        (3, "RGB") => voi::rgb(info, frame)?,
        (3, "YBR_FULL") => voi::ybr_full(&voi::rgb(info, frame)?),
        (3, "YBR_FULL_422") if info.bits_allocated == 8 => voi::ybr_full_422(info, frame)?,
        (s, p) => {
            return Err(PixelError::Unsupported(format!(
                "images with {s} sample(s) per pixel in {p} cannot be rendered"
            )));
        }
    };
    Ok(DynamicImage::ImageRgb8(
        RgbImage::from_raw(w, h, data).ok_or_else(short)?,
    ))
}

fn short() -> PixelError {
    PixelError::Corrupt("the frame is shorter than Rows × Columns".into())
}

fn encode(img: &DynamicImage, opts: &RenderOptions) -> Result<Vec<u8>, PixelError> {
    let mut out = Vec::new();
    let result = match opts.format {
        ImageFormat::Png => img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png),
        ImageFormat::Jpeg => img.write_with_encoder(JpegEncoder::new_with_quality(
            &mut out,
            opts.quality.clamp(1, 100),
        )),
    };
    result.map_err(|e| PixelError::Encode(e.to_string()))?;
    Ok(out)
}

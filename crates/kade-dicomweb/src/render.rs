//! WADO-RS `/rendered` and `/thumbnail` (PS3.18 §10.4.1.1.3, §8.3.5.1): a frame turned into
//! an 8-bit JPEG or PNG for display.
//!
//! Grey-scale: stored value → Modality LUT (Rescale Slope/Intercept) → VOI window (the
//! `window=center,width` parameter, else the data set's first Window Center/Width, else the
//! frame's minimum and maximum) with the LINEAR function of PS3.3 §C.11.2.1.2 → 0..255,
//! inverted for MONOCHROME1. Colour: RGB as stored, YBR_FULL converted to RGB. The image is
//! scaled to fit `viewport=width,height` (aspect ratio kept), bilinearly.
//!
//! Frames stored compressed are decoded and rendered by kade-pixel (same pipeline); codecs it
//! lacks (12-bit JPEG, JPEG-LS in a build without the `jpeg-ls` feature…) get 406 with the
//! reason.

use crate::ApiError;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// image/jpeg (the default).
    Jpeg,
    /// image/png.
    Png,
}

impl Format {
    /// The media type.
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
        }
    }
}

/// What the request asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Window center and width.
    pub window: Option<(f64, f64)>,
    /// Fit inside this many columns and rows.
    pub viewport: Option<(u32, u32)>,
    /// JPEG quality, 1..=100.
    pub quality: u8,
    /// Output format.
    pub format: Format,
}

impl Params {
    /// Reads `window`, `viewport` and `quality` from a query string and the format from the
    /// Accept header (image/png, else JPEG).
    ///
    /// # Errors
    /// 400 for unusable values.
    pub fn parse(query: Option<&str>, accept: Option<&str>) -> Result<Params, ApiError> {
        let mut p = Params {
            window: None,
            viewport: None,
            quality: 90,
            format: match accept {
                Some(a) if a.contains("image/png") && !a.contains("image/jpeg") => Format::Png,
                _ => Format::Jpeg,
            },
        };
        let bad = |k: &str, v: &str, what: &str| ApiError::BadRequest(format!("{k}={v:?}: {what}"));
        for pair in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = crate::qido::decode(v)?;
            let nums = || -> Vec<&str> { v.split(',').map(str::trim).collect() };
            match k {
                "window" => {
                    let n = nums();
                    let (c, w) = match (n.first(), n.get(1)) {
                        (Some(c), Some(w)) => (c.parse::<f64>(), w.parse::<f64>()),
                        _ => return Err(bad(k, &v, "expected center,width[,function]")),
                    };
                    match (c, w) {
                        (Ok(c), Ok(w)) if w >= 1.0 => p.window = Some((c, w)),
                        _ => return Err(bad(k, &v, "center and width are numbers, width ≥ 1")),
                    }
                    if let Some(f) = n.get(2) {
                        if !f.eq_ignore_ascii_case("linear") {
                            return Err(bad(k, &v, "only the linear function is supported"));
                        }
                    }
                }
                "viewport" => {
                    let n = nums();
                    match (
                        n.first().and_then(|x| x.parse::<u32>().ok()),
                        n.get(1).and_then(|x| x.parse::<u32>().ok()),
                    ) {
                        (Some(w), Some(h))
                            if (1..=8192).contains(&w) && (1..=8192).contains(&h) =>
                        {
                            p.viewport = Some((w, h));
                        }
                        _ => return Err(bad(k, &v, "expected width,height between 1 and 8192")),
                    }
                }
                "quality" => match v.parse::<u8>() {
                    Ok(q) if (1..=100).contains(&q) => p.quality = q,
                    _ => return Err(bad(k, &v, "quality is 1 to 100")),
                },
                // Known parameters without effect here.
                "annotation" | "charset" | "iccprofile" => {}
                _ => return Err(bad(k, &v, "not a rendering parameter")),
            }
        }
        Ok(p)
    }
}

/// The pixel description of an instance.
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub columns: u32,
    /// Samples per pixel (1 or 3).
    pub samples: u16,
    /// Bits allocated (8 or 16).
    pub bits_allocated: u16,
    /// Bits stored.
    pub bits_stored: u16,
    /// Pixel representation: signed.
    pub signed: bool,
    /// Photometric interpretation.
    pub photometric: String,
    /// Planar configuration: colour-by-plane.
    pub planar: bool,
    /// Rescale slope and intercept.
    pub rescale: (f64, f64),
    /// The data set's first window, if any.
    pub window: Option<(f64, f64)>,
}

/// An 8-bit image: grey (1 channel) or RGB (3).
#[derive(Debug, Clone)]
pub struct Image {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
    /// Channels: 1 or 3.
    pub channels: u8,
    /// Pixels, row by row.
    pub data: Vec<u8>,
}

/// Turns one native frame into an 8-bit image.
///
/// # Errors
/// 406 for layouts Kade does not render (e.g. 32-bit pixels, palette colour).
pub fn to_image(frame: &[u8], l: &Layout, window: Option<(f64, f64)>) -> Result<Image, ApiError> {
    let n = (l.rows as usize) * (l.columns as usize);
    let unsupported = |why: String| ApiError::NotAcceptable(format!("cannot render: {why}"));
    let bytes_per_sample = match l.bits_allocated {
        8 => 1,
        16 => 2,
        b => return Err(unsupported(format!("{b}-bit pixels"))),
    };
    if frame.len() < n * l.samples as usize * bytes_per_sample {
        return Err(unsupported(
            "the frame is shorter than its rows and columns".into(),
        ));
    }
    match (l.samples, l.photometric.as_str()) {
        (1, "MONOCHROME1" | "MONOCHROME2") => {
            let stored = l.bits_stored.clamp(1, l.bits_allocated);
            let mask: u32 = if stored >= 32 {
                u32::MAX
            } else {
                (1u32 << stored) - 1
            };
            let sample = |i: usize| -> f64 {
                let raw = if bytes_per_sample == 1 {
                    u32::from(frame[i])
                } else {
                    u32::from(u16::from_le_bytes([frame[2 * i], frame[2 * i + 1]]))
                } & mask;
                let v = if l.signed && raw & (1 << (stored - 1)) != 0 {
                    i64::from(raw) - (1i64 << stored)
                } else {
                    i64::from(raw)
                };
                v as f64 * l.rescale.0 + l.rescale.1
            };
            let values: Vec<f64> = (0..n).map(sample).collect();
            let (c, w) = match window.or(l.window) {
                Some(cw) => cw,
                None => {
                    let (lo, hi) = values
                        .iter()
                        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                    ((lo + hi) / 2.0 + 0.5, (hi - lo).max(1.0) + 1.0)
                }
            };
            let invert = l.photometric == "MONOCHROME1";
            let data = values
                .iter()
                .map(|&v| {
                    let y = linear(v, c, w);
                    if invert { 255 - y } else { y }
                })
                .collect();
            Ok(Image {
                width: l.columns,
                height: l.rows,
                channels: 1,
                data,
            })
        }
        (3, "RGB" | "YBR_FULL") if bytes_per_sample == 1 => {
            let mut data = Vec::with_capacity(n * 3);
            for i in 0..n {
                let px = if l.planar {
                    [frame[i], frame[n + i], frame[2 * n + i]]
                } else {
                    [frame[3 * i], frame[3 * i + 1], frame[3 * i + 2]]
                };
                if l.photometric == "YBR_FULL" {
                    let (y, cb, cr) = (f64::from(px[0]), f64::from(px[1]), f64::from(px[2]));
                    let to = |v: f64| v.round().clamp(0.0, 255.0) as u8;
                    data.extend_from_slice(&[
                        to(y + 1.402 * (cr - 128.0)),
                        to(y - 0.344_136 * (cb - 128.0) - 0.714_136 * (cr - 128.0)),
                        to(y + 1.772 * (cb - 128.0)),
                    ]);
                } else {
                    data.extend_from_slice(&px);
                }
            }
            Ok(Image {
                width: l.columns,
                height: l.rows,
                channels: 3,
                data,
            })
        }
        (s, p) => Err(unsupported(format!("{s} samples per pixel, {p}"))),
    }
}

/// The LINEAR VOI function of PS3.3 §C.11.2.1.2.1, to 0..=255.
pub fn linear(x: f64, c: f64, w: f64) -> u8 {
    let lo = c - 0.5 - (w - 1.0) / 2.0;
    let hi = c - 0.5 + (w - 1.0) / 2.0;
    if x <= lo {
        0
    } else if x > hi {
        255
    } else {
        (((x - (c - 0.5)) / (w - 1.0) + 0.5) * 255.0)
            .round()
            .clamp(0.0, 255.0) as u8
    }
}

/// Scales `img` to fit inside `(w, h)`, keeping its aspect ratio (bilinear).
pub fn fit(img: Image, (vw, vh): (u32, u32)) -> Image {
    let scale = (f64::from(vw) / f64::from(img.width)).min(f64::from(vh) / f64::from(img.height));
    let (w, h) = (
        ((f64::from(img.width) * scale).round() as u32).max(1),
        ((f64::from(img.height) * scale).round() as u32).max(1),
    );
    if (w, h) == (img.width, img.height) {
        return img;
    }
    let ch = img.channels as usize;
    let mut data = Vec::with_capacity(w as usize * h as usize * ch);
    let sx = f64::from(img.width) / f64::from(w);
    let sy = f64::from(img.height) / f64::from(h);
    let at =
        |x: usize, y: usize, c: usize| f64::from(img.data[(y * img.width as usize + x) * ch + c]);
    for y in 0..h {
        let fy = ((f64::from(y) + 0.5) * sy - 0.5).clamp(0.0, f64::from(img.height - 1));
        let (y0, ty) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(img.height as usize - 1);
        for x in 0..w {
            let fx = ((f64::from(x) + 0.5) * sx - 0.5).clamp(0.0, f64::from(img.width - 1));
            let (x0, tx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(img.width as usize - 1);
            for c in 0..ch {
                let top = at(x0, y0, c) * (1.0 - tx) + at(x1, y0, c) * tx;
                let bottom = at(x0, y1, c) * (1.0 - tx) + at(x1, y1, c) * tx;
                data.push((top * (1.0 - ty) + bottom * ty).round() as u8);
            }
        }
    }
    Image {
        width: w,
        height: h,
        channels: img.channels,
        data,
    }
}

/// Encodes `img` as JPEG or PNG.
///
/// # Errors
/// 500 when the encoder fails (it should not for a well-formed image).
pub fn encode(img: &Image, format: Format, quality: u8) -> Result<Vec<u8>, ApiError> {
    let internal = |e: String| ApiError::Internal(format!("image encoding: {e}"));
    let mut out = Vec::new();
    match format {
        Format::Png => {
            let mut enc = png::Encoder::new(&mut out, img.width, img.height);
            enc.set_color(if img.channels == 1 {
                png::ColorType::Grayscale
            } else {
                png::ColorType::Rgb
            });
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().map_err(|e| internal(e.to_string()))?;
            w.write_image_data(&img.data)
                .map_err(|e| internal(e.to_string()))?;
        }
        Format::Jpeg => {
            let (w, h) = (
                u16::try_from(img.width).map_err(|_| internal("too wide for JPEG".into()))?,
                u16::try_from(img.height).map_err(|_| internal("too tall for JPEG".into()))?,
            );
            let enc = jpeg_encoder::Encoder::new(&mut out, quality);
            let ct = if img.channels == 1 {
                jpeg_encoder::ColorType::Luma
            } else {
                jpeg_encoder::ColorType::Rgb
            };
            enc.encode(&img.data, w, h, ct)
                .map_err(|e| internal(e.to_string()))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_follows_the_standard() {
        // Center 40, width 400: -160 and below black, 240 and above white.
        assert_eq!(linear(-161.0, 40.0, 400.0), 0);
        assert_eq!(linear(240.0, 40.0, 400.0), 255);
        assert_eq!(linear(39.5, 40.0, 400.0), 128);
    }

    #[test]
    fn signed_16_bit_with_rescale_and_monochrome1() {
        let l = Layout {
            rows: 1,
            columns: 3,
            samples: 1,
            bits_allocated: 16,
            bits_stored: 12,
            signed: true,
            photometric: "MONOCHROME1".into(),
            planar: false,
            rescale: (1.0, -1024.0),
            window: None,
        };
        // 12-bit signed: 0x0FFF is -1; values -1, 0, 1024 (+ intercept -1024).
        let frame: Vec<u8> = [0x0FFFu16, 0, 1024]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let img = to_image(&frame, &l, Some((-512.0, 1024.0))).unwrap();
        // -1025 → black → inverted white; -1024 → black (inverted: white); 0 → white → 0.
        assert_eq!(img.data, vec![255, 255, 0]);
    }

    #[test]
    fn fit_keeps_the_aspect_ratio() {
        let img = Image {
            width: 4,
            height: 2,
            channels: 1,
            data: vec![0, 0, 255, 255, 0, 0, 255, 255],
        };
        let out = fit(img, (2, 2));
        assert_eq!((out.width, out.height), (2, 1));
        assert_eq!(out.data, vec![0, 255]);
    }

    #[test]
    fn parameters() {
        let p = Params::parse(
            Some("window=40,400,linear&viewport=128,128&quality=70"),
            Some("image/png"),
        )
        .unwrap();
        assert_eq!(p.window, Some((40.0, 400.0)));
        assert_eq!(p.viewport, Some((128, 128)));
        assert_eq!(p.quality, 70);
        assert_eq!(p.format, Format::Png);
        assert!(Params::parse(Some("window=40"), None).is_err());
        assert!(Params::parse(Some("quality=0"), None).is_err());
        assert!(Params::parse(Some("viewport=0,10"), None).is_err());
        assert_eq!(
            Params::parse(None, Some("*/*")).unwrap().format,
            Format::Jpeg
        );
    }
}

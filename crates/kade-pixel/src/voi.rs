//! Pixel value transformations for display: the Modality LUT and VOI LUT functions
//! (PS3.3 §C.11.1, §C.11.2.1.2), palette colour lookup (§C.7.6.3.1.5) and YBR_FULL to RGB
//! (§C.7.6.3.1.2).

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::instance::{find_for_frame, le_bytes};
use crate::{FrameInfo, PixelError};

/// A VOI LUT function with its window, mapping rescaled values to 0.0..=255.0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Voi {
    /// LINEAR (§C.11.2.1.2.1); the width is at least 1.
    Linear { center: f64, width: f64 },
    /// LINEAR_EXACT (§C.11.2.1.3.2).
    LinearExact { center: f64, width: f64 },
    /// SIGMOID (§C.11.2.1.3.1).
    Sigmoid { center: f64, width: f64 },
}

impl Voi {
    /// The function named by VOI LUT Function (LINEAR when absent or unknown); LINEAR with a
    /// width below 1 becomes LINEAR_EXACT, which is defined for it.
    pub fn new(function: &str, center: f64, width: f64) -> Voi {
        match function {
            "SIGMOID" if width > 0.0 => Voi::Sigmoid { center, width },
            "LINEAR_EXACT" => Voi::LinearExact { center, width },
            _ if width < 1.0 => Voi::LinearExact { center, width },
            _ => Voi::Linear { center, width },
        }
    }

    /// `x` mapped to 0.0..=255.0.
    pub fn apply(self, x: f64) -> f64 {
        const Y_MAX: f64 = 255.0;
        match self {
            Voi::Linear {
                center: c,
                width: w,
            } => {
                if x <= c - 0.5 - (w - 1.0) / 2.0 {
                    0.0
                } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                    Y_MAX
                } else {
                    ((x - (c - 0.5)) / (w - 1.0) + 0.5) * Y_MAX
                }
            }
            Voi::LinearExact {
                center: c,
                width: w,
            } => {
                if x <= c - w / 2.0 {
                    0.0
                } else if x > c + w / 2.0 {
                    Y_MAX
                } else {
                    ((x - c) / w + 0.5) * Y_MAX
                }
            }
            Voi::Sigmoid {
                center: c,
                width: w,
            } => Y_MAX / (1.0 + (-4.0 * (x - c) / w).exp()),
        }
    }
}

/// The grey-scale pipeline of one frame: Modality LUT, VOI, polarity.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Grey {
    slope: f64,
    intercept: f64,
    /// `None`: the frame's minimum to maximum.
    voi: Option<Voi>,
    invert: bool,
}

impl Grey {
    /// Reads the rescale and window of frame `index`; an explicit `window` (center, width)
    /// takes precedence over the data set's (LINEAR function).
    pub fn for_frame(
        obj: &InMemDicomObject,
        info: &FrameInfo,
        index: usize,
        window: Option<(f64, f64)>,
    ) -> Grey {
        let first = |tag: Tag| {
            find_for_frame(obj, tag, index)
                .and_then(|e| e.to_multi_float64().ok())
                .and_then(|v| v.first().copied())
                .filter(|v| v.is_finite())
        };
        let function = find_for_frame(obj, tags::VOILUT_FUNCTION, index)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_uppercase())
            .unwrap_or_default();
        let voi = match window {
            Some((center, width)) => Some(Voi::new("LINEAR", center, width)),
            None => match (first(tags::WINDOW_CENTER), first(tags::WINDOW_WIDTH)) {
                (Some(center), Some(width)) if width > 0.0 => {
                    Some(Voi::new(&function, center, width))
                }
                _ => None,
            },
        };
        Grey {
            slope: first(tags::RESCALE_SLOPE)
                .filter(|s| *s != 0.0)
                .unwrap_or(1.0),
            intercept: first(tags::RESCALE_INTERCEPT).unwrap_or(0.0),
            voi,
            invert: info.photometric_interpretation == "MONOCHROME1",
        }
    }

    /// One 8-bit grey value per pixel.
    ///
    /// # Errors
    /// [`PixelError::Corrupt`] when the frame is shorter than Rows × Columns.
    pub fn render(&self, info: &FrameInfo, frame: &[u8]) -> Result<Vec<u8>, PixelError> {
        let values: Vec<f64> = stored_values(info, frame)?
            .into_iter()
            .map(|v| v as f64 * self.slope + self.intercept)
            .collect();
        let voi = self.voi.unwrap_or_else(|| {
            let (lo, hi) = values
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            Voi::LinearExact {
                center: (lo + hi) / 2.0,
                width: hi - lo,
            }
        });
        Ok(values
            .into_iter()
            .map(|v| {
                let y = voi.apply(v).round().clamp(0.0, 255.0) as u8;
                if self.invert { 255 - y } else { y }
            })
            .collect())
    }
}

/// The stored values of a one-sample frame: masked to Bits Stored, sign-extended when Pixel
/// Representation is 1.
pub(crate) fn stored_values(info: &FrameInfo, frame: &[u8]) -> Result<Vec<i64>, PixelError> {
    let n = usize::from(info.rows) * usize::from(info.columns);
    let short = || PixelError::Corrupt("the frame is shorter than Rows × Columns".into());
    if info.bits_allocated == 1 {
        if frame.len() < n.div_ceil(8) {
            return Err(short());
        }
        return Ok((0..n)
            .map(|i| i64::from((frame[i / 8] >> (i % 8)) & 1))
            .collect());
    }
    let bytes = usize::from(info.bits_allocated / 8);
    if frame.len() < n * bytes {
        return Err(short());
    }
    let stored = u32::from(info.bits_stored.clamp(1, info.bits_allocated));
    let mask = (1u64 << stored) - 1;
    let signed = info.pixel_representation == 1;
    Ok((0..n)
        .map(|i| {
            let raw = match bytes {
                1 => u64::from(frame[i]),
                _ => u64::from(u16::from_le_bytes([frame[2 * i], frame[2 * i + 1]])),
            } & mask;
            if signed && raw >> (stored - 1) & 1 == 1 {
                raw as i64 - (1i64 << stored)
            } else {
                raw as i64
            }
        })
        .collect())
}

/// Interleaved 8-bit RGB from a 3-sample frame (either planar configuration, 8 or 16 bits).
pub(crate) fn rgb(info: &FrameInfo, frame: &[u8]) -> Result<Vec<u8>, PixelError> {
    let n = usize::from(info.rows) * usize::from(info.columns);
    let bytes = usize::from(info.bits_allocated / 8);
    if frame.len() < 3 * n * bytes {
        return Err(PixelError::Corrupt(
            "the frame is shorter than Rows × Columns × 3".into(),
        ));
    }
    let shift = info.bits_stored.saturating_sub(8);
    let sample = |k: usize| -> u8 {
        match bytes {
            1 => frame[k],
            _ => (u16::from_le_bytes([frame[2 * k], frame[2 * k + 1]]) >> shift).min(255) as u8,
        }
    };
    Ok((0..3 * n)
        .map(|k| {
            let (pixel, channel) = (k / 3, k % 3);
            sample(if info.planar_configuration == 1 {
                channel * n + pixel
            } else {
                k
            })
        })
        .collect())
}

/// YBR_FULL → RGB, in place of each interleaved triple.
pub(crate) fn ybr_full(ybr: &[u8]) -> Vec<u8> {
    ybr.chunks_exact(3)
        .flat_map(|p| ybr_to_rgb(p[0], p[1], p[2]))
        .collect()
}

fn ybr_to_rgb(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let (y, cb, cr) = (f64::from(y), f64::from(cb) - 128.0, f64::from(cr) - 128.0);
    let to = |v: f64| v.round().clamp(0.0, 255.0) as u8;
    [
        to(y + 1.402 * cr),
        to(y - 0.344_136 * cb - 0.714_136 * cr),
        to(y + 1.772 * cb),
    ]
}

/// Native YBR_FULL_422 (Y1 Y2 Cb Cr for each pair of pixels in a row) → RGB.
pub(crate) fn ybr_full_422(info: &FrameInfo, frame: &[u8]) -> Result<Vec<u8>, PixelError> {
    let (rows, cols) = (usize::from(info.rows), usize::from(info.columns));
    if cols % 2 == 1 || frame.len() < rows * cols * 2 {
        return Err(PixelError::Corrupt(
            "YBR_FULL_422 data needs an even number of columns and 2 bytes per pixel".into(),
        ));
    }
    Ok(frame[..rows * cols * 2]
        .chunks_exact(4)
        .flat_map(|q| {
            let (a, b) = (ybr_to_rgb(q[0], q[2], q[3]), ybr_to_rgb(q[1], q[2], q[3]));
            [a, b].concat()
        })
        .collect())
}

/// PALETTE COLOR → RGB through the Red/Green/Blue Palette Color Lookup Tables.
pub(crate) fn palette(
    obj: &InMemDicomObject,
    info: &FrameInfo,
    frame: &[u8],
) -> Result<Vec<u8>, PixelError> {
    let channels = [
        (
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::RED_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::GREEN_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
        (
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DESCRIPTOR,
            tags::BLUE_PALETTE_COLOR_LOOKUP_TABLE_DATA,
        ),
    ];
    let luts = channels
        .iter()
        .map(|&(d, t)| lut(obj, d, t))
        .collect::<Result<Vec<_>, _>>()?;
    let mut plain = info.clone();
    plain.pixel_representation = 0;
    plain.bits_stored = info.bits_allocated;
    let values = stored_values(&plain, frame)?;
    Ok(values
        .iter()
        .flat_map(|&v| {
            luts.iter().map(move |(first, table)| {
                let i = (v - first).clamp(0, table.len() as i64 - 1) as usize;
                table[i]
            })
        })
        .collect())
}

/// One palette channel: its first mapped value and 8-bit entries.
fn lut(obj: &InMemDicomObject, descriptor: Tag, data: Tag) -> Result<(i64, Vec<u8>), PixelError> {
    let missing = || PixelError::MissingAttribute("Palette Color Lookup Table Descriptor");
    let d: Vec<i64> = obj
        .get(descriptor)
        .and_then(|e| e.to_multi_int::<i64>().ok())
        .filter(|d| d.len() == 3)
        .ok_or_else(missing)?;
    let entries = if d[0] == 0 {
        65_536
    } else {
        (d[0] & 0xFFFF) as usize
    };
    let first = d[1] & 0xFFFF;
    let Some(value) = obj.get(data).and_then(|e| e.value().primitive()) else {
        return Err(PixelError::Unsupported(
            "segmented palette colour lookup tables cannot be rendered".into(),
        ));
    };
    let bytes = le_bytes(value, false)?;
    let table: Vec<u8> = if d[2] == 16 || bytes.len() >= 2 * entries {
        bytes
            .chunks_exact(2)
            .take(entries)
            .map(|w| {
                let v = u16::from_le_bytes([w[0], w[1]]);
                if d[2] == 16 { (v >> 8) as u8 } else { v as u8 }
            })
            .collect()
    } else {
        bytes.iter().take(entries).copied().collect()
    };
    if table.is_empty() {
        return Err(PixelError::Corrupt(
            "a palette colour lookup table is empty".into(),
        ));
    }
    Ok((first, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_window_follows_the_standard() {
        let v = Voi::new("", 40.0, 400.0);
        assert_eq!(v.apply(-160.5), 0.0);
        assert_eq!(v.apply(239.5), 255.0);
        assert!((v.apply(39.5) - 127.5).abs() < 1e-9);
        // Width below 1 is served by LINEAR_EXACT.
        assert!(matches!(
            Voi::new("LINEAR", 0.0, 0.5),
            Voi::LinearExact { .. }
        ));
    }

    #[test]
    fn signed_12_bit_values_are_sign_extended() {
        let info = FrameInfo {
            transfer_syntax: String::new(),
            encapsulated: false,
            number_of_frames: 1,
            rows: 1,
            columns: 3,
            samples_per_pixel: 1,
            bits_allocated: 16,
            bits_stored: 12,
            pixel_representation: 1,
            photometric_interpretation: "MONOCHROME1".into(),
            planar_configuration: 0,
        };
        // -1 in 12 bits with other data in the 4 unused high bits, then 0 and 1024.
        let frame: Vec<u8> = [0xAFFFu16, 0, 1024]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(stored_values(&info, &frame).unwrap(), vec![-1, 0, 1024]);
        let grey = Grey {
            slope: 1.0,
            intercept: -1024.0,
            voi: Some(Voi::new("LINEAR", -512.0, 1024.0)),
            invert: true,
        };
        assert_eq!(grey.render(&info, &frame).unwrap(), vec![255, 255, 0]);
    }

    #[test]
    fn ybr_grey_stays_grey() {
        assert_eq!(ybr_to_rgb(100, 128, 128), [100, 100, 100]);
    }
}

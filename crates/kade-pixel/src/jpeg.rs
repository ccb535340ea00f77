//! JPEG frames (PS3.5 §8.2.1, §A.4.1): decoded with `jpeg-decoder`, choosing the colour
//! transform from the bitstream's own markers when it has them and from the Photometric
//! Interpretation when it does not, as DCMTK does.

use jpeg_decoder::{ColorTransform, Decoder, PixelFormat, UnsupportedFeature};

use crate::{FrameInfo, PixelError};

/// What the header segments before the first scan say.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Header {
    /// A JFIF APP0 segment is present (the data is YCbCr).
    pub jfif: bool,
    /// The transform flag of an Adobe APP14 segment, if present.
    pub adobe: Option<u8>,
    /// The SOF marker (0xC0 baseline, 0xC1 extended, 0xC3 lossless…).
    pub sof: u8,
    /// Sample precision in bits.
    pub precision: u8,
}

/// Reads the header segments up to the first SOS (or gives up quietly on malformed data,
/// leaving the decoder to report it).
pub(crate) fn header(data: &[u8]) -> Header {
    let mut h = Header::default();
    let mut i = 2; // after SOI
    while i + 4 <= data.len() {
        if data[i] != 0xFF {
            break;
        }
        let marker = data[i + 1];
        if marker == 0xFF {
            i += 1; // fill byte
            continue;
        }
        let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
        let payload = data.get(i + 4..i + 2 + len).unwrap_or_default();
        match marker {
            0xE0 if payload.starts_with(b"JFIF\0") => h.jfif = true,
            0xEE if payload.starts_with(b"Adobe") => h.adobe = payload.get(11).copied(),
            0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                h.sof = marker;
                h.precision = payload.first().copied().unwrap_or(0);
            }
            0xDA => break,
            _ => {}
        }
        i += 2 + len;
    }
    h
}

/// Decodes one JPEG frame to native little-endian samples, colour interleaved.
///
/// # Errors
/// [`PixelError::Unsupported`] for 12-bit lossy, arithmetic or hierarchical JPEG and layouts
/// that do not match the attributes; [`PixelError::Decode`] when the bitstream is damaged.
pub(crate) fn decode(
    data: &[u8],
    info: &FrameInfo,
    frame: u32,
    ts_name: &str,
) -> Result<Vec<u8>, PixelError> {
    let h = header(data);
    let mut d = Decoder::new(data);
    if info.samples_per_pixel == 3 && h.adobe.is_none() && !h.jfif {
        // No marker says how the components are coded: the Photometric Interpretation does.
        d.set_color_transform(if info.photometric_interpretation.starts_with("YBR") {
            ColorTransform::YCbCr
        } else {
            ColorTransform::RGB
        });
    }
    let failed = |e: jpeg_decoder::Error| match e {
        jpeg_decoder::Error::Unsupported(f) => PixelError::Unsupported(unsupported(&f, &h, info)),
        other => PixelError::Decode {
            frame,
            transfer_syntax: ts_name.to_owned(),
            reason: other.to_string(),
        },
    };
    let pixels = d.decode().map_err(failed)?;
    let got = d
        .info()
        .ok_or_else(|| failed(jpeg_decoder::Error::Format("no frame header".into())))?;
    if (got.width, got.height) != (info.columns, info.rows) {
        return Err(PixelError::Corrupt(format!(
            "frame {frame} is a {}×{} JPEG image but Columns×Rows is {}×{}",
            got.width, got.height, info.columns, info.rows
        )));
    }
    let (spp, bytes) = match got.pixel_format {
        PixelFormat::L8 => (1, 1),
        PixelFormat::L16 => (1, 2),
        PixelFormat::RGB24 => (3, 1),
        PixelFormat::CMYK32 => (4, 1),
    };
    let wanted = usize::from(info.bits_allocated).div_ceil(8);
    if spp != info.samples_per_pixel || bytes > wanted {
        return Err(PixelError::Unsupported(format!(
            "frame {frame} is a JPEG image with {spp} component(s) of {} bits, which does not fit \
             Samples per Pixel {} and Bits Allocated {}",
            h.precision, info.samples_per_pixel, info.bits_allocated
        )));
    }
    Ok(match (bytes, wanted) {
        // jpeg-decoder returns 16-bit samples in native byte order.
        (2, 2) => pixels
            .chunks_exact(2)
            .flat_map(|c| u16::from_ne_bytes([c[0], c[1]]).to_le_bytes())
            .collect(),
        // 8-bit samples in a 16-bit container.
        (1, 2) => pixels.iter().flat_map(|&b| [b, 0]).collect(),
        _ => pixels,
    })
}

fn unsupported(f: &UnsupportedFeature, h: &Header, info: &FrameInfo) -> String {
    match f {
        UnsupportedFeature::SamplePrecision(p) if h.sof == 0xC1 || h.sof == 0xC0 => {
            format!("JPEG Extended {p}-bit is not supported for decompression")
        }
        UnsupportedFeature::SamplePrecision(p) => {
            format!("JPEG with {p}-bit samples is not supported for decompression")
        }
        UnsupportedFeature::ArithmeticEntropyCoding => {
            "JPEG with arithmetic coding is not supported for decompression".into()
        }
        UnsupportedFeature::Hierarchical => {
            "hierarchical JPEG is not supported for decompression".into()
        }
        other => format!(
            "this JPEG image ({} component(s), {}) uses a feature Kade cannot decompress: {other:?}",
            info.samples_per_pixel, info.photometric_interpretation
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_reads_markers_and_precision() {
        let mut j = vec![0xFF, 0xD8];
        j.extend([0xFF, 0xE0, 0, 7]);
        j.extend(b"JFIF\0");
        j.extend([0xFF, 0xEE, 0, 14]);
        j.extend(b"Adobe");
        j.extend([0, 100, 0, 0, 0, 0, 0]);
        j.extend([0xFF, 0xC1, 0, 8, 12, 0, 1, 0, 1, 1]);
        j.extend([0xFF, 0xDA, 0, 2]);
        let h = header(&j);
        assert!(h.jfif);
        assert_eq!(h.adobe, Some(0));
        assert_eq!((h.sof, h.precision), (0xC1, 12));
    }
}

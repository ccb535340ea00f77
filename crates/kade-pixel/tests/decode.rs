//! Decoding checked against references that other software made: the pydicom test files.
//! Lossless syntaxes must give back exactly the pixels of the uncompressed reference (or the
//! values pydicom decodes); lossy JPEG the reference colour bands within a small tolerance.

use kade_pixel::{ImageFormat, RenderOptions, decoded_frame, render, stored_frame, to_explicit_le};

fn file(name: &str) -> Vec<u8> {
    std::fs::read(kade_testkit::testdata_dir().join("pydicom").join(name)).unwrap()
}

/// The colour bands of the pydicom SC_rgb test image at column 50, rows 5, 15, … 95, as
/// pydicom decodes the RLE file (8-bit samples).
const BANDS: [[u8; 3]; 10] = [
    [255, 0, 0],
    [255, 128, 128],
    [0, 255, 0],
    [128, 255, 128],
    [0, 0, 255],
    [128, 128, 255],
    [0, 0, 0],
    [64, 64, 64],
    [192, 192, 192],
    [255, 255, 255],
];

fn rgb_at(px: &[u8], columns: usize, row: usize, col: usize) -> [u8; 3] {
    let i = (row * columns + col) * 3;
    [px[i], px[i + 1], px[i + 2]]
}

#[test]
fn rle_jpeg2000_and_jpeg_ls_lossless_give_back_the_uncompressed_pixels() {
    let (_, reference) = decoded_frame(&file("MR_small.dcm"), 1).unwrap();
    assert_eq!(reference.len(), 64 * 64 * 2);
    let mut files = vec!["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"];
    if cfg!(feature = "jpeg-ls") {
        files.push("MR_small_jpeg_ls_lossless.dcm");
    }
    for f in files {
        let (info, px) = decoded_frame(&file(f), 1).unwrap();
        assert!(info.encapsulated, "{f} is stored compressed");
        assert_eq!(info.photometric_interpretation, "MONOCHROME2");
        assert!(
            px == reference,
            "{f}: decoded pixels differ from MR_small.dcm"
        );
    }
}

#[test]
fn rle_colour_decodes_to_the_reference_bands() {
    let (info, px) = decoded_frame(&file("SC_rgb_rle.dcm"), 1).unwrap();
    assert_eq!(
        (info.rows, info.columns, info.planar_configuration),
        (100, 100, 0)
    );
    for (k, band) in BANDS.iter().enumerate() {
        assert_eq!(&rgb_at(&px, 100, 5 + 10 * k, 50), band, "band {k}");
    }
    // The second frame of the two-frame file is the inverted image.
    let (_, px) = decoded_frame(&file("SC_rgb_rle_2frame.dcm"), 2).unwrap();
    assert_eq!(rgb_at(&px, 100, 5, 50), [0, 255, 255]);
    assert_eq!(rgb_at(&px, 100, 75, 50), [191, 191, 191]);
    // 16-bit samples, little endian.
    let (_, px) = decoded_frame(&file("SC_rgb_rle_16bit.dcm"), 1).unwrap();
    let at = |row: usize, s: usize| {
        let i = ((row * 100 + 50) * 3 + s) * 2;
        u16::from_le_bytes([px[i], px[i + 1]])
    };
    assert_eq!((at(15, 0), at(15, 1), at(15, 2)), (65535, 32896, 32896));
    assert!(matches!(
        decoded_frame(&file("SC_rgb_rle_2frame.dcm"), 3),
        Err(kade_pixel::PixelError::FrameOutOfRange { .. })
    ));
}

#[test]
fn lossy_jpeg_in_ybr_decodes_to_rgb_close_to_the_bands() {
    for f in [
        "SC_rgb_jpeg_dcmtk.dcm",
        "SC_rgb_dcmtk_+eb+cy+np.dcm",
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",
        "SC_rgb_jpeg_lossy_gdcm.dcm",
    ] {
        let (info, px) = decoded_frame(&file(f), 1).unwrap();
        assert_eq!(info.photometric_interpretation, "RGB", "{f}");
        for (k, band) in BANDS.iter().enumerate() {
            let got = rgb_at(&px, 100, 5 + 10 * k, 50);
            for s in 0..3 {
                assert!(
                    (i16::from(got[s]) - i16::from(band[s])).abs() <= 8,
                    "{f} band {k}: {got:?} vs {band:?}"
                );
            }
        }
    }
}

#[test]
fn stored_frames_are_the_compressed_bytes() {
    let (info, bytes) = stored_frame(&file("SC_rgb_jpeg_dcmtk.dcm"), 1).unwrap();
    assert!(info.encapsulated);
    assert_eq!(&bytes[..2], &[0xFF, 0xD8], "a JPEG stream starts with SOI");
}

#[test]
fn compressed_instances_are_re_encoded_to_explicit_vr_little_endian() {
    let out = to_explicit_le(&file("MR_small_RLE.dcm")).unwrap();
    let (info, px) = decoded_frame(&out, 1).unwrap();
    assert_eq!(info.transfer_syntax, "1.2.840.10008.1.2.1");
    assert!(!info.encapsulated);
    let (_, reference) = decoded_frame(&file("MR_small.dcm"), 1).unwrap();
    assert!(px == reference);
    let out = to_explicit_le(&file("SC_rgb_jpeg_dcmtk.dcm")).unwrap();
    let (info, _) = decoded_frame(&out, 1).unwrap();
    assert_eq!(info.photometric_interpretation, "RGB");
    assert_eq!(&out[128..132], b"DICM");
}

#[cfg(feature = "jpeg-ls")]
#[test]
fn jpeg_ls_is_re_encoded_to_explicit_vr_little_endian() {
    // Lossless: exactly the uncompressed reference's pixels.
    let out = to_explicit_le(&file("MR_small_jpeg_ls_lossless.dcm")).unwrap();
    let (info, px) = decoded_frame(&out, 1).unwrap();
    assert_eq!(info.transfer_syntax, "1.2.840.10008.1.2.1");
    let (_, reference) = decoded_frame(&file("MR_small.dcm"), 1).unwrap();
    assert!(
        px == reference,
        "JPEG-LS lossless differs from MR_small.dcm"
    );
    // Near-lossless (8 and 16 bits): decoded to the declared size (no reference pixels
    // here), and the re-encoded instance says it was lossy-compressed, and how.
    for (f, bits) in [
        ("JPEGLSNearLossless_08.dcm", 8u16),
        ("JPEGLSNearLossless_16.dcm", 16),
    ] {
        let (info, px) = decoded_frame(&file(f), 1).unwrap();
        assert_eq!(info.bits_allocated, bits, "{f}");
        let expected = usize::from(info.rows) * usize::from(info.columns) * usize::from(bits / 8);
        assert_eq!(px.len(), expected, "{f}");
        assert!(px.iter().any(|&b| b != 0), "{f}: all zero");
        let out = to_explicit_le(&file(f)).unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("ISO_14495_1"), "{f}: not marked lossy");
    }
}

#[test]
fn unsupported_codecs_say_so() {
    // 12-bit JPEG Extended: jpeg-decoder reads 8-bit samples only.
    let e = decoded_frame(&file("JPGExtended.dcm"), 1).unwrap_err();
    assert!(matches!(e, kade_pixel::PixelError::Unsupported(_)), "{e}");
    assert!(to_explicit_le(&file("JPGExtended.dcm")).is_err());
    // JPEG-LS in a build without CharLS.
    if !cfg!(feature = "jpeg-ls") {
        let e = decoded_frame(&file("MR_small_jpeg_ls_lossless.dcm"), 1).unwrap_err();
        assert!(matches!(e, kade_pixel::PixelError::Unsupported(_)), "{e}");
    }
}

#[test]
fn compressed_frames_render_to_png_and_jpeg() {
    let png = render(
        &file("MR_small_jp2klossless.dcm"),
        1,
        &RenderOptions {
            format: ImageFormat::Png,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let jpeg = render(
        &file("SC_rgb_rle.dcm"),
        1,
        &RenderOptions {
            viewport: Some((50, 50)),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
}

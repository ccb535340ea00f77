//! Generated test data.

use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{InMemDicomObject, meta::FileMetaTableBuilder};

/// CT Image Storage.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";

/// What [`ct_study`] generates.
#[derive(Debug, Clone)]
pub struct CtSpec {
    /// Study Instance UID (and the root of the other UIDs).
    pub study_uid: String,
    /// Patient ID.
    pub patient_id: String,
    /// Patient name (non-ASCII is fine: the files use ISO_IR 192).
    pub patient_name: String,
    /// Number of series.
    pub series: usize,
    /// Instances per series.
    pub per_series: usize,
    /// Matrix size (rows = columns).
    pub size: u16,
    /// Patient's Birth Date.
    pub birth_date: String,
    /// Issuer of Patient ID, if any.
    pub issuer: Option<String>,
    /// Other Patient IDs Sequence items: (Patient ID, Issuer of Patient ID), e.g. a BSN with
    /// issuer `NLMINBIZA`.
    pub other_patient_ids: Vec<(String, String)>,
}

impl CtSpec {
    /// A small study under a random UID root.
    pub fn small(series: usize, per_series: usize) -> Self {
        let r: u64 = rand::random::<u64>() % 1_000_000_000_000;
        CtSpec {
            study_uid: format!("2.25.{r}"),
            patient_id: format!("PID{}", r % 100_000),
            patient_name: "Müller^Jürgen".into(),
            series,
            per_series,
            size: 64,
            birth_date: "19700101".into(),
            issuer: None,
            other_patient_ids: Vec::new(),
        }
    }
}

/// Writes a multi-series CT study (16-bit, Explicit VR Little Endian, ISO_IR 192) into
/// `dir` and returns the file paths.
///
/// # Panics
/// If a file cannot be written.
pub fn ct_study(dir: &Path, spec: &CtSpec) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut files = Vec::new();
    for s in 0..spec.series {
        let series_uid = format!("{}.{}", spec.study_uid, s + 1);
        for i in 0..spec.per_series {
            let sop_uid = format!("{series_uid}.{}", i + 1);
            let obj = ct_instance(spec, &series_uid, &sop_uid, s, i);
            let meta = FileMetaTableBuilder::new()
                .media_storage_sop_class_uid(CT_IMAGE_STORAGE)
                .media_storage_sop_instance_uid(sop_uid.as_str())
                .transfer_syntax(EXPLICIT_VR_LE)
                .implementation_class_uid("2.25.1")
                .build()
                .unwrap();
            let path = dir.join(format!("s{s}_i{i}.dcm"));
            obj.with_exact_meta(meta).write_to_file(&path).unwrap();
            files.push(path);
        }
    }
    files
}

fn ct_instance(
    spec: &CtSpec,
    series_uid: &str,
    sop_uid: &str,
    s: usize,
    i: usize,
) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    let mut put = |tag, vr, v: PrimitiveValue| {
        o.put(DataElement::new(tag, vr, v));
    };
    put(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192".into());
    put(tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE.into());
    put(tags::SOP_INSTANCE_UID, VR::UI, sop_uid.into());
    put(tags::STUDY_DATE, VR::DA, "20261122".into());
    put(tags::STUDY_TIME, VR::TM, "101500".into());
    put(tags::ACCESSION_NUMBER, VR::SH, "ACC0001".into());
    put(tags::MODALITY, VR::CS, "CT".into());
    put(tags::STUDY_DESCRIPTION, VR::LO, "CT Thorax".into());
    put(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        format!("Series {}", s + 1).into(),
    );
    put(
        tags::PATIENT_NAME,
        VR::PN,
        spec.patient_name.as_str().into(),
    );
    put(tags::PATIENT_ID, VR::LO, spec.patient_id.as_str().into());
    put(
        tags::PATIENT_BIRTH_DATE,
        VR::DA,
        spec.birth_date.as_str().into(),
    );
    if let Some(issuer) = &spec.issuer {
        put(tags::ISSUER_OF_PATIENT_ID, VR::LO, issuer.as_str().into());
    }
    put(tags::PATIENT_SEX, VR::CS, "M".into());
    put(tags::BODY_PART_EXAMINED, VR::CS, "CHEST".into());
    put(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        spec.study_uid.as_str().into(),
    );
    put(tags::SERIES_INSTANCE_UID, VR::UI, series_uid.into());
    put(tags::STUDY_ID, VR::SH, "1".into());
    put(tags::SERIES_NUMBER, VR::IS, format!("{}", s + 1).into());
    put(tags::INSTANCE_NUMBER, VR::IS, format!("{}", i + 1).into());
    put(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16));
    put(
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2".into(),
    );
    put(tags::ROWS, VR::US, PrimitiveValue::from(spec.size));
    put(tags::COLUMNS, VR::US, PrimitiveValue::from(spec.size));
    put(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16));
    put(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16));
    put(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16));
    put(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(0u16),
    );
    put(tags::RESCALE_INTERCEPT, VR::DS, "-1024".into());
    put(tags::RESCALE_SLOPE, VR::DS, "1".into());
    let n = spec.size as usize * spec.size as usize;
    let pixels: Vec<u16> = (0..n)
        .map(|p| ((p * 7 + i * 13 + s * 31) % 4096) as u16)
        .collect();
    put(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(pixels.into()));
    if !spec.other_patient_ids.is_empty() {
        let items: Vec<InMemDicomObject> = spec
            .other_patient_ids
            .iter()
            .map(|(id, issuer)| {
                let mut item = InMemDicomObject::new_empty();
                item.put(DataElement::new(tags::PATIENT_ID, VR::LO, id.as_str()));
                item.put(DataElement::new(
                    tags::ISSUER_OF_PATIENT_ID,
                    VR::LO,
                    issuer.as_str(),
                ));
                item
            })
            .collect();
        o.put(DataElement::new(
            tags::OTHER_PATIENT_I_DS_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(items),
        ));
    }
    o
}

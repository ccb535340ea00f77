//! The attribute set of one instance that the index keeps (PS3.18 §10.6 Table 10.6.1-5 and
//! PS3.4 §C.6 keys, plus the archive's own bookkeeping), extracted from a parsed dataset.

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;

use crate::{Uid, charset, uid::UidError};

/// Patient-level attributes (PS3.4 §C.6.1.1.2).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PatientAttributes {
    /// Patient ID (0010,0020); empty when the dataset has none (type 2).
    pub patient_id: String,
    /// Issuer of Patient ID (0010,0021).
    pub issuer: Option<String>,
    /// Patient's Name (0010,0010), decoded with the dataset's character set.
    pub name: Option<String>,
    /// Patient's Birth Date (0010,0030), `YYYYMMDD`.
    pub birth_date: Option<String>,
    /// Patient's Sex (0010,0040).
    pub sex: Option<String>,
    /// The items of Other Patient IDs Sequence (0010,1002) that carry an ID: national ids
    /// (the BSN) and the patient's IDs at other institutions, indexed so that a patient can
    /// be found by them.
    pub other_ids: Vec<OtherPatientId>,
}

/// One item of Other Patient IDs Sequence (0010,1002).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct OtherPatientId {
    /// Patient ID (0010,0020) of the item.
    pub id: String,
    /// Issuer of Patient ID (0010,0021) of the item; empty when absent.
    pub issuer: String,
    /// Universal Entity ID (0040,0032) in the item's Issuer of Patient ID Qualifiers Sequence
    /// (0010,0024), e.g. the BSN's OID; empty when absent.
    pub universal_id: String,
}

/// Study-level attributes (PS3.4 §C.6.1.1.3, PS3.18 Table 10.6.1-5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StudyAttributes {
    /// Study Instance UID (0020,000D).
    pub study_uid: Uid,
    /// Study Date (0008,0020).
    pub date: Option<String>,
    /// Study Time (0008,0030).
    pub time: Option<String>,
    /// Accession Number (0008,0050).
    pub accession_number: Option<String>,
    /// Referring Physician's Name (0008,0090).
    pub referring_physician: Option<String>,
    /// Study Description (0008,1030).
    pub description: Option<String>,
    /// Study ID (0020,0010).
    pub study_id: Option<String>,
    /// Timezone Offset From UTC (0008,0201).
    pub timezone_offset: Option<String>,
}

/// Series-level attributes (PS3.4 §C.6.1.1.4, PS3.18 Table 10.6.1-5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SeriesAttributes {
    /// Series Instance UID (0020,000E).
    pub series_uid: Uid,
    /// Modality (0008,0060).
    pub modality: Option<String>,
    /// Series Number (0020,0011).
    pub number: Option<i64>,
    /// Series Description (0008,103E).
    pub description: Option<String>,
    /// Body Part Examined (0018,0015).
    pub body_part: Option<String>,
    /// Performed Procedure Step Start Date (0040,0244).
    pub pps_start_date: Option<String>,
    /// Performed Procedure Step Start Time (0040,0245).
    pub pps_start_time: Option<String>,
}

/// Everything the index stores about one instance, apart from storage bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceAttributes {
    /// The patient the instance belongs to.
    pub patient: PatientAttributes,
    /// The study the instance belongs to.
    pub study: StudyAttributes,
    /// The series the instance belongs to.
    pub series: SeriesAttributes,
    /// SOP Class UID (0008,0016).
    pub sop_class_uid: Uid,
    /// SOP Instance UID (0008,0018).
    pub sop_instance_uid: Uid,
    /// Instance Number (0020,0013).
    pub instance_number: Option<i64>,
    /// Rows (0028,0010).
    pub rows: Option<i64>,
    /// Columns (0028,0011).
    pub columns: Option<i64>,
    /// Number of Frames (0028,0008); absent for single-frame objects.
    pub number_of_frames: Option<i64>,
    /// Bits Allocated (0028,0100).
    pub bits_allocated: Option<i64>,
    /// Specific Character Set (0008,0005), all values joined by `\`.
    pub specific_character_set: Option<String>,
}

/// A required attribute is missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttrError {
    /// A required attribute is absent or empty.
    #[error("required attribute {0} is missing or empty")]
    Missing(&'static str),
    /// A UID attribute does not hold a valid UID.
    #[error("attribute {name} is not a valid UID: {source}")]
    BadUid {
        /// Keyword of the attribute.
        name: &'static str,
        /// What is wrong with it.
        source: UidError,
    },
}

impl InstanceAttributes {
    /// Extracts the indexed attributes from a dataset (which need not contain pixel data).
    ///
    /// # Errors
    /// [`AttrError`] when one of the four identifying UIDs (SOP Class, SOP Instance, Study,
    /// Series) is missing or malformed.
    pub fn from_dataset(obj: &InMemDicomObject) -> Result<Self, AttrError> {
        let r = Reader::new(obj);
        Ok(InstanceAttributes {
            patient: PatientAttributes {
                patient_id: r.text(tags::PATIENT_ID).unwrap_or_default(),
                issuer: r.text(tags::ISSUER_OF_PATIENT_ID),
                name: r.person_name(tags::PATIENT_NAME),
                birth_date: r.text(tags::PATIENT_BIRTH_DATE),
                sex: r.text(tags::PATIENT_SEX),
                other_ids: r.other_ids(),
            },
            study: StudyAttributes {
                study_uid: r.uid(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
                date: r.text(tags::STUDY_DATE),
                time: r.text(tags::STUDY_TIME),
                accession_number: r.text(tags::ACCESSION_NUMBER),
                referring_physician: r.person_name(tags::REFERRING_PHYSICIAN_NAME),
                description: r.text(tags::STUDY_DESCRIPTION),
                study_id: r.text(tags::STUDY_ID),
                timezone_offset: r.text(tags::TIMEZONE_OFFSET_FROM_UTC),
            },
            series: SeriesAttributes {
                series_uid: r.uid(tags::SERIES_INSTANCE_UID, "SeriesInstanceUID")?,
                modality: r.text(tags::MODALITY),
                number: r.int(tags::SERIES_NUMBER),
                description: r.text(tags::SERIES_DESCRIPTION),
                body_part: r.text(tags::BODY_PART_EXAMINED),
                pps_start_date: r.text(tags::PERFORMED_PROCEDURE_STEP_START_DATE),
                pps_start_time: r.text(tags::PERFORMED_PROCEDURE_STEP_START_TIME),
            },
            sop_class_uid: r.uid(tags::SOP_CLASS_UID, "SOPClassUID")?,
            sop_instance_uid: r.uid(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
            instance_number: r.int(tags::INSTANCE_NUMBER),
            rows: r.int(tags::ROWS),
            columns: r.int(tags::COLUMNS),
            number_of_frames: r.int(tags::NUMBER_OF_FRAMES),
            bits_allocated: r.int(tags::BITS_ALLOCATED),
            specific_character_set: r.charset.clone(),
        })
    }
}

/// Reads values tolerantly: text with the dataset's charset even when the VR is UN,
/// numbers from IS/US/UL/SS whatever their encoding.
struct Reader<'a> {
    obj: &'a InMemDicomObject,
    charset: Option<String>,
}

impl<'a> Reader<'a> {
    fn new(obj: &'a InMemDicomObject) -> Self {
        let charset = obj
            .get(tags::SPECIFIC_CHARACTER_SET)
            .and_then(|e| e.to_str().ok())
            .map(|s| clean(&s))
            .filter(|s| !s.is_empty());
        Reader { obj, charset }
    }

    fn text(&self, tag: Tag) -> Option<String> {
        let e = self.obj.get(tag)?;
        let s = if e.vr() == VR::UN {
            let bytes = e.to_bytes().ok()?;
            charset::decode_text(&bytes, self.charset.as_deref())
        } else {
            e.to_str().ok()?.into_owned()
        };
        let s = clean(&s);
        (!s.is_empty()).then_some(s)
    }

    /// A person name without the empty trailing components and component groups that
    /// PS3.5 §6.2.1 allows to be sent (`Wang^XiaoDong=王^小東=` is `Wang^XiaoDong=王^小東`).
    fn person_name(&self, tag: Tag) -> Option<String> {
        let s = self.text(tag)?;
        let v: Vec<&str> = s
            .split('\\')
            .map(|n| n.trim_end_matches(['=', '^', ' ']))
            .collect();
        let s = v.join("\\");
        (!s.trim_matches('\\').is_empty()).then_some(s)
    }

    fn int(&self, tag: Tag) -> Option<i64> {
        let e = self.obj.get(tag)?;
        if let Ok(v) = e.to_int::<i64>() {
            return Some(v);
        }
        self.text(tag)?.split('\\').next()?.trim().parse().ok()
    }

    /// The ID-carrying items of Other Patient IDs Sequence, in order, without repeats.
    fn other_ids(&self) -> Vec<OtherPatientId> {
        let Some(items) = self
            .obj
            .get(tags::OTHER_PATIENT_I_DS_SEQUENCE)
            .and_then(|e| e.items())
        else {
            return Vec::new();
        };
        let mut out: Vec<OtherPatientId> = Vec::new();
        for item in items {
            let r = Reader {
                obj: item,
                charset: self.charset.clone(),
            };
            let Some(id) = r.text(tags::PATIENT_ID) else {
                continue;
            };
            let universal_id = item
                .get(tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE)
                .and_then(|e| e.items())
                .and_then(|q| q.first())
                .and_then(|q| {
                    Reader {
                        obj: q,
                        charset: self.charset.clone(),
                    }
                    .text(tags::UNIVERSAL_ENTITY_ID)
                })
                .unwrap_or_default();
            let o = OtherPatientId {
                id,
                issuer: r.text(tags::ISSUER_OF_PATIENT_ID).unwrap_or_default(),
                universal_id,
            };
            if !out.contains(&o) {
                out.push(o);
            }
        }
        out
    }

    fn uid(&self, tag: Tag, name: &'static str) -> Result<Uid, AttrError> {
        let s = self.text(tag).ok_or(AttrError::Missing(name))?;
        Uid::new(&s).map_err(|source| AttrError::BadUid { name, source })
    }
}

/// Removes DICOM padding (trailing spaces and NULs, leading spaces).
fn clean(s: &str) -> String {
    s.trim_end_matches(['\0', ' '])
        .trim_start_matches(' ')
        .to_owned()
}

/// The form of a name under which case-insensitive matching is done: Unicode upper case.
///
/// The index stores this next to the name itself, and queries are brought to the same form,
/// so that `m?ller*` finds `Müller^Jürgen` on every database backend.
pub fn search_key(name: &str) -> String {
    name.to_uppercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue};

    fn put(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str) {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    }

    fn minimal() -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        put(
            &mut o,
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.2\0",
        );
        put(&mut o, tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4.5");
        put(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3");
        put(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4");
        o
    }

    #[test]
    fn other_patient_ids_are_extracted_with_their_issuers() {
        let item = |id: &str, issuer: Option<&str>, oid: Option<&str>| {
            let mut i = InMemDicomObject::new_empty();
            put(&mut i, tags::PATIENT_ID, VR::LO, id);
            if let Some(x) = issuer {
                put(&mut i, tags::ISSUER_OF_PATIENT_ID, VR::LO, x);
            }
            if let Some(x) = oid {
                let mut q = InMemDicomObject::new_empty();
                put(&mut q, tags::UNIVERSAL_ENTITY_ID, VR::UT, x);
                i.put(DataElement::new(
                    tags::ISSUER_OF_PATIENT_ID_QUALIFIERS_SEQUENCE,
                    VR::SQ,
                    dicom_core::value::DataSetSequence::from(vec![q]),
                ));
            }
            i
        };
        let mut o = minimal();
        o.put(DataElement::new(
            tags::OTHER_PATIENT_I_DS_SEQUENCE,
            VR::SQ,
            dicom_core::value::DataSetSequence::from(vec![
                item("999911120 ", Some("NLMINBIZA"), None),
                item("", Some("HOSPX"), None),
                item("123", None, Some("2.16.840.1.113883.2.4.6.3")),
                item("999911120", Some("NLMINBIZA"), None),
            ]),
        ));
        let a = InstanceAttributes::from_dataset(&o).unwrap();
        let ids: Vec<(&str, &str, &str)> = a
            .patient
            .other_ids
            .iter()
            .map(|x| (x.id.as_str(), x.issuer.as_str(), x.universal_id.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("999911120", "NLMINBIZA", ""),
                ("123", "", "2.16.840.1.113883.2.4.6.3"),
            ]
        );
        assert!(
            InstanceAttributes::from_dataset(&minimal())
                .unwrap()
                .patient
                .other_ids
                .is_empty()
        );
    }

    #[test]
    fn extracts_identifiers_and_text() {
        let mut o = minimal();
        put(&mut o, tags::PATIENT_NAME, VR::PN, "Müller^Jürgen^^=");
        put(&mut o, tags::SERIES_NUMBER, VR::IS, " 7");
        let a = InstanceAttributes::from_dataset(&o).unwrap();
        assert_eq!(a.sop_class_uid.as_str(), "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(a.patient.name.as_deref(), Some("Müller^Jürgen"));
        assert_eq!(a.patient.patient_id, "");
        assert_eq!(a.series.number, Some(7));
        assert_eq!(search_key("Müller^Jürgen"), "MÜLLER^JÜRGEN");
    }

    #[test]
    fn rejects_missing_or_bad_uids() {
        let mut o = minimal();
        o.remove_element(tags::SERIES_INSTANCE_UID);
        assert_eq!(
            InstanceAttributes::from_dataset(&o),
            Err(AttrError::Missing("SeriesInstanceUID"))
        );
        let mut o = minimal();
        put(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, "1.2/../x");
        assert!(matches!(
            InstanceAttributes::from_dataset(&o),
            Err(AttrError::BadUid {
                name: "StudyInstanceUID",
                ..
            })
        ));
    }

    #[test]
    fn decodes_un_text_with_dataset_charset() {
        let mut o = minimal();
        put(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100");
        o.put(DataElement::new(
            tags::PATIENT_NAME,
            VR::UN,
            PrimitiveValue::from(b"M\xfcller^J".to_vec()),
        ));
        let a = InstanceAttributes::from_dataset(&o).unwrap();
        assert_eq!(a.patient.name.as_deref(), Some("Müller^J"));
    }
}

//! Patient reconciliation: which local patient a received bundle belongs to, and the
//! coercion of its identifiers to the local ones.
//!
//! A match needs the national id (BSN with its issuer) to lead to exactly one local patient,
//! and that patient's birth date and family name to agree with the manifest. The national id
//! is found at the local patient as Patient ID with the BSN issuer, or in Other Patient IDs
//! Sequence (0010,1002) of any of the patient's instances. Anything else (no national id, no
//! or several candidates, a demographic mismatch) sends the bundle to the reconciliation
//! queue; nothing is merged automatically.
//!
//! The Other Patient IDs items are found through the index's `patient_other_ids` table (an
//! index lookup), which ingest fills for every instance.

use std::collections::BTreeMap;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use sqlx::Row;

use crate::bundle::Patient;

/// A local patient identity.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LocalPatient {
    /// Patient ID (0010,0020).
    pub patient_id: String,
    /// Issuer of Patient ID (0010,0021); empty when none.
    pub issuer: String,
}

/// The reconciliation decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Import as this local patient.
    Match(LocalPatient),
    /// Queue for a person to decide; the reason says why.
    Queue(String),
}

/// The family name: the first component of a DICOM PN, compared case-insensitively.
fn family(pn: &str) -> String {
    pn.split('=')
        .next()
        .unwrap_or("")
        .split('^')
        .next()
        .unwrap_or("")
        .trim()
        .to_lowercase()
}

/// Decides which local patient the manifest's patient is.
///
/// # Errors
/// Database errors.
pub async fn decide(index: &kade_index::Index, p: &Patient) -> anyhow::Result<Decision> {
    let Some(nid) = p.national_id.as_deref().filter(|s| !s.is_empty()) else {
        return Ok(Decision::Queue(
            "the bundle carries no national id (BSN)".into(),
        ));
    };
    // candidate → (name, birth date)
    let mut candidates: BTreeMap<(String, String), (Option<String>, Option<String>)> =
        BTreeMap::new();
    let direct = sqlx::query(
        "SELECT patient_id, issuer, name, birth_date FROM patients \
         WHERE patient_id = $1 AND issuer IN ('NLMINBIZA', $2)",
    )
    .bind(nid)
    .bind(crate::bundle::BSN_ISSUER_OID)
    .fetch_all(index.read_pool())
    .await?;
    for r in direct {
        candidates.insert(
            (r.try_get(0)?, r.try_get(1)?),
            (r.try_get(2)?, r.try_get(3)?),
        );
    }
    let via_other = sqlx::query(
        "SELECT DISTINCT p.patient_id, p.issuer, p.name, p.birth_date \
         FROM patient_other_ids o JOIN patients p ON p.id = o.patient_fk \
         WHERE o.other_id = $1 AND (o.issuer IN ('NLMINBIZA', $2) OR o.universal_id = $2)",
    )
    .bind(nid)
    .bind(crate::bundle::BSN_ISSUER_OID)
    .fetch_all(index.read_pool())
    .await?;
    for r in via_other {
        candidates.insert(
            (r.try_get(0)?, r.try_get(1)?),
            (r.try_get(2)?, r.try_get(3)?),
        );
    }
    match candidates.len() {
        0 => Ok(Decision::Queue(
            "no local patient has this national id".into(),
        )),
        1 => {
            let ((patient_id, issuer), (name, birth)) = candidates.into_iter().next().unwrap();
            if birth.as_deref().unwrap_or("") != p.birth_date.as_deref().unwrap_or("")
                || birth.is_none()
            {
                return Ok(Decision::Queue(format!(
                    "the national id matches local patient {patient_id}, but the birth date differs"
                )));
            }
            if family(name.as_deref().unwrap_or("")) != family(&p.name)
                || family(&p.name).is_empty()
            {
                return Ok(Decision::Queue(format!(
                    "the national id matches local patient {patient_id}, but the family name differs"
                )));
            }
            Ok(Decision::Match(LocalPatient { patient_id, issuer }))
        }
        n => Ok(Decision::Queue(format!(
            "{n} local patients have this national id"
        ))),
    }
}

/// The local patient named by `patient_id` (and `issuer`, when given), for a manual
/// reconciliation.
///
/// # Errors
/// Database errors.
pub async fn local_patient(
    index: &kade_index::Index,
    patient_id: &str,
    issuer: Option<&str>,
) -> anyhow::Result<Vec<LocalPatient>> {
    let rows = sqlx::query("SELECT patient_id, issuer FROM patients WHERE patient_id = $1")
        .bind(patient_id)
        .fetch_all(index.read_pool())
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let lp = LocalPatient {
            patient_id: r.try_get(0)?,
            issuer: r.try_get(1)?,
        };
        if issuer.is_none_or(|i| i == lp.issuer) {
            out.push(lp);
        }
    }
    Ok(out)
}

/// Rewrites a received Part 10 object for the local archive: Patient ID and Issuer of
/// Patient ID become the local ones, the sender's Accession Number is cleared (it belongs to
/// the sender's RIS), and the replaced values are kept in an Original Attributes Sequence
/// (0400,0561) item (PS3.3 C.12.1.1.9) with reason `COERCE`, the sending organisation as
/// source and `Kade` as modifying system. Every other element, pixel data included, is
/// written back unchanged; the result is the data set only (no File Meta group), in the
/// original transfer syntax, plus that transfer syntax and the SOP Class/Instance UIDs.
///
/// Every element that changes comes before Pixel Data (7FE0,0010), so only the data set in
/// front of it is parsed and written again ([`Coerced::head`]); Pixel Data and whatever
/// follows it stay where they are in `part10`, from [`Coerced::tail_start`], and are taken
/// unchanged ([`Coerced::parts`]). Where the structure cannot be scanned (a deflated data
/// set) or there is no Pixel Data, the whole data set is parsed and written, and the tail is
/// empty.
///
/// # Errors
/// When the object cannot be parsed or written.
pub fn coerce(
    part10: &[u8],
    local: &LocalPatient,
    sender_org: &str,
    at: &str,
) -> anyhow::Result<Coerced> {
    match pixel_data_offset(part10) {
        Some(px) => {
            let mut c = coerce_whole(&part10[..px], local, sender_org, at)?;
            c.tail_start = px;
            Ok(c)
        }
        None => {
            let mut c = coerce_whole(part10, local, sender_org, at)?;
            c.tail_start = part10.len();
            Ok(c)
        }
    }
}

/// Where the top-level Pixel Data element starts, when the data set's structure is sound.
fn pixel_data_offset(part10: &[u8]) -> Option<usize> {
    let start = kade_core::part10::data_set_start(part10.get(..kade_core::part10::HEAD)?)?;
    let meta = dicom_object::meta::FileMetaTable::from_reader(
        part10.get(128..usize::try_from(start).ok()?)?,
    )
    .ok()?;
    let enc = kade_ingest::scan::Encoding::of_transfer_syntax(
        meta.transfer_syntax().trim_end_matches('\0'),
    )?;
    let px = kade_ingest::scan::check(
        std::io::Cursor::new(part10),
        start,
        part10.len() as u64,
        enc,
    )
    .ok()??;
    usize::try_from(px.offset).ok()
}

/// [`coerce`] by parsing and writing all of `part10`.
fn coerce_whole(
    part10: &[u8],
    local: &LocalPatient,
    sender_org: &str,
    at: &str,
) -> anyhow::Result<Coerced> {
    let obj = dicom_object::OpenFileOptions::new()
        .read_preamble(dicom_object::file::ReadPreamble::Always)
        .from_reader(part10)
        .map_err(|e| anyhow::anyhow!("not a DICOM Part 10 object: {e}"))?;
    let ts = obj
        .meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_owned();
    let sop_class = obj
        .meta()
        .media_storage_sop_class_uid()
        .trim_end_matches('\0')
        .to_owned();
    let sop_instance = obj
        .meta()
        .media_storage_sop_instance_uid()
        .trim_end_matches('\0')
        .to_owned();
    let mut ds = obj.into_inner();
    let mut originals = InMemDicomObject::new_empty();
    for tag in [
        tags::PATIENT_ID,
        tags::ISSUER_OF_PATIENT_ID,
        tags::ACCESSION_NUMBER,
    ] {
        if let Some(e) = ds.get(tag) {
            originals.put(e.clone());
        } else if tag == tags::PATIENT_ID {
            originals.put(DataElement::new(tag, VR::LO, PrimitiveValue::Empty));
        }
    }
    ds.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from(local.patient_id.as_str()),
    ));
    if local.issuer.is_empty() {
        ds.remove_element(tags::ISSUER_OF_PATIENT_ID);
    } else {
        ds.put(DataElement::new(
            tags::ISSUER_OF_PATIENT_ID,
            VR::LO,
            PrimitiveValue::from(local.issuer.as_str()),
        ));
    }
    if ds.get(tags::ACCESSION_NUMBER).is_some() {
        ds.put(DataElement::new(
            tags::ACCESSION_NUMBER,
            VR::SH,
            PrimitiveValue::Empty,
        ));
    }
    let mut item = InMemDicomObject::new_empty();
    item.put(DataElement::new(
        tags::MODIFIED_ATTRIBUTES_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(vec![originals]),
    ));
    item.put(DataElement::new(
        tags::ATTRIBUTE_MODIFICATION_DATE_TIME,
        VR::DT,
        PrimitiveValue::from(at),
    ));
    item.put(DataElement::new(
        tags::MODIFYING_SYSTEM,
        VR::LO,
        PrimitiveValue::from("Kade"),
    ));
    item.put(DataElement::new(
        tags::SOURCE_OF_PREVIOUS_VALUES,
        VR::LO,
        PrimitiveValue::from(sender_org),
    ));
    item.put(DataElement::new(
        tags::REASON_FOR_THE_ATTRIBUTE_MODIFICATION,
        VR::CS,
        PrimitiveValue::from("COERCE"),
    ));
    // Keep earlier modification records.
    let mut items: Vec<InMemDicomObject> = ds
        .get(tags::ORIGINAL_ATTRIBUTES_SEQUENCE)
        .and_then(|e| e.items())
        .map(|i| i.to_vec())
        .unwrap_or_default();
    items.push(item);
    ds.put(DataElement::new(
        tags::ORIGINAL_ATTRIBUTES_SEQUENCE,
        VR::SQ,
        DataSetSequence::from(items),
    ));
    let registry = dicom_transfer_syntax_registry::TransferSyntaxRegistry;
    use dicom_encoding::TransferSyntaxIndex as _;
    let syntax = registry
        .get(&ts)
        .ok_or_else(|| anyhow::anyhow!("unknown transfer syntax {ts}"))?;
    let mut out = Vec::with_capacity(part10.len() + 512);
    ds.write_dataset_with_ts(&mut out, syntax)
        .map_err(|e| anyhow::anyhow!("cannot write the coerced data set: {e}"))?;
    Ok(Coerced {
        head: out,
        tail_start: part10.len(),
        transfer_syntax: ts,
        sop_class_uid: sop_class,
        sop_instance_uid: sop_instance,
    })
}

/// A coerced instance, ready for ingest: its data set (no File Meta group) is [`head`]
/// followed by the received object's bytes from [`tail_start`] on ([`Coerced::parts`]).
///
/// [`head`]: Coerced::head
/// [`tail_start`]: Coerced::tail_start
#[derive(Debug)]
pub struct Coerced {
    /// The rewritten data set up to the unchanged tail.
    pub head: Vec<u8>,
    /// Where the unchanged tail (Pixel Data and what follows) starts in the received object.
    pub tail_start: usize,
    /// Its transfer syntax.
    pub transfer_syntax: String,
    /// SOP Class UID.
    pub sop_class_uid: String,
    /// SOP Instance UID.
    pub sop_instance_uid: String,
}

impl Coerced {
    /// The coerced data set's bytes in order, given the received object it came from.
    pub fn parts<'a>(&'a self, part10: &'a [u8]) -> [&'a [u8]; 2] {
        [&self.head, &part10[self.tail_start..]]
    }
}

/// Patient data of a manifest for display (`kade exchange inbox`).
pub fn describe(p: &Patient) -> String {
    format!(
        "patient {} (national id {}), born {}",
        p.id,
        if p.national_id.is_some() {
            "present"
        } else {
            "absent"
        },
        p.birth_date.as_deref().unwrap_or("?")
    )
}

#[cfg(test)]
mod tests {
    use dicom_object::meta::FileMetaTableBuilder;

    use super::*;

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";

    /// A CT object in `ts` with the identifiers coercion changes, 16-bit pixel data, and an
    /// element after Pixel Data (Data Set Trailing Padding).
    fn part10(ts: &str) -> (Vec<u8>, Vec<u8>) {
        let mut ds = InMemDicomObject::new_empty();
        let text = |ds: &mut InMemDicomObject, tag, vr, v: &str| {
            ds.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
        };
        text(&mut ds, tags::SOP_CLASS_UID, VR::UI, CT);
        text(&mut ds, tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4.5");
        text(&mut ds, tags::ACCESSION_NUMBER, VR::SH, "ACC-9");
        text(&mut ds, tags::PATIENT_NAME, VR::PN, "Doe^Jane");
        text(&mut ds, tags::PATIENT_ID, VR::LO, "A-1");
        text(&mut ds, tags::ISSUER_OF_PATIENT_ID, VR::LO, "HOSPA");
        text(&mut ds, tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3");
        text(&mut ds, tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.4");
        let pixels: Vec<u16> = (0..4096u32).map(|i| (i * 37 % 4001) as u16).collect();
        ds.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(pixels.iter().copied().collect()),
        ));
        ds.put(DataElement::new(
            tags::DATA_SET_TRAILING_PADDING,
            VR::OB,
            PrimitiveValue::from(vec![0u8; 6]),
        ));
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(CT)
            .media_storage_sop_instance_uid("1.2.3.4.5")
            .transfer_syntax(ts)
            .implementation_class_uid("1.2.3.999")
            .build()
            .unwrap();
        let mut out = Vec::new();
        ds.with_exact_meta(meta).write_all(&mut out).unwrap();
        let raw: Vec<u8> = pixels.iter().flat_map(|p| p.to_le_bytes()).collect();
        (out, raw)
    }

    fn find(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn splicing_writes_what_rewriting_the_whole_data_set_writes() {
        let local = LocalPatient {
            patient_id: "B-LOCAL".into(),
            issuer: "HOSPB".into(),
        };
        for ts in ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"] {
            let (obj, pixels) = part10(ts);
            assert!(pixel_data_offset(&obj).is_some(), "{ts}: Pixel Data found");
            let c = coerce(&obj, &local, "HOSPA", "20261128120000").unwrap();
            assert!(
                c.tail_start < obj.len() && c.head.len() < 1024,
                "{ts}: spliced"
            );
            let spliced = c.parts(&obj).concat();
            let whole = coerce_whole(&obj, &local, "HOSPA", "20261128120000").unwrap();
            assert_eq!(whole.tail_start, obj.len());
            assert_eq!(whole.parts(&obj)[1], b"");
            assert_eq!(spliced, whole.head, "{ts}");
            assert_eq!(c.transfer_syntax, ts);
            assert_eq!(c.sop_instance_uid, "1.2.3.4.5");
            assert!(find(&spliced, &pixels), "{ts}: pixels unchanged");
            assert!(find(&spliced, b"B-LOCAL"), "{ts}");
            // The originals are kept in Original Attributes Sequence.
            assert!(find(&spliced, b"ACC-9") && find(&spliced, b"A-1"));
            assert!(find(&spliced, b"COERCE"));
        }
        // Not a Part 10 object: no offset, and coercion says so.
        assert_eq!(pixel_data_offset(b"not DICOM"), None);
        assert!(coerce(b"not DICOM", &local, "HOSPA", "20261128120000").is_err());
    }
}

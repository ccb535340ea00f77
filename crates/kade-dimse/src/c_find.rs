//! C-FIND SCP (PS3.4 Annex C): Patient Root and Study Root information models, STUDY level,
//! answered from the index's shared query model ([`kade_index::query`]).

use dicom_core::{DataElement, PrimitiveValue, Tag, VR, header::Header};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use kade_index::Index;
use kade_index::query::{StudyKey, StudyQuery, StudyRow};

use crate::command::{Response, field};
use crate::status::Status;

/// Patient Root Query/Retrieve Information Model - FIND.
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
/// Study Root Query/Retrieve Information Model - FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

/// Most matches returned for one C-FIND; more are cut off with a warning in the log.
pub const MAX_MATCHES: i64 = 1000;

/// Whether `uid` is a C-FIND information model Kade serves.
pub fn is_find_sop_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_FIND || uid == STUDY_ROOT_FIND
}

/// Matching keys Kade evaluates at STUDY level, with the query-model key they map to.
const MATCH_KEYS: &[(Tag, StudyKey)] = &[
    (tags::PATIENT_NAME, StudyKey::PatientName),
    (tags::PATIENT_ID, StudyKey::PatientId),
    (tags::STUDY_DATE, StudyKey::StudyDate),
    (tags::ACCESSION_NUMBER, StudyKey::AccessionNumber),
    (tags::STUDY_INSTANCE_UID, StudyKey::StudyInstanceUid),
    (tags::MODALITIES_IN_STUDY, StudyKey::ModalitiesInStudy),
    (
        tags::REFERRING_PHYSICIAN_NAME,
        StudyKey::ReferringPhysicianName,
    ),
    (tags::STUDY_ID, StudyKey::StudyId),
];

/// The answer to one C-FIND-RQ: pending responses with their identifiers, then the final one.
#[derive(Debug)]
pub struct FindAnswer {
    /// Encoded identifiers of the matches, in order.
    pub matches: Vec<Vec<u8>>,
    /// The final response.
    pub last: Response,
    /// The matching keys, for the audit log (person names masked).
    pub keys: String,
}

/// Runs a C-FIND whose identifier arrived in transfer syntax `ts`.
pub async fn run(
    index: &Index,
    our_ae: &str,
    message_id: u16,
    sop_class: &str,
    ts: &str,
    identifier: &[u8],
) -> FindAnswer {
    let response = |status, comment: Option<&str>| Response {
        command_field: field::C_FIND_RSP,
        message_id,
        sop_class: Some(sop_class.to_owned()),
        sop_instance: None,
        status,
        error_comment: comment.map(str::to_owned),
    };
    let fail = |status, comment: &str, keys: String| FindAnswer {
        matches: vec![],
        last: response(status, Some(comment)),
        keys,
    };
    let Some(ts) = TransferSyntaxRegistry.get(ts) else {
        return fail(
            Status::UnableToProcess,
            "unknown transfer syntax",
            String::new(),
        );
    };
    let Ok(req) = InMemDicomObject::read_dataset_with_ts(identifier, ts) else {
        return fail(
            Status::IdentifierDoesNotMatch,
            "identifier cannot be parsed",
            String::new(),
        );
    };
    let text = |tag| {
        req.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
    };
    let level = text(tags::QUERY_RETRIEVE_LEVEL).unwrap_or_default();
    let mut query = StudyQuery {
        matches: vec![],
        limit: Some(MAX_MATCHES),
        offset: 0,
    };
    let mut keys = vec![format!("level={level}")];
    for (tag, key) in MATCH_KEYS {
        if let Some(v) = text(*tag).filter(|v| !v.is_empty()) {
            let shown = if matches!(
                key,
                StudyKey::PatientName | StudyKey::ReferringPhysicianName
            ) {
                "(name)"
            } else {
                &v
            };
            keys.push(format!("{key:?}={shown}"));
            query.matches.push((*key, v));
        }
    }
    let keys = keys.join(" ");
    if level != "STUDY" {
        return fail(
            Status::UnableToProcess,
            "only STUDY level queries are served yet",
            keys,
        );
    }
    let rows = match index.find_studies(&query).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return fail(Status::IdentifierDoesNotMatch, &e.to_string(), keys),
        Err(e) => {
            tracing::error!(error = %e, "C-FIND query failed");
            return fail(Status::UnableToProcess, "index query failed", keys);
        }
    };
    let mut matches = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut out = Vec::new();
        if identifier_for(&req, row, our_ae)
            .write_dataset_with_ts(&mut out, ts)
            .is_err()
        {
            return fail(Status::UnableToProcess, "cannot encode a match", keys);
        }
        matches.push(out);
    }
    FindAnswer {
        matches,
        last: response(Status::Success, None),
        keys,
    }
}

/// The response identifier: every key the request asked for, with this study's value.
fn identifier_for(req: &InMemDicomObject, row: &StudyRow, our_ae: &str) -> InMemDicomObject {
    let mut out = InMemDicomObject::new_empty();
    for e in req.iter() {
        let tag = e.tag();
        if tag.group() == 0x0002 || tag == tags::SPECIFIC_CHARACTER_SET {
            continue;
        }
        let value = value_of(row, tag).unwrap_or_default();
        let vr = if e.vr() == VR::UN { VR::LO } else { e.vr() };
        if vr == VR::SQ {
            continue; // sequence matching is not supported; return keys in sequences are omitted
        }
        out.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
    }
    out.put(DataElement::new(
        tags::SPECIFIC_CHARACTER_SET,
        VR::CS,
        PrimitiveValue::from("ISO_IR 192"),
    ));
    out.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from("STUDY"),
    ));
    out.put(DataElement::new(
        tags::RETRIEVE_AE_TITLE,
        VR::AE,
        PrimitiveValue::from(our_ae),
    ));
    out
}

fn value_of(row: &StudyRow, tag: Tag) -> Option<String> {
    let o = |v: &Option<String>| v.clone();
    match tag {
        t if t == tags::PATIENT_NAME => o(&row.patient_name),
        t if t == tags::PATIENT_ID => Some(row.patient_id.clone()),
        t if t == tags::ISSUER_OF_PATIENT_ID => Some(row.issuer.clone()),
        t if t == tags::PATIENT_BIRTH_DATE => o(&row.birth_date),
        t if t == tags::PATIENT_SEX => o(&row.sex),
        t if t == tags::STUDY_DATE => o(&row.study_date),
        t if t == tags::STUDY_TIME => o(&row.study_time),
        t if t == tags::ACCESSION_NUMBER => o(&row.accession_number),
        t if t == tags::REFERRING_PHYSICIAN_NAME => o(&row.referring_physician),
        t if t == tags::STUDY_DESCRIPTION => o(&row.description),
        t if t == tags::STUDY_ID => o(&row.study_id),
        t if t == tags::STUDY_INSTANCE_UID => Some(row.study_uid.clone()),
        t if t == tags::MODALITIES_IN_STUDY => Some(row.modalities.clone()),
        t if t == tags::NUMBER_OF_STUDY_RELATED_SERIES => Some(row.num_series.to_string()),
        t if t == tags::NUMBER_OF_STUDY_RELATED_INSTANCES => Some(row.num_instances.to_string()),
        _ => None,
    }
}

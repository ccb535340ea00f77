//! What a C-MOVE or C-GET retrieves: the identifier's unique keys, checked against the
//! information model, resolved to the instances to send (PS3.4 C.4.2.1.4, C.4.2.2.1,
//! C.4.3.2.1, and the models of C.6.1 and C.6.2).
//!
//! Levels and keys:
//! - PATIENT (Patient Root only; the Study Root model has no PATIENT level and is refused):
//!   Patient ID, single value matching only (C.4.2.1.4.1), with Issuer of Patient ID when
//!   given; every instance of every study of the patient.
//! - STUDY, SERIES, IMAGE: the level's unique key, a single UID or a `\`-separated list of
//!   UIDs, all of which are retrieved.
//!
//! In baseline behaviour the requestor also supplies the unique keys of the levels above
//! (only relational-retrieve, C.4.2.2.2, lifts that). Kade needs none of them to identify
//! an entity, as UIDs are unique, and accepts their absence as many requestors rely on it;
//! the keys that are given restrict the match, so a Patient Root request naming one
//! patient's ID and another patient's study retrieves nothing.

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use kade_index::Index;
use kade_index::query::{InstanceKey, InstanceRow, LevelQuery};

use crate::status::Status;

/// Most instances one C-MOVE or C-GET sends.
pub const MAX_INSTANCES: i64 = 100_000;

/// The Query/Retrieve information model of a retrieve SOP class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Patient Root: PATIENT, STUDY, SERIES, IMAGE.
    PatientRoot,
    /// Study Root: STUDY, SERIES, IMAGE.
    StudyRoot,
}

impl Model {
    /// The model of a C-MOVE or C-GET SOP class, `None` for any other class.
    pub fn of(sop_class: &str) -> Option<Model> {
        match sop_class {
            crate::c_move::PATIENT_ROOT_MOVE | crate::c_get::PATIENT_ROOT_GET => {
                Some(Model::PatientRoot)
            }
            crate::c_move::STUDY_ROOT_MOVE | crate::c_get::STUDY_ROOT_GET => Some(Model::StudyRoot),
            _ => None,
        }
    }
}

/// A patient named by a Patient Root identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patient {
    /// Patient ID (0010,0020).
    pub id: String,
    /// Issuer of Patient ID (0010,0021), when given.
    pub issuer: Option<String>,
}

/// What a retrieve identifier asks for.
#[derive(Debug, Clone)]
pub struct Request {
    /// The Query/Retrieve Level.
    pub level: String,
    /// The patient the instances must belong to (Patient Root, when the identifier names one).
    pub patient: Option<Patient>,
    /// The UID keys the instances must match.
    pub query: LevelQuery<InstanceKey>,
}

/// Reads a retrieve identifier encoded in transfer syntax `ts` for `model`.
///
/// # Errors
/// A sentence, sent as the Error Comment of an "Identifier does not match SOP Class"
/// response, when the identifier cannot be parsed or lacks the unique key of its level.
pub fn parse(identifier: &[u8], ts: &str, model: Model) -> Result<Request, String> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or("unknown transfer syntax")?;
    let req = InMemDicomObject::read_dataset_with_ts(identifier, ts)
        .map_err(|_| "identifier cannot be parsed")?;
    let text = |t| {
        req.get(t)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_owned())
            .filter(|s| !s.is_empty())
    };
    let level = text(tags::QUERY_RETRIEVE_LEVEL).unwrap_or_default();
    let (needed, keys): (_, &[_]) = match level.as_str() {
        "PATIENT" if model == Model::StudyRoot => {
            return Err("the Study Root model has no PATIENT level; use Patient Root".into());
        }
        "PATIENT" => (None, &[]),
        "STUDY" => (
            Some(("Study Instance UID", tags::STUDY_INSTANCE_UID)),
            &[(tags::STUDY_INSTANCE_UID, InstanceKey::StudyInstanceUid)],
        ),
        "SERIES" => (
            Some(("Series Instance UID", tags::SERIES_INSTANCE_UID)),
            &[
                (tags::STUDY_INSTANCE_UID, InstanceKey::StudyInstanceUid),
                (tags::SERIES_INSTANCE_UID, InstanceKey::SeriesInstanceUid),
            ],
        ),
        "IMAGE" => (
            Some(("SOP Instance UID", tags::SOP_INSTANCE_UID)),
            &[
                (tags::STUDY_INSTANCE_UID, InstanceKey::StudyInstanceUid),
                (tags::SERIES_INSTANCE_UID, InstanceKey::SeriesInstanceUid),
                (tags::SOP_INSTANCE_UID, InstanceKey::SopInstanceUid),
            ],
        ),
        _ => {
            return Err(match model {
                Model::PatientRoot => "query level must be PATIENT, STUDY, SERIES or IMAGE",
                Model::StudyRoot => "query level must be STUDY, SERIES or IMAGE",
            }
            .into());
        }
    };
    if let Some((name, tag)) = needed
        && text(tag).is_none()
    {
        return Err(format!("a {level} level retrieve needs the {name}"));
    }
    let patient = match (model, text(tags::PATIENT_ID)) {
        (Model::PatientRoot, Some(id)) => {
            if id.contains(['*', '?', '\\']) {
                return Err("Patient ID takes a single value, without wildcards".into());
            }
            Some(Patient {
                id,
                issuer: text(tags::ISSUER_OF_PATIENT_ID),
            })
        }
        (Model::PatientRoot, None) if level == "PATIENT" => {
            return Err("a PATIENT level retrieve needs the Patient ID".into());
        }
        // In the Study Root model the Patient ID is no key of a retrieve.
        _ => None,
    };
    let matches = keys
        .iter()
        .filter_map(|(t, k)| Some((*k, text(*t)?)))
        .collect();
    Ok(Request {
        level,
        patient,
        query: LevelQuery {
            matches,
            limit: Some(MAX_INSTANCES),
            offset: 0,
        },
    })
}

/// The instances `req` retrieves, at most [`MAX_INSTANCES`].
///
/// The patient's keys go into the instance query itself: keys of the levels above apply at
/// every level of the one query model (kade-index's `query` module).
///
/// # Errors
/// The status and Error Comment of the refusal: a UID that is not one, or an index failure
/// (logged here).
pub async fn instances(index: &Index, req: &Request) -> Result<Vec<InstanceRow>, (Status, String)> {
    let mut query = req.query.clone();
    if let Some(patient) = &req.patient {
        query
            .matches
            .push((InstanceKey::PatientId, patient.id.clone()));
        if let Some(issuer) = &patient.issuer {
            query
                .matches
                .push((InstanceKey::IssuerOfPatientId, issuer.clone()));
        }
    }
    match index.find_instances(&query).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err((Status::IdentifierDoesNotMatch, e.to_string())),
        Err(e) => {
            tracing::error!(error = %e, "retrieve: index query failed");
            Err((Status::UnableToProcess, "index query failed".to_owned()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_core::{DataElement, PrimitiveValue, VR};

    const ELE: &str = "1.2.840.10008.1.2.1";

    fn identifier(elements: &[(dicom_core::Tag, VR, &str)]) -> Vec<u8> {
        let mut obj = InMemDicomObject::new_empty();
        for (t, vr, v) in elements {
            let values: Vec<String> = v.split('\\').map(str::to_owned).collect();
            obj.put(DataElement::new(
                *t,
                *vr,
                PrimitiveValue::Strs(values.into()),
            ));
        }
        let mut out = Vec::new();
        obj.write_dataset_with_ts(&mut out, TransferSyntaxRegistry.get(ELE).unwrap())
            .unwrap();
        out
    }

    fn level(l: &str) -> (dicom_core::Tag, VR, &str) {
        (tags::QUERY_RETRIEVE_LEVEL, VR::CS, l)
    }

    #[test]
    fn patient_level_is_patient_root_only_and_needs_a_single_patient_id() {
        let id = identifier(&[level("PATIENT"), (tags::PATIENT_ID, VR::LO, "P1")]);
        let r = parse(&id, ELE, Model::PatientRoot).unwrap();
        assert_eq!(
            r.patient,
            Some(Patient {
                id: "P1".into(),
                issuer: None
            })
        );
        assert!(r.query.matches.is_empty());
        let e = parse(&id, ELE, Model::StudyRoot).unwrap_err();
        assert!(e.contains("Study Root model has no PATIENT level"), "{e}");

        let none = identifier(&[level("PATIENT")]);
        assert!(parse(&none, ELE, Model::PatientRoot).is_err());
        for bad in ["P*", "P?", "P1\\P2"] {
            let id = identifier(&[level("PATIENT"), (tags::PATIENT_ID, VR::LO, bad)]);
            assert!(parse(&id, ELE, Model::PatientRoot).is_err(), "{bad}");
        }
    }

    #[test]
    fn uid_lists_and_keys_of_the_levels_above() {
        let id = identifier(&[
            level("STUDY"),
            (tags::PATIENT_ID, VR::LO, "P1"),
            (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3\\1.2.4"),
        ]);
        let r = parse(&id, ELE, Model::PatientRoot).unwrap();
        assert_eq!(r.patient.unwrap().id, "P1");
        assert_eq!(
            r.query.matches,
            [(InstanceKey::StudyInstanceUid, "1.2.3\\1.2.4".to_owned())]
        );
        // Study Root: the Patient ID is no key.
        assert!(parse(&id, ELE, Model::StudyRoot).unwrap().patient.is_none());
        // The level's own unique key is required.
        let id = identifier(&[level("SERIES"), (tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3")]);
        let e = parse(&id, ELE, Model::StudyRoot).unwrap_err();
        assert!(e.contains("needs the Series Instance UID"), "{e}");
        let e = parse(&identifier(&[level("FRAME")]), ELE, Model::StudyRoot).unwrap_err();
        assert!(e.contains("STUDY, SERIES or IMAGE"), "{e}");
    }
}

//! Storage Commitment Push Model SCP (PS3.4 Annex J): a peer asks Kade, with N-ACTION, to
//! take responsibility for a list of instances; Kade answers N-ACTION-RSP at once, checks each
//! instance, and reports with N-EVENT-REPORT on the same association.
//!
//! An instance is committed only when it is indexed under the requested SOP Class and its
//! blob, read back from storage now, still has the SHA-256 recorded when it was stored.
//! Otherwise it is listed in the Failed SOP Sequence: 0x0112 (no such object instance), 0x0119
//! (class/instance conflict) or 0x0110 (processing failure: the blob is missing or altered).

use dicom_core::{DataElement, PrimitiveValue, VR, value::DataSetSequence};
use dicom_dictionary_std::tags;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use kade_ingest::Ingest;
use sha2::{Digest, Sha256};

/// The Storage Commitment Push Model SOP Class.
pub const STORAGE_COMMITMENT_PUSH: &str = "1.2.840.10008.1.20.1";
/// Its well-known SOP Instance.
pub const STORAGE_COMMITMENT_INSTANCE: &str = "1.2.840.10008.1.20.1.1";

/// Failure reasons (PS3.3 §C.14.1.1).
pub mod reason {
    /// Processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// No such object instance.
    pub const NO_SUCH_OBJECT: u16 = 0x0112;
    /// Class / instance conflict.
    pub const CLASS_INSTANCE_CONFLICT: u16 = 0x0119;
}

/// A parsed commitment request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Transaction UID.
    pub transaction: String,
    /// (SOP Class UID, SOP Instance UID) of each referenced instance.
    pub refs: Vec<(String, String)>,
}

/// The outcome of a request.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Committed instances.
    pub committed: Vec<(String, String)>,
    /// Instances not committed, with the failure reason.
    pub failed: Vec<(String, String, u16)>,
}

/// Reads the N-ACTION data set (Transaction UID and Referenced SOP Sequence).
///
/// # Errors
/// A message for the peer when the data set cannot be read or lacks the Transaction UID.
pub fn parse(data: &[u8], ts: &str) -> Result<Request, String> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| format!("unknown transfer syntax {ts}"))?;
    let obj = InMemDicomObject::read_dataset_with_ts(data, ts)
        .map_err(|e| format!("unreadable commitment request: {e}"))?;
    let text = |o: &InMemDicomObject, t| {
        o.get(t)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
    };
    let transaction = text(&obj, tags::TRANSACTION_UID).ok_or("no Transaction UID")?;
    let refs = obj
        .get(tags::REFERENCED_SOP_SEQUENCE)
        .and_then(|e| e.items())
        .map(|items| {
            items
                .iter()
                .filter_map(|it| {
                    Some((
                        text(it, tags::REFERENCED_SOP_CLASS_UID)?,
                        text(it, tags::REFERENCED_SOP_INSTANCE_UID)?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Request { transaction, refs })
}

/// Checks every referenced instance against the index and re-hashes its blob.
pub async fn check(ingest: &Ingest, req: &Request) -> Outcome {
    let mut out = Outcome::default();
    for (class, sop) in &req.refs {
        let row = match ingest.index().instance(sop).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "storage commitment: index unavailable");
                out.failed
                    .push((class.clone(), sop.clone(), reason::PROCESSING_FAILURE));
                continue;
            }
        };
        let Some(row) = row else {
            out.failed
                .push((class.clone(), sop.clone(), reason::NO_SUCH_OBJECT));
            continue;
        };
        if &row.sop_class_uid != class {
            out.failed
                .push((class.clone(), sop.clone(), reason::CLASS_INSTANCE_CONFLICT));
            continue;
        }
        let intact = match ingest.store().get(&row.blob_key).await {
            Ok(blob) => hex::encode(Sha256::digest(&blob)) == row.sha256,
            Err(_) => false,
        };
        if intact {
            out.committed.push((class.clone(), sop.clone()));
        } else {
            tracing::error!(sop = %sop, "storage commitment: blob missing or altered");
            out.failed
                .push((class.clone(), sop.clone(), reason::PROCESSING_FAILURE));
        }
    }
    out
}

/// The N-EVENT-REPORT data set: Transaction UID, Referenced SOP Sequence of the committed
/// instances and Failed SOP Sequence with reasons, encoded in `ts`.
///
/// # Errors
/// When the transfer syntax is unknown or encoding fails.
pub fn event_data_set(req: &Request, out: &Outcome, ts: &str) -> Result<Vec<u8>, String> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| format!("unknown transfer syntax {ts}"))?;
    let item = |class: &str, sop: &str| {
        let mut it = InMemDicomObject::new_empty();
        it.put(DataElement::new(
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(class),
        ));
        it.put(DataElement::new(
            tags::REFERENCED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop),
        ));
        it
    };
    let mut obj = InMemDicomObject::new_empty();
    obj.put(DataElement::new(
        tags::TRANSACTION_UID,
        VR::UI,
        PrimitiveValue::from(req.transaction.as_str()),
    ));
    if !out.committed.is_empty() {
        let items: Vec<_> = out.committed.iter().map(|(c, s)| item(c, s)).collect();
        obj.put(DataElement::new(
            tags::REFERENCED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ));
    }
    if !out.failed.is_empty() {
        let items: Vec<_> = out
            .failed
            .iter()
            .map(|(c, s, r)| {
                let mut it = item(c, s);
                it.put(DataElement::new(
                    tags::FAILURE_REASON,
                    VR::US,
                    PrimitiveValue::from(*r),
                ));
                it
            })
            .collect();
        obj.put(DataElement::new(
            tags::FAILED_SOP_SEQUENCE,
            VR::SQ,
            DataSetSequence::from(items),
        ));
    }
    let mut buf = Vec::new();
    obj.write_dataset_with_ts(&mut buf, ts)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

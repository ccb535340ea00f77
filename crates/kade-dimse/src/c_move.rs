//! C-MOVE SCP (PS3.4 Annex C.4.2): the destination comes from configuration only; matching
//! instances are sent over a new association as C-STORE sub-operations, in the transfer
//! syntax they are stored in.

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use kade_index::query::{InstanceKey, InstanceRow, LevelQuery};

use crate::command::{CommandSet, field, tag};
use crate::status::Status;

/// Patient Root Query/Retrieve Information Model - MOVE.
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
/// Study Root Query/Retrieve Information Model - MOVE.
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";

/// Most instances one C-MOVE sends.
pub const MAX_INSTANCES: i64 = 100_000;

/// Whether `uid` is a C-MOVE information model Kade serves.
pub fn is_move_sop_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_MOVE || uid == STUDY_ROOT_MOVE
}

/// Sub-operation counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Not yet sent.
    pub remaining: u16,
    /// Stored by the destination.
    pub completed: u16,
    /// Refused by the destination, or not sendable.
    pub failed: u16,
    /// Stored with a warning.
    pub warning: u16,
}

/// Encodes a C-MOVE-RSP command set.
pub fn response(
    message_id: u16,
    sop_class: &str,
    status: Status,
    counts: Counts,
    comment: Option<&str>,
) -> Vec<u8> {
    retrieve_response(
        field::C_MOVE_RSP,
        message_id,
        sop_class,
        status,
        counts,
        comment,
        false,
    )
}

/// Encodes a C-MOVE-RSP or C-GET-RSP command set with sub-operation counters.
pub fn retrieve_response(
    command_field: u16,
    message_id: u16,
    sop_class: &str,
    status: Status,
    counts: Counts,
    comment: Option<&str>,
    data_set: bool,
) -> Vec<u8> {
    let mut cs = CommandSet::default();
    cs.set_uid(tag::AFFECTED_SOP_CLASS_UID, sop_class)
        .set_u16(tag::COMMAND_FIELD, command_field)
        .set_u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, message_id)
        .set_u16(
            tag::COMMAND_DATA_SET_TYPE,
            if data_set { 0x0001 } else { 0x0101 },
        )
        .set_u16(tag::STATUS, status.code());
    if status != Status::Success || counts.remaining > 0 || counts.completed > 0 {
        cs.set_u16(tag::NUMBER_OF_COMPLETED_SUBOPERATIONS, counts.completed)
            .set_u16(tag::NUMBER_OF_FAILED_SUBOPERATIONS, counts.failed)
            .set_u16(tag::NUMBER_OF_WARNING_SUBOPERATIONS, counts.warning);
    }
    // Required while pending; after a C-CANCEL it tells the requestor what was not sent.
    if status == Status::Pending || status == Status::Cancelled {
        cs.set_u16(tag::NUMBER_OF_REMAINING_SUBOPERATIONS, counts.remaining);
    }
    if let Some(c) = comment {
        let c: String = c
            .chars()
            .filter(|c| c.is_ascii() && !c.is_control())
            .take(64)
            .collect();
        cs.set_text(tag::ERROR_COMMENT, &c);
    }
    cs.encode()
}

/// The instance-level query a C-MOVE identifier asks for (unique keys per PS3.4 C.4.2.2.1).
///
/// # Errors
/// A sentence when the identifier is unusable.
pub fn query_of(identifier: &[u8], ts: &str) -> Result<LevelQuery<InstanceKey>, String> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or("unknown transfer syntax")?;
    let req = InMemDicomObject::read_dataset_with_ts(identifier, ts)
        .map_err(|_| "identifier cannot be parsed")?;
    let text = |t| {
        req.get(t)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
            .filter(|s| !s.is_empty())
    };
    let level = text(tags::QUERY_RETRIEVE_LEVEL).unwrap_or_default();
    let (needed, keys): (&[_], &[_]) = match level.as_str() {
        "STUDY" => (
            &[tags::STUDY_INSTANCE_UID],
            &[(tags::STUDY_INSTANCE_UID, InstanceKey::StudyInstanceUid)],
        ),
        "SERIES" => (
            &[tags::SERIES_INSTANCE_UID],
            &[
                (tags::STUDY_INSTANCE_UID, InstanceKey::StudyInstanceUid),
                (tags::SERIES_INSTANCE_UID, InstanceKey::SeriesInstanceUid),
            ],
        ),
        "IMAGE" => (
            &[tags::SOP_INSTANCE_UID],
            &[
                (tags::STUDY_INSTANCE_UID, InstanceKey::StudyInstanceUid),
                (tags::SERIES_INSTANCE_UID, InstanceKey::SeriesInstanceUid),
                (tags::SOP_INSTANCE_UID, InstanceKey::SopInstanceUid),
            ],
        ),
        _ => return Err("query level not served for C-MOVE (STUDY, SERIES, IMAGE are)".into()),
    };
    if needed.iter().any(|t| text(*t).is_none()) {
        return Err(format!(
            "a {level} level C-MOVE needs the {level} unique key"
        ));
    }
    let matches = keys
        .iter()
        .filter_map(|(t, k)| Some((*k, text(*t)?)))
        .collect();
    Ok(LevelQuery {
        matches,
        limit: Some(MAX_INSTANCES),
        offset: 0,
    })
}

/// The presentation contexts to propose for `instances`: one per SOP class and stored
/// transfer syntax, so every instance can go as stored, plus, for classes stored in a native
/// transfer syntax or in a compressed one kade-pixel decodes, one offering Explicit and
/// Implicit VR Little Endian, into which Kade re-encodes (decompressing) when the destination
/// does not take the stored one.
pub fn proposals(instances: &[InstanceRow]) -> Vec<(String, Vec<String>)> {
    use kade_core::transcode::{EXPLICIT_LE, IMPLICIT_LE, is_native};
    let mut v: Vec<(String, Vec<String>)> = Vec::new();
    for i in instances {
        let p = (i.sop_class_uid.clone(), vec![i.transfer_syntax_uid.clone()]);
        if !v.contains(&p) {
            v.push(p);
        }
    }
    let classes: Vec<String> = instances
        .iter()
        .filter(|i| {
            is_native(&i.transfer_syntax_uid)
                || kade_pixel::can_decode_layout(&i.transfer_syntax_uid, i.bits_allocated)
        })
        .map(|i| i.sop_class_uid.clone())
        .collect();
    for c in classes {
        let p = (c, vec![EXPLICIT_LE.to_owned(), IMPLICIT_LE.to_owned()]);
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v.truncate(128); // the most presentation contexts one association can carry
    v
}

/// The presentation context to send an instance of `class`, stored in `stored`, on:
/// `context(class, ts)` looks an accepted context up. As stored when possible (`None` as the
/// second value), else re-encoded to Explicit or Implicit VR Little Endian when the stored
/// syntax is native or decodable (decompressed).
pub fn choose(
    context: impl Fn(&str, &str) -> Option<u8>,
    class: &str,
    stored: &str,
) -> Option<(u8, Option<&'static str>)> {
    use kade_core::transcode::{EXPLICIT_LE, IMPLICIT_LE, is_native};
    if let Some(pc) = context(class, stored) {
        return Some((pc, None));
    }
    if !is_native(stored) && !kade_pixel::can_decode(stored) {
        return None;
    }
    [EXPLICIT_LE, IMPLICIT_LE]
        .into_iter()
        .find_map(|t| context(class, t).map(|pc| (pc, Some(t))))
}

/// The blob to send: as stored, or, stored in `stored`, re-encoded (decompressed when needed)
/// to `target` in a blocking task.
pub async fn prepared(
    blob: bytes::Bytes,
    stored: &str,
    target: Option<&'static str>,
) -> Option<bytes::Bytes> {
    match target {
        None => Some(blob),
        Some(t) => {
            let stored = stored.to_owned();
            tokio::task::spawn_blocking(move || {
                kade_pixel::to_native(&blob, &stored, t)
                    .map_err(|e| tracing::warn!(error = %e, "cannot re-encode for the destination"))
                    .ok()
                    .map(bytes::Bytes::from)
            })
            .await
            .ok()
            .flatten()
        }
    }
}

/// The identifier of a final response after failed sub-operations: the Failed SOP Instance
/// UID List (0008,0058), encoded in transfer syntax `ts`.
pub fn failed_list(failed: &[String], ts: &str) -> Option<Vec<u8>> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    if failed.is_empty() {
        return None;
    }
    let ts = TransferSyntaxRegistry.get(ts)?;
    let mut obj = InMemDicomObject::new_empty();
    let uids: Vec<String> = failed.to_vec();
    obj.put(DataElement::new(
        tags::FAILED_SOP_INSTANCE_UID_LIST,
        VR::UI,
        PrimitiveValue::Strs(uids.into()),
    ));
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).ok()?;
    Some(out)
}

/// The data set of a stored Part 10 blob (the bytes after the File Meta group).
pub fn dataset_of(blob: &[u8]) -> Option<&[u8]> {
    if blob.len() < 144 || &blob[128..132] != b"DICM" || blob[132..136] != [2, 0, 0, 0] {
        return None;
    }
    let end = 144 + u32::from_le_bytes(blob[140..144].try_into().ok()?) as usize;
    blob.get(end..)
}

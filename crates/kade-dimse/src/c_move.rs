//! C-MOVE SCP (PS3.4 Annex C.4.2): the destination comes from configuration only; matching
//! instances are sent over a new association as C-STORE sub-operations, in the transfer
//! syntax they are stored in.

use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use kade_index::query::InstanceRow;

use crate::command::{CommandSet, field, tag};
use crate::pdu::Framed;
use crate::status::Status;

/// Patient Root Query/Retrieve Information Model - MOVE.
pub const PATIENT_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.1.2";
/// Study Root Query/Retrieve Information Model - MOVE.
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";

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

/// Whose data a retrieve sends, for its audit entries: the patient and study when all
/// instances share one, and a summary listing them (at most ten of each).
#[derive(Debug, Default, Clone)]
pub struct Subject {
    /// The Patient ID, when every instance has the same.
    pub patient_id: Option<String>,
    /// The Study Instance UID, when every instance has the same.
    pub study_uid: Option<String>,
    /// "N instances of K studies of P patients (...)".
    pub summary: String,
}

impl Subject {
    /// The subject of a retrieve of `instances`.
    pub fn of(instances: &[InstanceRow]) -> Self {
        use std::collections::BTreeSet;
        let patients: BTreeSet<&str> = instances.iter().map(|i| i.patient_id.as_str()).collect();
        let studies: BTreeSet<&str> = instances.iter().map(|i| i.study_uid.as_str()).collect();
        let list = |set: &BTreeSet<&str>| {
            let mut v: Vec<&str> = set.iter().take(10).copied().collect();
            if set.len() > 10 {
                v.push("...");
            }
            v.join(",")
        };
        // An instance without a Patient ID has '' in the index: no patient to name.
        let single = |set: &BTreeSet<&str>| {
            (set.len() == 1)
                .then(|| set.iter().next().filter(|s| !s.is_empty()))?
                .map(|s| (*s).to_owned())
        };
        Subject {
            patient_id: single(&patients),
            study_uid: single(&studies),
            summary: format!(
                "{} instances of {} studies of {} patients (patients {}; studies {})",
                instances.len(),
                studies.len(),
                patients.len(),
                list(&patients),
                list(&studies)
            ),
        }
    }

    /// `ev` with this subject's patient and study set.
    pub fn on(&self, mut ev: kade_audit::AuditEvent) -> kade_audit::AuditEvent {
        ev.patient_id.clone_from(&self.patient_id);
        ev.study_uid.clone_from(&self.study_uid);
        ev
    }
}

/// Least time between two pending responses of a C-MOVE or C-GET. PS3.4 C.4.2.3.1 and
/// C.4.3.3.1 make pending responses optional; one after the first sub-operation and then at
/// most one per interval keeps a workstation's progress display current without making the
/// requester decode a response per instance (pynetdicom spends about 0.5 ms of CPU on each,
/// as much as Kade spends sending the instance itself).
pub const PENDING_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// When the next pending response of a retrieve is due (see [`PENDING_EVERY`]).
#[derive(Debug, Default)]
pub struct Progress {
    last: Option<std::time::Instant>,
}

impl Progress {
    /// Whether a pending response is due now; if so, the interval starts again.
    pub fn due(&mut self) -> bool {
        let now = std::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < PENDING_EVERY)
        {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// How many blobs a retrieve reads ahead of the one being sent.
const READ_AHEAD: usize = 2;

/// What a retrieve sends for one instance that the peer takes: the blob, its stored transfer
/// syntax, the syntax to re-encode to (`None`: as stored) and the presentation context.
#[derive(Debug)]
pub struct Job {
    /// Blob key.
    pub key: String,
    /// Transfer syntax the instance is stored in.
    pub stored: String,
    /// Transfer syntax to re-encode to, when the peer does not take the stored one.
    pub target: Option<&'static str>,
    /// Presentation context to send it on.
    pub pc: u8,
}

/// How one instance of a retrieve goes: presentation context and re-encoding target (`None`:
/// as stored), or `None` when the peer takes it in no context.
pub type Choice = Option<(u8, Option<&'static str>)>;

/// Plans a retrieve of `instances` over the accepted presentation contexts (`context(class,
/// ts)` finds one) and starts reading them ahead ([`read_ahead`]). Returns, for each
/// instance, the context and re-encoding chosen by [`choose`] (`None`: the peer takes it in
/// no context), and the receiver of the instances' framed data sets, in the same order.
pub fn start(
    store: kade_store::BlobStore,
    instances: &[InstanceRow],
    context: impl Fn(&str, &str) -> Option<u8>,
    peer_max: u32,
) -> (Vec<Choice>, tokio::sync::mpsc::Receiver<Option<Framed>>) {
    let plan: Vec<_> = instances
        .iter()
        .map(|i| choose(&context, &i.sop_class_uid, &i.transfer_syntax_uid))
        .collect();
    let jobs = instances
        .iter()
        .zip(&plan)
        .map(|(i, chosen)| {
            chosen.map(|(pc, target)| Job {
                key: i.blob_key.clone(),
                stored: i.transfer_syntax_uid.clone(),
                target,
                pc,
            })
        })
        .collect();
    (plan, read_ahead(store, jobs, peer_max))
}

/// Reads the data sets of a retrieve in a task of their own, [`READ_AHEAD`] ahead of the
/// sender, laid out as P-DATA-TF PDUs for a peer accepting PDUs of `peer_max` bytes, so that
/// reading (and re-encoding) the next instance overlaps sending the current one. A local
/// blob sent as stored is read from its file straight into the PDUs. Yields one item per job,
/// in order: `None` when the job was `None` (no context for the instance) or the blob could
/// not be read or re-encoded (a failed sub-operation). The task stops when the receiver is
/// dropped (a cancelled retrieve).
pub fn read_ahead(
    store: kade_store::BlobStore,
    jobs: Vec<Option<Job>>,
    peer_max: u32,
) -> tokio::sync::mpsc::Receiver<Option<Framed>> {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    tokio::spawn(async move {
        for job in jobs {
            let framed = match job {
                None => None,
                Some(job) => framed(&store, job, peer_max).await,
            };
            if tx.send(framed).await.is_err() {
                break;
            }
        }
    });
    rx
}

async fn framed(store: &kade_store::BlobStore, job: Job, peer_max: u32) -> Option<Framed> {
    if job.target.is_none()
        && let Some(path) = store.local_path(&job.key)
    {
        let read = tokio::task::spawn_blocking(move || framed_file(&path, job.pc, peer_max));
        return match read.await {
            Ok(Ok(f)) => Some(f),
            Ok(Err(e)) => {
                tracing::error!(key = job.key, error = %e, "cannot read a blob to retrieve");
                None
            }
            Err(_) => None,
        };
    }
    let blob = store
        .get(&job.key)
        .await
        .map_err(|e| tracing::error!(key = job.key, error = %e, "cannot read a blob to retrieve"))
        .ok()?;
    let blob = prepared(blob, &job.stored, job.target).await?;
    Some(Framed::from_bytes(dataset_of(&blob)?, job.pc, peer_max))
}

/// The data set of the Part 10 file at `path`, read into P-DATA-TF PDUs.
fn framed_file(path: &std::path::Path, pc: u8, peer_max: u32) -> std::io::Result<Framed> {
    use std::io::{Read, Seek};
    let mut f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut head = [0u8; kade_core::part10::HEAD];
    f.read_exact(&mut head)?;
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a Part 10 file");
    let start = kade_core::part10::data_set_start(&head).ok_or_else(bad)?;
    let len = size.checked_sub(start).ok_or_else(bad)?;
    f.seek(std::io::SeekFrom::Start(start))?;
    Framed::read_from(f, len as usize, pc, peer_max)
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
    blob.get(usize::try_from(kade_core::part10::data_set_start(blob)?).ok()?..)
}

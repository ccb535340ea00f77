//! C-STORE SCP (PS3.4 Annex B, PS3.7 §9.1.1): the data set is streamed into the ingest
//! spool as PDVs arrive, then validated, stored and indexed before the response is sent.

use kade_core::Uid;
use kade_ingest::{Expected, Incoming, Ingest, IngestError, Source, Stored};

use crate::command::{Response, field};
use crate::negotiation::Accepted;
use crate::status::Status;

/// A C-STORE in progress on an association.
#[derive(Debug)]
pub struct StoreInProgress {
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    incoming: Option<Incoming>,
    /// Set when the store already failed; the rest of the data set is read and dropped.
    failure: Option<(Status, String)>,
}

impl StoreInProgress {
    /// Starts a C-STORE announced on presentation context `pc`.
    pub async fn begin(
        ingest: &Ingest,
        message_id: u16,
        sop_class: String,
        sop_instance: String,
        pc: &Accepted,
    ) -> Self {
        let mut s = StoreInProgress {
            message_id,
            sop_class,
            sop_instance,
            incoming: None,
            failure: None,
        };
        if s.sop_class != pc.abstract_syntax {
            s.failure = Some((
                Status::SopClassNotSupported,
                format!(
                    "SOP class differs from presentation context's {}",
                    pc.abstract_syntax
                ),
            ));
            return s;
        }
        let expected = match (
            Uid::new(&s.sop_class),
            Uid::new(&s.sop_instance),
            Uid::new(&pc.transfer_syntax),
        ) {
            (Ok(sop_class_uid), Ok(sop_instance_uid), Ok(transfer_syntax)) => Expected {
                sop_class_uid,
                sop_instance_uid,
                transfer_syntax,
                study_uid: None,
            },
            _ => {
                s.failure = Some((
                    Status::CannotUnderstand,
                    "invalid UID in the command".into(),
                ));
                return s;
            }
        };
        match ingest.begin_dataset(expected).await {
            Ok(i) => s.incoming = Some(i),
            Err(e) => s.failure = Some(failure_of(&e)),
        }
        s
    }

    /// Appends a data fragment.
    pub async fn data(&mut self, bytes: &[u8]) {
        if let Some(i) = &mut self.incoming
            && let Err(e) = i.write(bytes).await
        {
            self.failure = Some(failure_of(&e));
            self.incoming = None;
        }
    }

    /// Completes the store after the last fragment and builds the response.
    pub async fn finish(self, ingest: &Ingest, source: &Source) -> Response {
        let (status, comment) = match (self.failure, self.incoming) {
            (Some(f), _) => f,
            (None, Some(incoming)) => match ingest.finish(incoming, source).await {
                Ok(stored) => {
                    log_stored(&stored, source);
                    (Status::Success, String::new())
                }
                Err(e) => {
                    if matches!(e, IngestError::Storage(_) | IngestError::Index(_)) {
                        tracing::error!(sop = %self.sop_instance, error = %e, "C-STORE could not be completed");
                    }
                    failure_of(&e)
                }
            },
            (None, None) => (Status::OutOfResources, "no spool".into()),
        };
        if status != Status::Success {
            tracing::warn!(
                sop = %self.sop_instance, actor = %source.actor, status = format!("{:04X}", status.code()),
                reason = %comment, "C-STORE failed"
            );
        }
        Response {
            command_field: field::C_STORE_RSP,
            message_id: self.message_id,
            sop_class: Some(self.sop_class),
            sop_instance: Some(self.sop_instance),
            status,
            error_comment: (!comment.is_empty()).then_some(comment),
        }
    }
}

fn log_stored(stored: &Stored, source: &Source) {
    let (what, s) = match stored {
        Stored::New(s) => ("stored", s),
        Stored::AlreadyPresent(s) => ("already present", s),
        Stored::KeptExisting(s) => ("kept existing", s),
        Stored::Replaced(s) => ("replaced", s),
    };
    tracing::debug!(sop = %s.sop_instance_uid, study = %s.study_uid, bytes = s.size, actor = %source.actor, "{what}");
}

/// The DIMSE status and error comment for an ingest failure (PS3.4 §B.2.3).
pub fn failure_of(e: &IngestError) -> (Status, String) {
    match e {
        // A data set that cannot be parsed is "Cannot understand" (C000, PS3.4 Table B.2-1):
        // A900 "Data Set does not match SOP Class" presumes a data set that was read and
        // found to be of another class (the Mismatch case below). The comment says where.
        IngestError::Invalid(m) => (Status::CannotUnderstand, m.clone()),
        IngestError::Mismatch(m) => (Status::DataSetDoesNotMatch, m.clone()),
        IngestError::Conflict(_) => (
            Status::DuplicateSopInstance,
            "SOP Instance UID already stored with other content".into(),
        ),
        IngestError::Storage(_) => (Status::OutOfResources, "storage failed".into()),
        IngestError::Index(_) => (Status::OutOfResources, "index failed".into()),
    }
}

//! One instance as it arrives: spooled to disk and hashed on the way.

use dicom_object::meta::FileMetaTableBuilder;
use kade_core::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, InstanceAttributes, Uid};
use kade_store::{Spool, SpooledFile};

use crate::IngestError;

/// What the request announced about the instance (C-STORE: Affected SOP Class and Instance
/// UID, and the transfer syntax of the presentation context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    /// Affected SOP Class UID.
    pub sop_class_uid: Uid,
    /// Affected SOP Instance UID.
    pub sop_instance_uid: Uid,
    /// Transfer syntax the dataset is encoded in.
    pub transfer_syntax: Uid,
}

impl Expected {
    pub(crate) fn check(&self, a: &InstanceAttributes) -> Result<(), IngestError> {
        if a.sop_class_uid != self.sop_class_uid {
            return Err(IngestError::Mismatch(format!(
                "SOP Class UID is {} in the dataset but {} in the command",
                a.sop_class_uid, self.sop_class_uid
            )));
        }
        if a.sop_instance_uid != self.sop_instance_uid {
            return Err(IngestError::Mismatch(format!(
                "SOP Instance UID is {} in the dataset but {} in the command",
                a.sop_instance_uid, self.sop_instance_uid
            )));
        }
        Ok(())
    }
}

/// An instance being received. Dropping it discards everything received so far.
#[derive(Debug)]
pub struct Incoming {
    spool: Spool,
    expected: Expected,
}

impl Incoming {
    /// Starts a Part 10 file for a bare dataset: zero preamble, `DICM`, a File Meta group
    /// built from `expected`, then the dataset bytes as they arrive.
    pub(crate) async fn dataset(mut spool: Spool, expected: Expected) -> Result<Self, IngestError> {
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(expected.sop_class_uid.as_str())
            .media_storage_sop_instance_uid(expected.sop_instance_uid.as_str())
            .transfer_syntax(expected.transfer_syntax.as_str())
            .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
            .implementation_version_name(IMPLEMENTATION_VERSION_NAME)
            .build()
            .map_err(|e| IngestError::Invalid(format!("cannot build File Meta group: {e}")))?;
        let mut head = vec![0u8; 128];
        head.extend_from_slice(b"DICM");
        meta.write(&mut head)
            .map_err(|e| IngestError::Invalid(format!("cannot write File Meta group: {e}")))?;
        spool.write(&head).await?;
        spool.start_section();
        Ok(Incoming { spool, expected })
    }

    /// Appends received bytes.
    ///
    /// # Errors
    /// When the spool cannot be written (disk full).
    pub async fn write(&mut self, buf: &[u8]) -> Result<(), IngestError> {
        Ok(self.spool.write(buf).await?)
    }

    /// Bytes received so far, File Meta included.
    pub fn len(&self) -> u64 {
        self.spool.len()
    }

    /// Whether nothing was received.
    pub fn is_empty(&self) -> bool {
        self.spool.is_empty()
    }

    pub(crate) async fn finish(self) -> Result<(SpooledFile, Expected), IngestError> {
        Ok((self.spool.finish().await?, self.expected))
    }
}

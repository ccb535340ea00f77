//! The [`Manifest`]: who sends what about whom, and why. It travels only inside the bundle,
//! sealed under the content key and covered by the sender's signature (E7, E20).
//!
//! The sender fills in a [`ManifestDraft`]; the [`Sealer`](super::Sealer) adds the bundle id,
//! organisations, times and the payload layout: the instances are concatenated in manifest
//! order into one payload, instance *i* at [`Instance::offset`], and the payload is cut into
//! chunks of `chunk_size` bytes (the last holds the remainder).

use std::collections::HashSet;
use std::ops::Range;

use serde::{Deserialize, Serialize};

use super::codec;
use super::{BundleId, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, check_org_id, chunk_count};
use crate::{ExchangeError, Result};

/// Issuer OID of the Dutch citizen service number (BSN), for [`Patient::national_id_issuer`].
pub const BSN_ISSUER_OID: &str = "2.16.840.1.113883.2.4.6.3";

/// The patient as known at the sender, for reconciliation at the recipient (E17).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patient {
    /// Patient ID at the sender (0010,0020).
    pub id: String,
    /// Issuer of Patient ID (0010,0021), if known.
    pub issuer: Option<String>,
    /// National id (BSN), if known.
    pub national_id: Option<String>,
    /// Issuer OID of the national id ([`BSN_ISSUER_OID`] for a BSN).
    pub national_id_issuer: Option<String>,
    /// Patient's Name (0010,0010) in DICOM PN form (`Family^Given`).
    pub name: String,
    /// Patient's Birth Date (0010,0030), `YYYYMMDD`.
    pub birth_date: Option<String>,
    /// Patient's Sex (0010,0040): `M`, `F` or `O`.
    pub sex: Option<String>,
}

/// One study in the bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Study {
    /// Study Instance UID.
    pub study_uid: String,
    /// Study Description.
    pub description: Option<String>,
    /// Modalities in Study.
    pub modalities: Vec<String>,
    /// Study Date, `YYYYMMDD`.
    pub date: Option<String>,
}

/// One instance as the sender lists it, before the payload layout is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDraft {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Study Instance UID (must be one of the manifest's studies).
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// SHA-256 of the Part 10 blob as it will be sent.
    pub sha256: [u8; 32],
    /// Size of the Part 10 blob in bytes (at least 1).
    pub size: u64,
}

/// One instance in the manifest, with its place in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// SOP Instance UID.
    pub sop_instance_uid: String,
    /// Study Instance UID.
    pub study_uid: String,
    /// Series Instance UID.
    pub series_uid: String,
    /// SHA-256 of the Part 10 blob (hex in JSON).
    #[serde(with = "codec::hex32")]
    pub sha256: [u8; 32],
    /// Size of the blob in bytes.
    pub size: u64,
    /// Offset of the blob in the payload.
    pub offset: u64,
}

/// What the sender's user fills in; the sealer completes it into a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestDraft {
    /// The responsible user at the sender (NEN 7513).
    pub sender_user: String,
    /// The clinician the bundle is meant for, if any.
    pub intended_clinician: Option<String>,
    /// Reason for referral, free text.
    pub reason: String,
    /// The patient.
    pub patient: Patient,
    /// The studies sent.
    pub studies: Vec<Study>,
    /// The instances sent, in payload order.
    pub instances: Vec<InstanceDraft>,
}

/// The sealed manifest's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The bundle's identity; equals the header's.
    pub bundle_id: BundleId,
    /// Sending organisation; equals the header's.
    pub sender: String,
    /// Receiving organisation; equals the header's.
    pub recipient: String,
    /// The responsible user at the sender.
    pub sender_user: String,
    /// The clinician the bundle is meant for, if any.
    pub intended_clinician: Option<String>,
    /// Reason for referral.
    pub reason: String,
    /// The patient.
    pub patient: Patient,
    /// The studies.
    pub studies: Vec<Study>,
    /// The instances, in payload order.
    pub instances: Vec<Instance>,
    /// Creation time (unix seconds).
    pub created_at: u64,
    /// End of validity (unix seconds).
    pub not_after: u64,
    /// Payload bytes: the sum of the instance sizes.
    pub payload_size: u64,
    /// Number of chunks.
    pub total_chunks: u32,
    /// Plaintext bytes per chunk (the last holds the remainder).
    pub chunk_size: u32,
}

/// What the sealer adds to a draft.
#[derive(Debug)]
pub(crate) struct Envelope<'a> {
    pub(crate) bundle_id: BundleId,
    pub(crate) sender: &'a str,
    pub(crate) recipient: &'a str,
    pub(crate) created_at: u64,
    pub(crate) not_after: u64,
    pub(crate) chunk_size: u32,
}

impl Manifest {
    /// Completes a draft: lays the instances out in the payload and checks the result.
    pub(crate) fn from_draft(draft: ManifestDraft, env: Envelope<'_>) -> Result<Self> {
        let mut offset = 0u64;
        let mut instances = Vec::with_capacity(draft.instances.len());
        for d in draft.instances {
            instances.push(Instance {
                sop_instance_uid: d.sop_instance_uid,
                study_uid: d.study_uid,
                series_uid: d.series_uid,
                sha256: d.sha256,
                size: d.size,
                offset,
            });
            offset = offset
                .checked_add(d.size)
                .ok_or_else(|| ExchangeError::malformed("manifest", "payload size overflows"))?;
        }
        let m = Manifest {
            bundle_id: env.bundle_id,
            sender: env.sender.to_owned(),
            recipient: env.recipient.to_owned(),
            sender_user: draft.sender_user,
            intended_clinician: draft.intended_clinician,
            reason: draft.reason,
            patient: draft.patient,
            studies: draft.studies,
            instances,
            created_at: env.created_at,
            not_after: env.not_after,
            payload_size: offset,
            total_chunks: chunk_count(offset, env.chunk_size)?,
            chunk_size: env.chunk_size,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks that the manifest is self-consistent: organisations and UIDs well formed, at
    /// least one instance, no SOP Instance UID twice, every instance in a listed study, the
    /// instances contiguous from offset 0 with sizes of at least one byte summing to
    /// `payload_size`, and `total_chunks` matching `payload_size` and `chunk_size`.
    ///
    /// # Errors
    /// [`ExchangeError::Malformed`] naming the first problem.
    pub fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(ExchangeError::malformed("manifest", detail));
        check_org_id(&self.sender)?;
        check_org_id(&self.recipient)?;
        if self.not_after <= self.created_at {
            return bad("not_after is not after created_at".into());
        }
        let mut studies = HashSet::new();
        for s in &self.studies {
            if !is_uid(&s.study_uid) || !studies.insert(s.study_uid.as_str()) {
                return bad(format!(
                    "study UID {:?} is invalid or repeated",
                    s.study_uid
                ));
            }
        }
        if self.instances.is_empty() {
            return bad("no instances".into());
        }
        let mut seen = HashSet::new();
        let mut offset = 0u64;
        for i in &self.instances {
            if !is_uid(&i.sop_instance_uid) || !is_uid(&i.series_uid) {
                return bad(format!(
                    "instance {:?} has an invalid UID",
                    i.sop_instance_uid
                ));
            }
            if !seen.insert(i.sop_instance_uid.as_str()) {
                return bad(format!("instance {} is listed twice", i.sop_instance_uid));
            }
            if !studies.contains(i.study_uid.as_str()) {
                return bad(format!(
                    "instance {} is in an unlisted study",
                    i.sop_instance_uid
                ));
            }
            if i.size == 0 || i.offset != offset {
                return bad(format!(
                    "instance {} has a bad size or offset",
                    i.sop_instance_uid
                ));
            }
            offset = offset
                .checked_add(i.size)
                .ok_or_else(|| ExchangeError::malformed("manifest", "payload size overflows"))?;
        }
        if offset != self.payload_size {
            return bad(format!(
                "instances sum to {offset} bytes, payload_size is {}",
                self.payload_size
            ));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
            || chunk_count(self.payload_size, self.chunk_size)? != self.total_chunks
        {
            return bad("chunk layout does not match the payload size".into());
        }
        Ok(())
    }

    /// Plaintext length of chunk `index` (the last chunk holds the remainder).
    pub fn chunk_len(&self, index: u32) -> usize {
        chunk_len(self.payload_size, self.chunk_size, self.total_chunks, index)
    }

    /// The chunks that hold (part of) instance `i`.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn chunks_of(&self, i: usize) -> Range<u32> {
        let inst = &self.instances[i];
        let cs = u64::from(self.chunk_size);
        // Both quotients are below total_chunks, which is a u32.
        let first = (inst.offset / cs) as u32;
        let last = ((inst.offset + inst.size - 1) / cs) as u32;
        first..last + 1
    }

    /// The manifest as JSON (the bytes that are sealed).
    pub(crate) fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("manifest serialises")
    }
}

/// Plaintext length of chunk `index` in a payload of `payload_size` bytes.
pub(crate) fn chunk_len(payload_size: u64, chunk_size: u32, total: u32, index: u32) -> usize {
    let cs = u64::from(chunk_size);
    let len = if index + 1 == total {
        payload_size - cs * u64::from(index)
    } else {
        cs
    };
    // At most chunk_size, a u32.
    len as usize
}

/// A DICOM UID (PS3.5 §9.1): 1–64 characters, digits and dots, no empty component.
pub(crate) fn is_uid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && s.split('.').all(|c| !c.is_empty())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A draft with instances of the given sizes (hashes of zero bytes are wrong on purpose;
    /// layout tests do not look at them).
    pub(crate) fn draft(sizes: &[u64]) -> ManifestDraft {
        ManifestDraft {
            sender_user: "dr.sender".into(),
            intended_clinician: Some("dr.recipient".into()),
            reason: "second opinion".into(),
            patient: Patient {
                id: "P1".into(),
                issuer: Some("HOSP-A".into()),
                national_id: Some("999999990".into()),
                national_id_issuer: Some(BSN_ISSUER_OID.into()),
                name: "Doe^Jane".into(),
                birth_date: Some("19700101".into()),
                sex: Some("F".into()),
            },
            studies: vec![Study {
                study_uid: "1.2.3.4".into(),
                description: Some("CT thorax".into()),
                modalities: vec!["CT".into()],
                date: Some("20250101".into()),
            }],
            instances: sizes
                .iter()
                .enumerate()
                .map(|(n, &size)| InstanceDraft {
                    sop_instance_uid: format!("1.2.3.4.5.{n}"),
                    study_uid: "1.2.3.4".into(),
                    series_uid: "1.2.3.4.5".into(),
                    sha256: [0; 32],
                    size,
                })
                .collect(),
        }
    }

    fn env(chunk_size: u32) -> Envelope<'static> {
        Envelope {
            bundle_id: BundleId::from_bytes([7; 16]),
            sender: "org-a",
            recipient: "org-b",
            created_at: 100,
            not_after: 200,
            chunk_size,
        }
    }

    #[test]
    fn layout_is_contiguous() {
        let m = Manifest::from_draft(draft(&[1000, 3000, 500]), env(1024)).unwrap();
        assert_eq!(m.payload_size, 4500);
        assert_eq!(m.total_chunks, 5);
        assert_eq!(m.instances[1].offset, 1000);
        assert_eq!(m.instances[2].offset, 4000);
        assert_eq!(m.chunk_len(0), 1024);
        assert_eq!(m.chunk_len(4), 4500 - 4 * 1024);
        assert_eq!(m.chunks_of(0), 0..1);
        assert_eq!(m.chunks_of(1), 0..4);
        assert_eq!(m.chunks_of(2), 3..5);
    }

    #[test]
    fn bad_drafts_are_refused() {
        assert!(Manifest::from_draft(draft(&[]), env(1024)).is_err());
        assert!(Manifest::from_draft(draft(&[0]), env(1024)).is_err());
        assert!(
            Manifest::from_draft(draft(&[10]), env(10)).is_err(),
            "chunk size below minimum"
        );
        let mut d = draft(&[10, 10]);
        d.instances[1].sop_instance_uid = d.instances[0].sop_instance_uid.clone();
        assert!(Manifest::from_draft(d, env(1024)).is_err());
        let mut d = draft(&[10]);
        d.instances[0].study_uid = "1.2.9".into();
        assert!(Manifest::from_draft(d, env(1024)).is_err());
        let mut d = draft(&[10]);
        d.instances[0].sop_instance_uid = "1.2/../3".into();
        assert!(Manifest::from_draft(d, env(1024)).is_err());
    }

    #[test]
    fn uid_check() {
        assert!(is_uid("1.2.840.10008.1.2"));
        for bad in ["", "1..2", ".1", "1.", "1.2a", &"1".repeat(65)] {
            assert!(!is_uid(bad), "{bad:?}");
        }
    }
}

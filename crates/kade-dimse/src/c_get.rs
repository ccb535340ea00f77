//! C-GET SCP (PS3.4 Annex C.4.3): matching instances go back as C-STORE sub-operations on the
//! same association, on the storage contexts for which the requestor took the SCP role.

/// Patient Root Query/Retrieve Information Model - GET.
pub const PATIENT_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.1.3";
/// Study Root Query/Retrieve Information Model - GET.
pub const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// Whether `uid` is a C-GET information model Kade serves.
pub fn is_get_sop_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_GET || uid == STUDY_ROOT_GET
}

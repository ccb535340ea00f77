//! C-FIND SCP (PS3.4 Annex C): Patient Root (PATIENT, STUDY, SERIES, IMAGE) and Study Root
//! (STUDY, SERIES, IMAGE) information models, answered from the index's shared query model
//! ([`kade_index::query`]): the same table of matching keys and the same returned attributes
//! as QIDO-RS. A key of the query level or of a level above it is matched (a SERIES query may
//! name its patient); any other attribute in the identifier is a return key.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR, header::Header};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::{TransferSyntax, TransferSyntaxIndex};
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use kade_index::Index;
use kade_index::query::{Attr, Level, LevelQuery, Returned, audit_text};

use crate::command::{Response, field};
use crate::status::Status;

/// Patient Root Query/Retrieve Information Model - FIND.
pub const PATIENT_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.1.1";
/// Study Root Query/Retrieve Information Model - FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";

/// Most matches returned for one C-FIND unless the peer has its own limit.
pub const MAX_MATCHES: u32 = 1000;

/// What one peer may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most matches returned; beyond them the final status is A700 (refused: out of
    /// resources) with a comment asking for a narrower query.
    pub max_matches: u32,
    /// Only queries that name a patient, a study or a date range are answered.
    pub narrow_queries: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_matches: MAX_MATCHES,
            narrow_queries: false,
        }
    }
}

impl Limits {
    /// The limits configured for `peer`.
    pub fn of(peer: &kade_core::Peer) -> Self {
        Limits {
            max_matches: peer.max_matches.unwrap_or(MAX_MATCHES),
            narrow_queries: peer.narrow_queries,
        }
    }
}

/// Whether a query names a patient, a study or a date range: a Patient ID, Study, Series or
/// SOP Instance UID or Accession Number without wildcards, a Patient's Name not starting with
/// a wildcard, or a Study Date or Patient's Birth Date.
fn is_narrow(matches: &[(Attr, String)]) -> bool {
    matches.iter().any(|(k, v)| match k {
        Attr::PatientId
        | Attr::StudyInstanceUid
        | Attr::SeriesInstanceUid
        | Attr::SopInstanceUid
        | Attr::AccessionNumber => !v.contains(['*', '?']),
        Attr::PatientName => !v.trim_start().starts_with(['*', '?']),
        Attr::StudyDate | Attr::PatientBirthDate => true,
        _ => false,
    })
}

/// Whether `uid` is a C-FIND information model Kade serves.
pub fn is_find_sop_class(uid: &str) -> bool {
    uid == PATIENT_ROOT_FIND || uid == STUDY_ROOT_FIND
}

/// The answer to one C-FIND-RQ: pending responses with their identifiers, then the final one.
#[derive(Debug)]
pub struct FindAnswer {
    /// The matches, in order, encoded as they are sent.
    pub matches: Matches,
    /// The final response.
    pub last: Response,
    /// The matching keys, for the audit log (person names masked).
    pub keys: String,
}

/// The matches of a C-FIND, each encoded as a response identifier when it is about to be
/// sent: a cancelled C-FIND does not encode what it will not send, and the time the sender
/// spends on each batch leaves room for a C-CANCEL to arrive.
pub struct Matches {
    req: InMemDicomObject,
    level: String,
    rows: Vec<Values>,
    ts: Option<&'static TransferSyntax>,
    our_ae: String,
    /// The response identifier's elements, in tag order, when Kade writes them itself.
    layout: Option<Layout>,
}

impl std::fmt::Debug for Matches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Matches")
            .field("level", &self.level)
            .field("len", &self.rows.len())
            .finish_non_exhaustive()
    }
}

impl Matches {
    fn none() -> Self {
        Matches {
            req: InMemDicomObject::new_empty(),
            level: String::new(),
            rows: Vec::new(),
            ts: None,
            our_ae: String::new(),
            layout: None,
        }
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Match `i`'s identifier in the request's transfer syntax; `None` when it cannot be
    /// encoded.
    pub fn encode(&self, i: usize) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(512);
        if let Some(layout) = &self.layout {
            if layout.write(&mut out, &self.rows[i]) {
                return Some(out);
            }
            out.clear();
        }
        identifier_for(&self.req, &self.level, &self.rows[i], &self.our_ae)
            .write_dataset_with_ts(&mut out, self.ts?)
            .ok()?;
        Some(out)
    }
}

/// A response identifier written without building a DICOM object: the elements of
/// [`identifier_for`], in the same order and encoding, for Implicit and Explicit VR Little
/// Endian and the value representations a query key has. Matches are written by the
/// hundred, and building and encoding an object for each was most of Kade's own time in a
/// large C-FIND (`writes_what_dicom_rs_writes` holds the two to the same bytes).
#[derive(Debug)]
struct Layout {
    explicit: bool,
    /// Tag, VR, and the value every match has (`None`: the match's own value, or empty).
    elements: Vec<(Tag, VR, Option<String>)>,
}

impl Layout {
    /// The layout of the answers to `req`, or `None` when it needs the general encoder.
    fn of(req: &InMemDicomObject, level: &str, our_ae: &str, ts: &TransferSyntax) -> Option<Self> {
        let explicit = match ts.uid().trim_end_matches('\0') {
            "1.2.840.10008.1.2" => false,
            "1.2.840.10008.1.2.1" => true,
            _ => return None,
        };
        let mut elements: Vec<(Tag, VR, Option<String>)> = Vec::new();
        for e in req.iter() {
            let tag = e.tag();
            if tag.group() == 0x0002 || tag == tags::SPECIFIC_CHARACTER_SET || e.vr() == VR::SQ {
                continue;
            }
            let vr = if e.vr() == VR::UN { VR::LO } else { e.vr() };
            if !Self::writes(vr) {
                return None;
            }
            elements.push((tag, vr, None));
        }
        for (tag, vr, value) in [
            (tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, level),
            (tags::RETRIEVE_AE_TITLE, VR::AE, our_ae),
        ] {
            elements.retain(|(t, _, _)| *t != tag);
            elements.push((tag, vr, Some(value.to_owned())));
        }
        elements.sort_by_key(|(t, _, _)| *t);
        Some(Layout { explicit, elements })
    }

    /// Whether this writer handles `vr`: text, and the binary integers of [`typed`].
    fn writes(vr: VR) -> bool {
        use VR::*;
        const WRITTEN: &[VR] = &[
            AE, AS, CS, DA, DS, DT, IS, LO, LT, PN, SH, ST, TM, UC, UI, UR, UT, US, SS, UL, SL,
        ];
        WRITTEN.contains(&vr)
    }

    /// Appends the identifier of the match with `values`; `false` (with `out` partly
    /// written) when a value is too long for its element, which the general encoder reports.
    fn write(&self, out: &mut Vec<u8>, values: &Values) -> bool {
        for (tag, vr, fixed) in &self.elements {
            let value = match fixed {
                Some(v) => v.as_str(),
                None => values
                    .iter()
                    .find(|(t, _)| t == tag)
                    .map_or("", |(_, v)| v.as_str()),
            };
            // As `typed`: integers in binary (nothing when the value is not one), text as it
            // is, in UTF-8 (the declared ISO_IR 192), padded to an even length.
            let n = || value.trim().parse::<i64>().ok();
            let binary: Option<Vec<u8>> = match vr {
                VR::US => Some(n().map_or(vec![], |n| (n as u16).to_le_bytes().to_vec())),
                VR::SS => Some(n().map_or(vec![], |n| (n as i16).to_le_bytes().to_vec())),
                VR::UL => Some(n().map_or(vec![], |n| (n as u32).to_le_bytes().to_vec())),
                VR::SL => Some(n().map_or(vec![], |n| (n as i32).to_le_bytes().to_vec())),
                _ => None,
            };
            let bytes = binary.as_deref().unwrap_or(value.as_bytes());
            let len = bytes.len() + (bytes.len() & 1);
            out.extend_from_slice(&tag.group().to_le_bytes());
            out.extend_from_slice(&tag.element().to_le_bytes());
            if !self.explicit {
                out.extend_from_slice(&(len as u32).to_le_bytes());
            } else if matches!(vr, VR::UC | VR::UR | VR::UT) {
                out.extend_from_slice(&vr.to_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&(len as u32).to_le_bytes());
            } else {
                let Ok(short) = u16::try_from(len) else {
                    return false;
                };
                out.extend_from_slice(&vr.to_bytes());
                out.extend_from_slice(&short.to_le_bytes());
            }
            out.extend_from_slice(bytes);
            if bytes.len() % 2 == 1 {
                out.push(if *vr == VR::UI { 0 } else { b' ' });
            }
        }
        true
    }
}

/// Runs a C-FIND whose identifier arrived in transfer syntax `ts`.
pub async fn run(
    index: &Index,
    our_ae: &str,
    message_id: u16,
    sop_class: &str,
    ts: &str,
    identifier: &[u8],
    limits: Limits,
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
        matches: Matches::none(),
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
    let Ok(mut req) = InMemDicomObject::read_dataset_with_ts(identifier, ts) else {
        return fail(
            Status::IdentifierDoesNotMatch,
            "identifier cannot be parsed",
            String::new(),
        );
    };
    // Keys in ISO 2022 code extensions (a Japanese name, say) match the UTF-8 the index holds
    // once decoded; the answers are in UTF-8 whatever the request used (ISO_IR 192).
    kade_core::charset::decode_code_extensions(&mut req);
    let level = text(&req, tags::QUERY_RETRIEVE_LEVEL).unwrap_or_default();
    let matches = Level::from_dicom(&level).map(|l| matching(&req, l));
    let keys = match &matches {
        Some(m) if !m.is_empty() => format!("level={level} {}", audit_text(m)),
        _ => format!("level={level}"),
    };
    let found = match (Level::from_dicom(&level), matches) {
        (Some(Level::Patient), _) if sop_class != PATIENT_ROOT_FIND => Err((
            Status::IdentifierDoesNotMatch,
            "the Study Root model has no PATIENT level: use Patient Root".to_owned(),
        )),
        (Some(level), Some(matches)) => find(index, level, matches, limits).await,
        _ => Err((
            Status::UnableToProcess,
            "unknown query level (PATIENT, STUDY, SERIES and IMAGE are served)".to_owned(),
        )),
    };
    let mut rows = match found {
        Ok(rows) => rows,
        Err((status, why)) => return fail(status, &why, keys),
    };
    // One more than the limit was asked for, to tell a full answer from a cut one.
    let cut = rows.len() > limits.max_matches as usize;
    rows.truncate(limits.max_matches as usize);
    let matches = Matches {
        layout: Layout::of(&req, &level, our_ae, ts),
        req,
        level,
        rows,
        ts: Some(ts),
        our_ae: our_ae.to_owned(),
    };
    let last = if cut {
        let why = format!("more than {} matches: narrow the query", limits.max_matches);
        response(Status::OutOfResources, Some(&why))
    } else {
        response(Status::Success, None)
    };
    FindAnswer {
        matches,
        last,
        keys,
    }
}

/// A match: the value of each attribute it has.
type Values = Vec<(Tag, String)>;
type Found = Result<Vec<Values>, (Status, String)>;

fn text(req: &InMemDicomObject, tag: Tag) -> Option<String> {
    req.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_owned())
}

/// The non-empty matching keys of `req` at `level`, from the one table of
/// [`kade_index::query`]: the attributes of the level and of the levels above. Other
/// attributes are return keys only.
fn matching(req: &InMemDicomObject, level: Level) -> Vec<(Attr, String)> {
    let mut out = Vec::new();
    for e in req.iter() {
        let tag = e.tag();
        let Some(attr) = Attr::from_tag(tag.group(), tag.element()) else {
            continue;
        };
        if !attr.matches_at(level) {
            continue;
        }
        if let Some(v) = text(req, tag).filter(|v| !v.is_empty()) {
            out.push((attr, v));
        }
    }
    out
}

fn db_failure<E: std::fmt::Display>(e: E) -> (Status, String) {
    tracing::error!(error = %e, "C-FIND query failed");
    (Status::UnableToProcess, "index query failed".to_owned())
}

/// The returned attributes of a match as identifier values.
fn values(returned: Vec<Returned>) -> Values {
    returned
        .into_iter()
        .map(|r| (Tag(r.tag.0, r.tag.1), r.value.to_dicom()))
        .collect()
}

/// Runs the query of `level` with `matches`; one match more than the peer's limit is asked
/// for, to tell a full answer from a cut one.
async fn find(index: &Index, level: Level, matches: Vec<(Attr, String)>, limits: Limits) -> Found {
    if limits.narrow_queries && !is_narrow(&matches) {
        return Err((
            Status::UnableToProcess,
            "query too broad: name a patient, a study or a date range".to_owned(),
        ));
    }
    let q = LevelQuery {
        matches,
        limit: Some(i64::from(limits.max_matches) + 1),
        offset: 0,
    };
    let bad = |e: kade_index::query::QueryError| (Status::IdentifierDoesNotMatch, e.to_string());
    Ok(match level {
        Level::Patient => index
            .find_patients(&q)
            .await
            .map_err(db_failure)?
            .map_err(bad)?
            .iter()
            .map(|r| values(r.returned()))
            .collect(),
        Level::Study => index
            .find_studies(&q)
            .await
            .map_err(db_failure)?
            .map_err(bad)?
            .iter()
            .map(|r| values(r.returned()))
            .collect(),
        Level::Series => index
            .find_series(&q)
            .await
            .map_err(db_failure)?
            .map_err(bad)?
            .iter()
            .map(|r| values(r.returned()))
            .collect(),
        Level::Instance => index
            .find_instances(&q)
            .await
            .map_err(db_failure)?
            .map_err(bad)?
            .iter()
            .map(|r| values(r.returned()))
            .collect(),
    })
}

/// The response identifier: every key the request asked for, with this match's value
/// (empty when the archive has none).
fn identifier_for(
    req: &InMemDicomObject,
    level: &str,
    values: &Values,
    our_ae: &str,
) -> InMemDicomObject {
    let mut out = InMemDicomObject::new_empty();
    for e in req.iter() {
        let tag = e.tag();
        if tag.group() == 0x0002 || tag == tags::SPECIFIC_CHARACTER_SET || e.vr() == VR::SQ {
            continue; // sequence matching is not supported; return keys in sequences are omitted
        }
        let value = values
            .iter()
            .find(|(t, _)| *t == tag)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let vr = if e.vr() == VR::UN { VR::LO } else { e.vr() };
        out.put(DataElement::new(tag, vr, typed(vr, &value)));
    }
    out.put(DataElement::new(
        tags::SPECIFIC_CHARACTER_SET,
        VR::CS,
        PrimitiveValue::from("ISO_IR 192"),
    ));
    out.put(DataElement::new(
        tags::QUERY_RETRIEVE_LEVEL,
        VR::CS,
        PrimitiveValue::from(level),
    ));
    out.put(DataElement::new(
        tags::RETRIEVE_AE_TITLE,
        VR::AE,
        PrimitiveValue::from(our_ae),
    ));
    out
}

/// A value in the binary form its VR needs (US, UL, …), or as text.
fn typed(vr: VR, value: &str) -> PrimitiveValue {
    let n = value.trim().parse::<i64>().ok();
    match (vr, n) {
        (_, None) if value.is_empty() => PrimitiveValue::Empty,
        (VR::US, Some(n)) => PrimitiveValue::from(n as u16),
        (VR::SS, Some(n)) => PrimitiveValue::from(n as i16),
        (VR::UL, Some(n)) => PrimitiveValue::from(n as u32),
        (VR::SL, Some(n)) => PrimitiveValue::from(n as i32),
        (VR::US | VR::SS | VR::UL | VR::SL, None) => PrimitiveValue::Empty,
        _ => PrimitiveValue::from(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(uid: &str) -> &'static TransferSyntax {
        TransferSyntaxRegistry
            .get(uid)
            .expect("known transfer syntax")
    }

    fn request(extra: &[(Tag, VR, &str)]) -> InMemDicomObject {
        let mut req = InMemDicomObject::new_empty();
        for (tag, vr, v) in [
            (tags::QUERY_RETRIEVE_LEVEL, VR::CS, "IMAGE"),
            (tags::PATIENT_NAME, VR::PN, "M?ller*"),
            (tags::PATIENT_ID, VR::LO, ""),
            (tags::STUDY_DATE, VR::DA, "20240101-20241231"),
            (tags::STUDY_INSTANCE_UID, VR::UI, ""),
            (tags::MODALITIES_IN_STUDY, VR::CS, ""),
            (tags::NUMBER_OF_STUDY_RELATED_INSTANCES, VR::IS, ""),
            (tags::ROWS, VR::US, ""),
            (tags::COLUMNS, VR::US, ""),
            (tags::STUDY_DESCRIPTION, VR::UN, ""),
            (tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
            (tags::RETRIEVE_AE_TITLE, VR::AE, "ELSEWHERE"),
        ]
        .iter()
        .chain(extra)
        {
            req.put(DataElement::new(*tag, *vr, PrimitiveValue::from(*v)));
        }
        req.put(DataElement::new(
            tags::REFERENCED_STUDY_SEQUENCE,
            VR::SQ,
            PrimitiveValue::Empty,
        ));
        req
    }

    fn general(req: &InMemDicomObject, values: &Values, uid: &str) -> Vec<u8> {
        let mut out = Vec::new();
        identifier_for(req, "IMAGE", values, "KADE")
            .write_dataset_with_ts(&mut out, ts(uid))
            .expect("encodable");
        out
    }

    #[test]
    fn writes_what_dicom_rs_writes() {
        let matches: Vec<Values> = vec![
            // Odd and even lengths, a non-ASCII name, an odd UID, binary integers.
            vec![
                (tags::PATIENT_NAME, "Müller^Jürgen".into()),
                (tags::PATIENT_ID, "PID1".into()),
                (tags::STUDY_DATE, "20240301".into()),
                (tags::STUDY_INSTANCE_UID, "1.2.3".into()),
                (tags::MODALITIES_IN_STUDY, "CT\\MR".into()),
                (tags::NUMBER_OF_STUDY_RELATED_INSTANCES, "12".into()),
                (tags::ROWS, "512".into()),
                (tags::COLUMNS, "not a number".into()),
                (tags::STUDY_DESCRIPTION, "Thorax".into()),
            ],
            // Nothing known: every key empty.
            vec![],
            // Values the request did not ask for are left out.
            vec![
                (tags::PATIENT_ID, "PID22".into()),
                (tags::ACCESSION_NUMBER, "A1".into()),
            ],
        ];
        for extra in [vec![], vec![(tags::ACCESSION_NUMBER, VR::SH, "")]] {
            let req = request(&extra);
            for uid in ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"] {
                let layout = Layout::of(&req, "IMAGE", "KADE", ts(uid)).expect("handled");
                for values in &matches {
                    let mut out = Vec::new();
                    assert!(layout.write(&mut out, values));
                    assert_eq!(out, general(&req, values, uid), "{uid}: {values:?}");
                }
            }
        }
    }

    #[test]
    fn other_encodings_and_keys_go_to_the_general_encoder() {
        let req = request(&[]);
        // Explicit VR Big Endian (retired) and deflate: not written here.
        for uid in ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"] {
            assert!(
                Layout::of(&req, "IMAGE", "KADE", ts(uid)).is_none(),
                "{uid}"
            );
        }
        // A key of a value representation a query key does not have here.
        let mut odd = request(&[]);
        odd.put(DataElement::new(
            tags::SLICE_THICKNESS,
            VR::FD,
            PrimitiveValue::from(1.5f64),
        ));
        assert!(Layout::of(&odd, "IMAGE", "KADE", ts("1.2.840.10008.1.2.1")).is_none());
        // A value too long for a 16-bit length: refused, and the matches path falls back.
        let layout = Layout::of(&req, "IMAGE", "KADE", ts("1.2.840.10008.1.2.1")).unwrap();
        let long = vec![(tags::PATIENT_ID, "x".repeat(70_000))];
        assert!(!layout.write(&mut Vec::new(), &long));
    }
}

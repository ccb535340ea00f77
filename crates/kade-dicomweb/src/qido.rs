//! QIDO-RS (PS3.18 §10.6): searches for studies, series and instances.
//!
//! Matching goes through [`kade_index::query`], the model C-FIND uses too, so both front ends
//! match alike: PN case-insensitive, other strings case-sensitive, `*` and `?` (one character,
//! also a non-ASCII one), UID lists, date ranges.
//!
//! Query values are percent-decoded as UTF-8 (RFC 3986); `+` stands for a space, as browsers
//! and HTTP libraries send it. A matching key this level does not support is ignored and named
//! in a `Warning` header (PS3.18 §8.3.4.1); an unknown attribute name is a 400.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_dictionary_std::StandardDataDictionary;
use kade_audit::{EventKind, Outcome};
use kade_auth::Action;
use kade_index::query::{
    InstanceKey, InstanceRow, LevelQuery, SeriesKey, SeriesRow, StudyKey, StudyQuery, StudyRow,
};
use serde_json::{Map, Value, json};

use crate::{ApiError, Caller, Web};

/// Most results one search returns when the request gives no `limit` (and the most it may ask).
pub const MAX_RESULTS: i64 = 10_000;

/// A parsed QIDO-RS query string.
#[derive(Debug, Default)]
pub(crate) struct Params {
    /// `(tag as 8 hex digits, decoded value)`.
    pub matches: Vec<(String, String)>,
    pub limit: Option<i64>,
    pub offset: i64,
    /// Tags asked for with `includefield`.
    pub include: BTreeSet<String>,
    pub include_all: bool,
}

/// Percent-decodes one query component (`+` is a space).
pub(crate) fn decode(s: &str) -> Result<String, ApiError> {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ApiError::BadRequest(format!("query value {s:?} is not UTF-8 once decoded")))
}

/// An attribute keyword (`PatientName`) or tag (`00100010`) as 8 upper-case hex digits.
pub(crate) fn tag_of(name: &str) -> Option<String> {
    if name.len() == 8 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(name.to_ascii_uppercase());
    }
    StandardDataDictionary.by_name(name).map(|e| {
        let t = e.tag();
        format!("{:04X}{:04X}", t.group(), t.element())
    })
}

pub(crate) fn parse(raw: Option<&str>) -> Result<Params, ApiError> {
    let mut p = Params::default();
    for pair in raw.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k)?;
        let value = decode(v)?;
        match key.as_str() {
            "limit" => {
                let n: i64 = value.parse().map_err(|_| {
                    ApiError::BadRequest(format!("limit must be a number, not {value:?}"))
                })?;
                p.limit = Some(n.clamp(0, MAX_RESULTS));
            }
            "offset" => {
                p.offset = value.parse::<i64>().map_err(|_| {
                    ApiError::BadRequest(format!("offset must be a number, not {value:?}"))
                })?;
                if p.offset < 0 {
                    return Err(ApiError::BadRequest("offset must not be negative".into()));
                }
            }
            "includefield" => {
                for f in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if f == "all" {
                        p.include_all = true;
                    } else {
                        let t = tag_of(f).ok_or_else(|| {
                            ApiError::BadRequest(format!(
                                "includefield {f:?} is neither a DICOM keyword nor a tag"
                            ))
                        })?;
                        p.include.insert(t);
                    }
                }
            }
            // Accepted and without effect: Kade's matching is exact or wildcard.
            "fuzzymatching" => {}
            _ => {
                let t = tag_of(&key).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "{key:?} is neither a DICOM keyword nor a tag, nor limit, offset, \
                         includefield or fuzzymatching"
                    ))
                })?;
                p.matches.push((t, value));
            }
        }
    }
    Ok(p)
}

fn study_key(tag: &str) -> Option<StudyKey> {
    Some(match tag {
        "00100010" => StudyKey::PatientName,
        "00100020" => StudyKey::PatientId,
        "00080020" => StudyKey::StudyDate,
        "00080050" => StudyKey::AccessionNumber,
        "0020000D" => StudyKey::StudyInstanceUid,
        "00080061" => StudyKey::ModalitiesInStudy,
        "00080090" => StudyKey::ReferringPhysicianName,
        "00200010" => StudyKey::StudyId,
        "00081030" => StudyKey::StudyDescription,
        _ => return None,
    })
}

fn series_key(tag: &str) -> Option<SeriesKey> {
    Some(match tag {
        "0020000D" => SeriesKey::StudyInstanceUid,
        "0020000E" => SeriesKey::SeriesInstanceUid,
        "00080060" => SeriesKey::Modality,
        "00200011" => SeriesKey::SeriesNumber,
        "0008103E" => SeriesKey::SeriesDescription,
        "00180015" => SeriesKey::BodyPartExamined,
        _ => return None,
    })
}

fn instance_key(tag: &str) -> Option<InstanceKey> {
    Some(match tag {
        "0020000D" => InstanceKey::StudyInstanceUid,
        "0020000E" => InstanceKey::SeriesInstanceUid,
        "00080018" => InstanceKey::SopInstanceUid,
        "00080016" => InstanceKey::SopClassUid,
        "00200013" => InstanceKey::InstanceNumber,
        _ => return None,
    })
}

/// Splits matches into supported keys and the tags ignored (for the Warning header).
fn keys<K>(p: &Params, map: impl Fn(&str) -> Option<K>) -> (Vec<(K, String)>, Vec<String>) {
    let mut out = Vec::new();
    let mut ignored = Vec::new();
    for (tag, v) in &p.matches {
        match map(tag) {
            Some(k) => out.push((k, v.clone())),
            None => ignored.push(tag.clone()),
        }
    }
    (out, ignored)
}

/// Validates a UID from a path (400 when malformed, before any use).
pub(crate) fn path_uid(what: &str, s: &str) -> Result<String, ApiError> {
    kade_core::Uid::new(s)
        .map(|u| u.as_str().to_owned())
        .map_err(|e| ApiError::BadRequest(format!("{what} in the path: {e}")))
}

// ---- JSON building -------------------------------------------------------------------------

fn put(m: &mut Map<String, Value>, tag: &str, vr: &str, v: Option<&str>) {
    let el = match v.map(str::trim_end).filter(|s| !s.is_empty()) {
        Some(s) => json!({ "vr": vr, "Value": [s] }),
        None => json!({ "vr": vr }),
    };
    m.insert(tag.to_owned(), el);
}

fn put_int(m: &mut Map<String, Value>, tag: &str, vr: &str, v: Option<i64>) {
    let el = match v {
        Some(n) => json!({ "vr": vr, "Value": [n] }),
        None => json!({ "vr": vr }),
    };
    m.insert(tag.to_owned(), el);
}

fn put_pn(m: &mut Map<String, Value>, tag: &str, v: Option<&str>) {
    let el = match v.filter(|s| !s.is_empty()) {
        Some(s) => {
            let mut groups = s.splitn(3, '=');
            let mut pn = Map::new();
            for name in ["Alphabetic", "Ideographic", "Phonetic"] {
                if let Some(g) = groups.next().filter(|g| !g.is_empty()) {
                    pn.insert(name.to_owned(), Value::String(g.to_owned()));
                }
            }
            json!({ "vr": "PN", "Value": [pn] })
        }
        None => json!({ "vr": "PN" }),
    };
    m.insert(tag.to_owned(), el);
}

fn charset(m: &mut Map<String, Value>) {
    // Every string Kade returns is UTF-8, whatever the stored instance used.
    put(m, "00080005", "CS", Some("ISO_IR 192"));
}

fn study_json(r: &StudyRow, base: &str) -> Map<String, Value> {
    let mut m = Map::new();
    charset(&mut m);
    put(&mut m, "00080020", "DA", r.study_date.as_deref());
    put(&mut m, "00080030", "TM", r.study_time.as_deref());
    put(&mut m, "00080050", "SH", r.accession_number.as_deref());
    let mods: Vec<&str> = r.modalities.split('\\').filter(|s| !s.is_empty()).collect();
    m.insert(
        "00080061".into(),
        if mods.is_empty() {
            json!({ "vr": "CS" })
        } else {
            json!({ "vr": "CS", "Value": mods })
        },
    );
    put_pn(&mut m, "00080090", r.referring_physician.as_deref());
    put(&mut m, "00081030", "LO", r.description.as_deref());
    put(
        &mut m,
        "00081190",
        "UR",
        Some(&format!("{base}/studies/{}", r.study_uid)),
    );
    put_pn(&mut m, "00100010", r.patient_name.as_deref());
    put(&mut m, "00100020", "LO", Some(&r.patient_id));
    put(&mut m, "00100021", "LO", Some(&r.issuer));
    put(&mut m, "00100030", "DA", r.birth_date.as_deref());
    put(&mut m, "00100040", "CS", r.sex.as_deref());
    put(&mut m, "0020000D", "UI", Some(&r.study_uid));
    put(&mut m, "00200010", "SH", r.study_id.as_deref());
    put_int(&mut m, "00201206", "IS", Some(r.num_series));
    put_int(&mut m, "00201208", "IS", Some(r.num_instances));
    m
}

fn series_json(r: &SeriesRow, base: &str) -> Map<String, Value> {
    let mut m = Map::new();
    charset(&mut m);
    put(&mut m, "00080060", "CS", r.modality.as_deref());
    put(&mut m, "0008103E", "LO", r.description.as_deref());
    put(
        &mut m,
        "00081190",
        "UR",
        Some(&format!(
            "{base}/studies/{}/series/{}",
            r.study_uid, r.series_uid
        )),
    );
    put(&mut m, "00180015", "CS", r.body_part.as_deref());
    put(&mut m, "0020000D", "UI", Some(&r.study_uid));
    put(&mut m, "0020000E", "UI", Some(&r.series_uid));
    put_int(&mut m, "00200011", "IS", r.number);
    put_int(&mut m, "00201209", "IS", Some(r.num_instances));
    m
}

fn instance_json(r: &InstanceRow, base: &str) -> Map<String, Value> {
    let mut m = Map::new();
    charset(&mut m);
    put(&mut m, "00080016", "UI", Some(&r.sop_class_uid));
    put(&mut m, "00080018", "UI", Some(&r.sop_uid));
    put(&mut m, "00083002", "UI", Some(&r.transfer_syntax_uid));
    put(
        &mut m,
        "00081190",
        "UR",
        Some(&format!(
            "{base}/studies/{}/series/{}/instances/{}",
            r.study_uid, r.series_uid, r.sop_uid
        )),
    );
    put(&mut m, "0020000D", "UI", Some(&r.study_uid));
    put(&mut m, "0020000E", "UI", Some(&r.series_uid));
    put_int(&mut m, "00200013", "IS", r.number);
    put_int(&mut m, "00280008", "IS", r.frames);
    put_int(&mut m, "00280010", "US", r.rows);
    put_int(&mut m, "00280011", "US", r.columns);
    m
}

/// Adds attributes asked for with `includefield` from the instance's stored DICOM JSON.
fn include_from_metadata(m: &mut Map<String, Value>, stored: &str, p: &Params) {
    let Ok(Value::Object(meta)) = serde_json::from_str::<Value>(stored) else {
        return;
    };
    for (tag, el) in meta {
        if (p.include_all || p.include.contains(&tag)) && !m.contains_key(&tag) {
            if el.get("BulkDataURI").is_some() {
                // Bulk data is retrieved through /bulkdata, never inlined in a search.
                continue;
            }
            m.insert(tag, el);
        }
    }
}

fn respond(rows: Vec<Map<String, Value>>, ignored: &[String]) -> Response {
    let body = Value::Array(rows.into_iter().map(Value::Object).collect()).to_string();
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    if !ignored.is_empty() {
        let w = format!(
            "299 kade \"not a matching key at this level, ignored: {}\"",
            ignored.join(", ")
        );
        if let Ok(v) = HeaderValue::from_str(&w) {
            h.insert(header::WARNING, v);
        }
    }
    res
}

// ---- handlers ------------------------------------------------------------------------------

async fn audit_query(web: &Web, caller: &Caller, level: &str, raw: Option<&str>, n: usize) {
    let mut ev = caller
        .event(EventKind::Query, Outcome::Success)
        .detail(format!(
            "QIDO-RS {level}?{} ({n} results)",
            redact_names(raw.unwrap_or(""))
        ));
    ev.study_uid = caller
        .principal
        .study
        .as_ref()
        .map(|u| u.as_str().to_owned());
    web.audit(ev).await;
}

/// The query string for the audit log, with person-name values replaced: names never enter
/// the audit log.
fn redact_names(raw: &str) -> String {
    raw.split('&')
        .map(|pair| {
            let (k, _) = pair.split_once('=').unwrap_or((pair, ""));
            let tag = decode(k).ok().and_then(|k| tag_of(&k));
            let is_pn = tag.as_deref().is_some_and(|t| {
                StandardDataDictionary
                    .by_tag(dicom_core::Tag(
                        u16::from_str_radix(&t[..4], 16).unwrap_or(0),
                        u16::from_str_radix(&t[4..], 16).unwrap_or(0),
                    ))
                    .is_some_and(|e| format!("{:?}", e.vr()).contains("PN"))
            });
            if is_pn {
                format!("{k}=(name)")
            } else {
                pair.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `GET /studies`.
pub async fn studies(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    search_studies(&web, &caller, &headers, raw.as_deref()).await
}

async fn search_studies(
    web: &Web,
    caller: &Caller,
    headers: &HeaderMap,
    raw: Option<&str>,
) -> Result<Response, ApiError> {
    caller.require(Action::Query)?;
    let p = parse(raw)?;
    let (mut matches, ignored) = keys(&p, study_key);
    if let Some(s) = &caller.principal.study {
        matches.push((StudyKey::StudyInstanceUid, s.as_str().to_owned()));
    }
    let q = StudyQuery {
        matches,
        limit: Some(p.limit.unwrap_or(MAX_RESULTS)),
        offset: p.offset,
    };
    let rows = web.index.find_studies(&q).await??;
    let base = web.base_url(headers);
    let out: Vec<_> = rows.iter().map(|r| study_json(r, &base)).collect();
    audit_query(web, caller, "studies", raw, out.len()).await;
    Ok(respond(out, &ignored))
}

async fn search_series(
    web: &Web,
    caller: &Caller,
    headers: &HeaderMap,
    raw: Option<&str>,
    study: Option<String>,
) -> Result<Response, ApiError> {
    caller.require(Action::Query)?;
    let p = parse(raw)?;
    let (mut matches, ignored) = keys(&p, series_key);
    if let Some(st) = study {
        if !caller.principal.may_see_study(&st) {
            return Err(ApiError::NotFound("no such study".into()));
        }
        matches.push((SeriesKey::StudyInstanceUid, st));
    }
    if let Some(s) = &caller.principal.study {
        matches.push((SeriesKey::StudyInstanceUid, s.as_str().to_owned()));
    }
    let q = LevelQuery {
        matches,
        limit: Some(p.limit.unwrap_or(MAX_RESULTS)),
        offset: p.offset,
    };
    let rows = web.index.find_series(&q).await??;
    let base = web.base_url(headers);
    let out: Vec<_> = rows.iter().map(|r| series_json(r, &base)).collect();
    audit_query(web, caller, "series", raw, out.len()).await;
    Ok(respond(out, &ignored))
}

async fn search_instances(
    web: &Web,
    caller: &Caller,
    headers: &HeaderMap,
    raw: Option<&str>,
    study: Option<String>,
    series: Option<String>,
) -> Result<Response, ApiError> {
    caller.require(Action::Query)?;
    let p = parse(raw)?;
    let (mut matches, ignored) = keys(&p, instance_key);
    if let Some(st) = study {
        if !caller.principal.may_see_study(&st) {
            return Err(ApiError::NotFound("no such study".into()));
        }
        matches.push((InstanceKey::StudyInstanceUid, st));
    }
    if let Some(se) = series {
        matches.push((InstanceKey::SeriesInstanceUid, se));
    }
    if let Some(s) = &caller.principal.study {
        matches.push((InstanceKey::StudyInstanceUid, s.as_str().to_owned()));
    }
    let q = LevelQuery {
        matches,
        limit: Some(p.limit.unwrap_or(MAX_RESULTS)),
        offset: p.offset,
    };
    let rows = web.index.find_instances(&q).await??;
    let base = web.base_url(headers);
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut m = instance_json(r, &base);
        if p.include_all || !p.include.is_empty() {
            if let Some(stored) = web.index.instance_metadata(&r.sop_uid).await? {
                include_from_metadata(&mut m, &stored, &p);
            }
        }
        out.push(m);
    }
    audit_query(web, caller, "instances", raw, out.len()).await;
    Ok(respond(out, &ignored))
}

/// `GET /series`.
pub async fn all_series(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    search_series(&web, &caller, &headers, raw.as_deref(), None).await
}

/// `GET /studies/{study}/series`.
pub async fn study_series(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    search_series(&web, &caller, &headers, raw.as_deref(), Some(study)).await
}

/// `GET /instances`.
pub async fn all_instances(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    search_instances(&web, &caller, &headers, raw.as_deref(), None, None).await
}

/// `GET /studies/{study}/instances`.
pub async fn study_instances(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    search_instances(&web, &caller, &headers, raw.as_deref(), Some(study), None).await
}

/// `GET /studies/{study}/series/{series}/instances`.
pub async fn series_instances(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    let series = path_uid("Series Instance UID", &series)?;
    search_instances(
        &web,
        &caller,
        &headers,
        raw.as_deref(),
        Some(study),
        Some(series),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded_as_utf8() {
        let p = parse(Some(
            "PatientName=M%C3%BCller%5EJ*&limit=5&includefield=00081030,StudyID",
        ))
        .unwrap();
        assert_eq!(p.matches, vec![("00100010".into(), "Müller^J*".into())]);
        assert_eq!(p.limit, Some(5));
        assert!(p.include.contains("00081030") && p.include.contains("00200010"));
        assert_eq!(decode("Smith+John").unwrap(), "Smith John");
        assert!(decode("%FF").is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(parse(Some("NoSuchAttribute=1")).is_err());
        assert!(parse(Some("limit=abc")).is_err());
        assert!(parse(Some("offset=-1")).is_err());
    }

    #[test]
    fn names_are_redacted_for_the_audit_log() {
        let r = redact_names("PatientName=Doe*&PatientID=123&00100010=X");
        assert_eq!(r, "PatientName=(name)&PatientID=123&00100010=(name)");
    }
}

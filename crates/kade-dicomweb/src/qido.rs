//! QIDO-RS (PS3.18 §10.6): searches for studies, series and instances.
//!
//! Matching goes through [`kade_index::query`], the model C-FIND uses too: one table decides
//! which attribute matches at which level and how (PN case-insensitive, other strings
//! case-sensitive, `*` and `?` counting characters, UID lists separated by `,` or `\`, date
//! and time ranges), and both front ends render matches from the same returned attributes.
//!
//! Query values are percent-decoded as UTF-8 (RFC 3986); `+` stands for a space, as browsers
//! and HTTP libraries send it. Keys of the levels above apply (`/series?PatientID=X`); an
//! attribute Kade cannot match at this level, given with a value, is a 400 naming the keys it
//! can match (never silently ignored); a parameter that is neither an attribute nor a query
//! parameter of §8.3.4 (`_=1700000000`) is ignored as §8.3 requires, and named in a `Warning`
//! header.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_dictionary_std::StandardDataDictionary;
use kade_audit::{EventKind, Outcome};
use kade_auth::Action;
use kade_index::query::{
    Attr, InstanceRow, Level, LevelQuery, Returned, SeriesRow, StudyRow, Value as RValue,
    audit_text,
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
    /// Parameters that are neither a query parameter of PS3.18 §8.3.4 nor an attribute:
    /// ignored, as §8.3 requires, and named in a `Warning` header.
    pub ignored: Vec<String>,
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
            // Accepted and without effect: Kade's matching is exact or wildcard. Its values
            // are `true` and `false` (§8.3.4.4); anything else is an invalid value (§8.3).
            "fuzzymatching" => {
                if value != "true" && value != "false" {
                    return Err(ApiError::BadRequest(format!(
                        "fuzzymatching is true or false, not {value:?}"
                    )));
                }
            }
            _ => match tag_of(&key) {
                Some(t) => p.matches.push((t, value)),
                // PS3.18 §8.3: an origin server "shall ignore" query parameters it does not
                // support, e.g. the `_=…` cache-buster JavaScript clients add.
                None => p.ignored.push(key),
            },
        }
    }
    Ok(p)
}

/// The tag `GGGGEEEE` (8 upper-case hex digits) as `(group, element)`.
fn tag_pair(tag: &str) -> Option<(u16, u16)> {
    Some((
        u16::from_str_radix(tag.get(..4)?, 16).ok()?,
        u16::from_str_radix(tag.get(4..)?, 16).ok()?,
    ))
}

/// The matching keys of a search at `level`, from the one table of [`kade_index::query`].
/// An attribute that is not a matching key here, given with a value, is refused (400): Kade
/// never answers as if it had applied a key it did not (PS3.18 §8.3.4). With an empty value
/// it only asks for the attribute to be returned, which the response does where it can.
fn keys(p: &Params, level: Level, resource: &str) -> Result<Vec<(Attr, String)>, ApiError> {
    let mut out = Vec::new();
    for (tag, v) in &p.matches {
        let attr = tag_pair(tag).and_then(|(g, e)| Attr::from_tag(g, e));
        match attr {
            Some(a) if a.matches_at(level) => out.push((a, v.clone())),
            _ if v.trim().is_empty() || v.trim() == "*" => {}
            _ => {
                let supported: Vec<&str> = kade_index::query::attributes::all()
                    .filter(|a| a.matches_at(level))
                    .map(Attr::keyword)
                    .collect();
                return Err(ApiError::BadRequest(format!(
                    "{} ({tag}) is not a matching key of {resource}: Kade matches on {}",
                    keyword(tag),
                    supported.join(", ")
                )));
            }
        }
    }
    Ok(out)
}

/// The keyword of a tag for messages (`PatientAge`), or the tag itself.
fn keyword(tag: &str) -> String {
    tag_pair(tag)
        .and_then(|(g, e)| StandardDataDictionary.by_tag(dicom_core::Tag(g, e)))
        .map_or_else(|| tag.to_owned(), |e| e.alias().to_owned())
}

/// Validates a UID from a path (400 when malformed, before any use).
pub(crate) fn path_uid(what: &str, s: &str) -> Result<String, ApiError> {
    kade_core::Uid::new(s)
        .map(|u| u.as_str().to_owned())
        .map_err(|e| ApiError::BadRequest(format!("{what} in the path: {e}")))
}

// ---- JSON building -------------------------------------------------------------------------

/// A match's attributes as DICOM JSON (PS3.18 §F.2), with its Retrieve URL.
fn match_json(returned: Vec<Returned>, retrieve_url: String) -> Map<String, Value> {
    let mut m = Map::new();
    charset(&mut m);
    for r in returned {
        let (tag, el) = element(r);
        m.insert(tag, el);
    }
    m.insert(
        "00081190".into(),
        json!({ "vr": "UR", "Value": [retrieve_url] }),
    );
    m
}

/// One returned attribute as its tag (8 hex digits) and DICOM JSON attribute object.
fn element(r: Returned) -> (String, Value) {
    let tag = format!("{:04X}{:04X}", r.tag.0, r.tag.1);
    let el = match (r.vr, r.value) {
        (vr, RValue::Empty) => json!({ "vr": vr }),
        ("PN", RValue::Text(s)) => json!({ "vr": "PN", "Value": [person_name(&s)] }),
        (vr, RValue::Text(s)) => json!({ "vr": vr, "Value": [s] }),
        (vr, RValue::Texts(v)) => json!({ "vr": vr, "Value": v }),
        (vr, RValue::Int(n)) => json!({ "vr": vr, "Value": [n] }),
    };
    (tag, el)
}

/// Adds to `m` the attributes of a level above (a study's for a series, say): all of them
/// when `all` (the resource is not scoped to that entity, PS3.18 §10.6.3.3), else those asked
/// for with `includefield`.
fn add_upper(m: &mut Map<String, Value>, upper: &[Returned], all: bool, p: &Params) {
    for r in upper {
        let (tag, el) = element(r.clone());
        if (all || p.include_all || p.include.contains(&tag)) && !m.contains_key(&tag) {
            m.insert(tag, el);
        }
    }
}

/// Whether any attribute of `level` is asked for with `includefield`.
fn includes_level(p: &Params, level: Level) -> bool {
    p.include_all
        || kade_index::query::attributes::all()
            .filter(|a| a.level() == level)
            .any(|a| {
                let (g, e) = a.tag();
                p.include.contains(&format!("{g:04X}{e:04X}"))
            })
}

/// The studies (`level` Study) or series (`level` Series) with these UIDs, by UID, as
/// returned attributes: what the results of a level below carry of them.
async fn rows_by_uid(
    web: &Web,
    level: Level,
    uids: BTreeSet<&str>,
) -> Result<HashMap<String, Vec<Returned>>, ApiError> {
    if uids.is_empty() {
        return Ok(HashMap::new());
    }
    let key = match level {
        Level::Series => Attr::SeriesInstanceUid,
        _ => Attr::StudyInstanceUid,
    };
    let q = LevelQuery {
        matches: vec![(key, join_uids(uids))],
        limit: None,
        offset: 0,
    };
    Ok(match level {
        Level::Series => web
            .index
            .find_series(&q)
            .await??
            .iter()
            .map(|r| (r.series_uid.clone(), r.returned()))
            .collect(),
        _ => web
            .index
            .find_studies(&q)
            .await??
            .iter()
            .map(|r| (r.study_uid.clone(), r.returned()))
            .collect(),
    })
}

/// UIDs as one UID-list matching value.
fn join_uids(uids: BTreeSet<&str>) -> String {
    uids.into_iter().collect::<Vec<_>>().join("\\")
}

/// A person name in its DICOM form as the JSON object of PS3.18 §F.2.2.
fn person_name(s: &str) -> Value {
    let mut groups = s.splitn(3, '=');
    let mut pn = Map::new();
    for name in ["Alphabetic", "Ideographic", "Phonetic"] {
        if let Some(g) = groups.next().filter(|g| !g.is_empty()) {
            pn.insert(name.to_owned(), Value::String(g.to_owned()));
        }
    }
    Value::Object(pn)
}

fn charset(m: &mut Map<String, Value>) {
    // Every string Kade returns is UTF-8, whatever the stored instance used.
    m.insert(
        "00080005".into(),
        json!({ "vr": "CS", "Value": ["ISO_IR 192"] }),
    );
}

fn study_json(r: &StudyRow, base: &str) -> Map<String, Value> {
    match_json(r.returned(), format!("{base}/studies/{}", r.study_uid))
}

fn series_json(r: &SeriesRow, base: &str) -> Map<String, Value> {
    match_json(
        r.returned(),
        format!("{base}/studies/{}/series/{}", r.study_uid, r.series_uid),
    )
}

fn instance_json(r: &InstanceRow, base: &str) -> Map<String, Value> {
    match_json(
        r.returned(),
        format!(
            "{base}/studies/{}/series/{}/instances/{}",
            r.study_uid, r.series_uid, r.sop_uid
        ),
    )
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
    // Attributes in ascending tag order (PS3.18 §F.2.2); 8 upper-case hex digits sort as
    // the tags do.
    let sorted = rows.into_iter().map(|m| {
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Value::Object(v.into_iter().collect())
    });
    let body = Value::Array(sorted.collect()).to_string();
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    if !ignored.is_empty() {
        let w = format!(
            "299 kade \"unsupported query parameters ignored: {}\"",
            ignored.join(", ")
        );
        if let Ok(v) = HeaderValue::from_str(&w) {
            h.insert(header::WARNING, v);
        }
    }
    res
}

// ---- handlers ------------------------------------------------------------------------------

async fn audit_query(web: &Web, caller: &Caller, level: &str, q: &LevelQuery, n: usize) {
    let mut detail = format!("QIDO-RS {level}: {}", audit_text(&q.matches));
    if q.offset > 0 {
        detail.push_str(&format!(" offset={}", q.offset));
    }
    detail.push_str(&format!(" ({n} results)"));
    let mut ev = caller
        .event(EventKind::Query, Outcome::Success)
        .detail(detail);
    ev.study_uid = caller
        .principal
        .study
        .as_ref()
        .map(|u| u.as_str().to_owned());
    web.audit(ev).await;
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
    let mut matches = keys(&p, Level::Study, "/studies")?;
    if let Some(s) = &caller.principal.study {
        matches.push((Attr::StudyInstanceUid, s.as_str().to_owned()));
    }
    let q = LevelQuery {
        matches,
        limit: Some(p.limit.unwrap_or(MAX_RESULTS)),
        offset: p.offset,
    };
    let rows = web.index.find_studies(&q).await??;
    let base = web.base_url(headers);
    let out: Vec<_> = rows.iter().map(|r| study_json(r, &base)).collect();
    audit_query(web, caller, "studies", &q, out.len()).await;
    Ok(respond(out, &p.ignored))
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
    let mut matches = keys(&p, Level::Series, "series")?;
    let scoped = study.is_some();
    if let Some(st) = study {
        if !caller.principal.may_see_study(&st) {
            return Err(ApiError::NotFound("no such study".into()));
        }
        matches.push((Attr::StudyInstanceUid, st));
    }
    if let Some(s) = &caller.principal.study {
        matches.push((Attr::StudyInstanceUid, s.as_str().to_owned()));
    }
    let q = LevelQuery {
        matches,
        limit: Some(p.limit.unwrap_or(MAX_RESULTS)),
        offset: p.offset,
    };
    let rows = web.index.find_series(&q).await??;
    let base = web.base_url(headers);
    // All Series results carry their study's attributes; a study's series, those asked for.
    let all_study = !scoped;
    let studies =
        if all_study || includes_level(&p, Level::Study) || includes_level(&p, Level::Patient) {
            rows_by_uid(
                web,
                Level::Study,
                rows.iter().map(|r| r.study_uid.as_str()).collect(),
            )
            .await?
        } else {
            HashMap::new()
        };
    let out: Vec<_> = rows
        .iter()
        .map(|r| {
            let mut m = series_json(r, &base);
            if let Some(st) = studies.get(&r.study_uid) {
                add_upper(&mut m, st, all_study, &p);
            }
            m
        })
        .collect();
    audit_query(web, caller, "series", &q, out.len()).await;
    Ok(respond(out, &p.ignored))
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
    let mut matches = keys(&p, Level::Instance, "instances")?;
    // All Instances results carry their study's and series' attributes; a study's instances
    // their series'; a series' instances neither unless asked for (PS3.18 §10.6.3.3.3).
    let (all_study, all_series) = (study.is_none(), series.is_none());
    if let Some(st) = study {
        if !caller.principal.may_see_study(&st) {
            return Err(ApiError::NotFound("no such study".into()));
        }
        matches.push((Attr::StudyInstanceUid, st));
    }
    if let Some(se) = series {
        matches.push((Attr::SeriesInstanceUid, se));
    }
    if let Some(s) = &caller.principal.study {
        matches.push((Attr::StudyInstanceUid, s.as_str().to_owned()));
    }
    let q = LevelQuery {
        matches,
        limit: Some(p.limit.unwrap_or(MAX_RESULTS)),
        offset: p.offset,
    };
    let rows = web.index.find_instances(&q).await??;
    let base = web.base_url(headers);
    let studies =
        if all_study || includes_level(&p, Level::Study) || includes_level(&p, Level::Patient) {
            rows_by_uid(
                web,
                Level::Study,
                rows.iter().map(|r| r.study_uid.as_str()).collect(),
            )
            .await?
        } else {
            HashMap::new()
        };
    let series_rows = if all_series || includes_level(&p, Level::Series) {
        rows_by_uid(
            web,
            Level::Series,
            rows.iter().map(|r| r.series_uid.as_str()).collect(),
        )
        .await?
    } else {
        HashMap::new()
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        let mut m = instance_json(r, &base);
        if let Some(se) = series_rows.get(&r.series_uid) {
            add_upper(&mut m, se, all_series, &p);
        }
        if let Some(st) = studies.get(&r.study_uid) {
            add_upper(&mut m, st, all_study, &p);
        }
        if p.include_all || !p.include.is_empty() {
            if let Some(stored) = web.index.instance_metadata(&r.sop_uid).await? {
                include_from_metadata(&mut m, &stored, &p);
            }
        }
        out.push(m);
    }
    audit_query(web, caller, "instances", &q, out.len()).await;
    Ok(respond(out, &p.ignored))
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
    fn unknown_parameters_are_ignored_and_bad_values_refused() {
        let p = parse(Some("_=1700000000&PATIENTID=12345&PatientID=7")).unwrap();
        assert_eq!(p.ignored, ["_", "PATIENTID"]);
        assert_eq!(p.matches, vec![("00100020".into(), "7".into())]);
        assert!(parse(Some("limit=abc")).is_err());
        assert!(parse(Some("offset=-1")).is_err());
    }

    #[test]
    fn attributes_that_are_not_keys_here_are_refused() {
        let p = parse(Some("PatientID=7&Modality=CT&PatientAge=")).unwrap();
        assert_eq!(keys(&p, Level::Series, "series").unwrap().len(), 2);
        let e = keys(&p, Level::Study, "/studies").unwrap_err();
        assert!(
            matches!(&e, ApiError::BadRequest(m) if m.contains("Modality")),
            "{e:?}"
        );
        let age = parse(Some("PatientAge=045Y")).unwrap();
        assert!(keys(&age, Level::Study, "/studies").is_err());
    }
}

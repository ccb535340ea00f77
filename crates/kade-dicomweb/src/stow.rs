//! STOW-RS (PS3.18 §10.5): `POST /studies` and `POST /studies/{study}` with a
//! multipart/related body of `application/dicom` parts.
//!
//! Each part is streamed into the one ingest path as it arrives: its File Meta group is read
//! for the SOP Class/Instance UID and transfer syntax, then the data set goes to
//! [`kade_ingest::Ingest`] exactly like a C-STORE (same validation, duplicate policy,
//! durability and audit). The response is the Store Instances Response Module: 200 when every
//! instance was stored, 202 when some failed, 409 when none was stored.
//!
//! Limits: a body larger than `max_request_bytes` gets 413 (before anything is read when
//! Content-Length says so). A request with more than `max_instances` parts gets 413 once the
//! extra part starts; the instances before it are stored and listed in the error message.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kade_auth::Action;
use kade_core::Uid;
use kade_ingest::{Expected, IngestError, Source, Stored};
use serde_json::{Value, json};

use crate::multipart::{self, MultipartError, Reader};
use crate::qido::path_uid;
use crate::{ApiError, Caller, Web};

/// Failure reasons (PS3.18 Table 10.5.3-2 / PS3.4 Annex B).
mod reason {
    pub const DUPLICATE: u16 = 0x0111;
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    pub const MISMATCH: u16 = 0xA900;
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
}

/// `POST /studies`.
pub async fn store(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    run(&web, &caller, &headers, body, None).await
}

/// `POST /studies/{study}`: every instance must belong to this study.
pub async fn store_in(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
    body: Body,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    run(&web, &caller, &headers, body, Some(study)).await
}

/// One instance's outcome.
#[derive(Debug)]
struct Outcome {
    sop_class: Option<String>,
    sop_instance: Option<String>,
    study: Option<String>,
    series: Option<String>,
    failure: Option<(u16, String)>,
}

async fn run(
    web: &Web,
    caller: &Caller,
    headers: &HeaderMap,
    body: Body,
    study: Option<String>,
) -> Result<Response, ApiError> {
    caller.require(Action::Store)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/related")
    {
        return Err(ApiError::UnsupportedMediaType(format!(
            "STOW-RS takes multipart/related; type=\"application/dicom\", not {ct:?}"
        )));
    }
    let boundary = multipart::boundary(ct).ok_or_else(|| {
        ApiError::BadRequest("the multipart Content-Type has no boundary parameter".into())
    })?;
    if let Some(t) = multipart::param(ct, "type") {
        if !t.eq_ignore_ascii_case("application/dicom") {
            return Err(ApiError::UnsupportedMediaType(format!(
                "Kade stores application/dicom parts; {t} (metadata + bulk data) is not supported"
            )));
        }
    }
    let max = web.options.max_request_bytes;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > max) {
        return Err(ApiError::TooLarge(format!(
            "the request is larger than the limit of {max} bytes; send fewer instances per request"
        )));
    }
    let stream = body.into_data_stream();
    let mut reader = Reader::new(stream, &boundary, max);
    let source = Source {
        actor: format!("user:{}", caller.principal.name),
        ae_title: None,
        address: Some(caller.address.to_string()),
        received_via: Some("web".into()),
    };
    let mut outcomes: Vec<Outcome> = Vec::new();
    loop {
        let part = match reader.next_part().await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => return Err(body_error(e, &outcomes)),
        };
        if outcomes.len() >= web.options.max_instances {
            return Err(ApiError::TooLarge(format!(
                "more than {} instances in one request; the first {} were processed ({} stored), \
                 send the rest in another request",
                web.options.max_instances,
                outcomes.len(),
                outcomes.iter().filter(|o| o.failure.is_none()).count()
            )));
        }
        let part_type = part.get("content-type").unwrap_or("application/dicom");
        if !part_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("application/dicom")
        {
            outcomes.push(Outcome {
                sop_class: None,
                sop_instance: None,
                study: None,
                series: None,
                failure: Some((
                    reason::CANNOT_UNDERSTAND,
                    format!("part of type {part_type} is not application/dicom"),
                )),
            });
            continue;
        }
        match store_part(web, &mut reader, &source, study.as_deref()).await {
            Ok(o) => outcomes.push(o),
            Err(e) => return Err(body_error(e, &outcomes)),
        }
    }
    let stored = outcomes.iter().filter(|o| o.failure.is_none()).count();
    let status = if outcomes.is_empty() {
        return Err(ApiError::BadRequest(
            "the request contains no instance".into(),
        ));
    } else if stored == outcomes.len() {
        StatusCode::OK
    } else if stored == 0 {
        StatusCode::CONFLICT
    } else {
        StatusCode::ACCEPTED
    };
    let body = response_body(web, headers, &outcomes, study.as_deref());
    let mut res = (status, body.to_string()).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    // The failure reason codes say little; the Warning header says what to fix.
    let reasons: Vec<String> = outcomes
        .iter()
        .filter_map(|o| {
            let (_, why) = o.failure.as_ref()?;
            Some(format!(
                "{}: {}",
                o.sop_instance.as_deref().unwrap_or("(unknown instance)"),
                why.replace('"', "'")
            ))
        })
        .take(5)
        .collect();
    if !reasons.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&format!("299 kade \"{}\"", reasons.join("; "))) {
            res.headers_mut().insert(header::WARNING, v);
        }
    }
    Ok(res)
}

fn body_error(e: MultipartError, done: &[Outcome]) -> ApiError {
    let stored = done.iter().filter(|o| o.failure.is_none()).count();
    let note = if stored > 0 {
        format!(" ({stored} instances before this point were stored)")
    } else {
        String::new()
    };
    match e {
        MultipartError::TooLarge(_) => ApiError::TooLarge(format!("{e}{note}")),
        _ => ApiError::BadRequest(format!("{e}{note}")),
    }
}

/// The File Meta group's identifiers.
#[derive(Debug)]
struct Meta {
    sop_class: String,
    sop_instance: String,
    transfer_syntax: String,
    /// Bytes from the start of the file to the first data set byte.
    len: usize,
}

/// Reads the File Meta group (always Explicit VR Little Endian) of a Part 10 head.
/// `Ok(None)`: more bytes are needed. Besides the standard layout (128-byte preamble, `DICM`,
/// meta group), it accepts the two that some toolkits write: `DICM` without the preamble, and
/// the meta group alone (pydicom writes that for a data set that has no preamble). The stored
/// blob always gets a zeroed preamble and a File Meta group built by Kade.
fn parse_meta(b: &[u8]) -> Result<Option<Meta>, String> {
    if b.len() < 132 {
        return Ok(None);
    }
    let mut pos = if &b[128..132] == b"DICM" {
        132
    } else if &b[..4] == b"DICM" {
        4
    } else if b[..2] == [0x02, 0x00] && b[4..6].iter().all(u8::is_ascii_uppercase) {
        0
    } else {
        return Err(
            "not a DICOM Part 10 file (no DICM prefix, no File Meta group); send the instance \
             with its File Meta group, which names its transfer syntax"
                .into(),
        );
    };
    let (mut class, mut inst, mut ts) = (None, None, None);
    loop {
        if b.len() < pos + 8 {
            return Ok(None);
        }
        let group = u16::from_le_bytes([b[pos], b[pos + 1]]);
        if group != 0x0002 {
            break;
        }
        let elem = u16::from_le_bytes([b[pos + 2], b[pos + 3]]);
        let vr = [b[pos + 4], b[pos + 5]];
        let (len, head) = if matches!(&vr, b"OB" | b"OW" | b"UN" | b"SQ" | b"UT" | b"UC" | b"UR") {
            if b.len() < pos + 12 {
                return Ok(None);
            }
            (
                u32::from_le_bytes([b[pos + 8], b[pos + 9], b[pos + 10], b[pos + 11]]) as usize,
                12,
            )
        } else {
            (u16::from_le_bytes([b[pos + 6], b[pos + 7]]) as usize, 8)
        };
        if len > 64 * 1024 {
            return Err("File Meta element too long".into());
        }
        if b.len() < pos + head + len {
            return Ok(None);
        }
        let value = || {
            String::from_utf8_lossy(&b[pos + head..pos + head + len])
                .trim_end_matches(['\0', ' '])
                .to_owned()
        };
        match elem {
            0x0002 => class = Some(value()),
            0x0003 => inst = Some(value()),
            0x0010 => ts = Some(value()),
            _ => {}
        }
        pos += head + len;
        if pos > 256 * 1024 {
            return Err("File Meta group too long".into());
        }
    }
    let missing = |what: &str| format!("the File Meta group has no {what}");
    Ok(Some(Meta {
        sop_class: class.ok_or_else(|| missing("Media Storage SOP Class UID"))?,
        sop_instance: inst.ok_or_else(|| missing("Media Storage SOP Instance UID"))?,
        transfer_syntax: ts.ok_or_else(|| missing("Transfer Syntax UID"))?,
        len: pos,
    }))
}

/// Reads one part into the ingest path. Errors are errors of the body as a whole; a bad
/// instance is an [`Outcome`] with a failure.
async fn store_part<S, E>(
    web: &Web,
    reader: &mut Reader<S>,
    source: &Source,
    study: Option<&str>,
) -> Result<Outcome, MultipartError>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    let fail = |code: u16, why: String| Outcome {
        sop_class: None,
        sop_instance: None,
        study: None,
        series: None,
        failure: Some((code, why)),
    };
    // Collect the head until the File Meta group is complete.
    let mut head: Vec<u8> = Vec::new();
    let meta = loop {
        match parse_meta(&head) {
            Ok(Some(m)) => break m,
            Ok(None) => match reader.next_chunk().await? {
                Some(c) => head.extend_from_slice(&c),
                None => {
                    return Ok(fail(
                        reason::CANNOT_UNDERSTAND,
                        "the part ends before its File Meta group does".into(),
                    ));
                }
            },
            Err(why) => {
                while reader.next_chunk().await?.is_some() {}
                return Ok(fail(reason::CANNOT_UNDERSTAND, why));
            }
        }
    };
    let ids = (
        Uid::new(&meta.sop_class),
        Uid::new(&meta.sop_instance),
        Uid::new(&meta.transfer_syntax),
    );
    let (Ok(sop_class_uid), Ok(sop_instance_uid), Ok(transfer_syntax)) = ids else {
        while reader.next_chunk().await?.is_some() {}
        return Ok(fail(
            reason::CANNOT_UNDERSTAND,
            "a UID in the File Meta group is malformed".into(),
        ));
    };
    let mut outcome = Outcome {
        sop_class: Some(meta.sop_class.clone()),
        sop_instance: Some(meta.sop_instance.clone()),
        study: None,
        series: None,
        failure: None,
    };
    let expected = Expected {
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax,
        study_uid: study.and_then(|s| Uid::new(s).ok()),
    };
    let mut incoming = match web.ingest.begin_dataset(expected).await {
        Ok(i) => i,
        Err(e) => {
            while reader.next_chunk().await?.is_some() {}
            outcome.failure = Some((reason::OUT_OF_RESOURCES, failure_text(&e)));
            return Ok(outcome);
        }
    };
    let mut write_error = None;
    if let Err(e) = incoming.write(&head[meta.len..]).await {
        write_error = Some(e);
    }
    drop(head);
    while let Some(chunk) = reader.next_chunk().await? {
        if write_error.is_none() {
            if let Err(e) = incoming.write(&chunk).await {
                write_error = Some(e);
            }
        }
    }
    if let Some(e) = write_error {
        outcome.failure = Some((reason::OUT_OF_RESOURCES, failure_text(&e)));
        return Ok(outcome);
    }
    match web.ingest.finish(incoming, source).await {
        Ok(
            Stored::New(s)
            | Stored::AlreadyPresent(s)
            | Stored::KeptExisting(s)
            | Stored::Replaced(s),
        ) => {
            outcome.study = Some(s.study_uid.as_str().to_owned());
            outcome.series = web
                .index
                .instance(s.sop_instance_uid.as_str())
                .await
                .ok()
                .flatten()
                .map(|r| r.series_uid);
        }
        Err(e) => {
            let code = match &e {
                IngestError::Invalid(_) => reason::CANNOT_UNDERSTAND,
                IngestError::Mismatch(_) => reason::MISMATCH,
                IngestError::Conflict(_) => reason::DUPLICATE,
                IngestError::Storage(_) | IngestError::Index(_) => reason::OUT_OF_RESOURCES,
            };
            if matches!(e, IngestError::Storage(_) | IngestError::Index(_)) {
                tracing::error!(error = %e, "STOW-RS: cannot store an instance");
            }
            outcome.failure = Some((code, failure_text(&e)));
        }
    }
    Ok(outcome)
}

/// The reason text for a client: ingest errors describe the data, except storage and index
/// failures, whose details stay in the server log.
fn failure_text(e: &IngestError) -> String {
    match e {
        IngestError::Storage(_) | IngestError::Index(_) => {
            "storage is unavailable; try again later".to_owned()
        }
        other => other.to_string(),
    }
}

fn response_body(
    web: &Web,
    headers: &HeaderMap,
    outcomes: &[Outcome],
    study: Option<&str>,
) -> Value {
    let base = web.base_url(headers);
    let ui = |v: &Option<String>| match v {
        Some(s) => json!({ "vr": "UI", "Value": [s] }),
        None => json!({ "vr": "UI" }),
    };
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    for o in outcomes {
        match &o.failure {
            None => {
                let url = match (&o.study, &o.series, &o.sop_instance) {
                    (Some(st), Some(se), Some(i)) => {
                        format!("{base}/studies/{st}/series/{se}/instances/{i}")
                    }
                    (Some(st), _, _) => format!("{base}/studies/{st}"),
                    _ => base.clone(),
                };
                referenced.push(json!({
                    "00081150": ui(&o.sop_class),
                    "00081155": ui(&o.sop_instance),
                    "00081190": { "vr": "UR", "Value": [url] },
                }));
            }
            Some((code, why)) => {
                failed.push(json!({
                    "00081150": ui(&o.sop_class),
                    "00081155": ui(&o.sop_instance),
                    "00081197": { "vr": "US", "Value": [code] },
                }));
                let _ = why;
            }
        }
    }
    let mut out = serde_json::Map::new();
    let study_uid = study.map(str::to_owned).or_else(|| {
        let mut studies = outcomes.iter().filter_map(|o| o.study.clone());
        let first = studies.next()?;
        studies.all(|s| s == first).then_some(first)
    });
    if let Some(st) = study_uid {
        out.insert(
            "00081190".into(),
            json!({ "vr": "UR", "Value": [format!("{base}/studies/{st}")] }),
        );
    }
    if !failed.is_empty() {
        out.insert("00081198".into(), json!({ "vr": "SQ", "Value": failed }));
    }
    if !referenced.is_empty() {
        out.insert(
            "00081199".into(),
            json!({ "vr": "SQ", "Value": referenced }),
        );
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta_bytes() -> Vec<u8> {
        let mut b = vec![0u8; 128];
        b.extend_from_slice(b"DICM");
        let mut el = |elem: u16, vr: &[u8; 2], v: &[u8]| {
            b.extend_from_slice(&2u16.to_le_bytes());
            b.extend_from_slice(&elem.to_le_bytes());
            b.extend_from_slice(vr);
            if vr == b"OB" {
                b.extend_from_slice(&[0, 0]);
                b.extend_from_slice(&(v.len() as u32).to_le_bytes());
            } else {
                b.extend_from_slice(&(v.len() as u16).to_le_bytes());
            }
            b.extend_from_slice(v);
        };
        el(0x0001, b"OB", &[0, 1]);
        el(0x0002, b"UI", b"1.2.840.10008.5.1.4.1.1.2\0");
        el(0x0003, b"UI", b"1.2.3.4\0");
        el(0x0010, b"UI", b"1.2.840.10008.1.2.1\0");
        b
    }

    #[test]
    fn file_meta_is_read_incrementally() {
        let mut b = meta_bytes();
        let meta_len = b.len();
        b.extend_from_slice(&[0x08, 0x00, 0x05, 0x00]);
        b.extend_from_slice(b"CS\x0a\x00ISO_IR 100");
        for cut in [0, 100, 131, 140, meta_len - 1] {
            assert!(parse_meta(&b[..cut]).unwrap().is_none(), "cut {cut}");
        }
        let m = parse_meta(&b).unwrap().unwrap();
        assert_eq!(m.sop_class, "1.2.840.10008.5.1.4.1.1.2");
        assert_eq!(m.sop_instance, "1.2.3.4");
        assert_eq!(m.transfer_syntax, "1.2.840.10008.1.2.1");
        assert_eq!(m.len, meta_len);
        let mut bad = b.clone();
        bad[128] = b'X';
        assert!(parse_meta(&bad).is_err());
        // The meta group without preamble and prefix, as pydicom writes it.
        let mut bare = b[132..].to_vec();
        bare.extend_from_slice(&[0u8; 200]);
        let m = parse_meta(&bare).unwrap().unwrap();
        assert_eq!(m.sop_instance, "1.2.3.4");
        assert_eq!(m.len, meta_len - 132);
    }
}

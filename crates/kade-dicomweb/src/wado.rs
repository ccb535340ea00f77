//! WADO-RS (PS3.18 §10.4): instances, metadata, frames and bulk data.
//!
//! - Instances are streamed from the blob store as `multipart/related; type="application/dicom"`,
//!   one part per instance, a blob's chunks forwarded as they arrive: memory stays bounded
//!   whatever the size of the study. Each part's transfer syntax is selected per instance
//!   ([`select`], PS3.18 §8.7.3, §8.7.8.2): without a `transfer-syntax` parameter it is the
//!   default, Explicit VR Little Endian (native syntaxes are re-encoded, lossless compressed
//!   ones decompressed where Kade has the codec; lossy ones stay as received, as §8.7.3.4
//!   permits); `transfer-syntax=*` gives the stored bytes; a named syntax gives that one or a
//!   406. Implicit VR Little Endian and Explicit VR Big Endian "shall not be used with Web
//!   Services" (§8.7.3): instances stored in them always leave in Explicit VR Little Endian,
//!   and a request for them is a 406.
//! - Metadata comes from the DICOM JSON stored at ingest: the instance's JSON is spliced into
//!   the response as text, with its relative BulkDataURIs made absolute. No blob is read.
//! - Frames and bulk data read the instance's blob.
//!
//! A UID in the path is validated before any use (400), and the path's hierarchy must hold:
//! an instance requested under the wrong study or series is 404.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;
use kade_audit::{EventKind, Outcome};
use kade_auth::Action;
use kade_index::query::{InstanceKey, InstanceRow, LevelQuery};

use crate::multipart;
use crate::qido::path_uid;
use crate::{ApiError, Caller, Web};

/// Explicit VR Little Endian.
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// What an `Accept` header asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Wanted {
    /// The media type of the parts (`application/dicom`, `application/octet-stream`...).
    pub media_type: String,
    /// The transfer syntax asked for; `None` when `*` or absent.
    pub transfer_syntax: Option<String>,
    /// Whether `transfer-syntax=*` was given (any syntax, the stored one preferred).
    pub any: bool,
}

/// Reads the first acceptable entry of an `Accept` header. `default_type` is the part type
/// used when the header names none (or only `*/*`).
pub(crate) fn wanted(headers: &HeaderMap, default_type: &str) -> Wanted {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    for range in accept.split(',') {
        let range = range.trim();
        let base = range
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let (media_type, ts) = if base == "multipart/related" {
            (
                multipart::param(range, "type").unwrap_or_else(|| default_type.to_owned()),
                multipart::param(range, "transfer-syntax"),
            )
        } else if base.is_empty() || base == "*/*" {
            continue;
        } else {
            (base, multipart::param(range, "transfer-syntax"))
        };
        let media_type = if media_type == "*/*" || media_type.is_empty() {
            default_type.to_owned()
        } else {
            media_type.to_ascii_lowercase()
        };
        return Wanted {
            media_type,
            any: ts.as_deref() == Some("*"),
            transfer_syntax: ts.filter(|t| t != "*"),
        };
    }
    Wanted {
        media_type: default_type.to_owned(),
        transfer_syntax: None,
        any: false,
    }
}

/// Instances of a study / series / one instance, visible to the caller. 404 when none.
pub(crate) async fn instances(
    web: &Web,
    caller: &Caller,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Vec<InstanceRow>, ApiError> {
    if !caller.principal.may_see_study(study) {
        return Err(ApiError::NotFound("no such study".into()));
    }
    let mut matches = vec![(InstanceKey::StudyInstanceUid, study.to_owned())];
    if let Some(se) = series {
        matches.push((InstanceKey::SeriesInstanceUid, se.to_owned()));
    }
    if let Some(i) = instance {
        matches.push((InstanceKey::SopInstanceUid, i.to_owned()));
    }
    let rows = web
        .index
        .find_instances(&LevelQuery {
            matches,
            limit: None,
            offset: 0,
        })
        .await??;
    if rows.is_empty() {
        return Err(ApiError::NotFound(
            match (series, instance) {
                (_, Some(_)) => "no such instance in this study and series",
                (Some(_), None) => "no such series in this study",
                (None, None) => "no such study",
            }
            .into(),
        ));
    }
    Ok(rows)
}

pub(crate) async fn audit_retrieve(web: &Web, caller: &Caller, study: &str, what: &str, n: usize) {
    let mut ev = caller
        .event(EventKind::Retrieve, Outcome::Success)
        .detail(format!("WADO-RS {what} ({n} instances)"));
    ev.study_uid = Some(study.to_owned());
    ev.patient_id = web.index.study_patient(study).await.ok().flatten();
    web.audit(ev).await;
}

/// Transfer syntaxes whose pixel data is always lossless: decompressed for a request without
/// a transfer syntax (PS3.18 §8.7.3.4 lets only lossy ones leave compressed by default).
const LOSSLESS_ONLY: &[&str] = &[
    "1.2.840.10008.1.2.5",     // RLE Lossless
    "1.2.840.10008.1.2.4.57",  // JPEG Lossless
    "1.2.840.10008.1.2.4.70",  // JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  // JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.201", // HTJ2K Lossless
    "1.2.840.10008.1.2.4.202", // HTJ2K Lossless RPCL
];

/// The Selected Transfer Syntax of one instance's part (PS3.18 §8.7.8.2): `None` to send it
/// as stored, `Some(ts)` to re-encode it; 406 when the request names a syntax Kade cannot
/// produce for it.
///
/// # Errors
/// [`ApiError::NotAcceptable`] with what to ask for instead.
pub(crate) fn select(want: &Wanted, r: &InstanceRow) -> Result<Option<&'static str>, ApiError> {
    use kade_core::transcode::{EXPLICIT_BE, EXPLICIT_LE as ELE, IMPLICIT_LE, is_native};
    let stored = r.transfer_syntax_uid.as_str();
    let decodable = || kade_pixel::can_decode_layout(stored, r.bits_allocated);
    let to_ele = |ok: bool| {
        if stored == ELE || !ok {
            None
        } else {
            Some(ELE)
        }
    };
    match want.transfer_syntax.as_deref() {
        Some(IMPLICIT_LE | EXPLICIT_BE) => Err(ApiError::NotAcceptable(
            "Implicit VR Little Endian and Explicit VR Big Endian are not used with Web \
             Services (PS3.18 8.7.3): ask for transfer-syntax=1.2.840.10008.1.2.1 or *"
                .into(),
        )),
        Some(ELE) if stored == ELE || is_native(stored) || decodable() => Ok(to_ele(true)),
        Some(ELE) => Err(ApiError::NotAcceptable(format!(
            "instance {} is stored compressed ({stored}), which Kade cannot decompress; ask \
             for transfer-syntax=* to get it as stored",
            r.sop_uid
        ))),
        Some(other) if other == stored => Ok(None),
        Some(_) => Err(ApiError::NotAcceptable(format!(
            "instance {} is stored in transfer syntax {stored}, and Kade re-encodes only to \
             Explicit VR Little Endian; ask for transfer-syntax=* to get it as stored",
            r.sop_uid
        ))),
        // Never in a syntax Web Services do not use, whatever else was asked.
        None if stored == IMPLICIT_LE || stored == EXPLICIT_BE => Ok(Some(ELE)),
        None if want.any => Ok(None),
        None if is_native(stored) => Ok(to_ele(true)),
        None => Ok(to_ele(LOSSLESS_ONLY.contains(&stored) && decodable())),
    }
}

/// Streams `rows` as multipart/related application/dicom.
async fn retrieve(
    web: &Web,
    caller: &Caller,
    headers: &HeaderMap,
    rows: Vec<InstanceRow>,
    study: &str,
    what: &str,
) -> Result<Response, ApiError> {
    caller.require(Action::Retrieve)?;
    let want = wanted(headers, "application/dicom");
    if want.media_type != "application/dicom" {
        return Err(ApiError::NotAcceptable(format!(
            "instances are retrieved as application/dicom, not {}",
            want.media_type
        )));
    }
    // Every part's syntax is settled before the status is sent, so that a 406 is a 406.
    let targets = rows
        .iter()
        .map(|r| select(&want, r))
        .collect::<Result<Vec<_>, _>>()?;
    audit_retrieve(web, caller, study, what, rows.len()).await;
    let boundary = multipart::new_boundary();
    let content_type =
        format!("multipart/related; type=\"application/dicom\"; boundary={boundary}");
    let store = web.store.clone();
    let b = boundary.clone();
    // Two parts in flight: the next instance's first piece (all of it, for most instances) is
    // read while the current one is sent. Memory stays bounded by the store's piece size.
    let parts = futures::stream::iter(rows.into_iter().zip(targets)).map(move |(r, convert)| {
        let store = store.clone();
        let b = b.clone();
        async move {
            let head = multipart::part_head(
                &b,
                &format!(
                    "application/dicom; transfer-syntax={}",
                    convert.unwrap_or(&r.transfer_syntax_uid)
                ),
                &[],
            );
            if let Some(t) = convert {
                // Re-encoding needs the whole instance in memory (one instance at a time).
                let blob = store.get(&r.blob_key).await;
                let stored_ts = r.transfer_syntax_uid.clone();
                let out = match blob {
                    Ok(blob) => tokio::task::spawn_blocking(move || {
                        kade_pixel::to_native(&blob, &stored_ts, t).inspect_err(
                            |e| tracing::warn!(error = %e, "WADO-RS: cannot re-encode"),
                        )
                    })
                    .await
                    .ok()
                    .and_then(Result::ok),
                    Err(_) => None,
                };
                return match out {
                    Some(bytes) => futures::stream::iter([
                        Ok(head),
                        Ok(Bytes::from(bytes)),
                        Ok(Bytes::from_static(b"\r\n")),
                    ])
                    .boxed(),
                    None => {
                        tracing::error!(sop = %r.sop_uid, "WADO-RS: cannot re-encode");
                        futures::stream::once(async {
                            Err(std::io::Error::other("cannot re-encode"))
                        })
                        .boxed()
                    }
                };
            }
            let body = match store.get_stream(&r.blob_key).await {
                Ok(s) => s,
                Err(e) => {
                    // Headers are sent: the only honest signal left is to break the stream.
                    tracing::error!(error = %e, sop = %r.sop_uid, "WADO-RS: blob unreadable");
                    return futures::stream::once(async move {
                        Err(std::io::Error::other("blob unreadable"))
                    })
                    .boxed();
                }
            };
            futures::stream::once(async move { Ok(head) })
                .chain(body.map(|c| c.map_err(|e| std::io::Error::other(e.to_string()))))
                .chain(futures::stream::once(async {
                    Ok(Bytes::from_static(b"\r\n"))
                }))
                .boxed()
        }
    });
    let end = multipart::closing(&boundary);
    let stream = parts
        .buffered(2)
        .flatten()
        .chain(futures::stream::once(async move { Ok(end) }));
    let mut res = Body::from_stream(stream).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type)
            .map_err(|e| ApiError::Internal(format!("content type: {e}")))?,
    );
    Ok(res)
}

/// `GET /studies/{study}`.
pub async fn study(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    caller.require(Action::Retrieve)?;
    let rows = instances(&web, &caller, &study, None, None).await?;
    retrieve(&web, &caller, &headers, rows, &study, "study").await
}

/// `GET /studies/{study}/series/{series}`.
pub async fn series(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    let series = path_uid("Series Instance UID", &series)?;
    caller.require(Action::Retrieve)?;
    let rows = instances(&web, &caller, &study, Some(&series), None).await?;
    retrieve(&web, &caller, &headers, rows, &study, "series").await
}

/// `GET /studies/{study}/series/{series}/instances/{instance}`.
pub async fn instance(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series, instance)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    let series = path_uid("Series Instance UID", &series)?;
    let instance = path_uid("SOP Instance UID", &instance)?;
    caller.require(Action::Retrieve)?;
    let rows = instances(&web, &caller, &study, Some(&series), Some(&instance)).await?;
    retrieve(&web, &caller, &headers, rows, &study, "instance").await
}

// ---- metadata ------------------------------------------------------------------------------

/// Writes the stored JSON of each instance into one JSON array, making BulkDataURIs absolute.
fn metadata_array(base: &str, study: &str, items: &[(String, String, String)]) -> String {
    let total: usize = items.iter().map(|(_, _, j)| j.len() + 64).sum();
    let mut out = String::with_capacity(total + 2);
    out.push('[');
    for (n, (series, sop, json)) in items.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        let prefix = format!(
            "\"BulkDataURI\":\"{base}/studies/{study}/series/{series}/instances/{sop}/bulkdata/"
        );
        out.push_str(&json.replace("\"BulkDataURI\":\"bulkdata/", &prefix));
    }
    out.push(']');
    out
}

async fn metadata(
    web: &Web,
    caller: &Caller,
    headers: &HeaderMap,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Response, ApiError> {
    caller.require(Action::Retrieve)?;
    if !caller.principal.may_see_study(study) {
        return Err(ApiError::NotFound("no such study".into()));
    }
    let items = match instance {
        Some(sop) => {
            let row = web.index.instance(sop).await?;
            match (row, web.index.instance_metadata(sop).await?) {
                (Some(r), Some(json))
                    if r.study_uid == study && Some(r.series_uid.as_str()) == series =>
                {
                    vec![(r.series_uid, r.sop_uid, json)]
                }
                _ => Vec::new(),
            }
        }
        None => web.index.metadata_of(study, series).await?,
    };
    if items.is_empty() {
        return Err(ApiError::NotFound(
            match (series, instance) {
                (_, Some(_)) => "no such instance in this study and series",
                (Some(_), None) => "no such series in this study",
                (None, None) => "no such study",
            }
            .into(),
        ));
    }
    let what = match (series, instance) {
        (_, Some(_)) => "instance metadata",
        (Some(_), None) => "series metadata",
        (None, None) => "study metadata",
    };
    audit_retrieve(web, caller, study, what, items.len()).await;
    let body = metadata_array(&web.base_url(headers), study, &items);
    let mut res = body.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/dicom+json"),
    );
    Ok(res)
}

/// `GET /studies/{study}/metadata`.
pub async fn study_metadata(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    metadata(&web, &caller, &headers, &study, None, None).await
}

/// `GET /studies/{study}/series/{series}/metadata`.
pub async fn series_metadata(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    let series = path_uid("Series Instance UID", &series)?;
    metadata(&web, &caller, &headers, &study, Some(&series), None).await
}

/// `GET /studies/{study}/series/{series}/instances/{instance}/metadata`.
pub async fn instance_metadata(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series, instance)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    let series = path_uid("Series Instance UID", &series)?;
    let instance = path_uid("SOP Instance UID", &instance)?;
    metadata(
        &web,
        &caller,
        &headers,
        &study,
        Some(&series),
        Some(&instance),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_str(v).unwrap());
        h
    }

    fn stored_in(ts: &str) -> InstanceRow {
        InstanceRow {
            study_uid: "1".into(),
            series_uid: "1.1".into(),
            sop_uid: "1.1.1".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.4".into(),
            number: None,
            rows: Some(64),
            columns: Some(64),
            frames: None,
            transfer_syntax_uid: ts.into(),
            blob_key: "k".into(),
            bits_allocated: Some(16),
            patient_id: String::new(),
        }
    }

    /// PS3.18 8.7.3, 8.7.3.4 and 8.7.8.2: the Selected Transfer Syntax of each stored
    /// syntax for each request.
    #[test]
    fn selected_transfer_syntaxes() {
        const IMPLICIT: &str = "1.2.840.10008.1.2";
        const BIG: &str = "1.2.840.10008.1.2.2";
        const RLE: &str = "1.2.840.10008.1.2.5";
        const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
        const J2K_LOSSLESS: &str = "1.2.840.10008.1.2.4.90";
        let want = |ts: &str| Wanted {
            media_type: "application/dicom".into(),
            transfer_syntax: (!ts.is_empty() && ts != "*").then(|| ts.to_owned()),
            any: ts == "*",
        };
        let e = Some(EXPLICIT_LE);
        // (request, stored, Ok(selected target) or None for 406)
        let cases: &[(&str, &str, Option<Option<&str>>)] = &[
            // No transfer syntax: the default, Explicit VR Little Endian.
            ("", IMPLICIT, Some(e)),
            ("", BIG, Some(e)),
            ("", EXPLICIT_LE, Some(None)),
            ("", RLE, Some(e)),
            // Lossy: may leave as received.
            ("", JPEG_BASELINE, Some(None)),
            // `*`: as stored, but never a syntax Web Services do not use.
            ("*", RLE, Some(None)),
            ("*", JPEG_BASELINE, Some(None)),
            ("*", IMPLICIT, Some(e)),
            ("*", BIG, Some(e)),
            // A named syntax: that one, or 406.
            (EXPLICIT_LE, IMPLICIT, Some(e)),
            (EXPLICIT_LE, RLE, Some(e)),
            (RLE, RLE, Some(None)),
            (J2K_LOSSLESS, EXPLICIT_LE, None),
            (IMPLICIT, IMPLICIT, None),
            (BIG, EXPLICIT_LE, None),
        ];
        for (ts, stored, expect) in cases {
            let got = select(&want(ts), &stored_in(stored)).ok();
            assert_eq!(got, *expect, "request {ts:?}, stored {stored}");
        }
    }

    #[test]
    fn accept_headers() {
        let w = wanted(
            &accept("multipart/related; type=\"application/dicom\"; transfer-syntax=*"),
            "application/dicom",
        );
        assert_eq!(w.media_type, "application/dicom");
        assert_eq!(w.transfer_syntax, None);
        let w = wanted(
            &accept(
                "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1",
            ),
            "application/dicom",
        );
        assert_eq!(w.media_type, "application/octet-stream");
        assert_eq!(w.transfer_syntax.as_deref(), Some(EXPLICIT_LE));
        let w = wanted(&HeaderMap::new(), "application/dicom");
        assert_eq!(w.media_type, "application/dicom");
        let w = wanted(&accept("*/*"), "application/octet-stream");
        assert_eq!(w.media_type, "application/octet-stream");
    }

    #[test]
    fn bulk_data_uris_become_absolute() {
        let items = vec![(
            "1.2".to_owned(),
            "1.2.3".to_owned(),
            r#"{"7FE00010":{"vr":"OW","BulkDataURI":"bulkdata/7FE00010"}}"#.to_owned(),
        )];
        let s = metadata_array("https://h/dicom-web", "1", &items);
        assert_eq!(
            s,
            r#"[{"7FE00010":{"vr":"OW","BulkDataURI":"https://h/dicom-web/studies/1/series/1.2/instances/1.2.3/bulkdata/7FE00010"}}]"#
        );
    }
}

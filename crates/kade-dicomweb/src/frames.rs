//! WADO-RS frames and bulk data: these read the instance's blob and cut out a frame or an
//! element (in a blocking task).
//!
//! Frames are returned as stored: the native pixel bytes of the frame, or the compressed
//! bitstream of an encapsulated one with its media type (image/jpeg, image/jls, image/jp2,
//! image/dicom-rle…), which is what viewers such as OHIF decode themselves. Decompression to
//! native pixels on request is not done yet: such a request gets 406.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kade_index::query::InstanceRow;

use crate::multipart;
use crate::qido::path_uid;
use crate::wado::{EXPLICIT_LE, audit_retrieve, instances, wanted};

use crate::{ApiError, Caller, Web};
use kade_auth::Action;

/// Parses a frame list (`1`, `1,3,5`), 1-based.
pub(crate) fn frame_list(s: &str) -> Result<Vec<u32>, ApiError> {
    let list: Result<Vec<u32>, _> = s.split(',').map(|f| f.trim().parse::<u32>()).collect();
    match list {
        Ok(l) if !l.is_empty() && l.iter().all(|&n| n >= 1) && l.len() <= 10_000 => Ok(l),
        _ => Err(ApiError::BadRequest(format!(
            "frame list {s:?} must be comma-separated frame numbers starting at 1"
        ))),
    }
}

/// One instance's row and blob, after the path and access checks.
async fn one_instance(
    web: &Web,
    caller: &Caller,
    (study, series, instance): (String, String, String),
) -> Result<(InstanceRow, Bytes), ApiError> {
    let study = path_uid("Study Instance UID", &study)?;
    let series = path_uid("Series Instance UID", &series)?;
    let instance = path_uid("SOP Instance UID", &instance)?;
    caller.require(Action::Retrieve)?;
    let mut rows = instances(web, caller, &study, Some(&series), Some(&instance)).await?;
    let row = rows.remove(0);
    let blob = web.store.get(&row.blob_key).await?;
    Ok((row, blob))
}

/// The multipart response of frames or bulk data.
fn parts_response(parts: Vec<(String, Vec<u8>)>) -> Result<Response, ApiError> {
    let boundary = multipart::new_boundary();
    let first_type = parts
        .first()
        .map_or("application/octet-stream", |(t, _)| t.as_str())
        .split(';')
        .next()
        .unwrap_or("application/octet-stream")
        .to_owned();
    let mut body = Vec::with_capacity(parts.iter().map(|(_, b)| b.len() + 128).sum());
    for (t, bytes) in &parts {
        body.extend_from_slice(&multipart::part_head(&boundary, t, &[]));
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(&multipart::closing(&boundary));
    let mut res = body.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&format!(
            "multipart/related; type=\"{first_type}\"; boundary={boundary}"
        ))
        .map_err(|e| ApiError::Internal(format!("content type: {e}")))?,
    );
    Ok(res)
}

/// `GET /studies/{study}/series/{series}/instances/{instance}/frames/{frames}`.
pub async fn frames(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series, instance, list)): Path<(String, String, String, String)>,
) -> Result<Response, ApiError> {
    let list = frame_list(&list)?;
    let (row, blob) = one_instance(&web, &caller, (study, series, instance)).await?;
    let want = wanted(&headers, "application/octet-stream");
    let stored_ts = row.transfer_syntax_uid.clone();
    let as_stored = match &want.transfer_syntax {
        None => true,
        Some(ts) => ts == &stored_ts,
    };
    let decompress = !as_stored && !kade_core::transcode::is_native(&stored_ts);
    if decompress && !kade_pixel::can_decode_layout(&stored_ts, row.bits_allocated) {
        return Err(ApiError::NotAcceptable(format!(
            "the frames are stored compressed ({stored_ts}), which Kade cannot decompress; ask \
             for transfer-syntax=* to get them as stored"
        )));
    }
    let parts = tokio::task::spawn_blocking(move || -> Result<Vec<(String, Vec<u8>)>, ApiError> {
        if decompress {
            let mut out = Vec::with_capacity(list.len());
            for n in list {
                let (_, bytes) = kade_pixel::decoded_frame(&blob, n).map_err(pixel_error)?;
                out.push((
                    format!("application/octet-stream; transfer-syntax={EXPLICIT_LE}"),
                    bytes,
                ));
            }
            return Ok(out);
        }
        let px = Pixels::read(&blob)?;
        let mut out = Vec::with_capacity(list.len());
        for n in list {
            let bytes = px.frame(n)?;
            let t = if px.encapsulated {
                format!(
                    "{}; transfer-syntax={}",
                    media_type_of(&px.transfer_syntax),
                    px.transfer_syntax
                )
            } else {
                format!("application/octet-stream; transfer-syntax={EXPLICIT_LE}")
            };
            out.push((t, bytes));
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("frame task: {e}")))??;
    audit_retrieve(
        &web,
        &caller,
        &row.study_uid,
        &format!("frames of {}", row.sop_uid),
        1,
    )
    .await;
    parts_response(parts)
}

/// A decoding failure as an HTTP answer: a frame that does not exist is 404, pixel data that
/// Kade cannot decode or that is damaged is 406 with the reason.
fn pixel_error(e: kade_pixel::PixelError) -> ApiError {
    use kade_pixel::PixelError as P;
    match e {
        P::FrameOutOfRange { .. } => ApiError::NotFound(e.to_string()),
        P::NoPixelData => ApiError::NotFound(e.to_string()),
        P::Encode(_) => ApiError::Internal(e.to_string()),
        _ => ApiError::NotAcceptable(e.to_string()),
    }
}

/// An instance's pixel data, parsed from its blob.
struct Pixels {
    transfer_syntax: String,
    layout: crate::render::Layout,
    encapsulated: bool,
    frames: u32,
    /// Native: the whole pixel data. Encapsulated: unused.
    native: Vec<u8>,
    /// Encapsulated: the fragments and the Basic Offset Table.
    fragments: Vec<Vec<u8>>,
    offsets: Vec<u32>,
}

impl Pixels {
    fn read(blob: &[u8]) -> Result<Pixels, ApiError> {
        use dicom_dictionary_std::tags;
        let obj = dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(blob)
            .map_err(|e| ApiError::Internal(format!("stored instance unreadable: {e}")))?;
        let transfer_syntax = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_owned();
        let frames = obj
            .get(tags::NUMBER_OF_FRAMES)
            .and_then(|e| e.to_int::<u32>().ok())
            .unwrap_or(1)
            .max(1);
        let int = |t| obj.get(t).and_then(|e| e.to_int::<i64>().ok());
        let float = |t| obj.get(t).and_then(|e| e.to_float64().ok());
        let text = |t| {
            obj.get(t)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches(['\0', ' ']).to_owned())
                .unwrap_or_default()
        };
        let layout = crate::render::Layout {
            rows: int(tags::ROWS).unwrap_or(0).max(0) as u32,
            columns: int(tags::COLUMNS).unwrap_or(0).max(0) as u32,
            samples: int(tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16,
            bits_allocated: int(tags::BITS_ALLOCATED).unwrap_or(16) as u16,
            bits_stored: int(tags::BITS_STORED)
                .or(int(tags::BITS_ALLOCATED))
                .unwrap_or(16) as u16,
            signed: int(tags::PIXEL_REPRESENTATION) == Some(1),
            photometric: text(tags::PHOTOMETRIC_INTERPRETATION),
            planar: int(tags::PLANAR_CONFIGURATION) == Some(1),
            rescale: (
                float(tags::RESCALE_SLOPE).unwrap_or(1.0),
                float(tags::RESCALE_INTERCEPT).unwrap_or(0.0),
            ),
            window: match (float(tags::WINDOW_CENTER), float(tags::WINDOW_WIDTH)) {
                (Some(c), Some(w)) if w >= 1.0 => Some((c, w)),
                _ => None,
            },
        };
        let Some(px) = obj.get(tags::PIXEL_DATA) else {
            return Err(ApiError::NotFound("this instance has no pixel data".into()));
        };
        match px.value() {
            dicom_core::value::Value::PixelSequence(seq) => Ok(Pixels {
                transfer_syntax,
                layout,
                encapsulated: true,
                frames,
                native: Vec::new(),
                fragments: seq.fragments().to_vec(),
                offsets: seq.offset_table().to_vec(),
            }),
            _ => Ok(Pixels {
                transfer_syntax,
                layout,
                encapsulated: false,
                frames,
                native: px
                    .to_bytes()
                    .map_err(|e| ApiError::Internal(format!("pixel data: {e}")))?
                    .into_owned(),
                fragments: Vec::new(),
                offsets: Vec::new(),
            }),
        }
    }

    /// Frame `n` (1-based) as stored.
    fn frame(&self, n: u32) -> Result<Vec<u8>, ApiError> {
        if n > self.frames {
            return Err(ApiError::NotFound(format!(
                "frame {n} does not exist: the instance has {} frames",
                self.frames
            )));
        }
        let i = (n - 1) as usize;
        if !self.encapsulated {
            let len = self.native.len() / self.frames as usize;
            return Ok(self.native[i * len..(i + 1) * len].to_vec());
        }
        if self.frames == 1 {
            return Ok(self.fragments.concat());
        }
        if self.fragments.len() == self.frames as usize {
            return Ok(self.fragments[i].clone());
        }
        if self.offsets.len() == self.frames as usize {
            // Fragments belong to the frame whose offset range holds them (each fragment
            // takes its length plus an 8-byte item header).
            let (start, end) = (
                u64::from(self.offsets[i]),
                self.offsets.get(i + 1).map_or(u64::MAX, |o| u64::from(*o)),
            );
            let mut pos = 0u64;
            let mut out = Vec::new();
            for f in &self.fragments {
                if pos >= start && pos < end {
                    out.extend_from_slice(f);
                }
                pos += f.len() as u64 + 8;
            }
            return Ok(out);
        }
        Err(ApiError::NotAcceptable(
            "this instance's frames cannot be told apart (no offset table, and not one fragment \
             per frame)"
                .into(),
        ))
    }
}

/// The media type of a compressed frame in a transfer syntax (PS3.18 Table 8.7.3-2).
fn media_type_of(ts: &str) -> &'static str {
    match ts {
        "1.2.840.10008.1.2.4.50"
        | "1.2.840.10008.1.2.4.51"
        | "1.2.840.10008.1.2.4.57"
        | "1.2.840.10008.1.2.4.70" => "image/jpeg",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "image/jls",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "image/jp2",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "image/jpx",
        "1.2.840.10008.1.2.5" => "image/dicom-rle",
        _ => "application/octet-stream",
    }
}

/// `GET /studies/{study}/series/{series}/instances/{instance}/bulkdata/{tag}`.
pub async fn bulkdata(
    State(web): State<Arc<Web>>,
    caller: Caller,
    Path((study, series, instance, tag)): Path<(String, String, String, String)>,
) -> Result<Response, ApiError> {
    if tag.len() != 8 || !tag.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::BadRequest(format!(
            "bulk data tag {tag:?} must be 8 hex digits, e.g. 7FE00010"
        )));
    }
    let (row, blob) = one_instance(&web, &caller, (study, series, instance)).await?;
    let group = u16::from_str_radix(&tag[..4], 16).unwrap_or(0);
    let element = u16::from_str_radix(&tag[4..], 16).unwrap_or(0);
    let label = tag.clone();
    let bytes = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let obj = dicom_object::OpenFileOptions::new()
            .read_preamble(dicom_object::file::ReadPreamble::Always)
            .from_reader(&blob[..])
            .map_err(|e| ApiError::Internal(format!("stored instance unreadable: {e}")))?;
        let el = obj
            .get(dicom_core::Tag(group, element))
            .ok_or_else(|| ApiError::NotFound(format!("the instance has no element {tag}")))?;
        if let dicom_core::value::Value::PixelSequence(seq) = el.value() {
            return Ok(seq.fragments().concat());
        }
        el.to_bytes()
            .map(std::borrow::Cow::into_owned)
            .map_err(|_| ApiError::NotFound(format!("{tag} holds no bulk data")))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("bulk data task: {e}")))??;
    audit_retrieve(
        &web,
        &caller,
        &row.study_uid,
        &format!("bulk data {label} of {}", row.sop_uid),
        1,
    )
    .await;
    parts_response(vec![("application/octet-stream".to_owned(), bytes)])
}

// ---- rendered and thumbnail -----------------------------------------------------------------

/// Renders frame `n` of the instance `(study, series, instance)`.
async fn rendered_frame(
    web: &Web,
    caller: &Caller,
    ids: (String, String, String),
    n: u32,
    params: crate::render::Params,
    what: &str,
) -> Result<Response, ApiError> {
    let (row, blob) = one_instance(web, caller, ids).await?;
    let format = params.format;
    let image = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
        let px = Pixels::read(&blob)?;
        if px.encapsulated {
            let opts = kade_pixel::RenderOptions {
                window: params.window,
                viewport: params.viewport,
                format: match params.format {
                    crate::render::Format::Jpeg => kade_pixel::ImageFormat::Jpeg,
                    crate::render::Format::Png => kade_pixel::ImageFormat::Png,
                },
                quality: params.quality,
            };
            return kade_pixel::render(&blob, n, &opts).map_err(pixel_error);
        }
        let frame = px.frame(n)?;
        let mut img = crate::render::to_image(&frame, &px.layout, params.window)?;
        if let Some(v) = params.viewport {
            img = crate::render::fit(img, v);
        }
        crate::render::encode(&img, params.format, params.quality)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("render task: {e}")))??;
    audit_retrieve(
        web,
        caller,
        &row.study_uid,
        &format!("{what} of {}", row.sop_uid),
        1,
    )
    .await;
    let mut res = image.into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.media_type()),
    );
    Ok(res)
}

fn accept(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok())
}

/// `GET …/instances/{instance}/rendered`: the first frame.
pub async fn rendered(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(ids): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = crate::render::Params::parse(q.as_deref(), accept(&headers))?;
    rendered_frame(&web, &caller, ids, 1, params, "rendered").await
}

/// `GET …/instances/{instance}/frames/{frame}/rendered`: one frame.
pub async fn rendered_frames(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series, instance, list)): Path<(String, String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let list = frame_list(&list)?;
    if list.len() != 1 {
        return Err(ApiError::BadRequest(
            "render one frame per request (e.g. frames/3/rendered)".into(),
        ));
    }
    let params = crate::render::Params::parse(q.as_deref(), accept(&headers))?;
    rendered_frame(
        &web,
        &caller,
        (study, series, instance),
        list[0],
        params,
        "rendered frame",
    )
    .await
}

/// Thumbnails are 128 pixels on their longer side unless a viewport is given.
fn thumbnail_params(
    q: Option<&str>,
    headers: &HeaderMap,
) -> Result<crate::render::Params, ApiError> {
    let mut p = crate::render::Params::parse(q, accept(headers))?;
    p.viewport.get_or_insert((128, 128));
    Ok(p)
}

/// `GET …/instances/{instance}/thumbnail`.
pub async fn thumbnail(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(ids): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    let params = thumbnail_params(q.as_deref(), &headers)?;
    rendered_frame(&web, &caller, ids, 1, params, "thumbnail").await
}

/// `GET /studies/{study}/series/{series}/thumbnail` and `GET /studies/{study}/thumbnail`:
/// the middle image of the (first) series.
async fn representative_thumbnail(
    web: &Web,
    caller: &Caller,
    headers: &HeaderMap,
    study: String,
    series: Option<String>,
    q: Option<&str>,
) -> Result<Response, ApiError> {
    let params = thumbnail_params(q, headers)?;
    let study = path_uid("Study Instance UID", &study)?;
    let series = series
        .map(|s| path_uid("Series Instance UID", &s))
        .transpose()?;
    caller.require(Action::Retrieve)?;
    let rows = instances(web, caller, &study, series.as_deref(), None).await?;
    let first_series = rows[0].series_uid.clone();
    let in_series: Vec<&InstanceRow> = rows
        .iter()
        .filter(|r| r.series_uid == first_series && r.rows.is_some())
        .collect();
    let Some(pick) = in_series.get(in_series.len() / 2) else {
        return Err(ApiError::NotFound("no image to make a thumbnail of".into()));
    };
    let ids = (
        pick.study_uid.clone(),
        pick.series_uid.clone(),
        pick.sop_uid.clone(),
    );
    rendered_frame(web, caller, ids, 1, params, "thumbnail").await
}

/// `GET /studies/{study}/series/{series}/thumbnail`.
pub async fn series_thumbnail(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    representative_thumbnail(&web, &caller, &headers, study, Some(series), q.as_deref()).await
}

/// `GET /studies/{study}/thumbnail`.
pub async fn study_thumbnail(
    State(web): State<Arc<Web>>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    representative_thumbnail(&web, &caller, &headers, study, None, q.as_deref()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_lists() {
        assert_eq!(frame_list("1,3,5").unwrap(), vec![1, 3, 5]);
        assert!(frame_list("0").is_err());
        assert!(frame_list("a").is_err());
        assert!(frame_list("").is_err());
    }
}

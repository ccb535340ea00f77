//! Errors of the DICOMweb service, each with its HTTP status and a message for the client
//! that says what went wrong and what to do, never how Kade is built inside.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kade_auth::Denied;

/// A request that could not be answered.
#[derive(Debug)]
pub enum ApiError {
    /// 400: the request is malformed (bad UID, bad query value, bad multipart).
    BadRequest(String),
    /// 401: no usable credentials.
    Unauthorized(Denied),
    /// 403: authenticated, but the role does not allow this.
    Forbidden(String),
    /// 404: no such study/series/instance (or not visible to this caller).
    NotFound(String),
    /// 406: the requested representation cannot be produced.
    NotAcceptable(String),
    /// 409: STOW-RS stored none of the instances.
    Conflict(String),
    /// 413: the request is larger than configured.
    TooLarge(String),
    /// 415: the request body is not of a supported media type.
    UnsupportedMediaType(String),
    /// 500: something failed inside Kade; the detail goes to the server log only.
    Internal(String),
    /// 503: storage or index unavailable; the detail goes to the server log only.
    Unavailable(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl From<kade_index::IndexError> for ApiError {
    fn from(e: kade_index::IndexError) -> Self {
        ApiError::Unavailable(format!("index: {e}"))
    }
}

impl From<kade_store::StoreError> for ApiError {
    fn from(e: kade_store::StoreError) -> Self {
        ApiError::Unavailable(format!("blob store: {e}"))
    }
}

impl From<kade_index::query::QueryError> for ApiError {
    fn from(e: kade_index::query::QueryError) -> Self {
        ApiError::BadRequest(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::BadRequest(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::NotAcceptable(m)
            | ApiError::Conflict(m)
            | ApiError::TooLarge(m)
            | ApiError::UnsupportedMediaType(m) => m.clone(),
            ApiError::Unauthorized(d) => format!(
                "authentication required ({}): send Authorization: Bearer TOKEN; an administrator \
                 creates tokens with kade token create",
                d.as_str()
            ),
            ApiError::Internal(detail) => {
                tracing::error!(detail = %detail, "internal error in a DICOMweb request");
                "internal error; the details are in the server log".to_owned()
            }
            ApiError::Unavailable(detail) => {
                tracing::error!(detail = %detail, "storage unavailable for a DICOMweb request");
                "storage is unavailable; try again later".to_owned()
            }
        };
        let body = serde_json::json!({ "error": message }).to_string();
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ApiError::Unauthorized(d) = self {
            let v = format!(
                "Bearer realm=\"kade\", error=\"invalid_token\", error_description=\"{}\"",
                d.as_str()
            );
            let v = if d == Denied::Missing {
                "Bearer realm=\"kade\"".to_owned()
            } else {
                v
            };
            if let Ok(v) = HeaderValue::from_str(&v) {
                res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
        }
        res
    }
}

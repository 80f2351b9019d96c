//! API errors and their HTTP mapping: every failure answers JSON `{"error": "..."}` with the
//! right status; internal details are logged, not sent.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Seconds a client should wait after a 503 for a full queue.
const RETRY_AFTER_SECONDS: &str = "1";

/// What went wrong with a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed input: bad JSON, wrong nesting or shape, not an image.
    #[error("{0}")]
    BadRequest(String),
    /// Unknown route, model or version.
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    /// No or no valid bearer token while `serve.auth_token_file` is set; the payload is
    /// the `WWW-Authenticate` challenge's error code, if any.
    #[error("{message}")]
    Unauthorized { message: String, invalid_token: bool },
    /// A `Host` the server does not answer for (`serve.allowed_hosts`).
    #[error("{0}")]
    MisdirectedRequest(String),
    /// The body did not arrive in time (`serve.body_read_timeout_ms`,
    /// `serve.min_body_bytes_per_s`); the connection is closed after the answer.
    #[error("{0}")]
    RequestTimeout(String),
    /// A browser request from a web origin the server does not allow.
    #[error("{0}")]
    Forbidden(String),
    /// Request line and headers over `serve.max_header_bytes`.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// Body or image over the configured limits.
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The model's queue is full: retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The model is not (yet) able to answer: loading, failed, shutting down.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Timeout(String),
    /// A bug or an environment failure; the message is logged, the client sees a generic one.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::MisdirectedRequest(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Internal(detail) => {
                log::error!("internal error: {detail}");
                "internal server error".to_string()
            }
            other => other.to_string(),
        };
        let mut response = (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
        let headers = response.headers_mut();
        match self {
            ApiError::Overloaded(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
            }
            ApiError::Unauthorized { invalid_token, .. } => {
                let challenge = if invalid_token { r#"Bearer realm="segctl", error="invalid_token""# } else { r#"Bearer realm="segctl""# };
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
            }
            // The rest of the body is not read: the connection cannot be reused.
            ApiError::RequestTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

impl From<axum::extract::rejection::BytesRejection> for ApiError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(format!("request body is over the limit (serve.max_body_bytes): {}", r.body_text()))
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {}", r.body_text()))
        }
    }
}

impl From<crate::data::image_io::DecodeError> for ApiError {
    fn from(e: crate::data::image_io::DecodeError) -> Self {
        use crate::data::image_io::DecodeError;
        match e {
            DecodeError::TooLarge { .. } => ApiError::TooLarge(format!("{e} (serve.max_pixels)")),
            DecodeError::TooManyScans { .. } => ApiError::TooLarge(format!("{e} (serve.max_jpeg_scans)")),
            DecodeError::Empty => ApiError::BadRequest("empty body: send a JPEG or PNG image".into()),
            other => ApiError::BadRequest(format!("not a usable image: {other}")),
        }
    }
}

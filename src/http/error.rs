//! The one place where errors become HTTP answers: `{"error":{"code","message","details"}}`
//! with the status CONTRACT.md §2 gives each code.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{
    publish::{self, Rejection},
    schema::Violation,
};

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECS: u64 = 2;

/// An error answer of the agentbus API.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Vec<Violation>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
        }
    }

    /// `400 malformed_json`.
    pub fn malformed_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_json", message)
    }

    /// `400 invalid_envelope` with the violations.
    pub fn invalid_envelope(message: impl Into<String>, details: Vec<Violation>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_envelope", message).with_details(details)
    }

    /// `413 payload_too_large`.
    pub fn payload_too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message)
    }

    /// `400 invalid_parameter`: a path or query parameter that can name nothing or is out
    /// of range (a consumer group Kafka cannot have, a page size past the maximum).
    pub fn invalid_parameter(name: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("{name}: {message}"),
        )
        .with_details(vec![Violation {
            path: name.to_string(),
            message,
        }])
    }

    /// `405 method_not_allowed`; the router adds the `Allow` header.
    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            message,
        )
    }

    /// `404 not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// `400 invalid_envelope` for a request field that is not valid.
    pub fn invalid_request(field: &str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_envelope",
            format!("{field}: {message}"),
        )
        .with_details(vec![Violation {
            path: field.to_string(),
            message,
        }])
    }

    /// `503 broker_unavailable` with `Retry-After`.
    pub fn broker_unavailable(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "broker_unavailable",
            message,
        );
        e.retry_after = Some(RETRY_AFTER_SECS);
        e
    }

    /// `408 request_timeout`: the request's body was still arriving when the request
    /// timeout passed (the client is slow, not the broker: no `Retry-After`).
    pub fn request_timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::REQUEST_TIMEOUT, "request_timeout", message)
    }

    /// `401 unauthorized` (with `WWW-Authenticate: Bearer`).
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// `403 forbidden`, with the offending field when there is one.
    pub fn forbidden(message: impl Into<String>, details: Vec<Violation>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message).with_details(details)
    }

    /// `429 rate_limited` with `Retry-After`.
    pub fn rate_limited(message: impl Into<String>, retry_after: std::time::Duration) -> Self {
        let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message);
        e.retry_after = Some(retry_after.as_secs_f64().ceil().max(1.0) as u64);
        e
    }

    /// `431` for request headers past the limit (code `payload_too_large`).
    pub fn headers_too_large(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "payload_too_large",
            message,
        )
    }

    /// `500 internal`: a fault of ours (disk, bug), never of the input.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    fn with_details(mut self, details: Vec<Violation>) -> Self {
        self.details = details;
        self
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<publish::Error> for ApiError {
    fn from(e: publish::Error) -> Self {
        match e {
            publish::Error::Rejected {
                kind,
                message,
                details,
            } => {
                let (status, code) = match kind {
                    Rejection::InvalidEnvelope => (StatusCode::BAD_REQUEST, "invalid_envelope"),
                    Rejection::UnknownEventType => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "unknown_event_type")
                    }
                    Rejection::UnknownEventVersion => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "unknown_event_version")
                    }
                    Rejection::SchemaViolation => {
                        (StatusCode::UNPROCESSABLE_ENTITY, "schema_violation")
                    }
                };
                ApiError::new(status, code, message).with_details(details)
            }
            publish::Error::TooLarge { message, details } => {
                ApiError::payload_too_large(message).with_details(details)
            }
            // In progress: the contract knows one answer for both, 409.
            publish::Error::IdempotencyConflict(message)
            | publish::Error::IdempotencyInProgress(message) => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            publish::Error::BrokerUnavailable(message) => {
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "broker_unavailable",
                    message,
                );
                e.retry_after = Some(RETRY_AFTER_SECS);
                e
            }
            e @ (publish::Error::Store(_) | publish::Error::Internal(_)) => {
                tracing::error!(error = %e, "publish failed on our side");
                ApiError::internal(e.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {
                "code": self.code,
                "message": self.message,
                "details": self.details,
            }
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"agentbus\""),
            );
        }
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// `Path`, with a rejection in the API's error shape: a path segment that does not decode
/// (bad percent-encoding, not UTF-8) names nothing, so it is a JSON 404.
pub struct ApiPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|e| ApiError::not_found(format!("no such resource: {}", e.body_text())))
    }
}

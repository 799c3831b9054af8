//! Before every handler: header limits, API keys and scopes, the key's rate limit, and the
//! request timeout. `/healthz`, `/readyz`, `/metrics`, `/openapi.json` and the demo agent stay
//! open.

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use http_body::{Body as HttpBody, Frame, SizeHint};

use super::{AppState, error::ApiError};
use crate::auth::{Denied, Scope};

/// Largest sum of request header names and values accepted (431 beyond).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

fn open(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/metrics" | "/openapi.json")
        || path.starts_with("/demo/")
}

/// The scope a request needs.
pub fn scope_of(method: &Method, path: &str) -> Scope {
    match (method, path) {
        (&Method::POST, "/v1/events") => Scope::Publish,
        (&Method::POST, "/v1/replays") => Scope::Admin,
        (&Method::POST, p) if p.starts_with("/v1/dlq/") => Scope::Admin,
        _ => Scope::Read,
    }
}

/// The access checks, as an axum middleware. A refusal drains the body as the body limit's
/// does (this check runs first): a client that writes its whole body before it reads the
/// answer would otherwise meet a broken pipe instead of the 401.
pub async fn check(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    if let Some(refusal) = refusal(&state, &mut request) {
        return super::body::refuse_unread(request, refusal.into_response());
    }
    let limit = state.limits.request_timeout;
    let (request, received) = watched(request);
    let took = humantime::format_duration(Duration::from_millis(limit.as_millis() as u64));
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        // The body was still arriving: the client is slow, retrying as it is will not pass.
        Err(_) if !received.load(Ordering::Acquire) => ApiError::request_timeout(format!(
            "the request body was still arriving after {took} (the request timeout)"
        ))
        .into_response(),
        Err(_) => ApiError::broker_unavailable(format!("the request took longer than {took}"))
            .into_response(),
    }
}

/// `request` with its body watched: the flag turns true once the whole body has arrived
/// (at once for a request without a body).
fn watched(request: Request) -> (Request, Arc<AtomicBool>) {
    let (parts, body) = request.into_parts();
    let received = Arc::new(AtomicBool::new(body.is_end_stream()));
    let body = Watched {
        inner: body,
        received: received.clone(),
    };
    (Request::from_parts(parts, Body::new(body)), received)
}

/// A request body that says when it has arrived whole.
struct Watched {
    inner: Body,
    received: Arc<AtomicBool>,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        // The end: no more frames, or the last one (a body of known length says so with it).
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.received.store(true, Ordering::Release);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why `request` is refused before its handler, if it is; else its key is in its extensions.
fn refusal(state: &AppState, request: &mut Request) -> Option<ApiError> {
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Some(ApiError::headers_too_large(format!(
            "the request headers are larger than {MAX_HEADER_BYTES} bytes"
        )));
    }
    let path = request.uri().path().to_string();
    if !open(&path) && !state.keys.is_empty() {
        let scope = scope_of(request.method(), &path);
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let key = match state.keys.authenticate(presented) {
            Ok(key) => key,
            Err(Denied::Missing) => {
                return Some(ApiError::unauthorized(
                    "send an API key: Authorization: Bearer <key>",
                ));
            }
            Err(Denied::Invalid) => {
                return Some(ApiError::unauthorized("the API key is not valid"));
            }
        };
        if !key.allows(scope) {
            return Some(ApiError::forbidden(
                format!(
                    "key {:?} lacks the {} scope this request needs",
                    key.name,
                    scope.as_str()
                ),
                Vec::new(),
            ));
        }
        if let Err(wait) = key.take() {
            return Some(ApiError::rate_limited(
                format!("key {:?} is over its request rate", key.name),
                wait,
            ));
        }
        request.extensions_mut().insert(key);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_by_route() {
        assert_eq!(scope_of(&Method::POST, "/v1/events"), Scope::Publish);
        assert_eq!(scope_of(&Method::POST, "/v1/replays"), Scope::Admin);
        assert_eq!(scope_of(&Method::POST, "/v1/dlq/g/redrive"), Scope::Admin);
        assert_eq!(scope_of(&Method::GET, "/v1/dlq/g"), Scope::Read);
        assert_eq!(scope_of(&Method::GET, "/v1/replays/x"), Scope::Read);
        assert_eq!(scope_of(&Method::GET, "/registry/subjects"), Scope::Read);
        assert!(open("/metrics") && open("/demo/agents/x") && !open("/v1/schemas"));
    }

    /// A request without a body has arrived at once; one with a body once it was read whole:
    /// from then on a timeout is the handler's (the broker's), a 503.
    #[tokio::test]
    async fn a_body_counts_as_received_once_read_whole() {
        let (_, received) = watched(Request::new(Body::empty()));
        assert!(received.load(Ordering::Acquire));
        let (request, received) = watched(Request::new(Body::from("{\"a\":1}")));
        assert!(!received.load(Ordering::Acquire));
        let read = axum::body::to_bytes(request.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&read[..], b"{\"a\":1}");
        assert!(received.load(Ordering::Acquire));
    }
}

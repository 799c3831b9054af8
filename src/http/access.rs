//! Before every handler: header limits, API keys and scopes, the key's rate limit, and the
//! request timeout. `/healthz`, `/readyz`, `/metrics`, `/openapi.json` and the demo agent stay
//! open.

use std::time::Duration;

use axum::{
    extract::{Request, State},
    http::{Method, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

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
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::broker_unavailable(format!(
            "the request took longer than {}",
            humantime::format_duration(Duration::from_millis(limit.as_millis() as u64))
        ))
        .into_response(),
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
}

//! The request body limit of every endpoint (`--max-body-bytes`, the same for all of them),
//! answered in the API's error shape, and answered so that ordinary clients see it.
//!
//! A client that sends a body past the limit is refused from its `Content-Length` before any
//! of the body is read. The refusal goes out at once, and the rest of the body is read and
//! thrown away in the background, up to [`DRAIN_BYTES`] or [`DRAIN_TIME`]: a client that writes
//! its whole body before it reads the answer (Python's urllib, most simple clients) would
//! otherwise meet a closed connection while still writing (a broken pipe) and never see the
//! 413. A body past that budget still ends in a closed connection, which bounds what a client
//! can make us read.

use std::time::Duration;

use axum::{
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use futures::StreamExt;

use super::{AppState, error::ApiError};

/// Most bytes of a refused body read and discarded before the connection is closed.
pub const DRAIN_BYTES: u64 = 64 * 1024 * 1024;

/// Longest a refused body is read and discarded before the connection is closed.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);

/// The declared body length, when the request has a valid `Content-Length`.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Whether the client waits for `100 Continue` before it sends the body. Reading the body
/// would make hyper send that; a client that was not told to continue can take the 413 and
/// never send the body, so it is not drained.
fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// The body limit, as an axum middleware: the body is read here (at most `max_body_bytes`
/// of it) and handed on in full, so that no handler or extractor meets a body past the limit.
pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.limits.max_body_bytes;
    let (parts, body) = request.into_parts();
    let refuse = |rest: axum::body::BodyDataStream| {
        let mut response =
            ApiError::payload_too_large(format!("the body is larger than {limit} bytes"))
                .into_response();
        if content_length(&parts.headers).is_some_and(|n| n > DRAIN_BYTES) {
            // More than would be drained: the connection ends after the answer either way,
            // so none of it is read, and the answer says so.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else if !expects_continue(&parts.headers) {
            spawn_drain(rest, false, &mut response);
        }
        response
    };
    if content_length(&parts.headers).is_some_and(|n| n > limit as u64) {
        return refuse(body.into_data_stream());
    }
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) if bytes.len() + chunk.len() > limit => return refuse(stream),
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(e) => {
                return ApiError::malformed_json(format!("could not read the body: {e}"))
                    .into_response();
            }
        }
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// Sends `response` (a refusal given before the body was read) and drains the request's
/// body as a 413 does, so that a client still writing its body gets to read the answer.
pub fn refuse_unread(request: Request, mut response: Response) -> Response {
    let (parts, body) = request.into_parts();
    if content_length(&parts.headers).is_some_and(|n| n > DRAIN_BYTES) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if !expects_continue(&parts.headers) {
        let small = content_length(&parts.headers).is_some_and(|n| n <= SMALL_BODY_BYTES);
        spawn_drain(body.into_data_stream(), small, &mut response);
    }
    response
}

/// A declared body this small is always drained, without taking one of [`MOST_DRAINS`]: it
/// costs little to read, and closing the connection instead would make the client
/// reconnect, which under overload (publishes shed by the hundred a second) costs more than
/// the drain.
const SMALL_BODY_BYTES: u64 = 64 * 1024;

/// Most refused bodies drained at once: beyond, a refusal closes the connection instead, so
/// that clients sending large bodies to be refused cannot hold unbounded work.
pub const MOST_DRAINS: usize = 64;

/// Drains `rest` in the background when fewer than [`MOST_DRAINS`] drains run; else marks
/// `response` to close the connection (the client may then miss the answer, as before).
fn spawn_drain(rest: axum::body::BodyDataStream, small: bool, response: &mut Response) {
    static DRAINS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MOST_DRAINS);
    if small {
        tokio::spawn(drain(rest));
        return;
    }
    match DRAINS.try_acquire() {
        Ok(permit) => {
            tokio::spawn(async move {
                drain(rest).await;
                drop(permit);
            });
        }
        Err(_) => {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Reads and discards what is left of a refused body, within [`DRAIN_BYTES`] and
/// [`DRAIN_TIME`]. Dropping the stream after that makes hyper close the connection.
async fn drain(mut rest: axum::body::BodyDataStream) {
    let read = async {
        let mut total = 0u64;
        while let Some(Ok(chunk)) = rest.next().await {
            total = total.saturating_add(chunk.len() as u64);
            if total > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_valid_content_length_counts() {
        let mut h = HeaderMap::new();
        assert_eq!(content_length(&h), None);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        assert_eq!(content_length(&h), Some(12));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("-1"));
        assert_eq!(content_length(&h), None);
        h.insert(header::EXPECT, HeaderValue::from_static("100-Continue"));
        assert!(expects_continue(&h));
    }
}

//! `POST /v1/events`: one envelope or a batch.

use std::{sync::Arc, time::Instant};

use axum::{
    body::Body,
    extract::{Extension, State},
    http::{HeaderMap, HeaderValue},
    response::{IntoResponse, Response},
};
use serde_json::Value;

use super::{AppState, error::ApiError};
use crate::{auth::ApiKey, envelope::check_idempotency_key, publish, schema::Violation, telemetry};

/// Publishes the envelopes in the body; answers once the broker acknowledged them all.
pub async fn publish(
    State(state): State<AppState>,
    key: Option<Extension<Arc<ApiKey>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let key = key.map(|Extension(k)| k);
    let response = match handle(&state, key.as_deref(), &headers, body).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    metrics::histogram!(telemetry::PUBLISH_DURATION).record(started.elapsed().as_secs_f64());
    metrics::counter!(telemetry::PUBLISH_REQUESTS, "status" => response.status().as_str().to_owned())
        .increment(1);
    response
}

async fn handle(
    state: &AppState,
    key: Option<&ApiKey>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // The body limit was applied before (super::body::limit); this read stays bounded anyway.
    let limit = state.limits.max_body_bytes;
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::payload_too_large(format!("the body is larger than {limit} bytes"))
    })?;
    let json: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::malformed_json(format!("the body is not JSON: {e}")))?;
    let (items, batch) = match json {
        Value::Array(items) => (items, true),
        other => (vec![other], false),
    };
    if batch && items.is_empty() {
        return Err(ApiError::invalid_envelope("the batch is empty", Vec::new()));
    }
    if items.len() > state.limits.max_batch {
        return Err(ApiError::payload_too_large(format!(
            "the batch has {} events; at most {} are accepted",
            items.len(),
            state.limits.max_batch
        )));
    }
    if let Some(key) = key {
        allowed(key, &items, batch)?;
    }
    let idempotency_key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .map_err(|_| bad_header("must be visible ASCII"))?;
            check_idempotency_key(key).map_err(bad_header)?;
            Some(key.to_string())
        }
    };

    // The publish runs in its own task, so a client that hangs up cannot cut it between the
    // broker's acknowledgement and the idempotency record.
    let publisher = Arc::clone(&state.publisher);
    let request = publish::Request {
        items,
        batch,
        idempotency_key,
        scope: key.map(|k| k.id().to_string()),
    };
    let results = tokio::spawn(async move { publisher.publish(request).await })
        .await
        .map_err(|e| ApiError::internal(format!("publish task failed: {e}")))??;

    let all_duplicates = results.iter().all(|r| r.duplicate);
    let mut response = if batch {
        // Serialised straight from the results, not through a `serde_json::Value` copy.
        json_response(&BatchAnswer { results: &results }, results.len())?
    } else {
        json_response(&results[0], 1)?
    };
    if all_duplicates {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// `value` as an `application/json` response, written into a buffer sized for `results`
/// results at once (axum's `Json` grows its buffer from 128 bytes, copying a batch's answer
/// several times).
fn json_response(value: &impl serde::Serialize, results: usize) -> Result<Response, ApiError> {
    let mut body = Vec::with_capacity(16 + results * RESULT_BYTES);
    serde_json::to_writer(&mut body, value)
        .map_err(|e| ApiError::internal(format!("answer not serializable: {e}")))?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// About the length of one result as JSON.
const RESULT_BYTES: usize = 200;

/// A batch's answer: `{"results":[...]}`, in input order.
#[derive(serde::Serialize)]
struct BatchAnswer<'a> {
    results: &'a [publish::PublishResult],
}

/// 403 unless the key may publish every item's event type as its source. Items without those
/// fields are left to the envelope checks.
fn allowed(key: &ApiKey, items: &[Value], batch: bool) -> Result<(), ApiError> {
    let mut denied = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = |field: &str| {
            if batch {
                format!("[{i}].{field}")
            } else {
                field.to_string()
            }
        };
        if let Some(t) = item.get("event_type").and_then(Value::as_str)
            && let Err(message) = key.may_publish(t)
        {
            denied.push(Violation {
                path: at("event_type"),
                message,
            });
        }
        if let Some(s) = item.get("source").and_then(Value::as_str)
            && let Err(message) = key.may_publish_as(s)
        {
            denied.push(Violation {
                path: at("source"),
                message,
            });
        }
    }
    if denied.is_empty() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            format!(
                "key {:?} may not publish these events; nothing was written",
                key.name
            ),
            denied,
        ))
    }
}

fn bad_header(message: impl Into<String>) -> ApiError {
    ApiError::invalid_envelope(
        "the Idempotency-Key header is not valid",
        vec![Violation {
            path: "header:Idempotency-Key".into(),
            message: message.into(),
        }],
    )
}

//! `GET /v1/dlq/{group}` and `POST /v1/dlq/{group}/redrive`.

use axum::{Json, body::Bytes, extract::State};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AppState,
    error::{ApiError, ApiPath},
};
use crate::consume::{definition::AgentDefinition, dlq};

fn agent<'a>(state: &'a AppState, group: &str) -> Result<&'a AgentDefinition, ApiError> {
    state
        .agents
        .iter()
        .find(|a| a.name == group)
        .ok_or_else(|| ApiError::not_found(format!("no agent (consumer group) {group:?}")))
}

fn kafka_error(e: dlq::Error) -> ApiError {
    match e {
        dlq::Error::NoTopic(topic) => ApiError::not_found(format!("no topic {topic}")),
        other => ApiError::broker_unavailable(other.to_string()),
    }
}

/// The agent's dead letters, oldest first.
pub async fn list(
    State(state): State<AppState>,
    ApiPath(group): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let agent = agent(&state, &group)?;
    let topic = agent.dlq_topic(&state.kafka.topic_prefix);
    let letters = dlq::list(&state.kafka, &topic).await.map_err(kafka_error)?;
    Ok(Json(
        json!({ "group": group, "topic": topic, "dead_letters": letters }),
    ))
}

/// Body of a redrive: both filters optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveRequest {
    event_type: Option<String>,
    since: Option<String>,
}

/// Sends matching dead letters back to the agent.
pub async fn redrive(
    State(state): State<AppState>,
    ApiPath(group): ApiPath<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let agent = agent(&state, &group)?;
    let request: RedriveRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RedriveRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::malformed_json(e.to_string()))?
    };
    let since = match &request.since {
        None => None,
        Some(s) => Some(
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| {
                    ApiError::invalid_request("since", format!("not an RFC 3339 time: {e}"))
                })?,
        ),
    };
    let filter = dlq::Filter {
        event_type: request.event_type,
        since,
    };
    let prefix = &state.kafka.topic_prefix;
    let sent = dlq::redrive(
        &state.kafka,
        &agent.dlq_topic(prefix),
        &agent.replay_topic(prefix),
        &filter,
    )
    .await
    .map_err(kafka_error)?;
    Ok(Json(json!({ "group": group, "redriven": sent })))
}

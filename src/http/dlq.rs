//! `GET /v1/dlq/{group}` and `POST /v1/dlq/{group}/redrive`.

use axum::{
    Json,
    body::Bytes,
    extract::{Query, State, rejection::QueryRejection},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AppState,
    error::{ApiError, ApiPath},
};
use crate::{
    config::parse_rfc3339,
    consume::{definition::AgentDefinition, dlq},
};

fn agent<'a>(state: &'a AppState, group: &str) -> Result<&'a AgentDefinition, ApiError> {
    super::params::check_group(group)?;
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

/// The query of `GET /v1/dlq/{group}`; every field optional, each checked in [`start_of`]
/// (strings here, so that a bad value gets a message of ours).
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Dead letters in the page.
    limit: Option<String>,
    /// A `next` cursor.
    after: Option<String>,
    /// An RFC 3339 time.
    since: Option<String>,
}

fn start_of(query: &ListQuery) -> Result<(dlq::Start, usize), ApiError> {
    let limit = match &query.limit {
        None => dlq::DEFAULT_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=dlq::MAX_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::invalid_parameter(
                    "query:limit",
                    format!("{l:?} is not a whole number from 1 to {}", dlq::MAX_PAGE),
                )
            })?,
    };
    let start = match (&query.after, &query.since) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_parameter(
                "query:after",
                "give at most one of after and since",
            ));
        }
        (Some(after), None) => dlq::Start::After(after.parse().map_err(|e: dlq::BadCursor| {
            ApiError::invalid_parameter("query:after", e.to_string())
        })?),
        (None, Some(since)) => dlq::Start::Since(
            parse_rfc3339(since)
                .map_err(|e| ApiError::invalid_parameter("query:since", e.to_string()))?,
        ),
        (None, None) => dlq::Start::Beginning,
    };
    Ok((start, limit))
}

/// A page of the agent's dead letters (`limit`, from `after` a cursor or `since` a time), and
/// the cursor of the next page while there is more.
pub async fn list(
    State(state): State<AppState>,
    ApiPath(group): ApiPath<String>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let agent = agent(&state, &group)?;
    let Query(query) = query.map_err(|e| ApiError::invalid_parameter("query", e.body_text()))?;
    let (start, limit) = start_of(&query)?;
    super::broker_reachable(&state)?;
    let topic = agent.dlq_topic(&state.kafka.topic_prefix);
    let page = dlq::page(&state.kafka, &topic, start, limit)
        .await
        .map_err(kafka_error)?;
    let mut body = json!({
        "group": group,
        "topic": topic,
        "dead_letters": page.dead_letters,
        "skipped": page.skipped,
    });
    if let Some(next) = page.next {
        body["next"] = json!(next.to_string());
    }
    Ok(Json(body))
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
        Some(s) => {
            Some(parse_rfc3339(s).map_err(|e| ApiError::invalid_request("since", e.to_string()))?)
        }
    };
    let filter = dlq::Filter {
        event_type: request.event_type,
        since,
    };
    let prefix = &state.kafka.topic_prefix;
    let redriven = dlq::redrive(
        &state.kafka,
        &agent.dlq_topic(prefix),
        &agent.replay_topic(prefix),
        &filter,
    )
    .await
    .map_err(kafka_error)?;
    let skipped: u64 = redriven.skipped.iter().map(dlq::Skipped::count).sum();
    Ok(Json(json!({
        "group": group,
        "redriven": redriven.sent,
        "skipped": skipped,
        "skipped_ranges": redriven.skipped,
    })))
}

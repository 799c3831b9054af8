//! `POST /v1/replays` and `GET /v1/replays/{id}`: replays as background jobs.

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;

use super::{
    AppState,
    error::{ApiError, ApiPath},
    params,
};
use crate::{
    config::parse_time,
    replay::{self, Request, Target},
};

/// The body of `POST /v1/replays`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    from: String,
    until: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    topics: Vec<String>,
    #[serde(default)]
    event_types: Vec<String>,
    to_agent: Option<String>,
    into_topic: Option<String>,
    replay_id: Option<String>,
}

fn time(field: &str, value: &str) -> Result<chrono::DateTime<chrono::Utc>, ApiError> {
    parse_time(value).map_err(|e| ApiError::invalid_request(field, e.to_string()))
}

fn replay_error(e: replay::Error) -> ApiError {
    match e {
        replay::Error::Invalid(m) => ApiError::invalid_request("body", m),
        replay::Error::NotFound(m) => ApiError::not_found(m),
        other => ApiError::broker_unavailable(other.to_string()),
    }
}

/// Plans a replay and starts it in the background: 202 with the job and its `Location`.
pub async fn start(State(state): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let body: ReplayBody =
        serde_json::from_slice(&body).map_err(|e| ApiError::malformed_json(e.to_string()))?;
    let target = match (body.to_agent, body.into_topic) {
        (Some(agent), None) => Target::Agent(agent),
        (None, Some(topic)) => Target::Topic(topic),
        _ => {
            return Err(ApiError::invalid_request(
                "to_agent",
                "give exactly one of to_agent and into_topic",
            ));
        }
    };
    let mut topics = body.topics;
    topics.extend(body.topic);
    // Names reach librdkafka as C strings (a NUL panics there): checked here, a 400.
    let field = |name: &str, why: Option<String>| match why {
        Some(why) => Err(ApiError::invalid_request(name, why)),
        None => Ok(()),
    };
    for topic in &topics {
        field("topics", params::topic_problem(topic))?;
    }
    match &target {
        Target::Agent(agent) => field("to_agent", params::agent_problem(agent))?,
        Target::Topic(topic) => field("into_topic", params::topic_problem(topic))?,
    }
    if let Some(id) = &body.replay_id {
        field("replay_id", params::replay_id_problem(id))?;
    }
    let request = Request {
        from: time("from", &body.from)?,
        until: body
            .until
            .as_deref()
            .map(|u| time("until", u))
            .transpose()?,
        topics,
        event_types: body.event_types,
        target,
        replay_id: body.replay_id,
    };
    super::broker_reachable(&state)?;
    let job = state
        .replays
        .start((*state.kafka).clone(), request)
        .await
        .map_err(replay_error)?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/v1/replays/{}", job.id))],
        Json(job.view()),
    )
        .into_response())
}

/// A replay job's status and progress.
pub async fn status(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    state
        .replays
        .get(&id)
        .map(|job| Json(job.view()))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no replay {id:?} in this process (jobs do not survive a restart)"
            ))
        })
}

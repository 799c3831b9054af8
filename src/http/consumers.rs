//! `GET /v1/consumers` and `GET /v1/consumers/{group}/lag`: the lag monitor's view as JSON.

use axum::{Json, extract::State};
use serde_json::{Value, json};

use super::{
    AppState,
    error::{ApiError, ApiPath},
};
use crate::lag;

fn unavailable(e: lag::Error) -> ApiError {
    ApiError::broker_unavailable(e.to_string())
}

/// Every consumer group: state and members (when the broker describes groups), lag.
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    super::broker_reachable(&state)?;
    let snapshot = state.lag.current().await.map_err(unavailable)?;
    let consumers: Vec<Value> = snapshot
        .groups
        .iter()
        .map(|g| {
            json!({
                "group": g.group,
                "agent": state.agents.iter().any(|a| a.name == g.group),
                "state": g.state,
                "members": g.members,
                "sum_lag": g.sum_lag,
                "max_lag": g.max_lag,
                "max_lag_seconds": g.max_lag_seconds,
                "partitions": g.partitions.len(),
            })
        })
        .collect();
    Ok(Json(json!({
        "cluster_name": snapshot.cluster_name,
        "collected_at": snapshot.collected_at,
        "members_unknown": snapshot.members_unknown,
        "consumers": consumers,
    })))
}

/// One group's lag per partition, collected now.
pub async fn lag(
    State(state): State<AppState>,
    ApiPath(group): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    super::params::check_group(&group)?;
    super::broker_reachable(&state)?;
    let snapshot = state
        .lag
        .collect(Some(vec![group.clone()]))
        .await
        .map_err(unavailable)?;
    let is_agent = state.agents.iter().any(|a| a.name == group);
    let Some(g) = snapshot
        .groups
        .into_iter()
        .find(|g| g.group == group && (is_agent || !g.partitions.is_empty()))
    else {
        return Err(ApiError::not_found(format!(
            "no consumer group {group:?} with committed offsets"
        )));
    };
    Ok(Json(json!({
        "cluster_name": snapshot.cluster_name,
        "collected_at": snapshot.collected_at,
        "group": g.group,
        "state": g.state,
        "members": g.members,
        "members_unknown": snapshot.members_unknown,
        "sum_lag": g.sum_lag,
        "max_lag": g.max_lag,
        "max_lag_seconds": g.max_lag_seconds,
        "partitions": g.partitions,
    })))
}

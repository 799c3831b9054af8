//! `POST /demo/agents/{name}`: a small webhook agent that agentbus serves itself, so that the
//! sample agents in `consumers/` show the whole loop with nothing else to install. For an
//! `agent.task.requested` it answers an `agent.task.completed` follow-up; other events it
//! acknowledges.

use axum::{Json, body::Bytes};
use serde_json::{Value, json};

use super::error::{ApiError, ApiPath};

/// Handles one CloudEvent (structured JSON) as the demo agent `name`.
pub async fn agent(ApiPath(name): ApiPath<String>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let event: Value =
        serde_json::from_slice(&body).map_err(|e| ApiError::malformed_json(e.to_string()))?;
    let answer = match event["type"].as_str() {
        Some("agent.task.requested") => {
            let data = &event["data"];
            let description = data["description"].as_str().unwrap_or("the task");
            json!({"events": [{
                "event_type": "agent.task.completed",
                "source": name,
                "partition_key": data["agent_id"],
                "data": {
                    "task_id": data["task_id"],
                    "agent_id": data["agent_id"],
                    "status": "succeeded",
                    "result": format!("{name} handled: {description}"),
                    "duration_ms": 1
                }
            }]})
        }
        _ => json!({}),
    };
    tracing::info!(agent = %name, event_type = ?event["type"], id = ?event["id"], "demo agent handled an event");
    Ok(Json(answer))
}

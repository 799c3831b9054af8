//! `GET /v1/schemas...` and the read-only Confluent Schema Registry API under `/registry`
//! (CONTRACT.md §4): subject = event type, so any Confluent deserializer decodes our topics.

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use super::{
    AppState,
    error::{ApiError, ApiPath},
};
use crate::schema::{Compatibility, EventType, SchemaVersion};

/// `GET /v1/schemas`: every event type with its versions, ids and topic.
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let types: Vec<Value> = state
        .registry
        .event_types()
        .map(|t| {
            json!({
                "event_type": t.name,
                "topic": state.kafka.events_topic(t.domain()),
                "compatibility": t.compatibility,
                "description": t.description,
                "latest_version": t.latest().version,
                "versions": t.versions.values().map(|v| json!({"version": v.version, "id": v.id})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Json(json!({ "event_types": types }))
}

/// `GET /v1/schemas/{event_type}/versions/{n|latest}`: the Avro schema itself, with its id
/// in the `Agentbus-Schema-Id` header.
pub async fn version(
    State(state): State<AppState>,
    ApiPath((event_type, version)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let t = state
        .registry
        .event_type(&event_type)
        .ok_or_else(|| ApiError::not_found(format!("no event type {event_type:?}")))?;
    let v = pick_version(t, &version)
        .ok_or_else(|| ApiError::not_found(format!("{event_type} has no version {version:?}")))?;
    let mut response = raw_schema(v);
    response
        .headers_mut()
        .insert("agentbus-schema-id", HeaderValue::from(v.id));
    Ok(response)
}

fn pick_version<'a>(t: &'a EventType, version: &str) -> Option<&'a SchemaVersion> {
    if version == "latest" || version == "-1" {
        return Some(t.latest());
    }
    t.versions.get(&version.parse::<u32>().ok()?).map(|v| &**v)
}

fn raw_schema(v: &SchemaVersion) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        v.text.clone(),
    )
        .into_response()
}

/// The content type a Confluent registry answers with.
const REGISTRY_JSON: &str = "application/vnd.schemaregistry.v1+json";

fn registry_json(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(REGISTRY_JSON),
        )],
        body.to_string(),
    )
        .into_response()
}

/// An error in the Confluent registry's shape: `{"error_code", "message"}`.
struct RegistryError {
    status: StatusCode,
    error_code: u32,
    message: String,
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        registry_json(
            self.status,
            json!({ "error_code": self.error_code, "message": self.message }),
        )
    }
}

fn registry_error(status: StatusCode, error_code: u32, message: String) -> RegistryError {
    RegistryError {
        status,
        error_code,
        message,
    }
}

fn subject_not_found(subject: &str) -> RegistryError {
    registry_error(
        StatusCode::NOT_FOUND,
        40401,
        format!("Subject '{subject}' not found."),
    )
}

/// `GET /registry/schemas/ids/{id}`.
pub async fn by_id(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Response {
    match id.parse().ok().and_then(|id| state.registry.by_id(id)) {
        Some(v) => registry_json(StatusCode::OK, json!({ "schema": v.text })),
        None => schema_not_found().into_response(),
    }
}

/// `GET /registry/schemas/ids/{id}/schema`: the schema alone.
pub async fn by_id_raw(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Response {
    match id.parse().ok().and_then(|id| state.registry.by_id(id)) {
        Some(v) => raw_schema(v),
        None => schema_not_found().into_response(),
    }
}

fn schema_not_found() -> RegistryError {
    registry_error(StatusCode::NOT_FOUND, 40403, "Schema not found".into())
}

/// `GET /registry/subjects`.
pub async fn subjects(State(state): State<AppState>) -> Response {
    let names: Vec<&str> = state
        .registry
        .event_types()
        .map(|t| t.name.as_str())
        .collect();
    registry_json(StatusCode::OK, json!(names))
}

/// `GET /registry/subjects/{subject}/versions`.
pub async fn subject_versions(
    State(state): State<AppState>,
    ApiPath(subject): ApiPath<String>,
) -> Response {
    match state.registry.event_type(&subject) {
        Some(t) => registry_json(StatusCode::OK, json!(t.versions.keys().collect::<Vec<_>>())),
        None => subject_not_found(&subject).into_response(),
    }
}

/// `GET /registry/subjects/{subject}/versions/{version|latest}`.
pub async fn subject_version(
    State(state): State<AppState>,
    ApiPath((subject, version)): ApiPath<(String, String)>,
) -> Response {
    match lookup(&state, &subject, &version) {
        Ok(v) => registry_json(
            StatusCode::OK,
            json!({"subject": subject, "version": v.version, "id": v.id, "schema": v.text}),
        ),
        Err(e) => e.into_response(),
    }
}

/// `GET /registry/subjects/{subject}/versions/{version|latest}/schema`.
pub async fn subject_version_raw(
    State(state): State<AppState>,
    ApiPath((subject, version)): ApiPath<(String, String)>,
) -> Response {
    match lookup(&state, &subject, &version) {
        Ok(v) => raw_schema(v),
        Err(e) => e.into_response(),
    }
}

fn lookup<'a>(
    state: &'a AppState,
    subject: &str,
    version: &str,
) -> Result<&'a SchemaVersion, RegistryError> {
    let t = state
        .registry
        .event_type(subject)
        .ok_or_else(|| subject_not_found(subject))?;
    let valid =
        version == "latest" || version == "-1" || version.parse::<u32>().is_ok_and(|n| n >= 1);
    if !valid {
        return Err(registry_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            42202,
            format!(
                "The specified version '{version}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
            ),
        ));
    }
    pick_version(t, version).ok_or_else(|| {
        registry_error(
            StatusCode::NOT_FOUND,
            40402,
            format!("Version {version} not found."),
        )
    })
}

/// `GET /registry/config`: the global compatibility level.
pub async fn config() -> Response {
    registry_json(StatusCode::OK, json!({ "compatibilityLevel": "BACKWARD" }))
}

/// `GET /registry/config/{subject}`.
pub async fn subject_config(
    State(state): State<AppState>,
    ApiPath(subject): ApiPath<String>,
) -> Response {
    match state.registry.event_type(&subject) {
        Some(t) => {
            let level = match t.compatibility {
                Compatibility::Backward => "BACKWARD",
                Compatibility::None => "NONE",
            };
            registry_json(StatusCode::OK, json!({ "compatibilityLevel": level }))
        }
        None => subject_not_found(&subject).into_response(),
    }
}

/// `GET /registry/schemas/types`.
pub async fn schema_types() -> Response {
    registry_json(StatusCode::OK, json!(["AVRO"]))
}

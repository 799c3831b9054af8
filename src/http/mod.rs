//! The HTTP API (CONTRACT.md §2): ingest, schemas, the registry, health and metrics.

mod access;
pub mod body;
pub mod connections;
mod consumers;
mod demo;
mod dlq;
pub mod error;
mod events;
mod openapi;
pub mod params;
mod replays;
mod schemas;
pub mod shed;

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;

use crate::{
    auth::Keys, config::KafkaArgs, consume::definition::AgentDefinition,
    handlers::integration::Integrations, lag::LagMonitor, publish::Publisher, replay::Jobs,
    schema::Registry,
};
pub use error::ApiError;
pub use openapi::openapi;

/// Request limits of the API.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body of every endpoint, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most envelopes in one batch.
    pub max_batch: usize,
    /// Longest a request may take (503 beyond).
    pub request_timeout: std::time::Duration,
    /// Most publish requests worked on at once; one more is refused at once with 503 and
    /// `Retry-After` (see [`shed`]).
    pub max_publishes_in_flight: usize,
}

/// What `/readyz` checks.
#[derive(Debug, Default)]
pub struct Readiness {
    /// The broker answered the last metadata probe.
    pub broker: Arc<AtomicBool>,
    /// The event topics exist.
    pub topics: AtomicBool,
    /// Agents of this process that stopped by themselves, with the cause: none may have.
    failed_agents: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl Readiness {
    /// Records that `agent` stopped by itself; `/readyz` answers 503 naming it from now on
    /// (a restart of the process is what brings it back).
    pub fn agent_failed(&self, agent: &str, why: &str) {
        self.failed_agents
            .lock()
            .expect("not poisoned")
            .insert(agent.to_string(), why.to_string());
    }

    /// The agents that stopped by themselves, with their causes.
    pub fn failed_agents(&self) -> std::collections::BTreeMap<String, String> {
        self.failed_agents.lock().expect("not poisoned").clone()
    }
}

/// State shared by the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The publish path.
    pub publisher: Arc<Publisher>,
    /// The loaded schemas.
    pub registry: Arc<Registry>,
    /// Topic naming (shared: the state is cloned for every request, and `KafkaArgs` holds
    /// many strings).
    pub kafka: Arc<KafkaArgs>,
    /// Readiness checks.
    pub readiness: Arc<Readiness>,
    /// Request limits.
    pub limits: Limits,
    /// The agents defined in the consumers directory.
    pub agents: Arc<Vec<AgentDefinition>>,
    /// The integration agents' services.
    pub integrations: Arc<Integrations>,
    /// The consumer lag monitor.
    pub lag: Arc<LagMonitor>,
    /// Replay jobs started through the API.
    pub replays: Arc<Jobs>,
    /// The API keys; none: no authentication (loopback or `--insecure-no-auth`).
    pub keys: Arc<Keys>,
}

/// Every route of the API. `openapi.json` documents exactly these (a test keeps it so).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(events::publish))
        .route("/v1/schemas", get(schemas::list))
        .route(
            "/v1/schemas/{event_type}/versions/{version}",
            get(schemas::version),
        )
        .route("/registry/schemas/ids/{id}", get(schemas::by_id))
        .route("/registry/schemas/ids/{id}/schema", get(schemas::by_id_raw))
        .route("/registry/schemas/types", get(schemas::schema_types))
        .route("/registry/subjects", get(schemas::subjects))
        .route(
            "/registry/subjects/{subject}/versions",
            get(schemas::subject_versions),
        )
        .route(
            "/registry/subjects/{subject}/versions/{version}",
            get(schemas::subject_version),
        )
        .route(
            "/registry/subjects/{subject}/versions/{version}/schema",
            get(schemas::subject_version_raw),
        )
        .route("/registry/config", get(schemas::config))
        .route("/registry/config/{subject}", get(schemas::subject_config))
        .route("/v1/dlq/{group}", get(dlq::list))
        .route("/v1/dlq/{group}/redrive", post(dlq::redrive))
        .route("/v1/consumers", get(consumers::list))
        .route("/v1/consumers/{group}/lag", get(consumers::lag))
        .route("/v1/replays", post(replays::start))
        .route("/v1/replays/{id}", get(replays::status))
        .route("/demo/agents/{name}", post(demo::agent))
        .route("/v1/integrations", get(integrations))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        // After every route: it applies to the routes registered before it.
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        // The body limit is ours (body::limit), for every endpoint alike; axum's own default
        // (2 MB, plain text) would otherwise answer first for some of them.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            body::limit,
        ))
        // Publish load shedding: inside the access checks (added after, so they run first: an
        // unknown key hears 401, a key over its own rate 429) and outside the body limit, so
        // that an overloaded service refuses before it reads a body it will not take.
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(shed::PublishGate::new(state.limits.max_publishes_in_flight)),
            shed::gate,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::check,
        ))
        .with_state(state)
}

/// `503 broker_unavailable` at once while the broker watch says it is unreachable, rather
/// than after the Kafka client's timeouts.
pub(crate) fn broker_reachable(state: &AppState) -> Result<(), ApiError> {
    if state.readiness.broker.load(Ordering::Relaxed) {
        Ok(())
    } else {
        Err(ApiError::broker_unavailable("the broker is not reachable"))
    }
}

async fn integrations(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "integrations": state.integrations.status() }))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let broker = state.readiness.broker.load(Ordering::Relaxed);
    let topics = state.readiness.topics.load(Ordering::Relaxed);
    let schemas = state.registry.version_count() > 0;
    let failed_agents = state.readiness.failed_agents();
    let agents = failed_agents.is_empty();
    let store_failure = state.publisher.store_failure();
    let idempotency_store = store_failure.is_none();
    let ready = broker && topics && schemas && agents && idempotency_store;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "broker": broker, "topics": topics, "schemas": schemas, "agents": agents,
            "idempotency_store": idempotency_store,
        },
    });
    if !agents {
        body["failed_agents"] = json!(failed_agents);
    }
    if let Some(why) = store_failure {
        body["idempotency_store_failure"] = json!(why);
    }
    (status, Json(body)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    metrics_text(&state.lag).await
}

/// The Prometheus text: the process's own metrics and the latest lag snapshot.
pub async fn metrics_text(lag: &LagMonitor) -> Response {
    let mut text = crate::telemetry::prometheus().render();
    if let Some(snapshot) = lag.latest().await {
        text.push_str(&crate::lag::render(&snapshot));
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn openapi_json() -> Json<serde_json::Value> {
    Json(openapi())
}

/// The route exists, the method does not: 405 in the API's error shape (axum adds `Allow`).
async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::method_not_allowed(format!(
        "{} does not accept {method}; the Allow header lists what it accepts",
        uri.path()
    ))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /openapi.json")
}

//! Logs and metrics. Metric names live here, in one place, so that the contract's names
//! (CONTRACT.md §5) are spelled once.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Events the publish path handled, by `event_type` and `outcome`.
pub const EVENTS_PUBLISHED: &str = "agentbus_events_published_total";
/// Time from a publish request's arrival to its answer, in seconds.
pub const PUBLISH_DURATION: &str = "agentbus_publish_duration_seconds";
/// Publish requests (single or batch) answered, by HTTP status class.
pub const PUBLISH_REQUESTS: &str = "agentbus_publish_requests_total";
/// Whether the broker answered the last metadata probe (1) or not (0).
pub const BROKER_UP: &str = "agentbus_broker_up";
/// Keys held by the publish idempotency store.
pub const IDEMPOTENCY_KEYS: &str = "agentbus_idempotency_keys";
/// Expired idempotency keys removed by the sweeper.
pub const IDEMPOTENCY_SWEPT: &str = "agentbus_idempotency_swept_total";
/// Schema versions loaded, by event type.
pub const SCHEMAS_LOADED: &str = "agentbus_schemas_loaded";

/// Events agents finished with, by `group`, `event_type` and `outcome`.
pub const EVENTS_CONSUMED: &str = "agentbus_events_consumed_total";
/// Time an agent's handler took for one attempt, by `group`.
pub const HANDLER_DURATION: &str = "agentbus_handler_duration_seconds";
/// Events an agent is working on, by `group`.
pub const IN_FLIGHT: &str = "agentbus_agent_in_flight";
/// Partitions an agent paused because its lanes were full, by `group`.
pub const PAUSED_PARTITIONS: &str = "agentbus_agent_paused_partitions";
/// Keys in an agent's dedup store, by `group`.
pub const DEDUP_KEYS: &str = "agentbus_dedup_keys";

/// Time to restore an agent's dedup records of one changelog partition after it was
/// assigned, in seconds, by `group`.
pub const DEDUP_RESTORE_SECONDS: &str = "agentbus_dedup_restore_seconds";
/// Dedup records restored from an agent's changelog, by `group`.
pub const DEDUP_RESTORED: &str = "agentbus_dedup_restored_records_total";

/// Agents that stopped by themselves (a lane panicked or ended, the dedup store failed),
/// by `group`. Any increase needs a person: the agent takes no events until restarted.
pub const AGENT_FAILURES: &str = "agentbus_agent_failures_total";
/// Records an agent skipped because the consumer could not read them (a corrupt batch, a
/// codec or format the client lacks, a record too large for the fetch settings), by
/// `group`, `topic` and `reason` (the client's error code). Any increase needs a person.
pub const RECORDS_SKIPPED: &str = "agentbus_records_skipped_total";

/// State of an integration's circuit breaker, by `service`: 0 closed, 1 half-open, 2 open.
pub const CIRCUIT_BREAKER_STATE: &str = "agentbus_circuit_breaker_state";

/// How long the last lag collection took, in seconds.
pub const LAG_COLLECTION_SECONDS: &str = "agentbus_lag_collection_seconds";
/// Lag collections that failed.
pub const LAG_COLLECTION_ERRORS: &str = "agentbus_lag_collection_errors_total";
/// Records copied by replays, by `target` topic.
pub const REPLAYED: &str = "agentbus_replayed_records_total";

/// Publish requests refused at once because the service had its limit of publishes in
/// flight (`--max-publishes-in-flight`); each was answered 503 with `Retry-After`.
pub const HTTP_REQUESTS_SHED: &str = "agentbus_http_requests_shed_total";
/// Publish requests being worked on now (at most `--max-publishes-in-flight`).
pub const PUBLISHES_IN_FLIGHT: &str = "agentbus_publishes_in_flight";
/// Connections refused at once because the server had its limit of open connections
/// (`--max-connections`); each was answered 503 with `Retry-After` and closed.
pub const HTTP_CONNECTIONS_REFUSED: &str = "agentbus_http_connections_refused_total";

/// Outcomes of [`EVENTS_PUBLISHED`].
pub mod outcome {
    /// Written to Kafka and acknowledged by the broker.
    pub const WRITTEN: &str = "written";
    /// A repeat of an idempotency key already written; nothing written again.
    pub const DUPLICATE: &str = "duplicate";
    /// Refused before anything was written (bad envelope, schema, conflict, limits).
    pub const REJECTED: &str = "rejected";
    /// The broker did not acknowledge it (unavailable, timed out); answered 503.
    pub const FAILED: &str = "failed";
}

/// Starts structured logging. `filter` is a tracing `EnvFilter` (`AGENTBUS_LOG`);
/// `json` switches to one JSON object per line.
pub fn init_logging(filter: &str, json: bool) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second call (tests build many apps in one process) keeps the first subscriber.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// The process-wide Prometheus recorder. The `metrics` facade has one global recorder, so
/// every [`crate::app::App`] in a process shares it.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(PUBLISH_DURATION.to_string()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ],
            )
            .expect("bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full(HANDLER_DURATION.to_string()),
                &[
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
            .expect("bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full(DEDUP_RESTORE_SECONDS.to_string()),
                &[0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0],
            )
            .expect("bucket list is not empty");
        let handle = builder
            .install_recorder()
            .expect("no other metrics recorder is installed in this process");
        describe();
        handle
    })
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        EVENTS_PUBLISHED,
        "Events handled by the publish path, by event type and outcome."
    );
    describe_histogram!(
        PUBLISH_DURATION,
        metrics::Unit::Seconds,
        "Time from a publish request's arrival to its answer."
    );
    describe_counter!(PUBLISH_REQUESTS, "Publish requests answered, by status.");
    describe_gauge!(
        BROKER_UP,
        "1 when the broker answered the last metadata probe."
    );
    describe_gauge!(
        IDEMPOTENCY_KEYS,
        "Keys held by the publish idempotency store."
    );
    describe_counter!(IDEMPOTENCY_SWEPT, "Expired idempotency keys removed.");
    describe_gauge!(SCHEMAS_LOADED, "Schema versions loaded, by event type.");
    describe_counter!(
        EVENTS_CONSUMED,
        "Events agents finished with, by group, event type and outcome."
    );
    describe_histogram!(
        HANDLER_DURATION,
        metrics::Unit::Seconds,
        "Time of one handler attempt, by group."
    );
    describe_gauge!(IN_FLIGHT, "Events an agent is handling, by group.");
    describe_gauge!(
        LAG_COLLECTION_SECONDS,
        metrics::Unit::Seconds,
        "How long the last consumer lag collection took."
    );
    describe_counter!(
        LAG_COLLECTION_ERRORS,
        "Consumer lag collections that failed."
    );
    describe_counter!(REPLAYED, "Records copied by replays, by target topic.");
    describe_gauge!(
        PAUSED_PARTITIONS,
        "Partitions paused because the agent's lanes are full."
    );
    describe_gauge!(DEDUP_KEYS, "Keys in an agent's dedup store, by group.");
    describe_histogram!(
        DEDUP_RESTORE_SECONDS,
        metrics::Unit::Seconds,
        "Time to restore one changelog partition of an agent's dedup records, by group."
    );
    describe_counter!(
        DEDUP_RESTORED,
        "Dedup records restored from an agent's changelog, by group."
    );
    describe_counter!(
        AGENT_FAILURES,
        "Agents that stopped by themselves (a lane failed, the dedup store failed), by group."
    );
    describe_counter!(
        RECORDS_SKIPPED,
        "Records an agent skipped because the consumer could not read them, by group, topic and reason."
    );
    describe_gauge!(
        CIRCUIT_BREAKER_STATE,
        "Circuit breaker of an integration: 0 closed, 1 half-open, 2 open."
    );
    describe_counter!(
        HTTP_REQUESTS_SHED,
        "Publish requests refused with 503 because the service had its limit of publishes in flight."
    );
    describe_gauge!(
        PUBLISHES_IN_FLIGHT,
        "Publish requests being worked on (at most --max-publishes-in-flight)."
    );
    describe_counter!(
        HTTP_CONNECTIONS_REFUSED,
        "Connections answered 503 and closed because the server had its limit of open connections."
    );
}

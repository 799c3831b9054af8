//! Publishing against the real broker: what lands in Kafka, batches, idempotency, errors.

mod common;

use std::time::{Duration, Instant};

use agentbus::schema;
use apache_avro::{Schema, types::Value as Avro};
use common::*;
use rdkafka::{Message, Timestamp};
use serde_json::{Value, json};

fn agent_created(agent_id: &str) -> Value {
    json!({
        "event_type": "agent.created",
        "event_version": 1,
        "source": "daa-service",
        "data": {"agent_id": agent_id, "type": "researcher", "cognitive_pattern": "systems", "created_by": "user123"}
    })
}

#[tokio::test]
async fn a_published_event_lands_in_kafka_with_the_contracts_key_timestamp_headers_and_wire_format()
{
    let app = spawn_app().await;
    let event_id = "0192f6a2-7c3e-7a1b-9c2d-3e4f5a6b7c8d";
    // An hour ago, to the second: a fixed date would fall out of the topic's retention (30
    // days) one day, and Kafka would delete the record before the test reads it.
    let at = chrono::DateTime::from_timestamp(chrono::Utc::now().timestamp() - 3600, 0).unwrap();
    let ce_time = at.format("%Y-%m-%dT%H:%M:%S.000Z").to_string();
    let expires_at = (at + chrono::TimeDelta::days(1))
        .format("%Y-%m-%dT%H:%M:%S.000Z")
        .to_string();
    let response = app
        .post(&json!({
            "event_type": "agent.created",
            "event_version": "1.0",
            "source": "daa-service",
            "data": {"agent_id": "a1b2", "type": "researcher", "cognitive_pattern": "systems", "created_by": "user123"},
            "event_id": event_id,
            "timestamp": at.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            "partition_key": "a1b2",
            "idempotency_key": "req_abc123",
            "ttl_ms": 86400000,
            "metadata": {"correlation_id": "req_abc123", "causation_id": "evt_xyz789", "tenant": "acme"}
        }))
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["event_id"], event_id);
    assert_eq!(body["event_type"], "agent.created");
    assert_eq!(body["event_version"], 1);
    assert_eq!(body["topic"], app.topic("agent"));
    assert_eq!(body["duplicate"], false);
    assert!(body["offset"].as_i64().unwrap() >= 0);

    let records = read_records(&app.brokers, &app.topic("agent"), 1);
    let record = &records[0];
    assert_eq!(record.key(), Some(&b"a1b2"[..]));
    assert_eq!(
        record.partition(),
        body["partition"].as_i64().unwrap() as i32
    );
    assert_eq!(record.offset(), body["offset"].as_i64().unwrap());
    assert_eq!(
        record.timestamp(),
        Timestamp::CreateTime(at.timestamp_millis())
    );
    for (name, value) in [
        ("ce_specversion", "1.0"),
        ("ce_id", event_id),
        ("ce_type", "agent.created"),
        ("ce_source", "daa-service"),
        ("ce_time", ce_time.as_str()),
        ("content-type", "application/avro"),
        ("ce_eventversion", "1"),
        ("ce_idempotencykey", "req_abc123"),
        ("ce_correlationid", "req_abc123"),
        ("ce_causationid", "evt_xyz789"),
        ("ce_expiresat", expires_at.as_str()),
        ("agentbus-meta-tenant", "acme"),
    ] {
        assert_eq!(
            header(record, name).as_deref(),
            Some(value),
            "header {name}"
        );
    }

    // Confluent wire format, decodable with the schema the registry serves for its id.
    let payload = record.payload().unwrap();
    let (id, body) = schema::split_wire(payload).unwrap();
    let served: Value = app.get_json(&format!("/registry/schemas/ids/{id}")).await;
    let writer = Schema::parse_str(served["schema"].as_str().unwrap()).unwrap();
    let value = schema::decode_avro(&writer, body).unwrap();
    let Avro::Record(fields) = value else {
        panic!("not a record: {value:?}")
    };
    assert_eq!(fields[0], ("agent_id".into(), Avro::String("a1b2".into())));
    assert_eq!(
        fields[2],
        ("cognitive_pattern".into(), Avro::Enum(3, "systems".into()))
    );
    assert_eq!(fields[4], ("capabilities".into(), Avro::Array(vec![])));
}

#[tokio::test]
async fn a_batch_is_written_whole_and_answered_in_input_order() {
    let app = spawn_app().await;
    let batch: Vec<Value> = (0..20)
        .map(|i| {
            let mut e = agent_created(&format!("agent-{i}"));
            e["partition_key"] = json!("same-key");
            e
        })
        .collect();
    let response = app.post(&Value::Array(batch)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 20);
    let fields: Vec<&str> = results[0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        [
            "duplicate",
            "event_id",
            "event_type",
            "event_version",
            "offset",
            "partition",
            "topic"
        ],
        "the contract's result fields, nothing more"
    );
    let offsets: Vec<i64> = results
        .iter()
        .map(|r| r["offset"].as_i64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[1] == w[0] + 1), "{offsets:?}");

    let records = read_records(&app.brokers, &app.topic("agent"), 20);
    let ids: Vec<String> = records
        .iter()
        .map(|r| header(r, "ce_id").unwrap())
        .collect();
    let answered: Vec<String> = results
        .iter()
        .map(|r| r["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, answered, "same key: Kafka keeps the input order");
}

#[tokio::test]
async fn publishing_the_same_idempotency_key_twice_writes_once() {
    let app = spawn_app().await;
    let mut event = agent_created("a1");
    event["idempotency_key"] = json!("req-1");
    let first = app.post(&event).await;
    assert_eq!(first.status(), 200);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first: Value = first.json().await.unwrap();

    let again = app.post(&event).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["duplicate"], true);
    for field in ["event_id", "topic", "partition", "offset"] {
        assert_eq!(again[field], first[field], "{field}");
    }
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 1);
}

#[tokio::test]
async fn the_idempotency_header_wins_and_a_different_body_with_the_same_key_is_a_conflict() {
    let app = spawn_app().await;
    let send = |body: Value| {
        app.client
            .post(format!("{}/v1/events", app.url))
            .header("Idempotency-Key", "hdr-1")
            .json(&body)
            .send()
    };
    assert_eq!(send(agent_created("a1")).await.unwrap().status(), 200);
    let conflict = send(agent_created("a2")).await.unwrap();
    assert_eq!(conflict.status(), 409);
    let body: Value = conflict.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_conflict");
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 1);
}

#[tokio::test]
async fn a_repeated_batch_writes_only_what_was_not_written_before() {
    let app = spawn_app().await;
    let mut first = agent_created("a1");
    first["event_id"] = json!("0192f6a2-0000-7000-8000-000000000001");
    assert_eq!(app.post(&first).await.status(), 200);
    let mut second = agent_created("a2");
    second["event_id"] = json!("0192f6a2-0000-7000-8000-000000000002");
    let response = app.post(&json!([first, second, first])).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let dup: Vec<bool> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["duplicate"].as_bool().unwrap())
        .collect();
    assert_eq!(dup, [true, false, true]);
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 2);
}

#[tokio::test]
async fn idempotency_keys_survive_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let prefix = unique_prefix();
    let options = || Options {
        data_dir: Some(data.path().to_path_buf()),
        prefix: prefix.clone(),
        ..Options::default()
    };
    let mut event = agent_created("a1");
    event["idempotency_key"] = json!("survives");
    let app = spawn(options()).await;
    let first: Value = app.post(&event).await.json().await.unwrap();
    app.stop().await;

    let app = spawn(options()).await;
    let again: Value = app.post(&event).await.json().await.unwrap();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["offset"], first["offset"]);
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 1);
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone())
}

fn paths(error: &Value) -> Vec<String> {
    error["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_publish_error_of_the_contract_has_its_status_code_and_paths() {
    let app = spawn_app().await;

    let (status, error) = error_of(app.post_raw("{not json").await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("malformed_json"))
    );

    let (status, error) = error_of(app.post(&json!({"data": {}})).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_envelope"))
    );
    assert_eq!(paths(&error), ["event_type", "source"]);

    let (status, error) = error_of(
        app.post(&json!({"event_type": "agent.created", "source": "s"}))
            .await,
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_envelope"))
    );
    assert_eq!(paths(&error), ["data"]);

    let (status, error) = error_of(
        app.post(&json!({"event_type": "nobody.knows", "source": "s", "data": {}}))
            .await,
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("unknown_event_type"))
    );

    let mut e = agent_created("a");
    e["event_version"] = json!(9);
    let (status, error) = error_of(app.post(&e).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("unknown_event_version"))
    );
    assert_eq!(paths(&error), ["event_version"]);

    let (status, error) = error_of(
        app.post(&json!({
            "event_type": "workflow.started", "source": "s",
            "data": {"workflow_id": "not-a-uuid", "workflow_name": "w", "started_by": "u",
                     "steps": [{"name": "a", "agent_id": "x"}, {"name": 7, "agent_id": "y"}], "bogus": 1}
        }))
        .await,
    )
    .await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("schema_violation"))
    );
    let mut p = paths(&error);
    p.sort();
    assert_eq!(p, ["data.bogus", "data.steps[1].name", "data.workflow_id"]);

    // A batch with one bad item: 422 naming the item, nothing written.
    let mut bad = agent_created("b");
    bad["data"]["cognitive_pattern"] = json!("telepathic");
    let (status, error) = error_of(app.post(&json!([agent_created("a"), bad])).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (422, Some("schema_violation"))
    );
    assert_eq!(paths(&error), ["[1].data.cognitive_pattern"]);
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 0);

    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let (status, error) = error_of(app.post_raw(big).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("payload_too_large"))
    );

    let many: Vec<Value> = (0..501).map(|i| agent_created(&i.to_string())).collect();
    let (status, error) = error_of(app.post(&Value::Array(many)).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 0);
}

#[tokio::test]
async fn with_no_broker_there_publishing_answers_503_with_retry_after_quickly() {
    let app = spawn(Options::without_broker()).await;
    let started = Instant::now();
    let response = app.post(&agent_created("a")).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let (_, error) = error_of(response).await;
    assert_eq!(error["code"], "broker_unavailable");
    assert_eq!(app.get("/readyz").await.status(), 503);
    assert_eq!(app.get("/healthz").await.status(), 200);
}

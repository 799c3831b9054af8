//! An event's `timestamp` becomes its Kafka record's CreateTime (CONTRACT.md §1), so the
//! topic's timestamp bounds apply to it: the broker refuses one too far ahead
//! (`message.timestamp.after.max.ms`, an hour by default) and deletes one older than
//! `retention.ms` at its next retention check. Such an event is refused up front, 400
//! `invalid_envelope` at `timestamp`, and nothing is written; never a 503 that a client would
//! retry forever, never a 200 for an event Kafka deletes at once.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use agentbus::topics::TopicSpec;
use chrono::{DateTime, SecondsFormat, Utc};
use common::*;
use rdkafka::{
    Message, Timestamp,
    admin::{AdminClient, AdminOptions, AlterConfig, ResourceSpecifier},
    client::DefaultClientContext,
};
use serde_json::{Value, json};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 60 * MINUTE_MS;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Now plus `offset_ms`, to the millisecond (what a record's timestamp keeps).
fn at(offset_ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(Utc::now().timestamp_millis() + offset_ms).unwrap()
}

/// An `agent.created` event stamped `at`.
fn stamped(agent_id: &str, at: DateTime<Utc>) -> Value {
    json!({
        "event_type": "agent.created",
        "source": "timestamps-test",
        "timestamp": at.to_rfc3339_opts(SecondsFormat::Millis, true),
        "data": {"agent_id": agent_id, "type": "researcher", "cognitive_pattern": "systems", "created_by": "u"}
    })
}

async fn error_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].clone())
}

fn paths(error: &Value) -> Vec<&str> {
    error["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect()
}

fn message(error: &Value) -> &str {
    error["message"].as_str().unwrap()
}

/// Asserts a `400 invalid_envelope` at `paths`, whose message contains `says`.
async fn assert_refused(response: reqwest::Response, at_paths: &[&str], says: &str) {
    let (status, error) = error_of(response).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_envelope")),
        "{error}"
    );
    assert_eq!(paths(&error), at_paths, "{error}");
    assert!(message(&error).contains(says), "{error}");
}

/// `agentbus_events_published_total{event_type="agent.created",outcome="rejected"}`, as the
/// app's `/metrics` tells it (0 before the first).
async fn rejected(app: &TestApp) -> f64 {
    let metrics = app.get("/metrics").await.text().await.unwrap();
    metrics
        .lines()
        .find(|l| {
            l.starts_with("agentbus_events_published_total{")
                && l.contains("event_type=\"agent.created\"")
                && l.contains("outcome=\"rejected\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The bug as found: 2030-01-01 on Kafka 4 was answered 503 with Retry-After, forever.
#[tokio::test]
async fn a_timestamp_more_than_an_hour_ahead_is_refused_at_timestamp_and_nothing_is_written() {
    let app = spawn_app().await;
    let before = rejected(&app).await;
    let far = DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
        .unwrap()
        .to_utc();
    let response = app.post(&stamped("a", far)).await;
    assert!(response.headers().get("retry-after").is_none());
    assert_refused(
        response,
        &["timestamp"],
        "takes timestamps at most 1h ahead of the broker's clock (message.timestamp.after.max.ms)",
    )
    .await;
    // Just past the hour, as the broker would count it.
    assert_refused(
        app.post(&stamped("b", at(HOUR_MS + MINUTE_MS))).await,
        &["timestamp"],
        "in the future",
    )
    .await;
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 0);
    // Counted like every refusal (other tests of this binary count there too: at least).
    assert!(rejected(&app).await >= before + 2.0);
}

#[tokio::test]
async fn a_timestamp_older_than_the_topics_retention_is_refused_and_nothing_is_written() {
    // The app creates its topics with --topic-retention, 30 days by default; the broker tells
    // it back as the topic's retention.ms.
    let app = spawn_app().await;
    let topic = app.topic("agent");
    assert_refused(
        app.post(&stamped("a", at(-45 * DAY_MS))).await,
        &["timestamp"],
        &format!(
            "the timestamp is 45days old; topic {topic} keeps records 30days (retention.ms), so \
             Kafka would delete it at once"
        ),
    )
    .await;
    // Within the retention, but with less than an hour of it left: Kafka's next retention
    // check could delete it before an agent reads it.
    assert_refused(
        app.post(&stamped("b", at(-30 * DAY_MS + 30 * MINUTE_MS)))
            .await,
        &["timestamp"],
        "at least 1h of retention left",
    )
    .await;
    assert_eq!(record_count(&app.brokers, &topic), 0);
}

#[tokio::test]
async fn a_timestamp_a_minute_old_or_ten_minutes_ahead_is_written_as_the_records_create_time() {
    let app = spawn_app().await;
    let (old, ahead) = (at(-MINUTE_MS), at(10 * MINUTE_MS));
    for (id, t) in [("old", old), ("ahead", ahead)] {
        let response = app.post(&stamped(id, t)).await;
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    }
    let records = read_records(&app.brokers, &app.topic("agent"), 2);
    let mut times: Vec<Timestamp> = records.iter().map(|r| r.timestamp()).collect();
    times.sort_by_key(|t| t.to_millis());
    assert_eq!(
        times,
        [
            Timestamp::CreateTime(old.timestamp_millis()),
            Timestamp::CreateTime(ahead.timestamp_millis())
        ]
    );
}

#[tokio::test]
async fn a_batch_with_a_timestamp_its_topic_cannot_take_writes_nothing_and_names_each_item() {
    let app = spawn_app().await;
    let batch = json!([
        stamped("fine", at(-MINUTE_MS)),
        stamped("ahead", at(2 * HOUR_MS)),
        stamped("fine-too", at(0)),
        stamped("old", at(-31 * DAY_MS)),
    ]);
    let (status, error) = error_of(app.post(&batch).await).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_envelope")),
        "{error}"
    );
    assert_eq!(paths(&error), ["[1].timestamp", "[3].timestamp"]);
    assert!(
        message(&error).contains("2 event(s) of the batch have a timestamp their topic does not take or keep; nothing in the batch was written"),
        "{error}"
    );
    assert_eq!(record_count(&app.brokers, &app.topic("agent")), 0);
    // Refused before the idempotency claim: the good items are not held as written.
    let retry = app.post(&json!([stamped("fine", at(-MINUTE_MS))])).await;
    assert_eq!(retry.status(), 200);
}

/// The bounds come from the topic's own configuration as the broker tells it, not from the
/// defaults (Kafka's hour ahead, agentbus's 30 days of retention): a topic created beforehand
/// with 3 hours of retention and a minute ahead.
#[tokio::test]
async fn the_bounds_are_the_topics_own_as_the_broker_tells_them() {
    let prefix = unique_prefix();
    let topic = format!("{prefix}agent.events");
    let kafka = agentbus::config::KafkaArgs {
        brokers: brokers(),
        topic_prefix: prefix.clone(),
        broker_quirks: broker_quirks(),
        ..Default::default()
    };
    agentbus::topics::ensure(
        &kafka,
        &[TopicSpec {
            name: topic.clone(),
            partitions: 2,
            replication: 1,
            retention: Duration::from_secs(3 * 3600),
            configs: vec![("message.timestamp.after.max.ms".into(), "60000".into())],
        }],
    )
    .await
    .unwrap();
    let app = spawn(Options {
        prefix,
        ..Options::default()
    })
    .await;
    assert_refused(
        app.post(&stamped("ahead", at(10 * MINUTE_MS))).await,
        &["timestamp"],
        &format!(
            "topic {topic} takes timestamps at most 1m ahead of the broker's clock \
             (message.timestamp.after.max.ms)"
        ),
    )
    .await;
    assert_refused(
        app.post(&stamped("old", at(-150 * MINUTE_MS))).await,
        &["timestamp"],
        &format!("topic {topic} keeps records 3h (retention.ms), so Kafka would delete it within "),
    )
    .await;
    assert_eq!(record_count(&app.brokers, &topic), 0);
    let fine = at(-90 * MINUTE_MS);
    let response = app.post(&stamped("fine", fine)).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let records = read_records(&app.brokers, &topic, 1);
    assert_eq!(
        records[0].timestamp(),
        Timestamp::CreateTime(fine.timestamp_millis())
    );
}

/// A topic made stricter after agentbus read its configuration (it is cached for a minute):
/// the broker refuses the record batch with INVALID_TIMESTAMP. The event at fault, judged
/// against the topic's configuration read again, is a 400 at its `timestamp`, not a 503; an
/// event that only shared its record batch is not blamed; the next publish refuses such an
/// event up front.
#[tokio::test]
async fn a_timestamp_the_broker_refuses_is_a_400_not_a_503_and_the_topic_is_read_again() {
    let app = spawn_app().await;
    let topic = app.topic("agent");
    // Known: the default hour ahead.
    let response = app.post(&stamped("first", at(10 * MINUTE_MS))).await;
    assert_eq!(response.status(), 200);

    let admin: AdminClient<DefaultClientContext> =
        app.kafka_args().client_config().create().unwrap();
    let mut entries = HashMap::new();
    entries.insert("message.timestamp.after.max.ms", "60000");
    entries.insert("retention.ms", "2592000000");
    let alter = AlterConfig {
        specifier: ResourceSpecifier::Topic(&topic),
        entries,
    };
    let altered = admin
        .alter_configs([&alter], &AdminOptions::new())
        .await
        .unwrap();
    assert!(altered.iter().all(Result::is_ok), "{altered:?}");

    // The broker applies the change within moments; until then the events are written. The
    // bad event comes first and both share a partition, so one record batch: the broker
    // refuses both, and the last failure must not decide whom the answer blames.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    let (status, error) = loop {
        n += 1;
        let mut ahead = stamped(&format!("ahead-{n}"), at(10 * MINUTE_MS));
        let mut fine = stamped(&format!("fine-{n}"), at(0));
        ahead["partition_key"] = json!("one");
        fine["partition_key"] = json!("one");
        let response = app.post(&json!([ahead, fine])).await;
        if response.status() != 200 {
            break error_of(response).await;
        }
        assert!(Instant::now() < deadline, "the broker took every event");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("invalid_envelope")),
        "{error}"
    );
    assert_eq!(paths(&error), ["[0].timestamp"]);
    for says in [
        "takes timestamps at most 1m ahead of the broker's clock (message.timestamp.after.max.ms)",
        "InvalidTimestamp",
        "a retry cannot help",
    ] {
        assert!(message(&error).contains(says), "{says}: {error}");
    }

    // Read again: refused before producing.
    let (status, error) = error_of(app.post(&stamped("again", at(10 * MINUTE_MS))).await).await;
    assert_eq!(status, 400, "{error}");
    assert!(!message(&error).contains("InvalidTimestamp"), "{error}");
    // The producer is fine for events the topic takes.
    let response = app.post(&stamped("after", at(0))).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
}

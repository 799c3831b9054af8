//! Replay from a timestamp against the real broker: events spread over the last hours, a
//! replay from the middle, the agent handling the copies once, dry runs, the API's jobs and
//! offset resets.

mod common;

use std::{
    collections::HashMap,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use agentbus::{
    config::KafkaArgs,
    replay::{self, Progress, Request, Target},
    topics::{self, TopicSpec},
};
use chrono::{DateTime, Utc};
use common::{agents::*, *};
use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{BaseProducer, BaseRecord, Producer},
};
use serde_json::{Value, json};

/// Twelve tasks, one every ten minutes, the last ten minutes ago: `e0` two hours ago.
async fn publish_history(app: &TestApp, now: DateTime<Utc>) {
    for i in 0..12 {
        let mut event = task(&format!("k{i}"), &format!("e{i}"));
        event["timestamp"] = json!((now - chrono::Duration::minutes(10 * (12 - i))).to_rfc3339());
        assert_eq!(app.post(&event).await.status(), 200);
    }
}

/// Whether the suite runs on tansu (`AGENTBUS_LOCAL_BROKER=tansu`), whose gaps some
/// assertions allow for; on Apache Kafka they assert Kafka's exact behaviour.
fn broker_is_tansu() -> bool {
    std::env::var("AGENTBUS_LOCAL_BROKER").is_ok_and(|b| b == "tansu")
}

fn agentbus(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(agentbus_bin())
        .args(args)
        .args(["--brokers", &app.brokers, "--topic-prefix", &app.prefix])
        .env("AGENTBUS_BROKER_QUIRKS", broker_quirks_setting())
        .output()
        .unwrap()
}

/// The value of `agentbus_events_consumed_total` for a group and outcome.
async fn consumed(app: &TestApp, group: &str, outcome: &str) -> u64 {
    let text = app.get("/metrics").await.text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("agentbus_events_consumed_total{"))
        .filter(|l| {
            l.contains(&format!("group=\"{group}\""))
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_replay_from_the_middle_copies_that_window_and_the_agent_handles_it_again_once() {
    let (receiver, url) = Receiver::start().await;
    let name = format!("replayer-{}", uuid::Uuid::new_v4().simple());
    let (app, _consumers) = app_with_agent(&url, &name).await;
    let now = Utc::now();
    publish_history(&app, now).await;
    receiver.wait_for(12, Duration::from_secs(60)).await;

    // From 65 minutes ago: e6 (60 minutes ago) to e11.
    let middle = now - chrono::Duration::minutes(65);
    let from = middle.to_rfc3339();
    let dry = succeeded(&agentbus(
        &app,
        &[
            "replay",
            "--from",
            &from,
            "--event-type",
            "agent.task.requested",
            "--to-agent",
            &name,
            "--dry-run",
        ],
    ));
    // Kafka's offsets-for-times answers are exact: the range is the window. (tansu answers 0
    // for "none", which widens the range; never the count.)
    let expected = if broker_is_tansu() {
        "dry run: 6 of "
    } else {
        "dry run: 6 of 6 records"
    };
    assert!(dry.contains(expected), "{dry}");
    assert!(dry.contains("WOULD COPY"), "{dry}");

    // Planned first: what arrives after the start is not part of it.
    let request = Request {
        from: middle,
        until: None,
        topics: vec![],
        event_types: vec!["agent.task.requested".into()],
        target: Target::Agent(name.clone()),
        replay_id: None,
    };
    let (k, r) = (app.kafka_args(), request.clone());
    let plan = tokio::task::spawn_blocking(move || replay::plan(&k, &r))
        .await
        .unwrap()
        .unwrap();
    if broker_is_tansu() {
        assert!(plan.records() >= 6, "{plan:?}");
    } else {
        assert_eq!(plan.records(), 6, "{plan:?}");
    }
    for late in ["late-0", "late-1"] {
        assert_eq!(app.post(&task("k9", late)).await.status(), 200);
    }
    receiver.wait_for(14, Duration::from_secs(60)).await;
    let (k, p) = (app.kafka_args(), plan.clone());
    let summary = tokio::task::spawn_blocking(move || {
        replay::execute(&k, &request, &p, Arc::new(Progress::default()), false)
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!((summary.matched, summary.copied), (6, 6));

    // The agent handles the six again, once each.
    receiver.wait_for(20, Duration::from_secs(60)).await;
    let mut handled: HashMap<String, usize> = HashMap::new();
    for d in receiver.descriptions() {
        *handled.entry(d).or_default() += 1;
    }
    for i in 0..12 {
        let expected = if i >= 6 { 2 } else { 1 };
        assert_eq!(handled[&format!("e{i}")], expected, "e{i}: {handled:?}");
    }
    assert_eq!((handled["late-0"], handled["late-1"]), (1, 1));

    // The copies: key, value, timestamp and headers kept, plus the replay id.
    let replay_topic = format!("{}{name}.replay", app.prefix);
    let (brokers, t) = (app.brokers.clone(), replay_topic.clone());
    let copies = tokio::task::spawn_blocking(move || read_records(&brokers, &t, 6))
        .await
        .unwrap();
    let (brokers, t) = (app.brokers.clone(), app.topic("agent"));
    let originals = tokio::task::spawn_blocking(move || read_records(&brokers, &t, 14))
        .await
        .unwrap();
    for c in &copies {
        assert_eq!(
            header(c, "agentbus-replay-id").as_deref(),
            Some(plan.replay_id.as_str())
        );
        let id = header(c, "ce_id").unwrap();
        let o = originals
            .iter()
            .find(|o| header(o, "ce_id").as_deref() == Some(id.as_str()))
            .unwrap();
        assert_eq!(c.key(), o.key());
        assert_eq!(c.payload(), o.payload());
        assert_eq!(c.timestamp(), o.timestamp());
        assert_eq!(header(c, "ce_type"), header(o, "ce_type"));
        assert!(c.timestamp().to_millis().unwrap() >= middle.timestamp_millis());
    }

    // The same replay again (same replay id, the late ones left out): the agent knows them.
    let until = (now - chrono::Duration::minutes(5)).to_rfc3339();
    let again = succeeded(&agentbus(
        &app,
        &[
            "replay",
            "--from",
            &from,
            "--until",
            &until,
            "--event-type",
            "agent.task.*",
            "--to-agent",
            &name,
            "--replay-id",
            &plan.replay_id,
        ],
    ));
    assert!(again.contains("copied 6 of "), "{again}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while consumed(&app, &name, "duplicate").await < 6 {
        assert!(Instant::now() < deadline, "the repeats were not skipped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(receiver.got().len(), 20, "nothing handled a third time");
    app.stop().await;
}

#[tokio::test]
async fn replay_jobs_through_the_api_and_clear_errors_for_bad_requests() {
    let app = spawn(Options::default()).await;
    let now = Utc::now();
    publish_history(&app, now).await;
    let copy = format!("{}copy", app.prefix);
    topics::ensure(
        &app.kafka_args(),
        &[TopicSpec {
            name: copy.clone(),
            partitions: 1,
            replication: 1,
            retention: Duration::from_secs(3600),
            configs: Vec::new(),
        }],
    )
    .await
    .unwrap();
    // From 95 to 45 minutes ago: e3 (90) to e7 (50).
    let started = app
        .client
        .post(format!("{}/v1/replays", app.url))
        .json(&json!({
            "from": (now - chrono::Duration::minutes(95)).to_rfc3339(),
            "until": (now - chrono::Duration::minutes(45)).to_rfc3339(),
            "topic": app.topic("agent"),
            "into_topic": copy,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let job: Value = started.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/replays/{}", job["id"].as_str().unwrap())
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let view: Value = app.get_json(&location).await;
        if view["status"] != "running" {
            break view;
        }
        assert!(Instant::now() < deadline, "the job did not finish: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["copied"], 5, "{done}");
    assert_eq!(done["matched"], 5);
    // Kafka's offsets-for-times answers are exact: the ranges hold the window and no more.
    if !broker_is_tansu() {
        assert_eq!(
            (&done["total"], &done["scanned"]),
            (&json!(5), &json!(5)),
            "{done}"
        );
    }
    assert_eq!(done["progress"], 1.0);
    assert!(done["note"].as_str().unwrap().contains("restart"));
    let (brokers, c) = (app.brokers.clone(), copy.clone());
    let copied = tokio::task::spawn_blocking(move || read_records(&brokers, &c, 5))
        .await
        .unwrap();
    let mut descriptions: Vec<String> = copied
        .iter()
        .map(|m| {
            let (_, body) = agentbus::schema::split_wire(m.payload().unwrap()).unwrap();
            String::from_utf8_lossy(body).into_owned()
        })
        .collect();
    descriptions.sort();
    for i in 3..=7 {
        assert!(
            descriptions.iter().any(|d| d.contains(&format!("e{i}"))),
            "e{i} copied: {descriptions:?}"
        );
    }

    let from = (now - chrono::Duration::hours(1)).to_rfc3339();
    let bad = [
        (
            json!({"from": from, "until": (now - chrono::Duration::hours(2)).to_rfc3339(),
                   "topic": app.topic("agent"), "into_topic": copy}),
            400,
            "before until",
        ),
        (
            json!({"from": "yesterday-ish", "topic": app.topic("agent"), "into_topic": copy}),
            400,
            "neither an RFC 3339 time",
        ),
        (
            json!({"from": from, "topic": format!("{}nope", app.prefix), "into_topic": copy}),
            404,
            "no topic",
        ),
        (
            json!({"from": from, "topic": app.topic("agent"), "to_agent": "no-such-agent"}),
            404,
            "no agent",
        ),
        (
            json!({"from": from, "into_topic": copy}),
            400,
            "name what to replay",
        ),
        (
            json!({"from": from, "topic": app.topic("agent")}),
            400,
            "exactly one of",
        ),
        (json!({"from": from, "bogus": 1}), 400, "unknown field"),
    ];
    for (body, status, message) in bad {
        let answer = app
            .client
            .post(format!("{}/v1/replays", app.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), status, "{body}");
        let error: Value = answer.json().await.unwrap();
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .contains(message),
            "{body}: {error}"
        );
    }
    assert_eq!(app.get("/v1/replays/nope").await.status(), 404);

    // The CLI says the same.
    let out = agentbus(
        &app,
        &[
            "replay",
            "--from",
            "2h",
            "--until",
            "3h",
            "--topic",
            &app.topic("agent"),
            "--into-topic",
            &copy,
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be before"));
    app.stop().await;
}

#[tokio::test]
async fn reset_offsets_plans_refuses_an_active_group_and_moves_an_idle_one() {
    let app = spawn(Options::default()).await;
    let now = Utc::now();
    publish_history(&app, now).await;
    let (brokers, topic) = (app.brokers.clone(), app.topic("agent"));
    let group = format!("resetter-{}", uuid::Uuid::new_v4().simple());

    // A live consumer of the group reads everything and commits.
    let (b, g, t) = (brokers.clone(), group.clone(), topic.clone());
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let (read_tx, read_rx) = std::sync::mpsc::channel::<()>();
    let live = std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", &g)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[&t]).unwrap();
        let mut seen = 0;
        loop {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
                    .unwrap();
                consumer.commit(&tpl, CommitMode::Sync).unwrap();
                seen += 1;
                if seen == 12 {
                    read_tx.send(()).unwrap();
                }
            }
            if stop_rx.try_recv().is_ok() {
                break;
            }
        }
        consumer.unsubscribe();
        drop(consumer);
    });
    tokio::task::spawn_blocking(move || read_rx.recv_timeout(Duration::from_secs(60)).unwrap())
        .await
        .unwrap();
    let (b, g, t) = (brokers.clone(), group.clone(), topic.clone());
    let before = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, 0))
        .await
        .unwrap();
    assert_eq!(before.iter().sum::<i64>(), 12, "{before:?}");

    let from = (now - chrono::Duration::minutes(65)).to_rfc3339();
    let reset = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            "--reset-offsets",
            "--to-agent",
            &group,
            "--topic",
            &topic,
            "--from",
            &from,
        ];
        args.extend_from_slice(extra);
        agentbus(&app, &args)
    };
    // The plan: the committed offsets now and where they would go.
    let plan = succeeded(&reset(&[]));
    assert!(plan.contains("plan only: pass --execute"), "{plan}");
    // Refused while the group has a live member: on Kafka because agentbus sees it (tansu
    // cannot describe groups, and agentbus refuses because it cannot tell).
    let refused = reset(&["--execute"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr).into_owned();
    let expected = if broker_is_tansu() {
        "active members"
    } else {
        "has 1 active members"
    };
    assert!(
        why.contains(expected) && why.contains("offsets unchanged"),
        "{why}"
    );
    let (b, g, t) = (brokers.clone(), group.clone(), topic.clone());
    let unchanged = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, 0))
        .await
        .unwrap();
    assert_eq!(unchanged, before);

    // Once the consumer is gone, the reset moves the offsets to the first record at or
    // after `from`: six records are unconsumed again.
    stop_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || live.join().unwrap())
        .await
        .unwrap();
    let (b, g) = (brokers.clone(), group.clone());
    let describes = tokio::task::spawn_blocking(move || {
        agentbus::lag::groups::describe(
            &KafkaArgs {
                brokers: b,
                topic_prefix: String::new(),
                broker_quirks: broker_quirks(),
                ..KafkaArgs::default()
            },
            Some(&g),
            Duration::from_secs(5),
        )
        .is_ok()
    })
    .await
    .unwrap();
    // Kafka describes groups: the reset needs no --assume-inactive. Only tansu 0.6 cannot,
    // and there the operator vouches.
    assert!(
        describes || broker_is_tansu(),
        "the broker did not describe the group"
    );
    let flags: &[&str] = if broker_is_tansu() {
        &["--execute", "--assume-inactive"]
    } else {
        &["--execute"]
    };
    let done = succeeded(&reset(flags));
    assert!(done.contains("moved the committed offsets"), "{done}");
    let (b, g, t) = (brokers.clone(), group.clone(), topic.clone());
    let after = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, 0))
        .await
        .unwrap();
    assert_eq!(
        before.iter().sum::<i64>() - after.iter().sum::<i64>(),
        6,
        "{before:?} → {after:?}"
    );
    app.stop().await;
}

/// `agentbus serve` in a process of its own whose Kafka clients take answers of at most 3 MB:
/// a record larger than that cannot be read by it (librdkafka drops the answer as too large
/// and asks again), as a record the service cannot read.
struct SmallFetchServe {
    child: std::process::Child,
    url: String,
    _data: tempfile::TempDir,
}

impl Drop for SmallFetchServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn small_fetch_serve(app: &TestApp, group: &str) -> SmallFetchServe {
    let data = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(agentbus_bin())
        .args([
            "serve",
            "--replay-stall-timeout",
            "3s",
            "--lag-read-timeout",
            "2s",
            "--lag-interval",
            "0s",
            "--lag-groups",
            group,
        ])
        .env("AGENTBUS_BROKERS", &app.brokers)
        .env("AGENTBUS_TOPIC_PREFIX", &app.prefix)
        .env("AGENTBUS_HTTP_ADDR", &addr)
        .env("AGENTBUS_DATA_DIR", data.path())
        .env("AGENTBUS_SCHEMAS_DIR", root().join("schemas"))
        .env("AGENTBUS_CONSUMERS_DIR", data.path().join("no-agents"))
        .env("AGENTBUS_TOPIC_PARTITIONS", "2")
        .env("AGENTBUS_LOG", "warn")
        .env("AGENTBUS_KAFKA_MESSAGE_MAX_BYTES", "1000000")
        .env("AGENTBUS_KAFKA_FETCH_MAX_BYTES", "1000000")
        .env("AGENTBUS_KAFKA_MAX_PARTITION_FETCH_BYTES", "1000000")
        .env("AGENTBUS_KAFKA_RECEIVE_MESSAGE_MAX_BYTES", "3000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let served = SmallFetchServe {
        child,
        url: format!("http://{addr}"),
        _data: data,
    };
    wait_until_ready(&app.client, &served.url, "agentbus serve").await;
    served
}

/// Writes to partition 0 of `topic` a small record, a 5 MB one and a small one, with these
/// timestamps, one batch each (so that the large one alone cannot be read by a client that
/// fetches less).
async fn small_big_small(brokers: &str, topic: &str, timestamps: [i64; 3]) {
    let (brokers, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("message.max.bytes", "8000000")
            .create()
            .unwrap();
        let big = "x".repeat(5_000_000);
        let deadline = Instant::now() + Duration::from_secs(30);
        for (payload, ts) in ["small", big.as_str(), "small"].into_iter().zip(timestamps) {
            // The topic's metadata may reach the producer a moment after its creation.
            loop {
                match producer.send(
                    BaseRecord::<str, str>::to(&t)
                        .payload(payload)
                        .timestamp(ts),
                ) {
                    Ok(()) => break,
                    Err((e, _)) => {
                        assert!(Instant::now() < deadline, "{e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
            producer.flush(Duration::from_secs(30)).unwrap();
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_record_the_service_cannot_read_gives_a_lag_lower_bound_and_fails_a_replay_naming_it() {
    let app = spawn(Options::default()).await;
    let topic = format!("{}unreadable", app.prefix);
    let copy = format!("{}unreadable-copy", app.prefix);
    // The source topic takes records up to 8 MB; offsets 0 and 2 are small, 1 is 5 MB, more
    // than the service may fetch (it fetches at most 3 MB: far more than the shared
    // cluster's metadata, far less than the record).
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .unwrap();
    let created = admin
        .create_topics(
            &[
                NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
                    .set("max.message.bytes", "8388608"),
                NewTopic::new(&copy, 1, TopicReplication::Fixed(1)),
            ],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap();
    for c in created {
        c.unwrap();
    }
    let now = Utc::now().timestamp_millis();
    let later_at = now - 7_209_000;
    small_big_small(
        &app.brokers,
        &topic,
        [now - 7_300_000, now - 7_250_000, later_at],
    )
    .await;
    let group = format!("stuck-{}", uuid::Uuid::new_v4().simple());
    let (b, g, t) = (app.brokers.clone(), group.clone(), topic.clone());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &b)
            .set("group.id", &g)
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Offset(1)).unwrap();
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();
    let served = small_fetch_serve(&app, &group).await;

    // The lag: 2 records, and at least the age of the later record (two hours), never 0;
    // answered within the read deadline.
    let asked = Instant::now();
    let lag: Value = app
        .client
        .get(format!("{}/v1/consumers/{group}/lag", served.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // The read deadline is 2 s here; the bound leaves room for a busy machine and stays
    // below the 10 s the reader used to wait.
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );
    let p = &lag["partitions"][0];
    assert_eq!(
        (p["lag"].as_i64(), p["end_offset"].as_i64()),
        (Some(2), Some(3)),
        "{lag}"
    );
    assert_eq!(p["lag_seconds_basis"], "lower_bound", "{lag}");
    assert!(p["lag_seconds"].as_f64().unwrap() >= 7209.0, "{lag}");
    let note = p["lag_seconds_note"].as_str().unwrap();
    assert!(
        note.contains("offset 1") && note.contains("lower bound"),
        "{note}"
    );
    let _: Value = app
        .client
        .get(format!("{}/v1/consumers", served.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let metrics = app
        .client
        .get(format!("{}/metrics", served.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let unknown = format!(
        "agentbus_lag_seconds_unknown{{cluster_name=\"default\",group=\"{group}\",topic=\"{topic}\",partition=\"0\"}} 1\n"
    );
    assert!(metrics.contains(&unknown), "{metrics}");

    // A replay over it: the partition is given up after the stall timeout (3 s), the job
    // fails naming the partition and offset; the record before it was copied.
    let started = app
        .client
        .post(format!("{}/v1/replays", served.url))
        .json(&json!({
            "from": (Utc::now() - chrono::Duration::hours(3)).to_rfc3339(),
            "topic": topic,
            "into_topic": copy,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    let location = started.headers()["location"].to_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = loop {
        let view: Value = app
            .client
            .get(format!("{}{location}", served.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["status"] != "running" {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "the replay stayed running: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["status"], "failed", "{done}");
    let error = done["error"].as_str().unwrap();
    assert!(
        error.contains("stalled") && error.contains(&format!("{topic}/0 at offset 1 of 3")),
        "{error}"
    );
    let stalled = &done["stalled_partitions"][0];
    assert_eq!(
        (
            stalled["at_offset"].as_i64(),
            stalled["end_offset"].as_i64()
        ),
        (Some(1), Some(3)),
        "{done}"
    );
    assert!(
        stalled["reason"]
            .as_str()
            .unwrap()
            .contains("no record read for"),
        "{done}"
    );
    assert_eq!(done["copied"], 1, "{done}");
    drop(served);
    app.stop().await;
}

#[tokio::test]
async fn an_offset_reset_to_a_time_whose_first_record_was_aborted_plans_the_end_at_once() {
    let app = spawn(Options::default()).await;
    let topic = own_topic(&app, "aborted", 1).await;
    // Offset 0: a record two hours old; offset 1: one ten minutes old, in a transaction that
    // was aborted (its marker at 2). Offsets-for-times at 30 minutes ago answers 1.
    let (brokers, t) = (app.brokers.clone(), topic.clone());
    tokio::task::spawn_blocking(move || {
        let now = Utc::now().timestamp_millis();
        let plain: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        plain
            .send(
                BaseRecord::<str, str>::to(&t)
                    .payload("old")
                    .timestamp(now - 7_200_000),
            )
            .unwrap();
        plain.flush(Duration::from_secs(10)).unwrap();
        let tx: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set(
                "transactional.id",
                format!("aborted-{}", uuid::Uuid::new_v4()),
            )
            .create()
            .unwrap();
        let wait = Duration::from_secs(30);
        tx.init_transactions(wait).unwrap();
        tx.begin_transaction().unwrap();
        tx.send(
            BaseRecord::<str, str>::to(&t)
                .payload("aborted")
                .timestamp(now - 600_000),
        )
        .unwrap();
        tx.flush(wait).unwrap();
        tx.abort_transaction(wait).unwrap();
    })
    .await
    .unwrap();
    let request = Request {
        from: Utc::now() - chrono::Duration::minutes(30),
        until: None,
        topics: vec![topic.clone()],
        event_types: vec![],
        target: Target::Agent("resetter".into()),
        replay_id: None,
    };
    let started = Instant::now();
    let k = app.kafka_args();
    let lines = tokio::task::spawn_blocking(move || replay::plan_reset(&k, "resetter", &request))
        .await
        .unwrap()
        .unwrap();
    // Nothing a consumer would get lies past that time: the end, known without waiting for
    // a record that will never come.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].current, lines[0].new), (None, 3), "{lines:?}");
    app.stop().await;
}

/// On Apache Kafka the broker's offsets-for-times answer is exact: an offset reset to a time
/// whose first record the service cannot read (here: larger than its fetch settings) moves
/// the group there, and does not fail asking to "try again" (which could never pass).
#[tokio::test]
async fn an_offset_reset_to_a_time_whose_first_record_cannot_be_read_keeps_kafkas_answer() {
    if broker_is_tansu() {
        // tansu's answer needs the record read (see the quirk): checked by a unit test.
        return;
    }
    let app = spawn(Options::default()).await;
    let topic = format!("{}unreadable-reset", app.prefix);
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .unwrap();
    for c in admin
        .create_topics(
            &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))
                .set("max.message.bytes", "8388608")],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .unwrap()
    {
        c.unwrap();
    }
    // Offset 0: two hours old; 1: 5 MB, an hour old; 2: half an hour old.
    let now = Utc::now().timestamp_millis();
    small_big_small(
        &app.brokers,
        &topic,
        [now - 7_200_000, now - 3_600_000, now - 1_800_000],
    )
    .await;
    let group = format!("reset-unreadable-{}", uuid::Uuid::new_v4().simple());
    let from = (Utc::now() - chrono::Duration::minutes(90)).to_rfc3339();
    // The service's clients take answers of at most 3 MB: the 5 MB record cannot be read.
    let out = Command::new(agentbus_bin())
        .args([
            "replay",
            "--reset-offsets",
            "--to-agent",
            &group,
            "--topic",
            &topic,
            "--from",
            &from,
        ])
        .args(["--brokers", &app.brokers, "--topic-prefix", &app.prefix])
        .env("AGENTBUS_BROKER_QUIRKS", "none")
        .env("AGENTBUS_KAFKA_MESSAGE_MAX_BYTES", "1000000")
        .env("AGENTBUS_KAFKA_FETCH_MAX_BYTES", "1000000")
        .env("AGENTBUS_KAFKA_MAX_PARTITION_FETCH_BYTES", "1000000")
        .env("AGENTBUS_KAFKA_RECEIVE_MESSAGE_MAX_BYTES", "3000000")
        .output()
        .unwrap();
    let plan = succeeded(&out);
    let line = plan
        .lines()
        .find(|l| l.starts_with(topic.as_str()))
        .unwrap_or_else(|| panic!("{plan}"));
    let columns: Vec<&str> = line.split_whitespace().collect();
    // Partition 0, no committed offset, moved to offset 1 (the unreadable record).
    assert_eq!(columns[1..], ["0", "-", "1"], "{plan}");
    app.stop().await;
}

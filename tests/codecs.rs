//! Every codec real producers use: records another producer wrote compressed with gzip,
//! snappy, lz4 and zstd (Confluent wire format, agentbus's CloudEvents headers) are handled by
//! an agent, read for lag seconds and replayed; agentbus's own producer compresses with the
//! codec of `--compression`.
//!
//! The test runs a broker of its own, so that Kafka's `DumpLogSegments` can show from the log
//! files that each batch is stored with the codec it was written with.

mod common;

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use agentbus::schema::{Registry, encode_wire, json_to_avro};
use common::{agents::*, *};
use rdkafka::{
    ClientConfig,
    message::{Header, Message, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};

/// The codecs of the test; tansu 0.6 cannot read snappy batches (its fetch fails with
/// `UnexpectedType("Snappy")` and the partition is stuck), so on tansu snappy is left out.
fn codecs() -> Vec<&'static str> {
    let all = vec!["gzip", "snappy", "lz4", "zstd"];
    if on_tansu() {
        eprintln!("tansu 0.6 serves no snappy batches: gzip, lz4 and zstd only");
        return all.into_iter().filter(|c| *c != "snappy").collect();
    }
    all
}

/// One `agent.task.requested` as a foreign producer writes it: the Confluent wire format and
/// the CloudEvents binary-mode headers of CONTRACT.md §3, at `at` (ms since the epoch).
async fn write_foreign(
    producer: &FutureProducer,
    topic: &str,
    registry: &Registry,
    description: &str,
    at: i64,
) {
    let version = registry
        .event_type("agent.task.requested")
        .unwrap()
        .latest();
    let id = uuid::Uuid::new_v4().to_string();
    let data = json!({"task_id": uuid::Uuid::new_v4(), "agent_id": description,
        "description": description});
    let value = encode_wire(version, &json_to_avro(version, &data, "data").unwrap()).unwrap();
    let time = chrono::DateTime::from_timestamp_millis(at)
        .unwrap()
        .to_rfc3339();
    let mut headers = OwnedHeaders::new();
    for (key, value) in [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_type", "agent.task.requested"),
        ("ce_source", "foreign-producer"),
        ("ce_time", time.as_str()),
        ("content-type", "application/avro"),
        ("ce_eventversion", "1"),
        ("ce_idempotencykey", id.as_str()),
    ] {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    producer
        .send(
            FutureRecord::to(topic)
                .key(description)
                .payload(&value)
                .timestamp(at)
                .headers(headers),
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("writing {description}: {e}"));
}

/// A producer that is not agentbus's, compressing with `codec`.
fn producer(brokers: &str, codec: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", codec)
        // One batch per send: each record is a batch of its own codec in the log.
        .set("linger.ms", "0")
        .create()
        .unwrap_or_else(|e| panic!("a {codec} producer: {e}"))
}

/// The codecs of the record batches of `topic`'s log files, as Kafka's own
/// `DumpLogSegments` reads them.
fn stored_codecs(broker: &OwnBroker, topic: &str) -> BTreeSet<String> {
    let logs = broker.dir.path().join("kafka/logs");
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&logs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with(&format!("{topic}-")) {
            for f in std::fs::read_dir(&path).unwrap() {
                let f = f.unwrap().path();
                if f.extension().is_some_and(|e| e == "log") {
                    files.push(f.display().to_string());
                }
            }
        }
    }
    assert!(!files.is_empty(), "no log files of {topic} in {logs:?}");
    let out = std::process::Command::new(root().join("ops/broker.sh"))
        .args([
            "tool",
            "kafka.tools.DumpLogSegments",
            "--files",
            &files.join(","),
        ])
        .output()
        .unwrap();
    let text = succeeded(&out);
    text.split_whitespace()
        .skip_while(|w| *w != "compresscodec:")
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "compresscodec:")
        .map(|w| w[1].to_ascii_lowercase())
        .collect()
}

fn on_tansu() -> bool {
    std::env::var("AGENTBUS_LOCAL_BROKER").is_ok_and(|b| b == "tansu")
}

async fn lag(app: &TestApp, group: &str) -> Value {
    app.get_json(&format!("/v1/consumers/{group}/lag")).await
}

async fn wait_lag(app: &TestApp, group: &str, want: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = lag(app, group).await;
        if view["sum_lag"].as_i64() == Some(want) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "the lag of {group} never became {want}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn agent_app_options(broker: &str, prefix: &str, consumers: &Path) -> Options {
    Options {
        brokers: Some(broker.to_string()),
        prefix: prefix.to_string(),
        consumers_dir: Some(consumers.to_path_buf()),
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn records_compressed_with_every_codec_are_handled_lagged_and_replayed() {
    let Some(broker) = OwnBroker::start().await else {
        return;
    };
    let registry = Registry::load(&root().join("schemas")).unwrap();
    let (receiver, url) = Receiver::start().await;
    let consumers = tempfile::tempdir().unwrap();
    let agent = format!("codecs-{}", uuid::Uuid::new_v4().simple());
    agent_file(consumers.path(), &agent, &url, "");
    // The service without the agent: it makes the topics, answers lag and runs replays.
    let app = spawn(Options {
        brokers: Some(broker.addr.clone()),
        ..Options::default()
    })
    .await;
    let topic = app.topic("agent");
    let now = chrono::Utc::now().timestamp_millis();
    let codecs = codecs();
    let producers: Vec<(&str, FutureProducer)> = codecs
        .iter()
        .map(|c| (*c, producer(&broker.addr, c)))
        .collect();

    // Handled: the agent decompresses, decodes and delivers each.
    for (i, (codec, p)) in producers.iter().enumerate() {
        write_foreign(
            p,
            &topic,
            &registry,
            &format!("first-{codec}"),
            now - 1000 + i as i64,
        )
        .await;
    }
    let agent_app = spawn(agent_app_options(
        &broker.addr,
        &app.prefix,
        consumers.path(),
    ))
    .await;
    let got = receiver
        .wait_for(codecs.len(), Duration::from_secs(60))
        .await;
    let handled: BTreeSet<String> = receiver.descriptions().into_iter().collect();
    let expected: BTreeSet<String> = codecs.iter().map(|c| format!("first-{c}")).collect();
    assert_eq!(handled, expected, "{got:?}");
    assert!(
        got.iter().all(|r| r.event["source"] == "foreign-producer"),
        "{got:?}"
    );
    wait_lag(&app, &agent, 0).await;
    agent_app.stop().await;

    // Read for lag seconds: the agent is stopped, and its oldest unconsumed record (written
    // 5 minutes ago, compressed) gives the age.
    let five_minutes_ago = now - 300_000;
    for (i, (codec, p)) in producers.iter().enumerate() {
        write_foreign(
            p,
            &topic,
            &registry,
            &format!("later-{codec}"),
            five_minutes_ago + i as i64,
        )
        .await;
    }
    let view = wait_lag(&app, &agent, codecs.len() as i64).await;
    let seconds = view["max_lag_seconds"].as_f64().unwrap();
    assert!(
        (299.0..400.0).contains(&seconds),
        "lag seconds {seconds}, expected the age of a record written 5 minutes ago: {view}"
    );

    // Replayed: every record read (decompressed) from the topic and copied.
    let started = app
        .client
        .post(format!("{}/v1/replays", app.url))
        .json(&json!({
            "from": chrono::DateTime::from_timestamp_millis(now - 3_600_000).unwrap().to_rfc3339(),
            "topic": topic,
            "to_agent": agent,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202, "{}", started.text().await.unwrap());
    let job: Value = started.json().await.unwrap();
    let location = format!("/v1/replays/{}", job["id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let done = loop {
        let view: Value = app.get_json(&location).await;
        if view["status"] != "running" {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "the replay did not finish: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["copied"], 2 * codecs.len(), "{done}");
    let replay_topic = format!("{}{agent}.replay", app.prefix);
    let copies = {
        let (b, t, n) = (broker.addr.clone(), replay_topic.clone(), 2 * codecs.len());
        tokio::task::spawn_blocking(move || read_records(&b, &t, n))
            .await
            .unwrap()
    };
    let mut replayed: Vec<String> = copies
        .iter()
        .map(|m| {
            let (id, body) = agentbus::schema::split_wire(m.payload().unwrap()).unwrap();
            let version = registry.by_id(id).unwrap();
            let data = agentbus::schema::decode_avro(&version.schema, body).unwrap();
            format!("{data:?}")
        })
        .collect();
    replayed.sort();
    for codec in &codecs {
        for when in ["first", "later"] {
            assert!(
                replayed
                    .iter()
                    .any(|d| d.contains(&format!("{when}-{codec}"))),
                "{when}-{codec} not replayed: {replayed:?}"
            );
        }
    }

    // The log files hold each codec, as written.
    if !on_tansu() {
        let stored = stored_codecs(&broker, &topic);
        for codec in &codecs {
            assert!(
                stored.contains(*codec),
                "no {codec} batch in {topic}: {stored:?}"
            );
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agentbus_compresses_what_it_publishes_with_the_configured_codec() {
    if on_tansu() {
        eprintln!("skipped: the codec check reads Kafka's log files");
        return;
    }
    let Some(broker) = OwnBroker::start().await else {
        return;
    };
    for codec in ["zstd", "gzip"] {
        let app = spawn(Options {
            brokers: Some(broker.addr.clone()),
            extra: vec!["--compression".into(), codec.into()],
            ..Options::default()
        })
        .await;
        assert_eq!(app.post(&task("c1", codec)).await.status(), 200);
        let stored = stored_codecs(&broker, &app.topic("agent"));
        assert_eq!(
            stored,
            BTreeSet::from([codec.to_string()]),
            "agentbus published with {codec}"
        );
        app.stop().await;
    }
}

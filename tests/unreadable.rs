//! A record the consumer cannot read (issue 10, item 10): a compressed batch whose bytes
//! were damaged on the broker's disk. librdkafka reports a consumer error for it and fetches
//! the same offset again, forever; the agent must skip past it, count it and go on.

mod common;

use std::{
    io::{Seek, SeekFrom, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use common::{agents::*, *};
use rdkafka::{
    ClientConfig,
    consumer::BaseConsumer,
    error::KafkaError,
    producer::{FutureProducer, FutureRecord},
    types::RDKafkaErrorCode,
};

/// The directory of `topic`-`partition` on the broker's disk, when the broker is on this
/// machine (Kafka's `kafka-log-dirs` tool says where).
fn partition_dir(brokers: &str, topic: &str, partition: i32) -> Option<PathBuf> {
    let out = std::process::Command::new(root().join("ops/broker.sh"))
        .args([
            "tool",
            "org.apache.kafka.tools.LogDirsCommand",
            "--bootstrap-server",
            brokers,
            "--describe",
            "--topic-list",
            topic,
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text.lines().find(|l| l.starts_with('{'))?;
    let answer: serde_json::Value = serde_json::from_str(json).ok()?;
    let wanted = format!("{topic}-{partition}");
    for broker in answer["brokers"].as_array()? {
        for dir in broker["logDirs"].as_array()? {
            let holds = dir["partitions"]
                .as_array()?
                .iter()
                .any(|p| p["partition"] == wanted.as_str());
            let path = PathBuf::from(dir["logDir"].as_str()?).join(&wanted);
            if holds && path.is_dir() {
                return Some(path);
            }
        }
    }
    None
}

/// Why this test cannot damage the broker's files, when that is expected: tansu keeps no
/// Kafka segment files, and a remote broker's disk is not here. `None`: it must be able to.
fn cannot_reach_segments(brokers: &str) -> Option<String> {
    if std::env::var("AGENTBUS_LOCAL_BROKER").is_ok_and(|b| b == "tansu") {
        return Some("the broker is tansu, which keeps no Kafka segment files".into());
    }
    let local = brokers.split(',').all(|b| {
        let host = b.trim().rsplit_once(':').map_or(b.trim(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        matches!(host, "127.0.0.1" | "localhost" | "::1")
    });
    (!local).then(|| format!("AGENTBUS_BROKERS={brokers} is not on this machine"))
}

/// The partition's directory; fails the test when a local Apache Kafka's cannot be found.
async fn local_partition_dir(brokers: &str, topic: &str, partition: i32) -> Option<PathBuf> {
    if let Some(why) = cannot_reach_segments(brokers) {
        println!("SKIPPED: {why}; the damaged-batch test needs the broker's log directory");
        return None;
    }
    let (b, t) = (brokers.to_string(), topic.to_string());
    let dir = tokio::task::spawn_blocking(move || partition_dir(&b, &t, partition))
        .await
        .unwrap();
    assert!(
        dir.is_some(),
        "the log directory of {topic}-{partition} is not found on this machine, although the broker {brokers} is local"
    );
    dir
}

/// Damages the compressed payload of every compressed batch in the segment: the first
/// bytes of the codec's frame (gzip's magic number) become zeros, as a bad disk would.
/// Returns how many batches it damaged.
fn damage_compressed_batches(dir: &std::path::Path) -> usize {
    let segment = dir.join("00000000000000000000.log");
    let bytes = std::fs::read(&segment).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    let (mut pos, mut damaged) = (0usize, 0);
    // A v2 record batch: baseOffset i64, length i32 (of what follows), leader epoch i32,
    // magic i8, crc u32, attributes i16 (low 3 bits: codec), ... 61 bytes of header.
    while pos + 12 <= bytes.len() {
        let length = i32::from_be_bytes(bytes[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let attributes = i16::from_be_bytes(bytes[pos + 21..pos + 23].try_into().unwrap());
        if attributes & 7 != 0 {
            file.seek(SeekFrom::Start((pos + 61) as u64)).unwrap();
            file.write_all(&[0, 0, 0, 0]).unwrap();
            damaged += 1;
        }
        pos += 12 + length;
    }
    file.sync_all().unwrap();
    damaged
}

/// What a plain librdkafka consumer gets from `partition` in `wait`: records, and the
/// unreadable-record errors.
fn plain_read(brokers: &str, topic: &str, partition: i32, wait: Duration) -> (usize, usize) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("plain-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)
        .unwrap();
    rdkafka::consumer::Consumer::assign(&consumer, &tpl).unwrap();
    let (mut records, mut errors) = (0, 0);
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => records += 1,
            Some(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::BadCompression))) => {
                errors += 1
            }
            _ => {}
        }
    }
    (records, errors)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_the_consumer_cannot_decompress_is_skipped_counted_and_the_partition_goes_on() {
    let prefix = unique_prefix();
    let brokers = brokers();
    let topic = format!("{prefix}agent.events");
    create_topic(&brokers, &topic, 2).await;
    // Five records in one gzip batch at the head of each partition.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("compression.type", "gzip")
        .set("linger.ms", "200")
        .create()
        .unwrap();
    for partition in 0..2 {
        // Enqueued together (send_result does not wait), so that they share one batch.
        let values: Vec<String> = (0..5)
            .map(|i| format!("record {i} of a batch that will be damaged"))
            .collect();
        let deliveries: Vec<_> = values
            .iter()
            .map(|value| {
                let record = FutureRecord::to(&topic)
                    .partition(partition)
                    .key("bad")
                    .payload(value);
                producer.send_result(record).map_err(|(e, _)| e).unwrap()
            })
            .collect();
        for delivery in deliveries {
            delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
    let mut damaged = 0;
    for partition in 0..2 {
        let Some(dir) = local_partition_dir(&brokers, &topic, partition).await else {
            return;
        };
        damaged += damage_compressed_batches(&dir);
    }
    assert_eq!(damaged, 2, "one compressed batch per partition");
    // librdkafka itself cannot get past it: errors, and no record, from that partition.
    let (b, t) = (brokers.clone(), topic.clone());
    let (read, errors) =
        tokio::task::spawn_blocking(move || plain_read(&b, &t, 0, Duration::from_secs(4)))
            .await
            .unwrap();
    assert_eq!(read, 0);
    assert!(
        errors > 0,
        "no BadCompression error: the damage did not take"
    );

    let (receiver, url) = Receiver::start().await;
    let name = format!("unwedged-{}", uuid::Uuid::new_v4().simple());
    let (app, _consumers) = app_with_agent_on(&url, &name, prefix).await;
    // Behind the damaged batch, whichever partition it lands in.
    for key in ["a", "b", "c", "d"] {
        assert_eq!(
            app.post(&task(key, &format!("after-{key}"))).await.status(),
            200
        );
    }
    receiver.wait_for(4, Duration::from_secs(90)).await;
    let mut got = receiver.descriptions();
    got.sort();
    assert_eq!(got, ["after-a", "after-b", "after-c", "after-d"]);

    // Each skipped record is counted, with the topic and the reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = app.get("/metrics").await.text().await.unwrap();
        let skipped: f64 = metrics
            .lines()
            .filter(|l| {
                l.starts_with("agentbus_records_skipped_total{")
                    && l.contains(&name)
                    && l.contains(&topic)
                    && l.contains("BadCompression")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if skipped == 10.0 {
            break;
        }
        assert!(
            Instant::now() < deadline && skipped < 10.0,
            "{skipped} records counted as skipped, 10 expected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Produces `count` records to `topic`/`partition` in one gzip batch (enqueued together).
async fn gzip_batch(brokers: &str, topic: &str, partition: i32, count: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", "gzip")
        .set("linger.ms", "200")
        .create()
        .unwrap();
    let values: Vec<String> = (0..count).map(|i| format!("bad record {i}")).collect();
    let deliveries: Vec<_> = values
        .iter()
        .map(|value| {
            let record = FutureRecord::to(topic)
                .partition(partition)
                .key("bad")
                .payload(value);
            producer.send_result(record).map_err(|(e, _)| e).unwrap()
        })
        .collect();
    for delivery in deliveries {
        delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
}

/// `[bad batch][good records][bad batch][good records]` in one partition: every good
/// record is handled. Finding the end of the first bad stretch by halving landed in the
/// second bad batch and skipped the good records between, unhandled and committed.
#[tokio::test(flavor = "multi_thread")]
async fn good_records_between_two_bad_batches_are_all_handled() {
    let prefix = unique_prefix();
    let brokers = brokers();
    let topic = format!("{prefix}agent.events");
    create_topic(&brokers, &topic, 1).await;
    // Written by an agentbus with no agent, uncompressed (agentbus compresses with lz4 by
    // default): the damage leaves them alone.
    let writer = spawn(Options {
        prefix: prefix.clone(),
        extra: vec!["--compression".into(), "none".into()],
        ..Options::default()
    })
    .await;
    let post = |key: &'static str, n: usize| {
        let writer = &writer;
        async move {
            for i in 0..n {
                let status = writer
                    .post(&task(key, &format!("{key}-{i}")))
                    .await
                    .status();
                assert_eq!(status, 200);
            }
        }
    };
    // Offsets: bad 0..=2, good 3..=5, bad 6..=25, good 26..=27. Halving over 1..28 probed
    // 14, 21 and 25 (all bad) and ended at 26, skipping 3..=5.
    gzip_batch(&brokers, &topic, 0, 3).await;
    post("first", 3).await;
    gzip_batch(&brokers, &topic, 0, 20).await;
    post("second", 2).await;
    writer.stop().await;
    let Some(dir) = local_partition_dir(&brokers, &topic, 0).await else {
        return;
    };
    assert_eq!(damage_compressed_batches(&dir), 2, "two compressed batches");

    let (receiver, url) = Receiver::start().await;
    let name = format!("between-{}", uuid::Uuid::new_v4().simple());
    let (app, _consumers) = app_with_agent_on(&url, &name, prefix).await;
    receiver.wait_for(5, Duration::from_secs(120)).await;
    let mut got = receiver.descriptions();
    got.sort();
    let mut expected: Vec<String> = (0..3)
        .map(|i| format!("first-{i}"))
        .chain((0..2).map(|i| format!("second-{i}")))
        .collect();
    expected.sort();
    assert_eq!(got, expected);
    // Exactly the 23 bad records were skipped.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = app.get("/metrics").await.text().await.unwrap();
        let skipped: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("agentbus_records_skipped_total{") && l.contains(&name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        if skipped == 23.0 {
            break;
        }
        assert!(
            Instant::now() < deadline && skipped < 23.0,
            "{skipped} records counted as skipped, 23 expected"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Writes dead letters `ids` to `topic`/`partition`, uncompressed (the damage leaves them
/// alone), each with its event id header.
async fn plain_dead_letters(brokers: &str, topic: &str, partition: i32, ids: &[&str]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", "none")
        .create()
        .unwrap();
    for id in ids {
        let headers = rdkafka::message::OwnedHeaders::new()
            .insert(rdkafka::message::Header {
                key: "ce_id",
                value: Some(*id),
            })
            .insert(rdkafka::message::Header {
                key: "agentbus-error-kind",
                value: Some("handler"),
            });
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key("good")
            .payload("{}")
            .headers(headers);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
}

/// `[good 0..=2][damaged gzip batch 3..=7][good 8..=9]` in an agent's dead-letter topic:
/// every page answers (a `503 broker_unavailable` forever before), every good dead letter is
/// listed once, the damaged range is reported with a cursor past it, and a redrive sends the
/// good ones and counts the skipped.
#[tokio::test(flavor = "multi_thread")]
async fn a_damaged_batch_in_a_dead_letter_topic_is_skipped_reported_and_paged_past() {
    let prefix = unique_prefix();
    let brokers = brokers();
    let name = format!("dlqdamage-{}", uuid::Uuid::new_v4().simple());
    let dlq = format!("{prefix}{name}.dlq");
    create_topic(&brokers, &dlq, 1).await;
    plain_dead_letters(&brokers, &dlq, 0, &["good-0", "good-1", "good-2"]).await;
    gzip_batch(&brokers, &dlq, 0, 5).await;
    plain_dead_letters(&brokers, &dlq, 0, &["good-8", "good-9"]).await;
    let Some(dir) = local_partition_dir(&brokers, &dlq, 0).await else {
        return;
    };
    assert_eq!(damage_compressed_batches(&dir), 1, "one compressed batch");

    let (_receiver, url) = Receiver::start().await;
    let (app, _consumers) = app_with_agent_on(&url, &name, prefix).await;
    // Two at a time: one page ends in front of the damage, the next reads past it.
    let (mut ids, mut offsets, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    let mut path = format!("/v1/dlq/{name}?limit=2");
    for _ in 0..10 {
        let response = app.get(&path).await;
        let status = response.status();
        let page: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 200, "{page}");
        for d in page["dead_letters"].as_array().unwrap() {
            ids.push(d["event_id"].as_str().unwrap().to_string());
            offsets.push(d["dlq_offset"].as_i64().unwrap());
        }
        skipped.extend(page["skipped"].as_array().into_iter().flatten().cloned());
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/dlq/{name}?limit=2&after={next}"),
            None => break,
        }
    }
    assert_eq!(ids, ["good-0", "good-1", "good-2", "good-8", "good-9"]);
    assert_eq!(offsets, [0, 1, 2, 8, 9]);
    assert_eq!(
        skipped,
        [
            serde_json::json!({"partition": 0, "from_offset": 3, "to_offset": 7, "reason": "BadCompression"})
        ]
    );

    let response = app
        .client
        .post(format!("{}/v1/dlq/{name}/redrive", app.url))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let summary: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["redriven"], 5, "{summary}");
    assert_eq!(summary["skipped"], 5, "{summary}");
    assert_eq!(summary["skipped_ranges"][0]["from_offset"], 3, "{summary}");
    assert_eq!(summary["skipped_ranges"][0]["to_offset"], 7, "{summary}");
    app.stop().await;
}

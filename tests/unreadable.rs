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
        let (b, t) = (brokers.clone(), topic.clone());
        let Some(dir) = tokio::task::spawn_blocking(move || partition_dir(&b, &t, partition))
            .await
            .unwrap()
        else {
            eprintln!("skipped: the broker's log directory is not on this machine");
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
    let consumers = tempfile::tempdir().unwrap();
    agent_file(consumers.path(), &name, &url, "");
    let app = spawn(Options {
        prefix,
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;
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

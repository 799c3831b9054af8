//! Kafka's own tools as the reference: `kafka-consumer-groups` (ConsumerGroupCommand) shows
//! the same committed offsets, lag, state and members as `agentbus lag`, `/v1/consumers` and
//! the `kafka_consumergroup_group_lag` series; its `--reset-offsets --to-datetime --dry-run`
//! plans the same offsets as `agentbus replay --reset-offsets`; `kafka-console-consumer`
//! reads back a record agentbus wrote, CloudEvents headers and all.
//!
//! The tools run from the jars `ops/broker.sh` installs (`ops/broker.sh tool CLASS ARGS`),
//! against the test broker. They need Java: without it these tests say so and check
//! nothing (tansu machines); with it they run. Each JVM takes 1-2 s to start, so every tool
//! runs as few times as the comparison needs.

mod common;

use std::{
    collections::BTreeMap,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat, Utc};
use common::{agents::task, *};
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::Value;

const GROUP_COMMAND: &str = "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand";
const CONSOLE_CONSUMER: &str = "org.apache.kafka.tools.consumer.ConsoleConsumer";

/// Whether Java runs here; says why the test checks nothing when it does not.
fn java_runs() -> bool {
    let runs = Command::new("java")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        eprintln!(
            "SKIPPED: no Java on this machine, so Kafka's own tools cannot run \
             (install a JRE, e.g. Debian's openjdk-17-jre-headless, to compare with them)"
        );
    }
    runs
}

/// Runs one of Kafka's tools through `ops/broker.sh tool` and returns its standard output;
/// fails the test with both outputs when it fails.
fn kafka_tool(class: &str, args: &[&str]) -> String {
    let out = Command::new(root().join("ops/broker.sh"))
        .arg("tool")
        .arg(class)
        .args(args)
        .output()
        .expect("running ops/broker.sh tool");
    succeeded(&out)
}

async fn kafka_tool_async(class: &'static str, args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        kafka_tool(class, &args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap()
}

fn agentbus(args: &[&str]) -> std::process::Output {
    Command::new(agentbus_bin()).args(args).output().unwrap()
}

/// The rows of a tool's table that are about `topic`: whitespace-separated cells.
fn rows_about<'a>(table: &'a str, topic: &str) -> Vec<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.get(1) == Some(&topic))
        .collect()
}

/// A topic of two partitions: partition 0 holds records written 50, 40, 30, 20 and 10
/// minutes ago, partition 1 three written 180, 120 and 60 minutes ago.
async fn history(app: &TestApp) -> String {
    let topic = own_topic(app, "reference", 2).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .unwrap();
    let now = Utc::now().timestamp_millis();
    for (partition, minutes) in [(0, vec![50, 40, 30, 20, 10]), (1, vec![180, 120, 60])] {
        for m in minutes {
            producer
                .send(
                    FutureRecord::<str, str>::to(&topic)
                        .partition(partition)
                        .key("k")
                        .payload("v")
                        .timestamp(now - m * 60_000),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    topic
}

/// A live member of `group` on `topic`: joins, commits `offsets` per partition as a
/// consumer that read that far, says so on `ready`, and stays in the group until `stop`.
fn live_member(
    brokers: String,
    group: String,
    topic: String,
    offsets: [i64; 2],
    ready: mpsc::Sender<()>,
    stop: mpsc::Receiver<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("client.id", "reference-member")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[&topic]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while consumer.assignment().unwrap().count() < 2 {
            assert!(Instant::now() < deadline, "the member got no assignment");
            let _ = consumer.poll(Duration::from_millis(100));
        }
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets.iter().enumerate() {
            tpl.add_partition_offset(&topic, p as i32, Offset::Offset(*o))
                .unwrap();
        }
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
        ready.send(()).unwrap();
        // Polls (to stay a member) but commits nothing more.
        while stop.try_recv().is_err() {
            let _ = consumer.poll(Duration::from_millis(100));
        }
        consumer.unsubscribe();
    })
}

#[tokio::test]
async fn kafka_consumer_groups_describes_the_offsets_lag_state_and_members_agentbus_shows_and_plans_the_same_reset()
 {
    if !java_runs() {
        return;
    }
    let group = format!("reference-{}", uuid::Uuid::new_v4().simple());
    let app = spawn(Options {
        extra: vec!["--lag-groups".into(), group.clone()],
        ..Options::default()
    })
    .await;
    let topic = history(&app).await;
    let (ready_tx, ready_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = mpsc::channel();
    let member = live_member(
        app.brokers.clone(),
        group.clone(),
        topic.clone(),
        [2, 1],
        ready_tx,
        stop_rx,
    );
    tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(60)).unwrap())
        .await
        .unwrap();
    let bootstrap = app.brokers.clone();

    // Kafka's view: per partition committed offset, log end offset, lag, and the member.
    let described = kafka_tool_async(
        GROUP_COMMAND,
        [
            "--bootstrap-server",
            &bootstrap,
            "--describe",
            "--group",
            &group,
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let mut kafka: BTreeMap<i64, (i64, i64, i64)> = BTreeMap::new();
    for cells in rows_about(&described, &topic) {
        assert_eq!(cells.len(), 9, "{described}");
        assert_eq!(cells[8], "reference-member", "{described}");
        kafka.insert(
            cells[2].parse().unwrap(),
            (
                cells[3].parse().unwrap(),
                cells[4].parse().unwrap(),
                cells[5].parse().unwrap(),
            ),
        );
    }
    assert_eq!(
        kafka,
        BTreeMap::from([(0, (2, 5, 3)), (1, (1, 3, 2))]),
        "{described}"
    );
    let state = kafka_tool_async(
        GROUP_COMMAND,
        [
            "--bootstrap-server",
            &bootstrap,
            "--describe",
            "--state",
            "--group",
            &group,
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let state_row: Vec<&str> = state
        .lines()
        .find(|l| l.starts_with(&group))
        .unwrap_or_else(|| panic!("{state}"))
        .split_whitespace()
        .collect();
    let (kafka_state, kafka_members) = (
        state_row[state_row.len() - 2],
        state_row[state_row.len() - 1],
    );
    assert_eq!((kafka_state, kafka_members), ("Stable", "1"), "{state}");

    // `agentbus lag`: the same offsets and lag, the same state and member.
    let table = succeeded(&agentbus(&[
        "lag",
        "--group",
        &group,
        "--brokers",
        &bootstrap,
    ]));
    let mut ours: BTreeMap<i64, (i64, i64, i64)> = BTreeMap::new();
    for cells in rows_about(&table, &topic) {
        ours.insert(
            cells[2].parse().unwrap(),
            (
                cells[3].parse().unwrap(),
                cells[4].parse().unwrap(),
                cells[5].parse().unwrap(),
            ),
        );
    }
    assert_eq!(ours, kafka, "agentbus lag:\n{table}\nKafka:\n{described}");
    let total = table
        .lines()
        .find(|l| l.starts_with(&group) && l.contains("total lag"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(
        total.contains("total lag 5")
            && total.contains(&format!("{kafka_members} members (reference-member@"))
            && total.ends_with(&format!(", {kafka_state}")),
        "{total}"
    );

    // `/v1/consumers` and the metrics of that collection.
    let all: Value = app.get_json("/v1/consumers").await;
    assert!(all["members_unknown"].is_null(), "{all}");
    let ours = all["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["group"] == group.as_str())
        .unwrap_or_else(|| panic!("{all}"));
    assert_eq!(ours["state"], kafka_state, "{all}");
    let members = ours["members"].as_array().unwrap();
    assert_eq!(members.len().to_string(), kafka_members, "{all}");
    assert_eq!(members[0]["client_id"], "reference-member", "{all}");
    assert_eq!(ours["sum_lag"], 5, "{all}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    for (partition, (_, _, lag)) in &kafka {
        let line = format!(
            "kafka_consumergroup_group_lag{{cluster_name=\"default\",group=\"{group}\",topic=\"{topic}\",partition=\"{partition}\"}} {lag}\n"
        );
        assert!(metrics.contains(&line), "{line} not in {metrics}");
    }

    // An offset reset while the member is there: refused by agentbus itself, as the broker
    // describes the group (no --assume-inactive on Kafka).
    let from: DateTime<Utc> = DateTime::from_timestamp_millis(
        (Utc::now() - chrono::Duration::minutes(25)).timestamp_millis(),
    )
    .unwrap();
    let from_rfc3339 = from.to_rfc3339_opts(SecondsFormat::Millis, true);
    let reset = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            "--reset-offsets",
            "--to-agent",
            &group,
            "--topic",
            &topic,
            "--from",
            &from_rfc3339,
            "--brokers",
            &bootstrap,
        ];
        args.extend_from_slice(extra);
        agentbus(&args)
    };
    let refused = reset(&["--execute"]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("has 1 active members") && why.contains("offsets unchanged"),
        "{why}"
    );
    // --assume-inactive only stands in for a broker that cannot describe the group; it does
    // not override one that says the group is active.
    let vouched = reset(&["--execute", "--assume-inactive"]);
    assert!(!vouched.status.success());
    let why = String::from_utf8_lossy(&vouched.stderr);
    assert!(
        why.contains("active members") || why.contains("UnknownMemberId"),
        "{why}"
    );
    let (b, g, t) = (bootstrap.clone(), group.clone(), topic.clone());
    let unchanged = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, -1))
        .await
        .unwrap();
    assert_eq!(unchanged, vec![2, 1]);

    // The member leaves: the group is empty, and both plan a reset to 25 minutes ago the
    // same way: partition 0 to its first record at or after it (offset 3, 20 minutes old),
    // partition 1, whose records are all older, to its end (3).
    stop_tx.send(()).unwrap();
    tokio::task::spawn_blocking(move || member.join().unwrap())
        .await
        .unwrap();
    let datetime = from.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string();
    let planned = kafka_tool_async(
        GROUP_COMMAND,
        [
            "--bootstrap-server",
            &bootstrap,
            "--reset-offsets",
            "--to-datetime",
            &datetime,
            "--dry-run",
            "--group",
            &group,
            "--topic",
            &topic,
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let kafka_plan: BTreeMap<i64, i64> = rows_about(&planned, &topic)
        .iter()
        .map(|cells| (cells[2].parse().unwrap(), cells[3].parse().unwrap()))
        .collect();
    assert_eq!(kafka_plan, BTreeMap::from([(0, 3), (1, 3)]), "{planned}");
    let plan = succeeded(&reset(&[]));
    let our_plan: BTreeMap<i64, i64> = plan
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.first() == Some(&topic.as_str()))
        .map(|cells| (cells[1].parse().unwrap(), cells[3].parse().unwrap()))
        .collect();
    assert_eq!(our_plan, kafka_plan, "agentbus:\n{plan}\nKafka:\n{planned}");
    assert!(plan.contains("plan only"), "{plan}");
    // And carried out, by itself: the group is empty.
    let done = succeeded(&reset(&["--execute"]));
    assert!(done.contains("moved the committed offsets"), "{done}");
    let (b, g, t) = (bootstrap.clone(), group.clone(), topic.clone());
    let after = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, -1))
        .await
        .unwrap();
    assert_eq!(after, vec![3, 3]);
    app.stop().await;
}

#[tokio::test]
async fn kafka_console_consumer_reads_back_an_event_agentbus_wrote_with_its_cloudevents_headers() {
    if !java_runs() {
        return;
    }
    let app = spawn_app().await;
    let answer = app
        .post(&task("reader", "read by Kafka's console consumer"))
        .await;
    assert_eq!(answer.status(), 200);
    let published: Value = answer.json().await.unwrap();
    let id = published["event_id"]
        .as_str()
        .unwrap_or_else(|| panic!("{published}"))
        .to_string();
    let out = kafka_tool_async(
        CONSOLE_CONSUMER,
        [
            "--bootstrap-server",
            &app.brokers,
            "--topic",
            &app.topic("agent"),
            "--from-beginning",
            "--max-messages",
            "1",
            "--timeout-ms",
            "30000",
            "--property",
            "print.headers=true",
            "--property",
            "print.key=true",
            "--property",
            "headers.separator=|",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let line = out
        .lines()
        .find(|l| l.contains("ce_id:"))
        .unwrap_or_else(|| panic!("no record with headers: {out}"));
    let headers: BTreeMap<&str, &str> = line
        .split('\t')
        .next()
        .unwrap()
        .split('|')
        .filter_map(|h| h.split_once(':'))
        .collect();
    assert_eq!(headers.get("ce_id"), Some(&id.as_str()), "{line}");
    assert_eq!(headers.get("ce_specversion"), Some(&"1.0"), "{line}");
    assert_eq!(
        headers.get("ce_type"),
        Some(&"agent.task.requested"),
        "{line}"
    );
    assert_eq!(headers.get("ce_source"), Some(&"planner"), "{line}");
    assert!(headers.contains_key("ce_time"), "{line}");
    // The key agentbus wrote: the partition key.
    assert_eq!(line.split('\t').nth(1), Some("reader"), "{line}");
    app.stop().await;
}

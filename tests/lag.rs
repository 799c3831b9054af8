//! Consumer lag against the real broker: lag per partition, lag in seconds from the first
//! unconsumed record's own timestamp, a caught-up group at 0, the metrics checked by
//! promtool, and a real Prometheus server seeing the lag alert go pending.

mod common;

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use chrono::Utc;
use common::*;
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer},
};
use serde_json::{Value, json};

/// A topic of two partitions: partition 0 holds five records written 50, 40, 30, 20 and 10
/// minutes ago, partition 1 three written 3, 2 and 1 minutes ago. Returns the topic and the
/// records' timestamps per partition.
async fn history(app: &TestApp) -> (String, [Vec<i64>; 2]) {
    let topic = own_topic(app, "lagged", 2).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .create()
        .unwrap();
    let now = Utc::now().timestamp_millis();
    let stamps = [
        [50, 40, 30, 20, 10].map(|m| now - m * 60_000).to_vec(),
        [3, 2, 1].map(|m| now - m * 60_000).to_vec(),
    ];
    for (partition, list) in stamps.iter().enumerate() {
        for ts in list {
            producer
                .send(
                    FutureRecord::<str, str>::to(&topic)
                        .partition(partition as i32)
                        .key("k")
                        .payload("v")
                        .timestamp(*ts),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
        }
    }
    (topic, stamps)
}

/// Commits `offsets` (per partition) for `group`, as a consumer that read that far would.
async fn commit(brokers: &str, group: &str, topic: &str, offsets: [i64; 2]) {
    let (brokers, group, topic) = (brokers.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for (p, o) in offsets.iter().enumerate() {
            tpl.add_partition_offset(&topic, p as i32, Offset::Offset(*o))
                .unwrap();
        }
        consumer.commit(&tpl, CommitMode::Sync).unwrap();
    })
    .await
    .unwrap();
}

fn group_name(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn lag_per_partition_and_lag_seconds_from_the_first_unconsumed_record() {
    let app = spawn(Options::default()).await;
    let (topic, stamps) = history(&app).await;
    let behind = group_name("behind");
    let caught_up = group_name("caught-up");
    commit(&app.brokers, &behind, &topic, [2, 3]).await;
    commit(&app.brokers, &caught_up, &topic, [5, 3]).await;

    let asked_at = Utc::now().timestamp_millis();
    let lag: Value = app.get_json(&format!("/v1/consumers/{behind}/lag")).await;
    let answered_at = Utc::now().timestamp_millis();
    let partitions = lag["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{lag}");
    let p0 = &partitions[0];
    assert_eq!(
        (
            p0["partition"].as_i64(),
            p0["committed_offset"].as_i64(),
            p0["end_offset"].as_i64(),
            p0["lag"].as_i64()
        ),
        (Some(0), Some(2), Some(5), Some(3)),
        "{lag}"
    );
    // Exactly the age of the record at offset 2 (written 30 minutes ago), not interpolated.
    let seconds = p0["lag_seconds"].as_f64().unwrap();
    let low = (asked_at - stamps[0][2]) as f64 / 1000.0;
    let high = (answered_at - stamps[0][2]) as f64 / 1000.0;
    assert!(
        low - 0.001 <= seconds && seconds <= high + 0.001,
        "{seconds} not in [{low}, {high}]"
    );
    let oldest =
        chrono::DateTime::parse_from_rfc3339(p0["oldest_unconsumed_at"].as_str().unwrap()).unwrap();
    assert_eq!(oldest.timestamp_millis(), stamps[0][2]);
    let p1 = &partitions[1];
    assert_eq!(
        (p1["lag"].as_i64(), p1["lag_seconds"].as_f64()),
        (Some(0), Some(0.0))
    );
    assert_eq!(lag["sum_lag"], 3);
    assert_eq!(lag["max_lag"], 3);

    let done: Value = app
        .get_json(&format!("/v1/consumers/{caught_up}/lag"))
        .await;
    assert_eq!(
        (done["sum_lag"].as_i64(), done["max_lag_seconds"].as_f64()),
        (Some(0), Some(0.0)),
        "{done}"
    );

    // The whole cluster's groups, and the metrics of that collection.
    let all: Value = app.get_json("/v1/consumers").await;
    let listed: Vec<&str> = all["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["group"].as_str().unwrap())
        .collect();
    assert!(
        listed.contains(&behind.as_str()) && listed.contains(&caught_up.as_str()),
        "{all}"
    );
    // Kafka describes groups: a group with committed offsets and nobody in it is Empty, with
    // no members (not "unknown"). tansu 0.6 cannot describe groups.
    if std::env::var("AGENTBUS_LOCAL_BROKER").is_ok_and(|b| b == "tansu") {
        assert!(all["members_unknown"].is_string(), "{all}");
    } else {
        assert!(all["members_unknown"].is_null(), "{all}");
        let entry = all["consumers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["group"] == behind.as_str())
            .unwrap();
        assert_eq!(
            (&entry["state"], &entry["members"]),
            (&json!("Empty"), &json!([])),
            "{all}"
        );
    }
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let line = |name: &str, partition: i32| {
        format!(
            "{name}{{cluster_name=\"default\",group=\"{behind}\",topic=\"{topic}\",partition=\"{partition}\"}}"
        )
    };
    assert!(
        metrics.contains(&format!("{} 3\n", line("kafka_consumergroup_group_lag", 0))),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "{} 2\n",
        line("kafka_consumergroup_group_offset", 0)
    )));
    assert!(metrics.contains(&format!(
        "{} 0\n",
        line("kafka_consumergroup_group_lag_seconds", 1)
    )));
    assert!(metrics.contains(&format!(
        "kafka_consumergroup_group_sum_lag{{cluster_name=\"default\",group=\"{caught_up}\"}} 0\n"
    )));
    assert!(metrics.contains(&format!(
        "kafka_partition_latest_offset{{cluster_name=\"default\",topic=\"{topic}\",partition=\"0\"}} 5\n"
    )));

    // The table.
    let out = Command::new(agentbus_bin())
        .args(["lag", "--group", &behind, "--brokers", &app.brokers])
        .env("AGENTBUS_BROKER_QUIRKS", broker_quirks_setting())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let row = table
        .lines()
        .find(|l| {
            l.starts_with(&behind) && l.contains(&topic) && l.split_whitespace().nth(2) == Some("0")
        })
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[2..6], ["0", "2", "5", "3"], "{row}");
    assert!(table.contains("total lag 3"), "{table}");

    assert_eq!(
        app.get(&format!("/v1/consumers/{}/lag", group_name("nobody")))
            .await
            .status(),
        404
    );
    app.stop().await;
}

fn promtool_on_path() {
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool is not on PATH: install Debian's prometheus package (ops/test.sh does)"
    );
}

#[tokio::test]
async fn a_live_scrape_passes_promtool_check_metrics() {
    promtool_on_path();
    // Only the test's group: the scrape does not grow with the shared broker's groups.
    let group = group_name("scraped");
    let app = spawn(Options {
        extra: vec!["--lag-groups".into(), group.clone()],
        ..Options::default()
    })
    .await;
    let (topic, _) = history(&app).await;
    commit(&app.brokers, &group, &topic, [1, 1]).await;
    let _: Value = app.get_json("/v1/consumers").await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("kafka_consumergroup_group_lag_seconds"),
        "{text}"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    app.stop().await;
}

/// A real Prometheus server on 127.0.0.1, stopped when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Prometheus scraping `target` every second with the project's alert rules, the lag
/// alert's threshold lowered to 60 s and its `for` to 2 s.
fn start_prometheus(target: &str) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let rules = std::fs::read_to_string(root().join("ops/prometheus/alerts.yml")).unwrap();
    let threshold = "kafka_consumergroup_group_max_lag_seconds > 300)\n        for: 5m";
    assert!(rules.contains(threshold), "the lag alert's shape changed");
    let rules = rules.replace(
        threshold,
        "kafka_consumergroup_group_max_lag_seconds > 60)\n        for: 2s",
    );
    std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files: [alerts.yml]\n\
             scrape_configs:\n  - job_name: agentbus\n    static_configs:\n      - targets: [\"{target}\"]\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting prometheus (Debian's prometheus package; ops/test.sh installs it)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        _dir: dir,
    }
}

#[tokio::test]
async fn prometheus_sees_the_lag_alert_of_a_group_falling_behind() {
    promtool_on_path();
    let group = group_name("slow");
    let app = spawn(Options {
        extra: vec![
            "--lag-interval".into(),
            "1s".into(),
            "--lag-groups".into(),
            group.clone(),
        ],
        ..Options::default()
    })
    .await;
    let (topic, _) = history(&app).await;
    // The group read one record of each partition: the oldest unconsumed one is 40 minutes old.
    commit(&app.brokers, &group, &topic, [1, 1]).await;
    let target = app.url.trim_start_matches("http://").to_string();
    let prometheus = start_prometheus(&target);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    let alert = loop {
        let answer = client
            .get(format!("{}/api/v1/alerts", prometheus.url))
            .send()
            .await;
        if let Ok(answer) = answer
            && let Ok(body) = answer.json::<Value>().await
            && let Some(found) = body["data"]["alerts"].as_array().and_then(|alerts| {
                alerts
                    .iter()
                    .find(|a| {
                        a["labels"]["alertname"] == "AgentbusConsumerLagHigh"
                            && a["labels"]["group"] == group.as_str()
                    })
                    .cloned()
            })
        {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the lag alert"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let state = alert["state"].as_str().unwrap();
    assert!(state == "pending" || state == "firing", "{alert}");
    assert!(
        alert["annotations"]["runbook"]
            .as_str()
            .unwrap()
            .contains("agentbus lag")
    );
    let value: f64 = alert["value"].as_str().unwrap().parse().unwrap();
    assert!(
        value > 2300.0,
        "the oldest unconsumed record is 40 minutes old: {alert}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_lag_exporter_alone_serves_the_lag_metrics() {
    let app = spawn(Options::default()).await;
    let (topic, _) = history(&app).await;
    let group = group_name("exported");
    commit(&app.brokers, &group, &topic, [4, 0]).await;
    let port = free_port();
    let mut exporter = Command::new(agentbus_bin())
        .env("AGENTBUS_BROKER_QUIRKS", broker_quirks_setting())
        .args([
            "lag-exporter",
            "--brokers",
            &app.brokers,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--lag-interval",
            "1s",
            "--lag-groups",
            &group,
            "--cluster-name",
            "test-cluster",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let expected = format!(
        "kafka_consumergroup_group_sum_lag{{cluster_name=\"test-cluster\",group=\"{group}\"}} 4\n"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = reqwest::Client::new();
    loop {
        let text = match client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(&expected) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the exporter never exported {expected}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &exporter.id().to_string()])
        .status();
    let status = tokio::task::spawn_blocking(move || exporter.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "SIGTERM ends it cleanly: {status}");
    app.stop().await;
}

fn partition_of(lag: &Value, partition: i64) -> &Value {
    lag["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["partition"] == partition)
        .unwrap_or_else(|| panic!("no partition {partition}: {lag}"))
}

#[tokio::test]
async fn a_partition_stuck_behind_an_open_transaction_is_not_caught_up_and_markers_are_said_so() {
    let group = group_name("stuck");
    let app = spawn(Options {
        extra: vec!["--lag-groups".into(), group.clone()],
        ..Options::default()
    })
    .await;
    let topic = own_topic(&app, "txn", 2).await;
    let brokers = app.brokers.clone();
    let t = topic.clone();
    let stuck_at = Utc::now().timestamp_millis() - 7_209_000;
    // Partition 0: a committed transaction (offset 0, its marker 1), an aborted one (offset 2,
    // marker 3). Partition 1: a transaction left open on a record written two hours ago
    // (offset 0), then a plain record (offset 1) that waits behind it.
    let producer = tokio::task::spawn_blocking(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set(
                "transactional.id",
                format!("lag-test-{}", uuid::Uuid::new_v4()),
            )
            // Longer than the test: the broker must not abort it meanwhile.
            .set("transaction.timeout.ms", "300000")
            .create()
            .unwrap();
        let tx = Duration::from_secs(30);
        producer.init_transactions(tx).unwrap();
        let send = |partition: i32, ts: i64| {
            producer
                .send(
                    BaseRecord::<str, str>::to(&t)
                        .partition(partition)
                        .payload("v")
                        .timestamp(ts),
                )
                .unwrap();
        };
        let now = Utc::now().timestamp_millis();
        producer.begin_transaction().unwrap();
        send(0, now - 60_000);
        producer.commit_transaction(tx).unwrap();
        producer.begin_transaction().unwrap();
        send(0, now - 30_000);
        producer.flush(tx).unwrap();
        producer.abort_transaction(tx).unwrap();
        producer.begin_transaction().unwrap();
        send(1, stuck_at);
        producer.flush(tx).unwrap();
        let plain: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .unwrap();
        plain
            .send(BaseRecord::<str, str>::to(&t).partition(1).payload("v"))
            .unwrap();
        plain.flush(tx).unwrap();
        producer
    })
    .await
    .unwrap();
    // The group read partition 0's committed record and nothing of partition 1.
    commit(&app.brokers, &group, &topic, [2, 0]).await;

    let asked = Instant::now();
    let asked_at = Utc::now().timestamp_millis();
    let lag: Value = app.get_json(&format!("/v1/consumers/{group}/lag")).await;
    let answered_at = Utc::now().timestamp_millis();
    // Within the read deadline (3 s) and what it takes to ask on a busy 2-core machine, not
    // the 10 s the reader used to wait for a record.
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "{:?}",
        asked.elapsed()
    );

    // Partition 1: lag 2 up to the log end (as Kafka's tools count it), and the age of the
    // record the open transaction holds back, not 0.
    let p1 = partition_of(&lag, 1);
    assert_eq!(
        (
            p1["committed_offset"].as_i64(),
            p1["end_offset"].as_i64(),
            p1["lag"].as_i64()
        ),
        (Some(0), Some(2), Some(2)),
        "{lag}"
    );
    assert_eq!(p1["lag_seconds_basis"], "open_transaction", "{lag}");
    let seconds = p1["lag_seconds"].as_f64().unwrap();
    let (low, high) = (
        (asked_at - stuck_at) as f64 / 1000.0,
        (answered_at - stuck_at) as f64 / 1000.0,
    );
    assert!(
        low - 0.001 <= seconds && seconds <= high + 0.001,
        "{seconds} not in [{low}, {high}]"
    );
    assert!(
        p1["lag_seconds_note"]
            .as_str()
            .unwrap()
            .contains("open transaction"),
        "{lag}"
    );
    // Partition 0: two offsets behind, both a marker and an aborted record: nothing to
    // consume, and said so.
    let p0 = partition_of(&lag, 0);
    assert_eq!(
        (p0["lag"].as_i64(), p0["end_offset"].as_i64()),
        (Some(2), Some(4)),
        "{lag}"
    );
    assert_eq!(p0["lag_seconds"].as_f64(), Some(0.0), "{lag}");
    assert_eq!(p0["lag_seconds_basis"], "no_consumable_record", "{lag}");
    assert!(
        lag["max_lag_seconds"].as_f64().unwrap() >= low - 0.001,
        "{lag}"
    );

    // The metrics of a collection of the watched groups.
    let all: Value = app.get_json("/v1/consumers").await;
    assert!(all["consumers"].is_array(), "{all}");
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let labels = |p: i32| {
        format!(
            "{{cluster_name=\"default\",group=\"{group}\",topic=\"{topic}\",partition=\"{p}\"}}"
        )
    };
    let value = |name: &str, p: i32| -> f64 {
        let prefix = format!("{name}{} ", labels(p));
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}: {metrics}"))
            .parse()
            .unwrap()
    };
    assert!(value("kafka_consumergroup_group_lag_seconds", 1) >= low - 0.001);
    assert_eq!(value("kafka_consumergroup_group_lag", 1), 2.0);
    assert_eq!(value("agentbus_lag_seconds_unknown", 1), 0.0);
    assert_eq!(value("agentbus_lag_seconds_unknown", 0), 0.0);

    tokio::task::spawn_blocking(move || producer.abort_transaction(Duration::from_secs(30)))
        .await
        .unwrap()
        .unwrap();
    app.stop().await;
}

/// More groups than the collection asks at once (64): every group gets its own committed
/// offsets and lag back, none another's, in one collection.
#[tokio::test]
async fn a_collection_over_many_groups_gives_each_group_its_own_offsets() {
    const GROUPS: usize = 70;
    let app = spawn(Options::default()).await;
    let topic = own_topic(&app, "many-groups", 2).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let now = Utc::now().timestamp_millis();
    let records = GROUPS as i64 + 10;
    let mut sent = Vec::new();
    for partition in 0..2 {
        for i in 0..records {
            let record = FutureRecord::<str, str>::to(&topic)
                .partition(partition)
                .key("k")
                .payload("v")
                .timestamp(now - (records - i) * 1_000);
            sent.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
    }
    for s in sent {
        s.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    // Group g sits at offset g on partition 0 and 2g/3 on partition 1: every group and
    // partition at an offset of its own.
    let offsets = |g: usize| [g as i64, 2 * g as i64 / 3];
    let run = uuid::Uuid::new_v4().simple().to_string();
    let groups: Vec<String> = (0..GROUPS).map(|g| format!("many-{run}-{g}")).collect();
    let (brokers, t, names) = (app.brokers.clone(), topic.clone(), groups.clone());
    tokio::task::spawn_blocking(move || {
        common::groups::commit_groups(&brokers, &t, &names, offsets)
    })
    .await
    .unwrap();

    let monitor = agentbus::lag::LagMonitor::new(
        app.kafka_args(),
        agentbus::lag::LagSettings {
            groups: groups.clone(),
            ..agentbus::lag::LagSettings::default()
        },
        Vec::new(),
    );
    let snapshot = monitor.collect(None).await.unwrap();
    assert_eq!(snapshot.groups.len(), GROUPS);
    for (g, name) in groups.iter().enumerate() {
        let lag = snapshot
            .groups
            .iter()
            .find(|l| &l.group == name)
            .unwrap_or_else(|| panic!("{name} missing"));
        let got: Vec<(i64, i64)> = lag
            .partitions
            .iter()
            .map(|p| (p.committed_offset, p.lag))
            .collect();
        let want: Vec<(i64, i64)> = offsets(g).iter().map(|o| (*o, records - o)).collect();
        assert_eq!(got, want, "{name}");
        // Each lag in seconds from the record at its own committed offset.
        for (p, partition) in lag.partitions.iter().enumerate() {
            let at = partition.oldest_unconsumed_at.map(|t| t.timestamp_millis());
            assert_eq!(
                at,
                Some(now - (records - offsets(g)[p]) * 1_000),
                "{name}/{p}"
            );
        }
    }
    app.stop().await;
}

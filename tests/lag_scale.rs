//! Lag over many consumer groups, in a process of its own (`agentbus lag-exporter`): each
//! group's lag right, and the process's threads not growing with the groups. Committed offsets
//! are fetched in batches (a few requests on one connection per broker); group by group (the
//! path of TLS and SASL clusters) at most 64 librdkafka clients are kept.

mod common;

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, FutureRecord},
};

/// Records written on each of the topic's two partitions.
const RECORDS: i64 = 100;

/// Group `g` sits at offset `g` on partition 0 and `g / 2` on partition 1.
fn offsets(g: usize) -> [i64; 2] {
    [g as i64, g as i64 / 2]
}

/// A topic of two partitions of [`RECORDS`] records each, and `count` groups committed at
/// [`offsets`]; returns the group names.
async fn groups_with_offsets(app: &TestApp, what: &str, count: usize) -> Vec<String> {
    let topic = own_topic(app, what, 2).await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &app.brokers)
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut sent = Vec::new();
    for partition in 0..2 {
        for _ in 0..RECORDS {
            let record = FutureRecord::<str, str>::to(&topic)
                .partition(partition)
                .key("k")
                .payload("v");
            sent.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
    }
    for s in sent {
        s.await.unwrap().map_err(|(e, _)| e).unwrap();
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let names: Vec<String> = (0..count).map(|g| format!("{what}-{run}-{g}")).collect();
    let (brokers, groups) = (app.brokers.clone(), names.clone());
    tokio::task::spawn_blocking(move || {
        common::groups::commit_groups(&brokers, &topic, &groups, offsets)
    })
    .await
    .unwrap();
    names
}

/// `agentbus lag-exporter` watching `groups`, collecting every second.
fn exporter(app: &TestApp, port: u16, groups: &[String], per_group: bool) -> Child {
    Command::new(agentbus_bin())
        .env("AGENTBUS_BROKER_QUIRKS", broker_quirks_setting())
        .env("AGENTBUS_LAG_PER_GROUP_OFFSETS", per_group.to_string())
        .args([
            "lag-exporter",
            "--brokers",
            &app.brokers,
            "--http-addr",
            &format!("127.0.0.1:{port}"),
            "--lag-interval",
            "1s",
            "--lag-groups",
            &groups.join(","),
            "--cluster-name",
            "scale",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits until `/metrics` on `port` shows every group's summed lag as [`offsets`] make it.
async fn wait_for_every_lag(port: u16, groups: &[String]) {
    let expected: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(g, name)| {
            let lag: i64 = offsets(g).iter().map(|o| RECORDS - o).sum();
            format!(
                "kafka_consumergroup_group_sum_lag{{cluster_name=\"scale\",group=\"{name}\"}} {lag}\n"
            )
        })
        .collect();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = match client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let missing: Vec<&String> = expected.iter().filter(|e| !text.contains(*e)).collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} groups' lag never right, e.g. {}: {text}",
            missing.len(),
            missing[0]
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A field of /proc/<pid>/status (`Threads`, `VmRSS` in kB).
fn status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {text}"))
}

/// Waits until the process holds at most `most` threads (clients torn down after a
/// collection end on threads of their own, a moment later), or fails with the count.
async fn wait_for_threads_at_most(pid: u32, most: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let threads = status(pid, "Threads");
        if threads <= most {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {threads} threads (at most {most} expected), RSS {} kB",
            status(pid, "VmRSS")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn stop(mut exporter: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &exporter.id().to_string()])
        .status();
    let status = exporter.wait().unwrap();
    assert!(status.success(), "SIGTERM ends it cleanly: {status}");
}

#[tokio::test]
async fn forty_groups_are_collected_right_with_far_fewer_threads_than_groups() {
    const GROUPS: usize = 40;
    let app = spawn(Options::default()).await;
    let groups = groups_with_offsets(&app, "scale", GROUPS).await;
    let port = free_port();
    let exporter = exporter(&app, port, &groups, false);
    let pid = exporter.id();
    wait_for_every_lag(port, &groups).await;
    // A librdkafka client per group held about four threads each (160 here); batched
    // requests need none per group.
    wait_for_threads_at_most(pid, 60, "after collecting 40 groups").await;
    // And stay so over the following collections.
    wait_for_every_lag(port, &groups).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    wait_for_threads_at_most(pid, 60, "after more collections").await;
    tokio::task::spawn_blocking(move || stop(exporter))
        .await
        .unwrap();
    app.stop().await;
}

#[tokio::test]
async fn group_by_group_at_most_64_clients_are_kept_and_every_lag_is_right() {
    const GROUPS: usize = 80;
    let app = spawn(Options::default()).await;
    let groups = groups_with_offsets(&app, "scale-pergroup", GROUPS).await;
    let port = free_port();
    let exporter = exporter(&app, port, &groups, true);
    let pid = exporter.id();
    wait_for_every_lag(port, &groups).await;
    // 64 clients kept (about four threads each), the other 16 torn down after each
    // collection: 80 kept clients would hold about 320 threads.
    wait_for_threads_at_most(pid, 64 * 4 + 30, "group by group, 80 groups").await;
    tokio::task::spawn_blocking(move || stop(exporter))
        .await
        .unwrap();
    app.stop().await;
}

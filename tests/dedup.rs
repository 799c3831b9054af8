//! Dedup state that follows its partition (issue 12, items 2 and 3): an agent's dedup
//! records, kept per partition in its `<agent>.dedup` changelog, go with a partition to the
//! process that takes it over, and the idempotency key keeps two publish instances from
//! making one event be handled twice.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{
    Options,
    agents::{Receiver, agent_file, create_topic, wait_for_stable_group},
    brokers, committed_offsets,
    dedup::{AgentProcess, Spawn, wait_for_records, wait_handled},
    read_records, spawn, unique_prefix,
};
use rdkafka::Message;
use serde_json::{Value, json};

/// A task event keyed `key` whose description (unique per test) names it.
fn task(key: &str, description: &str) -> Value {
    common::agents::task(key, description)
}

/// The service (for publishing) on a prefix whose events topic has 3 partitions, and an
/// agent name.
async fn three_partitions(tag: &str) -> (common::TestApp, String) {
    let prefix = unique_prefix();
    create_topic(&brokers(), &format!("{prefix}agent.events"), 3).await;
    let app = spawn(Options {
        prefix,
        ..Options::default()
    })
    .await;
    (app, format!("zz-{tag}-{}", uuid::Uuid::new_v4().simple()))
}

async fn publish(app: &common::TestApp, round: &str, n: usize) -> Vec<String> {
    let names: Vec<String> = (0..n).map(|i| format!("{round}-{i}")).collect();
    let batch: Vec<Value> = names.iter().map(|d| task(&format!("k-{d}"), d)).collect();
    let answer = app.post(&Value::Array(batch)).await;
    assert_eq!(answer.status(), 200);
    names
}

fn agent<'a>(name: &'a str, data: &'a std::path::Path) -> Spawn<'a> {
    Spawn {
        name,
        data,
        partitions: 3,
        // No commits but those of the rebalances: a partition's next owner gets its events
        // again, and only the dedup records tell it which were handled.
        commit_interval_ms: 600_000,
    }
}

#[tokio::test]
async fn a_partition_moved_off_a_sigkilled_process_brings_its_dedup_records_along() {
    let (app, name) = three_partitions("moved").await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut processes = Vec::new();
    for d in &dirs {
        processes.push(AgentProcess::start(&app, agent(&name, d.path())).await);
    }
    wait_for_stable_group(&app.brokers, &name, 3, Duration::from_secs(60)).await;
    let first = publish(&app, "before", 60).await;
    let each = wait_handled(
        &processes.iter().collect::<Vec<_>>(),
        &first,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        each.iter().all(|h| !h.is_empty()),
        "each process holds a share: {:?}",
        each.iter().map(Vec::len).collect::<Vec<_>>()
    );
    // Completed: every record is acknowledged in the changelog (an offset is stored only
    // after that, but none is committed: the commit interval is long).
    let changelog = format!("{}{name}.dedup", app.prefix);
    wait_for_records(&app.brokers, &changelog, 60, Duration::from_secs(30)).await;

    let mut victim = processes.remove(0);
    let completed: HashSet<String> = victim.handled().into_iter().collect();
    let before: Vec<usize> = processes.iter().map(|p| p.handled().len()).collect();
    victim.kill();
    let second = publish(&app, "after", 30).await;
    let mut everything = first.clone();
    everything.extend(second.iter().cloned());
    let mut all: Vec<&AgentProcess> = processes.iter().collect();
    all.push(&victim);
    // Once every "after" event is handled, the moved partition's "before" events (ahead of
    // them in the partition) were seen by its new owner too.
    wait_handled(&all, &everything, Duration::from_secs(90)).await;
    for (p, b) in processes.iter().zip(before) {
        let again: Vec<String> = p.handled()[b..]
            .iter()
            .filter(|d| completed.contains(*d))
            .cloned()
            .collect();
        assert!(
            again.is_empty(),
            "events the killed process had completed were handled again: {again:?}"
        );
    }
    assert!(
        processes.iter().map(|p| p.restored_records()).sum::<u64>() >= completed.len() as u64,
        "the new owner restored the killed process's records"
    );
}

#[tokio::test]
async fn a_new_process_restores_a_partitions_records_and_skips_its_handled_events() {
    let (app, name) = three_partitions("restore").await;
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = AgentProcess::start(&app, agent(&name, d1.path())).await;
    let handled = publish(&app, "first", 20).await;
    wait_handled(&[&first], &handled, Duration::from_secs(60)).await;
    let changelog = format!("{}{name}.dedup", app.prefix);
    wait_for_records(&app.brokers, &changelog, 20, Duration::from_secs(30)).await;
    first.kill();

    // Another machine: an empty data directory. It reads every partition from the start
    // (nothing committed), so all 20 events come again.
    let second = AgentProcess::start(&app, agent(&name, d2.path())).await;
    let last = publish(&app, "later", 3).await;
    wait_handled(&[&second], &last, Duration::from_secs(60)).await;
    let again: Vec<String> = second
        .handled()
        .into_iter()
        .filter(|d| handled.contains(d))
        .collect();
    assert!(again.is_empty(), "handled again: {again:?}");
    assert_eq!(
        second.restored_records(),
        20,
        "restored from the changelog: {}",
        second.log()
    );
    let log = second.log();
    for line in log.lines().filter(|l| l.contains("restored dedup records")) {
        eprintln!("{line}");
    }
    assert!(
        log.lines()
            .filter(|l| l.contains("restored dedup records"))
            .all(|l| l.contains("from=") && l.contains("to=") && l.contains("seconds=")),
        "{log}"
    );
}

#[tokio::test]
async fn a_third_process_added_to_a_running_agent_of_two_takes_partitions_over() {
    let (app, name) = three_partitions("scale").await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut processes = vec![
        AgentProcess::start(&app, agent(&name, dirs[0].path())).await,
        AgentProcess::start(&app, agent(&name, dirs[1].path())).await,
    ];
    wait_for_stable_group(&app.brokers, &name, 2, Duration::from_secs(60)).await;
    let first = publish(&app, "two", 30).await;
    wait_handled(
        &processes.iter().collect::<Vec<_>>(),
        &first,
        Duration::from_secs(60),
    )
    .await;
    processes.push(AgentProcess::start(&app, agent(&name, dirs[2].path())).await);
    wait_for_stable_group(&app.brokers, &name, 3, Duration::from_secs(60)).await;
    let second = publish(&app, "three", 30).await;
    let mut everything = first.clone();
    everything.extend(second);
    let each = wait_handled(
        &processes.iter().collect::<Vec<_>>(),
        &everything,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        !each[2].is_empty(),
        "the third process handles events once it joined"
    );
    // The partition that moved to it was dropped where it was before (records and all).
    let dropped: Vec<String> = processes[..2]
        .iter()
        .flat_map(|p| {
            p.log()
                .lines()
                .filter(|l| {
                    l.contains("dropped the dedup records of a revoked changelog partition")
                })
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        dropped.iter().any(|l| !l.contains("records=0")),
        "a revoked partition's records were dropped: {dropped:?}"
    );
    let mut all: Vec<&String> = each.iter().flatten().collect();
    let count = all.len();
    all.sort();
    all.dedup();
    assert_eq!(count, all.len(), "no event handled twice: {each:?}");
}

#[tokio::test]
async fn one_event_published_through_two_instances_with_one_idempotency_key_is_handled_once() {
    let prefix = unique_prefix();
    let one = spawn(Options {
        prefix: prefix.clone(),
        ..Options::default()
    })
    .await;
    let other = spawn(Options {
        prefix: prefix.clone(),
        ..Options::default()
    })
    .await;
    let (receiver, url) = Receiver::start().await;
    let consumers = tempfile::tempdir().unwrap();
    let name = format!("lb-{}", uuid::Uuid::new_v4().simple());
    agent_file(consumers.path(), &name, &url, "");
    let agent = spawn(Options {
        prefix: prefix.clone(),
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    // No event id, no partition key: each instance makes an event id of its own.
    let event = json!({
        "event_type": "agent.task.requested", "source": "planner",
        "data": {"task_id": uuid::Uuid::new_v4(), "agent_id": "a", "description": "once"}
    });
    let key = format!("retry-{}", uuid::Uuid::new_v4().simple());
    for instance in [&one, &other] {
        let answer = instance
            .client
            .post(format!("{}/v1/events", instance.url))
            .header("idempotency-key", &key)
            .json(&event)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    let topic = one.topic("agent");
    let records = {
        let (b, t) = (one.brokers.clone(), topic.clone());
        tokio::task::spawn_blocking(move || read_records(&b, &t, 2))
            .await
            .unwrap()
    };
    assert_eq!(records.len(), 2, "two instances, two records");
    assert_eq!(
        records[0].partition(),
        records[1].partition(),
        "keyed by the idempotency key: one partition"
    );
    assert_ne!(
        common::header(&records[0], "ce_id"),
        common::header(&records[1], "ce_id")
    );
    // Both records consumed (their offsets committed), the webhook got one.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (b, t, g) = (agent.brokers.clone(), topic.clone(), name.clone());
        let committed = tokio::task::spawn_blocking(move || committed_offsets(&b, &g, &t, 0))
            .await
            .unwrap();
        if committed.iter().sum::<i64>() >= 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "committed {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(receiver.descriptions(), ["once"], "handled once");
}

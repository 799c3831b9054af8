//! The binary as a user runs it: `agentbus serve`, `agentbus publish`, `agentbus topics
//! ensure`, and a graceful SIGTERM.

mod common;

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use rdkafka::Message;
use serde_json::{Value, json};

struct Served {
    child: Child,
    url: String,
    prefix: String,
    brokers: String,
    _data: tempfile::TempDir,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn serve() -> Served {
    let data = tempfile::tempdir().unwrap();
    let brokers = brokers();
    let prefix = unique_prefix();
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(agentbus_bin())
        .arg("serve")
        .env("AGENTBUS_BROKERS", &brokers)
        .env("AGENTBUS_TOPIC_PREFIX", &prefix)
        .env("AGENTBUS_HTTP_ADDR", &addr)
        .env("AGENTBUS_DATA_DIR", data.path())
        .env("AGENTBUS_SCHEMAS_DIR", root().join("schemas"))
        .env("AGENTBUS_CONSUMERS_DIR", data.path().join("no-agents"))
        .env("AGENTBUS_TOPIC_PARTITIONS", "2")
        .env("AGENTBUS_LOG", "warn")
        .spawn()
        .unwrap();
    let served = Served {
        child,
        url: format!("http://{addr}"),
        prefix,
        brokers,
        _data: data,
    };
    wait_until_ready(&reqwest::Client::new(), &served.url, "agentbus serve").await;
    served
}

fn publish_cmd(served: &Served) -> Command {
    let mut cmd = Command::new(agentbus_bin());
    cmd.arg("publish").env("AGENTBUS_URL", &served.url);
    cmd
}

#[tokio::test]
async fn agentbus_publish_sends_one_event_from_flags() {
    let served = serve().await;
    let out = publish_cmd(&served)
        .args([
            "--type",
            "agent.updated",
            "--source",
            "cli-test",
            "--key",
            "a1",
        ])
        .args([
            "--data",
            r#"{"agent_id":"a1","changes":{"type":"planner"},"updated_by":"me"}"#,
        ])
        .args(["--meta", "correlation_id=c-1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["event_type"], "agent.updated");
    let topic = format!("{}agent.events", served.prefix);
    let records = read_records(&served.brokers, &topic, 1);
    assert_eq!(records[0].key(), Some(&b"a1"[..]));
    assert_eq!(
        header(&records[0], "ce_correlationid").as_deref(),
        Some("c-1")
    );

    let bad = publish_cmd(&served)
        .args(["--type", "agent.updated", "--data", r#"{"agent_id":1}"#])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stdout).contains("schema_violation"));
}

#[tokio::test]
async fn agentbus_publish_sends_json_lines_from_stdin_in_batches_and_summarises() {
    let served = serve().await;
    let mut child = publish_cmd(&served)
        .args(["--file", "-", "--batch-size", "40"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for i in 0..120 {
            let line = json!({"event_type": "knowledge.shared", "source": "cli",
                "data": {"knowledge_id": uuid::Uuid::new_v4(), "from_agent": "a", "domain": "d", "content": format!("fact {i}")}});
            writeln!(stdin, "{line}").unwrap();
        }
        writeln!(stdin).unwrap();
        writeln!(stdin, "this is not json").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "one line was bad");
    assert!(
        stdout.contains("written 120, duplicates 0, failed 1"),
        "{stdout}"
    );
    assert!(stderr.contains("line 122"), "{stderr}");
    assert_eq!(
        record_count(
            &served.brokers,
            &format!("{}knowledge.events", served.prefix)
        ),
        120
    );
}

#[tokio::test]
async fn topics_ensure_reports_existing_topics() {
    let served = serve().await;
    let out = Command::new(agentbus_bin())
        .args(["topics", "ensure"])
        .env("AGENTBUS_BROKERS", &served.brokers)
        .env("AGENTBUS_TOPIC_PREFIX", &served.prefix)
        .env("AGENTBUS_SCHEMAS_DIR", root().join("schemas"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("exists   {}agent.events", served.prefix)),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 5, "{stdout}");
}

#[tokio::test]
async fn sigterm_lets_in_flight_publishes_finish_and_every_acknowledged_event_is_in_kafka() {
    let mut served = serve().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events", served.url);
    let mut requests = Vec::new();
    for i in 0..40 {
        let client = client.clone();
        let url = url.clone();
        requests.push(tokio::spawn(async move {
            let body = json!({"event_type": "pattern.learned", "source": "t",
                "data": {"pattern_id": uuid::Uuid::new_v4(), "agent_id": "a", "pattern_type": "p",
                         "description": format!("{i}"), "success_rate": 0.5, "sample_size": 3}});
            tokio::time::sleep(Duration::from_millis(i * 5)).await;
            let response = client.post(&url).json(&body).send().await.ok()?;
            if response.status() == 200 {
                let answer: Value = response.json().await.ok()?;
                Some(answer["event_id"].as_str()?.to_string())
            } else {
                None
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    Command::new("kill")
        .args(["-TERM", &served.child.id().to_string()])
        .status()
        .unwrap();
    let mut acknowledged = Vec::new();
    for r in requests {
        if let Some(id) = r.await.unwrap() {
            acknowledged.push(id);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = served.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(
        !acknowledged.is_empty(),
        "some publishes finished before shutdown"
    );
    let topic = format!("{}pattern.events", served.prefix);
    let count = record_count(&served.brokers, &topic) as usize;
    let records = read_records(&served.brokers, &topic, count);
    let in_kafka: Vec<String> = records
        .iter()
        .map(|r| header(r, "ce_id").unwrap())
        .collect();
    for id in &acknowledged {
        assert!(
            in_kafka.contains(id),
            "acknowledged {id} missing from Kafka"
        );
    }
}

/// A `knowledge.shared` line; `bad` breaks its schema (an id that is a number).
fn knowledge_line(i: u128, bad: bool) -> String {
    let id = if bad {
        json!(i as u64)
    } else {
        json!(uuid::Uuid::from_u128(i + 1))
    };
    json!({"event_type": "knowledge.shared", "source": "bulk", "partition_key": format!("k{}", i % 7),
           "data": {"knowledge_id": id, "from_agent": "a", "domain": "d", "content": format!("fact {i}")}})
    .to_string()
}

fn publish_file(served: &Served, file: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let out = publish_cmd(served)
        .arg("--file")
        .arg(file)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn publishing_a_file_writes_every_good_line_reports_each_bad_one_and_a_rerun_after_fixing_writes_only_the_fixes()
 {
    let served = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bulk.jsonl");
    let schema_bad = [7usize, 123, 250, 251, 420];
    let not_json = 333usize;
    let lines = |fixed: bool| -> String {
        (1..=500usize)
            .map(|n| {
                if n == not_json && !fixed {
                    "{\"event_type\": \"knowledge.shared\", oops".to_string()
                } else {
                    knowledge_line(n as u128, schema_bad.contains(&n) && !fixed)
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    std::fs::write(&file, lines(false)).unwrap();
    let topic = format!("{}knowledge.events", served.prefix);
    let reported = |stderr: &str| {
        for n in schema_bad {
            assert!(
                stderr.contains(&format!("line {n}: data.knowledge_id: ")),
                "line {n} not reported: {stderr}"
            );
        }
        assert!(
            stderr.contains(&format!("line {not_json}: not JSON")),
            "{stderr}"
        );
        assert_eq!(
            stderr.lines().filter(|l| l.starts_with("line ")).count(),
            6,
            "{stderr}"
        );
    };

    let (ok, stdout, stderr) = publish_file(&served, &file, &[]);
    assert!(!ok, "some lines failed: exit non-zero");
    assert!(
        stdout.contains("written 494, duplicates 0, failed 6"),
        "{stdout}{stderr}"
    );
    reported(&stderr);

    // The same file again: nothing new, the same six reported.
    let (ok, stdout, stderr) = publish_file(&served, &file, &[]);
    assert!(!ok);
    assert!(
        stdout.contains("written 0, duplicates 494, failed 6"),
        "{stdout}{stderr}"
    );
    reported(&stderr);

    // The six fixed: only they are written.
    std::fs::write(&file, lines(true)).unwrap();
    let (ok, stdout, stderr) = publish_file(&served, &file, &[]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("written 6, duplicates 494, failed 0"),
        "{stdout}{stderr}"
    );

    assert_eq!(record_count(&served.brokers, &topic), 500);
    let records = read_records(&served.brokers, &topic, 500);
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| header(r, "ce_id").unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 500, "every record is a different event");
}

#[tokio::test]
async fn publishing_a_file_atomically_writes_nothing_when_a_line_is_bad_and_everything_when_none_is()
 {
    let served = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("atomic.jsonl");
    let topic = format!("{}knowledge.events", served.prefix);
    let write = |bad: Option<usize>, broken: Option<usize>| {
        let text: Vec<String> = (1..=150usize)
            .map(|n| {
                if Some(n) == broken {
                    "not json".to_string()
                } else {
                    knowledge_line(n as u128, Some(n) == bad)
                }
            })
            .collect();
        std::fs::write(&file, text.join("\n")).unwrap();
    };

    // A line that is not JSON: refused before anything is sent.
    write(None, Some(40));
    let (ok, _, stderr) = publish_file(&served, &file, &["--atomic"]);
    assert!(!ok);
    assert!(stderr.contains("line 40: not JSON"), "{stderr}");
    assert!(stderr.contains("nothing was sent"), "{stderr}");

    // A line its schema refuses: nothing written, the line named.
    write(Some(120), None);
    let (ok, stdout, stderr) = publish_file(&served, &file, &["--atomic", "--batch-size", "10"]);
    assert!(!ok);
    assert!(
        stdout.contains("written 0, duplicates 0, failed 150"),
        "{stdout}{stderr}"
    );
    assert!(stderr.contains("line 120: data.knowledge_id: "), "{stderr}");
    assert!(
        stderr.contains("nothing was written (--atomic)"),
        "{stderr}"
    );

    // Fixed: all of it, in one go.
    write(None, None);
    let (ok, stdout, stderr) = publish_file(&served, &file, &["--atomic"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("written 150, duplicates 0, failed 0"),
        "{stdout}"
    );
    assert_eq!(record_count(&served.brokers, &topic), 150);
}

#[tokio::test]
async fn a_line_whose_own_idempotency_key_conflicts_fails_alone_and_the_rest_of_its_batch_is_written()
 {
    let served = serve().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.jsonl");
    let with_key = |content: &str| {
        let mut line: Value = serde_json::from_str(&knowledge_line(0, false)).unwrap();
        line["idempotency_key"] = json!("my-own-key");
        line["data"]["content"] = json!(content);
        line.to_string()
    };
    std::fs::write(&file, with_key("first")).unwrap();
    let (ok, stdout, stderr) = publish_file(&served, &file, &[]);
    assert!(ok, "{stdout}{stderr}");

    // The same key with another body, among new lines of the same batch.
    let lines: Vec<String> = (1..=9u128)
        .map(|i| knowledge_line(i, false))
        .chain([with_key("second")])
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let (ok, stdout, stderr) = publish_file(&served, &file, &[]);
    assert!(!ok);
    assert!(
        stdout.contains("written 9, duplicates 0, failed 1"),
        "{stdout}{stderr}"
    );
    assert!(
        stderr.contains("line 10: HTTP 409 idempotency_conflict"),
        "{stderr}"
    );
    let topic = format!("{}knowledge.events", served.prefix);
    assert_eq!(record_count(&served.brokers, &topic), 10);
}

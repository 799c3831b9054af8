//! `agent run` processes of one agent, each with a webhook receiver of its own (so that a
//! test can tell which process handled what) and its log in a file.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{TestApp, agentbus_bin, agents::Receiver, agents::agent_file, root};

/// One `agentbus agent run` process.
pub struct AgentProcess {
    pub receiver: Receiver,
    child: Option<std::process::Child>,
    log: PathBuf,
    _consumers: tempfile::TempDir,
    _logs: tempfile::TempDir,
}

/// How a process is started.
pub struct Spawn<'a> {
    pub name: &'a str,
    /// Its data directory (its dedup store lives there).
    pub data: &'a Path,
    /// Partitions of the agent's retry and replay topics (and its changelog's default).
    pub partitions: u32,
    /// librdkafka's `auto.commit.interval.ms`. A long one leaves the offsets where the
    /// group's rebalances committed them, so that a partition's next owner gets the events
    /// its last owner handled again, and only the dedup records can tell it they were.
    pub commit_interval_ms: u64,
}

impl AgentProcess {
    pub async fn start(app: &TestApp, spawn: Spawn<'_>) -> AgentProcess {
        let (receiver, url) = Receiver::start().await;
        let consumers = tempfile::tempdir().unwrap();
        agent_file(consumers.path(), spawn.name, &url, "");
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("agent.log");
        let child = std::process::Command::new(agentbus_bin())
            .args(["agent", "run", spawn.name])
            .env("AGENTBUS_BROKERS", &app.brokers)
            .env("AGENTBUS_TOPIC_PREFIX", &app.prefix)
            .env("AGENTBUS_DATA_DIR", spawn.data)
            .env("AGENTBUS_CONSUMERS_DIR", consumers.path())
            .env("AGENTBUS_SCHEMAS_DIR", root().join("schemas"))
            .env("AGENTBUS_TOPIC_PARTITIONS", spawn.partitions.to_string())
            .env("AGENTBUS_AGENT_SESSION_TIMEOUT", "6s")
            .env(
                "AGENTBUS_KAFKA_AUTO_COMMIT_INTERVAL_MS",
                spawn.commit_interval_ms.to_string(),
            )
            .env("AGENTBUS_LOG", "warn,agentbus::consume=info")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        AgentProcess {
            receiver,
            child: Some(child),
            log,
            _consumers: consumers,
            _logs: logs,
        }
    }

    /// SIGKILL: nothing of the process runs after it, no commit, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// The process's log so far, without its colours.
    pub fn log(&self) -> String {
        let raw = std::fs::read_to_string(&self.log).unwrap_or_default();
        let mut plain = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                // ESC [ ... letter
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                plain.push(c);
            }
        }
        plain
    }

    /// The descriptions of the events its webhook got.
    pub fn handled(&self) -> Vec<String> {
        self.receiver.descriptions()
    }

    /// The `records=N` of its "restored dedup records" log lines, summed.
    pub fn restored_records(&self) -> u64 {
        self.log()
            .lines()
            .filter(|l| l.contains("restored dedup records"))
            .filter_map(|l| {
                let rest = l.split("records=").nth(1)?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits until the processes together handled every one of `wanted`; what each handled.
pub async fn wait_handled(
    processes: &[&AgentProcess],
    wanted: &[String],
    timeout: Duration,
) -> Vec<Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let each: Vec<Vec<String>> = processes.iter().map(|p| p.handled()).collect();
        let seen: HashSet<&String> = each.iter().flatten().collect();
        let missing: Vec<&String> = wanted.iter().filter(|w| !seen.contains(w)).collect();
        if missing.is_empty() {
            return each;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} events not handled: {missing:?}",
            missing.len(),
            wanted.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `topic` holds at least `n` records.
pub async fn wait_for_records(brokers: &str, topic: &str, n: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (b, t) = (brokers.to_string(), topic.to_string());
        let count = tokio::task::spawn_blocking(move || super::record_count(&b, &t))
            .await
            .unwrap();
        if count >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{topic} holds {count} records, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

//! The agentbus processes a benchmark runs: `agentbus serve` on a free port with a topic prefix
//! and a data directory of its own (fresh topics for every round), and `agentbus agent run`.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use agentbus::config::KafkaArgs;
use anyhow::{Context, bail};

/// A child agentbus process; killed and its data directory removed when dropped.
pub struct Process {
    child: Child,
    dir: PathBuf,
    /// Base URL of its HTTP API (`serve` only).
    pub url: String,
}

/// A new directory under the system's temporary directory.
pub fn temp_dir(what: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "agentbus-bench-{what}-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn base_command(agentbus: &Path, kafka: &KafkaArgs, dir: &Path) -> Command {
    let mut command = Command::new(agentbus);
    command
        .env("AGENTBUS_BROKERS", &kafka.brokers)
        .env("AGENTBUS_TOPIC_PREFIX", &kafka.topic_prefix)
        .env("AGENTBUS_DATA_DIR", dir.join("data"))
        .env("AGENTBUS_SCHEMAS_DIR", "schemas")
        // Short group timeouts, as in the tests: a process that is killed between rounds
        // leaves its group quickly (every round has groups of its own anyway).
        .env("AGENTBUS_AGENT_SESSION_TIMEOUT", "6s")
        .env(
            "AGENTBUS_LOG",
            std::env::var("AGENTBUS_BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
        );
    command
}

impl Process {
    /// `agentbus serve` with the agents of `consumers` (none when `None`), waited for until
    /// `/readyz` answers 200 when `wait_ready`.
    pub async fn serve(
        agentbus: &Path,
        kafka: &KafkaArgs,
        consumers: Option<&Path>,
        wait_ready: bool,
    ) -> anyhow::Result<Process> {
        Self::serve_with(agentbus, kafka, consumers, wait_ready, &[]).await
    }

    /// [`Process::serve`] with `env` on top.
    pub async fn serve_with(
        agentbus: &Path,
        kafka: &KafkaArgs,
        consumers: Option<&Path>,
        wait_ready: bool,
        env: &[(&str, String)],
    ) -> anyhow::Result<Process> {
        let dir = temp_dir("serve")?;
        let consumers = match consumers {
            Some(c) => c.to_path_buf(),
            None => {
                let none = dir.join("no-agents");
                std::fs::create_dir_all(&none)?;
                none
            }
        };
        let port = super::free_port()?;
        let child = base_command(agentbus, kafka, &dir)
            .arg("serve")
            .env("AGENTBUS_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .env("AGENTBUS_CONSUMERS_DIR", &consumers)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .spawn()
            .with_context(|| format!("starting {}", agentbus.display()))?;
        let process = Process {
            child,
            dir,
            url: format!("http://127.0.0.1:{port}"),
        };
        if wait_ready {
            process.wait_ready().await?;
        }
        Ok(process)
    }

    /// `agentbus agent run NAME` with the agent definitions of `consumers` and `env` on top.
    pub fn agent_run(
        agentbus: &Path,
        kafka: &KafkaArgs,
        name: &str,
        consumers: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Process> {
        let dir = temp_dir("agent")?;
        let mut command = base_command(agentbus, kafka, &dir);
        command
            .args(["agent", "run", name])
            .env("AGENTBUS_CONSUMERS_DIR", consumers);
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", agentbus.display()))?;
        Ok(Process {
            child,
            dir,
            url: String::new(),
        })
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let readyz = format!("{}/readyz", self.url);
        while Instant::now() < deadline {
            if let Ok(r) = client.get(&readyz).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("agentbus at {} did not become ready within 60 s", self.url)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its data directory (sled stores).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Its resident memory now (VmRSS), MiB.
    pub fn rss_mib(&self) -> f64 {
        super::status_mib(self.pid(), "VmRSS:")
    }

    /// Its peak resident memory (VmHWM), MiB.
    pub fn peak_mib(&self) -> f64 {
        super::status_mib(self.pid(), "VmHWM:")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

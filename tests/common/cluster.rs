//! A three-broker Kafka cluster of one test binary's own (`ops/cluster.sh` on free ports and
//! a temporary data directory), shared by its tests one at a time, and `agentbus` processes
//! on it.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::Value;

use super::{agentbus_bin, root};

/// The cluster of this test binary: started by the first test that asks, stopped (and its
/// directory removed) by a watchdog once the binary exits, however it ends (a failed test,
/// a panic, Ctrl-C): a static is never dropped, so a `Drop` guard could not do it.
pub struct Cluster {
    /// The bootstrap servers of all three nodes.
    pub bootstrap: String,
    /// The base port: node N listens on base + 2(N-1), its controller one above.
    pub base: u16,
    /// Its data directory.
    pub dir: PathBuf,
    extra_config: PathBuf,
}

/// Tests that stop or kill brokers take this first, so that they never overlap.
pub static FAULTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A number from the environment (`ops/chaos.sh cluster` sets them), or `default`.
pub fn knob(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Six consecutive ports free on 127.0.0.1 a moment ago (three listeners, three
/// controllers), below Linux's ephemeral range; each binary starts at its own place.
fn free_base() -> u16 {
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    let start = std::process::id().wrapping_mul(7919).wrapping_add(4099) % COUNT;
    for i in 0..COUNT / 6 {
        let base = FIRST + (start + i * 6) % (COUNT - 6);
        if (0..6).all(|k| std::net::TcpListener::bind(("127.0.0.1", (base + k) as u16)).is_ok()) {
            return base as u16;
        }
    }
    panic!("no six consecutive free ports");
}

impl Cluster {
    /// The cluster, started on first use; `None` (and a line saying so) on a machine that
    /// has no broker of its own to start (`AGENTBUS_NO_OWN_BROKER`) or runs the suite on
    /// tansu, which has no clusters.
    pub fn get() -> Option<&'static Cluster> {
        if std::env::var_os("AGENTBUS_NO_OWN_BROKER").is_some()
            || std::env::var("AGENTBUS_LOCAL_BROKER").is_ok_and(|b| b == "tansu")
        {
            eprintln!("skipped: this test needs a Kafka cluster of its own");
            return None;
        }
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        Some(CLUSTER.get_or_init(Cluster::start))
    }

    fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!("agentbus-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // Fencing a SIGKILLed broker after broker.session.timeout.ms (Kafka's default 9 s)
        // is what a leader failover waits for, and a restarted broker is unfenced at a
        // heartbeat (broker.heartbeat.interval.ms, 2 s): the tests take shorter ones
        // (CLUSTER_SESSION_TIMEOUT_MS, CLUSTER_HEARTBEAT_MS), ops/chaos.sh cluster Kafka's.
        // Below about 4 s, too, because agentbus's broker watch counts a stall that long as
        // the broker gone (its probe waits behind the stalled produce requests).
        let session = knob("CLUSTER_SESSION_TIMEOUT_MS", 2500.0) as u64;
        let heartbeat = knob("CLUSTER_HEARTBEAT_MS", 500.0) as u64;
        let extra_config = dir.join("extra.properties");
        std::fs::write(
            &extra_config,
            format!(
                "broker.session.timeout.ms={session}\nbroker.heartbeat.interval.ms={heartbeat}\n"
            ),
        )
        .unwrap();
        let mut cluster = Cluster {
            bootstrap: String::new(),
            base: free_base(),
            dir,
            extra_config,
        };
        // The watchdog: its own session, so that a Ctrl-C to the tests does not stop it
        // before it stops the cluster.
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {cluster_sh} stop; rm -rf '{dir}'",
            pid = std::process::id(),
            cluster_sh = root().join("ops/cluster.sh").display(),
            dir = cluster.dir.display(),
        );
        let mut watchdog = Command::new("setsid");
        watchdog
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cluster.env(&mut watchdog);
        let mut watchdog = watchdog.spawn().expect("starting the cluster's watchdog");
        // Reaped if it ends first (it outlives this process otherwise, as meant).
        std::thread::spawn(move || watchdog.wait());
        let started = Instant::now();
        cluster.bootstrap = cluster.run_blocking(&["start"]);
        eprintln!(
            "cluster {} started in {:.1}s",
            cluster.bootstrap,
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("AGENTBUS_DATA_DIR", &self.dir)
            .env("AGENTBUS_CLUSTER_PORT", self.base.to_string())
            .env("AGENTBUS_CLUSTER_EXTRA_CONFIG", &self.extra_config)
            .env_remove("AGENTBUS_BROKERS");
    }

    /// `ops/cluster.sh ARGS...` for this cluster.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(root().join("ops/cluster.sh"));
        cmd.args(args);
        self.env(&mut cmd);
        cmd
    }

    fn run_blocking(&self, args: &[&str]) -> String {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "ops/cluster.sh {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// Runs `ops/cluster.sh ARGS...` off the runtime's threads; what it printed. Fails the
    /// test when it fails.
    pub async fn run(&'static self, args: &[&str]) -> String {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.run_blocking(&args)
        })
        .await
        .unwrap()
    }

    /// Every node running and in the cluster again, every replica in sync (after an
    /// earlier test, failed or not).
    pub async fn heal(&'static self) {
        self.run(&["start"]).await;
        self.wait_full_isr(Duration::from_secs(120)).await;
    }

    /// SIGKILLs node `n`.
    pub async fn kill(&'static self, n: i32) {
        self.run(&["kill", &n.to_string()]).await;
    }

    /// Starts node `n` again (a running one is shut down cleanly first) and waits until it
    /// is one of the cluster's brokers.
    pub async fn restart(&'static self, n: i32) {
        self.run(&["restart", &n.to_string()]).await;
    }

    /// A client of the cluster for metadata.
    fn client(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap()
    }

    /// Per partition of `topic`: (partition, leader, replicas, in-sync replicas).
    pub fn partitions(&self, topic: &str) -> Vec<(i32, i32, Vec<i32>, Vec<i32>)> {
        let metadata = self
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        metadata.topics()[0]
            .partitions()
            .iter()
            .map(|p| (p.id(), p.leader(), p.replicas().to_vec(), p.isr().to_vec()))
            .collect()
    }

    /// Waits until every partition of every topic (the internal ones included) has all its
    /// replicas in sync; the time it took.
    pub async fn wait_full_isr(&'static self, timeout: Duration) -> Duration {
        tokio::task::spawn_blocking(move || {
            let client = self.client();
            let started = Instant::now();
            let mut last = String::new();
            loop {
                if let Ok(metadata) = client.fetch_metadata(None, Duration::from_secs(5)) {
                    let short: Vec<String> = metadata
                        .topics()
                        .iter()
                        .flat_map(|t| {
                            t.partitions()
                                .iter()
                                .filter(|p| p.isr().len() < p.replicas().len() || p.leader() < 0)
                                .map(move |p| format!("{}/{}: isr {:?}", t.name(), p.id(), p.isr()))
                        })
                        .collect();
                    if short.is_empty() && metadata.brokers().len() == 3 {
                        return started.elapsed();
                    }
                    last = format!("{} brokers; {short:?}", metadata.brokers().len());
                }
                assert!(
                    started.elapsed() < timeout,
                    "replicas still out of sync after {timeout:?}: {last}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
        .unwrap()
    }
}

/// A process of the `agentbus` binary, its stderr (log lines) collected; SIGKILLed when
/// dropped.
pub struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd`.
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proc { child, log }
    }

    /// What it logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for it to exit: its status, `None` while it runs.
    pub async fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The first log line containing `needle`, waiting up to `timeout`.
    pub async fn line_with(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return Some(line);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Proc {
    /// Kills it with SIGKILL and reaps it.
    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// `agentbus` on `brokers` with the tests' settings: topic prefix, data directory, agent
/// definitions and 3 partitions per topic; JSON logs.
pub fn agentbus(brokers: &str, prefix: &str, data: &Path, consumers: &Path) -> Command {
    let mut cmd = Command::new(agentbus_bin());
    cmd.env("AGENTBUS_BROKERS", brokers)
        .env("AGENTBUS_TOPIC_PREFIX", prefix)
        .env("AGENTBUS_DATA_DIR", data)
        .env("AGENTBUS_SCHEMAS_DIR", root().join("schemas"))
        .env("AGENTBUS_CONSUMERS_DIR", consumers)
        .env("AGENTBUS_TOPIC_PARTITIONS", "3")
        .env("AGENTBUS_AGENT_SESSION_TIMEOUT", "6s")
        .env("AGENTBUS_LAG_INTERVAL", "0s")
        .env("AGENTBUS_LOG", "info")
        .env("AGENTBUS_LOG_JSON", "true")
        .env("AGENTBUS_BROKER_QUIRKS", "none")
        .env_remove("AGENTBUS_TOPIC_REPLICATION");
    cmd
}

/// `agentbus serve` (with `extra` arguments) on a free port; returns once `/readyz` answers
/// 200, with its URL.
pub async fn serve(brokers: &str, prefix: &str, data: &Path, extra: &[&str]) -> (Proc, String) {
    let mut cmd = agentbus(brokers, prefix, data, &data.join("no-agents"));
    cmd.args(["serve", "--http-addr", "127.0.0.1:0"])
        .args(extra);
    spawn_serve(cmd).await
}

/// Spawns `cmd` (an `agentbus serve` on port 0); returns once `/readyz` answers 200, with
/// its URL.
pub async fn spawn_serve(cmd: Command) -> (Proc, String) {
    let proc = Proc::spawn(cmd);
    let line = proc
        .line_with("agentbus listening", Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("agentbus serve did not listen: {:?}", proc.log()));
    let line: Value = serde_json::from_str(&line).unwrap();
    let url = format!("http://{}", line["fields"]["addr"].as_str().unwrap());
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await
            && r.status() == 200
        {
            return (proc, url);
        }
        assert!(
            Instant::now() < deadline,
            "agentbus serve not ready: {:?}",
            proc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

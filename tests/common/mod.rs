//! Shared by the integration tests: a real broker (started through `ops/broker.sh`, or
//! `AGENTBUS_BROKERS`), and the service started in-process on 127.0.0.1:0 with its own
//! topic prefix and data directory, so tests run in parallel and again.
#![allow(dead_code)]

pub mod agents;
pub mod cluster;
pub mod dedup;
pub mod groups;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::{Duration, Instant},
};

use agentbus::{
    app::App,
    config::{KafkaArgs, ServeArgs},
};
use clap::Parser;
use rdkafka::{
    ClientConfig, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::OwnedMessage,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tests' own broker keeps its data apart from the development broker's
/// (`ops/test.sh` uses the same defaults).
fn test_broker_dir() -> PathBuf {
    std::env::var_os("AGENTBUS_TEST_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/test-data"))
}

fn test_broker_port() -> String {
    std::env::var("AGENTBUS_TEST_BROKER_PORT").unwrap_or_else(|_| "19092".into())
}

/// Bootstrap servers of the test broker: `AGENTBUS_BROKERS`, or the local one (Apache Kafka,
/// or tansu with `AGENTBUS_LOCAL_BROKER=tansu`) on `AGENTBUS_TEST_BROKER_PORT` (default 19092)
/// that `ops/broker.sh` starts once and every test binary after the first reuses.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            if let Ok(b) = std::env::var("AGENTBUS_BROKERS")
                && !b.is_empty()
            {
                return b;
            }
            let out = Command::new(root().join("ops/broker.sh"))
                .arg("start")
                .env("AGENTBUS_DATA_DIR", test_broker_dir())
                .env("AGENTBUS_BROKER_PORT", test_broker_port())
                .envs(
                    std::env::var("AGENTBUS_TEST_BROKER_CONTROLLER_PORT")
                        .map(|p| ("AGENTBUS_BROKER_CONTROLLER_PORT", p)),
                )
                .output()
                .expect("running ops/broker.sh");
            assert!(
                out.status.success(),
                "ops/broker.sh start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .clone()
}

/// The broker quirks of the test broker: tansu's when the suite runs on it
/// (`AGENTBUS_LOCAL_BROKER=tansu`), none on Apache Kafka.
pub fn broker_quirks() -> agentbus::broker::BrokerQuirks {
    if std::env::var("AGENTBUS_LOCAL_BROKER").is_ok_and(|b| b == "tansu") {
        agentbus::broker::BrokerQuirks::Tansu
    } else {
        agentbus::broker::BrokerQuirks::None
    }
}

/// [`broker_quirks`] as the value of `AGENTBUS_BROKER_QUIRKS`, for `agentbus` processes a
/// test starts.
pub fn broker_quirks_setting() -> &'static str {
    match broker_quirks() {
        agentbus::broker::BrokerQuirks::Tansu => "tansu",
        agentbus::broker::BrokerQuirks::None => "none",
    }
}

/// A unique topic prefix for one test.
pub fn unique_prefix() -> String {
    format!("t{}.", uuid::Uuid::new_v4().simple())
}

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    serve: ServeArgs,
}

/// A running service.
pub struct TestApp {
    pub url: String,
    pub prefix: String,
    pub brokers: String,
    pub data_dir: PathBuf,
    pub client: reqwest::Client,
    cancel: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _tmp: Option<tempfile::TempDir>,
}

/// Options of [`spawn`].
pub struct Options {
    /// `None`: the test broker.
    pub brokers: Option<String>,
    pub schemas_dir: PathBuf,
    pub data_dir: Option<PathBuf>,
    pub prefix: String,
    pub extra: Vec<String>,
    pub wait_ready: bool,
    /// Agent definitions to run; `None`: none.
    pub consumers_dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            brokers: None,
            schemas_dir: root().join("schemas"),
            data_dir: None,
            prefix: unique_prefix(),
            extra: Vec::new(),
            wait_ready: true,
            consumers_dir: None,
        }
    }
}

impl Options {
    /// A service pointed at a port where no broker listens.
    pub fn without_broker() -> Self {
        Options {
            brokers: Some("127.0.0.1:1".into()),
            wait_ready: false,
            ..Options::default()
        }
    }
}

/// Starts the service with the sample schemas, its own topics and data directory, and
/// waits until `/readyz` says ready.
pub async fn spawn_app() -> TestApp {
    spawn(Options::default()).await
}

pub async fn spawn(options: Options) -> TestApp {
    // Logs go to the test's captured output: shown when it fails.
    let filter = std::env::var("AGENTBUS_TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
    let (tmp, data_dir) = match options.data_dir {
        Some(dir) => (None, dir),
        None => {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().to_path_buf();
            (Some(tmp), dir)
        }
    };
    let brokers = options.brokers.unwrap_or_else(brokers);
    let consumers_dir = options
        .consumers_dir
        .unwrap_or_else(|| data_dir.join("no-agents"))
        .display()
        .to_string();
    let mut args: Vec<String> = [
        "test",
        "--brokers",
        &brokers,
        "--topic-prefix",
        &options.prefix,
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--schemas-dir",
        options.schemas_dir.to_str().unwrap(),
        "--topic-partitions",
        "2",
        "--shutdown-grace",
        "2s",
        "--agent-session-timeout",
        "6s",
        "--consumers-dir",
        &consumers_dir,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The lag monitor collects on demand only, unless a test asks for an interval.
    if !options.extra.iter().any(|a| a == "--lag-interval") {
        args.extend(["--lag-interval".to_string(), "0s".to_string()]);
    }
    if broker_quirks() == agentbus::broker::BrokerQuirks::Tansu
        && !options.extra.iter().any(|a| a == "--broker-quirks")
    {
        args.extend(["--broker-quirks".to_string(), "tansu".to_string()]);
    }
    args.extend(options.extra);
    let settings = Wrapper::try_parse_from(args).unwrap().serve;
    let app = App::build(settings).await.expect("the app builds");
    let url = format!("http://{}", app.local_addr().unwrap());
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(app.run(cancel.clone()));
    let test_app = TestApp {
        url,
        prefix: options.prefix,
        brokers,
        data_dir,
        client: reqwest::Client::new(),
        cancel,
        handle: Some(handle),
        _tmp: tmp,
    };
    if options.wait_ready {
        test_app.wait_ready().await;
    }
    test_app
}

/// A topic of the app's own, `{prefix}{name}`, with `partitions` partitions and a week's
/// retention; its name.
pub async fn own_topic(app: &TestApp, name: &str, partitions: i32) -> String {
    let topic = format!("{}{name}", app.prefix);
    agentbus::topics::ensure(
        &app.kafka_args(),
        &[agentbus::topics::TopicSpec {
            name: topic.clone(),
            partitions,
            replication: 1,
            retention: Duration::from_secs(7 * 24 * 3600),
            configs: Vec::new(),
        }],
    )
    .await
    .unwrap();
    topic
}

/// Waits (60 s at most) until `{url}/readyz` answers 200; panics "`who` did not become
/// ready" otherwise.
pub async fn wait_until_ready(client: &reqwest::Client, url: &str, who: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{url}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        assert!(Instant::now() < deadline, "{who} did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestApp {
    /// Kafka settings for the app's brokers and topic prefix (and the broker's quirks).
    pub fn kafka_args(&self) -> KafkaArgs {
        KafkaArgs {
            brokers: self.brokers.clone(),
            topic_prefix: self.prefix.clone(),
            broker_quirks: broker_quirks(),
            ..KafkaArgs::default()
        }
    }

    pub async fn wait_ready(&self) {
        wait_until_ready(&self.client, &self.url, "the service").await;
    }

    pub async fn post(&self, body: &Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/events", self.url))
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_raw(&self, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/events", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
    }

    /// GET `path` and parse the JSON answer.
    pub async fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> T {
        self.get(path).await.json().await.unwrap()
    }

    pub fn topic(&self, domain: &str) -> String {
        format!("{}{domain}.events", self.prefix)
    }

    /// Stops the service as SIGTERM would, and waits for it.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A plain consumer assigned to every partition of `topic` from the beginning: no group,
/// so no join delay.
pub fn assigned_consumer(brokers: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut assignment = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        assignment
            .add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    consumer
}

/// Reads `n` records of `topic` (all partitions), failing after 30 s.
pub fn read_records(brokers: &str, topic: &str, n: usize) -> Vec<OwnedMessage> {
    let consumer = assigned_consumer(brokers, topic);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} records arrived on {topic}",
            out.len()
        );
        if let Some(result) = consumer.poll(Duration::from_millis(200)) {
            out.push(result.unwrap().detach());
        }
    }
    out
}

/// Records in `topic` (sum of high watermarks minus low), as the broker reports it.
pub fn record_count(brokers: &str, topic: &str) -> i64 {
    let consumer = assigned_consumer(brokers, topic);
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    metadata.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            high - low
        })
        .sum()
}

/// The committed offsets of `group` on both partitions of `topic`; `unset` where the group
/// has none committed.
pub fn committed_offsets(brokers: &str, group: &str, topic: &str, unset: i64) -> Vec<i64> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..2 {
        tpl.add_partition(topic, p);
    }
    client
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => o,
            _ => unset,
        })
        .collect()
}

/// The string value of header `name` of a record.
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    agentbus::consume::header_str(message, name)
}

/// The standard output of a command that must have succeeded; fails the test with both of
/// its outputs otherwise.
pub fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "the command failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A port free on 127.0.0.1 a moment ago, for a server a test starts later (a broker's JVM
/// binds seconds after). Taken below Linux's ephemeral range (32768-60999), so that no
/// outgoing connection gets it in between, and never twice in one test binary (binaries run
/// one after another); a port something else listens on is passed over.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Each binary starts at its own place in the range, so that a server a binary left
    // behind does not meet the next binary's first ports.
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST + (start + n) % COUNT;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// Path of the built `agentbus` binary.
pub fn agentbus_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_agentbus"))
}

/// A broker of one test's own, started through `ops/broker.sh` (Apache Kafka, or tansu with
/// `AGENTBUS_LOCAL_BROKER=tansu`) on free ports (its listener and its controller's) and a
/// temporary data directory, so that a test may stop and restart it; stopped when dropped,
/// whatever happened. `AGENTBUS_BROKERS` (the shared broker) does not apply to it.
pub struct OwnBroker {
    /// The bootstrap address of its PLAINTEXT listener.
    pub addr: String,
    pub port: u16,
    pub controller_port: u16,
    pub dir: tempfile::TempDir,
    extra_config: Option<PathBuf>,
    format_args: Option<String>,
    listeners: Option<String>,
}

/// What an [`OwnBroker`] is started with besides its own ports and directory.
#[derive(Default)]
pub struct OwnBrokerOptions {
    /// Listeners beside PLAINTEXT, `NAME://127.0.0.1:PORT,...` (`AGENTBUS_BROKER_LISTENERS`).
    pub listeners: String,
    /// `server.properties` lines added to the generated ones (more listeners, TLS, SASL);
    /// `{dir}` stands for the broker's data directory.
    pub extra_config: String,
    /// Arguments of the storage format (`--add-scram ...`), used by the first start only.
    pub format_args: String,
}

impl OwnBroker {
    /// Starts one on a plain listener. `None` (and a line saying so) when
    /// `AGENTBUS_NO_OWN_BROKER` is set: a machine that runs the suite against an external
    /// Kafka only, without Java for a broker of its own.
    pub async fn start() -> Option<OwnBroker> {
        Self::start_with(OwnBrokerOptions::default()).await
    }

    /// Like [`OwnBroker::start`], with more listeners or format arguments.
    pub async fn start_with(options: OwnBrokerOptions) -> Option<OwnBroker> {
        if std::env::var_os("AGENTBUS_NO_OWN_BROKER").is_some() {
            eprintln!("skipped: AGENTBUS_NO_OWN_BROKER is set, and this test needs its own broker");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let controller_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let extra_config = (!options.extra_config.is_empty()).then(|| {
            let path = dir.path().join("extra.properties");
            let text = options
                .extra_config
                .replace("{dir}", dir.path().to_str().unwrap());
            std::fs::write(&path, text).unwrap();
            path
        });
        let mut broker = OwnBroker {
            addr: String::new(),
            port,
            controller_port,
            dir,
            extra_config,
            format_args: (!options.format_args.is_empty()).then_some(options.format_args),
            listeners: (!options.listeners.is_empty()).then_some(options.listeners),
        };
        broker.addr = broker.run("start").await;
        Some(broker)
    }

    /// `ops/broker.sh ACTION` for this broker.
    pub fn command(&self, action: &str) -> Command {
        let mut cmd = Command::new(root().join("ops/broker.sh"));
        cmd.arg(action)
            .env("AGENTBUS_DATA_DIR", self.dir.path())
            .env("AGENTBUS_BROKER_PORT", self.port.to_string())
            .env(
                "AGENTBUS_BROKER_CONTROLLER_PORT",
                self.controller_port.to_string(),
            )
            .env_remove("AGENTBUS_BROKERS")
            .env_remove("AGENTBUS_BROKER_EXTRA_CONFIG")
            .env_remove("AGENTBUS_BROKER_FORMAT_ARGS")
            .env_remove("AGENTBUS_BROKER_LISTENERS");
        if let Some(listeners) = &self.listeners {
            cmd.env("AGENTBUS_BROKER_LISTENERS", listeners);
        }
        if let Some(path) = &self.extra_config {
            cmd.env("AGENTBUS_BROKER_EXTRA_CONFIG", path);
        }
        if let Some(args) = &self.format_args {
            cmd.env("AGENTBUS_BROKER_FORMAT_ARGS", args);
        }
        cmd
    }

    /// Runs `ops/broker.sh ACTION` (start, stop, status) and returns what it printed;
    /// fails the test when it fails.
    pub async fn run(&self, action: &str) -> String {
        let mut cmd = self.command(action);
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "ops/broker.sh {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// What the broker logged (its process output and, for Kafka, its server log).
    pub fn log(&self) -> String {
        ["kafka/broker.log", "kafka/server.log", "tansu/broker.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.path().join(f)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = self.command("stop").output();
    }
}

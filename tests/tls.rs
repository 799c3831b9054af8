//! Kafka security on Kafka itself: a broker of the test's own terminates TLS (a PEM keystore
//! made here with openssl) on an SSL listener, and authenticates SASL/SCRAM-SHA-512 on a
//! SASL_SSL listener (the user added when its storage is formatted). agentbus publishes, runs
//! an agent and reads lag through each, with the broker's certificate verified; a wrong
//! password or a certificate signed by a CA it does not trust keeps `/readyz` at 503, and no
//! secret is ever logged.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::{agents::*, *};
use serde_json::Value;

const USER: &str = "alice";
/// Distinctive, so that a log line holding it cannot be missed.
const PASSWORD: &str = "Pw-7f3c9e1d-not-for-logs";
const WRONG_PASSWORD: &str = "Wrong-0b5e2a44-not-for-logs";

fn run(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    succeeded(&out);
}

/// A self-signed CA `<name>.pem` (key `<name>.key`).
fn ca(dir: &Path, name: &str) {
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
        ],
        dir,
    );
}

/// The test's CA, a certificate for 127.0.0.1 signed by it, the broker's PEM keystore (its
/// PKCS#8 key, then its certificate) and a second CA that signed nothing of the broker's.
fn certificates(dir: &Path) {
    ca(dir, "ca");
    ca(dir, "other-ca");
    run(
        "openssl",
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "broker.key",
            "-out",
            "broker.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        dir,
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "broker.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "broker.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    );
    let key = std::fs::read_to_string(dir.join("broker.key")).unwrap();
    assert!(
        key.contains("BEGIN PRIVATE KEY"),
        "Kafka's PEM keystore wants a PKCS#8 key"
    );
    let cert = std::fs::read_to_string(dir.join("broker.pem")).unwrap();
    std::fs::write(dir.join("keystore.pem"), format!("{key}{cert}")).unwrap();
}

/// The broker of these tests: PLAINTEXT (for the script), SSL and SASL_SSL listeners.
struct SecureBroker {
    broker: OwnBroker,
    certs: tempfile::TempDir,
    ssl: String,
    sasl_ssl: String,
}

impl SecureBroker {
    async fn start() -> Option<SecureBroker> {
        let certs = tempfile::tempdir().unwrap();
        certificates(certs.path());
        let (ssl, sasl_ssl) = (free_port(), free_port());
        let extra_config = format!(
            "# TLS on both secure listeners, from PEM files (no Java keystore).\n\
             ssl.keystore.type=PEM\n\
             ssl.keystore.location={keystore}\n\
             # SCRAM-SHA-512 on the SASL_SSL listener; its users live in the cluster metadata.\n\
             sasl.enabled.mechanisms=SCRAM-SHA-512\n\
             listener.name.sasl_ssl.sasl.enabled.mechanisms=SCRAM-SHA-512\n\
             listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=\
             org.apache.kafka.common.security.scram.ScramLoginModule required;\n",
            keystore = certs.path().join("keystore.pem").display()
        );
        let broker = OwnBroker::start_with(OwnBrokerOptions {
            listeners: format!("SSL://127.0.0.1:{ssl},SASL_SSL://127.0.0.1:{sasl_ssl}"),
            extra_config,
            format_args: format!("--add-scram SCRAM-SHA-512=[name={USER},password={PASSWORD}]"),
        })
        .await?;
        Some(SecureBroker {
            broker,
            certs,
            ssl: format!("127.0.0.1:{ssl}"),
            sasl_ssl: format!("127.0.0.1:{sasl_ssl}"),
        })
    }

    fn cert(&self, name: &str) -> String {
        self.certs.path().join(name).display().to_string()
    }
}

/// `agentbus serve` through `brokers` with the given security settings, its stderr in a file.
struct Service {
    child: Child,
    url: String,
    log: PathBuf,
    _data: tempfile::TempDir,
}

impl Service {
    fn start(brokers: &str, consumers: Option<&Path>, security: &[(&str, String)]) -> Service {
        let data = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = data.path().join("stderr.log");
        let consumers = consumers
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data.path().join("none"));
        let mut command = Command::new(agentbus_bin());
        command
            .args(["serve", "--brokers", brokers, "--topic-partitions", "1"])
            .args(["--http-addr", &format!("127.0.0.1:{port}")])
            .args(["--data-dir", data.path().to_str().unwrap()])
            .args(["--consumers-dir", consumers.to_str().unwrap()])
            .args(["--schemas-dir", root().join("schemas").to_str().unwrap()])
            .args(["--topic-prefix", &unique_prefix()])
            .args(["--agent-session-timeout", "6s", "--lag-interval", "0s"])
            // Everything agentbus and librdkafka say, to find a secret if one is said.
            .env("AGENTBUS_LOG", "debug")
            .env_remove("AGENTBUS_BROKERS")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        for (name, value) in security {
            command.env(name, value);
        }
        Service {
            child: command.spawn().unwrap(),
            url: format!("http://127.0.0.1:{port}"),
            log,
            _data: data,
        }
    }

    /// Waits for `/readyz` to say 200; its last answer (status, body) either way.
    async fn ready_within(&self, limit: Duration) -> (u16, Value) {
        let deadline = Instant::now() + limit;
        let mut last = (0, Value::Null);
        while Instant::now() < deadline {
            if let Ok(r) = reqwest::get(format!("{}/readyz", self.url)).await {
                let status = r.status().as_u16();
                last = (status, r.json().await.unwrap_or(Value::Null));
                if status == 200 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        last
    }

    /// Stops it and returns all it logged.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn assert_no_secret(log: &str, what: &str) {
    for secret in [PASSWORD, WRONG_PASSWORD] {
        assert!(
            !log.contains(secret),
            "{what}: a password is in the log: {}",
            log.lines().find(|l| l.contains(secret)).unwrap()
        );
    }
}

/// Publishes a task, waits for the agent to handle it and for the agent's lag to read 0
/// with the committed offset at the end: the whole loop through one listener.
async fn the_loop(service: &Service, receiver: &Receiver, agent: &str) {
    let client = reqwest::Client::new();
    let answer = client
        .post(format!("{}/v1/events", service.url))
        .json(&task("secure", "through a secure listener"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    let got = receiver.wait_for(1, Duration::from_secs(60)).await;
    assert_eq!(
        got[0].event["data"]["description"],
        "through a secure listener"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let lag: Value = client
            .get(format!("{}/v1/consumers/{agent}/lag", service.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let partitions = lag["partitions"].as_array().cloned().unwrap_or_default();
        let committed_at_end = !partitions.is_empty()
            && partitions
                .iter()
                .all(|p| p["committed_offset"] == p["end_offset"] && p["lag"] == 0);
        if committed_at_end && partitions.iter().any(|p| p["end_offset"] == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agent's lag did not come to 0 with its offset committed: {lag}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn agent(receiver_url: &str) -> (tempfile::TempDir, String) {
    let consumers = tempfile::tempdir().unwrap();
    let name = format!("secure-{}", uuid::Uuid::new_v4().simple());
    agent_file(consumers.path(), &name, receiver_url, "");
    (consumers, name)
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_runs_an_agent_and_reads_lag_through_kafkas_own_tls_and_scram_listeners() {
    if std::env::var("AGENTBUS_LOCAL_BROKER").is_ok_and(|b| b == "tansu") {
        eprintln!("skipped: tansu 0.6 serves neither TLS nor SASL itself");
        return;
    }
    let Some(broker) = SecureBroker::start().await else {
        return;
    };

    // SSL: the broker's certificate verified against the test's CA.
    let (receiver, url) = Receiver::start().await;
    let (consumers, name) = agent(&url).await;
    let tls = [
        ("AGENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_string()),
        ("AGENTBUS_KAFKA_SSL_CA_LOCATION", broker.cert("ca.pem")),
    ];
    let service = Service::start(&broker.ssl, Some(consumers.path()), &tls);
    let (status, body) = service.ready_within(Duration::from_secs(60)).await;
    assert_eq!(status, 200, "not ready over TLS: {body}");
    the_loop(&service, &receiver, &name).await;
    let log = service.stop();
    assert_no_secret(&log, "ssl");

    // SASL_SSL with SCRAM-SHA-512: TLS as above, and alice's password.
    let (receiver, url) = Receiver::start().await;
    let (consumers, name) = agent(&url).await;
    let scram = [
        ("AGENTBUS_KAFKA_SECURITY_PROTOCOL", "SASL_SSL".to_string()),
        ("AGENTBUS_KAFKA_SSL_CA_LOCATION", broker.cert("ca.pem")),
        ("AGENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".to_string()),
        ("AGENTBUS_KAFKA_SASL_USERNAME", USER.to_string()),
        ("AGENTBUS_KAFKA_SASL_PASSWORD", PASSWORD.to_string()),
    ];
    let service = Service::start(&broker.sasl_ssl, Some(consumers.path()), &scram);
    let (status, body) = service.ready_within(Duration::from_secs(60)).await;
    assert_eq!(status, 200, "not ready over SASL_SSL: {body}");
    the_loop(&service, &receiver, &name).await;
    let metrics = reqwest::get(format!("{}/metrics", service.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_no_secret(&metrics, "/metrics");
    let log = service.stop();
    assert_no_secret(&log, "sasl_ssl");

    // A wrong password: it runs, never becomes ready, says why, and logs neither password.
    let wrong = [
        ("AGENTBUS_KAFKA_SECURITY_PROTOCOL", "sasl_ssl".to_string()),
        ("AGENTBUS_KAFKA_SSL_CA_LOCATION", broker.cert("ca.pem")),
        ("AGENTBUS_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512".to_string()),
        ("AGENTBUS_KAFKA_SASL_USERNAME", USER.to_string()),
        ("AGENTBUS_KAFKA_SASL_PASSWORD", WRONG_PASSWORD.to_string()),
    ];
    let service = Service::start(&broker.sasl_ssl, None, &wrong);
    let (status, body) = service.ready_within(Duration::from_secs(10)).await;
    assert_eq!(status, 503, "ready with a wrong password: {body}");
    assert_eq!(body["checks"]["broker"], false, "{body}");
    assert_no_secret(&body.to_string(), "/readyz");
    let log = service.stop();
    assert!(
        log.contains("Authentication failed"),
        "no log line says that the authentication failed: {log}"
    );
    assert_no_secret(&log, "wrong password");

    // A certificate signed by a CA agentbus does not trust: the same.
    let untrusted = [
        ("AGENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_string()),
        (
            "AGENTBUS_KAFKA_SSL_CA_LOCATION",
            broker.cert("other-ca.pem"),
        ),
    ];
    let service = Service::start(&broker.ssl, None, &untrusted);
    let (status, body) = service.ready_within(Duration::from_secs(10)).await;
    assert_eq!(status, 503, "ready with an untrusted certificate: {body}");
    assert_eq!(body["checks"]["broker"], false, "{body}");
    let log = service.stop();
    assert!(
        log.contains("certificate verify failed"),
        "no log line says that the certificate did not verify: {log}"
    );
    drop(broker.broker);
}

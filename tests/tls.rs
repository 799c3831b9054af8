//! Kafka over TLS: librdkafka settings pass through (`AGENTBUS_KAFKA_*`) and agentbus publishes
//! through a TLS listener, verifying the broker's certificate.
//!
//! tansu 0.6.0 cannot serve TLS itself (its `--cert` and `--key` flags exclude each other), so
//! the test puts a TLS-terminating proxy (socat, OpenSSL) in front of a broker of its own that
//! advertises the proxy's address: every connection agentbus makes is TLS.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use rdkafka::{
    ClientConfig,
    consumer::{BaseConsumer, Consumer},
};
use serde_json::json;

fn run(program: &str, args: &[&str], dir: &Path) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    succeeded(&out);
}

/// A CA and a certificate for 127.0.0.1 signed by it.
fn certificates(dir: &Path) {
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=agentbus-test-ca",
        ],
        dir,
    );
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
}

/// The broker of this test and its TLS proxy; both stopped when dropped.
struct TlsBroker {
    dir: tempfile::TempDir,
    broker_port: u16,
    proxy: Child,
    tls_addr: String,
}

impl TlsBroker {
    fn start() -> TlsBroker {
        if Command::new("socat").arg("-V").output().is_err() {
            let installed = Command::new("apt-get")
                .args(["install", "-y", "-qq", "socat"])
                .status()
                .is_ok_and(|s| s.success());
            assert!(installed, "socat is needed (Debian package socat)");
        }
        let dir = tempfile::tempdir().unwrap();
        certificates(dir.path());
        let (broker_port, tls_port) = (free_port(), free_port());
        let tls_addr = format!("127.0.0.1:{tls_port}");
        let out = Command::new(root().join("ops/broker.sh"))
            .arg("start")
            .env("AGENTBUS_DATA_DIR", dir.path())
            .env("AGENTBUS_BROKER_PORT", broker_port.to_string())
            .env("AGENTBUS_BROKER_ADVERTISED", &tls_addr)
            .env_remove("AGENTBUS_BROKERS")
            .output()
            .unwrap();
        succeeded(&out);
        let proxy = Command::new("socat")
            .arg(format!(
                "openssl-listen:{tls_port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                dir.path().join("broker.pem").display(),
                dir.path().join("broker.key").display()
            ))
            .arg(format!("tcp:127.0.0.1:{broker_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        TlsBroker {
            dir,
            broker_port,
            proxy,
            tls_addr,
        }
    }

    fn ca(&self) -> String {
        self.dir.path().join("ca.pem").display().to_string()
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
        let _ = Command::new(root().join("ops/broker.sh"))
            .arg("stop")
            .env("AGENTBUS_DATA_DIR", self.dir.path())
            .env("AGENTBUS_BROKER_PORT", self.broker_port.to_string())
            .output();
    }
}

/// `agentbus serve` with the given librdkafka security settings; its URL once it listens.
fn serve(broker: &TlsBroker, data: &Path, security: &[(&str, String)]) -> (Child, String) {
    let port = free_port();
    let mut command = Command::new(agentbus_bin());
    command
        .args([
            "serve",
            "--brokers",
            &broker.tls_addr,
            "--topic-partitions",
            "1",
        ])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .args(["--data-dir", data.to_str().unwrap()])
        .args(["--consumers-dir", data.join("none").to_str().unwrap()])
        .args(["--schemas-dir", root().join("schemas").to_str().unwrap()])
        .args(["--topic-prefix", &unique_prefix()])
        .env("AGENTBUS_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (name, value) in security {
        command.env(name, value);
    }
    (command.spawn().unwrap(), format!("http://127.0.0.1:{port}"))
}

async fn ready_within(url: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("{url}/readyz")).await
            && r.status() == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_through_a_tls_listener_with_the_certificate_verified() {
    let broker = TlsBroker::start();
    let data = tempfile::tempdir().unwrap();
    let tls = [
        ("AGENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_string()),
        ("AGENTBUS_KAFKA_SSL_CA_LOCATION", broker.ca()),
    ];
    let (mut service, url) = serve(&broker, data.path(), &tls);
    assert!(
        ready_within(&url, Duration::from_secs(60)).await,
        "agentbus did not become ready over TLS"
    );
    let event = json!({"event_type": "agent.task.requested", "source": "tls-test",
        "data": {"task_id": uuid::Uuid::new_v4(), "agent_id": "a1", "description": "over tls"}});
    let answer = reqwest::Client::new()
        .post(format!("{url}/v1/events"))
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let written: serde_json::Value = answer.json().await.unwrap();
    let _ = service.kill();
    let _ = service.wait();

    // Read it back over TLS too.
    let (addr, ca, topic) = (
        broker.tls_addr.clone(),
        broker.ca(),
        written["topic"].as_str().unwrap().to_string(),
    );
    let id = written["event_id"].as_str().unwrap().to_string();
    let found = tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &addr)
            .set("security.protocol", "ssl")
            .set("ssl.ca.location", &ca)
            .set("group.id", "tls-reader")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
            .unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                return agentbus::consume::header_str(&m.detach(), "ce_id");
            }
        }
        None
    })
    .await
    .unwrap();
    assert_eq!(found.as_deref(), Some(id.as_str()));

    // Without the CA the broker's certificate does not verify: never ready, nothing published.
    let data = tempfile::tempdir().unwrap();
    let untrusted = [("AGENTBUS_KAFKA_SECURITY_PROTOCOL", "ssl".to_string())];
    let (mut service, url) = serve(&broker, data.path(), &untrusted);
    assert!(
        !ready_within(&url, Duration::from_secs(8)).await,
        "ready although the certificate is not trusted"
    );
    let alive = reqwest::get(format!("{url}/healthz")).await.unwrap();
    assert_eq!(
        alive.status(),
        200,
        "it runs, it just cannot reach the broker"
    );
    let _ = service.kill();
    let _ = service.wait();
}

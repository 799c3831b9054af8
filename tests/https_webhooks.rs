//! Webhooks and integration services over HTTPS: a server on 127.0.0.1 with a certificate of
//! a CA made by the test (openssl), trusted through the agent's `ca_file` (or the service's),
//! and refused — retried, then dead-lettered or answered with `integration.call.failed`,
//! never a panic — without it.

mod common;

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, routing::any};
use common::{
    agents::{decoded, records, task},
    *,
};
use serde_json::{Value, json};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    },
};

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    succeeded(&out);
}

/// `ca.pem` and, signed by it, `server.pem`/`server.key` for IP 127.0.0.1.
fn certificates(dir: &Path) {
    openssl(
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
            "/CN=agentbus-webhook-test-ca",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
        dir,
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
        dir,
    );
}

/// A TLS listener for `axum::serve`: hands over connections whose handshake succeeded and
/// counts those whose handshake failed.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: TlsAcceptor,
    failed_handshakes: Arc<AtomicU32>,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((stream, addr)) = self.tcp.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(stream);
            match tokio::time::timeout(Duration::from_secs(5), handshake).await {
                Ok(Ok(tls)) => return (tls, addr),
                _ => {
                    self.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// What the HTTPS server got: the CloudEvents POSTed to `/hook` and the paths called.
#[derive(Clone, Default)]
struct Seen {
    events: Arc<Mutex<Vec<Value>>>,
    calls: Arc<Mutex<Vec<String>>>,
}

/// Starts the HTTPS server; its base URL (`https://127.0.0.1:<port>`).
async fn https_server(dir: &Path, seen: Seen, failed_handshakes: Arc<AtomicU32>) -> String {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", tcp.local_addr().unwrap());
    let listener = TlsListener {
        tcp,
        acceptor: TlsAcceptor::from(Arc::new(config)),
        failed_handshakes,
    };
    let router = Router::new()
        .route(
            "/hook",
            any({
                let seen = seen.clone();
                move |Json(event): Json<Value>| async move {
                    seen.events.lock().unwrap().push(event);
                    Json(json!({}))
                }
            }),
        )
        .route(
            "/api/{*path}",
            any(move |uri: axum::http::Uri| async move {
                seen.calls.lock().unwrap().push(uri.path().to_string());
                "secure pong"
            }),
        );
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    base
}

fn webhook_agent(dir: &Path, name: &str, url: &str, ca_file: Option<&Path>) {
    let ca = ca_file
        .map(|p| format!("ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    std::fs::write(
        dir.join(format!("{name}.toml")),
        format!(
            "name = \"{name}\"\nsubscribe = [\"agent.task.*\"]\nconcurrency = 2\n\
             [handler]\nkind = \"webhook\"\nurl = \"{url}\"\ntimeout = \"5s\"\n{ca}\
             [retry]\nattempts = 3\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\nmax_hold = \"2s\"\n"
        ),
    )
    .unwrap();
}

#[tokio::test]
async fn a_webhook_behind_a_private_ca_gets_events_over_https_with_the_agents_ca_file_and_is_dead_lettered_without()
 {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let seen = Seen::default();
    let failed_handshakes = Arc::new(AtomicU32::new(0));
    let base = https_server(certs.path(), seen.clone(), failed_handshakes.clone()).await;

    let consumers = tempfile::tempdir().unwrap();
    let id = uuid::Uuid::new_v4().simple().to_string();
    let trusting = format!("trusting-{id}");
    let untrusting = format!("untrusting-{id}");
    let hook = format!("{base}/hook");
    // A relative ca_file is relative to the definition's directory.
    std::fs::copy(certs.path().join("ca.pem"), consumers.path().join("ca.pem")).unwrap();
    webhook_agent(
        consumers.path(),
        &trusting,
        &hook,
        Some(Path::new("ca.pem")),
    );
    webhook_agent(consumers.path(), &untrusting, &hook, None);
    let app = spawn(Options {
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;

    let event = task("tls-agent", "over https");
    let answer = app.post(&event).await;
    assert_eq!(answer.status(), 200);
    let event_id = answer.json::<Value>().await.unwrap()["event_id"].clone();

    // The agent with the CA file delivers it over TLS, once.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.events.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook got nothing over https"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = seen.events.lock().unwrap()[0].clone();
    assert_eq!(got["id"], event_id);
    assert_eq!(got["data"]["description"], "over https");

    // The agent without it cannot complete a handshake: retried, then dead-lettered as a
    // connection failure that says why.
    let dead = records(&app, &format!("{}{untrusting}.dlq", app.prefix), 1).await;
    assert_eq!(
        header(&dead[0], "ce_id"),
        event_id.as_str().map(String::from)
    );
    assert_eq!(
        header(&dead[0], "agentbus-error-kind").as_deref(),
        Some("connection")
    );
    assert_eq!(header(&dead[0], "agentbus-attempts").as_deref(), Some("3"));
    let message = header(&dead[0], "agentbus-error-message").unwrap();
    assert!(message.to_lowercase().contains("certificate"), "{message}");
    assert!(
        failed_handshakes.load(Ordering::SeqCst) >= 3,
        "every attempt was refused at the handshake"
    );
    assert_eq!(
        seen.events.lock().unwrap().len(),
        1,
        "only the trusting agent got through"
    );
    // The service is still whole.
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert_eq!(app.post(&task("tls-agent", "second")).await.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.events.lock().unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second event did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_integration_service_behind_a_private_ca_is_called_over_https_with_its_ca_file() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let seen = Seen::default();
    let failed_handshakes = Arc::new(AtomicU32::new(0));
    let base = https_server(certs.path(), seen.clone(), failed_handshakes.clone()).await;

    let consumers = tempfile::tempdir().unwrap();
    let name = format!("tls-integrations-{}", uuid::Uuid::new_v4().simple());
    let ca = certs.path().join("ca.pem");
    std::fs::write(
        consumers.path().join("integration.toml"),
        format!(
            "name = \"{name}\"\nsubscribe = [\"integration.call.requested\"]\nconcurrency = 1\n\
             [handler]\nkind = \"integration\"\n\
             [handler.services.private]\nbase_url = \"{base}/api\"\ntimeout = \"5s\"\nca_file = \"{}\"\n\
             [handler.services.untrusted]\nbase_url = \"{base}/api\"\ntimeout = \"5s\"\n\
             [retry]\nattempts = 2\ninitial_backoff = \"50ms\"\nmax_backoff = \"100ms\"\n",
            ca.display()
        ),
    )
    .unwrap();
    let app = spawn(Options {
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    for service in ["private", "untrusted"] {
        let call = json!({
            "event_type": "integration.call.requested", "source": "t", "partition_key": "tls",
            "data": {"call_id": uuid::Uuid::new_v4(), "service": service, "method": "GET",
                     "path": format!("/{service}")}
        });
        assert_eq!(app.post(&call).await.status(), 200);
    }
    let results: Vec<(String, Value)> = decoded(&app, &app.topic("integration"), 4)
        .await
        .into_iter()
        .filter(|(t, _)| t != "integration.call.requested")
        .collect();
    assert_eq!(results.len(), 2, "{results:?}");
    let (ok_type, ok) = &results[0];
    assert_eq!(ok_type, "integration.call.succeeded", "{ok}");
    assert_eq!(ok["response_body"], "secure pong");
    let (failed_type, failed) = &results[1];
    assert_eq!(failed_type, "integration.call.failed", "{failed}");
    assert_eq!(failed["error_kind"], "connection");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("certificate"),
        "{failed}"
    );
    assert_eq!(*seen.calls.lock().unwrap(), ["/api/private"]);
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_read_stops_the_start_naming_the_file_and_the_field() {
    let consumers = tempfile::tempdir().unwrap();
    webhook_agent(
        consumers.path(),
        "no-such-ca",
        "https://127.0.0.1:1/hook",
        Some(Path::new("/nonexistent/private-ca.pem")),
    );
    let out = Command::new(agentbus_bin())
        .args(["agent", "run", "no-such-ca"])
        .env("AGENTBUS_BROKERS", "127.0.0.1:1")
        .env("AGENTBUS_CONSUMERS_DIR", consumers.path())
        .env("AGENTBUS_SCHEMAS_DIR", root().join("schemas"))
        .env("AGENTBUS_DATA_DIR", consumers.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-ca.toml")
            && stderr.contains("handler.ca_file")
            && stderr.contains("/nonexistent/private-ca.pem"),
        "{stderr}"
    );
}

//! Overload: past its limit of publishes in flight the service refuses more at once (503 with
//! `Retry-After`, nothing written) instead of queueing them, and the publishes it took finish.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::Message;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

fn agent_created(agent_id: &str) -> Value {
    json!({
        "event_type": "agent.created",
        "event_version": 1,
        "source": "daa-service",
        "event_id": uuid::Uuid::new_v4().to_string(),
        "data": {"agent_id": agent_id, "type": "researcher", "cognitive_pattern": "systems", "created_by": "user123"}
    })
}

/// A publish whose body arrives in two parts: the first now, the rest when told. Until then
/// it holds one of the service's publish slots, as a publish waiting for a slow broker does.
struct HeldPublish {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl HeldPublish {
    async fn start(url: &str, body: &Value) -> HeldPublish {
        let addr = url.trim_start_matches("http://");
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = serde_json::to_vec(body).unwrap();
        let head = format!(
            "POST /v1/events HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let (first, rest) = body.split_at(body.len() / 2);
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(first).await.unwrap();
        stream.flush().await.unwrap();
        HeldPublish {
            stream,
            rest: rest.to_vec(),
        }
    }

    /// Sends the rest of the body; the status line and body of the answer.
    async fn finish(mut self) -> (String, String) {
        self.stream.write_all(&self.rest).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            self.stream.read_to_string(&mut answer),
        )
        .await
        .expect("an answer within 30 s")
        .unwrap();
        let status = answer.lines().next().unwrap_or_default().to_string();
        let body = answer
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (status, body)
    }
}

/// Waits until every publish slot of `app` is taken: until a probe (a publish that is not
/// valid, so that it writes nothing when it does get a slot) is refused with 503.
async fn wait_until_full(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = app.post(&json!({"not": "an envelope"})).await;
        if response.status() == 503 {
            return;
        }
        assert_eq!(response.status(), 400, "a probe that got a slot is invalid");
        assert!(
            Instant::now() < deadline,
            "the held publishes never took every slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of an unlabelled metric in a Prometheus scrape.
fn metric(scrape: &str, name: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn past_its_publishes_in_flight_the_service_refuses_at_once_with_503_and_loses_nothing() {
    let app = spawn(Options {
        extra: vec!["--max-publishes-in-flight".into(), "2".into()],
        ..Options::default()
    })
    .await;
    let topic = app.topic("agent");

    // Two publishes take both slots and stay in flight (their bodies half sent).
    let held_events = [agent_created("held-1"), agent_created("held-2")];
    let mut held = Vec::new();
    for event in &held_events {
        held.push(HeldPublish::start(&app.url, event).await);
    }
    wait_until_full(&app).await;

    // Twenty more, all at once: each refused quickly, with Retry-After, and nothing written.
    let refused_events: Vec<Value> = (0..20)
        .map(|i| agent_created(&format!("refused-{i}")))
        .collect();
    let answers = futures::future::join_all(refused_events.iter().map(|event| {
        let (client, url) = (app.client.clone(), format!("{}/v1/events", app.url));
        async move {
            let sent = Instant::now();
            let response = client.post(url).json(event).send().await.unwrap();
            let took = sent.elapsed();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            (status, retry_after, body, took)
        }
    }))
    .await;
    for (status, retry_after, body, took) in &answers {
        assert_eq!(*status, 503, "{body}");
        assert_eq!(body["error"]["code"], "broker_unavailable", "{body}");
        let seconds: u64 = retry_after
            .as_deref()
            .expect("a Retry-After")
            .parse()
            .unwrap();
        assert!(seconds >= 1, "Retry-After {seconds}");
        assert!(
            *took < Duration::from_millis(500),
            "a refusal took {took:?}: it should not wait for a slot"
        );
    }
    let scrape = app.get("/metrics").await.text().await.unwrap();
    assert!(
        metric(&scrape, "agentbus_http_requests_shed_total").unwrap_or(0.0) >= 20.0,
        "{scrape}"
    );

    // The held publishes go through once their bodies arrive, and free their slots.
    for h in held {
        let (status, body) = h.finish().await;
        assert!(status.contains(" 200 "), "{status}: {body}");
    }
    let after = agent_created("after");
    let response = app.post(&after).await;
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    // In Kafka: exactly the three accepted events, none of the refused ones.
    let brokers = app.brokers.clone();
    let records = tokio::task::spawn_blocking(move || {
        let records = read_records(&brokers, &topic, 3);
        assert_eq!(
            record_count(&brokers, &topic),
            3,
            "only the accepted events"
        );
        records
    })
    .await
    .unwrap();
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| {
            use rdkafka::message::Headers;
            let headers = r.headers().expect("headers");
            let id = headers
                .iter()
                .find(|h| h.key == "ce_id")
                .and_then(|h| h.value)
                .expect("a ce_id");
            String::from_utf8(id.to_vec()).unwrap()
        })
        .collect();
    ids.sort();
    let mut expected: Vec<String> = held_events
        .iter()
        .chain([&after])
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    expected.sort();
    assert_eq!(ids, expected);
}

/// A request that is not a publish never waits for a publish slot: health and metrics stay
/// answered while publishes are at their limit.
#[tokio::test]
async fn reads_are_answered_while_publishes_are_at_their_limit() {
    let app = spawn(Options {
        extra: vec!["--max-publishes-in-flight".into(), "1".into()],
        ..Options::default()
    })
    .await;
    let held = HeldPublish::start(&app.url, &agent_created("held")).await;
    wait_until_full(&app).await;
    for path in ["/healthz", "/readyz", "/v1/schemas", "/metrics"] {
        assert_eq!(app.get(path).await.status(), 200, "{path}");
    }
    let (status, body) = held.finish().await;
    assert!(status.contains(" 200 "), "{status}: {body}");
}

/// One `GET /healthz` on `stream` (kept alive): the status code and the body of the answer.
async fn healthz_on(stream: &mut TcpStream) -> (u16, String, String) {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: agentbus\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let head = text[..end].to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if text.len() >= end + 4 + length {
                    let status = text[9..12].parse().unwrap();
                    return (status, head, text[end + 4..end + 4 + length].to_string());
                }
            }
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "the connection closed before a whole answer: {text:?}"
            );
            got.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s")
}

/// Past its limit of open connections the server answers a new one at once with the JSON
/// 503 and `Retry-After`, and closes it; the connections it holds keep working, and a
/// connection closed frees its slot.
#[tokio::test]
async fn past_its_open_connections_a_new_one_is_answered_503_at_once_and_the_others_keep_working() {
    let app = spawn(Options {
        extra: vec!["--max-connections".into(), "3".into()],
        ..Options::default()
    })
    .await;
    let addr = app.url.trim_start_matches("http://").to_string();
    // The test's own HTTP client may hold a pooled connection or two: open connections, each
    // answered on keep-alive, until one is refused.
    let mut held = Vec::new();
    let refused = loop {
        assert!(
            held.len() <= 3,
            "more connections than the limit were served"
        );
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        let sent = Instant::now();
        let (status, head, body) = healthz_on(&mut stream).await;
        if status == 503 {
            break (head, body, sent.elapsed(), stream);
        }
        assert_eq!(status, 200, "{head}");
        held.push(stream);
    };
    let (head, body, took, mut stream) = refused;
    assert!(!held.is_empty(), "not one connection was served");
    assert!(took < Duration::from_secs(1), "refused after {took:?}");
    assert!(head.contains("retry-after: 2"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "broker_unavailable", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("limit of 3 open connections"),
        "{body}"
    );
    // The refused connection is closed by the server.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the refused connection stayed open");
    // The held ones still answer.
    for stream in &mut held {
        assert_eq!(healthz_on(stream).await.0, 200);
    }
    // One closed: its slot goes to a new connection.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        if healthz_on(&mut stream).await.0 == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a freed slot was never taken again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

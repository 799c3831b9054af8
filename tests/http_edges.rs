//! The HTTP API at its edges, as clients agentbus did not write meet it (issue 10): names
//! Kafka cannot have, times out of range, methods a path does not take, bodies over the
//! limit (and clients that write the whole body before they read), events larger than the
//! broker takes, and dead letters read a page at a time.

mod common;

use std::{
    io::{Read, Write},
    time::Duration,
};

use common::*;
use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
    producer::{FutureProducer, FutureRecord},
};
use serde_json::{Value, json};

/// The error answer's code, asserting the contract's shape on the way.
async fn error_code(response: reqwest::Response) -> (u16, String, Value) {
    let status = response.status().as_u16();
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("a {status} answer that is not JSON: {e}"));
    let error = &body["error"];
    assert!(
        error["code"].is_string() && error["message"].is_string() && error["details"].is_array(),
        "not the contract's error shape: {body}"
    );
    (status, error["code"].as_str().unwrap().to_string(), body)
}

// --- 1: consumer group names -------------------------------------------------------------

#[tokio::test]
async fn a_consumer_group_name_kafka_cannot_have_is_a_400_never_a_5xx() {
    let app = spawn_app().await;
    // Found by schemathesis: %0D answered 503 "Client creation error", %00 503 "FFI nul
    // error".
    for path in [
        "/v1/consumers/%0D/lag",
        "/v1/consumers/%00/lag",
        "/v1/consumers/a%0Ab/lag",
        "/v1/dlq/%00",
        "/v1/dlq/%0D",
    ] {
        let (status, code, body) = error_code(app.get(path).await).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_parameter"),
            "{path}: {body}"
        );
        assert_eq!(body["error"]["details"][0]["path"], "path:group", "{path}");
    }
    let long = "g".repeat(256);
    let (status, code, _) = error_code(app.get(&format!("/v1/consumers/{long}/lag")).await).await;
    assert_eq!((status, code.as_str()), (400, "invalid_parameter"));
    let redrive = app
        .client
        .post(format!("{}/v1/dlq/%00/redrive", app.url))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_code(redrive).await;
    assert_eq!((status, code.as_str()), (400, "invalid_parameter"));
    // A name a group can have but no group has is still a 404.
    let (status, _, _) = error_code(app.get("/v1/consumers/no-such-group/lag").await).await;
    assert_eq!(status, 404);
}

// --- 6: times out of range ---------------------------------------------------------------

#[tokio::test]
async fn a_replay_from_a_time_out_of_range_is_a_400_with_the_reason() {
    let app = spawn_app().await;
    for (field, value) in [
        ("from", "1000000years"),
        ("from", "99999999999999999999years"),
        ("from", "9999-12-31T23:59:59-01:00"),
        ("until", "584542046090years"),
    ] {
        let mut body = json!({"from": "1h", "to_agent": "someone"});
        body[field] = json!(value);
        let response = app
            .client
            .post(format!("{}/v1/replays", app.url))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{field}={value}: no answer ({e})"));
        let (status, code, body) = error_code(response).await;
        assert_eq!((status, code.as_str()), (400, "invalid_envelope"), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(field) && message.contains("out of range"),
            "{message}"
        );
    }
    // The edges of the range are times like any other; before Kafka's first timestamp (1970)
    // they mean "from the beginning".
    for from in ["0000-01-01T00:00:00Z", "1960-01-01T00:00:00Z", "2000years"] {
        let response = app
            .client
            .post(format!("{}/v1/replays", app.url))
            .json(&json!({"from": from, "topic": app.topic("agent"), "into_topic": app.topic("workflow")}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 202, "from {from}: {body}");
        // The job runs, and does not fail on the time.
        let id = body["id"].as_str().unwrap().to_string();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let job: Value = app.get_json(&format!("/v1/replays/{id}")).await;
            if job["status"] != "running" {
                assert_eq!(job["status"], "succeeded", "from {from}: {job}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "still running: {job}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The service is still there.
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[test]
fn the_cli_refuses_a_time_out_of_range_instead_of_panicking() {
    let out = std::process::Command::new(agentbus_bin())
        .args([
            "replay",
            "--from",
            "1000000years",
            "--to-agent",
            "x",
            "--brokers",
            "127.0.0.1:1",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a usage error, not a panic: {stderr}"
    );
    assert!(stderr.contains("out of range"), "{stderr}");
}

// --- 7: 405 and the one body limit ---------------------------------------------------------

#[tokio::test]
async fn a_method_a_path_does_not_take_is_a_json_405_with_allow() {
    let app = spawn_app().await;
    for (method, path, allowed) in [
        (reqwest::Method::GET, "/v1/events", "POST"),
        (reqwest::Method::POST, "/v1/schemas", "GET"),
        (reqwest::Method::DELETE, "/v1/replays", "POST"),
        (reqwest::Method::PUT, "/v1/dlq/someone", "GET"),
    ] {
        let response = app
            .client
            .request(method.clone(), format!("{}{path}", app.url))
            .send()
            .await
            .unwrap();
        let allow = response
            .headers()
            .get("allow")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let (status, code, _) = error_code(response).await;
        assert_eq!(
            (status, code.as_str()),
            (405, "method_not_allowed"),
            "{method} {path}"
        );
        assert!(allow.contains(allowed), "{method} {path}: Allow {allow:?}");
    }
}

#[tokio::test]
async fn every_endpoint_answers_a_body_over_the_limit_with_a_json_413() {
    let app = spawn_app().await;
    // 1.5 MB is over the limit (1 MiB) and under axum's own default (2 MB); 3 MB is over both.
    for size in [1_500_000, 3_000_000] {
        for path in [
            "/v1/events",
            "/v1/replays",
            "/v1/dlq/someone/redrive",
            "/demo/agents/demo",
        ] {
            let body = format!("{{\"from\": \"{}\"}}", "x".repeat(size));
            let response = app
                .client
                .post(format!("{}{path}", app.url))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            let (status, code, body) = error_code(response).await;
            assert_eq!(
                (status, code.as_str()),
                (413, "payload_too_large"),
                "{path} {size}: {body}"
            );
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("1048576")
            );
        }
    }
    // Without Content-Length (chunked), the limit holds the same.
    let chunked = raw_request(
        &app.url,
        "POST /v1/replays HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        |stream| {
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..20 {
                write!(stream, "{:x}\r\n", chunk.len())?;
                stream.write_all(&chunk)?;
                stream.write_all(b"\r\n")?;
            }
            stream.write_all(b"0\r\n\r\n")
        },
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    assert!(chunked.contains("\"payload_too_large\""), "{chunked}");
}

// --- 9: clients that write the whole body before they read -------------------------------

/// Sends `head`, then lets `body` write, then reads the whole answer (blocking, on a thread).
async fn raw_request(
    url: &str,
    head: &str,
    body: impl FnOnce(&mut std::net::TcpStream) -> std::io::Result<()> + Send + 'static,
) -> String {
    let addr = url.trim_start_matches("http://").to_string();
    let head = head.to_string();
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.write_all(head.as_bytes()).unwrap();
        body(&mut stream).unwrap_or_else(|e| panic!("writing the body failed: {e}"));
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_client_that_writes_a_20_mib_body_before_reading_gets_the_413() {
    let app = spawn_app().await;
    let size = 20 * 1024 * 1024;
    // Python's urllib, as the user who found it ran it.
    let script = r#"
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1] + "/v1/events", data=b" " * (20 * 1024 * 1024),
    headers={"Content-Type": "application/json"}, method="POST")
try:
    urllib.request.urlopen(req, timeout=60)
    print("no error")
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode())
except Exception as e:
    print("failed:", repr(e))
"#;
    let url = app.url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", script, &url])
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.starts_with("413 ") && printed.contains("payload_too_large"),
        "urllib got: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A raw client: the whole 20 MiB, then the answer.
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {size}\r\n\r\n"
    );
    let answer = raw_request(&app.url, &head, move |stream| {
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..20 {
            stream.write_all(&chunk)?;
        }
        Ok(())
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
}

/// Review of issue 10, finding 13: the access check answers before the body limit; its 401 to a
/// client that writes a 20 MiB body before reading must reach the client too.
#[tokio::test]
async fn a_client_without_a_key_that_writes_a_20_mib_body_before_reading_gets_the_401() {
    let out = std::process::Command::new(agentbus_bin())
        .args(["keys", "new", "--name", "someone", "--scope", "publish"])
        .output()
        .unwrap();
    let text = succeeded(&out);
    let (_, entry) = text.split_once('\n').unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), entry).unwrap();
    let app = spawn(Options {
        extra: vec!["--api-keys".into(), file.path().display().to_string()],
        ..Options::default()
    })
    .await;
    let size = 20 * 1024 * 1024;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Connection: close\r\nContent-Length: {size}\r\n\r\n"
    );
    let answer = raw_request(&app.url, &head, move |stream| {
        let chunk = vec![b' '; 1024 * 1024];
        for _ in 0..20 {
            stream.write_all(&chunk)?;
        }
        Ok(())
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("unauthorized"), "{answer}");
}

// --- 5: events larger than the broker takes ----------------------------------------------

fn big_task(description_chars: usize) -> Value {
    json!({
        "event_type": "agent.task.requested", "source": "planner",
        "data": {"task_id": uuid::Uuid::new_v4(), "agent_id": "a1",
                 "description": "d".repeat(description_chars)}
    })
}

#[tokio::test]
async fn an_event_larger_than_the_producer_takes_is_a_413_naming_the_limit() {
    let app = spawn_app().await;
    // Under the 1 MiB body limit, over librdkafka's message.max.bytes (1 000 000).
    let response = app.post(&big_task(1_000_000)).await;
    let (status, code, body) = error_code(response).await;
    assert_eq!(
        (status, code.as_str()),
        (413, "payload_too_large"),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("1000000"), "names the limit: {message}");
    assert_eq!(body["error"]["details"][0]["path"], "data");
    // In a batch: the item is named, nothing is written.
    let response = app.post(&json!([big_task(10), big_task(1_000_000)])).await;
    let (status, _, body) = error_code(response).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["details"][0]["path"], "[1].data");
    let topic = app.topic("agent");
    let brokers = app.brokers.clone();
    let written = tokio::task::spawn_blocking(move || record_count(&brokers, &topic))
        .await
        .unwrap();
    assert_eq!(written, 0, "nothing of the batch was written");
}

/// Creates `<prefix>agent.events` with `partitions` before the service starts, with a small
/// `max.message.bytes`; its name.
async fn agent_events_taking_at_most(
    prefix: &str,
    partitions: i32,
    max_message_bytes: u32,
) -> String {
    let topic = format!("{prefix}agent.events");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let limit = max_message_bytes.to_string();
    let results = admin
        .create_topics(
            &[
                NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))
                    .set("max.message.bytes", &limit),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    results[0].as_ref().unwrap();
    topic
}

#[tokio::test]
async fn an_event_larger_than_its_topic_takes_is_a_413_naming_the_topic_limit() {
    // The topic exists before the service starts, with a small max.message.bytes.
    let prefix = unique_prefix();
    let topic = agent_events_taking_at_most(&prefix, 2, 20_000).await;
    // Uncompressed: the topic's limit applies to the record as it is. (With a codec the
    // broker judges the compressed batch, and an event that compresses below the limit is
    // written; agentbus then checks only the producer's limit up front.)
    let app = spawn(Options {
        prefix,
        extra: vec!["--compression".into(), "none".into()],
        ..Options::default()
    })
    .await;
    let (status, code, body) = error_code(app.post(&big_task(30_000)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (413, "payload_too_large"),
        "{body}"
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("max.message.bytes 20000") && message.contains(&topic),
        "names the topic's limit: {message}"
    );
    // Under it: written.
    assert_eq!(app.post(&big_task(10_000)).await.status(), 200);
}

/// With a codec on (lz4, the default) the broker judges the compressed batch, so only the
/// producer's limit is checked before producing; an event that does not compress below the
/// topic's limit is refused by the broker and must still be a 413, never a 503 retried forever.
#[tokio::test]
async fn a_compressed_event_over_its_topic_limit_is_a_413_not_a_503() {
    let prefix = unique_prefix();
    agent_events_taking_at_most(&prefix, 2, 20_000).await;
    let app = spawn(Options {
        prefix,
        ..Options::default()
    })
    .await;
    // 60 000 characters that lz4 cannot shrink to 20 000 bytes (a fixed-seed generator).
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let noise: String = (0..60_000)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
            alphabet[(state >> 33) as usize % alphabet.len()] as char
        })
        .collect();
    let mut event = big_task(0);
    event["data"]["description"] = json!(noise);
    let (status, code, body) = error_code(app.post(&event).await).await;
    assert_eq!(
        (status, code.as_str()),
        (413, "payload_too_large"),
        "{body}"
    );
    // A compressible event of the same size fits once compressed: written.
    assert_eq!(app.post(&big_task(60_000)).await.status(), 200);
}

/// Review of issue 10, finding 4: the broker refuses a record *batch* larger than the topic's
/// max.message.bytes; events that each fit are not "too large" (413, never retried) but a 503.
#[tokio::test]
async fn a_batch_of_events_that_each_fit_but_not_together_is_a_503_not_a_413() {
    let prefix = unique_prefix();
    // One partition: the events share a record batch.
    agent_events_taking_at_most(&prefix, 1, 20_000).await;
    // Uncompressed, so that the batch is as large on the wire as its events.
    let app = spawn(Options {
        prefix,
        extra: vec!["--compression".into(), "none".into()],
        ..Options::default()
    })
    .await;
    // Each about 9 kB (under the 20 000), 45 kB together.
    let batch: Vec<Value> = (0..5).map(|_| big_task(9_000)).collect();
    let (status, code, body) = error_code(app.post(&json!(batch)).await).await;
    assert_eq!(
        (status, code.as_str()),
        (503, "broker_unavailable"),
        "{body}"
    );
    // Alone, each is written.
    assert_eq!(app.post(&big_task(9_000)).await.status(), 200);
}

// --- 8: dead letters a page at a time ------------------------------------------------------

/// Writes `n` dead letters to `topic` over its partitions: the first `old` with an old
/// timestamp, the rest an hour later.
async fn dead_letters(topic: &str, n: usize, old: usize, old_ms: i64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for i in 0..n {
        let id = format!("dead-{i}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_type",
                value: Some("agent.task.requested"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(&id),
            })
            .insert(Header {
                key: "agentbus-error-kind",
                value: Some("http_status"),
            });
        let ms = if i < old { old_ms } else { old_ms + 3_600_000 };
        producer
            .send(
                FutureRecord::to(topic)
                    .partition((i % 3) as i32)
                    .key("k")
                    .payload("not avro")
                    .timestamp(ms)
                    .headers(headers),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn dead_letters_are_read_a_page_at_a_time_with_a_cursor_that_reaches_each_once() {
    let name = format!("paged-{}", uuid::Uuid::new_v4().simple());
    let prefix = unique_prefix();
    let dlq = format!("{prefix}{name}.dlq");
    common::agents::create_topic(&brokers(), &dlq, 3).await;
    let old_ms = chrono::Utc::now().timestamp_millis() - 7_200_000;
    dead_letters(&dlq, 25, 10, old_ms).await;
    let consumers = tempfile::tempdir().unwrap();
    std::fs::write(
        consumers.path().join(format!("{name}.toml")),
        format!("name = \"{name}\"\nsubscribe = [\"workflow.*\"]\n[handler]\nkind = \"noop\"\n"),
    )
    .unwrap();
    let app = spawn(Options {
        prefix: prefix.clone(),
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;

    // Pages of 10 until no `next`: 10, 10, 5, each dead letter once.
    let mut seen = std::collections::BTreeSet::new();
    let mut pages = Vec::new();
    let mut path = format!("/v1/dlq/{name}?limit=10");
    loop {
        let response = app.get(&path).await;
        assert_eq!(response.status(), 200);
        let page: Value = response.json().await.unwrap();
        let letters = page["dead_letters"].as_array().unwrap();
        pages.push(letters.len());
        for d in letters {
            assert!(
                seen.insert((d["dlq_partition"].as_i64(), d["dlq_offset"].as_i64())),
                "{d} twice"
            );
        }
        match page["next"].as_str() {
            Some(next) => path = format!("/v1/dlq/{name}?limit=10&after={next}"),
            None => break,
        }
    }
    assert_eq!(pages, [10, 10, 5]);
    assert_eq!(seen.len(), 25);

    // The default page holds them all; `since` starts at the first one at or after a time.
    let all: Value = app.get_json(&format!("/v1/dlq/{name}")).await;
    assert_eq!(all["dead_letters"].as_array().unwrap().len(), 25);
    assert!(all.get("next").is_none(), "{all}");
    let since = chrono::DateTime::from_timestamp_millis(old_ms + 1_800_000)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let later: Value = app
        .get_json(&format!(
            "/v1/dlq/{name}?since={}",
            since.replace('+', "%2B")
        ))
        .await;
    assert_eq!(
        later["dead_letters"].as_array().unwrap().len(),
        15,
        "{later}"
    );

    // Before Kafka's first timestamp (found by schemathesis: 503 "Set partition offset
    // error"): from the beginning.
    let early: Value = app
        .get_json(&format!(
            "/v1/dlq/{name}?since=0158-10-28T12%3A17%3A44%2B18%3A02"
        ))
        .await;
    assert_eq!(
        early["dead_letters"].as_array().unwrap().len(),
        25,
        "{early}"
    );

    // Out of range or malformed: 400.
    for query in [
        "limit=0",
        "limit=1001",
        "limit=ten",
        "after=nonsense",
        "after=0:-1",
        "since=yesterday",
        "since=2026-01-01T00:00:00Z&after=0:1",
    ] {
        let (status, code, body) =
            error_code(app.get(&format!("/v1/dlq/{name}?{query}")).await).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "invalid_parameter"),
            "{query}: {body}"
        );
    }

    // The CLI pages the same way.
    let (n, p) = (name.clone(), prefix.clone());
    let cli = move |extra: &[&str]| {
        let mut args = vec![
            "dlq".to_string(),
            "list".into(),
            n.clone(),
            "--brokers".into(),
            brokers(),
            "--topic-prefix".into(),
            p.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        std::process::Command::new(agentbus_bin())
            .args(args)
            .output()
            .unwrap()
    };
    let (first, all_pages) = tokio::task::spawn_blocking(move || {
        (cli(&["--limit", "10"]), cli(&["--limit", "10", "--all"]))
    })
    .await
    .unwrap();
    let first = succeeded(&first);
    assert_eq!(first.matches("agent.task.requested").count(), 10, "{first}");
    let next = first
        .lines()
        .find_map(|l| l.strip_prefix("next: "))
        .unwrap_or_else(|| panic!("no next cursor printed: {first}"));
    assert!(!next.is_empty());
    let all_pages = succeeded(&all_pages);
    assert_eq!(
        all_pages.matches("agent.task.requested").count(),
        25,
        "{all_pages}"
    );
    assert!(all_pages.contains("25 dead letters"), "{all_pages}");

    // Redrive still sends every one back (reading in bounded batches).
    let redriven: Value = app
        .client
        .post(format!("{}/v1/dlq/{name}/redrive", app.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(redriven["redriven"], 25, "{redriven}");
}

// --- review of issue 10, finding 6: names that reach librdkafka ------------------------------

#[tokio::test]
async fn replay_names_kafka_cannot_have_are_a_400_never_a_503_or_a_panic() {
    let app = spawn_app().await;
    let topic = app.topic("agent");
    let copy = app.topic("workflow");
    let bad = [
        (
            "topic",
            json!({"from": "1h", "topic": "a\u{0}b", "into_topic": copy}),
        ),
        (
            "topics",
            json!({"from": "1h", "topics": [topic, "x\u{0}"], "into_topic": copy}),
        ),
        (
            "topics",
            json!({"from": "1h", "topics": ["with space"], "into_topic": copy}),
        ),
        (
            "into_topic",
            json!({"from": "1h", "topic": topic, "into_topic": "c\u{0}py"}),
        ),
        (
            "into_topic",
            json!({"from": "1h", "topic": topic, "into_topic": "t".repeat(250)}),
        ),
        (
            "to_agent",
            json!({"from": "1h", "topic": topic, "to_agent": "ag\u{0}ent"}),
        ),
        (
            "to_agent",
            json!({"from": "1h", "topic": topic, "to_agent": "ag/ent"}),
        ),
        (
            "replay_id",
            json!({"from": "1h", "topic": topic, "into_topic": copy, "replay_id": "a\tb"}),
        ),
        (
            "replay_id",
            json!({"from": "1h", "topic": topic, "into_topic": copy, "replay_id": "r".repeat(201)}),
        ),
    ];
    for (field, body) in bad {
        let response = app
            .client
            .post(format!("{}/v1/replays", app.url))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{body}: no answer ({e})"));
        let (status, _, answer) = error_code(response).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        let expected_field = if field == "topic" { "topics" } else { field };
        assert!(message.starts_with(expected_field), "{body}: {message}");
    }
    // Still serving, and a good name is still accepted.
    let response = app
        .client
        .post(format!("{}/v1/replays", app.url))
        .json(&json!({"from": "1h", "topic": topic, "into_topic": copy, "replay_id": "fine id"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

/// A client whose body is still arriving when the request timeout passes gets `408
/// request_timeout` (its own slowness, no `Retry-After`), not `503 broker_unavailable`: the
/// broker is fine.
#[tokio::test]
async fn a_body_still_arriving_at_the_request_timeout_gets_408_not_broker_unavailable() {
    let app = spawn(Options {
        extra: vec!["--request-timeout".into(), "2s".into()],
        ..Options::default()
    })
    .await;
    let head = "POST /v1/events HTTP/1.1\r\nHost: agentbus\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\nConnection: close\r\n\r\n";
    let answer = raw_request(&app.url, head, |stream| {
        // One byte every 300 ms: 30 bytes take 9 s, far past the 2 s timeout, and the body
        // is never whole. The service may close the connection once it answered.
        for _ in 0..30 {
            if stream.write_all(b" ").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    })
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("retry-after"),
        "{answer}"
    );
    app.stop().await;
}

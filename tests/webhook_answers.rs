//! Whatever a webhook or an integration service answers, the handler ends in one of its
//! defined outcomes and never panics: arbitrary status lines, `Retry-After` values (seconds
//! up to and past `u64::MAX`, HTTP-dates, garbage, bytes that are not UTF-8), bodies (empty,
//! invalid JSON, follow-up lists of any length, over the 1 MiB bound), framings (exact,
//! lying `Content-Length`, chunked, close-delimited) and delays, from a raw HTTP server on
//! 127.0.0.1. And, end to end, an answer that used to kill the agent's lane now leaves it
//! working.

mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, LazyLock},
    time::Duration,
};

use agentbus::{
    consume::definition::HandlerConfig,
    handlers::{
        Event, Handler, MAX_ANSWER_BYTES, MAX_FOLLOW_UPS, MAX_RETRY_AFTER,
        integration::{Integrations, MAX_RESPONSE_BODY_BYTES, ServiceConfig},
        parse_retry_after,
    },
};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Few cases (each is a real HTTP exchange); the seed is fixed so that the test command runs
/// the same cases every time. `PROPTEST_CASES` and `PROPTEST_RNG_SEED` explore more.
fn config(cases: u32) -> Config {
    let defaults = Config::default();
    Config {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        rng_seed: if std::env::var_os("PROPTEST_RNG_SEED").is_some() {
            defaults.rng_seed
        } else {
            RngSeed::Fixed(0x0010_a45e_eb00)
        },
        failure_persistence: None,
        ..defaults
    }
}

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

/// The handler's timeout; a delay past it must end as a timeout.
const TIMEOUT: Duration = Duration::from_millis(300);
const LONG_DELAY: Duration = Duration::from_millis(450);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// `Content-Length` of the body.
    Exact,
    /// `Content-Length` larger than the body, then the connection closes.
    Short,
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// No length: the body ends when the connection closes.
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Delay {
    None,
    /// Before the status line.
    BeforeHead(Duration),
    /// After the head, before the body.
    BeforeBody(Duration),
}

#[derive(Clone)]
struct Answer {
    status: u16,
    retry_after: Option<Vec<u8>>,
    framing: Framing,
    delay: Delay,
    body: Vec<u8>,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let body: String = String::from_utf8_lossy(&self.body)
            .chars()
            .take(120)
            .collect();
        f.debug_struct("Answer")
            .field("status", &self.status)
            .field(
                "retry_after",
                &self
                    .retry_after
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned()),
            )
            .field("framing", &self.framing)
            .field("delay", &self.delay)
            .field("body_len", &self.body.len())
            .field("body", &body)
            .finish()
    }
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![
        // Success is where the body matters: half of the cases.
        4 => prop::sample::select(vec![200u16, 200, 201, 202, 299]),
        3 => prop::sample::select(vec![
            204, 301, 304, 400, 404, 408, 409, 422, 429, 500, 502, 503, 599
        ]),
        1 => 100u16..=599,
    ]
}

fn retry_after() -> impl Strategy<Value = Option<Vec<u8>>> {
    let text = |s: &str| Some(s.as_bytes().to_vec());
    prop_oneof![
        2 => Just(None),
        1 => any::<u64>().prop_map(|n| Some(n.to_string().into_bytes())),
        1 => Just(text(&u64::MAX.to_string())),
        1 => Just(text("10000000000000")),
        1 => Just(text("184467440737095516150000")),
        1 => (0u64..7200).prop_map(|n| Some(n.to_string().into_bytes())),
        1 => Just(text("Fri, 31 Dec 9999 23:59:59 GMT")),
        1 => Just(text("Sun, 06 Nov 1994 08:49:37 GMT")),
        1 => Just(text("-5")),
        1 => Just(text("1.5")),
        1 => Just(text("")),
        1 => "[ -~]{0,40}".prop_map(|s| Some(s.into_bytes())),
        // obs-text: bytes a header value may carry that are not UTF-8.
        1 => prop::collection::vec(0x80u8..=0xff, 1..8).prop_map(Some),
    ]
}

fn follow_up(i: usize) -> Value {
    json!({"event_type": "agent.task.completed", "data": {"n": i}})
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        1 => Just(b"   \n".to_vec()),
        3 => prop_oneof![0usize..=3, MAX_FOLLOW_UPS - 1..=MAX_FOLLOW_UPS + 2].prop_map(|n| {
            json!({"events": (0..n).map(follow_up).collect::<Vec<_>>()}).to_string().into_bytes()
        }),
        1 => Just(br#"{"events": 7}"#.to_vec()),
        1 => Just(br#"{"events": null}"#.to_vec()),
        1 => Just(br#"{"events": [1, "x", null]}"#.to_vec()),
        1 => Just(br#"{"events": [{"a":"#.to_vec()),
        1 => Just(br#"not json at all"#.to_vec()),
        // Nesting past any parser's recursion limit.
        1 => Just([b"{\"events\":".to_vec(), vec![b'['; 100_000]].concat()),
        1 => prop::collection::vec(any::<u8>(), 0..300),
        // Around the bound, and well over it.
        3 => (0usize..3).prop_map(|k| {
            let len = [MAX_ANSWER_BYTES, MAX_ANSWER_BYTES + 1, 3 * MAX_ANSWER_BYTES][k];
            let mut b = br#"{"events": [], "pad": ""#.to_vec();
            b.resize(len - 2, b'x');
            b.extend_from_slice(b"\"}");
            b
        }),
    ]
}

fn framing() -> impl Strategy<Value = Framing> {
    prop_oneof![
        4 => Just(Framing::Exact),
        1 => Just(Framing::Short),
        2 => Just(Framing::Chunked),
        2 => Just(Framing::UntilClose),
    ]
}

fn delay() -> impl Strategy<Value = Delay> {
    prop_oneof![
        14 => Just(Delay::None),
        2 => (0u64..30).prop_map(|ms| Delay::BeforeHead(Duration::from_millis(ms))),
        2 => (0u64..30).prop_map(|ms| Delay::BeforeBody(Duration::from_millis(ms))),
        1 => Just(Delay::BeforeHead(LONG_DELAY)),
        1 => Just(Delay::BeforeBody(LONG_DELAY)),
    ]
}

fn answer() -> impl Strategy<Value = Answer> {
    (status(), retry_after(), framing(), delay(), body()).prop_map(
        |(status, retry_after, framing, delay, body)| Answer {
            status,
            retry_after,
            framing,
            delay,
            body,
        },
    )
}

/// Reads one request (head and `Content-Length` body) and writes `answer`, then closes.
async fn serve_one(mut stream: tokio::net::TcpStream, answer: Answer) {
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        request.extend_from_slice(&buf[..n]);
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while request.len() < head_end + length {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }

    if let Delay::BeforeHead(d) = answer.delay {
        tokio::time::sleep(d).await;
    }
    let mut out = format!("HTTP/1.1 {} Whatever\r\n", answer.status).into_bytes();
    if let Some(v) = &answer.retry_after {
        out.extend_from_slice(b"Retry-After: ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    match answer.framing {
        Framing::Exact => out.extend(format!("Content-Length: {}\r\n", answer.body.len()).bytes()),
        Framing::Short => {
            out.extend(format!("Content-Length: {}\r\n", answer.body.len() + 10).bytes())
        }
        Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        Framing::UntilClose => {}
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    if stream.write_all(&out).await.is_err() {
        return;
    }
    if let Delay::BeforeBody(d) = answer.delay {
        let _ = stream.flush().await;
        tokio::time::sleep(d).await;
    }
    let body = match answer.framing {
        Framing::Chunked => {
            let mut b = Vec::new();
            for chunk in answer.body.chunks(64 * 1024) {
                b.extend(format!("{:x}\r\n", chunk.len()).bytes());
                b.extend_from_slice(chunk);
                b.extend_from_slice(b"\r\n");
            }
            b.extend_from_slice(b"0\r\n\r\n");
            b
        }
        _ => answer.body.clone(),
    };
    // The client may stop reading (a body over the bound) and close: not an error here.
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
}

/// A server on 127.0.0.1 that answers every connection with `answer`; its address.
async fn server(answer: Answer) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve_one(stream, answer.clone()));
        }
    });
    (addr, task)
}

fn event(data: Value) -> Event {
    Event {
        id: uuid::Uuid::new_v4().to_string(),
        event_type: "integration.call.requested".into(),
        version: 1,
        source: "t".into(),
        time: None,
        key: Some("k".into()),
        idempotency_key: "k".into(),
        correlation_id: None,
        causation_id: None,
        data,
    }
}

/// What a well-framed, timely answer must give (None: only the general bounds are checked).
fn expected_webhook_outcome(a: &Answer) -> Option<Result<usize, (&'static str, bool)>> {
    let timely = match a.delay {
        Delay::None => true,
        Delay::BeforeHead(d) | Delay::BeforeBody(d) => d < TIMEOUT,
    };
    if a.delay == Delay::BeforeHead(LONG_DELAY) {
        return Some(Err(("timeout", true)));
    }
    // 1xx are interim answers, 204/304 carry no body: left to the general bounds.
    if !timely || a.framing == Framing::Short || a.status < 200 || [204, 304].contains(&a.status) {
        return None;
    }
    if !(200..300).contains(&a.status) {
        let retryable = a.status == 408 || a.status == 429 || a.status >= 500;
        return Some(Err(("http_status", retryable)));
    }
    if a.body.len() > MAX_ANSWER_BYTES {
        return Some(Err(("answer_too_large", false)));
    }
    let Ok(json) = serde_json::from_slice::<Value>(&a.body) else {
        return Some(Ok(0));
    };
    Some(match json.get("events") {
        None | Some(Value::Null) => Ok(0),
        Some(Value::Array(e)) if e.len() <= MAX_FOLLOW_UPS => Ok(e.len()),
        Some(_) => Err(("invalid_follow_up", false)),
    })
}

async fn webhook_case(a: Answer) -> Result<(), TestCaseError> {
    let (addr, server) = server(a.clone()).await;
    let config = HandlerConfig::Webhook {
        url: format!("http://{addr}/hook"),
        secret_env: None,
        timeout: TIMEOUT,
        ca_file: None,
    };
    let handler = Handler::new(&config, 3, &Arc::new(Integrations::default())).unwrap();
    let sent_at = chrono::Utc::now();
    let outcome =
        tokio::time::timeout(TIMEOUT * 4, handler.handle(&event(json!({"x": 1})), 1)).await;
    server.abort();
    let Ok(outcome) = outcome else {
        return Err(TestCaseError::fail("the handler outlived its own timeout"));
    };
    match &outcome {
        Ok(follow_ups) => prop_assert!(follow_ups.len() <= MAX_FOLLOW_UPS),
        Err(f) => {
            prop_assert!(
                [
                    "http_status",
                    "timeout",
                    "connection",
                    "invalid_follow_up",
                    "answer_too_large"
                ]
                .contains(&f.kind),
                "{f:?}"
            );
            prop_assert!(f.retry_after.is_none_or(|w| w <= MAX_RETRY_AFTER), "{f:?}");
            prop_assert!(f.message.len() <= 4096, "{}", f.message.len());
            // What the retry path does with the wait: must not overflow.
            let wait = f.retry_after.unwrap_or_default();
            let _ = chrono::Utc::now() + chrono::Duration::from_std(wait).unwrap();
        }
    }
    if let Some(expected) = expected_webhook_outcome(&a) {
        match (&outcome, expected) {
            (Ok(got), Ok(n)) => prop_assert_eq!(got.len(), n),
            (Err(f), Err((kind, retryable))) => {
                prop_assert_eq!(f.kind, kind, "{:?}", f);
                prop_assert_eq!(f.retryable, retryable, "{:?}", f);
                if kind == "http_status" {
                    let want = a
                        .retry_after
                        .as_deref()
                        .and_then(|v| parse_retry_after(v, sent_at));
                    // Dates are read against the clock: a second apart at most.
                    let close = match (f.retry_after, want) {
                        (None, None) => true,
                        (Some(g), Some(w)) => g.abs_diff(w) <= Duration::from_secs(2),
                        _ => false,
                    };
                    prop_assert!(close, "{:?} vs {:?}", f.retry_after, want);
                }
            }
            (got, want) => {
                return Err(TestCaseError::fail(format!(
                    "got {got:?}, expected {want:?}"
                )));
            }
        }
    }
    Ok(())
}

async fn integration_case(a: Answer, attempt: u32) -> Result<(), TestCaseError> {
    let (addr, server) = server(a.clone()).await;
    let mut services = BTreeMap::new();
    let service: ServiceConfig = toml::from_str(&format!(
        "base_url = \"http://{addr}\"\ntimeout = \"300ms\"\nrate_per_second = 1000\nburst = 1000\n\
         failure_threshold = 1000000\n"
    ))
    .unwrap();
    services.insert("svc".to_string(), service);
    let integrations = Arc::new(Integrations::new(&services).unwrap());
    let config = HandlerConfig::Integration { services };
    let handler = Handler::new(&config, 2, &integrations).unwrap();
    let call = event(
        json!({"call_id": uuid::Uuid::new_v4(), "service": "svc", "method": "POST",
                            "path": "/x", "body": "hello"}),
    );
    let outcome = tokio::time::timeout(TIMEOUT * 4, handler.handle(&call, attempt)).await;
    server.abort();
    let Ok(outcome) = outcome else {
        return Err(TestCaseError::fail("the handler outlived its own timeout"));
    };
    match outcome {
        Ok(events) => {
            prop_assert_eq!(events.len(), 1);
            let e = &events[0];
            let kind = e["event_type"].as_str().unwrap();
            prop_assert!(
                ["integration.call.succeeded", "integration.call.failed"].contains(&kind),
                "{e}"
            );
            if let Some(body) = e["data"]["response_body"].as_str() {
                prop_assert!(body.chars().count() <= MAX_RESPONSE_BODY_BYTES);
            }
            if kind == "integration.call.succeeded" {
                prop_assert!((200..300).contains(&a.status));
            }
        }
        Err(f) => {
            prop_assert!(f.retryable, "{f:?}");
            prop_assert!(attempt < 2, "the last attempt publishes call.failed: {f:?}");
            prop_assert!(f.retry_after.is_none_or(|w| w <= MAX_RETRY_AFTER), "{f:?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn any_webhook_answer_ends_in_a_defined_bounded_outcome(a in answer()) {
        RUNTIME.block_on(webhook_case(a))?;
    }

    #[test]
    fn any_integration_answer_ends_in_a_result_event_or_a_bounded_retry(
        a in answer(),
        attempt in 1u32..=2,
    ) {
        RUNTIME.block_on(integration_case(a, attempt))?;
    }
}

// ---------------------------------------------------------------------------------------
// End to end: the answer that used to kill the agent.

use common::{agents::task, *};

#[tokio::test]
async fn a_retry_after_past_any_clock_moves_the_event_to_the_retry_topic_for_an_hour_and_the_agent_goes_on()
 {
    use axum::{Router, http::StatusCode, response::IntoResponse, routing::post};
    use std::sync::Mutex;
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let router = Router::new().route(
        "/hook",
        post({
            let got = got.clone();
            move |axum::Json(event): axum::Json<Value>| async move {
                let description = event["data"]["description"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                // u64::MAX seconds, and 10^13 s, which overflowed the not-before date.
                let wait = match description.as_str() {
                    "forever" => Some(u64::MAX.to_string()),
                    "eons" => Some("10000000000000".to_string()),
                    _ => None,
                };
                if let Some(wait) = wait {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        [("retry-after", wait)],
                        "come back later",
                    )
                        .into_response();
                }
                got.lock().unwrap().push(description);
                axum::Json(json!({})).into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let name = format!("patient-{}", uuid::Uuid::new_v4().simple());
    // Concurrency 1: one lane, so a dead lane would stop everything behind it.
    let consumers = tempfile::tempdir().unwrap();
    agents::agent_file(consumers.path(), &name, &url, "");
    let file = consumers.path().join(format!("{name}.toml"));
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("concurrency = 4", "concurrency = 1");
    std::fs::write(&file, text).unwrap();
    let app = spawn(Options {
        consumers_dir: Some(consumers.path().to_path_buf()),
        ..Options::default()
    })
    .await;
    assert_eq!(app.post(&task("same", "eons")).await.status(), 200);
    assert_eq!(app.post(&task("same", "forever")).await.status(), 200);
    assert_eq!(app.post(&task("same", "after")).await.status(), 200);
    assert_eq!(app.post(&task("other", "elsewhere")).await.status(), 200);

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got.lock().unwrap().len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent stopped handling: {:?}",
            got.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut handled = got.lock().unwrap().clone();
    handled.sort();
    assert_eq!(handled, ["after", "elsewhere"]);
    // Both wait in the retry topic for the clamp: not for ever, and not at once either.
    let (brokers, topic) = (app.brokers.clone(), format!("{}{name}.retry", app.prefix));
    let retried = tokio::task::spawn_blocking(move || read_records(&brokers, &topic, 2))
        .await
        .unwrap();
    for r in &retried {
        let not_before = header(r, "agentbus-not-before").unwrap();
        let at = chrono::DateTime::parse_from_rfc3339(&not_before).unwrap();
        let ahead = (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds();
        let max = MAX_RETRY_AFTER.as_secs() as i64;
        assert!(
            (max - 120..=max).contains(&ahead),
            "not before {not_before}: {ahead} s ahead, expected about {max} s"
        );
    }
    assert_eq!(app.get("/readyz").await.status(), 200);
}

//! What agents do with an event: POST it to a webhook, execute an integration call, or
//! nothing (for benchmarks).

pub mod integration;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Value as Json, json};
use sha2::Sha256;

use crate::consume::definition::HandlerConfig;
use integration::{IntegrationHandler, Integrations};

/// A delivered event, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Event {
    /// `ce_id`.
    pub id: String,
    /// `ce_type`.
    pub event_type: String,
    /// Schema major version.
    pub version: u32,
    /// `ce_source`.
    pub source: String,
    /// `ce_time`.
    pub time: Option<String>,
    /// The record key.
    pub key: Option<String>,
    /// The idempotency key (`ce_idempotencykey`, else the id).
    pub idempotency_key: String,
    /// `ce_correlationid`.
    pub correlation_id: Option<String>,
    /// `ce_causationid`.
    pub causation_id: Option<String>,
    /// The decoded data.
    pub data: Json,
}

/// Why handling failed.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Whether trying again may succeed.
    pub retryable: bool,
    /// A short machine-readable kind: `http_status`, `timeout`, `connection`, `publish`...
    pub kind: &'static str,
    /// What happened.
    pub message: String,
    /// The wait the other side asked for (`Retry-After`), never more than
    /// [`MAX_RETRY_AFTER`].
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure worth retrying.
    pub fn retryable(kind: &'static str, message: impl Into<String>) -> Self {
        Failure {
            retryable: true,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// A failure that will not go away by retrying.
    pub fn fatal(kind: &'static str, message: impl Into<String>) -> Self {
        Failure {
            retryable: false,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// The longest wait a peer's `Retry-After` can ask for. A longer one (up to `u64::MAX`
/// seconds, or a date centuries away) is taken as this: whatever comes over the wire is
/// clamped before it reaches any clock arithmetic.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// The largest answer body of a webhook that is read (1 MiB). A 2xx answer over it fails the
/// handling for good (`answer_too_large`) without being read whole.
pub const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// The most follow-up events one answer may carry; more fail the handling for good
/// (`invalid_follow_up`).
pub const MAX_FOLLOW_UPS: usize = 100;

/// Bytes of an error answer kept for the failure's message; the rest is not read.
const ERROR_DETAIL_BYTES: usize = 4096;

/// The wait a peer's `Retry-After` asks for, from `now`: delay-seconds or an HTTP-date,
/// clamped to [`MAX_RETRY_AFTER`]; a date in the past is no wait. Anything else (not ASCII,
/// negative, fractional, a date that does not parse) is ignored: `None`.
pub fn parse_retry_after(value: &[u8], now: DateTime<Utc>) -> Option<Duration> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        // Digits only: a number too large for u64 is still "a very long time".
        let secs = text.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    // An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) is an RFC 2822 date.
    let at = DateTime::parse_from_rfc2822(text).ok()?.with_timezone(&Utc);
    let wait = (at - now).to_std().unwrap_or(Duration::ZERO);
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The `Retry-After` of an answer, as [`parse_retry_after`] reads it.
fn retry_after_of(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| parse_retry_after(v.as_bytes(), Utc::now()))
}

/// Reads at most `limit` bytes of an answer's body; `true` with them when there was more
/// (the rest is never read: the connection is dropped).
async fn read_at_most(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<(Vec<u8>, bool), reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - out.len();
        if chunk.len() > room {
            out.extend_from_slice(&chunk[..room]);
            return Ok((out, true));
        }
        out.extend_from_slice(&chunk);
    }
    Ok((out, false))
}

/// Largest CA file read (a whole system bundle is about 200 KiB).
const MAX_CA_FILE_BYTES: u64 = 16 * 1024 * 1024;

fn read_ca_file(file: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut pem = Vec::new();
    std::fs::File::open(file)?
        .take(MAX_CA_FILE_BYTES + 1)
        .read_to_end(&mut pem)?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_CA_FILE_BYTES} bytes: not a CA file"
        )));
    }
    Ok(pem)
}

/// The Mozilla root certificates of the `webpki-root-certs` crate, built in: parsed once.
fn webpki_roots() -> &'static [reqwest::Certificate] {
    static ROOTS: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .filter_map(|der| reqwest::Certificate::from_der(der.as_ref()).ok())
            .collect()
    })
}

/// The HTTP client of a webhook or an integration service: rustls with the machine's trust
/// store and the built-in Mozilla roots (so that a host without a CA store, a slim container,
/// still reaches public HTTPS), plus the certificates of `ca_file` (PEM, one or more) when
/// given, for services behind a private CA.
pub fn http_client(
    timeout: Option<Duration>,
    ca_file: Option<&Path>,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder().tls_certs_merge(webpki_roots().iter().cloned());
    if let Some(timeout) = timeout {
        builder = builder.timeout(timeout);
    }
    if let Some(file) = ca_file {
        let pem = read_ca_file(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: not a PEM certificate bundle: {e}", file.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
                file.display()
            ));
        }
        // Merged with the platform's roots: the private CA is trusted in addition to them.
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| {
        let message = chain(&e);
        match ca_file {
            Some(file) => format!("{}: {message}", file.display()),
            None => message,
        }
    })
}

/// A configured handler.
pub enum Handler {
    /// POST to a URL.
    Webhook(Webhook),
    /// Call configured external services.
    Integration(IntegrationHandler),
    /// Succeed at once.
    Noop,
}

impl Handler {
    /// Builds the handler of a definition. A webhook secret named in the definition must be
    /// in the environment.
    pub fn new(
        config: &HandlerConfig,
        attempts: u32,
        integrations: &Arc<Integrations>,
    ) -> Result<Handler, String> {
        match config {
            HandlerConfig::Noop => Ok(Handler::Noop),
            HandlerConfig::Integration { .. } => Ok(Handler::Integration(IntegrationHandler {
                services: integrations.clone(),
                attempts,
            })),
            HandlerConfig::Webhook {
                url,
                secret_env,
                timeout,
                ca_file,
            } => {
                let secret = match secret_env {
                    None => None,
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        format!("handler.secret_env: environment variable {var} is not set")
                    })?),
                };
                let client = http_client(Some(*timeout), ca_file.as_deref())
                    .map_err(|e| format!("handler.ca_file: {e}"))?;
                Ok(Handler::Webhook(Webhook {
                    url: url.clone(),
                    secret,
                    client,
                }))
            }
        }
    }

    /// Handles one event; on success, the envelopes of the actions it took (follow-up
    /// events to publish).
    pub async fn handle(&self, event: &Event, attempt: u32) -> Result<Vec<Json>, Failure> {
        match self {
            Handler::Noop => Ok(Vec::new()),
            Handler::Webhook(w) => w.call(event, attempt).await,
            Handler::Integration(i) => i.call(event, attempt).await,
        }
    }
}

/// A webhook handler.
pub struct Webhook {
    url: String,
    secret: Option<String>,
    client: reqwest::Client,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The CloudEvents 1.0 structured-mode JSON of an event.
pub fn cloudevent(event: &Event) -> Json {
    let mut ce = json!({
        "specversion": "1.0",
        "id": event.id,
        "type": event.event_type,
        "source": event.source,
        "datacontenttype": "application/json",
        "eventversion": event.version.to_string(),
        "idempotencykey": event.idempotency_key,
        "data": event.data,
    });
    let object = ce.as_object_mut().expect("an object");
    for (name, value) in [
        ("time", &event.time),
        ("partitionkey", &event.key),
        ("correlationid", &event.correlation_id),
        ("causationid", &event.causation_id),
    ] {
        if let Some(v) = value {
            object.insert(name.into(), json!(v));
        }
    }
    ce
}

impl Webhook {
    async fn call(&self, event: &Event, attempt: u32) -> Result<Vec<Json>, Failure> {
        let body = serde_json::to_vec(&cloudevent(event)).expect("JSON serializes");
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/cloudevents+json")
            .header("x-agentbus-attempt", attempt.to_string());
        if let Some(secret) = &self.secret {
            request = request.header("x-agentbus-signature", signature(secret, &body));
        }
        let started = Instant::now();
        let response = request.body(body).send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                "timeout"
            } else {
                "connection"
            };
            Failure::retryable(kind, format!("POST {}: {}", self.url, chain(&e)))
        })?;
        let status = response.status();
        let read_failed = |e: reqwest::Error| {
            let kind = if e.is_timeout() {
                "timeout"
            } else {
                "connection"
            };
            Failure::retryable(kind, format!("POST {}: reading the answer: {e}", self.url))
        };
        if status.is_success() {
            // The answer is the agent's actions: read it only up to the bound, and refuse it
            // (for good: the same answer would come again) when it is larger.
            let too_large = || {
                Failure::fatal(
                    "answer_too_large",
                    format!(
                        "POST {} answered {status} with a body over {MAX_ANSWER_BYTES} bytes",
                        self.url
                    ),
                )
            };
            if response
                .content_length()
                .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
            {
                return Err(too_large());
            }
            let (body, truncated) = read_at_most(response, MAX_ANSWER_BYTES)
                .await
                .map_err(read_failed)?;
            if truncated {
                return Err(too_large());
            }
            return follow_ups(&body);
        }
        let retry_after = retry_after_of(response.headers());
        // Only the start of an error answer is kept; a read error here loses only the detail.
        let detail = match read_at_most(response, ERROR_DETAIL_BYTES).await {
            Ok((bytes, _)) => String::from_utf8_lossy(&bytes).chars().take(500).collect(),
            Err(_) => String::new(),
        };
        let message = format!(
            "POST {} answered {status} after {:?}: {detail}",
            self.url,
            started.elapsed()
        );
        let retryable =
            status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error();
        Err(Failure {
            retryable,
            kind: "http_status",
            message,
            retry_after,
        })
    }
}

/// An error with its causes (a TLS handshake failure says why only in its sources).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(&format!(": {text}"));
        }
        source = s.source();
    }
    message
}

/// `{"events": [envelope, ...]}` from a 2xx answer; an empty or other body means none.
fn follow_ups(body: &[u8]) -> Result<Vec<Json>, Failure> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let Ok(json) = serde_json::from_slice::<Json>(body) else {
        return Ok(Vec::new());
    };
    match json.get("events") {
        None | Some(Json::Null) => Ok(Vec::new()),
        Some(Json::Array(events)) if events.len() > MAX_FOLLOW_UPS => Err(Failure::fatal(
            "invalid_follow_up",
            format!(
                "the answer carries {} follow-up events; at most {MAX_FOLLOW_UPS} are taken",
                events.len()
            ),
        )),
        Some(Json::Array(events)) => Ok(events.clone()),
        Some(_) => Err(Failure::fatal(
            "invalid_follow_up",
            "the answer's \"events\" is not an array of envelopes",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn follow_ups_come_from_the_events_array() {
        assert!(follow_ups(b"").unwrap().is_empty());
        assert!(follow_ups(b"ok").unwrap().is_empty());
        assert_eq!(follow_ups(br#"{"events":[{"a":1}]}"#).unwrap().len(), 1);
        assert!(!follow_ups(br#"{"events":7}"#).unwrap_err().retryable);
        let many = json!({"events": vec![json!({}); MAX_FOLLOW_UPS + 1]}).to_string();
        let e = follow_ups(many.as_bytes()).unwrap_err();
        assert_eq!(e.kind, "invalid_follow_up");
        assert!(!e.retryable);
    }

    #[test]
    fn retry_after_is_clamped_and_garbage_is_ignored() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let p = |v: &str| parse_retry_after(v.as_bytes(), now);
        assert_eq!(p("120"), Some(Duration::from_secs(120)));
        assert_eq!(p(" 0 "), Some(Duration::ZERO));
        // The values that used to overflow the retry path's clock arithmetic.
        assert_eq!(p(&u64::MAX.to_string()), Some(MAX_RETRY_AFTER));
        assert_eq!(p("18446744073709551616000"), Some(MAX_RETRY_AFTER));
        assert_eq!(p("10000000000000"), Some(MAX_RETRY_AFTER));
        assert_eq!(
            p("Tue, 01 Dec 2026 12:00:30 GMT"),
            Some(Duration::from_secs(30))
        );
        assert_eq!(p("Tue, 01 Dec 2026 11:00:00 GMT"), Some(Duration::ZERO));
        assert_eq!(p("Fri, 31 Dec 9999 23:59:59 GMT"), Some(MAX_RETRY_AFTER));
        for garbage in ["", "-1", "1.5", "soon", "0x10", "+5", "Tue, 99 Dec 2026"] {
            assert_eq!(p(garbage), None, "{garbage:?}");
        }
        assert_eq!(parse_retry_after(&[0xff, 0x31], now), None);
    }

    /// Run by the next test in a child process whose trust store is empty.
    #[test]
    #[ignore = "run by a_host_without_a_ca_store_still_gets_a_client"]
    fn child_builds_a_client_without_a_ca_store() {
        assert!(std::env::var_os("AGENTBUS_TEST_CHILD").is_some());
        http_client(None, None).expect("a client from the built-in roots");
    }

    /// The platform verifier finds no CA certificate on a host without a store (here: the
    /// store pointed at an empty file); the built-in roots still make a client.
    #[test]
    fn a_host_without_a_ca_store_still_gets_a_client() {
        assert!(!webpki_roots().is_empty());
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "handlers::tests::child_builds_a_client_without_a_ca_store",
                "--ignored",
                "--nocapture",
            ])
            .env("AGENTBUS_TEST_CHILD", "1")
            .env("SSL_CERT_FILE", &empty)
            .env("SSL_CERT_DIR", dir.path().join("none"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    #[test]
    fn a_ca_file_that_is_missing_or_not_pem_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = http_client(None, Some(&missing)).unwrap_err();
        assert!(e.contains("missing.pem"), "{e}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not a certificate").unwrap();
        let e = http_client(None, Some(&garbage)).unwrap_err();
        assert!(
            e.contains("garbage.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let bad_der = dir.path().join("bad-der.pem");
        std::fs::write(
            &bad_der,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = http_client(None, Some(&bad_der)).unwrap_err();
        assert!(e.contains("bad-der.pem"), "{e}");
    }
}

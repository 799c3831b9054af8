//! What agents do with an event: POST it to a webhook, execute an integration call, or
//! nothing (for benchmarks).

pub mod integration;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

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
    /// The wait the other side asked for (`Retry-After`).
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
                client: reqwest::Client::new(),
                attempts,
            })),
            HandlerConfig::Webhook {
                url,
                secret_env,
                timeout,
            } => {
                let secret = match secret_env {
                    None => None,
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        format!("handler.secret_env: environment variable {var} is not set")
                    })?),
                };
                let client = reqwest::Client::builder()
                    .timeout(*timeout)
                    .build()
                    .map_err(|e| e.to_string())?;
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
            Failure::retryable(kind, format!("POST {}: {e}", self.url))
        })?;
        let status = response.status();
        if status.is_success() {
            let text = response.bytes().await.map_err(|e| {
                Failure::retryable("connection", format!("reading the answer: {e}"))
            })?;
            return follow_ups(&text);
        }
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let detail: String = response
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(500)
            .collect();
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
    }
}

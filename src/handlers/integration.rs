//! The built-in integration agent: executes `integration.call.requested` events against
//! services configured by name, with a token-bucket rate limit and a circuit breaker per
//! service, and publishes `integration.call.succeeded` or `integration.call.failed`.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value as Json, json};

use super::{Event, Failure, chain, http_client, read_at_most, retry_after_of};
use crate::{ratelimit::TokenBucket, telemetry};

/// One external service, as configured in the agent's file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Base URL; a call's `path` is appended.
    pub base_url: String,
    /// Environment variable holding the auth header's value (say `Bearer ...`). Never logged.
    #[serde(default)]
    pub auth_env: Option<String>,
    /// The auth header's name.
    #[serde(default = "default_auth_header")]
    pub auth_header: String,
    /// Longest wait for an answer, unless the call asks for less.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Calls per second allowed on average.
    #[serde(default = "default_rate")]
    pub rate_per_second: f64,
    /// Calls allowed at once above the average.
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// Failures in a row (5xx, 429, timeouts, connection errors) that open the breaker.
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    /// How long an open breaker fails calls fast before letting one probe through.
    #[serde(default = "default_cooldown", with = "humantime_serde")]
    pub cooldown: Duration,
    /// A PEM file of CA certificates trusted for this service's HTTPS, in addition to the
    /// machine's trust store (for a service behind a private CA). Read at start-up; a
    /// relative path is relative to the definition's directory.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// Bytes of a service's answer that are read and kept as `response_body`; the rest is not
/// read (the connection is dropped), so a huge answer cannot exhaust memory.
pub const MAX_RESPONSE_BODY_BYTES: usize = 64 * 1024;

fn default_auth_header() -> String {
    "Authorization".into()
}
fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_rate() -> f64 {
    10.0
}
fn default_burst() -> u32 {
    10
}
fn default_threshold() -> u32 {
    5
}
fn default_cooldown() -> Duration {
    Duration::from_secs(30)
}

/// A circuit breaker's state, as reported (and as `agentbus_circuit_breaker_state`: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// One probe call is allowed to test the service.
    HalfOpen,
    /// Calls fail fast.
    Open,
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    failures: u32,
    open_until: Option<Instant>,
    probe_in_flight: bool,
}

/// One service at run time.
pub struct Service {
    name: String,
    config: ServiceConfig,
    auth: Option<String>,
    /// Its own client: its `ca_file` trusts only for it.
    client: reqwest::Client,
    breaker: Mutex<Breaker>,
    bucket: TokenBucket,
}

impl Service {
    fn report(&self, state: BreakerState) {
        let value = match state {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        metrics::gauge!(telemetry::CIRCUIT_BREAKER_STATE, "service" => self.name.clone())
            .set(value);
    }

    /// May a call go out now? Moves an open breaker whose cool-down has passed to half-open.
    fn admit(&self) -> bool {
        let mut b = self.breaker.lock().expect("not poisoned");
        match b.state {
            BreakerState::Closed => true,
            BreakerState::Open => {
                if b.open_until.is_some_and(|t| Instant::now() >= t) {
                    b.state = BreakerState::HalfOpen;
                    b.probe_in_flight = true;
                    self.report(b.state);
                    true
                } else {
                    false
                }
            }
            BreakerState::HalfOpen => {
                if b.probe_in_flight {
                    false
                } else {
                    b.probe_in_flight = true;
                    true
                }
            }
        }
    }

    /// Gives back a half-open probe that never reached the service.
    fn release_probe(&self) {
        self.breaker.lock().expect("not poisoned").probe_in_flight = false;
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().expect("not poisoned");
        b.probe_in_flight = false;
        if ok {
            b.failures = 0;
            b.state = BreakerState::Closed;
            b.open_until = None;
        } else {
            b.failures += 1;
            if b.state == BreakerState::HalfOpen || b.failures >= self.config.failure_threshold {
                b.state = BreakerState::Open;
                b.open_until = Some(Instant::now() + self.config.cooldown);
            }
        }
        self.report(b.state);
    }

    /// What `GET /v1/integrations` shows.
    pub fn status(&self) -> Json {
        let b = self.breaker.lock().expect("not poisoned");
        json!({
            "service": self.name,
            "base_url": self.config.base_url,
            "state": b.state,
            "consecutive_failures": b.failures,
            "failure_threshold": self.config.failure_threshold,
            "cooldown_ms": self.config.cooldown.as_millis() as u64,
            "rate_per_second": self.config.rate_per_second,
            "burst": self.config.burst,
        })
    }
}

/// The configured services of every integration agent, shared with the HTTP API.
#[derive(Default)]
pub struct Integrations {
    services: BTreeMap<String, Arc<Service>>,
}

impl Integrations {
    /// Builds the services; an `auth_env` that is not set is an error naming it.
    pub fn new(configs: &BTreeMap<String, ServiceConfig>) -> Result<Integrations, String> {
        let mut services = BTreeMap::new();
        for (name, config) in configs {
            let auth = match &config.auth_env {
                None => None,
                Some(var) => Some(std::env::var(var).map_err(|_| {
                    format!(
                        "handler.services.{name}.auth_env: environment variable {var} is not set"
                    )
                })?),
            };
            if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://"))
            {
                return Err(format!(
                    "handler.services.{name}.base_url: must be an http(s) URL"
                ));
            }
            if config.rate_per_second <= 0.0 {
                return Err(format!(
                    "handler.services.{name}.rate_per_second: must be positive"
                ));
            }
            // Timeouts are per call (a call may ask for less than the service's).
            let client = http_client(None, config.ca_file.as_deref())
                .map_err(|e| format!("handler.services.{name}.ca_file: {e}"))?;
            let service = Arc::new(Service {
                name: name.clone(),
                config: config.clone(),
                auth,
                client,
                breaker: Mutex::new(Breaker {
                    state: BreakerState::Closed,
                    failures: 0,
                    open_until: None,
                    probe_in_flight: false,
                }),
                bucket: TokenBucket::new(config.rate_per_second, config.burst),
            });
            service.report(BreakerState::Closed);
            services.insert(name.clone(), service);
        }
        Ok(Integrations { services })
    }

    /// Every service's status.
    pub fn status(&self) -> Vec<Json> {
        self.services.values().map(|s| s.status()).collect()
    }

    /// Adds the services of another integration agent.
    pub fn extend(&mut self, other: Integrations) {
        self.services.extend(other.services);
    }
}

/// The integration handler.
pub struct IntegrationHandler {
    pub(crate) services: Arc<Integrations>,
    /// The agent's attempts: transient failures are retried until the last, which then
    /// publishes `integration.call.failed`.
    pub(crate) attempts: u32,
}

fn failed(
    event: &Event,
    status: Option<u16>,
    latency: Duration,
    kind: &str,
    error: String,
    body: Option<String>,
) -> Vec<Json> {
    vec![json!({
        "event_type": "integration.call.failed",
        "partition_key": event.key,
        "data": {
            "call_id": event.data["call_id"],
            "service": event.data["service"],
            "status": status,
            "latency_ms": latency.as_millis() as i64,
            "error_kind": kind,
            "error": error,
            "response_body": body,
        }
    })]
}

impl IntegrationHandler {
    /// Executes one `integration.call.requested`.
    pub async fn call(&self, event: &Event, attempt: u32) -> Result<Vec<Json>, Failure> {
        if event.event_type != "integration.call.requested" {
            return Ok(Vec::new());
        }
        let d = &event.data;
        let name = d["service"].as_str().unwrap_or_default();
        let Some(service) = self.services.services.get(name) else {
            return Ok(failed(
                event,
                None,
                Duration::ZERO,
                "other",
                format!("no service named {name:?} is configured"),
                None,
            ));
        };
        if !service.admit() {
            return Ok(failed(
                event,
                None,
                Duration::ZERO,
                "circuit_open",
                format!("the circuit breaker of {name} is open"),
                None,
            ));
        }
        let timeout = d["timeout_ms"]
            .as_u64()
            .map(Duration::from_millis)
            .unwrap_or(service.config.timeout)
            .min(service.config.timeout);
        if !service.bucket.take_within(timeout).await {
            service.release_probe();
            return Ok(failed(
                event,
                None,
                Duration::ZERO,
                "rate_limited",
                format!("rate limit of {name} reached"),
                None,
            ));
        }
        let method = reqwest::Method::from_bytes(d["method"].as_str().unwrap_or("GET").as_bytes())
            .unwrap_or(reqwest::Method::GET);
        let url = format!(
            "{}/{}",
            service.config.base_url.trim_end_matches('/'),
            d["path"].as_str().unwrap_or("").trim_start_matches('/')
        );
        let mut request = service.client.request(method, &url).timeout(timeout);
        if let Some(query) = d["query"].as_object() {
            let pairs: Vec<(&str, &str)> = query
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
                .collect();
            request = request.query(&pairs);
        }
        if let Some(headers) = d["headers"].as_object() {
            for (k, v) in headers {
                if let Some(v) = v.as_str() {
                    request = request.header(k.as_str(), v);
                }
            }
        }
        if let Some(auth) = &service.auth {
            request = request.header(service.config.auth_header.as_str(), auth);
        }
        if let Some(body) = d["body"].as_str() {
            request = request.body(body.to_string());
        }
        let started = Instant::now();
        let last = attempt >= self.attempts;
        match request.send().await {
            Ok(response) => {
                let status = response.status();
                let retry_after = retry_after_of(response.headers());
                // Kept up to the bound (cut there, as before); a read that fails midway (a
                // timeout, a reset) leaves it empty: the status decides the outcome.
                let body = read_at_most(response, MAX_RESPONSE_BODY_BYTES)
                    .await
                    .map(|(bytes, _)| bytes)
                    .unwrap_or_default();
                let body = String::from_utf8_lossy(&body).into_owned();
                let latency = started.elapsed();
                if status.is_success() {
                    service.record(true);
                    return Ok(vec![json!({
                        "event_type": "integration.call.succeeded",
                        "partition_key": event.key,
                        "data": {
                            "call_id": d["call_id"], "service": name, "status": status.as_u16(),
                            "latency_ms": latency.as_millis() as i64, "response_body": body,
                        }
                    })]);
                }
                let transient =
                    status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408;
                service.record(!transient);
                if transient && !last {
                    return Err(Failure {
                        retry_after,
                        ..Failure::retryable("http_status", format!("{name} answered {status}"))
                    });
                }
                Ok(failed(
                    event,
                    Some(status.as_u16()),
                    latency,
                    "http_status",
                    format!("{name} answered {status}"),
                    Some(body),
                ))
            }
            Err(e) => {
                service.record(false);
                let kind = if e.is_timeout() {
                    "timeout"
                } else {
                    "connection"
                };
                if !last {
                    return Err(Failure::retryable(kind, format!("{name}: {}", chain(&e))));
                }
                Ok(failed(
                    event,
                    None,
                    started.elapsed(),
                    kind,
                    chain(&e),
                    None,
                ))
            }
        }
    }
}

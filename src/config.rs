//! Runtime settings: every one is a flag and an `AGENTBUS_*` environment variable
//! (CONTRACT.md §6). What the system *is* (schemas, agents) lives in files instead.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use rdkafka::ClientConfig;

/// How to reach Kafka and how agentbus names its topics.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    #[arg(long, env = "AGENTBUS_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,

    /// Prepended to every topic name agentbus derives (`<prefix><domain>.events`), so that
    /// several tenants or test runs can share one cluster.
    #[arg(long, env = "AGENTBUS_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,

    /// Which broker's quirks to work around: `none` (Apache Kafka) or `tansu` (tansu 0.6:
    /// no DescribeGroups, offsets-for-times answering 0 for "none", a panic on an idempotent
    /// producer's epoch bump, slow fetches). See [`crate::broker`].
    #[arg(long, env = "AGENTBUS_BROKER_QUIRKS", value_enum, default_value_t = crate::broker::BrokerQuirks::None)]
    pub broker_quirks: crate::broker::BrokerQuirks,
}

impl KafkaArgs {
    /// A librdkafka configuration with the bootstrap servers and every extra setting given
    /// as `AGENTBUS_KAFKA_<NAME>` (upper case, `_` for `.`): `AGENTBUS_KAFKA_SECURITY_PROTOCOL=ssl`
    /// sets `security.protocol=ssl`. That is how TLS and SASL settings pass through.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_with(&[])
    }

    /// Like [`KafkaArgs::client_config`], with `defaults` set first so that an
    /// `AGENTBUS_KAFKA_*` variable can still override each of them.
    pub fn client_config_with(&self, defaults: &[(&str, String)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (name, value) in defaults {
            config.set(*name, value);
        }
        for (name, value) in std::env::vars() {
            if let Some(setting) = name.strip_prefix("AGENTBUS_KAFKA_") {
                config.set(setting.to_ascii_lowercase().replace('_', "."), value);
            }
        }
        config
    }

    /// The topic that carries every event type of `domain`.
    pub fn events_topic(&self, domain: &str) -> String {
        format!("{}{domain}.events", self.topic_prefix)
    }

    /// The broker quirks worked around (all off on Apache Kafka).
    pub fn quirks(&self) -> crate::broker::Quirks {
        self.broker_quirks.quirks()
    }
}

/// Settings of `agentbus serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,

    /// Where the HTTP API listens.
    #[arg(long, env = "AGENTBUS_HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,

    /// Directory of the sled stores (idempotency, dedup) and other local state.
    #[arg(long, env = "AGENTBUS_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// The schema directory: `<event_type>/v<N>.avsc`.
    #[arg(long, env = "AGENTBUS_SCHEMAS_DIR", default_value = "./schemas")]
    pub schemas_dir: PathBuf,

    /// The agent definitions: one `<agent>.toml` per agent.
    #[arg(long, env = "AGENTBUS_CONSUMERS_DIR", default_value = "./consumers")]
    pub consumers_dir: PathBuf,

    /// How long an agent remembers the idempotency keys it handled.
    #[arg(long, env = "AGENTBUS_DEDUP_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub dedup_ttl: Duration,

    /// An agent process that stops heartbeating is out of its group after this long, and
    /// its partitions go to the others.
    #[arg(long, env = "AGENTBUS_AGENT_SESSION_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub agent_session_timeout: Duration,

    #[command(flatten)]
    pub topics: TopicArgs,

    /// How long a publish idempotency key is remembered.
    #[arg(long, env = "AGENTBUS_IDEMPOTENCY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Duration,

    /// Largest request body of every endpoint (`POST /v1/events`, replays, redrives...), in
    /// bytes (413 beyond).
    #[arg(long, env = "AGENTBUS_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Most envelopes in one batch (413 beyond).
    #[arg(long, env = "AGENTBUS_MAX_BATCH", default_value_t = 500)]
    pub max_batch: usize,

    /// Longest a publish waits for the broker's acknowledgement before answering 503.
    #[arg(long, env = "AGENTBUS_PUBLISH_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub publish_timeout: Duration,

    #[command(flatten)]
    pub lag: crate::lag::LagSettings,

    #[command(flatten)]
    pub replay: crate::replay::ReplaySettings,

    /// API keys: a TOML file of `[[key]]` entries (`agentbus keys new` makes them). Without
    /// keys the service starts only on a loopback address, unless `--insecure-no-auth`.
    #[arg(long, env = "AGENTBUS_API_KEYS_FILE")]
    pub api_keys: Option<PathBuf>,

    /// Serve a non-loopback address without API keys: anyone who reaches it may publish,
    /// replay and redrive.
    #[arg(long, env = "AGENTBUS_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,

    /// Requests a second per API key on average, unless its entry sets its own.
    #[arg(long, env = "AGENTBUS_KEY_RATE", default_value_t = 1000.0)]
    pub key_rate: f64,

    /// Longest a request may take before it is answered 503.
    #[arg(long, env = "AGENTBUS_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// How long in-flight requests may take to finish after SIGTERM.
    #[arg(long, env = "AGENTBUS_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// How agentbus creates the topics it writes to.
#[derive(Debug, Clone, clap::Args)]
pub struct TopicArgs {
    /// Partitions of the event topics agentbus creates.
    #[arg(
        long = "topic-partitions",
        env = "AGENTBUS_TOPIC_PARTITIONS",
        default_value_t = 3
    )]
    pub partitions: i32,

    /// Replication factor of the topics agentbus creates (3 on a production cluster).
    #[arg(
        long = "topic-replication",
        env = "AGENTBUS_TOPIC_REPLICATION",
        default_value_t = 1
    )]
    pub replication: i32,

    /// Retention of the event topics.
    #[arg(long = "topic-retention", env = "AGENTBUS_TOPIC_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub retention: Duration,
}

/// The earliest time a user may give: year 0 (the start of 0000-01-01, UTC).
const EARLIEST_MS: i64 = -62_167_219_200_000;

/// The latest time a user may give: the end of year 9999 (UTC).
const LATEST_MS: i64 = 253_402_300_799_999;

/// Why a time given by a user is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    /// Neither form parses.
    #[error("{0:?} is neither an RFC 3339 time nor a duration like 2h")]
    Unparsable(String),
    /// Not an RFC 3339 time (where only that form is accepted).
    #[error("{0:?} is not an RFC 3339 time (like 2026-01-01T00:00:00Z)")]
    NotRfc3339(String),
    /// A time or duration outside the years 0 to 9999.
    #[error("{0:?} is out of range: times must fall in the years 0 to 9999")]
    OutOfRange(String),
}

/// RFC 3339, or a duration back from now (`30m`, `2h`, `1day`), as a time to look for in
/// Kafka. Every time lies in the years 0 to 9999 (RFC 3339's own range): a duration reaching
/// further back, or an RFC 3339 time an offset pushes out of it, is
/// [`TimeError::OutOfRange`], never an overflow. A time before 1970 (Kafka's first timestamp;
/// a negative one is a special value to the broker, or invalid) is taken as 1970-01-01: no
/// record is older.
pub fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::Utc>, TimeError> {
    parse_time_at(s, chrono::Utc::now())
}

/// An RFC 3339 time in the years 0 to 9999 (UTC); a duration is not accepted.
pub fn parse_rfc3339(s: &str) -> Result<chrono::DateTime<chrono::Utc>, TimeError> {
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map_err(|_| TimeError::NotRfc3339(s.to_string()))?
        .to_utc();
    if (EARLIEST_MS..=LATEST_MS).contains(&t.timestamp_millis()) {
        Ok(t)
    } else {
        Err(TimeError::OutOfRange(s.to_string()))
    }
}

/// [`parse_time`] with `now` given, so that tests need not depend on the clock.
pub fn parse_time_at(
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<chrono::DateTime<chrono::Utc>, TimeError> {
    let out_of_range = || TimeError::OutOfRange(s.to_string());
    let in_range = |t: chrono::DateTime<chrono::Utc>| {
        if (EARLIEST_MS..=LATEST_MS).contains(&t.timestamp_millis()) {
            Ok(t.max(chrono::DateTime::UNIX_EPOCH))
        } else {
            Err(out_of_range())
        }
    };
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return in_range(t.to_utc());
    }
    let back = humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => out_of_range(),
        _ => TimeError::Unparsable(s.to_string()),
    })?;
    let back = chrono::Duration::from_std(back).map_err(|_| out_of_range())?;
    now.checked_sub_signed(back)
        .ok_or_else(out_of_range)
        .and_then(in_range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> chrono::DateTime<chrono::Utc> {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_duration_back_from_now_or_an_rfc_3339_time() {
        assert_eq!(
            parse_time_at("2h", now()).unwrap(),
            "2026-12-01T10:00:00Z"
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap()
        );
        assert_eq!(
            parse_time_at("2026-01-01T00:00:00+01:00", now()).unwrap(),
            "2025-12-31T23:00:00Z"
                .parse::<chrono::DateTime<chrono::Utc>>()
                .unwrap()
        );
        assert!(matches!(
            parse_time_at("yesterday", now()),
            Err(TimeError::Unparsable(_))
        ));
    }

    #[test]
    fn times_outside_the_years_0_to_9999_are_refused_not_overflowed() {
        for s in [
            "1000000years",
            "2030years",
            "10000years",
            "18446744073709551615s",
            "99999999999999999999999999years",
            "584542046090years",
            "9999-12-31T23:59:59-01:00",
            "0000-01-01T00:00:00+01:00",
        ] {
            assert_eq!(
                parse_time_at(s, now()),
                Err(TimeError::OutOfRange(s.to_string())),
                "{s}"
            );
        }
        // The edges themselves are fine.
        assert!(parse_time_at("9999-12-31T23:59:59Z", now()).is_ok());
        // Before Kafka's first timestamp: from its beginning.
        for early in ["0000-01-01T00:00:00Z", "1960-01-01T00:00:00Z", "2000years"] {
            assert_eq!(
                parse_time_at(early, now()),
                Ok(chrono::DateTime::UNIX_EPOCH),
                "{early}"
            );
        }
    }
}

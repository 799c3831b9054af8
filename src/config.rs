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

    /// How every Kafka client of agentbus connects (TLS, SASL) and how its producers compress.
    #[command(flatten)]
    pub client: ClientArgs,
}

impl Default for KafkaArgs {
    /// The defaults of the flags: a local broker, no prefix, plaintext, lz4.
    fn default() -> Self {
        KafkaArgs {
            brokers: "127.0.0.1:9092".into(),
            topic_prefix: String::new(),
            broker_quirks: crate::broker::BrokerQuirks::None,
            client: ClientArgs::default(),
        }
    }
}

/// The security protocol of the connections to the brokers (librdkafka's `security.protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    Plaintext,
    /// TLS; the broker's certificate is verified against the CA (`--kafka-ssl-ca-location`,
    /// or the system's trust store).
    Ssl,
    /// SASL authentication without TLS: the credentials of PLAIN cross the network in clear.
    SaslPlaintext,
    /// SASL authentication over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
}

/// The SASL mechanism (librdkafka's `sasl.mechanism`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    /// User name and password sent as they are (use it over TLS only).
    #[value(name = "PLAIN", alias = "plain")]
    Plain,
    /// Salted challenge-response; the password never crosses the network.
    #[value(name = "SCRAM-SHA-256", alias = "scram-sha-256")]
    ScramSha256,
    /// As SCRAM-SHA-256 with SHA-512.
    #[value(name = "SCRAM-SHA-512", alias = "scram-sha-512")]
    ScramSha512,
    /// OAuth bearer tokens (librdkafka's `sasl.oauthbearer.*` settings through
    /// `AGENTBUS_KAFKA_SASL_OAUTHBEARER_*`).
    #[value(name = "OAUTHBEARER", alias = "oauthbearer")]
    OauthBearer,
    /// Kerberos (librdkafka's `sasl.kerberos.*` settings through
    /// `AGENTBUS_KAFKA_SASL_KERBEROS_*`).
    #[value(name = "GSSAPI", alias = "gssapi")]
    Gssapi,
}

impl SaslMechanism {
    fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OauthBearer => "OAUTHBEARER",
            SaslMechanism::Gssapi => "GSSAPI",
        }
    }
}

/// The codec agentbus's producers compress record batches with (librdkafka's
/// `compression.type`). Consumers read every codec whatever this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[value(rename_all = "lowercase")]
pub enum Compression {
    /// Uncompressed batches.
    None,
    /// The most widely readable codec; the slowest of these.
    Gzip,
    /// Fast, a lower ratio than lz4 on typical Avro payloads.
    Snappy,
    /// The default: the least CPU per byte saved, which on the publish path (acks=all, a few
    /// ms of linger) matters more than the last percent of ratio.
    #[default]
    Lz4,
    /// The best ratio at more CPU; needs brokers ≥ 2.1.
    Zstd,
}

impl Compression {
    /// librdkafka's name of the codec.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

/// A setting that must never be printed: its `Debug` says `<redacted>`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that hands it to librdkafka.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.to_string())
    }
}

/// How the Kafka clients connect and compress. Each is also reachable as the librdkafka
/// setting it names; anything not here passes through as `AGENTBUS_KAFKA_<NAME>`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl` (librdkafka's default: plaintext).
    #[arg(
        long,
        env = "AGENTBUS_KAFKA_SECURITY_PROTOCOL",
        value_enum,
        ignore_case = true
    )]
    pub kafka_security_protocol: Option<SecurityProtocol>,

    /// `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512`, `OAUTHBEARER` or `GSSAPI` (with a SASL protocol).
    #[arg(
        long,
        env = "AGENTBUS_KAFKA_SASL_MECHANISM",
        value_enum,
        ignore_case = true
    )]
    pub kafka_sasl_mechanism: Option<SaslMechanism>,

    /// The SASL user name.
    #[arg(long, env = "AGENTBUS_KAFKA_SASL_USERNAME")]
    pub kafka_sasl_username: Option<String>,

    /// The SASL password. Prefer the environment variable to the flag (a flag shows in
    /// `ps`); it is never logged.
    #[arg(long, env = "AGENTBUS_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<Secret>,

    /// PEM file of the CA certificates that sign the brokers' certificates (default: the
    /// system's trust store).
    #[arg(long, env = "AGENTBUS_KAFKA_SSL_CA_LOCATION")]
    pub kafka_ssl_ca_location: Option<PathBuf>,

    /// PEM file of agentbus's own certificate, for brokers that authenticate clients by TLS.
    #[arg(long, env = "AGENTBUS_KAFKA_SSL_CERTIFICATE_LOCATION")]
    pub kafka_ssl_certificate_location: Option<PathBuf>,

    /// PEM file of the key of that certificate.
    #[arg(long, env = "AGENTBUS_KAFKA_SSL_KEY_LOCATION")]
    pub kafka_ssl_key_location: Option<PathBuf>,

    /// The password of that key, if it is encrypted; never logged.
    #[arg(long, env = "AGENTBUS_KAFKA_SSL_KEY_PASSWORD", hide_env_values = true)]
    pub kafka_ssl_key_password: Option<Secret>,

    /// The codec of agentbus's producers: `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    #[arg(
        long,
        env = "AGENTBUS_COMPRESSION",
        value_enum,
        ignore_case = true,
        default_value_t
    )]
    pub compression: Compression,
}

impl ClientArgs {
    /// The librdkafka settings these stand for, secrets included.
    fn settings(&self) -> Vec<(&'static str, String)> {
        let path = |p: &PathBuf| p.display().to_string();
        let mut out = Vec::new();
        if let Some(p) = self.kafka_security_protocol {
            out.push(("security.protocol", p.as_str().to_string()));
        }
        if let Some(m) = self.kafka_sasl_mechanism {
            out.push(("sasl.mechanism", m.as_str().to_string()));
        }
        if let Some(u) = &self.kafka_sasl_username {
            out.push(("sasl.username", u.clone()));
        }
        if let Some(p) = &self.kafka_sasl_password {
            out.push(("sasl.password", p.expose().to_string()));
        }
        if let Some(p) = &self.kafka_ssl_ca_location {
            out.push(("ssl.ca.location", path(p)));
        }
        if let Some(p) = &self.kafka_ssl_certificate_location {
            out.push(("ssl.certificate.location", path(p)));
        }
        if let Some(p) = &self.kafka_ssl_key_location {
            out.push(("ssl.key.location", path(p)));
        }
        if let Some(p) = &self.kafka_ssl_key_password {
            out.push(("ssl.key.password", p.expose().to_string()));
        }
        out
    }
}

/// `AGENTBUS_KAFKA_*` variables that are not librdkafka settings: the typed settings above
/// (clap reads them), and the local broker script's own.
const NOT_PASSED_THROUGH: &[&str] = &[
    "SECURITY_PROTOCOL",
    "SASL_MECHANISM",
    "SASL_USERNAME",
    "SASL_PASSWORD",
    "SSL_CA_LOCATION",
    "SSL_CERTIFICATE_LOCATION",
    "SSL_KEY_LOCATION",
    "SSL_KEY_PASSWORD",
    "CACHE",
];

impl KafkaArgs {
    /// A librdkafka configuration with the bootstrap servers, the security settings of
    /// [`ClientArgs`] and every extra setting given as `AGENTBUS_KAFKA_<NAME>` (upper case,
    /// `_` for `.`): `AGENTBUS_KAFKA_SSL_ENDPOINT_IDENTIFICATION_ALGORITHM=none` sets
    /// `ssl.endpoint.identification.algorithm=none`.
    pub fn client_config(&self) -> ClientConfig {
        self.client_config_with(&[])
    }

    /// Like [`KafkaArgs::client_config`], with `defaults` set first so that an
    /// `AGENTBUS_KAFKA_*` variable can still override each of them. A producer's defaults
    /// (those that set `acks`) also get `compression.type` from `--compression`; consumers
    /// and admin clients do not, since librdkafka warns about a producer setting on them.
    pub fn client_config_with(&self, defaults: &[(&str, String)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        if defaults.iter().any(|(name, _)| *name == "acks") {
            config.set("compression.type", self.client.compression.as_str());
        }
        for (name, value) in defaults {
            config.set(*name, value);
        }
        for (name, value) in self.client.settings() {
            config.set(name, value);
        }
        for (name, value) in std::env::vars() {
            if let Some(setting) = name.strip_prefix("AGENTBUS_KAFKA_")
                && !NOT_PASSED_THROUGH.contains(&setting)
            {
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

    /// Most publish requests worked on at once; one more is refused at once (503 with
    /// `Retry-After`, its body unread) rather than queued behind them. 1024: publishes wait
    /// on the broker through a leader failover (a SIGKILLed broker stalls its partitions'
    /// writes until it is fenced, seconds), and at 200 single events/s a 2.6 s stall already
    /// held over 500 in flight: 256 shed them while two of three brokers were up. 64 shed 9%
    /// of 1 000 single events/s on a busy machine.
    #[arg(long, env = "AGENTBUS_MAX_PUBLISHES_IN_FLIGHT", default_value_t = 1024)]
    pub max_publishes_in_flight: usize,

    /// Most HTTP connections held open at once. One more is answered `503` with
    /// `Retry-After` at once and closed: every connection costs memory (buffers, a task),
    /// and clients that open one per request they wait on must not grow the service
    /// without bound. Above the publishes in flight, since HTTP/1.1 carries one request at
    /// a time per connection; 2048 idle connections cost about 40 MiB. Mind the process's
    /// file descriptor limit (`ulimit -n`).
    #[arg(long, env = "AGENTBUS_MAX_CONNECTIONS", default_value_t = 2048)]
    pub max_connections: usize,

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

    /// Replication factor of the topics agentbus creates: a number, or `auto` (the default)
    /// for min(3, the brokers in the cluster) when each topic is created. Every topic also
    /// gets `min.insync.replicas` 2 from three replicas on, 1 below. A number above the
    /// brokers in the cluster stops the start with an error naming both.
    #[arg(
        long = "topic-replication",
        env = "AGENTBUS_TOPIC_REPLICATION",
        default_value = "auto",
        value_parser = parse_replication
    )]
    pub replication: i32,

    /// Retention of the event topics.
    #[arg(long = "topic-retention", env = "AGENTBUS_TOPIC_RETENTION", default_value = "30days", value_parser = humantime::parse_duration)]
    pub retention: Duration,
}

/// A `--topic-replication`: `auto` ([`crate::topics::AUTO_REPLICATION`]) or a positive number.
fn parse_replication(text: &str) -> Result<i32, String> {
    if text.eq_ignore_ascii_case("auto") {
        return Ok(crate::topics::AUTO_REPLICATION);
    }
    match text.parse::<i32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "{text:?} is neither `auto` nor a replication factor of 1 or more"
        )),
    }
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

    #[test]
    fn a_topic_replication_is_auto_or_a_positive_number() {
        assert_eq!(
            parse_replication("auto"),
            Ok(crate::topics::AUTO_REPLICATION)
        );
        assert_eq!(parse_replication("3"), Ok(3));
        for bad in ["0", "-1", "three", ""] {
            assert!(parse_replication(bad).is_err(), "{bad:?} accepted");
        }
    }

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

#[cfg(test)]
mod kafka_args_tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kafka: KafkaArgs,
    }

    fn parse(args: &[&str]) -> KafkaArgs {
        Cli::try_parse_from(std::iter::once("agentbus").chain(args.iter().copied()))
            .unwrap()
            .kafka
    }

    #[test]
    fn security_flags_become_librdkafka_settings_and_the_secrets_stay_out_of_debug() {
        let kafka = parse(&[
            "--kafka-security-protocol",
            "SASL_SSL",
            "--kafka-sasl-mechanism",
            "scram-sha-512",
            "--kafka-sasl-username",
            "alice",
            "--kafka-sasl-password",
            "s3cr3t-pw",
            "--kafka-ssl-ca-location",
            "/etc/ca.pem",
            "--kafka-ssl-key-password",
            "k3y-pw",
        ]);
        let config = kafka.client_config();
        assert_eq!(config.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("sasl.username"), Some("alice"));
        assert_eq!(config.get("sasl.password"), Some("s3cr3t-pw"));
        assert_eq!(config.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(config.get("ssl.key.password"), Some("k3y-pw"));
        let printed = format!("{kafka:?}");
        assert!(!printed.contains("s3cr3t-pw"), "{printed}");
        assert!(!printed.contains("k3y-pw"), "{printed}");
        assert!(printed.contains("alice"), "{printed}");
    }

    #[test]
    fn only_producers_get_the_compression_codec_and_lz4_is_the_default() {
        let kafka = parse(&[]);
        assert_eq!(kafka.client.compression, Compression::Lz4);
        let producer = kafka.client_config_with(&[("acks", "all".into())]);
        assert_eq!(producer.get("compression.type"), Some("lz4"));
        assert_eq!(kafka.client_config().get("compression.type"), None);
        for codec in ["none", "gzip", "snappy", "lz4", "ZSTD"] {
            let kafka = parse(&["--compression", codec]);
            let producer = kafka.client_config_with(&[("acks", "all".into())]);
            assert_eq!(
                producer.get("compression.type"),
                Some(codec.to_ascii_lowercase().as_str())
            );
        }
        assert!(Cli::try_parse_from(["agentbus", "--compression", "brotli"]).is_err());
    }

    #[test]
    fn librdkafka_is_built_with_every_codec_tls_and_scram() {
        let features = ClientConfig::new()
            .create_native_config()
            .unwrap()
            .get("builtin.features")
            .unwrap();
        let features: Vec<&str> = features.split(',').collect();
        for wanted in ["gzip", "snappy", "lz4", "zstd", "ssl", "sasl_scram"] {
            assert!(features.contains(&wanted), "{wanted} not in {features:?}");
        }
    }

    #[test]
    fn every_codec_is_built_into_librdkafka() {
        // librdkafka refuses a codec it was built without at client creation.
        for codec in ["gzip", "snappy", "lz4", "zstd"] {
            let kafka = parse(&["--brokers", "127.0.0.1:1", "--compression", codec]);
            let producer: Result<rdkafka::producer::BaseProducer, _> =
                kafka.client_config_with(&[("acks", "all".into())]).create();
            assert!(producer.is_ok(), "{codec}: {:?}", producer.err());
        }
    }
}

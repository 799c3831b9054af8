//! What a topic takes, so that an event that can never be written is refused before it is
//! produced, instead of failing in librdkafka or at the broker (once answered 503, which a
//! client retries forever): the largest record (413), and the timestamps it accepts and
//! keeps (400; see [`Timestamps`]).
//!
//! Two limits apply to a record: the producer's `message.max.bytes` (librdkafka refuses a
//! record whose value, key, headers and record overhead exceed it) and the topic's
//! `max.message.bytes` (the broker refuses a record batch larger than it; a lone record's batch
//! adds [`BATCH_OVERHEAD`]). The topic's is read from the broker's topic configuration
//! (DescribeConfigs) and cached for [`KNOWN_FOR`]; the same answer gives the timestamp
//! bounds.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig,
    admin::{AdminClient, AdminOptions, ResourceSpecifier},
    client::DefaultClientContext,
};

/// librdkafka's default `message.max.bytes`.
pub const LIBRDKAFKA_DEFAULT_MAX: usize = 1_000_000;

/// librdkafka's default `batch.size`.
pub const LIBRDKAFKA_DEFAULT_BATCH: usize = 1_000_000;

/// Kafka's default `max.message.bytes` of a topic (the broker's `message.max.bytes`).
pub const KAFKA_DEFAULT_TOPIC_MAX: usize = 1_048_588;

/// The most a record adds to its key, value and headers (librdkafka's
/// `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: length, attributes, timestamp and offset deltas, key and
/// value lengths, header count, as varints at their widest).
pub const RECORD_OVERHEAD: usize = 36;

/// What a record batch adds around its records (the v2 batch header).
pub const BATCH_OVERHEAD: usize = 61;

/// How long a topic's limit read from the broker is used before it is read again.
const KNOWN_FOR: Duration = Duration::from_secs(60);

/// How long a failure to read a topic's limit is remembered (the producer's limit alone
/// applies meanwhile) before it is tried again.
const UNKNOWN_FOR: Duration = Duration::from_secs(10);

/// Longest the broker's answer about a topic's configuration is waited for.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Kafka's default `message.timestamp.after.max.ms` (the broker's
/// `log.message.timestamp.after.max.ms`, one hour since Kafka 3.6): the bound on a timestamp
/// ahead of the broker's clock when the broker did not tell the topic's.
pub const KAFKA_DEFAULT_AFTER_MAX_MS: i64 = 3_600_000;

/// The least retention an event must have left when it is written. Kafka deletes a segment
/// once its newest record is older than `retention.ms`, at each retention check
/// (`log.retention.check.interval.ms`: 5 minutes by default, 60 s in ops/broker.sh, unknown
/// to a client): an event older than `retention.ms` less a few minutes may be gone before any
/// consumer reads it, although its publish answered 200. An hour covers a retention check at
/// Kafka's default interval twelve times over, clock skew between agentbus and the broker, and
/// leaves agents that keep up time to read the event. On a topic that keeps records less than
/// two hours, half its retention is asked instead (see [`retention_margin_ms`]), or no event
/// could be written at all.
pub const RETENTION_LEFT_MS: i64 = 3_600_000;

/// The retention an event must have left on a topic that keeps records `retention_ms`:
/// [`RETENTION_LEFT_MS`], or half the retention on a topic that keeps records less than two
/// hours.
pub fn retention_margin_ms(retention_ms: i64) -> i64 {
    RETENTION_LEFT_MS.min(retention_ms / 2)
}

/// What each topic takes: the largest record, and the timestamps it takes and keeps.
pub struct TopicLimits {
    producer_max: usize,
    /// With compression the broker's limit applies to the compressed batch, which is not
    /// known before producing: then only the producer's limit is checked up front.
    compressed: bool,
    shared: Arc<Shared>,
}

/// What the background refreshes share with the publish path.
struct Shared {
    config: ClientConfig,
    /// The retention agentbus gives the topics it creates (`--topic-retention`): stands in
    /// for a topic's `retention.ms` when the broker did not tell it.
    retention_ms: i64,
    /// Made when first needed; a failure to make it is tried again next time (a client
    /// that could not be made once is not "none" for good).
    admin: Mutex<Option<Arc<AdminClient<DefaultClientContext>>>>,
    topics: Mutex<HashMap<String, Known>>,
}

/// What is known of a topic's configuration.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// `None`: the broker did not tell.
    config: Option<TopicConfig>,
    at: Instant,
    /// A refresh is under way (one per topic at a time).
    refreshing: bool,
}

/// What one DescribeConfigs answer told of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TopicConfig {
    /// `max.message.bytes`; `None`: not in the answer.
    max: Option<usize>,
    /// The bounds on a record's timestamp, with defaults for what the answer left out.
    timestamps: Timestamps,
}

/// What a topic takes now (see [`TopicLimits::of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// The largest record.
    pub size: Limit,
    /// The timestamps it takes and keeps.
    pub timestamps: Timestamps,
}

/// The bounds a topic puts on a record's timestamp (its CreateTime), relative to now: the
/// broker refuses a timestamp further ahead than `message.timestamp.after.max.ms` or further
/// back than `message.timestamp.before.max.ms` (INVALID_TIMESTAMP), and deletes a record older
/// than `retention.ms` at its next retention check. With `message.timestamp.type`
/// LogAppendTime the broker stamps records itself and no bound applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamps {
    /// How far ahead of now a timestamp may be; `None`: no bound.
    pub ahead: Option<Bound>,
    /// How far back from now a timestamp may be; `None`: no bound.
    pub behind: Option<Bound>,
}

/// One bound on a timestamp, and where it comes from (for the refusal's message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The most milliseconds a timestamp may be ahead of (or behind) now.
    pub ms: i64,
    /// The topic setting's value, in ms: `ms` itself, or for `retention.ms` `ms` plus
    /// [`retention_margin_ms`].
    pub setting_ms: i64,
    /// The topic setting it comes from.
    pub setting: Setting,
    /// Whether the broker told it; false: a default stands in.
    pub told: bool,
}

/// The topic settings that bound a timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// `message.timestamp.after.max.ms`.
    AfterMax,
    /// `message.timestamp.before.max.ms`.
    BeforeMax,
    /// `message.timestamp.difference.max.ms` (brokers before Kafka 3.6; both ways).
    DifferenceMax,
    /// `retention.ms`.
    Retention,
}

impl Setting {
    /// The topic config's name.
    pub fn name(self) -> &'static str {
        match self {
            Setting::AfterMax => "message.timestamp.after.max.ms",
            Setting::BeforeMax => "message.timestamp.before.max.ms",
            Setting::DifferenceMax => "message.timestamp.difference.max.ms",
            Setting::Retention => "retention.ms",
        }
    }
}

impl Timestamps {
    /// What applies when the broker did not tell a topic's configuration: Kafka's default
    /// `message.timestamp.after.max.ms` ahead, and behind the retention agentbus gives the
    /// topics it creates (`retention_ms`; negative: unlimited).
    pub fn defaults(retention_ms: i64) -> Self {
        Timestamps {
            ahead: Some(Bound {
                ms: KAFKA_DEFAULT_AFTER_MAX_MS,
                setting_ms: KAFKA_DEFAULT_AFTER_MAX_MS,
                setting: Setting::AfterMax,
                told: false,
            }),
            behind: retention_bound(retention_ms, false),
        }
    }

    /// Why a record of `topic` stamped `at_ms` would be refused by the broker or deleted
    /// before it can be read, `now_ms` being now (both ms since 1970); `None` when it fits.
    /// Two comparisons when it fits: the message is made only for a refusal.
    pub fn refuse(&self, at_ms: i64, now_ms: i64, topic: &str) -> Option<String> {
        if let Some(b) = self.ahead
            && at_ms > now_ms.saturating_add(b.ms)
        {
            return Some(format!(
                "the timestamp is {} in the future; topic {topic} takes timestamps at most {} \
                 ahead of the broker's clock ({}), so the broker would refuse it",
                human(at_ms.saturating_sub(now_ms)),
                human(b.setting_ms),
                b.source()
            ));
        }
        if let Some(b) = self.behind
            && at_ms < now_ms.saturating_sub(b.ms)
        {
            let age = now_ms.saturating_sub(at_ms);
            return Some(match b.setting {
                Setting::Retention if age >= b.setting_ms => format!(
                    "the timestamp is {} old; topic {topic} keeps records {} ({}), so Kafka \
                     would delete it at once",
                    human(age),
                    human(b.setting_ms),
                    b.source()
                ),
                Setting::Retention => format!(
                    "the timestamp is {} old; topic {topic} keeps records {} ({}), so Kafka \
                     would delete it within {}; agentbus takes an event only with at least {} \
                     of retention left, so that consumers can read it",
                    human(age),
                    human(b.setting_ms),
                    b.source(),
                    human(b.setting_ms.saturating_sub(age)),
                    human(b.setting_ms.saturating_sub(b.ms))
                ),
                _ => format!(
                    "the timestamp is {} old; topic {topic} takes timestamps at most {} old ({}), \
                     so the broker would refuse it",
                    human(age),
                    human(b.setting_ms),
                    b.source()
                ),
            });
        }
        None
    }
}

impl Bound {
    /// The setting's name, and where its value comes from when the broker did not tell it.
    fn source(&self) -> String {
        match (self.told, self.setting) {
            (true, s) => s.name().to_string(),
            (false, Setting::Retention) => format!(
                "{}: the broker did not tell the topic's, so the retention agentbus gives \
                 the topics it creates (--topic-retention)",
                Setting::Retention.name()
            ),
            (false, s) => format!(
                "{}: the broker did not tell the topic's, so Kafka's default",
                s.name()
            ),
        }
    }
}

/// The bound behind now that a `retention.ms` of `retention_ms` gives (negative: unlimited).
fn retention_bound(retention_ms: i64, told: bool) -> Option<Bound> {
    (retention_ms >= 0).then(|| Bound {
        ms: retention_ms.saturating_sub(retention_margin_ms(retention_ms)),
        setting_ms: retention_ms,
        setting: Setting::Retention,
        told,
    })
}

/// `ms` for a person, in whole seconds (milliseconds below one) as humantime writes and
/// parses durations, but in days at most: humantime's months (30.44 days) would put a
/// 45-day-old timestamp at "1month 14days 13h 26m 24s".
fn human(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms / 1000;
    let (days, hours, minutes, seconds) =
        (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    let mut parts = Vec::new();
    match days {
        0 => {}
        1 => parts.push("1day".to_string()),
        d => parts.push(format!("{d}days")),
    }
    for (n, unit) in [(hours, "h"), (minutes, "m"), (seconds, "s")] {
        if n > 0 {
            parts.push(format!("{n}{unit}"));
        }
    }
    parts.join(" ")
}

/// A topic's configuration from a DescribeConfigs answer (`value(name)`: the entry's value,
/// `None` when the answer has no such entry); `retention_ms` stands in for a `retention.ms`
/// it does not tell.
fn parse<'a>(value: impl Fn(&str) -> Option<&'a str>, retention_ms: i64) -> TopicConfig {
    let number = |name: &str| value(name).and_then(|v| v.trim().parse::<i64>().ok());
    let max = value("max.message.bytes").and_then(|v| v.trim().parse().ok());
    let log_append_time = value("message.timestamp.type")
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("LogAppendTime"));
    if log_append_time {
        // The broker stamps each record with its own clock when appending it: the event's
        // timestamp is not the record's, and neither bound nor retention concerns it.
        return TopicConfig {
            max,
            timestamps: Timestamps {
                ahead: None,
                behind: None,
            },
        };
    }
    // A bound as told: `Some(None)` for Long.MAX_VALUE, Kafka's "no bound"; `None`: not
    // told (absent, unparsable or negative). Brokers before Kafka 3.6 know one bound both
    // ways, difference.max.ms; later ones two (KIP-937).
    let told = |setting: Setting| {
        let bound = |ms: i64| {
            (ms < i64::MAX).then_some(Bound {
                ms,
                setting_ms: ms,
                setting,
                told: true,
            })
        };
        number(setting.name()).filter(|ms| *ms >= 0).map(bound)
    };
    let difference = told(Setting::DifferenceMax);
    let ahead = told(Setting::AfterMax)
        .or(difference)
        .unwrap_or(Timestamps::defaults(retention_ms).ahead);
    // Kafka's default before.max.ms is Long.MAX_VALUE: no bound when not told.
    let before = told(Setting::BeforeMax).or(difference).flatten();
    // Only a topic whose cleanup.policy includes delete loses records to time: a compacted
    // one keeps each key's latest record whatever its age.
    let deletes = value("cleanup.policy").is_none_or(|p| {
        p.split(',')
            .any(|p| p.trim().eq_ignore_ascii_case("delete"))
    });
    let retention = if !deletes {
        None
    } else {
        match number(Setting::Retention.name()) {
            Some(ms) => retention_bound(ms, true),
            None => retention_bound(retention_ms, false),
        }
    };
    let behind = match (retention, before) {
        (Some(r), Some(b)) => Some(if b.ms < r.ms { b } else { r }),
        (r, b) => r.or(b),
    };
    TopicConfig {
        max,
        timestamps: Timestamps { ahead, behind },
    }
}

/// Why a record cannot be written, for the 413's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// The most bytes a record (key, value, headers and record overhead) may have.
    pub max_record: usize,
    /// The producer's `message.max.bytes`.
    pub producer_max: usize,
    /// The topic's `max.message.bytes`, when the broker told it.
    pub topic_max: Option<usize>,
}

impl Limit {
    /// `max_record`, explained.
    pub fn explain(&self, topic: &str) -> String {
        match self.topic_max {
            Some(t) => format!(
                "at most {} bytes fit in a record of {topic} (the smaller of the producer's \
                 message.max.bytes {} and the topic's max.message.bytes {t} less {BATCH_OVERHEAD} \
                 bytes of batch overhead)",
                self.max_record, self.producer_max
            ),
            None => format!(
                "at most {} bytes fit in a record (the producer's message.max.bytes)",
                self.max_record
            ),
        }
    }
}

/// The bytes one header takes in a record: its name and value, each with its length varint
/// at its widest.
pub fn header_size(name: usize, value: usize) -> usize {
    (5 + name).saturating_add(5).saturating_add(value)
}

/// The bytes a record takes against the limits: key, value, headers (each name and value
/// with their length varints at their widest) and [`RECORD_OVERHEAD`].
pub fn record_size<'a>(
    key: usize,
    value: usize,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> usize {
    let headers: usize = headers
        .into_iter()
        .map(|(k, v)| header_size(k.len(), v.len()))
        .sum();
    RECORD_OVERHEAD
        .saturating_add(key)
        .saturating_add(value)
        .saturating_add(headers)
}

impl TopicLimits {
    /// The limits of a producer built from `producer` (see [`super::producer_config`]); the
    /// same settings reach the broker for topic configurations. `retention` is the one
    /// agentbus gives the topics it creates: it stands in for a topic's `retention.ms` when
    /// the broker does not tell it.
    pub fn new(producer: &ClientConfig, retention: Duration) -> Self {
        let producer_max = producer
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(LIBRDKAFKA_DEFAULT_MAX);
        let compressed = ["compression.type", "compression.codec"].iter().any(|k| {
            producer
                .get(k)
                .is_some_and(|v| !v.eq_ignore_ascii_case("none"))
        });
        TopicLimits {
            producer_max,
            compressed,
            shared: Arc::new(Shared {
                config: producer.clone(),
                retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
                admin: Mutex::new(None),
                topics: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// What `topic` takes now. The broker is asked at most once per [`KNOWN_FOR`]
    /// ([`UNKNOWN_FOR`] after no answer), in the background: meanwhile the last known
    /// configuration is used, so that no publish waits for it (only the first for a topic
    /// does, once). `broker_up` false: the broker is not asked at all. Without its answer,
    /// the producer's size limit alone applies, and [`Timestamps::defaults`].
    pub async fn of(&self, topic: &str, broker_up: bool) -> Limits {
        self.limits(topic, broker_up, !self.compressed).await
    }

    /// Like [`TopicLimits::of`]'s size limit, with the topic's limit also when the producer
    /// compresses: after the broker refused a batch as too large, an event that is over the
    /// topic's limit even uncompressed is the likely cause, and one under it fits alone
    /// whatever the codec does.
    pub async fn of_uncompressed(&self, topic: &str, broker_up: bool) -> Limit {
        self.limits(topic, broker_up, true).await.size
    }

    async fn limits(&self, topic: &str, broker_up: bool, with_topic: bool) -> Limits {
        let config = self.config(topic, broker_up).await;
        let topic_max = config.and_then(|c| c.max).filter(|_| with_topic);
        let max_record = match topic_max {
            Some(t) => self.producer_max.min(t.saturating_sub(BATCH_OVERHEAD)),
            None => self.producer_max,
        };
        Limits {
            size: Limit {
                max_record,
                producer_max: self.producer_max,
                topic_max,
            },
            timestamps: config.map_or_else(
                || Timestamps::defaults(self.shared.retention_ms),
                |c| c.timestamps,
            ),
        }
    }

    /// Drops what is known of `topic`: the next [`TopicLimits::of`] asks the broker and
    /// waits for the answer.
    pub fn forget(&self, topic: &str) {
        self.shared
            .topics
            .lock()
            .expect("topic limits lock")
            .remove(topic);
    }

    async fn config(&self, topic: &str, broker_up: bool) -> Option<TopicConfig> {
        {
            let mut topics = self.shared.topics.lock().expect("topic limits lock");
            match topics.get_mut(topic) {
                Some(known) => {
                    let valid = if known.config.is_some() {
                        KNOWN_FOR
                    } else {
                        UNKNOWN_FOR
                    };
                    if known.at.elapsed() >= valid && !known.refreshing && broker_up {
                        known.refreshing = true;
                        let (shared, topic) = (self.shared.clone(), topic.to_string());
                        // Single flight, off the request: the stale value serves meanwhile.
                        tokio::spawn(async move { shared.refresh(&topic).await });
                    }
                    return known.config;
                }
                None if !broker_up => return None,
                None => {
                    // The first request for the topic asks and waits; others meanwhile
                    // go with the defaults.
                    topics.insert(
                        topic.to_string(),
                        Known {
                            config: None,
                            at: Instant::now(),
                            refreshing: true,
                        },
                    );
                }
            }
        }
        self.shared.refresh(topic).await
    }
}

impl Shared {
    /// Asks the broker for `topic`'s configuration and records the answer.
    async fn refresh(&self, topic: &str) -> Option<TopicConfig> {
        let found = self.describe(topic).await;
        self.topics.lock().expect("topic limits lock").insert(
            topic.to_string(),
            Known {
                config: found,
                at: Instant::now(),
                refreshing: false,
            },
        );
        found
    }

    fn admin(&self) -> Option<Arc<AdminClient<DefaultClientContext>>> {
        let mut admin = self.admin.lock().expect("admin lock");
        if admin.is_none() {
            match self.config.create() {
                Ok(client) => *admin = Some(Arc::new(client)),
                Err(e) => {
                    tracing::warn!(error = %e, "no admin client to read topic configurations (tried again later)");
                }
            }
        }
        admin.clone()
    }

    async fn describe(&self, topic: &str) -> Option<TopicConfig> {
        let admin = self.admin()?;
        let options = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
        let resource = ResourceSpecifier::Topic(topic);
        let answer = tokio::time::timeout(
            DESCRIBE_TIMEOUT + Duration::from_secs(1),
            admin.describe_configs([&resource], &options),
        )
        .await;
        match answer {
            Ok(Ok(results)) => results.into_iter().next().and_then(|r| match r {
                Ok(config) => Some(parse(
                    |name| config.get(name).and_then(|e| e.value.as_deref()),
                    self.retention_ms,
                )),
                Err(code) => {
                    tracing::debug!(topic, %code, "topic configuration not described");
                    None
                }
            }),
            Ok(Err(e)) => {
                tracing::debug!(topic, error = %e, "topic configuration not described");
                None
            }
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_counts_key_value_headers_and_overhead() {
        assert_eq!(record_size(3, 10, []), RECORD_OVERHEAD + 13);
        assert_eq!(
            record_size(0, 0, [("ce_id", &b"1234"[..])]),
            RECORD_OVERHEAD + 5 + 5 + 5 + 4
        );
    }

    /// A cache entry for `topic`, as if the broker had told `max` (and no timestamp bound
    /// other than the defaults) `age` ago.
    fn seed(limits: &TopicLimits, topic: &str, max: Option<usize>, age: Duration) {
        limits.shared.topics.lock().unwrap().insert(
            topic.into(),
            Known {
                config: Some(TopicConfig {
                    max,
                    timestamps: Timestamps::defaults(limits.shared.retention_ms),
                }),
                at: Instant::now() - age,
                refreshing: false,
            },
        );
    }

    const DAY_MS: i64 = 24 * 3600 * 1000;

    #[tokio::test]
    async fn the_producer_limit_applies_alone_when_the_topic_is_unknown_or_compressed() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.max.bytes", "5000");
        let limits = TopicLimits::new(&config, Duration::from_secs(3600));
        assert_eq!(limits.producer_max, 5000);
        // Seeded cache: the topic's limit is below the producer's.
        seed(&limits, "t", Some(3000), Duration::ZERO);
        assert_eq!(
            limits.of("t", true).await.size.max_record,
            3000 - BATCH_OVERHEAD
        );
        config.set("compression.type", "zstd");
        let compressed = TopicLimits::new(&config, Duration::from_secs(3600));
        seed(&compressed, "t", Some(3000), Duration::ZERO);
        assert_eq!(compressed.of("t", true).await.size.max_record, 5000);
    }

    /// Review of issue 10, finding 8: an expired limit is refreshed in the background (one
    /// refresh for all), the last known one serving meanwhile; with the broker down, nobody
    /// waits for it.
    #[tokio::test]
    async fn no_publish_waits_for_the_broker_once_a_limit_is_known_or_the_broker_is_down() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.max.bytes", "5000");
        let limits = TopicLimits::new(&config, Duration::from_secs(3600));
        seed(&limits, "t", Some(3000), KNOWN_FOR + Duration::from_secs(1));
        let started = Instant::now();
        let answers = futures::future::join_all((0..20).map(|_| limits.of("t", true))).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(answers.iter().all(|l| l.size.topic_max == Some(3000)));
        assert!(limits.shared.topics.lock().unwrap()["t"].refreshing);
        // Broker down: an unknown topic is not asked about, and the defaults bound its
        // timestamps: Kafka's after.max, and the retention agentbus creates topics with.
        let started = Instant::now();
        let other = limits.of("other", false).await;
        assert_eq!(other.size.topic_max, None);
        assert_eq!(other.timestamps, Timestamps::defaults(3_600_000));
        assert_eq!(other.timestamps.behind.unwrap().setting_ms, 3_600_000);
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(!limits.shared.topics.lock().unwrap().contains_key("other"));
    }

    /// [`parse`] over `entries` as a DescribeConfigs answer would list them, with 30 days
    /// standing in for an untold retention.
    fn parsed(entries: &[(&str, &str)]) -> TopicConfig {
        parse(
            |name| entries.iter().find(|(n, _)| *n == name).map(|(_, v)| *v),
            30 * DAY_MS,
        )
    }

    /// What Apache Kafka 4.1 lists for a topic created with `retention.ms` 7 days (the
    /// entries that matter here).
    const KAFKA_4: &[(&str, &str)] = &[
        ("cleanup.policy", "delete"),
        ("max.message.bytes", "1048588"),
        ("message.timestamp.after.max.ms", "3600000"),
        ("message.timestamp.before.max.ms", "9223372036854775807"),
        ("message.timestamp.type", "CreateTime"),
        ("retention.ms", "604800000"),
    ];

    fn with(changes: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
        let mut entries: Vec<_> = KAFKA_4
            .iter()
            .filter(|(n, _)| !changes.iter().any(|(c, _)| c == n))
            .copied()
            .collect();
        entries.extend(changes.iter().filter(|(_, v)| !v.is_empty()));
        entries
    }

    #[test]
    fn a_topics_timestamp_bounds_come_from_its_after_max_and_retention_with_an_hour_left() {
        let c = parsed(KAFKA_4);
        assert_eq!(c.max, Some(1_048_588));
        let ahead = c.timestamps.ahead.unwrap();
        assert_eq!(
            (ahead.ms, ahead.setting, ahead.told),
            (3_600_000, Setting::AfterMax, true)
        );
        // before.max Long.MAX_VALUE is Kafka's "no bound": the retention decides.
        let behind = c.timestamps.behind.unwrap();
        assert_eq!(
            (behind.ms, behind.setting_ms, behind.setting, behind.told),
            (7 * DAY_MS - 3_600_000, 7 * DAY_MS, Setting::Retention, true)
        );
        // A before.max below the retention decides instead, without margin.
        let c = parsed(&with(&[("message.timestamp.before.max.ms", "86400000")]));
        let behind = c.timestamps.behind.unwrap();
        assert_eq!((behind.ms, behind.setting), (DAY_MS, Setting::BeforeMax));
        // A topic keeping records less than two hours asks half its retention left.
        let c = parsed(&with(&[("retention.ms", "600000")]));
        assert_eq!(c.timestamps.behind.unwrap().ms, 300_000);
    }

    #[test]
    fn unlimited_retention_compaction_and_log_append_time_lift_the_bounds() {
        let c = parsed(&with(&[("retention.ms", "-1")]));
        assert_eq!(c.timestamps.behind, None);
        assert!(c.timestamps.ahead.is_some());
        let c = parsed(&with(&[("cleanup.policy", "compact")]));
        assert_eq!(c.timestamps.behind, None);
        let c = parsed(&with(&[("cleanup.policy", "compact,delete")]));
        assert_eq!(c.timestamps.behind.unwrap().setting, Setting::Retention);
        // The broker stamps records itself: the event's timestamp is not bounded at all.
        let c = parsed(&with(&[("message.timestamp.type", "LogAppendTime")]));
        assert_eq!(
            c.timestamps,
            Timestamps {
                ahead: None,
                behind: None
            }
        );
        assert_eq!(c.max, Some(1_048_588));
        let c = parsed(&with(&[(
            "message.timestamp.after.max.ms",
            "9223372036854775807",
        )]));
        assert_eq!(c.timestamps.ahead, None);
    }

    #[test]
    fn what_the_broker_does_not_tell_gets_kafkas_default_after_max_and_agentbuss_retention() {
        let c = parsed(&[]);
        assert_eq!(c.max, None);
        assert_eq!(c.timestamps, Timestamps::defaults(30 * DAY_MS));
        let (ahead, behind) = (c.timestamps.ahead.unwrap(), c.timestamps.behind.unwrap());
        assert_eq!((ahead.ms, ahead.told), (KAFKA_DEFAULT_AFTER_MAX_MS, false));
        assert_eq!((behind.setting_ms, behind.told), (30 * DAY_MS, false));
        // Values that do not parse count as not told.
        let c = parsed(&with(&[
            ("retention.ms", "soon"),
            ("message.timestamp.after.max.ms", ""),
        ]));
        assert_eq!(c.timestamps, Timestamps::defaults(30 * DAY_MS));
        // A broker before 3.6 tells one bound for both ways.
        let c = parsed(&[
            ("message.timestamp.difference.max.ms", "60000"),
            ("retention.ms", "604800000"),
        ]);
        let (ahead, behind) = (c.timestamps.ahead.unwrap(), c.timestamps.behind.unwrap());
        assert_eq!((ahead.ms, ahead.setting), (60_000, Setting::DifferenceMax));
        assert_eq!(
            (behind.ms, behind.setting),
            (60_000, Setting::DifferenceMax)
        );
    }

    #[test]
    fn durations_read_in_days_hours_minutes_and_seconds() {
        assert_eq!(human(-5), "0ms");
        assert_eq!(human(999), "999ms");
        assert_eq!(human(1_999), "1s");
        assert_eq!(human(DAY_MS), "1day");
        assert_eq!(human(45 * DAY_MS + 3_723_000), "45days 1h 2m 3s");
        assert_eq!(human(i64::MAX), "106751991167days 7h 12m 55s");
    }

    #[test]
    fn a_refusal_names_the_bound_and_where_it_comes_from() {
        let now = 1_800_000_000_000;
        let t = parsed(KAFKA_4).timestamps;
        // Within the bounds: an hour ahead exactly, seven days less an hour back.
        assert_eq!(t.refuse(now + 3_600_000, now, "agent.events"), None);
        assert_eq!(
            t.refuse(now - 7 * DAY_MS + 3_600_000, now, "agent.events"),
            None
        );
        assert!(t.refuse(0, i64::MAX, "x").is_some(), "saturates");
        assert_eq!(
            t.refuse(now + 2 * 3_600_000, now, "agent.events").unwrap(),
            "the timestamp is 2h in the future; topic agent.events takes timestamps at most 1h \
             ahead of the broker's clock (message.timestamp.after.max.ms), so the broker would \
             refuse it"
        );
        assert_eq!(
            t.refuse(now - 45 * DAY_MS, now, "agent.events").unwrap(),
            "the timestamp is 45days old; topic agent.events keeps records 7days \
             (retention.ms), so Kafka would delete it at once"
        );
        assert_eq!(
            t.refuse(now - 7 * DAY_MS + 1_800_000, now, "agent.events")
                .unwrap(),
            "the timestamp is 6days 23h 30m old; topic agent.events keeps records 7days \
             (retention.ms), so Kafka would delete it within 30m; agentbus takes an event only \
             with at least 1h of retention left, so that consumers can read it"
        );
        let before = parsed(&with(&[("message.timestamp.before.max.ms", "86400000")])).timestamps;
        assert_eq!(
            before
                .refuse(now - 2 * DAY_MS, now, "agent.events")
                .unwrap(),
            "the timestamp is 2days old; topic agent.events takes timestamps at most 1day old \
             (message.timestamp.before.max.ms), so the broker would refuse it"
        );
        let defaults = Timestamps::defaults(30 * DAY_MS);
        let why = defaults
            .refuse(now - 31 * DAY_MS, now, "agent.events")
            .unwrap();
        assert!(
            why.contains("keeps records 30days (retention.ms: the broker did not tell"),
            "{why}"
        );
        assert!(why.contains("--topic-retention"), "{why}");
        let why = defaults.refuse(now + DAY_MS, now, "agent.events").unwrap();
        assert!(why.contains("so Kafka's default"), "{why}");
    }
}

//! The largest record a topic takes, so that an event that can never be written is refused
//! (413) before it is produced, instead of failing in librdkafka or at the broker (once
//! answered 503, which a client retries forever).
//!
//! Two limits apply to a record: the producer's `message.max.bytes` (librdkafka refuses a
//! record whose value, key, headers and record overhead exceed it) and the topic's
//! `max.message.bytes` (the broker refuses a record batch larger than it; a lone record's batch
//! adds [`BATCH_OVERHEAD`]). The topic's is read from the broker's topic configuration
//! (DescribeConfigs) and cached for [`KNOWN_FOR`].

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

/// The record size limit of each topic.
pub struct SizeLimits {
    producer_max: usize,
    /// With compression the broker's limit applies to the compressed batch, which is not
    /// known before producing: then only the producer's limit is checked up front.
    compressed: bool,
    shared: Arc<Shared>,
}

/// What the background refreshes share with the publish path.
struct Shared {
    config: ClientConfig,
    /// Made when first needed; a failure to make it is tried again next time (a client
    /// that could not be made once is not "none" for good).
    admin: Mutex<Option<Arc<AdminClient<DefaultClientContext>>>>,
    topics: Mutex<HashMap<String, Known>>,
}

/// What is known of a topic's limit.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// `None`: the broker did not tell.
    max: Option<usize>,
    at: Instant,
    /// A refresh is under way (one per topic at a time).
    refreshing: bool,
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

impl SizeLimits {
    /// The limits of a producer built from `producer` (see [`super::producer_config`]); the
    /// same settings reach the broker for topic configurations.
    pub fn new(producer: &ClientConfig) -> Self {
        let producer_max = producer
            .get("message.max.bytes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(LIBRDKAFKA_DEFAULT_MAX);
        let compressed = ["compression.type", "compression.codec"].iter().any(|k| {
            producer
                .get(k)
                .is_some_and(|v| !v.eq_ignore_ascii_case("none"))
        });
        SizeLimits {
            producer_max,
            compressed,
            shared: Arc::new(Shared {
                config: producer.clone(),
                admin: Mutex::new(None),
                topics: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The limit for a record of `topic` now. The broker is asked at most once per
    /// [`KNOWN_FOR`] ([`UNKNOWN_FOR`] after no answer), in the background: meanwhile the last
    /// known value is used, so that no publish waits for it (only the first for a topic
    /// does, once). `broker_up` false: the broker is not asked at all. Without its answer,
    /// the producer's limit alone applies.
    pub async fn of(&self, topic: &str, broker_up: bool) -> Limit {
        self.limit(topic, broker_up, !self.compressed).await
    }

    /// Like [`SizeLimits::of`], with the topic's limit also when the producer compresses:
    /// after the broker refused a batch as too large, an event that is over the topic's
    /// limit even uncompressed is the likely cause, and one under it fits alone whatever
    /// the codec does.
    pub async fn of_uncompressed(&self, topic: &str, broker_up: bool) -> Limit {
        self.limit(topic, broker_up, true).await
    }

    async fn limit(&self, topic: &str, broker_up: bool, with_topic: bool) -> Limit {
        let topic_max = if with_topic {
            self.topic_max(topic, broker_up).await
        } else {
            None
        };
        let max_record = match topic_max {
            Some(t) => self.producer_max.min(t.saturating_sub(BATCH_OVERHEAD)),
            None => self.producer_max,
        };
        Limit {
            max_record,
            producer_max: self.producer_max,
            topic_max,
        }
    }

    /// Drops what is known of `topic`'s limit: the next [`SizeLimits::of`] asks the broker
    /// and waits for the answer.
    pub fn forget(&self, topic: &str) {
        self.shared
            .topics
            .lock()
            .expect("size cache lock")
            .remove(topic);
    }

    async fn topic_max(&self, topic: &str, broker_up: bool) -> Option<usize> {
        {
            let mut topics = self.shared.topics.lock().expect("size cache lock");
            match topics.get_mut(topic) {
                Some(known) => {
                    let valid = if known.max.is_some() {
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
                    return known.max;
                }
                None if !broker_up => return None,
                None => {
                    // The first request for the topic asks and waits; others meanwhile
                    // go with the producer's limit.
                    topics.insert(
                        topic.to_string(),
                        Known {
                            max: None,
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
    /// Asks the broker for `topic`'s limit and records the answer.
    async fn refresh(&self, topic: &str) -> Option<usize> {
        let found = self.describe(topic).await;
        self.topics.lock().expect("size cache lock").insert(
            topic.to_string(),
            Known {
                max: found,
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
                    tracing::warn!(error = %e, "no admin client to read topic size limits (tried again later)");
                }
            }
        }
        admin.clone()
    }

    async fn describe(&self, topic: &str) -> Option<usize> {
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
                Ok(config) => config
                    .get("max.message.bytes")
                    .and_then(|e| e.value.as_deref())
                    .and_then(|v| v.parse().ok()),
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

    fn seed(limits: &SizeLimits, topic: &str, max: Option<usize>, age: Duration) {
        limits.shared.topics.lock().unwrap().insert(
            topic.into(),
            Known {
                max,
                at: Instant::now() - age,
                refreshing: false,
            },
        );
    }

    #[tokio::test]
    async fn the_producer_limit_applies_alone_when_the_topic_is_unknown_or_compressed() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.max.bytes", "5000");
        let limits = SizeLimits::new(&config);
        assert_eq!(limits.producer_max, 5000);
        // Seeded cache: the topic's limit is below the producer's.
        seed(&limits, "t", Some(3000), Duration::ZERO);
        assert_eq!(limits.of("t", true).await.max_record, 3000 - BATCH_OVERHEAD);
        config.set("compression.type", "zstd");
        let compressed = SizeLimits::new(&config);
        seed(&compressed, "t", Some(3000), Duration::ZERO);
        assert_eq!(compressed.of("t", true).await.max_record, 5000);
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
        let limits = SizeLimits::new(&config);
        seed(&limits, "t", Some(3000), KNOWN_FOR + Duration::from_secs(1));
        let started = Instant::now();
        let answers = futures::future::join_all((0..20).map(|_| limits.of("t", true))).await;
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
        assert!(answers.iter().all(|l| l.topic_max == Some(3000)));
        assert!(limits.shared.topics.lock().unwrap()["t"].refreshing);
        // Broker down: an unknown topic is not asked about.
        let started = Instant::now();
        assert_eq!(limits.of("other", false).await.topic_max, None);
        assert!(started.elapsed() < Duration::from_millis(500));
        assert!(!limits.shared.topics.lock().unwrap().contains_key("other"));
    }
}

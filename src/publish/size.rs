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
    sync::{Mutex, OnceLock},
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
    config: ClientConfig,
    producer_max: usize,
    /// With compression the broker's limit applies to the compressed batch, which is not
    /// known before producing: then only the producer's limit is checked up front.
    compressed: bool,
    admin: OnceLock<Option<AdminClient<DefaultClientContext>>>,
    topics: Mutex<HashMap<String, (Option<usize>, Instant)>>,
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

/// The bytes a record takes against the limits: key, value, headers (each name and value
/// with their length varints at their widest) and [`RECORD_OVERHEAD`].
pub fn record_size<'a>(
    key: usize,
    value: usize,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> usize {
    let headers: usize = headers
        .into_iter()
        .map(|(k, v)| 5 + k.len() + 5 + v.len())
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
            config: producer.clone(),
            producer_max,
            compressed,
            admin: OnceLock::new(),
            topics: Mutex::new(HashMap::new()),
        }
    }

    /// The limit for a record of `topic` now (the broker is asked at most once per
    /// [`KNOWN_FOR`]; without its answer, the producer's limit alone).
    pub async fn of(&self, topic: &str) -> Limit {
        let topic_max = if self.compressed {
            None
        } else {
            self.topic_max(topic).await
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

    /// Drops what is known of `topic`'s limit: the next [`SizeLimits::of`] asks the broker.
    pub fn forget(&self, topic: &str) {
        self.topics.lock().expect("size cache lock").remove(topic);
    }

    async fn topic_max(&self, topic: &str) -> Option<usize> {
        if let Some((known, at)) = self.topics.lock().expect("size cache lock").get(topic) {
            let valid = if known.is_some() {
                KNOWN_FOR
            } else {
                UNKNOWN_FOR
            };
            if at.elapsed() < valid {
                return *known;
            }
        }
        let found = self.describe(topic).await;
        self.topics
            .lock()
            .expect("size cache lock")
            .insert(topic.to_string(), (found, Instant::now()));
        found
    }

    async fn describe(&self, topic: &str) -> Option<usize> {
        let admin = self
            .admin
            .get_or_init(|| match self.config.create() {
                Ok(admin) => Some(admin),
                Err(e) => {
                    tracing::warn!(error = %e, "no admin client to read topic size limits");
                    None
                }
            })
            .as_ref()?;
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

    #[tokio::test]
    async fn the_producer_limit_applies_alone_when_the_topic_is_unknown_or_compressed() {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", "127.0.0.1:1")
            .set("message.max.bytes", "5000");
        let limits = SizeLimits::new(&config);
        assert_eq!(limits.producer_max, 5000);
        // Seeded cache: the topic's limit is below the producer's.
        limits
            .topics
            .lock()
            .unwrap()
            .insert("t".into(), (Some(3000), Instant::now()));
        assert_eq!(limits.of("t").await.max_record, 3000 - BATCH_OVERHEAD);
        config.set("compression.type", "zstd");
        let compressed = SizeLimits::new(&config);
        compressed
            .topics
            .lock()
            .unwrap()
            .insert("t".into(), (Some(3000), Instant::now()));
        assert_eq!(compressed.of("t").await.max_record, 5000);
    }
}

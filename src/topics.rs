//! Creating the topics agentbus writes to. Not a broker quirk: a production Apache Kafka
//! runs with `auto.create.topics.enable=false` (and so does ops/broker.sh), some
//! Kafka-compatible brokers (tansu among them) never create topics on first use, and an
//! auto-created topic would get the broker's default partitions and retention instead of
//! agentbus's. So agentbus creates them, on every broker.

use std::time::Duration;

use rdkafka::{
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    error::RDKafkaErrorCode,
};

use crate::config::KafkaArgs;

/// Errors of topic administration.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The admin client could not be built or the request failed as a whole.
    #[error("kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker refused to create one topic.
    #[error("creating topic {topic}: {code}")]
    Create {
        /// The topic.
        topic: String,
        /// The broker's error code.
        code: RDKafkaErrorCode,
    },
}

/// A topic to create when absent.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// Its partitions.
    pub partitions: i32,
    /// Its replication factor.
    pub replication: i32,
    /// Its retention.
    pub retention: Duration,
    /// Further topic configs (`cleanup.policy`, `min.insync.replicas`, ...).
    pub configs: Vec<(String, String)>,
}

/// Creates every topic in `specs` that does not exist yet; existing ones are left alone.
/// Returns the names created.
pub async fn ensure(kafka: &KafkaArgs, specs: &[TopicSpec]) -> Result<Vec<String>, Error> {
    let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
    let retention: Vec<String> = specs
        .iter()
        .map(|s| s.retention.as_millis().to_string())
        .collect();
    let new_topics: Vec<NewTopic> = specs
        .iter()
        .zip(&retention)
        .map(|(s, ms)| {
            let topic = NewTopic::new(
                &s.name,
                s.partitions,
                TopicReplication::Fixed(s.replication),
            )
            .set("retention.ms", ms);
            s.configs
                .iter()
                .fold(topic, |topic, (name, value)| topic.set(name, value))
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new_topics, &options).await?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(Error::Create { topic, code }),
        }
    }
    Ok(created)
}

/// The partitions of `topic` as the broker's metadata tells; empty when it does not exist.
pub fn partitions_of<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
) -> Result<Vec<i32>, rdkafka::error::KafkaError> {
    partitions_within(consumer, topic, Duration::from_secs(10))
}

/// As [`partitions_of`], the metadata asked for within `timeout`.
pub fn partitions_within<C: rdkafka::consumer::ConsumerContext>(
    consumer: &rdkafka::consumer::BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, rdkafka::error::KafkaError> {
    use rdkafka::consumer::Consumer;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    Ok(metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

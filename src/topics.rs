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
    /// A replication factor above the brokers the cluster has: Kafka would refuse every
    /// such topic, and retrying would not help until brokers are added.
    #[error(
        "replication factor {replication} for topic {topic} is above the {brokers} live broker(s) \
         of the cluster; give --topic-replication (AGENTBUS_TOPIC_REPLICATION) at most \
         {brokers}, or leave it out to take min(3, brokers)"
    )]
    ReplicationAboveBrokers {
        /// The first topic that asked for it.
        topic: String,
        /// The replication factor asked for.
        replication: i32,
        /// The live brokers the cluster's metadata lists.
        brokers: usize,
    },
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
    /// Its replication factor, or [`AUTO_REPLICATION`]: decided from the cluster's size
    /// when the topic is created.
    pub replication: i32,
    /// Its retention.
    pub retention: Duration,
    /// Further topic configs (`cleanup.policy`, `min.insync.replicas`, ...).
    pub configs: Vec<(String, String)>,
}

/// A [`TopicSpec::replication`] that [`ensure`] decides from the cluster: min(3, the brokers
/// in the cluster's metadata). Like Kafka's own -1 in CreateTopics ("the broker's default"),
/// but from the cluster's size rather than `default.replication.factor`, so that one broker
/// (development, tests) gets 1 and a cluster 3 without a setting.
pub const AUTO_REPLICATION: i32 = -1;

/// The most replicas [`AUTO_REPLICATION`] asks for: three survive one broker lost while
/// another is down for maintenance, more only cost disk and network.
const MOST_AUTO_REPLICAS: usize = 3;

/// The replication factor a topic of `spec` gets on a cluster of `brokers` live brokers:
/// `spec` itself when given, min(3, brokers) for [`AUTO_REPLICATION`]; an error when given
/// above `brokers` (Kafka would refuse it with INVALID_REPLICATION_FACTOR, which says
/// neither number).
pub fn replication_for(spec: &TopicSpec, brokers: usize) -> Result<i32, Error> {
    if spec.replication == AUTO_REPLICATION {
        // At least one: a metadata answer always lists the broker that gave it.
        return Ok(brokers.clamp(1, MOST_AUTO_REPLICAS) as i32);
    }
    if usize::try_from(spec.replication).is_ok_and(|r| r > brokers) {
        return Err(Error::ReplicationAboveBrokers {
            topic: spec.name.clone(),
            replication: spec.replication,
            brokers,
        });
    }
    Ok(spec.replication)
}

/// The `min.insync.replicas` of a topic with `replication` replicas: 2 from three replicas
/// on (an acks=all write is on two brokers before it is acknowledged, and one broker may be
/// down without refusing writes), 1 below (one replica down must not stop every write of
/// a two-replica topic; a one-replica topic has nothing else). Set on every topic agentbus
/// creates, so that a cluster's own default does not decide it.
pub fn min_insync_for(replication: i32) -> i32 {
    if replication >= 3 { 2 } else { 1 }
}

/// Creates every topic in `specs` that does not exist yet; existing ones are left alone.
/// Returns the names created. Each created topic's replication factor is resolved by
/// [`replication_for`] against the live brokers of the cluster, and it gets the
/// `min.insync.replicas` of [`min_insync_for`] unless its `configs` name one.
pub async fn ensure(kafka: &KafkaArgs, specs: &[TopicSpec]) -> Result<Vec<String>, Error> {
    // The metadata requests below must not create a topic on a broker that allows it (a
    // producer-type client asks for that by default): it would get the broker's defaults.
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config_with(&[("allow.auto.create.topics", "false".into())])
        .create()?;
    let admin = std::sync::Arc::new(admin);
    // The existing topics and the broker count, one metadata request per topic (all topics
    // of a shared cluster would be a large answer). Only the missing are created, so that an
    // existing topic never meets the replication check (a broker down for maintenance must
    // not stop a restart).
    let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
    let (missing, brokers) = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || missing_topics(&admin, &names))
            .await
            .expect("the metadata task does not panic")?
    };
    let missing: Vec<&TopicSpec> = specs.iter().filter(|s| missing.contains(&s.name)).collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let mut resolved = Vec::with_capacity(missing.len());
    for spec in &missing {
        let replication = replication_for(spec, brokers)?;
        let mut configs = vec![(
            "retention.ms".to_string(),
            spec.retention.as_millis().to_string(),
        )];
        if !spec.configs.iter().any(|(n, _)| n == "min.insync.replicas") {
            configs.push((
                "min.insync.replicas".to_string(),
                min_insync_for(replication).to_string(),
            ));
        }
        configs.extend(spec.configs.iter().cloned());
        resolved.push((spec, replication, configs));
    }
    let new_topics: Vec<NewTopic> = resolved
        .iter()
        .map(|(spec, replication, configs)| {
            let topic = NewTopic::new(
                &spec.name,
                spec.partitions,
                TopicReplication::Fixed(*replication),
            );
            configs
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

/// Which of `names` the cluster does not have, and how many live brokers its metadata lists.
fn missing_topics(
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
) -> Result<(Vec<String>, usize), Error> {
    let mut missing = Vec::new();
    let mut brokers = 0;
    for name in names {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(10))?;
        brokers = brokers.max(metadata.brokers().len());
        let exists = metadata
            .topics()
            .first()
            .is_some_and(|t| t.error().is_none() && !t.partitions().is_empty());
        if !exists {
            missing.push(name.clone());
        }
    }
    Ok((missing, brokers))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(replication: i32) -> TopicSpec {
        TopicSpec {
            name: "t".into(),
            partitions: 1,
            replication,
            retention: Duration::from_secs(60),
            configs: Vec::new(),
        }
    }

    #[test]
    fn auto_replication_is_the_cluster_size_up_to_three() {
        let auto = spec(AUTO_REPLICATION);
        let got: Vec<i32> = [1, 2, 3, 5]
            .iter()
            .map(|&b| replication_for(&auto, b).unwrap())
            .collect();
        assert_eq!(got, [1, 2, 3, 3]);
    }

    #[test]
    fn a_given_replication_above_the_brokers_names_both_numbers() {
        let err = replication_for(&spec(3), 1).unwrap_err();
        assert!(
            matches!(
                err,
                Error::ReplicationAboveBrokers {
                    replication: 3,
                    brokers: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("replication factor 3"), "{text}");
        assert!(text.contains("the 1 live broker(s)"), "{text}");
        assert_eq!(replication_for(&spec(2), 3).unwrap(), 2);
        assert_eq!(replication_for(&spec(3), 3).unwrap(), 3);
    }

    #[test]
    fn min_insync_is_two_from_three_replicas_on() {
        let got: Vec<i32> = (1..=4).map(min_insync_for).collect();
        assert_eq!(got, [1, 1, 2, 2]);
    }
}

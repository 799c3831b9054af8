//! Dead letters: listing an agent's `<agent>.dlq` and sending them back for processing
//! (redrive) through its `<agent>.replay` topic.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::OwnedMessage,
    producer::FutureProducer,
};
use serde::Serialize;

use super::{copied_headers, copy_of, header, header_str as text};
use crate::{config::KafkaArgs, publish};

/// Errors of dead-letter operations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The topic does not exist.
    #[error("no topic {0}")]
    NoTopic(String),
    /// Reading took too long.
    #[error("reading {0} timed out")]
    Timeout(String),
}

/// One dead letter, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// When it failed for good.
    pub failed_at: Option<String>,
    /// Its event type.
    pub event_type: Option<String>,
    /// Its event id.
    pub event_id: Option<String>,
    /// Attempts made.
    pub attempts: Option<u32>,
    /// Why: the error kind.
    pub error_kind: Option<String>,
    /// Why: the message.
    pub error_message: Option<String>,
    /// Where it came from.
    pub original_topic: Option<String>,
    /// Its partition there.
    pub original_partition: Option<i32>,
    /// Its offset there.
    pub original_offset: Option<i64>,
    /// Its partition in the dead-letter topic.
    pub dlq_partition: i32,
    /// Its offset in the dead-letter topic.
    pub dlq_offset: i64,
}

impl DeadLetter {
    fn from_message(m: &OwnedMessage) -> DeadLetter {
        DeadLetter {
            failed_at: text(m, header::FAILED_AT),
            event_type: text(m, header::TYPE),
            event_id: text(m, header::ID),
            attempts: text(m, header::ATTEMPTS).and_then(|a| a.parse().ok()),
            error_kind: text(m, header::ERROR_KIND),
            error_message: text(m, header::ERROR_MESSAGE),
            original_topic: text(m, header::ORIGINAL_TOPIC),
            original_partition: text(m, header::ORIGINAL_PARTITION).and_then(|a| a.parse().ok()),
            original_offset: text(m, header::ORIGINAL_OFFSET).and_then(|a| a.parse().ok()),
            dlq_partition: m.partition(),
            dlq_offset: m.offset(),
        }
    }
}

/// Every record of `topic` up to the end it had when called (blocking; a bounded read).
pub fn read_to_end(
    kafka: &KafkaArgs,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<OwnedMessage>, Error> {
    let consumer: BaseConsumer = kafka
        .client_config_with(&[
            (
                "group.id",
                format!("agentbus-reader-{}", uuid::Uuid::new_v4()),
            ),
            ("enable.auto.commit", "false".into()),
        ])
        .create()?;
    let partitions = crate::topics::partitions_of(&consumer, topic)?;
    if partitions.is_empty() {
        return Err(Error::NoTopic(topic.to_string()));
    }
    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10))?;
        if high > low {
            assignment.add_partition_offset(topic, p, Offset::Offset(low))?;
            ends.push((p, high));
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return Ok(out);
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    let mut open: Vec<(i32, i64)> = ends;
    while !open.is_empty() {
        if Instant::now() > deadline {
            return Err(Error::Timeout(topic.to_string()));
        }
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = result?.detach();
        if let Some(i) = open.iter().position(|(p, _)| *p == m.partition()) {
            let end = open[i].1;
            if m.offset() < end {
                out.push(m.clone());
            }
            if m.offset() + 1 >= end {
                open.remove(i);
            }
        }
    }
    out.sort_by_key(|m| {
        (
            m.timestamp().to_millis().unwrap_or(0),
            m.partition(),
            m.offset(),
        )
    });
    Ok(out)
}

/// The dead letters of `dlq_topic`, oldest first.
pub async fn list(kafka: &KafkaArgs, dlq_topic: &str) -> Result<Vec<DeadLetter>, Error> {
    let (kafka, topic) = (kafka.clone(), dlq_topic.to_string());
    let messages =
        tokio::task::spawn_blocking(move || read_to_end(&kafka, &topic, Duration::from_secs(60)))
            .await
            .expect("the reader does not panic")?;
    Ok(messages.iter().map(DeadLetter::from_message).collect())
}

/// Which dead letters to send back.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only those that failed at or after this time.
    pub since: Option<DateTime<Utc>>,
}

impl Filter {
    fn matches(&self, d: &DeadLetter) -> bool {
        let type_ok = self
            .event_type
            .as_ref()
            .is_none_or(|t| d.event_type.as_deref() == Some(t));
        let since_ok = self.since.is_none_or(|since| {
            d.failed_at
                .as_deref()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .is_some_and(|t| t >= since)
        });
        type_ok && since_ok
    }
}

/// Sends the matching dead letters of `dlq_topic` to `replay_topic` for the agent to handle
/// again: key, value and headers kept, the failure headers dropped, and a replay id derived
/// from the dead letter's place, so that it is new to the agent's dedup store while two
/// redrives of the same dead letter are still recognised as one. Returns how many were sent.
pub async fn redrive(
    kafka: &KafkaArgs,
    dlq_topic: &str,
    replay_topic: &str,
    filter: &Filter,
) -> Result<usize, Error> {
    let (k, topic) = (kafka.clone(), dlq_topic.to_string());
    let messages =
        tokio::task::spawn_blocking(move || read_to_end(&k, &topic, Duration::from_secs(60)))
            .await
            .expect("the reader does not panic")?;
    let producer: FutureProducer =
        publish::producer_config(kafka, Duration::from_secs(30)).create()?;
    let failure_headers = [
        header::ATTEMPTS,
        header::ERROR_KIND,
        header::ERROR_MESSAGE,
        header::FAILED_AT,
        header::NOT_BEFORE,
        header::REPLAY_ID,
    ];
    let mut sent = 0;
    for m in &messages {
        if !filter.matches(&DeadLetter::from_message(m)) {
            continue;
        }
        let replay_id = format!("redrive-{}-{}-{}", dlq_topic, m.partition(), m.offset());
        let headers = copied_headers(m, &failure_headers, &[(header::REPLAY_ID, replay_id)]);
        let record = copy_of(m, replay_topic, headers);
        producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| e)?;
        sent += 1;
    }
    Ok(sent)
}

//! The dedup changelog: an agent's dedup records, also kept in a compacted topic of its own,
//! `<prefix><agent>.dedup`, so that they follow their partition to whichever process of the
//! agent is assigned it (as a Kafka Streams state store follows its task).
//!
//! # Layout
//! - The record of an event handled from input partition `p` (of any topic the agent reads:
//!   the events topics of its domains, its retry and its replay topic) lives in changelog
//!   partition `p mod N`, N the changelog's partition count. N is the largest partition
//!   count among the agent's input topics at start: the changelog is created with it, and
//!   grown (CreatePartitions) when an input topic has more. An input partition beyond N (a
//!   topic grown while the agent runs) shares partition `p mod N`; that is correct (its
//!   owner restores and writes that partition) and costs only a larger restore.
//! - Input partitions `p` of several topics share changelog partition `p`. The record key
//!   is the dedup key (the idempotency key, or `key|replay-id` for a replayed record), so
//!   compaction keeps one record per key; the value is binary: `expires_ms` (8 bytes,
//!   big-endian: when the record stops counting), the input partition (4 bytes, big-endian)
//!   and the input topic (the rest, UTF-8). Records written as JSON
//!   `{"topic","partition","expires_ms"}` by earlier versions are still read: a binary value
//!   starts with a zero byte (an `expires_ms` below 2^56), never with `{`. With `range` assignment and input topics of equal partition
//!   counts (the default: all get `--topic-partitions`), one process holds partition p of
//!   every input topic, so it is the only writer of changelog partition p.
//! - Retention is `cleanup.policy=compact,delete` with `retention.ms` = the dedup window:
//!   nothing older than the window is kept, so a restore reads at most one window.
//!
//! # A retried event
//! An event from events partition p that is moved to the retry topic and then handled
//! from retry partition q gets its record in changelog partition q (where it was handled).
//! The original's offset on p is stored once the retry copy is acknowledged, so it is not
//! delivered again, except when its process dies before that offset is committed (within
//! `auto.commit.interval.ms`, 1 s, or at a revoke, where it is committed synchronously).
//! Then the original comes again to the owner of p, which knows the records of changelog
//! partition p only. The retry copy's key is the original's, and the retry topic has as
//! many partitions as the events topic by default, so q = p and the same process owns both:
//! the repeat is skipped. With unequal partition counts, that one redelivery may be
//! handled a second time: at least once, as a redelivery after a crash always was.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    admin::{AdminClient, AdminOptions, NewPartitions},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer, StreamConsumer},
    error::KafkaError,
    producer::{DeliveryFuture, FutureProducer, FutureRecord},
};
use serde::Deserialize;

use crate::{
    config::KafkaArgs,
    store::{Durable, ExpiringStore, now_ms},
    telemetry,
    topics::{self, TopicSpec},
};

/// Errors of the changelog.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka refused a setting, or a metadata or fetch call failed.
    #[error("dedup changelog: {0}")]
    Kafka(#[from] KafkaError),
    /// The changelog topic could not be created.
    #[error(transparent)]
    Topics(#[from] topics::Error),
    /// The broker refused to grow the changelog.
    #[error("growing dedup changelog {topic} to {partitions} partitions: {why}")]
    Grow {
        /// The changelog topic.
        topic: String,
        /// The count asked for.
        partitions: i32,
        /// What the broker said.
        why: String,
    },
    /// The local store failed while restoring.
    #[error(transparent)]
    Store(#[from] crate::store::Error),
    /// A restore did not finish in time: the agent stops rather than handle the
    /// partitions' events without their dedup records.
    #[error(
        "restoring dedup changelog {topic} partitions {partitions:?} did not finish within {deadline:?}"
    )]
    RestoreDeadline {
        /// The changelog topic.
        topic: String,
        /// The partitions not restored through their end.
        partitions: Vec<i32>,
        /// The deadline.
        deadline: Duration,
    },
}

/// The value of a changelog record written as JSON by earlier versions (see the module's
/// doc); only `expires_ms` is read back.
#[derive(Debug, Deserialize)]
struct JsonValue {
    expires_ms: u64,
}

/// The binary value of a changelog record (see the module's doc). Built in one buffer: the
/// JSON value's serialiser cost more than the rest of a record's sending.
fn encode_value(topic: &str, partition: i32, expires_ms: u64) -> Vec<u8> {
    let mut value = Vec::with_capacity(12 + topic.len());
    value.extend_from_slice(&expires_ms.to_be_bytes());
    value.extend_from_slice(&partition.to_be_bytes());
    value.extend_from_slice(topic.as_bytes());
    value
}

/// When a changelog record stops counting, from either form of its value.
fn expires_of(value: &[u8]) -> Option<u64> {
    if value.first() == Some(&b'{') {
        return serde_json::from_slice::<JsonValue>(value)
            .ok()
            .map(|v| v.expires_ms);
    }
    Some(u64::from_be_bytes(value.get(..8)?.try_into().ok()?))
}

/// How long metadata and offset calls may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Keys handed to the store in one write while restoring.
const RESTORE_BATCH: usize = 2000;

/// The changelog of one agent.
pub struct Changelog {
    topic: String,
    partitions: i32,
    group: String,
    window: Duration,
    producer: FutureProducer,
    restore_config: ClientConfig,
    /// Partition counts of the input topics at start.
    input_partitions: HashMap<String, i32>,
}

impl Changelog {
    /// Creates (or grows) the changelog of agent `group` reading `inputs`, and its producer.
    pub async fn open(
        kafka: &KafkaArgs,
        group: &str,
        inputs: &[String],
        default_partitions: i32,
        replication: i32,
        window: Duration,
    ) -> Result<Self, Error> {
        let topic = format!("{}{group}.dedup", kafka.topic_prefix);
        let admin: AdminClient<DefaultClientContext> = kafka.client_config().create()?;
        let probe: BaseConsumer = kafka.client_config().create()?;
        let (input_partitions, existing) = {
            let (inputs, topic) = (inputs.to_vec(), topic.clone());
            tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
                let mut counts = HashMap::new();
                for input in &inputs {
                    let n = topics::partitions_within(&probe, input, CALL_TIMEOUT)?.len() as i32;
                    // Not there yet (the service creates it): it gets the default count.
                    counts.insert(input.clone(), if n > 0 { n } else { default_partitions });
                }
                let existing = topics::partitions_within(&probe, &topic, CALL_TIMEOUT)?.len();
                Ok((counts, existing as i32))
            })
            .await
            .expect("metadata calls do not panic")?
        };
        let partitions = input_partitions
            .values()
            .copied()
            .max()
            .unwrap_or(default_partitions)
            .max(default_partitions)
            .max(existing);
        topics::ensure(
            kafka,
            &[TopicSpec {
                name: topic.clone(),
                partitions,
                replication,
                retention: window,
                configs: vec![("cleanup.policy".into(), "compact,delete".into())],
            }],
        )
        .await?;
        if existing > 0 && existing < partitions {
            let grow = NewPartitions::new(&topic, partitions as usize);
            let options = AdminOptions::new().operation_timeout(Some(CALL_TIMEOUT));
            for result in admin.create_partitions([&grow], &options).await? {
                if let Err((_, code)) = result {
                    return Err(Error::Grow {
                        topic,
                        partitions,
                        why: code.to_string(),
                    });
                }
            }
            tracing::info!(
                agent = group,
                topic,
                from = existing,
                to = partitions,
                "grew the dedup changelog"
            );
        }
        let producer = kafka
            .client_config_with(&[
                // A record counts once every in-sync replica has it, and the producer's own
                // retries neither duplicate nor reorder (the checkpoint relies on the order).
                ("enable.idempotence", "true".into()),
                ("acks", "all".into()),
                // Records of many events share a request; an event waits this long at most.
                ("linger.ms", "2".into()),
                // Uncompressed: a record is ~80 bytes of key and value, and a batch holds a
                // few of them; starting an LZ4 frame (a 64 KiB table, zeroed) for each batch
                // cost more instructions than the rest of an event's recording.
                ("compression.type", "none".into()),
                // One attempt's bound (librdkafka's default is 5 minutes): a record not
                // acknowledged by then is sent again by `Changelog::record`, and a lane
                // draining at shutdown is not held past its grace by one delivery.
                ("message.timeout.ms", "30000".into()),
            ])
            .create()?;
        let restore_config = kafka
            .client_config_with(&[
                // Assigned, never subscribed: the group id only satisfies librdkafka.
                ("group.id", format!("{group}.dedup-restore")),
                ("enable.auto.commit", "false".into()),
                ("enable.auto.offset.store", "false".into()),
                // The end of each partition is how a restore knows it is done.
                ("enable.partition.eof", "true".into()),
                // At a partition's end the broker would hold the fetch this long (500 ms by
                // default) before answering "nothing more": the restore waits for that.
                ("fetch.wait.max.ms", "20".into()),
            ])
            .clone();
        Ok(Changelog {
            topic,
            partitions,
            group: group.to_string(),
            window,
            producer,
            restore_config,
            input_partitions,
        })
    }

    /// The changelog topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The changelog partition of input partition `partition`.
    pub fn partition_of(&self, partition: i32) -> i32 {
        partition.rem_euclid(self.partitions)
    }

    /// Whether `assigned` holds every input partition whose records share changelog
    /// partition `changelog_partition`: then this process is its only writer, and its own
    /// acknowledged records may move the partition's checkpoint.
    pub fn sole_writer(&self, changelog_partition: i32, assigned: &HashSet<(String, i32)>) -> bool {
        self.input_partitions.iter().all(|(topic, &count)| {
            (0..count)
                .filter(|&p| self.partition_of(p) == changelog_partition)
                .all(|p| assigned.contains(&(topic.clone(), p)))
        })
    }

    /// Sends the record of `key` (handled from `topic`/`partition`, counting until
    /// `expires_ms`) to its changelog partition. The future resolves on the broker's
    /// acknowledgement (acks=all) with the record's offset.
    pub fn send(
        &self,
        key: &str,
        topic: &str,
        partition: i32,
        expires_ms: u64,
    ) -> Result<DeliveryFuture, KafkaError> {
        let value = encode_value(topic, partition, expires_ms);
        let record = FutureRecord::to(&self.topic)
            .partition(self.partition_of(partition))
            .key(key)
            .payload(&value);
        self.producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Sends and waits for the acknowledgement, sending again after a failure until it is
    /// acknowledged or `stop` is cancelled (`None` then). Returns the record's changelog
    /// partition and offset.
    pub async fn record(
        &self,
        key: &str,
        topic: &str,
        partition: i32,
        expires_ms: u64,
        first: Option<DeliveryFuture>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> Option<(i32, i64)> {
        let mut attempt = first;
        let mut wait = Duration::from_millis(100);
        loop {
            let delivery = match attempt.take() {
                Some(d) => Ok(d),
                None => self.send(key, topic, partition, expires_ms),
            };
            let failure = match delivery {
                Ok(d) => match d.await {
                    Ok(Ok(delivery)) => return Some((delivery.partition, delivery.offset)),
                    Ok(Err((e, _))) => e.to_string(),
                    Err(_) => "the producer went away".to_string(),
                },
                Err(e) => e.to_string(),
            };
            tracing::warn!(agent = %self.group, topic = %self.topic, error = %failure, "could not write a dedup record to the changelog; retrying");
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    /// Restores changelog `partitions` into `store`: for each, the records from
    /// max(checkpoint + 1, the first offset of the last window) to the partition's end, the
    /// expired ones left out, and then the checkpoint at the end. Done once every partition
    /// reached its end and what was read is on disk; an error once `deadline` passed
    /// before that. Logs a line per partition and records its time in
    /// `agentbus_dedup_restore_seconds`.
    pub async fn restore(
        &self,
        store: &ExpiringStore,
        partitions: &[i32],
        deadline: Duration,
    ) -> Result<(), Error> {
        if partitions.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let consumer: StreamConsumer<Quiet> = self.restore_config.create_with_context(Quiet)?;
        let mut checkpoints = HashMap::new();
        for &p in partitions {
            checkpoints.insert(p, store.checkpoint(p)?);
        }
        let since = now_ms().saturating_sub(self.window.as_millis() as u64) as i64;
        let ranges = {
            // Metadata calls block: off the runtime's threads.
            let (config, topic, partitions) = (
                self.restore_config.clone(),
                self.topic.clone(),
                partitions.to_vec(),
            );
            tokio::task::spawn_blocking(move || ranges(&config, &topic, &partitions, since))
                .await
                .expect("offset calls do not panic")?
        };
        let mut tpl = TopicPartitionList::new();
        // Per partition: (from, end, records restored, done).
        let mut state: HashMap<i32, Restoring> = HashMap::new();
        for (p, (window_start, end)) in ranges {
            let from = checkpoints[&p].map_or(window_start, |c| (c + 1).max(window_start));
            let mut restoring = Restoring {
                from,
                end,
                records: 0,
                batch: Vec::new(),
                done: from >= end,
            };
            if restoring.done {
                restoring.finish(self, store, p, started).await?;
            } else {
                tpl.add_partition_offset(&self.topic, p, Offset::Offset(from))?;
            }
            state.insert(p, restoring);
        }
        if tpl.count() == 0 {
            return Ok(());
        }
        consumer.assign(&tpl)?;
        let mut writes: Vec<Durable> = Vec::new();
        let give_up = tokio::time::Instant::now() + deadline;
        while state.values().any(|s| !s.done) {
            let next = tokio::time::timeout_at(give_up, consumer.recv()).await;
            let message = match next {
                Err(_) => {
                    let mut left: Vec<i32> = state
                        .iter()
                        .filter(|(_, s)| !s.done)
                        .map(|(p, _)| *p)
                        .collect();
                    left.sort();
                    return Err(Error::RestoreDeadline {
                        topic: self.topic.clone(),
                        partitions: left,
                        deadline,
                    });
                }
                Ok(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(s) = state.get_mut(&p)
                        && !s.done
                    {
                        s.done = true;
                        s.finish(self, store, p, started).await?;
                    }
                    continue;
                }
                Ok(Err(e)) => {
                    // Passing broker trouble: librdkafka fetches again; the deadline bounds it.
                    tracing::warn!(agent = %self.group, topic = %self.topic, error = %e, "restoring the dedup changelog");
                    continue;
                }
                Ok(Ok(m)) => m,
            };
            let p = message.partition();
            let Some(s) = state.get_mut(&p) else { continue };
            if s.done {
                continue;
            }
            let now = now_ms();
            if let (Some(key), Some(value)) = (message.key(), message.payload())
                && let Some(expires_ms) = expires_of(value)
                && expires_ms > now
                && let Ok(key) = std::str::from_utf8(key)
            {
                s.batch.push((key.into(), expires_ms));
                s.records += 1;
            }
            if s.batch.len() >= RESTORE_BATCH {
                let batch = std::mem::take(&mut s.batch);
                writes.push(store.put_partitioned(p, batch, None).await?);
            }
            // The end was taken at the start: what was written since is not waited for.
            if message.offset() + 1 >= s.end {
                s.done = true;
                s.finish(self, store, p, started).await?;
            }
        }
        for write in writes {
            write.wait().await?;
        }
        Ok(())
    }
}

/// The restore consumer's context: the end of a partition is what it waits for, not an
/// error to log (librdkafka reports it through the error callback too).
struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        let end = matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !end {
            tracing::warn!(error = %error, reason, "dedup changelog restore consumer");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

/// One partition's restore.
struct Restoring {
    from: i64,
    end: i64,
    records: u64,
    batch: Vec<(std::sync::Arc<str>, u64)>,
    done: bool,
}

impl Restoring {
    /// Writes what is left with the checkpoint (the end), waits for it, logs and measures.
    async fn finish(
        &mut self,
        changelog: &Changelog,
        store: &ExpiringStore,
        partition: i32,
        started: Instant,
    ) -> Result<(), Error> {
        let batch = std::mem::take(&mut self.batch);
        let checkpoint = (self.end > 0).then_some(self.end - 1);
        store
            .put_partitioned(partition, batch, checkpoint)
            .await?
            .wait()
            .await?;
        let took = started.elapsed();
        metrics::histogram!(telemetry::DEDUP_RESTORE_SECONDS, "group" => changelog.group.clone())
            .record(took.as_secs_f64());
        metrics::counter!(telemetry::DEDUP_RESTORED, "group" => changelog.group.clone())
            .increment(self.records);
        tracing::info!(
            agent = %changelog.group,
            topic = %changelog.topic,
            partition,
            records = self.records,
            from = self.from,
            to = self.end,
            seconds = took.as_secs_f64(),
            "restored dedup records"
        );
        Ok(())
    }
}

/// A partition and the offsets to restore: from the first of the window to the end.
type Range = (i32, (i64, i64));

/// Per partition: the first offset of the window (from `since`, ms) and the end.
fn ranges(
    config: &ClientConfig,
    topic: &str,
    partitions: &[i32],
    since: i64,
) -> Result<Vec<Range>, KafkaError> {
    let consumer: BaseConsumer = config.create()?;
    let mut times = TopicPartitionList::new();
    for &p in partitions {
        times.add_partition_offset(topic, p, Offset::Offset(since))?;
    }
    let by_time = consumer.offsets_for_times(times, CALL_TIMEOUT)?;
    let mut out = Vec::new();
    for &p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, CALL_TIMEOUT)?;
        let start = match by_time.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            // No record at or after `since`: nothing within the window.
            Some(Offset::End) => high,
            _ => low,
        };
        out.push((p, (start, high)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_value_reads_back_its_expiry_in_the_binary_and_the_earlier_json_form() {
        let expires = now_ms() + 86_400_000;
        let binary = encode_value("p.knowledge.events", 7, expires);
        assert_eq!(binary.len(), 12 + "p.knowledge.events".len());
        assert_eq!(binary[0], 0, "a binary value never starts with `{{`");
        assert_eq!(expires_of(&binary), Some(expires));
        let json = format!(r#"{{"topic":"t","partition":2,"expires_ms":{expires}}}"#);
        assert_eq!(expires_of(json.as_bytes()), Some(expires));
        assert_eq!(expires_of(b"short"), None);
        assert_eq!(expires_of(b"{not json"), None);
    }
}

//! Records the consumer cannot hand over. When librdkafka cannot read a record (a batch
//! whose compression fails to decode, a codec it lacks, a corrupt or unsupported batch, a
//! record too large for the fetch settings) it reports an error for the partition and
//! fetches the same offset again, forever: everything behind the record waits. The error
//! reaches us without its partition or offset (`KafkaError::MessageConsumption` carries
//! only the code), so a probe consumer finds them: it reads each assigned partition from
//! the agent's position, and on the one that fails searches for the first readable offset
//! after it. The agent then skips to that offset, counts the records it skipped in
//! `agentbus_records_skipped_total{group,topic,reason}` (an alert fires on any increase)
//! and logs the range, so that an operator can look at them with Kafka's own tools.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, StreamConsumer},
    error::KafkaError,
    types::RDKafkaErrorCode,
};

use super::{AgentContext, RuntimeSettings, tracker::Tracker};
use crate::telemetry;

/// Consumer errors that mean "a record here cannot be read", as opposed to the broker or
/// the network failing (those pass by themselves).
pub(super) fn is_unreadable(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BadCompression
            | RDKafkaErrorCode::NotImplemented
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::UnsupportedCompressionType
    )
}

/// librdkafka repeats the error about once a second; one probe per this is enough.
const PROBE_AT_MOST_EVERY: Duration = Duration::from_secs(5);
/// How long one probe waits for a record or an error of its partition.
const PROBE_WAIT: Duration = Duration::from_secs(3);
/// Timeout of the metadata calls (watermarks, committed offsets, seek).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Finds and skips records that stop a partition.
pub(super) struct Prober {
    config: ClientConfig,
    group: String,
    last: Option<Instant>,
}

/// A partition stopped at `from`, readable again from `to`.
#[derive(Debug)]
struct Stuck {
    topic: String,
    partition: i32,
    from: i64,
    to: i64,
}

impl Prober {
    pub(super) fn new(settings: &RuntimeSettings, group: &str) -> Prober {
        let config = settings.kafka.client_config_with(&[
            // Assigned partitions only: it never joins the group or commits.
            ("group.id", format!("{group}.probe")),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            // An empty partition answers soon, so that a probe past the end is quick.
            ("fetch.wait.max.ms", "100".into()),
        ]);
        Prober {
            config,
            group: group.to_string(),
            last: None,
        }
    }

    /// After a consumer error with `code`: finds the partition that cannot go on, skips
    /// past its unreadable records and says so. At most once per [`PROBE_AT_MOST_EVERY`].
    pub(super) async fn skip_stuck(
        &mut self,
        consumer: &Arc<StreamConsumer<AgentContext>>,
        tracker: &Arc<Tracker>,
        code: RDKafkaErrorCode,
    ) {
        if self
            .last
            .is_some_and(|at| at.elapsed() < PROBE_AT_MOST_EVERY)
        {
            return;
        }
        let (consumer, tracker, config) = (consumer.clone(), tracker.clone(), self.config.clone());
        // librdkafka's calls block: off the async threads.
        let found = tokio::task::spawn_blocking(move || {
            let stuck = find_stuck(&consumer, &config)?;
            if let Some(s) = &stuck {
                skip(&consumer, &tracker, s)?;
            }
            Ok::<_, KafkaError>(stuck)
        })
        .await;
        self.last = Some(Instant::now());
        let reason = format!("{code:?}");
        match found {
            Ok(Ok(Some(s))) => {
                metrics::counter!(telemetry::RECORDS_SKIPPED, "group" => self.group.clone(), "topic" => s.topic.clone(), "reason" => reason.clone())
                    .increment((s.to - s.from).max(0) as u64);
                tracing::error!(
                    agent = %self.group,
                    topic = %s.topic,
                    partition = s.partition,
                    from_offset = s.from,
                    to_offset = s.to - 1,
                    reason,
                    "records the consumer cannot read ({code}) were skipped so that the partition goes on; \
                     they are still in the topic (kafka-console-consumer --partition {} --offset {})",
                    s.partition,
                    s.from
                );
            }
            Ok(Ok(None)) => {
                tracing::debug!(agent = %self.group, %code, "no partition is stopped by the error")
            }
            Ok(Err(e)) => {
                tracing::warn!(agent = %self.group, error = %e, "could not look for an unreadable record")
            }
            Err(e) => {
                tracing::warn!(agent = %self.group, error = %e, "the unreadable-record probe failed")
            }
        }
    }
}

/// The assigned partition whose next record cannot be read, with the first offset after
/// it that can.
fn find_stuck(
    consumer: &StreamConsumer<AgentContext>,
    config: &ClientConfig,
) -> Result<Option<Stuck>, KafkaError> {
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(None);
    }
    let position = consumer.position()?;
    let mut committed: Option<TopicPartitionList> = None;
    let probe: BaseConsumer = config.create()?;
    for element in assignment.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        let (low, high) = probe.fetch_watermarks(topic, partition, CALL_TIMEOUT)?;
        // Where the agent reads next: its position, or (nothing read since the assignment)
        // the committed offset, or the oldest record (`auto.offset.reset=earliest`).
        let mut next = match position
            .find_partition(topic, partition)
            .map(|e| e.offset())
        {
            Some(Offset::Offset(o)) => Some(o),
            _ => None,
        };
        if next.is_none() {
            if committed.is_none() {
                committed = Some(consumer.committed(CALL_TIMEOUT)?);
            }
            next = committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
        }
        let from = next.unwrap_or(low).max(low);
        if from >= high || !unreadable_at(&probe, topic, partition, from)? {
            continue;
        }
        // Unreadable at `from`; readable (or empty) at `high`. A batch is unreadable as a
        // whole, so the first readable offset is found by halving.
        let (mut lo, mut hi) = (from + 1, high);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if unreadable_at(&probe, topic, partition, mid)? {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        return Ok(Some(Stuck {
            topic: topic.to_string(),
            partition,
            from,
            to: lo,
        }));
    }
    Ok(None)
}

/// Whether reading `topic`/`partition` from `offset` fails with an unreadable-record error.
fn unreadable_at(
    probe: &BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<bool, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    probe.assign(&tpl)?;
    let deadline = Instant::now() + PROBE_WAIT;
    while Instant::now() < deadline {
        match probe.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.partition() == partition && m.offset() >= offset => return Ok(false),
            Some(Err(KafkaError::MessageConsumption(code)))
            | Some(Err(KafkaError::MessageConsumptionFatal(code)))
                if is_unreadable(code) =>
            {
                return Ok(true);
            }
            _ => {}
        }
    }
    Ok(false)
}

/// Marks `stuck`'s records final and moves the agent's consumer past them.
fn skip(
    consumer: &StreamConsumer<AgentContext>,
    tracker: &Tracker,
    stuck: &Stuck,
) -> Result<(), KafkaError> {
    let still_ours = consumer
        .assignment()?
        .find_partition(&stuck.topic, stuck.partition)
        .is_some();
    if !still_ours {
        return Ok(());
    }
    if let Some(done) = tracker.skip(&stuck.topic, stuck.partition, stuck.from, stuck.to - 1) {
        consumer.store_offset(&stuck.topic, stuck.partition, done)?;
    }
    consumer.seek(
        &stuck.topic,
        stuck.partition,
        Offset::Offset(stuck.to),
        CALL_TIMEOUT,
    )
}

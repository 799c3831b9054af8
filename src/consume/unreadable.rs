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
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use rdkafka::{
    ClientConfig, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer, StreamConsumer},
    error::KafkaError,
    types::RDKafkaErrorCode,
};

use tokio_util::sync::CancellationToken;

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
/// The whole of one round (watermarks, probes, seek): the agent's loop waits for it, so it
/// is bounded as a whole, not per call.
const ROUND_BUDGET: Duration = Duration::from_secs(15);
/// At most this many offsets are probed in one round; a longer unreadable stretch is
/// skipped as far as probed, and the next round (the error comes again) goes on from there.
pub(super) const MAX_PROBES_PER_ROUND: usize = 200;

/// Finds and skips records that stop a partition.
pub(super) struct Prober {
    config: ClientConfig,
    group: String,
    last: Option<Instant>,
    /// The agent's positions at the previous consumer error: a partition whose position
    /// moved since then is not stopped, and is not probed.
    positions: Option<HashMap<(String, i32), Offset>>,
}

/// A partition stopped at `from`, readable again from `to`.
#[derive(Debug)]
struct Stuck {
    topic: String,
    partition: i32,
    from: i64,
    to: i64,
    /// The probes stopped (budget or deadline) before a readable offset was found: `to` is
    /// as far as is known to be unreadable.
    capped: bool,
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
            positions: None,
        }
    }

    /// After a consumer error with `code`: finds the partition that cannot go on, skips
    /// past its unreadable records and says so. At most once per [`PROBE_AT_MOST_EVERY`],
    /// within [`ROUND_BUDGET`], and only for partitions whose position has not moved since
    /// the previous error (the first error only notes the positions). Returns early when
    /// `stop` is cancelled (the blocking probe then ends at its next step).
    pub(super) async fn skip_stuck(
        &mut self,
        consumer: &Arc<StreamConsumer<AgentContext>>,
        tracker: &Arc<Tracker>,
        code: RDKafkaErrorCode,
        stop: &CancellationToken,
    ) {
        // The position is librdkafka's local state: no broker call.
        let now: HashMap<(String, i32), Offset> = match consumer.position() {
            Ok(p) => p
                .elements()
                .iter()
                .map(|e| ((e.topic().to_string(), e.partition()), e.offset()))
                .collect(),
            Err(_) => return,
        };
        let Some(before) = self.positions.replace(now.clone()) else {
            return;
        };
        if self
            .last
            .is_some_and(|at| at.elapsed() < PROBE_AT_MOST_EVERY)
        {
            return;
        }
        let unmoved: HashSet<(String, i32)> = now
            .into_iter()
            .filter(|(tp, o)| before.get(tp) == Some(o))
            .map(|(tp, _)| tp)
            .collect();
        if unmoved.is_empty() {
            return;
        }
        let (consumer, tracker, config) = (consumer.clone(), tracker.clone(), self.config.clone());
        let deadline = Instant::now() + ROUND_BUDGET;
        let cancel = stop.clone();
        // librdkafka's calls block: off the async threads.
        let probe = tokio::task::spawn_blocking(move || {
            let stuck = find_stuck(&consumer, &config, &unmoved, deadline, &cancel)?;
            if let Some(s) = &stuck
                && !cancel.is_cancelled()
            {
                skip(&consumer, &tracker, s)?;
            }
            Ok::<_, KafkaError>(stuck)
        });
        let found = tokio::select! {
            found = probe => found,
            _ = stop.cancelled() => return,
        };
        self.last = Some(Instant::now());
        // The skip moves the position: the next error compares with that.
        self.positions = None;
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
                if s.capped {
                    tracing::warn!(
                        agent = %self.group,
                        topic = %s.topic,
                        partition = s.partition,
                        next_offset = s.to,
                        "the unreadable stretch goes on past what one round probes \
                         ({MAX_PROBES_PER_ROUND} offsets or {ROUND_BUDGET:?}); the next round goes on from here"
                    );
                }
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

/// What is left of `deadline`, at most `cap`; `None` once it has passed.
pub(super) fn remaining(deadline: Instant, cap: Duration) -> Option<Duration> {
    let left = deadline.checked_duration_since(Instant::now())?;
    (!left.is_zero()).then(|| left.min(cap))
}

/// The deadline passed: the round ends.
fn out_of_time() -> KafkaError {
    KafkaError::MessageConsumption(RDKafkaErrorCode::OperationTimedOut)
}

/// Of the assigned partitions in `candidates`, the one whose next record cannot be read,
/// with the first offset after it that can (or as far as the probes got).
fn find_stuck(
    consumer: &StreamConsumer<AgentContext>,
    config: &ClientConfig,
    candidates: &HashSet<(String, i32)>,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Result<Option<Stuck>, KafkaError> {
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(None);
    }
    let position = consumer.position()?;
    let mut committed: Option<TopicPartitionList> = None;
    // One probe consumer for the whole round.
    let probe: BaseConsumer = config.create()?;
    for element in assignment.elements() {
        let (topic, partition) = (element.topic(), element.partition());
        if !candidates.contains(&(topic.to_string(), partition)) {
            continue;
        }
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let wait = remaining(deadline, CALL_TIMEOUT).ok_or_else(out_of_time)?;
        let (low, high) = probe.fetch_watermarks(topic, partition, wait)?;
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
                let wait = remaining(deadline, CALL_TIMEOUT).ok_or_else(out_of_time)?;
                committed = Some(consumer.committed(wait)?);
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
        let Some((to, capped)) = unreadable_stretch(
            &probe,
            (topic, partition),
            (from, high),
            MAX_PROBES_PER_ROUND,
            deadline,
            &|| cancel.is_cancelled(),
        )?
        else {
            continue;
        };
        return Ok(Some(Stuck {
            topic: topic.to_string(),
            partition,
            from,
            to,
            capped,
        }));
    }
    Ok(None)
}

/// Whether the record at `from` (below `high`, the end) of `topic`/`partition` cannot be
/// read, and then the first offset after it that can: `Some((to, capped))`, `from..to`
/// unreadable (`capped`: the probes stopped early, see [`first_readable`]); `None` when
/// `from` can be read (or the probe could not tell). Probes with `probe`, whose assignment
/// it changes, within `deadline`; `stop()` ends the probing where it is.
pub(super) fn unreadable_stretch(
    probe: &BaseConsumer,
    (topic, partition): (&str, i32),
    (from, high): (i64, i64),
    max_probes: usize,
    deadline: Instant,
    stop: &dyn Fn() -> bool,
) -> Result<Option<(i64, bool)>, KafkaError> {
    if from >= high || unreadable_at(probe, topic, partition, from, deadline)? != Some(true) {
        return Ok(None);
    }
    Ok(Some(first_readable(from, high, max_probes, |offset| {
        if stop() {
            return None;
        }
        unreadable_at(probe, topic, partition, offset, deadline)
            .ok()
            .flatten()
    })))
}

/// The first offset after `from` (unreadable) that can be read, probing forward one offset
/// at a time: a batch is unreadable as a whole, and where the next batch starts is not known,
/// so no offset is jumped over unprobed (halving could land in a later bad batch and skip
/// the readable records between). `unreadable(offset)` says whether reading from `offset`
/// fails (`None`: the probe could not tell, the round ends). Stops at `high` (the end) or
/// after `max_probes`; returns the offset and whether it stopped early (then the offset is
/// the first not probed: everything before it is known unreadable).
fn first_readable(
    from: i64,
    high: i64,
    max_probes: usize,
    mut unreadable: impl FnMut(i64) -> Option<bool>,
) -> (i64, bool) {
    let mut offset = from + 1;
    let mut probes = 0;
    while offset < high {
        if probes == max_probes {
            return (offset, true);
        }
        probes += 1;
        match unreadable(offset) {
            Some(true) => offset += 1,
            Some(false) => return (offset, false),
            None => return (offset, true),
        }
    }
    (offset, false)
}

/// Whether reading `topic`/`partition` from `offset` fails with an unreadable-record error;
/// `None` when the round's deadline passed before the probe could tell.
fn unreadable_at(
    probe: &BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
    deadline: Instant,
) -> Result<Option<bool>, KafkaError> {
    let Some(wait) = remaining(deadline, PROBE_WAIT) else {
        return Ok(None);
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    probe.assign(&tpl)?;
    let until = Instant::now() + wait;
    while Instant::now() < until {
        match probe.poll(Duration::from_millis(100)) {
            Some(Ok(m)) if m.partition() == partition && m.offset() >= offset => {
                return Ok(Some(false));
            }
            Some(Err(KafkaError::MessageConsumption(code)))
            | Some(Err(KafkaError::MessageConsumptionFatal(code)))
                if is_unreadable(code) =>
            {
                return Ok(Some(true));
            }
            _ => {}
        }
    }
    // Neither a record nor an error: nothing to read there (the end), which is readable;
    // unless the deadline cut the wait short.
    Ok(if wait < PROBE_WAIT { None } else { Some(false) })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `[bad 10..=12][good 13..=50][bad 51..=60][good 61..]`: the probe must stop at 13, not
    /// land in the second bad batch (as halving did) and skip 13..=50.
    #[test]
    fn the_first_readable_offset_is_found_even_with_a_bad_batch_further_on() {
        let bad = |o: i64| (10..=12).contains(&o) || (51..=60).contains(&o);
        let mut probed = Vec::new();
        let (to, capped) = first_readable(10, 100, MAX_PROBES_PER_ROUND, |o| {
            probed.push(o);
            Some(bad(o))
        });
        assert_eq!((to, capped), (13, false));
        assert_eq!(probed, [11, 12, 13]);
    }

    #[test]
    fn a_long_unreadable_stretch_is_capped_and_never_jumped_over() {
        let (to, capped) = first_readable(0, 10_000, 50, |_| Some(true));
        assert_eq!((to, capped), (51, true));
        // A probe that cannot tell ends the round where it is.
        let (to, capped) = first_readable(5, 100, 50, |o| (o < 8).then_some(true));
        assert_eq!((to, capped), (8, true));
        // Unreadable up to the end: the end.
        assert_eq!(first_readable(5, 9, 50, |_| Some(true)), (9, false));
    }
}

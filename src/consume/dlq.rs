//! Dead letters: listing an agent's `<agent>.dlq` and sending them back for processing
//! (redrive) through its `<agent>.replay` topic.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
    message::BorrowedMessage,
    producer::FutureProducer,
};
use serde::Serialize;

use super::{
    copied_headers, copy_of, header, header_str as text,
    unreadable::{MAX_PROBES_PER_ROUND, is_unreadable, remaining, unreadable_stretch},
};
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
    fn from_message<M: Message>(m: &M) -> DeadLetter {
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

/// Most dead letters in one page.
pub const MAX_PAGE: usize = 1000;

/// Dead letters in a page when the caller does not say.
pub const DEFAULT_PAGE: usize = 100;

/// Longest one page may take to read; a page cut short by it still answers what it read,
/// with a cursor to go on from.
pub const PAGE_DEADLINE: Duration = Duration::from_secs(10);

/// Longest the opening of a redrive's reader may take (metadata and watermarks).
const REDRIVE_OPEN_DEADLINE: Duration = Duration::from_secs(30);

/// Dead letters sent back per read of a redrive (a bound on the records it holds).
const REDRIVE_BATCH: usize = 100;

/// A position in a dead-letter topic: for each partition, the offset of the next record to
/// read. Written `0:15,1:3` (partition:offset, comma-separated); clients treat it as opaque.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor(BTreeMap<i32, i64>);

/// Most partitions a cursor may name (far above any dead-letter topic's).
const MAX_CURSOR_PARTITIONS: usize = 10_000;

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(p, o)| format!("{p}:{o}")).collect();
        f.write_str(&parts.join(","))
    }
}

/// Why a cursor does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a cursor of this API (a `next` value it answered): {0}")]
pub struct BadCursor(String);

impl std::str::FromStr for Cursor {
    type Err = BadCursor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut map = BTreeMap::new();
        for item in s.split(',') {
            let (p, o) = item
                .split_once(':')
                .ok_or_else(|| BadCursor(format!("{item:?} is not partition:offset")))?;
            let p: i32 = p
                .parse()
                .ok()
                .filter(|p| *p >= 0)
                .ok_or_else(|| BadCursor(format!("{p:?} is not a partition")))?;
            let o: i64 = o
                .parse()
                .ok()
                .filter(|o| *o >= 0)
                .ok_or_else(|| BadCursor(format!("{o:?} is not an offset")))?;
            if map.insert(p, o).is_some() {
                return Err(BadCursor(format!("partition {p} twice")));
            }
            if map.len() > MAX_CURSOR_PARTITIONS {
                return Err(BadCursor("too many partitions".into()));
            }
        }
        Ok(Cursor(map))
    }
}

/// Where a page starts.
#[derive(Debug, Clone, Default)]
pub enum Start {
    /// At the oldest dead letter still kept.
    #[default]
    Beginning,
    /// Where an earlier page's `next` cursor points.
    After(Cursor),
    /// At the first dead letter whose record timestamp (the original event's time, which
    /// dead-lettering keeps) is at or after this time, by the broker's offsets-for-times.
    Since(DateTime<Utc>),
}

/// Offsets of a dead-letter topic that the Kafka client cannot read (a batch whose
/// compression does not decode, a corrupt batch, a record too large for the fetch
/// settings): librdkafka would fetch the first of them again forever, so the reading skips
/// past them and says so. They are still in the topic, for Kafka's own tools.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The partition.
    pub partition: i32,
    /// The first offset skipped.
    pub from_offset: i64,
    /// The last offset skipped (inclusive).
    pub to_offset: i64,
    /// librdkafka's error code, e.g. `BadCompression`.
    pub reason: String,
}

impl Skipped {
    /// How many offsets it spans.
    pub fn count(&self) -> u64 {
        (self.to_offset - self.from_offset + 1).max(0) as u64
    }
}

/// One page of dead letters.
#[derive(Debug, Clone)]
pub struct Page {
    /// The dead letters, partition by partition, oldest first within each.
    pub dead_letters: Vec<DeadLetter>,
    /// What the page skipped because it cannot be read; `next` is past it.
    pub skipped: Vec<Skipped>,
    /// Where the next page starts; `None` once the end the topic had when this page was
    /// read is reached.
    pub next: Option<Cursor>,
}

/// Reads a topic page by page, partition by partition, up to the end offsets each partition
/// had when the reader was opened (records arriving later wait for a later reader).
struct Reader {
    consumer: BaseConsumer,
    topic: String,
    /// Per partition: the next offset to read and the end fixed at opening.
    positions: BTreeMap<i32, (i64, i64)>,
    /// Unreadable stretches skipped since the last [`Reader::take_skipped`].
    skipped: Vec<Skipped>,
}

/// `o` moved into `next..=end`; `end` wins when `next > end` (where `clamp` panics).
fn within(o: i64, next: i64, end: i64) -> i64 {
    o.max(next).min(end)
}

impl Reader {
    /// Opens `topic` at `start` (blocking), its broker calls within `deadline` (a page's
    /// one deadline covers the opening too: metadata, watermarks per partition and the
    /// offsets for a time each took up to 10 s of their own).
    fn open(
        kafka: &KafkaArgs,
        topic: &str,
        start: &Start,
        deadline: Instant,
    ) -> Result<Reader, Error> {
        let left = || {
            remaining(deadline, Duration::from_secs(10))
                .ok_or_else(|| Error::Timeout(topic.to_string()))
        };
        let consumer: BaseConsumer = kafka
            .client_config_with(&[
                // Never joins the group (it assigns partitions itself) and never commits.
                (
                    "group.id",
                    format!("agentbus-reader-{}", uuid::Uuid::new_v4()),
                ),
                ("enable.auto.commit", "false".into()),
                // Tells when a partition has nothing more, also when its last offsets are
                // not records (transaction markers, compacted away).
                ("enable.partition.eof", "true".into()),
            ])
            .create()?;
        let partitions = crate::topics::partitions_within(&consumer, topic, left()?)?;
        if partitions.is_empty() {
            return Err(Error::NoTopic(topic.to_string()));
        }
        let mut positions = BTreeMap::new();
        for &p in &partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, left()?)?;
            let from = match start {
                Start::Beginning => low,
                Start::After(cursor) => cursor.0.get(&p).copied().unwrap_or(low).max(low),
                Start::Since(_) => low,
            };
            positions.insert(p, (from, high));
        }
        if let Start::Since(t) = start {
            let mut query = TopicPartitionList::new();
            for &p in &partitions {
                // Kafka timestamps start at 1970 (a negative one is a special value or
                // invalid): an earlier time means from the beginning.
                let ms = t.timestamp_millis().max(0);
                query.add_partition_offset(topic, p, Offset::Offset(ms))?;
            }
            let found = consumer.offsets_for_times(query, left()?)?;
            for e in found.elements() {
                if let Some((next, end)) = positions.get_mut(&e.partition()) {
                    *next = match e.offset() {
                        // Not `clamp`, which panics when next > end (a cursor past the end).
                        Offset::Offset(o) => within(o, *next, *end),
                        // No record at or after the time.
                        _ => *end,
                    };
                }
            }
        }
        Ok(Reader {
            consumer,
            topic: topic.to_string(),
            positions,
            skipped: Vec::new(),
        })
    }

    /// Where the next read starts; `None` when every partition reached its end.
    fn cursor(&self) -> Option<Cursor> {
        self.positions
            .values()
            .any(|(next, end)| next < end)
            .then(|| Cursor(self.positions.iter().map(|(p, (n, _))| (*p, *n)).collect()))
    }

    /// The unreadable stretches skipped since the last call.
    fn take_skipped(&mut self) -> Vec<Skipped> {
        std::mem::take(&mut self.skipped)
    }

    /// Up to `limit` records, each passed through `keep`, by `deadline`. Records the client
    /// cannot read are skipped (see [`Skipped`], kept until [`Reader::take_skipped`]).
    /// Stopped by the deadline, it answers what it read (the cursor goes on from there);
    /// with nothing read nor skipped, it is [`Error::Timeout`].
    fn read<T>(
        &mut self,
        limit: usize,
        deadline: Instant,
        mut keep: impl FnMut(&BorrowedMessage<'_>) -> T,
    ) -> Result<Vec<T>, Error> {
        let mut out = Vec::new();
        let open: Vec<i32> = self
            .positions
            .iter()
            .filter(|(_, (next, end))| next < end)
            .map(|(p, _)| *p)
            .collect();
        for p in open {
            if out.len() >= limit {
                break;
            }
            let mut assignment = TopicPartitionList::new();
            let next = self.positions[&p].0;
            assignment.add_partition_offset(&self.topic, p, Offset::Offset(next))?;
            self.consumer.assign(&assignment)?;
            loop {
                let (next, end) = self.positions[&p];
                if next >= end || out.len() >= limit {
                    break;
                }
                if Instant::now() > deadline {
                    return if out.is_empty() && self.skipped.is_empty() {
                        Err(Error::Timeout(self.topic.clone()))
                    } else {
                        Ok(out)
                    };
                }
                let Some(result) = self.consumer.poll(Duration::from_millis(100)) else {
                    continue;
                };
                let m = match result {
                    Ok(m) => m,
                    Err(rdkafka::error::KafkaError::PartitionEOF(eof)) if eof == p => {
                        // Nothing left below the end: the rest were not records.
                        self.positions.insert(p, (end, end));
                        break;
                    }
                    Err(rdkafka::error::KafkaError::PartitionEOF(_)) => continue,
                    // Only `p` is assigned: the record at its position cannot be read, and
                    // librdkafka would fetch it again forever.
                    Err(
                        rdkafka::error::KafkaError::MessageConsumption(code)
                        | rdkafka::error::KafkaError::MessageConsumptionFatal(code),
                    ) if is_unreadable(code) => {
                        self.skip_unreadable(p, code, deadline)?;
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if m.partition() != p || m.offset() < next {
                    continue;
                }
                self.positions.insert(p, (m.offset() + 1, end));
                if m.offset() < end {
                    out.push(keep(&m));
                }
            }
        }
        Ok(out)
    }
}

impl Reader {
    /// After an unreadable-record error on `p`: finds how far the unreadable stretch at its
    /// position goes (the agent's probe, [`unreadable_stretch`]), notes it and moves past
    /// it. The probe reassigns the reader; it is assigned back at the position after.
    fn skip_unreadable(
        &mut self,
        p: i32,
        code: rdkafka::types::RDKafkaErrorCode,
        deadline: Instant,
    ) -> Result<(), Error> {
        let (next, end) = self.positions[&p];
        let stretch = unreadable_stretch(
            &self.consumer,
            (&self.topic, p),
            (next, end),
            MAX_PROBES_PER_ROUND,
            deadline,
            &|| false,
        )?;
        let at = match stretch {
            Some((to, capped)) => {
                let skipped = Skipped {
                    partition: p,
                    from_offset: next,
                    to_offset: to - 1,
                    reason: format!("{code:?}"),
                };
                tracing::warn!(
                    topic = %self.topic,
                    partition = p,
                    from_offset = skipped.from_offset,
                    to_offset = skipped.to_offset,
                    reason = %skipped.reason,
                    capped,
                    "dead letters the client cannot read were skipped; they are still in the topic"
                );
                self.skipped.push(skipped);
                self.positions.insert(p, (to, end));
                to
            }
            // Readable after all (or the probe could not tell): read from the position again.
            None => next,
        };
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, p, Offset::Offset(at))?;
        self.consumer.assign(&assignment)?;
        Ok(())
    }
}

/// One page of the dead letters of `dlq_topic`: at most `limit` (1 to [`MAX_PAGE`]) from
/// `start`, read within [`PAGE_DEADLINE`], and the cursor of the next page.
pub async fn page(
    kafka: &KafkaArgs,
    dlq_topic: &str,
    start: Start,
    limit: usize,
) -> Result<Page, Error> {
    let (kafka, topic) = (kafka.clone(), dlq_topic.to_string());
    let limit = limit.clamp(1, MAX_PAGE);
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + PAGE_DEADLINE;
        let mut reader = Reader::open(&kafka, &topic, &start, deadline)?;
        let dead_letters = reader.read(limit, deadline, |m: &BorrowedMessage<'_>| {
            DeadLetter::from_message(m)
        })?;
        Ok(Page {
            dead_letters,
            skipped: reader.take_skipped(),
            next: reader.cursor(),
        })
    })
    .await
    .expect("the reader does not panic")
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
/// redrives of the same dead letter are still recognised as one. Records the client cannot
/// read are skipped (as a page skips them). Returns how many were sent and what was skipped.
pub async fn redrive(
    kafka: &KafkaArgs,
    dlq_topic: &str,
    replay_topic: &str,
    filter: &Filter,
) -> Result<Redriven, Error> {
    // Read in batches (a bounded number of records held at a time), up to the end the topic
    // had when the redrive started.
    let (k, topic) = (kafka.clone(), dlq_topic.to_string());
    let reader = tokio::task::spawn_blocking(move || {
        Reader::open(
            &k,
            &topic,
            &Start::Beginning,
            Instant::now() + REDRIVE_OPEN_DEADLINE,
        )
    })
    .await
    .expect("the reader does not panic")?;
    let reader = std::sync::Arc::new(std::sync::Mutex::new(reader));
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
    let mut skipped = Vec::new();
    loop {
        let r = reader.clone();
        let (messages, skipped_now) = tokio::task::spawn_blocking(move || {
            let mut r = r.lock().expect("reader lock");
            if r.cursor().is_none() {
                return Ok((Vec::new(), Vec::new()));
            }
            let read = r.read(
                REDRIVE_BATCH,
                Instant::now() + PAGE_DEADLINE,
                |m: &BorrowedMessage<'_>| m.detach(),
            )?;
            Ok::<_, Error>((read, r.take_skipped()))
        })
        .await
        .expect("the reader does not panic")?;
        // A read that only skipped still moved on: the end is when neither happened.
        if messages.is_empty() && skipped_now.is_empty() {
            break;
        }
        skipped.extend(skipped_now);
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
    }
    Ok(Redriven { sent, skipped })
}

/// What a redrive did.
#[derive(Debug, Clone)]
pub struct Redriven {
    /// Dead letters sent back.
    pub sent: usize,
    /// Stretches it skipped because the client cannot read them (see [`Skipped`]).
    pub skipped: Vec<Skipped>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_for_a_time_past_a_cursor_beyond_the_end_does_not_panic() {
        assert_eq!(within(5, 10, 3), 3);
        assert_eq!(within(5, 1, 9), 5);
        assert_eq!(within(0, 1, 9), 1);
        assert_eq!(within(20, 1, 9), 9);
    }

    #[test]
    fn opening_a_reader_keeps_to_the_page_deadline() {
        // Nobody listens there: every broker call would wait its own 10 s.
        let kafka = KafkaArgs {
            brokers: "127.0.0.1:1".into(),
            topic_prefix: String::new(),
            ..KafkaArgs::default()
        };
        let started = Instant::now();
        let opened = Reader::open(
            &kafka,
            "t.agent.dlq",
            &Start::Beginning,
            started + Duration::from_millis(500),
        );
        assert!(opened.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_cursor_reads_back_what_it_writes_and_refuses_anything_else() {
        let c: Cursor = "0:15,2:3".parse().unwrap();
        assert_eq!(c.to_string(), "0:15,2:3");
        assert_eq!(c.0.get(&2), Some(&3));
        for bad in [
            "", "0", "0:", ":1", "-1:0", "0:-1", "0:1,0:2", "a:b", "0:1;1:2",
        ] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
        }
    }
}

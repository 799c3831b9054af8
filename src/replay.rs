//! Replay from a timestamp: copy a bounded range of history into an agent's `<agent>.replay`
//! topic (or any topic), or move a group's committed offsets back to a time.
//!
//! A replay finds each partition's first offset at or after `from` (offsets-for-times), fixes
//! the end at the high watermark of the moment it starts (or the first offset at `until`),
//! and copies the records of that range whose timestamp lies in `[from, until)` and whose
//! `ce_type` matches: key, value, timestamp and headers untouched, plus `agentbus-replay-id`.
//! It reads with its own consumer that joins no group and commits nothing, so the live
//! consumers of the source topics never notice it. The replay id makes the copies new to the
//! agent's dedup store; giving the same id again (`--replay-id`) makes a repeated or resumed
//! replay a no-op for what was already handled.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rdkafka::{
    ClientContext, Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, CommitMode, Consumer},
    error::KafkaError,
    message::{DeliveryResult, Header, Headers, OwnedHeaders},
    producer::{BaseProducer, BaseRecord, Producer, ProducerContext},
    types::RDKafkaErrorCode,
};
use serde::Serialize;

use crate::{
    config::KafkaArgs,
    consume::{definition::pattern_matches, header},
    lag::{self, groups},
    publish, telemetry,
};

/// Errors of a replay or an offset reset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is not valid (times, filters).
    #[error("{0}")]
    Invalid(String),
    /// A topic or agent that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The group has active members (or that cannot be ruled out).
    #[error("{0}")]
    GroupActive(String),
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Partitions whose reading stalled: given up, each with its reason (the other
    /// partitions were replayed).
    #[error("{0}")]
    Stalled(String),
    /// The broker's offsets-for-times answer could not be checked because the records it
    /// points at could not be read (only with a broker quirk that makes the check
    /// necessary: Apache Kafka's answer is exact and kept unchecked then). The reason
    /// names each offset and why; it may pass (a slow broker) or not (a record this
    /// service cannot read), so it is answered as the broker's failure, 503.
    #[error("{0}")]
    Unverifiable(String),
    /// Records could not be written.
    #[error("writing to {topic} failed: {reason}")]
    Write {
        /// Where.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// Settings of replays (`serve` and `agentbus replay`).
#[derive(Debug, Clone, clap::Args)]
pub struct ReplaySettings {
    /// A partition of a replay that reads no record for this long, short of its end, is given
    /// up with its reason (a record the client cannot read: too large for the fetch settings,
    /// not decodable); the other partitions go on and the replay then fails naming it.
    #[arg(long = "replay-stall-timeout", env = "AGENTBUS_REPLAY_STALL_TIMEOUT", default_value = "120s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        ReplaySettings {
            stall_timeout: Duration::from_secs(120),
        }
    }
}

/// Where a replay writes.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The agent's `<agent>.replay` topic: the agent handles the records again.
    Agent(String),
    /// Any other topic.
    Topic(String),
}

/// What to replay.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    /// Records at or after this time.
    pub from: DateTime<Utc>,
    /// Records before this time (default: up to the end fixed at the start).
    pub until: Option<DateTime<Utc>>,
    /// Source topics.
    pub topics: Vec<String>,
    /// Event types (or patterns like `agent.task.*`); their domains' topics are read and
    /// only matching records copied.
    pub event_types: Vec<String>,
    /// Where to write.
    pub target: Target,
    /// The replay id written on every copy; a fresh one when absent.
    pub replay_id: Option<String>,
}

impl Request {
    /// Checks what needs no broker.
    pub fn validate(&self) -> Result<(), Error> {
        if self.topics.is_empty() && self.event_types.is_empty() {
            return Err(Error::Invalid(
                "name what to replay: a topic or at least one event type".into(),
            ));
        }
        if let Some(until) = self.until
            && until <= self.from
        {
            return Err(Error::Invalid(format!(
                "from ({}) must be before until ({})",
                self.from.to_rfc3339(),
                until.to_rfc3339()
            )));
        }
        if self.from > Utc::now() {
            return Err(Error::Invalid(format!(
                "from ({}) is in the future",
                self.from.to_rfc3339()
            )));
        }
        for t in &self.event_types {
            if !t.contains('.') || t.starts_with('.') {
                return Err(Error::Invalid(format!(
                    "event type {t:?} is not a dotted name or pattern like agent.task.*"
                )));
            }
        }
        match &self.target {
            Target::Agent(a) | Target::Topic(a) if a.trim().is_empty() => {
                Err(Error::Invalid("the target is empty".into()))
            }
            _ => Ok(()),
        }
    }

    /// The topics to read: the named ones and the domain topics of the event types.
    pub fn source_topics(&self, kafka: &KafkaArgs) -> Vec<String> {
        let mut topics = self.topics.clone();
        for t in &self.event_types {
            let domain = t.split('.').next().unwrap_or(t);
            topics.push(kafka.events_topic(domain));
        }
        topics.sort();
        topics.dedup();
        topics
    }

    /// The topic the copies go to.
    pub fn target_topic(&self, kafka: &KafkaArgs) -> String {
        match &self.target {
            Target::Agent(g) => format!("{}{g}.replay", kafka.topic_prefix),
            Target::Topic(t) => t.clone(),
        }
    }

    /// Whether a record's timestamp lies in `[from, until)`.
    fn time_matches(&self, timestamp: Option<i64>) -> bool {
        let from = self.from.timestamp_millis();
        timestamp
            .is_some_and(|ts| ts >= from && self.until.is_none_or(|u| ts < u.timestamp_millis()))
    }

    /// Whether a record's `ce_type` matches the event types (any type when none are given).
    fn type_matches(&self, event_type: Option<&str>) -> bool {
        self.event_types.is_empty()
            || event_type.is_some_and(|t| self.event_types.iter().any(|p| pattern_matches(p, t)))
    }
}

/// One partition's range.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionPlan {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The first offset at or after `from`.
    pub start_offset: i64,
    /// The end fixed at the start (exclusive).
    pub end_offset: i64,
}

impl PartitionPlan {
    /// Records in the range (some may fall outside the filters).
    pub fn records(&self) -> u64 {
        (self.end_offset - self.start_offset).max(0) as u64
    }
}

/// A replay, planned: ranges fixed.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The replay id written on every copy.
    pub replay_id: String,
    /// Where the copies go.
    pub target_topic: String,
    /// Every partition of the source topics.
    pub partitions: Vec<PartitionPlan>,
}

impl Plan {
    /// Records in all ranges.
    pub fn records(&self) -> u64 {
        self.partitions.iter().map(PartitionPlan::records).sum()
    }
}

/// Counters a replay updates as it goes (read by the progress bar and `GET /v1/replays/{id}`).
#[derive(Debug, Default)]
pub struct Progress {
    /// Records in the ranges.
    pub total: AtomicU64,
    /// Records read so far.
    pub scanned: AtomicU64,
    /// Records that matched the filters.
    pub matched: AtomicU64,
    /// Copies the broker acknowledged.
    pub copied: AtomicU64,
    /// Set to stop early.
    pub cancel: AtomicBool,
    /// Partitions given up because their reading stalled.
    pub stalled: Mutex<Vec<Stalled>>,
}

/// A partition of a replay given up: its reading stalled short of the range's end.
#[derive(Debug, Clone, Serialize)]
pub struct Stalled {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Where the reading stood: the first offset not read.
    pub at_offset: i64,
    /// The range's end (exclusive).
    pub end_offset: i64,
    /// Why.
    pub reason: String,
}

/// Per partition: the count a replay copied (or, dry, would copy).
#[derive(Debug, Clone, Serialize)]
pub struct PartitionCount {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The range.
    pub start_offset: i64,
    /// The range's end (exclusive).
    pub end_offset: i64,
    /// Matching records.
    pub matched: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The replay id.
    pub replay_id: String,
    /// Where the copies went.
    pub target_topic: String,
    /// Records read.
    pub scanned: u64,
    /// Records matching.
    pub matched: u64,
    /// Records written (0 on a dry run).
    pub copied: u64,
    /// Per partition.
    pub partitions: Vec<PartitionCount>,
    /// Seconds it took.
    pub seconds: f64,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// An offset per (topic, partition).
type Offsets = HashMap<(String, i32), i64>;

/// A reader (read committed, as the agents read) that joins no group and commits nothing.
/// Only one that is assigned partitions (`assigned`) has a group id, which librdkafka needs
/// for an assignment and for nothing else here; a client without one is also torn down at
/// once, where one with a group id closes its group handle first.
fn reader(kafka: &KafkaArgs, assigned: bool) -> Result<BaseConsumer, Error> {
    let mut settings = vec![
        ("enable.auto.commit", "false".to_string()),
        ("enable.auto.offset.store", "false".into()),
        ("enable.partition.eof", "false".into()),
    ];
    if assigned {
        settings.push((
            "group.id",
            format!("agentbus-replay-{}", uuid::Uuid::now_v7()),
        ));
    }
    Ok(kafka.client_config_with(&settings).create()?)
}

/// The partitions of `topic`, or `NotFound`.
fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, Error> {
    let partitions = crate::topics::partitions_of(consumer, topic)?;
    if partitions.is_empty() {
        return Err(Error::NotFound(format!("no topic {topic}")));
    }
    Ok(partitions)
}

/// The end offsets (high watermarks) of every (topic, partition).
fn ends_of(
    consumer: &BaseConsumer,
    parts: &[(String, i32)],
) -> Result<HashMap<(String, i32), i64>, Error> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition_offset(t, *p, Offset::End)?;
    }
    let answered = consumer.offsets_for_times(tpl, TIMEOUT)?;
    answered
        .elements()
        .iter()
        .map(|e| match e.offset() {
            Offset::Offset(o) => Ok(((e.topic().to_string(), e.partition()), o)),
            other => Err(Error::Invalid(format!(
                "the broker answered {other:?} for the end of {}/{}",
                e.topic(),
                e.partition()
            ))),
        })
        .collect()
}

/// The first offset whose record's timestamp is at or after `time`, per (topic, partition);
/// the end where there is none.
fn offsets_at(
    kafka: &KafkaArgs,
    consumer: &BaseConsumer,
    parts: &[(String, i32)],
    time: DateTime<Utc>,
    ends: &HashMap<(String, i32), i64>,
) -> Result<HashMap<(String, i32), i64>, Error> {
    let (out, to_check) = offsets_answered(consumer, parts, time, ends)?;
    check_offsets_for_times(kafka, out, &to_check, time, ends)
}

/// Checks each offsets-for-times answer by reading (read committed) from the offset it
/// points at. On every broker: where nothing a consumer would get lies between it and the
/// end (the answer is an aborted record or a transaction marker: Kafka's time index knows
/// nothing of transactions), the answer becomes the end. With
/// [`Quirks::offsets_for_times_zero_for_none`](crate::broker::Quirks) (tansu 0.6 answers 0
/// instead of "none" when every record is older than `time`, which would reset a whole
/// partition), an answer whose record is older than `time` becomes the end too; on Apache
/// Kafka that answer is exact and kept.
fn check_offsets_for_times(
    kafka: &KafkaArgs,
    mut out: Offsets,
    to_check: &[lag::Position],
    time: DateTime<Utc>,
    ends: &HashMap<(String, i32), i64>,
) -> Result<Offsets, Error> {
    let target = time.timestamp_millis();
    let end_of = |topic: &str, partition: i32| {
        ends.get(&(topic.to_string(), partition))
            .copied()
            .unwrap_or(0)
    };
    // `ends` are last stable offsets (read committed): the reading stops there.
    let wanted: Vec<(lag::Position, lag::Bounds)> = to_check
        .iter()
        .map(|p| {
            let end = end_of(&p.0, p.1);
            (p.clone(), lag::Bounds { stable: end, end })
        })
        .collect();
    let quirks = kafka.quirks();
    let found = lag::oldest_unconsumed(kafka, &wanted, 64, quirks.check_timeout())?;
    let mut unread = Vec::new();
    for ((topic, partition, offset), oldest) in found {
        match checked(&oldest, target, quirks) {
            Checked::Kept => {}
            Checked::End => {
                let end = end_of(&topic, partition);
                out.insert((topic, partition), end);
            }
            Checked::Unread => {
                let why = match &oldest {
                    lag::Oldest::Unread { why, .. } => why.as_str(),
                    _ => "not read",
                };
                unread.push(format!("{topic}/{partition} offset {offset}: {why}"));
            }
        }
    }
    if !unread.is_empty() {
        unread.sort();
        return Err(Error::Unverifiable(format!(
            "the broker's offsets for {time} (it may answer 0 for \"no record that late\", \
             see --broker-quirks) could not be checked: the records there could not be read \
             ({})",
            unread.join("; ")
        )));
    }
    Ok(out)
}

/// What becomes of one offsets-for-times answer once checked.
#[derive(Debug, PartialEq, Eq)]
enum Checked {
    /// The answer stands.
    Kept,
    /// The partition's end instead.
    End,
    /// The record there could not be read.
    Unread,
}

/// The check of [`check_offsets_for_times`] for one answer, whose first consumable record
/// was found to be `oldest`, `target` the time asked (ms).
fn checked(oldest: &lag::Oldest, target: i64, quirks: crate::broker::Quirks) -> Checked {
    match oldest {
        // Apache Kafka's answer is exact: a record there that this service cannot read (too
        // large for its fetch settings, not decodable) is still the first one at or after
        // the time, and where a reset puts the group. Only the quirk needs the record read.
        lag::Oldest::Unread { .. } if !quirks.offsets_for_times_zero_for_none => Checked::Kept,
        lag::Oldest::Record(ts) if *ts >= target || !quirks.offsets_for_times_zero_for_none => {
            Checked::Kept
        }
        // Older than `time` (tansu's 0), or nothing but markers and aborted records up to the
        // end.
        lag::Oldest::Record(_)
        | lag::Oldest::NothingToConsume
        | lag::Oldest::OpenTransaction(_) => Checked::End,
        lag::Oldest::Unread { .. } => Checked::Unread,
    }
}

/// A replay's `until` offset of one partition from the broker's answer `until` (see
/// [`tansu_widened_until`], only with that quirk).
fn until_offset(quirks: crate::broker::Quirks, until: i64, start: i64, end: i64) -> i64 {
    if quirks.offsets_for_times_zero_for_none {
        tansu_widened_until(until, start, end)
    } else {
        until
    }
}

/// The broker's answer to offsets-for-times: offsets per (topic, partition) (the end where it
/// has none), and the positions that answer points at, unchecked.
fn offsets_answered(
    consumer: &BaseConsumer,
    parts: &[(String, i32)],
    time: DateTime<Utc>,
    ends: &HashMap<(String, i32), i64>,
) -> Result<(Offsets, Vec<lag::Position>), Error> {
    let target = time.timestamp_millis();
    let mut tpl = TopicPartitionList::new();
    for (t, p) in parts {
        tpl.add_partition_offset(t, *p, Offset::Offset(target))?;
    }
    let answered = consumer.offsets_for_times(tpl, TIMEOUT)?;
    let mut out = HashMap::new();
    let mut to_check = Vec::new();
    for e in answered.elements() {
        let key = (e.topic().to_string(), e.partition());
        let end = ends.get(&key).copied().unwrap_or(0);
        let offset = match e.offset() {
            Offset::Offset(o) if o < end => {
                to_check.push((key.0.clone(), key.1, o));
                o
            }
            _ => end,
        };
        out.insert(key, offset);
    }
    Ok((out, to_check))
}

/// Plans a replay: checks that the sources and the target exist, fixes every range.
pub fn plan(kafka: &KafkaArgs, request: &Request) -> Result<Plan, Error> {
    request.validate()?;
    let consumer = reader(kafka, false)?;
    let target_topic = request.target_topic(kafka);
    if let Err(Error::NotFound(_)) = partitions_of(&consumer, &target_topic) {
        return Err(Error::NotFound(match &request.target {
            Target::Agent(g) => {
                format!("no agent {g:?}: its replay topic {target_topic} does not exist")
            }
            Target::Topic(t) => format!("no topic {t}"),
        }));
    }
    let mut parts = Vec::new();
    for topic in request.source_topics(kafka) {
        if topic == target_topic {
            return Err(Error::Invalid(format!("{topic} is both source and target")));
        }
        for p in partitions_of(&consumer, &topic)? {
            parts.push((topic.clone(), p));
        }
    }
    // The ranges only bound the reading; each record's own timestamp decides whether it is
    // copied. So the broker's offsets-for-times answers are taken unchecked: where a broker
    // answers 0 for "no record that late" (tansu 0.6), the replay reads more, never less
    // (see tansu_widened_until, only with that quirk).
    let quirks = kafka.quirks();
    let ends = ends_of(&consumer, &parts)?;
    let (starts, _) = offsets_answered(&consumer, &parts, request.from, &ends)?;
    let untils = match request.until {
        Some(u) => {
            let (untils, _) = offsets_answered(&consumer, &parts, u, &ends)?;
            untils
                .into_iter()
                .map(|(key, o)| {
                    let end = ends.get(&key).copied().unwrap_or(o);
                    let start = starts.get(&key).copied().unwrap_or(0);
                    (key, until_offset(quirks, o, start, end))
                })
                .collect()
        }
        None => ends.clone(),
    };
    let mut partitions: Vec<PartitionPlan> = parts
        .into_iter()
        .map(|key| {
            // The broker answers for every partition asked; a missing answer reads it whole.
            let end = ends.get(&key).copied().unwrap_or(0);
            let start = starts.get(&key).copied().unwrap_or(0);
            PartitionPlan {
                end_offset: untils.get(&key).copied().unwrap_or(end).max(start),
                start_offset: start,
                topic: key.0,
                partition: key.1,
            }
        })
        .collect();
    partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(Plan {
        replay_id: request
            .replay_id
            .clone()
            .unwrap_or_else(|| format!("replay-{}", uuid::Uuid::now_v7())),
        target_topic,
        partitions,
    })
}

/// Broker quirk (tansu 0.6 answers 0 for "no record that late"; only with
/// [`Quirks::offsets_for_times_zero_for_none`](crate::broker::Quirks)): `until`'s offset
/// bounds a replay's range only where it is past the start; else the range runs to the end
/// (the records' own timestamps still decide what is copied). On Apache Kafka an answer at
/// the start means an empty range, and `until`'s answer is taken as it is.
fn tansu_widened_until(until: i64, start: i64, end: i64) -> i64 {
    if until > start { until } else { end }
}

/// Counts deliveries.
#[derive(Default)]
struct Deliveries {
    acked: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
    progress: Option<Arc<Progress>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.acked.fetch_add(1, Ordering::Relaxed);
                if let Some(p) = &self.progress {
                    p.copied.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                let mut first = self.first_error.lock().expect("delivery error lock");
                first.get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// Runs a planned replay (blocking) with the default [`ReplaySettings`]. With `dry_run` it
/// reads and counts what it would copy and writes nothing.
pub fn execute(
    kafka: &KafkaArgs,
    request: &Request,
    plan: &Plan,
    progress: Arc<Progress>,
    dry_run: bool,
) -> Result<Summary, Error> {
    execute_with(
        kafka,
        request,
        plan,
        progress,
        dry_run,
        &ReplaySettings::default(),
    )
}

/// Runs a planned replay (blocking). A partition that reads no record for
/// `settings.stall_timeout` short of its end is given up (in `progress.stalled`) and the
/// others go on; the replay then ends with [`Error::Stalled`] naming each, after what it
/// copied was acknowledged.
pub fn execute_with(
    kafka: &KafkaArgs,
    request: &Request,
    plan: &Plan,
    progress: Arc<Progress>,
    dry_run: bool,
    settings: &ReplaySettings,
) -> Result<Summary, Error> {
    let started = Instant::now();
    progress.total.store(plan.records(), Ordering::Relaxed);
    let consumer = reader(kafka, true)?;
    let producer: Option<BaseProducer<Deliveries>> = if dry_run {
        None
    } else {
        Some(bulk_producer_config(kafka).create_with_context(Deliveries {
            progress: Some(progress.clone()),
            ..Deliveries::default()
        })?)
    };
    let outcome = copy(
        &consumer,
        producer.as_ref(),
        request,
        plan,
        &progress,
        settings,
        started,
    );
    // Tearing the clients down (librdkafka closes the reader's group handle, polling in
    // steps of 100 ms) is no part of the replay: everything copied was acknowledged by the
    // flush in `copy`. It runs on a thread of its own, so that the caller has its answer at
    // once.
    std::thread::spawn(move || drop((consumer, producer)));
    outcome
}

/// The producer of a bulk copy: the publisher's settings (idempotent, acks=all, the
/// configured compression, batches capped to what the broker takes), with a longer linger,
/// so that batches fill up (a copy has no caller waiting on each record). Every copy gets
/// its delivery report, taken on the copying thread: with reports for failures only
/// (`delivery.report.only.error`) librdkafka frees each copy on the thread that builds the
/// produce requests, which then lags behind, and the copy is slower (measured: 164 000 to
/// 205 000 records/s against 225 000 to 250 000 with every report).
fn bulk_producer_config(kafka: &KafkaArgs) -> rdkafka::ClientConfig {
    let mut config = publish::producer_config(kafka, Duration::from_secs(60));
    // As every default, it gives way to its AGENTBUS_KAFKA_* variable.
    if std::env::var_os("AGENTBUS_KAFKA_LINGER_MS").is_none() {
        config.set("linger.ms", "20");
    }
    config
}

/// One partition being read.
struct Lane {
    topic: String,
    partition: i32,
    /// The range's end (exclusive).
    end: i64,
    open: bool,
    /// The next offset to read: the stall clock compares it between checks.
    next: i64,
    /// `next` at the last check, and when it last moved.
    checked: (i64, Instant),
    matched: u64,
}

/// The lanes of a plan, and where each partition's lane is.
struct Lanes {
    lanes: Vec<Lane>,
    index: HashMap<String, HashMap<i32, usize>>,
    /// The lane of the last record: records come in runs of one partition.
    last: usize,
    open: usize,
}

impl Lanes {
    fn of(plan: &Plan) -> Lanes {
        let now = Instant::now();
        let mut index: HashMap<String, HashMap<i32, usize>> = HashMap::new();
        let lanes: Vec<Lane> = plan
            .partitions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                index
                    .entry(p.topic.clone())
                    .or_default()
                    .insert(p.partition, i);
                Lane {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    end: p.end_offset,
                    open: p.end_offset > p.start_offset,
                    next: p.start_offset,
                    checked: (p.start_offset, now),
                    matched: 0,
                }
            })
            .collect();
        let open = lanes.iter().filter(|l| l.open).count();
        Lanes {
            lanes,
            index,
            last: 0,
            open,
        }
    }

    /// The lane of (topic, partition), without allocating.
    fn find(&mut self, topic: &str, partition: i32) -> Option<usize> {
        if let Some(l) = self.lanes.get(self.last)
            && l.partition == partition
            && l.topic == topic
        {
            return Some(self.last);
        }
        let i = *self.index.get(topic)?.get(&partition)?;
        self.last = i;
        Some(i)
    }

    /// Closes lane `i` (its end reached, or given up): paused on the reader.
    fn close(&mut self, consumer: &BaseConsumer, i: usize) -> Result<(), Error> {
        let lane = &mut self.lanes[i];
        if !lane.open {
            return Ok(());
        }
        lane.open = false;
        self.open -= 1;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&lane.topic, lane.partition);
        consumer.pause(&tpl)?;
        Ok(())
    }

    /// Closes the open lanes whose reader position passed their end (a range may end on
    /// offsets that hold no record: transaction markers, compaction).
    fn close_passed(&mut self, consumer: &BaseConsumer) -> Result<(), Error> {
        let position = consumer.position()?;
        for e in position.elements() {
            if let Offset::Offset(at) = e.offset()
                && let Some(i) = self.find(e.topic(), e.partition())
                && self.lanes[i].open
                && at >= self.lanes[i].end
            {
                self.close(consumer, i)?;
            }
        }
        Ok(())
    }
}

/// The headers of a copy: the original's in their order, but for an `agentbus-replay-id`
/// (the copy gets this replay's), then `replay_id`. One allocation per header (librdkafka's
/// own), the list sized once.
fn copy_headers(
    headers: Option<&rdkafka::message::BorrowedHeaders>,
    replay_id: &str,
) -> OwnedHeaders {
    let count = headers.map_or(0, |h| h.count());
    let mut out = OwnedHeaders::new_with_capacity(count + 1);
    if let Some(h) = headers {
        for header in h.iter() {
            if header.key != header::REPLAY_ID {
                out = out.insert(header);
            }
        }
    }
    out.insert(Header {
        key: header::REPLAY_ID,
        value: Some(replay_id.as_bytes()),
    })
}

/// The `ce_type` of a record, borrowed (read only when a replay filters by type).
fn event_type_of(headers: Option<&rdkafka::message::BorrowedHeaders>) -> Option<&[u8]> {
    headers?
        .iter()
        .find(|h| h.key == header::TYPE)
        .and_then(|h| h.value)
}

/// The reading and copying of [`execute_with`], on its clients.
fn copy(
    consumer: &BaseConsumer,
    producer: Option<&BaseProducer<Deliveries>>,
    request: &Request,
    plan: &Plan,
    progress: &Progress,
    settings: &ReplaySettings,
    started: Instant,
) -> Result<Summary, Error> {
    let mut lanes = Lanes::of(plan);
    let mut assignment = TopicPartitionList::new();
    for p in &plan.partitions {
        if p.end_offset > p.start_offset {
            assignment.add_partition_offset(
                &p.topic,
                p.partition,
                Offset::Offset(p.start_offset),
            )?;
        }
    }
    if lanes.open > 0 {
        consumer.assign(&assignment)?;
    }
    let replay_id = plan.replay_id.as_str();
    let by_type = !request.event_types.is_empty();
    let mut idle_since = Instant::now();
    let mut last_check = Instant::now();
    // What the reader reported (it retries by itself): the reason of a stall, few and distinct.
    let mut errors: std::collections::BTreeSet<String> = Default::default();
    while lanes.open > 0 {
        if progress.cancel.load(Ordering::Relaxed) {
            return Err(Error::Invalid(format!(
                "cancelled (the process stopped); run it again with --replay-id {replay_id} to \
                 skip what was handled"
            )));
        }
        if last_check.elapsed() > Duration::from_millis(500) {
            last_check = Instant::now();
            give_up_stalled(
                consumer,
                &mut lanes,
                settings.stall_timeout,
                &errors,
                progress,
            )?;
            if lanes.open == 0 {
                break;
            }
        }
        if let Some(p) = producer {
            p.poll(Duration::ZERO);
        }
        let Some(result) = consumer.poll(Duration::from_millis(100)) else {
            // A range may end on offsets that hold no record (transaction markers,
            // compaction): the reader's position past the end closes it.
            if idle_since.elapsed() > Duration::from_secs(2) {
                lanes.close_passed(consumer)?;
                idle_since = Instant::now();
            }
            continue;
        };
        idle_since = Instant::now();
        // The client retries by itself; an error here is reported and the reading goes on
        // (a partition that no longer progresses is given up above).
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "replay: reading");
                if errors.len() < 4 {
                    errors.insert(e.to_string());
                }
                continue;
            }
        };
        let Some(i) = lanes.find(m.topic(), m.partition()) else {
            continue;
        };
        let lane = &mut lanes.lanes[i];
        if !lane.open {
            continue;
        }
        let (offset, end) = (m.offset(), lane.end);
        lane.next = offset + 1;
        if offset >= end {
            lanes.close(consumer, i)?;
            continue;
        }
        progress.scanned.fetch_add(1, Ordering::Relaxed);
        let timestamp = m.timestamp().to_millis();
        // librdkafka parses a record's headers when first asked: only for records in the
        // window. The type is read as text (an invalid UTF-8 byte becomes U+FFFD, as
        // everywhere agentbus reads a header), borrowed.
        let wanted = request.time_matches(timestamp)
            && (!by_type
                || request.type_matches(
                    event_type_of(m.headers())
                        .map(String::from_utf8_lossy)
                        .as_deref(),
                ));
        if wanted {
            lane.matched += 1;
            progress.matched.fetch_add(1, Ordering::Relaxed);
            if let Some(producer) = producer {
                let headers = copy_headers(m.headers(), replay_id);
                let mut record = BaseRecord::<[u8], [u8]>::to(&plan.target_topic).headers(headers);
                if let Some(k) = m.key() {
                    record = record.key(k);
                }
                if let Some(v) = m.payload() {
                    record = record.payload(v);
                }
                if let Some(ts) = timestamp {
                    record = record.timestamp(ts);
                }
                send(producer, record, &plan.target_topic)?;
            }
        }
        if offset + 1 >= end {
            lanes.close(consumer, i)?;
        }
    }
    let mut copied = 0;
    if let Some(producer) = producer {
        producer.flush(Duration::from_secs(120))?;
        let context = producer.context();
        if context.failed.load(Ordering::Relaxed) > 0 {
            return Err(Error::Write {
                topic: plan.target_topic.clone(),
                reason: format!(
                    "{} records were not acknowledged: {}",
                    context.failed.load(Ordering::Relaxed),
                    context
                        .first_error
                        .lock()
                        .expect("delivery error lock")
                        .clone()
                        .unwrap_or_default()
                ),
            });
        }
        copied = context.acked.load(Ordering::Relaxed);
        metrics::counter!(telemetry::REPLAYED, "target" => plan.target_topic.clone())
            .increment(copied);
    }
    let stalled = progress.stalled.lock().expect("stalled lock").clone();
    if !stalled.is_empty() {
        let each: Vec<String> = stalled
            .iter()
            .map(|s| {
                format!(
                    "{}/{} at offset {} of {} ({})",
                    s.topic, s.partition, s.at_offset, s.end_offset, s.reason
                )
            })
            .collect();
        return Err(Error::Stalled(format!(
            "{} partitions stalled and were given up: {}; the other partitions were replayed \
             ({copied} records copied); once the records can be read, run it again with \
             --replay-id {replay_id} to skip what was handled",
            stalled.len(),
            each.join("; ")
        )));
    }
    let partitions = plan
        .partitions
        .iter()
        .zip(&lanes.lanes)
        .map(|(p, lane)| PartitionCount {
            topic: p.topic.clone(),
            partition: p.partition,
            start_offset: p.start_offset,
            end_offset: p.end_offset,
            matched: lane.matched,
        })
        .collect();
    Ok(Summary {
        replay_id: replay_id.to_string(),
        target_topic: plan.target_topic.clone(),
        scanned: progress.scanned.load(Ordering::Relaxed),
        matched: progress.matched.load(Ordering::Relaxed),
        copied,
        partitions,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Hands `record` to the producer, waiting while its queue is full.
fn send(
    producer: &BaseProducer<Deliveries>,
    mut record: BaseRecord<'_, [u8], [u8]>,
    topic: &str,
) -> Result<(), Error> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(50));
            }
            Err((e, _)) => {
                return Err(Error::Write {
                    topic: topic.to_string(),
                    reason: e.to_string(),
                });
            }
        }
    }
}

/// Gives up the open lanes whose reading did not move for `limit`, unless the reader's
/// position shows they reached their end: each is paused and recorded in `progress.stalled`
/// with where it stood and why.
fn give_up_stalled(
    consumer: &BaseConsumer,
    lanes: &mut Lanes,
    limit: Duration,
    errors: &std::collections::BTreeSet<String>,
    progress: &Progress,
) -> Result<(), Error> {
    let now = Instant::now();
    let mut late = Vec::new();
    for (i, lane) in lanes.lanes.iter_mut().enumerate() {
        if !lane.open {
            continue;
        }
        if lane.next != lane.checked.0 {
            lane.checked = (lane.next, now);
        } else if now.duration_since(lane.checked.1) > limit {
            late.push(i);
        }
    }
    if late.is_empty() {
        return Ok(());
    }
    lanes.close_passed(consumer)?;
    let position = consumer.position()?;
    for i in late {
        let lane = &lanes.lanes[i];
        if !lane.open {
            continue;
        }
        let at = position
            .find_partition(&lane.topic, lane.partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .map_or(lane.next, |o| o.max(lane.next));
        let reason = format!(
            "no record read for {:?}{}",
            limit,
            if errors.is_empty() {
                String::new()
            } else {
                format!(
                    "; the reader got: {}",
                    errors.iter().cloned().collect::<Vec<_>>().join("; ")
                )
            }
        );
        tracing::warn!(topic = %lane.topic, partition = lane.partition, at, end = lane.end, %reason, "replay: partition stalled, given up");
        progress
            .stalled
            .lock()
            .expect("stalled lock")
            .push(Stalled {
                topic: lane.topic.clone(),
                partition: lane.partition,
                at_offset: at,
                end_offset: lane.end,
                reason,
            });
        lanes.close(consumer, i)?;
    }
    Ok(())
}

/// One partition of an offset reset.
#[derive(Debug, Clone, Serialize)]
pub struct ResetLine {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The committed offset now, if any.
    pub current: Option<i64>,
    /// The offset it moves to.
    pub new: i64,
}

/// Plans moving `group`'s committed offsets on the request's source topics to the first
/// offset at or after `from` (the end where there is none).
pub fn plan_reset(
    kafka: &KafkaArgs,
    group: &str,
    request: &Request,
) -> Result<Vec<ResetLine>, Error> {
    if request.topics.is_empty() && request.event_types.is_empty() {
        return Err(Error::Invalid(
            "name the topics to reset: --topic or --event-type".into(),
        ));
    }
    if request.from > Utc::now() {
        return Err(Error::Invalid("from is in the future".into()));
    }
    let consumer = reader(kafka, false)?;
    let mut parts = Vec::new();
    for topic in request.source_topics(kafka) {
        for p in partitions_of(&consumer, &topic)? {
            parts.push((topic.clone(), p));
        }
    }
    let ends = ends_of(&consumer, &parts)?;
    let new = offsets_at(kafka, &consumer, &parts, request.from, &ends)?;
    let group_client: BaseConsumer = kafka
        .client_config_with(&[
            ("group.id", group.to_string()),
            ("enable.auto.commit", "false".into()),
        ])
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for (t, p) in &parts {
        tpl.add_partition(t, *p);
    }
    let committed = group_client.committed_offsets(tpl, TIMEOUT)?;
    let mut lines: Vec<ResetLine> = parts
        .into_iter()
        .map(|key| {
            let current = committed
                .find_partition(&key.0, key.1)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            ResetLine {
                new: new.get(&key).copied().or(current).unwrap_or_default(),
                current,
                topic: key.0,
                partition: key.1,
            }
        })
        .collect();
    lines.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(lines)
}

/// Commits the planned offsets for `group`, only when it has no active members. A broker
/// with [`Quirks::no_describe_groups`](crate::broker::Quirks) (tansu 0.6) leaves that
/// unknown: there it acts only with `assume_inactive`, the operator vouching that the group's
/// consumers are stopped. Apache Kafka describes the group: a failure to is an error to retry,
/// whatever `assume_inactive` says.
pub fn execute_reset(
    kafka: &KafkaArgs,
    group: &str,
    lines: &[ResetLine],
    assume_inactive: bool,
) -> Result<(), Error> {
    let may_vouch = kafka.quirks().no_describe_groups;
    match groups::describe(kafka, Some(group), Duration::from_secs(5)) {
        Ok(described) => {
            let found = described.iter().find(|g| g.name == group);
            let members = found.and_then(|g| g.members.as_ref()).map_or(0, Vec::len);
            if members > 0 {
                return Err(Error::GroupActive(format!(
                    "group {group} has {members} active members; stop them first (offsets unchanged)"
                )));
            }
            // A group between two generations lists no members yet is not inactive.
            if let Some(state) = found.and_then(|g| g.state.as_deref())
                && !matches!(state, "Empty" | "Dead" | "")
            {
                return Err(Error::GroupActive(format!(
                    "group {group} is {state}, not empty; stop its consumers first (offsets unchanged)"
                )));
            }
        }
        Err(why) if !may_vouch => {
            return Err(Error::GroupActive(format!(
                "cannot tell whether group {group} has active members: the broker did not \
                 describe it ({why}); try again (offsets unchanged)"
            )));
        }
        Err(why) if !assume_inactive => {
            return Err(Error::GroupActive(format!(
                "cannot tell whether group {group} has active members: the broker did not \
                 describe it ({why}); stop its consumers and pass --assume-inactive to go \
                 ahead (offsets unchanged)"
            )));
        }
        Err(why) => {
            tracing::warn!(%group, %why, "membership unknown; resetting as told (--assume-inactive)");
        }
    }
    let client: BaseConsumer = kafka
        .client_config_with(&[
            ("group.id", group.to_string()),
            ("enable.auto.commit", "false".into()),
        ])
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for l in lines {
        tpl.add_partition_offset(&l.topic, l.partition, Offset::Offset(l.new))?;
    }
    client.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

/// A replay running in the background (`POST /v1/replays`).
#[derive(Debug, Serialize)]
pub struct Job {
    /// Its id (= the replay id).
    pub id: String,
    /// What was asked.
    pub request: Request,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// The ranges.
    pub plan: Plan,
    #[serde(skip)]
    progress: Arc<Progress>,
    #[serde(skip)]
    outcome: Mutex<Option<Result<Summary, String>>>,
}

/// Replay jobs kept in memory.
const MAX_JOBS: usize = 100;

/// The replay jobs of this process. They live in memory: a restart forgets them (a replay
/// that was running is then neither finished nor resumed; run it again with the same replay
/// id and the agent skips what it already handled).
#[derive(Debug, Default)]
pub struct Jobs {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    settings: ReplaySettings,
}

impl Jobs {
    /// No jobs yet; each job runs with `settings`.
    pub fn new(settings: ReplaySettings) -> Jobs {
        Jobs {
            jobs: Mutex::default(),
            settings,
        }
    }

    /// Plans and starts a replay in the background; answers the job once planned.
    pub async fn start(&self, kafka: KafkaArgs, request: Request) -> Result<Arc<Job>, Error> {
        let (k, r) = (kafka.clone(), request.clone());
        let plan = tokio::task::spawn_blocking(move || plan(&k, &r))
            .await
            .expect("planning does not panic")?;
        if let Some(existing) = self
            .jobs
            .lock()
            .expect("jobs lock")
            .get(&plan.replay_id)
            .filter(|j| j.status() == "running")
        {
            return Err(Error::Invalid(format!(
                "replay {} is running already",
                existing.id
            )));
        }
        let job = Arc::new(Job {
            id: plan.replay_id.clone(),
            request,
            started_at: Utc::now(),
            plan,
            progress: Arc::new(Progress::default()),
            outcome: Mutex::new(None),
        });
        {
            let mut jobs = self.jobs.lock().expect("jobs lock");
            // Keep the newest jobs: finished ones beyond the cap are forgotten, oldest first.
            while jobs.len() >= MAX_JOBS {
                let oldest = jobs
                    .values()
                    .filter(|j| j.status() != "running")
                    .min_by_key(|j| j.started_at)
                    .map(|j| j.id.clone());
                match oldest {
                    Some(id) => jobs.remove(&id),
                    None => break,
                };
            }
            jobs.insert(job.id.clone(), job.clone());
        }
        let running = job.clone();
        let settings = self.settings.clone();
        tokio::task::spawn_blocking(move || {
            let result = execute_with(
                &kafka,
                &running.request,
                &running.plan,
                running.progress.clone(),
                false,
                &settings,
            );
            if let Err(e) = &result {
                tracing::warn!(replay = %running.id, error = %e, "replay failed");
            }
            *running.outcome.lock().expect("job outcome lock") =
                Some(result.map_err(|e| e.to_string()));
        });
        Ok(job)
    }

    /// Stops every running job (the process is stopping): each ends as failed, "cancelled",
    /// after the record it is copying.
    pub fn cancel_all(&self) {
        for job in self.jobs.lock().expect("jobs lock").values() {
            job.progress.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// A job by id.
    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.jobs.lock().expect("jobs lock").get(id).cloned()
    }
}

impl Job {
    /// `running`, `succeeded` or `failed`.
    pub fn status(&self) -> &'static str {
        Self::status_of(&self.outcome.lock().expect("job outcome lock"))
    }

    /// The job as the API shows it.
    pub fn view(&self) -> serde_json::Value {
        let outcome = self.outcome.lock().expect("job outcome lock").clone();
        let total = self.plan.records();
        let scanned = self.progress.scanned.load(Ordering::Relaxed);
        let mut view = serde_json::json!({
            "id": self.id,
            "status": Self::status_of(&outcome),
            "started_at": self.started_at,
            "request": self.request,
            "target_topic": self.plan.target_topic,
            "total": total,
            "scanned": scanned,
            "matched": self.progress.matched.load(Ordering::Relaxed),
            "copied": self.progress.copied.load(Ordering::Relaxed),
            "progress": if total == 0 { 1.0 } else { scanned as f64 / total as f64 },
            "partitions": self.plan.partitions,
            "stalled_partitions": *self.progress.stalled.lock().expect("stalled lock"),
            "note": "replay jobs live in this process's memory: a restart forgets them",
        });
        match outcome {
            Some(Ok(summary)) => {
                view["progress"] = 1.0.into();
                view["seconds"] = summary.seconds.into();
            }
            Some(Err(reason)) => view["error"] = reason.into(),
            None => {}
        }
        view
    }

    fn status_of(outcome: &Option<Result<Summary, String>>) -> &'static str {
        match outcome {
            None => "running",
            Some(Ok(_)) => "succeeded",
            Some(Err(_)) => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request {
        Request {
            from: Utc::now() - chrono::Duration::hours(2),
            until: None,
            topics: vec![],
            event_types: vec!["agent.task.*".into()],
            target: Target::Agent("planner".into()),
            replay_id: None,
        }
    }

    #[test]
    fn bad_requests_are_refused_with_a_reason() {
        let mut r = request();
        r.until = Some(r.from - chrono::Duration::minutes(1));
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .contains("must be before")
        );
        let mut r = request();
        r.event_types.clear();
        assert!(r.validate().unwrap_err().to_string().contains("name what"));
        let mut r = request();
        r.from = Utc::now() + chrono::Duration::hours(1);
        assert!(r.validate().unwrap_err().to_string().contains("future"));
        let mut r = request();
        r.event_types = vec!["nodots".into()];
        assert!(r.validate().is_err());
        assert!(request().validate().is_ok());
    }

    #[test]
    fn matches_time_window_and_type_patterns() {
        let mut r = request();
        let from = r.from.timestamp_millis();
        r.until = Some(r.from + chrono::Duration::minutes(10));
        assert!(r.time_matches(Some(from)));
        assert!(r.type_matches(Some("agent.task.requested")));
        assert!(!r.time_matches(Some(from - 1)));
        assert!(!r.time_matches(Some(from + 600_000)));
        assert!(!r.type_matches(Some("agent.created")));
        assert!(!r.type_matches(None));
        assert!(!r.time_matches(None));
        r.event_types.clear();
        assert!(r.type_matches(None), "no type filter: any record");
    }

    #[test]
    fn a_copy_keeps_the_headers_in_order_and_carries_only_this_replays_id() {
        let header = |key, value: Option<&'static str>| Header {
            key,
            value: value.map(str::as_bytes),
        };
        let original = OwnedHeaders::new()
            .insert(header("ce_id", Some("e1")))
            .insert(header(header::REPLAY_ID, Some("an-earlier-replay")))
            .insert(header("ce_type", Some("agent.task.requested")))
            .insert(header("empty", None));
        let copied = copy_headers(Some(original.as_borrowed()), "r2");
        let got: Vec<(&str, Option<&[u8]>)> = copied.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(
            got,
            vec![
                ("ce_id", Some(&b"e1"[..])),
                ("ce_type", Some(&b"agent.task.requested"[..])),
                ("empty", None),
                (header::REPLAY_ID, Some(&b"r2"[..])),
            ]
        );
        assert_eq!(
            event_type_of(Some(original.as_borrowed())),
            Some(&b"agent.task.requested"[..])
        );
        let bare = copy_headers(None, "r3");
        assert_eq!(bare.count(), 1);
        assert_eq!(event_type_of(None), None);
    }

    #[test]
    fn an_answer_whose_record_cannot_be_read_is_kept_on_kafka_and_unverifiable_on_tansu() {
        use crate::broker::Quirks;
        let unread = lag::Oldest::Unread {
            why: "MessageSizeTooLarge".into(),
            later: None,
        };
        assert_eq!(checked(&unread, 1_000, Quirks::NONE), Checked::Kept);
        assert_eq!(checked(&unread, 1_000, Quirks::TANSU), Checked::Unread);
    }

    #[test]
    fn an_answer_older_than_the_time_becomes_the_end_only_on_tansu() {
        use crate::broker::Quirks;
        let target = 1_000;
        for quirks in [Quirks::NONE, Quirks::TANSU] {
            // A record at or after the time: the answer stands on every broker.
            assert_eq!(
                checked(&lag::Oldest::Record(target), target, quirks),
                Checked::Kept
            );
            // Only aborted records and markers up to the end: Kafka's time index points at
            // them too, and a consumer gets nothing there.
            assert_eq!(
                checked(&lag::Oldest::NothingToConsume, target, quirks),
                Checked::End
            );
        }
        // tansu's 0 for "none" points at an older record: the end. On Kafka an answer is
        // exact (an older record past it is a producer's own timestamp): kept.
        let older = lag::Oldest::Record(target - 1);
        assert_eq!(checked(&older, target, Quirks::TANSU), Checked::End);
        assert_eq!(checked(&older, target, Quirks::NONE), Checked::Kept);
    }

    #[test]
    fn an_until_answered_at_the_start_reads_to_the_end_only_on_tansu() {
        use crate::broker::Quirks;
        // `until` answered at the start (5): on Kafka an empty range, on tansu to the end.
        assert_eq!(until_offset(Quirks::NONE, 5, 5, 9), 5);
        assert_eq!(until_offset(Quirks::TANSU, 5, 5, 9), 9);
        // Past the start: the answer bounds the range on both.
        assert_eq!(until_offset(Quirks::NONE, 7, 5, 9), 7);
        assert_eq!(until_offset(Quirks::TANSU, 7, 5, 9), 7);
    }

    #[test]
    fn on_kafka_a_reset_whose_group_is_not_described_is_refused_even_when_vouched_for() {
        let kafka = KafkaArgs {
            brokers: "127.0.0.1:1".into(),
            topic_prefix: String::new(),
            broker_quirks: crate::broker::BrokerQuirks::None,
            ..KafkaArgs::default()
        };
        let lines = [ResetLine {
            topic: "t".into(),
            partition: 0,
            current: None,
            new: 0,
        }];
        let e = execute_reset(&kafka, "g", &lines, true).unwrap_err();
        assert!(
            matches!(&e, Error::GroupActive(why) if why.contains("try again")),
            "{e}"
        );
        // On tansu the refusal asks for the operator's word instead.
        let tansu = KafkaArgs {
            broker_quirks: crate::broker::BrokerQuirks::Tansu,
            ..kafka
        };
        let e = execute_reset(&tansu, "g", &lines, false).unwrap_err();
        assert!(
            matches!(&e, Error::GroupActive(why) if why.contains("--assume-inactive")),
            "{e}"
        );
    }

    #[test]
    fn event_types_read_their_domain_topics() {
        let kafka = KafkaArgs {
            brokers: "x".into(),
            topic_prefix: "t1-".into(),
            ..KafkaArgs::default()
        };
        let mut r = request();
        r.event_types = vec![
            "agent.task.*".into(),
            "agent.created".into(),
            "budget.x".into(),
        ];
        assert_eq!(
            r.source_topics(&kafka),
            vec!["t1-agent.events", "t1-budget.events"]
        );
        assert_eq!(r.target_topic(&kafka), "t1-planner.replay");
    }
}

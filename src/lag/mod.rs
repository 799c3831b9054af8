//! Consumer lag: for every consumer group, committed offsets against the partitions'
//! watermarks, and the exact age of the oldest unconsumed record, exported under
//! kafka-lag-exporter's metric names (CONTRACT.md §5).
//!
//! One collection: list the groups ([`groups`]), read the topics' partitions (one metadata
//! request), every group's committed offsets (batched OffsetFetch requests on one plaintext
//! connection per broker, [`offsets`]; else one OffsetFetch per group through librdkafka, on
//! a bounded set of clients), the low and high watermarks of all partitions (one ListOffsets each way), then for
//! each lagging partition the timestamp of the record at the committed offset: one small
//! fetch, and only when the committed offset moved since the last collection (the answer is
//! cached by position), at most [`LagSettings::fetch_concurrency`] partitions at a time.
//!
//! The lag in records is the log end offset minus the committed offset, as Kafka's own
//! `kafka-consumer-groups` and kafka-lag-exporter count it. The lag in seconds never reads
//! "caught up" for a partition whose oldest unconsumed record cannot be read: each partition
//! says what its seconds are based on ([`LagSecondsBasis`]), and where the record at the
//! committed offset cannot be read within [`LagSettings::read_timeout`] the seconds are a
//! lower bound and `agentbus_lag_seconds_unknown` is 1.

pub mod groups;
mod offsets;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rdkafka::{
    Message, Offset, TopicPartitionList,
    consumer::{BaseConsumer, Consumer},
};
use serde::Serialize;
use tokio::sync::RwLock;
use tokio_util::sync::CancellationToken;

use crate::{config::KafkaArgs, telemetry};

/// Settings of the lag monitor (`serve` and `lag-exporter`).
#[derive(Debug, Clone, clap::Args)]
pub struct LagSettings {
    /// The `cluster_name` label of the lag metrics.
    #[arg(long, env = "AGENTBUS_CLUSTER_NAME", default_value = "default")]
    pub cluster_name: String,

    /// How often the lag is collected in the background; 0 collects only when asked
    /// (`/v1/consumers`), for clusters where kafka-lag-exporter runs already.
    #[arg(long = "lag-interval", env = "AGENTBUS_LAG_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Watch only these consumer groups (comma separated); default: every group of the cluster.
    #[arg(
        long = "lag-groups",
        env = "AGENTBUS_LAG_GROUPS",
        value_delimiter = ',',
        num_args = 0..
    )]
    pub groups: Vec<String>,

    /// Most partitions whose oldest unconsumed record is fetched at once.
    #[arg(
        long = "lag-fetch-concurrency",
        env = "AGENTBUS_LAG_FETCH_CONCURRENCY",
        default_value_t = 64
    )]
    pub fetch_concurrency: usize,

    /// Longest a collection waits for the records at the groups' committed offsets. A record
    /// not read by then (too large for the fetch settings, a batch the client cannot decode)
    /// makes that partition's lag in seconds a lower bound, flagged by
    /// `agentbus_lag_seconds_unknown` = 1; it bounds how long `GET /v1/consumers/{group}/lag`
    /// can take.
    #[arg(long = "lag-read-timeout", env = "AGENTBUS_LAG_READ_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub read_timeout: Duration,

    /// Fetch committed offsets group by group through librdkafka even where batched requests
    /// work (the path TLS and SASL clusters take): for tests of that path and for comparing
    /// the two. Hidden: nothing else needs it.
    #[arg(
        long = "lag-per-group-offsets",
        env = "AGENTBUS_LAG_PER_GROUP_OFFSETS",
        hide = true
    )]
    pub per_group_offsets: bool,
}

impl Default for LagSettings {
    fn default() -> Self {
        LagSettings {
            cluster_name: "default".into(),
            interval: Duration::from_secs(15),
            groups: Vec::new(),
            fetch_concurrency: 64,
            read_timeout: Duration::from_secs(3),
            per_group_offsets: false,
        }
    }
}

/// What a partition's lag in seconds is based on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LagSecondsBasis {
    /// No lag: 0.
    CaughtUp,
    /// The oldest unconsumed record's own timestamp: exact.
    Record,
    /// The records the group has not consumed wait behind an open transaction (the last
    /// stable offset is below the end: read-committed consumers cannot go on until it
    /// ends); the age of the first record past the last stable offset: exact.
    OpenTransaction,
    /// Between the committed offset and the end there are only transaction markers and
    /// aborted records: nothing for the group to consume, 0 although the lag in records is
    /// not.
    NoConsumableRecord,
    /// The record at the committed offset could not be read in time: the seconds are a lower
    /// bound (the age of a later record, or the time since the group was first seen at that
    /// offset), and `agentbus_lag_seconds_unknown` is 1.
    LowerBound,
}

/// Lag of one partition for one group.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The group's committed offset (the next record it will read).
    pub committed_offset: i64,
    /// The partition's low watermark.
    pub earliest_offset: i64,
    /// The partition's high watermark (the offset the next record will get).
    pub end_offset: i64,
    /// Records not yet consumed.
    pub lag: i64,
    /// Age of the oldest unconsumed record, from its own timestamp; 0 when caught up; a
    /// lower bound when `lag_seconds_basis` is `lower_bound`.
    pub lag_seconds: f64,
    /// What `lag_seconds` is based on.
    pub lag_seconds_basis: LagSecondsBasis,
    /// Why, where the basis is not `record` or `caught_up`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds_note: Option<String>,
    /// That record's timestamp (for a lower bound: the later record's).
    pub oldest_unconsumed_at: Option<DateTime<Utc>>,
}

impl PartitionLag {
    /// Whether the lag in seconds could not be read from the record it is about.
    pub fn lag_seconds_unknown(&self) -> bool {
        self.lag_seconds_basis == LagSecondsBasis::LowerBound
    }
}

/// Lag of one group.
#[derive(Debug, Clone, Serialize)]
pub struct GroupLag {
    /// The group id.
    pub group: String,
    /// Its state, when the broker described it.
    pub state: Option<String>,
    /// Its members, when the broker described it.
    pub members: Option<Vec<groups::Member>>,
    /// Sum of the partitions' lag.
    pub sum_lag: i64,
    /// Largest partition lag.
    pub max_lag: i64,
    /// Largest partition lag in seconds.
    pub max_lag_seconds: f64,
    /// Every partition it has committed an offset on.
    pub partitions: Vec<PartitionLag>,
}

/// The watermarks of one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionOffsets {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Low watermark.
    pub earliest_offset: i64,
    /// High watermark.
    pub end_offset: i64,
}

/// One collection.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// The `cluster_name` label.
    pub cluster_name: String,
    /// When it was taken.
    pub collected_at: DateTime<Utc>,
    /// How long it took.
    pub duration_seconds: f64,
    /// Why group members are unknown, when they are.
    pub members_unknown: Option<String>,
    /// The groups, by name.
    pub groups: Vec<GroupLag>,
    /// The watermarks of every partition a group has offsets on.
    pub partitions: Vec<PartitionOffsets>,
}

/// Errors of a collection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kafka failed.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The groups could not be listed.
    #[error("listing consumer groups: {0}")]
    Groups(String),
    /// The committed offsets could not be fetched in time.
    #[error("committed offsets: {0}")]
    Offsets(String),
    /// The process is stopping.
    #[error("stopping")]
    Stopping,
}

/// A position in the log: topic, partition, offset.
pub(crate) type Position = (String, i32, i64);

#[derive(Default)]
struct Cache {
    /// The metadata client (`agentbus-lag`) and, where committed offsets cannot be fetched
    /// in batches, a client for each of at most [`GROUP_CLIENTS`] groups.
    clients: HashMap<String, BaseConsumer>,
    /// Committed offsets of many groups per request, on one connection per broker.
    fetcher: offsets::Fetcher,
    /// The timestamp of the record at (topic, partition, offset), for unmoved positions.
    timestamps: HashMap<Position, i64>,
    /// Per group, the topics it had committed offsets on at the last full look, and the
    /// collections since: between full looks only those topics are asked about.
    group_topics: HashMap<String, (HashSet<String>, u32)>,
    /// When a group was first seen lagging at (topic, partition, committed offset), in ms:
    /// the record there existed then, so its age is at least the time since.
    first_lagging: HashMap<(String, Position), i64>,
    /// A read-committed client for the last stable offsets (the metadata client reads
    /// uncommitted, for the log end offsets).
    stable_client: Option<BaseConsumer>,
}

/// Every this many collections, a group's committed offsets are asked for on every topic.
const FULL_LOOK_EVERY: u32 = 10;

/// The lag monitor: collects on demand and, when run, every interval; keeps the latest
/// snapshot for `/metrics` and the API.
pub struct LagMonitor {
    kafka: KafkaArgs,
    settings: LagSettings,
    /// Groups always shown (the agents of this process), committed offsets or not.
    known: Vec<String>,
    cache: Mutex<Cache>,
    latest: RwLock<Option<Arc<Snapshot>>>,
    describe_failure: Mutex<Option<(Instant, String)>>,
    /// Set when the process stops: a collection under way gives up between two requests.
    stopping: std::sync::atomic::AtomicBool,
}

const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a failed DescribeGroups is not tried again, with
/// [`Quirks::no_describe_groups`](crate::broker::Quirks) (tansu drops the connection each
/// time); on Apache Kafka every collection asks.
const DESCRIBE_RETRY: Duration = Duration::from_secs(600);

/// Most wanted groups described one by one rather than with every group of the cluster.
const DESCRIBE_ONE_BY_ONE: usize = 8;

/// Groups whose committed offsets are fetched at once (each a thread waiting on its
/// group's client), where they are fetched group by group.
const GROUP_CONCURRENCY: usize = 64;

/// Per-group clients kept between collections, where committed offsets are fetched group by
/// group: each holds about four threads and its own copy of the cluster's metadata (0.5 MiB
/// on a cluster of a few topics, 3 to 4 MiB on one of thousands), so an unbounded set grew
/// with the groups of the cluster. The groups past these get a client for one collection.
const GROUP_CLIENTS: usize = 64;

/// Partitions of one read round, each with the positions (offsets) to read there.
type Round = Vec<((String, i32), Vec<i64>)>;

impl LagMonitor {
    /// A monitor of the cluster `kafka` reaches; `known` groups are always reported.
    pub fn new(kafka: KafkaArgs, settings: LagSettings, known: Vec<String>) -> Arc<LagMonitor> {
        Arc::new(LagMonitor {
            kafka,
            settings,
            known,
            cache: Mutex::default(),
            latest: RwLock::new(None),
            describe_failure: Mutex::new(None),
            stopping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The latest snapshot, if one was taken.
    pub async fn latest(&self) -> Option<Arc<Snapshot>> {
        self.latest.read().await.clone()
    }

    /// The latest snapshot of the background collection, or a new one when it does not run
    /// (interval 0) or has not collected yet.
    pub async fn current(self: &Arc<Self>) -> Result<Arc<Snapshot>, Error> {
        if !self.settings.interval.is_zero()
            && let Some(s) = self.latest().await
        {
            return Ok(s);
        }
        self.collect_and_keep().await
    }

    /// Whether it collects in the background.
    pub fn runs_in_background(&self) -> bool {
        !self.settings.interval.is_zero()
    }

    /// Collects the configured groups (or all) and keeps the result as the latest snapshot.
    pub async fn collect_and_keep(self: &Arc<Self>) -> Result<Arc<Snapshot>, Error> {
        let snapshot = Arc::new(self.collect(None).await?);
        metrics::gauge!(telemetry::LAG_COLLECTION_SECONDS).set(snapshot.duration_seconds);
        *self.latest.write().await = Some(snapshot.clone());
        Ok(snapshot)
    }

    /// Collects now: `only` these groups, or the configured ones, or every group.
    pub async fn collect(self: &Arc<Self>, only: Option<Vec<String>>) -> Result<Snapshot, Error> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.collect_blocking(only))
            .await
            .expect("a lag collection does not panic")
    }

    /// Collects every interval until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let collected = tokio::select! {
                collected = self.collect_and_keep() => collected,
                _ = cancel.cancelled() => {
                    self.stopping.store(true, std::sync::atomic::Ordering::Relaxed);
                    return;
                }
            };
            match collected {
                Ok(s) => tracing::debug!(
                    groups = s.groups.len(),
                    seconds = s.duration_seconds,
                    "lag collected"
                ),
                Err(e) => {
                    metrics::counter!(telemetry::LAG_COLLECTION_ERRORS).increment(1);
                    tracing::warn!(error = %e, "lag collection failed");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.settings.interval) => {}
            }
        }
    }

    fn collect_blocking(&self, only: Option<Vec<String>>) -> Result<Snapshot, Error> {
        let started = Instant::now();
        let collected_at = Utc::now();
        let mut cache = self.cache.lock().expect("lag cache lock");
        // Which groups. Members are unknown when the broker did not describe them: always on
        // tansu, on Kafka when a describe failed (it is asked again next time).
        let mut members_unknown = None;
        let mut described: BTreeMap<String, groups::Group> = BTreeMap::new();
        let wanted: Option<Vec<String>> = only
            .or_else(|| (!self.settings.groups.is_empty()).then(|| self.settings.groups.clone()));
        match &wanted {
            Some(names) => {
                for name in names {
                    described.insert(name.clone(), bare(name));
                }
                match self.describe_all(&mut cache, Some(names), Duration::from_secs(5)) {
                    Ok(all) => {
                        for g in all {
                            if let Some(slot) = described.get_mut(&g.name) {
                                *slot = g;
                            }
                        }
                    }
                    Err(why) => {
                        members_unknown =
                            Some(format!("the broker did not describe groups ({why})"))
                    }
                }
            }
            None => {
                let described_all = self.describe_all(&mut cache, None, TIMEOUT);
                let (all, why) =
                    groups::list(&self.kafka, TIMEOUT, described_all).map_err(Error::Groups)?;
                members_unknown = why;
                for g in all {
                    described.insert(g.name.clone(), g);
                }
                for name in &self.known {
                    described.entry(name.clone()).or_insert_with(|| bare(name));
                }
            }
        }
        // Which partitions.
        let metadata_client = self.client(&mut cache, "agentbus-lag")?;
        let metadata = metadata_client.fetch_metadata(None, TIMEOUT)?;
        let mut all = TopicPartitionList::new();
        for t in metadata.topics() {
            if t.error().is_some() || t.name().starts_with("__") {
                continue;
            }
            for p in t.partitions() {
                all.add_partition(t.name(), p.id());
            }
        }
        let names: Vec<&String> = described.keys().collect();
        let mut committed: BTreeMap<String, Vec<Position>> =
            match self.batched_offsets(&mut cache, &metadata, &all, &names, started + TIMEOUT)? {
                Some(committed) => committed,
                None => self.offsets_per_group(&mut cache, &all, &names)?,
            };
        cache.group_topics.retain(|k, _| described.contains_key(k));
        let used: HashSet<(String, i32)> = committed
            .values()
            .flatten()
            .map(|(t, p, _)| (t.clone(), *p))
            .collect();
        // Watermarks of the partitions in use: one ListOffsets for the ends, one for the starts.
        let mut ends = TopicPartitionList::new();
        let mut starts = TopicPartitionList::new();
        for (topic, partition) in &used {
            ends.add_partition_offset(topic, *partition, Offset::End)?;
            starts.add_partition_offset(topic, *partition, Offset::Beginning)?;
        }
        let metadata_client = self.client(&mut cache, "agentbus-lag")?;
        let marks = |tpl: TopicPartitionList| -> Result<HashMap<(String, i32), i64>, Error> {
            if tpl.count() == 0 {
                return Ok(HashMap::new());
            }
            let answered = metadata_client.offsets_for_times(tpl, TIMEOUT)?;
            Ok(answered
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect())
        };
        let high = marks(ends)?;
        let low = marks(starts)?;
        // The last stable offsets, read committed: below the end where a transaction is open.
        if cache.stable_client.is_none() {
            cache.stable_client = Some(
                self.kafka
                    .client_config_with(&[
                        ("group.id", "agentbus-lag".into()),
                        ("isolation.level", "read_committed".into()),
                    ])
                    .create()?,
            );
        }
        let mut stables = TopicPartitionList::new();
        for (topic, partition) in &used {
            stables.add_partition_offset(topic, *partition, Offset::End)?;
        }
        let stable = if stables.count() == 0 {
            HashMap::new()
        } else {
            let client = cache.stable_client.as_ref().expect("created above");
            client
                .offsets_for_times(stables, TIMEOUT)?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                    _ => None,
                })
                .collect::<HashMap<_, _>>()
        };
        // The oldest unconsumed record of each lagging partition.
        let mut positions: HashMap<Position, Bounds> = HashMap::new();
        for offsets in committed.values() {
            for (topic, partition, offset) in offsets {
                let key = (topic.clone(), *partition);
                let (lo, hi) = (
                    low.get(&key).copied().unwrap_or(0),
                    high.get(&key).copied().unwrap_or(0),
                );
                let position = (*offset).max(lo);
                if position < hi {
                    let stable = stable.get(&key).copied().unwrap_or(hi).min(hi);
                    positions.insert(
                        (topic.clone(), *partition, position),
                        Bounds { stable, end: hi },
                    );
                }
            }
        }
        cache.timestamps.retain(|k, _| positions.contains_key(k));
        let missing: Vec<(Position, Bounds)> = positions
            .iter()
            .filter(|(p, _)| !cache.timestamps.contains_key(*p))
            .map(|(p, b)| (p.clone(), *b))
            .collect();
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Stopping);
        }
        let read_timeout = self.settings.read_timeout;
        let mut found = oldest_unconsumed(
            &self.kafka,
            &missing,
            self.settings.fetch_concurrency,
            read_timeout,
        )?;
        for (position, oldest) in &found {
            if let Oldest::Record(ts) = oldest {
                cache.timestamps.insert(position.clone(), *ts);
            }
        }
        for (position, ts) in &cache.timestamps {
            found.entry(position.clone()).or_insert(Oldest::Record(*ts));
        }
        let now_ms = collected_at.timestamp_millis();
        let mut lagging_now = HashSet::new();
        let mut out_groups = Vec::new();
        for (name, group) in described {
            let offsets = committed.remove(&name).unwrap_or_default();
            let from_here = self.known.contains(&name) || wanted.is_some();
            if offsets.is_empty() && !from_here {
                continue;
            }
            let mut partitions: Vec<PartitionLag> = Vec::new();
            for (topic, partition, offset) in offsets {
                let key = (topic.clone(), partition);
                let lo = low.get(&key).copied().unwrap_or(0);
                let hi = high.get(&key).copied().unwrap_or(offset.max(lo));
                let position = offset.max(lo);
                let lag = (hi - position).max(0);
                let seen_key = (name.clone(), (topic.clone(), partition, offset));
                let first_seen = if lag > 0 {
                    lagging_now.insert(seen_key.clone());
                    Some(*cache.first_lagging.entry(seen_key).or_insert(now_ms))
                } else {
                    None
                };
                let at = (topic.clone(), partition, position);
                let seconds = lag_seconds(
                    lag,
                    found.get(&at),
                    position,
                    positions.get(&at).copied(),
                    first_seen,
                    now_ms,
                    read_timeout,
                );
                partitions.push(PartitionLag {
                    lag,
                    lag_seconds: seconds.seconds,
                    lag_seconds_basis: seconds.basis,
                    lag_seconds_note: seconds.note,
                    oldest_unconsumed_at: seconds.at.and_then(DateTime::from_timestamp_millis),
                    topic,
                    partition,
                    committed_offset: offset,
                    earliest_offset: lo,
                    end_offset: hi,
                });
            }
            partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
            out_groups.push(GroupLag {
                sum_lag: partitions.iter().map(|p| p.lag).sum(),
                max_lag: partitions.iter().map(|p| p.lag).max().unwrap_or(0),
                max_lag_seconds: partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max),
                group: name,
                state: group.state,
                members: group.members,
                partitions,
            });
        }
        let mut partitions: Vec<PartitionOffsets> = used
            .into_iter()
            .map(|(topic, partition)| PartitionOffsets {
                earliest_offset: low.get(&(topic.clone(), partition)).copied().unwrap_or(0),
                end_offset: high.get(&(topic.clone(), partition)).copied().unwrap_or(0),
                topic,
                partition,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        cache.first_lagging.retain(|k, _| lagging_now.contains(k));
        Ok(Snapshot {
            cluster_name: self.settings.cluster_name.clone(),
            collected_at,
            duration_seconds: started.elapsed().as_secs_f64(),
            members_unknown,
            groups: out_groups,
            partitions,
        })
    }

    /// Every group, or the few `names`, described by the broker: on Apache Kafka through the
    /// metadata client, every time. Up to [`DESCRIBE_ONE_BY_ONE`] names are described each
    /// on its own: `GET /v1/consumers/{group}/lag` or a short `--lag-groups` must not describe
    /// every group of a cluster of hundreds. With [`Quirks::no_describe_groups`](crate::broker::Quirks), on a client of
    /// its own (the broker drops the connection) and not asked again within
    /// [`DESCRIBE_RETRY`] of a failure, the failure's reason instead.
    fn describe_all(
        &self,
        cache: &mut Cache,
        names: Option<&[String]>,
        timeout: Duration,
    ) -> Result<Vec<groups::Group>, String> {
        let few = names.filter(|n| n.len() <= DESCRIBE_ONE_BY_ONE);
        if !self.kafka.quirks().no_describe_groups {
            let client = self
                .client(cache, "agentbus-lag")
                .map_err(|e| e.to_string())?;
            let Some(few) = few else {
                return groups::describe_with(client, None, timeout);
            };
            let deadline = Instant::now() + timeout;
            let mut out = Vec::with_capacity(few.len());
            for name in few {
                let left = deadline.saturating_duration_since(Instant::now());
                out.extend(groups::describe_with(client, Some(name), left)?);
            }
            return Ok(out);
        }
        let mut failure = self.describe_failure.lock().expect("describe failure lock");
        if let Some((at, why)) = failure.as_ref()
            && at.elapsed() < DESCRIBE_RETRY
        {
            return Err(format!("{why}; not asked again for {DESCRIBE_RETRY:?}"));
        }
        groups::describe(&self.kafka, None, timeout)
            .inspect_err(|why| *failure = Some((Instant::now(), why.clone())))
    }

    /// Committed offsets of `names` in batches ([`offsets`]: a few requests, one connection
    /// per broker, no thread), kept to the partitions of `all` (the topics of the metadata,
    /// what the per-group clients are asked about). `None` where that cannot be done: TLS or
    /// SASL, a broker without the batched versions, or a failure other than the deadline
    /// (librdkafka, group by group, then gives its own answer or error).
    fn batched_offsets(
        &self,
        cache: &mut Cache,
        metadata: &rdkafka::metadata::Metadata,
        all: &TopicPartitionList,
        names: &[&String],
        deadline: Instant,
    ) -> Result<Option<BTreeMap<String, Vec<Position>>>, Error> {
        if self.settings.per_group_offsets
            || !groups::plaintext(&self.kafka)
            || cache.fetcher.unsupported()
        {
            return Ok(None);
        }
        let brokers: Vec<String> = metadata
            .brokers()
            .iter()
            .map(|b| format!("{}:{}", b.host(), b.port()))
            .collect();
        let wanted: Vec<String> = names.iter().map(|n| (*n).clone()).collect();
        match cache.fetcher.committed(&brokers, &wanted, deadline) {
            Ok(mut found) => {
                let mut known: HashMap<String, HashSet<i32>> = HashMap::new();
                for e in all.elements() {
                    known
                        .entry(e.topic().to_string())
                        .or_default()
                        .insert(e.partition());
                }
                let mut out = BTreeMap::new();
                for name in names {
                    let mut mine = found.remove(name.as_str()).unwrap_or_default();
                    mine.retain(|(t, p, _)| known.get(t).is_some_and(|ps| ps.contains(p)));
                    out.insert((*name).clone(), mine);
                }
                Ok(Some(out))
            }
            Err(e @ offsets::FetchError::Timeout) => Err(Error::Offsets(e.to_string())),
            Err(e @ offsets::FetchError::Unsupported(_)) => {
                tracing::info!(reason = %e, "committed offsets are fetched group by group");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "batched committed offsets failed; asking group by group");
                Ok(None)
            }
        }
    }

    /// Committed offsets of `names` through librdkafka: one OffsetFetch per group, on a
    /// consumer whose `group.id` is the group (librdkafka has no other way), up to
    /// [`GROUP_CONCURRENCY`] at a time. Clients of at most [`GROUP_CLIENTS`] groups are kept
    /// between collections; each other group gets one in the worker that asks for it, dropped
    /// there after the answer.
    fn offsets_per_group(
        &self,
        cache: &mut Cache,
        all: &TopicPartitionList,
        names: &[&String],
    ) -> Result<BTreeMap<String, Vec<Position>>, Error> {
        // Kept clients of groups no longer watched go first, making room.
        let watched: HashSet<&str> = names.iter().map(|n| n.as_str()).collect();
        let gone: Vec<String> = cache
            .clients
            .keys()
            .filter(|k| *k != "agentbus-lag" && !watched.contains(k.as_str()))
            .cloned()
            .collect();
        tear_down(
            gone.iter()
                .filter_map(|k| cache.clients.remove(k))
                .collect(),
        );
        // New groups get a kept client while there is room; the others one of their own in
        // the worker that asks for them, dropped there after the answer: at most
        // GROUP_CLIENTS kept and GROUP_CONCURRENCY more at any moment.
        for name in names {
            let kept =
                cache.clients.len() - usize::from(cache.clients.contains_key("agentbus-lag"));
            if kept >= GROUP_CLIENTS {
                break;
            }
            self.client(cache, name)?;
        }
        // What to ask each group about: every partition at a full look, else the partitions
        // of the topics it had offsets on (one OffsetFetch for all partitions of all topics,
        // per group, is what costs on a cluster with many topics).
        let mut asks: HashMap<String, (TopicPartitionList, bool)> = HashMap::new();
        for name in names {
            let known = cache.group_topics.get(name.as_str());
            let full =
                known.is_none_or(|(topics, since)| topics.is_empty() || *since >= FULL_LOOK_EVERY);
            let tpl = if full {
                all.clone()
            } else {
                let topics = &known.expect("not a full look").0;
                let mut tpl = TopicPartitionList::new();
                for e in all.elements() {
                    if topics.contains(e.topic()) {
                        tpl.add_partition(e.topic(), e.partition());
                    }
                }
                tpl
            };
            asks.insert((*name).clone(), (tpl, full));
        }
        // A pool of GROUP_CONCURRENCY workers takes the groups one after another: a fresh
        // client's first answer waits for its coordinator (a lookup and a connection), so the
        // time goes in waiting, and no group waits for the slowest of a batch.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let answers: Vec<Mutex<Option<rdkafka::error::KafkaResult<TopicPartitionList>>>> =
            names.iter().map(|_| Mutex::new(None)).collect();
        let clients = &cache.clients;
        std::thread::scope(|scope| {
            for _ in 0..GROUP_CONCURRENCY.min(names.len()) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= names.len()
                            || self.stopping.load(std::sync::atomic::Ordering::Relaxed)
                        {
                            return;
                        }
                        let name = names[i].as_str();
                        let tpl = &asks[name].0;
                        let answer = if tpl.count() == 0 {
                            Ok(TopicPartitionList::new())
                        } else if let Some(client) = clients.get(name) {
                            client.committed_offsets(tpl.clone(), TIMEOUT)
                        } else {
                            self.new_client(name)
                                .and_then(|client| client.committed_offsets(tpl.clone(), TIMEOUT))
                        };
                        *answers[i].lock().expect("offset answer lock") = Some(answer);
                    }
                });
            }
        });
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Stopping);
        }
        let mut committed = BTreeMap::new();
        for (name, answer) in names.iter().zip(answers) {
            let offsets = answer
                .into_inner()
                .expect("offset answer lock")
                .expect("every group asked")?;
            let mut mine = Vec::new();
            for e in offsets.elements() {
                if let Offset::Offset(o) = e.offset() {
                    mine.push((e.topic().to_string(), e.partition(), o));
                }
            }
            let full = asks[name.as_str()].1;
            let entry = cache
                .group_topics
                .entry((*name).clone())
                .or_insert_with(|| (HashSet::new(), 0));
            if full {
                *entry = (mine.iter().map(|(t, _, _)| t.clone()).collect(), 1);
            } else {
                entry.1 += 1;
            }
            committed.insert((*name).clone(), mine);
        }
        Ok(committed)
    }

    fn client<'c>(&self, cache: &'c mut Cache, group: &str) -> Result<&'c BaseConsumer, Error> {
        if !cache.clients.contains_key(group) {
            let client = self.new_client(group)?;
            cache.clients.insert(group.to_string(), client);
        }
        Ok(&cache.clients[group])
    }

    /// A client with `group` for its `group.id` (committed offsets are asked as the group).
    fn new_client(&self, group: &str) -> rdkafka::error::KafkaResult<BaseConsumer> {
        // The metadata client reads uncommitted: its ListOffsets answer the log end offsets,
        // the end Kafka's own tools count the lag to (read committed answers the last stable
        // offset, which an open transaction holds back).
        let isolation = if group == "agentbus-lag" {
            "read_uncommitted"
        } else {
            "read_committed"
        };
        self.kafka
            .client_config_with(&[
                ("group.id", group.to_string()),
                ("enable.auto.commit", "false".into()),
                ("enable.partition.eof", "false".into()),
                ("isolation.level", isolation.into()),
            ])
            .create()
    }
}

impl Drop for LagMonitor {
    fn drop(&mut self) {
        let cache = std::mem::take(
            self.cache
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut clients: Vec<BaseConsumer> = cache.clients.into_values().collect();
        clients.extend(cache.stable_client);
        tear_down(clients);
    }
}

/// Drops librdkafka clients on a thread of its own, 16 at a time. A consumer with a group id
/// closes its group handle first, polling in steps of up to 100 ms: a few hundred group
/// clients dropped one after another take many seconds (`agentbus lag` was slow to exit).
/// Nothing waits for it: they commit nothing, and a process that exits meanwhile just ends.
pub(crate) fn tear_down<T: Send + 'static>(clients: Vec<T>) {
    if clients.is_empty() {
        return;
    }
    std::thread::spawn(move || {
        let mut clients = clients;
        while !clients.is_empty() {
            let batch: Vec<T> = clients.drain(..clients.len().min(16)).collect();
            std::thread::scope(|scope| {
                for client in batch {
                    scope.spawn(move || drop(client));
                }
            });
        }
    });
}

/// The offsets that bound reading one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    /// The last stable offset: read-committed consumers read nothing at or past it.
    pub stable: i64,
    /// The log end offset.
    pub end: i64,
}

/// What the reader found at or after a position.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Oldest {
    /// The timestamp of the first record a read-committed consumer gets there.
    Record(i64),
    /// Nothing readable before the last stable offset, which is below the end: the
    /// timestamp of the first record past it, when one could be read.
    OpenTransaction(Option<(i64, i64)>),
    /// Only transaction markers and aborted records up to the end.
    NothingToConsume,
    /// Nothing read in time: why, and a later record (offset, timestamp) when one was read.
    Unread {
        why: String,
        later: Option<(i64, i64)>,
    },
}

/// A partition's lag in seconds, what it rests on, and the timestamp it was taken from.
struct Seconds {
    seconds: f64,
    basis: LagSecondsBasis,
    note: Option<String>,
    at: Option<i64>,
}

/// The lag in seconds of a partition `lag` records behind at `position`, from what the
/// reader `found` there; never "caught up" while there is something the group has to
/// consume and the record could not be read.
fn lag_seconds(
    lag: i64,
    found: Option<&Oldest>,
    position: i64,
    bounds: Option<Bounds>,
    first_seen: Option<i64>,
    now_ms: i64,
    read_timeout: Duration,
) -> Seconds {
    let age = |ts: i64| (now_ms - ts).max(0) as f64 / 1000.0;
    let exact = |basis, ts: i64, note| Seconds {
        seconds: age(ts),
        basis,
        note,
        at: Some(ts),
    };
    let since_seen = first_seen.map_or(0.0, age);
    let bound = |why: String, later: Option<(i64, i64)>| {
        let from_later = later.map_or(0.0, |(_, ts)| age(ts));
        let basis = match later {
            Some((offset, _)) if from_later >= since_seen => {
                format!("the age of the later record at offset {offset}")
            }
            _ => "the time since the group was first seen at this offset".to_string(),
        };
        Seconds {
            seconds: from_later.max(since_seen),
            basis: LagSecondsBasis::LowerBound,
            note: Some(format!(
                "{why}; lag_seconds is a lower bound: {basis} (the record may be too large \
                 for the fetch settings or not decodable by this client)"
            )),
            at: later.map(|(_, ts)| ts).filter(|_| from_later >= since_seen),
        }
    };
    if lag <= 0 {
        return Seconds {
            seconds: 0.0,
            basis: LagSecondsBasis::CaughtUp,
            note: None,
            at: None,
        };
    }
    let stable = bounds.map_or(position, |b| b.stable);
    let end = bounds.map_or(position + lag, |b| b.end);
    match found {
        Some(Oldest::Record(ts)) => exact(LagSecondsBasis::Record, *ts, None),
        Some(Oldest::OpenTransaction(Some((offset, ts)))) => exact(
            LagSecondsBasis::OpenTransaction,
            *ts,
            Some(format!(
                "an open transaction holds the last stable offset at {stable} (end {end}): \
                 read-committed consumers get nothing past it until it commits or aborts; \
                 the oldest waiting record is at offset {offset}"
            )),
        ),
        Some(Oldest::OpenTransaction(None)) => bound(
            format!(
                "an open transaction holds the last stable offset at {stable} (end {end}) and \
                 no record past it was read within {read_timeout:?}"
            ),
            None,
        ),
        Some(Oldest::NothingToConsume) => Seconds {
            seconds: 0.0,
            basis: LagSecondsBasis::NoConsumableRecord,
            note: Some(format!(
                "offsets {position}..{end} hold only transaction markers or aborted records: \
                 nothing for the group to consume"
            )),
            at: None,
        },
        Some(Oldest::Unread { why, later }) => bound(
            format!("the record at offset {position} was not read within {read_timeout:?} ({why})"),
            *later,
        ),
        None => bound(
            format!("the record at offset {position} was not read"),
            None,
        ),
    }
}

/// How long a reader waits for a fetch answer: short, so that "nothing there" (an end of
/// partition) is known quickly.
const READER_FETCH_WAIT: &str = "100";

/// The partitions of `wanted` in rounds: per partition its positions, sorted, split into runs
/// no longer than [`MAX_RUN`]; each round at most `at_once` partitions.
fn rounds_of<'a>(wanted: impl Iterator<Item = &'a Position>, at_once: usize) -> Vec<Round> {
    let mut by_partition: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    for (topic, partition, offset) in wanted {
        by_partition
            .entry((topic.clone(), *partition))
            .or_default()
            .push(*offset);
    }
    let mut rounds: Vec<Round> = Vec::new();
    for (key, mut offsets) in by_partition {
        offsets.sort_unstable();
        offsets.dedup();
        let mut runs: Vec<Vec<i64>> = Vec::new();
        for o in offsets {
            match runs.last_mut() {
                Some(run) if o - run[0] <= MAX_RUN => run.push(o),
                _ => runs.push(vec![o]),
            }
        }
        for (i, run) in runs.into_iter().enumerate() {
            if rounds.len() <= i {
                rounds.push(Vec::new());
            }
            rounds[i].push((key.clone(), run));
        }
    }
    rounds
        .into_iter()
        .flat_map(|round| {
            round
                .chunks(at_once.max(1))
                .map(<[_]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The lag readers' client context: an end of partition is an answer the reader asked for
/// (`enable.partition.eof`), also when librdkafka reports it as a client-wide error after
/// the partition was paused; anything else is logged as the default context would.
pub(crate) struct ReaderContext;

impl rdkafka::ClientContext for ReaderContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
            || matches!(error, rdkafka::error::KafkaError::PartitionEOF(_))
        {
            tracing::trace!(%reason, "lag reader: end of partition");
        } else {
            tracing::warn!(%error, %reason, "lag reader: librdkafka error");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReaderContext {}

fn lag_reader(
    kafka: &KafkaArgs,
    isolation: &str,
) -> Result<BaseConsumer<ReaderContext>, rdkafka::error::KafkaError> {
    kafka
        .client_config_with(&[
            ("group.id", "agentbus-lag-reader".into()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            // The end of a partition is an answer too: nothing left to consume there.
            ("enable.partition.eof", "true".into()),
            ("fetch.wait.max.ms", READER_FETCH_WAIT.into()),
            ("isolation.level", isolation.into()),
        ])
        .create_with_context(ReaderContext)
}

/// The oldest record a group's consumers would get at or after each position, all within
/// `timeout`. Two readers: a read-committed one, as the agents read, assigned at each
/// partition's lowest position and read until it passed the highest (or reached the last
/// stable offset: then there is nothing more for it); then, for what it could not answer, a
/// read-uncommitted one that reads the first record past an open transaction's last stable
/// offset, or the partition's last record as a lower bound for a record that could not be
/// read. At most `at_once` partitions are assigned at a time.
pub(crate) fn oldest_unconsumed(
    kafka: &KafkaArgs,
    positions: &[(Position, Bounds)],
    at_once: usize,
    timeout: Duration,
) -> Result<HashMap<Position, Oldest>, rdkafka::error::KafkaError> {
    let mut out: HashMap<Position, Oldest> = HashMap::new();
    if positions.is_empty() {
        return Ok(out);
    }
    let started = Instant::now();
    let bounds: HashMap<(String, i32), Bounds> = positions
        .iter()
        .map(|((t, p, _), b)| ((t.clone(), *p), *b))
        .collect();
    // At or past the last stable offset a read-committed reader has nothing to give.
    for ((t, p, o), b) in positions {
        if *o >= b.stable {
            out.insert((t.clone(), *p, *o), Oldest::OpenTransaction(None));
        }
    }
    let committed_deadline = started + timeout.mul_f64(2.0 / 3.0);
    let mut errors: std::collections::BTreeSet<String> = Default::default();
    let to_read: Vec<&Position> = positions
        .iter()
        .map(|(p, _)| p)
        .filter(|p| !out.contains_key(*p))
        .collect();
    if !to_read.is_empty() {
        let reader = lag_reader(kafka, "read_committed")?;
        let rounds = rounds_of(to_read.into_iter(), at_once);
        let count = rounds.len() as u32;
        for (i, round) in rounds.into_iter().enumerate() {
            // Each round its share of the time left: a record that cannot be read holds up
            // its own round only, not every partition after it.
            let left = committed_deadline.saturating_duration_since(Instant::now());
            let round_deadline = Instant::now() + left / (count - i as u32).max(1);
            let mut assignment = TopicPartitionList::new();
            let mut open: HashMap<(String, i32), std::collections::VecDeque<i64>> = HashMap::new();
            for ((topic, partition), run) in round {
                assignment.add_partition_offset(&topic, partition, Offset::Offset(run[0]))?;
                open.insert((topic, partition), run.into());
            }
            reader.assign(&assignment)?;
            while !open.is_empty() && Instant::now() < round_deadline {
                let m = match reader.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => m,
                    Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {
                        // Which partitions reached their last stable offset: nothing more
                        // there for a read-committed consumer.
                        for e in reader.position()?.elements() {
                            let key = (e.topic().to_string(), e.partition());
                            let (Some(b), Offset::Offset(at)) = (bounds.get(&key), e.offset())
                            else {
                                continue;
                            };
                            if at < b.stable {
                                continue;
                            }
                            if let Some(pending) = open.remove(&key) {
                                for o in pending {
                                    let found = if b.stable >= b.end {
                                        Oldest::NothingToConsume
                                    } else {
                                        Oldest::OpenTransaction(None)
                                    };
                                    out.insert((key.0.clone(), key.1, o), found);
                                }
                                pause(&reader, &key)?;
                            }
                        }
                        continue;
                    }
                    Some(Err(e)) => {
                        if errors.len() < 4 {
                            errors.insert(e.to_string());
                        }
                        continue;
                    }
                };
                let key = (m.topic().to_string(), m.partition());
                let Some(pending) = open.get_mut(&key) else {
                    continue;
                };
                let ts = m.timestamp().to_millis();
                while let Some(&position) = pending.front()
                    && position <= m.offset()
                {
                    pending.pop_front();
                    let found = match ts {
                        Some(ts) => Oldest::Record(ts),
                        None => Oldest::Unread {
                            why: format!("the record at offset {} has no timestamp", m.offset()),
                            later: None,
                        },
                    };
                    out.insert((key.0.clone(), key.1, position), found);
                }
                if pending.is_empty() {
                    pause(&reader, &key)?;
                    open.remove(&key);
                }
            }
            let why = if errors.is_empty() {
                "no answer from the broker".to_string()
            } else {
                format!(
                    "the reader got: {}",
                    errors.iter().cloned().collect::<Vec<_>>().join("; ")
                )
            };
            for ((topic, partition), pending) in open {
                for o in pending {
                    out.insert(
                        (topic.clone(), partition, o),
                        Oldest::Unread {
                            why: why.clone(),
                            later: None,
                        },
                    );
                }
            }
        }
        tear_down(vec![reader]);
    }
    // Second look, read uncommitted: where an open transaction holds the reading back, the
    // first record past the last stable offset; where a record could not be read, the
    // partition's last one, a lower bound for its age.
    let mut starts: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for ((t, p, o), found) in &out {
        let key = (t.clone(), *p);
        let Some(b) = bounds.get(&key) else { continue };
        let start = match found {
            Oldest::OpenTransaction(None) => b.stable.max(*o),
            Oldest::Unread { later: None, .. } if b.end - 1 > *o => b.end - 1,
            _ => continue,
        };
        let slot = starts.entry(key).or_insert(start);
        *slot = (*slot).min(start);
    }
    if starts.is_empty() {
        return Ok(out);
    }
    let deadline = started + timeout;
    let reader = lag_reader(kafka, "read_uncommitted")?;
    let mut later: HashMap<(String, i32), (i64, i64)> = HashMap::new();
    let keys: Vec<((String, i32), i64)> = starts.into_iter().collect();
    let chunks: Vec<_> = keys.chunks(at_once.max(1)).collect();
    let count = chunks.len() as u32;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk_deadline = Instant::now() + left / (count - i as u32).max(1);
        let mut assignment = TopicPartitionList::new();
        let mut open: HashSet<(String, i32)> = HashSet::new();
        for ((topic, partition), start) in chunk {
            assignment.add_partition_offset(topic, *partition, Offset::Offset(*start))?;
            open.insert((topic.clone(), *partition));
        }
        reader.assign(&assignment)?;
        while !open.is_empty() && Instant::now() < chunk_deadline {
            let m = match reader.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => m,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {
                    // At the end without a record (the last offsets are markers): no later
                    // record to take a bound from.
                    for e in reader.position()?.elements() {
                        let key = (e.topic().to_string(), e.partition());
                        if let (Some(b), Offset::Offset(at)) = (bounds.get(&key), e.offset())
                            && at >= b.end
                        {
                            open.remove(&key);
                        }
                    }
                    continue;
                }
                Some(Err(_)) => continue,
            };
            let key = (m.topic().to_string(), m.partition());
            if open.remove(&key) {
                if let Some(ts) = m.timestamp().to_millis() {
                    later.insert(key.clone(), (m.offset(), ts));
                }
                pause(&reader, &key)?;
            }
        }
    }
    tear_down(vec![reader]);
    for ((t, p, o), found) in out.iter_mut() {
        let Some(&(offset, ts)) = later.get(&(t.clone(), *p)) else {
            continue;
        };
        match found {
            Oldest::OpenTransaction(slot @ None) if offset >= *o => *slot = Some((offset, ts)),
            Oldest::Unread {
                later: slot @ None, ..
            } if offset > *o => *slot = Some((offset, ts)),
            _ => {}
        }
    }
    Ok(out)
}

/// Stops `reader` fetching the one partition `key`, done with.
fn pause(
    reader: &BaseConsumer<ReaderContext>,
    key: &(String, i32),
) -> Result<(), rdkafka::error::KafkaError> {
    let mut done = TopicPartitionList::new();
    done.add_partition(&key.0, key.1);
    reader.pause(&done)
}

/// Positions of one partition further apart than this are read in separate rounds, so that
/// two groups far apart do not make the reader walk the records between them.
const MAX_RUN: i64 = 1_000;

fn bare(name: &str) -> groups::Group {
    groups::Group {
        name: name.to_string(),
        state: None,
        members: None,
    }
}

/// The snapshot in the Prometheus text format, under kafka-lag-exporter's names.
pub fn render(snapshot: &Snapshot) -> String {
    let cluster = escape(&snapshot.cluster_name);
    let mut out = String::new();
    let mut family = |name: &str, help: &str, lines: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, value) in lines {
            let _ = writeln!(out, "{name}{{cluster_name=\"{cluster}\",{labels}}} {value}");
        }
    };
    let per_partition = |f: &dyn Fn(&PartitionLag) -> String| -> Vec<(String, String)> {
        snapshot
            .groups
            .iter()
            .flat_map(|g| {
                g.partitions.iter().map(move |p| {
                    (
                        format!(
                            "group=\"{}\",topic=\"{}\",partition=\"{}\"",
                            escape(&g.group),
                            escape(&p.topic),
                            p.partition
                        ),
                        f(p),
                    )
                })
            })
            .collect()
    };
    let per_group = |f: &dyn Fn(&GroupLag) -> String| -> Vec<(String, String)> {
        snapshot
            .groups
            .iter()
            .map(|g| (format!("group=\"{}\"", escape(&g.group)), f(g)))
            .collect()
    };
    family(
        "kafka_consumergroup_group_offset",
        "Last committed offset of a consumer group on a partition.",
        per_partition(&|p| p.committed_offset.to_string()),
    );
    family(
        "kafka_consumergroup_group_lag",
        "Records a consumer group has not consumed yet on a partition.",
        per_partition(&|p| p.lag.to_string()),
    );
    family(
        "kafka_consumergroup_group_lag_seconds",
        "Age of the oldest unconsumed record of a partition, from its timestamp; 0 when caught up.",
        per_partition(&|p| p.lag_seconds.to_string()),
    );
    family(
        "agentbus_lag_seconds_unknown",
        "1 where the record at a group's committed offset could not be read in time: its kafka_consumergroup_group_lag_seconds is a lower bound; 0 where it is exact.",
        per_partition(&|p| u8::from(p.lag_seconds_unknown()).to_string()),
    );
    family(
        "kafka_consumergroup_group_max_lag",
        "Largest partition lag of a consumer group.",
        per_group(&|g| g.max_lag.to_string()),
    );
    family(
        "kafka_consumergroup_group_max_lag_seconds",
        "Largest partition lag in seconds of a consumer group.",
        per_group(&|g| g.max_lag_seconds.to_string()),
    );
    family(
        "kafka_consumergroup_group_sum_lag",
        "Sum of the partition lags of a consumer group.",
        per_group(&|g| g.sum_lag.to_string()),
    );
    let mut topic_sums: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for g in &snapshot.groups {
        for p in &g.partitions {
            *topic_sums.entry((&g.group, &p.topic)).or_default() += p.lag;
        }
    }
    family(
        "kafka_consumergroup_group_topic_sum_lag",
        "Sum of the partition lags of a consumer group on one topic.",
        topic_sums
            .into_iter()
            .map(|((g, t), lag)| {
                (
                    format!("group=\"{}\",topic=\"{}\"", escape(g), escape(t)),
                    lag.to_string(),
                )
            })
            .collect(),
    );
    let per_topic_partition = |f: &dyn Fn(&PartitionOffsets) -> i64| -> Vec<(String, String)> {
        snapshot
            .partitions
            .iter()
            .map(|p| {
                (
                    format!(
                        "topic=\"{}\",partition=\"{}\"",
                        escape(&p.topic),
                        p.partition
                    ),
                    f(p).to_string(),
                )
            })
            .collect()
    };
    family(
        "kafka_partition_latest_offset",
        "High watermark of a partition.",
        per_topic_partition(&|p| p.end_offset),
    );
    family(
        "kafka_partition_earliest_offset",
        "Low watermark of a partition.",
        per_topic_partition(&|p| p.earliest_offset),
    );
    out
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_kafka_lag_exporter_names_with_escaped_labels() {
        let snapshot = Snapshot {
            cluster_name: "c\"1".into(),
            collected_at: Utc::now(),
            duration_seconds: 0.1,
            members_unknown: None,
            groups: vec![GroupLag {
                group: "planner".into(),
                state: None,
                members: None,
                sum_lag: 5,
                max_lag: 3,
                max_lag_seconds: 12.5,
                partitions: vec![
                    PartitionLag {
                        topic: "agent.events".into(),
                        partition: 0,
                        committed_offset: 7,
                        earliest_offset: 0,
                        end_offset: 10,
                        lag: 3,
                        lag_seconds: 12.5,
                        lag_seconds_basis: LagSecondsBasis::Record,
                        lag_seconds_note: None,
                        oldest_unconsumed_at: None,
                    },
                    PartitionLag {
                        topic: "agent.events".into(),
                        partition: 1,
                        committed_offset: 1,
                        earliest_offset: 0,
                        end_offset: 3,
                        lag: 2,
                        lag_seconds: 4.0,
                        lag_seconds_basis: LagSecondsBasis::LowerBound,
                        lag_seconds_note: Some("not read".into()),
                        oldest_unconsumed_at: None,
                    },
                ],
            }],
            partitions: vec![PartitionOffsets {
                topic: "agent.events".into(),
                partition: 0,
                earliest_offset: 0,
                end_offset: 10,
            }],
        };
        let text = render(&snapshot);
        assert!(text.contains(
            "kafka_consumergroup_group_lag_seconds{cluster_name=\"c\\\"1\",group=\"planner\",topic=\"agent.events\",partition=\"0\"} 12.5"
        ), "{text}");
        assert!(text.contains(
            "kafka_consumergroup_group_topic_sum_lag{cluster_name=\"c\\\"1\",group=\"planner\",topic=\"agent.events\"} 5"
        ));
        assert!(text.contains(
            "kafka_partition_latest_offset{cluster_name=\"c\\\"1\",topic=\"agent.events\",partition=\"0\"} 10"
        ));
        assert!(text.contains("# TYPE kafka_consumergroup_group_max_lag_seconds gauge"));
        assert!(text.contains(
            "agentbus_lag_seconds_unknown{cluster_name=\"c\\\"1\",group=\"planner\",topic=\"agent.events\",partition=\"0\"} 0\n"
        ), "{text}");
        assert!(text.contains(
            "agentbus_lag_seconds_unknown{cluster_name=\"c\\\"1\",group=\"planner\",topic=\"agent.events\",partition=\"1\"} 1\n"
        ), "{text}");
    }

    const NOW: i64 = 10_000_000;
    const READ: Duration = Duration::from_secs(3);

    fn bounds(stable: i64, end: i64) -> Option<Bounds> {
        Some(Bounds { stable, end })
    }

    #[test]
    fn a_read_record_gives_its_exact_age_and_no_lag_is_caught_up() {
        let s = lag_seconds(
            2,
            Some(&Oldest::Record(NOW - 7_209_000)),
            5,
            bounds(7, 7),
            None,
            NOW,
            READ,
        );
        assert_eq!(
            (s.seconds, s.basis, s.at),
            (7209.0, LagSecondsBasis::Record, Some(NOW - 7_209_000))
        );
        let s = lag_seconds(0, None, 7, None, None, NOW, READ);
        assert_eq!((s.seconds, s.basis), (0.0, LagSecondsBasis::CaughtUp));
    }

    #[test]
    fn a_record_not_read_is_never_caught_up_but_a_lower_bound() {
        // Nothing later read, first seen 60 s ago: at least 60 s.
        let unread = Oldest::Unread {
            why: "BadMessage".into(),
            later: None,
        };
        let s = lag_seconds(
            2,
            Some(&unread),
            5,
            bounds(7, 7),
            Some(NOW - 60_000),
            NOW,
            READ,
        );
        assert_eq!((s.seconds, s.basis), (60.0, LagSecondsBasis::LowerBound));
        assert!(s.note.unwrap().contains("BadMessage"));
        // A later record two hours old: at least its age.
        let unread = Oldest::Unread {
            why: "BadMessage".into(),
            later: Some((6, NOW - 7_200_000)),
        };
        let s = lag_seconds(
            2,
            Some(&unread),
            5,
            bounds(7, 7),
            Some(NOW - 60_000),
            NOW,
            READ,
        );
        assert_eq!(
            (s.seconds, s.basis, s.at),
            (7200.0, LagSecondsBasis::LowerBound, Some(NOW - 7_200_000))
        );
        assert!(s.note.unwrap().contains("offset 6"));
        // Not even looked at.
        let s = lag_seconds(1, None, 5, bounds(6, 6), Some(NOW - 1_000), NOW, READ);
        assert_eq!((s.seconds, s.basis), (1.0, LagSecondsBasis::LowerBound));
    }

    #[test]
    fn open_transactions_and_markers_say_so() {
        let s = lag_seconds(
            2,
            Some(&Oldest::OpenTransaction(Some((5, NOW - 5_000)))),
            5,
            bounds(5, 7),
            None,
            NOW,
            READ,
        );
        assert_eq!(
            (s.seconds, s.basis),
            (5.0, LagSecondsBasis::OpenTransaction)
        );
        assert!(s.note.unwrap().contains("last stable offset at 5"));
        let s = lag_seconds(
            1,
            Some(&Oldest::NothingToConsume),
            6,
            bounds(7, 7),
            None,
            NOW,
            READ,
        );
        assert_eq!(
            (s.seconds, s.basis),
            (0.0, LagSecondsBasis::NoConsumableRecord)
        );
    }
}

//! Consumer lag: for every consumer group, committed offsets against the partitions'
//! watermarks, and the exact age of the oldest unconsumed record, exported under
//! kafka-lag-exporter's metric names (CONTRACT.md §5).
//!
//! One collection: list the groups ([`groups`]), read the topics' partitions (one metadata
//! request), every group's committed offsets (one OffsetFetch per group, on a client kept per
//! group), the low and high watermarks of all partitions (one ListOffsets each way), then for
//! each lagging partition the timestamp of the record at the committed offset: one small
//! fetch, and only when the committed offset moved since the last collection (the answer is
//! cached by position), at most [`LagSettings::fetch_concurrency`] partitions at a time.

pub mod groups;

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
}

impl Default for LagSettings {
    fn default() -> Self {
        LagSettings {
            cluster_name: "default".into(),
            interval: Duration::from_secs(15),
            groups: Vec::new(),
            fetch_concurrency: 64,
        }
    }
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
    /// Age of the oldest unconsumed record, from its own timestamp; 0 when caught up.
    pub lag_seconds: f64,
    /// That record's timestamp.
    pub oldest_unconsumed_at: Option<DateTime<Utc>>,
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
    /// The process is stopping.
    #[error("stopping")]
    Stopping,
}

/// A position in the log: topic, partition, offset.
pub(crate) type Position = (String, i32, i64);

#[derive(Default)]
struct Cache {
    /// One client per group, for its committed offsets.
    clients: HashMap<String, BaseConsumer>,
    /// The timestamp of the record at (topic, partition, offset), for unmoved positions.
    timestamps: HashMap<Position, i64>,
    /// Per group, the topics it had committed offsets on at the last full look, and the
    /// collections since: between full looks only those topics are asked about.
    group_topics: HashMap<String, (HashSet<String>, u32)>,
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

/// How long a failed DescribeGroups is not tried again.
const DESCRIBE_RETRY: Duration = Duration::from_secs(600);

/// Groups whose committed offsets are fetched at once.
const GROUP_CONCURRENCY: usize = 16;

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
        // Which groups.
        let mut members_unknown = None;
        let mut described: BTreeMap<String, groups::Group> = BTreeMap::new();
        let wanted: Option<Vec<String>> = only
            .or_else(|| (!self.settings.groups.is_empty()).then(|| self.settings.groups.clone()));
        match &wanted {
            Some(names) => {
                for name in names {
                    described.insert(name.clone(), bare(name));
                }
                match self.describe_all(Duration::from_secs(5)) {
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
                let (all, why) = groups::list(&self.kafka, TIMEOUT, self.describe_all(TIMEOUT))
                    .map_err(Error::Groups)?;
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
        let mut cache = self.cache.lock().expect("lag cache lock");
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
        // Committed offsets: one request per group, up to GROUP_CONCURRENCY at a time.
        for name in described.keys() {
            self.client(&mut cache, name)?;
        }
        let mut committed: BTreeMap<String, Vec<Position>> = BTreeMap::new();
        let mut used: HashSet<(String, i32)> = HashSet::new();
        let names: Vec<&String> = described.keys().collect();
        // What to ask each group about: every partition at a full look, else the partitions
        // of the topics it had offsets on (one OffsetFetch for all partitions of all topics,
        // per group, is what costs on a cluster with many topics).
        let mut asks: HashMap<String, (TopicPartitionList, bool)> = HashMap::new();
        for name in &names {
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
        for chunk in names.chunks(GROUP_CONCURRENCY) {
            if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Stopping);
            }
            let answers: Vec<Result<TopicPartitionList, rdkafka::error::KafkaError>> =
                std::thread::scope(|scope| {
                    let asks: Vec<_> = chunk
                        .iter()
                        .map(|name| {
                            let client = &cache.clients[name.as_str()];
                            let tpl = &asks[name.as_str()].0;
                            scope.spawn(move || {
                                if tpl.count() == 0 {
                                    Ok(TopicPartitionList::new())
                                } else {
                                    client.committed_offsets(tpl.clone(), TIMEOUT)
                                }
                            })
                        })
                        .collect();
                    asks.into_iter()
                        .map(|a| a.join().expect("an offset fetch does not panic"))
                        .collect()
                });
            for (name, offsets) in chunk.iter().zip(answers) {
                let mut mine = Vec::new();
                for e in offsets?.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        mine.push((e.topic().to_string(), e.partition(), o));
                        used.insert((e.topic().to_string(), e.partition()));
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
        }
        // Keep clients of groups still watched only.
        cache
            .clients
            .retain(|k, _| k == "agentbus-lag" || described.contains_key(k));
        cache.group_topics.retain(|k, _| described.contains_key(k));
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
        // The oldest unconsumed record of each lagging partition.
        let mut positions: HashSet<Position> = HashSet::new();
        for offsets in committed.values() {
            for (topic, partition, offset) in offsets {
                let key = (topic.clone(), *partition);
                let (lo, hi) = (
                    low.get(&key).copied().unwrap_or(0),
                    high.get(&key).copied().unwrap_or(0),
                );
                let position = (*offset).max(lo);
                if position < hi {
                    positions.insert((topic.clone(), *partition, position));
                }
            }
        }
        cache.timestamps.retain(|k, _| positions.contains(k));
        let missing: Vec<Position> = positions
            .iter()
            .filter(|p| !cache.timestamps.contains_key(*p))
            .cloned()
            .collect();
        if self.stopping.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Error::Stopping);
        }
        let found = first_timestamps(
            &self.kafka,
            &missing,
            self.settings.fetch_concurrency,
            TIMEOUT,
        )?;
        cache.timestamps.extend(found);
        let now_ms = collected_at.timestamp_millis();
        let mut out_groups = Vec::new();
        for (name, group) in described {
            let offsets = committed.remove(&name).unwrap_or_default();
            let from_here = self.known.contains(&name) || wanted.is_some();
            if offsets.is_empty() && !from_here {
                continue;
            }
            let mut partitions: Vec<PartitionLag> = offsets
                .into_iter()
                .map(|(topic, partition, offset)| {
                    let key = (topic.clone(), partition);
                    let lo = low.get(&key).copied().unwrap_or(0);
                    let hi = high.get(&key).copied().unwrap_or(offset.max(lo));
                    let position = offset.max(lo);
                    let lag = (hi - position).max(0);
                    let oldest = (lag > 0)
                        .then(|| cache.timestamps.get(&(topic.clone(), partition, position)))
                        .flatten()
                        .copied();
                    PartitionLag {
                        lag,
                        lag_seconds: oldest
                            .map_or(0.0, |ts| ((now_ms - ts).max(0)) as f64 / 1000.0),
                        oldest_unconsumed_at: oldest.and_then(DateTime::from_timestamp_millis),
                        topic,
                        partition,
                        committed_offset: offset,
                        earliest_offset: lo,
                        end_offset: hi,
                    }
                })
                .collect();
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
        Ok(Snapshot {
            cluster_name: self.settings.cluster_name.clone(),
            collected_at,
            duration_seconds: started.elapsed().as_secs_f64(),
            members_unknown,
            groups: out_groups,
            partitions,
        })
    }

    /// Every group, described by the broker; not asked again within [`DESCRIBE_RETRY`] of a
    /// failure (a broker that fails it drops the connection), the failure's reason instead.
    fn describe_all(&self, timeout: Duration) -> Result<Vec<groups::Group>, String> {
        let mut failure = self.describe_failure.lock().expect("describe failure lock");
        if let Some((at, why)) = failure.as_ref()
            && at.elapsed() < DESCRIBE_RETRY
        {
            return Err(format!("{why}; not asked again for {DESCRIBE_RETRY:?}"));
        }
        groups::describe(&self.kafka, None, timeout)
            .inspect_err(|why| *failure = Some((Instant::now(), why.clone())))
    }

    fn client<'c>(&self, cache: &'c mut Cache, group: &str) -> Result<&'c BaseConsumer, Error> {
        if !cache.clients.contains_key(group) {
            let client: BaseConsumer = self
                .kafka
                .client_config_with(&[
                    ("group.id", group.to_string()),
                    ("enable.auto.commit", "false".into()),
                    ("enable.partition.eof", "false".into()),
                ])
                .create()?;
            cache.clients.insert(group.to_string(), client);
        }
        Ok(&cache.clients[group])
    }
}

/// Positions of one partition further apart than this are read in separate rounds, so that
/// two groups far apart do not make the reader walk the records between them.
const MAX_RUN: i64 = 1_000;

/// The timestamp of the first record at or after each position, all within `timeout`. One
/// reader: each partition is assigned at its lowest position and read until it passed the
/// highest one of its run (several groups sit at different offsets of one partition), then
/// paused; at most `at_once` partitions are assigned at a time.
pub(crate) fn first_timestamps(
    kafka: &KafkaArgs,
    positions: &[Position],
    at_once: usize,
    timeout: Duration,
) -> Result<Vec<(Position, i64)>, rdkafka::error::KafkaError> {
    if positions.is_empty() {
        return Ok(Vec::new());
    }
    let mut by_partition: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
    for (topic, partition, offset) in positions {
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
    let rounds: Vec<Round> = rounds
        .into_iter()
        .flat_map(|round| {
            round
                .chunks(at_once.max(1))
                .map(<[_]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect();
    let reader: BaseConsumer = kafka
        .client_config_with(&[
            ("group.id", "agentbus-lag-reader".into()),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("enable.partition.eof", "false".into()),
        ])
        .create()?;
    let mut found = Vec::new();
    let deadline = Instant::now() + timeout;
    for round in rounds {
        let mut assignment = TopicPartitionList::new();
        let mut open: HashMap<(String, i32), std::collections::VecDeque<i64>> = HashMap::new();
        for ((topic, partition), run) in round {
            assignment.add_partition_offset(&topic, partition, Offset::Offset(run[0]))?;
            open.insert((topic, partition), run.into());
        }
        reader.assign(&assignment)?;
        while !open.is_empty() && Instant::now() < deadline {
            let Some(result) = reader.poll(Duration::from_millis(100)) else {
                continue;
            };
            let Ok(m) = result else {
                continue;
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
                if let Some(ts) = ts {
                    found.push(((key.0.clone(), key.1, position), ts));
                }
            }
            if pending.is_empty() {
                let mut done = TopicPartitionList::new();
                done.add_partition(&key.0, key.1);
                reader.pause(&done)?;
                open.remove(&key);
            }
        }
        if !open.is_empty() {
            tracing::warn!(
                partitions = open.len(),
                "no record read at a position in time"
            );
        }
    }
    Ok(found)
}

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
    }
}

//! An agent's dedup store: a durable map of handled keys whose entries expire, a sled tree in
//! the data directory plus an index, so a sweep costs what it removes, not the size of the
//! store. (The publish idempotency keys are in `crate::window`, on redb: they are many more.)
//!
//! The store keeps its keys by partition (the changelog partition of the dedup changelog, see
//! `crate::consume::changelog`): their index is ordered by `partition ‖ expiry`, so that one
//! index serves both a revoked partition's drop (a prefix) and the sweep (a range per
//! partition); one index entry holds the keys of a
//! partition written in one group commit (see `indexed_keys`), and a checkpoint per partition
//! ("restored through changelog offset c") lets a restart restore only what is newer.
//!
//! Every write goes through one writer thread that applies what has queued up and then
//! flushes once for all of it (group commit): a write returns only once it is on disk. Besides
//! being fast, this keeps sled 0.34 away from concurrent flushes racing writers, which
//! deadlock it under load.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot};

/// Errors of a store: the disk, or its writer thread.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// sled failed to open or read (I/O, corruption, a locked directory).
    #[error("store {path}: {source}")]
    Sled {
        /// The store's directory.
        path: String,
        /// What sled said.
        source: sled::Error,
    },
    /// redb failed to open, read or commit (I/O, corruption, a locked file).
    #[error("store {path}: {source}")]
    Redb {
        /// The store's directory.
        path: String,
        /// What redb said.
        source: Box<redb::Error>,
    },
    /// The writer failed to write or flush; what it was given is not durable.
    #[error("store write failed: {0}")]
    Write(String),
    /// A store's file could not be read (its library gave up on it); what to do says how
    /// to start anew.
    #[error("store {path}: {file} is damaged ({why}); {what_to_do}")]
    Damaged {
        /// The store's directory.
        path: String,
        /// The damaged file.
        file: &'static str,
        /// What reading it said.
        why: String,
        /// How to go on.
        what_to_do: String,
    },
}

/// Jobs waiting for a writer at most.
pub(crate) const QUEUE: usize = 4096;

/// Jobs taken into one group commit at most.
const MAX_GROUP: usize = 512;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The queue to a store's writer thread and the thread itself: the thread takes what has
/// queued up (up to [`MAX_GROUP`] jobs) and handles it as one group, so that one flush or
/// commit serves many writes. Dropping the queue closes it and waits for the thread to finish
/// what it has and release the database, so the directory can be opened again at once.
pub(crate) struct WriterQueue<J> {
    sender: mpsc::Sender<J>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<J: Send + 'static> WriterQueue<J> {
    /// Starts thread `name`, which calls `group` with each group of jobs; at most
    /// `capacity` jobs wait for it (beyond, handing one over waits).
    pub(crate) fn spawn(
        name: &str,
        capacity: usize,
        mut group: impl FnMut(Vec<J>) + Send + 'static,
    ) -> Result<Self, Error> {
        let (sender, mut jobs) = mpsc::channel(capacity);
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Some(first) = jobs.blocking_recv() {
                    let mut jobs_now = vec![first];
                    while jobs_now.len() < MAX_GROUP {
                        match jobs.try_recv() {
                            Ok(job) => jobs_now.push(job),
                            Err(_) => break,
                        }
                    }
                    group(jobs_now);
                }
            })
            .map_err(|e| Error::Write(format!("starting the writer thread: {e}")))?;
        Ok(WriterQueue {
            sender,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The queue's sending side, for a thread that hands jobs over with `blocking_send`.
    pub(crate) fn sender(&self) -> mpsc::Sender<J> {
        self.sender.clone()
    }

    /// Hands `job` to the writer; returns as soon as it has it.
    pub(crate) async fn send(&self, job: J) -> Result<(), Error> {
        self.sender
            .send(job)
            .await
            .map_err(|_| Error::Write("the writer thread stopped".into()))
    }

    /// Hands over the job `job` makes of a reply channel, and waits for the reply.
    pub(crate) async fn run<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, String>>) -> J,
    ) -> Result<T, Error> {
        let (reply, done) = oneshot::channel();
        self.send(job(reply)).await?;
        done.await
            .map_err(|_| Error::Write("the writer thread stopped".into()))?
            .map_err(Error::Write)
    }
}

impl<J> Drop for WriterQueue<J> {
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.sender, closed));
        if let Some(thread) = self.thread.lock().expect("not poisoned").take() {
            let _ = thread.join();
        }
    }
}

/// The store. Entries read as absent once expired, and are removed by [`ExpiringStore::sweep`].
pub struct ExpiringStore {
    path: String,
    /// Why the last write or flush failed: from then on the store refuses reads and writes,
    /// so that nobody goes on as if it remembered.
    broken: Broken,
    entries: sled::Tree,
    /// Written but not yet applied by the writer: `get` sees them at once.
    pending: Pending,
    /// Per partition: the changelog offset through which this store holds its records.
    checkpoints: sled::Tree,
    count: Arc<AtomicI64>,
    writer: WriterQueue<Job>,
}

/// Keys handed to the writer but not yet applied, with their partitions: `get` sees them at
/// once. The key is shared with the job: no copy per key.
type Pending = Arc<Mutex<std::collections::HashMap<Arc<str>, i32>>>;

type Broken = Arc<std::sync::OnceLock<String>>;

enum Job {
    /// Keys of one partition, each with its own expiry (ms since the epoch), and the
    /// partition's new checkpoint once they are in.
    PutPartitioned {
        partition: i32,
        keys: Vec<(Arc<str>, u64)>,
        checkpoint: Option<i64>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    DropPartition {
        partition: i32,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Sweep {
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Flush {
        reply: oneshot::Sender<Result<usize, String>>,
    },
}

/// Page cache of one store.
const CACHE_BYTES: u64 = 16 * 1024 * 1024;

impl ExpiringStore {
    /// Opens (or creates) the store in `dir` and starts its writer thread, which ends when
    /// the store is dropped.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let path = dir.display().to_string();
        let sled_error = |source| Error::Sled {
            path: path.clone(),
            source,
        };
        let db = sled::Config::new()
            .path(dir)
            // sled caches up to 1 GiB by default: with a day of keys that is memory that grows
            // for hours. The keys are read rarely (repeats, sweeps); a small cache serves them.
            .cache_capacity(CACHE_BYTES)
            // The writer thread flushes; a second flusher would race it.
            .flush_every_ms(None)
            .open()
            .map_err(sled_error)?;
        let entries = db.open_tree("entries").map_err(sled_error)?;
        let by_expiry = db.open_tree("entries_by_expiry").map_err(sled_error)?;
        let by_partition = db.open_tree("entries_by_partition").map_err(sled_error)?;
        let checkpoints = db.open_tree("checkpoints").map_err(sled_error)?;
        let count = Arc::new(AtomicI64::new(entries.len() as i64));
        let pending = Pending::default();
        let broken = Broken::default();
        let state = Writer {
            path: path.clone(),
            broken: broken.clone(),
            db,
            entries: entries.clone(),
            by_expiry,
            by_partition,
            checkpoints: checkpoints.clone(),
            count: count.clone(),
            pending: pending.clone(),
        };
        let writer = WriterQueue::spawn("store-writer", QUEUE, move |group| state.apply(group))?;
        Ok(ExpiringStore {
            path,
            broken,
            entries,
            pending,
            checkpoints,
            count,
            writer,
        })
    }

    /// Entries held (expired ones count until swept).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed).max(0) as usize
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses once the store stopped working (a write or flush failed), saying why.
    fn check(&self) -> Result<(), Error> {
        match self.broken.get() {
            Some(why) => Err(Error::Write(why.clone())),
            None => Ok(()),
        }
    }

    /// The value under `key`, unless absent or expired.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        self.check()?;
        if let Some(partition) = self.pending.lock().expect("not poisoned").get(key) {
            return Ok(Some(partition.to_be_bytes().to_vec()));
        }
        let raw = self.entries.get(key).map_err(|source| Error::Sled {
            path: self.path.clone(),
            source,
        })?;
        Ok(raw.and_then(|raw| {
            let expires = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
            (expires > now_ms()).then(|| raw[8..].to_vec())
        }))
    }

    /// Hands keys of changelog partition `partition` to the writer, each to expire at its
    /// own time (ms since the epoch), and, once they are in, raises the partition's
    /// checkpoint to `checkpoint` (never lowers it). Returns as soon as the writer has them;
    /// the [`Durable`] resolves once keys and checkpoint are on disk. The writer applies jobs
    /// in the order they were handed over, so a checkpoint handed over later than a key is
    /// never on disk without it. The value read back by [`ExpiringStore::get`] is the
    /// partition (4 bytes, big-endian).
    pub async fn put_partitioned(
        &self,
        partition: i32,
        keys: Vec<(Arc<str>, u64)>,
        checkpoint: Option<i64>,
    ) -> Result<Durable, Error> {
        self.check()?;
        {
            let mut pending = self.pending.lock().expect("not poisoned");
            for (key, _) in &keys {
                pending.insert(key.clone(), partition);
            }
        }
        self.hand_over(partition, keys, checkpoint).await
    }

    /// Marks `key` (of changelog partition `partition`) as written at once: `get` sees it
    /// from now on, before its write is handed over with [`ExpiringStore::put_held`]. A lane
    /// holds each key as soon as its event is handled and writes its keys together.
    pub fn hold(&self, key: &Arc<str>, partition: i32) -> Result<(), Error> {
        self.check()?;
        self.pending
            .lock()
            .expect("not poisoned")
            .insert(key.clone(), partition);
        Ok(())
    }

    /// [`ExpiringStore::put_partitioned`] for keys already held ([`ExpiringStore::hold`])
    /// under `partition`, without a checkpoint.
    pub async fn put_held(
        &self,
        partition: i32,
        keys: Vec<(Arc<str>, u64)>,
    ) -> Result<Durable, Error> {
        self.check()?;
        self.hand_over(partition, keys, None).await
    }

    async fn hand_over(
        &self,
        partition: i32,
        keys: Vec<(Arc<str>, u64)>,
        checkpoint: Option<i64>,
    ) -> Result<Durable, Error> {
        let (reply, done) = oneshot::channel();
        self.writer
            .send(Job::PutPartitioned {
                partition,
                keys,
                checkpoint,
                reply,
            })
            .await?;
        Ok(Durable(done))
    }

    /// The changelog offset through which partition `partition`'s records are held (as
    /// written by [`ExpiringStore::put_partitioned`]), if any.
    pub fn checkpoint(&self, partition: i32) -> Result<Option<i64>, Error> {
        self.check()?;
        let raw = self
            .checkpoints
            .get(partition.to_be_bytes())
            .map_err(|source| Error::Sled {
                path: self.path.clone(),
                source,
            })?;
        Ok(raw.and_then(|raw| Some(i64::from_be_bytes(raw.as_ref().try_into().ok()?))))
    }

    /// Drops every key of partition `partition` (those written since under another partition
    /// stay) and its checkpoint; returns how many keys went. Durable on return.
    pub async fn drop_partition(&self, partition: i32) -> Result<usize, Error> {
        self.check()?;
        self.writer
            .run(|reply| Job::DropPartition { partition, reply })
            .await
    }

    /// Removes expired entries; returns how many.
    pub async fn sweep(&self) -> Result<usize, Error> {
        self.writer.run(|reply| Job::Sweep { reply }).await
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<(), Error> {
        self.writer
            .run(|reply| Job::Flush { reply })
            .await
            .map(|_| ())
    }
}

/// A write on its way to disk; resolves once it is there.
pub struct Durable(oneshot::Receiver<Result<usize, String>>);

impl Durable {
    /// Waits until the write is on disk.
    pub async fn wait(self) -> Result<(), Error> {
        self.0
            .await
            .map_err(|_| Error::Write("the writer thread stopped".into()))?
            .map(|_| ())
            .map_err(Error::Write)
    }
}

/// The writer thread's side of the store.
struct Writer {
    path: String,
    broken: Broken,
    db: sled::Db,
    entries: sled::Tree,
    by_expiry: sled::Tree,
    by_partition: sled::Tree,
    checkpoints: sled::Tree,
    count: Arc<AtomicI64>,
    pending: Pending,
}

impl Writer {
    /// Applies one group of jobs and flushes once for all of them.
    fn apply(&self, group: Vec<Job>) {
        let mut applied = Vec::with_capacity(group.len());
        // The partitioned keys' index entries of this group, one per partition, written
        // before anything that reads the index and before the flush.
        let mut index = GroupIndex::default();
        let mut index_failure: Option<String> = None;
        for job in group {
            if matches!(job, Job::DropPartition { .. } | Job::Sweep { .. })
                && let Err(e) = self.write_index(&mut index)
            {
                index_failure.get_or_insert(e.to_string());
            }
            let outcome = match &job {
                Job::PutPartitioned {
                    partition,
                    keys,
                    checkpoint,
                    ..
                } => {
                    let applied = self
                        .put_partitioned(*partition, keys, *checkpoint, &mut index)
                        .map(|()| keys.len());
                    let mut pending = self.pending.lock().expect("not poisoned");
                    for (key, _) in keys {
                        pending.remove(&**key);
                    }
                    applied
                }
                Job::DropPartition { partition, .. } => self.drop_partition(*partition),
                Job::Sweep { .. } => self.sweep(),
                Job::Flush { .. } => Ok(0),
            };
            applied.push((job, outcome.map_err(|e| e.to_string())));
        }
        // An index not written fails the whole group, as a failed flush does: its keys
        // would never be swept or dropped.
        let indexed = match index_failure {
            Some(why) => Err(why),
            None => self.write_index(&mut index).map_err(|e| e.to_string()),
        };
        let flushed = indexed.and_then(|()| self.db.flush().map(|_| ()).map_err(|e| e.to_string()));
        let failed = flushed.clone().err().or_else(|| {
            applied
                .iter()
                .find_map(|(_, outcome)| outcome.clone().err())
        });
        if let Some(why) = failed {
            let _ = self.broken.set(format!("{}: {why}", self.path));
        }
        for (job, outcome) in applied {
            let (Job::PutPartitioned { reply, .. }
            | Job::DropPartition { reply, .. }
            | Job::Sweep { reply }
            | Job::Flush { reply }) = job;
            // A requester that went away no longer needs the answer.
            let _ = reply.send(flushed.clone().and(outcome));
        }
    }

    fn put_partitioned(
        &self,
        partition: i32,
        keys: &[(Arc<str>, u64)],
        checkpoint: Option<i64>,
        index: &mut GroupIndex,
    ) -> Result<(), sled::Error> {
        let p = partition.to_be_bytes();
        for (key, expires) in keys {
            let mut stored = [0u8; 12];
            stored[..8].copy_from_slice(&expires.to_be_bytes());
            stored[8..].copy_from_slice(&p);
            if self.entries.insert(key.as_bytes(), &stored)?.is_none() {
                self.count.fetch_add(1, Ordering::Relaxed);
            }
            index.add(partition, key.as_bytes(), *expires);
        }
        if let Some(offset) = checkpoint {
            let current = self
                .checkpoints
                .get(p)?
                .and_then(|raw| Some(i64::from_be_bytes(raw.as_ref().try_into().ok()?)));
            if current.is_none_or(|c| c < offset) {
                self.checkpoints.insert(p, &offset.to_be_bytes())?;
            }
        }
        Ok(())
    }

    /// Writes the group's index entries (one per partition) and empties `index`.
    fn write_index(&self, index: &mut GroupIndex) -> Result<(), sled::Error> {
        for ((partition, _), entry) in index.entries.drain(..) {
            let id = self.db.generate_id()?;
            let mut key = partition_index(&partition.to_be_bytes(), entry.latest, &[]);
            key.extend_from_slice(&id.to_be_bytes());
            self.by_partition.insert(key, entry.keys)?;
        }
        Ok(())
    }

    fn drop_partition(&self, partition: i32) -> Result<usize, sled::Error> {
        let p = partition.to_be_bytes();
        let mut removed = 0;
        for entry in self.by_partition.scan_prefix(p) {
            let (index_key, keys) = entry?;
            for key in indexed_keys(&index_key, &keys) {
                // Written again since under another partition: that partition's now.
                if let Some(raw) = self.entries.get(key)?
                    && raw.get(8..) == Some(&p[..])
                {
                    self.entries.remove(key)?;
                    removed += 1;
                }
            }
            self.by_partition.remove(index_key)?;
        }
        self.checkpoints.remove(p)?;
        self.count.fetch_sub(removed as i64, Ordering::Relaxed);
        Ok(removed)
    }

    fn sweep(&self) -> Result<usize, sled::Error> {
        let now = now_ms();
        let mut removed = 0;
        // Keys of one index entry each, by expiry alone: what earlier versions wrote.
        for entry in self.by_expiry.range(..now.to_be_bytes().to_vec()) {
            let (index_key, _) = entry?;
            let key = &index_key[8..];
            // The key may have been written again since with a later expiry; keep it then.
            if let Some(raw) = self.entries.get(key)? {
                let expires = raw
                    .get(..8)
                    .and_then(|b| b.try_into().ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                if expires <= now {
                    self.entries.remove(key)?;
                    removed += 1;
                }
            }
            self.by_expiry.remove(index_key)?;
        }
        // Partitioned keys: per partition, the index range up to now.
        let mut next = self.by_partition.first()?;
        while let Some((first, _)) = next {
            let p: [u8; 4] = first[..4]
                .try_into()
                .expect("index keys start with 4 bytes");
            let upto = partition_index(&p, now, &[]);
            for entry in self.by_partition.range(first.to_vec()..upto) {
                let (index_key, keys) = entry?;
                for key in indexed_keys(&index_key, &keys) {
                    // Written again since (a later expiry, or another partition): kept then.
                    if let Some(raw) = self.entries.get(key)?
                        && raw.get(8..) == Some(&p[..])
                        && raw
                            .get(..8)
                            .and_then(|b| b.try_into().ok())
                            .map(u64::from_be_bytes)
                            <= Some(now)
                    {
                        self.entries.remove(key)?;
                        removed += 1;
                    }
                }
                self.by_partition.remove(index_key)?;
            }
            // On to the next partition.
            next = match u32::from_be_bytes(p).checked_add(1) {
                Some(after) => self
                    .by_partition
                    .range(after.to_be_bytes().to_vec()..)
                    .next()
                    .transpose()?,
                None => None,
            };
        }
        self.count.fetch_sub(removed as i64, Ordering::Relaxed);
        Ok(removed)
    }
}

/// The `by_partition` index key of `key` in `partition`, expiring at `expires`.
fn partition_index(partition: &[u8; 4], expires: u64, key: &[u8]) -> Vec<u8> {
    let mut index = Vec::with_capacity(12 + key.len());
    index.extend_from_slice(partition);
    index.extend_from_slice(&expires.to_be_bytes());
    index.extend_from_slice(key);
    index
}

/// The keys an entry of the `by_partition` index stands for. Two forms share the index:
/// - one key: `partition ‖ expiry ‖ key` → empty value (stores written before the grouped
///   form, still read);
/// - a group: `partition ‖ latest expiry ‖ id` (8 bytes, unique) → the keys, each as a
///   4-byte big-endian length and its bytes. One sled insert per partition and group commit
///   instead of one per key: a sled insert was about as costly as the entry's own.
///
/// A group's entry carries the latest expiry of its keys (which expire within
/// [`INDEX_SPAN_MS`] of each other), so a sweep takes it only once every key in it expired
/// (or was written again since, under a later entry).
fn indexed_keys<'a>(index_key: &'a [u8], value: &'a [u8]) -> Vec<&'a [u8]> {
    if value.is_empty() {
        return index_key.get(12..).into_iter().collect();
    }
    let mut keys = Vec::new();
    let mut rest = value;
    while let Some((len, tail)) = rest.split_first_chunk::<4>() {
        let len = u32::from_be_bytes(*len) as usize;
        let Some((key, tail)) = tail.split_at_checked(len) else {
            // A torn value cannot come from sled (an insert is atomic): stop at it.
            break;
        };
        keys.push(key);
        rest = tail;
    }
    keys
}

/// Keys whose expiries fall in one span of this many milliseconds share an index entry: a
/// key is swept at most this long after it expired. Live keys of one group commit expire
/// within a few milliseconds of each other (one entry); a restore's batch spans the whole
/// window, and would otherwise keep its oldest keys until its newest expired.
const INDEX_SPAN_MS: u64 = 1000;

/// The `by_partition` index entries of one group commit, per partition and span of
/// expiries ([`INDEX_SPAN_MS`]).
#[derive(Default)]
struct GroupIndex {
    entries: Vec<((i32, u64), IndexEntry)>,
}

impl GroupIndex {
    /// Adds `key` of `partition`, expiring at `expires`.
    fn add(&mut self, partition: i32, key: &[u8], expires: u64) {
        let at = (partition, expires / INDEX_SPAN_MS);
        // Most groups hold one partition's keys of one span: the last entry, or a short scan.
        let i = match self.entries.iter().rposition(|(a, _)| *a == at) {
            Some(i) => i,
            None => {
                self.entries.push((at, IndexEntry::default()));
                self.entries.len() - 1
            }
        };
        self.entries[i].1.add(key, expires);
    }
}

/// One partition's keys of a group commit, and the latest of their expiries.
#[derive(Default)]
struct IndexEntry {
    keys: Vec<u8>,
    latest: u64,
}

impl IndexEntry {
    fn add(&mut self, key: &[u8], expires: u64) {
        self.keys
            .extend_from_slice(&(key.len() as u32).to_be_bytes());
        self.keys.extend_from_slice(key);
        self.latest = self.latest.max(expires);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn keys_by_expiry_alone_from_earlier_versions_read_as_absent_once_expired_and_are_swept()
    {
        let dir = tempfile::tempdir().unwrap();
        let (soon, later) = (now_ms() + 50, now_ms() + 3_600_000);
        {
            // The layout earlier versions wrote: an entry and an index entry by expiry.
            let db = sled::open(dir.path()).unwrap();
            let entries = db.open_tree("entries").unwrap();
            let index = db.open_tree("entries_by_expiry").unwrap();
            for (key, expires) in [("old", soon), ("new", later)] {
                let mut value = expires.to_be_bytes().to_vec();
                value.extend_from_slice(b"v");
                entries.insert(key, value).unwrap();
                let mut by_expiry = expires.to_be_bytes().to_vec();
                by_expiry.extend_from_slice(key.as_bytes());
                index.insert(by_expiry, &[]).unwrap();
            }
            db.flush().unwrap();
        }
        let store = ExpiringStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.get("new").unwrap(), Some(b"v".to_vec()));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(store.get("old").unwrap(), None);
        assert_eq!(store.sweep().await.unwrap(), 1);
        assert_eq!(store.len(), 1);
        assert_eq!(store.get("new").unwrap(), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn a_damaged_store_opens_or_is_refused_without_a_panic() {
        let damaged = tempfile::tempdir().unwrap();
        {
            let store = ExpiringStore::open(damaged.path()).unwrap();
            let later = now_ms() + 3_600_000;
            let keys = (0..2000)
                .map(|i| (Arc::<str>::from(format!("key-{i}")), later))
                .collect();
            store
                .put_partitioned(0, keys, Some(1))
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
        }
        for name in ["db", "conf"] {
            let file = damaged.path().join(name);
            let mut bytes = std::fs::read(&file).unwrap();
            for b in bytes.iter_mut().skip(64) {
                *b ^= 0xa5;
            }
            std::fs::write(&file, bytes).unwrap();
        }
        let opened = std::panic::catch_unwind(|| {
            let store = ExpiringStore::open(damaged.path())?;
            store.get("key-1").map(|_| ())
        });
        // sled recovers up to the first damaged record of its log (the keys after it are
        // gone: those events are handled again, at least once) or refuses the directory;
        // either is an answer, a panic would take the agent down at every start.
        opened.expect("no panic").ok();
    }

    #[tokio::test]
    async fn concurrent_writers_all_land_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(ExpiringStore::open(dir.path()).unwrap());
        let later = now_ms() + 60_000;
        let writes = (0..64).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .put_partitioned(i % 4, vec![(format!("k{i}").into(), later)], None)
                    .await?
                    .wait()
                    .await
            })
        });
        for w in writes {
            w.await.unwrap().unwrap();
        }
        assert_eq!(store.len(), 64);
        drop(store);
        assert_eq!(ExpiringStore::open(dir.path()).unwrap().len(), 64);
    }

    #[tokio::test]
    async fn partitioned_keys_drop_by_partition_keep_checkpoints_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let later = now_ms() + 3_600_000;
        {
            let store = ExpiringStore::open(dir.path()).unwrap();
            assert_eq!(store.checkpoint(0).unwrap(), None);
            let keys = |names: &[&str]| names.iter().map(|n| (Arc::from(*n), later)).collect();
            store
                .put_partitioned(0, keys(&["a", "b"]), Some(7))
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
            store
                .put_partitioned(1, keys(&["c", "moved"]), Some(3))
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
            // "moved" was in partition 1, now in 0: dropping 1 keeps it.
            store
                .put_partitioned(0, keys(&["moved"]), None)
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
            // A checkpoint never goes back.
            store
                .put_partitioned(0, Vec::new(), Some(5))
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
            assert_eq!(store.checkpoint(0).unwrap(), Some(7));
            assert_eq!(store.get("a").unwrap(), Some(0i32.to_be_bytes().to_vec()));
            assert_eq!(store.len(), 4);
        }
        // Shutdown keeps everything.
        let store = ExpiringStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 4);
        assert_eq!(store.checkpoint(0).unwrap(), Some(7));
        assert_eq!(store.checkpoint(1).unwrap(), Some(3));
        assert_eq!(store.drop_partition(1).await.unwrap(), 1);
        assert_eq!(store.get("c").unwrap(), None);
        assert!(store.get("moved").unwrap().is_some());
        assert_eq!(store.checkpoint(1).unwrap(), None);
        assert_eq!(store.checkpoint(0).unwrap(), Some(7));
        assert_eq!(store.len(), 3);
        assert_eq!(store.drop_partition(0).await.unwrap(), 3);
        assert!(store.is_empty());
        assert_eq!(store.get("a").unwrap(), None);
    }

    #[tokio::test]
    async fn an_expired_partitioned_key_is_swept_with_its_index_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = ExpiringStore::open(dir.path()).unwrap();
        let soon = now_ms() + 30;
        let later = now_ms() + 3_600_000;
        for (p, keys) in [
            (2, vec![("gone".into(), soon), ("stays".into(), later)]),
            (5, vec![("gone too".into(), soon)]),
            (7, vec![("stays too".into(), later)]),
        ] {
            store
                .put_partitioned(p, keys, Some(1))
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(store.get("gone").unwrap(), None);
        assert_eq!(store.sweep().await.unwrap(), 2);
        assert_eq!(store.len(), 2);
        assert!(store.get("stays").unwrap().is_some());
        // Nothing of the swept keys is left for a drop to find.
        assert_eq!(store.drop_partition(5).await.unwrap(), 0);
        assert_eq!(store.drop_partition(2).await.unwrap(), 1);
        assert_eq!(store.drop_partition(7).await.unwrap(), 1);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn keys_of_one_group_commit_share_an_index_entry_per_partition_and_span() {
        let dir = tempfile::tempdir().unwrap();
        let later = now_ms() + 3_600_000;
        {
            let store = ExpiringStore::open(dir.path()).unwrap();
            let keys: Vec<(Arc<str>, u64)> =
                (0..100).map(|i| (format!("k{i}").into(), later)).collect();
            store
                .put_partitioned(4, keys, None)
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
            // Expiries a day apart (a restore's batch) do not share an entry.
            store
                .put_partitioned(4, vec![("old".into(), now_ms() + 10_000)], None)
                .await
                .unwrap()
                .wait()
                .await
                .unwrap();
            assert_eq!(store.len(), 101);
        }
        let db = sled::open(dir.path()).unwrap();
        let index = db.open_tree("entries_by_partition").unwrap();
        // One sled insert for the index of 100 keys, instead of 100.
        assert_eq!(index.len(), 2);
        drop((index, db));
        let store = ExpiringStore::open(dir.path()).unwrap();
        assert_eq!(store.drop_partition(4).await.unwrap(), 101);
        assert!(store.is_empty());
    }

    #[tokio::test]
    async fn index_entries_of_one_key_each_from_earlier_versions_are_still_dropped_and_swept() {
        let dir = tempfile::tempdir().unwrap();
        let later = now_ms() + 3_600_000;
        let past = now_ms() - 1;
        {
            // The layout earlier versions wrote: an entry and an index entry per key.
            let db = sled::open(dir.path()).unwrap();
            let entries = db.open_tree("entries").unwrap();
            let index = db.open_tree("entries_by_partition").unwrap();
            for (p, key, expires) in [(1i32, "a", later), (1, "b", past), (2, "c", later)] {
                let mut value = expires.to_be_bytes().to_vec();
                value.extend_from_slice(&p.to_be_bytes());
                entries.insert(key, value).unwrap();
                index
                    .insert(
                        partition_index(&p.to_be_bytes(), expires, key.as_bytes()),
                        &[],
                    )
                    .unwrap();
            }
            db.flush().unwrap();
        }
        let store = ExpiringStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 3);
        assert_eq!(store.sweep().await.unwrap(), 1);
        assert_eq!(store.get("b").unwrap(), None);
        assert_eq!(store.drop_partition(1).await.unwrap(), 1);
        assert_eq!(store.get("a").unwrap(), None);
        assert!(store.get("c").unwrap().is_some());
        // New keys beside the old entries: one drop takes both forms.
        store
            .put_partitioned(2, vec![("d".into(), later)], None)
            .await
            .unwrap()
            .wait()
            .await
            .unwrap();
        assert_eq!(store.drop_partition(2).await.unwrap(), 2);
        assert!(store.is_empty());
    }
}

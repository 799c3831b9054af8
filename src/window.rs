//! The publish idempotency window on disk: key → value entries that expire, in one redb file
//! (`window.redb` in the store's directory), plus an index ordered by expiry so that a sweep
//! costs what it removes, and a write-ahead log of two files (`window.log.0`, `window.log.1`).
//!
//! Why not sled, as the agents' dedup stores (`crate::store`): sled 0.34 keeps a record in
//! memory for every page it ever wrote, so its memory grows with the keys held, about 30
//! bytes per idempotency key; a day's window at 5 000 events/s is 432 M keys. redb is a
//! copy-on-write B-tree whose only memory is a bounded page cache ([`CACHE_BYTES`]): the
//! window's keys live on disk and in the kernel's page cache, not in the process.
//!
//! Why the log: a durable redb commit writes every B-tree page it changes (a leaf per random
//! key, the branches above it, the allocator's state) and syncs twice. With a publish waiting
//! for every commit, a disk shared with the broker made single commits take 100–400 ms. Now a
//! write is durable once it is appended to the log and the log is synced (`fdatasync` of a
//! few hundred bytes): a publish waits for that alone. Every write goes through one writer
//! thread that appends what has queued up as one log record and syncs once for all of it
//! (group commit). The writer hands what it logged to an applier thread, which inserts it into
//! the B-tree in commits that wait for nobody: cheap ones that skip the sync (up to
//! [`APPLY_CHUNK`] keys each, so a transaction's pages in memory stay bounded) and, about
//! once a second ([`SEAL_EVERY`]), a durable one that also records how much of the log the
//! tree now holds.
//!
//! The log is numbered in epochs, an epoch to a file in turn: records of epoch `e` are
//! written from the start of file `e % 2`, each with its epoch and a CRC. When an epoch is
//! sealed, the writer goes on in the other file with the next epoch, and the applier's next
//! durable commit records in the tree "every epoch below `e + 1` is in here". The writer
//! takes the other file again only once that commit is done, so a file is never overwritten
//! while the tree lacks what it holds. Opening replays, from the two files, the records of the
//! epochs the tree does not hold yet (stopping at the first record that is torn, fails its
//! CRC or belongs to another epoch: nothing after it was ever acknowledged), and commits them
//! durably before anything else. Replaying a record twice is harmless: it writes the same
//! value and expiry again.
//!
//! Once logged, and until the applier's commit, written entries stay in memory (`pending`),
//! where reads see them: about a second of writes. They enter it only once the log is synced,
//! so a concurrent request never answers from a key that is not on disk (until then the key's
//! own request holds it as in progress, `crate::publish::idempotency`).
//!
//! A directory that holds a sled store of an earlier version is taken over on open: its live
//! entries are copied into the new file, then sled's files are removed.

use std::{
    collections::HashMap,
    fs::File,
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redb::{Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::store::{Error, WriterQueue, now_ms};

/// key → expiry (8 bytes, big-endian ms since the epoch) ‖ value.
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// expiry (8 bytes, big-endian) ‖ key → nothing.
const BY_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("entries_by_expiry");
/// The store's own bookkeeping: [`LOG_EPOCH`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Every log epoch below this one is in the tables (absent: 0).
const LOG_EPOCH: &str = "log_epoch";

/// The file in the store's directory.
pub const FILE: &str = "window.redb";

/// The write-ahead log's two files, epoch `e` in `LOG_FILES[e % 2]`.
pub const LOG_FILES: [&str; 2] = ["window.log.0", "window.log.1"];

/// redb's page cache. The keys are read once per publish (is it a repeat?) and written once:
/// a cache holds the B-tree's upper levels, the leaves come from the kernel's page cache.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Expired keys removed in one write transaction at most: a transaction holds every page it
/// changes in memory until it commits, and expired keys are spread over the whole tree.
pub const SWEEP_CHUNK: usize = 2000;

/// Keys inserted into the tree in one (unsynced) commit at most, for the same reason: with
/// random keys each one dirties a leaf of its own, so 1 000 keys are about 4 MiB of pages.
const APPLY_CHUNK: usize = 1000;

/// An epoch is sealed (and the tree's next durable commit takes it in) once it is this old,
/// or [`SEAL_BYTES`] long: what the memory holds until then, and what an open replays.
const SEAL_EVERY: Duration = Duration::from_secs(1);
const SEAL_BYTES: u64 = 8 * 1024 * 1024;

/// Groups of written entries the writer may hand to the applier ahead of it; beyond that the
/// writer (and so the publishes) wait for the applier: memory stays bounded when the disk is
/// slower than the writes.
const APPLY_QUEUE: usize = 1024;

/// Quick repair: each durable commit also records the allocator state (a second fsync), so
/// opening after a crash is instant instead of a walk of the whole file. The durable commits
/// are the applier's, once a second, which no publish waits for.
const QUICK_REPAIR: bool = true;

/// A log sync (which publishes wait for) or a durable commit of the tree (which the next
/// seal waits for) that takes longer is logged.
const SLOW_SYNC: Duration = Duration::from_millis(100);

/// A log record's header: payload length (u32), CRC-32 of length ‖ epoch ‖ payload (u32), epoch (u64),
/// all little-endian. The payload is entries of expiry (u64), key length (u32), key, value
/// length (u32), value.
const RECORD_HEADER: usize = 16;

/// The store. Entries read as absent once expired, and are removed by [`WindowStore::sweep`].
pub struct WindowStore {
    // The writer first, then the applier: dropping them in this order lets the applier take in
    // everything the writer logged before the database is released.
    writer: WriterQueue<Job>,
    applier: WriterQueue<Apply>,
    path: String,
    db: Arc<redb::Database>,
    /// Why a write, a sync or a commit failed: from then on the store refuses reads and
    /// writes, so that nobody goes on as if it remembered.
    broken: Broken,
    /// Written (and logged) but not yet in the tree: `get` sees them at once.
    pending: Pending,
    count: Arc<AtomicI64>,
}

/// key → (value, expiry): logged, not yet in the tree.
type Pending = Arc<Mutex<HashMap<String, (Vec<u8>, u64)>>>;
type Broken = Arc<std::sync::OnceLock<String>>;
type Reply = oneshot::Sender<Result<Done, String>>;

/// What a job did: entries written or removed, and for a sweep whether there is more.
#[derive(Clone, Copy, Default)]
struct Done {
    changed: usize,
    more: bool,
}

/// The writer's jobs.
enum Job {
    Put {
        records: Vec<(String, Vec<u8>)>,
        expires: u64,
        reply: Reply,
    },
    Flush {
        reply: Reply,
    },
}

/// The applier's jobs.
enum Apply {
    /// Entries that are in the log: (key, value, expiry).
    Put(Vec<(String, Vec<u8>, u64)>),
    /// Everything of this log epoch has been handed over: take it in durably.
    Seal(u64),
    /// Commit durably what was handed over, then answer.
    Flush(Reply),
    Sweep(Reply),
}

impl WindowStore {
    /// Opens (or creates) the store in `dir`, replays its log, takes over a sled store found
    /// there, and starts its threads, which end when the store is dropped.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let path = dir.display().to_string();
        // redb 4.6 panics (`unreachable!`) on some damaged files instead of answering an
        // error: a file on disk is input too, so that becomes an error saying what to do.
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| open_tree(dir, &path)));
        let (db, files, epoch, count) = match opened {
            Ok(opened) => opened?,
            Err(panic) => {
                return Err(Error::Damaged {
                    path,
                    file: FILE,
                    why: format!(
                        "reading it failed: {}",
                        crate::consume::panic_message(panic)
                    ),
                    what_to_do: format!(
                        "move it away (with {} and {}) to start with an empty window, in which retries of earlier publishes are not recognised",
                        LOG_FILES[0], LOG_FILES[1]
                    ),
                });
            }
        };
        let db = Arc::new(db);
        let count = Arc::new(AtomicI64::new(count as i64));
        if dir.join("conf").exists() && dir.join("db").exists() {
            let taken =
                take_over_sled(dir, &db).map_err(|e| Error::Write(format!("{path}: {e}")))?;
            count.fetch_add(taken as i64, Ordering::Relaxed);
            tracing::info!(store = %path, keys = taken, "took over the keys of the sled store of an earlier version");
        }
        let pending = Pending::default();
        let broken = Broken::default();
        let applied = Arc::new(AtomicU64::new(epoch));
        let mut tree = Applier {
            path: path.clone(),
            db: db.clone(),
            broken: broken.clone(),
            pending: pending.clone(),
            count: count.clone(),
            applied: applied.clone(),
            txn: None,
            in_txn: Vec::new(),
            unsynced: false,
        };
        let applier = WriterQueue::spawn("window-applier", APPLY_QUEUE, move |group| {
            for job in group {
                tree.handle(job);
            }
        })?;
        let mut log = Log {
            path: path.clone(),
            files,
            epoch,
            offset: 0,
            sealed_at: Instant::now(),
            applied,
            apply: applier.sender(),
            broken: broken.clone(),
            pending: pending.clone(),
            buf: Vec::new(),
        };
        let writer = WriterQueue::spawn("window-writer", crate::store::QUEUE, move |group| {
            log.apply(group)
        })?;
        Ok(WindowStore {
            writer,
            applier,
            path,
            db,
            broken,
            pending,
            count,
        })
    }

    /// Entries held (expired ones count until swept; written ones once in the tree).
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed).max(0) as usize
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why the store stopped working (a write, sync or commit failed, or one of its threads
    /// stopped), if it did: it refuses every read and write since.
    pub fn failure(&self) -> Option<String> {
        self.broken.get().cloned()
    }

    /// The value under `key`, unless absent or expired.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        if let Some(why) = self.broken.get() {
            return Err(Error::Write(why.clone()));
        }
        if let Some((value, expires)) = self.pending.lock().expect("not poisoned").get(key) {
            return Ok((*expires > now_ms()).then(|| value.clone()));
        }
        let failed = |source: redb::Error| Error::Redb {
            path: self.path.clone(),
            source: Box::new(source),
        };
        let txn = self.db.begin_read().map_err(|e| failed(e.into()))?;
        let entries = txn.open_table(ENTRIES).map_err(|e| failed(e.into()))?;
        let Some(raw) = entries.get(key).map_err(|e| failed(e.into()))? else {
            return Ok(None);
        };
        let raw = raw.value();
        let Some((expires, value)) = raw.split_first_chunk::<8>() else {
            return Ok(None);
        };
        Ok((u64::from_be_bytes(*expires) > now_ms()).then(|| value.to_vec()))
    }

    /// Writes `records`, to expire after `ttl`, and returns once they are on disk.
    pub async fn put(&self, records: Vec<(String, Vec<u8>)>, ttl: Duration) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        if let Some(why) = self.broken.get() {
            return Err(Error::Write(why.clone()));
        }
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let expires = now_ms().saturating_add(ttl_ms);
        let done = self
            .writer
            .run(|reply| Job::Put {
                records,
                expires,
                reply,
            })
            .await;
        self.stopped_if(done).map(|_| ())
    }

    /// `outcome`, after marking the store broken if it is an error: a job fails only once
    /// the store is broken already, or when a thread of the store stopped (a panic), which
    /// nothing else would mark, and then `/readyz` and every later call must know.
    fn stopped_if<T>(&self, outcome: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &outcome
            && self.broken.get().is_none()
        {
            tracing::error!(store = %self.path, error = %e, "a thread of the idempotency window stopped; the store refuses from now on");
            let _ = self.broken.set(format!("{}: {e}", self.path));
        }
        outcome
    }

    /// Removes expired entries, [`SWEEP_CHUNK`] per write transaction; returns how many.
    pub async fn sweep(&self) -> Result<usize, Error> {
        let mut removed = 0;
        loop {
            let done = self.stopped_if(self.applier.run(Apply::Sweep).await)?;
            removed += done.changed;
            if !done.more {
                return Ok(removed);
            }
        }
    }

    /// Returns once everything handed over so far is in the tree and on disk.
    pub async fn flush(&self) -> Result<(), Error> {
        let done = self.writer.run(|reply| Job::Flush { reply }).await;
        self.stopped_if(done).map(|_| ())
    }
}

/// The writer thread's side of the store: the log.
struct Log {
    path: String,
    files: [File; 2],
    /// The epoch being written, in `files[epoch % 2]` from `offset` on.
    epoch: u64,
    offset: u64,
    sealed_at: Instant,
    /// Every epoch below this one is durably in the tree (the applier raises it).
    applied: Arc<AtomicU64>,
    apply: mpsc::Sender<Apply>,
    broken: Broken,
    pending: Pending,
    /// One record being encoded, reused.
    buf: Vec<u8>,
}

impl Log {
    /// Logs the entries of one group of jobs as one record and syncs, hands them to the
    /// applier, and answers each job.
    fn apply(&mut self, group: Vec<Job>) {
        let mut puts = Vec::new();
        let mut waiting = Vec::with_capacity(group.len());
        let mut flushes = Vec::new();
        for job in group {
            match job {
                Job::Put {
                    records,
                    expires,
                    reply,
                } => {
                    waiting.push((reply, records.len()));
                    puts.extend(records.into_iter().map(|(k, v)| (k, v, expires)));
                }
                Job::Flush { reply } => flushes.push(reply),
            }
        }
        let logged = match self.broken.get() {
            Some(why) => Err(why.clone()),
            None => self.append(&puts).map_err(|e| {
                let why = format!("{}: {e}", self.path);
                tracing::error!(store = %self.path, error = %e, "the idempotency window's log failed; the store refuses from now on");
                let _ = self.broken.set(why.clone());
                why
            }),
        };
        if logged.is_ok() && !puts.is_empty() {
            // On disk: from now on reads see them (before the requests are answered).
            {
                let mut pending = self.pending.lock().expect("not poisoned");
                for (key, value, expires) in &puts {
                    pending.insert(key.clone(), (value.clone(), *expires));
                }
            }
            self.hand_over(Apply::Put(puts));
        }
        if logged.is_ok() && (!flushes.is_empty() || self.due()) {
            self.seal();
        }
        for (reply, changed) in waiting {
            // A requester that went away no longer needs the answer.
            let _ = reply.send(logged.clone().map(|()| Done {
                changed,
                more: false,
            }));
        }
        for reply in flushes {
            match &logged {
                Ok(()) => self.hand_over(Apply::Flush(reply)),
                Err(why) => {
                    let _ = reply.send(Err(why.clone()));
                }
            }
        }
    }

    /// Appends `puts` as one record of the current epoch and syncs it.
    fn append(&mut self, puts: &[(String, Vec<u8>, u64)]) -> std::io::Result<()> {
        if puts.is_empty() {
            return Ok(());
        }
        encode_record(&mut self.buf, self.epoch, puts)?;
        let started = Instant::now();
        let file = &self.files[(self.epoch % 2) as usize];
        file.write_all_at(&self.buf, self.offset)?;
        file.sync_data()?;
        let took = started.elapsed();
        if took > SLOW_SYNC {
            tracing::warn!(store = %self.path, keys = puts.len(), ms = took.as_millis() as u64, "slow log sync: publishes wait for it");
        }
        self.offset += self.buf.len() as u64;
        Ok(())
    }

    /// Whether the current epoch is old or long enough to seal.
    fn due(&self) -> bool {
        self.offset > 0 && (self.sealed_at.elapsed() >= SEAL_EVERY || self.offset >= SEAL_BYTES)
    }

    /// Seals the current epoch and goes on with the next in the other file, if the tree
    /// already holds what that file has (else the current epoch goes on growing until it does).
    fn seal(&mut self) {
        if self.offset == 0 || self.applied.load(Ordering::Acquire) < self.epoch {
            return;
        }
        self.hand_over(Apply::Seal(self.epoch));
        self.epoch += 1;
        self.offset = 0;
        self.sealed_at = Instant::now();
    }

    /// Hands `job` to the applier, waiting while its queue is full.
    fn hand_over(&self, job: Apply) {
        if let Err(mpsc::error::SendError(job)) = self.apply.blocking_send(job) {
            let why = format!("{}: the applier thread stopped", self.path);
            tracing::error!(store = %self.path, "the idempotency window's applier thread stopped; the store refuses from now on");
            let _ = self.broken.set(why.clone());
            if let Apply::Flush(reply) | Apply::Sweep(reply) = job {
                let _ = reply.send(Err(why));
            }
        }
    }
}

/// The applier thread's side of the store: the tree.
struct Applier {
    path: String,
    db: Arc<redb::Database>,
    broken: Broken,
    pending: Pending,
    count: Arc<AtomicI64>,
    applied: Arc<AtomicU64>,
    /// The open write transaction, and the entries written in it (to leave `pending` once
    /// it commits).
    txn: Option<redb::WriteTransaction>,
    in_txn: Vec<(String, Vec<u8>, u64)>,
    /// A commit without a sync happened since the last durable one.
    unsynced: bool,
}

impl Drop for Applier {
    /// The queue closed (the store is dropped): everything handed over goes into the tree
    /// durably, for the next open.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = self.commit(Durability::Immediate);
        }
    }
}

impl Applier {
    fn handle(&mut self, job: Apply) {
        if let Some(why) = self.broken.get() {
            if let Apply::Flush(reply) | Apply::Sweep(reply) = job {
                let _ = reply.send(Err(why.clone()));
            }
            return;
        }
        match job {
            Apply::Put(puts) => {
                let inserted = self.in_open_txn(|txn| {
                    let mut entries = txn.open_table(ENTRIES)?;
                    let mut by_expiry = txn.open_table(BY_EXPIRY)?;
                    let mut added = 0;
                    for (key, value, expires) in &puts {
                        added += insert(&mut entries, &mut by_expiry, key, value, *expires)?;
                    }
                    Ok(added)
                });
                if let Some(added) = inserted {
                    self.count.fetch_add(added, Ordering::Relaxed);
                    self.in_txn.extend(puts);
                    if self.in_txn.len() >= APPLY_CHUNK {
                        let _ = self.commit(Durability::None);
                    }
                }
            }
            Apply::Seal(epoch) => {
                let marked = self.in_open_txn(|txn| {
                    txn.open_table(META)?.insert(LOG_EPOCH, epoch + 1)?;
                    Ok(())
                });
                if marked.is_some() && self.commit(Durability::Immediate).is_ok() {
                    self.applied.store(epoch + 1, Ordering::Release);
                }
            }
            Apply::Flush(reply) => {
                let _ = reply.send(self.commit(Durability::Immediate).map(|()| Done::default()));
            }
            Apply::Sweep(reply) => {
                let swept = self.in_open_txn(|txn| {
                    let mut entries = txn.open_table(ENTRIES)?;
                    let mut by_expiry = txn.open_table(BY_EXPIRY)?;
                    sweep(&mut entries, &mut by_expiry, now_ms())
                });
                let Some(swept) = swept else {
                    let why = self.broken.get().cloned().unwrap_or_default();
                    let _ = reply.send(Err(why));
                    return;
                };
                self.count
                    .fetch_sub(swept.removed as i64, Ordering::Relaxed);
                // Removals need no sync: after a crash they are swept again.
                let _ = reply.send(self.commit(Durability::None).map(|()| Done {
                    changed: swept.removed,
                    more: swept.more,
                }));
            }
        }
    }

    /// Runs `work` in the open write transaction (beginning one if none is open); `None`
    /// once the store is broken (and then broken by this failure).
    fn in_open_txn<T>(
        &mut self,
        work: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Option<T> {
        let txn = match self.txn.take() {
            Some(txn) => txn,
            None => match self.db.begin_write() {
                Ok(txn) => txn,
                Err(e) => {
                    self.fail(e.into());
                    return None;
                }
            },
        };
        match work(&txn) {
            Ok(done) => {
                self.txn = Some(txn);
                Some(done)
            }
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    /// Commits the open transaction (if any) with `durability`; its entries leave `pending`.
    fn commit(&mut self, durability: Durability) -> Result<(), String> {
        if let Some(why) = self.broken.get() {
            return Err(why.clone());
        }
        let durable = matches!(durability, Durability::Immediate);
        let txn = match self.txn.take() {
            Some(txn) => Some(txn),
            // Nothing open, but earlier commits wait for a sync: an empty durable commit
            // makes them durable.
            None if durable && self.unsynced => match self.db.begin_write() {
                Ok(txn) => Some(txn),
                Err(e) => {
                    self.fail(e.into());
                    return Err(self.broken.get().cloned().unwrap_or_default());
                }
            },
            None => None,
        };
        let Some(mut txn) = txn else {
            return Ok(());
        };
        let started = Instant::now();
        let committed = txn
            .set_durability(durability)
            .map_err(redb::Error::from)
            .and_then(|()| {
                txn.set_quick_repair(durable && QUICK_REPAIR);
                txn.commit().map_err(redb::Error::from)
            });
        if let Err(e) = committed {
            self.fail(e);
            return Err(self.broken.get().cloned().unwrap_or_default());
        }
        self.unsynced = !durable;
        let took = started.elapsed();
        if durable && took > SLOW_SYNC {
            tracing::debug!(store = %self.path, ms = took.as_millis() as u64, "slow durable commit of the tree (no publish waits for it)");
        }
        // In the tree now: no longer pending. A key handed over again since keeps its newer
        // pending value until that one is in.
        let mut pending = self.pending.lock().expect("not poisoned");
        for (key, value, expires) in self.in_txn.drain(..) {
            if pending
                .get(&key)
                .is_some_and(|(v, e)| *v == value && *e == expires)
            {
                pending.remove(&key);
            }
        }
        Ok(())
    }

    fn fail(&mut self, e: redb::Error) {
        self.txn = None;
        let why = format!("{}: {e}", self.path);
        tracing::error!(store = %self.path, error = %e, "the idempotency window's tree failed; the store refuses from now on");
        let _ = self.broken.set(why);
    }
}

/// Inserts an entry and its index entry; 1 if the key is new.
fn insert(
    entries: &mut redb::Table<&str, &[u8]>,
    by_expiry: &mut redb::Table<&[u8], ()>,
    key: &str,
    value: &[u8],
    expires: u64,
) -> Result<i64, redb::Error> {
    let mut stored = Vec::with_capacity(8 + value.len());
    stored.extend_from_slice(&expires.to_be_bytes());
    stored.extend_from_slice(value);
    let new = entries.insert(key, stored.as_slice())?.is_none();
    let mut index = Vec::with_capacity(8 + key.len());
    index.extend_from_slice(&expires.to_be_bytes());
    index.extend_from_slice(key.as_bytes());
    by_expiry.insert(index.as_slice(), ())?;
    Ok(new as i64)
}

/// Opens (or creates) the tree in `dir` and replays the log into it: the tree, the log's
/// files, the epoch to write next, and the entries held.
fn open_tree(dir: &Path, path: &str) -> Result<(redb::Database, [File; 2], u64, u64), Error> {
    let failed = |source: redb::Error| Error::Redb {
        path: path.to_string(),
        source: Box::new(source),
    };
    std::fs::create_dir_all(dir).map_err(|e| failed(e.into()))?;
    let db = redb::Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(dir.join(FILE))
        .map_err(|e| failed(e.into()))?;
    let (files, epoch) = recover(dir, &db).map_err(|e| Error::Write(format!("{path}: {e}")))?;
    let count = {
        let txn = db.begin_read().map_err(|e| failed(e.into()))?;
        let entries = txn.open_table(ENTRIES).map_err(|e| failed(e.into()))?;
        entries.len().map_err(|e| failed(e.into()))?
    };
    Ok((db, files, epoch, count))
}

/// Encodes `puts` as one log record of `epoch` into `buf` (cleared first); refuses a record
/// whose length does not fit its header (4 GiB; a publish body is far smaller).
fn encode_record(
    buf: &mut Vec<u8>,
    epoch: u64,
    puts: &[(String, Vec<u8>, u64)],
) -> std::io::Result<()> {
    buf.clear();
    buf.resize(RECORD_HEADER, 0);
    for (key, value, expires) in puts {
        buf.extend_from_slice(&expires.to_le_bytes());
        buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
        buf.extend_from_slice(value);
    }
    let payload_len = u32::try_from(buf.len() - RECORD_HEADER)
        .map_err(|_| std::io::Error::other("a log record over 4 GiB"))?;
    buf[0..4].copy_from_slice(&payload_len.to_le_bytes());
    buf[8..16].copy_from_slice(&epoch.to_le_bytes());
    let crc = record_crc(&buf[0..4], &buf[8..16], &buf[RECORD_HEADER..]);
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// A record's CRC-32: of its length, its epoch and its payload.
fn record_crc(len: &[u8], epoch: &[u8], payload: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(len);
    crc.update(epoch);
    crc.update(payload);
    crc.finalize()
}

/// The entries (key, value, expiry) of the records of `epoch` at the start of `log`, up to
/// the first that is torn, fails its CRC or is of another epoch.
fn decode_records(log: &[u8], epoch: u64) -> Vec<(&str, &[u8], u64)> {
    let mut found = Vec::new();
    let mut rest = log;
    while let Some((header, after)) = rest.split_first_chunk::<RECORD_HEADER>() {
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        let record_epoch = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
        let Some(payload) = after.get(..len) else {
            break;
        };
        if record_epoch != epoch || record_crc(&header[0..4], &header[8..16], payload) != crc {
            break;
        }
        let Some(entries) = decode_entries(payload) else {
            break;
        };
        found.extend(entries);
        rest = &after[len..];
    }
    found
}

/// A record's payload as entries; `None` if it does not parse (its CRC matched, so only a
/// writer of another format could have written it).
fn decode_entries(mut payload: &[u8]) -> Option<Vec<(&str, &[u8], u64)>> {
    let mut entries = Vec::new();
    while !payload.is_empty() {
        let (expires, rest) = payload.split_first_chunk::<8>()?;
        let (key_len, rest) = rest.split_first_chunk::<4>()?;
        let key_len = u32::from_le_bytes(*key_len) as usize;
        let key = std::str::from_utf8(rest.get(..key_len)?).ok()?;
        let rest = &rest[key_len..];
        let (value_len, rest) = rest.split_first_chunk::<4>()?;
        let value_len = u32::from_le_bytes(*value_len) as usize;
        let value = rest.get(..value_len)?;
        entries.push((key, value, u64::from_le_bytes(*expires)));
        payload = &rest[value_len..];
    }
    Some(entries)
}

/// Opens the log's files (creating them), puts into the tree the records of the epochs it
/// does not hold yet, and commits that durably; returns the files and the epoch to write next.
fn recover(dir: &Path, db: &redb::Database) -> Result<([File; 2], u64), String> {
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(name))
            .map_err(|e| format!("opening {name}: {e}"))
    };
    let created = LOG_FILES.iter().any(|name| !dir.join(name).exists());
    let files = [open(LOG_FILES[0])?, open(LOG_FILES[1])?];
    if created {
        // The new files' names, durable before anything is acknowledged from them.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("syncing {}: {e}", dir.display()))?;
    }
    let redb_failed = |e: redb::Error| format!("replaying the log: {e}");
    let first = {
        let txn = db.begin_read().map_err(|e| redb_failed(e.into()))?;
        match txn.open_table(META) {
            Ok(meta) => meta
                .get(LOG_EPOCH)
                .map_err(|e| redb_failed(e.into()))?
                .map(|e| e.value())
                .unwrap_or(0),
            Err(redb::TableError::TableDoesNotExist(_)) => 0,
            Err(e) => return Err(redb_failed(e.into())),
        }
    };
    // The epoch the tree lacks, and the one after it (written while that one waited to be
    // taken in); never further (the writer does not go further ahead). In commits of
    // APPLY_CHUNK entries without a sync (a transaction's pages stay in memory until it
    // commits), then one durable commit that also records them as taken in.
    let mut replayed = 0;
    let write = |chunk: &mut Vec<(&str, &[u8], u64)>, last: Option<u64>| {
        if chunk.is_empty() && last.is_none() {
            return Ok(());
        }
        let mut txn = db.begin_write()?;
        match last {
            Some(_) => txn.set_quick_repair(QUICK_REPAIR),
            None => txn.set_durability(Durability::None)?,
        }
        {
            // Created here on a new store, so that reads find the tables before any write.
            let mut entries = txn.open_table(ENTRIES)?;
            let mut by_expiry = txn.open_table(BY_EXPIRY)?;
            let mut meta = txn.open_table(META)?;
            for (key, value, expires) in chunk.drain(..) {
                insert(&mut entries, &mut by_expiry, key, value, expires)?;
            }
            if let Some(next) = last {
                meta.insert(LOG_EPOCH, next)?;
            }
        }
        txn.commit()?;
        Ok::<(), redb::Error>(())
    };
    for epoch in [first, first + 1] {
        let mut log = Vec::new();
        std::io::Read::read_to_end(&mut &files[(epoch % 2) as usize], &mut log)
            .map_err(|e| format!("reading the log: {e}"))?;
        // Its entries borrow from this file's buffer.
        let mut chunk = Vec::with_capacity(APPLY_CHUNK);
        for entry in decode_records(&log, epoch) {
            chunk.push(entry);
            replayed += 1;
            if chunk.len() == APPLY_CHUNK {
                write(&mut chunk, None).map_err(redb_failed)?;
            }
        }
        write(&mut chunk, None).map_err(redb_failed)?;
    }
    if replayed > 0 {
        tracing::info!(store = %dir.display(), entries = replayed, "replayed the idempotency window's log");
    }
    // Both epochs are in the tree with this commit: the next is written into file
    // `first % 2` again, whose records it no longer needs.
    let next = first + 2;
    write(&mut Vec::new(), Some(next)).map_err(redb_failed)?;
    Ok((files, next))
}

/// Removes the entries of up to [`SWEEP_CHUNK`] index entries expired by `now` (a key written
/// again since with a later expiry stays).
fn sweep(
    entries: &mut redb::Table<&str, &[u8]>,
    by_expiry: &mut redb::Table<&[u8], ()>,
    now: u64,
) -> Result<Swept, redb::Error> {
    let upto = now.to_be_bytes();
    let expired: Vec<Vec<u8>> = by_expiry
        .range::<&[u8]>(..upto.as_slice())?
        .take(SWEEP_CHUNK)
        .map(|entry| entry.map(|(index, _)| index.value().to_vec()))
        .collect::<Result<_, _>>()?;
    let mut removed = 0;
    for index in &expired {
        by_expiry.remove(index.as_slice())?;
        let Some(key) = index.get(8..).and_then(|k| std::str::from_utf8(k).ok()) else {
            continue;
        };
        // Written again since with a later expiry: kept then.
        let live = entries.get(key)?.map(|raw| {
            raw.value()
                .first_chunk::<8>()
                .map(|e| u64::from_be_bytes(*e))
                > Some(now)
        });
        if live == Some(false) {
            entries.remove(key)?;
            removed += 1;
        }
    }
    Ok(Swept {
        removed,
        more: expired.len() == SWEEP_CHUNK,
    })
}

/// What one chunk of a sweep did.
struct Swept {
    removed: usize,
    /// The chunk was full: there may be more to remove.
    more: bool,
}

/// Copies the live entries of the sled store in `dir` (what agentbus before this version
/// wrote there) into `db`, then removes sled's files; returns how many entries it copied.
fn take_over_sled(dir: &Path, db: &redb::Database) -> Result<usize, String> {
    let sled = sled::Config::new()
        .path(dir)
        .open()
        .map_err(|e| format!("opening the sled store to take it over: {e}"))?;
    let old = sled
        .open_tree("entries")
        .map_err(|e| format!("reading the sled store: {e}"))?;
    let now = now_ms();
    let mut taken = 0;
    let mut batch: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let write = |batch: &mut Vec<(Vec<u8>, Vec<u8>)>| -> Result<usize, redb::Error> {
        let txn = db.begin_write()?;
        let mut written = 0;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut by_expiry = txn.open_table(BY_EXPIRY)?;
            for (key, raw) in batch.drain(..) {
                let Ok(key) = std::str::from_utf8(&key) else {
                    continue;
                };
                // Only live entries are batched: at least their 8 bytes of expiry.
                let (expires, value) = raw.split_at(8);
                let expires = u64::from_be_bytes(expires.try_into().expect("8 bytes"));
                written += insert(&mut entries, &mut by_expiry, key, value, expires)? as usize;
            }
        }
        txn.commit()?;
        Ok(written)
    };
    for entry in old.iter() {
        let (key, raw) = entry.map_err(|e| format!("reading the sled store: {e}"))?;
        let live = raw
            .first_chunk::<8>()
            .is_some_and(|e| u64::from_be_bytes(*e) > now);
        if live {
            batch.push((key.to_vec(), raw.to_vec()));
        }
        if batch.len() == 10_000 {
            taken += write(&mut batch).map_err(|e| e.to_string())?;
        }
    }
    taken += write(&mut batch).map_err(|e| e.to_string())?;
    drop(old);
    drop(sled);
    // Only once the copy is committed: a crash before here takes the store over again.
    for name in ["conf", "db", "blobs"] {
        let file = dir.join(name);
        let removed = if file.is_dir() {
            std::fs::remove_dir_all(&file)
        } else {
            std::fs::remove_file(&file)
        };
        if let Err(e) = removed
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(format!("removing the sled store's {}: {e}", file.display()));
        }
    }
    for entry in std::fs::read_dir(dir).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.file_name().to_string_lossy().starts_with("snap.") {
            std::fs::remove_file(entry.path()).map_err(|e| e.to_string())?;
        }
    }
    Ok(taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_survive_a_reopen_read_as_absent_once_expired_and_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = WindowStore::open(dir.path()).unwrap();
            store
                .put(
                    vec![("old".into(), b"1".to_vec())],
                    Duration::from_millis(50),
                )
                .await
                .unwrap();
            store
                .put(
                    vec![("new".into(), b"2".to_vec())],
                    Duration::from_secs(3600),
                )
                .await
                .unwrap();
            assert_eq!(store.get("old").unwrap(), Some(b"1".to_vec()));
        }
        let store = WindowStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 2);
        assert_eq!(store.get("new").unwrap(), Some(b"2".to_vec()));
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert_eq!(store.get("old").unwrap(), None);
        assert_eq!(store.sweep().await.unwrap(), 1);
        assert_eq!(store.len(), 1);
        assert_eq!(store.get("new").unwrap(), Some(b"2".to_vec()));
        assert_eq!(store.get("missing").unwrap(), None);
    }

    #[tokio::test]
    async fn a_key_written_again_with_a_later_expiry_outlives_the_sweep_of_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = WindowStore::open(dir.path()).unwrap();
        store
            .put(vec![("k".into(), b"1".to_vec())], Duration::from_millis(30))
            .await
            .unwrap();
        store
            .put(vec![("k".into(), b"2".to_vec())], Duration::from_secs(3600))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(store.sweep().await.unwrap(), 0);
        assert_eq!(store.get("k").unwrap(), Some(b"2".to_vec()));
        assert_eq!(store.len(), 1);
    }

    #[tokio::test]
    async fn a_sweep_of_more_than_a_chunk_removes_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = WindowStore::open(dir.path()).unwrap();
        let records: Vec<_> = (0..SWEEP_CHUNK * 2 + 7)
            .map(|i| (format!("key-{i}"), vec![1; 40]))
            .collect();
        store.put(records, Duration::from_millis(20)).await.unwrap();
        store
            .put(
                vec![("kept".into(), b"x".to_vec())],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(store.sweep().await.unwrap(), SWEEP_CHUNK * 2 + 7);
        assert_eq!(store.len(), 1);
        assert_eq!(store.get("key-0").unwrap(), None);
        assert_eq!(store.get("kept").unwrap(), Some(b"x".to_vec()));
    }

    #[tokio::test]
    async fn the_live_keys_of_an_earlier_sled_store_are_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What the idempotency store of earlier versions wrote: sled, an entry (expiry ‖
            // value) and an index entry (expiry ‖ key) per key.
            let db = sled::open(dir.path()).unwrap();
            let entries = db.open_tree("entries").unwrap();
            let index = db.open_tree("entries_by_expiry").unwrap();
            for (key, value, expires) in [("live", b"v", now_ms() + 3_600_000), ("gone", b"w", 1)] {
                let mut stored = expires.to_be_bytes().to_vec();
                stored.extend_from_slice(value);
                entries.insert(key, stored).unwrap();
                let mut by_expiry = expires.to_be_bytes().to_vec();
                by_expiry.extend_from_slice(key.as_bytes());
                index.insert(by_expiry, &[]).unwrap();
            }
            db.flush().unwrap();
        }
        {
            let store = WindowStore::open(dir.path()).unwrap();
            assert_eq!(store.len(), 1);
            assert_eq!(store.get("live").unwrap(), Some(b"v".to_vec()));
            assert_eq!(store.get("gone").unwrap(), None);
        }
        assert!(!dir.path().join("conf").exists());
        assert!(!dir.path().join("db").exists());
        // And the next open finds only its own file.
        let store = WindowStore::open(dir.path()).unwrap();
        assert_eq!(store.get("live").unwrap(), Some(b"v".to_vec()));
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut files = files;
        files.sort();
        assert_eq!(files, vec![LOG_FILES[0], LOG_FILES[1], FILE]);
    }

    fn far() -> u64 {
        now_ms() + 3_600_000
    }

    #[tokio::test]
    async fn the_log_s_records_are_replayed_up_to_the_first_torn_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut log0 = Vec::new();
        let mut record = Vec::new();
        for (key, value) in [("a", b"1"), ("b", b"2")] {
            encode_record(&mut record, 0, &[(key.into(), value.to_vec(), far())]).unwrap();
            log0.extend_from_slice(&record);
        }
        // Torn: its last byte never reached the disk. What follows was never acknowledged.
        encode_record(&mut record, 0, &[("torn".into(), b"3".to_vec(), far())]).unwrap();
        log0.extend_from_slice(&record[..record.len() - 1]);
        encode_record(&mut record, 0, &[("after".into(), b"4".to_vec(), far())]).unwrap();
        log0.extend_from_slice(&record);
        let mut log1 = Vec::new();
        encode_record(&mut record, 1, &[("c".into(), b"5".to_vec(), far())]).unwrap();
        log1.extend_from_slice(&record);
        // A record of another epoch (left from an earlier turn of the file) ends the epoch.
        encode_record(&mut record, 7, &[("stale".into(), b"6".to_vec(), far())]).unwrap();
        log1.extend_from_slice(&record);
        std::fs::write(dir.path().join(LOG_FILES[0]), &log0).unwrap();
        std::fs::write(dir.path().join(LOG_FILES[1]), &log1).unwrap();
        {
            let store = WindowStore::open(dir.path()).unwrap();
            assert_eq!(store.get("a").unwrap(), Some(b"1".to_vec()));
            assert_eq!(store.get("b").unwrap(), Some(b"2".to_vec()));
            assert_eq!(store.get("c").unwrap(), Some(b"5".to_vec()));
            for absent in ["torn", "after", "stale"] {
                assert_eq!(store.get(absent).unwrap(), None, "{absent}");
            }
            assert_eq!(store.len(), 3);
            // Written (in epoch 2, over the first file's old records) and found after a reopen.
            store
                .put(vec![("d".into(), b"7".to_vec())], Duration::from_secs(60))
                .await
                .unwrap();
        }
        let store = WindowStore::open(dir.path()).unwrap();
        assert_eq!(store.len(), 4);
        for (key, value) in [("a", b"1"), ("c", b"5"), ("d", b"7")] {
            assert_eq!(store.get(key).unwrap(), Some(value.to_vec()), "{key}");
        }
        assert_eq!(store.get("torn").unwrap(), None);
    }

    #[tokio::test]
    async fn acknowledged_writes_the_tree_had_not_taken_in_at_a_crash_are_found_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        {
            let store = WindowStore::open(dir.path()).unwrap();
            // The tree as it is on disk now, before the writes (nothing is being committed:
            // the applier has nothing yet).
            std::fs::copy(dir.path().join(FILE), image.path().join(FILE)).unwrap();
            for i in 0..3 {
                store
                    .put(
                        vec![(format!("key-{i}"), vec![i as u8])],
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap();
            }
            // Acknowledged, so in the log: the crash's image is that tree and these logs.
            for name in LOG_FILES {
                std::fs::copy(dir.path().join(name), image.path().join(name)).unwrap();
            }
        }
        let store = WindowStore::open(image.path()).unwrap();
        for i in 0..3 {
            assert_eq!(store.get(&format!("key-{i}")).unwrap(), Some(vec![i as u8]));
        }
        assert_eq!(store.len(), 3);
    }

    #[tokio::test]
    async fn an_epoch_is_sealed_once_old_and_the_tree_then_records_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = WindowStore::open(dir.path()).unwrap();
        let epoch = |store: &WindowStore| {
            let txn = store.db.begin_read().unwrap();
            let meta = txn.open_table(META).unwrap();
            meta.get(LOG_EPOCH).unwrap().map(|e| e.value())
        };
        // A fresh store has taken in epochs 0 and 1 (empty): 2 is written next.
        assert_eq!(epoch(&store), Some(2));
        store
            .put(
                vec![("first".into(), b"1".to_vec())],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        tokio::time::sleep(SEAL_EVERY + Duration::from_millis(50)).await;
        store
            .put(
                vec![("second".into(), b"2".to_vec())],
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        store.flush().await.unwrap();
        // Sealed by the second put at least (by the first too if it came a second after the
        // open, on a slow machine).
        assert!(epoch(&store).unwrap() >= 3, "{:?}", epoch(&store));
        assert!(store.pending.lock().unwrap().is_empty());
        assert_eq!(store.len(), 2);
        assert_eq!(store.get("first").unwrap(), Some(b"1".to_vec()));
    }

    #[test]
    fn a_record_decodes_to_what_was_encoded_and_garbage_to_nothing() {
        let mut record = Vec::new();
        let puts = vec![
            ("k\u{e9}y".to_string(), vec![0, 1, 2], 42),
            (String::new(), vec![], 7),
        ];
        encode_record(&mut record, 5, &puts).unwrap();
        let decoded = decode_records(&record, 5);
        let expected: Vec<(&str, &[u8], u64)> = puts
            .iter()
            .map(|(k, v, e)| (k.as_str(), v.as_slice(), *e))
            .collect();
        assert_eq!(decoded, expected);
        assert!(decode_records(&record, 4).is_empty());
        for cut in 0..record.len() {
            assert!(decode_records(&record[..cut], 5).is_empty(), "cut at {cut}");
        }
        let mut flipped = record.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode_records(&flipped, 5).is_empty());
        assert!(decode_records(&[0xff; 64], 5).is_empty());
    }

    #[tokio::test]
    async fn a_log_that_cannot_be_written_breaks_the_store_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = WindowStore::open(dir.path()).unwrap();
        assert_eq!(store.failure(), None);
        let log = dir.path().join(LOG_FILES[0]);
        // Immutable (root ignores file permissions, not this): the next append fails.
        let chattr = |flag: &str| {
            std::process::Command::new("chattr")
                .args([flag, log.to_str().unwrap()])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !chattr("+i") {
            eprintln!("chattr is not available here: nothing to check");
            return;
        }
        let put = store
            .put(vec![("k".into(), b"v".to_vec())], Duration::from_secs(60))
            .await;
        chattr("-i");
        assert!(put.is_err(), "{put:?}");
        let why = store.failure().expect("the store says why it stopped");
        // The store's directory and what the OS said.
        assert!(why.contains(&dir.path().display().to_string()), "{why}");
        assert!(why.contains("not permitted"), "{why}");
        assert!(store.get("k").is_err(), "a broken store refuses reads too");
    }

    #[tokio::test]
    async fn a_damaged_tree_file_is_an_error_at_open_not_a_panic() {
        // A file that is no database at all, and one whose pages after the header were
        // overwritten: either way `open` answers an error naming the store.
        let garbage = tempfile::tempdir().unwrap();
        std::fs::write(garbage.path().join(FILE), vec![0x5a; 64 * 1024]).unwrap();
        let opened = std::panic::catch_unwind(|| WindowStore::open(garbage.path()).map(|_| ()));
        let answer = opened.expect("no panic");
        assert!(answer.is_err(), "{answer:?}");

        let damaged = tempfile::tempdir().unwrap();
        {
            let store = WindowStore::open(damaged.path()).unwrap();
            let keys = (0..2000)
                .map(|i| (format!("key-{i}"), vec![7u8; 40]))
                .collect();
            store.put(keys, Duration::from_secs(3600)).await.unwrap();
            store.flush().await.unwrap();
        }
        let file = damaged.path().join(FILE);
        let mut bytes = std::fs::read(&file).unwrap();
        for b in bytes.iter_mut().skip(4096) {
            *b ^= 0xa5;
        }
        std::fs::write(&file, bytes).unwrap();
        for log in LOG_FILES {
            std::fs::write(damaged.path().join(log), b"").unwrap();
        }
        let opened = std::panic::catch_unwind(|| {
            let store = WindowStore::open(damaged.path())?;
            store.get("key-1").map(|_| ())
        });
        let answer = opened.expect("no panic");
        let why = answer.expect_err("a damaged file is an error").to_string();
        assert!(
            why.contains("damaged") && why.contains("move it away"),
            "{why}"
        );
    }
}

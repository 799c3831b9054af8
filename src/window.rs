//! The publish idempotency window on disk: key → value entries that expire, in one redb file
//! (`window.redb` in the store's directory), plus an index ordered by expiry so that a sweep
//! costs what it removes.
//!
//! Why not sled, as the agents' dedup stores (`crate::store`): sled 0.34 keeps a record in
//! memory for every page it ever wrote, so its memory grows with the keys held, about 30
//! bytes per idempotency key; a day's window at 5 000 events/s is 432 M keys. redb is a
//! copy-on-write B-tree whose only memory is a bounded page cache ([`CACHE_BYTES`]): the
//! window's keys live on disk and in the kernel's page cache, not in the process.
//!
//! Every write goes through one writer thread that takes what has queued up into one write
//! transaction and commits it durably (group commit, one commit's fsyncs for all of it): a
//! write returns only once it is on disk. Quick repair is on: each commit also records the
//! allocator's state, so that opening after a crash takes milliseconds instead of a walk of
//! the whole file.
//!
//! A directory that holds a sled store of an earlier version is taken over on open: its live
//! entries are copied into the new file, then sled's files are removed.

use std::{
    collections::HashMap,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use crate::store::{Error, WriterQueue, now_ms};

/// key → expiry (8 bytes, big-endian ms since the epoch) ‖ value.
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("entries");
/// expiry (8 bytes, big-endian) ‖ key → nothing.
const BY_EXPIRY: TableDefinition<&[u8], ()> = TableDefinition::new("entries_by_expiry");

/// The file in the store's directory.
pub const FILE: &str = "window.redb";

/// redb's page cache. The keys are read once per publish (is it a repeat?) and written once:
/// a cache holds the B-tree's upper levels, the leaves come from the kernel's page cache.
const CACHE_BYTES: usize = 8 * 1024 * 1024;

/// Expired keys removed in one write transaction at most: a transaction holds every page it
/// changes in memory until it commits, and expired keys are spread over the whole tree.
pub const SWEEP_CHUNK: usize = 2000;

/// Quick repair: each commit also records the allocator state (a second fsync), so opening after
/// a crash is instant instead of a walk of the whole file (see the module's note).
const QUICK_REPAIR: bool = true;

/// A commit that takes longer is logged: every publish of its group waits for it.
const SLOW_COMMIT: Duration = Duration::from_millis(100);

/// The store. Entries read as absent once expired, and are removed by [`WindowStore::sweep`].
pub struct WindowStore {
    path: String,
    db: Arc<redb::Database>,
    /// Why a commit failed: from then on the store refuses reads and writes, so that nobody
    /// goes on as if it remembered.
    broken: Arc<std::sync::OnceLock<String>>,
    /// Handed to the writer but not yet committed: `get` sees them at once.
    pending: Pending,
    count: Arc<AtomicI64>,
    writer: WriterQueue<Job>,
}

type Pending = Arc<Mutex<HashMap<String, Vec<u8>>>>;

/// What a job did: entries written or removed, and for a sweep whether there is more.
#[derive(Clone, Copy, Default)]
struct Done {
    changed: usize,
    more: bool,
}

enum Job {
    Put {
        records: Vec<(String, Vec<u8>)>,
        expires: u64,
        reply: oneshot::Sender<Result<Done, String>>,
    },
    Sweep {
        reply: oneshot::Sender<Result<Done, String>>,
    },
    Flush {
        reply: oneshot::Sender<Result<Done, String>>,
    },
}

impl WindowStore {
    /// Opens (or creates) the store in `dir`, taking over a sled store found there, and starts
    /// its writer thread, which ends when the store is dropped.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        let path = dir.display().to_string();
        let failed = |source: redb::Error| Error::Redb {
            path: path.clone(),
            source: Box::new(source),
        };
        std::fs::create_dir_all(dir).map_err(|e| failed(e.into()))?;
        let db = redb::Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join(FILE))
            .map_err(|e| failed(e.into()))?;
        let count = {
            let txn = db.begin_write().map_err(|e| failed(e.into()))?;
            let count = {
                // Created here, so that reads find the tables before the first write.
                let entries = txn.open_table(ENTRIES).map_err(|e| failed(e.into()))?;
                txn.open_table(BY_EXPIRY).map_err(|e| failed(e.into()))?;
                entries.len().map_err(|e| failed(e.into()))?
            };
            txn.commit().map_err(|e| failed(e.into()))?;
            count
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
        let broken = Arc::new(std::sync::OnceLock::new());
        let state = Writer {
            path: path.clone(),
            db: db.clone(),
            broken: broken.clone(),
            pending: pending.clone(),
            count: count.clone(),
        };
        let writer = WriterQueue::spawn("window-writer", move |group| state.apply(group))?;
        Ok(WindowStore {
            path,
            db,
            broken,
            pending,
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

    /// The value under `key`, unless absent or expired.
    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, Error> {
        if let Some(why) = self.broken.get() {
            return Err(Error::Write(why.clone()));
        }
        if let Some(value) = self.pending.lock().expect("not poisoned").get(key) {
            return Ok(Some(value.clone()));
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
        let expires = now_ms() + ttl.as_millis() as u64;
        {
            let mut pending = self.pending.lock().expect("not poisoned");
            for (key, value) in &records {
                pending.insert(key.clone(), value.clone());
            }
        }
        self.writer
            .run(|reply| Job::Put {
                records,
                expires,
                reply,
            })
            .await
            .map(|_| ())
    }

    /// Removes expired entries, [`SWEEP_CHUNK`] per write transaction; returns how many.
    pub async fn sweep(&self) -> Result<usize, Error> {
        let mut removed = 0;
        loop {
            let done = self.writer.run(|reply| Job::Sweep { reply }).await?;
            removed += done.changed;
            if !done.more {
                return Ok(removed);
            }
        }
    }

    /// Returns once everything handed over so far is on disk.
    pub async fn flush(&self) -> Result<(), Error> {
        self.writer
            .run(|reply| Job::Flush { reply })
            .await
            .map(|_| ())
    }
}

/// The writer thread's side of the store.
struct Writer {
    path: String,
    db: Arc<redb::Database>,
    broken: Arc<std::sync::OnceLock<String>>,
    pending: Pending,
    count: Arc<AtomicI64>,
}

impl Writer {
    /// Applies one group of jobs in one write transaction, and answers each.
    fn apply(&self, group: Vec<Job>) {
        let outcome = match self.broken.get() {
            Some(why) => Err(why.clone()),
            None => {
                let started = std::time::Instant::now();
                let committed = self.commit(&group).map_err(|e| e.to_string());
                let took = started.elapsed();
                if took > SLOW_COMMIT {
                    tracing::warn!(store = %self.path, jobs = group.len(), ms = took.as_millis() as u64, "slow commit: publishes wait for it");
                }
                committed
            }
        };
        let counts = match outcome {
            Ok(counts) => counts.into_iter().map(Ok).collect(),
            Err(why) => {
                let _ = self.broken.set(format!("{}: {why}", self.path));
                vec![Err(why); group.len()]
            }
        };
        // Committed (or failed, and then not to be seen either): no longer pending. A key
        // handed over again since keeps its newer pending value until that one commits.
        {
            let mut pending = self.pending.lock().expect("not poisoned");
            for job in &group {
                if let Job::Put { records, .. } = job {
                    for (key, value) in records {
                        if pending.get(key) == Some(value) {
                            pending.remove(key);
                        }
                    }
                }
            }
        }
        for (job, outcome) in group.into_iter().zip(counts) {
            let (Job::Put { reply, .. } | Job::Sweep { reply } | Job::Flush { reply }) = job;
            // A requester that went away no longer needs the answer.
            let _ = reply.send(outcome);
        }
    }

    /// Applies `group` in one write transaction and commits it; per job, what it changed.
    fn commit(&self, group: &[Job]) -> Result<Vec<Done>, redb::Error> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(QUICK_REPAIR);
        let mut counts = Vec::with_capacity(group.len());
        let mut added = 0i64;
        {
            let mut entries = txn.open_table(ENTRIES)?;
            let mut by_expiry = txn.open_table(BY_EXPIRY)?;
            let mut stored = Vec::new();
            let mut index = Vec::new();
            for job in group {
                counts.push(match job {
                    Job::Put {
                        records, expires, ..
                    } => {
                        for (key, value) in records {
                            stored.clear();
                            stored.extend_from_slice(&expires.to_be_bytes());
                            stored.extend_from_slice(value);
                            if entries.insert(key.as_str(), stored.as_slice())?.is_none() {
                                added += 1;
                            }
                            index.clear();
                            index.extend_from_slice(&expires.to_be_bytes());
                            index.extend_from_slice(key.as_bytes());
                            by_expiry.insert(index.as_slice(), ())?;
                        }
                        Done {
                            changed: records.len(),
                            more: false,
                        }
                    }
                    Job::Sweep { .. } => {
                        let swept = sweep(&mut entries, &mut by_expiry, now_ms())?;
                        added -= swept.removed as i64;
                        Done {
                            changed: swept.removed,
                            more: swept.more,
                        }
                    }
                    Job::Flush { .. } => Done::default(),
                });
            }
        }
        txn.commit()?;
        self.count.fetch_add(added, Ordering::Relaxed);
        Ok(counts)
    }
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
                let mut index = raw[..8].to_vec();
                index.extend_from_slice(key.as_bytes());
                if entries.insert(key, raw.as_slice())?.is_none() {
                    written += 1;
                }
                by_expiry.insert(index.as_slice(), ())?;
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
        assert_eq!(files, vec![FILE.to_string()]);
    }
}

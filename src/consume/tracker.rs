//! Which offsets of each partition are in flight, so that the stored offset only ever
//! moves past events whose outcome is final, even when lanes finish out of order.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Condvar, Mutex},
    time::{Duration, Instant},
};

#[derive(Debug, Default)]
struct Partition {
    pending: BTreeSet<i64>,
    highest: i64,
    stored: i64,
}

impl Partition {
    /// Moves `stored` up to the last offset before the first still pending (or the highest
    /// received, none pending); the new stored offset when it moved forward.
    fn store_final(&mut self) -> Option<i64> {
        let done = match self.pending.first() {
            Some(first) => first - 1,
            None => self.highest,
        };
        if done > self.stored {
            self.stored = done;
            Some(done)
        } else {
            None
        }
    }
}

/// Offsets in flight per topic and partition. Looked up by `&str` (no key is allocated per
/// event), and waiters are woken only when a partition has nothing in flight any more,
/// which is all [`Tracker::wait_idle`] waits for.
#[derive(Debug, Default)]
pub struct Tracker {
    partitions: Mutex<HashMap<String, HashMap<i32, Partition>>>,
    idle: Condvar,
}

impl Tracker {
    /// An offset was received and handed to a lane.
    pub fn begin(&self, topic: &str, partition: i32, offset: i64) {
        let mut parts = self.partitions.lock().expect("not poisoned");
        let p = partition_entry(&mut parts, topic, partition, offset);
        p.pending.insert(offset);
        p.highest = p.highest.max(offset);
    }

    /// An offset's outcome is final. Returns the offset up to which everything is final,
    /// when that moved forward: the one to store.
    pub fn complete(&self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        let mut parts = self.partitions.lock().expect("not poisoned");
        let p = parts.get_mut(topic)?.get_mut(&partition)?;
        if p.pending.remove(&offset) && p.pending.is_empty() {
            self.idle.notify_all();
        }
        p.store_final()
    }

    /// Offsets `from..=to` will never be received (skipped as unreadable): final at once.
    /// Returns the offset to store, as [`Tracker::complete`] does.
    pub fn skip(&self, topic: &str, partition: i32, from: i64, to: i64) -> Option<i64> {
        let mut parts = self.partitions.lock().expect("not poisoned");
        let p = partition_entry(&mut parts, topic, partition, from);
        p.highest = p.highest.max(to);
        self.idle.notify_all();
        p.store_final()
    }

    /// Waits until none of `partitions` has an offset in flight; false on timeout.
    pub fn wait_idle(&self, partitions: &[(String, i32)], timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut parts = self.partitions.lock().expect("not poisoned");
        loop {
            let busy = partitions.iter().any(|(t, p)| {
                parts
                    .get(t)
                    .and_then(|t| t.get(p))
                    .is_some_and(|p| !p.pending.is_empty())
            });
            if !busy {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            parts = self
                .idle
                .wait_timeout(parts, deadline - now)
                .expect("not poisoned")
                .0;
        }
    }

    /// Partitions revoked: their next assignment starts from the committed offset.
    pub fn forget(&self, partitions: &[(String, i32)]) {
        let mut parts = self.partitions.lock().expect("not poisoned");
        for (t, p) in partitions {
            if let Some(topic) = parts.get_mut(t) {
                topic.remove(p);
            }
        }
    }
}

/// The entry of `topic`/`partition`, made (as if everything before `first` were final)
/// when absent.
fn partition_entry<'a>(
    parts: &'a mut HashMap<String, HashMap<i32, Partition>>,
    topic: &str,
    partition: i32,
    first: i64,
) -> &'a mut Partition {
    if !parts.contains_key(topic) {
        parts.insert(topic.to_string(), HashMap::new());
    }
    parts
        .get_mut(topic)
        .expect("inserted above")
        .entry(partition)
        .or_insert_with(|| Partition {
            stored: first - 1,
            highest: first - 1,
            ..Partition::default()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_offset_waits_for_the_oldest_event_in_flight() {
        let t = Tracker::default();
        for o in 10..14 {
            t.begin("t", 0, o);
        }
        assert_eq!(t.complete("t", 0, 12), None);
        assert_eq!(t.complete("t", 0, 11), None);
        assert_eq!(t.complete("t", 0, 10), Some(12));
        assert!(!t.wait_idle(&[("t".into(), 0)], Duration::from_millis(10)));
        assert_eq!(t.complete("t", 0, 13), Some(13));
        assert!(t.wait_idle(&[("t".into(), 0)], Duration::from_millis(10)));
        t.forget(&[("t".into(), 0)]);
        assert_eq!(t.complete("t", 0, 14), None);
    }

    #[test]
    fn skipped_offsets_are_final_but_wait_for_the_events_in_flight_before_them() {
        let t = Tracker::default();
        t.begin("t", 0, 5);
        assert_eq!(t.skip("t", 0, 6, 9), None);
        assert_eq!(t.complete("t", 0, 5), Some(9));
        // Nothing received on the partition yet: the skip alone moves the offset.
        assert_eq!(t.skip("t", 1, 0, 3), Some(3));
        t.begin("t", 1, 4);
        assert_eq!(t.complete("t", 1, 4), Some(4));
    }
}

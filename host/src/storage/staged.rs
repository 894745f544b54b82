//! [`Staged`]: the store as raft sees it while writes are in flight.
//!
//! The raft loop hands each `Ready`'s entries to the [`Persister`] thread and
//! calls `advance_append_async` at once, so it can go on stepping messages
//! and proposals while the fsync runs. raft-rs then forgets those entries
//! ("stable") and reads them back through [`Storage`] — before they are on
//! disk. `Staged` answers those reads from an in-memory tail of the log:
//! the entries staged for writing, plus a bounded window of recent durable
//! ones, which also spares the hot path (a follower's `term` lookups, the
//! leader's appends) an LMDB read and a protobuf decode per entry.
//!
//! The tail is always a suffix of the log: staging entries at index `i`
//! drops the tail from `i` on, exactly as the write will truncate the store.
//! Reads at or above the tail's first index come from the tail; reads below
//! it come from the inner store, which pending writes never touch.
//!
//! [`Persister`]: super::persister::Persister

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use protobuf::Message as _;
use raft::prelude::{Entry, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// Durable entries kept in the tail after they reach the disk, in bytes.
/// Enough for a few round trips of appends at full speed.
pub const DURABLE_CACHE_BYTES: usize = 4 << 20;

/// The inner store plus the log's in-memory tail. Clones share the tail.
#[derive(Clone)]
pub struct Staged<S> {
    inner: S,
    tail: Arc<Mutex<Tail>>,
    /// Raft asked for a snapshot the store does not have (older than it
    /// needs, or made before the member it is for joined); the core turns
    /// it into `Action::WantSnapshot`.
    snapshot_wanted: Arc<AtomicBool>,
}

#[derive(Default)]
struct Tail {
    /// Contiguous, and always the newest part of the log.
    entries: VecDeque<Entry>,
    /// Encoded size of `entries`.
    bytes: usize,
    /// Entries at or below this index are on disk.
    durable_through: u64,
}

impl Tail {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|e| e.index)
    }

    fn get(&self, index: u64) -> Option<&Entry> {
        let first = self.first_index()?;
        self.entries.get(usize::try_from(index.checked_sub(first)?).ok()?)
    }

    fn truncate_from(&mut self, index: u64) {
        while self.last_index().is_some_and(|last| last >= index) {
            let entry = self.entries.pop_back().expect("non-empty");
            self.bytes -= entry.compute_size() as usize;
        }
    }

    /// Drop durable entries from the front while the tail is over budget.
    fn trim(&mut self) {
        while self.bytes > DURABLE_CACHE_BYTES
            && let Some(front) = self.entries.front()
            && front.index <= self.durable_through
        {
            let entry = self.entries.pop_front().expect("non-empty");
            self.bytes -= entry.compute_size() as usize;
        }
    }
}

impl<S: Storage> Staged<S> {
    pub fn new(inner: S) -> Staged<S> {
        Staged {
            inner,
            tail: Arc::default(),
            snapshot_wanted: Arc::default(),
        }
    }

    /// Whether raft asked for a snapshot the store could not give since the
    /// last call; clears the want.
    pub fn take_snapshot_want(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    fn tail(&self) -> MutexGuard<'_, Tail> {
        // The tail holds no invariant a panic elsewhere could break halfway.
        self.tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Entries about to be written: they replace the log from their first
    /// index on. They must be contiguous (raft's are).
    pub fn stage(&self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let mut tail = self.tail();
        match tail.first_index() {
            Some(tail_first) if first.index >= tail_first && first.index <= tail.last_index().unwrap_or(0) + 1 => {
                tail.truncate_from(first.index);
            }
            _ => {
                tail.entries.clear();
                tail.bytes = 0;
            }
        }
        for entry in entries {
            tail.bytes += entry.compute_size() as usize;
            tail.entries.push_back(entry.clone());
        }
        tail.durable_through = tail.durable_through.min(first.index - 1);
    }

    /// Entries at or below `index` are on disk now.
    pub fn mark_durable(&self, index: u64) {
        let mut tail = self.tail();
        tail.durable_through = index;
        tail.trim();
    }

    /// The log was replaced (a snapshot was installed): forget the tail.
    pub fn clear(&self) {
        let mut tail = self.tail();
        *tail = Tail::default();
    }
}

impl<S: Storage> Storage for Staged<S> {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.inner.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let tail = self.tail();
        let Some(tail_first) = tail.first_index().filter(|first| high > *first) else {
            drop(tail);
            return self.inner.entries(low, high, max_size, context);
        };
        if high > tail.last_index().unwrap_or(0) + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let (mut out, mut size) = (Vec::new(), 0u64);
        if low < tail_first {
            // The older part is on disk, and pending writes never touch it.
            out = self.inner.entries(low, tail_first, max_size, context)?;
            size = out.iter().map(|e| u64::from(e.compute_size())).sum();
            if out.last().is_none_or(|e| e.index + 1 < tail_first) {
                return Ok(out); // stopped by max_size
            }
        }
        for index in low.max(tail_first)..high {
            let entry = tail.get(index).expect("within the tail");
            size += u64::from(entry.compute_size());
            // raft-rs semantics: always at least one entry.
            if !out.is_empty() && max_size.is_some_and(|max| size > max) {
                break;
            }
            out.push(entry.clone());
        }
        Ok(out)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        {
            let tail = self.tail();
            if let Some(first) = tail.first_index()
                && index >= first
            {
                return match tail.get(index) {
                    Some(entry) => Ok(entry.term),
                    None => Err(raft::Error::Store(StorageError::Unavailable)),
                };
            }
        }
        self.inner.term(index)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.inner.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        if let Some(last) = self.tail().last_index() {
            return Ok(last);
        }
        self.inner.last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let snapshot = self.inner.snapshot(request_index, to);
        if let Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable)) = snapshot {
            self.snapshot_wanted.store(true, Ordering::Relaxed);
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::mem::MemStore;
    use crate::storage::{LogStore, WriteBatch};

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8; 10].into(),
            ..Default::default()
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term)).collect()
    }

    fn ctx() -> GetEntriesContext {
        GetEntriesContext::empty(false)
    }

    /// A store holding entries `range` (term 1) on disk, seen through `Staged`.
    fn on_disk(range: std::ops::RangeInclusive<u64>) -> Staged<MemStore> {
        let store = MemStore::new();
        let batch = WriteBatch {
            entries: entries(range, 1),
            ..Default::default()
        };
        store.write(batch).unwrap();
        Staged::new(store)
    }

    fn indexes_terms(entries: &[Entry]) -> Vec<(u64, u64)> {
        entries.iter().map(|e| (e.index, e.term)).collect()
    }

    #[test]
    fn staged_entries_are_readable_before_they_are_written() {
        let staged = on_disk(1..=3);
        staged.stage(&entries(4..=6, 1));

        assert_eq!(staged.last_index().unwrap(), 6);
        assert_eq!(staged.term(5).unwrap(), 1);
        // A read across the disk and the tail is seamless.
        let got = staged.entries(2, 7, None, ctx()).unwrap();
        assert_eq!(indexes_terms(&got), (2..=6).map(|i| (i, 1)).collect::<Vec<_>>());
        // Beyond the tail: not there yet.
        assert!(matches!(
            staged.term(7),
            Err(raft::Error::Store(StorageError::Unavailable))
        ));
        assert!(staged.entries(5, 8, None, ctx()).is_err());
    }

    #[test]
    fn a_new_leaders_entries_replace_the_staged_suffix_before_the_disk_sees_them() {
        let staged = on_disk(1..=5);
        staged.stage(&entries(6..=8, 1));
        // Term 2 overwrites from 7: the tail ends at 7 now.
        staged.stage(&entries(7..=7, 2));
        assert_eq!(staged.last_index().unwrap(), 7);
        assert_eq!(staged.term(6).unwrap(), 1);
        assert_eq!(staged.term(7).unwrap(), 2);
        assert!(staged.term(8).is_err());

        // Overwriting below the tail (on-disk entries 4 and 5) starts a new tail.
        staged.stage(&entries(4..=4, 3));
        assert_eq!(staged.last_index().unwrap(), 4);
        assert_eq!(staged.term(3).unwrap(), 1, "below the tail: from disk");
        assert_eq!(staged.term(4).unwrap(), 3);
        assert!(staged.term(5).is_err(), "the stale disk entry 5 is hidden");
        let got = staged.entries(1, 5, None, ctx()).unwrap();
        assert_eq!(indexes_terms(&got), vec![(1, 1), (2, 1), (3, 1), (4, 3)]);
    }

    #[test]
    fn max_size_is_honoured_across_the_disk_and_the_tail() {
        let staged = on_disk(1..=3);
        staged.stage(&entries(4..=6, 1));
        let one = u64::from(entry(1, 1).compute_size());
        // Room for two entries: stops on disk.
        assert_eq!(staged.entries(2, 7, 2 * one, ctx()).unwrap().len(), 2);
        // Room for three: crosses into the tail.
        assert_eq!(staged.entries(2, 7, 3 * one, ctx()).unwrap().len(), 3);
        // Zero: still one entry, as raft expects.
        assert_eq!(staged.entries(5, 7, 0, ctx()).unwrap().len(), 1);
    }

    #[test]
    fn durable_entries_leave_the_tail_only_past_the_cache_budget() {
        let staged = Staged::new(MemStore::new());
        let big = |index| Entry {
            index,
            term: 1,
            data: vec![0; 1 << 20].into(),
            ..Default::default()
        };
        let batch: Vec<Entry> = (1..=8).map(big).collect();
        staged.stage(&batch);
        // Not durable yet: nothing may leave, whatever the size.
        staged.mark_durable(0);
        assert_eq!(staged.tail().entries.len(), 8);
        staged.mark_durable(8);
        let tail = staged.tail();
        assert!(tail.bytes <= DURABLE_CACHE_BYTES, "{} bytes cached", tail.bytes);
        assert_eq!(tail.last_index(), Some(8), "the newest stay");
    }

    #[test]
    fn a_snapshot_the_store_cannot_serve_is_wanted_once() {
        let staged = Staged::new(MemStore::new());
        assert!(!staged.take_snapshot_want());
        // No snapshot stored: raft's request becomes a want, taken once.
        assert!(staged.snapshot(1, 2).is_err());
        assert!(staged.take_snapshot_want());
        assert!(!staged.take_snapshot_want(), "the want is cleared once taken");
        // Clones (raft's and the core's) share it.
        let clone = staged.clone();
        assert!(clone.snapshot(1, 2).is_err());
        assert!(staged.take_snapshot_want());
    }

    #[test]
    fn clear_forgets_the_tail() {
        let staged = Staged::new(MemStore::new());
        staged.stage(&entries(1..=3, 1));
        staged.clear();
        assert_eq!(staged.last_index().unwrap(), 0);
    }
}

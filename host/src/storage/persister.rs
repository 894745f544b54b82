//! The persister: one thread that makes the raft loop's writes durable.
//!
//! The loop submits a [`WriteBatch`] per `Ready` (plus the odd metadata
//! write) with a sequence number and goes on working. The thread takes
//! everything queued, merges it into one batch — group commit: one log
//! record and one sync for however many `Ready`s arrived during the
//! previous sync — writes it, and reports the highest sequence number now
//! durable. Writes land in submission order, so a report for `n` covers
//! every batch up to `n`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use protobuf::Message as _;

use super::{LogStore, StoreError, WriteBatch};

/// One merged write never grows past this many bytes of entries; the rest
/// waits for the next write. Keeps a catching-up follower's transactions
/// (and their memory) bounded.
pub const MAX_MERGED_ENTRY_BYTES: usize = 64 << 20;

/// The completion reports: `Ok(seq)` means every batch up to `seq` is
/// durable. An error is final: the thread stops after reporting it.
pub type Completion = Result<u64, StoreError>;

pub struct Persister {
    jobs: Option<std_mpsc::Sender<(u64, WriteBatch)>>,
    thread: Option<JoinHandle<()>>,
    /// Set when dropped: a write waiting for space gives up.
    stop: Arc<AtomicBool>,
}

impl Persister {
    /// Start the thread. It reports on `done` and calls `wake` after each
    /// report (the raft loop's signal to look).
    #[cfg(test)]
    pub fn start<S: LogStore>(
        store: S,
        done: std_mpsc::Sender<Completion>,
        wake: impl Fn() + Send + 'static,
    ) -> std::io::Result<Persister> {
        Persister::start_waiting_for_space(store, done, wake, |_| false, |_| {})
    }

    /// As `start`, but a write that fails for lack of space (`out_of_space`
    /// says which errors are that) is not final: nothing of it counts (a
    /// log record is allocated for before it is written, and counts only
    /// once synced; an LMDB transaction is all or nothing), so the thread
    /// tries it again
    /// every `SPACE_RETRY` until space comes back. Meanwhile nothing more
    /// becomes durable, so raft acknowledges nothing more, and the node
    /// stays up serving what it has. Only a shutdown ends the wait (with
    /// the error). `written` is told how long each write took.
    pub fn start_waiting_for_space<S: LogStore>(
        store: S,
        done: std_mpsc::Sender<Completion>,
        wake: impl Fn() + Send + 'static,
        out_of_space: impl Fn(&StoreError) -> bool + Send + 'static,
        written: impl Fn(std::time::Duration) + Send + 'static,
    ) -> std::io::Result<Persister> {
        let (jobs, queue) = std_mpsc::channel::<(u64, WriteBatch)>();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new().name("persist".into()).spawn(move || {
            let mut carried = None;
            while let Some((mut seq, mut batch)) = carried.take().or_else(|| queue.recv().ok()) {
                let mut bytes = entry_bytes(&batch);
                while bytes < MAX_MERGED_ENTRY_BYTES
                    && let Ok((next_seq, next)) = queue.try_recv()
                {
                    let next_bytes = entry_bytes(&next);
                    if bytes + next_bytes > MAX_MERGED_ENTRY_BYTES && !next.entries.is_empty() {
                        carried = Some((next_seq, next));
                        break;
                    }
                    batch.merge(next);
                    seq = next_seq;
                    bytes += next_bytes;
                }
                let started = std::time::Instant::now();
                let mut result = store.write(batch.clone());
                if result.is_ok() {
                    written(started.elapsed());
                }
                let mut waited = false;
                while let Err(error) = &result
                    && out_of_space(error)
                {
                    if !waited {
                        tracing::error!(%error, "cannot persist: out of space; retrying every second until space comes back");
                        waited = true;
                    }
                    // Wait without taking more work: it stays queued.
                    std::thread::sleep(SPACE_RETRY);
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    result = store.write(batch.clone());
                }
                if waited && result.is_ok() {
                    tracing::info!("persisting again: space came back");
                }
                let failed = result.is_err();
                let _ = done.send(result.map(|()| seq));
                wake();
                if failed {
                    return;
                }
            }
        })?;
        Ok(Persister {
            jobs: Some(jobs),
            thread: Some(thread),
            stop,
        })
    }

    /// Queue `batch` as write number `seq` (increasing).
    pub fn submit(&self, seq: u64, batch: WriteBatch) {
        if let Some(jobs) = &self.jobs {
            // If the thread stopped, it reported why; the loop stops on that.
            let _ = jobs.send((seq, batch));
        }
    }
}

impl Drop for Persister {
    /// Finish the queued writes, then stop the thread.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How often a write that failed for lack of space is tried again.
const SPACE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

fn entry_bytes(batch: &WriteBatch) -> usize {
    batch.entries.iter().map(|e| e.compute_size() as usize).sum()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use raft::Storage;
    use raft::prelude::{Entry, HardState};

    use super::*;
    use crate::storage::mem::MemStore;

    fn batch(range: std::ops::RangeInclusive<u64>, term: u64) -> WriteBatch {
        WriteBatch {
            entries: range
                .map(|index| Entry {
                    index,
                    term,
                    ..Default::default()
                })
                .collect(),
            hard_state: Some(HardState {
                term,
                commit: 0,
                vote: 1,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn wait_for(done: &std_mpsc::Receiver<Completion>, seq: u64) {
        loop {
            let reported = done
                .recv_timeout(Duration::from_secs(10))
                .expect("a report")
                .expect("written");
            if reported >= seq {
                return;
            }
        }
    }

    #[test]
    fn writes_land_in_order_and_reports_cover_everything_before_them() {
        let store = MemStore::new();
        let (tx, done) = std_mpsc::channel();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        let persister = Persister::start(store.clone(), tx, move || {
            counter.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        persister.submit(1, batch(1..=3, 1));
        persister.submit(2, batch(4..=6, 1));
        // A new leader's entries replace 5 and 6 before or after they land.
        persister.submit(3, batch(5..=5, 2));
        persister.submit(4, WriteBatch::default());
        wait_for(&done, 4);
        assert_eq!(store.last_index().unwrap(), 5);
        assert_eq!(store.term(4).unwrap(), 1);
        assert_eq!(store.term(5).unwrap(), 2);
        assert_eq!(store.initial_state().unwrap().hard_state.term, 2);
        // The wake follows the report; joining the thread waits for it.
        drop(persister);
        assert!(wakes.load(Ordering::Relaxed) >= 1);
    }

    #[test]
    fn a_failed_write_is_reported_and_stops_the_thread() {
        let store = MemStore::new();
        let (tx, done) = std_mpsc::channel();
        let persister = Persister::start(store.clone(), tx, || {}).unwrap();
        // A hole: index 5 cannot follow an empty log.
        persister.submit(1, batch(5..=5, 1));
        let report = done.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(matches!(report, Err(StoreError::Invalid(_))), "{report:?}");
        persister.submit(2, batch(1..=1, 1));
        drop(persister);
        assert!(done.try_recv().is_err(), "nothing is written after a failure");
        assert_eq!(store.last_index().unwrap(), 0);
    }

    #[test]
    fn dropping_the_persister_finishes_queued_writes() {
        let store = MemStore::new();
        let (tx, _done) = std_mpsc::channel();
        let persister = Persister::start(store.clone(), tx, || {}).unwrap();
        for seq in 1..=100 {
            persister.submit(seq, batch(seq..=seq, 1));
        }
        drop(persister);
        assert_eq!(store.last_index().unwrap(), 100);
    }
}

//! Fair turns at LMDB's one write lock.

use std::sync::Mutex;

/// A first-come, first-served turn at LMDB's write lock. LMDB's own writer
/// mutex is not fair: a snapshot written chunk after chunk could take it
/// back each time and keep the log's writes (the persister) waiting for its
/// whole length. The log's writes and the snapshot's transactions queue
/// here instead, each for one transaction.
#[derive(Default)]
pub(super) struct WriteTurns {
    /// (next ticket to hand out, ticket being served)
    tickets: Mutex<(u64, u64)>,
    served: std::sync::Condvar,
}

pub(super) struct WriteTurn<'a>(&'a WriteTurns);

impl WriteTurns {
    pub(super) fn wait(&self) -> WriteTurn<'_> {
        let mut tickets = self.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let ticket = tickets.0;
        tickets.0 += 1;
        while tickets.1 != ticket {
            tickets = self
                .served
                .wait(tickets)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        WriteTurn(self)
    }
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        let mut tickets = self.0.tickets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        tickets.1 += 1;
        self.0.served.notify_all();
    }
}

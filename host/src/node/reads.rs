//! Linearizable reads: ReadIndex requests, sent again until raft answers.

use std::time::{Duration, Instant};

use super::core::{Core, PendingRead, Proposed, ReadIndexed, Reply};
use crate::storage::LogStore;

/// How often an unanswered ReadIndex request is sent again (etcd: 500 ms).
/// A request can be lost on the way to a leader that died, dropped by a
/// leader that has not committed an entry of its term yet, or lost with a
/// broken peer stream; raft never answers those, so the core asks again.
const READ_RETRY: Duration = Duration::from_millis(500);

impl<S: LogStore, W: Reply<Proposed>, R: Reply<ReadIndexed>> Core<S, W, R> {
    /// Ask raft for a read index; `reply` learns it once the leader has
    /// confirmed it still leads.
    pub(crate) fn read_index(&mut self, reply: R, now: Instant) {
        if self.raw.raft.leader_id == raft::INVALID_ID {
            reply.send(Err(self.not_leader()));
            return;
        }
        self.next_read_id += 1;
        let mut ctx = Vec::with_capacity(24);
        ctx.extend_from_slice(&self.raw.raft.id.to_be_bytes());
        ctx.extend_from_slice(&self.read_nonce.to_be_bytes());
        ctx.extend_from_slice(&self.next_read_id.to_be_bytes());
        self.raw.read_index(ctx.clone());
        self.reads.insert(
            ctx,
            PendingRead {
                reply,
                sent: now,
                retried: false,
            },
        );
    }

    /// Each tick: forget reads whose caller gave up (its deadline passed),
    /// and send again those unanswered for `READ_RETRY`, or all of them
    /// when the leader or term changed. A retry with the same context is
    /// harmless: the leader keeps one pending read per context, and the
    /// first answer serves the read.
    pub(super) fn retry_reads(&mut self, now: Instant) {
        self.reads.retain(|_, read| !read.reply.is_closed());
        let raft = &self.raw.raft;
        let committed_in_term = raft
            .raft_log
            .term(raft.raft_log.committed)
            .is_ok_and(|t| t == raft.term);
        let leader = (raft.term, raft.leader_id, committed_in_term);
        let changed = leader != self.read_leader;
        self.read_leader = leader;
        if leader.1 == raft::INVALID_ID || self.reads.is_empty() {
            return;
        }
        let due: Vec<Vec<u8>> = self
            .reads
            .iter_mut()
            .filter(|(_, read)| changed || now.saturating_duration_since(read.sent) >= READ_RETRY)
            .map(|(ctx, read)| {
                read.sent = now;
                read.retried = true;
                ctx.clone()
            })
            .collect();
        for ctx in due {
            self.raw.read_index(ctx);
        }
    }

    pub(super) fn serve_reads(&mut self, states: Vec<raft::ReadState>) {
        for state in states {
            if let Some(read) = self.reads.remove(&state.request_ctx) {
                self.read_counts.served += 1;
                self.read_counts.retried += u64::from(read.retried);
                read.reply.send(Ok(state.index));
            }
        }
    }
}

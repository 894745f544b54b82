//! One `Ready` at a time: what raft hands out becomes the driver's
//! actions (send, apply, persist), and what the persister reports durable
//! releases the messages that waited on it.

use std::collections::HashMap;

use protobuf::Message as _;
use raft::prelude::{ConfChange, Entry, EntryType, Message};

use super::core::{Action, Core, InFlight, Installing, Proposal, Proposed, ReadIndexed, Reply};
use super::{NodeError, ProposeError};
use crate::outcome::Applied;
use crate::storage::{LogStore, WriteBatch};

impl<S: LogStore, W: Reply<Proposed>, R: Reply<ReadIndexed>> Core<S, W, R> {
    pub(crate) fn has_ready(&self) -> bool {
        self.raw.has_ready()
    }

    /// Writes handed out that the persister has not reported durable.
    pub(crate) fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// Whether the next `Ready` installs a leader's snapshot: the driver
    /// first waits until every earlier write is durable (the log is
    /// replaced synchronously, after them, and before `ready()`, which must
    /// be advanced before raft hears of those writes).
    pub(crate) fn snapshot_pending(&self) -> bool {
        self.raw.snap().is_some_and(|snapshot| !snapshot.is_empty())
    }

    /// Handle a `Ready`. Answers a snapshot to install, if it carries one
    /// (then the driver installs it and calls [`Core::installed`]).
    pub(crate) fn ready(&mut self) -> Result<Option<Installing>, NodeError> {
        let mut ready = self.raw.ready();
        // As etcd counts: a leader after none, or after another.
        if let Some(soft) = ready.ss()
            && soft.leader_id != self.last_leader
        {
            if soft.leader_id != raft::INVALID_ID {
                self.leader_changes += 1;
            }
            self.last_leader = soft.leader_id;
        }
        self.send(ready.take_messages());
        if !ready.snapshot().is_empty() {
            let snapshot = ready.snapshot().clone();
            if let Some(hard_state) = ready.hs() {
                self.hard_state = hard_state.clone();
            }
            // raft has moved its commit index to the snapshot's at least.
            self.hard_state.commit = self.hard_state.commit.max(snapshot.get_metadata().index);
            let hard_state = self.hard_state.clone();
            self.installing = Some(ready);
            return Ok(Some(Installing { snapshot, hard_state }));
        }
        let mut batch = self.reads_and_commits(&mut ready)?;
        let mut vote_changed = false;
        if let Some(hard_state) = ready.hs() {
            // Term and vote must be durable before any message that depends
            // on them leaves; a commit-index advance alone may lag on disk
            // (raft relearns it), so it rides along with the next write
            // instead of costing an fsync of its own.
            vote_changed = hard_state.term != self.hard_state.term || hard_state.vote != self.hard_state.vote;
            self.hard_state = hard_state.clone();
            self.hard_state_dirty = true;
        }
        let persisted_messages = ready.take_persisted_messages();
        if !vote_changed && batch.entries.is_empty() && self.in_flight.is_empty() {
            // Nothing to wait for.
            self.send(persisted_messages);
            self.advance_append(ready)?;
            return Ok(None);
        }
        self.staged.stage(&batch.entries);
        self.submit(&mut batch, Some(ready.number()), persisted_messages);
        self.raw.advance_append_async(ready);
        Ok(None)
    }

    /// The driver installed the snapshot [`Core::ready`] handed out; its
    /// header names `members`. Adopt them, have the apply side restore it,
    /// and queue the rest of the `Ready`. The driver then waits until every
    /// write is durable and calls [`Core::finish_install`].
    pub(crate) fn installed(&mut self, members: Vec<(u64, String)>) -> Result<(), NodeError> {
        let mut ready = self
            .installing
            .take()
            .expect("installed() follows a ready() that handed out a snapshot");
        let metadata = ready.snapshot().get_metadata().clone();
        let index = metadata.index;
        self.staged.clear();
        self.hard_state_dirty = false;
        self.conf_index = index;
        for (id, addr) in &members {
            self.push(Action::SetPeer {
                id: *id,
                addr: addr.clone(),
            });
        }
        let own = (self.identity.id, self.addr_of(self.identity.id).unwrap_or_default());
        self.identity.members = members;
        if !self.identity.members.iter().any(|(id, _)| *id == own.0) {
            self.identity.members.push(own);
        }
        self.identity.max_id = self
            .identity
            .members
            .iter()
            .map(|(id, _)| *id)
            .max()
            .unwrap_or(0)
            .max(self.identity.max_id);
        self.persist(WriteBatch {
            identity: Some(self.identity.clone()),
            ..Default::default()
        });
        // Until the apply side has restored it, this node cannot apply: its
        // batches say so from the acknowledgement of this install on, so a
        // leader never promotes it in the gap before a restore that then
        // fails.
        if !self.health.stalled() {
            self.health
                .set(Some(format!("restoring the leader's snapshot at index {index}")));
        }
        self.push(Action::Restore(metadata));
        let mut batch = self.reads_and_commits(&mut ready)?;
        if let Some(hard_state) = ready.hs() {
            self.hard_state = hard_state.clone();
            self.hard_state_dirty = true;
        }
        // The apply side is restoring the snapshot already: raft must count
        // it persisted before the apply side reports it applied, so this
        // `Ready` ends synchronously, once this write is durable.
        self.staged.stage(&batch.entries);
        self.submit(&mut batch, None, Vec::new());
        self.installing = Some(ready);
        Ok(())
    }

    /// Every write is durable: end the `Ready` that installed a snapshot.
    pub(crate) fn finish_install(&mut self) -> Result<(), NodeError> {
        debug_assert!(self.in_flight.is_empty());
        let mut ready = self.installing.take().expect("finish_install() follows installed()");
        self.send(ready.take_persisted_messages());
        self.advance_append(ready)?;
        self.advance_apply()
    }

    /// Serve the `Ready`'s reads, hand its committed entries to the apply
    /// side, and answer the write its new entries need.
    fn reads_and_commits(&mut self, ready: &mut raft::Ready) -> Result<WriteBatch, NodeError> {
        self.serve_reads(ready.take_read_states());
        let committed = ready.take_committed_entries();
        self.apply_committed(committed)?;
        Ok(WriteBatch {
            entries: ready.take_entries(),
            ..Default::default()
        })
    }

    /// `advance_append` (the `Ready`'s writes are durable), and what it
    /// releases.
    fn advance_append(&mut self, ready: raft::Ready) -> Result<(), NodeError> {
        let mut light = self.raw.advance_append(ready);
        if let Some(commit) = light.commit_index() {
            self.hard_state.commit = commit;
            self.hard_state_dirty = true;
        }
        self.send(light.take_messages());
        self.apply_committed(light.take_committed_entries())
    }

    /// The persister made writes up to `seq` durable: release what waited
    /// on them.
    pub(crate) fn persisted(&mut self, seq: u64) {
        let mut ready = None;
        let mut messages = Vec::new();
        while let Some(write) = self.in_flight.front()
            && write.seq <= seq
        {
            let write = self.in_flight.pop_front().expect("non-empty");
            ready = write.ready.or(ready);
            messages.extend(write.messages);
        }
        let durable_through = self
            .in_flight
            .iter()
            .filter_map(|write| write.first_entry)
            .min()
            .map_or(u64::MAX, |first| first - 1);
        self.staged.mark_durable(durable_through);
        // Before sending: a vote a candidate wins must find its earlier
        // `Ready`s already acknowledged.
        if let Some(number) = ready {
            self.raw.on_persist_ready(number);
        }
        self.send(messages);
    }

    fn send(&mut self, messages: Vec<Message>) {
        if !messages.is_empty() {
            self.push(Action::Send(messages));
        }
    }

    /// Queue a write that no `Ready` waits on (metadata).
    pub(super) fn persist(&mut self, mut batch: WriteBatch) {
        self.submit(&mut batch, None, Vec::new());
    }

    /// Queue `batch` (plus any lazily kept hard state and applied index)
    /// for the persister; `messages` leave once it is durable.
    fn submit(&mut self, batch: &mut WriteBatch, ready: Option<u64>, messages: Vec<Message>) {
        if self.hard_state_dirty {
            batch.hard_state = Some(self.hard_state.clone());
        }
        if self.applied_dirty {
            batch.applied_index = Some(self.applied);
        }
        self.hard_state_dirty = false;
        self.applied_dirty = false;
        self.next_seq += 1;
        self.in_flight.push_back(InFlight {
            seq: self.next_seq,
            ready,
            first_entry: batch.entries.first().map(|e| e.index),
            messages,
        });
        let batch = std::mem::take(batch);
        self.push(Action::Persist {
            seq: self.next_seq,
            batch,
        });
    }

    fn apply_committed(&mut self, entries: Vec<Entry>) -> Result<(), NodeError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut waiters = HashMap::new();
        for entry in &entries {
            let proposal = self.take_proposal(entry);
            let mut refused = None;
            let conf_change = match entry.get_entry_type() {
                EntryType::EntryNormal => None,
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data).map_err(raft::Error::CodecError)?;
                    if entry.index > self.conf_index {
                        match self.raw.apply_conf_change(&change) {
                            Ok(conf_state) => self.on_conf_changed(&change, conf_state, entry.index),
                            // Every replica refuses it alike (the apply side
                            // too, see conf_change::apply) and goes on with
                            // the configuration it had; none stops.
                            Err(error) => {
                                tracing::error!(index = entry.index, ?change, %error, "raft refused a committed membership change; the configuration stays as it was");
                                refused = Some(error.to_string());
                            }
                        }
                    }
                    Some(change)
                }
                EntryType::EntryConfChangeV2 => {
                    // This host proposes only simple conf changes.
                    tracing::error!(index = entry.index, "ignoring a joint conf change entry");
                    None
                }
            };
            let Some(proposal) = proposal else { continue };
            if let Some(error) = refused {
                proposal.waiter.send(Err(ProposeError::Invalid(format!(
                    "raft refused the membership change: {error}"
                ))));
                continue;
            }
            match (conf_change, proposal.conf_change) {
                (None, false) => {
                    waiters.insert(entry.index, proposal.waiter);
                }
                (Some(change), true) => {
                    proposal.waiter.send(Ok(Applied {
                        index: entry.index,
                        result: Ok(change.node_id.to_be_bytes().to_vec()),
                    }));
                }
                // raft replaced a conf change it would not accept with an
                // empty entry.
                _ => {
                    proposal.waiter.send(Err(ProposeError::NotProposed(
                        "raft dropped the membership change; retry".into(),
                    )));
                }
            }
        }
        self.push(Action::Apply { entries, waiters });
        Ok(())
    }

    /// The proposal waiting on `entry`, if this node proposed it. Proposals
    /// whose index was taken by another leader's entry learn so here.
    fn take_proposal(&mut self, entry: &Entry) -> Option<Proposal<W>> {
        while let Some(first) = self.proposals.first_entry() {
            if *first.key() > entry.index {
                break;
            }
            let (index, proposal) = first.remove_entry();
            if index == entry.index && proposal.term == entry.term {
                return Some(proposal);
            }
            self.proposals_failed.inc();
            proposal.waiter.send(Err(ProposeError::Overwritten(index)));
        }
        None
    }
}

//! The raft core, without IO: it owns the `RawNode` and the bookkeeping
//! around it (proposals waiting on an index, reads waiting on a read index,
//! writes waiting on the disk, the membership rules) and turns events into
//! actions.
//!
//! Events are method calls: a tick, a request, a peer's message, "the
//! persister made write N durable", "the apply side applied up to N".
//! Actions queue up in order and the driver takes them with
//! [`Core::take_actions`]: send these messages, persist this batch, apply
//! these entries, restore a snapshot, change a peer's address, take a
//! snapshot. The core knows no tokio, tonic, heed or wasmtime: the store is
//! any [`LogStore`] (unit tests use the in-memory one), time comes in with
//! `tick`, and callers wait on any [`Reply`].
//!
//! One `Ready` is handled in one call, [`Core::ready`], except when it
//! carries a leader's snapshot: installing it is IO, so the core hands it
//! out ([`Installing`]) and resumes in [`Core::installed`] and
//! [`Core::finish_install`].

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use raft::prelude::{ConfChange, Entry, HardState, Message, Snapshot, SnapshotMetadata};
use raft::{RawNode, StateRole};

use super::{NodeError, NodeStatus, ProposeError, RaftConfig, ReadCounts, role_name};
use crate::envelope::{self, HostEntry};
use crate::epochs::Epochs;
use crate::firewall::{self, Channel, Refusal, Refusals};
use crate::health::ApplyHealth;
use crate::limits::LogPosition;
use crate::outcome::Applied;
use crate::storage::staged::Staged;
use crate::storage::{LogStore, NodeIdentity, WriteBatch};

/// Someone waiting for an answer: a oneshot sender in the daemon, anything
/// in tests.
pub(crate) trait Reply<T> {
    fn send(self, value: T);
    /// The waiter gave up (its deadline passed).
    fn is_closed(&self) -> bool;
}

/// The answer to a proposal, a join or a removal.
pub(crate) type Proposed = Result<Applied, ProposeError>;
/// The answer to a read-index request: the index to wait for.
pub(crate) type ReadIndexed = Result<u64, ProposeError>;

/// What the driver must do, in order.
#[derive(Debug)]
pub(crate) enum Action<W> {
    /// Messages to peers. Report each unreachable one with
    /// [`Core::report_unreachable`].
    Send(Vec<Message>),
    /// Hand this write to the persister; call [`Core::persisted`] with
    /// `seq` (or a later one) once it is durable.
    Persist { seq: u64, batch: WriteBatch },
    /// Committed entries, in log order, for the apply side, with the
    /// waiters of those this node proposed (by index).
    Apply {
        entries: Vec<Entry>,
        waiters: HashMap<u64, W>,
    },
    /// A leader's snapshot was installed: the apply side restores it.
    Restore(SnapshotMetadata),
    /// raft needs a snapshot newer than the stored one (e.g. one that
    /// names a new member): the apply side takes one.
    WantSnapshot,
    /// A member's address is known or changed.
    SetPeer { id: u64, addr: String },
    /// A member was removed.
    RemovePeer(u64),
}

/// A `Ready` that carries a leader's snapshot, for the driver to install:
/// write `snapshot` with `hard_state` to the store, replacing the log, and
/// call [`Core::installed`] with the members its header names.
pub(crate) struct Installing {
    pub snapshot: Snapshot,
    pub hard_state: HardState,
}

/// How long a proposed epoch may take to apply before it is proposed again.
const EPOCH_RETRY: Duration = Duration::from_secs(3);

/// What the core is built from.
pub(crate) struct CoreParts<S> {
    pub identity: NodeIdentity,
    pub store: S,
    pub config: RaftConfig,
    /// The index the apply side starts from (its snapshot's).
    pub applied: u64,
    /// Makes this run's read contexts unique (see `Core::read_nonce`).
    pub read_nonce: u64,
    pub refusals: Arc<Refusals>,
    pub health: Arc<ApplyHealth>,
    pub epochs: Arc<Epochs>,
    /// Counts proposals that failed (dropped by raft, or overwritten).
    pub proposals_failed: prometheus::IntCounter,
    pub logger: slog::Logger,
}

pub(crate) struct Core<S: LogStore, W, R> {
    pub(super) raw: RawNode<Staged<S>>,
    pub(super) store: S,
    /// The store as raft reads it: disk plus the staged tail.
    pub(super) staged: Staged<S>,
    pub(super) config: RaftConfig,
    pub(super) actions: Vec<Action<W>>,
    /// Writes handed to the persister and not yet reported durable, in order.
    pub(super) in_flight: VecDeque<InFlight>,
    pub(super) next_seq: u64,
    /// Proposals this node made as leader, by log index.
    pub(super) proposals: BTreeMap<u64, Proposal<W>>,
    pub(super) reads: HashMap<Vec<u8>, PendingRead<R>>,
    pub(super) next_read_id: u64,
    /// Read contexts are (node id, this run's nonce, counter): raft-rs keys
    /// pending reads by context, so two nodes (or two runs of one) must
    /// never send the same one.
    pub(super) read_nonce: u64,
    /// (term, leader, whether an entry of the term is known committed) when
    /// pending reads were last sent: a change sends them again at once. A
    /// new leader drops read requests until it committed an entry of its
    /// term, so that moment matters too.
    pub(super) read_leader: (u64, u64, bool),
    pub(super) read_counts: ReadCounts,
    /// New leaders seen in `Ready`s' soft state (see
    /// `NodeStatus::leader_changes`), and the last one.
    pub(super) leader_changes: u64,
    pub(super) last_leader: u64,
    /// The applied index the apply side last reported.
    pub(super) applied: u64,
    /// The hard state last written, to persist commit-index advances.
    pub(super) hard_state: HardState,
    pub(super) hard_state_dirty: bool,
    pub(super) applied_dirty: bool,
    /// This node's id, the members' addresses and the highest id used.
    pub(super) identity: NodeIdentity,
    /// The last conf change already reflected in the stored conf state;
    /// raft re-delivers older ones after a restart and they are skipped.
    pub(super) conf_index: u64,
    /// Campaign as soon as raft allows: this node is the only voter.
    pub(super) campaign_when_applied: bool,
    /// Peer messages the firewall refused, by reason.
    pub(super) refusals: Arc<Refusals>,
    /// Which peers said they cannot apply (never promoted while so).
    pub(super) health: Arc<ApplyHealth>,
    /// Members' snapshot wants and the latest epoch.
    pub(super) epochs: Arc<Epochs>,
    /// The last `Epoch` entry this leader proposed: when, and at which
    /// index it would be (see `epochs`).
    pub(super) epoch_proposed: Option<(Instant, u64)>,
    pub(super) proposals_failed: prometheus::IntCounter,
    /// The `Ready` whose snapshot the driver is installing.
    pub(super) installing: Option<raft::Ready>,
}

/// A write the persister has not reported durable yet.
pub(super) struct InFlight {
    pub(super) seq: u64,
    /// The `Ready` it persists, if any.
    pub(super) ready: Option<u64>,
    /// Its first entry's index, if it has entries.
    pub(super) first_entry: Option<u64>,
    /// Messages that may leave only once it is durable.
    pub(super) messages: Vec<Message>,
}

pub(super) struct Proposal<W> {
    pub(super) term: u64,
    pub(super) waiter: W,
    /// Conf changes are answered by the core, normal entries by the apply
    /// side.
    pub(super) conf_change: bool,
}

/// A linearizable read waiting for its read index.
pub(super) struct PendingRead<R> {
    pub reply: R,
    /// When its ReadIndex request last went to raft.
    pub sent: Instant,
    /// Whether it had to be sent more than once.
    pub retried: bool,
}

impl<S: LogStore, W: Reply<Proposed>, R: Reply<ReadIndexed>> Core<S, W, R> {
    pub(crate) fn new(parts: CoreParts<S>) -> Result<Self, NodeError> {
        let CoreParts {
            identity,
            store,
            config,
            applied,
            read_nonce,
            refusals,
            health,
            epochs,
            proposals_failed,
            logger,
        } = parts;
        let id = identity.id;
        let raft_config = raft::Config {
            id,
            election_tick: config.election_ticks,
            heartbeat_tick: config.heartbeat_ticks,
            max_inflight_msgs: config.max_inflight_messages,
            max_size_per_msg: config.max_entries_bytes_per_message,
            // The state machine is in memory: after a restart the apply
            // worker restores the latest snapshot and raft re-delivers the
            // committed log after it.
            applied: store.snapshot_metadata()?.index,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        raft_config.validate()?;
        let hard_state = store.initial_state()?.hard_state;
        let conf_index = store.conf_index()?;
        let staged = Staged::new(store.clone());
        let raw = RawNode::new(&raft_config, staged.clone(), &logger)?;
        // A one-voter cluster need not wait an election timeout; raft lets
        // it campaign once its configuration entries are applied.
        let campaign_when_applied = raw.raft.prs().conf().voters().ids().iter().collect::<Vec<_>>() == [id];
        Ok(Core {
            raw,
            store,
            staged,
            config,
            actions: Vec::new(),
            in_flight: VecDeque::new(),
            next_seq: 0,
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            next_read_id: 0,
            read_nonce,
            read_leader: (0, 0, false),
            read_counts: ReadCounts::default(),
            leader_changes: 0,
            last_leader: raft::INVALID_ID,
            applied,
            hard_state,
            hard_state_dirty: false,
            applied_dirty: false,
            identity,
            conf_index,
            campaign_when_applied,
            refusals,
            health,
            epochs,
            epoch_proposed: None,
            proposals_failed,
            installing: None,
        })
    }

    /// The actions queued so far, in order.
    pub(crate) fn take_actions(&mut self) -> Vec<Action<W>> {
        std::mem::take(&mut self.actions)
    }

    pub(super) fn push(&mut self, action: Action<W>) {
        self.actions.push(action);
    }

    /// One tick of the raft clock, at `now`.
    pub(crate) fn tick(&mut self, now: Instant) {
        self.raw.tick();
        self.promote_caught_up_learners();
        if self.raw.store().take_snapshot_want() {
            self.push(Action::WantSnapshot);
        }
        self.retry_reads(now);
        if self.is_leader() {
            self.propose_epoch_if_wanted(now);
        }
    }

    /// Persist commit-index and applied-index advances, if any. They can be
    /// relearned, so they need no fsync of their own on the hot path: the
    /// driver calls this at most once per tick.
    pub(crate) fn persist_lazily(&mut self) {
        if self.hard_state_dirty || self.applied_dirty {
            self.persist(WriteBatch::default());
        }
    }

    /// The apply side applied up to `index`.
    pub(crate) fn applied(&mut self, index: u64) -> Result<(), NodeError> {
        self.applied = index;
        self.applied_dirty = true;
        // A restored snapshot counts as applied only once raft counts it
        // persisted: `finish_install` catches up.
        if self.installing.is_none() {
            self.advance_apply()?;
        }
        Ok(())
    }

    pub(super) fn advance_apply(&mut self) -> Result<(), NodeError> {
        let index = self.applied;
        if index > self.raw.raft.raft_log.applied {
            self.raw.advance_apply_to(index);
        }
        if self.campaign_when_applied && index >= self.raw.raft.raft_log.committed {
            self.campaign_when_applied = false;
            if self.raw.raft.state == StateRole::Follower {
                self.raw.campaign()?;
            }
        }
        Ok(())
    }

    /// Step a message from a peer, if the firewall lets it through. Answers
    /// whether it reached raft.
    pub(crate) fn step(&mut self, message: Message, channel: Channel) -> bool {
        if let Err(reason) = firewall::check(&message, channel, &self.view(message.from)) {
            self.refusals.record(reason, &message);
            return false;
        }
        if let Err(error) = self.raw.step(message) {
            tracing::debug!(%error, "dropped a raft message");
        }
        true
    }

    /// Would the firewall let this `MsgSnapshot` (data not yet received)
    /// through?
    pub(crate) fn check_snapshot(&self, message: &Message) -> Result<(), Refusal> {
        firewall::check(message, Channel::InstallSnapshot, &self.view(message.from))
    }

    /// What the firewall needs to know of this node, for a message from
    /// `sender`. (Built per message, without allocating.)
    fn view(&self, sender: u64) -> firewall::View {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        // The configuration raft has applied, and the members this node was
        // told of (a joiner knows them from its join before it has replayed
        // a single conf change).
        let sender_is_member = conf.voters().contains(sender)
            || conf.learners().contains(&sender)
            || self.identity.members.iter().any(|(id, _)| *id == sender);
        firewall::View {
            id: raft.id,
            term: raft.term,
            leader_id: raft.leader_id,
            last_index: raft.raft_log.last_index(),
            sender_is_member,
            max_id: self.identity.max_id,
        }
    }

    /// The transport finished (or failed) sending a snapshot to `to`.
    pub(crate) fn snapshot_sent(&mut self, to: u64, ok: bool) {
        let status = if ok {
            raft::SnapshotStatus::Finish
        } else {
            raft::SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    pub(crate) fn report_unreachable(&mut self, peer: u64) {
        self.raw.report_unreachable(peer);
    }

    pub(super) fn addr_of(&self, id: u64) -> Option<String> {
        self.identity
            .members
            .iter()
            .find(|(member, _)| *member == id)
            .map(|(_, addr)| addr.clone())
    }

    /// A member (this one too) wants a snapshot past the latest epoch:
    /// propose one, once at a time (again if it is not applied within
    /// `EPOCH_RETRY`, since a proposal can be lost with a leader change).
    fn propose_epoch_if_wanted(&mut self, now: Instant) {
        let committed = self.raw.raft.raft_log.committed;
        let members = self.members();
        let want = self.epochs.want().max(self.epochs.members_want(&members, committed));
        if want == 0 || want <= self.epochs.latest() {
            return;
        }
        if let Some((at, index)) = self.epoch_proposed
            && self.epochs.latest() < index
            && now.saturating_duration_since(at) < EPOCH_RETRY
        {
            return;
        }
        let index = self.raw.raft.raft_log.last_index() + 1;
        tracing::debug!(want, index, "proposing an epoch");
        self.propose_host(HostEntry::Epoch);
        self.epoch_proposed = Some((now, index));
    }

    /// Propose an entry for the host (no one waits on it).
    pub(crate) fn propose_host(&mut self, entry: HostEntry) {
        if let Err(error) = self.raw.propose(Vec::new(), envelope::host(&entry)) {
            tracing::warn!(?entry, %error, "could not propose a host entry");
        }
    }

    pub(crate) fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub(crate) fn not_leader(&self) -> ProposeError {
        let leader_id = self.raw.raft.leader_id;
        ProposeError::NotLeader {
            leader_id,
            leader_addr: self.addr_of(leader_id),
        }
    }

    /// Where the log stands, for the leader's limits proposal.
    pub(crate) fn position(&self) -> LogPosition {
        let raft = &self.raw.raft;
        LogPosition {
            leading: self.is_leader() && raft.commit_to_current_term(),
            committed: raft.raft_log.committed,
            last_index: raft.raft_log.last_index(),
            applied: self.applied,
        }
    }

    /// Propose `data`; `reply` learns its result once applied.
    pub(crate) fn propose(&mut self, data: Vec<u8>, reply: W) {
        if !self.is_leader() {
            reply.send(Err(self.not_leader()));
            return;
        }
        if self.proposals.len() >= self.config.max_pending_proposals {
            reply.send(Err(ProposeError::Busy(self.proposals.len())));
            return;
        }
        let before = self.raw.raft.raft_log.last_index();
        if let Err(error) = self.raw.propose(Vec::new(), data) {
            self.proposals_failed.inc();
            reply.send(Err(ProposeError::Dropped(error.to_string())));
            return;
        }
        let index = self.raw.raft.raft_log.last_index();
        debug_assert_eq!(index, before + 1, "a proposal appends exactly one entry");
        self.proposals.insert(
            index,
            Proposal {
                term: self.raw.raft.term,
                waiter: reply,
                conf_change: false,
            },
        );
    }

    pub(super) fn propose_conf_change(&mut self, change: ConfChange, reply: Option<W>) {
        if self.raw.raft.has_pending_conf() {
            if let Some(reply) = reply {
                reply.send(Err(ProposeError::NotProposed(
                    "another membership change is in progress; retry shortly".into(),
                )));
            }
            return;
        }
        if let Err(error) = self.raw.propose_conf_change(Vec::new(), change) {
            if let Some(reply) = reply {
                reply.send(Err(ProposeError::Dropped(error.to_string())));
            }
            return;
        }
        if let Some(waiter) = reply {
            let index = self.raw.raft.raft_log.last_index();
            self.proposals.insert(
                index,
                Proposal {
                    term: self.raw.raft.term,
                    waiter,
                    conf_change: true,
                },
            );
        }
    }

    pub(crate) fn leadership(&self) -> super::Leadership {
        let raft = &self.raw.raft;
        super::Leadership {
            id: raft.id,
            role: role_name(raft.state),
            leader_id: raft.leader_id,
            term: raft.term,
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let raft = &self.raw.raft;
        let conf = raft.prs().conf();
        let mut members: Vec<(u64, String, bool)> = conf
            .voters()
            .ids()
            .iter()
            .map(|id| (id, true))
            .chain(conf.learners().iter().map(|id| (*id, false)))
            .map(|(id, voter)| (id, self.addr_of(id).unwrap_or_default(), voter))
            .collect();
        members.sort();
        NodeStatus {
            id: raft.id,
            role: role_name(raft.state).to_string(),
            leader_id: raft.leader_id,
            term: raft.term,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            first_index: self.store.first_index().unwrap_or(0),
            last_index: raft.raft_log.last_index(),
            members,
            snapshot_index: self.store.snapshot_metadata().map_or(0, |m| m.index),
            reads: self.read_counts,
            leader_changes: self.leader_changes,
            pending_proposals: self.proposals.len() as u64,
            progress: if raft.state == StateRole::Leader {
                let mut progress: Vec<_> = raft
                    .prs()
                    .iter()
                    .map(|(id, p)| {
                        let state = match p.state {
                            raft::ProgressState::Probe => "probe",
                            raft::ProgressState::Replicate => "replicate",
                            raft::ProgressState::Snapshot => "snapshot",
                        };
                        (*id, p.matched, p.next_idx, state.to_string(), p.recent_active)
                    })
                    .collect();
                progress.sort();
                progress
            } else {
                Vec::new()
            },
        }
    }

    pub(super) fn set_conf_index(&mut self, index: u64) {
        self.conf_index = index;
    }
}

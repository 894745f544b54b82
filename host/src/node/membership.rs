//! The membership rules: who may join and with which id, who may be
//! removed, when a learner is promoted, where leadership goes; and what a
//! committed conf change does to this node's view of the cluster.

use raft::prelude::{ConfChange, ConfChangeType, ConfState};

use super::ProposeError;
use super::core::{Action, Core, Proposed, ReadIndexed, Reply};
use crate::firewall;
use crate::outcome::Applied;
use crate::storage::{LogStore, WriteBatch};

impl<S: LogStore, W: Reply<Proposed>, R: Reply<ReadIndexed>> Core<S, W, R> {
    pub(crate) fn voters(&self) -> Vec<u64> {
        let mut voters: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        voters.sort();
        voters
    }

    pub(crate) fn learners(&self) -> Vec<u64> {
        let mut learners: Vec<u64> = self.raw.raft.prs().conf().learners().iter().copied().collect();
        learners.sort();
        learners
    }

    /// Voters, then learners.
    pub(crate) fn members(&self) -> Vec<u64> {
        let mut members = self.voters();
        members.extend(self.learners());
        members
    }

    fn is_member(&self, id: u64) -> bool {
        self.voters().contains(&id) || self.learners().contains(&id)
    }

    /// Add a node at `addr` as a learner; `reply`'s result is its id (u64
    /// big-endian). `requested_id` 0 lets the leader pick.
    pub(crate) fn join(&mut self, addr: String, requested_id: u64, reply: W) {
        if !self.is_leader() {
            reply.send(Err(self.not_leader()));
            return;
        }
        // Idempotent: a node that joined and asks again gets its id back.
        if let Some((id, _)) = self.identity.members.iter().find(|(_, a)| *a == addr)
            && self.is_member(*id)
        {
            let index = self.raw.raft.raft_log.committed;
            reply.send(Ok(Applied {
                index,
                result: Ok(id.to_be_bytes().to_vec()),
            }));
            return;
        }
        let id = match self.join_id(requested_id) {
            Ok(id) => id,
            Err(error) => {
                reply.send(Err(error));
                return;
            }
        };
        let change = ConfChange {
            change_type: ConfChangeType::AddLearnerNode,
            node_id: id,
            context: addr.into_bytes().into(),
            ..Default::default()
        };
        self.propose_conf_change(change, Some(reply));
    }

    /// The id a joining node gets: the one it asked for, if that was never
    /// used and is not far off (see `firewall::MAX_UNKNOWN_ID_GAP`), or the
    /// next unused one. Never 0, never a removed node's.
    fn join_id(&self, requested_id: u64) -> Result<u64, ProposeError> {
        let max_id = self.identity.max_id;
        let highest = max_id.saturating_add(firewall::MAX_UNKNOWN_ID_GAP);
        if requested_id == 0 {
            return max_id
                .checked_add(1)
                .ok_or_else(|| ProposeError::Invalid("this cluster has used every node id".into()));
        }
        if self.is_member(requested_id) {
            let at = self.addr_of(requested_id).unwrap_or_default();
            return Err(ProposeError::Invalid(format!(
                "node id {requested_id} is already a member, at {at}"
            )));
        }
        if requested_id <= max_id {
            return Err(ProposeError::Invalid(format!(
                "node id {requested_id} was used before; ids are never reused (ask for none, or one above {max_id})"
            )));
        }
        if requested_id > highest {
            return Err(ProposeError::Invalid(format!(
                "node id {requested_id} is too far above the highest id used ({max_id}); ask for one up to {highest}"
            )));
        }
        Ok(requested_id)
    }

    /// The most up-to-date voter other than this node.
    fn best_successor(&self) -> Option<u64> {
        let own = self.raw.raft.id;
        self.voters()
            .into_iter()
            .filter(|v| *v != own)
            .max_by_key(|v| self.raw.raft.prs().get(*v).map_or(0, |p| p.matched))
    }

    /// The node is about to stop: if it leads, start moving leadership to
    /// the most caught-up other voter. Answers the voter chosen, if any.
    pub(crate) fn step_down(&mut self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let target = self.best_successor()?;
        tracing::info!(to = target, "stopping: handing leadership over");
        self.raw.transfer_leader(target);
        Some(target)
    }

    pub(crate) fn remove_member(&mut self, id: u64, reply: W) {
        if !self.is_leader() {
            reply.send(Err(self.not_leader()));
            return;
        }
        if !self.is_member(id) {
            reply.send(Err(ProposeError::Invalid(format!("node {id} is not a member"))));
            return;
        }
        if self.voters() == [id] {
            reply.send(Err(ProposeError::Invalid(format!(
                "node {id} is the only voter; a cluster cannot remove its last voter"
            ))));
            return;
        }
        if id == self.raw.raft.id {
            // Hand leadership to the most up-to-date other voter first; the
            // new leader then removes this node when the caller retries.
            if let Some(target) = self.best_successor() {
                self.raw.transfer_leader(target);
            }
            reply.send(Err(ProposeError::NotProposed(format!(
                "node {id} is the leader; leadership is moving to another voter first; retry shortly"
            ))));
            return;
        }
        let change = ConfChange {
            change_type: ConfChangeType::RemoveNode,
            node_id: id,
            ..Default::default()
        };
        self.propose_conf_change(change, Some(reply));
    }

    pub(crate) fn transfer_leader(&mut self, id: u64) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if !self.voters().contains(&id) {
            return Err(ProposeError::Invalid(format!("node {id} is not a voter")));
        }
        if id != self.raw.raft.id {
            self.raw.transfer_leader(id);
        }
        Ok(())
    }

    /// Leader: promote one learner that has caught up, if no other change
    /// is in flight.
    pub(super) fn promote_caught_up_learners(&mut self) {
        if !self.is_leader() || self.raw.raft.has_pending_conf() {
            return;
        }
        let last = self.raw.raft.raft_log.last_index();
        let lag = self.config.promote_lag_entries;
        // A learner that never acknowledged an entry (a dead address: the
        // log may be shorter than `lag`) or went quiet is not caught up.
        let caught_up = self.learners().into_iter().find(|learner| {
            self.raw
                .raft
                .prs()
                .get(*learner)
                .is_some_and(|p| p.matched > 0 && p.recent_active && p.matched.saturating_add(lag) >= last)
                // One whose log is whole but whose state is not (its
                // restore fails) would count toward a quorum it cannot
                // serve: it stays a learner.
                && !self.health.reported_stalled(*learner)
        });
        if let Some(learner) = caught_up {
            tracing::info!(node = learner, "promoting a caught-up learner to voter");
            let change = ConfChange {
                change_type: ConfChangeType::AddNode,
                node_id: learner,
                ..Default::default()
            };
            self.propose_conf_change(change, None);
        }
    }

    /// A committed conf change was applied to raft: record the members'
    /// addresses and the highest id, tell the driver of peers, persist.
    pub(super) fn on_conf_changed(&mut self, change: &ConfChange, conf_state: ConfState, index: u64) {
        let id = change.node_id;
        match change.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                self.identity.max_id = self.identity.max_id.max(id);
                if let Some(addr) = crate::conf_change::address(change) {
                    self.identity.members.retain(|(member, _)| *member != id);
                    self.identity.members.push((id, addr.clone()));
                    self.identity.members.sort();
                    self.push(Action::SetPeer { id, addr });
                }
                tracing::info!(node = id, index, change = ?change.get_change_type(), "membership changed");
            }
            ConfChangeType::RemoveNode => {
                self.identity.members.retain(|(member, _)| *member != id);
                self.push(Action::RemovePeer(id));
                if id == self.identity.id {
                    tracing::warn!(index, "this node was removed from the cluster; it no longer takes part");
                } else {
                    tracing::info!(node = id, index, "member removed");
                }
            }
        }
        self.set_conf_index(index);
        self.persist(WriteBatch {
            conf_state: Some((conf_state, index)),
            identity: Some(self.identity.clone()),
            ..Default::default()
        });
    }
}

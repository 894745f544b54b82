//! The `Status` RPC's answer: the raft side's view plus everything else a
//! node reports about itself.

use super::Services;
use crate::node::NodeStatus;
use crate::proto::{self, StatusResponse};
use crate::sandbox::Limits;

impl Services {
    pub(super) fn status_response(&self, status: NodeStatus) -> StatusResponse {
        let leader_addr = status.leader_addr().unwrap_or_default();
        let plugin = self.codec.plugin();
        let space = self.peer.link.space.usage();
        StatusResponse {
            id: status.id,
            role: status.role,
            leader_id: status.leader_id,
            leader_addr,
            term: status.term,
            commit_index: status.commit_index,
            applied_index: status.applied_index,
            first_index: status.first_index,
            last_index: status.last_index,
            plugin_sha256: plugin.sha256_hex(),
            plugin_size: plugin.size() as u64,
            members: status
                .members
                .into_iter()
                .map(|(id, addr, voter)| proto::Member { id, addr, voter })
                .collect(),
            trapped_entries: self.trapped_entries.load(std::sync::atomic::Ordering::Relaxed),
            longest_apply_ms: self.longest_apply_ms.load(std::sync::atomic::Ordering::Relaxed),
            apply_error: self.peer.link.health.reason(),
            epoch_index: self.peer.link.epochs.latest(),
            epoch_sha256: self
                .peer
                .link
                .epochs
                .latest_digest()
                .filter(|(index, _)| *index == self.peer.link.epochs.latest())
                .map_or_else(String::new, |(_, sha)| hex::encode(sha)),
            divergences: self
                .peer
                .link
                .epochs
                .divergences()
                .iter()
                .map(ToString::to_string)
                .collect(),
            divergences_total: self.peer.link.epochs.divergences_total(),
            sessions: self.sessions.sessions.load(std::sync::atomic::Ordering::Relaxed),
            session_kept_bytes: self.sessions.kept_bytes.load(std::sync::atomic::Ordering::Relaxed),
            listen: self.listen.clone(),
            snapshot_index: status.snapshot_index,
            reads_served: status.reads.served,
            reads_retried: status.reads.retried,
            space_alarms: self.space_alarms.borrow().iter().copied().collect(),
            store_file_bytes: space.file_bytes,
            store_live_bytes: space.live_bytes,
            quota_bytes: self.space_config.quota_bytes,
            fs_free_bytes: space.fs_free_bytes,
            min_free_bytes: self.space_config.min_free_bytes,
            out_of_space: self.peer.link.space.store_over(),
            plugin_memory_bytes: self.peer.link.space.memory().0,
            out_of_plugin_memory: self.peer.link.space.memory_over(),
            limits: Some(limits_proto(&self.limits())),
            limits_recorded: self.cluster_limits.borrow().is_some(),
            local_limits: Some(limits_proto(&Limits::of(self.sandbox.config()))),
            cluster_id: self.peer.link.cluster_id,
            snapshot_error: self.snapshot_error.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            refused: self
                .peer
                .refusals
                .counts()
                .into_iter()
                .filter(|(_, count)| *count > 0)
                .map(|(reason, count)| proto::RefusalCount {
                    reason: reason.to_string(),
                    count,
                })
                .collect(),
            progress: status
                .progress
                .into_iter()
                .map(|(id, matched, next_index, state, recent_active)| proto::Progress {
                    id,
                    matched,
                    next_index,
                    state,
                    recent_active,
                })
                .collect(),
        }
    }
}

pub(super) fn limits_proto(limits: &Limits) -> proto::SandboxLimits {
    proto::SandboxLimits {
        fuel_per_call: limits.fuel_per_call,
        fuel_per_snapshot: limits.fuel_per_snapshot,
        max_memory_bytes: limits.max_memory_bytes,
        max_result_bytes: limits.max_result_bytes,
    }
}

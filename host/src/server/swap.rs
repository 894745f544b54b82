//! A plugin hot swap, in two phases (see `readiness`):
//!
//! 1. the component is validated here, then enters the log in chunks and a
//!    `PreparePlugin` entry: every node compiles it in the background;
//! 2. once every voter reports it compiled, the swap entry is proposed, and
//!    applying it switches plugins without stopping to compile.
//!
//! The caller hears how it goes (`SwapProgress`) and waits as long as the
//! voters make progress; a voter that says nothing of the component for
//! `swap_ready_timeout_ms` fails the swap, by name, before any swap entry
//! exists.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::Services;
use crate::envelope;
use crate::node::{NodeRequest, ProposeError};
use crate::proto::SwapProgress;
use crate::readiness::Readiness;

/// How often the voters' readiness is read while waiting.
const POLL_EVERY: Duration = Duration::from_millis(100);
/// How often the caller hears from a swap that is waiting, at least.
const TELL_EVERY: Duration = Duration::from_secs(1);

/// Where progress goes (`None`: the unary RPC, which hears only the end).
pub(super) type Progress = Option<mpsc::Sender<Result<SwapProgress, Status>>>;

async fn tell(progress: &Progress, update: SwapProgress) {
    if let Some(progress) = progress {
        // A caller that went away does not stop the swap.
        let _ = progress.send(Ok(update)).await;
    }
}

impl Services {
    /// Run a whole swap of `wasm`; the final progress is the activation.
    pub(super) async fn swap(&self, wasm: Vec<u8>, progress: Progress) -> Result<SwapProgress, Status> {
        // A component lands in every member's store: it grows the state.
        self.check_space(wasm.len() as u64)?;
        if wasm.len() > self.config.max_plugin_bytes {
            return Err(Status::invalid_argument(format!(
                "the component is {} bytes; the limit is {} (max_plugin_bytes)",
                wasm.len(),
                self.config.max_plugin_bytes
            )));
        }
        // Only the leader runs a swap: a follower would compile the
        // component only to be refused, so it sends the caller on first.
        let status = self.node_status().await?;
        if status.role != "leader" {
            return Err(Status::from(ProposeError::NotLeader {
                leader_id: status.leader_id,
                leader_addr: status.leader_addr(),
            }));
        }
        // Validate and compile before proposing: a bad component never
        // reaches the log, and the compiled code is cached for this node.
        // The compile runs off the raft loop; the caller hears it is on.
        let sandbox = self.sandbox.clone();
        let mut validation = tokio::task::spawn_blocking(move || {
            let plugin = sandbox.load(&wasm);
            (wasm, plugin)
        });
        let (wasm, plugin) = loop {
            tokio::select! {
                done = &mut validation => {
                    break done.map_err(|e| Status::internal(format!("validation task failed: {e}")))?;
                }
                _ = tokio::time::sleep(TELL_EVERY) => {
                    let update = SwapProgress { stage: "validating".into(), ..SwapProgress::default() };
                    tell(&progress, update).await;
                }
            }
        };
        let plugin = plugin.map_err(|e| Status::invalid_argument(format!("plugin swap rejected: {e}")))?;
        let sha256 = plugin.sha256();
        let hex = hex::encode(sha256);
        // Keep the bytes here too: a member that starts from a snapshot taken
        // between the chunks and the swap fetches them from a node that has
        // them.
        self.plugins
            .put_blob(&sha256, &wasm)
            .map_err(|e| Status::internal(e.to_string()))?;

        // Phase 1: the chunks and the prepare entry, committed in order.
        let entries = envelope::plugin_prepare_entries(&wasm, &sha256, self.config.max_proposal_bytes);
        let bytes = wasm.len() as u64;
        drop(wasm);
        let (prepared_at, _) = self.propose_in_order(entries).await?;
        tell(
            &progress,
            SwapProgress {
                stage: "sent".into(),
                sha256: hex.clone(),
                bytes,
                index: prepared_at,
                ..SwapProgress::default()
            },
        )
        .await;
        self.wait_until_voters_ready(&sha256, &hex, &progress).await?;

        // Phase 2: the swap entry.
        let (index, result) = self
            .propose_in_order(vec![envelope::plugin_swap(&sha256, bytes)])
            .await?;
        let message = match result {
            Ok(message) => String::from_utf8_lossy(&message).into_owned(),
            Err(error) => return Err(Status::failed_precondition(error.to_string())),
        };
        let done = SwapProgress {
            stage: "activated".into(),
            sha256: hex,
            index,
            message,
            bytes,
            ..SwapProgress::default()
        };
        tell(&progress, done.clone()).await;
        Ok(done)
    }

    /// Propose `entries` in order, each submitted once the one before it
    /// committed (so a lost chunk fails the swap before the entries after
    /// it); the last one's index and result, once applied.
    async fn propose_in_order(
        &self,
        entries: Vec<Vec<u8>>,
    ) -> Result<(u64, Result<Vec<u8>, crate::sandbox::CallError>), Status> {
        let mut pending = None;
        for data in entries {
            let (reply, answer) = oneshot::channel();
            self.node
                .send(NodeRequest::Propose { data, reply })
                .await
                .map_err(|_| Status::from(ProposeError::Shutdown))?;
            if let Some(previous) = pending.replace(answer) {
                self.applied_within(previous).await?;
            }
        }
        let last = pending.ok_or_else(|| Status::internal("nothing to propose"))?;
        let applied = self.applied_within(last).await?;
        Ok((applied.index, applied.result))
    }

    async fn applied_within(
        &self,
        answer: oneshot::Receiver<Result<crate::fsm::Applied, ProposeError>>,
    ) -> Result<crate::fsm::Applied, Status> {
        match tokio::time::timeout(self.timeout(), answer).await {
            Err(_) => Err(Status::from(ProposeError::Timeout(self.config.request_timeout_ms))),
            Ok(Err(_)) => Err(Status::from(ProposeError::Shutdown)),
            Ok(Ok(result)) => result.map_err(Status::from),
        }
    }

    /// Wait until every voter reports the component compiled. A voter that
    /// fails to compile it fails the swap; one that says nothing of it for
    /// `swap_ready_timeout_ms` does too, by name. Voters still compiling
    /// are waited for: they are making progress.
    async fn wait_until_voters_ready(&self, sha256: &[u8; 32], hex: &str, progress: &Progress) -> Result<(), Status> {
        let silent_limit = Duration::from_millis(self.config.swap_ready_timeout_ms);
        let started = Instant::now();
        let mut told: Option<(u32, Instant)> = None;
        loop {
            let status = self.node_status().await?;
            let voters: Vec<u64> = status
                .members
                .iter()
                .filter(|(_, _, voter)| *voter)
                .map(|(id, _, _)| *id)
                .collect();
            let link = &self.peer.link;
            let mut waiting = Vec::new();
            let mut silent = Vec::new();
            for &voter in &voters {
                let readiness = if voter == link.self_id {
                    link.plugins.own(sha256)
                } else {
                    link.plugins.reported(voter, sha256)
                };
                match readiness {
                    Some(Readiness::Ready) => {}
                    Some(Readiness::Failed(error)) => {
                        return Err(Status::failed_precondition(format!(
                            "plugin swap rejected: node {voter} cannot compile the component: {error}"
                        )));
                    }
                    Some(Readiness::Compiling) => waiting.push(voter),
                    None => {
                        waiting.push(voter);
                        silent.push(voter);
                    }
                }
            }
            let ready = (voters.len() - waiting.len()) as u32;
            if waiting.is_empty() {
                tell(progress, compiling(hex, ready, &voters, waiting)).await;
                return Ok(());
            }
            if !silent.is_empty() && started.elapsed() >= silent_limit {
                let names: Vec<String> = silent.iter().map(u64::to_string).collect();
                return Err(Status::unavailable(format!(
                    "plugin swap not activated: node {} has not reported the component compiled within {} ms \
                     (is it up and reachable?); {ready} of {} voters have; no swap entry was proposed",
                    names.join(", "),
                    self.config.swap_ready_timeout_ms,
                    voters.len()
                )));
            }
            if told.is_none_or(|(count, at)| count != ready || at.elapsed() >= TELL_EVERY) {
                tell(progress, compiling(hex, ready, &voters, waiting)).await;
                told = Some((ready, Instant::now()));
            }
            if *self.stopping.borrow() {
                return Err(Status::from(ProposeError::Shutdown));
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

fn compiling(hex: &str, ready: u32, voters: &[u64], waiting: Vec<u64>) -> SwapProgress {
    SwapProgress {
        stage: "compiling".into(),
        sha256: hex.to_string(),
        ready,
        voters: voters.len() as u32,
        waiting,
        ..SwapProgress::default()
    }
}

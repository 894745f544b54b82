//! The apply loop's work on one entry: a plugin command (in a session or
//! not), a host entry, a conf change; and the queries waiting for an
//! applied index.

use protobuf::Message as _;
use raft::prelude::{ConfChange, ConfChangeType, Entry, EntryType};

use super::{Answered, Fsm, FsmError};
use crate::envelope::{self, HostEntry, Payload};
use crate::sandbox::CallError;
use crate::sessions::Decision;
use crate::storage::LogStore;

impl<S: LogStore> Fsm<S> {
    pub(super) fn serve_pending_queries(&mut self) -> Result<(), FsmError> {
        if self.pending_queries.is_empty() {
            return Ok(());
        }
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending_queries)
            .into_iter()
            .partition(|(read_index, _, _)| *read_index <= applied);
        self.pending_queries = waiting;
        for (_, request, reply) in ready {
            let answer = self.query(&request)?;
            let _ = reply.send(answer);
        }
        Ok(())
    }

    pub(super) fn query(&mut self, request: &[u8]) -> Result<Answered, FsmError> {
        let result = self.instance.query(self.applied, request);
        if let Err(CallError::Trap(message)) = &result {
            tracing::warn!(index = self.applied, %message, "query trapped; rebuilding the plugin instance");
            self.rebuild(self.applied)?;
        }
        Ok(Answered {
            index: self.applied,
            result,
        })
    }

    /// Apply one committed entry. Returns the plugin's result for command
    /// entries and `None` for entries the plugin never sees.
    pub(super) fn apply_entry(&mut self, entry: &Entry) -> Result<Option<Result<Vec<u8>, CallError>>, FsmError> {
        let index = entry.index;
        assert!(
            index == self.applied + 1,
            "entries must be applied in order: got {index} after {}",
            self.applied
        );
        self.log_bytes_since_snapshot = self.log_bytes_since_snapshot.saturating_add(entry.data.len() as u64);
        let mut is_epoch = false;
        let result = match entry.get_entry_type() {
            EntryType::EntryConfChange => {
                self.track_conf_change(index, &entry.data)?;
                None
            }
            EntryType::EntryConfChangeV2 => None,
            EntryType::EntryNormal => match envelope::open(&entry.data) {
                Ok(Payload::Empty) | Ok(Payload::Host(HostEntry::Noop)) => None,
                Ok(Payload::Host(HostEntry::SpaceAlarm { member, on })) => {
                    let changed = if on {
                        self.alarms.insert(member)
                    } else {
                        self.alarms.remove(&member)
                    };
                    if changed {
                        if on {
                            tracing::warn!(index, member, "space alarm on: writes that grow the state are refused");
                        } else {
                            tracing::info!(index, member, "space alarm off");
                        }
                        self.publish_alarms();
                    }
                    None
                }
                Ok(Payload::Host(HostEntry::Limits(limits))) => {
                    // Commands after this run under other limits, which an
                    // epoch's catch-up would not know.
                    self.complete_epoch()?;
                    self.set_cluster_limits(Some(limits), index);
                    Some(Ok(format!("sandbox limits from index {index}: {limits:?}").into_bytes()))
                }
                Ok(Payload::Host(HostEntry::Epoch)) => {
                    is_epoch = true;
                    None
                }
                Ok(Payload::Host(HostEntry::PreparePlugin { sha256, len })) => {
                    Some(Ok(self.prepare_plugin(index, sha256, len)?.into_bytes()))
                }
                Ok(Payload::Command(command)) => Some(self.apply_command(index, command)?),
                Ok(Payload::Host(HostEntry::OpenSession)) => {
                    let id = self.sessions.open(index);
                    self.publish_session_usage();
                    Some(Ok(id.to_be_bytes().to_vec()))
                }
                Ok(Payload::SessionCommand { session, seq, command }) => {
                    let result = match self.sessions.decide(index, session, seq) {
                        Decision::Answer(result) => {
                            if self.successor.is_some() {
                                self.answered.lock().unwrap_or_else(|e| e.into_inner()).insert(index);
                            }
                            result
                        }
                        Decision::Apply => {
                            let result = self.apply_command(index, command)?;
                            self.sessions.record(index, session, seq, &result);
                            result
                        }
                    };
                    self.publish_session_usage();
                    Some(result)
                }
                Ok(Payload::PluginChunk { sha256, offset, bytes }) => {
                    // Chunks wait in memory for their swap entry; a restart
                    // replays them, and a node that starts from a snapshot
                    // taken between them fetches the whole component.
                    self.staged.entry(sha256).or_default().insert(offset, bytes.to_vec());
                    None
                }
                Ok(Payload::PluginSwap { sha256, len }) => {
                    // Compiled ahead by the preparer (waiting for it if it
                    // is still at it), or here, with the same outcome.
                    let prepared = match self.prepared_wasm.remove(&sha256) {
                        Some(wasm) => self.preparer.take(&sha256).map(|plugin| (plugin, wasm)),
                        None => None,
                    };
                    let result = match prepared {
                        Some((plugin, wasm)) => self.apply_swap(index, &sha256, &wasm, Some(plugin))?,
                        None => {
                            let wasm = self.component_for_swap(index, &sha256, len)?;
                            self.apply_swap(index, &sha256, &wasm, None)?
                        }
                    };
                    self.readiness.forget(&sha256);
                    Some(result)
                }
                Err(error) => {
                    // Raft only commits what a leader accepted, and leaders
                    // only accept well-formed envelopes; a malformed one is a
                    // bug or corruption, and every replica sees it alike.
                    tracing::error!(index, %error, "skipping a malformed committed entry");
                    Some(Err(CallError::Guest(format!("malformed entry: {error}"))))
                }
            },
        };
        self.applied = index;
        // An epoch whose snapshot trapped is recorded as a trap: skipped.
        if is_epoch && !self.traps.contains_key(&index) {
            self.begin_epoch()?;
        }
        Ok(result)
    }

    pub(super) fn apply_command(&mut self, index: u64, command: &[u8]) -> Result<Result<Vec<u8>, CallError>, FsmError> {
        if let Some(message) = self.traps.get(&index) {
            return Ok(Err(CallError::Trap(message.clone())));
        }
        let started = std::time::Instant::now();
        let mut result = self.instance.apply(index, command);
        self.metrics.apply_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.apply_fuel.observe(self.instance.last_call_fuel() as f64);
        if result.as_ref().is_err_and(CallError::is_out_of_memory) && !self.replaying {
            // Whether an instance has room depends on what ran in it
            // before: queries only this node served, a snapshot read while
            // writes went on. The outcome must not: try once more on an
            // instance with the history every replica shares (restored
            // from the latest snapshot, the log replayed), and only if it
            // runs out there too is it the entry's outcome.
            tracing::warn!(
                index,
                memory_bytes = self.instance.memory_bytes(),
                "apply ran out of memory; trying again on a fresh instance with the replicas' shared history"
            );
            self.rebuild(index - 1)?;
            result = self.instance.apply(index, command);
            if result.is_ok() {
                tracing::info!(index, "a fresh instance applied what the old one had no memory for");
            }
        }
        if let Err(CallError::Trap(message)) = &result {
            self.metrics.trapped(message);
            tracing::warn!(index, plugin = %self.plugin.sha256_hex(), %message, "apply trapped; the entry has no effect");
            self.record_trap(index, message.clone())?;
            self.rebuild(index - 1)?;
        }
        Ok(result)
    }

    /// Track the configuration and addresses the way raft does, so a
    /// snapshot can carry them as of its index.
    pub(super) fn track_conf_change(&mut self, index: u64, data: &[u8]) -> Result<(), FsmError> {
        let change = ConfChange::parse_from_bytes(data).map_err(|e| FsmError::Malformed {
            index,
            reason: format!("bad conf change: {e}"),
        })?;
        let id = change.node_id;
        if let Err(error) = crate::conf_change::apply(&mut self.conf_state, &change) {
            // Raft refused it as well, and kept its configuration.
            tracing::error!(index, %error, "a committed membership change was refused; the configuration stays as it was");
            return Ok(());
        }
        if change.get_change_type() == ConfChangeType::RemoveNode {
            self.members.remove(&id);
            if self.alarms.remove(&id) {
                self.alarms_tx.send_replace(self.alarms.clone());
            }
        } else if let Some(addr) = crate::conf_change::address(&change) {
            self.members.insert(id, addr);
        }
        Ok(())
    }
}

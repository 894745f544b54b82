//! Storage space: what a node's LMDB holds against a quota, and what is left
//! on the filesystem of its data dir, with the rule for the space alarm
//! (etcd's NOSPACE). A node whose usage passes the quota, or whose
//! filesystem runs below the reserve, reports it; the leader replicates an
//! alarm through the log (`HostEntry::SpaceAlarm`), and while any member's
//! alarm is on, every node refuses proposals that would grow the state.
//!
//! The plugin's memory is space too. A write that needs more memory than
//! `max_memory_bytes` traps, and whether it does can differ between
//! replicas: how much of a wasm memory is free depends on what ran in it
//! before (queries, which only the serving node runs, and snapshots read
//! while writes go on). So the alarm goes on earlier, once an instance's
//! memory passes [`MEMORY_ALARM_PERCENT`] of the cap, and the headroom
//! above it absorbs the writes already on their way: the cap is met by a
//! clear refusal on every node, not by a trap on some.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::envelope::HostEntry;
use crate::storage::LogStore;

/// The space limits as set: `run`'s flags of the "Storage" heading, the
/// same names in a `--config` file, and `RAFTIFY_*` variables. Their
/// defaults depend on the LMDB map and the filesystem, so they are
/// resolved into a [`SpaceConfig`] when the node starts.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[command(next_help_heading = "Storage")]
#[serde(default)]
pub struct SpaceSettings {
    /// The most bytes this node's store may hold before it raises the
    /// cluster's space alarm, which refuses writes [default: 8 GiB, or 80%
    /// of the LMDB map if less].
    #[arg(long, env = "RAFTIFY_QUOTA_BYTES")]
    pub quota_bytes: Option<u64>,
    /// Raise the space alarm when the data dir's filesystem has less free
    /// space than this [default: 256 MiB, or a tenth of a smaller filesystem].
    #[arg(long, env = "RAFTIFY_MIN_FREE_BYTES")]
    pub min_free_bytes: Option<u64>,
}

impl SpaceSettings {
    /// The limits for a store of `map_size_bytes` in `data_dir`.
    pub fn resolve(&self, map_size_bytes: u64, data_dir: &std::path::Path) -> SpaceConfig {
        SpaceConfig {
            quota_bytes: self.quota_bytes.unwrap_or_else(|| default_quota(map_size_bytes)),
            min_free_bytes: self
                .min_free_bytes
                .unwrap_or_else(|| default_min_free(filesystem(data_dir).map_or(0, |(_, total)| total))),
        }
    }
}

/// The limits, resolved when the node starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceConfig {
    /// The most bytes the node's LMDB may hold (pages in use, not counting
    /// the free list LMDB reuses).
    pub quota_bytes: u64,
    /// Raise the alarm when the data dir's filesystem has less free space.
    pub min_free_bytes: u64,
}

/// At most 8 GiB, and never past 80% of the map: LMDB fragments, and a
/// map that fills up refuses every write.
pub fn default_quota(map_size_bytes: u64) -> u64 {
    (8u64 << 30).min(map_size_bytes / 5 * 4)
}

/// 256 MiB, or a tenth of a smaller filesystem.
pub fn default_min_free(filesystem_bytes: u64) -> u64 {
    (256u64 << 20).min(filesystem_bytes / 10)
}

/// Once on, the alarm stays on until usage is back under this share of the
/// quota (and free space over the reserve by this much), so it does not
/// flap around the limit.
const CLEAR_BELOW_PERCENT: u64 = 90;
const CLEAR_ABOVE_RESERVE_PERCENT: u64 = 125;

/// The plugin's memory raises the alarm past this share of the cap, and
/// clears it once back under [`MEMORY_CLEAR_PERCENT`]. Linear memory never
/// shrinks, so it comes back down only when an instance is restored from
/// the state: at an epoch (`snapshot`) or a restart.
pub const MEMORY_ALARM_PERCENT: u64 = 90;
pub const MEMORY_CLEAR_PERCENT: u64 = 80;

/// Whether an instance holding `bytes` of memory under a cap of `cap`
/// bytes is out of memory, given whether it was.
pub fn memory_over(bytes: u64, cap: u64, was_over: bool) -> bool {
    let percent = if was_over {
        MEMORY_CLEAR_PERCENT
    } else {
        MEMORY_ALARM_PERCENT
    };
    u128::from(bytes) * 100 > u128::from(cap) * u128::from(percent)
}

pub use crate::storage::{SpaceUsage, filesystem};

impl SpaceUsage {
    /// Whether the alarm should be on, given whether it was.
    pub fn over(&self, config: &SpaceConfig, was_over: bool) -> bool {
        let fs_known = self.fs_total_bytes > 0;
        if was_over {
            // Limits come from flags: no product of them may overflow.
            let quota_ok =
                self.live_bytes.saturating_mul(100) <= config.quota_bytes.saturating_mul(CLEAR_BELOW_PERCENT);
            let free_ok = !fs_known
                || self.fs_free_bytes.saturating_mul(100)
                    >= config.min_free_bytes.saturating_mul(CLEAR_ABOVE_RESERVE_PERCENT);
            !(quota_ok && free_ok)
        } else {
            self.live_bytes > config.quota_bytes || (fs_known && self.fs_free_bytes < config.min_free_bytes)
        }
    }

    /// Why the alarm is on, for the log and for errors.
    pub fn reason(&self, config: &SpaceConfig) -> String {
        if self.live_bytes > config.quota_bytes {
            format!(
                "the store holds {} bytes, past its quota of {} (quota_bytes)",
                self.live_bytes, config.quota_bytes
            )
        } else {
            format!(
                "the data dir's filesystem has {} bytes free, under the reserve of {} (min_free_bytes)",
                self.fs_free_bytes, config.min_free_bytes
            )
        }
    }
}

/// What this node knows of space, shared by the raft loop (which reads the
/// store), the transport (which tells the leader in every batch), the peer
/// service (which hears what followers tell) and `status`.
#[derive(Debug, Default)]
pub struct SpaceState {
    /// Out of store or disk space.
    over: AtomicBool,
    /// Bytes proposed through this node since the last reading: the store
    /// grows by about as much before the next one shows it.
    proposed_since: AtomicU64,
    usage: Mutex<SpaceUsage>,
    /// The plugin instance's memory and its cap, as the apply worker last
    /// saw them, and whether that is past the memory alarm's mark.
    memory_bytes: AtomicU64,
    memory_cap: AtomicU64,
    memory_over: AtomicBool,
    /// What each member said in its latest batch.
    reports: Mutex<HashMap<u64, Report>>,
}

/// What a member's batch says of its space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Report {
    /// Out of space, for any reason: its alarm should be on.
    pub over: bool,
    /// One of the reasons is its plugin's memory.
    pub memory: bool,
}

impl SpaceState {
    /// Whether this node's own alarm condition holds: out of store or disk
    /// space, or its plugin near its memory cap.
    pub fn over(&self) -> bool {
        self.over.load(Ordering::Relaxed) || self.memory_over()
    }

    /// Whether this node's store is past its quota or its disk under the
    /// reserve.
    pub fn store_over(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Whether this node's plugin is past the memory alarm's mark.
    pub fn memory_over(&self) -> bool {
        self.memory_over.load(Ordering::Relaxed)
    }

    /// The plugin's memory and its cap, in bytes.
    pub fn memory(&self) -> (u64, u64) {
        (
            self.memory_bytes.load(Ordering::Relaxed),
            self.memory_cap.load(Ordering::Relaxed),
        )
    }

    /// The apply worker's reading of its instance: `bytes` of memory under
    /// a cap of `cap`, and whether its last snapshot ran out of memory.
    /// Called after every batch, so the alarm is asked for before the next
    /// write the proposer sends.
    pub fn set_memory(&self, bytes: u64, cap: u64, cannot_snapshot: bool) {
        self.memory_bytes.store(bytes, Ordering::Relaxed);
        self.memory_cap.store(cap, Ordering::Relaxed);
        let was = self.memory_over();
        let over = cannot_snapshot || memory_over(bytes, cap, was);
        if over != was {
            self.memory_over.store(over, Ordering::Relaxed);
            if over {
                tracing::warn!(
                    memory_bytes = bytes,
                    max_memory_bytes = cap,
                    cannot_snapshot,
                    "the plugin's memory passed {MEMORY_ALARM_PERCENT}% of its cap, or is too full to take a \
                     snapshot: asking for the space alarm"
                );
            } else {
                tracing::info!(
                    memory_bytes = bytes,
                    max_memory_bytes = cap,
                    "the plugin's memory is back under its mark"
                );
            }
        }
    }

    pub fn usage(&self) -> SpaceUsage {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `bytes` more would take this node past its quota or under
    /// its reserve (counting what was proposed since the last reading). If
    /// they would, this node is out of space from now on: its alarm is
    /// raised, and it clears only once usage is well under the limits.
    pub fn admit(&self, bytes: u64, config: &SpaceConfig) -> bool {
        let usage = self.usage();
        let since = self
            .proposed_since
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        let quota_ok = usage.live_bytes.saturating_add(since) <= config.quota_bytes;
        let disk_ok = usage.fs_total_bytes == 0 || usage.fs_free_bytes.saturating_sub(since) >= config.min_free_bytes;
        let fits = quota_ok && disk_ok;
        let was_over = !fits && self.over.swap(true, Ordering::Relaxed);
        if !fits && !was_over {
            tracing::warn!(
                bytes,
                live_bytes = usage.live_bytes,
                fs_free_bytes = usage.fs_free_bytes,
                quota_bytes = config.quota_bytes,
                min_free_bytes = config.min_free_bytes,
                "out of space: a write would pass the limits; asking for the space alarm"
            );
        }
        fits
    }

    /// A write failed for lack of space: out of space until readings say
    /// otherwise.
    pub fn mark_out_of_space(&self) {
        self.over.store(true, Ordering::Relaxed);
    }

    /// A member's batch said this. (Batches name their sender; the map
    /// stays bounded whatever ids a peer claims.)
    pub fn report(&self, member: u64, report: Report) {
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        if reports.len() < MAX_REPORTS || reports.contains_key(&member) {
            reports.insert(member, report);
        }
    }

    /// What `member` said last (this node: what holds now).
    pub fn reported(&self, member: u64, own_id: u64) -> Report {
        if member == own_id {
            return Report {
                over: self.over(),
                memory: self.memory_over(),
            };
        }
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&member)
            .copied()
            .unwrap_or_default()
    }
}

/// How often a node reads its space, and how long the leader waits for a
/// proposed alarm change to apply before proposing it again.
const CHECK_EVERY: Duration = Duration::from_secs(1);
const REPROPOSE_AFTER: Duration = Duration::from_secs(5);
/// Senders whose reports are kept.
const MAX_REPORTS: usize = 1024;

/// The raft loop's part: read the store's space once a second, and on the
/// leader, turn what members report into alarm entries for the log.
pub struct SpaceWatch {
    config: SpaceConfig,
    own_id: u64,
    state: Arc<SpaceState>,
    /// The alarms as applied (from the apply worker).
    alarms: watch::Receiver<BTreeSet<u64>>,
    next_check: Instant,
    /// Alarm changes proposed and not yet seen applied.
    proposed: HashMap<u64, (bool, Instant)>,
}

impl SpaceWatch {
    pub fn new(
        config: SpaceConfig,
        own_id: u64,
        state: Arc<SpaceState>,
        alarms: watch::Receiver<BTreeSet<u64>>,
    ) -> SpaceWatch {
        SpaceWatch {
            config,
            own_id,
            state,
            alarms,
            next_check: Instant::now(),
            proposed: HashMap::new(),
        }
    }

    pub fn config(&self) -> SpaceConfig {
        self.config
    }

    pub fn state(&self) -> Arc<SpaceState> {
        self.state.clone()
    }

    /// Called every tick. Returns the alarm entries the leader should
    /// propose now (none on a follower, and none most ticks).
    pub fn tick<S: LogStore>(&mut self, store: &S, leader: bool, members: &[u64]) -> Vec<HostEntry> {
        let now = Instant::now();
        if now < self.next_check {
            return Vec::new();
        }
        self.next_check = now + CHECK_EVERY;
        match store.space() {
            Ok(usage) => {
                let was = self.state.store_over();
                let over = usage.over(&self.config, was);
                if over != was {
                    if over {
                        tracing::warn!(reason = %usage.reason(&self.config), "out of space: asking for the space alarm");
                    } else {
                        tracing::info!(
                            live_bytes = usage.live_bytes,
                            fs_free_bytes = usage.fs_free_bytes,
                            "space is back"
                        );
                    }
                }
                self.state.over.store(over, Ordering::Relaxed);
                *self.state.usage.lock().unwrap_or_else(|e| e.into_inner()) = usage;
                self.state.proposed_since.store(0, Ordering::Relaxed);
            }
            Err(error) => tracing::warn!(%error, "cannot read the store's space"),
        }
        if !leader {
            self.proposed.clear();
            return Vec::new();
        }
        let applied = self.alarms.borrow().clone();
        self.proposed
            .retain(|member, (on, at)| applied.contains(member) != *on && now.duration_since(*at) < REPROPOSE_AFTER);
        let mut entries = Vec::new();
        for &member in members {
            let over = self.state.reported(member, self.own_id).over;
            if over != applied.contains(&member) && !self.proposed.contains_key(&member) {
                self.proposed.insert(member, (over, now));
                entries.push(HostEntry::SpaceAlarm { member, on: over });
            }
        }
        // An alarm for a node no longer a member is dropped as it leaves
        // (the apply worker does that); nothing to propose for it.
        entries
    }

    /// `alarm disarm`: propose every applied alarm off. A member still out
    /// of space asks for it again at its next check.
    pub fn disarm(&mut self) -> Vec<HostEntry> {
        let applied = self.alarms.borrow().clone();
        applied
            .into_iter()
            .map(|member| {
                self.proposed.insert(member, (false, Instant::now()));
                HostEntry::SpaceAlarm { member, on: false }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: SpaceConfig = SpaceConfig {
        quota_bytes: 1000,
        min_free_bytes: 100,
    };

    fn usage(live: u64, free: u64) -> SpaceUsage {
        SpaceUsage {
            file_bytes: live * 2,
            live_bytes: live,
            fs_free_bytes: free,
            fs_total_bytes: 10_000,
        }
    }

    #[test]
    fn the_alarm_goes_on_past_the_quota_or_under_the_reserve() {
        assert!(!usage(1000, 100).over(&CONFIG, false));
        assert!(usage(1001, 5000).over(&CONFIG, false));
        assert!(usage(10, 99).over(&CONFIG, false));
        assert!(usage(1001, 5000).reason(&CONFIG).contains("quota_bytes"));
        assert!(usage(10, 99).reason(&CONFIG).contains("min_free_bytes"));
    }

    #[test]
    fn once_on_it_clears_only_well_under_the_limits() {
        assert!(
            usage(950, 5000).over(&CONFIG, true),
            "back under the quota, not by enough"
        );
        assert!(!usage(900, 5000).over(&CONFIG, true));
        assert!(usage(10, 120).over(&CONFIG, true), "over the reserve, not by enough");
        assert!(!usage(10, 125).over(&CONFIG, true));
    }

    #[test]
    fn the_plugin_memory_alarm_goes_on_near_the_cap_and_clears_well_under_it() {
        let cap = 1000;
        assert!(!memory_over(900, cap, false));
        assert!(memory_over(901, cap, false));
        assert!(memory_over(850, cap, true), "back under the mark, not by enough");
        assert!(!memory_over(800, cap, true));
        assert!(memory_over(u64::MAX, u64::MAX, false), "no overflow at the edge");
        assert!(!memory_over(u64::MAX / 2, u64::MAX, false));

        let state = SpaceState::default();
        state.set_memory(950, cap, false);
        assert!(state.over() && state.memory_over() && !state.store_over());
        assert_eq!(
            state.reported(7, 7),
            Report {
                over: true,
                memory: true
            },
            "this node says what holds now"
        );
        assert_eq!(state.reported(8, 7), Report::default(), "a member that said nothing");
        state.report(
            8,
            Report {
                over: true,
                memory: false,
            },
        );
        assert_eq!(
            state.reported(8, 7),
            Report {
                over: true,
                memory: false
            }
        );
        state.set_memory(850, cap, false);
        assert!(state.over(), "still on above the clearing mark");
        state.set_memory(700, cap, false);
        assert!(!state.over());
        state.set_memory(100, cap, true);
        assert!(
            state.memory_over(),
            "a plugin that cannot snapshot is full, whatever its size"
        );
    }

    #[test]
    fn limits_at_the_edge_of_u64_do_not_overflow() {
        let huge = SpaceConfig {
            quota_bytes: u64::MAX,
            min_free_bytes: u64::MAX,
        };
        assert!(usage(10, 5000).over(&huge, false), "no disk has u64::MAX free");
        assert!(usage(10, 5000).over(&huge, true));
        assert!(!SpaceState::default().admit(u64::MAX, &CONFIG));
    }

    #[test]
    fn an_unknown_filesystem_counts_only_the_quota() {
        let unknown = SpaceUsage {
            live_bytes: 10,
            ..Default::default()
        };
        assert!(!unknown.over(&CONFIG, false));
        assert!(!unknown.over(&CONFIG, true));
    }

    #[test]
    fn defaults_stay_under_the_map_and_the_disk() {
        assert_eq!(default_quota(16 << 30), 8 << 30);
        assert_eq!(default_quota(1 << 30), (1u64 << 30) / 5 * 4);
        assert_eq!(default_min_free(1 << 40), 256 << 20);
        assert_eq!(default_min_free(48 << 20), (48u64 << 20) / 10);
    }
}

//! The apply worker's restores: the stored snapshot (or one a leader sent)
//! fed to a fresh instance piece by piece with `restore-begin`,
//! `restore-chunk` and `restore-finish`, its header read first, and the
//! epoch digest of its bytes taken on the way.

use std::ops::ControlFlow;
use std::time::Instant;

use raft::prelude::SnapshotMetadata;

use super::epoch::Feed;
use super::{Fsm, FsmError};
use crate::sandbox::{Instance, Plugin};
use crate::snapshot::{self, Step};
use crate::storage::LogStore;

/// A restore in progress: the header first, then the state into `instance`.
struct Restoring {
    index: u64,
    /// The plugin the snapshot's header names.
    plugin: Plugin,
    started: Instant,
    reader: snapshot::Reader,
    instance: Option<(Plugin, Instance)>,
    feed: Option<Feed>,
    state_bytes: u64,
    /// Of the snapshot's bytes, header and state: the epoch's digest.
    hasher: sha2::Sha256,
    error: Option<FsmError>,
}

impl<S: LogStore> Fsm<S> {
    /// Restore the stored snapshot into a fresh instance; `false` if there
    /// is none. The plugin it names is looked up first (from the store, or
    /// fetched from a member), outside the read of the snapshot: no other
    /// transaction may open on this thread while that read is open.
    pub(super) fn restore_stored(&mut self) -> Result<bool, FsmError> {
        self.abandon_snapshot()?;
        let store = self.store.clone();
        loop {
            // Pass one: the header.
            let mut reader = snapshot::Reader::default();
            let mut header = None;
            let first = store.read_snapshot(&mut |_, piece| match reader.push(piece) {
                Ok(Step::More) => ControlFlow::Continue(()),
                Ok(Step::Header(found, _)) => {
                    header = Some(Ok(found));
                    ControlFlow::Break(())
                }
                Ok(Step::State(_)) => ControlFlow::Break(()),
                Err(error) => {
                    header = Some(Err(error));
                    ControlFlow::Break(())
                }
            })?;
            let Some(first) = first else { return Ok(false) };
            let index = first.index;
            let header = header
                .ok_or_else(|| snapshot::SnapshotError::Malformed("truncated header".into()))
                .and_then(|header| header)
                .map_err(|e| FsmError::Restore {
                    index,
                    reason: e.to_string(),
                })?;
            let plugin = self.plugin_by_sha(&header.plugin_sha256)?;
            // Pass two: the state, into an instance of that plugin.
            let mut restoring = Restoring::new(index, plugin);
            let metadata = store.read_snapshot(&mut |metadata, piece| {
                if metadata.index != index {
                    return ControlFlow::Break(());
                }
                self.feed_restore(&mut restoring, piece)
            })?;
            match metadata {
                // A newer snapshot was installed between the passes.
                Some(metadata) if metadata.index != index => continue,
                Some(metadata) => {
                    self.finish_restore(&metadata, restoring)?;
                    return Ok(true);
                }
                None => return Ok(false),
            }
        }
    }

    /// Restore the snapshot raft installed. The store may hold a newer
    /// one by now (installed while this request waited): that one is
    /// restored, and the entries it covers are skipped when they arrive.
    pub(super) fn restore_installed(&mut self, installed: &SnapshotMetadata) -> Result<(), FsmError> {
        if installed.index <= self.applied {
            return Ok(());
        }
        let stored = self.store.snapshot_metadata()?.index;
        if stored < installed.index {
            return Err(FsmError::Restore {
                index: installed.index,
                reason: format!("the store holds the snapshot at {stored} instead"),
            });
        }
        self.restore_stored().map(drop)
    }

    fn feed_restore(&mut self, restoring: &mut Restoring, piece: &[u8]) -> ControlFlow<()> {
        match self.restore_piece(restoring, piece) {
            Ok(()) => ControlFlow::Continue(()),
            Err(error) => {
                restoring.error = Some(error);
                ControlFlow::Break(())
            }
        }
    }

    fn restore_piece(&mut self, restoring: &mut Restoring, piece: &[u8]) -> Result<(), FsmError> {
        let index = restoring.index;
        let failed = |reason: String| FsmError::Restore { index, reason };
        sha2::Digest::update(&mut restoring.hasher, piece);
        let state = match restoring.reader.push(piece).map_err(|e| failed(e.to_string()))? {
            Step::More => return Ok(()),
            Step::Header(header, rest) => {
                // The snapshot names the plugin that made it: the one looked
                // up before the read.
                if header.plugin_sha256 != restoring.plugin.sha256() {
                    return Err(failed("the snapshot changed while it was read".into()));
                }
                self.members = header.members.into_iter().collect();
                self.alarms = header.alarms.into_iter().collect();
                self.publish_alarms();
                self.set_cluster_limits(header.limits, index);
                self.sessions = header.sessions;
                self.publish_session_usage();
                let plugin = restoring.plugin.clone();
                let mut instance = self.instantiate(&plugin)?;
                let feed = Feed::begin(index, &mut instance)
                    .map_err(|e| failed(format!("the plugin's restore() failed: {e}")))?;
                restoring.instance = Some((plugin, instance));
                restoring.feed = Some(feed);
                std::borrow::Cow::Owned(rest)
            }
            Step::State(bytes) => std::borrow::Cow::Borrowed(bytes),
        };
        if state.is_empty() {
            return Ok(());
        }
        let (_, instance) = restoring.instance.as_mut().expect("the header comes first");
        let feed = restoring.feed.as_mut().expect("the header comes first");
        feed.push(instance, &state)
            .map_err(|e| failed(format!("the plugin's restore() failed: {e}")))?;
        restoring.state_bytes += state.len() as u64;
        Ok(())
    }

    fn finish_restore(&mut self, metadata: &SnapshotMetadata, restoring: Restoring) -> Result<(), FsmError> {
        let index = metadata.index;
        let failed = |reason: &str| FsmError::Restore {
            index,
            reason: reason.to_string(),
        };
        if let Some(error) = restoring.error {
            return Err(error);
        }
        let ((plugin, mut instance), feed) = restoring
            .instance
            .zip(restoring.feed)
            .ok_or_else(|| failed("not a raftify snapshot: truncated header"))?;
        feed.finish(&mut instance)
            .map_err(|e| failed(&format!("the plugin's restore() failed: {e}")))?;
        // A node that starts from a leader's snapshot learns its plugin
        // history from there on.
        if self.store.plugin_history()?.last().map(|(_, sha)| *sha) != Some(plugin.sha256())
            && let Some(wasm) = self.store.plugin_blob(&plugin.sha256())?
        {
            self.store.activate_plugin(index, &plugin.sha256(), &wasm)?;
        }
        // Stored snapshots are taken at epochs: this is where the others'
        // state is compared with the one restored here.
        self.epochs.applied_epoch(index);
        self.epochs
            .record((index, sha2::Digest::finalize(restoring.hasher).into()));
        self.plugin = plugin;
        self.instance = instance;
        self.applied = index;
        self.snapshot_index = self.snapshot_index.max(index);
        self.snapshot_bytes = restoring.state_bytes;
        self.log_bytes_since_snapshot = 0;
        self.conf_state = metadata.get_conf_state().clone();
        tracing::info!(
            index,
            state_bytes = restoring.state_bytes,
            elapsed_ms = restoring.started.elapsed().as_millis() as u64,
            "restored a snapshot"
        );
        self.answer_snapshot_waiters();
        Ok(())
    }
}

impl Restoring {
    fn new(index: u64, plugin: Plugin) -> Restoring {
        Restoring {
            index,
            plugin,
            started: Instant::now(),
            reader: snapshot::Reader::default(),
            instance: None,
            feed: None,
            state_bytes: 0,
            hasher: sha2::Digest::new(),
            error: None,
        }
    }
}

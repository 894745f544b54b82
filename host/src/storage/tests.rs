//! The storage conformance suite: every [`LogStore`] must pass it.

use raft::prelude::{ConfState, Entry, HardState};
use raft::{GetEntriesContext, Storage, StorageError};

use super::lmdb::{LmdbOptions, LmdbStore, SNAPSHOT_CHUNK_BYTES};
use super::mem::MemStore;
use super::{LogStore, NodeIdentity, WriteBatch};

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("data-{index}-{term}").into_bytes().into(),
        ..Default::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

fn append<S: LogStore>(store: &S, es: Vec<Entry>) {
    store
        .write(WriteBatch {
            entries: es,
            ..Default::default()
        })
        .unwrap();
}

fn read<S: LogStore>(store: &S, low: u64, high: u64, max: Option<u64>) -> raft::Result<Vec<Entry>> {
    store.entries(low, high, max, GetEntriesContext::empty(false))
}

fn indexes_terms(es: &[Entry]) -> Vec<(u64, u64)> {
    es.iter().map(|e| (e.index, e.term)).collect()
}

fn is_store_error(result: raft::Result<impl std::fmt::Debug>, expected: StorageError) -> bool {
    matches!(result, Err(raft::Error::Store(e)) if e == expected)
}

fn a_fresh_store_is_empty<S: LogStore>(store: S) {
    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 0);
    let state = store.initial_state().unwrap();
    assert_eq!(state.hard_state, HardState::default());
    assert_eq!(state.conf_state, ConfState::default());
    assert_eq!(store.term(0).unwrap(), 0);
    assert!(is_store_error(store.term(1), StorageError::Unavailable));
    assert_eq!(store.applied_index().unwrap(), 0);
    assert_eq!(store.identity().unwrap(), None);
}

fn appended_entries_read_back<S: LogStore>(store: S) {
    append(&store, entries(1..=5, 1));
    assert_eq!(store.first_index().unwrap(), 1);
    assert_eq!(store.last_index().unwrap(), 5);
    assert_eq!(read(&store, 1, 6, None).unwrap(), entries(1..=5, 1));
    assert_eq!(read(&store, 2, 4, None).unwrap(), entries(2..=3, 1));
    assert_eq!(store.term(3).unwrap(), 1);
    assert!(is_store_error(read(&store, 1, 7, None), StorageError::Unavailable));
    assert!(is_store_error(store.term(6), StorageError::Unavailable));
}

fn max_size_limits_but_returns_at_least_one<S: LogStore>(store: S) {
    append(&store, entries(1..=5, 1));
    assert_eq!(read(&store, 1, 6, Some(0)).unwrap().len(), 1);
    let all = read(&store, 1, 6, None).unwrap();
    let two: u64 = all[..2].iter().map(|e| protobuf::Message::compute_size(e) as u64).sum();
    let limited = read(&store, 1, 6, Some(two)).unwrap();
    assert_eq!(limited.len(), 2, "exactly the two that fit");
    let limited = read(&store, 1, 6, Some(two - 1)).unwrap();
    assert_eq!(limited.len(), 1, "one byte short of two");
}

fn a_new_leader_overwrites_the_tail<S: LogStore>(store: S) {
    append(&store, entries(1..=5, 1));
    append(&store, entries(3..=4, 2));
    assert_eq!(store.last_index().unwrap(), 4);
    assert_eq!(
        indexes_terms(&read(&store, 1, 5, None).unwrap()),
        vec![(1, 1), (2, 1), (3, 2), (4, 2)]
    );
}

fn bad_batches_are_refused_whole<S: LogStore>(store: S) {
    append(&store, entries(1..=3, 1));
    let hole = WriteBatch {
        entries: entries(5..=6, 1),
        hard_state: Some(HardState {
            term: 9,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(store.write(hole).is_err());
    let mut gappy = entries(4..=5, 1);
    gappy[1].index = 7;
    assert!(
        store
            .write(WriteBatch {
                entries: gappy,
                ..Default::default()
            })
            .is_err()
    );
    // Nothing from the refused batches landed.
    assert_eq!(store.last_index().unwrap(), 3);
    assert_eq!(store.initial_state().unwrap().hard_state.term, 0);
}

fn hard_state_conf_state_and_applied_persist<S: LogStore>(store: S) {
    let hard_state = HardState {
        term: 3,
        vote: 2,
        commit: 7,
        ..Default::default()
    };
    let conf_state = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    store
        .write(WriteBatch {
            entries: entries(1..=7, 3),
            hard_state: Some(hard_state.clone()),
            conf_state: Some((conf_state.clone(), 5)),
            identity: None,
            applied_index: Some(6),
        })
        .unwrap();
    let state = store.initial_state().unwrap();
    assert_eq!(state.hard_state, hard_state);
    assert_eq!(state.conf_state, conf_state);
    assert_eq!(store.conf_index().unwrap(), 5);
    assert_eq!(store.applied_index().unwrap(), 6);
}

fn traps_and_identity_are_recorded<S: LogStore>(store: S) {
    store.record_trap(4, "out of fuel").unwrap();
    store.record_trap(9, "panic").unwrap();
    assert_eq!(
        store.traps(0, 100).unwrap(),
        vec![(4, "out of fuel".into()), (9, "panic".into())]
    );
    assert_eq!(store.traps(5, 100).unwrap(), vec![(9, "panic".into())]);
    let identity = NodeIdentity {
        id: 2,
        members: vec![(1, "127.0.0.1:1".into()), (2, "127.0.0.1:2".into())],
        max_id: 2,
        cluster_id: 0x5eed,
    };
    store.set_identity(&identity).unwrap();
    assert_eq!(store.identity().unwrap(), Some(identity.clone()));
    let moved = NodeIdentity {
        members: vec![(2, "127.0.0.1:2".into()), (5, "127.0.0.1:5".into())],
        max_id: 5,
        ..identity
    };
    store
        .write(WriteBatch {
            identity: Some(moved.clone()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(store.identity().unwrap(), Some(moved));
}

fn plugins_are_stored_once_with_their_history<S: LogStore>(store: S) {
    use sha2::Digest as _;
    assert_eq!(store.active_plugin().unwrap(), None);
    let v1 = b"\0asm pretend component v1".to_vec();
    let v2 = b"\0asm pretend component v2".to_vec();
    let sha1: [u8; 32] = sha2::Sha256::digest(&v1).into();
    let sha2: [u8; 32] = sha2::Sha256::digest(&v2).into();
    store.activate_plugin(0, &sha1, &v1).unwrap();
    store.activate_plugin(57, &sha2, &v2).unwrap();
    store.activate_plugin(57, &sha2, &v2).unwrap();
    assert_eq!(store.plugin_history().unwrap(), vec![(0, sha1), (57, sha2)]);
    assert_eq!(store.active_plugin().unwrap(), Some((sha2, v2.clone())));
    assert_eq!(store.first_plugin().unwrap(), Some((sha1, v1)));
    assert_eq!(store.plugin_blob(&[0; 32]).unwrap(), None);
    store.put_plugin_blob(&sha2, b"ignored: already stored").unwrap();
    assert_eq!(store.plugin_blob(&sha2).unwrap(), Some(v2));
}

fn snapshot_at(index: u64, term: u64, voters: Vec<u64>, data: &[u8]) -> raft::prelude::Snapshot {
    let mut snapshot = raft::prelude::Snapshot::default();
    let metadata = snapshot.mut_metadata();
    metadata.index = index;
    metadata.term = term;
    metadata.mut_conf_state().voters = voters;
    snapshot.data = data.to_vec().into();
    snapshot
}

fn a_saved_snapshot_compacts_the_log_it_covers<S: LogStore>(store: S) {
    append(&store, entries(1..=10, 2));
    // The commit index on disk lags (it is persisted lazily)...
    store
        .write(WriteBatch {
            hard_state: Some(HardState {
                term: 2,
                vote: 1,
                commit: 6,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
    store.save_snapshot(&snapshot_at(8, 2, vec![1], b"state@8"), 5).unwrap();
    // ...so saving a snapshot raises it: raft will not start with a snapshot
    // past its commit index.
    let hard_state = store.initial_state().unwrap().hard_state;
    assert_eq!((hard_state.term, hard_state.vote, hard_state.commit), (2, 1, 8));
    assert_eq!(store.first_index().unwrap(), 6);
    assert_eq!(store.last_index().unwrap(), 10);
    assert!(is_store_error(read(&store, 5, 11, None), StorageError::Compacted));
    assert_eq!(read(&store, 6, 11, None).unwrap(), entries(6..=10, 2));
    assert_eq!(store.term(8).unwrap(), 2);
    assert!(is_store_error(store.term(4), StorageError::Compacted));
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), b"state@8");
    assert_eq!(store.snapshot(8, 1).unwrap().get_metadata().index, 8);
    // Too old for raft, or made before the member it is for joined: not
    // served (raft's view of the store, `Staged`, then wants a new one).
    assert!(is_store_error(
        store.snapshot(9, 1),
        StorageError::SnapshotTemporarilyUnavailable
    ));
    assert!(is_store_error(
        store.snapshot(8, 4),
        StorageError::SnapshotTemporarilyUnavailable
    ));

    // A batch queued before the snapshot, with the commit index it knew
    // then, lands after it: the commit index stays where the snapshot put it.
    store
        .write(WriteBatch {
            hard_state: Some(HardState {
                term: 3,
                vote: 2,
                commit: 6,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
    let hard_state = store.initial_state().unwrap().hard_state;
    assert_eq!((hard_state.term, hard_state.vote, hard_state.commit), (3, 2, 8));

    // An older snapshot never replaces a newer one; one past the log is refused.
    store.save_snapshot(&snapshot_at(7, 2, vec![1], b"old"), 7).unwrap();
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), b"state@8");
    assert!(
        store
            .save_snapshot(&snapshot_at(11, 2, vec![1], b"future"), 11)
            .is_err()
    );

    // Compacting everything the snapshot covers leaves the log starting after it.
    store
        .save_snapshot(&snapshot_at(10, 2, vec![1], b"state@10"), 10)
        .unwrap();
    assert_eq!(store.first_index().unwrap(), 11);
    assert_eq!(store.last_index().unwrap(), 10);
    assert_eq!(store.term(10).unwrap(), 2);
    append(&store, entries(11..=12, 3));
    assert_eq!(store.last_index().unwrap(), 12);
}

fn an_installed_snapshot_replaces_the_log<S: LogStore>(store: S) {
    append(&store, entries(1..=5, 1));
    let hard_state = HardState {
        term: 4,
        commit: 20,
        ..Default::default()
    };
    store
        .install_snapshot(&snapshot_at(20, 3, vec![1, 2, 3], b"state@20"), &hard_state)
        .unwrap();
    assert_eq!(store.first_index().unwrap(), 21);
    assert_eq!(store.last_index().unwrap(), 20);
    assert_eq!(store.term(20).unwrap(), 3);
    let state = store.initial_state().unwrap();
    assert_eq!(state.hard_state, hard_state);
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
    assert_eq!(store.conf_index().unwrap(), 20);
    append(&store, entries(21..=22, 4));
    assert_eq!(read(&store, 21, 23, None).unwrap(), entries(21..=22, 4));
    assert!(
        store
            .write(WriteBatch {
                entries: entries(15..=15, 4),
                ..Default::default()
            })
            .is_err()
    );
}

fn read_back<S: LogStore>(store: &S) -> Option<(u64, Vec<u8>)> {
    let mut data = Vec::new();
    let metadata = store
        .read_snapshot(&mut |metadata, piece| {
            assert!(metadata.index > 0);
            data.extend_from_slice(piece);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    metadata.map(|m| (m.index, data))
}

fn a_snapshot_saved_in_pieces_reads_back_in_pieces<S: LogStore>(store: S) {
    append(&store, entries(1..=10, 2));
    assert_eq!(read_back(&store), None);
    assert_eq!(store.stored_snapshot_len().unwrap(), None);
    let data: Vec<u8> = (0..5000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut save = store.begin_snapshot_save().unwrap();
    for piece in data.chunks(3001) {
        store.put_snapshot_piece(&mut save, piece).unwrap();
    }
    assert_eq!(save.len(), data.len() as u64);
    let metadata = snapshot_at(8, 2, vec![1], &[]).take_metadata();
    assert!(store.finish_snapshot_save(save, &metadata, 5).unwrap());
    assert_eq!(read_back(&store), Some((8, data.clone())));
    assert_eq!(store.stored_snapshot_len().unwrap(), Some((8, data.len() as u64)));
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.to_vec(), data);
    assert_eq!(store.first_index().unwrap(), 6);

    // A save that is overtaken by a newer snapshot is dropped, not stored.
    let mut stale = store.begin_snapshot_save().unwrap();
    store.put_snapshot_piece(&mut stale, b"stale").unwrap();
    store.save_snapshot(&snapshot_at(9, 2, vec![1], b"newer"), 5).unwrap();
    let metadata = snapshot_at(10, 2, vec![1], &[]).take_metadata();
    assert!(!store.finish_snapshot_save(stale, &metadata, 5).unwrap());
    assert_eq!(read_back(&store), Some((9, b"newer".to_vec())));
    assert_eq!(store.stored_snapshot_len().unwrap(), Some((9, 5)));
    // So is one older than what is stored.
    let old = store.begin_snapshot_save().unwrap();
    let metadata = snapshot_at(7, 2, vec![1], &[]).take_metadata();
    assert!(!store.finish_snapshot_save(old, &metadata, 5).unwrap());
    assert_eq!(read_back(&store), Some((9, b"newer".to_vec())));
}

macro_rules! conformance {
    ($module:ident, $make:expr) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn a_fresh_store_is_empty() {
                let (store, _guard) = $make;
                super::a_fresh_store_is_empty(store);
            }
            #[test]
            fn appended_entries_read_back() {
                let (store, _guard) = $make;
                super::appended_entries_read_back(store);
            }
            #[test]
            fn max_size_limits_but_returns_at_least_one() {
                let (store, _guard) = $make;
                super::max_size_limits_but_returns_at_least_one(store);
            }
            #[test]
            fn a_new_leader_overwrites_the_tail() {
                let (store, _guard) = $make;
                super::a_new_leader_overwrites_the_tail(store);
            }
            #[test]
            fn bad_batches_are_refused_whole() {
                let (store, _guard) = $make;
                super::bad_batches_are_refused_whole(store);
            }
            #[test]
            fn hard_state_conf_state_and_applied_persist() {
                let (store, _guard) = $make;
                super::hard_state_conf_state_and_applied_persist(store);
            }
            #[test]
            fn a_saved_snapshot_compacts_the_log_it_covers() {
                let (store, _guard) = $make;
                super::a_saved_snapshot_compacts_the_log_it_covers(store);
            }
            #[test]
            fn an_installed_snapshot_replaces_the_log() {
                let (store, _guard) = $make;
                super::an_installed_snapshot_replaces_the_log(store);
            }
            #[test]
            fn plugins_are_stored_once_with_their_history() {
                let (store, _guard) = $make;
                super::plugins_are_stored_once_with_their_history(store);
            }
            #[test]
            fn a_snapshot_saved_in_pieces_reads_back_in_pieces() {
                let (store, _guard) = $make;
                super::a_snapshot_saved_in_pieces_reads_back_in_pieces(store);
            }
            #[test]
            fn traps_and_identity_are_recorded() {
                let (store, _guard) = $make;
                super::traps_and_identity_are_recorded(store);
            }
        }
    };
}

fn lmdb() -> (LmdbStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    (store, dir)
}

fn small() -> LmdbOptions {
    LmdbOptions {
        map_size_bytes: 64 << 20,
        unsafe_no_fsync: false,
    }
}

conformance!(mem_store, (MemStore::new(), ()));
conformance!(lmdb_store, lmdb());

#[test]
fn lmdb_keeps_everything_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LmdbStore::open(dir.path(), &small()).unwrap();
        store
            .write(WriteBatch {
                entries: entries(1..=10, 2),
                hard_state: Some(HardState {
                    term: 2,
                    vote: 1,
                    commit: 10,
                    ..Default::default()
                }),
                conf_state: Some((
                    ConfState {
                        voters: vec![1],
                        ..Default::default()
                    },
                    0,
                )),
                identity: None,
                applied_index: Some(10),
            })
            .unwrap();
        store.record_trap(5, "boom").unwrap();
    }
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!(store.last_index().unwrap(), 10);
    assert_eq!(read(&store, 1, 11, None).unwrap(), entries(1..=10, 2));
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 10);
    assert_eq!(store.initial_state().unwrap().conf_state.voters, vec![1]);
    assert_eq!(store.applied_index().unwrap(), 10);
    assert_eq!(store.traps(0, 11).unwrap(), vec![(5, "boom".into())]);
}

#[test]
fn lmdb_reports_a_corrupt_entry_instead_of_panicking() {
    let (store, _dir) = lmdb();
    append(&store, entries(1..=2, 1));
    store.corrupt_entry_for_test(2);
    assert!(read(&store, 1, 3, None).is_err());
    // Terms are kept in memory, as written: they stay right.
    assert_eq!(store.term(2).unwrap(), 1);
    // Opening checks every record: the damage is named, not replayed.
    let dir = _dir.path().to_path_buf();
    drop(store);
    let error = LmdbStore::open(&dir, &small())
        .err()
        .expect("a corrupt log must not open")
        .to_string();
    assert!(error.contains("checksum"), "{error}");
}

/// A store whose log held `log` when it installed a snapshot at `index`
/// (of `term`, with hard state `hard_state`), reopened as if the crash came
/// between LMDB's commit of the install and the log's reset.
fn installed_with_its_reset_cut_off(
    dir: &std::path::Path,
    log: Vec<Entry>,
    (index, term): (u64, u64),
    hard_state: &HardState,
) -> LmdbStore {
    let wal = dir.join("wal");
    let kept = dir.join("wal-before-install");
    {
        let store = LmdbStore::open(dir, &small()).unwrap();
        append(&store, log);
        copy_dir(&wal, &kept);
        store
            .install_snapshot(&snapshot_at(index, term, vec![1], b"state"), hard_state)
            .unwrap();
    }
    std::fs::remove_dir_all(&wal).unwrap();
    std::fs::rename(&kept, &wal).unwrap();
    LmdbStore::open(dir, &small()).unwrap()
}

fn hard_state(term: u64, commit: u64) -> HardState {
    HardState {
        term,
        commit,
        ..Default::default()
    }
}

#[test]
fn lmdb_drops_the_old_log_when_a_crash_cut_off_an_installs_reset() {
    let dir = tempfile::tempdir().unwrap();
    let store = installed_with_its_reset_cut_off(dir.path(), entries(1..=30, 1), (20, 3), &hard_state(4, 20));
    // The old log's entry 20 has term 1, not the snapshot's 3: replaced.
    assert_eq!(store.first_index().unwrap(), 21);
    assert_eq!(store.last_index().unwrap(), 20);
    assert_eq!(store.term(20).unwrap(), 3);
    let state = store.initial_state().unwrap().hard_state;
    assert_eq!((state.term, state.commit), (4, 20));
    append(&store, entries(21..=22, 4));
    assert_eq!(read(&store, 21, 23, None).unwrap(), entries(21..=22, 4));
    // The old log stays dropped: what came after it replays alone.
    drop(store);
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (21, 22));
    assert_eq!(read(&store, 21, 23, None).unwrap(), entries(21..=22, 4));
}

#[test]
fn lmdb_goes_on_after_a_snapshot_past_its_whole_log_whose_reset_was_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let store = installed_with_its_reset_cut_off(dir.path(), entries(1..=10, 1), (20, 2), &hard_state(2, 20));
    assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (21, 20));
    append(&store, entries(21..=21, 2));
    drop(store);
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (21, 21));
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 20);
}

#[test]
fn lmdb_keeps_a_log_that_holds_the_snapshots_entry_and_never_commits_past_it() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LmdbStore::open(dir.path(), &small()).unwrap();
        store
            .write(WriteBatch {
                entries: entries(1..=10, 2),
                hard_state: Some(HardState {
                    term: 2,
                    commit: 8,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .unwrap();
        store.save_snapshot(&snapshot_at(6, 2, vec![1], b"state@6"), 4).unwrap();
    }
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!((store.first_index().unwrap(), store.last_index().unwrap()), (5, 10));
    assert_eq!(store.initial_state().unwrap().hard_state.commit, 8);
    assert_eq!(read(&store, 5, 11, None).unwrap(), entries(5..=10, 2));
}

#[test]
fn lmdb_moves_a_log_kept_in_lmdb_into_the_write_ahead_log() {
    let dir = tempfile::tempdir().unwrap();
    let hard_state = HardState {
        term: 3,
        vote: 2,
        commit: 7,
        ..Default::default()
    };
    {
        let store = LmdbStore::open(dir.path(), &small()).unwrap();
        store.put_lmdb_log_for_test(&entries(1..=9, 3), &hard_state, 6);
    }
    // A data dir from before the log, and an earlier move a crash cut short.
    std::fs::remove_dir_all(dir.path().join("wal")).unwrap();
    std::fs::create_dir(dir.path().join("wal.new")).unwrap();
    std::fs::write(dir.path().join("wal.new").join("0000000000000001.wal"), b"half").unwrap();
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!(read(&store, 1, 10, None).unwrap(), entries(1..=9, 3));
    assert_eq!(store.initial_state().unwrap().hard_state, hard_state);
    assert_eq!(store.applied_index().unwrap(), 6);
    assert!(!dir.path().join("wal.new").exists());
    assert_eq!(store.lmdb_log_len_for_test(), 0, "the LMDB copy is cleared");
    append(&store, entries(10..=10, 3));
    drop(store);
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!(store.last_index().unwrap(), 10);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir(to).unwrap();
    for item in std::fs::read_dir(from).unwrap() {
        let item = item.unwrap();
        std::fs::copy(item.path(), to.join(item.file_name())).unwrap();
    }
}

/// Data of `len` bytes that differs chunk to chunk, so a misordered or
/// missing chunk shows.
fn patterned(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 4096) as u8 ^ seed).collect()
}

#[test]
fn lmdb_stores_a_large_snapshot_in_chunks_and_keeps_only_the_latest() {
    let dir = tempfile::tempdir().unwrap();
    let big = patterned(2 * SNAPSHOT_CHUNK_BYTES + 123, 1);
    {
        let store = LmdbStore::open(dir.path(), &small()).unwrap();
        append(&store, entries(1..=10, 2));
        store.save_snapshot(&snapshot_at(5, 2, vec![1], &big), 4).unwrap();
        assert_eq!(store.chunk_count_for_test(), 3);
        assert_eq!(store.first_index().unwrap(), 5);
    }
    // Across a restart: the same bytes back.
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), big.as_slice());
    // A newer snapshot replaces the older one's chunks.
    let newer = patterned(SNAPSHOT_CHUNK_BYTES / 2, 2);
    store.save_snapshot(&snapshot_at(8, 2, vec![1], &newer), 8).unwrap();
    assert_eq!(store.chunk_count_for_test(), 1);
    assert_eq!(
        store.stored_snapshot().unwrap().unwrap().data.as_ref(),
        newer.as_slice()
    );
    assert_eq!(store.first_index().unwrap(), 9);
    // An empty snapshot is a snapshot too.
    store.save_snapshot(&snapshot_at(9, 2, vec![1], b""), 9).unwrap();
    assert_eq!(store.chunk_count_for_test(), 0);
    assert!(store.stored_snapshot().unwrap().unwrap().data.is_empty());
}

/// A save that failed or was given up drops its pieces at once: on a full
/// disk, their space is what the log needs to go on.
#[test]
fn lmdb_drops_the_pieces_of_an_aborted_save() {
    let (store, _dir) = lmdb();
    append(&store, entries(1..=10, 2));
    let mut save = store.begin_snapshot_save().unwrap();
    store
        .put_snapshot_piece(&mut save, &patterned(3 * SNAPSHOT_CHUNK_BYTES, 1))
        .unwrap();
    assert_eq!(store.chunk_count_for_test(), 3);
    store.abort_snapshot_save(&save).unwrap();
    assert_eq!(store.chunk_count_for_test(), 0);
    // The next save is stored whole, and the aborted one is not it.
    let mut next = store.begin_snapshot_save().unwrap();
    let data = patterned(SNAPSHOT_CHUNK_BYTES + 5, 2);
    store.put_snapshot_piece(&mut next, &data).unwrap();
    assert!(
        store
            .finish_snapshot_save(next, &snapshot_at(6, 2, vec![1], b"").take_metadata(), 6)
            .unwrap()
    );
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), data.as_slice());
}

/// Components the history replaced before what the snapshot and the log
/// cover are freed; the first, the ones still needed, and the history stay.
#[test]
fn lmdb_frees_components_no_snapshot_or_entry_needs() {
    let (store, _dir) = lmdb();
    append(&store, entries(1..=40, 1));
    use sha2::Digest as _;
    let sha = |bytes: &[u8]| -> [u8; 32] { sha2::Sha256::digest(bytes).into() };
    let (kv, v2, v3) = (sha(b"kv"), sha(b"v2"), sha(b"v3"));
    // kv from the start, v2 from 10, v3 from 20, kv again from 25.
    store.activate_plugin(0, &kv, b"kv").unwrap();
    store.activate_plugin(10, &v2, b"v2").unwrap();
    store.activate_plugin(20, &v3, b"v3").unwrap();
    store.activate_plugin(25, &kv, b"kv").unwrap();
    // The first snapshot compacts the log to 22; a later one finds the
    // entries before 23 gone: v2 (replaced at 20) can go.
    store.save_snapshot(&snapshot_at(22, 1, vec![1], b"state"), 22).unwrap();
    assert_eq!(
        store.plugin_blob(&v2).unwrap().as_deref(),
        Some(&b"v2"[..]),
        "entries of v2 were still in the log"
    );
    store.save_snapshot(&snapshot_at(30, 1, vec![1], b"state"), 22).unwrap();
    assert_eq!(store.plugin_blob(&v2).unwrap(), None);
    // v3 ran entries 21..25, still in the log; kv is the first, and back.
    assert_eq!(store.plugin_blob(&v3).unwrap().as_deref(), Some(&b"v3"[..]));
    assert_eq!(store.plugin_blob(&kv).unwrap().as_deref(), Some(&b"kv"[..]));
    assert_eq!(store.plugin_history().unwrap().len(), 4, "the history stays whole");
    // Once the log starts after 25, v3 goes too.
    store.save_snapshot(&snapshot_at(35, 1, vec![1], b"state"), 35).unwrap();
    store.save_snapshot(&snapshot_at(40, 1, vec![1], b"state"), 40).unwrap();
    assert_eq!(store.plugin_blob(&v3).unwrap(), None);
    assert_eq!(store.plugin_blob(&kv).unwrap().as_deref(), Some(&b"kv"[..]));
}

#[test]
fn lmdb_ignores_and_then_drops_the_chunks_of_a_save_that_crashed() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LmdbStore::open(dir.path(), &small()).unwrap();
        append(&store, entries(1..=10, 2));
        store.save_snapshot(&snapshot_at(4, 2, vec![1], b"state@4"), 4).unwrap();
        // A later save wrote its chunks, then the process died.
        store.orphan_chunks_for_test(&patterned(SNAPSHOT_CHUNK_BYTES + 1, 3));
        assert_eq!(store.chunk_count_for_test(), 3);
    }
    let store = LmdbStore::open(dir.path(), &small()).unwrap();
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), b"state@4");
    store.save_snapshot(&snapshot_at(6, 2, vec![1], b"state@6"), 6).unwrap();
    assert_eq!(store.chunk_count_for_test(), 1, "the orphans are gone");
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), b"state@6");
}

#[test]
fn lmdb_reads_a_snapshot_stored_before_chunking_and_replaces_it() {
    let (store, _dir) = lmdb();
    append(&store, entries(1..=10, 2));
    store.put_unchunked_snapshot_for_test(&snapshot_at(3, 2, vec![1], b"old layout"));
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), b"old layout");
    store
        .save_snapshot(&snapshot_at(7, 2, vec![1], b"new layout"), 7)
        .unwrap();
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data.as_ref(), b"new layout");
    assert_eq!(store.chunk_count_for_test(), 1);
    let installed = snapshot_at(20, 3, vec![1], &patterned(SNAPSHOT_CHUNK_BYTES + 5, 4));
    let hard_state = HardState {
        term: 3,
        commit: 20,
        ..Default::default()
    };
    store.install_snapshot(&installed, &hard_state).unwrap();
    assert_eq!(store.chunk_count_for_test(), 2);
    assert_eq!(store.stored_snapshot().unwrap().unwrap().data, installed.data);
}

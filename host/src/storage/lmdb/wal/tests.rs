//! The write-ahead log on its own: what replays, what a torn write and
//! corruption do, segments rolling and going.

use super::*;

fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    Entry {
        index,
        term,
        data: data.to_vec().into(),
        ..Default::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64, data_len: usize) -> Vec<Entry> {
    range.map(|i| entry(i, term, &vec![i as u8; data_len])).collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn append(wal: &Wal, entries: Vec<Entry>) {
    wal.append(&Record {
        entries,
        ..Default::default()
    })
    .unwrap();
}

fn read_all(wal: &Wal) -> Vec<(u64, u64, usize)> {
    let Some((first, last)) = wal.bounds() else {
        return Vec::new();
    };
    entries_in(wal, first, last + 1, None)
        .iter()
        .map(|e| (e.index, e.term, e.data.len()))
        .collect()
}

fn entries_in(wal: &Wal, low: u64, high: u64, max_size: Option<u64>) -> Vec<Entry> {
    match wal.entries(low, high, max_size).unwrap() {
        Read::Entries(entries) => entries,
        other => panic!("{low}..{high}: {other:?}"),
    }
}

fn new_wal() -> (Wal, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::create(&dir.path().join("wal"), false, &HardState::default(), 0).unwrap();
    (wal, dir)
}

fn reopen(dir: &tempfile::TempDir) -> Result<Opened, StoreError> {
    Wal::open(&dir.path().join("wal"), false)
}

/// The only segment's path and its bytes.
fn segment(dir: &tempfile::TempDir) -> (PathBuf, Vec<u8>) {
    let path = segment_path(&dir.path().join("wal"), 1);
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

/// Where the last record ends: past it are only the allocation's zeros.
fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).unwrap() + 1
}

#[test]
fn records_replay_with_the_tail_a_new_leader_replaced() {
    let (wal, dir) = new_wal();
    append(&wal, entries(1..=10, 1, 100));
    // A new leader overrides 8..=10.
    append(&wal, entries(8..=12, 2, 50));
    wal.append(&Record {
        hard_state: Some(hard_state(2, 3, 9)),
        applied: Some(7),
        ..Default::default()
    })
    .unwrap();
    let before = read_all(&wal);
    drop(wal);

    let opened = reopen(&dir).unwrap();
    assert_eq!(opened.torn_bytes, 0);
    let wal = opened.wal;
    assert_eq!(read_all(&wal), before);
    assert_eq!(wal.bounds(), Some((1, 12)));
    assert_eq!(wal.term(7), Some(1));
    assert_eq!(wal.term(8), Some(2));
    assert_eq!(wal.hard_state(), hard_state(2, 3, 9));
    assert_eq!(wal.applied(), 7);
    // max_size: at least one entry, then what fits.
    assert_eq!(entries_in(&wal, 1, 13, Some(0)).len(), 1);
    // Bounds that moved since the caller looked are told apart.
    assert!(matches!(wal.entries(14, 15, None).unwrap(), Read::Unavailable));
    wal.compact(3).unwrap();
    assert!(matches!(wal.entries(2, 5, None).unwrap(), Read::Compacted));
    assert_eq!(entries_in(&wal, 4, 5, None)[0].index, 4);
    // And appends go on after the replayed end.
    append(&wal, entries(13..=13, 2, 10));
    drop(wal);
    assert_eq!(reopen(&dir).unwrap().wal.bounds(), Some((1, 13)));
}

#[test]
fn a_write_a_crash_cut_short_is_dropped_and_the_log_goes_on() {
    let (wal, dir) = new_wal();
    append(&wal, entries(1..=3, 1, 100));
    // The last record spans several sectors; one of them never reached
    // the disk.
    append(&wal, entries(4..=4, 1, 4000));
    drop(wal);
    let (path, mut bytes) = segment(&dir);
    let end = data_end(&bytes);
    bytes[end - 2000..end - 900].fill(0);
    std::fs::write(&path, &bytes).unwrap();

    let opened = reopen(&dir).unwrap();
    assert!(opened.torn_bytes > 0);
    let wal = opened.wal;
    assert_eq!(wal.bounds(), Some((1, 3)), "the torn entry is gone, the rest kept");
    append(&wal, entries(4..=5, 1, 10));
    drop(wal);
    let opened = reopen(&dir).unwrap();
    assert_eq!(opened.torn_bytes, 0);
    assert_eq!(opened.wal.bounds(), Some((1, 5)));
}

#[test]
fn a_damaged_record_is_corruption_not_a_torn_write() {
    // In the middle of the log: later records follow it.
    let (wal, dir) = new_wal();
    append(&wal, entries(1..=3, 1, 100));
    let (_, bytes) = segment(&dir);
    let first_end = data_end(&bytes);
    append(&wal, entries(4..=6, 1, 100));
    drop(wal);
    let (path, mut bytes) = segment(&dir);
    bytes[first_end - 20] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let error = reopen(&dir).err().expect("a damaged record must not open").to_string();
    assert!(error.contains("checksum") && error.contains("offset"), "{error}");

    // The last record, every sector of it written: a flipped bit, not a
    // crash, so it is not silently dropped either.
    let (wal, dir) = new_wal();
    append(&wal, entries(1..=3, 1, 100));
    drop(wal);
    let (path, mut bytes) = segment(&dir);
    let end = data_end(&bytes);
    bytes[end - 10] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let error = reopen(&dir)
        .err()
        .expect("a damaged last record must not open")
        .to_string();
    assert!(error.contains("checksum"), "{error}");
}

#[test]
fn a_damaged_header_or_a_missing_segment_is_reported() {
    let (wal, dir) = new_wal();
    append(&wal, entries(1..=3, 1, 100));
    drop(wal);
    let (path, mut bytes) = segment(&dir);
    bytes[0] = b'X';
    std::fs::write(&path, &bytes).unwrap();
    let error = reopen(&dir).err().unwrap().to_string();
    assert!(error.contains("bad header"), "{error}");
    std::fs::remove_file(&path).unwrap();
    let error = reopen(&dir).err().unwrap().to_string();
    assert!(error.contains("no segments"), "{error}");
}

#[test]
fn full_segments_roll_and_go_once_compaction_passes_them() {
    let (wal, dir) = new_wal();
    // 1 MiB entries: about 64 to a segment.
    let mib = 1 << 20;
    for index in 1..=150 {
        append(&wal, vec![entry(index, 1, &vec![index as u8; mib])]);
    }
    wal.append(&Record {
        hard_state: Some(hard_state(1, 1, 150)),
        applied: Some(150),
        ..Default::default()
    })
    .unwrap();
    let segments = wal.segment_paths_for_test().len();
    assert!(segments >= 3, "{segments} segments");
    let (file_bytes, live_bytes) = wal.space();
    assert!(live_bytes >= 150 * mib as u64 && file_bytes >= live_bytes);

    wal.compact(140).unwrap();
    assert_eq!(wal.bounds(), Some((141, 150)));
    let left = wal.segment_paths_for_test();
    assert!(left.len() < segments, "compaction deleted no segment: {left:?}");
    assert!(wal.space().1 < 11 * mib as u64 + 1024);
    drop(wal);

    let wal = reopen(&dir).unwrap().wal;
    // What replays starts at the oldest kept segment: entries before 141
    // may come back (as a log compacted in LMDB could keep some), never
    // fewer, and the state the segment opened with survives.
    let (first, last) = wal.bounds().unwrap();
    assert!(first <= 141 && last == 150, "{first}..={last}");
    let data = entries_in(&wal, 150, 151, None);
    assert_eq!(data[0].data.len(), mib);
    assert!(data[0].data.iter().all(|&b| b == 150));
    assert_eq!(wal.hard_state(), hard_state(1, 1, 150));
    assert_eq!(wal.applied(), 150);
}

#[test]
fn a_reset_empties_the_log_and_frees_its_segments() {
    let (wal, dir) = new_wal();
    for index in 1..=70 {
        append(&wal, vec![entry(index, 1, &vec![1; 1 << 20])]);
    }
    assert!(wal.segment_paths_for_test().len() >= 2);
    wal.reset(500, &hard_state(3, 0, 500)).unwrap();
    assert_eq!(wal.bounds(), None);
    assert_eq!(wal.segment_paths_for_test().len(), 1);
    append(&wal, entries(501..=502, 3, 10));
    drop(wal);
    let wal = reopen(&dir).unwrap().wal;
    assert_eq!(wal.bounds(), Some((501, 502)));
    assert_eq!(wal.hard_state(), hard_state(3, 0, 500));
}

#[test]
fn a_record_that_would_leave_a_hole_is_corruption() {
    let mut log = Log::default();
    let record = |range| Record {
        entries: entries(range, 1, 1),
        ..Default::default()
    };
    let at = |n: usize| {
        (0..n)
            .map(|k| Location {
                seq: 1,
                offset: k as u64,
                len: 1,
                term: 1,
            })
            .collect::<Vec<_>>()
    };
    log.take(&record(5..=6), at(2)).unwrap();
    assert_eq!((log.base, log.last()), (4, Some(6)));
    let error = log.take(&record(8..=8), at(1)).unwrap_err().to_string();
    assert!(error.contains("do not follow"), "{error}");
    let error = log.take(&record(3..=3), at(1)).unwrap_err().to_string();
    assert!(error.contains("do not follow"), "{error}");
}

#[test]
fn a_segment_whose_start_never_became_durable_is_removed() {
    let (wal, dir) = new_wal();
    append(&wal, entries(1..=2, 1, 10));
    drop(wal);
    let stray = dir.path().join("wal").join(format!("{:016x}.wal.tmp", 2));
    std::fs::write(&stray, b"RWAL0001 partial").unwrap();
    let wal = reopen(&dir).unwrap().wal;
    assert_eq!(wal.bounds(), Some((1, 2)));
    assert!(!stray.exists());
}

#[test]
fn data_past_the_end_of_a_closed_segment_is_corruption() {
    let (wal, dir) = new_wal();
    for index in 1..=70 {
        append(&wal, vec![entry(index, 1, &vec![7; 1 << 20])]);
    }
    let first = wal.segment_paths_for_test()[0].clone();
    assert!(wal.segment_paths_for_test().len() >= 2);
    drop(wal);
    let mut bytes = std::fs::read(&first).unwrap();
    let end = data_end(&bytes);
    assert!(end + 100 < bytes.len(), "a closed segment keeps its allocation's zeros");
    bytes[end + 50] = 1;
    std::fs::write(&first, &bytes).unwrap();
    let error = reopen(&dir)
        .err()
        .expect("damage in a closed segment must not open")
        .to_string();
    assert!(error.contains("after the end of its records"), "{error}");
}

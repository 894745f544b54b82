//! The raft log and hard state in an append-only write-ahead log beside
//! LMDB, as etcd keeps its log: a batch costs one `pwrite` and one
//! `fdatasync`, where an LMDB commit costs two syncs (its pages, then its
//! meta page). One follower's commit is on every write's path, so that
//! sync is latency every write pays. LMDB keeps what is written rarely:
//! snapshots, the conf state, the identity, plugins and traps.
//!
//! Files, in the store's directory under `wal/`:
//!
//! ```text
//! segment  {seq:016x}.wal: header, then records
//! header   magic "RWAL0001" (8 bytes), seq u64 LE
//! record   len u32 LE, crc32 u32 LE (of the payload), payload (len bytes)
//! payload  flags u8: RESET | ENTRIES | HARD_STATE | APPLIED, then in order
//!          RESET       base u64: the log is empty, its next index base + 1
//!          ENTRIES     count u32, then per entry: len u32, a raft Entry (protobuf)
//!          HARD_STATE  len u32, a raft HardState (protobuf)
//!          APPLIED     u64
//! ```
//!
//! A record's entries replace the log from their first index on (a new
//! leader overriding an uncommitted tail). A segment's file is extended
//! with `fallocate` a step ahead of its writes, so a sync flushes data and
//! not the file's size; past [`SEGMENT_BYTES`] the next record starts a new
//! segment, which opens with the hard state and applied index, so older
//! segments can be deleted once no live entry is in them.
//!
//! Opening reads every segment in order and checks every record's CRC. A
//! bad record at the end of the last segment, with a run of zeros where a
//! disk sector of it should be (etcd's test for a torn write), is a write
//! the crash interrupted, so never acknowledged: the segment is cut there.
//! A bad record anywhere else is corruption, and opening fails.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use fs4::FileExt as _;
use protobuf::Message as _;
use raft::prelude::{Entry, HardState};

use crate::storage::StoreError;

/// A segment is closed once it holds this much; the next record starts a
/// new one.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// A segment's file is extended (allocated) this much ahead of its writes.
/// Small, so a nearly full disk finds out at once rather than filling a
/// large preallocation first.
const ALLOCATE_STEP: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"RWAL0001";
const HEADER_BYTES: u64 = 16;
const RECORD_HEADER_BYTES: usize = 8;
/// The disk's atomic unit, for telling a torn write from corruption.
const SECTOR: u64 = 512;

/// No index at or past this is accepted from a segment, so index
/// arithmetic on what the disk holds cannot overflow.
const MAX_INDEX: u64 = u64::MAX >> 1;

const RESET: u8 = 1;
const ENTRIES: u8 = 2;
const HARD_STATE: u8 = 4;
const APPLIED: u8 = 8;

/// What one record says.
#[derive(Debug, Default, Clone)]
pub struct Record {
    /// The log is emptied, to continue after this index (an installed
    /// snapshot's).
    pub reset: Option<u64>,
    pub entries: Vec<Entry>,
    pub hard_state: Option<HardState>,
    pub applied: Option<u64>,
}

/// What [`Wal::entries`] found.
#[derive(Debug)]
pub enum Read {
    Entries(Vec<Entry>),
    /// `low` was compacted meanwhile.
    Compacted,
    /// `high` is past the log's end (a new leader's shorter tail replaced
    /// it meanwhile).
    Unavailable,
}

/// Where a live entry's bytes are.
#[derive(Debug, Clone, Copy)]
struct Location {
    seq: u64,
    offset: u64,
    len: u32,
    term: u64,
}

struct Segment {
    file: Arc<File>,
    /// The file's size (its allocation).
    len: u64,
}

/// The log as the records make it, in memory: where each live entry is,
/// and the latest hard state and applied index.
#[derive(Default)]
struct Log {
    /// The index before the first live entry (meaningful only when there
    /// are entries, or after a reset).
    base: u64,
    entries: VecDeque<Location>,
    /// The bytes of the live entries.
    live_bytes: u64,
    hard_state: HardState,
    applied: u64,
    segments: BTreeMap<u64, Segment>,
}

impl Log {
    fn last(&self) -> Option<u64> {
        (!self.entries.is_empty()).then(|| self.base + self.entries.len() as u64)
    }

    /// Take a record's effect; `replaying` (opening) checks what a live
    /// writer's caller has already checked.
    fn take(&mut self, record: &Record, locations: Vec<Location>) -> Result<(), StoreError> {
        if let Some(base) = record.reset {
            self.entries.clear();
            self.live_bytes = 0;
            self.base = base;
        }
        if let Some(first) = record.entries.first().map(|e| e.index) {
            match self.last() {
                None => self.base = first - 1,
                Some(last) if first <= self.base || first > last + 1 => {
                    return Err(StoreError::Corrupt(format!(
                        "the write-ahead log's entries from {first} do not follow the log {}..={last}",
                        self.base + 1
                    )));
                }
                Some(_) => {
                    let keep = (first - self.base - 1) as usize;
                    for dropped in self.entries.drain(keep..) {
                        self.live_bytes -= u64::from(dropped.len);
                    }
                }
            }
            for location in locations {
                self.live_bytes += u64::from(location.len);
                self.entries.push_back(location);
            }
        }
        if let Some(hard_state) = &record.hard_state {
            self.hard_state = hard_state.clone();
        }
        if let Some(applied) = record.applied {
            self.applied = applied;
        }
        Ok(())
    }

    /// Forget the live entries at and before `index`.
    fn compact(&mut self, index: u64) {
        while self.base < index
            && let Some(dropped) = self.entries.pop_front()
        {
            self.base += 1;
            self.live_bytes -= u64::from(dropped.len);
        }
    }

    /// The segments before the first one a live entry (or the writer) is in.
    fn unneeded(&self, writing: u64) -> Vec<u64> {
        let keep_from = self.entries.front().map_or(writing, |l| l.seq.min(writing));
        self.segments.range(..keep_from).map(|(seq, _)| *seq).collect()
    }
}

struct Writer {
    file: Arc<File>,
    seq: u64,
    /// Where the next record goes.
    offset: u64,
    /// Where the segment's opening state record ends: a segment holding
    /// nothing past it is not closed for a large record.
    start: u64,
    /// The file's allocated size.
    allocated: u64,
}

/// The write-ahead log. Reads (of the in-memory index, and entries by
/// `pread`) never wait for a write's sync: a write holds only the writer
/// while it syncs, and the index briefly after.
pub struct Wal {
    dir: PathBuf,
    sync: bool,
    log: RwLock<Log>,
    writer: Mutex<Writer>,
}

/// What opening found.
pub struct Opened {
    pub wal: Wal,
    /// Bytes cut from the last segment's end: a torn write.
    pub torn_bytes: u64,
}

impl Wal {
    /// Make a new, empty log in `dir` (which must not exist) whose first
    /// segment starts with `hard_state` and `applied`.
    pub fn create(dir: &Path, sync: bool, hard_state: &HardState, applied: u64) -> Result<Wal, StoreError> {
        std::fs::create_dir(dir)?;
        let (file, len, offset) = new_segment(dir, 1, sync, hard_state, applied)?;
        sync_dir(dir, sync)?;
        let file = Arc::new(file);
        let mut segments = BTreeMap::new();
        segments.insert(
            1,
            Segment {
                file: file.clone(),
                len,
            },
        );
        Ok(Wal {
            dir: dir.to_path_buf(),
            sync,
            log: RwLock::new(Log {
                hard_state: hard_state.clone(),
                applied,
                segments,
                ..Log::default()
            }),
            writer: Mutex::new(Writer {
                file,
                seq: 1,
                offset,
                start: offset,
                allocated: len,
            }),
        })
    }

    /// Open the log in `dir`, replaying every record.
    pub fn open(dir: &Path, sync: bool) -> Result<Opened, StoreError> {
        let mut seqs = Vec::new();
        for item in std::fs::read_dir(dir)? {
            let name = item?.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".wal.tmp") {
                // A segment whose start never became durable.
                std::fs::remove_file(dir.join(&*name))?;
            } else if let Some(stem) = name.strip_suffix(".wal") {
                let seq = u64::from_str_radix(stem, 16).map_err(|_| {
                    StoreError::Corrupt(format!("{}: not a segment's name", dir.join(&*name).display()))
                })?;
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let Some(&last_seq) = seqs.last() else {
            return Err(StoreError::Corrupt(format!(
                "the write-ahead log in {} has no segments",
                dir.display()
            )));
        };
        let mut log = Log::default();
        let mut torn_bytes = 0;
        let mut end = 0;
        for &seq in &seqs {
            let path = segment_path(dir, seq);
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            let bytes = std::fs::read(&path)?;
            let is_last = seq == last_seq;
            let valid = replay_segment(&path, seq, &bytes, is_last, &mut log)?;
            let mut len = bytes.len() as u64;
            if is_last {
                end = valid;
                if valid < len {
                    // Cut what follows the last good record (a torn
                    // write, or the allocation's zeros) so nothing stale
                    // is ever read as a record after the next one.
                    torn_bytes = bytes[valid as usize..]
                        .iter()
                        .rposition(|&b| b != 0)
                        .map_or(0, |p| p as u64 + 1);
                    file.set_len(valid)?;
                    if sync {
                        file.sync_all()?;
                    }
                    len = valid;
                }
            }
            log.segments.insert(
                seq,
                Segment {
                    file: Arc::new(file),
                    len,
                },
            );
        }
        let last = &log.segments[&last_seq];
        let writer = Writer {
            file: last.file.clone(),
            seq: last_seq,
            offset: end,
            start: 0,
            allocated: last.len,
        };
        Ok(Opened {
            wal: Wal {
                dir: dir.to_path_buf(),
                sync,
                log: RwLock::new(log),
                writer: Mutex::new(writer),
            },
            torn_bytes,
        })
    }

    fn log(&self) -> std::sync::RwLockReadGuard<'_, Log> {
        self.log.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn log_mut(&self) -> std::sync::RwLockWriteGuard<'_, Log> {
        self.log.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Append `record` durably (one write and one sync; a new segment
    /// first when this one is full). Nothing of it counts until it is
    /// synced: on an error the next append overwrites what was written.
    /// The caller has checked its entries follow the log.
    pub fn append(&self, record: &Record) -> Result<(), StoreError> {
        let (bytes, entry_spans) = encode_record(record)?;
        let mut writer = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if writer.offset + bytes.len() as u64 > SEGMENT_BYTES && writer.offset > writer.start {
            self.roll(&mut writer)?;
        }
        let end = writer.offset + bytes.len() as u64;
        if end > writer.allocated {
            let allocated = end.div_ceil(ALLOCATE_STEP) * ALLOCATE_STEP;
            preallocate(&writer.file, allocated)?;
            writer.allocated = allocated;
            let seq = writer.seq;
            if let Some(segment) = self.log_mut().segments.get_mut(&seq) {
                segment.len = allocated;
            }
        }
        writer.file.write_all_at(&bytes, writer.offset)?;
        if self.sync {
            writer.file.sync_data()?;
        }
        let at = writer.offset;
        writer.offset = end;
        let seq = writer.seq;
        drop(writer);
        let locations = record
            .entries
            .iter()
            .zip(entry_spans)
            .map(|(entry, (offset, len))| Location {
                seq,
                offset: at + offset,
                len,
                term: entry.term,
            })
            .collect();
        self.log_mut().take(record, locations)
    }

    /// Close the current segment and start the next, opening with the
    /// state the log has now. The new segment is made under a temporary
    /// name and renamed once its start is durable.
    fn roll(&self, writer: &mut Writer) -> Result<(), StoreError> {
        let (hard_state, applied) = {
            let log = self.log();
            (log.hard_state.clone(), log.applied)
        };
        let seq = writer
            .seq
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt("the write-ahead log's segment numbers ran out".into()))?;
        let (file, len, offset) = new_segment(&self.dir, seq, self.sync, &hard_state, applied)?;
        sync_dir(&self.dir, self.sync)?;
        let file = Arc::new(file);
        self.log_mut().segments.insert(
            seq,
            Segment {
                file: file.clone(),
                len,
            },
        );
        *writer = Writer {
            file,
            seq,
            offset,
            start: offset,
            allocated: len,
        };
        Ok(())
    }

    /// Forget the entries at and before `index` and delete the segments
    /// no live entry is in any more.
    pub fn compact(&self, index: u64) -> Result<(), StoreError> {
        self.log_mut().compact(index);
        self.drop_unneeded()
    }

    /// Empty the log, to continue after `base` with `hard_state` (an
    /// installed snapshot), durably; then delete the older segments.
    pub fn reset(&self, base: u64, hard_state: &HardState) -> Result<(), StoreError> {
        self.append(&Record {
            reset: Some(base),
            hard_state: Some(hard_state.clone()),
            ..Default::default()
        })?;
        self.drop_unneeded()
    }

    fn drop_unneeded(&self) -> Result<(), StoreError> {
        let writing = self.writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).seq;
        let unneeded = self.log().unneeded(writing);
        for seq in unneeded {
            // Deleted oldest first: a crash midway leaves a run of whole
            // segments, which replay in order as before.
            std::fs::remove_file(segment_path(&self.dir, seq))?;
            self.log_mut().segments.remove(&seq);
        }
        Ok(())
    }

    /// Raise the remembered commit index (a snapshot covers it; the value
    /// on disk is raised by LMDB's copy).
    pub fn raise_commit(&self, commit: u64) {
        let mut log = self.log_mut();
        log.hard_state.commit = log.hard_state.commit.max(commit);
    }

    /// Drop every live entry (replay found a log a snapshot replaced) and
    /// continue after `base`.
    pub fn forget_entries(&self, base: u64) {
        let mut log = self.log_mut();
        log.entries.clear();
        log.live_bytes = 0;
        log.base = base;
    }

    pub fn hard_state(&self) -> HardState {
        self.log().hard_state.clone()
    }

    pub fn set_hard_state(&self, hard_state: HardState) {
        self.log_mut().hard_state = hard_state;
    }

    pub fn applied(&self) -> u64 {
        self.log().applied
    }

    /// The first and last live entries' indexes (`None`: no entries).
    pub fn bounds(&self) -> Option<(u64, u64)> {
        let log = self.log();
        log.last().map(|last| (log.base + 1, last))
    }

    /// The term of the live entry at `index`.
    pub fn term(&self, index: u64) -> Option<u64> {
        let log = self.log();
        let at = index.checked_sub(log.base + 1)?;
        log.entries.get(usize::try_from(at).ok()?).map(|l| l.term)
    }

    /// The live entries in `[low, high)` (`low < high`), at least one and
    /// then at most `max_size` bytes of them. The bounds are checked here,
    /// under the lock: the caller's view of them may be stale by now.
    pub fn entries(&self, low: u64, high: u64, max_size: Option<u64>) -> Result<Read, StoreError> {
        let (wanted, files) = {
            let log = self.log();
            let Some(last) = log.last() else {
                return Ok(Read::Compacted);
            };
            if low <= log.base {
                return Ok(Read::Compacted);
            }
            if high > last + 1 || low >= high {
                return Ok(Read::Unavailable);
            }
            let from = (low - log.base - 1) as usize;
            let to = (high - log.base - 1) as usize;
            let mut size = 0u64;
            let mut wanted = Vec::with_capacity(to.saturating_sub(from));
            for location in log.entries.range(from..to) {
                size += u64::from(location.len);
                if !wanted.is_empty() && max_size.is_some_and(|max| size > max) {
                    break;
                }
                wanted.push(*location);
            }
            let mut files = BTreeMap::new();
            for location in &wanted {
                if let Some(segment) = log.segments.get(&location.seq) {
                    files.entry(location.seq).or_insert_with(|| segment.file.clone());
                }
            }
            (wanted, files)
        };
        // Read outside the lock; a segment deleted meanwhile stays readable
        // through its open file. Entries next to each other in one segment
        // are read in one go.
        let mut out = Vec::with_capacity(wanted.len());
        let mut run = 0;
        while run < wanted.len() {
            let first = wanted[run];
            let mut next = run + 1;
            while next < wanted.len() && follows(&wanted[next - 1], &wanted[next]) {
                next += 1;
            }
            let last = wanted[next - 1];
            let file = files
                .get(&first.seq)
                .ok_or_else(|| StoreError::Corrupt(format!("the write-ahead log's segment {} is gone", first.seq)))?;
            let span = (last.offset + u64::from(last.len) - first.offset) as usize;
            let mut bytes = vec![0u8; span];
            file.read_exact_at(&mut bytes, first.offset)?;
            for (k, location) in wanted[run..next].iter().enumerate() {
                let index = low + (run + k) as u64;
                let start = (location.offset - first.offset) as usize;
                let entry = super::decode_entry(index, &bytes[start..start + location.len as usize])?;
                out.push(entry);
            }
            run = next;
        }
        Ok(Read::Entries(out))
    }

    /// The segments' sizes on disk, and the bytes of the live entries.
    pub fn space(&self) -> (u64, u64) {
        let log = self.log();
        (log.segments.values().map(|s| s.len).sum(), log.live_bytes)
    }

    /// Overwrite the bytes of the live entry at `index` with garbage, as a
    /// bad disk would.
    #[cfg(test)]
    pub fn corrupt_entry_for_test(&self, index: u64) {
        let log = self.log();
        let location = log.entries[(index - log.base - 1) as usize];
        let file = &log.segments[&location.seq].file;
        file.write_all_at(&vec![0xff; location.len as usize], location.offset)
            .unwrap();
    }

    /// The segments' paths, oldest first.
    #[cfg(test)]
    pub fn segment_paths_for_test(&self) -> Vec<PathBuf> {
        self.log()
            .segments
            .keys()
            .map(|seq| segment_path(&self.dir, *seq))
            .collect()
    }
}

/// Whether `next` is stored just after `previous` (past its length prefix),
/// so both are read in one go.
fn follows(previous: &Location, next: &Location) -> bool {
    let previous_end = previous.offset + u64::from(previous.len);
    next.seq == previous.seq && next.offset >= previous_end && next.offset <= previous_end + 64
}

/// Extend `file` to `len` bytes with `fallocate`, so the syncs of writes
/// into it flush data, not the file's size. A filesystem without
/// `fallocate` (EOPNOTSUPP) just has its file grow with the writes: slower
/// syncs, the same durability. A full disk is an error, as for any write.
fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    const EOPNOTSUPP: i32 = 95;
    match file.allocate(len) {
        Err(e) if e.raw_os_error() == Some(EOPNOTSUPP) => Ok(()),
        other => other,
    }
}

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.wal"))
}

fn sync_dir(dir: &Path, sync: bool) -> Result<(), StoreError> {
    if sync {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Make segment `seq` (under a temporary name until its header and first
/// record are durable): returns its file, allocated size and end.
fn new_segment(
    dir: &Path,
    seq: u64,
    sync: bool,
    hard_state: &HardState,
    applied: u64,
) -> Result<(File, u64, u64), StoreError> {
    let (state, _) = encode_record(&Record {
        hard_state: Some(hard_state.clone()),
        applied: Some(applied),
        ..Default::default()
    })?;
    let tmp = dir.join(format!("{seq:016x}.wal.tmp"));
    let made = (|| -> Result<(File, u64, u64), StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        let mut start = Vec::with_capacity(HEADER_BYTES as usize + state.len());
        start.extend_from_slice(MAGIC);
        start.extend_from_slice(&seq.to_le_bytes());
        start.extend_from_slice(&state);
        let allocated = (start.len() as u64).div_ceil(ALLOCATE_STEP) * ALLOCATE_STEP;
        preallocate(&file, allocated)?;
        file.write_all_at(&start, 0)?;
        if sync {
            file.sync_all()?;
        }
        Ok((file, allocated, start.len() as u64))
    })();
    match made {
        Ok(made) => {
            std::fs::rename(&tmp, segment_path(dir, seq))?;
            Ok(made)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Each entry's (offset, length) within its record's bytes.
type Spans = Vec<(u64, u32)>;

/// A record's bytes, and where each entry is in them.
fn encode_record(record: &Record) -> Result<(Vec<u8>, Spans), StoreError> {
    let mut payload = Vec::new();
    let mut flags = 0u8;
    if record.reset.is_some() {
        flags |= RESET;
    }
    if !record.entries.is_empty() {
        flags |= ENTRIES;
    }
    if record.hard_state.is_some() {
        flags |= HARD_STATE;
    }
    if record.applied.is_some() {
        flags |= APPLIED;
    }
    payload.push(flags);
    if let Some(base) = record.reset {
        payload.extend_from_slice(&base.to_le_bytes());
    }
    let mut spans = Vec::with_capacity(record.entries.len());
    if !record.entries.is_empty() {
        payload.extend_from_slice(&u32_len(record.entries.len())?.to_le_bytes());
        for entry in &record.entries {
            let bytes = super::encode(entry)?;
            let len = u32_len(bytes.len())?;
            payload.extend_from_slice(&len.to_le_bytes());
            spans.push(((RECORD_HEADER_BYTES + payload.len()) as u64, len));
            payload.extend_from_slice(&bytes);
        }
    }
    if let Some(hard_state) = &record.hard_state {
        let bytes = super::encode(hard_state)?;
        payload.extend_from_slice(&u32_len(bytes.len())?.to_le_bytes());
        payload.extend_from_slice(&bytes);
    }
    if let Some(applied) = record.applied {
        payload.extend_from_slice(&applied.to_le_bytes());
    }
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    out.extend_from_slice(&u32_len(payload.len())?.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok((out, spans))
}

fn u32_len(len: usize) -> Result<u32, StoreError> {
    u32::try_from(len).map_err(|_| StoreError::Invalid(format!("a write-ahead log record of {len} bytes is too large")))
}

/// Reads a payload's fields, refusing anything that runs past its end.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
}

/// A payload (whose CRC matched) as a record, with each entry's (offset,
/// length) within the payload; `None` if it does not parse.
fn decode_payload(payload: &[u8]) -> Option<Result<(Record, Spans), String>> {
    let mut cursor = Cursor { bytes: payload, at: 0 };
    let flags = cursor.take(1)?[0];
    if flags & !(RESET | ENTRIES | HARD_STATE | APPLIED) != 0 {
        return Some(Err(format!("unknown flags {flags:#x}")));
    }
    let mut record = Record::default();
    let mut spans = Vec::new();
    if flags & RESET != 0 {
        let base = cursor.u64()?;
        if base >= MAX_INDEX {
            return Some(Err(format!("a reset to index {base}")));
        }
        record.reset = Some(base);
    }
    if flags & ENTRIES != 0 {
        let count = cursor.u32()?;
        for _ in 0..count {
            let len = cursor.u32()?;
            let offset = cursor.at as u64;
            let bytes = cursor.take(len as usize)?;
            let entry = match Entry::parse_from_bytes(bytes) {
                Ok(entry) => entry,
                Err(e) => return Some(Err(format!("an entry: {e}"))),
            };
            if let Some(previous) = record.entries.last()
                && entry.index != previous.index + 1
            {
                return Some(Err(format!("entry {} follows {}", entry.index, previous.index)));
            }
            if entry.index == 0 || entry.index >= MAX_INDEX {
                return Some(Err(format!("an entry at index {}", entry.index)));
            }
            spans.push((offset, len));
            record.entries.push(entry);
        }
    }
    if flags & HARD_STATE != 0 {
        let len = cursor.u32()?;
        match HardState::parse_from_bytes(cursor.take(len as usize)?) {
            Ok(hard_state) => record.hard_state = Some(hard_state),
            Err(e) => return Some(Err(format!("the hard state: {e}"))),
        }
    }
    if flags & APPLIED != 0 {
        record.applied = Some(cursor.u64()?);
    }
    if cursor.at != payload.len() {
        return Some(Err(format!(
            "{} bytes after the record's fields",
            payload.len() - cursor.at
        )));
    }
    Some(Ok((record, spans)))
}

/// Replay one segment's records into `log`; returns where its last good
/// record ends.
fn replay_segment(path: &Path, seq: u64, bytes: &[u8], is_last: bool, log: &mut Log) -> Result<u64, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("{}: {what}", path.display()));
    if bytes.len() < HEADER_BYTES as usize || &bytes[..8] != MAGIC {
        return Err(corrupt("not a write-ahead log segment (bad header)".into()));
    }
    if u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")) != seq {
        return Err(corrupt("its header names another segment".into()));
    }
    let mut at = HEADER_BYTES as usize;
    loop {
        let Some(header) = bytes.get(at..at + RECORD_HEADER_BYTES) else {
            return Ok(at as u64);
        };
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        if len == 0 && crc == 0 {
            // The allocation's zeros: the segment's end. A closed segment
            // was synced whole before the next began, so data past its end
            // is damage, not a write a crash cut short.
            if !is_last && bytes[at..].iter().any(|&b| b != 0) {
                return Err(corrupt(format!("data after the end of its records, at offset {at}")));
            }
            return Ok(at as u64);
        }
        let start = at + RECORD_HEADER_BYTES;
        let payload = start.checked_add(len).and_then(|end| bytes.get(start..end));
        let bad = match payload {
            None => Some("a record runs past the segment's end".to_string()),
            Some(payload) if crc32fast::hash(payload) != crc => Some("a record's checksum does not match".to_string()),
            Some(payload) => match decode_payload(payload) {
                None => Some("a record's fields run past its end".to_string()),
                Some(Err(why)) => Some(why),
                Some(Ok((record, spans))) => {
                    let locations = record
                        .entries
                        .iter()
                        .zip(spans)
                        .map(|(entry, (offset, len))| Location {
                            seq,
                            offset: (start as u64) + offset,
                            len,
                            term: entry.term,
                        })
                        .collect();
                    log.take(&record, locations).map_err(|e| corrupt(e.to_string()))?;
                    None
                }
            },
        };
        if let Some(why) = bad {
            let end = start.saturating_add(len).min(bytes.len());
            if is_last && torn(bytes, at, end) {
                return Ok(at as u64);
            }
            return Err(corrupt(format!("{why} at offset {at}")));
        }
        at = start + len;
    }
}

/// Whether the bad record in `bytes[at..end]` is a write a crash cut
/// short: nothing follows it, and some disk sector of it is all zeros
/// (never written). A record whose sectors all hold data, or with data
/// after it, was damaged after it was written.
fn torn(bytes: &[u8], at: usize, end: usize) -> bool {
    if bytes[end..].iter().any(|&b| b != 0) {
        return false;
    }
    let mut from = at;
    while from < end {
        let to = ((from as u64 / SECTOR + 1) * SECTOR).min(end as u64) as usize;
        if bytes[from..to].iter().all(|&b| b == 0) {
            return true;
        }
        from = to;
    }
    false
}

#[cfg(test)]
mod tests;

//! kv: the sample key-value state machine for raftify-host.
//!
//! The command language (fixed by DESIGN.md; tests and docs rely on it):
//!
//! | command          | kind     | result                                        |
//! |------------------|----------|-----------------------------------------------|
//! | `set K V`        | proposal | `OK`                                          |
//! | `del K`          | proposal | `1` if K existed, else `0`                    |
//! | `incr K [BY]`    | proposal | the new integer (K absent counts as 0)        |
//! | `append K V`     | proposal | `OK`; V joins the space-separated list at K   |
//! | `get K`          | query    | the value, or `(nil)`                         |
//! | `len`            | query    | the number of keys                            |
//!
//! Keys and values are UTF-8 words without whitespace.
//!
//! Entry bytes are the canonical command text (words joined by one space,
//! `incr` always with its increment), so any language can produce and read
//! them. The snapshot format is documented in `plugins/kv/README.md`; plugins
//! in other languages share it, so a cluster can hot-swap between them.

use std::collections::BTreeMap;
use std::ops::Bound;

use raftify_guest::Plugin;

/// The whole replicated state: a sorted map, so iteration (and therefore the
/// snapshot) is deterministic.
#[derive(Default, Debug, Clone)]
pub struct Kv {
    map: BTreeMap<String, String>,
    /// A streamed snapshot being read, if any (not part of the state).
    reading: Option<Reading>,
    /// A streamed restore being decoded, if any (not part of the state).
    restoring: Option<Decoder>,
}

impl PartialEq for Kv {
    fn eq(&self, other: &Kv) -> bool {
        self.map == other.map
    }
}

impl Eq for Kv {}

/// A snapshot being read while entries keep applying: copy on write. The
/// state as of `snapshot_begin` is the live map with `before` laid over it:
/// the value each key had then (`None`: it was absent), recorded the first
/// time a key not yet written out changes.
#[derive(Debug, Clone, Default)]
struct Reading {
    /// Number of pairs at begin (the RKV1 header's count).
    count: u64,
    header_written: bool,
    /// The last key written out: changes at or below it no longer matter.
    last: Option<String>,
    before: BTreeMap<String, Option<String>>,
    /// Bytes of a pair that did not fit in the last chunk.
    pending: Vec<u8>,
    pending_at: usize,
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Set(&'a str, &'a str),
    Del(&'a str),
    Incr(&'a str, i64),
    Append(&'a str, &'a str),
    Get(&'a str),
    Len,
}

impl Command<'_> {
    /// Whether the command changes state (and so must go through the log).
    pub fn is_proposal(&self) -> bool {
        !matches!(self, Command::Get(_) | Command::Len)
    }

    /// The key a command changes, if it is a proposal.
    fn changed_key(&self) -> Option<&str> {
        match self {
            Command::Set(k, _) | Command::Del(k) | Command::Incr(k, _) | Command::Append(k, _) => Some(k),
            Command::Get(_) | Command::Len => None,
        }
    }

    /// The canonical text of the command: the entry bytes kv stores.
    pub fn canonical(&self) -> String {
        match self {
            Command::Set(k, v) => format!("set {k} {v}"),
            Command::Del(k) => format!("del {k}"),
            Command::Incr(k, by) => format!("incr {k} {by}"),
            Command::Append(k, v) => format!("append {k} {v}"),
            Command::Get(k) => format!("get {k}"),
            Command::Len => "len".to_string(),
        }
    }
}

/// Parse command text. Every error names what was wrong and what was expected.
pub fn parse(text: &str) -> Result<Command<'_>, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some((&verb, args)) = words.split_first() else {
        return Err("empty command".to_string());
    };
    let usage = |usage: &str| format!("wrong number of arguments: usage: {usage}");
    match verb {
        "set" => match args {
            [k, v] => Ok(Command::Set(k, v)),
            _ => Err(usage("set KEY VALUE")),
        },
        "del" => match args {
            [k] => Ok(Command::Del(k)),
            _ => Err(usage("del KEY")),
        },
        "incr" => match args {
            [k] => Ok(Command::Incr(k, 1)),
            [k, by] => {
                let by = by
                    .parse::<i64>()
                    .map_err(|_| format!("increment {by:?} is not an integer"))?;
                Ok(Command::Incr(k, by))
            }
            _ => Err(usage("incr KEY [BY]")),
        },
        "append" => match args {
            [k, v] => Ok(Command::Append(k, v)),
            _ => Err(usage("append KEY VALUE")),
        },
        "get" => match args {
            [k] => Ok(Command::Get(k)),
            _ => Err(usage("get KEY")),
        },
        "len" => match args {
            [] => Ok(Command::Len),
            _ => Err(usage("len")),
        },
        other => Err(format!(
            "unknown command {other:?}: expected set, del, incr, append, get or len"
        )),
    }
}

fn parse_bytes(bytes: &[u8]) -> Result<Command<'_>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "command is not UTF-8 text".to_string())?;
    parse(text)
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"RKV1";

impl Kv {
    /// The value at `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    /// Run a proposal. Computes the result first and mutates last, so an
    /// error leaves the state untouched.
    fn execute(&mut self, command: Command<'_>) -> Result<String, String> {
        if let Some(key) = command.changed_key() {
            self.remember(key);
        }
        match command {
            Command::Set(k, v) => {
                self.map.insert(k.to_string(), v.to_string());
                Ok("OK".to_string())
            }
            Command::Del(k) => Ok(if self.map.remove(k).is_some() { "1" } else { "0" }.to_string()),
            Command::Incr(k, by) => {
                let current = match self.map.get(k) {
                    None => 0,
                    Some(v) => v
                        .parse::<i64>()
                        .map_err(|_| format!("value of {k:?} is not an integer"))?,
                };
                let next = current
                    .checked_add(by)
                    .ok_or_else(|| format!("incr would overflow the value of {k:?}"))?;
                self.map.insert(k.to_string(), next.to_string());
                Ok(next.to_string())
            }
            Command::Append(k, v) => {
                match self.map.get_mut(k) {
                    Some(list) => {
                        list.push(' ');
                        list.push_str(v);
                    }
                    None => {
                        self.map.insert(k.to_string(), v.to_string());
                    }
                }
                Ok("OK".to_string())
            }
            Command::Get(_) | Command::Len => Err(format!(
                "{:?} is a query, not a proposal: use `query`",
                command.canonical()
            )),
        }
    }

    /// Before `key` may change: if a snapshot being read has yet to write
    /// it out, keep the value it had when the snapshot began.
    fn remember(&mut self, key: &str) {
        let Some(reading) = &mut self.reading else { return };
        if reading.last.as_deref().is_some_and(|last| key <= last) || reading.before.contains_key(key) {
            return;
        }
        reading.before.insert(key.to_string(), self.map.get(key).cloned());
    }

    fn read(&self, command: Command<'_>) -> Result<String, String> {
        match command {
            Command::Get(k) => Ok(self.map.get(k).cloned().unwrap_or_else(|| "(nil)".to_string())),
            Command::Len => Ok(self.map.len().to_string()),
            other => Err(format!(
                "{:?} changes state, so it is a proposal, not a query: use `propose`",
                other.canonical()
            )),
        }
    }
}

/// Encode the state in the shared kv snapshot format (see README.md).
pub fn encode_snapshot(map: &BTreeMap<String, String>) -> Vec<u8> {
    let size: usize = map.iter().map(|(k, v)| 8 + k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(12 + size);
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&(map.len() as u64).to_le_bytes());
    for (k, v) in map {
        for field in [k, v] {
            out.extend_from_slice(&(field.len() as u32).to_le_bytes());
            out.extend_from_slice(field.as_bytes());
        }
    }
    out
}

/// Decode the shared kv snapshot format, rejecting anything malformed.
pub fn decode_snapshot(bytes: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let mut reader = Reader { bytes, at: 0 };
    if reader.take(4)? != SNAPSHOT_MAGIC {
        return Err("not a kv snapshot: bad magic".to_string());
    }
    let count = u64::from_le_bytes(reader.take(8)?.try_into().expect("8 bytes"));
    let mut map = BTreeMap::new();
    let mut previous: Option<String> = None;
    for _ in 0..count {
        let key = reader.string()?;
        let value = reader.string()?;
        if previous.as_ref().is_some_and(|p| p.as_str() >= key.as_str()) {
            return Err("corrupt kv snapshot: keys not in ascending order".to_string());
        }
        previous = Some(key.clone());
        map.insert(key, value);
    }
    if reader.at != bytes.len() {
        return Err("corrupt kv snapshot: trailing bytes".to_string());
    }
    Ok(map)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len());
        let end = end.ok_or_else(|| "corrupt kv snapshot: truncated".to_string())?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn string(&mut self) -> Result<String, String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| "corrupt kv snapshot: field is not UTF-8".to_string())
    }
}

/// Append one RKV1 pair.
fn put_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    for field in [key, value] {
        out.extend_from_slice(&(field.len() as u32).to_le_bytes());
        out.extend_from_slice(field.as_bytes());
    }
}

impl Kv {
    fn begin_reading(&mut self) {
        self.reading = Some(Reading {
            count: self.map.len() as u64,
            ..Reading::default()
        });
    }

    /// Up to `max_bytes` more of the snapshot begun last (empty: done).
    fn next_chunk(&mut self, max_bytes: usize) -> Result<Vec<u8>, String> {
        let max_bytes = max_bytes.max(1);
        let Kv { map, reading, .. } = self;
        let Some(r) = reading.as_mut() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(max_bytes.min(1 << 20));
        if !r.header_written {
            r.pending.extend_from_slice(SNAPSHOT_MAGIC);
            r.pending.extend_from_slice(&r.count.to_le_bytes());
            r.header_written = true;
        }
        let from = match &r.last {
            Some(last) => Bound::Excluded(last.clone()),
            None => Bound::Unbounded,
        };
        let mut live = map.range::<String, _>((from.clone(), Bound::Unbounded)).peekable();
        let mut old = r.before.range::<String, _>((from, Bound::Unbounded)).peekable();
        loop {
            // Hand out what is pending first.
            if r.pending_at < r.pending.len() {
                let take = (max_bytes - out.len()).min(r.pending.len() - r.pending_at);
                out.extend_from_slice(&r.pending[r.pending_at..r.pending_at + take]);
                r.pending_at += take;
                if r.pending_at == r.pending.len() {
                    r.pending.clear();
                    r.pending_at = 0;
                }
            }
            if out.len() >= max_bytes {
                break;
            }
            // The next key of the state as of begin: the smaller of the
            // live map's and the overlay's; the overlay's value wins.
            let next = match (live.peek(), old.peek()) {
                (None, None) => None,
                (Some((k, _)), Some((o, _))) if o <= k => {
                    if o == k {
                        live.next();
                    }
                    old.next().map(|(k, v)| (k, v.as_ref()))
                }
                (Some(_), _) => live.next().map(|(k, v)| (k, Some(v))),
                (None, Some(_)) => old.next().map(|(k, v)| (k, v.as_ref())),
            };
            let Some((key, value)) = next else {
                // All written out: the snapshot is done.
                *reading = None;
                break;
            };
            r.last = Some(key.clone());
            if let Some(value) = value {
                put_pair(&mut r.pending, key, value);
            }
        }
        if let Some(r) = reading.as_mut() {
            // Changes at or below `last` no longer matter.
            if let Some(last) = &r.last {
                let later = r.before.split_off(&(last.clone() + "\0"));
                r.before = later;
            }
        }
        Ok(out)
    }
}

/// Decodes an RKV1 snapshot given in pieces of any size.
#[derive(Debug, Clone, Default)]
struct Decoder {
    /// Bytes received but not yet decoded (at most one partial pair).
    carry: Vec<u8>,
    /// The header's count, once read.
    count: Option<u64>,
    map: BTreeMap<String, String>,
    last: Option<String>,
}

impl Decoder {
    fn push(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.carry.extend_from_slice(chunk);
        let mut reader = Reader {
            bytes: &self.carry,
            at: 0,
        };
        if self.count.is_none() {
            if reader.bytes.len() < 12 {
                return Ok(());
            }
            if reader.take(4)? != SNAPSHOT_MAGIC {
                return Err("not a kv snapshot: bad magic".to_string());
            }
            self.count = Some(u64::from_le_bytes(reader.take(8)?.try_into().expect("8 bytes")));
        }
        let count = self.count.unwrap_or(0);
        loop {
            let start = reader.at;
            let (Ok(key), Ok(value)) = (reader.string(), reader.string()) else {
                reader.at = start;
                break;
            };
            if self.map.len() as u64 >= count {
                return Err("corrupt kv snapshot: trailing bytes".to_string());
            }
            if self.last.as_ref().is_some_and(|last| last.as_str() >= key.as_str()) {
                return Err("corrupt kv snapshot: keys not in ascending order".to_string());
            }
            self.last = Some(key.clone());
            self.map.insert(key, value);
        }
        let used = reader.at;
        self.carry.drain(..used);
        Ok(())
    }

    fn finish(self) -> Result<BTreeMap<String, String>, String> {
        let count = self.count.ok_or("corrupt kv snapshot: truncated")?;
        if !self.carry.is_empty() || (self.map.len() as u64) < count {
            return Err("corrupt kv snapshot: truncated".to_string());
        }
        Ok(self.map)
    }
}

impl Plugin for Kv {
    fn apply(&mut self, _index: u64, entry: &[u8]) -> Result<Vec<u8>, String> {
        let command = parse_bytes(entry)?;
        self.execute(command).map(String::into_bytes)
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let command = parse_bytes(request)?;
        self.read(command).map(String::into_bytes)
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        Ok(encode_snapshot(&self.map))
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        decode_snapshot(snapshot).map(|map| Kv { map, ..Kv::default() })
    }

    fn snapshot_begin(&mut self) -> Result<(), String> {
        self.begin_reading();
        Ok(())
    }

    fn snapshot_next(&mut self, max_bytes: usize) -> Result<Vec<u8>, String> {
        self.next_chunk(max_bytes)
    }

    fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.restoring.get_or_insert_with(Decoder::default).push(chunk)
    }

    fn restore_finish(&mut self) -> Result<(), String> {
        let decoder = self.restoring.take().unwrap_or_default();
        self.map = decoder.finish()?;
        Ok(())
    }

    fn encode(text: &str) -> Result<Vec<u8>, String> {
        parse(text).map(|command| command.canonical().into_bytes())
    }
}

#[cfg(all(target_arch = "wasm32", feature = "export"))]
raftify_guest::export_plugin!(Kv);

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kv: &mut Kv, text: &str) -> Result<String, String> {
        let entry = Kv::encode(text)?;
        let command = parse_bytes(&entry)?;
        let out = if command.is_proposal() {
            kv.apply(1, &entry)?
        } else {
            kv.query(&entry)?
        };
        Ok(String::from_utf8(out).unwrap())
    }

    #[test]
    fn the_command_language_from_design_md() {
        let mut kv = Kv::default();
        assert_eq!(run(&mut kv, "set a 1").unwrap(), "OK");
        assert_eq!(run(&mut kv, "get a").unwrap(), "1");
        assert_eq!(run(&mut kv, "get missing").unwrap(), "(nil)");
        assert_eq!(run(&mut kv, "incr a").unwrap(), "2");
        assert_eq!(run(&mut kv, "incr a 40").unwrap(), "42");
        assert_eq!(run(&mut kv, "incr fresh -3").unwrap(), "-3");
        assert_eq!(run(&mut kv, "append l x").unwrap(), "OK");
        assert_eq!(run(&mut kv, "append l y").unwrap(), "OK");
        assert_eq!(run(&mut kv, "get l").unwrap(), "x y");
        assert_eq!(run(&mut kv, "len").unwrap(), "3");
        assert_eq!(run(&mut kv, "del a").unwrap(), "1");
        assert_eq!(run(&mut kv, "del a").unwrap(), "0");
        assert_eq!(run(&mut kv, "len").unwrap(), "2");
    }

    #[test]
    fn bad_input_is_an_error_and_changes_nothing() {
        let mut kv = Kv::default();
        run(&mut kv, "set word hello").unwrap();
        let before = kv.clone();
        for bad in ["", "frob a", "set a", "set a b c", "incr a x", "get", "len x"] {
            assert!(run(&mut kv, bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(run(&mut kv, "incr word").unwrap_err().contains("not an integer"));
        run(&mut kv, "set big 9223372036854775807").unwrap();
        assert!(run(&mut kv, "incr big").unwrap_err().contains("overflow"));
        assert!(kv.apply(1, &[0xff, 0xfe]).is_err());
        assert!(kv.apply(1, b"get word").unwrap_err().contains("query"));
        assert!(kv.query(b"set a 1").unwrap_err().contains("proposal"));
        kv.map.remove("big");
        assert_eq!(kv, before);
    }

    #[test]
    fn encode_produces_canonical_text() {
        assert_eq!(Kv::encode("  set   a  1 ").unwrap(), b"set a 1");
        assert_eq!(Kv::encode("incr n").unwrap(), b"incr n 1");
        assert_eq!(Kv::decode(b"set a 1").unwrap(), "set a 1");
    }

    #[test]
    fn snapshot_round_trips_and_rejects_corruption() {
        let mut kv = Kv::default();
        for i in 0..100 {
            run(&mut kv, &format!("set k{i} v{i}")).unwrap();
        }
        let snap = kv.snapshot().unwrap();
        assert_eq!(Kv::restore(&snap).unwrap(), kv);
        assert_eq!(Kv::restore(&encode_snapshot(&BTreeMap::new())).unwrap(), Kv::default());
        assert!(Kv::restore(&snap[..snap.len() - 1]).is_err());
        assert!(Kv::restore(b"XXXX").is_err());
        let mut trailing = snap.clone();
        trailing.push(0);
        assert!(Kv::restore(&trailing).is_err());
    }

    /// Read a streamed snapshot to its end in chunks of `max` bytes,
    /// applying `during` (one command per chunk) while it is read.
    fn stream(kv: &mut Kv, max: usize, during: &[&str]) -> Vec<u8> {
        kv.snapshot_begin().unwrap();
        let mut out = Vec::new();
        let mut during = during.iter();
        loop {
            let chunk = kv.snapshot_next(max).unwrap();
            if chunk.is_empty() {
                return out;
            }
            assert!(chunk.len() <= max, "a chunk of {} bytes for max {max}", chunk.len());
            out.extend(chunk);
            if let Some(command) = during.next() {
                run(kv, command).unwrap();
            }
        }
    }

    fn restore_in_pieces(bytes: &[u8], piece: usize) -> Result<Kv, String> {
        let mut kv = Kv::default();
        for chunk in bytes.chunks(piece.max(1)) {
            kv.restore_chunk(chunk)?;
        }
        kv.restore_finish()?;
        Ok(kv)
    }

    #[test]
    fn a_streamed_snapshot_is_the_whole_snapshot_in_pieces() {
        let mut kv = Kv::default();
        assert_eq!(stream(&mut kv, 5, &[]), encode_snapshot(&BTreeMap::new()));
        for i in 0..300 {
            run(&mut kv, &format!("set k{i:03} value-{i}")).unwrap();
        }
        let whole = kv.snapshot().unwrap();
        for max in [1, 7, 64, 1 << 20] {
            assert_eq!(stream(&mut kv, max, &[]), whole, "max {max}");
            for piece in [1, 3, 1000, whole.len()] {
                assert_eq!(
                    restore_in_pieces(&whole, piece).unwrap(),
                    kv,
                    "max {max}, piece {piece}"
                );
            }
        }
    }

    #[test]
    fn a_streamed_snapshot_shows_the_state_at_its_begin_while_entries_apply() {
        let mut kv = Kv::default();
        for i in 0..200 {
            run(&mut kv, &format!("set k{i:03} v{i}")).unwrap();
        }
        let at_begin = kv.clone();
        // Changes ahead of and behind the cursor, inserts, deletes, appends.
        let during = [
            "set k150 changed",
            "del k199",
            "set k000 early",
            "set zzz new",
            "append k120 more",
            "del k100",
            "set k100 back",
            "incr n 5",
            "set aaa first",
            "del k050",
        ];
        let streamed = stream(&mut kv, 97, &during);
        assert_eq!(streamed, at_begin.snapshot().unwrap());
        assert_eq!(
            kv.reading.as_ref().map(|r| r.before.len()),
            None,
            "the overlay is dropped at the end"
        );
        assert_eq!(kv.get("k150"), Some("changed"));
        assert_eq!(kv.get("k199"), None);
        // And the next snapshot shows the changes.
        assert_eq!(stream(&mut kv, 4096, &[]), kv.snapshot().unwrap());
    }

    #[test]
    fn a_streamed_restore_rejects_what_restore_rejects() {
        let mut kv = Kv::default();
        for i in 0..50 {
            run(&mut kv, &format!("set k{i:02} v{i}")).unwrap();
        }
        let snap = kv.snapshot().unwrap();
        for piece in [1, 10, snap.len()] {
            assert!(restore_in_pieces(&snap[..snap.len() - 1], piece).is_err());
            assert!(restore_in_pieces(&snap[..11], piece).is_err());
            assert!(restore_in_pieces(b"XXXXXXXXXXXXXXXX", piece).is_err());
            let mut trailing = snap.clone();
            trailing.push(0);
            assert!(restore_in_pieces(&trailing, piece).is_err());
            let mut unordered = encode_snapshot(&BTreeMap::new());
            unordered[4] = 2;
            put_pair(&mut unordered, "b", "1");
            put_pair(&mut unordered, "a", "1");
            assert!(restore_in_pieces(&unordered, piece).unwrap_err().contains("ascending"));
        }
        assert!(
            Kv::default().restore_finish().is_err(),
            "an empty restore is not a state"
        );
    }
}

//! kv-v2: kv plus one query, `strlen K` (the length of K's value in bytes,
//! 0 if absent). Its state and snapshot format are kv's, so a running
//! cluster can hot-swap kv -> kv-v2 -> kv and keep every key.

// kv's state machine, compiled in as a module rather than linked as a crate:
// a linked kv would bring its own component exports along.
#[path = "../../kv/src/lib.rs"]
#[allow(dead_code)]
mod kv;

use kv::Kv;
use raftify_guest::Plugin;

#[derive(Default)]
pub struct KvV2 {
    kv: Kv,
}

/// `strlen K`, if that is what `text` says.
fn strlen_key(text: &str) -> Option<Result<&str, String>> {
    let mut words = text.split_whitespace();
    if words.next() != Some("strlen") {
        return None;
    }
    Some(match (words.next(), words.next()) {
        (Some(key), None) => Ok(key),
        _ => Err("wrong number of arguments: usage: strlen KEY".to_string()),
    })
}

impl Plugin for KvV2 {
    fn apply(&mut self, index: u64, entry: &[u8]) -> Result<Vec<u8>, String> {
        if let Ok(text) = std::str::from_utf8(entry)
            && strlen_key(text).is_some()
        {
            return Err(format!("{text:?} is a query, not a proposal: use `query`"));
        }
        self.kv.apply(index, entry)
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        let text = std::str::from_utf8(request).map_err(|_| "command is not UTF-8 text".to_string())?;
        match strlen_key(text) {
            Some(key) => Ok(self.kv.get(key?).map_or(0, str::len).to_string().into_bytes()),
            None => self.kv.query(request),
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        self.kv.snapshot()
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        Ok(KvV2 {
            kv: Kv::restore(snapshot)?,
        })
    }

    fn snapshot_begin(&mut self) -> Result<(), String> {
        self.kv.snapshot_begin()
    }

    fn snapshot_next(&mut self, max_bytes: usize) -> Result<Vec<u8>, String> {
        self.kv.snapshot_next(max_bytes)
    }

    fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.kv.restore_chunk(chunk)
    }

    fn restore_finish(&mut self) -> Result<(), String> {
        self.kv.restore_finish()
    }

    fn encode(text: &str) -> Result<Vec<u8>, String> {
        match strlen_key(text) {
            Some(key) => Ok(format!("strlen {}", key?).into_bytes()),
            None => Kv::encode(text),
        }
    }
}

#[cfg(target_arch = "wasm32")]
raftify_guest::export_plugin!(KvV2);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strlen_is_new_and_everything_else_is_kv() {
        let mut v2 = KvV2::default();
        v2.apply(1, b"set word hello").unwrap();
        assert_eq!(v2.query(&KvV2::encode("strlen word").unwrap()).unwrap(), b"5");
        assert_eq!(v2.query(b"strlen missing").unwrap(), b"0");
        assert!(v2.apply(2, b"strlen word").is_err());
        assert!(KvV2::encode("strlen").is_err());
        let restored = KvV2::restore(&v2.snapshot().unwrap()).unwrap();
        assert_eq!(restored.query(b"get word").unwrap(), b"hello");
    }
}

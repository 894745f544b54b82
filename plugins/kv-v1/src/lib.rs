//! kv-v1: the kv state machine exported through `raftify:fsm@0.1.0`, whose
//! `snapshot()` and `restore()` pass the whole state in one call. The host
//! accepts 0.1.0 components beside 0.2.0 ones; this one lets the tests check
//! that (and swap between the two) without a second toolchain.

// kv's source, compiled in as a module. It implements the SDK's `Plugin`
// trait, but the SDK exports 0.2.0, and one component exports one world:
// so this crate stands in for the SDK (`raftify_guest` is this crate) and
// exports 0.1.0 itself.
extern crate self as raftify_guest;

#[path = "../../kv/src/lib.rs"]
#[allow(dead_code)]
mod kv;

use std::cell::RefCell;

/// The SDK's trait, as kv implements it.
pub trait Plugin: Default {
    fn apply(&mut self, index: u64, entry: &[u8]) -> Result<Vec<u8>, String>;
    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String>;
    fn snapshot(&self) -> Result<Vec<u8>, String>;
    fn restore(snapshot: &[u8]) -> Result<Self, String>;
    fn encode(text: &str) -> Result<Vec<u8>, String>;
    fn decode(entry: &[u8]) -> Result<String, String> {
        String::from_utf8(entry.to_vec()).map_err(|_| "entry is not UTF-8 text".to_string())
    }
    fn render(response: &[u8]) -> Result<String, String> {
        String::from_utf8(response.to_vec()).map_err(|_| "response is not UTF-8 text".to_string())
    }
    fn snapshot_begin(&mut self) -> Result<(), String>;
    fn snapshot_next(&mut self, max_bytes: usize) -> Result<Vec<u8>, String>;
    fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), String>;
    fn restore_finish(&mut self) -> Result<(), String>;
}

wit_bindgen::generate!({
    path: "../../wit",
    world: "raftify:fsm/plugin@0.1.0",
});

thread_local! {
    static STATE: RefCell<kv::Kv> = RefCell::new(kv::Kv::default());
}

struct Exports;

impl exports::raftify::fsm::state_machine::Guest for Exports {
    fn apply(index: u64, entry: Vec<u8>) -> Result<Vec<u8>, String> {
        STATE.with(|s| s.borrow_mut().apply(index, &entry))
    }

    fn query(request: Vec<u8>) -> Result<Vec<u8>, String> {
        STATE.with(|s| s.borrow().query(&request))
    }

    fn snapshot() -> Result<Vec<u8>, String> {
        STATE.with(|s| s.borrow().snapshot())
    }

    fn restore(snapshot: Vec<u8>) -> Result<(), String> {
        let restored = kv::Kv::restore(&snapshot)?;
        STATE.with(|s| *s.borrow_mut() = restored);
        Ok(())
    }
}

impl exports::raftify::fsm::codec::Guest for Exports {
    fn encode(text: String) -> Result<Vec<u8>, String> {
        kv::Kv::encode(&text)
    }

    fn decode(entry: Vec<u8>) -> Result<String, String> {
        kv::Kv::decode(&entry)
    }

    fn render(response: Vec<u8>) -> Result<String, String> {
        kv::Kv::render(&response)
    }
}

export!(Exports);

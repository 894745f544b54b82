//! Stand-in for the `raftify-guest` crate, so that plugins/kv/src/lib.rs
//! compiles natively with plain rustc: the `Plugin` trait with the SDK's
//! default `decode` and `render`, and the streamed-snapshot methods (kv
//! overrides them; the stub's defaults only say they are missing), without
//! the WIT bindings.
//! Keep in step with guest-sdk/src/lib.rs.

pub trait Plugin: Default + 'static {
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

    fn snapshot_begin(&mut self) -> Result<(), String> {
        Err("streamed snapshots are not in the stub".to_string())
    }

    fn snapshot_next(&mut self, _max_bytes: usize) -> Result<Vec<u8>, String> {
        Err("streamed snapshots are not in the stub".to_string())
    }

    fn restore_chunk(&mut self, _chunk: &[u8]) -> Result<(), String> {
        Err("streamed snapshots are not in the stub".to_string())
    }

    fn restore_finish(&mut self) -> Result<(), String> {
        Err("streamed snapshots are not in the stub".to_string())
    }
}

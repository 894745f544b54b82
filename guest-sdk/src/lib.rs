//! The Rust guest SDK for raftify-host plugins.
//!
//! A plugin is a replicated state machine plus the codec for its log entries,
//! compiled to a WebAssembly component for `wasm32-wasip2`. raftify-host
//! loads it into a deterministic sandbox on every replica and feeds it the
//! committed log. With this crate a plugin author implements one trait,
//! [`Plugin`], and calls one macro, [`export_plugin!`]; the WIT bindings stay
//! hidden.
//!
//! # What the host guarantees, and what the plugin must guarantee
//!
//! The host calls one function at a time, feeds `apply` every committed entry
//! exactly once and in log order, and throws an instance away after a trap
//! (panic, out of fuel, out of memory), rebuilding the state as it was before
//! the trapping call. The plugin must be deterministic (no reading the clock,
//! randomness or `HashMap` iteration order into its state), must leave the
//! state untouched when `apply` returns `Err`, and must not change state in
//! `query` or `snapshot`. The full contract is in `wit/fsm.wit`.
//!
//! # Example: a counter
//!
//! ```
//! use raftify_guest::Plugin;
//!
//! #[derive(Default)]
//! struct Counter {
//!     value: i64,
//! }
//!
//! impl Plugin for Counter {
//!     fn apply(&mut self, _index: u64, entry: &[u8]) -> Result<Vec<u8>, String> {
//!         let by: i64 = std::str::from_utf8(entry)
//!             .ok()
//!             .and_then(|text| text.parse().ok())
//!             .ok_or("entry is not an integer")?;
//!         // Compute first, mutate last: an Err must leave the state unchanged.
//!         let next = self.value.checked_add(by).ok_or("overflow")?;
//!         self.value = next;
//!         Ok(next.to_string().into_bytes())
//!     }
//!
//!     fn query(&self, _request: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok(self.value.to_string().into_bytes())
//!     }
//!
//!     fn snapshot(&self) -> Result<Vec<u8>, String> {
//!         Ok(self.value.to_le_bytes().to_vec())
//!     }
//!
//!     fn restore(snapshot: &[u8]) -> Result<Self, String> {
//!         let bytes: [u8; 8] = snapshot.try_into().map_err(|_| "snapshot is not 8 bytes")?;
//!         Ok(Counter { value: i64::from_le_bytes(bytes) })
//!     }
//!
//!     fn encode(text: &str) -> Result<Vec<u8>, String> {
//!         let text = text.trim();
//!         text.parse::<i64>().map_err(|_| format!("not an integer: {text:?}"))?;
//!         Ok(text.as_bytes().to_vec())
//!     }
//! }
//!
//! // In the plugin crate (a `cdylib` built for wasm32-wasip2):
//! // raftify_guest::export_plugin!(Counter);
//! # let mut c = Counter::default();
//! # assert_eq!(c.apply(1, b"5").unwrap(), b"5");
//! # let restored = Counter::restore(&c.snapshot().unwrap()).unwrap();
//! # assert_eq!(restored.value, 5);
//! ```
//!
//! The plugin crate's `Cargo.toml` needs `crate-type = ["cdylib"]` and a
//! dependency on this crate; `cargo build --target wasm32-wasip2 --release`
//! then produces the component. See `plugins/kv` for a complete plugin.

/// The plugin interface. Implement it on your state type and export it with
/// [`export_plugin!`].
///
/// The type's `Default` value is the initial state of a fresh replica.
pub trait Plugin: Default + 'static {
    /// Apply one committed entry at log `index`.
    ///
    /// `entry` is untrusted bytes: return `Err` for anything malformed rather
    /// than panicking. An `Err` must leave the state exactly as it was; its
    /// message goes back to the proposer and is replicated like any result.
    fn apply(&mut self, index: u64, entry: &[u8]) -> Result<Vec<u8>, String>;

    /// Answer a read-only request. Must not change the state.
    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String>;

    /// Serialize the whole state in a stable, documented format.
    fn snapshot(&self) -> Result<Vec<u8>, String>;

    /// Build a state from bytes made by [`Plugin::snapshot`], possibly by
    /// another version of this plugin or by a plugin in another language.
    /// The current state is replaced only if this returns `Ok`.
    fn restore(snapshot: &[u8]) -> Result<Self, String>;

    /// Command text (a proposal or a query) to entry or query bytes.
    fn encode(text: &str) -> Result<Vec<u8>, String>;

    /// Entry bytes back to command text. The default accepts UTF-8 entries.
    fn decode(entry: &[u8]) -> Result<String, String> {
        String::from_utf8(entry.to_vec()).map_err(|_| "entry is not UTF-8 text".to_string())
    }

    /// Response bytes (from `apply` or `query`) to text. The default accepts
    /// UTF-8 responses.
    fn render(response: &[u8]) -> Result<String, String> {
        String::from_utf8(response.to_vec()).map_err(|_| "response is not UTF-8 text".to_string())
    }
}

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "raftify:fsm/plugin@0.1.0",
        pub_export_macro: true,
        export_macro_name: "__export_raw",
        default_bindings_module: "raftify_guest::__bindings",
    });
}

/// Export a [`Plugin`] implementation as the component's state machine and
/// codec. Call it once, at the top level of the plugin crate.
///
/// ```text
/// raftify_guest::export_plugin!(MyStateMachine);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            ::std::thread_local! {
                static STATE: ::core::cell::RefCell<$plugin> =
                    ::core::cell::RefCell::new(<$plugin as ::core::default::Default>::default());
            }

            struct __RaftifyExports;

            impl $crate::__bindings::exports::raftify::fsm::state_machine::Guest for __RaftifyExports {
                fn apply(
                    index: u64,
                    entry: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    STATE.with(|s| $crate::Plugin::apply(&mut *s.borrow_mut(), index, &entry))
                }

                fn query(
                    request: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    STATE.with(|s| $crate::Plugin::query(&*s.borrow(), &request))
                }

                fn snapshot() -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    STATE.with(|s| $crate::Plugin::snapshot(&*s.borrow()))
                }

                fn restore(snapshot: ::std::vec::Vec<u8>) -> ::core::result::Result<(), ::std::string::String> {
                    let restored = <$plugin as $crate::Plugin>::restore(&snapshot)?;
                    STATE.with(|s| *s.borrow_mut() = restored);
                    Ok(())
                }
            }

            impl $crate::__bindings::exports::raftify::fsm::codec::Guest for __RaftifyExports {
                fn encode(
                    text: ::std::string::String,
                ) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    <$plugin as $crate::Plugin>::encode(&text)
                }

                fn decode(
                    entry: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                    <$plugin as $crate::Plugin>::decode(&entry)
                }

                fn render(
                    response: ::std::vec::Vec<u8>,
                ) -> ::core::result::Result<::std::string::String, ::std::string::String> {
                    <$plugin as $crate::Plugin>::render(&response)
                }
            }

    $crate::__bindings::__export_raw!(__RaftifyExports with_types_in $crate::__bindings);
        };
    };
}

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
//! `query` or `snapshot`. The full contract is in `wit/0.2.0/fsm.wit` (the
//! ABI this SDK exports, `raftify:fsm@0.2.0`: streamed snapshots).
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
//! # // The default streamed snapshot hands out snapshot() in pieces.
//! # c.snapshot_begin().unwrap();
//! # let mut bytes = Vec::new();
//! # loop {
//! #     let chunk = c.snapshot_next(3).unwrap();
//! #     if chunk.is_empty() { break; }
//! #     assert!(chunk.len() <= 3);
//! #     bytes.extend(chunk);
//! # }
//! # let mut fresh = Counter::default();
//! # for piece in bytes.chunks(5) { fresh.restore_chunk(piece).unwrap(); }
//! # fresh.restore_finish().unwrap();
//! # assert_eq!(fresh.value, 5);
//! ```
//!
//! # Snapshots of a large state
//!
//! The SDK exports ABI `raftify:fsm@0.2.0`, in which the host reads a
//! snapshot in chunks and restores one in chunks, and keeps applying entries
//! while it reads. The defaults build on [`Plugin::snapshot`] and
//! [`Plugin::restore`]: a snapshot is taken whole inside the guest and handed
//! out in pieces. That is right for a small state. For a large one, override
//! [`Plugin::snapshot_begin`] and [`Plugin::snapshot_next`] to write the state
//! out as it is read (the chunks must show the state as of `snapshot_begin`
//! even as `apply` changes it: keep the old value of what changes, as
//! `plugins/kv` does), and [`Plugin::restore_chunk`] and
//! [`Plugin::restore_finish`] to decode as the pieces come.
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

    /// Begin a streamed snapshot of the state as it is now; the host then
    /// reads it with [`Plugin::snapshot_next`] and may call `apply` and
    /// `query` in between, so the chunks must describe the state as of this
    /// call (keep a copy, or copy on write).
    ///
    /// The default calls [`Plugin::snapshot`] once and hands its bytes out
    /// in pieces: simple, and the host never holds the whole state, but the
    /// guest holds the state twice while a snapshot is read and `snapshot`
    /// runs in one call. Override both methods to stream a large state.
    fn snapshot_begin(&mut self) -> Result<(), String> {
        let bytes = self.snapshot()?;
        whole::begin_snapshot(bytes);
        Ok(())
    }

    /// The next at most `max_bytes` bytes of the snapshot begun last (at
    /// least one while any remain); empty once it is all read.
    fn snapshot_next(&mut self, max_bytes: usize) -> Result<Vec<u8>, String> {
        whole::next_snapshot_chunk(max_bytes)
    }

    /// One piece of a snapshot being restored, in order. It is called on a
    /// fresh `Default` value, which becomes the state once
    /// [`Plugin::restore_finish`] returns `Ok`; the pieces' boundaries are
    /// arbitrary. The default collects the pieces for [`Plugin::restore`].
    fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), String> {
        whole::push_restore_chunk(chunk);
        Ok(())
    }

    /// Every piece was given: check the snapshot is whole and become its
    /// state. The default passes the collected pieces to [`Plugin::restore`].
    fn restore_finish(&mut self) -> Result<(), String> {
        *self = Self::restore(&whole::take_restored())?;
        Ok(())
    }
}

/// The buffers behind the default streamed snapshot: a whole-state
/// `snapshot()` handed out in pieces, and pieces collected for `restore()`.
mod whole {
    use std::cell::RefCell;

    thread_local! {
        static OUT: RefCell<(Vec<u8>, usize)> = const { RefCell::new((Vec::new(), 0)) };
        static IN: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }

    pub fn begin_snapshot(bytes: Vec<u8>) {
        OUT.with(|out| *out.borrow_mut() = (bytes, 0));
    }

    pub fn next_snapshot_chunk(max_bytes: usize) -> Result<Vec<u8>, String> {
        OUT.with(|out| {
            let (bytes, at) = &mut *out.borrow_mut();
            let end = bytes.len().min(at.saturating_add(max_bytes.max(1)));
            let chunk = bytes[*at..end].to_vec();
            *at = end;
            if *at == bytes.len() {
                *bytes = Vec::new();
                *at = 0;
            }
            Ok(chunk)
        })
    }

    pub fn push_restore_chunk(chunk: &[u8]) {
        IN.with(|buffer| buffer.borrow_mut().extend_from_slice(chunk));
    }

    pub fn take_restored() -> Vec<u8> {
        IN.with(|buffer| std::mem::take(&mut *buffer.borrow_mut()))
    }

    /// A restore begins: drop pieces an abandoned one left.
    pub fn reset_restore() {
        IN.with(|buffer| *buffer.borrow_mut() = Vec::new());
    }
}

#[doc(hidden)]
pub fn __reset_restore() {
    whole::reset_restore();
}

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit/0.2.0",
        world: "raftify:fsm/plugin@0.2.0",
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
                // The state a streamed restore is building, until it finishes.
                static RESTORING: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
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

                fn snapshot_begin() -> ::core::result::Result<(), ::std::string::String> {
                    STATE.with(|s| $crate::Plugin::snapshot_begin(&mut *s.borrow_mut()))
                }

                fn snapshot_next(max_bytes: u32) -> ::core::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    STATE.with(|s| $crate::Plugin::snapshot_next(&mut *s.borrow_mut(), max_bytes as usize))
                }

                fn restore_begin() -> ::core::result::Result<(), ::std::string::String> {
                    $crate::__reset_restore();
                    RESTORING.with(|r| {
                        *r.borrow_mut() = ::core::option::Option::Some(<$plugin as ::core::default::Default>::default())
                    });
                    Ok(())
                }

                fn restore_chunk(chunk: ::std::vec::Vec<u8>) -> ::core::result::Result<(), ::std::string::String> {
                    RESTORING.with(|r| match &mut *r.borrow_mut() {
                        ::core::option::Option::Some(next) => $crate::Plugin::restore_chunk(next, &chunk),
                        ::core::option::Option::None => Err("restore-chunk without restore-begin".into()),
                    })
                }

                fn restore_finish() -> ::core::result::Result<(), ::std::string::String> {
                    let mut next = RESTORING
                        .with(|r| r.borrow_mut().take())
                        .ok_or_else(|| ::std::string::String::from("restore-finish without restore-begin"))?;
                    $crate::Plugin::restore_finish(&mut next)?;
                    STATE.with(|s| *s.borrow_mut() = next);
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

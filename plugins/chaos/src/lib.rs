//! chaos: a hostile plugin for the sandbox tests.
//!
//! It keeps a small key-value map (`set K V`, query `get K`) so tests can
//! check that state survives its misbehaviour, and misbehaves on command:
//!
//! | entry or query | what it does                                             |
//! |----------------|----------------------------------------------------------|
//! | `spin`         | loops forever (the host must stop it with fuel)          |
//! | `hog`          | allocates without bound (the memory cap must stop it)    |
//! | `panic`        | panics (a trap)                                          |
//! | `set-then-panic K V` | changes state, then panics: the change must vanish |
//! | `fail`         | returns `Err` (an ordinary replicated error)             |
//! | `stamp K`      | stores the wall-clock time and a random number at K, to  |
//! |                | show the host's clock and randomness are deterministic   |
//! | `print`        | writes to stdout and stderr (captured into the host log) |
//! | `encode-panic` | the codec panics while encoding it (a trap in a request) |
//! | `encode-print` | the codec writes to stderr while encoding it             |
//! | `encode-sleep MS` | the codec sleeps MS ms (virtual time) while encoding it |
//! | `encode-reach-out` | the codec encodes what `reach-out` finds             |
//! | `bad-restore`  | makes the next `restore` fail                            |
//! | `binary`       | returns bytes that are not UTF-8, so `render` fails      |
//! | `sleep MS`     | `std::thread::sleep`s MS ms (a WASI clock pollable): the |
//! |                | host's virtual time must end it at once                  |
//! | `sleep-elapsed MS` | sleeps MS ms and returns the nanoseconds `Instant`   |
//! |                | measured across the sleep                                |
//! | `nan`          | divides zero by zero on non-canonical NaN inputs and     |
//! |                | returns the bits: the host must canonicalize them        |
//! | `reach-out`    | tries the environment, the filesystem, stdin and the network, |
//! |                | and reports what it found (nothing, on every replica)    |
//! | `sleep-until-later MS` | busy-reads `Instant::now()` until MS ms passed:  |
//! |                | with one virtual nanosecond per reading, fuel runs out   |
//! |                | first unless MS is tiny                                  |
//! | `grow MIB`     | allocates MIB MiB and frees it: linear memory stays grown |
//! | `probe K`      | stores at K what a plugin sees of its instance beyond its |
//! |                | state: `memory.size` and a fresh `HashMap`'s key order    |
//! | query `hoard MIB` | allocates MIB MiB and never frees it: memory only the node |
//! |                | that served the query holds                               |
//! | query `taint`  | makes this replica's next snapshots differ (a query that  |
//! |                | changes state: a divergence the host must report)        |
//!
//! It only exists as a Wasm component; on other targets the crate is empty.

#![cfg(target_arch = "wasm32")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use raftify_guest::Plugin;

/// Set by the `taint` query, on the replica that served it only.
static TAINTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Default)]
struct Chaos {
    map: BTreeMap<String, String>,
}

fn words(bytes: &[u8]) -> Result<Vec<&str>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    Ok(text.split_whitespace().collect())
}

/// Tries the environment, the filesystem, stdin and the network.
fn reach_out() -> String {
    use std::io::Read;
    let vars = std::env::vars().count();
    let args = std::env::args().count();
    let read = std::fs::read_dir("/").is_ok() || std::fs::read_dir(".").is_ok();
    let write = std::fs::write("chaos.txt", b"x").is_ok();
    let mut input = Vec::new();
    let stdin = std::io::stdin().read_to_end(&mut input).map_or(-1, |n| n as i64);
    let connect = std::net::TcpStream::connect(("127.0.0.1", 7070)).is_ok();
    let bind = std::net::TcpListener::bind(("127.0.0.1", 0)).is_ok();
    let udp = std::net::UdpSocket::bind(("127.0.0.1", 0)).is_ok();
    let lookup = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 80)).is_ok();
    format!(
        "vars {vars} args {args} read {read} write {write} stdin {stdin} connect {connect} \
         bind {bind} udp {udp} lookup {lookup}"
    )
}

#[inline(never)]
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn millis(ms: &str) -> Result<Duration, String> {
    ms.parse()
        .map(Duration::from_millis)
        .map_err(|_| format!("chaos: bad milliseconds {ms:?}"))
}

fn hog() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1u8; 1 << 20]);
        std::hint::black_box(&hoard);
    }
}

/// Recursion with a large frame: overflows the guest's shadow stack (in
/// linear memory), which wasm reports as an out-of-bounds access.
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth as u8; 4096]);
    if depth == 0 {
        return frame[7] as u64;
    }
    recurse(depth - 1).wrapping_add(frame[depth as usize % 4096] as u64)
}

impl Plugin for Chaos {
    fn apply(&mut self, _index: u64, entry: &[u8]) -> Result<Vec<u8>, String> {
        match words(entry)?.as_slice() {
            ["set", k, v] => {
                self.map.insert(k.to_string(), v.to_string());
                Ok(b"OK".to_vec())
            }
            ["set-then-panic", k, v] => {
                self.map.insert(k.to_string(), v.to_string());
                panic!("chaos: panicking after a write");
            }
            ["spin"] => spin(),
            ["hog"] => hog(),
            ["recurse"] => Ok(recurse(1 << 20).to_string().into_bytes()),
            ["panic"] => panic!("chaos: asked to panic"),
            ["fail"] => Err("chaos: asked to fail".to_string()),
            ["binary"] => Ok(vec![0xff, 0xfe, b'!']),
            ["sleep", ms] => {
                std::thread::sleep(millis(ms)?);
                Ok(b"OK".to_vec())
            }
            ["sleep-elapsed", ms] => {
                let start = Instant::now();
                std::thread::sleep(millis(ms)?);
                Ok(start.elapsed().as_nanos().to_string().into_bytes())
            }
            ["sleep-until-later", ms] => {
                let (start, wait) = (Instant::now(), millis(ms)?);
                while start.elapsed() < wait {}
                Ok(b"OK".to_vec())
            }
            ["stamp", k] => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0);
                let random = wasip2::random::random::get_random_u64();
                let insecure = wasip2::random::insecure::get_insecure_random_u64();
                let monotonic = wasip2::clocks::monotonic_clock::now();
                self.map
                    .insert(k.to_string(), format!("{now}:{monotonic}:{random}:{insecure}"));
                Ok(b"OK".to_vec())
            }
            ["nan"] => {
                // A NaN with a payload, through arithmetic the compiler
                // cannot fold: hardware would keep (or mangle) the payload.
                let payload = std::hint::black_box(f64::from_bits(0x7ff4_0000_dead_beef));
                let sum = std::hint::black_box(payload) + std::hint::black_box(1.0);
                let narrow = std::hint::black_box(f32::from_bits(0x7fa0_beef)) * std::hint::black_box(2.0f32);
                Ok(format!("{:016x} {:08x}", sum.to_bits(), narrow.to_bits()).into_bytes())
            }
            ["reach-out"] => Ok(reach_out().into_bytes()),
            ["print"] => {
                println!("chaos says hello on stdout");
                eprintln!("chaos says hello on stderr");
                Ok(b"OK".to_vec())
            }
            ["bad-restore"] => {
                self.map.insert("!bad-restore".to_string(), "1".to_string());
                Ok(b"OK".to_vec())
            }
            ["fill", k, n] => {
                // A value of N bytes: a large state without a million entries.
                let n: usize = n.parse().map_err(|_| "chaos: fill K N".to_string())?;
                self.map.insert(k.to_string(), "x".repeat(n));
                Ok(b"OK".to_vec())
            }
            ["bad-snapshot"] => {
                self.map.insert("!bad-snapshot".to_string(), "1".to_string());
                Ok(b"OK".to_vec())
            }
            ["grow", mib] => {
                let mib: usize = mib.parse().map_err(|_| "chaos: grow MIB".to_string())?;
                let hoard = vec![1u8; mib << 20];
                std::hint::black_box(&hoard);
                Ok(b"OK".to_vec())
            }
            ["probe", k] => {
                let pages = core::arch::wasm32::memory_size(0);
                let keys: std::collections::HashMap<char, ()> = ('a'..='p').map(|c| (c, ())).collect();
                let order: String = keys.keys().collect();
                let seen = format!("pages {pages} order {order}");
                self.map.insert(k.to_string(), seen.clone());
                Ok(seen.into_bytes())
            }
            ["print-on-restore"] => {
                self.map.insert("!print-on-restore".to_string(), "1".to_string());
                Ok(b"OK".to_vec())
            }
            other => Err(format!("chaos: unknown entry {other:?}")),
        }
    }

    fn query(&self, request: &[u8]) -> Result<Vec<u8>, String> {
        match words(request)?.as_slice() {
            ["get", k] => Ok(self.map.get(*k).map_or("(nil)", |v| v.as_str()).as_bytes().to_vec()),
            ["len"] => Ok(self.map.len().to_string().into_bytes()),
            ["spin"] => spin(),
            ["panic"] => panic!("chaos: asked to panic in a query"),
            ["hoard", mib] => {
                let mib: usize = mib.parse().map_err(|_| "chaos: hoard MIB".to_string())?;
                std::mem::forget(std::hint::black_box(Vec::<u8>::with_capacity(mib << 20)));
                Ok(b"hoarded".to_vec())
            }
            ["taint"] => {
                TAINTED.store(true, std::sync::atomic::Ordering::Relaxed);
                Ok(b"tainted".to_vec())
            }
            other => Err(format!("chaos: unknown query {other:?}")),
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        if self.map.contains_key("!bad-snapshot") {
            panic!("chaos: snapshot() traps on purpose");
        }
        let mut out = String::new();
        if TAINTED.load(std::sync::atomic::Ordering::Relaxed) {
            out.push_str("!tainted 1\n");
        }
        for (k, v) in &self.map {
            out.push_str(k);
            out.push(' ');
            out.push_str(v);
            out.push('\n');
        }
        Ok(out.into_bytes())
    }

    fn restore(snapshot: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(snapshot).map_err(|_| "not UTF-8".to_string())?;
        let mut map = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once(' ').ok_or("chaos: bad snapshot line")?;
            map.insert(k.to_string(), v.to_string());
        }
        if map.contains_key("!print-on-restore") {
            // What a panic message or a debug print does: WASI output.
            eprintln!("chaos: restoring {} keys", map.len());
        }
        if map.contains_key("!bad-restore") {
            return Err("chaos: restore refused on purpose".to_string());
        }
        Ok(Chaos { map })
    }

    fn encode(text: &str) -> Result<Vec<u8>, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            [] => return Err("empty command".to_string()),
            // The codec misbehaves on command too: it runs in request
            // handlers, where a host that mishandles it fails the request.
            ["encode-panic", ..] => panic!("chaos: asked to panic in encode"),
            ["encode-print", ..] => eprintln!("chaos says hello from encode"),
            ["encode-sleep", ms] => std::thread::sleep(millis(ms)?),
            ["encode-reach-out"] => return Ok(reach_out().into_bytes()),
            _ => {}
        }
        Ok(words.join(" ").into_bytes())
    }
}

raftify_guest::export_plugin!(Chaos);

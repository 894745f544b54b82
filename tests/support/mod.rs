//! Test harness: real `raftify-host` processes on free 127.0.0.1 ports with
//! temp data dirs. Every wait has a deadline; every process is killed (by
//! PID, via `Child`) when its handle drops.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub mod lan;
pub mod linearizability;

pub const BIN: &str = env!("CARGO_BIN_EXE_raftify-host");

/// How long a node may take to start answering (it may compile its plugin).
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// Shared by every node the tests start (see `--compile-cache-dir`).
pub const COMPILE_CACHE_DIR: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/compile-cache");
/// How long one CLI call may take.
pub const CLI_DEADLINE: Duration = Duration::from_secs(60);

/// Every deadline the harness waits on is multiplied by
/// `TEST_TIME_SCALE` (default 1; a slower machine sets 2 or 3). Tests
/// never assert on speed: a deadline only bounds how long a wait may hang.
pub fn scaled(deadline: Duration) -> Duration {
    static SCALE: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let scale = *SCALE.get_or_init(|| {
        std::env::var("TEST_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 1.0)
            .unwrap_or(1.0)
    });
    deadline.mul_f64(scale)
}

/// A free port on 127.0.0.1, taken from below the kernel's ephemeral range.
/// A port from that range (`bind :0`, then released) can be handed to a
/// client's outgoing connection (every CLI call makes one) before the node
/// binds it, and the node then fails to start: one such collision left a
/// cluster without a leader in CI. Below the range only listeners take
/// ports; each is handed out once per test binary, from an offset set by
/// the PID so that two binaries at once rarely try the same ones.
pub fn free_addr() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOWEST: u32 = 20_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low < LOWEST + 1_000 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        return listener.local_addr().unwrap().to_string();
    }
    let span = ephemeral_low - LOWEST;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let port = LOWEST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().unwrap().to_string();
        }
    }
    panic!("no free port on 127.0.0.1 between {LOWEST} and {ephemeral_low}");
}

/// Compile a plugin into the shared compile cache before nodes need it. A large component (the Python kv is 18 MB) takes about a
/// minute to compile in a debug build; three nodes compiling it at once
/// would outlast the start deadline.
pub fn precompile(plugin: &Path) {
    // Held while compiling, so compiles never compete for the two cores; a
    // plugin already in the cache loads in milliseconds.
    static COMPILING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = COMPILING.lock().unwrap_or_else(|e| e.into_inner());
    let out = cli_within(
        Duration::from_secs(600),
        &[
            "plugin",
            "check",
            plugin.to_str().unwrap(),
            "--compile-cache-dir",
            COMPILE_CACHE_DIR,
        ],
        None,
    );
    assert!(
        out.status.success(),
        "plugin check {}: {}",
        plugin.display(),
        stderr(&out)
    );
}

/// The binary with an environment of only what a test sets: a `RAFTIFY_*`
/// variable in the shell that runs the tests must not change them. It dies
/// with the thread that started it (`PR_SET_PDEATHSIG`), so a test binary
/// killed outright leaves no node behind; each test's thread outlives its
/// nodes, which `Drop` kills first.
fn clean_command() -> Command {
    clean_command_in(None)
}

/// `clean_command`, run inside a network namespace (`ip netns exec NS`,
/// which execs the binary: the PID stays the node's).
fn clean_command_in(netns: Option<&str>) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut command = match netns {
        None => Command::new(BIN),
        Some(netns) => {
            let mut command = Command::new(lan::ip_binary());
            command.args(["netns", "exec", netns, BIN]);
            command
        }
    };
    command.env_clear();
    // SAFETY: prctl is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    if let Some(backtrace) = std::env::var_os("RUST_BACKTRACE") {
        command.env("RUST_BACKTRACE", backtrace);
    }
    command
}

/// A running node. Killed with SIGKILL when dropped.
pub struct Node {
    pub addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Flags every CLI call to this node gets (TLS, a token).
    pub client_flags: Vec<String>,
    child: Option<Child>,
}

impl Node {
    /// Start `raftify-host run --listen ADDR --data-dir DIR EXTRA...` and wait
    /// until it answers `status`.
    pub fn start(data_dir: &Path, addr: &str, extra: &[&str]) -> Node {
        let node = Node::spawn(data_dir, addr, extra);
        node.wait_ready();
        node
    }

    /// Start without waiting (for tests of startup failures).
    pub fn spawn(data_dir: &Path, addr: &str, extra: &[&str]) -> Node {
        Node::spawn_in(None, data_dir, addr, extra)
    }

    /// Start without waiting, inside a network namespace (see `lan`).
    pub fn spawn_in(netns: Option<&str>, data_dir: &Path, addr: &str, extra: &[&str]) -> Node {
        Node::spawn_full(netns, data_dir, addr, extra, &[])
    }

    /// Start without waiting, with these environment variables set as well.
    pub fn spawn_with_env(data_dir: &Path, addr: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        Node::spawn_full(None, data_dir, addr, extra, env)
    }

    fn spawn_full(netns: Option<&str>, data_dir: &Path, addr: &str, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let log = data_dir.with_extension(format!("{}.log", addr.replace([':', '.'], "_")));
        Node::spawn_logging_to(&log, netns, data_dir, addr, extra, env)
    }

    /// Start with stdout and stderr appended to `log` (which may be a
    /// device such as /dev/full: then never call `log_text`).
    pub fn spawn_logging_to(
        log: &Path,
        netns: Option<&str>,
        data_dir: &Path,
        addr: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Node {
        let log = log.to_path_buf();
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open node log");
        let child = clean_command_in(netns)
            .args(["run", "--listen", addr, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RAFTIFY_LOG", "info,raft_rs=info")
            // Compile each plugin once for the whole suite, not once per node.
            .env("RAFTIFY_COMPILE_CACHE_DIR", COMPILE_CACHE_DIR)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .expect("spawn raftify-host");
        Node {
            addr: addr.to_string(),
            data_dir: data_dir.to_path_buf(),
            log,
            client_flags: Vec::new(),
            child: Some(child),
        }
    }

    /// Start a node that CLI calls reach with `client_flags` (TLS, a token).
    pub fn start_secured(data_dir: &Path, addr: &str, extra: &[&str], client_flags: &[&str]) -> Node {
        let mut node = Node::spawn(data_dir, addr, extra);
        node.client_flags = client_flags.iter().map(|s| s.to_string()).collect();
        node.wait_ready();
        node
    }

    /// A CLI call with this node's client flags.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(self.client_flags.iter().map(String::as_str));
        cli(&all)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + scaled(START_DEADLINE);
        loop {
            let status = self.cli(&["status", "-o", "json", "--addr", &self.addr, "--timeout-ms", "2000"]);
            if status.status.success() {
                let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
                if json["leader_id"].as_u64().unwrap_or(0) != 0 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node at {} not ready within {START_DEADLINE:?}; log:\n{}",
                self.addr,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the process to exit by itself; returns its exit status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let within = scaled(within);
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().expect("node is running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "node did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then wait (bounded) for a clean exit; returns its status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM {} failed", self.pid());
        self.wait_exit(within)
    }

    /// Send `signal` (`-STOP`, `-CONT`, `-INT`...) to the node's process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether the process is still running (not exited, not a zombie).
    pub fn is_running(&self) -> bool {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .ok()
            .and_then(|stat| Some(stat.rsplit_once(')')?.1.trim_start().chars().next()? != 'Z'))
            .unwrap_or(false)
    }

    /// For a failed wait's message: whether the node runs, and its log's tail.
    pub fn describe(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let state = if self.is_running() { "running" } else { "NOT RUNNING" };
        format!(
            "--- node at {} (pid {}, {state}), last lines of its log:\n{tail}",
            self.addr,
            self.pid()
        )
    }

    pub fn log_text(&self) -> String {
        if !self.log.is_file() {
            return format!("(the log went to {}, not a file)", self.log.display());
        }
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `status`, or `None` while the node is not answering (starting up).
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let out = self.cli(&["status", "-o", "json", "--addr", &self.addr, "--timeout-ms", "2000"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// A number from `status`, or 0 while the node is not answering: for
    /// `wait_until` predicates, which must not panic.
    pub fn status_u64(&self, field: &str) -> u64 {
        self.try_status().and_then(|s| s[field].as_u64()).unwrap_or(0)
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "-o", "json", "--addr", &self.addr]);
        assert!(out.status.success(), "status failed: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `propose TEXT` against this node; the trimmed stdout on success.
    pub fn propose(&self, text: &str) -> Result<String, String> {
        outcome(self.cli(&["propose", text, "--addr", &self.addr]))
    }

    pub fn query(&self, text: &str) -> Result<String, String> {
        outcome(self.cli(&["query", text, "--addr", &self.addr]))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Run a CLI command with a deadline.
pub fn cli(args: &[&str]) -> Output {
    cli_with_stdin(args, None)
}

pub fn cli_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    cli_within(CLI_DEADLINE, args, stdin)
}

/// Run a CLI command that may take longer than usual (compiling a plugin).
pub fn cli_within(deadline: Duration, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = clean_command()
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn raftify-host");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(bytes).unwrap();
    }
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let deadline = scaled(deadline);
    match rx.recv_timeout(deadline) {
        Ok(output) => output.expect("wait for raftify-host"),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("`raftify-host {}` did not finish within {deadline:?}", args.join(" "));
        }
    }
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).trim().to_string()
}

/// Ok(stdout) if the command succeeded, Err(stderr) if not.
pub fn outcome(output: Output) -> Result<String, String> {
    if output.status.success() {
        Ok(stdout(&output))
    } else {
        Err(stderr(&output))
    }
}

/// Poll `condition` until it holds or `within` passes.
pub fn wait_until(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let within = scaled(within);
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A cluster of nodes started with the same `--peers`, each in its own
/// temp data dir. Every node is killed when the cluster drops.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: std::collections::BTreeMap<u64, String>,
    pub nodes: std::collections::BTreeMap<u64, Node>,
    extra: Vec<String>,
}

impl Cluster {
    /// Start nodes 1..=n (in the given order) and wait until all agree on a leader.
    pub fn start_in_order(order: &[u64], extra: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let addrs: std::collections::BTreeMap<u64, String> = order.iter().map(|id| (*id, free_addr())).collect();
        let peers = addrs
            .iter()
            .map(|(id, addr)| format!("{id}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            dir,
            addrs,
            nodes: Default::default(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for id in order {
            let id_text = id.to_string();
            let mut flags = vec!["--id", id_text.as_str(), "--peers", peers.as_str()];
            let extra = cluster.extra.clone();
            flags.extend(extra.iter().map(String::as_str));
            let node = Node::spawn(&cluster.data_dir(*id), &cluster.addrs[id], &flags);
            cluster.nodes.insert(*id, node);
        }
        cluster.leader();
        cluster
    }

    pub fn start(n: u64, extra: &[&str]) -> Cluster {
        let order: Vec<u64> = (1..=n).collect();
        Cluster::start_in_order(&order, extra)
    }

    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.path().join(format!("n{id}"))
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    /// Wait until every running node reports the same leader; return it.
    /// On timeout the panic shows what each node said and its log's tail.
    pub fn leader(&self) -> u64 {
        let within = scaled(START_DEADLINE);
        let deadline = Instant::now() + within;
        loop {
            let leaders: Vec<u64> = self.nodes.values().map(|node| node.status_u64("leader_id")).collect();
            let agreed = leaders[0];
            if agreed != 0 && leaders.iter().all(|l| *l == agreed) && self.nodes.contains_key(&agreed) {
                return agreed;
            }
            if Instant::now() >= deadline {
                let nodes: Vec<String> = self.nodes.values().map(Node::describe).collect();
                panic!(
                    "timed out after {within:?} waiting for the nodes to agree on a leader (they said {leaders:?})\n{}",
                    nodes.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn followers(&self) -> Vec<u64> {
        let leader = self.leader();
        self.nodes.keys().copied().filter(|id| *id != leader).collect()
    }

    pub fn kill(&mut self, id: u64) -> Node {
        let mut node = self.nodes.remove(&id).expect("node is running");
        node.kill();
        node
    }

    /// Restart a node with its data dir, address and the cluster's flags
    /// (not `--id` or `--peers`: the data dir has them).
    pub fn restart(&mut self, id: u64) {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let node = Node::spawn(&self.data_dir(id), &self.addrs[&id].clone(), &extra);
        self.nodes.insert(id, node);
    }

    /// Add a node that joins through `seed` with `extra` flags (e.g. `--id`).
    pub fn join(&mut self, name: u64, seed: u64, extra: &[&str]) -> &Node {
        let addr = free_addr();
        let seed_addr = self.addrs[&seed].clone();
        let mut flags = vec!["--join", seed_addr.as_str()];
        flags.extend(extra);
        let node = Node::spawn(&self.data_dir(name), &addr, &flags);
        node.wait_ready();
        let id = node.status()["id"].as_u64().unwrap();
        self.addrs.insert(id, addr);
        self.nodes.insert(id, node);
        &self.nodes[&id]
    }

    /// Wait until `id` reports it has applied at least `index`.
    pub fn wait_applied(&self, id: u64, index: u64) {
        wait_until(START_DEADLINE, &format!("node {id} to apply index {index}"), || {
            self.nodes[&id]
                .try_status()
                .is_some_and(|status| status["applied_index"].as_u64().unwrap_or(0) >= index)
        });
    }

    pub fn stale(&self, id: u64, text: &str) -> String {
        let node = &self.nodes[&id];
        outcome(node.cli(&["query", text, "--consistency", "stale", "--addr", &node.addr])).unwrap()
    }
}

/// `GET path` over plain HTTP/1.1 from `addr`: the status code and body,
/// or `None` if nothing answered within a few seconds.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

//! The `raftify-host` command line: `run` and the client commands.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::client::Client;
use crate::config::RunArgs;
use crate::proto::{self, Consistency as ProtoConsistency, ProposeResponse, propose_response};

mod backup;
mod bench;
pub mod common;
mod etcd;
mod plugin;
mod propose;
mod status;

use common::connect;
pub use common::{ClientArgs, Consistency, Output, SecurityArgs};
use status::{cluster_status, limits_json, print_limits, print_members, print_status};

#[derive(Debug, Parser)]
#[command(
    name = "raftify-host",
    version,
    about = "A Raft replicated-state-machine host for WebAssembly plugins"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node (with no flags: a one-node cluster on 127.0.0.1:7070 with
    /// the embedded kv plugin and ./raftify-data).
    Run(Box<RunArgs>),
    /// Replicate a command through the log and print apply's result.
    Propose(ProposeArgs),
    /// Read from the state machine.
    Query(QueryArgs),
    /// Show the node's raft state and plugin (`--cluster`: every member's).
    Status(StatusArgs),
    /// List the cluster's members: id, address, voter or learner, leader.
    Members(ClientArgs),
    /// Add or remove a member.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// Take a snapshot on the node at --addr now and compact its log; or
    /// back it up to a file (`save`), or make a new cluster from one
    /// (`restore`).
    Snapshot(SnapshotArgs),
    /// Replace or list the state machine plugin.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Look inside a node.
    #[command(subcommand)]
    Debug(DebugCommand),
    /// The cluster's space alarm (see `run --quota-bytes`).
    #[command(subcommand)]
    Alarm(AlarmCommand),
    /// The cluster's sandbox limits: show them, or change them through the
    /// log (`limits set`).
    #[command(subcommand)]
    Limits(LimitsCommand),
    /// Compact a stopped node's store in place: LMDB's compacting copy,
    /// swapped in whole, so the files give back the space of freed pages.
    Defrag(DefragArgs),
    /// Measure throughput and latency with concurrent clients.
    Bench(bench::BenchArgs),
    /// Certificates for a test cluster.
    #[command(subcommand)]
    Tls(TlsCommand),
}

#[derive(Debug, Subcommand)]
pub enum TlsCommand {
    /// Make a certificate authority: DIR/ca.pem and DIR/ca-key.pem.
    Init { dir: PathBuf },
    /// Make a certificate for NAME signed by DIR's CA: DIR/NAME.pem and
    /// DIR/NAME-key.pem, for serving and for dialing (client auth) alike.
    Issue {
        dir: PathBuf,
        name: String,
        /// A host name or IP address the certificate is valid for
        /// (repeat for several).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Hot-swap the cluster's plugin through the log: every replica switches
    /// at the same index, keeping the state (old snapshot() -> new restore()).
    Swap {
        /// The new component (.wasm).
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The plugins this node has run: hash, size, the index each became
    /// active at, and which is current.
    List(ClientArgs),
    /// Check a component offline before deploying it: compile it, check it
    /// implements the plugin world, instantiate it and round-trip an empty
    /// state through snapshot() and restore(). With --compile-cache-dir the
    /// compiled code is kept there, so nodes sharing that cache start at once.
    Check {
        /// The component (.wasm).
        file: PathBuf,
        /// Keep the compiled code here (see `run --compile-cache-dir`).
        #[arg(long, env = "RAFTIFY_COMPILE_CACHE_DIR")]
        compile_cache_dir: Option<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Print a stopped node's persisted log (each entry decoded to text by
    /// the plugin), hard state, conf state, snapshot metadata and last index.
    Persisted {
        /// The node's --data-dir.
        data_dir: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Print a live node's raft state: indexes, snapshot, plugin, and on the
    /// leader the replication progress of every member.
    Node(ClientArgs),
    /// Describe a backup file (`snapshot save`): index, members, plugin,
    /// sizes, after checking every byte of it.
    Snapshot {
        file: PathBuf,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub action: Option<backup::SnapshotAction>,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Register a node at ADDR as a learner (promoted once caught up) and
    /// print its id; then start it with `run --join ANY_MEMBER --id ID`.
    Add {
        /// The new node's HOST:PORT.
        member_addr: String,
        /// The id to give it (default: the next unused one).
        #[arg(long)]
        id: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Remove a member (the leader too: it hands leadership over first).
    Remove {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum AlarmCommand {
    /// The members whose space alarm is on.
    List(ClientArgs),
    /// Turn every space alarm off (writes resume); a member still out of
    /// space raises its alarm again within a second.
    Disarm(ClientArgs),
}

#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// The limits plugin calls run under, and this node's own flags.
    Show(ClientArgs),
    /// Change them for every replica, from the entry's index on; limits
    /// not given keep their value.
    Set {
        /// Fuel for one apply or query.
        #[arg(long)]
        fuel_per_call: Option<u64>,
        /// Fuel for one snapshot or restore step.
        #[arg(long)]
        fuel_per_snapshot: Option<u64>,
        /// The most linear memory a plugin instance may have.
        #[arg(long)]
        max_memory_bytes: Option<u64>,
        /// The most bytes one call may return.
        #[arg(long)]
        max_result_bytes: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct DefragArgs {
    /// The data dir of a node that is not running.
    #[arg(long, default_value = crate::config::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum LeaderCommand {
    /// Move leadership to the voter ID; returns once it has moved.
    Transfer {
        id: u64,
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Ask every member (as `etcdctl endpoint status --cluster` does) and
    /// print a row per node: id, address, role, term, commit, applied,
    /// plugin, lag behind the leader, healthy.
    #[arg(long)]
    pub cluster: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ProposeArgs {
    /// The command text, e.g. `set a 1`.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    pub text: Option<String>,
    /// Propose every line of FILE (`-` for stdin), pipelined over one stream;
    /// results are printed in order.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// The commands shrink the state (deletes): admitted while the
    /// cluster's space alarm refuses other writes.
    #[arg(long)]
    pub frees_space: bool,
    /// Propose without a session: an answer that leaves the outcome
    /// unknown ("may or may not have been committed") is not retried.
    /// With one (the default, for a single command), such a proposal is
    /// retried with the same sequence number, which the cluster applies at
    /// most once.
    #[arg(long)]
    pub no_session: bool,
    /// How long a proposal in a session is retried, in milliseconds (each
    /// attempt waits up to --timeout-ms); for --file, how long the file may
    /// go without a line answered.
    #[arg(long, default_value_t = 30_000)]
    pub retry_for_ms: u64,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// The query text, e.g. `get a`.
    pub text: String,
    /// `linearizable` reflects every write acknowledged before the query;
    /// `stale` answers from this node's state at once.
    #[arg(long, value_enum, default_value_t = Consistency::Linearizable)]
    pub consistency: Consistency,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What one proposal or query came to, for printing.
enum Shown {
    Ok { index: u64, text: String },
    Failed { index: u64, error: String },
}

fn show_outcome(
    index: u64,
    ok: Option<Vec<u8>>,
    plugin_error: Option<String>,
    trap: Option<String>,
    text: String,
) -> Shown {
    match (ok, plugin_error, trap) {
        (Some(bytes), _, _) => {
            let text = if text.is_empty() && !bytes.is_empty() {
                String::from_utf8_lossy(&bytes).into_owned()
            } else {
                text
            };
            Shown::Ok { index, text }
        }
        (_, Some(error), _) => Shown::Failed { index, error },
        (_, _, Some(trap)) => Shown::Failed {
            index,
            error: format!("plugin trapped: {trap}"),
        },
        _ => Shown::Failed {
            index,
            error: "the node sent an empty answer".into(),
        },
    }
}

/// The result stands even when the plugin's render() fails; say why the
/// raw bytes are shown instead.
fn warn_unrendered(render_error: &str) {
    if !render_error.is_empty() {
        eprintln!("warning: the plugin could not render the result ({render_error}); showing its raw bytes");
    }
}

fn show_propose(response: ProposeResponse) -> Shown {
    use propose_response::Outcome;
    warn_unrendered(&response.render_error);
    let index = response.index;
    match response.outcome {
        Some(Outcome::Ok(b)) => show_outcome(index, Some(b), None, None, response.text),
        Some(Outcome::PluginError(e)) => show_outcome(index, None, Some(e), None, response.text),
        Some(Outcome::Trap(t)) => show_outcome(index, None, None, Some(t), response.text),
        Some(Outcome::HostError(e)) => Shown::Failed {
            index,
            error: e.message,
        },
        None => show_outcome(index, None, None, None, response.text),
    }
}

/// Print one result; returns whether it succeeded.
fn print(shown: &Shown, output: Output) -> bool {
    match (shown, output) {
        (Shown::Ok { text, .. }, Output::Text) => {
            println!("{text}");
            true
        }
        (Shown::Failed { error, .. }, Output::Text) => {
            eprintln!("error: {error}");
            false
        }
        (Shown::Ok { index, text }, Output::Json) => {
            println!("{}", json!({ "index": index, "ok": true, "result": text }));
            true
        }
        (Shown::Failed { index, error }, Output::Json) => {
            println!("{}", json!({ "index": index, "ok": false, "error": error }));
            false
        }
    }
}

/// Run a client command. Returns the process exit code.
pub async fn run_client(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run(_) => unreachable!("run is handled by main"),
        Command::Propose(args) => propose::propose(args).await,
        Command::Query(args) => {
            let mut client = connect(&args.client).await?;
            let consistency = match args.consistency {
                Consistency::Linearizable => ProtoConsistency::Linearizable,
                Consistency::Stale => ProtoConsistency::Stale,
            };
            let response = client.query_text(&args.text, consistency).await?;
            warn_unrendered(&response.render_error);
            use proto::query_response::Outcome;
            let index = response.index;
            let shown = match response.outcome {
                Some(Outcome::Ok(b)) => show_outcome(index, Some(b), None, None, response.text),
                Some(Outcome::PluginError(e)) => show_outcome(index, None, Some(e), None, response.text),
                Some(Outcome::Trap(t)) => show_outcome(index, None, None, Some(t), response.text),
                None => show_outcome(index, None, None, None, response.text),
            };
            Ok(if print(&shown, args.client.output) { 0 } else { 1 })
        }
        Command::Status(StatusArgs {
            cluster: false,
            client: args,
        }) => {
            let mut client = connect(&args).await?;
            let status = client.status().await?;
            print_status(&status, args.output);
            Ok(0)
        }
        Command::Status(StatusArgs {
            cluster: true,
            client: args,
        }) => cluster_status(&args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Tls(TlsCommand::Init { dir }) => {
            crate::tls::init(&dir)?;
            println!(
                "wrote {} and {}",
                dir.join(crate::tls::CA_CERT).display(),
                dir.join(crate::tls::CA_KEY).display()
            );
            Ok(0)
        }
        Command::Tls(TlsCommand::Issue { dir, name, sans }) => {
            let (cert, key) = crate::tls::issue(&dir, &name, &sans)?;
            println!("wrote {} and {}", cert.display(), key.display());
            Ok(0)
        }
        Command::Plugin(command) => plugin::run(command).await,
        Command::Debug(DebugCommand::Persisted { data_dir, output }) => {
            let value = tokio::task::spawn_blocking(move || crate::debug::persisted(&data_dir)).await??;
            match output {
                Output::Json => println!("{value}"),
                Output::Text => crate::debug::print_persisted(&value),
            }
            Ok(0)
        }
        Command::Debug(DebugCommand::Node(args)) => {
            let mut client = connect(&args).await?;
            let status = client.status().await?;
            print_status(&status, args.output);
            if args.output == Output::Text {
                println!("snapshot index:  {}", status.snapshot_index);
                for p in &status.progress {
                    println!(
                        "progress:        node {} matched {} next {} {}{}",
                        p.id,
                        p.matched,
                        p.next_index,
                        p.state,
                        if p.recent_active { "" } else { " (inactive)" }
                    );
                }
            }
            Ok(0)
        }
        Command::Debug(DebugCommand::Snapshot { file, output }) => backup::describe(file, output).await,
        Command::Snapshot(SnapshotArgs {
            action: Some(action), ..
        }) => backup::run(action).await,
        Command::Snapshot(SnapshotArgs {
            action: None,
            client: args,
        }) => {
            let mut client = connect(&args).await?;
            let response = client.snapshot().await?;
            match args.output {
                Output::Text => println!(
                    "snapshot at index {}; log now starts at {}",
                    response.index, response.first_index
                ),
                Output::Json => println!(
                    "{}",
                    json!({ "index": response.index, "first_index": response.first_index })
                ),
            }
            Ok(0)
        }
        Command::Members(args) => {
            let mut client = connect(&args).await?;
            let status = client.status().await?;
            print_members(&status.members, status.leader_id, args.output);
            Ok(0)
        }
        Command::Member(MemberCommand::Add {
            member_addr,
            id,
            client: args,
        }) => {
            crate::config::check_addr(&member_addr).map_err(anyhow::Error::msg)?;
            let response = with_retries(&args, |mut client| {
                let member_addr = member_addr.clone();
                async move { client.join(&member_addr, id.unwrap_or(0)).await }
            })
            .await?;
            match args.output {
                Output::Text => println!("{}", response.id),
                Output::Json => println!("{}", json!({ "id": response.id, "addr": member_addr })),
            }
            Ok(0)
        }
        Command::Member(MemberCommand::Remove { id, client: args }) => {
            let response = with_retries(&args, |mut client| async move { client.remove_member(id).await }).await?;
            print_members(&response.members, 0, args.output);
            Ok(0)
        }
        Command::Alarm(AlarmCommand::List(args)) => {
            let status = connect(&args).await?.status().await?;
            match args.output {
                Output::Text => {
                    for member in &status.space_alarms {
                        println!("{member}\tNOSPACE");
                    }
                }
                Output::Json => println!("{}", json!({ "space_alarms": status.space_alarms })),
            }
            Ok(0)
        }
        Command::Alarm(AlarmCommand::Disarm(args)) => {
            let response = connect(&args).await?.disarm_alarms().await?;
            match args.output {
                Output::Text if response.members.is_empty() => println!("no alarm was on"),
                Output::Text => {
                    let members: Vec<String> = response.members.iter().map(u64::to_string).collect();
                    println!("disarmed the space alarm of node {}", members.join(", "));
                }
                Output::Json => println!("{}", json!({ "disarmed": response.members })),
            }
            Ok(0)
        }
        Command::Limits(LimitsCommand::Show(args)) => {
            let status = connect(&args).await?.status().await?;
            let limits = status.limits.unwrap_or_default();
            let local = status.local_limits.unwrap_or_default();
            match args.output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "limits": limits_json(&limits),
                        "recorded": status.limits_recorded,
                        "local": limits_json(&local),
                    })
                ),
                Output::Text => {
                    let source = if status.limits_recorded {
                        "recorded by the cluster"
                    } else {
                        "this node's flags; the cluster has recorded none yet"
                    };
                    println!("limits ({source}):");
                    print_limits(&limits, &local);
                }
            }
            Ok(0)
        }
        Command::Limits(LimitsCommand::Set {
            fuel_per_call,
            fuel_per_snapshot,
            max_memory_bytes,
            max_result_bytes,
            client: args,
        }) => {
            let request = crate::proto::SetLimitsRequest {
                fuel_per_call,
                fuel_per_snapshot,
                max_memory_bytes,
                max_result_bytes,
            };
            let response = connect(&args).await?.set_limits(request).await?;
            let limits = response.limits.unwrap_or_default();
            match args.output {
                Output::Json => println!("{}", json!({ "index": response.index, "limits": limits_json(&limits) })),
                Output::Text => {
                    println!("limits set from index {}:", response.index);
                    print_limits(&limits, &limits);
                }
            }
            Ok(0)
        }
        Command::Defrag(args) => {
            let report = crate::storage::data_dir::defrag(&args.data_dir)?;
            println!(
                "compacted {}: {} -> {} bytes in {} ms",
                args.data_dir.display(),
                report.before_bytes,
                report.after_bytes,
                report.elapsed.as_millis()
            );
            Ok(0)
        }
        Command::Leader(LeaderCommand::Transfer { id, client: args }) => {
            let response = with_retries(&args, |mut client| async move { client.transfer_leader(id).await }).await?;
            match args.output {
                Output::Text => println!("{}", response.leader_id),
                Output::Json => println!("{}", json!({ "leader_id": response.leader_id })),
            }
            Ok(0)
        }
    }
}

/// Retry a membership call while the cluster says "not now" (no leader yet,
/// another change in flight, leadership moving), until the timeout.
async fn with_retries<T, F, Fut>(args: &ClientArgs, call: F) -> anyhow::Result<T>
where
    F: Fn(Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, crate::client::ClientError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_millis(args.timeout_ms);
    loop {
        let attempt = match connect(args).await {
            Ok(client) => call(client).await,
            Err(error) => return Err(error),
        };
        match attempt {
            Ok(value) => return Ok(value),
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

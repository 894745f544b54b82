//! `raftify-host bench`: drive a cluster with N concurrent closed-loop
//! clients and report throughput and latency percentiles (HDR histogram).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use super::common::{Consistency, Output, SecurityArgs};
use crate::client::Client;
use crate::config::DEFAULT_ADDR;
use crate::proto::{
    Consistency as ProtoConsistency, ProposeRequest, ProposeResponse, propose_request, propose_response, query_response,
};

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Cluster members, comma-separated; clients spread over them and
    /// follow the leader from there.
    #[arg(long, env = "RAFTIFY_ADDR", default_value = DEFAULT_ADDR, value_delimiter = ',')]
    pub addr: Vec<String>,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Requests in total, over all clients.
    #[arg(long, default_value_t = 10_000)]
    pub requests: u64,
    /// The command sent: `{n}` becomes the request number, `{v}` a value of
    /// --value-size bytes. Default: `set k{n} {v}`, or `get k{n}` with --queries.
    #[arg(long)]
    pub command_template: Option<String>,
    /// Size of `{v}` in bytes.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Send queries instead of proposals.
    #[arg(long)]
    pub queries: bool,
    /// Each client sends its proposals over one `ProposeStream` to the
    /// leader (still one in flight) instead of one unary call each.
    #[arg(long, conflicts_with = "queries")]
    pub stream: bool,
    /// Proposals without a session. By default each client opens one and
    /// proposes in it, exactly once, as `propose` does (not with --stream,
    /// --queries or --etcd).
    #[arg(long)]
    pub no_session: bool,
    /// Consistency of --queries.
    #[arg(long, value_enum, default_value_t = Consistency::Linearizable)]
    pub consistency: Consistency,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// Per-request timeout, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    pub timeout_ms: u64,
    /// Drive an etcd member's v3 KV API at --addr instead (the yardstick,
    /// `host/benches/vs_etcd.sh`): writes `Put` key `k{n}` with the value,
    /// --queries `Range` it (linearizable, or serializable with --consistency
    /// stale), every client over one shared connection to the first address.
    #[arg(long, conflicts_with_all = ["stream", "command_template"])]
    pub etcd: bool,
    /// Which node the clients drive, all over one shared connection: the
    /// leader (found through the first --addr), a follower (writes then
    /// follow its leader hint, each client on a connection of its own;
    /// linearizable reads are served there), or the --addr nodes as given
    /// (clients spread over them).
    #[arg(long, value_enum, default_value_t = Target::Leader)]
    pub target: Target,
    #[command(flatten)]
    pub security: SecurityArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Leader,
    Follower,
    Given,
}

/// The node(s) a run drives: one connection per address.
async fn open_clients(args: &BenchArgs, timeout: Duration) -> anyhow::Result<(Vec<Client>, String)> {
    let dialer = args.security.dialer()?;
    let first = Client::connect_with(&args.addr[0], timeout, &dialer).await?;
    if args.target == Target::Given && !args.stream {
        let mut clients = vec![first];
        for addr in &args.addr[1..] {
            clients.push(Client::connect_with(addr, timeout, &dialer).await?);
        }
        let driven = format!("the nodes given ({})", args.addr.join(", "));
        return Ok((clients, driven));
    }
    let status = first.clone().status().await?;
    if status.leader_id == 0 || status.leader_addr.is_empty() {
        bail!("no leader is known yet at {}", args.addr[0]);
    }
    // Streams do not follow leader hints: they always go to the leader.
    let (id, addr, role) = match args.target {
        Target::Follower if !args.stream => {
            let follower = status
                .members
                .iter()
                .find(|m| m.id != status.leader_id && m.voter)
                .with_context(|| format!("the cluster at {} has no follower", args.addr[0]))?;
            (follower.id, follower.addr.clone(), "a follower")
        }
        _ => (status.leader_id, status.leader_addr.clone(), "the leader"),
    };
    let client = if addr == first.addr() {
        first
    } else {
        first.connect_to(&addr).await?
    };
    Ok((vec![client], format!("node {id} at {addr}, {role}")))
}

struct Totals {
    histogram: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    /// The client moved to this node (following a leader hint), on a
    /// connection of its own.
    moved_to: Option<String>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<i32> {
    if args.clients == 0 || args.requests == 0 {
        bail!("--clients and --requests must be at least 1");
    }
    if args.addr.is_empty() {
        bail!("--addr needs at least one HOST:PORT");
    }
    let template = args.command_template.clone().unwrap_or_else(|| {
        if args.queries {
            "get k{n}".to_string()
        } else {
            "set k{n} {v}".to_string()
        }
    });
    let value = "x".repeat(args.value_size);
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut clients: Vec<Client> = Vec::new();
    let etcd = match args.etcd {
        true => Some(super::etcd::Kv::connect(&args.addr[0], timeout).await?),
        false => None,
    };
    let driven = match args.etcd {
        true => format!("etcd at {}", args.addr[0]),
        false => {
            let (opened, driven) = open_clients(&args, timeout).await?;
            clients = opened;
            driven
        }
    };
    let first_addrs: Vec<String> = clients.iter().map(|c| c.addr().to_string()).collect();
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = tokio::spawn(report_progress(done.clone(), args.requests, started));
    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        // Each task opens its own session, or proposes outside any.
        let mut client = clients
            .get(c % clients.len().max(1))
            .cloned()
            .map(Client::without_sessions);
        let mut etcd = etcd.clone();
        let (next, done) = (next.clone(), done.clone());
        let (template, value) = (template.clone(), value.clone());
        let in_session = !args.no_session && !args.queries && !args.stream && !args.etcd;
        let (total, queries, stream) = (args.requests, args.queries, args.stream);
        let consistency = match args.consistency {
            Consistency::Linearizable => ProtoConsistency::Linearizable,
            Consistency::Stale => ProtoConsistency::Stale,
        };
        tasks.push(tokio::spawn(async move {
            let mut totals = Totals {
                histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds"),
                errors: 0,
                first_error: None,
                moved_to: None,
            };
            let started_at = client.as_ref().map(|c| c.addr().to_string());
            let mut session = None;
            if let (true, Some(client)) = (in_session, client.as_mut()) {
                match client.open_session().await {
                    Ok(opened) => session = Some(opened),
                    Err(error) => {
                        totals.errors = 1;
                        totals.first_error = Some(format!("cannot open a session: {error}"));
                        return totals;
                    }
                }
            }
            let mut stream = match (stream, &client) {
                (true, Some(client)) => match ProposalStream::open(client).await {
                    Ok(stream) => Some(stream),
                    Err(error) => {
                        totals.errors = 1;
                        totals.first_error = Some(error);
                        return totals;
                    }
                },
                _ => None,
            };
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    let now_at = client.as_ref().map(|c| c.addr().to_string());
                    if now_at != started_at {
                        totals.moved_to = now_at;
                    }
                    return totals;
                }
                let sent = Instant::now();
                let outcome = match (&mut etcd, &mut client) {
                    (Some(kv), _) => {
                        let key = format!("k{n}").into_bytes();
                        let linearizable = consistency == ProtoConsistency::Linearizable;
                        let called = match queries {
                            true => kv.get(key, linearizable).await,
                            false => kv.put(key, value.as_bytes().to_vec()).await,
                        };
                        called.map_err(|status| format!("etcd: {}", status.message()))
                    }
                    (None, Some(client)) => {
                        let text = template.replace("{n}", &n.to_string()).replace("{v}", &value);
                        match &mut session {
                            Some(session) => match client.propose_in(session, &text, false, timeout).await {
                                Ok(r) => match r.outcome {
                                    Some(propose_response::Outcome::Ok(_)) => Ok(()),
                                    other => Err(format!("{other:?}")),
                                },
                                Err(e) => Err(e.to_string()),
                            },
                            None => raftify_call(client, &mut stream, &text, queries, consistency).await,
                        }
                    }
                    (None, None) => Err("no client".to_string()),
                };
                let micros = sent.elapsed().as_micros() as u64;
                match outcome {
                    Ok(()) => totals.histogram.saturating_record(micros.max(1)),
                    Err(error) => {
                        totals.errors += 1;
                        totals.first_error.get_or_insert(error);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
    let mut errors = 0;
    let mut first_error = None;
    // The shared connections, and one more for each client that moved.
    let mut connections = if args.etcd { 1 } else { first_addrs.len() };
    let mut moved = std::collections::BTreeSet::new();
    for task in tasks {
        let totals = task.await.context("a bench client panicked")?;
        if let Some(addr) = totals.moved_to {
            connections += 1;
            moved.insert(addr);
        }
        histogram.add(&totals.histogram).context("merging histograms")?;
        errors += totals.errors;
        if first_error.is_none() {
            first_error = totals.first_error;
        }
    }
    let elapsed = started.elapsed();
    progress.abort();
    let ok = histogram.len();
    let throughput = ok as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let report = json!({
        "mode": if args.queries { "queries" } else { "proposals" },
        "stream": args.stream,
        "session": !args.no_session && !args.queries && !args.stream && !args.etcd,
        "drove": driven,
        "connections": connections,
        "moved_to": moved,
        "clients": args.clients,
        "requests": args.requests,
        "ok": ok,
        "errors": errors,
        "first_error": first_error,
        "seconds": elapsed.as_secs_f64(),
        "throughput_per_second": throughput,
        "latency_ms": {
            "p50": ms(0.50),
            "p90": ms(0.90),
            "p99": ms(0.99),
            "max": histogram.max() as f64 / 1000.0,
            "mean": histogram.mean() / 1000.0,
        },
    });
    match args.output {
        Output::Json => println!("{report}"),
        Output::Text => {
            eprintln!();
            println!(
                "drove {driven} over {connections} connection{}{}",
                if connections == 1 { "" } else { "s" },
                if moved.is_empty() {
                    String::new()
                } else {
                    let moved: Vec<&str> = moved.iter().map(String::as_str).collect();
                    format!(" (clients that followed a leader hint to {})", moved.join(", "))
                }
            );
            println!(
                "{} {} from {} clients in {:.2} s: {:.0}/s",
                ok,
                if args.queries { "queries" } else { "proposals" },
                args.clients,
                elapsed.as_secs_f64(),
                throughput
            );
            println!(
                "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}",
                ms(0.50),
                ms(0.90),
                ms(0.99),
                histogram.max() as f64 / 1000.0
            );
            println!("errors: {errors}");
            if let Some(error) = &first_error {
                println!("first error: {error}");
            }
        }
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

/// One request to raftify-host: a query, or a proposal (over the client's
/// stream if it has one).
async fn raftify_call(
    client: &mut Client,
    stream: &mut Option<ProposalStream>,
    text: &str,
    queries: bool,
    consistency: ProtoConsistency,
) -> Result<(), String> {
    if queries {
        return match client.query_text(text, consistency).await {
            Ok(r) => match r.outcome {
                Some(query_response::Outcome::Ok(_)) => Ok(()),
                other => Err(format!("{other:?}")),
            },
            Err(e) => Err(e.to_string()),
        };
    }
    let response = match stream {
        Some(stream) => stream.propose(text.to_string()).await,
        None => client.propose_text(text).await.map_err(|e| e.to_string()),
    };
    match response {
        Ok(r) => match r.outcome {
            Some(propose_response::Outcome::Ok(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        },
        Err(e) => Err(e),
    }
}

/// One client's `ProposeStream`: a request goes in, its response comes out.
struct ProposalStream {
    requests: tokio::sync::mpsc::Sender<ProposeRequest>,
    responses: tonic::Streaming<ProposeResponse>,
}

impl ProposalStream {
    async fn open(client: &Client) -> Result<ProposalStream, String> {
        let (requests, queue) = tokio::sync::mpsc::channel(1);
        let responses = client
            .raw()
            .propose_stream(tokio_stream::wrappers::ReceiverStream::new(queue))
            .await
            .map_err(|status| format!("cannot open a proposal stream: {}", status.message()))?
            .into_inner();
        Ok(ProposalStream { requests, responses })
    }

    async fn propose(&mut self, text: String) -> Result<ProposeResponse, String> {
        let request = ProposeRequest {
            command: Some(propose_request::Command::Text(text)),
            frees_space: false,
            ..Default::default()
        };
        if self.requests.send(request).await.is_err() {
            return Err("the proposal stream closed".into());
        }
        match self.responses.message().await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err("the proposal stream ended".into()),
            Err(status) => Err(format!("the proposal stream broke: {}", status.message())),
        }
    }
}

async fn report_progress(done: Arc<AtomicU64>, total: u64, started: Instant) {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let n = done.load(Ordering::Relaxed);
        let rate = n as f64 / started.elapsed().as_secs_f64();
        eprint!("\r{n}/{total} requests, {rate:.0}/s   ");
    }
}

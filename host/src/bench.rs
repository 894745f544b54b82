//! `raftify-host bench`: drive a cluster with N concurrent closed-loop
//! clients and report throughput and latency percentiles (HDR histogram).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use serde_json::json;

use crate::cli::{Consistency, Output};
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
    #[command(flatten)]
    pub security: crate::cli::SecurityArgs,
}

struct Totals {
    histogram: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
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
    let mut clients = Vec::with_capacity(args.addr.len());
    let etcd = match args.etcd {
        true => Some(crate::etcd::Kv::connect(&args.addr[0], timeout).await?),
        false => None,
    };
    let dialer = args.security.dialer()?;
    for addr in args.addr.iter().filter(|_| !args.etcd) {
        clients.push(Client::connect_with(addr, timeout, &dialer).await?);
    }
    if args.stream {
        // Streams do not follow leader hints: open them on the leader.
        let status = clients[0].status().await?;
        if status.leader_id == 0 || status.leader_addr.is_empty() {
            bail!("no leader is known yet; --stream needs one");
        }
        clients = vec![clients[0].connect_to(&status.leader_addr).await?];
    }
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = tokio::spawn(report_progress(done.clone(), args.requests, started));
    let mut tasks = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let mut client = clients.get(c % clients.len().max(1)).cloned();
        let mut etcd = etcd.clone();
        let (next, done) = (next.clone(), done.clone());
        let (template, value) = (template.clone(), value.clone());
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
            };
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
                        raftify_call(client, &mut stream, &text, queries, consistency).await
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
    for task in tasks {
        let totals = task.await.context("a bench client panicked")?;
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

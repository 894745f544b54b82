//! `raftify-host`: run a node, or talk to one.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;
use raftify_host::cli::{Cli, Command};
use raftify_host::config::RunArgs;
use raftify_host::{daemon, logging};

/// glibc's malloc and free were a tenth of the leader's CPU per write
/// (`host/benches/profile.sh`); mimalloc's thread-local free lists cost
/// less for the many small, short-lived buffers of a request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(anyhow::anyhow!("cannot start the async runtime: {error}")),
    };
    let result = match cli.command {
        Command::Run(args) => runtime.block_on(run(*args)).map(|()| 0),
        command => runtime.block_on(raftify_host::cli::run_client(command)),
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(error) => fail(error),
    }
}

fn fail(error: anyhow::Error) -> ExitCode {
    // One line: the chain of causes, no backtrace, no debug dump (and no
    // panic if stderr is gone).
    let _ = writeln!(std::io::stderr(), "error: {error:#}");
    ExitCode::FAILURE
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    logging::init(logging::DEFAULT_FILTER, args.settings.log_format);
    let mut config = args.resolve()?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    let local = listener.local_addr()?;
    if config.listen.ends_with(":0") {
        config.listen = local.to_string();
    }
    // Written, not printed: a full disk or a closed pipe under stdout must
    // not stop the node.
    let _ = writeln!(
        std::io::stdout(),
        "raftify-host listening on {} (data dir {})",
        config.listen,
        config.data_dir.display()
    );
    daemon::run(config, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

//! What the client commands (and `bench`) share: where to connect, how to
//! prove who they are, how to print, how to read.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::client::Client;
use crate::config::DEFAULT_ADDR;

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Any member of the cluster; requests follow the leader from there.
    #[arg(long, env = "RAFTIFY_ADDR", default_value = DEFAULT_ADDR)]
    pub addr: String,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    /// How long to wait for an answer, in milliseconds.
    #[arg(long, env = "RAFTIFY_TIMEOUT_MS", default_value_t = 15_000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub security: SecurityArgs,
}

/// How a client proves itself and checks the node: TLS and a token.
#[derive(Debug, Clone, Default, Args)]
pub struct SecurityArgs {
    /// Dial over TLS, trusting nodes whose certificate this CA (PEM) signed.
    #[arg(long, env = "RAFTIFY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) to present, signed by the node's CA.
    #[arg(long, env = "RAFTIFY_TLS_CERT", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "RAFTIFY_TLS_KEY", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// The bearer token for a node run with --auth-file.
    #[arg(long, env = "RAFTIFY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl SecurityArgs {
    pub fn dialer(&self) -> anyhow::Result<crate::dial::Dialer> {
        let mut dialer = crate::dial::Dialer::default();
        if let Some(ca) = &self.tls_ca {
            let files = crate::tls::TlsFiles {
                ca: ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
            };
            dialer = dialer.with_tls(crate::tls::client_config(&files, None)?);
        }
        if let Some(token) = &self.token {
            dialer = dialer.with_token(token).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
        }
        Ok(dialer)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    Linearizable,
    Stale,
}

pub(super) async fn connect(args: &ClientArgs) -> anyhow::Result<Client> {
    let dialer = args.security.dialer()?;
    Ok(Client::connect_with(&args.addr, Duration::from_millis(args.timeout_ms), &dialer).await?)
}

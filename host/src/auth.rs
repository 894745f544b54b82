//! Client authentication: bearer tokens with roles (`--auth-file`).
//!
//! The auth file is TOML, a list of `[[token]]` tables:
//!
//! ```toml
//! [[token]]
//! name = "ci"
//! role = "read"            # "read" | "write" | "admin"
//! sha256 = "9f86d0...0a08" # hex SHA-256 of the token; never the token itself
//! ```
//!
//! With a table, every Client RPC needs the gRPC metadata
//! `authorization: Bearer TOKEN` whose role is at least the one the RPC needs
//! ([`required_role`]). Peer RPCs pass through: peers authenticate with mutual
//! TLS. A token is never written to an error message or a log line.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};

/// What a token may do. Ordered: each role may do all that the ones below it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Query, Status, ListPlugins.
    Read,
    /// Also Propose, ProposeStream.
    Write,
    /// Everything, membership and plugin changes included.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        })
    }
}

/// An auth file that cannot be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file cannot be read.
    #[error("cannot read the auth file {file}: {source}")]
    Read { file: String, source: std::io::Error },
    /// The file is not TOML of the expected shape (unknown field, unknown role...).
    #[error("the auth file {file} is not valid: {source}")]
    Toml { file: String, source: toml::de::Error },
    /// The file parses but breaks a rule (bad hash, duplicate name...).
    #[error("the auth file {file} is not valid: {message}")]
    Invalid { file: String, message: String },
}

/// The auth file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

/// One `[[token]]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    role: Role,
    sha256: String,
}

/// One known token: its name, role and SHA-256 digest.
#[derive(Debug, Clone)]
struct Token {
    name: String,
    role: Role,
    digest: [u8; 32],
}

/// The tokens of an auth file, checked by [`TokenTable::check`].
#[derive(Debug, Clone)]
pub struct TokenTable {
    tokens: Vec<Token>,
}

impl TokenTable {
    /// Reads and validates the auth file at `path`.
    pub fn load(path: &Path) -> Result<TokenTable, AuthError> {
        let file = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse_file(&text, file),
            Err(source) => Err(AuthError::Read { file, source }),
        }
    }

    /// Validates the text of an auth file (errors name it `<inline>`).
    pub fn parse(text: &str) -> Result<TokenTable, AuthError> {
        Self::parse_file(text, "<inline>".to_owned())
    }

    fn parse_file(text: &str, file: String) -> Result<TokenTable, AuthError> {
        let parsed: AuthFile = match toml::from_str(text) {
            Ok(parsed) => parsed,
            Err(source) => return Err(AuthError::Toml { file, source }),
        };
        let invalid = |message: String| AuthError::Invalid {
            file: file.clone(),
            message,
        };
        if parsed.token.is_empty() {
            return Err(invalid("it has no [[token]] entry".to_owned()));
        }
        let mut names = HashSet::new();
        let mut tokens: Vec<Token> = Vec::with_capacity(parsed.token.len());
        for (i, entry) in parsed.token.into_iter().enumerate() {
            if entry.name.trim().is_empty() {
                return Err(invalid(format!("token #{} has an empty name", i + 1)));
            }
            if !names.insert(entry.name.clone()) {
                return Err(invalid(format!("token name {:?} appears twice", entry.name)));
            }
            // The value is not echoed: someone may have put a token in clear here.
            let mut digest = [0u8; 32];
            if entry.sha256.len() != 64 || hex::decode_to_slice(&entry.sha256, &mut digest).is_err() {
                return Err(invalid(format!(
                    "token {:?}: sha256 must be 64 hex characters (the SHA-256 of the \
                     token, not the token), found {} characters",
                    entry.name,
                    entry.sha256.chars().count()
                )));
            }
            if let Some(other) = tokens.iter().find(|t| t.digest == digest) {
                return Err(invalid(format!(
                    "tokens {:?} and {:?} have the same sha256",
                    other.name, entry.name
                )));
            }
            tokens.push(Token {
                name: entry.name,
                role: entry.role,
                digest,
            });
        }
        Ok(TokenTable { tokens })
    }

    /// Checks the `authorization` metadata of a call to `rpc`, which needs
    /// `needed`: returns the token's name, or UNAUTHENTICATED (no, malformed or
    /// unknown token) or PERMISSION_DENIED (role too weak).
    pub fn check(&self, authorization: Option<&str>, needed: Role, rpc: &str) -> Result<&str, Status> {
        let Some(header) = authorization else {
            return Err(Status::unauthenticated(
                "a token is required: send the metadata `authorization: Bearer TOKEN`",
            ));
        };
        let token = match header.split_once(' ') {
            Some((scheme, token))
                if scheme.eq_ignore_ascii_case("bearer")
                    && !token.is_empty()
                    && !token.contains(char::is_whitespace) =>
            {
                token
            }
            _ => {
                return Err(Status::unauthenticated(
                    "a token is required: the authorization metadata must be `Bearer TOKEN`",
                ));
            }
        };
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Look at every entry, so the time taken does not tell which one matched.
        let mut found = None;
        for t in &self.tokens {
            if digests_equal(&t.digest, &digest) {
                found = Some(t);
            }
        }
        let Some(t) = found else {
            return Err(Status::unauthenticated("the token is not valid"));
        };
        if t.role < needed {
            return Err(Status::permission_denied(format!(
                "token {:?} has role {}; {rpc} needs {needed}",
                t.name, t.role
            )));
        }
        Ok(&t.name)
    }
}

/// Constant-time equality of two digests: no early exit on the first difference.
fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The lower-case hex SHA-256 of `token`, as written in an auth file.
pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The gRPC path prefix of the Client service.
const CLIENT_PREFIX: &str = "/raftify.v1.Client/";

/// The role each Client RPC needs (proto/raftify.proto). An RPC not listed
/// needs admin.
const CLIENT_RPCS: &[(&str, Role)] = &[
    ("Query", Role::Read),
    ("Status", Role::Read),
    ("ListPlugins", Role::Read),
    ("Propose", Role::Write),
    ("ProposeStream", Role::Write),
    ("OpenSession", Role::Write),
    ("Join", Role::Admin),
    ("RemoveMember", Role::Admin),
    ("TransferLeader", Role::Admin),
    ("Snapshot", Role::Admin),
    ("SaveSnapshot", Role::Admin),
    ("SwapPlugin", Role::Admin),
    ("SwapPluginStream", Role::Admin),
    ("DisarmAlarms", Role::Admin),
    ("SetLimits", Role::Admin),
];

/// The RPC name and role needed for the gRPC `path` of a Client RPC (an
/// unlisted one needs admin, named "an unlisted Client RPC"); `None` for any
/// other path, which is not checked by tokens.
pub fn required_role(path: &str) -> Option<(&'static str, Role)> {
    let method = path.strip_prefix(CLIENT_PREFIX)?;
    Some(
        CLIENT_RPCS
            .iter()
            .find(|(name, _)| *name == method)
            .copied()
            .unwrap_or(("an unlisted Client RPC", Role::Admin)),
    )
}

/// A tower layer checking tokens on Client RPCs, for
/// `Server::builder().layer(AuthLayer::new(table))`. Without a table, auth is
/// off and every request passes.
#[derive(Debug, Clone, Default)]
pub struct AuthLayer {
    table: Option<Arc<TokenTable>>,
}

impl AuthLayer {
    /// A layer checking `table`, or passing everything if `None`.
    pub fn new(table: Option<Arc<TokenTable>>) -> AuthLayer {
        AuthLayer { table }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            table: self.table.clone(),
        }
    }
}

/// The service made by [`AuthLayer`]: answers a refused request with its gRPC
/// status without calling `inner`.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    table: Option<Arc<TokenTable>>,
}

impl<S> AuthService<S> {
    /// Checks a request against the table: Ok if it may go on.
    fn authorize<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let (Some(table), Some((rpc, needed))) = (&self.table, required_role(request.uri().path())) else {
            return Ok(());
        };
        // A header that is not visible ASCII counts as malformed.
        let authorization = match request.headers().get(http::header::AUTHORIZATION) {
            None => None,
            Some(value) => Some(value.to_str().unwrap_or("")),
        };
        match table.check(authorization, needed, rpc) {
            Ok(_) => Ok(()),
            Err(status) => {
                tracing::debug!(rpc, code = ?status.code(), "client request refused");
                Err(status)
            }
        }
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, Self::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        match self.authorize(&request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => Either::Left(ready(Ok(status.into_http()))),
        }
    }
}

#[cfg(test)]
mod tests;

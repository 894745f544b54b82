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
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::Code;
    use tonic::body::Body;

    const READ: &str = "read-secret-r1";
    const WRITE: &str = "write-secret-w2";
    const ADMIN: &str = "admin-secret-a3";

    fn table() -> TokenTable {
        let text = format!(
            "[[token]]\nname = \"ci\"\nrole = \"read\"\nsha256 = \"{}\"\n\
             [[token]]\nname = \"app\"\nrole = \"write\"\nsha256 = \"{}\"\n\
             [[token]]\nname = \"ops\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
            sha256_hex(READ),
            sha256_hex(WRITE).to_uppercase(),
            sha256_hex(ADMIN)
        );
        TokenTable::parse(&text).unwrap()
    }

    fn entry(name: &str, role: &str, sha: &str) -> String {
        format!("[[token]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{sha}\"\n")
    }

    fn parse_err(text: &str) -> String {
        TokenTable::parse(text).unwrap_err().to_string()
    }

    /// The Client RPCs of proto/raftify.proto.
    fn proto_client_rpcs() -> Vec<String> {
        let proto = include_str!("../../proto/raftify.proto");
        let start = proto.find("service Client {").unwrap();
        let body = &proto[start..];
        let body = &body[..body.find("\n}").unwrap()];
        body.lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap().trim().to_owned())
            .collect()
    }

    #[test]
    fn parses_a_good_file() {
        let t = table();
        assert_eq!(t.tokens.len(), 3);
        assert_eq!(
            t.check(Some(&format!("Bearer {WRITE}")), Role::Write, "Propose")
                .unwrap(),
            "app"
        );
    }

    #[test]
    fn loads_from_a_file_and_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth.toml");
        std::fs::write(&path, entry("ci", "read", &sha256_hex(READ))).unwrap();
        assert_eq!(TokenTable::load(&path).unwrap().tokens.len(), 1);
        std::fs::write(&path, "").unwrap();
        let err = TokenTable::load(&path).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        let missing = dir.path().join("missing.toml");
        let err = TokenTable::load(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.toml"), "{err}");
    }

    #[test]
    fn refuses_bad_files() {
        let good = sha256_hex(READ);
        let err = parse_err(&entry("ci", "read", "abc"));
        assert!(err.contains("\"ci\"") && err.contains("64 hex"), "{err}");
        let err = parse_err(&entry("ci", "read", &"g".repeat(64)));
        assert!(err.contains("\"ci\"") && err.contains("64 hex"), "{err}");
        // A token put in clear by mistake is not echoed.
        let err = parse_err(&entry("ci", "read", "my-clear-token"));
        assert!(!err.contains("my-clear-token"), "{err}");
        let err = parse_err(&format!(
            "{}{}",
            entry("ci", "read", &good),
            entry("ci", "write", &sha256_hex(WRITE))
        ));
        assert!(err.contains("\"ci\" appears twice"), "{err}");
        let err = parse_err(&format!("{}{}", entry("a", "read", &good), entry("b", "write", &good)));
        assert!(err.contains("same sha256"), "{err}");
        let err = parse_err(&entry(" ", "read", &good));
        assert!(err.contains("empty name"), "{err}");
        let err = parse_err(&format!("{}extra = 1\n", entry("ci", "read", &good)));
        assert!(err.contains("extra"), "{err}");
        let err = parse_err(&format!("other = 1\n{}", entry("ci", "read", &good)));
        assert!(err.contains("other"), "{err}");
        let err = parse_err(&entry("ci", "root", &good));
        assert!(err.contains("root"), "{err}");
        let err = parse_err("[[token]]\nname = \"ci\"\nrole = \"read\"\n");
        assert!(err.contains("sha256"), "{err}");
        let err = parse_err("");
        assert!(err.contains("no [[token]]") && err.contains("<inline>"), "{err}");
    }

    #[test]
    fn every_proto_client_rpc_is_listed() {
        let rpcs = proto_client_rpcs();
        assert_eq!(rpcs.len(), CLIENT_RPCS.len(), "{rpcs:?}");
        for rpc in &rpcs {
            assert!(CLIENT_RPCS.iter().any(|(n, _)| n == rpc), "{rpc} is not listed");
        }
    }

    #[test]
    fn role_matrix() {
        let t = table();
        let expected = |rpc: &str| match rpc {
            "Query" | "Status" | "ListPlugins" => Role::Read,
            "Propose" | "ProposeStream" | "OpenSession" => Role::Write,
            _ => Role::Admin,
        };
        for rpc in proto_client_rpcs() {
            let (name, needed) = required_role(&format!("/raftify.v1.Client/{rpc}")).unwrap();
            assert_eq!(name, rpc);
            assert_eq!(needed, expected(&rpc), "{rpc}");
            for (token, role, holder) in [
                (READ, Role::Read, "ci"),
                (WRITE, Role::Write, "app"),
                (ADMIN, Role::Admin, "ops"),
            ] {
                let result = t.check(Some(&format!("Bearer {token}")), needed, name);
                if role >= needed {
                    assert_eq!(result.unwrap(), holder, "{rpc} {role}");
                } else {
                    let status = result.unwrap_err();
                    assert_eq!(status.code(), Code::PermissionDenied, "{rpc} {role}");
                    assert_eq!(
                        status.message(),
                        format!("token \"{holder}\" has role {role}; {rpc} needs {needed}")
                    );
                    assert!(!status.message().contains(token));
                }
            }
        }
    }

    #[test]
    fn unlisted_client_rpcs_need_admin_and_others_are_not_checked() {
        assert_eq!(required_role("/raftify.v1.Client/NewThing").unwrap().1, Role::Admin);
        assert_eq!(required_role("/raftify.v1.Client/").unwrap().1, Role::Admin);
        assert_eq!(required_role("/raftify.v1.Peer/Stream"), None);
        assert_eq!(required_role("/raftify.v1.Peer/InstallSnapshot"), None);
        assert_eq!(required_role("/raftify.v1.Peer/FetchPlugin"), None);
    }

    #[test]
    fn bad_or_missing_tokens_are_unauthenticated() {
        let t = table();
        let bad = [
            None,
            Some(""),
            Some("Bearer"),
            Some("Bearer "),
            Some("Basic read-secret-r1"),
            Some("Bearer  read-secret-r1"),
            Some("Bearer read-secret-r1 x"),
            Some("read-secret-r1"),
            Some("Bearer read-secret-r1x"),
            Some("Bearer wrong"),
        ];
        for header in bad {
            let status = t.check(header, Role::Read, "Query").unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{header:?}");
            assert!(!status.message().contains(READ), "{header:?}: {}", status.message());
            assert!(!status.message().contains("wrong"), "{}", status.message());
        }
        assert!(
            t.check(None, Role::Read, "Query")
                .unwrap_err()
                .message()
                .starts_with("a token is required")
        );
        assert_eq!(
            t.check(Some("Bearer wrong"), Role::Read, "Query")
                .unwrap_err()
                .message(),
            "the token is not valid"
        );
        for scheme in ["bearer", "BEARER", "Bearer"] {
            assert_eq!(
                t.check(Some(&format!("{scheme} {READ}")), Role::Read, "Query").unwrap(),
                "ci"
            );
        }
    }

    #[test]
    fn digests_compare() {
        let a = [7u8; 32];
        let mut b = a;
        assert!(digests_equal(&a, &b));
        b[31] ^= 1;
        assert!(!digests_equal(&a, &b));
        assert_eq!(
            sha256_hex("test"),
            "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    fn request(path: &str, authorization: Option<&str>) -> http::Request<Body> {
        let mut builder = http::Request::builder().uri(format!("http://node{path}"));
        if let Some(value) = authorization {
            builder = builder.header("authorization", value);
        }
        builder.body(Body::empty()).unwrap()
    }

    fn grpc_status(response: &http::Response<Body>) -> Option<&str> {
        response.headers().get("grpc-status").map(|v| v.to_str().unwrap())
    }

    #[tokio::test]
    async fn the_service_refuses_without_calling_inner() {
        use tower::ServiceExt;
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let inner = tower::service_fn(move |_: http::Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty())) }
        });
        let service = AuthLayer::new(Some(Arc::new(table()))).layer(inner);
        let send = |path: &str, auth: Option<&str>| service.clone().oneshot(request(path, auth));

        let read = format!("Bearer {READ}");
        let write = format!("Bearer {WRITE}");
        let refused = [
            ("/raftify.v1.Client/Query", None, "16"),
            ("/raftify.v1.Client/Query", Some("Bearer wrong"), "16"),
            ("/raftify.v1.Client/Propose", Some(read.as_str()), "7"),
            ("/raftify.v1.Client/NewThing", Some(write.as_str()), "7"),
        ];
        for (path, auth, code) in refused {
            let response = send(path, auth).await.unwrap();
            assert_eq!(grpc_status(&response), Some(code), "{path} {auth:?}");
            assert_eq!(response.status(), http::StatusCode::OK);
            assert_eq!(calls.load(Ordering::SeqCst), 0);
        }

        let allowed = [
            ("/raftify.v1.Client/Query", Some(format!("Bearer {READ}"))),
            ("/raftify.v1.Client/SwapPlugin", Some(format!("bearer {ADMIN}"))),
            ("/raftify.v1.Peer/Stream", None),
        ];
        for (i, (path, auth)) in allowed.iter().enumerate() {
            let response = send(path, auth.as_deref()).await.unwrap();
            assert_eq!(grpc_status(&response), None, "{path}");
            assert_eq!(calls.load(Ordering::SeqCst), i + 1);
        }

        // Auth off: everything passes.
        let counter = calls.clone();
        let inner = tower::service_fn(move |_: http::Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty())) }
        });
        let open = AuthLayer::new(None).layer(inner);
        open.oneshot(request("/raftify.v1.Client/Join", None)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), allowed.len() + 1);
    }

    /// The layer fits tonic's server: this only has to compile.
    #[allow(dead_code)]
    fn fits_the_tonic_server(listener: tokio::net::TcpListener) {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _server = tonic::transport::Server::builder()
            .layer(AuthLayer::new(None))
            .add_routes(tonic::service::Routes::default())
            .serve_with_incoming(incoming);
    }
}

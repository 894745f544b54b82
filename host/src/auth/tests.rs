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
    let proto = include_str!("../../../proto/raftify.proto");
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

use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Endpoint, Server};
use tonic::{Response, Status, Streaming};

use super::*;
use crate::proto::peer_client::PeerClient;
use crate::proto::peer_server::{Peer, PeerServer};
use crate::proto::{FetchPluginRequest, FetchPluginResponse, RaftBatch, SnapshotAck, SnapshotChunk, StreamSummary};

fn sans() -> Vec<String> {
    vec!["127.0.0.1".to_string(), "localhost".to_string()]
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_and_issue_write_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path().join("certs");
    init(&dir).unwrap();
    assert!(dir.join(CA_CERT).is_file());
    assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
    for name in ["node-1", "node_2.example"] {
        let (cert, key) = issue(&dir, name, &sans()).unwrap();
        assert_eq!(cert, dir.join(format!("{name}.pem")));
        assert_eq!(key, dir.join(format!("{name}-key.pem")));
        assert!(cert.is_file());
        assert_eq!(mode(&key), 0o600);
        server_config(&dir.join(CA_CERT), &cert, &key).unwrap();
    }
    let files = TlsFiles {
        ca: dir.join(CA_CERT),
        cert: Some(dir.join("node-1.pem")),
        key: Some(dir.join("node-1-key.pem")),
    };
    client_config(&files, Some("localhost")).unwrap();
    client_config(
        &TlsFiles {
            cert: None,
            key: None,
            ..files.clone()
        },
        None,
    )
    .unwrap();
    let half = TlsFiles { key: None, ..files };
    let err = client_config(&half, None).unwrap_err().to_string();
    assert!(err.contains("only the certificate was given"), "{err}");
}

#[test]
fn refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path()).unwrap();
    let err = init(dir.path()).unwrap_err().to_string();
    assert!(err.contains("refusing to overwrite") && err.contains(CA_CERT), "{err}");
    issue(dir.path(), "a", &sans()).unwrap();
    let err = issue(dir.path(), "a", &sans()).unwrap_err().to_string();
    assert!(err.contains("refusing to overwrite") && err.contains("a.pem"), "{err}");
    // A name that would land on the CA's files.
    assert!(matches!(issue(dir.path(), "ca", &sans()), Err(TlsError::Exists { .. })));
}

#[test]
fn issue_validates_its_input() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path()).unwrap();
    for name in ["", "../x", "a b", "a/b", "é"] {
        assert!(
            matches!(issue(dir.path(), name, &sans()), Err(TlsError::BadName(_))),
            "{name:?}"
        );
    }
    assert!(matches!(issue(dir.path(), "a", &[]), Err(TlsError::NoSans)));
    for san in ["", " ", "a b", "é.example"] {
        let result = issue(dir.path(), "a", &[san.to_string()]);
        assert!(matches!(result, Err(TlsError::BadSan { .. })), "{san:?}: {result:?}");
    }
    assert!(!dir.path().join("a.pem").exists());
    // No CA there.
    let empty = tempfile::tempdir().unwrap();
    let err = issue(empty.path(), "a", &sans()).unwrap_err().to_string();
    assert!(
        err.starts_with("cannot read TLS CA certificate") && err.contains(CA_CERT),
        "{err}"
    );
    // A key that is not the CA's.
    let other = tempfile::tempdir().unwrap();
    init(other.path()).unwrap();
    fs::copy(other.path().join(CA_KEY), dir.path().join("b-key")).unwrap();
    fs::rename(dir.path().join("b-key"), dir.path().join(CA_KEY)).unwrap();
    let err = issue(dir.path(), "b", &sans()).unwrap_err().to_string();
    assert!(err.contains("it is not the key of ca.pem"), "{err}");
}

#[test]
fn garbage_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    init(dir.path()).unwrap();
    let (cert, key) = issue(dir.path(), "n", &sans()).unwrap();
    let ca = dir.path().join(CA_CERT);
    fs::write(&ca, "not a certificate\n").unwrap();
    let err = server_config(&ca, &cert, &key).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{} is not a PEM certificate", ca.display())),
        "{err}"
    );
    let files = TlsFiles {
        ca: ca.clone(),
        cert: None,
        key: None,
    };
    assert!(matches!(client_config(&files, None), Err(TlsError::NotPem { .. })));
    fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let err = server_config(&ca, &cert, &key).unwrap_err().to_string();
    assert!(err.contains("not base64-encoded DER"), "{err}");
    // A key where a certificate belongs, and the other way round.
    let err = server_config(&key, &cert, &key).unwrap_err().to_string();
    assert!(err.contains("has no CERTIFICATE block"), "{err}");
    let err = server_config(&cert, &cert, &cert).unwrap_err().to_string();
    assert!(err.contains("is not a PEM private key"), "{err}");
    let missing = dir.path().join("missing.pem");
    let err = server_config(&missing, &cert, &key).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!("cannot read TLS CA certificate {}", missing.display())),
        "{err}"
    );
}

#[test]
fn base64_round_trips() {
    assert_eq!(base64_decode("").unwrap(), b"");
    assert_eq!(base64_decode("Zg==").unwrap(), b"f");
    assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
    assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
    assert!(base64_decode("Zm9").is_none());
    assert!(base64_decode("Z===").is_none());
}

/// Answers `fetch_plugin` with whether the caller presented a certificate.
struct Echo;

#[tonic::async_trait]
impl Peer for Echo {
    async fn stream(&self, _: Request<Streaming<RaftBatch>>) -> Result<Response<StreamSummary>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn install_snapshot(&self, _: Request<Streaming<SnapshotChunk>>) -> Result<Response<SnapshotAck>, Status> {
        Err(Status::unimplemented("test"))
    }

    async fn fetch_plugin(
        &self,
        request: Request<FetchPluginRequest>,
    ) -> Result<Response<FetchPluginResponse>, Status> {
        let wasm = vec![u8::from(has_client_cert(&request))];
        Ok(Response::new(FetchPluginResponse { wasm }))
    }
}

/// One `fetch_plugin` call over a fresh connection.
async fn ask(url: String, tls: Option<ClientTlsConfig>) -> Result<Vec<u8>, String> {
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("{e:?}"))?;
    let response = PeerClient::new(channel)
        .fetch_plugin(FetchPluginRequest::default())
        .await
        .map_err(|e| e.to_string())?;
    Ok(response.into_inner().wasm)
}

#[tokio::test]
async fn mutual_tls_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_dir, other_dir) = (dir.path().join("ca"), dir.path().join("other"));
    init(&ca_dir).unwrap();
    init(&other_dir).unwrap();
    let (server_cert, server_key) = issue(&ca_dir, "server", &sans()).unwrap();
    let (client_cert, client_key) = issue(&ca_dir, "client", &sans()).unwrap();
    let (rogue_cert, rogue_key) = issue(&other_dir, "rogue", &sans()).unwrap();
    let ca = ca_dir.join(CA_CERT);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = Server::builder()
        .tls_config(server_config(&ca, &server_cert, &server_key).unwrap())
        .unwrap()
        .add_service(PeerServer::new(Echo))
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let https = format!("https://127.0.0.1:{port}");
    let with_cert = TlsFiles {
        ca: ca.clone(),
        cert: Some(client_cert),
        key: Some(client_key),
    };
    let tls = client_config(&with_cert, None).unwrap();
    assert_eq!(ask(https.clone(), Some(tls)).await, Ok(vec![1]));
    // By DNS name rather than IP address.
    let tls = client_config(&with_cert, Some("localhost")).unwrap();
    assert_eq!(ask(https.clone(), Some(tls)).await, Ok(vec![1]));

    let without_cert = TlsFiles {
        ca: ca.clone(),
        cert: None,
        key: None,
    };
    let tls = client_config(&without_cert, None).unwrap();
    assert_eq!(ask(https.clone(), Some(tls)).await, Ok(vec![0]));

    // The server's certificate is not for this name.
    let tls = client_config(&without_cert, Some("elsewhere.example")).unwrap();
    let err = ask(https.clone(), Some(tls)).await.unwrap_err();
    assert!(err.contains("NotValidForName"), "{err}");

    // A client that trusts another CA does not trust the server.
    let other_ca = TlsFiles {
        ca: other_dir.join(CA_CERT),
        cert: None,
        key: None,
    };
    let tls = client_config(&other_ca, None).unwrap();
    let err = ask(https.clone(), Some(tls)).await.unwrap_err();
    assert!(err.contains("InvalidCertificate"), "{err}");

    // A client certificate from another CA is refused, though optional.
    let rogue = TlsFiles {
        ca: ca.clone(),
        cert: Some(rogue_cert),
        key: Some(rogue_key),
    };
    let tls = client_config(&rogue, None).unwrap();
    assert!(ask(https.clone(), Some(tls)).await.is_err());

    // Plaintext.
    assert!(ask(format!("http://127.0.0.1:{port}"), None).await.is_err());

    server.abort();
}

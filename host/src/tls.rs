//! TLS: certificates for a test cluster (`tls init`, `tls issue`) and the
//! rustls configurations for the server and its clients.
//!
//! `init` makes a CA (`ca.pem`, `ca-key.pem`) in a directory; `issue` signs a
//! certificate for one node or client with it (`NAME.pem`, `NAME-key.pem`).
//! A node uses one certificate for both sides: it serves with it and presents
//! it to its peers. Client certificates are optional at the TLS layer (so
//! plain API clients need only the CA); the Peer service demands one with
//! [`has_client_cert`].
//!
//! Every file is checked to be PEM when it is loaded, so a wrong path fails at
//! startup with the file's name, not at the first handshake.

use std::fs::{self, OpenOptions};
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};
use tonic::Request;
use tonic::transport::server::TlsConnectInfo;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The CA certificate's file name in a TLS directory.
pub const CA_CERT: &str = "ca.pem";
/// The CA private key's file name in a TLS directory.
pub const CA_KEY: &str = "ca-key.pem";
/// The CA's common name; `issue` signs only with a CA that `init` made.
const CA_NAME: &str = "raftify-host CA";
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const CA_VALIDITY: Duration = Duration::from_secs(3652 * 24 * 60 * 60);
const LEAF_VALIDITY: Duration = Duration::from_secs(730 * 24 * 60 * 60);

/// What went wrong making or loading TLS files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the TLS directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("refusing to overwrite {}: it already exists", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read TLS {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{} is not a PEM {what}: {reason}", path.display())]
    NotPem {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{} was not made by `tls init`: {reason}", path.display())]
    ForeignCa { path: PathBuf, reason: &'static str },
    #[error("invalid certificate name {0:?}: use only letters, digits, '.', '_' and '-'")]
    BadName(String),
    #[error("a certificate needs at least one subject alternative name (a DNS name or an IP address)")]
    NoSans,
    #[error("invalid subject alternative name {san:?}: {reason}")]
    BadSan { san: String, reason: String },
    #[error("a TLS identity needs both a certificate and a key; only the {0} was given")]
    HalfIdentity(&'static str),
    #[error("the system clock is before 1970")]
    Clock,
    #[error("cannot generate the {what}: {source}")]
    Generate { what: &'static str, source: rcgen::Error },
}

/// The TLS files one side of a connection uses: the CA it trusts, and its
/// own certificate and key (both or neither).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// Writes a new CA into `dir` (created if missing): `ca.pem` and
/// `ca-key.pem` (mode 0600). Refuses to overwrite either.
pub fn init(dir: &Path) -> Result<(), TlsError> {
    fs::create_dir_all(dir).map_err(|source| TlsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    refuse_existing(&[&cert_path, &key_path])?;

    let mut params = ca_params();
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    set_validity(&mut params, CA_VALIDITY)?;
    let generate = |source| TlsError::Generate { what: "CA", source };
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.self_signed(&key).map_err(generate)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)
}

/// Signs a certificate for `name` with the CA in `dir`, valid for `sans`
/// (IP literals become IP addresses, anything else a DNS name) as both a
/// server and a client. Writes `NAME.pem` and `NAME-key.pem` (mode 0600),
/// refusing to overwrite either, and returns their paths.
pub fn issue(dir: &Path, name: &str, sans: &[String]) -> Result<(PathBuf, PathBuf), TlsError> {
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !name_ok {
        return Err(TlsError::BadName(name.to_string()));
    }
    if sans.is_empty() {
        return Err(TlsError::NoSans);
    }
    let subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<Vec<_>, _>>()?;
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    refuse_existing(&[&cert_path, &key_path])?;

    let issuer = load_issuer(dir)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.subject_alt_names = subject_alt_names;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, LEAF_VALIDITY)?;
    let generate = |source| TlsError::Generate {
        what: "certificate",
        source,
    };
    let key = KeyPair::generate().map_err(generate)?;
    let cert = params.signed_by(&key, &issuer).map_err(generate)?;
    write_new(&key_path, &key.serialize_pem(), true)?;
    write_new(&cert_path, &cert.pem(), false)?;
    Ok((cert_path, key_path))
}

/// The server side: serves with `cert` and `key`, and verifies the client
/// certificates that are presented against `ca` (they are optional).
pub fn server_config(ca: &Path, cert: &Path, key: &Path) -> Result<ServerTlsConfig, TlsError> {
    Ok(ServerTlsConfig::new()
        .identity(load_identity(cert, key)?)
        .client_ca_root(load_cert(ca, "CA certificate")?)
        .client_auth_optional(true))
}

/// The client side: trusts `files.ca`, presents `files.cert` if given, and
/// expects the server's certificate to name `domain` (default: the host of
/// the URL it connects to).
pub fn client_config(files: &TlsFiles, domain: Option<&str>) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new().ca_certificate(load_cert(&files.ca, "CA certificate")?);
    match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => config = config.identity(load_identity(cert, key)?),
        (Some(_), None) => return Err(TlsError::HalfIdentity("certificate")),
        (None, Some(_)) => return Err(TlsError::HalfIdentity("key")),
        (None, None) => {}
    }
    if let Some(domain) = domain {
        config = config.domain_name(domain);
    }
    Ok(config)
}

/// Whether the client presented a certificate (which the server's TLS layer
/// has verified against its CA). Works for a server whose incoming
/// connections are `TcpStream`s (`TlsConnectInfo<TcpConnectInfo>`, what
/// [`Request::peer_certs`] reads) or `DuplexStream`s (`TlsConnectInfo<()>`).
pub fn has_client_cert<T>(request: &Request<T>) -> bool {
    let certs = request.peer_certs().or_else(|| {
        request
            .extensions()
            .get::<TlsConnectInfo<()>>()
            .and_then(TlsConnectInfo::peer_certs)
    });
    certs.is_some_and(|certs| !certs.is_empty())
}

/// The CA's parameters, less its validity: what `issue` needs to sign.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// The CA in `dir`, checked to be one `init` made (rcgen's own CA parser
/// needs its `x509-parser` feature, so the issuer is rebuilt from
/// [`ca_params`]): its certificate holds the key's public half and its name.
fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    let ca_der = read_certs(&cert_path, "CA certificate")?
        .1
        .into_iter()
        .next()
        .unwrap_or_default();
    let key_pem = read(&key_path, "CA key")?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::NotPem {
        what: "private key",
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    if !contains(&ca_der, key.public_key_raw()) {
        return Err(TlsError::ForeignCa {
            path: key_path,
            reason: "it is not the key of ca.pem",
        });
    }
    if !contains(&ca_der, CA_NAME.as_bytes()) {
        return Err(TlsError::ForeignCa {
            path: cert_path,
            reason: "its subject is not \"CN=raftify-host CA\"",
        });
    }
    Ok(Issuer::new(ca_params(), key))
}

/// A SAN: an IP address if `text` parses as one, else a DNS name.
fn san(text: &str) -> Result<SanType, TlsError> {
    let bad = |reason: &str| TlsError::BadSan {
        san: text.to_string(),
        reason: reason.to_string(),
    };
    if text.trim().is_empty() {
        return Err(bad("it is empty"));
    }
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    if text.contains(char::is_whitespace) {
        return Err(bad("a DNS name cannot contain spaces"));
    }
    Ia5String::try_from(text)
        .map(SanType::DnsName)
        .map_err(|e| bad(&e.to_string()))
}

/// Makes `params` valid from a day ago (some slack for clock skew) for
/// `valid_for` from now, to the second.
fn set_validity(params: &mut CertificateParams, valid_for: Duration) -> Result<(), TlsError> {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TlsError::Clock)?;
    let now = date_time_ymd(1970, 1, 1) + Duration::from_secs(since.as_secs());
    params.not_before = now - DAY;
    params.not_after = now + valid_for;
    Ok(())
}

fn refuse_existing(paths: &[&Path]) -> Result<(), TlsError> {
    match paths.iter().find(|path| path.exists()) {
        Some(path) => Err(TlsError::Exists {
            path: path.to_path_buf(),
        }),
        None => Ok(()),
    }
}

/// Writes a file that must not exist yet; a secret one gets mode 0600.
fn write_new(path: &Path, contents: &str, secret: bool) -> Result<(), TlsError> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => TlsError::Exists {
            path: path.to_path_buf(),
        },
        _ => TlsError::Write {
            path: path.to_path_buf(),
            source,
        },
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn read(path: &Path, what: &'static str) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// A certificate file's text and the DER of each certificate in it (at
/// least one).
fn read_certs(path: &Path, what: &'static str) -> Result<(String, Vec<Vec<u8>>), TlsError> {
    let pem = read(path, what)?;
    let not_pem = |reason: String| TlsError::NotPem {
        what: "certificate",
        path: path.to_path_buf(),
        reason,
    };
    let ders: Vec<Vec<u8>> = pem_blocks(&pem)
        .map_err(not_pem)?
        .into_iter()
        .filter(|(label, _)| label == "CERTIFICATE")
        .map(|(_, der)| der)
        .collect();
    if ders.is_empty() {
        return Err(not_pem("it has no CERTIFICATE block".to_string()));
    }
    Ok((pem, ders))
}

fn load_cert(path: &Path, what: &'static str) -> Result<Certificate, TlsError> {
    Ok(Certificate::from_pem(read_certs(path, what)?.0))
}

fn load_identity(cert: &Path, key: &Path) -> Result<Identity, TlsError> {
    let (cert_pem, _) = read_certs(cert, "certificate")?;
    let key_pem = read(key, "key")?;
    let not_key = |reason: String| TlsError::NotPem {
        what: "private key",
        path: key.to_path_buf(),
        reason,
    };
    let blocks = pem_blocks(&key_pem).map_err(not_key)?;
    if !blocks.iter().any(|(label, _)| label.ends_with("PRIVATE KEY")) {
        return Err(not_key("it has no PRIVATE KEY block".to_string()));
    }
    Ok(Identity::from_pem(cert_pem, key_pem))
}

/// The label and DER contents of each PEM block in `text` (text outside the
/// blocks is ignored, as RFC 7468 allows). Each block must be base64 of a
/// DER SEQUENCE.
fn pem_blocks(text: &str) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        loop {
            match lines.next() {
                Some(line) if line == end => break,
                Some(line) => body.push_str(line),
                None => return Err(format!("the {label} block has no \"{end}\" line")),
            }
        }
        match base64_decode(&body) {
            Some(der) if der.first() == Some(&0x30) => blocks.push((label.to_string(), der)),
            _ => return Err(format!("the {label} block is not base64-encoded DER")),
        }
    }
    if blocks.is_empty() {
        return Err("it has no \"-----BEGIN ...-----\" line".to_string());
    }
    Ok(blocks)
}

/// Standard base64 with padding; `None` if `text` is not.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let body = text
        .strip_suffix("==")
        .or_else(|| text.strip_suffix('='))
        .unwrap_or(text);
    if !text.len().is_multiple_of(4) || body.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|window| window == needle)
}

#[cfg(test)]
mod tests;

//! How this process reaches a node: plaintext or TLS, `TCP_NODELAY`, a
//! connect timeout, and (for client calls) a bearer token. Peers, the CLI,
//! the bench tool and a joining node all dial through a [`Dialer`], so
//! they agree on the scheme and none of them forgets no-delay.

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// The metadata key carrying the leader's address on "not leader" errors.
pub const LEADER_ADDR_KEY: &str = "raftify-leader-addr";
/// The metadata key marking a "not the leader" error: the request was not
/// proposed, so it is safe to send again (to the leader).
pub const NOT_LEADER_KEY: &str = "raftify-not-leader";
/// The metadata key marking a "not now" error whose request was not
/// proposed (another membership change is in flight): sending it again is
/// safe.
pub const NOT_PROPOSED_KEY: &str = "raftify-not-proposed";

/// `HOST:PORT`, where HOST is an IPv4 literal, a bracketed IPv6 literal or
/// a DNS name (letters, digits, `-` and `.`; labels of 1 to 63 characters),
/// and PORT is 1 to 65535. Addresses travel in the replicated log and into
/// URIs, so nothing else is let in.
///
/// ```
/// use raftify_host::dial::check_addr;
/// assert!(check_addr("127.0.0.1:7001").is_ok());
/// assert!(check_addr("[::1]:7001").is_ok());
/// assert!(check_addr("node-1.example:7001").is_ok());
/// assert!(check_addr("[::1]:1:2").is_err());
/// assert!(check_addr("evil host\n:1").is_err());
/// ```
pub fn check_addr(addr: &str) -> Result<(), String> {
    let bad = || format!("{addr:?} is not HOST:PORT");
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    if !matches!(port.parse::<u16>(), Ok(p) if p > 0) || port.starts_with('+') {
        return Err(bad());
    }
    let valid_host = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else if host.parse::<std::net::Ipv4Addr>().is_ok() {
        true
    } else {
        is_dns_name(host)
    };
    if !valid_host {
        return Err(format!(
            "{addr:?} is not HOST:PORT: {host:?} is not an IP address or host name"
        ));
    }
    Ok(())
}

fn is_dns_name(host: &str) -> bool {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(label_ok)
        // All-numeric dotted names are malformed IPv4, not names.
        && !host.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// Cheap to clone.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<ClientTlsConfig>>,
    token: TokenInterceptor,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Dialer")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.0.is_some())
            .finish()
    }
}

impl Dialer {
    /// Dial over TLS with this configuration (CA, optional client
    /// certificate).
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Dialer {
        self.tls = Some(Arc::new(tls));
        self
    }

    /// Send `authorization: Bearer TOKEN` on every client call.
    pub fn with_token(mut self, token: &str) -> Result<Dialer, String> {
        let value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token must be printable ASCII without spaces".to_string())?;
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        self.token = TokenInterceptor(Some(value));
        Ok(self)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint for `addr` (HOST:PORT), not yet connected.
    pub fn endpoint(&self, addr: &str, connect_timeout: Duration) -> Result<Endpoint, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("{addr:?} is not HOST:PORT: {e}"))?
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(ClientTlsConfig::clone(tls))
                .map_err(|e| format!("TLS for {addr}: {}", innermost(&e)))?;
        }
        Ok(endpoint)
    }

    /// Connect to `addr`; the error is the innermost cause, in one line.
    pub async fn connect(&self, addr: &str, connect_timeout: Duration) -> Result<Channel, String> {
        self.endpoint(addr, connect_timeout)?
            .connect()
            .await
            .map_err(|e| explain(&innermost(&e), self.tls.is_some()))
    }

    /// Adds the token (if any) to each request.
    pub fn interceptor(&self) -> TokenInterceptor {
        self.token.clone()
    }
}

/// The deepest error in a chain: tonic's own message is only "transport
/// error".
pub fn innermost(error: &(dyn std::error::Error + 'static)) -> String {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        reason = inner.to_string();
        source = inner.source();
    }
    reason
}

/// A hint for the usual TLS mistakes.
fn explain(reason: &str, tls: bool) -> String {
    if tls && (reason.contains("InvalidContentType") || reason.contains("corrupt message")) {
        format!("{reason} (is the node serving plaintext? drop --tls-ca to dial it without TLS)")
    } else if tls && reason.contains("UnknownIssuer") {
        format!("{reason} (the node's certificate is not signed by --tls-ca)")
    } else {
        reason.to_string()
    }
}

/// Adds `authorization: Bearer TOKEN` when a token is set.
#[derive(Clone, Default)]
pub struct TokenInterceptor(Option<MetadataValue<Ascii>>);

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_never_shown() {
        assert!(Dialer::default().with_token("has space").is_err());
        assert!(Dialer::default().with_token("").is_err());
        assert!(Dialer::default().with_token("bad\ntoken").is_err());
        let dialer = Dialer::default().with_token("s3cret").unwrap();
        assert!(!format!("{dialer:?}").contains("s3cret"));
        let mut interceptor = dialer.interceptor();
        let request = interceptor.call(tonic::Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer s3cret");
        let request = Dialer::default().interceptor().call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn the_scheme_follows_tls() {
        let endpoint = Dialer::default()
            .endpoint("127.0.0.1:7070", Duration::from_secs(1))
            .unwrap();
        assert_eq!(endpoint.uri().scheme_str(), Some("http"));
        assert!(
            Dialer::default()
                .endpoint("not an address", Duration::from_secs(1))
                .is_err()
        );
    }
}

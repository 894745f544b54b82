//! Accepted connections, as the gRPC server sees them: `TCP_NODELAY` on
//! every socket (tonic sets it only on listeners it binds itself, and with
//! Nagle on, small replies wait out the peer's delayed-ACK timer), a cap on
//! concurrent connections, and a deadline for a connection's first bytes
//! and for silence afterwards, so idle or slowloris connections cannot pin
//! descriptors forever. Accept errors (descriptors exhausted) back off
//! instead of spinning.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Connection limits: `run`'s flags of that heading, the same names in a
/// `--config` file, and `RAFTIFY_*` variables.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[command(next_help_heading = "Connections")]
#[serde(default)]
pub struct ConnectionConfig {
    /// Connections served at once; more are closed on accept.
    #[arg(long, env = "RAFTIFY_MAX_CONNECTIONS", default_value_t = ConnectionConfig::DEFAULT.max_connections)]
    pub max_connections: usize,
    /// A new connection must send its first bytes (the HTTP/2 preface, or
    /// the TLS handshake) within this many milliseconds, however slowly
    /// they trickle in.
    #[arg(long, env = "RAFTIFY_HANDSHAKE_TIMEOUT_MS", default_value_t = ConnectionConfig::DEFAULT.handshake_timeout_ms)]
    pub handshake_timeout_ms: u64,
    /// Seconds a connection may stay silent before it is closed (the server
    /// pings live ones every keepalive interval, so they always answer
    /// well within it).
    #[arg(long, env = "RAFTIFY_IDLE_TIMEOUT_SECS", default_value_t = ConnectionConfig::DEFAULT.idle_timeout_secs)]
    pub idle_timeout_secs: u64,
    /// HTTP/2 keepalive ping interval in milliseconds; a ping unanswered for
    /// twice this long closes the connection.
    #[arg(
        long,
        env = "RAFTIFY_KEEPALIVE_INTERVAL_MS",
        default_value_t = ConnectionConfig::DEFAULT.keepalive_interval_ms
    )]
    pub keepalive_interval_ms: u64,
    /// Concurrent HTTP/2 streams (requests) per connection.
    #[arg(
        long,
        env = "RAFTIFY_MAX_STREAMS_PER_CONNECTION",
        default_value_t = ConnectionConfig::DEFAULT.max_streams_per_connection
    )]
    pub max_streams_per_connection: u32,
}

impl ConnectionConfig {
    pub const DEFAULT: ConnectionConfig = ConnectionConfig {
        max_connections: 512,
        handshake_timeout_ms: 10_000,
        idle_timeout_secs: 60,
        keepalive_interval_ms: 10_000,
        max_streams_per_connection: 1_024,
    };
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig::DEFAULT
    }
}

/// Accept connections from `listener` into a stream for
/// `serve_with_incoming`. The accept loop runs on a task of its own.
pub fn incoming(listener: TcpListener, config: ConnectionConfig) -> impl Stream<Item = std::io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(accept_loop(listener, config, tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn accept_loop(listener: TcpListener, config: ConnectionConfig, tx: mpsc::Sender<std::io::Result<Conn>>) {
    let permits = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let mut refused = 0u64;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = tx.closed() => return,
        };
        let stream = match stream {
            Ok((stream, _)) => stream,
            Err(error) => {
                // EMFILE and the like: wait for descriptors to free up.
                tracing::warn!(%error, "cannot accept a connection; retrying shortly");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(
                    max_connections = config.max_connections,
                    refused,
                    "too many connections; closing new ones"
                );
            }
            drop(stream);
            continue;
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let conn = Conn {
            stream,
            _permit: permit,
            preface_left: PREFACE_BYTES,
            idle: Duration::from_secs(config.idle_timeout_secs),
            deadline: Box::pin(tokio::time::sleep(Duration::from_millis(config.handshake_timeout_ms))),
        };
        if tx.send(Ok(conn)).await.is_err() {
            return;
        }
    }
}

/// The HTTP/2 client preface; a TLS ClientHello is longer.
const PREFACE_BYTES: usize = 24;

/// An accepted connection: holds its slot until dropped, and fails reads
/// once the peer has been silent past its deadline (before its first
/// `PREFACE_BYTES`, a fixed deadline from the accept).
pub struct Conn {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    preface_left: usize,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl Connected for Conn {
    // tonic looks for `TcpConnectInfo` (inside TLS, `TlsConnectInfo<TcpConnectInfo>`)
    // to answer `remote_addr()` and `peer_certs()`.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if self.preface_left > 0 && self.deadline.is_elapsed() {
            // Bytes trickling in just before each read do not buy time.
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection did not finish its handshake in time",
            )));
        }
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                let read = buf.filled().len() - before;
                self.preface_left = self.preface_left.saturating_sub(read);
                if read > 0 && self.preface_left == 0 {
                    let next = Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(result)
            }
            Poll::Pending => {
                ready!(self.deadline.as_mut().poll(cx));
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection was silent too long",
                )))
            }
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::AsyncReadExt;

    use super::*;

    fn config(max_connections: usize) -> ConnectionConfig {
        ConnectionConfig {
            max_connections,
            handshake_timeout_ms: 200,
            idle_timeout_secs: 1,
            ..Default::default()
        }
    }

    async fn listen(config: ConnectionConfig) -> (String, impl Stream<Item = std::io::Result<Conn>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        (addr, incoming(listener, config))
    }

    #[tokio::test]
    async fn accepted_sockets_have_nodelay_and_addresses() {
        let (addr, incoming) = listen(config(4)).await;
        let mut incoming = Box::pin(incoming);
        let _client = TcpStream::connect(&addr).await.unwrap();
        let conn = incoming.next().await.unwrap().unwrap();
        assert!(conn.stream.nodelay().unwrap());
        assert!(conn.connect_info().remote_addr().is_some());
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_until_one_ends() {
        let (addr, incoming) = listen(config(1)).await;
        let mut incoming = Box::pin(incoming);
        let _first = TcpStream::connect(&addr).await.unwrap();
        let held = incoming.next().await.unwrap().unwrap();
        let mut second = TcpStream::connect(&addr).await.unwrap();
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), second.read(&mut byte)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        drop(held);
        let _third = TcpStream::connect(&addr).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(matches!(accepted, Ok(Some(Ok(_)))));
    }

    #[tokio::test]
    async fn a_silent_connection_times_out_and_an_active_one_does_not() {
        let (addr, incoming) = listen(config(4)).await;
        let mut incoming = Box::pin(incoming);
        let _silent = TcpStream::connect(&addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let mut buf = [0u8; 8];
        let started = std::time::Instant::now();
        let error = conn.read(&mut buf).await.unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(150));

        // A byte at a time does not stretch the deadline for the preface.
        let mut trickle = TcpStream::connect(&addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        let started = std::time::Instant::now();
        let outcome = loop {
            tokio::io::AsyncWriteExt::write_all(&mut trickle, b"x").await.unwrap();
            match tokio::time::timeout(Duration::from_millis(100), conn.read(&mut buf)).await {
                Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                Ok(Err(error)) => break error,
                Err(_) => {}
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the trickle was never cut off"
            );
        };
        assert_eq!(outcome.kind(), std::io::ErrorKind::TimedOut);

        let mut talker = TcpStream::connect(&addr).await.unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut talker, &[b'P'; PREFACE_BYTES])
            .await
            .unwrap();
        let mut preface = [0u8; PREFACE_BYTES];
        conn.read_exact(&mut preface).await.unwrap();
        for _ in 0..4 {
            // Each write lands within the idle timeout: reads keep working.
            tokio::time::sleep(Duration::from_millis(150)).await;
            tokio::io::AsyncWriteExt::write_all(&mut talker, b"x").await.unwrap();
            assert_eq!(conn.read(&mut buf).await.unwrap(), 1);
        }
        // Then silence: the read fails once the idle timeout (1 s) passes
        // since the last byte, not before.
        let silent_since = std::time::Instant::now();
        let error = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("a silent connection is cut off")
            .unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            silent_since.elapsed() >= Duration::from_millis(800),
            "{:?}",
            silent_since.elapsed()
        );
    }
}

//! The two calls of etcd's v3 KV API that `bench --etcd` needs, so the
//! yardstick is driven by the same closed loop, on the same tonic stack,
//! as raftify-host itself (`host/benches/vs_etcd.sh`). The messages are
//! etcd's (`etcdserverpb` in etcd's `rpc.proto`), written out for just the
//! fields used; prost skips the rest of a response.

use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    /// Served by the member from its own state, without a quorum round
    /// (a stale read); false is etcd's linearizable read.
    #[prost(bool, tag = "7")]
    serializable: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeResponse {}

/// One connection to an etcd member's client port; cheap to clone (the
/// clones share it).
#[derive(Clone)]
pub struct Kv {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl Kv {
    pub async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Kv> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect()
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach etcd at {addr}: {e}"))?;
        Ok(Kv {
            grpc: tonic::client::Grpc::new(channel),
        })
    }

    pub async fn put(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), tonic::Status> {
        self.call::<_, PutResponse>("/etcdserverpb.KV/Put", PutRequest { key, value })
            .await
    }

    pub async fn get(&mut self, key: Vec<u8>, linearizable: bool) -> Result<(), tonic::Status> {
        let request = RangeRequest {
            key,
            serializable: !linearizable,
        };
        self.call::<_, RangeResponse>("/etcdserverpb.KV/Range", request).await
    }

    async fn call<Q, A>(&mut self, path: &'static str, request: Q) -> Result<(), tonic::Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        A: prost::Message + Default + Send + Sync + 'static,
    {
        self.grpc
            .ready()
            .await
            .map_err(|e| tonic::Status::unavailable(format!("etcd is not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Q, A>::default();
        self.grpc
            .unary(tonic::Request::new(request), PathAndQuery::from_static(path), codec)
            .await
            .map(drop)
    }
}

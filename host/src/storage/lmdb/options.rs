//! How a store is opened.

/// How the store is opened: `run`'s flags of that heading, the same names
/// in a `--config` file, and `RAFTIFY_*` variables.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, serde::Serialize, serde::Deserialize)]
#[command(next_help_heading = "Storage")]
#[serde(default)]
pub struct LmdbOptions {
    /// The largest the LMDB file may grow, in bytes. LMDB maps it into the
    /// address space but only uses disk for what is written.
    #[arg(
        long = "lmdb-map-size-bytes",
        id = "lmdb_map_size_bytes",
        env = "RAFTIFY_LMDB_MAP_SIZE_BYTES",
        default_value_t = LmdbOptions::DEFAULT.map_size_bytes
    )]
    #[serde(rename = "lmdb_map_size_bytes")]
    pub map_size_bytes: usize,
    /// Do not fsync LMDB commits. UNSAFE: a power loss or kernel crash loses
    /// writes that were acknowledged. For tests and benchmarks only.
    #[arg(long, env = "RAFTIFY_UNSAFE_NO_FSYNC")]
    pub unsafe_no_fsync: bool,
}

impl LmdbOptions {
    pub const DEFAULT: LmdbOptions = LmdbOptions {
        map_size_bytes: 16 << 30,
        unsafe_no_fsync: false,
    };
}

impl Default for LmdbOptions {
    fn default() -> Self {
        LmdbOptions::DEFAULT
    }
}

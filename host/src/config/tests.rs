//! Flags, variables and the file: precedence, names and errors.

use super::*;

#[test]
fn peers_parse_and_bad_peers_are_named() {
    let peers = parse_peers("1=127.0.0.1:7001, 2=localhost:7002").unwrap();
    assert_eq!(peers[&2], "localhost:7002");
    for bad in [
        "1",
        "x=127.0.0.1:1",
        "0=127.0.0.1:1",
        "1=nohost",
        "1=h:99999",
        "1=h:0",
        "1=[::1]:1:2",
        "1=evil host:1",
        "1=evil\nhost:1",
        "1=-bad-:1",
        "1=999.1.1.1:1",
        "1=a:1,1=b:2",
        "",
    ] {
        assert!(parse_peers(bad).is_err(), "{bad:?} should be rejected");
    }
}

fn write_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("node.toml");
    std::fs::write(&file, text).unwrap();
    let file = file.to_str().unwrap().to_string();
    (dir, file)
}

#[test]
fn flags_win_over_the_file_and_defaults_fill_the_rest() {
    let (_dir, file) = write_file(
        "election_ticks = 20\nheartbeat_ticks = 4\nlisten = \"127.0.0.1:9000\"\n\
         snapshot_every_entries = 5\ncompile_cache_dir = \"/tmp/cache\"\nquota_bytes = 2097152\n\
         peers = \"1=127.0.0.1:9001\"\nid = 1\nunsafe_no_fsync = true\n",
    );
    let config = RunArgs::parse_from([
        "--config",
        &file,
        "--listen",
        "127.0.0.1:9001",
        "--heartbeat-ticks",
        "3",
    ])
    .unwrap()
    .resolve()
    .unwrap();
    assert_eq!(config.listen, "127.0.0.1:9001", "a flag wins over the file");
    assert_eq!(config.raft.heartbeat_ticks, 3);
    assert_eq!(config.raft.election_ticks, 20, "the file wins over a default");
    assert_eq!(config.raft.tick_interval_ms, 100, "and the defaults fill the rest");
    assert_eq!(config.snapshot.every_entries, 5);
    assert_eq!(config.sandbox.cache_dir, Some(PathBuf::from("/tmp/cache")));
    assert_eq!(config.space.quota_bytes, Some(2 << 20));
    assert_eq!(config.peers[&1], "127.0.0.1:9001");
    assert!(config.lmdb.unsafe_no_fsync);
    assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
}

#[test]
fn a_flag_given_at_its_default_value_still_wins_over_the_file() {
    let (_dir, file) = write_file("election_ticks = 20\n");
    let config = RunArgs::parse_from(["--config", &file, "--election-ticks", "10"])
        .unwrap()
        .resolve()
        .unwrap();
    assert_eq!(config.raft.election_ticks, 10);
}

#[test]
fn without_a_file_the_defaults_are_the_layers_defaults() {
    let config = RunArgs::parse_from(std::iter::empty::<String>())
        .unwrap()
        .resolve()
        .unwrap();
    let plain = NodeConfig::new(DEFAULT_ADDR, DEFAULT_DATA_DIR).unwrap();
    assert_eq!(config.raft, RaftConfig::default());
    assert_eq!(config.client, ClientConfig::default());
    assert_eq!(config.snapshot, SnapshotConfig::default());
    assert_eq!(config.connections, ConnectionConfig::default());
    assert_eq!(config.transport, TransportConfig::default());
    assert_eq!(config.lmdb, LmdbOptions::default());
    assert_eq!(config.sandbox, plain.sandbox);
    assert_eq!(
        config.sandbox.cache_dir,
        Some(Path::new(DEFAULT_DATA_DIR).join("compiled"))
    );
    // The defaults the README documents.
    assert_eq!(config.listen, "127.0.0.1:7070");
    assert_eq!(
        (
            config.snapshot.every_entries,
            config.snapshot.log_percent,
            config.snapshot.keep_entries
        ),
        (100_000, 25, 1_000)
    );
    assert_eq!(config.client.max_plugin_bytes, 48 << 20);
    assert_eq!(config.connections.max_connections, 512);
    assert_eq!(config.connections.idle_timeout_secs, 60);
    assert_eq!(config.connections.handshake_timeout_ms, 10_000);
    assert_eq!((config.raft.tick_interval_ms, config.raft.election_ticks), (100, 10));
}

/// One name per setting: the flag, the variable and the file's key are
/// the same words, and every flag but `--config` and `--log-format` can
/// be written in the file.
#[test]
fn every_setting_has_one_name_as_flag_variable_and_file_key() {
    let command = RunCommand::command();
    let mut ids = BTreeSet::new();
    for arg in command.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" {
            continue;
        }
        assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()), "{id}");
        let env = arg.get_env().and_then(|e| e.to_str()).map(str::to_string);
        assert_eq!(env, Some(format!("RAFTIFY_{}", id.to_uppercase())), "{id}");
        ids.insert(id.to_string());
    }
    let keys: BTreeSet<String> = toml::Table::try_from(RunSettings::default())
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let unset_by_default: BTreeSet<String> = [
        "id",
        "metrics_listen",
        "plugin",
        "peers",
        "join",
        "tls_ca",
        "tls_cert",
        "tls_key",
        "auth_file",
        "token",
        "compile_cache_dir",
        "quota_bytes",
        "min_free_bytes",
    ]
    .into_iter()
    .chain(NOT_IN_FILE)
    .map(str::to_string)
    .collect();
    assert_eq!(
        ids.difference(&keys).cloned().collect::<BTreeSet<_>>(),
        unset_by_default
    );
    assert!(
        keys.is_subset(&ids),
        "file keys that are no flag: {:?}",
        keys.difference(&ids)
    );
}

#[test]
fn bad_settings_get_clear_errors() {
    let error = |file: &str, flags: &[&str]| {
        let (_dir, path) = write_file(file);
        let argv = ["--config", path.as_str()].into_iter().chain(flags.iter().copied());
        match RunArgs::parse_from(argv) {
            Ok(args) => args.resolve().unwrap_err().to_string(),
            Err(error) => error.to_string(),
        }
    };
    let cases: [(&str, &[&str], &str); 7] = [
        ("no_such_setting = 1\n", &[], "unknown setting `no_such_setting`"),
        (
            "log_format = \"json\"\n",
            &[],
            "`log_format` can only be given as a flag",
        ),
        ("election_ticks = \"many\"\n", &[], "`election_ticks`"),
        ("[raft]\nelection_ticks = 3\n", &[], "unknown setting `raft`"),
        (
            "",
            &["--election-ticks", "2", "--heartbeat-ticks", "2"],
            "election_ticks",
        ),
        ("", &["--id", "3", "--peers", "1=127.0.0.1:1,2=127.0.0.1:2"], "--id 3"),
        ("", &["--max-backoff-ms", "10"], "max_backoff_ms (10)"),
    ];
    for (file, flags, expected) in cases {
        let message = error(file, flags);
        assert!(message.contains(expected), "{file:?} {flags:?}: {message}");
    }
    let message = RunArgs::parse_from(["--election-ticks", "x"]).unwrap_err().to_string();
    assert!(message.contains("--election-ticks"), "{message}");
    let (_dir, path) = write_file("election_ticks = [");
    let message = RunArgs::parse_from(["--config", &path])
        .unwrap()
        .resolve()
        .unwrap_err()
        .to_string();
    assert!(message.contains("bad config file"), "{message}");
}

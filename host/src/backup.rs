//! Backups, as `etcdctl snapshot save` and `etcdutl snapshot restore`:
//! `snapshot save` writes a running node's snapshot, with the plugin that
//! made it, to one file; `snapshot restore` makes the first data dir of a
//! new cluster from it; `debug snapshot` describes one.
//!
//! ```text
//! magic      4 bytes            "RBK1"
//! meta_len   u32 LE
//! meta       bincode            BackupMeta
//! plugin     meta.plugin_bytes  the component (SHA-256: meta.plugin_sha256)
//! data       meta.data_bytes    the raft snapshot's data (see snapshot.rs)
//! checksum   32 bytes           SHA-256 of everything before it
//! ```
//!
//! A file is trusted only once all of it was read and its checksum, sizes,
//! plugin hash and snapshot header agree; `restore` writes nothing before.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::plugin_id::PluginId;
use crate::snapshot::{self, SnapshotHeader};
use crate::storage::{PluginRegistry, SnapshotSource};

const MAGIC: &[u8; 4] = b"RBK1";
/// The most bytes a file's metadata may declare (its member lists).
const MAX_META_BYTES: u32 = 1 << 20;
const CHECKSUM_BYTES: u64 = 32;
/// The largest plugin a backup may carry (it is read into memory whole).
const MAX_PLUGIN_BYTES: u64 = 1 << 30;
/// How much of the file is read at a time.
const BUFFER_BYTES: usize = 1 << 20;

/// What a backup holds besides the bytes: where and when it was taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMeta {
    /// The snapshot's raft index and term.
    pub index: u64,
    pub term: u64,
    /// The cluster's voters and learners at that index.
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// The cluster and the node the backup was taken from.
    pub cluster_id: u64,
    pub node_id: u64,
    /// When, by the taking node's clock (seconds since the Unix epoch).
    pub taken_unix_secs: u64,
    pub plugin_sha256: [u8; 32],
    pub plugin_bytes: u64,
    pub data_bytes: u64,
}

impl BackupMeta {
    /// The size of the whole file.
    pub fn file_bytes(&self) -> Option<u64> {
        let meta = bincode::serde::encode_to_vec(self, bincode::config::standard())
            .ok()?
            .len() as u64;
        (8 + meta + CHECKSUM_BYTES)
            .checked_add(self.plugin_bytes)?
            .checked_add(self.data_bytes)
    }
}

/// Makes a backup file's bytes as they are streamed: the caller passes
/// the plugin's bytes and then the data's through [`Encoder::body`], in
/// order, and ends with [`Encoder::end`].
pub struct Encoder {
    hash: Sha256,
    expected: u64,
    passed: u64,
}

impl Encoder {
    /// The encoder and the file's first bytes (magic and metadata).
    pub fn begin(meta: &BackupMeta) -> (Encoder, Vec<u8>) {
        let body =
            bincode::serde::encode_to_vec(meta, bincode::config::standard()).expect("bincode encodes a plain struct");
        let mut head = Vec::with_capacity(8 + body.len());
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&(body.len() as u32).to_le_bytes());
        head.extend_from_slice(&body);
        let mut hash = Sha256::new();
        hash.update(&head);
        let encoder = Encoder {
            hash,
            expected: meta.plugin_bytes + meta.data_bytes,
            passed: 0,
        };
        (encoder, head)
    }

    /// Bytes of the plugin or the data, which the caller writes as they are.
    pub fn body(&mut self, bytes: &[u8]) {
        self.hash.update(bytes);
        self.passed += bytes.len() as u64;
    }

    /// The checksum that ends the file, or an error if the bytes passed
    /// are not as many as the metadata declared (the snapshot changed
    /// while it was read).
    pub fn end(self) -> anyhow::Result<[u8; 32]> {
        if self.passed != self.expected {
            bail!(
                "the backup's body is {} bytes, not the {} its metadata declares",
                self.passed,
                self.expected
            );
        }
        Ok(self.hash.finalize().into())
    }
}

/// Stream the store's snapshot as a backup file's bytes to `send`, in
/// pieces of at most `piece_bytes`, the first with the file's whole size
/// (`send` answers false once the receiver is gone). The data is read in
/// one consistent view of the store, a piece at a time.
pub fn stream(
    source: &dyn SnapshotSource,
    plugins: &dyn PluginRegistry,
    taken_by: (u64, u64),
    piece_bytes: usize,
    send: &mut dyn FnMut(Vec<u8>, u64) -> bool,
) -> anyhow::Result<()> {
    use std::ops::ControlFlow;
    let (index, data_bytes) = source.index_and_len()?.context("this node has no snapshot")?;
    // The header names the plugin, which goes first in the file.
    let mut reader = snapshot::Reader::default();
    let mut first = None;
    source.read(&mut |metadata, piece| {
        if first.is_none() {
            first = Some((metadata.clone(), None));
        }
        match reader.push(piece) {
            Ok(snapshot::Step::More) => ControlFlow::Continue(()),
            Ok(snapshot::Step::Header(header, _)) => {
                first = Some((metadata.clone(), Some(Ok(header))));
                ControlFlow::Break(())
            }
            Ok(snapshot::Step::State(_)) => ControlFlow::Break(()),
            Err(error) => {
                first = Some((metadata.clone(), Some(Err(error))));
                ControlFlow::Break(())
            }
        }
    })?;
    let (metadata, header) = first.context("this node has no snapshot")?;
    let header = header.context("the stored snapshot has no complete header")??;
    if metadata.index != index {
        bail!("a newer snapshot was stored meanwhile: try again");
    }
    let wasm = plugins.blob(&header.plugin_sha256)?.with_context(|| {
        format!(
            "the snapshot's plugin {} is not stored",
            hex::encode(header.plugin_sha256)
        )
    })?;
    let conf = metadata.get_conf_state();
    let meta = BackupMeta {
        index,
        term: metadata.term,
        voters: conf.voters.clone(),
        learners: conf.learners.clone(),
        cluster_id: taken_by.0,
        node_id: taken_by.1,
        taken_unix_secs: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        plugin_sha256: header.plugin_sha256,
        plugin_bytes: wasm.len() as u64,
        data_bytes,
    };
    let total = meta.file_bytes().context("the backup would be too large")?;
    let (mut encoder, head) = Encoder::begin(&meta);
    if !send(head, total) {
        return Ok(());
    }
    for piece in wasm.chunks(piece_bytes) {
        encoder.body(piece);
        if !send(piece.to_vec(), 0) {
            return Ok(());
        }
    }
    let (mut gone, mut replaced) = (false, false);
    source.read(&mut |metadata, data| {
        if metadata.index != index {
            replaced = true;
            return ControlFlow::Break(());
        }
        for piece in data.chunks(piece_bytes) {
            encoder.body(piece);
            if !send(piece.to_vec(), 0) {
                gone = true;
                return ControlFlow::Break(());
            }
        }
        ControlFlow::Continue(())
    })?;
    if gone {
        return Ok(());
    }
    if replaced {
        bail!("a newer snapshot was stored while this one was sent: try again");
    }
    send(encoder.end()?.to_vec(), 0);
    Ok(())
}

/// A backup file whose every byte was checked.
#[derive(Debug)]
pub struct Backup {
    pub path: PathBuf,
    pub meta: BackupMeta,
    /// The header of the snapshot's data.
    pub header: SnapshotHeader,
    /// Where the plugin starts in the file.
    plugin_offset: u64,
    /// Where the plugin's state starts (after the snapshot's header).
    state_offset: u64,
}

impl Backup {
    /// Read the whole file at `path` and check it.
    pub fn open(path: &Path) -> anyhow::Result<Backup> {
        let name = path.display();
        let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {name}"))?;
        let file_len = file.metadata().with_context(|| format!("cannot read {name}"))?.len();
        let not_backup = |why: String| anyhow::anyhow!("{name} is not a raftify-host backup: {why}");
        let mut head = [0u8; 8];
        file.read_exact(&mut head)
            .map_err(|_| not_backup(format!("it is only {file_len} bytes")))?;
        if &head[..4] != MAGIC {
            return Err(not_backup("it does not start with \"RBK1\"".into()));
        }
        let meta_len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
        if meta_len > MAX_META_BYTES || u64::from(meta_len) + 8 > file_len {
            return Err(not_backup(format!("it declares {meta_len} bytes of metadata")));
        }
        let mut meta_bytes = vec![0u8; meta_len as usize];
        file.read_exact(&mut meta_bytes)
            .map_err(|e| not_backup(format!("cannot read its metadata: {e}")))?;
        let limit = bincode::config::standard().with_limit::<{ MAX_META_BYTES as usize }>();
        let (meta, used): (BackupMeta, usize) = bincode::serde::decode_from_slice(&meta_bytes, limit)
            .map_err(|e| not_backup(format!("its metadata does not decode: {e}")))?;
        if used != meta_bytes.len() {
            return Err(not_backup("its metadata has trailing bytes".into()));
        }
        if meta.plugin_bytes > MAX_PLUGIN_BYTES {
            return Err(not_backup(format!(
                "it declares a plugin of {} bytes",
                meta.plugin_bytes
            )));
        }
        let plugin_offset = 8 + u64::from(meta_len);
        let expected = plugin_offset
            .checked_add(meta.plugin_bytes)
            .and_then(|n| n.checked_add(meta.data_bytes))
            .and_then(|n| n.checked_add(CHECKSUM_BYTES));
        if expected != Some(file_len) {
            bail!(
                "{name} is {file_len} bytes, but its metadata declares {} (a truncated or damaged backup)",
                expected.map_or("more than 2^64".to_string(), |n| n.to_string())
            );
        }

        // Every byte, through the checksum; the plugin's own hash and the
        // snapshot's header on the way.
        let mut whole = Sha256::new();
        whole.update(head);
        whole.update(&meta_bytes);
        let mut plugin_hash = Sha256::new();
        let mut reader = snapshot::Reader::default();
        let mut header = None;
        let mut buffer = vec![0u8; BUFFER_BYTES];
        let mut at = plugin_offset;
        let data_offset = plugin_offset + meta.plugin_bytes;
        let body_end = data_offset + meta.data_bytes;
        while at < body_end {
            let want = ((body_end - at) as usize).min(buffer.len());
            file.read_exact(&mut buffer[..want])
                .with_context(|| format!("cannot read {name}"))?;
            let mut piece = &buffer[..want];
            whole.update(piece);
            if at < data_offset {
                let plugin_part = ((data_offset - at) as usize).min(piece.len());
                plugin_hash.update(&piece[..plugin_part]);
                at += plugin_part as u64;
                piece = &piece[plugin_part..];
            }
            if !piece.is_empty() && header.is_none() {
                match reader.push(piece) {
                    Ok(snapshot::Step::Header(h, _)) => header = Some(h),
                    Ok(_) => {}
                    Err(e) => return Err(not_backup(format!("its snapshot data is malformed: {e}"))),
                }
            }
            at += piece.len() as u64;
        }
        let mut checksum = [0u8; 32];
        file.read_exact(&mut checksum)
            .with_context(|| format!("cannot read {name}"))?;
        if whole.finalize()[..] != checksum {
            bail!("{name} is damaged: its SHA-256 checksum does not match its contents");
        }
        if plugin_hash.finalize()[..] != meta.plugin_sha256 {
            bail!("{name} is damaged: its plugin's bytes do not match the plugin's SHA-256");
        }
        let header = header.ok_or_else(|| not_backup("its snapshot data has no complete header".into()))?;
        if header.plugin_sha256 != meta.plugin_sha256 {
            bail!(
                "{name} is inconsistent: its snapshot was made by plugin {}, but it carries plugin {}",
                hex::encode(header.plugin_sha256),
                hex::encode(meta.plugin_sha256)
            );
        }
        let header_len = reader.header_len() as u64;
        Ok(Backup {
            path: path.to_path_buf(),
            state_offset: data_offset + header_len,
            plugin_offset,
            header,
            meta,
        })
    }

    /// The plugin's bytes, checked again against its hash (the file may
    /// have changed since it was opened).
    pub fn plugin(&self) -> anyhow::Result<Vec<u8>> {
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.plugin_offset))?;
        let mut wasm = vec![0u8; self.meta.plugin_bytes as usize];
        file.read_exact(&mut wasm)?;
        if !PluginId(self.meta.plugin_sha256).matches(&wasm) {
            bail!("{} changed while it was read", self.path.display());
        }
        Ok(wasm)
    }

    /// The plugin state's size, in bytes.
    pub fn state_bytes(&self) -> u64 {
        self.plugin_offset + self.meta.plugin_bytes + self.meta.data_bytes - self.state_offset
    }

    /// Copy the plugin's state to `out`, returning its SHA-256.
    fn copy_state(&self, out: &mut impl Write) -> anyhow::Result<[u8; 32]> {
        let mut file = std::fs::File::open(&self.path)?;
        file.seek(SeekFrom::Start(self.state_offset))?;
        let mut left = self.state_bytes();
        let mut hash = Sha256::new();
        let mut buffer = vec![0u8; BUFFER_BYTES];
        while left > 0 {
            let want = (left as usize).min(buffer.len());
            file.read_exact(&mut buffer[..want])?;
            hash.update(&buffer[..want]);
            out.write_all(&buffer[..want])?;
            left -= want as u64;
        }
        Ok(hash.finalize().into())
    }

    /// The SHA-256 of the plugin's state (read again from the file).
    fn state_sha256(&self) -> anyhow::Result<[u8; 32]> {
        self.copy_state(&mut std::io::sink())
    }
}

/// Describe a checked backup, for `debug snapshot` (and `-o json`).
pub fn describe(backup: &Backup) -> serde_json::Value {
    let meta = &backup.meta;
    serde_json::json!({
        "file": backup.path.display().to_string(),
        "file_bytes": meta.file_bytes(),
        "index": meta.index,
        "term": meta.term,
        "voters": meta.voters,
        "learners": meta.learners,
        "cluster_id": format!("{:016x}", meta.cluster_id),
        "taken_from_node": meta.node_id,
        "taken_unix_secs": meta.taken_unix_secs,
        "plugin_sha256": hex::encode(meta.plugin_sha256),
        "plugin_bytes": meta.plugin_bytes,
        "state_bytes": backup.state_bytes(),
        "members": backup.header.members.iter().map(|(id, addr)| serde_json::json!({"id": id, "addr": addr})).collect::<Vec<_>>(),
        "limits": backup.header.limits.as_ref().map(|l| serde_json::to_value(l).unwrap_or_default()),
        "checksum": "ok",
    })
}

/// What `restore` made.
#[derive(Debug)]
pub struct Restored {
    pub index: u64,
    pub term: u64,
    pub cluster_id: u64,
    pub state_bytes: u64,
}

/// Make a data dir at `dir` for node `id` at `listen`, the only member of
/// a new cluster, holding the backup's state and plugin. The dir must not
/// hold a node already. Everything is built beside it and moved into place
/// at the end, so a failure (or a crash) leaves no half-made data dir.
pub fn restore(
    backup: &Backup,
    dir: &Path,
    id: u64,
    listen: &str,
    sandbox: &crate::sandbox::Sandbox,
    lmdb: &crate::storage::lmdb::LmdbOptions,
) -> anyhow::Result<Restored> {
    use raft::prelude::{HardState, SnapshotMetadata};

    use crate::storage::{LogStore, NodeIdentity};

    if id == 0 {
        bail!("--id must be at least 1");
    }
    crate::dial::check_addr(listen).map_err(|e| anyhow::anyhow!("--listen: {e}"))?;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: restore makes a new data dir, and never overwrites one",
            dir.display()
        );
    }
    let wasm = backup.plugin()?;
    sandbox
        .load(&wasm)
        .context("the backup's plugin does not load here (see `plugin check`)")?;

    let name = dir
        .file_name()
        .with_context(|| format!("{} has no file name", dir.display()))?
        .to_string_lossy();
    let building = dir.with_file_name(format!(".{name}.restoring"));
    if building.exists() {
        // A restore that stopped half way: start again.
        std::fs::remove_dir_all(&building).with_context(|| format!("cannot remove {}", building.display()))?;
    }
    std::fs::create_dir_all(&building).with_context(|| format!("cannot create {}", building.display()))?;
    let made = (|| -> anyhow::Result<Restored> {
        // The snapshot's data, now naming only the new member.
        let header = SnapshotHeader {
            plugin_sha256: backup.meta.plugin_sha256,
            members: vec![(id, listen.to_string())],
            alarms: Vec::new(),
            limits: backup.header.limits,
            sessions: backup.header.sessions.clone(),
        };
        let data_path = building.join("restored-snapshot");
        let mut data = std::io::BufWriter::new(std::fs::File::create(&data_path)?);
        data.write_all(&snapshot::encode_header(&header))?;
        let copied = backup.copy_state(&mut data)?;
        data.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        if copied != backup.state_sha256()? {
            bail!("{} changed while it was read", backup.path.display());
        }

        let store = crate::storage::lmdb::LmdbStore::open(&building.join("lmdb"), lmdb)?;
        store.activate_plugin(0, &backup.meta.plugin_sha256, &wasm)?;
        let mut metadata = SnapshotMetadata {
            index: backup.meta.index,
            term: backup.meta.term,
            ..Default::default()
        };
        metadata.set_conf_state(crate::storage::initial_conf_state(vec![id]));
        let hard_state = HardState {
            term: backup.meta.term,
            commit: backup.meta.index,
            vote: 0,
            ..Default::default()
        };
        store.install_snapshot_file(&data_path, &metadata, &hard_state)?;
        let members = vec![(id, listen.to_string())];
        let cluster_id = crate::storage::new_cluster_id(&members);
        store.set_identity(&NodeIdentity {
            id,
            members,
            max_id: id,
            cluster_id,
        })?;
        drop(store);
        std::fs::remove_file(&data_path)?;
        Ok(Restored {
            index: backup.meta.index,
            term: backup.meta.term,
            cluster_id,
            state_bytes: backup.state_bytes(),
        })
    })();
    let restored = match made {
        Ok(restored) => restored,
        Err(error) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(error);
        }
    };
    if dir.exists() {
        // Empty (checked above): the rename needs it gone.
        std::fs::remove_dir(dir).with_context(|| format!("cannot replace {}", dir.display()))?;
    }
    std::fs::rename(&building, dir)
        .with_context(|| format!("cannot move {} to {}", building.display(), dir.display()))?;
    if let Some(parent) = dir.parent()
        && let Ok(parent) = std::fs::File::open(if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        })
    {
        let _ = parent.sync_all();
    }
    Ok(restored)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_backup(path: &Path, plugin: &[u8], state: &[u8]) -> BackupMeta {
        let header = SnapshotHeader {
            plugin_sha256: Sha256::digest(plugin).into(),
            members: vec![(1, "127.0.0.1:1".into()), (2, "127.0.0.1:2".into())],
            alarms: vec![2],
            limits: None,
            sessions: Default::default(),
        };
        let data = snapshot::encode(&header, state);
        let meta = BackupMeta {
            index: 42,
            term: 3,
            voters: vec![1, 2],
            learners: vec![],
            cluster_id: 7,
            node_id: 1,
            taken_unix_secs: 0,
            plugin_sha256: header.plugin_sha256,
            plugin_bytes: plugin.len() as u64,
            data_bytes: data.len() as u64,
        };
        let (mut encoder, head) = Encoder::begin(&meta);
        let mut file = head;
        // In odd pieces, as a stream would bring them.
        for piece in plugin.chunks(7).chain(data.chunks(1000)) {
            encoder.body(piece);
            file.extend_from_slice(piece);
        }
        file.extend_from_slice(&encoder.end().unwrap());
        assert_eq!(meta.file_bytes(), Some(file.len() as u64));
        std::fs::write(path, file).unwrap();
        meta
    }

    #[test]
    fn a_backup_reads_back_with_its_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.rbk");
        let state: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let meta = write_backup(&path, b"not really wasm", &state);
        let backup = Backup::open(&path).unwrap();
        assert_eq!(backup.meta, meta);
        assert_eq!(backup.header.members.len(), 2);
        assert_eq!(backup.plugin().unwrap(), b"not really wasm");
        assert_eq!(backup.state_bytes(), state.len() as u64);
        let mut copy = Vec::new();
        backup.copy_state(&mut copy).unwrap();
        assert_eq!(copy, state);
    }

    #[test]
    fn a_damaged_or_truncated_backup_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.rbk");
        write_backup(&path, b"plugin", &vec![5u8; 100_000]);
        let good = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], expected: &str| {
            std::fs::write(&path, bytes).unwrap();
            let err = format!("{:#}", Backup::open(&path).unwrap_err());
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        };
        check(&good[..good.len() - 1], "truncated");
        check(&good[..3], "only 3 bytes");
        check(b"RSN3 something else entirely", "does not start with");
        let mut flipped = good.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 1;
        check(&flipped, "checksum does not match");
        let mut longer = good.clone();
        longer.push(0);
        check(&longer, "truncated or damaged");
        let mut huge = good.clone();
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        check(&huge, "metadata");
    }

    #[test]
    fn an_encoder_fed_fewer_bytes_than_declared_fails() {
        let meta = BackupMeta {
            index: 1,
            term: 1,
            voters: vec![1],
            learners: vec![],
            cluster_id: 1,
            node_id: 1,
            taken_unix_secs: 0,
            plugin_sha256: [0; 32],
            plugin_bytes: 10,
            data_bytes: 10,
        };
        let (mut encoder, _) = Encoder::begin(&meta);
        encoder.body(&[0; 19]);
        assert!(encoder.end().unwrap_err().to_string().contains("19 bytes"));
    }
}

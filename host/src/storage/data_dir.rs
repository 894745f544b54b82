//! The data dir as a whole: one process at a time (its `LOCK`), and
//! offline compaction of the LMDB store in it (`defrag`).

use std::path::Path;

use heed::EnvOpenOptions;

use super::StoreError;

/// What `defrag` did.
#[derive(Debug, Clone, Copy)]
pub struct DefragReport {
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub elapsed: std::time::Duration,
}

/// One process per data dir: an exclusive lock on `DATA_DIR/LOCK`, held
/// while the node runs and released by the kernel when the process ends,
/// however it ends. LMDB's own lock file lets several processes share one
/// environment, which two nodes must never do.
pub fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create the data dir {}", dir.display()))?;
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the data dir {} is in use by another raftify-host process (it holds {}); one process per data dir",
            dir.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Compact the store of a node that is not running, in place: LMDB's
/// compacting copy (only pages in use, in order) to a file beside the
/// original, synced, then renamed over it. A crash before the rename leaves
/// the original untouched (the copy is removed at the next defrag); after
/// it, the compacted store. The data dir's lock keeps a running node out.
pub fn defrag(data_dir: &Path) -> anyhow::Result<DefragReport> {
    use anyhow::Context as _;
    let started = std::time::Instant::now();
    let _lock = lock_data_dir(data_dir)?;
    let dir = data_dir.join("lmdb");
    let data = dir.join("data.mdb");
    let before_bytes = std::fs::metadata(&data)
        .with_context(|| format!("{} holds no store", data_dir.display()))?
        .len();
    let compact = dir.join("data.mdb.compact");
    let _ = std::fs::remove_file(&compact);
    {
        // SAFETY: as in `LmdbStore::open`; the lock keeps every other
        // process out, and this is the only open of it in this one.
        let env = unsafe {
            EnvOpenOptions::new()
                .map_size((before_bytes.max(1 << 20) as usize).saturating_mul(2))
                .max_dbs(8)
                .open(&dir)
        }
        .with_context(|| format!("cannot open the store in {}", dir.display()))?;
        let file = env
            .copy_to_path(&compact, heed::CompactionOption::Enabled)
            .map_err(StoreError::from)
            .context("the compacting copy failed")?;
        file.sync_all().context("cannot sync the compacted copy")?;
        env.prepare_for_closing().wait();
    }
    std::fs::rename(&compact, &data).context("cannot move the compacted copy into place")?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .context("cannot sync the store's directory")?;
    Ok(DefragReport {
        before_bytes,
        after_bytes: std::fs::metadata(&data)?.len(),
        elapsed: started.elapsed(),
    })
}

//! `snapshot save`, `snapshot restore` and `debug snapshot`: backups of a
//! running node, and new clusters made from them (see [`crate::backup`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::json;

use super::{ClientArgs, Output, connect};
use crate::backup::{self, Backup};

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Back up the node at --addr, as `etcdctl snapshot save`: it takes a
    /// snapshot now, and FILE gets that snapshot with the plugin that made
    /// it. The file is checked whole before it takes FILE's name.
    Save {
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make the data dir of a new cluster's first node from a backup, as
    /// `etcdutl snapshot restore`: start it with `run --data-dir DIR
    /// --listen ADDR`, then join more nodes with `run --join ADDR`. A
    /// damaged file is refused and nothing is written.
    Restore {
        file: PathBuf,
        /// The new data dir (must not exist, or be empty).
        #[arg(long)]
        data_dir: PathBuf,
        /// The new node's id.
        #[arg(long, default_value_t = 1)]
        id: u64,
        /// The HOST:PORT the new node will listen on.
        #[arg(long)]
        listen: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

pub(super) async fn run(action: SnapshotAction) -> anyhow::Result<i32> {
    match action {
        SnapshotAction::Save { file, client: args } => save(&file, &args).await,
        SnapshotAction::Restore {
            file,
            data_dir,
            id,
            listen,
            output,
        } => {
            let started = Instant::now();
            let (backup, restored) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let backup = Backup::open(&file)?;
                let sandbox = crate::sandbox::Sandbox::new(crate::sandbox::SandboxConfig::default())?;
                let options = crate::storage::lmdb::LmdbOptions::default();
                let restored = backup::restore(&backup, &data_dir, id, &listen, &sandbox, &options)
                    .with_context(|| format!("cannot restore into {}", data_dir.display()))?;
                Ok(((backup, data_dir, listen), restored))
            })
            .await??;
            let (backup, data_dir, listen) = backup;
            let seconds = started.elapsed().as_secs_f64();
            match output {
                Output::Text => {
                    println!(
                        "restored index {} (term {}, {} bytes of state, plugin {}) into {} in {seconds:.1} s",
                        restored.index,
                        restored.term,
                        restored.state_bytes,
                        &hex::encode(backup.meta.plugin_sha256)[..12],
                        data_dir.display()
                    );
                    println!(
                        "start it with: raftify-host run --data-dir {} --listen {listen}",
                        data_dir.display()
                    );
                }
                Output::Json => println!(
                    "{}",
                    json!({
                        "index": restored.index,
                        "term": restored.term,
                        "state_bytes": restored.state_bytes,
                        "cluster_id": format!("{:016x}", restored.cluster_id),
                        "data_dir": data_dir.display().to_string(),
                        "seconds": seconds,
                    })
                ),
            }
            Ok(0)
        }
    }
}

/// Describe a backup file, checking every byte of it.
pub(super) async fn describe(file: PathBuf, output: Output) -> anyhow::Result<i32> {
    let backup = tokio::task::spawn_blocking(move || Backup::open(&file)).await??;
    let value = backup::describe(&backup);
    match output {
        Output::Json => println!("{value}"),
        Output::Text => {
            let meta = &backup.meta;
            println!("file:            {}", backup.path.display());
            println!("checksum:        ok ({} bytes)", meta.file_bytes().unwrap_or(0));
            println!("index:           {} (term {})", meta.index, meta.term);
            println!(
                "taken from:      node {} of cluster {:016x}, at {} (Unix seconds)",
                meta.node_id, meta.cluster_id, meta.taken_unix_secs
            );
            println!("voters:          {:?}", meta.voters);
            if !meta.learners.is_empty() {
                println!("learners:        {:?}", meta.learners);
            }
            for (id, addr) in &backup.header.members {
                println!("member:          {id} at {addr}");
            }
            println!(
                "plugin:          {} ({} bytes)",
                hex::encode(meta.plugin_sha256),
                meta.plugin_bytes
            );
            println!("state:           {} bytes", backup.state_bytes());
        }
    }
    Ok(0)
}

async fn save(file: &Path, args: &ClientArgs) -> anyhow::Result<i32> {
    let name = file
        .file_name()
        .with_context(|| format!("{} is not a file name", file.display()))?
        .to_string_lossy()
        .into_owned();
    // Written beside FILE, checked, then renamed: FILE is whole or absent.
    let partial = file.with_file_name(format!(".{name}.partial"));
    let started = Instant::now();
    let result = async {
        let mut out = std::io::BufWriter::new(
            std::fs::File::create(&partial).with_context(|| format!("cannot create {}", partial.display()))?,
        );
        let mut client = connect(args).await?;
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bytes}/{total_bytes} {wide_bar} {bytes_per_sec}, {eta} left")
                .expect("a valid template"),
        );
        if args.output == Output::Json {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        let received = client
            .save_snapshot(|piece, total| {
                if total > 0 {
                    bar.set_length(total);
                }
                bar.inc(piece.len() as u64);
                out.write_all(piece)
            })
            .await?;
        bar.finish_and_clear();
        let out = out.into_inner().map_err(|e| e.into_error())?;
        out.sync_all()?;
        drop(out);
        let backup = tokio::task::spawn_blocking({
            let partial = partial.clone();
            move || Backup::open(&partial)
        })
        .await?
        .with_context(|| format!("the node sent {received} bytes that are not a whole backup"))?;
        std::fs::rename(&partial, file).with_context(|| format!("cannot move the backup to {}", file.display()))?;
        anyhow::Ok(backup)
    }
    .await;
    let backup = match result {
        Ok(backup) => backup,
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            return Err(error);
        }
    };
    let meta = &backup.meta;
    let seconds = started.elapsed().as_secs_f64();
    match args.output {
        Output::Text => println!(
            "saved the snapshot at index {} (term {}, {} bytes of state, plugin {}) to {} in {seconds:.1} s",
            meta.index,
            meta.term,
            backup.state_bytes(),
            &hex::encode(meta.plugin_sha256)[..12],
            file.display()
        ),
        Output::Json => {
            let mut value = backup::describe(&backup);
            value["file"] = json!(file.display().to_string());
            value["seconds"] = json!(seconds);
            println!("{value}");
        }
    }
    Ok(0)
}

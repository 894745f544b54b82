//! `propose`: one command, or a file of them over one stream; in a client
//! session by default, so what a fault left unanswered is sent again and
//! applied at most once.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;

use super::{ProposeArgs, connect, print, show_propose};
use crate::client::Client;
use crate::proto::{self, ProposeRequest, ProposeResponse};

pub(super) async fn propose(args: ProposeArgs) -> anyhow::Result<i32> {
    let mut client = connect(&args.client).await?;
    let Some(file) = &args.file else {
        let text = args.text.as_deref().unwrap_or_default();
        let response = if args.no_session {
            let mut client = client.without_sessions();
            if args.frees_space {
                client.propose_freeing(text).await?
            } else {
                client.propose_text(text).await?
            }
        } else {
            let mut session = client
                .open_session()
                .await
                .context("cannot open a session (nothing was proposed)")?;
            let retry_for = Duration::from_millis(args.retry_for_ms);
            let response = client.propose_in(&mut session, text, args.frees_space, retry_for).await;
            if session.retries() > 0 {
                eprintln!(
                    "retried {} times (session {}, sequence 1): applied at most once",
                    session.retries(),
                    session.id()
                );
            }
            response?
        };
        return Ok(if print(&show_propose(response), args.client.output) {
            0
        } else {
            1
        });
    };
    let lines = read_lines(file)?;
    if !args.no_session {
        return propose_lines_in_session(client, lines, &args).await;
    }
    // Make sure we talk to the leader before streaming, so the stream's
    // entries are not all refused by a follower.
    let status = client.status().await?;
    let mut raw = if status.leader_id != 0 && status.leader_id != status.id && !status.leader_addr.is_empty() {
        client.connect_to(&status.leader_addr).await?.raw()
    } else {
        client.raw()
    };
    let frees_space = args.frees_space;
    let requests = futures::stream::iter(lines.into_iter().map(move |line| ProposeRequest {
        command: Some(proto::propose_request::Command::Text(line)),
        frees_space,
        ..Default::default()
    }));
    let mut responses = raw
        .propose_stream(requests)
        .await
        .context("cannot start the proposal stream")?
        .into_inner();
    let mut failures = 0usize;
    let stdout = std::io::stdout();
    while let Some(response) = responses.next().await {
        let response = response.context("the proposal stream broke")?;
        if !print(&show_propose(response), args.client.output) {
            failures += 1;
        }
    }
    stdout.lock().flush()?;
    Ok(if failures == 0 { 0 } else { 1 })
}

/// `propose --file` in a session: line i is sequence i + 1. Lines whose
/// answer left the outcome unknown (the stream broke, the leader changed,
/// the node was busy) are sent again with their sequence numbers over a new
/// stream to the leader, until `--retry-for-ms` passes; results still print
/// in file order.
async fn propose_lines_in_session(mut client: Client, lines: Vec<String>, args: &ProposeArgs) -> anyhow::Result<i32> {
    use proto::propose_response::Outcome;
    let session = client
        .open_session()
        .await
        .context("cannot open a session (nothing was proposed)")?;
    // `--retry-for-ms` bounds how long the file goes without progress, not
    // how long it takes: a file that takes minutes to stream must still
    // outlast a leader change near its end.
    let retry_for = Duration::from_millis(args.retry_for_ms);
    let mut deadline = tokio::time::Instant::now() + retry_for;
    let mut answered = vec![false; lines.len()];
    let mut held: std::collections::BTreeMap<usize, ProposeResponse> = Default::default();
    let (mut next_print, mut failures, mut rounds) = (0usize, 0usize, 0u32);
    let mut backoff = Duration::from_millis(50);
    let mut print_ready = |held: &mut std::collections::BTreeMap<usize, ProposeResponse>, next: &mut usize| {
        while let Some(response) = held.remove(next) {
            if !print(&show_propose(response), args.client.output) {
                failures += 1;
            }
            *next += 1;
        }
    };
    loop {
        let pending: Vec<usize> = (0..lines.len()).filter(|i| !answered[*i]).collect();
        if pending.is_empty() {
            break;
        }
        rounds += 1;
        let mut last_error = String::new();
        // The leader, through whichever node answers.
        let raw = match client.status().await {
            Ok(status) if status.leader_id != 0 && status.leader_id != status.id && !status.leader_addr.is_empty() => {
                client.connect_to(&status.leader_addr).await.map(|c| c.raw())
            }
            Ok(_) => Ok(client.raw()),
            Err(error) => Err(error),
        };
        match raw {
            Err(error) => last_error = error.to_string(),
            Ok(mut raw) => {
                let frees_space = args.frees_space;
                let id = session.id();
                let requests: Vec<ProposeRequest> = pending
                    .iter()
                    .map(|i| ProposeRequest {
                        command: Some(proto::propose_request::Command::Text(lines[*i].clone())),
                        frees_space,
                        session_id: id,
                        sequence: *i as u64 + 1,
                    })
                    .collect();
                // No more in flight than a session keeps results for: a
                // command whose answer the stream lost is then still
                // answerable when it is sent again.
                let window = std::sync::Arc::new(tokio::sync::Semaphore::new(crate::sessions::MAX_KEPT_PER_SESSION));
                let (queue, queued) = tokio::sync::mpsc::channel(16);
                let feeder = tokio::spawn({
                    let window = window.clone();
                    async move {
                        for request in requests {
                            match window.acquire().await {
                                Ok(permit) => permit.forget(),
                                Err(_) => return,
                            }
                            if queue.send(request).await.is_err() {
                                return;
                            }
                        }
                    }
                });
                let stream = tokio_stream::wrappers::ReceiverStream::new(queued);
                match raw.propose_stream(stream).await {
                    Err(status) => last_error = status.message().to_string(),
                    Ok(responses) => {
                        let mut responses = responses.into_inner();
                        for i in &pending {
                            let response = responses.next().await;
                            window.add_permits(1);
                            match response {
                                None => break,
                                Some(Err(status)) => {
                                    last_error = format!("the proposal stream broke: {}", status.message());
                                    break;
                                }
                                Some(Ok(response)) => {
                                    if let Some(Outcome::HostError(error)) = &response.outcome
                                        && worth_sending_again(error)
                                    {
                                        last_error = error.message.clone();
                                        continue;
                                    }
                                    answered[*i] = true;
                                    held.insert(*i, response);
                                    print_ready(&mut held, &mut next_print);
                                }
                            }
                        }
                    }
                }
                feeder.abort();
            }
        }
        if answered.iter().all(|a| *a) {
            break;
        }
        if answered.iter().filter(|a| !**a).count() < pending.len() {
            deadline = tokio::time::Instant::now() + retry_for;
            backoff = Duration::from_millis(50);
        }
        if tokio::time::Instant::now() + backoff >= deadline {
            std::io::stdout().lock().flush()?;
            bail!(
                "{} of {} commands had no definite answer for --retry-for-ms ({} ms; last: {last_error}); \
                 sending them again in session {} cannot apply any twice",
                answered.iter().filter(|a| !**a).count(),
                lines.len(),
                args.retry_for_ms,
                session.id()
            );
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
        // Perhaps the node is gone: go on through another member.
        let members = session.members();
        if !members.is_empty() {
            let addr = members[rounds as usize % members.len()].clone();
            if let Ok(other) = client.connect_to(&addr).await {
                client = other;
            }
        }
    }
    if rounds > 1 {
        eprintln!(
            "sent some commands again ({} rounds, session {}): each applied at most once",
            rounds,
            session.id()
        );
    }
    std::io::stdout().lock().flush()?;
    Ok(if failures == 0 { 0 } else { 1 })
}

/// Whether a stream's host error leaves the outcome unknown or may pass,
/// so its command is sent again (in a session that is always safe).
fn worth_sending_again(error: &proto::HostError) -> bool {
    use tonic::Code;
    match Code::from(error.code) {
        Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated | Code::OutOfRange => false,
        Code::ResourceExhausted => !error.message.starts_with("no space"),
        _ => true,
    }
}

fn read_lines(file: &PathBuf) -> anyhow::Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        let opened = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        Box::new(std::io::BufReader::new(opened))
    };
    let mut lines = Vec::new();
    for line in reader.lines() {
        let line = line.with_context(|| format!("cannot read {}", file.display()))?;
        if !line.trim().is_empty() {
            lines.push(line);
        }
    }
    if lines.is_empty() {
        bail!("{} has no commands", file.display());
    }
    Ok(lines)
}

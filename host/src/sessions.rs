//! Client sessions, for exactly-once proposals (the Raft dissertation,
//! §6.3): a client opens a session (a replicated entry; the session's id
//! is that entry's index) and numbers its proposals 1, 2, 3, ...; every
//! replica, before calling the plugin, answers a sequence it already
//! applied with the result of its first apply. So a client that got "may
//! or may not have been committed" sends the same sequence again, and the
//! command takes effect once.
//!
//! The table is replicated state: every decision depends only on the log
//! (indexes, never a clock), it is part of every snapshot (outside the
//! plugin's bytes), and the limits below are constants, the same on every
//! replica.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::sandbox::CallError;

/// Sessions kept at once; opening one more drops the least recently used.
pub const MAX_SESSIONS: usize = 1024;
/// Results a session keeps: a client may have this many proposals in
/// flight and still retry any of them.
pub const MAX_KEPT_PER_SESSION: usize = 128;
/// Bytes of results a session keeps (a larger single result is kept as
/// its size only: a retry learns it was applied, not what it returned).
pub const MAX_KEPT_BYTES_PER_SESSION: usize = 64 << 10;
/// A session not used for this many log entries expires.
pub const EXPIRY_ENTRIES: u64 = 1_000_000;

/// Every session of the cluster, as of an index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sessions {
    sessions: BTreeMap<u64, Session>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Session {
    /// The index of the entry that last used it.
    last_used: u64,
    /// Sequences below this that are not kept were applied (or given up
    /// by the client): they are refused rather than applied again.
    floor: u64,
    kept: BTreeMap<u64, Kept>,
    kept_bytes: usize,
}

/// A result as kept for retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Kept {
    Ok(Vec<u8>),
    Guest(String),
    Trap(String),
    /// Applied; its result of this many bytes was too large to keep.
    TooLarge(u64),
    /// Applied; its result of this many bytes was dropped to keep the
    /// session within `MAX_KEPT_BYTES_PER_SESSION`.
    Dropped(u64),
}

impl Kept {
    fn bytes(&self) -> usize {
        match self {
            Kept::Ok(bytes) => bytes.len(),
            Kept::Guest(message) | Kept::Trap(message) => message.len(),
            Kept::TooLarge(_) | Kept::Dropped(_) => 0,
        }
    }
}

/// How the refusals of a session the table does not hold begin.
fn session_named(id: u64) -> String {
    format!("session {id}")
}

/// Whether a plugin-error `message` is the table's refusal of session `id`
/// as one it does not hold (unknown, expired or dropped): the client opens
/// a new one.
pub fn is_forgotten(message: &str, id: u64) -> bool {
    message
        .strip_prefix(&session_named(id))
        .is_some_and(|rest| rest.starts_with(" is unknown or has expired") || rest.starts_with(" expired: "))
}

/// What to do with a sequenced proposal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// New: apply it, then [`Sessions::record`] its result.
    Apply,
    /// Answer with this, without calling the plugin.
    Answer(Result<Vec<u8>, CallError>),
}

impl Sessions {
    /// Open a session at `index` (its id); first drop the sessions that
    /// expired, and if still full, the least recently used one.
    pub fn open(&mut self, index: u64) -> u64 {
        self.sessions
            .retain(|_, session| index.saturating_sub(session.last_used) <= EXPIRY_ENTRIES);
        if self.sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(id, session)| (session.last_used, **id))
                .map(|(id, _)| *id)
        {
            self.sessions.remove(&oldest);
        }
        self.sessions.insert(
            index,
            Session {
                last_used: index,
                floor: 1,
                kept: BTreeMap::new(),
                kept_bytes: 0,
            },
        );
        index
    }

    /// Decide on sequence `seq` of session `id`, arriving at `index`.
    pub fn decide(&mut self, index: u64, id: u64, seq: u64) -> Decision {
        let refuse = |message: String| Decision::Answer(Err(CallError::Guest(message)));
        if seq == 0 {
            return refuse("session sequence numbers start at 1".into());
        }
        let expired = match self.sessions.get(&id) {
            None => {
                return refuse(format!(
                    "{} is unknown or has expired (it may have applied this command): open a new session",
                    session_named(id)
                ));
            }
            Some(session) => index.saturating_sub(session.last_used) > EXPIRY_ENTRIES,
        };
        if expired {
            self.sessions.remove(&id);
            return refuse(format!(
                "{} expired: unused for more than {EXPIRY_ENTRIES} log entries (it may have applied this \
                 command): open a new session",
                session_named(id)
            ));
        }
        let session = self.sessions.get_mut(&id).expect("present");
        session.last_used = index;
        if let Some(kept) = session.kept.get(&seq) {
            return Decision::Answer(match kept {
                Kept::Ok(bytes) => Ok(bytes.clone()),
                Kept::Guest(message) => Err(CallError::Guest(message.clone())),
                Kept::Trap(message) => Err(CallError::Trap(message.clone())),
                Kept::TooLarge(len) => Err(CallError::Guest(format!(
                    "sequence {seq} of session {id} was applied; its result ({len} bytes) was too large to keep"
                ))),
                Kept::Dropped(len) => Err(CallError::Guest(format!(
                    "sequence {seq} of session {id} was applied; its result ({len} bytes) was dropped to keep the \
                     session within {MAX_KEPT_BYTES_PER_SESSION} bytes of results"
                ))),
            });
        }
        if seq < session.floor {
            return refuse(format!(
                "sequence {seq} of session {id} is older than the {MAX_KEPT_PER_SESSION} results a session keeps: \
                 it was applied, or is too far behind to tell"
            ));
        }
        Decision::Apply
    }

    /// Keep the result of sequence `seq` of session `id`, applied at
    /// `index`, dropping the oldest results past the limits.
    pub fn record(&mut self, index: u64, id: u64, seq: u64, result: &Result<Vec<u8>, CallError>) {
        let Some(session) = self.sessions.get_mut(&id) else {
            return;
        };
        session.last_used = index;
        let mut kept = match result {
            Ok(bytes) => Kept::Ok(bytes.clone()),
            Err(CallError::Guest(message)) => Kept::Guest(message.clone()),
            Err(CallError::Trap(message)) => Kept::Trap(message.clone()),
        };
        if kept.bytes() > MAX_KEPT_BYTES_PER_SESSION {
            kept = Kept::TooLarge(kept.bytes() as u64);
        }
        session.kept_bytes += kept.bytes();
        if let Some(old) = session.kept.insert(seq, kept) {
            session.kept_bytes -= old.bytes();
        }
        // Past the count, the oldest sequence goes (and is refused from
        // then on). Past the bytes, the oldest results go but their
        // sequences stay, answered "applied": a client keeps at most
        // `MAX_KEPT_PER_SESSION` in flight, so a sequence it still waits
        // on is never below the floor, whatever the results weigh.
        while session.kept.len() > MAX_KEPT_PER_SESSION {
            let Some((oldest, dropped)) = session.kept.pop_first() else {
                break;
            };
            session.kept_bytes -= dropped.bytes();
            session.floor = session.floor.max(oldest + 1);
        }
        let mut oldest_first = session.kept.values_mut();
        while session.kept_bytes > MAX_KEPT_BYTES_PER_SESSION {
            let Some(kept) = oldest_first.next() else { break };
            session.kept_bytes -= kept.bytes();
            *kept = Kept::Dropped(kept.bytes() as u64);
        }
    }

    /// Sessions open, and the bytes of results they keep.
    pub fn usage(&self) -> (u64, u64) {
        let bytes = self
            .sessions
            .values()
            .fold(0u64, |sum, s| sum.saturating_add(s.kept_bytes as u64));
        (self.sessions.len() as u64, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Result<Vec<u8>, CallError> {
        Ok(text.as_bytes().to_vec())
    }

    #[test]
    fn a_sequence_is_applied_once_and_its_retries_get_the_first_result() {
        let mut sessions = Sessions::default();
        let id = sessions.open(10);
        assert_eq!(id, 10);
        assert_eq!(sessions.decide(11, id, 1), Decision::Apply);
        sessions.record(11, id, 1, &ok("1"));
        // The retry, a few entries later (the first attempt had committed).
        assert_eq!(sessions.decide(14, id, 1), Decision::Answer(ok("1")));
        assert_eq!(sessions.decide(15, id, 2), Decision::Apply);
        sessions.record(15, id, 2, &Err(CallError::Guest("not an integer".into())));
        assert_eq!(
            sessions.decide(16, id, 2),
            Decision::Answer(Err(CallError::Guest("not an integer".into())))
        );
        assert_eq!(sessions.usage(), (1, 1 + "not an integer".len() as u64));
    }

    #[test]
    fn sequences_may_arrive_out_of_order() {
        let mut sessions = Sessions::default();
        let id = sessions.open(1);
        assert_eq!(sessions.decide(2, id, 3), Decision::Apply);
        sessions.record(2, id, 3, &ok("c"));
        assert_eq!(sessions.decide(3, id, 1), Decision::Apply);
        sessions.record(3, id, 1, &ok("a"));
        assert_eq!(sessions.decide(4, id, 3), Decision::Answer(ok("c")));
        assert_eq!(sessions.decide(5, id, 2), Decision::Apply);
    }

    #[test]
    fn unknown_expired_and_zero_are_refused_never_applied() {
        let mut sessions = Sessions::default();
        let refused = |d: Decision| match d {
            Decision::Answer(Err(CallError::Guest(message))) => message,
            other => panic!("{other:?}"),
        };
        // The client recognises "forgotten" (and opens a new session) for
        // its own session only, and never mistakes another refusal for it.
        let unknown = refused(sessions.decide(5, 99, 1));
        assert!(unknown.contains("unknown") && is_forgotten(&unknown, 99) && !is_forgotten(&unknown, 9));
        let id = sessions.open(5);
        assert!(!is_forgotten(&refused(sessions.decide(6, id, 0)), id));
        assert_eq!(sessions.decide(7, id, 1), Decision::Apply);
        sessions.record(7, id, 1, &ok("x"));
        let late = 7 + EXPIRY_ENTRIES + 1;
        let expired = refused(sessions.decide(late, id, 2));
        assert!(expired.contains("expired") && is_forgotten(&expired, id));
        // And stays gone.
        assert!(is_forgotten(&refused(sessions.decide(late + 1, id, 1)), id));
        assert_eq!(sessions.usage(), (0, 0));
    }

    #[test]
    fn a_session_keeps_its_newest_results_and_refuses_what_it_dropped() {
        let mut sessions = Sessions::default();
        let id = sessions.open(1);
        let count = MAX_KEPT_PER_SESSION as u64 + 10;
        for seq in 1..=count {
            assert_eq!(sessions.decide(1 + seq, id, seq), Decision::Apply);
            sessions.record(1 + seq, id, seq, &ok(&seq.to_string()));
        }
        assert_eq!(sessions.usage().0, 1);
        match sessions.decide(1000, id, 3) {
            Decision::Answer(Err(CallError::Guest(message))) => assert!(message.contains("older"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            sessions.decide(1001, id, count),
            Decision::Answer(ok(&count.to_string()))
        );
        // By bytes too: a huge result is kept as its size.
        let big = vec![7u8; MAX_KEPT_BYTES_PER_SESSION + 1];
        assert_eq!(sessions.decide(1002, id, count + 1), Decision::Apply);
        sessions.record(1002, id, count + 1, &Ok(big));
        match sessions.decide(1003, id, count + 1) {
            Decision::Answer(Err(CallError::Guest(message))) => assert!(message.contains("too large"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(sessions.usage().1 <= MAX_KEPT_BYTES_PER_SESSION as u64);
    }

    /// A client with up to `MAX_KEPT_PER_SESSION` proposals in flight (as
    /// `propose --file` keeps) never has one refused as "older than kept"
    /// before it was applied, however large the results: the byte limit
    /// drops results, not the record that a sequence was applied.
    #[test]
    fn a_window_of_proposals_in_flight_is_never_refused_unapplied_whatever_the_result_sizes() {
        let mut sessions = Sessions::default();
        let id = sessions.open(1);
        let window = MAX_KEPT_PER_SESSION as u64;
        let result = vec![b'r'; 2 << 10];
        let mut index = 1;
        // Sequence 1 of the window is the slow one: 2..=window apply first.
        for seq in 2..=window {
            index += 1;
            assert_eq!(sessions.decide(index, id, seq), Decision::Apply);
            sessions.record(index, id, seq, &Ok(result.clone()));
        }
        assert!(sessions.usage().1 <= MAX_KEPT_BYTES_PER_SESSION as u64);
        index += 1;
        assert_eq!(
            sessions.decide(index, id, 1),
            Decision::Apply,
            "sequence 1 was never applied"
        );
        sessions.record(index, id, 1, &Ok(result.clone()));
        // A retry of one whose result was dropped learns it was applied.
        index += 1;
        match sessions.decide(index, id, 2) {
            Decision::Answer(Err(CallError::Guest(message))) => {
                assert!(message.contains("was applied"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_full_table_drops_its_least_recently_used_session() {
        let mut sessions = Sessions::default();
        for index in 1..=MAX_SESSIONS as u64 {
            sessions.open(index);
        }
        // Session 1 is used, so 2 is now the least recently used.
        assert_eq!(sessions.decide(5000, 1, 1), Decision::Apply);
        sessions.open(5001);
        assert_eq!(sessions.usage().0, MAX_SESSIONS as u64);
        assert!(matches!(sessions.decide(5002, 2, 1), Decision::Answer(Err(_))));
        assert_eq!(sessions.decide(5003, 1, 2), Decision::Apply);
    }

    #[test]
    fn the_table_round_trips_through_bincode_and_replicas_agree() {
        let run = || {
            let mut sessions = Sessions::default();
            let a = sessions.open(1);
            let b = sessions.open(2);
            for (index, (id, seq)) in [(a, 1), (b, 1), (a, 1), (a, 2), (b, 3)].into_iter().enumerate() {
                let index = index as u64 + 3;
                if sessions.decide(index, id, seq) == Decision::Apply {
                    sessions.record(index, id, seq, &ok(&format!("{id}/{seq}")));
                }
            }
            sessions
        };
        let (one, other) = (run(), run());
        assert_eq!(one, other);
        let bytes = bincode::serde::encode_to_vec(&one, bincode::config::standard()).unwrap();
        let (back, _): (Sessions, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert_eq!(back, one);
    }
}

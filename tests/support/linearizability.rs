//! A linearizability checker for registers, after Wing & Gong with Lowe's
//! memoization (the search porcupine and Knossos run).
//!
//! A history is a list of operations on one register, each with the time it
//! was invoked and, if it returned with a definite answer, the time it
//! returned. An operation whose outcome is unknown (a timeout: it may or may
//! not have taken effect) has no return: a write like that may take effect
//! at any point after its call, or never; a read like that constrains
//! nothing and is left out. Definite failures (never applied) are left out
//! too. Registers are independent, and linearizability is local, so a
//! multi-key history is checked key by key.

use std::collections::HashSet;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Wrote this value.
    Write(String),
    /// Read this value (`None`: the key was absent).
    Read(Option<String>),
}

#[derive(Debug, Clone)]
pub struct Op {
    /// Who ran it (for the explanation).
    pub client: usize,
    pub call: Duration,
    /// `None`: the outcome is unknown.
    pub ret: Option<Duration>,
    pub kind: Kind,
}

/// Why a history is not linearizable: the end of the longest order of
/// operations the search found, and (some of) the operations left that none
/// could follow.
#[derive(Debug)]
pub struct Violation {
    pub ordered: Vec<Op>,
    pub stuck: Vec<Op>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "no order of these operations fits a register; the best order found:")?;
        for op in &self.ordered {
            writeln!(f, "  {op:?}")?;
        }
        writeln!(f, "after which none of these can come next:")?;
        for op in &self.stuck {
            writeln!(f, "  {op:?}")?;
        }
        Ok(())
    }
}

/// Check one register's history, starting from an absent value.
///
/// A depth-first search over the orders the real-time constraints allow,
/// without recursion (histories have thousands of operations), remembering
/// every (operations placed, value) state it already gave up on.
pub fn check(history: &[Op]) -> Result<(), Violation> {
    let mut ops: Vec<&Op> = history
        .iter()
        .filter(|op| op.ret.is_some() || matches!(op.kind, Kind::Write(_)))
        .collect();
    ops.sort_by_key(|op| op.call);
    let n = ops.len();
    // Values as small numbers; 0 is "absent".
    let mut names: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
    let mut intern = |v: Option<&String>| match v {
        None => 0,
        Some(v) => {
            let next = names.len() as u32 + 1;
            *names.entry(v.clone()).or_insert(next)
        }
    };
    let kinds: Vec<(bool, u32)> = ops
        .iter()
        .map(|op| match &op.kind {
            Kind::Write(v) => (true, intern(Some(v))),
            Kind::Read(v) => (false, intern(v.as_ref())),
        })
        .collect();
    // A random number per operation; a set of placed operations hashes to
    // the XOR of theirs.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let zobrist: Vec<u64> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect();
    let mut done = vec![false; n];
    let mut left = ops.iter().filter(|op| op.ret.is_some()).count();
    let (mut value, mut hash) = (0u32, 0u64);
    let mut seen: HashSet<(u64, u32)> = HashSet::new();
    seen.insert((hash, value));
    // The operations placed, each with the value before it.
    let mut stack: Vec<(usize, u32)> = Vec::new();
    let mut best: Vec<usize> = Vec::new();
    let mut from = 0;
    while left > 0 {
        // Next may come only an operation invoked before every pending
        // operation that has returned, returned.
        let horizon = (0..n)
            .filter(|i| !done[*i])
            .filter_map(|i| ops[i].ret)
            .min()
            .unwrap_or(Duration::MAX);
        let mut found = None;
        for i in from..n {
            if done[i] {
                continue;
            }
            if ops[i].call > horizon {
                break;
            }
            let (write, v) = kinds[i];
            if !write && v != value {
                continue;
            }
            let next = if write { v } else { value };
            if seen.insert((hash ^ zobrist[i], next)) {
                found = Some((i, next));
                break;
            }
        }
        match found {
            Some((i, next)) => {
                stack.push((i, value));
                done[i] = true;
                hash ^= zobrist[i];
                value = next;
                left -= usize::from(ops[i].ret.is_some());
                from = 0;
                if stack.len() > best.len() {
                    best = stack.iter().map(|(i, _)| *i).collect();
                }
            }
            None => {
                let Some((i, before)) = stack.pop() else {
                    let ordered: Vec<Op> = best.iter().map(|i| ops[*i].clone()).collect();
                    let stuck = (0..n)
                        .filter(|i| ops[*i].ret.is_some() && !best.contains(i))
                        .take(10)
                        .map(|i| ops[i].clone())
                        .collect();
                    let skip = ordered.len().saturating_sub(10);
                    return Err(Violation {
                        ordered: ordered.into_iter().skip(skip).collect(),
                        stuck,
                    });
                };
                done[i] = false;
                hash ^= zobrist[i];
                value = before;
                left += usize::from(ops[i].ret.is_some());
                from = i + 1;
            }
        }
    }
    Ok(())
}

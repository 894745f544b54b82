//! What a committed membership change does, read in one place. The raft
//! side (`node/membership.rs`) applies a change to raft, which computes the
//! new configuration itself; the apply side (`fsm/apply.rs`) has no raft to
//! ask, yet must know the configuration and the members' addresses at every
//! index, because a snapshot taken there carries them. Both read a change's
//! address with [`address`], and the apply side computes the configuration
//! with [`apply`], which does what raft-rs does with a simple change (a
//! test checks the two against each other on random sequences). This host
//! proposes only simple changes, one at a time.

use raft::prelude::{ConfChange, ConfChangeType, ConfState};

/// The address a change adds or moves its node to (its context), if any.
pub(crate) fn address(change: &ConfChange) -> Option<String> {
    if change.get_change_type() == ConfChangeType::RemoveNode {
        return None;
    }
    String::from_utf8(change.context.to_vec())
        .ok()
        .filter(|addr| !addr.is_empty())
}

/// `conf` after the simple `change`, as raft-rs computes it: `AddNode`
/// makes a voter (promoting a learner), `AddLearnerNode` a learner
/// (demoting a voter), `RemoveNode` neither. Refused, and `conf` left as it
/// was, where raft-rs refuses too: a change that leaves no voter.
pub(crate) fn apply(conf: &mut ConfState, change: &ConfChange) -> Result<(), String> {
    let id = change.node_id;
    let (mut voters, mut learners) = (conf.voters.clone(), conf.learners.clone());
    match change.get_change_type() {
        ConfChangeType::AddNode => {
            learners.retain(|l| *l != id);
            if !voters.contains(&id) {
                voters.push(id);
            }
        }
        ConfChangeType::AddLearnerNode => {
            voters.retain(|v| *v != id);
            if !learners.contains(&id) {
                learners.push(id);
            }
        }
        ConfChangeType::RemoveNode => {
            voters.retain(|v| *v != id);
            learners.retain(|l| *l != id);
        }
    }
    if voters.is_empty() {
        return Err(format!(
            "{:?} of node {id} removes all voters",
            change.get_change_type()
        ));
    }
    voters.sort_unstable();
    learners.sort_unstable();
    (conf.voters, conf.learners) = (voters, learners);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::storage::MemStorage;
    use raft::{Config, RawNode};

    fn change(kind: ConfChangeType, id: u64, addr: &str) -> ConfChange {
        ConfChange {
            change_type: kind,
            node_id: id,
            context: addr.as_bytes().to_vec().into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_address_is_the_context_of_an_addition_only() {
        let add = change(ConfChangeType::AddLearnerNode, 4, "127.0.0.1:7004");
        assert_eq!(address(&add).as_deref(), Some("127.0.0.1:7004"));
        assert_eq!(address(&change(ConfChangeType::AddNode, 4, "")), None);
        assert_eq!(address(&change(ConfChangeType::RemoveNode, 4, "127.0.0.1:7004")), None);
        let mut bad = add;
        bad.context = vec![0xff, 0xfe].into();
        assert_eq!(address(&bad), None, "not UTF-8");
    }

    /// Random sequences of simple changes over ids 1..=5, applied both to
    /// a raft-rs node and with `apply`: the same configuration after every
    /// change, and the same refusals.
    #[test]
    fn apply_agrees_with_raft_on_random_sequences_of_changes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        for round in 0..50 {
            let storage = MemStorage::new_with_conf_state(ConfState::from((vec![1], vec![])));
            let config = Config {
                id: 1,
                ..Default::default()
            };
            let mut raw = RawNode::new(&config, storage, &logger).unwrap();
            let mut ours = ConfState::from((vec![1], vec![]));
            for step in 0..40 {
                let kind = match next(3) {
                    0 => ConfChangeType::AddNode,
                    1 => ConfChangeType::AddLearnerNode,
                    _ => ConfChangeType::RemoveNode,
                };
                let cc = change(kind, 1 + next(5), "");
                let theirs = raw.apply_conf_change(&cc);
                let before = ours.clone();
                let mine = apply(&mut ours, &cc);
                assert_eq!(
                    theirs.is_ok(),
                    mine.is_ok(),
                    "round {round} step {step}: {cc:?} on {before:?}: raft {theirs:?}, ours {mine:?}"
                );
                let conf = raw.raft.prs().conf().to_conf_state();
                let mut voters = conf.voters.clone();
                let mut learners = conf.learners.clone();
                voters.sort_unstable();
                learners.sort_unstable();
                assert_eq!(
                    (&voters, &learners),
                    (&ours.voters, &ours.learners),
                    "round {round} step {step}: {cc:?} on {before:?}"
                );
            }
        }
    }
}

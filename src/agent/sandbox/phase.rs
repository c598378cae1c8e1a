//! The sandbox phase machine: which phase may follow which. Every phase change on the agent goes
//! through [`SandboxPhase::can_become`], under the lock that also holds the sandbox's runtime, so
//! a check and the change it allows are one step and two actors can never both win.

use crate::agent::wire::SandboxPhase;

/// A phase change the table refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a sandbox cannot go from {from} to {to}")]
pub struct IllegalTransition {
    pub from: SandboxPhase,
    pub to: SandboxPhase,
}

impl SandboxPhase {
    /// The transition table. The phases ending in `-ing` (but `Running`) belong to the one task
    /// doing that work; a destroy arriving meanwhile moves them to `Stopping`, and that task,
    /// whose own next transition is then refused, tears the sandbox down. `Stopping` is final:
    /// the sandbox leaves the registry when its teardown ends.
    pub fn can_become(self, next: SandboxPhase) -> bool {
        use SandboxPhase::*;
        match self {
            Starting => matches!(next, Running | Stopping),
            Running => matches!(next, Pausing | Snapshotting | Stopping),
            // Back to Running when a pause fails and the guest still runs.
            Pausing => matches!(next, Paused | Running | Stopping),
            Paused => matches!(next, Resuming | Snapshotting | Stopping),
            // Back to Paused when a resume fails before the guest ran.
            Resuming => matches!(next, Running | Paused | Stopping),
            // Back to where it was: a snapshot template is taken of a running or a paused
            // sandbox, which stays so.
            Snapshotting => matches!(next, Running | Paused | Stopping),
            Stopping => false,
        }
    }

    /// `next` when the table allows it.
    pub fn transition(self, next: SandboxPhase) -> Result<SandboxPhase, IllegalTransition> {
        if self.can_become(next) {
            Ok(next)
        } else {
            Err(IllegalTransition {
                from: self,
                to: next,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    /// The table spelled out pair by pair, independent of `can_become`'s shape.
    const LEGAL: &[(SandboxPhase, SandboxPhase)] = {
        use SandboxPhase::*;
        &[
            (Starting, Running),
            (Starting, Stopping),
            (Running, Pausing),
            (Running, Snapshotting),
            (Running, Stopping),
            (Pausing, Paused),
            (Pausing, Running),
            (Pausing, Stopping),
            (Paused, Resuming),
            (Paused, Snapshotting),
            (Paused, Stopping),
            (Resuming, Running),
            (Resuming, Paused),
            (Resuming, Stopping),
            (Snapshotting, Running),
            (Snapshotting, Paused),
            (Snapshotting, Stopping),
        ]
    };

    #[test]
    fn every_legal_transition_is_allowed_and_every_other_refused() {
        for from in SandboxPhase::iter() {
            for to in SandboxPhase::iter() {
                let legal = LEGAL.contains(&(from, to));
                assert_eq!(from.can_become(to), legal, "{from} -> {to}");
                match from.transition(to) {
                    Ok(next) => {
                        assert!(legal, "{from} -> {to} was allowed");
                        assert_eq!(next, to);
                    }
                    Err(refused) => {
                        assert!(!legal, "{from} -> {to} was refused");
                        assert_eq!(refused, IllegalTransition { from, to });
                    }
                }
            }
        }
    }

    #[test]
    fn every_phase_but_stopping_can_be_destroyed_and_stopping_is_final() {
        for phase in SandboxPhase::iter() {
            let stopping = phase == SandboxPhase::Stopping;
            assert_eq!(
                phase.can_become(SandboxPhase::Stopping),
                !stopping,
                "{phase}"
            );
        }
        assert!(SandboxPhase::iter().all(|next| !SandboxPhase::Stopping.can_become(next)));
    }
}

//! The sync and health vocabulary every crate shares: the wire enums, their words, and the one rule
//! that says when a cluster runs a bundle Synced and Healthy. Nothing compares these as strings.

use crate::v1::{AppOrigin, AppStatus, HealthStatus, HookPhase, RolloutPhase, SyncStatus};

impl SyncStatus {
    /// The word operators read (`flotilla status`, `-o json`).
    pub fn word(self) -> &'static str {
        match self {
            SyncStatus::Unknown => "Unknown",
            SyncStatus::Synced => "Synced",
            SyncStatus::OutOfSync => "OutOfSync",
            SyncStatus::Failed => "SyncFailed",
        }
    }
}

impl HealthStatus {
    /// The word operators read.
    pub fn word(self) -> &'static str {
        match self {
            HealthStatus::Unknown => "Unknown",
            HealthStatus::Healthy => "Healthy",
            HealthStatus::Progressing => "Progressing",
            HealthStatus::Degraded => "Degraded",
            HealthStatus::Missing => "Missing",
        }
    }

    /// How bad it is, for "the worst of": Healthy < Progressing < Missing < Degraded < Unknown
    /// (the order Argo CD uses, so an app's health reads the same in both).
    pub fn severity(self) -> u8 {
        match self {
            HealthStatus::Healthy => 0,
            HealthStatus::Progressing => 1,
            HealthStatus::Missing => 2,
            HealthStatus::Degraded => 3,
            HealthStatus::Unknown => 4,
        }
    }
}

impl AppOrigin {
    /// The word operators read (`app list`, `-o json`).
    pub fn word(self) -> &'static str {
        match self {
            AppOrigin::Unspecified => "",
            AppOrigin::Api => "api",
            AppOrigin::Fleet => "fleet",
        }
    }
}

impl RolloutPhase {
    /// The word operators read (`rollout status`, `-o json`); empty before the first rollout.
    pub fn word(self) -> &'static str {
        match self {
            RolloutPhase::Unspecified => "",
            RolloutPhase::Progressing => "Progressing",
            RolloutPhase::Paused => "Paused",
            RolloutPhase::Succeeded => "Succeeded",
            RolloutPhase::RolledBack => "RolledBack",
            RolloutPhase::Failed => "Failed",
        }
    }

    /// Whether the rollout still has work to do (a paused one waits for an operator).
    pub fn is_active(self) -> bool {
        matches!(self, RolloutPhase::Progressing | RolloutPhase::Paused)
    }
}

impl HookPhase {
    /// Argo CD's word for the phase (its annotation's value).
    pub fn word(self) -> &'static str {
        match self {
            HookPhase::Unspecified => "Unknown",
            HookPhase::PreSync => "PreSync",
            HookPhase::Sync => "Sync",
            HookPhase::PostSync => "PostSync",
            HookPhase::SyncFail => "SyncFail",
        }
    }
}

impl std::fmt::Display for HookPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

impl std::fmt::Display for SyncStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.word())
    }
}

/// What a cluster says about one app, reduced to what a rollout decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub digest: String,
    pub sync: SyncStatus,
    pub health: HealthStatus,
}

/// A rollout's verdict on a cluster's report of the bundle it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Runs the bundle, every object applied, Healthy.
    Done,
    /// Runs the bundle and it failed: an object could not be applied, or it turned Degraded.
    Failed,
    /// Not there yet (another bundle, progressing, missing objects, nothing reported).
    Waiting,
}

impl Observed {
    pub fn of(status: &AppStatus) -> Self {
        Self {
            digest: status.digest.clone(),
            sync: status.sync(),
            health: status.health(),
        }
    }

    /// The rule every rollout decision rests on: done only when the cluster runs `digest`
    /// **Synced and Healthy**; an apply failure on it counts exactly like Degraded.
    pub fn verdict(&self, digest: &str) -> Verdict {
        if self.digest != digest {
            return Verdict::Waiting;
        }
        match (self.sync, self.health) {
            (SyncStatus::Failed, _) | (_, HealthStatus::Degraded) => Verdict::Failed,
            (SyncStatus::Synced, HealthStatus::Healthy) => Verdict::Done,
            _ => Verdict::Waiting,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_only_when_synced_and_healthy_on_the_digest() {
        use HealthStatus as H;
        use SyncStatus as S;
        let table = [
            ("new", S::Synced, H::Healthy, Verdict::Done),
            ("new", S::Failed, H::Healthy, Verdict::Failed),
            ("new", S::Failed, H::Progressing, Verdict::Failed),
            ("new", S::Synced, H::Degraded, Verdict::Failed),
            ("new", S::OutOfSync, H::Degraded, Verdict::Failed),
            ("new", S::OutOfSync, H::Healthy, Verdict::Waiting),
            ("new", S::Unknown, H::Healthy, Verdict::Waiting),
            ("new", S::Synced, H::Unknown, Verdict::Waiting),
            ("new", S::Synced, H::Missing, Verdict::Waiting),
            ("new", S::Synced, H::Progressing, Verdict::Waiting),
            ("old", S::Synced, H::Healthy, Verdict::Waiting),
            ("old", S::Failed, H::Degraded, Verdict::Waiting),
        ];
        for (digest, sync, health, want) in table {
            let o = Observed {
                digest: digest.into(),
                sync,
                health,
            };
            assert_eq!(o.verdict("new"), want, "{digest} {sync} {health}");
        }
    }

    #[test]
    fn a_report_without_status_fields_is_unknown_never_healthy() {
        let silent = AppStatus::default();
        assert_eq!(silent.sync(), SyncStatus::Unknown);
        assert_eq!(silent.health(), HealthStatus::Unknown);
        assert_eq!(Observed::of(&silent).verdict(""), Verdict::Waiting);
    }
}

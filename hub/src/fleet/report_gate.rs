//! What one agent session may report: only apps assigned to its cluster, each report bounded in
//! size, at a bounded rate. A cluster's reports can then never grow the hub's memory, store or
//! metrics beyond its assignments, however it misbehaves. Pure apart from the clock it is given.

use std::time::Instant;

use flotilla_proto::v1::{AppStatus, Assignment};

use crate::sources::untrusted::cut;

/// The longest message kept from a report (the rest is cut, marked).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// The longest diff kept from a report; agents bound theirs below this already.
pub const MAX_DIFF_BYTES: usize = 64 * 1024;
/// The most hook runs kept from a report, and the longest message of each.
const MAX_HOOKS: usize = 64;
const MAX_HOOK_MESSAGE_BYTES: usize = 1024;
/// Kubernetes names and kinds are at most 253 characters; anything longer is cut.
const MAX_NAME_BYTES: usize = 253;
/// The longest digest or revision a report may carry.
const MAX_ID_BYTES: usize = 128;
/// Sustained reports per second per session; bursts up to the bucket's size.
const REFILL_PER_SECOND: f64 = 100.0;
const MIN_BURST: f64 = 500.0;

/// Why a report was dropped (a metric label: a closed set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Names an app that is not assigned to the cluster.
    Unassigned,
    /// Over the session's rate.
    TooFast,
    /// A digest or revision no hub ever issued (too long).
    Malformed,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unassigned => "unassigned",
            Refusal::TooFast => "rate",
            Refusal::Malformed => "malformed",
        }
    }
}

/// The per-session gate: a token bucket sized to the assignments.
pub struct ReportGate {
    tokens: f64,
    last: Instant,
}

impl ReportGate {
    pub fn new(now: Instant) -> Self {
        Self {
            tokens: MIN_BURST,
            last: now,
        }
    }

    /// Admits `status` (cutting its message to size) or says why not.
    pub fn admit(
        &mut self,
        status: &mut AppStatus,
        assigned: &[Assignment],
        now: Instant,
    ) -> Result<(), Refusal> {
        // Room for every assigned app to report twice at once (a session's first reports).
        let burst = MIN_BURST.max(2.0 * assigned.len() as f64);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * REFILL_PER_SECOND).min(burst);
        if self.tokens < 1.0 {
            return Err(Refusal::TooFast);
        }
        self.tokens -= 1.0;
        // A removal of an app the hub no longer assigns is how an agent says it pruned it.
        if !status.removed && !assigned.iter().any(|a| a.app == status.app) {
            return Err(Refusal::Unassigned);
        }
        if status.digest.len() > MAX_ID_BYTES || status.revision.len() > MAX_ID_BYTES {
            return Err(Refusal::Malformed);
        }
        cut(&mut status.message, MAX_MESSAGE_BYTES);
        cut(&mut status.diff, MAX_DIFF_BYTES);
        status.hooks.truncate(MAX_HOOKS);
        for h in &mut status.hooks {
            cut(&mut h.message, MAX_HOOK_MESSAGE_BYTES);
            for name in [&mut h.kind, &mut h.namespace, &mut h.name] {
                cut(name, MAX_NAME_BYTES);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn assigned(apps: &[&str]) -> Vec<Assignment> {
        apps.iter()
            .map(|a| Assignment {
                app: a.to_string(),
                ..Assignment::default()
            })
            .collect()
    }

    fn report(app: &str) -> AppStatus {
        AppStatus {
            app: app.into(),
            digest: "sha256:x".into(),
            ..AppStatus::default()
        }
    }

    #[test]
    fn only_assigned_apps_small_reports_at_a_bounded_rate() {
        let t0 = Instant::now();
        let mut gate = ReportGate::new(t0);
        let apps = assigned(&["web"]);
        assert_eq!(gate.admit(&mut report("web"), &apps, t0), Ok(()));
        assert_eq!(
            gate.admit(&mut report("invented-1"), &apps, t0),
            Err(Refusal::Unassigned)
        );
        let mut removal = AppStatus {
            removed: true,
            ..report("gone")
        };
        assert_eq!(gate.admit(&mut removal, &apps, t0), Ok(()));
        let mut long_id = AppStatus {
            digest: "x".repeat(1000),
            ..report("web")
        };
        assert_eq!(gate.admit(&mut long_id, &apps, t0), Err(Refusal::Malformed));
        let mut big = AppStatus {
            message: "é".repeat(100_000),
            diff: "+é\n".repeat(100_000),
            hooks: vec![
                flotilla_proto::v1::HookRun {
                    name: "n".repeat(10_000),
                    message: "m".repeat(10_000),
                    ..Default::default()
                };
                1000
            ],
            ..report("web")
        };
        assert_eq!(gate.admit(&mut big, &apps, t0), Ok(()));
        assert!(
            big.message.len() <= MAX_MESSAGE_BYTES + 16,
            "{}",
            big.message.len()
        );
        assert!(big.diff.len() <= MAX_DIFF_BYTES + 16, "{}", big.diff.len());
        assert_eq!(big.hooks.len(), MAX_HOOKS);
        assert!(big.hooks[0].name.len() <= MAX_NAME_BYTES + 16);
        assert!(big.hooks[0].message.len() <= MAX_HOOK_MESSAGE_BYTES + 16);
        // A flood: the burst passes, then at most the refill rate.
        let mut admitted = 0;
        for _ in 0..10_000 {
            if gate.admit(&mut report("web"), &apps, t0).is_ok() {
                admitted += 1;
            }
        }
        assert!(admitted < 500, "{admitted}");
        assert_eq!(
            gate.admit(&mut report("web"), &apps, t0),
            Err(Refusal::TooFast)
        );
        let later = t0 + Duration::from_secs(1);
        let mut after = 0;
        for _ in 0..1000 {
            if gate.admit(&mut report("web"), &apps, later).is_ok() {
                after += 1;
            }
        }
        assert_eq!(after, 100);
    }
}

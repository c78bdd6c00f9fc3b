//! The rollout planner: given an app's strategy, a rollout's state and what each cluster reports, it
//! decides which clusters move to the new bundle next, which have failed, and when the rollout
//! pauses, rolls back or succeeds. Pure: no IO and no clock (time comes in as `now`), so every rule
//! is a table test. The controller in `rollouts` feeds it and persists what it returns.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_bundle::selector::LabelSelector;
use flotilla_proto::status::{Observed, Verdict};
use flotilla_proto::v1::{RolloutPhase, SyncStatus};
use serde::{Deserialize, Serialize};

/// A count of clusters or a percentage of a group ("25%").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum IntOrPercent {
    Count(u32),
    Percent(String),
}

impl IntOrPercent {
    fn percent(s: &str) -> Option<u32> {
        let n: u32 = s.strip_suffix('%')?.trim().parse().ok()?;
        (n <= 100).then_some(n)
    }

    pub fn validate(&self) -> Result<(), String> {
        match self {
            Self::Count(0) => Err("must be at least 1".into()),
            Self::Count(_) => Ok(()),
            Self::Percent(s) => match Self::percent(s) {
                Some(0) => Err(format!("{s:?} must be more than 0%")),
                Some(_) => Ok(()),
                None => Err(format!(
                    "{s:?} is neither a count nor a percentage like \"25%\""
                )),
            },
        }
    }

    /// Of `total` clusters, rounded down but never below one.
    pub fn of(&self, total: usize) -> usize {
        let n = match self {
            Self::Count(n) => *n as usize,
            Self::Percent(s) => total * Self::percent(s).unwrap_or(100) as usize / 100,
        };
        n.max(1)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    #[default]
    Pause,
    Rollback,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OfflineAction {
    /// An offline cluster is given the new bundle and waited for, up to the timeout; then it fails.
    #[default]
    Wait,
    /// An offline cluster is skipped (reported), keeps its bundle, and catches up once the
    /// rollout succeeds.
    Skip,
}

/// `spec.rollout` of an App.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RolloutSpec {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepSpec>,
    /// How long a cluster may take to run the new bundle Healthy (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_deadline: Option<String>,
    /// Failed clusters (count or % of the rollout's clusters) that trigger `onFailure` (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<IntOrPercent>,
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OfflineSpec {
    #[serde(default)]
    pub action: OfflineAction,
    /// How long `wait` waits for an offline cluster (default 10m).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<IntOrPercent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<IntOrPercent>,
    /// How long the whole step must stay Healthy before the next one starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<String>,
    /// After this step is done, wait for `flotilla rollout resume` or `promote`.
    #[serde(default)]
    pub pause: bool,
}

/// Caps of a step that names none, and of the clusters no step matches.
pub const DEFAULT_MAX_UNAVAILABLE: &str = "25%";
pub const DEFAULT_PROGRESS_DEADLINE: Duration = Duration::from_secs(600);
pub const DEFAULT_OFFLINE_TIMEOUT: Duration = Duration::from_secs(600);

/// One step of a resolved strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub name: String,
    /// `None` matches every cluster (the implicit last step).
    pub selector: Option<LabelSelector>,
    pub max_concurrent: Option<IntOrPercent>,
    pub max_unavailable: IntOrPercent,
    pub soak_secs: i64,
    pub pause: bool,
}

/// A strategy with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    pub steps: Vec<Step>,
    pub progress_deadline_secs: i64,
    pub failure_threshold: IntOrPercent,
    pub on_failure: OnFailure,
    pub offline_action: OfflineAction,
    pub offline_timeout_secs: i64,
}

fn duration_secs(field: &str, value: &Option<String>, default: Duration) -> Result<i64, String> {
    let d = match value {
        Some(text) => humantime::parse_duration(text).map_err(|e| {
            format!("{field}: {text:?} is not a duration like \"30s\" or \"5m\": {e}")
        })?,
        None => default,
    };
    Ok(i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl RolloutSpec {
    /// Resolves defaults; errors name the field. `None` is the default strategy: one step over every
    /// cluster, a quarter at a time, pausing at the first failure.
    pub fn resolve(spec: Option<&RolloutSpec>) -> Result<Strategy, String> {
        let default = RolloutSpec::default();
        let spec = spec.unwrap_or(&default);
        let mut steps = Vec::new();
        for (i, s) in spec.steps.iter().enumerate() {
            let at = format!("spec.rollout.steps[{i}]");
            s.selector
                .validate(&format!("{at}.selector"))
                .map_err(|e| format!("{at}.selector: {e}"))?;
            for (name, cap) in [
                ("maxConcurrent", &s.max_concurrent),
                ("maxUnavailable", &s.max_unavailable),
            ] {
                if let Some(cap) = cap {
                    cap.validate().map_err(|e| format!("{at}.{name}: {e}"))?;
                }
            }
            steps.push(Step {
                name: s.name.clone().unwrap_or_else(|| format!("step-{}", i + 1)),
                selector: Some(s.selector.clone()),
                max_concurrent: s.max_concurrent.clone(),
                max_unavailable: s
                    .max_unavailable
                    .clone()
                    .unwrap_or(IntOrPercent::Percent(DEFAULT_MAX_UNAVAILABLE.into())),
                soak_secs: duration_secs(&format!("{at}.soak"), &s.soak, Duration::ZERO)?,
                pause: s.pause,
            });
        }
        steps.push(Step {
            name: if steps.is_empty() { "all" } else { "rest" }.into(),
            selector: None,
            max_concurrent: None,
            max_unavailable: IntOrPercent::Percent(DEFAULT_MAX_UNAVAILABLE.into()),
            soak_secs: 0,
            pause: false,
        });
        if let Some(t) = &spec.failure_threshold {
            t.validate()
                .map_err(|e| format!("spec.rollout.failureThreshold: {e}"))?;
        }
        let offline = spec.offline.clone().unwrap_or_default();
        Ok(Strategy {
            steps,
            progress_deadline_secs: duration_secs(
                "spec.rollout.progressDeadline",
                &spec.progress_deadline,
                DEFAULT_PROGRESS_DEADLINE,
            )?,
            failure_threshold: spec
                .failure_threshold
                .clone()
                .unwrap_or(IntOrPercent::Count(1)),
            on_failure: spec.on_failure,
            offline_action: offline.action,
            offline_timeout_secs: duration_secs(
                "spec.rollout.offline.timeout",
                &offline.timeout,
                DEFAULT_OFFLINE_TIMEOUT,
            )?,
        })
    }
}

impl Strategy {
    /// The first step whose selector matches; the last step matches every cluster.
    pub fn step_of(&self, labels: &BTreeMap<String, String>) -> usize {
        self.steps
            .iter()
            .position(|s| s.selector.as_ref().is_none_or(|sel| sel.matches(labels)))
            .unwrap_or(self.steps.len().saturating_sub(1))
    }
}

/// A bundle a cluster is told to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub digest: String,
    pub revision: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Progressing,
    Paused,
    Succeeded,
    /// Every touched cluster went back to the bundle it ran before.
    RolledBack,
    /// Rolled back, but some touched clusters had nothing before: the app was removed from them.
    Failed,
}

impl Phase {
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused)
    }
}

impl From<Phase> for RolloutPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Progressing => RolloutPhase::Progressing,
            Phase::Paused => RolloutPhase::Paused,
            Phase::Succeeded => RolloutPhase::Succeeded,
            Phase::RolledBack => RolloutPhase::RolledBack,
            Phase::Failed => RolloutPhase::Failed,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterState {
    /// Its step has not reached it: it keeps its bundle.
    Pending,
    /// Given the new bundle; waiting for a Healthy report of it.
    Updating,
    /// Runs the new bundle, Healthy (or the new bundle is the one it already ran).
    Healthy,
    /// Turned Degraded or missed its deadline on the new bundle.
    Failed,
    /// Offline when its step reached it (offline action `skip`); catches up on success.
    Skipped,
    /// Returned to the bundle it ran before the rollout.
    RolledBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PauseReason {
    Operator,
    /// The step was done and has `pause: true`.
    Step,
    /// The failure threshold was reached with `onFailure: pause`.
    Failures,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterRollout {
    pub step: usize,
    /// What it ran before this rollout: where a rollback returns it.
    pub from: Option<Assigned>,
    pub to: Assigned,
    pub state: ClusterState,
    /// When it entered `state` (unix seconds).
    pub since: i64,
    pub reason: String,
}

/// The durable state of one rollout of an app to one (revision, generation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: u64,
    pub revision: String,
    pub generation: u64,
    pub phase: Phase,
    pub current_step: usize,
    pub steps: Vec<String>,
    /// Since when every cluster of the current step has been Healthy (its soak clock).
    pub step_healthy_since: Option<i64>,
    pub paused: Option<PauseReason>,
    /// Set by `promote`: the current soak or step pause is skipped once.
    pub promote: bool,
    /// Failures an operator resumed past; only failures beyond these count toward the threshold.
    pub tolerated_failures: usize,
    /// Why the rollout is where it is, in words.
    pub message: String,
    pub clusters: BTreeMap<String, ClusterRollout>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// The most clusters ever updating at once in one step.
    pub max_updating: usize,
}

/// What the planner knows about a cluster right now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub labels: BTreeMap<String, String>,
    pub connected: bool,
    /// Since when (unix seconds) its session has been open, when this hub knows: a cluster's
    /// progress deadline runs from then at the earliest, so time the hub (or the link) was down
    /// never counts against it.
    pub connected_since: Option<i64>,
    /// What it last reported for this app.
    pub report: Option<Observed>,
}

/// Everything the planner reads.
pub struct Input<'a> {
    /// The app's name, for the commands the rollout's messages suggest.
    pub app: &'a str,
    pub strategy: &'a Strategy,
    /// What git wants each targeted cluster to run.
    pub target: &'a BTreeMap<String, Assigned>,
    /// What each cluster is told to run now.
    pub current: &'a BTreeMap<String, Assigned>,
    pub clusters: &'a BTreeMap<String, ClusterView>,
    pub now: i64,
    /// Manual apps (`syncPolicy.automated: false`): cluster → the bundle an operator asked it to
    /// sync. A cluster moves only to the bundle it was asked to; `None` for automated apps.
    pub sync_requests: Option<&'a BTreeMap<String, String>>,
}

impl Input<'_> {
    /// Whether the rollout may give `cluster` the bundle `digest` (manual apps: only on request).
    fn may_move(&self, cluster: &str, digest: &str) -> bool {
        self.sync_requests
            .is_none_or(|asked| asked.get(cluster).is_some_and(|d| d == digest))
    }
}

impl Rollout {
    /// This rollout without its per-cluster state (which the store keeps per cluster).
    pub fn without_clusters(&self) -> Self {
        Self {
            id: self.id,
            revision: self.revision.clone(),
            generation: self.generation,
            phase: self.phase,
            current_step: self.current_step,
            steps: self.steps.clone(),
            step_healthy_since: self.step_healthy_since,
            paused: self.paused,
            promote: self.promote,
            tolerated_failures: self.tolerated_failures,
            message: self.message.clone(),
            clusters: BTreeMap::new(),
            started_at: self.started_at,
            finished_at: self.finished_at,
            max_updating: self.max_updating,
        }
    }

    /// Starts a rollout to `input.target`. A rollout it supersedes hands over where its touched
    /// clusters came from, so a rollback still returns them to the last stable bundle.
    pub fn start(
        id: u64,
        revision: &str,
        generation: u64,
        input: &Input,
        superseded: Option<&Rollout>,
    ) -> Rollout {
        let mut r = Rollout {
            id,
            revision: revision.to_string(),
            generation,
            phase: Phase::Progressing,
            current_step: 0,
            steps: input
                .strategy
                .steps
                .iter()
                .map(|s| s.name.clone())
                .collect(),
            step_healthy_since: None,
            paused: None,
            promote: false,
            tolerated_failures: 0,
            message: String::new(),
            clusters: BTreeMap::new(),
            started_at: input.now,
            finished_at: None,
            max_updating: 0,
        };
        for (name, to) in input.target {
            // Manual apps' clusters move only on request: what they run is where they return.
            let inherited = superseded
                .filter(|old| old.phase.is_active() && input.sync_requests.is_none())
                .and_then(|old| old.clusters.get(name))
                .filter(|c| {
                    matches!(
                        c.state,
                        ClusterState::Updating | ClusterState::Healthy | ClusterState::Failed
                    )
                })
                .map(|c| c.from.clone());
            let from = inherited.unwrap_or_else(|| input.current.get(name).cloned());
            r.add_cluster(name, from, to.clone(), input);
        }
        if r.clusters
            .values()
            .all(|c| c.state == ClusterState::Healthy)
        {
            // Nothing changes for any cluster (say, a commit elsewhere in the repository).
            r.phase = Phase::Succeeded;
            r.finished_at = Some(input.now);
            r.message = "no cluster's bundle changed".into();
            return r;
        }
        r.advance(input);
        r
    }

    fn add_cluster(&mut self, name: &str, from: Option<Assigned>, to: Assigned, input: &Input) {
        let labels = input.clusters.get(name).map(|c| &c.labels);
        let step = labels.map_or(input.strategy.steps.len() - 1, |l| {
            input.strategy.step_of(l)
        });
        let unchanged = from.as_ref().is_some_and(|f| f.digest == to.digest);
        self.clusters.insert(
            name.to_string(),
            ClusterRollout {
                step,
                from,
                to,
                state: if unchanged {
                    ClusterState::Healthy
                } else {
                    ClusterState::Pending
                },
                since: input.now,
                reason: if unchanged {
                    "its bundle is unchanged".into()
                } else {
                    String::new()
                },
            },
        );
    }

    /// What every cluster of the rollout is told to run: the new bundle once its step reached it,
    /// its old one before (or after a rollback); `None` means nothing.
    pub fn assignments(&self) -> BTreeMap<String, Option<Assigned>> {
        self.clusters
            .iter()
            .map(|(name, c)| {
                let assigned = match (self.phase, c.state) {
                    (Phase::Succeeded, _) => Some(c.to.clone()),
                    (_, ClusterState::Updating | ClusterState::Healthy | ClusterState::Failed) => {
                        Some(c.to.clone())
                    }
                    _ => c.from.clone(),
                };
                (name.clone(), assigned)
            })
            .collect()
    }

    pub fn count(&self, state: ClusterState) -> usize {
        self.clusters.values().filter(|c| c.state == state).count()
    }

    fn set(c: &mut ClusterRollout, state: ClusterState, now: i64, reason: impl Into<String>) {
        c.state = state;
        c.since = now;
        c.reason = reason.into();
    }

    /// One planning round: follow membership, observe reports, apply the failure policy, move the
    /// current step forward. Idempotent for unchanged input.
    pub fn advance(&mut self, input: &Input) {
        let now = input.now;
        let strategy = input.strategy;
        // Membership follows targeting: clusters that left are dropped, new ones join their step,
        // and clusters the rollout has not touched follow label changes into another step.
        self.clusters
            .retain(|name, _| input.target.contains_key(name));
        for (name, to) in input.target {
            match self.clusters.get_mut(name) {
                None => {
                    let from = input.current.get(name).cloned();
                    self.add_cluster(name, from, to.clone(), input);
                }
                Some(c) => {
                    if c.to.digest != to.digest && self.phase.is_active() {
                        // The same revision rendered to another bundle for this cluster: one its
                        // step already reached moves on to it; one it has not, waits for it.
                        c.to = to.clone();
                        if matches!(
                            c.state,
                            ClusterState::Updating | ClusterState::Healthy | ClusterState::Failed
                        ) {
                            Self::set(
                                c,
                                ClusterState::Updating,
                                now,
                                "its bundle changed at the same revision",
                            );
                        }
                    }
                    if c.state == ClusterState::Pending
                        && let Some(view) = input.clusters.get(name)
                    {
                        c.step = strategy.step_of(&view.labels);
                    }
                }
            }
        }
        if !self.phase.is_active() {
            return;
        }
        self.observe(input);
        let failed = self.count(ClusterState::Failed);
        // Recovered clusters are no longer tolerated failures: a later failure counts again.
        self.tolerated_failures = self.tolerated_failures.min(failed);
        let threshold = strategy.failure_threshold.of(self.clusters.len());
        if failed >= self.tolerated_failures + threshold && failed > self.tolerated_failures {
            let names: Vec<&str> = self
                .clusters
                .iter()
                .filter(|(_, c)| c.state == ClusterState::Failed)
                .map(|(n, _)| n.as_str())
                .collect();
            let why = format!(
                "{failed} cluster(s) failed ({}), failure threshold is {threshold}",
                names.join(", ")
            );
            match strategy.on_failure {
                OnFailure::Rollback => self.roll_back(now, &format!("{why}: rolled back")),
                OnFailure::Pause => {
                    self.phase = Phase::Paused;
                    self.paused = Some(PauseReason::Failures);
                    self.message = format!(
                        "paused: {why}; `flotilla rollout resume {0}` continues, `flotilla rollout abort {0}` rolls back",
                        input.app
                    );
                }
            }
            return;
        }
        if self.phase == Phase::Paused {
            if self.paused == Some(PauseReason::Failures) && failed == 0 {
                self.message = format!(
                    "paused after failures; every failed cluster has since recovered: `flotilla rollout resume {}` continues",
                    input.app
                );
            }
            return;
        }
        self.progress(input);
    }

    fn observe(&mut self, input: &Input) {
        let (now, strategy) = (input.now, input.strategy);
        for (name, c) in self.clusters.iter_mut() {
            let view = input.clusters.get(name);
            let connected = view.is_some_and(|v| v.connected);
            let connected_since = view.and_then(|v| v.connected_since);
            let report = view.and_then(|v| v.report.as_ref());
            let verdict = report.map_or(Verdict::Waiting, |o| o.verdict(&c.to.digest));
            let failed_why = || match report {
                Some(o) if o.sync == SyncStatus::Failed => {
                    "objects of the new bundle could not be applied (SyncFailed)"
                }
                _ => "turned Degraded on the new bundle",
            };
            match c.state {
                ClusterState::Updating => match verdict {
                    Verdict::Done => Self::set(c, ClusterState::Healthy, now, ""),
                    Verdict::Failed => Self::set(c, ClusterState::Failed, now, failed_why()),
                    Verdict::Waiting
                        if !connected
                            && now - c.since > strategy.offline_timeout_secs
                            && strategy.offline_action == OfflineAction::Wait =>
                    {
                        let why =
                            format!("offline for more than {}s", strategy.offline_timeout_secs);
                        Self::set(c, ClusterState::Failed, now, why)
                    }
                    Verdict::Waiting
                        // No known opening (a view built without sessions): the deadline runs
                        // from the update's start alone, as it always did.
                        if connected
                            && now - c.since.max(connected_since.unwrap_or(c.since))
                                > strategy.progress_deadline_secs =>
                    {
                        let why = format!(
                            "not Synced and Healthy on the new bundle within its {}s progress deadline",
                            strategy.progress_deadline_secs
                        );
                        Self::set(c, ClusterState::Failed, now, why)
                    }
                    Verdict::Waiting => {}
                },
                ClusterState::Healthy
                    if c.step <= self.current_step && verdict == Verdict::Failed =>
                {
                    Self::set(c, ClusterState::Failed, now, failed_why());
                }
                // A failed cluster whose cause was fixed (a CRD installed, a hook that now
                // passes) leaves Failed, and its step counts it again.
                ClusterState::Failed if verdict == Verdict::Done => Self::set(
                    c,
                    ClusterState::Healthy,
                    now,
                    "recovered: Synced and Healthy on the new bundle",
                ),
                _ => {}
            }
        }
    }

    fn progress(&mut self, input: &Input) {
        let (now, strategy) = (input.now, input.strategy);
        loop {
            let Some(step) = strategy.steps.get(self.current_step) else {
                self.phase = Phase::Succeeded;
                self.finished_at = Some(now);
                self.message = "every step is done".into();
                for c in self.clusters.values_mut() {
                    if c.state != ClusterState::Healthy {
                        let why = format!("caught up after the rollout succeeded ({:?})", c.state);
                        Self::set(c, ClusterState::Healthy, now, why);
                    }
                }
                return;
            };
            let at = self.current_step;
            // Offline clusters the step reaches are skipped under `skip`.
            if strategy.offline_action == OfflineAction::Skip {
                for (name, c) in self.clusters.iter_mut() {
                    let connected = input.clusters.get(name).is_some_and(|v| v.connected);
                    if c.step == at && c.state == ClusterState::Pending && !connected {
                        Self::set(
                            c,
                            ClusterState::Skipped,
                            now,
                            "offline when its step started",
                        );
                    }
                }
            }
            let in_step = |c: &&ClusterRollout| c.step == at && c.state != ClusterState::Skipped;
            let members = self.clusters.values().filter(in_step).count();
            let healthy = self
                .clusters
                .values()
                .filter(in_step)
                .filter(|c| c.state == ClusterState::Healthy)
                .count();
            // Once an operator resumed past failures, failed clusters no longer hold a step.
            let failed_here = self
                .clusters
                .values()
                .filter(|c| c.step == at && c.state == ClusterState::Failed)
                .count();
            let excused = if self.tolerated_failures > 0 {
                failed_here
            } else {
                0
            };
            if members == 0 {
                // Nothing to soak or pause for.
                self.current_step += 1;
                self.step_healthy_since = None;
                continue;
            }
            if healthy + excused == members {
                let since = *self.step_healthy_since.get_or_insert(now);
                let left = step.soak_secs - (now - since);
                if left > 0 && !self.promote {
                    // The soak's end, not a countdown: the record changes once, not every second.
                    self.message = format!(
                        "step {} ({}): all {members} cluster(s) Healthy, soaking {}s until {}",
                        at + 1,
                        step.name,
                        step.soak_secs,
                        crate::db::store::format_time(since + step.soak_secs)
                    );
                    return;
                }
                if step.pause && !self.promote && self.paused != Some(PauseReason::Step) {
                    self.phase = Phase::Paused;
                    self.paused = Some(PauseReason::Step);
                    self.message = format!(
                        "paused after step {} ({}) as its strategy asks; `flotilla rollout resume {app}` or `flotilla rollout promote {app}` continues",
                        at + 1,
                        step.name,
                        app = input.app
                    );
                    return;
                }
                self.promote = false;
                self.paused = None;
                self.current_step += 1;
                self.step_healthy_since = None;
                continue;
            }
            self.step_healthy_since = None;
            let updating = self
                .clusters
                .values()
                .filter(|c| c.step == at && c.state == ClusterState::Updating)
                .count();
            let failed = self
                .clusters
                .values()
                .filter(|c| c.step == at && c.state == ClusterState::Failed)
                .count();
            // Failed clusters are unavailable and use the budget, unless an operator resumed
            // past them: then they would hold the step forever.
            let budget = step.max_unavailable.of(members);
            let mut cap = budget.saturating_sub(failed - excused);
            if let Some(c) = &step.max_concurrent {
                cap = cap.min(c.of(members));
            }
            let mut started = 0;
            let mut unasked = 0;
            for (name, c) in self.clusters.iter_mut() {
                if c.step != at || c.state != ClusterState::Pending {
                    continue;
                }
                if !input.may_move(name, &c.to.digest) {
                    unasked += 1;
                    c.reason = format!(
                        "manual sync: waiting for `flotilla app sync {} --cluster {name}`",
                        input.app
                    );
                    continue;
                }
                if updating + started >= cap {
                    continue;
                }
                Self::set(c, ClusterState::Updating, now, "");
                started += 1;
            }
            let now_updating = updating + started;
            self.max_updating = self.max_updating.max(now_updating);
            let pending = self
                .clusters
                .values()
                .filter(|c| c.step == at && c.state == ClusterState::Pending)
                .count();
            let blocked = if cap == 0 && pending > unasked {
                format!(
                    "; {} failed cluster(s) use the whole maxUnavailable budget of {budget}: a cluster that recovers counts again, `flotilla rollout resume {}` goes on past them",
                    failed - excused,
                    input.app
                )
            } else {
                String::new()
            };
            self.message = format!(
                "step {} ({}): {healthy}/{members} Healthy, {now_updating} updating (at most {cap} at once), {pending} waiting{}{}{blocked}",
                at + 1,
                step.name,
                if unasked > 0 {
                    format!(
                        " ({unasked} for `flotilla app sync {}`: manual sync)",
                        input.app
                    )
                } else {
                    String::new()
                },
                if failed > 0 {
                    format!(", {failed} failed")
                } else {
                    String::new()
                }
            );
            return;
        }
    }

    /// Every touched cluster returns to the bundle it ran before; the untouched never see the new one.
    pub fn roll_back(&mut self, now: i64, why: &str) {
        let mut removed = 0;
        for c in self.clusters.values_mut() {
            if matches!(
                c.state,
                ClusterState::Updating | ClusterState::Healthy | ClusterState::Failed
            ) && c.from.as_ref().map(|f| &f.digest) != Some(&c.to.digest)
            {
                if c.from.is_none() {
                    removed += 1;
                }
                let reason = format!("rolled back ({:?} before)", c.state);
                Self::set(c, ClusterState::RolledBack, now, reason);
            }
        }
        self.phase = if removed > 0 {
            Phase::Failed
        } else {
            Phase::RolledBack
        };
        self.paused = None;
        self.finished_at = Some(now);
        self.message = if removed > 0 {
            format!("{why}; {removed} cluster(s) ran no earlier revision and had the app removed")
        } else {
            why.to_string()
        };
    }

    /// Operator pause: nothing new starts until resumed.
    pub fn pause(&mut self, app: &str) -> Result<(), String> {
        match self.phase {
            Phase::Progressing => {
                self.phase = Phase::Paused;
                self.paused = Some(PauseReason::Operator);
                self.message =
                    format!("paused by an operator; `flotilla rollout resume {app}` continues");
                Ok(())
            }
            Phase::Paused => Ok(()),
            p => Err(format!(
                "the rollout is {p:?}; only an active rollout can be paused"
            )),
        }
    }

    /// Resumes after any pause; failures that caused a pause are tolerated from now on.
    pub fn resume(&mut self) -> Result<(), String> {
        if self.phase != Phase::Paused {
            return Err(format!("the rollout is {:?}, not Paused", self.phase));
        }
        if self.paused == Some(PauseReason::Step) {
            self.promote = true;
        }
        self.tolerated_failures = self.count(ClusterState::Failed);
        self.phase = Phase::Progressing;
        self.paused = None;
        self.message = "resumed".into();
        Ok(())
    }

    /// Skips the current step's soak or pause.
    pub fn promote(&mut self) -> Result<(), String> {
        if !self.phase.is_active() {
            return Err(format!(
                "the rollout is {:?}; only an active rollout can be promoted",
                self.phase
            ));
        }
        if self.phase == Phase::Paused {
            self.resume()?;
        }
        self.promote = true;
        Ok(())
    }

    /// Abort = roll back now.
    pub fn abort(&mut self, now: i64) -> Result<(), String> {
        if !self.phase.is_active() {
            return Err(format!(
                "the rollout is {:?}; only an active rollout can be aborted",
                self.phase
            ));
        }
        self.roll_back(now, "aborted by an operator: rolled back");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::HealthStatus;

    fn obs(digest: &str, sync: SyncStatus, health: HealthStatus) -> Observed {
        Observed {
            digest: digest.into(),
            sync,
            health,
        }
    }

    fn assigned(d: &str) -> Assigned {
        Assigned {
            digest: d.into(),
            revision: format!("rev-{d}"),
        }
    }

    fn strategy(yaml: &str) -> Strategy {
        let spec: RolloutSpec = serde_yaml_ng::from_str(yaml).unwrap();
        RolloutSpec::resolve(Some(&spec)).unwrap()
    }

    const THREE_STEPS: &str = r#"
steps:
  - {name: canary, selector: {matchLabels: {ring: canary}}, maxConcurrent: 1}
  - {name: eu, selector: {matchLabels: {region: eu}}, maxUnavailable: 2, soak: 30s}
  - {name: us, selector: {matchLabels: {region: us}}, maxUnavailable: "50%"}
failureThreshold: 1
onFailure: rollback
"#;

    /// A small world: clusters, their labels, connectivity and last reports.
    struct World {
        strategy: Strategy,
        target: BTreeMap<String, Assigned>,
        current: BTreeMap<String, Assigned>,
        views: BTreeMap<String, ClusterView>,
        now: i64,
        sync_requests: Option<BTreeMap<String, String>>,
    }

    impl World {
        fn new(strategy: &str, clusters: &[(&str, &[(&str, &str)])]) -> Self {
            let mut w = World {
                strategy: self::strategy(strategy),
                target: BTreeMap::new(),
                current: BTreeMap::new(),
                views: BTreeMap::new(),
                now: 1000,
                sync_requests: None,
            };
            for (name, labels) in clusters {
                w.target.insert(name.to_string(), assigned("new"));
                w.current.insert(name.to_string(), assigned("old"));
                w.views.insert(
                    name.to_string(),
                    ClusterView {
                        labels: labels
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        connected: true,
                        connected_since: None,
                        report: Some(obs("old", SyncStatus::Synced, HealthStatus::Healthy)),
                    },
                );
            }
            w
        }

        fn input(&self) -> Input<'_> {
            Input {
                app: "web",
                strategy: &self.strategy,
                target: &self.target,
                current: &self.current,
                clusters: &self.views,
                now: self.now,
                sync_requests: self.sync_requests.as_ref(),
            }
        }

        fn start(&self) -> Rollout {
            Rollout::start(1, "r2", 1, &self.input(), None)
        }

        /// Agents do what they are told: clusters assigned the new bundle report it Synced, with
        /// `health`.
        fn agents_apply(&mut self, r: &Rollout, health: HealthStatus) {
            self.agents_report(r, SyncStatus::Synced, health);
        }

        fn agents_report(&mut self, r: &Rollout, sync: SyncStatus, health: HealthStatus) {
            for (name, a) in r.assignments() {
                if let (Some(a), Some(v)) = (a, self.views.get_mut(&name))
                    && v.connected
                {
                    v.report = Some(obs(&a.digest, sync, health));
                }
            }
        }

        fn updating(r: &Rollout) -> Vec<&str> {
            r.clusters
                .iter()
                .filter(|(_, c)| c.state == ClusterState::Updating)
                .map(|(n, _)| n.as_str())
                .collect()
        }
    }

    fn fleet() -> World {
        World::new(
            THREE_STEPS,
            &[
                ("c1", &[("ring", "canary"), ("region", "eu")]),
                ("e1", &[("region", "eu")]),
                ("e2", &[("region", "eu")]),
                ("e3", &[("region", "eu")]),
                ("u1", &[("region", "us")]),
                ("u2", &[("region", "us")]),
                ("x1", &[("region", "ap")]),
            ],
        )
    }

    #[test]
    fn resolves_defaults_and_names_bad_fields() {
        let s = RolloutSpec::resolve(None).unwrap();
        assert_eq!(s.steps.len(), 1);
        assert_eq!(s.steps[0].max_unavailable.of(100), 25);
        assert_eq!(s.steps[0].max_unavailable.of(2), 1, "never zero");
        assert_eq!(s.on_failure, OnFailure::Pause);
        let table = [
            (
                "steps: [{selector: {}, maxUnavailable: 0}]",
                "steps[0].maxUnavailable",
            ),
            (
                "steps: [{selector: {}, maxConcurrent: \"x%\"}]",
                "steps[0].maxConcurrent",
            ),
            ("steps: [{selector: {}, soak: soon}]", "steps[0].soak"),
            ("progressDeadline: 5 parsecs", "progressDeadline"),
            ("failureThreshold: \"120%\"", "failureThreshold"),
        ];
        for (yaml, want) in table {
            let spec: RolloutSpec = serde_yaml_ng::from_str(yaml).unwrap();
            let err = RolloutSpec::resolve(Some(&spec)).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        assert!(serde_yaml_ng::from_str::<RolloutSpec>("onFailure: explode").is_err());
    }

    #[test]
    fn manual_apps_move_only_clusters_asked_to_sync() {
        let mut w = fleet();
        w.sync_requests = Some(BTreeMap::new());
        let mut r = w.start();
        assert!(W::updating(&r).is_empty(), "nobody asked");
        assert_eq!(r.phase, Phase::Progressing);
        assert!(r.message.contains("flotilla app sync"), "{}", r.message);
        assert_eq!(r.assignments()["c1"].as_ref().unwrap().digest, "old");
        // A request for another bundle (an older render) does not move the cluster either.
        let asked = w.sync_requests.as_mut().unwrap();
        asked.insert("c1".into(), "older".into());
        w.now += 1;
        r.advance(&w.input());
        assert!(W::updating(&r).is_empty());
        // Asked for the new bundle: it moves, and the step's caps still hold the rest.
        let asked = w.sync_requests.as_mut().unwrap();
        asked.insert("c1".into(), "new".into());
        asked.insert("e1".into(), "new".into());
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["c1"], "e1 waits for its step");
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["e1"]);
        w.agents_apply(&r, HealthStatus::Healthy);
        // Unasked clusters never time out: they stay Pending, the rollout waits.
        w.now += 100_000;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Progressing);
        assert_eq!(r.count(ClusterState::Failed), 0);
        assert_eq!(r.clusters["e2"].state, ClusterState::Pending);
        assert!(r.clusters["e2"].reason.contains("app sync"));
        assert_eq!(r.assignments()["e2"].as_ref().unwrap().digest, "old");
    }

    #[test]
    fn steps_run_in_order_within_their_caps() {
        let mut w = fleet();
        let mut r = w.start();
        assert_eq!(r.steps, ["canary", "eu", "us", "rest"]);
        assert_eq!(W::updating(&r), ["c1"], "canary first, one at a time");
        // Nobody outside the canary step has the new bundle yet.
        let a = r.assignments();
        assert_eq!(a["e1"].as_ref().unwrap().digest, "old");
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["e1", "e2"], "eu: maxUnavailable 2");
        w.agents_apply(&r, HealthStatus::Progressing);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(
            W::updating(&r),
            ["e1", "e2"],
            "no room until one is Healthy"
        );
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["e3"]);
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert!(W::updating(&r).is_empty());
        assert!(r.message.contains("soaking 30s"), "{}", r.message);
        w.now += 29;
        r.advance(&w.input());
        assert_eq!(r.current_step, 1, "still soaking");
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["u1"], "us: 50% of 2");
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["x1"], "unmatched clusters go last");
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Succeeded);
        assert_eq!(r.max_updating, 2);
        assert!(
            r.assignments()
                .values()
                .all(|a| a.as_ref().unwrap().digest == "new")
        );
    }

    type W = World;

    #[test]
    fn failing_canary_rolls_back_and_nobody_else_sees_the_revision() {
        let mut w = fleet();
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Degraded);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::RolledBack);
        assert_eq!(r.clusters["c1"].state, ClusterState::RolledBack);
        assert!(
            r.assignments()
                .values()
                .all(|a| a.as_ref().unwrap().digest == "old")
        );
        assert!(r.message.contains("c1"), "{}", r.message);
        // Terminal: more rounds change nothing.
        let before = r.clone();
        w.now += 100;
        r.advance(&w.input());
        assert_eq!(r, before);
    }

    #[test]
    fn an_apply_failure_on_the_new_bundle_fails_the_cluster_like_degraded() {
        // (what the canary reports on the new bundle) → its state after one round.
        let table = [
            (
                SyncStatus::Failed,
                HealthStatus::Healthy,
                ClusterState::RolledBack,
            ),
            (
                SyncStatus::Failed,
                HealthStatus::Missing,
                ClusterState::RolledBack,
            ),
            (
                SyncStatus::Synced,
                HealthStatus::Degraded,
                ClusterState::RolledBack,
            ),
            // Neither done nor failed: waits (the progress deadline decides).
            (
                SyncStatus::OutOfSync,
                HealthStatus::Healthy,
                ClusterState::Updating,
            ),
            (
                SyncStatus::Unknown,
                HealthStatus::Healthy,
                ClusterState::Updating,
            ),
            (
                SyncStatus::Synced,
                HealthStatus::Unknown,
                ClusterState::Updating,
            ),
            (
                SyncStatus::Synced,
                HealthStatus::Missing,
                ClusterState::Updating,
            ),
            (
                SyncStatus::Synced,
                HealthStatus::Healthy,
                ClusterState::Healthy,
            ),
        ];
        for (sync, health, want) in table {
            let mut w = fleet();
            let mut r = w.start();
            w.agents_report(&r, sync, health);
            w.now += 1;
            r.advance(&w.input());
            assert_eq!(r.clusters["c1"].state, want, "{sync} {health}");
            if want == ClusterState::RolledBack {
                assert_eq!(r.phase, Phase::RolledBack, "{sync} {health}");
                // The other steps' clusters never saw the new bundle.
                assert!(
                    r.assignments()
                        .values()
                        .all(|a| a.as_ref().unwrap().digest == "old")
                );
            }
        }
        // Synced and Healthy, then an apply failure on the same bundle while its step runs: failed.
        let mut w = fleet();
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.clusters["c1"].state, ClusterState::Healthy);
        w.views.get_mut("c1").unwrap().report =
            Some(obs("new", SyncStatus::Failed, HealthStatus::Degraded));
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.clusters["c1"].state, ClusterState::RolledBack);
        assert!(r.message.contains("c1"), "{}", r.message);
    }

    #[test]
    fn a_cluster_that_never_reports_synced_and_healthy_fails_at_its_deadline() {
        let mut w = fleet();
        let mut r = w.start();
        w.agents_report(&r, SyncStatus::OutOfSync, HealthStatus::Healthy);
        w.now += w.strategy.progress_deadline_secs + 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::RolledBack);
        assert!(
            r.clusters["c1"].reason.contains("rolled back"),
            "{}",
            r.clusters["c1"].reason
        );
    }

    #[test]
    fn pause_policy_waits_and_abort_rolls_back() {
        let mut w = fleet();
        w.strategy.on_failure = OnFailure::Pause;
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Degraded);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(
            (r.phase, r.paused),
            (Phase::Paused, Some(PauseReason::Failures))
        );
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Paused, "stays paused");
        assert_eq!(r.assignments()["c1"].as_ref().unwrap().digest, "new");
        r.abort(w.now).unwrap();
        assert_eq!(r.phase, Phase::RolledBack);
        assert_eq!(r.assignments()["c1"].as_ref().unwrap().digest, "old");
        assert!(
            r.abort(w.now).is_err(),
            "a finished rollout cannot be aborted"
        );
    }

    #[test]
    fn resume_tolerates_known_failures_and_counts_new_ones() {
        let mut w = fleet();
        w.strategy.on_failure = OnFailure::Pause;
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Degraded);
        w.now += 1;
        r.advance(&w.input());
        r.resume().unwrap();
        w.views.get_mut("c1").unwrap().report =
            Some(obs("new", SyncStatus::Synced, HealthStatus::Degraded));
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Progressing);
        // The tolerated canary no longer holds its step; the next step starts.
        assert_eq!(r.current_step, 1);
        assert_eq!(W::updating(&r), ["e1", "e2"]);
        // A new failure beyond the tolerated one triggers the policy again.
        w.agents_apply(&r, HealthStatus::Degraded);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Paused);
    }

    #[test]
    fn resume_past_a_failure_that_uses_the_whole_budget_still_progresses() {
        // The default strategy over three clusters: one at a time (25%, never below one).
        let mut w = World::new("{}", &[("a", &[]), ("b", &[]), ("c", &[])]);
        let mut r = w.start();
        assert_eq!(W::updating(&r), ["a"]);
        w.agents_report(&r, SyncStatus::Failed, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(
            (r.phase, r.paused),
            (Phase::Paused, Some(PauseReason::Failures))
        );
        r.resume().unwrap();
        w.now += 1;
        r.advance(&w.input());
        // Before, the failed cluster used the whole budget of one: nothing ever started again.
        assert_eq!(W::updating(&r), ["b"], "{}", r.message);
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["c"], "{}", r.message);
        // `a`, fixed, runs the new bundle Healthy: it leaves Failed.
        w.views.get_mut("a").unwrap().report =
            Some(obs("new", SyncStatus::Synced, HealthStatus::Healthy));
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.clusters["a"].state, ClusterState::Healthy);
        assert!(
            r.clusters["a"].reason.contains("recovered"),
            "{:?}",
            r.clusters["a"]
        );
        assert_eq!(r.phase, Phase::Succeeded, "{}", r.message);
    }

    #[test]
    fn a_new_bundle_at_the_same_revision_mid_rollout_moves_only_reached_clusters() {
        let mut w = World::new("{}", &[("a", &[]), ("b", &[]), ("c", &[])]);
        let mut r = w.start();
        assert_eq!(W::updating(&r), ["a"]);
        // Every cluster's labels changed: the same revision renders another bundle for each.
        for t in w.target.values_mut() {
            *t = assigned("relabelled");
        }
        w.now += 1;
        r.advance(&w.input());
        let a = &r.clusters["a"];
        assert_eq!(
            (a.state, a.to.digest.as_str()),
            (ClusterState::Updating, "relabelled")
        );
        let b = &r.clusters["b"];
        assert_eq!(
            (b.state, b.to.digest.as_str()),
            (ClusterState::Pending, "relabelled")
        );
        assert_eq!(r.assignments()["b"].as_ref().unwrap().digest, "old");
    }

    #[test]
    fn a_recovered_cluster_gives_its_budget_back_and_is_no_longer_tolerated() {
        let table = [
            // (failures resumed past, the failed cluster recovers) → who updates next
            (false, false, Vec::<&str>::new()),
            (false, true, vec!["b"]),
            (true, false, vec!["b"]),
        ];
        for (resumed, recovers, want) in table {
            let mut w = World::new(
                "{failureThreshold: 2}",
                &[("a", &[]), ("b", &[]), ("c", &[])],
            );
            let mut r = w.start();
            w.agents_report(&r, SyncStatus::Failed, HealthStatus::Healthy);
            w.now += 1;
            r.advance(&w.input());
            assert_eq!(r.phase, Phase::Progressing, "below the threshold of 2");
            if resumed {
                r.tolerated_failures = 1;
            }
            if recovers {
                w.agents_apply(&r, HealthStatus::Healthy);
            }
            w.now += 1;
            r.advance(&w.input());
            assert_eq!(
                W::updating(&r),
                want,
                "resumed {resumed}, recovers {recovers}"
            );
            if !resumed && !recovers {
                assert!(
                    r.message.contains("whole maxUnavailable budget"),
                    "{}",
                    r.message
                );
            }
            if recovers {
                assert_eq!(r.tolerated_failures, 0);
            }
        }
    }

    #[test]
    fn progress_deadline_and_offline_policies() {
        // Connected but never Healthy: fails at the deadline.
        let mut w = fleet();
        w.strategy.progress_deadline_secs = 60;
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Progressing);
        w.now += 60;
        r.advance(&w.input());
        assert_eq!(r.clusters["c1"].state, ClusterState::Updating);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::RolledBack);
        assert!(r.clusters["c1"].reason.contains("rolled back"));

        // Reconnected late (the hub restarted meanwhile): the deadline runs from the new session.
        let mut w = fleet();
        w.strategy.progress_deadline_secs = 60;
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Progressing);
        w.now += 100;
        w.views.get_mut("c1").unwrap().connected_since = Some(w.now - 5);
        r.advance(&w.input());
        assert_eq!(r.clusters["c1"].state, ClusterState::Updating, "{r:?}");
        w.now += 56;
        r.advance(&w.input());
        assert_eq!(
            r.phase,
            Phase::RolledBack,
            "a full deadline after reconnecting"
        );

        // Offline + wait: waits up to the offline timeout, then fails.
        let mut w = fleet();
        w.views.get_mut("c1").unwrap().connected = false;
        w.strategy.offline_timeout_secs = 120;
        let mut r = w.start();
        assert_eq!(W::updating(&r), ["c1"]);
        w.now += 100;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Progressing);
        w.now += 21;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::RolledBack);

        // Offline + skip: skipped, the rollout moves on, and it catches up on success.
        let mut w = fleet();
        w.views.get_mut("c1").unwrap().connected = false;
        w.strategy.offline_action = OfflineAction::Skip;
        w.strategy.steps[1].soak_secs = 0;
        let mut r = w.start();
        assert_eq!(r.clusters["c1"].state, ClusterState::Skipped);
        assert_eq!(r.assignments()["c1"].as_ref().unwrap().digest, "old");
        assert_eq!(W::updating(&r), ["e1", "e2"]);
        for _ in 0..10 {
            w.agents_apply(&r, HealthStatus::Healthy);
            w.now += 1;
            r.advance(&w.input());
        }
        assert_eq!(r.phase, Phase::Succeeded);
        assert_eq!(r.assignments()["c1"].as_ref().unwrap().digest, "new");
    }

    #[test]
    fn step_pause_waits_for_resume_or_promote_skips_soak() {
        let mut w = fleet();
        w.strategy.steps[0].pause = true;
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(
            (r.phase, r.paused),
            (Phase::Paused, Some(PauseReason::Step))
        );
        assert!(W::updating(&r).is_empty());
        r.resume().unwrap();
        r.advance(&w.input());
        assert_eq!(r.current_step, 1);
        assert_eq!(W::updating(&r), ["e1", "e2"]);
        for _ in 0..3 {
            w.agents_apply(&r, HealthStatus::Healthy);
            w.now += 1;
            r.advance(&w.input());
        }
        assert!(r.message.contains("soaking"), "{}", r.message);
        r.promote().unwrap();
        r.advance(&w.input());
        assert_eq!(r.current_step, 2, "promote skipped the soak");
        assert!(!r.promote, "promote applies once");
    }

    #[test]
    fn operator_pause_holds_new_starts() {
        let mut w = fleet();
        let mut r = w.start();
        r.pause("web").unwrap();
        w.agents_apply(&r, HealthStatus::Healthy);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.current_step, 0);
        assert!(W::updating(&r).is_empty() && r.clusters["c1"].state == ClusterState::Healthy);
        r.resume().unwrap();
        r.advance(&w.input());
        assert_eq!(W::updating(&r), ["e1", "e2"]);
    }

    #[test]
    fn label_changes_and_membership_mid_rollout() {
        let mut w = fleet();
        let mut r = w.start();
        // e3 becomes a canary before its step: it moves into the running canary step.
        w.views
            .get_mut("e3")
            .unwrap()
            .labels
            .insert("ring".into(), "canary".into());
        // u2 leaves the app's targets; a new cluster n1 joins.
        w.target.remove("u2");
        w.target.insert("n1".into(), assigned("new"));
        w.views.insert(
            "n1".into(),
            ClusterView {
                labels: [("region".to_string(), "us".to_string())].into(),
                connected: true,
                connected_since: None,
                report: None,
            },
        );
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.clusters["e3"].step, 0);
        assert!(!r.clusters.contains_key("u2"));
        assert_eq!(r.clusters["n1"].step, 2);
        assert_eq!(
            r.assignments()["n1"],
            None,
            "a new cluster waits for its step"
        );
        // A cluster already touched keeps its step when its labels change.
        w.views.get_mut("c1").unwrap().labels.remove("ring");
        r.advance(&w.input());
        assert_eq!(r.clusters["c1"].step, 0);
    }

    #[test]
    fn unchanged_bundles_are_done_at_once_and_superseding_keeps_the_stable_origin() {
        let mut w = fleet();
        w.target.insert("x1".into(), assigned("old"));
        let r = w.start();
        assert_eq!(r.clusters["x1"].state, ClusterState::Healthy);
        // r2 touched c1; a newer commit r3 supersedes: c1 still rolls back to "old", not "new".
        w.current = r
            .assignments()
            .into_iter()
            .filter_map(|(n, a)| Some((n, a?)))
            .collect();
        for t in w.target.values_mut() {
            *t = assigned("newer");
        }
        let mut r3 = Rollout::start(2, "r3", 1, &w.input(), Some(&r));
        assert_eq!(r3.clusters["c1"].from.as_ref().unwrap().digest, "old");
        r3.abort(w.now).unwrap();
        assert_eq!(r3.assignments()["c1"].as_ref().unwrap().digest, "old");
    }

    #[test]
    fn first_rollout_rolled_back_removes_the_app_from_touched_clusters() {
        let mut w = fleet();
        w.current.clear();
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Degraded);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Failed);
        assert_eq!(r.assignments()["c1"], None);
        assert_eq!(r.assignments()["e1"], None);
    }

    #[test]
    fn percentage_threshold_counts_the_whole_rollout() {
        let mut w = fleet();
        w.strategy.failure_threshold = IntOrPercent::Percent("30%".into());
        w.strategy.steps[0].max_concurrent = None;
        // 7 clusters: 30% = 2 failures needed; one canary failing is not enough.
        let mut r = w.start();
        w.agents_apply(&r, HealthStatus::Degraded);
        w.now += 1;
        r.advance(&w.input());
        assert_eq!(r.phase, Phase::Progressing);
        assert_eq!(r.count(ClusterState::Failed), 1);
    }
}

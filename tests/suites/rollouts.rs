//! Fleet-wide rollouts through the real hub and CLI: 21 kubesim clusters in three steps (canary, eu,
//! us), caps observed from outside, a broken Deployment stopped at the canaries, operator levers,
//! rollback to an earlier revision, and a hub killed mid-rollout.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use flotilla_e2e::{GitRepo, Hub, HubOptions, InProcessAgents, SimCluster, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(90);
const CANARIES: usize = 3;
const EU: usize = 9;
const US: usize = 9;

/// Caps per step, as the strategy below sets them (us: 50% of 9 = 4).
const CAPS: [usize; 3] = [1, 3, 4];

fn manifests(version: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web}}\ndata: {{version: \"{version}\"}}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec: {{containers: [{{name: web, image: \"{image}\"}}]}}\n"
    )
}

fn app_doc(repo: &GitRepo, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n  rollout:\n    steps:\n      - {{name: canary, selector: {{matchLabels: {{ring: canary}}}}, maxConcurrent: 1{extra}}}\n      - {{name: eu, selector: {{matchLabels: {{region: eu}}}}, maxUnavailable: 3, soak: 2s}}\n      - {{name: us, selector: {{matchLabels: {{region: us}}}}, maxUnavailable: \"50%\"}}\n    progressDeadline: 30s\n",
        repo.url()
    )
}

/// A hub, 21 clusters with agents, and a git repository.
struct Fleet {
    /// First, so the agents stop before the hub and the clusters they talk to.
    _agents: InProcessAgents,
    hub: Hub,
    clusters: SimCluster,
    repo: GitRepo,
    names: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    fn start() -> Result<Self> {
        let names: Vec<String> = (0..CANARIES + EU + US)
            .map(|i| format!("c{i:02}"))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let clusters = SimCluster::start_many(&refs)?;
        let hub = Hub::start(HubOptions {
            poll_interval: "300ms".into(),
            ..HubOptions::default()
        })?;
        let token = hub.token(&["--uses", &names.len().to_string()])?;
        let dir = tempfile::tempdir()?;
        let agents = InProcessAgents::start_labelled(
            &hub,
            &clusters,
            &names,
            &token,
            dir.path(),
            |i, _| {
                let mut labels = BTreeMap::new();
                let region = if i < CANARIES + EU { "eu" } else { "us" };
                labels.insert("region".to_string(), region.to_string());
                if i < CANARIES {
                    labels.insert("ring".to_string(), "canary".to_string());
                }
                labels
            },
        )?;
        let repo = GitRepo::init(&dir.path().join("repo"))?;
        let fleet = Self {
            hub,
            clusters,
            repo,
            names,
            _agents: agents,
            _dir: dir,
        };
        fleet.hub.wait_all_connected(fleet.names.len(), T)?;
        Ok(fleet)
    }

    fn step_of(&self, cluster: &str) -> usize {
        let i: usize = cluster[1..].parse().unwrap_or(0);
        if i < CANARIES {
            0
        } else if i < CANARIES + EU {
            1
        } else {
            2
        }
    }

    fn commit(&self, version: &str, image: &str) -> Result<String> {
        self.repo
            .write("web/app.yaml", &manifests(version, image))?;
        self.repo.commit(version)
    }

    fn rollout(&self) -> Result<Value> {
        self.hub.cli_json(&["rollout", "status", "web"])
    }

    fn act(&self, action: &str) -> Result<Value> {
        self.hub.cli_json(&["rollout", action, "web"])
    }

    /// Waits for the rollout of `revision` to reach `phase`.
    fn wait_phase(&self, revision: &str, phase: &str) -> Result<Value> {
        wait_for(T, &format!("rollout of {revision} {phase}"), || {
            let r = self.rollout()?;
            // On a timeout, every cluster that is not Healthy, with why: a failed cluster's
            // reason is what tells a slow machine from a wrong decision.
            let unwell: Vec<String> = r["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|c| c["state"] != "Healthy")
                .map(|c| format!("{} {} {}", c["cluster"], c["state"], c["reason"]))
                .collect();
            ensure!(
                r["revision"] == revision && r["phase"] == phase,
                "rollout is {} {}: {}; not Healthy: {unwell:?}",
                r["revision"],
                r["phase"],
                r["message"]
            );
            Ok(Some(r))
        })
    }

    /// The `version` of the web ConfigMap in `cluster`, as its API server has it.
    fn version_in(&self, cluster: &str) -> Result<Option<String>> {
        Ok(self
            .clusters
            .object(cluster, "ConfigMap", "default", "web")?
            .and_then(|o| o["data"]["version"].as_str().map(str::to_string)))
    }

    fn all_at(&self, version: &str) -> Result<()> {
        wait_for(T, &format!("every cluster runs {version}"), || {
            for name in &self.names {
                let v = self.version_in(name)?;
                ensure!(v.as_deref() == Some(version), "{name} runs {v:?}");
            }
            Ok(Some(()))
        })
    }
}

fn clusters_of(r: &Value) -> Vec<(String, String)> {
    r["clusters"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|c| {
                    (
                        c["cluster"].as_str().unwrap_or_default().to_string(),
                        c["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What a watcher of `rollout status` saw during one rollout.
#[derive(Default, Debug)]
struct Observed {
    max_updating: [usize; 3],
    /// Clusters ever seen past Pending.
    touched: BTreeSet<String>,
    samples: usize,
}

/// Samples `rollout status` until the rollout of `revision` is in one of `until`, checking on
/// every sample that steps run in order and caps hold.
fn watch(fleet: &Fleet, revision: &str, until: &[&str]) -> Result<(Observed, Value)> {
    let mut seen = Observed::default();
    let started = Instant::now();
    loop {
        ensure!(
            started.elapsed() < T,
            "rollout of {revision} did not finish: {seen:?}"
        );
        let r = match fleet.rollout() {
            Ok(r) => r,
            // Applied a moment ago and not rendered yet.
            Err(e) if e.to_string().contains("has no rollout yet") => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        if r["revision"] != revision {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        seen.samples += 1;
        let mut updating = [0usize; 3];
        let mut all_healthy_below = [true; 3];
        let mut touched_in = [false; 3];
        for (name, state) in clusters_of(&r) {
            let step = fleet.step_of(&name);
            if state == "Updating" {
                updating[step] += 1;
            }
            if state != "Pending" {
                touched_in[step] = true;
                seen.touched.insert(name.clone());
            }
            if state != "Healthy" {
                for later in all_healthy_below.iter_mut().skip(step + 1) {
                    *later = false;
                }
            }
        }
        for step in 0..3 {
            seen.max_updating[step] = seen.max_updating[step].max(updating[step]);
            ensure!(
                updating[step] <= CAPS[step],
                "step {step}: {} updating, cap {}",
                updating[step],
                CAPS[step]
            );
            let phase = r["phase"].as_str().unwrap_or_default();
            if touched_in[step] && phase != "RolledBack" && phase != "Succeeded" {
                ensure!(
                    all_healthy_below[step],
                    "step {step} started before the steps before it were Healthy: {r}"
                );
            }
        }
        if until.iter().any(|p| r["phase"] == *p) {
            return Ok((seen, r));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn good_commits_roll_through_steps_within_caps_and_a_broken_canary_rolls_back() -> Result<()> {
    let fleet = Fleet::start()?;
    let strategy = app_doc(&fleet.repo, "").replace(
        "    progressDeadline: 30s\n",
        "    progressDeadline: 30s\n    onFailure: rollback\n",
    );
    let v1 = fleet.commit("1", "nginx:1.27")?;
    fleet.hub.apply_app(&strategy)?;
    // The first deployment is a rollout too.
    let (_, r) = watch(&fleet, &v1, &["Succeeded"])?;
    ensure!(r["phase"] == "Succeeded", "{r}");
    fleet.all_at("1")?;

    let v2 = fleet.commit("2", "nginx:1.28")?;
    let t = Instant::now();
    let (seen, r) = watch(&fleet, &v2, &["Succeeded", "RolledBack", "Paused"])?;
    ensure!(r["phase"] == "Succeeded", "{r}");
    println!(
        "good rollout to 21 clusters in {:?}; most updating at once per step (canary, eu, us): {:?} (caps {CAPS:?}); {} samples; hub's own count: {}",
        t.elapsed(),
        seen.max_updating,
        seen.samples,
        r["maxUpdating"]
    );
    ensure!(r["maxUpdating"].as_u64().unwrap_or(99) <= 4, "{r}");
    fleet.all_at("2")?;

    // A broken Deployment: fails at the canaries, which return to v2; nobody else ever sees v3.
    let v3 = fleet.commit("3", "nginx:broken")?;
    let (seen, r) = watch(&fleet, &v3, &["RolledBack", "Failed", "Succeeded"])?;
    ensure!(r["phase"] == "RolledBack", "{r}");
    let outside: Vec<_> = seen
        .touched
        .iter()
        .filter(|c| fleet.step_of(c) != 0)
        .collect();
    ensure!(
        outside.is_empty(),
        "clusters outside the canary step were touched: {outside:?}"
    );
    ensure!(
        r["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rolled back"),
        "{r}"
    );
    for name in &fleet.names {
        let step = fleet.step_of(name);
        if step != 0 {
            ensure!(
                fleet.version_in(name)?.as_deref() == Some("2"),
                "{name} saw v3"
            );
        }
    }
    fleet.all_at("2")?;
    // The canaries' agents report v2 again, Healthy.
    wait_for(T, "canaries Healthy on v2", || {
        let rows = fleet.hub.status()?;
        let ok = rows
            .iter()
            .filter(|r| fleet.step_of(r["cluster"].as_str().unwrap_or("c99")) == 0)
            .all(|r| r["revision"] == v2 && r["health"] == "Healthy");
        ensure!(ok, "{rows:?}");
        Ok(Some(()))
    })?;
    // Polling the same bad revision again does not restart it.
    std::thread::sleep(Duration::from_secs(1));
    ensure!(fleet.rollout()?["phase"] == "RolledBack");
    Ok(())
}

#[test]
fn operator_levers_survive_a_hub_kill_and_rollback_restores_an_earlier_revision() -> Result<()> {
    let mut fleet = Fleet::start()?;
    // The canary step pauses for a human; failures pause too (the default).
    fleet
        .hub
        .apply_app(&app_doc(&fleet.repo, ", pause: true"))?;
    let v1 = fleet.commit("1", "nginx:1.27")?;
    let r = fleet.wait_phase(&v1, "Paused")?;
    ensure!(r["pausedReason"] == "Step" && r["currentStep"] == 0, "{r}");
    ensure!(
        clusters_of(&r)
            .iter()
            .all(|(c, s)| (fleet.step_of(c) == 0) == (s == "Healthy")),
        "only canaries before the pause: {r}"
    );
    fleet.act("resume")?;
    fleet.wait_phase(&v1, "Succeeded")?;
    fleet.all_at("1")?;

    // v2: canaries, pause, promote; kill -9 the hub while eu is in progress.
    let v2 = fleet.commit("2", "nginx:1.28")?;
    fleet.wait_phase(&v2, "Paused")?;
    fleet.act("promote")?;
    let before = wait_for(T, "eu step started", || {
        let r = fleet.rollout()?;
        ensure!(r["currentStep"] == 1, "{r}");
        Ok(Some(r))
    })?;
    let canary_rv = fleet
        .clusters
        .object("c00", "ConfigMap", "default", "web")?
        .context("c00 has web")?["metadata"]["resourceVersion"]
        .clone();
    fleet.hub.kill9();
    fleet.hub.restart()?;
    let after = fleet.rollout()?;
    ensure!(after["currentStep"].as_u64() >= Some(1), "{after}");
    for (name, state) in clusters_of(&before) {
        if fleet.step_of(&name) == 0 {
            ensure!(state == "Healthy", "{name} {state}");
            let now = clusters_of(&after);
            ensure!(
                now.contains(&(name.clone(), "Healthy".into())),
                "{name} after restart: {after}"
            );
        }
    }
    // Pause: nothing new starts.
    fleet.act("pause")?;
    let paused = fleet.wait_phase(&v2, "Paused")?;
    let touched = |r: &Value| {
        clusters_of(r)
            .into_iter()
            .filter(|(_, s)| s != "Pending")
            .map(|(c, _)| c)
            .collect::<BTreeSet<_>>()
    };
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        touched(&fleet.rollout()?) == touched(&paused),
        "a paused rollout started clusters"
    );
    fleet.act("resume")?;
    fleet.wait_phase(&v2, "Succeeded")?;
    fleet.all_at("2")?;
    // The canaries were not re-applied by the restarted hub.
    let rv_now = fleet
        .clusters
        .object("c00", "ConfigMap", "default", "web")?
        .context("c00 has web")?["metadata"]["resourceVersion"]
        .clone();
    ensure!(
        rv_now == canary_rv,
        "c00's ConfigMap was rewritten: {canary_rv} -> {rv_now}"
    );

    // v3 is broken: the canary fails, the rollout pauses, abort rolls back.
    let v3 = fleet.commit("3", "nginx:broken")?;
    let r = fleet.wait_phase(&v3, "Paused")?;
    ensure!(r["pausedReason"] == "Failures", "{r}");
    fleet.act("abort")?;
    fleet.wait_phase(&v3, "RolledBack")?;
    fleet.all_at("2")?;

    // Rollback to v1 fleet-wide, through a rollout (the canary pause is promoted).
    let out = fleet
        .hub
        .cli(&["app", "rollback", "web", "--to", &v1[..10]])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_phase(&v1, "Paused")?;
    fleet.act("promote")?;
    fleet.wait_phase(&v1, "Succeeded")?;
    fleet.all_at("1")?;
    let app = fleet.hub.app("web")?;
    ensure!(app["pinned_revision"] == v1, "{app}");
    let history = fleet.hub.cli_json(&["app", "history", "web"])?;
    ensure!(
        history.as_array().is_some_and(|h| h
            .iter()
            .any(|e| e["revision"] == v3 && e["rolled_out"] == false)),
        "{history}"
    );

    // A bad --to names the problem.
    let out = fleet
        .hub
        .cli(&["app", "rollback", "web", "--to", "deadbeef"])?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("deadbeef") && err.contains("history"), "{err}");

    let audit = fleet.hub.cli_json(&["audit"])?;
    let actions: Vec<&str> = audit
        .as_array()
        .ok_or_else(|| anyhow!("{audit}"))?
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for want in [
        "app.apply",
        "rollout.resume",
        "rollout.promote",
        "rollout.pause",
        "rollout.abort",
        "app.rollback",
    ] {
        ensure!(
            actions.contains(&want),
            "{want} missing from the audit log: {actions:?}"
        );
    }
    Ok(())
}

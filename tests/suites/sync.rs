//! Manual sync and diff, through the real hub, agent and CLI binaries: a manual app
//! (`syncPolicy.automated: false`) changes nothing until `flotilla app sync`, its rollout moves only
//! the clusters asked, `flotilla app diff` shows the pending change like `kubectl diff` (exit 1),
//! and with `selfHeal: false` drift is reported, not healed, with Secret values never shown.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use flotilla_e2e::wait_for;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// The harness's fleet, with this suite's helpers.
struct Fleet(flotilla_e2e::Fleet);

impl std::ops::Deref for Fleet {
    type Target = flotilla_e2e::Fleet;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Fleet {
    /// Clusters `names`, all labelled `region=eu`.
    fn start(names: &[&str]) -> Result<Self> {
        let clusters: Vec<(&str, &str)> = names.iter().map(|n| (*n, "region=eu")).collect();
        Ok(Self(flotilla_e2e::Fleet::start(&clusters)?))
    }

    fn apply(&self, sync_policy: &str) -> Result<()> {
        self.hub.apply_app(&format!(
            "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchLabels: {{region: eu}}}}}}\n  syncPolicy: {sync_policy}\n  rollout: {{steps: [{{selector: {{}}, maxUnavailable: 2}}]}}\n",
            self.repo.url()
        ))
    }

    fn row(&self, cluster: &str) -> Result<Value> {
        self.hub
            .status()?
            .into_iter()
            .find(|r| r["app"] == "web" && r["cluster"] == cluster)
            .ok_or_else(|| anyhow!("no status row for web on {cluster}"))
    }

    /// Waits for `cluster`'s row to read `sync`/`health` with the reported revision `revision`
    /// (empty: any).
    fn wait_row(&self, cluster: &str, sync: &str, health: &str, revision: &str) -> Result<Value> {
        wait_for(T, &format!("web {sync}/{health} on {cluster}"), || {
            let r = self.row(cluster)?;
            ensure!(
                r["sync"] == sync
                    && r["health"] == health
                    && (revision.is_empty() || r["revision"] == revision),
                "{r}"
            );
            Ok(Some(r))
        })
    }

    /// `flotilla app diff web --cluster C`: (exit code, stdout).
    fn diff(&self, cluster: &str) -> Result<(i32, String)> {
        let out = self
            .hub
            .cli(&["app", "diff", "web", "--cluster", cluster])?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }

    /// Waits until the diff of `cluster` contains every line of `lines` (exit code 1).
    fn wait_diff(&self, cluster: &str, lines: &[&str]) -> Result<String> {
        wait_for(T, &format!("a diff on {cluster} with {lines:?}"), || {
            let (code, text) = self.diff(cluster)?;
            ensure!(code == 1, "exit code {code}: {text}");
            for l in lines {
                ensure!(text.lines().any(|t| t == *l), "{l:?} not in:\n{text}");
            }
            Ok(Some(text))
        })
    }

    /// What an operator does with kubectl: a merge patch of `kind`/web in eu-1.
    fn edit_by_hand(&self, kind: &str, patch: &str) -> Result<()> {
        let args = ["patch", kind, "web", "--type=merge", "-p", patch];
        self.clusters.kubectl("eu-1", &args, "").map(|_| ())
    }

    fn configmap(&self, cluster: &str) -> Result<Option<Value>> {
        self.clusters.object(cluster, "ConfigMap", "default", "web")
    }
}

const CM_V1: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: one}\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_manual_app_changes_nothing_until_synced_and_diff_shows_the_pending_change() -> Result<()>
{
    let f = Fleet::start(&["eu-1", "eu-2"])?;
    f.repo.write("web/cm.yaml", CM_V1)?;
    let first = f.repo.commit("first")?;
    f.apply("{automated: false}")?;
    f.hub.wait_revision("web", &first, T)?;

    // Never synced: OutOfSync everywhere, nothing in the clusters, the diff is the whole object.
    for c in ["eu-1", "eu-2"] {
        let r = f.wait_row(c, "OutOfSync", "Missing", "")?;
        let message = r["message"].as_str().unwrap_or("");
        assert!(message.contains("manual sync"), "{r}");
        // The diff it suggests runs as printed (the sync it suggests is run below, by hand).
        let diff = format!("flotilla app diff web --cluster {c}");
        assert!(flotilla_e2e::hints(message).contains(&diff), "{r}");
        f.hub.run_hint(&diff)?;
    }
    let text = f.wait_diff("eu-1", &["+kind: ConfigMap", "+  v: one"])?;
    assert!(text.starts_with("--- live/ConfigMap default/web"), "{text}");
    // Still nothing applied, some resyncs later.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        f.configmap("eu-1")?.is_none(),
        "a manual app applied by itself"
    );
    let rollout = f.hub.cli_json(&["rollout", "status", "web"])?;
    assert_eq!(rollout["phase"], "Progressing", "{rollout}");
    assert!(
        rollout["message"]
            .as_str()
            .unwrap_or("")
            .contains("flotilla app sync"),
        "{rollout}"
    );

    // One cluster asked: it alone changes; the sync is audited.
    let asked = f
        .hub
        .cli_json(&["app", "sync", "web", "--cluster", "eu-1"])?;
    assert_eq!(asked[0]["cluster"], "eu-1", "{asked}");
    f.wait_row("eu-1", "Synced", "Healthy", &first)?;
    assert_eq!(f.configmap("eu-1")?.expect("applied")["data"]["v"], "one");
    assert!(f.configmap("eu-2")?.is_none(), "eu-2 was not asked");
    f.wait_row("eu-2", "OutOfSync", "Missing", "")?;
    let (code, text) = f.diff("eu-1")?;
    assert_eq!((code, text.as_str()), (0, ""), "synced: no diff");
    let audit = f.hub.cli_json(&["audit"])?;
    assert!(
        audit
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["action"] == "app.sync"
                && e["target"] == "app/web"
                && e["detail"].as_str().unwrap_or("").contains("eu-1")),
        "{audit}"
    );

    // A new commit: eu-1 keeps what it runs and shows the pending change.
    f.repo.write("web/cm.yaml", &CM_V1.replace("one", "two"))?;
    let second = f.repo.commit("second")?;
    f.hub.wait_revision("web", &second, T)?;
    f.wait_diff("eu-1", &["-  v: one", "+  v: two"])?;
    f.wait_row("eu-1", "OutOfSync", "Healthy", &first)?;
    assert_eq!(f.configmap("eu-1")?.expect("kept")["data"]["v"], "one");

    // Drift by hand is reported, not healed.
    f.edit_by_hand("configmap", r#"{"data":{"v":"by-hand"}}"#)?;
    f.wait_diff("eu-1", &["-  v: by-hand", "+  v: two"])?;
    assert_eq!(f.configmap("eu-1")?.expect("kept")["data"]["v"], "by-hand");

    // Everyone asked: every cluster converges on the new revision and the rollout finishes.
    f.hub.cli_json(&["app", "sync", "web"])?;
    for c in ["eu-1", "eu-2"] {
        f.wait_row(c, "Synced", "Healthy", &second)?;
        assert_eq!(f.configmap(c)?.expect("applied")["data"]["v"], "two", "{c}");
    }
    wait_for(T, "the rollout to succeed", || {
        let r = f.hub.cli_json(&["rollout", "status", "web"])?;
        ensure!(
            r["phase"] == "Succeeded" && r["revision"] == second.as_str(),
            "{r}"
        );
        Ok(Some(()))
    })?;
    let (code, _) = f.diff("eu-2")?;
    assert_eq!(code, 0);

    // Bad requests name what is wrong; `diff` errors exit 2, not 1.
    let out = f.hub.cli(&["app", "sync", "web", "--cluster", "nowhere"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not target cluster \"nowhere\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = f.hub.cli(&["app", "diff", "nope", "--cluster", "eu-1"])?;
    assert_eq!(out.status.code(), Some(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn self_heal_off_reports_drift_without_healing_and_never_shows_secret_values() -> Result<()> {
    let f = Fleet::start(&["eu-1"])?;
    f.repo.write("web/cm.yaml", CM_V1)?;
    f.repo.write(
        "web/secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata: {name: web}\nstringData: {password: hunter2-canary}\n",
    )?;
    let first = f.repo.commit("first")?;
    f.apply("{selfHeal: false}")?;
    // Automated: the new revision is applied.
    f.wait_row("eu-1", "Synced", "Healthy", &first)?;

    f.edit_by_hand("configmap", r#"{"data":{"v":"by-hand"}}"#)?;
    f.edit_by_hand("secret", r#"{"stringData":{"password":"changed-by-hand"}}"#)?;
    let text = f.wait_diff(
        "eu-1",
        &[
            "-  v: by-hand",
            "+  v: one",
            "-  password: (secret value, before)",
        ],
    )?;
    let r = f.wait_row("eu-1", "OutOfSync", "Healthy", &first)?;
    assert!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("selfHeal is off"),
        "{r}"
    );
    for secret in [
        "hunter2-canary",
        "changed-by-hand",
        "aHVudGVyMi1jYW5hcnk",
        "Y2hhbmdlZC1ieS1oYW5k",
    ] {
        assert!(!text.contains(secret), "{secret} in the diff:\n{text}");
        assert!(
            !r.to_string().contains(secret),
            "{secret} in the status: {r}"
        );
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        f.configmap("eu-1")?.expect("kept")["data"]["v"],
        "by-hand",
        "selfHeal off: drift is not healed"
    );

    // An operator's sync applies git again, once.
    f.hub
        .cli_json(&["app", "sync", "web", "--cluster", "eu-1"])?;
    wait_for(T, "the sync to restore the ConfigMap", || {
        let v = f.configmap("eu-1")?.expect("kept")["data"]["v"].clone();
        ensure!(v == "one", "{v}");
        Ok(Some(()))
    })?;
    f.wait_row("eu-1", "Synced", "Healthy", &first)?;

    // Healing turned back on reaches the agent without a new commit: drift is healed again.
    f.apply("{selfHeal: true}")?;
    std::thread::sleep(Duration::from_secs(1));
    f.edit_by_hand("configmap", r#"{"data":{"v":"again"}}"#)?;
    wait_for(T, "drift healed once selfHeal is back", || {
        let v = f.configmap("eu-1")?.expect("kept")["data"]["v"].clone();
        ensure!(v == "one", "{v}");
        Ok(Some(()))
    })?;
    Ok(())
}

/// An automated app diffs too: a cluster its rollout has not reached yet shows what the next sync
/// will change there (the revision git wants), one it reached shows nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_automated_app_shows_what_its_rollout_will_change_on_clusters_not_reached_yet()
-> Result<()> {
    let f = Fleet(flotilla_e2e::Fleet::start(&[
        ("eu-1", "region=eu,ring=canary"),
        ("eu-2", "region=eu"),
    ])?);
    f.repo.write("web/cm.yaml", CM_V1)?;
    let first = f.repo.commit("first")?;
    f.hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchLabels: {{region: eu}}}}}}\n  rollout: {{steps: [{{name: canary, selector: {{matchLabels: {{ring: canary}}}}, pause: true}}, {{name: rest, selector: {{}}}}]}}\n",
        f.repo.url()
    ))?;
    f.wait_row("eu-1", "Synced", "Healthy", &first)?;
    // The first rollout pauses after the canary too: let it go on.
    f.wait_phase("web", &first, "Paused")?;
    f.hub.run_hint("flotilla rollout resume web")?;
    f.wait_row("eu-2", "Synced", "Healthy", &first)?;
    for c in ["eu-1", "eu-2"] {
        let (code, text) = f.diff(c)?;
        ensure!(code == 0 && text.trim().is_empty(), "{c}: {code} {text}");
    }

    f.repo.write("web/cm.yaml", &CM_V1.replace("one", "two"))?;
    let second = f.repo.commit("second")?;
    f.wait_row("eu-1", "Synced", "Healthy", &second)?;
    // Paused after the canary: eu-2 still runs `first`, and its diff is the change to come.
    f.wait_diff("eu-2", &["-  v: one", "+  v: two"])?;
    let (code, text) = f.diff("eu-1")?;
    ensure!(code == 0, "the canary has nothing left to change: {text}");
    ensure!(
        f.configmap("eu-2")?.expect("kept")["data"]["v"] == "one",
        "a diff changes nothing"
    );

    f.wait_phase("web", &second, "Paused")?;
    f.hub.run_hint("flotilla rollout resume web")?;
    f.wait_row("eu-2", "Synced", "Healthy", &second)?;
    wait_for(T, "eu-2's diff empty once reached", || {
        let (code, text) = f.diff("eu-2")?;
        ensure!(code == 0, "{code}: {text}");
        Ok(Some(()))
    })?;
    Ok(())
}

/// A change of the sync policy alone (no commit) reaches the agent: `createNamespace` turned on
/// for an app whose namespace is missing lets it apply.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_policy_change_without_a_commit_takes_effect() -> Result<()> {
    let f = Fleet::start(&["eu-1"])?;
    f.repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, namespace: shop}\ndata: {v: one}\n",
    )?;
    let first = f.repo.commit("first")?;
    f.apply("{createNamespace: false}")?;
    let r = f.wait_row("eu-1", "SyncFailed", "Degraded", "")?;
    ensure!(
        r["message"]
            .as_str()
            .unwrap_or("")
            .contains("namespace shop does not exist"),
        "{r}"
    );
    f.apply("{createNamespace: true}")?;
    f.wait_row("eu-1", "Synced", "Healthy", &first)?;
    Ok(())
}

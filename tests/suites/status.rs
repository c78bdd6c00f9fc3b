//! Status is true: an object that could not be applied is never Healthy and never lets a rollout
//! proceed; a fix made outside git converges without a commit; `createNamespace` creates what the
//! bundle needs; manifests' own `${…}` arrive verbatim; one app owns an object. All through the real
//! hub, agent and CLI binaries, with kubectl as an independent client of the clusters.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use flotilla_e2e::wait_for;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

use flotilla_e2e::Fleet;

fn deployment(ns: &str, app_label: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {ns}}}\nspec:\n  replicas: 1\n  selector: {{matchLabels: {{app: {app_label}}}}}\n  template:\n    metadata: {{labels: {{app: {app_label}}}}}\n    spec: {{containers: [{{name: web, image: \"nginx:1.27\"}}]}}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_namespace_is_never_healthy_until_created_and_create_namespace_creates_it()
-> Result<()> {
    let f = Fleet::start(&[
        ("eu-1", "region=eu"),
        ("eu-2", "region=eu"),
        ("us-1", "region=us"),
    ])?;
    f.repo
        .write("ghost/web.yaml", &deployment("ghost", "web"))?;
    f.repo.write("made/web.yaml", &deployment("made", "web"))?;
    let rev = f.repo.commit("apps in namespaces that do not exist")?;

    // (1) Without createNamespace: never Healthy, the rollout does not succeed.
    f.apply("ghost", "ghost", "  targets: {clusters: [eu-1]}\n")?;
    let failed = wait_for(T, "ghost SyncFailed on eu-1", || {
        let rows = f.rows("ghost")?;
        for r in &rows {
            ensure!(
                r["health"] != "Healthy",
                "a failed apply read as Healthy: {r}"
            );
        }
        match rows.as_slice() {
            [r] if r["sync"] == "SyncFailed" => Ok(Some(r.clone())),
            _ => Err(anyhow!("{}", serde_json::to_string(&rows)?)),
        }
    })?;
    assert_eq!(failed["health"], "Degraded", "{failed}");
    let message = failed["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Deployment ghost/web")
            && message.contains("namespace ghost does not exist; create it or set")
            && message.contains("createNamespace"),
        "{message}"
    );
    assert_eq!(
        message.matches("ghost/web").count(),
        1,
        "names the object once: {message}"
    );
    // `app get` carries each cluster's own word too.
    let app = f.hub.app("ghost")?;
    let eu = &app["clusters"][0];
    assert_eq!(
        (&eu["cluster"], &eu["sync"]),
        (&"eu-1".into(), &"SyncFailed".into()),
        "{app}"
    );
    assert!(
        eu["message"]
            .as_str()
            .is_some_and(|m| m.contains("namespace ghost does not exist")),
        "{app}"
    );
    // A few more rounds of retries: still failed, never Healthy, the rollout stopped.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(500));
        let rows = f.rows("ghost")?;
        ensure!(rows.iter().all(|r| r["health"] != "Healthy"), "{rows:?}");
    }
    let rollout = f.rollout("ghost")?;
    assert_ne!(rollout["phase"], "Succeeded", "{rollout}");
    assert_eq!(rollout["clusters"][0]["state"], "Failed", "{rollout}");
    // Every attempt refreshes the report's time: it moves while the failure persists.
    let at = |rows: &[Value]| {
        rows[0]["reported_at"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let before = at(&f.rows("ghost")?);
    wait_for(
        Duration::from_secs(20),
        "a fresh report of the failure",
        || {
            let rows = f.rows("ghost")?;
            ensure!(
                at(&rows) != before && rows[0]["sync"] == "SyncFailed",
                "{rows:?}"
            );
            Ok(Some(()))
        },
    )?;

    // The namespace created by hand (kubectl, an independent client): converges, no commit.
    f.clusters.kubectl(
        "eu-1",
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: ghost}\n",
    )?;
    f.wait_healthy("ghost", 1, &rev)?;

    // (2) With createNamespace: converges on all three clusters, the namespace labelled as ours.
    f.apply(
        "made",
        "made",
        "  targets: {selector: {matchExpressions: [{key: region, operator: Exists}]}}\n  syncPolicy: {createNamespace: true}\n  rollout: {steps: [{selector: {}, maxUnavailable: 3}]}\n",
    )?;
    f.wait_healthy("made", 3, &rev)?;
    for cluster in ["eu-1", "eu-2", "us-1"] {
        let ns = f
            .clusters
            .object(cluster, "Namespace", "", "made")?
            .ok_or_else(|| anyhow!("namespace made missing in {cluster}"))?;
        assert_eq!(
            ns["metadata"]["labels"]["app.flotilla.dev/created-by"], "made",
            "{ns}"
        );
    }
    f.wait_phase("made", &rev, "Succeeded")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_selector_change_fails_in_the_canary_and_rolls_back_leaving_other_steps_untouched()
-> Result<()> {
    let f = Fleet::start(&[
        ("canary-1", "region=eu,ring=canary"),
        ("eu-1", "region=eu"),
        ("us-1", "region=us"),
    ])?;
    f.repo
        .write("web/web.yaml", &deployment("default", "web"))?;
    let v1 = f.repo.commit("v1")?;
    f.apply(
        "web",
        "web",
        "  targets: {selector: {matchExpressions: [{key: region, operator: Exists}]}}\n  rollout:\n    steps:\n      - {name: canary, selector: {matchLabels: {ring: canary}}, maxConcurrent: 1}\n      - {name: rest, selector: {}, maxUnavailable: 2}\n    onFailure: rollback\n    progressDeadline: 60s\n",
    )?;
    f.wait_healthy("web", 3, &v1)?;
    f.wait_phase("web", &v1, "Succeeded")?;
    let before: Vec<String> = ["eu-1", "us-1"]
        .iter()
        .map(|c| f.resource_version(c, "Deployment", "default", "web"))
        .collect::<Result<_>>()?;

    // spec.selector is immutable: the API server refuses the apply.
    f.repo
        .write("web/web.yaml", &deployment("default", "web-v2"))?;
    let v2 = f.repo.commit("v2 changes the selector")?;
    let rolled = f.wait_phase("web", &v2, "RolledBack")?;
    assert!(
        rolled["message"]
            .as_str()
            .is_some_and(|m| m.contains("canary-1")),
        "{rolled}"
    );
    let canary = rolled["clusters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["cluster"] == "canary-1"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(canary["state"], "RolledBack", "{rolled}");
    // The canary is back on v1 and Healthy (OutOfSync with git, which wants v2); the other
    // steps never saw v2.
    f.wait_rolled_back("web", 3, &v1)?;
    let after: Vec<String> = ["eu-1", "us-1"]
        .iter()
        .map(|c| f.resource_version(c, "Deployment", "default", "web"))
        .collect::<Result<_>>()?;
    assert_eq!(before, after, "clusters of later steps were touched");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn shell_placeholders_arrive_verbatim_and_one_app_owns_an_object() -> Result<()> {
    let f = Fleet::start(&[("eu-1", "region=eu")])?;
    let script = r#"echo "${HOME:-/root}" in ${cluster.labels.region}; n=${N:-0}"#;
    f.repo.write(
        "one/cm.yaml",
        &format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: shared}}\ndata:\n  run.sh: '{script}'\n"
        ),
    )?;
    f.repo.write(
        "two/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shared}\ndata: {by: two}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: own}\ndata: {by: two}\n",
    )?;
    let rev = f.repo.commit("two apps")?;
    let targets = "  targets: {clusters: [eu-1]}\n";

    // (4) Only ${cluster.…} / ${vars.…} are Flotilla's; the script's own stay as written.
    f.apply("one", "one", targets)?;
    f.wait_healthy("one", 1, &rev)?;
    let cm = f
        .clusters
        .object("eu-1", "ConfigMap", "default", "shared")?
        .ok_or_else(|| anyhow!("shared missing"))?;
    assert_eq!(
        cm["data"]["run.sh"], r#"echo "${HOME:-/root}" in eu; n=${N:-0}"#,
        "{cm}"
    );
    let rv = f.resource_version("eu-1", "ConfigMap", "default", "shared")?;

    // (5) A second app claiming the same ConfigMap is refused, naming the first.
    f.apply("two", "two", targets)?;
    let refused = wait_for(T, "two refused", || {
        let rows = f.rows("two")?;
        match rows.as_slice() {
            [r] if r["sync"] == "SyncFailed" => Ok(Some(r.clone())),
            _ => Err(anyhow!("{}", serde_json::to_string(&rows)?)),
        }
    })?;
    assert_eq!(refused["health"], "Degraded", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ConfigMap default/shared") && message.contains("owned by app one"),
        "{message}"
    );
    assert!(
        f.clusters
            .configmaps_in("eu-1", "default")?
            .contains(&"own".to_string()),
        "the rest of app two is applied"
    );
    assert_eq!(
        f.resource_version("eu-1", "ConfigMap", "default", "shared")?,
        rv,
        "app two wrote app one's object"
    );

    // Deleting the second app prunes its own object and leaves the first's in place.
    f.hub.cli(&["app", "delete", "two"])?;
    wait_for(T, "app two's own ConfigMap pruned", || {
        let names = f.clusters.configmaps_in("eu-1", "default")?;
        ensure!(!names.contains(&"own".to_string()), "{names:?}");
        Ok(Some(()))
    })?;
    let cm = f
        .clusters
        .object("eu-1", "ConfigMap", "default", "shared")?
        .ok_or_else(|| anyhow!("app one's ConfigMap was pruned with app two"))?;
    assert_eq!(cm["metadata"]["labels"]["app.flotilla.dev/name"], "one");
    f.wait_healthy("one", 1, &rev)?;

    // Apps that reach no cluster are in `flotilla status` with the reason, said once for the app.
    f.repo.write(
        "typo/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: typo}\ndata:\n  region: ${cluster.lables.region}\n",
    )?;
    f.repo.commit("a typo")?;
    f.apply("typo", "typo", targets)?;
    f.apply("nowhere", "one", "  targets: {clusters: [nope]}\n")?;
    let rows = wait_for(T, "rows for apps that reach no cluster", || {
        let typo = f.rows("typo")?;
        let nowhere = f.rows("nowhere")?;
        match (typo.as_slice(), nowhere.as_slice()) {
            ([t], [n])
                if t["message"] != "not rendered yet" && n["message"] != "not rendered yet" =>
            {
                Ok(Some((t.clone(), n.clone())))
            }
            _ => Err(anyhow!("typo: {typo:?}, nowhere: {nowhere:?}")),
        }
    })?;
    let (typo, nowhere) = rows;
    assert_eq!(
        (&typo["cluster"], &typo["health"]),
        (&Value::from(""), &Value::from("Unknown"))
    );
    let message = typo["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(
            "never rendered: render: cm.yaml line 5: unknown variable ${cluster.lables.region}"
        ),
        "{message}"
    );
    assert!(
        !message.contains("cluster eu-1"),
        "said once for the app: {message}"
    );
    assert!(
        nowhere["message"].as_str().is_some_and(
            |m| m.contains("its targets select no registered cluster (clusters [nope])")
        ),
        "{nowhere}"
    );
    let app = f.hub.app("nowhere")?;
    assert!(
        app["note"]
            .as_str()
            .is_some_and(|n| n.contains("select no registered cluster")),
        "{app}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_presync_hook_fails_the_canary_and_nothing_else_changes() -> Result<()> {
    let f = Fleet::start(&[("canary-1", "region=eu,ring=canary"), ("eu-1", "region=eu")])?;
    let cm = |v: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web}}\ndata: {{v: \"{v}\"}}\n")
    };
    f.repo.write("web/cm.yaml", &cm("1"))?;
    let v1 = f.repo.commit("v1")?;
    f.apply(
        "web",
        "web",
        "  targets: {selector: {matchExpressions: [{key: region, operator: Exists}]}}\n  rollout:\n    steps:\n      - {name: canary, selector: {matchLabels: {ring: canary}}, maxConcurrent: 1}\n    onFailure: rollback\n",
    )?;
    f.wait_healthy("web", 2, &v1)?;
    f.wait_phase("web", &v1, "Succeeded")?;
    let before = f.resource_version("eu-1", "ConfigMap", "default", "web")?;

    // v2: a PreSync migration that fails (an image kubesim never runs), and a changed ConfigMap.
    f.repo.write("web/cm.yaml", &cm("2"))?;
    f.repo.write(
        "web/migrate.yaml",
        "apiVersion: batch/v1\nkind: Job\nmetadata:\n  generateName: migrate-\n  annotations: {argocd.argoproj.io/hook: PreSync, argocd.argoproj.io/hook-delete-policy: HookSucceeded}\nspec:\n  template:\n    spec: {restartPolicy: Never, containers: [{name: m, image: \"migrate:broken\"}]}\n",
    )?;
    let v2 = f.repo.commit("v2 with a failing migration")?;
    let rolled = f.wait_phase("web", &v2, "RolledBack")?;
    assert!(
        rolled["message"]
            .as_str()
            .is_some_and(|m| m.contains("canary-1")),
        "{rolled}"
    );
    f.wait_rolled_back("web", 2, &v1)?;
    // The canary's ConfigMap never changed (the sync stopped before it); eu-1 never saw v2.
    let cm = f
        .clusters
        .object("canary-1", "ConfigMap", "default", "web")?
        .ok_or_else(|| anyhow!("web missing"))?;
    assert_eq!(cm["data"]["v"], "1", "{cm}");
    assert_eq!(
        f.resource_version("eu-1", "ConfigMap", "default", "web")?,
        before
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn hook_runs_show_in_app_get_and_a_failed_wave_runs_the_sync_fail_hooks() -> Result<()> {
    let f = Fleet::start(&[("eu-1", "region=eu")])?;
    let job = |meta: &str, image: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata: {meta}\nspec:\n  template:\n    spec: {{restartPolicy: Never, containers: [{{name: m, image: \"{image}\"}}]}}\n"
        )
    };
    f.repo.write(
        "web/migrate.yaml",
        &job(
            "{generateName: migrate-, annotations: {argocd.argoproj.io/hook: PreSync, argocd.argoproj.io/hook-delete-policy: HookSucceeded}}",
            "busybox:1",
        ),
    )?;
    f.repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: \"1\"}\n",
    )?;
    let v1 = f.repo.commit("v1")?;
    f.apply("web", "web", "  targets: {clusters: [eu-1]}\n")?;
    f.wait_healthy("web", 1, &v1)?;
    let hooks = wait_for(T, "the PreSync run in app get", || {
        let app = f.hub.app("web")?;
        let hooks = app["clusters"][0]["hooks"].clone();
        ensure!(hooks.as_array().is_some_and(|h| h.len() == 1), "{app}");
        Ok(Some(hooks))
    })?;
    let run = &hooks[0];
    assert_eq!(
        (&run["phase"], &run["kind"], &run["health"]),
        (&"PreSync".into(), &"Job".into(), &"Healthy".into()),
        "{run}"
    );
    let name = run["name"].as_str().unwrap_or_default();
    assert!(name.starts_with("migrate-"), "the generated name: {run}");
    // Deleted on success, as its policy says.
    assert!(f.clusters.object("eu-1", "Job", "default", name)?.is_none());
    let table = f.hub.cli(&["app", "get", "web"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("PreSync") && l.contains(&format!("Job default/{name}"))),
        "{text}"
    );

    // v2: wave 0 fails (a Job that never completes), so wave 1 is never applied and the
    // SyncFail hook runs.
    f.repo.write(
        "web/seed.yaml",
        &job(
            "{name: seed, annotations: {argocd.argoproj.io/sync-wave: \"0\"}}",
            "busybox:broken",
        ),
    )?;
    f.repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web, annotations: {argocd.argoproj.io/sync-wave: \"1\"}}\ndata: {v: \"2\"}\n",
    )?;
    f.repo.write(
        "web/failed.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: sync-failed, annotations: {argocd.argoproj.io/hook: SyncFail}}\ndata: {why: wave}\n",
    )?;
    f.repo.commit("v2 with a failing wave")?;
    let app = wait_for(T, "the SyncFail run in app get", || {
        let app = f.hub.app("web")?;
        let phases: Vec<&str> = app["clusters"][0]["hooks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["phase"].as_str())
            .collect();
        ensure!(phases == ["PreSync", "SyncFail"], "{app}");
        Ok(Some(app))
    })?;
    let c = &app["clusters"][0];
    assert_eq!(c["health"], "Degraded", "{c}");
    assert!(
        c["message"]
            .as_str()
            .is_some_and(|m| m.contains("Job default/seed")),
        "{c}"
    );
    assert!(
        f.clusters
            .object("eu-1", "ConfigMap", "default", "sync-failed")?
            .is_some(),
        "the SyncFail hook ran"
    );
    let cm = f
        .clusters
        .object("eu-1", "ConfigMap", "default", "web")?
        .ok_or_else(|| anyhow!("web missing"))?;
    assert_eq!(cm["data"]["v"], "1", "wave 1 was never applied: {cm}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_status_that_moves_is_reported_at_once_not_on_the_next_health_read() -> Result<()> {
    use flotilla_e2e::{GitRepo, Hub, HubOptions, SimCluster};
    let clusters = SimCluster::start_many(&["eu-1"])?;
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&[])?;
    // No full pass and no timed health read within the test: only the watch can tell.
    let _agent = hub.agent_with_args(
        "eu-1",
        Some(&token),
        "",
        &[
            "--kubeconfig".into(),
            clusters.kubeconfig_of("eu-1").display().to_string(),
            "--resync".into(),
            "1h".into(),
            "--health-interval".into(),
            "1h".into(),
        ],
    )?;
    hub.wait_all_connected(1, T)?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "probe/pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: probe, namespace: default}\nspec: {restartPolicy: Never, containers: [{name: p, image: busybox}]}\n",
    )?;
    repo.commit("a pod")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: probe}}\nspec:\n  source: {{repoURL: \"{}\", path: probe}}\n  targets: {{clusters: [eu-1]}}\n",
        repo.url()
    ))?;
    let row = |want: &'static str| {
        wait_for(T, want, || {
            let rows = hub.status()?;
            ensure!(
                rows.len() == 1 && rows[0]["sync"] == "Synced" && rows[0]["health"] == want,
                "{rows:?}"
            );
            Ok(Some(rows[0].clone()))
        })
    };
    row("Healthy")?;
    // What a kubelet does when the container exits non-zero: the spec is untouched.
    clusters.kubectl(
        "eu-1",
        &[
            "patch",
            "pod",
            "probe",
            "-n",
            "default",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Failed"}}"#,
        ],
        "",
    )?;
    let degraded = row("Degraded")?;
    assert!(
        degraded["message"]
            .as_str()
            .is_some_and(|m| m.contains("pod failed")),
        "{degraded}"
    );
    Ok(())
}

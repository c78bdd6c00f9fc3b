//! The reconcile engine through the real `flotilla-agent apply` binary, against kubesim.
// Test helpers panic on failure: the panic message is the test report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, PostParams};
use kubesim::{ClusterSettings, Faults, Sim, SimOptions};
use serde_json::json;

struct Fixture {
    sim: Sim,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    client: kube::Client,
}

async fn fixture() -> Fixture {
    let sim = Sim::start(SimOptions {
        settings: ClusterSettings {
            ready_delay: Duration::from_millis(100),
            ..ClusterSettings::default()
        },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig("kubesim", &kubeconfig).unwrap();
    let client = kube::Client::try_from(sim.kube_config("kubesim").await.unwrap()).unwrap();
    Fixture {
        sim,
        dir,
        kubeconfig,
        client,
    }
}

impl Fixture {
    fn bundle(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (file, text) in files {
            std::fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    fn apply_cmd(&self, app: &str, bundle: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"));
        cmd.args(["apply", "--app", app, "--timeout", "10s"])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--data-dir")
            .arg(self.dir.path().join("agent-data"))
            .args(extra)
            .arg(bundle);
        cmd
    }

    fn apply(&self, app: &str, bundle: &Path) -> Output {
        self.apply_cmd(app, bundle, &[]).output().unwrap()
    }

    fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kubectl-cache"))
            .args(args)
            .output()
            .expect("kubectl is installed on our build machines")
    }

    /// `kubectl get KIND NAME -o jsonpath=PATH`, its output.
    fn jsonpath(&self, kind: &str, name: &str, path: &str) -> String {
        stdout(&self.kubectl(&["get", kind, name, "-o", &format!("jsonpath={path}")]))
    }

    async fn configmaps(&self, ns: &str) -> Vec<String> {
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let list = api.list(&ListParams::default()).await.unwrap();
        list.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap_or_default())
            .collect()
    }
}

fn stdout(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: caches.shop.example.com}
spec:
  group: shop.example.com
  scope: Namespaced
  names: {kind: Cache, plural: caches, singular: cache}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#;

const APP: &str = r#"
apiVersion: shop.example.com/v1
kind: Cache
metadata: {name: sessions, namespace: shop}
spec: {sizeMb: 64}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      serviceAccountName: web
      containers: [{name: web, image: "nginx:1.27"}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: reader, namespace: shop}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: web-reader, namespace: shop}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: reader}
subjects: [{kind: ServiceAccount, name: web, namespace: shop}]
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_with_crd_cr_namespace_rbac_and_deployment_applies_in_one_go() {
    let f = fixture().await;
    // The CR comes first in the files and the Namespace last: ordering is the engine's job.
    let bundle = f.bundle("b", &[("app.yaml", APP), ("crd.yaml", CRD)]);
    let out = f.apply("shop", &bundle);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let order: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("applied  "))
        .collect();
    assert_eq!(order[0], "CustomResourceDefinition caches.shop.example.com");
    assert_eq!(order[1], "Namespace shop");
    assert_eq!(order.last().copied(), Some("Cache shop/sessions"));
    assert!(
        text.contains("7 applied, 0 pruned, 0 failed; Synced; health Healthy"),
        "{text}"
    );
    let labels = f.kubectl(&[
        "-n",
        "shop",
        "get",
        "deploy",
        "web",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert!(
        stdout(&labels).contains("app.flotilla.dev/name"),
        "{}",
        stdout(&labels)
    );
    let inventory = f.kubectl(&[
        "-n",
        "flotilla-system",
        "get",
        "cm",
        "flotilla-inventory-shop",
        "-o",
        "jsonpath={.data.digest}",
    ]);
    assert!(
        stdout(&inventory).starts_with("sha256:"),
        "{}",
        stdout(&inventory)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn removed_manifests_are_pruned_but_empty_or_broken_bundles_prune_nothing() {
    let f = fixture().await;
    let cm = |name: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: {{k: v}}\n---\n"
        )
    };
    let v1 = f.bundle(
        "v1",
        &[(
            "a.yaml",
            &format!("{}{}{}", cm("one"), cm("two"), cm("three")),
        )],
    );
    assert!(f.apply("cfg", &v1).status.success());
    // Someone else's object with a similar name, never applied by the agent.
    let api: Api<ConfigMap> = Api::namespaced(f.client.clone(), "default");
    let theirs: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "three-copy"}, "data": {"x": "y"}}))
            .unwrap();
    api.create(&PostParams::default(), &theirs).await.unwrap();

    let v2 = f.bundle("v2", &[("a.yaml", &format!("{}{}", cm("one"), cm("two")))]);
    let out = f.apply("cfg", &v2);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("pruned   ConfigMap default/three"),
        "{}",
        stdout(&out)
    );
    let mut names = f.configmaps("default").await;
    names.sort();
    assert_eq!(names, ["one", "three-copy", "two"]);

    // An empty bundle is refused as a mistake: nothing is pruned.
    let empty = f.bundle("empty", &[]);
    let out = f.apply("cfg", &empty);
    assert!(
        stdout(&out).contains("nothing was pruned"),
        "{}",
        stdout(&out)
    );
    assert_eq!(f.configmaps("default").await.len(), 3);

    // Unreadable YAML stops before the cluster is touched, naming the file and document.
    let broken = f.bundle(
        "broken",
        &[("a.yaml", &format!("{}kind: [oops", cm("one")))],
    );
    let out = f.apply("cfg", &broken);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(stdout(&out).contains("a.yaml#2 (line "), "{}", stdout(&out));
    assert_eq!(f.configmaps("default").await.len(), 3);

    // An object whose label was taken away is no longer ours: it is left alone, not pruned.
    f.kubectl(&["label", "configmap", "two", "app.flotilla.dev/name-"]);
    let v3 = f.bundle("v3", &[("a.yaml", &cm("one"))]);
    let out = f.apply("cfg", &v3);
    assert!(
        stdout(&out).contains("skipped  ConfigMap default/two"),
        "{}",
        stdout(&out)
    );
    let mut names = f.configmaps("default").await;
    names.sort();
    assert_eq!(names, ["one", "three-copy", "two"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn edits_and_deletions_are_healed_within_two_seconds_and_counted() {
    let f = fixture().await;
    let bundle = f.bundle(
        "b",
        &[(
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {mode: safe}\n",
        )],
    );
    let log = f.dir.path().join("watch.log");
    let mut child = f
        .apply_cmd("drift", &bundle, &["--watch"])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |needle: &str, within: Duration| {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains(needle)
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    };
    assert!(wait_for("watching for drift", Duration::from_secs(15)));
    std::thread::sleep(Duration::from_millis(300));

    let edited = Instant::now();
    assert!(
        f.kubectl(&[
            "patch",
            "configmap",
            "settings",
            "-p",
            r#"{"data":{"mode":"unsafe"}}"#
        ])
        .status
        .success()
    );
    assert!(
        wait_for(
            "healed   ConfigMap default/settings (drift #1)",
            Duration::from_secs(2)
        ),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    println!("edit healed after {:?}", edited.elapsed());
    let mode = f.kubectl(&[
        "get",
        "configmap",
        "settings",
        "-o",
        "jsonpath={.data.mode}",
    ]);
    assert_eq!(stdout(&mode), "safe");

    let deleted = Instant::now();
    assert!(
        f.kubectl(&["delete", "configmap", "settings"])
            .status
            .success()
    );
    assert!(
        wait_for("(drift #2)", Duration::from_secs(2)),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    println!("deletion healed after {:?}", deleted.elapsed());
    assert!(
        f.kubectl(&["get", "configmap", "settings"])
            .status
            .success()
    );

    // The app label removed by hand: the object leaves the agent's label-selected watch (a
    // DELETED event, as a real API server sends) and is healed, label and all.
    let unlabelled = Instant::now();
    assert!(
        f.kubectl(&["label", "configmap", "settings", "app.flotilla.dev/name-"])
            .status
            .success()
    );
    assert!(
        wait_for("(drift #3)", Duration::from_secs(2)),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
    println!("label removal healed after {:?}", unlabelled.elapsed());
    let label = f.kubectl(&[
        "get",
        "configmap",
        "settings",
        "-o",
        "jsonpath={.metadata.labels.app\\.flotilla\\.dev/name}",
    ]);
    assert_eq!(stdout(&label), "drift");
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_deployment_makes_the_app_degraded_and_names_it() {
    let f = fixture().await;
    let deploy = |name: &str, image: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}}}\nspec:\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec: {{containers: [{{name: c, image: \"{image}\"}}]}}\n---\n"
        )
    };
    let bundle = f.bundle(
        "b",
        &[(
            "a.yaml",
            &format!(
                "{}{}",
                deploy("good", "nginx:1"),
                deploy("bad", "nginx:broken")
            ),
        )],
    );
    let out = f.apply("mixed", &bundle);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("health Degraded (Deployment default/bad: ProgressDeadlineExceeded"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_apply_then_restart_finishes_without_loss_or_duplicates() {
    let f = fixture().await;
    let mut text = String::new();
    for i in 0..60 {
        text.push_str(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:02}}}\ndata: {{i: \"{i}\"}}\n---\n"));
    }
    let bundle = f.bundle("b", &[("many.yaml", &text)]);
    let cluster = f.sim.cluster("kubesim").unwrap();
    cluster.set_faults(Faults {
        latency_ms: 30,
        ..Faults::default()
    });
    let mut child = f
        .apply_cmd("many", &bundle, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some, not all, objects exist.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = f
            .configmaps("default")
            .await
            .iter()
            .filter(|n| n.starts_with("cm-"))
            .count();
        if n >= 10 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    let _ = child.wait();
    let partial = f
        .configmaps("default")
        .await
        .iter()
        .filter(|n| n.starts_with("cm-"))
        .count();
    assert!(
        partial > 0 && partial < 60,
        "killed mid-apply: {partial} of 60 existed"
    );
    cluster.set_faults(Faults::default());

    let out = f.apply("many", &bundle);
    assert!(out.status.success(), "{}", stdout(&out));
    let names = f.configmaps("default").await;
    assert_eq!(names.iter().filter(|n| n.starts_with("cm-")).count(), 60);
    let inventory = f.kubectl(&[
        "-n",
        "flotilla-system",
        "get",
        "cm",
        "flotilla-inventory-many",
        "-o",
        "jsonpath={.data.objects}",
    ]);
    let objects: Vec<serde_json::Value> = serde_json::from_str(&stdout(&inventory)).unwrap();
    assert_eq!(objects.len(), 60, "the inventory lists each object once");
    // A third run changes nothing in the cluster.
    let before = cluster.resource_version();
    assert!(f.apply("many", &bundle).status.success());
    assert_eq!(cluster.resource_version(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn objects_that_cannot_be_applied_make_the_app_sync_failed_and_degraded() {
    let f = fixture().await;
    let bundle = f.bundle(
        "b",
        &[(
            "a.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: fine}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: lost, namespace: ghost}\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: Gateway\nmetadata: {name: gw}\nspec: {}\n",
        )],
    );
    let out = f.apply("partial", &bundle);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("2 failed; SyncFailed; health Degraded"),
        "{text}"
    );
    assert!(
        text.contains("no API resource for gateway.networking.k8s.io/v1beta1 Gateway in the cluster (is its CRD installed?)"),
        "{text}"
    );
    assert!(
        text.contains(
            "namespace ghost does not exist; create it or set spec.syncPolicy.createNamespace"
        ),
        "{text}"
    );
    assert_eq!(f.configmaps("default").await, ["fine"]);

    // With --create-namespace the namespace is made (labelled as ours) and only the CRD is missing.
    let out = f
        .apply_cmd("partial", &bundle, &["--create-namespace"])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(text.contains("1 failed; SyncFailed"), "{text}");
    assert_eq!(f.configmaps("ghost").await, ["lost"]);
    let ns = f.kubectl(&[
        "get",
        "namespace",
        "ghost",
        "-o",
        "jsonpath={.metadata.labels}",
    ]);
    assert!(
        String::from_utf8_lossy(&ns.stdout).contains("\"app.flotilla.dev/created-by\":\"partial\""),
        "{}",
        String::from_utf8_lossy(&ns.stdout)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wave_starts_only_after_the_previous_one_is_healthy_and_a_failed_wave_stops_the_sync() {
    let f = fixture().await;
    let job = |image: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata: {{name: migrate, annotations: {{argocd.argoproj.io/sync-wave: \"0\"}}}}\nspec:\n  template:\n    spec: {{restartPolicy: Never, containers: [{{name: m, image: \"{image}\"}}]}}\n---\n"
        )
    };
    let after = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: after, annotations: {argocd.argoproj.io/sync-wave: \"1\"}}\ndata: {k: v}\n";

    // A failing wave 0: wave 1 is never applied, and the report names the Job.
    let broken = f.bundle(
        "broken",
        &[("a.yaml", &format!("{}{after}", job("busybox:broken")))],
    );
    let out = f.apply("waves", &broken);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("sync stopped at wave 0: not Healthy (Degraded): Job default/migrate"),
        "{text}"
    );
    assert!(
        !f.configmaps("default").await.contains(&"after".to_string()),
        "{text}"
    );
    assert!(f.kubectl(&["delete", "job", "migrate"]).status.success());

    // A good wave 0: the ConfigMap of wave 1 is created after the Job completed.
    let good = f.bundle(
        "good",
        &[("a.yaml", &format!("{}{after}", job("busybox:1")))],
    );
    let out = f.apply("waves", &good);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let completed = f.jsonpath("job", "migrate", "{.status.completionTime}");
    let created = f.jsonpath("configmap", "after", "{.metadata.creationTimestamp}");
    assert!(
        !completed.is_empty() && created >= completed,
        "job completed {completed}, configmap created {created}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn presync_hooks_run_first_and_a_failed_one_stops_the_sync() {
    let f = fixture().await;
    let hook = |name: &str, phase: &str, image: &str, policy: &str| {
        format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  {name}\n  annotations: {{argocd.argoproj.io/hook: {phase}, argocd.argoproj.io/hook-delete-policy: {policy}}}\nspec:\n  template:\n    spec: {{restartPolicy: Never, containers: [{{name: m, image: \"{image}\"}}]}}\n---\n"
        )
    };
    let cm = |name: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}}}\ndata: {{k: v}}\n---\n"
        )
    };
    // A PreSync Job runs to completion before the resources; a generateName PostSync Job runs after
    // them and is deleted once it succeeded.
    let good = f.bundle(
        "good",
        &[(
            "a.yaml",
            &format!(
                "{}{}{}",
                hook(
                    "name: migrate",
                    "PreSync",
                    "busybox:1",
                    "BeforeHookCreation"
                ),
                cm("app"),
                hook(
                    "generateName: notify-",
                    "PostSync",
                    "busybox:1",
                    "HookSucceeded"
                ),
            ),
        )],
    );
    let out = f.apply("hooked", &good);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    let completed = f.jsonpath("job", "migrate", "{.status.completionTime}");
    let created = f.jsonpath("configmap", "app", "{.metadata.creationTimestamp}");
    assert!(
        !completed.is_empty() && created >= completed,
        "hook completed {completed}, resource created {created}"
    );
    let jobs = stdout(&f.kubectl(&["get", "jobs", "-o", "name"]));
    assert!(
        !jobs.contains("notify-"),
        "the PostSync hook was deleted on success: {jobs}"
    );
    assert!(
        text.lines().any(|l| l.contains("hook ran")
            && l.contains("notify-")
            && l.contains("PostSync")
            && l.contains("ok=true")),
        "the PostSync hook ran: {text}"
    );
    // Hooks are not the app's objects: a resync with the same bundle does not run them again,
    // and they are never pruned as app objects.
    let out = f.apply("hooked", &good);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));
    assert!(!stdout(&out).contains("pruned   Job"), "{}", stdout(&out));

    // A failing PreSync hook: the sync stops, no resource of the new revision is applied.
    let bad = f.bundle(
        "bad",
        &[(
            "a.yaml",
            &format!(
                "{}{}",
                hook(
                    "name: migrate",
                    "PreSync",
                    "busybox:broken",
                    "BeforeHookCreation"
                ),
                cm("app-v2"),
            ),
        )],
    );
    let out = f.apply("hooked", &bad);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("PreSync hook Job default/migrate failed"),
        "{text}"
    );
    assert!(
        !f.configmaps("default")
            .await
            .contains(&"app-v2".to_string()),
        "{text}"
    );
    assert!(
        f.configmaps("default").await.contains(&"app".to_string()),
        "nothing pruned: {text}"
    );
}

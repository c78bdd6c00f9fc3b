//! kubesim driven by kubectl 1.32, an independent client: if kubectl cannot tell it from an API
//! server for these operations, neither can our agent.
// Test helpers panic on failure: the panic message is the test report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kubesim::{ClusterSettings, Sim, SimOptions};

struct Kubectl {
    kubeconfig: PathBuf,
    cache: PathBuf,
    _dir: tempfile::TempDir,
}

impl Kubectl {
    fn new(sim: &Sim) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        sim.write_kubeconfig("kubesim", &kubeconfig).unwrap();
        Self {
            kubeconfig,
            cache: dir.path().join("cache"),
            _dir: dir,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.cache)
            .args(args)
            .output()
            .expect("kubectl must be installed (it is on our build machines; see .ci/run)")
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs and requires failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "kubectl {args:?} should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

fn testdata(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/testdata")
        .join(name)
        .display()
        .to_string()
}

async fn start() -> Sim {
    Sim::start(SimOptions {
        settings: ClusterSettings {
            ready_delay: std::time::Duration::from_millis(100),
            ..ClusterSettings::default()
        },
        ..SimOptions::default()
    })
    .await
    .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

const DEPLOY: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
        - name: web
          image: nginx:1.27
          env: [{name: A, value: "1"}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn client_side_apply_get_label_patch_wait_delete() {
    let sim = start().await;
    let k = Kubectl::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "d.yaml", DEPLOY);
    assert!(
        k.ok(&["apply", "-f", &file])
            .contains("deployment.apps/web created")
    );
    assert!(
        k.ok(&["apply", "-f", &file])
            .contains("deployment.apps/web unchanged")
    );
    k.ok(&[
        "wait",
        "--for=condition=Available",
        "deployment/web",
        "--timeout=10s",
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "deployment", "web", "-o", "json"])).unwrap();
    assert_eq!(json["status"]["availableReplicas"], 2);
    assert!(
        json["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string()
    );

    // A changed manifest goes through a strategic merge patch.
    let changed = DEPLOY
        .replace("replicas: 2", "replicas: 4")
        .replace("value: \"1\"", "value: \"2\"");
    let file2 = write(dir.path(), "d2.yaml", &changed);
    assert!(k.ok(&["apply", "-f", &file2]).contains("configured"));
    let json: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "deployment", "web", "-o", "json"])).unwrap();
    assert_eq!(json["spec"]["replicas"], 4);
    assert_eq!(json["metadata"]["generation"], 2);
    assert_eq!(
        json["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"],
        "2"
    );

    k.ok(&["label", "deployment", "web", "tier=front"]);
    k.ok(&[
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":1}]"#,
    ]);
    let out = k.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.labels.tier} {.spec.replicas}",
    ]);
    assert_eq!(out, "front 1");
    assert!(
        k.ok(&["get", "deployments", "-l", "tier=front"])
            .contains("web")
    );

    let immutable = DEPLOY
        .replace(
            "{matchLabels: {app: web}}",
            "{matchLabels: {app: web, v: \"2\"}}",
        )
        .replace(
            "metadata: {labels: {app: web}}",
            "metadata: {labels: {app: web, v: \"2\"}}",
        );
    let file3 = write(dir.path(), "d3.yaml", &immutable);
    assert!(
        k.fails(&["apply", "-f", &file3])
            .contains("field is immutable")
    );

    assert!(k.fails(&["get", "configmap", "nope"]).contains("NotFound"));
    let err = k.fails(&[
        "apply",
        "-f",
        &write(
            dir.path(),
            "cm.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespace: nope}\n",
        ),
    ]);
    assert!(err.contains("namespaces \"nope\" not found"), "{err}");

    assert!(k.ok(&["delete", "-f", &file]).contains("deleted"));
    assert!(k.fails(&["get", "deployment", "web"]).contains("NotFound"));
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_conflicts_and_force() {
    let sim = start().await;
    let k = Kubectl::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "d.yaml", DEPLOY);
    assert!(
        k.ok(&[
            "apply",
            "--server-side",
            "--field-manager=team-a",
            "-f",
            &file
        ])
        .contains("serverside-applied")
    );
    let scaled = DEPLOY.replace("replicas: 2", "replicas: 5");
    let file2 = write(dir.path(), "d2.yaml", &scaled);
    let err = k.fails(&[
        "apply",
        "--server-side",
        "--field-manager=team-b",
        "-f",
        &file2,
    ]);
    assert!(
        err.contains("conflict") && err.contains("team-a") && err.contains(".spec.replicas"),
        "{err}"
    );
    k.ok(&[
        "apply",
        "--server-side",
        "--field-manager=team-b",
        "--force-conflicts",
        "-f",
        &file2,
    ]);
    let managers = k.ok(&[
        "get",
        "deployment",
        "web",
        "--show-managed-fields",
        "-o",
        "jsonpath={.metadata.managedFields[*].manager}",
    ]);
    assert!(
        managers.contains("team-a") && managers.contains("team-b"),
        "{managers}"
    );
    assert_eq!(
        k.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "5"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn crd_then_cr_and_crd_deletion_removes_crs() {
    let sim = start().await;
    let k = Kubectl::new(&sim);
    k.ok(&["apply", "-f", &testdata("crds.yaml")]);
    k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/caches.shop.example.com",
        "--timeout=5s",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let cr = write(
        dir.path(),
        "cr.yaml",
        "apiVersion: shop.example.com/v1\nkind: Cache\nmetadata: {name: c1, namespace: default}\nspec: {sizeMb: 64}\n",
    );
    assert!(
        k.ok(&["apply", "-f", &cr])
            .contains("cache.shop.example.com/c1 created")
    );
    k.ok(&["apply", "--server-side", "-f", &cr]);
    assert!(k.ok(&["get", "ca"]).contains("c1"));
    k.ok(&[
        "patch",
        "cache",
        "c1",
        "--type=merge",
        "-p",
        r#"{"spec":{"sizeMb":128}}"#,
    ]);
    assert_eq!(
        k.ok(&[
            "get",
            "cache",
            "c1",
            "-o",
            "jsonpath={.spec.sizeMb} {.metadata.generation}"
        ]),
        "128 2"
    );
    k.ok(&["delete", "crd", "caches.shop.example.com"]);
    let cluster = sim.cluster("kubesim").unwrap();
    let rt = kubesim::resources::builtins()
        .into_iter()
        .find(|r| r.kind == "Namespace")
        .unwrap();
    assert!(cluster.get(&rt, None, "default").is_ok());
    assert!(
        cluster
            .resolve("shop.example.com", "v1", "caches")
            .is_none(),
        "the CRD's API is gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_world_manifest_set_applies_server_side_and_becomes_available() {
    let sim = start().await;
    let k = Kubectl::new(&sim);
    // CRDs first, as on a real cluster: kubectl cannot map a CR whose CRD does not exist yet.
    k.ok(&["apply", "--server-side", "-f", &testdata("crds.yaml")]);
    k.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/caches.shop.example.com",
        "--timeout=5s",
    ]);
    let out = k.ok(&["apply", "--server-side", "-f", &testdata("shop.yaml")]);
    assert_eq!(out.lines().count(), 20, "{out}");
    k.ok(&[
        "-n",
        "shop",
        "wait",
        "--for=condition=Available",
        "deployment",
        "--all",
        "--timeout=10s",
    ]);
    k.ok(&[
        "-n",
        "shop",
        "wait",
        "--for=condition=Complete",
        "job/migrate",
        "--timeout=10s",
    ]);
    k.ok(&[
        "-n",
        "shop",
        "wait",
        "--for=jsonpath={.status.readyReplicas}=1",
        "statefulset/postgres",
        "--timeout=10s",
    ]);
    k.ok(&[
        "-n",
        "shop",
        "wait",
        "--for=jsonpath={.status.phase}=Bound",
        "pvc/data-postgres-0",
        "--timeout=10s",
    ]);
    let lb = k.ok(&[
        "-n",
        "shop",
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].ip}",
    ]);
    assert!(lb.starts_with("172.18."), "{lb}");
    let secret = k.ok(&[
        "-n",
        "shop",
        "get",
        "secret",
        "db-credentials",
        "-o",
        "jsonpath={.data.username}",
    ]);
    assert_eq!(
        secret, "c2hvcA==",
        "stringData is stored base64-encoded in data"
    );
    // Re-applying the same set changes nothing (once the simulated controllers have settled).
    let cluster = sim.cluster("kubesim").unwrap();
    let mut before = cluster.resource_version();
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let now = cluster.resource_version();
        if now == before {
            break;
        }
        before = now;
    }
    k.ok(&["apply", "--server-side", "-f", &testdata("shop.yaml")]);
    assert_eq!(
        sim.cluster("kubesim").unwrap().resource_version(),
        before,
        "a no-op apply writes nothing"
    );
    // Deleting the namespace removes everything in it.
    k.ok(&["delete", "namespace", "shop", "--timeout=10s"]);
    assert!(k.fails(&["get", "namespace", "shop"]).contains("NotFound"));
}

#[tokio::test(flavor = "multi_thread")]
async fn everyday_imperative_kubectl_scale_rollouts_nodes_and_validation() {
    let sim = start().await;
    let k = Kubectl::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    k.ok(&["apply", "-f", &write(dir.path(), "d.yaml", DEPLOY)]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=20s"]);

    // scale subresource: kubectl scale, the raw Scale, and discovery for autoscale.
    assert!(
        k.ok(&["scale", "deployment/web", "--replicas=3"])
            .contains("scaled")
    );
    assert_eq!(
        k.ok(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ]),
        "3"
    );
    let scale = k.ok(&[
        "get",
        "--raw",
        "/apis/apps/v1/namespaces/default/deployments/web/scale",
    ]);
    let scale: serde_json::Value = serde_json::from_str(&scale).unwrap();
    assert_eq!(
        (
            &scale["kind"],
            &scale["spec"]["replicas"],
            &scale["status"]["selector"]
        ),
        (&"Scale".into(), &3.into(), &"app=web".into())
    );
    assert!(
        k.ok(&["api-resources", "--api-group=apps", "-o", "name"])
            .contains("deployments")
    );
    // `kubectl autoscale` sends a protobuf body (see the end of this test); the HPA kinds it
    // targets are served.
    assert!(
        k.ok(&["api-resources", "--api-group=autoscaling", "-o", "name"])
            .contains("horizontalpodautoscalers")
    );

    // set image → ReplicaSets with revisions → history and undo.
    k.ok(&["rollout", "status", "deployment/web", "--timeout=20s"]);
    k.ok(&["set", "image", "deployment/web", "web=nginx:1.28"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=20s"]);
    let history = k.ok(&["rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");
    k.ok(&["rollout", "undo", "deployment/web"]);
    k.ok(&["rollout", "status", "deployment/web", "--timeout=20s"]);
    let image = k.ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ]);
    assert_ne!(image, "nginx:1.28", "undo restored the previous template");
    let replica_sets = k.ok(&["get", "rs", "-o", "name"]);
    assert_eq!(
        replica_sets.lines().count(),
        2,
        "undo reuses the old ReplicaSet: {replica_sets}"
    );

    // Nodes, Ready with capacity.
    let nodes = k.ok(&["get", "nodes", "-o", "name"]);
    assert_eq!(nodes.lines().count(), 3, "{nodes}");
    let ready = k.ok(&[
        "get",
        "node",
        "kubesim-node-1",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"Ready\")].status} {.status.allocatable.cpu}",
    ]);
    assert_eq!(ready, "True 4");

    // logs and exec answer at once, saying why.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: busybox}]}\n";
    k.ok(&["apply", "-f", &write(dir.path(), "p.yaml", pod)]);
    let started = std::time::Instant::now();
    let err = k.fails(&["logs", "p"]);
    assert!(err.contains("kubesim runs no containers"), "{err}");
    let err = k.fails(&["exec", "p", "--", "true"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!err.is_empty());

    // Validation a real server does.
    let refused = |file: &str, manifest: &str, needle: &str| {
        let err = k.fails(&["apply", "-f", &write(dir.path(), file, manifest)]);
        assert!(err.contains(needle), "{file}: {err}");
    };
    refused(
        "s.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{name: http, port: 80}, {name: http, port: 81}]\n",
        "spec.ports[1].name: Duplicate value: \"http\"",
    );
    refused(
        "s2.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: NodePort\n  ports: [{name: a, port: 80, nodePort: 30080}, {name: b, port: 81, nodePort: 30080}]\n",
        "spec.ports[1].nodePort: Duplicate value: 30080",
    );
    refused(
        "s3.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 80}]\n",
        "not in the valid range",
    );
    refused(
        "t.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: twins}\nspec: {containers: [{name: c, image: a}, {name: c, image: b}]}\n",
        "spec.containers[1].name: Duplicate value: \"c\"",
    );
    refused(
        "q.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: q}\nspec: {containers: [{name: c, image: a, resources: {limits: {memory: 1 GB}}}]}\n",
        "quantities must match the regular expression",
    );
}

/// kubectl's generators (`create namespace|deployment|...`, `autoscale`) send protobuf bodies,
/// which kubesim refuses with a 415 naming the object and the JSON route; that route, the
/// same generator through `--dry-run=client -o yaml | kubectl apply -f -`, creates each object.
#[tokio::test(flavor = "multi_thread")]
async fn generator_commands_are_refused_with_a_json_route_that_works() {
    let sim = start().await;
    let k = Kubectl::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    let generators: [(&[&str], &str); 6] = [
        (&["create", "namespace", "imperative"], "v1 Namespace"),
        (
            &[
                "create",
                "deployment",
                "web",
                "--image=nginx:1.27",
                "--replicas=2",
            ],
            "apps/v1 Deployment",
        ),
        (
            &[
                "create",
                "configmap",
                "settings",
                "--from-literal=mode=fast",
            ],
            "v1 ConfigMap",
        ),
        (
            &[
                "create",
                "secret",
                "generic",
                "creds",
                "--from-literal=pw=hunter2",
            ],
            "v1 Secret",
        ),
        (&["create", "serviceaccount", "robot"], "v1 ServiceAccount"),
        (
            &["autoscale", "deployment", "web", "--min=2", "--max=5"],
            "autoscaling/v1 HorizontalPodAutoscaler",
        ),
    ];
    for (i, (args, object)) in generators.iter().enumerate() {
        if args[0] == "autoscale" {
            // autoscale reads its target first: the deployment exists by now.
            k.ok(&["rollout", "status", "deployment/web", "--timeout=20s"]);
        }
        let err = k.fails(args);
        assert!(
            err.contains(&format!("this {object}"))
                && err.contains("--dry-run=client -o yaml | kubectl apply -f -"),
            "{args:?}: {err}"
        );
        let mut dry = args.to_vec();
        dry.extend(["--dry-run=client", "-o", "yaml"]);
        let manifest = write(dir.path(), &format!("{i}.yaml"), &k.ok(&dry));
        k.ok(&["apply", "-f", &manifest]);
    }

    let get = |args: &[&str]| k.ok(args);
    assert!(get(&["get", "namespace", "imperative", "-o", "name"]).contains("imperative"));
    assert_eq!(
        get(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.status.readyReplicas}"
        ]),
        "2"
    );
    assert_eq!(
        get(&[
            "get",
            "configmap",
            "settings",
            "-o",
            "jsonpath={.data.mode}"
        ]),
        "fast"
    );
    assert_eq!(
        get(&["get", "secret", "creds", "-o", "jsonpath={.data.pw}"]),
        "aHVudGVyMg=="
    );
    assert!(get(&["get", "serviceaccount", "robot", "-o", "name"]).contains("robot"));
    assert_eq!(
        get(&[
            "get",
            "hpa",
            "web",
            "-o",
            "jsonpath={.spec.minReplicas}/{.spec.maxReplicas}"
        ]),
        "2/5"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_label_selector_watch_sees_an_object_leave() {
    let sim = start().await;
    let k = Kubectl::new(&sim);
    let dir = tempfile::tempdir().unwrap();
    let cm =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: w, labels: {team: a}}\ndata: {k: v}\n";
    k.ok(&["apply", "-f", &write(dir.path(), "cm.yaml", cm)]);
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&k.kubeconfig)
        .args([
            "get",
            "configmaps",
            "-l",
            "team=a",
            "--watch",
            "--output-watch-events",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(800));
    k.ok(&["label", "configmap", "w", "team=b", "--overwrite"]);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let _ = watch.kill();
    let out = watch.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ADDED") && text.contains("DELETED"), "{text}");
}

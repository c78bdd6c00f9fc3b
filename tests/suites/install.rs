//! Installing on a cluster: deploy/ builds with kustomize and passes a server-side dry run;
//! `flotilla cluster join` prints what installs and registers an agent (applied twice, it changes
//! nothing); and that agent, started exactly as its pod would be (the Deployment's arguments and
//! environment, the in-cluster service account, token and CA from the Secret), registers with its
//! labels, keeps its identity in a Secret and keeps it across a restart with an empty disk.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use flotilla_e2e::{GitRepo, Hub, HubOptions, Proc, SimCluster, bin, http_get, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// The workspace (tests/ is one of its members).
fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The documents of a YAML stream.
fn documents(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// (kind, namespace, name) of each object.
fn identities(docs: &[Value]) -> Vec<(String, String, String)> {
    let mut ids: Vec<_> = docs
        .iter()
        .map(|d| {
            let s = |v: &Value| v.as_str().unwrap_or("").to_string();
            (
                s(&d["kind"]),
                s(&d["metadata"]["namespace"]),
                s(&d["metadata"]["name"]),
            )
        })
        .collect();
    ids.sort();
    ids
}

/// `../..` from `dir` to `/`.
fn up_to_root(dir: &Path) -> PathBuf {
    dir.components().skip(1).map(|_| "..").collect()
}

fn kustomize(dir: &Path) -> Result<Vec<Value>> {
    let out = Command::new("kubectl").arg("kustomize").arg(dir).output()?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    documents(&String::from_utf8_lossy(&out.stdout))
}

/// What deploy/README.md says the agent's base creates.
fn documented_agent_objects() -> Vec<(String, String, String)> {
    let mut ids: Vec<(String, String, String)> = [
        ("Namespace", "", "flotilla-system"),
        ("ServiceAccount", "flotilla-system", "flotilla-agent"),
        ("ClusterRole", "", "flotilla-agent-apply"),
        ("ClusterRoleBinding", "", "flotilla-agent-apply"),
        ("Role", "flotilla-system", "flotilla-agent-self"),
        ("RoleBinding", "flotilla-system", "flotilla-agent-self"),
        ("ConfigMap", "flotilla-system", "flotilla-agent-config"),
        ("Secret", "flotilla-system", "flotilla-agent-bootstrap"),
        ("Deployment", "flotilla-system", "flotilla-agent"),
    ]
    .iter()
    .map(|(k, n, m)| (k.to_string(), n.to_string(), m.to_string()))
    .collect();
    ids.sort();
    ids
}

#[test]
fn deploy_builds_with_kustomize_and_passes_a_server_dry_run() -> Result<()> {
    let agent = kustomize(&root().join("deploy/agent"))?;
    assert_eq!(identities(&agent), documented_agent_objects());
    let hub = kustomize(&root().join("deploy/hub"))?;
    assert_eq!(
        identities(&hub)
            .into_iter()
            .map(|(k, _, n)| format!("{k}/{n}"))
            .collect::<Vec<_>>(),
        [
            "Namespace/flotilla-system",
            "Service/flotilla-hub",
            "StatefulSet/flotilla-hub"
        ]
    );
    // The least-privilege component: reads cluster-wide, writes only where a RoleBinding says.
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        // kustomize takes relative paths only: from the temp directory up to `/`, then down.
        format!(
            "resources: [{0}/deploy/agent]\ncomponents: [{0}/deploy/agent/components/namespaced]\n",
            up_to_root(dir.path())
                .join(root().strip_prefix("/")?)
                .display()
        ),
    )?;
    let namespaced = kustomize(dir.path())?;
    let binding = namespaced
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .context("a ClusterRoleBinding")?;
    assert_eq!(binding["roleRef"]["name"], "flotilla-agent-read");
    assert!(namespaced.iter().any(|d| d["kind"] == "RoleBinding"
        && d["metadata"]["namespace"] == "apps"
        && d["roleRef"]["name"] == "flotilla-agent-apply"));

    let sim = SimCluster::start()?;
    // A server-side dry run needs the namespace to exist, as on a real API server.
    sim.kubectl(
        "kubesim",
        &[
            "apply",
            "-f",
            &root()
                .join("deploy/agent/namespace.yaml")
                .display()
                .to_string(),
        ],
        "",
    )?;
    for base in ["deploy/agent", "deploy/hub"] {
        let path = root().join(base).display().to_string();
        sim.kubectl("kubesim", &["apply", "--dry-run=server", "-k", &path], "")?;
    }
    assert!(
        sim.object("kubesim", "Deployment", "flotilla-system", "flotilla-agent")?
            .is_none(),
        "a dry run creates nothing"
    );
    Ok(())
}

/// The pod's container, as the cluster stores it.
fn agent_container(sim: &SimCluster, cluster: &str) -> Result<Value> {
    let d = sim
        .object(cluster, "Deployment", "flotilla-system", "flotilla-agent")?
        .context("the agent Deployment")?;
    Ok(d["spec"]["template"]["spec"]["containers"][0].clone())
}

/// Starts the agent binary as the kubelet would start the Deployment's container: its arguments,
/// its environment resolved from the ConfigMap and Secret it names, its volumes as directories.
fn start_as_pod(
    sim: &SimCluster,
    cluster: &str,
    root_dir: &Path,
    log: &Path,
    http_port: u16,
) -> Result<Proc> {
    let container = agent_container(sim, cluster)?;
    let read = |kind: &str, name: &str| -> Result<Value> {
        sim.object(cluster, kind, "flotilla-system", name)?
            .ok_or_else(|| anyhow!("no {kind} {name}"))
    };
    let secret_value = |secret: &Value, key: &str| -> Result<String> {
        use base64::Engine as _;
        let b64 = secret["data"][key]
            .as_str()
            .ok_or_else(|| anyhow!("no {key} in the Secret"))?;
        Ok(String::from_utf8(
            base64::engine::general_purpose::STANDARD.decode(b64)?,
        )?)
    };
    // Volumes: the Secret's ca.crt where the Deployment mounts it; emptyDir for the data.
    let mounts: Vec<(String, String)> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_string(),
                m["mountPath"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let local = |mount: &str| root_dir.join(mount.trim_start_matches('/'));
    let bootstrap = read("Secret", "flotilla-agent-bootstrap")?;
    for (name, path) in &mounts {
        std::fs::create_dir_all(local(path))?;
        if name == "hub-ca" {
            std::fs::write(
                local(path).join("ca.crt"),
                secret_value(&bootstrap, "ca.crt")?,
            )?;
        }
    }
    let mut cmd = Command::new(bin("flotilla-agent"));
    cmd.env_clear()
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    for (k, v) in sim.pod_environment(&root_dir.join("serviceaccount"), "flotilla-system")? {
        cmd.env(k, v);
    }
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap_or("");
        let value = if let Some(v) = e["value"].as_str() {
            // Paths inside the pod map into this test's directory.
            if v.starts_with('/') && !v.contains(' ') {
                local(v).display().to_string()
            } else {
                v.to_string()
            }
        } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
            let cm = read("ConfigMap", r["name"].as_str().unwrap_or(""))?;
            cm["data"][r["key"].as_str().unwrap_or("")]
                .as_str()
                .unwrap_or("")
                .to_string()
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            let s = read("Secret", r["name"].as_str().unwrap_or(""))?;
            secret_value(&s, r["key"].as_str().unwrap_or(""))?
        } else {
            continue;
        };
        cmd.env(name, value);
    }
    let args: Vec<String> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            a.as_str()
                .unwrap_or("")
                .replace("0.0.0.0:9090", &format!("127.0.0.1:{http_port}"))
        })
        .collect();
    cmd.args(&args);
    cmd.stderr(std::fs::File::create(log)?);
    let mut proc = Proc::adopt(cmd.spawn()?);
    proc.log = log.to_path_buf();
    Ok(proc)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_join_installs_an_agent_that_keeps_its_identity_in_a_secret() -> Result<()> {
    let hub = Hub::start(HubOptions {
        poll_interval: "300ms".into(),
        http: true,
        ..HubOptions::default()
    })?;
    // The probes a platform runs against the hub.
    let http = hub.http_addr.clone().context("the hub's HTTP listener")?;
    for probe in ["/healthz", "/readyz"] {
        let (code, body) = http_get(&http, probe)?;
        assert_eq!(code, 200, "{probe}: {body}");
    }
    let sim = SimCluster::start_many(&["eu-1"])?;
    let join = hub.cli(&[
        "cluster",
        "join",
        "eu-1",
        "--labels",
        "region=eu,tier=prod",
        "--hub-address",
        &hub.url,
    ])?;
    ensure!(
        join.status.success(),
        "join: {}",
        String::from_utf8_lossy(&join.stderr)
    );
    let manifests = String::from_utf8(join.stdout)?;
    assert_eq!(
        identities(&documents(&manifests)?),
        documented_agent_objects(),
        "the join output is the base, filled in"
    );
    sim.kubectl("eu-1", &["apply", "-f", "-"], &manifests)?;
    let generation = |sim: &SimCluster| -> Result<Value> {
        let d = sim
            .object("eu-1", "Deployment", "flotilla-system", "flotilla-agent")?
            .context("the agent Deployment")?;
        Ok(d["metadata"]["generation"].clone())
    };
    let first = generation(&sim)?;
    // The same output applied again changes nothing.
    let again = sim.kubectl("eu-1", &["apply", "-f", "-"], &manifests)?;
    assert!(
        again.lines().all(|l| l.ends_with(" unchanged")),
        "a second apply: {again}"
    );
    assert_eq!(generation(&sim)?, first);
    for (kind, ns, name) in documented_agent_objects() {
        let args: Vec<&str> = if ns.is_empty() {
            vec!["get", &kind, &name, "-o", "name"]
        } else {
            vec!["get", &kind, &name, "-n", &ns, "-o", "name"]
        };
        sim.kubectl("eu-1", &args, "")
            .with_context(|| format!("{kind} {ns}/{name} was created"))?;
    }

    // The pod starts: it registers with the join's labels and keeps its identity in a Secret.
    let pod_root = tempfile::tempdir()?;
    let logs = tempfile::tempdir()?;
    let port = free_port()?;
    let mut agent = start_as_pod(
        &sim,
        "eu-1",
        pod_root.path(),
        &logs.path().join("1.log"),
        port,
    )?;
    let cluster = hub.wait_connected("eu-1", T).inspect_err(|_| {
        eprintln!("agent log:\n{}", agent.log_text());
    })?;
    assert_eq!(cluster["labels"]["region"], "eu", "{cluster}");
    assert_eq!(cluster["labels"]["tier"], "prod", "{cluster}");
    let identity = sim
        .object(
            "eu-1",
            "Secret",
            "flotilla-system",
            "flotilla-agent-identity",
        )?
        .context("the identity Secret")?;
    for key in ["tls.crt", "tls.key"] {
        assert!(
            identity["data"][key].is_string(),
            "{key} in the identity Secret"
        );
    }
    let data_dir = pod_root.path().join("var/lib/flotilla");
    assert!(
        !data_dir.join("identity.pem").exists(),
        "in-cluster, the identity is not on the pod's disk"
    );
    let (code, _) = wait_for(T, "/readyz", || {
        let (code, body) = http_get(&format!("127.0.0.1:{port}"), "/readyz")?;
        ensure!(code == 200, "{code} {body}");
        Ok(Some((code, body)))
    })?;
    assert_eq!(code, 200);

    // It applies an app.
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: one}\n",
    )?;
    repo.commit("first")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchLabels: {{region: eu}}}}}}\n",
        repo.url()
    ))?;
    wait_for(T, "web applied in eu-1", || {
        let cm = sim.object("eu-1", "ConfigMap", "default", "web")?;
        ensure!(cm.is_some(), "not yet");
        Ok(Some(()))
    })?;

    // Rescheduled with an empty disk: the same identity, no new registration.
    let serial = cluster["cert_serial"].clone();
    let registered = cluster["registered_at"].clone();
    agent.kill9();
    std::fs::remove_dir_all(pod_root.path())?;
    let mut agent = start_as_pod(
        &sim,
        "eu-1",
        pod_root.path(),
        &logs.path().join("2.log"),
        port,
    )?;
    wait_for(T, "eu-1 back with the same identity", || {
        let c = hub
            .cluster("eu-1")?
            .ok_or_else(|| anyhow!("eu-1 is gone"))?;
        ensure!(c["connected"] == true, "{c}");
        Ok(Some(()))
    })
    .inspect_err(|_| eprintln!("agent log:\n{}", agent.log_text()))?;
    let c = hub.cluster("eu-1")?.context("eu-1")?;
    assert_eq!(c["cert_serial"], serial, "the same certificate: {c}");
    assert_eq!(c["registered_at"], registered, "not registered again: {c}");
    let log = agent.log_text();
    assert!(log.contains("using stored identity"), "{log}");
    let bootstrap = sim
        .object(
            "eu-1",
            "Secret",
            "flotilla-system",
            "flotilla-agent-bootstrap",
        )?
        .context("the bootstrap Secret")?;
    let token = {
        use base64::Engine as _;
        let b64 = bootstrap["data"]["token"].as_str().unwrap_or_default();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64)?)?
    };
    assert!(token.starts_with("flt_"), "{token}");
    assert!(!log.contains(&token), "the token is never logged");
    agent.terminate();

    // A rebuild prints the same install, for the replacement cluster, with its labels.
    let rebuild = hub.cli(&["cluster", "rebuild", "eu-1", "--manifest"])?;
    ensure!(
        rebuild.status.success(),
        "rebuild: {}",
        String::from_utf8_lossy(&rebuild.stderr)
    );
    let docs = documents(&String::from_utf8(rebuild.stdout)?)?;
    assert_eq!(identities(&docs), documented_agent_objects());
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .context("the ConfigMap")?;
    assert_eq!(cm["data"]["labels"], "region=eu,tier=prod", "{cm}");
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret")
        .context("the Secret")?;
    assert_ne!(
        secret["data"]["token"], bootstrap["data"]["token"],
        "a fresh token"
    );
    Ok(())
}

#[test]
fn the_hub_serves_from_exactly_what_its_statefulset_mounts() -> Result<()> {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;
    let docs = kustomize(&root().join("deploy/hub"))?;
    let sts = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .context("the StatefulSet")?;
    let pod = &sts["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    // `flotilla-hub init` as deploy/README.md says; the Secret gets the files it lists.
    let work = tempfile::tempdir()?;
    let init = work.path().join("init");
    let out = Command::new(bin("flotilla-hub"))
        .args(["init", "--data-dir"])
        .arg(&init)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret_file = |key: &str| -> PathBuf {
        if key == "hub.json" {
            init.join(key)
        } else {
            init.join("pki").join(key)
        }
    };
    // The pod's filesystem under `fs`: each Secret volume's items where the container mounts it.
    let fs = work.path().join("pod");
    let local = |p: &str| fs.join(p.trim_start_matches('/'));
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or("");
        let path = m["mountPath"].as_str().unwrap_or("");
        let volume = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name);
        let claimed = sts["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["metadata"]["name"] == name);
        let volume = match volume {
            Some(v) => v,
            None if claimed => {
                std::fs::create_dir_all(local(path))?;
                continue;
            }
            None => anyhow::bail!("mount {name} has no volume"),
        };
        if volume["secret"]["secretName"] != "flotilla-hub-pki" {
            std::fs::create_dir_all(local(path))?;
            continue;
        }
        let items = volume["secret"]["items"].as_array().context("items")?;
        match m["subPath"].as_str() {
            Some(sub) => {
                let item = items.iter().find(|i| i["path"] == sub).context("subPath")?;
                std::fs::create_dir_all(local(path).parent().context("parent")?)?;
                std::fs::copy(secret_file(item["key"].as_str().unwrap_or("")), local(path))?;
            }
            None => {
                std::fs::create_dir_all(local(path))?;
                for item in items {
                    let to = local(path).join(item["path"].as_str().unwrap_or(""));
                    std::fs::copy(secret_file(item["key"].as_str().unwrap_or("")), &to)?;
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o400))?;
                }
                // Read-only, as the volume is.
                std::fs::set_permissions(local(path), std::fs::Permissions::from_mode(0o500))?;
            }
        }
    }
    let args: Vec<String> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str())
        // No webhook secret in this pod (the volume is optional).
        .filter(|a| !a.starts_with("--webhook-secret-file"))
        .map(|a| match a.split_once('=') {
            Some((flag, v)) if v.starts_with("0.0.0.0:") => format!("{flag}=127.0.0.1:0"),
            Some((flag, v)) if v.starts_with('/') => format!("{flag}={}", local(v).display()),
            _ => a.to_string(),
        })
        .collect();
    let mut child = Command::new(bin("flotilla-hub"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut hub = Proc::adopt(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut grpc = None;
    let mut http = None;
    while grpc.is_none() || http.is_none() {
        let line = lines.next().context("the hub exited before listening")??;
        if let Some(a) = line.strip_prefix("flotilla-hub listening on ") {
            grpc = Some(a.trim().to_string());
        }
        if let Some(a) = line.strip_prefix("flotilla-hub http on ") {
            http = Some(a.trim().to_string());
        }
    }
    let (grpc, http) = (grpc.context("grpc")?, http.context("http")?);
    let (code, body) = http_get(&http, "/readyz")?;
    assert_eq!(code, 200, "{body}");
    // An operator with the admin certificate (kept off the cluster) reaches it.
    let cli = Command::new(bin("flotilla"))
        .args(["--hub", &format!("https://{grpc}")])
        .arg("--ca")
        .arg(init.join("pki/ca.pem"))
        .arg("--cert")
        .arg(init.join("pki/admin.pem"))
        .arg("--key")
        .arg(init.join("pki/admin-key.pem"))
        .args(["cluster", "list"])
        .output()?;
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    hub.terminate();
    Ok(())
}

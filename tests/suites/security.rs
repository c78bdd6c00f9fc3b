//! Identity, secrets at rest and the audit trail, through the real binaries: a lapsed cluster name
//! cannot be taken with an unbound token; an agent whose certificate expired keeps enforcing and
//! re-registers with a bound token; nothing on disk is readable by others and the agent's disk
//! holds no Secret value; every stored action survives kill -9 with its audit record; denied calls,
//! unbounded and revoked tokens are refused and audited.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use flotilla_e2e::grpc::{agent_identity, channel};
use flotilla_e2e::{Agent, GitRepo, Hub, HubOptions, SimCluster, cluster_args, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn audit(hub: &Hub) -> Result<Vec<Value>> {
    let v = hub.cli_json(&["audit", "--limit", "10000"])?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn app_doc(repo: &GitRepo, targets: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {targets}\n",
        repo.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lapsed_cluster_name_is_taken_only_with_a_bound_token_and_attempts_are_audited()
-> Result<()> {
    let hub = Hub::start(HubOptions {
        cert_ttl: "10s".into(),
        ..HubOptions::default()
    })?;
    let multi = hub.token(&["--uses", "5"])?;
    let mut victim = hub.agent("victim", Some(&multi), "tier=prod")?;
    let before = hub.wait_connected("victim", T)?;
    victim.process.kill9();
    std::thread::sleep(Duration::from_secs(11));

    // The certificate lapsed: the multi-use token may not take the name (nor its labels, apps).
    let mut thief = hub.agent("victim", Some(&multi), "")?;
    let (status, log) = thief.process.wait_exit(T)?;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("not bound to it"), "{log}");
    let after = hub.cluster("victim")?.context("victim")?;
    assert_eq!(
        after["cert_serial"], before["cert_serial"],
        "nothing changed"
    );
    let tokens = hub.cli_json(&["token", "list"])?;
    let multi_id = tokens
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["cluster"].is_null())
        .and_then(|t| t["id"].as_str())
        .context("the multi-use token")?
        .to_string();
    let entries = audit(&hub)?;
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "cluster.register.refused"
                && e["actor"] == format!("token/{multi_id}")
                && e["target"] == "cluster/victim"),
        "{entries:?}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "cluster.register" && e["target"] == "cluster/victim"),
        "the first registration is audited"
    );
    assert!(
        entries.iter().any(|e| e["action"] == "token.create"
            && e["detail"].as_str().unwrap_or("").contains("5 use(s)")),
        "token.create says how many uses: {entries:?}"
    );

    // A token an operator bound to the name brings it back, with its labels.
    let bound = hub.token(&["--cluster", "victim"])?;
    let back_agent = hub.agent("victim", Some(&bound), "")?;
    let back = hub.wait_connected("victim", T)?;
    assert_eq!(back["labels"]["tier"], "prod", "{back}");
    assert!(audit(&hub)?.iter().any(|e| {
        e["action"] == "cluster.register"
            && e["detail"]
                .as_str()
                .unwrap_or("")
                .contains("replaces an expired registration")
    }));

    // Tokens are bounded, listed and revocable.
    let out = hub.cli(&["token", "create", "--ttl", "36500d"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("longer than the hub allows"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let spare = hub.cli_json(&["token", "create", "--cluster", "spare"])?;
    let (spare_token, spare_id) = (
        spare["token"].as_str().unwrap_or("").to_string(),
        spare["token_id"].as_str().unwrap_or("").to_string(),
    );
    let revoked = hub.cli_json(&["token", "revoke", &spare_id])?;
    assert!(!revoked[0]["revoked_at"].is_null(), "{revoked}");
    let mut refused = hub.agent("spare", Some(&spare_token), "")?;
    let (_, log) = refused.process.wait_exit(T)?;
    assert!(log.contains("was revoked"), "{log}");
    assert!(!log.contains(&spare_token), "the token is never logged");

    // An agent's certificate calling the admin API is denied, and that is audited.
    let identity = agent_identity(&back_agent)?;
    let mut admin =
        flotilla_proto::v1::admin_client::AdminClient::new(channel(&hub, Some(identity))?);
    let err = admin
        .list_clusters(flotilla_proto::v1::ListClustersRequest {})
        .await
        .expect_err("an agent may not call the admin API");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let entries = audit(&hub)?;
    assert!(
        entries.iter().any(|e| e["action"] == "denied"
            && e["actor"] == "cluster/victim"
            && e["target"] == "rpc/ListClusters"),
        "{entries:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_whose_certificate_expired_keeps_healing_and_re_registers_with_a_bound_token()
-> Result<()> {
    expired_agent_comes_back(Handover::TokenFile)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_keeping_its_identity_in_a_secret_takes_its_new_token_from_there() -> Result<()> {
    expired_agent_comes_back(Handover::IdentitySecret)
}

/// How the operator hands an expired agent its new token.
#[derive(Clone, Copy, PartialEq)]
enum Handover {
    TokenFile,
    IdentitySecret,
}

fn expired_agent_comes_back(via: Handover) -> Result<()> {
    let sim = SimCluster::start_many(&["eu-1"])?;
    let mut hub = Hub::start(HubOptions {
        cert_ttl: "10s".into(),
        poll_interval: "300ms".into(),
        ..HubOptions::default()
    })?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: one}\n",
    )?;
    let rev = repo.commit("first")?;
    hub.apply_app(&app_doc(&repo, "{clusters: [eu-1]}"))?;
    let token = hub.token(&["--cluster", "eu-1"])?;
    let token_file = dir.path().join("token");
    let mut extra = cluster_args(&sim.kubeconfig_of("eu-1"));
    extra.extend(match via {
        Handover::TokenFile => ["--token-file".into(), token_file.display().to_string()],
        Handover::IdentitySecret => [
            "--identity-secret".into(),
            "flotilla-system/flotilla-agent-identity".into(),
        ],
    });
    let data_dir = dir.path().join("agent");
    let agent = Agent::start_with(
        &hub.url,
        &hub.pki("ca.pem"),
        &data_dir,
        Some("eu-1"),
        Some(&token),
        "",
        &extra,
    )?;
    let present = |sim: &SimCluster| -> Result<bool> {
        Ok(sim.object("eu-1", "ConfigMap", "default", "web")?.is_some())
    };
    wait_for(T, "web applied", || Ok(present(&sim)?.then_some(())))
        .inspect_err(|_| eprintln!("agent log:\n{}", agent.process.log_text()))?;

    // A hub outage longer than the certificate's life.
    hub.kill9();
    std::thread::sleep(Duration::from_secs(12));
    hub.restart()?;
    wait_for(T, "the agent to say it needs a bound token", || {
        let log = agent.process.log_text();
        ensure!(log.contains("bootstrap token bound to its name"), "{log}");
        Ok(Some(()))
    })?;
    // Still enforcing: a deleted object comes back.
    sim.kubectl("eu-1", &["delete", "configmap", "web"], "")?;
    wait_for(T, "web healed while re-bootstrapping", || {
        Ok(present(&sim)?.then_some(()))
    })?;

    // Given a token bound to its name, it registers again and keeps its apps.
    let bound = hub.token(&["--cluster", "eu-1"])?;
    match via {
        Handover::TokenFile => std::fs::write(&token_file, &bound)?,
        Handover::IdentitySecret => {
            let patch = serde_json::json!({"stringData": {"token": bound}}).to_string();
            sim.kubectl(
                "eu-1",
                &[
                    "-n",
                    "flotilla-system",
                    "patch",
                    "secret",
                    "flotilla-agent-identity",
                    "--type=merge",
                    "-p",
                    &patch,
                ],
                "",
            )?;
        }
    }
    wait_for(T, "eu-1 Synced and Healthy again", || {
        let rows = hub.status()?;
        let ok = rows.iter().any(|r| {
            r["cluster"] == "eu-1"
                && r["revision"] == rev.as_str()
                && r["sync"] == "Synced"
                && r["health"] == "Healthy"
        });
        ensure!(ok, "{rows:?}");
        Ok(Some(()))
    })?;
    let log = agent.process.log_text();
    assert!(!log.contains(&bound), "the token is never logged");
    if via == Handover::IdentitySecret {
        assert!(
            !data_dir.join("identity.pem").exists(),
            "the identity lives in the Secret"
        );
    }
    Ok(())
}

/// Every file under `dir`, with its mode.
fn files(dir: &Path) -> Result<Vec<(std::path::PathBuf, u32)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mode = std::fs::symlink_metadata(&d)?.permissions().mode();
        out.push((d.clone(), mode));
        if std::fs::symlink_metadata(&d)?.is_dir() {
            for entry in std::fs::read_dir(&d)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(out)
}

/// Whether `needle` is in `bytes`, plainly or inside any zlib stream that starts in it.
fn holds(bytes: &[u8], needle: &[u8]) -> bool {
    let plain = |b: &[u8]| b.windows(needle.len()).any(|w| w == needle);
    if plain(bytes) {
        return true;
    }
    (0..bytes.len().saturating_sub(1))
        .filter(|&i| bytes[i] == 0x78 && matches!(bytes[i + 1], 0x01 | 0x5e | 0x9c | 0xda))
        .any(|i| {
            let mut out = Vec::new();
            let _ = flate2::read::ZlibDecoder::new(&bytes[i..])
                .take(64 * 1024 * 1024)
                .read_to_end(&mut out);
            plain(&out)
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_on_disk_is_readable_by_others_and_the_agent_holds_no_secret_value() -> Result<()> {
    let sim = SimCluster::start_many(&["eu-1"])?;
    let hub = Hub::start(HubOptions {
        poll_interval: "300ms".into(),
        ..HubOptions::default()
    })?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    let canary = "canary-7f3a9c-do-not-leak";
    repo.write(
        "web/secret.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: web}}\nstringData: {{password: {canary}}}\n"
        ),
    )?;
    repo.commit("first")?;
    hub.apply_app(&app_doc(&repo, "{clusters: [eu-1]}"))?;
    let token = hub.token(&["--cluster", "eu-1"])?;
    let agent = hub.agent_with_cluster("eu-1", Some(&token), &sim.kubeconfig_of("eu-1"))?;
    wait_for(T, "the Secret applied", || {
        Ok(sim.object("eu-1", "Secret", "default", "web")?.map(|_| ()))
    })?;
    // Give the cache and the reports a moment to be written.
    std::thread::sleep(Duration::from_secs(2));
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(canary);
    for (root, must_hold) in [(hub.data_dir(), true), (agent.data_dir.clone(), false)] {
        let mut found = false;
        for (path, mode) in files(&root)? {
            assert_eq!(
                mode & 0o077,
                0,
                "{} is readable by others ({:o})",
                path.display(),
                mode & 0o777
            );
            if path.is_file() {
                let bytes = std::fs::read(&path)?;
                if holds(&bytes, canary.as_bytes()) || holds(&bytes, encoded.as_bytes()) {
                    found = true;
                    assert!(must_hold, "{} holds the Secret's value", path.display());
                }
            }
        }
        // The hub's copy (compressed) proves the search finds what is there.
        assert_eq!(found, must_hold, "{}", root.display());
    }
    Ok(())
}

#[test]
fn every_action_stored_before_a_kill_9_has_its_audit_record() -> Result<()> {
    let mut hub = Hub::start(HubOptions::default())?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\n",
    )?;
    repo.commit("first")?;
    for round in 0..12u64 {
        // Operators act while the hub is killed at an arbitrary moment.
        let cli = hub.admin_cli();
        let doc_dir = dir.path().to_path_buf();
        let url = repo.url();
        let writer = std::thread::spawn(move || {
            for i in 0..40 {
                let _ = cli.run(&["token", "create", "--cluster", &format!("c{round}-{i}")]);
                let doc = doc_dir.join(format!("app-{round}-{i}.yaml"));
                let _ = std::fs::write(
                    &doc,
                    format!(
                        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: app{i}}}\nspec:\n  source: {{repoURL: \"{url}\", path: web}}\n  namespace: ns{round}\n"
                    ),
                );
                let _ = cli.run(&["app", "apply", "-f", &doc.display().to_string()]);
            }
        });
        std::thread::sleep(Duration::from_millis(150 + 37 * round));
        hub.kill9();
        let _ = writer.join();
        hub.restart()?;
        let entries = audit(&hub)?;
        let audited = |action: &str, target: &str| {
            entries
                .iter()
                .any(|e| e["action"] == action && e["target"] == target)
        };
        for t in hub
            .cli_json(&["token", "list"])?
            .as_array()
            .into_iter()
            .flatten()
        {
            let id = t["id"].as_str().unwrap_or("");
            ensure!(
                audited("token.create", &format!("token/{id}")),
                "round {round}: token {id} has no audit record"
            );
        }
        for a in hub
            .cli_json(&["app", "list"])?
            .as_array()
            .into_iter()
            .flatten()
        {
            let (name, generation) = (
                a["name"].as_str().unwrap_or(""),
                a["generation"].as_u64().unwrap_or(0),
            );
            ensure!(
                entries.iter().any(|e| e["action"] == "app.apply"
                    && e["target"] == format!("app/{name}")
                    && e["detail"] == format!("generation {generation}")),
                "round {round}: app {name} generation {generation} has no audit record"
            );
        }
    }
    Ok(())
}

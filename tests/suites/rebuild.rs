//! A lost cluster comes back: `cluster rebuild` revokes its certificate and hands out a token bound to
//! its name; a fresh agent in an empty cluster registers as it, keeps its labels, converges to every
//! app it ran, and the hub shows how long that took.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, ensure};
use flotilla_e2e::grpc::{agent_identity, session_refusal};
use flotilla_e2e::{Agent, GitRepo, Hub, HubOptions, SimCluster, wait_for};

const T: Duration = Duration::from_secs(60);

const BASE: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings, namespace: shop}\ndata: {region: \"${cluster.labels.region}\"}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: \"nginx:1.27\"}]}\n";

fn app(name: &str, repo: &GitRepo, path: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  source: {{repoURL: \"{}\", path: {path}}}\n  targets: {{selector: {{matchLabels: {{region: eu}}}}}}\n",
        repo.url()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuilt_cluster_takes_over_its_identity_and_converges() -> Result<()> {
    let lost = SimCluster::start_many(&["eu-1", "eu-2"])?;
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&["--uses", "2"])?;
    let mut old = hub.agent_with_cluster_labels(
        "eu-1",
        Some(&token),
        &lost.kubeconfig_of("eu-1"),
        "region=eu,tier=gold",
    )?;
    let _other = hub.agent_with_cluster_labels(
        "eu-2",
        Some(&token),
        &lost.kubeconfig_of("eu-2"),
        "region=eu",
    )?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write("shop/all.yaml", BASE)?;
    repo.write(
        "cache/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cache}\ndata: {size: \"1Gi\"}\n",
    )?;
    let v1 = repo.commit("v1")?;
    hub.apply_app(&app("shop", &repo, "shop"))?;
    hub.apply_app(&app("cache", &repo, "cache"))?;
    let hub_ref = &hub;
    let v1_ref = &v1;
    let healthy = |cluster: &'static str| {
        move || -> Result<Option<()>> {
            let rows = hub_ref.status()?;
            let mine: Vec<_> = rows.iter().filter(|r| r["cluster"] == cluster).collect();
            ensure!(
                mine.len() == 2
                    && mine
                        .iter()
                        .all(|r| r["revision"] == v1_ref.as_str() && r["health"] == "Healthy"),
                "{mine:?}"
            );
            Ok(Some(()))
        }
    };
    wait_for(T, "eu-1 Healthy", healthy("eu-1"))?;
    let old_identity = agent_identity(&old)?;

    // The cluster is lost: its agent dies and a fresh, empty cluster replaces it.
    old.process.kill9();
    let fresh = SimCluster::start_many(&["eu-1"])?;
    ensure!(
        !fresh
            .configmaps_in("eu-1", "default")?
            .contains(&"cache".to_string())
    );

    // The table form, as an operator reads it: the token, and the agent command to run; with
    // `--wait` it then waits for the replacement (read while it runs, below).
    let mut waiting = hub
        .admin_cli()
        .command(&["cluster", "rebuild", "eu-1", "--wait", "--timeout", "60s"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(waiting.stdout.take().expect("piped stdout")).lines();
    let mut rebuilt = String::new();
    while !rebuilt.contains("flotilla-agent run") {
        let Some(line) = lines.next() else {
            anyhow::bail!("cluster rebuild ended early:\n{rebuilt}");
        };
        rebuilt.push_str(&line?);
        rebuilt.push('\n');
    }
    let line_after = |prefix: &str| {
        rebuilt
            .lines()
            .skip_while(|l| !l.starts_with(prefix))
            .nth(1)
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let new_token = line_after("token ");
    let printed = line_after("start the agent");
    ensure!(new_token.starts_with("flt_"), "{rebuilt}");
    ensure!(
        rebuilt.starts_with("cluster eu-1: revoked ") && !rebuilt.contains("revoked 0 "),
        "{rebuilt}"
    );
    let printed = printed
        .strip_prefix("FLOTILLA_TOKEN=<the token above> ")
        .unwrap_or(&printed)
        .to_string();
    // The token is bound to the name: it cannot register anything else.
    let mut impostor = hub.agent("eu-9", Some(&new_token), "")?;
    let (_, log) = impostor.process.wait_exit(T)?;
    ensure!(log.contains("bound to cluster"), "{log}");

    // The old certificate is rejected.
    let err = session_refusal(&hub, old_identity).await?;
    ensure!(err.code() == tonic::Code::Unauthenticated, "{err}");

    // The printed command, run as printed (only DIR and KUBECONFIG are the operator's to fill):
    // a new agent with no labels of its own registers as eu-1, keeps eu-1's labels and apps.
    let data_dir = tempfile::tempdir()?;
    let kubeconfig = fresh.kubeconfig_of("eu-1");
    let _new = Agent::from_printed(
        &printed,
        &new_token,
        &[
            ("DIR", &data_dir.path().display().to_string()),
            ("KUBECONFIG", &kubeconfig.display().to_string()),
        ],
    )?;
    wait_for(T, "rebuilt eu-1 Healthy", healthy("eu-1"))?;
    // `--wait` ends by itself once the replacement converged, with a result line and exit 0.
    let rest: Vec<String> = lines.collect::<std::io::Result<_>>()?;
    let status = waiting.wait()?;
    let result = rest.last().cloned().unwrap_or_default();
    ensure!(status.success(), "rebuild --wait: {status}: {rest:?}");
    ensure!(
        result.starts_with("cluster eu-1 rebuilt: every app Healthy"),
        "{rest:?}"
    );
    let cluster = wait_for(T, "recovery time recorded", || {
        let c = hub.cli_json(&["cluster", "get", "eu-1"])?;
        ensure!(
            c["last_recovery_ms"].as_i64().is_some_and(|ms| ms > 0),
            "{c}"
        );
        Ok(Some(c))
    })?;
    ensure!(
        cluster["labels"]["tier"] == "gold" && cluster["labels"]["region"] == "eu",
        "{cluster}"
    );
    ensure!(cluster["recovering_since"].is_null(), "{cluster}");
    println!(
        "rebuilt eu-1 recovered in {} ms",
        cluster["last_recovery_ms"]
    );
    let table = hub.cli(&["cluster", "get", "eu-1"])?;
    let text = String::from_utf8_lossy(&table.stdout);
    ensure!(text.contains("last rebuild converged in"), "{text}");
    ensure!(
        fresh
            .configmaps_in("eu-1", "default")?
            .contains(&"cache".to_string())
    );
    ensure!(
        fresh
            .configmaps_in("eu-1", "shop")?
            .contains(&"settings".to_string())
    );

    let audit = hub.cli_json(&["audit"])?;
    ensure!(
        audit.as_array().is_some_and(|a| a
            .iter()
            .any(|e| e["action"] == "cluster.rebuild" && e["target"] == "cluster/eu-1")),
        "{audit}"
    );
    ensure!(
        !audit.to_string().contains(&new_token),
        "the audit log holds a token"
    );
    Ok(())
}

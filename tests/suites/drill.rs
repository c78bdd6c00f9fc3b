//! Fault drill: the hub is `kill -9`ed at random moments while registrations, app updates, token
//! creation and rollout actions are in flight — 50 times. Every time, the data directory opens and
//! everything the hub acknowledged is there.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use flotilla_e2e::grpc::{admin, channel, key_and_csr};
use flotilla_e2e::{GitRepo, Hub, HubOptions};
use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::registration_client::RegistrationClient;
use flotilla_proto::v1::{
    ApplyAppRequest, CreateTokenRequest, GetAppRequest, ListAuditRequest, ListClustersRequest,
    RegisterRequest, RolloutActionRequest,
};

const ROUNDS: usize = 50;
/// Bounds the whole drill, whatever happens.
const BUDGET: Duration = Duration::from_secs(300);

/// What the hub acknowledged during the drill.
#[derive(Default)]
struct Acked {
    clusters: Vec<String>,
    tokens: Vec<String>,
    /// Generation of the last acknowledged apply of `web`.
    generation: u64,
    rollout_actions: usize,
}

fn random_below(n: u64) -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(n);
    h.finish() % n.max(1)
}

fn app_doc(repo: &str, round: usize, i: usize) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web, labels: {{round: \"r{round}-{i}\"}}}}\nspec:\n  source: {{repoURL: \"{repo}\", path: web}}\n  targets: {{selector: {{matchLabels: {{drill: \"yes\"}}}}}}\n  rollout: {{steps: [{{selector: {{}}, maxConcurrent: 1}}]}}\n"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_write_survives_fifty_kill_9s() -> Result<()> {
    let started = Instant::now();
    let mut hub = Hub::start(HubOptions::default())?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: \"1\"}\n",
    )?;
    repo.commit("v1")?;
    let url = repo.url();
    let token = hub.token(&["--uses", "100000", "--ttl", "2h"])?;
    let acked = Arc::new(Mutex::new(Acked::default()));

    for round in 0..ROUNDS {
        ensure!(
            started.elapsed() < BUDGET,
            "drill over budget at round {round}"
        );
        let admin_channel = channel(&hub, Some(admin(&hub)?))?;
        let anon = channel(&hub, None)?;
        let mut workers = Vec::new();
        // Registrations.
        {
            let (acked, token) = (Arc::clone(&acked), token.clone());
            let mut client = RegistrationClient::new(anon.clone());
            workers.push(tokio::spawn(async move {
                for i in 0.. {
                    let name = format!("r{round}-{i}");
                    let Ok((_key, csr)) = key_and_csr(&name) else {
                        return;
                    };
                    let request = RegisterRequest {
                        token: token.clone(),
                        cluster_name: name.clone(),
                        labels: [("drill".to_string(), "yes".to_string())].into(),
                        csr_pem: csr,
                    };
                    match client.register(request).await {
                        Ok(_) => acked
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clusters
                            .push(name),
                        Err(_) => return,
                    }
                }
            }));
        }
        // App updates (each a new generation, each a new rollout) and tokens.
        {
            let (acked, url) = (Arc::clone(&acked), url.clone());
            let mut client = AdminClient::new(admin_channel.clone());
            workers.push(tokio::spawn(async move {
                for i in 0.. {
                    let applied = client
                        .apply_app(ApplyAppRequest {
                            document: app_doc(&url, round, i),
                        })
                        .await;
                    let Ok(app) = applied else { return };
                    {
                        let mut a = acked.lock().unwrap_or_else(|p| p.into_inner());
                        a.generation = a.generation.max(app.into_inner().generation);
                    }
                    let Ok(t) = client.create_token(CreateTokenRequest::default()).await else {
                        return;
                    };
                    acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .tokens
                        .push(t.into_inner().token_id);
                }
            }));
        }
        // Rollout actions.
        {
            let acked = Arc::clone(&acked);
            let mut client = AdminClient::new(admin_channel.clone());
            workers.push(tokio::spawn(async move {
                for i in 0..10_000 {
                    let action = if i % 2 == 0 { "pause" } else { "resume" };
                    let request = RolloutActionRequest {
                        app: "web".into(),
                        action: action.into(),
                    };
                    match client.rollout_action(request).await {
                        Ok(_) => {
                            acked
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .rollout_actions += 1
                        }
                        Err(s)
                            if s.code() == tonic::Code::FailedPrecondition
                                || s.code() == tonic::Code::NotFound =>
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(50 + random_below(400))).await;
        hub.kill9();
        for w in workers {
            let _ = tokio::time::timeout(Duration::from_secs(20), w).await;
        }
        hub.restart()
            .with_context(|| format!("round {round}: the hub did not come back"))?;

        // Everything acknowledged is there.
        let mut client = AdminClient::new(channel(&hub, Some(admin(&hub)?))?);
        let a = acked.lock().unwrap_or_else(|p| p.into_inner()).clone_view();
        let clusters = client
            .list_clusters(ListClustersRequest {})
            .await?
            .into_inner()
            .clusters;
        let names: std::collections::HashSet<_> =
            clusters.iter().map(|c| c.name.as_str()).collect();
        let missing: Vec<_> = a
            .clusters
            .iter()
            .filter(|c| !names.contains(c.as_str()))
            .collect();
        ensure!(
            missing.is_empty(),
            "round {round}: acknowledged registrations lost: {missing:?}"
        );
        if a.generation > 0 {
            let app = client
                .get_app(GetAppRequest { name: "web".into() })
                .await?
                .into_inner();
            ensure!(
                app.generation >= a.generation,
                "round {round}: app at generation {} after {} was acknowledged",
                app.generation,
                a.generation
            );
        }
        let audit = client
            .list_audit(ListAuditRequest { limit: 1_000_000 })
            .await?
            .into_inner()
            .entries;
        let audited_tokens: std::collections::HashSet<_> = audit
            .iter()
            .filter(|e| e.action == "token.create")
            .map(|e| e.target.trim_start_matches("token/").to_string())
            .collect();
        let lost: Vec<_> = a
            .tokens
            .iter()
            .filter(|t| !audited_tokens.contains(*t))
            .collect();
        ensure!(
            lost.is_empty(),
            "round {round}: acknowledged tokens missing from the audit log: {lost:?}"
        );
        let actions = audit
            .iter()
            .filter(|e| e.action.starts_with("rollout."))
            .count();
        ensure!(
            actions >= a.rollout_actions,
            "round {round}: {} rollout actions acknowledged, {actions} audited",
            a.rollout_actions
        );
    }
    let a = acked.lock().unwrap_or_else(|p| p.into_inner()).clone_view();
    println!(
        "{ROUNDS} kill -9 rounds in {:?}: {} registrations, {} tokens, generation {}, {} rollout actions acknowledged and all present",
        started.elapsed(),
        a.clusters.len(),
        a.tokens.len(),
        a.generation,
        a.rollout_actions
    );
    ensure!(!a.clusters.is_empty() && !a.tokens.is_empty() && a.rollout_actions > 0);
    Ok(())
}

impl Acked {
    fn clone_view(&self) -> Acked {
        Acked {
            clusters: self.clusters.clone(),
            tokens: self.tokens.clone(),
            generation: self.generation,
            rollout_actions: self.rollout_actions,
        }
    }
}

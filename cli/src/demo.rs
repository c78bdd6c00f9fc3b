//! `flotilla demo`: a whole fleet on this machine. A hub in a temporary directory, a kubesim fleet
//! (clusters with different regions), one agent per cluster, and a local git repository holding a
//! multi-tier app with a per-region customization. It shows a live table while the fleet converges,
//! then commits a change and shows it roll across.
//!
//! Everything runs in this process through the library entry points the binaries use, over real
//! mTLS and the real Kubernetes HTTP API, so the demo exercises the real paths.

use flotilla_proto::status::{Observed, Verdict};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_agent::link::HubLink;
use flotilla_agent::runner::{RunOptions, run as run_agent};
use flotilla_hub::Settings;
use flotilla_hub::identity::pki;
use flotilla_hub::server::{ServeOptions, SourceOptions, serve};
use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::{ApplyAppRequest, CreateTokenRequest, FleetStatusRequest, FleetStatusRow};
use flotilla_proto::{ClientTls, endpoint};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use crate::live::Live;
use crate::output;

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// The example app: a web front end, an API, a worker, redis and postgres.
const APP_FILES: &[(&str, &str)] = &[
    (
        "shop/namespace.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    ),
    (
        "shop/config.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: shop-config, namespace: shop}\ndata:\n  REGION: \"${cluster.labels.region}\"\n  CLUSTER: \"${cluster.name}\"\n  CURRENCY: \"${vars.currency}\"\n",
    ),
    (
        "shop/web.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers:\n        - name: web\n          image: ghcr.io/example/shop-web:1.0.0\n          envFrom: [{configMapRef: {name: shop-config}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  type: LoadBalancer\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n",
    ),
    (
        "shop/api.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: api, namespace: shop}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: api}}\n  template:\n    metadata: {labels: {app: api}}\n    spec:\n      containers: [{name: api, image: \"ghcr.io/example/shop-api:1.0.0\"}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop}\nspec:\n  selector: {app: api}\n  ports: [{port: 8080}]\n",
    ),
    (
        "shop/worker.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: worker, namespace: shop}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: worker}}\n  template:\n    metadata: {labels: {app: worker}}\n    spec:\n      containers: [{name: worker, image: \"ghcr.io/example/shop-worker:1.0.0\"}]\n",
    ),
    (
        "shop/redis.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: redis, namespace: shop}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: redis}}\n  template:\n    metadata: {labels: {app: redis}}\n    spec:\n      containers: [{name: redis, image: \"redis:7\"}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: redis, namespace: shop}\nspec:\n  selector: {app: redis}\n  ports: [{port: 6379}]\n",
    ),
    (
        "shop/postgres.yaml",
        "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: postgres, namespace: shop}\nspec:\n  serviceName: postgres\n  replicas: 1\n  selector: {matchLabels: {app: postgres}}\n  template:\n    metadata: {labels: {app: postgres}}\n    spec:\n      containers: [{name: postgres, image: \"postgres:16\"}]\n  volumeClaimTemplates:\n    - metadata: {name: data}\n      spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: postgres, namespace: shop}\nspec:\n  selector: {app: postgres}\n  ports: [{port: 5432}]\n",
    ),
];

const APP_SPEC: &str = r#"apiVersion: flotilla.dev/v1alpha1
kind: App
metadata: {name: shop}
spec:
  source: {repoURL: "REPO", ref: main, path: shop}
  namespace: shop
  targets:
    selector: {matchExpressions: [{key: region, operator: Exists}]}
  customizations:
    - selector: {}
      variables: {currency: USD}
    - selector: {matchLabels: {region: eu}}
      variables: {currency: EUR}
      patches:
        - target: {kind: Deployment, name: web}
          patch: {spec: {replicas: 3}}
"#;

fn git(repo: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.email=demo@flotilla.dev",
            "-c",
            "user.name=flotilla demo",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(repo)
        .output()
        .context("the demo needs the git command to create its example repository")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

async fn wait_converged(
    admin: &mut AdminClient<Channel>,
    revision: &str,
    clusters: usize,
    started: Instant,
) -> anyhow::Result<()> {
    let mut last = String::new();
    let mut live = Live::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let rows: Vec<FleetStatusRow> = admin
            .fleet_status(FleetStatusRequest {})
            .await
            .map_err(crate::rpc_error)?
            .into_inner()
            .rows;
        let done = rows
            .iter()
            .filter(|r| {
                r.revision == revision
                    && Observed {
                        digest: r.digest.clone(),
                        sync: r.sync(),
                        health: r.health(),
                    }
                    .verdict(&r.desired_digest)
                        == Verdict::Done
            })
            .count();
        let summary: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{}{}{}{}",
                    r.cluster,
                    r.revision,
                    r.sync().word(),
                    r.health().word()
                )
            })
            .collect();
        let summary = summary.join("|");
        if summary != last {
            let mut frame = vec![
                String::new(),
                format!(
                    "[{:>5.1}s] {done}/{clusters} clusters run {} and are Healthy",
                    started.elapsed().as_secs_f64(),
                    &revision[..12.min(revision.len())]
                ),
            ];
            frame.extend(output::status_lines(&rows));
            live.show(&frame);
            last = summary;
        }
        if done == clusters {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the fleet did not converge within 120s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs the demo; returns when the fleet has converged twice (with `exit_when_synced`) or on Ctrl-C.
pub async fn run(clusters: usize, exit_when_synced: bool) -> anyhow::Result<()> {
    if clusters == 0 || clusters > 200 {
        bail!("--clusters must be between 1 and 200, not {clusters}");
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().context("creating the demo directory")?;
    let data_dir = dir.path().join("hub");
    pki::init(&data_dir, "demo.flotilla.local", &[])?;

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let hub = tasks.spawn(serve(
        ServeOptions {
            data_dir: data_dir.clone(),
            listen: "127.0.0.1:0".parse()?,
            settings: Settings {
                heartbeat_interval: Duration::from_secs(2),
                ..Settings::default()
            },
            http_listen: None,
            operator_listen: None,
            sources: SourceOptions {
                poll_interval: Duration::from_secs(1),
                ..SourceOptions::default()
            },
        },
        shutdown.clone(),
        move |bound| {
            let _ = ready_tx.send(bound.grpc);
        },
    ));
    let addr = ready_rx.await.context("the demo hub did not start")?;
    let url = format!("https://{addr}");
    let paths = pki::PkiPaths::new(&data_dir);
    let ca_pem = std::fs::read(paths.ca())?;
    let admin_tls = ClientTls {
        ca_pem: ca_pem.clone(),
        identity: Some((
            std::fs::read(paths.admin())?,
            std::fs::read(paths.admin_key())?,
        )),
    };
    let mut admin = AdminClient::new(endpoint(&url, &admin_tls)?.connect_lazy());
    out!("hub listening on {url} (data in {})", data_dir.display());

    let names: Vec<String> = (0..clusters)
        .map(|i| format!("{}-{}", REGIONS[i % REGIONS.len()], i / REGIONS.len() + 1))
        .collect();
    let sim = kubesim::Sim::start(kubesim::SimOptions {
        clusters: names.clone(),
        settings: kubesim::ClusterSettings {
            ready_delay: Duration::from_millis(800),
            ..kubesim::ClusterSettings::default()
        },
        ..kubesim::SimOptions::default()
    })
    .await?;
    out!("kubesim serving {clusters} cluster(s) on {}", sim.addr());

    for (i, name) in names.iter().enumerate() {
        let kubeconfig = dir.path().join(format!("{name}.kubeconfig"));
        sim.write_kubeconfig(name, &kubeconfig)?;
        let token = admin
            .create_token(CreateTokenRequest {
                ttl_seconds: 600,
                uses: 1,
                cluster_name: name.clone(),
            })
            .await
            .map_err(crate::rpc_error)?
            .into_inner()
            .token;
        let labels = BTreeMap::from([
            ("region".to_string(), REGIONS[i % REGIONS.len()].to_string()),
            (
                "tier".to_string(),
                if i == 0 { "canary" } else { "prod" }.to_string(),
            ),
        ]);
        let opts = RunOptions {
            link: HubLink::new(url.clone(), ca_pem.clone()),
            data_dir: dir.path().join(format!("agent-{name}")),
            cluster_name: Some(name.clone()),
            token: Some(token),
            labels,
            cluster: flotilla_agent::cluster_config::ClusterSource::Kubeconfig(kubeconfig),
            identity_secret: None,
            resync: Duration::from_secs(300),
            health_interval: Duration::from_secs(2),
            metrics_listen: None,
            token_file: None,
        };
        let agent_shutdown = shutdown.clone();
        let name = name.clone();
        tasks.spawn(async move {
            if let Err(err) = run_agent(opts, agent_shutdown).await {
                eprintln!("agent {name}: {err}");
            }
        });
    }

    let repo = dir.path().join("fleet-repo");
    std::fs::create_dir_all(&repo)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    for (path, text) in APP_FILES {
        let target = repo.join(path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(target, text)?;
    }
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "shop 1.0.0"])?;
    let first = git(&repo, &["rev-parse", "HEAD"])?;
    let repo_url = format!("file://{}", repo.display());
    admin
        .apply_app(ApplyAppRequest {
            document: APP_SPEC.replace("REPO", &repo_url),
        })
        .await
        .map_err(crate::rpc_error)?;
    out!("app shop applied from {repo_url} at {}", &first[..12]);

    let started = Instant::now();
    wait_converged(&mut admin, &first, clusters, started).await?;
    out!(
        "\nfleet converged on {} in {:.1}s",
        &first[..12],
        started.elapsed().as_secs_f64()
    );

    // A change in git rolls across the fleet.
    let web = repo.join("shop/web.yaml");
    let text = std::fs::read_to_string(&web)?.replace("shop-web:1.0.0", "shop-web:1.1.0");
    std::fs::write(&web, text)?;
    git(&repo, &["commit", "-q", "-am", "web 1.1.0"])?;
    let second = git(&repo, &["rev-parse", "HEAD"])?;
    out!("\ncommitted web 1.1.0 as {}", &second[..12]);
    let started = Instant::now();
    wait_converged(&mut admin, &second, clusters, started).await?;
    out!(
        "\nthe change reached all {clusters} clusters in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    if !exit_when_synced {
        out!("\npoint flotilla at the demo hub from another terminal:");
        out!("  export FLOTILLA_HUB={url}");
        out!("  export FLOTILLA_CA={}", paths.ca().display());
        out!("  export FLOTILLA_CERT={}", paths.admin().display());
        out!("  export FLOTILLA_KEY={}", paths.admin_key().display());
        out!("  flotilla status");
        out!(
            "\nthe fleet repository is {} (commit to it and watch `flotilla status`)",
            repo.display()
        );
        out!("Ctrl-C stops the demo and removes its directory.");
        tokio::signal::ctrl_c().await?;
    }
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        eprintln!("demo tasks did not stop within 10s");
    }
    sim.shutdown().await;
    hub.await??;
    Ok(())
}

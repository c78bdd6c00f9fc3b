//! `flotilla demo`: a whole fleet on this machine — a hub in a temporary directory and a few agents
//! that register with bootstrap tokens and connect over mTLS — shown as a live table.
//!
//! Everything runs in this process through the same library entry points the binaries use, and talks
//! over real TLS on loopback, so the demo exercises the real paths.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flotilla_agent::link::HubLink;
use flotilla_agent::runner::{RunOptions, run as run_agent};
use flotilla_hub::server::{ServeOptions, serve};
use flotilla_hub::{Settings, pki};
use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::{CreateTokenRequest, ListClustersRequest};
use flotilla_proto::{ClientTls, endpoint};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::{Format, output};

const REGIONS: [&str; 3] = ["eu", "us", "ap"];

/// Runs the demo; returns when the fleet is connected (with `exit_when_synced`) or on Ctrl-C.
pub async fn run(clusters: usize, exit_when_synced: bool) -> anyhow::Result<()> {
    if clusters == 0 || clusters > 200 {
        bail!("--clusters must be between 1 and 200, not {clusters}");
    }
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
            sources: flotilla_hub::server::SourceOptions::default(),
        },
        shutdown.clone(),
        move |addr, _| {
            let _ = ready_tx.send(addr);
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
    println!("hub listening on {url} (data in {})", data_dir.display());

    for i in 0..clusters {
        let name = format!("{}-{}", REGIONS[i % REGIONS.len()], i / REGIONS.len() + 1);
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
            link: HubLink {
                hub_url: url.clone(),
                ca_pem: ca_pem.clone(),
            },
            data_dir: dir.path().join(format!("agent-{name}")),
            cluster_name: Some(name.clone()),
            token: Some(token),
            labels,
            kubeconfig: None,
            resync: Duration::from_secs(300),
        };
        let agent_shutdown = shutdown.clone();
        tasks.spawn(async move {
            if let Err(err) = run_agent(opts, agent_shutdown).await {
                eprintln!("agent {name}: {err}");
            }
        });
    }

    // Live table until every cluster is connected.
    let started = Instant::now();
    let mut last = String::new();
    let deadline = started + Duration::from_secs(60);
    loop {
        let list = admin
            .list_clusters(ListClustersRequest {})
            .await
            .map_err(crate::rpc_error)?
            .into_inner()
            .clusters;
        let connected = list.iter().filter(|c| c.connected).count();
        let summary = format!("{connected}/{clusters} connected");
        if summary != last {
            println!("\n[{:>5.1}s] {summary}", started.elapsed().as_secs_f64());
            output::clusters(Format::Table, &list);
            last = summary;
        }
        if connected == clusters {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {connected} of {clusters} clusters connected within 60s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "\nall {clusters} clusters registered and connected over mTLS in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    if !exit_when_synced {
        println!("\npoint flotilla at the demo hub from another terminal:");
        println!("  export FLOTILLA_HUB={url}");
        println!("  export FLOTILLA_CA={}", paths.ca().display());
        println!("  export FLOTILLA_CERT={}", paths.admin().display());
        println!("  export FLOTILLA_KEY={}", paths.admin_key().display());
        println!("  flotilla cluster list");
        println!("\nCtrl-C stops the demo and removes its directory.");
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
    hub.await??;
    Ok(())
}

//! `kubesim`: serve one or many simulated Kubernetes clusters and write their kubeconfigs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use kubesim::{ClusterSettings, Faults, Sim, SimOptions};

#[derive(Parser)]
#[command(name = "kubesim", version, about = "A Kubernetes API server simulator")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Write the (first) cluster's kubeconfig here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Number of clusters to serve (named cluster-1 ... cluster-N).
    #[arg(long)]
    clusters: Option<usize>,
    /// Write one kubeconfig per cluster (<name>.yaml) into this directory.
    #[arg(long)]
    kubeconfig_dir: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// How long workloads take to become ready.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    ready_delay: Duration,
    /// Latency added to every request.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    latency: Duration,
    /// Fraction of requests answered with 500/429.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    anyhow::ensure!(
        (0.0..=1.0).contains(&cli.error_rate),
        "--error-rate must be between 0 and 1"
    );
    let names: Vec<String> = match cli.clusters {
        None => vec!["kubesim".into()],
        Some(0) => anyhow::bail!("--clusters must be at least 1"),
        Some(n) => (1..=n).map(|i| format!("cluster-{i}")).collect(),
    };
    let sim = Sim::start(SimOptions {
        listen: cli.listen,
        tls: !cli.plain_http,
        clusters: names.clone(),
        settings: ClusterSettings {
            ready_delay: cli.ready_delay,
            ..ClusterSettings::default()
        },
    })
    .await?;
    let faults = Faults {
        latency_ms: u64::try_from(cli.latency.as_millis()).unwrap_or(u64::MAX),
        error_rate: cli.error_rate,
        unresponsive: false,
    };
    for name in &names {
        if let Some(cluster) = sim.cluster(name) {
            cluster.set_faults(faults.clone());
        }
    }
    if let Some(path) = &cli.kubeconfig_out {
        sim.write_kubeconfig(&names[0], path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &cli.kubeconfig_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for name in &names {
            sim.write_kubeconfig(name, &dir.join(format!("{name}.yaml")))?;
        }
    }
    println!(
        "kubesim listening on {} serving {} cluster(s)",
        sim.addr(),
        names.len()
    );
    tokio::signal::ctrl_c().await?;
    sim.shutdown().await;
    Ok(())
}

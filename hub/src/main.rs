//! `flotilla-hub`: initialize a hub data directory, or serve one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_hub::server::{ServeOptions, serve};
use flotilla_hub::{Settings, pki};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "flotilla-hub", version, about = "The Flotilla hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a hub data directory: CA, serving certificate, admin client certificate.
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Extra DNS names or IPs the hub is reached at (localhost, 127.0.0.1 and ::1 are always included).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// SPIFFE trust domain of the identities this hub issues.
        #[arg(long, default_value = "flotilla.local")]
        trust_domain: String,
    },
    /// Serve the hub's gRPC API over mutual TLS.
    Serve {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Lifetime of issued cluster certificates (agents renew at 2/3 of it), e.g. 30d, 12h, 5m.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        cert_ttl: Duration,
        /// Heartbeat interval asked of agents; a stream silent for 3 intervals is dropped.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        heartbeat_interval: Duration,
    },
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
    match Cli::parse().command {
        Command::Init {
            data_dir,
            sans,
            trust_domain,
        } => {
            pki::init(&data_dir, &trust_domain, &sans)
                .with_context(|| format!("initializing {}", data_dir.display()))?;
            let paths = pki::PkiPaths::new(&data_dir);
            println!("initialized hub data directory {}", data_dir.display());
            println!("  CA certificate:    {}", paths.ca().display());
            println!("  admin certificate: {}", paths.admin().display());
            println!("  admin key:         {}", paths.admin_key().display());
            Ok(())
        }
        Command::Serve {
            data_dir,
            listen,
            cert_ttl,
            heartbeat_interval,
        } => {
            anyhow::ensure!(
                cert_ttl >= Duration::from_secs(10),
                "--cert-ttl {} is too short; use at least 10s",
                humantime::format_duration(cert_ttl)
            );
            let shutdown = CancellationToken::new();
            let signals = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutdown requested");
                signals.cancel();
            });
            let opts = ServeOptions {
                data_dir,
                listen,
                settings: Settings {
                    cert_ttl,
                    heartbeat_interval,
                },
            };
            serve(opts, shutdown, |addr| {
                // Scripts and tests read the bound port from this line.
                println!("flotilla-hub listening on {addr}");
            })
            .await
            .context("hub failed")
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = ctrl_c.await;
}

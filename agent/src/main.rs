//! `flotilla-agent`: the per-cluster agent binary.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotilla_agent::Error;
use flotilla_agent::link::HubLink;
use flotilla_agent::runner::{RunOptions, run};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "flotilla-agent", version, about = "The Flotilla agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Register (first start) and stay connected to the hub.
    Run {
        /// Hub address, https://HOST:PORT.
        #[arg(long, env = "FLOTILLA_HUB")]
        hub: String,
        /// The hub CA certificate (PEM).
        #[arg(long, env = "FLOTILLA_CA")]
        ca: PathBuf,
        /// Where the agent keeps its key and certificate.
        #[arg(long)]
        data_dir: PathBuf,
        /// Name to register as (DNS-1123 label); only needed for the first start.
        #[arg(long)]
        cluster_name: Option<String>,
        /// Bootstrap token from `flotilla token create`; only needed to register.
        #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Labels to register with, k=v,k2=v2.
        #[arg(long, value_delimiter = ',', value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not of the form key=value"))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let Command::Run {
        hub,
        ca,
        data_dir,
        cluster_name,
        token,
        labels,
    } = Cli::parse().command;
    let ca_pem = match std::fs::read(&ca) {
        Ok(pem) => pem,
        Err(e) => {
            eprintln!("error: reading --ca {}: {e}", ca.display());
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            signals.cancel();
        }
    });
    let opts = RunOptions {
        link: HubLink {
            hub_url: hub,
            ca_pem,
        },
        data_dir,
        cluster_name,
        token,
        labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
    };
    match run(opts, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err @ (Error::NeedsOperator(_) | Error::Rejected { .. })) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

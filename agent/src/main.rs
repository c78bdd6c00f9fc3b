//! `flotilla-agent`: the per-cluster agent binary.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use flotilla_agent::Error;
use flotilla_agent::engine::AppSpec;
use flotilla_agent::link::HubLink;
use flotilla_agent::local::{ApplyOptions, apply};
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
    /// Register (first start), stay connected to the hub, and run the cluster's assigned apps.
    Run(RunArgs),
    /// Apply the manifests under DIR to a cluster as app NAME, wait for health, print a summary.
    Apply(ApplyArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Hub address, https://HOST:PORT; several replicas' comma-separated (tried in turn; the
    /// agent stays on the one that answers).
    #[arg(long, env = "FLOTILLA_HUB")]
    hub: String,
    /// The hub CA certificate (PEM).
    #[arg(long, env = "FLOTILLA_CA")]
    ca: PathBuf,
    /// Where the agent keeps its cache (and, out of cluster, its key and certificate).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    data_dir: PathBuf,
    /// Name to register as (DNS-1123 label); only needed for the first start.
    #[arg(long, env = "FLOTILLA_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Bootstrap token from `flotilla token create`; only needed to register.
    #[arg(long, env = "FLOTILLA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding a bootstrap token, read whenever one is needed: an agent whose certificate
    /// expired (a long hub outage) keeps enforcing its apps and re-registers once a token bound
    /// to its name appears here (or in its identity Secret).
    #[arg(long, env = "FLOTILLA_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Labels to register with, k=v,k2=v2.
    #[arg(long, env = "FLOTILLA_LABELS", value_delimiter = ',', value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Kubeconfig of the cluster this agent manages; its cached apps are enforced even while
    /// the hub is unreachable. Without it: the pod's service account in a cluster, else
    /// KUBECONFIG, else no cluster (the agent only holds its hub session).
    #[arg(long, env = "FLOTILLA_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Where the service account is mounted in-cluster (token, ca.crt, namespace).
    #[arg(long, env = "FLOTILLA_SERVICE_ACCOUNT_DIR", default_value = flotilla_agent::cluster_config::SERVICE_ACCOUNT_DIR)]
    service_account_dir: PathBuf,
    /// Keep the key and certificate in this Secret of the managed cluster, NAMESPACE/NAME (the
    /// default in-cluster: flotilla-system/flotilla-agent-identity); a bootstrap token may be
    /// left there under `token`.
    #[arg(long, env = "FLOTILLA_IDENTITY_SECRET", value_parser = parse_secret_ref)]
    identity_secret: Option<(String, String)>,
    /// Full re-apply interval of running apps.
    #[arg(long, env = "FLOTILLA_RESYNC", default_value = "5m", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// How often a settled app's health is read again when none of its objects changed (a
    /// change is seen by the watch and reported at once).
    #[arg(long, env = "FLOTILLA_HEALTH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    health_interval: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (and /healthz, /readyz).
    #[arg(long, env = "FLOTILLA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Args)]
struct ApplyArgs {
    /// Kubeconfig of the target cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// App name: labels every object and names its inventory.
    #[arg(long)]
    app: String,
    /// Namespace for namespaced objects that name none.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// How long to wait for the app to become healthy.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Keep objects that left the bundle instead of deleting them.
    #[arg(long)]
    no_prune: bool,
    /// Allow an empty bundle to prune everything the app had.
    #[arg(long)]
    allow_empty: bool,
    /// Create namespaces the manifests need and do not define.
    #[arg(long)]
    create_namespace: bool,
    /// Local cache of inventories and bundles.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// After applying, keep healing drift until interrupted.
    #[arg(long)]
    watch: bool,
    /// Full re-apply interval while watching.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    resync: Duration,
    /// Directory of manifests (.yaml, .yml, .json; multi-document).
    dir: PathBuf,
}

fn parse_secret_ref(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
    }
}

/// Where an in-cluster agent keeps its identity unless told otherwise.
const DEFAULT_IDENTITY_SECRET: (&str, &str) = ("flotilla-system", "flotilla-agent-identity");

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not of the form key=value"))
}

#[tokio::main]
async fn main() -> ExitCode {
    // Its identity and bundle cache are for this user only.
    flotilla_proto::private_files::owner_only_umask();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        signals.cancel();
    });
    match Cli::parse().command {
        Command::Run(args) => run_agent(args, shutdown).await,
        Command::Apply(args) => {
            let opts = ApplyOptions {
                kubeconfig: args.kubeconfig,
                app: AppSpec {
                    name: args.app,
                    namespace: args.namespace,
                    prune: !args.no_prune,
                    allow_empty: args.allow_empty,
                    create_namespace: args.create_namespace,
                    manual: false,
                    self_heal: true,
                },
                dir: args.dir,
                timeout: args.timeout,
                data_dir: args.data_dir,
                watch: args.watch,
                resync: args.resync,
            };
            match apply(opts, shutdown).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

async fn run_agent(args: RunArgs, shutdown: CancellationToken) -> ExitCode {
    // A data directory an earlier version left readable becomes owner-only.
    if let Err(e) = flotilla_proto::private_files::restrict_tree(&args.data_dir) {
        eprintln!("error: making {} owner-only: {e}", args.data_dir.display());
        return ExitCode::from(2);
    }
    let ca_pem = match std::fs::read(&args.ca) {
        Ok(pem) => pem,
        Err(e) => {
            eprintln!("error: reading --ca {}: {e}", args.ca.display());
            return ExitCode::from(2);
        }
    };
    use flotilla_agent::cluster_config::{ClusterSource, Environment, choose};
    let env = Environment::read(&args.service_account_dir);
    let cluster = choose(args.kubeconfig, &env, &args.service_account_dir);
    let identity_secret = args.identity_secret.or_else(|| {
        matches!(cluster, ClusterSource::InCluster { .. }).then(|| {
            let (ns, name) = DEFAULT_IDENTITY_SECRET;
            (ns.to_string(), name.to_string())
        })
    });
    let opts = RunOptions {
        link: HubLink::new(args.hub, ca_pem),
        data_dir: args.data_dir,
        cluster_name: args.cluster_name,
        token: args.token,
        labels: args.labels.into_iter().collect::<BTreeMap<_, _>>(),
        cluster,
        identity_secret,
        resync: args.resync,
        health_interval: args.health_interval,
        metrics_listen: args.metrics_listen,
        token_file: args.token_file,
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

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
        return;
    }
    let _ = ctrl_c.await;
}

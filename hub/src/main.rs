//! `flotilla-hub`: initialize a hub data directory, or serve one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flotilla_hub::Settings;
use flotilla_hub::identity::pki;
use flotilla_hub::server::{ServeOptions, SourceOptions, serve};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "flotilla-hub", version, about = "The Flotilla hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Create a hub data directory: CA, serving certificate, admin client certificate.
    Init {
        /// The data directory to create (keys are written 0600).
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
        /// The data directory made by `init` (or `restore`): PKI and the hub's state.
        #[arg(long)]
        data_dir: PathBuf,
        /// Address of the gRPC listener agents and operators dial.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Lifetime of issued cluster certificates (agents renew at 2/3 of it), e.g. 30d, 12h, 5m.
        #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
        cert_ttl: Duration,
        /// Heartbeat interval asked of agents; a stream silent for 3 intervals is dropped.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        heartbeat_interval: Duration,
        /// HTTP listener for git webhooks (and metrics).
        #[arg(long)]
        http_listen: Option<SocketAddr>,
        /// A second gRPC listener for operators only (the CLI), admitted on its own budget so it
        /// answers while thousands of agents reconnect to --listen.
        #[arg(long, env = "FLOTILLA_OPERATOR_LISTEN")]
        operator_listen: Option<SocketAddr>,
        /// New agent connections (TLS handshakes) admitted per second; more wait their turn.
        #[arg(long, default_value_t = 200)]
        max_handshakes_per_second: u32,
        /// Connections admitted at once before pacing starts.
        #[arg(long, default_value_t = 50)]
        handshake_burst: u32,
        /// Open connections at most, per listener; more are refused (keep it below `ulimit -n`).
        #[arg(long, default_value_t = 20_000)]
        max_connections: usize,
        /// Open connections at most from one source address, per listener.
        #[arg(long, default_value_t = 5_000)]
        max_connections_per_address: usize,
        /// The longest lifetime a bootstrap token may be given (`token create --ttl`); tokens
        /// asked without one live 1h.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        max_token_ttl: Duration,
        /// How often each git source is fetched (±10% jitter).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        poll_interval: Duration,
        /// File holding the webhook HMAC secret; without it webhooks are refused.
        #[arg(long)]
        webhook_secret_file: Option<PathBuf>,
        /// Binary for kustomize sources: `kubectl` (runs `kubectl kustomize`) or `kustomize`.
        #[arg(long, default_value = "kubectl")]
        kustomize_bin: String,
        /// Binary for Helm sources (runs `helm template`; no network at render time).
        #[arg(long, default_value = "helm")]
        helm_bin: String,
        /// A git repository holding App documents: the fleet's own definition (GitOps-managed).
        #[arg(long)]
        fleet_repo: Option<String>,
        /// YAML list of credentials for private repositories: {url, username, passwordFile}.
        #[arg(long)]
        repo_credentials: Option<PathBuf>,
        /// Branch, tag or commit of the fleet repository.
        #[arg(long, default_value = "main")]
        fleet_ref: String,
        /// Directory in the fleet repository with the App documents.
        #[arg(long, default_value = "")]
        fleet_path: String,
    },
    /// Rebuild a data directory from a backup (`flotilla backup`); then `serve` it.
    Restore {
        /// A new (or empty) directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// File holding the passphrase the backup was taken with (else FLOTILLA_BACKUP_PASSPHRASE).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Restore app records that do not decode as they are (else the restore is refused); the
        /// hub holds each such app on every cluster until it is fixed or deleted.
        #[arg(long)]
        keep_unreadable: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Bundles hold Secret data; keys, caches and the store are for this user only.
    flotilla_proto::private_files::owner_only_umask();
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
        Command::Restore {
            data_dir,
            from,
            passphrase_file,
            keep_unreadable,
        } => {
            let passphrase = flotilla_hub::db::backup::read_passphrase(passphrase_file.as_deref())?;
            let bytes =
                std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
            let summary =
                flotilla_hub::db::backup::restore(&data_dir, &bytes, &passphrase, keep_unreadable)
                    .with_context(|| {
                        format!("restoring {} into {}", from.display(), data_dir.display())
                    })?;
            println!(
                "restored {} (backup of {}) into {}",
                from.display(),
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(summary.created_at).unwrap_or(0))
                ),
                data_dir.display()
            );
            for (tree, n) in &summary.records {
                println!("  {tree:<14} {n}");
            }
            for u in &summary.unreadable {
                println!(
                    "  kept unreadable: {u} (the hub holds this app until it is fixed or deleted)"
                );
            }
            Ok(())
        }
        Command::Serve {
            data_dir,
            listen,
            cert_ttl,
            heartbeat_interval,
            http_listen,
            operator_listen,
            max_handshakes_per_second,
            handshake_burst,
            max_connections,
            max_connections_per_address,
            max_token_ttl,
            poll_interval,
            webhook_secret_file,
            kustomize_bin,
            helm_bin,
            fleet_repo,
            repo_credentials,
            fleet_ref,
            fleet_path,
        } => {
            let credentials = match &repo_credentials {
                Some(path) => {
                    let credentials =
                        flotilla_hub::sources::credentials::RepoCredentials::load(path)
                            .with_context(|| format!("--repo-credentials {}", path.display()))?;
                    tracing::info!(prefixes = ?credentials.prefixes(), "repository credentials loaded");
                    credentials
                }
                None => Default::default(),
            };
            flotilla_hub::apps::check_path(&fleet_path).context("--fleet-path")?;
            // A data directory an earlier version left readable becomes owner-only.
            flotilla_proto::private_files::restrict_tree(&data_dir)
                .with_context(|| format!("making {} owner-only", data_dir.display()))?;
            let fleet = fleet_repo.map(|url| flotilla_hub::sources::FleetRepo {
                url,
                reference: fleet_ref,
                path: fleet_path,
            });
            let webhook_secret = match &webhook_secret_file {
                Some(path) => {
                    let secret = std::fs::read(path).with_context(|| {
                        format!("reading --webhook-secret-file {}", path.display())
                    })?;
                    let trimmed = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
                    anyhow::ensure!(
                        !trimmed.is_empty(),
                        "--webhook-secret-file {} is empty",
                        path.display()
                    );
                    Some(trimmed)
                }
                None => None,
            };
            // reqwest (gix's HTTP transport) uses the process-wide rustls provider: ring.
            let _ = rustls::crypto::ring::default_provider().install_default();
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
                    handshake_rate: max_handshakes_per_second,
                    handshake_burst,
                    max_connections,
                    max_connections_per_address,
                    token_ttl_default: Duration::from_secs(3600).min(max_token_ttl),
                    token_ttl_max: max_token_ttl,
                },
                http_listen,
                operator_listen,
                sources: SourceOptions {
                    poll_interval,
                    kustomize_bin,
                    helm_bin,
                    webhook_secret,
                    fleet,
                    credentials,
                },
            };
            serve(opts, shutdown, |bound| {
                // Scripts and tests read the bound ports from these lines.
                println!("flotilla-hub listening on {}", bound.grpc);
                if let Some(http) = bound.http {
                    println!("flotilla-hub http on {http}");
                }
                if let Some(operators) = bound.operators {
                    println!("flotilla-hub operators on {operators}");
                }
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

//! `flotilla`: the operator CLI. Talks to the hub's Admin API with the admin client certificate.

/// Prints a line to stdout. A closed pipe (`flotilla status | head`) ends the program quietly, as
/// the shell's own tools do, instead of panicking in `println!`.
macro_rules! out {
    () => { $crate::emit(format_args!("")) };
    ($($arg:tt)*) => { $crate::emit(format_args!($($arg)*)) };
}

mod demo;
mod documents;
mod join;
mod live;
mod output;
mod terminal;
mod wait;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use flotilla_proto::v1::FleetStatusRequest;
use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::{
    ApplyAppRequest, BackupRequest, CreateTokenRequest, DeleteAppRequest, DeregisterClusterRequest,
    DiffAppRequest, GetAppRequest, GetClusterRequest, GetRolloutRequest, LabelClusterRequest,
    ListAppsRequest, ListAuditRequest, ListClustersRequest, RebuildClusterRequest,
    RollbackAppRequest, RolloutActionRequest, SyncAppRequest,
};
use flotilla_proto::v1::{ListTokensRequest, RevokeTokenRequest};
use flotilla_proto::{ClientTls, describe_status, endpoint, error_chain};
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "flotilla", version, about = "Operate a Flotilla fleet")]
struct Cli {
    #[command(flatten)]
    conn: Connection,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// How to reach the hub as an admin.
#[derive(clap::Args)]
struct Connection {
    /// Hub address, https://HOST:PORT.
    #[arg(long, global = true, env = "FLOTILLA_HUB")]
    hub: Option<String>,
    /// Hub CA certificate (PEM).
    #[arg(long, global = true, env = "FLOTILLA_CA")]
    ca: Option<PathBuf>,
    /// Admin client certificate (PEM).
    #[arg(long, global = true, env = "FLOTILLA_CERT")]
    cert: Option<PathBuf>,
    /// Admin client key (PEM).
    #[arg(long, global = true, env = "FLOTILLA_KEY")]
    key: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local fleet (hub + agents in this process) and watch it register and connect.
    Demo {
        /// How many clusters.
        #[arg(long, default_value_t = 3)]
        clusters: usize,
        /// Exit once every cluster is connected (for scripts), instead of running until Ctrl-C.
        #[arg(long)]
        exit_when_synced: bool,
    },
    /// Bootstrap tokens for registering clusters.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Registered clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// The fleet x app matrix: what each cluster runs and how it stands.
    Status,
    /// Apps: what runs where, from git.
    App {
        #[command(subcommand)]
        command: AppCommand,
    },
    /// An app's rollout: where it stands, and the operator's levers.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Write an online, consistent backup of the hub (private keys sealed under a passphrase).
    Backup {
        /// Where to write the backup (created with mode 0600).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// File holding the passphrase (else FLOTILLA_BACKUP_PASSPHRASE); at least 12 characters.
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// The audit log of operator actions, oldest first.
    Audit {
        /// How many of the newest entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Steps, per-cluster state, and why it is waiting.
    Status {
        /// The app whose rollout to show.
        app: String,
        /// Keep showing it until it ends: exit 0 when it Succeeded, 1 when it rolled back, failed
        /// or timed out, 2 when it is paused waiting for an operator.
        #[arg(long)]
        watch: bool,
        /// How long `--watch` waits.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Start nothing new until resumed.
    Pause {
        /// The app whose rollout to pause.
        app: String,
    },
    /// Continue after a pause (a step's, an operator's, or one at the failure threshold).
    Resume {
        /// The app whose rollout to resume.
        app: String,
    },
    /// Skip the current step's soak or pause.
    Promote {
        /// The app whose rollout to promote.
        app: String,
    },
    /// Roll every touched cluster back to its previous stable bundle.
    Abort {
        /// The app whose rollout to abort.
        app: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a bootstrap token; it is printed once and only its hash is kept.
    Create {
        /// How long the token is valid, e.g. 1h, 30m.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many clusters may register with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Only this cluster name may register with it.
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Every token the hub keeps: id, expiry, uses left, bound name, revoked (never the secret).
    List,
    /// Refuse a token from now on.
    Revoke {
        /// The token's id, from `token create` or `token list`.
        id: String,
    },
}

#[derive(Subcommand)]
enum AppCommand {
    /// Create or update the App documents in a file (multi-document YAML; `-` for stdin).
    Apply {
        /// The file of App documents, or `-` for stdin.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// List apps with their revision and error.
    List,
    /// Show one app: revision, per-cluster bundles, history.
    Get {
        /// The app's name.
        name: String,
    },
    /// Delete an app (its clusters stop running it).
    Delete {
        /// The app's name.
        name: String,
    },
    /// Wait until every cluster the app targets runs what git wants, Synced and Healthy; live
    /// progress on a terminal, then a result line (exit 0, or 1 when it timed out).
    Wait {
        /// The app's name.
        name: String,
        /// How long to wait.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// The revisions an app was rendered at, newest first, and which were rolled out.
    History {
        /// The app's name.
        name: String,
    },
    /// Pin an app to an earlier revision; it reaches the fleet through a rollout.
    Rollback {
        /// The app's name.
        name: String,
        /// A commit from `app history` (default: the previous stable revision).
        #[arg(long)]
        to: Option<String>,
        /// Unpin instead: follow the app's ref again.
        #[arg(long, conflicts_with = "to")]
        unpin: bool,
    },
    /// Ask the app's clusters (or one) to apply what git wants them to run, once: how a manual
    /// app (`syncPolicy.automated: false`) changes anything. Audited.
    Sync {
        /// The app's name.
        name: String,
        /// Only this cluster (default: every cluster the app targets).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// What a sync would change on one cluster, as a unified diff (live against desired, from a
    /// server-side dry run); exit code 1 when there are differences, 2 on error, like `kubectl diff`.
    Diff {
        /// The app's name.
        name: String,
        /// The cluster to diff against.
        #[arg(long)]
        cluster: String,
    },
}

/// The command already said how it ended (`app diff` found differences, a wait's result line):
/// exit with this code and print nothing more.
#[derive(Debug)]
pub(crate) struct Exit(pub(crate) u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for Exit {}

#[derive(Subcommand)]
enum ClusterCommand {
    /// List clusters: name, labels, connected, last seen, certificate expiry.
    List,
    /// Show one cluster.
    Get {
        /// The cluster's name.
        name: String,
    },
    /// Set (k=v) or remove (k-) labels.
    Label {
        /// The cluster's name.
        name: String,
        /// Labels to set (`k=v`) or remove (`k-`).
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Revoke a cluster's certificates and drop its agent.
    Deregister {
        /// The cluster's name.
        name: String,
    },
    /// Replace a lost cluster: revoke its certificate and print a token that registers a new
    /// cluster as NAME (same labels, same apps at the revisions it ran).
    Rebuild {
        /// The lost cluster's name; its replacement registers under it.
        name: String,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Print the install manifests for the replacement cluster (as `cluster join` does)
        /// instead of the token.
        #[arg(long)]
        manifest: bool,
        /// The address agents dial (default: --hub).
        #[arg(long)]
        hub_address: Option<String>,
        /// After printing the token, wait until the replacement registered and every app it
        /// runs is Healthy (exit 0, or 1 when it timed out).
        #[arg(long)]
        wait: bool,
        /// How long `--wait` waits.
        #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print the manifests that install and register an agent in cluster NAME: deploy/agent with
    /// a fresh single-use token bound to NAME, the hub CA, the hub address and the labels.
    /// `flotilla cluster join eu-1 --labels region=eu | kubectl --context eu-1 apply -f -`
    Join {
        /// The name the new cluster registers as (DNS-1123 label).
        name: String,
        /// Labels to register with, k=v,k2=v2.
        #[arg(long, default_value = "")]
        labels: String,
        /// The address agents dial (default: --hub).
        #[arg(long)]
        hub_address: Option<String>,
        /// How long the token is valid (it registers one cluster, once).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let diff = matches!(
        cli.command,
        Command::App {
            command: AppCommand::Diff { .. }
        }
    );
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if err.is::<Exit>() => {
            ExitCode::from(err.downcast_ref::<Exit>().map_or(1, |e| e.0))
        }
        Err(err) => {
            // Errors quote what the hub said, which may quote a repository or an agent.
            eprintln!("error: {}", terminal::cell(&format!("{err:#}")));
            // `app diff` keeps 1 for "differences", as kubectl diff does.
            ExitCode::from(if diff { 2 } else { 1 })
        }
    }
}

pub(crate) fn emit(line: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

async fn admin_client(cli: &Connection) -> anyhow::Result<AdminClient<Channel>> {
    let hub = cli
        .hub
        .as_deref()
        .context("no hub address: pass --hub or set FLOTILLA_HUB")?;
    let read = |flag: &str, env: &str, path: &Option<PathBuf>| -> anyhow::Result<Vec<u8>> {
        let path = path
            .as_ref()
            .with_context(|| format!("no {flag}: pass {flag} or set {env}"))?;
        std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))
    };
    let tls = ClientTls {
        ca_pem: read("--ca", "FLOTILLA_CA", &cli.ca)?,
        identity: Some((
            read("--cert", "FLOTILLA_CERT", &cli.cert)?,
            read("--key", "FLOTILLA_KEY", &cli.key)?,
        )),
    };
    let channel = endpoint(hub, &tls)?
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {hub}: {}", error_chain(&e)))?;
    Ok(AdminClient::new(channel))
}

pub(crate) fn rpc_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(describe_status(&status))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let format = cli.output;
    match cli.command {
        Command::Demo {
            clusters,
            exit_when_synced,
        } => demo::run(clusters, exit_when_synced).await,
        Command::Token { command } => token(&cli.conn, format, command).await,
        Command::Cluster { command } => cluster(&cli.conn, format, command).await,
        Command::App { command } => app(&cli.conn, format, command).await,
        Command::Rollout { command } => rollout(&cli.conn, format, command).await,
        Command::Backup {
            file,
            passphrase_file,
        } => {
            let passphrase = flotilla_hub::db::backup::read_passphrase(passphrase_file.as_deref())?;
            let mut admin = admin_client(&cli.conn).await?;
            let mut stream = admin
                .backup(BackupRequest { passphrase })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.message().await.map_err(rpc_error)? {
                bytes.extend_from_slice(&chunk.data);
            }
            flotilla_hub::db::fsutil::write_private(&file, &bytes)
                .with_context(|| format!("writing {}", file.display()))?;
            match format {
                Format::Json => out!(
                    "{}",
                    serde_json::json!({"file": file.display().to_string(), "bytes": bytes.len()})
                ),
                Format::Table => out!(
                    "backup written to {} ({} bytes)",
                    file.display(),
                    bytes.len()
                ),
            }
            Ok(())
        }
        Command::Audit { limit } => {
            let mut admin = admin_client(&cli.conn).await?;
            let entries = admin
                .list_audit(ListAuditRequest { limit })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .entries;
            output::audit(format, &entries);
            Ok(())
        }
        Command::Status => {
            let mut admin = admin_client(&cli.conn).await?;
            let rows = admin
                .fleet_status(FleetStatusRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .rows;
            output::status(format, &rows);
            Ok(())
        }
    }
}

async fn app(conn: &Connection, format: Format, command: AppCommand) -> anyhow::Result<()> {
    let mut admin = admin_client(conn).await?;
    match command {
        AppCommand::Apply { file } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let mut applied = Vec::new();
            // Each document is sent as written: the hub's errors then name the file's lines.
            for doc in documents::split(&text) {
                let value: serde_json::Value =
                    serde_yaml_ng::from_str(&doc.text).with_context(|| {
                        format!("{} document {}: invalid YAML", file.display(), doc.index)
                    })?;
                if value.is_null() {
                    continue;
                }
                let app = admin
                    .apply_app(ApplyAppRequest { document: doc.text })
                    .await
                    .map_err(|s| {
                        anyhow::anyhow!(
                            "{} document {}: {}",
                            file.display(),
                            doc.index,
                            describe_status(&s)
                        )
                    })?
                    .into_inner();
                applied.push(app);
            }
            output::apps_applied(format, &applied);
        }
        AppCommand::List => {
            let apps = admin
                .list_apps(ListAppsRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .apps;
            output::apps(format, &apps);
        }
        AppCommand::Get { name } => {
            let app = admin
                .get_app(GetAppRequest { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::app(format, &app);
        }
        AppCommand::Wait { name, timeout } => return wait::app(&mut admin, &name, timeout).await,
        AppCommand::History { name } => {
            let app = admin
                .get_app(GetAppRequest { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::history(format, &app);
        }
        AppCommand::Rollback { name, to, unpin } => {
            let app = admin
                .rollback_app(RollbackAppRequest {
                    app: name,
                    to: to.unwrap_or_default(),
                    unpin,
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            match format {
                Format::Json => output::app(format, &app),
                Format::Table if app.pinned_revision.is_empty() => {
                    out!("app/{} unpinned: it follows its ref again", app.name)
                }
                Format::Table => out!(
                    "app/{} pinned to {}; `flotilla rollout status {}` follows it",
                    app.name,
                    app.pinned_revision,
                    app.name
                ),
            }
        }
        AppCommand::Sync { name, cluster } => {
            let requested = admin
                .sync_app(SyncAppRequest {
                    app: name.clone(),
                    cluster: cluster.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner()
                .requested;
            output::sync_requested(format, &name, &requested);
        }
        AppCommand::Diff { name, cluster } => {
            let diff = admin
                .diff_app(DiffAppRequest { app: name, cluster })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if output::diff(format, &diff) {
                return Err(Exit(1).into());
            }
        }
        AppCommand::Delete { name } => {
            admin
                .delete_app(DeleteAppRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?;
            match format {
                Format::Json => out!("{}", serde_json::json!({"name": name, "deleted": true})),
                Format::Table => out!("app {name} deleted"),
            }
        }
    }
    Ok(())
}

/// The agent's install manifests for `name`, with the CLI's own hub CA.
fn join_manifests(
    conn: &Connection,
    name: &str,
    labels: &BTreeMap<String, String>,
    hub_address: Option<String>,
    token: &str,
) -> anyhow::Result<String> {
    let ca_path = conn
        .ca
        .as_ref()
        .context("--ca (or FLOTILLA_CA): the hub CA the agent is to trust")?;
    let ca_pem = std::fs::read_to_string(ca_path)
        .with_context(|| format!("reading --ca {}", ca_path.display()))?;
    let hub_address = hub_address
        .or_else(|| conn.hub.clone())
        .context("--hub-address or --hub: the address agents dial")?;
    join::manifests(&join::Join {
        cluster: name,
        labels,
        hub_address: &hub_address,
        token,
        ca_pem: &ca_pem,
    })
}

async fn token(conn: &Connection, format: Format, command: TokenCommand) -> anyhow::Result<()> {
    let mut admin = admin_client(conn).await?;
    match command {
        TokenCommand::Create { ttl, uses, cluster } => {
            let response = admin
                .create_token(CreateTokenRequest {
                    ttl_seconds: ttl.as_secs().max(1),
                    uses,
                    cluster_name: cluster.unwrap_or_default(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::token(format, &response);
        }
        TokenCommand::List => {
            let tokens = admin
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .tokens;
            output::tokens(format, &tokens);
        }
        TokenCommand::Revoke { id } => {
            let token = admin
                .revoke_token(RevokeTokenRequest { token_id: id })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::tokens(format, &[token]);
        }
    }
    Ok(())
}

async fn cluster(conn: &Connection, format: Format, command: ClusterCommand) -> anyhow::Result<()> {
    let mut admin = admin_client(conn).await?;
    match command {
        ClusterCommand::List => {
            let clusters = admin
                .list_clusters(ListClustersRequest {})
                .await
                .map_err(rpc_error)?
                .into_inner()
                .clusters;
            output::clusters(format, &clusters);
        }
        ClusterCommand::Get { name } => {
            let cluster = admin
                .get_cluster(GetClusterRequest { name })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::cluster(format, &cluster);
        }
        ClusterCommand::Label { name, changes } => {
            let mut request = LabelClusterRequest {
                name,
                ..Default::default()
            };
            for change in changes {
                if let Some((k, v)) = change.split_once('=') {
                    request.set.insert(k.to_string(), v.to_string());
                } else if let Some(k) = change.strip_suffix('-') {
                    request.remove.push(k.to_string());
                } else {
                    bail!("label change {change:?} must be key=value (set) or key- (remove)");
                }
            }
            let cluster = admin
                .label_cluster(request)
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::cluster(format, &cluster);
        }
        ClusterCommand::Rebuild {
            name,
            ttl,
            manifest,
            hub_address,
            wait,
            timeout,
        } => {
            let lost = admin
                .get_cluster(GetClusterRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let labels: BTreeMap<String, String> = if manifest {
                lost.labels.into_iter().collect()
            } else {
                BTreeMap::new()
            };
            let response = admin
                .rebuild_cluster(RebuildClusterRequest {
                    name: name.clone(),
                    ttl_seconds: ttl.as_secs().max(1),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            if manifest {
                let text = join_manifests(conn, &name, &labels, hub_address, &response.token)?;
                out!("{}", text.trim_end());
            } else {
                let hub = hub_address
                    .as_deref()
                    .or(conn.hub.as_deref())
                    .unwrap_or("HUB");
                let ca = conn
                    .ca
                    .as_deref()
                    .map_or_else(|| "CA".to_string(), |p| p.display().to_string());
                output::rebuild(format, &name, &response, hub, &ca);
            }
            if wait {
                return wait::rebuild(&mut admin, &name, &lost.cert_serial, timeout).await;
            }
        }
        ClusterCommand::Join {
            name,
            labels,
            hub_address,
            ttl,
        } => {
            let labels = join::parse_labels(&labels)?;
            let token = admin
                .create_token(CreateTokenRequest {
                    ttl_seconds: ttl.as_secs().max(1),
                    uses: 1,
                    cluster_name: name.clone(),
                })
                .await
                .map_err(rpc_error)?
                .into_inner();
            let text = join_manifests(conn, &name, &labels, hub_address, &token.token)?;
            out!("{}", text.trim_end());
            eprintln!(
                "token {} registers {name} once, until {}; apply the manifests with kubectl in that cluster",
                token.token_id,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(token.expires_at_unix).unwrap_or(0))
                )
            );
        }
        ClusterCommand::Deregister { name } => {
            let response = admin
                .deregister_cluster(DeregisterClusterRequest { name: name.clone() })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::deregistered(format, &name, &response.revoked_serials);
        }
    }
    Ok(())
}

async fn rollout(conn: &Connection, format: Format, command: RolloutCommand) -> anyhow::Result<()> {
    let mut admin = admin_client(conn).await?;
    let (app, action) = match command {
        RolloutCommand::Status {
            app,
            watch: true,
            timeout,
        } if format == Format::Table => return wait::rollout(&mut admin, &app, timeout).await,
        RolloutCommand::Status { app, watch, .. } => {
            if watch {
                anyhow::bail!("--watch shows a table; drop -o json");
            }
            let status = admin
                .get_rollout(GetRolloutRequest { app })
                .await
                .map_err(rpc_error)?
                .into_inner();
            output::rollout(format, &status);
            return Ok(());
        }
        RolloutCommand::Pause { app } => (app, "pause"),
        RolloutCommand::Resume { app } => (app, "resume"),
        RolloutCommand::Promote { app } => (app, "promote"),
        RolloutCommand::Abort { app } => (app, "abort"),
    };
    let status = admin
        .rollout_action(RolloutActionRequest {
            app,
            action: action.to_string(),
        })
        .await
        .map_err(rpc_error)?
        .into_inner();
    output::rollout(format, &status);
    Ok(())
}

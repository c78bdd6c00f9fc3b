//! Wires the store, CA and services into a TLS gRPC server and runs it until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::admin_server::AdminServer;
use flotilla_proto::v1::agent_server::AgentServer;
use flotilla_proto::v1::registration_server::RegistrationServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Server;

use crate::db::fsutil::read_file;
use crate::db::store;
use crate::fleet::sessions;
use crate::identity::auth;
use crate::identity::pki::{Ca, PkiPaths};
use crate::service::{admin::AdminService, agent::AgentService, registration::RegistrationService};
use crate::sources::{SourceSettings, SyncState};
use crate::{Error, Hub, Result, Settings};

/// Fetches of different repositories that may run at once.
const MAX_CONCURRENT_FETCHES: usize = 4;

/// How long a TLS handshake may take (a connection that never finishes it holds a slot no longer;
/// as long as tonic allowed, so a herd of agents on a loaded hub still gets through).
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// The longest a new connection waits for its handshake turn: well under the 5 s connect timeout
/// agents and the CLI use, so the handshakes the hub spends are for peers still waiting.
const QUEUE_WAIT: Duration = Duration::from_secs(2);
/// The operators' listener: handshakes per second and burst, and open connections at most.
const OPERATOR_HANDSHAKES: (u32, u32) = (50, 20);
const OPERATOR_CONNECTIONS: usize = 1_000;
/// A connection without a client certificate (registration, or nobody) silent this long is
/// closed: registration is one short call.
const ANONYMOUS_IDLE: Duration = Duration::from_secs(10);

/// The hub's TLS: its certificate, client certificates of the hub CA verified when presented
/// (Register is the one RPC without one; every other RPC checks for one), HTTP/2.
fn tls_config(paths: &PkiPaths, ca: &Ca) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |path: PathBuf, reason: String| Error::DataDir {
        path: path.display().to_string(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&read_file(&paths.hub())?)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(paths.hub(), format!("hub certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&read_file(&paths.hub_key())?)
        .map_err(|e| bad(paths.hub_key(), format!("hub key: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| bad(paths.ca(), format!("CA certificate: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(paths.ca(), format!("CA certificate: {e}")))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| bad(paths.ca(), format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Internal(format!("TLS versions: {e}")))?
        .with_client_cert_verifier(clients)
        .with_single_cert(chain, key)
        .map_err(|e| bad(paths.hub(), format!("hub certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A gRPC connection silent this long is closed. The server pings every 20 s (HTTP/2 keepalive) and
/// live peers answer, so only a peer that stopped talking (or never started: no HTTP/2 preface
/// after the TLS handshake, itself bounded at 10 s) reaches it.
const GRPC_IDLE: Duration = Duration::from_secs(30);
/// HTTP (webhooks, metrics) connections: silent this long, or open this long, are closed; a request
/// whose headers or body stall cannot hold a connection longer.
const HTTP_IDLE: Duration = Duration::from_secs(10);
const HTTP_MAX_AGE: Duration = Duration::from_secs(60);

/// How long open streams get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where and how to serve.
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub settings: Settings,
    /// Where webhooks are served, if anywhere.
    pub http_listen: Option<SocketAddr>,
    /// A listener for operators only (the Admin service), with its own admission budget: the CLI
    /// pointed here answers while thousands of agents queue for the main listener.
    pub operator_listen: Option<SocketAddr>,
    pub sources: SourceOptions,
}

/// Options of the git source machinery.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    pub poll_interval: Duration,
    pub kustomize_bin: String,
    pub helm_bin: String,
    pub webhook_secret: Option<Vec<u8>>,
    pub fleet: Option<crate::sources::FleetRepo>,
    pub credentials: crate::sources::credentials::RepoCredentials,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(60),
            kustomize_bin: "kubectl".into(),
            helm_bin: "helm".into(),
            webhook_secret: None,
            fleet: None,
            credentials: Default::default(),
        }
    }
}

/// The addresses a hub bound (ports chosen by the system when asked for port 0).
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub http: Option<SocketAddr>,
    pub operators: Option<SocketAddr>,
}

/// Serves until `shutdown` is cancelled. `on_ready` gets the bound address once the port is open.
/// How long a token that can never register again is still listed (`token list`).
const TOKEN_RETENTION_SECS: i64 = 30 * 24 * 3600;

pub async fn serve(
    opts: ServeOptions,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(Bound),
) -> Result<()> {
    let ca = Arc::new(Ca::load(&opts.data_dir)?);
    let paths = PkiPaths::new(&opts.data_dir);
    let tls = tls_config(&paths, &ca)?;

    let db_path = opts.data_dir.join("db");
    let store = store::Store::open(&db_path)?;
    let pruned = store
        .prune_tokens(crate::now_unix(), TOKEN_RETENTION_SECS)
        .await?;
    if pruned > 0 {
        tracing::info!(pruned, "forgot bootstrap tokens dead for more than 30 days");
    }
    let revoked = store.revoked_serials()?;
    let wake = Arc::new(crate::fleet::wake::Wakeups::default());
    let apps = crate::db::appstore::AppStore::open(store.db(), store.gate(), Arc::clone(&wake))?;
    let reports = crate::fleet::reports::Reports::open(store.db())?;
    let audit = crate::db::audit::AuditLog::open(store.db(), store.gate())?;
    let hub = Arc::new(Hub {
        data_dir: opts.data_dir.clone(),
        audit,
        wake,
        metrics: crate::edge::metrics::Metrics::default(),
        reports,
        apps,
        source_settings: SourceSettings {
            cache_root: opts.data_dir.join("repos"),
            kustomize_bin: opts.sources.kustomize_bin.clone(),
            helm_bin: opts.sources.helm_bin.clone(),
            poll_interval: opts.sources.poll_interval,
            webhook_secret: opts.sources.webhook_secret.clone(),
            fleet: opts.sources.fleet.clone(),
            credentials: opts.sources.credentials.clone(),
        },
        sync: SyncState::new(MAX_CONCURRENT_FETCHES),
        auth: auth::Auth::new(Arc::clone(&ca), revoked),
        store,
        ca,
        sessions: Arc::new(sessions::Sessions::default()),
        settings: opts.settings,
        shutdown: shutdown.child_token(),
        tasks: TaskTracker::new(),
    });

    let listener = TcpListener::bind(opts.listen)
        .await
        .map_err(|e| Error::Io {
            path: format!("listen address {}", opts.listen),
            source: e,
        })?;
    let local = listener.local_addr().map_err(|e| Error::Io {
        path: format!("listen address {}", opts.listen),
        source: e,
    })?;
    let http = match opts.http_listen {
        Some(addr) => Some(crate::sources::webhook::bind(addr).await?),
        None => None,
    };
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    let operators = match opts.operator_listen {
        Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| Error::Io {
            path: format!("operator listen address {addr}"),
            source: e,
        })?),
        None => None,
    };
    let operators_addr = match &operators {
        Some(l) => Some(l.local_addr().map_err(|e| Error::Io {
            path: "operator listen address".into(),
            source: e,
        })?),
        None => None,
    };
    tracing::info!(addr = %local, http = ?http_addr, operators = ?operators_addr, trust_domain = %hub.ca.trust_domain, "hub serving");
    on_ready(Bound {
        grpc: local,
        http: http_addr,
        operators: operators_addr,
    });
    hub.tasks.spawn(crate::sources::run(Arc::clone(&hub)));
    hub.tasks
        .spawn(crate::rollout::controller::run(Arc::clone(&hub)));
    if let Some(listener) = http {
        let hub2 = Arc::clone(&hub);
        let limiter = crate::edge::conn_limits::Limiter::new(
            crate::edge::conn_limits::Caps {
                max_total: hub.settings.max_connections,
                max_per_address: hub.settings.max_connections_per_address,
                idle: HTTP_IDLE,
                max_age: Some(HTTP_MAX_AGE),
                authenticated_first: false,
            },
            "http",
            hub.metrics.connections_refused.clone(),
        );
        hub.tasks.spawn(async move {
            if let Err(e) = crate::sources::webhook::serve(hub2, listener, limiter).await {
                tracing::error!(error = %e, "http listener failed");
            }
        });
    }

    if let Some(listener) = operators {
        serve_operators(&hub, listener, tls.clone());
    }
    let grpc_limiter = crate::edge::conn_limits::Limiter::new(
        crate::edge::conn_limits::Caps {
            max_total: hub.settings.max_connections,
            max_per_address: hub.settings.max_connections_per_address,
            idle: GRPC_IDLE,
            max_age: None,
            authenticated_first: true,
        },
        "grpc",
        hub.metrics.connections_refused.clone(),
    );
    let incoming = crate::edge::admission::paced(
        "grpc",
        listener,
        crate::edge::admission::Pacing {
            rate: hub.settings.handshake_rate,
            burst: hub.settings.handshake_burst,
            handshake_deadline: HANDSHAKE_DEADLINE,
            queue_wait: QUEUE_WAIT,
            anonymous_idle: ANONYMOUS_IDLE,
        },
        grpc_limiter,
        tokio_rustls::TlsAcceptor::from(tls),
        Arc::clone(&hub),
    );
    let served = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(RegistrationServer::new(RegistrationService::new(
            Arc::clone(&hub),
        )))
        .add_service(AgentServer::new(AgentService::new(Arc::clone(&hub))))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&hub))))
        .serve_with_incoming_shutdown(incoming, {
            let hub = Arc::clone(&hub);
            async move {
                shutdown.cancelled().await;
                // End the long-lived streams so the server can drain.
                hub.shutdown.cancel();
            }
        });
    let result = served.await;
    hub.shutdown.cancel();
    hub.tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, hub.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("session tasks did not finish within the grace period");
    }
    hub.store.close().await?;
    result?;
    Ok(())
}

/// The operators' listener: the Admin service behind its own admission (a small rate, its own
/// caps), so operators never queue behind agents' handshakes. Owned by the hub's tasks; ends at
/// shutdown.
fn serve_operators(hub: &Arc<Hub>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
    let limiter = crate::edge::conn_limits::Limiter::new(
        crate::edge::conn_limits::Caps {
            max_total: OPERATOR_CONNECTIONS,
            max_per_address: OPERATOR_CONNECTIONS,
            idle: GRPC_IDLE,
            max_age: None,
            authenticated_first: true,
        },
        "operators",
        hub.metrics.connections_refused.clone(),
    );
    let incoming = crate::edge::admission::paced(
        "operators",
        listener,
        crate::edge::admission::Pacing {
            rate: OPERATOR_HANDSHAKES.0,
            burst: OPERATOR_HANDSHAKES.1,
            handshake_deadline: HANDSHAKE_DEADLINE,
            queue_wait: QUEUE_WAIT,
            anonymous_idle: ANONYMOUS_IDLE,
        },
        limiter,
        tokio_rustls::TlsAcceptor::from(tls),
        Arc::clone(hub),
    );
    let served = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(hub))))
        .serve_with_incoming_shutdown(incoming, {
            let hub = Arc::clone(hub);
            async move { hub.shutdown.cancelled().await }
        });
    hub.tasks.spawn(async move {
        if let Err(e) = served.await {
            tracing::error!(error = %e, "operator listener failed");
        }
    });
}

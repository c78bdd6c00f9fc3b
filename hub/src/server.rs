//! Wires the store, CA and services into a TLS gRPC server and runs it until shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::admin_server::AdminServer;
use flotilla_proto::v1::agent_server::AgentServer;
use flotilla_proto::v1::registration_server::RegistrationServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::fsutil::read_file;
use crate::pki::{Ca, PkiPaths};
use crate::service::{admin::AdminService, agent::AgentService, registration::RegistrationService};
use crate::{Error, Hub, Result, Settings, auth, sessions, store};

/// How long open streams get to finish after shutdown is requested.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Where and how to serve.
pub struct ServeOptions {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub settings: Settings,
}

/// Serves until `shutdown` is cancelled. `on_ready` gets the bound address once the port is open.
pub async fn serve(
    opts: ServeOptions,
    shutdown: CancellationToken,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<()> {
    let ca = Arc::new(Ca::load(&opts.data_dir)?);
    let paths = PkiPaths::new(&opts.data_dir);
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read_file(&paths.hub())?,
            read_file(&paths.hub_key())?,
        ))
        .client_ca_root(Certificate::from_pem(ca.ca_pem.as_bytes()))
        // Register is the one RPC without a client certificate; every other RPC checks for one.
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));

    let db_path = opts.data_dir.join("db");
    let store = store::Store::open(&db_path)?;
    let revoked = store.revoked_serials()?;
    let hub = Arc::new(Hub {
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
    tracing::info!(addr = %local, trust_domain = %hub.ca.trust_domain, "hub serving");
    on_ready(local);

    let served = Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(RegistrationServer::new(RegistrationService::new(
            Arc::clone(&hub),
        )))
        .add_service(AgentServer::new(AgentService::new(Arc::clone(&hub))))
        .add_service(AdminServer::new(AdminService::new(Arc::clone(&hub))))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), {
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

//! The agent's main loop: obtain credentials (register on first start), keep them renewed, and keep a
//! session to the hub open, reconnecting with jittered backoff when it drops.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::{Backoff, random_fraction};
use crate::cluster_config::ClusterSource;
use crate::credentials::{Credentials, IdentityStore, now_unix};
use crate::engine::Engine;
use crate::engine::cache_mirror::Mirror;
use crate::engine::inventory::LocalCache;
use crate::fleet::{Fleet, StatusBoard};
use crate::link::{FleetLink, HubLink, OpenSession, SessionEnd};
use crate::{Error, Result};
use flotilla_proto::v1::AppDigest;

const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What `flotilla-agent run` was told.
pub struct RunOptions {
    pub link: HubLink,
    pub data_dir: PathBuf,
    pub cluster_name: Option<String>,
    pub token: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// The cluster this agent manages, when it manages one.
    pub cluster: ClusterSource,
    /// Keep the identity in this Secret (namespace, name) of the managed cluster instead of the
    /// data directory.
    pub identity_secret: Option<(String, String)>,
    /// Full re-apply interval of cached apps.
    pub resync: Duration,
    /// How often a settled app's health is read again without a change seen by the watch.
    pub health_interval: Duration,
    /// Where to serve `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// A file holding a bootstrap token, read whenever one is needed (so an operator can hand a
    /// running agent a new one after its certificate expired).
    pub token_file: Option<PathBuf>,
}

/// How often an agent that needs a bootstrap token looks for one.
const BOOTSTRAP_POLL: Duration = Duration::from_secs(2);

/// Runs until shutdown (Ok) or until the agent cannot go on without an operator (Err).
pub async fn run(opts: RunOptions, shutdown: CancellationToken) -> Result<()> {
    let board = Arc::new(StatusBoard::default());
    let metrics = Arc::new(crate::metrics::Metrics::default());
    if let Some(addr) = opts.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Io {
                path: format!("--metrics-listen {addr}"),
                source: e,
            })?;
        let (metrics, cancel) = (Arc::clone(&metrics), shutdown.clone());
        // Owned by the shutdown token: it ends with the agent.
        tokio::spawn(async move {
            if let Err(e) = crate::metrics::serve(metrics, listener, cancel).await {
                tracing::warn!(error = %e, "metrics listener failed");
            }
        });
    }
    let (assignments, assignments_rx) = watch::channel(None);
    let link = FleetLink {
        assignments,
        board: Arc::clone(&board),
        metrics: Arc::clone(&metrics),
    };
    let client = crate::cluster_config::client(&opts.cluster).await?;
    let store = match (&opts.identity_secret, &client) {
        (Some((namespace, name)), Some(client)) => {
            IdentityStore::in_secret(client.clone(), namespace, name)
        }
        (Some((namespace, name)), None) => {
            return Err(Error::NeedsOperator(format!(
                "the identity Secret {namespace}/{name} needs a cluster: run in-cluster or pass --kubeconfig"
            )));
        }
        (None, _) => IdentityStore::new(&opts.data_dir),
    };
    // The cluster side never waits for the hub: cached apps keep being enforced while it is away.
    let fleet = match client {
        Some(client) => {
            let mut cache = LocalCache::open(&opts.data_dir, store.cache_key().await?)?;
            if let Some((namespace, _)) = &opts.identity_secret {
                // In-cluster, the bundles live beside the identity too: a pod rescheduled onto an
                // empty disk while the hub is down still enforces what it knew.
                cache = cache.with_mirror(Mirror::new(client.clone(), namespace));
                match cache.restore().await {
                    Ok(apps) if !apps.is_empty() => {
                        tracing::info!(?apps, "bundles restored from their Secrets");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the bundle Secrets could not be read; the hub's assignments bring the apps back");
                    }
                }
            }
            let mut engine = Engine::new(client, Some(cache));
            let name = match &opts.cluster_name {
                Some(name) => Some(name.clone()),
                None => store.load().await.ok().flatten().map(|c| c.cluster),
            };
            if let Some(name) = name {
                engine = engine.for_cluster(&name);
            }
            let engine = Arc::new(engine);
            Some(Fleet::new(
                engine,
                opts.link.clone(),
                store.clone(),
                board,
                crate::fleet::Intervals {
                    resync: opts.resync,
                    health: opts.health_interval,
                },
                Arc::clone(&metrics),
            ))
        }
        None => None,
    };
    let running = fleet
        .as_ref()
        .map(|f| f.running_digests())
        .unwrap_or_default();
    let cluster_side = async {
        match fleet {
            Some(fleet) => fleet.run(assignments_rx, shutdown.clone()).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = hub_side(&opts, &store, &shutdown, &link, running) => result,
        result = cluster_side => result,
    }
}

async fn hub_side(
    opts: &RunOptions,
    store: &IdentityStore,
    shutdown: &CancellationToken,
    fleet: &FleetLink,
    running: Vec<AppDigest>,
) -> Result<()> {
    let shutdown = shutdown.clone();
    // A token the hub refused is not offered again: the operator must give another.
    let mut refused: Option<Vec<u8>> = None;
    loop {
        let creds = match obtain_credentials(opts, store, &shutdown, &mut refused).await {
            Ok(Some(creds)) => creds,
            Ok(None) => return Ok(()),
            Err(Error::NeedsBootstrap(why)) => {
                fleet.metrics.needs_bootstrap.set(1);
                tracing::error!("{why}; the cached apps are still enforced");
                if sleep_or_shutdown(BOOTSTRAP_POLL, &shutdown).await {
                    return Ok(());
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        fleet.metrics.needs_bootstrap.set(0);
        let (updates, credentials) = watch::channel(creds);
        let result = tokio::select! {
            result = renew_forever(&opts.link, store, updates, &shutdown) => result,
            result = hold_sessions(&opts.link, credentials, &shutdown, fleet, running.clone()) => result,
        };
        match result {
            // Expired before it could be renewed: wait for a token, keep the cluster side going.
            Err(Error::NeedsBootstrap(why)) => {
                fleet.metrics.needs_bootstrap.set(1);
                tracing::error!("{why}; the cached apps are still enforced");
            }
            other => return other,
        }
    }
}

/// A bootstrap token from the flag or `FLOTILLA_TOKEN`, else the token file, else the identity
/// Secret; one the hub refused before is passed over.
async fn find_token(
    opts: &RunOptions,
    store: &IdentityStore,
    refused: &Option<Vec<u8>>,
) -> Result<Option<String>> {
    let usable =
        |t: &String| !t.is_empty() && refused.as_deref() != Some(token_digest(t).as_slice());
    if let Some(t) = opts.token.clone().filter(usable) {
        return Ok(Some(t));
    }
    if let Some(path) = &opts.token_file {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let t = text.trim().to_string();
                if usable(&t) {
                    return Ok(Some(t));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
    }
    Ok(store.token().await?.filter(usable))
}

/// A token's digest, to remember which one was refused without keeping it.
fn token_digest(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

/// Existing valid credentials, or new ones from registering with a token. `None` on shutdown;
/// [`Error::NeedsBootstrap`] when the certificate expired and no usable token is at hand.
async fn obtain_credentials(
    opts: &RunOptions,
    store: &IdentityStore,
    shutdown: &CancellationToken,
    refused: &mut Option<Vec<u8>>,
) -> Result<Option<Credentials>> {
    let existing = store.load().await?;
    let name = match (&existing, &opts.cluster_name) {
        (Some(creds), Some(flag)) if &creds.cluster != flag => {
            return Err(Error::NeedsOperator(format!(
                "{} holds the identity of cluster {:?}, but --cluster-name is {flag:?}; use another --data-dir or --identity-secret",
                store.describe(),
                creds.cluster
            )));
        }
        (Some(creds), _) => creds.cluster.clone(),
        (None, Some(flag)) => flag.clone(),
        (None, None) => {
            return Err(Error::NeedsOperator(format!(
                "no identity in {}: pass --cluster-name and --token to register",
                store.describe()
            )));
        }
    };
    let expired = existing
        .as_ref()
        .map(|c| (c.is_expired(now_unix()), c.not_after));
    if let (Some(creds), Some((false, _))) = (&existing, expired) {
        tracing::info!(cluster = %creds.cluster, "using stored identity");
        return Ok(Some(creds.clone()));
    }
    let token = find_token(opts, store, refused).await?;
    let Some(token) = token else {
        return Err(match expired {
            Some((_, not_after)) => Error::NeedsBootstrap(format!(
                "the certificate of cluster {name:?} expired at {} while the hub was unreachable; \
                 it needs a bootstrap token bound to its name: run `flotilla token create --cluster {name}` \
                 and put it in {} or the identity Secret's `token` key",
                format_unix(not_after),
                opts.token_file
                    .as_ref()
                    .map_or("--token-file".to_string(), |p| p.display().to_string())
            )),
            None => Error::NeedsOperator(format!(
                "cluster {name:?} is not registered yet: pass --token"
            )),
        });
    };
    if expired.is_some() {
        tracing::warn!(cluster = %name, "stored certificate expired; registering again with the token given");
    }
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        match opts.link.register(&token, &name, &opts.labels).await {
            Ok(creds) => {
                store.save(&creds).await?;
                tracing::info!(cluster = %name, identity = %store.describe(), expires = %format_unix(creds.not_after), "registered with the hub");
                return Ok(Some(creds));
            }
            Err(err) if err.is_retryable() => {
                let delay = backoff.next_delay(random_fraction());
                tracing::warn!(error = %err, retry_in = ?delay, "registration failed; will retry");
                if sleep_or_shutdown(delay, shutdown).await {
                    return Ok(None);
                }
            }
            // An expired agent keeps waiting for a token that works; a first start stops.
            Err(err) if expired.is_some() => {
                *refused = Some(token_digest(&token));
                return Err(Error::NeedsBootstrap(format!(
                    "re-registering cluster {name:?} was refused ({err}); give another token bound to it"
                )));
            }
            Err(err) => return Err(err),
        }
    }
}

/// Renews at two thirds of each certificate's life; publishes new credentials to the session loop.
async fn renew_forever(
    link: &HubLink,
    store: &IdentityStore,
    updates: watch::Sender<Credentials>,
    shutdown: &CancellationToken,
) -> Result<()> {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    loop {
        let current = updates.borrow().clone();
        if sleep_or_shutdown(current.until_renewal(now_unix()), shutdown).await {
            return Ok(());
        }
        loop {
            if current.is_expired(now_unix()) {
                return Err(Error::NeedsBootstrap(format!(
                    "the certificate of cluster {:?} expired before it could be renewed; it needs a \
                     bootstrap token bound to its name: run `flotilla token create --cluster {}`",
                    current.cluster, current.cluster
                )));
            }
            match link.renew(&current).await {
                Ok(renewed) => {
                    store.save(&renewed).await?;
                    tracing::info!(cluster = %renewed.cluster, expires = %format_unix(renewed.not_after), "certificate renewed");
                    backoff.reset();
                    updates.send_replace(renewed);
                    break;
                }
                Err(err) if err.is_retryable() => {
                    let delay = backoff.next_delay(random_fraction());
                    tracing::warn!(error = %err, retry_in = ?delay, "renewal failed; will retry");
                    if sleep_or_shutdown(delay, shutdown).await {
                        return Ok(());
                    }
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Keeps a session open, reconnecting with backoff; returns only on shutdown or a fatal refusal.
/// After a renewal the new session is opened before the old one is dropped, so the hub never sees
/// the cluster disconnected.
async fn hold_sessions(
    link: &HubLink,
    mut credentials: watch::Receiver<Credentials>,
    shutdown: &CancellationToken,
    fleet: &FleetLink,
    running: Vec<AppDigest>,
) -> Result<()> {
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_MAX);
    let mut previous: Option<OpenSession> = None;
    loop {
        let creds = credentials.borrow_and_update().clone();
        let result = match link.open(&creds, running.clone()).await {
            Ok(mut session) => {
                drop(previous.take());
                backoff.reset();
                match link
                    .drive(&mut session, &mut credentials, shutdown, fleet)
                    .await
                {
                    Ok(SessionEnd::CredentialsChanged) => {
                        tracing::info!("reconnecting with the renewed certificate");
                        previous = Some(session);
                        continue;
                    }
                    other => other,
                }
            }
            Err(err) => {
                drop(previous.take());
                Err(err)
            }
        };
        match result {
            Ok(_) => return Ok(()),
            Err(Error::Rejected {
                code: tonic::Code::Unauthenticated,
                detail,
                ..
            }) if detail.contains("revoked") => {
                return Err(Error::NeedsOperator(format!(
                    "the hub revoked this agent's certificate (cluster {:?} was deregistered): {detail}",
                    creds.cluster
                )));
            }
            Err(err) if err.is_retryable() => {
                let delay = backoff.next_delay(random_fraction());
                tracing::warn!(error = %err, retry_in = ?delay, "hub session lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                    // Fresh credentials are worth trying at once.
                    _ = credentials.changed() => {}
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// Sleeps; returns true if shutdown came first.
async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

fn format_unix(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

//! The Flotilla hub: keeps the fleet's registered clusters and their identities, runs the CA that
//! issues them, and serves the agent channel and the admin API over mutual TLS.
//!
//! Entry points: [`identity::pki::init`] creates a data directory, [`server::serve`] runs the hub on one.
#![forbid(unsafe_code)]

pub mod apps;
pub mod db;
pub mod edge;
mod error;
pub mod fleet;
pub mod identity;
pub mod rollout;
pub mod server;
pub mod service;
pub mod sources;
pub mod test_hooks;

use db::{appstore, audit, store};
use edge::metrics;
use fleet::{reports, sessions, wake};
use identity::{auth, pki};

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::{Error, Result};

/// Runtime settings of a serving hub.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lifetime of the cluster certificates this hub issues.
    pub cert_ttl: Duration,
    /// How often agents are asked to send a heartbeat.
    pub heartbeat_interval: Duration,
    /// New connections (TLS handshakes) admitted per second, on average.
    pub handshake_rate: u32,
    /// New connections admitted at once before pacing starts.
    pub handshake_burst: u32,
    /// Open connections at most, per listener (keep it below the process's open-file limit).
    pub max_connections: usize,
    /// Open connections at most from one source address, per listener.
    pub max_connections_per_address: usize,
    /// Lifetime of a bootstrap token when none is asked for.
    pub token_ttl_default: Duration,
    /// The longest lifetime a bootstrap token may be given.
    pub token_ttl_max: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            cert_ttl: Duration::from_secs(30 * 24 * 3600),
            heartbeat_interval: Duration::from_secs(10),
            handshake_rate: 200,
            handshake_burst: 50,
            max_connections: 20_000,
            max_connections_per_address: 5_000,
            token_ttl_default: Duration::from_secs(3600),
            token_ttl_max: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Shared state of a running hub.
pub struct Hub {
    /// The data directory this hub serves (PKI files, sled, repository caches).
    pub data_dir: std::path::PathBuf,
    pub store: store::Store,
    pub ca: Arc<pki::Ca>,
    pub auth: auth::Auth,
    pub sessions: Arc<sessions::Sessions>,
    pub settings: Settings,
    /// Cancelled at shutdown; every session task watches it.
    pub shutdown: CancellationToken,
    /// Owner of every task the hub spawns.
    pub tasks: TaskTracker,
    pub apps: appstore::AppStore,
    pub source_settings: sources::SourceSettings,
    pub sync: sources::SyncState,
    /// Whom a committed app write concerns: the sessions of the clusters it touched, and the
    /// rollout controller for the app.
    pub wake: Arc<wake::Wakeups>,
    /// What each cluster last reported per app.
    pub reports: reports::Reports,
    pub metrics: metrics::Metrics,
    pub audit: audit::AuditLog,
}

/// Seconds since the epoch.
pub fn now_unix() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_millis()).unwrap_or(i64::MAX)
}

/// Random bytes from the system CSPRNG; an error when it fails, never zeros (they become salts,
/// nonces and token secrets).
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    system_random(&mut b)?;
    Ok(b)
}

/// Fills `buf` from the system CSPRNG.
pub fn system_random(buf: &mut [u8]) -> Result<()> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| Error::Internal("the system random number generator failed".into()))
}

/// The key a bootstrap token is stored under: SHA-256 of the whole token string.
pub fn token_hash(token: &str) -> Vec<u8> {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .to_vec()
}

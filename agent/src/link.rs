//! The agent's side of the hub protocol: register, renew, and hold the session stream.

use std::collections::BTreeMap;
use std::time::Duration;

use flotilla_proto::v1::agent_client::AgentClient;
use flotilla_proto::v1::registration_client::RegistrationClient;
use flotilla_proto::v1::{
    AgentMessage, AppDigest, AppStatus, Assignments, FetchBundleRequest, Heartbeat, Hello,
    HubMessage, RegisterRequest, RenewRequest, agent_message, hub_message,
};
use flotilla_proto::{ClientTls, endpoint, error_chain};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::credentials::{Credentials, new_key_and_csr};
use crate::{Error, Result};

const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// How to reach the hub: one address, or several replicas' (tried in turn).
#[derive(Clone)]
pub struct HubLink {
    /// Every address given, in order; never empty once [`HubLink::new`] checked it.
    hubs: std::sync::Arc<[String]>,
    /// The address that last answered: the next connection tries it first, so an agent stays
    /// on the replica it is on and moves only when that one stops answering.
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub ca_pem: Vec<u8>,
    /// The open session's channel (by certificate): bundle fetches ride on its HTTP/2 connection
    /// instead of paying for a TLS handshake each, which matters when a thousand agents reconnect.
    session_channel: std::sync::Arc<std::sync::Mutex<Option<(String, Channel)>>>,
}

/// Why a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Shutdown was requested.
    Shutdown,
    /// New credentials are available; reconnect with them.
    CredentialsChanged,
}

impl HubLink {
    /// `hubs`: one hub address or several, comma-separated (`https://a:7443,https://b:7443`).
    pub fn new(hubs: String, ca_pem: Vec<u8>) -> Self {
        let list: Vec<String> = hubs
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        Self {
            // An empty list is kept as given, so the first connection says what is wrong.
            hubs: if list.is_empty() { vec![hubs] } else { list }.into(),
            current: Default::default(),
            ca_pem,
            session_channel: Default::default(),
        }
    }

    fn cached_channel(&self) -> std::sync::MutexGuard<'_, Option<(String, Channel)>> {
        // Each critical section is one assignment or clone: a poisoned lock still holds sound data.
        self.session_channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    async fn channel(&self, creds: Option<&Credentials>) -> Result<Channel> {
        let tls = ClientTls {
            ca_pem: self.ca_pem.clone(),
            identity: creds.map(|c| {
                (
                    c.cert_pem.clone().into_bytes(),
                    c.key_pem.clone().into_bytes(),
                )
            }),
        };
        // From the address that last answered, each address once: a replica that is gone costs
        // one failed connection, not a backoff round.
        let start = self.current.load(std::sync::atomic::Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in (0..self.hubs.len()).map(|k| (start + k) % self.hubs.len()) {
            let url = &self.hubs[i];
            match endpoint(url, &tls)?.connect().await {
                Ok(channel) => {
                    if i != start % self.hubs.len() {
                        tracing::info!(hub = %url, "moved to another hub address");
                    }
                    self.current.store(i, std::sync::atomic::Ordering::Relaxed);
                    return Ok(channel);
                }
                Err(e) => failures.push(format!("connecting to {url}: {}", error_chain(&e))),
            }
        }
        Err(Error::Unreachable(failures.join("; ")))
    }

    /// Registers `cluster` with a bootstrap token; the key is generated here and stays here.
    pub async fn register(
        &self,
        token: &str,
        cluster: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<Credentials> {
        let (key_pem, csr_pem) = new_key_and_csr(cluster)?;
        let mut client = RegistrationClient::new(self.channel(None).await?);
        let response = client
            .register(RegisterRequest {
                token: token.to_string(),
                cluster_name: cluster.to_string(),
                labels: labels.clone().into_iter().collect(),
                csr_pem,
            })
            .await
            .map_err(|s| Error::from_status("registration", &s))?
            .into_inner();
        Credentials::issued(response.certificate_pem, key_pem)
    }

    /// Gets a new certificate for a new key, authenticating with the current one.
    pub async fn renew(&self, current: &Credentials) -> Result<Credentials> {
        let (key_pem, csr_pem) = new_key_and_csr(&current.cluster)?;
        let mut client = RegistrationClient::new(self.channel(Some(current)).await?);
        let response = client
            .renew(RenewRequest { csr_pem })
            .await
            .map_err(|s| Error::from_status("certificate renewal", &s))?
            .into_inner();
        Credentials::issued(response.certificate_pem, key_pem)
    }

    /// Opens a session: sends hello and waits for the hub's welcome. The session is not driven yet,
    /// so a caller can open a new session before dropping the old one (make before break).
    pub async fn open(&self, creds: &Credentials, running: Vec<AppDigest>) -> Result<OpenSession> {
        let channel = self.channel(Some(creds)).await?;
        *self.cached_channel() = Some((creds.cert_pem.clone(), channel.clone()));
        let mut client = AgentClient::new(channel);
        let (out, out_rx) = mpsc::channel(8);
        let hello = AgentMessage {
            kind: Some(agent_message::Kind::Hello(Hello {
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                running,
            })),
        };
        // Cannot fail: the buffer is empty and the receiver is alive.
        let _ = out.try_send(hello);
        let mut inbound = client
            .session(ReceiverStream::new(out_rx))
            .await
            .map_err(|s| Error::from_status("opening the agent stream", &s))?
            .into_inner();
        let welcome = loop {
            match inbound.message().await {
                Ok(Some(HubMessage {
                    kind: Some(hub_message::Kind::Welcome(welcome)),
                })) => break welcome,
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(Error::Unreachable(
                        "the hub closed the agent stream before welcoming it".into(),
                    ));
                }
                Err(status) => return Err(Error::from_status("opening the agent stream", &status)),
            }
        };
        tracing::info!(cluster = %welcome.cluster_name, labels = ?welcome.labels, "connected to hub");
        let heartbeat = match welcome.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        Ok(OpenSession {
            out,
            inbound,
            heartbeat,
            seq: 0,
        })
    }

    /// Drives an open session: heartbeats at the hub's pace until the hub ends it, the credentials
    /// change, or shutdown.
    pub async fn drive(
        &self,
        session: &mut OpenSession,
        credentials_changed: &mut watch::Receiver<Credentials>,
        shutdown: &CancellationToken,
        fleet: &FleetLink,
    ) -> Result<SessionEnd> {
        let period = session.heartbeat;
        let mut board = fleet.board.subscribe();
        fleet.metrics.hub_connected.set(1);
        let _disconnected = Disconnected(&fleet.metrics);
        // A new session starts with every current status: the hub may have restarted.
        for status in fleet.board.all() {
            if session.out.send(status_message(status)).await.is_err() {
                return Err(Error::Unreachable("agent stream closed".into()));
            }
        }
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
                changed = credentials_changed.changed() => {
                    return Ok(if changed.is_ok() { SessionEnd::CredentialsChanged } else { SessionEnd::Shutdown });
                }
                _ = ticker.tick() => {
                    session.seq += 1;
                    let beat = AgentMessage {
                        kind: Some(agent_message::Kind::Heartbeat(Heartbeat { seq: session.seq })),
                    };
                    if session.out.send(beat).await.is_err() {
                        return Err(Error::Unreachable("agent stream closed".into()));
                    }
                }
                changed = board.changed() => {
                    if changed.is_err() {
                        return Ok(SessionEnd::Shutdown);
                    }
                    for status in fleet.board.take_changed() {
                        if session.out.send(status_message(status)).await.is_err() {
                            return Err(Error::Unreachable("agent stream closed".into()));
                        }
                    }
                }
                message = session.inbound.message() => match message {
                    Ok(Some(HubMessage { kind: Some(hub_message::Kind::Assignments(a)) })) => {
                        tracing::info!(apps = a.apps.len(), removed = a.removed.len(), held = a.held.len(), "assignments received");
                        fleet.assignments.send_replace(Some(a));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return Err(Error::Unreachable("the hub closed the agent stream".into())),
                    Err(status) => return Err(Error::from_status("agent stream", &status)),
                },
            }
        }
    }

    /// Fetches a bundle by digest (chunked) and verifies it.
    pub async fn fetch_bundle(&self, creds: &Credentials, digest: &str) -> Result<Vec<u8>> {
        let cached = self
            .cached_channel()
            .as_ref()
            .filter(|(cert, _)| *cert == creds.cert_pem)
            .map(|(_, channel)| channel.clone());
        let channel = match cached {
            Some(channel) => channel,
            None => self.channel(Some(creds)).await?,
        };
        let result = Self::fetch_on(channel, digest).await;
        if matches!(result, Err(Error::Unreachable(_))) {
            // The connection may be dead; the next attempt dials afresh.
            *self.cached_channel() = None;
        }
        result
    }

    async fn fetch_on(channel: Channel, digest: &str) -> Result<Vec<u8>> {
        let mut client = AgentClient::new(channel);
        let mut stream = client
            .fetch_bundle(FetchBundleRequest {
                digest: digest.to_string(),
            })
            .await
            .map_err(|s| Error::from_status("fetching a bundle", &s))?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(|s| Error::from_status("fetching a bundle", &s))?
        {
            bytes.extend_from_slice(&chunk.data);
        }
        let actual = flotilla_bundle::digest_bytes(&bytes);
        if actual != digest {
            return Err(Error::Bundle(format!(
                "bundle {digest} arrived with digest {actual}; discarded"
            )));
        }
        Ok(bytes)
    }
}

/// Clears the connected gauge when a driven session ends, however it ends.
struct Disconnected<'a>(&'a crate::metrics::Metrics);

impl Drop for Disconnected<'_> {
    fn drop(&mut self) {
        self.0.hub_connected.set(0);
    }
}

fn status_message(status: AppStatus) -> AgentMessage {
    AgentMessage {
        kind: Some(agent_message::Kind::Status(status)),
    }
}

/// What a session shares with the cluster side: assignments in, statuses out.
#[derive(Clone)]
pub struct FleetLink {
    pub assignments: watch::Sender<Option<Assignments>>,
    pub board: std::sync::Arc<crate::board::StatusBoard>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// A session the hub has welcomed.
pub struct OpenSession {
    out: mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<HubMessage>,
    heartbeat: Duration,
    seq: u64,
}

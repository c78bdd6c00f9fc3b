//! `flotilla.v1.Agent`: the long-lived stream each agent holds. Today it carries heartbeats; the hub
//! ends it when the cluster is deregistered, when the certificate it was opened with expires, when
//! heartbeats stop, or at shutdown.

use flotilla_proto::status::{Observed, Verdict};
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::agent_server::Agent;
use flotilla_proto::v1::{
    AgentMessage, Assignment, Assignments, BundleChunk, FetchBundleRequest, HeartbeatAck,
    HubMessage, Welcome, agent_message, hub_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::fleet::sessions::Session;
use crate::identity::pki::PeerCert;
use crate::{Error, Hub, now_ms, now_unix};

/// Outbound messages buffered per agent; a slow agent back-pressures only its own session task.
const OUTBOUND_BUFFER: usize = 16;
/// Bundle chunk size: well under gRPC's default 4 MiB message limit.
const CHUNK: usize = 256 * 1024;

/// A cluster's orders, or nothing when the store could not be read: a session that cannot read
/// sends nothing (its agent keeps enforcing what it has) and tries again.
fn orders_of(hub: &Hub, cluster: &str) -> Option<Assignments> {
    match hub.apps.list() {
        Ok(catalog) => Some(crate::fleet::reports::orders_for(cluster, &catalog)),
        Err(e) => {
            hub.metrics.store_read_failed("assignments");
            tracing::error!(cluster, error = %e, "reading assignments; sending nothing and retrying");
            None
        }
    }
}

fn assignments_message(orders: Assignments) -> HubMessage {
    HubMessage {
        kind: Some(hub_message::Kind::Assignments(orders)),
    }
}

/// How soon a session tries again after its store read failed, at first and at most.
const READ_RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(30));

/// Serves agent streams.
pub struct AgentService {
    hub: Arc<Hub>,
}

impl AgentService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type SessionStream = ReceiverStream<Result<HubMessage, Status>>;
    type FetchBundleStream = ReceiverStream<Result<BundleChunk, Status>>;

    async fn fetch_bundle(
        &self,
        request: Request<FetchBundleRequest>,
    ) -> Result<Response<Self::FetchBundleStream>, Status> {
        let (name, _peer) = self.hub.auth.cluster(&request)?;
        let digest = request.into_inner().digest;
        // A cluster may fetch only what it is assigned: the bundles of other clusters can carry
        // their own customizations (and secrets' shapes) and are none of its business. What git
        // wants it to run next counts as its own (a manual app's agent diffs against it).
        let assigned = self.hub.apps.list()?.apps.iter().any(|a| {
            [a.status.assignments.get(&name), a.status.target.get(&name)]
                .into_iter()
                .flatten()
                .any(|x| x.digest == digest)
        });
        if !assigned {
            return Err(Error::PermissionDenied(format!(
                "bundle {digest} is not assigned to cluster {name:?}"
            ))
            .into());
        }
        let bytes = self.hub.apps.bundle(&digest)?.ok_or_else(|| {
            Error::Internal(format!(
                "assigned bundle {digest} is missing from the store"
            ))
        })?;
        let (tx, rx) = mpsc::channel(4);
        let total = bytes.len() as u64;
        self.hub.metrics.bundle_bytes_served.inc_by(total);
        self.hub.tasks.spawn(async move {
            for chunk in bytes.chunks(CHUNK) {
                let msg = BundleChunk {
                    data: chunk.to_vec(),
                    total_size: total,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let (name, peer) = self.hub.auth.cluster(&request)?;
        let Some(record) = self.hub.store.cluster(&name)? else {
            return Err(
                Error::Unauthenticated(format!("cluster {name:?} is not registered")).into(),
            );
        };
        let recovering_since = record.recovering_since_ms;
        let inbound = request.into_inner();
        let session = self.hub.sessions.open(&name, &self.hub.shutdown, now_ms());
        let (tx, rx) = mpsc::channel(OUTBOUND_BUFFER);
        let welcome = HubMessage {
            kind: Some(hub_message::Kind::Welcome(Welcome {
                cluster_name: name.clone(),
                labels: record.labels.into_iter().collect(),
                heartbeat_interval_ms: u32::try_from(
                    self.hub.settings.heartbeat_interval.as_millis(),
                )
                .unwrap_or(u32::MAX),
            })),
        };
        // Cannot fail: the buffer is empty and the receiver is alive.
        let _ = tx.try_send(Ok(welcome));
        tracing::info!(cluster = %name, serial = %peer.serial, "agent connected");
        let hub = Arc::clone(&self.hub);
        self.hub.tasks.spawn(run_session(
            hub,
            session,
            peer,
            recovering_since,
            inbound,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn run_session(
    hub: Arc<Hub>,
    session: Session,
    peer: PeerCert,
    // Set while this cluster is a rebuild converging: checked on its reports until it recovers.
    mut recovering_since: Option<i64>,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<HubMessage, Status>>,
) {
    let name = session.cluster().to_string();
    let silence_limit = hub.settings.heartbeat_interval * 3;
    let until_expiry = Duration::from_secs(u64::try_from(peer.not_after - now_unix()).unwrap_or(0));
    let expiry = tokio::time::sleep(until_expiry);
    tokio::pin!(expiry);
    // Woken by writes that touch this cluster's orders (and those that touch every cluster's).
    let mut changes = hub.wake.subscribe(&name);
    // What the agent was last told; `None` until a read succeeds (reports wait for it too).
    let mut sent: Option<Assignments> = None;
    let mut gate = crate::fleet::report_gate::ReportGate::new(std::time::Instant::now());
    // Due when the last read failed; the delay doubles while reads keep failing.
    let mut retry: Option<(tokio::time::Instant, Duration)> =
        Some((tokio::time::Instant::now(), READ_RETRY.0));

    let end: Option<Status> = loop {
        let read_again = async {
            match retry {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = session.cancel.cancelled() => {
                break Some(if hub.auth.is_revoked(&peer.serial) {
                    Status::unauthenticated(format!(
                        "certificate {} revoked: cluster {name:?} was deregistered", peer.serial))
                } else {
                    Status::unavailable("hub is shutting down")
                });
            }
            _ = &mut expiry => {
                break Some(Status::unauthenticated(
                    "the certificate this stream was opened with has expired; reconnect with the renewed one"));
            }
            _ = tx.closed() => break None,
            changed = changes.rx.changed() => {
                if changed.is_err() {
                    break Some(Status::unavailable("hub is shutting down"));
                }
                retry = Some((tokio::time::Instant::now(), retry.map_or(READ_RETRY.0, |(_, d)| d)));
            }
            _ = read_again => {
                let delay = retry.map_or(READ_RETRY.0, |(_, d)| d);
                let Some(now) = orders_of(&hub, &name) else {
                    retry = Some((tokio::time::Instant::now() + delay, (delay * 2).min(READ_RETRY.1)));
                    continue;
                };
                retry = None;
                if sent.as_ref() != Some(&now) {
                    if tx.send(Ok(assignments_message(now.clone()))).await.is_err() {
                        break None;
                    }
                    sent = Some(now);
                }
                if let (Some(since), Some(sent)) = (recovering_since, &sent)
                    && recovered(&hub, &name, &sent.apps, since).await
                {
                    recovering_since = None;
                }
            }
            next = tokio::time::timeout(silence_limit, inbound.message()) => match next {
                Err(_) => break Some(Status::deadline_exceeded(format!(
                    "no message from the agent for {}s", silence_limit.as_secs()))),
                Ok(Ok(Some(mut message))) => {
                    hub.sessions.touch(&name, now_ms());
                    if let Some(agent_message::Kind::Status(status)) = &mut message.kind {
                        let Some(sent) = &sent else {
                            // Nothing assigned yet (the store could not be read): nothing to admit.
                            hub.metrics.report_refused(crate::fleet::report_gate::Refusal::Unassigned.label());
                            continue;
                        };
                        // Only this cluster's assigned apps, bounded in size and rate.
                        if let Err(refusal) = gate.admit(status, &sent.apps, std::time::Instant::now()) {
                            hub.metrics.report_refused(refusal.label());
                            tracing::debug!(cluster = %name, app = %status.app, reason = refusal.label(), "report dropped");
                            continue;
                        }
                        // Recorded under the session's identity; the report names only the app.
                        hub.metrics.reported(&name, &status.digest, status.sync(), status.health());
                        // The app's rollout may move on a report that changed what it decides.
                        if hub.reports.record(&name, status.clone()) {
                            hub.wake.app_changed(&status.app);
                        }
                        if let Some(since) = recovering_since
                            && recovered(&hub, &name, &sent.apps, since).await
                        {
                            recovering_since = None;
                        }
                    }
                    if let Some(reply) = handle(message)
                        && tx.send(Ok(reply)).await.is_err()
                    {
                        break None;
                    }
                }
                Ok(Ok(None)) => break None,
                Ok(Err(status)) => {
                    tracing::debug!(cluster = %name, status = %status, "agent stream error");
                    break None;
                }
            }
        }
    };
    if let Some(status) = end {
        tracing::info!(cluster = %name, reason = %status.message(), "ending agent stream");
        let _ = tx.send(Err(status)).await;
    }
    tracing::info!(cluster = %name, "agent disconnected");
    if let (_, Some(last_seen)) = hub.sessions.status(&name)
        && let Err(err) = hub.store.record_last_seen(&name, last_seen)
    {
        tracing::warn!(cluster = %name, error = %err, "could not record last-seen time");
    }
    drop(session);
}

/// A rebuilt cluster has recovered once it reports every app of `assigned` at its digest, Synced
/// and Healthy;
/// the time since its registration (`since`) is then recorded for `cluster get`.
async fn recovered(hub: &Hub, name: &str, assigned: &[Assignment], since: i64) -> bool {
    let healthy = assigned.iter().all(|a| {
        hub.reports
            .get(name, &a.app)
            .is_some_and(|r| Observed::of(&r).verdict(&a.digest) == Verdict::Done)
    });
    if !healthy {
        return false;
    }
    let elapsed = now_ms() - since;
    match hub.store.finish_recovery(name, elapsed).await {
        Ok(()) => tracing::info!(
            cluster = name,
            elapsed_ms = elapsed,
            "rebuilt cluster recovered: every app Healthy"
        ),
        Err(e) => tracing::warn!(cluster = name, error = %e, "recording a recovery"),
    }
    true
}

fn handle(message: AgentMessage) -> Option<HubMessage> {
    match message.kind? {
        agent_message::Kind::Hello(_) | agent_message::Kind::Status(_) => None,
        agent_message::Kind::Heartbeat(hb) => Some(HubMessage {
            kind: Some(hub_message::Kind::HeartbeatAck(HeartbeatAck {
                seq: hb.seq,
            })),
        }),
    }
}

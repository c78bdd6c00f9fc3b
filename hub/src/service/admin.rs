//! `flotilla.v1.Admin`: operator RPCs (tokens, clusters). Every call requires the admin certificate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::admin_server::Admin;
use flotilla_proto::v1::{
    App, AppCluster, AppRevision, ApplyAppRequest, AuditEntry, BackupChunk, BackupRequest, Cluster,
    CreateTokenRequest, CreateTokenResponse, DeleteAppRequest, DeleteAppResponse,
    DeregisterClusterRequest, DeregisterClusterResponse, DiffAppRequest, DiffAppResponse,
    FleetStatusRequest, FleetStatusResponse, GetAppRequest, GetClusterRequest, GetRolloutRequest,
    LabelClusterRequest, ListAppsRequest, ListAppsResponse, ListAuditRequest, ListAuditResponse,
    ListClustersRequest, ListClustersResponse, RebuildClusterRequest, RebuildClusterResponse,
    RollbackAppRequest, RolloutActionRequest, RolloutCluster, RolloutStatus, SyncAppRequest,
    SyncAppResponse, SyncRequested, SyncStatus,
};
use flotilla_proto::v1::{
    ListTokensRequest, ListTokensResponse, RevokeTokenRequest, RolloutPhase, TokenInfo,
};
use tonic::{Request, Response, Status};

use crate::apps::AppDocument;
use crate::db::appstore::AppRecord;
use crate::db::store::{ClusterRecord, TokenRecord};
use crate::identity::pki::hex;
use crate::identity::validate;
use crate::{Error, Hub, Result, now_unix, token_hash};

/// A fresh bootstrap token for `ttl` (already bounded): (secret, its hash, the record to store).
fn new_token(
    ttl: Duration,
    uses: u32,
    cluster: Option<String>,
) -> Result<(String, Vec<u8>, TokenRecord)> {
    let secret: [u8; 32] = crate::random_bytes()?;
    let token = format!("flt_{}", hex(&secret));
    let hash = token_hash(&token);
    let now = now_unix();
    let record = TokenRecord {
        id: hex(&hash[..4]),
        created_at: now,
        expires_at: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        uses_left: uses.max(1),
        cluster,
        revoked_at: None,
    };
    Ok((token, hash, record))
}

fn token_info(t: &TokenRecord) -> TokenInfo {
    TokenInfo {
        token_id: t.id.clone(),
        created_at_unix: t.created_at,
        expires_at_unix: t.expires_at,
        uses_left: t.uses_left,
        cluster_name: t.cluster.clone().unwrap_or_default(),
        revoked_at_unix: t.revoked_at.unwrap_or(0),
    }
}

/// What the audit log says of a token (never its secret).
fn token_detail(t: &TokenRecord) -> String {
    format!(
        "ttl {}s, {} use(s), {}",
        t.expires_at - t.created_at,
        t.uses_left,
        match &t.cluster {
            Some(c) => format!("bound to cluster {c}"),
            None => "any new cluster name".into(),
        }
    )
}

/// Serves the admin API.
pub struct AdminService {
    hub: Arc<Hub>,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    fn to_proto(&self, record: ClusterRecord) -> Cluster {
        let (connected, live_seen) = self.hub.sessions.status(&record.name);
        Cluster {
            connected,
            last_seen_unix_ms: live_seen.unwrap_or(0).max(record.last_seen_ms),
            registered_at_unix: record.registered_at,
            cert_not_after_unix: record.cert_not_after,
            cert_serial: record.cert_serial,
            recovering_since_unix_ms: record.recovering_since_ms.unwrap_or(0),
            last_recovery_ms: record.last_recovery_ms.unwrap_or(0),
            labels: record.labels.into_iter().collect(),
            name: record.name,
        }
    }

    /// The calling operator; a refused caller is recorded in the audit log (at a bounded rate).
    async fn admin<T>(&self, request: &Request<T>, rpc: &str) -> Result<String, Status> {
        match self.hub.auth.admin(request) {
            Ok(who) => Ok(who),
            Err(err) => {
                let caller = self.hub.auth.caller(request);
                let target = format!("rpc/{rpc}");
                if let Err(e) = self
                    .hub
                    .audit
                    .record_event(&caller, "denied", &target, err.to_string())
                    .await
                {
                    tracing::warn!(error = %e, "recording a denied call");
                }
                Err(err.into())
            }
        }
    }

    /// A requested token lifetime: 0 is the hub's default; more than its maximum is refused.
    fn token_ttl(&self, seconds: u64) -> Result<Duration> {
        let s = &self.hub.settings;
        match seconds {
            0 => Ok(s.token_ttl_default),
            n if n > s.token_ttl_max.as_secs() => Err(Error::invalid(
                "ttl",
                format!(
                    "{n}s is longer than the hub allows ({}s, `flotilla-hub serve --max-token-ttl`)",
                    s.token_ttl_max.as_secs()
                ),
            )),
            n => Ok(Duration::from_secs(n)),
        }
    }

    fn cluster(&self, name: &str) -> Result<ClusterRecord> {
        self.hub
            .store
            .cluster(name)?
            .ok_or_else(|| Error::ClusterNotFound(name.to_string()))
    }

    async fn create_token(
        &self,
        actor: &str,
        req: CreateTokenRequest,
    ) -> Result<CreateTokenResponse> {
        let cluster = (!req.cluster_name.is_empty()).then_some(req.cluster_name);
        if let Some(name) = &cluster {
            validate::cluster_name(name)?;
        }
        let ttl = self.token_ttl(req.ttl_seconds)?;
        let (token, hash, record) = new_token(ttl, req.uses, cluster)?;
        let audit = crate::db::audit::Record::new(
            actor,
            "token.create",
            format!("token/{}", record.id),
            token_detail(&record),
        );
        self.hub.store.create_token(&hash, &record, &audit).await?;
        tracing::info!(token_id = %record.id, uses = record.uses_left, cluster = ?record.cluster, "bootstrap token created");
        Ok(CreateTokenResponse {
            token,
            token_id: record.id,
            expires_at_unix: record.expires_at,
        })
    }

    /// Revokes the cluster's certificates and returns a token that registers a replacement as it.
    async fn rebuild(
        &self,
        actor: &str,
        req: RebuildClusterRequest,
    ) -> Result<RebuildClusterResponse> {
        let name = req.name;
        self.cluster(&name)?;
        let ttl = self.token_ttl(req.ttl_seconds)?;
        let (token, hash, record) = new_token(ttl, 1, Some(name.clone()))?;
        let serials = self
            .hub
            .store
            .rebuild(&name, now_unix(), &hash, &record, actor)
            .await?;
        // As for deregistration: revoke in memory before dropping the stream.
        self.hub.auth.revoke(serials.iter().cloned());
        self.hub.sessions.drop_cluster(&name);
        // The replacement must earn Healthy itself; the lost cluster's reports mean nothing now.
        self.hub.reports.forget_cluster(&name);
        tracing::info!(cluster = %name, revoked = ?serials, token_id = %record.id, "cluster rebuild started");
        Ok(RebuildClusterResponse {
            token,
            token_id: record.id,
            expires_at_unix: record.expires_at,
            revoked_serials: serials,
        })
    }

    async fn label(&self, actor: &str, req: LabelClusterRequest) -> Result<Cluster> {
        let set: BTreeMap<String, String> = req.set.into_iter().collect();
        validate::labels(&set)?;
        for key in &req.remove {
            validate::label_key(key)?;
        }
        let audit = crate::db::audit::Record::new(
            actor,
            "cluster.label",
            format!("cluster/{}", req.name),
            format!("set {set:?} remove {:?}", req.remove),
        );
        let record = self
            .hub
            .store
            .label(&req.name, &set, &req.remove, &audit)
            .await?;
        tracing::info!(cluster = %req.name, labels = ?record.labels, "cluster relabeled");
        self.hub.sync.kick_recompute();
        Ok(self.to_proto(record))
    }

    /// An app without its per-cluster rows and history: what a list returns, whatever the fleet's
    /// size.
    fn app_summary(record: &AppRecord) -> Result<App> {
        // Absent means "no note" on the wire (proto3 strings), as for the optional fields below.
        let note = crate::fleet::reports::unreached(record).unwrap_or_default();
        let spec_json = serde_json::to_string(&record.doc).map_err(|source| Error::Corrupt {
            key: record.doc.metadata.name.clone(),
            source,
        })?;
        let s = &record.status;
        Ok(App {
            note,
            name: record.doc.metadata.name.clone(),
            spec_json,
            origin: flotilla_proto::v1::AppOrigin::from(record.origin).into(),
            generation: record.generation,
            observed_generation: s.observed_generation,
            revision: s.revision.clone().unwrap_or_default(),
            last_error: s.last_error.clone().unwrap_or_default(),
            // Saturates: no fleet reaches 2^32 clusters, and a count is never wrapped to a lie.
            cluster_count: u32::try_from(s.target.len()).unwrap_or(u32::MAX),
            pinned_revision: s.pinned.clone().unwrap_or_default(),
            stable_revision: s.stable_revision.clone().unwrap_or_default(),
            rollout_phase: s
                .rollout
                .as_ref()
                .map_or(RolloutPhase::Unspecified, |r| r.phase.into())
                .into(),
            ..App::default()
        })
    }

    fn app_to_proto(record: AppRecord) -> Result<App> {
        let mut app = Self::app_summary(&record)?;
        let s = record.status;
        app.clusters = s
            .target
            .iter()
            .map(|(cluster, a)| AppCluster {
                cluster: cluster.clone(),
                digest: a.digest.clone(),
                assigned_digest: s
                    .assignments
                    .get(cluster)
                    .map(|x| x.digest.clone())
                    // Not assigned yet: the wire's "none" (the proto says so).
                    .unwrap_or_default(),
                // Filled in by GetApp from the cluster's report.
                ..AppCluster::default()
            })
            .collect();
        app.history = s
            .history
            .into_iter()
            .rev()
            .map(|h| AppRevision {
                revision: h.revision,
                at_unix: h.at,
                bundles: h.bundles.into_iter().collect(),
                rolled_out: h.rolled_out,
            })
            .collect();
        Ok(app)
    }

    fn rollout_to_proto(record: &AppRecord) -> Result<RolloutStatus> {
        let name = &record.doc.metadata.name;
        let r = record.status.rollout.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "app {name:?} has no rollout yet (it has not been rendered)"
            ))
        })?;
        let as_u32 = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(RolloutStatus {
            app: name.clone(),
            id: r.id,
            revision: r.revision.clone(),
            phase: RolloutPhase::from(r.phase).into(),
            current_step: as_u32(r.current_step),
            steps: r.steps.clone(),
            message: r.message.clone(),
            clusters: r
                .clusters
                .iter()
                .map(|(cluster, c)| RolloutCluster {
                    cluster: cluster.clone(),
                    step: as_u32(c.step),
                    state: format!("{:?}", c.state),
                    reason: c.reason.clone(),
                    from_revision: c
                        .from
                        .as_ref()
                        .map(|f| f.revision.clone())
                        .unwrap_or_default(),
                    to_revision: c.to.revision.clone(),
                    since_unix: c.since,
                })
                .collect(),
            started_at_unix: r.started_at,
            finished_at_unix: r.finished_at.unwrap_or(0),
            max_updating: as_u32(r.max_updating),
            paused_reason: r.paused.map(|p| format!("{p:?}")).unwrap_or_default(),
            stable_revision: record.status.stable_revision.clone().unwrap_or_default(),
            pinned_revision: record.status.pinned.clone().unwrap_or_default(),
        })
    }

    fn app(&self, name: &str) -> Result<AppRecord> {
        self.hub
            .apps
            .get(name)?
            .ok_or_else(|| Error::AppNotFound(name.to_string()))
    }

    async fn rollback(&self, actor: &str, req: RollbackAppRequest) -> Result<App> {
        let record = self.app(&req.app)?;
        if req.unpin {
            crate::rollout::controller::unpin(&self.hub, actor, &req.app).await?;
        } else {
            let to = (!req.to.is_empty()).then_some(req.to.as_str());
            crate::rollout::controller::pin(&self.hub, actor, &req.app, to).await?;
        }
        self.hub.sync.kick_repo(&record.doc.spec.source.repo_url);
        Self::app_to_proto(self.app(&req.app)?)
    }

    async fn apply_app(&self, actor: &str, req: ApplyAppRequest) -> Result<App> {
        let text = req.document;
        let doc = crate::sources::untrusted::run(
            "the App document",
            crate::sources::untrusted::PARSE_BUDGET,
            move || AppDocument::parse(&text),
        )
        .await?;
        if let Some(existing) = readable_or_replaceable(self.hub.apps.get(&doc.metadata.name))?
            && existing.origin == crate::apps::Origin::Fleet
        {
            return Err(Error::PermissionDenied(format!(
                "app {:?} is defined in the fleet repository; change it there",
                doc.metadata.name
            )));
        }
        let url = doc.spec.source.repo_url.clone();
        let record = self
            .hub
            .apps
            .put_document(doc, crate::apps::Origin::Api, |r| {
                Some(crate::db::audit::Record::new(
                    actor,
                    "app.apply",
                    format!("app/{}", r.doc.metadata.name),
                    format!("generation {}", r.generation),
                ))
            })
            .await?;
        tracing::info!(app = %record.doc.metadata.name, generation = record.generation, "app applied");
        self.hub.sync.kick_repo(&url);
        Self::app_to_proto(record)
    }

    async fn deregister(&self, actor: &str, name: &str) -> Result<DeregisterClusterResponse> {
        let serials = self.hub.store.deregister(name, now_unix(), actor).await?;
        // Revoke in memory before dropping streams, so the agent's reconnect is already refused.
        self.hub.auth.revoke(serials.iter().cloned());
        let dropped = self.hub.sessions.drop_cluster(name);
        self.hub.reports.forget_cluster(name);
        tracing::info!(cluster = %name, revoked = ?serials, streams_dropped = dropped, "cluster deregistered");
        Ok(DeregisterClusterResponse {
            revoked_serials: serials,
        })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let actor = self.admin(&request, "CreateToken").await?;
        let response = self.create_token(&actor, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn list_tokens(
        &self,
        request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        self.admin(&request, "ListTokens").await?;
        let tokens = self.hub.store.tokens()?.iter().map(token_info).collect();
        Ok(Response::new(ListTokensResponse { tokens }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<TokenInfo>, Status> {
        let actor = self.admin(&request, "RevokeToken").await?;
        let id = &request.get_ref().token_id;
        let record = self.hub.store.revoke_token(id, now_unix(), &actor).await?;
        tracing::info!(token_id = %id, "bootstrap token revoked");
        Ok(Response::new(token_info(&record)))
    }

    async fn list_clusters(
        &self,
        request: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        self.admin(&request, "ListClusters").await?;
        let clusters = self
            .hub
            .store
            .clusters()?
            .iter()
            .map(|r| self.to_proto(r.clone()))
            .collect();
        Ok(Response::new(ListClustersResponse { clusters }))
    }

    async fn get_cluster(
        &self,
        request: Request<GetClusterRequest>,
    ) -> Result<Response<Cluster>, Status> {
        self.admin(&request, "GetCluster").await?;
        let record = self.cluster(&request.get_ref().name)?;
        Ok(Response::new(self.to_proto(record)))
    }

    async fn label_cluster(
        &self,
        request: Request<LabelClusterRequest>,
    ) -> Result<Response<Cluster>, Status> {
        let actor = self.admin(&request, "LabelCluster").await?;
        let cluster = self.label(&actor, request.into_inner()).await?;
        Ok(Response::new(cluster))
    }

    async fn deregister_cluster(
        &self,
        request: Request<DeregisterClusterRequest>,
    ) -> Result<Response<DeregisterClusterResponse>, Status> {
        let actor = self.admin(&request, "DeregisterCluster").await?;
        let response = self.deregister(&actor, &request.get_ref().name).await?;
        self.hub.sync.kick_recompute();
        Ok(Response::new(response))
    }

    async fn fleet_status(
        &self,
        request: Request<FleetStatusRequest>,
    ) -> Result<Response<FleetStatusResponse>, Status> {
        self.admin(&request, "FleetStatus").await?;
        let catalog = self.hub.apps.list()?;
        let apps = &catalog.apps;
        let mut rows = Vec::new();
        for cluster in self.hub.store.clusters()?.iter() {
            let (connected, _) = self.hub.sessions.status(&cluster.name);
            let told: std::collections::HashMap<String, flotilla_proto::v1::Assignment> =
                crate::fleet::reports::assignments_for(&cluster.name, apps)
                    .into_iter()
                    .map(|a| (a.app.clone(), a))
                    .collect();
            // Every cluster an app targets has a row, also one its rollout has not reached.
            for app in apps {
                let name = &app.doc.metadata.name;
                let report = self.hub.reports.get(&cluster.name, name);
                rows.extend(crate::fleet::reports::status_row(
                    &cluster.name,
                    connected,
                    app,
                    told.get(name),
                    report.as_ref(),
                ));
            }
        }
        for app in apps {
            if let Some(note) = crate::fleet::reports::unreached(app) {
                rows.push(crate::fleet::reports::unreached_row(
                    &app.doc.metadata.name,
                    note,
                ));
            }
        }
        for u in &catalog.unreadable {
            rows.push(crate::fleet::reports::unreached_row(
                &u.name,
                held_note(&u.error),
            ));
        }
        Ok(Response::new(FleetStatusResponse { rows }))
    }

    async fn apply_app(&self, request: Request<ApplyAppRequest>) -> Result<Response<App>, Status> {
        let actor = self.admin(&request, "ApplyApp").await?;
        let app = self.apply_app(&actor, request.into_inner()).await?;
        Ok(Response::new(app))
    }

    async fn list_apps(
        &self,
        request: Request<ListAppsRequest>,
    ) -> Result<Response<ListAppsResponse>, Status> {
        self.admin(&request, "ListApps").await?;
        let catalog = self.hub.apps.list()?;
        let unreadable = catalog.unreadable.into_iter().map(|u| App {
            note: held_note(&u.error),
            last_error: u.error,
            name: u.name,
            ..App::default()
        });
        let apps = catalog
            .apps
            .into_iter()
            .map(|record| Self::app_summary(&record))
            .chain(unreadable.map(Ok))
            .collect::<Result<_>>()?;
        Ok(Response::new(ListAppsResponse { apps }))
    }

    async fn get_app(&self, request: Request<GetAppRequest>) -> Result<Response<App>, Status> {
        self.admin(&request, "GetApp").await?;
        let name = &request.get_ref().name;
        let record = self
            .hub
            .apps
            .get_shared(name)?
            .ok_or_else(|| Error::AppNotFound(name.clone()))?;
        let mut app = Self::app_to_proto((*record).clone())?;
        // Each cluster's own word on what it runs (failed objects and hooks included), next to
        // what git wants it to run.
        for c in &mut app.clusters {
            let (connected, _) = self.hub.sessions.status(&c.cluster);
            let told =
                crate::fleet::reports::assignments_for(&c.cluster, std::slice::from_ref(&record));
            let report = self.hub.reports.get(&c.cluster, &app.name);
            let row = crate::fleet::reports::status_row(
                &c.cluster,
                connected,
                &record,
                told.first(),
                report.as_ref(),
            )
            .ok_or_else(|| {
                Error::Internal(format!(
                    "cluster {} is a target of app {} but has no status row",
                    c.cluster, app.name
                ))
            })?;
            c.sync = row.sync;
            c.health = row.health;
            c.message = row.message;
            c.hooks = report.map(|r| r.hooks).unwrap_or_default();
        }
        Ok(Response::new(app))
    }

    async fn delete_app(
        &self,
        request: Request<DeleteAppRequest>,
    ) -> Result<Response<DeleteAppResponse>, Status> {
        let actor = self.admin(&request, "DeleteApp").await?;
        let name = &request.get_ref().name;
        if let Some(existing) = readable_or_replaceable(self.hub.apps.get(name))?
            && existing.origin == crate::apps::Origin::Fleet
        {
            return Err(Error::PermissionDenied(format!(
                "app {name:?} is defined in the fleet repository; remove it there"
            ))
            .into());
        }
        let audit = crate::db::audit::Record::new(&actor, "app.delete", format!("app/{name}"), "");
        if !self.hub.apps.delete(name, Some(&audit)).await? {
            return Err(Error::AppNotFound(name.clone()).into());
        }
        Ok(Response::new(DeleteAppResponse {}))
    }

    type BackupStream = tokio_stream::wrappers::ReceiverStream<Result<BackupChunk, Status>>;

    async fn backup(
        &self,
        request: Request<BackupRequest>,
    ) -> Result<Response<Self::BackupStream>, Status> {
        let actor = self.admin(&request, "Backup").await?;
        let bytes = crate::db::backup::take(&self.hub, &request.get_ref().passphrase).await?;
        let total = bytes.len() as u64;
        self.hub
            .audit
            .record(&actor, "hub.backup", "hub", format!("{total} bytes"))
            .await?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        self.hub.tasks.spawn(async move {
            for chunk in bytes.chunks(1024 * 1024) {
                let msg = BackupChunk {
                    data: chunk.to_vec(),
                    total_size: total,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn rebuild_cluster(
        &self,
        request: Request<RebuildClusterRequest>,
    ) -> Result<Response<RebuildClusterResponse>, Status> {
        let actor = self.admin(&request, "RebuildCluster").await?;
        let response = self.rebuild(&actor, request.into_inner()).await?;
        Ok(Response::new(response))
    }

    async fn get_rollout(
        &self,
        request: Request<GetRolloutRequest>,
    ) -> Result<Response<RolloutStatus>, Status> {
        self.admin(&request, "GetRollout").await?;
        let record = self.app(&request.get_ref().app)?;
        Ok(Response::new(Self::rollout_to_proto(&record)?))
    }

    async fn rollout_action(
        &self,
        request: Request<RolloutActionRequest>,
    ) -> Result<Response<RolloutStatus>, Status> {
        let actor = self.admin(&request, "RolloutAction").await?;
        let req = request.into_inner();
        let action: crate::rollout::controller::Action = req.action.parse()?;
        let record = crate::rollout::controller::act(&self.hub, &actor, &req.app, action).await?;
        let status = Self::rollout_to_proto(&record)?;
        Ok(Response::new(status))
    }

    async fn rollback_app(
        &self,
        request: Request<RollbackAppRequest>,
    ) -> Result<Response<App>, Status> {
        let actor = self.admin(&request, "RollbackApp").await?;
        Ok(Response::new(
            self.rollback(&actor, request.into_inner()).await?,
        ))
    }

    async fn sync_app(
        &self,
        request: Request<SyncAppRequest>,
    ) -> Result<Response<SyncAppResponse>, Status> {
        let actor = self.admin(&request, "SyncApp").await?;
        let req = request.into_inner();
        let cluster = (!req.cluster.is_empty()).then_some(req.cluster.as_str());
        let requested =
            crate::rollout::controller::request_sync(&self.hub, &actor, &req.app, cluster).await?;
        let requested = requested
            .into_iter()
            .map(|q| SyncRequested {
                cluster: q.cluster,
                request: q.id,
                digest: q.digest,
                note: q.note,
            })
            .collect();
        Ok(Response::new(SyncAppResponse { requested }))
    }

    async fn diff_app(
        &self,
        request: Request<DiffAppRequest>,
    ) -> Result<Response<DiffAppResponse>, Status> {
        self.admin(&request, "DiffApp").await?;
        let req = request.into_inner();
        let record = self.app(&req.app)?;
        if !record.status.target.contains_key(&req.cluster)
            && !record.status.assignments.contains_key(&req.cluster)
        {
            return Err(Error::FailedPrecondition(format!(
                "app {:?} does not target cluster {:?}",
                req.app, req.cluster
            ))
            .into());
        }
        let (connected, _) = self.hub.sessions.status(&req.cluster);
        let response = match self.hub.reports.get(&req.cluster, &req.app) {
            None => DiffAppResponse {
                sync: SyncStatus::Unknown.into(),
                message: format!("cluster {} has not reported the app yet", req.cluster),
                ..Default::default()
            },
            Some(report) => DiffAppResponse {
                diff: report.diff.clone(),
                sync: if connected {
                    report.sync
                } else {
                    SyncStatus::Unknown.into()
                },
                reported_at_unix_ms: report.at_unix_ms,
                message: if connected {
                    report.message.clone()
                } else {
                    format!(
                        "cluster {} is not connected; this is its last report",
                        req.cluster
                    )
                },
            },
        };
        Ok(Response::new(response))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.admin(&request, "ListAudit").await?;
        let limit = match request.get_ref().limit {
            0 => 100,
            n => n as usize,
        };
        let entries = self
            .hub
            .audit
            .recent(limit)?
            .into_iter()
            .map(|e| AuditEntry {
                seq: e.seq,
                at_unix_ms: e.at_ms,
                actor: e.actor,
                action: e.action,
                target: e.target,
                detail: e.detail,
            })
            .collect();
        Ok(Response::new(ListAuditResponse { entries }))
    }
}

/// What `status` and `app list` say of an app whose record does not read.
fn held_note(error: &str) -> String {
    format!("held on every cluster (nothing applied, nothing pruned): {error}")
}

/// An app as the operator's apply or delete sees it: an unreadable record is theirs to replace or
/// delete (its origin cannot be read, so it is not guarded as a fleet app's).
fn readable_or_replaceable(got: Result<Option<AppRecord>>) -> Result<Option<AppRecord>> {
    match got {
        Err(Error::Unreadable { .. }) => Ok(None),
        other => other,
    }
}

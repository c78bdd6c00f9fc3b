//! `flotilla.v1.Admin`: operator RPCs (tokens, clusters). Every call requires the admin certificate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flotilla_proto::v1::admin_server::Admin;
use flotilla_proto::v1::{
    App, AppCluster, AppRevision, ApplyAppRequest, Cluster, CreateTokenRequest,
    CreateTokenResponse, DeleteAppRequest, DeleteAppResponse, DeregisterClusterRequest,
    DeregisterClusterResponse, FleetStatusRequest, FleetStatusResponse, GetAppRequest,
    GetClusterRequest, LabelClusterRequest, ListAppsRequest, ListAppsResponse, ListClustersRequest,
    ListClustersResponse,
};
use ring::rand::{SecureRandom, SystemRandom};
use tonic::{Request, Response, Status};

use crate::apps::AppDocument;
use crate::appstore::AppRecord;
use crate::pki::hex;
use crate::store::{ClusterRecord, TokenRecord};
use crate::{Error, Hub, Result, now_unix, token_hash, validate};

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

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
            labels: record.labels.into_iter().collect(),
            name: record.name,
        }
    }

    fn cluster(&self, name: &str) -> Result<ClusterRecord> {
        self.hub
            .store
            .cluster(name)?
            .ok_or_else(|| Error::ClusterNotFound(name.to_string()))
    }

    async fn create_token(&self, req: CreateTokenRequest) -> Result<CreateTokenResponse> {
        let ttl = match req.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            secs => Duration::from_secs(secs),
        };
        let cluster = (!req.cluster_name.is_empty()).then_some(req.cluster_name);
        if let Some(name) = &cluster {
            validate::cluster_name(name)?;
        }
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| Error::Internal("system randomness unavailable".into()))?;
        let token = format!("flt_{}", hex(&secret));
        let hash = token_hash(&token);
        let now = now_unix();
        let record = TokenRecord {
            id: hex(&hash[..4]),
            created_at: now,
            expires_at: now.saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            uses_left: req.uses.max(1),
            cluster,
        };
        self.hub.store.create_token(&hash, &record).await?;
        tracing::info!(token_id = %record.id, uses = record.uses_left, cluster = ?record.cluster, "bootstrap token created");
        Ok(CreateTokenResponse {
            token,
            token_id: record.id,
            expires_at_unix: record.expires_at,
        })
    }

    async fn label(&self, req: LabelClusterRequest) -> Result<Cluster> {
        let set: BTreeMap<String, String> = req.set.into_iter().collect();
        validate::labels(&set)?;
        for key in &req.remove {
            validate::label_key(key)?;
        }
        let record = self.hub.store.label(&req.name, &set, &req.remove).await?;
        tracing::info!(cluster = %req.name, labels = ?record.labels, "cluster relabeled");
        self.hub.sync.kick_recompute();
        Ok(self.to_proto(record))
    }

    fn app_to_proto(record: AppRecord) -> App {
        App {
            name: record.doc.metadata.name.clone(),
            spec_json: serde_json::to_string(&record.doc).unwrap_or_default(),
            origin: record.origin,
            generation: record.generation,
            observed_generation: record.status.observed_generation,
            revision: record.status.revision.unwrap_or_default(),
            last_error: record.status.last_error.unwrap_or_default(),
            clusters: record
                .status
                .assignments
                .into_iter()
                .map(|(cluster, digest)| AppCluster { cluster, digest })
                .collect(),
            history: record
                .status
                .history
                .into_iter()
                .rev()
                .map(|h| AppRevision {
                    revision: h.revision,
                    at_unix: h.at,
                    digests: h.digests.into_iter().collect(),
                })
                .collect(),
        }
    }

    async fn apply_app(&self, req: ApplyAppRequest) -> Result<App> {
        let doc = AppDocument::parse(&req.document)?;
        if let Some(existing) = self.hub.apps.get(&doc.metadata.name)?
            && existing.origin == "fleet"
        {
            return Err(Error::PermissionDenied(format!(
                "app {:?} is defined in the fleet repository; change it there",
                doc.metadata.name
            )));
        }
        let url = doc.spec.source.repo_url.clone();
        let record = self.hub.apps.put_document(doc, "api").await?;
        tracing::info!(app = %record.doc.metadata.name, generation = record.generation, "app applied");
        self.hub.sync.kick_repo(&url);
        Ok(Self::app_to_proto(record))
    }

    async fn deregister(&self, name: &str) -> Result<DeregisterClusterResponse> {
        let serials = self.hub.store.deregister(name, now_unix()).await?;
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
        self.hub.auth.admin(&request)?;
        Ok(Response::new(
            self.create_token(request.into_inner()).await?,
        ))
    }

    async fn list_clusters(
        &self,
        request: Request<ListClustersRequest>,
    ) -> Result<Response<ListClustersResponse>, Status> {
        self.hub.auth.admin(&request)?;
        let clusters = self
            .hub
            .store
            .clusters()?
            .into_iter()
            .map(|r| self.to_proto(r))
            .collect();
        Ok(Response::new(ListClustersResponse { clusters }))
    }

    async fn get_cluster(
        &self,
        request: Request<GetClusterRequest>,
    ) -> Result<Response<Cluster>, Status> {
        self.hub.auth.admin(&request)?;
        let record = self.cluster(&request.get_ref().name)?;
        Ok(Response::new(self.to_proto(record)))
    }

    async fn label_cluster(
        &self,
        request: Request<LabelClusterRequest>,
    ) -> Result<Response<Cluster>, Status> {
        self.hub.auth.admin(&request)?;
        Ok(Response::new(self.label(request.into_inner()).await?))
    }

    async fn deregister_cluster(
        &self,
        request: Request<DeregisterClusterRequest>,
    ) -> Result<Response<DeregisterClusterResponse>, Status> {
        self.hub.auth.admin(&request)?;
        let response = self.deregister(&request.get_ref().name).await?;
        self.hub.sync.kick_recompute();
        Ok(Response::new(response))
    }

    async fn fleet_status(
        &self,
        request: Request<FleetStatusRequest>,
    ) -> Result<Response<FleetStatusResponse>, Status> {
        self.hub.auth.admin(&request)?;
        let apps = self.hub.apps.list()?;
        let mut rows = Vec::new();
        for cluster in self.hub.store.clusters()? {
            let (connected, _) = self.hub.sessions.status(&cluster.name);
            for desired in crate::reports::assignments_for(&cluster.name, &apps) {
                let report = self.hub.reports.get(&cluster.name, &desired.app);
                rows.push(crate::reports::row(
                    &cluster.name,
                    connected,
                    &desired,
                    report.as_ref(),
                ));
            }
        }
        Ok(Response::new(FleetStatusResponse { rows }))
    }

    async fn apply_app(&self, request: Request<ApplyAppRequest>) -> Result<Response<App>, Status> {
        self.hub.auth.admin(&request)?;
        Ok(Response::new(self.apply_app(request.into_inner()).await?))
    }

    async fn list_apps(
        &self,
        request: Request<ListAppsRequest>,
    ) -> Result<Response<ListAppsResponse>, Status> {
        self.hub.auth.admin(&request)?;
        let apps = self
            .hub
            .apps
            .list()?
            .into_iter()
            .map(Self::app_to_proto)
            .collect();
        Ok(Response::new(ListAppsResponse { apps }))
    }

    async fn get_app(&self, request: Request<GetAppRequest>) -> Result<Response<App>, Status> {
        self.hub.auth.admin(&request)?;
        let name = &request.get_ref().name;
        let record = self
            .hub
            .apps
            .get(name)?
            .ok_or_else(|| Error::AppNotFound(name.clone()))?;
        Ok(Response::new(Self::app_to_proto(record)))
    }

    async fn delete_app(
        &self,
        request: Request<DeleteAppRequest>,
    ) -> Result<Response<DeleteAppResponse>, Status> {
        self.hub.auth.admin(&request)?;
        let name = &request.get_ref().name;
        if let Some(existing) = self.hub.apps.get(name)?
            && existing.origin == "fleet"
        {
            return Err(Error::PermissionDenied(format!(
                "app {name:?} is defined in the fleet repository; remove it there"
            ))
            .into());
        }
        if !self.hub.apps.delete(name).await? {
            return Err(Error::AppNotFound(name.clone()).into());
        }
        tracing::info!(app = %name, "app deleted");
        self.hub.assignments_changed.send_modify(|v| *v += 1);
        Ok(Response::new(DeleteAppResponse {}))
    }
}

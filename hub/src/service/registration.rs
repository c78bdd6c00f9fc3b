//! `flotilla.v1.Registration`: bootstrap token + CSR → client certificate, and renewal over mTLS.

use std::collections::BTreeMap;
use std::sync::Arc;

use flotilla_proto::v1::registration_server::Registration;
use flotilla_proto::v1::{RegisterRequest, RegisterResponse, RenewRequest, RenewResponse};
use tonic::{Request, Response, Status};

use crate::db::store;
use crate::identity::validate;
use crate::{Error, Hub, Result, now_unix, token_hash};

/// Serves registration and renewal.
pub struct RegistrationService {
    hub: Arc<Hub>,
}

impl RegistrationService {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }

    async fn register(&self, req: RegisterRequest) -> Result<RegisterResponse> {
        let name = req.cluster_name.as_str();
        validate::cluster_name(name)?;
        let labels: BTreeMap<String, String> = req.labels.into_iter().collect();
        validate::labels(&labels)?;
        if req.token.is_empty() {
            return Err(Error::Token("no token given".into()));
        }
        let hash = token_hash(&req.token);
        let now = now_unix();
        // Cheap read-only check first, so unauthenticated callers cannot make the hub sign anything;
        // the transaction below checks again atomically.
        self.hub.store.precheck_token(&hash, name, now)?;
        let cert =
            self.hub
                .ca
                .issue_cluster_cert(name, &req.csr_pem, self.hub.settings.cert_ttl)?;
        let record = self
            .hub
            .store
            .register(store::Registration {
                token_hash: &hash,
                name,
                labels: &labels,
                cert: &cert,
                now,
                now_ms: crate::now_ms(),
            })
            .await?;
        if record.recovering_since_ms.is_some() {
            tracing::info!(cluster = name, serial = %cert.serial, "rebuilt cluster registered; recovering");
        } else {
            tracing::info!(cluster = name, serial = %cert.serial, labels = ?record.labels, "cluster registered");
        }
        self.hub.sync.kick_recompute();
        Ok(RegisterResponse {
            cluster_name: record.name,
            certificate_pem: cert.pem,
            ca_pem: self.hub.ca.ca_pem.clone(),
            not_after_unix: cert.not_after,
        })
    }

    async fn renew(&self, name: &str, req: RenewRequest) -> Result<RenewResponse> {
        if self.hub.store.cluster(name)?.is_none() {
            return Err(Error::Unauthenticated(format!(
                "cluster {name:?} is not registered"
            )));
        }
        let cert =
            self.hub
                .ca
                .issue_cluster_cert(name, &req.csr_pem, self.hub.settings.cert_ttl)?;
        self.hub.store.renew(name, &cert, now_unix()).await?;
        tracing::info!(cluster = name, serial = %cert.serial, "certificate renewed");
        Ok(RenewResponse {
            certificate_pem: cert.pem,
            not_after_unix: cert.not_after,
        })
    }
}

#[tonic::async_trait]
impl Registration for RegistrationService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let name = request.get_ref().cluster_name.clone();
        let hash = token_hash(&request.get_ref().token);
        let result = self.register(request.into_inner()).await;
        if let Err(err) = &result {
            // The token is never logged or audited; its id, the reason and the claimed name are.
            tracing::warn!(cluster = %name, error = %err, "registration rejected");
            let actor = match self.hub.store.token_id(&hash) {
                Ok(Some(id)) => format!("token/{id}"),
                _ => "token/unknown".into(),
            };
            let target = format!("cluster/{}", name.chars().take(64).collect::<String>());
            if let Err(e) = self
                .hub
                .audit
                .record_event(&actor, "cluster.register.refused", &target, err.to_string())
                .await
            {
                tracing::warn!(error = %e, "recording a refused registration");
            }
        }
        Ok(Response::new(result?))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let (name, _peer) = self.hub.auth.cluster(&request)?;
        Ok(Response::new(
            self.renew(&name, request.into_inner()).await?,
        ))
    }
}

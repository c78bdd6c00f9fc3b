//! Resource hooks: run to completion one phase at a time, each per its delete policy, and recorded
//! (phase, object as created, outcome) for the app's status. What a sync of hooks *is* — roles,
//! phases, policies — is decided in [`super::plan`]; this is the IO.

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use super::health::HealthStatus;
use super::plan::{self, ObjRef};
use super::{AppSpec, Engine, FIELD_MANAGER, WAVE_TIMEOUT, gvk_of, now_ms};
use crate::{Error, Result};
use flotilla_proto::v1::HookRun;

impl Engine {
    /// Runs the hooks of one phase in apply order, each to completion (Healthy; Jobs Complete):
    /// the previous run's object is deleted first (BeforeHookCreation, the default), a
    /// `generateName` hook is created anew, and each is deleted after success or failure when its
    /// policy says so. Returns the first hook that failed, and why.
    pub(super) async fn run_hooks(
        &self,
        app: &AppSpec,
        hooks: &[Value],
        phase: plan::HookPhase,
        runs: &mut Vec<HookRun>,
    ) -> std::result::Result<(), (ObjRef, String)> {
        let mut prepared = Vec::with_capacity(hooks.len());
        for h in hooks {
            prepared.push(self.desired(app, h).await.0);
        }
        for i in plan::apply_order(&prepared) {
            let obj = &prepared[i];
            let (live, outcome) = self.run_hook(app, obj).await;
            let (health, message) = match &outcome {
                Ok(()) => (HealthStatus::Healthy, String::new()),
                Err(why) => (HealthStatus::Degraded, why.clone()),
            };
            tracing::info!(app = %app.name, hook = %live, %phase, ok = outcome.is_ok(), "hook ran");
            runs.push(HookRun {
                phase: phase.into(),
                kind: live.kind.clone(),
                namespace: live.namespace.clone(),
                name: live.name.clone(),
                health: health.into(),
                message,
                finished_at_unix_ms: now_ms(),
            });
            if let Err(why) = outcome {
                return Err((live, why));
            }
        }
        Ok(())
    }

    /// Runs one hook to completion; returns it as created (a `generateName` hook's name filled
    /// in) and why it failed, if it did.
    async fn run_hook(
        &self,
        app: &AppSpec,
        obj: &Value,
    ) -> (ObjRef, std::result::Result<(), String>) {
        let policies = plan::delete_policies(obj);
        let r = ObjRef::of(obj);
        let (ar, caps) = match self.resolve(&gvk_of(obj)).await {
            Ok(found) => found,
            Err(e) => return (r, Err(e.to_string())),
        };
        let api = self.api(&ar, &caps, &r.namespace);
        let created = if r.name.is_empty() {
            let parsed = match serde_json::from_value(obj.clone()) {
                Ok(p) => p,
                Err(e) => return (r, Err(e.to_string())),
            };
            api.create(&kube::api::PostParams::default(), &parsed)
                .await
                .map_err(|e| Error::kube("creating the hook", e).to_string())
        } else {
            let cleared = if policies.contains(&plan::DeletePolicy::BeforeHookCreation) {
                self.delete_and_wait(&api, &r)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                Ok(())
            };
            match cleared {
                Err(e) => Err(e),
                Ok(()) => api
                    .patch(
                        &r.name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(obj),
                    )
                    .await
                    .map_err(|e| Error::kube("applying the hook", e).to_string()),
            }
        };
        let created = match created {
            Ok(c) => c,
            Err(e) => return (r, Err(e)),
        };
        let mut live = r.clone();
        // The server always names what it created (generateName included).
        if let Some(name) = created.metadata.name.clone() {
            live.name = name;
        }
        let (h, each) = self
            .wait_healthy(&app.name, &[(live.clone(), None)], WAVE_TIMEOUT)
            .await;
        let ok = h.state == HealthStatus::Healthy;
        let delete = (ok && policies.contains(&plan::DeletePolicy::HookSucceeded))
            || (!ok && policies.contains(&plan::DeletePolicy::HookFailed));
        if delete && let Err(e) = api.delete(&live.name, &DeleteParams::background()).await {
            // Left in place: the next run of the hook deletes it before creating it again.
            tracing::warn!(app = %app.name, hook = %live, error = %e, "deleting a finished hook");
        }
        if ok {
            return (live, Ok(()));
        }
        let why = each
            .first()
            .map(|(_, h)| format!("{} ({})", h.message, h.state))
            .unwrap_or_default();
        (live, Err(why))
    }

    /// Deletes an object (if it exists) and waits until it is gone, up to 30 s.
    async fn delete_and_wait(&self, api: &Api<DynamicObject>, r: &ObjRef) -> Result<()> {
        match api.delete(&r.name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(Error::kube("deleting the previous hook", e)),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match api.get_opt(&r.name).await {
                Ok(None) => return Ok(()),
                Ok(Some(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => return Err(Error::kube("waiting for the previous hook to go", e)),
            }
        }
        Err(Error::Timeout(format!("{r} was not deleted within 30s")))
    }
}

//! Resource hooks: run to completion one phase at a time, each created anew per run and deleted
//! per its policy, recorded (phase, object as created, outcome) for the app's status, and what
//! runs left behind kept in the inventory so the app's removal takes it too. What a sync of hooks *is* — roles,
//! phases, policies — is decided in [`super::plan`]; this is the IO.

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use serde_json::Value;

use super::health::HealthStatus;
use super::plan::{self, ObjRef};
use super::progress::Progress;
use super::{AppSpec, Engine, FIELD_MANAGER, WAVE_TIMEOUT, gvk_of, now_ms};
use crate::{Error, Result};
use flotilla_proto::v1::HookRun;

impl Engine {
    /// Runs the hooks of one phase (prepared: labelled, namespace filled in) in apply order, each
    /// to completion (Healthy; Jobs Complete). Every run creates its hook anew, replacing what an
    /// earlier run left; each is deleted after success or failure when its policy says so.
    /// `left` is the hook objects earlier runs left in the cluster, kept up to date. Returns the
    /// first hook that failed, and why.
    pub(super) async fn run_hooks(
        &self,
        app: &AppSpec,
        hooks: &[Value],
        phase: plan::HookPhase,
        runs: &mut Vec<HookRun>,
        left: &mut Vec<ObjRef>,
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
    ) -> std::result::Result<(), (ObjRef, String)> {
        for i in plan::apply_order(hooks) {
            let (live, outcome) = self
                .run_hook(app, &hooks[i], left, &format!("{phase} hook"), progress)
                .await;
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
        left: &mut Vec<ObjRef>,
        label: &str,
        progress: &mut (dyn FnMut(Progress<'_>) + Send),
    ) -> (ObjRef, std::result::Result<(), String>) {
        let policies = plan::delete_policies(obj);
        let r = ObjRef::of(obj);
        let (ar, caps) = match self.resolve(&gvk_of(obj)).await {
            Ok(found) => found,
            Err(e) => return (r, Err(e.to_string())),
        };
        let api = self.api(&ar, &caps, &r.namespace);
        // An earlier run's object of the same name is replaced whatever the hook's policy: a Job
        // cannot be changed in place, and a run is a new object. Earlier runs of a
        // `generateName` hook go when its policy is BeforeHookCreation (the default).
        let earlier: Vec<ObjRef> = if !r.name.is_empty() {
            vec![r.clone()]
        } else if policies.contains(&plan::DeletePolicy::BeforeHookCreation) {
            left.iter()
                .filter(|l| plan::earlier_run_of(obj, l))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        for e in &earlier {
            if let Err(why) = self.replace_earlier(app, &api, e).await {
                return (r, Err(why));
            }
            left.retain(|l| !l.same_object(e));
        }
        let created = if r.name.is_empty() {
            let parsed = match serde_json::from_value(obj.clone()) {
                Ok(p) => p,
                Err(e) => return (r, Err(e.to_string())),
            };
            api.create(&kube::api::PostParams::default(), &parsed)
                .await
                .map_err(|e| Error::kube("creating the hook", e).to_string())
        } else {
            api.patch(
                &r.name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
            .map_err(|e| Error::kube("creating the hook", e).to_string())
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
            .wait_healthy_telling(
                &app.name,
                &[(live.clone(), None)],
                WAVE_TIMEOUT,
                label,
                progress,
            )
            .await;
        let ok = h.state == HealthStatus::Healthy;
        let delete = (ok && policies.contains(&plan::DeletePolicy::HookSucceeded))
            || (!ok && policies.contains(&plan::DeletePolicy::HookFailed));
        let deleted = delete
            && match api.delete(&live.name, &DeleteParams::background()).await {
                Ok(_) => true,
                Err(kube::Error::Api(s)) if s.code == 404 => true,
                Err(e) => {
                    // Left in place (and recorded): the next run replaces it, removal prunes it.
                    tracing::warn!(app = %app.name, hook = %live, error = %e, "deleting a finished hook");
                    false
                }
            };
        if !deleted && !left.iter().any(|l| l.same_object(&live)) {
            left.push(live.clone());
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

    /// Deletes what an earlier run of a hook left, if it is this app's; an object of the same
    /// name that is not ours is never deleted, and the hook fails saying so.
    async fn replace_earlier(
        &self,
        app: &AppSpec,
        api: &Api<DynamicObject>,
        earlier: &ObjRef,
    ) -> std::result::Result<(), String> {
        let live = match api.get_opt(&earlier.name).await {
            Ok(None) => return Ok(()),
            Ok(Some(live)) => live,
            Err(e) => {
                return Err(Error::kube("reading the previous run of the hook", e).to_string());
            }
        };
        let owned = live
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(plan::APP_LABEL))
            .is_some_and(|a| *a == app.name);
        if !owned {
            return Err(format!(
                "{earlier} exists and is not a hook of app {}: not replaced (delete or relabel it, or rename the hook)",
                app.name
            ));
        }
        self.delete_and_wait(api, earlier)
            .await
            .map_err(|e| e.to_string())
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

//! What one pass of an app's task does — apply the bundle (a sync) or only compare — decided from
//! the hub's orders and what the cluster last ran. Pure, and tested with a table.

use flotilla_proto::v1::{Assignment, SyncStatus};

use crate::engine::AppSpec;
use crate::engine::health::Health;
use crate::engine::inventory::CachedBundle;

/// What an app task runs from: a change of any of these restarts it. The app's settings (sync
/// policy included) are kept once, in `spec`, as the hub's assignment gave them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Orders {
    pub(crate) digest: String,
    pub(crate) preview_digest: String,
    pub(crate) sync_request: u64,
    pub(crate) spec: AppSpec,
}

/// The app's settings in an assignment: the one place the wire's become the engine's.
pub(crate) fn spec_of(a: &Assignment) -> AppSpec {
    AppSpec {
        name: a.app.clone(),
        namespace: a.namespace.clone(),
        prune: a.prune,
        allow_empty: a.allow_empty,
        create_namespace: a.create_namespace,
        manual: a.manual,
        self_heal: a.self_heal,
    }
}

impl Orders {
    pub(crate) fn of(a: &Assignment) -> Self {
        Self {
            digest: a.digest.clone(),
            preview_digest: a.preview_digest.clone(),
            sync_request: a.sync_request,
            spec: spec_of(a),
        }
    }

    /// A bundle from the cache, before the hub said anything.
    pub(crate) fn cached(b: &CachedBundle) -> Self {
        Self {
            digest: b.digest.clone(),
            preview_digest: String::new(),
            sync_request: 0,
            spec: b.spec.clone(),
        }
    }
}

impl Orders {
    /// Automated and healing, with a bundle: every pass applies, whatever the cluster last ran
    /// (so deciding needs no inventory read — the common case).
    pub(crate) fn always_applies(&self) -> bool {
        !self.digest.is_empty() && !self.spec.manual && self.spec.self_heal
    }
}

/// How one pass of an app's task goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// Apply the bundle (a sync).
    Apply,
    /// Compare only: what a sync would change is reported, nothing is written.
    Compare,
}

/// Whether a pass applies: automated apps whenever the bundle is new to the cluster, healing is on,
/// the last pass left failures or an operator asked; manual apps only on an operator's request
/// that was not carried out yet. Nothing applies without a bundle (a manual app never synced).
pub(crate) fn pass_for(
    orders: &Orders,
    applied_digest: &str,
    done_request: u64,
    failures_left: bool,
) -> Pass {
    if orders.always_applies() {
        return Pass::Apply;
    }
    let requested = orders.sync_request > done_request;
    let apply = !orders.digest.is_empty()
        && if orders.spec.manual {
            requested
        } else {
            requested || failures_left || applied_digest != orders.digest
        };
    if apply { Pass::Apply } else { Pass::Compare }
}

/// Says in the app's message what a difference means and how to resolve it.
/// `cluster` is this cluster's name in the fleet, for the command the message suggests.
pub(crate) fn with_difference(h: &mut Health, sync: SyncStatus, app: &AppSpec, cluster: &str) {
    if sync != SyncStatus::OutOfSync {
        return;
    }
    let why = if app.manual {
        format!(
            "differs from git (manual sync): `flotilla app diff {0} --cluster {cluster}` shows it, `flotilla app sync {0} --cluster {cluster}` applies it",
            app.name
        )
    } else {
        format!(
            "differs from git and selfHeal is off: the next revision or `flotilla app sync {} --cluster {cluster}` applies it",
            app.name
        )
    };
    h.message = if h.message.is_empty() {
        why
    } else {
        format!("{why}; {}", h.message)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_passes_apply() {
        let orders = |manual: bool, self_heal: bool, digest: &str, sync_request: u64| Orders {
            digest: digest.into(),
            preview_digest: String::new(),
            sync_request,
            spec: spec_of(&Assignment {
                app: "web".into(),
                manual,
                self_heal,
                ..Assignment::default()
            }),
        };
        use Pass::{Apply, Compare};
        // (manual, selfHeal, assigned, request, applied digest, done request, failures) → pass
        let table = [
            (false, true, "d2", 0, "d2", 0, false, Apply),
            (false, false, "d2", 0, "d1", 0, false, Apply),
            (false, false, "d2", 0, "d2", 0, false, Compare),
            (false, false, "d2", 0, "d2", 0, true, Apply),
            (false, false, "d2", 3, "d2", 2, false, Apply),
            (true, true, "d2", 0, "d1", 0, false, Compare),
            (true, true, "d2", 0, "d1", 0, true, Compare),
            (true, true, "d2", 4, "d1", 3, false, Apply),
            (true, true, "d2", 4, "d2", 4, false, Compare),
            (true, true, "", 0, "", 0, false, Compare),
        ];
        for (i, (manual, heal, digest, req, applied, done, failures, want)) in
            table.into_iter().enumerate()
        {
            let got = pass_for(&orders(manual, heal, digest, req), applied, done, failures);
            assert_eq!(got, want, "case {i}");
        }
    }
}

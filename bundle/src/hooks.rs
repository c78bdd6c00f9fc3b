//! What an object of a bundle is to a sync — an app resource, a hook of some phases, or never
//! applied — from Argo CD's and Helm's hook annotations. Shared vocabulary: the agent runs hooks
//! by it, and the hub leaves what is never applied out of the bundle, so its digest changes only
//! when what is applied does.

use flotilla_proto::v1::HookPhase;
use serde_json::Value;

/// Argo CD's resource hook annotation and Helm's: objects carrying either are hooks, which alone
/// may use `generateName`.
pub const HOOK_ANNOTATION: &str = "argocd.argoproj.io/hook";
pub const HELM_HOOK_ANNOTATION: &str = "helm.sh/hook";

/// What an object of the bundle is to a sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// An app resource: applied, tracked, healed, pruned.
    Resource,
    /// A hook of these phases: run on a sync of a new revision, never tracked or healed.
    Hook(Vec<HookPhase>),
    /// `Skip`, or a Helm hook that has no place in a sync (tests, deletes, rollbacks).
    Skipped,
}

/// The role of an object, from Argo CD's hook annotation, else Helm's (pre-install/pre-upgrade →
/// PreSync, post-install/post-upgrade → PostSync, as Argo CD maps them).
pub fn role(obj: &Value) -> Role {
    let annotations = &obj["metadata"]["annotations"];
    let list = |a: &str| -> Option<Vec<String>> {
        annotations[a].as_str().map(|v| {
            v.split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect()
        })
    };
    let mut phases = Vec::new();
    if let Some(argo) = list(HOOK_ANNOTATION) {
        for p in argo {
            match p.as_str() {
                "PreSync" => phases.push(HookPhase::PreSync),
                "Sync" => phases.push(HookPhase::Sync),
                "PostSync" => phases.push(HookPhase::PostSync),
                "SyncFail" => phases.push(HookPhase::SyncFail),
                "Skip" => return Role::Skipped,
                _ => {}
            }
        }
    } else if let Some(helm) = list(HELM_HOOK_ANNOTATION) {
        for p in helm {
            match p.as_str() {
                "pre-install" | "pre-upgrade" => phases.push(HookPhase::PreSync),
                "post-install" | "post-upgrade" => phases.push(HookPhase::PostSync),
                _ => {}
            }
        }
        if phases.is_empty() {
            return Role::Skipped;
        }
    } else {
        return Role::Resource;
    }
    phases.sort();
    phases.dedup();
    if phases.is_empty() {
        Role::Skipped
    } else {
        Role::Hook(phases)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hook_roles() {
        let with = |a: serde_json::Value| json!({"metadata": {"name": "h", "annotations": a}});
        let table = [
            (json!({}), Role::Resource),
            (
                json!({HOOK_ANNOTATION: "PreSync"}),
                Role::Hook(vec![HookPhase::PreSync]),
            ),
            (
                json!({HOOK_ANNOTATION: "PostSync, PreSync"}),
                Role::Hook(vec![HookPhase::PreSync, HookPhase::PostSync]),
            ),
            (json!({HOOK_ANNOTATION: "Skip"}), Role::Skipped),
            (
                json!({HOOK_ANNOTATION: "SyncFail"}),
                Role::Hook(vec![HookPhase::SyncFail]),
            ),
            (
                json!({HELM_HOOK_ANNOTATION: "pre-install,pre-upgrade"}),
                Role::Hook(vec![HookPhase::PreSync]),
            ),
            (
                json!({HELM_HOOK_ANNOTATION: "post-upgrade"}),
                Role::Hook(vec![HookPhase::PostSync]),
            ),
            (json!({HELM_HOOK_ANNOTATION: "test"}), Role::Skipped),
            // Argo CD's annotation wins over Helm's.
            (
                json!({HOOK_ANNOTATION: "Sync", HELM_HOOK_ANNOTATION: "pre-install"}),
                Role::Hook(vec![HookPhase::Sync]),
            ),
        ];
        for (annotations, want) in table {
            assert_eq!(role(&with(annotations.clone())), want, "{annotations}");
        }
    }
}

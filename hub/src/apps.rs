//! The App model: what to deploy (a git source), where (a cluster selector), with which per-cluster
//! customizations and sync policy. Parsed from Kubernetes-style YAML and validated with errors that
//! name the field.

use std::collections::BTreeMap;

use flotilla_bundle::customize::Customization;
use flotilla_bundle::selector::LabelSelector;
use serde::{Deserialize, Serialize};

use crate::identity::validate;
use crate::rollout::{RolloutSpec, Strategy};
use crate::{Error, Result};

pub const API_VERSION: &str = "flotilla.dev/v1alpha1";

/// An `App` document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppDocument {
    pub api_version: String,
    pub kind: String,
    pub metadata: AppMetadata,
    pub spec: AppSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppMetadata {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppSpec {
    pub source: Source,
    #[serde(default)]
    pub targets: Targets,
    /// Namespace for namespaced objects that name none.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customizations: Vec<Customization>,
    #[serde(default)]
    pub sync_policy: SyncPolicy,
    /// How a new revision reaches the fleet; `None` is the documented default strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    #[default]
    Plain,
    Kustomize,
    /// A Helm chart at `path`, rendered by `helm template`.
    Helm,
}

/// How a Helm chart is rendered (`spec.source.helm`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HelmSource {
    /// The release name templates see (default: the app's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_name: Option<String>,
    /// Values files, relative to the chart directory, applied in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub value_files: Vec<String>,
    /// Inline values, over the files; per-cluster `helmValues` of customizations go over these.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub values: serde_json::Value,
    /// Leave out the chart's `crds/` (default: they are applied, first).
    #[serde(default, rename = "skipCRDs")]
    pub skip_crds: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(rename = "repoURL")]
    pub repo_url: String,
    /// Branch, tag or commit.
    #[serde(rename = "ref", default = "default_ref")]
    pub reference: String,
    #[serde(default)]
    pub path: String,
    #[serde(default, rename = "type")]
    pub kind: SourceType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub helm: Option<HelmSource>,
}

fn default_ref() -> String {
    "main".into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Targets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyncPolicy {
    #[serde(default = "yes")]
    pub prune: bool,
    #[serde(default = "yes")]
    pub self_heal: bool,
    #[serde(default)]
    pub allow_empty: bool,
    /// Create the namespaces the bundle's objects need and it does not define (labelled
    /// `app.flotilla.dev/created-by`, never pruned).
    #[serde(default)]
    pub create_namespace: bool,
    /// `false`: nothing changes on a cluster until an operator runs `flotilla app sync`; the agent
    /// reports the difference (OutOfSync, with a diff) meanwhile, and rollouts move only clusters
    /// whose sync was requested.
    #[serde(default = "yes")]
    pub automated: bool,
}

fn yes() -> bool {
    true
}

impl Default for SyncPolicy {
    fn default() -> Self {
        Self {
            prune: true,
            self_heal: true,
            allow_empty: false,
            create_namespace: false,
            automated: true,
        }
    }
}

/// Refuses App text nested past the manifest limit before the YAML parser sees it.
fn refuse_deep(text: &str) -> Result<()> {
    flotilla_bundle::manifest::refuse_deep("app document", text)
        .map_err(|e| field("app document", e.to_string()))
}

fn field(field: &'static str, reason: impl Into<String>) -> Error {
    Error::invalid(field, reason)
}

/// Checks a source path: relative, no `..`, no absolute paths.
pub fn check_path(path: &str) -> Result<()> {
    if path.starts_with('/') {
        return Err(field(
            "spec.source.path",
            format!("{path:?} must be relative to the repository root"),
        ));
    }
    if path.split('/').any(|c| c == "..") {
        return Err(field(
            "spec.source.path",
            format!("{path:?} must not contain '..'"),
        ));
    }
    Ok(())
}

impl AppDocument {
    /// Parses one App document (YAML or JSON) and validates it.
    pub fn parse(text: &str) -> Result<Self> {
        refuse_deep(text)?;
        let doc: AppDocument =
            serde_yaml_ng::from_str(text).map_err(|e| field("app document", e.to_string()))?;
        doc.validate()?;
        Ok(doc)
    }

    /// Parses a multi-document stream of Apps; errors name the document.
    pub fn parse_all(text: &str) -> Result<Vec<Self>> {
        refuse_deep(text)?;
        let mut out = Vec::new();
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            // Straight from YAML (not through JSON), so an error names the file's line.
            let app: Option<AppDocument> = serde::Deserialize::deserialize(doc)
                .map_err(|e| field("app document", format!("document {}: {e}", i + 1)))?;
            let Some(app) = app else {
                continue;
            };
            app.validate()?;
            out.push(app);
        }
        Ok(out)
    }

    pub fn validate(&self) -> Result<()> {
        if self.api_version != API_VERSION {
            return Err(field(
                "apiVersion",
                format!("{:?} is not {API_VERSION}", self.api_version),
            ));
        }
        if self.kind != "App" {
            return Err(field("kind", format!("{:?} is not App", self.kind)));
        }
        validate::cluster_name(&self.metadata.name).map_err(|_| {
            field(
                "metadata.name",
                format!("{:?} must be a DNS-1123 label", self.metadata.name),
            )
        })?;
        let s = &self.spec.source;
        if s.repo_url.trim().is_empty() {
            return Err(field("spec.source.repoURL", "is required"));
        }
        let scheme_ok = ["file://", "http://", "https://", "/"]
            .iter()
            .any(|p| s.repo_url.starts_with(p));
        if !scheme_ok {
            return Err(field(
                "spec.source.repoURL",
                format!(
                    "{:?}: use https://, http://, file:// or an absolute path",
                    s.repo_url
                ),
            ));
        }
        if let Some((_, rest)) = s.repo_url.split_once("://")
            && rest
                .split('/')
                .next()
                .is_some_and(|authority| authority.contains('@'))
        {
            // The URL is stored, shown and logged: a secret in it would leak everywhere.
            return Err(field(
                "spec.source.repoURL",
                "must not carry credentials; configure them on the hub (--repo-credentials)",
            ));
        }
        if s.reference.trim().is_empty() {
            return Err(field("spec.source.ref", "must not be empty"));
        }
        check_path(&s.path)?;
        match (&s.helm, s.kind) {
            (Some(_), SourceType::Plain | SourceType::Kustomize) => {
                return Err(field(
                    "spec.source.helm",
                    "is only for `type: helm` sources",
                ));
            }
            (Some(h), SourceType::Helm) => {
                for f in &h.value_files {
                    check_path(f).map_err(|_| {
                        field(
                            "spec.source.helm.valueFiles",
                            format!("{f:?} must be relative to the chart, without '..'"),
                        )
                    })?;
                }
                if !(h.values.is_null() || h.values.is_object()) {
                    return Err(field("spec.source.helm.values", "must be a mapping"));
                }
            }
            _ => {}
        }
        for (i, c) in self.spec.customizations.iter().enumerate() {
            if !c.helm_values.is_null() && s.kind != SourceType::Helm {
                return Err(field(
                    "spec.customizations",
                    format!("[{i}].helmValues is only for `type: helm` sources"),
                ));
            }
        }
        if let Some(sel) = &self.spec.targets.selector {
            sel.validate("spec.targets.selector")
                .map_err(|e| field("spec.targets.selector", e.to_string()))?;
        }
        for name in &self.spec.targets.clusters {
            validate::cluster_name(name).map_err(|_| {
                field(
                    "spec.targets.clusters",
                    format!("{name:?} is not a cluster name"),
                )
            })?;
        }
        for (i, c) in self.spec.customizations.iter().enumerate() {
            c.selector
                .validate(&format!("spec.customizations[{i}].selector"))
                .map_err(|e| field("spec.customizations", e.to_string()))?;
        }
        self.strategy()?;
        Ok(())
    }

    /// The app's rollout strategy with defaults filled in.
    pub fn strategy(&self) -> Result<Strategy> {
        RolloutSpec::resolve(self.spec.rollout.as_ref()).map_err(|e| field("spec.rollout", e))
    }

    /// Whether this app targets a cluster with these labels.
    pub fn targets(&self, cluster: &str, labels: &BTreeMap<String, String>) -> bool {
        let t = &self.spec.targets;
        t.clusters.iter().any(|c| c == cluster)
            || t.selector.as_ref().is_some_and(|s| s.matches(labels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
apiVersion: flotilla.dev/v1alpha1
kind: App
metadata: {name: shop}
spec:
  source: {repoURL: "file:///srv/fleet.git", ref: main, path: apps/shop}
  targets:
    selector: {matchLabels: {tier: prod}}
"#;

    #[test]
    fn parses_with_defaults_and_targets_by_selector_or_name() {
        let app = AppDocument::parse(APP).unwrap();
        assert_eq!(app.spec.namespace, "default");
        assert!(app.spec.sync_policy.prune && !app.spec.sync_policy.allow_empty);
        let prod = [("tier".to_string(), "prod".to_string())].into();
        assert!(app.targets("x", &prod));
        assert!(!app.targets("x", &BTreeMap::new()));
    }

    #[test]
    fn validation_errors_name_the_field() {
        let table = [
            (
                APP.replace("path: apps/shop", "path: ../.."),
                "spec.source.path",
            ),
            (APP.replace("kind: App", "kind: Application"), "kind"),
            (APP.replace("{name: shop}", "{name: Shop}"), "metadata.name"),
            (
                APP.replace("file:///srv/fleet.git", "ftp://x"),
                "spec.source.repoURL",
            ),
            (APP.replace("repoURL", "repoUrl"), "app document"),
        ];
        for (text, want) in table {
            let err = AppDocument::parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn unknown_fields_name_the_line_of_the_yaml() {
        let typo = APP.replace("repoURL", "repoUrl");
        let line = typo.lines().position(|l| l.contains("repoUrl")).unwrap() + 1;
        let err = AppDocument::parse(&typo).unwrap_err().to_string();
        assert!(err.contains(&format!("line {line}")), "{err}");
        let stream = format!("# fleet\n---\n{APP}---\n{typo}");
        let err = AppDocument::parse_all(&stream).unwrap_err().to_string();
        let line = stream.lines().position(|l| l.contains("repoUrl")).unwrap() + 1;
        // As YAML counts: comments before the first `---` are no document.
        assert!(err.contains("document 2"), "{err}");
        assert!(err.contains(&format!("line {line}")), "{err}");
    }
}

/// Where an app's document comes from; stored as `"api"` or `"fleet"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// `flotilla app apply`: operators change and delete it.
    Api,
    /// The fleet repository: changed and removed only there.
    Fleet,
}

impl From<Origin> for flotilla_proto::v1::AppOrigin {
    fn from(origin: Origin) -> Self {
        match origin {
            Origin::Api => Self::Api,
            Origin::Fleet => Self::Fleet,
        }
    }
}

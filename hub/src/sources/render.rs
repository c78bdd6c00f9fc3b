//! Rendering: source files → base manifest texts (plain files, or `kustomize build` output) →
//! per-cluster variants (substitution, patches, normalization). A render either yields a complete,
//! non-empty bundle or an error naming the file and document; never a partial or empty one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use flotilla_bundle::customize::{self, ClusterFacts, Customization};
use flotilla_bundle::{hooks, manifest};
use serde_json::Value;

use crate::apps::SourceType;
use crate::{Error, Result};

/// A source's files: (path, contents).
pub type Files = Vec<(String, Vec<u8>)>;

/// A source rendered up to the per-cluster step.
#[derive(Debug, Clone, PartialEq)]
pub struct Base {
    /// The source path this base was rendered from.
    pub path: String,
    /// (where, text) of each manifest text.
    pub texts: Vec<(String, String)>,
    /// Placeholders the texts use.
    pub used: BTreeSet<String>,
    /// A Helm source's chart files, rendered per cluster; `None` for plain and kustomize.
    pub chart: Option<Arc<Files>>,
}

fn is_manifest(path: &str) -> bool {
    path.ends_with(".yaml") || path.ends_with(".yml") || path.ends_with(".json")
}

/// Renders source files to base texts. For kustomize, `files` is the whole repository and `path`
/// the directory to build; `scratch` is an empty directory to materialize it in.
pub async fn base(
    kind: SourceType,
    files: Vec<(String, Vec<u8>)>,
    path: &str,
    kustomize_bin: &str,
    scratch: &Path,
) -> Result<Base> {
    if kind == SourceType::Plain
        && files.iter().any(|(p, _)| {
            p == "Chart.yaml" || p.ends_with("/Chart.yaml") && !p.contains("/charts/")
        })
    {
        return Err(Error::Render(
            "this looks like a Helm chart (Chart.yaml): set spec.source.type: helm".into(),
        ));
    }
    let texts = match kind {
        SourceType::Plain => files
            .into_iter()
            .filter(|(p, _)| is_manifest(p))
            .map(|(p, data)| {
                String::from_utf8(data)
                    .map(|t| (p.clone(), t))
                    .map_err(|_| Error::Render(format!("{p}: not UTF-8 text")))
            })
            .collect::<Result<Vec<_>>>()?,
        SourceType::Kustomize => vec![(
            "kustomize build".to_string(),
            kustomize(files, path, kustomize_bin, scratch).await?,
        )],
        // Rendered per cluster (values differ); the base keeps the chart's files.
        SourceType::Helm => {
            return Ok(Base {
                path: path.to_string(),
                texts: Vec::new(),
                used: BTreeSet::new(),
                chart: Some(Arc::new(files)),
            });
        }
    };
    let used = texts
        .iter()
        .flat_map(|(_, t)| customize::placeholders(t))
        .collect();
    Ok(Base {
        path: path.to_string(),
        texts,
        used,
        chart: None,
    })
}

/// Writes `files` (repository-relative) under `scratch`.
fn materialize(files: &[(String, Vec<u8>)], scratch: &Path) -> Result<()> {
    for (file, data) in files {
        let target = scratch.join(file);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&target, data).map_err(|e| Error::io(&target, e))?;
    }
    Ok(())
}

/// The most a render tool's complaint keeps in an app's error.
const TOOL_ERROR_BYTES: usize = 512;

/// What a failed render tool said, as one bounded line for `last_error`: its last `Error:` line
/// (Helm's and kustomize's own form), else its last non-empty line — not a traceback — with the
/// hub's scratch directory (a host path) shown as `.`.
fn tool_failure(stderr: &str, scratch: &Path) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let chosen = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("Error:") || l.starts_with("error:"))
        .or(lines.last())
        .copied()
        .unwrap_or("(nothing on stderr)");
    let scratch = scratch.display().to_string();
    let mut line = chosen.replace(&scratch, ".");
    crate::sources::untrusted::cut(&mut line, TOOL_ERROR_BYTES);
    line
}

/// A render tool's process environment: no network (remote bases, chart repositories and OCI
/// registries would make a render depend on more than the pinned revision), no home.
fn sealed(cmd: &mut tokio::process::Command, scratch: &Path) {
    cmd.env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("HTTPS_PROXY", "http://127.0.0.1:9")
        .env("http_proxy", "http://127.0.0.1:9")
        .env("https_proxy", "http://127.0.0.1:9")
        .env("NO_PROXY", "")
        .env("HOME", scratch)
        .env("HELM_CACHE_HOME", scratch.join(".helm/cache"))
        .env("HELM_CONFIG_HOME", scratch.join(".helm/config"))
        .env("HELM_DATA_HOME", scratch.join(".helm/data"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
}

/// Runs a render tool (`what` names it in errors), its output capped at the render budget and its
/// time at 60 s.
async fn run_capped(
    mut cmd: tokio::process::Command,
    what: &str,
    missing: &str,
    scratch: &Path,
) -> Result<String> {
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Render(format!("cannot run {what}: {e} ({missing})")))?;
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Error::Internal(format!("{what}: pipes were not captured")));
    };
    // Output past the render budget is refused without holding more than the budget in memory.
    let limit = crate::sources::git::MAX_RENDER_BYTES;
    let run = async {
        use tokio::io::AsyncReadExt;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (mut stdout, mut stderr) = (stdout.take(limit + 1), stderr.take(64 * 1024));
        let (o, e) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        o.and(e)?;
        if out.len() as u64 > limit {
            return Ok(None);
        }
        let status = child.wait().await?;
        Ok::<_, std::io::Error>(Some((status, out, err)))
    };
    let (status, stdout, stderr) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .map_err(|_| Error::Render(format!("{what} took longer than 60s")))?
        .map_err(|e| Error::Render(format!("{what}: {e}")))?
        .ok_or_else(|| {
            Error::Render(format!(
                "{what} printed more than {limit} bytes (the render budget)"
            ))
        })?;
    if !status.success() {
        return Err(Error::Render(format!(
            "{what} failed: {}",
            tool_failure(&String::from_utf8_lossy(&stderr), scratch)
        )));
    }
    String::from_utf8(stdout).map_err(|_| Error::Render(format!("{what}: output is not UTF-8")))
}

async fn kustomize(
    files: Vec<(String, Vec<u8>)>,
    path: &str,
    bin: &str,
    scratch: &Path,
) -> Result<String> {
    crate::sources::kustomize_paths::check(&files)?;
    materialize(&files, scratch)?;
    let mut cmd = tokio::process::Command::new(bin);
    if Path::new(bin)
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("kubectl"))
    {
        cmd.arg("kustomize");
    } else {
        cmd.arg("build");
    }
    cmd.arg(scratch.join(path.trim_matches('/')));
    sealed(&mut cmd, scratch);
    run_capped(
        cmd,
        "kustomize build",
        "install kubectl or kustomize, or set --kustomize-bin",
        scratch,
    )
    .await
}

/// How a Helm chart is rendered for one cluster.
pub struct HelmRender<'a> {
    pub release: &'a str,
    pub namespace: &'a str,
    pub value_files: &'a [String],
    /// The cluster's merged values (source values, then customizations' `helmValues`).
    pub values: &'a Value,
    pub skip_crds: bool,
}

/// `helm template` of the chart at `path`, given its files (paths relative to the chart directory).
/// Dependencies must be vendored in `charts/`: nothing is fetched.
pub async fn helm(
    files: &[(String, Vec<u8>)],
    path: &str,
    opts: &HelmRender<'_>,
    bin: &str,
    scratch: &Path,
) -> Result<String> {
    let chart = path.trim_matches('/');
    if !files.iter().any(|(p, _)| p == "Chart.yaml") {
        return Err(Error::Render(format!(
            "no Chart.yaml in {chart:?}: a `type: helm` source's path must be a chart directory"
        )));
    }
    let chart_dir = scratch.join("chart");
    materialize(files, &chart_dir)?;
    let values_file = scratch.join(".flotilla-values.json");
    let values = serde_json::to_vec(opts.values)
        .map_err(|e| Error::Render(format!("encoding the Helm values: {e}")))?;
    std::fs::write(&values_file, values).map_err(|e| Error::io(&values_file, e))?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("template")
        .arg(opts.release)
        .arg(&chart_dir)
        .args(["--namespace", opts.namespace]);
    for f in opts.value_files {
        let file = chart_dir.join(f);
        if !file.is_file() {
            return Err(Error::Render(format!(
                "spec.source.helm.valueFiles: {f:?} is not a file of the chart {chart:?}"
            )));
        }
        cmd.arg("--values").arg(file);
    }
    cmd.arg("--values").arg(&values_file);
    cmd.arg(if opts.skip_crds {
        "--skip-crds"
    } else {
        "--include-crds"
    });
    sealed(&mut cmd, scratch);
    run_capped(
        cmd,
        "helm template",
        "install helm, or set --helm-bin",
        scratch,
    )
    .await
}

/// Renders the variant of a cluster: substitute, parse, patch, normalize.
pub fn variant(
    base: &Base,
    facts: &ClusterFacts,
    customizations: &[Customization],
    allow_empty: bool,
) -> Result<Vec<Value>> {
    let vars: BTreeMap<String, String> = customize::variables(facts, customizations);
    let mut objects = Vec::new();
    for (source, text) in &base.texts {
        // A chart's output is the chart's: Flotilla's placeholders live in its values only.
        let text = match base.chart {
            Some(_) => text.clone(),
            None => customize::substitute(source, text, &vars)
                .map_err(|e| Error::Render(e.to_string()))?,
        };
        let docs =
            manifest::parse_documents(source, &text).map_err(|e| Error::Render(e.to_string()))?;
        // What no sync applies (Helm test hooks, `Skip`) is not part of the bundle: a chart whose
        // test pod has a random name must not make every render a new bundle.
        objects.extend(
            docs.into_iter()
                .map(|m| m.object)
                .filter(|o| hooks::role(o) != hooks::Role::Skipped),
        );
    }
    customize::apply_patches(&mut objects, facts, customizations)
        .map_err(|e| Error::Render(e.to_string()))?;
    if objects.is_empty() && !allow_empty {
        return Err(Error::Render(
            "the source renders no objects (set spec.syncPolicy.allowEmpty to allow an empty app)"
                .into(),
        ));
    }
    Ok(flotilla_bundle::normalize(objects))
}

/// The checks of a base that hold for every cluster: no text nests past the limit (a linear scan,
/// before any parser).
pub fn check_base(base: &Base) -> Result<()> {
    for (source, text) in &base.texts {
        manifest::refuse_deep(source, text).map_err(|e| Error::Render(e.to_string()))?;
    }
    Ok(())
}

/// At most this many objects in one bundle.
pub const MAX_OBJECTS: usize = 10_000;

/// The canonical bytes of a rendered bundle, refused past the object and byte budgets (a source
/// can amplify: a kustomize generator, a patch on every object).
pub fn bounded_bytes(objects: &[Value]) -> Result<Vec<u8>> {
    if objects.len() > MAX_OBJECTS {
        return Err(Error::Render(format!(
            "the bundle has {} objects, over the limit of {MAX_OBJECTS}",
            objects.len()
        )));
    }
    let bytes = flotilla_bundle::canonical_bytes(objects);
    if bytes.len() as u64 > crate::sources::git::MAX_RENDER_BYTES {
        return Err(Error::Render(format!(
            "the bundle is {} bytes, over the limit of {}",
            bytes.len(),
            crate::sources::git::MAX_RENDER_BYTES
        )));
    }
    Ok(bytes)
}

/// The words of a render error, without the `render:` prefix its display adds (the caller adds
/// its own context once).
pub fn reason(e: Error) -> String {
    match e {
        Error::Render(m) => m,
        other => other.to_string(),
    }
}

/// One message for the clusters whose variant failed, out of `targeted`: the error alone when every
/// targeted cluster failed the same way (it does not depend on the cluster), else the first
/// failing cluster's, naming it and how many more failed. `None` when nothing failed.
pub fn summarize_failures(failures: &[(String, String)], targeted: usize) -> Option<String> {
    let (first_cluster, first) = failures.first()?;
    if failures.len() == targeted && failures.iter().all(|(_, why)| why == first) {
        return Some(first.clone());
    }
    let more = match failures.len() - 1 {
        0 => String::new(),
        n => format!(" (and {n} more cluster(s))"),
    };
    Some(format!("cluster {first_cluster}: {first}{more}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_failures_are_reported_once_unless_they_depend_on_the_cluster() {
        let f = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(c, w)| (c.to_string(), w.to_string()))
                .collect()
        };
        assert_eq!(summarize_failures(&[], 3), None);
        let same = f(&[(
            "eu-1",
            "a.yaml line 3: unknown variable ${cluster.lables.x}",
        ); 3]);
        assert_eq!(
            summarize_failures(&same, 3).unwrap(),
            "a.yaml line 3: unknown variable ${cluster.lables.x}"
        );
        let some = f(&[("ap-1", "unknown variable ${cluster.labels.region}")]);
        assert_eq!(
            summarize_failures(&some, 3).unwrap(),
            "cluster ap-1: unknown variable ${cluster.labels.region}"
        );
        let mixed = f(&[("ap-1", "x"), ("ap-2", "y")]);
        assert_eq!(
            summarize_failures(&mixed, 2).unwrap(),
            "cluster ap-1: x (and 1 more cluster(s))"
        );
    }

    #[tokio::test]
    async fn plain_sources_render_per_cluster_and_errors_name_the_file() {
        let files = vec![
            ("a.yaml".to_string(), b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {region: ${cluster.labels.region}}\n".to_vec()),
            ("README.md".to_string(), b"not a manifest".to_vec()),
        ];
        let scratch = tempfile::tempdir().unwrap();
        let base = base(SourceType::Plain, files, "", "kubectl", scratch.path())
            .await
            .unwrap();
        assert_eq!(base.texts.len(), 1);
        let eu = ClusterFacts {
            name: "eu-1".into(),
            labels: [("region".to_string(), "eu".to_string())].into(),
        };
        let out = variant(&base, &eu, &[], false).unwrap();
        assert_eq!(out[0]["data"]["region"], "eu");
        let none = ClusterFacts {
            name: "x".into(),
            labels: BTreeMap::new(),
        };
        let err = variant(&base, &none, &[], false).unwrap_err().to_string();
        assert!(
            err.contains("a.yaml line 4: unknown variable ${cluster.labels.region}"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn what_no_sync_applies_is_not_in_the_bundle() {
        let test_pod = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-test-{name}\n  annotations: {{helm.sh/hook: test}}\nspec: {{containers: [{{name: t, image: busybox}}]}}\n"
            )
        };
        let files = |random: &str| {
            vec![
            ("cm.yaml".to_string(), b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n".to_vec()),
            ("test.yaml".to_string(), test_pod(random).into_bytes()),
            ("skip.yaml".to_string(), b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: s, annotations: {argocd.argoproj.io/hook: Skip}}\n".to_vec()),
            ("pre.yaml".to_string(), b"apiVersion: batch/v1\nkind: Job\nmetadata: {name: m, annotations: {argocd.argoproj.io/hook: PreSync}}\n".to_vec()),
        ]
        };
        let facts = ClusterFacts {
            name: "eu-1".into(),
            labels: BTreeMap::new(),
        };
        let mut digests = BTreeSet::new();
        for random in ["x7k2p", "q9w3e"] {
            let scratch = tempfile::tempdir().unwrap();
            let base = base(
                SourceType::Plain,
                files(random),
                "",
                "kubectl",
                scratch.path(),
            )
            .await
            .unwrap();
            let out = variant(&base, &facts, &[], false).unwrap();
            let names: Vec<&str> = out
                .iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap())
                .collect();
            assert_eq!(
                names,
                ["m", "c"],
                "the PreSync hook stays, tests and Skip go"
            );
            digests.insert(flotilla_bundle::digest(&out));
        }
        assert_eq!(digests.len(), 1, "a random test pod name changes nothing");
    }

    #[test]
    fn a_failed_tool_says_one_bounded_line_without_host_paths() {
        let scratch = Path::new("/var/lib/flotilla/scratch-1234");
        let table = [
            (
                "Traceback (most recent call last):\n  File \"/usr/lib/python3/helm.py\", line 9\nRuntimeError: template: web/templates/x.yaml:3: bad\n",
                "RuntimeError: template: web/templates/x.yaml:3: bad",
            ),
            (
                "walk.go:12 warning\nError: template: web/templates/cm.yaml:4:8: executing \"cm\" at <.Values.x>: nil pointer\nhelm.go:84: [debug] stack\n",
                "Error: template: web/templates/cm.yaml:4:8: executing \"cm\" at <.Values.x>: nil pointer",
            ),
            (
                "error: accumulating resources: /var/lib/flotilla/scratch-1234/base: no such file\n",
                "error: accumulating resources: ./base: no such file",
            ),
            ("", "(nothing on stderr)"),
        ];
        for (stderr, want) in table {
            assert_eq!(tool_failure(stderr, scratch), want);
        }
        let long = format!("Error: {}", "x".repeat(5000));
        assert!(tool_failure(&long, scratch).len() <= TOOL_ERROR_BYTES + 10);
    }
}

//! Kustomize must see only the repository at the rendered revision. It follows paths written in
//! kustomization files (`resources: [../../../../tmp/x]` would pull a host directory into a
//! cluster), so before any build every path those files name is resolved against the repository
//! and refused if it leaves it. Pure: a function of the repository's files.

use serde_json::Value;

use crate::{Error, Result};

const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];

/// Fields that hold a list of paths (or remote URLs, or inline YAML).
const PATH_LISTS: [&str; 10] = [
    "resources",
    "bases",
    "components",
    "crds",
    "configurations",
    "transformers",
    "generators",
    "validators",
    "patchesStrategicMerge",
    "additionalValuesFiles",
];

/// Refuses every kustomization in `files` (repository-relative paths) that names a path outside
/// the repository, naming the file, the field and the path.
pub fn check(files: &[(String, Vec<u8>)]) -> Result<()> {
    for (file, data) in files {
        let name = file.rsplit('/').next().unwrap_or(file);
        if !KUSTOMIZATION_FILES.contains(&name) {
            continue;
        }
        let text = std::str::from_utf8(data)
            .map_err(|_| Error::Render(format!("{file}: not UTF-8 text")))?;
        flotilla_bundle::manifest::refuse_deep(file, text)
            .map_err(|e| Error::Render(e.to_string()))?;
        let doc: Value = serde_yaml_ng::from_str(text)
            .map_err(|e| Error::Render(format!("{file}: invalid YAML: {e}")))?;
        let dir = file.rsplit_once('/').map_or("", |(d, _)| d);
        for (field, path) in named_paths(&doc) {
            if !stays_inside(dir, &path) {
                return Err(Error::Render(format!(
                    "{file}: {field} {path:?} points outside the repository; a render sees only the repository at its revision"
                )));
            }
        }
    }
    Ok(())
}

/// (field, path) of every local path a kustomization names.
fn named_paths(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut push = |field: &str, v: &Value| {
        if let Some(p) = v.as_str() {
            out.push((field.to_string(), p.to_string()));
        }
    };
    for field in PATH_LISTS {
        for v in doc[field].as_array().into_iter().flatten() {
            push(field, v);
        }
    }
    for field in ["patches", "patchesJson6902", "replacements"] {
        for v in doc[field].as_array().into_iter().flatten() {
            push(&format!("{field}[].path"), &v["path"]);
        }
    }
    for field in ["configMapGenerator", "secretGenerator"] {
        for g in doc[field].as_array().into_iter().flatten() {
            for key in ["files", "envs"] {
                for f in g[key].as_array().into_iter().flatten() {
                    // `key=path` or `path`.
                    let path = f.as_str().map(|s| s.split_once('=').map_or(s, |(_, p)| p));
                    push(&format!("{field}[].{key}"), &Value::from(path));
                }
            }
            push(&format!("{field}[].env"), &g["env"]);
        }
    }
    push("openapi.path", &doc["openapi"]["path"]);
    for h in doc["helmCharts"].as_array().into_iter().flatten() {
        push("helmCharts[].valuesFile", &h["valuesFile"]);
        for v in h["additionalValuesFiles"].as_array().into_iter().flatten() {
            push("helmCharts[].additionalValuesFiles", v);
        }
    }
    push("helmGlobals.chartHome", &doc["helmGlobals"]["chartHome"]);
    push("helmGlobals.configHome", &doc["helmGlobals"]["configHome"]);
    out
}

/// Whether `path`, written in a kustomization in directory `dir`, stays inside the repository.
/// Remote references (URLs, which the render cannot reach) and inline YAML are not paths.
fn stays_inside(dir: &str, path: &str) -> bool {
    let path = path.trim();
    if path.contains('\n') {
        return true; // an inline patch or transformer
    }
    if path.starts_with("file:") {
        return false;
    }
    if path.contains("://") || path.starts_with("git@") || path.starts_with("github.com/") {
        return true; // remote: refused by the render's lack of network
    }
    if path.starts_with('/') {
        return false;
    }
    let mut parts: Vec<&str> = dir.split('/').filter(|p| !p.is_empty()).collect();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return false;
                }
            }
            other => parts.push(other),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(k: &str) -> Vec<(String, Vec<u8>)> {
        vec![(
            "overlays/prod/kustomization.yaml".to_string(),
            k.as_bytes().to_vec(),
        )]
    }

    #[test]
    fn paths_must_stay_inside_the_repository() {
        let table = [
            ("resources: [../../base, deploy.yaml]", None),
            (
                "resources: [../../../../../../tmp/x]",
                Some("resources \"../../../../../../tmp/x\""),
            ),
            ("resources: [/etc]", Some("resources \"/etc\"")),
            ("bases: [../../../x]", Some("bases")),
            ("components: [../../../x]", Some("components")),
            (
                "resources: [\"https://github.com/org/repo//base?ref=v1\"]",
                None,
            ),
            (
                "patches: [{path: ../../../../etc/passwd}]",
                Some("patches[].path"),
            ),
            (
                "patchesStrategicMerge: [\"apiVersion: v1\\nkind: X\\n\"]",
                None,
            ),
            (
                "configMapGenerator: [{name: c, files: [k=../../../secret]}]",
                Some("configMapGenerator[].files"),
            ),
            (
                "secretGenerator: [{name: s, envs: [../../../../.env]}]",
                Some("secretGenerator[].envs"),
            ),
            (
                "secretGenerator: [{name: s, env: ../../../x.env}]",
                Some("secretGenerator[].env"),
            ),
            (
                "configMapGenerator: [{name: c, files: [app.properties]}]",
                None,
            ),
            (
                "helmGlobals: {chartHome: ../../../../charts}",
                Some("helmGlobals.chartHome"),
            ),
            ("resources: [\"file:///etc\"]", Some("file:///etc")),
        ];
        for (k, want) in table {
            match (check(&files(k)), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => {
                    let e = e.to_string();
                    assert!(
                        e.contains(w) && e.contains("outside the repository"),
                        "{k}: {e}"
                    );
                    assert!(e.contains("overlays/prod/kustomization.yaml"), "{e}");
                }
                (got, want) => panic!("{k}: got {got:?}, want {want:?}"),
            }
        }
        // Other files are not kustomizations.
        let other = vec![("a/notes.yaml".to_string(), b"resources: [/etc]".to_vec())];
        assert!(check(&other).is_ok());
    }
}

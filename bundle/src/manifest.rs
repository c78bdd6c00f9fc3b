//! Reading a bundle: every .yaml/.yml/.json file under a directory, multi-document, each object
//! checked for the fields every Kubernetes object needs. Errors name the file and document.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::{Error, Result};

/// Nesting deeper than this is refused (Kubernetes objects are rarely deeper than 20).
pub const MAX_DEPTH: usize = 64;

/// Limits that keep a hostile or broken bundle from exhausting the agent.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
const MAX_FILES: usize = 5_000;

/// One object from a bundle, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// `path/to/file.yaml#2` (document index from 1).
    pub source: String,
    pub object: Value,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn bad(source: &str, reason: impl Into<String>) -> Error {
    Error::Manifest {
        origin: source.to_string(),
        reason: reason.into(),
    }
}

/// Loads every manifest under `dir`, in path order.
pub fn load_dir(dir: &Path) -> Result<Vec<Manifest>> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&file).map_err(|e| io(&file, e))?;
        out.extend(parse_documents(&rel, &text)?);
    }
    Ok(out)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io(dir, e))?;
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io(&path, e))?;
        if meta.file_type().is_symlink() {
            // A bundle is data; links could point anywhere on the agent's machine.
            return Err(bad(
                &path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string(),
                "symbolic links are not allowed in a bundle",
            ));
        }
        if meta.is_dir() {
            if !path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                collect_files(root, &path, out)?;
            }
            continue;
        }
        let is_manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        if is_manifest {
            if meta.len() > MAX_FILE_BYTES {
                return Err(bad(
                    &path.display().to_string(),
                    format!("larger than {MAX_FILE_BYTES} bytes"),
                ));
            }
            out.push(path);
            if out.len() > MAX_FILES {
                return Err(bad(
                    &root.display().to_string(),
                    format!("more than {MAX_FILES} manifest files"),
                ));
            }
        }
    }
    Ok(())
}

/// Refuses text that may nest past the limit before any YAML parser sees it (a linear scan; the
/// parser's cost grows faster than linearly with depth). The scan over-estimates, so it allows
/// twice the limit; the exact check runs on the parsed value.
pub fn refuse_deep(name: &str, text: &str) -> Result<()> {
    crate::nesting::check(text, 2 * MAX_DEPTH).map_err(|line| {
        bad(
            &format!("{name} line {line}"),
            format!("nested deeper than {MAX_DEPTH} levels"),
        )
    })
}

/// The line each document of a multi-document YAML text starts on (1-based), from its `---`
/// separators: for messages that point at a document's first line.
fn document_lines(text: &str) -> Vec<usize> {
    let markers: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| *l == "---" || l.starts_with("--- ") || l.starts_with("---\t"))
        .map(|(i, _)| i + 1)
        .collect();
    let first_content = text
        .lines()
        .position(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|i| i + 1);
    let mut starts = Vec::new();
    if first_content.is_some_and(|c| markers.first() != Some(&c)) {
        starts.push(1);
    }
    starts.extend(markers.iter().map(|m| m + 1));
    starts
}

use crate::hooks::{HELM_HOOK_ANNOTATION, HOOK_ANNOTATION};

/// Parses the YAML (or JSON) documents of one file.
pub fn parse_documents(name: &str, text: &str) -> Result<Vec<Manifest>> {
    refuse_deep(name, text)?;
    let mut out = Vec::new();
    let starts = document_lines(text);
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let source = format!("{name}#{}", i + 1);
        // Errors point at the document's first line too; the manifest keeps the short name.
        let at = match starts.get(i) {
            Some(line) => format!("{source} (line {line})"),
            None => source.clone(),
        };
        let value: Value = serde::Deserialize::deserialize(doc)
            .map_err(|e| bad(&at, format!("invalid YAML: {e}")))?;
        if depth(&value) > MAX_DEPTH {
            return Err(bad(&at, format!("nested deeper than {MAX_DEPTH} levels")));
        }
        match value {
            Value::Null => continue,
            Value::Object(_) => {}
            _ => {
                return Err(bad(
                    &at,
                    "a document must be a mapping (a Kubernetes object)",
                ));
            }
        }
        // `kind: List` bundles expand to their items.
        if value["kind"] == "List" && value["items"].is_array() {
            for (j, item) in value["items"].as_array().into_iter().flatten().enumerate() {
                let item_source = format!("{source}/items/{j}");
                check_object(&format!("{at}/items/{j}"), item)?;
                out.push(Manifest {
                    source: item_source,
                    object: item.clone(),
                });
            }
            continue;
        }
        check_object(&at, &value)?;
        out.push(Manifest {
            source,
            object: value,
        });
    }
    Ok(out)
}

fn check_object(source: &str, v: &Value) -> Result<()> {
    let meta = &v["metadata"];
    // Hooks may: each run creates a new object (Argo CD's and Helm's hook annotations).
    let hook = [HOOK_ANNOTATION, HELM_HOOK_ANNOTATION]
        .iter()
        .any(|a| meta["annotations"][*a].is_string());
    if meta["name"].as_str().is_none_or(str::is_empty)
        && meta["generateName"].as_str().is_some_and(|g| !g.is_empty())
        && hook
    {
        for (field, value) in [("apiVersion", &v["apiVersion"]), ("kind", &v["kind"])] {
            if value.as_str().is_none_or(str::is_empty) {
                return Err(bad(source, format!("missing {field}")));
            }
        }
        return Ok(());
    }
    if meta["name"].as_str().is_none_or(str::is_empty)
        && meta["generateName"].as_str().is_some_and(|g| !g.is_empty())
    {
        return Err(bad(
            source,
            "metadata.generateName is only for hooks (argocd.argoproj.io/hook, helm.sh/hook): the \
             server would pick a new name on every apply, so a resource could never be tracked, \
             healed or pruned; give it a metadata.name",
        ));
    }
    for (field, value) in [
        ("apiVersion", &v["apiVersion"]),
        ("kind", &v["kind"]),
        ("metadata.name", &v["metadata"]["name"]),
    ] {
        if value.as_str().is_none_or(str::is_empty) {
            return Err(bad(source, format!("missing {field}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_point_at_the_document_line_and_generate_name_is_refused() {
        let text = "# comment\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Job\nmetadata: {generateName: migrate-}\n";
        let err = parse_documents("hooks.yaml", text).unwrap_err().to_string();
        assert!(
            err.starts_with("hooks.yaml#2 (line 6): metadata.generateName is only for hooks"),
            "{err}"
        );
        let hook = "apiVersion: batch/v1\nkind: Job\nmetadata: {generateName: migrate-, annotations: {argocd.argoproj.io/hook: PreSync}}\n";
        assert_eq!(parse_documents("hook.yaml", hook).unwrap().len(), 1);
        let err = parse_documents("x.yaml", "---\nkind: ConfigMap\n---\nkind: Secret\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x.yaml#1 (line 2): missing apiVersion"),
            "{err}"
        );
        let err = parse_documents(
            "y.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nb: [x\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("at line 6"), "{err}");
        assert_eq!(document_lines("a: 1\n---\nb: 2\n--- \nc: 3\n"), [1, 3, 5]);
    }

    #[test]
    fn multi_document_files_with_errors_that_name_the_document() {
        let ok = parse_documents("a.yaml", "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n").unwrap();
        assert_eq!(
            ok.iter().map(|m| m.source.as_str()).collect::<Vec<_>>(),
            ["a.yaml#1", "a.yaml#3"]
        );
        let err = parse_documents("b.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: Secret\nmetadata: {name: s}\n").unwrap_err();
        assert_eq!(err.to_string(), "b.yaml#2 (line 5): missing apiVersion");
        let err = parse_documents("c.yaml", "a: [unclosed").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("c.yaml#1 (line 1): invalid YAML"),
            "{err}"
        );
    }

    #[test]
    fn yaml_bombs_and_deep_nesting_are_refused() {
        let bomb = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\nh: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]\ni: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]\n";
        let err = parse_documents("bomb.yaml", bomb).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("bomb.yaml#1 (line 1): invalid YAML"),
            "{err}"
        );
        let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
        assert!(parse_documents("deep.yaml", &deep).is_err());
    }

    #[test]
    fn symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.yaml"),
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("b.yaml")).unwrap();
        let err = load_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("symbolic links"), "{err}");
    }
}

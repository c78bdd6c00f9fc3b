//! Per-cluster customization: variables substituted into manifest text (`${cluster.name}`,
//! `${cluster.labels.<key>}`, `${vars.<name>}`; `$${cluster.…}` for a literal; every other `${…}`
//! is the manifest's own and left alone) and merge patches applied
//! to matching objects, from the customizations whose selector matches the cluster.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::selector::LabelSelector;
use crate::{Error, Result};

/// What a cluster is, for rendering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Which objects a patch applies to; unset fields match anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PatchTarget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A JSON merge patch for the objects a target selects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Patch {
    #[serde(default)]
    pub target: PatchTarget,
    pub patch: Value,
}

/// Variables and patches for the clusters a selector matches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Customization {
    #[serde(default)]
    pub selector: LabelSelector,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub variables: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<Patch>,
    /// Helm values for the clusters the selector matches (Helm sources), merged in order over the
    /// source's values; `${cluster.…}` and `${vars.…}` are substituted in them.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub helm_values: Value,
}

/// Indices of the customizations that apply to a cluster, in order.
pub fn matching(facts: &ClusterFacts, customizations: &[Customization]) -> Vec<usize> {
    customizations
        .iter()
        .enumerate()
        .filter(|(_, c)| c.selector.matches(&facts.labels))
        .map(|(i, _)| i)
        .collect()
}

/// The variables a cluster gets; later customizations override earlier ones.
pub fn variables(
    facts: &ClusterFacts,
    customizations: &[Customization],
) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    vars.insert("cluster.name".to_string(), facts.name.clone());
    for (k, v) in &facts.labels {
        vars.insert(format!("cluster.labels.{k}"), v.clone());
    }
    for i in matching(facts, customizations) {
        for (k, v) in &customizations[i].variables {
            vars.insert(format!("vars.{k}"), v.clone());
        }
    }
    vars
}

/// Whether a placeholder name is Flotilla's to substitute. Everything else (`${HOME}`, `${X:-0}`
/// in a shell script, `${var}` in an nginx config) belongs to the manifest and is left verbatim.
fn is_ours(name: &str) -> bool {
    let name = name.trim();
    name.starts_with("cluster.") || name.starts_with("vars.")
}

/// One `${...}` in a text: byte range of the whole placeholder and its (trimmed) name; `escaped`
/// when written `$${...}` (a literal, for our placeholders only).
struct Found<'a> {
    start: usize,
    end: usize,
    name: &'a str,
    escaped: bool,
}

/// Our placeholders in `text`, in order. Unterminated `${` and foreign placeholders are skipped.
fn scan(text: &str) -> Vec<Found<'_>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find("${").map(|i| i + from) {
        let after = i + 2;
        let Some(j) = text[after..].find('}').map(|j| j + after) else {
            break;
        };
        let name = &text[after..j];
        // A foreign placeholder may contain `${` of its own: resume right after its opening.
        if !is_ours(name) || name.contains("${") {
            from = after;
            continue;
        }
        let escaped = i > 0 && text.as_bytes()[i - 1] == b'$';
        out.push(Found {
            start: if escaped { i - 1 } else { i },
            end: j + 1,
            name: name.trim(),
            escaped,
        });
        from = j + 1;
    }
    out
}

/// The 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].bytes().filter(|b| *b == b'\n').count() + 1
}

/// The placeholders `${cluster.…}` / `${vars.…}` a text uses.
pub fn placeholders(text: &str) -> BTreeSet<String> {
    scan(text)
        .into_iter()
        .filter(|f| !f.escaped)
        .map(|f| f.name.to_string())
        .collect()
}

/// Substitutes `${cluster.…}` and `${vars.…}` in `text` (from `source`); any other `${…}` stays
/// exactly as written. An unknown placeholder of ours (a typo such as `${cluster.lables.x}`) is an
/// error naming the file and line.
pub fn substitute(source: &str, text: &str, vars: &BTreeMap<String, String>) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for f in scan(text) {
        out.push_str(&text[at..f.start]);
        at = f.end;
        if f.escaped {
            // `$${cluster.name}` is a literal `${cluster.name}`.
            out.push_str(&text[f.start + 1..f.end]);
            continue;
        }
        let value = vars.get(f.name).ok_or_else(|| Error::Manifest {
            origin: format!("{source} line {}", line_of(text, f.start)),
            reason: format!("unknown variable ${{{}}} (known: cluster.name, cluster.labels.<key>, vars.<name> from customizations)", f.name),
        })?;
        out.push_str(value);
    }
    out.push_str(&text[at..]);
    Ok(out)
}

fn targets(t: &PatchTarget, obj: &Value) -> bool {
    let field = |v: &Value| v.as_str().unwrap_or("").to_string();
    t.kind.as_ref().is_none_or(|k| *k == field(&obj["kind"]))
        && t.name
            .as_ref()
            .is_none_or(|n| *n == field(&obj["metadata"]["name"]))
        && t.namespace
            .as_ref()
            .is_none_or(|n| *n == field(&obj["metadata"]["namespace"]))
}

/// Applies the patches of the customizations that match the cluster. A patch that matches no
/// object is an error: it is almost always a typo that would otherwise silently do nothing.
pub fn apply_patches(
    objects: &mut [Value],
    facts: &ClusterFacts,
    customizations: &[Customization],
) -> Result<()> {
    for i in matching(facts, customizations) {
        for (j, p) in customizations[i].patches.iter().enumerate() {
            let mut hit = false;
            for obj in objects.iter_mut().filter(|o| targets(&p.target, o)) {
                json_patch::merge(obj, &p.patch);
                hit = true;
            }
            if !hit {
                return Err(Error::Customize(format!(
                    "spec.customizations[{i}].patches[{j}]: target {} matches no object in the bundle",
                    serde_json::to_string(&p.target).unwrap_or_default()
                )));
            }
        }
    }
    Ok(())
}

/// The Helm values a cluster gets: `base`, then the `helmValues` of every matching customization in
/// order, deep-merged (maps merge, everything else replaces), with our placeholders substituted.
pub fn helm_values(
    base: &Value,
    facts: &ClusterFacts,
    customizations: &[Customization],
) -> Result<Value> {
    let mut values = if base.is_null() {
        Value::Object(Default::default())
    } else {
        base.clone()
    };
    for i in matching(facts, customizations) {
        deep_merge(&mut values, &customizations[i].helm_values);
    }
    let text = serde_json::to_string(&values).unwrap_or_default();
    let vars = variables(facts, customizations);
    let text = substitute("helm values", &text, &vars)?;
    serde_json::from_str(&text).map_err(|e| Error::Customize(format!(
        "helm values after substitution are not valid (a variable's value must not break the JSON): {e}"
    )))
}

fn deep_merge(target: &mut Value, over: &Value) {
    match (target, over) {
        (Value::Object(t), Value::Object(o)) => {
            for (k, v) in o {
                deep_merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (_, Value::Null) => {}
        (t, o) => *t = o.clone(),
    }
}

/// The inputs that decide a cluster's render, given the placeholders the sources use: clusters with
/// equal keys get identical bundles, so one render serves them all.
pub fn variant_key(
    used: &BTreeSet<String>,
    facts: &ClusterFacts,
    customizations: &[Customization],
) -> String {
    let vars = variables(facts, customizations);
    let used_values: Vec<(&String, Option<&String>)> =
        used.iter().map(|p| (p, vars.get(p))).collect();
    let patching: Vec<usize> = matching(facts, customizations)
        .into_iter()
        .filter(|i| !customizations[*i].patches.is_empty())
        .collect();
    serde_json::json!({"vars": used_values, "patches": patching}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(name: &str, region: &str) -> ClusterFacts {
        ClusterFacts {
            name: name.into(),
            labels: [("region".to_string(), region.to_string())].into(),
        }
    }

    fn customs() -> Vec<Customization> {
        serde_json::from_value(json!([
            {"selector": {"matchLabels": {"region": "eu"}}, "variables": {"replicas": "3"},
             "patches": [{"target": {"kind": "Deployment"}, "patch": {"spec": {"replicas": 3}}}]},
            {"selector": {}, "variables": {"tier": "web"}}
        ]))
        .unwrap()
    }

    #[test]
    fn substitution_uses_cluster_facts_and_matching_variables() {
        let vars = variables(&facts("eu-1", "eu"), &customs());
        let out = substitute("a.yaml", "name: ${cluster.name}-${cluster.labels.region} r=${vars.replicas} t=${ vars.tier } $${cluster.name}", &vars).unwrap();
        assert_eq!(out, "name: eu-1-eu r=3 t=web ${cluster.name}");
        let err = substitute(
            "a.yaml",
            "a: 1\nx: ${vars.replicas}",
            &variables(&facts("us-1", "us"), &customs()),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("a.yaml line 2: unknown variable ${vars.replicas}"),
            "{err}"
        );
    }

    #[test]
    fn only_our_placeholders_are_touched() {
        let vars = variables(&facts("eu-1", "eu"), &customs());
        // Shell, nginx and envsubst text in ConfigMaps arrives exactly as written.
        let verbatim = [
            r#"echo "${HOME:-/root}""#,
            "n=${X:-0}; echo $${PID} ${HOME}",
            "set $x ${ upstream };",
            "unterminated ${HOME",
            "${clusterName} ${variables.x} ${cluster}",
            "nested ${A:-${B}} and ${cluster.name}",
        ];
        let want = [
            r#"echo "${HOME:-/root}""#,
            "n=${X:-0}; echo $${PID} ${HOME}",
            "set $x ${ upstream };",
            "unterminated ${HOME",
            "${clusterName} ${variables.x} ${cluster}",
            "nested ${A:-${B}} and eu-1",
        ];
        for (text, want) in verbatim.iter().zip(want) {
            assert_eq!(substitute("cm.yaml", text, &vars).unwrap(), want, "{text}");
        }
        assert_eq!(
            placeholders("${HOME} ${X:-0} ${cluster.name} $${vars.x}"),
            ["cluster.name".to_string()].into()
        );
        let err = substitute(
            "cm.yaml",
            "a: b\nc: d\nregion: ${cluster.lables.region}\n",
            &vars,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("cm.yaml line 3: unknown variable ${cluster.lables.region}"),
            "{err}"
        );
    }

    #[test]
    fn helm_values_merge_in_order_with_cluster_facts() {
        let c: Vec<Customization> = serde_json::from_value(json!([
            {"selector": {}, "helmValues": {"replicaCount": 1, "image": {"tag": "v1", "repo": "r"}}},
            {"selector": {"matchLabels": {"region": "eu"}}, "helmValues": {"replicaCount": 3, "image": {"tag": "v2"}, "zone": "${cluster.labels.region}-a"}}
        ]))
        .unwrap();
        let base = json!({"replicaCount": 0, "keep": true});
        let eu = helm_values(&base, &facts("eu-1", "eu"), &c).unwrap();
        assert_eq!(
            eu,
            json!({"replicaCount": 3, "keep": true, "image": {"tag": "v2", "repo": "r"}, "zone": "eu-a"})
        );
        let us = helm_values(&base, &facts("us-1", "us"), &c).unwrap();
        assert_eq!(us["replicaCount"], 1);
        let typo: Vec<Customization> = serde_json::from_value(
            json!([{"selector": {}, "helmValues": {"x": "${cluster.lables.x}"}}]),
        )
        .unwrap();
        assert!(helm_values(&base, &facts("eu-1", "eu"), &typo).is_err());
    }

    #[test]
    fn variant_keys_group_alike_clusters() {
        let used: BTreeSet<String> = placeholders("region: ${cluster.labels.region}");
        let c = customs();
        assert_eq!(
            variant_key(&used, &facts("eu-1", "eu"), &c),
            variant_key(&used, &facts("eu-2", "eu"), &c)
        );
        assert_ne!(
            variant_key(&used, &facts("eu-1", "eu"), &c),
            variant_key(&used, &facts("us-1", "us"), &c)
        );
        let by_name = placeholders("n: ${cluster.name}");
        assert_ne!(
            variant_key(&by_name, &facts("eu-1", "eu"), &c),
            variant_key(&by_name, &facts("eu-2", "eu"), &c)
        );
    }

    #[test]
    fn patches_apply_to_matching_objects_and_a_patch_that_hits_nothing_is_an_error() {
        let mut objects = vec![
            json!({"kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 1}}),
        ];
        apply_patches(&mut objects, &facts("eu-1", "eu"), &customs()).unwrap();
        assert_eq!(objects[0]["spec"]["replicas"], 3);
        let mut none = vec![json!({"kind": "ConfigMap", "metadata": {"name": "c"}})];
        let err = apply_patches(&mut none, &facts("eu-1", "eu"), &customs()).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.customizations[0].patches[0]"),
            "{err}"
        );
    }
}

//! What `flotilla app diff` shows: live objects against what a sync would make of them (the
//! server's dry run of the apply), as one bounded unified diff. Pure: the engine fetches both sides.
//!
//! Both sides come from the API server, so defaulted fields appear on both and cancel; what is left
//! to strip is bookkeeping no sync changes (managedFields, resourceVersion, status, ...). Secret
//! values are masked on both sides: a diff says *that* a value changes, never what it is.

use serde_json::Value;

use super::plan::ObjRef;

/// The most diff text an agent reports for one app (the hub's limit is above it).
pub const MAX_DIFF_BYTES: usize = 32 * 1024;

/// Metadata fields the server owns: never part of a difference.
const NOISE_METADATA: &[&str] = &[
    "managedFields",
    "resourceVersion",
    "uid",
    "creationTimestamp",
    "generation",
    "selfLink",
];

/// Annotations controllers and kubectl write for themselves.
const NOISE_ANNOTATIONS: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    "deployment.kubernetes.io/revision",
];

/// One object's two sides; `None` is "does not exist" (to be created, or to be pruned).
pub struct Change<'a> {
    pub object: &'a ObjRef,
    pub live: Option<&'a Value>,
    pub desired: Option<&'a Value>,
}

/// The object without what no sync changes.
pub fn normalize(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = v["metadata"].as_object_mut() {
        for k in NOISE_METADATA {
            meta.remove(*k);
        }
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            for k in NOISE_ANNOTATIONS {
                a.remove(*k);
            }
            if a.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    v
}

/// Masks Secret values on both sides alike: equal values read the same, changed ones differ.
fn mask_secrets(live: &mut Option<Value>, desired: &mut Option<Value>) {
    let is_secret = |v: &Option<Value>| {
        v.as_ref()
            .is_some_and(|v| v["kind"] == "Secret" && v["apiVersion"] == "v1")
    };
    if !is_secret(live) && !is_secret(desired) {
        return;
    }
    for field in ["data", "stringData"] {
        let old = live.as_ref().map(|v| v[field].clone()).unwrap_or_default();
        let new = desired
            .as_ref()
            .map(|v| v[field].clone())
            .unwrap_or_default();
        let mask = |side: &mut Option<Value>, other: &Value, word: &str| {
            let Some(map) = side
                .as_mut()
                .and_then(|v| v.get_mut(field))
                .and_then(Value::as_object_mut)
            else {
                return;
            };
            for (k, value) in map.iter_mut() {
                let same = other.get(k) == Some(&*value);
                *value = Value::String(if same {
                    "(secret value)".into()
                } else {
                    format!("(secret value, {word})")
                });
            }
        };
        mask(live, &new, "before");
        mask(desired, &old, "after");
    }
}

fn yaml(v: Option<&Value>) -> String {
    v.map(|v| serde_yaml_ng::to_string(v).unwrap_or_else(|e| format!("# not printable: {e}\n")))
        .unwrap_or_default()
}

/// The unified diff of one object, `None` when both sides are the same after normalizing.
pub fn object_diff(change: &Change) -> Option<String> {
    let mut live = change.live.map(normalize);
    let mut desired = change.desired.map(normalize);
    if live == desired {
        return None;
    }
    mask_secrets(&mut live, &mut desired);
    let (a, b) = (yaml(live.as_ref()), yaml(desired.as_ref()));
    let name = change.object.to_string();
    let text = similar::TextDiff::from_lines(&a, &b)
        .unified_diff()
        .context_radius(3)
        .header(&format!("live/{name}"), &format!("desired/{name}"))
        .to_string();
    Some(text)
}

/// A diff being assembled, bounded to [`MAX_DIFF_BYTES`]: objects that no longer fit are counted
/// and named at the end instead.
#[derive(Debug, Default)]
pub struct Bounded {
    text: String,
    differing: usize,
    left_out: Vec<String>,
}

impl Bounded {
    pub fn push(&mut self, object: &ObjRef, diff: String) {
        self.differing += 1;
        if self.text.len() + diff.len() <= MAX_DIFF_BYTES {
            self.text.push_str(&diff);
        } else {
            self.left_out.push(object.to_string());
        }
    }

    /// A line that stands for an object's diff (an error computing it, say).
    pub fn note(&mut self, object: &ObjRef, line: &str) {
        self.push(object, format!("# {object}: {line}\n"));
    }

    /// How many objects differ.
    pub fn differing(&self) -> usize {
        self.differing
    }

    pub fn finish(mut self) -> String {
        if !self.left_out.is_empty() {
            let shown: Vec<&str> = self.left_out.iter().take(20).map(String::as_str).collect();
            self.text.push_str(&format!(
                "# {} more object(s) differ; the diff is cut at {} KiB: {}{}\n",
                self.left_out.len(),
                MAX_DIFF_BYTES / 1024,
                shown.join(", "),
                if self.left_out.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cm(data: Value) -> Value {
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "namespace": "d", "resourceVersion": "7", "uid": "u",
                         "managedFields": [{"manager": "x"}], "creationTimestamp": "now",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "data": data,
        })
    }

    fn r(kind: &str) -> ObjRef {
        ObjRef {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: "d".into(),
            name: "c".into(),
        }
    }

    #[test]
    fn only_real_differences_show() {
        let obj = r("ConfigMap");
        let mut other_meta = cm(json!({"k": "v"}));
        other_meta["metadata"]["resourceVersion"] = json!("8");
        other_meta["status"] = json!({"x": 1});
        type Case<'a> = (Option<Value>, Option<Value>, Option<&'a [&'a str]>);
        let table: [Case; 4] = [
            // Bookkeeping only: no diff.
            (Some(cm(json!({"k": "v"}))), Some(other_meta), None),
            // A changed value: both lines, headers naming the object.
            (
                Some(cm(json!({"k": "v"}))),
                Some(cm(json!({"k": "w"}))),
                Some(&[
                    "--- live/ConfigMap d/c",
                    "+++ desired/ConfigMap d/c",
                    "-  k: v",
                    "+  k: w",
                ]),
            ),
            // To be created: every line added.
            (
                None,
                Some(cm(json!({"k": "v"}))),
                Some(&["+kind: ConfigMap", "+  k: v"]),
            ),
            // To be pruned: every line removed.
            (
                Some(cm(json!({"k": "v"}))),
                None,
                Some(&["-kind: ConfigMap"]),
            ),
        ];
        for (i, (live, desired, want)) in table.iter().enumerate() {
            let got = object_diff(&Change {
                object: &obj,
                live: live.as_ref(),
                desired: desired.as_ref(),
            });
            match (want, got) {
                (None, None) => {}
                (Some(lines), Some(text)) => {
                    for l in *lines {
                        assert!(text.lines().any(|t| t == *l), "case {i}: {l:?} in\n{text}");
                    }
                    assert!(!text.contains("resourceVersion"), "case {i}: {text}");
                    assert!(!text.contains("last-applied"), "case {i}: {text}");
                }
                (want, got) => panic!("case {i}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn secret_values_never_show() {
        let secret = |data: Value| json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c"}, "data": data});
        let live = secret(json!({"same": "c2VjcmV0MQ==", "changed": "b2xkLXBhc3N3b3Jk"}));
        let want = secret(
            json!({"same": "c2VjcmV0MQ==", "changed": "bmV3LXBhc3N3b3Jk", "added": "YWRkZWQ="}),
        );
        let text = object_diff(&Change {
            object: &r("Secret"),
            live: Some(&live),
            desired: Some(&want),
        })
        .expect("the secret changed");
        for value in [
            "c2VjcmV0MQ==",
            "b2xkLXBhc3N3b3Jk",
            "bmV3LXBhc3N3b3Jk",
            "YWRkZWQ=",
        ] {
            assert!(!text.contains(value), "{value} leaked:\n{text}");
        }
        assert!(
            text.contains("-  changed: (secret value, before)"),
            "{text}"
        );
        assert!(text.contains("+  changed: (secret value, after)"), "{text}");
        assert!(text.contains("+  added: (secret value, after)"), "{text}");
        assert!(
            !text.contains("+  same"),
            "unchanged values are context: {text}"
        );
    }

    #[test]
    fn a_big_diff_is_cut_and_says_what_it_left_out() {
        let mut b = Bounded::default();
        for i in 0..100 {
            let mut obj = r("ConfigMap");
            obj.name = format!("c{i}");
            b.push(&obj, "x".repeat(1024));
        }
        assert_eq!(b.differing(), 100);
        let text = b.finish();
        assert!(text.len() < MAX_DIFF_BYTES + 2048, "{}", text.len());
        assert!(text.contains("# 68 more object(s) differ"), "{text}");
        assert!(text.contains("ConfigMap d/c32"), "{text}");
    }
}

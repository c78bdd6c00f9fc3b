//! The three patch formats besides apply: JSON patch (RFC 6902), JSON merge patch (RFC 7386), and
//! strategic merge patch for built-in kinds (merge keys, `$patch` and `$deleteFromPrimitiveList`).

use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::ssa::merge_key;

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let patch: json_patch::Patch = serde_json::from_value(patch.clone())
        .map_err(|e| ApiError::bad_request(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(target, &patch).map_err(|e| ApiError::invalid_patch(e.to_string()))
}

/// Applies an RFC 7386 merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Applies a strategic merge patch.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    smp(target, patch);
    Ok(())
}

fn smp(target: &mut Value, patch: &Value) {
    let Value::Object(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if patch_map.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch_map.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return;
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(target_map) = target.as_object_mut() else {
        return;
    };
    for (key, value) in patch_map {
        if key.starts_with("$setElementOrder/") || key == "$retainKeys" || key == "$patch" {
            continue;
        }
        if let Some(list_field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(items)), Value::Array(remove)) =
                (target_map.get_mut(list_field), value)
            {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        match value {
            Value::Null => {
                target_map.remove(key);
            }
            Value::Array(patch_items) => {
                let existing = target_map.get_mut(key);
                match (existing, merge_key(key, patch_items)) {
                    (Some(Value::Array(live)), Some(mk)) => merge_list(live, patch_items, mk),
                    (_, _) => {
                        let cleaned: Vec<Value> = patch_items
                            .iter()
                            .filter(|i| i.get("$patch").is_none())
                            .cloned()
                            .collect();
                        target_map.insert(key.clone(), Value::Array(cleaned));
                    }
                }
            }
            Value::Object(_) => {
                let entry = target_map.entry(key.clone()).or_insert(Value::Null);
                smp(entry, value);
            }
            other => {
                target_map.insert(key.clone(), other.clone());
            }
        }
    }
}

fn merge_list(live: &mut Vec<Value>, patch_items: &[Value], key: &str) {
    for item in patch_items {
        let id = item.get(key);
        let directive = item.get("$patch").and_then(Value::as_str);
        let position = live.iter().position(|l| l.get(key) == id);
        match (directive, position) {
            (Some("delete"), Some(i)) => {
                live.remove(i);
            }
            (Some("delete"), None) => {}
            (_, Some(i)) => smp(&mut live[i], item),
            (_, None) => {
                let mut fresh = Value::Null;
                smp(&mut fresh, item);
                live.push(fresh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn strategic_merge_merges_containers_ports_and_env_by_key() {
        let mut live = json!({"spec": {"containers": [
            {"name": "a", "image": "x:1", "env": [{"name": "E1", "value": "1"}], "ports": [{"containerPort": 80}]},
            {"name": "b", "image": "y:1"}]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "image": "x:2", "env": [{"name": "E2", "value": "2"}], "ports": [{"containerPort": 443}]},
            {"name": "b", "$patch": "delete"}],
            "$setElementOrder/containers": [{"name": "a"}]}});
        strategic_merge(&mut live, &patch).unwrap();
        let c = &live["spec"]["containers"];
        assert_eq!(c.as_array().unwrap().len(), 1);
        assert_eq!(c[0]["image"], "x:2");
        assert_eq!(c[0]["env"].as_array().unwrap().len(), 2);
        assert_eq!(c[0]["ports"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn merge_patch_null_deletes_and_json_patch_tests() {
        let mut v = json!({"a": 1, "b": {"c": 2}});
        merge_patch(&mut v, &json!({"a": null, "b": {"d": 3}}));
        assert_eq!(v, json!({"b": {"c": 2, "d": 3}}));
        json_patch(
            &mut v,
            &json!([{"op": "replace", "path": "/b/c", "value": 5}]),
        )
        .unwrap();
        assert_eq!(v["b"]["c"], 5);
        let err =
            json_patch(&mut v, &json!([{"op": "test", "path": "/b/c", "value": 6}])).unwrap_err();
        assert_eq!(err.code, 422);
    }
}

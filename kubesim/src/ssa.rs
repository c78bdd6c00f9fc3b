//! Server-side apply and field ownership, after the API server's structured-merge-diff.
//!
//! Each manager owns a set of field paths (stored in `metadata.managedFields` as FieldsV1). Applying a
//! configuration: fields the manager set before and no longer sets are removed unless someone else owns
//! them; a field owned by another manager with a different value is a conflict unless `force`, which
//! takes ownership; everything else is merged. Lists of objects are associative when their items carry
//! a merge key (containers and env by `name`, container ports by `containerPort`, service ports by
//! `port`, mounts by `mountPath`, conditions by `type`), `finalizers` is a set, other lists are atomic.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathElement {
    /// An object field.
    Field(String),
    /// An item of an associative list, by its key fields (canonical JSON object).
    Key(String),
    /// An item of a set list, by value (canonical JSON).
    Value(String),
}

pub type Path = Vec<PathElement>;
pub type FieldSet = BTreeSet<Path>;

/// Fields never tracked: identity and server-owned metadata.
fn ignored(path: &[PathElement]) -> bool {
    match path {
        [PathElement::Field(f)] => matches!(f.as_str(), "apiVersion" | "kind"),
        [PathElement::Field(m), PathElement::Field(f), ..] if m == "metadata" => !matches!(
            f.as_str(),
            "labels" | "annotations" | "finalizers" | "ownerReferences"
        ),
        _ => false,
    }
}

/// The merge key of a list of objects under `field`, if it is associative.
pub fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    match list_kind(field, items) {
        ListKind::Map(key) => Some(key),
        _ => None,
    }
}

enum ListKind {
    Map(&'static str),
    Set,
    Atomic,
}

fn list_kind(field: &str, items: &[Value]) -> ListKind {
    if items.is_empty() {
        return ListKind::Atomic;
    }
    if field == "finalizers" && items.iter().all(Value::is_string) {
        return ListKind::Set;
    }
    if !items.iter().all(Value::is_object) {
        return ListKind::Atomic;
    }
    let candidates: &[&'static str] = match field {
        "ports" => &["containerPort", "port"],
        "conditions" => &["type"],
        "volumeMounts" => &["mountPath"],
        "volumeDevices" => &["devicePath"],
        _ => &["name"],
    };
    candidates
        .iter()
        .find(|c| items.iter().all(|i| i.get(**c).is_some()))
        .map_or(ListKind::Atomic, |c| ListKind::Map(c))
}

fn key_of(item: &Value, key: &str) -> String {
    let mut m = Map::new();
    m.insert(
        key.to_string(),
        item.get(key).cloned().unwrap_or(Value::Null),
    );
    Value::Object(m).to_string()
}

/// The leaf paths a configuration sets.
pub fn fields_of(config: &Value, skip_status: bool) -> FieldSet {
    let mut out = FieldSet::new();
    let mut path = Vec::new();
    collect(config, "", &mut path, &mut out);
    out.retain(|p| {
        let status = matches!(p.first(), Some(PathElement::Field(f)) if f == "status");
        let dropped_status = skip_status && status;
        !(ignored(p) || dropped_status)
    });
    out
}

fn collect(value: &Value, field: &str, path: &mut Path, out: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                path.push(PathElement::Field(k.clone()));
                collect(v, k, path, out);
                path.pop();
            }
        }
        Value::Array(items) => match list_kind(field, items) {
            ListKind::Map(key) => {
                for item in items {
                    path.push(PathElement::Key(key_of(item, key)));
                    out.insert(path.clone());
                    collect(item, "", path, out);
                    path.pop();
                }
            }
            ListKind::Set => {
                for item in items {
                    path.push(PathElement::Value(item.to_string()));
                    out.insert(path.clone());
                    path.pop();
                }
            }
            ListKind::Atomic => {
                out.insert(path.clone());
            }
        },
        _ => {
            if !path.is_empty() {
                out.insert(path.clone());
            }
        }
    }
}

/// The value at `path`, if present.
pub fn get<'a>(value: &'a Value, path: &[PathElement]) -> Option<&'a Value> {
    let Some((first, rest)) = path.split_first() else {
        return Some(value);
    };
    let next = match first {
        PathElement::Field(f) => value.get(f)?,
        PathElement::Key(k) => {
            let key: Map<String, Value> = serde_json::from_str(k).ok()?;
            value
                .as_array()?
                .iter()
                .find(|item| key.iter().all(|(kf, kv)| item.get(kf) == Some(kv)))?
        }
        PathElement::Value(v) => {
            let v: Value = serde_json::from_str(v).ok()?;
            value.as_array()?.iter().find(|item| **item == v)?
        }
    };
    get(next, rest)
}

/// Removes the value at `path`; empty parent objects left behind are removed too.
pub fn remove(value: &mut Value, path: &[PathElement]) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        match (first, value) {
            (PathElement::Field(f), Value::Object(map)) => {
                map.remove(f);
            }
            (PathElement::Key(k), Value::Array(items)) => {
                if let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) {
                    items.retain(|item| !key.iter().all(|(kf, kv)| item.get(kf) == Some(kv)));
                }
            }
            (PathElement::Value(v), Value::Array(items)) => {
                if let Ok(v) = serde_json::from_str::<Value>(v) {
                    items.retain(|item| *item != v);
                }
            }
            _ => {}
        }
        return;
    }
    let child = match first {
        PathElement::Field(f) => value.get_mut(f),
        PathElement::Key(k) => {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(k) else {
                return;
            };
            value.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| key.iter().all(|(kf, kv)| item.get(kf) == Some(kv)))
            })
        }
        PathElement::Value(_) => None,
    };
    if let Some(child) = child {
        remove(child, rest);
        let now_empty = child.as_object().is_some_and(Map::is_empty);
        if now_empty && let (PathElement::Field(f), Value::Object(map)) = (first, value) {
            map.remove(f);
        }
    }
}

/// Merges `applied` into `live`: objects field by field, associative lists item by item, the rest replaced.
pub fn merge(live: &mut Value, applied: &Value, field: &str) {
    match (live, applied) {
        (Value::Object(l), Value::Object(a)) => {
            for (k, av) in a {
                match l.get_mut(k) {
                    Some(lv) => merge(lv, av, k),
                    None => {
                        l.insert(k.clone(), av.clone());
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => match list_kind(field, a) {
            ListKind::Map(key) if l.iter().all(|i| i.get(key).is_some()) => {
                for item in a {
                    match l.iter_mut().find(|li| li.get(key) == item.get(key)) {
                        Some(li) => merge(li, item, ""),
                        None => l.push(item.clone()),
                    }
                }
            }
            ListKind::Set => {
                for item in a {
                    if !l.contains(item) {
                        l.push(item.clone());
                    }
                }
            }
            _ => *l = a.clone(),
        },
        (l, a) => *l = a.clone(),
    }
}

/// The field paths whose values differ between `old` and `new` (set in `new`, changed or added).
pub fn changed_fields(old: &Value, new: &Value, skip_status: bool) -> FieldSet {
    fields_of(new, skip_status)
        .into_iter()
        .filter(|p| get(old, p) != get(new, p))
        .collect()
}

/// FieldsV1 encoding of a field set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in set {
        let mut node = &mut root;
        for (i, el) in path.iter().enumerate() {
            let key = match el {
                PathElement::Field(f) => format!("f:{f}"),
                PathElement::Key(k) => format!("k:{k}"),
                PathElement::Value(v) => format!("v:{v}"),
            };
            let Some(map) = node.as_object_mut() else {
                // Nodes are created as objects below, so this never happens.
                break;
            };
            node = map.entry(key).or_insert_with(|| json!({}));
            let is_item = !matches!(el, PathElement::Field(_));
            if is_item && i + 1 == path.len() {
                // An owned list item is marked with ".".
                if let Some(m) = node.as_object_mut()
                    && matches!(el, PathElement::Key(_))
                {
                    m.insert(".".into(), json!({}));
                }
            }
        }
    }
    root
}

/// Decodes FieldsV1 into a field set.
pub fn from_fields_v1(v: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    let mut path = Vec::new();
    decode(v, &mut path, &mut out);
    out
}

fn decode(v: &Value, path: &mut Path, out: &mut FieldSet) {
    let Some(map) = v.as_object() else { return };
    if map.is_empty() && !path.is_empty() {
        out.insert(path.clone());
        return;
    }
    for (k, child) in map {
        if k == "." {
            out.insert(path.clone());
            continue;
        }
        let el = if let Some(f) = k.strip_prefix("f:") {
            PathElement::Field(f.to_string())
        } else if let Some(key) = k.strip_prefix("k:") {
            PathElement::Key(key.to_string())
        } else if let Some(val) = k.strip_prefix("v:") {
            PathElement::Value(val.to_string())
        } else {
            continue;
        };
        path.push(el);
        decode(child, path, out);
        path.pop();
    }
}

/// A manager's entry in `managedFields`.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: FieldSet,
}

/// Reads `metadata.managedFields`.
pub fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| ManagedEntry {
            manager: e["manager"].as_str().unwrap_or_default().to_string(),
            operation: e["operation"].as_str().unwrap_or("Update").to_string(),
            api_version: e["apiVersion"].as_str().unwrap_or_default().to_string(),
            time: e["time"].as_str().unwrap_or_default().to_string(),
            subresource: e["subresource"].as_str().unwrap_or_default().to_string(),
            fields: from_fields_v1(&e["fieldsV1"]),
        })
        .collect()
}

/// Writes `metadata.managedFields`, dropping managers that own nothing.
pub fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = json!({
                "manager": e.manager,
                "operation": e.operation,
                "apiVersion": e.api_version,
                "time": e.time,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&e.fields),
            });
            if !e.subresource.is_empty() {
                v["subresource"] = json!(e.subresource);
            }
            v
        })
        .collect();
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// A field owned by another manager that an apply would change.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    pub manager: String,
    pub path: Path,
}

/// Renders a path the way the API server does in conflict messages: `.spec.replicas`.
pub fn path_string(path: &[PathElement]) -> String {
    path.iter()
        .map(|el| match el {
            PathElement::Field(f) => format!(".{f}"),
            PathElement::Key(k) => format!("[{k}]"),
            PathElement::Value(v) => format!("[={v}]"),
        })
        .collect()
}

/// Where one write came from, for ownership bookkeeping.
pub struct Writer<'a> {
    pub manager: &'a str,
    pub api_version: &'a str,
    pub time: &'a str,
    pub subresource: &'a str,
}

/// Applies `config` for `writer` onto `live` (`None` when the object does not exist yet).
/// Returns the new object, or the conflicts when `force` is false.
pub fn apply(
    live: Option<&Value>,
    config: &Value,
    writer: &Writer<'_>,
    force: bool,
    skip_status: bool,
) -> Result<Value, Vec<Conflict>> {
    let applied = fields_of(config, skip_status);
    let mut object = live.cloned().unwrap_or_else(|| json!({}));
    let mut entries = read_managed(&object);
    let is_mine = |e: &ManagedEntry| {
        e.manager == writer.manager && e.operation == "Apply" && e.subresource == writer.subresource
    };
    let previous: FieldSet = entries
        .iter()
        .find(|e| is_mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();

    let mut conflicts = Vec::new();
    for entry in entries
        .iter()
        .filter(|e| !is_mine(e) && e.subresource == writer.subresource)
    {
        for path in entry.fields.intersection(&applied) {
            let differs = match (get(&object, path), get(config, path)) {
                (Some(live_value), Some(new_value)) => {
                    // Only leaves conflict; containers of owned subfields compare via their leaves.
                    !(live_value.is_object() && new_value.is_object()) && live_value != new_value
                }
                _ => false,
            };
            if differs {
                conflicts.push(Conflict {
                    manager: entry.manager.clone(),
                    path: path.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for conflict in &conflicts {
        for entry in entries.iter_mut().filter(|e| e.manager == conflict.manager) {
            entry.fields.remove(&conflict.path);
        }
    }

    // Fields this manager stopped applying go away unless someone else still owns them.
    let others: FieldSet = entries
        .iter()
        .filter(|e| !is_mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let dropped: Vec<&Path> = previous.difference(&applied).collect();
    // Deepest first, so a removed list item's fields do not resurrect it.
    let mut dropped: Vec<&Path> = dropped
        .into_iter()
        .filter(|p| !others.contains(*p))
        .collect();
    dropped.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in dropped {
        let still_needed = others
            .iter()
            .any(|o| o.starts_with(path) && o.len() > path.len());
        if !still_needed {
            remove(&mut object, path);
        }
    }

    merge(&mut object, config, "");
    let mine = ManagedEntry {
        manager: writer.manager.to_string(),
        operation: "Apply".into(),
        api_version: writer.api_version.to_string(),
        time: writer.time.to_string(),
        subresource: writer.subresource.to_string(),
        fields: applied,
    };
    // Keep the entry's position: reordering managedFields would be a change of its own.
    match entries.iter_mut().find(|e| is_mine(e)) {
        Some(entry) => *entry = mine,
        None => entries.push(mine),
    }
    write_managed(&mut object, &entries);
    Ok(object)
}

/// Records an imperative write (create, update, patch) by `writer`: it takes ownership of every field
/// whose value it changed.
pub fn record_update(old: Option<&Value>, new: &mut Value, writer: &Writer<'_>, skip_status: bool) {
    let changed = match old {
        Some(old) => changed_fields(old, new, skip_status),
        None => fields_of(new, skip_status),
    };
    let mut entries = read_managed(old.unwrap_or(&Value::Null));
    if changed.is_empty() {
        write_managed(new, &entries);
        return;
    }
    for entry in entries
        .iter_mut()
        .filter(|e| e.subresource == writer.subresource)
    {
        entry.fields.retain(|p| !changed.contains(p));
    }
    // Drop ownership of fields that no longer exist.
    for entry in entries.iter_mut() {
        entry.fields.retain(|p| get(new, p).is_some());
    }
    match entries.iter_mut().find(|e| {
        e.manager == writer.manager
            && e.operation == "Update"
            && e.subresource == writer.subresource
    }) {
        Some(entry) => {
            entry.fields.extend(changed);
            entry.time = writer.time.to_string();
        }
        None => entries.push(ManagedEntry {
            manager: writer.manager.to_string(),
            operation: "Update".into(),
            api_version: writer.api_version.to_string(),
            time: writer.time.to_string(),
            subresource: writer.subresource.to_string(),
            fields: changed,
        }),
    }
    write_managed(new, &entries);
}

/// Groups conflicts into the API server's message: `Apply failed with N conflicts: conflict with "m": .spec.x`.
pub fn conflict_message(conflicts: &[Conflict]) -> (String, Vec<Value>) {
    let mut by_manager: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for c in conflicts {
        by_manager
            .entry(&c.manager)
            .or_default()
            .push(path_string(&c.path));
    }
    let parts: Vec<String> = by_manager
        .iter()
        .flat_map(|(m, paths)| {
            paths
                .iter()
                .map(move |p| format!("conflict with \"{m}\": {p}"))
        })
        .collect();
    let noun = if conflicts.len() == 1 {
        "conflict"
    } else {
        "conflicts"
    };
    let causes = conflicts
        .iter()
        .map(|c| {
            json!({"reason": "FieldManagerConflict",
                   "message": format!("conflict with \"{}\"", c.manager),
                   "field": path_string(&c.path)})
        })
        .collect();
    (
        format!(
            "Apply failed with {} {noun}: {}",
            conflicts.len(),
            parts.join("\n")
        ),
        causes,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(manager: &str) -> Writer<'_> {
        Writer {
            manager,
            api_version: "apps/v1",
            time: "2026-01-01T00:00:00Z",
            subresource: "",
        }
    }

    fn deploy(replicas: i64, image: &str, env: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "labels": {"app": "d"}},
               "spec": {"replicas": replicas, "template": {"spec": {"containers": [
                   {"name": "c", "image": image, "env": env}]}}}})
    }

    #[test]
    fn fields_are_tracked_by_merge_keys_and_round_trip_through_fields_v1() {
        let config = deploy(2, "nginx", json!([{"name": "A", "value": "1"}]));
        let set = fields_of(&config, true);
        let encoded = to_fields_v1(&set);
        assert!(encoded["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"c\"}"]["f:image"].is_object());
        assert!(encoded["f:metadata"]["f:labels"]["f:app"].is_object());
        assert!(encoded.get("f:apiVersion").is_none());
        assert_eq!(from_fields_v1(&encoded), set);
    }

    #[test]
    fn reapply_with_a_field_removed_drops_it_and_conflicts_need_force() {
        let first = apply(
            None,
            &deploy(
                2,
                "nginx",
                json!([{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]),
            ),
            &w("agent"),
            false,
            true,
        )
        .unwrap();
        // The agent stops setting env B: it disappears.
        let second = apply(
            Some(&first),
            &deploy(2, "nginx", json!([{"name": "A", "value": "1"}])),
            &w("agent"),
            false,
            true,
        )
        .unwrap();
        let env = &second["spec"]["template"]["spec"]["containers"][0]["env"];
        assert_eq!(env, &json!([{"name": "A", "value": "1"}]));

        // Another manager changes replicas through an update; the agent re-applying 2 conflicts.
        let mut edited = second.clone();
        edited["spec"]["replicas"] = json!(5);
        record_update(Some(&second), &mut edited, &w("kubectl-edit"), true);
        let err = apply(
            Some(&edited),
            &deploy(2, "nginx", json!([{"name": "A", "value": "1"}])),
            &w("agent"),
            false,
            true,
        )
        .unwrap_err();
        assert_eq!(err.len(), 1);
        assert_eq!(path_string(&err[0].path), ".spec.replicas");
        assert_eq!(
            conflict_message(&err).0,
            "Apply failed with 1 conflict: conflict with \"kubectl-edit\": .spec.replicas"
        );
        // Forced: the agent takes the field back.
        let forced = apply(
            Some(&edited),
            &deploy(2, "nginx", json!([{"name": "A", "value": "1"}])),
            &w("agent"),
            true,
            true,
        )
        .unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        let managers: Vec<String> = read_managed(&forced)
            .into_iter()
            .map(|e| e.manager)
            .collect();
        assert_eq!(managers, vec!["agent".to_string()]);
    }

    #[test]
    fn a_field_kept_by_another_manager_survives_when_one_stops_applying_it() {
        let a = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v", "shared": "s"}});
        let b = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"shared": "s"}});
        let one = apply(None, &a, &w("a"), false, false).unwrap();
        let two = apply(Some(&one), &b, &w("b"), false, false).unwrap();
        let three = apply(
            Some(&two),
            &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}),
            &w("a"),
            false,
            false,
        )
        .unwrap();
        assert_eq!(three["data"], json!({"shared": "s"}));
    }

    #[test]
    fn same_value_from_two_managers_is_shared_not_a_conflict() {
        let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"k": "v"}});
        let one = apply(None, &cfg, &w("a"), false, false).unwrap();
        let two = apply(Some(&one), &cfg, &w("b"), false, false).unwrap();
        assert_eq!(read_managed(&two).len(), 2);
    }
}

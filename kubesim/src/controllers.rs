//! What the rest of a control plane would do, simulated like kwok: defaulting and validation on
//! write, and status for workloads, jobs, volumes and load balancers after a delay.
//!
//! Faults: a workload whose pod template carries `kubesim.flotilla.dev/broken: "true"` or runs an
//! image tagged `broken` never becomes available; after the ready delay it reports what a crash-looping
//! rollout reports once its progress deadline passed. A slow one: the annotation
//! `kubesim.flotilla.dev/ready-after: 5s` (on the object) replaces the cluster's ready delay for it.

use base64::Engine;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::meta;

/// The longest `kubesim.flotilla.dev/ready-after` honoured: a typo must not park an object forever.
const MAX_READY_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// The object's own ready delay, from `kubesim.flotilla.dev/ready-after` (a duration, at most
/// 10 minutes); `None` when absent or unreadable, so the cluster's delay applies.
pub fn ready_after(obj: &Value) -> Option<std::time::Duration> {
    let text = obj["metadata"]["annotations"]["kubesim.flotilla.dev/ready-after"].as_str()?;
    humantime::parse_duration(text)
        .ok()
        .map(|d| d.min(MAX_READY_AFTER))
}

/// Kinds (by plural) whose status the simulated controllers maintain.
pub fn watches(plural: &str) -> bool {
    matches!(
        plural,
        "deployments"
            | "statefulsets"
            | "daemonsets"
            | "replicasets"
            | "jobs"
            | "persistentvolumeclaims"
            | "services"
            | "pods"
            | "customresourcedefinitions"
    )
}

/// What a reconcile pass wants written.
#[derive(Default)]
pub struct Outcome {
    pub status: Option<Value>,
    pub spec_patch: Option<Value>,
    pub create: Vec<Value>,
}

fn set_default(obj: &mut Value, path: &[&str], value: Value) {
    let mut node = obj;
    for (i, key) in path.iter().enumerate() {
        if !node.is_object() {
            return;
        }
        if i + 1 == path.len() {
            if node.get(*key).is_none_or(Value::is_null) {
                node[*key] = value;
            }
            return;
        }
        if node.get(*key).is_none_or(Value::is_null) {
            node[*key] = json!({});
        }
        node = &mut node[*key];
    }
}

fn default_pod_spec(spec: &mut Value) {
    set_default(spec, &["restartPolicy"], json!("Always"));
    set_default(spec, &["dnsPolicy"], json!("ClusterFirst"));
    set_default(spec, &["terminationGracePeriodSeconds"], json!(30));
    set_default(spec, &["schedulerName"], json!("default-scheduler"));
    set_default(spec, &["securityContext"], json!({}));
    for list in ["containers", "initContainers"] {
        if let Some(containers) = spec[list].as_array_mut() {
            for c in containers {
                let latest = c["image"]
                    .as_str()
                    .is_some_and(|i| !i.contains(':') || i.ends_with(":latest"));
                set_default(
                    c,
                    &["imagePullPolicy"],
                    json!(if latest { "Always" } else { "IfNotPresent" }),
                );
                set_default(
                    c,
                    &["terminationMessagePath"],
                    json!("/dev/termination-log"),
                );
                set_default(c, &["terminationMessagePolicy"], json!("File"));
                if let Some(ports) = c["ports"].as_array_mut() {
                    for p in ports {
                        set_default(p, &["protocol"], json!("TCP"));
                    }
                }
            }
        }
    }
}

/// Fills in what the API server defaults.
pub fn default_object(kind: &str, obj: &mut Value, rv: u64) {
    match kind {
        "Namespace" => {
            let name = obj["metadata"]["name"].clone();
            set_default(
                obj,
                &["metadata", "labels", "kubernetes.io/metadata.name"],
                name,
            );
            set_default(obj, &["spec", "finalizers"], json!(["kubernetes"]));
            if obj["metadata"]["deletionTimestamp"].is_null() {
                obj["status"] = json!({"phase": "Active"});
            }
        }
        "Deployment" => {
            set_default(obj, &["spec", "replicas"], json!(1));
            set_default(obj, &["spec", "revisionHistoryLimit"], json!(10));
            set_default(obj, &["spec", "progressDeadlineSeconds"], json!(600));
            set_default(
                obj,
                &["spec", "strategy"],
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}}),
            );
            default_pod_spec(&mut obj["spec"]["template"]["spec"]);
        }
        "StatefulSet" => {
            set_default(obj, &["spec", "replicas"], json!(1));
            set_default(obj, &["spec", "podManagementPolicy"], json!("OrderedReady"));
            set_default(obj, &["spec", "revisionHistoryLimit"], json!(10));
            set_default(
                obj,
                &["spec", "updateStrategy"],
                json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
            );
            default_pod_spec(&mut obj["spec"]["template"]["spec"]);
        }
        "DaemonSet" => {
            set_default(obj, &["spec", "revisionHistoryLimit"], json!(10));
            set_default(
                obj,
                &["spec", "updateStrategy"],
                json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
            );
            default_pod_spec(&mut obj["spec"]["template"]["spec"]);
        }
        "ReplicaSet" => {
            set_default(obj, &["spec", "replicas"], json!(1));
            default_pod_spec(&mut obj["spec"]["template"]["spec"]);
        }
        "Job" => {
            set_default(obj, &["spec", "completions"], json!(1));
            set_default(obj, &["spec", "parallelism"], json!(1));
            set_default(obj, &["spec", "backoffLimit"], json!(6));
            set_default(obj, &["spec", "completionMode"], json!("NonIndexed"));
            if obj["spec"]["template"]["spec"]["restartPolicy"].is_null() {
                obj["spec"]["template"]["spec"]["restartPolicy"] = json!("Never");
            }
            default_pod_spec(&mut obj["spec"]["template"]["spec"]);
        }
        "CronJob" => {
            set_default(obj, &["spec", "concurrencyPolicy"], json!("Allow"));
            set_default(obj, &["spec", "suspend"], json!(false));
            set_default(obj, &["spec", "successfulJobsHistoryLimit"], json!(3));
            set_default(obj, &["spec", "failedJobsHistoryLimit"], json!(1));
        }
        "Pod" => default_pod_spec(&mut obj["spec"]),
        "Service" => {
            set_default(obj, &["spec", "type"], json!("ClusterIP"));
            set_default(obj, &["spec", "sessionAffinity"], json!("None"));
            let headless = obj["spec"]["clusterIP"].as_str() == Some("None");
            if !headless && obj["spec"]["type"].as_str() != Some("ExternalName") {
                // Derived from the resourceVersion: unique within the cluster, stable for the object.
                let ip = format!("10.96.{}.{}", (rv / 250) % 250, rv % 250 + 1);
                set_default(obj, &["spec", "clusterIP"], json!(ip));
                let ip = obj["spec"]["clusterIP"].clone();
                set_default(obj, &["spec", "clusterIPs"], json!([ip]));
            }
            set_default(obj, &["spec", "ipFamilies"], json!(["IPv4"]));
            set_default(obj, &["spec", "ipFamilyPolicy"], json!("SingleStack"));
            set_default(obj, &["spec", "internalTrafficPolicy"], json!("Cluster"));
            if let Some(ports) = obj["spec"]["ports"].as_array_mut() {
                for p in ports {
                    set_default(p, &["protocol"], json!("TCP"));
                    let port = p["port"].clone();
                    set_default(p, &["targetPort"], port);
                }
            }
            set_default(obj, &["status", "loadBalancer"], json!({}));
        }
        "Secret" => {
            set_default(obj, &["type"], json!("Opaque"));
            if let Some(string_data) = obj.get("stringData").and_then(Value::as_object).cloned() {
                for (k, v) in string_data {
                    let encoded = base64::engine::general_purpose::STANDARD
                        .encode(v.as_str().unwrap_or_default());
                    obj["data"][k] = json!(encoded);
                }
                if let Some(m) = obj.as_object_mut() {
                    m.remove("stringData");
                }
            }
        }
        "PersistentVolumeClaim" => {
            set_default(obj, &["spec", "volumeMode"], json!("Filesystem"));
            set_default(obj, &["status", "phase"], json!("Pending"));
        }
        _ => {}
    }
}

fn invalid(kind: &str, obj: &Value, field: &str, message: &str) -> ApiError {
    ApiError::invalid(
        kind,
        obj["metadata"]["name"].as_str().unwrap_or(""),
        vec![(field.into(), message.into())],
    )
}

fn check_containers(kind: &str, obj: &Value, path: &str, spec: &Value) -> Result<(), ApiError> {
    let containers = spec["containers"].as_array().filter(|c| !c.is_empty());
    let Some(containers) = containers else {
        return Err(invalid(
            kind,
            obj,
            &format!("{path}.containers"),
            "Required value",
        ));
    };
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in containers.iter().enumerate() {
        for (which, quantities) in [
            ("limits", &c["resources"]["limits"]),
            ("requests", &c["resources"]["requests"]),
        ] {
            for (resource, q) in quantities.as_object().into_iter().flatten() {
                let text = q
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| q.to_string());
                if !is_quantity(&text) {
                    return Err(invalid(
                        kind,
                        obj,
                        &format!("{path}.containers[{i}].resources.{which}[{resource}]"),
                        &format!(
                            "Invalid value: \"{text}\": quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
                        ),
                    ));
                }
            }
        }
        if let Some(name) = c["name"].as_str()
            && !name.is_empty()
            && !names.insert(name)
        {
            return Err(invalid(
                kind,
                obj,
                &format!("{path}.containers[{i}].name"),
                &format!("Duplicate value: \"{name}\""),
            ));
        }
        if c["name"].as_str().is_none_or(str::is_empty) {
            return Err(invalid(
                kind,
                obj,
                &format!("{path}.containers[{i}].name"),
                "Required value",
            ));
        }
        if c["image"].as_str().is_none_or(str::is_empty) {
            return Err(invalid(
                kind,
                obj,
                &format!("{path}.containers[{i}].image"),
                "Required value",
            ));
        }
    }
    Ok(())
}

/// Whether `text` is a Kubernetes quantity: a signed decimal number and an optional suffix — binary
/// (Ki … Ei), decimal SI (n, u, m, k, M … E) or a decimal exponent (e3, E-2).
fn is_quantity(text: &str) -> bool {
    let s = text.strip_prefix(['+', '-']).unwrap_or(text);
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = match suffix {
        "" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" | "n" | "u" | "m" | "k" | "M" | "G" | "T"
        | "P" | "E" => true,
        exp => exp
            .strip_prefix(['e', 'E'])
            .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
            .is_some_and(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit())),
    };
    number_ok && suffix_ok
}

/// Service ports as the API server checks them: names required when there are several, unique
/// names, node ports only on NodePort/LoadBalancer Services, in 30000-32767, unique.
fn check_service_ports(obj: &Value) -> Result<(), ApiError> {
    let kind = "Service";
    let ports: Vec<&Value> = obj["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let node_ports_allowed = matches!(
        obj["spec"]["type"].as_str(),
        Some("NodePort" | "LoadBalancer")
    );
    let mut names = std::collections::BTreeSet::new();
    let mut node_ports = std::collections::BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let name = p["name"].as_str().unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            return Err(invalid(
                kind,
                obj,
                &format!("spec.ports[{i}].name"),
                "Required value",
            ));
        }
        if !name.is_empty() && !names.insert(name) {
            return Err(invalid(
                kind,
                obj,
                &format!("spec.ports[{i}].name"),
                &format!("Duplicate value: \"{name}\""),
            ));
        }
        if let Some(np) = p["nodePort"].as_i64().filter(|n| *n != 0) {
            let at = format!("spec.ports[{i}].nodePort");
            if !node_ports_allowed {
                let t = obj["spec"]["type"].as_str().unwrap_or("ClusterIP");
                return Err(invalid(
                    kind,
                    obj,
                    &at,
                    &format!("Forbidden: may not be used when `type` is '{t}'"),
                ));
            }
            if !(30000..=32767).contains(&np) {
                return Err(invalid(
                    kind,
                    obj,
                    &at,
                    &format!(
                        "Invalid value: {np}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                    ),
                ));
            }
            let protocol = p["protocol"].as_str().unwrap_or("TCP");
            if !node_ports.insert((np, protocol)) {
                return Err(invalid(kind, obj, &at, &format!("Duplicate value: {np}")));
            }
        }
    }
    Ok(())
}

/// `spec.<field>` may not change once set (422 Invalid, "field is immutable").
fn immutable(kind: &str, old: Option<&Value>, obj: &Value, field: &str) -> Result<(), ApiError> {
    match old {
        Some(old) if old["spec"][field] != obj["spec"][field] => Err(invalid(
            kind,
            obj,
            &format!("spec.{field}"),
            &format!("Invalid value: {}: field is immutable", obj["spec"][field]),
        )),
        _ => Ok(()),
    }
}

/// Validation and immutable fields, as the API server enforces them (422 Invalid).
pub fn validate(kind: &str, old: Option<&Value>, obj: &Value) -> Result<(), ApiError> {
    match kind {
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" => {
            let selector = &obj["spec"]["selector"];
            if !selector.is_object() {
                return Err(invalid(kind, obj, "spec.selector", "Required value"));
            }
            let labels = &obj["spec"]["template"]["metadata"]["labels"];
            if let Some(want) = selector["matchLabels"].as_object() {
                for (k, v) in want {
                    if labels.get(k) != Some(v) {
                        return Err(invalid(
                            kind,
                            obj,
                            "spec.template.metadata.labels",
                            &format!(
                                "Invalid value: {labels}: `selector` does not match template `labels`"
                            ),
                        ));
                    }
                }
            }
            check_containers(
                kind,
                obj,
                "spec.template.spec",
                &obj["spec"]["template"]["spec"],
            )?;
            immutable(kind, old, obj, "selector")?;
        }
        "Job" => {
            check_containers(
                kind,
                obj,
                "spec.template.spec",
                &obj["spec"]["template"]["spec"],
            )?;
            immutable(kind, old, obj, "template")?;
        }
        "Pod" => check_containers(kind, obj, "spec", &obj["spec"])?,
        "Service" => {
            // Unset on the old object means "not allocated yet", not "fixed to nothing".
            if old.is_some_and(|o| !o["spec"]["clusterIP"].is_null()) {
                immutable(kind, old, obj, "clusterIP")?;
            }
            check_service_ports(obj)?;
            for (i, p) in obj["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                if !p["port"].is_i64() {
                    return Err(invalid(
                        kind,
                        obj,
                        &format!("spec.ports[{i}].port"),
                        "Required value",
                    ));
                }
            }
        }
        "ConfigMap" | "Secret" => {
            for (k, v) in obj["data"].as_object().into_iter().flatten() {
                if !v.is_string() {
                    return Err(invalid(
                        kind,
                        obj,
                        &format!("data[{k}]"),
                        "Invalid value: must be a string",
                    ));
                }
            }
            if let Some(old) = old
                && old["immutable"] == json!(true)
                && (old["data"] != obj["data"] || old["binaryData"] != obj["binaryData"])
            {
                return Err(invalid(
                    kind,
                    obj,
                    "data",
                    "Forbidden: field is immutable when `immutable` is set",
                ));
            }
        }
        "CustomResourceDefinition" => {
            let spec = &obj["spec"];
            for (field, value) in [
                ("spec.group", &spec["group"]),
                ("spec.names.kind", &spec["names"]["kind"]),
                ("spec.names.plural", &spec["names"]["plural"]),
            ] {
                if value.as_str().is_none_or(str::is_empty) {
                    return Err(invalid(kind, obj, field, "Required value"));
                }
            }
            let expected = format!(
                "{}.{}",
                spec["names"]["plural"].as_str().unwrap_or(""),
                spec["group"].as_str().unwrap_or("")
            );
            if obj["metadata"]["name"].as_str() != Some(expected.as_str()) {
                return Err(invalid(
                    kind,
                    obj,
                    "metadata.name",
                    &format!(
                        "Invalid value: must be spec.names.plural+\".\"+spec.group ({expected})"
                    ),
                ));
            }
            if spec["versions"].as_array().is_none_or(Vec::is_empty) {
                return Err(invalid(kind, obj, "spec.versions", "Required value"));
            }
        }
        _ => {}
    }
    Ok(())
}

fn broken(template: &Value) -> bool {
    let annotated =
        template["metadata"]["annotations"]["kubesim.flotilla.dev/broken"].as_str() == Some("true");
    let image = template["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["image"].as_str().is_some_and(|i| i.ends_with(":broken")));
    annotated || image
}

fn condition(kind: &str, status: bool, reason: &str, message: &str, now: &str) -> Value {
    json!({"type": kind, "status": if status { "True" } else { "False" }, "reason": reason, "message": message,
           "lastUpdateTime": now, "lastTransitionTime": now})
}

/// The status the controllers would write for `obj` now; `ready` is whether its ready delay passed.
pub fn reconcile(plural: &str, obj: &Value, ready: bool) -> Outcome {
    let now = meta::now();
    let generation = obj["metadata"]["generation"].clone();
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    let replicas = obj["spec"]["replicas"].as_i64().unwrap_or(1);
    let template = &obj["spec"]["template"];
    let is_broken = broken(template);
    // Keep a condition's transition time when its status did not change.
    let keep = |mut fresh: Value| -> Value {
        let old = obj["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == fresh["type"]).cloned());
        if let Some(old) = old
            && old["status"] == fresh["status"]
        {
            fresh["lastTransitionTime"] = old["lastTransitionTime"].clone();
        }
        fresh
    };
    let mut out = Outcome::default();
    match plural {
        "deployments" => {
            let rs = format!("{name}-{}", obj["metadata"]["generation"]);
            let (available, progressing) = match (ready, is_broken) {
                (false, _) => (
                    condition(
                        "Available",
                        false,
                        "MinimumReplicasUnavailable",
                        "Deployment does not have minimum availability.",
                        &now,
                    ),
                    condition(
                        "Progressing",
                        true,
                        "ReplicaSetUpdated",
                        &format!("ReplicaSet \"{name}\" is progressing."),
                        &now,
                    ),
                ),
                (true, true) => (
                    condition(
                        "Available",
                        false,
                        "MinimumReplicasUnavailable",
                        "Deployment does not have minimum availability.",
                        &now,
                    ),
                    condition(
                        "Progressing",
                        false,
                        "ProgressDeadlineExceeded",
                        &format!(
                            "ReplicaSet \"{rs}\" has timed out progressing: containers are in CrashLoopBackOff"
                        ),
                        &now,
                    ),
                ),
                (true, false) => (
                    condition(
                        "Available",
                        true,
                        "MinimumReplicasAvailable",
                        "Deployment has minimum availability.",
                        &now,
                    ),
                    condition(
                        "Progressing",
                        true,
                        "NewReplicaSetAvailable",
                        &format!("ReplicaSet \"{name}\" has successfully progressed."),
                        &now,
                    ),
                ),
            };
            let ready_count = if ready && !is_broken { replicas } else { 0 };
            let mut status = json!({"observedGeneration": generation, "replicas": replicas,
                "updatedReplicas": if ready { replicas } else { 0 },
                "conditions": [keep(available), keep(progressing)]});
            if ready_count > 0 {
                status["readyReplicas"] = json!(ready_count);
                status["availableReplicas"] = json!(ready_count);
            } else if replicas > 0 {
                status["unavailableReplicas"] = json!(replicas);
            }
            out.status = Some(status);
        }
        "statefulsets" | "replicasets" => {
            let ready_count = if ready && !is_broken { replicas } else { 0 };
            let mut status = json!({"observedGeneration": generation, "replicas": replicas});
            if plural == "statefulsets" {
                let revision = format!("{name}-{}", obj["metadata"]["generation"]);
                status["currentReplicas"] = json!(if ready { replicas } else { 0 });
                status["updatedReplicas"] = json!(if ready { replicas } else { 0 });
                status["currentRevision"] = json!(revision);
                status["updateRevision"] = json!(revision);
                status["collisionCount"] = json!(0);
                for tpl in obj["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    for i in 0..replicas {
                        let mut pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": format!("{}-{name}-{i}", tpl["metadata"]["name"].as_str().unwrap_or("data")),
                                         "namespace": obj["metadata"]["namespace"],
                                         "labels": template["metadata"]["labels"]},
                            "spec": tpl["spec"]});
                        if pvc["metadata"]["labels"].is_null() {
                            pvc["metadata"]["labels"] = json!({});
                        }
                        out.create.push(pvc);
                    }
                }
            } else {
                status["fullyLabeledReplicas"] = json!(replicas);
            }
            if ready_count > 0 {
                status["readyReplicas"] = json!(ready_count);
                status["availableReplicas"] = json!(ready_count);
            }
            out.status = Some(status);
        }
        "daemonsets" => {
            // One simulated node.
            let ready_count = i64::from(ready && !is_broken);
            let mut status = json!({"observedGeneration": generation, "desiredNumberScheduled": 1,
                "currentNumberScheduled": 1, "numberMisscheduled": 0, "numberReady": ready_count,
                "updatedNumberScheduled": i64::from(ready)});
            if ready_count > 0 {
                status["numberAvailable"] = json!(1);
            } else {
                status["numberUnavailable"] = json!(1);
            }
            out.status = Some(status);
        }
        "jobs" => {
            let start = obj["status"]["startTime"]
                .as_str()
                .map_or_else(|| now.clone(), str::to_string);
            let mut status = json!({"startTime": start, "active": 1, "ready": 0, "terminating": 0});
            if ready {
                let completions = obj["spec"]["completions"].as_i64().unwrap_or(1);
                if is_broken {
                    let failed = obj["spec"]["backoffLimit"].as_i64().unwrap_or(6) + 1;
                    status = json!({"startTime": start, "failed": failed, "ready": 0, "terminating": 0,
                        "conditions": [
                            condition("FailureTarget", true, "BackoffLimitExceeded", "Job has reached the specified backoff limit", &now),
                            condition("Failed", true, "BackoffLimitExceeded", "Job has reached the specified backoff limit", &now)]});
                } else {
                    status = json!({"startTime": start, "succeeded": completions, "ready": 0, "terminating": 0,
                        "completionTime": now,
                        "conditions": [
                            condition("SuccessCriteriaMet", true, "CompletionsReached", "Reached expected number of succeeded pods", &now),
                            condition("Complete", true, "CompletionsReached", "Reached expected number of succeeded pods", &now)]});
                }
            }
            if obj["status"].get("completionTime").is_some()
                || obj["status"].get("failed").is_some()
            {
                return out;
            }
            out.status = Some(status);
        }
        "persistentvolumeclaims" if ready => {
            let volume = format!("pvc-{}", obj["metadata"]["uid"].as_str().unwrap_or(""));
            let storage = obj["spec"]["resources"]["requests"]["storage"].clone();
            out.status = Some(
                json!({"phase": "Bound", "accessModes": obj["spec"]["accessModes"], "capacity": {"storage": storage}}),
            );
            if obj["spec"]["volumeName"].is_null() {
                out.spec_patch = Some(json!({"spec": {"volumeName": volume}}));
            }
        }
        "services" if ready && obj["spec"]["type"].as_str() == Some("LoadBalancer") => {
            let ip = obj["spec"]["clusterIP"]
                .as_str()
                .unwrap_or("10.96.0.1")
                .replacen("10.96.", "172.18.", 1);
            out.status = Some(json!({"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}));
        }
        "customresourcedefinitions" => {
            // Names are accepted and the API established at once, as on a real server in practice.
            let names = obj["spec"]["names"].clone();
            let stored: Vec<Value> = obj["spec"]["versions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|v| v["storage"].as_bool() == Some(true))
                .map(|v| v["name"].clone())
                .collect();
            out.status = Some(json!({
                "acceptedNames": names,
                "storedVersions": stored,
                "conditions": [
                    keep(json!({"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now})),
                    keep(json!({"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now}))]
            }));
        }
        "pods" => {
            let phase = if ready && !is_broken_pod(obj) {
                "Running"
            } else {
                "Pending"
            };
            let ready_cond = json!({"type": "Ready", "status": if phase == "Running" { "True" } else { "False" }, "lastTransitionTime": now});
            out.status = Some(
                json!({"phase": phase, "conditions": [keep(ready_cond)], "podIP": "10.244.0.10", "hostIP": "172.18.0.2"}),
            );
        }
        _ => {}
    }
    out
}

fn is_broken_pod(pod: &Value) -> bool {
    broken(&json!({"metadata": pod["metadata"], "spec": pod["spec"]}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(image: &str) -> Value {
        json!({"metadata": {"name": "web", "generation": 2},
               "spec": {"replicas": 3, "template": {"metadata": {"labels": {"app": "web"}},
                        "spec": {"containers": [{"name": "c", "image": image}]}}}})
    }

    #[test]
    fn an_object_may_name_its_own_ready_delay_within_bounds() {
        let with =
            |v: &str| json!({"metadata": {"annotations": {"kubesim.flotilla.dev/ready-after": v}}});
        use std::time::Duration;
        assert_eq!(ready_after(&with("3s")), Some(Duration::from_secs(3)));
        assert_eq!(ready_after(&with("2h")), Some(MAX_READY_AFTER));
        assert_eq!(ready_after(&with("soon")), None);
        assert_eq!(ready_after(&json!({"metadata": {}})), None);
    }

    #[test]
    fn deployments_become_available_after_the_delay_unless_broken() {
        let table = [
            ("nginx:1", false, "False", Value::Null),
            ("nginx:1", true, "True", json!(3)),
            ("nginx:broken", true, "False", Value::Null),
        ];
        for (image, ready, available, ready_replicas) in table {
            let status = reconcile("deployments", &deployment(image), ready)
                .status
                .unwrap();
            assert_eq!(status["observedGeneration"], 2);
            assert_eq!(
                status["conditions"][0]["status"], available,
                "{image} ready={ready}"
            );
            assert_eq!(
                status["readyReplicas"], ready_replicas,
                "{image} ready={ready}"
            );
        }
        let broken = reconcile("deployments", &deployment("nginx:broken"), true)
            .status
            .unwrap();
        assert_eq!(
            broken["conditions"][1]["reason"],
            "ProgressDeadlineExceeded"
        );
    }

    #[test]
    fn validation_rejects_selector_changes_and_mismatched_templates() {
        let mut d = deployment("x:1");
        d["spec"]["selector"] = json!({"matchLabels": {"app": "web"}});
        assert!(validate("Deployment", None, &d).is_ok());
        let mut changed = d.clone();
        changed["spec"]["selector"] = json!({"matchLabels": {"app": "other"}});
        changed["spec"]["template"]["metadata"]["labels"] = json!({"app": "other"});
        let err = validate("Deployment", Some(&d), &changed).unwrap_err();
        assert_eq!(err.code, 422);
        assert!(
            err.message.contains("field is immutable"),
            "{}",
            err.message
        );
        let mut mismatch = d.clone();
        mismatch["spec"]["template"]["metadata"]["labels"] = json!({"app": "x"});
        assert!(validate("Deployment", None, &mismatch).is_err());
    }
}

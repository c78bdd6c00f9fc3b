//! Health of objects and of an app, judged from live objects alone (pure).

use serde_json::Value;

pub use flotilla_proto::v1::HealthStatus;

use super::plan::ObjRef;

/// A health verdict with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub state: HealthStatus,
    pub message: String,
}

impl Health {
    pub fn healthy() -> Self {
        Self {
            state: HealthStatus::Healthy,
            message: String::new(),
        }
    }
    fn progressing(m: impl Into<String>) -> Self {
        Self {
            state: HealthStatus::Progressing,
            message: m.into(),
        }
    }
    pub fn degraded(m: impl Into<String>) -> Self {
        Self {
            state: HealthStatus::Degraded,
            message: m.into(),
        }
    }
}

fn int(v: &Value) -> i64 {
    v.as_i64().unwrap_or(0)
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn observed(obj: &Value) -> bool {
    let generation = obj["metadata"]["generation"].as_i64();
    let observed = obj["status"]["observedGeneration"].as_i64();
    match (generation, observed) {
        (Some(g), Some(o)) => o >= g,
        (Some(_), None) => false,
        _ => true,
    }
}

/// Health of one live object (`None` = it does not exist).
pub fn assess(live: Option<&Value>) -> Health {
    let Some(obj) = live else {
        return Health {
            state: HealthStatus::Missing,
            message: "not found in the cluster".into(),
        };
    };
    if !obj["metadata"]["deletionTimestamp"].is_null() {
        return Health::progressing("being deleted");
    }
    let kind = obj["kind"].as_str().unwrap_or("");
    let group = obj["apiVersion"]
        .as_str()
        .and_then(|a| a.rsplit_once('/'))
        .map_or("", |(g, _)| g);
    let status = &obj["status"];
    match (group, kind) {
        ("apps", "Deployment") => {
            if let Some(p) = condition(obj, "Progressing")
                && p["reason"] == "ProgressDeadlineExceeded"
            {
                return Health::degraded(format!(
                    "ProgressDeadlineExceeded: {}",
                    p["message"].as_str().unwrap_or("")
                ));
            }
            if !observed(obj) {
                return Health::progressing(
                    "waiting for the controller to observe the new generation",
                );
            }
            let want = obj["spec"]["replicas"].as_i64().unwrap_or(1);
            let (updated, available) = (
                int(&status["updatedReplicas"]),
                int(&status["availableReplicas"]),
            );
            if updated < want || available < want || int(&status["replicas"]) > want {
                return Health::progressing(format!(
                    "{available} of {want} replicas available, {updated} updated"
                ));
            }
            Health::healthy()
        }
        ("apps", "StatefulSet") => {
            if !observed(obj) {
                return Health::progressing(
                    "waiting for the controller to observe the new generation",
                );
            }
            let want = obj["spec"]["replicas"].as_i64().unwrap_or(1);
            let ready = int(&status["readyReplicas"]);
            if ready < want {
                return Health::progressing(format!("{ready} of {want} replicas ready"));
            }
            if status["updateRevision"].is_string()
                && status["currentRevision"] != status["updateRevision"]
            {
                return Health::progressing("rolling out a new revision");
            }
            Health::healthy()
        }
        ("apps", "DaemonSet") => {
            if !observed(obj) {
                return Health::progressing(
                    "waiting for the controller to observe the new generation",
                );
            }
            let desired = int(&status["desiredNumberScheduled"]);
            let (available, updated) = (
                int(&status["numberAvailable"]),
                int(&status["updatedNumberScheduled"]),
            );
            if available < desired || updated < desired {
                return Health::progressing(format!("{available} of {desired} pods available"));
            }
            Health::healthy()
        }
        ("apps", "ReplicaSet") => {
            let want = obj["spec"]["replicas"].as_i64().unwrap_or(1);
            if int(&status["availableReplicas"]) < want {
                return Health::progressing(format!(
                    "{} of {want} replicas available",
                    int(&status["availableReplicas"])
                ));
            }
            Health::healthy()
        }
        ("batch", "Job") => {
            if let Some(f) = condition(obj, "Failed").filter(|c| c["status"] == "True") {
                return Health::degraded(format!(
                    "{}: {}",
                    f["reason"].as_str().unwrap_or("Failed"),
                    f["message"].as_str().unwrap_or("")
                ));
            }
            if condition(obj, "Complete").is_some_and(|c| c["status"] == "True") {
                return Health::healthy();
            }
            Health::progressing("job running")
        }
        ("", "PersistentVolumeClaim") => match status["phase"].as_str() {
            Some("Bound") => Health::healthy(),
            Some("Lost") => Health::degraded("volume lost"),
            _ => Health::progressing("waiting for the claim to be bound"),
        },
        ("", "Service") if obj["spec"]["type"] == "LoadBalancer" => {
            if status["loadBalancer"]["ingress"]
                .as_array()
                .is_some_and(|i| !i.is_empty())
            {
                Health::healthy()
            } else {
                Health::progressing("waiting for a load balancer address")
            }
        }
        ("", "Namespace") => match status["phase"].as_str() {
            Some("Active") | None => Health::healthy(),
            Some(other) => Health::progressing(format!("namespace is {other}")),
        },
        ("", "Pod") => match status["phase"].as_str() {
            Some("Running" | "Succeeded") => Health::healthy(),
            Some("Failed") => Health::degraded("pod failed"),
            _ => Health::progressing("pod pending"),
        },
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            if condition(obj, "Established").is_some_and(|c| c["status"] == "True") {
                Health::healthy()
            } else {
                Health::progressing("waiting for the CRD to be Established")
            }
        }
        _ => Health::healthy(),
    }
}

/// Health of one object of the bundle: an object whose last apply (or hook run) failed is Degraded
/// with that failure, in words, whatever its live copy looks like (it is not what the bundle says);
/// otherwise it is judged from the live object.
pub fn of_object(failure: Option<&str>, live: Option<&Value>) -> Health {
    match failure {
        Some(e) => Health::degraded(e),
        None => assess(live),
    }
}

/// An app's health: the worst of its objects (by [`HealthStatus::severity`]), with a message
/// naming that object. An app with no objects is Healthy (nothing to be unhealthy).
pub fn aggregate(objects: &[(ObjRef, Health)]) -> Health {
    // The first of the worst (`max_by_key` alone keeps the last): objects come in sync order,
    // so the message names what failed first (a hook), not an object that stopped because of it.
    let worst = objects.iter().rev().max_by_key(|(_, h)| h.state.severity());
    match worst {
        None => Health::healthy(),
        Some((_, h)) if h.state == HealthStatus::Healthy => Health::healthy(),
        Some((r, h)) => {
            let others = objects.iter().filter(|(_, o)| o.state == h.state).count() - 1;
            let more = if others > 0 {
                format!(" (and {others} more)")
            } else {
                String::new()
            };
            Health {
                state: h.state,
                message: format!("{r}: {}{more}", h.message),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deploy(status: Value) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "a", "generation": 2},
               "spec": {"replicas": 3}, "status": status})
    }

    #[test]
    fn deployment_health_table() {
        let table = [
            (json!({}), HealthStatus::Progressing),
            (
                json!({"observedGeneration": 1, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}),
                HealthStatus::Progressing,
            ),
            (
                json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 2}),
                HealthStatus::Progressing,
            ),
            (
                json!({"observedGeneration": 2, "replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}),
                HealthStatus::Healthy,
            ),
            (
                json!({"observedGeneration": 2, "conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "boom"}]}),
                HealthStatus::Degraded,
            ),
        ];
        for (status, want) in table {
            assert_eq!(
                assess(Some(&deploy(status.clone()))).state,
                want,
                "{status}"
            );
        }
        assert_eq!(assess(None).state, HealthStatus::Missing);
    }

    #[test]
    fn other_kinds() {
        let job = |cond: &str| {
            json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
                                       "status": {"conditions": [{"type": cond, "status": "True", "reason": "BackoffLimitExceeded"}]}})
        };
        assert_eq!(assess(Some(&job("Complete"))).state, HealthStatus::Healthy);
        assert_eq!(assess(Some(&job("Failed"))).state, HealthStatus::Degraded);
        let pvc = json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "p"}, "status": {"phase": "Pending"}});
        assert_eq!(assess(Some(&pvc)).state, HealthStatus::Progressing);
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
        assert_eq!(assess(Some(&cm)).state, HealthStatus::Healthy);
    }

    #[test]
    fn apply_failures_count_in_the_app_health() {
        let r = |n: &str| ObjRef {
            api_version: "v1".into(),
            kind: "ConfigMap".into(),
            namespace: "ghost".into(),
            name: n.into(),
        };
        let cm = |n: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": n, "namespace": "ghost"}});
        let missing_ns = "namespace ghost does not exist; create it or set createNamespace";
        // (apply error, live object) per object → the app's state.
        type Objects<'a> = &'a [(Option<&'a str>, Option<Value>)];
        let table: [(Objects, HealthStatus); 6] = [
            (&[(None, Some(cm("a")))], HealthStatus::Healthy),
            (&[(Some(missing_ns), None)], HealthStatus::Degraded),
            // An object that failed to apply is Degraded even if an old copy lives on.
            (
                &[(Some("field is immutable"), Some(cm("a")))],
                HealthStatus::Degraded,
            ),
            (
                &[(None, Some(cm("a"))), (None, None)],
                HealthStatus::Missing,
            ),
            (
                &[(None, None), (Some("boom"), None)],
                HealthStatus::Degraded,
            ),
            (&[], HealthStatus::Healthy),
        ];
        for (objects, want) in table {
            let each: Vec<(ObjRef, Health)> = objects
                .iter()
                .enumerate()
                .map(|(i, (err, live))| (r(&format!("c{i}")), of_object(*err, live.as_ref())))
                .collect();
            assert_eq!(aggregate(&each).state, want, "{objects:?}");
        }
        let why = format!("not applied: {missing_ns}");
        let each = [(r("a"), of_object(Some(&why), None))];
        assert_eq!(
            aggregate(&each).message,
            format!("ConfigMap ghost/a: not applied: {missing_ns}")
        );
    }

    #[test]
    fn the_app_message_names_the_worst_object() {
        let r = |n: &str| ObjRef {
            api_version: "apps/v1".into(),
            kind: "Deployment".into(),
            namespace: "shop".into(),
            name: n.into(),
        };
        let h = aggregate(&[
            (r("a"), Health::healthy()),
            (r("b"), Health::degraded("ProgressDeadlineExceeded: crash")),
            (r("c"), Health::progressing("1 of 2")),
        ]);
        assert_eq!(h.state, HealthStatus::Degraded);
        assert_eq!(
            h.message,
            "Deployment shop/b: ProgressDeadlineExceeded: crash"
        );
    }
}

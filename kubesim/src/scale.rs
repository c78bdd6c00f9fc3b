//! The scale subresource (`autoscaling/v1` Scale) of Deployments, ReplicaSets and StatefulSets, so
//! `kubectl scale`, `kubectl autoscale` and HPAs work: GET reads the replicas and selector, PUT and
//! PATCH change `spec.replicas` of the workload itself.

use std::collections::HashMap;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};

use crate::cluster::{Cluster, PatchType, WriteOptions};
use crate::error::ApiError;
use crate::resources::ResourceType;
use crate::wire::{Body, PATCH_TYPES, content_type, json_response, manager, parse_body, read_body};

/// Whether `rt` has a scale subresource.
pub(crate) fn scalable(rt: &ResourceType) -> bool {
    rt.group == "apps"
        && matches!(
            rt.kind.as_str(),
            "Deployment" | "ReplicaSet" | "StatefulSet"
        )
}

/// The Scale view of a workload.
pub(crate) fn scale_of(obj: &Value) -> Value {
    let selector: Vec<String> = obj["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    let meta = &obj["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": obj["spec"]["replicas"].as_i64().unwrap_or(1)},
        "status": {
            "replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
            "selector": selector.join(","),
        },
    })
}

/// Serves `.../<plural>/<name>/scale`.
pub(crate) async fn serve(
    cluster: &Arc<Cluster>,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    method: Method,
    req: Request<Incoming>,
    query: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let writer = manager(query, req.headers());
    let obj = cluster.get(rt, ns, name)?;
    let current = scale_of(&obj);
    let wanted = match method {
        Method::GET => return Ok(json_response(StatusCode::OK, &current)),
        Method::PUT => {
            let (headers, bytes) = read_body(req).await?;
            let body = parse_body(&bytes, content_type(&headers).contains("yaml"))?;
            if body["kind"] != "Scale" {
                return Err(ApiError::bad_request(format!(
                    "the body must be an autoscaling/v1 Scale, not {}",
                    body["kind"]
                )));
            }
            let precondition = body["metadata"]["resourceVersion"].as_str().unwrap_or("");
            if !precondition.is_empty()
                && Some(precondition) != obj["metadata"]["resourceVersion"].as_str()
            {
                return Err(ApiError::conflict(
                    &rt.group_resource(),
                    name,
                    "the object has been modified; please apply your changes to the latest version and try again",
                ));
            }
            body
        }
        Method::PATCH => {
            let (headers, bytes) = read_body(req).await?;
            let ct = content_type(&headers);
            let patch = parse_body(&bytes, ct.contains("yaml"))?;
            let mut scale = current.clone();
            match ct.as_str() {
                "application/json-patch+json" => crate::patch::json_patch(&mut scale, &patch)?,
                // A Scale has no lists: strategic merge is a merge.
                "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                    crate::patch::merge_patch(&mut scale, &patch)
                }
                other => return Err(ApiError::unsupported_media_type(other, &PATCH_TYPES[..3])),
            }
            scale
        }
        other => {
            return Err(ApiError::method_not_allowed(format!(
                "{other} is not supported on {}/scale",
                rt.plural
            )));
        }
    };
    let replicas = match wanted["spec"]["replicas"].as_i64() {
        Some(n) if n >= 0 => n,
        _ => {
            return Err(ApiError::invalid(
                "Scale",
                name,
                vec![(
                    "spec.replicas".into(),
                    format!(
                        "Invalid value: {}: must be greater than or equal to 0",
                        wanted["spec"]["replicas"]
                    ),
                )],
            ));
        }
    };
    let opts = WriteOptions {
        manager: writer,
        ..Default::default()
    };
    let (updated, _) = cluster.patch(
        rt,
        ns,
        name,
        PatchType::Merge,
        json!({"spec": {"replicas": replicas}}),
        &opts,
    )?;
    Ok(json_response(StatusCode::OK, &scale_of(&updated)))
}

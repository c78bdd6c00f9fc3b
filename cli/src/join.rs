//! `flotilla cluster join` (and `cluster rebuild --manifest`): the agent's install manifests —
//! deploy/agent, the kustomize base — with one cluster's values filled in, so that
//! `flotilla cluster join eu-1 --labels region=eu | kubectl --context eu-1 apply -f -` is the whole
//! procedure. Pure: the token and CA come in as data.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

/// The base's files, in its kustomization's order (a test keeps the two in step).
const BASE: &[(&str, &str)] = &[
    (
        "namespace.yaml",
        include_str!("../../deploy/agent/namespace.yaml"),
    ),
    (
        "serviceaccount.yaml",
        include_str!("../../deploy/agent/serviceaccount.yaml"),
    ),
    ("rbac.yaml", include_str!("../../deploy/agent/rbac.yaml")),
    (
        "configmap.yaml",
        include_str!("../../deploy/agent/configmap.yaml"),
    ),
    (
        "secret.yaml",
        include_str!("../../deploy/agent/secret.yaml"),
    ),
    (
        "deployment.yaml",
        include_str!("../../deploy/agent/deployment.yaml"),
    ),
];

const CONFIG_MAP: &str = "flotilla-agent-config";
const BOOTSTRAP_SECRET: &str = "flotilla-agent-bootstrap";

/// What one cluster's install needs.
pub struct Join<'a> {
    pub cluster: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub hub_address: &'a str,
    /// Single use, bound to `cluster`; written only into the bootstrap Secret.
    pub token: &'a str,
    pub ca_pem: &'a str,
}

/// The manifests, as one multi-document YAML stream.
pub fn manifests(join: &Join) -> Result<String> {
    ensure!(
        join.hub_address.starts_with("https://"),
        "--hub-address {:?} must be https://HOST:PORT (the address agents dial)",
        join.hub_address
    );
    ensure!(
        join.ca_pem.contains("BEGIN CERTIFICATE"),
        "the hub CA (--ca) holds no certificate"
    );
    let labels = join
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut out = String::new();
    let mut filled = (false, false);
    for (file, text) in BASE {
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let mut obj: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("deploy/agent/{file}"))?;
            if obj.is_null() {
                continue;
            }
            match (obj["kind"].as_str(), obj["metadata"]["name"].as_str()) {
                (Some("ConfigMap"), Some(CONFIG_MAP)) => {
                    obj["data"] = serde_json::json!({
                        "hub": join.hub_address,
                        "cluster-name": join.cluster,
                        "labels": labels,
                    });
                    filled.0 = true;
                }
                (Some("Secret"), Some(BOOTSTRAP_SECRET)) => {
                    // `data`, not `stringData`: the API server stores only `data`, so a second
                    // `kubectl apply` of the same output would otherwise always "configure" it.
                    use base64::Engine as _;
                    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
                    if let Some(m) = obj.as_object_mut() {
                        m.remove("stringData");
                    }
                    obj["data"] = serde_json::json!({
                        "token": b64(join.token),
                        "ca.crt": b64(join.ca_pem),
                    });
                    filled.1 = true;
                }
                _ => {}
            }
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(&obj).context("printing a manifest")?);
        }
    }
    if filled != (true, true) {
        bail!("deploy/agent lacks the {CONFIG_MAP} ConfigMap or the {BOOTSTRAP_SECRET} Secret");
    }
    Ok(out)
}

/// `k=v,k2=v2` (empty: none).
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("label {pair:?} is not of the form key=value");
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_list_follows_the_kustomization() {
        let k: Value =
            serde_yaml_ng::from_str(include_str!("../../deploy/agent/kustomization.yaml")).unwrap();
        let listed: Vec<&str> = k["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        let embedded: Vec<&str> = BASE.iter().map(|(f, _)| *f).collect();
        assert_eq!(listed, embedded);
    }

    #[test]
    fn values_land_in_the_config_map_and_the_token_only_in_the_secret() {
        let labels = parse_labels("region=eu, tier=prod").unwrap();
        let text = manifests(&Join {
            cluster: "eu-1",
            labels: &labels,
            hub_address: "https://hub.example.com:7443",
            token: "flt_secret-token",
            ca_pem: "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n",
        })
        .unwrap();
        let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 9, "{text}");
        let cm = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        assert_eq!(cm["data"]["cluster-name"], "eu-1");
        assert_eq!(cm["data"]["labels"], "region=eu,tier=prod");
        use base64::Engine as _;
        let token = base64::engine::general_purpose::STANDARD.encode("flt_secret-token");
        for d in &docs {
            let has_token = d.to_string().contains(&token);
            assert_eq!(has_token, d["kind"] == "Secret", "{d}");
            assert!(d.get("stringData").is_none(), "{d}");
        }
        let plain = Join {
            cluster: "eu-1",
            labels: &labels,
            hub_address: "http://plain",
            token: "t",
            ca_pem: "-----BEGIN CERTIFICATE-----",
        };
        assert!(manifests(&plain).is_err(), "agents dial https only");
        assert!(parse_labels("novalue").is_err());
    }
}

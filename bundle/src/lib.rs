//! The bundle format, shared by the hub (which renders bundles from git) and the agent (which
//! applies them): reading manifests with limits, label selectors, per-cluster customization, and
//! the normalized form whose SHA-256 is the bundle digest.
#![forbid(unsafe_code)]

pub mod customize;
pub mod hooks;
pub mod manifest;
pub mod nesting;
pub mod selector;

use serde_json::Value;

/// Errors of the bundle format. Every message names where the problem is.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Error {
    /// A manifest is unusable; `origin` names file and document.
    #[error("{origin}: {reason}")]
    Manifest { origin: String, reason: String },
    /// Reading a file failed.
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    /// A customization cannot be applied.
    #[error("customization: {0}")]
    Customize(String),
    /// A selector is malformed; `field` names it.
    #[error("{field}: {reason}")]
    Selector { field: String, reason: String },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Sorts objects by apiVersion, kind, namespace, name: the normalized order of a bundle.
pub fn normalize(mut objects: Vec<Value>) -> Vec<Value> {
    let key = |o: &Value| {
        (
            o["apiVersion"].as_str().unwrap_or("").to_string(),
            o["kind"].as_str().unwrap_or("").to_string(),
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            o["metadata"]["name"].as_str().unwrap_or("").to_string(),
        )
    };
    objects.sort_by_key(key);
    objects
}

/// The canonical bytes of a normalized bundle: a JSON array with sorted object keys.
pub fn canonical_bytes(objects: &[Value]) -> Vec<u8> {
    // serde_json's map keeps keys sorted (no `preserve_order`), so this is canonical.
    serde_json::to_vec(objects).unwrap_or_default()
}

/// `sha256:<hex>` of bytes.
pub fn digest_bytes(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The digest of a bundle (normalizing a copy first).
pub fn digest(objects: &[Value]) -> String {
    digest_bytes(&canonical_bytes(&normalize(objects.to_vec())))
}

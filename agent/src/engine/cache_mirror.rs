//! The bundle cache kept in Secrets beside the agent's identity: a pod rescheduled onto an empty
//! disk while the hub is down finds its apps' last bundles there and keeps enforcing them.
//!
//! Each app's bundle is one Secret, `flotilla-bundle-<app>`, holding the bundle compressed and
//! then sealed under the agent's cache key (bound to the app), so it is no easier to read than
//! the disk cache. A Secret holds at most [`MAX_SEALED_BYTES`]; a larger bundle stays on the disk
//! only, and the agent says so in its log.

use std::io::{Read, Write};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};

use crate::cache_seal::CacheKey;
use crate::{Error, Result};

use super::FIELD_MANAGER;

/// Marks the Secrets this module owns (and lists).
const LABEL: &str = "flotilla.dev/bundle-cache";
/// The data key of the sealed bundle.
const KEY: &str = "bundle";
/// Room left under the API server's 1 MiB object limit for metadata.
pub const MAX_SEALED_BYTES: usize = 900 * 1024;
/// A decompressed bundle larger than this is refused (a sealed value is ours, but bounded anyway).
const MAX_PLAIN_BYTES: u64 = 256 * 1024 * 1024;

pub struct Mirror {
    api: Api<Secret>,
    namespace: String,
}

fn secret_name(app: &str) -> String {
    format!("flotilla-bundle-{app}")
}

/// What the seal of a mirrored bundle is bound to: its app, and that it is compressed.
fn sealed_as(app: &str) -> String {
    format!("{app}/gzip")
}

impl Mirror {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    /// Compresses and seals `plain` (a cached bundle's JSON) as the Secret's value; `None` when it
    /// would not fit in a Secret.
    pub(crate) fn seal(key: &CacheKey, app: &str, plain: &[u8]) -> Result<Option<Vec<u8>>> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(plain)
            .and_then(|()| gz.flush())
            .map_err(|e| Error::Cache(format!("compressing the bundle of {app}: {e}")))?;
        let compressed = gz
            .finish()
            .map_err(|e| Error::Cache(format!("compressing the bundle of {app}: {e}")))?;
        let sealed = key.seal(&sealed_as(app), &compressed)?;
        Ok((sealed.len() <= MAX_SEALED_BYTES).then_some(sealed))
    }

    /// The bundle JSON back from a Secret's value.
    pub(crate) fn open(key: &CacheKey, app: &str, sealed: &[u8]) -> Result<Vec<u8>> {
        let compressed = key.open(&sealed_as(app), sealed)?;
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(compressed.as_slice())
            .take(MAX_PLAIN_BYTES + 1)
            .read_to_end(&mut plain)
            .map_err(|e| Error::Cache(format!("the mirrored bundle of {app}: {e}")))?;
        if plain.len() as u64 > MAX_PLAIN_BYTES {
            return Err(Error::Cache(format!(
                "the mirrored bundle of {app} is larger than {MAX_PLAIN_BYTES} bytes"
            )));
        }
        Ok(plain)
    }

    pub async fn save(&self, app: &str, sealed: Vec<u8>) -> Result<()> {
        let name = secret_name(app);
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {LABEL: "true", "app.kubernetes.io/part-of": "flotilla"},
                "annotations": {"flotilla.dev/app": app},
            },
            "type": "Opaque",
            "data": {KEY: ByteString(sealed)},
        });
        self.api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await
            .map_err(|e| Error::kube(&format!("writing Secret {}/{name}", self.namespace), e))?;
        Ok(())
    }

    pub async fn delete(&self, app: &str) -> Result<()> {
        let name = secret_name(app);
        match self.api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(Error::kube(
                &format!("deleting Secret {}/{name}", self.namespace),
                e,
            )),
        }
    }

    /// Every mirrored bundle: (app, sealed value). A list that fails is an error, never "none".
    pub async fn load_all(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let list = self
            .api
            .list(&ListParams::default().labels(&format!("{LABEL}=true")))
            .await
            .map_err(|e| {
                Error::kube(
                    &format!("listing the bundle Secrets in {}", self.namespace),
                    e,
                )
            })?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|s| {
                let app = s.metadata.annotations?.remove("flotilla.dev/app")?;
                let sealed = s.data?.remove(KEY)?.0;
                Some((app, sealed))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_seal::new_key;

    #[test]
    fn a_mirrored_bundle_is_compressed_sealed_bound_to_its_app_and_bounded() {
        let key = CacheKey::from_bytes(&new_key().unwrap()).unwrap();
        let plain =
            br#"{"objects":[{"kind":"Secret","data":{"password":"canary-value"}}]}"#.repeat(50);
        let sealed = Mirror::seal(&key, "web", &plain).unwrap().expect("fits");
        assert!(sealed.len() < plain.len(), "compressed");
        assert!(!String::from_utf8_lossy(&sealed).contains("canary-value"));
        assert_eq!(Mirror::open(&key, "web", &sealed).unwrap(), plain);
        assert!(
            Mirror::open(&key, "api", &sealed).is_err(),
            "bound to its app"
        );
        // Incompressible and too big for a Secret: kept on disk only.
        let mut noise = vec![0u8; MAX_SEALED_BYTES + 1];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut noise).unwrap();
        assert!(Mirror::seal(&key, "web", &noise).unwrap().is_none());
    }
}

//! The agent's identity on disk: its private key (generated here, never sent anywhere) and the
//! certificate the hub issued for it, kept together in one 0600 file so they can never get out of step.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::{Error, Result};

const KEY_HEADER: &str = "-----BEGIN PRIVATE KEY-----";

/// A key and the certificate for it.
#[derive(Clone)]
pub struct Credentials {
    /// Cluster name, read from the certificate's identity URI.
    pub cluster: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: i64,
    /// When this agent received the certificate (unix seconds); renewal is paced from here.
    pub received_at: i64,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key is a secret: never printed.
        f.debug_struct("Credentials")
            .field("cluster", &self.cluster)
            .field("not_after", &self.not_after)
            .field("received_at", &self.received_at)
            .finish_non_exhaustive()
    }
}

pub fn now_unix() -> i64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
}

impl Credentials {
    /// Builds credentials from a freshly issued certificate.
    pub fn issued(cert_pem: String, key_pem: String) -> Result<Self> {
        let (cluster, not_after) = read_cert(&cert_pem)?;
        Ok(Self {
            cluster,
            cert_pem,
            key_pem,
            not_after,
            received_at: now_unix(),
        })
    }

    pub fn is_expired(&self, now: i64) -> bool {
        self.not_after <= now
    }

    /// When to renew: two thirds of the way from receipt to expiry.
    pub fn renew_at(&self) -> i64 {
        self.received_at + (self.not_after - self.received_at).max(0) * 2 / 3
    }

    /// Time until [`Self::renew_at`], zero if already due.
    pub fn until_renewal(&self, now: i64) -> Duration {
        Duration::from_secs(u64::try_from(self.renew_at() - now).unwrap_or(0))
    }
}

/// A new private key and a CSR for it naming `cluster`.
pub fn new_key_and_csr(cluster: &str) -> Result<(String, String)> {
    let err = |reason: rcgen::Error| Error::Credentials {
        context: "generating key and CSR".into(),
        reason: reason.to_string(),
    };
    let key = KeyPair::generate().map_err(err)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cluster);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(err)?
        .pem()
        .map_err(err)?;
    Ok((key.serialize_pem(), csr))
}

/// Cluster name (from the `.../cluster/<name>` URI SAN) and expiry of a certificate.
pub fn read_cert(cert_pem: &str) -> Result<(String, i64)> {
    let err = |reason: String| Error::Credentials {
        context: "reading the cluster certificate".into(),
        reason,
    };
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).map_err(|e| err(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| err(e.to_string()))?;
    let not_after = cert.validity().not_after.timestamp();
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| err(e.to_string()))?
        .ok_or_else(|| err("no subject alternative names".into()))?;
    let cluster = sans
        .value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => uri
                .rsplit_once("/cluster/")
                .map(|(_, name)| name.to_string()),
            _ => None,
        })
        .ok_or_else(|| err("no cluster identity URI".into()))?;
    Ok((cluster, not_after))
}

/// Where the agent keeps its identity: a 0600 file in its data directory (out of cluster), or a
/// Secret in its own namespace (in cluster), so a rescheduled pod keeps it and a rebuilt cluster
/// starts without one.
#[derive(Clone)]
pub struct IdentityStore {
    place: Place,
}

#[derive(Clone)]
enum Place {
    File(PathBuf),
    Secret {
        api: Box<kube::Api<k8s_openapi::api::core::v1::Secret>>,
        client: Box<kube::Client>,
        namespace: String,
        name: String,
    },
}

/// Keys of the identity Secret.
const SECRET_CERT: &str = "tls.crt";
const SECRET_KEY: &str = "tls.key";
const SECRET_RECEIVED: &str = "received-at";
/// A bootstrap token an operator may leave in the identity Secret (instead of FLOTILLA_TOKEN).
const SECRET_TOKEN: &str = "token";
/// The bundle cache's key, beside the identity (hex), under a field manager of its own so that
/// saving a renewed certificate never drops it.
const SECRET_CACHE_KEY: &str = "cache-key";
const CACHE_KEY_MANAGER: &str = "flotilla-agent-cache";
/// Out of cluster: the cache key file, beside the identity file.
const CACHE_KEY_FILE: &str = "cache.key";

impl IdentityStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            place: Place::File(data_dir.join("identity.pem")),
        }
    }

    /// The identity in Secret `namespace/name` of the agent's own cluster.
    pub fn in_secret(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            place: Place::Secret {
                api: Box::new(kube::Api::namespaced(client.clone(), namespace)),
                client: Box::new(client),
                namespace: namespace.to_string(),
                name: name.to_string(),
            },
        }
    }

    /// Where it is, for messages.
    pub fn describe(&self) -> String {
        match &self.place {
            Place::File(path) => path.display().to_string(),
            Place::Secret {
                namespace, name, ..
            } => format!("Secret {namespace}/{name}"),
        }
    }

    /// The stored credentials, if any.
    pub async fn load(&self) -> Result<Option<Credentials>> {
        match &self.place {
            Place::File(path) => load_file(path),
            Place::Secret { api, .. } => {
                let Some(data) = self.secret_data(api).await? else {
                    return Ok(None);
                };
                let (Some(cert_pem), Some(key_pem)) = (data.get(SECRET_CERT), data.get(SECRET_KEY))
                else {
                    return Ok(None);
                };
                let (cluster, not_after) = read_cert(cert_pem)?;
                let received_at = data
                    .get(SECRET_RECEIVED)
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_else(now_unix);
                Ok(Some(Credentials {
                    cluster,
                    cert_pem: cert_pem.clone(),
                    key_pem: key_pem.clone(),
                    not_after,
                    received_at,
                }))
            }
        }
    }

    /// The key the bundle cache is sealed under, created on first use.
    pub async fn cache_key(&self) -> Result<crate::cache_seal::CacheKey> {
        let decode = |text: &str, whence: &str| -> Result<[u8; 32]> {
            let bytes = hex_decode(text.trim()).ok_or_else(|| Error::Credentials {
                context: whence.to_string(),
                reason: "the bundle cache key is not 64 hex digits".into(),
            })?;
            <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| Error::Credentials {
                context: whence.to_string(),
                reason: "the bundle cache key is not 32 bytes".into(),
            })
        };
        let bytes = match &self.place {
            Place::File(identity) => {
                let path = identity.with_file_name(CACHE_KEY_FILE);
                // File IO with an fsync: off the async workers (a thousand agents start at once
                // in one process in the fleet bench).
                let read = path.clone();
                let found = tokio::task::spawn_blocking(move || std::fs::read_to_string(&read))
                    .await
                    .map_err(|e| Error::Cache(format!("cache key task: {e}")))?;
                match found {
                    Ok(text) => decode(&text, &path.display().to_string())?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let key = crate::cache_seal::new_key()?;
                        let text = hex_encode(&key);
                        let write = path.clone();
                        tokio::task::spawn_blocking(move || {
                            write_private_file(&write, text.as_bytes())
                        })
                        .await
                        .map_err(|e| Error::Cache(format!("cache key task: {e}")))??;
                        key
                    }
                    Err(e) => return Err(Error::io(&path, e)),
                }
            }
            Place::Secret {
                api,
                namespace,
                name,
                ..
            } => match self
                .secret_data(api)
                .await?
                .and_then(|d| d.get(SECRET_CACHE_KEY).cloned())
            {
                Some(text) => decode(&text, &self.describe())?,
                None => {
                    use base64::Engine as _;
                    let key = crate::cache_seal::new_key()?;
                    let b64 = base64::engine::general_purpose::STANDARD.encode(hex_encode(&key));
                    let secret = serde_json::json!({
                        "apiVersion": "v1", "kind": "Secret",
                        "metadata": {"name": name, "namespace": namespace},
                        "data": {SECRET_CACHE_KEY: b64},
                    });
                    self.apply_secret(&secret, CACHE_KEY_MANAGER).await?;
                    key
                }
            },
        };
        crate::cache_seal::CacheKey::from_bytes(&bytes)
    }

    /// Server-side applies `secret` as `manager`, creating its namespace when it is missing (an
    /// agent run out of cluster with `--identity-secret`; an install creates it itself).
    async fn apply_secret(&self, secret: &serde_json::Value, manager: &str) -> Result<()> {
        let Place::Secret {
            api,
            client,
            namespace,
            name,
        } = &self.place
        else {
            return Ok(());
        };
        let pp = kube::api::PatchParams::apply(manager).force();
        let patch = kube::api::Patch::Apply(secret);
        let apply = || api.patch(name, &pp, &patch);
        let result = match apply().await {
            Err(kube::Error::Api(s)) if s.code == 404 => {
                crate::engine::inventory::ensure_namespace(client, namespace).await?;
                apply().await
            }
            other => other,
        };
        result
            .map(|_| ())
            .map_err(|e| Error::kube(&format!("writing {}", self.describe()), e))
    }

    /// A bootstrap token left in the identity Secret, if any (a file store has none).
    pub async fn token(&self) -> Result<Option<String>> {
        match &self.place {
            Place::File(_) => Ok(None),
            Place::Secret { api, .. } => Ok(self
                .secret_data(api)
                .await?
                .and_then(|d| d.get(SECRET_TOKEN).cloned())
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())),
        }
    }

    async fn secret_data(
        &self,
        api: &kube::Api<k8s_openapi::api::core::v1::Secret>,
    ) -> Result<Option<std::collections::BTreeMap<String, String>>> {
        let Place::Secret { name, .. } = &self.place else {
            return Ok(None);
        };
        let secret = api
            .get_opt(name)
            .await
            .map_err(|e| Error::kube(&format!("reading {}", self.describe()), e))?;
        let Some(secret) = secret else {
            return Ok(None);
        };
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in secret.data.unwrap_or_default() {
            let text = String::from_utf8(v.0).map_err(|_| Error::Credentials {
                context: self.describe(),
                reason: format!("key {k} is not text"),
            })?;
            out.insert(k, text);
        }
        Ok(Some(out))
    }

    /// Replaces the stored credentials: atomically (0600, temp file + rename) in a file, by one
    /// server-side apply in a Secret.
    pub async fn save(&self, creds: &Credentials) -> Result<()> {
        match &self.place {
            Place::File(path) => save_file(path, creds),
            Place::Secret {
                namespace, name, ..
            } => {
                use base64::Engine as _;
                let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
                let secret = serde_json::json!({
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {"app.kubernetes.io/part-of": "flotilla"}},
                    "type": "Opaque",
                    "data": {
                        SECRET_CERT: b64(&creds.cert_pem),
                        SECRET_KEY: b64(&creds.key_pem),
                        SECRET_RECEIVED: b64(&creds.received_at.to_string()),
                    },
                });
                self.apply_secret(&secret, "flotilla-agent-identity").await
            }
        }
    }
}

fn load_file(path: &Path) -> Result<Option<Credentials>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let split = text.find(KEY_HEADER).ok_or_else(|| Error::Credentials {
        context: path.display().to_string(),
        reason: "no private key in the identity file".into(),
    })?;
    let (cert_pem, key_pem) = text.split_at(split);
    let (cluster, not_after) = read_cert(cert_pem)?;
    let received_at = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or_else(now_unix, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    Ok(Some(Credentials {
        cluster,
        cert_pem: cert_pem.to_string(),
        key_pem: key_pem.to_string(),
        not_after,
        received_at,
    }))
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Writes a new 0600 file whole (temp file + rename).
fn write_private_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| Error::io(path, e))
}

fn save_file(path: &Path, creds: &Credentials) -> Result<()> {
    let mut text = creds.cert_pem.clone();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&creds.key_pem);
    write_private_file(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_paced_from_receipt_not_from_the_backdated_not_before() {
        let creds = Credentials {
            cluster: "a".into(),
            cert_pem: String::new(),
            key_pem: String::new(),
            not_after: 1_015,
            received_at: 1_000,
        };
        assert_eq!(creds.renew_at(), 1_010);
        assert_eq!(creds.until_renewal(1_004), Duration::from_secs(6));
        assert_eq!(creds.until_renewal(1_020), Duration::ZERO);
        assert!(creds.is_expired(1_015) && !creds.is_expired(1_014));
    }

    #[test]
    fn csr_names_the_cluster_and_keys_stay_private_on_disk() {
        use std::os::unix::fs::PermissionsExt;
        let (key, csr) = new_key_and_csr("eu-1").unwrap();
        assert!(csr.contains("CERTIFICATE REQUEST"));
        assert!(key.starts_with(KEY_HEADER));
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::new(dir.path());
        let path = dir.path().join("identity.pem");
        assert!(load_file(&path).unwrap().is_none());
        // A self-signed stand-in certificate with the identity URI is enough to round-trip.
        let pair = KeyPair::from_pem(&key).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://t/cluster/eu-1".try_into().unwrap(),
        )];
        let cert = params.self_signed(&pair).unwrap().pem();
        let creds = Credentials::issued(cert, key).unwrap();
        save_file(&path, &creds).unwrap();
        let loaded = load_file(&path).unwrap().unwrap();
        assert_eq!(loaded.cluster, "eu-1");
        assert_eq!(loaded.key_pem, creds.key_pem);
        assert_eq!(store.describe(), path.display().to_string());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

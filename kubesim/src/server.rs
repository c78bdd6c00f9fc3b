//! Serving: one listener for any number of simulated clusters (`/clusters/<name>/...`; the root path
//! is the first cluster), HTTPS from a generated CA or plain HTTP, bearer-token auth, kubeconfigs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cluster::{Cluster, ClusterSettings};
use crate::error::{Error, Result};
use crate::http::handle;
use crate::routes::{Entry, Shared};

/// How to run a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub listen: SocketAddr,
    /// HTTPS with a generated CA (default) or plain HTTP.
    pub tls: bool,
    /// Names of the clusters to start with.
    pub clusters: Vec<String>,
    pub settings: ClusterSettings,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            tls: true,
            clusters: vec!["kubesim".into()],
            settings: ClusterSettings::default(),
        }
    }
}

/// A running simulator with its clusters.
pub struct Sim {
    shared: Arc<Shared>,
    addr: SocketAddr,
    tls: bool,
    ca_pem: String,
}

fn tls_material() -> Result<(String, rustls::ServerConfig)> {
    let err = |e: rcgen::Error| Error::Tls(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "kubesim CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let mut params = rcgen::CertificateParams::new(vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        "kubernetes.default.svc".into(),
    ])
    .map_err(err)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &issuer).map_err(err)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((ca_cert.pem(), config))
}

impl Sim {
    /// Starts serving on `opts.listen` with `opts.clusters`.
    pub async fn start(opts: SimOptions) -> Result<Self> {
        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|source| Error::Io {
                context: format!("listening on {}", opts.listen),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            context: "local address".into(),
            source,
        })?;
        let (ca_pem, tls) = tls_material()?;
        let token = crate::meta::random_bytes::<16>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let shared = Arc::new(Shared {
            clusters: RwLock::new(BTreeMap::new()),
            first: RwLock::new(None),
            token,
            settings: opts.settings.clone(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let sim = Self {
            shared: Arc::clone(&shared),
            addr,
            tls: opts.tls,
            ca_pem,
        };
        for name in &opts.clusters {
            sim.add_cluster(name);
        }
        let acceptor = opts
            .tls
            .then(|| tokio_rustls::TlsAcceptor::from(Arc::new(tls)));
        shared
            .tasks
            .spawn(accept_loop(Arc::clone(&shared), listener, acceptor));
        Ok(sim)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bearer token every request must carry.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The CA that signed the serving certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn cluster_names(&self) -> Vec<String> {
        self.shared
            .clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn cluster(&self, name: &str) -> Option<Arc<Cluster>> {
        self.shared
            .clusters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .map(|e| Arc::clone(&e.cluster))
    }

    /// Adds (or replaces with a fresh, empty one: a wiped cluster) the cluster `name`.
    pub fn add_cluster(&self, name: &str) -> Arc<Cluster> {
        let cluster = Cluster::new(name, self.shared.settings.clone());
        let cancel = self.shared.shutdown.child_token();
        self.shared
            .tasks
            .spawn(drive_controllers(Arc::clone(&cluster), cancel.clone()));
        let old = self
            .shared
            .clusters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                name.to_string(),
                Entry {
                    cluster: Arc::clone(&cluster),
                    cancel,
                },
            );
        if let Some(old) = old {
            old.cancel.cancel();
            old.cluster.drop_all_watches();
        }
        let mut first = self.shared.first.write().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some(name.to_string());
        }
        cluster
    }

    /// The API server URL of cluster `name`.
    pub fn server_url(&self, name: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/clusters/{name}", self.addr)
    }

    /// A kubeconfig for cluster `name` (YAML).
    pub fn kubeconfig(&self, name: &str) -> String {
        let context = format!("kubesim-{name}");
        let mut cluster = json!({"server": self.server_url(name)});
        if self.tls {
            cluster["certificate-authority-data"] =
                json!(base64::engine::general_purpose::STANDARD.encode(&self.ca_pem));
        }
        let config = json!({
            "apiVersion": "v1", "kind": "Config", "preferences": {},
            "clusters": [{"name": context, "cluster": cluster}],
            "users": [{"name": context, "user": {"token": self.shared.token}}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}}],
            "current-context": context,
        });
        serde_yaml_ng::to_string(&config).unwrap_or_default()
    }

    /// Writes the kubeconfig of `name` to `path` (mode 0600: it holds the token).
    pub fn write_kubeconfig(&self, name: &str, path: &std::path::Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| Error::Io {
            context: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(io)?;
        file.write_all(self.kubeconfig(name).as_bytes()).map_err(io)
    }

    /// A `kube::Config` for cluster `name`, as a client reading its kubeconfig would build it.
    pub async fn kube_config(&self, name: &str) -> Result<kube::Config> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig(name))
            .map_err(|e| Error::KubeConfig(e.to_string()))?;
        kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .map_err(|e| Error::KubeConfig(e.to_string()))
    }

    /// Stops serving and waits (bounded) for connections and watches to end.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.shared.tasks.wait()).await;
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn_shared = Arc::clone(&shared);
        let acceptor = acceptor.clone();
        shared.tasks.spawn(async move {
            let shutdown = conn_shared.shutdown.clone();
            let service =
                hyper::service::service_fn(move |req| handle(Arc::clone(&conn_shared), req));
            let builder = auto::Builder::new(TokioExecutor::new());
            match acceptor {
                Some(acceptor) => {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
                            .await
                    else {
                        return;
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
            }
        });
    }
}

/// Runs a cluster's simulated controllers whenever work is due.
async fn drive_controllers(cluster: Arc<Cluster>, cancel: CancellationToken) {
    loop {
        let next = cluster.run_controllers(Instant::now());
        let due = async {
            match next {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = cluster.wake.notified() => {}
            _ = due => {}
        }
    }
}

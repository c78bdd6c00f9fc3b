//! How the agent reaches the cluster it manages: a kubeconfig it was given, else the pod's service
//! account (in-cluster), else `KUBECONFIG`, else none (a hub-only agent). The choice is pure; the
//! client is built from it at the edge.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where a pod's service account is mounted (token, ca.crt, namespace).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the cluster's API comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSource {
    Kubeconfig(PathBuf),
    /// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT` with the service account in `dir`.
    InCluster {
        host: String,
        port: String,
        dir: PathBuf,
    },
    /// No cluster: the agent only holds its hub session.
    None,
}

/// What the environment says, read once (so the choice can be tested without one).
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub service_host: Option<String>,
    pub service_port: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    /// Whether the service account's token file exists.
    pub service_account_token: bool,
}

impl Environment {
    pub fn read(sa_dir: &Path) -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            service_host: var("KUBERNETES_SERVICE_HOST"),
            service_port: var("KUBERNETES_SERVICE_PORT"),
            kubeconfig: var("KUBECONFIG").map(PathBuf::from),
            service_account_token: sa_dir.join("token").is_file(),
        }
    }
}

/// The flag first, then in-cluster, then `KUBECONFIG`.
pub fn choose(flag: Option<PathBuf>, env: &Environment, sa_dir: &Path) -> ClusterSource {
    if let Some(path) = flag {
        return ClusterSource::Kubeconfig(path);
    }
    if let (Some(host), Some(port), true) = (
        &env.service_host,
        &env.service_port,
        env.service_account_token,
    ) {
        return ClusterSource::InCluster {
            host: host.clone(),
            port: port.clone(),
            dir: sa_dir.to_path_buf(),
        };
    }
    match &env.kubeconfig {
        Some(path) => ClusterSource::Kubeconfig(path.clone()),
        None => ClusterSource::None,
    }
}

/// A client for `source` (`None` for [`ClusterSource::None`]).
pub async fn client(source: &ClusterSource) -> Result<Option<kube::Client>> {
    match source {
        ClusterSource::None => Ok(None),
        ClusterSource::Kubeconfig(path) => crate::local::client(path).await.map(Some),
        ClusterSource::InCluster { host, port, dir } => {
            let err = |detail: String| Error::Kube {
                context: format!("the in-cluster configuration ({})", dir.display()),
                detail,
            };
            // An IPv6 service host needs brackets in a URL.
            let host = if host.contains(':') {
                format!("[{host}]")
            } else {
                host.clone()
            };
            let url: http::Uri = format!("https://{host}:{port}")
                .parse()
                .map_err(|e: http::uri::InvalidUri| err(e.to_string()))?;
            let ca_path = dir.join("ca.crt");
            let ca = std::fs::read(&ca_path).map_err(|e| Error::io(&ca_path, e))?;
            let mut roots = Vec::new();
            for pem in x509_parser::pem::Pem::iter_from_buffer(&ca) {
                roots.push(pem.map_err(|e| err(format!("ca.crt: {e}")))?.contents);
            }
            if roots.is_empty() {
                return Err(err("ca.crt holds no certificate".into()));
            }
            let mut config = kube::Config::new(url);
            config.root_cert = Some(roots);
            // A file, not its contents: kube re-reads it, so a rotated (projected) token is used.
            config.auth_info.token_file = Some(dir.join("token").display().to_string());
            if let Ok(ns) = std::fs::read_to_string(dir.join("namespace")) {
                config.default_namespace = ns.trim().to_string();
            }
            kube::Client::try_from(config)
                .map(Some)
                .map_err(|e| err(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_then_in_cluster_then_kubeconfig() {
        let sa = Path::new("/sa");
        let pod = Environment {
            service_host: Some("10.0.0.1".into()),
            service_port: Some("443".into()),
            kubeconfig: Some("/kc".into()),
            service_account_token: true,
        };
        let in_cluster = ClusterSource::InCluster {
            host: "10.0.0.1".into(),
            port: "443".into(),
            dir: sa.into(),
        };
        let no_token = Environment {
            service_account_token: false,
            ..pod.clone()
        };
        let table = [
            (
                Some("/flag"),
                pod.clone(),
                ClusterSource::Kubeconfig("/flag".into()),
            ),
            (None, pod.clone(), in_cluster),
            (None, no_token, ClusterSource::Kubeconfig("/kc".into())),
            (None, Environment::default(), ClusterSource::None),
        ];
        for (i, (flag, env, want)) in table.into_iter().enumerate() {
            assert_eq!(choose(flag.map(PathBuf::from), &env, sa), want, "case {i}");
        }
    }
}

//! The agent's HTTP listener (`--metrics-listen`): Prometheus metrics at `/metrics`, and the probes
//! a platform runs (`/healthz`: the process serves; `/readyz`: a hub session is up or the cached
//! apps are being enforced).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    /// 1 while a session with the hub is open.
    pub hub_connected: Gauge,
    pub apps: Gauge,
    pub reconciles: Family<ResultLabel, Counter>,
    pub drift_heals: Counter,
    /// 1 once the agent enforces apps (cached ones at start, or the hub's assignments).
    pub enforcing: Gauge,
    /// 1 while its certificate has expired and it waits for a bootstrap token.
    pub needs_bootstrap: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flotilla_agent");
        let hub_connected = Gauge::default();
        let apps = Gauge::default();
        let reconciles = Family::<ResultLabel, Counter>::default();
        let drift_heals = Counter::default();
        let enforcing = Gauge::default();
        let needs_bootstrap = Gauge::default();
        registry.register(
            "needs_bootstrap",
            "1 while the certificate has expired and the agent waits for a bootstrap token bound to its name",
            needs_bootstrap.clone(),
        );
        registry.register(
            "enforcing",
            "1 once the agent enforces apps (cached ones, or the hub's assignments)",
            enforcing.clone(),
        );
        registry.register(
            "hub_connected",
            "1 while a session with the hub is open",
            hub_connected.clone(),
        );
        registry.register("apps", "Apps this agent runs", apps.clone());
        registry.register(
            "reconciles",
            "Reconcile passes by result",
            reconciles.clone(),
        );
        registry.register(
            "drift_heals",
            "Objects re-applied after a change or deletion in the cluster",
            drift_heals.clone(),
        );
        Self {
            registry,
            hub_connected,
            apps,
            reconciles,
            drift_heals,
            enforcing,
            needs_bootstrap,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabel {
                result: result.into(),
            })
            .inc();
    }

    /// Ready for traffic: a session with the hub is open, or the agent enforces what it knows.
    pub fn ready(&self) -> bool {
        self.hub_connected.get() == 1 || self.enforcing.get() == 1
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` on `listener` until cancelled.
pub async fn serve(
    metrics: Arc<Metrics>,
    listener: tokio::net::TcpListener,
    cancel: CancellationToken,
) -> Result<()> {
    use axum::http::StatusCode;
    let ready = Arc::clone(&metrics);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = Arc::clone(&metrics);
                async move { metrics.encode() }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ready = ready.ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: no hub session and no app enforced yet",
                        )
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .map_err(|e| Error::Io {
            path: "metrics listener".into(),
            source: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_are_served_in_the_text_format() {
        let metrics = Arc::new(Metrics::default());
        metrics.reconciled(true);
        metrics.drift_heals.inc();
        metrics.hub_connected.set(1);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(Arc::clone(&metrics), listener, cancel.clone()));
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).await.unwrap();
        assert!(body.contains("flotilla_agent_hub_connected 1"), "{body}");
        assert!(
            body.contains("flotilla_agent_reconciles_total{result=\"ok\"} 1"),
            "{body}"
        );
        assert!(
            body.contains("flotilla_agent_drift_heals_total 1"),
            "{body}"
        );
        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(req.as_bytes()).await.unwrap();
            let mut body = String::new();
            stream.read_to_string(&mut body).await.unwrap();
            body
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        metrics.hub_connected.set(0);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        metrics.enforcing.set(1);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        cancel.cancel();
        server.await.unwrap().unwrap();
    }
}

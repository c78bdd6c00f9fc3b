//! Prometheus metrics of the hub, served at `/metrics` on the HTTP listener.

use flotilla_proto::v1::{HealthStatus, SyncStatus};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub listener: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SyncLabels {
    pub sync: String,
    pub health: String,
}

/// The hub's metrics.
pub struct Metrics {
    registry: Registry,
    pub connected_agents: Gauge,
    pub renders: Family<ResultLabel, Counter>,
    /// Variants rendered into bundles (an app render re-renders only variants it has not made at
    /// its commit and document).
    pub variant_renders: Counter,
    pub bundle_bytes_served: Counter,
    pub sync_reports: Family<SyncLabels, Counter>,
    pub reports_refused: Family<ResultLabel, Counter>,
    pub connections_refused: Family<RefusalLabels, Counter>,
    /// Render of a new bundle → the cluster reports it applied.
    pub propagation: Histogram,
    rendered_at: Mutex<HashMap<(String, String), Instant>>,
    pub admissions: Counter,
    pub admissions_delayed: Counter,
    pub admissions_peak_per_second: Gauge,
    /// Store reads that failed, by what they were for (a closed set).
    pub store_read_errors: Family<ResultLabel, Counter>,
    /// App records that do not decode now (each such app is held on every cluster).
    pub unreadable_app_records: Gauge,
    /// Webhook deliveries by what was done with them (a closed set: accepted, coalesced, replay,
    /// bad_signature, bad_body, disabled).
    pub webhooks: Family<ResultLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("flotilla_hub");
        let connected_agents = Gauge::default();
        let renders = Family::<ResultLabel, Counter>::default();
        let variant_renders = Counter::default();
        let bundle_bytes_served = Counter::default();
        let sync_reports = Family::<SyncLabels, Counter>::default();
        let reports_refused = Family::<ResultLabel, Counter>::default();
        let connections_refused = Family::<RefusalLabels, Counter>::default();
        let propagation = Histogram::new(exponential_buckets(0.05, 2.0, 12));
        let admissions = Counter::default();
        let admissions_delayed = Counter::default();
        let admissions_peak_per_second = Gauge::default();
        let store_read_errors = Family::<ResultLabel, Counter>::default();
        let unreadable_app_records = Gauge::default();
        let webhooks = Family::<ResultLabel, Counter>::default();
        registry.register(
            "webhooks",
            "Webhook deliveries by what was done with them",
            webhooks.clone(),
        );
        registry.register(
            "store_read_errors",
            "Store reads that failed (nothing was concluded from them), by what they were for",
            store_read_errors.clone(),
        );
        registry.register(
            "unreadable_app_records",
            "App records that do not decode; each such app is held (neither applied nor pruned)",
            unreadable_app_records.clone(),
        );
        registry.register(
            "admissions",
            "Connections admitted to the TLS listener",
            admissions.clone(),
        );
        registry.register(
            "admissions_delayed",
            "Connections that waited for the handshake rate limit",
            admissions_delayed.clone(),
        );
        registry.register(
            "admissions_peak_per_second",
            "Most connections admitted in one second since start",
            admissions_peak_per_second.clone(),
        );
        registry.register(
            "connected_agents",
            "Agent sessions open now",
            connected_agents.clone(),
        );
        registry.register("renders", "App renders by result", renders.clone());
        registry.register(
            "variant_renders",
            "Variants rendered into bundles",
            variant_renders.clone(),
        );
        registry.register(
            "bundle_bytes_served",
            "Bundle bytes sent to agents",
            bundle_bytes_served.clone(),
        );
        registry.register(
            "sync_reports",
            "Status reports from agents by sync and health",
            sync_reports.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at the caps (max_connections, max_per_address) or closed by a timer (idle, max_age)",
            connections_refused.clone(),
        );
        registry.register(
            "reports_refused",
            "Agent reports dropped: unassigned app, over the rate, malformed",
            reports_refused.clone(),
        );
        registry.register(
            "assignment_propagation_seconds",
            "From rendering a new bundle for a cluster to the cluster reporting it applied",
            propagation.clone(),
        );
        Self {
            registry,
            connected_agents,
            renders,
            variant_renders,
            bundle_bytes_served,
            sync_reports,
            reports_refused,
            connections_refused,
            propagation,
            rendered_at: Mutex::new(HashMap::new()),
            admissions,
            admissions_delayed,
            admissions_peak_per_second,
            store_read_errors,
            unreadable_app_records,
            webhooks,
        }
    }
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Instant>> {
        // Single map operations: a poisoned lock still holds sound data.
        self.rendered_at.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new digest was assigned to a cluster.
    pub fn assigned(&self, cluster: &str, digest: &str) {
        self.lock()
            .entry((cluster.to_string(), digest.to_string()))
            .or_insert_with(Instant::now);
    }

    /// A connection was refused at the caps (`listener`, `reason` closed sets); timer closes are
    /// counted into the same family by `conn_limits`.
    pub fn connection_refused(&self, listener: &'static str, reason: &'static str) {
        self.connections_refused
            .get_or_create(&RefusalLabels {
                listener: listener.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// A store read failed (`what`: a closed set of purposes).
    pub fn store_read_failed(&self, what: &'static str) {
        self.store_read_errors
            .get_or_create(&ResultLabel {
                result: what.into(),
            })
            .inc();
    }

    /// A report was dropped at the gate (`reason` from a closed set).
    pub fn report_refused(&self, reason: &'static str) {
        self.reports_refused
            .get_or_create(&ResultLabel {
                result: reason.into(),
            })
            .inc();
    }

    /// A cluster reported running a digest.
    pub fn reported(&self, cluster: &str, digest: &str, sync: SyncStatus, health: HealthStatus) {
        // Label values from a closed set (the enums' words), never text an agent chose.
        self.sync_reports
            .get_or_create(&SyncLabels {
                sync: sync.word().into(),
                health: health.word().into(),
            })
            .inc();
        if sync == SyncStatus::Synced
            && let Some(at) = self
                .lock()
                .remove(&(cluster.to_string(), digest.to_string()))
        {
            self.propagation.observe(at.elapsed().as_secs_f64());
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

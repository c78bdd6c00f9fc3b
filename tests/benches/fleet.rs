//! Fleet-scale propagation: N kubesim clusters with N in-process agents (real gRPC over mTLS, real
//! Kubernetes HTTP API) against the real `flotilla-hub` binary; a commit is timed until every cluster
//! reports it applied and Healthy; the hub's RSS per connected cluster is read from /proc.
//! Run: `FLOTILLA_BENCH_CLUSTERS=200 cargo bench -p flotilla-e2e --bench fleet`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flotilla_e2e::{GitRepo, Hub, HubOptions, InProcessAgents, SimCluster};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let n: usize = std::env::var("FLOTILLA_BENCH_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let names: Vec<String> = (0..n).map(|i| format!("c{i:04}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let clusters = SimCluster::start_many(&name_refs).unwrap();
    let hub = Hub::start(HubOptions {
        // The faster poll the issue-24 lever asks for (commit → render is at most one poll).
        poll_interval: "200ms".into(),
        heartbeat_interval: "5s".into(),
        // The bench's own polling must not queue behind 1,000 agents' handshakes.
        operators: true,
        ..HubOptions::default()
    })
    .unwrap();
    let idle_hub = rss_kib(hub.process.pid());
    let token = hub.token(&["--uses", &n.to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let agents = InProcessAgents::start(&hub, &clusters, &names, &token, dir.path()).unwrap();
    let started = Instant::now();
    loop {
        let list = hub.cli_json(&["cluster", "list"]).unwrap();
        let connected = list
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["connected"] == true)
            .count();
        if connected == n {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "only {connected} of {n} connected"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "{n} agents registered and connected in {:.1?}",
        started.elapsed()
    );
    let connected_hub = rss_kib(hub.process.pid());

    let repo = GitRepo::init(&dir.path().join("fleet")).unwrap();
    let app = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {region: \"${cluster.labels.region}\", v: \"1\"}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: \"nginx:1.27\"}]}\n";
    repo.write("web/app.yaml", app).unwrap();
    let first = repo.commit("v1").unwrap();
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n  # Propagation, not staging: one step over the whole fleet, no cap.\n  rollout: {{steps: [{{selector: {{}}, maxUnavailable: \"100%\"}}]}}\n",
        repo.url()
    ))
    .unwrap();
    let wait_all = |revision: &str, since: Instant| -> Vec<Duration> {
        let mut done: BTreeMap<String, Duration> = BTreeMap::new();
        while done.len() < n {
            for row in hub.status().unwrap() {
                if row["revision"] == revision
                    && row["sync"] == "Synced"
                    && row["health"] == "Healthy"
                {
                    let c = row["cluster"].as_str().unwrap().to_string();
                    done.entry(c).or_insert_with(|| since.elapsed());
                }
            }
            assert!(
                since.elapsed() < Duration::from_secs(600),
                "{} of {n} at {revision}",
                done.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut v: Vec<Duration> = done.into_values().collect();
        v.sort();
        v
    };
    let t = Instant::now();
    let initial = wait_all(&first, t);
    println!(
        "initial rollout: p50 {:.2?} p99 {:.2?} max {:.2?}",
        pct(&initial, 0.5),
        pct(&initial, 0.99),
        initial.last().unwrap()
    );

    repo.write("web/app.yaml", &app.replace("v: \"1\"", "v: \"2\""))
        .unwrap();
    let second = repo.commit("v2").unwrap();
    let t = Instant::now();
    let change = wait_all(&second, t);
    println!(
        "commit -> applied+Healthy on {n} clusters (poll 200 ms included): p50 {:.2?} p99 {:.2?} max {:.2?}",
        pct(&change, 0.5),
        pct(&change, 0.99),
        change.last().unwrap()
    );
    let loaded_hub = rss_kib(hub.process.pid());
    println!(
        "hub RSS: idle {idle_hub} KiB, {n} connected {connected_hub} KiB ({:.1} KiB per cluster), after two rollouts {loaded_hub} KiB ({:.1} KiB per cluster)",
        (connected_hub.saturating_sub(idle_hub)) as f64 / n as f64,
        (loaded_hub.saturating_sub(idle_hub)) as f64 / n as f64
    );
    drop(agents);
}

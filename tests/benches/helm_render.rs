//! Render time of a 200-template Helm chart for 1,000 clusters in 3 regions, through the real hub
//! binary (with tests/helm/helm, the real Helm engine): from `app apply` to the revision rendered
//! and assigned. Renders are shared per distinct set of values, so 3 regions cost 3 renders.
//! Run: `cargo bench -p flotilla-e2e --bench helm_render` (FLOTILLA_BENCH_CLUSTERS, _TEMPLATES).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use flotilla_e2e::grpc::register_with_labels;
use flotilla_e2e::{GitRepo, Hub, HubOptions, memory_kib};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let clusters = env("FLOTILLA_BENCH_CLUSTERS", 1000);
    let templates = env("FLOTILLA_BENCH_TEMPLATES", 200);
    let helm = flotilla_e2e::tools::helm();
    let hub = Hub::start(HubOptions {
        poll_interval: "500ms".into(),
        extra_args: vec!["--helm-bin".into(), helm.display().to_string()],
        ..HubOptions::default()
    })
    .unwrap();
    let token = hub
        .token(&["--uses", &clusters.to_string(), "--ttl", "1h"])
        .unwrap();
    let t = Instant::now();
    for i in 0..clusters {
        let region = ["eu", "us", "ap"][i % 3];
        register_with_labels(&hub, &token, &format!("c{i:04}"), &[("region", region)])
            .await
            .unwrap();
    }
    println!("{clusters} clusters registered in {:.1?}", t.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo")).unwrap();
    repo.write(
        "chart/Chart.yaml",
        "apiVersion: v2\nname: big\nversion: 0.1.0\n",
    )
    .unwrap();
    repo.write("chart/values.yaml", "replicaCount: 1\nregion: none\n")
        .unwrap();
    for i in 0..templates {
        let text = if i % 5 == 0 {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: \"{{{{ .Release.Name }}}}-d{i}\", labels: {{region: \"{{{{ .Values.region }}}}\"}}}}\nspec:\n  replicas: {{{{ .Values.replicaCount }}}}\n  selector: {{matchLabels: {{app: d{i}}}}}\n  template:\n    metadata: {{labels: {{app: d{i}}}}}\n    spec: {{containers: [{{name: c, image: \"nginx:1.27\"}}]}}\n"
            )
        } else {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: \"{{{{ .Release.Name }}}}-c{i}\"}}\ndata:\n  region: \"{{{{ .Values.region }}}}\"\n  {{{{- range $k, $v := .Values }}}}\n  {{{{ $k }}}}: \"{{{{ $v }}}}\"\n  {{{{- end }}}}\n"
            )
        };
        repo.write(&format!("chart/templates/t{i:03}.yaml"), &text)
            .unwrap();
    }
    let rev = repo.commit("chart").unwrap();
    let t = Instant::now();
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: big}}\nspec:\n  source: {{repoURL: \"{}\", path: chart, type: helm}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n  customizations:\n    - selector: {{}}\n      helmValues: {{region: \"${{cluster.labels.region}}\"}}\n    - selector: {{matchLabels: {{region: eu}}}}\n      helmValues: {{replicaCount: 3}}\n",
        repo.url()
    ))
    .unwrap();
    let app = hub
        .wait_revision("big", &rev, Duration::from_secs(600))
        .unwrap();
    let elapsed = t.elapsed();
    let assigned = app["clusters"].as_array().map_or(0, Vec::len);
    let mut bundles: Vec<&str> = app["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["digest"].as_str())
        .collect();
    bundles.sort();
    bundles.dedup();
    let (rss, peak) = memory_kib(hub.process.pid()).unwrap();
    println!(
        "{templates}-template chart, {clusters} clusters in 3 regions: apply → rendered and targeted in {elapsed:.2?}; {assigned} clusters, {} distinct bundles; hub RSS {:.1} MiB (peak {:.1} MiB)",
        bundles.len(),
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}

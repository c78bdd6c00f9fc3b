//! Helm charts as Argo CD renders them: `helm template` on the hub (here the real Helm engine
//! through tests/helm/helm, since our machines have no helm binary), values files, inline and
//! per-cluster values, `crds/` applied first, and a plain App pointed at a chart told what to do.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use flotilla_e2e::{GitRepo, Hub, HubOptions, SimCluster, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

fn helm_bin() -> PathBuf {
    flotilla_e2e::tools::helm()
}

const CHART: &[(&str, &str)] = &[
    (
        "chart/Chart.yaml",
        "apiVersion: v2\nname: web\nversion: 0.1.0\n",
    ),
    (
        "chart/values.yaml",
        "replicaCount: 1\nimage: nginx:1.27\nregion: none\n",
    ),
    ("chart/values-prod.yaml", "replicaCount: 2\n"),
    (
        "chart/templates/deploy.yaml",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {{ .Release.Name }}\n  labels: {region: \"{{ .Values.region }}\"}\nspec:\n  replicas: {{ .Values.replicaCount }}\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: \"{{ .Values.image }}\"}]}\n",
    ),
    (
        "chart/templates/widget.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: {{ .Release.Name }}-widget}\nspec: {size: {{ .Values.replicaCount }}}\n",
    ),
    (
        "chart/templates/NOTES.txt",
        "Installed {{ .Release.Name }}.\n",
    ),
    (
        "chart/crds/widgets.yaml",
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {name: widgets.example.com}\nspec:\n  group: example.com\n  names: {kind: Widget, plural: widgets, singular: widget}\n  scope: Namespaced\n  versions: [{name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}}]\n",
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn a_chart_renders_per_region_values_and_its_crds_and_converges() -> Result<()> {
    let clusters = SimCluster::start_many(&["eu-1", "us-1"])?;
    let hub = Hub::start(HubOptions {
        poll_interval: "300ms".into(),
        extra_args: vec!["--helm-bin".into(), helm_bin().display().to_string()],
        ..HubOptions::default()
    })?;
    let token = hub.token(&["--uses", "2"])?;
    let mut agents = Vec::new();
    for (name, region) in [("eu-1", "eu"), ("us-1", "us")] {
        agents.push(hub.agent_with_cluster_labels(
            name,
            Some(&token),
            &clusters.kubeconfig_of(name),
            &format!("region={region}"),
        )?);
    }
    hub.wait_all_connected(2, T)?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    for (path, text) in CHART {
        repo.write(path, text)?;
    }
    let rev = repo.commit("chart")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source:\n    repoURL: \"{}\"\n    path: chart\n    type: helm\n    helm: {{releaseName: shop, valueFiles: [values-prod.yaml], values: {{image: \"nginx:1.28\"}}}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n  customizations:\n    - selector: {{}}\n      helmValues: {{region: \"${{cluster.labels.region}}\"}}\n    - selector: {{matchLabels: {{region: eu}}}}\n      helmValues: {{replicaCount: 3}}\n  rollout: {{steps: [{{selector: {{}}, maxUnavailable: 2}}]}}\n",
        repo.url()
    ))?;
    wait_for(T, "web Synced+Healthy on both clusters", || {
        let rows = hub.status()?;
        let done = rows.len() == 2
            && rows.iter().all(|r| {
                r["revision"] == rev.as_str() && r["sync"] == "Synced" && r["health"] == "Healthy"
            });
        ensure!(done, "{}", serde_json::to_string(&rows)?);
        Ok(Some(()))
    })?;
    // Values: chart defaults < values file < inline values < per-cluster values, in order.
    for (cluster, replicas, region) in [("eu-1", 3, "eu"), ("us-1", 2, "us")] {
        let d = clusters
            .object(cluster, "Deployment", "default", "shop")?
            .ok_or_else(|| anyhow!("no Deployment shop in {cluster}"))?;
        assert_eq!(d["spec"]["replicas"], replicas, "{cluster}: {d}");
        assert_eq!(d["metadata"]["labels"]["region"], region, "{cluster}");
        assert_eq!(
            d["spec"]["template"]["spec"]["containers"][0]["image"],
            "nginx:1.28"
        );
        // The chart's CRD went first, so its custom resource could be applied.
        let widget = clusters.kubectl(
            cluster,
            &["get", "widgets.example.com", "shop-widget", "-o", "json"],
            "",
        )?;
        let widget: Value = serde_json::from_str(&widget)?;
        assert_eq!(widget["spec"]["size"], replicas, "{cluster}");
    }

    // The same chart as a plain source: told it is a chart.
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: plain}}\nspec:\n  source: {{repoURL: \"{}\", path: chart}}\n  targets: {{clusters: [eu-1]}}\n",
        repo.url()
    ))?;
    wait_for(T, "the plain app's error", || {
        let err = hub.app("plain")?["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(
            err.contains("this looks like a Helm chart (Chart.yaml): set spec.source.type: helm"),
            "{err:?}"
        );
        Ok(Some(()))
    })?;
    drop(agents);
    Ok(())
}

/// `flotilla_hub_renders_total{result="ok"}` from the hub's metrics.
fn renders(hub: &Hub) -> Result<f64> {
    hub.metric("flotilla_hub_renders_total{result=\"ok\"}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chart_whose_test_hook_has_a_random_name_settles_on_one_bundle() -> Result<()> {
    // As podinfo's chart: a Helm test Pod named with randAlphaNum, which no sync applies.
    let clusters = SimCluster::start_many(&["eu-1"])?;
    let hub = Hub::start(HubOptions {
        poll_interval: "300ms".into(),
        http: true,
        extra_args: vec!["--helm-bin".into(), helm_bin().display().to_string()],
        ..HubOptions::default()
    })?;
    let token = hub.token(&[])?;
    let _agent =
        hub.agent_with_cluster_labels("eu-1", Some(&token), &clusters.kubeconfig_of("eu-1"), "")?;
    hub.wait_all_connected(1, T)?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "chart/Chart.yaml",
        "apiVersion: v2\nname: web\nversion: 0.1.0\n",
    )?;
    repo.write(
        "chart/templates/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: {{ .Release.Name }}}\ndata: {v: \"1\"}\n",
    )?;
    repo.write(
        "chart/templates/tests/test-connection.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {{ .Release.Name }}-test-{{ randAlphaNum 6 | lower }}\n  annotations: {helm.sh/hook: test}\nspec: {restartPolicy: Never, containers: [{name: t, image: busybox}]}\n",
    )?;
    let rev = repo.commit("chart")?;
    hub.apply_app(&format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: chart, type: helm}}\n  targets: {{clusters: [eu-1]}}\n  syncPolicy: {{automated: false}}\n",
        repo.url()
    ))?;
    wait_for(T, "web rendered and asked to sync", || {
        let sync = hub.cli(&["app", "sync", "web"])?;
        ensure!(
            sync.status.success(),
            "{}",
            String::from_utf8_lossy(&sync.stderr)
        );
        Ok(Some(()))
    })?;
    let row = wait_for(T, "web Synced+Healthy", || {
        let rows = hub.status()?;
        ensure!(
            rows.len() == 1
                && rows[0]["revision"] == rev.as_str()
                && rows[0]["sync"] == "Synced"
                && rows[0]["health"] == "Healthy",
            "{rows:?}"
        );
        Ok(Some(rows[0].clone()))
    })?;
    // Polls that find the same commit, document and clusters render nothing.
    let from = renders(&hub)?;
    std::thread::sleep(Duration::from_millis(2_000));
    assert_eq!(
        renders(&hub)?,
        from,
        "six polls of one commit rendered again"
    );
    // A cluster's labels change what a render may see, so each relabel renders the
    // same commit again — and the random name still makes no new bundle.
    for i in 0..5 {
        let before = renders(&hub)?;
        let out = hub.cli(&["cluster", "label", "eu-1", &format!("pass={i}")])?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for(T, "a render after the relabel", || {
            let n = renders(&hub)?;
            ensure!(n > before, "{n} renders, from {before}");
            Ok(Some(()))
        })?;
    }
    let app = hub.app("web")?;
    let history = app["history"].as_array().cloned().unwrap_or_default();
    assert_eq!(history.len(), 1, "one revision, one entry: {app}");
    let rows = hub.status()?;
    assert_eq!(rows[0]["digest"], row["digest"], "one bundle: {rows:?}");
    assert_eq!(rows[0]["sync"], "Synced", "{rows:?}");
    assert!(
        clusters.objects("eu-1", "Pod", "default")?.is_empty(),
        "the test hook is never applied"
    );
    Ok(())
}

//! kubesim at scale: memory of many idle clusters, and latency of apply, list and watch through
//! kube-rs over HTTPS. Run: `cargo bench -p kubesim --bench scale` (results go in docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use futures::TryStreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kubesim::{Sim, SimOptions};
use serde_json::json;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

fn report(name: &str, samples: &mut [Duration]) {
    let total: Duration = samples.iter().sum();
    println!(
        "{name:<38} n={:<5} mean={:>8.2?} p50={:>8.2?} p99={:>8.2?}",
        samples.len(),
        total / samples.len() as u32,
        percentile(samples, 0.5),
        percentile(samples, 0.99)
    );
}

fn config_map(i: usize) -> serde_json::Value {
    // ~1 KiB of data: a realistic small ConfigMap.
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": format!("cm-{i:04}"), "labels": {"app": "bench", "shard": (i % 10).to_string()}},
           "data": {"config.yaml": "x".repeat(1024)}})
}

#[tokio::main]
async fn main() {
    let clusters: usize = std::env::var("KUBESIM_BENCH_CLUSTERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let before = rss_mib();
    let names: Vec<String> = (1..=clusters).map(|i| format!("c{i}")).collect();
    let started = Instant::now();
    let sim = Sim::start(SimOptions {
        clusters: names,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_mib();
    println!(
        "{clusters} idle clusters: started in {:.2?}, RSS {:.1} MiB -> {:.1} MiB ({:.1} KiB per cluster)",
        started.elapsed(),
        before,
        after,
        (after - before) * 1024.0 / clusters as f64
    );

    let client = Client::try_from(sim.kube_config("c1").await.unwrap()).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    let mut apply = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        cms.patch(
            &format!("cm-{i:04}"),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(config_map(i)),
        )
        .await
        .unwrap();
        apply.push(t.elapsed());
    }
    report("server-side apply (create), 1 KiB CM", &mut apply);
    let mut reapply = Vec::new();
    for i in 0..1000 {
        let t = Instant::now();
        cms.patch(
            &format!("cm-{i:04}"),
            &PatchParams::apply("bench").force(),
            &Patch::Apply(config_map(i)),
        )
        .await
        .unwrap();
        reapply.push(t.elapsed());
    }
    report("server-side apply (no-op)", &mut reapply);

    let mut list_all = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let list = cms.list(&ListParams::default()).await.unwrap();
        assert_eq!(list.items.len(), 1000);
        list_all.push(t.elapsed());
    }
    report("list 1000 CMs", &mut list_all);
    let mut list_sel = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let list = cms
            .list(&ListParams::default().labels("shard=3"))
            .await
            .unwrap();
        assert_eq!(list.items.len(), 100);
        list_sel.push(t.elapsed());
    }
    report("list with label selector (100 of 1000)", &mut list_sel);

    let rv = cms
        .list(&ListParams::default().limit(1))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut stream = Box::pin(cms.watch(&WatchParams::default(), &rv).await.unwrap());
    let mut watch = Vec::new();
    for i in 0..200 {
        let t = Instant::now();
        cms.patch(
            &format!("cm-{i:04}"),
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"n": i.to_string()}})),
        )
        .await
        .unwrap();
        loop {
            match stream.try_next().await.unwrap() {
                Some(WatchEvent::Modified(_)) => break,
                Some(_) => continue,
                None => panic!("watch ended"),
            }
        }
        watch.push(t.elapsed());
    }
    report("write -> watch event delivered", &mut watch);
    println!("RSS after workload: {:.1} MiB", rss_mib());
    sim.shutdown().await;
}

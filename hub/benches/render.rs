//! Source → bundles at scale: fetch and render a 1,000-manifest repository, then render variants for
//! 1,000 clusters that fall into 3 variants, and report the bytes stored.
//! Run: `cargo bench -p flotilla-hub --bench render` (results go in docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Instant;

use flotilla_bundle::customize::{self, ClusterFacts};
use flotilla_hub::apps::SourceType;
use flotilla_hub::db::appstore::AppStore;
use flotilla_hub::sources::{git, render};

fn git_cli(dir: &std::path::Path, args: &[&str]) {
    let ok = Command::new("git")
        .args([
            "-c",
            "user.email=b@flotilla.dev",
            "-c",
            "user.name=bench",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .status()
        .unwrap()
        .success();
    assert!(ok, "git {args:?}");
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("apps/big")).unwrap();
    git_cli(&repo, &["init", "-q", "-b", "main"]);
    for i in 0..1000 {
        let text = if i % 10 == 0 {
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d{i:04}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: d{i:04}}}}}\n  template:\n    metadata: {{labels: {{app: d{i:04}, region: \"${{cluster.labels.region}}\"}}}}\n    spec: {{containers: [{{name: c, image: \"nginx:1.27\"}}]}}\n"
            )
        } else {
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm{i:04}}}\ndata: {{region: \"${{cluster.labels.region}}\", payload: \"{}\"}}\n",
                "x".repeat(256)
            )
        };
        std::fs::write(repo.join(format!("apps/big/m{i:04}.yaml")), text).unwrap();
    }
    git_cli(&repo, &["add", "-A"]);
    git_cli(&repo, &["commit", "-q", "-m", "1000 manifests"]);
    let url = format!("file://{}", repo.display());
    let cache = dir.path().join("cache");

    let t = Instant::now();
    git::fetch(&cache, &url, None).unwrap();
    let fetch = t.elapsed();
    let t = Instant::now();
    let commit = git::resolve(&cache, &url, "main").unwrap();
    let files = git::read_tree(
        &cache,
        &url,
        &commit,
        "apps/big",
        git::TreeLimits::default(),
    )
    .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let base = render::base(
        SourceType::Plain,
        files,
        "apps/big",
        "kubectl",
        scratch.path(),
    )
    .await
    .unwrap();
    let read = t.elapsed();
    let facts = |i: usize| ClusterFacts {
        name: format!("c{i:04}"),
        labels: BTreeMap::from([("region".to_string(), ["eu", "us", "ap"][i % 3].to_string())]),
    };
    let t = Instant::now();
    let one = render::variant(&base, &facts(0), &[], false).unwrap();
    let one_variant = t.elapsed();
    assert_eq!(one.len(), 1000);
    println!(
        "1,000-manifest repo: fetch {fetch:.2?}, resolve+read tree+parse base {read:.2?}, one variant render {one_variant:.2?}"
    );

    let db = sled::Config::new().temporary(true).open().unwrap();
    let store = AppStore::open(&db, Default::default(), Default::default()).unwrap();
    let t = Instant::now();
    let mut variants: HashMap<String, String> = HashMap::new();
    let mut renders = 0;
    for i in 0..1000 {
        let f = facts(i);
        let key = customize::variant_key(&base.used, &f, &[]);
        if let std::collections::hash_map::Entry::Vacant(slot) = variants.entry(key) {
            let objects = render::variant(&base, &f, &[], false).unwrap();
            let bytes = flotilla_bundle::canonical_bytes(&objects);
            let digest = flotilla_bundle::digest_bytes(&bytes);
            store.put_bundle(&digest, &bytes).unwrap();
            slot.insert(digest);
            renders += 1;
        }
    }
    let assign = t.elapsed();
    let (count, bytes) = store.bundle_usage().expect("bundle store readable");
    let raw: usize = variants
        .values()
        .map(|d| store.bundle(d).unwrap().unwrap().len())
        .sum();
    println!(
        "1,000 clusters, 3 variants: {renders} renders, {count} bundles stored, {bytes} bytes compressed ({raw} bytes uncompressed), assignment pass {assign:.2?}"
    );
}

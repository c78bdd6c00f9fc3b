//! `flotilla-agent apply`: the engine run by hand against one cluster, like
//! `kubectl apply --server-side --prune --wait`, with progress per object and a summary.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::engine::health::HealthStatus;
use crate::engine::inventory::LocalCache;
use crate::engine::{AppSpec, Engine, Outcome, Progress, Seen};
use crate::{Error, Result};
use flotilla_bundle::manifest;
use flotilla_proto::v1::SyncStatus;

/// Options of `flotilla-agent apply`.
pub struct ApplyOptions {
    pub kubeconfig: PathBuf,
    pub app: AppSpec,
    pub dir: PathBuf,
    pub timeout: Duration,
    pub data_dir: Option<PathBuf>,
    /// Keep healing drift after the apply, until cancelled.
    pub watch: bool,
    pub resync: Duration,
}

/// A kube client from a kubeconfig file.
pub async fn client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let err = |e: String| Error::Kube {
        context: format!("kubeconfig {}", kubeconfig.display()),
        detail: e,
    };
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| err(e.to_string()))?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

fn check_app_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 53
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(Error::NeedsOperator(format!(
            "invalid app name {name:?}: use lowercase letters, digits and '-' (at most 53 characters)"
        )))
    }
}

/// Runs the apply; returns whether the app ended Healthy with no failed object.
pub async fn apply(opts: ApplyOptions, cancel: CancellationToken) -> Result<bool> {
    check_app_name(&opts.app.name)?;
    // Read everything first: a broken bundle must not touch the cluster at all.
    let manifests = manifest::load_dir(&opts.dir).map_err(|e| Error::Bundle(e.to_string()))?;
    let objects: Vec<serde_json::Value> = manifests.into_iter().map(|m| m.object).collect();
    let cache = match opts.data_dir.as_deref() {
        Some(dir) => {
            let key = crate::credentials::IdentityStore::new(dir)
                .cache_key()
                .await?;
            Some(LocalCache::open(dir, key)?)
        }
        None => None,
    };
    let engine = Engine::new(client(&opts.kubeconfig).await?, cache);
    let app = &opts.app;
    println!(
        "app {}: {} object(s) from {}",
        app.name,
        objects.len(),
        opts.dir.display()
    );
    if let Some(cache) = engine.cache() {
        // Kept for `flotilla-agent run --kubeconfig` on the same data directory (offline autonomy).
        let digest = flotilla_bundle::digest(&objects);
        cache.save_bundle(app, &objects, &digest, "").await?;
    }
    let report = engine
        .reconcile(app, &objects, |step| match step {
            Progress::Done(r, Outcome::Applied) => println!("  applied  {r}"),
            Progress::Done(r, Outcome::Pruned) => println!("  pruned   {r}"),
            Progress::Done(r, Outcome::Skipped(why)) => println!("  skipped  {r}: {why}"),
            Progress::Done(r, Outcome::Failed(e) | Outcome::HookFailed(e)) => {
                println!("  FAILED   {r}: {e}")
            }
            Progress::Waiting(what) => println!("  {what}"),
        })
        .await?;
    if let Some(note) = &report.prune_note {
        println!("  note: {note}");
    }
    let objects_health = report.bundle_objects();
    let (health, each) = engine
        .wait_healthy(&app.name, &objects_health, opts.timeout)
        .await;
    for (r, h) in each
        .iter()
        .filter(|(_, h)| h.state != HealthStatus::Healthy)
    {
        println!("  {:<8} {r}: {}", h.state.to_string(), h.message);
    }
    let sync = report.sync();
    println!(
        "app {}: {} applied, {} pruned, {} failed; {sync}; health {}{}; bundle {}",
        app.name,
        report.count(|o| matches!(o, Outcome::Applied)),
        report.count(|o| matches!(o, Outcome::Pruned)),
        report.failed(),
        health.state,
        if health.message.is_empty() {
            String::new()
        } else {
            format!(" ({})", health.message)
        },
        report.digest
    );
    let healthy = health.state == HealthStatus::Healthy && sync == SyncStatus::Synced;
    if opts.watch {
        println!("watching for drift (Ctrl-C to stop)");
        engine
            .keep_in_sync(
                app,
                &objects,
                Some(opts.resync),
                cancel,
                |seen| match seen {
                    Seen::Drift {
                        object,
                        count,
                        healed: true,
                    } => println!("  healed   {object} (drift #{count})"),
                    Seen::Drift { object, count, .. } => {
                        println!("  drifted  {object} (drift #{count}, not healed)")
                    }
                    Seen::Changed(_) => {}
                },
            )
            .await?;
    }
    Ok(healthy)
}

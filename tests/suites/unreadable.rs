//! One app record the hub cannot read is one held app, never an empty fleet: through the real
//! binaries, a backup whose `extra` record was made undecodable is restored and served, and a live
//! hub's record is corrupted through its test hook. No object is deleted on any cluster, the CLI
//! names the record and the fix, and fixing or deleting the app recovers without a restart.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use flotilla_e2e::{Fleet, HubOptions, SimCluster, bin, http_get, http_put, wait_for};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);
const PASSPHRASE: &str = "a long enough passphrase";
const CLUSTERS: &[(&str, &str)] = &[("a", "env=prod"), ("b", "env=prod")];
const SHOP_OBJECTS: usize = 6;

fn app_doc(name: &str, url: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  source: {{repoURL: \"{url}\", path: {name}}}\n  targets: {{selector: {{matchLabels: {{env: prod}}}}}}\n"
    )
}

/// Two apps, `shop` (six ConfigMaps) and `extra` (one), Synced and Healthy on both clusters.
fn two_apps(fleet: &Fleet) -> Result<()> {
    let mut shop = String::new();
    for i in 0..SHOP_OBJECTS {
        shop.push_str(&format!(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: shop-{i}}}\ndata: {{v: \"1\"}}\n"
        ));
    }
    fleet.repo.write("shop/objects.yaml", &shop)?;
    fleet.repo.write(
        "extra/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: extra}\ndata: {v: \"1\"}\n",
    )?;
    fleet.repo.commit("two apps")?;
    for name in ["shop", "extra"] {
        fleet.hub.apply_app(&app_doc(name, &fleet.repo.url()))?;
    }
    wait_for(T, "both apps Healthy on both clusters", || {
        let rows = fleet.hub.status()?;
        ensure!(
            rows.len() == 4
                && rows
                    .iter()
                    .all(|r| r["sync"] == "Synced" && r["health"] == "Healthy"),
            "{rows:?}"
        );
        Ok(Some(()))
    })
}

/// name → resourceVersion of every app ConfigMap on `cluster`.
fn versions(sim: &SimCluster, cluster: &str) -> Result<Vec<(String, Value)>> {
    let mut out: Vec<(String, Value)> = sim
        .objects(cluster, "ConfigMap", "default")?
        .into_iter()
        .filter(|o| {
            let n = o["metadata"]["name"].as_str().unwrap_or("");
            n == "extra" || n.starts_with("shop-")
        })
        .map(|o| {
            (
                o["metadata"]["name"].as_str().unwrap_or("").to_string(),
                o["metadata"]["resourceVersion"].clone(),
            )
        })
        .collect();
    out.sort_by(|x, y| x.0.cmp(&y.0));
    Ok(out)
}

fn all_versions(fleet: &Fleet) -> Result<Vec<Vec<(String, Value)>>> {
    CLUSTERS
        .iter()
        .map(|(c, _)| versions(&fleet.clusters, c))
        .collect()
}

/// While `extra` is held: every object stays exactly as it was (not pruned, not re-applied), the
/// status names the record and the fix, and `app get` refuses with the same words.
fn shows_held_and_touches_nothing(fleet: &Fleet, before: &[Vec<(String, Value)>]) -> Result<()> {
    wait_for(T, "a status row for the unreadable app", || {
        let rows = fleet.hub.status()?;
        let held = rows.iter().find(|r| r["app"] == "extra");
        ensure!(
            held.is_some_and(|r| {
                let m = r["message"].as_str().unwrap_or("");
                m.contains("held on every cluster")
                    && m.contains("app record \"extra\"")
                    && m.contains("store tree apps")
                    && m.contains("flotilla app apply")
            }),
            "{rows:?}"
        );
        let shop = rows.iter().filter(|r| r["app"] == "shop");
        ensure!(
            shop.clone().count() == 2 && shop.into_iter().all(|r| r["health"] == "Healthy"),
            "shop must keep working: {rows:?}"
        );
        Ok(Some(()))
    })?;
    // Long enough for several assignment rounds, resyncs and rollout passes.
    std::thread::sleep(Duration::from_secs(6));
    let after = all_versions(fleet)?;
    ensure!(
        after == before,
        "objects changed while the app was held:\nbefore {before:?}\nafter  {after:?}"
    );
    let out = fleet.hub.cli(&["app", "get", "extra"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("app record \"extra\"")
            && err.contains("cannot be read")
            && err.contains("flotilla app delete extra"),
        "app get of an unreadable record: {err}"
    );
    let list = fleet.hub.cli_json(&["app", "list"])?;
    ensure!(
        list.to_string().contains("held on every cluster"),
        "app list must show the held app: {list}"
    );
    Ok(())
}

/// Fixing the record (the document applied again) brings `extra` back on both clusters; deleting
/// `shop` then prunes only shop's objects: explicit removals still work.
fn fix_then_delete(fleet: &Fleet) -> Result<()> {
    fleet.hub.apply_app(&app_doc("extra", &fleet.repo.url()))?;
    wait_for(T, "extra Synced and Healthy again", || {
        let rows = fleet.hub.status()?;
        let extra: Vec<&Value> = rows
            .iter()
            .filter(|r| r["app"] == "extra" && !r["cluster"].as_str().unwrap_or("").is_empty())
            .collect();
        ensure!(
            extra.len() == 2
                && extra
                    .iter()
                    .all(|r| r["sync"] == "Synced" && r["health"] == "Healthy"),
            "{rows:?}"
        );
        Ok(Some(()))
    })?;
    let out = fleet.hub.cli(&["app", "delete", "shop"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(T, "shop pruned, extra kept", || {
        let now = all_versions(fleet)?;
        ensure!(
            now.iter().all(|v| v.len() == 1 && v[0].0 == "extra"),
            "{now:?}"
        );
        Ok(Some(()))
    })
}

/// Makes the `extra` record in a sealed backup undecodable: `generation` becomes a string.
fn corrupt_backup(path: &std::path::Path) -> Result<()> {
    let mut backup: flotilla_hub::db::backup::Backup =
        serde_json::from_slice(&std::fs::read(path)?)?;
    let opened = flotilla_hub::db::backup::unseal(PASSPHRASE, &backup.keys)?;
    let mut contents: Value = serde_json::from_slice(&opened)?;
    let rows = contents["trees"]["apps"]
        .as_array_mut()
        .context("the backup's apps tree")?;
    let mut found = false;
    for row in rows {
        let key = hex_decode(row[0].as_str().context("key")?)?;
        if key == b"extra" {
            let mut record: Value =
                serde_json::from_slice(&hex_decode(row[1].as_str().context("value")?)?)?;
            record["generation"] = Value::from("seven");
            row[1] = Value::from(hex_encode(&serde_json::to_vec(&record)?));
            found = true;
        }
    }
    ensure!(found, "no extra record in the backup");
    backup.keys = flotilla_hub::db::backup::seal(PASSPHRASE, &serde_json::to_vec(&contents)?)?;
    std::fs::write(path, serde_json::to_vec(&backup)?)?;
    Ok(())
}

fn hex_decode(s: &str) -> Result<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| Ok(u8::from_str_radix(&s[i..i + 2], 16)?))
        .collect()
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn a_restored_unreadable_record_holds_its_app_and_deletes_nothing() -> Result<()> {
    let mut fleet = Fleet::start(CLUSTERS)?;
    two_apps(&fleet)?;
    let before = all_versions(&fleet)?;
    ensure!(
        before.iter().all(|v| v.len() == SHOP_OBJECTS + 1),
        "{before:?}"
    );

    let dir = tempfile::tempdir()?;
    let pass_file = dir.path().join("passphrase");
    std::fs::write(&pass_file, PASSPHRASE)?;
    let backup = dir.path().join("hub.backup");
    fleet.hub.backup(&backup, &pass_file)?;
    corrupt_backup(&backup)?;

    fleet.hub.kill9();
    let data_dir = fleet.hub.data_dir();
    std::fs::remove_dir_all(&data_dir)?;
    let restore = |extra: &[&str]| {
        std::process::Command::new(bin("flotilla-hub"))
            .args(["restore", "--data-dir"])
            .arg(&data_dir)
            .arg("--from")
            .arg(&backup)
            .arg("--passphrase-file")
            .arg(&pass_file)
            .args(extra)
            .output()
    };
    // Refused by default, naming tree, key and error.
    let out = restore(&[])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success()
            && err.contains("tree apps, key \"extra\"")
            && err.contains("invalid type")
            && err.contains("--keep-unreadable"),
        "{err}"
    );
    ensure!(
        !data_dir.exists(),
        "a refused restore left a data directory"
    );
    let out = restore(&["--keep-unreadable"])?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && said.contains("kept unreadable: tree apps, key \"extra\""),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    fleet.hub.restart()?;
    for (name, _) in CLUSTERS {
        fleet.hub.wait_connected(name, T)?;
    }
    shows_held_and_touches_nothing(&fleet, &before)?;
    let log = fleet.hub.process.log_text();
    ensure!(
        log.contains("app record unreadable"),
        "the hub must say it serves a record it cannot read"
    );
    fix_then_delete(&fleet)
}

#[test]
fn a_record_corrupted_in_a_live_hub_holds_its_app_and_deletes_nothing() -> Result<()> {
    let fleet = Fleet::start_with(
        CLUSTERS,
        HubOptions {
            http: true,
            env: vec![("FLOTILLA_TEST_HOOKS".into(), "1".into())],
            ..HubOptions::default()
        },
    )?;
    two_apps(&fleet)?;
    let before = all_versions(&fleet)?;
    let http = fleet.hub.http_addr.clone().context("http listener")?;
    let (code, body) = http_put(&http, "/test-hooks/apps/extra", br#"{"doc": 5}"#)?;
    ensure!(code == 200, "{code} {body}");
    shows_held_and_touches_nothing(&fleet, &before)?;

    // Counted, and audited once however often it is read.
    let (_, metrics) = http_get(&http, "/metrics")?;
    ensure!(
        metrics.contains("flotilla_hub_unreadable_app_records 1"),
        "{metrics}"
    );
    let audit = fleet.hub.cli_json(&["audit"])?;
    let entries = audit.as_array().cloned().unwrap_or_default();
    let held = entries
        .iter()
        .filter(|e| e["action"] == "app.unreadable" && e["target"] == "app/extra")
        .count();
    ensure!(held == 1, "one audit entry, not {held}: {audit}");

    // An operator deletes the broken app: its objects go (an explicit removal), shop's stay.
    let out = fleet.hub.cli(&["app", "delete", "extra"])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(T, "extra pruned, shop kept", || {
        let now = all_versions(&fleet)?;
        ensure!(
            now.iter()
                .all(|v| v.len() == SHOP_OBJECTS && v.iter().all(|(n, _)| n.starts_with("shop-"))),
            "{now:?}"
        );
        Ok(Some(()))
    })?;
    wait_for(T, "no unreadable record counted", || {
        let (_, metrics) = http_get(&http, "/metrics")?;
        ensure!(
            metrics.contains("flotilla_hub_unreadable_app_records 0"),
            "{metrics}"
        );
        Ok(Some(()))
    })
}

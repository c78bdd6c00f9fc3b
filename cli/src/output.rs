//! Rendering of CLI results as aligned tables for people or JSON for scripts.

use std::time::{Duration, UNIX_EPOCH};

use flotilla_proto::v1::{Cluster, CreateTokenResponse};
use serde_json::{Value, json};

use crate::Format;

fn rfc3339_secs(unix: i64) -> Option<String> {
    let secs = u64::try_from(unix).ok().filter(|s| *s > 0)?;
    Some(humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string())
}

fn rfc3339_ms(unix_ms: i64) -> Option<String> {
    let ms = u64::try_from(unix_ms).ok().filter(|s| *s > 0)?;
    Some(humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string())
}

fn labels_text(cluster: &Cluster) -> String {
    let mut labels: Vec<_> = cluster
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    labels.sort();
    if labels.is_empty() {
        "<none>".into()
    } else {
        labels.join(",")
    }
}

fn cluster_json(cluster: &Cluster) -> Value {
    json!({
        "name": cluster.name,
        "labels": cluster.labels.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "connected": cluster.connected,
        "last_seen": rfc3339_ms(cluster.last_seen_unix_ms),
        "registered_at": rfc3339_secs(cluster.registered_at_unix),
        "cert_expires": rfc3339_secs(cluster.cert_not_after_unix),
        "cert_serial": cluster.cert_serial,
    })
}

/// Prints rows with columns padded to the widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("   ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    rows.into_iter().for_each(line);
}

fn print_json(value: &Value) {
    // Serializing a serde_json::Value cannot fail.
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

pub fn token(format: Format, token: &CreateTokenResponse) {
    match format {
        Format::Json => print_json(&json!({
            "token": token.token,
            "token_id": token.token_id,
            "expires_at": rfc3339_secs(token.expires_at_unix),
        })),
        Format::Table => {
            // The token alone on stdout, so `$(flotilla token create)` works; the rest to stderr.
            println!("{}", token.token);
            eprintln!(
                "token {} expires at {}; it is shown only once",
                token.token_id,
                rfc3339_secs(token.expires_at_unix).unwrap_or_default()
            );
        }
    }
}

pub fn clusters(format: Format, clusters: &[Cluster]) {
    match format {
        Format::Json => print_json(&Value::Array(clusters.iter().map(cluster_json).collect())),
        Format::Table => table(
            &["NAME", "CONNECTED", "LAST SEEN", "CERT EXPIRES", "LABELS"],
            clusters
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        if c.connected { "yes" } else { "no" }.into(),
                        rfc3339_ms(c.last_seen_unix_ms).unwrap_or_else(|| "never".into()),
                        rfc3339_secs(c.cert_not_after_unix).unwrap_or_default(),
                        labels_text(c),
                    ]
                })
                .collect(),
        ),
    }
}

pub fn cluster(format: Format, cluster: &Cluster) {
    match format {
        Format::Json => print_json(&cluster_json(cluster)),
        Format::Table => {
            let fields = [
                ("Name", cluster.name.clone()),
                ("Labels", labels_text(cluster)),
                ("Connected", cluster.connected.to_string()),
                (
                    "Last seen",
                    rfc3339_ms(cluster.last_seen_unix_ms).unwrap_or_else(|| "never".into()),
                ),
                (
                    "Registered",
                    rfc3339_secs(cluster.registered_at_unix).unwrap_or_default(),
                ),
                (
                    "Cert expires",
                    rfc3339_secs(cluster.cert_not_after_unix).unwrap_or_default(),
                ),
                ("Cert serial", cluster.cert_serial.clone()),
            ];
            for (k, v) in fields {
                println!("{:<14}{v}", format!("{k}:"));
            }
        }
    }
}

pub fn deregistered(format: Format, name: &str, serials: &[String]) {
    match format {
        Format::Json => print_json(&json!({ "name": name, "revoked_serials": serials })),
        Format::Table => println!(
            "cluster {name} deregistered; revoked {} certificate(s)",
            serials.len()
        ),
    }
}

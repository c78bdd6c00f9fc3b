//! Rendering of CLI results as aligned tables for people or JSON for scripts.

use std::time::{Duration, UNIX_EPOCH};

use flotilla_proto::v1::{
    App, AuditEntry, Cluster, CreateTokenResponse, DiffAppResponse, FleetStatusRow,
    RebuildClusterResponse, RolloutStatus, SyncRequested,
};
use flotilla_proto::v1::{HealthStatus, RolloutPhase, SyncStatus};
use serde_json::{Value, json};

use crate::Format;
use crate::terminal::cell;

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
        "recovering_since": rfc3339_ms(cluster.recovering_since_unix_ms),
        "last_recovery_ms": (cluster.last_recovery_ms > 0).then_some(cluster.last_recovery_ms),
    })
}

/// Prints rows with columns padded to the widest cell; every cell is shown escaped (it may come
/// from an agent, a repository or a user).
fn table(header: &[&str], rows: Vec<Vec<String>>) {
    for line in table_lines(header, rows) {
        out!("{line}");
    }
}

/// An aligned table as lines, every cell escaped.
fn table_lines(header: &[&str], rows: Vec<Vec<String>>) -> Vec<String> {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| cell(c).into_owned()).collect())
        .collect();
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
        padded.join("   ").trim_end().to_string()
    };
    std::iter::once(line(header.iter().map(|h| h.to_string()).collect()))
        .chain(rows.into_iter().map(line))
        .collect()
}

fn print_json(value: &Value) {
    // Serializing a serde_json::Value cannot fail.
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    out!("{}", crate::terminal::json(&text));
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
            out!("{}", token.token);
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
                (
                    "Recovery",
                    match (cluster.recovering_since_unix_ms, cluster.last_recovery_ms) {
                        (since, _) if since > 0 => format!(
                            "in progress since {}",
                            rfc3339_ms(since).unwrap_or_default()
                        ),
                        (_, ms) if ms > 0 => format!(
                            "last rebuild converged in {:.1}s (registration -> every app Healthy)",
                            ms as f64 / 1000.0
                        ),
                        _ => "never rebuilt".into(),
                    },
                ),
            ];
            for (k, v) in fields {
                out!("{:<14}{}", format!("{k}:"), cell(&v));
            }
        }
    }
}

pub fn deregistered(format: Format, name: &str, serials: &[String]) {
    match format {
        Format::Json => print_json(&json!({ "name": name, "revoked_serials": serials })),
        Format::Table => out!(
            "cluster {name} deregistered; revoked {} certificate(s)",
            serials.len()
        ),
    }
}

pub(crate) fn short(revision: &str) -> String {
    if revision.is_empty() {
        "-".into()
    } else {
        revision.chars().take(12).collect()
    }
}

fn app_json(app: &App) -> Value {
    let spec: Value = serde_json::from_str(&app.spec_json).unwrap_or(Value::Null);
    json!({
        "name": app.name,
        "origin": app.origin().word(),
        "generation": app.generation,
        "observed_generation": app.observed_generation,
        "revision": app.revision,
        "last_error": if app.last_error.is_empty() { Value::Null } else { json!(app.last_error) },
        "note": if app.note.is_empty() { Value::Null } else { json!(app.note) },
        "cluster_count": app.cluster_count,
        "clusters": app.clusters.iter().map(|c| json!({"cluster": c.cluster, "digest": c.digest, "assigned": c.assigned_digest,
            "sync": c.sync().word(), "health": c.health().word(), "message": c.message,
            "hooks": c.hooks.iter().map(|h| json!({"phase": h.phase().word(), "kind": h.kind,
                "namespace": h.namespace, "name": h.name, "health": h.health().word(),
                "message": h.message, "finished_at": rfc3339_ms(h.finished_at_unix_ms)})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "history": app.history.iter().map(|h| json!({
            "revision": h.revision,
            "at": rfc3339_secs(h.at_unix),
            "bundles": h.bundles.iter().collect::<std::collections::BTreeMap<_, _>>(),
            "rolled_out": h.rolled_out,
        })).collect::<Vec<_>>(),
        "pinned_revision": if app.pinned_revision.is_empty() { Value::Null } else { json!(app.pinned_revision) },
        "stable_revision": if app.stable_revision.is_empty() { Value::Null } else { json!(app.stable_revision) },
        "rollout_phase": match app.rollout_phase() { RolloutPhase::Unspecified => Value::Null, p => json!(p.word()) },
        "spec": spec["spec"],
    })
}

pub fn apps_applied(format: Format, apps: &[App]) {
    match format {
        Format::Json => print_json(&Value::Array(apps.iter().map(app_json).collect())),
        Format::Table => {
            for app in apps {
                out!("app/{} applied (generation {})", app.name, app.generation);
            }
        }
    }
}

pub fn apps(format: Format, apps: &[App]) {
    match format {
        // A list has no per-cluster rows or history (`app get` has): none is shown as "none".
        Format::Json => print_json(&Value::Array(
            apps.iter()
                .map(|a| {
                    let mut v = app_json(a);
                    if let Some(o) = v.as_object_mut() {
                        o.remove("clusters");
                        o.remove("history");
                    }
                    v
                })
                .collect(),
        )),
        Format::Table => table(
            &["NAME", "REVISION", "CLUSTERS", "ORIGIN", "ERROR"],
            apps.iter()
                .map(|a| {
                    vec![
                        a.name.clone(),
                        short(&a.revision),
                        a.cluster_count.to_string(),
                        a.origin().word().to_string(),
                        if a.last_error.is_empty() {
                            "-".into()
                        } else {
                            a.last_error.clone()
                        },
                    ]
                })
                .collect(),
        ),
    }
}

pub fn app(format: Format, app: &App) {
    match format {
        Format::Json => print_json(&app_json(app)),
        Format::Table => {
            out!("{:<14}{}", "Name:", cell(&app.name));
            out!(
                "{:<14}{}",
                "Revision:",
                if app.revision.is_empty() {
                    "-".into()
                } else {
                    cell(&app.revision)
                }
            );
            out!(
                "{:<14}{} (observed {})",
                "Generation:",
                app.generation,
                app.observed_generation
            );
            if !app.last_error.is_empty() {
                out!("{:<14}{}", "Error:", cell(&app.last_error));
            }
            if !app.note.is_empty() {
                out!("{:<14}{}", "Note:", cell(&app.note));
            }
            out!();
            table(
                &[
                    "CLUSTER",
                    "BUNDLE",
                    "ASSIGNED NOW",
                    "SYNC",
                    "HEALTH",
                    "MESSAGE",
                ],
                app.clusters
                    .iter()
                    .map(|c| {
                        let now = if c.assigned_digest == c.digest {
                            "same".to_string()
                        } else if c.assigned_digest.is_empty() {
                            "-".to_string()
                        } else {
                            c.assigned_digest.clone()
                        };
                        vec![
                            c.cluster.clone(),
                            c.digest.clone(),
                            now,
                            c.sync().word().to_string(),
                            c.health().word().to_string(),
                            c.message.clone(),
                        ]
                    })
                    .collect(),
            );
            let hooks: Vec<Vec<String>> = app
                .clusters
                .iter()
                .flat_map(|c| {
                    c.hooks.iter().map(|h| {
                        let hook = if h.namespace.is_empty() {
                            format!("{} {}", h.kind, h.name)
                        } else {
                            format!("{} {}/{}", h.kind, h.namespace, h.name)
                        };
                        // A finished hook succeeded (Healthy: a Job Complete) or failed.
                        let result = match h.health() {
                            HealthStatus::Healthy => "Succeeded",
                            HealthStatus::Degraded => "Failed",
                            other => other.word(),
                        };
                        vec![
                            c.cluster.clone(),
                            h.phase().word().to_string(),
                            hook,
                            result.to_string(),
                            rfc3339_ms(h.finished_at_unix_ms).unwrap_or_default(),
                            h.message.clone(),
                        ]
                    })
                })
                .collect();
            if !hooks.is_empty() {
                out!();
                table(
                    &["CLUSTER", "PHASE", "HOOK", "RESULT", "FINISHED", "MESSAGE"],
                    hooks,
                );
            }
            out!();
            table(
                &["REVISION", "RENDERED", "CLUSTERS"],
                app.history
                    .iter()
                    .map(|h| {
                        vec![
                            short(&h.revision),
                            rfc3339_secs(h.at_unix).unwrap_or_default(),
                            h.bundles.values().sum::<u32>().to_string(),
                        ]
                    })
                    .collect(),
            );
        }
    }
}

fn status_json(r: &FleetStatusRow) -> Value {
    json!({
        "cluster": r.cluster,
        "app": r.app,
        "connected": r.connected,
        "revision": r.revision,
        "digest": r.digest,
        "desired_revision": r.desired_revision,
        "desired_digest": r.desired_digest,
        "sync": r.sync().word(),
        "health": r.health().word(),
        "message": r.message,
        "drift_count": r.drift_count,
        "reported_at": rfc3339_ms(r.reported_at_unix_ms),
    })
}

/// The revision a row's cluster claims to run, and the digest it reports next to it when that is
/// not the bundle git wants it to run (the claim is the agent's; the digest is what it applied).
fn revision_shown(r: &FleetStatusRow) -> String {
    let revision = short(&r.revision);
    if r.digest.is_empty() || r.digest == r.desired_digest {
        return revision;
    }
    let digest = r.digest.strip_prefix("sha256:").unwrap_or(&r.digest);
    format!("{revision} ({})", &digest[..digest.len().min(12)])
}

fn paint(text: &str) -> String {
    if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        return text.to_string();
    }
    let code = match text {
        "Healthy" | "Synced" => "32",
        "Progressing" => "33",
        "Degraded" | "Missing" | "OutOfSync" | "SyncFailed" => "31",
        _ => "90",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

pub fn status(format: Format, rows: &[FleetStatusRow]) {
    match format {
        Format::Json => print_json(&Value::Array(rows.iter().map(status_json).collect())),
        Format::Table => {
            for line in status_lines(rows) {
                out!("{line}");
            }
        }
    }
}

/// The status table, a line per row after the header (the demo redraws it in place).
pub fn status_lines(rows: &[FleetStatusRow]) -> Vec<String> {
    // Padding is computed on the plain text; colors are added after.
    // Every field that came from an agent or a repository is shown escaped.
    let shown: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            let cluster = if r.cluster.is_empty() {
                "-".to_string()
            } else {
                cell(&r.cluster).into_owned()
            };
            [
                cluster,
                cell(&r.app).into_owned(),
                cell(&revision_shown(r)).into_owned(),
                cell(&r.message).into_owned(),
            ]
        })
        .collect();
    let mut widths = [7usize, 3, 8, 4, 6];
    for (r, s) in rows.iter().zip(&shown) {
        let cells = [
            s[0].as_str(),
            &s[1],
            &s[2],
            r.sync().word(),
            r.health().word(),
        ];
        for (w, c) in widths.iter_mut().zip(cells) {
            *w = (*w).max(c.len());
        }
    }
    let mut lines = vec![format!(
        "{:<w0$}   {:<w1$}   {:<w2$}   {:<w3$}   {:<w4$}   MESSAGE",
        "CLUSTER",
        "APP",
        "REVISION",
        "SYNC",
        "HEALTH",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3],
        w4 = widths[4]
    )];
    for (r, s) in rows.iter().zip(&shown) {
        let pad =
            |s: &str, w: usize| format!("{}{}", paint(s), " ".repeat(w.saturating_sub(s.len())));
        lines.push(format!(
            "{:<w0$}   {:<w1$}   {:<w2$}   {}   {}   {}",
            s[0],
            s[1],
            s[2],
            pad(r.sync().word(), widths[3]),
            pad(r.health().word(), widths[4]),
            s[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2]
        ));
    }
    lines
}

pub fn history(format: Format, app: &App) {
    match format {
        Format::Json => print_json(&app_json(app)["history"]),
        Format::Table => table(
            &["REVISION", "RENDERED", "CLUSTERS", "ROLLED OUT", "NOTE"],
            app.history
                .iter()
                .map(|h| {
                    let mut note = Vec::new();
                    if h.revision == app.stable_revision {
                        note.push("stable");
                    }
                    if h.revision == app.pinned_revision {
                        note.push("pinned");
                    }
                    vec![
                        h.revision.clone(),
                        rfc3339_secs(h.at_unix).unwrap_or_default(),
                        h.bundles.values().sum::<u32>().to_string(),
                        if h.rolled_out { "yes" } else { "no" }.into(),
                        note.join(","),
                    ]
                })
                .collect(),
        ),
    }
}

pub fn tokens(format: Format, tokens: &[flotilla_proto::v1::TokenInfo]) {
    let json_of = |t: &flotilla_proto::v1::TokenInfo| {
        json!({
            "id": t.token_id,
            "created_at": rfc3339_secs(t.created_at_unix),
            "expires_at": rfc3339_secs(t.expires_at_unix),
            "uses_left": t.uses_left,
            "cluster": (!t.cluster_name.is_empty()).then_some(&t.cluster_name),
            "revoked_at": rfc3339_secs(t.revoked_at_unix),
        })
    };
    match format {
        Format::Json => print_json(&json!(tokens.iter().map(json_of).collect::<Vec<_>>())),
        Format::Table => table(
            &["ID", "EXPIRES", "USES LEFT", "CLUSTER", "REVOKED"],
            tokens
                .iter()
                .map(|t| {
                    vec![
                        t.token_id.clone(),
                        rfc3339_secs(t.expires_at_unix).unwrap_or_default(),
                        t.uses_left.to_string(),
                        if t.cluster_name.is_empty() {
                            "<any new name>".into()
                        } else {
                            t.cluster_name.clone()
                        },
                        rfc3339_secs(t.revoked_at_unix).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect(),
        ),
    }
}

pub fn sync_requested(format: Format, app: &str, requested: &[SyncRequested]) {
    match format {
        Format::Json => print_json(&json!(
            requested
                .iter()
                .map(|q| json!({"cluster": q.cluster, "request": q.request, "digest": q.digest, "note": q.note}))
                .collect::<Vec<_>>()
        )),
        Format::Table => {
            out!("app/{app}: sync requested");
            table(
                &["CLUSTER", "REQUEST", "BUNDLE", "NOTE"],
                requested
                    .iter()
                    .map(|q| {
                        vec![
                            q.cluster.clone(),
                            q.request.to_string(),
                            q.digest.clone(),
                            q.note.clone(),
                        ]
                    })
                    .collect(),
            );
        }
    }
}

/// Prints what the cluster reported; `true` when there are differences.
pub fn diff(format: Format, d: &DiffAppResponse) -> bool {
    match format {
        Format::Json => print_json(&json!({
            "sync": d.sync().word(),
            "reported_at": rfc3339_ms(d.reported_at_unix_ms),
            "message": d.message,
            "diff": d.diff,
        })),
        Format::Table => {
            if !d.diff.is_empty() {
                // Line by line as is (no trailing newline of our own), so `patch` and pagers read
                // it; a line's own control characters are shown escaped.
                for line in d.diff.lines() {
                    out!("{}", cell(line));
                }
            }
            if d.diff.is_empty() && d.sync() != SyncStatus::Synced && !d.message.is_empty() {
                eprintln!("{}: {}", d.sync().word(), cell(&d.message));
            }
        }
    }
    !d.diff.is_empty()
}

fn rollout_json(r: &RolloutStatus) -> Value {
    json!({
        "app": r.app,
        "id": r.id,
        "revision": r.revision,
        "phase": r.phase().word(),
        "currentStep": r.current_step,
        "steps": r.steps,
        "message": r.message,
        "pausedReason": if r.paused_reason.is_empty() { Value::Null } else { json!(r.paused_reason) },
        "startedAt": rfc3339_secs(r.started_at_unix),
        "finishedAt": rfc3339_secs(r.finished_at_unix),
        "maxUpdating": r.max_updating,
        "stableRevision": r.stable_revision,
        "pinnedRevision": if r.pinned_revision.is_empty() { Value::Null } else { json!(r.pinned_revision) },
        "clusters": r.clusters.iter().map(|c| json!({
            "cluster": c.cluster,
            "step": c.step,
            "state": c.state,
            "reason": c.reason,
            "fromRevision": c.from_revision,
            "toRevision": c.to_revision,
        })).collect::<Vec<_>>(),
    })
}

pub fn rollout(format: Format, r: &RolloutStatus) {
    match format {
        Format::Json => print_json(&rollout_json(r)),
        Format::Table => {
            for line in rollout_lines(r) {
                out!("{line}");
            }
        }
    }
}

/// `rollout status` as lines (`--watch` redraws them).
pub(crate) fn rollout_lines(r: &RolloutStatus) -> Vec<String> {
    let step = r
        .steps
        .get(r.current_step as usize)
        .map_or("-", String::as_str);
    let mut lines = vec![
        format!("{:<10}{}", "App:", cell(&r.app)),
        format!("{:<10}{}", "Revision:", cell(&r.revision)),
        format!("{:<10}{}", "Phase:", r.phase().word()),
        format!(
            "{:<10}{} of {} ({})",
            "Step:",
            (r.current_step as usize + 1).min(r.steps.len()),
            r.steps.len(),
            cell(step)
        ),
        format!("{:<10}{}", "Why:", cell(&r.message)),
        String::new(),
    ];
    lines.extend(table_lines(
        &["CLUSTER", "STEP", "STATE", "FROM", "TO", "REASON"],
        r.clusters
            .iter()
            .map(|c| {
                vec![
                    c.cluster.clone(),
                    r.steps.get(c.step as usize).cloned().unwrap_or_default(),
                    c.state.clone(),
                    short(&c.from_revision),
                    short(&c.to_revision),
                    c.reason.clone(),
                ]
            })
            .collect(),
    ));
    lines
}

pub fn audit(format: Format, entries: &[AuditEntry]) {
    match format {
        Format::Json => print_json(&Value::Array(
            entries
                .iter()
                .map(|e| {
                    json!({
                        "seq": e.seq,
                        "at": rfc3339_ms(e.at_unix_ms),
                        "actor": e.actor,
                        "action": e.action,
                        "target": e.target,
                        "detail": e.detail,
                    })
                })
                .collect(),
        )),
        Format::Table => table(
            &["AT", "ACTOR", "ACTION", "TARGET", "DETAIL"],
            entries
                .iter()
                .map(|e| {
                    vec![
                        rfc3339_ms(e.at_unix_ms).unwrap_or_default(),
                        e.actor.clone(),
                        e.action.clone(),
                        e.target.clone(),
                        e.detail.clone(),
                    ]
                })
                .collect(),
        ),
    }
}

/// `cluster rebuild`: the token, and the agent command that registers the replacement with it
/// (`hub` and `ca` as this CLI reached the hub; `DIR` is for the operator to choose).
pub fn rebuild(format: Format, name: &str, r: &RebuildClusterResponse, hub: &str, ca: &str) {
    match format {
        Format::Json => print_json(&json!({
            "cluster": name,
            "token": r.token,
            "token_id": r.token_id,
            "expires_at": rfc3339_secs(r.expires_at_unix),
            "revoked_serials": r.revoked_serials,
        })),
        Format::Table => {
            out!(
                "cluster {name}: revoked {} certificate(s)",
                r.revoked_serials.len()
            );
            out!(
                "token {} (registers one cluster, only as {name}; expires {}):",
                r.token_id,
                rfc3339_secs(r.expires_at_unix).unwrap_or_default()
            );
            out!("{}", r.token);
            out!();
            out!("start the agent of the replacement cluster with (DIR: its data directory):");
            out!(
                "  FLOTILLA_TOKEN=<the token above> flotilla-agent run --hub {} --ca {} --data-dir DIR --cluster-name {name} --kubeconfig KUBECONFIG",
                shell_word(hub),
                shell_word(ca)
            );
            out!(
                "(in-cluster: `flotilla cluster rebuild {name} --manifest | kubectl apply -f -` instead)"
            );
        }
    }
}

/// `word` quoted for a POSIX shell when it needs to be, so a printed command pastes as is.
fn shell_word(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

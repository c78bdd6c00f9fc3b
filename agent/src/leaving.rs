//! Which apps a message from the hub takes off this cluster, and how. The one rule that keeps a
//! bad read on the hub (or a bug, or a half-restored store) from pruning anything: an app is pruned
//! only when the hub names it as removed. An app the message does not mention is kept running as
//! it is; an app the hub says it cannot read is held: no longer enforced, nothing deleted. Pure.

use std::collections::BTreeSet;

use flotilla_proto::v1::Assignments;

/// What becomes of an app this agent runs (or holds) when a message arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fate {
    /// Assigned: run (or keep running) the assignment.
    Run,
    /// Named as removed: prune its objects and forget it.
    Prune,
    /// The hub cannot read its record: stop enforcing, delete nothing, say why.
    Hold(String),
    /// Not mentioned at all: keep it exactly as it runs now. Never a prune.
    Keep,
}

/// The fate of `app` under `message`. A hold wins over everything (the hub is unsure), and a
/// removal over an assignment that names the same app (which the hub never sends).
pub(crate) fn fate(app: &str, message: &Assignments) -> Fate {
    if let Some(h) = message.held.iter().find(|h| h.app == app) {
        return Fate::Hold(h.reason.clone());
    }
    if message.removed.iter().any(|r| r == app) {
        return Fate::Prune;
    }
    if message.apps.iter().any(|a| a.app == app) {
        return Fate::Run;
    }
    Fate::Keep
}

/// The fate of every app the agent knows (runs or holds) that is not simply to run; sorted by name.
pub(crate) fn leaving<'a>(
    known: impl IntoIterator<Item = &'a str>,
    message: &Assignments,
) -> Vec<(String, Fate)> {
    known
        .into_iter()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|app| (app.to_string(), fate(app, message)))
        .filter(|(_, f)| *f != Fate::Run)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::v1::{Assignment, HeldApp};

    fn message(apps: &[&str], removed: &[&str], held: &[&str]) -> Assignments {
        Assignments {
            apps: apps
                .iter()
                .map(|a| Assignment {
                    app: a.to_string(),
                    digest: "d".into(),
                    ..Assignment::default()
                })
                .collect(),
            removed: removed.iter().map(|r| r.to_string()).collect(),
            held: held
                .iter()
                .map(|h| HeldApp {
                    app: h.to_string(),
                    reason: "unreadable".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn fates_by_table() {
        let hold = || Fate::Hold("unreadable".into());
        let cases: &[(&str, Assignments, &str, Fate)] = &[
            (
                "a full drop keeps everything",
                message(&[], &[], &[]),
                "shop",
                Fate::Keep,
            ),
            (
                "an explicit removal prunes",
                message(&[], &["shop"], &[]),
                "shop",
                Fate::Prune,
            ),
            (
                "assigned runs",
                message(&["shop"], &[], &[]),
                "shop",
                Fate::Run,
            ),
            (
                "another app's removal keeps",
                message(&["x"], &["x2"], &[]),
                "shop",
                Fate::Keep,
            ),
            ("held is held", message(&[], &[], &["shop"]), "shop", hold()),
            (
                "held wins over removed",
                message(&[], &["shop"], &["shop"]),
                "shop",
                hold(),
            ),
            (
                "removed wins over assigned",
                message(&["shop"], &["shop"], &[]),
                "shop",
                Fate::Prune,
            ),
        ];
        for (why, m, app, want) in cases {
            assert_eq!(fate(app, m), *want, "{why}");
        }
    }

    #[test]
    fn a_message_that_drops_every_app_prunes_nothing() {
        let known = ["shop", "extra", "shop"];
        let out = leaving(known, &message(&[], &[], &[]));
        assert_eq!(
            out,
            vec![
                ("extra".to_string(), Fate::Keep),
                ("shop".to_string(), Fate::Keep)
            ]
        );
    }

    #[test]
    fn only_the_named_app_is_pruned() {
        let out = leaving(["shop", "extra"], &message(&["shop"], &["extra"], &[]));
        assert_eq!(out, vec![("extra".to_string(), Fate::Prune)]);
    }
}

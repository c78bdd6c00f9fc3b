//! What a sync in progress tells its caller: each object as it is done, and — while it waits on a
//! wave or a hook (up to five minutes) — on what, so the cluster's status says so meanwhile.

use flotilla_proto::v1::HealthStatus;

use super::Outcome;
use super::health::Health;
use super::plan::ObjRef;

/// One step of a reconcile pass, as it happens.
#[derive(Debug)]
pub enum Progress<'a> {
    /// An object was applied, failed, pruned or skipped.
    Done(&'a ObjRef, &'a Outcome),
    /// The pass waits: "wave 2 of 4: waiting for Deployment shop/api (Progressing: ...)".
    Waiting(&'a str),
}

/// The words for a wait on `each` under `label`: the first object that is not Healthy yet, and
/// why; `None` when nothing is left to wait on.
pub fn waiting_on(label: &str, each: &[(ObjRef, Health)]) -> Option<String> {
    let (r, h) = each
        .iter()
        .find(|(_, h)| h.state != HealthStatus::Healthy)?;
    let more = each
        .iter()
        .filter(|(_, h)| h.state != HealthStatus::Healthy)
        .count()
        - 1;
    let why = if h.message.is_empty() {
        h.state.word().to_string()
    } else {
        format!("{}: {}", h.state.word(), h.message)
    };
    let more = match more {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    Some(format!("{label}: waiting for {r} ({why}){more}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &str, name: &str) -> ObjRef {
        ObjRef {
            api_version: "v1".into(),
            kind: kind.into(),
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn h(state: HealthStatus, message: &str) -> Health {
        Health {
            state,
            message: message.into(),
        }
    }

    #[test]
    fn a_wait_names_the_first_object_not_healthy_and_counts_the_rest() {
        use HealthStatus::{Healthy, Missing, Progressing};
        let label = "wave 2 of 4";
        for (each, expect) in [
            (vec![(obj("ConfigMap", "a"), h(Healthy, ""))], None),
            (
                vec![
                    (obj("ConfigMap", "a"), h(Healthy, "")),
                    (obj("Deployment", "api"), h(Progressing, "1 of 2 ready")),
                ],
                Some("wave 2 of 4: waiting for Deployment shop/api (Progressing: 1 of 2 ready)"),
            ),
            (
                vec![
                    (obj("Deployment", "api"), h(Missing, "")),
                    (obj("Deployment", "web"), h(Progressing, "")),
                    (obj("Job", "seed"), h(Progressing, "")),
                ],
                Some("wave 2 of 4: waiting for Deployment shop/api (Missing) and 2 more"),
            ),
            (vec![], None),
        ] {
            assert_eq!(waiting_on(label, &each).as_deref(), expect);
        }
    }
}

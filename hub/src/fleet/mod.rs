//! The connected fleet: live agent sessions, what each cluster reported (and the gate reports
//! pass first), the orders each cluster is sent, and the wake-ups that tell a session or the
//! rollout controller that something concerning it changed.

pub(crate) mod report_gate;
pub mod reports;
pub mod sessions;
pub mod wake;

//! The hub's edge to the network: admission of new connections (a paced, bounded queue),
//! connection caps and idle timers, and the metrics the hub exposes.

pub mod admission;
pub mod conn_limits;
pub mod metrics;

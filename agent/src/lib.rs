//! The Flotilla agent: one per cluster. It dials out to the hub (the hub never holds cluster
//! credentials), registers once with a bootstrap token, then holds an mTLS session and keeps its
//! certificate renewed.
//!
//! Entry point: [`runner::run`].
#![forbid(unsafe_code)]

pub mod backoff;
mod board;
pub mod cache_seal;
pub mod cluster_config;
pub mod credentials;
pub mod engine;
mod error;
pub mod fleet;
mod leaving;
pub mod link;
pub mod local;
pub mod metrics;
mod pass;
pub mod runner;

pub use error::{Error, Result};

//! kubesim: a Kubernetes API server simulator. It serves the real Kubernetes HTTP API (discovery,
//! CRUD, watch, server-side apply, status) for many in-memory clusters in one process, with simulated
//! controllers that make workloads become ready and faults that can be injected, so that agents and
//! `kubectl` can be tested as against real clusters.
//!
//! Start one with [`Sim::start`], then get a kubeconfig ([`Sim::kubeconfig`]) or a
//! `kube::Config` ([`Sim::kube_config`]) per cluster.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod controllers;
pub mod discovery;
mod error;
mod http;
pub mod meta;
pub mod patch;
mod protobuf;
pub mod resources;
mod routes;
mod scale;
pub mod selector;
mod server;
pub mod ssa;
mod wire;

pub use cluster::{Cluster, ClusterSettings, Faults};
pub use error::{ApiError, Error, Result};
pub use server::{Sim, SimOptions};

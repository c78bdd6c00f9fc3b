//! gRPC service implementations: thin adapters from wire types to the hub's logic.
//! Errors become `tonic::Status` only through `From<Error> for Status`.

pub mod admin;
pub mod agent;
pub mod registration;

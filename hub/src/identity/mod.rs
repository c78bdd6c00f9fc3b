//! Who is calling: the hub's CA and the certificates it issues, the authentication of every RPC
//! by its client certificate (with revocations), and the checks of the names that end up in them.

pub mod auth;
pub mod pki;
pub mod validate;

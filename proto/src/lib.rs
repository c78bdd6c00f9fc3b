//! Flotilla's wire types (`flotilla.v1`) and the one place that builds an mTLS channel to the hub.
//!
//! Everything that crosses the network is defined in `proto/flotilla/v1/flotilla.proto`; crates convert
//! to their own types at their edges. The channel builder lives here so that the agent, the CLI and the
//! tests all speak to the hub with the same TLS settings.
#![forbid(unsafe_code)]

use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Generated code for the `flotilla.v1` package.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("flotilla.v1");
}

pub mod codec;
pub mod private_files;
pub mod status;

/// The URI SAN prefix scheme for identities issued by a hub: `spiffe://<trust-domain>/...`.
pub const SPIFFE_SCHEME: &str = "spiffe://";

/// Client-side TLS material, all PEM.
#[derive(Clone)]
pub struct ClientTls {
    /// The hub CA certificate the server must chain to.
    pub ca_pem: Vec<u8>,
    /// Client certificate and key; `None` for the one anonymous RPC (Register).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The hub address cannot be used for a TLS channel.
    #[error("invalid hub address {url:?}: {reason}")]
    InvalidHubUrl {
        /// The address as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an endpoint for `hub_url` (an `https://host:port` address) with the given TLS material.
/// The connection is made lazily, on first use, so handshake errors surface on the first RPC.
pub fn endpoint(hub_url: &str, tls: &ClientTls) -> Result<Endpoint> {
    let invalid = |reason: String| Error::InvalidHubUrl {
        url: hub_url.to_string(),
        reason,
    };
    if !hub_url.starts_with("https://") {
        return Err(invalid(
            "the hub is only served over TLS; use https://HOST:PORT".into(),
        ));
    }
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&tls.ca_pem));
    if let Some((cert, key)) = &tls.identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    let endpoint = Channel::from_shared(hub_url.to_string())
        .map_err(|e| invalid(e.to_string()))?
        .tls_config(config)
        .map_err(|e| invalid(error_chain(&e)))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(endpoint)
}

/// Renders an error with all its sources, `outer: inner: innermost`, because transport errors hide
/// the useful part (a TLS alert, a refused connection) several sources deep.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = inner.source();
    }
    out
}

/// Describes a failed RPC: the status message plus, for transport failures, the underlying cause.
pub fn describe_status(status: &tonic::Status) -> String {
    use std::error::Error as _;
    let mut out = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = status.source() {
        let chain = error_chain(source);
        if !out.contains(&chain) {
            out.push_str(": ");
            out.push_str(&chain);
        }
    }
    out
}

//! Who is calling: the identity in the verified client certificate, checked against revocations.
//!
//! rustls has already verified the chain to the hub CA and the validity period at handshake time.
//! This module adds what TLS cannot know: revocations (in memory, loaded from the store, updated before
//! a deregistration is acknowledged), expiry during a long-lived connection, and which kind of identity
//! an RPC requires. Request fields are never consulted.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use tonic::Request;

use crate::identity::pki::{Ca, Identity, PeerCert};
use crate::{Error, Result, now_unix};

/// Verifies callers of mTLS RPCs.
pub struct Auth {
    ca: Arc<Ca>,
    revoked: RwLock<HashSet<String>>,
}

impl Auth {
    pub fn new(ca: Arc<Ca>, revoked: HashSet<String>) -> Self {
        Self {
            ca,
            revoked: RwLock::new(revoked),
        }
    }

    /// Marks serials revoked for every later check.
    pub fn revoke(&self, serials: impl IntoIterator<Item = String>) {
        // A poisoned lock means a panic while inserting into a HashSet; the set itself is still sound.
        let mut set = self.revoked.write().unwrap_or_else(|p| p.into_inner());
        set.extend(serials);
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        let set = self.revoked.read().unwrap_or_else(|p| p.into_inner());
        set.contains(serial)
    }

    /// The caller's certificate, if it is valid right now.
    pub fn peer<T>(&self, request: &Request<T>) -> Result<PeerCert> {
        let certs = request.peer_certs().ok_or_else(|| {
            Error::Unauthenticated(
                "this RPC requires a client certificate issued by the hub CA".into(),
            )
        })?;
        let leaf = certs.first().ok_or_else(|| {
            Error::Unauthenticated(
                "this RPC requires a client certificate issued by the hub CA".into(),
            )
        })?;
        let peer = self.ca.peer_cert(leaf)?;
        if self.is_revoked(&peer.serial) {
            return Err(Error::Unauthenticated(format!(
                "certificate {} ({}) has been revoked",
                peer.serial,
                describe(&peer.identity)
            )));
        }
        if peer.not_after <= now_unix() {
            return Err(Error::Unauthenticated(format!(
                "certificate {} ({}) has expired",
                peer.serial,
                describe(&peer.identity)
            )));
        }
        Ok(peer)
    }

    /// The calling cluster; admin certificates cannot act as agents.
    pub fn cluster<T>(&self, request: &Request<T>) -> Result<(String, PeerCert)> {
        let peer = self.peer(request)?;
        match &peer.identity {
            Identity::Cluster(name) => Ok((name.clone(), peer)),
            Identity::Admin(who) => Err(Error::PermissionDenied(format!(
                "admin identity {who:?} cannot act as a cluster agent"
            ))),
        }
    }

    /// The calling operator; cluster certificates cannot call admin RPCs.
    pub fn admin<T>(&self, request: &Request<T>) -> Result<String> {
        let peer = self.peer(request)?;
        match peer.identity {
            Identity::Admin(who) => Ok(who),
            Identity::Cluster(name) => Err(Error::PermissionDenied(format!(
                "cluster {name:?} may not call admin RPCs"
            ))),
        }
    }
}

impl Auth {
    /// Who the caller claims to be, for the audit log of a refused call: its certificate's
    /// identity when it has one (valid or not), else `unauthenticated`.
    pub fn caller<T>(&self, request: &Request<T>) -> String {
        let Some(leaf) = request.peer_certs().and_then(|c| c.first().cloned()) else {
            return "unauthenticated".into();
        };
        match self.ca.peer_cert(&leaf) {
            Ok(peer) => match peer.identity {
                Identity::Cluster(name) => format!("cluster/{name}"),
                Identity::Admin(who) => format!("admin/{who}"),
            },
            Err(_) => "unauthenticated".into(),
        }
    }
}

fn describe(identity: &Identity) -> String {
    match identity {
        Identity::Cluster(name) => format!("cluster {name:?}"),
        Identity::Admin(who) => format!("admin {who:?}"),
    }
}

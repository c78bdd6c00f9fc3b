//! The audit log: every operator action (who, what, on which object, when), append-only in sled and
//! flushed before the action is acknowledged. Entries carry names and ids, never secrets.

use serde::{Deserialize, Serialize};

use crate::{Error, Result, now_ms};

/// One operator action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: i64,
    /// The admin identity from the caller's certificate.
    pub actor: String,
    /// e.g. `app.apply`, `rollout.pause`, `cluster.deregister`.
    pub action: String,
    /// The object acted on (`app/web`, `cluster/eu-1`, `token/1a2b3c4d`).
    pub target: String,
    pub detail: String,
}

/// Append-only log of operator actions.
#[derive(Clone)]
pub struct AuditLog {
    gate: crate::store::WriteGate,
    /// Appends take the next sequence number after the last entry, one at a time.
    append: std::sync::Arc<tokio::sync::Mutex<()>>,
    db: sled::Db,
    tree: sled::Tree,
}

impl AuditLog {
    pub fn open(db: &sled::Db, gate: crate::store::WriteGate) -> Result<Self> {
        Ok(Self {
            gate,
            append: Default::default(),
            tree: db.open_tree("audit")?,
            db: db.clone(),
        })
    }

    /// Appends an entry and flushes it.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: impl Into<String>,
    ) -> Result<()> {
        let _gate = self.gate.read().await;
        let _append = self.append.lock().await;
        // From the log itself (not sled's id generator), so a restored log continues its numbering.
        let seq = match self.tree.last()? {
            Some((k, _)) => <[u8; 8]>::try_from(&k[..]).map_or(0, u64::from_be_bytes) + 1,
            None => 1,
        };
        let entry = AuditEntry {
            seq,
            at_ms: now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.into(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(|e| Error::Corrupt {
            key: format!("audit/{seq}"),
            source: e,
        })?;
        // Big-endian keys keep sled's order equal to the order of the actions.
        self.tree.insert(seq.to_be_bytes(), bytes)?;
        crate::store::flush(&self.db).await?;
        tracing::info!(actor, action, target, "audit");
        Ok(())
    }

    /// The newest `limit` entries, oldest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for kv in self.tree.iter().rev().take(limit) {
            let (k, v) = kv?;
            out.push(serde_json::from_slice(&v).map_err(|e| Error::Corrupt {
                key: format!("audit/{}", String::from_utf8_lossy(&k)),
                source: e,
            })?);
        }
        out.reverse();
        Ok(out)
    }
}

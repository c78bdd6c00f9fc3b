//! The audit log: every operator action and every security event (who, what, on which object, the
//! outcome, when), append-only in sled. An action that changes stored state writes its entry in the
//! same sled transaction ([`append_in`]), so a crash can never leave one without the other; events
//! that change nothing else (a denied call, a webhook) are appended on their own. Entries carry
//! names and ids, never secrets.

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::{Error, Result, now_ms};

/// One recorded action or event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at_ms: i64,
    /// The admin identity from the caller's certificate, `cluster/NAME`, `token/ID`, `webhook`, ...
    pub actor: String,
    /// e.g. `app.apply`, `rollout.pause`, `cluster.register`, `denied`.
    pub action: String,
    /// The object acted on (`app/web`, `cluster/eu-1`, `token/1a2b3c4d`).
    pub target: String,
    pub detail: String,
}

/// What to record, before it has a number and a time.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

impl Record {
    pub fn new(
        actor: &str,
        action: &str,
        target: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.into(),
            detail: detail.into(),
        }
    }
}

/// The audit trees, for stores that write an entry with their own changes.
#[derive(Clone)]
pub struct Trees {
    pub log: sled::Tree,
    /// `next`: the sequence number of the next entry (a key of its own, so a transaction can take
    /// it; sled transactions cannot read a tree's last key).
    pub meta: sled::Tree,
}

const NEXT: &[u8] = b"next";

impl Trees {
    pub fn open(db: &sled::Db) -> Result<Self> {
        let trees = Self {
            log: db.open_tree("audit")?,
            meta: db.open_tree("audit_meta")?,
        };
        // Logs written before the counter existed (or restored ones) continue their numbering.
        if trees.meta.get(NEXT)?.is_none() {
            let next = match trees.log.last()? {
                Some((k, _)) => <[u8; 8]>::try_from(&k[..]).map_or(0, u64::from_be_bytes) + 1,
                None => 1,
            };
            trees.meta.insert(NEXT, &next.to_be_bytes())?;
        }
        Ok(trees)
    }
}

/// Appends `record` inside a transaction over the audit trees (and whatever the action writes).
pub fn append_in(
    log: &TransactionalTree,
    meta: &TransactionalTree,
    record: &Record,
) -> std::result::Result<u64, ConflictableTransactionError<Error>> {
    // A counter of the wrong size would restart at 1 and overwrite the log: refuse instead.
    let seq = match meta.get(NEXT)? {
        None => 1,
        Some(v) => u64::from_be_bytes(<[u8; 8]>::try_from(&v[..]).map_err(|_| {
            ConflictableTransactionError::Abort(Error::Internal(format!(
                "the audit counter is {} bytes, not 8",
                v.len()
            )))
        })?),
    };
    meta.insert(NEXT, &(seq + 1).to_be_bytes())?;
    let entry = AuditEntry {
        seq,
        at_ms: now_ms(),
        actor: record.actor.clone(),
        action: record.action.clone(),
        target: record.target.clone(),
        detail: record.detail.clone(),
    };
    let bytes = serde_json::to_vec(&entry).map_err(|e| {
        ConflictableTransactionError::Abort(Error::Corrupt {
            key: format!("audit/{seq}"),
            source: e,
        })
    })?;
    // Big-endian keys keep sled's order equal to the order of the actions.
    log.insert(&seq.to_be_bytes(), bytes)?;
    Ok(seq)
}

/// Events anyone can cause (a refused registration, a denied call) are recorded at most this often,
/// so a flood cannot grow the log without bound; what was left out is counted in the next entry.
const EVENTS_PER_SECOND: f64 = 10.0;
const EVENT_BURST: f64 = 100.0;
/// The longest detail kept from such an event.
const MAX_EVENT_DETAIL: usize = 1024;

struct Budget {
    tokens: f64,
    last: std::time::Instant,
    suppressed: u64,
}

/// Append-only log of operator actions and security events.
#[derive(Clone)]
pub struct AuditLog {
    gate: crate::db::WriteGate,
    db: sled::Db,
    trees: Trees,
    budget: std::sync::Arc<std::sync::Mutex<Budget>>,
}

impl AuditLog {
    pub fn open(db: &sled::Db, gate: crate::db::WriteGate) -> Result<Self> {
        Ok(Self {
            gate,
            trees: Trees::open(db)?,
            db: db.clone(),
            budget: std::sync::Arc::new(std::sync::Mutex::new(Budget {
                tokens: EVENT_BURST,
                last: std::time::Instant::now(),
                suppressed: 0,
            })),
        })
    }

    /// Records an event an unauthenticated party can cause, within the event budget.
    pub async fn record_event(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: impl Into<String>,
    ) -> Result<()> {
        let suppressed = {
            // Plain arithmetic under the lock: a poisoned lock still guards sound numbers.
            let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            let now = std::time::Instant::now();
            let refill = now.saturating_duration_since(b.last).as_secs_f64() * EVENTS_PER_SECOND;
            b.tokens = (b.tokens + refill).min(EVENT_BURST);
            b.last = now;
            if b.tokens < 1.0 {
                b.suppressed += 1;
                return Ok(());
            }
            b.tokens -= 1.0;
            std::mem::take(&mut b.suppressed)
        };
        let mut detail = detail.into();
        // What the caller sent (a claimed name inside an error, say) is theirs to make long.
        crate::sources::untrusted::cut(&mut detail, MAX_EVENT_DETAIL);
        if suppressed > 0 {
            detail.push_str(&format!(
                " ({suppressed} more such events before this one were not recorded: over {EVENTS_PER_SECOND}/s)"
            ));
        }
        self.record(actor, action, target, detail).await
    }

    /// Appends an event that changes nothing else, and flushes it.
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: impl Into<String>,
    ) -> Result<()> {
        let record = Record::new(actor, action, target, detail);
        let _gate = self.gate.read().await;
        use sled::Transactional;
        (&self.trees.log, &self.trees.meta)
            .transaction(|(log, meta)| append_in(log, meta, &record))?;
        crate::db::flush(&self.db).await?;
        tracing::info!(actor, action, target, "audit");
        Ok(())
    }

    /// The newest `limit` entries, oldest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        let mut out = Vec::new();
        for kv in self.trees.log.iter().rev().take(limit) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn numbering_continues_across_reopen_and_transactions() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = AuditLog::open(&db, Default::default()).unwrap();
        log.record("admin", "a.one", "x/1", "").await.unwrap();
        let trees = Trees::open(&db).unwrap();
        use sled::Transactional;
        let seq = (&trees.log, &trees.meta)
            .transaction(|(l, m)| append_in(l, m, &Record::new("admin", "a.two", "x/2", "")))
            .unwrap();
        assert_eq!(seq, 2);
        // A log from before the counter: the counter starts after its last entry.
        db.drop_tree("audit_meta").unwrap();
        let log = AuditLog::open(&db, Default::default()).unwrap();
        log.record("admin", "a.three", "x/3", "").await.unwrap();
        let seqs: Vec<u64> = log.recent(10).unwrap().iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[tokio::test]
    async fn events_anyone_can_cause_are_bounded_in_size_and_rate() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let log = AuditLog::open(&db, Default::default()).unwrap();
        for _ in 0..1_000 {
            log.record_event(
                "token/unknown",
                "cluster.register.refused",
                "cluster/x",
                "é".repeat(100_000),
            )
            .await
            .unwrap();
        }
        let entries = log.recent(10_000).unwrap();
        assert!(
            entries.len() <= EVENT_BURST as usize + 20,
            "{}",
            entries.len()
        );
        assert!(
            entries
                .iter()
                .all(|e| e.detail.len() <= MAX_EVENT_DETAIL + 200)
        );
    }
}

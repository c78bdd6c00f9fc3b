//! Durable hub state in sled: clusters, bootstrap tokens (hashes only), issued certificates and
//! revocations.
//!
//! Every write that a caller will be told about is flushed to disk before the method returns, so a
//! `kill -9` right after an acknowledgement loses nothing. Multi-record changes (a registration consumes
//! a token, creates a cluster and records a certificate) run in one sled transaction.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};

use crate::db::audit::{Record, append_in};
use crate::db::{WriteGate, flush};
use crate::identity::pki::IssuedCert;
use crate::{Error, Result};

/// A registered cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub registered_at: i64,
    /// The newest certificate issued to this cluster.
    pub cert_serial: String,
    pub cert_not_after: i64,
    /// Serials of this cluster's certificates that may still be unexpired (revoked on deregister).
    pub serials: Vec<String>,
    /// Last heartbeat, unix milliseconds; best-effort (written when a session ends).
    #[serde(default)]
    pub last_seen_ms: i64,
    /// Set by `cluster rebuild`: the next registration of this name is a recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_requested_at: Option<i64>,
    /// When the recovering agent registered (ms); cleared when all its apps are Healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovering_since_ms: Option<i64>,
    /// Registration → every app Healthy, for the last rebuild (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_recovery_ms: Option<i64>,
}

/// A bootstrap token, stored under the SHA-256 of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRecord {
    /// A short, non-secret handle for logs and errors.
    pub id: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub uses_left: u32,
    /// When set, the only cluster name this token can register.
    pub cluster: Option<String>,
    /// Set by `flotilla token revoke`: refused from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// A certificate the hub issued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CertRecord {
    pub serial: String,
    pub cluster: String,
    pub fingerprint: String,
    pub issued_at: i64,
    pub not_after: i64,
    pub reason: String,
}

/// A revoked certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub serial: String,
    pub cluster: String,
    pub revoked_at: i64,
    pub reason: String,
}

/// What a registration needs besides the token.
pub struct Registration<'a> {
    pub token_hash: &'a [u8],
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub cert: &'a IssuedCert,
    pub now: i64,
    pub now_ms: i64,
}

/// The hub's sled database.
#[derive(Clone)]
pub struct Store {
    gate: WriteGate,
    db: sled::Db,
    clusters: sled::Tree,
    /// `clusters` decoded, valid while `clusters_fresh` holds.
    clusters_cache: Arc<std::sync::Mutex<Option<Arc<Vec<ClusterRecord>>>>>,
    clusters_fresh: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped by every committed write of `clusters`: renders that read the clusters at one
    /// epoch need not run again while it holds.
    clusters_epoch: Arc<std::sync::atomic::AtomicU64>,
    tokens: sled::Tree,
    certs: sled::Tree,
    revoked: sled::Tree,
    audit: crate::db::audit::Trees,
}

type TxResult<T> = std::result::Result<T, ConflictableTransactionError<Error>>;

/// A record's bytes. Serializing these plain structs should not fail; if it ever does, the write
/// fails with it (never an empty record stored in its place).
fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|source| Error::Corrupt {
        key: std::any::type_name::<T>().to_string(),
        source,
    })
}

fn tx_encode<T: Serialize>(value: &T) -> TxResult<Vec<u8>> {
    encode(value).map_err(ConflictableTransactionError::Abort)
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|source| Error::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn tx_decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> TxResult<T> {
    decode(key, bytes).map_err(ConflictableTransactionError::Abort)
}

fn abort<T>(err: Error) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(err))
}

pub(crate) fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// Checks a token record for use by `name`; the error never includes the secret.
fn check_token(token: &TokenRecord, name: &str, now: i64) -> Result<()> {
    if let Some(at) = token.revoked_at {
        return Err(Error::Token(format!(
            "token {} was revoked at {}",
            token.id,
            format_time(at)
        )));
    }
    if token.expires_at <= now {
        return Err(Error::Token(format!(
            "token {} expired at {}",
            token.id,
            format_time(token.expires_at)
        )));
    }
    if token.uses_left == 0 {
        return Err(Error::Token(format!(
            "token {} has no registrations left",
            token.id
        )));
    }
    if let Some(bound) = &token.cluster
        && bound != name
    {
        return Err(Error::PermissionDenied(format!(
            "token {} is bound to cluster {bound:?}, not {name:?}",
            token.id
        )));
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the database under `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = sled::Config::new().path(path).open()?;
        Ok(Self {
            gate: WriteGate::default(),
            clusters: db.open_tree("clusters")?,
            clusters_cache: Default::default(),
            clusters_fresh: Default::default(),
            clusters_epoch: Default::default(),
            tokens: db.open_tree("tokens")?,
            certs: db.open_tree("certs")?,
            revoked: db.open_tree("revoked")?,
            audit: crate::db::audit::Trees::open(&db)?,
            db,
        })
    }

    /// The underlying database, for stores of other concerns that share it.
    pub fn gate(&self) -> WriteGate {
        self.gate.clone()
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    async fn flush(&self) -> Result<()> {
        flush(&self.db).await
    }

    /// Stores a new token under `hash`.
    pub async fn create_token(
        &self,
        hash: &[u8],
        token: &TokenRecord,
        audit: &Record,
    ) -> Result<()> {
        let _gate = self.gate.read().await;
        (&self.tokens, &self.audit.log, &self.audit.meta).transaction(|(tokens, log, meta)| {
            tokens.insert(hash, tx_encode(token)?)?;
            append_in(log, meta, audit)?;
            Ok(())
        })?;
        self.flush().await
    }

    /// Forgets tokens that can never register anything again (expired, used up or revoked) for
    /// longer than `keep` seconds; their creation and use stay in the audit log. Returns how many.
    pub async fn prune_tokens(&self, now: i64, keep: i64) -> Result<usize> {
        let _gate = self.gate.read().await;
        let mut doomed = Vec::new();
        for kv in self.tokens.iter() {
            let (k, v) = kv?;
            let t: TokenRecord = decode(&k, &v)?;
            // Dead from its revocation or its expiry, whichever came first (a used-up token's last
            // use is not recorded: its expiry bounds it).
            let dead_since = t.revoked_at.map_or(t.expires_at, |r| r.min(t.expires_at));
            if now.saturating_sub(dead_since) > keep {
                doomed.push(k);
            }
        }
        for k in &doomed {
            self.tokens.remove(k)?;
        }
        if !doomed.is_empty() {
            self.flush().await?;
        }
        Ok(doomed.len())
    }

    /// The handle of the token stored under `hash`, if any.
    pub fn token_id(&self, hash: &[u8]) -> Result<Option<String>> {
        self.tokens
            .get(hash)?
            .map(|v| decode::<TokenRecord>(b"token", &v).map(|t| t.id))
            .transpose()
    }

    /// Every token (hashes stay inside), oldest first.
    pub fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let mut out: Vec<TokenRecord> = self
            .tokens
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect::<Result<_>>()?;
        out.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(out)
    }

    /// Revokes the token with handle `id`; it is refused from now on.
    pub async fn revoke_token(&self, id: &str, now: i64, actor: &str) -> Result<TokenRecord> {
        let _gate = self.gate.read().await;
        let mut key = None;
        for kv in self.tokens.iter() {
            let (k, v) = kv?;
            let t: TokenRecord = decode(&k, &v)?;
            if t.id == id {
                key = Some(k);
                break;
            }
        }
        let key = key.ok_or_else(|| {
            Error::invalid("id", format!("no token {id:?} (see `flotilla token list`)"))
        })?;
        let trees = (&self.tokens, &self.audit.log, &self.audit.meta);
        let record = trees.transaction(|(tokens, log, meta)| {
            let Some(bytes) = tokens.get(&key)? else {
                return abort(Error::invalid("id", format!("no token {id:?}")));
            };
            let mut t: TokenRecord = tx_decode(&key, &bytes)?;
            if t.revoked_at.is_none() {
                t.revoked_at = Some(now);
                tokens.insert(&key, tx_encode(&t)?)?;
                append_in(
                    log,
                    meta,
                    &Record::new(actor, "token.revoke", format!("token/{id}"), ""),
                )?;
            }
            Ok(t)
        })?;
        self.flush().await?;
        Ok(record)
    }

    /// Checks, without consuming it, that the token could register `name` now.
    pub fn precheck_token(&self, hash: &[u8], name: &str, now: i64) -> Result<()> {
        let bytes = self
            .tokens
            .get(hash)?
            .ok_or_else(|| Error::Token("unknown token".into()))?;
        check_token(&decode(b"token", &bytes)?, name, now)
    }

    /// Registers a cluster: consumes one use of the token, creates (or takes over an expired) cluster
    /// record and records the certificate, atomically. Nothing changes when any check fails.
    pub async fn register(&self, reg: Registration<'_>) -> Result<ClusterRecord> {
        let _gate = self.gate.read().await;
        let trees = (
            &self.tokens,
            &self.clusters,
            &self.certs,
            &self.revoked,
            &self.audit.log,
            &self.audit.meta,
        );
        let record = trees.transaction(
            |(tokens, clusters, certs, revoked, log, meta)| {
                let Some(bytes) = tokens.get(reg.token_hash)? else {
                    return abort(Error::Token("unknown token".into()));
                };
                let mut token: TokenRecord = tx_decode(b"token", &bytes)?;
                check_token(&token, reg.name, reg.now)
                    .map_err(ConflictableTransactionError::Abort)?;

                let mut labels = BTreeMap::new();
                let mut recovery = (None, None);
                let mut took_over = None;
                if let Some(bytes) = clusters.get(reg.name)? {
                    let existing: ClusterRecord = tx_decode(reg.name.as_bytes(), &bytes)?;
                    if existing.cert_not_after > reg.now {
                        return abort(Error::AlreadyRegistered(reg.name.to_string()));
                    }
                    // A name that exists — offline, expired or being rebuilt — is taken only with
                    // a token an operator bound to it (`cluster rebuild`, `token create --cluster`):
                    // an unbound token would hand whoever holds it that cluster's labels and apps.
                    if token.cluster.as_deref() != Some(reg.name) {
                        return abort(Error::PermissionDenied(format!(
                            "cluster {:?} exists (its certificate lapsed); token {} is not bound to it: use `flotilla cluster rebuild {0}` or `flotilla token create --cluster {0}`",
                            reg.name, token.id
                        )));
                    }
                    took_over = Some(if existing.rebuild_requested_at.is_some() {
                        "a rebuild"
                    } else {
                        "an expired registration"
                    });
                    // A cluster whose certificate lapsed comes back as itself: same labels unless
                    // the new registration says otherwise; its old certificates stay dead.
                    labels = existing.labels.clone();
                    recovery = (
                        existing.rebuild_requested_at.map(|_| reg.now_ms),
                        existing.last_recovery_ms,
                    );
                    for serial in &existing.serials {
                        revoke_in(revoked, serial, reg.name, reg.now, "re-registered")?;
                    }
                }
                labels.extend(reg.labels.iter().map(|(k, v)| (k.clone(), v.clone())));

                token.uses_left -= 1;
                tokens.insert(reg.token_hash, tx_encode(&token)?)?;
                let record = ClusterRecord {
                    name: reg.name.to_string(),
                    labels,
                    registered_at: reg.now,
                    cert_serial: reg.cert.serial.clone(),
                    cert_not_after: reg.cert.not_after,
                    serials: vec![reg.cert.serial.clone()],
                    last_seen_ms: 0,
                    rebuild_requested_at: None,
                    recovering_since_ms: recovery.0,
                    last_recovery_ms: recovery.1,
                };
                clusters.insert(reg.name.as_bytes(), tx_encode(&record)?)?;
                certs.insert(
                    reg.cert.serial.as_bytes(),
                    tx_encode(&CertRecord {
                        serial: reg.cert.serial.clone(),
                        cluster: reg.name.to_string(),
                        fingerprint: reg.cert.fingerprint.clone(),
                        issued_at: reg.now,
                        not_after: reg.cert.not_after,
                        reason: format!("registered with token {}", token.id),
                    })?,
                )?;
                let mut detail = format!(
                    "serial {}, labels {:?}",
                    reg.cert.serial, record.labels
                );
                if let Some(what) = took_over {
                    detail.push_str(&format!("; replaces {what}"));
                }
                append_in(
                    log,
                    meta,
                    &Record::new(
                        &format!("token/{}", token.id),
                        "cluster.register",
                        format!("cluster/{}", reg.name),
                        detail,
                    ),
                )?;
                Ok(record)
            },
        )?;
        self.clusters_touched();
        self.flush().await?;
        Ok(record)
    }

    /// Records a renewed certificate for `name`.
    pub async fn renew(&self, name: &str, cert: &IssuedCert, now: i64) -> Result<ClusterRecord> {
        let _gate = self.gate.read().await;
        let trees = (
            &self.clusters,
            &self.certs,
            &self.audit.log,
            &self.audit.meta,
        );
        let record = trees.transaction(|(clusters, certs, log, meta)| {
            let Some(bytes) = clusters.get(name)? else {
                return abort(Error::ClusterNotFound(name.to_string()));
            };
            let mut record: ClusterRecord = tx_decode(name.as_bytes(), &bytes)?;
            record.cert_serial = cert.serial.clone();
            record.cert_not_after = cert.not_after;
            // Serials of certificates that have expired can never be used again: drop them.
            let mut live = Vec::with_capacity(record.serials.len() + 1);
            for serial in &record.serials {
                if let Some(bytes) = certs.get(serial.as_bytes())? {
                    let c: CertRecord = tx_decode(serial.as_bytes(), &bytes)?;
                    if c.not_after > now {
                        live.push(serial.clone());
                    }
                }
            }
            live.push(cert.serial.clone());
            record.serials = live;
            clusters.insert(name.as_bytes(), tx_encode(&record)?)?;
            certs.insert(
                cert.serial.as_bytes(),
                tx_encode(&CertRecord {
                    serial: cert.serial.clone(),
                    cluster: name.to_string(),
                    fingerprint: cert.fingerprint.clone(),
                    issued_at: now,
                    not_after: cert.not_after,
                    reason: "renewed".into(),
                })?,
            )?;
            append_in(
                log,
                meta,
                &Record::new(
                    &format!("cluster/{name}"),
                    "cluster.renew",
                    format!("cluster/{name}"),
                    format!("serial {}", cert.serial),
                ),
            )?;
            Ok(record)
        })?;
        self.clusters_touched();
        self.flush().await?;
        Ok(record)
    }

    /// Marks the decoded clusters stale: called after every committed write of the tree.
    fn clusters_touched(&self) {
        self.clusters_epoch
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.clusters_fresh
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Changes whenever the registered clusters (names, labels) may have changed.
    pub fn clusters_epoch(&self) -> u64 {
        self.clusters_epoch
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// All clusters, by name: decoded once per change of the tree, not per call (the rollout
    /// controller asks twice a second).
    pub fn clusters(&self) -> Result<Arc<Vec<ClusterRecord>>> {
        let mut cached = self
            .clusters_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Cleared before the read: a write committed meanwhile marks it stale again.
        let fresh = self
            .clusters_fresh
            .swap(true, std::sync::atomic::Ordering::SeqCst);
        if let (true, Some(all)) = (fresh, cached.as_ref()) {
            return Ok(Arc::clone(all));
        }
        let read: Result<Vec<ClusterRecord>> = self
            .clusters
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                decode(&key, &value)
            })
            .collect();
        match read {
            Ok(all) => {
                let all = Arc::new(all);
                *cached = Some(Arc::clone(&all));
                Ok(all)
            }
            Err(e) => {
                self.clusters_touched();
                Err(e)
            }
        }
    }

    /// One cluster.
    pub fn cluster(&self, name: &str) -> Result<Option<ClusterRecord>> {
        self.clusters
            .get(name)?
            .map(|bytes| decode(name.as_bytes(), &bytes))
            .transpose()
    }

    /// Sets and removes labels of a cluster (labels already validated).
    pub async fn label(
        &self,
        name: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
        audit: &Record,
    ) -> Result<ClusterRecord> {
        let _gate = self.gate.read().await;
        let trees = (&self.clusters, &self.audit.log, &self.audit.meta);
        let record = trees.transaction(|(clusters, log, meta)| {
            let Some(bytes) = clusters.get(name)? else {
                return abort(Error::ClusterNotFound(name.to_string()));
            };
            let mut record: ClusterRecord = tx_decode(name.as_bytes(), &bytes)?;
            for key in remove {
                record.labels.remove(key);
            }
            record
                .labels
                .extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            clusters.insert(name.as_bytes(), tx_encode(&record)?)?;
            append_in(log, meta, audit)?;
            Ok(record)
        })?;
        self.clusters_touched();
        self.flush().await?;
        Ok(record)
    }

    /// Removes a cluster and revokes every certificate it may still hold. Returns the revoked serials.
    pub async fn deregister(&self, name: &str, now: i64, actor: &str) -> Result<Vec<String>> {
        let _gate = self.gate.read().await;
        let trees = (
            &self.clusters,
            &self.revoked,
            &self.audit.log,
            &self.audit.meta,
        );
        let serials = trees.transaction(|(clusters, revoked, log, meta)| {
            let Some(bytes) = clusters.remove(name.as_bytes())? else {
                return abort(Error::ClusterNotFound(name.to_string()));
            };
            let record: ClusterRecord = tx_decode(name.as_bytes(), &bytes)?;
            for serial in &record.serials {
                revoke_in(revoked, serial, name, now, "deregistered")?;
            }
            append_in(
                log,
                meta,
                &Record::new(
                    actor,
                    "cluster.deregister",
                    format!("cluster/{name}"),
                    format!("revoked {:?}", record.serials),
                ),
            )?;
            Ok(record.serials)
        })?;
        self.clusters_touched();
        self.flush().await?;
        Ok(serials)
    }

    /// Starts a rebuild of `name`: revokes every certificate it holds, lets its name register again
    /// (keeping labels) and stores `token` (bound to `name`), atomically. Returns the revoked serials.
    pub async fn rebuild(
        &self,
        name: &str,
        now: i64,
        token_hash: &[u8],
        token: &TokenRecord,
        actor: &str,
    ) -> Result<Vec<String>> {
        let _gate = self.gate.read().await;
        let trees = (
            &self.clusters,
            &self.revoked,
            &self.tokens,
            &self.audit.log,
            &self.audit.meta,
        );
        let serials = trees.transaction(|(clusters, revoked, tokens, log, meta)| {
            let Some(bytes) = clusters.get(name.as_bytes())? else {
                return abort(Error::ClusterNotFound(name.to_string()));
            };
            let mut record: ClusterRecord = tx_decode(name.as_bytes(), &bytes)?;
            for serial in &record.serials {
                revoke_in(revoked, serial, name, now, "cluster rebuilt")?;
            }
            let revoked_serials = std::mem::take(&mut record.serials);
            record.cert_not_after = now;
            record.rebuild_requested_at = Some(now);
            record.recovering_since_ms = None;
            clusters.insert(name.as_bytes(), tx_encode(&record)?)?;
            tokens.insert(token_hash, tx_encode(token)?)?;
            append_in(
                log,
                meta,
                &Record::new(
                    actor,
                    "cluster.rebuild",
                    format!("cluster/{name}"),
                    format!(
                        "revoked {revoked_serials:?}; token {} (bound to {name}, expires {})",
                        token.id,
                        format_time(token.expires_at)
                    ),
                ),
            )?;
            Ok(revoked_serials)
        })?;
        self.clusters_touched();
        self.flush().await?;
        Ok(serials)
    }

    /// Records that a recovering cluster runs every app Healthy again, `elapsed_ms` after it registered.
    pub async fn finish_recovery(&self, name: &str, elapsed_ms: i64) -> Result<()> {
        let _gate = self.gate.read().await;
        self.clusters.transaction(|clusters| {
            if let Some(bytes) = clusters.get(name)? {
                let mut record: ClusterRecord = tx_decode(name.as_bytes(), &bytes)?;
                record.recovering_since_ms = None;
                record.last_recovery_ms = Some(elapsed_ms);
                clusters.insert(name.as_bytes(), tx_encode(&record)?)?;
            }
            Ok(())
        })?;
        self.clusters_touched();
        self.flush().await
    }

    /// Every revoked serial (loaded into memory at start).
    pub fn revoked_serials(&self) -> Result<HashSet<String>> {
        self.revoked
            .iter()
            .keys()
            .map(|key| Ok(String::from_utf8_lossy(&key?).into_owned()))
            .collect()
    }

    /// Best-effort record of when a cluster was last heard from; not flushed (nobody is told).
    pub fn record_last_seen(&self, name: &str, last_seen_ms: i64) -> Result<()> {
        self.clusters.transaction(|clusters| {
            if let Some(bytes) = clusters.get(name)? {
                let mut record: ClusterRecord = tx_decode(name.as_bytes(), &bytes)?;
                record.last_seen_ms = record.last_seen_ms.max(last_seen_ms);
                clusters.insert(name.as_bytes(), tx_encode(&record)?)?;
            }
            Ok(())
        })?;
        self.clusters_touched();
        Ok(())
    }

    /// Flushes everything; called at shutdown.
    pub async fn close(&self) -> Result<()> {
        self.flush().await
    }
}

fn revoke_in(
    revoked: &TransactionalTree,
    serial: &str,
    cluster: &str,
    now: i64,
    reason: &str,
) -> TxResult<()> {
    revoked.insert(
        serial.as_bytes(),
        tx_encode(&Revocation {
            serial: serial.to_string(),
            cluster: cluster.to_string(),
            revoked_at: now,
            reason: reason.to_string(),
        })?,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(serial: &str, not_after: i64) -> IssuedCert {
        IssuedCert {
            pem: String::new(),
            serial: serial.into(),
            fingerprint: "ff".into(),
            not_after,
        }
    }

    async fn token(store: &Store, hash: &[u8], uses: u32, cluster: Option<&str>) {
        let record = TokenRecord {
            id: "t1".into(),
            created_at: 0,
            expires_at: 1_000,
            uses_left: uses,
            cluster: cluster.map(Into::into),
            revoked_at: None,
        };
        let audit = Record::new("admin", "token.create", "token/t1", "");
        store.create_token(hash, &record, &audit).await.unwrap();
    }

    fn reg<'a>(
        hash: &'a [u8],
        name: &'a str,
        labels: &'a BTreeMap<String, String>,
        c: &'a IssuedCert,
        now: i64,
    ) -> Registration<'a> {
        Registration {
            token_hash: hash,
            name,
            labels,
            cert: c,
            now,
            now_ms: now * 1000,
        }
    }

    #[tokio::test]
    async fn registration_checks_leave_state_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let labels = BTreeMap::new();
        token(&store, b"h1", 1, Some("a")).await;
        let c1 = cert("01", 500);

        let err = store
            .register(reg(b"nope", "a", &labels, &c1, 10))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Token(_)), "{err}");
        let err = store
            .register(reg(b"h1", "b", &labels, &c1, 10))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        let err = store
            .register(reg(b"h1", "a", &labels, &c1, 2_000))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
        assert!(store.clusters().unwrap().is_empty());

        store
            .register(reg(b"h1", "a", &labels, &c1, 10))
            .await
            .unwrap();
        let err = store
            .register(reg(b"h1", "a", &labels, &cert("02", 500), 11))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no registrations left"), "{err}");
        assert_eq!(store.cluster("a").unwrap().unwrap().cert_serial, "01");
    }

    #[tokio::test]
    async fn live_names_are_exclusive_and_lapsed_ones_come_back_only_with_a_bound_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        token(&store, b"h", 5, None).await;
        let labels = BTreeMap::from([("region".to_string(), "eu".to_string())]);
        store
            .register(reg(b"h", "a", &labels, &cert("01", 100), 10))
            .await
            .unwrap();
        let err = store
            .register(reg(b"h", "a", &BTreeMap::new(), &cert("02", 200), 50))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::AlreadyRegistered(_)));
        // Lapsed: an unbound token may not take the name (nor its labels and apps).
        let err = store
            .register(reg(b"h", "a", &BTreeMap::new(), &cert("03", 300), 150))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        assert!(err.to_string().contains("not bound"), "{err}");
        assert_eq!(store.cluster("a").unwrap().unwrap().cert_serial, "01");
        token(&store, b"bound", 1, Some("a")).await;
        let back = store
            .register(reg(b"bound", "a", &BTreeMap::new(), &cert("03", 300), 150))
            .await
            .unwrap();
        assert_eq!(back.labels, labels);
        assert!(store.revoked_serials().unwrap().contains("01"));
        // Each registration is in the audit log with its token, in the same transaction.
        let log = crate::db::audit::AuditLog::open(store.db(), store.gate()).unwrap();
        let regs: Vec<_> = log
            .recent(10)
            .unwrap()
            .into_iter()
            .filter(|e| e.action == "cluster.register")
            .collect();
        assert_eq!(regs.len(), 2);
        assert!(
            regs[1].detail.contains("replaces an expired registration"),
            "{regs:?}"
        );
        assert_eq!(regs[1].actor, "token/t1");
    }

    #[tokio::test]
    async fn tokens_that_can_never_register_again_are_forgotten_after_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Expires at 1_000 (see `token`).
        token(&store, b"old", 1, None).await;
        assert_eq!(
            store.prune_tokens(1_500, 3_600).await.unwrap(),
            0,
            "kept a while"
        );
        assert_eq!(store.prune_tokens(5_000, 3_600).await.unwrap(), 1);
        assert!(store.tokens().unwrap().is_empty());
        // Revoked early: its revocation starts the clock.
        token(&store, b"rev", 1, None).await;
        store.revoke_token("t1", 100, "admin").await.unwrap();
        assert_eq!(store.prune_tokens(500, 300).await.unwrap(), 1);
    }

    /// Opens a store just dropped: sled's flusher thread lets go of the directory's lock within
    /// its flush interval, not at once.
    fn reopen(path: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(path) {
                Ok(store) => return store,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("lock"), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("reopening {}: {e}", path.display()),
            }
        }
    }

    #[tokio::test]
    async fn deregister_revokes_every_live_serial_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            token(&store, b"h", 1, None).await;
            store
                .register(reg(b"h", "a", &BTreeMap::new(), &cert("01", 900), 10))
                .await
                .unwrap();
            store.renew("a", &cert("02", 950), 20).await.unwrap();
            let revoked = store.deregister("a", 30, "admin").await.unwrap();
            assert_eq!(revoked, vec!["01".to_string(), "02".to_string()]);
        }
        let store = reopen(dir.path());
        assert!(store.cluster("a").unwrap().is_none());
        let revoked = store.revoked_serials().unwrap();
        assert!(revoked.contains("01") && revoked.contains("02"));
    }
}

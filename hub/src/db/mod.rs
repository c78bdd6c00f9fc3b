//! Durable state: the clusters' store (identities, tokens, certificates), the apps' store (each
//! app's record plus one slot per cluster), the audit log, backups, and the write gate and flush
//! they share. The rest of the hub reads and writes through these types, never through sled.

pub mod appstore;
pub mod audit;
pub mod backup;
pub mod fsutil;
pub mod store;

/// Writers of acknowledged state hold it shared; a backup holds it exclusively, so its snapshot sees
/// every tree as of one instant.
pub type WriteGate = std::sync::Arc<tokio::sync::RwLock<()>>;

/// Makes every write so far durable before returning.
///
/// Not `flush_async`: it runs the flush on sled's own small thread pool, and concurrent flushes there
/// can occupy every pool thread waiting for log buffers that only that same pool writes — a deadlock
/// seen with 200 agents registering at once. A blocking flush on tokio's blocking pool leaves sled's
/// pool free to write.
pub async fn flush(db: &sled::Db) -> crate::Result<()> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| crate::Error::Internal(format!("flush task failed: {e}")))??;
    Ok(())
}

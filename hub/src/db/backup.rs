//! Hub backup and restore. A backup is an online snapshot of every sled tree (taken while writers
//! are held off, so all trees are from one instant) plus the PKI; the private keys and the trees
//! (bundles hold Secret data) are sealed under an operator passphrase (PBKDF2-HMAC-SHA256 →
//! AES-256-GCM, both from ring), never written in clear. Only public certificates and the hub's
//! settings are readable without it.
//! A restore rebuilds a data directory that serves the same CA and hub identity, so agents
//! reconnect with the certificates they hold and revocations keep holding.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::db::fsutil::{create_private_dir, read_file, write_private, write_public};
use crate::identity::pki::{PkiPaths, hex};
use crate::{Error, Hub, Result, now_unix};

pub const FORMAT: &str = "flotilla-backup/v2";
/// Backups from before the trees were sealed; still restored.
const FORMAT_V1: &str = "flotilla-backup/v1";
/// Every tree that holds acknowledged state (reports are included: restored status is not blank).
const TREES: &[&str] = &[
    "clusters",
    "tokens",
    "certs",
    "revoked",
    "apps",
    "app_clusters",
    "app_tombstones",
    "bundles",
    "reports",
    "audit",
];
/// OWASP's 2023 recommendation for PBKDF2-HMAC-SHA256.
const PBKDF2_ITERATIONS: u32 = 600_000;
pub const MIN_PASSPHRASE_LEN: usize = 12;

/// Private key files sealed in a backup.
const KEY_FILES: &[&str] = &["ca-key.pem", "hub-key.pem", "admin-key.pem"];
/// Public files carried in clear.
const PUBLIC_FILES: &[&str] = &["ca.pem", "hub.pem", "admin.pem"];

/// Ciphertext with what is needed to derive its key again from the passphrase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sealed {
    pub kdf: String,
    pub iterations: u32,
    pub salt: String,
    pub nonce: String,
    pub ciphertext: String,
}

/// The backup file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Backup {
    pub format: String,
    pub created_at: i64,
    /// `hub.json`: settings fixed at init (trust domain).
    pub hub_config: String,
    /// Public PKI files by name.
    pub public: BTreeMap<String, String>,
    /// The private keys and (v2) the trees, sealed: [`Contents`].
    pub keys: Sealed,
    /// v1 only: tree → [(hex key, hex value)] in clear.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub trees: BTreeMap<String, Vec<(String, String)>>,
}

/// What a v2 backup seals.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Contents {
    keys: BTreeMap<String, String>,
    /// Tree → [(hex key, hex value)], in key order.
    #[serde(default)]
    trees: BTreeMap<String, Vec<(String, String)>>,
}

/// What a restore brought back, for the operator.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub created_at: i64,
    pub records: BTreeMap<String, usize>,
    /// App records restored although they do not decode (`--keep-unreadable`): the hub holds
    /// each such app until an operator fixes or deletes it.
    pub unreadable: Vec<Unreadable>,
}

/// A record of a backup that does not decode as what its tree holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub tree: String,
    pub key: String,
    pub error: String,
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tree {}, key {:?}: {}", self.tree, self.key, self.error)
    }
}

/// Whether one record decodes as what its tree holds; the error if not. Bundles are checked when
/// served (their digest), not here.
fn check_record(tree: &str, value: &[u8]) -> std::result::Result<(), String> {
    fn json<T: serde::de::DeserializeOwned>(v: &[u8]) -> std::result::Result<(), String> {
        serde_json::from_slice::<T>(v)
            .map(drop)
            .map_err(|e| e.to_string())
    }
    match tree {
        "clusters" => json::<crate::db::store::ClusterRecord>(value),
        "tokens" => json::<crate::db::store::TokenRecord>(value),
        "certs" => json::<crate::db::store::CertRecord>(value),
        "revoked" => json::<crate::db::store::Revocation>(value),
        "apps" => json::<crate::db::appstore::AppRecord>(value),
        "app_clusters" => crate::db::appstore::check_slot(value),
        "audit" => json::<crate::db::audit::AuditEntry>(value),
        "reports" => <flotilla_proto::v1::AppStatus as prost::Message>::decode(value)
            .map(drop)
            .map_err(|e| e.to_string()),
        "app_tombstones" if value.len() == 8 => Ok(()),
        "app_tombstones" => Err(format!("{} bytes, not 8", value.len())),
        _ => Ok(()),
    }
}

/// Tree → its (key, value) rows, as decoded from a backup.
type Rows = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// Every record of `trees` that does not decode.
fn unreadable_records(trees: &Rows) -> Vec<Unreadable> {
    trees
        .iter()
        .flat_map(|(tree, rows)| {
            rows.iter().filter_map(move |(k, v)| {
                check_record(tree, v).err().map(|error| Unreadable {
                    tree: tree.clone(),
                    key: String::from_utf8_lossy(k).into_owned(),
                    error,
                })
            })
        })
        .collect()
}

fn unhex(field: &str, text: &str) -> Result<Vec<u8>> {
    let bad = || Error::invalid("backup", format!("{field}: not hex"));
    if !text.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2).ok_or_else(bad)?, 16).map_err(|_| bad()))
        .collect()
}

fn derive_key(passphrase: &str, salt: &[u8], iterations: u32) -> Result<LessSafeKey> {
    let iterations = NonZeroU32::new(iterations)
        .ok_or_else(|| Error::invalid("backup", "key derivation with 0 iterations"))?;
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        iterations,
        salt,
        passphrase.as_bytes(),
        &mut key,
    );
    let unbound = UnboundKey::new(&AES_256_GCM, &key)
        .map_err(|_| Error::Internal("AES-256-GCM key".into()))?;
    Ok(LessSafeKey::new(unbound))
}

fn check_passphrase(passphrase: &str) -> Result<()> {
    if passphrase.chars().count() < MIN_PASSPHRASE_LEN {
        return Err(Error::invalid(
            "passphrase",
            format!("must be at least {MIN_PASSPHRASE_LEN} characters"),
        ));
    }
    Ok(())
}

/// The env variable a passphrase may come from when no file is given.
pub const PASSPHRASE_ENV: &str = "FLOTILLA_BACKUP_PASSPHRASE";

/// Reads the operator's passphrase from `file` (trailing newline dropped) or [`PASSPHRASE_ENV`];
/// never from argv, which every local user can read.
pub fn read_passphrase(file: Option<&Path>) -> Result<String> {
    let text = match file {
        Some(path) => String::from_utf8(read_file(path)?).map_err(|_| {
            Error::invalid("passphrase", format!("{} is not UTF-8", path.display()))
        })?,
        None => std::env::var(PASSPHRASE_ENV).map_err(|_| {
            Error::invalid(
                "passphrase",
                format!("give --passphrase-file or set {PASSPHRASE_ENV}"),
            )
        })?,
    };
    let passphrase = text.trim_end_matches(['\n', '\r']).to_string();
    check_passphrase(&passphrase)?;
    Ok(passphrase)
}

/// Seals `plaintext` under `passphrase`.
pub fn seal(passphrase: &str, plaintext: &[u8]) -> Result<Sealed> {
    seal_with(passphrase, plaintext, crate::system_random)
}

/// [`seal`] with the randomness for its salt and nonce from `random`: a failure refuses, it never
/// seals under a predictable salt or nonce.
fn seal_with(
    passphrase: &str,
    plaintext: &[u8],
    random: impl Fn(&mut [u8]) -> Result<()>,
) -> Result<Sealed> {
    check_passphrase(passphrase)?;
    let mut salt = [0u8; 16];
    let mut nonce = [0u8; 12];
    random(&mut salt)?;
    random(&mut nonce)?;
    let key = derive_key(passphrase, &salt, PBKDF2_ITERATIONS)?;
    let mut data = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(FORMAT.as_bytes()),
        &mut data,
    )
    .map_err(|_| Error::Internal("sealing the backup keys".into()))?;
    Ok(Sealed {
        kdf: "pbkdf2-hmac-sha256".into(),
        iterations: PBKDF2_ITERATIONS,
        salt: hex(&salt),
        nonce: hex(&nonce),
        ciphertext: hex(&data),
    })
}

/// Opens what [`seal`] sealed; a wrong passphrase and a tampered file look alike.
pub fn unseal(passphrase: &str, sealed: &Sealed) -> Result<Vec<u8>> {
    if sealed.kdf != "pbkdf2-hmac-sha256" {
        return Err(Error::invalid(
            "backup",
            format!("unknown key derivation {:?}", sealed.kdf),
        ));
    }
    let key = derive_key(
        passphrase,
        &unhex("keys.salt", &sealed.salt)?,
        sealed.iterations,
    )?;
    let nonce: [u8; 12] = unhex("keys.nonce", &sealed.nonce)?
        .try_into()
        .map_err(|_| Error::invalid("backup", "keys.nonce: not 12 bytes"))?;
    let mut data = unhex("keys.ciphertext", &sealed.ciphertext)?;
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(FORMAT.as_bytes()),
            &mut data,
        )
        .map_err(|_| {
            Error::invalid(
                "passphrase",
                "does not open this backup's keys (wrong passphrase, or the file was altered)",
            )
        })?;
    Ok(plain.to_vec())
}

/// Takes a backup of a serving hub. Writers wait (briefly) while the trees are read.
pub async fn take(hub: &Hub, passphrase: &str) -> Result<Vec<u8>> {
    check_passphrase(passphrase)?;
    let paths = PkiPaths::new(&hub.data_dir);
    let mut keys = BTreeMap::new();
    for name in KEY_FILES {
        let text = String::from_utf8(read_file(&paths.dir.join(name))?)
            .map_err(|_| Error::Internal(format!("{name} is not UTF-8")))?;
        keys.insert(name.to_string(), text);
    }
    let mut public = BTreeMap::new();
    for name in PUBLIC_FILES {
        let text = String::from_utf8(read_file(&paths.dir.join(name))?)
            .map_err(|_| Error::Internal(format!("{name} is not UTF-8")))?;
        public.insert(name.to_string(), text);
    }
    let hub_config = String::from_utf8(read_file(&hub.data_dir.join("hub.json"))?)
        .map_err(|_| Error::Internal("hub.json is not UTF-8".into()))?;
    let trees = {
        let _exclusive = hub.store.gate().write_owned().await;
        let db = hub.store.db();
        let mut trees = BTreeMap::new();
        for name in TREES {
            let tree = db.open_tree(name)?;
            let mut entries = Vec::with_capacity(tree.len());
            for kv in tree.iter() {
                let (k, v) = kv?;
                entries.push((hex(&k), hex(&v)));
            }
            trees.insert(name.to_string(), entries);
        }
        trees
    };
    let contents = serde_json::to_vec(&Contents { keys, trees }).map_err(|e| Error::Corrupt {
        key: "backup contents".into(),
        source: e,
    })?;
    let passphrase = passphrase.to_string();
    // Key derivation is deliberately slow: keep it off the async workers.
    let sealed = tokio::task::spawn_blocking(move || seal(&passphrase, &contents))
        .await
        .map_err(|e| Error::Internal(format!("sealing task: {e}")))??;
    let backup = Backup {
        format: FORMAT.into(),
        created_at: now_unix(),
        hub_config,
        public,
        keys: sealed,
        trees: BTreeMap::new(),
    };
    serde_json::to_vec(&backup).map_err(|e| Error::Corrupt {
        key: "backup".into(),
        source: e,
    })
}

/// Rebuilds a hub data directory from a backup. `data_dir` must not exist or be empty; nothing is
/// written until the backup has been parsed and its keys opened.
///
/// Every record is decoded first. One that does not read is refused, naming tree, key and error —
/// unless it is an app record and `keep_unreadable` is set: then it is restored as it is and
/// returned in the summary (the hub holds such an app, and says so, until it is fixed).
pub fn restore(
    data_dir: &Path,
    bytes: &[u8],
    passphrase: &str,
    keep_unreadable: bool,
) -> Result<Summary> {
    let backup: Backup = serde_json::from_slice(bytes)
        .map_err(|e| Error::invalid("backup", format!("not a Flotilla backup: {e}")))?;
    let opened = unseal(passphrase, &backup.keys)?;
    let contents: Contents = match backup.format.as_str() {
        FORMAT => serde_json::from_slice(&opened)
            .map_err(|e| Error::invalid("backup", format!("sealed contents: {e}")))?,
        FORMAT_V1 => Contents {
            keys: serde_json::from_slice(&opened)
                .map_err(|e| Error::invalid("backup", format!("sealed keys: {e}")))?,
            trees: backup.trees.clone(),
        },
        other => {
            return Err(Error::invalid(
                "backup",
                format!("format {other:?}, this hub reads {FORMAT} and {FORMAT_V1}"),
            ));
        }
    };
    let keys = contents.keys;
    for name in KEY_FILES {
        if !keys.contains_key(*name) {
            return Err(Error::invalid("backup", format!("sealed keys lack {name}")));
        }
    }
    for name in PUBLIC_FILES {
        if !backup.public.contains_key(*name) {
            return Err(Error::invalid("backup", format!("lacks {name}")));
        }
    }
    let mut decoded = BTreeMap::new();
    for (tree, entries) in &contents.trees {
        if !TREES.contains(&tree.as_str()) {
            return Err(Error::invalid("backup", format!("unknown tree {tree:?}")));
        }
        let mut rows = Vec::with_capacity(entries.len());
        for (k, v) in entries {
            rows.push((unhex(tree, k)?, unhex(tree, v)?));
        }
        decoded.insert(tree.clone(), rows);
    }
    let unreadable = unreadable_records(&decoded);
    let refused: Vec<&Unreadable> = unreadable
        .iter()
        .filter(|u| !(keep_unreadable && matches!(u.tree.as_str(), "apps" | "app_clusters")))
        .collect();
    if !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(|u| u.to_string()).collect();
        let hint = if refused
            .iter()
            .all(|u| matches!(u.tree.as_str(), "apps" | "app_clusters"))
        {
            "; restore with --keep-unreadable to keep them as they are (the hub then holds each such app, neither applying nor pruning it, until it is fixed or deleted)"
        } else {
            ""
        };
        return Err(Error::invalid(
            "backup",
            format!(
                "{} record(s) cannot be read: {}{hint}",
                refused.len(),
                list.join("; ")
            ),
        ));
    }
    if data_dir.exists()
        && std::fs::read_dir(data_dir)
            .map_err(|e| Error::io(data_dir, e))?
            .next()
            .is_some()
    {
        return Err(Error::DataDir {
            path: data_dir.display().to_string(),
            reason: "is not empty; restore into a new directory".into(),
        });
    }
    create_private_dir(data_dir)?;
    let paths = PkiPaths::new(data_dir);
    create_private_dir(&paths.dir)?;

    let db = sled::Config::new().path(data_dir.join("db")).open()?;
    let mut summary = Summary {
        created_at: backup.created_at,
        records: BTreeMap::new(),
        unreadable,
    };
    for (name, rows) in decoded {
        let tree = db.open_tree(&name)?;
        let mut batch = sled::Batch::default();
        let count = rows.len();
        for (k, v) in rows {
            batch.insert(k, v);
        }
        tree.apply_batch(batch)?;
        summary.records.insert(name, count);
    }
    db.flush()?;
    drop(db);

    for name in KEY_FILES {
        write_private(&paths.dir.join(name), keys[*name].as_bytes())?;
    }
    write_public(&data_dir.join("hub.json"), backup.hub_config.as_bytes())?;
    for name in ["hub.pem", "admin.pem"] {
        write_public(&paths.dir.join(name), backup.public[name].as_bytes())?;
    }
    // ca.pem last: as at init, its presence marks a complete data directory.
    write_public(&paths.ca(), backup.public["ca.pem"].as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_keys_open_only_with_the_passphrase() {
        let sealed = seal("correct horse battery", b"-----BEGIN PRIVATE KEY-----").unwrap();
        assert!(!sealed.ciphertext.contains("BEGIN"));
        assert_eq!(
            unseal("correct horse battery", &sealed).unwrap(),
            b"-----BEGIN PRIVATE KEY-----"
        );
        let err = unseal("wrong horse battery", &sealed)
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrong passphrase"), "{err}");
        let mut tampered = sealed.clone();
        let flipped = if tampered.ciphertext.starts_with("00") {
            "ff"
        } else {
            "00"
        };
        tampered.ciphertext.replace_range(0..2, flipped);
        assert!(unseal("correct horse battery", &tampered).is_err());
        assert!(seal("short", b"x").unwrap_err().to_string().contains("12"));
    }

    #[test]
    fn a_failing_random_number_generator_refuses_to_seal() {
        let failing = |_: &mut [u8]| Err(Error::Internal("rng down".into()));
        let err = seal_with("correct horse battery", b"k", failing).unwrap_err();
        assert!(err.to_string().contains("rng down"), "{err}");
        // The salt and nonce come from the generator given.
        let sevens = |buf: &mut [u8]| {
            buf.fill(7);
            Ok(())
        };
        let sealed = seal_with("correct horse battery", b"k", sevens).unwrap();
        assert_eq!(sealed.salt, "07".repeat(16));
        assert_eq!(sealed.nonce, "07".repeat(12));
    }
}

//! The agent's bundle cache is sealed: bundles carry Secret data, and a copy on the node's disk
//! must be no easier to read than the Secret in the cluster. AES-256-GCM (ring) under a key kept
//! beside the agent's identity (its identity Secret in-cluster, `cache.key` out of cluster).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::{Error, Result};

/// Marks a sealed value (older caches held plain JSON, read as such until rewritten).
const MAGIC: &[u8] = b"FLC1";

/// The key bundles are sealed under.
pub struct CacheKey(LessSafeKey);

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(..)")
    }
}

/// 32 fresh random bytes for a new key; an error, never zeros, when the system RNG fails.
pub fn new_key() -> Result<[u8; 32]> {
    let mut key = [0u8; 32];
    SystemRandom::new()
        .fill(&mut key)
        .map_err(|_| Error::Credentials {
            context: "the bundle cache key".into(),
            reason: "the system random number generator failed".into(),
        })?;
    Ok(key)
}

impl CacheKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self> {
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| Error::Credentials {
            context: "the bundle cache key".into(),
            reason: "not an AES-256 key".into(),
        })?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// `MAGIC ‖ nonce ‖ ciphertext ‖ tag`; `what` (the app) is bound in as associated data, so a
    /// sealed bundle cannot be passed off as another app's.
    pub fn seal(&self, what: &str, plain: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| Error::Cache("the system random number generator failed".into()))?;
        let mut data = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(what.as_bytes()),
                &mut data,
            )
            .map_err(|_| Error::Cache(format!("sealing the cached bundle of {what}")))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// The plaintext of a value written by [`Self::seal`] (or a legacy plain one).
    pub fn open(&self, what: &str, stored: &[u8]) -> Result<Vec<u8>> {
        let Some(rest) = stored.strip_prefix(MAGIC) else {
            return Ok(stored.to_vec());
        };
        if rest.len() < NONCE_LEN {
            return Err(Error::Cache(format!(
                "the cached bundle of {what} is truncated"
            )));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| Error::Cache(format!("the cached bundle of {what} is corrupt")))?;
        let mut data = sealed.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(what.as_bytes()), &mut data)
            .map_err(|_| {
                Error::Cache(format!(
                    "the cached bundle of {what} does not open with this agent's cache key (altered, or another agent's)"
                ))
            })?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_hide_their_content_and_open_only_as_themselves() {
        let key = CacheKey::from_bytes(&new_key().unwrap()).unwrap();
        let plain = br#"{"kind":"Secret","data":{"password":"canary-value"}}"#;
        let sealed = key.seal("web", plain).unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("canary-value"));
        assert_eq!(key.open("web", &sealed).unwrap(), plain);
        assert!(key.open("other-app", &sealed).is_err(), "bound to its app");
        let other = CacheKey::from_bytes(&new_key().unwrap()).unwrap();
        assert!(other.open("web", &sealed).is_err(), "another agent's key");
        // Caches from before sealing still read.
        assert_eq!(key.open("web", b"{}").unwrap(), b"{}");
    }
}

//! Object metadata helpers: names, timestamps, uids, and the validation the API server does on them.

use std::time::SystemTime;

use serde_json::Value;

use crate::error::ApiError;

/// Now, RFC 3339 with seconds, as Kubernetes writes timestamps.
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A random RFC 4122 version-4 UUID.
pub fn uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Random bytes from the system CSPRNG (zeros if it is unavailable, which only weakens uniqueness).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut b = [0u8; N];
    let _ = SystemRandom::new().fill(&mut b);
    b
}

/// A 5-character suffix for `generateName`, from the API server's alphabet.
pub fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

fn label_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Checks an object name: DNS-1123 label for kinds that need one, subdomain otherwise.
pub fn validate_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let label_kinds = ["Namespace", "Service"];
    let ok = if label_kinds.contains(&kind) {
        label_ok(name)
    } else {
        name.len() <= 253 && name.split('.').all(label_ok)
    };
    if ok {
        return Ok(());
    }
    let rule = if label_kinds.contains(&kind) {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
    } else {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
    };
    Err(ApiError::invalid(
        kind,
        name,
        vec![(
            "metadata.name".into(),
            format!("Invalid value: {name:?}: {rule}"),
        )],
    ))
}

/// `metadata.name`, if present.
pub fn name_of(obj: &Value) -> Option<&str> {
    obj["metadata"]["name"].as_str()
}

/// Everything but metadata and status: what bumps `generation` when it changes.
pub fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        m.remove("status");
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// Removes `null` map values, recursively: a built-in object round-trips through typed structs in
/// a real API server, where a null field is an absent one (kubectl's typed patches send many).
pub fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

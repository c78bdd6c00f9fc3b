//! Pure checks of names and labels, shared by registration and the admin API.
//!
//! Cluster names end up in certificate URIs, Kubernetes labels and file names, so they follow the
//! strictest common rule: a DNS-1123 label. Labels follow Kubernetes' label syntax so that selectors
//! written for Kubernetes work unchanged on clusters.

use std::collections::BTreeMap;

use crate::{Error, Result};

/// Checks a cluster name: a DNS-1123 label (lowercase alphanumerics and '-', 1..=63, alphanumeric ends).
pub fn cluster_name(name: &str) -> Result<()> {
    dns1123_label(name)
        .map_err(|reason| Error::invalid("cluster name", format!("{name:?} {reason}")))
}

fn dns1123_label(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > 63 {
        return Err("is longer than 63 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must consist of lowercase letters, digits and '-'".into());
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

fn dns1123_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("is longer than 253 characters".into());
    }
    s.split('.').try_for_each(dns1123_label)
}

/// A Kubernetes "qualified name" segment: 1..=63 alphanumerics, '-', '_', '.', alphanumeric ends.
fn qualified_segment(s: &str, allow_empty: bool) -> Result<(), String> {
    if s.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err("is empty".into())
        };
    }
    if s.len() > 63 {
        return Err("is longer than 63 characters".into());
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("must consist of alphanumerics, '-', '_' and '.'".into());
    }
    let first = s.as_bytes()[0];
    let last = s.as_bytes()[s.len() - 1];
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("must start and end with an alphanumeric character".into());
    }
    Ok(())
}

/// Checks a label key (`[prefix/]name`) as Kubernetes does.
pub fn label_key(key: &str) -> Result<()> {
    let check = || -> Result<(), String> {
        match key.split_once('/') {
            Some((prefix, name)) => {
                dns1123_subdomain(prefix).map_err(|r| format!("prefix {r}"))?;
                qualified_segment(name, false)
            }
            None => qualified_segment(key, false),
        }
    };
    check().map_err(|reason| Error::invalid("label key", format!("{key:?} {reason}")))
}

/// Checks a label value as Kubernetes does (may be empty).
pub fn label_value(key: &str, value: &str) -> Result<()> {
    qualified_segment(value, true)
        .map_err(|reason| Error::invalid("label value", format!("{key}={value:?}: value {reason}")))
}

/// Checks every label of a set.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<()> {
    labels.iter().try_for_each(|(k, v)| {
        label_key(k)?;
        label_value(k, v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        let table = [
            ("prod-eu-1", true),
            ("a", true),
            ("0abc", true),
            ("", false),
            ("Prod", false),
            ("-a", false),
            ("a-", false),
            ("a.b", false),
            ("a_b", false),
            (&"x".repeat(63), true),
            (&"x".repeat(64), false),
        ];
        for (name, ok) in table {
            assert_eq!(cluster_name(name).is_ok(), ok, "{name:?}");
        }
    }

    #[test]
    fn label_keys_and_values() {
        let keys = [
            ("region", true),
            ("flotilla.dev/tier", true),
            ("a_b.c-d", true),
            ("/x", false),
            ("Example.com/x", false),
            ("x/", false),
            ("a/b/c", false),
            ("-x", false),
        ];
        for (key, ok) in keys {
            assert_eq!(label_key(key).is_ok(), ok, "{key:?}");
        }
        for (value, ok) in [("", true), ("eu-west", true), ("a b", false), ("x-", false)] {
            assert_eq!(label_value("k", value).is_ok(), ok, "{value:?}");
        }
    }

    #[test]
    fn errors_name_the_field() {
        let err = cluster_name("Bad_Name").unwrap_err().to_string();
        assert!(
            err.contains("cluster name") && err.contains("Bad_Name"),
            "{err}"
        );
    }
}

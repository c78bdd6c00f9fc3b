//! Credentials for private git repositories. They come from a file on the hub (`--repo-credentials`),
//! never from App documents (those live in git, where secrets do not belong). Each entry names a URL
//! prefix; a fetch under it sends HTTP Basic authentication to that host only: gix refuses to follow
//! redirects once a request carries configured headers, so the secret cannot be bounced elsewhere.

use std::path::{Path, PathBuf};

use base64::Engine;
use serde::Deserialize;

use crate::db::fsutil::read_file;
use crate::{Error, Result};

/// One entry of the credentials file.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    /// `https://host[:port]/path-prefix`; plain `http://` only for loopback hosts (tests).
    url: String,
    /// Defaults to `git`; token-based hosts accept any user name with the token as the password.
    #[serde(default = "default_username")]
    username: String,
    /// File holding the password or access token.
    password_file: PathBuf,
}

fn default_username() -> String {
    "git".into()
}

/// A secret that never prints.
#[derive(Clone)]
struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Credentials for the repositories under one URL prefix.
#[derive(Debug, Clone)]
pub struct RepoCredential {
    prefix: String,
    username: String,
    password: Secret,
}

impl RepoCredential {
    /// The `Authorization` request header (for gix's `http.extraHeader`).
    pub fn authorization_header(&self) -> String {
        let pair = format!("{}:{}", self.username, self.password.0);
        format!(
            "Authorization: Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// Every configured credential.
#[derive(Debug, Clone, Default)]
pub struct RepoCredentials {
    entries: Vec<RepoCredential>,
}

fn is_loopback(host: &str) -> bool {
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    host == "localhost" || host == "[::1]" || host.starts_with("127.")
}

/// `scheme://authority/` + path: the prefix always ends its authority with `/`, so
/// `https://git.example.com` can never match `https://git.example.com.evil.test/`.
fn normalized_prefix(url: &str, at: &str) -> Result<String> {
    let bad = |why: &str| Error::invalid("repo credentials", format!("{at}: url {url:?} {why}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("is not a URL"))?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("must name a host, without user information"));
    }
    match scheme {
        "https" => {}
        "http" if is_loopback(authority) => {}
        "http" => {
            return Err(bad(
                "is plain http: credentials would travel in clear (only loopback hosts may use http)",
            ));
        }
        _ => return Err(bad("must be https://")),
    }
    Ok(format!("{scheme}://{authority}/{path}"))
}

impl RepoCredentials {
    /// Reads the credentials file (YAML list) and every password file it names.
    pub fn load(path: &Path) -> Result<Self> {
        let where_ = path.display().to_string();
        let text = String::from_utf8(read_file(path)?)
            .map_err(|_| Error::invalid("repo credentials", format!("{where_}: not UTF-8")))?;
        let entries: Vec<Entry> = serde_yaml_ng::from_str(&text)
            .map_err(|e| Error::invalid("repo credentials", format!("{where_}: {e}")))?;
        let mut out = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            let at = format!("{where_} entry {}", i + 1);
            let prefix = normalized_prefix(&e.url, &at)?;
            let password = String::from_utf8(read_file(&e.password_file)?)
                .map_err(|_| {
                    Error::invalid(
                        "repo credentials",
                        format!("{at}: {} is not UTF-8", e.password_file.display()),
                    )
                })?
                .trim()
                .to_string();
            if password.is_empty() {
                return Err(Error::invalid(
                    "repo credentials",
                    format!("{at}: {} is empty", e.password_file.display()),
                ));
            }
            out.push(RepoCredential {
                prefix,
                username: e.username,
                password: Secret(password),
            });
        }
        Ok(Self { entries: out })
    }

    /// The credential whose prefix is the longest match for `url`.
    pub fn for_url(&self, url: &str) -> Option<&RepoCredential> {
        self.entries
            .iter()
            .filter(|c| url.starts_with(&c.prefix))
            .max_by_key(|c| c.prefix.len())
    }

    /// The configured URL prefixes (no secrets), for the hub's start-up log.
    pub fn prefixes(&self) -> Vec<&str> {
        self.entries.iter().map(|c| c.prefix.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str) -> Result<RepoCredentials> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        let yaml = yaml.replace("TOKEN", &dir.path().join("token").display().to_string());
        std::fs::write(dir.path().join("creds.yaml"), yaml).unwrap();
        RepoCredentials::load(&dir.path().join("creds.yaml"))
    }

    #[test]
    fn longest_prefix_on_the_same_host_only() {
        let c = load(
            "- {url: \"https://git.example.com\", passwordFile: TOKEN}\n- {url: \"https://git.example.com/team/\", username: bot, passwordFile: TOKEN}\n",
        )
        .unwrap();
        assert_eq!(
            c.for_url("https://git.example.com/team/app.git")
                .unwrap()
                .prefix(),
            "https://git.example.com/team/"
        );
        assert_eq!(
            c.for_url("https://git.example.com/other.git")
                .unwrap()
                .prefix(),
            "https://git.example.com/"
        );
        assert!(
            c.for_url("https://git.example.com.evil.test/x.git")
                .is_none()
        );
        assert!(c.for_url("http://git.example.com/x.git").is_none());
        let header = c
            .for_url("https://git.example.com/team/a")
            .unwrap()
            .authorization_header();
        assert_eq!(header, "Authorization: Basic Ym90OnMzY3JldA==");
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn refuses_plain_http_userinfo_and_empty_secrets() {
        for (yaml, want) in [
            (
                "- {url: \"http://git.example.com/\", passwordFile: TOKEN}",
                "in clear",
            ),
            (
                "- {url: \"https://u:p@git.example.com/\", passwordFile: TOKEN}",
                "user information",
            ),
            (
                "- {url: \"ssh://git.example.com/\", passwordFile: TOKEN}",
                "https://",
            ),
            ("- {url: \"https://x/\", token: y}", "unknown field"),
        ] {
            let err = load(yaml).unwrap_err().to_string();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        assert!(load("- {url: \"http://127.0.0.1:8080/\", passwordFile: TOKEN}").is_ok());
    }
}

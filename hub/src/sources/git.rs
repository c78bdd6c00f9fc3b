//! Git access through gix: one bare cache repository per source URL, fetched with force-updating
//! refspecs (so force-pushes are followed), refs resolved to commits, and trees read straight from
//! the object database (no checkout) with limits and symlink containment.
//!
//! Everything here blocks; callers run it on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::ObjectId;

use crate::{Error, Result};

/// Limits on what a source tree may contain.
#[derive(Debug, Clone, Copy)]
pub struct TreeLimits {
    pub max_file_bytes: u64,
    pub max_files: usize,
    pub max_depth: usize,
    /// Bytes of every file read, counted once per path (a blob that many paths name is rendered
    /// once per path, so it costs once per path), checked before the blob is loaded.
    pub max_total_bytes: u64,
}

/// The render budget, in bytes, of one source tree (and of one rendered bundle).
pub const MAX_RENDER_BYTES: u64 = 64 * 1024 * 1024;

impl Default for TreeLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 8 * 1024 * 1024,
            max_files: 10_000,
            max_depth: 32,
            max_total_bytes: MAX_RENDER_BYTES,
        }
    }
}

/// What a walk has read so far: the byte budget, and each blob loaded once by id.
#[derive(Default)]
struct Budget {
    bytes: u64,
    blobs: std::collections::HashMap<ObjectId, std::sync::Arc<Vec<u8>>>,
}

/// An error with its causes, "a: b: c" (gix's top-level messages alone rarely say what happened).
fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn git_err(context: impl std::fmt::Display) -> impl FnOnce(String) -> Error {
    move |e| Error::Source(format!("{context}: {e}"))
}

/// The cache directory for `url` under `root`.
pub fn cache_path(root: &Path, url: &str) -> PathBuf {
    let d = ring::digest::digest(&ring::digest::SHA256, url.as_bytes());
    let hex: String = d.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    root.join(hex)
}

/// Removes `*.lock` files under a cache repository; returns how many. Only this hub writes its
/// caches, and it fetches each repository one at a time, so a lock that exists before a fetch
/// starts was left by a fetch that was killed (`kill -9`, power loss); left alone it would fail
/// every later fetch and freeze the repository at its last revision.
fn remove_stale_locks(repo: &Path) -> usize {
    let mut removed = 0;
    let mut dirs = vec![(repo.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let path = entry.path();
            if kind.is_dir() {
                // Objects are immutable and hold no locks; refs nest as deep as branch names.
                if depth < 64 && entry.file_name() != "objects" {
                    dirs.push((path, depth + 1));
                }
            } else if path.extension().is_some_and(|e| e == "lock")
                && std::fs::remove_file(&path).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

/// Brings the cache of `url` up to date with its branches and tags, authenticating with
/// `credential` when given.
pub fn fetch(
    root: &Path,
    url: &str,
    credential: Option<&crate::sources::credentials::RepoCredential>,
) -> Result<()> {
    let path = cache_path(root, url);
    let stale = remove_stale_locks(&path);
    if stale > 0 {
        tracing::warn!(
            url,
            locks = stale,
            "removed stale lock files from the cache (a fetch was killed)"
        );
    }
    let repo = if path.join("HEAD").exists() {
        gix::open(&path).map_err(|e| Error::Source(format!("opening the cache of {url}: {e}")))?
    } else {
        std::fs::create_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        gix::init_bare(&path)
            .map_err(|e| Error::Source(format!("creating the cache of {url}: {e}")))?
    };
    let remote = repo
        .remote_at(url)
        .map_err(|e| Error::Source(format!("{url}: {e}")))?
        .with_refspecs(
            [
                "+refs/heads/*:refs/remotes/origin/*",
                "+refs/tags/*:refs/tags/*",
            ],
            gix::remote::Direction::Fetch,
        )
        .map_err(|e| Error::Source(format!("{url}: {e}")))?;
    let interrupt = AtomicBool::new(false);
    let mut connection = remote
        .connect(gix::remote::Direction::Fetch)
        .map_err(|e| chain(&e))
        .map_err(git_err(format!("connecting to {url}")))?
        // A server never prompts: no terminal, no credential helpers of the machine it runs on;
        // only what --repo-credentials configures.
        .with_credentials(|_| Ok(None));
    if let Some(credential) = credential {
        use gix::protocol::transport::client::blocking_io::http;
        let mut options = repo
            .transport_options(url, None)
            .map_err(|e| Error::Source(format!("{url}: transport options: {e}")))?
            .and_then(|o| o.downcast::<http::Options>().ok())
            .ok_or_else(|| {
                Error::Source(format!(
                    "{url}: credentials are configured for it, but it is not an http(s) URL"
                ))
            })?;
        options
            .extra_headers
            .push(credential.authorization_header());
        // With a configured header gix refuses redirects anyway; say so explicitly.
        options.follow_redirects = http::options::FollowRedirects::None;
        connection = connection.with_transport_options(options);
    }
    // Our credential function answers every request for credentials with none: if one was asked
    // for, the server wants authentication that --repo-credentials does not provide.
    let with_credentials = credential.is_some();
    let explain = |e: &dyn std::error::Error| {
        let text = chain(e);
        if !with_credentials && text.contains("credentials") {
            format!(
                "{text} (the repository wants authentication; add its URL to --repo-credentials)"
            )
        } else if with_credentials && text.contains("'dumb' protocol") {
            // Redirects are not followed once credentials are attached (they would carry the
            // secret to wherever the server points); gix then sees no smart-protocol answer.
            "the server did not answer with git's smart HTTP protocol: most likely it redirected \
             the request, which the hub refuses for repositories with credentials (so the secret \
             never leaves the host it was configured for); use the URL it redirects to"
                .to_string()
        } else {
            text
        }
    };
    connection
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(|e| explain(&e))
        .map_err(git_err(format!("fetching {url}")))?
        .receive(gix::progress::Discard, &interrupt)
        .map_err(|e| explain(&e))
        .map_err(git_err(format!("fetching {url}")))?;
    Ok(())
}

/// Resolves a branch, tag or commit id of the cached `url` to a commit id (hex).
pub fn resolve(root: &Path, url: &str, reference: &str) -> Result<String> {
    let repo = gix::open(cache_path(root, url))
        .map_err(|e| Error::Source(format!("{url} is not fetched yet: {e}")))?;
    for name in [
        format!("refs/remotes/origin/{reference}"),
        format!("refs/tags/{reference}"),
    ] {
        if let Ok(Some(mut r)) = repo.try_find_reference(name.as_str()) {
            let commit = r.peel_to_commit().map_err(|e| {
                Error::Source(format!("{url}: {name} does not point to a commit: {e}"))
            })?;
            return Ok(commit.id.to_hex().to_string());
        }
    }
    if reference.len() == 40 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
        let id = ObjectId::from_hex(reference.as_bytes())
            .map_err(|e| Error::Source(format!("{reference}: {e}")))?;
        let commit = repo.find_commit(id).map_err(|_| {
            Error::Source(format!(
                "{url}: commit {reference} not found (is it on a branch or tag of the remote?)"
            ))
        })?;
        return Ok(commit.id.to_hex().to_string());
    }
    Err(Error::Source(format!(
        "{url}: no branch, tag or commit named {reference:?}"
    )))
}

/// The files under `path` at `commit`: (path relative to `path`, contents), sorted by path.
/// Symlinks are followed only when their target stays under `path`.
pub fn read_tree(
    root: &Path,
    url: &str,
    commit: &str,
    path: &str,
    limits: TreeLimits,
) -> Result<Vec<(String, Vec<u8>)>> {
    let repo =
        gix::open(cache_path(root, url)).map_err(|e| Error::Source(format!("{url}: {e}")))?;
    let id = ObjectId::from_hex(commit.as_bytes())
        .map_err(|e| Error::Source(format!("{commit}: {e}")))?;
    let tree = repo
        .find_commit(id)
        .and_then(|c| c.tree())
        .map_err(|e| Error::Source(format!("{url}@{commit}: {e}")))?;
    let base = path.trim_matches('/');
    let start = if base.is_empty() {
        tree
    } else {
        let entry = tree
            .lookup_entry_by_path(base)
            .map_err(|e| Error::Source(format!("{url}@{commit}: {e}")))?
            .ok_or_else(|| Error::Source(format!("path {base:?} does not exist at {commit}")))?;
        if !entry.mode().is_tree() {
            return Err(Error::Source(format!(
                "path {base:?} is not a directory at {commit}"
            )));
        }
        repo.find_tree(entry.oid().to_owned())
            .map_err(|e| Error::Source(e.to_string()))?
    };
    let mut files = Vec::new();
    let mut budget = Budget::default();
    walk(
        &repo,
        &start,
        String::new(),
        0,
        limits,
        &mut budget,
        &mut files,
    )?;
    // Resolve symlinks against the collected files (targets must stay inside `path`).
    let mut out = Vec::with_capacity(files.len());
    for entry in &files {
        match entry {
            Walked::File(p, data) => out.push((p.clone(), data.to_vec())),
            Walked::Link(p, target) => {
                let resolved = resolve_link(p, target).ok_or_else(|| {
                    Error::Source(format!(
                        "symlink {p} -> {target} points outside the source path {base:?}"
                    ))
                })?;
                let data = files
                    .iter()
                    .find_map(|f| match f {
                        Walked::File(fp, d) if *fp == resolved => Some(d.to_vec()),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        Error::Source(format!(
                            "symlink {p} -> {target} does not point to a file in the source path"
                        ))
                    })?;
                budget.bytes += data.len() as u64;
                if budget.bytes > limits.max_total_bytes {
                    return Err(over_budget(limits));
                }
                out.push((p.clone(), data));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

enum Walked {
    File(String, std::sync::Arc<Vec<u8>>),
    Link(String, String),
}

fn over_budget(limits: TreeLimits) -> Error {
    Error::Source(format!(
        "the source tree holds more than {} bytes to render (every path that names a file counts)",
        limits.max_total_bytes
    ))
}

fn walk(
    repo: &gix::Repository,
    tree: &gix::Tree<'_>,
    prefix: String,
    depth: usize,
    limits: TreeLimits,
    budget: &mut Budget,
    out: &mut Vec<Walked>,
) -> Result<()> {
    if depth > limits.max_depth {
        return Err(Error::Source(format!(
            "{prefix}: directories nested deeper than {}",
            limits.max_depth
        )));
    }
    for entry in tree.iter() {
        let entry = entry.map_err(|e| Error::Source(e.to_string()))?;
        let name = entry.filename().to_string();
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        let mode = entry.mode();
        if mode.is_tree() {
            let sub = repo
                .find_tree(entry.oid().to_owned())
                .map_err(|e| Error::Source(e.to_string()))?;
            walk(repo, &sub, path, depth + 1, limits, budget, out)?;
            continue;
        }
        if mode.is_commit() {
            continue; // submodules are not followed
        }
        let header = repo
            .find_header(entry.oid().to_owned())
            .map_err(|e| Error::Source(e.to_string()))?;
        if header.size() > limits.max_file_bytes {
            return Err(Error::Source(format!(
                "{path} is {} bytes, over the {} byte limit",
                header.size(),
                limits.max_file_bytes
            )));
        }
        budget.bytes += header.size();
        if budget.bytes > limits.max_total_bytes {
            return Err(over_budget(limits));
        }
        let oid = entry.oid().to_owned();
        let data = match budget.blobs.get(&oid) {
            Some(data) => std::sync::Arc::clone(data),
            None => {
                let blob = repo
                    .find_blob(oid)
                    .map_err(|e| Error::Source(e.to_string()))?;
                let data = std::sync::Arc::new(blob.data.clone());
                budget.blobs.insert(oid, std::sync::Arc::clone(&data));
                data
            }
        };
        if mode.is_link() {
            out.push(Walked::Link(
                path,
                String::from_utf8_lossy(&data).into_owned(),
            ));
        } else {
            out.push(Walked::File(path, data));
        }
        if out.len() > limits.max_files {
            return Err(Error::Source(format!(
                "more than {} files under the source path",
                limits.max_files
            )));
        }
    }
    Ok(())
}

/// Resolves a symlink target relative to the link's directory; `None` if it leaves the root.
fn resolve_link(link: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        return None;
    }
    let mut parts: Vec<&str> = link.split('/').collect();
    parts.pop();
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_locks_are_removed_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let refs = dir.path().join("refs/remotes/origin/feature");
        std::fs::create_dir_all(&refs).unwrap();
        std::fs::create_dir_all(dir.path().join("objects/pack")).unwrap();
        for f in [
            "refs/remotes/origin/main.lock",
            "refs/remotes/origin/feature/x.lock",
            "packed-refs.lock",
            "HEAD",
            "refs/remotes/origin/main",
            "objects/pack/p.pack",
        ] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        assert_eq!(remove_stale_locks(dir.path()), 3);
        assert!(
            dir.path().join("HEAD").exists()
                && dir.path().join("refs/remotes/origin/main").exists()
        );
        assert!(!dir.path().join("packed-refs.lock").exists());
        assert_eq!(remove_stale_locks(dir.path()), 0);
    }

    #[test]
    fn symlink_targets_must_stay_inside() {
        assert_eq!(
            resolve_link("a/b.yaml", "c.yaml").as_deref(),
            Some("a/c.yaml")
        );
        assert_eq!(
            resolve_link("a/b.yaml", "../c.yaml").as_deref(),
            Some("c.yaml")
        );
        assert_eq!(resolve_link("b.yaml", "../c.yaml"), None);
        assert_eq!(resolve_link("a/b.yaml", "/etc/passwd"), None);
    }
}

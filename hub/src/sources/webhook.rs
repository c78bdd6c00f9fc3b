//! The hub's HTTP listener: git push webhooks (GitHub, Gitea, GitLab), HMAC-verified, metrics, and
//! the probes a platform runs (`/healthz`, `/readyz`). A webhook only triggers a fetch of the
//! repositories it names; the revision always comes from git itself.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

use crate::{Error, Hub, Result};

/// Webhook bodies larger than this are refused (413).
pub const MAX_BODY: usize = 1024 * 1024;

/// Normalizes a repository URL for matching: no trailing slash, no `.git`, lowercase host part.
pub fn normalize_url(url: &str) -> String {
    let trimmed = url.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_suffix(".git").unwrap_or(trimmed);
    trimmed.to_lowercase()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Checks a webhook's authentication against `secret`: GitHub's `X-Hub-Signature-256`, Gitea's
/// `X-Gitea-Signature` (HMAC-SHA256 of the body), or GitLab's `X-Gitlab-Token` (the secret itself).
pub fn verify(headers: &HeaderMap, body: &[u8], secret: &[u8]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(sig) = header("x-hub-signature-256").and_then(|s| s.strip_prefix("sha256=")) {
        return hex_decode(sig).is_some_and(|tag| ring::hmac::verify(&key, body, &tag).is_ok());
    }
    if let Some(sig) = header("x-gitea-signature") {
        return hex_decode(sig).is_some_and(|tag| ring::hmac::verify(&key, body, &tag).is_ok());
    }
    if let Some(token) = header("x-gitlab-token") {
        // Constant-time comparison through HMAC of both values.
        let a = ring::hmac::sign(&key, token.as_bytes());
        return ring::hmac::verify(&key, secret, a.as_ref()).is_ok();
    }
    false
}

/// Repository URLs a push payload names.
pub fn payload_urls(payload: &Value) -> Vec<String> {
    let repo = &payload["repository"];
    [
        "clone_url",
        "git_url",
        "ssh_url",
        "html_url",
        "url",
        "git_http_url",
        "git_ssh_url",
        "homepage",
    ]
    .iter()
    .filter_map(|k| repo[*k].as_str())
    .map(normalize_url)
    .collect()
}

/// How long a delivery is remembered: a replay within it triggers nothing.
const REPLAY_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
/// The most deliveries remembered at once (the oldest are forgotten first).
const MAX_REMEMBERED: usize = 10_000;

/// Deliveries seen recently, by the body's digest — what the signature covers, so a captured
/// webhook replayed with a fresh delivery id is still the same delivery — and by the forge's
/// delivery id (`X-GitHub-Delivery`, `X-Gitea-Delivery`, `X-Gitlab-Event-UUID`): a replay triggers
/// nothing. Pure apart from the clock it is given.
#[derive(Default)]
pub(crate) struct Deliveries {
    seen: std::collections::HashMap<String, std::time::Instant>,
    order: std::collections::VecDeque<(std::time::Instant, String)>,
}

impl Deliveries {
    /// Whether a delivery known by `keys` is new (and now remembered under each of them): one
    /// seen under any of its keys is a replay.
    pub(crate) fn first(&mut self, keys: &[String], now: std::time::Instant) -> bool {
        while let Some((at, old)) = self.order.front() {
            if now.saturating_duration_since(*at) <= REPLAY_WINDOW
                && self.order.len() < MAX_REMEMBERED
            {
                break;
            }
            if self.seen.get(old) == Some(at) {
                self.seen.remove(old);
            }
            self.order.pop_front();
        }
        if keys.iter().any(|k| self.seen.contains_key(k)) {
            return false;
        }
        for key in keys {
            self.seen.insert(key.clone(), now);
            self.order.push_back((now, key.clone()));
        }
        true
    }
}

/// What identifies one delivery: the digest of its body (the signature covers it) and the forge's
/// delivery id when it sends one.
struct DeliveryKeys {
    body: String,
    id: Option<String>,
}

impl DeliveryKeys {
    fn of(headers: &HeaderMap, body: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, body);
        let id = [
            "x-github-delivery",
            "x-gitea-delivery",
            "x-gitlab-event-uuid",
        ]
        .into_iter()
        .find_map(|h| {
            let id = headers.get(h)?.to_str().ok()?;
            Some(format!("{h}:{}", id.chars().take(128).collect::<String>()))
        });
        Self {
            body: format!("body:{}", crate::identity::pki::hex(d.as_ref())),
            id,
        }
    }

    /// Every key it is remembered under.
    fn all(&self) -> Vec<String> {
        std::iter::once(self.body.clone())
            .chain(self.id.clone())
            .collect()
    }

    /// How logs and the audit name it: the forge's id, else the body digest.
    fn name(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.body)
    }
}

/// After a webhook-triggered fetch a repository is fetched again for webhooks at most once per
/// this window: a burst of deliveries for one repository is one fetch now and at most one more at
/// the window's end (so the last push of a burst is never missed).
const FETCH_COALESCE: std::time::Duration = std::time::Duration::from_secs(5);

/// What a delivery for one repository does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fetch {
    Now,
    /// The first delivery within the window: one fetch when it ends, after this long.
    Later(std::time::Duration),
    /// A fetch at the window's end is already scheduled.
    AlreadyScheduled,
}

/// Per-repository fetch coalescing for webhooks. Pure apart from the clock it is given.
#[derive(Default)]
pub(crate) struct Coalescer {
    last: std::collections::HashMap<String, std::time::Instant>,
    scheduled: std::collections::HashSet<String>,
}

impl Coalescer {
    pub(crate) fn decide(&mut self, repo: &str, now: std::time::Instant) -> Fetch {
        if self.last.len() > 4096 {
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < FETCH_COALESCE);
        }
        let since = self
            .last
            .get(repo)
            .map(|at| now.saturating_duration_since(*at));
        match since {
            Some(since) if since < FETCH_COALESCE => {
                if self.scheduled.insert(repo.to_string()) {
                    Fetch::Later(FETCH_COALESCE - since)
                } else {
                    Fetch::AlreadyScheduled
                }
            }
            _ => {
                self.last.insert(repo.to_string(), now);
                Fetch::Now
            }
        }
    }

    /// The scheduled fetch of `repo` ran at `now`.
    pub(crate) fn fired(&mut self, repo: &str, now: std::time::Instant) {
        self.scheduled.remove(repo);
        self.last.insert(repo.to_string(), now);
    }
}

/// What the HTTP handlers share.
struct Web {
    hub: Arc<Hub>,
    deliveries: std::sync::Mutex<Deliveries>,
    fetches: std::sync::Mutex<Coalescer>,
}

impl Web {
    fn fetches(&self) -> std::sync::MutexGuard<'_, Coalescer> {
        // Single map operations: a poisoned lock still holds sound data.
        self.fetches.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counts a delivery by what was done with it.
fn count(hub: &Hub, result: &str) {
    hub.metrics
        .webhooks
        .get_or_create(&crate::edge::metrics::ResultLabel {
            result: result.into(),
        })
        .inc();
}

async fn git_webhook(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let hub = &web.hub;
    let reply = |code: StatusCode, v: Value| (code, axum::Json(v));
    let Some(secret) = &hub.source_settings.webhook_secret else {
        count(hub, "disabled");
        return reply(
            StatusCode::FORBIDDEN,
            json!({"error": "webhooks are disabled: the hub has no --webhook-secret-file"}),
        );
    };
    if !verify(&headers, &body, secret) {
        tracing::warn!("webhook with a missing or bad signature refused");
        count(hub, "bad_signature");
        return reply(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or invalid webhook signature"}),
        );
    }
    let keys = DeliveryKeys::of(&headers, &body);
    let key = keys.name().to_string();
    let first = web
        .deliveries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .first(&keys.all(), std::time::Instant::now());
    if !first {
        tracing::warn!(delivery = %key, "webhook replayed; ignored");
        count(hub, "replay");
        return reply(
            StatusCode::OK,
            json!({"triggered": [], "duplicate": true, "note": "this delivery was already received"}),
        );
    }
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            count(hub, "bad_body");
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("body is not JSON: {e}")}),
            );
        }
    };
    let named = payload_urls(&payload);
    // A store that cannot be read says so: the sender retries, rather than hear "nothing to do".
    let known: Vec<String> = match hub.apps.list() {
        Ok(catalog) => catalog
            .apps
            .into_iter()
            .map(|a| a.doc.spec.source.repo_url.clone())
            .collect(),
        Err(e) => {
            hub.metrics.store_read_failed("webhook");
            tracing::error!(error = %e, "webhook: listing apps");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "the hub cannot read its apps now; retry"}),
            );
        }
    };
    let mut triggered: Vec<String> = known
        .into_iter()
        .filter(|u| named.contains(&normalize_url(u)))
        .collect();
    triggered.sort();
    triggered.dedup();
    let mut coalesced = Vec::new();
    let now = std::time::Instant::now();
    triggered.retain(|url| match web.fetches().decide(url, now) {
        Fetch::Now => true,
        Fetch::Later(after) => {
            schedule_fetch(&web, url, after);
            coalesced.push(url.clone());
            false
        }
        Fetch::AlreadyScheduled => {
            coalesced.push(url.clone());
            false
        }
    });
    for url in &triggered {
        fetch_now(hub, url, &key).await;
    }
    count(
        hub,
        if triggered.is_empty() {
            "coalesced"
        } else {
            "accepted"
        },
    );
    tracing::info!(repos = ?triggered, coalesced = ?coalesced, "webhook accepted");
    reply(
        StatusCode::ACCEPTED,
        json!({"triggered": triggered, "coalesced": coalesced}),
    )
}

/// Kicks a fetch of `url`, audited (`detail` names the delivery).
async fn fetch_now(hub: &Hub, url: &str, detail: &str) {
    hub.sync.kick_repo(url);
    if let Err(e) = hub
        .audit
        .record_event("webhook", "repo.fetch", &format!("repo/{url}"), detail)
        .await
    {
        tracing::warn!(error = %e, "recording a webhook fetch");
    }
}

/// One fetch of `url` when its coalescing window ends, owned by the hub's task tracker.
fn schedule_fetch(web: &Arc<Web>, url: &str, after: std::time::Duration) {
    let (web, url) = (Arc::clone(web), url.to_string());
    web.hub.tasks.clone().spawn(async move {
        tokio::select! {
            _ = web.hub.shutdown.cancelled() => {}
            _ = tokio::time::sleep(after) => {
                web.fetches().fired(&url, std::time::Instant::now());
                fetch_now(&web.hub, &url, "deliveries coalesced within 5s").await;
            }
        }
    });
}

/// Ready: the store answers and the hub is not shutting down (its gRPC listener is bound before this
/// one).
async fn readyz(State(web): State<Arc<Web>>) -> (StatusCode, String) {
    let hub = &web.hub;
    if hub.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n".into());
    }
    match hub.store.clusters() {
        Ok(_) => (StatusCode::OK, "ready\n".into()),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the store does not answer: {e}\n"),
        ),
    }
}

async fn metrics(
    State(web): State<Arc<Web>>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let hub = &web.hub;
    hub.metrics
        .connected_agents
        .set(i64::try_from(hub.sessions.connected_count()).unwrap_or(i64::MAX));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        hub.metrics.encode(),
    )
}

/// A request (body included) must be read and answered within this long.
const REQUEST_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Answers 408 to a request whose body has not arrived (or whose handling has not finished)
/// within [`REQUEST_DEADLINE`]: a stalled body never holds a handler.
async fn request_deadline(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match tokio::time::timeout(REQUEST_DEADLINE, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (
            StatusCode::REQUEST_TIMEOUT,
            "request not received in time\n",
        )
            .into_response(),
    }
}

/// Serves the HTTP endpoints on `listener` until shutdown.
pub async fn serve(
    hub: Arc<Hub>,
    listener: tokio::net::TcpListener,
    limiter: crate::edge::conn_limits::Limiter,
) -> Result<()> {
    let shutdown = hub.shutdown.clone();
    let guarded = crate::edge::conn_limits::GuardedListener {
        listener,
        limiter,
        hub: Arc::clone(&hub),
    };
    let mut app = Router::new();
    if crate::test_hooks::enabled() {
        app = app.merge(crate::test_hooks::routes(Arc::clone(&hub)));
    }
    let app = app
        .route("/webhooks/git", post(git_webhook))
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(request_deadline))
        .with_state(Arc::new(Web {
            hub,
            deliveries: Default::default(),
            fetches: Default::default(),
        }));
    axum::serve(guarded, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| Error::Internal(format!("http listener: {e}")))
}

/// Binds the HTTP listener.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Io {
            path: format!("http listen address {addr}"),
            source: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_counts_once_within_the_window() {
        let k = |keys: &[&str]| keys.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut d = Deliveries::default();
        let t0 = std::time::Instant::now();
        assert!(d.first(&k(&["body:a", "id:1"]), t0));
        assert!(!d.first(
            &k(&["body:a", "id:1"]),
            t0 + std::time::Duration::from_secs(1)
        ));
        // The same signed body under a fresh delivery id is the same delivery.
        assert!(!d.first(&k(&["body:a", "id:2"]), t0));
        assert!(d.first(&k(&["body:b", "id:3"]), t0));
        // Forgotten after the window: a redelivery a forge makes much later is honoured.
        assert!(d.first(
            &k(&["body:a"]),
            t0 + REPLAY_WINDOW + std::time::Duration::from_secs(2)
        ));
        // Bounded: the oldest go first.
        let mut d = Deliveries::default();
        for i in 0..MAX_REMEMBERED + 10 {
            assert!(d.first(&[i.to_string()], t0));
        }
        assert!(d.seen.len() <= MAX_REMEMBERED);
        assert!(d.first(&k(&["0"]), t0), "the oldest was forgotten");
    }

    #[test]
    fn a_burst_for_one_repository_is_one_fetch_now_and_one_at_the_window_end() {
        let mut c = Coalescer::default();
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + std::time::Duration::from_secs(s);
        assert_eq!(c.decide("r", t0), Fetch::Now);
        assert_eq!(c.decide("other", t0), Fetch::Now, "per repository");
        assert_eq!(
            c.decide("r", at(1)),
            Fetch::Later(FETCH_COALESCE - std::time::Duration::from_secs(1))
        );
        for s in 2..5 {
            assert_eq!(c.decide("r", at(s)), Fetch::AlreadyScheduled);
        }
        c.fired("r", at(5));
        assert_eq!(
            c.decide("r", at(7)),
            Fetch::Later(FETCH_COALESCE - std::time::Duration::from_secs(2))
        );
        c.fired("r", at(20));
        assert_eq!(
            c.decide("r", at(45)),
            Fetch::Now,
            "a quiet repository is fetched at once"
        );
    }

    #[test]
    fn signatures_and_urls() {
        let secret = b"s3cret";
        let body = br#"{"repository":{"clone_url":"https://git.example.com/Fleet.git"}}"#;
        let tag = ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret), body);
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let mut h = HeaderMap::new();
        h.insert(
            "x-hub-signature-256",
            format!("sha256={hex}").parse().unwrap(),
        );
        assert!(verify(&h, body, secret));
        assert!(!verify(&h, b"tampered", secret));
        let mut gitlab = HeaderMap::new();
        gitlab.insert("x-gitlab-token", "s3cret".parse().unwrap());
        assert!(verify(&gitlab, body, secret));
        gitlab.insert("x-gitlab-token", "wrong".parse().unwrap());
        assert!(!verify(&gitlab, body, secret));
        assert!(!verify(&HeaderMap::new(), body, secret));
        let payload: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(payload_urls(&payload), ["https://git.example.com/fleet"]);
        assert_eq!(normalize_url("file:///srv/Fleet.git/"), "file:///srv/fleet");
    }
}

//! Apps from git, through the real hub binary: polling and webhooks, refs and force-pushes, smart
//! HTTP, kustomize, per-cluster customization, and bad sources that keep the last good bundle.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use flotilla_e2e::grpc::register_with_labels;
use flotilla_e2e::{GitRepo, Hub, HubOptions, Proc, http_get, http_post};
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

/// Breaks a repository in one specific way.
type Breaker = Box<dyn Fn(&GitRepo) -> Result<()>>;

fn app_doc(name: &str, url: &str, reference: &str, path: &str, extra: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  source: {{repoURL: \"{url}\", ref: \"{reference}\", path: \"{path}\"{extra}}}\n  targets: {{selector: {{matchExpressions: [{{key: region, operator: Exists}}]}}}}\n"
    )
}

const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {region: \"${cluster.labels.region}\", v: \"1\"}\n";

async fn fleet(hub: &Hub) -> Result<()> {
    let token = hub.token(&["--uses", "3"])?;
    for (name, region) in [("eu-1", "eu"), ("eu-2", "eu"), ("us-1", "us")] {
        register_with_labels(hub, &token, name, &[("region", region)]).await?;
    }
    Ok(())
}

fn digests(app: &Value) -> Vec<(String, String)> {
    app["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["cluster"].as_str().unwrap_or("").to_string(),
                c["digest"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn commits_arrive_within_the_poll_interval_with_per_cluster_variants() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    fleet(&hub).await?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write("apps/web/cm.yaml", CM)?;
    let first = repo.commit("first")?;
    hub.apply_app(&app_doc("web", &repo.url(), "main", "apps/web", ""))?;
    let app = hub.wait_revision("web", &first, T)?;
    let d = digests(&app);
    assert_eq!(d.len(), 3);
    assert_eq!(d[0].1, d[1].1, "alike clusters share one bundle: {d:?}");
    assert_ne!(
        d[0].1, d[2].1,
        "a different region renders differently: {d:?}"
    );
    // A list says how many clusters, not which: its size does not grow with the fleet.
    let list = hub.cli_json(&["app", "list"])?;
    let web = &list[0];
    assert_eq!(web["cluster_count"], 3, "{list}");
    assert!(
        web.get("clusters").is_none() && web.get("history").is_none(),
        "{list}"
    );
    assert_eq!(app["cluster_count"], 3, "{app}");

    repo.write("apps/web/cm.yaml", &CM.replace("v: \"1\"", "v: \"2\""))?;
    let second = repo.commit("second")?;
    let started = std::time::Instant::now();
    let app = hub.wait_revision("web", &second, Duration::from_secs(5))?;
    println!(
        "commit picked up after {:?} (poll interval 1s)",
        started.elapsed()
    );
    assert_eq!(app["history"].as_array().map(Vec::len), Some(2));
    assert_eq!(app["history"][1]["revision"], first.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_joining_cluster_renders_a_bundle_only_when_it_is_a_new_variant() -> Result<()> {
    let hub = Hub::start(HubOptions {
        http: true,
        poll_interval: "300ms".into(),
        ..HubOptions::default()
    })?;
    let token = hub.token(&["--uses", "3"])?;
    register_with_labels(&hub, &token, "eu-1", &[("region", "eu")]).await?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write("apps/web/cm.yaml", CM)?;
    let rev = repo.commit("first")?;
    hub.apply_app(&app_doc("web", &repo.url(), "main", "apps/web", ""))?;
    let targeted = |n: usize| {
        flotilla_e2e::wait_for(T, &format!("{n} clusters targeted"), || {
            let d = digests(&hub.app("web")?);
            anyhow::ensure!(
                d.len() == n && d.iter().all(|(_, x)| !x.is_empty()),
                "{d:?}"
            );
            Ok(Some(d))
        })
    };
    hub.wait_revision("web", &rev, T)?;
    targeted(1)?;
    let variants = "flotilla_hub_variant_renders_total";
    assert_eq!(hub.metric(variants)?, 1.0);
    // Alike: the fleet changed, so the app is looked at again, but no bundle is made.
    register_with_labels(&hub, &token, "eu-2", &[("region", "eu")]).await?;
    let d = targeted(2)?;
    assert_eq!(d[0].1, d[1].1, "{d:?}");
    assert_eq!(
        hub.metric(variants)?,
        1.0,
        "a known variant was rendered again"
    );
    // A new region is a new variant: one bundle.
    register_with_labels(&hub, &token, "us-1", &[("region", "us")]).await?;
    let d = targeted(3)?;
    assert_ne!(d[0].1, d[2].1, "{d:?}");
    assert_eq!(hub.metric(variants)?, 2.0);
    Ok(())
}

const WEBHOOK_SECRET: &str = "webhook-secret";

/// `X-Hub-Signature-256` of `body` under [`WEBHOOK_SECRET`].
fn sign(body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, WEBHOOK_SECRET.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// A hub that polls only hourly and takes signed webhooks, with app `web` rendered at `first`.
struct Webhooked {
    hub: Hub,
    http: String,
    repo: GitRepo,
    first: String,
    _dir: tempfile::TempDir,
}

async fn webhooked() -> Result<Webhooked> {
    let hub = Hub::start(HubOptions {
        poll_interval: "1h".into(),
        http: true,
        webhook_secret: Some(WEBHOOK_SECRET.into()),
        ..HubOptions::default()
    })?;
    fleet(&hub).await?;
    let http = hub.http_addr.clone().context("http listener")?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("fleet.git"))?;
    repo.write("web/cm.yaml", CM)?;
    let first = repo.commit("first")?;
    hub.apply_app(&app_doc("web", &repo.url(), "main", "web", ""))?;
    hub.wait_revision("web", &first, T)?;
    Ok(Webhooked {
        hub,
        http,
        repo,
        first,
        _dir: dir,
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn signed_webhooks_trigger_at_once_and_bad_ones_change_nothing() -> Result<()> {
    let Webhooked {
        mut hub,
        http,
        repo,
        first,
        _dir,
    } = webhooked().await?;
    repo.write("web/cm.yaml", &CM.replace("v: \"1\"", "v: \"2\""))?;
    let second = repo.commit("second")?;

    let payload =
        serde_json::json!({"ref": "refs/heads/main", "repository": {"clone_url": repo.url()}})
            .to_string();
    let (code, _) = http_post(
        &http,
        "/webhooks/git",
        &[("X-Hub-Signature-256", "sha256=00".into())],
        payload.as_bytes(),
    )?;
    assert_eq!(code, 401);
    let (code, _) = http_post(&http, "/webhooks/git", &[], payload.as_bytes())?;
    assert_eq!(code, 401, "unsigned");
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let (code, _) = http_post(
        &http,
        "/webhooks/git",
        &[("X-Hub-Signature-256", sign(&huge))],
        &huge,
    )?;
    assert_eq!(code, 413);
    let garbage = b"{not json";
    let (code, _) = http_post(
        &http,
        "/webhooks/git",
        &[("X-Hub-Signature-256", sign(garbage))],
        garbage,
    )?;
    assert_eq!(code, 400);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        hub.app("web")?["revision"],
        first.as_str(),
        "refused webhooks changed nothing"
    );

    let headers = [
        ("X-Hub-Signature-256", sign(payload.as_bytes())),
        (
            "X-GitHub-Delivery",
            "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
        ),
    ];
    let (code, body) = http_post(&http, "/webhooks/git", &headers, payload.as_bytes())?;
    assert_eq!(code, 202, "{body}");
    hub.wait_revision("web", &second, Duration::from_secs(3))?;
    assert!(hub.process.running());
    let audit = hub.cli_json(&["audit"])?;
    assert!(
        audit
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["action"] == "repo.fetch"
                && e["actor"] == "webhook"
                && e["detail"].as_str().unwrap_or("").contains("72d3162e")),
        "{audit}"
    );

    // The same delivery replayed (a captured request sent again) triggers nothing.
    repo.write("web/cm.yaml", &CM.replace("v: \"1\"", "v: \"3\""))?;
    let third = repo.commit("third")?;
    for _ in 0..3 {
        let (code, body) = http_post(&http, "/webhooks/git", &headers, payload.as_bytes())?;
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("\"duplicate\":true"), "{body}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        hub.app("web")?["revision"],
        second.as_str(),
        "a replay fetched"
    );
    // So does the same signed body under a fresh delivery id (the id is not signed).
    let fresh_id = [
        ("X-Hub-Signature-256", sign(payload.as_bytes())),
        ("X-GitHub-Delivery", "a-new-delivery".into()),
    ];
    let (code, body) = http_post(&http, "/webhooks/git", &fresh_id, payload.as_bytes())?;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"duplicate\":true"), "{body}");
    // A new push (a new body) does, within the repository's 5 s coalescing window at the latest.
    let push = serde_json::json!({"ref": "refs/heads/main", "after": third, "repository": {"clone_url": repo.url()}})
        .to_string();
    let fresh = [
        ("X-Hub-Signature-256", sign(push.as_bytes())),
        ("X-GitHub-Delivery", "another-delivery".into()),
    ];
    let (code, body) = http_post(&http, "/webhooks/git", &fresh, push.as_bytes())?;
    assert_eq!(code, 202, "{body}");
    hub.wait_revision("web", &third, Duration::from_secs(10))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn replays_with_fresh_ids_and_bursts_of_pushes_fetch_at_most_once_per_window() -> Result<()> {
    let Webhooked {
        hub,
        http,
        repo,
        first: _,
        _dir,
    } = webhooked().await?;
    let fetches = || -> Result<usize> {
        let audit = hub.cli_json(&["audit"])?;
        Ok(audit
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["action"] == "repo.fetch")
            .count())
    };
    let push = |n: usize| {
        serde_json::json!({"ref": "refs/heads/main", "after": format!("{n:040}"), "repository": {"clone_url": repo.url()}})
            .to_string()
    };
    let deliver = |body: &str, id: &str| -> Result<(u16, String)> {
        let headers = [
            ("X-Hub-Signature-256", sign(body.as_bytes())),
            ("X-GitHub-Delivery", id.to_string()),
        ];
        http_post(&http, "/webhooks/git", &headers, body.as_bytes())
    };

    // One captured delivery, replayed 50 times with fresh ids: one fetch.
    let captured = push(0);
    let (code, body) = deliver(&captured, "original")?;
    assert_eq!(code, 202, "{body}");
    for i in 0..50 {
        let (code, body) = deliver(&captured, &format!("forged-{i}"))?;
        assert_eq!(code, 200, "{body}");
    }
    assert_eq!(fetches()?, 1, "one fetch, one audit entry");

    // A burst of 30 distinct pushes for the repository: at most one fetch now and one at the end
    // of the window — and the last push is not lost.
    std::thread::sleep(Duration::from_secs(6));
    repo.write("web/cm.yaml", &CM.replace("v: \"1\"", "v: \"2\""))?;
    let last = repo.commit("last")?;
    for n in 1..=30 {
        let (code, body) = deliver(&push(n), &format!("push-{n}"))?;
        assert_eq!(code, 202, "{body}");
    }
    hub.wait_revision("web", &last, Duration::from_secs(15))?;
    std::thread::sleep(Duration::from_secs(6));
    let after = fetches()?;
    assert!(
        (2..=3).contains(&after),
        "{after} fetches for 81 deliveries"
    );
    let (_, metrics) = http_get(&http, "/metrics")?;
    for needle in [
        "flotilla_hub_webhooks_total{result=\"replay\"} 50",
        "flotilla_hub_webhooks_total{result=\"coalesced\"} 29",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn branches_tags_pinned_commits_and_force_pushes() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    fleet(&hub).await?;
    let dir = tempfile::tempdir()?;
    let work = GitRepo::init(&dir.path().join("work"))?;
    let origin = dir.path().join("origin.git");
    Command::new("git")
        .args(["init", "-q", "--bare"])
        .arg(&origin)
        .status()?;
    work.git(&["remote", "add", "origin", &origin.display().to_string()])?;
    work.write("cm.yaml", CM)?;
    let a = work.commit("a")?;
    work.git(&["tag", "v1"])?;
    work.git(&["push", "-q", "origin", "main", "--tags"])?;
    let url = format!("file://{}", origin.display());
    hub.apply_app(&app_doc("by-branch", &url, "main", "", ""))?;
    hub.apply_app(&app_doc("by-tag", &url, "v1", "", ""))?;
    hub.apply_app(&app_doc("by-commit", &url, &a, "", ""))?;
    for name in ["by-branch", "by-tag", "by-commit"] {
        hub.wait_revision(name, &a, T)?;
    }
    work.write("cm.yaml", &CM.replace("v: \"1\"", "v: \"2\""))?;
    let b = work.commit("b")?;
    work.git(&["push", "-q", "origin", "main"])?;
    hub.wait_revision("by-branch", &b, T)?;
    // History rewritten: the branch is force-pushed to a commit that does not descend from b.
    work.git(&["reset", "-q", "--hard", &a])?;
    work.write("cm.yaml", &CM.replace("v: \"1\"", "v: \"3\""))?;
    let c = work.commit("c")?;
    work.git(&["push", "-q", "--force", "origin", "main"])?;
    hub.wait_revision("by-branch", &c, T)?;
    assert_eq!(hub.app("by-tag")?["revision"], a.as_str());
    assert_eq!(hub.app("by-commit")?["revision"], a.as_str());
    Ok(())
}

/// Serves the bare repositories under `root` over smart HTTP on 127.0.0.1 (see git_http.py for `env`).
fn git_server(root: &std::path::Path, env: &[(&str, &str)]) -> Result<(Proc, u16)> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("suites/git_http.py");
    let mut child = Command::new("python3")
        .arg(script)
        .arg(root)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    Ok((Proc::adopt(child), line.trim().parse()?))
}

/// A bare clone of `work` at `served/fleet.git`.
fn serve_copy(work: &GitRepo, served: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(served)?;
    let status = Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(&work.path)
        .arg(served.join("fleet.git"))
        .status()?;
    anyhow::ensure!(status.success(), "git clone --bare failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn private_repositories_use_hub_side_credentials_sent_to_their_host_only() -> Result<()> {
    const SECRET: &str = "tok3n-never-to-be-logged";
    let dir = tempfile::tempdir()?;
    let work = GitRepo::init(&dir.path().join("work"))?;
    work.write("apps/web/cm.yaml", CM)?;
    let first = work.commit("first")?;
    let served = dir.path().join("served");
    serve_copy(&work, &served)?;
    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let auth = format!("flotilla:{SECRET}");
    let (_private, private) = git_server(
        &served,
        &[
            ("GIT_HTTP_AUTH", &auth),
            ("GIT_HTTP_LOG", &log("private").display().to_string()),
        ],
    )?;
    let (_locked, locked) = git_server(&served, &[("GIT_HTTP_AUTH", &auth)])?;
    let (_elsewhere, elsewhere) = git_server(
        &served,
        &[("GIT_HTTP_LOG", &log("elsewhere").display().to_string())],
    )?;
    let target = format!("http://127.0.0.1:{elsewhere}");
    let (_bouncer, bouncer) = git_server(&served, &[("GIT_HTTP_REDIRECT", &target)])?;

    std::fs::write(dir.path().join("token"), format!("{SECRET}\n"))?;
    let token_file = dir.path().join("token").display().to_string();
    std::fs::write(
        dir.path().join("creds.yaml"),
        format!(
            "- {{url: \"http://127.0.0.1:{private}/\", username: flotilla, passwordFile: \"{token_file}\"}}\n- {{url: \"http://127.0.0.1:{bouncer}/\", username: flotilla, passwordFile: \"{token_file}\"}}\n"
        ),
    )?;
    let hub = Hub::start(HubOptions {
        extra_args: vec![
            "--repo-credentials".into(),
            dir.path().join("creds.yaml").display().to_string(),
        ],
        ..HubOptions::default()
    })?;
    fleet(&hub).await?;

    // With credentials: fetched and rendered; the server saw Basic auth.
    let url = |port: u16| format!("http://127.0.0.1:{port}/fleet.git");
    hub.apply_app(&app_doc("web", &url(private), "main", "apps/web", ""))?;
    hub.wait_revision("web", &first, T)?;
    let seen = std::fs::read_to_string(log("private"))?;
    assert!(seen.lines().all(|l| l.contains(" Basic ")), "{seen}");

    // Without credentials for that host: a clear error, no secret anywhere.
    hub.apply_app(&app_doc("locked", &url(locked), "main", "apps/web", ""))?;
    // Redirected to another host: refused, and the other host never sees the secret.
    hub.apply_app(&app_doc("bounced", &url(bouncer), "main", "apps/web", ""))?;
    for name in ["locked", "bounced"] {
        let app = flotilla_e2e::wait_for(T, &format!("{name} fails"), || {
            let app = hub.app(name)?;
            anyhow::ensure!(!app["last_error"].is_null(), "{app}");
            Ok(Some(app))
        })?;
        println!("{name}: {}", app["last_error"]);
        assert!(!app.to_string().contains(SECRET));
        if name == "bounced" {
            let err = app["last_error"].as_str().unwrap_or("");
            assert!(err.contains("redirected"), "{err}");
            assert!(!err.contains("'dumb' protocol is not supported"), "{err}");
        }
    }
    let elsewhere_log = std::fs::read_to_string(log("elsewhere")).unwrap_or_default();
    assert!(
        !elsewhere_log.contains("Basic"),
        "credentials followed a redirect: {elsewhere_log}"
    );

    // Credentials in an App's URL are refused: App documents are shown and logged.
    let bad = app_doc(
        "leaky",
        &format!("https://bot:{SECRET}@git.example.com/x.git"),
        "main",
        "",
        "",
    );
    let err = hub.apply_app(&bad).unwrap_err().to_string();
    assert!(err.contains("must not carry credentials"), "{err}");
    let hub_log = hub.process.log_text();
    assert!(!hub_log.contains(SECRET), "the hub logged the secret");
    assert!(!hub_log.contains(&auth), "the hub logged the secret");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_served_over_smart_http() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    fleet(&hub).await?;
    let dir = tempfile::tempdir()?;
    let work = GitRepo::init(&dir.path().join("work"))?;
    work.write("apps/web/cm.yaml", CM)?;
    let first = work.commit("first")?;
    let served = dir.path().join("served");
    serve_copy(&work, &served)?;
    let (server, port) = git_server(&served, &[])?;
    let url = format!("http://127.0.0.1:{port}/fleet.git");
    hub.apply_app(&app_doc("web", &url, "main", "apps/web", ""))?;
    hub.wait_revision("web", &first, T)?;
    drop(server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kustomize_renders_exactly_what_kubectl_kustomize_renders() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    fleet(&hub).await?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "base/kustomization.yaml",
        "resources: [deploy.yaml, cm.yaml]\ncommonLabels: {app: web}\n",
    )?;
    repo.write("base/deploy.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: web, image: \"nginx:1.27\"}]}\n")?;
    repo.write(
        "base/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {mode: base}\n",
    )?;
    repo.write("overlays/prod/kustomization.yaml", "resources: [../../base]\nnamePrefix: prod-\npatches:\n  - patch: |-\n      apiVersion: apps/v1\n      kind: Deployment\n      metadata: {name: web}\n      spec: {replicas: 3}\n")?;
    let rev = repo.commit("kustomize")?;
    hub.apply_app(&app_doc(
        "kz",
        &repo.url(),
        "main",
        "overlays/prod",
        ", type: kustomize",
    ))?;
    let app = hub.wait_revision("kz", &rev, T)?;
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo.path.join("overlays/prod"))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs = flotilla_bundle::manifest::parse_documents(
        "kubectl",
        &String::from_utf8_lossy(&out.stdout),
    )?;
    let objects: Vec<Value> = docs.into_iter().map(|m| m.object).collect();
    let expected = flotilla_bundle::digest(&objects);
    for (cluster, digest) in digests(&app) {
        assert_eq!(digest, expected, "{cluster}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_sources_give_clear_errors_and_keep_the_last_good_bundle() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    fleet(&hub).await?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write("app/cm.yaml", CM)?;
    let good = repo.commit("good")?;
    hub.apply_app(&app_doc("web", &repo.url(), "main", "app", ""))?;
    let good_digests = digests(&hub.wait_revision("web", &good, T)?);

    // A path that leaves the repository is refused when the app is applied.
    let path = dir.path().join("escape.yaml");
    std::fs::write(&path, app_doc("web", &repo.url(), "main", "../..", ""))?;
    let out = hub.cli(&["app", "apply", "-f", &path.display().to_string()])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("spec.source.path"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bomb = "a: &a [\"l\",\"l\",\"l\",\"l\",\"l\",\"l\",\"l\",\"l\",\"l\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n";
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "symlink",
            Box::new(|r: &GitRepo| {
                std::os::unix::fs::symlink("../../../etc/passwd", r.path.join("app/leak.yaml"))?;
                Ok(())
            }),
        ),
        (
            "bytes, over the",
            Box::new(|r: &GitRepo| {
                let big = "#".repeat(64 * 1024 * 1024);
                r.write("app/huge.yaml", &big)
            }),
        ),
        (
            "bomb.yaml#1 (line 1): invalid YAML",
            Box::new(move |r: &GitRepo| r.write("app/bomb.yaml", bomb)),
        ),
        (
            "broken.yaml#1 (line 1): invalid YAML",
            Box::new(|r: &GitRepo| r.write("app/broken.yaml", "kind: [oops")),
        ),
    ];
    let mut last_good = good.clone();
    for (needle, breaker) in cases {
        breaker(&repo)?;
        let rev = repo.commit(needle)?;
        flotilla_e2e::wait_for(T, &format!("error about {needle}"), || {
            let app = hub.app("web")?;
            let err = app["last_error"].as_str().unwrap_or("").to_string();
            Ok(err.contains(needle).then_some(()))
        })?;
        let app = hub.app("web")?;
        assert_eq!(
            digests(&app),
            good_digests,
            "the last good bundle stays assigned after {needle} ({rev})"
        );
        assert_eq!(app["revision"], last_good.as_str());
        // Repair for the next case.
        repo.git(&["reset", "-q", "--hard", &good])?;
        repo.git(&["clean", "-qfd"])?;
        let repaired = repo.commit(&format!("repair after {needle}"))?;
        hub.wait_revision("web", &repaired, T)?;
        last_good = repaired;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_repository_adds_changes_and_removes_apps_by_commit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let apps = GitRepo::init(&dir.path().join("apps"))?;
    apps.write("web/cm.yaml", CM)?;
    let app_rev = apps.commit("web")?;
    let fleet = GitRepo::init(&dir.path().join("fleet"))?;
    fleet.write(
        "apps/web.yaml",
        &app_doc("web", &apps.url(), "main", "web", ""),
    )?;
    fleet.write("README.md", "the fleet")?;
    fleet.commit("add web")?;
    let hub = Hub::start(HubOptions {
        extra_args: vec![
            "--fleet-repo".into(),
            fleet.url(),
            "--fleet-path".into(),
            "apps".into(),
        ],
        ..HubOptions::default()
    })?;
    fleet_of(&hub).await?;
    let app = hub.wait_revision("web", &app_rev, T)?;
    assert_eq!(app["spec"]["source"]["path"], "web");

    // Changed by a commit.
    fleet.write(
        "apps/web.yaml",
        &app_doc("web", &apps.url(), "main", "web", ", type: plain"),
    )?;
    fleet.write(
        "apps/more.yaml",
        &app_doc("more", &apps.url(), "main", "web", ""),
    )?;
    fleet.commit("add more")?;
    hub.wait_revision("more", &app_rev, T)?;
    // Operators cannot change or delete fleet apps by hand.
    let out = hub.cli(&["app", "delete", "more"])?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fleet repository"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A broken fleet commit changes nothing.
    fleet.write(
        "apps/broken.yaml",
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {name: Bad_Name}\n",
    )?;
    fleet.commit("broken")?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        hub.cli_json(&["app", "list"])?.as_array().map(Vec::len),
        Some(2)
    );

    // Removed by a commit.
    std::fs::remove_file(fleet.path.join("apps/broken.yaml"))?;
    std::fs::remove_file(fleet.path.join("apps/more.yaml"))?;
    fleet.commit("remove more")?;
    flotilla_e2e::wait_for(T, "app more removed", || {
        let list = hub.cli_json(&["app", "list"])?;
        let names: Vec<String> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["name"].as_str().map(str::to_string))
            .collect();
        Ok((names == ["web"]).then_some(()))
    })?;
    Ok(())
}

async fn fleet_of(hub: &Hub) -> Result<()> {
    fleet(hub).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_path_naming_cluster_labels_gives_each_cluster_its_overlay() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    fleet(&hub).await?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    // No placeholder in any manifest: only the path differs per cluster.
    repo.write(
        "deploy/base/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: \"1\"}\n",
    )?;
    repo.write("deploy/base/kustomization.yaml", "resources: [cm.yaml]\n")?;
    for region in ["eu", "us"] {
        repo.write(
            &format!("deploy/overlays/{region}/kustomization.yaml"),
            &format!("resources: [../../base]\nnamePrefix: {region}-\n"),
        )?;
    }
    let rev = repo.commit("overlays")?;
    hub.apply_app(&app_doc(
        "web",
        &repo.url(),
        "main",
        "deploy/overlays/${cluster.labels.region}",
        ", type: kustomize",
    ))?;
    let app = hub.wait_revision("web", &rev, T)?;
    let d: std::collections::BTreeMap<String, String> = digests(&app).into_iter().collect();
    assert_eq!(d.len(), 3, "{d:?}");
    assert_eq!(d["eu-1"], d["eu-2"], "one overlay, one bundle: {d:?}");
    assert_ne!(d["eu-1"], d["us-1"], "each region its overlay: {d:?}");

    // A cluster whose overlay does not exist: the error names the cluster and the path.
    let token = hub.token(&[])?;
    register_with_labels(&hub, &token, "ap-1", &[("region", "ap")]).await?;
    let err = flotilla_e2e::wait_for(T, "ap-1's missing overlay reported", || {
        let app = hub.app("web")?;
        let err = app["last_error"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(err.contains("ap-1"), "{err:?}");
        Ok(Some(err))
    })?;
    assert!(err.contains("deploy/overlays/ap"), "{err}");
    Ok(())
}

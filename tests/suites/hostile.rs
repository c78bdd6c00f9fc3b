//! Hostile input cannot crash or stall the hub: an amplified tree, deeply nested YAML (in commits
//! and in ApplyApp), a kustomization that reaches outside the repository, a cluster flooding
//! reports, connections that never finish, and a cache wedged by a killed fetch. Each through the
//! real hub binary, as an attacker with commit access to one repository or network access to the
//! hub's ports would do it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use flotilla_e2e::grpc::{admin, channel, register};
use flotilla_e2e::{GitRepo, Hub, HubOptions, dir_bytes, http_get, memory_kib, wait_for};
use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::agent_client::AgentClient;
use flotilla_proto::v1::{
    AgentMessage, AppStatus, ApplyAppRequest, HealthStatus, Hello, HookRun, ListClustersRequest,
    SyncStatus, agent_message,
};

const T: Duration = Duration::from_secs(30);

fn hub() -> Result<Hub> {
    Hub::start(HubOptions {
        poll_interval: "500ms".into(),
        http: true,
        ..HubOptions::default()
    })
}

fn app_doc(name: &str, repo: &GitRepo, path: &str, kind: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: {name}}}\nspec:\n  source: {{repoURL: \"{}\", path: {path}, type: {kind}}}\n  targets: {{selector: {{}}}}\n",
        repo.url()
    )
}

/// Waits for app `name` to show an error containing `needle`.
fn wait_error(hub: &Hub, name: &str, needle: &str) -> Result<String> {
    wait_for(T, &format!("{name} fails with {needle:?}"), || {
        let app = hub.app(name)?;
        let err = app["last_error"].as_str().unwrap_or_default().to_string();
        ensure!(err.contains(needle), "last_error: {err:?}");
        Ok(Some(err))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn an_amplified_tree_is_an_app_error_and_the_hub_stays_small() -> Result<()> {
    let hub = hub()?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    // One 7.5 MiB blob (a ConfigMap, compressible: the push is small) named by 150 paths.
    let big = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata:\n  x: \"{}\"\n",
        "a".repeat(7_500_000)
    );
    repo.write("blob.yaml", &big)?;
    let blob = repo.git(&["hash-object", "-w", "blob.yaml"])?;
    let blob = blob.trim();
    std::fs::remove_file(repo.path.join("blob.yaml"))?;
    for i in 0..150 {
        repo.git(&[
            "update-index",
            "--add",
            "--cacheinfo",
            &format!("100644,{blob},app/f{i:03}.yaml"),
        ])?;
    }
    repo.git(&["commit", "-q", "-m", "amplified"])?;
    hub.apply_app(&app_doc("amp", &repo, "app", "plain"))?;
    let err = wait_error(&hub, "amp", "bytes to render")?;
    assert!(err.contains("67108864"), "{err}");
    // Still serving, and it never held the amplified tree in memory.
    hub.cli_json(&["app", "list"])?;
    let (_, peak) = memory_kib(hub.process.pid())?;
    assert!(peak < 200 * 1024, "hub peak RSS {peak} KiB");
    Ok(())
}

/// `a: [` nested `depth` times.
fn nested(depth: usize) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: deep}}\ndata:\n  a: {}\n",
        "[".repeat(depth)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_yaml_in_commits_and_apply_app_is_refused_fast_while_rpcs_answer() -> Result<()> {
    let hub = hub()?;
    let dir = tempfile::tempdir()?;
    let mut repos = Vec::new();
    for name in ["one", "two"] {
        let repo = GitRepo::init(&dir.path().join(name))?;
        repo.write("app/deep.yaml", &nested(600_000))?;
        repo.commit("deep")?;
        repos.push(repo);
    }
    let mut admin_client = AdminClient::new(channel(&hub, Some(admin(&hub)?))?);
    admin_client.list_clusters(ListClustersRequest {}).await?;

    // Other RPCs keep answering quickly while the hub refuses all of it.
    let probe = {
        let mut client = admin_client.clone();
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                let t = Instant::now();
                client.list_clusters(ListClustersRequest {}).await?;
                worst = worst.max(t.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>(worst)
        })
    };
    let t = Instant::now();
    let refused = admin_client
        .apply_app(ApplyAppRequest {
            document: format!(
                "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: x}}\nspec: {}\n",
                "[".repeat(1_200_000)
            ),
        })
        .await
        .expect_err("a 1.2 MB nested App document must be refused");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(
        refused.message().contains("nested deeper than 64"),
        "{refused}"
    );
    for (name, repo) in ["one", "two"].iter().zip(&repos) {
        hub.apply_app(&app_doc(name, repo, "app", "plain"))?;
    }
    for name in ["one", "two"] {
        let err = wait_error(&hub, name, "nested deeper than 64 levels")?;
        assert!(err.contains("deep.yaml line 5"), "{err}");
    }
    let worst = probe.await??;
    assert!(
        worst < Duration::from_millis(100),
        "ListClusters took {worst:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kustomization_that_reaches_outside_the_repository_is_refused() -> Result<()> {
    let hub = hub()?;
    let dir = tempfile::tempdir()?;
    // What the attacker wants: a host directory with a kustomization of its own.
    let outside = dir.path().join("host-secrets");
    std::fs::create_dir_all(&outside)?;
    std::fs::write(
        outside.join("kustomization.yaml"),
        "configMapGenerator: [{name: stolen, files: [secret.txt]}]\n",
    )?;
    std::fs::write(outside.join("secret.txt"), "host data")?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    let escape = format!("../../../../../../../../../..{}", outside.display());
    repo.write(
        "overlays/prod/kustomization.yaml",
        &format!("resources: [\"{escape}\"]\n"),
    )?;
    repo.commit("escape")?;
    hub.apply_app(&app_doc("esc", &repo, "overlays/prod", "kustomize"))?;
    let err = wait_error(&hub, "esc", "points outside the repository")?;
    assert!(
        err.contains("overlays/prod/kustomization.yaml") && err.contains(&escape),
        "{err}"
    );
    let app = hub.app("esc")?;
    assert_eq!(app["clusters"].as_array().map(Vec::len), Some(0), "{app}");
    Ok(())
}

/// Opens an agent session as `identity` (hello sent, welcome read): the sender of its messages,
/// and the hub's stream (kept open by holding it).
async fn open_session(
    hub: &Hub,
    identity: flotilla_e2e::grpc::Identity,
    buffer: usize,
) -> Result<(
    tokio::sync::mpsc::Sender<AgentMessage>,
    tonic::Streaming<flotilla_proto::v1::HubMessage>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(buffer);
    let mut client = AgentClient::new(channel(hub, Some(identity))?);
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello::default())),
    })
    .await?;
    let mut stream = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    stream.message().await?; // welcome
    Ok((tx, stream))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_report_flood_leaves_memory_store_and_metrics_bounded() -> Result<()> {
    let hub = hub()?;
    let token = hub.token(&[])?;
    let identity = register(&hub, &token, "flooder").await?;
    let http = hub.http_addr.clone().context("http listener")?;
    let (_, metrics_before) = http_get(&http, "/metrics")?;
    let store_before = dir_bytes(&hub.data_dir().join("db"));
    let (rss_before, _) = memory_kib(hub.process.pid())?;

    let (tx, _stream) = open_session(&hub, identity, 64).await?;
    let padding = "x".repeat(100 * 1024);
    for i in 0..2000 {
        let status = AppStatus {
            app: format!("invented-{i}"),
            digest: format!("sha256:{i}"),
            message: padding.clone(),
            ..AppStatus::default()
        };
        tx.send(AgentMessage {
            kind: Some(agent_message::Kind::Status(status)),
        })
        .await?;
    }
    // Still serving; nothing of the flood was kept.
    tokio::time::sleep(Duration::from_secs(2)).await;
    hub.cli_json(&["cluster", "list"])?;
    let (rss_after, _) = memory_kib(hub.process.pid())?;
    let store_after = dir_bytes(&hub.data_dir().join("db"));
    let (_, metrics_after) = http_get(&http, "/metrics")?;
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS {rss_before} → {rss_after} KiB"
    );
    assert!(
        store_after < store_before + 8 * 1024 * 1024,
        "store {store_before} → {store_after} bytes"
    );
    assert!(
        !metrics_after.contains("invented") && metrics_after.len() < metrics_before.len() + 4096,
        "metrics grew {} → {} bytes",
        metrics_before.len(),
        metrics_after.len()
    );
    assert!(
        metrics_after.contains("reports_refused_total{result=\"unassigned\"}")
            || metrics_after.contains("reports_refused_total{result=\"rate\"}"),
        "{metrics_after}"
    );
    assert!(hub.status()?.is_empty(), "{:?}", hub.status()?);
    drop(tx);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_text_shows_escaped_in_every_table_and_intact_in_json() -> Result<()> {
    let hub = hub()?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: \"1\"}\n",
    )?;
    repo.commit("v1")?;
    hub.apply_app(&app_doc("web", &repo, "web", "plain"))?;
    let token = hub.token(&[])?;
    let identity = register(&hub, &token, "mallory").await?;
    let (tx, _stream) = open_session(&hub, identity, 8).await?;
    let digest = wait_for(T, "web assigned to mallory", || {
        let app = hub.app("web")?;
        let d = app["clusters"][0]["digest"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(!d.is_empty(), "{app}");
        Ok(Some(d))
    })?;
    // A forged row after a newline, a screen clear, a colour, a C1 CSI and a bidi override.
    let evil = "ok\nbeta      web   abc1234   Synced   Healthy   all good\u{1b}[2J\u{1b}[31m\u{9b}1m\u{202e}";
    let status = AppStatus {
        app: "web".into(),
        digest: digest.clone(),
        revision: "r\u{1b}]0;owned\u{7}".into(),
        sync: SyncStatus::Synced.into(),
        health: HealthStatus::Degraded.into(),
        message: evil.into(),
        hooks: vec![HookRun {
            name: "hook\u{1b}[1A".into(),
            kind: "Job".into(),
            message: evil.into(),
            ..HookRun::default()
        }],
        ..AppStatus::default()
    };
    tx.send(AgentMessage {
        kind: Some(agent_message::Kind::Status(status)),
    })
    .await?;
    // JSON keeps the text as it was sent.
    wait_for(T, "the report in status -o json", || {
        let rows = hub.status()?;
        ensure!(rows.iter().any(|r| r["message"] == evil), "{rows:?}");
        Ok(Some(()))
    })?;
    let app = hub.app("web")?;
    assert_eq!(app["clusters"][0]["message"], evil, "{app}");
    assert_eq!(app["clusters"][0]["hooks"][0]["message"], evil, "{app}");
    // Tables show it escaped: no control character reaches the terminal, no forged line.
    for args in [&["status"][..], &["app", "get", "web"], &["app", "list"]] {
        let out = hub.cli(args)?;
        ensure!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout)?;
        let bad: Vec<char> = text
            .chars()
            .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{202e}')
            .collect();
        assert!(bad.is_empty(), "{args:?} printed {bad:?}:\n{text}");
        assert!(
            !text.lines().any(|l| l.starts_with("beta")),
            "{args:?} printed a forged row:\n{text}"
        );
        if args[0] != "app" || args[1] == "get" {
            assert!(text.contains("ok\\nbeta"), "{args:?}:\n{text}");
            assert!(text.contains("\\u{1b}[2J"), "{args:?}:\n{text}");
        }
    }
    drop(tx);
    Ok(())
}

const IDLE_CLIENTS: &str = r#"
import socket, ssl, sys, time
host, port, ca, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.check_hostname = False
ctx.set_alpn_protocols(["h2"])
socks = []
for i in range(n):
    s = socket.create_connection((host, port))
    if i % 2:
        # TLS done, then silence: never the HTTP/2 preface.
        s = ctx.wrap_socket(s)
    socks.append(s)
start = time.time()
open_ = list(socks)
while open_ and time.time() - start < 60:
    still = []
    for s in open_:
        s.settimeout(0.01)
        try:
            if s.recv(1) == b"":
                continue
        except (socket.timeout, ssl.SSLWantReadError):
            still.append(s)
            continue
        except (ConnectionError, ssl.SSLError, OSError):
            continue
    open_ = still
    time.sleep(0.2)
print(f"{len(open_)} {time.time() - start:.1f}")
"#;

/// Opens N TLS connections without a client certificate, speaks just enough HTTP/2 to look alive
/// (preface, SETTINGS, a PING every second) and holds them; prints "ready OPEN" once all were
/// tried, then "OPEN" every second.
const ANONYMOUS_HOLDERS: &str = r#"
import socket, ssl, sys, time
host, port, ca, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.load_verify_locations(ca)
ctx.check_hostname = False
ctx.set_alpn_protocols(["h2"])
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
PING = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
socks = []
for i in range(n):
    try:
        s = ctx.wrap_socket(socket.create_connection((host, port), timeout=10))
        s.sendall(PREFACE + ACK)
        s.setblocking(False)
        socks.append(s)
    except (OSError, ssl.SSLError):
        pass
def alive():
    global socks
    still = []
    for s in socks:
        try:
            while True:
                if s.recv(65536) == b"":
                    raise ConnectionError()
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        except (OSError, ssl.SSLError, ConnectionError):
            continue
        try:
            s.sendall(PING)
            still.append(s)
        except (ssl.SSLWantWriteError, BlockingIOError):
            still.append(s)
        except (OSError, ssl.SSLError):
            pass
    socks = still
    return len(socks)
print(f"ready {alive()}", flush=True)
deadline = time.time() + 60
while time.time() < deadline:
    time.sleep(1)
    print(alive(), flush=True)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_connections_never_lock_out_operators_or_known_agents() -> Result<()> {
    use std::io::BufRead;
    let clusters = flotilla_e2e::SimCluster::start_many(&["eu-1"])?;
    let hub = Hub::start(HubOptions {
        poll_interval: "500ms".into(),
        http: true,
        extra_args: vec!["--max-connections".into(), "200".into()],
        ..HubOptions::default()
    })?;
    let token = hub.token(&[])?;
    let mut agent =
        hub.agent_with_cluster_labels("eu-1", Some(&token), &clusters.kubeconfig_of("eu-1"), "")?;
    hub.wait_connected("eu-1", T)?;
    let (host, port) = hub.addr.rsplit_once(':').context("host:port")?;
    let mut holders = std::process::Command::new("python3")
        .args(["-c", ANONYMOUS_HOLDERS, host, port])
        .arg(hub.pki("ca.pem"))
        .arg("500")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let mut lines = std::io::BufReader::new(holders.stdout.take().context("stdout")?).lines();
    let ready = lines.next().context("holders ended")??;
    let held: usize = ready
        .strip_prefix("ready ")
        .context("ready line")?
        .parse()?;
    assert!(held >= 150, "the flood holds most of the cap: {held}");
    // The admin always gets in, fast.
    for i in 0..5 {
        let t = Instant::now();
        hub.cli_json(&["status"])?;
        let took = t.elapsed();
        assert!(took < Duration::from_secs(1), "status #{i} took {took:?}");
    }
    // A known agent that lost its connection gets back in.
    agent.process.kill9();
    wait_for(T, "eu-1 seen gone", || {
        let c = hub.cluster("eu-1")?.context("eu-1")?;
        ensure!(c["connected"] == false, "{c}");
        Ok(Some(()))
    })?;
    let kubeconfig = clusters.kubeconfig_of("eu-1");
    agent.restart_with(&hub.url, &hub.pki("ca.pem"), None, Some(&kubeconfig))?;
    wait_for(T, "eu-1 connected again", || {
        let c = hub.cluster("eu-1")?.context("eu-1")?;
        ensure!(c["connected"] == true, "{c}");
        Ok(Some(()))
    })?;
    // The flood was still there: anonymous connections made room, they did not all go.
    let still: usize = lines.next().context("holders ended")??.trim().parse()?;
    assert!(still >= 100, "{still} anonymous connections still held");
    let (_, metrics) = http_get(hub.http_addr.as_deref().context("http")?, "/metrics")?;
    assert!(
        metrics.contains(
            "connections_refused_total{listener=\"grpc\",reason=\"evicted_unauthenticated\"}"
        ),
        "{metrics}"
    );
    let _ = holders.kill();
    let _ = holders.wait();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_that_never_finish_are_closed() -> Result<()> {
    let hub = hub()?;
    let (host, port) = hub.addr.rsplit_once(':').context("host:port")?;
    let out = std::process::Command::new("python3")
        .args(["-c", IDLE_CLIENTS, host, port])
        .arg(hub.pki("ca.pem"))
        .arg("300")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut fields = text.split_whitespace();
    let open: usize = fields.next().context("count")?.parse()?;
    let secs: f64 = fields.next().context("seconds")?.parse()?;
    assert_eq!(open, 0, "{open} connections still open after {secs}s");
    assert!(secs <= 35.0, "closed after {secs}s");
    // The hub answers throughout and afterwards.
    hub.cli_json(&["cluster", "list"])?;

    // A webhook whose body stalls: answered 408 or cut off, within the request deadline.
    let http = hub.http_addr.clone().context("http listener")?;
    let t = Instant::now();
    let mut conn = std::net::TcpStream::connect(&http)?;
    use std::io::{Read, Write};
    conn.write_all(
        b"POST /webhooks/git HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"ref\":",
    )?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reply = Vec::new();
    let _ = conn.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // Cut off by the idle timer (the body read fails: 400) or by the request deadline (408).
    assert!(
        reply.is_empty()
            || reply.starts_with("HTTP/1.1 408")
            || (reply.starts_with("HTTP/1.1 400") && reply.contains("error reading a body")),
        "{reply}"
    );
    let (_, metrics) = http_get(&http, "/metrics")?;
    assert!(
        metrics.contains("connections_refused_total{listener=\"http\",reason=\"idle\"}"),
        "{metrics}"
    );
    eprintln!("300 idle connections closed after {secs}s");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stale_lock_left_by_a_killed_fetch_recovers_by_itself() -> Result<()> {
    let hub = hub()?;
    let dir = tempfile::tempdir()?;
    let repo = GitRepo::init(&dir.path().join("repo"))?;
    repo.write(
        "app/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {v: \"1\"}\n",
    )?;
    let v1 = repo.commit("v1")?;
    hub.apply_app(&app_doc("locked", &repo, "app", "plain"))?;
    hub.wait_revision("locked", &v1, T)?;
    // What `kill -9` mid-fetch leaves: ref locks in the cache.
    let caches = hub.data_dir().join("repos");
    let mut planted = 0;
    for cache in std::fs::read_dir(&caches)? {
        let origin = cache?.path().join("refs/remotes/origin");
        if origin.is_dir() {
            std::fs::write(origin.join("main.lock"), "")?;
            std::fs::write(origin.join("HEAD.lock"), "")?;
            planted += 1;
        }
    }
    ensure!(planted == 1, "expected one cache, planted {planted}");
    repo.write(
        "app/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {v: \"2\"}\n",
    )?;
    let v2 = repo.commit("v2")?;
    // One poll (500 ms) and a fetch.
    hub.wait_revision("locked", &v2, Duration::from_secs(10))
        .map_err(|e| anyhow!("the cache stayed wedged: {e}"))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_past_the_caps_are_refused_and_counted() -> Result<()> {
    let hub = Hub::start(HubOptions {
        http: true,
        extra_args: vec!["--max-connections-per-address".into(), "40".into()],
        ..HubOptions::default()
    })?;
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(std::net::TcpStream::connect(&hub.addr)?);
    }
    // The 40 past the cap are closed at once; the first 40 are held (until the TLS timeout).
    use std::io::Read;
    let closed = wait_for(Duration::from_secs(5), "40 connections refused", || {
        let mut closed = 0;
        for conn in &mut held {
            conn.set_read_timeout(Some(Duration::from_millis(5)))?;
            let mut b = [0u8; 1];
            let waiting = matches!(conn.read(&mut b), Err(ref e)
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
            if !waiting {
                closed += 1;
            }
        }
        ensure!(closed >= 40, "{closed} closed");
        Ok(Some(closed))
    })?;
    assert!(closed < 80, "every connection was closed");
    let http = hub.http_addr.clone().context("http listener")?;
    let (_, metrics) = http_get(&http, "/metrics")?;
    assert!(
        metrics
            .contains("connections_refused_total{listener=\"grpc\",reason=\"max_per_address\"} 40"),
        "{metrics}"
    );
    drop(held);
    hub.cli_json(&["cluster", "list"])?;
    Ok(())
}

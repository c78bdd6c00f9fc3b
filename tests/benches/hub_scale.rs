//! Hub scale with simulated agents: N agents against the real `flotilla-hub` binary, each a real
//! mTLS gRPC session through the agent's own link code (its own key and certificate, many per
//! process) and no Kubernetes cluster: an agent answers an assignment by reporting the assigned
//! digest Synced and Healthy after `FLOTILLA_BENCH_DELAY_MS` (default 100), and reconnects with
//! jittered backoff as the real agent does.
//!
//! Run: `cargo bench -p flotilla-e2e --bench hub_scale` — `FLOTILLA_BENCH_AGENTS` (default
//! 10000), `FLOTILLA_BENCH_DEADLINE_S` (default 600: a stage that has not finished by then is
//! reported as missed, and the bench goes on), `FLOTILLA_BENCH_HUB_ENV` (`K=V,K=V`: more
//! environment for the hub, e.g. allocator settings to compare).
//! It prints each stage and one last line
//! `RESULT agents=N connected=N rss_kib_per_cluster=X notify_p99_ms=Y healthy_p99_ms=Z reconnect_s=W status_p99_ms=V`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_agent::fleet::StatusBoard;
use flotilla_agent::link::{FleetLink, HubLink};
use flotilla_agent::metrics::Metrics;
use flotilla_e2e::{GitRepo, Hub, HubOptions, grpc};
use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::{AppDigest, AppStatus, GetRolloutRequest, HealthStatus, SyncStatus};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// (RSS KiB, CPU ticks user+system) of a process, from /proc.
fn proc_stats(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
        })
        .unwrap_or(0);
    (rss, ticks)
}

/// What every simulated agent shares with the bench.
#[derive(Default)]
struct Shared {
    connected: AtomicUsize,
    /// digest → when each agent first heard it assigned.
    notified: Mutex<HashMap<String, Vec<Instant>>>,
    /// Sessions welcomed, by second since the bench started (reconnect pacing).
    welcomes: Mutex<BTreeMap<u64, usize>>,
}

/// A full-jitter delay in `[0, cap)`, from the agent's own backoff.
fn jitter(attempt: u32) -> Duration {
    let mut backoff =
        flotilla_agent::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut d = Duration::ZERO;
    for _ in 0..=attempt.min(8) {
        d = backoff.next_delay(rand_fraction());
    }
    d
}

fn rand_fraction() -> f64 {
    let mut b = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// One simulated agent: registers, holds a session, answers assignments, reconnects.
async fn agent(
    link: HubLink,
    (name, labels): (String, BTreeMap<String, String>),
    token: String,
    delay: Duration,
    shared: Arc<Shared>,
    started: Instant,
    shutdown: CancellationToken,
) {
    let mut attempt = 0;
    let creds = loop {
        match link.register(&token, &name, &labels).await {
            Ok(c) => break c,
            Err(_) if !shutdown.is_cancelled() => {
                tokio::time::sleep(jitter(attempt)).await;
                attempt += 1;
            }
            Err(_) => return,
        }
    };
    let (creds_tx, mut creds_rx) = watch::channel(creds.clone());
    let (assignments, mut assigned) = watch::channel(None);
    let board = Arc::new(StatusBoard::default());
    let fleet = FleetLink {
        assignments,
        board: Arc::clone(&board),
        metrics: Arc::new(Metrics::default()),
    };
    // Answers every new assignment: the digest reported Synced and Healthy after `delay`.
    let responder = {
        let (board, shared, shutdown) = (Arc::clone(&board), Arc::clone(&shared), shutdown.clone());
        tokio::spawn(async move {
            let mut seen: HashMap<String, String> = HashMap::new();
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    changed = assigned.changed() => if changed.is_err() { return },
                }
                let Some(a) = assigned.borrow_and_update().clone() else {
                    continue;
                };
                let now = Instant::now();
                for app in a.apps {
                    if app.digest.is_empty() || seen.get(&app.app) == Some(&app.digest) {
                        continue;
                    }
                    seen.insert(app.app.clone(), app.digest.clone());
                    shared
                        .notified
                        .lock()
                        .unwrap()
                        .entry(app.digest.clone())
                        .or_default()
                        .push(now);
                    let board = Arc::clone(&board);
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        board.set(AppStatus {
                            app: app.app,
                            revision: app.revision,
                            digest: app.digest,
                            sync: SyncStatus::Synced.into(),
                            health: HealthStatus::Healthy.into(),
                            ..AppStatus::default()
                        });
                    });
                }
            }
        })
    };
    let mut attempt = 0;
    while !shutdown.is_cancelled() {
        let running: Vec<AppDigest> = board
            .all()
            .into_iter()
            .map(|s| AppDigest {
                app: s.app,
                digest: s.digest,
            })
            .collect();
        let mut session = match link.open(&creds, running).await {
            Ok(s) => s,
            Err(_) => {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(jitter(attempt)) => {}
                }
                attempt += 1;
                continue;
            }
        };
        attempt = 0;
        shared.connected.fetch_add(1, Ordering::SeqCst);
        *shared
            .welcomes
            .lock()
            .unwrap()
            .entry(started.elapsed().as_secs())
            .or_default() += 1;
        let _ = link
            .drive(&mut session, &mut creds_rx, &shutdown, &fleet)
            .await;
        shared.connected.fetch_sub(1, Ordering::SeqCst);
    }
    drop(creds_tx);
    responder.abort();
}

/// Polls `check` every `every` until it is true or `deadline` passes; how long it took, if it did.
fn until(deadline: Duration, every: Duration, mut check: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < deadline {
        if check() {
            return Some(started.elapsed());
        }
        std::thread::sleep(every);
    }
    None
}

/// Times `flotilla status -o json` in a loop on its own thread until `stop` is set.
fn status_prober(
    hub: &Hub,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<Duration>> {
    // Operators dial their own listener, admitted apart from the agents.
    let cli = hub
        .operator_cli()
        .expect("the bench hub serves the operators' listener");
    std::thread::spawn(move || {
        let mut took = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            let ok = cli
                .run(&["-o", "json", "status"])
                .map(|o| o.status.success())
                .unwrap_or(false);
            // A failed call counts as the time it took to fail, and is marked by being slow.
            took.push(if ok {
                started.elapsed()
            } else {
                started.elapsed().max(Duration::from_secs(10))
            });
            std::thread::sleep(Duration::from_millis(250));
        }
        took
    })
}

fn app_doc(repo: &GitRepo, steps: &str) -> String {
    format!(
        "apiVersion: flotilla.dev/v1alpha1\nkind: App\nmetadata: {{name: web}}\nspec:\n  source: {{repoURL: \"{}\", path: web}}\n  targets: {{selector: {{matchExpressions: [{{key: shard, operator: Exists}}]}}}}\n  rollout: {{steps: {steps}}}\n",
        repo.url()
    )
}

/// Per-cluster Healthy times of the rollout of `revision`, first seen by polling from `t0`.
async fn watch_rollout(
    admin: &mut AdminClient<tonic::transport::Channel>,
    revision: &str,
    n: usize,
    t0: Instant,
    deadline: Duration,
) -> Vec<Duration> {
    let mut healthy: HashMap<String, Duration> = HashMap::new();
    while t0.elapsed() < deadline && healthy.len() < n {
        if let Ok(r) = admin
            .get_rollout(GetRolloutRequest { app: "web".into() })
            .await
        {
            let r = r.into_inner();
            if r.revision == revision {
                for c in &r.clusters {
                    if c.state == "Healthy" {
                        healthy
                            .entry(c.cluster.clone())
                            .or_insert_with(|| t0.elapsed());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut times: Vec<Duration> = healthy.into_values().collect();
    times.sort();
    times
}

/// When each agent heard of the digest first assigned after `t0`, relative to `t0`.
fn notified_since(shared: &Shared, t0: Instant) -> Vec<Duration> {
    let map = shared.notified.lock().unwrap();
    // The newest digest: the one with notifications after t0.
    let mut best = (String::new(), Vec::new());
    for (digest, times) in map.iter() {
        let after: Vec<Duration> = times
            .iter()
            .filter(|t| **t >= t0)
            .map(|t| t.duration_since(t0))
            .collect();
        if after.len() > best.1.len() {
            best = (digest.clone(), after);
        }
    }
    best.1.sort();
    best.1
}

fn main() {
    let n: usize = env_or("FLOTILLA_BENCH_AGENTS", 10_000);
    let delay = Duration::from_millis(env_or("FLOTILLA_BENCH_DELAY_MS", 100));
    let deadline = Duration::from_secs(env_or("FLOTILLA_BENCH_DEADLINE_S", 600));
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let repo = GitRepo::init(&dir.path().join("repo")).unwrap();
    repo.write(
        "web/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: web}\ndata: {v: \"1\"}\n",
    )
    .unwrap();
    let v1 = repo.commit("v1").unwrap();
    let mut hub = Hub::start(HubOptions {
        poll_interval: "200ms".into(),
        // The hub's default (the harness's 1 s would be N heartbeats a second).
        heartbeat_interval: "10s".into(),
        operators: true,
        http: true,
        env: std::env::var("FLOTILLA_BENCH_HUB_ENV")
            .unwrap_or_default()
            .split(',')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                // A setting that is silently dropped would be a comparison that is not one.
                let (k, v) = kv
                    .split_once('=')
                    .unwrap_or_else(|| panic!("FLOTILLA_BENCH_HUB_ENV: {kv:?} is not K=V"));
                (k.to_string(), v.to_string())
            })
            .collect(),
        extra_args: vec![
            "--max-connections".into(),
            (2 * n + 1000).to_string(),
            "--max-connections-per-address".into(),
            (2 * n + 1000).to_string(),
        ],
        ..HubOptions::default()
    })
    .unwrap();
    let hub_pid = hub.process.pid();
    let (idle_rss, _) = proc_stats(hub_pid);
    hub.apply_app(&app_doc(
        &repo,
        "[{selector: {}, maxUnavailable: \"100%\"}]",
    ))
    .unwrap();
    let token = hub
        .token(&["--uses", &n.to_string(), "--ttl", "2h"])
        .unwrap();
    let ca = std::fs::read(hub.pki("ca.pem")).unwrap();
    println!(
        "hub_scale: {n} simulated agents, report delay {delay:?}, hub idle RSS {idle_rss} KiB"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared::default());
    let shutdown = CancellationToken::new();

    // Stage 1: registration + connect, with `flotilla status` probed throughout.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = status_prober(&hub, Arc::clone(&stop));
    for i in 0..n {
        let labels = BTreeMap::from([("shard".to_string(), (i % 4).to_string())]);
        runtime.spawn(agent(
            HubLink::new(hub.url.clone(), ca.clone()),
            (format!("c{i:05}"), labels),
            token.clone(),
            delay,
            Arc::clone(&shared),
            started,
            shutdown.clone(),
        ));
    }
    let connect = until(deadline, Duration::from_millis(200), || {
        shared.connected.load(Ordering::SeqCst) == n
    });
    stop.store(true, Ordering::SeqCst);
    let mut status_times = prober.join().unwrap();
    status_times.sort();
    let connected = shared.connected.load(Ordering::SeqCst);
    match connect {
        Some(t) => println!(
            "registration + connect: {n} agents in {:.1} s",
            t.as_secs_f64()
        ),
        None => println!(
            "registration + connect: MISSED — {connected} of {n} connected after {} s",
            deadline.as_secs()
        ),
    }
    println!(
        "flotilla status while connecting: {} calls, p50 {} ms, p99 {} ms, max {} ms",
        status_times.len(),
        ms(pct(&status_times, 0.5)),
        ms(pct(&status_times, 0.99)),
        ms(status_times.last().copied().unwrap_or_default())
    );

    // Every agent runs v1 (the app was there before them) before anything is measured.
    let mut admin = runtime.block_on(async {
        AdminClient::new(grpc::channel(&hub, Some(grpc::admin(&hub).unwrap())).unwrap())
    });
    let settled = until(deadline, Duration::from_millis(200), || {
        shared
            .notified
            .lock()
            .unwrap()
            .values()
            .any(|times| times.len() >= connected)
    });
    std::thread::sleep(delay + Duration::from_secs(2));
    println!(
        "v1 ({}) assigned to every agent: {}",
        &v1[..12],
        settled.map_or("MISSED".to_string(), |t| format!(
            "{:.1} s after connect",
            t.as_secs_f64()
        ))
    );

    // Stage 2: idle cost.
    std::thread::sleep(Duration::from_secs(10));
    let (rss, ticks0) = proc_stats(hub_pid);
    let idle_window = Duration::from_secs(20);
    std::thread::sleep(idle_window);
    let (_, ticks1) = proc_stats(hub_pid);
    let per_cluster_kib = rss.saturating_sub(idle_rss) as f64 / connected.max(1) as f64;
    // Clock ticks are 1/100 s on Linux.
    let cpu_ms_per_s = (ticks1 - ticks0) as f64 * 10.0 / idle_window.as_secs_f64();
    println!(
        "hub idle: RSS {rss} KiB ({per_cluster_kib:.1} KiB per connected cluster), CPU {cpu_ms_per_s:.1} ms/s ({:.3} ms/s per cluster)",
        cpu_ms_per_s / connected.max(1) as f64
    );

    // Stage 3: commit → notified and Healthy, one step at 100 %, then four steps.
    let mut commit = |v: &str, steps: Option<&str>| {
        if let Some(steps) = steps
            && let Err(e) = hub.apply_app(&app_doc(&repo, steps))
        {
            println!("app apply (new steps): MISSED — {e:#}");
            return (Vec::new(), Vec::new());
        }
        repo.write(
            "web/cm.yaml",
            &format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: web}}\ndata: {{v: \"{v}\"}}\n"
            ),
        )
        .unwrap();
        let t0 = Instant::now();
        let revision = repo.commit(v).unwrap();
        let healthy = runtime.block_on(watch_rollout(
            &mut admin, &revision, connected, t0, deadline,
        ));
        let notified = notified_since(&shared, t0);
        (notified, healthy)
    };
    let (notified, healthy) = commit("2", None);
    println!(
        "commit (1 step, 100%): notified {}/{connected} p50 {} ms p99 {} ms; Healthy {}/{connected} p50 {} ms p99 {} ms",
        notified.len(),
        ms(pct(&notified, 0.5)),
        ms(pct(&notified, 0.99)),
        healthy.len(),
        ms(pct(&healthy, 0.5)),
        ms(pct(&healthy, 0.99)),
    );
    let notify_p99 = if notified.len() == connected {
        ms(pct(&notified, 0.99))
    } else {
        u128::MAX
    };
    let healthy_p99 = if healthy.len() == connected {
        ms(pct(&healthy, 0.99))
    } else {
        u128::MAX
    };
    let four = "[{selector: {matchLabels: {shard: \"0\"}}, maxUnavailable: \"100%\"}, {selector: {matchLabels: {shard: \"1\"}}, maxUnavailable: \"100%\"}, {selector: {matchLabels: {shard: \"2\"}}, maxUnavailable: \"100%\"}, {selector: {}, maxUnavailable: \"100%\"}]";
    let (notified4, healthy4) = commit("3", Some(four));
    println!(
        "commit (4 steps): notified {}/{connected} p50 {} ms p99 {} ms; Healthy {}/{connected} p50 {} ms p99 {} ms",
        notified4.len(),
        ms(pct(&notified4, 0.5)),
        ms(pct(&notified4, 0.99)),
        healthy4.len(),
        ms(pct(&healthy4, 0.5)),
        ms(pct(&healthy4, 0.99)),
    );

    // Stage 4: the hub killed and restarted; every agent comes back by itself.
    let before = started.elapsed().as_secs();
    hub.restart().unwrap();
    let restarted = Instant::now();
    let back = until(deadline, Duration::from_millis(200), || {
        restarted.elapsed() > Duration::from_secs(1) && shared.connected.load(Ordering::SeqCst) == n
    });
    let peak = shared
        .welcomes
        .lock()
        .unwrap()
        .range(before..)
        .map(|(_, c)| *c)
        .max()
        .unwrap_or(0);
    // What the hub itself admitted: sessions seen by the agents can bunch up behind handshakes
    // that were admitted at the rate but finished together.
    let admitted_peak = hub
        .http_addr
        .as_deref()
        .and_then(|a| flotilla_e2e::http_get(a, "/metrics").ok())
        .and_then(|(_, m)| {
            m.lines()
                .find_map(|l| l.strip_prefix("flotilla_hub_admissions_peak_per_second "))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let reconnect_s = match back {
        Some(t) => {
            println!(
                "after kill -9: all {n} back in {:.1} s, peak {peak} sessions/s, hub admitted at most {admitted_peak} handshakes/s",
                t.as_secs_f64()
            );
            t.as_secs_f64()
        }
        None => {
            println!(
                "after kill -9: MISSED — {} of {n} back after {} s, peak {peak} sessions/s",
                shared.connected.load(Ordering::SeqCst),
                deadline.as_secs()
            );
            f64::INFINITY
        }
    };

    shutdown.cancel();
    runtime.shutdown_timeout(Duration::from_secs(5));
    let fmt = |v: u128| {
        if v == u128::MAX {
            "missed".to_string()
        } else {
            v.to_string()
        }
    };
    println!(
        "RESULT agents={n} connected={connected} rss_kib_per_cluster={per_cluster_kib:.1} notify_p99_ms={} healthy_p99_ms={} reconnect_s={reconnect_s:.1} status_p99_ms={}",
        fmt(notify_p99),
        fmt(healthy_p99),
        ms(pct(&status_times, 0.99))
    );
}

//! Engine throughput and agent memory: a 1,000-object bundle applied through the real
//! `flotilla-agent apply` against kubesim with 5 ms of latency per request; RSS idle (holding a hub
//! session) and while watching 1,000 objects for drift.
//! Run: `cargo bench -p flotilla-agent --bench apply` (results go in docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kubesim::{ClusterSettings, Faults, Sim, SimOptions};

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn bundle(dir: &std::path::Path) {
    let mut text = String::new();
    for i in 0..100 {
        text.push_str(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: d{i:03}}}\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: d{i:03}}}}}\n  template:\n    metadata: {{labels: {{app: d{i:03}}}}}\n    spec: {{containers: [{{name: c, image: \"nginx:1.27\", ports: [{{containerPort: 80}}]}}]}}\n---\n"
        ));
        text.push_str(&format!("apiVersion: v1\nkind: Service\nmetadata: {{name: d{i:03}}}\nspec: {{selector: {{app: d{i:03}}}, ports: [{{port: 80}}]}}\n---\n"));
    }
    for i in 0..800 {
        text.push_str(&format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm{i:03}}}\ndata: {{config: \"{}\"}}\n---\n", "x".repeat(512)));
    }
    std::fs::write(dir.join("bundle.yaml"), text).unwrap();
}

struct Watched {
    child: Child,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
}

fn spawn(args: &[&str]) -> Watched {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    Watched { child, lines: rx }
}

#[tokio::main]
async fn main() {
    let sim = Sim::start(SimOptions {
        settings: ClusterSettings {
            ready_delay: Duration::from_millis(200),
            ..ClusterSettings::default()
        },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    sim.cluster("kubesim").unwrap().set_faults(Faults {
        latency_ms: 5,
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig("kubesim", &kubeconfig).unwrap();
    let bundle_dir = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle_dir).unwrap();
    bundle(&bundle_dir);

    let started = Instant::now();
    let mut agent = spawn(&[
        "apply",
        "--app",
        "bench",
        "--timeout",
        "60s",
        "--watch",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        bundle_dir.to_str().unwrap(),
    ]);
    let pid = agent.child.id();
    let mut peak: f64 = 0.0;
    let (mut last_applied, mut summary, mut watching) = (None, None, None);
    while watching.is_none() {
        peak = peak.max(rss_mib(pid));
        match agent.lines.recv_timeout(Duration::from_millis(20)) {
            Ok((t, line)) => {
                if line.trim_start().starts_with("applied") {
                    last_applied = Some(t);
                } else if line.starts_with("app bench:") && line.contains("applied") {
                    println!("{line}");
                    summary = Some(t);
                } else if line.starts_with("watching for drift") {
                    watching = Some(t);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(e) => panic!("agent ended early: {e}"),
        }
    }
    let apply = last_applied.unwrap() - started;
    let total = summary.unwrap() - started;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holding = rss_mib(pid);
    println!("1000-object bundle, kubesim latency 5 ms:");
    println!(
        "  apply phase   {:>8.2?}  ({:.0} objects/s)",
        apply,
        1000.0 / apply.as_secs_f64()
    );
    println!("  until Healthy {:>8.2?}", total);
    println!("  agent RSS peak during apply {peak:.1} MiB; watching 1000 objects {holding:.1} MiB");
    let _ = agent.child.kill();
    let _ = agent.child.wait();

    // Idle: an agent holding its hub session, no apps.
    let hub_dir = dir.path().join("hub");
    flotilla_hub::identity::pki::init(&hub_dir, "bench.local", &[]).unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let hub = tokio::spawn(flotilla_hub::server::serve(
        flotilla_hub::server::ServeOptions {
            data_dir: hub_dir.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            settings: flotilla_hub::Settings::default(),
            http_listen: None,
            operator_listen: None,
            sources: flotilla_hub::server::SourceOptions::default(),
        },
        shutdown.clone(),
        move |bound| {
            let _ = ready_tx.send(bound.grpc);
        },
    ));
    let addr = ready_rx.await.unwrap();
    let paths = flotilla_hub::identity::pki::PkiPaths::new(&hub_dir);
    let tls = flotilla_proto::ClientTls {
        ca_pem: std::fs::read(paths.ca()).unwrap(),
        identity: Some((
            std::fs::read(paths.admin()).unwrap(),
            std::fs::read(paths.admin_key()).unwrap(),
        )),
    };
    let url = format!("https://{addr}");
    let mut admin = flotilla_proto::v1::admin_client::AdminClient::new(
        flotilla_proto::endpoint(&url, &tls).unwrap().connect_lazy(),
    );
    let token = admin
        .create_token(flotilla_proto::v1::CreateTokenRequest {
            ttl_seconds: 600,
            uses: 1,
            cluster_name: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut idle = Command::new(env!("CARGO_BIN_EXE_flotilla-agent"))
        .args([
            "run",
            "--hub",
            &url,
            "--ca",
            paths.ca().to_str().unwrap(),
            "--cluster-name",
            "idle",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("idle-agent"))
        .env("FLOTILLA_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "  agent RSS idle (hub session, no apps) {:.1} MiB",
        rss_mib(idle.id())
    );
    let _ = idle.kill();
    let _ = idle.wait();
    shutdown.cancel();
    let _ = hub.await;
    sim.shutdown().await;
}

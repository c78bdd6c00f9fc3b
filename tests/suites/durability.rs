//! What the hub acknowledged survives `kill -9`: registrations and revocations.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use flotilla_e2e::grpc::{agent_identity, register, session_refusal};
use flotilla_e2e::{Hub, HubOptions};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn deregister_drops_the_stream_within_5s_and_holds_after_kill_9() -> Result<()> {
    let mut hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&[])?;
    let mut agent = hub.agent("doomed", Some(&token), "")?;
    hub.wait_connected("doomed", T)?;
    let identity = agent_identity(&agent)?;

    let started = Instant::now();
    let out = hub.cli(&["cluster", "deregister", "doomed"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, log) = agent.process.wait_exit(Duration::from_secs(5))?;
    let dropped_after = started.elapsed();
    println!("agent stream dropped {dropped_after:?} after deregister");
    assert!(dropped_after < Duration::from_secs(5));
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("revoked"), "{log}");

    hub.kill9();
    hub.restart()?;
    assert!(hub.cluster("doomed")?.is_none());
    agent.restart(&hub.url, &hub.pki("ca.pem"), None)?;
    let (status, log) = agent.process.wait_exit(T)?;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("revoked"), "{log}");

    let err = session_refusal(&hub, identity).await?;
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_registration_survives_kill_9() -> Result<()> {
    let mut hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&["--uses", "1000"])?;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();

    // Four concurrent registration loops; the hub is killed while they run.
    let mut workers = Vec::new();
    for w in 0..4 {
        let acked = Arc::clone(&acked);
        let token = token.clone();
        let ca = std::fs::read(hub.pki("ca.pem"))?;
        let url = hub.url.clone();
        workers.push(tokio::spawn(async move {
            for i in 0..200 {
                let name = format!("c{w}-{i}");
                let tls = flotilla_proto::ClientTls {
                    ca_pem: ca.clone(),
                    identity: None,
                };
                let Ok(endpoint) = flotilla_proto::endpoint(&url, &tls) else {
                    return;
                };
                let (_key, csr) = flotilla_e2e::grpc::key_and_csr(&name).unwrap();
                let request = flotilla_proto::v1::RegisterRequest {
                    token: token.clone(),
                    cluster_name: name.clone(),
                    labels: Default::default(),
                    csr_pem: csr,
                };
                let mut client = flotilla_proto::v1::registration_client::RegistrationClient::new(
                    endpoint.connect_lazy(),
                );
                match client.register(request).await {
                    Ok(_) => acked.lock().unwrap().push(name),
                    Err(_) => return,
                }
            }
        }));
    }
    // Let some registrations land, then kill -9 mid-stream.
    let deadline = Instant::now() + T;
    while acked.lock().unwrap().len() < 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hub.kill9();
    for w in workers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 20,
        "only {} registrations were acknowledged",
        acked.len()
    );

    hub.restart()?;
    let listed = hub.cli_json(&["cluster", "list"])?;
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let missing: Vec<&String> = acked
        .iter()
        .filter(|n| !names.contains(&n.as_str()))
        .collect();
    println!(
        "{} acknowledged, {} listed after kill -9",
        acked.len(),
        names.len()
    );
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");

    // A registration that succeeded also left a usable identity behind.
    let late = hub.token(&[])?;
    register(&hub, &late, "after-restart").await?;
    Ok(())
}

//! Registration through the real binaries: the happy path, labels, and every bad input the agent can
//! send, each rejected with a specific reason and without changing stored state.

use std::time::Duration;

use anyhow::{Result, ensure};
use flotilla_e2e::{Agent, Hub, HubOptions, stable_view, wait_for};

const T: Duration = Duration::from_secs(20);

#[test]
fn register_shows_connected_and_labels_round_trip() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&["--cluster", "eu-1"])?;
    let _agent = hub.agent("eu-1", Some(&token), "region=eu,tier=prod")?;
    let cluster = hub.wait_connected("eu-1", T)?;
    assert_eq!(cluster["labels"]["region"], "eu");
    assert_eq!(cluster["labels"]["tier"], "prod");
    assert!(cluster["cert_expires"].is_string());

    let out = hub.cli(&[
        "cluster",
        "label",
        "eu-1",
        "tier-",
        "ring=canary",
        "-o",
        "json",
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = hub.cli_json(&["cluster", "get", "eu-1"])?;
    assert_eq!(
        got["labels"],
        serde_json::json!({"region": "eu", "ring": "canary"})
    );
    assert_eq!(got["connected"], true);

    let bad = hub.cli(&["cluster", "label", "eu-1", "Bad Key=x"])?;
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("label key") && err.contains("Bad Key"),
        "{err}"
    );
    let missing = hub.cli(&["cluster", "get", "nope"])?;
    assert!(String::from_utf8_lossy(&missing.stderr).contains("NotFound"));
    Ok(())
}

/// Starts an agent that must be refused; returns its stderr after it exits with code 2.
fn refused(hub: &Hub, name: &str, token: &str) -> Result<String> {
    let mut agent = hub.agent(name, Some(token), "")?;
    let (status, log) = agent.process.wait_exit(T)?;
    assert_eq!(
        status.code(),
        Some(2),
        "agent for {name} should be refused: {log}"
    );
    assert!(
        !log.contains(token),
        "the token leaked into the agent's output: {log}"
    );
    Ok(log)
}

#[test]
fn bad_tokens_and_names_are_rejected_and_change_nothing() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    let first = hub.token(&["--uses", "1"])?;
    let _a = hub.agent("a", Some(&first), "")?;
    hub.wait_connected("a", T)?;
    let before = stable_view(&hub.cli_json(&["cluster", "list"])?);

    let log = refused(&hub, "b", "flt_0000")?;
    assert!(log.contains("unknown token"), "{log}");

    let log = refused(&hub, "b", &first)?;
    assert!(log.contains("no registrations left"), "{log}");

    let expiring = hub.token(&["--ttl", "1s"])?;
    std::thread::sleep(Duration::from_millis(2100));
    let log = refused(&hub, "b", &expiring)?;
    assert!(log.contains("expired"), "{log}");

    let bound = hub.token(&["--cluster", "c"])?;
    let log = refused(&hub, "b", &bound)?;
    assert!(log.contains("bound to cluster \"c\""), "{log}");

    let fresh = hub.token(&["--uses", "5"])?;
    let log = refused(&hub, "a", &fresh)?;
    assert!(log.contains("already registered"), "{log}");

    let log = refused(&hub, "Not_A_Name", &fresh)?;
    assert!(log.contains("invalid cluster name"), "{log}");

    assert_eq!(stable_view(&hub.cli_json(&["cluster", "list"])?), before);
    // The failed attempts did not consume the multi-use token: it still registers a cluster.
    let _b = hub.agent("b", Some(&fresh), "")?;
    hub.wait_connected("b", T)?;
    Ok(())
}

#[test]
fn an_agent_whose_certificate_expired_offline_waits_for_a_bound_token() -> Result<()> {
    let hub = Hub::start(HubOptions {
        cert_ttl: "10s".into(),
        ..HubOptions::default()
    })?;
    let token = hub.token(&["--cluster", "lapsed"])?;
    let agent = hub.agent("lapsed", Some(&token), "")?;
    hub.wait_connected("lapsed", T)?;
    let mut agent = agent;
    agent.process.kill9();
    std::thread::sleep(Duration::from_secs(11));

    // Without a token it does not exit: it says what it needs and keeps waiting for one.
    let token_file = agent.data_dir.with_extension("token");
    let extra = ["--token-file".to_string(), token_file.display().to_string()];
    let mut agent = Agent::start_with(
        &hub.url,
        &hub.pki("ca.pem"),
        &agent.data_dir.clone(),
        None,
        None,
        "",
        &extra,
    )?;
    wait_for(T, "the agent to say it needs a token", || {
        let log = agent.process.log_text();
        ensure!(
            log.contains("expired") && log.contains("bootstrap token bound to its name"),
            "{log}"
        );
        Ok(Some(()))
    })?;
    assert!(agent.process.running(), "{}", agent.process.log_text());

    // Given a token bound to its name, it comes back as itself, from the same data directory.
    let again = hub.token(&["--cluster", "lapsed"])?;
    std::fs::write(&token_file, format!("{again}\n"))?;
    hub.wait_connected("lapsed", T)?;
    assert!(
        !agent.process.log_text().contains(&again),
        "the token is never logged"
    );
    Ok(())
}

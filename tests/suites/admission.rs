//! Admission under a connection storm: the agents' listener keeps a short queue and closes what
//! it cannot take soon (the peer backs off instead of waiting out its connect timeout), and
//! operators on their own listener keep getting answers however full the agents' queue is.

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use flotilla_e2e::{Hub, HubOptions, http_get, wait_for};

/// The hub's refusals with `reason`, as /metrics counts them (0 before the first).
fn refused(hub: &Hub, reason: &str) -> Result<f64> {
    let addr = hub.http_addr.as_deref().context("http listener")?;
    let (_, body) = http_get(addr, "/metrics")?;
    Ok(body
        .lines()
        .filter(|l| l.starts_with("flotilla_hub_connections_refused_total{"))
        .filter(|l| l.contains(&format!("reason=\"{reason}\"")))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum())
}

#[test]
fn operators_answer_on_their_own_listener_while_a_storm_fills_the_agents_queue() -> Result<()> {
    let hub = Hub::start(HubOptions {
        http: true,
        operators: true,
        // One handshake a second: the queue (two seconds' worth) fills at once.
        extra_args: ["--max-handshakes-per-second", "1", "--handshake-burst", "1"]
            .map(String::from)
            .to_vec(),
        ..HubOptions::default()
    })?;
    let operators = hub.operator_cli().context("operators' listener")?;
    // Silent peers dialing the agents' listener over and over (each admitted one then holds its
    // handshake until the deadline).
    let stop = Arc::new(AtomicBool::new(false));
    let storm = {
        let (addr, stop) = (hub.addr.clone(), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let Ok(s) = TcpStream::connect(&addr) {
                    held.push(s);
                }
                if held.len() > 200 {
                    held.drain(..100);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let result = (|| -> Result<()> {
        wait_for(
            Duration::from_secs(20),
            "the agents' queue to be full",
            || {
                let n = refused(&hub, "admission_queue_full")?;
                ensure!(n > 10.0, "{n} closed for a full queue");
                Ok(Some(()))
            },
        )?;
        for i in 0..5 {
            let out = operators.run(&["-o", "json", "status"])?;
            ensure!(
                out.status.success(),
                "status call {i} on the operators' listener failed during the storm: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let still = refused(&hub, "admission_queue_full")?;
        ensure!(still > 10.0, "the storm went on meanwhile");
        Ok(())
    })();
    stop.store(true, Ordering::SeqCst);
    let _ = storm.join();
    result?;
    // The storm over, the agents' listener serves again.
    wait_for(
        Duration::from_secs(30),
        "the agents' listener to answer again",
        || {
            let out = hub.admin_cli().run(&["-o", "json", "status"])?;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(Some(()))
        },
    )?;
    Ok(())
}

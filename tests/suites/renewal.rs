//! Certificate renewal: with a seconds-scale lifetime the agent renews again and again at 2/3 of each
//! certificate's life and never drops off the hub.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Result;
use flotilla_e2e::{Hub, HubOptions};

#[test]
fn renewals_keep_the_agent_connected() -> Result<()> {
    // 12 s certificates: renewals about every 8 s.
    let hub = Hub::start(HubOptions {
        cert_ttl: "12s".into(),
        ..HubOptions::default()
    })?;
    let token = hub.token(&[])?;
    let agent = hub.agent("renewing", Some(&token), "")?;
    let first = hub.wait_connected("renewing", Duration::from_secs(20))?;

    let mut serials = BTreeSet::from([first["cert_serial"]
        .as_str()
        .unwrap_or_default()
        .to_string()]);
    let until = Instant::now() + Duration::from_secs(30);
    let mut polls = 0;
    while Instant::now() < until {
        let cluster = hub.cluster("renewing")?.expect("cluster listed");
        assert_eq!(
            cluster["connected"],
            true,
            "dropped off after {} renewals: {}",
            serials.len() - 1,
            agent.process.log_text()
        );
        serials.insert(
            cluster["cert_serial"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
        polls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("{polls} polls, {} certificates", serials.len());
    assert!(
        serials.len() >= 4,
        "expected at least 3 renewals, saw certificates {serials:?}"
    );
    let log = agent.process.log_text();
    assert!(log.matches("certificate renewed").count() >= 3, "{log}");
    Ok(())
}

//! mTLS boundaries: every RPC but Register needs a valid, unrevoked client certificate from the hub
//! CA; identities come only from certificates; bad input is refused with a specific status and leaves
//! stored state unchanged; garbage on the port does not hurt the hub.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use flotilla_e2e::grpc::{self, admin, agent_identity, channel, key_and_csr, register};
use flotilla_e2e::{Hub, HubOptions, stable_view};
use flotilla_proto::v1::admin_client::AdminClient;
use flotilla_proto::v1::agent_client::AgentClient;
use flotilla_proto::v1::registration_client::RegistrationClient;
use flotilla_proto::v1::{
    AgentMessage, DeregisterClusterRequest, Hello, ListClustersRequest, RegisterRequest,
    RenewRequest, agent_message,
};
use tonic::Code;

const T: Duration = Duration::from_secs(20);

fn hello() -> tokio_stream::Once<AgentMessage> {
    tokio_stream::once(AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello::default())),
    })
}

async fn list(identity: Option<grpc::Identity>, hub: &Hub) -> Result<Vec<String>, tonic::Status> {
    let channel = channel(hub, identity).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let response = AdminClient::new(channel)
        .list_clusters(ListClustersRequest {})
        .await?;
    Ok(response
        .into_inner()
        .clusters
        .into_iter()
        .map(|c| c.name)
        .collect())
}

async fn renew(hub: &Hub, identity: grpc::Identity, cn: &str) -> Result<(), tonic::Status> {
    let (_key, csr) = key_and_csr(cn).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let channel =
        channel(hub, Some(identity)).map_err(|e| tonic::Status::internal(e.to_string()))?;
    RegistrationClient::new(channel)
        .renew(RenewRequest { csr_pem: csr })
        .await
        .map(drop)
}

async fn open_session(hub: &Hub, identity: Option<grpc::Identity>) -> Result<(), tonic::Status> {
    let channel = channel(hub, identity).map_err(|e| tonic::Status::internal(e.to_string()))?;
    AgentClient::new(channel).session(hello()).await.map(drop)
}

fn assert_code(result: Result<(), tonic::Status>, code: Code, needle: &str) {
    match result {
        Ok(()) => panic!("expected {code:?} ({needle}), got success"),
        Err(status) => {
            let text = flotilla_proto::describe_status(&status);
            assert_eq!(status.code(), code, "{text}");
            assert!(text.contains(needle), "expected {needle:?} in {text:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_decide_identity_and_bad_ones_are_refused() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&["--uses", "3"])?;
    let a = register(&hub, &token, "a").await?;
    let revoked = register(&hub, &token, "gone").await?;
    AdminClient::new(channel(&hub, Some(admin(&hub)?))?)
        .deregister_cluster(DeregisterClusterRequest {
            name: "gone".into(),
        })
        .await?;
    let before = stable_view(&hub.cli_json(&["cluster", "list"])?);

    // No client certificate: only Register is open.
    assert_code(
        list(None, &hub).await.map(drop),
        Code::Unauthenticated,
        "requires a client certificate",
    );
    assert_code(
        open_session(&hub, None).await,
        Code::Unauthenticated,
        "requires a client certificate",
    );
    let (_k, csr) = key_and_csr("x")?;
    let anonymous_renew = RegistrationClient::new(channel(&hub, None)?)
        .renew(RenewRequest { csr_pem: csr })
        .await
        .map(drop);
    assert_code(
        anonymous_renew,
        Code::Unauthenticated,
        "requires a client certificate",
    );

    // Cluster a's certificate cannot act as b, nor as an admin; the admin cannot act as an agent.
    assert_code(
        renew(&hub, a.clone(), "b").await,
        Code::PermissionDenied,
        "asks for cluster \"b\"",
    );
    assert_code(
        list(Some(a.clone()), &hub).await.map(drop),
        Code::PermissionDenied,
        "may not call admin",
    );
    assert_code(
        open_session(&hub, Some(admin(&hub)?)).await,
        Code::PermissionDenied,
        "cannot act as a cluster agent",
    );

    // A revoked certificate is refused everywhere.
    assert_code(
        renew(&hub, revoked.clone(), "gone").await,
        Code::Unauthenticated,
        "revoked",
    );
    assert_code(
        open_session(&hub, Some(revoked)).await,
        Code::Unauthenticated,
        "revoked",
    );

    // A certificate from another CA fails the TLS handshake.
    let other = Hub::start(HubOptions::default())?;
    let foreign = list(Some(admin(&other)?), &hub).await;
    let err = foreign.expect_err("a foreign CA's certificate must be refused");
    let text = flotilla_proto::describe_status(&err).to_lowercase();
    // In TLS 1.3 the server judges the client certificate after the client considers the handshake
    // done, so the client sees the UnknownCA alert or, if it is already writing, a closed or broken
    // connection. Either way the call failed at the transport, before any RPC ran.
    assert!(
        text.contains("unknownca") || text.contains("transport error"),
        "{text}"
    );
    assert_ne!(err.code(), Code::Ok);
    assert!(
        list(Some(admin(&hub)?), &hub).await.is_ok(),
        "the hub's own admin still works"
    );

    // A CSR whose signature does not match its key.
    let (_key, csr) = key_and_csr("c")?;
    let tampered = tamper_signature(&csr);
    let status = RegistrationClient::new(channel(&hub, None)?)
        .register(RegisterRequest {
            token: token.clone(),
            cluster_name: "c".into(),
            labels: Default::default(),
            csr_pem: tampered,
        })
        .await
        .map(drop);
    assert_code(status, Code::InvalidArgument, "signature does not verify");

    // Cluster a's own identity still works: renewal is allowed for itself.
    renew(&hub, a.clone(), "a").await?;

    let after = stable_view(&hub.cli_json(&["cluster", "list"])?);
    // Only the renewal changed a's serial/expiry; nothing else moved.
    let strip = |mut v: serde_json::Value| {
        for c in v.as_array_mut().into_iter().flatten() {
            let obj = c.as_object_mut().unwrap();
            obj.remove("cert_serial");
            obj.remove("cert_expires");
        }
        v
    };
    assert_eq!(strip(after), strip(before));
    Ok(())
}

/// Flips one base64 character inside the trailing signature of a PEM CSR.
fn tamper_signature(pem: &str) -> String {
    let mut lines: Vec<String> = pem.lines().map(str::to_string).collect();
    let last_body = lines.len() - 2;
    let line = &mut lines[last_body];
    let pos = line.trim_end_matches('=').len().saturating_sub(4);
    let c = line.as_bytes()[pos];
    let replacement = if c == b'A' { 'B' } else { 'A' };
    line.replace_range(pos..pos + 1, &replacement.to_string());
    lines.join("\n") + "\n"
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_certificate_is_refused_at_the_handshake() -> Result<()> {
    let hub = Hub::start(HubOptions {
        cert_ttl: "10s".into(),
        ..HubOptions::default()
    })?;
    let token = hub.token(&[])?;
    let identity = register(&hub, &token, "short").await?;
    renew(&hub, identity.clone(), "short").await?;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let err = renew(&hub, identity, "short")
        .await
        .expect_err("expired certificate accepted");
    let text = flotilla_proto::describe_status(&err).to_lowercase();
    // The same identity renewed fine before it expired; afterwards the handshake fails (the
    // CertificateExpired alert, or a closed connection when the client was already writing).
    assert!(
        text.contains("expired") || text.contains("transport error"),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_port_does_not_hurt_the_hub() -> Result<()> {
    let mut hub = Hub::start(HubOptions::default())?;
    let addr = hub.addr.clone();
    // Random bytes, a plaintext HTTP request, and a connection that never speaks.
    let mut noise = vec![0u8; 64 * 1024];
    for (i, b) in noise.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2654435761) >> 13) as u8;
    }
    for payload in [
        noise.as_slice(),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".as_slice(),
        b"\x16\x03\x01\x00\x05hello",
    ] {
        let mut stream = std::net::TcpStream::connect(&addr)?;
        let _ = stream.write_all(payload);
    }
    let _silent = std::net::TcpStream::connect(&addr)?;
    let mut half = std::net::TcpStream::connect(&addr)?;
    let _ = half.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff]);

    // The hub still serves agents and admins.
    let token = hub.token(&[])?;
    let _agent = hub.agent("after-noise", Some(&token), "")?;
    hub.wait_connected("after-noise", T)?;
    assert!(
        hub.process.running(),
        "hub died: {}",
        hub.process.log_text()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deregistered_agents_identity_is_refused_even_on_a_fresh_connection() -> Result<()> {
    let hub = Hub::start(HubOptions::default())?;
    let token = hub.token(&[])?;
    let mut agent = hub.agent("x", Some(&token), "")?;
    hub.wait_connected("x", T)?;
    let identity = agent_identity(&agent)?;
    let out = hub.cli(&["cluster", "deregister", "x"])?;
    assert!(out.status.success());
    let (status, log) = agent.process.wait_exit(T)?;
    assert_eq!(status.code(), Some(2), "{log}");
    assert_code(
        open_session(&hub, Some(identity)).await,
        Code::Unauthenticated,
        "revoked",
    );
    Ok(())
}

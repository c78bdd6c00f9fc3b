//! The hub's certificate authority: creates it, issues cluster certificates from CSRs, and reads the
//! identity out of a peer certificate.
//!
//! Identities are URI SANs: `spiffe://<trust-domain>/cluster/<name>` for agents and
//! `spiffe://<trust-domain>/admin/<name>` for operators. Nothing else in a certificate (CN, DNS names)
//! is ever used to decide who the caller is.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::db::fsutil::{read_file, write_private, write_public};
use crate::{Error, Result};

/// Clock skew allowance: certificates are valid from a little before they are issued.
const BACKDATE: Duration = Duration::from_secs(300);
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const HUB_AND_ADMIN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Who a verified peer certificate says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An agent of the named cluster.
    Cluster(String),
    /// An operator with the named admin identity.
    Admin(String),
}

/// What the hub needs from a client certificate the TLS layer already verified.
#[derive(Debug, Clone)]
pub struct PeerCert {
    pub serial: String,
    pub not_after: i64,
    pub identity: Identity,
}

/// A freshly issued cluster certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub pem: String,
    pub serial: String,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    pub not_after: i64,
}

/// Settings fixed at `init` time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubConfig {
    pub trust_domain: String,
}

/// Paths of the PKI files inside a data directory.
pub struct PkiPaths {
    pub dir: PathBuf,
}

impl PkiPaths {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("pki"),
        }
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }
    pub fn hub(&self) -> PathBuf {
        self.dir.join("hub.pem")
    }
    pub fn hub_key(&self) -> PathBuf {
        self.dir.join("hub-key.pem")
    }
    pub fn admin(&self) -> PathBuf {
        self.dir.join("admin.pem")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin-key.pem")
    }
}

fn pki_err(context: &'static str) -> impl FnOnce(rcgen::Error) -> Error {
    move |source| Error::Pki { context, source }
}

fn random_serial() -> Result<(SerialNumber, String)> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| Error::Pki {
            context: "serial",
            source: rcgen::Error::RingUnspecified,
        })?;
    // Positive, non-zero-leading INTEGER.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    Ok((SerialNumber::from_slice(&bytes), hex(&bytes)))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn validity(params: &mut CertificateParams, now: SystemTime, lifetime: Duration) {
    params.not_before = OffsetDateTime::from(now - BACKDATE);
    params.not_after = OffsetDateTime::from(now + lifetime);
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

fn uri_san(uri: String) -> Result<SanType> {
    Ok(SanType::URI(uri.try_into().map_err(pki_err("URI SAN"))?))
}

/// Creates a new hub PKI in `data_dir`: CA, the hub's serving certificate for `sans`, and an admin
/// client certificate. Refuses to overwrite an existing one.
pub fn init(data_dir: &Path, trust_domain: &str, sans: &[String]) -> Result<()> {
    let paths = PkiPaths::new(data_dir);
    if paths.ca().exists() {
        return Err(Error::DataDir {
            path: data_dir.display().to_string(),
            reason: "already initialized (pki/ca.pem exists)".into(),
        });
    }
    crate::db::fsutil::create_private_dir(&paths.dir)?;
    let now = SystemTime::now();

    let ca_key = KeyPair::generate().map_err(pki_err("CA key"))?;
    let mut ca = CertificateParams::default();
    // A per-CA suffix keeps two hubs' CAs distinguishable by name, so a certificate from another
    // hub fails as "unknown CA" rather than as a bad signature.
    let (_, suffix) = random_serial()?;
    ca.distinguished_name = common_name(&format!(
        "Flotilla hub CA ({trust_domain}) {}",
        &suffix[..8]
    ));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.serial_number = Some(random_serial()?.0);
    validity(&mut ca, now, CA_LIFETIME);
    let ca_cert = ca.self_signed(&ca_key).map_err(pki_err("CA"))?;
    let issuer = Issuer::new(ca, &ca_key);

    let hub_key = KeyPair::generate().map_err(pki_err("hub key"))?;
    let mut hub_sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    hub_sans.extend(sans.iter().cloned());
    hub_sans.dedup();
    let mut hub = CertificateParams::new(hub_sans).map_err(pki_err("hub SANs"))?;
    hub.distinguished_name = common_name("flotilla-hub");
    hub.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    hub.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    hub.serial_number = Some(random_serial()?.0);
    validity(&mut hub, now, HUB_AND_ADMIN_LIFETIME);
    let hub_cert = hub.signed_by(&hub_key, &issuer).map_err(pki_err("hub"))?;

    let admin_key = KeyPair::generate().map_err(pki_err("admin key"))?;
    let mut admin = CertificateParams::default();
    admin.distinguished_name = common_name("flotilla-admin");
    admin.subject_alt_names = vec![uri_san(format!("spiffe://{trust_domain}/admin/operator"))?];
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    admin.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    admin.serial_number = Some(random_serial()?.0);
    validity(&mut admin, now, HUB_AND_ADMIN_LIFETIME);
    let admin_cert = admin
        .signed_by(&admin_key, &issuer)
        .map_err(pki_err("admin"))?;

    write_private(&paths.ca_key(), ca_key.serialize_pem().as_bytes())?;
    write_private(&paths.hub_key(), hub_key.serialize_pem().as_bytes())?;
    write_private(&paths.admin_key(), admin_key.serialize_pem().as_bytes())?;
    write_public(&paths.hub(), hub_cert.pem().as_bytes())?;
    write_public(&paths.admin(), admin_cert.pem().as_bytes())?;
    let config = HubConfig {
        trust_domain: trust_domain.to_string(),
    };
    let config_json = serde_json::to_vec_pretty(&config).map_err(|source| Error::Corrupt {
        key: "hub.json".into(),
        source,
    })?;
    write_public(&data_dir.join("hub.json"), &config_json)?;
    // ca.pem last: its presence marks a complete init.
    write_public(&paths.ca(), ca_cert.pem().as_bytes())?;
    Ok(())
}

/// The loaded CA, able to issue cluster certificates.
pub struct Ca {
    pub trust_domain: String,
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn load(data_dir: &Path) -> Result<Self> {
        let paths = PkiPaths::new(data_dir);
        if !paths.ca().exists() {
            return Err(Error::DataDir {
                path: data_dir.display().to_string(),
                reason: "not initialized; run `flotilla-hub init --data-dir DIR` first".into(),
            });
        }
        let config_path = data_dir.join("hub.json");
        let config: HubConfig =
            serde_json::from_slice(&read_file(&config_path)?).map_err(|source| Error::Corrupt {
                key: config_path.display().to_string(),
                source,
            })?;
        let ca_pem = String::from_utf8_lossy(&read_file(&paths.ca())?).into_owned();
        let key_pem = String::from_utf8_lossy(&read_file(&paths.ca_key())?).into_owned();
        let key = KeyPair::from_pem(&key_pem).map_err(pki_err("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(pki_err("CA"))?;
        Ok(Self {
            trust_domain: config.trust_domain,
            ca_pem,
            issuer,
        })
    }

    /// The identity URI a cluster's certificate carries.
    pub fn cluster_uri(&self, name: &str) -> String {
        format!("spiffe://{}/cluster/{name}", self.trust_domain)
    }

    /// Verifies `csr_pem` (its signature must verify against its own key) and issues a client
    /// certificate for cluster `name`. The CSR may only ask for that same name.
    pub fn issue_cluster_cert(
        &self,
        name: &str,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<IssuedCert> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| match e {
            rcgen::Error::InvalidCertificationRequestSignature => Error::invalid(
                "csr",
                "signature does not verify against the request's public key",
            ),
            other => Error::invalid("csr", format!("cannot parse PKCS#10 PEM request: {other}")),
        })?;
        if let Some(cn) = csr.params.distinguished_name.get(&DnType::CommonName) {
            let cn = match cn {
                DnValue::Utf8String(s) => s.clone(),
                DnValue::PrintableString(s) => s.as_str().to_string(),
                _ => {
                    return Err(Error::invalid(
                        "csr",
                        "subject CN has an unsupported string type",
                    ));
                }
            };
            if cn != name {
                return Err(Error::PermissionDenied(format!(
                    "CSR asks for cluster {cn:?} but the caller may only get a certificate for {name:?}"
                )));
            }
        }
        let uri = self.cluster_uri(name);
        for san in &csr.params.subject_alt_names {
            let matches = matches!(san, SanType::URI(u) if u.as_str() == uri);
            if !matches {
                return Err(Error::PermissionDenied(format!(
                    "CSR asks for subject alternative name {san:?}; only {uri} may be issued to this caller"
                )));
            }
        }

        let now = SystemTime::now();
        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name(name);
        params.subject_alt_names = vec![uri_san(uri)?];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, now, lifetime);
        let not_after = params.not_after.unix_timestamp();
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(pki_err("cluster"))?;
        let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, cert.der()).as_ref());
        Ok(IssuedCert {
            pem: cert.pem(),
            serial: serial_hex,
            fingerprint,
            not_after,
        })
    }

    /// Reads serial, expiry and identity from a DER certificate that rustls already verified against
    /// this CA. Only a URI SAN in this hub's trust domain names an identity.
    pub fn peer_cert(&self, der: &[u8]) -> Result<PeerCert> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| Error::Unauthenticated(format!("unparsable client certificate: {e}")))?;
        let serial = hex(cert.raw_serial());
        let not_after = cert.validity().not_after.timestamp();
        let prefix = format!("spiffe://{}/", self.trust_domain);
        let sans = cert
            .subject_alternative_name()
            .map_err(|e| Error::Unauthenticated(format!("client certificate SANs: {e}")))?;
        let identity = sans
            .into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => {
                    let rest = uri.strip_prefix(&prefix)?;
                    if let Some(cluster) = rest.strip_prefix("cluster/") {
                        Some(Identity::Cluster(cluster.to_string()))
                    } else {
                        rest.strip_prefix("admin/")
                            .map(|a| Identity::Admin(a.to_string()))
                    }
                }
                _ => None,
            })
            .ok_or_else(|| {
                Error::Unauthenticated(format!(
                    "client certificate (serial {serial}) carries no identity in trust domain {}",
                    self.trust_domain
                ))
            })?;
        Ok(PeerCert {
            serial,
            not_after,
            identity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(cn: Option<&str>) -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        let pem = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, pem)
    }

    #[test]
    fn issues_a_cluster_cert_whose_identity_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "fleet.test", &[]).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let (_key, pem) = csr(Some("eu-1"));
        let issued = ca
            .issue_cluster_cert("eu-1", &pem, Duration::from_secs(600))
            .unwrap();
        let der = rustls_pem_der(&issued.pem);
        let peer = ca.peer_cert(&der).unwrap();
        assert_eq!(peer.identity, Identity::Cluster("eu-1".into()));
        assert_eq!(peer.serial, issued.serial);
        assert_eq!(peer.not_after, issued.not_after);
    }

    #[test]
    fn refuses_a_csr_for_another_name_and_a_tampered_csr() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "fleet.test", &[]).unwrap();
        let ca = Ca::load(dir.path()).unwrap();
        let (_key, pem) = csr(Some("other"));
        let err = ca
            .issue_cluster_cert("eu-1", &pem, Duration::from_secs(600))
            .unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        assert!(matches!(
            ca.issue_cluster_cert("eu-1", "not a csr", Duration::from_secs(60)),
            Err(Error::InvalidArgument { field: "csr", .. })
        ));
    }

    #[test]
    fn init_refuses_to_overwrite_and_keys_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), "fleet.test", &["hub.example".into()]).unwrap();
        assert!(init(dir.path(), "fleet.test", &[]).is_err());
        let paths = PkiPaths::new(dir.path());
        for key in [paths.ca_key(), paths.hub_key(), paths.admin_key()] {
            let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
    }

    fn rustls_pem_der(pem: &str) -> Vec<u8> {
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        parsed.contents
    }
}

//! The cluster's small PKI: one CA per cluster, one certificate per node.
//!
//! Peers authenticate each other with mutual TLS. Every node certificate is signed by the cluster
//! CA and carries the node id as its only DNS subject alternative name, so a certificate proves
//! which node speaks: the dialing side checks the server name against the peer's node id, the
//! accepting side checks the `Hello`'s node id against the client certificate.
//!
//! Files, all PEM, in one directory (created `0700` if missing):
//! - `ca.pem`, `ca.key`: the CA certificate and its key (`0600`);
//! - `<node_id>.pem`, `<node_id>.key`: a node's certificate and key (`0600`).
//!
//! Nothing is ever overwritten: replacing a key is a deliberate act (delete, then create).
//! Keys are ECDSA P-256. The CA is valid for about 20 years, node certificates for about 10
//! (from January 1st of the year before issue, which absorbs clock skew between nodes).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the CA certificate.
pub const CA_CERT: &str = "ca.pem";
/// File name of the CA key.
pub const CA_KEY: &str = "ca.key";

/// Years a CA certificate is valid.
const CA_YEARS: i32 = 20;
/// Years a node certificate is valid.
const NODE_YEARS: i32 = 10;

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// The node id is not usable as a file name and TLS server name.
    #[error(
        "invalid node id {0:?}: use 1 to 64 characters of A-Z a-z 0-9 . _ - forming a DNS name \
         (labels of 1 to 63 characters, not all digits, not ending in '-'; \"ca\" is reserved)"
    )]
    InvalidNodeId(String),
    /// The cluster name is empty, too long, or contains control characters.
    #[error("invalid cluster name {0:?}: use 1 to 64 printable characters")]
    InvalidCluster(String),
    /// A file to be created exists already.
    #[error("{}: already exists; refusing to overwrite it (remove it first to replace it)", .0.display())]
    Exists(PathBuf),
    /// The directory holds no CA to sign with.
    #[error("{}: no CA certificate or key here (create one with `syncctl pki init`)", .0.display())]
    NoCa(PathBuf),
    /// The CA files cannot be used.
    #[error("{}: unusable CA: {reason}", .path.display())]
    BadCa {
        /// The offending file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Key generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `node_id` is 1-64 of `A-Z a-z 0-9 . _ -` and a valid DNS name (the TLS server
/// name peers check), and not the reserved `ca`.
pub fn validate_node_id(node_id: &str) -> Result<(), PkiError> {
    let charset_ok = (1..=64).contains(&node_id.len())
        && node_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    let dns_ok = matches!(
        rustls_pki_types::ServerName::try_from(node_id),
        Ok(rustls_pki_types::ServerName::DnsName(_))
    );
    if charset_ok && dns_ok && !node_id.eq_ignore_ascii_case("ca") {
        Ok(())
    } else {
        Err(PkiError::InvalidNodeId(node_id.to_string()))
    }
}

fn validate_cluster(cluster: &str) -> Result<(), PkiError> {
    if (1..=64).contains(&cluster.chars().count()) && !cluster.chars().any(char::is_control) {
        Ok(())
    } else {
        Err(PkiError::InvalidCluster(cluster.to_string()))
    }
}

/// The current year (approximately: at worst off by one around New Year, which the validity
/// margins absorb).
fn this_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    1970 + i32::try_from(secs / 31_556_952).unwrap_or(0)
}

fn set_validity(params: &mut CertificateParams, years: i32) {
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + years, 1, 1);
}

/// Creates `dir` with mode 0700 if it does not exist.
fn ensure_dir(dir: &Path) -> Result<(), PkiError> {
    if dir.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// Fails if any of `paths` exists.
fn refuse_existing(paths: &[&Path]) -> Result<(), PkiError> {
    for p in paths {
        if p.symlink_metadata().is_ok() {
            return Err(PkiError::Exists(p.to_path_buf()));
        }
    }
    Ok(())
}

/// Creates a new file (never overwriting) with the given mode and contents.
fn write_new(path: &Path, mode: u32, contents: &str) -> Result<(), PkiError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => PkiError::Exists(path.to_path_buf()),
            _ => io_err(path)(e),
        })?;
    // The umask may have narrowed the mode; make it exact.
    f.set_permissions(Permissions::from_mode(mode))
        .and_then(|()| f.write_all(contents.as_bytes()))
        .and_then(|()| f.sync_all())
        .map_err(io_err(path))
}

/// Writes a certificate (0644) and its key (0600); on failure removes what it created.
fn write_pair(cert: &Path, cert_pem: &str, key: &Path, key_pem: &str) -> Result<(), PkiError> {
    write_new(key, 0o600, key_pem)?;
    if let Err(e) = write_new(cert, 0o644, cert_pem) {
        let _ = std::fs::remove_file(key);
        return Err(e);
    }
    Ok(())
}

/// Creates a cluster CA in `dir`: `ca.pem` and `ca.key` (mode 0600). Creates `dir` (mode 0700)
/// if missing; refuses to overwrite an existing CA. Returns the path of `ca.pem`.
pub fn init_ca(dir: &Path, cluster: &str) -> Result<PathBuf, PkiError> {
    validate_cluster(cluster)?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    refuse_existing(&[&cert_path, &key_path])?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ctsync");
    dn.push(
        DnType::CommonName,
        format!("ctsync CA for cluster {cluster}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, CA_YEARS);
    let cert = params.self_signed(&key)?;

    ensure_dir(dir)?;
    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())?;
    Ok(cert_path)
}

/// Issues a certificate for `node_id`, signed by the CA in `dir`: `<node_id>.pem` (DNS SAN =
/// `node_id`, valid for TLS server and client authentication) and `<node_id>.key` (mode 0600).
/// Refuses to overwrite. Returns the paths of the certificate and the key.
pub fn issue(dir: &Path, node_id: &str) -> Result<(PathBuf, PathBuf), PkiError> {
    validate_node_id(node_id)?;
    let cert_path = dir.join(format!("{node_id}.pem"));
    let key_path = dir.join(format!("{node_id}.key"));
    refuse_existing(&[&cert_path, &key_path])?;

    let ca_cert_path = dir.join(CA_CERT);
    let ca_key_path = dir.join(CA_KEY);
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PkiError::NoCa(p.to_path_buf()),
            _ => io_err(p)(e),
        })
    };
    let ca_cert_pem = read(&ca_cert_path)?;
    let ca_key_pem = read(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| PkiError::BadCa {
        path: ca_key_path.clone(),
        reason: e.to_string(),
    })?;
    let bad_cert = |reason: String| PkiError::BadCa {
        path: ca_cert_path.clone(),
        reason,
    };
    let ca_der = CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
        .map_err(|e| bad_cert(format!("no PEM certificate: {e}")))?;
    let ca = parse_ca(&ca_der).map_err(bad_cert)?;
    if ca.public_key != ca_key.public_key_raw() {
        return Err(PkiError::BadCa {
            path: ca_key_path,
            reason: format!("not the key of {}", ca_cert_path.display()),
        });
    }
    let mut issuer_params = CertificateParams::default();
    issuer_params.distinguished_name = ca.subject;
    issuer_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = Issuer::new(issuer_params, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![node_id.to_string()])?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ctsync");
    dn.push(DnType::CommonName, node_id);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, NODE_YEARS);
    let cert = params.signed_by(&key, &issuer)?;

    write_pair(&cert_path, &cert.pem(), &key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// What signing needs from a CA certificate.
struct CaCert {
    /// Its subject, which becomes the issuer name of what it signs.
    subject: DistinguishedName,
    /// Its public key (the BIT STRING of the SubjectPublicKeyInfo).
    public_key: Vec<u8>,
}

/// Reads the subject and public key of a DER certificate.
///
/// The issuer name written into a node certificate must be byte-identical to the CA's subject,
/// so the subject is rebuilt attribute by attribute with the same string types. Single-valued
/// RDNs with UTF8String, PrintableString or IA5String values are supported: what `init_ca` and
/// common tools (openssl, cfssl, step) write.
fn parse_ca(der: &[u8]) -> Result<CaCert, String> {
    use yasna::Tag;
    type Rdn = (Vec<u64>, yasna::models::TaggedDerValue);
    let (rdns, public_key) = yasna::parse_der(der, |r| {
        r.read_sequence(|r| {
            let tbs = r.next().read_sequence(|r| {
                r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                r.next().read_der()?; // serialNumber
                r.next().read_der()?; // signature
                r.next().read_der()?; // issuer
                r.next().read_der()?; // validity
                let subject: Vec<Vec<Rdn>> = r.next().collect_sequence_of(|r| {
                    r.collect_set_of(|r| {
                        r.read_sequence(|r| {
                            let oid = r.next().read_oid()?.components().clone();
                            Ok((oid, r.next().read_tagged_der()?))
                        })
                    })
                })?;
                let key = r.next().read_sequence(|r| {
                    r.next().read_der()?; // algorithm
                    r.next().read_bitvec_bytes()
                })?;
                // Unique ids and extensions.
                while r.read_optional(|r| r.read_der())?.is_some() {}
                Ok((subject, key.0))
            })?;
            r.next().read_der()?; // signatureAlgorithm
            r.next().read_der()?; // signatureValue
            Ok(tbs)
        })
    })
    .map_err(|e| format!("not a valid certificate: {e}"))?;

    let mut subject = DistinguishedName::new();
    for rdn in rdns {
        let [(oid, value)] = <[Rdn; 1]>::try_from(rdn)
            .map_err(|_| "multi-valued RDNs in the subject are not supported".to_string())?;
        let ty = DnType::from_oid(&oid);
        if subject.get(&ty).is_some() {
            return Err(format!("repeated attribute {oid:?} in the subject"));
        }
        let text = String::from_utf8(value.value().to_vec())
            .map_err(|_| format!("subject attribute {oid:?} is not valid text"))?;
        let value = match value.tag() {
            yasna::tags::TAG_UTF8STRING => DnValue::Utf8String(text),
            yasna::tags::TAG_PRINTABLESTRING => DnValue::PrintableString(
                text.try_into()
                    .map_err(|e| format!("subject attribute {oid:?}: {e}"))?,
            ),
            yasna::tags::TAG_IA5STRING => DnValue::Ia5String(
                text.try_into()
                    .map_err(|e| format!("subject attribute {oid:?}: {e}"))?,
            ),
            t => {
                return Err(format!(
                    "subject attribute {oid:?}: unsupported string type {t:?}"
                ))
            }
        };
        subject.push(ty, value);
    }
    Ok(CaCert {
        subject,
        public_key,
    })
}

/// A fresh, empty directory under the system temp dir, removed on drop (tests only).
#[cfg(test)]
pub(crate) struct TempDir(pub(crate) PathBuf);

#[cfg(test)]
impl TempDir {
    pub(crate) fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "ctsync-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

#[cfg(test)]
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::{ServerName, UnixTime};

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn der(pem_path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(pem_path).unwrap()
    }

    #[test]
    fn init_creates_private_dir_and_key() {
        let tmp = TempDir::new("pki");
        let dir = tmp.0.join("sub/pki");
        let ca = init_ca(&dir, "prod cluster").unwrap();
        assert_eq!(ca, dir.join("ca.pem"));
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(mode(&ca), 0o644);
        let pem = std::fs::read_to_string(&ca).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let key = std::fs::read_to_string(dir.join("ca.key")).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn init_leaves_an_existing_dir_mode_alone() {
        let tmp = TempDir::new("pki");
        std::fs::set_permissions(&tmp.0, Permissions::from_mode(0o750)).unwrap();
        init_ca(&tmp.0, "c").unwrap();
        assert_eq!(mode(&tmp.0), 0o750);
    }

    #[test]
    fn init_refuses_to_overwrite() {
        let tmp = TempDir::new("pki");
        init_ca(&tmp.0, "c").unwrap();
        let before = std::fs::read(tmp.0.join("ca.key")).unwrap();
        let e = init_ca(&tmp.0, "c").unwrap_err();
        assert!(
            matches!(e, PkiError::Exists(ref p) if p.ends_with("ca.pem")),
            "{e}"
        );
        assert!(e.to_string().contains("refusing to overwrite"));
        assert_eq!(std::fs::read(tmp.0.join("ca.key")).unwrap(), before);
        // A lone key left behind blocks as well.
        std::fs::remove_file(tmp.0.join("ca.pem")).unwrap();
        let e = init_ca(&tmp.0, "c").unwrap_err();
        assert!(
            matches!(e, PkiError::Exists(ref p) if p.ends_with("ca.key")),
            "{e}"
        );
    }

    #[test]
    fn init_rejects_bad_cluster_names() {
        let tmp = TempDir::new("pki");
        for bad in ["", "a\nb", &"x".repeat(65)] {
            assert!(matches!(
                init_ca(&tmp.0, bad),
                Err(PkiError::InvalidCluster(_))
            ));
        }
        assert!(!tmp.0.join("ca.pem").exists());
    }

    #[test]
    fn issue_creates_a_ca_signed_cert_for_the_node() {
        let tmp = TempDir::new("pki");
        let ca = init_ca(&tmp.0, "c").unwrap();
        let (cert, key) = issue(&tmp.0, "fw_1.dc-a").unwrap();
        assert_eq!(cert, tmp.0.join("fw_1.dc-a.pem"));
        assert_eq!(key, tmp.0.join("fw_1.dc-a.key"));
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);

        // Verify the chain and the name the way rustls does.
        verify(&ca, &cert, "fw_1.dc-a");
        let leaf_der = der(&cert);
        let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        let other = ServerName::try_from("fw_2.dc-a").unwrap();
        assert!(leaf.verify_is_valid_for_subject_name(&other).is_err());
    }

    #[test]
    fn issue_refuses_to_overwrite_and_needs_a_ca() {
        let tmp = TempDir::new("pki");
        let e = issue(&tmp.0, "fw1").unwrap_err();
        assert!(matches!(e, PkiError::NoCa(_)), "{e}");
        assert!(e.to_string().contains("syncctl pki init"));
        init_ca(&tmp.0, "c").unwrap();
        issue(&tmp.0, "fw1").unwrap();
        let before = std::fs::read(tmp.0.join("fw1.key")).unwrap();
        let e = issue(&tmp.0, "fw1").unwrap_err();
        assert!(matches!(e, PkiError::Exists(_)), "{e}");
        assert_eq!(std::fs::read(tmp.0.join("fw1.key")).unwrap(), before);
    }

    #[test]
    fn issue_reports_a_broken_ca() {
        let tmp = TempDir::new("pki");
        init_ca(&tmp.0, "c").unwrap();
        std::fs::write(tmp.0.join("ca.pem"), "garbage").unwrap();
        let e = issue(&tmp.0, "fw1").unwrap_err();
        assert!(matches!(e, PkiError::BadCa { .. }), "{e}");
        assert!(!tmp.0.join("fw1.key").exists());
    }

    /// Verifies `cert` against the CA `ca` as a TLS client and server certificate for `name`.
    fn verify(ca: &Path, cert: &Path, name: &str) {
        let ca_der = der(ca);
        let anchor = webpki::anchor_from_trusted_cert(&ca_der).unwrap();
        let leaf_der = der(cert);
        let leaf = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        let algs = &[webpki::ring::ECDSA_P256_SHA256];
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            leaf.verify_for_usage(
                algs,
                std::slice::from_ref(&anchor),
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .unwrap();
        }
        let name = ServerName::try_from(name).unwrap();
        leaf.verify_is_valid_for_subject_name(&name).unwrap();
    }

    #[test]
    fn issue_works_with_a_ca_made_elsewhere() {
        // PrintableString, IA5String and UTF-8 attributes, as other tools write them.
        let tmp = TempDir::new("pki");
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CountryName,
            DnValue::PrintableString("DE".try_into().unwrap()),
        );
        dn.push(DnType::OrganizationName, "Ünïcode GmbH");
        dn.push(
            DnType::CustomDnType(vec![1, 2, 840, 113549, 1, 9, 1]),
            DnValue::Ia5String("pki@example.org".try_into().unwrap()),
        );
        dn.push(DnType::CommonName, "Example Firewall CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(tmp.0.join("ca.pem"), cert.pem()).unwrap();
        std::fs::write(tmp.0.join("ca.key"), key.serialize_pem()).unwrap();
        let (cert, _) = issue(&tmp.0, "fw1").unwrap();
        verify(&tmp.0.join("ca.pem"), &cert, "fw1");
    }

    #[test]
    fn issue_refuses_a_key_that_is_not_the_cas() {
        let tmp = TempDir::new("pki");
        let other = TempDir::new("pki");
        init_ca(&tmp.0, "c").unwrap();
        init_ca(&other.0, "c").unwrap();
        std::fs::copy(other.0.join("ca.key"), tmp.0.join("ca.key")).unwrap();
        let e = issue(&tmp.0, "fw1").unwrap_err();
        assert!(
            matches!(e, PkiError::BadCa { ref path, .. } if path.ends_with("ca.key")),
            "{e}"
        );
        assert!(e.to_string().contains("not the key of"), "{e}");
        assert!(!tmp.0.join("fw1.pem").exists());
    }

    #[test]
    fn node_ids_are_validated() {
        let longest = format!("{}.{}", "a".repeat(31), "b".repeat(32));
        for good in ["a", "fw1", "FW-1", "fw_1", "node.dc1", "x1.y2.z3", &longest] {
            validate_node_id(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in [
            "",
            &"a".repeat(65),
            &"a".repeat(64), // a DNS label has at most 63 characters
            "fw/1",
            "../x",
            "fw 1",
            "fw1\n",
            "ünï",
            ".",
            "..",
            "a..b",
            "fw-",
            "1",
            "10.0.0.1",
            "ca",
            "CA",
        ] {
            assert!(
                matches!(validate_node_id(bad), Err(PkiError::InvalidNodeId(_))),
                "{bad:?} accepted"
            );
        }
        let tmp = TempDir::new("pki");
        init_ca(&tmp.0, "c").unwrap();
        assert!(matches!(
            issue(&tmp.0, "../evil"),
            Err(PkiError::InvalidNodeId(_))
        ));
    }
}

//! Making the cluster's certificates: one CA per cluster, one certificate
//! per node signed by it (`cell0 tls ca create`, `cell0 tls cert create`).
//!
//! A node certificate is valid for both server and client authentication,
//! so the same pair serves the node's internal port and its calls to other
//! nodes. Its subject alternative names are [`INTERNAL_SERVER_NAME`] (what
//! every node checks when it connects to another, so any node of the
//! cluster can answer at any address), `NAME.node.cell0`, and whatever
//! addresses or DNS names the operator adds for clients of the public port.
//! Its organizational unit names the node's site.
//!
//! Invariants:
//! - Private keys are written with mode 0600 and never overwritten: making
//!   a file that exists is an error naming it.
//! - ECDSA P-256 keys; validity starts an hour back (clock skew) and lasts
//!   the requested days.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::TlsError;

/// The name every node certificate carries and every node checks when it
/// connects to another.
pub const INTERNAL_SERVER_NAME: &str = "node.cell0";

/// Longest validity `cell0 tls` makes, in days (ten years).
pub const MAX_VALIDITY_DAYS: u32 = 3650;

/// Most extra names one certificate may carry.
pub const MAX_SANS: usize = 64;

/// The files of a CA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    /// The CA certificate (PEM), given to every node.
    pub cert: PathBuf,
    /// Its private key (PEM), kept by whoever makes node certificates.
    pub key: PathBuf,
}

impl CaFiles {
    /// The conventional names in `dir`: `ca.pem` and `ca-key.pem`.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            cert: dir.join("ca.pem"),
            key: dir.join("ca-key.pem"),
        }
    }
}

/// The files of one node's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The node certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl NodeFiles {
    /// The conventional names in `dir`: `NAME.pem` and `NAME-key.pem`.
    pub fn in_dir(dir: &Path, node: &str) -> Self {
        Self {
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}-key.pem")),
        }
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Not before.
    pub from: OffsetDateTime,
    /// Not after.
    pub until: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (for clock skew) for `days` days.
    pub fn days(days: u32) -> Result<Self, TlsError> {
        if !(1..=MAX_VALIDITY_DAYS).contains(&days) {
            return Err(TlsError::invalid(
                "days",
                format!("is {days}; use 1 to {MAX_VALIDITY_DAYS}"),
            ));
        }
        let now = OffsetDateTime::now_utc();
        Ok(Self {
            from: now - Duration::hours(1),
            until: now + Duration::days(i64::from(days)),
        })
    }

    /// The validity of the (first) certificate in the PEM file `path`.
    pub fn of_file(path: &Path) -> Result<Self, TlsError> {
        let pem = crate::read(path)?;
        let params = CertificateParams::from_ca_cert_pem(&pem).map_err(|e| TlsError::Parse {
            path: path.to_path_buf(),
            detail: format!("not a PEM certificate: {e}"),
        })?;
        Ok(Self {
            from: params.not_before,
            until: params.not_after,
        })
    }
}

/// What a node certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCertRequest {
    /// The node's name (as `--name`): letters, digits, `-` and `.`.
    pub node: String,
    /// Its site.
    pub site: String,
    /// Extra names: IP addresses or DNS names clients use for it.
    pub sans: Vec<String>,
    /// When it is valid.
    pub validity: Validity,
}

/// Whether `name` may be a node or site name in a certificate.
fn check_name(field: &str, name: &str) -> Result<(), TlsError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.']);
    if ok {
        Ok(())
    } else {
        Err(TlsError::invalid(
            field,
            format!("{name:?} must be 1 to 63 letters, digits, '-' or '.', not starting or ending with '-' or '.'"),
        ))
    }
}

/// Writes `contents` to a new file `path` with `mode`; an existing file is
/// an error.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| TlsError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Makes a CA (`cell0 tls ca create`) named after `cluster`, writing
/// `files` (neither may exist).
pub fn create_ca(files: &CaFiles, cluster: &str, validity: Validity) -> Result<(), TlsError> {
    check_name("cluster", cluster)?;
    for path in [&files.cert, &files.key] {
        if path.exists() {
            return Err(TlsError::Exists { path: path.clone() });
        }
    }
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cell0");
    dn.push(DnType::CommonName, format!("Cell0 CA {cluster}"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = validity.from;
    params.not_after = validity.until;
    let cert = params.self_signed(&key).map_err(TlsError::Generate)?;
    write_new(&files.key, &key.serialize_pem(), 0o600)?;
    write_new(&files.cert, &cert.pem(), 0o644)
}

/// Makes a node certificate signed by the CA in `ca`, writing `out`
/// (neither may exist).
pub fn create_node_cert(ca: &CaFiles, out: &NodeFiles, req: &NodeCertRequest) -> Result<(), TlsError> {
    check_name("node", &req.node)?;
    check_name("site", &req.site)?;
    if req.sans.len() > MAX_SANS {
        return Err(TlsError::invalid(
            "san",
            format!("{} names; the limit is {MAX_SANS}", req.sans.len()),
        ));
    }
    for path in [&out.cert, &out.key] {
        if path.exists() {
            return Err(TlsError::Exists { path: path.clone() });
        }
    }
    let ca_pem = crate::read(&ca.cert)?;
    let ca_key_pem = crate::read(&ca.key)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsError::Parse {
        path: ca.key.clone(),
        detail: e.to_string(),
    })?;
    let ca_params = CertificateParams::from_ca_cert_pem(&ca_pem).map_err(|e| TlsError::Parse {
        path: ca.cert.clone(),
        detail: e.to_string(),
    })?;
    let issuer = ca_params.self_signed(&ca_key).map_err(TlsError::Generate)?;

    let mut names = vec![
        SanType::DnsName(
            INTERNAL_SERVER_NAME
                .try_into()
                .map_err(|e: rcgen::Error| TlsError::Generate(e))?,
        ),
        SanType::DnsName(
            format!("{}.{INTERNAL_SERVER_NAME}", req.node)
                .try_into()
                .map_err(|_| TlsError::invalid("node", format!("{:?} is not a DNS label", req.node)))?,
        ),
    ];
    for san in &req.sans {
        let not_a_name = || TlsError::invalid("san", format!("{san:?} is neither an IP address nor a DNS name"));
        names.push(match san.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                let dns = !san.is_empty()
                    && san.len() <= 253
                    && san.split('.').all(|label| {
                        !label.is_empty()
                            && label.len() <= 63
                            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    });
                if !dns {
                    return Err(not_a_name());
                }
                SanType::DnsName(san.as_str().try_into().map_err(|_| not_a_name())?)
            }
        });
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Cell0");
    dn.push(DnType::OrganizationalUnitName, req.site.clone());
    dn.push(DnType::CommonName, req.node.clone());
    params.distinguished_name = dn;
    params.subject_alt_names = names;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = req.validity.from;
    params.not_after = req.validity.until;
    let key = KeyPair::generate().map_err(TlsError::Generate)?;
    let cert = params.signed_by(&key, &issuer, &ca_key).map_err(TlsError::Generate)?;
    write_new(&out.key, &key.serialize_pem(), 0o600)?;
    write_new(&out.cert, &cert.pem(), 0o644)
}

/// The site a node certificate names (its organizational unit), or why
/// there is none.
pub fn site_of(cert: &rustls::pki_types::CertificateDer<'_>) -> Result<String, String> {
    let params = CertificateParams::from_ca_cert_der(cert).map_err(|e| format!("cannot parse the certificate: {e}"))?;
    match params.distinguished_name.get(&DnType::OrganizationalUnitName) {
        Some(rcgen::DnValue::Utf8String(s)) => Ok(s.clone()),
        Some(rcgen::DnValue::PrintableString(s)) => Ok(s.as_ref().to_string()),
        Some(rcgen::DnValue::Ia5String(s)) => Ok(s.as_ref().to_string()),
        Some(_) => Err("its organizational unit (the site) is not a text string".into()),
        None => Err("it names no site (no organizational unit); make it with `cell0 tls cert create --site`".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_files_and_limits_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaFiles::in_dir(dir.path());
        create_ca(&ca, "prod", Validity::days(30).unwrap()).unwrap();
        let err = create_ca(&ca, "prod", Validity::days(30).unwrap()).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        assert!(Validity::days(0).is_err() && Validity::days(MAX_VALIDITY_DAYS + 1).is_err());
        let req = |node: &str, sans: Vec<String>| NodeCertRequest {
            node: node.into(),
            site: "eu-1".into(),
            sans,
            validity: Validity::days(30).unwrap(),
        };
        let out = NodeFiles::in_dir(dir.path(), "a");
        create_node_cert(&ca, &out, &req("a", vec!["127.0.0.1".into(), "a.example.com".into()])).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&out.key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        for bad in ["", "-a", "a b", "a/../b"] {
            let e = create_node_cert(&ca, &NodeFiles::in_dir(dir.path(), "x"), &req(bad, vec![])).unwrap_err();
            assert!(e.to_string().contains("node"), "{e}");
        }
        let e = create_node_cert(
            &ca,
            &NodeFiles::in_dir(dir.path(), "y"),
            &req("y", vec!["not a name!".into()]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("san"), "{e}");
    }

    #[test]
    fn a_node_certificate_names_its_site_and_a_ca_certificate_none() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaFiles::in_dir(dir.path());
        create_ca(&ca, "prod", Validity::days(30).unwrap()).unwrap();
        let out = NodeFiles::in_dir(dir.path(), "a");
        let req = NodeCertRequest {
            node: "a".into(),
            site: "eu-1".into(),
            sans: vec![],
            validity: Validity::days(30).unwrap(),
        };
        create_node_cert(&ca, &out, &req).unwrap();
        let der = |path: &Path| {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::CertificateDer::from_pem_file(path).unwrap()
        };
        assert_eq!(site_of(&der(&out.cert)).unwrap(), "eu-1");
        let err = site_of(&der(&ca.cert)).unwrap_err();
        assert!(err.contains("names no site"), "{err}");
    }

    #[test]
    fn a_certificate_file_tells_its_validity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CaFiles::in_dir(dir.path());
        let made = Validity::days(30).unwrap();
        create_ca(&ca, "prod", made).unwrap();
        let read = Validity::of_file(&ca.cert).unwrap();
        // A certificate keeps whole seconds.
        assert_eq!(read.until.unix_timestamp(), made.until.unix_timestamp());
        assert_eq!(read.from.unix_timestamp(), made.from.unix_timestamp());
        let e = Validity::of_file(&ca.key).unwrap_err();
        assert!(e.to_string().contains("not a PEM certificate"), "{e}");
    }
}

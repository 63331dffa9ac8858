//! `stratus tls init`: TLS in one command for users without a PKI. It makes a local CA (or
//! reuses the one already in the output directory), issues a server certificate for the
//! names given, and sets `[tls] cert_file` and `key_file` in the configuration file, so the
//! next `stratus serve --config FILE` serves HTTPS, MQTTS and WSS with it.
//!
//! ## What it writes
//! In `--out DIR` (default `./stratus-data/tls`):
//! - `ca.pem`, `ca.key` (mode 0600): the CA, ECDSA P-256, valid ten years, path length 0 (it
//!   signs server certificates, never another CA). Clients trust `ca.pem`; `ca.key` never
//!   leaves this directory. An existing pair is reused, so certificates issued later (new
//!   names) chain to what clients already trust; `--new-ca` replaces it.
//! - `server.pem`, `server.key` (mode 0600): ECDSA P-256, one subjectAltName per `--names`
//!   entry (IP addresses as iPAddress, the rest as dNSName), the first name as CN, EKU
//!   serverAuth, valid `--days` (default 825), replaced on every run.
//!
//! The configuration file (`--config`, default `./stratus.toml`) is edited in place with
//! `toml_edit`: only `[tls] cert_file`, `key_file` (absolute paths) and, with
//! `--require-encryption`, `require_encryption` change; other keys and comments stay. A missing
//! file is created. `--no-config` leaves every file alone and prints the section instead.
//!
//! `rcgen` (already the test suites' certificate maker) builds and signs the certificates;
//! its `x509-parser` feature reads an existing `ca.pem` back to sign with it.

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};

use crate::admin::UsageError;

/// The CA's validity.
const CA_DAYS: i64 = 3650;

/// `stratus tls …`.
#[derive(clap::Args, Debug)]
pub struct TlsArgs {
    #[command(subcommand)]
    command: TlsCommand,
}

#[derive(Subcommand, Debug)]
enum TlsCommand {
    /// Make a local CA (or reuse DIR's), issue a server certificate for NAMES, and set
    /// [tls] cert_file and key_file in the configuration file.
    #[command(after_help = "\
Examples:
  stratus tls init --names localhost,127.0.0.1
  stratus serve --config stratus.toml            (HTTPS 8443, MQTTS 8883, WSS on 8443/mqtt)
  mosquitto_sub --cafile stratus-data/tls/ca.pem -h localhost -p 8883 -t '#' -u ID -P SECRET
  curl --cacert stratus-data/tls/ca.pem https://localhost:8443/healthz

  stratus tls init --names iot.example.lan,192.168.1.20 --config /etc/stratus.toml --require-encryption")]
    Init(InitArgs),
}

#[derive(clap::Args, Debug)]
struct InitArgs {
    /// The host names and IP addresses clients reach the server by, comma-separated or
    /// repeated; each becomes a subjectAltName of the certificate.
    #[arg(
        long,
        value_name = "NAME,...",
        value_delimiter = ',',
        default_value = "localhost,127.0.0.1,::1"
    )]
    names: Vec<String>,
    /// Where the CA and the server certificate and keys go.
    #[arg(long, value_name = "DIR", default_value = "./stratus-data/tls")]
    out: PathBuf,
    /// The configuration file whose [tls] section is set (created when missing; other
    /// settings and comments are kept). Start the server with `stratus serve --config FILE`.
    #[arg(long, value_name = "FILE", default_value = "stratus.toml")]
    config: PathBuf,
    /// Change no configuration file; print the [tls] section to add instead.
    #[arg(long)]
    no_config: bool,
    /// Also set [tls] require_encryption = true: devices may then only use MQTTS, WSS, HTTPS
    /// and CoAPS (plain listeners serve this host only).
    #[arg(long)]
    require_encryption: bool,
    /// Validity of the server certificate, in days.
    #[arg(long, value_name = "N", default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..=3650))]
    days: u32,
    /// Make a new CA even when DIR holds one (clients must then trust the new ca.pem).
    #[arg(long)]
    new_ca: bool,
}

/// Runs `stratus tls …`.
pub fn run(args: TlsArgs) -> anyhow::Result<bool> {
    match args.command {
        TlsCommand::Init(init) => self::init(&init),
    }
}

/// A subjectAltName from a `--names` entry: an IP address, or a DNS name (a `*.` wildcard
/// first label allowed); anything else is a usage error naming the entry.
fn san(name: &str) -> Result<SanType, UsageError> {
    let name = name.trim();
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = |why: &str| UsageError(format!("--names {name:?}: {why}"));
    if name.is_empty() || name.len() > 253 {
        return Err(bad("a DNS name has 1 to 253 characters"));
    }
    let host = name.strip_suffix('.').unwrap_or(name);
    for (i, label) in host.split('.').enumerate() {
        let ok = label == "*" && i == 0
            || !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-');
        if !ok {
            return Err(bad(
                "not an IP address or a DNS name (letters, digits and hyphens, dot-separated)",
            ));
        }
    }
    let ia5 = host
        .to_ascii_lowercase()
        .try_into()
        .map_err(|_| bad("not an ASCII DNS name"))?;
    Ok(SanType::DnsName(ia5))
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // a positive INTEGER
    bytes[0] |= 0x01; // and never a shorter encoding
    SerialNumber::from_slice(&bytes)
}

/// Writes `bytes` to `path` with `mode`, replacing it atomically (a temporary file beside it,
/// then a rename), so a key file never exists with looser permissions.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// The CA: read back from `dir` (its key must match its certificate) or made anew.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: String,
    created: bool,
}

fn load_or_make_ca(dir: &Path, new_ca: bool) -> anyhow::Result<Ca> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    match (cert_path.exists(), key_path.exists(), new_ca) {
        (true, true, false) => {
            let pem = std::fs::read_to_string(&cert_path)
                .with_context(|| format!("reading {}", cert_path.display()))?;
            let key_pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let key = KeyPair::from_pem(&key_pem)
                .map_err(|e| anyhow::anyhow!("{}: not a usable key: {e}", key_path.display()))?;
            let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
                anyhow::anyhow!("{}: not a PEM certificate: {e}", cert_path.display())
            })?;
            let (_, parsed) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| anyhow::anyhow!("{}: not a certificate: {e}", cert_path.display()))?;
            if parsed.public_key().raw != key.public_key_der().as_slice() {
                anyhow::bail!(
                    "{} does not belong to {} (use --new-ca to make a new CA)",
                    key_path.display(),
                    cert_path.display()
                );
            }
            let params = CertificateParams::from_ca_cert_pem(&pem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?;
            // Re-signed only to serve as the issuer: its subject and key identify the CA.
            let cert = params.self_signed(&key)?;
            Ok(Ca {
                cert,
                key,
                pem,
                created: false,
            })
        }
        (false, true, false) | (true, false, false) => anyhow::bail!(
            "{} holds only half a CA (ca.pem and ca.key go together); remove it or use --new-ca",
            dir.display()
        ),
        _ => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            let tag: u32 = rand::random();
            dn.push(DnType::OrganizationName, "Stratus");
            dn.push(DnType::CommonName, format!("Stratus local CA {tag:08x}"));
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(CA_DAYS);
            params.serial_number = Some(random_serial());
            let cert = params.self_signed(&key)?;
            let pem = cert.pem();
            write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_file(&cert_path, pem.as_bytes(), 0o644)?;
            Ok(Ca {
                cert,
                key,
                pem,
                created: true,
            })
        }
    }
}

/// The server certificate for `sans` (first one the CN), signed by `ca`.
fn issue(
    ca: &Ca,
    names: &[String],
    sans: Vec<SanType>,
    days: u32,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].trim().to_string());
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    params.serial_number = Some(random_serial());
    let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Sets `[tls]` in the TOML file at `path` (created when missing), keeping everything else.
fn wire_config(
    path: &Path,
    cert: &Path,
    key: &Path,
    require_encryption: bool,
) -> anyhow::Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| UsageError(format!("{}: not valid TOML: {e}", path.display())))?;
    let tls = doc
        .entry("tls")
        .or_insert_with(toml_edit::table)
        .as_table_like_mut()
        .ok_or_else(|| UsageError(format!("{}: `tls` is not a table", path.display())))?;
    tls.insert("cert_file", toml_edit::value(cert.display().to_string()));
    tls.insert("key_file", toml_edit::value(key.display().to_string()));
    if require_encryption {
        tls.insert("require_encryption", toml_edit::value(true));
    }
    write_file(path, doc.to_string().as_bytes(), 0o644)
}

fn init(args: &InitArgs) -> anyhow::Result<bool> {
    let names: Vec<String> = args
        .names
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        return Err(UsageError("--names: give at least one host name or IP address".into()).into());
    }
    let sans = names
        .iter()
        .map(|n| san(n))
        .collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let dir = std::fs::canonicalize(&args.out)
        .with_context(|| format!("resolving {}", args.out.display()))?;
    let ca = load_or_make_ca(&dir, args.new_ca)?;
    let (cert_pem, key_pem) = issue(&ca, &names, sans, args.days)?;
    let (cert_path, key_path) = (dir.join("server.pem"), dir.join("server.key"));
    write_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;

    let ca_path = dir.join("ca.pem");
    let ca_cn = x509_cn(&ca.pem).unwrap_or_default();
    println!(
        "CA           {} ({} \"{ca_cn}\"; its key ca.key stays in {}, mode 0600)",
        ca_path.display(),
        if ca.created { "new" } else { "reused" },
        dir.display()
    );
    println!(
        "certificate  {} for {} (valid {} days)",
        cert_path.display(),
        names.join(", "),
        args.days
    );
    println!("key          {} (mode 0600)", key_path.display());
    let mut section = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        cert_path.display().to_string(),
        key_path.display().to_string()
    );
    if args.require_encryption {
        section.push_str("require_encryption = true\n");
    }
    if args.no_config {
        println!("\nAdd to the configuration file:\n\n{section}");
        println!("then: stratus serve --config FILE");
    } else {
        wire_config(&args.config, &cert_path, &key_path, args.require_encryption)?;
        println!(
            "config       {}: [tls] cert_file, key_file{} set",
            args.config.display(),
            if args.require_encryption {
                ", require_encryption"
            } else {
                ""
            }
        );
        println!(
            "\nnext: stratus serve --config {}   (HTTPS 8443, MQTTS 8883, WSS at /mqtt on 8443)",
            args.config.display()
        );
    }
    println!(
        "clients trust {}: mosquitto_sub --cafile …, curl --cacert …",
        ca_path.display()
    );
    Ok(true)
}

/// The subject CN of the first certificate in `pem`.
fn x509_cn(pem: &str) -> Option<String> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init_args(dir: &Path, names: &str) -> InitArgs {
        InitArgs {
            names: names.split(',').map(str::to_string).collect(),
            out: dir.join("tls"),
            config: dir.join("stratus.toml"),
            no_config: false,
            require_encryption: false,
            days: 30,
            new_ca: false,
        }
    }

    fn parse(pem_text: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem_text.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn names_become_ip_and_dns_alt_names_or_usage_errors() {
        assert!(matches!(san("127.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("::1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san("iot.example.lan"), Ok(SanType::DnsName(_))));
        assert!(matches!(san("*.example.lan"), Ok(SanType::DnsName(_))));
        for bad in [
            "",
            "a..b",
            "-x.lan",
            "x_y.lan",
            "a.*.lan",
            "host name",
            "é.lan",
        ] {
            assert!(san(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn init_writes_a_chain_that_verifies_and_wires_the_config() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("stratus.toml"),
            "# my settings\n[mqtt]\nport = 1884 # kept\n\n[tls]\nclient_ca_file = \"/x/ca.pem\"\n",
        )
        .unwrap();
        let args = init_args(dir.path(), "localhost,127.0.0.1");
        assert!(init(&args).unwrap());
        let tls = std::fs::canonicalize(dir.path().join("tls")).unwrap();
        for (f, mode) in [("ca.key", 0o600), ("server.key", 0o600), ("ca.pem", 0o644)] {
            let m = std::fs::metadata(tls.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(m, mode, "{f}");
        }
        let ca_der = parse(&std::fs::read_to_string(tls.join("ca.pem")).unwrap());
        let leaf_der = parse(&std::fs::read_to_string(tls.join("server.pem")).unwrap());
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();
        assert!(ca.is_ca());
        assert!(!leaf.is_ca());
        assert_eq!(leaf.issuer(), ca.subject());
        leaf.verify_signature(Some(ca.public_key())).unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        let shown: Vec<String> = san
            .value
            .general_names
            .iter()
            .map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(s) => format!("dns:{s}"),
                x509_parser::extensions::GeneralName::IPAddress(b) => format!("ip:{b:?}"),
                other => other.to_string(),
            })
            .collect();
        assert_eq!(shown, ["dns:localhost", "ip:[127, 0, 0, 1]"]);
        // The configuration names the files and keeps the rest.
        let text = std::fs::read_to_string(dir.path().join("stratus.toml")).unwrap();
        assert!(text.contains("# my settings") && text.contains("port = 1884 # kept"));
        assert!(text.contains("client_ca_file = \"/x/ca.pem\""));
        let cfg: toml_edit::DocumentMut = text.parse().unwrap();
        assert_eq!(
            cfg["tls"]["cert_file"].as_str().unwrap(),
            tls.join("server.pem").display().to_string()
        );
        assert_eq!(
            cfg["tls"]["key_file"].as_str().unwrap(),
            tls.join("server.key").display().to_string()
        );
        // A second run for new names keeps the CA: the new certificate chains to it.
        let mut again = init_args(dir.path(), "iot.example.lan");
        again.require_encryption = true;
        assert!(init(&again).unwrap());
        assert_eq!(
            parse(&std::fs::read_to_string(tls.join("ca.pem")).unwrap()),
            ca_der
        );
        let leaf2_der = parse(&std::fs::read_to_string(tls.join("server.pem")).unwrap());
        let (_, leaf2) = x509_parser::parse_x509_certificate(&leaf2_der).unwrap();
        assert_eq!(leaf2.issuer(), ca.subject());
        leaf2.verify_signature(Some(ca.public_key())).unwrap();
        let text = std::fs::read_to_string(dir.path().join("stratus.toml")).unwrap();
        assert!(text.contains("require_encryption = true"));
        // --new-ca replaces it.
        let mut fresh = init_args(dir.path(), "localhost");
        fresh.new_ca = true;
        init(&fresh).unwrap();
        assert_ne!(
            parse(&std::fs::read_to_string(tls.join("ca.pem")).unwrap()),
            ca_der
        );
    }

    #[test]
    fn a_mismatched_or_half_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let args = init_args(dir.path(), "localhost");
        init(&args).unwrap();
        let tls = dir.path().join("tls");
        std::fs::write(
            tls.join("ca.key"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let err = init(&args).unwrap_err().to_string();
        assert!(err.contains("does not belong"), "{err}");
        std::fs::remove_file(tls.join("ca.key")).unwrap();
        let err = init(&args).unwrap_err().to_string();
        assert!(err.contains("half a CA"), "{err}");
        let bad = init_args(dir.path(), "no_such name");
        let err = init(&bad).unwrap_err();
        assert_eq!(crate::admin::exit_code(&err), 2);
    }
}

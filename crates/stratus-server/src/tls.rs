//! TLS for the MQTTS and HTTPS listeners (rustls): certificates and keys from PEM files,
//! optional client-certificate authentication whose certificate CN names the client.

use std::path::Path;
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use stratus_mqtt::MqttStr;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// Why the TLS configuration cannot be used; the message names the file and the config key.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TlsError {
    key: &'static str,
    message: String,
}

fn err(key: &'static str, message: impl std::fmt::Display) -> TlsError {
    TlsError {
        key,
        message: message.to_string(),
    }
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(key, format!("{}: {e}", path.display())))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(key, format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(err(
            key,
            format!("{}: no certificate found", path.display()),
        ));
    }
    Ok(certs)
}

/// Builds the acceptor for `config`: TLS 1.2 and 1.3; with `client_ca_file`, clients may
/// present a certificate signed by that CA (and are then authenticated by its CN).
pub fn acceptor(config: &TlsConfig, alpn: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
    let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
        return Err(err(
            "tls.cert_file",
            "both tls.cert_file and tls.key_file are needed",
        ));
    };
    let certs = read_certs("tls.cert_file", cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| err("tls.key_file", format!("{}: {e}", key_file.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err("tls", e))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs("tls.client_ca_file", ca_file)? {
                roots.add(ca).map_err(|e| err("tls.client_ca_file", e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| err("tls.client_ca_file", e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| err("tls.key_file", e))?;
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The common name of the client certificate the peer presented (verified by the handshake).
pub fn peer_common_name(conn: &ServerConnection) -> Option<MqttStr> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?.as_str().ok()?;
    MqttStr::try_from(cn).ok().filter(|s| !s.is_empty())
}

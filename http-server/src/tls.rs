//! TLS for `--tls-cert`/`--tls-key`: rustls (ring), TLS 1.3 and 1.2, ALPN `http/1.1`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why the TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM file cannot be read or parsed.
    #[error("reading {path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// Why.
        source: pem::Error,
    },
    /// A PEM file holds no item of the kind needed.
    #[error("{path} holds no {what}")]
    Empty {
        /// The file.
        path: PathBuf,
        /// "certificate" or "private key".
        what: &'static str,
    },
    /// rustls refused the certificate and key (mismatched, unsupported key type, ...).
    #[error("the certificate {cert} and key {key} cannot be used: {source}")]
    Certificate {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
}

/// Builds the TLS acceptor from a PEM certificate chain and a PEM private key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem { path: cert.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: cert.to_owned(), what: "certificate" });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Empty { path: key.to_owned(), what: "private key" },
        source => TlsError::Pem { path: key.to_owned(), source },
    })?;
    let certificate = |source| TlsError::Certificate { cert: cert.to_owned(), key: key.to_owned(), source };
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(certificate)?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(certificate)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

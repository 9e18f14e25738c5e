//! TLS for `--tls-cert`/`--tls-key`: rustls (ring), TLS 1.3 and 1.2, ALPN `http/1.1`; with `--tls-client-ca`,
//! client certificates are required and verified (webpki) against that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
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
    /// The client CA file cannot be used to verify client certificates.
    #[error("the client CA {path} cannot be used: {reason}")]
    ClientCa {
        /// The CA file.
        path: PathBuf,
        /// Why (rustls' or webpki's words).
        reason: String,
    },
    /// A client CA was given without a server certificate and key.
    #[error("--tls-client-ca needs --tls-cert and --tls-key (client certificates are part of TLS)")]
    ClientCaWithoutTls,
}

/// Reads every certificate of a PEM file; none is an error.
fn pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: path.to_owned(), what: "certificate" });
    }
    Ok(certs)
}

/// Builds the TLS acceptor from a PEM certificate chain and a PEM private key; with `client_ca` (PEM CA
/// certificates), every client must present a certificate that chains to one of them.
pub fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor, TlsError> {
    let certs = pem_certs(cert)?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => TlsError::Empty { path: key.to_owned(), what: "private key" },
        source => TlsError::Pem { path: key.to_owned(), source },
    })?;
    let certificate = |source| TlsError::Certificate { cert: cert.to_owned(), key: key.to_owned(), source };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(certificate)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let bad = |reason: String| TlsError::ClientCa { path: ca.to_owned(), reason };
            let mut roots = RootCertStore::empty();
            for c in pem_certs(ca)? {
                roots.add(c).map_err(|e| bad(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, private).map_err(certificate)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

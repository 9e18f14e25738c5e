//! TLS for NBD (`NBD_OPT_STARTTLS`) with x509 certificates, laid out as nbdkit and qemu lay them out.
//!
//! A certificates directory holds `ca-cert.pem` (the CA that signs client certificates; needed to verify
//! peers), `server-cert.pem` (the server's certificate chain) and `server-key.pem` (its private key), and
//! optionally `ca-crl.pem` (revoked client certificates). [`TlsConfig::from_dir`] loads it; the handshake code
//! upgrades the connection when the client sends `NBD_OPT_STARTTLS`.
//!
//! TLS 1.3 and 1.2 are offered (rustls' safe defaults, ring's primitives): the NBD protocol says an
//! implementation MUST support TLS 1.2 and SHOULD support later versions; every current client (GnuTLS in
//! qemu and libnbd) negotiates 1.3. Pre-shared keys (nbdkit's `--tls-psk`) are not supported: rustls has no
//! TLS 1.3 external-PSK support.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};
use rustls::RootCertStore;
use tokio_rustls::TlsAcceptor;

/// The CA certificate(s) client certificates must chain to (`--tls-verify-peer`).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// The server's certificate, followed by any intermediate certificates.
pub const SERVER_CERT_FILE: &str = "server-cert.pem";
/// The server's private key (PKCS#8, PKCS#1 or SEC1 PEM).
pub const SERVER_KEY_FILE: &str = "server-key.pem";
/// Optional certificate revocation list(s) for client certificates.
pub const CA_CRL_FILE: &str = "ca-crl.pem";

/// When a client must use TLS (nbdkit's `--tls=on` and `--tls=require`; "off" is no [`TlsConfig`] at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// The client may upgrade with `NBD_OPT_STARTTLS` or stay in plaintext (the protocol's SELECTIVETLS mode,
    /// with no TLS-only export).
    On,
    /// Every option before `NBD_OPT_STARTTLS` except `NBD_OPT_ABORT` is answered with `NBD_REP_ERR_TLS_REQD`,
    /// and `NBD_OPT_EXPORT_NAME` ends the connection (the protocol's FORCEDTLS mode).
    Require,
}

/// What TLS the server offers: the mode and the rustls server configuration (certificate, key, client
/// verification).
#[derive(Clone)]
pub struct TlsConfig {
    mode: TlsMode,
    acceptor: TlsAcceptor,
    verify_peer: bool,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").field("mode", &self.mode).field("verify_peer", &self.verify_peer).finish()
    }
}

/// Why a certificates directory cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file is missing, unreadable or not valid PEM.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong reading it.
        source: pem::Error,
    },
    /// A PEM file holds no item of the kind it should.
    #[error("{path} holds no {what}")]
    Empty {
        /// The file.
        path: PathBuf,
        /// "certificate", "private key".
        what: &'static str,
    },
    /// rustls refused the server certificate or key (e.g. the key does not match the certificate).
    #[error("the server certificate or key in {dir} cannot be used: {source}")]
    ServerCertificate {
        /// The certificates directory.
        dir: PathBuf,
        /// rustls' reason.
        source: rustls::Error,
    },
    /// A CA certificate or CRL cannot be used to verify client certificates.
    #[error("{path} cannot verify client certificates: {reason}")]
    ClientVerifier {
        /// `ca-cert.pem` or `ca-crl.pem`.
        path: PathBuf,
        /// rustls' reason.
        reason: String,
    },
    /// rustls rejected the protocol versions (only with a broken crypto provider).
    #[error("TLS setup failed: {0}")]
    Setup(rustls::Error),
}

impl TlsConfig {
    /// Load the certificates directory `dir` (see the [module documentation](self)). With `verify_peer`,
    /// clients must present a certificate that chains to `ca-cert.pem` (and is not revoked by `ca-crl.pem`,
    /// if present); otherwise no client certificate is asked for.
    pub fn from_dir(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let certs = load_certs(&dir.join(SERVER_CERT_FILE))?;
        let key_path = dir.join(SERVER_KEY_FILE);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::Empty { path: key_path.clone(), what: "private key" },
            source => TlsError::Pem { path: key_path.clone(), source },
        })?;
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?;
        let builder = if verify_peer {
            let ca_path = dir.join(CA_CERT_FILE);
            let mut roots = RootCertStore::empty();
            for c in load_certs(&ca_path)? {
                roots.add(c).map_err(|e| TlsError::ClientVerifier { path: ca_path.clone(), reason: e.to_string() })?;
            }
            let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let crl_path = dir.join(CA_CRL_FILE);
            if crl_path.exists() {
                let crls = CertificateRevocationListDer::pem_file_iter(&crl_path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|source| TlsError::Pem { path: crl_path.clone(), source })?;
                verifier = verifier.with_crls(crls);
            }
            let verifier = verifier.build().map_err(|e| verifier_error(&ca_path, &crl_path, e))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|source| TlsError::ServerCertificate { dir: dir.to_owned(), source })?;
        Ok(Self { mode, acceptor: TlsAcceptor::from(Arc::new(config)), verify_peer })
    }

    /// TLS with a rustls configuration built by the caller (its client verifier decides `verify_peer`).
    pub fn new(config: Arc<rustls::ServerConfig>, mode: TlsMode) -> Self {
        Self { mode, acceptor: TlsAcceptor::from(config), verify_peer: false }
    }

    /// Whether plaintext clients are refused.
    pub fn mode(&self) -> TlsMode {
        self.mode
    }

    /// Whether [`from_dir`](Self::from_dir) was asked to verify client certificates.
    pub fn verifies_peer(&self) -> bool {
        self.verify_peer
    }

    pub(crate) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// Every certificate in the PEM file `path` (at least one).
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Pem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { path: path.to_owned(), what: "certificate" });
    }
    Ok(certs)
}

fn verifier_error(ca_path: &Path, crl_path: &Path, e: VerifierBuilderError) -> TlsError {
    let path = match e {
        VerifierBuilderError::InvalidCrl(_) => crl_path,
        _ => ca_path,
    };
    TlsError::ClientVerifier { path: path.to_owned(), reason: e.to_string() }
}

//! TLS on both sides (rustls with the `ring` provider): accepting clients
//! that send an `SSLRequest`, and connecting to nodes as their URL's
//! `sslmode` asks (`disable`, `prefer` — the default, as in libpq —,
//! `require`, `verify-ca`/`verify-full` with `sslrootcert`).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Any byte stream a session or backend connection can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}
pub type BoxStream = Box<dyn Stream>;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The acceptor for client connections, from PEM files.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let file_err = |p: &Path, e: &dyn std::fmt::Display| TlsError::File {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, &e))?;
    if certs.is_empty() {
        return Err(file_err(cert, &"no certificate in file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, &e))?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// How to use TLS towards a node (libpq's `sslmode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    #[default]
    Prefer,
    Require,
    /// Verify the certificate chain (and, for `verify-full`, the host name).
    Verify,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "disable" | "allow" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" | "verify-full" => Ok(Self::Verify),
            other => Err(format!("unknown sslmode `{other}`")),
        }
    }
}

/// A connector for a node; `None` for `sslmode=disable`.
pub fn connector(
    mode: SslMode,
    root_cert: Option<&Path>,
) -> Result<Option<TlsConnector>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let config = match mode {
        SslMode::Disable => return Ok(None),
        // Like libpq: `require` encrypts without verifying the certificate.
        SslMode::Prefer | SslMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth(),
        SslMode::Verify => {
            let path = root_cert.ok_or_else(|| {
                TlsError::Config("sslmode verify-ca/verify-full needs sslrootcert".into())
            })?;
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| TlsError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })? {
                let cert = cert.map_err(|e| TlsError::File {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                roots
                    .add(cert)
                    .map_err(|e| TlsError::Config(e.to_string()))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// TLS settings for connections to one node.
#[derive(Clone)]
pub struct NodeTls {
    pub connector: TlsConnector,
    pub name: ServerName<'static>,
    /// `require`/`verify-*`: a node answering `N` to SSLRequest is an error.
    pub required: bool,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeTls({:?}, required: {})", self.name, self.required)
    }
}

/// The TLS server name for a host (an IP address or a DNS name).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("invalid TLS server name `{host}`: {e}"))
}

/// Accepts any certificate (`sslmode=require`), still checking signatures.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

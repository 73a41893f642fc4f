//! TLS on both sides (rustls with the `ring` provider): accepting clients
//! that send an `SSLRequest`, and connecting to nodes as their URL's
//! `sslmode` asks (`disable`, `prefer` — the default, as in libpq —,
//! `require`, `verify-ca`/`verify-full` with `sslrootcert`).

use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{ring, CryptoProvider};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme,
};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Any byte stream a session or backend connection can run over.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {
    /// Ready when a read would not block, without reading: an idle client
    /// is waited on with no read buffer. Streams that cannot tell (TLS,
    /// which may hold decrypted bytes) are always ready, and the caller
    /// then waits in a read, with its buffer.
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    /// [`Stream::poll_read_ready`] really waits: a read that would block
    /// can give its buffer back and wait there.
    fn waits_unbuffered(&self) -> bool {
        false
    }
}
impl Stream for TcpStream {
    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        TcpStream::poll_read_ready(self, cx)
    }
    fn waits_unbuffered(&self) -> bool {
        true
    }
}
impl Stream for tokio_rustls::server::TlsStream<BoxStream> {}
impl Stream for tokio_rustls::client::TlsStream<TcpStream> {}
impl Stream for tokio::io::DuplexStream {}
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

/// TLS towards clients: the acceptor, and the channel-binding data of our
/// certificate (`None` when its signature algorithm has no defined hash).
#[derive(Clone)]
pub struct ClientTls {
    pub acceptor: TlsAcceptor,
    pub required: bool,
    pub end_point: Option<Vec<u8>>,
}

/// `tls-server-end-point` channel-binding data (RFC 5929): the hash of the
/// server certificate, with the hash of its signature algorithm, SHA-256
/// for MD5 and SHA-1. `None` for algorithms without one (Ed25519, PSS).
pub fn end_point(cert: &[u8]) -> Option<Vec<u8>> {
    use ::ring::digest;
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, ... }
    let (_, body, _) = der(cert)?;
    let (_, _, rest) = der(body)?;
    let (_, algorithm, _) = der(rest)?;
    let (tag, oid, _) = der(algorithm)?;
    if tag != 0x06 {
        return None;
    }
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    let hash = match oid {
        [p @ .., 0x04 | 0x05 | 0x0b] if p == RSA => &digest::SHA256,
        [p @ .., 0x0c] if p == RSA => &digest::SHA384,
        [p @ .., 0x0d] if p == RSA => &digest::SHA512,
        [p @ .., 0x01] if p == ECDSA => &digest::SHA256, // ecdsa-with-SHA1
        [p @ .., 0x03, 0x02] if p == ECDSA => &digest::SHA256,
        [p @ .., 0x03, 0x03] if p == ECDSA => &digest::SHA384,
        [p @ .., 0x03, 0x04] if p == ECDSA => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(hash, cert).as_ref().to_vec())
}

/// One DER element: (tag, contents, what follows).
fn der(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = data.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// TLS for client connections, from PEM files.
pub fn client_tls(cert: &Path, key: &Path, required: bool) -> Result<ClientTls, TlsError> {
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
        .with_single_cert(certs.clone(), key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let end_point = end_point(&certs[0]);
    if end_point.is_none() {
        tracing::warn!(
            cert = %cert.display(),
            "the certificate's signature algorithm defines no hash for channel binding: \
             SCRAM-SHA-256-PLUS is not offered"
        );
    }
    Ok(ClientTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        required,
        end_point,
    })
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

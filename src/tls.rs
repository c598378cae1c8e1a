//! TLS between the control plane and its host agents: rustls with the ring provider, TLS 1.3
//! only, certificates from the control plane's own CA (`cp::ca`). Both sides build their configs
//! here: the agent serves with a certificate it can swap at refresh and accepts only clients the
//! CA vouches for; the control plane dials agents with its client certificate.

use std::fmt;
use std::sync::{Arc, RwLock};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The one protocol both sides speak: HTTP/1.1 (upgrades carry the envd WebSockets).
const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid certificate PEM: {0}")]
    CertificatePem(String),
    #[error("invalid private key PEM: {0}")]
    KeyPem(String),
    #[error("the certificate authority cannot be used as a trust anchor: {0}")]
    TrustAnchor(String),
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::CertificatePem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::CertificatePem("no certificate in it".into()));
    }
    Ok(certs)
}

/// A certificate chain and its private key, checked to belong together.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<CertifiedKey, TlsError> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| TlsError::KeyPem(e.to_string()))?;
    Ok(CertifiedKey::from_der(
        certificates(cert_pem)?,
        key,
        &provider(),
    )?)
}

pub fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca_pem)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
    }
    Ok(roots)
}

/// The agent's server certificate, replaced in place when a refresh renews it: connections
/// already open keep theirs, new handshakes present the new one.
pub struct ServerIdentity(RwLock<Arc<CertifiedKey>>);

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerIdentity(<redacted>)")
    }
}

impl ServerIdentity {
    pub fn new(key: CertifiedKey) -> Self {
        Self(RwLock::new(Arc::new(key)))
    }

    pub fn replace(&self, key: CertifiedKey) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The agent API's TLS: its own certificate, and a client certificate chaining to the control
/// plane's CA with the client-auth purpose is required. Agents' certificates carry only the
/// server-auth purpose, so one agent cannot call another with its own.
pub fn agent_server_config(
    identity: Arc<ServerIdentity>,
    ca_pem: &str,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider.clone())
            .build()
            .map_err(|e| TlsError::TrustAnchor(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity);
    config.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    Ok(config)
}

/// A client config that verifies servers with `verifier` and presents `identity`. Its ALPN is
/// left to the connector that uses it (hyper-rustls sets HTTP/1.1 itself).
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Arc<dyn ResolvesClientCert>,
) -> Result<ClientConfig, TlsError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(identity))
}

/// A client config trusting no server at all, for connection pools that only ever speak plain
/// HTTP (the agent to envd over the sandbox's host link) but share the pool type with those that
/// speak TLS.
pub fn trust_nothing() -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth(),
    )
}

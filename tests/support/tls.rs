//! Self-signed certificates for 127.0.0.1, and the rustls configurations of
//! a server that presents one and of a client that trusts some.

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A self-signed certificate for `127.0.0.1` and its key.
pub struct Cert {
    pub der: CertificateDer<'static>,
    pub key_der: Vec<u8>,
    pub pem: String,
    pub key_pem: String,
}

impl Cert {
    pub fn new() -> Cert {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        Cert {
            der: cert.der().clone(),
            key_der: signing_key.serialize_der(),
            pem: cert.pem(),
            key_pem: signing_key.serialize_pem(),
        }
    }

    /// Writes `cert.pem` and `key.pem` into `dir`, each replaced at once
    /// (written aside, then renamed), as a certificate renewal does.
    pub fn install(&self, dir: &Path) {
        for (name, text) in [("cert.pem", &self.pem), ("key.pem", &self.key_pem)] {
            let aside = dir.join(format!(".{name}.new"));
            std::fs::write(&aside, text).unwrap();
            std::fs::rename(&aside, dir.join(name)).unwrap();
        }
    }

    /// A server presenting this certificate, offering HTTP/2 and HTTP/1.1
    /// by ALPN.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], self.key())
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }
}

impl Cert {
    /// A server presenting this certificate that asks every client for
    /// one of `clients` (mutual TLS).
    pub fn acceptor_requiring(&self, clients: &[&Cert]) -> TlsAcceptor {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(clients)), provider())
                .build()
                .unwrap();
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.der.clone()], self.key())
            .unwrap();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config))
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A client that trusts `certs`, offers `alpn`, and presents `own`.
pub fn connector_as(certs: &[&Cert], alpn: &[&[u8]], own: &Cert) -> TlsConnector {
    TlsConnector::from(Arc::new(client(certs, alpn, Some(own))))
}

/// A client that trusts `certs` and offers `alpn`.
pub fn client_config(certs: &[&Cert], alpn: &[&[u8]]) -> ClientConfig {
    client(certs, alpn, None)
}

fn client(certs: &[&Cert], alpn: &[&[u8]], own: Option<&Cert>) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(certs));
    let mut config = match own {
        Some(own) => builder
            .with_client_auth_cert(vec![own.der.clone()], own.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

fn roots(certs: &[&Cert]) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert.der.clone()).unwrap();
    }
    roots
}

pub fn connector(certs: &[&Cert], alpn: &[&[u8]]) -> TlsConnector {
    TlsConnector::from(Arc::new(client_config(certs, alpn)))
}

/// The name the certificates are for.
pub fn server_name() -> tokio_rustls::rustls::pki_types::ServerName<'static> {
    tokio_rustls::rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
}

fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

//! HTTPS with rustls (ring provider: no C toolchain beyond what the kernel
//! side already needs). With --client-ca, client certificates are verified but
//! optional at the TLS layer, so Prometheus can scrape /metrics without one;
//! the profile endpoints then require either a verified certificate or the token.

use std::{path::Path, sync::Arc};

use anyhow::{Context, Result};
use tokio_rustls::{
    rustls::{
        crypto::ring,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        server::WebPkiClientVerifier,
        RootCertStore, ServerConfig,
    },
    TlsAcceptor,
};

pub fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor> {
    let chain = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("--tls-cert: reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--tls-cert: parsing {}", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "--tls-cert: no certificate in {}",
        cert.display()
    );
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key: reading a private key from {}", key.display()))?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca)
                .with_context(|| format!("--client-ca: reading {}", ca.display()))?
            {
                let c = c.with_context(|| format!("--client-ca: parsing {}", ca.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("--client-ca: a certificate of {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .with_context(|| format!("--client-ca: {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("--tls-cert/--tls-key: the key does not fit the certificate")?;
    // HTTP/1.1 only; clients offering h2 (Go's) fall back to it.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

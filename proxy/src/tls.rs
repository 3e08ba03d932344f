//! TLS on both sides, with rustls: a source serves TLS (optionally requiring client
//! certificates), a sink connects with TLS (optionally presenting one, optionally without
//! checking the host name).

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use shotover_crds::{TlsAcceptorConfig, TlsConnectorConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {path}"))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing certificates in {path}"))?;
    if certs.is_empty() {
        return Err(anyhow!("no PEM certificate found in {path}"));
    }
    Ok(certs)
}

fn key(path: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("reading a PEM private key from {path}"))
}

fn roots(path: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots
            .add(cert)
            .with_context(|| format!("adding the CA certificate of {path}"))?;
    }
    Ok(roots)
}

/// The TLS server side of a source.
pub fn acceptor(config: &TlsAcceptorConfig) -> Result<TlsAcceptor> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match &config.certificate_authority_path {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .with_context(|| format!("client certificate verifier for {ca}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(
            certs(&config.certificate_path)?,
            key(&config.private_key_path)?,
        )
        .context("the certificate does not match the private key")?;
    server.alpn_protocols.clear();
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// The TLS client side of a sink, with the server name to check for `address`.
pub fn connector(
    config: &TlsConnectorConfig,
    address: &str,
) -> Result<(TlsConnector, ServerName<'static>)> {
    let roots = Arc::new(roots(&config.certificate_authority_path)?);
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if config.verify_hostname {
        builder.with_root_certificates(roots)
    } else {
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .context("server certificate verifier")?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoHostnameCheck(inner)))
    };
    let client = match (&config.certificate_path, &config.private_key_path) {
        (Some(cert), Some(k)) => builder
            .with_client_auth_cert(certs(cert)?, key(k)?)
            .context("the client certificate does not match its private key")?,
        _ => builder.with_no_client_auth(),
    };
    let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = match ServerName::try_from(host.to_string()) {
        Ok(name) => name,
        // The name is only checked when verify_hostname is on; without it any valid name
        // will do for the handshake (host names with `_` are not valid TLS names).
        Err(_) if !config.verify_hostname => {
            ServerName::try_from("upstream.invalid").context("the placeholder TLS server name")?
        }
        Err(e) => {
            return Err(anyhow!(
                "`{host}` is not a valid TLS server name ({e}); use its IP address, or set verify_hostname: false"
            ));
        }
    };
    Ok((TlsConnector::from(Arc::new(client)), name))
}

/// Checks the certificate chain but not the name in it (`verify_hostname: false`).
#[derive(Debug)]
struct NoHostnameCheck(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for NoHostnameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

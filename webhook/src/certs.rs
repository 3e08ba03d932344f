//! The webhook's TLS: a CA and a serving certificate kept in a Secret, renewed before expiry,
//! swapped into the running server without a restart, and the CA kept in the
//! MutatingWebhookConfiguration's `caBundle`.
//!
//! The CA lives ten years and is created once; only the serving certificate is renewed, so
//! the `caBundle` does not change when it is (no churn, and every replica trusts every other
//! replica's certificate). Replicas share the Secret: the first creates it (a conflict means
//! another won, and its material is used), renewals are writes conditional on the
//! `resourceVersion` read, and every replica re-reads the Secret each check interval and swaps
//! in what it finds.
//!
//! With `--cert-mode files` (cert-manager) the certificate and key are read from files,
//! re-read each check interval, and the `caBundle` is left to cert-manager's CA injector.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::json;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// Keys of the Secret.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
/// Annotations of the Secret: when the serving certificate expires (Unix seconds) and the
/// names it was issued for.
pub const NOT_AFTER_ANNOTATION: &str = "shotover.io/not-after";
pub const NOT_BEFORE_ANNOTATION: &str = "shotover.io/not-before";
pub const SANS_ANNOTATION: &str = "shotover.io/sans";
/// Subject of the CA.
const CA_NAME: &str = "shotover-webhook-ca";
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Everything in the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
    /// When the serving certificate was issued (Unix seconds; it is valid from a minute
    /// before, for clocks a little behind).
    pub not_before: i64,
    pub not_after: i64,
    pub sans: Vec<String>,
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn offset(unix: i64) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(unix).map_err(|e| anyhow!("timestamp {unix}: {e}"))
}

/// A new CA: (certificate PEM, key PEM).
pub fn generate_ca() -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    let mut params = ca_params();
    let now = now_unix();
    params.not_before = offset(now - 3600)?;
    params.not_after = offset(now + CA_LIFETIME.as_secs() as i64)?;
    let cert = params.self_signed(&key).context("signing the CA")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `sans` (DNS names or IP addresses), signed by the CA whose key
/// is `ca_key_pem`, valid from a minute ago for `lifetime`.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    sans: &[String],
    lifetime: Duration,
) -> anyhow::Result<Material> {
    let ca_key = KeyPair::from_pem(ca_key_pem).context("reading the CA key")?;
    // The issuer is the CA's name and key; rebuilding its certificate from the same
    // parameters and key gives the same name and key identifier.
    let issuer = ca_params().self_signed(&ca_key).context("loading the CA")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        sans.first()
            .cloned()
            .unwrap_or_else(|| "shotover-webhook".to_owned()),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = sans
        .iter()
        .map(|san| match san.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => san
                .clone()
                .try_into()
                .map(SanType::DnsName)
                .map_err(|e| anyhow!("`{san}` is not a DNS name: {e}")),
        })
        .collect::<anyhow::Result<_>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let not_before = now_unix();
    let not_after = not_before + lifetime.as_secs() as i64;
    params.not_before = offset(not_before - 60)?;
    params.not_after = offset(not_after)?;
    let key = KeyPair::generate().context("generating the serving key")?;
    let cert = params
        .signed_by(&key, &issuer, &ca_key)
        .context("signing the serving certificate")?;
    Ok(Material {
        ca_cert: ca_cert_pem.to_owned(),
        ca_key: ca_key_pem.to_owned(),
        cert: cert.pem(),
        key: key.serialize_pem(),
        not_before,
        not_after,
        sans: sans.to_vec(),
    })
}

/// Whether a certificate issued at `not_before` and valid until `not_after` is due for
/// renewal at `now`: in the last third of its life.
pub fn needs_renewal(not_before: i64, not_after: i64, now: i64) -> bool {
    let life = (not_after - not_before).max(0);
    now >= not_after - life / 3
}

impl Material {
    fn from_secret(secret: &Secret) -> anyhow::Result<Material> {
        let data = secret.data.clone().unwrap_or_default();
        let text = |key: &str| -> anyhow::Result<String> {
            let bytes = data.get(key).ok_or_else(|| anyhow!("it has no `{key}`"))?;
            String::from_utf8(bytes.0.clone()).map_err(|_| anyhow!("`{key}` is not text"))
        };
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        let number = |key: &str| -> i64 {
            annotations
                .get(key)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(Material {
            ca_cert: text(CA_CERT)?,
            ca_key: text(CA_KEY)?,
            cert: text(TLS_CERT)?,
            key: text(TLS_KEY)?,
            not_before: number(NOT_BEFORE_ANNOTATION),
            not_after: number(NOT_AFTER_ANNOTATION),
            sans: annotations
                .get(SANS_ANNOTATION)
                .map(|s| s.split(',').map(str::to_owned).collect())
                .unwrap_or_default(),
        })
    }

    fn to_secret(&self, name: &str, resource_version: Option<String>) -> Secret {
        let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                resource_version,
                labels: Some(BTreeMap::from([
                    (
                        "app.kubernetes.io/name".to_owned(),
                        "shotover-webhook".to_owned(),
                    ),
                    (
                        "app.kubernetes.io/managed-by".to_owned(),
                        "shotover-webhook".to_owned(),
                    ),
                ])),
                annotations: Some(BTreeMap::from([
                    (
                        NOT_BEFORE_ANNOTATION.to_owned(),
                        self.not_before.to_string(),
                    ),
                    (NOT_AFTER_ANNOTATION.to_owned(), self.not_after.to_string()),
                    (SANS_ANNOTATION.to_owned(), self.sans.join(",")),
                ])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(BTreeMap::from([
                (CA_CERT.to_owned(), bytes(&self.ca_cert)),
                (CA_KEY.to_owned(), bytes(&self.ca_key)),
                (TLS_CERT.to_owned(), bytes(&self.cert)),
                (TLS_KEY.to_owned(), bytes(&self.key)),
            ])),
            ..Secret::default()
        }
    }
}

/// A certificate and key for rustls.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading the certificate PEM")?;
    if certs.is_empty() {
        bail!("no certificate in the PEM");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("reading the key PEM")?;
    let key = any_supported_type(&key).context("the key type is not supported")?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

/// The serving certificate, swapped in place: every new TLS handshake gets the current one.
#[derive(Debug, Default)]
pub struct Resolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl Resolver {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(key);
    }

    pub fn is_set(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Kept in a Secret by the webhook itself.
    Secret {
        api: Box<Api<Secret>>,
        name: String,
        sans: Vec<String>,
        lifetime: Duration,
        /// The Mutating- and ValidatingWebhookConfiguration (one name for both) whose
        /// `caBundle` to keep current, if any.
        webhook_config: Option<Box<WebhookConfigs>>,
    },
    /// PEM files written by someone else (cert-manager).
    Files { cert: String, key: String },
}

/// The webhook configurations of this webhook: the Pod injection (mutating) and the
/// warning on deleting a topology still in use (validating), under one name.
#[derive(Debug, Clone)]
pub struct WebhookConfigs {
    pub mutating: Api<MutatingWebhookConfiguration>,
    pub validating: Api<ValidatingWebhookConfiguration>,
    pub name: String,
}

/// Keeps `resolver` current until cancelled. The first round's error is returned (the
/// process cannot serve without a certificate); later errors are logged and retried.
pub struct Keeper {
    pub source: Source,
    pub resolver: Arc<Resolver>,
    pub metrics: Arc<Metrics>,
    /// What is being served now (to tell a change).
    served: Option<(String, String)>,
    /// Whether the missing-configuration warning was logged.
    warned_missing_config: bool,
}

impl Keeper {
    pub fn new(source: Source, resolver: Arc<Resolver>, metrics: Arc<Metrics>) -> Self {
        Keeper {
            source,
            resolver,
            metrics,
            served: None,
            warned_missing_config: false,
        }
    }

    /// One round: read (create, renew) the certificate, swap it in if it changed, keep the
    /// `caBundle` current.
    pub async fn round(&mut self) -> anyhow::Result<()> {
        let (cert, key, not_after, ca) = match &self.source {
            Source::Files { cert, key } => {
                let c = std::fs::read_to_string(cert)
                    .with_context(|| format!("reading --tls-cert-file {cert}"))?;
                let k = std::fs::read_to_string(key)
                    .with_context(|| format!("reading --tls-key-file {key}"))?;
                (c, k, None, None)
            }
            Source::Secret {
                api,
                name,
                sans,
                lifetime,
                ..
            } => {
                let material = ensure_secret(api, name, sans, *lifetime, &self.metrics).await?;
                (
                    material.cert,
                    material.key,
                    Some(material.not_after),
                    Some(material.ca_cert),
                )
            }
        };
        if self.served.as_ref() != Some(&(cert.clone(), key.clone())) {
            let certified = certified_key(&cert, &key)?;
            let first = self.served.is_none();
            self.resolver.set(certified);
            self.served = Some((cert, key));
            if !first {
                self.metrics.certificate_reloaded();
            }
            info!(
                not_after = not_after.unwrap_or_default(),
                "serving {} certificate",
                if first { "the" } else { "a new" }
            );
        }
        if let Some(not_after) = not_after {
            self.metrics.set_certificate_expiry(not_after);
        }
        if let (
            Some(ca),
            Source::Secret {
                webhook_config: Some(config),
                ..
            },
        ) = (ca, &self.source)
        {
            let name = &config.name;
            match patch_ca_bundle(&config.mutating, name, &ca).await {
                Ok(true) => info!(webhook_config = %name, "caBundle updated"),
                Ok(false) => {}
                Err(e) if is_not_found(&e) => {
                    if !self.warned_missing_config {
                        warn!(webhook_config = %name, "the MutatingWebhookConfiguration does not exist yet: the apiserver will not call this webhook until it does");
                        self.warned_missing_config = true;
                    }
                }
                Err(e) => return Err(e.context(format!("updating the caBundle of {name}"))),
            }
            // Only a warning hangs on it: a chart without it is fine.
            match patch_ca_bundle(&config.validating, name, &ca).await {
                Ok(true) => {
                    info!(webhook_config = %name, "caBundle of the ValidatingWebhookConfiguration updated")
                }
                Ok(false) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    warn!(webhook_config = %name, error = %e, "cannot update the caBundle of the ValidatingWebhookConfiguration: deleting a topology still in use will not warn")
                }
            }
        }
        Ok(())
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<kube::Error>()
        .is_some_and(|e| matches!(e, kube::Error::Api(s) if s.code == 404))
}

/// Reads the Secret, creating it when missing and renewing its serving certificate when due
/// or when the names changed.
async fn ensure_secret(
    api: &Api<Secret>,
    name: &str,
    sans: &[String],
    lifetime: Duration,
    metrics: &Metrics,
) -> anyhow::Result<Material> {
    for _ in 0..3 {
        let existing = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {name}"))?;
        let Some(secret) = existing else {
            let (ca_cert, ca_key) = generate_ca()?;
            let material = issue(&ca_cert, &ca_key, sans, lifetime)?;
            match api
                .create(&PostParams::default(), &material.to_secret(name, None))
                .await
            {
                Ok(_) => {
                    info!(secret = %name, "created the CA and the serving certificate");
                    return Ok(material);
                }
                // Another replica created it first: use theirs.
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e).with_context(|| format!("creating Secret {name}")),
            }
        };
        let material = Material::from_secret(&secret).with_context(|| {
            format!("Secret {name} is not a shotover webhook certificate (delete it to start over)")
        })?;
        let due = needs_renewal(material.not_before, material.not_after, now_unix());
        if !due && material.sans == sans {
            return Ok(material);
        }
        let renewed = issue(&material.ca_cert, &material.ca_key, sans, lifetime)?;
        match api
            .replace(
                name,
                &PostParams::default(),
                &renewed.to_secret(name, secret.metadata.resource_version.clone()),
            )
            .await
        {
            Ok(_) => {
                metrics.certificate_renewed();
                info!(secret = %name, not_after = renewed.not_after, "renewed the serving certificate");
                return Ok(renewed);
            }
            // Another replica renewed it first: read theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("renewing Secret {name}")),
        }
    }
    Err(anyhow!(
        "Secret {name} kept changing while it was being written (3 conflicts)"
    ))
}

/// Sets `caBundle` on every webhook of the configuration (mutating or validating) that
/// lacks it. Returns whether it wrote anything.
pub async fn patch_ca_bundle<K>(api: &Api<K>, name: &str, ca_pem: &str) -> anyhow::Result<bool>
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + serde::Serialize,
{
    let config = serde_json::to_value(api.get(name).await?)?;
    let wanted = base64(ca_pem.as_bytes());
    let mut ops = Vec::new();
    let webhooks = config["webhooks"].as_array().cloned().unwrap_or_default();
    for (i, webhook) in webhooks.iter().enumerate() {
        let current = webhook["clientConfig"]["caBundle"].as_str();
        if current != Some(wanted.as_str()) {
            ops.push(
                json!({"op": "test", "path": format!("/webhooks/{i}/name"), "value": webhook["name"]}),
            );
            ops.push(json!({"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": wanted}));
        }
    }
    if ops.is_empty() {
        return Ok(false);
    }
    let patch: json_patch::Patch = serde_json::from_value(serde_json::Value::Array(ops))?;
    api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
        .await?;
    Ok(true)
}

fn base64(bytes: &[u8]) -> String {
    serde_json::to_value(ByteString(bytes.to_vec()))
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_in_the_last_third() {
        assert!(!needs_renewal(0, 300, 0));
        assert!(!needs_renewal(0, 300, 199));
        assert!(needs_renewal(0, 300, 200));
        assert!(needs_renewal(0, 300, 400));
    }

    #[test]
    fn a_leaf_issued_by_the_stored_ca_verifies_against_it() {
        let (ca_cert, ca_key) = generate_ca().expect("ca");
        let material = issue(
            &ca_cert,
            &ca_key,
            &[
                "shotover-webhook.shotover-system.svc".to_owned(),
                "127.0.0.1".to_owned(),
            ],
            Duration::from_secs(3600),
        )
        .expect("leaf");
        assert_eq!(material.not_after - material.not_before, 3600);
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_cert.as_bytes()) {
            roots.add(cert.expect("pem")).expect("root");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier");
        let leaf = CertificateDer::pem_slice_iter(material.cert.as_bytes())
            .next()
            .expect("one")
            .expect("pem");
        use rustls::client::danger::ServerCertVerifier;
        for name in ["shotover-webhook.shotover-system.svc", "127.0.0.1"] {
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &rustls_pki_types::ServerName::try_from(name).expect("name"),
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(
            verifier
                .verify_server_cert(
                    &leaf,
                    &[],
                    &rustls_pki_types::ServerName::try_from("other.example").expect("name"),
                    &[],
                    rustls_pki_types::UnixTime::now(),
                )
                .is_err()
        );
        certified_key(&material.cert, &material.key).expect("rustls takes it");
    }

    #[test]
    fn the_secret_round_trips() {
        let (ca_cert, ca_key) = generate_ca().expect("ca");
        let material = issue(
            &ca_cert,
            &ca_key,
            &["a.b.svc".to_owned()],
            Duration::from_secs(60),
        )
        .expect("leaf");
        let secret = material.to_secret("s", Some("7".to_owned()));
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        assert_eq!(Material::from_secret(&secret).expect("parse"), material);
        let mut broken = secret.clone();
        broken.data.as_mut().expect("data").remove(CA_KEY);
        let e = Material::from_secret(&broken).expect_err("no CA key");
        assert!(e.to_string().contains("ca.key"), "{e}");
    }
}

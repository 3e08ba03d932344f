//! The sidecar injection webhook: a mutating admission webhook that adds the Shotover proxy
//! to Pods that opt in, configured by the ShotoverTopology they name.
//!
//! [`inject`] and [`overrides`] are pure (the decision and the JSON patch); [`admission`] is
//! the HTTPS handler around them; [`certs`] keeps the serving certificate and the
//! `caBundle`; [`tls`] serves HTTPS with a certificate that can change under it.

pub mod admission;
pub mod certs;
pub mod inject;
pub mod metrics;
pub mod offline;
pub mod overrides;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret};
use kube::api::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use shotover_crds::crd::ShotoverTopology;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admission::State;
use crate::certs::{Keeper, Resolver};
use crate::metrics::Metrics;

/// Where the serving certificate comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CertMode {
    /// A CA and certificate kept in `--secret-name`, renewed here, `caBundle` patched here.
    Secret,
    /// `--tls-cert-file`/`--tls-key-file` (cert-manager), re-read when they change.
    Files,
}

/// When the sidecar is a native sidecar, unless the topology or the Pod says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NativeSidecar {
    /// When the apiserver and every node's kubelet are 1.29 or newer.
    Auto,
    Always,
    Never,
}

/// The command line: `serve` (the default) or `inject`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "shotover-webhook",
    version,
    about = "Injects the Shotover proxy as a sidecar into Pods that opt in"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Opts,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Answer admission requests (the default).
    Serve(Box<Opts>),
    /// Print manifests with the sidecar injected, as the webhook would inject it, without a
    /// cluster: `shotover-webhook inject -t topology.yaml -f deployment.yaml`.
    Inject(offline::InjectOpts),
}

/// Settings of `shotover-webhook serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct Opts {
    /// HTTPS address of the admission endpoint (`POST /inject`).
    #[arg(long, default_value = "0.0.0.0:8443")]
    pub addr: SocketAddr,
    /// HTTP address of `/metrics`, `/healthz` and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// The webhook's own namespace: its Secret lives there, and its Pods are never injected.
    #[arg(long, env = "POD_NAMESPACE", default_value = "shotover-system")]
    pub namespace: String,
    /// Read ShotoverTopologies of this namespace only (default: all).
    #[arg(long)]
    pub watch_namespace: Option<String>,
    #[arg(long, value_enum, default_value_t = CertMode::Secret)]
    pub cert_mode: CertMode,
    /// Secret holding the CA and the serving certificate (`--cert-mode secret`).
    #[arg(long, default_value = "shotover-webhook-tls")]
    pub secret_name: String,
    /// Names the serving certificate is for (repeat the flag; default: the Service's names,
    /// `<--service-name>.<namespace>.svc` and `...svc.cluster.local`). IP addresses too.
    #[arg(long = "cert-name")]
    pub cert_names: Vec<String>,
    /// The webhook's Service, for the default certificate names.
    #[arg(long, default_value = "shotover-webhook")]
    pub service_name: String,
    /// Lifetime of a serving certificate; it is renewed in its last third. `30d`, `12h`, `90s`.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub cert_lifetime: Duration,
    /// How often the certificate (Secret or files) and the `caBundle` are checked.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub cert_check_interval: Duration,
    /// The MutatingWebhookConfiguration (and the ValidatingWebhookConfiguration of the same
    /// name, when it exists) whose `caBundle` this process keeps current
    /// (`--cert-mode secret`); empty to leave it alone.
    #[arg(long, default_value = "shotover-sidecar-injector")]
    pub webhook_config_name: String,
    /// Certificate file (`--cert-mode files`).
    #[arg(long, default_value = "/etc/shotover-webhook/tls/tls.crt")]
    pub tls_cert_file: String,
    /// Key file (`--cert-mode files`).
    #[arg(long, default_value = "/etc/shotover-webhook/tls/tls.key")]
    pub tls_key_file: String,
    #[arg(long, value_enum, default_value_t = NativeSidecar::Auto)]
    pub native_sidecar: NativeSidecar,
    /// An image the `shotover.io/proxy-image` annotation may name: a repository (any tag or
    /// digest of it) or a prefix ending in `/`. Repeat it, or separate with commas; none
    /// (the default) allows any image.
    #[arg(long = "allowed-image", env = "ALLOWED_IMAGES", value_delimiter = ',')]
    pub allowed_images: Vec<String>,
    /// After SIGTERM, keep serving this long before draining (so a Service stops sending
    /// requests first).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// `90s`, `10m`, `12h`, `30d` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 90s, 10m, 12h or 30d"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(seconds))
}

/// Runs the webhook until SIGTERM/SIGINT.
pub async fn run(opts: Opts) -> anyhow::Result<()> {
    if opts.cert_lifetime < Duration::from_secs(3) || opts.cert_check_interval.is_zero() {
        bail!("--cert-lifetime must be at least 3s and --cert-check-interval more than 0s");
    }
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
    let shutdown = CancellationToken::new();
    tokio::spawn(shotover_operator::shutdown_on_signal(shutdown.clone()));
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));

    // The HTTP listener first, so that probes answer while the caches fill.
    let http = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .with_context(|| format!("cannot listen on --http-addr {}", opts.http_addr))?;
    info!(addr = %http.local_addr()?, "serving /metrics, /healthz and /readyz");
    let render_metrics = metrics.clone();
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(shotover_operator::server::serve(
        http,
        Arc::new(move || render_metrics.render()),
        ready.clone(),
        shotover_operator::server::always_live(),
        http_stop.clone(),
    ));

    // The certificate: nothing is served before there is one.
    let resolver = Arc::new(Resolver::default());
    let source = match opts.cert_mode {
        CertMode::Files => certs::Source::Files {
            cert: opts.tls_cert_file.clone(),
            key: opts.tls_key_file.clone(),
        },
        CertMode::Secret => certs::Source::Secret {
            api: Box::new(Api::<Secret>::namespaced(client.clone(), &opts.namespace)),
            name: opts.secret_name.clone(),
            sans: cert_names(&opts),
            lifetime: opts.cert_lifetime,
            webhook_config: (!opts.webhook_config_name.is_empty()).then(|| {
                Box::new(certs::WebhookConfigs {
                    mutating: Api::<MutatingWebhookConfiguration>::all(client.clone()),
                    validating: Api::<ValidatingWebhookConfiguration>::all(client.clone()),
                    name: opts.webhook_config_name.clone(),
                })
            }),
        },
    };
    let mut keeper = Keeper::new(source, resolver.clone(), metrics.clone());
    keeper
        .round()
        .await
        .context("cannot set up the serving certificate")?;
    let interval = opts.cert_check_interval;
    let keeper_stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = keeper_stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if let Err(e) = keeper.round().await {
                warn!(error = %format!("{e:#}"), "certificate check failed; retrying next interval");
            }
        }
    });

    // Caches of topologies and namespaces.
    let topologies_api: Api<ShotoverTopology> = match &opts.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (topologies, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(topologies_api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(|event| async move {
        if let Err(e) = event {
            warn!(error = %e, "watching ShotoverTopologies");
        }
    }));
    let (namespaces, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    tokio::spawn(stream.for_each(|event| async move {
        if let Err(e) = event {
            warn!(error = %e, "watching namespaces");
        }
    }));

    let native = Arc::new(AtomicBool::new(match opts.native_sidecar {
        NativeSidecar::Always => true,
        NativeSidecar::Never => false,
        NativeSidecar::Auto => detect_native_sidecar(&client).await,
    }));
    if opts.native_sidecar == NativeSidecar::Auto {
        let native = native.clone();
        let client = client.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                }
                native.store(detect_native_sidecar(&client).await, Ordering::Relaxed);
            }
        });
    }

    let reporter = Reporter {
        controller: "shotover-webhook".to_owned(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let events = admission::spawn_event_sender(Recorder::new(client.clone(), reporter));
    let state = Arc::new(State {
        client: client.clone(),
        own_namespace: opts.namespace.clone(),
        native_sidecar: native,
        allowed_images: opts
            .allowed_images
            .iter()
            .map(|i| i.trim().to_owned())
            .filter(|i| !i.is_empty())
            .collect(),
        topologies: topologies.clone(),
        namespaces: namespaces.clone(),
        rendered: Default::default(),
        metrics: metrics.clone(),
        events,
    });

    let tcp = tokio::net::TcpListener::bind(opts.addr)
        .await
        .with_context(|| format!("cannot listen on --addr {}", opts.addr))?;
    // New connections are accepted until the drain, not just until SIGTERM: during the
    // shutdown delay a Service still sends some here, and a closed listener would refuse them
    // (or reset those already in its backlog, which the apiserver reports as an EOF).
    let drain = CancellationToken::new();
    let listener = tls::TlsListener::spawn(tcp, tls::server_config(resolver)?, drain.clone())?;
    info!(addr = %axum::serve::Listener::local_addr(&listener)?, "serving admission requests on POST /inject");
    let router = admission::router(state).layer(axum::middleware::map_response(
        close_when_stopping(shutdown.clone()),
    ));
    let server = tokio::spawn({
        let drain = drain.clone();
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(drain.cancelled_owned())
                .await
        }
    });

    tokio::select! {
        _ = shutdown.cancelled() => {}
        ready_now = async {
            topologies.wait_until_ready().await.is_ok() && namespaces.wait_until_ready().await.is_ok()
        } => {
            if !ready_now {
                bail!("the caches stopped before they were ready");
            }
            ready.store(true, Ordering::Relaxed);
            info!("caches ready: admitting Pods");
        }
    }
    shutdown.cancelled().await;
    ready.store(false, Ordering::Relaxed);
    if !opts.shutdown_delay.is_zero() {
        info!(delay = ?opts.shutdown_delay, "shutting down: still serving while endpoints update");
        tokio::time::sleep(opts.shutdown_delay).await;
    }
    drain.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "the admission server failed"),
        Err(e) => error!(error = %e, "the admission server panicked"),
    }
    http_stop.cancel();
    http_task.await.ok();
    info!("stopped");
    Ok(())
}

/// Once shutting down, every answer carries `Connection: close`: the apiserver then opens
/// its next connection through the Service (to a Pod that stays) instead of reusing one to
/// this Pod, so few idle keep-alive connections are left for the drain to close under a
/// request the apiserver is about to send (an HTTP/1.1 POST that it would not retry).
fn close_when_stopping(
    shutdown: CancellationToken,
) -> impl Fn(axum::response::Response) -> std::future::Ready<axum::response::Response> + Clone {
    move |mut response: axum::response::Response| {
        if shutdown.is_cancelled() {
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        std::future::ready(response)
    }
}

/// The names the serving certificate is issued for.
pub fn cert_names(opts: &Opts) -> Vec<String> {
    if !opts.cert_names.is_empty() {
        return opts.cert_names.clone();
    }
    let base = format!("{}.{}.svc", opts.service_name, opts.namespace);
    vec![base.clone(), format!("{base}.cluster.local")]
}

/// Native sidecars (beta and on by default since 1.29) need the apiserver and every kubelet
/// at 1.29 or newer. A cluster without nodes is judged by its apiserver.
async fn detect_native_sidecar(client: &Client) -> bool {
    let server = match client.apiserver_version().await {
        Ok(info) => minor_version(&info.major, &info.minor),
        Err(e) => {
            warn!(error = %e, "cannot read the apiserver version: assuming no native sidecars");
            return false;
        }
    };
    if server.is_none_or(|v| v < (1, 29)) {
        info!(version = ?server, "the apiserver predates native sidecars: injecting the proxy as the first container");
        return false;
    }
    match Api::<Node>::all(client.clone())
        .list(&Default::default())
        .await
    {
        Ok(nodes) => {
            let old: Vec<String> = nodes
                .items
                .iter()
                .filter_map(|n| {
                    let version = n
                        .status
                        .as_ref()?
                        .node_info
                        .as_ref()?
                        .kubelet_version
                        .clone();
                    let parsed = kubelet_minor(&version);
                    parsed.is_none_or(|v| v < (1, 29)).then(|| {
                        format!(
                            "{} ({version})",
                            n.metadata.name.clone().unwrap_or_default()
                        )
                    })
                })
                .collect();
            if old.is_empty() {
                info!(nodes = nodes.items.len(), "native sidecars supported");
                true
            } else {
                info!(nodes = %old.join(", "), "kubelets older than 1.29: injecting the proxy as the first container");
                false
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot list nodes: judging native sidecar support by the apiserver alone");
            true
        }
    }
}

fn minor_version(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| -> Option<u32> {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    Some((digits(major)?, digits(minor)?))
}

/// `v1.30.2` → (1, 30).
fn kubelet_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.trim_start_matches('v').split('.');
    minor_version(parts.next()?, parts.next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43200)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(2_592_000)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn answers_close_their_connection_once_shutting_down() {
        let shutdown = CancellationToken::new();
        let layer = close_when_stopping(shutdown.clone());
        let answer = |layer: &dyn Fn(
            axum::response::Response,
        ) -> std::future::Ready<axum::response::Response>| {
            layer(axum::response::Response::new(axum::body::Body::empty()))
                .into_inner()
                .headers()
                .get(axum::http::header::CONNECTION)
                .cloned()
        };
        assert_eq!(answer(&layer), None, "keep-alive while serving");
        shutdown.cancel();
        assert_eq!(
            answer(&layer).as_ref().map(|v| v.as_bytes()),
            Some(&b"close"[..])
        );
    }

    #[test]
    fn versions_parse_like_the_apiserver_reports_them() {
        assert_eq!(minor_version("1", "30+"), Some((1, 30)));
        assert_eq!(kubelet_minor("v1.28.3-gke.100"), Some((1, 28)));
        assert_eq!(kubelet_minor("garbage"), None);
    }
}

//! The ShotoverTopology operator.
//!
//! For every `ShotoverTopology` it validates the topology with the proxy's own code, renders
//! `topology.yaml` and `config.yaml` into a ConfigMap, runs a DB-side proxy tier
//! (StatefulSet, Services, PodDisruptionBudget) when asked, and reports what happened in the
//! resource's status and in Events. [`render`] and [`status`] are pure; [`reconcile`] is the
//! shell that talks to the apiserver; [`leader`] makes sure only one replica writes.

pub mod leader;
pub mod metrics;
pub mod pods;
pub mod reconcile;
pub mod render;
pub mod reports;
pub mod server;
pub mod status;

#[cfg(test)]
mod fixtures;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use kube::runtime::controller::{self, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use shotover_crds::crd::{
    INJECT_LABEL, SIDECAR_LABEL, ShotoverTopology, TOPOLOGY_ANNOTATION, TOPOLOGY_LABEL,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::leader::{LeaseLock, LeaseTimings};
use crate::metrics::Metrics;
use crate::pods::PodStores;
use crate::reconcile::Context;

/// Logs to stdout, human-readable or JSON, at the level of `RUST_LOG` (default `info`).
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Settings of `shotover-operator run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunOpts {
    /// Watch only this namespace (default: every namespace). With it, a Role in that namespace
    /// is all the RBAC the operator needs.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of the HTTP listener: `/metrics`, `/healthz` (live) and `/readyz`.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Take the leader Lease before reconciling, so that of several replicas only one writes.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_election: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "shotover-operator")]
    pub lease_name: String,
    /// Namespace of the leader Lease (default: `POD_NAMESPACE`, the operator's own namespace
    /// where its Lease Role is, else `--namespace`, else `default`).
    #[arg(long)]
    pub lease_namespace: Option<String>,
    /// This replica's name in the Lease and in Events (default: `POD_NAME`, else host name and
    /// process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Topologies reconciled at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u16,
    /// Service types the DB-side tier's client Service may have (comma-separated); a
    /// topology asking for another is invalid, saying so.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ClusterIP,NodePort,LoadBalancer",
        value_parser = parse_service_type
    )]
    pub allowed_service_types: Vec<shotover_crds::crd::ServiceType>,
    /// Annotation keys the client Service may carry (comma-separated): a key, a prefix
    /// ending in `*`, or `*` (the default) for any; an empty value allows none.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub allowed_service_annotations: Vec<String>,
}

fn parse_service_type(text: &str) -> Result<shotover_crds::crd::ServiceType, String> {
    use shotover_crds::crd::ServiceType;
    [
        ServiceType::ClusterIP,
        ServiceType::NodePort,
        ServiceType::LoadBalancer,
    ]
    .into_iter()
    .find(|t| t.as_str() == text.trim())
    .ok_or_else(|| format!("`{text}` is not ClusterIP, NodePort or LoadBalancer"))
}

/// Runs the operator until SIGTERM/SIGINT, or until it loses the leader Lease (an error, so
/// that the process exits and its replacement campaigns again).
pub async fn run(opts: RunOpts) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("cannot reach the Kubernetes API (in-cluster service account, or KUBECONFIG)")?;
    check_crd(&client, opts.namespace.as_deref()).await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(shutdown.clone()));
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(opts.http_addr)
        .await
        .with_context(|| format!("cannot listen on --http-addr {}", opts.http_addr))?;
    info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    let render_metrics = metrics.clone();
    let live_metrics = metrics.clone();
    let server = tokio::spawn(server::serve(
        listener,
        Arc::new(move || render_metrics.render()),
        ready.clone(),
        Arc::new(move || live_metrics.live(metrics::STUCK)),
        shutdown.clone(),
    ));
    ready.store(true, Ordering::Relaxed);

    let identity = opts.identity.clone().unwrap_or_else(default_identity);
    let lease_namespace = opts
        .lease_namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .or_else(|| opts.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let mut lock = opts.leader_election.then(|| {
        LeaseLock::new(
            Api::<Lease>::namespaced(client.clone(), &lease_namespace),
            &opts.lease_name,
            &identity,
            LeaseTimings::default(),
        )
    });
    if let Some(lock) = &mut lock {
        info!(%identity, lease = %format!("{lease_namespace}/{}", opts.lease_name), "waiting to become the leader");
        if !campaign(lock, &shutdown).await {
            server.await.ok();
            return Ok(());
        }
        info!(%identity, "became the leader");
    }
    metrics.set_leader(true);

    let lost = CancellationToken::new();
    let renewer = lock.map(|lock| tokio::spawn(keep_lease(lock, shutdown.clone(), lost.clone())));
    let stop = {
        let (shutdown, lost) = (shutdown.clone(), lost.clone());
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = lost.cancelled() => {}
            }
        }
    };

    let topologies: Api<ShotoverTopology> = scoped(&client, opts.namespace.as_deref());
    let owned = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        render::FIELD_MANAGER
    ));
    let reporter = Reporter {
        controller: render::FIELD_MANAGER.to_owned(),
        instance: Some(identity.clone()),
    };
    // Application Pods, for the sidecar counts: those injected, and those that asked.
    let (injected, injected_writer) = reflector::store();
    let injected_pods = reflector(
        injected_writer,
        watcher(
            scoped::<Pod>(&client, opts.namespace.as_deref()),
            watcher::Config::default().labels(SIDECAR_LABEL),
        )
        .modify(pods::strip),
    )
    .default_backoff()
    .touched_objects();
    let (opted_in, opted_in_writer) = reflector::store();
    let opted_in_pods = reflector(
        opted_in_writer,
        watcher(
            scoped::<Pod>(&client, opts.namespace.as_deref()),
            watcher::Config::default().labels(&format!("{INJECT_LABEL}=true")),
        )
        .modify(pods::strip),
    )
    .default_backoff()
    .touched_objects();
    // The DB-side proxy Pods, to say why they do not run.
    let (proxies, proxies_writer) = reflector::store();
    let proxy_pods = reflector(
        proxies_writer,
        watcher(
            scoped::<Pod>(&client, opts.namespace.as_deref()),
            watcher::Config::default().labels(&format!(
                "app.kubernetes.io/component=db-side-proxy,app.kubernetes.io/managed-by={},{TOPOLOGY_LABEL}",
                render::FIELD_MANAGER
            )),
        )
        .modify(pods::strip_proxy),
    )
    .default_backoff()
    .touched_objects();
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Recorder::new(client.clone(), reporter),
            metrics.clone(),
        )
        .with_pods(PodStores {
            injected,
            opted_in,
            proxies,
        })
        .with_policy(render::Policy {
            service_types: opts.allowed_service_types.clone(),
            service_annotations: opts
                .allowed_service_annotations
                .iter()
                .map(|a| a.trim().to_owned())
                .filter(|a| !a.is_empty())
                .collect(),
        }),
    );
    Controller::new(topologies, watcher::Config::default().any_semantic())
        .watches_stream(injected_pods, |pod| {
            let topology = pod.labels().get(SIDECAR_LABEL)?.clone();
            Some(ObjectRef::new(&topology).within(&pod.namespace()?))
        })
        .watches_stream(opted_in_pods, |pod| {
            let topology = pod.annotations().get(TOPOLOGY_ANNOTATION)?.clone();
            Some(ObjectRef::new(&topology).within(&pod.namespace()?))
        })
        .watches_stream(proxy_pods, |pod| {
            let topology = pod.labels().get(TOPOLOGY_LABEL)?.clone();
            Some(ObjectRef::new(&topology).within(&pod.namespace()?))
        })
        .owns(
            scoped::<ConfigMap>(&client, opts.namespace.as_deref()),
            owned.clone(),
        )
        .owns(
            scoped::<StatefulSet>(&client, opts.namespace.as_deref()),
            owned.clone(),
        )
        .owns(
            scoped::<Service>(&client, opts.namespace.as_deref()),
            owned.clone(),
        )
        .owns(
            scoped::<PodDisruptionBudget>(&client, opts.namespace.as_deref()),
            owned,
        )
        // A burst of Pods asks for many reconciles of the same topology: take them together.
        .with_config(
            controller::Config::default()
                .concurrency(opts.concurrency)
                .debounce(Duration::from_millis(500)),
        )
        .graceful_shutdown_on(stop)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                match e {
                    // Reconcile errors are logged and counted by the error policy.
                    controller::Error::ReconcilerFailed(..) => {}
                    // A child changed after its topology was deleted: nothing to do.
                    controller::Error::ObjectNotFound(obj) => {
                        tracing::debug!(object = %obj, "the topology is gone")
                    }
                    other => warn!(error = %other, "controller"),
                }
            }
        })
        .await;
    metrics.set_leader(false);
    let lost_lease = lost.is_cancelled() && !shutdown.is_cancelled();
    shutdown.cancel();
    if let Some(renewer) = renewer {
        let mut lock = renewer.await.context("the lease task panicked")?;
        if !lost_lease {
            match lock.release().await {
                Ok(()) => info!("released the leader lease"),
                Err(e) => {
                    warn!(error = %e, "cannot release the leader lease; it expires by itself")
                }
            }
        }
    }
    server.await.ok();
    if lost_lease {
        bail!("lost the leader lease: stopped reconciling so that only one operator writes");
    }
    info!("stopped");
    Ok(())
}

fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Fails with a message saying how to install the CRD when it is missing.
async fn check_crd(client: &Client, namespace: Option<&str>) -> anyhow::Result<()> {
    let api: Api<ShotoverTopology> = scoped(client, namespace);
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => bail!(
            "the ShotoverTopology CRD (shotovertopologies.shotover.io) is not installed in this cluster; install it with\n  kubectl apply --server-side -f crds/shotovertopology.yaml\nor\n  shotover-operator crd | kubectl apply --server-side -f -"
        ),
        Err(kube::Error::Api(status)) if status.code == 403 => bail!(
            "not allowed to list ShotoverTopologies ({}): apply the operator's RBAC (install.yaml, or the chart charts/shotover) or run with --namespace to watch one namespace",
            status.message
        ),
        Err(e) => Err(e).context("cannot list ShotoverTopologies"),
    }?;
    check_schema_version(client).await
}

/// The installed CRD must be the schema this operator was built with: Helm installs a
/// chart's CRDs but never upgrades them, and an operator writing fields the apiserver
/// prunes (or reading fields it no longer has) would go wrong quietly.
async fn check_schema_version(client: &Client) -> anyhow::Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use shotover_crds::crd::{SCHEMA_VERSION_ANNOTATION, schema_version};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ours = schema_version();
    let installed = match crds
        .get_metadata_opt("shotovertopologies.shotover.io")
        .await
    {
        Ok(Some(meta)) => meta.annotations().get(SCHEMA_VERSION_ANNOTATION).cloned(),
        Ok(None) => None,
        Err(kube::Error::Api(status)) if status.code == 403 => {
            warn!(
                "cannot read the ShotoverTopology CRD to check its schema version ({}): grant get on customresourcedefinitions/shotovertopologies.shotover.io (the chart does)",
                status.message
            );
            return Ok(());
        }
        Err(e) => return Err(e).context("cannot read the ShotoverTopology CRD"),
    };
    same_schema(installed.as_deref(), &ours).map_err(|e| anyhow::anyhow!(e))?;
    info!(schema_version = %ours, "the installed CRD is this operator's schema");
    Ok(())
}

/// Whether the installed CRD's schema version (its annotation) is `ours`, else what to do.
pub fn same_schema(installed: Option<&str>, ours: &str) -> Result<(), String> {
    use shotover_crds::crd::SCHEMA_VERSION_ANNOTATION;
    let apply = "apply this version's CRD:\n  kubectl apply --server-side -f crds/shotovertopology.yaml\nor\n  shotover-operator crd | kubectl apply --server-side -f -\n(helm install and upgrade do not upgrade CRDs)";
    match installed {
        Some(version) if version == ours => Ok(()),
        Some(version) => Err(format!(
            "the installed ShotoverTopology CRD has schema version {version}, this operator's is {ours}: {apply}"
        )),
        None => Err(format!(
            "the installed ShotoverTopology CRD has no schema version (annotation {SCHEMA_VERSION_ANNOTATION}: installed by an older release), this operator's is {ours}: {apply}"
        )),
    }
}

#[cfg(test)]
mod schema_tests {
    #[test]
    fn the_installed_crd_must_be_this_operators_schema() {
        let ours = shotover_crds::crd::schema_version();
        assert_eq!(ours.len(), 16);
        assert_eq!(super::same_schema(Some(&ours), &ours), Ok(()));
        let older = super::same_schema(Some("0123456789abcdef"), &ours).expect_err("refused");
        assert!(
            older.starts_with(&format!(
                "the installed ShotoverTopology CRD has schema version 0123456789abcdef, this operator's is {ours}: apply this version's CRD"
            )),
            "{older}"
        );
        let none = super::same_schema(None, &ours).expect_err("refused");
        assert!(none.contains("has no schema version"), "{none}");
        // The checked-in CRD carries the version this build computes.
        let checked_in = include_str!("../../crds/shotovertopology.yaml");
        assert!(
            checked_in.contains(&format!("shotover.io/schema-version: {ours}")),
            "crds/shotovertopology.yaml is stale: cargo run -p shotover-operator -- crd > crds/shotovertopology.yaml"
        );
    }
}

/// Tries for the lease until it is ours (`true`) or shutdown is asked (`false`).
async fn campaign(lock: &mut LeaseLock, shutdown: &CancellationToken) -> bool {
    let retry = lock.timings().retry_period;
    loop {
        let attempt = tokio::time::timeout(retry * 5, lock.try_acquire_or_renew());
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            result = attempt => match result {
                Ok(Ok(true)) => return true,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => warn!(error = %e, "cannot read or take the leader lease"),
                Err(_) => warn!("the leader lease request timed out"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

/// Renews the lease every retry period; cancels `lost` if it cannot for the renew deadline
/// or someone else holds it. Returns the lock for releasing.
async fn keep_lease(
    mut lock: LeaseLock,
    shutdown: CancellationToken,
    lost: CancellationToken,
) -> LeaseLock {
    let timings = lock.timings();
    let mut renewed = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return lock,
            _ = tokio::time::sleep(timings.retry_period) => {}
        }
        let left = timings.renew_deadline.saturating_sub(renewed.elapsed());
        match tokio::time::timeout(
            left.max(Duration::from_millis(100)),
            lock.try_acquire_or_renew(),
        )
        .await
        {
            Ok(Ok(true)) => renewed = Instant::now(),
            Ok(Ok(false)) => {
                error!(
                    identity = lock.identity(),
                    "another replica holds the leader lease"
                );
                lost.cancel();
                return lock;
            }
            Ok(Err(e)) => warn!(error = %e, "cannot renew the leader lease"),
            Err(_) => warn!("renewing the leader lease timed out"),
        }
        if renewed.elapsed() >= timings.renew_deadline {
            error!(
                identity = lock.identity(),
                deadline_s = timings.renew_deadline.as_secs(),
                "could not renew the leader lease in time"
            );
            lost.cancel();
            return lock;
        }
    }
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "shotover-operator".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Cancels `shutdown` on SIGTERM or SIGINT.
pub async fn shutdown_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing the reconciles in progress"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: finishing the reconciles in progress"),
    }
    shutdown.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::ApiServer;

    #[tokio::test]
    async fn a_missing_crd_stops_the_start_with_how_to_install_it() {
        let (ctx, mut api) = ApiServer::context();
        let client = ctx.client.clone();
        let check = tokio::spawn(async move { check_crd(&client, Some("apps")).await });
        api.expect(
            "GET",
            "/apis/shotover.io/v1alpha1/namespaces/apps/shotovertopologies",
            404,
            Some(serde_json::json!(
                "the server could not find the requested resource"
            )),
        )
        .await;
        let message = check
            .await
            .expect("no panic")
            .expect_err("fails")
            .to_string();
        assert!(
            message.contains(
                "the ShotoverTopology CRD (shotovertopologies.shotover.io) is not installed"
            ) && message.contains("kubectl apply --server-side -f crds/shotovertopology.yaml"),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_forbidden_list_names_the_rbac_to_apply() {
        let (ctx, mut api) = ApiServer::context();
        let client = ctx.client.clone();
        let check = tokio::spawn(async move { check_crd(&client, None).await });
        api.expect(
            "GET",
            "/apis/shotover.io/v1alpha1/shotovertopologies",
            403,
            Some(serde_json::json!(
                "shotovertopologies.shotover.io is forbidden"
            )),
        )
        .await;
        let message = check
            .await
            .expect("no panic")
            .expect_err("fails")
            .to_string();
        assert!(message.contains("install.yaml"), "{message}");
    }
}

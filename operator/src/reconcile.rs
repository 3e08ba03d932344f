//! The reconciler: a thin shell around [`crate::render`] and [`crate::status`]. For one
//! `ShotoverTopology` it renders, server-side-applies what was rendered (one field manager,
//! owner references so deletion cascades), reads back the StatefulSet's progress, writes the
//! status and announces condition transitions as Events. An invalid topology touches nothing
//! but the status, so the last valid ConfigMap and StatefulSet keep running.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shotover_crds::crd::{PAUSED_ANNOTATION, ShotoverTopology, ShotoverTopologyStatus, names};
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::pods::PodStores;
use crate::render::{self, FIELD_MANAGER, Rendered};
use crate::reports::{self, Reports, Running, Target};
use crate::status::{self, ConfigOutcome, DbSideObservation, Observation, StatefulSetProgress};

/// How often a topology is reconciled when nothing changes (drift repair).
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon a topology whose Secret is missing is looked at again.
pub const SECRET_RECHECK: Duration = Duration::from_secs(10);
/// Error backoff per topology: doubles from the first value up to the last.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("applying {object}: {source}")]
    Apply {
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("deleting {object}: {source}")]
    Delete {
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("reading {object}: {source}")]
    Read {
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "{object} exists and is not this topology's (it has no ownerReference to it{owners}): not taken over; delete or rename it, or rename the topology"
    )]
    NotOwned { object: String, owners: String },
    #[error("writing the status: {0}")]
    StatusWrite(#[source] kube::Error),
    #[error("the topology has no namespace")]
    NoNamespace,
}

impl Error {
    /// Every value of [`Error::kind`], for the metrics.
    pub const KINDS: [&'static str; 6] = [
        "apply",
        "delete",
        "read",
        "not_owned",
        "status",
        "invalid_object",
    ];

    /// What failed, as the `kind` label of `shotover_operator_reconcile_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Delete { .. } => "delete",
            Error::Read { .. } => "read",
            Error::NotOwned { .. } => "not_owned",
            Error::StatusWrite(_) => "status",
            Error::NoNamespace => "invalid_object",
        }
    }

    /// The reason of the `Ready` and `Degraded` conditions it causes.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NotOwned { .. } => "NotOwned",
            _ => "ApplyFailed",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// Consecutive failures per topology, for the error backoff.
    failures: Mutex<HashMap<ObjectRef<ShotoverTopology>, u32>>,
    /// The application Pods, for the sidecar counts (`None`: not counted).
    pub pods: Option<PodStores>,
    /// What the proxies said they run.
    pub reports: Reports,
    /// What topologies may ask of the DB-side tier.
    pub policy: render::Policy,
}

impl Context {
    pub fn new(client: Client, recorder: Recorder, metrics: Arc<Metrics>) -> Self {
        Context {
            client,
            recorder,
            metrics,
            failures: Mutex::new(HashMap::new()),
            pods: None,
            reports: Reports::default(),
            policy: render::Policy::default(),
        }
    }

    /// Renders under this policy.
    pub fn with_policy(mut self, policy: render::Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Counts the sidecars of each topology from these Pod caches.
    pub fn with_pods(mut self, pods: PodStores) -> Self {
        self.pods = Some(pods);
        self
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<ShotoverTopology>, u32>> {
        self.failures.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn is_paused(topology: &ShotoverTopology) -> bool {
    topology
        .annotations()
        .get(PAUSED_ANNOTATION)
        .is_some_and(|v| v == "true")
}

pub async fn reconcile(
    topology: Arc<ShotoverTopology>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile();
    let namespace = topology.namespace().ok_or(Error::NoNamespace)?;
    let name = topology.name_any();
    let generation = topology.metadata.generation;
    let previous = topology.status.as_ref();
    let now = Time(Timestamp::now());

    if is_paused(&topology) {
        let (status, transitions) = status::paused(previous, generation, &now);
        write_status(&ctx, &topology, &namespace, previous, &status).await?;
        publish(&ctx, &topology, &transitions).await;
        debug!(%namespace, %name, "paused");
        return Ok(Action::await_change());
    }

    let port = topology.spec.observability_port;
    let rendered = render::render_with(&topology, &ctx.policy);
    // The configuration the proxies should run: this one, or the last valid one.
    let hash = match &rendered {
        Ok(rendered) => Some(rendered.hash.clone()),
        Err(_) => previous.and_then(|s| s.config_hash.clone()),
    };
    let mut obs = Observation {
        generation,
        pods: match &ctx.pods {
            Some(stores) => Some(ask_sidecars(&ctx, stores, &namespace, &name, port, &hash).await),
            None => None,
        },
        ..Observation::default()
    };
    let mut failure = None;
    match rendered {
        Ok(rendered) => {
            obs.config = ConfigOutcome::Valid {
                hash: rendered.hash.clone(),
                config_map: names::config_map(&name),
            };
            obs.valid_spec = serde_json::to_value(&topology.spec).ok();
            obs.secrets = missing_secrets(&ctx, &topology, &namespace).await;
            match apply_all(&ctx, &topology, &namespace, &rendered).await {
                Ok(db_side) => obs.db_side = db_side,
                Err(e) => {
                    obs.apply_error = Some(e.to_string());
                    obs.apply_reason = Some(e.reason());
                    failure = Some(e);
                }
            }
        }
        Err(invalid) => {
            obs.config = ConfigOutcome::Invalid {
                message: invalid.to_string(),
            };
            if let Some(db_side) = &topology.spec.db_side {
                let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &namespace);
                let object = names::db_side(&name);
                match api.get_opt(&object).await {
                    Ok(sts) => {
                        let (problems, waiting_for_node) = proxy_problems(&ctx, &namespace, &name);
                        obs.db_side = Some(DbSideObservation {
                            desired: db_side.replicas,
                            stateful_set: sts.as_ref().map(StatefulSetProgress::from_stateful_set),
                            problems,
                            waiting_for_node,
                            proxies: ask_proxies(&ctx, &namespace, &name, port, &hash).await,
                            selector: Some(render::selector_query(&name)),
                        })
                    }
                    Err(source) => {
                        let e = Error::Read {
                            object: format!("StatefulSet {namespace}/{object}"),
                            source,
                        };
                        obs.apply_error = Some(e.to_string());
                        failure = Some(e);
                    }
                }
            }
        }
    }

    let (status, transitions) = status::reconciled(previous, &obs, &now);
    match write_status(&ctx, &topology, &namespace, previous, &status).await {
        // Deleted while it was being reconciled: what was applied is collected with it.
        Err(Error::StatusWrite(kube::Error::Api(e))) if e.code == 404 => {
            debug!(%namespace, %name, "the topology was deleted during its reconcile");
            return Ok(Action::await_change());
        }
        other => other?,
    }
    publish(&ctx, &topology, &transitions).await;
    if let Some(e) = failure {
        return Err(e);
    }
    ctx.failures().remove(&ObjectRef::from(topology.as_ref()));
    // A proxy behind the configuration, or silent: ask again soon (the kubelet updates a
    // mounted ConfigMap within its sync period, and nothing announces it).
    if status::proxies_behind(&obs, &status) {
        return Ok(Action::requeue(reports::RECHECK));
    }
    // A Secret to wait for: Secrets are not watched (the operator may only get them).
    if !obs.secrets.is_empty() {
        return Ok(Action::requeue(SECRET_RECHECK));
    }
    // A proxy waiting for a node: look again once its grace is over (nothing else may change).
    if obs.db_side.as_ref().is_some_and(|d| d.waiting_for_node) {
        return Ok(Action::requeue(Duration::from_secs(
            crate::pods::UNSCHEDULABLE_GRACE_SECONDS as u64 + 1,
        )));
    }
    Ok(Action::requeue(RESYNC))
}

/// Requeues a failed topology with its own exponential backoff.
pub fn error_policy(topology: Arc<ShotoverTopology>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.error(error.kind());
    let failures = {
        let mut map = ctx.failures();
        let n = map.entry(ObjectRef::from(topology.as_ref())).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    warn!(
        namespace = topology.namespace().unwrap_or_default(),
        name = topology.name_any(),
        error = %error,
        failures,
        retry_in_s = delay.as_secs_f64(),
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// The delay before retry number `failures`: 1 s, 2 s, 4 s ... up to 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    BACKOFF_FIRST.saturating_mul(factor).min(BACKOFF_MAX)
}

async fn apply_all(
    ctx: &Context,
    topology: &ShotoverTopology,
    namespace: &str,
    rendered: &Rendered,
) -> Result<Option<DbSideObservation>, Error> {
    apply_ours(ctx, topology, namespace, &rendered.config_map).await?;
    let name = topology.name_any();
    let Some(objects) = &rendered.db_side else {
        // dbSide was removed: the tier it ran goes too (only what this topology owns).
        if may_have_a_tier(topology) {
            let db_side = names::db_side(&name);
            delete_owned::<StatefulSet>(ctx, topology, namespace, &db_side).await?;
            delete_owned::<Service>(ctx, topology, namespace, &db_side).await?;
            delete_owned::<Service>(ctx, topology, namespace, &names::headless_service(&name))
                .await?;
            delete_owned::<PodDisruptionBudget>(ctx, topology, namespace, &db_side).await?;
            info!(%namespace, %name, "dbSide removed: deleted the proxy tier");
        }
        return Ok(None);
    };
    apply_ours(ctx, topology, namespace, &objects.headless_service).await?;
    apply_ours(ctx, topology, namespace, &objects.client_service).await?;
    let sts = apply_ours(ctx, topology, namespace, &objects.stateful_set).await?;
    match &objects.pod_disruption_budget {
        Some(pdb) => {
            apply_ours(ctx, topology, namespace, pdb).await?;
        }
        None => {
            delete_owned::<PodDisruptionBudget>(ctx, topology, namespace, &names::db_side(&name))
                .await?
        }
    }
    let desired = topology.spec.db_side.as_ref().map_or(0, |d| d.replicas);
    let (problems, waiting_for_node) = proxy_problems(ctx, namespace, &name);
    let port = topology.spec.observability_port;
    Ok(Some(DbSideObservation {
        desired,
        stateful_set: Some(StatefulSetProgress::from_stateful_set(&sts)),
        problems,
        waiting_for_node,
        proxies: ask_proxies(ctx, namespace, &name, port, &Some(rendered.hash.clone())).await,
        selector: Some(render::selector_query(&name)),
    }))
}

/// The Secrets of `spec.tlsSecrets` that do not exist, or cannot be read, as sentences. Only
/// their metadata is asked for: the operator never reads what a Secret holds.
async fn missing_secrets(
    ctx: &Context,
    topology: &ShotoverTopology,
    namespace: &str,
) -> Vec<String> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut missing = Vec::new();
    for secret in &topology.spec.tls_secrets {
        let name = &secret.secret_name;
        match api.get_metadata_opt(name).await {
            Ok(Some(_)) => {}
            Ok(None) => missing.push(format!(
                "Secret {namespace}/{name} (spec.tlsSecrets) does not exist: the proxies that mount it do not start until it does"
            )),
            Err(e) => missing.push(format!(
                "cannot check Secret {namespace}/{name} (spec.tlsSecrets): {e}"
            )),
        }
    }
    missing
}

/// The application Pods of the topology, each with what its sidecar says it runs.
async fn ask_sidecars(
    ctx: &Context,
    stores: &PodStores,
    namespace: &str,
    name: &str,
    port: i32,
    hash: &Option<String>,
) -> Vec<status::PodObservation> {
    let mut pods = stores.observe(namespace, name, port);
    let targets: Vec<Target> = pods
        .iter()
        .map(|p| Target {
            key: format!("{namespace}/{}", p.name),
            // A Pod without its sidecar has nothing to ask.
            address: p.address.filter(|_| p.injected_hash.is_some()),
        })
        .collect();
    let answers = ask(ctx, &targets, hash).await;
    for (pod, running) in pods.iter_mut().zip(answers) {
        pod.running = running;
    }
    pods
}

/// The DB-side proxy Pods of the topology, each with what it says it runs.
async fn ask_proxies(
    ctx: &Context,
    namespace: &str,
    name: &str,
    port: i32,
    hash: &Option<String>,
) -> Vec<(String, Running)> {
    let Some(stores) = &ctx.pods else {
        return Vec::new();
    };
    let (names, targets): (Vec<String>, Vec<Target>) = stores
        .proxy_targets(namespace, name, port)
        .into_iter()
        .unzip();
    names
        .into_iter()
        .zip(ask(ctx, &targets, hash).await)
        .collect()
}

async fn ask(ctx: &Context, targets: &[Target], hash: &Option<String>) -> Vec<Running> {
    match hash {
        Some(hash) => ctx.reports.ask(targets, hash).await,
        // Nothing valid was ever rendered: no proxy runs anything of this topology.
        None => vec![Running::NotStarted; targets.len()],
    }
}

/// Whether objects of a DB-side tier may exist for a topology without `dbSide`, so that
/// they are looked for (by name, deleted if this topology owns them): the last status says
/// it ran one, or it was written for another generation (the tier may have been applied
/// since, its status write failing), or the last reconcile failed (a delete among them).
/// A topology that never had a tier costs no request.
fn may_have_a_tier(topology: &ShotoverTopology) -> bool {
    let Some(status) = topology.status.as_ref() else {
        return false;
    };
    let failed = status.conditions.iter().any(|c| {
        c.type_ == status::DEGRADED && c.status == "True" && c.reason != "InvalidTopology"
    });
    status.replicas.is_some()
        || status.selector.is_some()
        || status.observed_generation != topology.metadata.generation
        || failed
}

/// Why the proxy Pods do not run, and whether one waits for a node within its grace.
fn proxy_problems(ctx: &Context, namespace: &str, name: &str) -> (Vec<String>, bool) {
    let now = Timestamp::now().as_second();
    ctx.pods
        .as_ref()
        .map(|p| p.proxy_problems(namespace, name, now))
        .unwrap_or_default()
}

/// [`apply`], unless the object exists and is not this topology's: the operator never
/// takes over an object someone else made (a ConfigMap or Service of the same name), which
/// server-side apply with `force` would otherwise do.
async fn apply_ours<K>(
    ctx: &Context,
    topology: &ShotoverTopology,
    namespace: &str,
    object: &K,
) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    let described = format!("{} {namespace}/{name}", K::kind(&()));
    let existing = api.get_opt(&name).await.map_err(|source| Error::Read {
        object: described.clone(),
        source,
    })?;
    if let Some(existing) = existing
        && !owned_by(existing.meta(), topology)
    {
        let owners: Vec<String> = existing
            .meta()
            .owner_references
            .iter()
            .flatten()
            .map(|o| format!("{} {}", o.kind, o.name))
            .collect();
        return Err(Error::NotOwned {
            object: described,
            owners: if owners.is_empty() {
                String::new()
            } else {
                format!("; its owners: {}", owners.join(", "))
            },
        });
    }
    apply(&ctx.client, namespace, object).await
}

/// Whether `meta` names the topology (by uid) among its owners.
fn owned_by(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    topology: &ShotoverTopology,
) -> bool {
    let uid = topology.uid();
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| Some(&o.uid) == uid.as_ref())
}

/// Server-side apply with the operator's field manager, taking over conflicting fields.
async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map_err(|source| Error::Apply {
        object: format!("{} {namespace}/{name}", K::kind(&())),
        source,
    })
}

/// Deletes `name` if it exists and the topology owns it (never someone else's object).
async fn delete_owned<K>(
    ctx: &Context,
    topology: &ShotoverTopology,
    namespace: &str,
    name: &str,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), namespace);
    let object = format!("{} {namespace}/{name}", K::kind(&()));
    let Some(existing) = api.get_opt(name).await.map_err(|source| Error::Read {
        object: object.clone(),
        source,
    })?
    else {
        return Ok(());
    };
    if !owned_by(existing.meta(), topology) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete { object, source }),
    }
}

/// Server-side applies the status, unless it is what the apiserver already has.
async fn write_status(
    ctx: &Context,
    topology: &ShotoverTopology,
    namespace: &str,
    previous: Option<&ShotoverTopologyStatus>,
    status: &ShotoverTopologyStatus,
) -> Result<(), Error> {
    if previous == Some(status) {
        return Ok(());
    }
    let api: Api<ShotoverTopology> = Api::namespaced(ctx.client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": "shotover.io/v1alpha1",
        "kind": "ShotoverTopology",
        "status": status,
    });
    api.patch_status(
        &topology.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::StatusWrite)?;
    Ok(())
}

/// One Event per condition transition. A failed Event is logged, not retried: the status
/// already says the same.
async fn publish(ctx: &Context, topology: &ShotoverTopology, transitions: &[status::Transition]) {
    let reference = topology.object_ref(&());
    for t in transitions {
        let event = Event {
            type_: if t.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: t.reason.clone(),
            note: Some(truncate_note(&format!(
                "{} is {}: {}",
                t.type_, t.status, t.message
            ))),
            action: format!("Set{}", t.type_),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            warn!(error = %e, reason = %t.reason, "cannot publish an Event");
        }
    }
}

/// Event notes are limited to 1 kB: longer ones are cut, with `...`.
pub fn truncate_note(note: &str) -> String {
    if note.len() <= 1000 {
        return note.to_owned();
    }
    let mut cut = 997;
    while !note.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}...", &note[..cut])
}

#[cfg(test)]
mod tests;

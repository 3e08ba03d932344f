//! `POST /inject`: reads an `AdmissionReview`, decides with [`crate::inject`], answers with a
//! JSON patch, a refusal or nothing, and records why in metrics and Events. Dry-run requests
//! get the same answer without Events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State as AxumState};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::api::{Api, PartialObjectMeta};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use shotover_crds::crd::ShotoverTopology;
use shotover_operator::reconcile::truncate_note;
use shotover_operator::render::{render, source_ports};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::inject::{self, NamespaceMeta, Refusal, Refuse, RenderedTopology, Settings, Skip};
use crate::metrics::{Metrics, Outcome};

/// Largest admission request read (a Pod is at most about 1.5 MiB in etcd).
const BODY_LIMIT: usize = 4 * 1024 * 1024;

type RenderCache = HashMap<(String, String), (String, Lookup)>;

/// What the handler reads.
pub struct State {
    pub client: Client,
    pub own_namespace: String,
    pub native_sidecar: Arc<AtomicBool>,
    /// `--allowed-image`: what the image override annotation may name (empty: anything).
    pub allowed_images: Vec<String>,
    pub topologies: Store<ShotoverTopology>,
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Rendered topologies by (namespace, name), with the resourceVersion they came from.
    pub rendered: Mutex<RenderCache>,
    pub metrics: Arc<Metrics>,
    pub events: mpsc::Sender<PendingEvent>,
}

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/inject", post(admit))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

async fn admit(AxumState(state): AxumState<Arc<State>>, body: Bytes) -> Response {
    let start = Instant::now();
    let review: AdmissionReview<Pod> = match serde_json::from_slice(&body) {
        Ok(review) => review,
        Err(e) => {
            // Maybe a valid review of something that is not a Pod: answer it, untouched.
            return match serde_json::from_slice::<AdmissionReview<DynamicObject>>(&body)
                .ok()
                .and_then(|r| TryInto::<AdmissionRequest<DynamicObject>>::try_into(r).ok())
            {
                Some(req)
                    if req.kind.kind == "ShotoverTopology"
                        && req.operation == Operation::Delete =>
                {
                    json(topology_delete(&state, &req).into_review())
                }
                // A Pod to create that does not read as a Pod: refused as malformed, never
                // admitted without the sidecar it may have asked for.
                Some(req)
                    if req.kind.kind == "Pod"
                        && req.operation == Operation::Create
                        && req.sub_resource.is_none() =>
                {
                    let message = format!("the Pod does not parse: {e}");
                    state.metrics.admission(
                        Outcome::Refused(Refuse::Malformed),
                        req.dry_run,
                        start.elapsed().as_secs_f64(),
                    );
                    info!(
                        namespace = req.namespace.as_deref().unwrap_or_default(),
                        reason = Refuse::Malformed.as_str(),
                        "refused: {message}"
                    );
                    let mut response = AdmissionResponse::from(&req).deny(&message);
                    response.result.code = 400;
                    response.result.reason = Refuse::Malformed.as_str().to_owned();
                    json(response.into_review())
                }
                Some(req) => {
                    state.metrics.admission(
                        Outcome::Skipped(Skip::NotPodCreate),
                        req.dry_run,
                        start.elapsed().as_secs_f64(),
                    );
                    json(AdmissionResponse::from(&req).into_review())
                }
                None => (
                    StatusCode::BAD_REQUEST,
                    format!("not an AdmissionReview: {e}"),
                )
                    .into_response(),
            };
        }
    };
    let req: AdmissionRequest<Pod> = match review.try_into() {
        Ok(req) => req,
        Err(_) => {
            return (
                StatusCode::BAD_REQUEST,
                "the AdmissionReview has no request",
            )
                .into_response();
        }
    };
    if req.kind.kind == "ShotoverTopology" && req.operation == Operation::Delete {
        return json(topology_delete(&state, &req).into_review());
    }
    let decision = match decide(&state, &req).await {
        Ok(decision) => decision,
        // Not the Pod's fault and not the topology's: the webhook's failurePolicy decides.
        Err(error) => {
            state.metrics.admission(
                Outcome::ApiserverError,
                req.dry_run,
                start.elapsed().as_secs_f64(),
            );
            warn!(pod = %pod_display_name(&req), namespace = req.namespace.as_deref().unwrap_or_default(), %error, "answering HTTP 500: the apiserver could not be read");
            return (StatusCode::INTERNAL_SERVER_ERROR, error).into_response();
        }
    };
    let elapsed = start.elapsed().as_secs_f64();
    state
        .metrics
        .admission(decision.outcome, req.dry_run, elapsed);
    let pod_name = pod_display_name(&req);
    let namespace = req.namespace.clone().unwrap_or_default();
    match decision.outcome {
        Outcome::Injected => {
            info!(pod = %pod_name, %namespace, dry_run = req.dry_run, micros = (elapsed * 1e6) as u64, "{}", decision.message)
        }
        Outcome::Refused(reason) => {
            info!(pod = %pod_name, %namespace, dry_run = req.dry_run, reason = reason.as_str(), "refused: {}", decision.message)
        }
        Outcome::Skipped(skip) if skip.asked() => {
            info!(pod = %pod_name, %namespace, reason = skip.as_str(), "{}", decision.message)
        }
        Outcome::Skipped(skip) => {
            debug!(pod = %pod_name, %namespace, reason = skip.as_str(), "skipped")
        }
        Outcome::ApiserverError => {}
    }
    if !req.dry_run
        && let Some(event) = decision.event
        && state.events.try_send(event).is_err()
    {
        debug!("the Event queue is full: Event dropped");
    }
    json(decision.response.into_review())
}

fn json<T: serde::Serialize>(value: T) -> Response {
    match serde_json::to_vec(&value) {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The Pod's name, or its `generateName` with `*` (a Deployment's Pods have no name yet).
fn pod_display_name(req: &AdmissionRequest<Pod>) -> String {
    let meta = req.object.as_ref().map(|p| &p.metadata);
    meta.and_then(|m| m.name.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| {
            meta.and_then(|m| m.generate_name.clone())
                .map(|g| format!("{g}*"))
        })
        .unwrap_or_else(|| req.name.clone())
}

struct Decision {
    response: AdmissionResponse,
    outcome: Outcome,
    message: String,
    event: Option<PendingEvent>,
}

/// The delete of a topology is allowed, always (the ValidatingWebhookConfiguration sends
/// it); while Pods still run the topology as a sidecar, as the operator last counted them in
/// its status, with a warning saying what follows.
fn topology_delete<T: kube::Resource + serde::Serialize>(
    state: &State,
    req: &AdmissionRequest<T>,
) -> AdmissionResponse {
    let mut response = AdmissionResponse::from(req);
    let namespace = req.namespace.clone().unwrap_or_default();
    // The object being deleted, as the apiserver has it; else this webhook's cache.
    let topology = req
        .old_object
        .as_ref()
        .and_then(|o| serde_json::to_value(o).ok())
        .and_then(|v| serde_json::from_value::<ShotoverTopology>(v).ok())
        .map(Arc::new)
        .or_else(|| {
            state
                .topologies
                .get(&ObjectRef::new(&req.name).within(&namespace))
        });
    let injected = topology
        .and_then(|t| t.status.as_ref()?.sidecars.as_ref().map(|s| s.injected))
        .unwrap_or(0);
    if injected > 0 {
        let pods = if injected == 1 {
            "1 Pod".to_owned()
        } else {
            format!("{injected} Pods")
        };
        info!(%namespace, topology = %req.name, injected, "a topology still run by Pods is being deleted");
        response.warnings = Some(vec![format!(
            "ShotoverTopology {namespace}/{} still runs as a sidecar in {pods}: its ConfigMap, which their sidecars mount, goes with it, and new Pods naming it will be refused until it exists again",
            req.name
        )]);
    }
    response
}

/// The decision on one request; `Err` when the apiserver could not be read to make it.
async fn decide(state: &State, req: &AdmissionRequest<Pod>) -> Result<Decision, String> {
    let allow = AdmissionResponse::from(req);
    let skip = |skip: Skip| Decision {
        response: AdmissionResponse::from(req),
        outcome: Outcome::Skipped(skip),
        message: skip.message().to_owned(),
        event: None,
    };
    let Some(pod) = req.object.as_ref() else {
        return Ok(skip(Skip::NotPodCreate));
    };
    if req.operation != Operation::Create || req.kind.kind != "Pod" || req.sub_resource.is_some() {
        return Ok(skip(Skip::NotPodCreate));
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    let ns = state.namespace_meta(&namespace).await?;
    let settings = Settings {
        own_namespace: state.own_namespace.clone(),
        native_sidecar_default: state.native_sidecar.load(Ordering::Relaxed),
        allowed_images: state.allowed_images.clone(),
    };
    let pod_name = pod_display_name(req);
    let owner = owner_reference(pod, &namespace);
    let refuse = |refusal: Refusal, topology: Option<ObjectReference>| {
        let event = owner.clone().or(topology).map(|reference| PendingEvent {
            reference,
            warning: true,
            reason: "SidecarInjectionRefused",
            note: format!("Pod {pod_name} refused: {}", refusal.message),
        });
        let mut response = AdmissionResponse::from(req).deny(&refusal.message);
        response.result.code = 403;
        response.result.reason = refusal.reason.as_str().to_owned();
        Decision {
            response,
            outcome: Outcome::Refused(refusal.reason),
            message: refusal.message,
            event,
        }
    };
    let selected = match inject::select(pod, &namespace, &ns, &settings) {
        Err(refusal) => return Ok(refuse(refusal, None)),
        Ok(Err(s)) => {
            let mut decision = skip(s);
            if s.asked() {
                decision.response.warnings = Some(vec![s.message().to_owned()]);
                decision.event = owner.clone().map(|reference| PendingEvent {
                    reference,
                    warning: true,
                    reason: "SidecarNotInjected",
                    note: format!("Pod {pod_name}: {}", s.message()),
                });
            }
            return Ok(decision);
        }
        Ok(Ok(selected)) => selected,
    };
    let rendered = match state.topology(&namespace, &selected.topology).await? {
        None => {
            return Ok(refuse(
                Refusal::new(
                    Refuse::TopologyNotFound,
                    format!(
                        "ShotoverTopology {namespace}/{} (named by the annotation shotover.io/topology) does not exist",
                        selected.topology
                    ),
                ),
                None,
            ));
        }
        Some(rendered) => rendered,
    };
    let rendered = match rendered.as_ref() {
        Err((message, reference)) => {
            return Ok(refuse(
                Refusal::new(
                    Refuse::TopologyInvalid,
                    format!(
                        "ShotoverTopology {namespace}/{} is invalid: {message}",
                        selected.topology
                    ),
                ),
                Some(reference.clone()),
            ));
        }
        Ok(rendered) => rendered,
    };
    let (rendered, invalid_now) = (&rendered.rendered, &rendered.invalid_now);
    // Someone else's invalid edit does not block the app: the last valid configuration (the
    // one in the operator's ConfigMap) is injected, with a warning.
    let fallback = invalid_now.as_ref().map(|message| {
        format!(
            "ShotoverTopology {namespace}/{} is invalid ({message}): injected its last valid configuration, hash {}",
            selected.topology, rendered.hash
        )
    });
    Ok(match inject::inject(pod, &ns, rendered, &settings) {
        Err(refusal) => refuse(refusal, Some(rendered.topology.object_ref(&()))),
        Ok(injection) => {
            let message = format!(
                "injected the shotover sidecar (ShotoverTopology {}, config {}, {})",
                selected.topology,
                injection.hash,
                if injection.native_sidecar {
                    "native sidecar"
                } else {
                    "first container"
                }
            );
            let response = match serde_json::from_value::<json_patch::Patch>(
                serde_json::Value::Array(injection.patch),
            )
            .map_err(|e| e.to_string())
            .and_then(|patch| allow.with_patch(patch).map_err(|e| e.to_string()))
            {
                Ok(mut response) => {
                    let mut warnings = injection.warnings;
                    warnings.extend(fallback.clone());
                    if !warnings.is_empty() {
                        response.warnings = Some(warnings);
                    }
                    response
                }
                Err(e) => {
                    return Ok(refuse(
                        Refusal::new(Refuse::Malformed, format!("cannot build the patch: {e}")),
                        None,
                    ));
                }
            };
            let message = match &fallback {
                Some(fallback) => format!("{message}; {fallback}"),
                None => message,
            };
            // With the last valid configuration, the Warning goes to the topology (whose
            // edit is at fault) when the Pod has no controller.
            let event = match fallback {
                None => owner.map(|reference| PendingEvent {
                    reference,
                    warning: false,
                    reason: "SidecarInjected",
                    note: format!("Pod {pod_name}: {message}"),
                }),
                Some(_) => Some(PendingEvent {
                    reference: owner.unwrap_or_else(|| rendered.topology.object_ref(&())),
                    warning: true,
                    reason: "SidecarInjectedLastValidConfig",
                    note: format!("Pod {pod_name}: {message}"),
                }),
            };
            Decision {
                response,
                outcome: Outcome::Injected,
                event,
                message,
            }
        }
    })
}

/// The Pod's controller (ReplicaSet, Job, StatefulSet...), which Events are about: the Pod
/// itself does not exist yet.
fn owner_reference(pod: &Pod, namespace: &str) -> Option<ObjectReference> {
    let owner = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))?;
    Some(ObjectReference {
        api_version: Some(owner.api_version.clone()),
        kind: Some(owner.kind.clone()),
        name: Some(owner.name.clone()),
        namespace: Some(namespace.to_owned()),
        uid: Some(owner.uid.clone()),
        ..ObjectReference::default()
    })
}

/// A topology to inject: rendered from its spec, or from its last valid spec while the
/// current one is invalid (`invalid_now` says why).
pub struct Usable {
    pub rendered: RenderedTopology,
    pub invalid_now: Option<String>,
}

/// A usable topology, or why it is invalid and has no last valid spec (with a reference
/// for the Event).
pub type Lookup = Arc<Result<Usable, (String, ObjectReference)>>;

impl State {
    /// The namespace's labels and annotations; `Err` when the apiserver cannot be read.
    async fn namespace_meta(&self, namespace: &str) -> Result<NamespaceMeta, String> {
        let meta = match self.namespaces.get(&ObjectRef::new(namespace)) {
            Some(ns) => Some(ns.metadata.clone()),
            // Created a moment ago and not in the cache yet: ask.
            None => Api::<Namespace>::all(self.client.clone())
                .get_metadata_opt(namespace)
                .await
                .map_err(|e| format!("cannot read Namespace {namespace}: {e}"))?
                .map(|ns| ns.metadata),
        };
        let meta = meta.unwrap_or_default();
        Ok(NamespaceMeta {
            labels: meta.labels.unwrap_or_default(),
            annotations: meta.annotations.unwrap_or_default(),
        })
    }

    /// The topology, rendered (once per resourceVersion); `None` when it does not exist,
    /// `Err` when the apiserver cannot be read.
    async fn topology(&self, namespace: &str, name: &str) -> Result<Option<Lookup>, String> {
        let topology = match self.topologies.get(&ObjectRef::new(name).within(namespace)) {
            Some(t) => t,
            // Created a moment ago and not in the cache yet: ask.
            None => match Api::<ShotoverTopology>::namespaced(self.client.clone(), namespace)
                .get_opt(name)
                .await
            {
                Ok(Some(t)) => Arc::new(t),
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(format!(
                        "cannot read ShotoverTopology {namespace}/{name}: {e}"
                    ));
                }
            },
        };
        let version = topology
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        let key = (namespace.to_owned(), name.to_owned());
        let mut cache = self.rendered.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((v, rendered)) = cache.get(&key)
            && *v == version
        {
            return Ok(Some(rendered.clone()));
        }
        let rendered: Lookup = Arc::new(match render(&topology) {
            Ok(r) => Ok(Usable {
                rendered: RenderedTopology {
                    sources: source_ports(&topology),
                    hash: r.hash,
                    topology: (*topology).clone(),
                },
                invalid_now: None,
            }),
            Err(e) => match last_valid(&topology) {
                Some(rendered) => Ok(Usable {
                    rendered,
                    invalid_now: Some(e.to_string()),
                }),
                None => Err((e.to_string(), topology.object_ref(&()))),
            },
        });
        cache.insert(key, (version, rendered.clone()));
        Ok(Some(rendered))
    }
}

/// The topology as its last valid spec (`status.lastValidSpec`, kept by the operator)
/// renders it: the configuration the operator's ConfigMap still holds.
fn last_valid(topology: &ShotoverTopology) -> Option<RenderedTopology> {
    let spec = topology.status.as_ref()?.last_valid_spec.clone()?;
    let spec = serde_json::from_value(spec).ok()?;
    let last = ShotoverTopology {
        metadata: topology.metadata.clone(),
        spec,
        status: topology.status.clone(),
    };
    let rendered = render(&last).ok()?;
    Some(RenderedTopology {
        sources: source_ports(&last),
        hash: rendered.hash,
        topology: last,
    })
}

/// An Event to publish off the request path.
#[derive(Debug, Clone)]
pub struct PendingEvent {
    pub reference: ObjectReference,
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// Publishes Events one at a time from a bounded queue (a burst of Pods drops Events rather
/// than slowing admission).
pub fn spawn_event_sender(recorder: Recorder) -> mpsc::Sender<PendingEvent> {
    let (tx, mut rx) = mpsc::channel::<PendingEvent>(1024);
    tokio::spawn(async move {
        while let Some(pending) = rx.recv().await {
            let event = Event {
                type_: if pending.warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: pending.reason.to_owned(),
                note: Some(truncate_note(&pending.note)),
                action: "InjectSidecar".to_owned(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &pending.reference).await {
                debug!(error = %e, reason = pending.reason, "cannot publish an Event");
            }
        }
    });
    tx
}

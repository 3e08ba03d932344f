//! The injection decision and the JSON patch: pure functions from a Pod, its namespace and
//! its topology to "leave it alone (why)", "refuse it (why)" or "add this".
//!
//! Decisions, in order:
//! 1. Only Pod CREATE requests are looked at; anything else is allowed untouched.
//! 2. The Pod opts in with the label `shotover.io/inject: "true"`, or its namespace does with
//!    the same label (a Pod label `"false"` then opts out). Pods that did not opt in are never
//!    refused.
//! 3. Excluded whatever the selectors say: `kube-system`, `kube-public`, `kube-node-lease`, the
//!    webhook's own namespace, and `hostNetwork` Pods (the sidecar's ports would be the node's).
//! 4. A Pod that already has the sidecar (our status annotation, or a container named
//!    `shotover`) is left as it is: reinvocation and re-submitted Pods are no-ops.
//! 5. The topology named by `shotover.io/topology` (Pod, else namespace annotation) must exist
//!    in the Pod's namespace and be valid; the overrides must be valid; the sidecar's ports and
//!    volume must not collide with the Pod's. Otherwise the Pod is refused, saying why.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, Pod,
    Probe, Volume,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Value, json};
use shotover_crds::crd::{
    CONFIG_HASH_ANNOTATION, INJECT_LABEL, SIDECAR_LABEL, STATUS_ANNOTATION, ShotoverTopology,
    TOPOLOGY_ANNOTATION, names,
};
use shotover_operator::render::{
    CONFIG_VOLUME, CONTAINER, ProxySettings, SourcePort, proxy_container,
};

use crate::overrides::{self, Overrides};

/// Namespaces never injected, whatever their labels.
pub const SYSTEM_NAMESPACES: [&str; 3] = ["kube-system", "kube-public", "kube-node-lease"];
/// The annotation `kubectl logs`/`exec` read to pick a container when none is named.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// User and group the sidecar runs as.
pub const SIDECAR_UID: i64 = 65532;

/// Why a Pod was left alone. `as_str` is the metric label and the Event reason's detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a Pod CREATE (the webhook configuration should not send these).
    NotPodCreate,
    /// Neither the Pod nor its namespace has `shotover.io/inject: "true"`.
    NotOptedIn,
    /// The namespace opted in, the Pod has `shotover.io/inject: "false"`.
    OptedOut,
    /// A system namespace or the webhook's own.
    ExcludedNamespace,
    HostNetwork,
    /// Our status annotation is there: injected before (reinvocation, re-submission).
    AlreadyInjected,
    /// The Pod declares a container named `shotover` itself.
    ContainerExists,
}

impl Skip {
    pub const ALL: [Skip; 7] = [
        Skip::NotPodCreate,
        Skip::NotOptedIn,
        Skip::OptedOut,
        Skip::ExcludedNamespace,
        Skip::HostNetwork,
        Skip::AlreadyInjected,
        Skip::ContainerExists,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotPodCreate => "not-pod-create",
            Skip::NotOptedIn => "not-opted-in",
            Skip::OptedOut => "opted-out",
            Skip::ExcludedNamespace => "excluded-namespace",
            Skip::HostNetwork => "host-network",
            Skip::AlreadyInjected => "already-injected",
            Skip::ContainerExists => "container-exists",
        }
    }

    /// Whether the Pod asked for injection (so the skip deserves an Event and a warning).
    pub fn asked(self) -> bool {
        matches!(
            self,
            Skip::ExcludedNamespace | Skip::HostNetwork | Skip::ContainerExists
        )
    }

    pub fn message(self) -> &'static str {
        match self {
            Skip::NotPodCreate => "not a Pod CREATE request",
            Skip::NotOptedIn => "the Pod did not opt in",
            Skip::OptedOut => "the Pod opted out with shotover.io/inject: \"false\"",
            Skip::ExcludedNamespace => {
                "shotover sidecar not injected: Pods in this namespace are never injected"
            }
            Skip::HostNetwork => {
                "shotover sidecar not injected: hostNetwork Pods are never injected (the proxy would listen on the node's ports)"
            }
            Skip::AlreadyInjected => "the sidecar is already injected",
            Skip::ContainerExists => {
                "shotover sidecar not injected: the Pod already declares a container named shotover"
            }
        }
    }
}

/// Why a Pod that asked for injection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    /// Opted in, but no `shotover.io/topology` on the Pod or its namespace.
    NoTopology,
    TopologyNotFound,
    TopologyInvalid,
    InvalidOverride,
    /// The sidecar's ports or volume collide with the Pod's.
    Conflict,
    /// The request could not be read.
    Malformed,
}

impl Refuse {
    pub const ALL: [Refuse; 6] = [
        Refuse::NoTopology,
        Refuse::TopologyNotFound,
        Refuse::TopologyInvalid,
        Refuse::InvalidOverride,
        Refuse::Conflict,
        Refuse::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refuse::NoTopology => "no-topology",
            Refuse::TopologyNotFound => "topology-not-found",
            Refuse::TopologyInvalid => "topology-invalid",
            Refuse::InvalidOverride => "invalid-override",
            Refuse::Conflict => "conflict",
            Refuse::Malformed => "malformed",
        }
    }
}

/// A refusal and its message (which the client sees).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Refuse,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Refuse, message: impl Into<String>) -> Self {
        Refusal {
            reason,
            message: message.into(),
        }
    }
}

/// The webhook's view of the cluster, fixed at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The webhook's own namespace (never injected).
    pub own_namespace: String,
    /// Whether the cluster runs native sidecars, when neither the Pod nor the topology says.
    pub native_sidecar_default: bool,
    /// Images the `shotover.io/proxy-image` annotation may name (empty: any). An entry is a
    /// repository (`registry.example.com/shotover`, any tag or digest of it), or a prefix
    /// ending in `/` (`registry.example.com/platform/`, every repository under it).
    pub allowed_images: Vec<String>,
}

/// Whether `image` is allowed by `allowed` (see [`Settings::allowed_images`]).
pub fn image_allowed(image: &str, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    // The repository: without a digest, and without a tag (a `:` after the last `/`; one
    // before it is a registry's port).
    let repository = image.split('@').next().unwrap_or(image);
    let repository = match repository.rfind(':') {
        Some(colon) if !repository[colon..].contains('/') => &repository[..colon],
        _ => repository,
    };
    allowed.iter().any(|entry| {
        if entry.ends_with('/') {
            repository.starts_with(entry.as_str())
        } else {
            repository == entry
        }
    })
}

/// The namespace's labels and annotations (empty when unknown).
#[derive(Debug, Clone, Default)]
pub struct NamespaceMeta {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// A Pod that opted in, and the topology it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    pub topology: String,
}

/// Step 1: whether the Pod is to be injected, and with which topology.
pub fn select(
    pod: &Pod,
    namespace: &str,
    ns: &NamespaceMeta,
    settings: &Settings,
) -> Result<Result<Selected, Skip>, Refusal> {
    let empty = BTreeMap::new();
    let labels = pod.metadata.labels.as_ref().unwrap_or(&empty);
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    match labels.get(INJECT_LABEL).map(String::as_str) {
        Some("true") => {}
        Some("false") if ns.labels.get(INJECT_LABEL).is_some_and(|v| v == "true") => {
            return Ok(Err(Skip::OptedOut));
        }
        _ if ns.labels.get(INJECT_LABEL).is_some_and(|v| v == "true") => {}
        _ => return Ok(Err(Skip::NotOptedIn)),
    }
    if SYSTEM_NAMESPACES.contains(&namespace) || namespace == settings.own_namespace {
        return Ok(Err(Skip::ExcludedNamespace));
    }
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Ok(Err(Skip::HostNetwork));
    }
    if annotations.contains_key(STATUS_ANNOTATION) {
        return Ok(Err(Skip::AlreadyInjected));
    }
    let has_container = spec.is_some_and(|s| {
        s.containers.iter().any(|c| c.name == CONTAINER)
            || s.init_containers
                .iter()
                .flatten()
                .any(|c| c.name == CONTAINER)
    });
    if has_container {
        return Ok(Err(Skip::ContainerExists));
    }
    let topology = annotations
        .get(TOPOLOGY_ANNOTATION)
        .or_else(|| ns.annotations.get(TOPOLOGY_ANNOTATION))
        .filter(|t| !t.is_empty());
    match topology {
        Some(topology) => Ok(Ok(Selected {
            topology: topology.clone(),
        })),
        None => Err(Refusal::new(
            Refuse::NoTopology,
            format!(
                "the Pod opted in to shotover sidecar injection but neither it nor namespace {namespace} names a ShotoverTopology in the annotation {TOPOLOGY_ANNOTATION}"
            ),
        )),
    }
}

/// What the topology contributes, computed once per topology version.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedTopology {
    pub topology: ShotoverTopology,
    pub hash: String,
    pub sources: Vec<SourcePort>,
}

/// The result of injecting.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// RFC 6902 operations.
    pub patch: Vec<Value>,
    pub hash: String,
    pub native_sidecar: bool,
    /// Shown to the client that created the Pod.
    pub warnings: Vec<String>,
}

/// What the status annotation records.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InjectionStatus {
    pub topology: String,
    pub config_hash: String,
    /// Where the sidecar answers `/config` (the operator asks what it runs).
    #[serde(default)]
    pub observability_port: i32,
    pub native_sidecar: bool,
    pub containers: Vec<String>,
    pub volumes: Vec<String>,
}

/// Step 2: the patch that adds the sidecar for `rendered` to `pod`.
pub fn inject(
    pod: &Pod,
    ns: &NamespaceMeta,
    rendered: &RenderedTopology,
    settings: &Settings,
) -> Result<Injection, Refusal> {
    let empty = BTreeMap::new();
    let annotations = pod.metadata.annotations.as_ref().unwrap_or(&empty);
    let topology = &rendered.topology;
    let name = topology.metadata.name.as_deref().unwrap_or_default();
    let spec = &topology.spec;
    let overrides = Overrides::parse(annotations, &ns.annotations).map_err(|errors| {
        Refusal::new(
            Refuse::InvalidOverride,
            format!("invalid shotover sidecar overrides: {}", errors.join("; ")),
        )
    })?;
    if let Some(image) = overrides
        .image
        .as_deref()
        .filter(|image| !image_allowed(image, &settings.allowed_images))
    {
        return Err(Refusal::new(
            Refuse::InvalidOverride,
            format!(
                "invalid shotover sidecar overrides: annotation {}: `{image}` is not in the webhook's image allow-list ({})",
                shotover_crds::crd::overrides::IMAGE,
                settings.allowed_images.join(", ")
            ),
        ));
    }
    let pod_spec = pod.spec.clone().unwrap_or_default();
    check_conflicts(&pod_spec, rendered)?;

    let native = overrides
        .native_sidecar
        .or(spec.sidecar.as_ref().and_then(|s| s.native_sidecar))
        .unwrap_or(settings.native_sidecar_default);
    let configured = spec
        .sidecar
        .as_ref()
        .and_then(|s| s.resources.clone())
        .or_else(|| spec.resources.clone());
    // Without resources in the topology, the annotations' quantities with the default
    // requests filling what they leave unset.
    let resources = match configured {
        Some(configured) => overrides.resources(Some(configured)),
        None => Some(shotover_crds::crd::with_default_requests(
            overrides.resources(None).unwrap_or_default(),
        )),
    };
    let mut container = proxy_container(
        spec,
        &rendered.sources,
        &ProxySettings {
            image: overrides.image.as_deref().unwrap_or(&spec.image),
            resources,
            log_level: overrides.log_level.as_deref(),
            port_names: false,
            watch_files: true,
        },
    );
    if let Some(security) = container.security_context.as_mut() {
        // Whatever the Pod's securityContext and the image's USER say.
        security.run_as_user = Some(SIDECAR_UID);
        security.run_as_group = Some(SIDECAR_UID);
    }
    let ready_probe = |failure_threshold| Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/ready".to_owned()),
            port: IntOrString::Int(spec.observability_port),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(1),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    };
    if native {
        // Started before every other init container and the application, which start
        // once this probe passes; stopped after them, so Jobs complete.
        container.restart_policy = Some("Always".to_owned());
        container.startup_probe = Some(ready_probe(120));
    } else {
        // First container, and the kubelet starts the next one only when this hook returns.
        container.lifecycle = Some(Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "shotover".to_owned(),
                        "--await-ready".to_owned(),
                        format!("127.0.0.1:{}", spec.observability_port),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        });
    }
    let volume = Volume {
        name: CONFIG_VOLUME.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: names::config_map(name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    };
    let volumes: Vec<Volume> = std::iter::once(volume)
        .chain(shotover_operator::render::tls_volumes(spec))
        .collect();
    let status = InjectionStatus {
        topology: name.to_owned(),
        config_hash: rendered.hash.clone(),
        observability_port: spec.observability_port,
        native_sidecar: native,
        containers: vec![CONTAINER.to_owned()],
        volumes: volumes.iter().map(|v| v.name.clone()).collect(),
    };

    let mut patch = Vec::new();
    let mut new_annotations = vec![
        (
            STATUS_ANNOTATION.to_owned(),
            serde_json::to_string(&status).unwrap_or_default(),
        ),
        (CONFIG_HASH_ANNOTATION.to_owned(), rendered.hash.clone()),
    ];
    if !annotations.contains_key(DEFAULT_CONTAINER_ANNOTATION)
        && let Some(first) = pod_spec.containers.first()
    {
        new_annotations.push((DEFAULT_CONTAINER_ANNOTATION.to_owned(), first.name.clone()));
    }
    add_map_entries(
        &mut patch,
        "/metadata/annotations",
        pod.metadata.annotations.is_some(),
        new_annotations,
    );
    add_map_entries(
        &mut patch,
        "/metadata/labels",
        pod.metadata.labels.is_some(),
        vec![(SIDECAR_LABEL.to_owned(), name.to_owned())],
    );
    for (i, volume) in volumes.iter().enumerate() {
        add_list_item(
            &mut patch,
            "/spec/volumes",
            pod_spec.volumes.is_some() || i > 0,
            false,
            to_value(volume),
        );
    }
    if native {
        add_list_item(
            &mut patch,
            "/spec/initContainers",
            pod_spec.init_containers.is_some(),
            true,
            to_value(&container),
        );
    } else {
        add_list_item(
            &mut patch,
            "/spec/containers",
            true,
            true,
            to_value(&container),
        );
    }
    Ok(Injection {
        patch,
        hash: rendered.hash.clone(),
        native_sidecar: native,
        warnings: overrides::unknown_annotations(annotations),
    })
}

fn to_value<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// Adds `entries` to the map at `path`, creating it when absent.
fn add_map_entries(
    patch: &mut Vec<Value>,
    path: &str,
    exists: bool,
    entries: Vec<(String, String)>,
) {
    if exists {
        for (key, value) in entries {
            patch.push(
                json!({"op": "add", "path": format!("{path}/{}", escape(&key)), "value": value}),
            );
        }
    } else {
        let map: serde_json::Map<String, Value> = entries
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect();
        patch.push(json!({"op": "add", "path": path, "value": map}));
    }
}

/// Adds `item` to the list at `path` (first or last), creating it when absent.
fn add_list_item(patch: &mut Vec<Value>, path: &str, exists: bool, first: bool, item: Value) {
    if !exists {
        patch.push(json!({"op": "add", "path": path, "value": [item]}));
    } else if first {
        patch.push(json!({"op": "add", "path": format!("{path}/0"), "value": item}));
    } else {
        patch.push(json!({"op": "add", "path": format!("{path}/-"), "value": item}));
    }
}

/// RFC 6901: `~` is `~0`, `/` is `~1`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn check_conflicts(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    rendered: &RenderedTopology,
) -> Result<(), Refusal> {
    let name = rendered
        .topology
        .metadata
        .name
        .as_deref()
        .unwrap_or_default();
    let needed: Vec<String> = std::iter::once(CONFIG_VOLUME.to_owned())
        .chain(
            (0..rendered.topology.spec.tls_secrets.len())
                .map(shotover_operator::render::tls_volume),
        )
        .collect();
    if let Some(taken) = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| needed.contains(&v.name))
    {
        return Err(Refusal::new(
            Refuse::Conflict,
            format!(
                "the Pod already has a volume named {}, which the shotover sidecar needs",
                taken.name
            ),
        ));
    }
    let mut ours: Vec<(i32, String)> = rendered
        .sources
        .iter()
        .filter_map(|s| Some((s.port?, format!("source `{}`", s.source))))
        .collect();
    ours.push((
        rendered.topology.spec.observability_port,
        "observabilityPort".to_owned(),
    ));
    let containers: Vec<&Container> = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten())
        .collect();
    let mut clashes = Vec::new();
    for container in containers {
        for port in container.ports.iter().flatten() {
            if let Some((_, what)) = ours.iter().find(|(p, _)| *p == port.container_port) {
                clashes.push(format!(
                    "port {} ({what} of ShotoverTopology {name}) is also a port of container {}",
                    port.container_port, container.name
                ));
            }
        }
    }
    if clashes.is_empty() {
        Ok(())
    } else {
        Err(Refusal::new(
            Refuse::Conflict,
            format!(
                "the shotover sidecar cannot share the Pod's network: {}",
                clashes.join("; ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests;

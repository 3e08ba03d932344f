//! Rendering a `ShotoverTopology` into what runs it: a pure function from the resource to the
//! ConfigMap (`topology.yaml`, `config.yaml` and their hash) and, in DB-side mode, the
//! StatefulSet, the headless and client Services and the PodDisruptionBudget.
//!
//! Validation is the proxy's own ([`shotover_crds::load_topology`], on the very file the
//! proxy will read) plus the checks that only make sense in Kubernetes (a DB-side proxy must
//! listen on an address other pods can reach). Every problem is reported at once.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, HTTPGetAction,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
pub use shotover_crds::config_hash;
use shotover_crds::crd::{
    CONFIG_FILE, CONFIG_HASH_ANNOTATION, ConfigUpdate, DbSideSpec, INJECT_LABEL, ServiceType,
    ShotoverTopology, ShotoverTopologySpec, TLS_DIR, TOPOLOGY_FILE, TOPOLOGY_LABEL, names,
};
use shotover_crds::{ConfigError, ProxyConfig, TopologyErrors, load_topology};

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "shotover-operator";
/// Where the ConfigMap is mounted in the proxy container.
pub const CONFIG_DIR: &str = "/etc/shotover";
/// Name of the proxy container.
pub const CONTAINER: &str = "shotover";
/// Name of the observability port of the proxy container.
pub const OBSERVABILITY_PORT_NAME: &str = "observability";
/// Name of the volume holding the ConfigMap.
pub const CONFIG_VOLUME: &str = "shotover-config";

/// Everything rendered from one valid topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// First 16 hex digits of the SHA-256 of both files.
    pub hash: String,
    pub config_map: ConfigMap,
    pub db_side: Option<DbSideObjects>,
}

/// The DB-side tier.
#[derive(Debug, Clone, PartialEq)]
pub struct DbSideObjects {
    pub stateful_set: StatefulSet,
    pub headless_service: Service,
    pub client_service: Service,
    /// `None` when `podDisruptionBudget.enabled` is false.
    pub pod_disruption_budget: Option<PodDisruptionBudget>,
}

/// A topology that cannot be rendered, with every reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0)]
pub struct InvalidTopology(pub TopologyErrors);

impl InvalidTopology {
    fn new(errors: Vec<ConfigError>) -> Self {
        InvalidTopology(TopologyErrors::new(errors))
    }
}

/// What a platform team allows topologies to ask of the DB-side tier's client Service
/// (`--allowed-service-types`, `--allowed-service-annotations`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Service types the client Service may have.
    pub service_types: Vec<ServiceType>,
    /// Annotation keys it may carry: a key, a prefix ending in `*`, or `*` for any.
    pub service_annotations: Vec<String>,
}

impl Default for Policy {
    /// Anything, as a namespace editor may create any Service.
    fn default() -> Self {
        Policy {
            service_types: vec![
                ServiceType::ClusterIP,
                ServiceType::NodePort,
                ServiceType::LoadBalancer,
            ],
            service_annotations: vec!["*".to_owned()],
        }
    }
}

impl Policy {
    fn annotation_allowed(&self, key: &str) -> bool {
        self.service_annotations
            .iter()
            .any(|entry| match entry.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix),
                None => key == entry,
            })
    }
}

/// Renders `topology` under the default [`Policy`], or says everything that is wrong with it.
pub fn render(topology: &ShotoverTopology) -> Result<Rendered, InvalidTopology> {
    render_with(topology, &Policy::default())
}

/// Renders `topology`, or says everything that is wrong with it, `policy` included.
pub fn render_with(
    topology: &ShotoverTopology,
    policy: &Policy,
) -> Result<Rendered, InvalidTopology> {
    let spec = &topology.spec;
    let name = topology.metadata.name.as_deref().unwrap_or_default();
    let mut errors = Vec::new();

    let topology_yaml = spec
        .topology()
        .to_yaml()
        .map_err(|e| InvalidTopology::new(vec![ConfigError::new("spec.sources", e)]))?;
    if let Err(e) = load_topology(&topology_yaml) {
        errors.extend(e.errors.into_iter().map(|e| spec_path(e, "spec")));
    }

    let proxy_config = ProxyConfig {
        main_log_level: spec.log_level.clone(),
        observability_interface: Some(format!("0.0.0.0:{}", spec.observability_port)),
        // The default follows the container's memory limit.
        max_buffered_reply_bytes: None,
        max_buffered_request_bytes: None,
    };
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&spec.log_level) {
        errors.push(ConfigError::new(
            "spec.logLevel",
            format!("`{}` is not a log filter: {e}", spec.log_level),
        ));
    }
    let config_yaml = serde_yaml::to_string(&proxy_config)
        .map_err(|e| InvalidTopology::new(vec![ConfigError::new("spec", e.to_string())]))?;

    check_tls_files(spec, &mut errors);
    let sources = source_ports(topology);
    for (i, source) in sources.iter().enumerate() {
        if source.port == Some(spec.observability_port) {
            errors.push(ConfigError::new(
                format!("spec.sources[{i}]"),
                format!(
                    "source `{}` listens on port {}, which is also spec.observabilityPort",
                    source.source, spec.observability_port
                ),
            ));
        }
    }
    if let Some(db_side) = &spec.db_side {
        check_db_side(topology, db_side, &sources, &mut errors);
        check_pod_template(name, db_side, &mut errors);
        check_policy(db_side, policy, &mut errors);
    }
    if !errors.is_empty() {
        return Err(InvalidTopology::new(errors));
    }

    let hash = config_hash(&topology_yaml, &config_yaml);
    let owner = owner_reference(topology);
    let namespace = topology.metadata.namespace.clone();
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::config_map(name)),
            namespace: namespace.clone(),
            labels: Some(labels(name, "config")),
            annotations: Some(BTreeMap::from([(
                CONFIG_HASH_ANNOTATION.to_owned(),
                hash.clone(),
            )])),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (TOPOLOGY_FILE.to_owned(), topology_yaml),
            (CONFIG_FILE.to_owned(), config_yaml),
        ])),
        ..ConfigMap::default()
    };
    let db_side = spec
        .db_side
        .as_ref()
        .map(|db_side| render_db_side(topology, db_side, &sources, &hash, &owner));
    Ok(Rendered {
        hash,
        config_map,
        db_side,
    })
}

fn spec_path(e: ConfigError, prefix: &str) -> ConfigError {
    if e.path.is_empty() {
        ConfigError::new(prefix, e.message)
    } else {
        ConfigError::new(format!("{prefix}.{}", e.path), e.message)
    }
}

/// One source as the pod sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcePort {
    pub source: String,
    /// Name of the container and Service port: the source's name when it is a valid port name.
    pub port_name: String,
    /// `None` when the listen address has no port (validation reports it).
    pub port: Option<i32>,
    pub host: String,
}

/// The listen address of every source, with a port name unique in the pod.
pub fn source_ports(topology: &ShotoverTopology) -> Vec<SourcePort> {
    let mut used = std::collections::HashSet::new();
    topology
        .spec
        .sources
        .iter()
        .enumerate()
        .map(|(i, source)| {
            let (host, port) = match source.listen_addr().rsplit_once(':') {
                Some((host, port)) => (host, port.parse::<u16>().ok().map(i32::from)),
                None => (source.listen_addr(), None),
            };
            let name = source.name();
            // Port names must be unique in the pod: a name taken (or not a valid port name)
            // falls back to `source-<i>`, then `source-<i>-<n>`.
            let mut port_name = if is_port_name(name) && !used.contains(name) {
                name.to_owned()
            } else {
                format!("source-{i}")
            };
            let mut n = 1;
            while used.contains(&port_name) {
                port_name = format!("source-{i}-{n}");
                n += 1;
            }
            used.insert(port_name.clone());
            SourcePort {
                source: name.to_owned(),
                port_name,
                port,
                host: host
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_owned(),
            }
        })
        .collect()
}

/// An IANA service name, as Kubernetes requires of port names: at most 15 characters,
/// lowercase letters, digits and inner single dashes, at least one letter.
fn is_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
        && name != OBSERVABILITY_PORT_NAME
}

fn check_policy(db_side: &DbSideSpec, policy: &Policy, errors: &mut Vec<ConfigError>) {
    let service = &db_side.service;
    if !policy.service_types.contains(&service.type_) {
        let allowed: Vec<&str> = policy.service_types.iter().map(|t| t.as_str()).collect();
        errors.push(ConfigError::new(
            "spec.dbSide.service.type",
            format!(
                "{} is not allowed by the operator (--allowed-service-types: {})",
                service.type_.as_str(),
                if allowed.is_empty() {
                    "none".to_owned()
                } else {
                    allowed.join(", ")
                }
            ),
        ));
    }
    for key in service.annotations.keys() {
        if !policy.annotation_allowed(key) {
            errors.push(ConfigError::new(
                format!("spec.dbSide.service.annotations[{key}]"),
                format!(
                    "annotation `{key}` is not allowed by the operator (--allowed-service-annotations: {})",
                    if policy.service_annotations.is_empty() {
                        "none".to_owned()
                    } else {
                        policy.service_annotations.join(", ")
                    }
                ),
            ));
        }
    }
}

fn non_empty<T>(items: Vec<T>) -> Option<Vec<T>> {
    (!items.is_empty()).then_some(items)
}

/// The overlay may add labels and annotations, not replace the operator's.
fn check_pod_template(name: &str, db_side: &DbSideSpec, errors: &mut Vec<ConfigError>) {
    let Some(overlay) = &db_side.pod_template else {
        return;
    };
    let mut ours = labels(name, "db-side-proxy");
    ours.extend(selector(name));
    ours.insert(INJECT_LABEL.to_owned(), "false".to_owned());
    for key in overlay.labels.keys().filter(|k| ours.contains_key(*k)) {
        errors.push(ConfigError::new(
            format!("spec.dbSide.podTemplate.labels[{key}]"),
            "set by the operator (it selects and labels the proxy Pods): choose another key",
        ));
    }
    if overlay.annotations.contains_key(CONFIG_HASH_ANNOTATION) {
        errors.push(ConfigError::new(
            format!("spec.dbSide.podTemplate.annotations[{CONFIG_HASH_ANNOTATION}]"),
            "set by the operator (configUpdate: RollingRestart): choose another key",
        ));
    }
}

fn check_db_side(
    topology: &ShotoverTopology,
    db_side: &DbSideSpec,
    sources: &[SourcePort],
    errors: &mut Vec<ConfigError>,
) {
    let name = topology.metadata.name.as_deref().unwrap_or_default();
    // A StatefulSet's pods carry a `controller-revision-hash` label of the StatefulSet's name
    // plus 11 characters, and label values stop at 63.
    let sts = names::db_side(name);
    if sts.len() > 52 {
        errors.push(ConfigError::new(
            "metadata.name",
            format!(
                "with dbSide the name may have at most {} characters (the StatefulSet `{sts}` must fit in 52), this one has {}",
                52 - (sts.len() - name.len()),
                name.len()
            ),
        ));
    }
    for (i, source) in sources.iter().enumerate() {
        let loopback = source.host == "localhost"
            || source
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if loopback {
            errors.push(ConfigError::new(
                format!("spec.sources[{i}]"),
                format!(
                    "source `{}` listens on {}, which the Service cannot reach: with dbSide, listen on 0.0.0.0",
                    source.source, source.host
                ),
            ));
        }
    }
    for (i, port) in db_side.service.ports.iter().enumerate() {
        if !sources.iter().any(|s| s.source == port.source) {
            let known: Vec<&str> = sources.iter().map(|s| s.source.as_str()).collect();
            errors.push(ConfigError::new(
                format!("spec.dbSide.service.ports[{i}].source"),
                format!(
                    "no source is named `{}` (sources: {})",
                    port.source,
                    known.join(", ")
                ),
            ));
        }
    }
}

/// The controller owner reference to the topology: deleting it deletes what was made for it.
pub fn owner_reference(topology: &ShotoverTopology) -> OwnerReference {
    topology
        .controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: "shotover.io/v1alpha1".to_owned(),
            kind: "ShotoverTopology".to_owned(),
            name: topology.metadata.name.clone().unwrap_or_default(),
            uid: String::new(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// Labels of everything made for topology `name`.
pub fn labels(name: &str, component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "shotover".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            FIELD_MANAGER.to_owned(),
        ),
        (TOPOLOGY_LABEL.to_owned(), name.to_owned()),
    ])
}

/// Labels that select the DB-side pods (a StatefulSet's selector never changes).
/// The proxy Pods' selector as a label query (`k=v,k=v`), for `status.selector`.
pub fn selector_query(name: &str) -> String {
    selector(name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn selector(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "shotover".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            "db-side-proxy".to_owned(),
        ),
    ])
}

fn render_db_side(
    topology: &ShotoverTopology,
    db_side: &DbSideSpec,
    sources: &[SourcePort],
    hash: &str,
    owner: &OwnerReference,
) -> DbSideObjects {
    let spec = &topology.spec;
    let name = topology.metadata.name.as_deref().unwrap_or_default();
    let namespace = topology.metadata.namespace.clone();
    let meta = |object_name: String| ObjectMeta {
        name: Some(object_name),
        namespace: namespace.clone(),
        labels: Some(labels(name, "db-side-proxy")),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let mut pod_labels = labels(name, "db-side-proxy");
    pod_labels.extend(selector(name));
    // The DB-side proxy is the proxy: never inject another one into it, whatever the
    // namespace opts in to.
    pod_labels.insert(INJECT_LABEL.to_owned(), "false".to_owned());

    let container = proxy_container(
        spec,
        sources,
        &ProxySettings {
            image: &spec.image,
            resources: Some(
                spec.resources
                    .clone()
                    .unwrap_or_else(shotover_crds::crd::default_proxy_resources),
            ),
            log_level: None,
            port_names: true,
            watch_files: db_side.config_update == ConfigUpdate::Reload,
        },
    );
    // Rolling restart: the hash on the template makes every change of the files a new
    // revision of the StatefulSet. Reload: the template does not change with the files,
    // the proxies reload them in place.
    let annotations = (db_side.config_update == ConfigUpdate::RollingRestart)
        .then(|| BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_owned(), hash.to_owned())]));
    let overlay = db_side.pod_template.clone().unwrap_or_default();
    let mut annotations = annotations;
    if !overlay.annotations.is_empty() {
        let mut merged = overlay.annotations.clone();
        merged.extend(annotations.unwrap_or_default());
        annotations = Some(merged);
    }
    let mut labels_with_overlay = overlay.labels.clone();
    labels_with_overlay.extend(pod_labels);
    let pod = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels_with_overlay),
            annotations,
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(
                std::iter::once(Volume {
                    name: CONFIG_VOLUME.to_owned(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: names::config_map(name),
                        ..ConfigMapVolumeSource::default()
                    }),
                    ..Volume::default()
                })
                .chain(tls_volumes(spec))
                .collect(),
            ),
            termination_grace_period_seconds: Some(30),
            // The proxy never talks to the Kubernetes API.
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                // Any image runs as a non-root user, whatever its USER says.
                run_as_user: Some(65532),
                run_as_group: Some(65532),
                seccomp_profile: Some(runtime_default_seccomp()),
                ..PodSecurityContext::default()
            }),
            image_pull_secrets: non_empty(overlay.image_pull_secrets),
            node_selector: (!overlay.node_selector.is_empty()).then_some(overlay.node_selector),
            tolerations: non_empty(overlay.tolerations),
            affinity: overlay.affinity,
            topology_spread_constraints: non_empty(overlay.topology_spread_constraints),
            priority_class_name: overlay.priority_class_name,
            service_account_name: overlay.service_account_name,
            ..PodSpec::default()
        }),
    };
    let stateful_set = StatefulSet {
        metadata: meta(names::db_side(name)),
        spec: Some(StatefulSetSpec {
            replicas: Some(db_side.replicas),
            service_name: Some(names::headless_service(name)),
            // Proxies hold no state: create and remove them all at once when scaling (a
            // template change still rolls one pod at a time).
            pod_management_policy: Some("Parallel".to_owned()),
            selector: LabelSelector {
                match_labels: Some(selector(name)),
                ..LabelSelector::default()
            },
            template: pod,
            ..StatefulSetSpec::default()
        }),
        status: None,
    };

    let service_port = |s: &SourcePort, port: i32, node_port: Option<i32>| ServicePort {
        name: Some(s.port_name.clone()),
        port,
        target_port: Some(IntOrString::String(s.port_name.clone())),
        protocol: Some("TCP".to_owned()),
        node_port,
        ..ServicePort::default()
    };
    let headless_service = Service {
        metadata: meta(names::headless_service(name)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector(name)),
            ports: Some(
                sources
                    .iter()
                    .filter_map(|s| Some(service_port(s, s.port?, None)))
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let mut client_meta = meta(names::db_side(name));
    if !db_side.service.annotations.is_empty() {
        client_meta.annotations = Some(db_side.service.annotations.clone());
    }
    let client_service = Service {
        metadata: client_meta,
        spec: Some(ServiceSpec {
            type_: Some(db_side.service.type_.as_str().to_owned()),
            selector: Some(selector(name)),
            ports: Some(
                sources
                    .iter()
                    .filter_map(|s| {
                        let chosen = db_side.service.ports.iter().find(|p| p.source == s.source);
                        let port = chosen.map(|p| p.port).or(s.port)?;
                        Some(service_port(s, port, chosen.and_then(|p| p.node_port)))
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    };
    let pod_disruption_budget =
        db_side
            .pod_disruption_budget
            .enabled
            .then(|| PodDisruptionBudget {
                metadata: meta(names::db_side(name)),
                spec: Some(PodDisruptionBudgetSpec {
                    max_unavailable: Some(IntOrString::Int(
                        db_side.pod_disruption_budget.max_unavailable,
                    )),
                    selector: Some(LabelSelector {
                        match_labels: Some(selector(name)),
                        ..LabelSelector::default()
                    }),
                    ..PodDisruptionBudgetSpec::default()
                }),
                status: None,
            });
    DbSideObjects {
        stateful_set,
        headless_service,
        client_service,
        pod_disruption_budget,
    }
}

/// How long a proxy in a Pod keeps serving after SIGTERM with `/ready` failing, so that
/// kube-proxy and the Service's clients stop choosing it before it drains.
pub const SHUTDOWN_DELAY_SECONDS: u64 = 5;
/// How long in-flight requests may then take; with the delay, inside the Pod's 30 s.
pub const SHUTDOWN_GRACE_SECONDS: u64 = 20;

/// What differs between the DB-side proxy and an injected sidecar.
#[derive(Debug, Clone)]
pub struct ProxySettings<'a> {
    pub image: &'a str,
    pub resources: Option<ResourceRequirements>,
    /// Overrides the topology's `logLevel` (`--log-level`).
    pub log_level: Option<&'a str>,
    /// Name the container ports (a sidecar leaves them unnamed: port names must be unique in
    /// the pod, and the application's containers may use any name).
    pub port_names: bool,
    /// Reload the mounted files when the kubelet updates them (`false`: keep the files the
    /// proxy started with, for a tier that rolls on every change instead).
    pub watch_files: bool,
}

/// The proxy container: one port per source and the observability port, the config mounted
/// read-only, `/ready` and `/live` probes, a hardened securityContext.
pub fn proxy_container(
    spec: &ShotoverTopologySpec,
    sources: &[SourcePort],
    settings: &ProxySettings<'_>,
) -> Container {
    let name = |n: &str| settings.port_names.then(|| n.to_owned());
    let mut container_ports: Vec<ContainerPort> = sources
        .iter()
        .filter_map(|s| {
            Some(ContainerPort {
                name: name(&s.port_name),
                container_port: s.port?,
                protocol: Some("TCP".to_owned()),
                ..ContainerPort::default()
            })
        })
        .collect();
    container_ports.push(ContainerPort {
        name: name(OBSERVABILITY_PORT_NAME),
        container_port: spec.observability_port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    });
    let port = if settings.port_names {
        IntOrString::String(OBSERVABILITY_PORT_NAME.to_owned())
    } else {
        IntOrString::Int(spec.observability_port)
    };
    let probe = |path: &str, failure_threshold: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: port.clone(),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(5),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    };
    let mut args = vec![
        "--topology-file".to_owned(),
        format!("{CONFIG_DIR}/{TOPOLOGY_FILE}"),
        "--config-file".to_owned(),
        format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        // On SIGTERM: fail /ready and keep serving while the endpoints go away, then drain,
        // all within the Pod's default 30 s termination grace period.
        "--shutdown-delay-seconds".to_owned(),
        SHUTDOWN_DELAY_SECONDS.to_string(),
        "--shutdown-grace-seconds".to_owned(),
        SHUTDOWN_GRACE_SECONDS.to_string(),
    ];
    if let Some(level) = settings.log_level {
        args.extend(["--log-level".to_owned(), level.to_owned()]);
    }
    if !settings.watch_files {
        args.extend(["--watch-interval-ms".to_owned(), "0".to_owned()]);
    }
    Container {
        name: CONTAINER.to_owned(),
        image: Some(settings.image.to_owned()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        args: Some(args),
        ports: Some(container_ports),
        readiness_probe: Some(probe("/ready", 2)),
        liveness_probe: Some(probe("/live", 6)),
        resources: settings.resources.clone(),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: CONFIG_VOLUME.to_owned(),
                mount_path: CONFIG_DIR.to_owned(),
                read_only: Some(true),
                ..VolumeMount::default()
            })
            .chain(
                spec.tls_secrets
                    .iter()
                    .enumerate()
                    .map(|(i, secret)| VolumeMount {
                        name: tls_volume(i),
                        mount_path: format!("{TLS_DIR}/{}", secret.secret_name),
                        read_only: Some(true),
                        ..VolumeMount::default()
                    }),
            )
            .collect(),
        ),
        security_context: Some(hardened_security_context()),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Container::default()
    }
}

/// Name of the volume of `spec.tlsSecrets[i]`.
pub fn tls_volume(i: usize) -> String {
    format!("shotover-tls-{i}")
}

/// The volumes the proxy container mounts besides its ConfigMap: one per Secret of
/// `spec.tlsSecrets` (the kubelet updates them in place when the Secret changes).
pub fn tls_volumes(spec: &ShotoverTopologySpec) -> Vec<Volume> {
    spec.tls_secrets
        .iter()
        .enumerate()
        .map(|(i, secret)| Volume {
            name: tls_volume(i),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        })
        .collect()
}

/// Every TLS file of the topology must be in a Secret it mounts: the proxy container has
/// nothing else (`/etc/shotover-tls/<secretName>/<key>`).
fn check_tls_files(spec: &ShotoverTopologySpec, errors: &mut Vec<ConfigError>) {
    let listed: Vec<&str> = spec
        .tls_secrets
        .iter()
        .map(|s| s.secret_name.as_str())
        .collect();
    for (at, file) in shotover_crds::tls_files(&spec.topology()) {
        let location = format!("spec.{at}");
        let inside = file
            .strip_prefix(TLS_DIR)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.split_once('/'))
            .filter(|(_, key)| {
                !key.is_empty()
                    && !key
                        .split('/')
                        .any(|c| c == ".." || c == "." || c.is_empty())
            });
        match inside {
            None => errors.push(ConfigError::new(
                location,
                format!(
                    "`{file}` is not in a Secret of spec.tlsSecrets: the proxy container has only those, each at {TLS_DIR}/<secretName>/ (for example {TLS_DIR}/redis-tls/tls.crt)"
                ),
            )),
            Some((secret, _)) if !listed.contains(&secret) => errors.push(ConfigError::new(
                location,
                format!(
                    "`{file}` is in Secret `{secret}`, which spec.tlsSecrets does not list (listed: {})",
                    if listed.is_empty() { "none".to_owned() } else { listed.join(", ") }
                ),
            )),
            Some(_) => {}
        }
    }
}

/// Non-root, read-only root filesystem, no capabilities, no privilege escalation.
pub fn hardened_security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(runtime_default_seccomp()),
        ..SecurityContext::default()
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..SeccompProfile::default()
    }
}

#[cfg(test)]
mod tests;

//! The `ShotoverTopology` custom resource (`shotover.io/v1alpha1`): the proxy's sources and
//! chains (the same types the proxy reads from `topology.yaml`), how to run the proxy, an
//! optional DB-side proxy tier, sidecar settings, and the status the operator reports.
//!
//! The doc comments here are what `kubectl explain shotovertopology.spec` prints.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::schema::{UNIQUE_SOURCE_NAMES_MESSAGE, UNIQUE_SOURCE_NAMES_RULE};
use crate::topology::{SourceConfig, Topology};

/// The API group.
pub const GROUP: &str = "shotover.io";
/// Image of the proxy when `spec.image` is not given (the apiserver writes it into the object
/// at creation, so an operator upgrade never changes the image of existing topologies).
pub const DEFAULT_IMAGE: &str = "ghcr.io/shotover-k8s/shotover:0.1.0";
/// Annotation that stops reconciling a topology while it is `"true"`.
pub const PAUSED_ANNOTATION: &str = "shotover.io/paused";
/// Annotation with the hash of the rendered configuration (ConfigMap and pod template).
pub const CONFIG_HASH_ANNOTATION: &str = "shotover.io/config-hash";
/// Label naming the topology on everything made for it.
pub const TOPOLOGY_LABEL: &str = "shotover.io/topology";
/// Pod (or namespace) label that opts in to sidecar injection: `"true"`; on a Pod, `"false"`
/// opts out of a namespace's opt-in.
pub const INJECT_LABEL: &str = "shotover.io/inject";
/// Pod (or namespace, as a default) annotation naming the ShotoverTopology to inject.
pub const TOPOLOGY_ANNOTATION: &str = "shotover.io/topology";
/// Annotation the webhook writes on an injected Pod: JSON saying what it added.
pub const STATUS_ANNOTATION: &str = "shotover.io/status";
/// Label the webhook writes on an injected Pod: the topology's name (what the operator counts).
pub const SIDECAR_LABEL: &str = "shotover.io/sidecar-of";
/// Per-Pod overrides of the injected sidecar (a namespace annotation sets a default).
pub mod overrides {
    /// Container image of the sidecar.
    pub const IMAGE: &str = "shotover.io/proxy-image";
    /// Resource quantities of the sidecar.
    pub const CPU_REQUEST: &str = "shotover.io/proxy-cpu-request";
    pub const CPU_LIMIT: &str = "shotover.io/proxy-cpu-limit";
    pub const MEMORY_REQUEST: &str = "shotover.io/proxy-memory-request";
    pub const MEMORY_LIMIT: &str = "shotover.io/proxy-memory-limit";
    /// Log filter of the sidecar (`--log-level`).
    pub const LOG_LEVEL: &str = "shotover.io/log-level";
    /// `"true"` or `"false"`: run the sidecar as a native sidecar (an init container).
    pub const NATIVE_SIDECAR: &str = "shotover.io/native-sidecar";
    /// Every override, for validation.
    pub const ALL: [&str; 7] = [
        IMAGE,
        CPU_REQUEST,
        CPU_LIMIT,
        MEMORY_REQUEST,
        MEMORY_LIMIT,
        LOG_LEVEL,
        NATIVE_SIDECAR,
    ];
}
/// Where the Secrets of `spec.tlsSecrets` are mounted, each in its own folder
/// (`/etc/shotover-tls/<secretName>/tls.crt`).
pub const TLS_DIR: &str = "/etc/shotover-tls";

/// Keys of the rendered files in the ConfigMap.
pub const TOPOLOGY_FILE: &str = "topology.yaml";
pub const CONFIG_FILE: &str = "config.yaml";

/// A Shotover proxy topology: the listeners (sources) of the proxy and the chain of transforms
/// each one runs, plus how to run it. The operator renders it into a ConfigMap
/// (`<name>-shotover-config`) and, with `dbSide`, runs it as a StatefulSet of proxies in front of
/// a database; with `sidecar`, the injection webhook adds it to application Pods.
// Each `printcolumn(...)` repeats `type_`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "shotover.io",
    version = "v1alpha1",
    kind = "ShotoverTopology",
    plural = "shotovertopologies",
    shortname = "stopo",
    category = "shotover",
    namespaced,
    status = "ShotoverTopologyStatus",
    // `kubectl scale` and a HorizontalPodAutoscaler set spec.dbSide.replicas; the operator
    // reconciles the StatefulSet from it, so an autoscaler is never fought.
    scale(
        spec_replicas_path = ".spec.dbSide.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    derive = "PartialEq",
    doc = "A Shotover proxy topology: sources, transform chains, and how to run the proxy.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the configuration is rendered and, in dbSide mode, every proxy is ready"
    ),
    printcolumn(
        name = "Config",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"ConfigValid\")].reason",
        description = "Whether the topology passed validation"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "integer",
        json_path = ".status.replicas",
        description = "DB-side proxy pods (StatefulSet status)"
    ),
    printcolumn(
        name = "Ready Replicas",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "DB-side proxies ready"
    ),
    printcolumn(
        name = "Sidecars",
        type_ = "integer",
        json_path = ".status.sidecars.injected",
        description = "Pods running this topology as an injected sidecar"
    ),
    printcolumn(
        name = "Outdated",
        type_ = "integer",
        json_path = ".status.sidecars.outdated",
        description = "Injected Pods whose sidecar runs an older configuration"
    ),
    printcolumn(
        name = "Hash",
        type_ = "string",
        json_path = ".status.configHash",
        description = "Hash of the rendered configuration",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ShotoverTopologySpec {
    /// The listeners of the proxy, each with the chain of transforms its requests run
    /// through, in upstream Shotover's topology format with camelCase field names, for example
    /// `- Redis: {name: redis, listenAddr: "0.0.0.0:6379", chain: [...]}`.
    #[schemars(length(min = 1, max = 32), extend("x-kubernetes-validations" = [{
        "rule": UNIQUE_SOURCE_NAMES_RULE,
        "message": UNIQUE_SOURCE_NAMES_MESSAGE,
    }]))]
    pub sources: Vec<SourceConfig>,
    /// Container image of the proxy.
    #[serde(default = "default_image")]
    pub image: String,
    /// When the kubelet pulls the image (Kubernetes' default when omitted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,
    /// CPU and memory requests and limits of the proxy container (default: requests of
    /// 10m CPU and 32Mi memory, no limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Log filter of the proxy (`config.yaml`'s `main_log_level`), for example `info` or
    /// `info,shotover=debug`.
    #[serde(default = "default_log_level")]
    #[schemars(length(min = 1, max = 1024))]
    pub log_level: String,
    /// Port of the proxy's HTTP listener: `/metrics`, `/ready`, `/live` and `/filter`.
    #[serde(default = "default_observability_port")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self >= 1 && self <= 65535",
        "message": "observabilityPort must be a port number (1-65535)",
    }]))]
    pub observability_port: i32,
    /// Secrets with TLS certificates, keys and CAs, mounted read-only in the proxy
    /// container at `/etc/shotover-tls/<secretName>/` (DB-side Pods and sidecars alike), for
    /// the topology's `tls` paths to name (`/etc/shotover-tls/redis-tls/tls.crt`). A renewed
    /// Secret reaches the running proxies, which reload it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-validations" = [{
        "rule": "self.all(a, self.exists_one(b, b.secretName == a.secretName))",
        "message": "each Secret may be listed once",
    }]))]
    pub tls_secrets: Vec<TlsSecret>,
    /// Run the proxy as its own tier in front of the database: a StatefulSet of proxies, a
    /// headless Service, a client Service and a PodDisruptionBudget. Omit it for a topology
    /// that is only injected as a sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_side: Option<DbSideSpec>,
    /// How the injection webhook adds the proxy to application Pods that name this topology.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<SidecarSpec>,
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_owned()
}

fn default_log_level() -> String {
    "info".to_owned()
}

fn default_observability_port() -> i32 {
    9001
}

/// When the kubelet pulls the proxy image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl ImagePullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ImagePullPolicy::Always => "Always",
            ImagePullPolicy::IfNotPresent => "IfNotPresent",
            ImagePullPolicy::Never => "Never",
        }
    }
}

/// A Secret mounted for the proxy's TLS files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSecret {
    /// Name of a Secret in the topology's namespace (for example a cert-manager
    /// Certificate's `secretName`: keys `tls.crt`, `tls.key`, `ca.crt`).
    #[schemars(length(min = 1, max = 253), extend("x-kubernetes-validations" = [{
        "rule": "self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')",
        "message": "must be a Secret name (lowercase letters, digits, '-' and '.')",
    }]))]
    pub secret_name: String,
}

/// The DB-side proxy tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DbSideSpec {
    /// Number of proxy pods (default 2).
    #[serde(default = "default_replicas")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self >= 0",
        "message": "replicas must be 0 or more",
    }]))]
    pub replicas: i32,
    /// The client Service in front of the proxies.
    #[serde(default)]
    pub service: DbSideServiceSpec,
    /// The PodDisruptionBudget of the proxies.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,
    /// How a change of the configuration reaches the running proxies: `Reload` (default)
    /// lets each proxy reload the ConfigMap the kubelet updates in place, without a
    /// restart; `RollingRestart` replaces the proxies one at a time instead. Changes of the
    /// Pod itself (image, ports, resources) always roll.
    #[serde(default)]
    pub config_update: ConfigUpdate,
    /// What the proxy Pods carry besides what the operator sets: labels and annotations
    /// (added; the operator's own keys cannot be replaced), image pull secrets, scheduling,
    /// a priority class and a ServiceAccount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_template: Option<DbSidePodTemplate>,
}

/// The part of the DB-side proxy Pods a topology may set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DbSidePodTemplate {
    /// Added to the Pods' labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Added to the Pods' annotations (for example for a service mesh or a log agent).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Secrets to pull `spec.image` from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<k8s_openapi::api::core::v1::LocalObjectReference>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<k8s_openapi::api::core::v1::Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<k8s_openapi::api::core::v1::TopologySpreadConstraint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// The Pods' ServiceAccount (its token is not mounted: the proxy never calls the
    /// Kubernetes API; the name is for Pod security policies and cloud identities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// How a configuration change reaches the DB-side proxies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ConfigUpdate {
    #[default]
    Reload,
    RollingRestart,
}

fn default_replicas() -> i32 {
    2
}

/// The client Service of the DB-side tier. It has one port per source, named after the
/// source, on the source's listen port unless `ports` says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DbSideServiceSpec {
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// Service ports that differ from the sources' listen ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ports: Vec<ServicePortSpec>,
    /// Annotations of the client Service (for example for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// Kind of the client Service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// The Service port of one source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortSpec {
    /// Name of the source.
    pub source: String,
    /// Port of the Service.
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self >= 1 && self <= 65535",
        "message": "port must be a port number (1-65535)",
    }]))]
    pub port: i32,
    /// Node port, for `NodePort` and `LoadBalancer` Services (default: chosen by Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i32>,
}

/// The PodDisruptionBudget of the DB-side proxies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Create it (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How many proxies a voluntary disruption (a drain) may take down at once (default 1).
    #[serde(default = "default_max_unavailable")]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self >= 1",
        "message": "maxUnavailable must be 1 or more",
    }]))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        PodDisruptionBudgetSpec {
            enabled: true,
            max_unavailable: default_max_unavailable(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_max_unavailable() -> i32 {
    1
}

/// Sidecar settings, read by the injection webhook.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarSpec {
    /// Run the proxy as a native sidecar (an init container with `restartPolicy: Always`).
    /// Default: when the cluster supports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub native_sidecar: Option<bool>,
    /// Resources of the sidecar container (default: `spec.resources`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

/// What the operator observed and did, written only by the operator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShotoverTopologyStatus {
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `ConfigValid`, `Progressing`, `Degraded`, and `ReconciliationPaused` while the
    /// `shotover.io/paused` annotation is `"true"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Hash of the configuration in the ConfigMap: the last valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Name of the ConfigMap holding `topology.yaml` and `config.yaml`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// The spec the configuration in the ConfigMap was rendered from (the last valid one):
    /// while the topology is invalid, the webhook injects new Pods with it, with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "crate::schema::opaque")]
    pub last_valid_spec: Option<serde_json::Value>,
    /// DB-side: proxy pods that exist, from the StatefulSet's status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// DB-side: proxies ready, from the StatefulSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,
    /// DB-side: the label selector of the proxy Pods, for the `scale` subresource (what a
    /// HorizontalPodAutoscaler reads to find the Pods whose metrics it averages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Application Pods that name this topology, by what the webhook did to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecars: Option<SidecarStatus>,
}

/// Counts of the live (not finished, not being deleted) Pods that name this topology.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    /// Pods with the sidecar injected for this topology.
    pub injected: i32,
    /// Running injected Pods whose proxy says (on its `/config`) that it runs a
    /// configuration other than `status.configHash`, refused to reload it, or needs a
    /// restart for part of it. Pods not running yet are not counted: they start with the
    /// ConfigMap as it is then.
    pub outdated: i32,
    /// Running injected Pods whose proxy did not answer the operator's `GET /config` (the
    /// `SidecarsUpToDate` condition says why).
    #[serde(default)]
    pub unreported: i32,
    /// Pods labelled `shotover.io/inject: "true"` that name this topology but have no
    /// sidecar: created while the webhook was unreachable with `failurePolicy: Ignore`.
    pub not_injected: i32,
}

impl ShotoverTopologySpec {
    /// The proxy's own topology (what `topology.yaml` holds).
    pub fn topology(&self) -> Topology {
        Topology {
            sources: self.sources.clone(),
        }
    }
}

/// Names of what is made for a topology named `name`.
pub mod names {
    /// The ConfigMap with the rendered files.
    pub fn config_map(name: &str) -> String {
        format!("{name}-shotover-config")
    }
    /// The StatefulSet, the client Service and the PodDisruptionBudget.
    pub fn db_side(name: &str) -> String {
        format!("{name}-shotover")
    }
    /// The headless Service that gives each proxy pod a DNS name.
    pub fn headless_service(name: &str) -> String {
        format!("{name}-shotover-headless")
    }
}

/// The CRD, with the schema tidied for the apiserver and `kubectl explain`: unsigned integer
/// formats (which the apiserver does not know, and warns about on every apply) are dropped,
/// and the line breaks of doc comments are unwrapped, keeping paragraphs.
/// The proxy container's resources when a topology sets none: small requests, so that a
/// scheduler counts it (idle it holds 6-20 MiB and little CPU) without crowding a node
/// with many injected Pods; no limits (a limit is the owner's call: the proxy's reply
/// budget follows a memory limit when there is one).
pub fn default_proxy_resources() -> ResourceRequirements {
    with_default_requests(ResourceRequirements::default())
}

/// `resources` with the default request of each of CPU and memory for which it sets neither
/// a request nor a limit (with a limit alone, Kubernetes requests the limit: a default
/// request above a smaller limit would make the Pod invalid).
pub fn with_default_requests(mut resources: ResourceRequirements) -> ResourceRequirements {
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    for (name, quantity) in [("cpu", "10m"), ("memory", "32Mi")] {
        let set = |m: &Option<BTreeMap<String, Quantity>>| {
            m.as_ref().is_some_and(|m| m.contains_key(name))
        };
        if !set(&resources.limits) && !set(&resources.requests) {
            resources
                .requests
                .get_or_insert_with(BTreeMap::new)
                .insert(name.to_owned(), Quantity(quantity.to_owned()));
        }
    }
    resources
}

/// The annotation of the CRD with the version of its schema (see [`schema_version`]).
pub const SCHEMA_VERSION_ANNOTATION: &str = "shotover.io/schema-version";

/// The CRD, annotated with its [`schema_version`].
pub fn crd() -> serde_json::Value {
    let mut value = bare_crd();
    value["metadata"]["annotations"] =
        serde_json::json!({ SCHEMA_VERSION_ANNOTATION: schema_version() });
    value
}

fn bare_crd() -> serde_json::Value {
    let mut value = serde_json::to_value(ShotoverTopology::crd()).expect("a CRD serializes");
    tidy(&mut value);
    value
}

/// The first 16 hex digits of the SHA-256 of the CRD's `spec` (its schemas, printer columns
/// and subresources): the operator compares it with the installed CRD's annotation at start,
/// since Helm does not upgrade CRDs.
pub fn schema_version() -> String {
    use sha2::{Digest, Sha256};
    let spec = serde_json::to_vec(&bare_crd()["spec"]).expect("JSON");
    Sha256::digest(&spec)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tidy(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            if map
                .get("format")
                .and_then(|f| f.as_str())
                .is_some_and(|f| f.starts_with("uint"))
            {
                map.remove("format");
            }
            if let Some(serde_json::Value::String(text)) = map.get_mut("description") {
                *text = unwrap_lines(text);
            }
            map.values_mut().for_each(tidy);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(tidy),
        _ => {}
    }
}

fn unwrap_lines(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// The CRD as YAML, as checked in at `crds/shotovertopology.yaml`.
pub fn crd_yaml() -> String {
    let body = serde_yaml::to_string(&crd()).expect("a CRD serializes to YAML");
    format!(
        "# Generated from crds/src/crd.rs: do not edit. Regenerate with\n#   cargo run -p shotover-operator -- crd > crds/shotovertopology.yaml\n{body}"
    )
}

#[cfg(test)]
mod tests;

//! The application Pods that name a topology, for the sidecar counts in its status: a cache
//! of Pods the webhook injected (label `shotover.io/sidecar-of`) and one of Pods that asked for
//! injection (label `shotover.io/inject: "true"`), the latter to find those created without
//! their sidecar. Only metadata and phase are kept. A third cache holds the DB-side proxy
//! Pods with their conditions and container states, to say in the status why a proxy does
//! not run (an image that cannot be pulled, a crash loop, no node to run on).

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use shotover_crds::crd::{
    CONFIG_HASH_ANNOTATION, SIDECAR_LABEL, STATUS_ANNOTATION, TOPOLOGY_ANNOTATION, TOPOLOGY_LABEL,
};

use crate::render::CONTAINER;
use crate::reports::Target;
use crate::status::PodObservation;

/// The Pod caches.
#[derive(Clone)]
pub struct PodStores {
    pub injected: Store<Pod>,
    pub opted_in: Store<Pod>,
    /// The DB-side proxy Pods (label `shotover.io/topology`).
    pub proxies: Store<Pod>,
}

/// Most characters of a container's termination message kept in a problem.
const MESSAGE_CHARS: usize = 300;

/// How long a proxy Pod may wait for a node before that is a problem: the scheduler retries,
/// and an autoscaler may be adding a node, so a Pod briefly unschedulable is normal.
pub const UNSCHEDULABLE_GRACE_SECONDS: i64 = 30;

/// Not scheduled, for less than [`UNSCHEDULABLE_GRACE_SECONDS`] (at `now`, in seconds).
fn recently_unscheduled(pod: &Pod, now: i64) -> bool {
    unscheduled_since(pod).is_some_and(|since| now - since < UNSCHEDULABLE_GRACE_SECONDS)
}

fn unscheduled_since(pod: &Pod) -> Option<i64> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_deref()?
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
    Some(
        condition
            .last_transition_time
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
    )
}

/// Drops what [`pod_problem`] does not need.
pub fn strip_proxy(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
}

/// What keeps one DB-side proxy Pod from running, if anything: not scheduled (and why), a
/// container waiting for a reason other than starting (an image it cannot pull, a crash
/// loop, with the last exit and the end of its log), or not Ready for a reason of the node.
pub fn pod_problem(pod: &Pod, now: i64) -> Option<String> {
    if recently_unscheduled(pod, now) {
        return None;
    }
    let status = pod.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    if let Some(c) = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return Some(format!(
            "not scheduled ({}): {}",
            c.reason.as_deref().unwrap_or("Unschedulable"),
            c.message.as_deref().unwrap_or_default()
        ));
    }
    let containers = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten());
    for c in containers {
        let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        if matches!(reason, "" | "ContainerCreating" | "PodInitializing") {
            continue;
        }
        let mut problem = format!("container {} {reason}", c.name);
        if let Some(last) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            // The back-off message changes with every restart; the last exit says more.
            write_exit(&mut problem, last);
        } else if let Some(message) = waiting.message.as_deref().filter(|m| !m.is_empty()) {
            problem.push_str(": ");
            problem.push_str(&shorten(message));
        }
        return Some(problem);
    }
    if let Some(c) = conditions.iter().find(|c| {
        c.type_ == "Ready"
            && c.status == "False"
            && c.reason
                .as_deref()
                .is_some_and(|r| r != "ContainersNotReady" && r != "PodCompleted")
    }) {
        return Some(format!(
            "not ready ({}): {}",
            c.reason.as_deref().unwrap_or_default(),
            c.message.as_deref().unwrap_or_default()
        ));
    }
    None
}

fn write_exit(out: &mut String, t: &k8s_openapi::api::core::v1::ContainerStateTerminated) {
    use std::fmt::Write as _;
    let _ = write!(
        out,
        ": last exit code {} ({})",
        t.exit_code,
        t.reason.as_deref().unwrap_or("Error")
    );
    if let Some(message) = t
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        let _ = write!(out, ": {}", shorten(message));
    }
}

/// One line, at most [`MESSAGE_CHARS`] characters, from the end (where errors are).
pub fn shorten(message: &str) -> String {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    let chars: Vec<char> = line.chars().collect();
    if chars.len() <= MESSAGE_CHARS {
        line
    } else {
        format!(
            "...{}",
            chars[chars.len() - MESSAGE_CHARS..]
                .iter()
                .collect::<String>()
        )
    }
}

/// Drops what the counts do not need (a Pod's spec is most of its size): of the status,
/// the phase, the IP and the proxy container's state stay, to ask the proxy what it runs.
pub fn strip(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    if let Some(status) = pod.status.as_mut() {
        let proxy = |statuses: &mut Option<Vec<k8s_openapi::api::core::v1::ContainerStatus>>| {
            statuses
                .take()
                .map(|s| s.into_iter().filter(|c| c.name == CONTAINER).collect())
        };
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            pod_ip: status.pod_ip.take(),
            container_statuses: proxy(&mut status.container_statuses),
            init_container_statuses: proxy(&mut status.init_container_statuses),
            ..Default::default()
        };
    }
}

/// Where the Pod's proxy answers `/config` (its IP, on `port`), once the proxy container
/// runs and has started (its startup probe or postStart hook passed) or is ready.
pub fn config_address(pod: &Pod, port: i32) -> Option<SocketAddr> {
    let status = pod.status.as_ref()?;
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let proxy = status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == CONTAINER)?;
    let running = proxy.state.as_ref().is_some_and(|s| s.running.is_some());
    let port = u16::try_from(port).ok()?;
    (running && (proxy.ready || proxy.started == Some(true))).then(|| SocketAddr::new(ip, port))
}

/// The observability port the webhook injected the sidecar with (in its status
/// annotation), if it says.
fn injected_port(pod: &Pod) -> Option<i32> {
    let status: serde_json::Value =
        serde_json::from_str(pod.annotations().get(STATUS_ANNOTATION)?).ok()?;
    i32::try_from(status.get("observabilityPort")?.as_i64()?).ok()
}

/// Not finished and not being deleted.
fn live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

impl PodStores {
    /// The live Pods of `namespace` that name `topology`, sorted by name. Sidecars are
    /// asked for `/config` on the port they were injected with, else on `port`.
    pub fn observe(&self, namespace: &str, topology: &str, port: i32) -> Vec<PodObservation> {
        let mut seen = HashSet::new();
        let mut pods = Vec::new();
        for pod in self.injected.state() {
            if pod.namespace().as_deref() == Some(namespace)
                && pod.labels().get(SIDECAR_LABEL).map(String::as_str) == Some(topology)
                && live(&pod)
            {
                seen.insert(pod.name_any());
                pods.push(PodObservation {
                    name: pod.name_any(),
                    injected_hash: Some(
                        pod.annotations()
                            .get(CONFIG_HASH_ANNOTATION)
                            .cloned()
                            .unwrap_or_default(),
                    ),
                    address: config_address(&pod, injected_port(&pod).unwrap_or(port)),
                    ..PodObservation::default()
                });
            }
        }
        for pod in self.opted_in.state() {
            if pod.namespace().as_deref() == Some(namespace)
                && pod
                    .annotations()
                    .get(TOPOLOGY_ANNOTATION)
                    .map(String::as_str)
                    == Some(topology)
                && !pod.annotations().contains_key(STATUS_ANNOTATION)
                && !seen.contains(&pod.name_any())
                && live(&pod)
            {
                pods.push(PodObservation {
                    name: pod.name_any(),
                    ..PodObservation::default()
                });
            }
        }
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }

    /// The live DB-side proxy Pods of `topology`.
    fn live_proxies(&self, namespace: &str, topology: &str) -> Vec<std::sync::Arc<Pod>> {
        self.proxies
            .state()
            .into_iter()
            .filter(|pod| {
                pod.namespace().as_deref() == Some(namespace)
                    && pod.labels().get(TOPOLOGY_LABEL).map(String::as_str) == Some(topology)
                    && live(pod)
            })
            .collect()
    }

    /// The live DB-side proxy Pods of `topology`, by name, with where they answer `/config`
    /// (on `port`).
    pub fn proxy_targets(
        &self,
        namespace: &str,
        topology: &str,
        port: i32,
    ) -> Vec<(String, Target)> {
        let mut targets: Vec<(String, Target)> = self
            .live_proxies(namespace, topology)
            .iter()
            .map(|pod| {
                let target = Target {
                    key: format!("{namespace}/{}", pod.name_any()),
                    address: config_address(pod, port),
                };
                (pod.name_any(), target)
            })
            .collect();
        targets.sort_by(|a, b| a.0.cmp(&b.0));
        targets
    }

    /// Why the live DB-side proxy Pods of `topology` do not run: `pod: problem`, by name;
    /// and whether one of them waits for a node within its grace (look again after it).
    pub fn proxy_problems(&self, namespace: &str, topology: &str, now: i64) -> (Vec<String>, bool) {
        let pods = self.live_proxies(namespace, topology);
        let mut problems: Vec<String> = pods
            .iter()
            .filter_map(|pod| Some(format!("{}: {}", pod.name_any(), pod_problem(pod, now)?)))
            .collect();
        problems.sort();
        let waiting = pods.iter().any(|pod| recently_unscheduled(pod, now));
        (problems, waiting)
    }
}

#[cfg(test)]
mod tests;

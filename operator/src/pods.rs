//! The application Pods that name a topology, for the sidecar counts in its status: a cache
//! of Pods the webhook injected (label `shotover.io/sidecar-of`) and one of Pods that asked for
//! injection (label `shotover.io/inject: "true"`), the latter to find those created without
//! their sidecar. Only metadata and phase are kept.

use std::collections::HashSet;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use shotover_crds::crd::{
    CONFIG_HASH_ANNOTATION, SIDECAR_LABEL, STATUS_ANNOTATION, TOPOLOGY_ANNOTATION,
};

use crate::status::PodObservation;

/// The two Pod caches.
#[derive(Clone)]
pub struct PodStores {
    pub injected: Store<Pod>,
    pub opted_in: Store<Pod>,
}

/// Drops what the counts do not need (a Pod's spec is most of its size).
pub fn strip(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    if let Some(status) = pod.status.as_mut() {
        *status = k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
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
    /// The live Pods of `namespace` that name `topology`, sorted by name.
    pub fn observe(&self, namespace: &str, topology: &str) -> Vec<PodObservation> {
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
                    injected_hash: None,
                });
            }
        }
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }
}

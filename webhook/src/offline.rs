//! `shotover-webhook inject`: the webhook's injection, offline. Reads manifests (Pods, or
//! workloads with a Pod template: Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
//! CronJob) and a ShotoverTopology, and prints the manifests with the sidecar added, exactly
//! as the webhook would add it (the same functions), for review, GitOps, or clusters without
//! the webhook. Other documents pass through unchanged.

use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::core::v1::Pod;
use serde::Deserialize;
use serde_json::{Value, json};
use shotover_crds::crd::{INJECT_LABEL, ShotoverTopology, TOPOLOGY_ANNOTATION};
use shotover_operator::render::{render, source_ports};

use crate::inject::{self, NamespaceMeta, RenderedTopology, Settings};

/// Settings of `shotover-webhook inject`.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectOpts {
    /// The ShotoverTopology to inject (a YAML file with one).
    #[arg(long, short = 't')]
    pub topology: PathBuf,
    /// The manifests (YAML, one or more documents); `-` reads stdin.
    #[arg(long, short = 'f', default_value = "-")]
    pub filename: String,
    /// Inject as a native sidecar (an init container), as on clusters of 1.29 and later,
    /// unless the topology or the Pod says otherwise.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
}

/// Runs `inject`: the injected manifests as YAML, or why not.
pub fn run(opts: &InjectOpts) -> anyhow::Result<String> {
    let topology_text = std::fs::read_to_string(&opts.topology)
        .with_context(|| format!("reading {}", opts.topology.display()))?;
    let mut input = String::new();
    if opts.filename == "-" {
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading stdin")?;
    } else {
        input = std::fs::read_to_string(&opts.filename)
            .with_context(|| format!("reading {}", opts.filename))?;
    }
    inject_manifests(&topology_text, &input, opts.native_sidecar)
}

/// The pure part of [`run`].
pub fn inject_manifests(topology: &str, manifests: &str, native: bool) -> anyhow::Result<String> {
    let topology: ShotoverTopology = serde_json::from_value(yaml_to_json(topology)?)
        .context("the --topology file is not a ShotoverTopology")?;
    let name = topology
        .metadata
        .name
        .clone()
        .ok_or_else(|| anyhow!("the ShotoverTopology has no metadata.name"))?;
    let rendered =
        render(&topology).map_err(|e| anyhow!("ShotoverTopology {name} is invalid: {e}"))?;
    let rendered = RenderedTopology {
        sources: source_ports(&topology),
        hash: rendered.hash,
        topology: topology.clone(),
    };
    let settings = Settings {
        own_namespace: String::new(),
        native_sidecar_default: native,
        allowed_images: Vec::new(),
    };
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(manifests) {
        let value = serde_yaml::Value::deserialize(document).context("reading the manifests")?;
        if value.is_null() {
            continue;
        }
        let mut doc: Value = serde_json::to_value(value)?;
        inject_document(&mut doc, &name, &rendered, &settings)?;
        out.push(serde_yaml::to_string(&doc)?);
    }
    Ok(out.join("---\n"))
}

fn yaml_to_json(text: &str) -> anyhow::Result<Value> {
    let value: serde_yaml::Value = serde_yaml::from_str(text).context("reading YAML")?;
    Ok(serde_json::to_value(value)?)
}

/// Where the Pod template of a kind is.
fn template_path(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

fn inject_document(
    doc: &mut Value,
    topology: &str,
    rendered: &RenderedTopology,
    settings: &Settings,
) -> anyhow::Result<()> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
    let Some(path) = template_path(&kind) else {
        return Ok(());
    };
    let name = doc["metadata"]["name"].as_str().unwrap_or("?").to_owned();
    let namespace = doc["metadata"]["namespace"]
        .as_str()
        .map(str::to_owned)
        .or_else(|| rendered.topology.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let template = doc
        .pointer_mut(path)
        .filter(|t| t.is_object())
        .ok_or_else(|| anyhow!("{kind} {name} has no Pod template (an object) at {path}"))?;
    // The tool is asked explicitly: the Pod is opted in, for this topology (and the output
    // says so, with the label and the annotation).
    let pod_json = json!({
        "metadata": template.get("metadata").cloned().unwrap_or(json!({})),
        "spec": template.get("spec").cloned().unwrap_or(json!({})),
    });
    // Read as a Pod before anything is added to it: a template of the wrong shape (labels
    // that are not a map, say) is an error naming it, not a panic.
    serde_json::from_value::<Pod>(pod_json.clone())
        .with_context(|| format!("{kind} {name}: the Pod template does not read as a Pod"))?;
    let named = pod_json["metadata"]["annotations"][TOPOLOGY_ANNOTATION]
        .as_str()
        .map(str::to_owned);
    if let Some(other) = named.filter(|n| n != topology) {
        bail!("{kind} {name} names ShotoverTopology {other}, not {topology}");
    }
    let mut opted_in = pod_json.clone();
    opted_in["metadata"]["labels"][INJECT_LABEL] = json!("true");
    opted_in["metadata"]["annotations"][TOPOLOGY_ANNOTATION] = json!(topology);
    let pod: Pod = serde_json::from_value(opted_in.clone())
        .with_context(|| format!("{kind} {name}: the Pod template does not read as a Pod"))?;
    let ns = NamespaceMeta::default();
    match inject::select(&pod, &namespace, &ns, settings) {
        Err(refusal) => bail!("{kind} {name}: {}", refusal.message),
        Ok(Err(skip)) => {
            eprintln!("{kind} {name}: not injected: {}", skip.message());
            return Ok(());
        }
        Ok(Ok(_)) => {}
    }
    let injection = inject::inject(&pod, &ns, rendered, settings)
        .map_err(|refusal| anyhow!("{kind} {name}: {}", refusal.message))?;
    for warning in &injection.warnings {
        eprintln!("{kind} {name}: warning: {warning}");
    }
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(injection.patch))?;
    json_patch::patch(&mut opted_in, &patch).context("applying the patch")?;
    if path.is_empty() {
        doc["metadata"] = opted_in["metadata"].take();
        doc["spec"] = opted_in["spec"].take();
    } else {
        template["metadata"] = opted_in["metadata"].take();
        template["spec"] = opted_in["spec"].take();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPOLOGY: &str = r#"
apiVersion: shotover.io/v1alpha1
kind: ShotoverTopology
metadata: {name: cache, namespace: shop}
spec:
  sources:
    - Redis:
        name: redis
        listenAddr: "127.0.0.1:6380"
        chain:
          - RedisSinkSingle: {remoteAddress: "redis.db:6379"}
"#;

    const MANIFESTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: shop}
spec:
  selector: {matchLabels: {app: shop}}
  template:
    metadata: {labels: {app: shop}}
    spec:
      containers: [{name: shop, image: "shop:1"}]
---
apiVersion: v1
kind: Service
metadata: {name: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: report, image: "report:1"}]
"#;

    fn docs(text: &str) -> Vec<Value> {
        serde_yaml::Deserializer::from_str(text)
            .map(|d| {
                serde_json::to_value(serde_yaml::Value::deserialize(d).expect("yaml"))
                    .expect("json")
            })
            .collect()
    }

    /// Found by fuzzing: a template whose labels are not a map (or that is not an object)
    /// was a panic; it is an error naming the workload.
    #[test]
    fn templates_of_the_wrong_shape_are_errors() {
        for manifest in [
            "kind: Pod\nmetadata: {name: p, labels: \"x\"}\nspec: {containers: [{name: a, image: b}]}",
            "kind: Pod\nmetadata: \"m\"\nspec: {}",
            "kind: Deployment\nmetadata: {name: d}\nspec: {template: 5}",
            "kind: Deployment\nmetadata: {name: d}\nspec: {template: {metadata: {annotations: [1]}}}",
        ] {
            let error = inject_manifests(TOPOLOGY, manifest, true).expect_err(manifest);
            assert!(
                format!("{error:#}").contains("Pod template"),
                "{manifest}: {error:#}"
            );
        }
    }

    #[test]
    fn workloads_get_the_sidecar_in_their_pod_template_and_the_rest_passes_through() {
        let out = inject_manifests(TOPOLOGY, MANIFESTS, true).expect("injected");
        let docs = docs(&out);
        assert_eq!(docs.len(), 3);
        let template = &docs[0]["spec"]["template"];
        assert_eq!(template["spec"]["initContainers"][0]["name"], "shotover");
        assert_eq!(
            template["spec"]["initContainers"][0]["restartPolicy"],
            "Always"
        );
        assert_eq!(template["spec"]["containers"][0]["name"], "shop");
        assert_eq!(
            template["metadata"]["labels"]["shotover.io/sidecar-of"],
            "cache"
        );
        assert!(template["metadata"]["annotations"]["shotover.io/status"].is_string());
        assert_eq!(
            docs[1],
            self::docs(MANIFESTS)[1],
            "the Service is unchanged"
        );
        let job = &docs[2]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
        assert_eq!(job["initContainers"][0]["name"], "shotover");

        // Without native sidecars, the proxy is the first container.
        let out = inject_manifests(TOPOLOGY, MANIFESTS, false).expect("injected");
        let docs = self::docs(&out);
        assert_eq!(
            docs[0]["spec"]["template"]["spec"]["containers"][0]["name"],
            "shotover"
        );
        // Injecting the output again changes nothing.
        assert_eq!(inject_manifests(TOPOLOGY, &out, false).expect("again"), out);
    }

    #[test]
    fn an_invalid_topology_or_another_topology_is_an_error() {
        let invalid = TOPOLOGY.replace("127.0.0.1:6380", "127.0.0.1:9001");
        let e = inject_manifests(&invalid, MANIFESTS, true).expect_err("invalid");
        assert!(
            e.to_string().contains("ShotoverTopology cache is invalid"),
            "{e}"
        );
        let other = MANIFESTS.replace(
            "metadata: {labels: {app: shop}}",
            "metadata: {labels: {app: shop}, annotations: {shotover.io/topology: other}}",
        );
        let e = inject_manifests(TOPOLOGY, &other, true).expect_err("other topology");
        assert!(
            e.to_string()
                .contains("names ShotoverTopology other, not cache"),
            "{e}"
        );
    }
}

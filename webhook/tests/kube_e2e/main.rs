//! The webhook and the operator on the real control plane (`eval "$(e2e/services up kube helm)"`):
//! the chart rendered with `helm template` for a URL webhook and applied, the webhook and the
//! operator run as local processes, Deployments whose Pods kube-controller-manager creates.
//! Each test has its own namespaces, release and webhook configuration, which only matches
//! the test's namespace, so the tests run in parallel.

#[path = "../../../operator/tests/kube_e2e/support.rs"]
#[allow(dead_code)]
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde::Deserialize;
use serde_json::{Value, json};
use shotover_crds::crd::{CONFIG_HASH_ANNOTATION, STATUS_ANNOTATION, SidecarStatus};
use support::{
    Cluster, Operator, Process, free_port, get, metric, service_account_kubeconfig, wait_for,
    workspace_binary,
};

const LONG: Duration = Duration::from_secs(60);

fn helm() -> String {
    std::env::var("HELM").unwrap_or_else(|_| {
        panic!("HELM is not set: build helm with\n  eval \"$(e2e/services up helm)\"")
    })
}

/// `helm template RELEASE charts/shotover --namespace NS ARGS...`, for the test cluster's
/// Kubernetes version (offline, helm would assume 1.20, below the chart's kubeVersion).
fn helm_template(release: &str, namespace: &str, args: &[&str]) -> String {
    let chart = repo().join("charts/shotover");
    run(
        Command::new(helm())
            .args(["template", release, chart.to_str().expect("path")])
            .args(["--namespace", namespace])
            .args(["--kube-version", &server_version()])
            .args(args),
        None,
    )
}

/// The apiserver's version (`v1.36.3`).
fn server_version() -> String {
    let out = run(
        Command::new("kubectl").args(["version", "-o", "json"]),
        None,
    );
    let version: Value = serde_json::from_str(&out).expect("kubectl version -o json");
    version["serverVersion"]["gitVersion"]
        .as_str()
        .expect("serverVersion.gitVersion")
        .to_owned()
}

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_path_buf()
}

/// Runs `cmd`, failing the test with its output when it fails; returns stdout.
fn run(cmd: &mut Command, input: Option<&str>) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The webhook process and how to reach it.
struct Webhook {
    process: Process,
    http: String,
}

impl Webhook {
    fn metric(&self, series: &str) -> f64 {
        metric(&get(&self.http, "/metrics").unwrap_or_default(), series).unwrap_or(0.0)
    }
}

/// One test's world: an application namespace (`cluster.ns`), a system namespace for the
/// release, the chart applied, the webhook and the operator running.
struct Setup {
    cluster: Cluster,
    sys: String,
    release: String,
    port: u16,
    webhook: Option<Webhook>,
    operator: Operator,
}

impl Setup {
    async fn new(test: &str, failure_policy: &str, webhook_args: &[&str]) -> Setup {
        let cluster = Cluster::new(test).await;
        static N: AtomicUsize = AtomicUsize::new(0);
        let release = format!(
            "w{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let sys = format!("{release}-system");
        let ns: Namespace =
            serde_json::from_value(json!({"metadata": {"name": sys}})).expect("namespace");
        Api::<Namespace>::all(cluster.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {sys}: {e}"));
        let port = free_port();
        let selector = json!([{
            "key": "kubernetes.io/metadata.name", "operator": "In", "values": [cluster.ns]
        }]);
        let rendered = helm_template(
            &release,
            &sys,
            &[
                "--set",
                &format!("webhook.url=https://127.0.0.1:{port}/inject"),
                "--set",
                &format!("webhook.failurePolicy={failure_policy}"),
                "--set",
                &format!("operator.watchNamespace={}", cluster.ns),
                "--set",
                "webhook.certificate.names={127.0.0.1}",
                // The test runs the webhook and the operator itself. With a node in the
                // cluster (the node tests run in the same control plane) the chart's own Pods
                // would run too, sharing the Secret and renewing its certificate for their
                // own names and lifetime.
                "--set",
                "webhook.replicas=0",
                "--set",
                "operator.replicas=0",
                "--set-json",
                &format!("webhook.namespaceSelector={selector}"),
            ],
        );
        assert!(rendered.contains("kind: MutatingWebhookConfiguration"));
        run(
            Command::new("kubectl").args([
                "apply",
                "--server-side",
                "--force-conflicts",
                "-f",
                "-",
            ]),
            Some(&rendered),
        );
        // Both processes act as the chart's ServiceAccounts: the tests run on its RBAC.
        let operator_kubeconfig = service_account_kubeconfig(&sys, &format!("{release}-operator"));
        let operator = Operator::start_with(
            &cluster.ns,
            &format!("{release}-operator"),
            Some(&operator_kubeconfig),
            &[
                "--lease-namespace",
                &sys,
                "--lease-name",
                &format!("{release}-operator"),
            ],
        );
        let mut setup = Setup {
            operator,
            cluster,
            sys,
            release,
            port,
            webhook: None,
        };
        setup.start_webhook(webhook_args).await;
        setup
    }

    fn config_name(&self) -> String {
        format!("{}-sidecar-injector", self.release)
    }

    /// Starts the webhook registered in the webhook configuration (on `self.port`) and waits
    /// for the `caBundle`.
    async fn start_webhook(&mut self, extra: &[&str]) {
        let webhook = self.spawn_webhook(self.port, extra).await;
        let configs: Api<MutatingWebhookConfiguration> = Api::all(self.cluster.client.clone());
        let name = self.config_name();
        wait_for("the caBundle to be set", LONG, || async {
            let config = configs.get(&name).await.ok()?;
            config
                .webhooks?
                .iter()
                .all(|w| w.client_config.ca_bundle.is_some())
                .then_some(())
        })
        .await;
        self.webhook = Some(webhook);
    }

    /// A webhook process sharing the release's Secret, listening on `port`, once ready.
    async fn spawn_webhook(&self, port: u16, extra: &[&str]) -> Webhook {
        self.spawn_webhook_as(port, extra, &format!("{}-webhook", self.release))
            .await
    }

    /// [`Self::spawn_webhook`], acting as the ServiceAccount `account` of the release's
    /// namespace.
    async fn spawn_webhook_as(&self, port: u16, extra: &[&str], account: &str) -> Webhook {
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(workspace_binary("shotover-webhook", "shotover-webhook"));
        cmd.args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            "--http-addr",
            &http,
            "--namespace",
            &self.sys,
            "--watch-namespace",
            &self.cluster.ns,
            "--secret-name",
            &format!("{}-webhook-tls", self.release),
            "--webhook-config-name",
            &self.config_name(),
            "--cert-name",
            "127.0.0.1",
            "--shutdown-delay",
            "1s",
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .env("KUBECONFIG", service_account_kubeconfig(&self.sys, account));
        let process = Process::start(&format!("webhook :{port}"), &mut cmd);
        wait_for("the webhook to be ready", LONG, || async {
            get(&http, "/readyz").map(|_| ())
        })
        .await;
        Webhook { process, http }
    }

    fn webhook(&self) -> &Webhook {
        self.webhook.as_ref().expect("the webhook runs")
    }

    async fn topology(&self, name: &str) {
        self.cluster
            .create(
                name,
                json!({"sources": [{"Redis": {
                    "name": "redis",
                    "listenAddr": "127.0.0.1:6379",
                    "chain": [{"RedisSinkSingle": {"remoteAddress": "redis.db:6379"}}]
                }}]}),
            )
            .await
            .unwrap_or_else(|e| panic!("cannot create topology {name}: {e}"));
    }

    /// Creates topology `name` and waits until the operator rendered it.
    async fn rendered_topology(&self, name: &str) -> shotover_crds::crd::ShotoverTopologyStatus {
        self.topology(name).await;
        self.cluster
            .status_where(name, "a config hash", |s| s.config_hash.is_some())
            .await
    }

    /// A Deployment whose Pods opt in for topology `cache`.
    async fn opted_in_deployment(&self, name: &str, replicas: i32) {
        self.deployment(
            name,
            replicas,
            json!({"shotover.io/inject": "true"}),
            json!({"shotover.io/topology": "cache"}),
        )
        .await;
    }

    async fn deployment(&self, name: &str, replicas: i32, labels: Value, annotations: Value) {
        let mut pod_labels = json!({"app": name});
        if let (Value::Object(a), Value::Object(b)) = (&mut pod_labels, labels) {
            a.extend(b);
        }
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": pod_labels, "annotations": annotations},
                    "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]},
                },
            },
        }))
        .expect("deployment");
        self.cluster
            .api::<Deployment>()
            .create(&PostParams::default(), &deployment)
            .await
            .unwrap_or_else(|e| panic!("cannot create deployment {name}: {e}"));
    }

    /// Waits until `n` Pods of Deployment `app` exist (created by kube-controller-manager).
    async fn pods(&self, app: &str, n: usize) -> Vec<Pod> {
        let api = self.cluster.api::<Pod>();
        wait_for(&format!("{n} pods of {app}"), LONG, || async {
            let pods = api
                .list(&ListParams::default().labels(&format!("app={app}")))
                .await
                .ok()?;
            (pods.items.len() == n).then_some(pods.items)
        })
        .await
    }

    /// How many times Events with `reason` were recorded (identical Events are one Event
    /// with a series count).
    async fn event_count(&self, reason: &str) -> i32 {
        self.events(reason)
            .await
            .iter()
            .map(|e| e.series.as_ref().map_or(1, |s| s.count.max(1)))
            .sum()
    }

    /// Deletes the Pods of Deployment `app`; its ReplicaSet creates them again (through the
    /// webhook). Unscheduled Pods go at once: there is no kubelet to wait for.
    async fn recreate_pods(&self, app: &str) {
        self.cluster
            .api::<Pod>()
            .delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&format!("app={app}")),
            )
            .await
            .expect("delete pods");
    }

    async fn events(&self, reason: &str) -> Vec<Event> {
        self.cluster
            .api::<Event>()
            .list(&ListParams::default())
            .await
            .expect("events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }

    async fn sidecars_where(
        &self,
        topology: &str,
        what: &str,
        check: impl Fn(&SidecarStatus) -> bool,
    ) -> shotover_crds::crd::ShotoverTopologyStatus {
        self.cluster
            .status_where(topology, what, |s| s.sidecars.as_ref().is_some_and(&check))
            .await
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The webhook configuration is cluster-scoped: remove it with the test.
        let _ = Command::new("kubectl")
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                &self.config_name(),
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.sys, "--wait=false"])
            .output();
        for component in ["operator", "webhook"] {
            let _ = std::fs::remove_file(std::env::temp_dir().join(format!(
                "{}-{}-{component}.kubeconfig",
                self.sys, self.release
            )));
        }
    }
}

/// A bare Pod named `name` that opts in for topology `cache`.
fn opted_in_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"shotover.io/inject": "true"},
                     "annotations": {"shotover.io/topology": "cache"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }))
    .expect("pod")
}

fn sidecar(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::Container> {
    pod.spec
        .as_ref()?
        .init_containers
        .as_ref()?
        .first()
        .filter(|c| c.name == "shotover")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotated_deployment_pods_are_injected_and_others_untouched() {
    let setup = Setup::new("injects_deployments", "Fail", &[]).await;
    let hash = setup
        .rendered_topology("cache")
        .await
        .config_hash
        .expect("hash");
    setup
        .deployment(
            "web",
            2,
            json!({"shotover.io/inject": "true"}),
            json!({"shotover.io/topology": "cache", "shotover.io/proxy-memory-limit": "64Mi"}),
        )
        .await;
    setup.deployment("plain", 1, json!({}), json!({})).await;

    for pod in setup.pods("web", 2).await {
        let name = pod.name_any();
        let c = sidecar(&pod).unwrap_or_else(|| panic!("{name} has no sidecar: {pod:?}"));
        assert_eq!(c.restart_policy.as_deref(), Some("Always"), "{name}");
        let startup = c.startup_probe.as_ref().expect("startup probe");
        assert_eq!(
            startup.http_get.as_ref().and_then(|h| h.path.as_deref()),
            Some("/ready")
        );
        assert!(c.readiness_probe.is_some() && c.liveness_probe.is_some());
        let sc = c.security_context.as_ref().expect("securityContext");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
            Some("RuntimeDefault")
        );
        let limits = c
            .resources
            .as_ref()
            .and_then(|r| r.limits.clone())
            .unwrap_or_default();
        assert_eq!(limits.get("memory").map(|q| q.0.as_str()), Some("64Mi"));
        let volumes = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        assert!(
            volumes.iter().any(|v| v
                .config_map
                .as_ref()
                .is_some_and(|c| c.name == "cache-shotover-config")),
            "{volumes:?}"
        );
        let annotations = pod.annotations();
        assert_eq!(annotations.get(CONFIG_HASH_ANNOTATION), Some(&hash));
        assert!(annotations.contains_key(STATUS_ANNOTATION));
        assert_eq!(
            pod.spec.as_ref().map(|s| s.containers[0].name.as_str()),
            Some("app")
        );
    }
    for pod in setup.pods("plain", 1).await {
        assert!(sidecar(&pod).is_none());
        assert!(!pod.annotations().contains_key(STATUS_ANNOTATION));
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.containers.len(), 1);
        assert!(spec.init_containers.is_none());
    }
    setup
        .sidecars_where("cache", "2 sidecars", |s| {
            s.injected == 2 && s.outdated == 0 && s.not_injected == 0
        })
        .await;
    wait_for("the SidecarInjected Events", LONG, || async {
        (setup.event_count("SidecarInjected").await >= 2).then_some(())
    })
    .await;
    assert_eq!(
        setup
            .webhook()
            .metric("shotover_webhook_admissions_total{result=\"injected\",reason=\"injected\"}"),
        2.0
    );

    // A dry run gets the same answer and leaves no Event and no injection count behind.
    let events_before = setup.event_count("SidecarInjected").await;
    let pod = opted_in_pod("dry");
    let dry = setup
        .cluster
        .api::<Pod>()
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &pod,
        )
        .await
        .expect("a dry run is admitted");
    assert!(sidecar(&dry).is_some(), "the dry run shows the sidecar");
    assert!(
        setup
            .cluster
            .api::<Pod>()
            .get_opt("dry")
            .await
            .expect("get")
            .is_none(),
        "nothing was created"
    );
    assert_eq!(
        setup
            .webhook()
            .metric("shotover_webhook_dry_run_requests_total"),
        1.0
    );
    assert_eq!(
        setup
            .webhook()
            .metric("shotover_webhook_admissions_total{result=\"injected\",reason=\"injected\"}"),
        2.0
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(setup.event_count("SidecarInjected").await, events_before);
    setup.operator.assert_quiet(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_asking_for_a_missing_or_invalid_topology_are_refused_saying_why() {
    let setup = Setup::new("refuses", "Fail", &[]).await;
    // Accepted by the CRD, refused by the proxy's own validation: the source listens on the
    // observability port.
    setup
        .cluster
        .create(
            "broken",
            json!({"sources": [{"Redis": {
                "name": "redis", "listenAddr": "127.0.0.1:9001",
                "chain": [{"RedisSinkSingle": {"remoteAddress": "redis.db:6379"}}]
            }}]}),
        )
        .await
        .expect("the CRD accepts it");
    setup.topology("cache").await;
    let pods = setup.cluster.api::<Pod>();
    let create = |name: &str, annotations: Value, extra_spec: Value| {
        let mut spec = json!({"containers": [{"name": "app", "image": "app:1"}]});
        if let (Value::Object(a), Value::Object(b)) = (&mut spec, extra_spec) {
            a.extend(b);
        }
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"shotover.io/inject": "true"}, "annotations": annotations},
            "spec": spec,
        }))
        .expect("pod");
        let pods = pods.clone();
        async move { pods.create(&PostParams::default(), &pod).await }
    };
    let refused = |result: Result<Pod, kube::Error>| match result {
        Err(kube::Error::Api(status)) => status.message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let ns = &setup.cluster.ns;
    let message = refused(create("a", json!({"shotover.io/topology": "nope"}), json!({})).await);
    assert!(
        message.contains(&format!("ShotoverTopology {ns}/nope (named by the annotation shotover.io/topology) does not exist")),
        "{message}"
    );
    let message = refused(create("b", json!({"shotover.io/topology": "broken"}), json!({})).await);
    assert!(
        message.contains(&format!("ShotoverTopology {ns}/broken is invalid"))
            && message.contains("observabilityPort"),
        "{message}"
    );
    let message = refused(
        create(
            "c",
            json!({"shotover.io/topology": "cache", "shotover.io/proxy-cpu-limit": "fast"}),
            json!({}),
        )
        .await,
    );
    assert!(
        message.contains("shotover.io/proxy-cpu-limit: `fast`"),
        "{message}"
    );
    let message = refused(create("d", json!({}), json!({})).await);
    assert!(message.contains("names a ShotoverTopology"), "{message}");

    // hostNetwork Pods are not even sent (matchConditions), and never injected.
    let host = create(
        "e",
        json!({"shotover.io/topology": "nope"}),
        json!({"hostNetwork": true}),
    )
    .await
    .expect("a hostNetwork Pod is created");
    assert!(sidecar(&host).is_none());
    assert_eq!(
        setup.webhook().metric(
            "shotover_webhook_admissions_total{result=\"refused\",reason=\"topology-not-found\"}"
        ),
        1.0
    );
    assert_eq!(
        setup.webhook().metric(
            "shotover_webhook_admissions_total{result=\"refused\",reason=\"topology-invalid\"}"
        ),
        1.0
    );
    // The refusal reaches the topology's Events when it is the topology's fault.
    wait_for("the refusal Event", LONG, || async {
        (!setup.events("SidecarInjectionRefused").await.is_empty()).then_some(())
    })
    .await;
}

/// Someone else's invalid edit of a topology does not block new Pods: they get the last
/// valid configuration (the one the operator's ConfigMap still holds, from the spec the
/// operator keeps in `status.lastValidSpec`), with a Warning Event on the topology. A
/// topology that was never valid still refuses (tested above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_the_last_valid_config_while_their_topology_is_invalid() {
    let setup = Setup::new("last_valid", "Fail", &[]).await;
    let status = setup.rendered_topology("cache").await;
    let hash = status.config_hash.clone().expect("a config hash");
    assert!(status.last_valid_spec.is_some(), "{status:?}");
    // Accepted by the CRD, refused by the proxy's validation: the source now listens on
    // the observability port.
    setup
        .cluster
        .patch(
            "cache",
            json!({"spec": {"sources": [{"Redis": {
                "name": "redis",
                "listenAddr": "127.0.0.1:9001",
                "chain": [{"RedisSinkSingle": {"remoteAddress": "redis.db:6379"}}]
            }}]}}),
        )
        .await;
    let status = setup
        .cluster
        .status_where("cache", "ConfigValid=False", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "ConfigValid" && c.status == "False")
        })
        .await;
    assert_eq!(
        status.config_hash.as_deref(),
        Some(hash.as_str()),
        "the last valid hash stays"
    );
    let pod = opted_in_pod("after-the-edit");
    let pod = setup
        .cluster
        .api::<Pod>()
        .create(&PostParams::default(), &pod)
        .await
        .expect("admitted with the last valid configuration");
    let sidecar = sidecar(&pod).expect("injected");
    assert!(
        sidecar
            .ports
            .iter()
            .flatten()
            .any(|p| p.container_port == 6379),
        "the last valid spec's port: {sidecar:?}"
    );
    assert_eq!(
        pod.annotations().get(CONFIG_HASH_ANNOTATION),
        Some(&hash),
        "injected with the last valid configuration"
    );
    let event = wait_for("the Warning Event on the topology", LONG, || async {
        setup
            .events("SidecarInjectedLastValidConfig")
            .await
            .into_iter()
            .find(|e| e.type_.as_deref() == Some("Warning"))
    })
    .await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains("is invalid") && note.contains(&hash) && note.contains("observabilityPort"),
        "{note}"
    );
}

/// Deleting a topology that Pods still run as a sidecar is allowed (it changes nothing for
/// them) but never silent: `kubectl delete` prints the webhook's warning. One that no Pod
/// runs goes without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topology_still_in_use_warns() {
    let setup = Setup::new("delete_warns", "Fail", &[]).await;
    setup.rendered_topology("cache").await;
    setup.rendered_topology("unused").await;
    setup.opted_in_deployment("app", 1).await;
    assert!(sidecar(&setup.pods("app", 1).await[0]).is_some());
    setup
        .sidecars_where("cache", "1 injected", |s| s.injected == 1)
        .await;
    let ns = setup.cluster.ns.clone();
    let delete = |name: &str| {
        let out = Command::new("kubectl")
            .args(["delete", "shotovertopology", name, "-n", &ns])
            .output()
            .expect("kubectl delete");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let stderr = delete("cache");
    assert!(
        stderr.contains(&format!(
            "Warning: ShotoverTopology {ns}/cache still runs as a sidecar in 1 Pod"
        )),
        "{stderr}"
    );
    assert!(!delete("unused").contains("Warning"), "no Pod runs it");
}

/// POSTs an AdmissionReview of `pod` (a JSON object, CREATE in `namespace`) straight to a
/// webhook on `port`; returns the HTTP status and the body.
fn review(port: u16, namespace: &str, pod: Value) -> (u16, String) {
    let body = json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "test"},
            "object": pod,
            "dryRun": false,
        }
    });
    let out = run(
        Command::new("curl").args([
            "-sk",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
            "-w",
            "\n%{http_code}",
            &format!("https://127.0.0.1:{port}/inject"),
        ]),
        Some(&body.to_string()),
    );
    let (body, code) = out
        .trim_end()
        .rsplit_once('\n')
        .expect("curl's status line");
    (code.parse().expect("HTTP status"), body.to_owned())
}

/// The webhook never answers for someone else's mistake with a refusal that looks like the
/// Pod's: when the apiserver cannot be read on a cache miss (here: the webhook's identity
/// may list and watch topologies but not get one), it answers HTTP 500, so the webhook's
/// `failurePolicy` decides; a Pod that does not parse is refused as malformed, never
/// admitted without its sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_errors_are_http_500_and_unparsable_pods_are_refused_as_malformed() {
    let setup = Setup::new("apiserver_errors", "Fail", &[]).await;
    let (sys, release) = (&setup.sys, &setup.release);
    let limited = format!("{release}-limited");
    let rbac = format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {{name: {limited}}}
rules:
  - {{apiGroups: [shotover.io], resources: [shotovertopologies], verbs: [list, watch]}}
  - {{apiGroups: [""], resources: [namespaces], verbs: [get, list, watch]}}
  - {{apiGroups: [""], resources: [nodes], verbs: [list]}}
  - {{apiGroups: [events.k8s.io], resources: [events], verbs: [create, patch]}}
  - {{apiGroups: [admissionregistration.k8s.io], resources: [mutatingwebhookconfigurations], verbs: [get, patch]}}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {{name: {limited}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {limited}}}
subjects: [{{kind: ServiceAccount, name: {limited}, namespace: {sys}}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {limited}, namespace: {sys}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {release}-webhook-certificate}}
subjects: [{{kind: ServiceAccount, name: {limited}, namespace: {sys}}}]
"#
    );
    run(
        Command::new("kubectl").args(["apply", "-f", "-"]),
        Some(&rbac),
    );
    let port = free_port();
    let webhook = setup.spawn_webhook_as(port, &[], &limited).await;
    let ns = &setup.cluster.ns;
    let pod = |annotations: Value, spec: Value| {
        json!({
            "metadata": {"name": "p", "namespace": ns, "labels": {"shotover.io/inject": "true"},
                         "annotations": annotations},
            "spec": spec,
        })
    };
    let containers = json!({"containers": [{"name": "app", "image": "app:1"}]});

    // Not in the cache (it does not exist): the webhook must ask, and may not.
    let (code, body) = review(
        port,
        ns,
        pod(
            json!({"shotover.io/topology": "not-cached"}),
            containers.clone(),
        ),
    );
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains(&format!("cannot read ShotoverTopology {ns}/not-cached"))
            && body.contains("forbidden"),
        "{body}"
    );
    assert_eq!(
        webhook.metric(
            "shotover_webhook_admissions_total{result=\"error\",reason=\"apiserver-unavailable\"}"
        ),
        1.0
    );
    // The webhook with its real rights says the topology does not exist (a refusal).
    let (code, body) = review(
        setup.port,
        ns,
        pod(
            json!({"shotover.io/topology": "not-cached"}),
            containers.clone(),
        ),
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"allowed\":false") && body.contains("does not exist"),
        "{body}"
    );

    // A Pod whose containers are not a list.
    let (code, body) = review(
        port,
        ns,
        pod(
            json!({"shotover.io/topology": "cache"}),
            json!({"containers": "app"}),
        ),
    );
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).expect("an AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["allowed"], json!(false), "{body}");
    assert_eq!(response["status"]["code"], json!(400), "{body}");
    assert_eq!(response["status"]["reason"], json!("malformed"), "{body}");
    assert!(
        response["status"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("the Pod does not parse")),
        "{body}"
    );
    assert_eq!(
        webhook
            .metric("shotover_webhook_admissions_total{result=\"refused\",reason=\"malformed\"}"),
        1.0
    );
    drop(webhook);
    run(
        Command::new("kubectl").args(["delete", "--ignore-not-found", "-f", "-"]),
        Some(&rbac),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_webhook_down_and_failure_policy_ignore_pods_run_uninjected_and_status_says_so() {
    let mut setup = Setup::new("webhook_down", "Ignore", &[]).await;
    setup.rendered_topology("cache").await;
    setup.opted_in_deployment("before", 1).await;
    assert!(sidecar(&setup.pods("before", 1).await[0]).is_some());

    let mut webhook = setup.webhook.take().expect("webhook");
    webhook.process.stop();
    setup.opted_in_deployment("during", 2).await;
    for pod in setup.pods("during", 2).await {
        assert!(sidecar(&pod).is_none(), "created without the webhook");
    }
    let status = setup
        .sidecars_where("cache", "2 not injected", |s| {
            s.injected == 1 && s.not_injected == 2
        })
        .await;
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "SidecarsUpToDate")
        .expect("condition");
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_str()),
        ("False", "NotInjected")
    );
    assert!(
        condition.message.contains("during-"),
        "{}",
        condition.message
    );
    wait_for("the NotInjected Warning", LONG, || async {
        setup
            .events("NotInjected")
            .await
            .iter()
            .any(|e| e.type_.as_deref() == Some("Warning"))
            .then_some(())
    })
    .await;

    // Back up: recreate the Pods and they come back with the sidecar.
    setup.start_webhook(&[]).await;
    setup.recreate_pods("during").await;
    setup
        .sidecars_where("cache", "all 3 injected", |s| {
            s.injected == 3 && s.not_injected == 0
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_rotates_under_load_with_no_failed_admission() {
    // A 6 s certificate renewed in its last third, checked every second, by two replicas
    // sharing the Secret (the second is not registered: it only renews and reloads).
    let cert_args = ["--cert-lifetime", "6s", "--cert-check-interval", "1s"];
    let setup = Setup::new("cert_rotation", "Fail", &cert_args).await;
    let replica = setup.spawn_webhook(free_port(), &cert_args).await;
    setup.topology("cache").await;
    let secrets = Api::<Secret>::namespaced(setup.cluster.client.clone(), &setup.sys);
    let secret_name = format!("{}-webhook-tls", setup.release);
    let tls_crt = |s: Secret| s.data.and_then(|d| d.get("tls.crt").cloned());
    let first_cert = tls_crt(secrets.get(&secret_name).await.expect("secret"));
    let configs: Api<MutatingWebhookConfiguration> = Api::all(setup.cluster.client.clone());
    let bundle = || async {
        configs
            .get(&setup.config_name())
            .await
            .expect("config")
            .webhooks
            .expect("webhooks")[0]
            .client_config
            .ca_bundle
            .clone()
    };
    let first_bundle = bundle().await;

    let pods = setup.cluster.api::<Pod>();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "load-", "labels": {"shotover.io/inject": "true"},
                     "annotations": {"shotover.io/topology": "cache"}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]},
    }))
    .expect("pod");
    let start = std::time::Instant::now();
    let mut admitted = 0;
    while start.elapsed() < Duration::from_secs(15) {
        let created = pods
            .create(&PostParams::default(), &pod)
            .await
            .unwrap_or_else(|e| panic!("admission failed after {admitted} Pods: {e}"));
        assert!(sidecar(&created).is_some());
        admitted += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewals = setup
        .webhook()
        .metric("shotover_webhook_certificate_renewals_total");
    let reloads = setup
        .webhook()
        .metric("shotover_webhook_certificate_reloads_total");
    let replica_renewals = replica.metric("shotover_webhook_certificate_renewals_total");
    let replica_reloads = replica.metric("shotover_webhook_certificate_reloads_total");
    assert!(
        renewals + replica_renewals >= 2.0,
        "renewals {renewals} + {replica_renewals}"
    );
    assert!(reloads >= 2.0, "reloads {reloads}");
    assert!(
        replica_reloads >= 2.0,
        "the second replica reloads {replica_reloads}"
    );
    // Renewing together is not an error: one write wins, the other replica reads it.
    setup.webhook().process.assert_quiet(&[]);
    replica.process.assert_quiet(&[]);
    assert_ne!(
        tls_crt(secrets.get(&secret_name).await.expect("secret")),
        first_cert,
        "the Secret holds a new certificate"
    );
    assert_eq!(bundle().await, first_bundle, "the caBundle never changed");
    assert!(admitted > 50, "{admitted}");
}

/// The sidecar counts come from what the proxies say they run (`GET /config`), not from
/// the Pods' annotations. There is no kubelet here: the test plays it, marking a Pod running
/// on 127.0.0.1 and running a real proxy on the ConfigMap's files, then updating those files
/// the way the kubelet updates a mounted ConfigMap (an atomic swap). The real kubelet does
/// it in `node_e2e`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_count_as_outdated_by_what_their_proxies_say_until_they_reload() {
    let setup = Setup::new("outdated", "Fail", &[]).await;
    let (source_port, observability_port) = (free_port(), free_port());
    let spec = |target: &str| {
        json!({
            "observabilityPort": observability_port,
            "sources": [{"Redis": {
                "name": "redis", "listenAddr": format!("127.0.0.1:{source_port}"),
                "chain": [{"RedisSinkSingle": {"remoteAddress": target}}]
            }}]
        })
    };
    setup
        .cluster
        .create("cache", spec("redis.db:6379"))
        .await
        .unwrap_or_else(|e| panic!("cannot create topology cache: {e}"));
    let first = setup
        .cluster
        .status_where("cache", "a config hash", |s| s.config_hash.is_some())
        .await
        .config_hash
        .expect("hash");
    setup.opted_in_deployment("web", 2).await;
    let pods = setup.pods("web", 2).await;
    // Not running: counted as injected, neither outdated nor silent.
    setup
        .sidecars_where("cache", "2 injected, not started", |s| {
            s.injected == 2 && s.outdated == 0 && s.unreported == 0
        })
        .await;

    // One Pod "runs" on 127.0.0.1, and nothing answers on its observability port yet.
    let running = pods[0].name_any();
    let native = pods[0]
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.name == "shotover"));
    let proxy_status = json!([{
        "name": "shotover", "image": "shotover", "imageID": "", "ready": true, "started": true,
        "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
    }]);
    let statuses = if native {
        "initContainerStatuses"
    } else {
        "containerStatuses"
    };
    setup
        .cluster
        .api::<Pod>()
        .patch_status(
            &running,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"status": {
                "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                statuses: proxy_status,
            }})),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot mark {running} running: {e}"));
    let silent = setup
        .sidecars_where("cache", "1 unreported", |s| {
            s.injected == 2 && s.unreported == 1 && s.outdated == 0
        })
        .await;
    let condition = |status: &shotover_crds::crd::ShotoverTopologyStatus| {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == "SidecarsUpToDate")
            .cloned()
            .expect("condition")
    };
    let c = condition(&silent);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Unreported")
    );
    assert!(
        c.message.contains(&format!("{running} (connecting: ")),
        "{}",
        c.message
    );

    // The proxy runs the ConfigMap's files, as the kubelet would have mounted them.
    let files =
        std::env::temp_dir().join(format!("shotover-kube-e2e-outdated-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&files);
    std::fs::create_dir_all(&files).expect("dir");
    let configmaps = setup.cluster.api::<k8s_openapi::api::core::v1::ConfigMap>();
    let write_files = async |what: &str| {
        let data = configmaps
            .get("cache-shotover-config")
            .await
            .expect("configmap")
            .data
            .expect("data");
        swap_in(&files, what, &data);
    };
    write_files("first").await;
    let _proxy = Process::start(
        "proxy",
        Command::new(workspace_binary("shotover", "shotover")).args([
            "--topology-file",
            &files.join("topology.yaml").display().to_string(),
            "--config-file",
            &files.join("config.yaml").display().to_string(),
            "--watch-interval-ms",
            "200",
        ]),
    );
    let up = setup
        .sidecars_where("cache", "1 running sidecar up to date", |s| {
            s.injected == 2 && s.unreported == 0 && s.outdated == 0
        })
        .await;
    let c = condition(&up);
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "UpToDate"));
    assert_eq!(
        c.message,
        format!("1 running sidecars run configuration {first} (1 not started yet)")
    );

    // A new chain: the running proxy is outdated, whatever the Pod's annotation says...
    setup
        .cluster
        .patch("cache", json!({"spec": spec("redis.other:6379")}))
        .await;
    let outdated = setup
        .sidecars_where("cache", "1 outdated", |s| {
            s.injected == 2 && s.outdated == 1
        })
        .await;
    let second = outdated.config_hash.clone().expect("hash");
    assert_ne!(second, first);
    let c = condition(&outdated);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "Outdated")
    );
    assert!(
        c.message.starts_with(&format!(
            "1 of 1 running sidecars do not run configuration {second}: {running} (runs {first})"
        )),
        "{}",
        c.message
    );
    // ...until it reloads the updated files, in the same process, the Pods untouched.
    write_files("second").await;
    let reloaded = setup
        .sidecars_where("cache", "up to date after the reload", |s| {
            s.injected == 2 && s.outdated == 0 && s.unreported == 0
        })
        .await;
    assert_eq!(reloaded.config_hash.as_deref(), Some(second.as_str()));
    assert_eq!(condition(&reloaded).reason, "UpToDate");
    assert_eq!(setup.event_count("Outdated").await, 1);
    let after: Vec<String> = setup
        .pods("web", 2)
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    let before: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(after, before, "no Pod was replaced");
}

/// Writes the files of a ConfigMap into `dir` the way the kubelet updates a mounted one: into
/// a new folder, then each file's symlink swapped by a rename.
fn swap_in(dir: &std::path::Path, version: &str, data: &BTreeMap<String, String>) {
    let next = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&next).expect("dir");
    for (file, content) in data {
        std::fs::write(next.join(file), content).expect("write");
        let link = dir.join(format!("{file}.tmp"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(next.join(file), &link).expect("symlink");
        std::fs::rename(&link, dir.join(file)).expect("swap");
    }
}

/// What platform teams expect of the chart: namespace users get the CRD through
/// Kubernetes' own `view` and `edit` roles (ClusterRole aggregation, on the real apiserver
/// and controller manager); a mistyped or out-of-range value is refused by
/// `values.schema.json`; a Kubernetes older than the chart's `kubeVersion` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_users_get_the_crd_through_view_and_edit_and_bad_values_are_refused() {
    let setup = Setup::new("aggregated_roles", "Fail", &[]).await;
    let ns = setup.cluster.ns.clone();
    let bindings = format!(
        r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: alice-edit, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: alice}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: bob-view, namespace: {ns}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}
subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: bob}}]
"#
    );
    run(
        Command::new("kubectl").args(["apply", "-f", "-"]),
        Some(&bindings),
    );
    let can = |user: &str, verb: &str| {
        let out = Command::new("kubectl")
            .args(["auth", "can-i", verb, "shotovertopologies.shotover.io"])
            .args(["--as", user, "-n", &ns])
            .output()
            .expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    // The aggregation controller fills `edit` and `view` a moment after the chart is applied.
    wait_for(
        "edit and view to include ShotoverTopologies",
        LONG,
        || async { (can("alice", "create") && can("bob", "list")).then_some(()) },
    )
    .await;
    assert!(can("alice", "delete"), "edit may delete");
    assert!(!can("bob", "create"), "view may not create");
    assert!(!can("bob", "delete"), "view may not delete");
    let can_scale = |user: &str, verb: &str| {
        let out = Command::new("kubectl")
            .args([
                "auth",
                "can-i",
                verb,
                "shotovertopologies.shotover.io",
                "--subresource=scale",
            ])
            .args(["--as", user, "-n", &ns])
            .output()
            .expect("kubectl auth can-i");
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    assert!(can_scale("alice", "patch"), "edit may kubectl scale");
    assert!(can_scale("bob", "get"), "view may read the scale");
    assert!(!can_scale("bob", "patch"), "view may not scale");

    let chart = repo().join("charts/shotover");
    let template = |args: &[&str]| {
        Command::new(helm())
            .args(["template", "t", chart.to_str().expect("path")])
            .args(args)
            .output()
            .expect("helm template")
    };
    let version = server_version();
    for (args, expected) in [
        (
            vec![
                "--kube-version",
                &version,
                "--set",
                "webhook.failurPolicy=Fail",
            ],
            "additional properties 'failurPolicy' not allowed",
        ),
        (
            vec![
                "--kube-version",
                &version,
                "--set",
                "webhook.failurePolicy=Sometimes",
            ],
            "value must be one of 'Fail', 'Ignore'",
        ),
        (
            vec![
                "--kube-version",
                &version,
                "--set",
                "webhook.timeoutSeconds=60",
            ],
            "/webhook/timeoutSeconds",
        ),
        (
            vec!["--kube-version", "1.29.0"],
            "chart requires kubeVersion: >=1.30.0-0",
        ),
    ] {
        let out = template(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(expected),
            "helm template {args:?}: {stderr}"
        );
    }
    run(
        Command::new("kubectl").args(["delete", "-f", "-"]),
        Some(&bindings),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_yaml_is_the_rendered_chart_and_the_apiserver_accepts_it() {
    let cluster = Cluster::new("install_yaml").await;
    let repo = repo();
    let rendered = helm_template(
        "shotover",
        "shotover-system",
        &[
            "--include-crds",
            "--skip-tests",
            "--set",
            "createNamespace=true",
        ],
    );
    let checked_in = std::fs::read_to_string(repo.join("install.yaml")).expect("install.yaml");
    let body: String = checked_in
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        body == rendered,
        "install.yaml is stale: run charts/render-install"
    );
    let chart_crd =
        std::fs::read_to_string(repo.join("charts/shotover/crds/shotovertopology.yaml"))
            .expect("chart CRD");
    assert_eq!(
        chart_crd,
        shotover_crds::crd::crd_yaml(),
        "the chart's CRD is stale: run charts/render-install"
    );
    for kind in [
        "CustomResourceDefinition",
        "MutatingWebhookConfiguration",
        "PodDisruptionBudget",
        "ClusterRole",
        "Deployment",
        "Service",
    ] {
        assert!(rendered.contains(&format!("kind: {kind}\n")), "{kind}");
    }
    assert!(rendered.contains("resourceNames: [shotover-sidecar-injector]"));
    assert!(rendered.contains("failurePolicy: Fail"));
    assert!(rendered.contains("timeoutSeconds: 5"));
    // The apiserver accepts every object (server-side dry run, in the namespace it names).
    let _ = Command::new("kubectl")
        .args(["create", "namespace", "shotover-system"])
        .output();
    run(
        Command::new("kubectl").args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            repo.join("install.yaml").to_str().expect("path"),
        ]),
        None,
    );
    // The cert-manager variant: a Certificate and the CA injection annotation instead.
    let cert_manager = helm_template(
        "shotover",
        "shotover-system",
        &["--set", "webhook.certManager.enabled=true"],
    );
    assert!(cert_manager.contains("kind: Certificate\n"));
    assert!(
        cert_manager.contains("cert-manager.io/inject-ca-from: shotover-system/shotover-webhook")
    );
    assert!(cert_manager.contains("--cert-mode=files"));
    assert!(!cert_manager.contains("mutatingwebhookconfigurations"));
    // The ServiceMonitors (off by default) each select a Service of the chart by its labels,
    // on a port of that Service named as the endpoint says.
    assert!(!rendered.contains("kind: ServiceMonitor"));
    let monitored = helm_template(
        "shotover",
        "shotover-system",
        &["--set", "serviceMonitor.enabled=true"],
    );
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&monitored)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let monitors: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ServiceMonitor")
        .collect();
    assert_eq!(monitors.len(), 2, "the operator's and the webhook's");
    for monitor in monitors {
        let wanted = monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("matchLabels");
        let port = &monitor["spec"]["endpoints"][0]["port"];
        let service = docs
            .iter()
            .filter(|d| d["kind"] == "Service")
            .find(|d| wanted.iter().all(|(k, v)| &d["metadata"]["labels"][k] == v))
            .unwrap_or_else(|| panic!("no Service for {}", monitor["metadata"]["name"]));
        assert!(
            service["spec"]["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .any(|p| &p["name"] == port),
            "{} has no port {port}",
            service["metadata"]["name"]
        );
    }
    // The NetworkPolicies (on by default) each select the Pods of one Deployment of the chart,
    // and open only ports its container names: the webhook's admission port and the HTTP
    // port of both.
    let default_docs: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .filter_map(|d| Value::deserialize(d).ok())
        .filter(|d| d.is_object())
        .collect();
    let policies: Vec<&Value> = default_docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    assert_eq!(policies.len(), 2, "the operator's and the webhook's");
    let mut opened = Vec::new();
    for policy in policies {
        let wanted = policy["spec"]["podSelector"]["matchLabels"]
            .as_object()
            .expect("matchLabels");
        let deployment = default_docs
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .find(|d| {
                wanted
                    .iter()
                    .all(|(k, v)| &d["spec"]["template"]["metadata"]["labels"][k] == v)
            })
            .unwrap_or_else(|| panic!("no Deployment for {}", policy["metadata"]["name"]));
        let ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
        for rule in policy["spec"]["ingress"].as_array().expect("ingress") {
            for port in rule["ports"].as_array().expect("ports") {
                assert!(
                    ports
                        .as_array()
                        .expect("ports")
                        .iter()
                        .any(|p| p["name"] == port["port"]),
                    "{} opens {} that its Pods do not have",
                    policy["metadata"]["name"],
                    port["port"]
                );
                opened.push(format!(
                    "{} {}",
                    policy["metadata"]["name"].as_str().unwrap_or_default(),
                    port["port"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    opened.sort();
    assert_eq!(
        opened,
        [
            "shotover-operator http",
            "shotover-webhook http",
            "shotover-webhook https"
        ]
    );
    let only_apiserver = helm_template(
        "shotover",
        "shotover-system",
        &["--set", "networkPolicy.apiserverCIDRs={10.245.0.1/32}"],
    );
    assert!(only_apiserver.contains("cidr: \"10.245.0.1/32\""));
    assert!(!only_apiserver.contains("0.0.0.0/0"));
    drop(cluster);
}

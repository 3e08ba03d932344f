//! The whole story in Pods, on a real node (`eval "$(e2e/services up kube-node helm)"`, the
//! images from `images/build` imported with `e2e/services load`): the chart installed with
//! `helm install`, the operator and the webhook running as Pods, Redis as a StatefulSet Pod,
//! a DB-side tier of proxies in front of it, and an application whose Pods get the proxy as a
//! sidecar, with the traffic going app -> sidecar -> DB-side Service -> proxy Pod -> Redis.
//!
//! One release per test run, in its own namespace (Pod Security `restricted` enforced), with
//! `operator.watchNamespace` set to the run's application namespace, so the Pods of this run
//! reconcile and inject there only and leave every other test alone. Each test uses names of
//! its own in that namespace. Everything goes through `kubectl` and `helm`, as an operator
//! of a cluster would; on failure a test prints the state of both namespaces.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const LONG: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------- tools

fn env(name: &str, how: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: {how}"))
}

/// Runs a command, giving its stdout, or its stderr as the error.
fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    if let Some(input) = input {
        stdin.write_all(input.as_bytes()).expect("write stdin");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn kubectl(args: &[&str]) -> Result<String, String> {
    run("kubectl", args, None)
}

/// `kubectl`, failing the test when it fails.
fn k(args: &[&str]) -> String {
    kubectl(args).unwrap_or_else(|e| panic!("{e}"))
}

fn apply(namespace: &str, manifest: &Value) {
    let text = serde_json::to_string(manifest).expect("json");
    run(
        "kubectl",
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-n",
            namespace,
            "-f",
            "-",
        ],
        Some(&text),
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn get_json(args: &[&str]) -> Option<Value> {
    let mut full = vec!["get", "-o", "json"];
    full.extend_from_slice(args);
    serde_json::from_str(&kubectl(&full).ok()?).ok()
}

/// Polls `check` every 250 ms until it gives a value, failing after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The value of one series in a Prometheus exposition (summed over matching lines).
fn metric(exposition: &str, series: &str) -> Option<f64> {
    let values: Vec<f64> = exposition
        .lines()
        .filter(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{', ',']))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// A Pod's HTTP endpoint through the apiserver's Pod proxy (as `kubectl get --raw` does).
fn pod_http(namespace: &str, pod: &str, port: u16, path: &str) -> Result<String, String> {
    kubectl(&[
        "get",
        "--raw",
        &format!("/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy{path}"),
    ])
}

// ---------------------------------------------------------------------------------- install

struct Install {
    /// The release's namespace (operator, webhook, Lease, certificate Secret).
    system: String,
    release: String,
    /// Where the operator reconciles and the webhook injects: every test's objects.
    apps: String,
    proxy_image: String,
    tools_image: String,
}

/// Installs the chart once per test run, after checking that the node and the images are
/// there, and waits for the operator and the webhook to be Ready by their own probes.
fn install() -> &'static Install {
    static INSTALL: OnceLock<Install> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    INSTALL.get_or_init(|| {
        env("KUBECONFIG", "start the node with\n  eval \"$(e2e/services up kube-node helm)\"");
        let helm = env("HELM", "build helm with\n  eval \"$(e2e/services up helm)\"");
        let node = env(
            "KUBE_NODE_NAME",
            "these tests need a real node: eval \"$(e2e/services up kube-node)\"",
        );
        let tools_image = env("KUBE_NODE_TOOLS_IMAGE", "start the node with e2e/services up kube-node");
        let ready = k(&[
            "get", "node", &node, "-o",
            "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        assert_eq!(ready, "True", "node {node} is not Ready");
        let images = run("ctr", &["images", "ls", "-q"], None)
            .unwrap_or_else(|e| panic!("cannot list the node's images (CONTAINERD_ADDRESS): {e}"));
        let registry = "ghcr.io/shotover-k8s";
        for name in ["shotover", "shotover-operator", "shotover-webhook"] {
            let reference = format!("{registry}/{name}:{VERSION}");
            assert!(
                images.lines().any(|l| l == reference),
                "the node has no image {reference}: build and load them with\n  images/build && e2e/services load target/images/*-{VERSION}.oci.tar"
            );
        }
        let run_id = std::process::id().to_string();
        let system = format!("shotover-system-{run_id}");
        let apps = format!("shotover-apps-{run_id}");
        let release = format!("e2e{run_id}");
        remove_earlier_runs(&helm, &release);
        apply(
            "default",
            &json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": system, "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/warn": "restricted",
                }},
            }),
        );
        apply(
            "default",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": apps}}),
        );
        let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/shotover");
        // Helm installs a chart's CRDs only when they are absent: on a node that stayed up,
        // the CRD of an earlier build would stay. Apply this one, as an upgrade would.
        run(
            "kubectl",
            &[
                "apply", "--server-side", "--force-conflicts", "-f",
                &format!("{chart}/crds/shotovertopology.yaml"),
            ],
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        run(
            &helm,
            &[
                "install", &release, chart, "--namespace", &system,
                "--set", "image.pullPolicy=Never",
                "--set", &format!("operator.watchNamespace={apps}"),
                "--wait", "--timeout", "5m",
            ],
            None,
        )
        .unwrap_or_else(|e| {
            dump(&system);
            panic!("{e}")
        });
        Install {
            system,
            release,
            apps,
            proxy_image: format!("{registry}/shotover:{VERSION}"),
            tools_image,
        }
    })
}

/// The releases and namespaces of earlier runs on a node that stayed up (each run leaves its
/// own, for a look after a failure), so that they do not pile up.
fn remove_earlier_runs(helm: &str, ours: &str) {
    let list = run(helm, &["list", "--all-namespaces", "-o", "json"], None)
        .unwrap_or_else(|e| panic!("{e}"));
    let releases: Vec<Value> = serde_json::from_str(&list).unwrap_or_default();
    for release in releases {
        let (Some(name), Some(namespace)) =
            (release["name"].as_str(), release["namespace"].as_str())
        else {
            continue;
        };
        let Some(id) = name
            .strip_prefix("e2e")
            .filter(|id| id.chars().all(|c| c.is_ascii_digit()))
        else {
            continue;
        };
        if name == ours {
            continue;
        }
        let _ = run(
            helm,
            &[
                "uninstall",
                name,
                "-n",
                namespace,
                "--wait",
                "--timeout",
                "60s",
            ],
            None,
        );
        let _ = kubectl(&[
            "delete",
            "namespace",
            namespace,
            &format!("shotover-apps-{id}"),
            "--wait=false",
            "--ignore-not-found",
        ]);
    }
}

/// Prints the state of a namespace (for a failing test).
fn dump(namespace: &str) {
    for args in [
        vec![
            "get",
            "all,shotovertopologies,pdb,leases,configmaps",
            "-o",
            "wide",
            "-n",
            namespace,
        ],
        vec!["get", "events", "--sort-by=.lastTimestamp", "-n", namespace],
        vec![
            "logs",
            "-n",
            namespace,
            "--all-containers",
            "--prefix",
            "--tail=40",
            "-l",
            "app.kubernetes.io/part-of=shotover",
        ],
    ] {
        eprintln!(
            "$ kubectl {}\n{}",
            args.join(" "),
            kubectl(&args).unwrap_or_else(|e| e)
        );
    }
}

/// Dumps both namespaces when the test that holds it fails.
struct DumpOnFailure(&'static Install);

impl Drop for DumpOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            dump(&self.0.system);
            dump(&self.0.apps);
        }
    }
}

// ---------------------------------------------------------------------------------- pods

fn pods(namespace: &str, selector: &str) -> Vec<Value> {
    get_json(&["pods", "-n", namespace, "-l", selector])
        .and_then(|list| list["items"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .collect()
}

fn name(object: &Value) -> String {
    object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Waits until exactly `count` live Pods match `selector`, all Running and Ready.
fn ready_pods(namespace: &str, selector: &str, count: usize) -> Vec<Value> {
    wait_for(
        &format!("{count} Ready Pods {selector} in {namespace}"),
        LONG,
        || {
            let pods = pods(namespace, selector);
            (pods.len() == count
                && pods
                    .iter()
                    .all(|p| p["status"]["phase"] == "Running" && is_ready(p)))
            .then_some(pods)
        },
    )
}

fn exec(namespace: &str, pod: &str, container: &str, command: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", "-n", namespace, pod, "-c", container, "--"];
    args.extend_from_slice(command);
    kubectl(&args)
}

// ---------------------------------------------------------------------------------- the story

/// Redis, a DB-side tier in front of it, and an application whose sidecar goes to that tier.
struct Story {
    ns: String,
    prefix: String,
    /// The topology of the DB-side tier.
    db: String,
    /// The topology of the sidecars.
    edge: String,
    app: String,
}

impl Story {
    fn new(install: &Install, prefix: &str, db_replicas: i32) -> Story {
        let ns = install.apps.clone();
        let story = Story {
            db: format!("{prefix}-db"),
            edge: format!("{prefix}-edge"),
            app: format!("{prefix}-app"),
            prefix: prefix.to_owned(),
            ns,
        };
        let redis = format!("{prefix}-redis");
        let labels = json!({"app": redis});
        apply(
            &story.ns,
            &json!({
                "apiVersion": "apps/v1", "kind": "StatefulSet",
                "metadata": {"name": redis},
                "spec": {
                    "serviceName": redis, "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": {
                        "containers": [{
                            "name": "redis", "image": install.tools_image, "imagePullPolicy": "Never",
                            "command": ["redis-server", "--port", "6379", "--bind", "0.0.0.0",
                                        "--protected-mode", "no", "--save", "", "--appendonly", "no",
                                        "--dir", "/tmp"],
                            "ports": [{"name": "redis", "containerPort": 6379}],
                            "readinessProbe": {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 2},
                        }],
                    }},
                },
            }),
        );
        apply(
            &story.ns,
            &json!({
                "apiVersion": "v1", "kind": "Service", "metadata": {"name": redis},
                "spec": {"selector": labels, "ports": [{"name": "redis", "port": 6379, "targetPort": "redis"}]},
            }),
        );
        story.apply_db(install, "db", db_replicas, "Reload");
        story.apply_edge(install, "edge");
        apply(
            &story.ns,
            &json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": story.app},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": story.app}},
                    "template": {
                        "metadata": {
                            "labels": {"app": story.app, "shotover.io/inject": "true"},
                            "annotations": {"shotover.io/topology": story.edge},
                        },
                        "spec": {
                            "terminationGracePeriodSeconds": 5,
                            "containers": [{
                                "name": "app", "image": install.tools_image, "imagePullPolicy": "Never",
                                "command": ["sleep", "100000"],
                            }],
                        },
                    },
                },
            }),
        );
        story
    }

    /// The DB-side topology, its chain counting under `counter`, configuration changes
    /// reaching the proxies by `config_update` (`Reload` or `RollingRestart`).
    fn apply_db(&self, install: &Install, counter: &str, replicas: i32, config_update: &str) {
        apply(
            &self.ns,
            &json!({
                "apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology",
                "metadata": {"name": self.db},
                "spec": {
                    "image": install.proxy_image, "imagePullPolicy": "Never",
                    "sources": [{"Redis": {
                        "name": "redis", "listenAddr": "0.0.0.0:6380",
                        "chain": [
                            {"QueryCounter": {"name": counter}},
                            {"RedisSinkSingle": {"remoteAddress": format!("{}-redis:6379", self.prefix), "connectTimeoutMs": 3000}},
                        ],
                    }}],
                    "dbSide": {"replicas": replicas, "configUpdate": config_update},
                },
            }),
        );
    }

    /// The sidecar topology: 127.0.0.1:6379 in the app's Pod, on to the DB-side Service.
    fn apply_edge(&self, install: &Install, counter: &str) {
        apply(
            &self.ns,
            &json!({
                "apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology",
                "metadata": {"name": self.edge},
                "spec": {
                    "image": install.proxy_image, "imagePullPolicy": "Never",
                    "sources": [{"Redis": {
                        "name": "redis", "listenAddr": "127.0.0.1:6379",
                        "chain": [
                            {"QueryCounter": {"name": counter}},
                            {"RedisSinkSingle": {"remoteAddress": format!("{}-shotover:6380", self.db), "connectTimeoutMs": 3000}},
                        ],
                    }}],
                },
            }),
        );
    }

    fn status(&self, topology: &str) -> Value {
        get_json(&["shotovertopology", topology, "-n", &self.ns])
            .map(|t| t["status"].clone())
            .unwrap_or(Value::Null)
    }

    /// A field (`status`, `reason`) of the topology's condition `type_`.
    fn condition_field(&self, topology: &str, type_: &str, field: &str) -> Option<String> {
        self.status(topology)["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .and_then(|c| c[field].as_str().map(str::to_owned))
    }

    fn condition(&self, topology: &str, type_: &str) -> Option<String> {
        self.condition_field(topology, type_, "status")
    }

    fn reason(&self, topology: &str, type_: &str) -> Option<String> {
        self.condition_field(topology, type_, "reason")
    }

    fn db_pods(&self, count: usize) -> Vec<Value> {
        ready_pods(
            &self.ns,
            &format!("shotover.io/topology={}", self.db),
            count,
        )
    }

    fn app_pod(&self) -> Value {
        ready_pods(&self.ns, &format!("app={}", self.app), 1).remove(0)
    }

    fn redis_cli(&self, pod: &str, args: &[&str]) -> Result<String, String> {
        let mut command = vec!["redis-cli", "-h", "127.0.0.1", "-p", "6379"];
        command.extend_from_slice(args);
        exec(&self.ns, pod, "app", &command).map(|s| s.trim().to_owned())
    }

    /// The sum of a series over the DB-side proxy Pods, scraped from each Pod.
    fn db_metric(&self, series: &str) -> f64 {
        pods(&self.ns, &format!("shotover.io/topology={}", self.db))
            .iter()
            .filter_map(|p| pod_http(&self.ns, &name(p), 9001, "/metrics").ok())
            .filter_map(|m| metric(&m, series))
            .sum()
    }
}

// ---------------------------------------------------------------------------------- tests

#[test]
fn the_chart_runs_the_operator_and_the_webhook_as_ready_pods() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let ns = &install.system;
    let operators = ready_pods(ns, "app.kubernetes.io/component=operator", 2);
    let webhooks = ready_pods(ns, "app.kubernetes.io/component=webhook", 2);

    // `helm test`: a Pod asks both /readyz through their Services (and cluster DNS).
    let helm = env(
        "HELM",
        "build helm with\n  eval \"$(e2e/services up helm)\"",
    );
    let tested = run(
        &helm,
        &[
            "test",
            &install.release,
            "-n",
            ns,
            "--timeout",
            "3m",
            "--logs",
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // helm exits non-zero when the Pod fails; its log names both answers.
    for service in ["operator-metrics", "webhook"] {
        let line = tested
            .lines()
            .find(|l| l.contains(&format!("-{service}.")) && l.contains("/readyz: "))
            .unwrap_or_else(|| panic!("no answer of {service} in\n{tested}"));
        assert!(line.contains(" 200 "), "{line}");
    }

    // One leader, holding the Lease in the release namespace (where its Role is), although
    // the operator watches another namespace.
    let lease = format!("{}-operator", install.release);
    let holder = wait_for("the operator's Lease to have a holder", LONG, || {
        let lease = get_json(&["lease", &lease, "-n", ns])?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    });
    let names: Vec<String> = operators.iter().map(name).collect();
    assert!(
        names.contains(&holder),
        "Lease holder {holder} is not one of {names:?}"
    );
    let leaders: f64 = names
        .iter()
        .map(|pod| {
            let metrics = pod_http(ns, pod, 8080, "/metrics").unwrap_or_else(|e| panic!("{e}"));
            metric(&metrics, "shotover_operator_leader").expect("shotover_operator_leader")
        })
        .sum();
    assert_eq!(leaders, 1.0, "exactly one operator Pod leads");
    for pod in webhooks.iter().map(name) {
        let metrics = pod_http(ns, &pod, 8080, "/metrics").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            metric(
                &metrics,
                "shotover_webhook_certificate_expiry_timestamp_seconds"
            )
            .is_some_and(|s| s > 0.0),
            "{pod} serves a certificate:\n{metrics}"
        );
    }

    // The PDBs allow one voluntary disruption at a time, and see both replicas healthy.
    for component in ["operator", "webhook"] {
        let pdb = wait_for(
            &format!("the {component} PDB to see 2 healthy Pods"),
            LONG,
            || {
                let pdb =
                    get_json(&["pdb", &format!("{}-{component}", install.release), "-n", ns])?;
                (pdb["status"]["currentHealthy"] == 2).then_some(pdb)
            },
        );
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        assert_eq!(pdb["status"]["disruptionsAllowed"], 1);
    }

    // The webhook configuration: dry-run safe, limited to the watched namespace.
    let config = get_json(&[
        "mutatingwebhookconfiguration",
        &format!("{}-sidecar-injector", install.release),
    ])
    .expect("webhook configuration");
    for webhook in config["webhooks"].as_array().expect("webhooks") {
        assert_eq!(webhook["sideEffects"], "NoneOnDryRun");
        let expressions = webhook["namespaceSelector"]["matchExpressions"].to_string();
        assert!(expressions.contains(&install.apps), "{expressions}");
    }
}

#[test]
fn app_traffic_goes_through_its_sidecar_and_the_db_side_tier_to_redis() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let story = Story::new(install, "path", 2);

    // The proxies are Ready by their own probes, and the status says so.
    story.db_pods(2);
    wait_for("readyReplicas 2 and Ready=True", LONG, || {
        let status = story.status(&story.db);
        (status["readyReplicas"] == 2
            && story.condition(&story.db, "Ready").as_deref() == Some("True"))
        .then_some(())
    });

    // The app's Pod has the native sidecar, Ready, and its own container: 2/2.
    let pod = story.app_pod();
    let init = &pod["spec"]["initContainers"][0];
    assert_eq!(init["name"], "shotover");
    assert_eq!(init["restartPolicy"], "Always");
    let statuses = pod["status"]["initContainerStatuses"]
        .as_array()
        .expect("init statuses");
    assert_eq!(statuses[0]["ready"], true, "{statuses:?}");
    assert_eq!(pod["status"]["containerStatuses"][0]["ready"], true);
    let pod = name(&pod);

    // Writes and reads from inside the app's Pod, through its sidecar.
    let before = story.db_metric("shotover_query_count{name=\"db\",query=\"SET\"");
    for i in 0..10 {
        let key = format!("path:{i}");
        let value = format!("value-{i}");
        let set = story
            .redis_cli(&pod, &["set", &key, &value])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set, "OK");
        assert_eq!(
            story
                .redis_cli(&pod, &["get", &key])
                .unwrap_or_else(|e| panic!("{e}")),
            value
        );
    }
    // Redis itself holds them (read directly, not through any proxy).
    let redis = format!("{}-redis-0", story.prefix);
    let direct = exec(&story.ns, &redis, "redis", &["redis-cli", "get", "path:7"])
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(direct.trim(), "value-7");

    // The sidecar and the DB-side proxies counted them: the path really went through both.
    let sidecar = pod_http(&story.ns, &pod, 9001, "/metrics").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        metric(&sidecar, "shotover_query_count{name=\"edge\",query=\"SET\""),
        Some(10.0),
        "{sidecar}"
    );
    assert_eq!(
        metric(&sidecar, "shotover_query_count{name=\"edge\",query=\"GET\""),
        Some(10.0)
    );
    wait_for(
        "the DB-side proxies to count the 10 SETs",
        Duration::from_secs(30),
        || {
            (story.db_metric("shotover_query_count{name=\"db\",query=\"SET\"") - before >= 10.0)
                .then_some(())
        },
    );
    let injected = story.status(&story.edge)["sidecars"]["injected"].clone();
    assert_eq!(injected, 1, "{}", story.status(&story.edge));
}

/// The uid and the restart count of the `shotover` container of each Pod, by name.
fn incarnations(pods: &[Value]) -> BTreeMap<String, (String, u64)> {
    pods.iter()
        .map(|p| {
            let restarts = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .chain(p["status"]["initContainerStatuses"].as_array())
                .flatten()
                .find(|c| c["name"] == "shotover")
                .and_then(|c| c["restartCount"].as_u64())
                .expect("a shotover container status");
            let uid = p["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
            (name(p), (uid, restarts))
        })
        .collect()
}

#[test]
fn a_chain_change_reloads_the_tier_and_the_sidecars_without_restarting_a_pod() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let story = Story::new(install, "reload", 2);
    let db_before = incarnations(&story.db_pods(2));
    let app_before = incarnations(&[story.app_pod()]);
    wait_for("the sidecar to say it runs the configuration", LONG, || {
        let status = story.status(&story.edge);
        (status["sidecars"]["injected"] == 1
            && status["sidecars"]["outdated"] == 0
            && status["sidecars"]["unreported"] == 0
            && story.condition(&story.edge, "SidecarsUpToDate").as_deref() == Some("True"))
        .then_some(())
    });

    // A new DB-side chain: the same proxy Pods reload it (the kubelet updates their ConfigMap
    // volume), and the topology is Ready once each of them says it runs the new hash.
    let old_hash = story.status(&story.db)["configHash"].clone();
    story.apply_db(install, "db2", 2, "Reload");
    let new_hash = wait_for("the new configuration to render", LONG, || {
        let hash = story.status(&story.db)["configHash"].clone();
        (hash != old_hash).then_some(hash)
    });
    let new_hash = new_hash.as_str().expect("hash").to_owned();
    wait_for(
        "every DB-side proxy to run the new configuration",
        LONG,
        || {
            let ready = story.reason(&story.db, "Ready");
            (ready.as_deref() == Some("ProxiesReady")
                && story.status(&story.db)["readyReplicas"] == 2)
                .then_some(())
        },
    );
    assert_eq!(
        incarnations(&story.db_pods(2)),
        db_before,
        "no DB-side proxy was replaced or restarted"
    );
    for pod in db_before.keys() {
        let config = pod_http(&story.ns, pod, 9001, "/config").unwrap_or_else(|e| panic!("{e}"));
        assert!(config.contains(&new_hash), "{pod}: {config}");
        let metrics = pod_http(&story.ns, pod, 9001, "/metrics").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            metrics.contains(&format!("shotover_config_info{{hash=\"{new_hash}\"}} 1")),
            "{pod}: {metrics}"
        );
    }
    // Traffic through the reloaded chain is counted under its new name.
    let pod = name(&story.app_pod());
    for i in 0..5 {
        assert_eq!(
            story
                .redis_cli(&pod, &["set", &format!("reload:{i}"), "1"])
                .unwrap_or_else(|e| panic!("{e}")),
            "OK"
        );
    }
    wait_for(
        "the reloaded proxies to count under db2",
        Duration::from_secs(30),
        || {
            (story.db_metric("shotover_query_count{name=\"db2\",query=\"SET\"") >= 5.0)
                .then_some(())
        },
    );

    // A new sidecar chain: the running sidecar is outdated (an Event says so) until it
    // reloads, then up to date again, in the same Pod.
    let old_edge = story.status(&story.edge)["configHash"].clone();
    story.apply_edge(install, "edge2");
    wait_for(
        "SidecarsUpToDate=True for the new configuration",
        LONG,
        || {
            let status = story.status(&story.edge);
            (status["configHash"] != old_edge
                && status["sidecars"]["injected"] == 1
                && status["sidecars"]["outdated"] == 0
                && status["sidecars"]["unreported"] == 0
                && story.condition(&story.edge, "SidecarsUpToDate").as_deref() == Some("True"))
            .then_some(())
        },
    );
    let outdated_events = get_json(&[
        "events",
        "-n",
        &story.ns,
        "--field-selector",
        &format!("involvedObject.name={},reason=Outdated", story.edge),
    ])
    .expect("events");
    assert!(
        outdated_events["items"]
            .as_array()
            .is_some_and(|e| !e.is_empty()),
        "the sidecar was announced outdated before it reloaded"
    );
    assert_eq!(
        incarnations(&[story.app_pod()]),
        app_before,
        "the application Pod was not replaced and its sidecar not restarted"
    );
    assert_eq!(
        story
            .redis_cli(&pod, &["set", "reload:after", "1"])
            .unwrap_or_else(|e| panic!("{e}")),
        "OK"
    );
    let sidecar = pod_http(&story.ns, &pod, 9001, "/metrics").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        sidecar.contains("name=\"edge2\""),
        "the sidecar runs the new chain:\n{sidecar}"
    );

    // Reading is open to the cluster (probes, scrapes, the operator); changing the proxy is
    // for the Pod itself: PUT /filter through the apiserver's proxy (from the node's address)
    // is refused, and from inside the Pod it is accepted.
    let put = run(
        "kubectl",
        &[
            "replace",
            "--raw",
            &format!(
                "/api/v1/namespaces/{}/pods/{pod}:9001/proxy/filter",
                story.ns
            ),
            "-f",
            "-",
        ],
        Some("debug"),
    );
    assert!(
        put.as_ref().is_err_and(|e| e.contains("localhost only")),
        "{put:?}"
    );
    let local = exec(
        &story.ns,
        &pod,
        "app",
        &["sh", "-c", "(printf 'PUT /filter HTTP/1.0\\r\\nContent-Length: 4\\r\\n\\r\\ninfo'; sleep 2) | nc 127.0.0.1 9001"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(local.starts_with("HTTP/1.0 200"), "{local}");
}

/// Someone else's invalid edit of a topology does not block the app: a Pod created while
/// the sidecar topology is invalid runs the last valid configuration (a Warning Event on
/// its ReplicaSet says so), serves traffic, and follows the topology once it is fixed.
#[test]
fn an_invalid_edit_does_not_block_new_pods_they_run_the_last_valid_config() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let story = Story::new(install, "lastvalid", 1);
    let first = name(&story.app_pod());
    let valid = wait_for("the sidecar topology to render", LONG, || {
        let status = story.status(&story.edge);
        let ready = status["sidecars"]["injected"] == 1
            && story.condition(&story.edge, "SidecarsUpToDate").as_deref() == Some("True");
        ready
            .then_some(status["configHash"].as_str())
            .flatten()
            .map(str::to_owned)
    });

    // Accepted by the CRD, refused by the proxy's validation: the source now listens on the
    // sidecar's observability port.
    apply(
        &story.ns,
        &json!({
            "apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology",
            "metadata": {"name": story.edge},
            "spec": {
                "image": install.proxy_image, "imagePullPolicy": "Never",
                "sources": [{"Redis": {
                    "name": "redis", "listenAddr": "127.0.0.1:9001",
                    "chain": [{"RedisSinkSingle": {"remoteAddress": format!("{}-shotover:6380", story.db)}}],
                }}],
            },
        }),
    );
    wait_for("ConfigValid=False", LONG, || {
        (story.condition(&story.edge, "ConfigValid").as_deref() == Some("False")).then_some(())
    });
    assert_eq!(
        story.status(&story.edge)["configHash"].as_str(),
        Some(valid.as_str()),
        "the last valid hash stays"
    );

    // The Deployment replaces its Pod: the webhook admits the new one with the last valid
    // configuration, and its sidecar runs it on the node.
    k(&["delete", "pod", "-n", &story.ns, &first, "--wait=false"]);
    let pod = wait_for("the replacement Pod to be Ready", LONG, || {
        let pods = pods(&story.ns, &format!("app={}", story.app));
        pods.into_iter()
            .find(|p| name(p) != first && p["status"]["phase"] == "Running" && is_ready(p))
    });
    assert_eq!(
        pod["metadata"]["annotations"]["shotover.io/config-hash"].as_str(),
        Some(valid.as_str()),
        "injected with the last valid configuration"
    );
    let pod = name(&pod);
    let config = pod_http(&story.ns, &pod, 9001, "/config").unwrap_or_else(|e| panic!("{e}"));
    assert!(config.contains(&valid), "{pod}: {config}");
    assert_eq!(
        story
            .redis_cli(&pod, &["set", "lastvalid", "1"])
            .unwrap_or_else(|e| panic!("{e}")),
        "OK"
    );
    // A Warning Event on the Pod's controller (the ReplicaSet: where `kubectl describe`
    // shows it), naming the invalid topology and the hash injected instead. The webhook
    // records its Events asynchronously.
    let invalid = format!("ShotoverTopology {}/{} is invalid", story.ns, story.edge);
    wait_for("a Warning Event on the ReplicaSet", LONG, || {
        let events = get_json(&[
            "events",
            "-n",
            &story.ns,
            "--field-selector",
            "reason=SidecarInjectedLastValidConfig,involvedObject.kind=ReplicaSet",
        ])?;
        events["items"]
            .as_array()?
            .iter()
            .filter(|e| e["type"] == "Warning")
            .filter_map(|e| e["message"].as_str().or(e["note"].as_str()))
            .any(|n| n.contains(&invalid) && n.contains(&valid))
            .then_some(())
    });

    // Fixed, the topology reaches the running sidecar without restarting its Pod.
    story.apply_edge(install, "fixed");
    wait_for("SidecarsUpToDate=True after the fix", LONG, || {
        let status = story.status(&story.edge);
        (status["configHash"].as_str() != Some(valid.as_str())
            && story.condition(&story.edge, "ConfigValid").as_deref() == Some("True")
            && status["sidecars"]["outdated"] == 0
            && status["sidecars"]["unreported"] == 0
            && story.condition(&story.edge, "SidecarsUpToDate").as_deref() == Some("True"))
        .then_some(())
    });
    assert_eq!(
        story
            .redis_cli(&pod, &["set", "lastvalid", "2"])
            .unwrap_or_else(|e| panic!("{e}")),
        "OK"
    );
}

#[test]
fn a_rolling_update_of_the_db_side_tier_under_traffic_loses_no_request() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let story = Story::new(install, "drain", 3);
    story.db_pods(3);
    let pod = name(&story.app_pod());

    // A client in the app's Pod: one INCR a connection, as fast as it goes, counting what it
    // saw succeed and fail, until told to stop.
    let client = "ok=0; bad=0; while [ ! -f /tmp/stop ]; do \
        r=$(redis-cli -h 127.0.0.1 -p 6379 incr drain:n 2>&1); \
        case \"$r\" in ''|*[!0-9]*) bad=$((bad + 1)); echo \"$r\" >&2 ;; *) ok=$((ok + 1)) ;; esac; \
        done; echo \"$ok $bad\" > /tmp/result";
    let mut loop_ = Command::new("kubectl")
        .args([
            "exec", "-n", &story.ns, &pod, "-c", "app", "--", "sh", "-c", client,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client");
    wait_for(
        "the client to have sent requests",
        Duration::from_secs(30),
        || {
            let n: u64 = story
                .redis_cli(&pod, &["get", "drain:n"])
                .ok()?
                .parse()
                .ok()?;
            (n > 20).then_some(())
        },
    );

    // Roll all three proxies (a new chain, with configUpdate: RollingRestart), one at a
    // time, while the client goes on.
    let old_hash = story.status(&story.db)["configHash"].clone();
    story.apply_db(install, "drain2", 3, "RollingRestart");
    wait_for("the tier to roll under traffic", LONG, || {
        let status = story.status(&story.db);
        let pods = pods(&story.ns, &format!("shotover.io/topology={}", story.db));
        (status["configHash"] != old_hash
            && pods.len() == 3
            && pods.iter().all(|p| {
                is_ready(p)
                    && p["metadata"]["annotations"]["shotover.io/config-hash"]
                        == status["configHash"]
            }))
        .then_some(())
    });
    exec(&story.ns, &pod, "app", &["sh", "-c", ": > /tmp/stop"]).unwrap_or_else(|e| panic!("{e}"));
    let status = loop_.wait().expect("client");
    assert!(status.success(), "the client loop failed");
    let result = wait_for("the client's result", Duration::from_secs(30), || {
        exec(&story.ns, &pod, "app", &["cat", "/tmp/result"]).ok()
    });
    let mut fields = result
        .split_whitespace()
        .map(|f| f.parse::<u64>().expect("count"));
    let (ok, bad) = (fields.next().expect("ok"), fields.next().expect("bad"));
    let total: u64 = story
        .redis_cli(&pod, &["get", "drain:n"])
        .unwrap_or_else(|e| panic!("{e}"))
        .parse()
        .expect("n");
    eprintln!(
        "rolling update under traffic: {ok} INCRs answered in order, {bad} failed, Redis counted {total}"
    );
    assert!(ok > 50, "the client kept running through the roll ({ok})");
    // Every request the client saw succeed is in Redis, and none that it saw fail is: no
    // connection was cut with a request in flight, none was refused.
    assert_eq!(bad, 0, "requests failed during the roll");
    assert_eq!(total, ok);
}

#[test]
fn killing_a_webhook_pod_under_a_stream_of_pod_creations_loses_no_admission() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let story = Story::new(install, "hook", 1);
    story.app_pod();
    let webhooks = ready_pods(&install.system, "app.kubernetes.io/component=webhook", 2);

    // 40 Pods created one after another (each one admitted by the webhook) while one webhook
    // Pod is deleted in the middle; every creation must succeed and every Pod be injected.
    let victim = name(&webhooks[0]);
    let mut created = Vec::new();
    for i in 0..40 {
        if i == 10 {
            k(&[
                "delete",
                "pod",
                "-n",
                &install.system,
                &victim,
                "--wait=false",
            ]);
        }
        let pod = format!("hook-stream-{i}");
        let manifest = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "labels": {"shotover.io/inject": "true", "stream": "hook"},
                         "annotations": {"shotover.io/topology": story.edge}},
            "spec": {"containers": [{"name": "app", "image": install.tools_image, "imagePullPolicy": "Never",
                                     "command": ["sleep", "100000"]}],
                     "terminationGracePeriodSeconds": 1},
        });
        let text = serde_json::to_string(&manifest).expect("json");
        run(
            "kubectl",
            &["create", "--dry-run=server", "-n", &story.ns, "-f", "-"],
            Some(&text),
        )
        .unwrap_or_else(|e| panic!("admission {i} failed while a webhook Pod was going: {e}"));
        let out = run(
            "kubectl",
            &["create", "-n", &story.ns, "-f", "-", "-o", "json"],
            Some(&text),
        )
        .unwrap_or_else(|e| panic!("creation {i} failed while a webhook Pod was going: {e}"));
        let pod: Value = serde_json::from_str(&out).expect("pod");
        assert_eq!(
            pod["spec"]["initContainers"][0]["name"], "shotover",
            "Pod {i} was injected"
        );
        created.push(name(&pod));
    }
    assert_eq!(created.len(), 40);
    ready_pods(&install.system, "app.kubernetes.io/component=webhook", 2);
    k(&[
        "delete",
        "pods",
        "-n",
        &story.ns,
        "-l",
        "stream=hook",
        "--wait=false",
    ]);
}

#[test]
fn deleting_a_topology_removes_its_children() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let story = Story::new(install, "gc", 1);
    story.db_pods(1);
    k(&["delete", "shotovertopology", "-n", &story.ns, &story.db]);
    for kind in ["statefulset", "service", "configmap", "pdb"] {
        wait_for(&format!("the {kind}s of {} to go", story.db), LONG, || {
            let list = get_json(&[
                kind,
                "-n",
                &story.ns,
                "-l",
                &format!("shotover.io/topology={}", story.db),
            ])?;
            list["items"]
                .as_array()
                .is_some_and(|i| i.is_empty())
                .then_some(())
        });
    }
    wait_for("the proxy Pods to go", LONG, || {
        pods(&story.ns, &format!("shotover.io/topology={}", story.db))
            .is_empty()
            .then_some(())
    });
}

#[test]
fn images_are_reproducible_minimal_non_root_and_labelled() {
    // What images/build made for this run (run-tests builds them before the tests).
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let binary = format!("{repo}/target/images/bin/shotover");
    let archive = format!("{repo}/target/images/shotover-{VERSION}.oci.tar");
    assert!(
        std::path::Path::new(&archive).exists(),
        "{archive} is missing: run images/build"
    );
    let dir = std::env::temp_dir().join(format!("shotover-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let build = |out: &str| {
        let out = dir.join(out);
        run(
            "python3",
            &[
                &format!("{repo}/images/oci.py"),
                "--name",
                "example.com/shotover:test",
                "--out",
                out.to_str().expect("path"),
                "--bin",
                &binary,
                "--label",
                "org.opencontainers.image.version=test",
            ],
            None,
        )
        .unwrap_or_else(|e| panic!("{e}"))
        .trim()
        .to_owned()
    };
    let (first, second) = (build("a.tar"), build("b.tar"));
    assert!(first.starts_with("sha256:"), "{first}");
    assert_eq!(
        first, second,
        "two builds of the same inputs have the same digest"
    );
    assert_eq!(
        std::fs::read(dir.join("a.tar")).expect("a"),
        std::fs::read(dir.join("b.tar")).expect("b"),
        "and the same bytes"
    );

    // The shipped archive: what skopeo reads from it, what is inside.
    let inspect: Value = serde_json::from_str(
        &run(
            "skopeo",
            &["inspect", "--config", &format!("oci-archive:{archive}")],
            None,
        )
        .unwrap_or_else(|e| panic!("{e}")),
    )
    .expect("skopeo inspect --config");
    let config = &inspect["config"];
    assert_eq!(config["User"], "65532:65532");
    assert_eq!(config["Entrypoint"], json!(["/usr/local/bin/shotover"]));
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        VERSION
    );
    assert!(
        config["Labels"]["org.opencontainers.image.revision"]
            .as_str()
            .is_some_and(|r| r.len() >= 40),
        "labelled with the commit: {config}"
    );
    let index: Value = serde_json::from_str(
        &run("tar", &["-xOf", &archive, "index.json"], None).unwrap_or_else(|e| panic!("{e}")),
    )
    .expect("index.json");
    assert_eq!(
        index["manifests"][0]["annotations"]["io.containerd.image.name"],
        format!("ghcr.io/shotover-k8s/shotover:{VERSION}")
    );
    // podman takes it as it is, under the reference the archive names.
    let storage = dir.join("podman");
    let storage = storage.to_str().expect("path");
    let loaded = run(
        "podman",
        &[
            "--root",
            &format!("{storage}/root"),
            "--runroot",
            &format!("{storage}/run"),
            "--storage-driver",
            "vfs",
            "load",
            "-i",
            &archive,
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        loaded.contains(&format!(
            "Loaded image: ghcr.io/shotover-k8s/shotover:{VERSION}"
        )),
        "{loaded}"
    );
    let unpacked = dir.join("rootfs");
    run(
        "skopeo",
        &[
            "copy",
            &format!("oci-archive:{archive}"),
            &format!("dir:{}", unpacked.display()),
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut files = Vec::new();
    let mut bytes = 0u64;
    for entry in std::fs::read_dir(&unpacked).expect("dir") {
        let path = entry.expect("entry").path();
        if std::fs::read(&path).is_ok_and(|b| b.starts_with(&[0x1f, 0x8b])) {
            let listing = run("tar", &["-tvzf", path.to_str().expect("path")], None)
                .unwrap_or_else(|e| panic!("{e}"));
            for line in listing.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                if line.starts_with('-') {
                    bytes += fields[2].parse::<u64>().expect("size");
                    files.push(fields[5].to_owned());
                }
            }
        }
    }
    files.sort();
    let expected_prefixes = ["etc/", "lib", "usr/local/bin/shotover", "usr/lib"];
    for file in &files {
        assert!(
            expected_prefixes.iter().any(|p| file.starts_with(p)),
            "unexpected file {file} in the image: {files:?}"
        );
    }
    assert!(
        files.iter().any(|f| f == "usr/local/bin/shotover"),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f == "etc/ssl/certs/ca-certificates.crt"),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f.contains("libc.so")), "{files:?}");
    eprintln!(
        "shotover image: {} files, {:.1} MB uncompressed",
        files.len(),
        bytes as f64 / 1e6
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_proxy_image_the_node_cannot_get_shows_in_the_status_and_an_event() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let ns = &install.apps;
    let topology = "missing-image";
    apply(
        ns,
        &json!({
            "apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology",
            "metadata": {"name": topology},
            "spec": {
                "image": "example.invalid/shotover:absent", "imagePullPolicy": "Never",
                "sources": [{"Redis": {"name": "redis", "listenAddr": "0.0.0.0:6380",
                    "chain": [{"RedisSinkSingle": {"remoteAddress": "nowhere:6379"}}]}}],
                "dbSide": {"replicas": 1},
            },
        }),
    );
    let message = wait_for("Degraded=True naming the image", LONG, || {
        let status = get_json(&["shotovertopology", topology, "-n", ns])?["status"].clone();
        let degraded = status["conditions"]
            .as_array()?
            .iter()
            .find(|c| {
                c["type"] == "Degraded" && c["status"] == "True" && c["reason"] == "ProxiesFailing"
            })?
            .clone();
        Some(degraded["message"].as_str()?.to_owned())
    });
    assert_eq!(
        message,
        format!(
            "{topology}-shotover-0: container shotover ErrImageNeverPull: Container image \"example.invalid/shotover:absent\" is not present with pull policy of Never"
        )
    );
    wait_for("a Warning Event ProxiesFailing", LONG, || {
        let events = get_json(&[
            "events",
            "-n",
            ns,
            "--field-selector",
            &format!("involvedObject.name={topology},reason=ProxiesFailing"),
        ])?;
        events["items"]
            .as_array()?
            .iter()
            .any(|e| e["type"] == "Warning")
            .then_some(())
    });
    k(&["delete", "shotovertopology", "-n", ns, topology]);
}

/// A self-signed certificate and key for `name`, made with openssl, with the SHA-256 of the
/// certificate file (what the proxy's `/config` reports for it).
fn certificate(dir: &std::path::Path, name: &str) -> (String, String, String) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key,
            "-out",
            &cert,
        ],
        None,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sum = run("sha256sum", &[&cert], None).unwrap_or_else(|e| panic!("{e}"));
    let sha = sum.split_whitespace().next().expect("sum").to_owned();
    (cert, key, sha)
}

/// The Secret `name` holding `cert` and `key`, created or replaced (as cert-manager renews).
fn apply_tls_secret(namespace: &str, name: &str, cert: &str, key: &str) {
    let manifest = k(&[
        "create",
        "secret",
        "tls",
        name,
        "-n",
        namespace,
        "--cert",
        cert,
        "--key",
        key,
        "--dry-run=client",
        "-o",
        "yaml",
    ]);
    run("kubectl", &["apply", "-f", "-"], Some(&manifest)).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_tls_secret_is_mounted_and_its_renewal_is_served_without_a_restart() {
    let install = install();
    let _dump = DumpOnFailure(install);
    let ns = install.apps.as_str();
    let (topology, secret) = ("tlsdb", "tlsdb-cert");
    let dir = std::env::temp_dir().join(format!("shotover-node-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert1, key1, sha1) = certificate(&dir, "one");
    let (cert2, key2, sha2) = certificate(&dir, "two");
    let _ = kubectl(&["delete", "secret", secret, "-n", ns, "--ignore-not-found"]);

    // The topology first: its Secret is missing, and the status says so.
    apply(
        ns,
        &json!({
            "apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology",
            "metadata": {"name": topology},
            "spec": {
                "image": install.proxy_image, "imagePullPolicy": "Never",
                "tlsSecrets": [{"secretName": secret}],
                "sources": [{"Redis": {
                    "name": "redis", "listenAddr": "0.0.0.0:6390",
                    "tls": {
                        "certificatePath": format!("/etc/shotover-tls/{secret}/tls.crt"),
                        "privateKeyPath": format!("/etc/shotover-tls/{secret}/tls.key"),
                    },
                    "chain": [{"DebugReturner": {"Redis": "42"}}],
                }}],
                "dbSide": {"replicas": 1},
            },
        }),
    );
    let status = |field: &str| {
        get_json(&["shotovertopology", topology, "-n", ns])
            .and_then(|t| {
                t["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Degraded")
                    .map(|c| c[field].clone())
            })
            .unwrap_or(Value::Null)
    };
    wait_for("Degraded=True SecretMissing", LONG, || {
        (status("reason") == "SecretMissing").then_some(())
    });
    assert_eq!(
        status("message"),
        format!(
            "Secret {ns}/{secret} (spec.tlsSecrets) does not exist: the proxies that mount it do not start until it does"
        )
    );

    // The Secret appears: the proxy starts with it.
    apply_tls_secret(ns, secret, &cert1, &key1);
    let selector = format!("shotover.io/topology={topology}");
    let proxy = ready_pods(ns, &selector, 1).remove(0);
    let before = incarnations(std::slice::from_ref(&proxy));
    let pod = name(&proxy);
    let served = || -> Option<String> {
        let config: Value =
            serde_json::from_str(&pod_http(ns, &pod, 9001, "/config").ok()?).ok()?;
        config["tls_files"]
            .as_array()?
            .iter()
            .find(|f| f["at"] == "sources[0].tls.certificatePath")?["sha256"]
            .as_str()
            .map(str::to_owned)
    };
    assert_eq!(served().as_deref(), Some(sha1.as_str()));
    wait_for("Degraded=False", LONG, || {
        (status("status") == "False").then_some(())
    });

    // A client in the cluster talks TLS to the tier.
    let client = "tls-client";
    apply(
        ns,
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": client},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "app", "image": install.tools_image,
                    "imagePullPolicy": "Never", "command": ["sleep", "100000"]}],
            },
        }),
    );
    wait_for("the client Pod", LONG, || {
        get_json(&["pod", client, "-n", ns])
            .filter(is_ready)
            .map(|_| ())
    });
    let get = || {
        exec(
            ns,
            client,
            "app",
            &[
                "redis-cli",
                "--tls",
                "--insecure",
                "-h",
                &format!("{topology}-shotover"),
                "-p",
                "6390",
                "GET",
                "x",
            ],
        )
        .map(|s| s.trim().to_owned())
    };
    assert_eq!(get().as_deref(), Ok("42"));

    // Renewed: the kubelet updates the mounted Secret, the proxy reloads it and serves the
    // new certificate, in the same Pod, its container never restarted.
    apply_tls_secret(ns, secret, &cert2, &key2);
    wait_for("the proxy to serve the renewed certificate", LONG, || {
        (served().as_deref() == Some(sha2.as_str())).then_some(())
    });
    assert_eq!(
        incarnations(&ready_pods(ns, &selector, 1)),
        before,
        "the proxy Pod was not replaced or restarted"
    );
    assert_eq!(get().as_deref(), Ok("42"));

    let _ = kubectl(&["delete", "pod", client, "-n", ns, "--wait=false"]);
    k(&["delete", "shotovertopology", "-n", ns, topology]);
    let _ = kubectl(&["delete", "secret", secret, "-n", ns]);
    let _ = std::fs::remove_dir_all(&dir);
}

//! The real control plane for the operator's end-to-end tests: a client from `KUBECONFIG`
//! (`eval "$(e2e/services up kube)"`), the CRD installed, a fresh namespace per test (its
//! state dumped if the test fails), and the operator binary run as a process.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use shotover_crds::crd::{ShotoverTopology, ShotoverTopologyStatus};

pub struct Cluster {
    pub client: Client,
    pub ns: String,
}

impl Cluster {
    /// Connects to the control plane, installs the CRD and makes a namespace for `test`.
    pub async fn new(test: &str) -> Cluster {
        let Ok(kubeconfig) = std::env::var("KUBECONFIG") else {
            panic!(
                "KUBECONFIG is not set: start the local control plane with\n  eval \"$(e2e/services up kube)\""
            );
        };
        let client = Client::try_default()
            .await
            .unwrap_or_else(|e| panic!("cannot load KUBECONFIG={kubeconfig}: {e}"));
        client.apiserver_version().await.unwrap_or_else(|e| {
            panic!(
                "the apiserver of KUBECONFIG={kubeconfig} does not answer ({e}); start it with\n  eval \"$(e2e/services up kube)\""
            )
        });
        install_crd(&client).await;
        static N: AtomicUsize = AtomicUsize::new(0);
        let ns = format!(
            "{}-{}-{}",
            test.replace('_', "-").chars().take(40).collect::<String>(),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let namespaces: Api<Namespace> = Api::all(client.clone());
        // These tests drive Pods through the status API as a kubelet would: keep their Pods
        // off the node when one runs (e2e/kube/kube.sh, PodNodeSelector), so that no kubelet
        // competes with them.
        let namespace: Namespace = serde_json::from_value(json!({"metadata": {
            "name": ns,
            "annotations": {"scheduler.alpha.kubernetes.io/node-selector": "shotover.io/e2e=no-node"},
        }}))
        .expect("namespace");
        namespaces
            .create(&PostParams::default(), &namespace)
            .await
            .unwrap_or_else(|e| panic!("cannot create namespace {ns}: {e}"));
        Cluster { client, ns }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Creates a ShotoverTopology from its JSON `spec`.
    pub async fn create(
        &self,
        name: &str,
        spec: serde_json::Value,
    ) -> Result<ShotoverTopology, kube::Error> {
        let object: ShotoverTopology = serde_json::from_value(json!({
            "apiVersion": "shotover.io/v1alpha1",
            "kind": "ShotoverTopology",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("test topology");
        self.api::<ShotoverTopology>()
            .create(&PostParams::default(), &object)
            .await
    }

    /// Merge-patches a ShotoverTopology.
    pub async fn patch(&self, name: &str, patch: serde_json::Value) {
        self.api::<ShotoverTopology>()
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_or_else(|e| panic!("cannot patch {name}: {e}"));
    }

    /// Waits until the topology's status passes `check`, and returns it.
    pub async fn status_where(
        &self,
        name: &str,
        what: &str,
        check: impl Fn(&ShotoverTopologyStatus) -> bool,
    ) -> ShotoverTopologyStatus {
        let api = self.api::<ShotoverTopology>();
        wait_for(
            &format!("{name}: {what}"),
            Duration::from_secs(60),
            || async {
                let object = api.get(name).await.ok()?;
                object.status.filter(|s| check(s))
            },
        )
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for what in [
                "shotovertopologies,configmaps,statefulsets,services,poddisruptionbudgets,pods,leases",
                "events",
            ] {
                if let Ok(out) = Command::new("kubectl")
                    .args(["get", what, "-n", &self.ns, "-o", "wide"])
                    .output()
                {
                    eprintln!(
                        "--- kubectl get {what} -n {}\n{}{}",
                        self.ns,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
            if let Ok(out) = Command::new("kubectl")
                .args(["get", "shotovertopologies", "-n", &self.ns, "-o", "yaml"])
                .output()
            {
                eprintln!("{}", String::from_utf8_lossy(&out.stdout));
            }
        }
        let _ = Command::new("kubectl")
            .args(["delete", "namespace", &self.ns, "--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Server-side applies the CRD (a no-op when it is current) and waits until it is served.
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "shotovertopologies.shotover.io",
        &PatchParams::apply("shotover-e2e").force(),
        &Patch::Apply(shotover_crds::crd::crd()),
    )
    .await
    .unwrap_or_else(|e| panic!("the apiserver refused the CRD: {e}"));
    wait_for(
        "the CRD to be established",
        Duration::from_secs(30),
        || async {
            let crd = crds.get("shotovertopologies.shotover.io").await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        },
    )
    .await;
}

/// Polls `check` every 100 ms until it gives a value, failing after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks `invariant` every 100 ms for `window`, failing the first time it does not hold
/// (for what must stay true, not what must become true).
pub async fn holds_for(what: &str, window: Duration, invariant: impl Fn() -> bool) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(invariant(), "{what} stopped holding");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn condition<'a>(
    status: &'a ShotoverTopologyStatus,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// `type_` has `status` (`"True"`/`"False"`), for the topology's current generation.
pub fn has(status: &ShotoverTopologyStatus, type_: &str, value: &str) -> bool {
    condition(status, type_).is_some_and(|c| c.status == value)
}

/// A port nothing listens on, never the same twice in one process (the OS may hand a port
/// just released to the next bind).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A process whose stdout and stderr are kept (and printed if the test fails).
pub struct Process {
    child: Child,
    logs: Arc<Mutex<String>>,
    name: String,
}

impl Process {
    pub fn start(name: &str, cmd: &mut Command) -> Process {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let logs = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut logs = logs.lock().unwrap_or_else(|e| e.into_inner());
                    logs.push_str(&line);
                    logs.push('\n');
                }
            });
        }
        Process {
            child,
            logs,
            name: name.to_owned(),
        }
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// SIGKILL, and wait.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Fails on WARN or ERROR lines not matching `allowed`.
    pub fn assert_quiet(&self, allowed: &[&str]) {
        let logs = self.logs();
        for line in logs.lines() {
            let loud = line.contains(" WARN ") || line.contains(" ERROR ");
            if loud && !allowed.iter().any(|a| line.contains(a)) {
                panic!(
                    "unexpected log line from {}:\n{line}\n--- all logs:\n{logs}",
                    self.name
                );
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} logs:\n{}", self.name, self.logs());
        }
        self.stop();
    }
}

/// The operator binary, run as a process watching one namespace.
pub struct Operator {
    process: Process,
    pub http: String,
    pub identity: String,
}

impl Operator {
    pub fn start(ns: &str, identity: &str) -> Operator {
        Operator::start_with(ns, identity, None, &[])
    }

    /// With another KUBECONFIG (for example one that impersonates the chart's
    /// ServiceAccount) and more flags.
    pub fn start_with(
        ns: &str,
        identity: &str,
        kubeconfig: Option<&str>,
        extra: &[&str],
    ) -> Operator {
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(workspace_binary("shotover-operator", "shotover-operator"));
        cmd.args([
            "run",
            "--namespace",
            ns,
            "--http-addr",
            &http,
            "--identity",
            identity,
        ])
        .args(extra)
        .env("RUST_LOG", "info");
        if let Some(kubeconfig) = kubeconfig {
            cmd.env("KUBECONFIG", kubeconfig);
        }
        let process = Process::start(&format!("operator {identity}"), &mut cmd);
        Operator {
            process,
            http,
            identity: identity.to_owned(),
        }
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    /// `/metrics`, or an empty string while the listener is not up.
    pub fn metrics(&self) -> String {
        get(&self.http, "/metrics").unwrap_or_default()
    }

    pub fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.metrics(), series)
    }

    pub fn is_leader(&self) -> bool {
        self.metric("shotover_operator_leader") == Some(1.0)
    }

    pub fn terminate(&self) {
        self.process.terminate()
    }

    /// Fails on WARN or ERROR lines not matching `allowed`.
    pub fn assert_quiet(&self, allowed: &[&str]) {
        self.process.assert_quiet(allowed)
    }
}

/// A copy of `KUBECONFIG` that acts as ServiceAccount `namespace/name` (impersonation), so a
/// process run with it has exactly the ServiceAccount's RBAC. Returns its path.
#[allow(dead_code)] // used by webhook/tests/kube_e2e, which includes this file
pub fn service_account_kubeconfig(namespace: &str, name: &str) -> String {
    let admin = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let text = std::fs::read_to_string(&admin).expect("read KUBECONFIG");
    let acting = text.replacen(
        "  user:\n",
        &format!(
            "  user:\n    as: system:serviceaccount:{namespace}:{name}\n    as-groups: [system:serviceaccounts, \"system:serviceaccounts:{namespace}\", system:authenticated]\n"
        ),
        1,
    );
    assert_ne!(acting, text, "no `user:` entry in {admin}");
    let path = std::env::temp_dir().join(format!("{namespace}-{name}.kubeconfig"));
    std::fs::write(&path, acting).expect("write kubeconfig");
    path.to_string_lossy().into_owned()
}

/// The value of `series` in a Prometheus exposition.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A plain HTTP/1.1 GET; the body on 200.
pub fn get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// The `shotover` proxy binary of this build (built if it is not there yet).
pub fn shotover_binary() -> PathBuf {
    workspace_binary("shotover", "shotover")
}

/// A binary of this workspace, from this build's target directory (built if it is not there:
/// `cargo test --workspace` builds every binary first).
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let binary = dir.join(bin);
    if !binary.exists() {
        let profile_release = dir.ends_with("release");
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
        cargo.args(["build", "-p", package, "--bin", bin]);
        if profile_release {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "cannot build the {bin} binary");
    }
    assert!(binary.exists(), "no {bin} binary at {}", binary.display());
    binary
}

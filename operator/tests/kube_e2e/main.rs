//! The operator end to end on a real control plane (etcd, kube-apiserver and
//! kube-controller-manager from `e2e/services up kube`; no kubelet, so the tests mark Pods
//! ready through the Pod status API as a kubelet would). Each test has its own namespace and
//! its own operator process watching it.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use shotover_crds::crd::{CONFIG_HASH_ANNOTATION, ShotoverTopology};
use support::{Cluster, Operator, has, wait_for};

fn redis_spec(counter: &str, listen: &str, remote: &str) -> Value {
    json!({
        "sources": [{"Redis": {
            "name": "redis", "listenAddr": listen,
            "chain": [
                {"QueryCounter": {"counterName": counter}},
                {"RedisSinkSingle": {"remoteAddress": remote, "connectTimeoutMs": 3000}},
            ],
        }}],
    })
}

fn db_side_spec(counter: &str, replicas: i32) -> Value {
    let mut spec = redis_spec(counter, "0.0.0.0:6379", "redis.db:6379");
    spec["dbSide"] = json!({"replicas": replicas});
    spec
}

fn template_hash(sts: &StatefulSet) -> Option<String> {
    sts.spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(CONFIG_HASH_ANNOTATION)
        .cloned()
}

/// Marks every pod of the topology's StatefulSet Running and Ready, as a kubelet would.
async fn mark_pods_ready(cluster: &Cluster, name: &str, count: usize) {
    let pods = cluster.api::<Pod>();
    let selector = format!("app.kubernetes.io/instance={name}");
    let list = wait_for(
        &format!("{count} pods of {name}"),
        Duration::from_secs(60),
        || async {
            let list = pods
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            (list.items.len() == count).then_some(list)
        },
    )
    .await;
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    for pod in list.items {
        let pod_name = pod.metadata.name.expect("pod name");
        let status = json!({"status": {
            "phase": "Running",
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": now},
                {"type": "Ready", "status": "True", "lastTransitionTime": now},
            ],
        }});
        pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap_or_else(|e| panic!("cannot mark {pod_name} ready: {e}"));
    }
}

#[tokio::test]
async fn applying_a_topology_deploys_its_tier_and_reports_it_ready() {
    let cluster = Cluster::new("apply").await;
    let operator = Operator::start(&cluster.ns, "apply");
    cluster
        .create("cache", db_side_spec("cache", 2))
        .await
        .expect("created");
    // At start it checked the installed CRD's schema version against its own.
    wait_for("the schema check", Duration::from_secs(30), || async {
        operator
            .logs()
            .contains(&format!(
                "the installed CRD is this operator's schema schema_version={}",
                shotover_crds::crd::schema_version()
            ))
            .then_some(())
    })
    .await;

    let status = cluster
        .status_where("cache", "ConfigValid and a hash", |s| {
            has(s, "ConfigValid", "True") && s.config_hash.is_some() && s.replicas == Some(2)
        })
        .await;
    let hash = status.config_hash.clone().expect("hash");
    assert_eq!(status.observed_generation, Some(1));
    assert!(
        has(&status, "Ready", "False"),
        "no pod is ready yet: {status:?}"
    );
    assert!(has(&status, "Progressing", "True"), "{status:?}");
    assert!(has(&status, "Degraded", "False"), "{status:?}");
    assert_eq!(status.ready_replicas, Some(0));

    let cm = cluster
        .api::<ConfigMap>()
        .get("cache-shotover-config")
        .await
        .expect("ConfigMap");
    assert_eq!(
        cm.metadata.annotations.as_ref().expect("annotations")[CONFIG_HASH_ANNOTATION],
        hash
    );
    let data = cm.data.expect("data");
    shotover_crds::load_topology(&data["topology.yaml"]).expect("the proxy loads topology.yaml");
    let sts = cluster
        .api::<StatefulSet>()
        .get("cache-shotover")
        .await
        .expect("StatefulSet");
    // The proxies reload the ConfigMap in place (configUpdate: Reload, the default): the
    // pod template does not carry the hash.
    assert_eq!(template_hash(&sts), None);
    assert_eq!(sts.spec.as_ref().and_then(|s| s.replicas), Some(2));
    let services = cluster.api::<Service>();
    let headless = services
        .get("cache-shotover-headless")
        .await
        .expect("headless Service");
    assert_eq!(
        headless.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    let client = services
        .get("cache-shotover")
        .await
        .expect("client Service");
    assert_eq!(
        client.spec.and_then(|s| s.ports).expect("ports")[0].port,
        6379
    );
    cluster
        .api::<PodDisruptionBudget>()
        .get("cache-shotover")
        .await
        .expect("PodDisruptionBudget");

    // The kube-controller-manager creates the pods; "the kubelet" marks them ready.
    mark_pods_ready(&cluster, "cache", 2).await;
    let status = cluster
        .status_where("cache", "Ready with 2 ready proxies", |s| {
            has(s, "Ready", "True") && s.ready_replicas == Some(2)
        })
        .await;
    assert!(has(&status, "Progressing", "False"), "{status:?}");
    assert_eq!(status.config_hash.as_deref(), Some(hash.as_str()));

    // Events announce the transitions.
    let events = cluster.api::<Event>();
    let reasons: Vec<String> = wait_for(
        "the ProxiesReady Event",
        Duration::from_secs(20),
        || async {
            let list = events.list(&ListParams::default()).await.ok()?;
            let reasons: Vec<String> = list
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("cache"))
                .filter_map(|e| e.reason)
                .collect();
            reasons
                .iter()
                .any(|r| r == "ProxiesReady")
                .then_some(reasons)
        },
    )
    .await;
    assert!(reasons.iter().any(|r| r == "Valid"), "{reasons:?}");

    let metrics = operator.metrics();
    assert!(
        operator
            .metric("shotover_operator_reconciles_total")
            .unwrap_or(0.0)
            >= 2.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("shotover_operator_reconcile_duration_seconds_count"),
        "{metrics}"
    );
    assert_eq!(
        support::get(&operator.http, "/readyz").as_deref(),
        Some("ready\n")
    );
    operator.assert_quiet(&[]);
}

#[tokio::test]
async fn a_chain_change_rolls_the_pods_only_with_rolling_restart_and_scaling_never() {
    let cluster = Cluster::new("change").await;
    let operator = Operator::start(&cluster.ns, "change");
    cluster
        .create("cache", db_side_spec("before", 1))
        .await
        .expect("created");
    let first = cluster
        .status_where("cache", "a first hash", |s| s.config_hash.is_some())
        .await
        .config_hash
        .expect("hash");
    let sts_api = cluster.api::<StatefulSet>();
    let sts = sts_api.get("cache-shotover").await.expect("StatefulSet");
    let generation = sts.metadata.generation;

    // Scaling changes neither the configuration nor the pod template.
    cluster
        .patch("cache", json!({"spec": {"dbSide": {"replicas": 3}}}))
        .await;
    let scaled = cluster
        .status_where("cache", "generation 2 observed", |s| {
            s.observed_generation == Some(2) && s.replicas == Some(3)
        })
        .await;
    assert_eq!(scaled.config_hash.as_deref(), Some(first.as_str()));
    let sts = sts_api.get("cache-shotover").await.expect("StatefulSet");
    assert_eq!(template_hash(&sts), None);
    let template = sts.spec.as_ref().map(|s| s.template.clone());

    // A chain change (configUpdate: Reload): a new hash in the ConfigMap, the same template.
    let mut spec = db_side_spec("after", 3);
    spec["sources"][0]["Redis"]["chain"][0]["QueryCounter"]["counterName"] = json!("after");
    cluster.patch("cache", json!({"spec": spec})).await;
    let changed = cluster
        .status_where("cache", "generation 3 with a new hash", |s| {
            s.observed_generation == Some(3) && s.config_hash.as_deref() != Some(first.as_str())
        })
        .await;
    let second = changed.config_hash.clone().expect("hash");
    let cm = cluster
        .api::<ConfigMap>()
        .get("cache-shotover-config")
        .await
        .expect("ConfigMap");
    assert!(cm.data.expect("data")["topology.yaml"].contains("counterName: after"));
    let sts = sts_api.get("cache-shotover").await.expect("StatefulSet");
    assert_eq!(sts.spec.as_ref().map(|s| s.template.clone()), template);
    assert_ne!(sts.metadata.generation, generation, "scaled");
    let revision_before = sts.status.and_then(|s| s.update_revision);

    // configUpdate: RollingRestart: the hash goes on the template, a new revision rolls.
    cluster
        .patch(
            "cache",
            json!({"spec": {"dbSide": {"configUpdate": "RollingRestart"}}}),
        )
        .await;
    cluster
        .status_where("cache", "generation 4 observed", |s| {
            s.observed_generation == Some(4)
        })
        .await;
    let sts = wait_for(
        "the StatefulSet's new revision",
        Duration::from_secs(30),
        || async {
            let sts = sts_api.get("cache-shotover").await.ok()?;
            let revision = sts.status.as_ref()?.update_revision.clone();
            (revision != revision_before).then_some(sts)
        },
    )
    .await;
    assert_eq!(template_hash(&sts), Some(second));
    let args = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref()?.containers[0].args.clone());
    assert!(
        args.as_ref()
            .is_some_and(|a| a.join(" ").contains("--watch-interval-ms 0")),
        "the proxies do not watch their files: {args:?}"
    );
    let status = cluster
        .status_where("cache", "rolling out", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "RollingOut")
        })
        .await;
    assert!(has(&status, "Ready", "False"), "the new pods are not ready");
    operator.assert_quiet(&[]);
}

#[tokio::test]
async fn the_apiserver_refuses_what_cel_can_see() {
    let cluster = Cluster::new("cel").await;
    let mut no_sink = redis_spec("x", "0.0.0.0:6379", "redis:6379");
    no_sink["sources"][0]["Redis"]["chain"] = json!([{"QueryCounter": {"counterName": "x"}}]);
    let mut duplicate = redis_spec("x", "0.0.0.0:6379", "redis:6379");
    let mut second = duplicate["sources"][0].clone();
    second["Redis"]["listenAddr"] = json!("0.0.0.0:6380");
    duplicate["sources"]
        .as_array_mut()
        .expect("list")
        .push(second);
    let negative = db_side_spec("x", -1);
    for (name, spec, expected) in [
        (
            "no-sink",
            no_sink,
            "a chain must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)",
        ),
        ("duplicate", duplicate, "source names must be unique"),
        ("negative", negative, "replicas must be 0 or more"),
    ] {
        let error = cluster.create(name, spec).await.expect_err("refused");
        let kube::Error::Api(status) = &error else {
            panic!("{name}: not an API error: {error}");
        };
        assert_eq!(status.code, 422, "{name}: {status:?}");
        assert!(
            status.message.contains(expected),
            "{name}: {}",
            status.message
        );
    }
}

#[tokio::test]
async fn an_invalid_topology_is_reported_and_the_last_good_config_stays() {
    let cluster = Cluster::new("invalid").await;
    let operator = Operator::start(&cluster.ns, "invalid");
    cluster
        .create("cache", db_side_spec("good", 1))
        .await
        .expect("created");
    let good = cluster
        .status_where("cache", "a valid config", |s| s.config_hash.is_some())
        .await
        .config_hash
        .expect("hash");
    let cm_before = cluster
        .api::<ConfigMap>()
        .get("cache-shotover-config")
        .await
        .expect("cm");
    let sts_before = cluster
        .api::<StatefulSet>()
        .get("cache-shotover")
        .await
        .expect("sts");

    // Passes the schema, fails the proxy's validation: two errors, both reported.
    let mut spec = db_side_spec("bad", 1);
    spec["sources"][0]["Redis"]["chain"][1]["RedisSinkSingle"]["remoteAddress"] = json!("no-port");
    spec["sources"][0]["Redis"]["listenAddr"] = json!("127.0.0.1:6379");
    cluster.patch("cache", json!({"spec": spec})).await;
    let status = cluster
        .status_where("cache", "ConfigValid=False", |s| {
            s.observed_generation == Some(2) && has(s, "ConfigValid", "False")
        })
        .await;
    let message = &support::condition(&status, "ConfigValid")
        .expect("ConfigValid")
        .message;
    assert!(
        message.starts_with("invalid topology (2 errors):"),
        "{message}"
    );
    assert!(message.contains("spec.sources[0].chain[1]"), "{message}");
    assert!(
        message.contains("which the Service cannot reach"),
        "{message}"
    );
    assert!(has(&status, "Degraded", "True"));
    assert!(has(&status, "Ready", "False"));
    assert_eq!(status.config_hash.as_deref(), Some(good.as_str()));

    let cm_after = cluster
        .api::<ConfigMap>()
        .get("cache-shotover-config")
        .await
        .expect("cm");
    assert_eq!(
        cm_after.data, cm_before.data,
        "the last good ConfigMap stays"
    );
    let sts_after = cluster
        .api::<StatefulSet>()
        .get("cache-shotover")
        .await
        .expect("sts");
    assert_eq!(template_hash(&sts_after), template_hash(&sts_before));
    assert_eq!(
        sts_after.metadata.generation,
        sts_before.metadata.generation
    );
    operator.assert_quiet(&[]);
}

#[tokio::test]
async fn a_paused_topology_is_left_alone_until_resumed() {
    let cluster = Cluster::new("paused").await;
    let operator = Operator::start(&cluster.ns, "paused");
    cluster
        .create("cache", redis_spec("one", "0.0.0.0:6379", "redis:6379"))
        .await
        .expect("created");
    let first = cluster
        .status_where("cache", "a hash", |s| s.config_hash.is_some())
        .await
        .config_hash;
    cluster
        .patch(
            "cache",
            json!({"metadata": {"annotations": {"shotover.io/paused": "true"}},
                   "spec": redis_spec("two", "0.0.0.0:6379", "redis:6379")}),
        )
        .await;
    let paused = cluster
        .status_where("cache", "ReconciliationPaused=True", |s| {
            has(s, "ReconciliationPaused", "True")
        })
        .await;
    assert_eq!(paused.observed_generation, Some(1));
    assert_eq!(paused.config_hash, first);

    cluster
        .patch(
            "cache",
            json!({"metadata": {"annotations": {"shotover.io/paused": null}}}),
        )
        .await;
    let resumed = cluster
        .status_where("cache", "generation 2 rendered", |s| {
            s.observed_generation == Some(2) && has(s, "ReconciliationPaused", "False")
        })
        .await;
    assert_ne!(resumed.config_hash, first);
    operator.assert_quiet(&[]);
}

#[tokio::test]
async fn deleting_a_topology_collects_everything_made_for_it() {
    let cluster = Cluster::new("delete").await;
    let operator = Operator::start(&cluster.ns, "delete");
    cluster
        .create("cache", db_side_spec("x", 1))
        .await
        .expect("created");
    cluster
        .status_where("cache", "the tier", |s| s.replicas.is_some())
        .await;
    cluster
        .api::<ShotoverTopology>()
        .delete("cache", &DeleteParams::default())
        .await
        .expect("deleted");
    let (cms, stss, svcs, pdbs) = (
        cluster.api::<ConfigMap>(),
        cluster.api::<StatefulSet>(),
        cluster.api::<Service>(),
        cluster.api::<PodDisruptionBudget>(),
    );
    wait_for("garbage collection", Duration::from_secs(60), || async {
        let gone = cms.get_opt("cache-shotover-config").await.ok()?.is_none()
            && stss.get_opt("cache-shotover").await.ok()?.is_none()
            && svcs.get_opt("cache-shotover").await.ok()?.is_none()
            && svcs
                .get_opt("cache-shotover-headless")
                .await
                .ok()?
                .is_none()
            && pdbs.get_opt("cache-shotover").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    operator.assert_quiet(&[]);
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_hand_over_on_shutdown() {
    let cluster = Cluster::new("leader").await;
    let first = Operator::start(&cluster.ns, "first");
    let second = Operator::start(&cluster.ns, "second");
    let leases = cluster.api::<Lease>();
    let holder = wait_for("a leader", Duration::from_secs(30), || async {
        let lease = leases.get_opt("shotover-operator").await.ok()??;
        let holder = lease.spec?.holder_identity?;
        let leader = if holder == "first" { &first } else { &second };
        leader.is_leader().then_some(holder)
    })
    .await;
    let (leader, standby) = if holder == "first" {
        (&first, &second)
    } else {
        (&second, &first)
    };
    // The standby's metrics listener may come up after the leader won (a loaded machine):
    // wait for it, so that the look below sees what it says rather than nothing.
    wait_for("the standby's metrics", Duration::from_secs(30), || async {
        standby.metric("shotover_operator_leader").map(|_| ())
    })
    .await;
    // Both serve; only one leads, at every look over two renewal periods of the lease.
    support::holds_for(
        "one leader, the standby idle",
        Duration::from_secs(5),
        || {
            leader.is_leader()
                && standby.metric("shotover_operator_leader") == Some(0.0)
                && standby.metric("shotover_operator_reconciles_total") == Some(0.0)
        },
    )
    .await;
    assert!(leader.is_leader());
    assert_eq!(standby.metric("shotover_operator_leader"), Some(0.0));
    assert_eq!(
        standby.metric("shotover_operator_reconciles_total"),
        Some(0.0)
    );

    cluster
        .create("cache", redis_spec("x", "0.0.0.0:6379", "redis:6379"))
        .await
        .expect("created");
    cluster
        .status_where("cache", "reconciled by the leader", |s| {
            s.config_hash.is_some()
        })
        .await;
    assert_eq!(
        standby.metric("shotover_operator_reconciles_total"),
        Some(0.0)
    );

    // The leader stops: it releases the lease and the standby takes over within a retry period.
    leader.terminate();
    let standby_identity = standby.identity.clone();
    wait_for("the standby to lead", Duration::from_secs(15), || async {
        let lease = leases.get_opt("shotover-operator").await.ok()??;
        (lease.spec?.holder_identity.as_deref() == Some(standby_identity.as_str())
            && standby.is_leader())
        .then_some(())
    })
    .await;
    cluster
        .patch(
            "cache",
            json!({"spec": redis_spec("y", "0.0.0.0:6379", "redis:6379")}),
        )
        .await;
    cluster
        .status_where("cache", "generation 2 from the new leader", |s| {
            s.observed_generation == Some(2)
        })
        .await;
    wait_for(
        "the old leader to exit",
        Duration::from_secs(20),
        || async { leader.logs().contains("stopped").then_some(()) },
    )
    .await;
    assert!(
        leader.logs().contains("released the leader lease"),
        "{}",
        leader.logs()
    );
    leader.assert_quiet(&[]);
    standby.assert_quiet(&[]);
}

#[tokio::test]
async fn the_rendered_config_runs_the_proxy_against_real_redis() {
    let Ok(redis) = std::env::var("REDIS_ADDR") else {
        panic!("REDIS_ADDR is not set: start Redis with\n  eval \"$(e2e/services up redis)\"");
    };
    let cluster = Cluster::new("proxy").await;
    let operator = Operator::start(&cluster.ns, "proxy");
    let listen = format!("127.0.0.1:{}", support::free_port());
    let observability = support::free_port();
    let mut spec = redis_spec("rendered", &listen, &redis);
    spec["observabilityPort"] = json!(observability);
    cluster.create("cache", spec).await.expect("created");
    let status = cluster
        .status_where("cache", "Ready", |s| has(s, "Ready", "True"))
        .await;
    let cm = cluster
        .api::<ConfigMap>()
        .get("cache-shotover-config")
        .await
        .expect("cm");
    assert_eq!(status.config_map.as_deref(), Some("cache-shotover-config"));
    let data = cm.data.expect("data");

    // The proxy runs on exactly the files the operator rendered.
    let dir = std::env::temp_dir().join(format!("shotover-rendered-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("topology.yaml"), &data["topology.yaml"]).expect("write");
    std::fs::write(dir.join("config.yaml"), &data["config.yaml"]).expect("write");
    let mut proxy = std::process::Command::new(support::shotover_binary())
        .arg("--topology-file")
        .arg(dir.join("topology.yaml"))
        .arg("--config-file")
        .arg(dir.join("config.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("the proxy starts");
    let observability_addr = format!("127.0.0.1:{observability}");
    wait_for("the proxy to be ready", Duration::from_secs(20), || async {
        support::get(&observability_addr, "/ready").map(|_| ())
    })
    .await;

    let client = redis::Client::open(format!("redis://{listen}/")).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connects through the proxy");
    let key = format!("operator-e2e:{}", std::process::id());
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("through the rendered config")
        .query_async(&mut conn)
        .await
        .expect("SET");
    let value: String = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(value, "through the rendered config");
    let _: i64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("DEL");

    let metrics = support::get(&observability_addr, "/metrics").expect("metrics");
    let counted = |query: &str| {
        metrics.lines().any(|l| {
            l.starts_with("shotover_query_count{")
                && l.contains("name=\"rendered\"")
                && l.contains(&format!("query=\"{query}\""))
                && l.ends_with(" 1")
        })
    };
    assert!(counted("SET") && counted("GET"), "{metrics}");
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
    operator.assert_quiet(&[]);
}

/// An object of the name the operator would write, made by someone else, is not taken over:
/// the status says whose it is, nothing of it changes, and once it is gone the topology
/// renders as usual.
#[tokio::test]
async fn objects_the_topology_does_not_own_are_not_taken_over() {
    let cluster = Cluster::new("foreign").await;
    let operator = Operator::start(&cluster.ns, "foreign");
    let configmaps = cluster.api::<ConfigMap>();
    let theirs: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "cache-shotover-config", "labels": {"team": "other"}},
        "data": {"settings": "theirs"},
    }))
    .expect("ConfigMap");
    configmaps
        .create(&PostParams::default(), &theirs)
        .await
        .expect("their ConfigMap");
    cluster
        .create("cache", db_side_spec("cache", 1))
        .await
        .expect("created");
    let refused = cluster
        .status_where("cache", "Ready=False NotOwned", |s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.reason == "NotOwned")
        })
        .await;
    let degraded = refused
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("True", "NotOwned")
    );
    assert_eq!(
        degraded.message,
        format!(
            "ConfigMap {}/cache-shotover-config exists and is not this topology's (it has no ownerReference to it): not taken over; delete or rename it, or rename the topology",
            cluster.ns
        )
    );
    let kept = configmaps
        .get("cache-shotover-config")
        .await
        .expect("their ConfigMap");
    assert_eq!(kept.data, theirs.data, "their data is untouched");
    assert!(kept.metadata.owner_references.is_none());
    assert!(
        cluster
            .api::<StatefulSet>()
            .get_opt("cache-shotover")
            .await
            .expect("read")
            .is_none(),
        "nothing else was made either"
    );

    configmaps
        .delete("cache-shotover-config", &Default::default())
        .await
        .expect("deleted");
    let rendered = cluster
        .status_where("cache", "the ConfigMap rendered once theirs is gone", |s| {
            has(s, "ConfigValid", "True")
                && s.conditions
                    .iter()
                    .any(|c| c.type_ == "Degraded" && c.reason == "AsExpected")
        })
        .await;
    assert!(rendered.config_hash.is_some());
    assert!(
        operator.metric("shotover_operator_reconcile_errors_total{kind=\"not_owned\"}")
            >= Some(1.0),
        "counted"
    );
}

/// `--allowed-service-types` and `--allowed-service-annotations` limit what a topology may
/// ask of its client Service: more is invalid, saying what, and nothing is deployed.
#[tokio::test]
async fn the_service_policy_refuses_what_it_does_not_allow() {
    let cluster = Cluster::new("policy").await;
    let operator = Operator::start_with(
        &cluster.ns,
        "policy",
        None,
        &[
            "--allowed-service-types=ClusterIP",
            "--allowed-service-annotations=service.beta.kubernetes.io/*",
        ],
    );
    let mut spec = db_side_spec("cache", 1);
    spec["dbSide"]["service"] = json!({
        "type": "LoadBalancer",
        "annotations": {"example.com/expose": "internet"},
    });
    cluster.create("cache", spec).await.expect("created");
    let status = cluster
        .status_where("cache", "ConfigValid=False", |s| {
            has(s, "ConfigValid", "False")
        })
        .await;
    let message = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "ConfigValid")
        .expect("ConfigValid")
        .message;
    assert!(
        message.contains("spec.dbSide.service.type: LoadBalancer is not allowed by the operator (--allowed-service-types: ClusterIP)")
            && message.contains("annotation `example.com/expose` is not allowed"),
        "{message}"
    );
    assert!(
        cluster
            .api::<Service>()
            .get_opt("cache-shotover")
            .await
            .expect("read")
            .is_none()
    );
    // Within the policy: deployed.
    cluster
        .patch(
            "cache",
            json!({"spec": {"dbSide": {"service": {"type": "ClusterIP", "annotations": {
                "example.com/expose": null,
                "service.beta.kubernetes.io/aws-load-balancer-internal": "true"}}}}}),
        )
        .await;
    cluster
        .status_where("cache", "ConfigValid=True", |s| {
            has(s, "ConfigValid", "True")
        })
        .await;
    operator.assert_quiet(&[]);
}

/// The scale subresource: `kubectl scale` (or a HorizontalPodAutoscaler) sets
/// spec.dbSide.replicas, the StatefulSet follows, and the scale reports the proxies'
/// selector and count, as an autoscaler reads them.
#[tokio::test]
async fn the_scale_subresource_scales_the_tier_and_reports_its_selector() {
    let cluster = Cluster::new("scale").await;
    let operator = Operator::start(&cluster.ns, "scale");
    cluster
        .create("cache", db_side_spec("cache", 1))
        .await
        .expect("created");
    cluster
        .status_where("cache", "replicas 1", |s| s.replicas.is_some())
        .await;
    let topologies = cluster.api::<ShotoverTopology>();
    topologies
        .patch_scale(
            "cache",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("scaled");
    let sts_api = cluster.api::<StatefulSet>();
    wait_for("the StatefulSet at 3", Duration::from_secs(30), || async {
        let sts = sts_api.get("cache-shotover").await.ok()?;
        (sts.spec.as_ref()?.replicas == Some(3)).then_some(())
    })
    .await;
    let topology = topologies.get("cache").await.expect("topology");
    assert_eq!(
        topology.spec.db_side.as_ref().map(|d| d.replicas),
        Some(3),
        "the scale wrote spec.dbSide.replicas"
    );
    let scale = wait_for("the scale's status", Duration::from_secs(30), || async {
        let scale = topologies.get_scale("cache").await.ok()?;
        let status = scale.status.clone()?;
        (status.replicas == 3 && status.selector.is_some()).then_some(scale)
    })
    .await;
    let selector = scale.status.and_then(|s| s.selector).expect("selector");
    assert_eq!(
        selector,
        "app.kubernetes.io/component=db-side-proxy,app.kubernetes.io/instance=cache,app.kubernetes.io/name=shotover"
    );
    // The selector finds the tier's Pods.
    let pods = cluster
        .api::<Pod>()
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("pods");
    assert_eq!(pods.items.len(), 3, "{selector}");
    operator.assert_quiet(&[]);
}

/// The apiserver takes a podTemplate overlay (the CRD's schema has the Kubernetes types),
/// and the StatefulSet's Pods carry it.
#[tokio::test]
async fn the_pod_template_overlay_reaches_the_stateful_set() {
    let cluster = Cluster::new("overlay").await;
    let operator = Operator::start(&cluster.ns, "overlay");
    let mut spec = db_side_spec("cache", 1);
    spec["dbSide"]["podTemplate"] = json!({
        "labels": {"team": "data"},
        "imagePullSecrets": [{"name": "registry"}],
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "proxies", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "pool", "operator": "In", "values": ["proxies"]}]}]}}},
        "priorityClassName": "system-cluster-critical",
    });
    cluster.create("cache", spec).await.expect("created");
    let sts_api = cluster.api::<StatefulSet>();
    let sts = wait_for("the StatefulSet", Duration::from_secs(30), || async {
        sts_api.get("cache-shotover").await.ok()
    })
    .await;
    let template = sts.spec.expect("spec").template;
    assert_eq!(
        template.metadata.and_then(|m| m.labels).expect("labels")["team"],
        "data"
    );
    let pod = template.spec.expect("pod");
    assert_eq!(pod.image_pull_secrets.expect("secrets")[0].name, "registry");
    assert!(pod.affinity.and_then(|a| a.node_affinity).is_some());
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-cluster-critical")
    );
    operator.assert_quiet(&[]);
}

use super::*;
use crate::fixtures::ApiServer;
use serde_json::{Value, json};

const NS: &str = "apps";
const TOPOLOGIES: &str = "/apis/shotover.io/v1alpha1/namespaces/apps/shotovertopologies";

fn topology(spec: Value, annotations: Value, status: Option<Value>) -> Arc<ShotoverTopology> {
    let mut object = json!({
        "apiVersion": "shotover.io/v1alpha1",
        "kind": "ShotoverTopology",
        "metadata": {
            "name": "cache", "namespace": NS, "uid": "uid-1", "generation": 4,
            "annotations": annotations,
        },
        "spec": spec,
    });
    if let Some(status) = status {
        object["status"] = status;
    }
    Arc::new(serde_json::from_value(object).expect("test topology"))
}

/// What the apiserver answers to a status write (the reconciler does not look at it).
fn stored() -> Value {
    serde_json::to_value(topology(redis_spec(), json!({}), None).as_ref()).expect("JSON")
}

fn redis_spec() -> Value {
    json!({
        "sources": [{"Redis": {
            "name": "redis", "listenAddr": "0.0.0.0:6379",
            "chain": [{"RedisSinkSingle": {"remoteAddress": "redis:6379"}}],
        }}],
    })
}

fn condition(status: &Value, type_: &str) -> Value {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
        .unwrap_or_else(|| panic!("no {type_} in {status}"))
}

/// The ConfigMap apply every valid reconcile starts with (answered with its own body).
async fn expect_config_map(api: &mut ApiServer) -> crate::fixtures::Seen {
    api.expect_apply(
        "/api/v1/namespaces/apps/configmaps/cache-shotover-config",
        200,
        None,
    )
    .await
}

/// The status write; returns the whole request (the status is under `body["status"]`).
async fn expect_status_write(api: &mut ApiServer) -> crate::fixtures::Seen {
    api.expect(
        "PATCH",
        &format!("{TOPOLOGIES}/cache/status"),
        200,
        Some(stored()),
    )
    .await
}

/// `n` Event creations, in order.
async fn expect_events(api: &mut ApiServer, n: usize) -> Vec<Value> {
    let mut events = Vec::with_capacity(n);
    for _ in 0..n {
        events.push(api.expect_event(NS).await);
    }
    events
}

fn spawn(
    topology: Arc<ShotoverTopology>,
    ctx: Arc<Context>,
) -> tokio::task::JoinHandle<Result<Action, Error>> {
    tokio::spawn(reconcile(topology, ctx))
}

async fn finish(task: tokio::task::JoinHandle<Result<Action, Error>>) -> Result<Action, Error> {
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the reconcile finishes")
        .expect("the reconcile does not panic")
}

#[tokio::test]
async fn a_valid_topology_is_applied_then_reported_ready() {
    let (ctx, mut api) = ApiServer::context();
    let task = spawn(topology(redis_spec(), json!({}), None), ctx.clone());

    let cm = expect_config_map(&mut api).await;
    assert!(
        cm.query.contains("fieldManager=shotover-operator"),
        "{}",
        cm.query
    );
    assert!(cm.query.contains("force=true"), "{}", cm.query);
    assert_eq!(cm.body["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    let topology_yaml = cm.body["data"]["topology.yaml"]
        .as_str()
        .expect("topology.yaml");
    shotover_crds::load_topology(topology_yaml).expect("the proxy loads it");
    let hash = cm.body["metadata"]["annotations"]["shotover.io/config-hash"].clone();

    let status = expect_status_write(&mut api).await;
    assert!(status.query.contains("fieldManager=shotover-operator"));
    let status = &status.body["status"];
    assert_eq!(status["observedGeneration"], 4);
    assert_eq!(status["configHash"], hash);
    assert_eq!(condition(status, "Ready")["status"], "True");
    assert_eq!(condition(status, "ConfigValid")["status"], "True");

    let mut reasons = Vec::new();
    for event in expect_events(&mut api, 2).await {
        assert_eq!(event["regarding"]["name"], "cache");
        assert_eq!(event["type"], "Normal");
        reasons.push(event["reason"].as_str().unwrap_or_default().to_owned());
    }
    // Conditions that appear in their quiet state (not progressing, not degraded) are no news.
    assert_eq!(reasons, ["ConfigRendered", "Valid"]);

    let action = finish(task).await.expect("reconciled");
    assert_eq!(action, Action::requeue(RESYNC));
    api.expect_nothing_more().await;
}

#[tokio::test]
async fn an_unchanged_status_is_not_written_again() {
    let (ctx, mut api) = ApiServer::context();
    // First pass: learn the status it writes.
    let task = spawn(topology(redis_spec(), json!({}), None), ctx.clone());
    expect_config_map(&mut api).await;
    let written = expect_status_write(&mut api).await.body["status"].clone();
    expect_events(&mut api, 2).await;
    finish(task).await.expect("reconciled");

    // Second pass with that status in place: the ConfigMap is applied (drift repair), nothing else.
    let task = spawn(topology(redis_spec(), json!({}), Some(written)), ctx);
    expect_config_map(&mut api).await;
    finish(task).await.expect("reconciled");
    api.expect_nothing_more().await;
}

#[tokio::test]
async fn an_invalid_topology_touches_nothing_but_its_status() {
    let (ctx, mut api) = ApiServer::context();
    let mut spec = redis_spec();
    spec["sources"][0]["Redis"]["chain"] = json!([
        {"RedisSinkSingle": {"remoteAddress": "no-port"}},
    ]);
    spec["dbSide"] = json!({"replicas": 2});
    let previous = json!({
        "observedGeneration": 3, "configHash": "0123456789abcdef",
        "configMap": "cache-shotover-config", "replicas": 2, "readyReplicas": 2,
        "conditions": [],
    });
    let task = spawn(topology(spec, json!({}), Some(previous)), ctx);

    // It reads the running StatefulSet for the replica counts, and applies nothing.
    api.expect(
        "GET",
        "/apis/apps/v1/namespaces/apps/statefulsets/cache-shotover",
        200,
        Some(json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "cache-shotover", "namespace": NS, "generation": 1},
            "spec": {"selector": {}, "template": {}, "serviceName": "x"},
            "status": {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2,
                       "updatedReplicas": 2, "currentRevision": "a", "updateRevision": "a"},
        })),
    )
    .await;
    let status = expect_status_write(&mut api).await.body["status"].clone();
    let config_valid = condition(&status, "ConfigValid");
    assert_eq!(config_valid["status"], "False");
    assert_eq!(config_valid["reason"], "InvalidTopology");
    let message = config_valid["message"].as_str().expect("message");
    assert!(
        message.starts_with("invalid topology (1 error):\n  spec.sources[0].chain[0]"),
        "{message}"
    );
    assert_eq!(
        status["configHash"], "0123456789abcdef",
        "the last good hash stays"
    );
    assert_eq!(status["readyReplicas"], 2);
    assert_eq!(status["observedGeneration"], 4);
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");

    let warnings = expect_events(&mut api, 3)
        .await
        .iter()
        .filter(|e| e["type"] == "Warning")
        .count();
    assert_eq!(
        warnings, 2,
        "ConfigValid=False and Degraded=True are warnings"
    );
    finish(task)
        .await
        .expect("an invalid topology is not a reconcile error");
    api.expect_nothing_more().await;
}

#[tokio::test]
async fn a_paused_topology_only_says_so() {
    let (ctx, mut api) = ApiServer::context();
    let task = spawn(
        topology(redis_spec(), json!({"shotover.io/paused": "true"}), None),
        ctx,
    );
    let status = expect_status_write(&mut api).await.body["status"].clone();
    let paused = condition(&status, "ReconciliationPaused");
    assert_eq!(paused["status"], "True");
    assert_eq!(paused["reason"], "PausedByAnnotation");
    assert_eq!(paused["observedGeneration"], 4);
    assert!(status.get("observedGeneration").is_none(), "{status}");
    assert_eq!(api.expect_event(NS).await["reason"], "PausedByAnnotation");
    assert_eq!(finish(task).await.expect("ok"), Action::await_change());
    api.expect_nothing_more().await;
}

#[tokio::test]
async fn db_side_applies_the_tier_and_reads_its_progress() {
    let (ctx, mut api) = ApiServer::context();
    let mut spec = redis_spec();
    spec["dbSide"] = json!({"replicas": 3});
    let task = spawn(topology(spec, json!({}), None), ctx);

    expect_config_map(&mut api).await;
    api.expect_apply(
        "/api/v1/namespaces/apps/services/cache-shotover-headless",
        200,
        None,
    )
    .await;
    api.expect_apply("/api/v1/namespaces/apps/services/cache-shotover", 200, None)
        .await;
    let applied_sts = api
        .expect_apply(
            "/apis/apps/v1/namespaces/apps/statefulsets/cache-shotover",
            200,
            None,
        )
        .await
        .body;
    assert_eq!(applied_sts["spec"]["replicas"], 3);
    api.expect_apply(
        "/apis/policy/v1/namespaces/apps/poddisruptionbudgets/cache-shotover",
        200,
        None,
    )
    .await;
    let status = expect_status_write(&mut api).await.body["status"].clone();
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert_eq!(condition(&status, "Progressing")["status"], "True");
    expect_events(&mut api, 3).await;
    finish(task).await.expect("reconciled");
    api.expect_nothing_more().await;
}

#[tokio::test]
async fn a_failed_apply_is_reported_and_retried_with_growing_backoff() {
    let (ctx, mut api) = ApiServer::context();
    let object = topology(redis_spec(), json!({}), None);
    let task = spawn(object.clone(), ctx.clone());
    api.expect_apply(
        "/api/v1/namespaces/apps/configmaps/cache-shotover-config",
        403,
        Some(json!("configmaps is forbidden")),
    )
    .await;
    let status = expect_status_write(&mut api).await.body["status"].clone();
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "ApplyFailed");
    assert!(
        degraded["message"].as_str().is_some_and(|m| m
            .contains("applying ConfigMap apps/cache-shotover-config")
            && m.contains("forbidden")),
        "{degraded}"
    );
    assert!(
        status.get("configHash").is_none(),
        "no ConfigMap holds the new hash: {status}"
    );
    assert_eq!(condition(&status, "Progressing")["reason"], "ApplyFailed");
    expect_events(&mut api, 3).await;
    let error = finish(task).await.expect_err("the reconcile fails");
    assert_eq!(error.kind(), "apply");

    let first = error_policy(object.clone(), &error, ctx.clone());
    let second = error_policy(object.clone(), &error, ctx.clone());
    let third = error_policy(object, &error, ctx.clone());
    assert_eq!(first, Action::requeue(Duration::from_secs(1)));
    assert_eq!(second, Action::requeue(Duration::from_secs(2)));
    assert_eq!(third, Action::requeue(Duration::from_secs(4)));
    assert!(
        ctx.metrics
            .render()
            .contains("shotover_operator_reconcile_errors_total{kind=\"apply\"} 3\n")
    );
}

#[test]
fn the_backoff_doubles_up_to_five_minutes() {
    let delays: Vec<u64> = (1..=12).map(|n| backoff(n).as_secs()).collect();
    assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
    assert_eq!(backoff(u32::MAX), Duration::from_secs(300));
}

/// dbSide removed after a reconcile whose status write failed (the status never said there
/// was a tier, and is of an older generation): the tier's objects are still looked for, and
/// what this topology owns is deleted.
#[tokio::test]
async fn a_tier_applied_before_a_failed_status_write_is_deleted_when_db_side_goes() {
    let (ctx, mut api) = ApiServer::context();
    let status = json!({"observedGeneration": 3, "configHash": "old", "conditions": []});
    let task = spawn(topology(redis_spec(), json!({}), Some(status)), ctx);
    expect_config_map(&mut api).await;
    let owned = json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "cache-shotover", "namespace": NS,
            "ownerReferences": [{"apiVersion": "shotover.io/v1alpha1", "kind": "ShotoverTopology",
                "name": "cache", "uid": "uid-1"}]},
    });
    let sts = "/apis/apps/v1/namespaces/apps/statefulsets/cache-shotover";
    api.expect("GET", sts, 200, Some(owned.clone())).await;
    api.expect("DELETE", sts, 200, Some(owned)).await;
    api.expect(
        "GET",
        "/api/v1/namespaces/apps/services/cache-shotover",
        404,
        None,
    )
    .await;
    api.expect(
        "GET",
        "/api/v1/namespaces/apps/services/cache-shotover-headless",
        404,
        None,
    )
    .await;
    api.expect(
        "GET",
        "/apis/policy/v1/namespaces/apps/poddisruptionbudgets/cache-shotover",
        404,
        None,
    )
    .await;
    expect_status_write(&mut api).await;
    expect_events(&mut api, 2).await;
    finish(task).await.expect("reconciled");
    api.expect_nothing_more().await;
}

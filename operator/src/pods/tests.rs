use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

use super::pod_problem;

/// Long after every condition's last transition.
fn pod_problem_now(pod: &Pod) -> Option<String> {
    pod_problem(pod, 4_000_000_000)
}

fn pod(status: serde_json::Value) -> Pod {
    serde_json::from_value(json!({"metadata": {"name": "db-shotover-0"}, "status": status}))
        .expect("pod")
}

#[test]
fn a_running_or_starting_proxy_has_no_problem() {
    assert_eq!(
        pod_problem_now(&pod(json!({"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
        "containerStatuses": [{"name": "shotover", "image": "i", "imageID": "", "ready": true,
            "restartCount": 0, "state": {"running": {}}}]}))),
        None
    );
    assert_eq!(
        pod_problem_now(&pod(json!({"phase": "Pending", "conditions": [
        {"type": "Ready", "status": "False", "reason": "ContainersNotReady"}],
        "containerStatuses": [{"name": "shotover", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ContainerCreating"}}}]}))),
        None
    );
}

#[test]
fn an_image_that_cannot_be_pulled_is_named_with_the_kubelets_message() {
    let problem = pod_problem_now(&pod(json!({"phase": "Pending",
        "containerStatuses": [{"name": "shotover", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ErrImageNeverPull",
            "message": "Container image \"example/shotover:9\" is not present with pull policy of Never"}}}]})));
    assert_eq!(
        problem.as_deref(),
        Some(
            "container shotover ErrImageNeverPull: Container image \"example/shotover:9\" is not present with pull policy of Never"
        )
    );
}

#[test]
fn a_crash_loop_shows_the_last_exit_and_the_end_of_its_log() {
    let log = format!(
        "{}shotover: topology.yaml: source `redis`: bad",
        "x".repeat(400)
    );
    let problem = pod_problem_now(&pod(json!({"phase": "Running",
        "containerStatuses": [{"name": "shotover", "image": "i", "imageID": "", "ready": false,
            "restartCount": 4, "state": {"waiting": {"reason": "CrashLoopBackOff",
            "message": "back-off 40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": log}}}]})))
    .expect("a problem");
    assert!(
        problem.starts_with("container shotover CrashLoopBackOff: last exit code 1 (Error): ..."),
        "{problem}"
    );
    assert!(problem.ends_with("source `redis`: bad"), "{problem}");
    assert!(!problem.contains("back-off"), "{problem}");
    assert!(problem.len() < 400, "{problem}");
}

#[test]
fn an_unschedulable_proxy_says_why() {
    let problem = pod_problem_now(&pod(json!({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/1 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }."}]})));
    assert_eq!(
        problem.as_deref(),
        Some(
            "not scheduled (Unschedulable): 0/1 nodes are available: 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }."
        )
    );
}

#[test]
fn a_proxy_waits_for_a_node_for_a_while_before_that_is_a_problem() {
    let unscheduled = pod(json!({"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "lastTransitionTime": "2026-12-02T10:00:00Z", "message": "0/1 nodes are available"}]}));
    let at = |s: &str| {
        s.parse::<k8s_openapi::jiff::Timestamp>()
            .expect("time")
            .as_second()
    };
    assert_eq!(pod_problem(&unscheduled, at("2026-12-02T10:00:29Z")), None);
    assert_eq!(
        pod_problem(&unscheduled, at("2026-12-02T10:00:30Z")).as_deref(),
        Some("not scheduled (Unschedulable): 0/1 nodes are available")
    );
}

#[test]
fn a_proxy_is_asked_once_its_container_runs_and_the_strip_keeps_what_that_needs() {
    let sidecar = |state: serde_json::Value, ready: bool, started: bool| {
        pod(json!({"phase": "Running", "podIP": "10.0.0.7",
            "initContainerStatuses": [{"name": "shotover", "image": "i", "imageID": "",
                "ready": ready, "started": started, "restartCount": 0, "state": state}],
            "containerStatuses": [{"name": "app", "image": "i", "imageID": "", "ready": true,
                "restartCount": 0, "state": {"running": {}}}]}))
    };
    let address = Some("10.0.0.7:9001".parse().expect("address"));
    let mut running = sidecar(json!({"running": {}}), false, true);
    super::strip(&mut running);
    let status = running.status.as_ref().expect("status");
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.7"));
    assert_eq!(
        status.container_statuses.as_ref().map(Vec::len),
        Some(0),
        "only the proxy's"
    );
    assert_eq!(super::config_address(&running, 9001), address);
    // Not started (its startup probe has not passed), or not running: not asked yet.
    assert_eq!(
        super::config_address(&sidecar(json!({"running": {}}), false, false), 9001),
        None
    );
    assert_eq!(
        super::config_address(
            &sidecar(
                json!({"waiting": {"reason": "CrashLoopBackOff"}}),
                false,
                false
            ),
            9001
        ),
        None
    );
    let no_ip = pod(json!({"phase": "Pending"}));
    assert_eq!(super::config_address(&no_ip, 9001), None);
}

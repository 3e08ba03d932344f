use serde_json::json;
use shotover_crds::crd::overrides as keys;
use shotover_operator::render::{render, source_ports};

use super::*;

fn topology(extra: Value) -> ShotoverTopology {
    let mut spec = json!({
        "sources": [{"Redis": {
            "name": "redis",
            "listenAddr": "127.0.0.1:6379",
            "chain": [{"RedisSinkSingle": {"remoteAddress": "redis.db:6379"}}]
        }}],
        "image": "ghcr.io/shotover-k8s/shotover:0.1.0",
    });
    if let (Value::Object(spec), Value::Object(extra)) = (&mut spec, extra) {
        spec.extend(extra);
    }
    serde_json::from_value(json!({
        "apiVersion": "shotover.io/v1alpha1",
        "kind": "ShotoverTopology",
        "metadata": {"name": "cache", "namespace": "apps", "uid": "u-1", "resourceVersion": "1"},
        "spec": spec,
    }))
    .expect("a topology")
}

fn rendered(topology: ShotoverTopology) -> RenderedTopology {
    let r = render(&topology).expect("valid");
    RenderedTopology {
        sources: source_ports(&topology),
        hash: r.hash,
        topology,
    }
}

fn pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("a pod")
}

fn app_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9f-",
            "namespace": "apps",
            "labels": {"app": "web", "shotover.io/inject": "true"},
            "annotations": {"shotover.io/topology": "cache"},
        },
        "spec": {"containers": [
            {"name": "web", "image": "nginx", "ports": [{"containerPort": 8080}]},
            {"name": "logger", "image": "busybox"},
        ]},
    })
}

fn settings(native: bool) -> Settings {
    Settings {
        own_namespace: "shotover-system".to_owned(),
        native_sidecar_default: native,
        allowed_images: Vec::new(),
    }
}

fn no_ns() -> NamespaceMeta {
    NamespaceMeta::default()
}

/// The Pod with the patch applied, as the apiserver would store it.
fn patched(pod_json: &Value, injection: &Injection) -> Value {
    let mut doc = pod_json.clone();
    let patch: json_patch::Patch =
        serde_json::from_value(Value::Array(injection.patch.clone())).expect("a JSON patch");
    json_patch::patch(&mut doc, &patch).expect("the patch applies");
    doc
}

#[test]
fn only_pods_that_opt_in_are_selected() {
    let ns = no_ns();
    let s = settings(true);
    let mut p = app_pod();
    assert_eq!(
        select(&pod(p.clone()), "apps", &ns, &s),
        Ok(Ok(Selected {
            topology: "cache".to_owned()
        }))
    );
    p["metadata"]["labels"]["shotover.io/inject"] = json!("false");
    assert_eq!(
        select(&pod(p.clone()), "apps", &ns, &s),
        Ok(Err(Skip::NotOptedIn))
    );
    p["metadata"]["labels"]
        .as_object_mut()
        .expect("labels")
        .remove("shotover.io/inject");
    assert_eq!(
        select(&pod(p.clone()), "apps", &ns, &s),
        Ok(Err(Skip::NotOptedIn))
    );

    // The namespace opts in: every Pod in it, unless the Pod opts out.
    let opted = NamespaceMeta {
        labels: BTreeMap::from([(INJECT_LABEL.to_owned(), "true".to_owned())]),
        annotations: BTreeMap::new(),
    };
    assert!(matches!(
        select(&pod(p.clone()), "apps", &opted, &s),
        Ok(Ok(_))
    ));
    p["metadata"]["labels"]["shotover.io/inject"] = json!("false");
    assert_eq!(select(&pod(p), "apps", &opted, &s), Ok(Err(Skip::OptedOut)));
}

#[test]
fn system_namespaces_the_own_namespace_and_host_network_are_never_injected() {
    let s = settings(true);
    for ns in [
        "kube-system",
        "kube-public",
        "kube-node-lease",
        "shotover-system",
    ] {
        assert_eq!(
            select(&pod(app_pod()), ns, &no_ns(), &s),
            Ok(Err(Skip::ExcludedNamespace)),
            "{ns}"
        );
    }
    let mut p = app_pod();
    p["spec"]["hostNetwork"] = json!(true);
    assert_eq!(
        select(&pod(p), "apps", &no_ns(), &s),
        Ok(Err(Skip::HostNetwork))
    );
    assert!(Skip::HostNetwork.asked() && !Skip::NotOptedIn.asked());
}

#[test]
fn an_opted_in_pod_without_a_topology_is_refused_and_the_namespace_can_name_one() {
    let mut p = app_pod();
    p["metadata"]["annotations"] = json!({});
    let refusal = select(&pod(p.clone()), "apps", &no_ns(), &settings(true)).expect_err("refused");
    assert_eq!(refusal.reason, Refuse::NoTopology);
    assert!(
        refusal.message.contains("annotation shotover.io/topology"),
        "{}",
        refusal.message
    );
    let ns = NamespaceMeta {
        labels: BTreeMap::new(),
        annotations: BTreeMap::from([(TOPOLOGY_ANNOTATION.to_owned(), "shared".to_owned())]),
    };
    assert_eq!(
        select(&pod(p), "apps", &ns, &settings(true)),
        Ok(Ok(Selected {
            topology: "shared".to_owned()
        }))
    );
}

#[test]
fn the_native_sidecar_is_the_first_init_container_and_injection_is_idempotent() {
    let r = rendered(topology(json!({})));
    let mut p = app_pod();
    p["spec"]["initContainers"] = json!([{"name": "migrate", "image": "migrate"}]);
    let injection = inject(&pod(p.clone()), &no_ns(), &r, &settings(true)).expect("injected");
    assert!(injection.native_sidecar);
    let out = patched(&p, &injection);

    let init = out["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    assert_eq!(init.len(), 2);
    assert_eq!(init[0]["name"], "shotover");
    assert_eq!(init[1]["name"], "migrate");
    let sidecar = &init[0];
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["port"], 9001);
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/live");
    let sc = &sidecar["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        sidecar["ports"],
        json!([
            {"containerPort": 6379, "protocol": "TCP"},
            {"containerPort": 9001, "protocol": "TCP"}
        ])
    );
    assert_eq!(
        sidecar["volumeMounts"],
        json!([{"name": "shotover-config", "mountPath": "/etc/shotover", "readOnly": true}])
    );
    assert_eq!(
        out["spec"]["volumes"],
        json!([{"name": "shotover-config", "configMap": {"name": "cache-shotover-config"}}])
    );
    // The application containers are untouched.
    assert_eq!(out["spec"]["containers"], p["spec"]["containers"]);

    let annotations = &out["metadata"]["annotations"];
    assert_eq!(annotations[CONFIG_HASH_ANNOTATION], json!(r.hash));
    assert_eq!(annotations[DEFAULT_CONTAINER_ANNOTATION], "web");
    let status: InjectionStatus =
        serde_json::from_str(annotations[STATUS_ANNOTATION].as_str().expect("status"))
            .expect("status JSON");
    assert_eq!(
        status,
        InjectionStatus {
            topology: "cache".to_owned(),
            config_hash: r.hash.clone(),
            observability_port: 9001,
            native_sidecar: true,
            containers: vec!["shotover".to_owned()],
            volumes: vec!["shotover-config".to_owned()],
        }
    );
    assert_eq!(out["metadata"]["labels"][SIDECAR_LABEL], "cache");
    assert_eq!(out["metadata"]["labels"]["app"], "web");

    // Reinvocation, or the same Pod submitted again: nothing more.
    assert_eq!(
        select(&pod(out), "apps", &no_ns(), &settings(true)),
        Ok(Err(Skip::AlreadyInjected))
    );
}

#[test]
fn without_native_sidecars_the_proxy_is_the_first_container_and_holds_the_app() {
    let r = rendered(topology(json!({})));
    let p = app_pod();
    let injection = inject(&pod(p.clone()), &no_ns(), &r, &settings(false)).expect("injected");
    assert!(!injection.native_sidecar);
    let out = patched(&p, &injection);
    let containers = out["spec"]["containers"].as_array().expect("containers");
    let names: Vec<&str> = containers
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(names, ["shotover", "web", "logger"]);
    assert_eq!(
        containers[0]["lifecycle"]["postStart"]["exec"]["command"],
        json!(["shotover", "--await-ready", "127.0.0.1:9001"])
    );
    assert!(containers[0].get("restartPolicy").is_none());
    assert!(out["spec"].get("initContainers").is_none());
    // The default container stays the application's.
    assert_eq!(
        out["metadata"]["annotations"][DEFAULT_CONTAINER_ANNOTATION],
        "web"
    );
}

#[test]
fn the_pod_then_the_topology_then_the_cluster_decide_native_sidecars() {
    let p = app_pod();
    let never = rendered(topology(json!({"sidecar": {"nativeSidecar": false}})));
    let i = inject(&pod(p.clone()), &no_ns(), &never, &settings(true)).expect("injected");
    assert!(!i.native_sidecar, "the topology says no");
    let mut forced = p.clone();
    forced["metadata"]["annotations"][keys::NATIVE_SIDECAR] = json!("true");
    let i = inject(&pod(forced), &no_ns(), &never, &settings(false)).expect("injected");
    assert!(i.native_sidecar, "the Pod says yes");
}

/// A topology that sets no resources gets default requests (10m CPU, 32Mi), no limits; a
/// memory limit given by annotation alone drops the default memory request (Kubernetes then
/// requests the limit), so a limit below 32Mi still makes a valid Pod.
#[test]
fn a_topology_without_resources_gets_default_requests_that_a_lower_limit_replaces() {
    let r = rendered(topology(json!({})));
    let p = app_pod();
    let out = patched(
        &p,
        &inject(&pod(p.clone()), &no_ns(), &r, &settings(true)).expect("injected"),
    );
    assert_eq!(
        out["spec"]["initContainers"][0]["resources"],
        json!({"requests": {"cpu": "10m", "memory": "32Mi"}})
    );
    let mut p = app_pod();
    p["metadata"]["annotations"][keys::MEMORY_LIMIT] = json!("16Mi");
    let out = patched(
        &p,
        &inject(&pod(p.clone()), &no_ns(), &r, &settings(true)).expect("injected"),
    );
    assert_eq!(
        out["spec"]["initContainers"][0]["resources"],
        json!({"requests": {"cpu": "10m"}, "limits": {"memory": "16Mi"}})
    );
}

#[test]
fn overrides_set_image_resources_and_log_level() {
    let r = rendered(topology(json!({
        "resources": {"requests": {"cpu": "50m"}},
        "sidecar": {"resources": {"requests": {"cpu": "100m", "memory": "32Mi"}}},
    })));
    let mut p = app_pod();
    p["metadata"]["annotations"][keys::IMAGE] = json!("registry.local/shotover:dev");
    p["metadata"]["annotations"][keys::MEMORY_LIMIT] = json!("64Mi");
    p["metadata"]["annotations"][keys::LOG_LEVEL] = json!("info,shotover=debug");
    p["metadata"]["annotations"]["shotover.io/proxy-cpu"] = json!("1");
    let injection = inject(&pod(p.clone()), &no_ns(), &r, &settings(true)).expect("injected");
    let out = patched(&p, &injection);
    let sidecar = &out["spec"]["initContainers"][0];
    assert_eq!(sidecar["image"], "registry.local/shotover:dev");
    assert_eq!(
        sidecar["resources"],
        json!({"requests": {"cpu": "100m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}})
    );
    let args: Vec<&str> = sidecar["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        args,
        [
            "--topology-file",
            "/etc/shotover/topology.yaml",
            "--config-file",
            "/etc/shotover/config.yaml",
            "--shutdown-delay-seconds",
            "5",
            "--shutdown-grace-seconds",
            "20",
            "--log-level",
            "info,shotover=debug"
        ]
    );
    assert_eq!(injection.warnings.len(), 1, "{:?}", injection.warnings);
    assert!(injection.warnings[0].contains("shotover.io/proxy-cpu"));
}

#[test]
fn the_image_allow_list_limits_what_the_override_may_name() {
    let allowed = vec![
        "registry.local/shotover".to_owned(),
        "registry.local:5000/platform/".to_owned(),
    ];
    for image in [
        "registry.local/shotover",
        "registry.local/shotover:dev",
        "registry.local/shotover@sha256:abcd",
        "registry.local/shotover:1@sha256:abcd",
        "registry.local:5000/platform/shotover:2",
        "registry.local:5000/platform/team/proxy",
    ] {
        assert!(super::image_allowed(image, &allowed), "{image}");
    }
    for image in [
        "registry.local/shotover-evil:1",
        "registry.local/other",
        "evil.example/registry.local/shotover",
        "registry.local:5000/platformer/x",
        "registry.local:5000/other/shotover",
    ] {
        assert!(!super::image_allowed(image, &allowed), "{image}");
    }
    assert!(
        super::image_allowed("anything:1", &[]),
        "no list: any image"
    );

    let r = rendered(topology(json!({})));
    let mut p = app_pod();
    p["metadata"]["annotations"][keys::IMAGE] = json!("evil.example/shotover:1");
    let with_list = Settings {
        allowed_images: allowed,
        ..settings(true)
    };
    let refusal = inject(&pod(p.clone()), &no_ns(), &r, &with_list).expect_err("refused");
    assert_eq!(refusal.reason, Refuse::InvalidOverride);
    assert_eq!(
        refusal.message,
        "invalid shotover sidecar overrides: annotation shotover.io/proxy-image: `evil.example/shotover:1` is not in the webhook's image allow-list (registry.local/shotover, registry.local:5000/platform/)"
    );
    // The topology's own image is the platform team's choice, not the Pod's: not checked.
    let mut p = app_pod();
    p["metadata"]["annotations"][keys::IMAGE] = json!("registry.local/shotover:2");
    inject(&pod(p), &no_ns(), &r, &with_list).expect("an allowed override");
}

#[test]
fn bad_overrides_and_collisions_refuse_the_pod_saying_why() {
    let r = rendered(topology(json!({})));
    let mut p = app_pod();
    p["metadata"]["annotations"][keys::CPU_LIMIT] = json!("fast");
    let refusal = inject(&pod(p), &no_ns(), &r, &settings(true)).expect_err("refused");
    assert_eq!(refusal.reason, Refuse::InvalidOverride);
    assert!(
        refusal
            .message
            .contains("shotover.io/proxy-cpu-limit: `fast`"),
        "{}",
        refusal.message
    );

    let mut p = app_pod();
    p["spec"]["containers"][0]["ports"] = json!([{"containerPort": 6379}]);
    let refusal = inject(&pod(p), &no_ns(), &r, &settings(true)).expect_err("refused");
    assert_eq!(refusal.reason, Refuse::Conflict);
    assert!(
        refusal.message.contains(
            "port 6379 (source `redis` of ShotoverTopology cache) is also a port of container web"
        ),
        "{}",
        refusal.message
    );

    let mut p = app_pod();
    p["spec"]["volumes"] = json!([{"name": "shotover-config", "emptyDir": {}}]);
    let refusal = inject(&pod(p), &no_ns(), &r, &settings(true)).expect_err("refused");
    assert_eq!(refusal.reason, Refuse::Conflict);
}

#[test]
fn a_pod_with_no_annotations_labels_or_volumes_gets_them_created() {
    let r = rendered(topology(json!({})));
    // The namespace opts in and names the topology; the Pod has no metadata maps at all.
    let ns = NamespaceMeta {
        labels: BTreeMap::from([(INJECT_LABEL.to_owned(), "true".to_owned())]),
        annotations: BTreeMap::from([(TOPOLOGY_ANNOTATION.to_owned(), "cache".to_owned())]),
    };
    let p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "bare", "namespace": "apps"},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    });
    assert!(matches!(
        select(&pod(p.clone()), "apps", &ns, &settings(true)),
        Ok(Ok(_))
    ));
    let injection = inject(&pod(p.clone()), &ns, &r, &settings(true)).expect("injected");
    let out = patched(&p, &injection);
    assert_eq!(out["metadata"]["labels"][SIDECAR_LABEL], "cache");
    assert!(out["metadata"]["annotations"][STATUS_ANNOTATION].is_string());
    assert_eq!(out["spec"]["initContainers"][0]["name"], "shotover");
    assert_eq!(out["spec"]["volumes"][0]["name"], "shotover-config");
}

/// The whole patch for a typical Pod, compared with `webhook/tests/golden/native.json`
/// (regenerate with `UPDATE_GOLDEN=1 cargo test -p shotover-webhook`).
#[test]
fn the_patch_matches_the_golden_file() {
    let r = rendered(topology(json!({})));
    let injection = inject(&pod(app_pod()), &no_ns(), &r, &settings(true)).expect("injected");
    let actual = serde_json::to_string_pretty(&injection.patch).expect("json") + "\n";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/native.json");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &actual).expect("write");
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(
        actual, expected,
        "the patch changed: review, then UPDATE_GOLDEN=1"
    );
}

#[test]
fn tls_secrets_are_mounted_in_the_sidecar_and_their_volume_names_checked() {
    let r = rendered(topology(json!({
        "tlsSecrets": [{"secretName": "redis-tls"}],
        "sources": [{"Redis": {
            "name": "redis",
            "listenAddr": "127.0.0.1:6379",
            "chain": [{"RedisSinkSingle": {"remoteAddress": "redis.db:6379",
                "tls": {"certificateAuthorityPath": "/etc/shotover-tls/redis-tls/ca.crt"}}}]
        }}],
    })));
    let p = app_pod();
    let injection = inject(&pod(p.clone()), &no_ns(), &r, &settings(true)).expect("injected");
    let out = patched(&p, &injection);
    let volumes: Vec<&Value> = out["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .collect();
    assert!(
        volumes
            .iter()
            .any(|v| v["name"] == "shotover-tls-0" && v["secret"]["secretName"] == "redis-tls"),
        "{volumes:?}"
    );
    let mounts = &out["spec"]["initContainers"][0]["volumeMounts"];
    assert!(
        mounts
            .as_array()
            .expect("mounts")
            .iter()
            .any(|m| m["name"] == "shotover-tls-0"
                && m["mountPath"] == "/etc/shotover-tls/redis-tls"
                && m["readOnly"] == true),
        "{mounts}"
    );
    let status: InjectionStatus = serde_json::from_str(
        out["metadata"]["annotations"][STATUS_ANNOTATION]
            .as_str()
            .expect("status"),
    )
    .expect("status JSON");
    assert_eq!(status.volumes, ["shotover-config", "shotover-tls-0"]);

    let mut taken = app_pod();
    taken["spec"]["volumes"] = json!([{"name": "shotover-tls-0", "emptyDir": {}}]);
    let refusal = inject(&pod(taken), &no_ns(), &r, &settings(true)).expect_err("refused");
    assert_eq!(refusal.reason, Refuse::Conflict);
    assert_eq!(
        refusal.message,
        "the Pod already has a volume named shotover-tls-0, which the shotover sidecar needs"
    );
}

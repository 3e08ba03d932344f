use super::*;
use shotover_crds::crd::ShotoverTopology;

fn topology(spec_yaml: &str) -> ShotoverTopology {
    let yaml = format!(
        "apiVersion: shotover.io/v1alpha1\nkind: ShotoverTopology\nmetadata: {{name: cache, namespace: apps, uid: 1234-abcd, generation: 3}}\nspec:\n{spec_yaml}"
    );
    let value: serde_json::Value = serde_yaml::from_str(&yaml).expect("test YAML");
    serde_json::from_value(value).expect("test topology parses")
}

const REDIS: &str = r#"
  sources:
    - Redis:
        name: redis
        listenAddr: 0.0.0.0:6379
        chain:
          - QueryCounter: {counterName: cache}
          - RedisSinkSingle: {remoteAddress: "redis:6379"}
"#;

fn db_side(extra: &str) -> ShotoverTopology {
    topology(&format!("{REDIS}  dbSide:\n    replicas: 3\n{extra}"))
}

#[test]
fn the_config_map_holds_both_files_and_their_hash() {
    let rendered = render(&topology(REDIS)).expect("valid");
    let cm = &rendered.config_map;
    assert_eq!(cm.metadata.name.as_deref(), Some("cache-shotover-config"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("apps"));
    let data = cm.data.as_ref().expect("data");
    let topology_yaml = &data[TOPOLOGY_FILE];
    let config_yaml = &data[CONFIG_FILE];
    // The proxy's own loader accepts the rendered files.
    shotover_crds::load_topology(topology_yaml).expect("the proxy loads topology.yaml");
    let config = ProxyConfig::from_yaml(config_yaml).expect("the proxy loads config.yaml");
    assert_eq!(config.main_log_level, "info");
    assert_eq!(
        config.observability_interface.as_deref(),
        Some("0.0.0.0:9001")
    );
    assert!(topology_yaml.contains("- Redis:"), "{topology_yaml}");
    assert_eq!(rendered.hash, config_hash(topology_yaml, config_yaml));
    assert_eq!(rendered.hash.len(), 16);
    let annotations = cm.metadata.annotations.as_ref().expect("annotations");
    assert_eq!(annotations[CONFIG_HASH_ANNOTATION], rendered.hash);
    assert!(rendered.db_side.is_none());
}

#[test]
fn everything_rendered_is_owned_by_the_topology() {
    let rendered = render(&db_side("")).expect("valid");
    let objects = rendered.db_side.as_ref().expect("dbSide");
    let owners = [
        &rendered.config_map.metadata,
        &objects.stateful_set.metadata,
        &objects.headless_service.metadata,
        &objects.client_service.metadata,
        &objects
            .pod_disruption_budget
            .as_ref()
            .expect("pdb")
            .metadata,
    ];
    for meta in owners {
        let owner = &meta.owner_references.as_ref().expect("owner")[0];
        assert_eq!(owner.kind, "ShotoverTopology");
        assert_eq!(owner.name, "cache");
        assert_eq!(owner.uid, "1234-abcd");
        assert_eq!(owner.controller, Some(true));
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["app.kubernetes.io/managed-by"], FIELD_MANAGER);
        assert_eq!(labels[TOPOLOGY_LABEL], "cache");
    }
}

#[test]
fn the_hash_follows_the_chain_and_nothing_else() {
    let base = render(&db_side("")).expect("valid");
    let same = render(&db_side("")).expect("valid");
    assert_eq!(base.hash, same.hash, "rendering is deterministic");

    // Replicas and Service settings do not change the configuration.
    let scaled = render(&topology(&format!(
        "{REDIS}  dbSide:\n    replicas: 5\n    service: {{type: NodePort}}\n"
    )))
    .expect("valid");
    assert_eq!(base.hash, scaled.hash);
    let template = |r: &Rendered| {
        r.db_side
            .as_ref()
            .expect("dbSide")
            .stateful_set
            .spec
            .as_ref()
            .expect("spec")
            .template
            .clone()
    };
    let template_hash = |r: &Rendered| {
        template(r)
            .metadata
            .and_then(|m| m.annotations)
            .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
    };
    let args = |r: &Rendered| {
        template(r).spec.expect("pod").containers[0]
            .args
            .clone()
            .unwrap_or_default()
            .join(" ")
    };
    assert_eq!(template(&base), template(&scaled));

    // A different chain does, in the ConfigMap; by default not on the pod template (the
    // proxies reload the ConfigMap in place, watching their files).
    let other = REDIS.replace("counterName: cache", "counterName: other");
    let changed = render(&topology(&other)).expect("valid");
    let changed_db = render(&topology(&format!(
        "{other}  dbSide:
    replicas: 3
"
    )))
    .expect("valid");
    assert_ne!(base.hash, changed.hash);
    assert_eq!(changed.hash, changed_db.hash);
    assert_eq!(template(&base), template(&changed_db));
    assert_eq!(template_hash(&base), None);
    assert!(
        !args(&base).contains("--watch-interval-ms"),
        "{}",
        args(&base)
    );

    // With `configUpdate: RollingRestart` the hash is on the template (every change rolls)
    // and the proxies do not watch their files.
    let restart = |yaml: &str| {
        render(&topology(&format!(
            "{yaml}  dbSide:\n    replicas: 3\n    configUpdate: RollingRestart\n"
        )))
        .expect("valid")
    };
    let (restart_base, restart_changed) = (restart(REDIS), restart(&other));
    assert_eq!(
        template_hash(&restart_base),
        Some(restart_base.hash.clone())
    );
    assert_eq!(template_hash(&restart_changed), Some(changed.hash.clone()));
    assert!(
        args(&restart_base).contains("--watch-interval-ms 0"),
        "{}",
        args(&restart_base)
    );

    // So does the log level (it is in config.yaml).
    let debug = render(&topology(&format!("{REDIS}  logLevel: debug\n"))).expect("valid");
    assert_ne!(render(&topology(REDIS)).expect("valid").hash, debug.hash);
}

#[test]
fn the_stateful_set_runs_the_proxy_on_the_config_map() {
    let rendered = render(&db_side("")).expect("valid");
    let objects = rendered.db_side.expect("dbSide");
    let sts = objects.stateful_set;
    assert_eq!(sts.metadata.name.as_deref(), Some("cache-shotover"));
    let spec = sts.spec.expect("spec");
    assert_eq!(spec.replicas, Some(3));
    assert_eq!(
        spec.service_name.as_deref(),
        Some("cache-shotover-headless")
    );
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    let pod = spec.template.spec.expect("pod spec");
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(shotover_crds::crd::DEFAULT_IMAGE)
    );
    // No resources in the spec: the default requests, no limits.
    assert_eq!(
        container.resources,
        Some(shotover_crds::crd::default_proxy_resources())
    );
    assert_eq!(
        container.args.as_deref(),
        Some(
            &[
                "--topology-file".to_owned(),
                "/etc/shotover/topology.yaml".to_owned(),
                "--config-file".to_owned(),
                "/etc/shotover/config.yaml".to_owned(),
                "--shutdown-delay-seconds".to_owned(),
                "5".to_owned(),
                "--shutdown-grace-seconds".to_owned(),
                "20".to_owned(),
            ][..]
        )
    );
    let ports: Vec<(String, i32)> = container
        .ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone().unwrap_or_default(), p.container_port))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("redis".to_owned(), 6379),
            ("observability".to_owned(), 9001)
        ]
    );
    let readiness = container.readiness_probe.as_ref().expect("readiness");
    assert_eq!(
        readiness.http_get.as_ref().and_then(|h| h.path.as_deref()),
        Some("/ready")
    );
    let liveness = container.liveness_probe.as_ref().expect("liveness");
    assert_eq!(
        liveness.http_get.as_ref().and_then(|h| h.path.as_deref()),
        Some("/live")
    );
    let volume = &pod.volumes.as_ref().expect("volumes")[0];
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("cache-shotover-config")
    );
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(
        security.capabilities.as_ref().and_then(|c| c.drop.clone()),
        Some(vec!["ALL".to_owned()])
    );
    // The selector is a subset of the pod labels.
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .expect("labels");
    for (k, v) in spec.selector.match_labels.expect("selector") {
        assert_eq!(labels.get(&k), Some(&v), "{k}");
    }
}

#[test]
fn services_and_budget_follow_the_db_side_settings() {
    let rendered = render(&db_side(
        "    service:\n      type: LoadBalancer\n      ports: [{source: redis, port: 16379}]\n      annotations: {lb: internal}\n    podDisruptionBudget: {maxUnavailable: 2}\n",
    ))
    .expect("valid");
    let objects = rendered.db_side.expect("dbSide");
    let headless = objects.headless_service.spec.expect("spec");
    assert_eq!(headless.cluster_ip.as_deref(), Some("None"));
    assert_eq!(headless.publish_not_ready_addresses, Some(true));
    assert_eq!(headless.ports.as_ref().expect("ports")[0].port, 6379);
    let client = objects.client_service;
    assert_eq!(
        client.metadata.annotations.as_ref().expect("annotations")["lb"],
        "internal"
    );
    let client = client.spec.expect("spec");
    assert_eq!(client.type_.as_deref(), Some("LoadBalancer"));
    let port = &client.ports.as_ref().expect("ports")[0];
    assert_eq!(port.port, 16379);
    assert_eq!(
        port.target_port,
        Some(IntOrString::String("redis".to_owned()))
    );
    let pdb = objects
        .pod_disruption_budget
        .expect("pdb")
        .spec
        .expect("spec");
    assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(2)));

    let without = render(&db_side("    podDisruptionBudget: {enabled: false}\n")).expect("valid");
    assert!(
        without
            .db_side
            .expect("dbSide")
            .pod_disruption_budget
            .is_none()
    );
}

#[test]
fn a_source_name_that_is_not_a_port_name_gets_a_numbered_one() {
    let rendered = render(&topology(
        r#"
  sources:
    - Redis:
        name: Redis_Main_Listener
        listenAddr: 0.0.0.0:6379
        chain: [{RedisSinkSingle: {remoteAddress: "redis:6379"}}]
  dbSide: {}
"#,
    ))
    .expect("valid");
    let sts = rendered.db_side.expect("dbSide").stateful_set;
    let ports = &sts
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod")
        .containers[0]
        .ports;
    assert_eq!(
        ports.as_ref().expect("ports")[0].name.as_deref(),
        Some("source-0")
    );
}

#[test]
fn every_problem_is_reported_at_once_with_its_spec_path() {
    let invalid = render(&topology(
        r#"
  sources:
    - Redis:
        name: redis
        listenAddr: 127.0.0.1:9001
        chain:
          - RedisSinkSingle: {remoteAddress: "no-port"}
          - QueryCounter: {counterName: late}
  logLevel: "info,=[bad"
  dbSide:
    service:
      ports: [{source: nope, port: 1}]
"#,
    ))
    .expect_err("invalid");
    let message = invalid.to_string();
    for expected in [
        "spec.sources[0].chain[0]",
        "spec.sources[0]: source `redis` listens on 127.0.0.1, which the Service cannot reach: with dbSide, listen on 0.0.0.0",
        "source `redis` listens on port 9001, which is also spec.observabilityPort",
        "spec.dbSide.service.ports[0].source: no source is named `nope` (sources: redis)",
        "spec.logLevel: `info,=[bad` is not a log filter",
    ] {
        assert!(
            message.contains(expected),
            "missing `{expected}` in:\n{message}"
        );
    }
    assert!(message.starts_with("invalid topology ("), "{message}");
}

#[test]
fn a_long_name_is_refused_only_with_db_side() {
    let long = "x".repeat(45);
    let make = |db: bool| {
        let mut t = topology(&format!(
            "{REDIS}{}",
            if db { "  dbSide: {}\n" } else { "" }
        ));
        t.metadata.name = Some(long.clone());
        t
    };
    assert!(render(&make(false)).is_ok());
    let message = render(&make(true)).expect_err("too long").to_string();
    assert!(
        message.contains("metadata.name: with dbSide the name may have at most 43 characters"),
        "{message}"
    );
}

#[test]
fn the_policy_limits_service_types_and_annotations() {
    let spec = format!(
        "{REDIS}  dbSide:\n    service:\n      type: LoadBalancer\n      annotations:\n        service.beta.kubernetes.io/aws-load-balancer-internal: \"true\"\n        example.com/cost-center: db\n"
    );
    let load_balancer = topology(&spec);
    render(&load_balancer).expect("the default policy allows anything");
    let policy = super::Policy {
        service_types: vec![ServiceType::ClusterIP, ServiceType::NodePort],
        service_annotations: vec!["service.beta.kubernetes.io/*".to_owned()],
    };
    let errors = super::render_with(&load_balancer, &policy)
        .expect_err("refused")
        .to_string();
    assert!(
        errors.contains(
            "spec.dbSide.service.type: LoadBalancer is not allowed by the operator (--allowed-service-types: ClusterIP, NodePort)"
        ),
        "{errors}"
    );
    assert!(
        errors.contains(
            "spec.dbSide.service.annotations[example.com/cost-center]: annotation `example.com/cost-center` is not allowed by the operator (--allowed-service-annotations: service.beta.kubernetes.io/*)"
        ),
        "{errors}"
    );
    assert!(!errors.contains("aws-load-balancer-internal"), "{errors}");
    let none = super::Policy {
        service_annotations: Vec::new(),
        ..super::Policy::default()
    };
    let errors = super::render_with(&load_balancer, &none)
        .expect_err("refused")
        .to_string();
    assert!(
        errors.contains("(--allowed-service-annotations: none)"),
        "{errors}"
    );
    // A sidecar-only topology has no Service to limit.
    render(&topology(REDIS)).expect("valid");
    super::render_with(&topology(REDIS), &policy).expect("valid");
}

const TLS_REDIS: &str = r#"
  tlsSecrets:
    - secretName: redis-tls
    - secretName: upstream-ca
  sources:
    - Redis:
        name: redis
        listenAddr: 0.0.0.0:6379
        tls:
          certificatePath: /etc/shotover-tls/redis-tls/tls.crt
          privateKeyPath: /etc/shotover-tls/redis-tls/tls.key
        chain:
          - RedisSinkSingle:
              remoteAddress: "redis:6379"
              tls: {certificateAuthorityPath: /etc/shotover-tls/upstream-ca/ca.crt}
"#;

#[test]
fn tls_secrets_are_mounted_and_every_tls_file_must_be_in_one() {
    let rendered = render(&topology(&format!(
        "{TLS_REDIS}  dbSide: {{replicas: 1}}\n"
    )))
    .expect("valid");
    let pod = rendered
        .db_side
        .expect("dbSide")
        .stateful_set
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod");
    let volumes: Vec<(String, Option<String>)> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| {
            (
                v.name.clone(),
                v.secret.as_ref().and_then(|s| s.secret_name.clone()),
            )
        })
        .collect();
    assert_eq!(
        volumes,
        [
            ("shotover-config".to_owned(), None),
            ("shotover-tls-0".to_owned(), Some("redis-tls".to_owned())),
            ("shotover-tls-1".to_owned(), Some("upstream-ca".to_owned())),
        ]
    );
    let mounts: Vec<(String, String, Option<bool>)> = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only))
        .collect();
    assert_eq!(
        mounts,
        [
            (
                "shotover-config".to_owned(),
                "/etc/shotover".to_owned(),
                Some(true)
            ),
            (
                "shotover-tls-0".to_owned(),
                "/etc/shotover-tls/redis-tls".to_owned(),
                Some(true)
            ),
            (
                "shotover-tls-1".to_owned(),
                "/etc/shotover-tls/upstream-ca".to_owned(),
                Some(true)
            ),
        ]
    );

    // A path outside the mounted Secrets, in one not listed, or escaping its folder.
    let bad = TLS_REDIS
        .replace("    - secretName: upstream-ca\n", "")
        .replace("/etc/shotover-tls/redis-tls/tls.key", "/certs/tls.key")
        .replace(
            "/etc/shotover-tls/redis-tls/tls.crt",
            "/etc/shotover-tls/redis-tls/../upstream-ca/tls.crt",
        );
    let errors = render(&topology(&bad)).expect_err("invalid").to_string();
    for wanted in [
        "spec.sources[0].tls.certificatePath: `/etc/shotover-tls/redis-tls/../upstream-ca/tls.crt` is not in a Secret of spec.tlsSecrets",
        "spec.sources[0].tls.privateKeyPath: `/certs/tls.key` is not in a Secret of spec.tlsSecrets: the proxy container has only those, each at /etc/shotover-tls/<secretName>/ (for example /etc/shotover-tls/redis-tls/tls.crt)",
        "spec.sources[0].chain[0].tls.certificateAuthorityPath: `/etc/shotover-tls/upstream-ca/ca.crt` is in Secret `upstream-ca`, which spec.tlsSecrets does not list (listed: redis-tls)",
    ] {
        assert!(errors.contains(wanted), "{wanted}\nnot in\n{errors}");
    }
}

#[test]
fn the_pod_template_overlay_adds_to_the_proxy_pods_and_cannot_replace_the_operators_keys() {
    let rendered = render(&db_side(
        r#"    podTemplate:
      labels: {team: data, app.kubernetes.io/part-of: payments}
      annotations: {example.com/scrape: "true"}
      imagePullSecrets: [{name: registry}]
      nodeSelector: {pool: proxies}
      tolerations: [{key: dedicated, operator: Equal, value: proxies, effect: NoSchedule}]
      priorityClassName: high
      serviceAccountName: shotover-proxy
      topologySpreadConstraints:
        - {maxSkew: 1, topologyKey: topology.kubernetes.io/zone, whenUnsatisfiable: ScheduleAnyway}
"#,
    ))
    .expect("valid");
    let template = rendered
        .db_side
        .expect("dbSide")
        .stateful_set
        .spec
        .expect("spec")
        .template;
    let meta = template.metadata.expect("meta");
    let labels = meta.labels.expect("labels");
    assert_eq!(labels["team"], "data");
    assert_eq!(labels["app.kubernetes.io/part-of"], "payments");
    assert_eq!(
        labels["app.kubernetes.io/instance"], "cache",
        "still selected"
    );
    assert_eq!(
        meta.annotations.expect("annotations")["example.com/scrape"],
        "true"
    );
    let pod = template.spec.expect("pod");
    assert_eq!(pod.image_pull_secrets.expect("secrets")[0].name, "registry");
    assert_eq!(pod.node_selector.expect("nodeSelector")["pool"], "proxies");
    assert_eq!(pod.tolerations.expect("tolerations").len(), 1);
    assert_eq!(pod.priority_class_name.as_deref(), Some("high"));
    assert_eq!(pod.service_account_name.as_deref(), Some("shotover-proxy"));
    assert_eq!(pod.automount_service_account_token, Some(false), "no token");
    assert_eq!(pod.topology_spread_constraints.expect("spread").len(), 1);

    let errors = render(&db_side(
        "    podTemplate:\n      labels: {app.kubernetes.io/instance: other, shotover.io/inject: \"true\"}\n      annotations: {shotover.io/config-hash: x}\n",
    ))
    .expect_err("invalid")
    .to_string();
    for wanted in [
        "spec.dbSide.podTemplate.labels[app.kubernetes.io/instance]: set by the operator",
        "spec.dbSide.podTemplate.labels[shotover.io/inject]: set by the operator",
        "spec.dbSide.podTemplate.annotations[shotover.io/config-hash]: set by the operator",
    ] {
        assert!(errors.contains(wanted), "{wanted}\nnot in\n{errors}");
    }
}

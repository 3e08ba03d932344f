use super::*;
use crate::load_topology;

const CHECKED_IN: &str = include_str!("../../shotovertopology.yaml");

#[test]
fn the_checked_in_crd_is_generated_from_the_types() {
    let generated = crd_yaml();
    assert!(
        generated == CHECKED_IN,
        "crds/shotovertopology.yaml differs from the types in crds/src/crd.rs; regenerate it with\n  cargo run -p shotover-operator -- crd > crds/shotovertopology.yaml"
    );
}

fn schema_text() -> String {
    serde_json::to_string(&crd()).expect("CRD serializes")
}

#[test]
fn the_schema_is_inlined_without_references() {
    // A structural schema has no `$ref`; recursion (a Tee's chain) is cut by opaque schemas.
    let text = schema_text();
    assert!(!text.contains("$ref"), "{text}");
    assert!(!text.contains("\"definitions\""), "{text}");
    assert!(!text.contains("\"$defs\""), "{text}");
}

#[test]
fn the_schema_carries_the_cel_rules() {
    let text = schema_text();
    for rule in [
        crate::schema::CHAIN_ENDS_IN_SINK_RULE,
        UNIQUE_SOURCE_NAMES_RULE,
        "self >= 0",
    ] {
        let quoted = serde_json::to_string(rule).expect("string");
        assert!(text.contains(&quoted), "missing rule {rule}");
    }
}

#[test]
fn a_minimal_topology_gets_the_documented_defaults() {
    let yaml = r#"
apiVersion: shotover.io/v1alpha1
kind: ShotoverTopology
metadata: {name: cache, namespace: apps}
spec:
  sources:
    - Redis:
        name: redis
        listenAddr: 0.0.0.0:6379
        chain:
          - RedisSinkSingle: {remoteAddress: "redis:6379"}
  dbSide: {}
"#;
    let value: serde_json::Value = serde_yaml::from_str(yaml).expect("YAML");
    let topology: ShotoverTopology = serde_json::from_value(value).expect("parses");
    let spec = &topology.spec;
    assert_eq!(spec.image, DEFAULT_IMAGE);
    assert_eq!(spec.log_level, "info");
    assert_eq!(spec.observability_port, 9001);
    let db_side = spec.db_side.as_ref().expect("dbSide");
    assert_eq!(db_side.replicas, 2);
    assert_eq!(db_side.service.type_, ServiceType::ClusterIP);
    assert!(db_side.pod_disruption_budget.enabled);
    assert_eq!(db_side.pod_disruption_budget.max_unavailable, 1);
    let rendered = spec.topology().to_yaml().expect("serializes");
    load_topology(&rendered).expect("the spec's topology is valid");
}

#[test]
fn the_example_topologies_are_valid_resources() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/kubernetes");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).expect("examples/kubernetes exists") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(doc).expect("YAML");
            if value.get("kind").and_then(|k| k.as_str()) != Some("ShotoverTopology") {
                continue;
            }
            let topology: ShotoverTopology =
                serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let rendered = topology.spec.topology().to_yaml().expect("serializes");
            load_topology(&rendered).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen > 0, "no ShotoverTopology in {dir}");
}

#[test]
fn the_default_image_the_chart_and_cargo_agree_on_the_version() {
    // images/build tags the images with the Cargo version; the chart pulls its appVersion;
    // the CRD defaults spec.image to the proxy's. All three must name the same release.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        DEFAULT_IMAGE,
        format!("ghcr.io/shotover-k8s/shotover:{version}")
    );
    let chart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/shotover/Chart.yaml"
    ))
    .expect("Chart.yaml");
    let chart: serde_json::Value = serde_yaml::from_str(&chart).expect("Chart.yaml is YAML");
    assert_eq!(
        chart["appVersion"], version,
        "charts/shotover/Chart.yaml appVersion"
    );
    assert_eq!(
        chart["version"], version,
        "charts/shotover/Chart.yaml version"
    );
    let values = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../charts/shotover/values.yaml"
    ))
    .expect("values.yaml");
    let values: serde_json::Value = serde_yaml::from_str(&values).expect("values.yaml is YAML");
    assert_eq!(values["image"]["registry"], "ghcr.io/shotover-k8s");
    assert_eq!(values["image"]["tag"], "", "the tag defaults to appVersion");
}

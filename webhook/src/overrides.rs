//! The per-Pod override annotations (`shotover.io/proxy-*`, `shotover.io/log-level`,
//! `shotover.io/native-sidecar`), parsed and validated. A namespace annotation of the same
//! name is the default for every Pod in it. A bad value refuses the Pod with a message that
//! names the annotation; an unknown `shotover.io/` annotation is a warning.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use shotover_crds::crd::{
    CONFIG_HASH_ANNOTATION, STATUS_ANNOTATION, TOPOLOGY_ANNOTATION, overrides as keys,
};

/// The overrides of one Pod, validated.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub image: Option<String>,
    pub cpu_request: Option<Quantity>,
    pub cpu_limit: Option<Quantity>,
    pub memory_request: Option<Quantity>,
    pub memory_limit: Option<Quantity>,
    pub log_level: Option<String>,
    pub native_sidecar: Option<bool>,
}

/// Where a value came from, for messages.
fn origin(from_pod: bool) -> &'static str {
    if from_pod { "Pod" } else { "namespace" }
}

impl Overrides {
    /// Reads the overrides from the Pod's annotations, falling back to the namespace's.
    /// Returns every problem at once.
    pub fn parse(
        pod: &BTreeMap<String, String>,
        namespace: &BTreeMap<String, String>,
    ) -> Result<Overrides, Vec<String>> {
        let mut errors = Vec::new();
        let get = |key: &str| -> Option<(&str, bool)> {
            pod.get(key)
                .map(|v| (v.as_str(), true))
                .or_else(|| namespace.get(key).map(|v| (v.as_str(), false)))
        };
        let mut out = Overrides::default();
        if let Some((image, from_pod)) = get(keys::IMAGE) {
            if image.is_empty() || image.len() > 512 || image.chars().any(char::is_whitespace) {
                errors.push(format!(
                    "{} annotation {}: `{image}` is not an image reference",
                    origin(from_pod),
                    keys::IMAGE
                ));
            } else {
                out.image = Some(image.to_owned());
            }
        }
        let mut quantity = |key: &str, slot: &mut Option<Quantity>| {
            if let Some((value, from_pod)) = get(key) {
                match parse_quantity(value) {
                    Some(_) => *slot = Some(Quantity(value.to_owned())),
                    None => errors.push(format!(
                        "{} annotation {key}: `{value}` is not a non-negative quantity such as `100m`, `0.5` or `64Mi`",
                        origin(from_pod)
                    )),
                }
            }
        };
        quantity(keys::CPU_REQUEST, &mut out.cpu_request);
        quantity(keys::CPU_LIMIT, &mut out.cpu_limit);
        quantity(keys::MEMORY_REQUEST, &mut out.memory_request);
        quantity(keys::MEMORY_LIMIT, &mut out.memory_limit);
        if let Some((level, from_pod)) = get(keys::LOG_LEVEL) {
            match tracing_subscriber::EnvFilter::builder().parse(level) {
                Ok(_) if !level.trim().is_empty() => out.log_level = Some(level.to_owned()),
                Ok(_) => errors.push(format!(
                    "{} annotation {}: empty log filter",
                    origin(from_pod),
                    keys::LOG_LEVEL
                )),
                Err(e) => errors.push(format!(
                    "{} annotation {}: `{level}` is not a log filter: {e}",
                    origin(from_pod),
                    keys::LOG_LEVEL
                )),
            }
        }
        if let Some((native, from_pod)) = get(keys::NATIVE_SIDECAR) {
            match native {
                "true" => out.native_sidecar = Some(true),
                "false" => out.native_sidecar = Some(false),
                other => errors.push(format!(
                    "{} annotation {}: `{other}` is neither `true` nor `false`",
                    origin(from_pod),
                    keys::NATIVE_SIDECAR
                )),
            }
        }
        for (request, limit, what) in [
            (&out.cpu_request, &out.cpu_limit, "cpu"),
            (&out.memory_request, &out.memory_limit, "memory"),
        ] {
            if let (Some(request), Some(limit)) = (request, limit) {
                let (r, l) = (parse_quantity(&request.0), parse_quantity(&limit.0));
                if let (Some(r), Some(l)) = (r, l)
                    && r > l
                {
                    errors.push(format!(
                        "the {what} request {} is above the {what} limit {}",
                        request.0, limit.0
                    ));
                }
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }

    /// `base` (the topology's sidecar resources) with the overridden quantities replaced.
    pub fn resources(&self, base: Option<ResourceRequirements>) -> Option<ResourceRequirements> {
        let set = [
            (&self.cpu_request, "cpu", false),
            (&self.cpu_limit, "cpu", true),
            (&self.memory_request, "memory", false),
            (&self.memory_limit, "memory", true),
        ];
        if set.iter().all(|(q, _, _)| q.is_none()) {
            return base;
        }
        let mut resources = base.unwrap_or_default();
        for (quantity, name, limit) in set {
            if let Some(q) = quantity {
                let map = if limit {
                    resources.limits.get_or_insert_with(BTreeMap::new)
                } else {
                    resources.requests.get_or_insert_with(BTreeMap::new)
                };
                map.insert(name.to_owned(), q.clone());
            }
        }
        Some(resources)
    }
}

/// `shotover.io/` annotations on the Pod that mean nothing to us (likely typos).
pub fn unknown_annotations(pod: &BTreeMap<String, String>) -> Vec<String> {
    pod.keys()
        .filter(|k| k.starts_with("shotover.io/"))
        .filter(|k| {
            !keys::ALL.contains(&k.as_str())
                && ![
                    TOPOLOGY_ANNOTATION,
                    STATUS_ANNOTATION,
                    CONFIG_HASH_ANNOTATION,
                ]
                .contains(&k.as_str())
        })
        .map(|k| {
            format!(
                "unknown annotation {k} ignored (known: {}, {})",
                TOPOLOGY_ANNOTATION,
                keys::ALL.join(", ")
            )
        })
        .collect()
}

/// The value of a Kubernetes quantity (`100m`, `1.5`, `64Mi`, `1e3`, `2G`), or `None` when
/// it is not one or is negative.
pub fn parse_quantity(text: &str) -> Option<f64> {
    let text = text.strip_prefix('+').unwrap_or(text);
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number == "." || number.matches('.').count() > 1 {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent => {
            let digits = exponent.strip_prefix(['e', 'E'])?;
            let digits_only = digits.strip_prefix(['+', '-']).unwrap_or(digits);
            if digits_only.is_empty() || !digits_only.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            10f64.powi(digits.parse().ok()?)
        }
    };
    Some(value * multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("1.5"), Some(1.5));
        assert_eq!(parse_quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("2G"), Some(2e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity(".5"), Some(0.5));
        for bad in ["", "-1", "abc", "1.2.3", "10x", "1e", "Mi", "1 Gi", "."] {
            assert_eq!(parse_quantity(bad), None, "{bad}");
        }
    }

    #[test]
    fn pod_annotations_win_over_the_namespace() {
        let pod = map(&[(keys::LOG_LEVEL, "debug"), (keys::NATIVE_SIDECAR, "false")]);
        let ns = map(&[
            (keys::LOG_LEVEL, "warn"),
            (keys::IMAGE, "registry/shotover:2"),
        ]);
        let o = Overrides::parse(&pod, &ns).expect("valid");
        assert_eq!(o.log_level.as_deref(), Some("debug"));
        assert_eq!(o.native_sidecar, Some(false));
        assert_eq!(o.image.as_deref(), Some("registry/shotover:2"));
    }

    #[test]
    fn every_bad_value_is_reported_with_its_annotation() {
        let pod = map(&[
            (keys::IMAGE, "has space"),
            (keys::CPU_REQUEST, "lots"),
            (keys::MEMORY_REQUEST, "2Gi"),
            (keys::MEMORY_LIMIT, "1Gi"),
            (keys::LOG_LEVEL, "info,[["),
            (keys::NATIVE_SIDECAR, "yes"),
        ]);
        let errors = Overrides::parse(&pod, &BTreeMap::new()).expect_err("invalid");
        let text = errors.join("\n");
        for needle in [
            "Pod annotation shotover.io/proxy-image: `has space`",
            "Pod annotation shotover.io/proxy-cpu-request: `lots`",
            "the memory request 2Gi is above the memory limit 1Gi",
            "Pod annotation shotover.io/log-level: `info,[[`",
            "Pod annotation shotover.io/native-sidecar: `yes`",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
        assert_eq!(errors.len(), 5, "{text}");
    }

    #[test]
    fn resource_overrides_replace_single_quantities() {
        let base = ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity("50m".to_owned())),
                ("memory".to_owned(), Quantity("32Mi".to_owned())),
            ])),
            ..ResourceRequirements::default()
        };
        let o = Overrides::parse(
            &map(&[(keys::CPU_REQUEST, "200m"), (keys::MEMORY_LIMIT, "128Mi")]),
            &BTreeMap::new(),
        )
        .expect("valid");
        let r = o.resources(Some(base.clone())).expect("some");
        let requests = r.requests.expect("requests");
        assert_eq!(requests["cpu"].0, "200m");
        assert_eq!(requests["memory"].0, "32Mi");
        assert_eq!(r.limits.expect("limits")["memory"].0, "128Mi");
        assert_eq!(
            Overrides::default().resources(Some(base.clone())),
            Some(base)
        );
        assert_eq!(Overrides::default().resources(None), None);
    }

    #[test]
    fn unknown_shotover_annotations_are_warned_about() {
        let pod = map(&[
            (keys::LOG_LEVEL, "debug"),
            (TOPOLOGY_ANNOTATION, "t"),
            ("shotover.io/proxy-cpu", "1"),
            ("example.com/x", "y"),
        ]);
        let warnings = unknown_annotations(&pod);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("unknown annotation shotover.io/proxy-cpu ignored"));
    }
}

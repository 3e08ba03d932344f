//! Reading `topology.yaml`: upstream Shotover's layout, with every error collected.
//!
//! serde stops at the first error, so the loader walks the YAML tree itself: each source and
//! each chain item is deserialized on its own (with the path of the failing field inside it),
//! sub-chains are walked the same way, and the semantic checks of [`crate::validate`] then run
//! on everything that did parse. The caller gets every problem at once.

use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};

use crate::topology::{ListenerConfig, SourceConfig, Topology};
use crate::transform::TransformConfig;
use crate::validate::{ConfigError, PartialSource, TopologyErrors, validate_partial};

/// Parse and validate a topology: the entry point for the proxy, the operator and the webhook.
pub fn load_topology(yaml: &str) -> Result<Topology, TopologyErrors> {
    let (sources, mut errors) = parse_partial(yaml);
    // No source at all after structural errors means none parsed, not that none were given.
    if !sources.is_empty() || errors.is_empty() {
        errors.extend(validate_partial(&sources));
    }
    if !errors.is_empty() {
        return Err(TopologyErrors::new(errors));
    }
    let sources = sources
        .into_iter()
        .filter_map(PartialSource::into_complete)
        .collect();
    Ok(Topology { sources })
}

/// Parse without the semantic checks (every structural error is still collected).
pub fn parse_topology(yaml: &str) -> Result<Topology, TopologyErrors> {
    let (sources, errors) = parse_partial(yaml);
    if !errors.is_empty() {
        return Err(TopologyErrors::new(errors));
    }
    let sources = sources
        .into_iter()
        .filter_map(PartialSource::into_complete)
        .collect();
    Ok(Topology { sources })
}

fn parse_partial(yaml: &str) -> (Vec<PartialSource>, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let root: Value = match serde_yaml::from_str(yaml) {
        Ok(v) => v,
        Err(e) => {
            errors.push(ConfigError::new("", format!("not valid YAML: {e}")));
            return (Vec::new(), errors);
        }
    };
    let Value::Mapping(root) = root else {
        errors.push(ConfigError::new(
            "",
            "expected a mapping with a `sources` list at the top level",
        ));
        return (Vec::new(), errors);
    };
    let mut sources_value = None;
    for (key, value) in root {
        match key.as_str() {
            Some("sources") => sources_value = Some(value),
            _ => errors.push(ConfigError::new(
                key_name(&key),
                "unknown field, expected `sources`",
            )),
        }
    }
    let Some(sources_value) = sources_value else {
        errors.push(ConfigError::new("sources", "missing field"));
        return (Vec::new(), errors);
    };
    let Value::Sequence(items) = sources_value else {
        errors.push(ConfigError::new("sources", "expected a list of sources"));
        return (Vec::new(), errors);
    };
    let sources = items
        .into_iter()
        .enumerate()
        .filter_map(|(i, item)| parse_source(item, &format!("sources[{i}]"), &mut errors))
        .collect();
    (sources, errors)
}

fn parse_source(item: Value, path: &str, errors: &mut Vec<ConfigError>) -> Option<PartialSource> {
    let Some((kind, body)) = single_key(item) else {
        errors.push(ConfigError::new(
            path,
            "expected one source written `- Redis: {name: ..., listen_addr: ..., chain: [...]}`",
        ));
        return None;
    };
    if !SourceConfig::KINDS.contains(&kind.as_str()) {
        errors.push(ConfigError::new(
            path,
            format!(
                "unknown source kind `{kind}`, expected one of: {}",
                SourceConfig::KINDS.join(", ")
            ),
        ));
        return None;
    }
    let mut body = match body {
        Value::Mapping(m) => m,
        _ => {
            errors.push(ConfigError::new(
                path,
                format!("{kind}: expected a mapping of fields"),
            ));
            return None;
        }
    };
    // The chain is parsed on its own so that each of its items reports its own errors.
    let chain = match body.remove("chain") {
        Some(chain) => parse_chain(chain, &format!("{path}.chain"), errors),
        None => {
            errors.push(ConfigError::new(format!("{path}.chain"), "missing field"));
            None
        }
    };
    body.insert(Value::from("chain"), Value::Sequence(Vec::new()));
    let listener = deserialize_at::<ListenerConfig>(Value::Mapping(body), path, errors);
    let config = match kind.as_str() {
        "Cassandra" => listener.map(SourceConfig::Cassandra),
        _ => listener.map(SourceConfig::Redis),
    };
    Some(PartialSource {
        config,
        // A missing or non-list chain was reported above; one unparsed item stands for it so
        // that the checks do not also call it empty.
        chain: chain.unwrap_or_else(|| vec![None]),
    })
}

/// Parses a chain; items that fail are `None` (their errors are in `errors`). Returns `None`
/// when the value is not a list at all.
pub(crate) fn parse_chain(
    value: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<Vec<Option<TransformConfig>>> {
    let Value::Sequence(items) = value else {
        errors.push(ConfigError::new(path, "expected a list of transforms"));
        return None;
    };
    Some(
        items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_transform(item, &format!("{path}[{i}]"), errors))
            .collect(),
    )
}

fn parse_transform(
    item: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<TransformConfig> {
    let item = normalize_item(item);
    let Some((kind, body)) = single_key(item) else {
        errors.push(ConfigError::new(
            path,
            "expected one transform written `- Kind: {fields}`",
        ));
        return None;
    };
    if !TransformConfig::KINDS.contains(&kind.as_str()) {
        errors.push(ConfigError::new(
            path,
            format!(
                "unknown transform `{kind}`, expected one of: {}",
                TransformConfig::KINDS.join(", ")
            ),
        ));
        return None;
    }

    // Walk the sub-chains first so that every error inside them is reported with its path.
    let mut stripped = body.clone();
    let mut sub_chains_ok = true;
    for (sub_path, chain) in take_sub_chains(&mut stripped) {
        let parsed = parse_chain(chain, &format!("{path}.{sub_path}"), errors);
        if !parsed.is_some_and(|items| items.iter().all(Option::is_some)) {
            sub_chains_ok = false;
        }
    }
    if !sub_chains_ok {
        // Report the transform's own errors, if any, without the sub-chains.
        let mut m = Mapping::new();
        m.insert(Value::String(kind), stripped);
        let _ = deserialize_at::<TransformConfig>(Value::Mapping(m), path, errors);
        return None;
    }
    let mut m = Mapping::new();
    m.insert(Value::String(kind), body);
    deserialize_at::<TransformConfig>(Value::Mapping(m), path, errors)
}

/// Rewrites upstream's shorthands into the `- Kind: {fields}` form serde reads, in the item
/// and in every sub-chain inside it: the final deserialize of a Tee reads its sub-chains
/// again, so they must be in that form too.
fn normalize_item(item: Value) -> Value {
    match item {
        // `- NullSink` is shorthand for `- NullSink: {}`.
        Value::String(kind) => {
            let mut m = Mapping::new();
            m.insert(Value::String(kind), Value::Mapping(Mapping::new()));
            Value::Mapping(m)
        }
        Value::Mapping(m) if m.len() == 1 => Value::Mapping(
            m.into_iter()
                .map(|(kind, body)| (kind, normalize_body(body)))
                .collect(),
        ),
        other => other,
    }
}

fn normalize_body(body: Value) -> Value {
    match body {
        Value::Null => Value::Mapping(Mapping::new()),
        // `DebugReturner: Fail`
        Value::String(s) if s == "Fail" => {
            let mut m = Mapping::new();
            m.insert(Value::from("Fail"), Value::Bool(true));
            Value::Mapping(m)
        }
        Value::Mapping(mut m) => {
            normalize_subchain_on_mismatch(&mut m);
            normalize_sub_chains(&mut m);
            Value::Mapping(m)
        }
        other => other,
    }
}

/// Normalizes the items of every `chain:` list inside a transform's body.
fn normalize_sub_chains(m: &mut Mapping) {
    for (key, child) in m.iter_mut() {
        match child {
            Value::Sequence(items) if key.as_str() == Some("chain") => {
                for item in items.iter_mut() {
                    *item = normalize_item(std::mem::take(item));
                }
            }
            Value::Mapping(inner) => normalize_sub_chains(inner),
            _ => {}
        }
    }
}

/// Upstream 0.7 wrote `SubchainOnMismatch: [..]`; main writes `SubchainOnMismatch: {chain: [..]}`.
fn normalize_subchain_on_mismatch(body: &mut Mapping) {
    if let Some(Value::Mapping(behavior)) = body.get_mut("behavior")
        && let Some(sub) = behavior.get_mut("SubchainOnMismatch")
        && let Value::Sequence(_) = sub
    {
        let chain = std::mem::take(sub);
        let mut m = Mapping::new();
        m.insert(Value::from("chain"), chain);
        *sub = Value::Mapping(m);
    }
}

/// Replaces every `chain:` list inside a transform's body with an empty list and returns them
/// with their field path.
fn take_sub_chains(body: &mut Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    take_sub_chains_at(body, String::new(), &mut out);
    out
}

fn take_sub_chains_at(value: &mut Value, path: String, out: &mut Vec<(String, Value)>) {
    let Value::Mapping(m) = value else { return };
    for (key, child) in m.iter_mut() {
        let name = key_name(key);
        let child_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        if name == "chain" && child.is_sequence() {
            out.push((
                child_path,
                std::mem::replace(child, Value::Sequence(Vec::new())),
            ));
        } else {
            take_sub_chains_at(child, child_path, out);
        }
    }
}

fn deserialize_at<T: DeserializeOwned>(
    value: Value,
    path: &str,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(value, &mut track);
    match serde_yaml::with::singleton_map_recursive::deserialize(de) {
        Ok(v) => Some(v),
        Err(e) => {
            let inner = track.path().to_string();
            let full = join_error_path(path, &inner);
            errors.push(ConfigError::new(full, e.to_string()));
            None
        }
    }
}

/// Joins the item path with serde's path inside it, dropping the enum tag at its start
/// (`Tee.behavior` -> `behavior`).
fn join_error_path(path: &str, inner: &str) -> String {
    let inner = inner.trim_start_matches('.');
    let inner = match inner.split_once('.') {
        Some((first, rest)) if TransformConfig::KINDS.contains(&first) => rest,
        None if TransformConfig::KINDS.contains(&inner) || inner == "?" => "",
        _ => inner,
    };
    if inner.is_empty() {
        path.to_string()
    } else {
        format!("{path}.{inner}")
    }
}

fn single_key(item: Value) -> Option<(String, Value)> {
    let Value::Mapping(m) = item else { return None };
    if m.len() != 1 {
        return None;
    }
    let (k, v) = m.into_iter().next()?;
    Some((k.as_str()?.to_string(), v))
}

fn key_name(key: &Value) -> String {
    match key {
        Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests;

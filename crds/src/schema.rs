//! Schema pieces for the CRD that serde and schemars cannot say on their own: the CEL rules
//! the apiserver checks on `kubectl apply`, and opaque schemas where the proxy's types are
//! recursive (a Tee's chain holds transforms) or mix plain and tagged enum variants, which a
//! structural schema cannot express. Those parts are checked by [`crate::validate`] instead,
//! which the operator runs before it renders anything.

use schemars::{Schema, SchemaGenerator, json_schema};

/// Kinds of transform that end a chain.
pub const SINK_KINDS: [&str; 4] = [
    "RedisSinkSingle",
    "CassandraSinkSingle",
    "NullSink",
    "DebugReturner",
];

/// CEL (on a chain): the chain is not empty and its last transform is a sink.
pub const CHAIN_ENDS_IN_SINK_RULE: &str = "size(self) > 0 && (has(self[size(self) - 1].RedisSinkSingle) || has(self[size(self) - 1].CassandraSinkSingle) || has(self[size(self) - 1].NullSink) || has(self[size(self) - 1].DebugReturner))";
pub const CHAIN_ENDS_IN_SINK_MESSAGE: &str = "a chain must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)";

/// CEL (on the sources list): no two sources share a name.
pub const UNIQUE_SOURCE_NAMES_RULE: &str = "self.all(a, self.exists_one(b, (has(a.Redis) ? a.Redis.name : has(a.Cassandra) ? a.Cassandra.name : '') == (has(b.Redis) ? b.Redis.name : has(b.Cassandra) ? b.Cassandra.name : '')))";
pub const UNIQUE_SOURCE_NAMES_MESSAGE: &str = "source names must be unique";

/// Any JSON value, kept as written (checked by the topology validation, not by the schema).
pub fn opaque(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// A sub-chain of transforms: a list of objects, checked by the topology validation.
pub fn opaque_chain(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "description": "The transforms of the sub-chain, ending in a sink (same form as a source's chain).",
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_rule_names_every_sink() {
        for kind in SINK_KINDS {
            assert!(
                CHAIN_ENDS_IN_SINK_RULE.contains(&format!(".{kind})")),
                "{kind}"
            );
            assert!(CHAIN_ENDS_IN_SINK_MESSAGE.contains(kind), "{kind}");
        }
        let config = |kind: &str| -> crate::TransformConfig {
            serde_json::from_str(&format!(r#"{{"{kind}": {{"remoteAddress": "a:1"}}}}"#))
                .or_else(|_| serde_json::from_str(&format!(r#"{{"{kind}": {{}}}}"#)))
                .expect(kind)
        };
        for kind in SINK_KINDS {
            assert!(config(kind).is_sink(), "{kind}");
        }
    }
}

//! Loader and validation tests: upstream Shotover files load unchanged, and every error is
//! reported with its path, all at once.

use super::*;
use crate::topology::{RedisSourceConfig, TlsAcceptorConfig, TlsConnectorConfig};
use crate::transform::{
    CoalesceConfig, DebugReturnerConfig, NamedConfig, QueryCounterConfig, QueryType,
    QueryTypeFilterConfig, RedisSinkSingleConfig, SubchainConfig, TeeBehavior, TeeConfig,
};
use crate::validate::validate;

const KINDS: &str = "RedisSinkSingle, ValkeySinkSingle, RedisSinkCluster, ValkeySinkCluster, RedisClusterPortsRewrite, ValkeyClusterPortsRewrite, CassandraSinkSingle, CassandraPeersRewrite, RequestThrottling, \
                     NullSink, DebugPrinter, DebugReturner, DebugForceParse, DebugForceEncode, QueryCounter, QueryTypeFilter, Coalesce, Tee";
const SINKS: &str = "a chain must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)";

/// The full error report of a topology that must not load.
fn errors_of(yaml: &str) -> String {
    match load_topology(yaml) {
        Ok(t) => panic!("expected errors, loaded {t:#?}"),
        Err(e) => e.to_string(),
    }
}

fn loaded(yaml: &str) -> Topology {
    load_topology(yaml).unwrap_or_else(|e| panic!("{e}"))
}

/// One valid source around the given chain (a YAML flow list).
fn with_chain(chain: &str) -> String {
    format!("sources:\n  - Redis: {{name: a, listen_addr: \"127.0.0.1:6379\", chain: {chain}}}\n")
}

fn redis_source(topology: &Topology, i: usize) -> &RedisSourceConfig {
    match &topology.sources[i] {
        SourceConfig::Redis(r) => r,
        other => panic!("expected a Redis source, got {other:?}"),
    }
}

fn sink(remote_address: &str, connect_timeout_ms: u64) -> TransformConfig {
    TransformConfig::RedisSinkSingle(RedisSinkSingleConfig {
        name: None,
        remote_address: remote_address.into(),
        connect_timeout_ms,
        tls: None,
        connection_count: None,
        read_timeout: None,
        max_buffered_reply_bytes: None,
    })
}

fn returner(reply: &str) -> TransformConfig {
    TransformConfig::DebugReturner(DebugReturnerConfig {
        name: None,
        redis: Some(reply.into()),
        fail: false,
    })
}

fn deny(list: &[QueryType]) -> TransformConfig {
    TransformConfig::QueryTypeFilter(QueryTypeFilterConfig {
        name: None,
        allow_list: None,
        deny_list: Some(list.to_vec()),
    })
}

fn null_sink() -> TransformConfig {
    TransformConfig::NullSink(NamedConfig { name: None })
}

// ---- upstream files load unchanged ----

#[test]
fn upstream_0_7_tee_subchain_topology_loads_with_its_values() {
    // shotover-proxy 0.7 `tests/test-configs/tee/subchain_with_mismatch.yaml`.
    let t = loaded(
        r#"---
sources:
  - Redis:
      name: "redis"
      listen_addr: "127.0.0.1:6379"
      connection_limit: 3000000
      chain:
        - Tee:
            buffer_size: 10000
            behavior:
              SubchainOnMismatch:
                - QueryTypeFilter:
                    DenyList: [Read]
                - RedisSinkSingle:
                    remote_address: "127.0.0.1:1111"
                    connect_timeout_ms: 3000
            chain:
              - QueryTypeFilter:
                  DenyList: [Read]
              - DebugReturner:
                  Redis: "41"
        - DebugReturner:
            Redis: "42"
"#,
    );
    assert_eq!(t.sources.len(), 1);
    let r = redis_source(&t, 0);
    assert_eq!(r.name, "redis");
    assert_eq!(r.listen_addr, "127.0.0.1:6379");
    assert_eq!(r.connection_limit, Some(3_000_000));
    assert_eq!(r.hard_connection_limit, None);
    assert_eq!(r.timeout, None);
    assert_eq!(r.tls, None);
    assert_eq!(
        r.chain,
        vec![
            TransformConfig::Tee(TeeConfig {
                name: None,
                behavior: TeeBehavior::SubchainOnMismatch(SubchainConfig {
                    name: None,
                    chain: vec![deny(&[QueryType::Read]), sink("127.0.0.1:1111", 3000)],
                }),
                timeout_micros: None,
                buffer_size: Some(10000),
                switch_port: None,
                chain: vec![deny(&[QueryType::Read]), returner("41")],
            }),
            returner("42"),
        ]
    );
}

#[test]
fn upstream_valkey_spellings_and_bare_null_sink_in_a_sub_chain_load() {
    // shotover-proxy `tests/test-configs/tee/switch_chain.yaml` (Valkey era), trimmed to two
    // sources: `connection_limit:` left empty, `- NullSink` as a bare string in a sub-chain.
    let t = loaded(
        r#"---
sources:
  - Valkey:
      name: "valkey-1"
      listen_addr: "127.0.0.1:6371"
      connection_limit: 
      chain:
        - Tee:
            behavior: Ignore
            buffer_size: 10000
            switch_port: 1231
            chain:
              - DebugReturner:
                  Valkey: "b"
        - DebugReturner:
            Valkey: "a"
  - Valkey:
      name: "valkey-2"
      listen_addr: "127.0.0.1:6372"
      connection_limit: 
      chain:
        - Tee:
            behavior: 
              SubchainOnMismatch:
                - NullSink
            buffer_size: 10000
            switch_port: 1232
            chain:
              - DebugReturner:
                  Valkey: "b"
        - ValkeySinkSingle:
            remote_address: "127.0.0.1:1111"
            connect_timeout_ms: 500
"#,
    );
    assert_eq!(t.sources.len(), 2);
    let first = redis_source(&t, 0);
    assert_eq!(first.name, "valkey-1");
    assert_eq!(first.connection_limit, None);
    assert_eq!(
        first.chain,
        vec![
            TransformConfig::Tee(TeeConfig {
                name: None,
                behavior: TeeBehavior::Ignore,
                timeout_micros: None,
                buffer_size: Some(10000),
                switch_port: Some(1231),
                chain: vec![returner("b")],
            }),
            returner("a"),
        ]
    );
    let second = redis_source(&t, 1);
    assert_eq!(second.listen_addr, "127.0.0.1:6372");
    assert_eq!(
        second.chain,
        vec![
            TransformConfig::Tee(TeeConfig {
                name: None,
                behavior: TeeBehavior::SubchainOnMismatch(SubchainConfig {
                    name: None,
                    chain: vec![null_sink()],
                }),
                timeout_micros: None,
                buffer_size: Some(10000),
                switch_port: Some(1232),
                chain: vec![returner("b")],
            }),
            sink("127.0.0.1:1111", 500),
        ]
    );
}

#[test]
fn main_style_topology_with_a_name_on_every_transform_loads() {
    let t = loaded(
        r#"
sources:
  - Valkey:
      name: "valkey"
      listen_addr: "127.0.0.1:6379"
      chain:
        - QueryCounter:
            name: "counter"
            counter_name: "valkey-chain"
        - Tee:
            name: "tee"
            behavior:
              SubchainOnMismatch:
                name: "mismatch-chain"
                chain:
                  - NullSink:
                      name: "mismatch-null"
            chain:
              - DebugPrinter:
                  name: "printer"
              - DebugReturner:
                  name: "returner"
                  Valkey: "42"
        - ValkeySinkSingle:
            name: "valkey-sink"
            remote_address: "127.0.0.1:1111"
"#,
    );
    let r = redis_source(&t, 0);
    assert_eq!(
        r.chain,
        vec![
            TransformConfig::QueryCounter(QueryCounterConfig {
                name: Some("counter".into()),
                counter_name: Some("valkey-chain".into()),
            }),
            TransformConfig::Tee(TeeConfig {
                name: Some("tee".into()),
                behavior: TeeBehavior::SubchainOnMismatch(SubchainConfig {
                    name: Some("mismatch-chain".into()),
                    chain: vec![TransformConfig::NullSink(NamedConfig {
                        name: Some("mismatch-null".into()),
                    })],
                }),
                timeout_micros: None,
                buffer_size: None,
                switch_port: None,
                chain: vec![
                    TransformConfig::DebugPrinter(NamedConfig {
                        name: Some("printer".into()),
                    }),
                    TransformConfig::DebugReturner(DebugReturnerConfig {
                        name: Some("returner".into()),
                        redis: Some("42".into()),
                        fail: false,
                    }),
                ],
            }),
            TransformConfig::RedisSinkSingle(RedisSinkSingleConfig {
                name: Some("valkey-sink".into()),
                remote_address: "127.0.0.1:1111".into(),
                connect_timeout_ms: 3000,
                tls: None,
                connection_count: None,
                read_timeout: None,
                max_buffered_reply_bytes: None,
            }),
        ]
    );
    let names: Vec<&str> = r.chain.iter().map(TransformConfig::name).collect();
    assert_eq!(names, ["counter", "tee", "valkey-sink"]);
}

#[test]
fn bare_null_sink_and_debug_returner_fail_load_at_every_depth() {
    let t = loaded(&with_chain(
        "[DebugPrinter, {Tee: {chain: [DebugReturner: Fail], \
         behavior: {SubchainOnMismatch: [DebugPrinter, NullSink]}}}, NullSink]",
    ));
    let fail = TransformConfig::DebugReturner(DebugReturnerConfig {
        name: None,
        redis: None,
        fail: true,
    });
    assert_eq!(
        redis_source(&t, 0).chain,
        vec![
            TransformConfig::DebugPrinter(NamedConfig::default()),
            TransformConfig::Tee(TeeConfig {
                name: None,
                behavior: TeeBehavior::SubchainOnMismatch(SubchainConfig {
                    name: None,
                    chain: vec![
                        TransformConfig::DebugPrinter(NamedConfig::default()),
                        null_sink(),
                    ],
                }),
                timeout_micros: None,
                buffer_size: None,
                switch_port: None,
                chain: vec![fail.clone()],
            }),
            null_sink(),
        ]
    );
    let t = loaded(&with_chain("[DebugReturner: Fail]"));
    assert_eq!(redis_source(&t, 0).chain, vec![fail]);
}

#[test]
fn tee_inside_a_tee_sub_chain_loads_with_its_shorthands() {
    let t = loaded(&with_chain(
        "[{Tee: {chain: [{Tee: {chain: [NullSink], behavior: {SubchainOnMismatch: [NullSink]}}}, \
         NullSink]}}, NullSink]",
    ));
    let TransformConfig::Tee(outer) = &redis_source(&t, 0).chain[0] else {
        panic!("expected a Tee");
    };
    let TransformConfig::Tee(inner) = &outer.chain[0] else {
        panic!("expected a Tee");
    };
    assert_eq!(inner.chain, vec![null_sink()]);
    assert_eq!(
        inner.behavior,
        TeeBehavior::SubchainOnMismatch(SubchainConfig {
            name: None,
            chain: vec![null_sink()],
        })
    );
}

#[test]
fn camel_case_field_names_load() {
    let t = loaded(
        r#"
sources:
  - Redis:
      name: "redis"
      listenAddr: "0.0.0.0:6379"
      connectionLimit: 10
      hardConnectionLimit: true
      timeout: 60
      maxFrameSizeBytes: 4096
      tls:
        certificatePath: "/certs/tls.crt"
        privateKeyPath: "/certs/tls.key"
        certificateAuthorityPath: "/certs/ca.crt"
      chain:
        - QueryCounter:
            counterName: "redis-chain"
        - Coalesce:
            flushWhenBufferedMessageCount: 100
            flushWhenMillisSinceLastFlush: 10
        - Tee:
            bufferSize: 7
            timeoutMicros: 1000
            switchPort: 1231
            behavior: FailOnMismatch
            chain:
              - NullSink
        - RedisSinkSingle:
            remoteAddress: "redis.default.svc:6379"
            connectTimeoutMs: 250
            tls:
              certificateAuthorityPath: "/certs/ca.crt"
              certificatePath: "/certs/client.crt"
              privateKeyPath: "/certs/client.key"
              verifyHostname: false
"#,
    );
    let r = redis_source(&t, 0);
    assert_eq!(r.listen_addr, "0.0.0.0:6379");
    assert_eq!(r.connection_limit, Some(10));
    assert_eq!(r.hard_connection_limit, Some(true));
    assert_eq!(r.timeout, Some(60));
    assert_eq!(r.max_frame_size_bytes, Some(4096));
    assert_eq!(
        r.tls,
        Some(TlsAcceptorConfig {
            certificate_path: "/certs/tls.crt".into(),
            private_key_path: "/certs/tls.key".into(),
            certificate_authority_path: Some("/certs/ca.crt".into()),
        })
    );
    assert_eq!(
        r.chain,
        vec![
            TransformConfig::QueryCounter(QueryCounterConfig {
                name: None,
                counter_name: Some("redis-chain".into()),
            }),
            TransformConfig::Coalesce(CoalesceConfig {
                name: None,
                flush_when_buffered_message_count: Some(100),
                flush_when_millis_since_last_flush: Some(10),
            }),
            TransformConfig::Tee(TeeConfig {
                name: None,
                behavior: TeeBehavior::FailOnMismatch,
                timeout_micros: Some(1000),
                buffer_size: Some(7),
                switch_port: Some(1231),
                chain: vec![null_sink()],
            }),
            TransformConfig::RedisSinkSingle(RedisSinkSingleConfig {
                name: None,
                remote_address: "redis.default.svc:6379".into(),
                connect_timeout_ms: 250,
                tls: Some(TlsConnectorConfig {
                    certificate_authority_path: "/certs/ca.crt".into(),
                    certificate_path: Some("/certs/client.crt".into()),
                    private_key_path: Some("/certs/client.key".into()),
                    verify_hostname: false,
                }),
                connection_count: None,
                read_timeout: None,
                max_buffered_reply_bytes: None,
            }),
        ]
    );
}

#[test]
fn snake_case_and_camel_case_spellings_give_the_same_topology() {
    let snake = loaded(
        "sources:\n  - Valkey: {name: a, listen_addr: \"127.0.0.1:6379\", connection_limit: 3, \
         max_frame_size_bytes: 2048, chain: [{Coalesce: {flush_when_buffered_message_count: 2}}, \
         {Tee: {buffer_size: 1, timeout_micros: 5, http_api_port: 9000, chain: [NullSink]}}, \
         {ValkeySinkSingle: {remote_address: \"h:1\", connect_timeout_ms: 9}}]}\n",
    );
    let camel = loaded(
        "sources:\n  - Redis: {name: a, listenAddr: \"127.0.0.1:6379\", connectionLimit: 3, \
         maxFrameSizeBytes: 2048, chain: [{Coalesce: {flushWhenBufferedMessageCount: 2}}, \
         {Tee: {bufferSize: 1, timeoutMicros: 5, switchPort: 9000, chain: [NullSink]}}, \
         {RedisSinkSingle: {remoteAddress: \"h:1\", connectTimeoutMs: 9}}]}\n",
    );
    assert_eq!(snake, camel);
}

#[test]
fn query_type_filter_lists_load() {
    let t = loaded(&with_chain(
        "[{QueryTypeFilter: {DenyList: [Read]}}, \
         {QueryTypeFilter: {AllowList: [Write, ReadWrite, PubSubMessage]}}, NullSink]",
    ));
    assert_eq!(
        redis_source(&t, 0).chain,
        vec![
            deny(&[QueryType::Read]),
            TransformConfig::QueryTypeFilter(QueryTypeFilterConfig {
                name: None,
                allow_list: Some(vec![
                    QueryType::Write,
                    QueryType::ReadWrite,
                    QueryType::PubSubMessage
                ]),
                deny_list: None,
            }),
            null_sink(),
        ]
    );
}

#[test]
fn defaults_apply_to_omitted_fields() {
    let t = loaded(&with_chain(
        "[{RedisSinkSingle: {remote_address: \"h:6379\"}}]",
    ));
    let r = redis_source(&t, 0);
    assert_eq!(r.connection_limit, None);
    assert_eq!(r.max_frame_size_bytes, None);
    assert_eq!(r.chain, vec![sink("h:6379", 3000)]);
}

#[test]
fn listen_and_remote_addresses_accept_every_documented_form() {
    let t = loaded(
        "sources:\n\
         \x20 - Redis: {name: a, listen_addr: \"localhost:6379\", chain: [{RedisSinkSingle: {remote_address: \"[::1]:6379\"}}]}\n\
         \x20 - Redis: {name: b, listen_addr: \"[::]:6380\", chain: [{RedisSinkSingle: {remote_address: \"redis-0.redis_svc.ns:1\"}}]}\n\
         \x20 - Redis: {name: c, listen_addr: \"0.0.0.0:6381\", chain: [{RedisSinkSingle: {remote_address: \"10.0.0.1:65535\"}}]}\n",
    );
    assert_eq!(t.sources.len(), 3);
}

#[test]
fn parse_topology_skips_the_semantic_checks_that_validate_runs() {
    let yaml = with_chain("[DebugPrinter]");
    let parsed = parse_topology(&yaml).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        redis_source(&parsed, 0).chain,
        vec![TransformConfig::DebugPrinter(NamedConfig::default())]
    );
    let expected = format!(
        "invalid topology (1 error):\n  sources[0].chain[0]: DebugPrinter is not a sink, but it ends the chain: {SINKS}"
    );
    assert_eq!(
        validate(&parsed).map_err(|e| e.to_string()),
        Err(expected.clone())
    );
    assert_eq!(errors_of(&yaml), expected);
}

#[test]
fn parse_topology_still_reports_structural_errors() {
    let err = parse_topology(&with_chain("[{NullSink: {bogus: 1}}]")).map_err(|e| e.to_string());
    assert_eq!(
        err,
        Err(
            "invalid topology (1 error):\n  sources[0].chain[0].bogus: unknown field `bogus`, expected `name`"
                .into()
        )
    );
}

#[test]
fn validate_accepts_what_load_topology_loads() {
    let t = loaded(&with_chain("[DebugPrinter, NullSink]"));
    assert_eq!(validate(&t), Ok(()));
}

// ---- structural errors ----

#[test]
fn yaml_syntax_error_is_reported_alone() {
    assert_eq!(
        errors_of("sources: [\n"),
        "invalid topology (1 error):\n  not valid YAML: did not find expected node content at line 2 column 1, while parsing a flow node"
    );
}

#[test]
fn top_level_that_is_not_a_mapping_is_reported() {
    assert_eq!(
        errors_of("- Redis: {}\n"),
        "invalid topology (1 error):\n  expected a mapping with a `sources` list at the top level"
    );
}

#[test]
fn missing_or_mistyped_sources_is_reported() {
    assert_eq!(
        errors_of("{}\n"),
        "invalid topology (1 error):\n  sources: missing field"
    );
    assert_eq!(
        errors_of("sources: 3\n"),
        "invalid topology (1 error):\n  sources: expected a list of sources"
    );
}

#[test]
fn empty_source_list_is_reported() {
    assert_eq!(
        errors_of("sources: []\n"),
        "invalid topology (1 error):\n  sources: no sources: the proxy would listen on nothing"
    );
}

#[test]
fn unknown_top_level_field_is_reported_with_its_name() {
    let yaml = format!("{}transforms: []\n", with_chain("[NullSink]"));
    assert_eq!(
        errors_of(&yaml),
        "invalid topology (1 error):\n  transforms: unknown field, expected `sources`"
    );
}

#[test]
fn unknown_field_inside_a_source_is_reported_with_its_path() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\", listen_port: 2, chain: [NullSink]}\n"
        ),
        "invalid topology (1 error):\n  sources[0].listen_port: unknown field `listen_port`, expected one of `name`, `listenAddr`, `listen_addr`, `connectionLimit`, `connection_limit`, `hardConnectionLimit`, `hard_connection_limit`, `timeout`, `maxFrameSizeBytes`, `max_frame_size_bytes`, `tls`, `transport`, `chain`"
    );
}

#[test]
fn unknown_field_inside_a_transform_is_reported_with_its_path() {
    assert_eq!(
        errors_of(&with_chain("[DebugPrinter, {NullSink: {nmae: x}}]")),
        "invalid topology (1 error):\n  sources[0].chain[1].nmae: unknown field `nmae`, expected `name`"
    );
}

#[test]
fn unknown_field_in_nested_tls_is_reported_with_its_path() {
    assert_eq!(
        errors_of(&with_chain(
            "[{RedisSinkSingle: {remote_address: \"h:1\", tls: {ca: x, certificate_authority_path: y}}}]"
        )),
        "invalid topology (1 error):\n  sources[0].chain[0].tls.ca: unknown field `ca`, expected one of `certificateAuthorityPath`, `certificate_authority_path`, `certificatePath`, `certificate_path`, `privateKeyPath`, `private_key_path`, `verifyHostname`, `verify_hostname`"
    );
}

#[test]
fn missing_and_mistyped_transform_fields_are_reported_with_their_path() {
    assert_eq!(
        errors_of(&with_chain(
            "[{QueryCounter: {}}, {RedisSinkSingle: {remote_address: \"h:1\", connect_timeout_ms: soon}}]"
        )),
        "invalid topology (2 errors):\n  sources[0].chain[1].connect_timeout_ms: invalid type: string \"soon\", expected u64\n  sources[0].chain[0].counterName: missing: the name of the counter (upstream 0.7 wrote it as `name`)"
    );
}

#[test]
fn unknown_query_type_is_reported_with_its_index() {
    assert_eq!(
        errors_of(&with_chain(
            "[{QueryTypeFilter: {DenyList: [Read, Delete]}}, NullSink]"
        )),
        "invalid topology (1 error):\n  sources[0].chain[0].DenyList[1]: unknown variant `Delete`, expected one of `Read`, `Write`, `ReadWrite`, `SchemaChange`, `PubSubMessage`"
    );
}

#[test]
fn upstream_cluster_sink_topologies_load_with_their_values() {
    // shotover-proxy `tests/test-configs/valkey/cluster-ports-rewrite/topology.yaml`.
    let t = loaded(
        r#"---
sources:
  - Valkey:
      name: "valkey"
      listen_addr: "127.0.0.1:6380"
      chain:
        - ValkeyClusterPortsRewrite:
           name: "valkey-cluster-ports-rewrite"
           new_port: 6380
        - ValkeySinkCluster:
            name: "valkey-sink-cluster"
            first_contact_points: ["127.0.0.1:2220", "127.0.0.1:2221"]
            direct_destination: "127.0.0.1:2220"
            connection_count: 2
            connect_timeout_ms: 3000
"#,
    );
    let chain = &redis_source(&t, 0).chain;
    match (&chain[0], &chain[1]) {
        (TransformConfig::RedisClusterPortsRewrite(p), TransformConfig::RedisSinkCluster(c)) => {
            assert_eq!(p.new_port, 6380);
            assert_eq!(c.first_contact_points, ["127.0.0.1:2220", "127.0.0.1:2221"]);
            assert_eq!(c.direct_destination.as_deref(), Some("127.0.0.1:2220"));
            assert_eq!(c.connection_count, Some(2));
            assert_eq!(c.name.as_deref(), Some("valkey-sink-cluster"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        errors_of(&with_chain(
            "[{RedisSinkCluster: {first_contact_points: []}}]"
        )),
        "invalid topology (1 error):\n  sources[0].chain[0].firstContactPoints: must name at least one node of the cluster (host:port)"
    );
}

#[test]
fn unknown_transform_kind_lists_the_accepted_kinds() {
    assert_eq!(
        errors_of(&with_chain(
            "[{CassandraSinkCluster: {first_contact_points: []}}]"
        )),
        format!(
            "invalid topology (1 error):\n  sources[0].chain[0]: unknown transform `CassandraSinkCluster`, expected one of: {KINDS}"
        )
    );
    assert_eq!(
        errors_of(&with_chain("[Nullsink]")),
        format!(
            "invalid topology (1 error):\n  sources[0].chain[0]: unknown transform `Nullsink`, expected one of: {KINDS}"
        )
    );
}

#[test]
fn transform_item_with_two_kinds_is_reported() {
    assert_eq!(
        errors_of(&with_chain("[{DebugPrinter: {}, NullSink: {}}]")),
        "invalid topology (1 error):\n  sources[0].chain[0]: expected one transform written `- Kind: {fields}`"
    );
}

#[test]
fn unknown_source_kind_is_reported_without_claiming_there_are_no_sources() {
    assert_eq!(
        errors_of(
            "sources:\n  - Kafka: {name: a, listen_addr: \"127.0.0.1:9092\", chain: [NullSink]}\n"
        ),
        "invalid topology (1 error):\n  sources[0]: unknown source kind `Kafka`, expected one of: Redis, Valkey, Cassandra"
    );
}

#[test]
fn source_that_is_not_a_single_kind_is_reported() {
    assert_eq!(
        errors_of("sources:\n  - name: a\n    listen_addr: \"127.0.0.1:1\"\n"),
        "invalid topology (1 error):\n  sources[0]: expected one source written `- Redis: {name: ..., listen_addr: ..., chain: [...]}`"
    );
    assert_eq!(
        errors_of("sources:\n  - Redis: [NullSink]\n"),
        "invalid topology (1 error):\n  sources[0]: Redis: expected a mapping of fields"
    );
}

#[test]
fn missing_chain_is_reported_once() {
    assert_eq!(
        errors_of("sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\"}\n"),
        "invalid topology (1 error):\n  sources[0].chain: missing field"
    );
    assert_eq!(
        errors_of(&with_chain("NullSink")),
        "invalid topology (1 error):\n  sources[0].chain: expected a list of transforms"
    );
}

// ---- semantic errors ----

#[test]
fn chain_without_sink_is_reported_with_its_path() {
    assert_eq!(
        errors_of(&with_chain(
            "[{QueryCounter: {counter_name: c}}, DebugPrinter]"
        )),
        format!(
            "invalid topology (1 error):\n  sources[0].chain[1]: DebugPrinter is not a sink, but it ends the chain: {SINKS}"
        )
    );
}

#[test]
fn sink_in_mid_chain_is_reported_with_what_it_hides() {
    assert_eq!(
        errors_of(&with_chain(
            "[{NullSink: {name: early}}, DebugPrinter, {RedisSinkSingle: {remote_address: \"h:1\"}}]"
        )),
        "invalid topology (1 error):\n  sources[0].chain[0]: `early` (NullSink) is a sink in the middle of the chain: the 2 transform(s) after it would never run"
    );
}

#[test]
fn empty_chain_is_reported() {
    assert_eq!(
        errors_of(&with_chain("[]")),
        "invalid topology (1 error):\n  sources[0].chain: chain is empty: it must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)"
    );
}

#[test]
fn duplicate_source_names_and_listen_addresses_are_reported() {
    assert_eq!(
        errors_of(
            "sources:\n\
             \x20 - Redis: {name: a, listen_addr: \"127.0.0.1:6379\", chain: [NullSink]}\n\
             \x20 - Valkey: {name: a, listen_addr: \"127.0.0.1:6379\", chain: [NullSink]}\n"
        ),
        "invalid topology (2 errors):\n  sources[1].name: duplicate name `a`, already used at sources[0]\n  sources[1].listenAddr: `127.0.0.1:6379` is already the address of sources[0]"
    );
}

#[test]
fn duplicate_transform_names_are_reported_across_the_whole_topology() {
    assert_eq!(
        errors_of(
            "sources:\n\
             \x20 - Redis: {name: a, listen_addr: \"127.0.0.1:1\", chain: [{DebugPrinter: {name: p}}, {NullSink: {name: p}}]}\n\
             \x20 - Redis: {name: b, listen_addr: \"127.0.0.1:2\", chain: [{Tee: {name: a, chain: [{NullSink: {name: p}}]}}, NullSink]}\n"
        ),
        "invalid topology (3 errors):\n  sources[0].chain[1].name: duplicate name `p`, already used at sources[0].chain[0]\n  sources[1].chain[0].name: duplicate name `a`, already used at sources[0]\n  sources[1].chain[0].chain[0].name: duplicate name `p`, already used at sources[0].chain[0]"
    );
}

#[test]
fn unnamed_transforms_of_one_kind_do_not_clash() {
    loaded(
        "sources:\n\
         \x20 - Redis: {name: a, listen_addr: \"127.0.0.1:1\", chain: [DebugPrinter, DebugPrinter, NullSink]}\n\
         \x20 - Redis: {name: b, listen_addr: \"127.0.0.1:2\", chain: [DebugPrinter, NullSink]}\n",
    );
}

#[test]
fn empty_names_are_reported() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: \"\", listen_addr: \"127.0.0.1:1\", chain: [{NullSink: {name: \"\"}}]}\n"
        ),
        "invalid topology (2 errors):\n  sources[0].name: must not be empty\n  sources[0].chain[0].name: must not be empty"
    );
}

#[test]
fn unparsable_listen_and_remote_addresses_are_reported() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"redis:6379\", chain: [{RedisSinkSingle: {remote_address: \"127.0.0.1\"}}]}\n  - Redis: {name: b, listen_addr: \"127.0.0.1:99999\", chain: [{RedisSinkSingle: {remote_address: \"h/x:1\"}}]}\n  - Redis: {name: c, listen_addr: \"127.0.0.1:3\", chain: [{RedisSinkSingle: {remote_address: \"h:0\"}}]}\n"
        ),
        "invalid topology (5 errors):\n  \
         sources[0].listenAddr: `redis:6379` is not a listen address: expected ip:port, for example 127.0.0.1:6379 or 0.0.0.0:6379\n  \
         sources[0].chain[0].remoteAddress: `127.0.0.1` is not an address: expected host:port, for example 127.0.0.1:6379 or redis.default.svc:6379\n  \
         sources[1].listenAddr: `127.0.0.1:99999` is not a listen address: expected ip:port, for example 127.0.0.1:6379 or 0.0.0.0:6379\n  \
         sources[1].chain[0].remoteAddress: `h/x:1` is not an address: expected host:port, for example 127.0.0.1:6379 or redis.default.svc:6379\n  \
         sources[2].chain[0].remoteAddress: `h:0` is not an address: expected host:port, for example 127.0.0.1:6379 or redis.default.svc:6379"
    );
}

#[test]
fn zero_limits_are_reported_with_their_field() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\", connection_limit: 0, timeout: 0, max_frame_size_bytes: 1023, \
             chain: [{QueryCounter: {counter_name: \" \"}}, {RedisSinkSingle: {remote_address: \"h:1\", connect_timeout_ms: 0}}]}\n"
        ),
        "invalid topology (5 errors):\n  \
         sources[0].connectionLimit: must be at least 1\n  \
         sources[0].timeout: must be at least 1 second (omit it to never time out)\n  \
         sources[0].maxFrameSizeBytes: must be at least 1024\n  \
         sources[0].chain[0].counterName: must not be empty\n  \
         sources[0].chain[1].connectTimeoutMs: must be at least 1"
    );
}

#[test]
fn tls_paths_and_key_pairs_are_checked() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\", tls: {certificate_path: \"\", private_key_path: k}, \
             chain: [{RedisSinkSingle: {remote_address: \"h:1\", tls: {certificate_authority_path: ca, certificate_path: c}}}]}\n"
        ),
        "invalid topology (2 errors):\n  \
         sources[0].tls.certificatePath: must not be empty\n  \
         sources[0].chain[0].tls.privateKeyPath: required when certificatePath is set"
    );
}

#[test]
fn query_type_filter_needs_exactly_one_list() {
    assert_eq!(
        errors_of(&with_chain(
            "[QueryTypeFilter, {QueryTypeFilter: {AllowList: [Read], DenyList: [Write]}}, NullSink]"
        )),
        "invalid topology (2 errors):\n  \
         sources[0].chain[0]: set exactly one of `AllowList` and `DenyList`\n  \
         sources[0].chain[1]: set exactly one of `AllowList` and `DenyList`, not both"
    );
}

#[test]
fn coalesce_needs_a_flush_condition_of_at_least_one() {
    assert_eq!(
        errors_of(&with_chain(
            "[Coalesce, {Coalesce: {flush_when_buffered_message_count: 0}}, {Coalesce: {flush_when_millis_since_last_flush: 0}}, NullSink]"
        )),
        "invalid topology (3 errors):\n  \
         sources[0].chain[0]: set at least one of `flush_when_buffered_message_count` and `flush_when_millis_since_last_flush`\n  \
         sources[0].chain[1].flushWhenBufferedMessageCount: must be at least 1\n  \
         sources[0].chain[2].flushWhenMillisSinceLastFlush: must be at least 1"
    );
}

#[test]
fn debug_returner_needs_exactly_one_of_a_reply_and_fail() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\", chain: [DebugReturner]}\n  - Redis: {name: b, listen_addr: \"127.0.0.1:2\", chain: [{DebugReturner: {Redis: \"42\", Fail: true}}]}\n"
        ),
        "invalid topology (2 errors):\n  \
         sources[0].chain[0]: set `Redis: \"<reply>\"` or write `DebugReturner: Fail`\n  \
         sources[1].chain[0]: set either `Redis` (a reply) or `Fail`, not both"
    );
}

#[test]
fn tee_settings_are_checked() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\", chain: [{Tee: {buffer_size: 0, timeout_micros: 0, switch_port: 0, chain: [NullSink]}}, \
             {Tee: {switch_port: 8080, chain: [NullSink]}}, {Tee: {switch_port: 8080, chain: [NullSink]}}, NullSink]}\n"
        ),
        "invalid topology (4 errors):\n  \
         sources[0].chain[0].bufferSize: must be at least 1\n  \
         sources[0].chain[0].timeoutMicros: must be at least 1 (omit it for no limit)\n  \
         sources[0].chain[0].switchPort: must be a port number from 1 to 65535\n  \
         sources[0].chain[2].switchPort: port 8080 is already the switchPort of sources[0].chain[1]"
    );
}

#[test]
fn tee_with_unknown_behavior_is_reported() {
    assert_eq!(
        errors_of(&with_chain(
            "[{Tee: {behavior: Compare, chain: [NullSink]}}, NullSink]"
        )),
        "invalid topology (1 error):\n  sources[0].chain[0].behavior: unknown variant `Compare`, expected one of `Ignore`, `FailOnMismatch`, `LogWarningOnMismatch`, `SubchainOnMismatch`"
    );
}

#[test]
fn tee_sub_chain_semantic_errors_are_reported_with_their_paths() {
    assert_eq!(
        errors_of(&with_chain(
            "[{Tee: {chain: [DebugPrinter], behavior: {SubchainOnMismatch: {name: m, chain: [NullSink, NullSink]}}}}, \
             {Tee: {chain: [], behavior: {SubchainOnMismatch: []}}}, NullSink]"
        )),
        format!(
            "invalid topology (4 errors):\n  \
             sources[0].chain[0].chain[0]: DebugPrinter is not a sink, but it ends the chain: {SINKS}\n  \
             sources[0].chain[0].behavior.SubchainOnMismatch.chain[0]: NullSink is a sink in the middle of the chain: the 1 transform(s) after it would never run\n  \
             sources[0].chain[1].chain: chain is empty: it must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)\n  \
             sources[0].chain[1].behavior.SubchainOnMismatch.chain: chain is empty: it must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)"
        )
    );
}

#[test]
fn tee_sub_chain_parse_errors_are_reported_with_their_paths() {
    assert_eq!(
        errors_of(&with_chain(
            "[{Tee: {chain: [{Bogus: {}}], behavior: {SubchainOnMismatch: [{NullSink: {x: 1}}]}}}, NullSink]"
        )),
        format!(
            "invalid topology (2 errors):\n  \
             sources[0].chain[0].chain[0]: unknown transform `Bogus`, expected one of: {KINDS}\n  \
             sources[0].chain[0].behavior.SubchainOnMismatch.chain[0].x: unknown field `x`, expected `name`"
        )
    );
}

#[test]
fn tee_own_field_error_is_reported_beside_its_sub_chain_errors() {
    assert_eq!(
        errors_of(&with_chain(
            "[{Tee: {buffer: 3, chain: [{NullSink: {x: 1}}], behavior: {SubchainOnMismatch: {nme: m, chain: [NullSink]}}}}, NullSink]"
        )),
        "invalid topology (2 errors):\n  \
         sources[0].chain[0].chain[0].x: unknown field `x`, expected `name`\n  \
         sources[0].chain[0].buffer: unknown field `buffer`, expected one of `name`, `behavior`, `timeoutMicros`, `timeout_micros`, `bufferSize`, `buffer_size`, `httpApiPort`, `http_api_port`, `switchPort`, `switch_port`, `chain`"
    );
}

#[test]
fn tee_sub_chain_that_is_not_a_list_is_reported() {
    assert_eq!(
        errors_of(&with_chain("[{Tee: {chain: NullSink}}, NullSink]")),
        "invalid topology (1 error):\n  sources[0].chain[0].chain: invalid type: string \"NullSink\", expected a sequence"
    );
}

// ---- several errors at once ----

#[test]
fn errors_in_two_different_sources_are_both_reported() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\", chain: [DebugPrinter]}\n  - Valkey: {name: b, listen_addr: \"127.0.0.1:2\", chain: [{NullSink: {bogus: 1}}]}\n"
        ),
        format!(
            "invalid topology (2 errors):\n  \
             sources[1].chain[0].bogus: unknown field `bogus`, expected `name`\n  \
             sources[0].chain[0]: DebugPrinter is not a sink, but it ends the chain: {SINKS}"
        )
    );
}

#[test]
fn semantic_error_in_a_later_item_is_reported_when_an_earlier_item_fails_to_parse() {
    assert_eq!(
        errors_of(&with_chain(
            "[{Bogus: {}}, DebugPrinter, {Coalesce: {}}, {RedisSinkSingle: {remote_address: nowhere}}]"
        )),
        format!(
            "invalid topology (3 errors):\n  \
             sources[0].chain[0]: unknown transform `Bogus`, expected one of: {KINDS}\n  \
             sources[0].chain[2]: set at least one of `flush_when_buffered_message_count` and `flush_when_millis_since_last_flush`\n  \
             sources[0].chain[3].remoteAddress: `nowhere` is not an address: expected host:port, for example 127.0.0.1:6379 or redis.default.svc:6379"
        )
    );
}

#[test]
fn source_with_unparsable_fields_still_has_its_chain_checked() {
    assert_eq!(
        errors_of(
            "sources:\n  - Redis: {name: a, listen_addr: \"127.0.0.1:1\", connection_limit: many, chain: [NullSink, DebugPrinter]}\n"
        ),
        format!(
            "invalid topology (3 errors):\n  \
             sources[0].connection_limit: invalid type: string \"many\", expected usize\n  \
             sources[0].chain[0]: NullSink is a sink in the middle of the chain: the 1 transform(s) after it would never run\n  \
             sources[0].chain[1]: DebugPrinter is not a sink, but it ends the chain: {SINKS}"
        )
    );
}

#[test]
fn a_file_with_many_mistakes_reports_them_all_at_once() {
    let yaml = r#"
sources:
  - Valkey:
      name: "main"
      listen_addr: "0.0.0.0:6379"
      connection_limit: 0
      chain:
        - QueryTypeFilter:
            DenyList: [Read]
            AllowList: [Write]
        - Tee:
            behavior:
              SubchainOnMismatch:
                - DebugPrinter
            chain:
              - NullSink:
                  name: "main"
        - ValkeySinkSingle:
            remote_address: "valkey:6379"
            connect_timeout: 100
  - Valkey:
      name: "main"
      listen_addr: "0.0.0.0:6379"
      chain:
        - NullSink
        - Coalesce
        - Kafka
        - DebugPrinter
logging: debug
"#;
    assert_eq!(
        errors_of(yaml),
        format!(
            "invalid topology (12 errors):\n  \
             logging: unknown field, expected `sources`\n  \
             sources[0].chain[2].connect_timeout: unknown field `connect_timeout`, expected one of `name`, `remoteAddress`, `remote_address`, `connectTimeoutMs`, `connect_timeout_ms`, `tls`, `connectionCount`, `connection_count`, `readTimeout`, `read_timeout`, `maxBufferedReplyBytes`, `max_buffered_reply_bytes`\n  \
             sources[1].chain[2]: unknown transform `Kafka`, expected one of: {KINDS}\n  \
             sources[0].connectionLimit: must be at least 1\n  \
             sources[0].chain[0]: set exactly one of `AllowList` and `DenyList`, not both\n  \
             sources[0].chain[1].chain[0].name: duplicate name `main`, already used at sources[0]\n  \
             sources[0].chain[1].behavior.SubchainOnMismatch.chain[0]: DebugPrinter is not a sink, but it ends the chain: {SINKS}\n  \
             sources[1].name: duplicate name `main`, already used at sources[0]\n  \
             sources[1].listenAddr: `0.0.0.0:6379` is already the address of sources[0]\n  \
             sources[1].chain[0]: NullSink is a sink in the middle of the chain: the 3 transform(s) after it would never run\n  \
             sources[1].chain[1]: set at least one of `flush_when_buffered_message_count` and `flush_when_millis_since_last_flush`\n  \
             sources[1].chain[3]: DebugPrinter is not a sink, but it ends the chain: {SINKS}"
        )
    );
}

#[test]
fn error_count_is_singular_for_one_error() {
    let e = TopologyErrors::new(vec![ConfigError::new("", "not valid YAML: x")]);
    assert_eq!(
        e.to_string(),
        "invalid topology (1 error):\n  not valid YAML: x"
    );
    let e = TopologyErrors::new(vec![ConfigError::new("a", "b"), ConfigError::new("c", "d")]);
    assert_eq!(
        e.to_string(),
        "invalid topology (2 errors):\n  a: b\n  c: d"
    );
}

#[test]
fn upstream_07_query_counter_name_is_the_counter_name() {
    let t = load_topology(&with_chain(
        "[{QueryCounter: {name: \"DR chain\"}}, NullSink]",
    ))
    .expect("upstream 0.7 spelling loads");
    match &redis_source(&t, 0).chain[0] {
        TransformConfig::QueryCounter(c) => assert_eq!(c.counter(), Some("DR chain")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_transform_of_the_wrong_protocol_is_reported() {
    let errors = load_topology(
        "sources:\n  - Cassandra:\n      name: c\n      listen_addr: \"127.0.0.1:9042\"\n      chain:\n        - Tee: {behavior: FailOnMismatch, chain: [NullSink]}\n        - RedisSinkSingle: {remote_address: \"127.0.0.1:6379\"}\n  - Redis:\n      name: r\n      listen_addr: \"127.0.0.1:6379\"\n      chain:\n        - CassandraSinkSingle: {remote_address: \"127.0.0.1:9042\"}\n",
    )
    .expect_err("transforms of the other protocol");
    assert_eq!(
        errors.to_string(),
        "invalid topology (3 errors):\n  \
         sources[0].chain[0]: Tee works on Redis but this chain carries Cassandra\n  \
         sources[0].chain[1]: RedisSinkSingle works on Redis but this chain carries Cassandra\n  \
         sources[1].chain[0]: CassandraSinkSingle works on Cassandra but this chain carries Redis"
    );
}

#[test]
fn a_cassandra_chain_loads_with_upstream_field_names() {
    let topology = load_topology(
        "sources:\n  - Cassandra:\n      name: cql\n      listen_addr: \"127.0.0.1:9042\"\n      chain:\n        - RequestThrottling: {max_requests_per_second: 100}\n        - CassandraPeersRewrite: {port: 9043}\n        - QueryCounter: {name: q}\n        - Tee: {chain: [NullSink]}\n        - CassandraSinkSingle:\n            remote_address: \"127.0.0.1:19042\"\n            connect_timeout_ms: 500\n            read_timeout: 10\n",
    )
    .expect("valid");
    let chain = topology.sources[0].chain();
    match &chain[1] {
        TransformConfig::CassandraPeersRewrite(c) => assert_eq!(c.port, 9043),
        other => panic!("{other:?}"),
    }
    match &chain[4] {
        TransformConfig::CassandraSinkSingle(c) => {
            assert_eq!(c.remote_address, "127.0.0.1:19042");
            assert_eq!((c.connect_timeout_ms, c.read_timeout), (500, Some(10)));
        }
        other => panic!("{other:?}"),
    }
    match &chain[0] {
        TransformConfig::RequestThrottling(c) => assert_eq!(c.max_requests_per_second, 100),
        other => panic!("{other:?}"),
    }
}

#[test]
fn cassandra_sink_and_throttling_fields_are_checked() {
    let errors = load_topology(
        "sources:\n  - Cassandra:\n      name: cql\n      listen_addr: \"127.0.0.1:9042\"\n      chain:\n        - RequestThrottling: {max_requests_per_second: 0}\n        - CassandraSinkSingle: {remote_address: \"nope\", connect_timeout_ms: 0, read_timeout: 0}\n",
    )
    .expect_err("bad fields");
    assert_eq!(
        errors.to_string(),
        "invalid topology (4 errors):\n  \
         sources[0].chain[0].maxRequestsPerSecond: must be at least 1\n  \
         sources[0].chain[1].remoteAddress: `nope` is not an address: expected host:port, for example 127.0.0.1:6379 or redis.default.svc:6379\n  \
         sources[0].chain[1].connectTimeoutMs: must be at least 1\n  \
         sources[0].chain[1].readTimeout: must be at least 1 second (omit it to wait as long as the server takes)"
    );
}

#[test]
fn transport_is_only_for_cassandra_sources() {
    let errors = load_topology(
        "sources:\n  - Redis:\n      name: r\n      listen_addr: \"127.0.0.1:6379\"\n      transport: Tcp\n      chain: [NullSink]\n",
    )
    .expect_err("transport on Redis");
    assert_eq!(
        errors.to_string(),
        "invalid topology (1 error):\n  sources[0].transport: only Cassandra sources have a transport"
    );
}

#[test]
fn numbers_too_large_to_mean_anything_are_refused() {
    let errors = load_topology(
        "sources:\n  - Redis:\n      name: r\n      listen_addr: \"127.0.0.1:6379\"\n      connection_limit: 99999999999\n      timeout: 99999999999\n      chain:\n        - Tee: {buffer_size: 99999999999, chain: [NullSink]}\n        - NullSink\n",
    )
    .expect_err("absurd values");
    assert_eq!(
        errors.to_string(),
        "invalid topology (3 errors):\n  \
         sources[0].connectionLimit: must be at most 1000000000\n  \
         sources[0].timeout: must be at most 31536000\n  \
         sources[0].chain[0].bufferSize: must be at most 1000000"
    );
}

#[test]
fn the_example_topologies_load() {
    for (name, yaml) in [
        (
            "redis-passthrough",
            include_str!("../../../examples/redis-passthrough/topology.yaml"),
        ),
        (
            "cassandra-passthrough",
            include_str!("../../../examples/cassandra-passthrough/topology.yaml"),
        ),
    ] {
        let topology = load_topology(yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!topology.sources.is_empty(), "{name}");
    }
}

#[test]
fn connection_count_loads_in_both_spellings_and_is_bounded() {
    let t = loaded(&with_chain(
        "[{RedisSinkSingle: {remote_address: \"h:1\", connection_count: 2}}]",
    ));
    match &redis_source(&t, 0).chain[0] {
        TransformConfig::RedisSinkSingle(c) => assert_eq!(c.connection_count, Some(2)),
        other => panic!("{other:?}"),
    }
    let t = loaded(&with_chain(
        "[{RedisSinkSingle: {remoteAddress: \"h:1\", connectionCount: 64}}]",
    ));
    match &redis_source(&t, 0).chain[0] {
        TransformConfig::RedisSinkSingle(c) => assert_eq!(c.connection_count, Some(64)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        errors_of(&with_chain(
            "[{RedisSinkSingle: {remote_address: \"h:1\", connection_count: 0}}]"
        )),
        "invalid topology (1 error):\n  sources[0].chain[0].connectionCount: must be at least 1 (omit it for one upstream connection per client connection)"
    );
    assert_eq!(
        errors_of(&with_chain(
            "[{RedisSinkSingle: {remote_address: \"h:1\", connection_count: 65}}]"
        )),
        "invalid topology (1 error):\n  sources[0].chain[0].connectionCount: must be at most 64"
    );
}

#[test]
fn redis_read_timeout_and_reply_cap_load_and_are_bounded() {
    let t = loaded(&with_chain(
        "[{RedisSinkSingle: {remote_address: \"h:1\", read_timeout: 5, max_buffered_reply_bytes: 1048576}}]",
    ));
    match &redis_source(&t, 0).chain[0] {
        TransformConfig::RedisSinkSingle(c) => {
            assert_eq!(c.read_timeout, Some(5));
            assert_eq!(c.max_buffered_reply_bytes, Some(1048576));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        errors_of(&with_chain(
            "[{RedisSinkSingle: {remoteAddress: \"h:1\", readTimeout: 0, maxBufferedReplyBytes: 1000}}]"
        )),
        "invalid topology (2 errors):\n  sources[0].chain[0].readTimeout: must be at least 1 second (omit it to wait as long as the server takes)\n  sources[0].chain[0].maxBufferedReplyBytes: must be at least 65536 bytes"
    );
}

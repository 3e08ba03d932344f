//! Transform configs: one variant per transform, in upstream Shotover's spelling.
//!
//! Adding a transform: its config struct and one variant here, one arm in each `match` below,
//! and its implementation in the proxy's `transforms/`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::topology::{Protocol, TlsConnectorConfig};

/// One step of a chain. Written `- Kind: {fields}`; in a topology file a transform without
/// fields may be written `- Kind` alone (`- Kind: {}` in a ShotoverTopology). Every transform takes an optional `name`, unique in the topology,
/// which names it in logs and metrics (it defaults to the kind).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum TransformConfig {
    /// Sends every request to one Redis server over one upstream connection per client
    /// connection (upstream's `ValkeySinkSingle`).
    #[serde(alias = "ValkeySinkSingle")]
    RedisSinkSingle(RedisSinkSingleConfig),
    /// Sends every request to the master of its slot in a Redis Cluster, over connections to
    /// each node shared by all client connections (upstream's `ValkeySinkCluster`). Hides the
    /// cluster: clients see one Redis.
    #[serde(alias = "ValkeySinkCluster")]
    RedisSinkCluster(RedisSinkClusterConfig),
    /// Rewrites the ports in `CLUSTER SLOTS`, `CLUSTER NODES`, `CLUSTER SHARDS` replies and in
    /// `MOVED`/`ASK` errors, so that cluster-aware clients talk to the proxies (upstream's
    /// `ValkeyClusterPortsRewrite`).
    #[serde(alias = "ValkeyClusterPortsRewrite")]
    RedisClusterPortsRewrite(RedisClusterPortsRewriteConfig),
    /// Sends every CQL request to one Cassandra node over one upstream connection per client
    /// connection, with the client's own handshake, stream ids and compression.
    CassandraSinkSingle(CassandraSinkSingleConfig),
    /// Rewrites `native_port` in the `system.peers_v2` rows a node returns, so that drivers
    /// discovering the other nodes connect to their proxies instead of to the nodes.
    CassandraPeersRewrite(CassandraPeersRewriteConfig),
    /// Lets through at most `max_requests_per_second` requests per second across all
    /// connections of the source; the rest are answered with an Overloaded error.
    RequestThrottling(RequestThrottlingConfig),
    /// Answers every request with an error reply without sending it anywhere.
    NullSink(NamedConfig),
    /// Logs every request and response at INFO.
    DebugPrinter(NamedConfig),
    /// Answers every request with a fixed reply, or fails the connection.
    DebugReturner(DebugReturnerConfig),
    /// Parses the requests and/or responses passing through (Redis: the RESP value; CQL: the
    /// header and the decompressed body) and passes them on unchanged: what parsing costs.
    DebugForceParse(DebugForceParseConfig),
    /// Parses the requests and/or responses passing through and sends on their re-encoding
    /// instead of the bytes read (Redis: the RESP value encoded again; CQL: the header
    /// encoded again and the body compressed again with the connection's compression): a
    /// check that messages survive the proxy's codecs.
    DebugForceEncode(DebugForceEncodeConfig),
    /// Counts requests by command in `shotover_query_count`.
    QueryCounter(QueryCounterConfig),
    /// Lets through only requests of the allowed query types; the others get an error reply.
    QueryTypeFilter(QueryTypeFilterConfig),
    /// Holds requests back until enough are buffered or enough time has passed, then sends
    /// them on together.
    Coalesce(CoalesceConfig),
    /// Sends every request down a second chain too (dual write), optionally comparing the
    /// answers.
    Tee(TeeConfig),
}

/// Config of a transform that has no settings besides its name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NamedConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisSinkSingleConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The Redis server, `host:port`.
    #[serde(alias = "remote_address")]
    pub remote_address: String,
    /// How long to wait for the TCP (and TLS) connection to the server, in milliseconds.
    #[serde(alias = "connect_timeout_ms", default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// TLS towards the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConnectorConfig>,
    /// Share upstream connections between client connections: the requests of all clients
    /// travel over at most this many connections per lane (credentials, protocol and
    /// database), batched into one write. Clients whose session needs a connection of their
    /// own (transactions, subscriptions, blocking commands, MONITOR, CLIENT REPLY OFF,
    /// CLIENT TRACKING) get one while they need it. Omit it for one upstream connection per
    /// client connection (from 1 to 64).
    #[serde(
        alias = "connection_count",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub connection_count: Option<usize>,
    /// Fail the requests waiting for replies when this many seconds pass with nothing at all
    /// arriving from the server (default: wait as long as the server takes). Blocking
    /// commands (`BLPOP`, `XREAD BLOCK`, ...) and subscriptions are exempt while they wait.
    /// On a connection of the client's own, its waiting requests get `-ERR` and the client
    /// connection is closed; on a shared connection (limit plus 1 s, the longest WAIT it
    /// carries), the requests in flight on it get `-ERR` and the clients stay connected.
    #[serde(
        alias = "read_timeout",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub read_timeout: Option<u64>,
    /// Most reply bytes held for one client connection (default 4 MiB; at least 64 KiB; one
    /// reply larger than this is passed on by itself). Past it the proxy stops reading that
    /// client's replies until the client has read what is held, so a client that pipelines
    /// large values and reads slowly makes Redis hold them, not the proxy. On a shared
    /// connection, a client whose held replies stay at the cap for a second is
    /// disconnected, so that it cannot stall the clients it shares the connection with.
    /// An extension of this project.
    #[serde(
        alias = "max_buffered_reply_bytes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_buffered_reply_bytes: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisSinkClusterConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Nodes of the cluster, `host:port`, asked for the slot map (`CLUSTER SLOTS`) in turn
    /// until one answers. The other nodes are learnt from the map.
    #[serde(alias = "first_contact_points")]
    pub first_contact_points: Vec<String>,
    /// Do not hide the cluster: commands without a key go to this node alone (its `CLUSTER`
    /// replies, `INFO`, `DBSIZE`, ...), as for a cluster-aware client talking to that node.
    /// Commands with keys still go to their slot's master.
    #[serde(
        alias = "direct_destination",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub direct_destination: Option<String>,
    /// Connections to each node, shared by every client connection (default 1, at most 64).
    /// A client whose session needs a connection of its own (a subscription, a blocking
    /// command, WATCH) gets one to the node concerned while it needs it.
    #[serde(
        alias = "connection_count",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub connection_count: Option<usize>,
    /// How long to wait for the TCP (and TLS) connection to a node, in milliseconds.
    #[serde(alias = "connect_timeout_ms", default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// TLS towards the nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConnectorConfig>,
    /// Fail the requests in flight to a node when this many seconds pass with nothing at all
    /// arriving from it (default: wait as long as it takes); the clients stay connected.
    /// An extension of this project.
    #[serde(
        alias = "read_timeout",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub read_timeout: Option<u64>,
    /// Send read-only commands outside transactions to a replica of their slot's master
    /// (round robin over its replicas, over connections that sent `READONLY`). Replicas lag:
    /// a read may not see a write just acknowledged. Off by default. An extension of this
    /// project.
    #[serde(
        alias = "read_from_replicas",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub read_from_replicas: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RedisClusterPortsRewriteConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port written over every node's port: the port the proxies listen on.
    #[serde(alias = "new_port")]
    pub new_port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CassandraSinkSingleConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The Cassandra node, `host:port`.
    #[serde(alias = "remote_address")]
    pub remote_address: String,
    /// How long to wait for the TCP (and TLS) connection to the node, in milliseconds.
    #[serde(alias = "connect_timeout_ms", default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Fail the connection when a request has waited this many seconds for its answer with
    /// nothing at all arriving from the node (default: wait as long as the node takes). The
    /// client gets a Server error for every request in flight and its connection is closed.
    #[serde(
        alias = "read_timeout",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub read_timeout: Option<u64>,
    /// TLS towards the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConnectorConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CassandraPeersRewriteConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port written into `native_port`: the port the proxies listen on.
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestThrottlingConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Requests per second let through, shared by every connection of the chain; bursts of
    /// up to this many are allowed. A CQL BATCH counts as one request per statement in it.
    #[serde(alias = "max_requests_per_second")]
    pub max_requests_per_second: u32,
}

fn default_connect_timeout_ms() -> u64 {
    3000
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DebugReturnerConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Answer every request with this bulk string (upstream's `Valkey:` is accepted too).
    #[serde(
        rename = "Redis",
        alias = "Valkey",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub redis: Option<String>,
    /// Fail every batch: the client gets an error reply for each pending request and its
    /// connection is closed. Written `DebugReturner: Fail`.
    #[serde(rename = "Fail", default, skip_serializing_if = "std::ops::Not::not")]
    pub fail: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DebugForceParseConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parse every request.
    #[serde(alias = "parse_requests")]
    pub parse_requests: bool,
    /// Parse every response.
    #[serde(alias = "parse_responses")]
    pub parse_responses: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DebugForceEncodeConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parse and re-encode every request.
    #[serde(alias = "encode_requests")]
    pub encode_requests: bool,
    /// Parse and re-encode every response.
    #[serde(alias = "encode_responses")]
    pub encode_responses: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QueryCounterConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The `name` label of `shotover_query_count`. Upstream Shotover 0.7 and earlier wrote
    /// it as `name`; such a file still loads, and its `name` is then the counter's name.
    #[serde(
        alias = "counter_name",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub counter_name: Option<String>,
}

/// What a request does, for filtering and counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum QueryType {
    /// Reads data (GET, MGET, HGETALL, SCAN, ...).
    Read,
    /// Changes data or server state; every command not otherwise classified.
    Write,
    /// Reads and writes in one command (GETSET, GETDEL, GETEX).
    ReadWrite,
    /// Changes the schema (CQL DDL; no Redis command is classified so).
    SchemaChange,
    /// Subscribes or unsubscribes (SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE and their UN- forms).
    PubSubMessage,
}

impl QueryType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::Read => "Read",
            QueryType::Write => "Write",
            QueryType::ReadWrite => "ReadWrite",
            QueryType::SchemaChange => "SchemaChange",
            QueryType::PubSubMessage => "PubSubMessage",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryTypeFilterConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Only these query types pass. Set exactly one of `AllowList` and `DenyList`.
    #[serde(rename = "AllowList", default, skip_serializing_if = "Option::is_none")]
    pub allow_list: Option<Vec<QueryType>>,
    /// These query types are refused. Set exactly one of `AllowList` and `DenyList`.
    #[serde(rename = "DenyList", default, skip_serializing_if = "Option::is_none")]
    pub deny_list: Option<Vec<QueryType>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CoalesceConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Send the held requests on once this many are buffered.
    #[serde(
        alias = "flush_when_buffered_message_count",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub flush_when_buffered_message_count: Option<usize>,
    /// Send the held requests on once this many milliseconds have passed since the last
    /// flush (a timer fires even when no new request arrives).
    #[serde(
        alias = "flush_when_millis_since_last_flush",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub flush_when_millis_since_last_flush: Option<u64>,
}

/// Default for Tee's `bufferSize`, as upstream Shotover.
pub const DEFAULT_TEE_BUFFER_SIZE: usize = 5;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TeeConfig {
    /// Name of this transform in logs and metrics (default: the transform's kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What to do with the tee chain's answers: `Ignore` (default), `FailOnMismatch`,
    /// `LogWarningOnMismatch`, or `{SubchainOnMismatch: {name, chain}}`.
    #[serde(default)]
    #[schemars(schema_with = "crate::schema::opaque")]
    pub behavior: TeeBehavior,
    /// How long to wait for the tee chain's answers when comparing them, in microseconds
    /// (default: no limit). When it expires the batch counts as a mismatch.
    #[serde(
        alias = "timeout_micros",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_micros: Option<u64>,
    /// With `behavior: Ignore`: how many batches may wait for the tee chain; when it is
    /// full, new batches are not sent to it and are counted in
    /// `shotover_tee_dropped_messages_count` (default 5).
    #[serde(
        alias = "buffer_size",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub buffer_size: Option<usize>,
    /// Port of an HTTP API (`GET`/`PUT /transform/tee/result-source`, values `regular-chain`
    /// or `tee-chain`) that switches which chain's answers go back to the client.
    #[serde(
        alias = "switch_port",
        alias = "http_api_port",
        alias = "httpApiPort",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub switch_port: Option<u16>,
    /// The tee chain: every request is sent down it too. It ends in a sink.
    #[schemars(schema_with = "crate::schema::opaque_chain")]
    pub chain: Vec<TransformConfig>,
}

/// What Tee does with the answers of its chain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum TeeBehavior {
    /// Send to the tee chain in the background and drop its answers.
    #[default]
    Ignore,
    /// Compare; on a mismatch every request of the batch gets an error reply.
    FailOnMismatch,
    /// Compare; on a mismatch log a WARN (the client gets the regular answers).
    LogWarningOnMismatch,
    /// Compare; on a mismatch also send the batch down this chain.
    SubchainOnMismatch(SubchainConfig),
}

/// A named sub-chain (upstream 0.7 wrote the list alone; both forms load).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubchainConfig {
    /// Name of the sub-chain in logs and metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The transforms, ending in a sink.
    pub chain: Vec<TransformConfig>,
}

impl QueryCounterConfig {
    /// The counter's name: `counterName`, else (upstream 0.7's spelling) `name`.
    pub fn counter(&self) -> Option<&str> {
        self.counter_name.as_deref().or(self.name.as_deref())
    }
}

impl TransformConfig {
    /// Every accepted kind name (canonical and upstream aliases).
    pub const KINDS: &'static [&'static str] = &[
        "RedisSinkSingle",
        "ValkeySinkSingle",
        "RedisSinkCluster",
        "ValkeySinkCluster",
        "RedisClusterPortsRewrite",
        "ValkeyClusterPortsRewrite",
        "CassandraSinkSingle",
        "CassandraPeersRewrite",
        "RequestThrottling",
        "NullSink",
        "DebugPrinter",
        "DebugReturner",
        "DebugForceParse",
        "DebugForceEncode",
        "QueryCounter",
        "QueryTypeFilter",
        "Coalesce",
        "Tee",
    ];

    /// The canonical kind name.
    pub fn kind(&self) -> &'static str {
        match self {
            TransformConfig::RedisSinkSingle(_) => "RedisSinkSingle",
            TransformConfig::RedisSinkCluster(_) => "RedisSinkCluster",
            TransformConfig::RedisClusterPortsRewrite(_) => "RedisClusterPortsRewrite",
            TransformConfig::CassandraSinkSingle(_) => "CassandraSinkSingle",
            TransformConfig::CassandraPeersRewrite(_) => "CassandraPeersRewrite",
            TransformConfig::RequestThrottling(_) => "RequestThrottling",
            TransformConfig::NullSink(_) => "NullSink",
            TransformConfig::DebugPrinter(_) => "DebugPrinter",
            TransformConfig::DebugReturner(_) => "DebugReturner",
            TransformConfig::DebugForceParse(_) => "DebugForceParse",
            TransformConfig::DebugForceEncode(_) => "DebugForceEncode",
            TransformConfig::QueryCounter(_) => "QueryCounter",
            TransformConfig::QueryTypeFilter(_) => "QueryTypeFilter",
            TransformConfig::Coalesce(_) => "Coalesce",
            TransformConfig::Tee(_) => "Tee",
        }
    }

    /// The user-given name, if any.
    pub fn explicit_name(&self) -> Option<&str> {
        match self {
            TransformConfig::RedisSinkSingle(c) => c.name.as_deref(),
            TransformConfig::RedisSinkCluster(c) => c.name.as_deref(),
            TransformConfig::RedisClusterPortsRewrite(c) => c.name.as_deref(),
            TransformConfig::CassandraSinkSingle(c) => c.name.as_deref(),
            TransformConfig::CassandraPeersRewrite(c) => c.name.as_deref(),
            TransformConfig::RequestThrottling(c) => c.name.as_deref(),
            TransformConfig::NullSink(c) | TransformConfig::DebugPrinter(c) => c.name.as_deref(),
            TransformConfig::DebugReturner(c) => c.name.as_deref(),
            TransformConfig::DebugForceParse(c) => c.name.as_deref(),
            TransformConfig::DebugForceEncode(c) => c.name.as_deref(),
            TransformConfig::QueryCounter(c) => c.name.as_deref(),
            TransformConfig::QueryTypeFilter(c) => c.name.as_deref(),
            TransformConfig::Coalesce(c) => c.name.as_deref(),
            TransformConfig::Tee(c) => c.name.as_deref(),
        }
    }

    /// The name used in logs and metrics: the given name, else the kind.
    pub fn name(&self) -> &str {
        self.explicit_name().unwrap_or(self.kind())
    }

    /// Whether this transform ends a chain (answers requests itself).
    pub fn is_sink(&self) -> bool {
        matches!(
            self,
            TransformConfig::RedisSinkSingle(_)
                | TransformConfig::RedisSinkCluster(_)
                | TransformConfig::CassandraSinkSingle(_)
                | TransformConfig::NullSink(_)
                | TransformConfig::DebugReturner(_)
        )
    }

    /// The protocols this transform works on; `None` means any.
    pub fn protocols(&self) -> Option<&'static [Protocol]> {
        match self {
            TransformConfig::RedisSinkSingle(_)
            | TransformConfig::RedisSinkCluster(_)
            | TransformConfig::RedisClusterPortsRewrite(_)
            | TransformConfig::DebugReturner(_) => Some(&[Protocol::Redis]),
            TransformConfig::CassandraSinkSingle(_) | TransformConfig::CassandraPeersRewrite(_) => {
                Some(&[Protocol::Cassandra])
            }
            // Comparing answers and switching which chain answers need every answer of a
            // batch at once, which only in-order protocols give.
            TransformConfig::Tee(c)
                if c.behavior != TeeBehavior::Ignore || c.switch_port.is_some() =>
            {
                Some(&[Protocol::Redis])
            }
            TransformConfig::NullSink(_)
            | TransformConfig::DebugPrinter(_)
            | TransformConfig::DebugForceParse(_)
            | TransformConfig::DebugForceEncode(_)
            | TransformConfig::QueryCounter(_)
            | TransformConfig::QueryTypeFilter(_)
            | TransformConfig::RequestThrottling(_)
            | TransformConfig::Coalesce(_)
            | TransformConfig::Tee(_) => None,
        }
    }

    /// The sub-chains this transform runs, with the field path that holds each.
    pub fn sub_chains(&self) -> Vec<(&'static str, Option<&str>, &[TransformConfig])> {
        match self {
            TransformConfig::Tee(c) => {
                let mut out = vec![("chain", None, c.chain.as_slice())];
                if let TeeBehavior::SubchainOnMismatch(sub) = &c.behavior {
                    out.push((
                        "behavior.SubchainOnMismatch.chain",
                        sub.name.as_deref(),
                        sub.chain.as_slice(),
                    ));
                }
                out
            }
            _ => Vec::new(),
        }
    }
}

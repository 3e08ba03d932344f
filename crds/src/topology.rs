//! Sources and their settings: the top level of `topology.yaml`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::transform::TransformConfig;

/// A whole topology: the sources the proxy listens on, each with its chain of transforms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The listeners of the proxy. Each one owns a chain that every request it receives runs
    /// through, ending in a sink.
    pub sources: Vec<SourceConfig>,
}

impl Topology {
    /// `topology.yaml` for this topology, in the layout the loader and upstream Shotover read
    /// (`- Redis: {...}`; serde_yaml alone would write enum variants as YAML tags).
    pub fn to_yaml(&self) -> Result<String, String> {
        let value = serde_json::to_value(self).map_err(|e| e.to_string())?;
        serde_yaml::to_string(&value).map_err(|e| e.to_string())
    }
}

/// The wire protocol a source speaks and a transform accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Protocol {
    /// RESP2/RESP3, as spoken by Redis and Valkey.
    Redis,
    /// CQL, as spoken by Apache Cassandra.
    Cassandra,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Protocol::Redis => f.write_str("Redis"),
            Protocol::Cassandra => f.write_str("Cassandra"),
        }
    }
}

/// One source: a listener of one protocol. Written `- Redis: {...}` (topology files also
/// accept upstream Shotover's `Valkey` spelling; a ShotoverTopology takes the names shown here).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub enum SourceConfig {
    /// A Redis (RESP2/RESP3) listener.
    #[serde(alias = "Valkey")]
    Redis(ListenerConfig),
    /// A Cassandra (CQL protocol v3 and v4) listener.
    Cassandra(ListenerConfig),
}

impl SourceConfig {
    /// Names accepted for source kinds, canonical first.
    pub const KINDS: &'static [&'static str] = &["Redis", "Valkey", "Cassandra"];

    /// The settings every source kind has.
    pub fn listener(&self) -> &ListenerConfig {
        match self {
            SourceConfig::Redis(c) | SourceConfig::Cassandra(c) => c,
        }
    }

    pub fn listener_mut(&mut self) -> &mut ListenerConfig {
        match self {
            SourceConfig::Redis(c) | SourceConfig::Cassandra(c) => c,
        }
    }

    pub fn name(&self) -> &str {
        &self.listener().name
    }

    pub fn protocol(&self) -> Protocol {
        match self {
            SourceConfig::Redis(_) => Protocol::Redis,
            SourceConfig::Cassandra(_) => Protocol::Cassandra,
        }
    }

    pub fn chain(&self) -> &[TransformConfig] {
        &self.listener().chain
    }

    pub fn listen_addr(&self) -> &str {
        &self.listener().listen_addr
    }
}

/// The settings of a Redis source (the same as every source's).
pub type RedisSourceConfig = ListenerConfig;

/// Default for `connectionLimit`, as upstream Shotover.
pub const DEFAULT_CONNECTION_LIMIT: usize = 512;
/// Default for `maxFrameSizeBytes`: Redis's own `proto-max-bulk-len` (512 MiB) plus room for
/// the command around the value.
pub const DEFAULT_MAX_FRAME_SIZE_BYTES: usize = 512 * 1024 * 1024 + 64 * 1024;

/// Default for `maxFrameSizeBytes` of a Cassandra source: 256 MiB, the most Cassandra's
/// `native_transport_max_frame_size` has allowed.
pub const DEFAULT_CQL_MAX_FRAME_SIZE_BYTES: usize = 256 * 1024 * 1024;

/// A listener: the settings every source has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListenerConfig {
    /// Unique name of the source; it names the chain in logs and metrics (`chain` label).
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// Address to listen on, `ip:port` (for example `0.0.0.0:6379`).
    #[serde(alias = "listen_addr")]
    pub listen_addr: String,
    /// Most client connections served at once (default 512).
    #[serde(
        alias = "connection_limit",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub connection_limit: Option<usize>,
    /// When the limit is reached: `false` (default) queues new connections until a slot frees,
    /// `true` refuses them by closing the socket at once.
    #[serde(
        alias = "hard_connection_limit",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub hard_connection_limit: Option<bool>,
    /// Close a client connection idle for this many seconds (default: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Largest request frame accepted, in bytes (default 512 MiB + 64 KiB for Redis, 256 MiB
    /// for Cassandra). A larger frame gets a protocol error and its connection is closed;
    /// other connections go on.
    #[serde(
        alias = "max_frame_size_bytes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_frame_size_bytes: Option<usize>,
    /// Serve TLS to clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsAcceptorConfig>,
    /// Cassandra sources only: the transport, `Tcp` (upstream's only value; accepted for
    /// compatibility).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// The transforms every request runs through, in order; the last one is a sink.
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [{
        "rule": crate::schema::CHAIN_ENDS_IN_SINK_RULE,
        "message": crate::schema::CHAIN_ENDS_IN_SINK_MESSAGE,
    }]))]
    pub chain: Vec<TransformConfig>,
}

/// How a Cassandra source carries CQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Transport {
    Tcp,
}

/// TLS for a listener (the proxy is the server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsAcceptorConfig {
    /// PEM file with the server certificate chain.
    #[serde(alias = "certificate_path")]
    pub certificate_path: String,
    /// PEM file with the server's private key.
    #[serde(alias = "private_key_path")]
    pub private_key_path: String,
    /// PEM file of the CA that client certificates must chain to. When set, clients must
    /// present a valid certificate (mutual TLS).
    #[serde(
        alias = "certificate_authority_path",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub certificate_authority_path: Option<String>,
}

/// TLS towards an upstream (the proxy is the client).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TlsConnectorConfig {
    /// PEM file of the CA the upstream's certificate must chain to.
    #[serde(alias = "certificate_authority_path")]
    pub certificate_authority_path: String,
    /// PEM file with a client certificate chain, for upstreams that require one.
    #[serde(
        alias = "certificate_path",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub certificate_path: Option<String>,
    /// PEM file with the client certificate's private key.
    #[serde(
        alias = "private_key_path",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub private_key_path: Option<String>,
    /// Check that the upstream's certificate names the host in the sink's address
    /// (default true).
    #[serde(alias = "verify_hostname", default = "default_true")]
    pub verify_hostname: bool,
}

fn default_true() -> bool {
    true
}

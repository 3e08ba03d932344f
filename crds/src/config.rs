//! `config.yaml`: the proxy's process settings, in upstream Shotover's format.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Process settings of the proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Log filter in `tracing` EnvFilter syntax, for example `info` or
    /// `info,shotover::connection_span=debug` (which adds the client address to every event of a connection). It can be changed at run time with `PUT /filter`.
    #[serde(alias = "main_log_level")]
    pub main_log_level: String,
    /// `ip:port` of the HTTP listener for `/metrics`, `/filter`, `/ready` and `/live`.
    /// Omit it to run without one.
    #[serde(
        alias = "observability_interface",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub observability_interface: Option<String>,
    /// Process-wide budget, in bytes, for replies read from upstreams and not yet written to
    /// their clients (each connection also has its sink's own cap). Over it, every
    /// connection takes one reply at a time until it has written what it holds. Default:
    /// half the memory limit of the proxy's cgroup (a container's limit), or 1 GiB without
    /// one. An extension of this project; upstream Shotover has no such setting.
    #[serde(
        alias = "max_buffered_reply_bytes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_buffered_reply_bytes: Option<usize>,
    /// Process-wide budget, in bytes, for client requests read but not complete yet (large
    /// values arriving; each frame is also capped by its source's `max_frame_size_bytes`).
    /// A connection whose incomplete request takes the total over it gets a protocol error
    /// and is closed; buffers under 64 KiB never count. Default: a quarter of the memory
    /// limit of the proxy's cgroup, or 512 MiB without one. An extension of this project.
    #[serde(
        alias = "max_buffered_request_bytes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub max_buffered_request_bytes: Option<usize>,
}

impl ProxyConfig {
    /// Parses `config.yaml`.
    pub fn from_yaml(yaml: &str) -> Result<ProxyConfig, String> {
        let config: ProxyConfig = serde_yaml::from_str(yaml).map_err(|e| e.to_string())?;
        let localhost = |addr: &str| {
            addr.rsplit_once(':')
                .is_some_and(|(host, port)| host == "localhost" && port.parse::<u16>().is_ok())
        };
        if let Some(addr) = &config.observability_interface
            && addr.parse::<std::net::SocketAddr>().is_err()
            && !localhost(addr)
        {
            return Err(format!(
                "observability_interface: `{addr}` is not an address: expected ip:port, for example 0.0.0.0:9001"
            ));
        }
        Ok(config)
    }
}

/// The hash of a proxy's two files as the operator renders them and the proxy reports it
/// running (`/config`, `shotover_config_info`): SHA-256 of the topology, a zero byte and
/// the config (so moving bytes between them changes it), shortened to 16 hex digits.
pub fn config_hash(topology_yaml: &str, config_yaml: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::fmt::Write;
    let mut hasher = Sha256::new();
    hasher.update(topology_yaml.as_bytes());
    hasher.update([0u8]);
    hasher.update(config_yaml.as_bytes());
    let digest = hasher.finalize();
    let mut out = String::with_capacity(16);
    for byte in &digest[..8] {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

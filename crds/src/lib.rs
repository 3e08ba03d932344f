//! The ShotoverTopology API: the topology model shared by the proxy, the operator and the
//! webhook.
//!
//! It owns the serde + schemars types of `topology.yaml` (sources, chains, transform configs),
//! the loader that reads upstream Shotover's file format and collects every error with its
//! path, and the pure semantic validation. It never talks to Kubernetes and never runs a proxy.
//!
//! Field names are camelCase (the CRD's convention) and every multi-word field also accepts
//! upstream Shotover's snake_case spelling, so a Shotover user's `topology.yaml` loads unchanged.

pub mod config;
#[cfg(feature = "kube")]
pub mod crd;
pub mod load;
pub mod schema;
pub mod topology;
pub mod transform;
pub mod validate;

pub use config::{ProxyConfig, config_hash};
pub use load::{load_topology, parse_topology};
pub use topology::{
    ListenerConfig, Protocol, RedisSourceConfig, SourceConfig, TlsAcceptorConfig,
    TlsConnectorConfig, Topology,
};
pub use transform::TransformConfig;
pub use validate::{ConfigError, TopologyErrors, tls_files, validate};

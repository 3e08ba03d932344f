//! Every transform, and the one place that turns a transform config into its builder.

pub mod cassandra_peers_rewrite;
pub mod cassandra_sink_single;
pub mod coalesce;
pub mod debug_force;
pub mod debug_printer;
pub mod debug_returner;
pub mod null_sink;
pub mod query_counter;
pub mod query_type_filter;
pub mod redis_cluster_ports_rewrite;
pub mod redis_sink_cluster;
pub mod redis_sink_single;
pub mod request_throttling;
pub mod tee;

use anyhow::{Context, Result};
use shotover_crds::TransformConfig;

use crate::chain::{TransformBuilder, TransformChainBuilder};

/// Builds a chain's builders from its config; errors name the chain and the transform.
pub fn build_chain(chain_name: &str, configs: &[TransformConfig]) -> Result<TransformChainBuilder> {
    let mut builders = Vec::with_capacity(configs.len());
    for (i, config) in configs.iter().enumerate() {
        let builder = build_transform(chain_name, config).with_context(|| {
            format!(
                "chain `{chain_name}`, transform {i} `{}` ({})",
                config.name(),
                config.kind()
            )
        })?;
        builders.push((config.name().to_string(), builder));
    }
    Ok(TransformChainBuilder::new(chain_name, builders))
}

fn build_transform(chain: &str, config: &TransformConfig) -> Result<Box<dyn TransformBuilder>> {
    Ok(match config {
        TransformConfig::RedisSinkSingle(c) => {
            Box::new(redis_sink_single::RedisSinkSingleBuilder::new(c, chain)?)
        }
        TransformConfig::RedisSinkCluster(c) => {
            Box::new(redis_sink_cluster::RedisSinkClusterBuilder::new(c, chain)?)
        }
        TransformConfig::RedisClusterPortsRewrite(c) => {
            Box::new(redis_cluster_ports_rewrite::RedisClusterPortsRewriteBuilder::new(c))
        }
        TransformConfig::CassandraSinkSingle(c) => Box::new(
            cassandra_sink_single::CassandraSinkSingleBuilder::new(c, chain)?,
        ),
        TransformConfig::CassandraPeersRewrite(c) => Box::new(
            cassandra_peers_rewrite::CassandraPeersRewriteBuilder::new(c),
        ),
        TransformConfig::RequestThrottling(c) => {
            Box::new(request_throttling::RequestThrottlingBuilder::new(c, chain))
        }
        TransformConfig::NullSink(_) => Box::new(null_sink::NullSinkBuilder),
        TransformConfig::DebugPrinter(c) => Box::new(debug_printer::DebugPrinterBuilder::new(c)),
        TransformConfig::DebugReturner(c) => Box::new(debug_returner::DebugReturnerBuilder::new(c)),
        TransformConfig::DebugForceParse(c) => {
            Box::new(debug_force::DebugForceBuilder::parse(c, chain))
        }
        TransformConfig::DebugForceEncode(c) => {
            Box::new(debug_force::DebugForceBuilder::encode(c, chain))
        }
        TransformConfig::QueryCounter(c) => Box::new(query_counter::QueryCounterBuilder::new(c)),
        TransformConfig::QueryTypeFilter(c) => {
            Box::new(query_type_filter::QueryTypeFilterBuilder::new(c))
        }
        TransformConfig::Coalesce(c) => Box::new(coalesce::CoalesceBuilder::new(c)),
        TransformConfig::Tee(c) => Box::new(tee::TeeBuilder::new(c, chain)?),
    })
}

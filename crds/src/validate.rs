//! Semantic validation of a topology, shared by the proxy, the operator and the webhook.
//!
//! Every problem is collected with its path (`sources[0].chain[2]`) and reported at once.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;

use crate::topology::{Protocol, SourceConfig, TlsConnectorConfig, Topology};
use crate::transform::{TeeBehavior, TransformConfig};

/// One problem in a topology, at a path such as `sources[0].chain[2].remoteAddress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a topology.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TopologyErrors {
    pub errors: Vec<ConfigError>,
}

impl TopologyErrors {
    pub fn new(errors: Vec<ConfigError>) -> Self {
        TopologyErrors { errors }
    }
}

impl fmt::Display for TopologyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "invalid topology ({n} error{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// A source as far as it parsed: the loader keeps going past broken items so that the
/// semantic checks still run on the rest.
#[derive(Debug, Clone)]
pub(crate) struct PartialSource {
    /// The source's own fields (`None` if they did not parse); its chain is in `chain`.
    pub config: Option<SourceConfig>,
    /// The chain items; `None` for an item that did not parse.
    pub chain: Vec<Option<TransformConfig>>,
}

impl PartialSource {
    pub fn into_complete(self) -> Option<SourceConfig> {
        let chain: Option<Vec<TransformConfig>> = self.chain.into_iter().collect();
        let mut config = self.config?;
        config.listener_mut().chain = chain?;
        Some(config)
    }
}

/// Checks a parsed topology; `Ok` when it can run.
pub fn validate(topology: &Topology) -> Result<(), TopologyErrors> {
    let partial: Vec<PartialSource> = topology
        .sources
        .iter()
        .map(|s| PartialSource {
            config: Some(s.clone()),
            chain: s.chain().iter().cloned().map(Some).collect(),
        })
        .collect();
    let errors = validate_partial(&partial);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(TopologyErrors::new(errors))
    }
}

/// Upper bounds of numeric fields.
// Upstream test topologies use 3,000,000; tokio's semaphore takes up to 2^61.
const MAX_CONNECTIONS: u64 = 1_000_000_000;
/// Most shared upstream connections per lane of a Redis sink.
pub const MAX_SHARED_CONNECTIONS: u64 = 64;
const MAX_IDLE_SECONDS: u64 = 365 * 24 * 3600;
const MAX_FRAME_BYTES: u64 = 4 * 1024 * 1024 * 1024;
const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// Longest Coalesce flush interval: a year. Upstream's own `cluster-dr` test topology sets
/// 1 000 000 000 ms ("unreasonably large") to mean "flush by count only".
const MAX_FLUSH_INTERVAL_MS: u64 = 365 * 24 * 3_600_000;
const MAX_QUEUE: u64 = 1_000_000;
/// Smallest per-connection reply cap of a Redis sink.
pub const MIN_REPLY_BUFFER: usize = 64 * 1024;

struct Checker {
    errors: Vec<ConfigError>,
    /// The TLS files named, with where: certificates, keys and CAs.
    files: Vec<(String, String)>,
    /// Every explicit name seen so far, with the path where it was first used.
    names: HashMap<String, String>,
    switch_ports: HashMap<u16, String>,
    listen_addrs: HashMap<String, String>,
}

pub(crate) fn validate_partial(sources: &[PartialSource]) -> Vec<ConfigError> {
    check_partial(sources).errors
}

/// The TLS files (certificates, keys, CAs) a topology names, each with where (`sources[0].tls.
/// certificatePath`, `sources[0].chain[1].RedisSinkSingle.tls.certificateAuthorityPath`), in
/// topology order: what a reload watches, and what a Kubernetes mount must provide.
pub fn tls_files(topology: &Topology) -> Vec<(String, String)> {
    let partial: Vec<PartialSource> = topology
        .sources
        .iter()
        .map(|s| PartialSource {
            config: Some(s.clone()),
            chain: s.chain().iter().cloned().map(Some).collect(),
        })
        .collect();
    check_partial(&partial).files
}

fn check_partial(sources: &[PartialSource]) -> Checker {
    let mut c = Checker {
        errors: Vec::new(),
        files: Vec::new(),
        names: HashMap::new(),
        switch_ports: HashMap::new(),
        listen_addrs: HashMap::new(),
    };
    if sources.is_empty() {
        c.err("sources", "no sources: the proxy would listen on nothing");
    }
    for (i, source) in sources.iter().enumerate() {
        let path = format!("sources[{i}]");
        let protocol = source.config.as_ref().map(SourceConfig::protocol);
        if let Some(config) = &source.config {
            c.check_source(config, &path);
        }
        let items: Vec<Option<&TransformConfig>> =
            source.chain.iter().map(Option::as_ref).collect();
        c.check_chain(&items, &format!("{path}.chain"), protocol);
    }
    c
}

impl Checker {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(path, message));
    }

    fn claim_name(&mut self, name: &str, path: &str) {
        if name.is_empty() {
            self.err(format!("{path}.name"), "must not be empty");
            return;
        }
        if let Some(first) = self.names.get(name) {
            let msg = format!("duplicate name `{name}`, already used at {first}");
            self.err(format!("{path}.name"), msg);
        } else {
            self.names.insert(name.to_string(), path.to_string());
        }
    }

    fn check_source(&mut self, source: &SourceConfig, path: &str) {
        self.claim_name(source.name(), path);
        let r = source.listener();
        let addr_path = format!("{path}.listenAddr");
        if let Err(msg) = check_listen_addr(&r.listen_addr) {
            self.err(&addr_path, msg);
        } else if let Some(first) = self.listen_addrs.get(&r.listen_addr) {
            let msg = format!("`{}` is already the address of {first}", r.listen_addr);
            self.err(&addr_path, msg);
        } else {
            self.listen_addrs
                .insert(r.listen_addr.clone(), path.to_string());
        }
        if r.connection_limit == Some(0) {
            self.err(format!("{path}.connectionLimit"), "must be at least 1");
        }
        self.at_most(
            r.connection_limit.map(|v| v as u64),
            MAX_CONNECTIONS,
            format!("{path}.connectionLimit"),
        );
        self.at_most(r.timeout, MAX_IDLE_SECONDS, format!("{path}.timeout"));
        self.at_most(
            r.max_frame_size_bytes.map(|v| v as u64),
            MAX_FRAME_BYTES,
            format!("{path}.maxFrameSizeBytes"),
        );
        if r.timeout == Some(0) {
            self.err(
                format!("{path}.timeout"),
                "must be at least 1 second (omit it to never time out)",
            );
        }
        if let Some(size) = r.max_frame_size_bytes
            && size < 1024
        {
            self.err(format!("{path}.maxFrameSizeBytes"), "must be at least 1024");
        }
        if r.transport.is_some() && source.protocol() != Protocol::Cassandra {
            self.err(
                format!("{path}.transport"),
                "only Cassandra sources have a transport",
            );
        }
        if let Some(tls) = &r.tls {
            self.check_path(
                &tls.certificate_path,
                &format!("{path}.tls.certificatePath"),
            );
            self.check_path(&tls.private_key_path, &format!("{path}.tls.privateKeyPath"));
            if let Some(ca) = &tls.certificate_authority_path {
                self.check_path(ca, &format!("{path}.tls.certificateAuthorityPath"));
            }
        }
    }

    /// Values beyond these would overflow timers or allocate absurdly; nobody means them.
    fn at_most(&mut self, value: Option<u64>, max: u64, path: String) {
        if let Some(v) = value
            && v > max
        {
            self.err(path, format!("must be at most {max}"));
        }
    }

    fn check_path(&mut self, value: &str, path: &str) {
        if value.trim().is_empty() {
            self.err(path, "must not be empty");
        } else {
            self.files.push((path.to_owned(), value.to_owned()));
        }
    }

    fn check_chain(
        &mut self,
        items: &[Option<&TransformConfig>],
        path: &str,
        protocol: Option<Protocol>,
    ) {
        if items.is_empty() {
            self.err(path, "chain is empty: it must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)");
            return;
        }
        let last = items.len() - 1;
        for (i, item) in items.iter().enumerate() {
            let Some(t) = item else { continue };
            let item_path = format!("{path}[{i}]");
            if i == last && !t.is_sink() {
                let msg = format!(
                    "{} is not a sink, but it ends the chain: a chain must end in a sink (RedisSinkSingle, RedisSinkCluster, CassandraSinkSingle, NullSink or DebugReturner)",
                    describe(t)
                );
                self.err(&item_path, msg);
            }
            if i < last && t.is_sink() {
                let msg = format!(
                    "{} is a sink in the middle of the chain: the {} transform(s) after it would never run",
                    describe(t),
                    last - i
                );
                self.err(&item_path, msg);
            }
            if let (Some(protocol), Some(accepted)) = (protocol, t.protocols())
                && !accepted.contains(&protocol)
            {
                let accepted: Vec<String> = accepted.iter().map(ToString::to_string).collect();
                let msg = format!(
                    "{} works on {} but this chain carries {protocol}",
                    describe(t),
                    accepted.join(", ")
                );
                self.err(&item_path, msg);
            }
            self.check_transform(t, &item_path, protocol);
        }
    }

    fn read_timeout(&mut self, read_timeout: Option<u64>, path: &str) {
        if read_timeout == Some(0) {
            self.err(
                format!("{path}.readTimeout"),
                "must be at least 1 second (omit it to wait as long as the server takes)",
            );
        }
        self.at_most(
            read_timeout,
            MAX_IDLE_SECONDS,
            format!("{path}.readTimeout"),
        );
    }

    fn reply_buffer(&mut self, bytes: Option<usize>, path: &str) {
        if bytes.is_some_and(|b| b < MIN_REPLY_BUFFER) {
            self.err(
                format!("{path}.maxBufferedReplyBytes"),
                format!("must be at least {MIN_REPLY_BUFFER} bytes"),
            );
        }
        self.at_most(
            bytes.map(|v| v as u64),
            MAX_FRAME_BYTES,
            format!("{path}.maxBufferedReplyBytes"),
        );
    }

    fn check_transform(&mut self, t: &TransformConfig, path: &str, protocol: Option<Protocol>) {
        if let Some(name) = t.explicit_name() {
            self.claim_name(name, path);
        }
        match t {
            TransformConfig::RedisSinkSingle(c) => {
                self.check_sink(
                    &c.remote_address,
                    c.connect_timeout_ms,
                    c.tls.as_ref(),
                    path,
                );
                if c.connection_count == Some(0) {
                    self.err(
                        format!("{path}.connectionCount"),
                        "must be at least 1 (omit it for one upstream connection per client connection)",
                    );
                }
                self.at_most(
                    c.connection_count.map(|v| v as u64),
                    MAX_SHARED_CONNECTIONS,
                    format!("{path}.connectionCount"),
                );
                self.read_timeout(c.read_timeout, path);
                self.reply_buffer(c.max_buffered_reply_bytes, path);
            }
            TransformConfig::RedisSinkCluster(c) => {
                if c.first_contact_points.is_empty() {
                    self.err(
                        format!("{path}.firstContactPoints"),
                        "must name at least one node of the cluster (host:port)",
                    );
                }
                for (i, point) in c.first_contact_points.iter().enumerate() {
                    if let Err(msg) = check_remote_addr(point) {
                        self.err(format!("{path}.firstContactPoints[{i}]"), msg);
                    }
                }
                if let Some(direct) = &c.direct_destination
                    && let Err(msg) = check_remote_addr(direct)
                {
                    self.err(format!("{path}.directDestination"), msg);
                }
                if c.connect_timeout_ms == 0 {
                    self.err(format!("{path}.connectTimeoutMs"), "must be at least 1");
                }
                self.at_most(
                    Some(c.connect_timeout_ms),
                    MAX_TIMEOUT_MS,
                    format!("{path}.connectTimeoutMs"),
                );
                if let Some(tls) = &c.tls {
                    self.check_connector_tls(tls, &format!("{path}.tls"));
                }
                if c.connection_count == Some(0) {
                    self.err(format!("{path}.connectionCount"), "must be at least 1");
                }
                self.at_most(
                    c.connection_count.map(|v| v as u64),
                    MAX_SHARED_CONNECTIONS,
                    format!("{path}.connectionCount"),
                );
                self.read_timeout(c.read_timeout, path);
            }
            TransformConfig::RedisClusterPortsRewrite(c) => {
                if c.new_port == 0 {
                    self.err(
                        format!("{path}.newPort"),
                        "must be a port number from 1 to 65535",
                    );
                }
            }
            TransformConfig::CassandraSinkSingle(c) => {
                self.check_sink(
                    &c.remote_address,
                    c.connect_timeout_ms,
                    c.tls.as_ref(),
                    path,
                );
                self.read_timeout(c.read_timeout, path);
            }
            TransformConfig::CassandraPeersRewrite(c) => {
                if c.port == 0 {
                    self.err(
                        format!("{path}.port"),
                        "must be a port number from 1 to 65535",
                    );
                }
            }
            TransformConfig::RequestThrottling(c) => {
                if c.max_requests_per_second == 0 {
                    self.err(format!("{path}.maxRequestsPerSecond"), "must be at least 1");
                }
            }
            TransformConfig::NullSink(_)
            | TransformConfig::DebugPrinter(_)
            | TransformConfig::DebugForceParse(_)
            | TransformConfig::DebugForceEncode(_) => {}
            TransformConfig::DebugReturner(c) => match (&c.redis, c.fail) {
                (Some(_), true) => {
                    self.err(path, "set either `Redis` (a reply) or `Fail`, not both")
                }
                (None, false) => self.err(
                    path,
                    "set `Redis: \"<reply>\"` or write `DebugReturner: Fail`",
                ),
                _ => {}
            },
            TransformConfig::QueryCounter(c) => match c.counter() {
                Some(name) if name.trim().is_empty() => {
                    self.err(format!("{path}.counterName"), "must not be empty")
                }
                Some(_) => {}
                None => self.err(
                    format!("{path}.counterName"),
                    "missing: the name of the counter (upstream 0.7 wrote it as `name`)",
                ),
            },
            TransformConfig::QueryTypeFilter(c) => match (&c.allow_list, &c.deny_list) {
                (Some(_), Some(_)) => self.err(
                    path,
                    "set exactly one of `AllowList` and `DenyList`, not both",
                ),
                (None, None) => self.err(path, "set exactly one of `AllowList` and `DenyList`"),
                _ => {}
            },
            TransformConfig::Coalesce(c) => {
                match (c.flush_when_buffered_message_count, c.flush_when_millis_since_last_flush) {
                    (None, None) => self.err(
                        path,
                        "set at least one of `flush_when_buffered_message_count` and `flush_when_millis_since_last_flush`",
                    ),
                    (Some(0), _) => self.err(format!("{path}.flushWhenBufferedMessageCount"), "must be at least 1"),
                    (_, Some(0)) => self.err(format!("{path}.flushWhenMillisSinceLastFlush"), "must be at least 1"),
                    _ => {}
                }
                self.at_most(
                    c.flush_when_buffered_message_count.map(|v| v as u64),
                    MAX_QUEUE,
                    format!("{path}.flushWhenBufferedMessageCount"),
                );
                self.at_most(
                    c.flush_when_millis_since_last_flush,
                    MAX_FLUSH_INTERVAL_MS,
                    format!("{path}.flushWhenMillisSinceLastFlush"),
                );
            }
            TransformConfig::Tee(c) => {
                if c.buffer_size == Some(0) {
                    self.err(format!("{path}.bufferSize"), "must be at least 1");
                }
                self.at_most(
                    c.buffer_size.map(|v| v as u64),
                    MAX_QUEUE,
                    format!("{path}.bufferSize"),
                );
                self.at_most(
                    c.timeout_micros,
                    MAX_TIMEOUT_MS * 1000,
                    format!("{path}.timeoutMicros"),
                );
                if c.timeout_micros == Some(0) {
                    self.err(
                        format!("{path}.timeoutMicros"),
                        "must be at least 1 (omit it for no limit)",
                    );
                }
                if let Some(port) = c.switch_port {
                    if port == 0 {
                        self.err(
                            format!("{path}.switchPort"),
                            "must be a port number from 1 to 65535",
                        );
                    } else if let Some(first) = self.switch_ports.get(&port) {
                        let msg = format!("port {port} is already the switchPort of {first}");
                        self.err(format!("{path}.switchPort"), msg);
                    } else {
                        self.switch_ports.insert(port, path.to_string());
                    }
                }
                if let TeeBehavior::SubchainOnMismatch(sub) = &c.behavior
                    && let Some(name) = &sub.name
                {
                    self.claim_name(name, &format!("{path}.behavior.SubchainOnMismatch"));
                }
                for (field, _, chain) in t.sub_chains() {
                    let items: Vec<Option<&TransformConfig>> = chain.iter().map(Some).collect();
                    self.check_chain(&items, &format!("{path}.{field}"), protocol);
                }
            }
        }
    }

    /// The fields every sink with an upstream has.
    fn check_sink(
        &mut self,
        remote_address: &str,
        connect_timeout_ms: u64,
        tls: Option<&TlsConnectorConfig>,
        path: &str,
    ) {
        if let Err(msg) = check_remote_addr(remote_address) {
            self.err(format!("{path}.remoteAddress"), msg);
        }
        if connect_timeout_ms == 0 {
            self.err(format!("{path}.connectTimeoutMs"), "must be at least 1");
        }
        self.at_most(
            Some(connect_timeout_ms),
            MAX_TIMEOUT_MS,
            format!("{path}.connectTimeoutMs"),
        );
        if let Some(tls) = tls {
            self.check_connector_tls(tls, &format!("{path}.tls"));
        }
    }

    fn check_connector_tls(&mut self, tls: &TlsConnectorConfig, path: &str) {
        self.check_path(
            &tls.certificate_authority_path,
            &format!("{path}.certificateAuthorityPath"),
        );
        match (&tls.certificate_path, &tls.private_key_path) {
            (Some(cert), Some(key)) => {
                self.check_path(cert, &format!("{path}.certificatePath"));
                self.check_path(key, &format!("{path}.privateKeyPath"));
            }
            (Some(_), None) => self.err(
                format!("{path}.privateKeyPath"),
                "required when certificatePath is set",
            ),
            (None, Some(_)) => self.err(
                format!("{path}.certificatePath"),
                "required when privateKeyPath is set",
            ),
            (None, None) => {}
        }
    }
}

/// How a transform is named in messages: "`name` (Kind)", or "Kind" when it has no name.
fn describe(t: &TransformConfig) -> String {
    match t.explicit_name() {
        Some(name) => format!("`{name}` ({})", t.kind()),
        None => t.kind().to_string(),
    }
}

/// A listen address must be `ip:port`, or `localhost:port`.
fn check_listen_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match addr.rsplit_once(':') {
        Some(("localhost", port)) if port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "`{addr}` is not a listen address: expected ip:port, for example 127.0.0.1:6379 or 0.0.0.0:6379"
        )),
    }
}

/// A remote address is `host:port`; the host may be a name resolved at connect time.
fn check_remote_addr(addr: &str) -> Result<(), String> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || {
        format!(
            "`{addr}` is not an address: expected host:port, for example 127.0.0.1:6379 or redis.default.svc:6379"
        )
    };
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.' || ch == '_');
    if host_ok && port.parse::<u16>().is_ok_and(|p| p != 0) {
        Ok(())
    } else {
        Err(bad())
    }
}

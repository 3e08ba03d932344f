//! `RedisSinkCluster` (upstream's `ValkeySinkCluster`): the sink to a Redis Cluster.
//!
//! The sink learns the slot map (`CLUSTER SLOTS`) and the key positions of every command
//! (`COMMAND`) from any reachable node, and sends each request to the master of its keys'
//! slot. Each node is reached through the shared connections of `RedisSinkSingle` (one
//! [`Pool`] per node, `connection_count` connections per lane), and each client connection
//! has one [`SharedSink`] per node it uses, which keeps its session state there (lanes for
//! its credentials and protocol; a dedicated connection while a subscription, a blocking
//! command or WATCH needs one).
//!
//! Cluster hiding: a client sees one Redis. Multi-key commands whose keys span slots are
//! split and their replies merged ([`route`]); commands without keys go to one node or to
//! every master; a transaction is held by the proxy and sent at `EXEC` to the node of its
//! keys as one `MULTI ... EXEC`; `SCAN` walks the masters one after another with a cursor
//! that says which. `MOVED` and `ASK` are followed (at most [`MAX_REDIRECTS`] times), and a
//! `MOVED`, a failed node or a slot without a master has the map learnt again; it is also
//! refreshed every [`REFRESH_EVERY`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use async_trait::async_trait;
use bytes::Bytes;
use shotover_crds::topology::TlsConnectorConfig;
use shotover_crds::transform::{QueryType, RedisSinkClusterConfig};
use tokio::sync::Notify;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::redis::frame::RedisFrame;
use crate::message::{Message, MessageId, Messages};
use crate::metrics::{self, Counter};
use crate::transforms::redis_sink_single::session::SharedSink;
use crate::transforms::redis_sink_single::shared::Pool;
use crate::transforms::redis_sink_single::{DEFAULT_REPLY_CAP, Shared, dedicated};
use crate::upstream::{Upstream, failed_requests_counter};

mod route;
mod slots;

use route::{CROSSSLOT, CommandTable, Merge, Route};
use slots::SlotMap;

/// Redirects followed for one request before it gets an error.
pub const MAX_REDIRECTS: u8 = 5;
/// How often the slot map is learnt again without a reason.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// Refreshes for a reason (a MOVED, a failed node) at most this often.
const REFRESH_MIN_INTERVAL: Duration = Duration::from_millis(500);
/// Ids of the requests the sink makes itself (parts of a split request, ASKING, a
/// transaction's MULTI): far above the ids of a client's requests.
const SUB: MessageId = 1 << 63;
/// Marks the requests of the sink whose replies nobody gets.
const HIDDEN: MessageId = 1 << 62;
/// Marks a session command replayed on a node the client starts using.
const REPLAY: MessageId = 1 << 61;
/// How long requests that could not be sent to a node (it is down) are tried again, as the
/// map is learnt again, before they get the error: long enough for a replica to take over
/// in a cluster whose `cluster-node-timeout` is a few seconds.
pub const UNSENT_RETRY_FOR: Duration = Duration::from_secs(10);
const UNSENT_RETRY_PAUSE: Duration = Duration::from_millis(250);
/// How many masters a SCAN cursor can tell apart (its low bits).
const SCAN_NODE_BITS: u32 = 10;

pub struct RedisSinkClusterBuilder {
    cluster: Arc<Cluster>,
}

struct Node {
    addr: String,
    /// Connections that sent `READONLY`: for reads from a replica.
    readonly: bool,
    pool: Arc<Pool>,
}

struct Metrics {
    moved: Counter,
    ask: Counter,
    refreshes: Counter,
    refresh_failures: Counter,
}

/// What every client connection's sink shares: the nodes, the slot map and the commands.
struct Cluster {
    chain: String,
    name: String,
    contact_points: Vec<String>,
    direct: Option<String>,
    connection_count: usize,
    connect_timeout_ms: u64,
    tls: Option<TlsConnectorConfig>,
    read_timeout: Option<Duration>,
    read_from_replicas: bool,
    failed_requests: Counter,
    nodes: RwLock<Vec<Arc<Node>>>,
    map: RwLock<Arc<SlotMap>>,
    /// Bumped each time the map changes, so clients reload it only then.
    version: AtomicU64,
    commands: RwLock<Option<Arc<CommandTable>>>,
    /// One refresh at a time; when the last one ended.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    /// The handshake the last successful refresh used (credentials, when the cluster needs
    /// them), for the periodic refresh.
    handshake: Mutex<Vec<Bytes>>,
    periodic: AtomicBool,
    metrics: Metrics,
}

impl RedisSinkClusterBuilder {
    pub fn new(config: &RedisSinkClusterConfig, chain: &str) -> Result<Self> {
        let name = config.name.as_deref().unwrap_or("RedisSinkCluster");
        if config.first_contact_points.is_empty() {
            bail!("first_contact_points is empty: name at least one node of the cluster");
        }
        let connection_count = config.connection_count.unwrap_or(1);
        let max = shotover_crds::validate::MAX_SHARED_CONNECTIONS as usize;
        if connection_count == 0 || connection_count > max {
            bail!("connection_count is {connection_count}: it must be between 1 and {max}");
        }
        let labels = [("chain", chain), ("transform", name)];
        let redirects = |kind: &str| {
            metrics::counter(
                "shotover_redis_cluster_redirects_count",
                "MOVED and ASK redirects a cluster sink followed.",
                &[("chain", chain), ("transform", name), ("kind", kind)],
            )
        };
        let cluster = Arc::new(Cluster {
            chain: chain.to_string(),
            name: name.to_string(),
            contact_points: config.first_contact_points.clone(),
            direct: config.direct_destination.clone(),
            connection_count,
            connect_timeout_ms: config.connect_timeout_ms,
            tls: config.tls.clone(),
            read_timeout: config.read_timeout.map(Duration::from_secs),
            read_from_replicas: config.read_from_replicas,
            failed_requests: failed_requests_counter(chain, name),
            nodes: RwLock::new(Vec::new()),
            map: RwLock::new(Arc::new(SlotMap::default())),
            version: AtomicU64::new(0),
            commands: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(None),
            handshake: Mutex::new(Vec::new()),
            periodic: AtomicBool::new(false),
            metrics: Metrics {
                moved: redirects("moved"),
                ask: redirects("ask"),
                refreshes: metrics::counter(
                    "shotover_redis_cluster_topology_refreshes_count",
                    "Times a cluster sink learnt the slot map.",
                    &labels,
                ),
                refresh_failures: metrics::counter(
                    "shotover_redis_cluster_topology_refresh_failures_count",
                    "Times a cluster sink could not learn the slot map from any node.",
                    &labels,
                ),
            },
        });
        // Every node's connection settings are checked now (TLS files): a bad one is a
        // config error, not a failure at the first request.
        for point in cluster
            .contact_points
            .iter()
            .chain(cluster.direct.iter())
            .cloned()
            .collect::<Vec<_>>()
        {
            cluster.node(&point)?;
        }
        Ok(RedisSinkClusterBuilder { cluster })
    }
}

impl TransformBuilder for RedisSinkClusterBuilder {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform> {
        if !self.cluster.periodic.swap(true, Ordering::Relaxed) {
            tokio::spawn(periodic_refresh(Arc::downgrade(&self.cluster)));
        }
        Box::new(ClusterSink::new(
            self.cluster.clone(),
            ctx.force_run.clone(),
        ))
    }
}

async fn periodic_refresh(cluster: Weak<Cluster>) {
    loop {
        tokio::time::sleep(REFRESH_EVERY).await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let handshake = cluster
            .handshake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Err(e) = cluster.refresh(&handshake, true).await {
            tracing::warn!(transform = %cluster.name, error = %e, "could not refresh the cluster's slot map");
        }
    }
}

impl Cluster {
    /// The index of the node at `addr`, added if new.
    fn node(&self, addr: &str) -> Result<u16> {
        self.node_as(addr, false)
    }

    /// The index of the node at `addr` reached with `readonly` connections, added if new.
    fn node_as(&self, addr: &str, readonly: bool) -> Result<u16> {
        let find = |nodes: &[Arc<Node>]| {
            nodes
                .iter()
                .position(|n| n.addr == addr && n.readonly == readonly)
        };
        if let Some(i) = find(&self.nodes.read().unwrap_or_else(|e| e.into_inner())) {
            return Ok(i as u16);
        }
        let mut nodes = self.nodes.write().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = find(&nodes) {
            return Ok(i as u16);
        }
        if nodes.len() >= u16::MAX as usize - 1 {
            bail!("too many cluster nodes");
        }
        let shared = Arc::new(Shared {
            upstream: Upstream::new(addr, self.connect_timeout_ms, self.tls.as_ref())?,
            failed_requests: self.failed_requests.clone(),
            read_timeout: self.read_timeout,
            reply_cap: DEFAULT_REPLY_CAP,
        });
        let mut pool = Pool::new(shared, self.connection_count, &self.chain, &self.name);
        if readonly {
            pool =
                pool.with_handshake_suffix(vec![Bytes::from_static(b"*1\r\n$8\r\nREADONLY\r\n")]);
        }
        nodes.push(Arc::new(Node {
            addr: addr.to_string(),
            readonly,
            pool: Arc::new(pool),
        }));
        Ok((nodes.len() - 1) as u16)
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn map(&self) -> (Arc<SlotMap>, u64) {
        let map = self.map.read().unwrap_or_else(|e| e.into_inner()).clone();
        (map, self.version.load(Ordering::Acquire))
    }

    fn commands(&self) -> Option<Arc<CommandTable>> {
        self.commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Learns the slot map from the first node that answers: the masters and replicas
    /// known, then the contact points. Without `force`, a refresh that ended less than
    /// [`REFRESH_MIN_INTERVAL`] ago is enough.
    async fn refresh(&self, handshake: &[Bytes], force: bool) -> Result<(), String> {
        let mut last = self.refresh.lock().await;
        if !force
            && self.version.load(Ordering::Acquire) > 0
            && last.is_some_and(|t| t.elapsed() < REFRESH_MIN_INTERVAL)
        {
            return Ok(());
        }
        let (map, _) = self.map();
        let nodes = self.nodes();
        let mut candidates: Vec<String> = Vec::new();
        for i in map
            .masters
            .iter()
            .chain(map.replicas.iter().flat_map(|(_, r)| r))
        {
            if let Some(node) = nodes.get(*i as usize) {
                candidates.push(node.addr.clone());
            }
        }
        for point in &self.contact_points {
            if !candidates.contains(point) {
                candidates.push(point.clone());
            }
        }
        let learn_commands = self.commands().is_none();
        let mut requests = vec![RedisFrame::command(["CLUSTER", "SLOTS"]).to_bytes()];
        if learn_commands {
            requests.push(RedisFrame::command(["COMMAND"]).to_bytes());
        }
        let mut errors = Vec::new();
        for addr in candidates {
            let node = match self.node(&addr) {
                Ok(i) => self.nodes()[i as usize].clone(),
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let replies = match dedicated::exchange(&node.pool.shared, handshake, &requests).await {
                Ok(replies) => replies,
                Err(e) => {
                    errors.push(format!("{addr} {e}"));
                    continue;
                }
            };
            let ranges = match slots::parse_cluster_slots(&replies[0], &addr) {
                Ok(ranges) if !ranges.is_empty() => ranges,
                Ok(_) => {
                    errors.push(format!("{addr} serves no slots"));
                    continue;
                }
                Err(e) => {
                    errors.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let mut next = SlotMap::default();
            for range in ranges {
                let Ok(master) = self.node(&range.master) else {
                    continue;
                };
                for s in range.start..=range.end {
                    next.masters_of[s as usize] = master;
                }
                if !next.masters.contains(&master) {
                    next.masters.push(master);
                    let replicas = range
                        .replicas
                        .iter()
                        .filter_map(|r| self.node_as(r, self.read_from_replicas).ok())
                        .collect();
                    next.replicas.push((master, replicas));
                }
            }
            if learn_commands && let Some(table) = replies.get(1).and_then(CommandTable::parse) {
                *self.commands.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(table));
            }
            *self.map.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            self.version.fetch_add(1, Ordering::AcqRel);
            *self.handshake.lock().unwrap_or_else(|e| e.into_inner()) = handshake.to_vec();
            *last = Some(Instant::now());
            self.metrics.refreshes.inc();
            return Ok(());
        }
        *last = Some(Instant::now());
        self.metrics.refresh_failures.inc();
        Err(format!(
            "no node of the cluster answered CLUSTER SLOTS ({})",
            errors.join("; ")
        ))
    }

    /// Refreshes in the background (after a MOVED or a failed node).
    fn refresh_soon(self: &Arc<Self>, handshake: Vec<Bytes>) {
        let cluster = self.clone();
        tokio::spawn(async move {
            if let Err(e) = cluster.refresh(&handshake, false).await {
                tracing::warn!(transform = %cluster.name, error = %e, "could not refresh the cluster's slot map");
            }
        });
    }
}

/// One request for one node.
struct Job {
    node: u16,
    id: MessageId,
    bytes: Bytes,
    /// Send `ASKING` first (an ASK redirect).
    ask: bool,
    redirects: u8,
    /// The slot it is for (so that a retry goes to the slot's master of the time).
    slot: Option<u16>,
}

/// A request answered by the replies of several jobs (or whose reply is rewritten).
enum Pending {
    Parts {
        id: MessageId,
        merge: Merge,
        positions: Vec<Vec<usize>>,
        total: usize,
        subs: Vec<MessageId>,
        replies: Vec<Option<Bytes>>,
        /// A session command: kept for replay on other nodes once every node accepted it.
        session: Option<Bytes>,
    },
    Scan {
        id: MessageId,
        sub: MessageId,
        at: usize,
        masters: usize,
        reply: Option<Bytes>,
    },
}

/// A transaction the proxy holds until EXEC.
struct Txn {
    queued: Vec<Bytes>,
    slot: Option<u16>,
    /// A queued command was refused: EXEC answers EXECABORT.
    aborted: bool,
}

struct ClusterSink {
    cluster: Arc<Cluster>,
    force_run: Arc<Notify>,
    map: Arc<SlotMap>,
    version: u64,
    nodes: Vec<Arc<Node>>,
    /// This client's sink at each node (by node index), made when first used.
    sinks: Vec<Option<SharedSink>>,
    /// The master that commands without keys go to.
    home: Option<u16>,
    /// The node of the client's (non-sharded) subscriptions.
    pubsub: Option<u16>,
    /// AUTH, HELLO, SELECT and CLIENT SETNAME the client sent and the nodes accepted:
    /// replayed on the sink of a node the client starts using later.
    session: Vec<Bytes>,
    txn: Option<Txn>,
    /// The node of the client's WATCH.
    watch: Option<u16>,
    next_sub: MessageId,
    /// The cluster's commands, once learnt.
    table: Option<Arc<CommandTable>>,
    /// Round robin over replicas (`read_from_replicas`).
    turn: usize,
}

/// Whether a sink's error reply says the request never reached the node.
fn not_sent(reply: &[u8]) -> bool {
    let text = String::from_utf8_lossy(reply);
    text.contains("is unreachable")
        || text.contains("before the requests were sent")
        || text.contains("did not answer the connection handshake")
}

fn sub_is(id: MessageId) -> bool {
    id & SUB != 0
}

fn is_error(reply: &[u8]) -> bool {
    matches!(reply.first(), Some(b'-' | b'!'))
}

fn error(id: MessageId, text: &str) -> Message {
    Message::error_reply(id, text)
}

impl ClusterSink {
    fn new(cluster: Arc<Cluster>, force_run: Arc<Notify>) -> Self {
        let (map, version) = cluster.map();
        ClusterSink {
            cluster,
            force_run,
            map,
            version,
            nodes: Vec::new(),
            sinks: Vec::new(),
            home: None,
            pubsub: None,
            session: Vec::new(),
            txn: None,
            watch: None,
            next_sub: SUB,
            table: None,
            turn: 0,
        }
    }

    fn sub(&mut self) -> MessageId {
        self.next_sub += 1;
        self.next_sub
    }

    /// The handshake of the client's session (for refreshes that need its credentials).
    fn handshake(&self) -> Vec<Bytes> {
        self.sinks
            .iter()
            .flatten()
            .next()
            .map(|s| s.session_handshake())
            .unwrap_or_default()
    }

    /// Makes sure the slot map is known and current.
    async fn load_map(&mut self) -> Result<(), String> {
        if self.cluster.version.load(Ordering::Acquire) == 0 {
            let handshake = self.handshake();
            self.cluster.refresh(&handshake, false).await?;
        }
        if self.cluster.version.load(Ordering::Acquire) != self.version {
            (self.map, self.version) = self.cluster.map();
        }
        Ok(())
    }

    fn addr(&mut self, node: u16) -> String {
        self.node_handle(node).addr.clone()
    }

    fn node_handle(&mut self, node: u16) -> Arc<Node> {
        if node as usize >= self.nodes.len() {
            self.nodes = self.cluster.nodes();
        }
        self.nodes[node as usize].clone()
    }

    /// The node for commands without keys.
    fn home(&mut self) -> Option<u16> {
        if let Some(direct) = self.cluster.direct.clone() {
            return self.cluster.node(&direct).ok();
        }
        match self.home {
            Some(h) if self.map.masters.contains(&h) => Some(h),
            _ => {
                let masters = &self.map.masters;
                if masters.is_empty() {
                    return None;
                }
                let pick = masters[rand_index(masters.len())];
                self.home = Some(pick);
                Some(pick)
            }
        }
    }

    fn master(&self, slot: u16) -> Option<u16> {
        self.map.master(slot)
    }

    /// A replica of `slot`'s master (over `READONLY` connections), in turn.
    fn replica(&mut self, slot: u16) -> Option<u16> {
        let master = self.map.master(slot)?;
        let (_, replicas) = self.map.replicas.iter().find(|(m, _)| *m == master)?;
        if replicas.is_empty() {
            return None;
        }
        self.turn = self.turn.wrapping_add(1);
        Some(replicas[self.turn % replicas.len()])
    }

    /// Runs `jobs`, following redirects, and delivers every reply into `out` or `pending`.
    async fn run_jobs(
        &mut self,
        mut jobs: Vec<Job>,
        pending: &mut [Pending],
        drops: &mut Vec<(MessageId, Bytes)>,
        out: &mut Messages,
        close_client: &mut bool,
    ) -> Result<(), ChainError> {
        let mut refresh = false;
        let deadline = Instant::now() + UNSENT_RETRY_FOR;
        while !jobs.is_empty() {
            // One batch per node, in request order.
            let mut groups: Vec<(u16, Messages)> = Vec::new();
            let mut sent: Vec<Job> = Vec::with_capacity(jobs.len());
            for job in jobs.drain(..) {
                let at = match groups.iter().position(|(n, _)| *n == job.node) {
                    Some(at) => at,
                    None => {
                        groups.push((job.node, self.replay(job.node)));
                        groups.len() - 1
                    }
                };
                if job.ask {
                    let asking = self.sub();
                    drops.push((asking, Bytes::new()));
                    groups[at].1.push(Message::request(
                        asking,
                        Bytes::from_static(b"*1\r\n$6\r\nASKING\r\n"),
                    ));
                }
                groups[at]
                    .1
                    .push(Message::request(job.id, job.bytes.clone()));
                sent.push(job);
            }
            let responses = self.run_groups(groups, close_client).await?;
            let mut unsent = Vec::new();
            for response in responses {
                let Some(id) = response.request_id else {
                    out.push(response);
                    continue;
                };
                let reply = response.raw_bytes().cloned().unwrap_or_default();
                if reply.starts_with(b"-ERR shotover: upstream") {
                    refresh = true;
                    // Never sent (the node is down, or its connection closed first): safe
                    // to send again once the map says where, within the deadline.
                    if not_sent(&reply)
                        && Instant::now() < deadline
                        && let Some(at) = sent.iter().position(|j| j.id == id)
                    {
                        unsent.push(sent.swap_remove(at));
                        continue;
                    }
                }
                // Replies to what the sink sent for itself (a transaction's MULTI and
                // queued commands, RESET, UNWATCH) are not the client's.
                if id & HIDDEN != 0 {
                    continue;
                }
                if let Some((ask, slot, target)) = slots::redirect(&reply)
                    && let Some(at) = sent.iter().position(|j| j.id == id)
                {
                    let job = sent.swap_remove(at);
                    if job.redirects < MAX_REDIRECTS {
                        let target = if target.starts_with(':') {
                            let from = self.addr(job.node);
                            let host = from.rsplit_once(':').map_or("", |(h, _)| h);
                            format!("{host}{target}")
                        } else {
                            target
                        };
                        if ask {
                            self.cluster.metrics.ask.inc();
                        } else {
                            self.cluster.metrics.moved.inc();
                            refresh = true;
                        }
                        let _ = slot;
                        if let Ok(node) = self.cluster.node(&target) {
                            jobs.push(Job {
                                node,
                                ask,
                                redirects: job.redirects + 1,
                                ..job
                            });
                            continue;
                        }
                    }
                    let text = format!(
                        "ERR shotover: the cluster redirected this request {} times ({}): giving up",
                        job.redirects + 1,
                        String::from_utf8_lossy(reply.strip_suffix(b"\r\n").unwrap_or(&reply))
                            .trim_start_matches('-')
                    );
                    self.deliver(error(id, &text), pending, drops, out);
                    continue;
                }
                self.deliver(response, pending, drops, out);
            }
            if !unsent.is_empty() {
                // A failover in progress: wait for the map to show the new master.
                tokio::time::sleep(UNSENT_RETRY_PAUSE).await;
                let handshake = self.handshake();
                let _ = self.cluster.refresh(&handshake, false).await;
                let _ = self.load_map().await;
                for mut job in unsent {
                    if let Some(node) = job.slot.and_then(|s| self.master(s)) {
                        job.node = node;
                    }
                    jobs.push(job);
                }
                refresh = false;
            }
        }
        if refresh {
            self.cluster.refresh_soon(self.handshake());
        }
        Ok(())
    }

    /// The session commands to send first on a node this client has not used yet.
    fn replay(&mut self, node: u16) -> Messages {
        let fresh = self.sinks.get(node as usize).is_none_or(|s| s.is_none());
        if !fresh || self.session.is_empty() {
            return Vec::new();
        }
        let session = self.session.clone();
        session
            .into_iter()
            .map(|bytes| Message::request(self.sub() | HIDDEN | REPLAY, bytes))
            .collect()
    }

    fn sink(&mut self, node: u16) -> SharedSink {
        if self.sinks.len() <= node as usize {
            self.sinks.resize_with(node as usize + 1, || None);
        }
        match self.sinks[node as usize].take() {
            Some(sink) => sink,
            None => {
                let pool = self.node_handle(node).pool.clone();
                SharedSink::for_cluster(pool, self.force_run.clone())
            }
        }
    }

    /// Runs each node's batch on its sink, concurrently.
    async fn run_groups(
        &mut self,
        groups: Vec<(u16, Messages)>,
        close_client: &mut bool,
    ) -> Result<Messages, ChainError> {
        let mut work = Vec::with_capacity(groups.len());
        for (node, requests) in groups {
            work.push((node, self.sink(node), requests));
        }
        let results = if work.len() == 1 {
            let (node, mut sink, requests) = work.pop().expect("one");
            let result = run_sink(&mut sink, requests).await;
            vec![(node, sink, result)]
        } else {
            futures_util::future::join_all(work.into_iter().map(
                |(node, mut sink, requests)| async move {
                    let result = run_sink(&mut sink, requests).await;
                    (node, sink, result)
                },
            ))
            .await
        };
        let mut out = Vec::new();
        let mut failed = None;
        for (node, sink, result) in results {
            match result {
                Ok((responses, close)) => {
                    *close_client |= close;
                    // Replies to replayed session commands are not the client's; if one
                    // failed (the node was down), the node's sink starts over next time,
                    // replaying the session again.
                    let replay_failed = responses
                        .iter()
                        .any(|r| r.request_id.is_some_and(|id| id & REPLAY != 0) && r.is_error());
                    if !replay_failed || sink.is_pinned() {
                        self.sinks[node as usize] = Some(sink);
                    }
                    out.extend(
                        responses
                            .into_iter()
                            .filter(|r| r.request_id.is_none_or(|id| id & REPLAY == 0)),
                    );
                }
                Err(e) => {
                    self.sinks[node as usize] = Some(sink);
                    failed = Some(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Hands a reply to its request: the client's own, a part of a split one, or one the
    /// sink made for itself.
    fn deliver(
        &mut self,
        response: Message,
        pending: &mut [Pending],
        drops: &mut [(MessageId, Bytes)],
        out: &mut Messages,
    ) {
        let Some(id) = response.request_id else {
            out.push(response);
            return;
        };
        if !sub_is(id) {
            out.push(response);
            return;
        }
        let bytes = response.raw_bytes().cloned().unwrap_or_default();
        if let Some(drop) = drops.iter_mut().find(|(d, _)| *d == id) {
            drop.1 = bytes;
            return;
        }
        for p in pending.iter_mut() {
            match p {
                Pending::Parts { subs, replies, .. } => {
                    if let Some(at) = subs.iter().position(|s| *s == id) {
                        replies[at] = Some(bytes);
                        return;
                    }
                }
                Pending::Scan { sub, reply, .. } if *sub == id => {
                    *reply = Some(bytes);
                    return;
                }
                Pending::Scan { .. } => {}
            }
        }
    }

    /// Plans one request: its jobs, or its answer now.
    fn plan(
        &mut self,
        mut request: Message,
        jobs: &mut Vec<Job>,
        pending: &mut Vec<Pending>,
        out: &mut Messages,
        close_client: &mut bool,
    ) -> bool {
        let id = request.id;
        if self.table.is_none() {
            self.table = self.cluster.commands();
        }
        let route = route::route(&mut request, self.table.as_deref());
        if self.txn.is_some() {
            return self.queue(request, route, jobs, out);
        }
        if let Route::Slot(slot) = route
            && self.cluster.read_from_replicas
            && self.watch.is_none()
            && request.command().query_type() == QueryType::Read
            && let Some(node) = self.replica(slot)
        {
            jobs.push(Job {
                node,
                id,
                bytes: request.into_bytes(),
                ask: false,
                redirects: 0,
                slot: Some(slot),
            });
            return true;
        }
        let single = |this: &mut Self,
                      node: Option<u16>,
                      slot: Option<u16>,
                      request: Message,
                      jobs: &mut Vec<Job>,
                      out: &mut Messages| {
            match node {
                Some(node) => jobs.push(Job {
                    node,
                    id,
                    bytes: request.into_bytes(),
                    ask: false,
                    redirects: 0,
                    slot,
                }),
                None => {
                    this.cluster.failed_requests.inc();
                    out.push(error(id, "CLUSTERDOWN Hash slot not served"));
                }
            }
        };
        match route {
            Route::Slot(slot) => {
                let node = self.master(slot);
                single(self, node, Some(slot), request, jobs, out);
            }
            Route::Any => {
                let node = self.home();
                single(self, node, None, request, jobs, out);
            }
            Route::PubSub => {
                // Every client subscribes on the master of slot 0 (and stays on that node
                // while subscribed), where PUBLISH goes too: the cluster carries messages to
                // every node, but a node counts only its own receivers.
                let node = self.pubsub.or_else(|| self.master(0));
                self.pubsub = node;
                single(self, node, None, request, jobs, out);
            }
            Route::Publish => {
                let node = self.master(0);
                single(self, node, None, request, jobs, out);
            }
            Route::CrossSlot => out.push(error(id, CROSSSLOT)),
            Route::Local(reply) => out.push(Message::response(Some(id), Bytes::from_static(reply))),
            Route::Quit => {
                out.push(Message::response(Some(id), Bytes::from_static(b"+OK\r\n")));
                *close_client = true;
                return false;
            }
            Route::Reset => {
                for node in self.used_nodes() {
                    let sub = self.sub();
                    jobs.push(Job {
                        node,
                        id: sub | HIDDEN,
                        bytes: Bytes::from_static(b"*1\r\n$5\r\nRESET\r\n"),
                        ask: false,
                        redirects: 0,
                        slot: None,
                    });
                }
                self.session.clear();
                self.txn = None;
                self.watch = None;
                self.pubsub = None;
                out.push(Message::response(
                    Some(id),
                    Bytes::from_static(b"+RESET\r\n"),
                ));
            }
            Route::Session => {
                let bytes = request.into_bytes();
                let mut nodes = self.map.masters.clone();
                for node in self.used_nodes() {
                    if !nodes.contains(&node) {
                        nodes.push(node);
                    }
                }
                if nodes.is_empty() {
                    out.push(error(id, "CLUSTERDOWN The cluster is down"));
                    return true;
                }
                let subs = self.fan_out(&nodes, &bytes, jobs);
                pending.push(Pending::Parts {
                    id,
                    merge: Merge::First,
                    positions: Vec::new(),
                    total: 0,
                    replies: vec![None; subs.len()],
                    subs,
                    session: Some(bytes),
                });
            }
            Route::All(merge) => {
                let nodes = self.map.masters.clone();
                if nodes.is_empty() {
                    out.push(error(id, "CLUSTERDOWN The cluster is down"));
                    return true;
                }
                let bytes = request.into_bytes();
                let subs = self.fan_out(&nodes, &bytes, jobs);
                pending.push(Pending::Parts {
                    id,
                    merge,
                    positions: Vec::new(),
                    total: 0,
                    replies: vec![None; subs.len()],
                    subs,
                    session: None,
                });
            }
            Route::Split { head, group, merge } => {
                let Some(args) = route::args(&mut request) else {
                    out.push(error(id, "ERR shotover: malformed request"));
                    return true;
                };
                let parts = route::split_parts(&args, head, group);
                let mut subs = Vec::with_capacity(parts.len());
                let mut positions = Vec::with_capacity(parts.len());
                for (slot, bytes, keys) in parts {
                    let Some(node) = self.master(slot) else {
                        out.push(error(id, "CLUSTERDOWN Hash slot not served"));
                        return true;
                    };
                    let sub = self.sub();
                    jobs.push(Job {
                        node,
                        id: sub,
                        bytes,
                        ask: false,
                        redirects: 0,
                        slot: Some(slot),
                    });
                    subs.push(sub);
                    positions.push(keys);
                }
                pending.push(Pending::Parts {
                    id,
                    merge,
                    total: (args.len() - head) / group,
                    positions,
                    replies: vec![None; subs.len()],
                    subs,
                    session: None,
                });
            }
            Route::Scan => self.scan(request, jobs, pending, out),
            Route::Multi => {
                self.txn = Some(Txn {
                    queued: Vec::new(),
                    slot: None,
                    aborted: false,
                });
                out.push(Message::response(Some(id), Bytes::from_static(b"+OK\r\n")));
            }
            Route::Exec => out.push(error(id, "ERR EXEC without MULTI")),
            Route::Discard => out.push(error(id, "ERR DISCARD without MULTI")),
            Route::Watch(slot) => match (self.master(slot), self.watch) {
                (None, _) => out.push(error(id, "CLUSTERDOWN Hash slot not served")),
                (Some(node), Some(w)) if node != w => out.push(error(id, CROSSSLOT)),
                (Some(node), _) => {
                    self.watch = Some(node);
                    single(self, Some(node), None, request, jobs, out);
                }
            },
            Route::Unwatch => match self.watch.take() {
                Some(node) => single(self, Some(node), None, request, jobs, out),
                None => out.push(Message::response(Some(id), Bytes::from_static(b"+OK\r\n"))),
            },
        }
        true
    }

    /// Nodes whose sink this client has.
    fn used_nodes(&self) -> Vec<u16> {
        self.sinks
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| i as u16)
            .collect()
    }

    fn fan_out(&mut self, nodes: &[u16], bytes: &Bytes, jobs: &mut Vec<Job>) -> Vec<MessageId> {
        nodes
            .iter()
            .map(|&node| {
                let sub = self.sub();
                jobs.push(Job {
                    node,
                    id: sub,
                    bytes: bytes.clone(),
                    ask: false,
                    redirects: 0,
                    slot: None,
                });
                sub
            })
            .collect()
    }

    /// `SCAN cursor ...`: the cursor's low bits say which master (in slot order), the rest
    /// is that master's cursor.
    fn scan(
        &mut self,
        mut request: Message,
        jobs: &mut Vec<Job>,
        pending: &mut Vec<Pending>,
        out: &mut Messages,
    ) {
        let id = request.id;
        let Some(mut args) = route::args(&mut request) else {
            out.push(error(id, "ERR shotover: malformed request"));
            return;
        };
        let cursor: Option<u64> = args
            .get(1)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse().ok());
        let Some(cursor) = cursor else {
            out.push(error(id, "ERR invalid cursor"));
            return;
        };
        let masters = self.map.masters.clone();
        let at = (cursor & ((1 << SCAN_NODE_BITS) - 1)) as usize;
        let Some(&node) = masters.get(at) else {
            // Past the last master (the cluster shrank): the scan is over.
            out.push(Message::response(
                Some(id),
                Bytes::from_static(b"*2\r\n$1\r\n0\r\n*0\r\n"),
            ));
            return;
        };
        args[1] = (cursor >> SCAN_NODE_BITS).to_string().into();
        let sub = self.sub();
        jobs.push(Job {
            node,
            id: sub,
            bytes: RedisFrame::command(args).to_bytes(),
            ask: false,
            redirects: 0,
            slot: None,
        });
        pending.push(Pending::Scan {
            id,
            sub,
            at,
            masters: masters.len(),
            reply: None,
        });
    }

    /// A request inside MULTI: held until EXEC (answered `+QUEUED`), or refused.
    fn queue(
        &mut self,
        request: Message,
        route: Route,
        jobs: &mut Vec<Job>,
        out: &mut Messages,
    ) -> bool {
        let id = request.id;
        let txn = self.txn.as_mut().expect("in a transaction");
        match route {
            Route::Exec => return self.exec(id, jobs, out),
            Route::Discard => {
                self.txn = None;
                if let Some(node) = self.watch.take() {
                    let sub = self.sub();
                    jobs.push(Job {
                        node,
                        id: sub | HIDDEN,
                        bytes: Bytes::from_static(b"*1\r\n$7\r\nUNWATCH\r\n"),
                        ask: false,
                        redirects: 0,
                        slot: None,
                    });
                }
                out.push(Message::response(Some(id), Bytes::from_static(b"+OK\r\n")));
            }
            Route::Multi => out.push(error(id, "ERR MULTI calls can not be nested")),
            Route::Watch(_) => out.push(error(id, "ERR WATCH inside MULTI is not allowed")),
            Route::Slot(slot) if txn.slot.is_none_or(|s| s == slot) => {
                txn.slot = Some(slot);
                txn.queued.push(request.into_bytes());
                out.push(Message::response(
                    Some(id),
                    Bytes::from_static(b"+QUEUED\r\n"),
                ));
            }
            Route::Any | Route::Unwatch => {
                txn.queued.push(request.into_bytes());
                out.push(Message::response(
                    Some(id),
                    Bytes::from_static(b"+QUEUED\r\n"),
                ));
            }
            Route::Slot(_) | Route::CrossSlot | Route::Split { .. } => {
                txn.aborted = true;
                out.push(error(id, CROSSSLOT));
            }
            Route::Local(reply) => out.push(Message::response(Some(id), Bytes::from_static(reply))),
            Route::Quit => {
                self.txn = None;
                out.push(Message::response(Some(id), Bytes::from_static(b"+OK\r\n")));
                return false;
            }
            _ => {
                txn.aborted = true;
                out.push(error(
                    id,
                    "ERR shotover: this command cannot be queued in a transaction through RedisSinkCluster (it goes to every node, or subscribes)",
                ));
            }
        }
        true
    }

    /// `EXEC`: the held transaction goes to its slot's master as one `MULTI ... EXEC`.
    fn exec(&mut self, id: MessageId, jobs: &mut Vec<Job>, out: &mut Messages) -> bool {
        let txn = self.txn.take().expect("in a transaction");
        let watch = self.watch.take();
        if txn.aborted {
            if let Some(node) = watch {
                let sub = self.sub();
                jobs.push(Job {
                    node,
                    id: sub | HIDDEN,
                    bytes: Bytes::from_static(b"*1\r\n$7\r\nUNWATCH\r\n"),
                    ask: false,
                    redirects: 0,
                    slot: None,
                });
            }
            out.push(error(
                id,
                "EXECABORT Transaction discarded because of previous errors.",
            ));
            return true;
        }
        let node = match (txn.slot.map(|s| self.master(s)), watch) {
            (Some(None), _) => {
                out.push(error(id, "CLUSTERDOWN Hash slot not served"));
                return true;
            }
            (Some(Some(node)), Some(w)) if node != w => {
                out.push(error(id, CROSSSLOT));
                return true;
            }
            (Some(Some(node)), _) => Some(node),
            (None, Some(w)) => Some(w),
            (None, None) => self.home(),
        };
        let Some(node) = node else {
            out.push(error(id, "CLUSTERDOWN The cluster is down"));
            return true;
        };
        let mut push = |this: &mut Self, bytes: Bytes| {
            let sub = this.sub();
            jobs.push(Job {
                node,
                id: sub | HIDDEN,
                bytes,
                ask: false,
                redirects: 0,
                slot: None,
            });
        };
        push(self, Bytes::from_static(b"*1\r\n$5\r\nMULTI\r\n"));
        for bytes in txn.queued {
            push(self, bytes);
        }
        jobs.push(Job {
            node,
            id,
            bytes: Bytes::from_static(b"*1\r\n$4\r\nEXEC\r\n"),
            ask: false,
            redirects: 0,
            slot: None,
        });
        true
    }
}

async fn run_sink(
    sink: &mut SharedSink,
    requests: Messages,
) -> Result<(Messages, bool), ChainError> {
    let mut state = ChainState::detached(requests, false);
    let responses = sink.transform(&mut state).await?;
    Ok((responses, state.close_client))
}

fn rand_index(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_usize(n);
    (h.finish() as usize) % n
}

#[async_trait]
impl Transform for ClusterSink {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        let requests = std::mem::take(&mut state.requests);
        let mut out = Vec::with_capacity(requests.len());
        if requests.is_empty() {
            // Pushes (subscriptions) and late replies from the nodes' dedicated connections.
            let nodes: Vec<(u16, Messages)> = self
                .sinks
                .iter()
                .enumerate()
                .filter(|(_, s)| s.as_ref().is_some_and(|s| s.is_pinned()))
                .map(|(i, _)| (i as u16, Vec::new()))
                .collect();
            if !nodes.is_empty() {
                out = self.run_groups(nodes, &mut state.close_client).await?;
                out.retain(|r| r.request_id.is_none_or(|id| id & HIDDEN == 0));
            }
            return Ok(out);
        }
        if let Err(e) = self.load_map().await {
            self.cluster.failed_requests.add(requests.len() as u64);
            let text = format!("ERR shotover: {e}");
            return Ok(requests.iter().map(|r| error(r.id, &text)).collect());
        }
        let mut jobs = Vec::with_capacity(requests.len());
        let mut pending = Vec::new();
        let mut requests = requests.into_iter();
        for request in requests.by_ref() {
            if !self.plan(
                request,
                &mut jobs,
                &mut pending,
                &mut out,
                &mut state.close_client,
            ) {
                break;
            }
        }
        // Nothing is answered after QUIT.
        drop(requests);
        let mut drops = Vec::new();
        self.run_jobs(
            jobs,
            &mut pending,
            &mut drops,
            &mut out,
            &mut state.close_client,
        )
        .await?;
        for p in pending {
            match p {
                Pending::Parts {
                    id,
                    merge,
                    positions,
                    total,
                    replies,
                    session,
                    ..
                } => {
                    let complete: Option<Vec<Bytes>> = replies.into_iter().collect();
                    let reply = match complete {
                        Some(replies) => route::merge(merge, replies, &positions, total),
                        None => Bytes::from(
                            "-ERR shotover: a node of the cluster did not answer its part of this request\r\n",
                        ),
                    };
                    if let Some(command) = session
                        && !is_error(&reply)
                    {
                        self.session.push(command);
                    }
                    out.push(Message::response(Some(id), reply));
                }
                Pending::Scan {
                    id,
                    at,
                    masters,
                    reply,
                    ..
                } => out.push(Message::response(Some(id), scan_reply(reply, at, masters))),
            }
        }
        Ok(out)
    }
}

/// A node's `SCAN` reply with a cursor that names the node: when the node is done, the
/// next master's first cursor (or 0 after the last).
fn scan_reply(reply: Option<Bytes>, at: usize, masters: usize) -> Bytes {
    let Some(reply) = reply else {
        return Bytes::from_static(b"-ERR shotover: the node did not answer the SCAN\r\n");
    };
    let Ok(RedisFrame::Array(mut items)) = RedisFrame::parse(&reply) else {
        return reply;
    };
    let next: Option<u64> = items
        .first()
        .and_then(|c| c.as_bytes())
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse().ok());
    let Some(next) = next else {
        return reply;
    };
    let cursor = if next == 0 {
        if at + 1 < masters { (at + 1) as u64 } else { 0 }
    } else if next >> (64 - SCAN_NODE_BITS) != 0 {
        return Bytes::from_static(
            b"-ERR shotover: a node's SCAN cursor is too large to carry through the cluster sink\r\n",
        );
    } else {
        (next << SCAN_NODE_BITS) | at as u64
    };
    items[0] = RedisFrame::Bulk(cursor.to_string().into());
    RedisFrame::Array(items).to_bytes()
}

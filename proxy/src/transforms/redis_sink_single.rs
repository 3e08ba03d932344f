//! `RedisSinkSingle` (upstream's `ValkeySinkSingle`): the sink to one Redis server, in one
//! of two modes.
//!
//! - **Dedicated** (no `connection_count`): one upstream connection per client connection,
//!   opened on the first request ([`dedicated`]). The client's session state lives on its
//!   own upstream connection, exactly as if it talked to Redis directly.
//! - **Shared** (`connection_count: N`): the requests of all client connections travel over
//!   at most N shared upstream connections per *lane* (credentials, protocol and database),
//!   batched into one write and answered in order ([`shared`]). A client whose session needs
//!   a connection of its own (a transaction, a subscription, a blocking command, MONITOR,
//!   silenced replies, client tracking) is pinned to a dedicated connection for as long as
//!   that state lasts ([`session`]).
//!
//! An upstream that cannot be reached gives each request `-ERR` and the client connection
//! stays open (the next request tries again: nothing was sent, so no state is lost). When a
//! dedicated connection breaks after use, the replies already received still go to the
//! client, every request still waiting gets `-ERR`, and the client connection is closed:
//! reconnecting silently would drop the client's AUTH, SELECT, subscriptions or transaction.
//! When a shared connection breaks, only the requests in flight on it get `-ERR`: no session
//! state lived there, so the clients stay connected.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use async_trait::async_trait;
use shotover_crds::transform::RedisSinkSingleConfig;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::DecodeError;
use crate::codec::redis::frame::RedisFrame;
use crate::message::{Message, Messages};
use crate::metrics::Counter;
use crate::upstream::{Upstream, failed_requests_counter};

pub(crate) mod dedicated;
mod replies;
pub(crate) mod session;
pub(crate) mod shared;

use dedicated::Dedicated;

/// Largest response accepted from Redis (1 GiB: above Redis's 512 MiB bulk limit).
const MAX_RESPONSE: usize = 1024 * 1024 * 1024;
/// Most shared connections a lane may have.
const MAX_CONNECTION_COUNT: usize = shotover_crds::validate::MAX_SHARED_CONNECTIONS as usize;

pub struct RedisSinkSingleBuilder {
    shared: Arc<Shared>,
    pool: Option<Arc<shared::Pool>>,
}

/// Default of `max_buffered_reply_bytes`.
pub(crate) const DEFAULT_REPLY_CAP: usize = 4 * 1024 * 1024;

/// What every client connection's sink shares: the upstream, its settings and the sink's
/// metrics.
pub(crate) struct Shared {
    pub(crate) upstream: Upstream,
    pub(crate) failed_requests: Counter,
    /// How long requests may wait with nothing arriving (`read_timeout`).
    pub(crate) read_timeout: Option<Duration>,
    /// Most reply bytes held for one client (`max_buffered_reply_bytes`).
    pub(crate) reply_cap: usize,
}

impl Shared {
    /// Every request gets `-ERR shotover: upstream <addr> <what>`; counted as failed.
    fn unreachable(&self, requests: &[Message], what: &str) -> Messages {
        tracing::debug!(upstream = %self.upstream.address, error = %what, "upstream unreachable");
        self.failed_requests.add(requests.len() as u64);
        let text = format!("ERR shotover: upstream {} {what}", self.upstream.address);
        requests
            .iter()
            .map(|r| Message::error_reply(r.id, &text))
            .collect()
    }
}

impl RedisSinkSingleBuilder {
    pub fn new(config: &RedisSinkSingleConfig, chain: &str) -> Result<Self> {
        let name = config.name.as_deref().unwrap_or("RedisSinkSingle");
        let shared = Arc::new(Shared {
            upstream: Upstream::new(
                &config.remote_address,
                config.connect_timeout_ms,
                config.tls.as_ref(),
            )?,
            failed_requests: failed_requests_counter(chain, name),
            read_timeout: config.read_timeout.map(Duration::from_secs),
            reply_cap: config.max_buffered_reply_bytes.unwrap_or(DEFAULT_REPLY_CAP),
        });
        let pool = match config.connection_count {
            None => None,
            Some(n) if n == 0 || n > MAX_CONNECTION_COUNT => bail!(
                "connection_count is {n}: it must be between 1 and {MAX_CONNECTION_COUNT} (leave it out for one upstream connection per client connection)"
            ),
            Some(n) => Some(Arc::new(shared::Pool::new(shared.clone(), n, chain, name))),
        };
        Ok(RedisSinkSingleBuilder { shared, pool })
    }
}

impl TransformBuilder for RedisSinkSingleBuilder {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform> {
        match &self.pool {
            None => Box::new(RedisSinkSingle {
                conn: Dedicated::lazy(self.shared.clone(), ctx.force_run.clone()),
            }),
            Some(pool) => Box::new(session::SharedSink::new(
                pool.clone(),
                ctx.force_run.clone(),
            )),
        }
    }
}

/// Dedicated mode: one upstream connection for this client connection.
struct RedisSinkSingle {
    conn: Dedicated,
}

#[async_trait]
impl Transform for RedisSinkSingle {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        let requests = std::mem::take(&mut state.requests);
        let responses = self
            .conn
            .run(requests, &mut state.close_client, state.partial)
            .await;
        state.more = self.conn.backlog();
        Ok(responses)
    }
}

/// Whether a request may wait for its reply as long as it likes: a blocking command
/// (`BLPOP` and friends, `XREAD ... BLOCK`, `WAIT`, `WAITAOF`). `read_timeout` spares it.
fn blocks(request: &mut Message) -> bool {
    let name = request.command().name.clone();
    if name.len() > 16 {
        return false;
    }
    let mut upper = [0u8; 16];
    let upper = &mut upper[..name.len()];
    upper.copy_from_slice(&name);
    upper.make_ascii_uppercase();
    blocking(upper, request)
}

/// [`blocks`], given the command name in upper case.
fn blocking(upper: &[u8], request: &mut Message) -> bool {
    match upper {
        b"BLPOP" | b"BRPOP" | b"BRPOPLPUSH" | b"BLMOVE" | b"BLMPOP" | b"BZPOPMIN" | b"BZPOPMAX"
        | b"BZMPOP" | b"WAIT" | b"WAITAOF" => true,
        b"XREAD" | b"XREADGROUP" => match request.frame() {
            Ok(RedisFrame::Array(items)) => items
                .iter()
                .any(|i| matches!(i, RedisFrame::Bulk(b) if b.eq_ignore_ascii_case(b"BLOCK"))),
            // Not understood: assume it may block.
            _ => true,
        },
        _ => false,
    }
}

fn protocol_error(addr: &str, e: DecodeError) -> ChainError {
    ChainError::UpstreamProtocol {
        addr: addr.to_string(),
        reason: e.to_string(),
    }
}

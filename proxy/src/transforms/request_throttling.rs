//! `RequestThrottling`: at most `max_requests_per_second` requests per second pass, across
//! every connection of the chain; the rest are answered at once with an Overloaded error
//! (Redis: `-ERR`), which drivers take as a sign to back off or try another node.
//!
//! A token bucket holding up to one second's worth of requests, refilled continuously: a
//! burst up to the limit passes at once. A CQL BATCH costs one token per statement in it (as
//! upstream Shotover counts it); connection control (STARTUP, OPTIONS, AUTH_RESPONSE,
//! REGISTER) costs nothing, so a throttled proxy still lets drivers connect.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use shotover_crds::transform::RequestThrottlingConfig;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::cassandra::{Opcode, body};
use crate::message::{ErrorKind, Message, Messages, Wire};
use crate::metrics::{self, Counter};

pub struct RequestThrottlingBuilder {
    shared: Arc<Shared>,
}

struct Shared {
    limit: f64,
    bucket: Mutex<Bucket>,
    throttled: Counter,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl RequestThrottlingBuilder {
    pub fn new(config: &RequestThrottlingConfig, chain: &str) -> Self {
        let name = config.name.as_deref().unwrap_or("RequestThrottling");
        let limit = f64::from(config.max_requests_per_second.max(1));
        RequestThrottlingBuilder {
            shared: Arc::new(Shared {
                limit,
                bucket: Mutex::new(Bucket {
                    tokens: limit,
                    refilled: Instant::now(),
                }),
                throttled: metrics::counter(
                    "shotover_throttled_requests_count",
                    "Requests RequestThrottling answered with Overloaded.",
                    &[("chain", chain), ("transform", name)],
                ),
            }),
        }
    }
}

impl TransformBuilder for RequestThrottlingBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(RequestThrottling {
            shared: self.shared.clone(),
        })
    }
}

struct RequestThrottling {
    shared: Arc<Shared>,
}

/// Tokens a request costs.
fn cost(request: &Message) -> f64 {
    let opcode = match request.wire() {
        Wire::Redis => return 1.0,
        Wire::Cql(meta) => meta.header.opcode,
    };
    match opcode {
        Opcode::Query | Opcode::Prepare | Opcode::Execute => 1.0,
        Opcode::Batch => match request.cql_body() {
            Some(Ok(b)) => f64::from(body::batch_len(&b).unwrap_or(1).max(1)),
            _ => 1.0,
        },
        _ => 0.0,
    }
}

#[async_trait]
impl Transform for RequestThrottling {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        if state.requests.is_empty() {
            return state.call_next().await;
        }
        let costs: Vec<f64> = state.requests.iter().map(cost).collect();
        let mut admitted = Vec::with_capacity(costs.len());
        {
            let mut bucket = self.shared.bucket.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * self.shared.limit).min(self.shared.limit);
            bucket.refilled = now;
            for cost in costs {
                // A batch bigger than a whole second's budget passes when the bucket is full.
                let cost = cost.min(self.shared.limit);
                let ok = bucket.tokens >= cost;
                if ok {
                    bucket.tokens -= cost;
                }
                admitted.push(ok);
            }
        }
        let mut refused = Vec::new();
        let requests = std::mem::take(&mut state.requests);
        for (request, ok) in requests.into_iter().zip(admitted) {
            if ok {
                state.requests.push(request);
            } else {
                refused.push(request.error_to(
                    ErrorKind::Overloaded,
                    &format!(
                        "Server overloaded: shotover's RequestThrottling lets {} requests per second through",
                        self.shared.limit
                    ),
                ));
            }
        }
        self.shared.throttled.add(refused.len() as u64);
        let mut responses = if state.requests.is_empty() {
            Vec::new()
        } else {
            state.call_next().await?
        };
        responses.append(&mut refused);
        Ok(responses)
    }
}

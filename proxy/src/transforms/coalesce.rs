//! `Coalesce`: holds requests back until enough are buffered or enough time has passed,
//! then sends them on as one batch. A timer wakes the chain when the time limit passes, so
//! held requests never wait for the next request to arrive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use shotover_crds::transform::CoalesceConfig;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::message::Messages;

pub struct CoalesceBuilder {
    count: Option<usize>,
    interval: Option<Duration>,
}

impl CoalesceBuilder {
    pub fn new(config: &CoalesceConfig) -> Self {
        CoalesceBuilder {
            count: config.flush_when_buffered_message_count,
            interval: config
                .flush_when_millis_since_last_flush
                .map(Duration::from_millis),
        }
    }
}

impl TransformBuilder for CoalesceBuilder {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform> {
        Box::new(Coalesce {
            count: self.count,
            interval: self.interval,
            buffer: Vec::new(),
            last_flush: Instant::now(),
            force_run: ctx.force_run.clone(),
            timer: None,
        })
    }
}

struct Coalesce {
    count: Option<usize>,
    interval: Option<Duration>,
    buffer: Messages,
    last_flush: Instant,
    force_run: Arc<Notify>,
    timer: Option<JoinHandle<()>>,
}

impl Drop for Coalesce {
    fn drop(&mut self) {
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }
}

#[async_trait]
impl Transform for Coalesce {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        self.buffer.append(&mut state.requests);
        let due = state.flush
            || self.count.is_some_and(|n| self.buffer.len() >= n)
            || self
                .interval
                .is_some_and(|d| self.last_flush.elapsed() >= d);
        if due && !self.buffer.is_empty() {
            state.requests = std::mem::take(&mut self.buffer);
            self.last_flush = Instant::now();
            if let Some(timer) = self.timer.take() {
                timer.abort();
            }
        } else if !self.buffer.is_empty()
            && let Some(interval) = self.interval
            && self.timer.as_ref().is_none_or(JoinHandle::is_finished)
        {
            let wait = interval.saturating_sub(self.last_flush.elapsed());
            let force_run = self.force_run.clone();
            self.timer = Some(tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                force_run.notify_one();
            }));
        }
        // Also called with nothing to send, so that the sink can deliver what it received.
        state.call_next().await
    }
}

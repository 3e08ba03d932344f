//! `DebugReturner`: answers every request with a fixed bulk string, or fails the
//! connection (`Fail`), without sending anything upstream. For tests and demos.

use async_trait::async_trait;
use bytes::Bytes;
use shotover_crds::transform::DebugReturnerConfig;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::redis::frame::RedisFrame;
use crate::message::{Message, Messages};

#[derive(Clone)]
pub struct DebugReturnerBuilder {
    name: String,
    /// The encoded reply, or `None` for `Fail`.
    reply: Option<Bytes>,
}

impl DebugReturnerBuilder {
    pub fn new(config: &DebugReturnerConfig) -> Self {
        DebugReturnerBuilder {
            name: config
                .name
                .clone()
                .unwrap_or_else(|| "DebugReturner".into()),
            reply: config
                .redis
                .as_ref()
                .map(|value| RedisFrame::Bulk(Bytes::from(value.clone())).to_bytes()),
        }
    }
}

impl TransformBuilder for DebugReturnerBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}

#[async_trait]
impl Transform for DebugReturnerBuilder {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        if state.requests.is_empty() {
            return Ok(Vec::new());
        }
        match &self.reply {
            Some(reply) => Ok(state
                .requests
                .drain(..)
                .map(|r| Message::response(Some(r.id), reply.clone()))
                .collect()),
            None => Err(ChainError::DebugFail {
                name: self.name.clone(),
            }),
        }
    }
}

//! `NullSink`: answers every request with an error reply and sends nothing anywhere.

use async_trait::async_trait;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::message::{Message, Messages};

pub struct NullSinkBuilder;

impl TransformBuilder for NullSinkBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(NullSink)
    }
}

struct NullSink;

#[async_trait]
impl Transform for NullSink {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        Ok(state
            .requests
            .drain(..)
            .map(|r| Message::error_reply(r.id, "ERR Handled by shotover null transform"))
            .collect())
    }
}

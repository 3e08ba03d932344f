//! `NullSink`: answers every request with an error reply (CQL: a Server error) and sends
//! nothing anywhere.

use async_trait::async_trait;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::message::{ErrorKind, Messages};

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
            .map(|r| r.error_to(ErrorKind::Server, "Handled by shotover null transform"))
            .collect())
    }
}

//! `DebugPrinter`: logs every request and response at INFO, then passes them on unchanged.

use std::sync::Arc;

use async_trait::async_trait;
use shotover_crds::transform::NamedConfig;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::message::{Message, Messages};

pub struct DebugPrinterBuilder {
    name: Arc<str>,
}

impl DebugPrinterBuilder {
    pub fn new(config: &NamedConfig) -> Self {
        DebugPrinterBuilder {
            name: config.name.as_deref().unwrap_or("DebugPrinter").into(),
        }
    }
}

impl TransformBuilder for DebugPrinterBuilder {
    fn build(&self, ctx: &TransformContext) -> Box<dyn Transform> {
        Box::new(DebugPrinter {
            name: self.name.clone(),
            client: ctx.client.clone(),
        })
    }
}

struct DebugPrinter {
    name: Arc<str>,
    client: Arc<str>,
}

fn render(message: &mut Message) -> String {
    if let Some(meta) = message.cql() {
        let header = meta.header;
        return match message.cql_body() {
            Some(Ok(body)) => crate::codec::cassandra::body::describe(&header, Ok(&body)),
            Some(Err(e)) => crate::codec::cassandra::body::describe(&header, Err(&e)),
            None => String::new(),
        };
    }
    match message.frame() {
        Ok(frame) => frame.to_string(),
        Err(e) => format!("<{e}>"),
    }
}

#[async_trait]
impl Transform for DebugPrinter {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        // Parsing every frame costs: skip it all when INFO is filtered out here.
        if !tracing::enabled!(tracing::Level::INFO) {
            return state.call_next().await;
        }
        for request in &mut state.requests {
            let text = render(request);
            tracing::info!(transform = %self.name, client = %self.client, id = request.id, "request: {text}");
        }
        let mut responses = state.call_next().await?;
        for response in &mut responses {
            let text = render(response);
            tracing::info!(transform = %self.name, client = %self.client, request_id = ?response.request_id, "response: {text}");
        }
        Ok(responses)
    }
}

//! `DebugForceParse` and `DebugForceEncode` (upstream's names and fields): parse the
//! messages passing through, and for `DebugForceEncode` send on their re-encoding instead of
//! the bytes read.
//!
//! Forwarding never parses (see `message.rs`), so these measure what parsing costs and check
//! that messages survive the proxy's codecs end to end: a Redis message is parsed into its
//! RESP value and encoded again from it; a CQL envelope has its header encoded again and its
//! body decompressed and compressed again with the connection's compression. A message that
//! does not parse (a reply nested deeper than the parser's cap, say) is passed on as read and
//! counted in `shotover_debug_force_unparsed_count`: these transforms never fail a request.

use async_trait::async_trait;
use shotover_crds::transform::{DebugForceEncodeConfig, DebugForceParseConfig};

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::cassandra;
use crate::message::{Message, Messages};
use crate::metrics::{self, Counter};

#[derive(Clone, Copy)]
struct Sides {
    requests: bool,
    responses: bool,
}

#[derive(Clone)]
pub struct DebugForceBuilder {
    parse: Sides,
    encode: bool,
    unparsed: Counter,
}

impl DebugForceBuilder {
    pub fn parse(config: &DebugForceParseConfig, chain: &str) -> Self {
        let name = config.name.as_deref().unwrap_or("DebugForceParse");
        DebugForceBuilder {
            parse: Sides {
                requests: config.parse_requests,
                responses: config.parse_responses,
            },
            encode: false,
            unparsed: unparsed(chain, name),
        }
    }

    pub fn encode(config: &DebugForceEncodeConfig, chain: &str) -> Self {
        let name = config.name.as_deref().unwrap_or("DebugForceEncode");
        DebugForceBuilder {
            parse: Sides {
                requests: config.encode_requests,
                responses: config.encode_responses,
            },
            encode: true,
            unparsed: unparsed(chain, name),
        }
    }
}

fn unparsed(chain: &str, transform: &str) -> Counter {
    metrics::counter(
        "shotover_debug_force_unparsed_count",
        "Messages a DebugForceParse or DebugForceEncode could not parse (passed on as read).",
        &[("chain", chain), ("transform", transform)],
    )
}

impl TransformBuilder for DebugForceBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}

impl DebugForceBuilder {
    /// Parses `message`, and re-encodes it when this is a `DebugForceEncode`.
    fn force(&self, message: &mut Message) {
        // An empty response stands for a reply the server does not send (CLIENT REPLY OFF).
        if message.is_empty() {
            return;
        }
        let result = match message.cql() {
            Some(meta) => {
                let meta = *meta;
                if self.encode {
                    cassandra::reencode(message.bytes(), &meta.header, meta.compression)
                        .map(|(bytes, header)| message.set_cql_envelope(bytes, header))
                        .map_err(|e| e.to_string())
                } else {
                    message
                        .cql_body()
                        .map_or(Ok(()), |body| body.map(drop).map_err(|e| e.to_string()))
                }
            }
            None if self.encode => message.frame_mut().map(drop).map_err(|e| e.to_string()),
            None => message.frame().map(drop).map_err(|e| e.to_string()),
        };
        if let Err(error) = result {
            self.unparsed.inc();
            tracing::debug!(%error, "passed on a message that does not parse, as read");
        }
    }
}

#[async_trait]
impl Transform for DebugForceBuilder {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        if self.parse.requests {
            for request in &mut state.requests {
                self.force(request);
            }
        }
        let mut responses = state.call_next().await?;
        if self.parse.responses {
            for response in &mut responses {
                self.force(response);
            }
        }
        Ok(responses)
    }
}

//! `QueryTypeFilter`: lets through only requests of the allowed query types; the others are
//! answered with an error reply and never reach the rest of the chain.

use async_trait::async_trait;
use shotover_crds::transform::{QueryType, QueryTypeFilterConfig};

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::message::{Message, Messages};

pub const FILTERED_REPLY: &str = "ERR Message was filtered out by shotover";

#[derive(Clone)]
pub struct QueryTypeFilterBuilder {
    /// `true`: the list is what passes; `false`: the list is what is refused.
    allow: bool,
    list: Vec<QueryType>,
}

impl QueryTypeFilterBuilder {
    pub fn new(config: &QueryTypeFilterConfig) -> Self {
        match (&config.allow_list, &config.deny_list) {
            (Some(list), _) => QueryTypeFilterBuilder {
                allow: true,
                list: list.clone(),
            },
            (None, Some(list)) => QueryTypeFilterBuilder {
                allow: false,
                list: list.clone(),
            },
            // Validation refuses this; pass everything if it ever gets here.
            (None, None) => QueryTypeFilterBuilder {
                allow: false,
                list: Vec::new(),
            },
        }
    }

    fn passes(&self, query_type: QueryType) -> bool {
        self.list.contains(&query_type) == self.allow
    }
}

impl TransformBuilder for QueryTypeFilterBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}

#[async_trait]
impl Transform for QueryTypeFilterBuilder {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        let mut refused = Vec::new();
        let requests = std::mem::take(&mut state.requests);
        for mut request in requests {
            let query_type = request.command().query_type();
            if self.passes(query_type) {
                state.requests.push(request);
            } else {
                refused.push(Message::error_reply(request.id, FILTERED_REPLY));
            }
        }
        // The connection handler puts responses back in request order.
        let mut responses = if state.requests.is_empty() && !refused.is_empty() {
            Vec::new()
        } else {
            state.call_next().await?
        };
        responses.append(&mut refused);
        Ok(responses)
    }
}

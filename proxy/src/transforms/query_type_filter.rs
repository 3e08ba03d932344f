//! `QueryTypeFilter`: lets through only requests of the allowed query types; the others are
//! answered with an error reply (CQL: a Server error) and never reach the rest of the chain.
//!
//! CQL requests are classified by the first keyword of their statement (QUERY and PREPARE),
//! as writes (BATCH), or, for EXECUTE, by the statement that was prepared: the filter
//! remembers the type of every statement it saw prepared, in a map shared by all
//! connections of the chain. Connection control (STARTUP, OPTIONS, AUTH_RESPONSE, REGISTER)
//! always passes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use shotover_crds::transform::{QueryType, QueryTypeFilterConfig};

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::cassandra::{Opcode, body};
use crate::message::{ErrorKind, Message, MessageId, Messages, Wire};

pub const FILTERED_MESSAGE: &str = "Message was filtered out by shotover";
/// Most prepared statements remembered per filter; past it, unknown ones count as writes.
const MAX_PREPARED: usize = 100_000;

#[derive(Clone)]
pub struct QueryTypeFilterBuilder {
    /// `true`: the list is what passes; `false`: the list is what is refused.
    allow: bool,
    list: Vec<QueryType>,
    /// Prepared statement id -> what the statement does.
    prepared: Arc<Mutex<HashMap<Vec<u8>, QueryType>>>,
    /// This connection's PREPARE requests waiting for their id.
    preparing: HashMap<MessageId, QueryType>,
}

impl QueryTypeFilterBuilder {
    pub fn new(config: &QueryTypeFilterConfig) -> Self {
        let (allow, list) = match (&config.allow_list, &config.deny_list) {
            (Some(list), _) => (true, list.clone()),
            (None, Some(list)) => (false, list.clone()),
            // Validation refuses this; pass everything if it ever gets here.
            (None, None) => (false, Vec::new()),
        };
        QueryTypeFilterBuilder {
            allow,
            list,
            prepared: Arc::default(),
            preparing: HashMap::new(),
        }
    }

    fn passes(&self, query_type: QueryType) -> bool {
        self.list.contains(&query_type) == self.allow
    }

    /// What a request does; `None` for connection control, which always passes. An
    /// unreadable CQL body counts as a write.
    fn classify(&mut self, request: &mut Message) -> Option<QueryType> {
        let opcode = match request.wire() {
            Wire::Redis => return Some(request.command().query_type()),
            Wire::Cql(meta) => meta.header.opcode,
        };
        let body = request.cql_body()?;
        let Ok(body) = body else {
            return Some(QueryType::Write);
        };
        match opcode {
            Opcode::Query | Opcode::Prepare => {
                let kind = body::query_text(&body)
                    .map(|q| body::statement_type(&body::statement_keyword(q)))
                    .unwrap_or(QueryType::Write);
                if opcode == Opcode::Prepare {
                    self.preparing.insert(request.id, kind);
                }
                Some(kind)
            }
            Opcode::Execute => Some(
                body::execute_id(&body)
                    .ok()
                    .and_then(|id| {
                        let map = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
                        map.get(id).copied()
                    })
                    .unwrap_or(QueryType::Write),
            ),
            Opcode::Batch => Some(QueryType::Write),
            _ => None,
        }
    }

    /// Learns the ids of the statements this connection prepared.
    fn learn_prepared(&mut self, responses: &[Message]) {
        if self.preparing.is_empty() {
            return;
        }
        for response in responses {
            let Some(kind) = response
                .request_id
                .and_then(|id| self.preparing.remove(&id))
            else {
                continue;
            };
            if let Some(Ok(body)) = response.cql_body()
                && let Ok(Some(id)) = body::prepared_id(&body)
            {
                let mut map = self.prepared.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() < MAX_PREPARED || map.contains_key(id) {
                    map.insert(id.to_vec(), kind);
                }
            }
        }
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
            if self.classify(&mut request).is_none_or(|t| self.passes(t)) {
                state.requests.push(request);
            } else {
                self.preparing.remove(&request.id);
                refused.push(request.error_to(ErrorKind::Server, FILTERED_MESSAGE));
            }
        }
        // The connection handler puts responses back in request order.
        let mut responses = if state.requests.is_empty() && !refused.is_empty() {
            Vec::new()
        } else {
            state.call_next().await?
        };
        self.learn_prepared(&responses);
        responses.append(&mut refused);
        Ok(responses)
    }
}

//! `QueryCounter`: counts requests by command in
//! `shotover_query_count{name, query, type="redis"|"cassandra"}`.
//!
//! A Redis request counts under its command name. A CQL QUERY counts under the first keyword
//! of its statement (`SELECT`, `INSERT`, `CREATE`...); other CQL requests under their opcode
//! (`EXECUTE`, `PREPARE`, `BATCH`, `STARTUP`...).
//!
//! Names come from clients, so the label set is bounded in number and in length: after
//! [`MAX_COMMANDS`] distinct names per counter, and for any name longer than [`MAX_LABEL`]
//! bytes (no Redis command or CQL keyword is), requests count as `other`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use shotover_crds::transform::QueryCounterConfig;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::cassandra::{Opcode, body};
use crate::message::{Message, Messages, Wire};
use crate::metrics::{self, Counter};

/// Most distinct `query` label values per counter.
pub const MAX_COMMANDS: usize = 512;
/// Longest `query` label value, in bytes.
pub const MAX_LABEL: usize = 64;
/// Most names a connection remembers locally before asking the shared map each time.
const LOCAL_CACHE: usize = 64;

pub struct QueryCounterBuilder {
    shared: Arc<Shared>,
}

struct Shared {
    counter_name: String,
    by_command: Mutex<HashMap<(String, &'static str), Counter>>,
}

impl Shared {
    fn counter(&self, command: &str, protocol: &'static str) -> Counter {
        let mut map = self.by_command.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&(command.to_string(), protocol)) {
            return c.clone();
        }
        let label = if map.len() >= MAX_COMMANDS || command.len() > MAX_LABEL {
            "other"
        } else {
            command
        };
        let c = metrics::counter(
            "shotover_query_count",
            "Requests counted by QueryCounter transforms, by command.",
            &[
                ("name", &self.counter_name),
                ("query", label),
                ("type", protocol),
            ],
        );
        map.insert((label.to_string(), protocol), c.clone());
        c
    }
}

impl QueryCounterBuilder {
    pub fn new(config: &QueryCounterConfig) -> Self {
        QueryCounterBuilder {
            shared: Arc::new(Shared {
                counter_name: config.counter().unwrap_or("QueryCounter").to_string(),
                by_command: Mutex::new(HashMap::new()),
            }),
        }
    }
}

impl TransformBuilder for QueryCounterBuilder {
    fn build(&self, _: &TransformContext) -> Box<dyn Transform> {
        Box::new(QueryCounter {
            shared: self.shared.clone(),
            local: HashMap::new(),
            local_cql: HashMap::new(),
        })
    }
}

struct QueryCounter {
    shared: Arc<Shared>,
    /// Keyed by the name as sent, so the common case costs one hash lookup.
    local: HashMap<Bytes, Counter>,
    local_cql: HashMap<String, Counter>,
}

#[async_trait]
impl Transform for QueryCounter {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        for request in &mut state.requests {
            if let Wire::Cql(_) = request.wire() {
                let label = cql_label(request);
                if let Some(counter) = self.local_cql.get(&label) {
                    counter.inc();
                    continue;
                }
                let counter = self.shared.counter(&label, "cassandra");
                counter.inc();
                if self.local_cql.len() < LOCAL_CACHE && label.len() <= MAX_LABEL {
                    self.local_cql.insert(label, counter);
                }
                continue;
            }
            let command = request.command();
            if let Some(counter) = self.local.get(&command.name) {
                counter.inc();
                continue;
            }
            let label = if command.name.is_empty() {
                "unknown".to_string()
            } else if command.name.len() > MAX_LABEL {
                "other".to_string()
            } else {
                command.upper_name()
            };
            let counter = self.shared.counter(&label, "redis");
            counter.inc();
            if self.local.len() < LOCAL_CACHE && command.name.len() <= MAX_LABEL {
                // Copied: a slice would keep the request's whole buffer alive.
                self.local
                    .insert(Bytes::copy_from_slice(&command.name), counter);
            }
        }
        state.call_next().await
    }
}

/// The `query` label of a CQL request.
fn cql_label(request: &Message) -> String {
    let Some(meta) = request.cql() else {
        return "unknown".into();
    };
    if meta.header.opcode != Opcode::Query {
        return meta.header.opcode.name().to_string();
    }
    let keyword = match request.cql_body() {
        Some(Ok(b)) => body::query_text(&b)
            .map(body::statement_keyword)
            .unwrap_or_default(),
        _ => String::new(),
    };
    if keyword.is_empty() {
        "unknown".into()
    } else {
        keyword
    }
}

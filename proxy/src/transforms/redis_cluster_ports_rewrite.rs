//! `RedisClusterPortsRewrite` (upstream's `ValkeyClusterPortsRewrite`): writes `new_port`
//! over the nodes' ports in `CLUSTER SLOTS`, `CLUSTER NODES` and `CLUSTER SHARDS` replies
//! and in `MOVED`/`ASK` errors, so that a cluster-aware client sends everything to the
//! proxies (each proxy routes it to the right node).

use async_trait::async_trait;
use bytes::Bytes;
use shotover_crds::transform::RedisClusterPortsRewriteConfig;

use crate::chain::{ChainError, ChainState, Transform, TransformBuilder, TransformContext};
use crate::codec::redis::frame::RedisFrame;
use crate::message::{Message, MessageId, Messages};

pub struct RedisClusterPortsRewriteBuilder {
    port: u16,
}

impl RedisClusterPortsRewriteBuilder {
    pub fn new(config: &RedisClusterPortsRewriteConfig) -> Self {
        RedisClusterPortsRewriteBuilder {
            port: config.new_port,
        }
    }
}

impl TransformBuilder for RedisClusterPortsRewriteBuilder {
    fn build(&self, _ctx: &TransformContext) -> Box<dyn Transform> {
        Box::new(RedisClusterPortsRewrite {
            port: self.port,
            asked: Vec::new(),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Asked {
    Slots,
    Nodes,
    Shards,
}

struct RedisClusterPortsRewrite {
    port: u16,
    /// CLUSTER requests whose replies are still to come (they may come in a later run).
    asked: Vec<(MessageId, Asked)>,
}

fn asked(request: &mut Message) -> Option<Asked> {
    let command = request.command();
    if !command.name.eq_ignore_ascii_case(b"CLUSTER") {
        return None;
    }
    let sub = command.arg1.as_ref()?;
    if sub.eq_ignore_ascii_case(b"SLOTS") {
        Some(Asked::Slots)
    } else if sub.eq_ignore_ascii_case(b"NODES")
        || sub.eq_ignore_ascii_case(b"REPLICAS")
        || sub.eq_ignore_ascii_case(b"SLAVES")
    {
        Some(Asked::Nodes)
    } else if sub.eq_ignore_ascii_case(b"SHARDS") {
        Some(Asked::Shards)
    } else {
        None
    }
}

#[async_trait]
impl Transform for RedisClusterPortsRewrite {
    async fn transform(&mut self, state: &mut ChainState<'_>) -> Result<Messages, ChainError> {
        for request in state.requests.iter_mut() {
            if let Some(kind) = asked(request) {
                self.asked.push((request.id, kind));
            }
        }
        let mut responses = state.call_next().await?;
        for response in responses.iter_mut() {
            let Some(bytes) = response.raw_bytes() else {
                continue;
            };
            if bytes.starts_with(b"-MOVED ") || bytes.starts_with(b"-ASK ") {
                let rewritten = rewrite_redirect(bytes, self.port);
                *response = Message::response(response.request_id, rewritten);
                continue;
            }
            let Some(id) = response.request_id else {
                continue;
            };
            let Some(at) = self.asked.iter().position(|(i, _)| *i == id) else {
                continue;
            };
            let (_, kind) = self.asked.swap_remove(at);
            if let Some(rewritten) = rewrite(bytes, kind, self.port) {
                *response = Message::response(Some(id), rewritten);
            }
        }
        Ok(responses)
    }
}

fn rewrite_redirect(bytes: &Bytes, port: u16) -> Bytes {
    let text = String::from_utf8_lossy(bytes);
    let line = text.trim_end_matches("\r\n");
    match line.rsplit_once(':') {
        Some((head, old)) if old.parse::<u16>().is_ok() => format!("{head}:{port}\r\n").into(),
        _ => bytes.clone(),
    }
}

fn rewrite(bytes: &Bytes, kind: Asked, port: u16) -> Option<Bytes> {
    let mut frame = RedisFrame::parse(bytes).ok()?;
    match kind {
        Asked::Slots => {
            let RedisFrame::Array(ranges) = &mut frame else {
                return None;
            };
            for range in ranges {
                if let RedisFrame::Array(items) = range {
                    for node in items.iter_mut().skip(2) {
                        if let RedisFrame::Array(parts) = node
                            && let Some(p @ RedisFrame::Integer(_)) = parts.get_mut(1)
                        {
                            *p = RedisFrame::Integer(port as i64);
                        }
                    }
                }
            }
        }
        Asked::Nodes => {
            let text = match &frame {
                RedisFrame::Bulk(t) | RedisFrame::Verbatim(t) => t.clone(),
                RedisFrame::Array(lines) => {
                    // CLUSTER REPLICAS: one bulk per node.
                    let lines = lines
                        .iter()
                        .map(|l| match l {
                            RedisFrame::Bulk(t) => RedisFrame::Bulk(nodes_text(t, port).into()),
                            other => other.clone(),
                        })
                        .collect();
                    return Some(RedisFrame::Array(lines).to_bytes());
                }
                _ => return None,
            };
            frame = match frame {
                RedisFrame::Verbatim(_) => {
                    // `txt:` prefix kept.
                    let (prefix, body) = text.split_at(4.min(text.len()));
                    let mut out = prefix.to_vec();
                    out.extend_from_slice(
                        nodes_text(&Bytes::copy_from_slice(body), port).as_bytes(),
                    );
                    RedisFrame::Verbatim(out.into())
                }
                _ => RedisFrame::Bulk(nodes_text(&text, port).into()),
            };
        }
        Asked::Shards => {
            let RedisFrame::Array(shards) = &mut frame else {
                return None;
            };
            for shard in shards {
                for_each_field(shard, b"nodes", &mut |nodes| {
                    if let RedisFrame::Array(nodes) = nodes {
                        for node in nodes {
                            for_each_field(node, b"port", &mut |p| {
                                if matches!(p, RedisFrame::Integer(_)) {
                                    *p = RedisFrame::Integer(port as i64);
                                }
                            });
                        }
                    }
                });
            }
        }
    }
    Some(frame.to_bytes())
}

/// Calls `f` on the value of `key` in a flat key/value array (RESP2) or a map (RESP3).
fn for_each_field(frame: &mut RedisFrame, key: &[u8], f: &mut dyn FnMut(&mut RedisFrame)) {
    match frame {
        RedisFrame::Array(items) => {
            let mut i = 0;
            while i + 1 < items.len() {
                if items[i].as_bytes().is_some_and(|k| k.as_ref() == key) {
                    f(&mut items[i + 1]);
                }
                i += 2;
            }
        }
        RedisFrame::Map(pairs) => {
            for (k, v) in pairs {
                if k.as_bytes().is_some_and(|k| k.as_ref() == key) {
                    f(v);
                }
            }
        }
        _ => {}
    }
}

/// `CLUSTER NODES` text: `<id> <ip:port@cport[,hostname]> ...` per line; the port replaced.
fn nodes_text(text: &Bytes, port: u16) -> String {
    let text = String::from_utf8_lossy(text);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let mut fields = line.splitn(3, ' ');
        let (Some(id), Some(addr)) = (fields.next(), fields.next()) else {
            out.push_str(line);
            continue;
        };
        let rest = fields.next();
        let rewritten = match addr.find('@').map(|at| addr.split_at(at)) {
            Some((hostport, tail)) => match hostport.rsplit_once(':') {
                Some((host, _)) => format!("{host}:{port}{tail}"),
                None => addr.to_string(),
            },
            None => match addr.rsplit_once(':') {
                Some((host, _)) => format!("{host}:{port}"),
                None => addr.to_string(),
            },
        };
        out.push_str(id);
        out.push(' ');
        out.push_str(&rewritten);
        if let Some(rest) = rest {
            out.push(' ');
            out.push_str(rest);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_rewritten() {
        let slots = Bytes::from_static(
            b"*1\r\n*4\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7003\r\n$2\r\nid\r\n",
        );
        assert_eq!(
            rewrite(&slots, Asked::Slots, 6380).expect("ok"),
            Bytes::from_static(
                b"*1\r\n*4\r\n:0\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:6380\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:6380\r\n$2\r\nid\r\n"
            )
        );
        let nodes = "a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\nb2 127.0.0.1:7001@17001,host master - 0 0 2 connected 5461-16383\n";
        assert_eq!(
            nodes_text(&Bytes::from(nodes), 6380),
            "a1 127.0.0.1:6380@17000 myself,master - 0 0 1 connected 0-5460\nb2 127.0.0.1:6380@17001,host master - 0 0 2 connected 5461-16383\n"
        );
        assert_eq!(
            rewrite_redirect(&Bytes::from_static(b"-MOVED 3999 127.0.0.1:7002\r\n"), 6380),
            Bytes::from_static(b"-MOVED 3999 127.0.0.1:6380\r\n")
        );
        let shards = RedisFrame::Array(vec![RedisFrame::Array(vec![
            RedisFrame::Bulk("slots".into()),
            RedisFrame::Array(vec![]),
            RedisFrame::Bulk("nodes".into()),
            RedisFrame::Array(vec![RedisFrame::Array(vec![
                RedisFrame::Bulk("id".into()),
                RedisFrame::Bulk("x".into()),
                RedisFrame::Bulk("port".into()),
                RedisFrame::Integer(7000),
            ])]),
        ])]);
        let out = RedisFrame::parse(&rewrite(&shards.to_bytes(), Asked::Shards, 1).expect("ok"))
            .expect("ok");
        assert!(format!("{out:?}").contains("Integer(1)"));
    }
}

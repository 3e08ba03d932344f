//! Hash slots and the slot map of a Redis Cluster: which node serves each of the 16384
//! slots, learnt from `CLUSTER SLOTS`.

use bytes::Bytes;

use crate::codec::redis::frame::RedisFrame;

pub const SLOTS: usize = 16384;

/// CRC16/XMODEM, the checksum Redis Cluster hashes keys with.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: the CRC16 of its hash tag (the part between the first `{` and the
/// next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// No node serves the slot.
pub const NONE: u16 = u16::MAX;

/// Which node (an index into the sink's node list) is the master of each slot, and the
/// replicas of each master.
#[derive(Clone)]
pub struct SlotMap {
    pub masters_of: Box<[u16]>,
    /// Each master once, in slot order.
    pub masters: Vec<u16>,
    /// Replicas of each master, by master index.
    pub replicas: Vec<(u16, Vec<u16>)>,
}

impl Default for SlotMap {
    fn default() -> Self {
        SlotMap {
            masters_of: vec![NONE; SLOTS].into_boxed_slice(),
            masters: Vec::new(),
            replicas: Vec::new(),
        }
    }
}

impl SlotMap {
    pub fn master(&self, slot: u16) -> Option<u16> {
        let node = *self.masters_of.get(slot as usize)?;
        (node != NONE).then_some(node)
    }
}

/// One range of a `CLUSTER SLOTS` reply: slots `start..=end`, its master's address, and
/// its replicas' addresses.
#[derive(Debug, PartialEq)]
pub struct Range {
    pub start: u16,
    pub end: u16,
    pub master: String,
    pub replicas: Vec<String>,
}

/// Reads a `CLUSTER SLOTS` reply. A node whose host is empty or `?` (Redis's "unknown")
/// is given the host of the node that answered (`answered_by`), as Redis clients do.
pub fn parse_cluster_slots(reply: &Bytes, answered_by: &str) -> Result<Vec<Range>, String> {
    let frame = RedisFrame::parse(reply).map_err(|e| e.to_string())?;
    let RedisFrame::Array(ranges) = frame else {
        return Err(match frame {
            RedisFrame::Error(e) | RedisFrame::BlobError(e) => {
                String::from_utf8_lossy(&e).into_owned()
            }
            _ => "CLUSTER SLOTS did not answer with an array".into(),
        });
    };
    let default_host = answered_by
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(answered_by);
    let mut out = Vec::with_capacity(ranges.len());
    for range in ranges {
        let RedisFrame::Array(items) = range else {
            return Err("a CLUSTER SLOTS range is not an array".into());
        };
        let int = |f: &RedisFrame| match f {
            RedisFrame::Integer(n) if (0..SLOTS as i64).contains(n) => Some(*n as u16),
            _ => None,
        };
        let (Some(start), Some(end)) = (items.first().and_then(int), items.get(1).and_then(int))
        else {
            return Err("a CLUSTER SLOTS range has no valid slot bounds".into());
        };
        let mut nodes = items[2..].iter().map(|node| node_addr(node, default_host));
        let master = nodes
            .next()
            .flatten()
            .ok_or("a CLUSTER SLOTS range has no master")?;
        out.push(Range {
            start,
            end,
            master,
            replicas: nodes.flatten().collect(),
        });
    }
    Ok(out)
}

fn node_addr(node: &RedisFrame, default_host: &str) -> Option<String> {
    let RedisFrame::Array(parts) = node else {
        return None;
    };
    let host = match parts.first()? {
        RedisFrame::Bulk(h) | RedisFrame::Simple(h) => String::from_utf8_lossy(h).into_owned(),
        RedisFrame::NullBulk | RedisFrame::Null => String::new(),
        _ => return None,
    };
    let port = match parts.get(1)? {
        RedisFrame::Integer(p) if (1..=65535).contains(p) => *p,
        _ => return None,
    };
    let host = if host.is_empty() || host == "?" {
        default_host.to_string()
    } else {
        host
    };
    if host.contains(':') {
        Some(format!("[{host}]:{port}"))
    } else {
        Some(format!("{host}:{port}"))
    }
}

/// Parses `MOVED <slot> <host:port>` and `ASK <slot> <host:port>` errors: whether it is an
/// ASK, the slot, and the address.
pub fn redirect(reply: &[u8]) -> Option<(bool, u16, String)> {
    let text = reply.strip_prefix(b"-")?;
    let (ask, rest) = if let Some(rest) = text.strip_prefix(b"MOVED ") {
        (false, rest)
    } else if let Some(rest) = text.strip_prefix(b"ASK ") {
        (true, rest)
    } else {
        return None;
    };
    let rest = std::str::from_utf8(rest).ok()?.trim_end();
    let (slot, addr) = rest.split_once(' ')?;
    let slot: u16 = slot.parse().ok().filter(|&s| (s as usize) < SLOTS)?;
    // Redis 7 may leave the host out (`:port`) when it is unknown: the caller fills it in.
    Some((ask, slot, addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // From the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"{user1000}.followers"), slot(b"user1000"));
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(slot(b"foo{{bar}}zap"), slot(b"{bar"));
        assert_eq!(slot(b"foo{bar}{zap}"), slot(b"bar"));
        assert_eq!(slot(b""), 0);
    }

    #[test]
    fn cluster_slots_replies_are_read() {
        let reply = Bytes::from_static(
            b"*2\r\n*4\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$4\r\nid-a\r\n*3\r\n$9\r\n127.0.0.1\r\n:7003\r\n$4\r\nid-d\r\n*3\r\n:5461\r\n:16383\r\n*2\r\n$0\r\n\r\n:7001\r\n",
        );
        let ranges = parse_cluster_slots(&reply, "10.0.0.9:7001").expect("ok");
        assert_eq!(
            ranges,
            vec![
                Range {
                    start: 0,
                    end: 5460,
                    master: "127.0.0.1:7000".into(),
                    replicas: vec!["127.0.0.1:7003".into()],
                },
                Range {
                    start: 5461,
                    end: 16383,
                    master: "10.0.0.9:7001".into(),
                    replicas: vec![],
                },
            ]
        );
        let error = Bytes::from_static(b"-ERR This instance has cluster support disabled\r\n");
        assert_eq!(
            parse_cluster_slots(&error, "a:1").expect_err("an error"),
            "ERR This instance has cluster support disabled"
        );
        assert!(parse_cluster_slots(&Bytes::from_static(b"*1\r\n:3\r\n"), "a:1").is_err());
    }

    #[test]
    fn redirects_are_read() {
        assert_eq!(
            redirect(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some((false, 3999, "127.0.0.1:6381".into()))
        );
        assert_eq!(
            redirect(b"-ASK 3999 127.0.0.1:6381\r\n"),
            Some((true, 3999, "127.0.0.1:6381".into()))
        );
        assert_eq!(redirect(b"-MOVED 99999 a:1\r\n"), None);
        assert_eq!(redirect(b"-ERR MOVED\r\n"), None);
        assert_eq!(redirect(b"+OK\r\n"), None);
    }
}

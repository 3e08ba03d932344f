//! Cassandra helpers of the integration tests: where the real nodes are, topologies, the
//! Python driver workout, and a small raw CQL client for what drivers hide.

pub use crate::process::*;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use shotover::codec::cassandra::Compression;
use shotover::codec::cassandra::segment::{SegmentCodec, SegmentDecoder};

/// The plain node. A missing server is a failure, not a skip.
pub fn cassandra_addr() -> String {
    std::env::var("CASSANDRA_PLAIN_ADDR").expect(
        "CASSANDRA_PLAIN_ADDR is not set: start Cassandra with `eval \"$(e2e/services up cassandra cassandra-auth-tls)\"` (the test command does this)",
    )
}

/// The node with PasswordAuthenticator and TLS: address, user, password, CA, and the dir
/// with its PEM server certificate and key (for 127.0.0.1, reused by the proxy's source).
pub struct AuthTls {
    pub addr: String,
    pub user: String,
    pub password: String,
    pub ca: String,
    pub dir: String,
}

pub fn auth_tls() -> AuthTls {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!(
                "{name} is not set: start it with `eval \"$(e2e/services up cassandra-auth-tls)\"`"
            )
        })
    };
    AuthTls {
        addr: var("CASSANDRA_AUTH_TLS_ADDR"),
        user: var("CASSANDRA_USER"),
        password: var("CASSANDRA_PASSWORD"),
        ca: var("CASSANDRA_TLS_CA"),
        dir: var("CASSANDRA_TLS_DIR"),
    }
}

/// A keyspace name unique to one test run.
pub fn keyspace(test: &str) -> String {
    prefix(test)
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect::<String>()
        .trim_end_matches('_')
        .to_string()
}

/// A Cassandra source on `port` whose chain is `chain` (YAML list items, indented 8).
pub fn topology(port: u16, chain: &str) -> String {
    format!(
        "sources:\n  - Cassandra:\n      name: cql\n      listen_addr: \"127.0.0.1:{port}\"\n      chain:\n{chain}"
    )
}

/// The sink line for the plain node.
pub fn sink() -> String {
    format!(
        "        - CassandraSinkSingle:\n            remote_address: \"{}\"\n",
        cassandra_addr()
    )
}

/// Runs `py/workout.py` against `addr` in its own keyspace; returns its output.
pub fn workout(addr: &str, test: &str, args: &[&str]) -> String {
    let ks = keyspace(test);
    let mut all = vec![addr, ks.as_str()];
    all.extend_from_slice(args);
    let out = python_in("tests/cassandra_int/py", "workout.py", &all);
    for check in [
        "ok schema",
        "ok insert_select",
        "ok prepared",
        "ok paging 5000 rows",
        "ok batch",
        "ok lwt",
        "ok errors",
        "ok use_keyspace",
        "done",
    ] {
        assert!(out.contains(check), "`{check}` missing from:\n{out}");
    }
    out
}

// ---- a raw CQL client ----

pub const OPCODE_ERROR: u8 = 0x00;
pub const OPCODE_STARTUP: u8 = 0x01;
pub const OPCODE_READY: u8 = 0x02;
pub const OPCODE_OPTIONS: u8 = 0x05;
pub const OPCODE_SUPPORTED: u8 = 0x06;
pub const OPCODE_QUERY: u8 = 0x07;
pub const OPCODE_RESULT: u8 = 0x08;
pub const OPCODE_REGISTER: u8 = 0x0B;
pub const OPCODE_EVENT: u8 = 0x0C;

/// One frame as read: version (without the direction bit), stream, opcode, body.
#[derive(Debug)]
pub struct Frame {
    pub version: u8,
    pub stream: i16,
    pub opcode: u8,
    pub body: Vec<u8>,
}

impl Frame {
    /// The code and message of an ERROR.
    pub fn error(&self) -> (i32, String) {
        assert_eq!(self.opcode, OPCODE_ERROR, "not an ERROR: {self:?}");
        let code = i32::from_be_bytes(self.body[0..4].try_into().expect("4 bytes"));
        let len = u16::from_be_bytes([self.body[4], self.body[5]]) as usize;
        (
            code,
            String::from_utf8_lossy(&self.body[6..6 + len]).to_string(),
        )
    }
}

pub fn frame(version: u8, stream: i16, opcode: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![version, 0];
    out.extend(stream.to_be_bytes());
    out.push(opcode);
    out.extend((body.len() as i32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend(s.as_bytes());
    out
}

pub fn startup(stream: i16) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend(string("CQL_VERSION"));
    body.extend(string("3.0.0"));
    frame(4, stream, OPCODE_STARTUP, &body)
}

/// A QUERY at consistency ONE with no values.
pub fn query(stream: i16, cql: &str) -> Vec<u8> {
    let mut body = (cql.len() as i32).to_be_bytes().to_vec();
    body.extend(cql.as_bytes());
    body.extend([0, 1, 0]);
    frame(4, stream, OPCODE_QUERY, &body)
}

pub fn register(stream: i16, events: &[&str]) -> Vec<u8> {
    let mut body = (events.len() as u16).to_be_bytes().to_vec();
    for e in events {
        body.extend(string(e));
    }
    frame(4, stream, OPCODE_REGISTER, &body)
}

/// A raw connection to the proxy.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the proxy");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Raw { stream }
    }

    /// Connects and completes STARTUP (the plain node needs no login).
    pub fn ready(port: u16) -> Raw {
        let mut raw = Raw::connect(port);
        raw.send(&startup(0));
        let ready = raw.read();
        assert_eq!(ready.opcode, OPCODE_READY, "{ready:?}");
        raw
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("writing to the proxy");
    }

    /// Reads one frame; fails the test on EOF or after 20 s.
    pub fn read(&mut self) -> Frame {
        let mut header = [0u8; 9];
        self.stream
            .read_exact(&mut header)
            .expect("reading a frame header from the proxy");
        let len = i32::from_be_bytes(header[5..9].try_into().expect("4 bytes")) as usize;
        let mut body = vec![0; len];
        self.stream.read_exact(&mut body).expect("reading a body");
        Frame {
            version: header[0] & 0x7F,
            stream: i16::from_be_bytes([header[2], header[3]]),
            opcode: header[4],
            body,
        }
    }

    /// Sends a QUERY and returns its answer (events on the way are skipped).
    pub fn query(&mut self, stream: i16, cql: &str) -> Frame {
        self.send(&query(stream, cql));
        loop {
            let frame = self.read();
            if frame.stream == stream {
                return frame;
            }
        }
    }
}

// ------------------------------------------------------------------------- protocol v5

/// A v5 QUERY at consistency ONE with no values (v5 query flags are an int).
pub fn query_v5(stream: i16, cql: &str) -> Vec<u8> {
    let mut body = (cql.len() as i32).to_be_bytes().to_vec();
    body.extend(cql.as_bytes());
    body.extend([0, 1, 0, 0, 0, 0]);
    frame(5, stream, OPCODE_QUERY, &body)
}

/// `envelopes` as v5 segments (the proxy's codec; real drivers check it against theirs).
pub fn v5_segments(envelopes: &[Vec<u8>], lz4: bool) -> Vec<u8> {
    let codec = SegmentCodec::new(if lz4 {
        Compression::Lz4
    } else {
        Compression::None
    });
    let mut out = bytes::BytesMut::new();
    codec.encode(envelopes.iter().map(Vec::as_slice), &mut out);
    out.to_vec()
}

/// A raw v5 connection past its handshake: it speaks in segments.
pub struct V5 {
    pub raw: Raw,
    lz4: bool,
    decoder: SegmentDecoder,
    buf: bytes::BytesMut,
}

impl V5 {
    /// Connects, sends STARTUP in v5 (asking for `compression`) and waits for READY.
    pub fn ready(port: u16, compression: Option<&str>) -> V5 {
        let mut raw = Raw::connect(port);
        let mut body = vec![0, if compression.is_some() { 2 } else { 1 }];
        body.extend(string("CQL_VERSION"));
        body.extend(string("3.0.0"));
        if let Some(c) = compression {
            body.extend(string("COMPRESSION"));
            body.extend(string(c));
        }
        raw.send(&frame(5, 0, OPCODE_STARTUP, &body));
        let ready = raw.read();
        assert_eq!(
            (ready.version, ready.opcode),
            (5, OPCODE_READY),
            "{ready:?}"
        );
        let lz4 = compression == Some("lz4");
        let codec = SegmentCodec::new(if lz4 {
            Compression::Lz4
        } else {
            Compression::None
        });
        V5 {
            raw,
            lz4,
            decoder: SegmentDecoder::new(codec, 1 << 28),
            buf: bytes::BytesMut::new(),
        }
    }

    /// Reads one envelope out of the segments; fails the test on EOF or after 20 s.
    pub fn read(&mut self) -> Frame {
        loop {
            if let Some((bytes, header)) = self.decoder.next(&mut self.buf).expect("valid segments")
            {
                return Frame {
                    version: header.version,
                    stream: header.stream,
                    opcode: bytes[4],
                    body: bytes[9..].to_vec(),
                };
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.raw.stream.read(&mut chunk).expect("reading segments");
            assert!(n > 0, "the proxy closed the connection");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn query(&mut self, stream: i16, cql: &str) -> Frame {
        self.raw
            .send(&v5_segments(&[query_v5(stream, cql)], self.lz4));
        loop {
            let frame = self.read();
            if frame.stream == stream {
                return frame;
            }
        }
    }
}

//! What the fuzz targets run: one function per decoder a peer controls, each feeding the
//! input through the proxy's (or the webhook's) own code and checking what must hold for
//! any input. A panic, an overflow or a broken invariant is a finding.
//!
//! The libFuzzer binaries (`fuzz/targets`, built by `fuzz/run`) call these; so does
//! `tests/replay.rs`, on the seed corpora and on every crash kept in `fuzz/regressions`, in
//! the ordinary test run. See `docs/fuzzing.md`.

use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use shotover::codec::cassandra::segment::{SegmentCodec, SegmentDecoder};
use shotover::codec::cassandra::{
    self as cql, Compression, Direction, EnvelopeDecoder, HEADER_LEN, Header, Opcode, body, rows,
};
use shotover::codec::redis::command::{self, Command};
use shotover::codec::redis::frame::RedisFrame;
use shotover::codec::redis::{self as resp, ResponseDecoder};

/// The frame limit the targets decode with: small, so that the refusal of large frames
/// (from their header, before their bytes) is exercised too.
const MAX_FRAME: usize = 1 << 20;

/// A fuzz target: any bytes in, a panic on a finding.
pub type Target = fn(&[u8]);

/// Every fuzz target, by the name of its corpus and regression folders.
pub const TARGETS: &[(&str, Target)] = &[
    ("redis_request", redis_request),
    ("redis_response", redis_response),
    ("cql_request", cql_request),
    ("cql_response", cql_response),
    ("cql_segments", cql_segments),
    ("topology", topology),
    ("admission", admission),
];

/// Requests a Redis client sends: the splitter of the source, the cheap command reader the
/// filters and the session tracking use, and the full parse, against each other.
pub fn redis_request(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut decoder = resp::RequestDecoder::new(MAX_FRAME);
    // At most one frame per input byte (plus one): the decoder must make progress.
    for _ in 0..=data.len() {
        let frame = match decoder.decode(&mut buf) {
            Ok(Some(resp::Request::Frame(frame))) => frame,
            Ok(Some(resp::Request::Ignored)) => continue,
            Ok(None) | Err(_) => return,
        };
        let cheap = Command::of(&frame);
        let _ = (
            cheap.upper_name(),
            cheap.hello_version(),
            cheap.query_type(),
        );
        let _ = command::aggregate_head(&frame);
        let parsed = RedisFrame::parse_request(&frame);
        if frame.first() == Some(&b'*') {
            // The splitter only gives whole multibulks of bulk strings: the full parse reads
            // each one, and agrees with the cheap reader on the command.
            let parsed = parsed.unwrap_or_else(|e| {
                panic!("the splitter gave a frame the parser refuses ({e}): {frame:?}")
            });
            let RedisFrame::Array(args) = &parsed else {
                panic!("a multibulk that is not an array: {parsed:?}");
            };
            let bulks: Vec<&Bytes> = args
                .iter()
                .map(|a| match a {
                    RedisFrame::Bulk(b) => b,
                    other => panic!("a multibulk argument that is not a bulk: {other:?}"),
                })
                .collect();
            if let Some((name, rest)) = bulks.split_first() {
                assert_eq!(&cheap.name, *name, "the command name");
                assert_eq!(cheap.argc, rest.len(), "the argument count");
                assert_eq!(
                    cheap.arg1.as_ref(),
                    rest.first().copied(),
                    "the first argument"
                );
            }
            // Encoding what was parsed gives a frame that parses to the same value.
            let again = RedisFrame::parse_request(&parsed.to_bytes()).expect("re-encoded");
            assert_eq!(again, parsed);
        } else if let Ok(parsed) = parsed {
            let again = RedisFrame::parse_request(&parsed.to_bytes()).expect("re-encoded");
            assert_eq!(again, parsed);
        }
    }
}

/// Replies a Redis server sends (RESP2 and RESP3): the sink's framing, then the full parse,
/// and decode -> encode -> decode.
pub fn redis_response(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut decoder = ResponseDecoder::new(MAX_FRAME);
    for _ in 0..=data.len() {
        let frame = match decoder.decode(&mut buf) {
            Ok(Some(frame)) => frame,
            Ok(None) | Err(_) => return,
        };
        assert!(!frame.is_empty(), "an empty frame");
        let _ = command::aggregate_head(&frame);
        // The full parse refuses values nested deeper than its cap; the framing does not.
        if let Ok(parsed) = RedisFrame::parse(&frame) {
            let _ = parsed.is_error();
            let encoded = parsed.to_bytes();
            let again = RedisFrame::parse(&encoded).expect("an encoded value parses");
            assert_eq!(again, parsed, "decode -> encode -> decode");
            // What the encoder writes frames as one value, as the server's did.
            let mut whole = BytesMut::from(&encoded[..]);
            let framed = ResponseDecoder::new(usize::MAX)
                .decode(&mut whole)
                .expect("framed")
                .expect("whole");
            assert_eq!(framed, encoded);
            assert!(whole.is_empty());
        }
    }
}

/// What the transforms read of a CQL body, for any envelope.
fn read_body(frame: &Bytes, header: &Header, compression: Compression) {
    let _ = body::describe(header, body::body(frame, header, compression).as_deref());
    let Ok(message) = body::message(frame, header, compression) else {
        return;
    };
    let _ = body::extras_len(header, &message);
    match header.opcode {
        Opcode::Query | Opcode::Prepare => {
            if let Ok(query) = body::query_text(&message) {
                let keyword = body::statement_keyword(query);
                let _ = body::statement_type(&keyword);
            }
        }
        Opcode::Batch => {
            let _ = body::batch_len(&message);
        }
        Opcode::Execute => {
            let _ = body::execute_id(&message);
        }
        Opcode::Startup => {
            let _ = body::startup_compression(&message);
        }
        Opcode::Result => {
            let _ = body::prepared_id(&message);
            let _ = rows::find_column(&message, "system", "peers_v2", "native_port");
            let _ = rows::find_column(&message, "system", "peers", "rpc_address");
        }
        Opcode::Error => {
            let _ = body::error(&message);
        }
        _ => {}
    }
    // Compressing the body and reading it again gives the same body.
    if header.flags & cql::flags::COMPRESSION != 0
        && let Ok(plain) = body::body(frame, header, compression)
    {
        let (again, again_header) = cql::reencode(frame, header, compression).expect("re-encoded");
        let plain_again = body::body(&again, &again_header, compression).expect("readable");
        assert_eq!(plain, plain_again);
    }
}

/// Requests a CQL client sends. The first byte picks how the connection starts: in
/// envelopes, or already switched to plain or LZ4 v5 segments (as after READY).
pub fn cql_request(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mut decoder = cql::RequestDecoder::new(MAX_FRAME);
    if mode % 3 != 0 {
        let compression = if mode % 3 == 2 { "lz4" } else { "none" };
        let mut startup = startup_v5(compression);
        decoder
            .decode(&mut startup)
            .expect("a valid STARTUP")
            .expect("whole");
        decoder.answered(&Header {
            version: 5,
            direction: Direction::Response,
            flags: 0,
            stream: 0,
            opcode: Opcode::Ready,
            body_len: 0,
        });
        assert!(decoder.segments().is_some());
    }
    let mut buf = BytesMut::from(data);
    for _ in 0..=data.len() {
        match decoder.decode(&mut buf) {
            Ok(Some(request)) => {
                assert_eq!(request.header.direction, Direction::Request);
                assert_eq!(request.bytes.len(), HEADER_LEN + request.header.body_len);
                read_body(&request.bytes, &request.header, request.compression);
                // A STARTUP in envelopes is answered with READY, as a node would.
                if request.header.opcode == Opcode::Startup {
                    decoder.answered(&Header {
                        direction: Direction::Response,
                        opcode: Opcode::Ready,
                        body_len: 0,
                        ..request.header
                    });
                }
            }
            Ok(None) => return,
            Err(e) => {
                let reply = decoder.error_reply(&buf, &e);
                assert!(!reply.is_empty());
                return;
            }
        }
    }
}

/// A v5 STARTUP asking for `compression`.
fn startup_v5(compression: &str) -> BytesMut {
    let mut body = vec![0, 2];
    for s in ["CQL_VERSION", "3.0.0", "COMPRESSION", compression] {
        body.extend((s.len() as u16).to_be_bytes());
        body.extend(s.as_bytes());
    }
    let mut out = BytesMut::new();
    Header {
        version: 5,
        direction: Direction::Request,
        flags: 0,
        stream: 0,
        opcode: Opcode::Startup,
        body_len: body.len(),
    }
    .encode(&mut out);
    out.extend_from_slice(&body);
    out
}

/// Answers a node sends: the sink's framing, then everything transforms read of them, with
/// the compression the first byte picks (for v4's compressed bodies).
pub fn cql_response(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let compression = match mode % 3 {
        0 => Compression::None,
        1 => Compression::Lz4,
        _ => Compression::Snappy,
    };
    let mut buf = BytesMut::from(data);
    let mut decoder = EnvelopeDecoder::new(MAX_FRAME);
    for _ in 0..=data.len() {
        match decoder.next(&mut buf) {
            Ok(Some((frame, header))) => read_body(&frame, &header, compression),
            Ok(None) | Err(_) => return,
        }
    }
}

/// v5 segments from either side: the decoder on any bytes (plain or LZ4, by the first
/// byte), and the encoder against it: envelopes cut from the input, encoded and decoded
/// again, come back whole and in order.
pub fn cql_segments(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let codec = SegmentCodec::new(if mode & 1 == 0 {
        Compression::None
    } else {
        Compression::Lz4
    });
    let mut buf = BytesMut::from(data);
    let mut decoder = SegmentDecoder::new(codec, MAX_FRAME);
    for _ in 0..=data.len() {
        match decoder.next(&mut buf) {
            Ok(Some((frame, header))) => {
                assert_eq!(frame.len(), HEADER_LEN + header.body_len);
                read_body(&frame, &header, Compression::None);
            }
            Ok(None) | Err(_) => break,
        }
    }

    // Round trip: the input cut into bodies at each 0xFF byte, each body repeated by the
    // mode's high bits (so some envelopes span segments), up to 300 KB each.
    let repeat = 1 + usize::from(mode >> 5) * 20_000;
    let envelopes: Vec<Vec<u8>> = data
        .split(|&b| b == 0xFF)
        .take(16)
        .enumerate()
        .map(|(i, part)| {
            let body: Vec<u8> = part
                .iter()
                .copied()
                .cycle()
                .take((part.len() * repeat).min(300_000))
                .collect();
            let mut out = BytesMut::new();
            Header {
                version: 5,
                direction: Direction::Request,
                flags: 0,
                stream: i as i16,
                opcode: Opcode::Query,
                body_len: body.len(),
            }
            .encode(&mut out);
            out.extend_from_slice(&body);
            out.to_vec()
        })
        .collect();
    let mut wire = BytesMut::new();
    codec.encode(envelopes.iter().map(Vec::as_slice), &mut wire);
    let mut decoder = SegmentDecoder::new(codec, usize::MAX);
    for want in &envelopes {
        let (got, _) = decoder
            .next(&mut wire)
            .expect("valid segments")
            .expect("a whole envelope");
        assert_eq!(&got[..], &want[..]);
    }
    assert!(decoder.next(&mut wire).expect("valid").is_none());
    assert!(wire.is_empty());
}

/// A topology file (and a config file) as the proxy loads them.
pub fn topology(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(topology) = shotover_crds::load::load_topology(text) {
        let _ = shotover_crds::validate::validate(&topology);
        let _ = shotover_crds::validate::tls_files(&topology);
    }
    let _ = shotover_crds::load::parse_topology(text);
    let _ = shotover_crds::config::ProxyConfig::from_yaml(text);
}

/// The topology the admission target injects.
const TOPOLOGY: &str = r#"
apiVersion: shotover.io/v1alpha1
kind: ShotoverTopology
metadata: {name: cache, namespace: apps}
spec:
  sources:
    - Redis:
        name: redis
        listenAddr: "127.0.0.1:6379"
        chain:
          - RedisSinkSingle: {remoteAddress: "redis.db:6379"}
"#;

fn rendered() -> &'static shotover_webhook::inject::RenderedTopology {
    static RENDERED: OnceLock<shotover_webhook::inject::RenderedTopology> = OnceLock::new();
    RENDERED.get_or_init(|| {
        let value: serde_yaml::Value = serde_yaml::from_str(TOPOLOGY).expect("yaml");
        let topology: shotover_crds::crd::ShotoverTopology =
            serde_json::from_value(serde_json::to_value(value).expect("json")).expect("topology");
        let rendered = shotover_operator::render::render(&topology).expect("a valid topology");
        shotover_webhook::inject::RenderedTopology {
            sources: shotover_operator::render::source_ports(&topology),
            hash: rendered.hash,
            topology,
        }
    })
}

/// What the webhook reads from the apiserver: an AdmissionReview of a Pod, decided and
/// injected with the webhook's own functions; and, as text, manifests for the offline
/// `inject` command.
pub fn admission(data: &[u8]) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::core::admission::{AdmissionRequest, AdmissionReview};
    use shotover_webhook::inject;

    if let Ok(review) = serde_json::from_slice::<AdmissionReview<Pod>>(data)
        && let Ok(request) = TryInto::<AdmissionRequest<Pod>>::try_into(review)
        && let Some(pod) = request.object.as_ref()
    {
        let settings = inject::Settings {
            own_namespace: "shotover-system".into(),
            native_sidecar_default: true,
            allowed_images: vec!["registry.example/shotover".into()],
        };
        let ns = inject::NamespaceMeta::default();
        let namespace = request.namespace.as_deref().unwrap_or("apps");
        if let Ok(Ok(_)) = inject::select(pod, namespace, &ns, &settings)
            && let Ok(injection) = inject::inject(pod, &ns, rendered(), &settings)
        {
            // The patch is JSON a Pod can take.
            let _ = serde_json::to_vec(&injection.patch).expect("a patch serializes");
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = shotover_webhook::offline::inject_manifests(TOPOLOGY, text, true);
    }
}

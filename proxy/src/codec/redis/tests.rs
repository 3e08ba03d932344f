//! RESP codec tests, fed raw bytes: split at every byte, pipelined, malformed, oversized.

use bytes::{Bytes, BytesMut};
use shotover_crds::transform::QueryType;

use super::command::{Command, CommandKind, aggregate_head, query_type, split_inline};
use super::frame::{ParseError, RedisFrame};
use super::{MAX_INLINE, Request, RequestDecoder, ResponseDecoder};
use crate::codec::DecodeError;

const MAX: usize = 1024 * 1024 * 1024;

fn frame(bytes: &'static [u8]) -> Request {
    Request::Frame(Bytes::from_static(bytes))
}

fn malformed(msg: &str) -> DecodeError {
    DecodeError::Malformed(msg.into())
}

/// Every request in `input`, decoded from one buffer.
fn requests(input: &[u8]) -> Result<Vec<Request>, DecodeError> {
    let mut decoder = RequestDecoder::new(MAX);
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(request) = decoder.decode(&mut buf)? {
        out.push(request);
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    Ok(out)
}

/// The first error (or result) of decoding `input` as requests.
fn request_result(max: usize, input: &[u8]) -> Result<Option<Request>, DecodeError> {
    RequestDecoder::new(max).decode(&mut BytesMut::from(input))
}

/// Every response in `input`, decoded from one buffer.
fn responses(input: &[u8]) -> Result<Vec<Bytes>, DecodeError> {
    let mut decoder = ResponseDecoder::new(MAX);
    let mut buf = BytesMut::from(input);
    let mut out = Vec::new();
    while let Some(response) = decoder.decode(&mut buf)? {
        out.push(response);
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    Ok(out)
}

fn response_result(max: usize, input: &[u8]) -> Result<Option<Bytes>, DecodeError> {
    ResponseDecoder::new(max).decode(&mut BytesMut::from(input))
}

/// Feeds one complete request in two parts split at every offset, and one byte at a time:
/// nothing is returned (and nothing consumed) until the last byte, then the whole frame.
fn assert_request_survives_every_split(input: &'static [u8], expected: Request) {
    for split in 1..input.len() {
        let mut decoder = RequestDecoder::new(MAX);
        let mut buf = BytesMut::from(&input[..split]);
        assert_eq!(decoder.decode(&mut buf), Ok(None), "split at {split}");
        assert_eq!(&buf[..], &input[..split], "buffer kept at split {split}");
        buf.extend_from_slice(&input[split..]);
        assert_eq!(
            decoder.decode(&mut buf).as_ref(),
            Ok(&Some(clone_request(&expected))),
            "split at {split}"
        );
        assert!(buf.is_empty());
    }
    let mut decoder = RequestDecoder::new(MAX);
    let mut buf = BytesMut::new();
    for (i, byte) in input.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        let got = decoder.decode(&mut buf);
        if i + 1 < input.len() {
            assert_eq!(got, Ok(None), "after byte {i}");
            assert_eq!(&buf[..], &input[..=i]);
        } else {
            assert_eq!(got, Ok(Some(clone_request(&expected))));
        }
    }
    assert!(buf.is_empty());
}

fn clone_request(r: &Request) -> Request {
    match r {
        Request::Frame(b) => Request::Frame(b.clone()),
        Request::Ignored => Request::Ignored,
    }
}

/// As [`assert_request_survives_every_split`], for a response.
fn assert_response_survives_every_split(input: &[u8]) {
    for split in 1..input.len() {
        let mut decoder = ResponseDecoder::new(MAX);
        let mut buf = BytesMut::from(&input[..split]);
        assert_eq!(decoder.decode(&mut buf), Ok(None), "split at {split}");
        assert_eq!(&buf[..], &input[..split], "buffer kept at split {split}");
        buf.extend_from_slice(&input[split..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Ok(Some(Bytes::copy_from_slice(input))),
            "split at {split} of {:?}",
            String::from_utf8_lossy(input)
        );
        assert!(buf.is_empty());
    }
    let mut decoder = ResponseDecoder::new(MAX);
    let mut buf = BytesMut::new();
    for (i, byte) in input.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        let got = decoder.decode(&mut buf);
        if i + 1 < input.len() {
            assert_eq!(
                got,
                Ok(None),
                "after byte {i} of {:?}",
                String::from_utf8_lossy(input)
            );
        } else {
            assert_eq!(got, Ok(Some(Bytes::copy_from_slice(input))));
        }
    }
    assert!(buf.is_empty());
}

fn parse(input: &'static [u8]) -> Result<RedisFrame, ParseError> {
    RedisFrame::parse(&Bytes::from_static(input))
}

fn bulk(s: &'static str) -> RedisFrame {
    RedisFrame::Bulk(Bytes::from_static(s.as_bytes()))
}

fn simple(s: &'static str) -> RedisFrame {
    RedisFrame::Simple(Bytes::from_static(s.as_bytes()))
}

// ---- requests ----

#[test]
fn multibulk_request_split_at_every_byte_decodes_once_complete() {
    let input = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$10\r\nva\r\nl\0ue!!\r\n";
    assert_request_survives_every_split(input, frame(input));
}

#[test]
fn inline_request_split_at_every_byte_decodes_once_complete() {
    assert_request_survives_every_split(b"SET a \"b c\"\r\n", frame(b"SET a \"b c\"\r\n"));
    assert_request_survives_every_split(b"PING\n", frame(b"PING\n"));
}

#[test]
fn pipelined_requests_keep_their_order() {
    let input = b"*1\r\n$4\r\nPING\r\nECHO a\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n\r\n*0\r\nPING\n*-1\r\n*1\r\n$4\r\nQUIT\r\n";
    assert_eq!(
        requests(input),
        Ok(vec![
            frame(b"*1\r\n$4\r\nPING\r\n"),
            frame(b"ECHO a\r\n"),
            frame(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
            Request::Ignored,
            Request::Ignored,
            frame(b"PING\n"),
            Request::Ignored,
            frame(b"*1\r\n$4\r\nQUIT\r\n"),
        ])
    );
}

#[test]
fn pipelined_requests_fed_one_byte_at_a_time_keep_their_order() {
    let input = b"*1\r\n$4\r\nPING\r\nSET a \"b c\"\r\n\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
    let mut decoder = RequestDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for byte in input {
        buf.extend_from_slice(&[*byte]);
        while let Some(request) = decoder.decode(&mut buf).expect("valid input") {
            out.push(request);
        }
    }
    assert_eq!(
        out,
        vec![
            frame(b"*1\r\n$4\r\nPING\r\n"),
            frame(b"SET a \"b c\"\r\n"),
            Request::Ignored,
            frame(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        ]
    );
}

#[test]
fn empty_and_blank_lines_and_empty_multibulks_are_ignored() {
    assert_eq!(
        requests(b"\r\n\n   \t\r\n*0\r\n*-1\r\n"),
        Ok(std::iter::repeat_with(|| Request::Ignored)
            .take(5)
            .collect())
    );
}

#[test]
fn empty_buffer_needs_more_bytes() {
    assert_eq!(request_result(MAX, b""), Ok(None));
    assert_eq!(response_result(MAX, b""), Ok(None));
}

#[test]
fn bulk_string_may_hold_crlf_and_binary_bytes() {
    let input = b"*2\r\n$4\r\nECHO\r\n$6\r\n\r\n\x00\xff\r\n\r\n";
    assert_eq!(requests(input), Ok(vec![frame(input)]));
}

#[test]
fn request_not_starting_with_dollar_is_malformed_with_redis_wording() {
    assert_eq!(
        request_result(MAX, b"*1\r\nx3\r\nfoo\r\n"),
        Err(malformed("Protocol error: expected '$', got 'x'"))
    );
    assert_eq!(
        request_result(MAX, b"*2\r\n$3\r\nGET\r\n:1\r\n"),
        Err(malformed("Protocol error: expected '$', got ':'"))
    );
    assert_eq!(
        request_result(MAX, b"*1\r\n\n"),
        Err(malformed("Protocol error: expected '$', got '\\n'"))
    );
}

#[test]
fn invalid_bulk_length_is_malformed_with_redis_wording() {
    for input in [
        &b"*1\r\n$abc\r\nfoo\r\n"[..],
        b"*1\r\n$-1\r\n",
        b"*1\r\n$\r\n",
        b"*1\r\n$3x\r\nfoo\r\n",
        b"*1\r\n$1234567890123456789\r\n",
    ] {
        assert_eq!(
            request_result(MAX, input),
            Err(malformed("Protocol error: invalid bulk length")),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn invalid_multibulk_length_is_malformed_with_redis_wording() {
    for input in [&b"*x\r\n"[..], b"*\r\n", b"*1a\r\n"] {
        assert_eq!(
            request_result(MAX, input),
            Err(malformed("Protocol error: invalid multibulk length")),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn bulk_without_its_crlf_is_malformed() {
    assert_eq!(
        request_result(MAX, b"*1\r\n$3\r\nfooXY"),
        Err(malformed(
            "Protocol error: bulk string not terminated by CRLF"
        ))
    );
}

#[test]
fn inline_unbalanced_quotes_are_malformed_with_redis_wording() {
    for input in [
        &b"SET a \"b c\r\n"[..],
        b"SET a 'b c\r\n",
        b"SET a \"b\"c\r\n",
    ] {
        assert_eq!(
            request_result(MAX, input),
            Err(malformed("Protocol error: unbalanced quotes in request")),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn too_big_inline_request_is_malformed_with_or_without_its_newline() {
    let long = vec![b'a'; MAX_INLINE + 1];
    assert_eq!(
        request_result(MAX, &long),
        Err(malformed("Protocol error: too big inline request"))
    );
    let mut line = long.clone();
    line.extend_from_slice(b"\r\n");
    assert_eq!(
        request_result(MAX, &line),
        Err(malformed("Protocol error: too big inline request"))
    );
    // Just under the limit, an unfinished line waits for its newline.
    assert_eq!(request_result(MAX, &long[..MAX_INLINE]), Ok(None));
}

#[test]
fn length_line_without_crlf_is_malformed_once_too_long() {
    let mut input = b"*1\r\n$".to_vec();
    input.extend(std::iter::repeat_n(b'1', MAX_INLINE));
    assert_eq!(
        request_result(MAX, &input),
        Err(malformed("Protocol error: line too long"))
    );
}

#[test]
fn oversized_bulk_is_refused_as_soon_as_its_header_is_read() {
    // The body never arrives: the header alone says it is too large.
    assert_eq!(
        request_result(1024, b"*2\r\n$3\r\nSET\r\n$2000\r\n"),
        Err(DecodeError::FrameTooLarge {
            size: 13 + 7 + 2000 + 2,
            max: 1024,
        })
    );
}

#[test]
fn oversized_multibulk_count_is_refused_before_any_bulk() {
    assert_eq!(
        request_result(1024, b"*1000\r\n"),
        Err(DecodeError::FrameTooLarge {
            size: 7 + 6 * 1000,
            max: 1024,
        })
    );
}

#[test]
fn frame_exactly_at_the_limit_is_accepted() {
    let input = b"*1\r\n$4\r\nPING\r\n";
    assert_eq!(request_result(input.len(), input), Ok(Some(frame(input))));
    assert!(matches!(
        request_result(input.len() - 1, input),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn one_mib_bulk_request_decodes_once_complete() {
    let value = vec![b'v'; 1024 * 1024];
    let mut input = b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1048576\r\n".to_vec();
    input.extend_from_slice(&value);
    input.extend_from_slice(b"\r\n");
    let mut decoder = RequestDecoder::new(2 * 1024 * 1024);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in input.chunks(64 * 1024) {
        buf.extend_from_slice(chunk);
        while let Some(r) = decoder.decode(&mut buf).expect("valid input") {
            frames.push(r);
        }
        if frames.is_empty() {
            // Once the header is read, room for the whole frame is reserved at once.
            assert!(buf.capacity() >= input.len(), "capacity {}", buf.capacity());
        }
    }
    assert_eq!(frames, vec![Request::Frame(Bytes::from(input))]);
}

#[test]
fn request_of_100k_arguments_fed_in_small_chunks_decodes_correctly() {
    let n = 100_000;
    let mut input = format!("*{}\r\n$5\r\nRPUSH\r\n", n + 1).into_bytes();
    for i in 0..n {
        let arg = i.to_string();
        input.extend_from_slice(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
    }
    let mut decoder = RequestDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // Scanning resumes where it stopped: a decoder that rescanned from the start on every
    // chunk would take minutes here.
    for chunk in input.chunks(7) {
        buf.extend_from_slice(chunk);
        while let Some(r) = decoder.decode(&mut buf).expect("valid input") {
            frames.push(r);
        }
    }
    assert_eq!(frames.len(), 1);
    let Request::Frame(bytes) = &frames[0] else {
        panic!("expected a frame");
    };
    assert_eq!(&bytes[..], &input[..]);
    let command = Command::of(bytes);
    assert_eq!(command.argc, n);
    assert_eq!(command.arg1.as_deref(), Some(&b"0"[..]));
}

// ---- responses ----

/// Every RESP2 and RESP3 type, one complete response each.
const RESPONSES: &[&[u8]] = &[
    b"+OK\r\n",
    b"-ERR unknown command 'foo'\r\n",
    b":1000\r\n",
    b":-5\r\n",
    b"$5\r\nhello\r\n",
    b"$0\r\n\r\n",
    b"$6\r\na\r\nb\r\n\r\n",
    b"$-1\r\n",
    b"*-1\r\n",
    b"*0\r\n",
    b"*2\r\n$3\r\nfoo\r\n:1\r\n",
    b"_\r\n",
    b",3.14\r\n",
    b",-inf\r\n",
    b"#t\r\n",
    b"#f\r\n",
    b"!21\r\nSYNTAX invalid syntax\r\n",
    b"=15\r\ntxt:Some string\r\n",
    b"(3492890328409238509324850943850943825024385\r\n",
    b"%2\r\n+first\r\n:1\r\n+second\r\n:2\r\n",
    b"%0\r\n",
    b"~3\r\n+a\r\n+b\r\n+c\r\n",
    b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nmsg\r\n",
    b"|1\r\n+k\r\n+v\r\n+value\r\n",
    b"|1\r\n+key-popularity\r\n%2\r\n$1\r\na\r\n,0.1923\r\n$1\r\nb\r\n,0.0012\r\n*2\r\n:2039123\r\n:9543892\r\n",
    b"*2\r\n|1\r\n+ttl\r\n:3\r\n$1\r\nv\r\n:2\r\n",
    b"*4\r\n*2\r\n:1\r\n%1\r\n+k\r\n~1\r\n_\r\n>1\r\n#t\r\n*0\r\n$-1\r\n",
];

/// Streamed strings and aggregates.
const STREAMED: &[&[u8]] = &[
    b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n",
    b"$?\r\n;0\r\n",
    b"*?\r\n:1\r\n:2\r\n.\r\n",
    b"*?\r\n.\r\n",
    b"%?\r\n+a\r\n:1\r\n+b\r\n:2\r\n.\r\n",
    b"~?\r\n+a\r\n.\r\n",
    b"*?\r\n*?\r\n:1\r\n.\r\n$?\r\n;1\r\nx\r\n;0\r\n*1\r\n_\r\n.\r\n",
    b"*2\r\n*?\r\n.\r\n:1\r\n",
    b"$?\r\n;2\r\nab\r\n;3\r\ncde\r\n;1\r\n\r\r\n;0\r\n",
    b"+a long status line, resumed where it was searched, with \\r inside words\r\n",
];

#[test]
fn every_response_type_split_at_every_byte_decodes_once_complete() {
    for input in RESPONSES.iter().chain(STREAMED) {
        assert_response_survives_every_split(input);
    }
}

#[test]
fn pipelined_responses_of_every_type_keep_their_order() {
    let all: Vec<&[u8]> = RESPONSES.iter().chain(STREAMED).copied().collect();
    let input = all.concat();
    let decoded = responses(&input).expect("valid input");
    let decoded: Vec<&[u8]> = decoded.iter().map(|b| &b[..]).collect();
    assert_eq!(decoded, all);
}

#[test]
fn attribute_is_one_frame_with_the_value_it_annotates() {
    assert_eq!(
        responses(b"|1\r\n+k\r\n+v\r\n+value\r\n+next\r\n"),
        Ok(vec![
            Bytes::from_static(b"|1\r\n+k\r\n+v\r\n+value\r\n"),
            Bytes::from_static(b"+next\r\n"),
        ])
    );
}

#[test]
fn empty_attribute_still_annotates_the_value_after_it() {
    assert_eq!(
        responses(b"|0\r\n+value\r\n+next\r\n"),
        Ok(vec![
            Bytes::from_static(b"|0\r\n+value\r\n"),
            Bytes::from_static(b"+next\r\n"),
        ])
    );
    assert_eq!(
        parse(b"|0\r\n+value\r\n"),
        Ok(RedisFrame::Attribute(vec![], Box::new(simple("value"))))
    );
}

#[test]
fn one_mib_bulk_response_decodes_once_complete() {
    let mut input = b"$1048576\r\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', 1024 * 1024));
    input.extend_from_slice(b"\r\n");
    let mut decoder = ResponseDecoder::new(2 * 1024 * 1024);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in input.chunks(100_000) {
        buf.extend_from_slice(chunk);
        while let Some(r) = decoder.decode(&mut buf).expect("valid input") {
            frames.push(r);
        }
    }
    assert_eq!(frames, vec![Bytes::from(input)]);
}

#[test]
fn array_of_100k_elements_fed_in_small_chunks_decodes_correctly() {
    let n = 100_000;
    let mut input = format!("*{n}\r\n").into_bytes();
    for i in 0..n {
        match i % 4 {
            0 => input.extend_from_slice(format!(":{i}\r\n").as_bytes()),
            1 => input.extend_from_slice(format!("$5\r\n{:05}\r\n", i % 100_000).as_bytes()),
            2 => input.extend_from_slice(b"*2\r\n+a\r\n_\r\n"),
            _ => input.extend_from_slice(b"%1\r\n+k\r\n#t\r\n"),
        }
    }
    input.extend_from_slice(b"+after\r\n");
    let mut decoder = ResponseDecoder::new(MAX);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    // Scanning resumes where it stopped; rescanning from the start on every chunk would be
    // quadratic and take minutes here.
    for chunk in input.chunks(5) {
        buf.extend_from_slice(chunk);
        while let Some(r) = decoder.decode(&mut buf).expect("valid input") {
            frames.push(r);
        }
    }
    assert_eq!(frames.len(), 2);
    assert_eq!(&frames[0][..], &input[..input.len() - 8]);
    assert_eq!(&frames[1][..], b"+after\r\n");
    let RedisFrame::Array(items) = RedisFrame::parse(&frames[0]).expect("parses") else {
        panic!("expected an array");
    };
    assert_eq!(items.len(), n);
    assert_eq!(items[4], RedisFrame::Integer(4));
    assert_eq!(items[5], bulk("00005"));
}

#[test]
fn oversized_bulk_response_is_refused_as_soon_as_its_header_is_read() {
    assert_eq!(
        response_result(1024, b"$2000\r\n"),
        Err(DecodeError::FrameTooLarge {
            size: 7 + 2000 + 2,
            max: 1024,
        })
    );
    assert_eq!(
        response_result(1024, b"*2\r\n:1\r\n$2000\r\n"),
        Err(DecodeError::FrameTooLarge {
            size: 8 + 7 + 2000 + 2,
            max: 1024,
        })
    );
}

#[test]
fn oversized_aggregate_response_is_refused_from_its_count() {
    assert_eq!(
        response_result(1024, b"*1000\r\n"),
        Err(DecodeError::FrameTooLarge {
            size: 7 + 3 * 1000,
            max: 1024,
        })
    );
}

#[test]
fn response_growing_past_the_limit_element_by_element_is_refused() {
    let mut input = b"*100\r\n".to_vec();
    for _ in 0..100 {
        input.extend_from_slice(b"+0123456789abcdef\r\n");
    }
    assert!(matches!(
        response_result(1024, &input),
        Err(DecodeError::FrameTooLarge { max: 1024, .. })
    ));
}

#[test]
fn oversized_streamed_chunk_is_refused() {
    assert_eq!(
        response_result(1024, b"$?\r\n;2000\r\n"),
        Err(DecodeError::FrameTooLarge {
            size: 11 + 2000 + 2,
            max: 1024,
        })
    );
}

#[test]
fn malformed_responses_say_what_is_wrong() {
    let cases: &[(&[u8], &str)] = &[
        (b"@x\r\n", "unknown RESP type byte 0x40"),
        (b"*2\r\n:1\r\n?\r\n", "unknown RESP type byte 0x3f"),
        (b".\r\n", "unexpected end of streamed aggregate"),
        (b"*1\r\n.\r\n", "unexpected end of streamed aggregate"),
        (b"$?\r\n4\r\nHell\r\n", "expected ';' in streamed string"),
        (b"$x\r\n", "Protocol error: invalid bulk length"),
        (b"*x\r\n", "Protocol error: invalid aggregate length"),
        (b"+OK\rX", "Protocol error: expected CRLF"),
    ];
    for (input, message) in cases {
        assert_eq!(
            response_result(MAX, input),
            Err(malformed(message)),
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn responses_nested_however_deep_are_framed() {
    // Redis sends what a Lua script returns, nested as deep as the script made it: the
    // framing state grows with the nesting, which the frame size bounds.
    let deep = |levels: usize| {
        let mut input = b"*1\r\n".repeat(levels);
        input.extend_from_slice(b":1\r\n");
        input
    };
    for levels in [1024, 1025, 100_000] {
        let input = deep(levels);
        assert_eq!(
            response_result(MAX, &input),
            Ok(Some(Bytes::from(input.clone())))
        );
    }
}

// ---- parsing and encoding ----

#[test]
fn parse_then_encode_gives_back_the_same_bytes() {
    for input in RESPONSES {
        let parsed = RedisFrame::parse(&Bytes::copy_from_slice(input))
            .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(input)));
        assert_eq!(
            &parsed.to_bytes()[..],
            *input,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn parse_gives_each_resp_type_its_own_variant() {
    assert_eq!(parse(b"+OK\r\n"), Ok(simple("OK")));
    assert_eq!(
        parse(b"-ERR x\r\n"),
        Ok(RedisFrame::Error(Bytes::from_static(b"ERR x")))
    );
    assert_eq!(parse(b":-5\r\n"), Ok(RedisFrame::Integer(-5)));
    assert_eq!(parse(b"$6\r\na\r\nb\r\n\r\n"), Ok(bulk("a\r\nb\r\n")));
    assert_eq!(parse(b"$-1\r\n"), Ok(RedisFrame::NullBulk));
    assert_eq!(parse(b"*-1\r\n"), Ok(RedisFrame::NullArray));
    assert_eq!(parse(b"_\r\n"), Ok(RedisFrame::Null));
    assert_eq!(
        parse(b",3.14\r\n"),
        Ok(RedisFrame::Double(Bytes::from_static(b"3.14")))
    );
    assert_eq!(parse(b"#t\r\n"), Ok(RedisFrame::Boolean(true)));
    assert_eq!(parse(b"#f\r\n"), Ok(RedisFrame::Boolean(false)));
    assert_eq!(
        parse(b"!5\r\nOOPS!\r\n"),
        Ok(RedisFrame::BlobError(Bytes::from_static(b"OOPS!")))
    );
    assert_eq!(
        parse(b"=7\r\ntxt:abc\r\n"),
        Ok(RedisFrame::Verbatim(Bytes::from_static(b"txt:abc")))
    );
    assert_eq!(
        parse(b"(12345678901234567890\r\n"),
        Ok(RedisFrame::BigNumber(Bytes::from_static(
            b"12345678901234567890"
        )))
    );
    assert_eq!(
        parse(b"%1\r\n+k\r\n:1\r\n"),
        Ok(RedisFrame::Map(vec![(simple("k"), RedisFrame::Integer(1))]))
    );
    assert_eq!(
        parse(b"~2\r\n+a\r\n+b\r\n"),
        Ok(RedisFrame::Set(vec![simple("a"), simple("b")]))
    );
    assert_eq!(
        parse(b">2\r\n$7\r\nmessage\r\n$1\r\nc\r\n"),
        Ok(RedisFrame::Push(vec![bulk("message"), bulk("c")]))
    );
    assert_eq!(
        parse(b"|1\r\n+k\r\n+v\r\n+value\r\n"),
        Ok(RedisFrame::Attribute(
            vec![(simple("k"), simple("v"))],
            Box::new(simple("value"))
        ))
    );
}

#[test]
fn streamed_frames_parse_to_their_counted_form() {
    assert_eq!(
        parse(b"$?\r\n;4\r\nHell\r\n;5\r\no wor\r\n;1\r\nd\r\n;0\r\n"),
        Ok(bulk("Hello word"))
    );
    assert_eq!(
        parse(b"*?\r\n:1\r\n*?\r\n.\r\n.\r\n").map(|f| f.to_bytes()),
        Ok(Bytes::from_static(b"*2\r\n:1\r\n*0\r\n"))
    );
    assert_eq!(
        parse(b"%?\r\n+a\r\n:1\r\n.\r\n"),
        Ok(RedisFrame::Map(vec![(simple("a"), RedisFrame::Integer(1))]))
    );
}

#[test]
fn truncated_or_invalid_frames_do_not_parse() {
    assert_eq!(parse(b""), Err(ParseError("truncated")));
    assert_eq!(parse(b"$5\r\nab\r\n"), Err(ParseError("truncated")));
    assert_eq!(parse(b"*2\r\n:1\r\n"), Err(ParseError("truncated")));
    assert_eq!(parse(b":x\r\n"), Err(ParseError("invalid integer")));
    assert_eq!(parse(b"+OK"), Err(ParseError("missing CRLF")));
    assert_eq!(parse(b"?\r\n"), Err(ParseError("unknown type byte")));
}

#[test]
fn parse_request_reads_inline_commands_as_an_array_of_bulks() {
    assert_eq!(
        RedisFrame::parse_request(&Bytes::from_static(b"SET a \"b c\"\r\n")),
        Ok(RedisFrame::Array(vec![bulk("SET"), bulk("a"), bulk("b c")]))
    );
    assert_eq!(
        RedisFrame::parse_request(&Bytes::from_static(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")),
        Ok(RedisFrame::Array(vec![bulk("GET"), bulk("k")]))
    );
    assert_eq!(
        RedisFrame::parse_request(&Bytes::from_static(b"SET a \"b\r\n")),
        Err(ParseError("Protocol error: unbalanced quotes in request"))
    );
}

#[test]
fn command_frame_encodes_as_a_multibulk() {
    assert_eq!(
        RedisFrame::command(["SET", "k", "v"]).to_bytes(),
        Bytes::from_static(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
    );
}

#[test]
fn frames_display_like_redis_cli() {
    let frame = RedisFrame::Array(vec![
        bulk("a"),
        RedisFrame::Integer(1),
        RedisFrame::NullBulk,
        RedisFrame::Error(Bytes::from_static(b"ERR x")),
        RedisFrame::Map(vec![(simple("k"), RedisFrame::Boolean(true))]),
    ]);
    assert_eq!(
        frame.to_string(),
        "[\"a\", (integer) 1, (nil), (error) ERR x, {k: (true)}]"
    );
    let long = RedisFrame::Bulk(Bytes::from(vec![b'x'; 300]));
    assert_eq!(
        long.to_string(),
        format!("{:?}...(300 bytes)", "x".repeat(256))
    );
}

#[test]
fn decoder_accepted_garbage_never_panics_the_parser() {
    // A small deterministic generator: RESP-looking bytes, mostly malformed.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let pieces: &[&[u8]] = &[
        b"*", b"$", b"%", b"|", b"~", b">", b"+", b"-", b":", b"_", b",", b"#", b"!", b"=", b"(",
        b".", b";", b"?", b"0", b"1", b"2", b"-1", b"99", b"\r\n", b"\r", b"\n", b"a", b" ", b"\"",
    ];
    for _ in 0..20_000 {
        let mut input = Vec::new();
        for _ in 0..(next() % 24) {
            input.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
        }
        let mut buf = BytesMut::from(&input[..]);
        let mut decoder = ResponseDecoder::new(4096);
        while let Ok(Some(frame)) = decoder.decode(&mut buf) {
            let _ = RedisFrame::parse(&frame);
        }
        let mut buf = BytesMut::from(&input[..]);
        let mut decoder = RequestDecoder::new(4096);
        while let Ok(Some(request)) = decoder.decode(&mut buf) {
            if let Request::Frame(frame) = request {
                let _ = RedisFrame::parse_request(&frame);
                let _ = Command::of(&frame);
            }
        }
    }
}

// ---- commands ----

#[test]
fn command_of_a_multibulk_reads_name_argc_and_first_argument() {
    let c = Command::of(&Bytes::from_static(
        b"*3\r\n$3\r\nset\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
    ));
    assert_eq!(&c.name[..], b"set");
    assert_eq!(c.upper_name(), "SET");
    assert_eq!(c.kind, CommandKind::Other);
    assert_eq!(c.argc, 2);
    assert_eq!(c.arg1.as_deref(), Some(&b"key"[..]));
    assert_eq!(c.query_type(), QueryType::Write);

    let c = Command::of(&Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
    assert_eq!(&c.name[..], b"PING");
    assert_eq!(c.argc, 0);
    assert_eq!(c.arg1, None);
}

#[test]
fn command_of_an_inline_line_reads_name_argc_and_first_argument() {
    let c = Command::of(&Bytes::from_static(b"SET a \"b c\"\r\n"));
    assert_eq!(&c.name[..], b"SET");
    assert_eq!(c.argc, 2);
    assert_eq!(c.arg1.as_deref(), Some(&b"a"[..]));

    let c = Command::of(&Bytes::from_static(b"PING\n"));
    assert_eq!(&c.name[..], b"PING");
    assert_eq!(c.argc, 0);
    assert_eq!(c.arg1, None);
}

#[test]
fn hello_gives_the_protocol_version_it_asks_for() {
    let of = |b: &'static [u8]| Command::of(&Bytes::from_static(b));
    let hello3 = of(b"*2\r\n$5\r\nHELLO\r\n$1\r\n3\r\n");
    assert_eq!(hello3.kind, CommandKind::Hello);
    assert_eq!(hello3.hello_version(), Some(3));
    assert_eq!(of(b"hello 2\r\n").hello_version(), Some(2));
    assert_eq!(of(b"HELLO\r\n").hello_version(), None);
    assert_eq!(of(b"HELLO 4\r\n").hello_version(), None);
    assert_eq!(of(b"ECHO 3\r\n").hello_version(), None);
}

#[test]
fn stateful_commands_are_recognised_in_any_case() {
    let kind = |b: &'static [u8]| Command::of(&Bytes::from_static(b)).kind;
    assert_eq!(
        kind(b"*3\r\n$6\r\nCLIENT\r\n$8\r\nTRACKING\r\n$2\r\non\r\n"),
        CommandKind::ClientTracking(true)
    );
    assert_eq!(
        kind(b"client tracking off\r\n"),
        CommandKind::ClientTracking(false)
    );
    assert_eq!(kind(b"CLIENT SETNAME x\r\n"), CommandKind::Other);
    assert_eq!(kind(b"CLIENT\r\n"), CommandKind::Other);
    assert_eq!(kind(b"subscribe a b\r\n"), CommandKind::Subscribe);
    assert_eq!(kind(b"PSUBSCRIBE a*\r\n"), CommandKind::PSubscribe);
    assert_eq!(kind(b"SSUBSCRIBE a\r\n"), CommandKind::SSubscribe);
    assert_eq!(kind(b"UNSUBSCRIBE\r\n"), CommandKind::Unsubscribe);
    assert_eq!(kind(b"PUNSUBSCRIBE\r\n"), CommandKind::PUnsubscribe);
    assert_eq!(kind(b"SUNSUBSCRIBE\r\n"), CommandKind::SUnsubscribe);
    assert_eq!(kind(b"MONITOR\r\n"), CommandKind::Monitor);
    assert_eq!(kind(b"RESET\r\n"), CommandKind::Reset);
    assert_eq!(kind(b"quit\r\n"), CommandKind::Quit);
    assert_eq!(kind(b"GET k\r\n"), CommandKind::Other);
}

#[test]
fn subscribe_counts_its_channels() {
    let c = Command::of(&Bytes::from_static(
        b"*3\r\n$9\r\nSUBSCRIBE\r\n$1\r\na\r\n$1\r\nb\r\n",
    ));
    assert_eq!(c.kind, CommandKind::Subscribe);
    assert_eq!(c.argc, 2);
    assert_eq!(c.arg1.as_deref(), Some(&b"a"[..]));
}

#[test]
fn query_types_follow_redis_command_flags() {
    assert_eq!(query_type(b"GET"), QueryType::Read);
    assert_eq!(query_type(b"hgetall"), QueryType::Read);
    assert_eq!(query_type(b"SET"), QueryType::Write);
    assert_eq!(query_type(b"DEL"), QueryType::Write);
    assert_eq!(query_type(b"FLUSHALL"), QueryType::Write);
    assert_eq!(query_type(b"GETDEL"), QueryType::ReadWrite);
    assert_eq!(query_type(b"getset"), QueryType::ReadWrite);
    assert_eq!(query_type(b"SUBSCRIBE"), QueryType::PubSubMessage);
    assert_eq!(query_type(b"punsubscribe"), QueryType::PubSubMessage);
    assert_eq!(query_type(b""), QueryType::Write);
}

#[test]
fn malformed_frames_give_an_empty_command() {
    let c = Command::of(&Bytes::from_static(b"*x\r\n"));
    assert!(c.name.is_empty());
    assert_eq!(c.argc, 0);
    assert_eq!(c.kind, CommandKind::Other);
    let c = Command::of(&Bytes::from_static(b"SET \"a\r\n"));
    assert!(c.name.is_empty());
}

#[test]
fn aggregate_head_reads_a_push_message_kind() {
    assert_eq!(
        aggregate_head(&Bytes::from_static(
            b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$3\r\nmsg\r\n"
        )),
        Some((
            Bytes::from_static(b"message"),
            2,
            Some(Bytes::from_static(b"ch"))
        ))
    );
    assert_eq!(aggregate_head(&Bytes::from_static(b"*0\r\n")), None);
    assert_eq!(aggregate_head(&Bytes::from_static(b"*1\r\n:1\r\n")), None);
}

#[test]
fn split_inline_follows_redis_quoting_rules() {
    let split = |s: &'static [u8]| split_inline(&Bytes::from_static(s));
    let args = |v: &[&str]| -> Result<Vec<Bytes>, &'static str> {
        Ok(v.iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect())
    };
    assert_eq!(split(b"  SET\t k   v \r\n"), args(&["SET", "k", "v"]));
    assert_eq!(
        split(b"SET k \"a\\x41\\n\\\"q\\\"\"\r\n"),
        args(&["SET", "k", "aA\n\"q\""])
    );
    assert_eq!(
        split(b"SET k 'it\\'s \"x\"'\n"),
        args(&["SET", "k", "it's \"x\""])
    );
    assert_eq!(split(b"SET k 'a\\nb'\n"), args(&["SET", "k", "a\\nb"]));
    assert_eq!(split(b"SET k \"\"\r\n"), args(&["SET", "k", ""]));
    assert_eq!(split(b"\r\n"), args(&[]));
    assert_eq!(
        split(b"SET k \"abc"),
        Err("Protocol error: unbalanced quotes in request")
    );
}

#[test]
fn a_bad_request_keeps_failing_the_stream() {
    let mut decoder = RequestDecoder::new(1 << 20);
    let mut buf = BytesMut::from(&b"SET a \"open\r\nPING\r\n"[..]);
    let first = decoder.decode(&mut buf).expect_err("unbalanced quotes");
    // The bad line was consumed, but the stream stays failed: nothing after it is read.
    assert_eq!(decoder.decode(&mut buf).expect_err("still failed"), first);
}

#[test]
fn values_nested_deeper_than_the_cap_are_an_error_not_a_stack_overflow() {
    use super::frame::MAX_DEPTH;
    let nested = |levels: usize| {
        let mut b = b"*1\r\n".repeat(levels);
        b.extend_from_slice(b":7\r\n");
        Bytes::from(b)
    };
    let at_cap = nested(MAX_DEPTH);
    let frame = RedisFrame::parse(&at_cap).expect("parses at the cap");
    assert_eq!(frame.to_bytes(), at_cap, "encodes back the same");
    assert!(!frame.to_string().is_empty());
    for levels in [MAX_DEPTH + 1, 100_000] {
        assert_eq!(
            RedisFrame::parse(&nested(levels)),
            Err(ParseError("nested too deeply")),
            "{levels} levels"
        );
    }
}

/// A declared length reserves at most `RESERVE_AHEAD` before its bytes arrive.
#[test]
fn a_declared_length_reserves_little_before_its_bytes_arrive() {
    let mut buf = BytesMut::from(&b"*2\r\n$3\r\nSET\r\n$200000000\r\nab"[..]);
    let mut decoder = RequestDecoder::new(512 * 1024 * 1024);
    assert!(decoder.decode(&mut buf).expect("valid so far").is_none());
    assert!(
        buf.capacity() <= 2 * crate::codec::RESERVE_AHEAD,
        "{}",
        buf.capacity()
    );
    let mut buf = BytesMut::from(&b"$200000000\r\nab"[..]);
    let mut decoder = ResponseDecoder::new(512 * 1024 * 1024);
    assert!(decoder.decode(&mut buf).expect("valid so far").is_none());
    assert!(
        buf.capacity() <= 2 * crate::codec::RESERVE_AHEAD,
        "{}",
        buf.capacity()
    );
}

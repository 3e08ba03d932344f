//! Protocol v5 framing: after the handshake (the answer to STARTUP, READY or AUTHENTICATE),
//! both sides wrap their envelopes in checksummed *segments*, compressed with LZ4 when the
//! STARTUP asked for it:
//!
//! ```text
//! uncompressed: header(3, little-endian) crc24(3) payload(len) crc32(4)
//!               header = len(17 bits) | self_contained(1 bit) << 17
//! lz4:          header(5, little-endian) crc24(3) payload(len) crc32(4)
//!               header = len(17) | uncompressed_len(17) << 17 | self_contained(1) << 34
//! ```
//!
//! A payload is at most 128 KiB - 1. A self-contained segment holds one or more whole
//! envelopes; a larger envelope travels in several segments that are not. The CRC24 covers
//! the header, the CRC32 the payload as sent (compressed or not). With LZ4, an uncompressed
//! length of 0 means the payload is sent as is (it did not get smaller). Inside segments,
//! envelopes carry no compression of their own.
//!
//! The decoder checks both CRCs and decompresses into a stream of envelope bytes, from which
//! [`EnvelopeDecoder`] takes whole envelopes: it refuses an oversized envelope from its
//! header, so the stream never holds more than one envelope and one segment. A segment is
//! decoded only when no whole envelope is waiting.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::{Compression, EnvelopeDecoder, Header, Opcode, SEGMENTS_FROM};
use crate::codec::DecodeError;

/// Largest payload of one segment.
pub const MAX_PAYLOAD: usize = 128 * 1024 - 1;
const CRC24_LEN: usize = 3;
const CRC32_LEN: usize = 4;
const CRC24_INIT: u32 = 0x87_5060;
const CRC24_POLY: u32 = 0x197_4F0B;
/// Bytes Cassandra feeds the CRC32 before a payload.
const CRC32_PREFIX: [u8; 4] = [0xfa, 0x2d, 0x55, 0xca];

/// Cassandra's CRC24 over the low `len` bytes of `value`, least significant first.
fn crc24(mut value: u64, len: usize) -> u32 {
    let mut crc = CRC24_INIT;
    for _ in 0..len {
        crc ^= ((value & 0xff) as u32) << 16;
        value >>= 8;
        for _ in 0..8 {
            crc <<= 1;
            if crc & 0x100_0000 != 0 {
                crc ^= CRC24_POLY;
            }
        }
    }
    crc & 0xFF_FFFF
}

fn crc32(payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&CRC32_PREFIX);
    hasher.update(payload);
    hasher.finalize()
}

fn read_le(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .rev()
        .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

fn write_le(out: &mut BytesMut, value: u64, len: usize) {
    for i in 0..len {
        out.put_u8((value >> (8 * i)) as u8);
    }
}

/// A v5 STARTUP sent and not answered yet (its stream, the compression it asks for): when
/// it is answered READY or AUTHENTICATE, both directions of the connection go in segments,
/// from the next byte on (not after an ERROR, never below v5). The source and the sink each
/// follow their side's handshake with one.
#[derive(Debug, Default, Clone, Copy)]
pub struct Handshake(Option<(i16, Compression)>);

impl Handshake {
    /// Notes a request going out: a v5 STARTUP starts the handshake.
    pub fn sent(&mut self, header: &Header, compression: Compression) {
        if header.opcode == Opcode::Startup && header.version >= SEGMENTS_FROM {
            self.0 = Some((header.stream, compression));
        }
    }

    /// A STARTUP is waiting for its answer (nothing else may be written before it: what
    /// follows is framed by what it answers).
    pub fn pending(&self) -> bool {
        self.0.is_some()
    }

    /// Notes an answer: the codec to switch to when it answers the STARTUP with READY or
    /// AUTHENTICATE.
    pub fn answered(&mut self, header: &Header) -> Option<SegmentCodec> {
        let (stream, compression) = self.0?;
        if stream != header.stream {
            return None;
        }
        self.0 = None;
        matches!(header.opcode, Opcode::Ready | Opcode::Authenticate)
            .then(|| SegmentCodec::new(compression))
    }
}

/// How a connection's segments are made: with LZ4 or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentCodec {
    lz4: bool,
}

impl SegmentCodec {
    /// The segments of a connection whose STARTUP asked for `compression`. (v5 compresses
    /// only with LZ4: Cassandra refuses a v5 STARTUP asking for Snappy.)
    pub fn new(compression: Compression) -> SegmentCodec {
        SegmentCodec {
            lz4: compression == Compression::Lz4,
        }
    }

    fn header_len(self) -> usize {
        if self.lz4 { 5 } else { 3 }
    }

    /// `envelopes` packed into segments, as one buffer to write.
    pub fn encode_all(self, envelopes: &[Bytes]) -> Bytes {
        let mut out = BytesMut::with_capacity(envelopes.iter().map(|e| e.len() + 16).sum());
        self.encode(envelopes.iter().map(|e| &e[..]), &mut out);
        out.freeze()
    }

    /// Appends `envelopes` to `out` as segments: whole envelopes packed into self-contained
    /// segments, an envelope larger than one payload cut across segments of its own.
    pub fn encode<'a>(self, envelopes: impl IntoIterator<Item = &'a [u8]>, out: &mut BytesMut) {
        let mut packed = BytesMut::new();
        for envelope in envelopes {
            if packed.len() + envelope.len() > MAX_PAYLOAD && !packed.is_empty() {
                self.segment(&packed, true, out);
                packed.clear();
            }
            if envelope.len() > MAX_PAYLOAD {
                for part in envelope.chunks(MAX_PAYLOAD) {
                    self.segment(part, false, out);
                }
            } else {
                packed.extend_from_slice(envelope);
            }
        }
        if !packed.is_empty() {
            self.segment(&packed, true, out);
        }
    }

    /// One envelope (or a few) as segments, in a buffer of their own.
    pub fn encode_one(self, envelope: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(envelope.len() + 16);
        self.encode([envelope], &mut out);
        out.freeze()
    }

    fn segment(self, payload: &[u8], self_contained: bool, out: &mut BytesMut) {
        debug_assert!(payload.len() <= MAX_PAYLOAD);
        let compressed = self
            .lz4
            .then(|| lz4_flex::block::compress(payload))
            .filter(|c| c.len() < payload.len());
        let (sent, uncompressed_len): (&[u8], u64) = match &compressed {
            Some(c) => (c, payload.len() as u64),
            None => (payload, 0),
        };
        let mut header = sent.len() as u64;
        let mut flag_at = 17;
        if self.lz4 {
            header |= uncompressed_len << 17;
            flag_at += 17;
        }
        if self_contained {
            header |= 1 << flag_at;
        }
        let len = self.header_len();
        out.reserve(len + CRC24_LEN + sent.len() + CRC32_LEN);
        write_le(out, header, len);
        write_le(out, u64::from(crc24(header, len)), CRC24_LEN);
        out.put_slice(sent);
        out.put_u32_le(crc32(sent));
    }
}

/// Takes envelopes out of a stream of segments.
#[derive(Debug)]
pub struct SegmentDecoder {
    codec: SegmentCodec,
    /// Envelope bytes taken out of segments and not yet split into envelopes.
    payload: BytesMut,
    envelopes: EnvelopeDecoder,
}

/// What the front of a buffer holds: a whole segment (its total length, its header), or not
/// enough bytes yet.
enum Front {
    Whole(usize, SegmentHeader),
    Partial,
}

#[derive(Clone, Copy)]
struct SegmentHeader {
    len: usize,
    uncompressed_len: usize,
}

impl SegmentDecoder {
    pub fn new(codec: SegmentCodec, max_frame: usize) -> SegmentDecoder {
        SegmentDecoder {
            codec,
            payload: BytesMut::new(),
            envelopes: EnvelopeDecoder::new(max_frame),
        }
    }

    pub fn codec(&self) -> SegmentCodec {
        self.codec
    }

    /// The next whole envelope, decoding segments off the front of `input` as needed;
    /// `Ok(None)` when more bytes are needed. A wrong CRC, a bad LZ4 block or an oversized
    /// envelope is an error (the stream cannot be read further).
    pub fn next(&mut self, input: &mut BytesMut) -> Result<Option<(Bytes, Header)>, DecodeError> {
        loop {
            if let Some(envelope) = self.envelopes.next(&mut self.payload)? {
                return Ok(Some(envelope));
            }
            let Front::Whole(total, header) = self.front(input)? else {
                return Ok(None);
            };
            let segment = input.split_to(total);
            self.take(&segment, header)?;
        }
    }

    /// Whether [`SegmentDecoder::next`] has something to give without reading: a whole
    /// envelope, a whole segment, or an error.
    pub fn has_frame(&self, input: &[u8]) -> bool {
        if self.payload.len() >= super::HEADER_LEN {
            match Header::parse(&self.payload) {
                Ok(h) if self.payload.len() >= super::HEADER_LEN + h.body_len => return true,
                Ok(_) => {}
                Err(_) => return true,
            }
        }
        !matches!(self.front(input), Ok(Front::Partial))
    }

    fn front(&self, input: &[u8]) -> Result<Front, DecodeError> {
        let len = self.codec.header_len();
        let Some(head) = input.get(..len + CRC24_LEN) else {
            return Ok(Front::Partial);
        };
        let header = read_le(&head[..len]);
        let sent_crc = read_le(&head[len..]) as u32;
        let crc = crc24(header, len);
        if crc != sent_crc {
            return Err(DecodeError::Malformed(format!(
                "CRC mismatch on a v5 segment header (received {sent_crc:06x}, computed {crc:06x})"
            )));
        }
        let payload_len = (header & 0x1_FFFF) as usize;
        let uncompressed_len = if self.codec.lz4 {
            ((header >> 17) & 0x1_FFFF) as usize
        } else {
            0
        };
        let total = len + CRC24_LEN + payload_len + CRC32_LEN;
        if input.len() < total {
            return Ok(Front::Partial);
        }
        Ok(Front::Whole(
            total,
            SegmentHeader {
                len: payload_len,
                uncompressed_len,
            },
        ))
    }

    /// Checks one whole segment's payload and adds it to the envelope stream.
    fn take(&mut self, segment: &[u8], header: SegmentHeader) -> Result<(), DecodeError> {
        let mut rest = &segment[self.codec.header_len() + CRC24_LEN..];
        let payload = &rest[..header.len];
        rest.advance(header.len);
        let sent_crc = rest.get_u32_le();
        let crc = crc32(payload);
        if crc != sent_crc {
            return Err(DecodeError::Malformed(format!(
                "CRC mismatch on a v5 segment payload (received {sent_crc:08x}, computed {crc:08x})"
            )));
        }
        if header.uncompressed_len == 0 {
            self.payload.extend_from_slice(payload);
            return Ok(());
        }
        let start = self.payload.len();
        self.payload.resize(start + header.uncompressed_len, 0);
        match lz4_flex::block::decompress_into(payload, &mut self.payload[start..]) {
            Ok(n) if n == header.uncompressed_len => Ok(()),
            _ => {
                self.payload.truncate(start);
                Err(DecodeError::Malformed(
                    "a v5 segment's LZ4 payload does not decompress to its stated length".into(),
                ))
            }
        }
    }
}

/// How a connection's envelopes arrive: as they are (v3, v4 and the v5 handshake), or in
/// v5 segments once the handshake is done.
#[derive(Debug)]
pub enum FrameDecoder {
    Envelopes(EnvelopeDecoder),
    Segments(SegmentDecoder),
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> FrameDecoder {
        FrameDecoder::Envelopes(EnvelopeDecoder::new(max_frame))
    }

    pub fn next(&mut self, input: &mut BytesMut) -> Result<Option<(Bytes, Header)>, DecodeError> {
        match self {
            FrameDecoder::Envelopes(d) => d.next(input),
            FrameDecoder::Segments(d) => d.next(input),
        }
    }

    /// Whether a whole frame (or an error) is waiting in `input`.
    pub fn has_frame(&self, input: &[u8]) -> bool {
        match self {
            FrameDecoder::Envelopes(_) => {
                input.len() >= super::HEADER_LEN
                    && Header::parse(input)
                        .map_or(true, |h| input.len() >= super::HEADER_LEN + h.body_len)
            }
            FrameDecoder::Segments(d) => d.has_frame(input),
        }
    }

    /// From the next byte on, envelopes come in segments made by `codec`.
    pub fn switch_to_segments(&mut self, codec: SegmentCodec) {
        if let FrameDecoder::Envelopes(d) = self {
            *self = FrameDecoder::Segments(SegmentDecoder::new(codec, d.max_frame));
        }
    }

    /// The segments' codec, once the connection uses them.
    pub fn segments(&self) -> Option<SegmentCodec> {
        match self {
            FrameDecoder::Envelopes(_) => None,
            FrameDecoder::Segments(d) => Some(d.codec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::cassandra::{Direction, HEADER_LEN, Opcode};

    fn envelope(stream: i16, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        Header {
            version: 5,
            direction: Direction::Request,
            flags: 0,
            stream,
            opcode: Opcode::Query,
            body_len: body.len(),
        }
        .encode(&mut out);
        out.put_slice(body);
        out.to_vec()
    }

    fn decode_all(codec: SegmentCodec, mut input: BytesMut, step: usize) -> Vec<Bytes> {
        let mut decoder = SegmentDecoder::new(codec, 1 << 30);
        let mut fed = BytesMut::new();
        let mut out = Vec::new();
        while !input.is_empty() || decoder.has_frame(&fed) {
            let n = step.min(input.len());
            fed.extend_from_slice(&input.split_to(n));
            while let Some((frame, _)) = decoder.next(&mut fed).expect("valid segments") {
                out.push(frame);
            }
        }
        assert!(fed.is_empty());
        out
    }

    /// The CRCs of Cassandra's and the Python driver's reference implementation: the
    /// header CRC24 of a self-contained 0-byte uncompressed segment, and the CRC32 of an
    /// empty payload (the prefix alone).
    #[test]
    fn the_checksums_are_cassandras() {
        // compute_crc24(...) and zlib.crc32(payload, CRC32_INITIAL) of the Python driver's
        // cassandra/segment.py.
        assert_eq!(crc24(1 << 17, 3), 0xc4_366a);
        assert_eq!(crc24(0x12_3456_789a, 5), 0x40_d313);
        assert_eq!(crc32(b""), 0x4477_7ed3);
        assert_eq!(crc32(b"hello"), 0xb60e_8074);
        let mut out = BytesMut::new();
        SegmentCodec::new(Compression::None).encode([&b""[..]; 0], &mut out);
        assert!(out.is_empty(), "no envelopes, no segment");
    }

    #[test]
    fn envelopes_round_trip_in_both_codecs_at_every_split() {
        let small: Vec<Vec<u8>> = (0..20)
            .map(|i| envelope(i, &vec![b'a' + i as u8; 100 * i as usize]))
            .collect();
        let large = envelope(
            99,
            &(0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
        );
        let mut all: Vec<&[u8]> = small.iter().map(Vec::as_slice).collect();
        all.insert(10, &large);
        for codec in [
            SegmentCodec::new(Compression::None),
            SegmentCodec::new(Compression::Lz4),
        ] {
            let mut wire = BytesMut::new();
            codec.encode(all.iter().copied(), &mut wire);
            for step in [1, 7, 4096, usize::MAX] {
                let got = decode_all(codec, wire.clone(), step);
                assert_eq!(got.len(), all.len());
                for (g, want) in got.iter().zip(&all) {
                    assert_eq!(&g[..], *want);
                }
            }
        }
    }

    #[test]
    fn large_envelopes_are_cut_and_small_ones_packed() {
        let codec = SegmentCodec::new(Compression::None);
        let large = envelope(1, &vec![7u8; 2 * MAX_PAYLOAD]);
        let mut wire = BytesMut::new();
        codec.encode([&large[..]], &mut wire);
        let mut flags = Vec::new();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let header = read_le(&rest[..3]);
            flags.push(header & (1 << 17) != 0);
            rest = &rest[6 + (header & 0x1_FFFF) as usize + 4..];
        }
        assert_eq!(
            flags,
            [false, false, false],
            "three parts, none self-contained"
        );

        let small = [envelope(1, b"x"), envelope(2, b"y")];
        let mut wire = BytesMut::new();
        codec.encode(small.iter().map(Vec::as_slice), &mut wire);
        assert_eq!(wire.len(), 6 + 2 * (HEADER_LEN + 1) + 4, "one segment");
    }

    #[test]
    fn compressible_payloads_shrink_and_incompressible_ones_go_as_they_are() {
        let codec = SegmentCodec::new(Compression::Lz4);
        let mut wire = BytesMut::new();
        codec.encode([&envelope(1, &[0u8; 10_000])[..]], &mut wire);
        assert!(wire.len() < 1000, "{}", wire.len());
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let noise: Vec<u8> = (0..5000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let mut wire = BytesMut::new();
        let e = envelope(1, &noise);
        codec.encode([&e[..]], &mut wire);
        let header = read_le(&wire[..5]);
        assert_eq!((header >> 17) & 0x1_FFFF, 0, "sent uncompressed");
        assert_eq!(decode_all(codec, wire, 100)[0], e);
    }

    #[test]
    fn corrupt_segments_are_errors() {
        for codec in [
            SegmentCodec::new(Compression::None),
            SegmentCodec::new(Compression::Lz4),
        ] {
            let mut wire = BytesMut::new();
            codec.encode([&envelope(1, &[1u8; 3000])[..]], &mut wire);
            for at in [0, codec.header_len() + 1, wire.len() / 2, wire.len() - 1] {
                let mut bad = wire.clone();
                bad[at] ^= 0x10;
                let result = SegmentDecoder::new(codec, 1 << 20).next(&mut bad);
                assert!(
                    matches!(&result, Err(DecodeError::Malformed(m)) if m.contains("CRC mismatch")),
                    "byte {at}: {result:?}"
                );
            }
        }
    }

    #[test]
    fn an_oversized_envelope_is_refused_from_its_first_segment() {
        let codec = SegmentCodec::new(Compression::None);
        let mut wire = BytesMut::new();
        codec.encode([&envelope(1, &vec![0u8; 500_000])[..]], &mut wire);
        wire.truncate(MAX_PAYLOAD + 10);
        let result = SegmentDecoder::new(codec, 100_000).next(&mut wire);
        assert!(
            matches!(result, Err(DecodeError::FrameTooLarge { max: 100_000, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn the_frame_decoder_switches_at_a_byte_boundary() {
        let codec = SegmentCodec::new(Compression::Lz4);
        let ready = envelope(0, b"");
        let mut input = BytesMut::from(&ready[..]);
        codec.encode([&envelope(1, b"after")[..]], &mut input);
        let mut decoder = FrameDecoder::new(1 << 20);
        let (first, _) = decoder.next(&mut input).expect("valid").expect("whole");
        assert_eq!(&first[..], &ready[..]);
        assert!(!decoder.has_frame(&[]));
        decoder.switch_to_segments(codec);
        assert_eq!(decoder.segments(), Some(codec));
        assert!(decoder.has_frame(&input));
        let (second, header) = decoder.next(&mut input).expect("valid").expect("whole");
        assert_eq!(header.stream, 1);
        assert_eq!(&second[HEADER_LEN..], b"after");
    }
}

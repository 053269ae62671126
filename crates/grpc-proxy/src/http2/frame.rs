//! HTTP/2 frames (RFC 9113, section 4 and 6) as this server reads and writes them, and the HPACK
//! encoding of its response headers (RFC 7541).
//!
//! Responses are encoded without the dynamic table and without Huffman coding: a gRPC response
//! has three or four short headers, so the few bytes saved are not worth an encoder's state
//! (and a peer's `SETTINGS_HEADER_TABLE_SIZE` then never matters). Requests are decoded with
//! `loona-hpack`, which keeps the table clients fill.

use bytes::{BufMut, BytesMut};
use hyper::header::HeaderMap;

/// The 9 bytes before every frame's payload.
pub const HEADER_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// Error codes (RFC 9113, section 7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const INTERNAL_ERROR: u32 = 0x2;
pub const FLOW_CONTROL_ERROR: u32 = 0x3;
pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The frame size every peer accepts, and the largest this server accepts.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 16_384;
/// Largest flow-control window (RFC 9113, section 6.9.1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

/// A frame's 9-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// Reads a frame header from the first 9 bytes of `b` (the caller checked there are 9).
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// Appends a frame header.
pub fn put_head(out: &mut BytesMut, len: usize, kind: u8, flags: u8, stream: u32) {
    debug_assert!(len < 1 << 24);
    out.put_u8((len >> 16) as u8);
    out.put_u8((len >> 8) as u8);
    out.put_u8(len as u8);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(stream);
}

/// Appends a SETTINGS frame with these (identifier, value) pairs.
pub fn put_settings(out: &mut BytesMut, settings: &[(u16, u32)]) {
    put_head(out, settings.len() * 6, SETTINGS, 0, 0);
    for &(id, value) in settings {
        out.put_u16(id);
        out.put_u32(value);
    }
}

pub fn put_window_update(out: &mut BytesMut, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.put_u32(increment);
}

pub fn put_rst_stream(out: &mut BytesMut, stream: u32, code: u32) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.put_u32(code);
}

pub fn put_ping(out: &mut BytesMut, flags: u8, payload: [u8; 8]) {
    put_head(out, 8, PING, flags, 0);
    out.put_slice(&payload);
}

pub fn put_goaway(out: &mut BytesMut, last_stream: u32, code: u32, debug: &[u8]) {
    put_head(out, 8 + debug.len(), GOAWAY, 0, 0);
    out.put_u32(last_stream);
    out.put_u32(code);
    out.put_slice(debug);
}

/// Appends DATA frames carrying `data`, each at most `max_frame` long; the last one carries
/// END_STREAM if `end`. Empty `data` with `end` is one empty frame.
pub fn put_data(out: &mut BytesMut, stream: u32, data: &[u8], end: bool, max_frame: usize) {
    let mut chunks = data.chunks(max_frame).peekable();
    if chunks.peek().is_none() {
        put_head(out, 0, DATA, if end { END_STREAM } else { 0 }, stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        let flags = if end && chunks.peek().is_none() {
            END_STREAM
        } else {
            0
        };
        put_head(out, chunk.len(), DATA, flags, stream);
        out.put_slice(chunk);
    }
}

/// Connection-specific headers, which HTTP/2 forbids (RFC 9113, section 8.2.2).
fn is_connection_specific(name: &str) -> bool {
    matches!(
        name,
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    )
}

/// Appends a HEADERS frame (and CONTINUATION frames if the block is over `max_frame`): the
/// pseudo-headers `pseudo` writes ([`encode_status`], [`encode_request`], or none for
/// trailers), then `headers`.
pub fn put_headers(
    out: &mut BytesMut,
    stream: u32,
    pseudo: impl FnOnce(&mut BytesMut),
    headers: &HeaderMap,
    end: bool,
    max_frame: usize,
) {
    let start = out.len();
    put_head(out, 0, HEADERS, 0, stream);
    let block_start = out.len();
    pseudo(out);
    for (name, value) in headers {
        if is_connection_specific(name.as_str()) {
            continue;
        }
        encode_field(out, name.as_str(), value.as_bytes());
    }
    let block_len = out.len() - block_start;
    let end_flag = if end { END_STREAM } else { 0 };
    if block_len <= max_frame {
        let head = &mut out[start..block_start];
        head[0] = (block_len >> 16) as u8;
        head[1] = (block_len >> 8) as u8;
        head[2] = block_len as u8;
        head[4] = END_HEADERS | end_flag;
        return;
    }
    // Rare (a very long grpc-message): split the block over CONTINUATION frames.
    let block = out.split_off(block_start);
    out.truncate(start);
    let mut chunks = block.chunks(max_frame).peekable();
    let mut first = true;
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let (kind, mut flags) = if first {
            (HEADERS, end_flag)
        } else {
            (CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        put_head(out, chunk.len(), kind, flags, stream);
        out.put_slice(chunk);
        first = false;
    }
}

/// `:status`: an index into HPACK's static table for the common ones, else a literal.
pub fn encode_status(out: &mut BytesMut, status: u16) {
    let index = match status {
        200 => 8,
        204 => 9,
        206 => 10,
        304 => 11,
        400 => 12,
        404 => 13,
        500 => 14,
        _ => {
            // Literal without indexing, name `:status` (static index 8).
            encode_int(out, 8, 4, 0x00);
            encode_string(out, status.to_string().as_bytes());
            return;
        }
    };
    encode_int(out, index, 7, 0x80);
}

/// A request's pseudo-headers: `:method` (indexed if GET or POST), `:scheme` (indexed),
/// `:authority` and `:path` (literals with indexed names).
pub fn encode_request(
    out: &mut BytesMut,
    method: &[u8],
    https: bool,
    authority: &[u8],
    path: &[u8],
) {
    match method {
        b"GET" => encode_int(out, 2, 7, 0x80),
        b"POST" => encode_int(out, 3, 7, 0x80),
        _ => {
            encode_int(out, 2, 4, 0x00);
            encode_string(out, method);
        }
    }
    encode_int(out, if https { 7 } else { 6 }, 7, 0x80);
    encode_int(out, 1, 4, 0x00);
    encode_string(out, authority);
    encode_int(out, 4, 4, 0x00);
    encode_string(out, path);
}

/// A header as a literal without indexing: its name by static-table index where it has one a
/// response uses, else literal.
fn encode_field(out: &mut BytesMut, name: &str, value: &[u8]) {
    let index = match name {
        "content-type" => 31,
        "content-length" => 28,
        "date" => 33,
        "cache-control" => 24,
        "location" => 46,
        "server" => 54,
        "www-authenticate" => 61,
        _ => 0,
    };
    encode_int(out, index, 4, 0x00);
    if index == 0 {
        encode_string(out, name.as_bytes());
    }
    encode_string(out, value);
}

/// An HPACK string literal, not Huffman-coded.
fn encode_string(out: &mut BytesMut, s: &[u8]) {
    encode_int(out, s.len(), 7, 0x00);
    out.put_slice(s);
}

/// An HPACK integer with a `prefix`-bit prefix, its first byte's other bits `first`.
fn encode_int(out: &mut BytesMut, value: usize, prefix: u8, first: u8) {
    let max = (1usize << prefix) - 1;
    if value < max {
        out.put_u8(first | value as u8);
        return;
    }
    out.put_u8(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.put_u8((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.put_u8(rest as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn decode(block: &[u8]) -> Vec<(String, String)> {
        let mut decoder = loona_hpack::Decoder::new();
        let mut fields = Vec::new();
        decoder
            .decode_with_cb(block, |n, v| {
                fields.push((
                    String::from_utf8(n.into_owned()).unwrap(),
                    String::from_utf8(v.into_owned()).unwrap(),
                ))
            })
            .unwrap();
        fields
    }

    #[test]
    fn response_headers_decode_to_what_was_encoded() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from_static("3"));
        headers.insert("connection", HeaderValue::from_static("close"));
        headers.insert("x-long", HeaderValue::from_str(&"v".repeat(300)).unwrap());
        for status in [200, 404, 431, 503] {
            let mut out = BytesMut::new();
            let status_field = |out: &mut BytesMut| encode_status(out, status);
            put_headers(
                &mut out,
                7,
                status_field,
                &headers,
                true,
                DEFAULT_MAX_FRAME_SIZE,
            );
            let head = Head::parse(&out);
            assert_eq!((head.kind, head.stream), (HEADERS, 7));
            assert_eq!(head.flags, END_HEADERS | END_STREAM);
            assert_eq!(head.len, out.len() - HEADER_LEN);
            let fields = decode(&out[HEADER_LEN..]);
            assert_eq!(fields[0], (":status".into(), status.to_string()));
            assert_eq!(
                fields[1],
                ("content-type".into(), "application/grpc".into())
            );
            assert_eq!(fields[2], ("grpc-status".into(), "3".into()));
            // Connection-specific headers are left out.
            assert_eq!(fields[3], ("x-long".into(), "v".repeat(300)));
            assert_eq!(fields.len(), 4);
        }
    }

    #[test]
    fn a_block_over_the_frame_size_continues_in_continuation_frames() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "grpc-message",
            HeaderValue::from_str(&"m".repeat(40)).unwrap(),
        );
        let mut out = BytesMut::new();
        put_headers(&mut out, 1, |_| {}, &headers, true, 16);
        let mut block = Vec::new();
        let mut at = 0;
        let mut kinds = Vec::new();
        while at < out.len() {
            let head = Head::parse(&out[at..]);
            kinds.push((head.kind, head.flags));
            block.extend_from_slice(&out[at + HEADER_LEN..at + HEADER_LEN + head.len]);
            at += HEADER_LEN + head.len;
        }
        assert_eq!(kinds.first(), Some(&(HEADERS, END_STREAM)));
        assert_eq!(kinds.last(), Some(&(CONTINUATION, END_HEADERS)));
        assert!(kinds.len() >= 3);
        assert_eq!(
            decode(&block),
            vec![("grpc-message".into(), "m".repeat(40))]
        );
    }

    #[test]
    fn data_is_split_at_the_frame_size_and_only_the_last_frame_ends_the_stream() {
        let mut out = BytesMut::new();
        put_data(&mut out, 3, &[1; 40], true, 16);
        let lens: Vec<(usize, u8)> = [0, 25, 50]
            .iter()
            .map(|&at| {
                let h = Head::parse(&out[at..]);
                (h.len, h.flags)
            })
            .collect();
        assert_eq!(lens, vec![(16, 0), (16, 0), (8, END_STREAM)]);
        assert_eq!(out.len(), 3 * HEADER_LEN + 40);
        let mut empty = BytesMut::new();
        put_data(&mut empty, 3, &[], true, 16);
        assert_eq!(
            Head::parse(&empty),
            Head {
                len: 0,
                kind: DATA,
                flags: END_STREAM,
                stream: 3
            }
        );
    }

    #[test]
    fn request_pseudo_headers_decode_to_what_was_encoded() {
        let mut out = BytesMut::new();
        encode_request(
            &mut out,
            b"POST",
            false,
            b"127.0.0.1:2379",
            b"/etcdserverpb.KV/Put",
        );
        encode_request(&mut out, b"DELETE", true, b"h", b"/");
        let want = [
            (":method", "POST"),
            (":scheme", "http"),
            (":authority", "127.0.0.1:2379"),
            (":path", "/etcdserverpb.KV/Put"),
            (":method", "DELETE"),
            (":scheme", "https"),
            (":authority", "h"),
            (":path", "/"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(decode(&out), want);
    }

    #[test]
    fn integers_use_continuation_bytes_past_the_prefix() {
        // RFC 7541, C.1.2: 1337 with a 5-bit prefix.
        let mut out = BytesMut::new();
        encode_int(&mut out, 1337, 5, 0);
        assert_eq!(&out[..], &[31, 154, 10]);
    }
}

//! HPACK decoding of client request headers (RFC 7541), straight into the types a request is
//! made of: a header the dynamic table holds is kept parsed ([`Field`]), so a field a client
//! sends by index (most of a gRPC call's, from the second call on) costs a clone of shared
//! bytes. Huffman-coded strings are decoded with `httlib-huffman`.

use std::collections::VecDeque;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue};

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Method(Bytes),
    Scheme(Bytes),
    Authority(Bytes),
    Path(Bytes),
    /// Any other pseudo-header (`:status`, `:protocol`, unknown ones): not valid in a request
    /// this server serves, kept so the table stays in step.
    OtherPseudo(Bytes, Bytes),
    Header(HeaderName, HeaderValue),
}

impl Field {
    fn new(name: &[u8], value: Bytes) -> Result<Field, Error> {
        Ok(match name {
            b":method" => Field::Method(value),
            b":scheme" => Field::Scheme(value),
            b":authority" => Field::Authority(value),
            b":path" => Field::Path(value),
            [b':', ..] => Field::OtherPseudo(Bytes::copy_from_slice(name), value),
            _ => Field::Header(
                HeaderName::from_bytes(name).map_err(|_| Error::InvalidField)?,
                HeaderValue::from_maybe_shared(value).map_err(|_| Error::InvalidField)?,
            ),
        })
    }

    /// RFC 7541's size of an entry: its name, its value, and 32.
    fn size(&self) -> usize {
        32 + match self {
            Field::Method(v) => 7 + v.len(),
            Field::Scheme(v) => 7 + v.len(),
            Field::Authority(v) => 10 + v.len(),
            Field::Path(v) => 5 + v.len(),
            Field::OtherPseudo(n, v) => n.len() + v.len(),
            Field::Header(n, v) => n.as_str().len() + v.len(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer too large")]
    IntegerOverflow,
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    #[error("invalid Huffman code")]
    Huffman,
    #[error("dynamic table size update over the allowed size")]
    TableSizeTooLarge,
    #[error("invalid header field")]
    InvalidField,
}

/// RFC 7541, Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// A connection's HPACK decoder: its dynamic table.
pub struct Decoder {
    /// Newest first.
    table: VecDeque<Field>,
    size: usize,
    max_size: usize,
    /// The most the client may set `max_size` to (the SETTINGS_HEADER_TABLE_SIZE announced).
    allowed: usize,
    /// Scratch space for Huffman-decoded strings.
    scratch: Vec<u8>,
}

impl Decoder {
    pub fn new(allowed: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: allowed,
            allowed,
            scratch: Vec::new(),
        }
    }

    /// Decodes a whole header block, giving each field to `emit` in order.
    pub fn decode(&mut self, block: &Bytes, mut emit: impl FnMut(Field)) -> Result<(), Error> {
        let mut at = 0;
        while at < block.len() {
            let first = block[at];
            if first & 0x80 != 0 {
                let index = integer(block, &mut at, 7)?;
                emit(self.get(index)?);
            } else if first & 0xe0 == 0x20 {
                let size = integer(block, &mut at, 5)?;
                if size > self.allowed {
                    return Err(Error::TableSizeTooLarge);
                }
                self.max_size = size;
                self.evict(0);
            } else {
                // Literal: with incremental indexing (01), never indexed (0001), without (0000).
                let (prefix, index_it) = if first & 0x40 != 0 {
                    (6, true)
                } else {
                    (4, false)
                };
                let name_index = integer(block, &mut at, prefix)?;
                let field = if name_index == 0 {
                    let name = self.string(block, &mut at)?;
                    let value = self.string(block, &mut at)?;
                    Field::new(&name, value)?
                } else {
                    let named = self.get(name_index)?;
                    let value = self.string(block, &mut at)?;
                    with_value(named, value)?
                };
                if index_it {
                    self.insert(field.clone());
                }
                emit(field);
            }
        }
        Ok(())
    }

    fn get(&self, index: usize) -> Result<Field, Error> {
        match index {
            0 => Err(Error::BadIndex(0)),
            1..=61 => {
                let (name, value) = STATIC_TABLE[index - 1];
                Field::new(name.as_bytes(), Bytes::from_static(value.as_bytes()))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(Error::BadIndex(index)),
        }
    }

    fn insert(&mut self, field: Field) {
        let size = field.size();
        self.evict(size);
        if size <= self.max_size {
            self.size += size;
            self.table.push_front(field);
        }
    }

    /// Removes the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some(old) => self.size -= old.size(),
                None => break,
            }
        }
    }

    /// A string literal (RFC 7541, section 5.2).
    fn string(&mut self, block: &Bytes, at: &mut usize) -> Result<Bytes, Error> {
        let huffman = *block.get(*at).ok_or(Error::Truncated)? & 0x80 != 0;
        let len = integer(block, at, 7)?;
        let end = at.checked_add(len).ok_or(Error::Truncated)?;
        if end > block.len() {
            return Err(Error::Truncated);
        }
        let raw = block.slice(*at..end);
        *at = end;
        if !huffman {
            return Ok(raw);
        }
        self.scratch.clear();
        httlib_huffman::decode(
            &raw,
            &mut self.scratch,
            httlib_huffman::DecoderSpeed::FiveBits,
        )
        .map_err(|_| Error::Huffman)?;
        Ok(Bytes::copy_from_slice(&self.scratch))
    }
}

/// The field named as `named` (from a table), with `value`.
fn with_value(named: Field, value: Bytes) -> Result<Field, Error> {
    Ok(match named {
        Field::Method(_) => Field::Method(value),
        Field::Scheme(_) => Field::Scheme(value),
        Field::Authority(_) => Field::Authority(value),
        Field::Path(_) => Field::Path(value),
        Field::OtherPseudo(name, _) => Field::OtherPseudo(name, value),
        Field::Header(name, _) => Field::Header(
            name,
            HeaderValue::from_maybe_shared(value).map_err(|_| Error::InvalidField)?,
        ),
    })
}

/// An integer with an N-bit prefix (RFC 7541, section 5.1), from `block[*at]` on.
fn integer(block: &[u8], at: &mut usize, prefix: u8) -> Result<usize, Error> {
    let max = (1usize << prefix) - 1;
    let first = *block.get(*at).ok_or(Error::Truncated)?;
    *at += 1;
    let mut value = usize::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0u32;
    loop {
        let b = *block.get(*at).ok_or(Error::Truncated)?;
        *at += 1;
        if shift > 28 {
            return Err(Error::IntegerOverflow);
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(decoder: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        decoder
            .decode(&Bytes::copy_from_slice(block), |f| {
                let (n, v) = match f {
                    Field::Method(v) => (":method".to_string(), v),
                    Field::Scheme(v) => (":scheme".to_string(), v),
                    Field::Authority(v) => (":authority".to_string(), v),
                    Field::Path(v) => (":path".to_string(), v),
                    Field::OtherPseudo(n, v) => (String::from_utf8(n.to_vec()).unwrap(), v),
                    Field::Header(n, v) => (n.to_string(), Bytes::copy_from_slice(v.as_bytes())),
                };
                out.push((n, String::from_utf8(v.to_vec()).unwrap()));
            })
            .unwrap();
        out
    }

    fn reference(decoder: &mut loona_hpack::Decoder<'_>, block: &[u8]) -> Vec<(String, String)> {
        decoder
            .decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    #[test]
    fn the_static_table_is_rfc_7541s() {
        // Checked against another implementation's table, entry by entry.
        for index in 1..=61u8 {
            let block = [0x80 | index];
            let ours = fields(&mut Decoder::new(4096), &block);
            let theirs = reference(&mut loona_hpack::Decoder::new(), &block);
            assert_eq!(ours, theirs, "static index {index}");
        }
    }

    #[test]
    fn rfc_7541_request_examples_with_huffman_coding_and_the_dynamic_table() {
        // RFC 7541, C.4.1 to C.4.3: three requests on one connection.
        let blocks: [&[u8]; 3] = [
            &[
                0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab,
                0x90, 0xf4, 0xff,
            ],
            &[
                0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf,
            ],
            &[
                0x82, 0x87, 0x85, 0xbf, 0x40, 0x88, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xa9, 0x7d, 0x7f,
                0x89, 0x25, 0xa8, 0x49, 0xe9, 0x5b, 0xb8, 0xe8, 0xb4, 0xbf,
            ],
        ];
        let mut ours = Decoder::new(4096);
        let mut theirs = loona_hpack::Decoder::new();
        for block in blocks {
            assert_eq!(fields(&mut ours, block), reference(&mut theirs, block));
        }
        let first = fields(&mut Decoder::new(4096), blocks[0]);
        assert_eq!(
            first,
            vec![
                (":method".to_string(), "GET".to_string()),
                (":scheme".to_string(), "http".to_string()),
                (":path".to_string(), "/".to_string()),
                (":authority".to_string(), "www.example.com".to_string()),
            ]
        );
        assert_eq!(ours.table.len(), 3);
        assert_eq!(ours.size, 164);
    }

    #[test]
    fn entries_are_evicted_to_fit_the_table_size() {
        // RFC 7541, C.5 uses a 256-byte table: after three responses, evictions happened.
        let mut ours = Decoder::new(256);
        let block = [
            0x48, 0x03, 0x33, 0x30, 0x32, 0x58, 0x07, 0x70, 0x72, 0x69, 0x76, 0x61, 0x74, 0x65,
            0x61, 0x1d, 0x4d, 0x6f, 0x6e, 0x2c, 0x20, 0x32, 0x31, 0x20, 0x4f, 0x63, 0x74, 0x20,
            0x32, 0x30, 0x31, 0x33, 0x20, 0x32, 0x30, 0x3a, 0x31, 0x33, 0x3a, 0x32, 0x31, 0x20,
            0x47, 0x4d, 0x54, 0x6e, 0x17, 0x68, 0x74, 0x74, 0x70, 0x73, 0x3a, 0x2f, 0x2f, 0x77,
            0x77, 0x77, 0x2e, 0x65, 0x78, 0x61, 0x6d, 0x70, 0x6c, 0x65, 0x2e, 0x63, 0x6f, 0x6d,
        ];
        fields(&mut ours, &block);
        assert_eq!(ours.size, 222);
        // ":status: 307" (literal, indexed) pushes the oldest entry out.
        fields(&mut ours, &[0x48, 0x03, 0x33, 0x30, 0x37, 0xc1, 0xc0, 0xbf]);
        assert_eq!(ours.size, 222);
        assert_eq!(ours.table.len(), 4);
    }

    #[test]
    fn bad_blocks_are_errors_not_panics() {
        let mut d = Decoder::new(4096);
        let cases: [(&[u8], Error); 5] = [
            (&[0x80], Error::BadIndex(0)),
            (&[0xbe], Error::BadIndex(62)),
            (&[0x40, 0x05, b'a'], Error::Truncated),
            (&[0x3f, 0xe1, 0x7f], Error::TableSizeTooLarge),
            (
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
                Error::IntegerOverflow,
            ),
        ];
        for (block, want) in cases {
            let got = d.decode(&Bytes::copy_from_slice(block), |_| {});
            assert_eq!(got, Err(want), "{block:?}");
        }
    }
}

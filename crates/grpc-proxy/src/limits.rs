//! Message size limits on forwarded calls (`--max-send-bytes`, `--max-recv-bytes`, gRPC's 4 MiB
//! server default), checked without looking at, copying or buffering a payload.
//!
//! A gRPC body is a sequence of length-prefixed messages: one byte (compressed or not), a
//! big-endian `u32` length, then that many payload bytes. HTTP/2 cuts it into DATA frames
//! anywhere: a frame may hold many messages, a piece of one, or a piece of a prefix.
//! [`MessageLimit`] follows the prefixes across the chunks of one direction of one call and fails
//! as soon as a prefix announces a message over the limit, before its payload has arrived, so
//! the byte forwarder can end the call with `RESOURCE_EXHAUSTED` (grpc-go's code for both sides)
//! without holding anything. Work per chunk is proportional to the number of prefixes in it.

use std::fmt;

/// Which side of a call a limit guards; it only changes the error text, which is grpc-go's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Messages arriving at a receiver (a server's or a client's receive limit).
    Receive,
    /// Messages a sender is about to send (a client's `MaxCallSendMsgSize`).
    Send,
}

/// A message announced longer than the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    /// The length in the message's prefix.
    pub len: usize,
    /// The limit.
    pub max: usize,
    /// The side the limit guards.
    pub direction: Direction,
}

impl TooLarge {
    /// The gRPC status code grpc-go answers with on either side: `RESOURCE_EXHAUSTED`.
    pub const GRPC_CODE: u16 = 8;
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // grpc-go's texts (rpc_util.go), which etcd's clients and etcd's proxy print.
        match self.direction {
            Direction::Receive => write!(
                f,
                "grpc: received message larger than max ({} vs. {})",
                self.len, self.max
            ),
            Direction::Send => write!(
                f,
                "grpc: trying to send message larger than max ({} vs. {})",
                self.len, self.max
            ),
        }
    }
}

impl std::error::Error for TooLarge {}

/// Length of a gRPC message prefix: compressed flag and big-endian `u32` length.
const PREFIX_LEN: u8 = 5;

/// Where the scanner stands in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Inside a prefix: `have` of its 5 bytes seen, the length bytes among them folded into `len`.
    Prefix { have: u8, len: u32 },
    /// Inside a payload: this many bytes of it still to come.
    Payload { remaining: u32 },
    /// A message over the limit was announced; the stream is not scanned further.
    Failed(TooLarge),
}

/// Checks the gRPC framing of one direction of one call against a size limit, chunk by chunk.
#[derive(Debug, Clone)]
pub struct MessageLimit {
    max: usize,
    direction: Direction,
    state: State,
}

impl MessageLimit {
    /// A limit on received messages: at most `max` payload bytes each.
    pub fn new(max: usize) -> MessageLimit {
        MessageLimit::with_direction(max, Direction::Receive)
    }

    /// A limit on messages about to be sent (its error says "trying to send").
    pub fn for_send(max: usize) -> MessageLimit {
        MessageLimit::with_direction(max, Direction::Send)
    }

    /// A limit for the given side.
    pub fn with_direction(max: usize, direction: Direction) -> MessageLimit {
        MessageLimit {
            max,
            direction,
            state: State::Prefix { have: 0, len: 0 },
        }
    }

    /// The limit.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Scans the next chunk of the stream (chunks in order, none skipped). Fails on the first
    /// prefix, possibly completed by this chunk, whose length is over the limit; once failed,
    /// every later call fails with the same error.
    pub fn scan(&mut self, chunk: &[u8]) -> Result<(), TooLarge> {
        let mut rest = chunk;
        loop {
            match self.state {
                State::Failed(e) => return Err(e),
                State::Payload { remaining } => {
                    // Lossless on every platform: the `min` is at most `rest.len()`.
                    let take = rest.len().min(remaining as usize);
                    rest = &rest[take..];
                    let remaining = remaining - take as u32;
                    self.state = if remaining == 0 {
                        State::Prefix { have: 0, len: 0 }
                    } else {
                        State::Payload { remaining }
                    };
                    if rest.is_empty() {
                        return Ok(());
                    }
                }
                State::Prefix { mut have, mut len } => {
                    let take = rest.len().min(usize::from(PREFIX_LEN - have));
                    if take == 0 {
                        return Ok(());
                    }
                    for &b in &rest[..take] {
                        // Byte 0 is the compressed flag; bytes 1 to 4 the length.
                        if have > 0 {
                            len = (len << 8) | u32::from(b);
                        }
                        have += 1;
                    }
                    rest = &rest[take..];
                    self.state = if have < PREFIX_LEN {
                        State::Prefix { have, len }
                    } else if u64::from(len) > self.max as u64 {
                        State::Failed(TooLarge {
                            // u32 fits in usize on every target tokio and hyper build for.
                            len: len as usize,
                            max: self.max,
                            direction: self.direction,
                        })
                    } else if len == 0 {
                        State::Prefix { have: 0, len: 0 }
                    } else {
                        State::Payload { remaining: len }
                    };
                }
            }
        }
    }

    /// No message is partly seen: the stream may end here without cutting one (false also
    /// after a failure).
    pub fn at_message_boundary(&self) -> bool {
        self.state == State::Prefix { have: 0, len: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One gRPC message: flag, big-endian length, payload.
    fn frame(compressed: bool, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::from(compressed)];
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A prefix alone announcing `len` bytes.
    fn prefix(len: u32) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&len.to_be_bytes());
        out
    }

    fn received(len: usize, max: usize) -> TooLarge {
        TooLarge {
            len,
            max,
            direction: Direction::Receive,
        }
    }

    #[test]
    fn errors_read_like_grpc_go() {
        assert_eq!(
            received(2097162, 1572864).to_string(),
            "grpc: received message larger than max (2097162 vs. 1572864)"
        );
        let mut send = MessageLimit::for_send(1572864);
        let err = send.scan(&prefix(2097162)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "grpc: trying to send message larger than max (2097162 vs. 1572864)"
        );
        assert_eq!((err.len, err.max), (2097162, 1572864));
        assert_eq!(TooLarge::GRPC_CODE, 8);
    }

    #[test]
    fn messages_up_to_the_limit_pass() {
        let mut limit = MessageLimit::new(4);
        let mut stream = frame(false, b"abcd");
        stream.extend(frame(true, b""));
        stream.extend(frame(false, b"x"));
        assert_eq!(limit.scan(&stream), Ok(()));
        assert!(limit.at_message_boundary());
        assert_eq!(limit.max(), 4);
    }

    #[test]
    fn one_byte_over_fails_before_the_payload() {
        let mut limit = MessageLimit::new(4);
        assert_eq!(limit.scan(&frame(false, b"ok")), Ok(()));
        // Only the prefix of the large message has arrived.
        assert_eq!(limit.scan(&prefix(5)), Err(received(5, 4)));
        // Sticky, whatever comes next.
        assert_eq!(limit.scan(b"hello"), Err(received(5, 4)));
        assert_eq!(limit.scan(&[]), Err(received(5, 4)));
        assert!(!limit.at_message_boundary());
    }

    #[test]
    fn a_prefix_split_anywhere_is_reassembled() {
        let over = prefix(0x0102_0304);
        // Cut before its last byte, the prefix is complete only with the second piece.
        for cut in 0..over.len() {
            let mut limit = MessageLimit::new(0x0102_0303);
            assert_eq!(limit.scan(&over[..cut]), Ok(()), "cut at {cut}");
            assert_eq!(
                limit.scan(&over[cut..]),
                Err(received(0x0102_0304, 0x0102_0303)),
                "cut at {cut}"
            );
        }
        let ok = frame(false, b"abc");
        for cut in 0..=ok.len() {
            let mut limit = MessageLimit::new(3);
            assert_eq!(limit.scan(&ok[..cut]), Ok(()));
            assert_eq!(limit.scan(&ok[cut..]), Ok(()));
            assert!(limit.at_message_boundary(), "cut at {cut}");
        }
    }

    #[test]
    fn payload_bytes_are_not_read_as_prefixes() {
        // A payload that looks like a prefix announcing 4 GiB - 1.
        let mut limit = MessageLimit::new(10);
        let payload = prefix(u32::MAX);
        assert_eq!(limit.scan(&frame(false, &payload)), Ok(()));
        // The same bytes where a prefix is due.
        assert_eq!(limit.scan(&payload), Err(received(u32::MAX as usize, 10)));
    }

    #[test]
    fn a_large_payload_is_skipped_across_chunks() {
        let mut limit = MessageLimit::new(1 << 20);
        assert_eq!(limit.scan(&prefix(1 << 20)), Ok(()));
        let piece = vec![0xff; 1 << 16];
        for _ in 0..16 {
            assert!(!limit.at_message_boundary());
            assert_eq!(limit.scan(&piece), Ok(()));
        }
        assert!(limit.at_message_boundary());
        assert_eq!(
            limit.scan(&prefix((1 << 20) + 1)),
            Err(received((1 << 20) + 1, 1 << 20))
        );
    }

    #[test]
    fn limits_of_zero_and_of_everything() {
        let mut zero = MessageLimit::new(0);
        assert_eq!(zero.scan(&frame(false, b"")), Ok(()));
        assert_eq!(zero.scan(&frame(false, b"a")), Err(received(1, 0)));
        let mut all = MessageLimit::new(usize::MAX);
        assert_eq!(all.scan(&prefix(u32::MAX)), Ok(()));
        assert!(!all.at_message_boundary());
    }

    /// The verdict of scanning `stream` cut into pieces at `cuts`: the first error, if any.
    fn scan_in_pieces(max: usize, stream: &[u8], cuts: &[usize]) -> Result<(), TooLarge> {
        let mut limit = MessageLimit::new(max);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.sort_unstable();
        let mut start = 0;
        for cut in cuts.into_iter().chain([stream.len()]) {
            limit.scan(&stream[start..cut])?;
            start = cut;
        }
        Ok(())
    }

    proptest! {
        /// Cutting a stream anywhere gives the verdict of scanning it whole, which is the
        /// model's: the first message whose length is over the limit.
        #[test]
        fn splitting_never_changes_the_verdict(
            messages in prop::collection::vec((any::<bool>(), 0usize..40), 0..12),
            tail in prop::option::of(0u32..u32::MAX),
            max in 0usize..40,
            cuts in prop::collection::vec(any::<usize>(), 0..20),
        ) {
            let mut stream = Vec::new();
            for (compressed, len) in &messages {
                stream.extend(frame(*compressed, &vec![0xa5; *len]));
            }
            // Possibly a last prefix whose payload never comes.
            if let Some(len) = tail {
                stream.extend(prefix(len));
            }
            let model = messages
                .iter()
                .map(|(_, len)| *len)
                .chain(tail.map(|l| l as usize))
                .find(|len| *len > max)
                .map_or(Ok(()), |len| Err(received(len, max)));
            let mut whole = MessageLimit::new(max);
            prop_assert_eq!(whole.scan(&stream), model);
            prop_assert_eq!(scan_in_pieces(max, &stream, &cuts), model);
            if model.is_ok() {
                prop_assert_eq!(whole.at_message_boundary(), tail.is_none() || tail == Some(0));
            }
        }

        /// Fed byte by byte, the error comes with the last byte of the offending prefix.
        #[test]
        fn fails_at_the_last_prefix_byte(
            before in prop::collection::vec(0usize..20, 0..6),
            over in 21u32..1000,
        ) {
            let mut stream = Vec::new();
            for len in &before {
                stream.extend(frame(false, &vec![1; *len]));
            }
            let last_prefix_byte = stream.len() + 4;
            stream.extend(frame(false, &vec![2; over as usize]));
            let mut limit = MessageLimit::new(20);
            let failed_at = stream
                .iter()
                .position(|b| limit.scan(std::slice::from_ref(b)).is_err());
            prop_assert_eq!(failed_at, Some(last_prefix_byte));
        }
    }
}

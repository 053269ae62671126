//! The proxy's own HTTP/2, on both sides: the server its clients' connections get
//! ([`server`]) and the client of its connections to etcd members ([`client`]). Only what gRPC
//! needs (RFC 9113 without push, priorities or extended CONNECT), one task per connection.
//!
//! Why not the `h2` crate: relaying a small call through `h2` on both sides cost about half the
//! proxy's CPU per call (HPACK encoding with its dynamic table, a general stream store, frame
//! queues per stream; docs/benchmarks.md). Here a connection is:
//! - one task that reads frames and decodes header blocks ([`hpack`]) with [`Core`], hands
//!   each block to its [`Role`], and writes one output buffer;
//! - a state shared with the calls ([`Shared`]): the streams, the output buffer and the
//!   flow-control windows, under one mutex that nothing contends for on one thread;
//! - for each stream, a body read from it ([`StreamBody`]: a client's request, a member's
//!   response) and a body written into it ([`send_body`]) as the peer's windows allow.
//!
//! So a call's whole exchange costs no allocation but its header maps, and the frames of a
//! burst of calls leave in one write.

pub(crate) mod client;
pub(crate) mod frame;
mod hpack;
mod server;

pub(crate) use server::{Settings, serve};

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::HeaderMap;
use tokio::io::{AsyncRead, AsyncWrite};

use frame::Head;
use hpack::Field;

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Flow-control window of each stream this side receives on: a large request or response
/// arrives without waiting for window updates.
const STREAM_WINDOW: u32 = 1 << 20;
/// Flow-control window of a whole connection.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Largest header block a peer may send (a gRPC call's is well under 1 KiB, with a token).
const MAX_HEADER_LIST: usize = 16 << 10;
/// The HPACK table size peers may use (HTTP/2's default: no other is announced).
const HEADER_TABLE_SIZE: usize = 4096;
/// Output buffered for the socket past which a body waits for it to drain (the peer's windows
/// bound it too; this bounds a connection with large windows and a slow reader).
const OUTPUT_LIMIT: usize = 1 << 20;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 32 << 10;
/// The payload of this side's keep-alive pings.
const PING_PAYLOAD: [u8; 8] = *b"etcdprxy";

/// Why a connection ended with an error: the HTTP/2 error code sent in the GOAWAY, and why.
#[derive(Debug)]
struct ConnError {
    code: u32,
    reason: String,
}

impl ConnError {
    fn protocol(reason: impl Into<String>) -> ConnError {
        ConnError {
            code: frame::PROTOCOL_ERROR,
            reason: reason.into(),
        }
    }

    fn frame_size(reason: impl Into<String>) -> ConnError {
        ConnError {
            code: frame::FRAME_SIZE_ERROR,
            reason: reason.into(),
        }
    }
}

/// What differs between the server and the client: header blocks, pongs and GOAWAY.
trait Role {
    /// A whole header block on stream `id` (HEADERS and its CONTINUATIONs), decoded.
    fn on_headers(
        &mut self,
        shared: &Arc<Shared>,
        id: u32,
        flags: u8,
        fields: &mut Vec<Field>,
    ) -> Result<(), ConnError>;
    /// The peer pinged (its ping is answered): an error ends the connection.
    fn on_ping(&mut self, shared: &Shared) -> Result<(), ConnError>;
    /// The peer answered this side's keep-alive ping.
    fn on_pong(&mut self);
    /// The peer sent GOAWAY: it takes (server) or opens (client) no stream after `last`.
    fn on_goaway(&mut self, shared: &Shared, last: u32);
}

/// A connection's socket and the frame handling both roles share.
struct Core<I> {
    io: I,
    shared: Arc<Shared>,
    read: BytesMut,
    /// Taken from [`Inner::out`] and being written.
    write: BytesMut,
    /// The client preface is still to be read (server side).
    expect_preface: bool,
    eof: bool,
    decoder: hpack::Decoder,
    /// The fields of the header block being handled, reused from block to block.
    fields: Vec<Field>,
    /// A header block still waiting for its CONTINUATION frames: stream, flags, block so far.
    continuation: Option<(u32, u8, BytesMut)>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Core<I> {
    fn new(io: I, shared: Arc<Shared>, expect_preface: bool) -> Core<I> {
        Core {
            io,
            shared,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::new(),
            expect_preface,
            eof: false,
            decoder: hpack::Decoder::new(HEADER_TABLE_SIZE),
            fields: Vec::new(),
            continuation: None,
        }
    }

    /// Reads what the socket has and handles its frames; true if anything was read.
    fn poll_read<R: Role>(
        &mut self,
        role: &mut R,
        cx: &mut Context<'_>,
    ) -> Result<bool, ConnError> {
        let mut moved = false;
        while !self.eof {
            if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
                self.read.reserve(READ_CHUNK);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read) {
                Poll::Ready(Ok(0)) => {
                    self.eof = true;
                    moved = true;
                }
                Poll::Ready(Ok(_)) => {
                    moved = true;
                    self.parse(role)?;
                }
                Poll::Ready(Err(e)) => {
                    return Err(ConnError {
                        code: frame::INTERNAL_ERROR,
                        reason: e.to_string(),
                    });
                }
                Poll::Pending => break,
            }
        }
        Ok(moved)
    }

    /// Handles every whole frame in the read buffer.
    fn parse<R: Role>(&mut self, role: &mut R) -> Result<(), ConnError> {
        if self.expect_preface {
            if self.read.len() < PREFACE.len() {
                return Ok(());
            }
            if &self.read[..PREFACE.len()] != PREFACE {
                return Err(ConnError::protocol("invalid HTTP/2 connection preface"));
            }
            self.read.advance(PREFACE.len());
            self.expect_preface = false;
        }
        while self.read.len() >= frame::HEADER_LEN {
            let head = Head::parse(&self.read);
            if head.len > frame::DEFAULT_MAX_FRAME_SIZE {
                return Err(ConnError::frame_size(format!(
                    "frame of {} bytes is over the maximum",
                    head.len
                )));
            }
            let whole = frame::HEADER_LEN + head.len;
            if self.read.len() < whole {
                self.read.reserve(whole - self.read.len());
                break;
            }
            self.read.advance(frame::HEADER_LEN);
            let payload = self.read.split_to(head.len);
            self.on_frame(role, head, payload)?;
        }
        Ok(())
    }

    fn on_frame<R: Role>(
        &mut self,
        role: &mut R,
        head: Head,
        mut payload: BytesMut,
    ) -> Result<(), ConnError> {
        if let Some((stream, _, _)) = &self.continuation
            && (head.kind != frame::CONTINUATION || head.stream != *stream)
        {
            return Err(ConnError::protocol("expected CONTINUATION"));
        }
        match head.kind {
            frame::DATA => self.on_data(head, payload),
            frame::HEADERS => {
                // Only clients open streams (odd ids): push is never enabled.
                if head.stream.is_multiple_of(2) {
                    return Err(ConnError::protocol("HEADERS on an even stream"));
                }
                strip_padding(&head, &mut payload)?;
                if head.has(frame::PRIORITY_FLAG) {
                    if payload.len() < 5 {
                        return Err(ConnError::protocol("HEADERS priority too short"));
                    }
                    payload.advance(5);
                }
                if head.has(frame::END_HEADERS) {
                    self.on_header_block(role, head.stream, head.flags, payload.freeze())
                } else {
                    self.continuation = Some((head.stream, head.flags, payload));
                    Ok(())
                }
            }
            frame::CONTINUATION => {
                let Some((stream, flags, mut block)) = self.continuation.take() else {
                    return Err(ConnError::protocol("unexpected CONTINUATION"));
                };
                block.extend_from_slice(&payload);
                if block.len() > MAX_HEADER_LIST * 2 {
                    return Err(ConnError::protocol("header block too large"));
                }
                if head.has(frame::END_HEADERS) {
                    self.on_header_block(role, stream, flags, block.freeze())
                } else {
                    self.continuation = Some((stream, flags, block));
                    Ok(())
                }
            }
            frame::RST_STREAM => {
                if payload.len() != 4 || head.stream == 0 {
                    return Err(ConnError::protocol("invalid RST_STREAM"));
                }
                let code = payload.get_u32();
                let mut inner = self.shared.lock();
                if let Some(stream) = inner.streams.get_mut(&head.stream) {
                    stream.reset = Some(StreamError::Reset(code));
                    stream.wake();
                }
                Ok(())
            }
            frame::SETTINGS => self.on_settings(head, &payload),
            frame::PING => {
                if payload.len() != 8 || head.stream != 0 {
                    return Err(ConnError::frame_size("invalid PING"));
                }
                let mut data = [0; 8];
                data.copy_from_slice(&payload);
                if head.has(frame::ACK) {
                    if data == PING_PAYLOAD {
                        role.on_pong();
                    }
                } else {
                    frame::put_ping(&mut self.shared.lock().out, frame::ACK, data);
                    role.on_ping(&self.shared)?;
                }
                Ok(())
            }
            frame::GOAWAY => {
                if payload.len() < 8 {
                    return Err(ConnError::frame_size("invalid GOAWAY"));
                }
                let last = payload.get_u32() & 0x7fff_ffff;
                role.on_goaway(&self.shared, last);
                Ok(())
            }
            frame::WINDOW_UPDATE => {
                if payload.len() != 4 {
                    return Err(ConnError::frame_size("invalid WINDOW_UPDATE"));
                }
                let increment = i64::from(payload.get_u32() & 0x7fff_ffff);
                let mut inner = self.shared.lock();
                if head.stream == 0 {
                    inner.send_window += increment;
                    if inner.send_window > frame::MAX_WINDOW {
                        return Err(ConnError {
                            code: frame::FLOW_CONTROL_ERROR,
                            reason: "connection window over 2^31-1".into(),
                        });
                    }
                    for waker in inner.window_waiters.drain(..) {
                        waker.wake();
                    }
                } else if let Some(stream) = inner.streams.get_mut(&head.stream) {
                    stream.send_window += increment;
                    if let Some(waker) = stream.send_task.take() {
                        waker.wake();
                    }
                }
                Ok(())
            }
            frame::PUSH_PROMISE => Err(ConnError::protocol("push is not enabled")),
            // PRIORITY is advisory, and unknown frame types are to be ignored.
            _ => Ok(()),
        }
    }

    fn on_header_block<R: Role>(
        &mut self,
        role: &mut R,
        id: u32,
        flags: u8,
        block: Bytes,
    ) -> Result<(), ConnError> {
        self.fields.clear();
        let fields = &mut self.fields;
        self.decoder
            .decode(&block, |field| fields.push(field))
            .map_err(|e| ConnError {
                code: frame::COMPRESSION_ERROR,
                reason: format!("HPACK: {e}"),
            })?;
        role.on_headers(&self.shared, id, flags, &mut self.fields)
    }

    fn on_data(&mut self, head: Head, mut payload: BytesMut) -> Result<(), ConnError> {
        if head.stream == 0 {
            return Err(ConnError::protocol("DATA on stream 0"));
        }
        let flow_len = head.len;
        strip_padding(&head, &mut payload)?;
        let padding = flow_len - payload.len();
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        // The connection's window is given back as data arrives (as grpc-go does): what waits
        // unread is bounded by each stream's window, and a few streams nobody reads cannot
        // stall every other stream of the connection.
        inner.credit_connection(flow_len);
        match inner.streams.get_mut(&head.stream) {
            Some(stream) if !stream.recv_closed && stream.reset.is_none() && !stream.dropped => {
                if stream.recv_buffered + payload.len() > 2 * STREAM_WINDOW as usize {
                    // Past the window this side gave: the peer ignores flow control.
                    stream.reset = Some(StreamError::Reset(frame::FLOW_CONTROL_ERROR));
                    stream.wake();
                    frame::put_rst_stream(&mut inner.out, head.stream, frame::FLOW_CONTROL_ERROR);
                } else {
                    let len = payload.len();
                    if len > 0 {
                        stream.recv_buffered += len;
                        stream.recv.push_back(payload.freeze());
                    }
                    if head.has(frame::END_STREAM) {
                        stream.recv_closed = true;
                    }
                    if let Some(waker) = stream.recv_task.take() {
                        waker.wake();
                    }
                    // Padding is never read: back to the stream's window at once.
                    inner.credit_stream(head.stream, padding);
                }
            }
            // A stream closed or unknown: nothing to read.
            _ => {}
        }
        Ok(())
    }

    fn on_settings(&mut self, head: Head, payload: &[u8]) -> Result<(), ConnError> {
        if head.stream != 0 || !payload.len().is_multiple_of(6) {
            return Err(ConnError::frame_size("invalid SETTINGS"));
        }
        if head.has(frame::ACK) {
            return Ok(());
        }
        let mut inner = self.shared.lock();
        for setting in payload.chunks(6) {
            let id = u16::from_be_bytes([setting[0], setting[1]]);
            let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
            match id {
                frame::SETTINGS_INITIAL_WINDOW_SIZE => {
                    let value = i64::from(value);
                    if value > frame::MAX_WINDOW {
                        return Err(ConnError {
                            code: frame::FLOW_CONTROL_ERROR,
                            reason: "initial window over 2^31-1".into(),
                        });
                    }
                    let delta = value - inner.initial_send_window;
                    inner.initial_send_window = value;
                    for stream in inner.streams.values_mut() {
                        stream.send_window += delta;
                        if let Some(waker) = stream.send_task.take() {
                            waker.wake();
                        }
                    }
                }
                frame::SETTINGS_MAX_FRAME_SIZE => {
                    if !(frame::DEFAULT_MAX_FRAME_SIZE..=(1 << 24) - 1).contains(&(value as usize))
                    {
                        return Err(ConnError::protocol("invalid SETTINGS_MAX_FRAME_SIZE"));
                    }
                    inner.max_frame = value as usize;
                }
                frame::SETTINGS_MAX_CONCURRENT_STREAMS => {
                    inner.peer_max_streams = value as usize;
                    for waker in inner.stream_waiters.drain(..) {
                        waker.wake();
                    }
                }
                // Header blocks are written without the dynamic table (frame.rs), so the
                // peer's table size does not matter; the rest concerns push, never used.
                _ => {}
            }
        }
        frame::put_head(&mut inner.out, 0, frame::SETTINGS, frame::ACK, 0);
        Ok(())
    }

    /// Writes what the streams and the frame handlers wrote, then flushes (TLS buffers).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.write.is_empty() {
                let mut inner = self.shared.lock();
                if inner.out.is_empty() {
                    break;
                }
                std::mem::swap(&mut self.write, &mut inner.out);
                for waker in inner.out_waiters.drain(..) {
                    waker.wake();
                }
            }
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.write))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n == self.write.len() {
                self.write.clear();
            } else {
                self.write.advance(n);
            }
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Whether output is waiting that the socket could take now.
    fn has_output(&self, inner: &Inner) -> bool {
        !inner.out.is_empty() && self.write.is_empty()
    }

    /// Ends the connection for a protocol error: GOAWAY with its code, written if the socket
    /// takes it at once.
    fn fail(&mut self, cx: &mut Context<'_>, last_stream: u32, e: ConnError) -> String {
        {
            let mut inner = self.shared.lock();
            frame::put_goaway(&mut inner.out, last_stream, e.code, e.reason.as_bytes());
        }
        let _ = self.poll_write(cx);
        e.reason
    }
}

/// Removes a HEADERS or DATA frame's padding.
fn strip_padding(head: &Head, payload: &mut BytesMut) -> Result<(), ConnError> {
    if !head.has(frame::PADDED) {
        return Ok(());
    }
    if payload.is_empty() {
        return Err(ConnError::protocol("padded frame without its pad length"));
    }
    let pad = usize::from(payload[0]);
    payload.advance(1);
    if pad > payload.len() {
        return Err(ConnError::protocol("padding longer than the frame"));
    }
    payload.truncate(payload.len() - pad);
    Ok(())
}

/// Writes a body into stream `id` (its headers already sent): its data as the peer's windows
/// allow, then its trailers or the end of the stream. Ends early, dropping the body, when the
/// peer resets the stream; a body that fails resets it.
async fn send_body<B>(shared: &Shared, id: u32, mut body: B)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut pending: Option<(Bytes, bool)> = None;
    poll_fn(|cx| {
        loop {
            if let Some((data, eos)) = &mut pending {
                let mut inner = shared.lock();
                let inner = &mut *inner;
                let Some(stream) = inner.streams.get_mut(&id) else {
                    return Poll::Ready(());
                };
                if stream.reset.is_some() {
                    return Poll::Ready(());
                }
                if inner.out.len() >= OUTPUT_LIMIT {
                    inner.out_waiters.push(cx.waker().clone());
                    return Poll::Pending;
                }
                let window = stream.send_window.min(inner.send_window).max(0) as usize;
                if window == 0 && !data.is_empty() {
                    stream.send_task = Some(cx.waker().clone());
                    if inner.send_window <= 0 {
                        inner.window_waiters.push(cx.waker().clone());
                    }
                    return Poll::Pending;
                }
                let n = window.min(data.len());
                let chunk = data.split_to(n);
                let end = data.is_empty() && *eos;
                frame::put_data(&mut inner.out, id, &chunk, end, inner.max_frame);
                stream.send_window -= n as i64;
                inner.send_window -= n as i64;
                inner.sent_frames = true;
                if end {
                    stream.send_closed = true;
                }
                inner.notify();
                if data.is_empty() {
                    pending = None;
                    if end {
                        return Poll::Ready(());
                    }
                }
                continue;
            }
            let frame = match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => frame,
                // Waiting for the body (a watch waiting for events): a reset by the peer ends
                // it here, dropping the body.
                Poll::Pending => return shared.lock().poll_reset(id, cx),
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = body.is_end_stream();
                        if !data.is_empty() || eos {
                            pending = Some((data, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            shared.lock().finish(id, |out, max_frame| {
                                frame::put_headers(out, id, |_| {}, &trailers, true, max_frame)
                            });
                            return Poll::Ready(());
                        }
                    }
                },
                None => {
                    shared.lock().finish(id, |out, max_frame| {
                        frame::put_data(out, id, &[], true, max_frame)
                    });
                    return Poll::Ready(());
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "body failed while being sent; resetting the stream");
                    shared.lock().reset(id, frame::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
            }
        }
    })
    .await;
}

/// What a connection's task and its streams share.
#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A task that panicked cannot leave the state half-changed in a way that matters more
        // than losing the connection would.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Inner {
    streams: HashMap<u32, Stream, BuildHasherDefault<StreamIdHasher>>,
    /// Frames to write, in order.
    out: BytesMut,
    /// The connection's task is running and writes `out` before it sleeps.
    polling: bool,
    conn_task: Option<Waker>,
    /// Bodies waiting for `out` to drain below [`OUTPUT_LIMIT`].
    out_waiters: Vec<Waker>,
    /// Bodies waiting for the connection's send window.
    window_waiters: Vec<Waker>,
    /// The connection's send window, and the one each new stream starts with (the peer's
    /// SETTINGS_INITIAL_WINDOW_SIZE).
    send_window: i64,
    initial_send_window: i64,
    /// The peer's SETTINGS_MAX_FRAME_SIZE.
    max_frame: usize,
    /// The peer's SETTINGS_MAX_CONCURRENT_STREAMS (client side: streams this side may open).
    peer_max_streams: usize,
    /// Calls waiting for a stream under `peer_max_streams` (client side).
    stream_waiters: Vec<Waker>,
    /// The next stream this side opens (client side).
    next_stream: u32,
    /// Bytes the peer sent on the connection and not yet given back.
    recv_unacked: usize,
    /// No new stream is opened: the peer sent GOAWAY (client side).
    going_away: bool,
    /// Response headers or data were written since the peer's last ping (server side: a
    /// client pinging a connection that is sending is within the keep-alive policy).
    sent_frames: bool,
    /// The connection is over, and why.
    closed: Option<Arc<str>>,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            streams: HashMap::default(),
            out: BytesMut::with_capacity(READ_CHUNK),
            polling: false,
            conn_task: None,
            out_waiters: Vec::new(),
            window_waiters: Vec::new(),
            send_window: 65_535,
            initial_send_window: 65_535,
            max_frame: frame::DEFAULT_MAX_FRAME_SIZE,
            peer_max_streams: usize::MAX,
            stream_waiters: Vec::new(),
            next_stream: 1,
            recv_unacked: 0,
            going_away: false,
            sent_frames: false,
            closed: None,
        }
    }
}

impl Inner {
    fn start_polling(&mut self, waker: &Waker) {
        self.polling = true;
        match &self.conn_task {
            Some(w) if w.will_wake(waker) => {}
            _ => self.conn_task = Some(waker.clone()),
        }
    }

    /// Something was written to `out`: the connection's task must write it.
    fn notify(&mut self) {
        if !self.polling {
            self.polling = true;
            if let Some(waker) = &self.conn_task {
                waker.wake_by_ref();
            }
        }
    }

    /// `n` bytes arrived on the connection: given back in a WINDOW_UPDATE once half the
    /// connection's window has.
    fn credit_connection(&mut self, n: usize) {
        self.recv_unacked += n;
        if self.recv_unacked >= CONNECTION_WINDOW as usize / 2 {
            frame::put_window_update(&mut self.out, 0, self.recv_unacked as u32);
            self.recv_unacked = 0;
            self.notify();
        }
    }

    /// `n` bytes the peer sent on `stream` were read: given back in a WINDOW_UPDATE once half
    /// the stream's window has (none once the peer ended or reset the stream).
    fn credit_stream(&mut self, stream: u32, n: usize) {
        if n == 0 {
            return;
        }
        if let Some(s) = self.streams.get_mut(&stream) {
            s.recv_unacked += n;
            if !s.recv_closed && s.reset.is_none() && s.recv_unacked >= STREAM_WINDOW as usize / 2 {
                frame::put_window_update(&mut self.out, stream, s.recv_unacked as u32);
                s.recv_unacked = 0;
                self.notify();
            }
        }
    }

    /// Ready if the peer reset the stream (or it is gone); else wakes the caller when it is.
    fn poll_reset(&mut self, id: u32, cx: &Context<'_>) -> Poll<()> {
        match self.streams.get_mut(&id) {
            Some(stream) if stream.reset.is_none() => {
                register(&mut stream.send_task, cx);
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }

    /// Writes the last frame of a stream's body (`put(out, max_frame)`), unless it is gone.
    fn finish(&mut self, id: u32, put: impl FnOnce(&mut BytesMut, usize)) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.reset.is_some() {
            return;
        }
        stream.send_closed = true;
        put(&mut self.out, self.max_frame);
        self.notify();
    }

    /// The error of a stream that is gone: the connection's end, or the stream's.
    fn gone(&self) -> StreamError {
        let why = self.closed.clone();
        StreamError::Closed(why.unwrap_or_else(|| Arc::from("stream closed")))
    }

    /// Resets stream `id` from this side: the peer is told, and its reader sees the error.
    fn reset(&mut self, id: u32, code: u32) {
        let Some(stream) = self.streams.get_mut(&id) else {
            return;
        };
        if stream.reset.is_some() {
            return;
        }
        stream.reset = Some(StreamError::Reset(code));
        stream.send_closed = true;
        stream.wake();
        frame::put_rst_stream(&mut self.out, id, code);
        self.notify();
    }

    /// The connection is over: every stream sees it, and every waiting task wakes.
    fn close(&mut self, why: &str) {
        let why: Arc<str> = Arc::from(why);
        self.closed = Some(why.clone());
        for stream in self.streams.values_mut() {
            stream
                .reset
                .get_or_insert_with(|| StreamError::Closed(why.clone()));
            stream.wake();
        }
        for waker in self
            .out_waiters
            .drain(..)
            .chain(self.window_waiters.drain(..))
            .chain(self.stream_waiters.drain(..))
        {
            waker.wake();
        }
    }

    /// Removes stream `id` once nothing uses it: a stream whose body was not all sent is reset
    /// (CANCEL); a peer still sending is reset with `peer_open` (a server: NO_ERROR, "stop
    /// sending", RFC 9113 section 8.1; a client: CANCEL, "not wanted").
    fn remove(&mut self, id: u32, peer_open: u32) {
        let Some(stream) = self.streams.remove(&id) else {
            return;
        };
        if stream.reset.is_none() && self.closed.is_none() {
            if !stream.send_closed {
                frame::put_rst_stream(&mut self.out, id, frame::CANCEL);
            } else if !stream.recv_closed {
                frame::put_rst_stream(&mut self.out, id, peer_open);
            }
        }
        if let Some(waker) = stream.recv_task {
            waker.wake();
        }
        for waker in self.stream_waiters.drain(..) {
            waker.wake();
        }
        self.notify();
    }
}

/// Makes `cx`'s task the one `slot` wakes (without a clone if it already is).
fn register(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// One stream.
#[derive(Default)]
struct Stream {
    /// DATA not yet read.
    recv: VecDeque<Bytes>,
    recv_buffered: usize,
    /// The peer ended its side (END_STREAM).
    recv_closed: bool,
    /// The body reading this stream was dropped: what else arrives is discarded.
    dropped: bool,
    /// The task reading the stream (its body, or a response's head).
    recv_task: Option<Waker>,
    recv_unacked: usize,
    /// A response's head (client side), until taken.
    head: Option<hyper::http::response::Parts>,
    head_received: bool,
    /// The trailers that ended the stream, until read (client side).
    trailers: Option<HeaderMap>,
    send_window: i64,
    /// This side's body ended (END_STREAM or RST_STREAM sent).
    send_closed: bool,
    /// The task writing the stream: waits for window or a reset.
    send_task: Option<Waker>,
    /// The peer reset the stream, or the connection ended.
    reset: Option<StreamError>,
    /// Holders on the client side (the request's body writer, the response's reader): the
    /// stream is removed when the last is done.
    refs: u8,
}

impl Stream {
    fn wake(&mut self) {
        if let Some(waker) = self.recv_task.take() {
            waker.wake();
        }
        if let Some(waker) = self.send_task.take() {
            waker.wake();
        }
    }
}

/// Stream ids are odd (client) numbers in increasing order: spread, they need no hashing.
#[derive(Default)]
struct StreamIdHasher(u64);

impl Hasher for StreamIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Why a stream could not be read or written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    #[error("stream reset by the peer (HTTP/2 error code {0})")]
    Reset(u32),
    #[error("connection closed: {0}")]
    Closed(Arc<str>),
}

/// The body of a stream as this side receives it (a client's request, a member's response):
/// its DATA, then its trailers. Read bytes are given back to the peer's flow-control windows.
pub struct StreamBody {
    shared: Arc<Shared>,
    id: u32,
    done: bool,
    /// Holds one of the stream's references (client side).
    holds_ref: bool,
}

impl std::fmt::Debug for StreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamBody")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish()
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let mut inner = this.shared.lock();
        let inner = &mut *inner;
        let Some(stream) = inner.streams.get_mut(&this.id) else {
            this.done = true;
            return Poll::Ready(Some(Err(inner.gone())));
        };
        if let Some(data) = stream.recv.pop_front() {
            stream.recv_buffered -= data.len();
            inner.credit_stream(this.id, data.len());
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        // Whole before a reset: a peer that answered before reading all of a request ends
        // the stream with RST_STREAM NO_ERROR, which leaves the answer intact (RFC 9113, 8.1).
        if stream.recv_closed {
            this.done = true;
            return Poll::Ready(stream.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        if let Some(e) = &stream.reset {
            this.done = true;
            return Poll::Ready(Some(Err(e.clone())));
        }
        register(&mut stream.recv_task, cx);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        let inner = self.shared.lock();
        inner
            .streams
            .get(&self.id)
            .is_some_and(|s| s.recv_closed && s.recv.is_empty() && s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        if self.done && !self.holds_ref {
            return;
        }
        let mut inner = self.shared.lock();
        let inner = &mut *inner;
        if !self.done
            && let Some(stream) = inner.streams.get_mut(&self.id)
        {
            stream.dropped = true;
            stream.recv_buffered = 0;
            stream.recv.clear();
        }
        if self.holds_ref {
            client::release_ref(inner, self.id);
        }
    }
}

/// HTTP/2 keep-alive pings: one per interval, sent when the calls seen since the last one
/// say so (see [`Pings::new`]), dropped when one goes unanswered for the timeout.
struct Pings {
    interval: Option<Duration>,
    timeout: Duration,
    /// Ping after an interval in which calls were made / none was.
    when_active: bool,
    when_idle: bool,
    /// Fires when the next ping is due, or (while one is out) when it times out. One timer for
    /// the connection's life, moved rather than made anew.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A ping is out, its answer not yet in.
    waiting: bool,
    /// The call count when the timer last fired: counted rather than timed, so a call costs no
    /// clock read.
    calls_seen: u64,
}

impl Pings {
    fn new(
        interval: Option<Duration>,
        timeout: Duration,
        when_active: bool,
        when_idle: bool,
    ) -> Pings {
        Pings {
            interval,
            timeout,
            when_active,
            when_idle,
            timer: interval
                .map(|i| Box::pin(tokio::time::sleep_until(tokio::time::Instant::now() + i))),
            waiting: false,
            calls_seen: 0,
        }
    }

    /// The peer answered the ping.
    fn pong(&mut self) {
        if let (true, Some(interval), Some(timer)) =
            (self.waiting, self.interval, self.timer.as_mut())
        {
            self.waiting = false;
            timer.as_mut().reset(tokio::time::Instant::now() + interval);
        }
    }

    /// Sends pings as they are due (`calls`: the calls so far); ready when one went unanswered
    /// for the timeout. Never ready without keep-alive.
    fn poll_tick(&mut self, cx: &mut Context<'_>, shared: &Shared, calls: u64) -> Poll<()> {
        let (Some(interval), Some(timer)) = (self.interval, self.timer.as_mut()) else {
            return Poll::Pending;
        };
        loop {
            ready!(timer.as_mut().poll(cx));
            if self.waiting {
                return Poll::Ready(());
            }
            let now = tokio::time::Instant::now();
            let active = calls != self.calls_seen;
            self.calls_seen = calls;
            if (active && !self.when_active) || (!active && !self.when_idle) {
                timer.as_mut().reset(now + interval);
                continue;
            }
            let mut inner = shared.lock();
            frame::put_ping(&mut inner.out, 0, PING_PAYLOAD);
            inner.notify();
            drop(inner);
            self.waiting = true;
            timer.as_mut().reset(now + self.timeout);
        }
    }
}

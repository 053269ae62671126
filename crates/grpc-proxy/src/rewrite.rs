//! The handler for calls whose messages must change on the way (today: the keyed methods under
//! `--namespace`). It forwards a call like [`crate::forward`] does, headers and trailers
//! unchanged, but takes both message streams apart: gRPC framing (1-byte compressed flag, 4-byte
//! big-endian length, message; a message may span DATA frames and a frame may hold several),
//! prost decoding, the [`Namespace`] rewrite, re-encoding and re-framing. Unary and streaming
//! calls (Watch, Observe) go through the same code, one message at a time.
//!
//! Bounds: a message larger than [`Limits`] is refused with `RESOURCE_EXHAUSTED` as soon as its
//! length is read, so at most one message (plus one DATA frame) per direction is buffered.
//! Compression is not negotiated (`grpc-accept-encoding` is not passed to etcd), so a compressed
//! message is refused with `UNIMPLEMENTED`. prost drops unknown fields: that only affects these
//! methods, and only while a namespace is set.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use etcd_api::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, LeaseTimeToLiveResponse, PutRequest, PutResponse,
    RangeRequest, RangeResponse, TxnRequest, TxnResponse, WatchRequest, WatchResponse,
};
use etcd_api::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderRequest, LeaderResponse, ProclaimRequest,
    ResignRequest,
};
use etcd_api::v3lockpb::{LockRequest, LockResponse, UnlockRequest};
use hyper::body::{Body, Frame, SizeHint};
use hyper::header::{CONTENT_LENGTH, HeaderName};
use hyper::{Request, Response};
use prost::Message;
use tokio::sync::oneshot;

use crate::body::ClientBody;
use crate::forward::{ResponseBody, status_headers, status_response};
use crate::limits::{Direction as LimitSide, MessageLimit, TooLarge};
use crate::namespace::{Namespace, OutsideNamespace, Refusal};
use crate::upstream::Upstream;

/// gRPC status codes the rewrite answers with.
const INVALID_ARGUMENT: u16 = 3;
const RESOURCE_EXHAUSTED: u16 = 8;
const UNIMPLEMENTED: u16 = 12;
const INTERNAL: u16 = 13;
const UNAVAILABLE: u16 = 14;

/// Bytes of the gRPC message prefix: compressed flag and length.
const PREFIX: usize = 5;

/// The client's list of compressions it accepts; not passed on, so etcd never compresses.
pub(crate) const GRPC_ACCEPT_ENCODING: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// Message size limits, on every path (forwarded as bytes, rewritten, resumed streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request message from a client: gRPC's default server limit (4 MiB), which is
    /// also what etcd's proxy accepts.
    pub request: usize,
    /// Largest response message from etcd that the proxy decodes (namespace, resumed
    /// streams). clientv3 accepts up to 2 GiB and a range response can be large, so this is
    /// higher than gRPC's 4 MiB, but bounded: a message must fit in memory whole to be decoded.
    pub response: usize,
    /// `--max-send-bytes`: largest request message sent to etcd (etcd's proxy's client-side
    /// `MaxCallSendMsgSize`, 1.5 MiB by default, like etcd's own `--max-request-bytes`).
    pub send: usize,
    /// `--max-recv-bytes`: largest response message taken from etcd (`MaxCallRecvMsgSize`).
    pub recv: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            request: 4 << 20,
            response: 64 << 20,
            send: 1_572_864,
            recv: i32::MAX as usize,
        }
    }
}

impl Limits {
    /// A scanner of client messages forwarded as bytes: stops any over the server limit or
    /// the send limit ([`Limits::request_refusal`] says which).
    pub fn request_scanner(&self) -> MessageLimit {
        MessageLimit::new(self.request.min(self.send))
    }

    /// The status for a client message of `len` bytes that the scanner stopped: over gRPC's
    /// server limit it was never received; otherwise it could not be sent on (grpc-go's texts).
    pub fn request_refusal(&self, len: usize) -> Status {
        let (max, direction) = if len > self.request {
            (self.request, LimitSide::Receive)
        } else {
            (self.send, LimitSide::Send)
        };
        TooLarge {
            len,
            max,
            direction,
        }
        .into()
    }

    /// Checks a request message (already decoded, possibly rewritten) against the send limit.
    pub fn check_send(&self, len: usize) -> Result<(), Status> {
        if len > self.send {
            return Err(TooLarge {
                len,
                max: self.send,
                direction: LimitSide::Send,
            }
            .into());
        }
        Ok(())
    }

    /// The largest response message the proxy decodes.
    pub fn decoded_response(&self) -> usize {
        self.response.min(self.recv)
    }
}

impl From<TooLarge> for Status {
    fn from(e: TooLarge) -> Status {
        Status::new(TooLarge::GRPC_CODE, e.to_string())
    }
}

/// A gRPC status made by the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// gRPC code.
    pub code: u16,
    /// `grpc-message`.
    pub message: String,
}

impl Status {
    pub(crate) fn new(code: u16, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
}

impl From<Refusal> for Status {
    fn from(r: Refusal) -> Status {
        Status::new(INVALID_ARGUMENT, r.to_string())
    }
}

impl From<OutsideNamespace> for Status {
    fn from(e: OutsideNamespace) -> Status {
        tracing::error!("etcd returned a key outside the namespace; refusing the response");
        Status::new(INTERNAL, e.to_string())
    }
}

/// Why a gRPC message stream cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The compressed flag is set; no compression was negotiated.
    #[error("grpc: compressed messages are not supported by the proxy")]
    Compressed,
    /// A flag other than 0 or 1.
    #[error("grpc: invalid message flag {0}")]
    BadFlag(u8),
    /// The announced length is over the limit.
    #[error("grpc: received message larger than max ({len} vs. {max})")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The stream ended inside a message.
    #[error("grpc: stream ended in the middle of a message")]
    Truncated,
}

impl From<FrameError> for Status {
    fn from(e: FrameError) -> Status {
        let code = match e {
            FrameError::Compressed => UNIMPLEMENTED,
            FrameError::TooLarge { .. } => RESOURCE_EXHAUSTED,
            FrameError::BadFlag(_) | FrameError::Truncated => INTERNAL,
        };
        Status::new(code, e.to_string())
    }
}

/// Splits a byte stream into gRPC messages.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    max: usize,
}

impl Decoder {
    /// A decoder refusing messages longer than `max` bytes.
    pub fn new(max: usize) -> Decoder {
        Decoder {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, `None` until one is complete. The flag and length are checked
    /// as soon as they arrive, before the message is buffered.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < PREFIX {
            return Ok(None);
        }
        match self.buf[0] {
            0 => {}
            1 => return Err(FrameError::Compressed),
            flag => return Err(FrameError::BadFlag(flag)),
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < PREFIX + len {
            // No reserve for the announced length: memory follows the bytes that really arrive,
            // so a client announcing 4 MiB and sending a trickle holds a trickle.
            return Ok(None);
        }
        self.buf.advance(PREFIX);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// Checks that the stream did not end inside a message.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated)
        }
    }
}

/// Appends `payload` framed as an uncompressed gRPC message.
pub fn encode_frame(payload: &[u8], out: &mut BytesMut) {
    out.reserve(PREFIX + payload.len());
    out.put_u8(0);
    // Messages are bounded by `Limits` far below 4 GiB; a rewrite adds a prefix per key.
    out.put_u32(u32::try_from(payload.len()).unwrap_or(u32::MAX));
    out.put_slice(payload);
}

/// Appends `m` framed as an uncompressed gRPC message.
pub(crate) fn encode_message<M: Message>(m: &M, out: &mut BytesMut) {
    let len = m.encoded_len();
    out.reserve(PREFIX + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // BytesMut grows as needed, so encoding cannot run out of room.
    let _ = m.encode(out);
}

/// A method whose messages are rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `KV/Range`.
    Range,
    /// `KV/Put`.
    Put,
    /// `KV/DeleteRange`.
    DeleteRange,
    /// `KV/Txn`.
    Txn,
    /// `Watch/Watch` (bidirectional stream).
    Watch,
    /// `Lease/LeaseTimeToLive` (keys in the response).
    LeaseTimeToLive,
    /// `Lock/Lock`.
    Lock,
    /// `Lock/Unlock`.
    Unlock,
    /// `Election/Campaign`.
    Campaign,
    /// `Election/Proclaim`.
    Proclaim,
    /// `Election/Leader`.
    Leader,
    /// `Election/Observe` (server stream).
    Observe,
    /// `Election/Resign`.
    Resign,
}

impl Method {
    /// The keyed method at a gRPC path, `None` for a method without keys.
    pub fn from_path(path: &str) -> Option<Method> {
        Some(match path {
            "/etcdserverpb.KV/Range" => Method::Range,
            "/etcdserverpb.KV/Put" => Method::Put,
            "/etcdserverpb.KV/DeleteRange" => Method::DeleteRange,
            "/etcdserverpb.KV/Txn" => Method::Txn,
            "/etcdserverpb.Watch/Watch" => Method::Watch,
            "/etcdserverpb.Lease/LeaseTimeToLive" => Method::LeaseTimeToLive,
            "/v3lockpb.Lock/Lock" => Method::Lock,
            "/v3lockpb.Lock/Unlock" => Method::Unlock,
            "/v3electionpb.Election/Campaign" => Method::Campaign,
            "/v3electionpb.Election/Proclaim" => Method::Proclaim,
            "/v3electionpb.Election/Leader" => Method::Leader,
            "/v3electionpb.Election/Observe" => Method::Observe,
            "/v3electionpb.Election/Resign" => Method::Resign,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// Decodes `payload` as `M`, applies `f`, and appends the result framed.
fn rewrite<M, F>(payload: Bytes, out: &mut BytesMut, f: F) -> Result<(), Status>
where
    M: Message + Default,
    F: FnOnce(&mut M) -> Result<(), Status>,
{
    let mut m = M::decode(payload)
        .map_err(|e| Status::new(INTERNAL, format!("grpc: failed to unmarshal message: {e}")))?;
    f(&mut m)?;
    encode_message(&m, out);
    Ok(())
}

/// What the rewrite handler needs: the namespace and the size bounds.
#[derive(Debug)]
pub struct Rewriter {
    namespace: Namespace,
    limits: Limits,
}

impl Rewriter {
    /// A rewriter for `namespace`.
    pub fn new(namespace: Namespace, limits: Limits) -> Rewriter {
        Rewriter { namespace, limits }
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// The size bounds.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The rewriter a configuration asks for: `None` without a namespace.
    pub fn from_config(config: &crate::Config) -> Option<Arc<Rewriter>> {
        config
            .namespace
            .clone()
            .map(|ns| Arc::new(Rewriter::new(ns, config.limits)))
    }

    /// Rewrites one message of `method` going in direction `dir`; appends it framed to `out`.
    fn message(
        &self,
        method: Method,
        dir: Direction,
        payload: Bytes,
        out: &mut BytesMut,
    ) -> Result<(), Status> {
        let ns = &self.namespace;
        match dir {
            Direction::Request => match method {
                Method::Range => {
                    rewrite(
                        payload,
                        out,
                        |r: &mut RangeRequest| Ok(ns.range_request(r)?),
                    )
                }
                Method::Put => rewrite(payload, out, |r: &mut PutRequest| Ok(ns.put_request(r)?)),
                Method::DeleteRange => rewrite(payload, out, |r: &mut DeleteRangeRequest| {
                    Ok(ns.delete_range_request(r)?)
                }),
                Method::Txn => rewrite(payload, out, |r: &mut TxnRequest| Ok(ns.txn_request(r)?)),
                Method::Watch => rewrite(payload, out, |r: &mut WatchRequest| {
                    ns.watch_request(r);
                    Ok(())
                }),
                Method::Lock => rewrite(payload, out, |r: &mut LockRequest| {
                    ns.lock_request(r);
                    Ok(())
                }),
                Method::Unlock => rewrite(payload, out, |r: &mut UnlockRequest| {
                    ns.unlock_request(r);
                    Ok(())
                }),
                Method::Campaign => rewrite(payload, out, |r: &mut CampaignRequest| {
                    ns.campaign_request(r);
                    Ok(())
                }),
                Method::Proclaim => rewrite(payload, out, |r: &mut ProclaimRequest| {
                    ns.proclaim_request(r);
                    Ok(())
                }),
                Method::Leader | Method::Observe => {
                    rewrite(payload, out, |r: &mut LeaderRequest| {
                        ns.leader_request(r);
                        Ok(())
                    })
                }
                Method::Resign => rewrite(payload, out, |r: &mut ResignRequest| {
                    ns.resign_request(r);
                    Ok(())
                }),
                // A lease ID only.
                Method::LeaseTimeToLive => {
                    encode_frame(&payload, out);
                    Ok(())
                }
            },
            Direction::Response => match method {
                Method::Range => rewrite(payload, out, |r: &mut RangeResponse| {
                    Ok(ns.range_response(r)?)
                }),
                Method::Put => rewrite(payload, out, |r: &mut PutResponse| Ok(ns.put_response(r)?)),
                Method::DeleteRange => rewrite(payload, out, |r: &mut DeleteRangeResponse| {
                    Ok(ns.delete_range_response(r)?)
                }),
                Method::Txn => rewrite(payload, out, |r: &mut TxnResponse| Ok(ns.txn_response(r)?)),
                Method::Watch => rewrite(payload, out, |r: &mut WatchResponse| {
                    Ok(ns.watch_response(r)?)
                }),
                Method::LeaseTimeToLive => {
                    rewrite(payload, out, |r: &mut LeaseTimeToLiveResponse| {
                        ns.lease_time_to_live_response(r);
                        Ok(())
                    })
                }
                Method::Lock => {
                    rewrite(
                        payload,
                        out,
                        |r: &mut LockResponse| Ok(ns.lock_response(r)?),
                    )
                }
                Method::Campaign => rewrite(payload, out, |r: &mut CampaignResponse| {
                    Ok(ns.campaign_response(r)?)
                }),
                Method::Leader | Method::Observe => {
                    rewrite(payload, out, |r: &mut LeaderResponse| {
                        Ok(ns.leader_response(r)?)
                    })
                }
                // A response header only.
                Method::Unlock | Method::Proclaim | Method::Resign => {
                    encode_frame(&payload, out);
                    Ok(())
                }
            },
        }
    }
}

/// One direction of a call: its framing state and what to do with each message.
struct Transform {
    decoder: Decoder,
    rewriter: Arc<Rewriter>,
    method: Method,
    dir: Direction,
}

impl Transform {
    fn new(rewriter: Arc<Rewriter>, method: Method, dir: Direction) -> Transform {
        let max = match dir {
            Direction::Request => rewriter.limits.request,
            Direction::Response => rewriter.limits.decoded_response(),
        };
        Transform {
            decoder: Decoder::new(max),
            rewriter,
            method,
            dir,
        }
    }

    /// The rewritten form of every message completed by `data` (possibly none).
    fn chunk(&mut self, data: &[u8]) -> Result<Bytes, Status> {
        self.decoder.push(data);
        let mut out = BytesMut::new();
        while let Some(message) = self.decoder.next_message()? {
            let start = out.len();
            self.rewriter
                .message(self.method, self.dir, message, &mut out)?;
            if self.dir == Direction::Request {
                // The prefix added to keys counts towards what is sent to etcd.
                let len = out.len() - start - PREFIX;
                self.rewriter.limits.check_send(len)?;
            }
        }
        Ok(out.freeze())
    }

    fn finish(&self) -> Result<(), Status> {
        Ok(self.decoder.finish()?)
    }
}

/// Why a request body sent to etcd stopped.
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    /// The client's stream broke.
    #[error("client stream: {0}")]
    Client(#[from] crate::body::BodyError),
    /// A message was refused; the client gets this status.
    #[error("refused: {}", .0.message)]
    Refused(Status),
}

/// The body of a call sent to etcd: the client's, as is, or rewritten.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, relayed frame by frame, its message sizes checked on the way.
    Client {
        /// The client's body.
        inner: ClientBody,
        /// Follows the message prefixes.
        scan: MessageLimit,
        /// The limits the scanner enforces, for the refusal's text.
        limits: Limits,
        /// Where a refusal goes, for the handler to answer the client with (hyper does not
        /// hand a body's error back to the caller).
        refusal: Option<oneshot::Sender<Status>>,
    },
    /// The client's messages, rewritten.
    Rewritten(RequestStream),
    /// The client's whole body, read before it is sent (unary calls checked first); `None` once
    /// sent.
    Buffered(Option<Bytes>),
    /// Framed messages written by the proxy (a stream that survives its member,
    /// [`crate::resume`]); ends when the sender is dropped.
    Channel(tokio::sync::mpsc::Receiver<Bytes>),
}

impl RequestBody {
    /// The client's body forwarded as bytes, its message sizes checked against `limits`; a
    /// message over a limit ends it, and its status is sent to `refusal`.
    pub fn client(
        inner: ClientBody,
        limits: Limits,
        refusal: Option<oneshot::Sender<Status>>,
    ) -> RequestBody {
        RequestBody::Client {
            inner,
            scan: limits.request_scanner(),
            limits,
            refusal,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        match self.get_mut() {
            RequestBody::Client {
                inner,
                scan,
                limits,
                refusal,
            } => {
                let frame = ready!(Pin::new(inner).poll_frame(cx));
                if let Some(Ok(frame)) = &frame
                    && let Some(data) = frame.data_ref()
                    && let Err(e) = scan.scan(data)
                {
                    let status = limits.request_refusal(e.len);
                    if let Some(tx) = refusal.take() {
                        let _ = tx.send(status.clone());
                    }
                    return Poll::Ready(Some(Err(RequestBodyError::Refused(status))));
                }
                Poll::Ready(frame.map(|r| r.map_err(RequestBodyError::Client)))
            }
            RequestBody::Rewritten(stream) => Pin::new(stream).poll_frame(cx),
            RequestBody::Buffered(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestBody::Channel(rx) => rx.poll_recv(cx).map(|m| m.map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client { inner, .. } => inner.is_end_stream(),
            RequestBody::Rewritten(stream) => stream.done,
            RequestBody::Buffered(data) => data.is_none(),
            RequestBody::Channel(rx) => rx.is_closed() && rx.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client { inner, .. } => inner.size_hint(),
            RequestBody::Rewritten(_) | RequestBody::Channel(_) => SizeHint::default(),
            RequestBody::Buffered(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// The client's request messages, rewritten on their way to etcd. A refused message ends it
/// with an error (so etcd's side of the call is reset) and hands the status to the response.
#[derive(Debug)]
pub struct RequestStream {
    inner: ClientBody,
    transform: Transform,
    refusal: Option<oneshot::Sender<Status>>,
    done: bool,
}

impl std::fmt::Debug for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transform")
            .field("method", &self.method)
            .field("dir", &self.dir)
            .finish()
    }
}

impl RequestStream {
    fn refuse(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        self.done = true;
        if let Some(tx) = self.refusal.take() {
            let _ = tx.send(status.clone());
        }
        Poll::Ready(Some(Err(RequestBodyError::Refused(status))))
    }
}

impl Body for RequestStream {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match this.transform.chunk(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(status) => return this.refuse(status),
                    },
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(RequestBodyError::Client(e))));
                }
                None => {
                    if let Err(status) = this.transform.finish() {
                        return this.refuse(status);
                    }
                    this.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// etcd's response messages, rewritten on their way to the client; etcd's trailers pass
/// unchanged. Ends with the proxy's status when a request or response message is refused.
#[derive(Debug)]
pub struct ResponseStream {
    inner: crate::upstream::UpstreamBody,
    transform: Transform,
    /// The status of a refused request message; `None` once the request ended cleanly.
    refused: Option<oneshot::Receiver<Status>>,
    done: bool,
}

impl ResponseStream {
    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.done = true;
        Poll::Ready(Some(Ok(Frame::trailers(status_headers(
            status.code,
            &status.message,
        )))))
    }
}

impl Body for ResponseStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(rx) = &mut this.refused {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(status)) => return this.fail(status),
                Poll::Ready(Err(_)) => this.refused = None,
                Poll::Pending => {}
            }
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match this.transform.chunk(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out)))),
                        Err(status) => return this.fail(status),
                    },
                    Err(trailers) => {
                        if let Err(status) = this.transform.finish() {
                            return this.fail(status);
                        }
                        return Poll::Ready(Some(Ok(trailers)));
                    }
                },
                Some(Err(e)) => {
                    // A refused request resets etcd's stream: the refusal is the real cause.
                    let status = this
                        .refused
                        .as_mut()
                        .and_then(|rx| rx.try_recv().ok())
                        .unwrap_or_else(|| {
                            tracing::debug!(error = %e, "upstream stream broke; ending the call with UNAVAILABLE");
                            Status::new(
                                UNAVAILABLE,
                                format!("connection to etcd member broke: {e}"),
                            )
                        });
                    return this.fail(status);
                }
                None => {
                    if let Err(status) = this.transform.finish() {
                        return this.fail(status);
                    }
                    this.done = true;
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// Serves one call of `method`, rewriting its messages both ways.
pub async fn handle(
    upstream: &Upstream,
    rewriter: &Arc<Rewriter>,
    method: Method,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let (mut parts, body) = req.into_parts();
    // Lengths change; and etcd must not compress what we have to read.
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(GRPC_ACCEPT_ENCODING);
    let (tx, rx) = oneshot::channel();
    let body = RequestStream {
        inner: body,
        transform: Transform::new(rewriter.clone(), method, Direction::Request),
        refusal: Some(tx),
        done: false,
    };
    let req = Request::from_parts(parts, RequestBody::Rewritten(body));

    let mut refused = Some(rx);
    let send = upstream.send(req);
    let mut send = std::pin::pin!(send);
    let sent = loop {
        match &mut refused {
            Some(rx) => tokio::select! {
                r = &mut send => break r,
                r = rx => match r {
                    Ok(status) => return status_response(status.code, &status.message),
                    // The request ended cleanly: nothing more can be refused.
                    Err(_) => refused = None,
                },
            },
            None => break send.as_mut().await,
        }
    };
    match sent {
        Ok(resp) if resp.status() == hyper::StatusCode::OK => {
            let (mut parts, body) = resp.into_parts();
            parts.headers.remove(CONTENT_LENGTH);
            let body = ResponseStream {
                inner: body,
                transform: Transform::new(rewriter.clone(), method, Direction::Response),
                refused,
                done: false,
            };
            Response::from_parts(parts, ResponseBody::Rewritten(body))
        }
        // Not a gRPC response: relayed as it is.
        Ok(resp) => resp.map(|inner| ResponseBody::upstream(inner, rewriter.limits)),
        Err(e) => {
            if let Some(status) = refused.as_mut().and_then(|rx| rx.try_recv().ok()) {
                return status_response(status.code, &status.message);
            }
            tracing::debug!(error = %e, "cannot forward a gRPC call");
            status_response(UNAVAILABLE, &e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(payload, &mut out);
        out.to_vec()
    }

    fn drain(d: &mut Decoder) -> Result<Vec<Bytes>, FrameError> {
        let mut out = Vec::new();
        while let Some(m) = d.next_message()? {
            out.push(m);
        }
        Ok(out)
    }

    #[test]
    fn a_message_split_over_many_chunks() {
        let msg = frame(b"hello world");
        let mut d = Decoder::new(1024);
        let mut got = Vec::new();
        // One byte at a time: the prefix itself is split too.
        for b in &msg {
            d.push(&[*b]);
            got.extend(drain(&mut d).unwrap());
        }
        assert_eq!(got, vec![Bytes::from_static(b"hello world")]);
        d.finish().unwrap();
    }

    #[test]
    fn several_messages_in_one_chunk() {
        let mut chunk = frame(b"a");
        chunk.extend(frame(b""));
        chunk.extend(frame(b"ccc"));
        let tail = frame(b"dddd");
        chunk.extend(&tail[..3]);
        let mut d = Decoder::new(1024);
        d.push(&chunk);
        assert_eq!(
            drain(&mut d).unwrap(),
            vec![
                Bytes::from_static(b"a"),
                Bytes::new(),
                Bytes::from_static(b"ccc")
            ]
        );
        assert_eq!(d.finish(), Err(FrameError::Truncated));
        d.push(&tail[3..]);
        assert_eq!(drain(&mut d).unwrap(), vec![Bytes::from_static(b"dddd")]);
        d.finish().unwrap();
    }

    #[test]
    fn compressed_flag_is_unimplemented() {
        let mut d = Decoder::new(1024);
        d.push(&[1, 0, 0, 0, 1, b'x']);
        let e = drain(&mut d).unwrap_err();
        assert_eq!(e, FrameError::Compressed);
        assert_eq!(Status::from(e).code, UNIMPLEMENTED);
        let mut d = Decoder::new(1024);
        d.push(&[7, 0, 0, 0, 0]);
        assert_eq!(Status::from(drain(&mut d).unwrap_err()).code, INTERNAL);
    }

    #[test]
    fn oversize_is_refused_before_it_is_buffered() {
        let mut d = Decoder::new(4 << 20);
        // Only the prefix of a 5 MiB message has arrived.
        d.push(&[0, 0, 0x50, 0, 0]);
        let e = drain(&mut d).unwrap_err();
        assert_eq!(
            e,
            FrameError::TooLarge {
                len: 5 << 20,
                max: 4 << 20
            }
        );
        let s = Status::from(e);
        assert_eq!(s.code, RESOURCE_EXHAUSTED);
        assert_eq!(
            s.message,
            "grpc: received message larger than max (5242880 vs. 4194304)"
        );
        // Exactly the limit is fine.
        let mut d = Decoder::new(3);
        d.push(&frame(b"abc"));
        assert_eq!(drain(&mut d).unwrap().len(), 1);
    }

    fn rewriter() -> Arc<Rewriter> {
        Arc::new(Rewriter::new(
            Namespace::new(Bytes::from_static(b"/app/")).unwrap(),
            Limits::default(),
        ))
    }

    #[test]
    fn range_request_and_response_through_the_framing() {
        let rw = rewriter();
        let mut t = Transform::new(rw.clone(), Method::Range, Direction::Request);
        let req = RangeRequest {
            key: Bytes::from_static(b"\x00"),
            range_end: Bytes::from_static(b"\x00"),
            ..Default::default()
        };
        let mut wire = BytesMut::new();
        encode_message(&req, &mut wire);
        encode_message(&req, &mut wire);
        let (a, b) = wire.split_at(7);
        let mut out = t.chunk(a).unwrap().to_vec();
        out.extend(t.chunk(b).unwrap());
        let mut d = Decoder::new(1024);
        d.push(&out);
        let msgs = drain(&mut d).unwrap();
        assert_eq!(msgs.len(), 2);
        for m in msgs {
            let r = RangeRequest::decode(m).unwrap();
            assert_eq!(&r.key[..], b"/app/\x00");
            assert_eq!(&r.range_end[..], b"/app0");
        }

        let mut t = Transform::new(rw.clone(), Method::Range, Direction::Response);
        let resp = RangeResponse {
            kvs: vec![etcd_api::mvccpb::KeyValue {
                key: Bytes::from_static(b"/app/k"),
                ..Default::default()
            }],
            count: 1,
            ..Default::default()
        };
        let mut wire = BytesMut::new();
        encode_message(&resp, &mut wire);
        let out = t.chunk(&wire).unwrap();
        let r = RangeResponse::decode(&out[PREFIX..]).unwrap();
        assert_eq!(&r.kvs[0].key[..], b"k");

        // An empty key is refused as etcd refuses it.
        let mut t = Transform::new(rw, Method::Put, Direction::Request);
        let mut wire = BytesMut::new();
        encode_message(&PutRequest::default(), &mut wire);
        let s = t.chunk(&wire).unwrap_err();
        assert_eq!(s.code, INVALID_ARGUMENT);
        assert_eq!(s.message, "etcdserver: key is not provided");
    }

    #[test]
    fn keyed_methods_are_known_by_path() {
        assert_eq!(
            Method::from_path("/etcdserverpb.Watch/Watch"),
            Some(Method::Watch)
        );
        assert_eq!(
            Method::from_path("/v3electionpb.Election/Observe"),
            Some(Method::Observe)
        );
        for keyless in [
            "/etcdserverpb.KV/Compact",
            "/etcdserverpb.Lease/LeaseGrant",
            "/etcdserverpb.Lease/LeaseKeepAlive",
            "/etcdserverpb.Lease/LeaseLeases",
            "/etcdserverpb.Maintenance/Status",
            "/etcdserverpb.Cluster/MemberList",
            "/etcdserverpb.Auth/Authenticate",
            "",
        ] {
            assert_eq!(Method::from_path(keyless), None, "{keyless}");
        }
    }
}

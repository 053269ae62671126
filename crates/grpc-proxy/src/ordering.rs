//! `--experimental-serializable-ordering`: a serializable read through this proxy never answers
//! with an older store revision than one the proxy has already returned to any client (read or
//! written at). etcd's own flag wraps a client method its proxy never calls, so it is a no-op for
//! proxied requests; this one really works.
//!
//! How: the proxy keeps a high-water mark of the header revisions of every KV response it
//! relays (`Range`, `Put`, `DeleteRange`, `Txn`). A serializable read (`Range` with
//! `serializable`, or a `Txn` whose every operation is such a range) is sent to a member, and
//! the head of its answer is read before anything reaches the client: if the header revision is
//! below the mark, that member is behind (a follower that has not applied what another member
//! already served), so the answer is dropped and the read goes to another member. After as many
//! stale answers as there are members, the read is sent once more as a linearizable read
//! (`serializable` cleared), which etcd only answers once the member has caught up with the
//! leader's commit index, so it is at least as new as anything returned before.
//!
//! Only the first bytes of a response are needed to read its revision ([`header_revision`]: the
//! header is field 1 of every KV response and etcd writes it first), so a large range still
//! streams to the client: the proxy holds back just the frames up to the header. Under
//! `--namespace` the four calls are decoded whole anyway (their keys change), and this module
//! does the rewrite itself with the same [`Namespace`] rules as [`crate::rewrite`].
//!
//! Without the flag nothing here runs: [`Ordering::applies`] is one bool test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering as Mem};

use bytes::{Bytes, BytesMut};
use etcd_api::etcdserverpb::{
    DeleteRangeRequest, DeleteRangeResponse, PutRequest, PutResponse, RangeRequest, RangeResponse,
    RequestOp, TxnRequest, TxnResponse, request_op,
};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::{CONTENT_LENGTH, HeaderMap};
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use prost::Message;

use crate::body::ClientBody;
use crate::forward::{ResponseBody, status_headers, status_response};
use crate::limits::MessageLimit;
use crate::namespace::Namespace;
use crate::resume::{grpc_status, rebuild};
use crate::rewrite::{
    Decoder, GRPC_ACCEPT_ENCODING, Limits, RequestBody, Rewriter, Status, encode_message,
};
use crate::upstream::UpstreamBody;
use crate::upstream::{SendError, Upstream};

/// gRPC codes used here.
const RESOURCE_EXHAUSTED: u16 = 8;
const INTERNAL: u16 = 13;
const UNAVAILABLE: u16 = 14;

/// Bytes of the gRPC message prefix: compressed flag and length.
const PREFIX: usize = 5;
/// How far into a response message the header is looked for before giving up. etcd writes the
/// header first and it takes at most 46 bytes (four varints); the rest is room for fields a
/// newer etcd might add to it.
const PEEK_LIMIT: usize = 512;
/// Members a read is sent to at most when each fails it (the member's connection breaks or it
/// answers `UNAVAILABLE`), as [`crate::forward`] does for reads.
const READ_ATTEMPTS: usize = 3;
/// An answer up to this size is read whole before it is returned (a unary answer's trailers
/// follow its message at once), so it needs no task to relay the rest; a larger one streams.
const READ_WHOLE_UP_TO: usize = 64 << 10;

/// The KV calls whose revisions the mark follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `KV/Range`.
    Range,
    /// `KV/Put`.
    Put,
    /// `KV/DeleteRange`.
    DeleteRange,
    /// `KV/Txn`.
    Txn,
}

impl Call {
    /// The call at a gRPC path, `None` for anything else.
    pub fn from_path(path: &str) -> Option<Call> {
        Some(match path {
            "/etcdserverpb.KV/Range" => Call::Range,
            "/etcdserverpb.KV/Put" => Call::Put,
            "/etcdserverpb.KV/DeleteRange" => Call::DeleteRange,
            "/etcdserverpb.KV/Txn" => Call::Txn,
            _ => return None,
        })
    }
}

/// The revision high-water mark, shared by every call of the proxy.
#[derive(Debug, Default)]
pub struct Ordering {
    enabled: AtomicBool,
    mark: AtomicI64,
    retries: AtomicU64,
}

impl Ordering {
    /// The proxy's ordering; `enabled` is `--experimental-serializable-ordering`.
    pub fn new(enabled: bool) -> Arc<Ordering> {
        Arc::new(Ordering {
            enabled: AtomicBool::new(enabled),
            ..Ordering::default()
        })
    }

    /// Whether this call goes through [`Ordering::handle`]: a KV call, with the flag on.
    pub fn applies(&self, path: &str) -> bool {
        self.enabled.load(Mem::Relaxed) && Call::from_path(path).is_some()
    }

    /// The highest revision returned so far.
    pub fn mark(&self) -> i64 {
        self.mark.load(Mem::Acquire)
    }

    /// Raises the mark to `revision` (never lowers it).
    pub fn observe(&self, revision: i64) {
        self.mark.fetch_max(revision, Mem::AcqRel);
    }

    /// Serializable reads answered by a member behind the mark and sent again.
    pub fn retries(&self) -> u64 {
        self.retries.load(Mem::Relaxed)
    }

    /// What to do with an answer at `revision` (`None`: no revision could be read, e.g. an
    /// error) to a read that is `serializable`.
    fn judge(&self, serializable: bool, revision: Option<i64>) -> Verdict {
        match revision {
            Some(rev) if serializable && rev < self.mark() => Verdict::Stale,
            Some(rev) => {
                self.observe(rev);
                Verdict::Fresh
            }
            None => Verdict::Fresh,
        }
    }

    /// Serves one KV call ([`Ordering::applies`]): the request is read whole (unary, bounded by
    /// `limits`), sent, and the answer's revision checked and recorded before the client sees
    /// it. `rewriter` applies `--namespace`.
    pub async fn handle(
        &self,
        upstream: &Upstream,
        rewriter: Option<&Arc<Rewriter>>,
        limits: Limits,
        req: Request<ClientBody>,
    ) -> Response<ResponseBody> {
        let Some(call) = Call::from_path(req.uri().path()) else {
            return status_response(INTERNAL, "etcd-proxy: not a KV call");
        };
        let ns = rewriter.map(|rw| rw.namespace());
        let (mut parts, body) = req.into_parts();
        let body = match crate::forward::collect_request(body, limits).await {
            Ok(body) => body,
            Err(resp) => return resp,
        };
        let plan = match Plan::new(call, body, ns, limits) {
            Ok(plan) => plan,
            Err(status) => return status_response(status.code, &status.message),
        };
        // The body may be re-encoded; and etcd must not compress the answer the proxy reads.
        parts.headers.remove(CONTENT_LENGTH);
        parts.headers.remove(GRPC_ACCEPT_ENCODING);
        self.exchange(upstream, &parts, plan, ns, limits).await
    }

    async fn exchange(
        &self,
        upstream: &Upstream,
        parts: &Parts,
        mut plan: Plan,
        ns: Option<&Namespace>,
        limits: Limits,
    ) -> Response<ResponseBody> {
        // Counted at the first stale answer only: the count moves the round-robin position.
        let mut members = None;
        let mut avoid: Option<String> = None;
        let mut failures = 0;
        let mut stale = 0;
        loop {
            let req = rebuild(parts, RequestBody::Buffered(Some(plan.wire.clone())));
            let may_retry = plan.read && failures + 1 < READ_ATTEMPTS;
            let (resp, member) = match upstream.send_stream(req, avoid.as_deref()).await {
                Ok(sent) => sent,
                Err(SendError::Failed { member, source }) if may_retry => {
                    tracing::debug!(member = %member, error = %source, "member failed a read; asking another");
                    failures += 1;
                    avoid = Some(member);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot forward a gRPC call");
                    return status_response(UNAVAILABLE, &e.to_string());
                }
            };
            if may_retry && grpc_status(resp.headers()) == Some(UNAVAILABLE) {
                tracing::debug!(
                    member = member.name(),
                    "member answered a read with UNAVAILABLE; asking another"
                );
                failures += 1;
                avoid = Some(member.name().to_string());
                continue;
            }
            if resp.status() != StatusCode::OK {
                // Not a gRPC answer: relayed as it is.
                return resp.map(|inner| ResponseBody::upstream(inner, limits));
            }
            let whole = ns.is_some() || plan.dummy;
            let head = match Head::read(resp, limits, whole).await {
                Ok(head) => head,
                Err(HeadError::TooLarge(message)) => {
                    return status_response(RESOURCE_EXHAUSTED, &message);
                }
                Err(HeadError::Broke(e)) if may_retry => {
                    tracing::debug!(member = member.name(), error = %e, "member failed a read; asking another");
                    failures += 1;
                    avoid = Some(member.name().to_string());
                    continue;
                }
                Err(HeadError::Broke(e)) => {
                    return status_response(
                        UNAVAILABLE,
                        &format!("connection to etcd member broke: {e}"),
                    );
                }
            };
            match self.judge(plan.serializable, head.revision) {
                Verdict::Fresh => return head.into_response(plan.call, ns, plan.dummy, limits),
                Verdict::Stale => {
                    stale += 1;
                    self.retries.fetch_add(1, Mem::Relaxed);
                    let mark = self.mark();
                    avoid = Some(member.name().to_string());
                    let members =
                        *members.get_or_insert_with(|| upstream.members_in_order().len().max(1));
                    if stale >= members {
                        tracing::debug!(
                            member = member.name(),
                            revision = head.revision,
                            mark,
                            "every member answered a serializable read behind the revision already returned; reading linearizably"
                        );
                        plan.linearize(ns, limits);
                    } else {
                        tracing::debug!(
                            member = member.name(),
                            revision = head.revision,
                            mark,
                            "member answered a serializable read behind the revision already returned; asking another"
                        );
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Return it (its revision is now part of the mark).
    Fresh,
    /// Behind the mark: ask another member.
    Stale,
}

/// The client's request as the proxy sends it.
#[derive(Debug)]
struct Plan {
    call: Call,
    /// The framed request sent to etcd (namespace applied).
    wire: Bytes,
    /// A serializable read: its answer is checked against the mark.
    serializable: bool,
    /// A call that changes nothing: sent again when its member fails it.
    read: bool,
    /// The decoded client request, kept to make a linearizable copy of a serializable read.
    decoded: Option<Decoded>,
    /// The linearizable copy of a `Txn` without operations has one added (a count of a key it
    /// compares) whose answer is removed before the client sees it.
    dummy: bool,
}

#[derive(Debug)]
enum Decoded {
    Range(RangeRequest),
    Txn(TxnRequest),
}

impl Plan {
    fn new(
        call: Call,
        body: Bytes,
        ns: Option<&Namespace>,
        limits: Limits,
    ) -> Result<Plan, Status> {
        let mut plan = Plan {
            call,
            wire: body.clone(),
            serializable: false,
            read: call == Call::Range,
            decoded: None,
            dummy: false,
        };
        let payload = match single_message(&body, limits) {
            Ok(payload) => payload,
            // Without a namespace the bytes go to etcd as they are and etcd answers them; with
            // one, what cannot be read cannot be confined to the namespace.
            Err(_) if ns.is_none() => return Ok(plan),
            Err(status) => return Err(status),
        };
        let unmarshal = |e: prost::DecodeError| {
            Status::new(INTERNAL, format!("grpc: error unmarshalling request: {e}"))
        };
        match call {
            Call::Range => match RangeRequest::decode(payload) {
                Ok(r) => {
                    plan.serializable = r.serializable;
                    if let Some(ns) = ns {
                        plan.wire = encode_range(r.clone(), ns, limits)?;
                    }
                    plan.decoded = Some(Decoded::Range(r));
                }
                Err(_) if ns.is_none() => {}
                Err(e) => return Err(unmarshal(e)),
            },
            Call::Txn => match TxnRequest::decode(payload) {
                Ok(t) => {
                    plan.serializable = txn_is_serializable(&t);
                    // A transaction of ranges only changes nothing either.
                    plan.read = plan.serializable;
                    if let Some(ns) = ns {
                        plan.wire = encode_txn(t.clone(), ns, limits)?;
                    }
                    plan.decoded = Some(Decoded::Txn(t));
                }
                Err(_) if ns.is_none() => {}
                Err(e) => return Err(unmarshal(e)),
            },
            Call::Put => {
                if let Some(ns) = ns {
                    let mut r = PutRequest::decode(payload).map_err(unmarshal)?;
                    ns.put_request(&mut r)?;
                    plan.wire = encode_checked(&r, limits)?;
                }
            }
            Call::DeleteRange => {
                if let Some(ns) = ns {
                    let mut r = DeleteRangeRequest::decode(payload).map_err(unmarshal)?;
                    ns.delete_range_request(&mut r)?;
                    plan.wire = encode_checked(&r, limits)?;
                }
            }
        }
        Ok(plan)
    }

    /// Turns the serializable read into a linearizable one, which no member answers before it
    /// has applied everything committed when the read arrived.
    fn linearize(&mut self, ns: Option<&Namespace>, limits: Limits) {
        let rebuilt = match self.decoded.take() {
            Some(Decoded::Range(mut r)) => {
                r.serializable = false;
                match ns {
                    Some(ns) => encode_range(r, ns, limits),
                    None => encode_checked(&r, limits),
                }
            }
            Some(Decoded::Txn(mut t)) => {
                self.dummy = linearize_txn(&mut t);
                match ns {
                    Some(ns) => encode_txn(t, ns, limits),
                    None => encode_checked(&t, limits),
                }
            }
            None => return,
        };
        match rebuilt {
            Ok(wire) => {
                self.wire = wire;
                self.serializable = false;
            }
            // Cannot happen (the serializable form fitted), but a read must not loop forever:
            // its next answer is returned whatever its revision.
            Err(_) => self.serializable = false,
        }
    }
}

/// The one message of a unary request body.
pub(crate) fn single_message(body: &Bytes, limits: Limits) -> Result<Bytes, Status> {
    let mut decoder = Decoder::new(limits.request);
    decoder.push(body);
    let message = decoder.next_message()?;
    decoder.finish()?;
    message.ok_or_else(|| Status::new(INTERNAL, "grpc: the request has no message"))
}

fn encode_checked<M: Message>(m: &M, limits: Limits) -> Result<Bytes, Status> {
    limits.check_send(m.encoded_len())?;
    let mut out = BytesMut::new();
    encode_message(m, &mut out);
    Ok(out.freeze())
}

fn encode_range(mut r: RangeRequest, ns: &Namespace, limits: Limits) -> Result<Bytes, Status> {
    ns.range_request(&mut r)?;
    encode_checked(&r, limits)
}

fn encode_txn(mut t: TxnRequest, ns: &Namespace, limits: Limits) -> Result<Bytes, Status> {
    ns.txn_request(&mut t)?;
    encode_checked(&t, limits)
}

/// etcd's `isTxnSerializable`: every operation of both branches is a serializable range (so a
/// transaction without operations is one too).
pub fn txn_is_serializable(t: &TxnRequest) -> bool {
    t.success.iter().chain(&t.failure).all(
        |op| matches!(&op.request, Some(request_op::Request::RequestRange(r)) if r.serializable),
    )
}

/// Clears `serializable` on every range of a serializable transaction. One without operations
/// would still be served from the member's own state, so it gets one linearizable range (a
/// count of the first key it compares) in each branch; returns true then, and that range's
/// answer must be removed from the response.
fn linearize_txn(t: &mut TxnRequest) -> bool {
    for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
        if let Some(request_op::Request::RequestRange(r)) = &mut op.request {
            r.serializable = false;
        }
    }
    if !t.success.is_empty() || !t.failure.is_empty() {
        return false;
    }
    let key = t
        .compare
        .first()
        .map(|c| c.key.clone())
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| Bytes::from_static(b"\0"));
    let op = RequestOp {
        request: Some(request_op::Request::RequestRange(RangeRequest {
            key,
            count_only: true,
            ..RangeRequest::default()
        })),
    };
    t.success.push(op.clone());
    t.failure.push(op);
    true
}

/// Why the head of an answer could not be read.
#[derive(Debug)]
enum HeadError {
    /// A message over `--max-recv-bytes` (or over what the proxy decodes, when it must).
    TooLarge(String),
    /// The member's stream broke.
    Broke(crate::http2::StreamError),
}

/// The start of a member's answer, read up to its header revision (or whole).
struct Head {
    parts: hyper::http::response::Parts,
    /// The body bytes read so far.
    read: BytesMut,
    /// Follows the message prefixes of the body for `--max-recv-bytes`.
    scan: MessageLimit,
    /// The rest of the body; `None` once it ended.
    rest: Option<UpstreamBody>,
    /// etcd's trailers, once the body ended.
    trailers: Option<HeaderMap>,
    revision: Option<i64>,
}

impl Head {
    /// Reads `resp` until the header revision of its first message is known (or cannot be),
    /// or to its end when `whole`.
    async fn read(
        resp: Response<UpstreamBody>,
        limits: Limits,
        whole: bool,
    ) -> Result<Head, HeadError> {
        let (parts, body) = resp.into_parts();
        let max = if whole {
            limits.decoded_response()
        } else {
            limits.recv
        };
        let mut head = Head {
            parts,
            read: BytesMut::new(),
            scan: MessageLimit::new(max),
            rest: Some(body),
            trailers: None,
            revision: None,
        };
        let mut decided = false;
        while let Some(body) = &mut head.rest {
            if decided && !whole && head.read.len() >= READ_WHOLE_UP_TO {
                break;
            }
            match body.frame().await {
                None => head.rest = None,
                Some(Err(e)) => return Err(HeadError::Broke(e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        head.scan
                            .scan(&data)
                            .map_err(|e| HeadError::TooLarge(e.to_string()))?;
                        head.read.extend_from_slice(&data);
                        if whole && head.read.len() > max.saturating_add(PREFIX) {
                            return Err(HeadError::TooLarge(format!(
                                "grpc: received message larger than max (more than {max} bytes)"
                            )));
                        }
                        if !decided {
                            (decided, head.revision) = match peek(&head.read) {
                                Peek::Revision(rev) => (true, Some(rev)),
                                Peek::Incomplete => (false, None),
                                Peek::NoHeader | Peek::Malformed => (true, None),
                            };
                        }
                    }
                    Err(frame) => {
                        head.trailers = frame.into_trailers().ok();
                        head.rest = None;
                    }
                },
            }
        }
        Ok(head)
    }

    /// The client's response: what was read, then the rest as it comes (namespace applied when
    /// set, in which case the body was read whole).
    fn into_response(
        mut self,
        call: Call,
        ns: Option<&Namespace>,
        dummy: bool,
        limits: Limits,
    ) -> Response<ResponseBody> {
        if ns.is_some() || dummy {
            match rewrite_response(call, ns, dummy, &self.read, limits) {
                Ok(body) => self.read = body,
                Err(status) => return status_response(status.code, &status.message),
            }
            self.parts.headers.remove(CONTENT_LENGTH);
        }
        let message = (!self.read.is_empty()).then(|| self.read.freeze());
        let body = match self.rest {
            None => ResponseBody::Local {
                message,
                trailers: self.trailers,
            },
            Some(rest) => pump(message, rest, self.scan),
        };
        Response::from_parts(self.parts, body)
    }
}

/// The peek at a response body's first bytes.
fn peek(read: &[u8]) -> Peek {
    if read.len() < PREFIX {
        return Peek::Incomplete;
    }
    if read[0] != 0 {
        // Compressed (never negotiated) or not gRPC: nothing to judge.
        return Peek::Malformed;
    }
    let len = u32::from_be_bytes([read[1], read[2], read[3], read[4]]) as usize;
    let available = &read[PREFIX..];
    let complete = available.len() >= len;
    let payload = &available[..available.len().min(len)];
    match header_revision(payload, complete) {
        Peek::Incomplete if payload.len() >= PEEK_LIMIT => Peek::Malformed,
        p => p,
    }
}

/// The answer read whole, with its keys taken out of the namespace (and the operation the
/// proxy added to a transaction removed).
fn rewrite_response(
    call: Call,
    ns: Option<&Namespace>,
    dummy: bool,
    read: &[u8],
    limits: Limits,
) -> Result<BytesMut, Status> {
    let mut decoder = Decoder::new(limits.decoded_response());
    decoder.push(read);
    let mut out = BytesMut::new();
    while let Some(payload) = decoder.next_message()? {
        let unmarshal = |e: prost::DecodeError| {
            Status::new(INTERNAL, format!("grpc: failed to unmarshal message: {e}"))
        };
        match call {
            Call::Range => {
                let mut r = RangeResponse::decode(payload).map_err(unmarshal)?;
                if let Some(ns) = ns {
                    ns.range_response(&mut r)?;
                }
                encode_message(&r, &mut out);
            }
            Call::Put => {
                let mut r = PutResponse::decode(payload).map_err(unmarshal)?;
                if let Some(ns) = ns {
                    ns.put_response(&mut r)?;
                }
                encode_message(&r, &mut out);
            }
            Call::DeleteRange => {
                let mut r = DeleteRangeResponse::decode(payload).map_err(unmarshal)?;
                if let Some(ns) = ns {
                    ns.delete_range_response(&mut r)?;
                }
                encode_message(&r, &mut out);
            }
            Call::Txn => {
                let mut r = TxnResponse::decode(payload).map_err(unmarshal)?;
                if dummy {
                    r.responses.clear();
                }
                if let Some(ns) = ns {
                    ns.txn_response(&mut r)?;
                }
                encode_message(&r, &mut out);
            }
        }
    }
    decoder.finish()?;
    Ok(out)
}

/// A body that sends `first`, then the rest of etcd's body frame by frame, checking message
/// sizes (`scan` has seen `first`); a broken stream ends with `UNAVAILABLE` trailers, as
/// [`ResponseBody::Upstream`] does.
fn pump(first: Option<Bytes>, mut rest: UpstreamBody, mut scan: MessageLimit) -> ResponseBody {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        if let Some(first) = first
            && tx.send(Frame::data(first)).await.is_err()
        {
            return;
        }
        loop {
            let frame = match rest.frame().await {
                None => return,
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "upstream stream broke; ending the call with UNAVAILABLE");
                    let message = format!("connection to etcd member broke: {e}");
                    let _ = tx
                        .send(Frame::trailers(status_headers(UNAVAILABLE, &message)))
                        .await;
                    return;
                }
            };
            if let Some(data) = frame.data_ref()
                && let Err(e) = scan.scan(data)
            {
                let _ = tx
                    .send(Frame::trailers(status_headers(
                        RESOURCE_EXHAUSTED,
                        &e.to_string(),
                    )))
                    .await;
                return;
            }
            if tx.send(frame).await.is_err() {
                // The client left: dropping etcd's body resets its stream.
                return;
            }
        }
    });
    ResponseBody::Channel(rx)
}

/// What the start of a response message says about its header revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// The revision of the first header (0 when the header has none, as proto3 reads it).
    Revision(i64),
    /// The whole message was seen and it has no header.
    NoHeader,
    /// More bytes are needed.
    Incomplete,
    /// Not a valid protobuf message (or a group, which no etcd message has).
    Malformed,
}

/// A varint at the start of `b`.
enum Varint {
    Value(u64, usize),
    Short,
    Bad,
}

fn varint(b: &[u8]) -> Varint {
    let mut value: u64 = 0;
    for (i, &byte) in b.iter().enumerate().take(10) {
        if i == 9 && byte > 1 {
            // More than 64 bits.
            return Varint::Bad;
        }
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte < 0x80 {
            return Varint::Value(value, i + 1);
        }
    }
    if b.len() >= 10 {
        Varint::Bad
    } else {
        Varint::Short
    }
}

/// Skips one field's value of wire type `wire` at the start of `b`: the bytes it takes.
fn skip(wire: u64, b: &[u8]) -> Result<usize, Peek> {
    let short = Err(Peek::Incomplete);
    match wire {
        0 => match varint(b) {
            Varint::Value(_, n) => Ok(n),
            Varint::Short => short,
            Varint::Bad => Err(Peek::Malformed),
        },
        1 if b.len() >= 8 => Ok(8),
        5 if b.len() >= 4 => Ok(4),
        1 | 5 => short,
        2 => match varint(b) {
            Varint::Value(len, n) => {
                let end = usize::try_from(len)
                    .ok()
                    .and_then(|l| l.checked_add(n))
                    .ok_or(Peek::Malformed)?;
                if end <= b.len() { Ok(end) } else { short }
            }
            Varint::Short => short,
            Varint::Bad => Err(Peek::Malformed),
        },
        _ => Err(Peek::Malformed),
    }
}

/// The header revision of a KV response (`RangeResponse`, `PutResponse`, `DeleteRangeResponse`,
/// `TxnResponse`: all have `ResponseHeader header = 1`, whose `int64 revision = 3`) from the
/// first bytes of its payload, without decoding the rest. `complete` says that `payload` is the
/// whole message: then "more bytes needed" means the message is malformed.
///
/// The first header found is used: a message with field 1 twice (which protobuf would merge)
/// is never written by etcd.
pub fn header_revision(payload: &[u8], complete: bool) -> Peek {
    let incomplete = if complete {
        Peek::Malformed
    } else {
        Peek::Incomplete
    };
    let mut pos = 0;
    while pos < payload.len() {
        let (tag, n) = match varint(&payload[pos..]) {
            Varint::Value(tag, n) => (tag, n),
            Varint::Short => return incomplete,
            Varint::Bad => return Peek::Malformed,
        };
        pos += n;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 {
            return Peek::Malformed;
        }
        if field == 1 && wire == 2 {
            let (len, n) = match varint(&payload[pos..]) {
                Varint::Value(len, n) => (len, n),
                Varint::Short => return incomplete,
                Varint::Bad => return Peek::Malformed,
            };
            pos += n;
            let Some(end) = usize::try_from(len).ok().and_then(|l| l.checked_add(pos)) else {
                return Peek::Malformed;
            };
            if end > payload.len() {
                return incomplete;
            }
            return match fields_revision(&payload[pos..end]) {
                Some(rev) => Peek::Revision(rev),
                None => Peek::Malformed,
            };
        }
        match skip(wire, &payload[pos..]) {
            Ok(n) => pos += n,
            Err(Peek::Incomplete) => return incomplete,
            Err(p) => return p,
        }
    }
    if complete {
        Peek::NoHeader
    } else {
        Peek::Incomplete
    }
}

/// `revision` (field 3, varint) of a whole `ResponseHeader`; the last one wins, 0 if absent.
fn fields_revision(header: &[u8]) -> Option<i64> {
    let mut pos = 0;
    let mut revision = 0;
    while pos < header.len() {
        let Varint::Value(tag, n) = varint(&header[pos..]) else {
            return None;
        };
        pos += n;
        let (field, wire) = (tag >> 3, tag & 7);
        if field == 0 {
            return None;
        }
        if field == 3 && wire == 0 {
            let Varint::Value(v, n) = varint(&header[pos..]) else {
                return None;
            };
            // int64 is the two's complement of the varint's 64 bits.
            revision = v as i64;
            pos += n;
            continue;
        }
        pos += skip(wire, &header[pos..]).ok()?;
    }
    Some(revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_api::etcdserverpb::{Compare, ResponseHeader, ResponseOp, response_op};
    use etcd_api::mvccpb::KeyValue;
    use proptest::prelude::*;

    fn header(revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: 0xdead_beef_cafe,
            member_id: u64::MAX,
            revision,
            raft_term: 7,
        })
    }

    fn range_response(revision: i64, kvs: usize) -> RangeResponse {
        RangeResponse {
            header: header(revision),
            kvs: (0..kvs)
                .map(|i| KeyValue {
                    key: Bytes::from(format!("key-{i}")),
                    value: Bytes::from(vec![b'v'; 100]),
                    mod_revision: revision,
                    ..KeyValue::default()
                })
                .collect(),
            count: kvs as i64,
            more: false,
        }
    }

    #[test]
    fn the_revision_is_read_from_every_kv_response() {
        let cases: Vec<(Vec<u8>, i64)> = vec![
            (range_response(42, 3).encode_to_vec(), 42),
            (
                PutResponse {
                    header: header(1),
                    prev_kv: None,
                }
                .encode_to_vec(),
                1,
            ),
            (
                DeleteRangeResponse {
                    header: header(i64::MAX),
                    deleted: 2,
                    prev_kvs: vec![],
                }
                .encode_to_vec(),
                i64::MAX,
            ),
            (
                TxnResponse {
                    header: header(300),
                    succeeded: true,
                    responses: vec![ResponseOp {
                        response: Some(response_op::Response::ResponseRange(range_response(
                            299, 1,
                        ))),
                    }],
                }
                .encode_to_vec(),
                300,
            ),
        ];
        for (bytes, rev) in cases {
            assert_eq!(header_revision(&bytes, true), Peek::Revision(rev));
        }
    }

    #[test]
    fn a_header_without_revision_is_zero_and_no_header_is_said() {
        let bytes = RangeResponse {
            header: Some(ResponseHeader::default()),
            count: 1,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(header_revision(&bytes, true), Peek::Revision(0));
        let bytes = RangeResponse {
            count: 5,
            ..Default::default()
        }
        .encode_to_vec();
        assert_eq!(header_revision(&bytes, true), Peek::NoHeader);
        assert_eq!(header_revision(&bytes, false), Peek::Incomplete);
        assert_eq!(header_revision(&[], true), Peek::NoHeader);
    }

    #[test]
    fn a_header_after_other_fields_is_found() {
        // `count` (field 4) then the header: legal protobuf, though etcd writes the header first.
        let mut bytes = vec![0x20, 0x05];
        bytes.extend(
            RangeResponse {
                header: header(9),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        assert_eq!(header_revision(&bytes, true), Peek::Revision(9));
    }

    #[test]
    fn malformed_input_is_said_so() {
        // Field 0, a group, an overlong varint, a header longer than the message.
        assert_eq!(header_revision(&[0x00, 0x01], true), Peek::Malformed);
        assert_eq!(header_revision(&[0x0b], true), Peek::Malformed);
        assert_eq!(header_revision(&[0x20; 11], true), Peek::Malformed);
        assert_eq!(header_revision(&[0x0a, 0x05, 0x18], true), Peek::Malformed);
        assert_eq!(
            header_revision(&[0x0a, 0x05, 0x18], false),
            Peek::Incomplete
        );
    }

    #[test]
    fn the_grpc_prefix_is_followed_and_compression_is_not_judged() {
        let mut framed = BytesMut::new();
        encode_message(&range_response(77, 100), &mut framed);
        assert_eq!(peek(&framed[..3]), Peek::Incomplete);
        assert_eq!(peek(&framed[..40]), Peek::Revision(77));
        assert_eq!(peek(&framed), Peek::Revision(77));
        let mut compressed = framed.to_vec();
        compressed[0] = 1;
        assert_eq!(peek(&compressed), Peek::Malformed);
        // A header that does not show up within the peek limit is given up on.
        let mut far = vec![0u8, 0, 0, 0x10, 0];
        far.extend([0x22, 0xff, 0x1f]);
        far.extend(vec![b'x'; 1000]);
        assert_eq!(peek(&far), Peek::Malformed);
    }

    fn range_op(serializable: bool) -> RequestOp {
        RequestOp {
            request: Some(request_op::Request::RequestRange(RangeRequest {
                key: Bytes::from_static(b"k"),
                serializable,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_txn_is_serializable_when_every_op_is_a_serializable_range() {
        let txn = |success: Vec<RequestOp>, failure: Vec<RequestOp>| TxnRequest {
            compare: vec![],
            success,
            failure,
        };
        assert!(txn_is_serializable(&txn(vec![], vec![])));
        assert!(txn_is_serializable(&txn(
            vec![range_op(true)],
            vec![range_op(true), range_op(true)]
        )));
        assert!(!txn_is_serializable(&txn(
            vec![range_op(true)],
            vec![range_op(false)]
        )));
        let put = RequestOp {
            request: Some(request_op::Request::RequestPut(PutRequest::default())),
        };
        assert!(!txn_is_serializable(&txn(vec![put], vec![])));
        let nested = RequestOp {
            request: Some(request_op::Request::RequestTxn(txn(vec![], vec![]))),
        };
        assert!(!txn_is_serializable(&txn(vec![nested], vec![])));
    }

    #[test]
    fn linearizing_a_txn_clears_serializable_or_adds_a_count() {
        let mut t = TxnRequest {
            compare: vec![],
            success: vec![range_op(true)],
            failure: vec![range_op(true)],
        };
        assert!(!linearize_txn(&mut t));
        assert!(!txn_is_serializable(&t));
        assert_eq!(t.success.len(), 1);

        let mut t = TxnRequest {
            compare: vec![Compare {
                key: Bytes::from_static(b"cmp"),
                ..Default::default()
            }],
            success: vec![],
            failure: vec![],
        };
        assert!(linearize_txn(&mut t));
        assert!(!txn_is_serializable(&t));
        let Some(request_op::Request::RequestRange(r)) = &t.success[0].request else {
            panic!("a range was added");
        };
        assert_eq!(&r.key[..], b"cmp");
        assert!(r.count_only && !r.serializable);

        // The added range's answer is removed again.
        let resp = TxnResponse {
            header: header(5),
            succeeded: true,
            responses: vec![ResponseOp {
                response: Some(response_op::Response::ResponseRange(range_response(5, 0))),
            }],
        };
        let mut framed = BytesMut::new();
        encode_message(&resp, &mut framed);
        let out = rewrite_response(Call::Txn, None, true, &framed, Limits::default()).unwrap();
        let back = TxnResponse::decode(&out[PREFIX..]).unwrap();
        assert!(back.succeeded && back.responses.is_empty());
        assert_eq!(back.header, header(5));
    }

    #[test]
    fn stale_serializable_answers_are_refused_and_the_rest_raise_the_mark() {
        let o = Ordering::new(true);
        assert_eq!(o.judge(true, Some(5)), Verdict::Fresh);
        assert_eq!(o.mark(), 5);
        // A write or a linearizable read moves the mark and is never refused.
        assert_eq!(o.judge(false, Some(9)), Verdict::Fresh);
        assert_eq!(o.judge(false, Some(3)), Verdict::Fresh);
        assert_eq!(o.mark(), 9);
        assert_eq!(o.judge(true, Some(8)), Verdict::Stale);
        assert_eq!(o.judge(true, Some(9)), Verdict::Fresh);
        assert_eq!(o.judge(true, None), Verdict::Fresh);
        assert_eq!(o.mark(), 9);
    }

    #[test]
    fn only_kv_calls_and_only_with_the_flag() {
        let on = Ordering::new(true);
        let off = Ordering::new(false);
        for path in [
            "/etcdserverpb.KV/Range",
            "/etcdserverpb.KV/Put",
            "/etcdserverpb.KV/DeleteRange",
            "/etcdserverpb.KV/Txn",
        ] {
            assert!(on.applies(path), "{path}");
            assert!(!off.applies(path), "{path}");
        }
        for path in [
            "/etcdserverpb.KV/Compact",
            "/etcdserverpb.Watch/Watch",
            "/etcdserverpb.Lease/LeaseGrant",
        ] {
            assert!(!on.applies(path), "{path}");
        }
    }

    #[test]
    fn a_namespaced_plan_carries_the_prefixed_request() {
        let ns = Namespace::new(Bytes::from_static(b"/app/")).unwrap();
        let mut body = BytesMut::new();
        encode_message(
            &RangeRequest {
                key: Bytes::from_static(b"k"),
                serializable: true,
                ..Default::default()
            },
            &mut body,
        );
        let mut plan = Plan::new(Call::Range, body.freeze(), Some(&ns), Limits::default()).unwrap();
        assert!(plan.serializable && plan.read);
        let sent = RangeRequest::decode(&plan.wire[PREFIX..]).unwrap();
        assert_eq!(&sent.key[..], b"/app/k");
        assert!(sent.serializable);
        plan.linearize(Some(&ns), Limits::default());
        assert!(!plan.serializable);
        let sent = RangeRequest::decode(&plan.wire[PREFIX..]).unwrap();
        assert_eq!(&sent.key[..], b"/app/k");
        assert!(!sent.serializable);

        // A Txn with a put is a write: never retried, never linearized.
        let mut body = BytesMut::new();
        encode_message(
            &TxnRequest {
                compare: vec![],
                success: vec![RequestOp {
                    request: Some(request_op::Request::RequestPut(PutRequest {
                        key: Bytes::from_static(b"k"),
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            },
            &mut body,
        );
        let plan = Plan::new(Call::Txn, body.freeze(), None, Limits::default()).unwrap();
        assert!(!plan.serializable && !plan.read);
        // Bytes that are not a message go to etcd as they are without a namespace.
        let plan = Plan::new(
            Call::Range,
            Bytes::from_static(b"junk"),
            None,
            Limits::default(),
        )
        .unwrap();
        assert_eq!(&plan.wire[..], b"junk");
        assert!(!plan.serializable);
        assert!(
            Plan::new(
                Call::Range,
                Bytes::from_static(b"junk"),
                Some(&ns),
                Limits::default()
            )
            .is_err()
        );
    }

    proptest! {
        #[test]
        fn prost_headers_read_back(
            cluster_id in any::<u64>(),
            member_id in any::<u64>(),
            revision in any::<i64>(),
            raft_term in any::<u64>(),
            kvs in 0usize..4,
            cut in any::<prop::sample::Index>(),
        ) {
            let resp = RangeResponse {
                header: Some(ResponseHeader { cluster_id, member_id, revision, raft_term }),
                ..range_response(0, kvs)
            };
            let bytes = resp.encode_to_vec();
            prop_assert_eq!(header_revision(&bytes, true), Peek::Revision(revision));
            // Any prefix: either enough to say, or "more needed"; never a wrong revision.
            let prefix = &bytes[..cut.index(bytes.len() + 1)];
            let got = header_revision(prefix, false);
            prop_assert!(got == Peek::Incomplete || got == Peek::Revision(revision), "{:?}", got);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64), complete in any::<bool>()) {
            let _ = header_revision(&bytes, complete);
            let _ = peek(&bytes);
        }
    }
}

//! The request path: choose a handler for a call by its gRPC method path, and the handler most
//! calls get, [`Handler::Forward`], which relays it to etcd as bytes. With `--namespace`, the
//! methods with keys go to [`Handler::Rewrite`] ([`crate::rewrite`]) instead.
//!
//! Forwarding keeps everything etcd and the client say to each other: headers and metadata
//! (auth `token`, `hasleader`, `grpc-timeout`), the streaming body in both directions, and
//! etcd's trailers (`grpc-status`, `grpc-message`). The only status the proxy makes up is
//! `UNAVAILABLE`, when no member could take the call or the member's connection broke.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Request, Response};
use tokio::sync::oneshot;

use crate::body::ClientBody;
use crate::cluster::Cluster;
use crate::limits::MessageLimit;
use crate::resume::{self, Stream};
use crate::rewrite::{
    self, Limits, Method, RequestBody, RequestBodyError, ResponseStream, Rewriter,
};
use crate::upstream::{SendError, Upstream, UpstreamBody};

/// gRPC's `UNAVAILABLE`: clients treat it as "try again / another endpoint".
const UNAVAILABLE: u16 = 14;
/// gRPC's `CANCELLED`.
const CANCELLED: u16 = 1;
/// gRPC's `RESOURCE_EXHAUSTED`.
const RESOURCE_EXHAUSTED: u16 = 8;

/// What serves a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// Relay the call to a member unchanged.
    Forward,
    /// Relay the call with its keys rewritten ([`crate::rewrite`]): the keyed methods when a
    /// namespace is set.
    Rewrite(Method),
    /// Answer with this gRPC status without asking etcd: calls that would show a namespaced
    /// client what lies outside its namespace.
    Refuse(u16, &'static str),
    /// `Lease/LeaseRevoke` under a namespace: forwarded only if the lease holds no key outside
    /// the namespace ([`crate::lease::guard_revoke`]).
    GuardLeaseRevoke,
    /// `Lease/LeaseLeases` under a namespace: leases holding only keys outside the namespace
    /// are left out ([`crate::lease::filter_leases`]).
    FilterLeases,
    /// A call that only reads: if the member fails it, it is sent again to another member.
    Read,
    /// A long stream that moves to another member when its member fails
    /// ([`crate::resume`]), with the namespace applied if one is set.
    Resume(Stream),
}

/// A snapshot is the whole keyspace, so it cannot be served to a client confined to a prefix.
const SNAPSHOT_PATH: &str = "/etcdserverpb.Maintenance/Snapshot";
const SNAPSHOT_REFUSED: &str = "etcd-proxy: snapshot is not available through a namespaced proxy (it holds keys outside the namespace)";
/// gRPC's `PERMISSION_DENIED`.
pub(crate) const PERMISSION_DENIED: u16 = 7;
/// gRPC's `UNIMPLEMENTED`, and grpc-go's answer to a method path it cannot parse.
const UNIMPLEMENTED: u16 = 12;
const MALFORMED_METHOD: &str = "malformed method name";

/// Chooses the handler for a call by its path (`/etcdserverpb.KV/Range`, ...). With a namespace
/// (`namespaced`), methods with keys are rewritten; everything else, including methods this
/// proxy has never heard of, is forwarded.
pub fn route(path: &str, namespaced: bool) -> Handler {
    // A `:path` without its leading `/` would match none of the methods below, yet older etcd
    // (grpc-go before 1.79.3, CVE-2026-33186) still routes it: forwarded as bytes, it would slip
    // past the namespace rewrite. Refuse it as fixed grpc-go does.
    if !path.starts_with('/') {
        return Handler::Refuse(UNIMPLEMENTED, MALFORMED_METHOD);
    }
    if let Some(stream) = Stream::from_path(path) {
        return Handler::Resume(stream);
    }
    if !namespaced {
        return if is_read(path) {
            Handler::Read
        } else {
            Handler::Forward
        };
    }
    if path == SNAPSHOT_PATH {
        return Handler::Refuse(PERMISSION_DENIED, SNAPSHOT_REFUSED);
    }
    if path == crate::lease::LEASE_REVOKE_PATH {
        return Handler::GuardLeaseRevoke;
    }
    if path == crate::lease::LEASE_LEASES_PATH {
        return Handler::FilterLeases;
    }
    match Method::from_path(path) {
        Some(method) => Handler::Rewrite(method),
        None => Handler::Forward,
    }
}

/// The answer to a call whose method path has no leading `/` (grpc-go's, trailers-only).
pub(crate) fn malformed_method() -> Response<ResponseBody> {
    status_response(UNIMPLEMENTED, MALFORMED_METHOD)
}

/// Serves one call; `rewriter` is set when calls may need rewriting (`--namespace`); `cluster`
/// makes the proxy's own calls (the lease check under a namespace).
pub async fn handle(
    upstream: &Arc<Upstream>,
    rewriter: Option<&Arc<Rewriter>>,
    cluster: &Cluster,
    limits: Limits,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    match (route(req.uri().path(), rewriter.is_some()), rewriter) {
        (Handler::Resume(stream), rw) => {
            let namespace = rw.map(|rw| rw.namespace().clone());
            Box::pin(resume::handle(upstream, namespace, limits, stream, req)).await
        }
        (Handler::Rewrite(method), Some(rw)) => {
            Box::pin(rewrite::handle(upstream, rw, method, req)).await
        }
        (Handler::GuardLeaseRevoke, Some(rw)) => {
            Box::pin(crate::lease::guard_revoke(upstream, cluster, rw, req)).await
        }
        (Handler::FilterLeases, Some(rw)) => {
            Box::pin(crate::lease::filter_leases(cluster, rw, req)).await
        }
        (Handler::Refuse(code, message), _) => status_response(code, message),
        (Handler::Read, _) => send_read(upstream, limits, req).await,
        _ => {
            let (tx, mut refusal) = oneshot::channel();
            let req = req.map(|b| RequestBody::client(b, limits, Some(tx)));
            let resp = send(upstream, limits, req).await;
            // A message over a limit ended the call: the client learns why.
            match refusal.try_recv() {
                Ok(status) => status_response(status.code, &status.message),
                Err(_) => resp,
            }
        }
    }
}

/// Calls that change nothing in etcd, so sending one again after its member failed cannot do
/// harm (writes are never sent twice: only the client knows whether that is safe).
fn is_read(path: &str) -> bool {
    matches!(
        path,
        "/etcdserverpb.KV/Range"
            | "/etcdserverpb.Lease/LeaseTimeToLive"
            | "/etcdserverpb.Lease/LeaseLeases"
            | "/etcdserverpb.Cluster/MemberList"
            | "/etcdserverpb.Maintenance/Status"
            | "/etcdserverpb.Maintenance/Hash"
            | "/etcdserverpb.Maintenance/HashKV"
            | "/etcdserverpb.Auth/AuthStatus"
            | "/etcdserverpb.Auth/UserGet"
            | "/etcdserverpb.Auth/UserList"
            | "/etcdserverpb.Auth/RoleGet"
            | "/etcdserverpb.Auth/RoleList"
            | "/v3electionpb.Election/Leader"
            | "/grpc.health.v1.Health/Check"
    )
}

/// Reads a client's whole request body (a unary call: one message), its size checked against
/// `limits`; the answer to give the client when it cannot be read.
pub(crate) async fn collect_request(
    body: ClientBody,
    limits: Limits,
) -> Result<Bytes, Response<ResponseBody>> {
    // The scanner refuses a message over a limit as soon as its prefix arrives; `Limited`
    // bounds a body of many messages (not gRPC for a unary call, but it must not grow memory).
    let checked = RequestBody::client(body, limits, None);
    match http_body_util::Limited::new(checked, limits.request + 5)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(match e.downcast::<RequestBodyError>() {
            Ok(e) => match *e {
                RequestBodyError::Refused(status) => status_response(status.code, &status.message),
                // The client reset its call: nobody is left to answer.
                RequestBodyError::Client(e) => {
                    status_response(CANCELLED, &format!("client stream: {e}"))
                }
            },
            Err(_) => status_response(
                RESOURCE_EXHAUSTED,
                &format!(
                    "grpc: received message larger than max (more than {} bytes)",
                    limits.request
                ),
            ),
        }),
    }
}

/// Members a read is sent to at most, when each fails it.
const READ_ATTEMPTS: usize = 3;

/// Sends a read ([`is_read`]) to a member, and again to another one when the member's
/// connection breaks before it answers or it answers `UNAVAILABLE` at once (stopping, no
/// leader). The request is read whole first (reads are small) so that it can be sent again.
async fn send_read(
    upstream: &Upstream,
    limits: Limits,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let (parts, body) = req.into_parts();
    let body = match collect_request(body, limits).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    match send_buffered_read(upstream, &parts, body).await {
        Ok(resp) => resp.map(|inner| ResponseBody::upstream(inner, limits)),
        Err(refusal) => refusal,
    }
}

/// [`send_read`] of a request already read whole (`body`, sent with the head `parts`):
/// etcd's answer head, its body still to read, or the answer to give the client when no
/// member answered.
pub(crate) async fn send_buffered_read(
    upstream: &Upstream,
    parts: &hyper::http::request::Parts,
    body: Bytes,
) -> Result<Response<UpstreamBody>, Response<ResponseBody>> {
    let mut avoid: Option<String> = None;
    for attempt in 1..=READ_ATTEMPTS {
        let req = crate::resume::rebuild(parts, RequestBody::Buffered(Some(body.clone())));
        match upstream.send_stream(req, avoid.as_deref()).await {
            Ok((resp, member)) => {
                let refused = crate::resume::grpc_status(resp.headers()) == Some(UNAVAILABLE);
                if !refused || attempt == READ_ATTEMPTS {
                    return Ok(resp);
                }
                tracing::debug!(
                    member = member.name(),
                    path = parts.uri.path(),
                    "member answered a read with UNAVAILABLE; asking another"
                );
                avoid = Some(member.name().to_string());
            }
            Err(SendError::Failed { member, source }) if attempt < READ_ATTEMPTS => {
                tracing::debug!(member = %member, error = %source, path = parts.uri.path(), "member failed a read; asking another");
                avoid = Some(member);
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot forward a gRPC call");
                return Err(status_response(UNAVAILABLE, &e.to_string()));
            }
        }
    }
    Err(status_response(
        UNAVAILABLE,
        "no etcd member answered the read",
    ))
}

/// Sends `req` to a member and relays its answer as is (its messages checked against
/// `limits.recv`).
pub(crate) async fn send(
    upstream: &Upstream,
    limits: Limits,
    req: Request<RequestBody>,
) -> Response<ResponseBody> {
    match upstream.send(req).await {
        Ok(resp) => resp.map(|inner| ResponseBody::upstream(inner, limits)),
        Err(e) => send_error(e),
    }
}

fn send_error(e: SendError) -> Response<ResponseBody> {
    tracing::debug!(error = %e, "cannot forward a gRPC call");
    status_response(UNAVAILABLE, &e.to_string())
}

/// The body of a response to a client: etcd's, relayed frame by frame, or none (a trailers-only
/// error response made by the proxy).
#[derive(Debug)]
pub enum ResponseBody {
    /// etcd's body and trailers. If the member's stream breaks before its trailers, the client
    /// gets `UNAVAILABLE` trailers instead of a reset stream, so it sees a gRPC status it knows
    /// to retry on rather than an HTTP/2 error.
    Upstream {
        /// etcd's response body.
        inner: UpstreamBody,
        /// The stream broke and the replacement trailers were sent: nothing more follows.
        failed: bool,
        /// Follows the message prefixes (`--max-recv-bytes`).
        scan: MessageLimit,
    },
    /// No body: the status is in the response headers.
    Empty,
    /// etcd's body with its messages rewritten.
    Rewritten(ResponseStream),
    /// Frames written by the proxy (a stream that survives its member, [`crate::resume`]);
    /// the last one is the trailers.
    Channel(tokio::sync::mpsc::Receiver<Frame<Bytes>>),
    /// A whole answer made by the proxy (MemberList under `--resolver-prefix`): one framed
    /// message, then the trailers.
    Local {
        /// The framed message, until sent.
        message: Option<Bytes>,
        /// The trailers, until sent.
        trailers: Option<HeaderMap>,
    },
}

impl ResponseBody {
    /// etcd's body relayed as is, its messages checked against `limits.recv`.
    pub(crate) fn upstream(inner: UpstreamBody, limits: Limits) -> ResponseBody {
        ResponseBody::Upstream {
            inner,
            failed: false,
            scan: MessageLimit::new(limits.recv),
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ResponseBody::Empty => Poll::Ready(None),
            ResponseBody::Rewritten(stream) => Pin::new(stream).poll_frame(cx),
            ResponseBody::Channel(rx) => rx.poll_recv(cx).map(|f| f.map(Ok)),
            ResponseBody::Local { message, trailers } => {
                if let Some(m) = message.take() {
                    return Poll::Ready(Some(Ok(Frame::data(m))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ResponseBody::Upstream {
                inner,
                failed,
                scan,
            } => {
                if *failed {
                    return Poll::Ready(None);
                }
                match ready!(Pin::new(inner).poll_frame(cx)) {
                    Some(Ok(frame)) => {
                        if let Some(data) = frame.data_ref()
                            && let Err(e) = scan.scan(data)
                        {
                            // Dropping etcd's body on the way out resets its stream.
                            *failed = true;
                            return Poll::Ready(Some(Ok(Frame::trailers(status_headers(
                                RESOURCE_EXHAUSTED,
                                &e.to_string(),
                            )))));
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    None => Poll::Ready(None),
                    Some(Err(e)) => {
                        *failed = true;
                        let message = format!("connection to etcd member broke: {e}");
                        tracing::debug!(error = %e, "upstream stream broke; ending the call with UNAVAILABLE");
                        Poll::Ready(Some(Ok(Frame::trailers(status_headers(
                            UNAVAILABLE,
                            &message,
                        )))))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Empty => true,
            ResponseBody::Rewritten(stream) => stream.is_end_stream(),
            ResponseBody::Channel(rx) => rx.is_closed() && rx.is_empty(),
            ResponseBody::Local { message, trailers } => message.is_none() && trailers.is_none(),
            ResponseBody::Upstream { inner, failed, .. } => *failed || inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Empty => SizeHint::with_exact(0),
            // A whole body without trailers (the HTTP/JSON API's answers): its length is known,
            // so HTTP/1.1 clients get a Content-Length as from etcd.
            ResponseBody::Local {
                message,
                trailers: None,
            } => SizeHint::with_exact(message.as_ref().map_or(0, |m| m.len() as u64)),
            ResponseBody::Rewritten(_) | ResponseBody::Channel(_) | ResponseBody::Local { .. } => {
                SizeHint::default()
            }
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

/// A whole gRPC answer made by the proxy: one framed message, then OK trailers.
pub(crate) fn local_response(message: &[u8]) -> Response<ResponseBody> {
    let mut framed = bytes::BytesMut::new();
    rewrite::encode_frame(message, &mut framed);
    let mut response = Response::new(ResponseBody::Local {
        message: Some(framed.freeze()),
        trailers: Some(status_headers(0, "")),
    });
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// A trailers-only gRPC response (HTTP 200, status in the headers, no body), as gRPC servers
/// answer a call they fail before any message.
pub fn status_response(code: u16, message: &str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::Empty);
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.extend(status_headers(code, message));
    resp
}

pub(crate) fn status_headers(code: u16, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert("grpc-status", HeaderValue::from(code));
    // Percent-encoding leaves only visible ASCII, which is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
    headers
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_methods_are_rewritten_only_with_a_namespace() {
        for path in [
            "/etcdserverpb.KV/Range",
            "/etcdserverpb.KV/Txn",
            "/etcdserverpb.Lease/LeaseTimeToLive",
            "/v3lockpb.Lock/Lock",
            "/v3electionpb.Election/Campaign",
        ] {
            assert!(matches!(route(path, true), Handler::Rewrite(_)), "{path}");
            assert!(
                matches!(route(path, false), Handler::Forward | Handler::Read),
                "{path}"
            );
        }
        assert_eq!(
            route("/etcdserverpb.Lease/LeaseRevoke", true),
            Handler::GuardLeaseRevoke
        );
        assert_eq!(
            route("/etcdserverpb.Lease/LeaseRevoke", false),
            Handler::Forward
        );
        for path in ["/etcdserverpb.KV/Compact", "/no.such.Service/Method"] {
            assert_eq!(route(path, true), Handler::Forward, "{path}");
        }
    }

    #[test]
    fn a_method_path_without_its_leading_slash_is_refused_in_every_mode() {
        for namespaced in [true, false] {
            for path in [
                "etcdserverpb.KV/Range",
                "etcdserverpb.Maintenance/Snapshot",
                "",
            ] {
                assert_eq!(
                    route(path, namespaced),
                    Handler::Refuse(UNIMPLEMENTED, MALFORMED_METHOD),
                    "{path:?} namespaced={namespaced}"
                );
            }
        }
    }

    #[test]
    fn a_namespaced_client_cannot_take_a_snapshot_of_the_whole_keyspace() {
        assert_eq!(
            route(SNAPSHOT_PATH, true),
            Handler::Refuse(PERMISSION_DENIED, SNAPSHOT_REFUSED)
        );
        assert_eq!(route(SNAPSHOT_PATH, false), Handler::Forward);
    }

    #[test]
    fn long_streams_resume_in_every_mode() {
        for namespaced in [true, false] {
            for (path, stream) in [
                ("/etcdserverpb.Watch/Watch", Stream::Watch),
                ("/v3electionpb.Election/Observe", Stream::Observe),
            ] {
                assert_eq!(route(path, namespaced), Handler::Resume(stream), "{path}");
            }
        }
    }

    #[test]
    fn every_method_is_forwarded_without_a_namespace_and_reads_may_be_retried() {
        for path in [
            "/etcdserverpb.KV/Put",
            "/etcdserverpb.KV/Txn",
            "/etcdserverpb.Lease/LeaseGrant",
            "/etcdserverpb.Auth/Authenticate",
            "/v3lockpb.Lock/Lock",
            "/no.such.Service/Method",
        ] {
            assert_eq!(route(path, false), Handler::Forward, "{path}");
        }
        for path in [
            "/etcdserverpb.KV/Range",
            "/etcdserverpb.Maintenance/Status",
            "/grpc.health.v1.Health/Check",
        ] {
            assert_eq!(route(path, false), Handler::Read, "{path}");
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("plain text"), "plain text");
        assert_eq!(percent_encode("100%"), "100%25");
        assert_eq!(percent_encode("a\nb"), "a%0Ab");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn status_response_is_trailers_only() {
        let resp = status_response(UNAVAILABLE, "no etcd member is reachable");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(
            resp.headers()["grpc-message"],
            "no etcd member is reachable"
        );
        assert!(resp.body().is_end_stream());
    }
}

//! The server side: a client's connection, each of its calls a future run by the connection's
//! own task on the default one-thread runtime (with `TOKIO_WORKER_THREADS` each call is a task,
//! so one busy connection can use every worker).

use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt as _};
use hyper::body::Body;
use hyper::header::{CONTENT_LENGTH, HeaderMap, HeaderValue};
use hyper::http::uri::{self, Authority, PathAndQuery, Scheme};
use hyper::{Method, Request, Response, Uri, Version};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::hpack::Field;
use super::{
    CONNECTION_WINDOW, ConnError, Core, MAX_HEADER_LIST, Pings, Role, STREAM_WINDOW, Shared,
    Stream, StreamBody, frame, send_body,
};
use crate::body::ClientBody;
use crate::serve::Service;

/// How client connections are served: the HTTP/2 settings and the keep-alive pings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub max_concurrent_streams: u32,
    /// `--grpc-keepalive-interval`: pings to clients; `None` sends none.
    pub keepalive_interval: Option<Duration>,
    /// `--grpc-keepalive-timeout`: how long a ping may go unanswered.
    pub keepalive_timeout: Duration,
    /// `--grpc-keepalive-min-time`: a client with calls open may ping this often.
    pub keepalive_min_time: Duration,
}

/// How often a client with no call open may ping (grpc-go's server, whose policy etcd uses
/// with `PermitWithoutStream=false`).
const IDLE_PING_MIN: Duration = Duration::from_secs(2 * 60 * 60);
/// Pings too soon that a connection is forgiven; the next one closes it (grpc-go's
/// `maxPingStrikes`).
const MAX_PING_STRIKES: u32 = 2;

/// Serves one HTTP/2 connection (its preface not yet read) until the client closes it,
/// `graceful` asks it to finish (GOAWAY, then the open calls end), or `hard` drops it.
pub(crate) async fn serve<I, S>(
    io: I,
    service: S,
    settings: Settings,
    graceful: &CancellationToken,
    hard: &CancellationToken,
) -> Result<(), String>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service,
{
    let shared = Arc::new(Shared::default());
    {
        let mut inner = shared.lock();
        frame::put_settings(
            &mut inner.out,
            &[
                (
                    frame::SETTINGS_MAX_CONCURRENT_STREAMS,
                    settings.max_concurrent_streams,
                ),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (frame::SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        frame::put_window_update(&mut inner.out, 0, CONNECTION_WINDOW - 65_535);
    }
    let mut core = Core::new(io, shared.clone(), true);
    let mut server = Server {
        service,
        settings,
        last_stream: 0,
        going_away: false,
        peer_going_away: false,
        calls: FuturesUnordered::new(),
        call_count: 0,
        last_ping: None,
        ping_strikes: 0,
        make_call: serve_call::<S>,
        inline: tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread,
        pings: Pings::new(
            settings.keepalive_interval,
            settings.keepalive_timeout,
            false,
            true,
        ),
    };
    let mut graceful_wait = std::pin::pin!(graceful.cancelled());
    let mut hard_wait = std::pin::pin!(hard.cancelled());
    let result = poll_fn(|cx| {
        if !server.going_away && graceful_wait.as_mut().poll(cx).is_ready() {
            server.going_away = true;
            let mut inner = shared.lock();
            frame::put_goaway(&mut inner.out, server.last_stream, frame::NO_ERROR, b"");
        }
        if server.going_away && hard_wait.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        server.poll(&mut core, cx)
    })
    .await;
    shared.lock().close("the client's connection ended");
    result
}

/// The server's side of a connection: the calls, and what decides whether new ones are taken.
struct Server<S, F> {
    service: S,
    settings: Settings,
    /// The highest stream the client opened.
    last_stream: u32,
    /// This server sent GOAWAY: no new calls.
    going_away: bool,
    /// The client sent GOAWAY: it opens no new calls.
    peer_going_away: bool,
    calls: FuturesUnordered<F>,
    call_count: u64,
    /// When the client last pinged, and how many of its pings came too soon
    /// (`--grpc-keepalive-min-time`).
    last_ping: Option<Instant>,
    ping_strikes: u32,
    /// Makes a call's future ([`serve_call`]; a parameter so that its type can be named).
    make_call: fn(S, Arc<Shared>, u32, Request<ClientBody>) -> F,
    /// Calls run as futures of this task (one-thread runtime), or as tasks.
    inline: bool,
    pings: Pings,
}

impl<S, F> Server<S, F>
where
    S: Service,
    F: Future<Output = ()> + Send + 'static,
{
    /// One turn: read and handle every frame that arrived, move every call that can move, write
    /// what they wrote; again until nothing moves. Ready when the connection is over.
    fn poll<I>(&mut self, core: &mut Core<I>, cx: &mut Context<'_>) -> Poll<Result<(), String>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        core.shared.lock().start_polling(cx.waker());
        loop {
            let mut moved = match core.poll_read(self, cx) {
                Ok(moved) => moved,
                Err(e) => return Poll::Ready(Err(core.fail(cx, self.last_stream, e))),
            };
            while let Poll::Ready(Some(())) = self.calls.poll_next_unpin(cx) {
                moved = true;
            }
            if self
                .pings
                .poll_tick(cx, &core.shared, self.call_count)
                .is_ready()
            {
                return Poll::Ready(Err(format!(
                    "keep-alive ping unanswered for {:?}",
                    self.settings.keepalive_timeout
                )));
            }
            let flushed = match core.poll_write(cx) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                Poll::Pending => false,
            };
            let mut inner = core.shared.lock();
            let idle = inner.streams.is_empty() && self.calls.is_empty();
            if flushed && idle && (core.eof || self.going_away || self.peer_going_away) {
                return Poll::Ready(Ok(()));
            }
            if core.eof {
                // The client closed the connection: its calls can no longer be answered, so they
                // end (the connection's end resets their streams, and their member streams).
                return Poll::Ready(Ok(()));
            }
            // Whatever a call writes while this task runs is written before it sleeps.
            if moved || core.has_output(&inner) {
                continue;
            }
            inner.polling = false;
            return Poll::Pending;
        }
    }
}

impl<S, F> Role for Server<S, F>
where
    S: Service,
    F: Future<Output = ()> + Send + 'static,
{
    /// A new call, or a request's trailers.
    fn on_headers(
        &mut self,
        shared: &Arc<Shared>,
        id: u32,
        flags: u8,
        fields: &mut Vec<Field>,
    ) -> Result<(), ConnError> {
        let end = flags & frame::END_STREAM != 0;
        let mut guard = shared.lock();
        let inner = &mut *guard;
        if let Some(stream) = inner.streams.get_mut(&id) {
            // Trailers of a request: gRPC has none; the stream ends.
            if !end {
                return Err(ConnError::protocol("trailers without END_STREAM"));
            }
            stream.recv_closed = true;
            if let Some(waker) = stream.recv_task.take() {
                waker.wake();
            }
            return Ok(());
        }
        if id <= self.last_stream {
            // A stream that is over (reset by this server, or refused).
            return Ok(());
        }
        self.last_stream = id;
        if self.going_away
            || inner.closed.is_some()
            || inner.streams.len() >= self.settings.max_concurrent_streams as usize
        {
            frame::put_rst_stream(&mut inner.out, id, frame::REFUSED_STREAM);
            return Ok(());
        }
        let mut head = RequestHead::default();
        for field in fields.drain(..) {
            head.add(field);
        }
        let mut refuse = |status: u16, headers: &HeaderMap| {
            let max_frame = inner.max_frame;
            let status_field = |out: &mut bytes::BytesMut| frame::encode_status(out, status);
            frame::put_headers(&mut inner.out, id, status_field, headers, true, max_frame);
            if !end {
                frame::put_rst_stream(&mut inner.out, id, frame::NO_ERROR);
            }
        };
        if head.size > MAX_HEADER_LIST {
            let status = hyper::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE.as_u16();
            refuse(status, &HeaderMap::new());
            return Ok(());
        }
        // A method path without its leading `/`, which older grpc-go (before 1.79.3,
        // CVE-2026-33186) would still route: answered as fixed grpc-go does, and never
        // forwarded (as bytes it would slip past the namespace rewrite).
        if head.malformed_path {
            let refusal = crate::forward::malformed_method();
            refuse(200, refusal.headers());
            return Ok(());
        }
        let Some(parts) = head.into_parts() else {
            frame::put_rst_stream(&mut inner.out, id, frame::PROTOCOL_ERROR);
            return Ok(());
        };
        inner.streams.insert(
            id,
            Stream {
                send_window: inner.initial_send_window,
                recv_closed: end,
                ..Stream::default()
            },
        );
        drop(guard);
        self.call_count += 1;
        let body = StreamBody {
            shared: shared.clone(),
            id,
            done: end,
            holds_ref: false,
        };
        let req = Request::from_parts(parts, ClientBody::H2(body));
        let call = (self.make_call)(self.service.clone(), shared.clone(), id, req);
        if self.inline {
            self.calls.push(call);
        } else {
            tokio::spawn(call);
        }
        Ok(())
    }

    /// etcd's keep-alive policy (grpc-go's `EnforcementPolicy`): a client may ping every
    /// `--grpc-keepalive-min-time` while it has calls open, every 2 hours otherwise; a ping
    /// that follows response data is always fine. The third ping too soon gets GOAWAY
    /// `ENHANCE_YOUR_CALM` "too_many_pings", as from etcd.
    fn on_ping(&mut self, shared: &Shared) -> Result<(), ConnError> {
        let now = Instant::now();
        let (open, sent) = {
            let mut inner = shared.lock();
            (inner.streams.len(), std::mem::take(&mut inner.sent_frames))
        };
        let last = self.last_ping.replace(now);
        if sent {
            self.ping_strikes = 0;
            return Ok(());
        }
        let Some(last) = last else {
            return Ok(());
        };
        let min = if open == 0 {
            IDLE_PING_MIN
        } else {
            self.settings.keepalive_min_time
        };
        if now.duration_since(last) < min {
            self.ping_strikes += 1;
        }
        if self.ping_strikes > MAX_PING_STRIKES {
            return Err(ConnError {
                code: frame::ENHANCE_YOUR_CALM,
                reason: "too_many_pings".into(),
            });
        }
        Ok(())
    }

    fn on_pong(&mut self) {
        self.pings.pong();
    }

    fn on_goaway(&mut self, _shared: &Shared, _last: u32) {
        self.peer_going_away = true;
    }
}

/// A request's pseudo-headers and headers, as the HPACK decoder gives them.
#[derive(Default)]
struct RequestHead {
    method: Option<Method>,
    scheme: Option<Scheme>,
    authority: Option<Authority>,
    path: Option<PathAndQuery>,
    headers: HeaderMap,
    /// RFC 9113's header list size: names, values, and 32 bytes each.
    size: usize,
    invalid: bool,
    /// `:path` does not start with `/` (no `Uri` can hold it).
    malformed_path: bool,
}

impl RequestHead {
    fn add(&mut self, field: Field) {
        let (size, ok) = match field {
            Field::Method(v) => (
                7 + v.len(),
                Method::from_bytes(&v)
                    .map(|m| self.method = Some(m))
                    .is_ok(),
            ),
            Field::Scheme(v) => (
                7 + v.len(),
                Scheme::try_from(&v[..])
                    .map(|s| self.scheme = Some(s))
                    .is_ok(),
            ),
            Field::Authority(v) => (
                10 + v.len(),
                Authority::from_maybe_shared(v)
                    .map(|a| self.authority = Some(a))
                    .is_ok(),
            ),
            Field::Path(v) if !v.starts_with(b"/") => {
                self.malformed_path = true;
                (5 + v.len(), true)
            }
            Field::Path(v) => (
                5 + v.len(),
                PathAndQuery::from_maybe_shared(v)
                    .map(|p| self.path = Some(p))
                    .is_ok(),
            ),
            // `:status`, `:protocol` (extended CONNECT is not offered), unknown ones.
            Field::OtherPseudo(n, v) => (n.len() + v.len(), false),
            Field::Header(name, value) => {
                let size = name.as_str().len() + value.len();
                if self.size + size <= MAX_HEADER_LIST {
                    self.headers.append(name, value);
                }
                (size, true)
            }
        };
        self.size += size + 32;
        self.invalid |= !ok;
    }

    /// The request's head, or `None` if a pseudo-header is missing or a field is invalid.
    fn into_parts(self) -> Option<hyper::http::request::Parts> {
        if self.invalid {
            return None;
        }
        let mut uri = uri::Parts::default();
        if let (Some(scheme), Some(authority)) = (self.scheme, self.authority) {
            uri.scheme = Some(scheme);
            uri.authority = Some(authority);
        }
        uri.path_and_query = Some(self.path?);
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = self.method?;
        parts.uri = Uri::from_parts(uri).ok()?;
        parts.version = Version::HTTP_2;
        parts.headers = self.headers;
        Some(parts)
    }
}

/// Serves one call: routes it, then writes the response (dropped, and with it the call, if
/// the client resets the stream first).
async fn serve_call<S: Service>(
    service: S,
    shared: Arc<Shared>,
    id: u32,
    req: Request<ClientBody>,
) {
    let _guard = StreamGuard {
        shared: shared.clone(),
        id,
    };
    let call = service.call(req);
    let mut call = std::pin::pin!(call);
    let resp = poll_fn(|cx| {
        if let Poll::Ready(resp) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        match shared.lock().poll_reset(id, cx) {
            Poll::Ready(()) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if let Some(resp) = resp {
        respond(&shared, id, resp).await;
    }
}

/// Writes a response: its headers at once, then its body ([`send_body`]).
async fn respond<B>(shared: &Shared, id: u32, resp: Response<B>)
where
    B: Body<Data = bytes::Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let (mut parts, body) = resp.into_parts();
    let eos = body.is_end_stream();
    if let Some(len) = body.size_hint().exact()
        && len > 0
        && !parts.headers.contains_key(CONTENT_LENGTH)
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    {
        let mut inner = shared.lock();
        let inner = &mut *inner;
        let Some(stream) = inner.streams.get_mut(&id) else {
            return;
        };
        if stream.reset.is_some() {
            return;
        }
        stream.send_closed = eos;
        let max_frame = inner.max_frame;
        let status = parts.status.as_u16();
        let status_field = |out: &mut bytes::BytesMut| frame::encode_status(out, status);
        frame::put_headers(
            &mut inner.out,
            id,
            status_field,
            &parts.headers,
            eos,
            max_frame,
        );
        inner.sent_frames = true;
        inner.notify();
    }
    if !eos {
        send_body(shared, id, body).await;
    }
}

/// Removes a call's stream when its call is over (done, or dropped with its connection).
struct StreamGuard {
    shared: Arc<Shared>,
    id: u32,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.shared.lock().remove(self.id, frame::NO_ERROR);
    }
}

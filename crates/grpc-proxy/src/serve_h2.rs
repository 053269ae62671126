//! One client connection, served: HTTP/2 (every gRPC client, and HTTP clients that speak it) with
//! the `h2` crate directly, HTTP/1.1 (curl, the HTTP/JSON API's WebSocket) with hyper.
//!
//! Why not hyper for HTTP/2 too: hyper spawns a task for every call and hands each call between
//! tasks; here a call is a future polled by its connection's own task (on the default
//! one-thread runtime), so a call costs no task, no channel and no extra wake-up. With
//! `TOKIO_WORKER_THREADS` set (a multi-thread runtime) each call is spawned, so one busy
//! connection can use every worker, as with hyper.

use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::stream::{FuturesUnordered, StreamExt as _};
use h2::server::SendResponse;
use hyper::body::Body;
use hyper::header::{CONTENT_LENGTH, HeaderValue};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::body::ClientBody;
use crate::h2io::{Pipe, RecvBody};

/// The first bytes of every HTTP/2 connection (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Flow-control window of each client stream: a large request (up to `--max-request-bytes`)
/// arrives without waiting for window updates.
const STREAM_WINDOW: u32 = 1 << 20;
/// Flow-control window of a whole client connection.
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Largest header block a client may send, hyper's default (a gRPC call's is well under 1 KiB,
/// with a token).
const MAX_HEADER_LIST: u32 = 16 << 10;

/// How client connections are served: the HTTP/2 settings and pings, and the service every
/// request (HTTP/2 or HTTP/1.1) goes to.
pub(crate) struct Server<S> {
    pub service: S,
    pub max_concurrent_streams: u32,
    /// `--grpc-keepalive-interval`: pings to clients; `None` sends none.
    pub keepalive_interval: Option<Duration>,
    /// `--grpc-keepalive-timeout`: how long a ping may go unanswered.
    pub keepalive_timeout: Duration,
}

/// Serves a request and returns its response (the proxy's router).
pub(crate) trait Service: Clone + Send + Sync + 'static {
    type Body: Body<
            Data = Bytes,
            Error: Into<Box<dyn std::error::Error + Send + Sync>> + std::fmt::Display,
        > + Unpin
        + Send
        + 'static;
    fn call(&self, req: Request<ClientBody>) -> impl Future<Output = Response<Self::Body>> + Send;
}

impl<S: Service> Server<S> {
    /// Serves `io` until the client closes it, `graceful` asks it to finish (GOAWAY, then the
    /// open calls end), or `hard` drops it. `alpn_h2` says TLS ALPN chose HTTP/2;
    /// otherwise the first bytes tell.
    pub async fn serve<I>(
        &self,
        io: I,
        alpn_h2: bool,
        graceful: &CancellationToken,
        hard: &CancellationToken,
    ) -> Result<(), String>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut io = Rewind::new(io);
        let is_h2 = alpn_h2 || {
            let sniff = io.sniff_preface();
            tokio::select! {
                r = sniff => r.map_err(|e| e.to_string())?,
                () = graceful.cancelled() => return Ok(()),
            }
        };
        if is_h2 {
            self.serve_h2(io, graceful, hard).await
        } else {
            self.serve_http1(io, graceful, hard).await
        }
    }

    async fn serve_http1<I>(
        &self,
        io: Rewind<I>,
        graceful: &CancellationToken,
        hard: &CancellationToken,
    ) -> Result<(), String>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = self.service.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let service = service.clone();
            async move {
                Ok::<_, std::convert::Infallible>(service.call(req.map(ClientBody::from)).await)
            }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        let mut conn = std::pin::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = graceful.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = hard.cancelled() => Ok(()),
                }
            }
        };
        result.map_err(|e| e.to_string())
    }

    async fn serve_h2<I>(
        &self,
        io: Rewind<I>,
        graceful: &CancellationToken,
        hard: &CancellationToken,
    ) -> Result<(), String>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io);
        let mut conn = tokio::select! {
            r = handshake => r.map_err(|e| e.to_string())?,
            () = graceful.cancelled() => return Ok(()),
        };
        let mut pings = Pings::new(
            conn.ping_pong(),
            self.keepalive_interval,
            self.keepalive_timeout,
        );
        let inline = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread;
        let mut calls = FuturesUnordered::new();
        let mut graceful_wait = std::pin::pin!(graceful.cancelled());
        let mut hard_wait = std::pin::pin!(hard.cancelled());
        let mut closing = false;
        // One hand-written poll instead of a `select!`: every request that has arrived is
        // taken and every call that can move is moved before the connection is polled again,
        // so the responses of a burst of calls leave in one write, not one write each.
        let end = poll_fn(|cx| {
            loop {
                let mut moved = false;
                loop {
                    match conn.poll_accept(cx) {
                        Poll::Ready(Some(Ok((req, respond)))) => {
                            pings.active();
                            let call = serve_call(self.service.clone(), req, respond);
                            if inline {
                                calls.push(call);
                            } else {
                                tokio::spawn(call);
                            }
                            moved = true;
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.to_string())),
                        // Closed (after a GOAWAY, once its streams ended).
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Pending => break,
                    }
                }
                while let Poll::Ready(Some(())) = calls.poll_next_unpin(cx) {
                    moved = true;
                }
                if !moved {
                    break;
                }
            }
            if pings.poll_tick(cx).is_ready() {
                return Poll::Ready(Err(format!(
                    "keep-alive ping unanswered for {:?}",
                    self.keepalive_timeout
                )));
            }
            if !closing && graceful_wait.as_mut().poll(cx).is_ready() {
                closing = true;
                conn.graceful_shutdown();
                // Poll again: the GOAWAY is to be written.
                cx.waker().wake_by_ref();
            }
            if closing && hard_wait.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            Poll::Pending
        });
        end.await
    }
}

/// Serves one HTTP/2 call: routes it, then writes the response (dropped, and with it the
/// call, if the client resets the stream first).
async fn serve_call<S: Service>(
    service: S,
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let req = req.map(|body| ClientBody::H2(RecvBody::new(body)));
    let call = service.call(req);
    let mut call = std::pin::pin!(call);
    let resp = poll_fn(|cx| {
        if let Poll::Ready(resp) = call.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        match respond.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    let Some(resp) = resp else {
        return;
    };
    let (mut parts, body) = resp.into_parts();
    let eos = body.is_end_stream();
    if let Some(len) = body.size_hint().exact()
        && len > 0
        && !parts.headers.contains_key(CONTENT_LENGTH)
    {
        parts.headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    let Ok(send) = respond.send_response(Response::from_parts(parts, ()), eos) else {
        return;
    };
    if !eos {
        Pipe::new(body, send).await;
    }
}

/// HTTP/2 keep-alive pings to a client (`--grpc-keepalive-interval`/`-timeout`): one after an
/// interval in which no call arrived.
struct Pings {
    pong: Option<h2::PingPong>,
    interval: Option<Duration>,
    timeout: Duration,
    /// Fires when the next ping is due, or (while one is out) when it times out. One timer for
    /// the connection's life, moved rather than made anew.
    timer: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
    /// Calls so far, and when the timer last fired: counted rather than timed, so a call
    /// costs no clock read.
    calls: u64,
    calls_seen: u64,
}

impl Pings {
    fn new(pong: Option<h2::PingPong>, interval: Option<Duration>, timeout: Duration) -> Pings {
        let first = tokio::time::Instant::now() + interval.unwrap_or(Duration::from_secs(1));
        Pings {
            pong,
            interval,
            timeout,
            timer: Box::pin(tokio::time::sleep_until(first)),
            waiting: false,
            calls: 0,
            calls_seen: 0,
        }
    }

    /// A call arrived: the connection is alive.
    fn active(&mut self) {
        self.calls += 1;
    }

    /// Sends pings as they are due; ready with `true` when one went unanswered for the
    /// timeout. Never ready without keep-alive.
    fn poll_tick(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let (Some(interval), Some(pong)) = (self.interval, self.pong.as_mut()) else {
            return Poll::Pending;
        };
        loop {
            if self.waiting {
                if let Poll::Ready(r) = pong.poll_pong(cx) {
                    self.waiting = false;
                    if r.is_err() {
                        // The connection is closing: its own error ends it.
                        self.interval = None;
                        return Poll::Pending;
                    }
                    let next = tokio::time::Instant::now() + interval;
                    self.timer.as_mut().reset(next);
                    continue;
                }
                std::task::ready!(self.timer.as_mut().poll(cx));
                return Poll::Ready(true);
            }
            std::task::ready!(self.timer.as_mut().poll(cx));
            let now = tokio::time::Instant::now();
            if self.calls != self.calls_seen {
                self.calls_seen = self.calls;
                self.timer.as_mut().reset(now + interval);
                continue;
            }
            if pong.send_ping(h2::Ping::opaque()).is_err() {
                self.interval = None;
                return Poll::Pending;
            }
            self.waiting = true;
            self.timer.as_mut().reset(now + self.timeout);
        }
    }
}

/// A connection whose first bytes were read to tell HTTP/2 from HTTP/1.1, and are read again
/// by whichever serves it.
pub(crate) struct Rewind<I> {
    prefix: Bytes,
    inner: I,
}

impl<I: AsyncRead + Unpin> Rewind<I> {
    fn new(inner: I) -> Rewind<I> {
        Rewind {
            prefix: Bytes::new(),
            inner,
        }
    }

    /// Reads until the bytes so far are HTTP/2's preface, or cannot be; true if they are.
    async fn sniff_preface(&mut self) -> io::Result<bool> {
        let mut buf = BytesMut::with_capacity(PREFACE.len());
        while buf.len() < PREFACE.len() {
            let n = (&mut self.inner)
                .take((PREFACE.len() - buf.len()) as u64)
                .read_buf(&mut buf)
                .await?;
            if n == 0 || buf[..] != PREFACE[..buf.len()] {
                break;
            }
        }
        let is_h2 = buf[..] == *PREFACE;
        self.prefix = buf.freeze();
        Ok(is_h2)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.has_remaining() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

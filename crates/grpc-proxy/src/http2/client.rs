//! The client side: a connection to an etcd member ([`handshake`]), driven by its own task
//! ([`Connection`]), and the handle calls are sent with ([`SendHandle`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::Body;
use hyper::header::HeaderMap;
use hyper::{Response, StatusCode, Version};
use tokio::io::{AsyncRead, AsyncWrite};

use super::hpack::Field;
use super::{
    CONNECTION_WINDOW, ConnError, Core, Inner, MAX_HEADER_LIST, PREFACE, Pings, Role,
    STREAM_WINDOW, Shared, Stream, StreamBody, StreamError, frame, register, send_body,
};

/// Highest stream id (RFC 9113, section 5.1.1): a connection that reaches it opens no more.
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// `--dial-keepalive-*` and `--permit-without-stream`: HTTP/2 pings to a member.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keepalive {
    /// Interval between pings; `None` sends none.
    pub interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection is dropped.
    pub timeout: Duration,
    /// Ping also a connection that carried no call since the last ping. etcd (grpc-go) counts
    /// such pings against a client that did not ask for this, and closes its connection
    /// (`too_many_pings`) after a few.
    pub while_idle: bool,
}

/// Starts HTTP/2 on `io` (a connection to a member): the preface and settings are written by
/// the connection's first poll; calls may be sent at once.
pub(crate) fn handshake<I>(io: I, keepalive: Keepalive) -> (SendHandle, Connection<I>)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let shared = Arc::new(Shared::default());
    {
        let mut inner = shared.lock();
        inner.out.extend_from_slice(PREFACE);
        frame::put_settings(
            &mut inner.out,
            &[
                (frame::SETTINGS_ENABLE_PUSH, 0),
                (frame::SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (frame::SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST as u32),
            ],
        );
        frame::put_window_update(&mut inner.out, 0, CONNECTION_WINDOW - 65_535);
    }
    let conn = Connection {
        core: Core::new(io, shared.clone(), false),
        role: Client {
            pings: Pings::new(
                keepalive.interval,
                keepalive.timeout,
                true,
                keepalive.while_idle,
            ),
        },
        ended: None,
    };
    (SendHandle { shared }, conn)
}

/// Sends calls on a member connection.
#[derive(Clone)]
pub(crate) struct SendHandle {
    shared: Arc<Shared>,
}

impl SendHandle {
    /// Ready when a call can be sent: an error if the connection is closed or going away (the
    /// call was not sent: another member may take it), pending while the member's stream limit
    /// is reached.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<Result<(), StreamError>> {
        let mut inner = self.shared.lock();
        if let Some(why) = &inner.closed {
            return Poll::Ready(Err(StreamError::Closed(why.clone())));
        }
        if inner.going_away {
            return Poll::Ready(Err(StreamError::Closed(Arc::from(
                "the member is closing the connection (GOAWAY)",
            ))));
        }
        if inner.streams.len() >= inner.peer_max_streams {
            inner.stream_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }

    /// Sends a call: its headers at once, its body as far as it goes without waiting (a unary
    /// call's whole message), the rest from a task of its own. The request's URI must carry
    /// scheme, authority and path.
    pub fn send<B>(
        &self,
        parts: hyper::http::request::Parts,
        body: B,
    ) -> Result<ResponseFuture, StreamError>
    where
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: std::fmt::Display,
    {
        let eos = body.is_end_stream();
        let id = {
            let mut inner = self.shared.lock();
            let inner = &mut *inner;
            if let Some(why) = &inner.closed {
                return Err(StreamError::Closed(why.clone()));
            }
            if inner.going_away || inner.next_stream > MAX_STREAM_ID {
                inner.going_away = true;
                return Err(StreamError::Closed(Arc::from(
                    "the connection takes no new streams",
                )));
            }
            let id = inner.next_stream;
            inner.next_stream += 2;
            let uri = &parts.uri;
            let https = uri.scheme_str() == Some("https");
            let authority = uri.authority().map_or("", |a| a.as_str());
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            let method = parts.method.as_str();
            let pseudo = |out: &mut bytes::BytesMut| {
                frame::encode_request(
                    out,
                    method.as_bytes(),
                    https,
                    authority.as_bytes(),
                    path.as_bytes(),
                )
            };
            let max_frame = inner.max_frame;
            frame::put_headers(&mut inner.out, id, pseudo, &parts.headers, eos, max_frame);
            inner.streams.insert(
                id,
                Stream {
                    send_window: inner.initial_send_window,
                    send_closed: eos,
                    refs: if eos { 1 } else { 2 },
                    ..Stream::default()
                },
            );
            inner.notify();
            id
        };
        if !eos {
            let shared = self.shared.clone();
            let pipe = async move {
                let _holder = RefHolder {
                    shared: shared.clone(),
                    id,
                };
                send_body(&shared, id, body).await;
            };
            let mut pipe = Box::pin(pipe);
            let waker = futures::task::noop_waker();
            if pipe
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending()
            {
                tokio::spawn(pipe);
            }
        }
        Ok(ResponseFuture {
            shared: self.shared.clone(),
            id,
            done: false,
        })
    }
}

/// A member's response to a call: its head, then its body as a [`StreamBody`].
pub(crate) struct ResponseFuture {
    shared: Arc<Shared>,
    id: u32,
    /// The head was taken (and the stream's reference with it), or the call failed.
    done: bool,
}

impl Future for ResponseFuture {
    type Output = Result<Response<StreamBody>, StreamError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut inner = this.shared.lock();
        let inner = &mut *inner;
        let Some(stream) = inner.streams.get_mut(&this.id) else {
            this.done = true;
            return Poll::Ready(Err(inner.gone()));
        };
        if let Some(parts) = stream.head.take() {
            this.done = true;
            let body = StreamBody {
                shared: this.shared.clone(),
                id: this.id,
                done: false,
                holds_ref: true,
            };
            return Poll::Ready(Ok(Response::from_parts(parts, body)));
        }
        if let Some(e) = stream.reset.clone() {
            this.done = true;
            release_ref(inner, this.id);
            return Poll::Ready(Err(e));
        }
        register(&mut stream.recv_task, cx);
        Poll::Pending
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        if !self.done {
            release_ref(&mut self.shared.lock(), self.id);
        }
    }
}

/// One holder of a client stream is done with it: the last one removes it.
pub(super) fn release_ref(inner: &mut Inner, id: u32) {
    if let Some(stream) = inner.streams.get_mut(&id) {
        stream.refs = stream.refs.saturating_sub(1);
        if stream.refs == 0 {
            inner.remove(id, frame::CANCEL);
        }
    }
}

/// Holds a client stream's reference for the request body's writer.
struct RefHolder {
    shared: Arc<Shared>,
    id: u32,
}

impl Drop for RefHolder {
    fn drop(&mut self) {
        release_ref(&mut self.shared.lock(), self.id);
    }
}

/// A member connection's task: ready when the connection ends (the member closed it, it broke,
/// or a keep-alive ping went unanswered). Dropping it closes the connection; its calls fail.
pub(crate) struct Connection<I> {
    core: Core<I>,
    role: Client,
    /// Why the connection ended, for the calls still open.
    ended: Option<String>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Future for Connection<I> {
    type Output = Result<(), String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        let this = self.get_mut();
        let result = this.poll_inner(cx);
        if let Poll::Ready(r) = &result {
            this.ended = Some(match r {
                Ok(()) => "the member closed the connection".to_string(),
                Err(e) => e.clone(),
            });
        }
        result
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Connection<I> {
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        let core = &mut self.core;
        core.shared.lock().start_polling(cx.waker());
        loop {
            let moved = match core.poll_read(&mut self.role, cx) {
                Ok(moved) => moved,
                Err(e) => return Poll::Ready(Err(core.fail(cx, 0, e))),
            };
            let calls = u64::from(core.shared.lock().next_stream);
            if self
                .role
                .pings
                .poll_tick(cx, &core.shared, calls)
                .is_ready()
            {
                return Poll::Ready(Err(format!(
                    "keep-alive ping unanswered for {:?}",
                    self.role.pings.timeout
                )));
            }
            let flushed = match core.poll_write(cx) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.to_string())),
                Poll::Pending => false,
            };
            let mut inner = core.shared.lock();
            if core.eof {
                return Poll::Ready(Ok(()));
            }
            if flushed && inner.going_away && inner.streams.is_empty() {
                return Poll::Ready(Ok(()));
            }
            if moved || core.has_output(&inner) {
                continue;
            }
            inner.polling = false;
            return Poll::Pending;
        }
    }
}

impl<I> Drop for Connection<I> {
    fn drop(&mut self) {
        let why = self
            .ended
            .as_deref()
            .unwrap_or("the connection was dropped");
        self.core.shared.lock().close(why);
    }
}

/// The client's side of a connection.
struct Client {
    pings: Pings,
}

impl Role for Client {
    /// A response's head, or its trailers.
    fn on_headers(
        &mut self,
        shared: &Arc<Shared>,
        id: u32,
        flags: u8,
        fields: &mut Vec<Field>,
    ) -> Result<(), ConnError> {
        let end = flags & frame::END_STREAM != 0;
        let mut inner = shared.lock();
        let inner = &mut *inner;
        // A stream this side reset or gave up: its headers only kept the HPACK table in step.
        let Some(stream) = inner.streams.get_mut(&id) else {
            return Ok(());
        };
        let mut status = None;
        let mut headers = HeaderMap::new();
        let mut valid = true;
        // RFC 9113's header list size, bounded as for requests.
        let mut size = 0;
        for field in fields.drain(..) {
            match field {
                Field::Header(name, value) => {
                    size += name.as_str().len() + value.len() + 32;
                    valid &= size <= MAX_HEADER_LIST;
                    if valid {
                        headers.append(name, value);
                    }
                }
                Field::OtherPseudo(name, value) if &name[..] == b":status" => {
                    status = StatusCode::from_bytes(&value).ok();
                    valid &= status.is_some();
                }
                _ => valid = false,
            }
        }
        if !stream.head_received {
            match status {
                Some(status) if valid => {
                    let (mut parts, ()) = Response::new(()).into_parts();
                    parts.status = status;
                    parts.version = Version::HTTP_2;
                    parts.headers = headers;
                    stream.head = Some(parts);
                    stream.head_received = true;
                }
                _ => {
                    stream.reset = Some(StreamError::Reset(frame::PROTOCOL_ERROR));
                    frame::put_rst_stream(&mut inner.out, id, frame::PROTOCOL_ERROR);
                    inner.notify();
                    if let Some(stream) = inner.streams.get_mut(&id) {
                        stream.wake();
                    }
                    return Ok(());
                }
            }
        } else {
            if !end || status.is_some() || !valid {
                return Err(ConnError::protocol("invalid trailers"));
            }
            stream.trailers = Some(headers);
        }
        if end {
            stream.recv_closed = true;
        }
        if let Some(waker) = stream.recv_task.take() {
            waker.wake();
        }
        Ok(())
    }

    fn on_ping(&mut self, _shared: &Shared) -> Result<(), ConnError> {
        Ok(())
    }

    fn on_pong(&mut self) {
        self.pings.pong();
    }

    fn on_goaway(&mut self, shared: &Shared, last: u32) {
        let mut inner = shared.lock();
        inner.going_away = true;
        for (&id, stream) in inner.streams.iter_mut() {
            if id > last && stream.reset.is_none() {
                // Never processed: the member says so.
                stream.reset = Some(StreamError::Reset(frame::REFUSED_STREAM));
                stream.wake();
            }
        }
        for waker in inner.stream_waiters.drain(..) {
            waker.wake();
        }
    }
}

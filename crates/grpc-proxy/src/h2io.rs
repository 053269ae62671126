//! The two pieces that join an `h2` stream to the `http_body::Body` type every handler uses, on
//! both sides of the proxy: [`RecvBody`] reads a stream (a client's request, a member's
//! response), and [`Pipe`] writes a body into a stream (a request to a member, a response to a
//! client).
//!
//! The proxy drives the `h2` crate itself, not through hyper: hyper spawns a task per call on
//! each side and hands every call between its tasks over channels, which was a third of the
//! proxy's CPU per call (docs/benchmarks.md). With `h2` directly, a call is one future polled by
//! its client connection's task, writing into the member connection's stream store.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use hyper::body::{Body, Frame, SizeHint};

/// The body of an `h2` stream as an `http_body::Body`: its DATA frames, then its trailers.
/// Received bytes are handed back to the stream's flow-control window as they are read, so
/// the peer may send more.
#[derive(Debug)]
pub struct RecvBody {
    inner: RecvStream,
    /// The DATA frames are over (the trailers, if any, come next).
    data_done: bool,
    /// The trailers were read, or the stream ended without them.
    done: bool,
}

impl RecvBody {
    pub fn new(inner: RecvStream) -> RecvBody {
        let done = inner.is_end_stream();
        RecvBody {
            inner,
            data_done: done,
            done,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.inner.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Only fails once the stream is gone, which the next poll reports.
                    let _ = this.inner.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.inner.poll_trailers(cx));
        this.done = true;
        match trailers {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

/// Writes a body into an `h2` stream: its data as the stream's flow-control window allows (so a
/// slow reader holds the body back instead of growing a buffer), then its trailers or the end
/// of the stream. Ends early, dropping the body, when the peer resets the stream; a body that
/// fails resets it.
pub struct Pipe<B> {
    body: B,
    send: SendStream<Bytes>,
    /// Data taken from the body and not yet sent, with whether it ends the stream.
    pending: Option<(Bytes, bool)>,
}

impl<B> Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    pub fn new(body: B, send: SendStream<Bytes>) -> Pipe<B> {
        Pipe {
            body,
            send,
            pending: None,
        }
    }
}

impl<B> Future for Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            // The reader reset the stream (a client cancelled its call, a member dropped it):
            // nothing more is wanted.
            if let Poll::Ready(reset) = this.send.poll_reset(cx) {
                tracing::trace!(reason = ?reset.ok(), "peer reset the stream being written");
                return Poll::Ready(());
            }
            if let Some((data, eos)) = &mut this.pending {
                if this.send.capacity() == 0 {
                    this.send.reserve_capacity(data.len());
                    if this.send.capacity() == 0 {
                        match ready!(this.send.poll_capacity(cx)) {
                            Some(Ok(_)) => continue,
                            // The stream or connection is gone.
                            None | Some(Err(_)) => return Poll::Ready(()),
                        }
                    }
                }
                let n = this.send.capacity().min(data.len());
                let chunk = data.split_to(n);
                let last = data.is_empty();
                let end = last && *eos;
                if last {
                    this.pending = None;
                }
                if this.send.send_data(chunk, end).is_err() || end {
                    return Poll::Ready(());
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if data.has_remaining() {
                            let eos = this.body.is_end_stream();
                            this.pending = Some((data, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            let _ = this.send.send_trailers(trailers);
                            return Poll::Ready(());
                        }
                    }
                },
                None => {
                    let _ = this.send.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "body failed while being written; resetting the stream");
                    this.send.send_reset(h2::Reason::INTERNAL_ERROR);
                    return Poll::Ready(());
                }
            }
        }
    }
}

/// Writes `body` into `send`: at once as far as it goes without waiting (a unary call's whole
/// message is usually there), and the rest in a task of its own.
pub fn spawn_pipe<B>(body: B, send: SendStream<Bytes>)
where
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: std::fmt::Display,
{
    let mut pipe = Pipe::new(body, send);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    if Pin::new(&mut pipe).poll(&mut cx).is_pending() {
        tokio::spawn(pipe);
    }
}

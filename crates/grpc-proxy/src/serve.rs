//! One client connection, served: HTTP/2 (every gRPC client, and HTTP clients that speak it) by
//! the proxy's own HTTP/2 server ([`crate::http2`]), HTTP/1.1 (curl, the HTTP/JSON API's
//! WebSocket) by hyper. The first bytes (HTTP/2's preface) or TLS ALPN tell which.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use hyper::body::Body;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::body::ClientBody;
use crate::http2::{self, PREFACE};

/// How client connections are served: the HTTP/2 settings and pings, and the service every
/// request (HTTP/2 or HTTP/1.1) goes to.
pub(crate) struct Server<S> {
    pub service: S,
    pub http2: http2::Settings,
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
            let service = self.service.clone();
            http2::serve(io, service, self.http2, graceful, hard).await
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

//! The request body of a gRPC call as the handlers see it: a client's HTTP/2 body, or messages
//! made by the proxy itself (the HTTP/JSON API, [`crate::http_api`], turns JSON into gRPC calls
//! served in-process by the same handlers, so namespace, cache and coalescing apply to both).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::mpsc;

/// A gRPC call's request body.
#[derive(Debug)]
pub enum ClientBody {
    /// From a client connection.
    Http(Incoming),
    /// Framed gRPC messages written by the proxy; the sender's drop ends the body
    /// (a half-close).
    Local(mpsc::Receiver<Bytes>),
}

impl From<Incoming> for ClientBody {
    fn from(body: Incoming) -> ClientBody {
        ClientBody::Http(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Http(body) => Pin::new(body).poll_frame(cx),
            ClientBody::Local(rx) => rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Http(body) => body.is_end_stream(),
            ClientBody::Local(rx) => rx.is_closed() && rx.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Http(body) => body.size_hint(),
            ClientBody::Local(_) => SizeHint::default(),
        }
    }
}

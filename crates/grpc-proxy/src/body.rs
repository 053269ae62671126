//! The request body of a gRPC call as the handlers see it: a client's HTTP/2 or HTTP/1.1 body,
//! or messages made by the proxy itself (the HTTP/JSON API, [`crate::http_api`], turns JSON into
//! gRPC calls served in-process by the same handlers, so namespace, cache and coalescing apply
//! to both).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::sync::mpsc;

use crate::http2::{StreamBody, StreamError};

/// A gRPC call's request body.
#[derive(Debug)]
pub enum ClientBody {
    /// From a client's HTTP/2 connection (served by [`crate::http2`]).
    H2(StreamBody),
    /// From a client's HTTP/1.1 connection (served with hyper).
    Http(Incoming),
    /// Framed gRPC messages written by the proxy; the sender's drop ends the body
    /// (a half-close).
    Local(mpsc::Receiver<Bytes>),
}

/// Why a client's body could not be read: its stream or connection broke.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    H2(#[from] StreamError),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl From<Incoming> for ClientBody {
    fn from(body: Incoming) -> ClientBody {
        ClientBody::Http(body)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ClientBody::H2(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
            ClientBody::Http(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
            ClientBody::Local(rx) => rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::H2(body) => body.is_end_stream(),
            ClientBody::Http(body) => body.is_end_stream(),
            ClientBody::Local(rx) => rx.is_closed() && rx.is_empty(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::H2(body) => body.size_hint(),
            ClientBody::Http(body) => body.size_hint(),
            ClientBody::Local(_) => SizeHint::default(),
        }
    }
}

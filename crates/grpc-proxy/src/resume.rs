//! Streams that survive their member: `Watch/Watch` and `Election/Observe` (lease keep-alives
//! are served by [`crate::keepalive`], which resumes its shared streams the same way).
//!
//! Forwarded as bytes, such a stream dies with the member serving it, and the client must notice,
//! reconnect and work out where it was. Instead, each of these calls is served by a task that
//! reads both message streams ([`Policy`]) and remembers just enough to start the same stream on
//! another member at the point where the first one stopped:
//!
//! - **Watch**: every watcher's create request, its `watch_id`, and the next revision it has not
//!   seen (one past its last event, or past the revision of a progress notification or of its
//!   created response when it watches from now). On a new member each watcher is created again
//!   with the same `watch_id` and that start revision, and the new created responses are not
//!   shown to the client: it sees one stream, every event exactly once and in order. Creates and
//!   progress requests still unanswered are sent again. A watcher whose history was compacted
//!   meanwhile gets etcd's compaction cancel, as it would have from etcd.
//! - **Observe**: the request is sent again, and the new member's first answer is dropped when
//!   it is the leader the client already saw.
//!
//! The stream moves when the member's connection breaks, when etcd ends it with `UNAVAILABLE`
//! (a member shutting down, or without a leader under `hasleader`), or when the member fails its
//! health probe (a stopped member keeps the stream open and silent). Any other status ends the
//! client's call with that status. If no member takes the stream for [`GIVE_UP_AFTER`], the
//! client gets `UNAVAILABLE`.
//!
//! Under `--namespace` the same task applies the namespace both ways; what it remembers is in
//! etcd's (prefixed) form, so a replay is never prefixed twice.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use etcd_api::etcdserverpb::{
    WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
    watch_request::RequestUnion,
};
use etcd_api::v3electionpb::{LeaderRequest, LeaderResponse};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::{CONTENT_LENGTH, HeaderMap};
use hyper::http::request::Parts;
use hyper::{Request, Response};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::body::ClientBody;
use crate::forward::{ResponseBody, status_headers, status_response};
use crate::namespace::{Namespace, OutsideNamespace};
use crate::rewrite::{Decoder, GRPC_ACCEPT_ENCODING, Limits, RequestBody, encode_message};
use crate::upstream::{SendError, Upstream};

/// How long a stream may go without any member taking it before the client gets `UNAVAILABLE`.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(30);

/// gRPC codes used here.
const INTERNAL: u16 = 13;
const UNAVAILABLE: u16 = 14;

/// Messages queued towards the member; the client is read no faster than the member takes them.
const UPSTREAM_QUEUE: usize = 16;
/// Messages queued towards the client; the member is read no faster than the client takes them.
const CLIENT_QUEUE: usize = 16;

/// The streaming methods served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// `Watch/Watch`.
    Watch,
    /// `Election/Observe`.
    Observe,
}

impl Stream {
    /// The resumable stream at a gRPC path, `None` for any other method.
    pub fn from_path(path: &str) -> Option<Stream> {
        match path {
            "/etcdserverpb.Watch/Watch" => Some(Stream::Watch),
            "/v3electionpb.Election/Observe" => Some(Stream::Observe),
            _ => None,
        }
    }
}

/// What a stream remembers to be replayed on another member.
trait Policy: Send + 'static {
    type Req: Message + Default + Send;
    type Resp: Message + Default + Send;
    /// Puts a client's request in etcd's form (namespace).
    fn to_server(ns: &Namespace, req: &mut Self::Req);
    /// Puts etcd's response in the client's form (namespace).
    fn to_client(ns: &Namespace, resp: &mut Self::Resp) -> Result<(), OutsideNamespace>;
    /// Records a request (in etcd's form) going to the member.
    fn request(&mut self, req: &Self::Req);
    /// Records a response (in etcd's form), trimming what the client already saw; false when
    /// the client must not see it at all (it answers a replayed request, and the client saw
    /// the original answer).
    fn response(&mut self, resp: &mut Self::Resp) -> bool;
    /// The requests that bring a new stream to where the old one was.
    fn replay(&mut self) -> Vec<Self::Req>;
}

/// Serves one call of `stream`.
pub async fn handle(
    upstream: &Arc<Upstream>,
    namespace: Option<Namespace>,
    limits: Limits,
    stream: Stream,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    match stream {
        Stream::Watch => start(upstream, namespace, limits, Watch::default(), req).await,
        Stream::Observe => start(upstream, namespace, limits, Observe::default(), req).await,
    }
}

/// A resumable `Watch` stream driven by the proxy itself (the watch coalescer): framed
/// [`WatchRequest`]s go in through the returned sender, and etcd's answers come back as the
/// response, whose body yields framed [`WatchResponse`]s and ends with the trailers. `headers`
/// is the call's metadata (auth, `hasleader`).
pub(crate) fn watch_session(
    upstream: &Arc<Upstream>,
    headers: HeaderMap,
    limits: Limits,
) -> (
    mpsc::UnboundedSender<Bytes>,
    oneshot::Receiver<Response<ResponseBody>>,
) {
    let mut req = Request::new(());
    *req.method_mut() = hyper::Method::POST;
    *req.uri_mut() = hyper::Uri::from_static("/etcdserverpb.Watch/Watch");
    *req.headers_mut() = headers;
    let (parts, ()) = req.into_parts();
    let (tx, rx) = mpsc::unbounded_channel();
    let (head_tx, head_rx) = oneshot::channel();
    let session = Session {
        upstream: upstream.clone(),
        namespace: None,
        limits,
        policy: Watch::default(),
        parts,
        client: Client::local(rx, limits),
    };
    tokio::spawn(session.run(head_tx));
    (tx, head_rx)
}

async fn start<P: Policy>(
    upstream: &Arc<Upstream>,
    namespace: Option<Namespace>,
    limits: Limits,
    policy: P,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let (mut parts, body) = req.into_parts();
    // Lengths change; and etcd must not compress what we have to read.
    parts.headers.remove(CONTENT_LENGTH);
    parts.headers.remove(GRPC_ACCEPT_ENCODING);
    let (head_tx, head_rx) = oneshot::channel();
    let session = Session {
        upstream: upstream.clone(),
        namespace,
        limits,
        policy,
        parts,
        client: Client::new(body, limits),
    };
    tokio::spawn(session.run(head_tx));
    head_rx.await.unwrap_or_else(|_| {
        status_response(INTERNAL, "etcd-proxy: stream task ended without an answer")
    })
}

/// What the client did next.
pub(crate) enum ClientEvent<R> {
    Message(R),
    /// Half-close: no more requests.
    End,
    /// A message that cannot be read: the call ends with this status.
    Bad(u16, String),
    /// The client reset the call.
    Gone,
}

/// Where a client's request messages come from.
enum Source {
    /// A gRPC call's request body.
    Call(ClientBody),
    /// Framed messages from a task of the proxy ([`watch_session`]).
    Local(mpsc::UnboundedReceiver<Bytes>),
}

/// The client's side of the request stream.
pub(crate) struct Client {
    source: Source,
    decoder: Decoder,
    limits: Limits,
    /// The client half-closed its side.
    pub(crate) done: bool,
}

impl Client {
    /// The request stream of a call, its messages checked against `limits`.
    pub(crate) fn new(body: ClientBody, limits: Limits) -> Client {
        Client {
            source: Source::Call(body),
            decoder: Decoder::new(limits.request),
            limits,
            done: false,
        }
    }

    /// Framed requests written by the proxy itself; closing `rx`'s sender half-closes.
    fn local(rx: mpsc::UnboundedReceiver<Bytes>, limits: Limits) -> Client {
        Client {
            source: Source::Local(rx),
            decoder: Decoder::new(limits.request),
            limits,
            done: false,
        }
    }

    /// The next request. Cancel-safe: a frame is only taken when it is fully handled.
    pub(crate) async fn next<R: Message + Default>(&mut self) -> ClientEvent<R> {
        loop {
            match self.decoder.next_message() {
                Ok(Some(payload)) => {
                    if let Err(status) = self.limits.check_send(payload.len()) {
                        return ClientEvent::Bad(status.code, status.message);
                    }
                    return match R::decode(payload) {
                        Ok(m) => ClientEvent::Message(m),
                        // grpc-go's answer to a request it cannot decode.
                        Err(e) => ClientEvent::Bad(
                            INTERNAL,
                            format!("grpc: error unmarshalling request: {e}"),
                        ),
                    };
                }
                Ok(None) => {}
                Err(e) => {
                    let status = crate::rewrite::Status::from(e);
                    return ClientEvent::Bad(status.code, status.message);
                }
            }
            let frame = match &mut self.source {
                Source::Call(body) => body.frame().await,
                Source::Local(rx) => rx.recv().await.map(|data| Ok(Frame::data(data))),
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.decoder.push(&data);
                    }
                }
                Some(Err(_)) => return ClientEvent::Gone,
                None => {
                    self.done = true;
                    return match self.decoder.finish() {
                        Ok(()) => ClientEvent::End,
                        Err(e) => {
                            let status = crate::rewrite::Status::from(e);
                            ClientEvent::Bad(status.code, status.message)
                        }
                    };
                }
            }
        }
    }
}

/// How one member's turn at the stream ended.
enum Turn {
    /// The call is over (answered with a final status, or the client left).
    Over,
    /// The member failed the stream: go on elsewhere.
    Moved {
        member: String,
        reason: String,
        /// The member had started answering (so the stream was not in an outage until now).
        served: bool,
        /// etcd's own `UNAVAILABLE` status (e.g. `etcdserver: no leader` for a `hasleader`
        /// stream), as opposed to a broken connection: what the client gets if every member
        /// answers so.
        refusal: Option<HeaderMap>,
    },
    /// No member could take the stream.
    NoMember(String),
}

struct Session<P: Policy> {
    upstream: Arc<Upstream>,
    namespace: Option<Namespace>,
    limits: Limits,
    policy: P,
    parts: Parts,
    client: Client,
}

/// The client's side of the response: its head until sent, then its body.
struct ToClient {
    head: Option<oneshot::Sender<Response<ResponseBody>>>,
    out: Option<mpsc::Sender<Frame<Bytes>>>,
}

impl ToClient {
    /// Starts the response with etcd's head (once); returns the body's sender.
    fn start(&mut self, head: hyper::http::response::Parts) -> Option<mpsc::Sender<Frame<Bytes>>> {
        if let Some(h) = self.head.take() {
            let (out, out_rx) = mpsc::channel(CLIENT_QUEUE);
            let _ = h.send(Response::from_parts(head, ResponseBody::Channel(out_rx)));
            self.out = Some(out);
        }
        self.out.clone()
    }

    /// Ends the call with etcd's final status: as a trailers-only response if nothing was sent
    /// yet, else as trailers.
    async fn end_with(&mut self, head: hyper::http::response::Parts) {
        if let Some(h) = self.head.take() {
            let _ = h.send(Response::from_parts(head, ResponseBody::Empty));
        } else if let Some(out) = self.out.take() {
            let _ = out.send(Frame::trailers(head.headers)).await;
        }
    }

    /// Ends the call with etcd's status headers (`grpc-status`, `grpc-message`, ...).
    async fn end_with_status(&mut self, status: HeaderMap) {
        if let Some(h) = self.head.take() {
            let mut resp = Response::new(ResponseBody::Empty);
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/grpc"),
            );
            resp.headers_mut().extend(status);
            let _ = h.send(resp);
        } else if let Some(out) = self.out.take() {
            let _ = out.send(Frame::trailers(status)).await;
        }
    }

    /// Ends the call with a status made by the proxy.
    async fn finish(&mut self, code: u16, message: &str) {
        if let Some(h) = self.head.take() {
            let _ = h.send(status_response(code, message));
        } else if let Some(out) = self.out.take() {
            let _ = out
                .send(Frame::trailers(status_headers(code, message)))
                .await;
        }
    }
}

impl<P: Policy> Session<P> {
    async fn run(mut self, head: oneshot::Sender<Response<ResponseBody>>) {
        let mut to_client = ToClient {
            head: Some(head),
            out: None,
        };
        let mut avoid: Option<String> = None;
        // Since when no member has served the stream.
        let mut outage: Option<Instant> = None;
        let mut pause = Duration::from_millis(50);
        // etcd's last UNAVAILABLE answer, and how many turns in a row ended with one.
        let mut refusal: Option<HeaderMap> = None;
        let mut refusals = 0;
        loop {
            let why = match self.turn(&mut to_client, avoid.as_deref()).await {
                Turn::Over => return,
                Turn::Moved {
                    member,
                    reason,
                    served,
                    refusal: refused,
                } => {
                    if refused.is_some() {
                        refusals += 1;
                        refusal = refused;
                    } else if served {
                        refusals = 0;
                        refusal = None;
                    }
                    // As many refusals in a row as there are members: etcd's answer stands
                    // (e.g. no member has a leader), and the client gets it now.
                    if let Some(status) = &refusal
                        && refusals >= self.upstream.member_count()
                    {
                        to_client.end_with_status(status.clone()).await;
                        return;
                    }
                    crate::metrics::STREAMS
                        .moved
                        .with_label_values(&[self.parts.uri.path()])
                        .inc();
                    tracing::info!(
                        method = self.parts.uri.path(),
                        member = %member,
                        reason = %reason,
                        "moving a stream to another etcd member"
                    );
                    if served {
                        outage = None;
                        pause = Duration::from_millis(50);
                    }
                    avoid = Some(member);
                    reason
                }
                Turn::NoMember(e) => {
                    if let Some(status) = refusal.take() {
                        to_client.end_with_status(status).await;
                        return;
                    }
                    e
                }
            };
            let since = *outage.get_or_insert_with(Instant::now);
            if since.elapsed() >= GIVE_UP_AFTER {
                let message = format!(
                    "etcd-proxy: no etcd member took the stream for {GIVE_UP_AFTER:?}: {why}"
                );
                to_client.finish(UNAVAILABLE, &message).await;
                return;
            }
            match &to_client.out {
                Some(out) => tokio::select! {
                    () = out.closed() => return,
                    () = tokio::time::sleep(pause) => {}
                },
                None => tokio::time::sleep(pause).await,
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// One member's turn: send the replay and then the client's requests to it, and its
    /// responses to the client, until the call ends or the member fails it.
    async fn turn(&mut self, to_client: &mut ToClient, avoid: Option<&str>) -> Turn {
        let (tx, rx) = mpsc::channel::<Bytes>(UPSTREAM_QUEUE);
        let mut tx = Some(tx);
        let mut outbox: VecDeque<Bytes> = self
            .policy
            .replay()
            .iter()
            .map(|m| {
                let mut out = BytesMut::new();
                encode_message(m, &mut out);
                out.freeze()
            })
            .collect();
        let req = rebuild(&self.parts, RequestBody::Channel(rx));
        let upstream = self.upstream.clone();
        let mut send = pin!(upstream.send_stream(req, avoid));

        // Until the member's response head: keep the request flowing (etcd answers a watch's
        // head with its first message).
        let (resp, serving) = loop {
            if self.client.done && outbox.is_empty() {
                tx = None; // half-close towards the member, as the client did
            }
            tokio::select! {
                r = &mut send => match r {
                    Ok(ok) => break ok,
                    Err(SendError::NoMember(names)) => {
                        return Turn::NoMember(format!("no etcd member is reachable (endpoints: {names})"));
                    }
                    Err(SendError::Failed { member, source }) => {
                        return Turn::Moved { member, reason: source.to_string(), served: false, refusal: None };
                    }
                },
                permit = reserve(&tx), if !outbox.is_empty() => match permit {
                    Some(p) => p.send(outbox.pop_front().unwrap_or_default()),
                    None => outbox.clear(),
                },
                ev = self.client.next::<P::Req>(), if outbox.is_empty() && !self.client.done => {
                    if let Some(turn) = self.on_client(ev, &mut outbox, to_client).await {
                        return turn;
                    }
                }
            }
        };

        let (head, mut body) = resp.into_parts();
        if let Some(code) = grpc_status(&head.headers) {
            // Trailers-only: etcd refused the stream outright.
            if code == UNAVAILABLE {
                return Turn::Moved {
                    member: serving.name().to_string(),
                    reason: grpc_message(&head.headers),
                    served: false,
                    refusal: Some(head.headers),
                };
            }
            to_client.end_with(head).await;
            return Turn::Over;
        }
        let Some(out) = to_client.start(head) else {
            return Turn::Over;
        };
        let moved = |reason: String| Turn::Moved {
            member: serving.name().to_string(),
            reason,
            served: true,
            refusal: None,
        };

        let mut decoder = Decoder::new(self.limits.decoded_response());
        let mut failed = pin!(serving.failed());
        let client_left = out.clone();
        let mut client_left = pin!(client_left.closed());
        loop {
            if self.client.done && outbox.is_empty() {
                tx = None;
            }
            tokio::select! {
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            decoder.push(&data);
                            if let Some(turn) = self.relay(&mut decoder, &out).await {
                                return turn;
                            }
                        }
                        Err(frame) => {
                            let trailers = frame.into_trailers().unwrap_or_default();
                            if grpc_status(&trailers) == Some(UNAVAILABLE) {
                                return Turn::Moved {
                                    member: serving.name().to_string(),
                                    reason: grpc_message(&trailers),
                                    served: true,
                                    refusal: Some(trailers),
                                };
                            }
                            let _ = out.send(Frame::trailers(trailers)).await;
                            return Turn::Over;
                        }
                    },
                    Some(Err(e)) => return moved(e.to_string()),
                    None => return moved("the stream ended without a status".to_string()),
                },
                permit = reserve(&tx), if !outbox.is_empty() => match permit {
                    Some(p) => p.send(outbox.pop_front().unwrap_or_default()),
                    None => outbox.clear(),
                },
                ev = self.client.next::<P::Req>(), if outbox.is_empty() && !self.client.done => {
                    if let Some(turn) = self.on_client(ev, &mut outbox, to_client).await {
                        return turn;
                    }
                }
                () = &mut failed => return moved("the member failed its health probe".to_string()),
                () = &mut client_left => return Turn::Over,
            }
        }
    }

    /// Handles what the client did; `Some` ends the turn.
    async fn on_client(
        &mut self,
        ev: ClientEvent<P::Req>,
        outbox: &mut VecDeque<Bytes>,
        to_client: &mut ToClient,
    ) -> Option<Turn> {
        match ev {
            ClientEvent::Message(mut m) => {
                if let Some(ns) = &self.namespace {
                    P::to_server(ns, &mut m);
                }
                self.policy.request(&m);
                let mut out = BytesMut::new();
                encode_message(&m, &mut out);
                outbox.push_back(out.freeze());
                None
            }
            ClientEvent::End => None,
            ClientEvent::Bad(code, message) => {
                to_client.finish(code, &message).await;
                Some(Turn::Over)
            }
            ClientEvent::Gone => Some(Turn::Over),
        }
    }

    /// Sends the client every complete response in `decoder`; `Some` ends the turn.
    async fn relay(
        &mut self,
        decoder: &mut Decoder,
        out: &mpsc::Sender<Frame<Bytes>>,
    ) -> Option<Turn> {
        loop {
            let payload = match decoder.next_message() {
                Ok(Some(p)) => p,
                Ok(None) => return None,
                Err(e) => {
                    let status = crate::rewrite::Status::from(e);
                    let _ = out
                        .send(Frame::trailers(status_headers(
                            status.code,
                            &status.message,
                        )))
                        .await;
                    return Some(Turn::Over);
                }
            };
            let mut m = match P::Resp::decode(payload) {
                Ok(m) => m,
                Err(e) => {
                    let message = format!("grpc: failed to unmarshal etcd's response: {e}");
                    let _ = out
                        .send(Frame::trailers(status_headers(INTERNAL, &message)))
                        .await;
                    return Some(Turn::Over);
                }
            };
            if !self.policy.response(&mut m) {
                continue;
            }
            if let Some(ns) = &self.namespace
                && let Err(e) = P::to_client(ns, &mut m)
            {
                tracing::error!("etcd returned a key outside the namespace; ending the stream");
                let _ = out
                    .send(Frame::trailers(status_headers(INTERNAL, &e.to_string())))
                    .await;
                return Some(Turn::Over);
            }
            let mut framed = BytesMut::new();
            encode_message(&m, &mut framed);
            if out.send(Frame::data(framed.freeze())).await.is_err() {
                return Some(Turn::Over);
            }
        }
    }
}

/// A request to the member with the client's method, path and metadata, and `body`.
pub(crate) fn rebuild(parts: &Parts, body: RequestBody) -> Request<RequestBody> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

/// Room for one more message towards the member; `None` once the member's side is closed.
async fn reserve(tx: &Option<mpsc::Sender<Bytes>>) -> Option<mpsc::Permit<'_, Bytes>> {
    match tx {
        Some(tx) => tx.reserve().await.ok(),
        None => None,
    }
}

/// The `grpc-status` of a head or trailers.
pub(crate) fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The `grpc-message` of a head or trailers, for logs.
fn grpc_message(headers: &HeaderMap) -> String {
    headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// One client watcher, in etcd's form.
#[derive(Debug, Clone)]
struct Watcher {
    create: WatchCreateRequest,
    /// The first revision the client has not seen all events of.
    next: i64,
    /// Events of revision `next` the client has already seen, in fragments of a revision not
    /// yet complete.
    seen_of_next: usize,
    /// Of those, how many the current member has yet to send again (after a move).
    skip: usize,
    /// Inside a fragmented revision: its end has not come yet.
    fragmented: bool,
    /// The client asked to cancel it and has not had etcd's answer yet.
    canceling: bool,
}

/// The watch stream's memory.
#[derive(Debug, Default)]
struct Watch {
    /// Created watchers by `watch_id`, ordered so a replay is deterministic.
    watchers: BTreeMap<i64, Watcher>,
    /// Creates sent and not yet answered, in order (etcd answers them in order).
    pending: VecDeque<WatchCreateRequest>,
    /// Watchers created again on the current member, whose created response the client must
    /// not see a second time.
    recreated: HashSet<i64>,
    /// Progress requests not yet answered.
    progress: u32,
}

impl Watch {
    /// Records events for watcher `w`, dropping those the client saw before a move; false
    /// when nothing of the response is left to show.
    fn events(w: &mut Watcher, r: &mut WatchResponse) -> bool {
        if w.skip > 0 {
            let k = w.skip.min(r.events.len());
            r.events.drain(..k);
            w.skip -= k;
        }
        match r.events.last().and_then(|e| e.kv.as_ref()) {
            Some(kv) if r.fragment => {
                // Every event of a fragmented response has the same revision.
                w.next = kv.mod_revision;
                w.seen_of_next += r.events.len();
                w.fragmented = true;
            }
            Some(kv) => {
                w.next = w.next.max(kv.mod_revision + 1);
                w.seen_of_next = 0;
                w.fragmented = false;
            }
            // Everything in it was seen already: a middle fragment is dropped, a last one is
            // shown (empty) so the client's fragment sequence ends.
            None if r.fragment => return false,
            None => {
                w.next += 1;
                w.seen_of_next = 0;
                w.fragmented = false;
            }
        }
        true
    }
}

impl Policy for Watch {
    type Req = WatchRequest;
    type Resp = WatchResponse;

    fn to_server(ns: &Namespace, req: &mut WatchRequest) {
        ns.watch_request(req);
    }

    fn to_client(ns: &Namespace, resp: &mut WatchResponse) -> Result<(), OutsideNamespace> {
        ns.watch_response(resp)
    }

    fn request(&mut self, req: &WatchRequest) {
        match &req.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.pending.push_back(c.clone()),
            Some(RequestUnion::CancelRequest(c)) => {
                if let Some(w) = self.watchers.get_mut(&c.watch_id) {
                    w.canceling = true;
                }
            }
            Some(RequestUnion::ProgressRequest(_)) => self.progress += 1,
            None => {}
        }
    }

    fn response(&mut self, r: &mut WatchResponse) -> bool {
        let revision = r.header.as_ref().map_or(0, |h| h.revision);
        if r.created {
            if self.recreated.remove(&r.watch_id) {
                if r.canceled {
                    // Could not be created again (its history was compacted meanwhile, or its
                    // user lost the right): the client learns it as a cancel.
                    self.watchers.remove(&r.watch_id);
                    r.created = false;
                    return true;
                }
                return false;
            }
            let Some(create) = self.pending.pop_front() else {
                return true;
            };
            if !r.canceled {
                let next = if create.start_revision > 0 {
                    create.start_revision
                } else {
                    revision + 1
                };
                self.watchers.insert(
                    r.watch_id,
                    Watcher {
                        create,
                        next,
                        seen_of_next: 0,
                        skip: 0,
                        fragmented: false,
                        canceling: false,
                    },
                );
            }
            return true;
        }
        if r.canceled {
            self.watchers.remove(&r.watch_id);
            return true;
        }
        if r.watch_id == -1 && r.events.is_empty() {
            // The answer to a progress request; in etcd 3.5 it may come before unsynced
            // watchers caught up, so it advances no watcher.
            self.progress = self.progress.saturating_sub(1);
            return true;
        }
        let Some(w) = self.watchers.get_mut(&r.watch_id) else {
            return true;
        };
        if !r.events.is_empty() {
            return Watch::events(w, r);
        }
        // A progress notification: etcd sends them to caught-up watchers only.
        if !w.fragmented {
            w.next = w.next.max(revision + 1);
        }
        true
    }

    fn replay(&mut self) -> Vec<WatchRequest> {
        let mut out = Vec::with_capacity(self.watchers.len() + self.pending.len() + 1);
        self.recreated.clear();
        for (&id, w) in &mut self.watchers {
            let mut create = w.create.clone();
            create.watch_id = id;
            create.start_revision = w.next;
            w.skip = w.seen_of_next;
            self.recreated.insert(id);
            out.push(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create)),
            });
            if w.canceling {
                // The cancel may not have reached the old member: ask the new one, whose
                // answer is the one the client waits for.
                out.push(WatchRequest {
                    request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                        watch_id: id,
                    })),
                });
            }
        }
        for create in &self.pending {
            out.push(WatchRequest {
                request_union: Some(RequestUnion::CreateRequest(create.clone())),
            });
        }
        for _ in 0..self.progress {
            out.push(WatchRequest {
                request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
            });
        }
        out
    }
}

/// The observe stream's memory: the request, and the last leader shown.
#[derive(Debug, Default)]
struct Observe {
    request: Option<LeaderRequest>,
    /// Key and revision of the last leader value shown to the client.
    last: Option<(Bytes, i64)>,
    /// The first answer after a move repeats the current leader.
    moved: bool,
}

impl Policy for Observe {
    type Req = LeaderRequest;
    type Resp = LeaderResponse;

    fn to_server(ns: &Namespace, req: &mut LeaderRequest) {
        ns.leader_request(req);
    }

    fn to_client(ns: &Namespace, resp: &mut LeaderResponse) -> Result<(), OutsideNamespace> {
        ns.leader_response(resp)
    }

    fn request(&mut self, req: &LeaderRequest) {
        self.request = Some(req.clone());
    }

    fn response(&mut self, resp: &mut LeaderResponse) -> bool {
        let current = resp.kv.as_ref().map(|kv| (kv.key.clone(), kv.mod_revision));
        let repeat = std::mem::take(&mut self.moved) && current.is_some() && current == self.last;
        if current.is_some() {
            self.last = current;
        }
        !repeat
    }

    fn replay(&mut self) -> Vec<LeaderRequest> {
        self.moved = self.last.is_some();
        self.request.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_api::etcdserverpb::{ResponseHeader, WatchCancelRequest};
    use etcd_api::mvccpb::{Event, KeyValue};

    fn create(key: &str, start: i64, id: i64) -> WatchRequest {
        WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: Bytes::copy_from_slice(key.as_bytes()),
                start_revision: start,
                watch_id: id,
                prev_kv: true,
                ..Default::default()
            })),
        }
    }

    fn header(revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            revision,
            ..Default::default()
        })
    }

    fn created(id: i64, revision: i64) -> WatchResponse {
        WatchResponse {
            header: header(revision),
            watch_id: id,
            created: true,
            ..Default::default()
        }
    }

    fn events(id: i64, revisions: &[i64], fragment: bool) -> WatchResponse {
        WatchResponse {
            header: header(*revisions.last().unwrap_or(&0)),
            watch_id: id,
            fragment,
            events: revisions
                .iter()
                .map(|&r| Event {
                    kv: Some(KeyValue {
                        mod_revision: r,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// (watch_id, start_revision) of every create in a replay, and the progress requests.
    fn creates(replay: &[WatchRequest]) -> (Vec<(i64, i64)>, usize) {
        let mut out = Vec::new();
        let mut progress = 0;
        for r in replay {
            match &r.request_union {
                Some(RequestUnion::CreateRequest(c)) => {
                    assert!(c.prev_kv, "options are kept");
                    out.push((c.watch_id, c.start_revision));
                }
                Some(RequestUnion::ProgressRequest(_)) => progress += 1,
                other => panic!("unexpected replayed request {other:?}"),
            }
        }
        (out, progress)
    }

    #[test]
    fn watchers_resume_after_their_last_event_with_their_own_ids() {
        let mut w = Watch::default();
        // From now (server-chosen id 0), from revision 5 (client id 7), and one pending.
        w.request(&create("a", 0, 0));
        w.request(&create("b", 5, 7));
        assert!(w.response(&mut created(0, 10)));
        assert!(w.response(&mut created(7, 10)));
        assert!(w.response(&mut events(7, &[5, 6], false)));
        assert!(w.response(&mut events(0, &[11], false)));
        w.request(&create("c", 0, 0));
        w.request(&WatchRequest {
            request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
        });

        let replay = w.replay();
        assert_eq!(creates(&replay), (vec![(0, 12), (7, 7), (0, 0)], 1));

        // The new member's created responses for the two known watchers are hidden; the
        // pending one's is shown and registers it.
        assert!(!w.response(&mut created(0, 20)));
        assert!(!w.response(&mut created(7, 20)));
        assert!(w.response(&mut created(1, 20)));
        assert!(w.response(&mut WatchResponse {
            header: header(20),
            watch_id: -1,
            ..Default::default()
        }));
        assert_eq!(w.progress, 0);
        assert_eq!(creates(&w.replay()), (vec![(0, 12), (1, 21), (7, 7)], 0));
    }

    #[test]
    fn progress_notifications_advance_a_watcher_but_fragments_wait_for_their_end() {
        let mut w = Watch::default();
        w.request(&create("a", 3, 0));
        w.response(&mut created(0, 9));
        // A progress notification for the watcher: caught up to 9.
        w.response(&mut WatchResponse {
            header: header(9),
            watch_id: 0,
            ..Default::default()
        });
        assert_eq!(creates(&w.replay()).0, [(0, 10)]);
        w.response(&mut created(0, 9));
        // Part of revision 12 was shown: a progress notification does not move it past 12, and
        // the replay starts at 12 (the part shown is dropped when it comes again).
        w.response(&mut events(0, &[12], true));
        w.response(&mut WatchResponse {
            header: header(12),
            watch_id: 0,
            ..Default::default()
        });
        assert_eq!(creates(&w.replay()).0, [(0, 12)]);
        w.response(&mut created(0, 12));
        w.response(&mut events(0, &[12], false));
        assert_eq!(creates(&w.replay()).0, [(0, 13)]);
    }

    #[test]
    fn canceled_watchers_are_not_replayed() {
        let mut w = Watch::default();
        w.request(&create("a", 0, 0));
        w.request(&create("b", 0, 0));
        w.response(&mut created(0, 4));
        // Refused at creation (e.g. permission denied): never a watcher.
        w.response(&mut WatchResponse {
            created: true,
            canceled: true,
            watch_id: -1,
            ..Default::default()
        });
        w.request(&WatchRequest {
            request_union: Some(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: 0,
            })),
        });
        // Moved before etcd answered the cancel: created again and canceled on the new member,
        // whose (hidden) created and (shown) canceled answers the client gets.
        let replay = w.replay();
        assert_eq!(replay.len(), 2);
        assert!(matches!(
            replay[1].request_union,
            Some(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: 0
            }))
        ));
        assert!(!w.response(&mut created(0, 5)));
        assert!(w.response(&mut WatchResponse {
            watch_id: 0,
            canceled: true,
            ..Default::default()
        }));
        assert!(w.replay().is_empty());

        // A watcher compacted away while moving: the client sees etcd's cancel.
        w.request(&create("c", 0, 0));
        w.response(&mut created(0, 4));
        w.replay();
        assert!(!w.response(&mut created(0, 9)));
        let mut cancel = WatchResponse {
            watch_id: 0,
            canceled: true,
            compact_revision: 8,
            ..Default::default()
        };
        assert!(w.response(&mut cancel));
        assert!(w.replay().is_empty());
    }

    #[test]
    fn a_fragmented_revision_cut_by_a_move_is_completed_without_repeats() {
        let mut w = Watch::default();
        w.request(&create("a", 0, 0));
        w.response(&mut created(0, 4));
        // Revision 5 in fragments of 2 + 2 + 1 events; the first fragment is shown, then the
        // member fails.
        assert!(w.response(&mut events(0, &[5, 5], true)));
        assert_eq!(creates(&w.replay()).0, [(0, 5)]);
        assert!(!w.response(&mut created(0, 9)));
        // The new member sends revision 5 again from the start: the 2 events shown are dropped.
        let mut again = events(0, &[5, 5], true);
        assert!(
            !w.response(&mut again),
            "a fragment seen whole is not shown again"
        );
        let mut second = events(0, &[5, 5], true);
        assert!(w.response(&mut second));
        assert_eq!(second.events.len(), 2);
        // Moved again inside the revision: 4 events are known now.
        assert_eq!(creates(&w.replay()).0, [(0, 5)]);
        w.response(&mut created(0, 9));
        let mut whole = events(0, &[5, 5, 5, 5, 5], false);
        assert!(w.response(&mut whole));
        assert_eq!(whole.events.len(), 1, "only the event not seen yet");
        assert_eq!(creates(&w.replay()).0, [(0, 6)]);
    }

    #[test]
    fn observe_hides_the_repeated_leader_after_a_move() {
        let leader = |rev: i64| LeaderResponse {
            kv: Some(KeyValue {
                key: Bytes::from_static(b"e/1"),
                mod_revision: rev,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut o = Observe::default();
        o.request(&LeaderRequest {
            name: Bytes::from_static(b"e"),
        });
        assert!(o.response(&mut leader(3)));
        assert_eq!(o.replay().len(), 1);
        assert!(
            !o.response(&mut leader(3)),
            "same leader again after the move"
        );
        assert!(
            o.response(&mut leader(3)),
            "only the first answer after a move is checked"
        );
        o.replay();
        assert!(o.response(&mut leader(5)), "a new leader value is shown");
    }
}

//! Lease keep-alive coalescing: the proxy serves every client's `Lease/LeaseKeepAlive` stream
//! itself and sends the keep-alives to etcd over one upstream stream (per auth identity), so a
//! thousand clients keeping leases alive cost the cluster one stream, not a thousand.
//!
//! - **Each keep-alive is etcd's**: a client's keep-alive for lease `id` goes to etcd (unless
//!   one for the same lease is already on its way, in which case the client shares its answer),
//!   and the client gets etcd's answer as soon as it arrives: the real TTL, `0` for a lease that
//!   does not exist, the member's header. Nothing is answered from memory, and the proxy never
//!   keeps a lease alive on its own: a lease lives exactly as long as some client keeps it
//!   alive, and expires on time when they stop (etcd's proxy renews on its own schedule, answers
//!   up to seconds late and says `-1` for a missing lease).
//! - **Identity**: clients with the same `token` / `authorization` metadata (or none) share an
//!   upstream stream, which carries that metadata; clients of different users never share one.
//! - **The upstream stream survives its member**: when the member's connection breaks, etcd
//!   ends the stream, or the member fails its health probe, the stream is opened on another
//!   member and the keep-alives still waiting for an answer are sent again. If no member takes
//!   it for [`crate::resume::GIVE_UP_AFTER`], the waiting clients get `UNAVAILABLE`.
//! - **Half-close** as etcd: the client's stream ends (status OK) once its keep-alives sent
//!   before the half-close are answered.
//! - **Bounds**: a client has at most [`MAX_OUTSTANDING`] keep-alives waiting; the proxy reads
//!   no more of its stream until one is answered.
//! - The hub of an identity lives while one of its clients does: the last client gone closes
//!   the upstream stream.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use etcd_api::etcdserverpb::{LeaseKeepAliveRequest, LeaseKeepAliveResponse};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, Uri};
use prost::Message;
use tokio::sync::mpsc;

use crate::body::ClientBody;
use crate::forward::{ResponseBody, status_headers};
use crate::metrics::STREAMS;
use crate::resume::{Client, ClientEvent, GIVE_UP_AFTER, grpc_status};
use crate::rewrite::{Decoder, Limits, RequestBody, encode_message};
use crate::upstream::{SendError, Upstream};

/// The gRPC path served here.
pub const PATH: &str = "/etcdserverpb.Lease/LeaseKeepAlive";
/// Keep-alives of one client waiting for etcd's answer, at most.
pub const MAX_OUTSTANDING: usize = 64;
/// Frames queued towards one client.
const CLIENT_QUEUE: usize = 16;

const UNAVAILABLE: u16 = 14;

/// The metadata that tells users apart.
type Identity = Vec<(&'static str, HeaderValue)>;

/// etcd's answer to one keep-alive, or the status that ends the client's stream.
type Answer = Result<LeaseKeepAliveResponse, (u16, String)>;

/// A keep-alive handed to a hub: the lease, and where its answer goes.
struct Ask {
    id: i64,
    reply: mpsc::Sender<Answer>,
}

/// What clients hold to reach their hub; the hub's task ends when the last one is dropped.
struct HubHandle {
    asks: mpsc::UnboundedSender<Ask>,
}

/// Every identity's hub.
pub struct KeepAlives {
    upstream: Arc<Upstream>,
    limits: Limits,
    hubs: Mutex<HashMap<Identity, Weak<HubHandle>>>,
}

impl KeepAlives {
    /// Hubs over `upstream`.
    pub fn new(upstream: Arc<Upstream>, limits: Limits) -> KeepAlives {
        KeepAlives {
            upstream,
            limits,
            hubs: Mutex::new(HashMap::new()),
        }
    }

    /// The hub of `identity`, started if it has none.
    fn hub(&self, identity: Identity) -> Arc<HubHandle> {
        let mut hubs = self.hubs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = hubs.get(&identity).and_then(Weak::upgrade) {
            return h;
        }
        hubs.retain(|_, h| h.strong_count() > 0);
        let (asks, rx) = mpsc::unbounded_channel();
        let handle = Arc::new(HubHandle { asks });
        hubs.insert(identity.clone(), Arc::downgrade(&handle));
        let hub = Hub {
            upstream: self.upstream.clone(),
            limits: self.limits,
            identity,
            asks: rx,
            waiting: HashMap::new(),
        };
        tokio::spawn(hub.run());
        handle
    }

    /// Serves one client's `LeaseKeepAlive` call.
    pub async fn handle(&self, req: Request<ClientBody>) -> Response<ResponseBody> {
        let identity: Identity = ["token", "authorization"]
            .into_iter()
            .filter_map(|name| Some((name, req.headers().get(name)?.clone())))
            .collect();
        let hub = self.hub(identity);
        let (out, out_rx) = mpsc::channel(CLIENT_QUEUE);
        let client = Client::new(req.into_body(), self.limits);
        tokio::spawn(serve_client(hub, client, out));
        let mut resp = Response::new(ResponseBody::Channel(out_rx));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        resp
    }
}

/// One client's stream: its keep-alives to the hub, the hub's answers back, until it leaves,
/// or has half-closed and has had every answer.
async fn serve_client(hub: Arc<HubHandle>, mut client: Client, out: mpsc::Sender<Frame<Bytes>>) {
    let (reply, mut answers) = mpsc::channel::<Answer>(MAX_OUTSTANDING);
    let mut outstanding = 0usize;
    let end = |code: u16, message: String| Frame::trailers(status_headers(code, &message));
    loop {
        if client.done && outstanding == 0 {
            let _ = out.send(end(0, String::new())).await;
            return;
        }
        tokio::select! {
            ev = client.next::<LeaseKeepAliveRequest>(), if !client.done && outstanding < MAX_OUTSTANDING => match ev {
                ClientEvent::Message(m) => {
                    STREAMS.keepalives_received.inc();
                    if hub.asks.send(Ask { id: m.id, reply: reply.clone() }).is_err() {
                        let _ = out.send(end(UNAVAILABLE, "etcd-proxy: keep-alive hub stopped".into())).await;
                        return;
                    }
                    outstanding += 1;
                }
                ClientEvent::End => {}
                ClientEvent::Bad(code, message) => {
                    let _ = out.send(end(code, message)).await;
                    return;
                }
                ClientEvent::Gone => return,
            },
            Some(answer) = answers.recv() => {
                outstanding = outstanding.saturating_sub(1);
                let frame = match answer {
                    Ok(resp) => {
                        let mut framed = BytesMut::new();
                        encode_message(&resp, &mut framed);
                        Frame::data(framed.freeze())
                    }
                    Err((code, message)) => {
                        let _ = out.send(end(code, message)).await;
                        return;
                    }
                };
                if out.send(frame).await.is_err() {
                    return;
                }
            }
            () = out.closed() => return,
        }
    }
}

/// One identity's upstream stream and the keep-alives waiting for its answers.
struct Hub {
    upstream: Arc<Upstream>,
    limits: Limits,
    identity: Identity,
    asks: mpsc::UnboundedReceiver<Ask>,
    /// Per lease, who waits for the answer of the keep-alive on its way.
    waiting: HashMap<i64, Vec<mpsc::Sender<Answer>>>,
}

/// How one upstream stream ended.
enum End {
    /// Every client is gone.
    Idle,
    /// The stream failed; open another, avoiding this member if it has a name.
    Failed(Option<String>, String),
}

impl Hub {
    async fn run(mut self) {
        let mut avoid: Option<String> = None;
        let mut outage: Option<Instant> = None;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.stream(avoid.as_deref(), &mut outage).await {
                End::Idle => return,
                End::Failed(member, reason) => {
                    STREAMS.moved.with_label_values(&[PATH]).inc();
                    tracing::info!(member = ?member, reason = %reason, "moving the lease keep-alive stream to another etcd member");
                    if member.is_some() {
                        avoid = member;
                    }
                }
            }
            let since = *outage.get_or_insert_with(Instant::now);
            if since.elapsed() >= GIVE_UP_AFTER {
                let message = format!(
                    "etcd-proxy: no etcd member took the lease keep-alive stream for {GIVE_UP_AFTER:?}"
                );
                self.fail_all(UNAVAILABLE, &message);
                outage = None;
            }
            // Asks that come meanwhile wait for the next stream; a hub whose clients all left
            // ends.
            let mut wake = pin!(tokio::time::sleep(pause));
            loop {
                tokio::select! {
                    () = &mut wake => break,
                    ask = self.asks.recv() => match ask {
                        Some(ask) => {
                            self.add(ask);
                        }
                        None => return,
                    },
                }
            }
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Every waiting client gets `code`.
    fn fail_all(&mut self, code: u16, message: &str) {
        for (_, replies) in self.waiting.drain() {
            for r in replies {
                let _ = r.try_send(Err((code, message.to_string())));
            }
        }
    }

    /// The request that opens an upstream stream, with the identity's metadata.
    fn request(&self, body: mpsc::Receiver<Bytes>) -> Request<RequestBody> {
        let mut req = Request::new(RequestBody::Channel(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = Uri::from_static(PATH);
        let h = req.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("te", HeaderValue::from_static("trailers"));
        for (name, value) in &self.identity {
            h.insert(*name, value.clone());
        }
        req
    }

    /// One upstream stream, from opening to failure (or to the last client leaving).
    async fn stream(&mut self, avoid: Option<&str>, outage: &mut Option<Instant>) -> End {
        let (tx, rx) = mpsc::channel::<Bytes>(MAX_OUTSTANDING);
        // Keep-alives still waiting for an answer go again on the new stream.
        let mut to_send: Vec<i64> = self.waiting.keys().copied().collect();
        let upstream = self.upstream.clone();
        let mut send = pin!(upstream.send_stream(self.request(rx), avoid));
        let (resp, serving) = loop {
            tokio::select! {
                r = &mut send => match r {
                    Ok(ok) => break ok,
                    Err(SendError::NoMember(names)) => {
                        return End::Failed(None, format!("no etcd member is reachable (endpoints: {names})"));
                    }
                    Err(SendError::Failed { member, source }) => {
                        return End::Failed(Some(member), source.to_string());
                    }
                },
                ask = self.asks.recv() => match ask {
                    Some(ask) => to_send.extend(self.add(ask)),
                    None => return End::Idle,
                },
                // The first keep-alives go out while the head is awaited (etcd answers the
                // head with its first message).
                Ok(permit) = tx.reserve(), if !to_send.is_empty() => {
                    permit.send(frame(to_send.pop().unwrap_or_default()));
                }
            }
        };
        let (head, mut body) = resp.into_parts();
        if let Some(code) = grpc_status(&head.headers) {
            // etcd refused the stream itself: the waiting clients get its answer.
            let message = head
                .headers
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            if code == UNAVAILABLE {
                return End::Failed(Some(serving.name().to_string()), message);
            }
            self.fail_all(code, &message);
            return End::Failed(Some(serving.name().to_string()), message);
        }
        *outage = None;
        STREAMS.keepalive_upstream_streams.inc();
        let _open = OpenStream;
        let mut decoder = Decoder::new(self.limits.decoded_response());
        let mut failed = pin!(serving.failed());
        let member = || Some(serving.name().to_string());
        loop {
            tokio::select! {
                frame = body.frame() => match frame {
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            decoder.push(&data);
                            loop {
                                match decoder.next_message() {
                                    Ok(Some(m)) => match LeaseKeepAliveResponse::decode(m) {
                                        Ok(resp) => self.answer(resp),
                                        Err(e) => return End::Failed(member(), format!("undecodable keep-alive answer: {e}")),
                                    },
                                    Ok(None) => break,
                                    Err(e) => return End::Failed(member(), e.to_string()),
                                }
                            }
                        }
                        Err(frame) => {
                            let trailers = frame.into_trailers().unwrap_or_default();
                            let code = grpc_status(&trailers).unwrap_or(UNAVAILABLE);
                            let message = trailers.get("grpc-message").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                            if code != UNAVAILABLE && code != 0 {
                                self.fail_all(code, &message);
                            }
                            return End::Failed(member(), format!("etcd ended the stream: {code} {message}"));
                        }
                    },
                    Some(Err(e)) => return End::Failed(member(), e.to_string()),
                    None => return End::Failed(member(), "the stream ended without a status".into()),
                },
                ask = self.asks.recv(), if to_send.len() < MAX_OUTSTANDING => match ask {
                    Some(ask) => to_send.extend(self.add(ask)),
                    None => return End::Idle,
                },
                Ok(permit) = tx.reserve(), if !to_send.is_empty() => {
                    permit.send(frame(to_send.pop().unwrap_or_default()));
                }
                () = &mut failed => return End::Failed(member(), "the member failed its health probe".into()),
            }
        }
    }

    /// Records `ask`; its lease when no keep-alive for it is on its way yet (one must be sent).
    fn add(&mut self, ask: Ask) -> Option<i64> {
        let waiters = self.waiting.entry(ask.id).or_default();
        waiters.push(ask.reply);
        (waiters.len() == 1).then_some(ask.id)
    }

    /// etcd's answer goes to every client waiting for that lease.
    fn answer(&mut self, resp: LeaseKeepAliveResponse) {
        if let Some(replies) = self.waiting.remove(&resp.id) {
            for r in replies {
                // Room is certain: a client has at most MAX_OUTSTANDING asks waiting.
                let _ = r.try_send(Ok(resp));
            }
        }
    }
}

/// A keep-alive for lease `id`, framed (and counted as sent).
fn frame(id: i64) -> Bytes {
    STREAMS.keepalives_sent.inc();
    let mut out = BytesMut::new();
    encode_message(&LeaseKeepAliveRequest { id }, &mut out);
    out.freeze()
}

/// Counts an open upstream stream while it lives.
struct OpenStream;

impl Drop for OpenStream {
    fn drop(&mut self) {
        STREAMS.keepalive_upstream_streams.dec();
    }
}

//! One client's `Watch` stream, answered as etcd's watch server answers it (see [`super`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use etcd_api::etcdserverpb::watch_create_request::FilterType;
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{ResponseHeader, WatchCreateRequest, WatchRequest, WatchResponse};
use etcd_api::mvccpb::Event;
use etcd_api::mvccpb::event::EventType;
use hyper::Response;
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use super::hub::{Dispatch, Shared, ToHub};
use super::{CLIENT_QUEUE, HubHandle};
use crate::cluster::Cluster;
use crate::forward::{ResponseBody, status_headers};
use crate::namespace::Namespace;
use crate::resume::{Client, ClientEvent};
use crate::rewrite::encode_message;

/// etcd's `--max-request-bytes` default: a watcher that asked for `fragment` gets a revision
/// larger than this in pieces, as etcd's watch server cuts them.
const FRAGMENT_BYTES: usize = 1536 * 1024;

/// Pending response bytes are handed to the connection once they reach this.
const FLUSH_BYTES: usize = 64 << 10;

/// etcd's answers to creates it refuses.
const EMPTY_RANGE: &str = "mvcc: watcher range is empty";
const DUPLICATE_ID: &str = "mvcc: duplicate watch ID provided on the WatchStream";

/// A watcher of this stream.
#[derive(Debug)]
struct Watcher {
    /// Its range, in etcd's form.
    range: (Bytes, Bytes),
    /// The start revision the client asked for (0: from now).
    asked_start: i64,
    /// The header of the read made at create, for the created response.
    header: Option<ResponseHeader>,
    /// Attached: its created response was sent.
    created: bool,
    /// The first revision it has not seen all events of.
    next: i64,
    prev_kv: bool,
    progress_notify: bool,
    fragment: bool,
    no_put: bool,
    no_delete: bool,
}

impl Watcher {
    fn new(c: &WatchCreateRequest, range: (Bytes, Bytes), header: ResponseHeader) -> Watcher {
        let has = |f: FilterType| c.filters.contains(&(f as i32));
        Watcher {
            range,
            asked_start: c.start_revision,
            header: Some(header),
            created: false,
            next: 0,
            prev_kv: c.prev_kv,
            progress_notify: c.progress_notify,
            fragment: c.fragment,
            no_put: has(FilterType::Noput),
            no_delete: has(FilterType::Nodelete),
        }
    }

    /// Whether the watcher's filters leave `e` out.
    fn filters_out(&self, e: &Event) -> bool {
        match EventType::try_from(e.r#type) {
            Ok(EventType::Put) => self.no_put,
            Ok(EventType::Delete) => self.no_delete,
            Err(_) => false,
        }
    }
}

/// What to send the client for one shared response.
#[derive(Debug, PartialEq)]
enum View {
    /// Nothing (everything in it was seen or filtered out).
    Nothing,
    /// The shared events as they are.
    Shared,
    /// These responses, made for the watcher.
    Own(Vec<WatchResponse>),
}

/// What watcher `w` (id `wid`) gets of `shared`, and its next revision advanced past it.
fn view(w: &mut Watcher, wid: i64, shared: &Shared) -> View {
    let r = &shared.resp;
    let rev = |e: &Event| e.kv.as_ref().map_or(0, |kv| kv.mod_revision);
    let Some(last) = r.events.last().map(rev) else {
        // A progress notification: every event up to its revision was shared. Not shown to a
        // watcher that started later (it would see the revision go back).
        let revision = r.header.as_ref().map_or(0, |h| h.revision);
        if revision + 1 < w.next {
            return View::Nothing;
        }
        w.next = w.next.max(revision + 1);
        return if w.progress_notify {
            View::Own(vec![WatchResponse {
                header: r.header,
                watch_id: wid,
                ..Default::default()
            }])
        } else {
            View::Nothing
        };
    };
    if last < w.next {
        return View::Nothing;
    }
    let from = w.next;
    w.next = last + 1;
    let whole = r.events.first().map(rev).unwrap_or(0) >= from && !w.no_put && !w.no_delete;
    if whole && !(w.fragment && shared.size >= FRAGMENT_BYTES) {
        return View::Shared;
    }
    let events: Vec<Event> = r
        .events
        .iter()
        .filter(|e| rev(e) >= from && !w.filters_out(e))
        .map(|e| Event {
            prev_kv: if w.prev_kv { e.prev_kv.clone() } else { None },
            ..e.clone()
        })
        .collect();
    if events.is_empty() {
        return View::Nothing;
    }
    let resp = WatchResponse {
        header: r.header,
        watch_id: wid,
        events,
        ..Default::default()
    };
    View::Own(if w.fragment {
        fragments(resp, FRAGMENT_BYTES)
    } else {
        vec![resp]
    })
}

/// `resp` cut as etcd's watch server cuts a response for a watcher that asked for `fragment`:
/// whole if it is under `max` bytes or has one event; else pieces of as many events as stay
/// under `max` (at least one each), all but the last marked `fragment`.
fn fragments(resp: WatchResponse, max: usize) -> Vec<WatchResponse> {
    if resp.encoded_len() < max || resp.events.len() < 2 {
        return vec![resp];
    }
    let mut template = resp.clone();
    template.events.clear();
    template.fragment = true;
    let base = template.encoded_len();
    let mut out = Vec::new();
    let mut events = resp.events.into_iter().peekable();
    loop {
        let mut cur = template.clone();
        let mut size = base;
        while let Some(e) = events.peek() {
            let len = prost::encoding::message::encoded_len(11, e);
            if !cur.events.is_empty() && size + len >= max {
                break;
            }
            size += len;
            cur.events.extend(events.next());
        }
        if events.peek().is_none() {
            cur.fragment = false;
            out.push(cur);
            return out;
        }
        out.push(cur);
    }
}

/// Writes a framed `WatchResponse` made of `header`, `watch_id` and already encoded `events`
/// (repeated field entries, which concatenate: several shared responses of one watcher become one
/// response of several revisions, as etcd sends a watcher that is behind).
fn write_shared(out: &mut BytesMut, header: Option<&ResponseHeader>, wid: i64, events: &[Bytes]) {
    let mut head = BytesMut::new();
    if let Some(h) = header {
        prost::encoding::message::encode(1, h, &mut head);
    }
    if wid != 0 {
        prost::encoding::int64::encode(2, &wid, &mut head);
    }
    let len = head.len() + events.iter().map(Bytes::len).sum::<usize>();
    out.reserve(5 + len);
    out.put_u8(0);
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    out.extend_from_slice(&head);
    for e in events {
        out.extend_from_slice(e);
    }
}

/// A watcher's shared events not yet written, merged into one response.
struct Merged {
    wid: i64,
    /// The header of the newest response merged.
    header: Option<ResponseHeader>,
    events: Vec<Bytes>,
}

/// The text etcd's watch server puts in `cancel_reason` for a gRPC error.
fn go_status_text(status: &tonic::Status) -> String {
    format!(
        "rpc error: code = {:?} desc = {}",
        status.code(),
        status.message()
    )
}

/// The client's side of the response. Its head goes with the first message, as grpc-go's
/// servers send it: a client whose call returns has had its first create answered.
enum Out {
    Waiting(oneshot::Sender<Response<ResponseBody>>),
    Open(mpsc::Sender<Frame<Bytes>>),
    Closed,
}

impl Out {
    /// Resolves when the client is gone.
    async fn closed(&mut self) {
        match self {
            Out::Waiting(head) => head.closed().await,
            Out::Open(out) => out.closed().await,
            Out::Closed => std::future::pending().await,
        }
    }

    /// Sends `frame`, after the head if it is the first; false once the client is gone.
    async fn send(&mut self, frame: Frame<Bytes>) -> bool {
        if let Out::Waiting(_) = self {
            let Out::Waiting(head) = std::mem::replace(self, Out::Closed) else {
                return false;
            };
            if frame.is_trailers() {
                // Nothing was sent: a trailers-only response.
                let mut resp = Response::new(ResponseBody::Empty);
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                resp.headers_mut()
                    .extend(frame.into_trailers().unwrap_or_default());
                let _ = head.send(resp);
                return false;
            }
            let (out, out_rx) = mpsc::channel(CLIENT_QUEUE);
            let mut resp = Response::new(ResponseBody::Channel(out_rx));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            if head.send(resp).is_err() {
                return false;
            }
            *self = Out::Open(out);
        }
        match self {
            Out::Open(out) => out.send(frame).await.is_ok(),
            _ => false,
        }
    }
}

pub(super) struct ClientStream {
    cid: u64,
    hub: Arc<HubHandle>,
    cluster: Arc<Cluster>,
    namespace: Option<Namespace>,
    /// The client's metadata, for the reads made in its name.
    headers: HeaderMap,
    client: Client,
    out: Out,
    /// Responses written and not yet handed to the connection: sent as one DATA frame, so a
    /// burst of small responses is not a flood of small frames (h2 clients close a connection
    /// that receives too many of those while they fall behind).
    pending: BytesMut,
    /// Shared events waiting to be written, per watcher in order of arrival, and their size.
    merged: Vec<Merged>,
    merged_bytes: usize,
    watchers: BTreeMap<i64, Watcher>,
    /// The next server-chosen `watch_id` to try, as etcd allocates them.
    next_id: i64,
    /// The newest header seen, for answers that need one when etcd gives none.
    last_header: Option<ResponseHeader>,
}

impl ClientStream {
    pub(super) fn new(
        cid: u64,
        hub: Arc<HubHandle>,
        cluster: Arc<Cluster>,
        namespace: Option<Namespace>,
        headers: HeaderMap,
        client: Client,
        head: oneshot::Sender<Response<ResponseBody>>,
    ) -> ClientStream {
        ClientStream {
            cid,
            hub,
            cluster,
            namespace,
            headers,
            client,
            out: Out::Waiting(head),
            pending: BytesMut::new(),
            merged: Vec::new(),
            merged_bytes: 0,
            watchers: BTreeMap::new(),
            next_id: 0,
            last_header: None,
        }
    }

    fn to_hub(&self, msg: ToHub) {
        let _ = self.hub.tx.send(msg);
    }

    pub(super) async fn run(mut self) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        self.to_hub(ToHub::Join {
            cid: self.cid,
            tx,
            queued: queued.clone(),
        });
        loop {
            tokio::select! {
                ev = self.client.next::<WatchRequest>(), if !self.client.done => match ev {
                    ClientEvent::Message(m) => {
                        if !self.on_request(m).await || !self.flush().await {
                            break;
                        }
                    }
                    // etcd goes on sending after a half-close.
                    ClientEvent::End => {}
                    ClientEvent::Bad(code, message) => {
                        self.flush().await;
                        self.out.send(Frame::trailers(status_headers(code, &message))).await;
                        break;
                    }
                    ClientEvent::Gone => break,
                },
                d = rx.recv() => {
                    let Some(mut d) = d else { break };
                    // Everything already queued goes out together, up to FLUSH_BYTES.
                    let go_on = loop {
                        let cost = d.cost();
                        let go_on = self.on_dispatch(d).await;
                        queued.fetch_sub(cost, Ordering::AcqRel);
                        if !go_on || self.pending.len() + self.merged_bytes >= FLUSH_BYTES {
                            break go_on;
                        }
                        match rx.try_recv() {
                            Ok(next) => d = next,
                            Err(_) => break true,
                        }
                    };
                    if !go_on || !self.flush().await {
                        break;
                    }
                }
                () = self.out.closed() => break,
            }
        }
        self.to_hub(ToHub::Leave { cid: self.cid });
    }

    /// Writes `resp` after the responses pending; they go out at the next flush (at once
    /// when they pass FLUSH_BYTES). False once the client is gone.
    async fn send(&mut self, resp: &WatchResponse) -> bool {
        self.write_merged();
        encode_message(resp, &mut self.pending);
        self.pending.len() < FLUSH_BYTES || self.flush().await
    }

    /// Keeps a shared response's events for watcher `wid`, merged with its others of this batch.
    fn merge(&mut self, wid: i64, header: Option<ResponseHeader>, events: &Bytes) {
        self.merged_bytes += events.len() + 32;
        if let Some(m) = self.merged.iter_mut().rev().find(|m| m.wid == wid) {
            m.header = header;
            m.events.push(events.clone());
            return;
        }
        self.merged.push(Merged {
            wid,
            header,
            events: vec![events.clone()],
        });
    }

    /// Writes the merged shared events, one response per watcher.
    fn write_merged(&mut self) {
        for m in std::mem::take(&mut self.merged) {
            write_shared(&mut self.pending, m.header.as_ref(), m.wid, &m.events);
        }
        self.merged_bytes = 0;
    }

    /// Hands the pending responses to the connection, as one DATA frame.
    async fn flush(&mut self) -> bool {
        self.write_merged();
        if self.pending.is_empty() {
            return true;
        }
        let data = self.pending.split().freeze();
        self.out.send(Frame::data(data)).await
    }

    fn seen(&mut self, header: &Option<ResponseHeader>) {
        if let Some(h) = header
            && self
                .last_header
                .as_ref()
                .is_none_or(|l| l.revision <= h.revision)
        {
            self.last_header = Some(*h);
        }
    }

    /// Handles a client request; false ends the stream.
    async fn on_request(&mut self, mut m: WatchRequest) -> bool {
        if let Some(ns) = &self.namespace {
            ns.watch_request(&mut m);
        }
        match m.request_union {
            Some(RequestUnion::CreateRequest(c)) => self.create(c).await,
            Some(RequestUnion::CancelRequest(c)) => self.cancel(c.watch_id).await,
            Some(RequestUnion::ProgressRequest(_)) => {
                self.to_hub(ToHub::Progress { cid: self.cid });
                true
            }
            // etcd ignores a request it does not know.
            None => true,
        }
    }

    /// A create, checked as etcd checks it (permission, range, `watch_id`), then attached.
    async fn create(&mut self, c: WatchCreateRequest) -> bool {
        let key = if c.key.is_empty() {
            Bytes::from_static(&[0])
        } else {
            c.key.clone()
        };
        let end = c.range_end.clone();
        let refuse =
            |header: Option<ResponseHeader>, watch_id: i64, reason: String| WatchResponse {
                header,
                watch_id,
                created: true,
                canceled: true,
                cancel_reason: reason,
                ..Default::default()
            };
        let header = match self.cluster.watch_check(&key, &end, &self.headers).await {
            Ok(h) => h,
            Err(status) => {
                let resp = refuse(self.last_header, c.watch_id, go_status_text(&status));
                return self.send(&resp).await;
            }
        };
        self.seen(&Some(header));
        // A range end of "\0" means every key from `key` on.
        let bounded_end: &[u8] = if end.as_ref() == [0] { &[] } else { &end };
        if !bounded_end.is_empty() && key.as_ref() >= bounded_end {
            return self
                .send(&refuse(Some(header), -1, EMPTY_RANGE.to_string()))
                .await;
        }
        let wid = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self
                    .send(&refuse(Some(header), -1, DUPLICATE_ID.to_string()))
                    .await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            self.next_id += 1;
            self.next_id - 1
        };
        let now = header.revision;
        let range = (key, end);
        self.watchers
            .insert(wid, Watcher::new(&c, range.clone(), header));
        self.to_hub(ToHub::Attach {
            cid: self.cid,
            wid,
            range,
            start: c.start_revision,
            now,
        });
        true
    }

    /// A cancel: etcd answers a known watcher with its current header, and nothing else.
    async fn cancel(&mut self, wid: i64) -> bool {
        let Some(w) = self.watchers.remove(&wid) else {
            return true;
        };
        self.to_hub(ToHub::Detach { cid: self.cid, wid });
        let header = match self
            .cluster
            .watch_check(&w.range.0, &w.range.1, &self.headers)
            .await
        {
            Ok(h) => Some(h),
            Err(_) => self.last_header,
        };
        self.seen(&header);
        self.send(&WatchResponse {
            header,
            watch_id: wid,
            canceled: true,
            ..Default::default()
        })
        .await
    }

    /// Handles what the hub sent; false ends the stream.
    async fn on_dispatch(&mut self, d: Dispatch) -> bool {
        match d {
            Dispatch::Created { wid, start } => {
                let Some(w) = self.watchers.get_mut(&wid) else {
                    return true;
                };
                if w.created {
                    // Attached again after falling behind.
                    w.next = w.next.max(start);
                    return true;
                }
                w.created = true;
                w.next = start;
                let mut header = w.header.take();
                if w.asked_start == 0
                    && let Some(h) = &mut header
                {
                    // From now: the revision it starts after.
                    h.revision = start - 1;
                }
                self.send(&WatchResponse {
                    header,
                    watch_id: wid,
                    created: true,
                    ..Default::default()
                })
                .await
            }
            Dispatch::Events { wids, shared } => {
                self.seen(&shared.resp.header);
                for &wid in wids.iter() {
                    let Some(w) = self.watchers.get_mut(&wid) else {
                        continue;
                    };
                    if !w.created {
                        continue;
                    }
                    let prev_kv = w.prev_kv;
                    let sent = match view(w, wid, &shared) {
                        View::Nothing => true,
                        View::Shared => {
                            let header = shared.resp.header;
                            self.merge(wid, header, shared.events(prev_kv));
                            true
                        }
                        View::Own(resps) => {
                            let mut ok = true;
                            for r in &resps {
                                ok = ok && self.send(r).await;
                            }
                            ok
                        }
                    };
                    if !sent {
                        return false;
                    }
                }
                true
            }
            Dispatch::Canceled { wid, mut resp } => {
                if self.watchers.remove(&wid).is_none() {
                    return true;
                }
                resp.watch_id = wid;
                self.send(&resp).await
            }
            Dispatch::Detached { wids } => {
                for wid in wids {
                    if let Some(w) = self.watchers.get(&wid) {
                        self.to_hub(ToHub::Attach {
                            cid: self.cid,
                            wid,
                            range: w.range.clone(),
                            start: w.next,
                            now: w.next - 1,
                        });
                    }
                }
                true
            }
            Dispatch::Progress { header } => {
                self.seen(&header);
                self.send(&WatchResponse {
                    header,
                    watch_id: -1,
                    ..Default::default()
                })
                .await
            }
            Dispatch::End(status) => {
                self.flush().await;
                self.out.send(Frame::trailers(status)).await;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_api::mvccpb::KeyValue;

    fn event(rev: i64, put: bool, value: usize) -> Event {
        let kv = |v: &str| KeyValue {
            key: Bytes::from_static(b"k"),
            mod_revision: rev,
            value: Bytes::from(v.repeat(value)),
            ..Default::default()
        };
        Event {
            r#type: if put {
                EventType::Put as i32
            } else {
                EventType::Delete as i32
            },
            kv: Some(kv("n")),
            prev_kv: Some(kv("p")),
        }
    }

    fn shared(revs: &[(i64, bool)]) -> Shared {
        Shared::new(WatchResponse {
            header: Some(ResponseHeader {
                revision: revs.last().map_or(20, |r| r.0),
                member_id: 7,
                ..Default::default()
            }),
            watch_id: 99,
            events: revs.iter().map(|&(r, put)| event(r, put, 1)).collect(),
            ..Default::default()
        })
    }

    fn watcher(create: WatchCreateRequest, next: i64) -> Watcher {
        let mut w = Watcher::new(
            &create,
            (Bytes::from_static(b"k"), Bytes::new()),
            ResponseHeader::default(),
        );
        w.created = true;
        w.next = next;
        w
    }

    fn revs(v: &View) -> Vec<Vec<i64>> {
        match v {
            View::Own(rs) => rs
                .iter()
                .map(|r| {
                    r.events
                        .iter()
                        .map(|e| e.kv.as_ref().unwrap().mod_revision)
                        .collect()
                })
                .collect(),
            other => panic!("expected own responses, got {other:?}"),
        }
    }

    #[test]
    fn a_watcher_gets_each_event_once_from_its_next_revision() {
        let mut w = watcher(WatchCreateRequest::default(), 5);
        let s = shared(&[(4, true), (5, true), (6, true)]);
        let v = view(&mut w, 3, &s);
        assert_eq!(revs(&v), [vec![5, 6]], "events before 5 are not its own");
        assert_eq!(w.next, 7);
        assert_eq!(view(&mut w, 3, &s), View::Nothing, "never twice");
        // A whole response from its next revision on is shared as is.
        assert_eq!(view(&mut w, 3, &shared(&[(7, true)])), View::Shared);
        assert_eq!(w.next, 8);
    }

    #[test]
    fn filters_and_prev_kv_are_the_watchers_own() {
        let create = WatchCreateRequest {
            filters: vec![FilterType::Nodelete as i32],
            prev_kv: false,
            ..Default::default()
        };
        let mut w = watcher(create, 1);
        let v = view(&mut w, 1, &shared(&[(3, true), (4, false)]));
        assert_eq!(revs(&v), [vec![3]], "the delete is filtered out");
        let View::Own(rs) = v else { unreachable!() };
        assert!(rs[0].events[0].prev_kv.is_none(), "prev_kv only if asked");
        assert_eq!(rs[0].watch_id, 1);
        // Everything filtered: nothing is sent, and the watcher still moves on.
        assert_eq!(view(&mut w, 1, &shared(&[(6, false)])), View::Nothing);
        assert_eq!(w.next, 7);
    }

    #[test]
    fn progress_notifications_only_when_asked_and_never_backwards() {
        let progress = |rev: i64| {
            Shared::new(WatchResponse {
                header: Some(ResponseHeader {
                    revision: rev,
                    ..Default::default()
                }),
                ..Default::default()
            })
        };
        let mut quiet = watcher(WatchCreateRequest::default(), 5);
        assert_eq!(view(&mut quiet, 1, &progress(9)), View::Nothing);
        assert_eq!(quiet.next, 10, "a progress notification moves it on");
        let asked = WatchCreateRequest {
            progress_notify: true,
            ..Default::default()
        };
        let mut w = watcher(asked, 12);
        assert_eq!(
            view(&mut w, 1, &progress(9)),
            View::Nothing,
            "a watcher created after revision 11 must not be told 9"
        );
        assert!(matches!(view(&mut w, 1, &progress(11)), View::Own(r) if r[0].watch_id == 1));
    }

    #[test]
    fn fragments_are_cut_as_etcd_cuts_them() {
        let big = WatchResponse {
            header: Some(ResponseHeader::default()),
            watch_id: 2,
            events: (0..5).map(|_| event(9, true, 400)).collect(),
            ..Default::default()
        };
        let max = 1000;
        let parts = fragments(big.clone(), max);
        assert!(parts.len() > 1);
        let mut all = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(
                p.fragment,
                i + 1 < parts.len(),
                "only the last is not a fragment"
            );
            assert!(!p.events.is_empty());
            assert!(
                p.encoded_len() < max || p.events.len() == 1,
                "a piece over the limit has one event"
            );
            all.extend(p.events.clone());
        }
        assert_eq!(all, big.events, "the pieces add up to the revision");
        // Under the limit, or a single event: whole.
        assert_eq!(fragments(big.clone(), 1 << 20), std::slice::from_ref(&big));
        let one = WatchResponse {
            events: vec![event(9, true, 4000)],
            ..big
        };
        assert_eq!(fragments(one.clone(), max), [one]);
    }

    #[test]
    fn merged_shared_responses_decode_as_one_response_of_several_revisions() {
        let first = shared(&[(3, true), (4, false)]);
        let second = shared(&[(5, true)]);
        for prev_kv in [true, false] {
            let mut framed = BytesMut::new();
            write_shared(
                &mut framed,
                second.resp.header.as_ref(),
                42,
                &[
                    first.events(prev_kv).clone(),
                    second.events(prev_kv).clone(),
                ],
            );
            assert_eq!(framed[0], 0, "not compressed");
            let len = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
            assert_eq!(len, framed.len() - 5);
            let got = WatchResponse::decode(&framed[5..]).expect("decode");
            let mut want = second.resp.clone();
            want.watch_id = 42;
            want.events = first.resp.events.clone();
            want.events.extend(second.resp.events.clone());
            if !prev_kv {
                want.events.iter_mut().for_each(|e| e.prev_kv = None);
            }
            assert_eq!(got, want);
        }
    }
}

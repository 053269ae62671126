//! One identity's upstream watchers, shared by its clients' watchers (see [`super`]).
//!
//! Everything here runs in one task, so the order of what a client stream receives is the order
//! in which etcd sent it: a watcher's created answer before its events, events before the answer
//! to a progress request sent after them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{
    ResponseHeader, WatchCancelRequest, WatchCreateRequest, WatchProgressRequest, WatchRequest,
    WatchResponse,
};
use etcd_api::mvccpb::Event;
use hyper::Response;
use hyper::body::Frame;
use hyper::header::HeaderMap;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::forward::{ResponseBody, status_headers};
use crate::metrics::STREAMS;
use crate::namespace::Namespace;
use crate::resume::{grpc_status, watch_session};
use crate::rewrite::{Decoder, Limits, encode_message};
use crate::upstream::Upstream;

/// Bytes of responses waiting for one client stream, at most, before the watchers a new response
/// is for are detached (and later caught up from etcd's history). A response is always queued
/// for a stream with nothing waiting, whatever its size.
pub const MAX_QUEUED_BYTES: usize = 8 << 20;

const INTERNAL: u16 = 13;

/// A key range in etcd's form: (key, range_end).
type Range = (Bytes, Bytes);

/// From a client stream to its hub.
pub(super) enum ToHub {
    /// A new client stream, and where its dispatches go.
    Join {
        cid: u64,
        tx: mpsc::UnboundedSender<Dispatch>,
        queued: Arc<AtomicUsize>,
    },
    /// Watcher `wid` of stream `cid` wants the events of `[key, end)` from revision `start`
    /// (0: from now, `now` being a member's current revision). Answered with
    /// [`Dispatch::Created`] and the first revision it will get.
    Attach {
        cid: u64,
        wid: i64,
        range: Range,
        start: i64,
        now: i64,
    },
    /// The watcher is canceled.
    Detach { cid: u64, wid: i64 },
    /// The stream asks for a progress report.
    Progress { cid: u64 },
    /// The stream is gone.
    Leave { cid: u64 },
}

/// From the hub to a client stream, in order.
pub(super) enum Dispatch {
    /// The watcher is attached; its first revision.
    Created { wid: i64, start: i64 },
    /// A response of the group of these watchers.
    Events {
        wids: Arc<[i64]>,
        shared: Arc<Shared>,
    },
    /// etcd canceled the watcher's group: this response (header, reason, compact revision) is
    /// the watcher's last.
    Canceled { wid: i64, resp: WatchResponse },
    /// The stream fell behind: these watchers got nothing from here on, and must be attached
    /// again from their next revision.
    Detached { wids: Vec<i64> },
    /// etcd's answer to a progress request of the stream.
    Progress { header: Option<ResponseHeader> },
    /// The upstream stream ended for good with this status: so does the client's.
    End(HeaderMap),
}

impl Dispatch {
    /// Its weight against [`MAX_QUEUED_BYTES`].
    pub(super) fn cost(&self) -> usize {
        match self {
            Dispatch::Events { shared, .. } => shared.size,
            _ => 64,
        }
    }
}

/// One upstream response, in the client's form (namespace stripped), shared by the watchers
/// it is for; its events are encoded once per variant on first use.
pub(super) struct Shared {
    pub(super) resp: WatchResponse,
    /// Its encoded length.
    pub(super) size: usize,
    with_prev_kv: OnceLock<Bytes>,
    without_prev_kv: OnceLock<Bytes>,
}

impl Shared {
    pub(super) fn new(resp: WatchResponse) -> Shared {
        Shared {
            size: resp.encoded_len(),
            resp,
            with_prev_kv: OnceLock::new(),
            without_prev_kv: OnceLock::new(),
        }
    }

    /// The events as the encoded repeated field of a `WatchResponse`, with or without their
    /// `prev_kv`.
    pub(super) fn events(&self, prev_kv: bool) -> &Bytes {
        if prev_kv {
            self.with_prev_kv
                .get_or_init(|| encode_events(&self.resp.events))
        } else {
            self.without_prev_kv.get_or_init(|| {
                let bare: Vec<Event> = self
                    .resp
                    .events
                    .iter()
                    .map(|e| Event {
                        prev_kv: None,
                        ..e.clone()
                    })
                    .collect();
                encode_events(&bare)
            })
        }
    }
}

fn encode_events(events: &[Event]) -> Bytes {
    let mut out = BytesMut::new();
    prost::encoding::message::encode_repeated(11, events, &mut out);
    out.freeze()
}

/// A client stream as the hub knows it.
struct ClientEntry {
    tx: mpsc::UnboundedSender<Dispatch>,
    queued: Arc<AtomicUsize>,
    /// Its attached watchers, and their group.
    watchers: HashMap<i64, i64>,
}

impl ClientEntry {
    /// Queues `d`; false when the stream is over its bound (nothing queued).
    fn send(&self, d: Dispatch, always: bool) -> bool {
        let cost = d.cost();
        let queued = self.queued.load(Ordering::Acquire);
        if !always && queued > 0 && queued + cost > MAX_QUEUED_BYTES {
            return false;
        }
        self.queued.fetch_add(cost, Ordering::AcqRel);
        let _ = self.tx.send(d);
        true
    }
}

/// One upstream watcher and the client watchers it serves.
struct Group {
    range: Range,
    /// Every event before this revision has been shared.
    next: i64,
    /// Per client stream, its watchers here.
    members: HashMap<u64, Member>,
    /// Events of a revision that etcd is sending in fragments.
    fragments: Vec<Event>,
    /// Watchers whose created answer waits for etcd's (a group from now, `next` still 0).
    waiting: Vec<(u64, i64)>,
}

/// One client stream's watchers in a group.
#[derive(Default)]
struct Member {
    wids: Vec<i64>,
    /// The same, as sent with each response; made again after a change.
    shared: Option<Arc<[i64]>>,
}

impl Member {
    fn ids(&mut self) -> Arc<[i64]> {
        self.shared
            .get_or_insert_with(|| self.wids.as_slice().into())
            .clone()
    }
}

impl Group {
    fn len(&self) -> usize {
        self.members.values().map(|m| m.wids.len()).sum()
    }

    fn add(&mut self, cid: u64, wids: &[i64]) {
        let m = self.members.entry(cid).or_default();
        m.wids.extend_from_slice(wids);
        m.shared = None;
    }

    fn remove(&mut self, cid: u64, wid: i64) {
        if let Some(m) = self.members.get_mut(&cid) {
            m.wids.retain(|&x| x != wid);
            m.shared = None;
            if m.wids.is_empty() {
                self.members.remove(&cid);
            }
        }
    }
}

/// The upstream stream.
struct Link {
    tx: mpsc::UnboundedSender<Bytes>,
    head: Option<oneshot::Receiver<Response<ResponseBody>>>,
    body: Option<mpsc::Receiver<Frame<Bytes>>>,
    decoder: Decoder,
}

/// What the upstream stream did.
enum LinkEvent {
    Head(Option<Response<ResponseBody>>),
    Frame(Option<Frame<Bytes>>),
}

impl Link {
    async fn next(link: &mut Option<Link>) -> LinkEvent {
        let Some(link) = link else {
            return std::future::pending().await;
        };
        if let Some(head) = &mut link.head {
            let r = head.await.ok();
            link.head = None;
            return LinkEvent::Head(r);
        }
        match &mut link.body {
            Some(body) => LinkEvent::Frame(body.recv().await),
            None => std::future::pending().await,
        }
    }
}

pub(super) struct Hub {
    upstream: Arc<Upstream>,
    limits: Limits,
    namespace: Option<Namespace>,
    /// The upstream call's metadata.
    headers: HeaderMap,
    rx: mpsc::UnboundedReceiver<ToHub>,
    clients: HashMap<u64, ClientEntry>,
    groups: HashMap<i64, Group>,
    /// The group new watchers of a range join.
    heads: HashMap<Range, i64>,
    /// Catch-up groups of a range, to be merged into its head.
    trailing: HashMap<Range, Vec<i64>>,
    next_gid: i64,
    link: Option<Link>,
    /// Streams waiting for the answer of the progress request on its way, and those that asked
    /// after it was sent (they need a newer answer).
    progress_asked: Vec<u64>,
    progress_next: Vec<u64>,
    /// What this hub last added to the shared gauges: (upstream watchers, client watchers).
    reported: (i64, i64),
    /// Watchers or groups may have changed since the gauges were brought up to date.
    dirty: bool,
}

impl Hub {
    pub(super) fn new(
        upstream: Arc<Upstream>,
        limits: Limits,
        namespace: Option<Namespace>,
        headers: HeaderMap,
        rx: mpsc::UnboundedReceiver<ToHub>,
    ) -> Hub {
        Hub {
            upstream,
            limits,
            namespace,
            headers,
            rx,
            clients: HashMap::new(),
            groups: HashMap::new(),
            heads: HashMap::new(),
            trailing: HashMap::new(),
            next_gid: 1,
            link: None,
            progress_asked: Vec::new(),
            progress_next: Vec::new(),
            reported: (0, 0),
            dirty: false,
        }
    }

    pub(super) async fn run(mut self) {
        loop {
            tokio::select! {
                msg = self.rx.recv() => match msg {
                    Some(m) => self.on_client(m),
                    None => break,
                },
                ev = Link::next(&mut self.link) => self.on_link(ev),
            }
            self.report();
        }
        self.groups.clear();
        self.clients.clear();
        self.dirty = true;
        self.report();
    }

    // ---- client streams ---------------------------------------------------------------------

    fn on_client(&mut self, msg: ToHub) {
        self.dirty = true;
        match msg {
            ToHub::Join { cid, tx, queued } => {
                self.clients.insert(
                    cid,
                    ClientEntry {
                        tx,
                        queued,
                        watchers: HashMap::new(),
                    },
                );
            }
            ToHub::Attach {
                cid,
                wid,
                range,
                start,
                now,
            } => self.attach(cid, wid, range, start, now),
            ToHub::Detach { cid, wid } => {
                if let Some(gid) = self
                    .clients
                    .get_mut(&cid)
                    .and_then(|c| c.watchers.remove(&wid))
                {
                    self.leave_group(gid, cid, wid);
                }
            }
            ToHub::Progress { cid } => {
                if !self.clients.contains_key(&cid) {
                    return;
                }
                if self.progress_asked.is_empty() {
                    self.progress_asked.push(cid);
                    self.send_upstream(RequestUnion::ProgressRequest(WatchProgressRequest {}));
                } else {
                    self.progress_next.push(cid);
                }
            }
            ToHub::Leave { cid } => {
                let Some(c) = self.clients.remove(&cid) else {
                    return;
                };
                let gids: std::collections::HashSet<i64> = c.watchers.into_values().collect();
                for gid in gids {
                    let Some(g) = self.groups.get_mut(&gid) else {
                        continue;
                    };
                    g.members.remove(&cid);
                    if g.members.is_empty() {
                        self.forget_group(gid);
                        self.send_upstream(RequestUnion::CancelRequest(WatchCancelRequest {
                            watch_id: gid,
                        }));
                    }
                }
            }
        }
    }

    /// Attaches a watcher: to the range's head group if it starts from now or from a revision
    /// the head has not passed; else to a catch-up group of its own. The first watcher of a
    /// range from now gets an upstream watcher from now, and its start is the revision etcd
    /// creates that one at (so etcd sends its events one revision at a time, as it would to the
    /// client directly).
    fn attach(&mut self, cid: u64, wid: i64, range: Range, start: i64, now: i64) {
        if !self.clients.contains_key(&cid) {
            return;
        }
        let head = self
            .heads
            .get(&range)
            .copied()
            .map(|h| (h, self.groups.get(&h).map_or(0, |g| g.next)));
        let first = match head {
            // The head is not created yet: its watchers from now start where it does.
            Some((h, 0)) if start == 0 => {
                self.join(h, cid, wid, None);
                return;
            }
            Some((h, next)) if start == 0 => Some((h, (now + 1).max(next))),
            Some((h, next)) if next > 0 && start >= next => Some((h, start)),
            Some(_) => {
                // A catch-up group that has not passed `start` yet serves it as well.
                let behind = self.trailing.get(&range).and_then(|t| {
                    t.iter().copied().find(|t| {
                        self.groups
                            .get(t)
                            .is_some_and(|g| g.next > 0 && g.next <= start)
                    })
                });
                match behind {
                    Some(t) => Some((t, start)),
                    None => Some((self.new_group(range, start, false), start)),
                }
            }
            None if start == 0 => {
                let h = self.new_group(range, 0, true);
                self.join(h, cid, wid, None);
                return;
            }
            None => Some((self.new_group(range, start, true), start)),
        };
        if let Some((gid, first)) = first {
            self.join(gid, cid, wid, Some(first));
        }
    }

    /// Puts a watcher in group `gid`; its created answer goes now with its first revision, or
    /// (`None`) when etcd has created the group's upstream watcher.
    fn join(&mut self, gid: i64, cid: u64, wid: i64, first: Option<i64>) {
        if let Some(g) = self.groups.get_mut(&gid) {
            g.add(cid, &[wid]);
            if first.is_none() {
                g.waiting.push((cid, wid));
            }
        }
        if let Some(c) = self.clients.get_mut(&cid) {
            c.watchers.insert(wid, gid);
            if let Some(start) = first {
                c.send(Dispatch::Created { wid, start }, true);
            }
        }
    }

    /// A new upstream watcher of `range` from revision `start`.
    fn new_group(&mut self, range: Range, start: i64, head: bool) -> i64 {
        let gid = self.next_gid;
        self.next_gid += 1;
        self.send_upstream(RequestUnion::CreateRequest(WatchCreateRequest {
            key: range.0.clone(),
            range_end: range.1.clone(),
            start_revision: start,
            progress_notify: true,
            prev_kv: true,
            fragment: true,
            watch_id: gid,
            ..Default::default()
        }));
        if head {
            self.heads.insert(range.clone(), gid);
        } else {
            self.trailing.entry(range.clone()).or_default().push(gid);
        }
        self.groups.insert(
            gid,
            Group {
                range,
                next: start,
                members: HashMap::new(),
                fragments: Vec::new(),
                waiting: Vec::new(),
            },
        );
        gid
    }

    /// Takes a watcher out of its group; an empty group's upstream watcher is canceled.
    fn leave_group(&mut self, gid: i64, cid: u64, wid: i64) {
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        g.remove(cid, wid);
        if g.members.is_empty() {
            self.forget_group(gid);
            self.send_upstream(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: gid,
            }));
        }
    }

    /// Drops a group from the maps; a head is replaced by its most advanced catch-up group.
    fn forget_group(&mut self, gid: i64) -> Option<Group> {
        let g = self.groups.remove(&gid)?;
        if self.heads.get(&g.range) == Some(&gid) {
            self.heads.remove(&g.range);
            if let Some(trail) = self.trailing.get_mut(&g.range) {
                let best = trail
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, t)| self.groups.get(t).map_or(0, |t| t.next))
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    let promoted = trail.swap_remove(i);
                    self.heads.insert(g.range.clone(), promoted);
                }
            }
        } else if let Some(trail) = self.trailing.get_mut(&g.range) {
            trail.retain(|&t| t != gid);
        }
        if self.trailing.get(&g.range).is_some_and(Vec::is_empty) {
            self.trailing.remove(&g.range);
        }
        Some(g)
    }

    // ---- the upstream stream ----------------------------------------------------------------

    fn send_upstream(&mut self, req: RequestUnion) {
        let link = self.link.get_or_insert_with(|| {
            let (tx, head) = watch_session(&self.upstream, self.headers.clone(), self.limits);
            Link {
                tx,
                head: Some(head),
                body: None,
                decoder: Decoder::new(self.limits.decoded_response()),
            }
        });
        let mut out = BytesMut::new();
        encode_message(
            &WatchRequest {
                request_union: Some(req),
            },
            &mut out,
        );
        let _ = link.tx.send(out.freeze());
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Head(None) => self.end_all(status_headers(
                INTERNAL,
                "etcd-proxy: the upstream watch stream ended without an answer",
            )),
            LinkEvent::Head(Some(resp)) => {
                let (head, body) = resp.into_parts();
                match body {
                    ResponseBody::Channel(rx) if grpc_status(&head.headers).is_none() => {
                        if let Some(link) = &mut self.link {
                            link.body = Some(rx);
                        }
                    }
                    // Trailers-only: the stream was refused (e.g. no leader under `hasleader`).
                    _ => self.end_all(head.headers),
                }
            }
            LinkEvent::Frame(Some(frame)) => match frame.into_data() {
                Ok(data) => {
                    let mut messages = Vec::new();
                    let mut failed = None;
                    if let Some(link) = &mut self.link {
                        link.decoder.push(&data);
                        loop {
                            match link.decoder.next_message() {
                                Ok(Some(m)) => messages.push(m),
                                Ok(None) => break,
                                Err(e) => {
                                    failed = Some(crate::rewrite::Status::from(e));
                                    break;
                                }
                            }
                        }
                    }
                    for m in messages {
                        match WatchResponse::decode(m) {
                            Ok(resp) => self.on_upstream(resp),
                            Err(e) => {
                                let message = format!("etcd-proxy: bad watch response: {e}");
                                self.end_all(status_headers(INTERNAL, &message));
                                return;
                            }
                        }
                    }
                    if let Some(status) = failed {
                        self.end_all(status_headers(status.code, &status.message));
                    }
                }
                Err(frame) => self.end_all(frame.into_trailers().unwrap_or_default()),
            },
            LinkEvent::Frame(None) => self.end_all(status_headers(
                INTERNAL,
                "etcd-proxy: the upstream watch stream ended without a status",
            )),
        }
    }

    /// The upstream stream is over for good: every client stream ends with its status, and the
    /// next watcher starts afresh.
    fn end_all(&mut self, status: HeaderMap) {
        self.dirty = true;
        tracing::info!(
            status = ?grpc_status(&status),
            "upstream watch stream ended; ending the client streams that shared it"
        );
        for (_, c) in self.clients.drain() {
            c.send(Dispatch::End(status.clone()), true);
        }
        self.groups.clear();
        self.heads.clear();
        self.trailing.clear();
        self.link = None;
        self.progress_asked.clear();
        self.progress_next.clear();
    }

    fn on_upstream(&mut self, mut resp: WatchResponse) {
        if resp.watch_id == -1 && !resp.created && resp.events.is_empty() {
            self.progress_answer(resp.header);
            return;
        }
        let gid = resp.watch_id;
        let Some(g) = self.groups.get_mut(&gid) else {
            // A group already forgotten: its cancel is on its way.
            return;
        };
        if resp.canceled {
            self.cancel_group(gid, resp);
            return;
        }
        if resp.created {
            if g.next == 0 {
                // A group from now: its watchers start after etcd's current revision.
                g.next = resp.header.as_ref().map_or(0, |h| h.revision) + 1;
                let start = g.next;
                for (cid, wid) in std::mem::take(&mut g.waiting) {
                    if let Some(c) = self.clients.get(&cid)
                        && c.watchers.get(&wid) == Some(&gid)
                    {
                        c.send(Dispatch::Created { wid, start }, true);
                    }
                }
                if let Some(range) = self.groups.get(&gid).map(|g| g.range.clone()) {
                    self.merge(&range);
                }
            }
            return;
        }
        if resp.fragment {
            g.fragments.append(&mut resp.events);
            return;
        }
        if !g.fragments.is_empty() {
            let mut all = std::mem::take(&mut g.fragments);
            all.append(&mut resp.events);
            resp.events = all;
        }
        let after = match resp.events.last().and_then(|e| e.kv.as_ref()) {
            Some(kv) => kv.mod_revision + 1,
            None => resp.header.as_ref().map_or(0, |h| h.revision) + 1,
        };
        g.next = g.next.max(after);
        if let Some(ns) = &self.namespace
            && ns.watch_response(&mut resp).is_err()
        {
            tracing::error!("etcd returned a key outside the namespace; canceling the watchers");
            let reason = "etcd-proxy: etcd returned a key outside the namespace";
            let cancel = WatchResponse {
                header: resp.header,
                watch_id: gid,
                canceled: true,
                cancel_reason: reason.to_string(),
                ..Default::default()
            };
            self.send_upstream(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: gid,
            }));
            self.cancel_group(gid, cancel);
            return;
        }
        self.share(gid, resp);
        if let Some(range) = self.groups.get(&gid).map(|g| g.range.clone()) {
            self.merge(&range);
        }
    }

    /// Hands one response of group `gid` to its watchers' streams; a stream over its bound
    /// has its watchers of this group detached instead.
    fn share(&mut self, gid: i64, resp: WatchResponse) {
        let Some(g) = self.groups.get_mut(&gid) else {
            return;
        };
        let has_events = !resp.events.is_empty();
        let shared = Arc::new(Shared::new(resp));
        let mut slow = Vec::new();
        let mut receivers = 0u64;
        for (cid, m) in &mut g.members {
            let Some(c) = self.clients.get(cid) else {
                continue;
            };
            let wids = m.ids();
            let n = wids.len() as u64;
            let d = Dispatch::Events {
                wids,
                shared: shared.clone(),
            };
            if c.send(d, false) {
                receivers += n;
            } else {
                slow.push(*cid);
            }
        }
        if has_events && receivers > 1 {
            STREAMS.events_coalescing.inc_by(receivers - 1);
        }
        for cid in slow {
            let wids: Vec<i64> = self
                .groups
                .get(&gid)
                .and_then(|g| g.members.get(&cid))
                .map(|m| m.wids.clone())
                .unwrap_or_default();
            self.dirty = true;
            tracing::info!(
                client = cid,
                watchers = wids.len(),
                "client stream fell behind; its watchers will catch up from etcd's history"
            );
            if let Some(c) = self.clients.get_mut(&cid) {
                for wid in &wids {
                    c.watchers.remove(wid);
                }
            }
            for &wid in &wids {
                self.leave_group(gid, cid, wid);
            }
            if let Some(c) = self.clients.get(&cid) {
                c.send(Dispatch::Detached { wids }, true);
            }
        }
    }

    /// Moves every catch-up group of `range` that has caught up with the head into the head.
    fn merge(&mut self, range: &Range) {
        let Some(&head) = self.heads.get(range) else {
            return;
        };
        let Some(h) = self.groups.get(&head) else {
            return;
        };
        if !h.fragments.is_empty() || h.next == 0 {
            return;
        }
        let head_next = h.next;
        let ready: Vec<i64> = self
            .trailing
            .get(range)
            .map(|t| {
                t.iter()
                    .copied()
                    .filter(|t| {
                        self.groups
                            .get(t)
                            .is_some_and(|g| g.next >= head_next && g.fragments.is_empty())
                    })
                    .collect()
            })
            .unwrap_or_default();
        for t in ready {
            let Some(g) = self.forget_group(t) else {
                continue;
            };
            self.send_upstream(RequestUnion::CancelRequest(WatchCancelRequest {
                watch_id: t,
            }));
            self.dirty = true;
            for (cid, m) in g.members {
                if let Some(c) = self.clients.get_mut(&cid) {
                    for &wid in &m.wids {
                        c.watchers.insert(wid, head);
                    }
                }
                if let Some(h) = self.groups.get_mut(&head) {
                    h.add(cid, &m.wids);
                }
            }
        }
    }

    /// etcd canceled group `gid`: each of its watchers gets the cancel, and the group is
    /// forgotten so that no new watcher joins it.
    fn cancel_group(&mut self, gid: i64, resp: WatchResponse) {
        let Some(g) = self.forget_group(gid) else {
            return;
        };
        tracing::debug!(group = gid, reason = %resp.cancel_reason, compact_revision = resp.compact_revision, "etcd canceled an upstream watcher");
        let mut cancel = WatchResponse {
            header: resp.header,
            canceled: true,
            compact_revision: resp.compact_revision,
            cancel_reason: resp.cancel_reason,
            ..Default::default()
        };
        if cancel.cancel_reason.is_empty() && cancel.compact_revision == 0 {
            cancel.cancel_reason = "etcd-proxy: etcd canceled the shared watcher".to_string();
        }
        self.dirty = true;
        for (cid, m) in g.members {
            if let Some(c) = self.clients.get_mut(&cid) {
                for &wid in &m.wids {
                    c.watchers.remove(&wid);
                    c.send(
                        Dispatch::Canceled {
                            wid,
                            resp: cancel.clone(),
                        },
                        true,
                    );
                }
            }
        }
    }

    fn progress_answer(&mut self, header: Option<ResponseHeader>) {
        for cid in std::mem::take(&mut self.progress_asked) {
            if let Some(c) = self.clients.get(&cid) {
                c.send(Dispatch::Progress { header }, true);
            }
        }
        if !self.progress_next.is_empty() {
            self.progress_asked = std::mem::take(&mut self.progress_next);
            self.send_upstream(RequestUnion::ProgressRequest(WatchProgressRequest {}));
        }
    }

    /// Brings the shared gauges up to date with this hub's counts.
    fn report(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        let upstream = self.groups.len() as i64;
        let clients = self.groups.values().map(Group::len).sum::<usize>() as i64;
        let (u0, c0) = self.reported;
        if (upstream, clients) != (u0, c0) {
            STREAMS.watch_upstream_watchers.add(upstream - u0);
            STREAMS.watch_client_watchers.add(clients - c0);
            STREAMS
                .watchers_coalescing
                .add((clients - upstream) - (c0 - u0));
            self.reported = (upstream, clients);
        }
    }
}

//! `--namespace`: the one place where client keys become etcd keys and back, for requests going
//! in and responses coming out, so the two directions cannot disagree.
//!
//! Ranges follow etcd's `clientv3/namespace` (`prefixInterval`): a key gets the prefix; a range
//! end `""` (single key) stays `""`; `"\x00"` (from the key to the end of the key space) becomes
//! the end of the prefix's range; any other end gets the prefix. So every range sent to etcd lies
//! inside `[prefix, prefix_end(prefix))`, and every key etcd returns should start with the
//! prefix. One that does not is a bug somewhere: it is refused ([`OutsideNamespace`]) instead of
//! reaching the client, except the keys of a lease, which may legitimately lie anywhere and are
//! filtered.
//!
//! Unlike etcd's proxy, Lock and Election names and keys are namespaced too: a client of a
//! namespaced proxy can neither read, write, watch nor learn of a key outside its prefix.
//! Pure functions, no I/O.

use bytes::{BufMut, Bytes, BytesMut};
use etcd_api::etcdserverpb::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, LeaseTimeToLiveResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RequestOp, ResponseOp, TxnRequest, TxnResponse,
    WatchRequest, WatchResponse, request_op, response_op, watch_request,
};
use etcd_api::mvccpb::KeyValue;
use etcd_api::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ResignRequest,
};
use etcd_api::v3lockpb::{LockRequest, LockResponse, UnlockRequest};

/// A request etcd itself would refuse, refused before it is prefixed (a prefixed empty key
/// would no longer be empty, and would write or read the prefix itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Range, Put or DeleteRange (alone or in a Txn) without a key: etcd's `ErrGRPCEmptyKey`.
    #[error("etcdserver: key is not provided")]
    EmptyKey,
}

/// etcd returned a key outside the namespace where none can legitimately be: a bug, answered
/// with an error rather than leaked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("etcd returned a key outside the proxy's namespace")]
pub struct OutsideNamespace;

/// The end of the range of keys that start with `prefix`, as etcd's `GetPrefixRangeEnd`: the
/// prefix with its last byte below 0xff incremented and what follows dropped; `"\x00"` (the end
/// of the key space) when every byte is 0xff or the prefix is empty.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = BytesMut::with_capacity(i + 1);
            end.put_slice(&prefix[..i]);
            end.put_u8(prefix[i] + 1);
            end.freeze()
        }
        None => Bytes::from_static(b"\x00"),
    }
}

/// A key prefix that every key of a client goes under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    prefix: Bytes,
    end: Bytes,
}

impl Namespace {
    /// The namespace `prefix`; `None` for the empty prefix, which is no namespace at all.
    pub fn new(prefix: impl Into<Bytes>) -> Option<Namespace> {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return None;
        }
        let end = prefix_end(&prefix);
        Some(Namespace { prefix, end })
    }

    /// The prefix.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The end of the prefix's range ([`prefix_end`]).
    pub fn end(&self) -> &[u8] {
        &self.end
    }

    /// A client key as etcd stores it.
    pub fn key(&self, key: &[u8]) -> Bytes {
        let mut k = BytesMut::with_capacity(self.prefix.len() + key.len());
        k.put_slice(&self.prefix);
        k.put_slice(key);
        k.freeze()
    }

    /// A client range end as etcd sees it (see the module comment).
    pub fn range_end(&self, end: &[u8]) -> Bytes {
        match end {
            b"" => Bytes::new(),
            b"\x00" => self.end.clone(),
            _ => self.key(end),
        }
    }

    /// An etcd key as the client knows it, or `None` when it is not under the prefix.
    pub fn strip(&self, key: &Bytes) -> Option<Bytes> {
        key.starts_with(&self.prefix)
            .then(|| key.slice(self.prefix.len()..))
    }

    fn strip_key(&self, key: &mut Bytes) -> Result<(), OutsideNamespace> {
        *key = self.strip(key).ok_or(OutsideNamespace)?;
        Ok(())
    }

    fn strip_kv(&self, kv: &mut KeyValue) -> Result<(), OutsideNamespace> {
        self.strip_key(&mut kv.key)
    }

    fn strip_kvs(&self, kvs: &mut [KeyValue]) -> Result<(), OutsideNamespace> {
        kvs.iter_mut().try_for_each(|kv| self.strip_kv(kv))
    }

    fn prefix_key(&self, key: &mut Bytes) {
        *key = self.key(key);
    }

    /// A key that must not be empty (Range, Put, DeleteRange), prefixed.
    fn prefix_required_key(&self, key: &mut Bytes) -> Result<(), Refusal> {
        if key.is_empty() {
            return Err(Refusal::EmptyKey);
        }
        self.prefix_key(key);
        Ok(())
    }

    fn prefix_range(&self, key: &mut Bytes, end: &mut Bytes) {
        self.prefix_key(key);
        *end = self.range_end(end);
    }

    // Requests: client keys to etcd keys.

    /// `KV/Range`.
    pub fn range_request(&self, r: &mut RangeRequest) -> Result<(), Refusal> {
        self.prefix_required_key(&mut r.key)?;
        r.range_end = self.range_end(&r.range_end);
        Ok(())
    }

    /// `KV/Put`.
    pub fn put_request(&self, r: &mut PutRequest) -> Result<(), Refusal> {
        self.prefix_required_key(&mut r.key)
    }

    /// `KV/DeleteRange`.
    pub fn delete_range_request(&self, r: &mut DeleteRangeRequest) -> Result<(), Refusal> {
        self.prefix_required_key(&mut r.key)?;
        r.range_end = self.range_end(&r.range_end);
        Ok(())
    }

    /// `KV/Txn`: every compare and every operation, nested transactions included.
    pub fn txn_request(&self, r: &mut TxnRequest) -> Result<(), Refusal> {
        r.compare.iter_mut().for_each(|c| self.compare(c));
        r.success
            .iter_mut()
            .chain(r.failure.iter_mut())
            .try_for_each(|op| self.request_op(op))
    }

    fn compare(&self, c: &mut Compare) {
        self.prefix_range(&mut c.key, &mut c.range_end);
    }

    fn request_op(&self, op: &mut RequestOp) -> Result<(), Refusal> {
        match &mut op.request {
            Some(request_op::Request::RequestRange(r)) => self.range_request(r),
            Some(request_op::Request::RequestPut(r)) => self.put_request(r),
            Some(request_op::Request::RequestDeleteRange(r)) => self.delete_range_request(r),
            Some(request_op::Request::RequestTxn(r)) => self.txn_request(r),
            None => Ok(()),
        }
    }

    /// `Watch/Watch`: a create request's range; cancel and progress requests have no key.
    pub fn watch_request(&self, r: &mut WatchRequest) {
        if let Some(watch_request::RequestUnion::CreateRequest(c)) = &mut r.request_union {
            self.prefix_range(&mut c.key, &mut c.range_end);
        }
    }

    /// `Lock/Lock`: the lock's name (etcd makes the key `name/<lease>` from it).
    pub fn lock_request(&self, r: &mut LockRequest) {
        self.prefix_key(&mut r.name);
    }

    /// `Lock/Unlock`: the key `Lock` returned.
    pub fn unlock_request(&self, r: &mut UnlockRequest) {
        self.prefix_key(&mut r.key);
    }

    /// `Election/Campaign`.
    pub fn campaign_request(&self, r: &mut CampaignRequest) {
        self.prefix_key(&mut r.name);
    }

    /// `Election/Leader` and `Election/Observe`.
    pub fn leader_request(&self, r: &mut LeaderRequest) {
        self.prefix_key(&mut r.name);
    }

    /// `Election/Proclaim`.
    pub fn proclaim_request(&self, r: &mut ProclaimRequest) {
        if let Some(l) = &mut r.leader {
            self.prefix_leader_key(l);
        }
    }

    /// `Election/Resign`.
    pub fn resign_request(&self, r: &mut ResignRequest) {
        if let Some(l) = &mut r.leader {
            self.prefix_leader_key(l);
        }
    }

    fn prefix_leader_key(&self, l: &mut LeaderKey) {
        self.prefix_key(&mut l.name);
        self.prefix_key(&mut l.key);
    }

    // Responses: etcd keys to client keys.

    /// `KV/Range`.
    pub fn range_response(&self, r: &mut RangeResponse) -> Result<(), OutsideNamespace> {
        self.strip_kvs(&mut r.kvs)
    }

    /// `KV/Put`: the previous key-value, when asked for.
    pub fn put_response(&self, r: &mut PutResponse) -> Result<(), OutsideNamespace> {
        r.prev_kv.as_mut().map_or(Ok(()), |kv| self.strip_kv(kv))
    }

    /// `KV/DeleteRange`: the deleted key-values, when asked for.
    pub fn delete_range_response(
        &self,
        r: &mut DeleteRangeResponse,
    ) -> Result<(), OutsideNamespace> {
        self.strip_kvs(&mut r.prev_kvs)
    }

    /// `KV/Txn`: every response, nested transactions included.
    pub fn txn_response(&self, r: &mut TxnResponse) -> Result<(), OutsideNamespace> {
        r.responses
            .iter_mut()
            .try_for_each(|op| self.response_op(op))
    }

    fn response_op(&self, op: &mut ResponseOp) -> Result<(), OutsideNamespace> {
        match &mut op.response {
            Some(response_op::Response::ResponseRange(r)) => self.range_response(r),
            Some(response_op::Response::ResponsePut(r)) => self.put_response(r),
            Some(response_op::Response::ResponseDeleteRange(r)) => self.delete_range_response(r),
            Some(response_op::Response::ResponseTxn(r)) => self.txn_response(r),
            None => Ok(()),
        }
    }

    /// `Watch/Watch`: every event's key-value and previous key-value.
    pub fn watch_response(&self, r: &mut WatchResponse) -> Result<(), OutsideNamespace> {
        r.events.iter_mut().try_for_each(|e| {
            if let Some(kv) = &mut e.kv {
                self.strip_kv(kv)?;
            }
            if let Some(kv) = &mut e.prev_kv {
                self.strip_kv(kv)?;
            }
            Ok(())
        })
    }

    /// `Lease/LeaseTimeToLive`: a lease is not namespaced and may hold keys of other
    /// namespaces; only the keys under the prefix are listed, stripped.
    pub fn lease_time_to_live_response(&self, r: &mut LeaseTimeToLiveResponse) {
        r.keys.retain_mut(|k| match self.strip(k) {
            Some(s) => {
                *k = s;
                true
            }
            None => false,
        });
    }

    /// `Lock/Lock`: the lock's key.
    pub fn lock_response(&self, r: &mut LockResponse) -> Result<(), OutsideNamespace> {
        self.strip_key(&mut r.key)
    }

    /// `Election/Campaign`: the leader key.
    pub fn campaign_response(&self, r: &mut CampaignResponse) -> Result<(), OutsideNamespace> {
        match &mut r.leader {
            Some(l) => {
                self.strip_key(&mut l.name)?;
                self.strip_key(&mut l.key)
            }
            None => Ok(()),
        }
    }

    /// `Election/Leader` and `Election/Observe`: the leader's key-value.
    pub fn leader_response(&self, r: &mut LeaderResponse) -> Result<(), OutsideNamespace> {
        r.kv.as_mut().map_or(Ok(()), |kv| self.strip_kv(kv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_api::etcdserverpb::{WatchCreateRequest, compare};
    use etcd_api::mvccpb::Event;
    use proptest::prelude::*;

    fn ns(p: &[u8]) -> Namespace {
        Namespace::new(Bytes::copy_from_slice(p)).unwrap()
    }

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    /// etcd's `client/v3/namespace/util_test.go` vectors.
    #[test]
    fn prefix_interval_vectors() {
        // (prefix, key, end, prefixed key, prefixed end)
        type Case = (
            &'static [u8],
            &'static [u8],
            &'static [u8],
            &'static [u8],
            &'static [u8],
        );
        let cases: &[Case] = &[
            (b"pfx/", b"a", b"", b"pfx/a", b""),
            (b"pfx/", b"abc", b"def", b"pfx/abc", b"pfx/def"),
            (b"pfx/", b"abc", b"\x00", b"pfx/abc", b"pfx0"),
            (b"\xff\xff", b"abc", b"\x00", b"\xff\xffabc", b"\x00"),
            (b"a\xff", b"k", b"\x00", b"a\xffk", b"b"),
        ];
        for &(p, key, end, want_key, want_end) in cases {
            let n = ns(p);
            assert_eq!(n.key(key), want_key, "{p:?} {key:?}");
            assert_eq!(n.range_end(end), want_end, "{p:?} {end:?}");
        }
        assert_eq!(prefix_end(b""), &b"\x00"[..]);
        assert!(Namespace::new(Bytes::new()).is_none());
    }

    #[test]
    fn strip_refuses_keys_outside() {
        let n = ns(b"/app/");
        assert_eq!(n.strip(&b(b"/app/k")), Some(b(b"k")));
        assert_eq!(n.strip(&b(b"/app/")), Some(Bytes::new()));
        assert_eq!(n.strip(&b(b"/app")), None);
        assert_eq!(n.strip(&b(b"/other/k")), None);
        let mut r = RangeResponse {
            kvs: vec![KeyValue {
                key: b(b"/other/k"),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(n.range_response(&mut r), Err(OutsideNamespace));
    }

    #[test]
    fn empty_keys_are_refused_like_etcd() {
        let n = ns(b"/app/");
        assert_eq!(
            n.put_request(&mut PutRequest::default()),
            Err(Refusal::EmptyKey)
        );
        assert_eq!(
            n.range_request(&mut RangeRequest {
                range_end: b(b"\x00"),
                ..Default::default()
            }),
            Err(Refusal::EmptyKey)
        );
        let mut txn = TxnRequest {
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    failure: vec![RequestOp {
                        request: Some(request_op::Request::RequestDeleteRange(
                            DeleteRangeRequest::default(),
                        )),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert_eq!(n.txn_request(&mut txn), Err(Refusal::EmptyKey));
        // A watch of "" is allowed by etcd: it becomes a watch of the prefix itself.
        let mut w = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest::default(),
            )),
        };
        n.watch_request(&mut w);
    }

    #[test]
    fn txn_is_rewritten_recursively_both_ways() {
        let n = ns(b"ns/");
        let mut req = TxnRequest {
            compare: vec![Compare {
                key: b(b"c"),
                range_end: b(b"\x00"),
                target: compare::CompareTarget::Value as i32,
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestTxn(TxnRequest {
                    compare: vec![Compare {
                        key: b(b"d"),
                        ..Default::default()
                    }],
                    success: vec![RequestOp {
                        request: Some(request_op::Request::RequestPut(PutRequest {
                            key: b(b"p"),
                            ..Default::default()
                        })),
                    }],
                    failure: vec![RequestOp {
                        request: Some(request_op::Request::RequestRange(RangeRequest {
                            key: b(b"r"),
                            range_end: b(b"s"),
                            ..Default::default()
                        })),
                    }],
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(
                    DeleteRangeRequest {
                        key: b(b"x"),
                        range_end: b(b"\x00"),
                        ..Default::default()
                    },
                )),
            }],
        };
        n.txn_request(&mut req).unwrap();
        assert_eq!(req.compare[0].key, &b"ns/c"[..]);
        assert_eq!(req.compare[0].range_end, &b"ns0"[..]);
        let Some(request_op::Request::RequestTxn(inner)) = &req.success[0].request else {
            panic!("nested txn lost")
        };
        assert_eq!(inner.compare[0].key, &b"ns/d"[..]);
        assert_eq!(inner.compare[0].range_end, &b""[..]);
        let Some(request_op::Request::RequestPut(p)) = &inner.success[0].request else {
            panic!()
        };
        assert_eq!(p.key, &b"ns/p"[..]);
        let Some(request_op::Request::RequestRange(r)) = &inner.failure[0].request else {
            panic!()
        };
        assert_eq!((&r.key[..], &r.range_end[..]), (&b"ns/r"[..], &b"ns/s"[..]));
        let Some(request_op::Request::RequestDeleteRange(d)) = &req.failure[0].request else {
            panic!()
        };
        assert_eq!((&d.key[..], &d.range_end[..]), (&b"ns/x"[..], &b"ns0"[..]));

        let kv = |k: &[u8]| KeyValue {
            key: b(k),
            ..Default::default()
        };
        let mut resp = TxnResponse {
            responses: vec![ResponseOp {
                response: Some(response_op::Response::ResponseTxn(TxnResponse {
                    responses: vec![
                        ResponseOp {
                            response: Some(response_op::Response::ResponseRange(RangeResponse {
                                kvs: vec![kv(b"ns/a")],
                                ..Default::default()
                            })),
                        },
                        ResponseOp {
                            response: Some(response_op::Response::ResponsePut(PutResponse {
                                prev_kv: Some(kv(b"ns/b")),
                                ..Default::default()
                            })),
                        },
                        ResponseOp {
                            response: Some(response_op::Response::ResponseDeleteRange(
                                DeleteRangeResponse {
                                    prev_kvs: vec![kv(b"ns/c")],
                                    ..Default::default()
                                },
                            )),
                        },
                    ],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        n.txn_response(&mut resp).unwrap();
        let Some(response_op::Response::ResponseTxn(inner)) = &resp.responses[0].response else {
            panic!()
        };
        let Some(response_op::Response::ResponseRange(r)) = &inner.responses[0].response else {
            panic!()
        };
        assert_eq!(r.kvs[0].key, &b"a"[..]);
        let Some(response_op::Response::ResponsePut(p)) = &inner.responses[1].response else {
            panic!()
        };
        assert_eq!(p.prev_kv.as_ref().unwrap().key, &b"b"[..]);
        let Some(response_op::Response::ResponseDeleteRange(d)) = &inner.responses[2].response
        else {
            panic!()
        };
        assert_eq!(d.prev_kvs[0].key, &b"c"[..]);

        // A leak deep inside is still caught.
        let mut leak = TxnResponse {
            responses: vec![ResponseOp {
                response: Some(response_op::Response::ResponseTxn(TxnResponse {
                    responses: vec![ResponseOp {
                        response: Some(response_op::Response::ResponsePut(PutResponse {
                            prev_kv: Some(kv(b"other")),
                            ..Default::default()
                        })),
                    }],
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        assert_eq!(n.txn_response(&mut leak), Err(OutsideNamespace));
    }

    #[test]
    fn watch_lease_lock_and_election() {
        let n = ns(b"/app/");
        let kv = |k: &[u8]| KeyValue {
            key: b(k),
            ..Default::default()
        };
        let mut w = WatchResponse {
            events: vec![Event {
                kv: Some(kv(b"/app/k")),
                prev_kv: Some(kv(b"/app/k")),
                ..Default::default()
            }],
            ..Default::default()
        };
        n.watch_response(&mut w).unwrap();
        assert_eq!(w.events[0].kv.as_ref().unwrap().key, &b"k"[..]);
        assert_eq!(w.events[0].prev_kv.as_ref().unwrap().key, &b"k"[..]);
        w.events[0].prev_kv = Some(kv(b"/x"));
        w.events[0].kv = Some(kv(b"/app/k"));
        assert_eq!(n.watch_response(&mut w), Err(OutsideNamespace));

        let mut t = LeaseTimeToLiveResponse {
            keys: vec![b(b"/app/a"), b(b"/other/b"), b(b"/app/c")],
            ..Default::default()
        };
        n.lease_time_to_live_response(&mut t);
        assert_eq!(t.keys, vec![b(b"a"), b(b"c")]);

        let mut l = LockRequest {
            name: b(b"mylock"),
            lease: 7,
        };
        n.lock_request(&mut l);
        assert_eq!(l.name, &b"/app/mylock"[..]);
        let mut lr = LockResponse {
            key: b(b"/app/mylock/694d"),
            ..Default::default()
        };
        n.lock_response(&mut lr).unwrap();
        assert_eq!(lr.key, &b"mylock/694d"[..]);
        let mut u = UnlockRequest { key: lr.key };
        n.unlock_request(&mut u);
        assert_eq!(u.key, &b"/app/mylock/694d"[..]);

        let mut c = CampaignRequest {
            name: b(b"e"),
            ..Default::default()
        };
        n.campaign_request(&mut c);
        assert_eq!(c.name, &b"/app/e"[..]);
        let mut cr = CampaignResponse {
            leader: Some(LeaderKey {
                name: b(b"/app/e"),
                key: b(b"/app/e/1"),
                ..Default::default()
            }),
            ..Default::default()
        };
        n.campaign_response(&mut cr).unwrap();
        let leader = cr.leader.clone().unwrap();
        assert_eq!(
            (&leader.name[..], &leader.key[..]),
            (&b"e"[..], &b"e/1"[..])
        );
        let mut p = ProclaimRequest {
            leader: Some(leader.clone()),
            ..Default::default()
        };
        n.proclaim_request(&mut p);
        assert_eq!(p.leader.unwrap().key, &b"/app/e/1"[..]);
        let mut r = ResignRequest {
            leader: Some(leader),
        };
        n.resign_request(&mut r);
        assert_eq!(r.leader.unwrap().name, &b"/app/e"[..]);
        let mut lreq = LeaderRequest { name: b(b"e") };
        n.leader_request(&mut lreq);
        assert_eq!(lreq.name, &b"/app/e"[..]);
        let mut lresp = LeaderResponse {
            kv: Some(kv(b"/app/e/1")),
            ..Default::default()
        };
        n.leader_response(&mut lresp).unwrap();
        assert_eq!(lresp.kv.unwrap().key, &b"e/1"[..]);
        let mut bad = LeaderResponse {
            kv: Some(kv(b"/ap")),
            ..Default::default()
        };
        assert_eq!(n.leader_response(&mut bad), Err(OutsideNamespace));
    }

    /// Bytes over a small alphabet with the edge bytes, so that prefixes, keys and ends collide
    /// often.
    fn small_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![Just(0u8), Just(b'a'), Just(b'b'), Just(0xffu8)],
            0..=max,
        )
    }

    /// A client range end: mostly the special ones.
    fn range_end() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![Just(Vec::new()), Just(vec![0u8]), small_bytes(3)]
    }

    /// Is `k` (etcd key space) in the server range `[key, end)` under etcd's rules?
    fn in_server_range(k: &[u8], key: &[u8], end: &[u8]) -> bool {
        match end {
            b"" => k == key,
            b"\x00" => k >= key,
            _ => k >= key && k < end,
        }
    }

    /// Every key of length up to `len` over the alphabet.
    fn all_keys(len: usize) -> Vec<Vec<u8>> {
        let mut out = vec![Vec::new()];
        let mut last = vec![Vec::new()];
        for _ in 0..len {
            let next: Vec<Vec<u8>> = last
                .iter()
                .flat_map(|k: &Vec<u8>| {
                    [0u8, b'a', b'b', 0xff].into_iter().map(move |c| {
                        let mut k = k.clone();
                        k.push(c);
                        k
                    })
                })
                .collect();
            out.extend(next.iter().cloned());
            last = next;
        }
        out
    }

    proptest! {
        #[test]
        fn prefix_then_strip_is_identity(p in small_bytes(4), k in small_bytes(6)) {
            prop_assume!(!p.is_empty());
            let n = ns(&p);
            let server = n.key(&k);
            prop_assert!(server.starts_with(&p));
            prop_assert_eq!(n.strip(&server), Some(Bytes::from(k)));
        }

        #[test]
        fn prefixed_ranges_stay_inside_the_namespace(
            p in small_bytes(4), k in small_bytes(4), e in range_end()
        ) {
            prop_assume!(!p.is_empty());
            let n = ns(&p);
            let key = n.key(&k);
            let end = n.range_end(&e);
            // [prefix, prefix_end) contains the start...
            prop_assert!(in_server_range(&key, &p, n.end()));
            // ...and the end never goes past the prefix's end.
            match &e[..] {
                b"" => prop_assert!(end.is_empty()),
                b"\x00" => prop_assert_eq!(&end[..], n.end()),
                _ => {
                    prop_assert!(end.starts_with(&p));
                    prop_assert!(n.end() == b"\x00" || end[..] < *n.end());
                }
            }
        }

        /// The keys a client range selects, in the client's own key space, are exactly the
        /// stripped keys that etcd's range over the prefixed interval selects, whatever the
        /// other keys in etcd (in or out of the namespace). Single keys, from-key ranges
        /// (`"\x00"`), prefix ranges (`prefix_end(k)`, itself `"\x00"` for `""` or all-0xff
        /// keys) and arbitrary ends.
        #[test]
        fn client_ranges_map_to_the_right_server_range(
            p in small_bytes(3), k in small_bytes(2), e in range_end(), as_prefix in any::<bool>()
        ) {
            prop_assume!(!p.is_empty());
            let e = if as_prefix { prefix_end(&k).to_vec() } else { e };
            let n = ns(&p);
            let (key, end) = (n.key(&k), n.range_end(&e));
            let universe = all_keys(4);
            for server_key in universe.iter().chain(
                all_keys(2).iter().map(|c| n.key(c).to_vec()).collect::<Vec<_>>().iter()
            ) {
                let selected = in_server_range(server_key, &key, &end);
                let client_view = n.strip(&Bytes::copy_from_slice(server_key));
                let want = match &client_view {
                    Some(c) => in_server_range(c, &k, &e),
                    None => false,
                };
                prop_assert_eq!(
                    selected, want,
                    "server key {:?}, client range [{:?}, {:?}) -> [{:?}, {:?})",
                    server_key, k, e, key, end
                );
            }
        }
    }
}

//! `Lease/LeaseRevoke` under `--namespace`. Lease IDs are cluster-wide and revoking a lease
//! deletes its keys, wherever they lie; so before a revoke is forwarded, the proxy asks etcd
//! which keys the lease holds (`LeaseTimeToLive` with keys, with the caller's `token` and
//! `authorization`, so etcd's auth applies as for the client) and refuses with
//! `PERMISSION_DENIED` when one lies outside the namespace. Otherwise the client's request goes
//! to etcd unchanged, as bytes; a missing lease gets etcd's own `NotFound`.
//!
//! Race: a key attached to the lease (by a client outside the namespace) between the check and
//! the revoke is deleted with it. etcd has no conditional revoke, so the check cannot be atomic.

use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use prost::Message;

use etcd_api::etcdserverpb::LeaseRevokeRequest;

use crate::cluster::Cluster;
use crate::forward::{PERMISSION_DENIED, ResponseBody, send, status_response};
use crate::rewrite::{Decoder, RequestBody, Rewriter, Status};
use crate::upstream::Upstream;

/// gRPC path of the guarded call.
pub const LEASE_REVOKE_PATH: &str = "/etcdserverpb.Lease/LeaseRevoke";

/// gRPC codes used here.
const RESOURCE_EXHAUSTED: u16 = 8;
const INTERNAL: u16 = 13;

/// Bytes of the gRPC message prefix.
const PREFIX: usize = 5;

/// Serves a `LeaseRevoke` under a namespace: checks the lease's keys, then forwards the
/// request unchanged or refuses it.
pub async fn guard_revoke(
    upstream: &Upstream,
    cluster: &Cluster,
    rewriter: &Rewriter,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
    let (parts, body) = req.into_parts();
    let max = rewriter.limits().request;
    let body = match Limited::new(body, max + PREFIX).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return status_response(
                RESOURCE_EXHAUSTED,
                &format!("grpc: received message larger than max ({max})"),
            );
        }
        Err(e) => return status_response(INTERNAL, &format!("reading the request: {e}")),
    };
    let mut decoder = Decoder::new(max);
    decoder.push(&body);
    let id = match decoder.next_message() {
        Ok(Some(m)) => match LeaseRevokeRequest::decode(m) {
            Ok(r) => r.id,
            Err(e) => {
                return status_response(
                    INTERNAL,
                    &format!("grpc: failed to unmarshal message: {e}"),
                );
            }
        },
        Ok(None) => {
            return status_response(INTERNAL, "grpc: the LeaseRevoke request has no message");
        }
        Err(e) => {
            let s = Status::from(e);
            return status_response(s.code, &s.message);
        }
    };
    match cluster.lease_keys(id, &parts.headers).await {
        Err(s) => return status_response(s.code() as u16, s.message()),
        Ok(keys) if keys.iter().any(|k| rewriter.namespace().strip(k).is_none()) => {
            return status_response(
                PERMISSION_DENIED,
                &format!("etcd-proxy: lease {id:x} holds keys outside the namespace"),
            );
        }
        Ok(_) => {}
    }
    // A key attached between the check above and this revoke is not seen (module comment).
    send(
        upstream,
        rewriter.limits(),
        Request::from_parts(parts, RequestBody::Buffered(Some(body))),
    )
    .await
}

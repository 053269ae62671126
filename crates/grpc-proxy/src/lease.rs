//! `Lease/LeaseRevoke` under `--namespace`. Lease IDs are cluster-wide and revoking a lease
//! deletes its keys, wherever they lie; so before a revoke is forwarded, the proxy asks etcd
//! which keys the lease holds (`LeaseTimeToLive` with keys, with the caller's `token` and
//! `authorization`, so etcd's auth applies as for the client) and refuses with
//! `PERMISSION_DENIED` when one lies outside the namespace. Otherwise the client's request goes
//! to etcd unchanged, as bytes; a missing lease gets etcd's own `NotFound`.
//!
//! Race: a key attached to the lease (by a client outside the namespace) between the check and
//! the revoke is deleted with it. etcd has no conditional revoke, so the check cannot be atomic.
//!
//! `Lease/LeaseLeases` under `--namespace` lists only the leases a namespaced client may know
//! of: those with no key (a lease just granted) or with a key inside the namespace. A lease
//! whose keys all lie outside belongs to someone else and is left out.

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};

use hyper::{Request, Response};
use prost::Message;

use etcd_api::etcdserverpb::LeaseRevokeRequest;

use crate::body::ClientBody;
use crate::cluster::Cluster;
use crate::forward::{PERMISSION_DENIED, ResponseBody, send, status_response};
use crate::rewrite::{Decoder, RequestBody, Rewriter, Status};
use crate::upstream::Upstream;

/// gRPC path of the guarded call.
pub const LEASE_REVOKE_PATH: &str = "/etcdserverpb.Lease/LeaseRevoke";
/// gRPC path of the filtered call.
pub const LEASE_LEASES_PATH: &str = "/etcdserverpb.Lease/LeaseLeases";

/// Leases whose keys are looked up at once while filtering `LeaseLeases`.
const LOOKUPS_IN_FLIGHT: usize = 16;

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
    req: Request<ClientBody>,
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
                &format!("etcd-proxy: lease {id:016x} holds keys outside the namespace"),
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

/// Serves `LeaseLeases` under a namespace: etcd's list (asked with the caller's auth) without
/// the leases whose keys all lie outside the namespace. The request has no fields; its body is
/// not read.
pub async fn filter_leases(
    cluster: &Cluster,
    rewriter: &Rewriter,
    req: Request<ClientBody>,
) -> Response<ResponseBody> {
    let headers = req.headers().clone();
    let mut resp = match cluster.lease_leases(&headers).await {
        Ok(r) => r,
        Err(s) => return status_response(s.code() as u16, s.message()),
    };
    let ns = rewriter.namespace();
    let ids: Vec<i64> = resp.leases.iter().map(|l| l.id).collect();
    let looked_up: Vec<(i64, Result<Vec<Bytes>, tonic::Status>)> = futures::stream::iter(ids)
        .map(|id| keys_of(cluster, id, &headers))
        .buffered(LOOKUPS_IN_FLIGHT)
        .collect()
        .await;
    let mut hidden = std::collections::HashSet::new();
    for (id, keys) in looked_up {
        match keys {
            Ok(keys) if !keys.is_empty() && keys.iter().all(|k| ns.strip(k).is_none()) => {
                hidden.insert(id);
            }
            Ok(_) => {}
            Err(s) => return status_response(s.code() as u16, s.message()),
        }
    }
    resp.leases.retain(|l| !hidden.contains(&l.id));
    crate::forward::local_response(&resp.encode_to_vec())
}

/// The keys of lease `id`, with the ID.
async fn keys_of(
    cluster: &Cluster,
    id: i64,
    headers: &hyper::HeaderMap,
) -> (i64, Result<Vec<Bytes>, tonic::Status>) {
    (id, cluster.lease_keys(id, headers).await)
}

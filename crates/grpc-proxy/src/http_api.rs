//! The HTTP/JSON API on the gRPC port: etcd's gRPC-Gateway (`POST /v3/kv/put` with JSON and
//! base64 keys), which etcd serves only on its members and etcd's proxy answers with 404.
//!
//! Each request becomes a gRPC call served **in-process** by the proxy's own handlers (the same
//! path as a gRPC client's call, with no second network hop), so the namespace, the range cache and
//! watch and keep-alive coalescing apply to HTTP clients too. What is reproduced from etcd 3.5's
//! gateway (grpc-gateway v1 with `OrigName`; see `../shared/reference/etcd-gateway-and-http-api.md`
//! §2):
//!
//! - **Routes**: every `/v3/` route of etcd 3.5 (`/v3beta/` is an alias), `POST` only: 405 for
//!   another method on a known path, 404 for an unknown path, both `text/plain`. `OPTIONS` gets
//!   200 with the CORS headers, which every answer carries.
//! - **JSON**: proto field names on output, proto or lowerCamel names on input, int64 as strings
//!   (numbers accepted), bytes as padded standard base64, enums by name (numbers accepted),
//!   defaults omitted, unknown fields ignored, an empty body is an empty request, only the first
//!   JSON value of a unary body counts. `<`, `>` and `&` in strings are escaped as Go does.
//! - **Metadata**: `Authorization: <token>` (also `Bearer <token>`, which etcd 3.5 refuses) and
//!   `Grpc-Metadata-<Key>: v` become call metadata; `Grpc-Timeout` becomes the call's deadline.
//! - **Errors**: `{"error":msg,"code":n,"message":msg}` with the HTTP status of the gRPC code.
//! - **Streams** (Watch, LeaseKeepAlive, Snapshot, Observe): one `{"result":...}` line per message,
//!   sent as it comes; the request body of Watch and LeaseKeepAlive is a sequence of JSON values,
//!   each sent as it arrives, and its end half-closes the call (a watch goes on, as with etcd).
//!   An error ends the stream with `{"error":{"grpc_code":..,"http_code":..,"message":..,
//!   "http_status":..}}`.

use std::io;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Frame;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use prost::Message;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::body::ClientBody;
use crate::forward::ResponseBody;
use crate::rewrite::Decoder;

/// The largest JSON request body read: base64 makes a 4 MiB message about 5.4 MiB of JSON.
const MAX_JSON_BODY: usize = 8 << 20;

/// How a route's call streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unary,
    /// One request, a stream of responses (Snapshot, Observe).
    ServerStream,
    /// Streams both ways (Watch, LeaseKeepAlive).
    Bidi,
}

/// One route: its HTTP path, the gRPC method behind it, and the JSON of its messages.
struct Route {
    http: &'static str,
    grpc: &'static str,
    kind: Kind,
    /// A request message from a JSON value.
    request: fn(serde_json::Value) -> Result<Bytes, String>,
    /// A response message as JSON.
    response: fn(&[u8]) -> Result<Vec<u8>, String>,
}

fn request<T: Message + DeserializeOwned>(v: serde_json::Value) -> Result<Bytes, String> {
    let m: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
    Ok(Bytes::from(m.encode_to_vec()))
}

fn response<T: Message + Default + Serialize>(b: &[u8]) -> Result<Vec<u8>, String> {
    let m = T::decode(b).map_err(|e| format!("bad response from etcd: {e}"))?;
    to_go_json(&m)
}

/// `v` as Go's `encoding/json` writes it: compact, with `<`, `>`, `&`, U+2028 and U+2029
/// escaped.
pub(crate) fn to_go_json<T: Serialize>(v: &T) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoEscape);
    v.serialize(&mut ser).map_err(|e| e.to_string())?;
    Ok(out)
}

struct GoEscape;

impl serde_json::ser::Formatter for GoEscape {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            let escaped = match c {
                '<' => "\\u003c",
                '>' => "\\u003e",
                '&' => "\\u0026",
                '\u{2028}' => "\\u2028",
                '\u{2029}' => "\\u2029",
                _ => continue,
            };
            w.write_all(&fragment.as_bytes()[start..i])?;
            w.write_all(escaped.as_bytes())?;
            start = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }
}

macro_rules! routes {
    ($( $http:literal => $grpc:literal, $kind:ident, $req:ty, $resp:ty; )*) => {
        &[ $( Route {
            http: $http,
            grpc: $grpc,
            kind: Kind::$kind,
            request: request::<$req>,
            response: response::<$resp>,
        }, )* ]
    };
}

use etcd_api::etcdserverpb as pb;
use etcd_api::v3electionpb as el;
use etcd_api::v3lockpb as lk;

/// etcd 3.5's routes, in its registration order (the first of two routes of one path wins).
static ROUTES: &[Route] = routes! {
    "/v3/kv/range" => "/etcdserverpb.KV/Range", Unary, pb::RangeRequest, pb::RangeResponse;
    "/v3/kv/put" => "/etcdserverpb.KV/Put", Unary, pb::PutRequest, pb::PutResponse;
    "/v3/kv/deleterange" => "/etcdserverpb.KV/DeleteRange", Unary, pb::DeleteRangeRequest, pb::DeleteRangeResponse;
    "/v3/kv/txn" => "/etcdserverpb.KV/Txn", Unary, pb::TxnRequest, pb::TxnResponse;
    "/v3/kv/compaction" => "/etcdserverpb.KV/Compact", Unary, pb::CompactionRequest, pb::CompactionResponse;
    "/v3/watch" => "/etcdserverpb.Watch/Watch", Bidi, pb::WatchRequest, pb::WatchResponse;
    "/v3/lease/grant" => "/etcdserverpb.Lease/LeaseGrant", Unary, pb::LeaseGrantRequest, pb::LeaseGrantResponse;
    "/v3/lease/revoke" => "/etcdserverpb.Lease/LeaseRevoke", Unary, pb::LeaseRevokeRequest, pb::LeaseRevokeResponse;
    "/v3/kv/lease/revoke" => "/etcdserverpb.Lease/LeaseRevoke", Unary, pb::LeaseRevokeRequest, pb::LeaseRevokeResponse;
    "/v3/lease/keepalive" => "/etcdserverpb.Lease/LeaseKeepAlive", Bidi, pb::LeaseKeepAliveRequest, pb::LeaseKeepAliveResponse;
    "/v3/lease/timetolive" => "/etcdserverpb.Lease/LeaseTimeToLive", Unary, pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse;
    "/v3/kv/lease/timetolive" => "/etcdserverpb.Lease/LeaseTimeToLive", Unary, pb::LeaseTimeToLiveRequest, pb::LeaseTimeToLiveResponse;
    "/v3/lease/leases" => "/etcdserverpb.Lease/LeaseLeases", Unary, pb::LeaseLeasesRequest, pb::LeaseLeasesResponse;
    "/v3/kv/lease/leases" => "/etcdserverpb.Lease/LeaseLeases", Unary, pb::LeaseLeasesRequest, pb::LeaseLeasesResponse;
    "/v3/cluster/member/add" => "/etcdserverpb.Cluster/MemberAdd", Unary, pb::MemberAddRequest, pb::MemberAddResponse;
    "/v3/cluster/member/remove" => "/etcdserverpb.Cluster/MemberRemove", Unary, pb::MemberRemoveRequest, pb::MemberRemoveResponse;
    "/v3/cluster/member/update" => "/etcdserverpb.Cluster/MemberUpdate", Unary, pb::MemberUpdateRequest, pb::MemberUpdateResponse;
    "/v3/cluster/member/list" => "/etcdserverpb.Cluster/MemberList", Unary, pb::MemberListRequest, pb::MemberListResponse;
    "/v3/cluster/member/promote" => "/etcdserverpb.Cluster/MemberPromote", Unary, pb::MemberPromoteRequest, pb::MemberPromoteResponse;
    "/v3/maintenance/alarm" => "/etcdserverpb.Maintenance/Alarm", Unary, pb::AlarmRequest, pb::AlarmResponse;
    "/v3/maintenance/status" => "/etcdserverpb.Maintenance/Status", Unary, pb::StatusRequest, pb::StatusResponse;
    "/v3/maintenance/defragment" => "/etcdserverpb.Maintenance/Defragment", Unary, pb::DefragmentRequest, pb::DefragmentResponse;
    "/v3/maintenance/hash" => "/etcdserverpb.Maintenance/Hash", Unary, pb::HashRequest, pb::HashResponse;
    "/v3/maintenance/hashkv" => "/etcdserverpb.Maintenance/HashKV", Unary, pb::HashKvRequest, pb::HashKvResponse;
    "/v3/maintenance/snapshot" => "/etcdserverpb.Maintenance/Snapshot", ServerStream, pb::SnapshotRequest, pb::SnapshotResponse;
    "/v3/maintenance/transfer-leadership" => "/etcdserverpb.Maintenance/MoveLeader", Unary, pb::MoveLeaderRequest, pb::MoveLeaderResponse;
    "/v3/maintenance/downgrade" => "/etcdserverpb.Maintenance/Downgrade", Unary, pb::DowngradeRequest, pb::DowngradeResponse;
    "/v3/auth/enable" => "/etcdserverpb.Auth/AuthEnable", Unary, pb::AuthEnableRequest, pb::AuthEnableResponse;
    "/v3/auth/disable" => "/etcdserverpb.Auth/AuthDisable", Unary, pb::AuthDisableRequest, pb::AuthDisableResponse;
    "/v3/auth/status" => "/etcdserverpb.Auth/AuthStatus", Unary, pb::AuthStatusRequest, pb::AuthStatusResponse;
    "/v3/auth/authenticate" => "/etcdserverpb.Auth/Authenticate", Unary, pb::AuthenticateRequest, pb::AuthenticateResponse;
    "/v3/auth/user/add" => "/etcdserverpb.Auth/UserAdd", Unary, pb::AuthUserAddRequest, pb::AuthUserAddResponse;
    "/v3/auth/user/get" => "/etcdserverpb.Auth/UserGet", Unary, pb::AuthUserGetRequest, pb::AuthUserGetResponse;
    "/v3/auth/user/list" => "/etcdserverpb.Auth/UserList", Unary, pb::AuthUserListRequest, pb::AuthUserListResponse;
    "/v3/auth/user/delete" => "/etcdserverpb.Auth/UserDelete", Unary, pb::AuthUserDeleteRequest, pb::AuthUserDeleteResponse;
    "/v3/auth/user/changepw" => "/etcdserverpb.Auth/UserChangePassword", Unary, pb::AuthUserChangePasswordRequest, pb::AuthUserChangePasswordResponse;
    "/v3/auth/user/grant" => "/etcdserverpb.Auth/UserGrantRole", Unary, pb::AuthUserGrantRoleRequest, pb::AuthUserGrantRoleResponse;
    "/v3/auth/user/revoke" => "/etcdserverpb.Auth/UserRevokeRole", Unary, pb::AuthUserRevokeRoleRequest, pb::AuthUserRevokeRoleResponse;
    "/v3/auth/role/add" => "/etcdserverpb.Auth/RoleAdd", Unary, pb::AuthRoleAddRequest, pb::AuthRoleAddResponse;
    "/v3/auth/role/get" => "/etcdserverpb.Auth/RoleGet", Unary, pb::AuthRoleGetRequest, pb::AuthRoleGetResponse;
    "/v3/auth/role/list" => "/etcdserverpb.Auth/RoleList", Unary, pb::AuthRoleListRequest, pb::AuthRoleListResponse;
    "/v3/auth/role/delete" => "/etcdserverpb.Auth/RoleDelete", Unary, pb::AuthRoleDeleteRequest, pb::AuthRoleDeleteResponse;
    "/v3/auth/role/grant" => "/etcdserverpb.Auth/RoleGrantPermission", Unary, pb::AuthRoleGrantPermissionRequest, pb::AuthRoleGrantPermissionResponse;
    "/v3/auth/role/revoke" => "/etcdserverpb.Auth/RoleRevokePermission", Unary, pb::AuthRoleRevokePermissionRequest, pb::AuthRoleRevokePermissionResponse;
    "/v3/lock/lock" => "/v3lockpb.Lock/Lock", Unary, lk::LockRequest, lk::LockResponse;
    "/v3/lock/unlock" => "/v3lockpb.Lock/Unlock", Unary, lk::UnlockRequest, lk::UnlockResponse;
    "/v3/election/campaign" => "/v3electionpb.Election/Campaign", Unary, el::CampaignRequest, el::CampaignResponse;
    "/v3/election/proclaim" => "/v3electionpb.Election/Proclaim", Unary, el::ProclaimRequest, el::ProclaimResponse;
    "/v3/election/leader" => "/v3electionpb.Election/Leader", Unary, el::LeaderRequest, el::LeaderResponse;
    "/v3/election/observe" => "/v3electionpb.Election/Observe", ServerStream, el::LeaderRequest, el::LeaderResponse;
    "/v3/election/resign" => "/v3electionpb.Election/Resign", Unary, el::ResignRequest, el::ResignResponse;
};

/// Whether `path` belongs to the HTTP/JSON API (known route or not: unknown ones get its 404).
pub fn serves(path: &str) -> bool {
    path.starts_with("/v3/") || path.starts_with("/v3beta/")
}

/// The route of `path`, `/v3beta/` read as `/v3/`.
fn route(path: &str) -> Option<&'static Route> {
    let beta;
    let path = match path.strip_prefix("/v3beta/") {
        Some(rest) => {
            beta = format!("/v3/{rest}");
            beta.as_str()
        }
        None => path,
    };
    ROUTES.iter().find(|r| r.http == path)
}

/// The HTTP status etcd 3.5's gateway (grpc-gateway v1.16) gives a gRPC code.
fn http_status(code: u16) -> StatusCode {
    match code {
        0 => StatusCode::OK,
        1 => StatusCode::REQUEST_TIMEOUT,
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        4 => StatusCode::GATEWAY_TIMEOUT,
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,
        7 => StatusCode::FORBIDDEN,
        8 => StatusCode::TOO_MANY_REQUESTS,
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The CORS headers etcd's gateway puts on every answer (its default `--cors=*`).
fn cors(headers: &mut HeaderMap) {
    headers.insert(
        "access-control-allow-headers",
        HeaderValue::from_static("accept, content-type, authorization"),
    );
    headers.insert(
        "access-control-allow-methods",
        HeaderValue::from_static("POST, GET, OPTIONS, PUT, DELETE"),
    );
    headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
}

fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::Local {
        message: Some(Bytes::from(body)),
        trailers: None,
    });
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    cors(resp.headers_mut());
    resp
}

/// A unary error as etcd 3.5's gateway writes it.
fn error(code: u16, message: &str) -> Response<ResponseBody> {
    #[derive(Serialize)]
    struct Body<'a> {
        error: &'a str,
        code: u16,
        message: &'a str,
    }
    let body = to_go_json(&Body {
        error: message,
        code,
        message,
    })
    .unwrap_or_default();
    with_body(http_status(code), "application/json", body)
}

/// A stream error, as the last chunk of a stream.
fn stream_error(code: u16, message: &str) -> Bytes {
    #[derive(Serialize)]
    struct Inner<'a> {
        grpc_code: u16,
        http_code: u16,
        message: &'a str,
        http_status: &'a str,
    }
    #[derive(Serialize)]
    struct Outer<'a> {
        error: Inner<'a>,
    }
    let status = http_status(code);
    Bytes::from(
        to_go_json(&Outer {
            error: Inner {
                grpc_code: code,
                http_code: status.as_u16(),
                message,
                http_status: status.canonical_reason().unwrap_or(""),
            },
        })
        .unwrap_or_default(),
    )
}

/// Go's `http.Error`: a text body with a newline.
fn text(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let mut resp = with_body(
        status,
        "text/plain; charset=utf-8",
        format!("{message}\n").into_bytes(),
    );
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The call's metadata from the HTTP headers, as etcd's gateway passes them: `Authorization`
/// (the token, also after `Bearer `), `Grpc-Metadata-<key>`, `Grpc-Timeout`.
fn metadata(headers: &HeaderMap) -> Result<HeaderMap, (u16, String)> {
    let mut md = HeaderMap::new();
    md.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    md.insert("te", HeaderValue::from_static("trailers"));
    if let Some(v) = headers.get(hyper::header::AUTHORIZATION) {
        let raw = v.as_bytes();
        let token = raw.strip_prefix(b"Bearer ").unwrap_or(raw);
        if let Ok(t) = HeaderValue::from_bytes(token) {
            md.insert("authorization", t);
        }
    }
    for (name, value) in headers {
        if let Some(key) = name.as_str().strip_prefix("grpc-metadata-")
            && let Ok(key) = HeaderName::from_bytes(key.as_bytes())
        {
            md.append(key, value.clone());
        }
    }
    if let Some(t) = headers.get("grpc-timeout") {
        let valid = t.to_str().ok().is_some_and(|s| {
            s.len() >= 2
                && s.len() <= 9
                && s[..s.len() - 1].bytes().all(|b| b.is_ascii_digit())
                && matches!(
                    s.as_bytes()[s.len() - 1],
                    b'H' | b'M' | b'S' | b'm' | b'u' | b'n'
                )
        });
        if !valid {
            let shown = String::from_utf8_lossy(t.as_bytes()).into_owned();
            return Err((3, format!("invalid grpc-timeout: {shown}")));
        }
        md.insert("grpc-timeout", t.clone());
    }
    Ok(md)
}

/// The first JSON value of `body` as `route`'s request message; an empty body is an empty
/// request. The error is the text for the client.
fn first_request(route: &Route, body: &[u8]) -> Result<Bytes, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return (route.request)(serde_json::Value::Object(Default::default()));
    }
    let mut values = serde_json::Deserializer::from_slice(body).into_iter::<serde_json::Value>();
    match values.next() {
        Some(Ok(v)) => (route.request)(v),
        Some(Err(e)) => Err(json_error(&e)),
        None => (route.request)(serde_json::Value::Object(Default::default())),
    }
}

fn json_error(e: &serde_json::Error) -> String {
    if e.is_eof() {
        "unexpected EOF".to_string()
    } else {
        e.to_string()
    }
}

fn framed(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.extend_from_slice(&[0]);
    out.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(message);
    out.freeze()
}

/// Serves one HTTP/JSON request; `call` serves the gRPC call it becomes.
pub async fn handle<F, Fut>(req: Request<ClientBody>, call: F) -> Response<ResponseBody>
where
    F: FnOnce(Request<ClientBody>) -> Fut,
    Fut: Future<Output = Response<ResponseBody>>,
{
    if req.method() == Method::OPTIONS {
        return with_body(StatusCode::OK, "text/plain; charset=utf-8", Vec::new());
    }
    let Some(route) = route(req.uri().path()) else {
        return text(StatusCode::NOT_FOUND, "Not Found");
    };
    if req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    let md = match metadata(req.headers()) {
        Ok(md) => md,
        Err((code, message)) => return error(code, &message),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let mut grpc = Request::new(ClientBody::Local(rx));
    *grpc.method_mut() = Method::POST;
    *grpc.uri_mut() = Uri::from_static(route.grpc);
    *grpc.headers_mut() = md;
    let mut body = req.into_body();

    if route.kind == Kind::Bidi {
        // The first JSON value is read before the call starts; the rest as they come.
        let mut reader = JsonStream::default();
        let first = match reader.next(&mut body).await {
            Ok(Some(v)) => v,
            // An empty body: the call starts with no request (etcd's hangs the same way).
            Ok(None) => serde_json::Value::Null,
            Err(message) => return error(2, &message),
        };
        let first = if first.is_null() {
            None
        } else {
            match (route.request)(first) {
                Ok(m) => Some(m),
                Err(message) => return error(2, &message),
            }
        };
        tokio::spawn(async move {
            if let Some(m) = first
                && tx.send(framed(&m)).await.is_err()
            {
                return;
            }
            // A bad value ends the sending, as etcd's gateway does.
            while let Ok(Some(v)) = reader.next(&mut body).await {
                let Ok(m) = (route.request)(v) else { return };
                if tx.send(framed(&m)).await.is_err() {
                    return;
                }
            }
        });
    } else {
        let bytes = match read_limited(&mut body).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let message = match first_request(route, &bytes) {
            Ok(m) => m,
            Err(message) => return error(3, &message),
        };
        // One message, then the end of the request.
        let _ = tx.try_send(framed(&message));
        drop(tx);
    }

    let deadline = grpc.headers().get("grpc-timeout").and_then(parse_timeout);
    if route.kind == Kind::Unary {
        // The deadline is enforced here too, as the gateway's gRPC client does: etcd may
        // answer a passed deadline as Unknown, the client sees DeadlineExceeded.
        // An answer that arrives after the deadline is the deadline's error as well (the
        // timer's granularity is a millisecond; etcd may answer a 1ns deadline before it fires).
        let answer = async { unary_answer(route, call(grpc).await).await };
        return match deadline {
            Some(d) => {
                let end = tokio::time::Instant::now() + d;
                match tokio::time::timeout_at(end, answer).await {
                    Ok(answer) if tokio::time::Instant::now() < end => answer,
                    _ => error(4, "context deadline exceeded"),
                }
            }
            None => answer.await,
        };
    }
    let resp = call(grpc).await;
    stream_answer(route, resp, deadline).await
}

/// A valid `grpc-timeout` value as a duration (gRPC's format: up to 8 digits and a unit).
fn parse_timeout(v: &HeaderValue) -> Option<std::time::Duration> {
    let s = v.to_str().ok()?;
    let (digits, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    use std::time::Duration;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The whole body, at most [`MAX_JSON_BODY`] bytes.
async fn read_limited(body: &mut ClientBody) -> Result<Vec<u8>, Response<ResponseBody>> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| error(1, &format!("reading the request: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_JSON_BODY {
                return Err(error(
                    8,
                    &format!("request body larger than max ({MAX_JSON_BODY} bytes)"),
                ));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

/// JSON values read one after another from a streaming body.
#[derive(Default)]
struct JsonStream {
    buf: Vec<u8>,
    done: bool,
}

impl JsonStream {
    /// The next value; `None` at the end of the body.
    async fn next(&mut self, body: &mut ClientBody) -> Result<Option<serde_json::Value>, String> {
        loop {
            let start = self.buf.iter().position(|b| !b.is_ascii_whitespace());
            if let Some(start) = start {
                let mut values = serde_json::Deserializer::from_slice(&self.buf[start..])
                    .into_iter::<serde_json::Value>();
                match values.next() {
                    Some(Ok(v)) => {
                        let used = start + values.byte_offset();
                        self.buf.drain(..used);
                        return Ok(Some(v));
                    }
                    Some(Err(e)) if e.is_eof() && !self.done => {}
                    Some(Err(e)) => return Err(json_error(&e)),
                    None => {}
                }
            } else if self.done {
                return Ok(None);
            }
            if self.done {
                return Err("unexpected EOF".to_string());
            }
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if self.buf.len() + data.len() > MAX_JSON_BODY {
                            return Err("request value too large".to_string());
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(e.to_string()),
                None => self.done = true,
            }
        }
    }
}

/// The gRPC status of a head or trailers.
fn status_of(headers: &HeaderMap) -> Option<(u16, String)> {
    crate::admin::status_in(headers)
}

/// A unary call's answer as JSON.
async fn unary_answer(route: &Route, resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let (head, mut body) = resp.into_parts();
    if let Some((code, message)) = status_of(&head.headers)
        && code != 0
    {
        return error(code, &message);
    }
    let mut decoder = Decoder::new(usize::MAX >> 1);
    let mut message = None;
    let mut status = None;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame;
        match frame.into_data() {
            Ok(data) => {
                decoder.push(&data);
                if message.is_none()
                    && let Ok(Some(m)) = decoder.next_message()
                {
                    message = Some(m);
                }
            }
            Err(frame) => {
                status = frame.into_trailers().ok().and_then(|t| status_of(&t));
            }
        }
    }
    match (status, message) {
        (Some((0, _)), Some(m)) => match (route.response)(&m) {
            Ok(json) => {
                let mut resp = with_body(StatusCode::OK, "application/json", json);
                resp.headers_mut().insert(
                    "grpc-metadata-content-type",
                    HeaderValue::from_static("application/grpc"),
                );
                resp
            }
            Err(message) => error(13, &message),
        },
        (Some((code, message)), _) if code != 0 => error(code, &message),
        _ => error(13, "etcd-proxy: the call ended without an answer"),
    }
}

/// Writes each message of `body` as a `{"result":...}` line, then an error chunk if the call
/// ended with one.
async fn relay_stream(route: &Route, body: &mut ResponseBody, out: &mpsc::Sender<Frame<Bytes>>) {
    let mut decoder = Decoder::new(usize::MAX >> 1);
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame;
        match frame.into_data() {
            Ok(data) => {
                decoder.push(&data);
                while let Ok(Some(m)) = decoder.next_message() {
                    let line = match (route.response)(&m) {
                        Ok(json) => {
                            let mut line = Vec::with_capacity(json.len() + 12);
                            line.extend_from_slice(b"{\"result\":");
                            line.extend_from_slice(&json);
                            line.extend_from_slice(b"}\n");
                            Bytes::from(line)
                        }
                        Err(message) => stream_error(13, &message),
                    };
                    if out.send(Frame::data(line)).await.is_err() {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Some((code, message)) =
                    frame.into_trailers().ok().and_then(|t| status_of(&t))
                    && code != 0
                {
                    let _ = out.send(Frame::data(stream_error(code, &message))).await;
                }
                return;
            }
        }
    }
}

/// A streaming call's answer: a `{"result":...}` line per message, then an error chunk if it
/// ended with one.
async fn stream_answer(
    route: &'static Route,
    resp: Response<ResponseBody>,
    deadline: Option<std::time::Duration>,
) -> Response<ResponseBody> {
    let (head, mut body) = resp.into_parts();
    if let Some((code, message)) = status_of(&head.headers)
        && code != 0
    {
        let body = stream_error(code, &message).to_vec();
        return with_body(http_status(code), "application/json", body);
    }
    let (out, out_rx) = mpsc::channel::<Frame<Bytes>>(16);
    tokio::spawn(async move {
        let relay = relay_stream(route, &mut body, &out);
        match deadline {
            // `Grpc-Timeout` bounds the whole stream, as a gRPC deadline does. (etcd's gateway
            // says code 4, or 2 when the server's end of the deadline reaches it first.)
            Some(d) => {
                if tokio::time::timeout(d, relay).await.is_err() {
                    let _ = out
                        .send(Frame::data(stream_error(4, "context deadline exceeded")))
                        .await;
                }
            }
            None => relay.await,
        }
    });
    let mut resp = Response::new(ResponseBody::Channel(out_rx));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp.headers_mut().insert(
        "grpc-metadata-content-type",
        HeaderValue::from_static("application/grpc"),
    );
    cors(resp.headers_mut());
    resp
}

/// Whether `req` asks for a WebSocket upgrade.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// The token of a WebSocket client, which cannot set `Authorization` from a browser: from
/// `Sec-WebSocket-Protocol: Bearer, <token>` or the `token` cookie (as etcd's wsproxy takes it),
/// or `Authorization` itself.
fn websocket_token(headers: &HeaderMap) -> Option<HeaderValue> {
    if let Some(p) = headers
        .get(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
    {
        let mut parts = p.split(',').map(str::trim);
        if parts.next() == Some("Bearer")
            && let Some(t) = parts.next()
        {
            return HeaderValue::from_str(t).ok();
        }
    }
    let cookies = headers.get_all(hyper::header::COOKIE);
    for c in cookies.iter().filter_map(|v| v.to_str().ok()) {
        for kv in c.split(';').map(str::trim) {
            if let Some(t) = kv.strip_prefix("token=") {
                return HeaderValue::from_str(t).ok();
            }
        }
    }
    headers.get(hyper::header::AUTHORIZATION).cloned()
}

/// A WebSocket on any route (etcd's gateway has it on every `/v3/` path, used for the streams):
/// each text frame is one JSON request, each response one text frame. Unlike etcd 3.5's, auth
/// works: the token comes from `Sec-WebSocket-Protocol: Bearer, <token>`, the `token` cookie or
/// `Authorization`.
pub fn websocket<F, Fut>(mut req: Request<ClientBody>, call: F) -> Response<ResponseBody>
where
    F: FnOnce(Request<ClientBody>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send,
{
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message as Ws;
    use tokio_tungstenite::tungstenite::protocol::Role;

    let Some(route) = route(req.uri().path()) else {
        return text(StatusCode::NOT_FOUND, "Not Found");
    };
    let Some(key) = req.headers().get(hyper::header::SEC_WEBSOCKET_KEY) else {
        return text(StatusCode::BAD_REQUEST, "Bad Request: no Sec-WebSocket-Key");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let bearer = req
        .headers()
        .get(hyper::header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.split(',').next().map(str::trim) == Some("Bearer"));
    let mut headers = req.headers().clone();
    headers.remove(hyper::header::AUTHORIZATION);
    if let Some(t) = websocket_token(req.headers()) {
        headers.insert(hyper::header::AUTHORIZATION, t);
    }
    let md = match metadata(&headers) {
        Ok(md) => md,
        Err((code, message)) => return error(code, &message),
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            hyper_util::rt::TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        let (mut sink, mut frames) = ws.split();
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let mut grpc = Request::new(ClientBody::Local(rx));
        *grpc.method_mut() = Method::POST;
        *grpc.uri_mut() = Uri::from_static(route.grpc);
        *grpc.headers_mut() = md;
        // Requests: one JSON value per text frame; a bad one ends the sending, as etcd's.
        let reader = tokio::spawn(async move {
            while let Some(Ok(frame)) = frames.next().await {
                let json = match frame {
                    Ws::Text(t) => t.as_bytes().to_vec(),
                    Ws::Binary(b) => b.to_vec(),
                    Ws::Close(_) => break,
                    _ => continue,
                };
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(&json) else {
                    break;
                };
                let Ok(m) = (route.request)(v) else { break };
                if tx.send(framed(&m)).await.is_err() {
                    break;
                }
            }
        });
        let mut resp = call(grpc).await;
        let (out, mut lines) = mpsc::channel::<Frame<Bytes>>(16);
        let relay = async move {
            if let Some((code, message)) = status_of(resp.headers())
                && code != 0
            {
                let _ = out.send(Frame::data(stream_error(code, &message))).await;
                return;
            }
            relay_stream(route, resp.body_mut(), &out).await;
        };
        let send = async {
            while let Some(frame) = lines.recv().await {
                if let Ok(line) = frame.into_data() {
                    let line = line.strip_suffix(b"\n").unwrap_or(&line);
                    let text = String::from_utf8_lossy(line).into_owned();
                    if sink.send(Ws::text(text)).await.is_err() {
                        return;
                    }
                }
            }
            let _ = sink.close().await;
        };
        tokio::join!(relay, send);
        reader.abort();
    });
    let mut resp = Response::new(ResponseBody::Empty);
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(hyper::header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if bearer {
        h.insert(
            hyper::header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("Bearer"),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_unique_and_beta_is_an_alias() {
        let mut seen = std::collections::HashSet::new();
        for r in ROUTES {
            assert!(seen.insert(r.http), "{} twice", r.http);
            assert!(r.http.starts_with("/v3/"));
        }
        assert_eq!(
            route("/v3beta/kv/put").map(|r| r.grpc),
            Some("/etcdserverpb.KV/Put")
        );
        assert!(route("/v3alpha/kv/put").is_none());
        assert!(route("/v3/kv/put/").is_none());
    }

    #[test]
    fn go_escapes_html_characters() {
        let s = to_go_json(&"a<b>&cé\u{2028}").unwrap();
        assert_eq!(
            String::from_utf8(s).unwrap(),
            r#""a\u003cb\u003e\u0026cé\u2028""#
        );
    }

    #[test]
    fn only_the_first_value_of_a_unary_body_counts() {
        let r = route("/v3/kv/put").unwrap();
        let m = first_request(r, br#"{"key":"Zm9v","value":"YmFy"} garbage"#).unwrap();
        let put = pb::PutRequest::decode(m).unwrap();
        assert_eq!(&put.key[..], b"foo");
        let empty = first_request(r, b"  ").unwrap();
        assert!(empty.is_empty(), "an empty body is an empty request");
        assert_eq!(
            first_request(r, br#"{"key":"#).unwrap_err(),
            "unexpected EOF"
        );
        assert!(first_request(r, br#"{"key":"!!!"}"#).is_err(), "bad base64");
    }

    #[test]
    fn statuses_are_etcd_gateways() {
        for (code, status) in [
            (3, 400),
            (4, 504),
            (5, 404),
            (7, 403),
            (8, 429),
            (9, 400),
            (11, 400),
            (12, 501),
            (14, 503),
            (16, 401),
            (2, 500),
        ] {
            assert_eq!(http_status(code).as_u16(), status, "code {code}");
        }
        assert_eq!(
            &stream_error(4, "context deadline exceeded")[..],
            br#"{"error":{"grpc_code":4,"http_code":504,"message":"context deadline exceeded","http_status":"Gateway Timeout"}}"#
        );
    }

    #[test]
    fn metadata_takes_the_token_and_grpc_metadata_headers() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer abc.1"));
        h.insert("grpc-metadata-token", HeaderValue::from_static("xyz"));
        h.insert("grpc-timeout", HeaderValue::from_static("500m"));
        let md = metadata(&h).unwrap();
        assert_eq!(md["authorization"], "abc.1");
        assert_eq!(md["token"], "xyz");
        assert_eq!(md["grpc-timeout"], "500m");
        h.insert("grpc-timeout", HeaderValue::from_static("xyz"));
        assert_eq!(
            metadata(&h).unwrap_err(),
            (3, "invalid grpc-timeout: xyz".to_string())
        );
    }
}

//! The plain-HTTP side of the proxy: `/health`, `/proxy/health`, `/metrics` and
//! `/proxy/metrics`, with etcd 3.5's paths, bodies and status codes. Served on the gRPC port
//! (HTTP/1.1 or HTTP/2, told apart from gRPC by content type) and on `--metrics-addr`.
//!
//! The health checks are real calls, as etcd's proxy makes them: a linearizable Range of key
//! `a` through a member (`/health`), and the same plus a watch through the proxy's own port
//! (`/proxy/health`). They are encoded by hand here (a few protobuf bytes) so the forwarding
//! crate needs no generated code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backend::Endpoint;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::dial::{Alpn, Dialer};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// etcd's `/health` check budget for the Range (`checkHealth`: 1 s).
const GET_TIMEOUT: Duration = Duration::from_secs(1);
/// etcd's `/proxy/health` budget for the watch to be created (3 s).
const WATCH_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the health Range waits for one member before also asking the next.
const HEDGE_DELAY: Duration = Duration::from_millis(250);
/// Pause between rounds over the members while the health check's budget lasts.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

const RANGE_PATH: &str = "/etcdserverpb.KV/Range";
const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";
/// `RangeRequest { key: "a" }`: linearizable (serializable is false by default).
const RANGE_A: &[u8] = &[0x0a, 0x01, b'a'];
/// `WatchRequest { create_request: WatchCreateRequest { key: "a" } }`.
const WATCH_A: &[u8] = &[0x0a, 0x03, 0x0a, 0x01, b'a'];

/// What the HTTP endpoints need.
pub struct Admin {
    /// The members, for the cluster health check and the `/metrics` pass-through.
    pub upstream: Arc<Upstream>,
    /// The proxy's registry.
    pub metrics: Arc<Metrics>,
    /// Where the proxy's own gRPC port answers, for `/proxy/health`.
    pub self_addr: SocketAddr,
    /// With TLS on the main port: how the proxy speaks TLS to itself (its own certificate
    /// pinned, and presented as its client certificate).
    pub self_tls: Option<Arc<rustls::ClientConfig>>,
    /// Connect budget for calls to members (`/metrics`).
    pub dial_timeout: Duration,
    /// Shares `/health` checks between concurrent requests.
    pub cluster_check: CheckGate,
    /// Shares `/proxy/health` checks between concurrent requests.
    pub proxy_check: CheckGate,
}

/// Lets concurrent health requests share checks, so a burst of them costs etcd a check or two
/// rather than one call (and one connection per member) each: at most one check runs at a
/// time, and a request takes the result of a check that started after it arrived, so it never
/// gets an answer older than itself.
#[derive(Debug, Default)]
pub struct CheckGate {
    last: tokio::sync::Mutex<Option<(Instant, Health)>>,
}

impl CheckGate {
    /// The result of `check`, run now or by a request that came after this one.
    pub async fn run<F: std::future::Future<Output = Health>>(
        &self,
        check: impl FnOnce() -> F,
    ) -> Health {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, health)) = &*last
            && *started >= arrived
        {
            return health.clone();
        }
        let started = Instant::now();
        let health = check().await;
        *last = Some((started, health.clone()));
        health
    }
}

/// The body of an HTTP answer.
pub type HttpBody = Full<Bytes>;

/// Serves one plain-HTTP request.
pub async fn handle<B>(admin: &Admin, req: Request<B>) -> Response<HttpBody> {
    let path = req.uri().path();
    match path {
        "/health" | "/proxy/health" => {
            if req.method() != Method::GET {
                let mut resp = go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
                resp.headers_mut()
                    .insert("allow", HeaderValue::from_static("GET"));
                return resp;
            }
            let health = if path == "/health" {
                let h = admin
                    .cluster_check
                    .run(|| check_cluster(&admin.upstream))
                    .await;
                if h.ok {
                    admin.metrics.health_success.inc();
                } else {
                    admin.metrics.health_failures.inc();
                }
                h
            } else {
                admin
                    .proxy_check
                    .run(|| check_proxy(admin.self_addr, admin.self_tls.as_ref()))
                    .await
            };
            if !health.ok {
                tracing::warn!(path, reason = %health.reason, "serving health check failure");
            }
            health.response()
        }
        "/metrics" => from_member(admin, "/metrics", "text/plain; version=0.0.4").await,
        "/version" => from_member(admin, "/version", "application/json").await,
        "/proxy/metrics" => {
            let mut resp = Response::new(Full::new(Bytes::from(admin.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        _ => go_error(StatusCode::NOT_FOUND, "404 page not found"),
    }
}

/// Go's `http.Error`: the message and a newline, as plain text that must not be sniffed.
pub(crate) fn go_error(status: StatusCode, message: &str) -> Response<HttpBody> {
    let mut resp = Response::new(Full::new(Bytes::from(format!("{message}\n"))));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The outcome of a health check, as etcd's `etcdhttp.Health`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Healthy or not.
    pub ok: bool,
    /// Why not; empty when healthy.
    pub reason: String,
}

impl Health {
    fn healthy() -> Health {
        Health {
            ok: true,
            reason: String::new(),
        }
    }

    fn unhealthy(reason: String) -> Health {
        Health { ok: false, reason }
    }

    /// etcd's JSON (`{"health":"true","reason":""}`).
    pub fn body(&self) -> String {
        format!(
            "{{\"health\":\"{}\",\"reason\":{}}}",
            self.ok,
            json_string(&self.reason)
        )
    }

    /// 200 with the body when healthy; 503 through `http.Error` (body plus newline) when not.
    fn response(&self) -> Response<HttpBody> {
        if self.ok {
            let mut resp = Response::new(Full::new(Bytes::from(self.body())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            resp
        } else {
            go_error(StatusCode::SERVICE_UNAVAILABLE, &self.body())
        }
    }
}

/// A JSON string literal, escaped as Go's encoding/json does it for these reasons.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Why a call made by the proxy itself did not succeed.
#[derive(Debug)]
enum CallError {
    /// No gRPC answer: connect failed, connection broke.
    Transport(String),
    /// A gRPC status other than OK.
    Status(u16, String),
}

impl CallError {
    /// Worth asking another member (as clientv3 retries a read on `Unavailable`).
    fn retryable(&self) -> bool {
        matches!(self, CallError::Transport(_) | CallError::Status(14, _))
    }

    /// The text a Go client prints for it: etcd's own errors are their message
    /// (`etcdserver: ...`), others `rpc error: code = ... desc = ...`.
    fn go_text(&self) -> String {
        match self {
            CallError::Transport(e) => e.clone(),
            CallError::Status(_, m) if m.starts_with("etcdserver: ") => m.clone(),
            CallError::Status(code, m) => {
                format!(
                    "rpc error: code = {} desc = {m}",
                    crate::metrics::code_name(*code)
                )
            }
        }
    }
}

/// The answer to the health Range means the cluster serves linearizable reads: success, or an
/// auth refusal, which etcd gives only after the read index went through (so a cluster with
/// auth on is healthy, as etcd's own `/health` says).
fn range_answered(result: &Result<(), CallError>) -> bool {
    match result {
        Ok(()) => true,
        Err(CallError::Status(7, _)) => true,
        Err(CallError::Status(3, m)) => m == "etcdserver: user name is empty",
        Err(_) => false,
    }
}

/// etcd's `checkHealth`: Range `a` within 1 s, moving to the next member on `Unavailable` as
/// clientv3 does, members whose probe fails last. Better than etcd's: a member that has not
/// answered within [`HEDGE_DELAY`] gets company (the next member is asked too, the first answer
/// counts), so one stopped member that the probe has not caught yet does not fail the check.
pub async fn check_cluster(upstream: &Upstream) -> Health {
    let attempt = async {
        loop {
            let mut members = upstream.members_in_order().into_iter();
            let mut calls = tokio::task::JoinSet::new();
            let mut last = None;
            loop {
                if calls.is_empty() {
                    let Some(ep) = members.next() else { break };
                    let dialer = upstream.dialer().clone();
                    calls.spawn(
                        async move { member_unary(&dialer, &ep, RANGE_PATH, RANGE_A).await },
                    );
                }
                let joined = tokio::select! {
                    joined = calls.join_next() => joined,
                    () = tokio::time::sleep(HEDGE_DELAY) => {
                        if let Some(ep) = members.next() {
                            let dialer = upstream.dialer().clone();
                            calls.spawn(async move {
                                member_unary(&dialer, &ep, RANGE_PATH, RANGE_A).await
                            });
                        }
                        continue;
                    }
                };
                // A call task only ends by returning (none is aborted while the set lives).
                let Some(Ok(result)) = joined else { continue };
                if range_answered(&result) {
                    return Ok(());
                }
                if let Err(e) = result {
                    if !e.retryable() {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
            tracing::debug!(error = ?last, "health check: no member answered; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    };
    match tokio::time::timeout(GET_TIMEOUT, attempt).await {
        Ok(Ok(())) => Health::healthy(),
        Ok(Err(e)) => Health::unhealthy(format!("GET ERROR:{}", e.go_text())),
        Err(_) => Health::unhealthy("GET ERROR:context deadline exceeded".into()),
    }
}

/// etcd's `checkProxyHealth`: the same Range, then a watch created, both through the proxy's
/// own port, so the whole path a client takes is checked.
pub async fn check_proxy(self_addr: SocketAddr, tls: Option<&Arc<rustls::ClientConfig>>) -> Health {
    let addr = self_addr.to_string();
    let mut last_error = None;
    let get = async {
        loop {
            let result = unary_with(&addr, tls, RANGE_PATH, RANGE_A).await;
            if range_answered(&result) {
                return Ok(());
            }
            match result {
                Err(e) if !e.retryable() => return Err(e),
                Err(e) => last_error = Some(e),
                Ok(()) => {}
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    };
    match tokio::time::timeout(GET_TIMEOUT, get).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Health::unhealthy(format!("GET ERROR:{}", e.go_text())),
        // Under TLS, the proxy failing to reach itself is most likely its own TLS set-up (its
        // certificate refused as a client certificate): say so rather than only "deadline".
        Err(_) if tls.is_some() && last_error.is_some() => {
            let e = last_error.map(|e| e.go_text()).unwrap_or_default();
            return Health::unhealthy(format!("GET ERROR:{e}"));
        }
        Err(_) => return Health::unhealthy("GET ERROR:context deadline exceeded".into()),
    }
    match tokio::time::timeout(WATCH_TIMEOUT, watch_created(&addr, tls)).await {
        Ok(Ok(())) => Health::healthy(),
        // etcd's proxy reports every way the watch can fail as a timeout (its channel only
        // closes when the context ends).
        Ok(Err(e)) => {
            tracing::debug!(error = ?e, "proxy health: watch failed");
            Health::unhealthy("WATCH TIMEOUT".into())
        }
        Err(_) => Health::unhealthy("WATCH TIMEOUT".into()),
    }
}

/// An HTTP/2 connection to `addr` (host:port), its driver task, and the request builder: h2c,
/// or over TLS with `tls` when given (the proxy calling its own TLS port; the SNI name is the
/// address's IP, which the pinned self-client verifier does not check).
async fn h2c_with(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<
    (
        hyper::client::conn::http2::SendRequest<Full<Bytes>>,
        JoinHandle<()>,
    ),
    CallError,
> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| CallError::Transport(format!("dial {addr}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let h2_error =
        |e: hyper::Error| CallError::Transport(format!("HTTP/2 handshake with {addr}: {e}"));
    if let Some(config) = tls {
        let ip = tcp
            .peer_addr()
            .map(|a| a.ip())
            .map_err(|e| CallError::Transport(format!("dial {addr}: {e}")))?;
        let name = crate::listen_tls::self_server_name(ip);
        let stream = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| CallError::Transport(format!("TLS handshake with {addr}: {e}")))?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(h2_error)?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        return Ok((sender, driver));
    }
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(h2_error)?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, driver))
}

/// A gRPC request for `path` carrying one message.
fn grpc_request(addr: &str, path: &str, message: &[u8]) -> Result<Request<Full<Bytes>>, CallError> {
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    // The messages here are a few bytes long.
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap_or(0).to_be_bytes());
    framed.extend_from_slice(message);
    Request::post(format!("http://{addr}{path}"))
        .header(CONTENT_TYPE, "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(framed)))
        .map_err(|e| CallError::Transport(format!("building a request to {addr}: {e}")))
}

/// The gRPC status in `headers`: `None` if there is none.
pub(crate) fn status_in(headers: &HeaderMap) -> Option<(u16, String)> {
    let code = headers.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((code, message))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = bytes.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(hex), 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One unary call over a fresh connection to the proxy's own port, over TLS with `tls` when
/// given; `Ok` when etcd answered `OK`.
async fn unary_with(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    path: &str,
    message: &[u8],
) -> Result<(), CallError> {
    let (sender, driver) = h2c_with(addr, tls).await?;
    unary_over(sender, driver, addr, path, message).await
}

/// One unary call to member `ep` over a fresh connection, TLS for an `https` member.
async fn member_unary(
    dialer: &Dialer,
    ep: &Endpoint,
    path: &str,
    message: &[u8],
) -> Result<(), CallError> {
    let addr = ep.to_string();
    let stream = dialer
        .connect(ep, Alpn::H2)
        .await
        .map_err(|e| CallError::Transport(format!("dial {addr}: {e}")))?;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| CallError::Transport(format!("HTTP/2 handshake with {addr}: {e}")))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    unary_over(sender, driver, &addr, path, message).await
}

/// One unary call on a fresh connection (`sender`, driven by `driver`, ended afterwards).
async fn unary_over(
    mut sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    driver: JoinHandle<()>,
    addr: &str,
    path: &str,
    message: &[u8],
) -> Result<(), CallError> {
    let result = async {
        let resp = sender
            .send_request(grpc_request(addr, path, message)?)
            .await
            .map_err(|e| CallError::Transport(format!("call to {addr}: {}", with_sources(&e))))?;
        if let Some(status) = status_in(resp.headers()) {
            return into_result(status);
        }
        let collected = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CallError::Transport(format!("reading the answer of {addr}: {e}")))?;
        match collected.trailers().and_then(status_in) {
            Some(status) => into_result(status),
            None => Err(CallError::Status(2, "no grpc-status in the answer".into())),
        }
    }
    .await;
    driver.abort();
    result
}

/// `e` and its sources (hyper's "connection error" alone does not say that a TLS alert came).
fn with_sources(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn into_result((code, message): (u16, String)) -> Result<(), CallError> {
    if code == 0 {
        Ok(())
    } else {
        Err(CallError::Status(code, message))
    }
}

/// Opens a watch on `a` at `addr` and waits for etcd's "created" answer.
async fn watch_created(
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(), CallError> {
    let (mut sender, driver) = h2c_with(addr, tls).await?;
    let result = async {
        // The request stream ends after the create request; etcd keeps the watch open (a
        // half-closed watch stream is still served) and answers with `created`.
        let resp = sender
            .send_request(grpc_request(addr, WATCH_PATH, WATCH_A)?)
            .await
            .map_err(|e| CallError::Transport(format!("watch at {addr}: {e}")))?;
        if let Some(status) = status_in(resp.headers()) {
            into_result(status)?;
        }
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        loop {
            let frame = match body.frame().await {
                Some(Ok(f)) => f,
                Some(Err(e)) => return Err(CallError::Transport(format!("watch at {addr}: {e}"))),
                None => return Err(CallError::Transport("watch ended without answer".into())),
            };
            if let Some(trailers) = frame.trailers_ref() {
                return match status_in(trailers) {
                    Some(status) => into_result(status).and(Err(CallError::Transport(
                        "watch ended without answer".into(),
                    ))),
                    None => Err(CallError::Transport("watch ended without answer".into())),
                };
            }
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
            }
            while buf.len() >= 5 {
                let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
                if buf.len() < 5 + len {
                    break;
                }
                if watch_response_created(&buf[5..5 + len]) {
                    return Ok(());
                }
                buf.drain(..5 + len);
            }
        }
    }
    .await;
    driver.abort();
    result
}

/// Whether a `WatchResponse` has `created = true` (field 3, varint).
fn watch_response_created(mut msg: &[u8]) -> bool {
    while !msg.is_empty() {
        let Some((tag, rest)) = varint(msg) else {
            return false;
        };
        msg = rest;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                let Some((value, rest)) = varint(msg) else {
                    return false;
                };
                if field == 3 && value != 0 {
                    return true;
                }
                msg = rest;
            }
            1 if msg.len() >= 8 => msg = &msg[8..],
            2 => {
                let Some((len, rest)) = varint(msg) else {
                    return false;
                };
                let Some(rest) = usize::try_from(len).ok().and_then(|l| rest.get(l..)) else {
                    return false;
                };
                msg = rest;
            }
            5 if msg.len() >= 4 => msg = &msg[4..],
            _ => return false,
        }
    }
    false
}

fn varint(buf: &[u8]) -> Option<(u64, &[u8])> {
    let mut value = 0u64;
    for (i, &b) in buf.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, &buf[i + 1..]));
        }
    }
    None
}

/// `/metrics`: a live member's own `/metrics`, passed through as etcd's proxy does (200 and
/// the member's body; 500 when no member answers). `/version` the same way (JSON clients of the
/// HTTP API read it to choose their API path).
async fn from_member(admin: &Admin, path: &str, content_type: &'static str) -> Response<HttpBody> {
    for ep in admin.upstream.members_in_order() {
        let dialer = admin.upstream.dialer();
        match tokio::time::timeout(admin.dial_timeout, http_get(dialer, &ep, path)).await {
            Ok(Ok(body)) => {
                let mut resp = Response::new(Full::new(body));
                resp.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
                return resp;
            }
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %ep, path, error = %e, "cannot read from a member")
            }
            Err(_) => tracing::debug!(endpoint = %ep, path, "member: no answer in time"),
        }
    }
    go_error(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
}

/// `GET path` from a member over HTTP/1.1 (over TLS for an `https` member); the body.
async fn http_get(dialer: &Dialer, ep: &Endpoint, path: &str) -> Result<Bytes, String> {
    let addr = ep.to_string();
    let stream = dialer
        .connect(ep, Alpn::Http1)
        .await
        .map_err(|e| format!("dial {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let result = async {
        let req = Request::get(path)
            .header("host", addr.as_str())
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        resp.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| e.to_string())
    }
    .await;
    driver.abort();
    result
}

/// Whether a request is gRPC (to be forwarded) rather than plain HTTP for [`handle`].
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn concurrent_health_requests_share_checks_but_never_get_an_older_answer() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let gate = Arc::new(CheckGate::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let check = |runs: Arc<AtomicUsize>| async move {
            let n = runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Health::unhealthy(format!("check {n}"))
        };
        let mut burst = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (gate, runs) = (gate.clone(), runs.clone());
            burst.spawn(async move { gate.run(|| check(runs)).await });
        }
        let mut answers = Vec::new();
        while let Some(h) = burst.join_next().await {
            answers.push(h.expect("request task").reason);
        }
        assert_eq!(answers.len(), 20);
        let checks = runs.load(Ordering::SeqCst);
        assert!(
            (1..=2).contains(&checks),
            "{checks} checks for a burst of 20"
        );
        // One after the other, each request gets a check of its own.
        let before = runs.load(Ordering::SeqCst);
        gate.run(|| check(runs.clone())).await;
        gate.run(|| check(runs.clone())).await;
        assert_eq!(runs.load(Ordering::SeqCst), before + 2);
    }

    #[test]
    fn health_bodies_are_etcds() {
        assert_eq!(Health::healthy().body(), r#"{"health":"true","reason":""}"#);
        assert_eq!(
            Health::unhealthy("GET ERROR:context deadline exceeded".into()).body(),
            r#"{"health":"false","reason":"GET ERROR:context deadline exceeded"}"#
        );
        assert_eq!(json_string("a\"b<"), r#""a\"b\u003c""#);
    }

    #[test]
    fn auth_refusals_count_as_an_answer() {
        assert!(range_answered(&Ok(())));
        assert!(range_answered(&Err(CallError::Status(
            7,
            "etcdserver: permission denied".into()
        ))));
        assert!(range_answered(&Err(CallError::Status(
            3,
            "etcdserver: user name is empty".into()
        ))));
        assert!(!range_answered(&Err(CallError::Status(
            14,
            "etcdserver: no leader".into()
        ))));
        assert_eq!(
            CallError::Status(14, "etcdserver: no leader".into()).go_text(),
            "etcdserver: no leader"
        );
        assert_eq!(
            CallError::Status(13, "boom".into()).go_text(),
            "rpc error: code = Internal desc = boom"
        );
    }

    #[test]
    fn watch_created_is_found() {
        // header {} , watch_id 0, created true
        assert!(watch_response_created(&[0x0a, 0x00, 0x18, 0x01]));
        assert!(watch_response_created(&[0x10, 0x05, 0x18, 0x01]));
        assert!(!watch_response_created(&[0x0a, 0x00, 0x10, 0x05]));
        assert!(!watch_response_created(&[0xff]));
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("a%0Ab%25"), "a\nb%");
        assert_eq!(percent_decode("100%"), "100%");
    }
}

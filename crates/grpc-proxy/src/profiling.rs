//! `--enable-pprof`: CPU profiles of the running proxy over HTTP, where etcd serves Go's
//! `net/http/pprof`: under `/debug/pprof/` on the main port only (not on `--metrics-addr`).
//!
//! Go's runtime profiles (heap, goroutine, mutex, trace) have no Rust counterpart; what carries
//! over is the CPU profile, taken with pprof-rs (SIGPROF sampling at Go's 100 Hz) and served in
//! the format `go tool pprof` reads: a gzipped `profile.proto`. So
//! `go tool pprof http://HOST:PORT/debug/pprof/profile?seconds=10` works against this proxy as
//! against etcd's. A flame graph (SVG) of the same samples is served for those without Go.
//!
//! One profile at a time, process-wide (the sampler is a process-wide signal handler); a second
//! request meanwhile gets `409 Conflict`. A client that goes away stops the profile.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HeaderValue, LOCATION};
use hyper::{Method, Request, Response, StatusCode};

use crate::admin::{HttpBody, go_error};

/// Where the endpoints live, as in Go.
pub const PREFIX: &str = "/debug/pprof";

/// Go's default profile length.
const DEFAULT_SECONDS: u64 = 30;
/// Longest profile one request may ask for.
const MAX_SECONDS: u64 = 300;
/// Samples per second of CPU time: Go's `runtime/pprof` rate.
const FREQUENCY: i32 = 100;
/// Libraries in which a sample is dropped rather than unwound: unwinding from inside the C
/// library, the unwinder itself or the vDSO can deadlock or crash (pprof-rs's advice).
const BLOCKLIST: &[&str] = &["libc", "libgcc", "pthread", "vdso"];

const INDEX: &str = "<html>
<head>
<title>/debug/pprof/</title>
</head>
<body>
/debug/pprof/<br>
<br>
CPU profiles of etcd-proxy, one at a time:
<ul>
<li><a href=\"profile?seconds=30\">profile</a>: a CPU profile over <code>?seconds=N</code> (1 to 300, default 30), gzipped profile.proto as <code>go tool pprof</code> reads it</li>
<li><a href=\"flamegraph?seconds=30\">flamegraph</a>: the same samples as an SVG flame graph</li>
</ul>
Go's heap, goroutine, block, mutex and trace profiles have no counterpart in this Rust proxy.
</body>
</html>
";

/// Serves `/debug/pprof/...`; holds whether a profile is being taken.
#[derive(Debug, Default)]
pub struct Profiler {
    busy: Arc<AtomicBool>,
}

/// What a profile is served as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// Gzipped `profile.proto`.
    Pprof,
    /// SVG flame graph.
    Flamegraph,
}

impl Profiler {
    /// A profiler with nothing running.
    pub fn new() -> Profiler {
        Profiler::default()
    }

    /// Whether `path` is one of [`Profiler::handle`]'s.
    pub fn serves(path: &str) -> bool {
        path == PREFIX || path.starts_with("/debug/pprof/")
    }

    /// Serves one request for a path [`Profiler::serves`].
    pub async fn handle<B>(&self, req: &Request<B>) -> Response<HttpBody> {
        if req.method() != Method::GET {
            let mut resp = go_error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
            resp.headers_mut()
                .insert("allow", HeaderValue::from_static("GET"));
            return resp;
        }
        let format = match req.uri().path() {
            // Go's ServeMux sends the bare subtree name to the subtree.
            PREFIX => {
                let mut resp = Response::new(Full::new(Bytes::new()));
                *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
                resp.headers_mut()
                    .insert(LOCATION, HeaderValue::from_static("/debug/pprof/"));
                return resp;
            }
            "/debug/pprof/" => {
                let mut resp = Response::new(Full::new(Bytes::from_static(INDEX.as_bytes())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                return resp;
            }
            "/debug/pprof/profile" => Format::Pprof,
            "/debug/pprof/flamegraph" => Format::Flamegraph,
            _ => return go_error(StatusCode::NOT_FOUND, "Unknown profile"),
        };
        let seconds = match seconds(req.uri().query()) {
            Ok(s) => s,
            Err(msg) => return go_error(StatusCode::BAD_REQUEST, &msg),
        };
        match self.profile(seconds, format).await {
            Ok(resp) => resp,
            Err(resp) => resp,
        }
    }

    /// Samples for `seconds`, then encodes the samples as `format`.
    async fn profile(
        &self,
        seconds: u64,
        format: Format,
    ) -> Result<Response<HttpBody>, Response<HttpBody>> {
        let Some(busy) = Busy::acquire(&self.busy) else {
            return Err(go_error(
                StatusCode::CONFLICT,
                "Could not enable CPU profiling: a CPU profile is already being taken",
            ));
        };
        tracing::info!(seconds, "taking a CPU profile");
        // Starting reads the process's libraries and warms up the unwinder (symbols of a
        // first backtrace): blocking work, off the runtime's workers.
        let started = tokio::task::spawn_blocking(|| {
            pprof::ProfilerGuardBuilder::default()
                .frequency(FREQUENCY)
                .blocklist(BLOCKLIST)
                .build()
        })
        .await;
        let guard = match started {
            Ok(Ok(guard)) => guard,
            Ok(Err(e)) => return Err(internal(format!("cannot start the CPU profiler: {e}"))),
            Err(e) => return Err(internal(format!("cannot start the CPU profiler: {e}"))),
        };
        // Dropping this future (the client left) drops the guard, which stops sampling.
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        // The guard and the busy mark go with the blocking task, so a client that leaves now
        // cannot start a second profile while this one is still stopping.
        let encoded = tokio::task::spawn_blocking(move || {
            let _busy = busy;
            let unresolved = guard.report().build_unresolved();
            // Stop sampling before symbolizing, so the profile does not show its own making.
            drop(guard);
            let report = resolve(unresolved.map_err(|e| e.to_string())?);
            encode(&report, format)
        })
        .await;
        match encoded {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(internal(format!("cannot encode the CPU profile: {e}"))),
            Err(e) => Err(internal(format!("cannot encode the CPU profile: {e}"))),
        }
    }
}

/// Marks a profile as running while it lives.
struct Busy(Arc<AtomicBool>);

impl Busy {
    fn acquire(flag: &Arc<AtomicBool>) -> Option<Busy> {
        (!flag.swap(true, Ordering::AcqRel)).then(|| Busy(flag.clone()))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// The `seconds` query parameter: absent or empty is [`DEFAULT_SECONDS`], as in Go; otherwise a
/// whole number from 1 to [`MAX_SECONDS`] (Go falls back to 30 on nonsense; a clear 400 is
/// better than a silent 30-second wait).
fn seconds(query: Option<&str>) -> Result<u64, String> {
    let value = query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == "seconds")
        .map(|(_, value)| value)
        .unwrap_or("");
    if value.is_empty() {
        return Ok(DEFAULT_SECONDS);
    }
    match value.parse::<u64>() {
        Ok(s) if (1..=MAX_SECONDS).contains(&s) => Ok(s),
        _ => Err(format!(
            "invalid seconds {value:?}: want a whole number from 1 to {MAX_SECONDS}"
        )),
    }
}

/// Symbolizes the sampled stacks (distinct addresses of one line become one stack).
fn resolve(unresolved: pprof::UnresolvedReport) -> pprof::Report {
    let mut data: HashMap<pprof::Frames, isize> = HashMap::new();
    for (frames, count) in unresolved.data {
        *data.entry(pprof::Frames::from(frames)).or_insert(0) += count;
    }
    pprof::Report {
        data,
        timing: unresolved.timing,
    }
}

/// The report as a response body of `format`.
fn encode(report: &pprof::Report, format: Format) -> Result<Response<HttpBody>, String> {
    match format {
        Format::Pprof => {
            use pprof::protos::Message as _;
            let profile = report.pprof().map_err(|e| e.to_string())?;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&profile.encode_to_vec())
                .map_err(|e| e.to_string())?;
            let body = gz.finish().map_err(|e| e.to_string())?;
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            let h = resp.headers_mut();
            // Go's headers for a profile download.
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(
                "content-disposition",
                HeaderValue::from_static("attachment; filename=\"profile\""),
            );
            h.insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            Ok(resp)
        }
        Format::Flamegraph => {
            let mut svg = Vec::new();
            report.flamegraph(&mut svg).map_err(|e| e.to_string())?;
            if svg.is_empty() {
                // inferno draws nothing without samples (an idle proxy uses no CPU).
                svg = br#"<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40"><text x="10" y="25">no CPU samples (idle)</text></svg>"#.to_vec();
            }
            let mut resp = Response::new(Full::new(Bytes::from(svg)));
            resp.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("image/svg+xml"));
            Ok(resp)
        }
    }
}

/// A 500 with the reason, logged.
fn internal(reason: String) -> Response<HttpBody> {
    tracing::warn!(error = %reason, "CPU profile failed");
    go_error(StatusCode::INTERNAL_SERVER_ERROR, &reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_default_bounds_and_garbage() {
        assert_eq!(seconds(None), Ok(30));
        assert_eq!(seconds(Some("")), Ok(30));
        assert_eq!(seconds(Some("seconds=")), Ok(30));
        assert_eq!(seconds(Some("debug=1")), Ok(30));
        assert_eq!(seconds(Some("seconds=1")), Ok(1));
        assert_eq!(seconds(Some("x=2&seconds=300&y")), Ok(300));
        for bad in [
            "seconds=abc",
            "seconds=0",
            "seconds=301",
            "seconds=-1",
            "seconds=1.5",
        ] {
            let err = seconds(Some(bad)).unwrap_err();
            assert!(err.contains("from 1 to 300"), "{bad}: {err}");
        }
    }

    #[test]
    fn paths() {
        assert!(Profiler::serves("/debug/pprof"));
        assert!(Profiler::serves("/debug/pprof/"));
        assert!(Profiler::serves("/debug/pprof/profile"));
        assert!(!Profiler::serves("/debug/pprofile"));
        assert!(!Profiler::serves("/metrics"));
    }

    #[tokio::test]
    async fn index_unknown_and_busy() {
        let p = Profiler::new();
        let get = |path: &str| Request::get(path).body(()).expect("request");
        let index = p.handle(&get("/debug/pprof/")).await;
        assert_eq!(index.status(), StatusCode::OK);
        let moved = p.handle(&get("/debug/pprof")).await;
        assert_eq!(moved.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(moved.headers()[LOCATION], "/debug/pprof/");
        let unknown = p.handle(&get("/debug/pprof/heap")).await;
        assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
        let bad = p.handle(&get("/debug/pprof/profile?seconds=abc")).await;
        assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
        let post = Request::post("/debug/pprof/profile")
            .body(())
            .expect("request");
        assert_eq!(
            p.handle(&post).await.status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        // A profile running: the next is refused without touching the sampler.
        let held = Busy::acquire(&p.busy).expect("idle");
        let busy = p.handle(&get("/debug/pprof/profile?seconds=1")).await;
        assert_eq!(busy.status(), StatusCode::CONFLICT);
        drop(held);
        assert!(Busy::acquire(&p.busy).is_some());
    }
}

//! `etcd-proxy grpc-proxy start --enable-pprof` and `--debug`, end to end against a real
//! 1-member etcd: CPU profiles under `/debug/pprof/` on the main port (a gzipped profile.proto
//! taken under load, decoded here; a flame graph; 400 on a bad `seconds`; 409 while one runs;
//! 404 without the flag and on `--metrics-addr`), and debug-level log lines only with `--debug`.

mod common;

use std::io::Read as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{ProxyProcess, ok, start_grpc_proxy};
use prost::Message as _;
use testkit::Cluster;

/// The parts of pprof's `profile.proto` (perftools.profiles.Profile) the test reads.
#[derive(Clone, PartialEq, prost::Message)]
struct Profile {
    #[prost(message, repeated, tag = "1")]
    sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    sample: Vec<Sample>,
    #[prost(string, repeated, tag = "6")]
    string_table: Vec<String>,
    #[prost(int64, tag = "10")]
    duration_nanos: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ValueType {
    #[prost(int64, tag = "1")]
    r#type: i64,
    #[prost(int64, tag = "2")]
    unit: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Sample {
    #[prost(uint64, repeated, tag = "1")]
    location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    value: Vec<i64>,
}

/// `curl url`: the status code and the body as bytes (profiles are binary).
fn curl(url: &str) -> (u16, Vec<u8>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("body");
    let run = || {
        Command::new("curl")
            .args(["-s", "--max-time", "60", "-w", "%{http_code}", "-o"])
            .arg(&path)
            .arg(url)
            .output()
            .expect("run curl")
    };
    let out = match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::block_in_place(run),
        Err(_) => run(),
    };
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl {url}: status {code:?}"));
    (code, std::fs::read(&path).unwrap_or_default())
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// Puts through the proxy from a few tasks until `stop`; counts successes.
fn start_load(
    addr: &str,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|task| {
            let addr = addr.to_string();
            let stop = stop.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut client = etcd_client::Client::connect([addr.as_str()], None)
                    .await
                    .expect("connect to the proxy");
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("load/{task}/{}", i % 64);
                    client
                        .put(key, vec![b'v'; 256], None)
                        .await
                        .expect("put through the proxy");
                    done.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect()
}

fn address(p: &ProxyProcess, msg: &str) -> String {
    p.log_entries(msg)
        .first()
        .and_then(|v| v["address"].as_str())
        .unwrap_or_else(|| panic!("`{msg}` has an address:\n{}", p.log()))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_profile_under_load_is_a_gzipped_pprof() {
    let cluster = Cluster::start(1).await;
    let (p, addr) = start_grpc_proxy(
        &cluster,
        &["--enable-pprof", "--metrics-addr=http://127.0.0.1:0"],
    );
    let base = format!("http://{addr}/debug/pprof");

    let (code, index) = curl(&format!("{base}/"));
    assert_eq!(code, 200, "{}", text(&index));
    assert!(
        text(&index).contains("profile?seconds="),
        "{}",
        text(&index)
    );
    for bad in ["abc", "0", "301", "1.5"] {
        let (code, body) = curl(&format!("{base}/profile?seconds={bad}"));
        assert_eq!(code, 400, "seconds={bad}: {}", text(&body));
        assert!(text(&body).contains("from 1 to 300"), "{}", text(&body));
    }
    let (code, body) = curl(&format!("{base}/heap"));
    assert_eq!((code, text(&body)), (404, "Unknown profile\n".to_string()));

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let load = start_load(&addr, stop.clone(), done.clone());
    // The load is running before sampling starts.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while done.load(Ordering::Relaxed) < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "no load through the proxy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, gz) = curl(&format!("{base}/profile?seconds=1"));
    assert_eq!(code, 200, "{}", text(&gz));
    assert_eq!(&gz[..2], &[0x1f, 0x8b], "gzip magic");
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut raw)
        .expect("gunzip the profile");
    let profile = Profile::decode(&raw[..]).expect("profile.proto");
    let name = |i: i64| profile.string_table[i as usize].as_str();
    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|t| (name(t.r#type), name(t.unit)))
        .collect();
    assert_eq!(types, [("samples", "count"), ("cpu", "nanoseconds")]);
    assert!(
        profile.duration_nanos >= 900_000_000,
        "{}",
        profile.duration_nanos
    );
    assert!(!profile.sample.is_empty(), "no CPU samples under load");
    assert!(profile.sample.iter().all(|s| s.value.len() == 2));
    // Symbolized: the runtime's worker threads show up by name.
    assert!(
        profile.string_table.iter().any(|s| s.contains("tokio")),
        "no tokio frame among {} strings",
        profile.string_table.len()
    );

    let (code, svg) = curl(&format!("{base}/flamegraph?seconds=1"));
    assert_eq!(code, 200, "{}", text(&svg));
    assert!(text(&svg).contains("<svg"), "{}", text(&svg));

    // One profile at a time: of two overlapping requests, one is refused.
    let first = {
        let url = format!("{base}/profile?seconds=3");
        tokio::task::spawn_blocking(move || curl(&url))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = curl(&format!("{base}/profile?seconds=1"));
    let first = first.await.expect("first profile");
    let mut codes = [first.0, second.0];
    codes.sort_unstable();
    assert_eq!(
        codes,
        [200, 409],
        "{} / {}",
        text(&first.1),
        text(&second.1)
    );
    let refused = if first.0 == 409 { &first.1 } else { &second.1 };
    assert!(text(refused).contains("already"), "{}", text(refused));

    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }

    // Not on --metrics-addr, as etcd.
    let metrics = address(&p, "gRPC proxy listening for metrics");
    for path in ["/debug/pprof/", "/debug/pprof/profile?seconds=1"] {
        let (code, body) = curl(&format!("http://{metrics}{path}"));
        assert_eq!(
            (code, text(&body)),
            (404, "404 page not found\n".to_string())
        );
    }
    // And the rest of the main port is as before.
    let (code, _) = curl(&format!("http://{addr}/health"));
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_flags_no_pprof_and_no_debug_lines() {
    let cluster = Cluster::start(1).await;
    let (p, addr) = start_grpc_proxy(&cluster, &[]);
    for path in [
        "/debug/pprof/",
        "/debug/pprof/profile?seconds=1",
        "/debug/pprof",
    ] {
        let (code, body) = curl(&format!("http://{addr}{path}"));
        assert_eq!(
            (code, text(&body)),
            (404, "404 page not found\n".to_string())
        );
    }
    // A call has gone through, so member connections exist and were logged (at debug level).
    ok(cluster.etcdctl_at(&addr, &["put", "k", "v"]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = p.log();
    assert!(!log.contains(r#""level":"debug""#), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn debug_flag_logs_at_debug_level() {
    let cluster = Cluster::start(1).await;
    let (p, addr) = start_grpc_proxy(&cluster, &["--debug"]);
    ok(cluster.etcdctl_at(&addr, &["put", "k", "v"]));
    // The proxy's own debug lines, e.g. `connected to etcd member` for each member connection.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let log = p.log();
        let own_debug = log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|v| {
                v["level"] == "debug"
                    && v["caller"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("grpc-proxy/"))
            });
        if own_debug {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no debug line of the proxy:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Per-frame noise of the HTTP/2 and I/O crates stays out even with --debug.
    let log = p.log();
    for noisy in [
        r#""caller":"h2-"#,
        r#""caller":"hyper-"#,
        r#""caller":"mio-"#,
    ] {
        assert!(!log.contains(noisy), "{noisy} in:\n{log}");
    }
}

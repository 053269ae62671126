//! `bench watch` against a real etcd: every watcher gets every event once, and etcd's watcher
//! count and a process's CPU time are read while the watchers are open.

mod common;

use common::args;
use testkit::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_gets_every_event_once() {
    let cluster = Cluster::start(1).await;
    let ep = cluster.client_endpoints().join(",");
    let metrics = format!("--metrics-url={}/metrics", cluster.member(0).metrics_url());
    let pid = format!("--cpu-pid={}", cluster.member(0).pid().expect("etcd pid"));
    let report = bench::run(&args(&[
        "watch",
        &format!("--endpoints={ep}"),
        &format!("--put-endpoint={ep}"),
        "--watchers=60",
        "--streams=7",
        "--conns=3",
        "--events=25",
        "--clients=4",
        "--val-size=100",
        "--timeout=20",
        &metrics,
        &pid,
    ]))
    .await
    .expect("watch run");
    let text = report.text();
    assert_eq!(report.mode, "watch");
    assert_eq!(report.errors, 0, "{text}");
    assert_eq!(report.succeeded, 60 * 25, "{text}");
    let w = report.watch.as_ref().expect("watch summary");
    assert_eq!((w.watchers, w.streams, w.conns, w.events), (60, 7, 3, 25));
    assert_eq!(
        (w.expected_deliveries, w.deliveries, w.missing),
        (1500, 1500, 0)
    );
    assert!(w.event_secs > 0.0 && w.deliveries_per_sec > 0.0, "{text}");
    assert!((1..=1500).contains(&w.event_responses), "{text}");
    // Straight to etcd, every watcher is one of etcd's.
    let before = w.etcd_watchers_before.expect("watchers before");
    assert_eq!(w.etcd_watchers_created, Some(before + 60), "{text}");
    assert_eq!(w.etcd_watchers_after, Some(before + 60), "{text}");
    assert!(
        w.cpu_ticks_create.is_some() && w.cpu_ticks_events.is_some(),
        "{text}"
    );
    assert!(w.notes.is_empty(), "{text}");
    assert!(
        text.contains("\nWatch:\n  Watchers:\t60 of one key on 7 streams"),
        "{text}"
    );
    assert!(!text.contains("WATCH ERRORS"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&report.json()).expect("json");
    assert_eq!(json["watch"]["deliveries"], 1500);
    assert_eq!(json["mode"], "watch");

    // The same key again: the second run's watchers start from now, so they see only its puts.
    let again = bench::run(&args(&[
        "watch",
        &format!("--endpoints={ep}"),
        "--watchers=5",
        "--streams=1",
        "--events=3",
        "--put-rate=20",
    ]))
    .await
    .expect("second watch run");
    // Paced: 3 puts at 20 a second take at least 100 ms.
    assert!(again.total_secs >= 0.1, "{}", again.text());
    assert_eq!((again.succeeded, again.errors), (15, 0), "{}", again.text());
}

#[tokio::test]
async fn a_missing_event_is_an_error_not_a_hang() {
    // Watchers on one etcd, puts on another: nothing arrives, and the run says so after --timeout.
    let watched = Cluster::start(1).await;
    let written = Cluster::start(1).await;
    let started = std::time::Instant::now();
    let report = bench::run(&args(&[
        "watch",
        &format!("--endpoints={}", watched.client_endpoints()[0]),
        &format!("--put-endpoint={}", written.client_endpoints()[0]),
        "--watchers=4",
        "--streams=2",
        "--events=3",
        "--timeout=1",
    ]))
    .await;
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    // No delivery at all: the run fails as put and range runs do when nothing succeeds.
    match report {
        Err(bench::BenchError::AllFailed { failed, first }) => {
            assert_eq!(failed, 12);
            assert!(first.contains("never delivered"), "{first}");
        }
        other => panic!("want AllFailed, got {other:?}"),
    }
}

//! What a run measured, and how it is shown: etcd benchmark's text layout for people, JSON for
//! scripts (`scripts/bench-gateway.sh` reads it).
//!
//! Latencies are kept exactly (a sorted `Vec`, 8 bytes a request: 400 KB for 50 000 requests), so
//! percentiles are exact nearest-rank values rather than histogram buckets.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

/// The percentiles reported, as etcd's benchmark reports them.
pub const PERCENTILES: [f64; 8] = [10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.9];

/// Number of bars in the response-time histogram (plus one for the slowest, as etcd does).
const HISTOGRAM_BUCKETS: usize = 10;
/// Width of the longest bar.
const BAR_WIDTH: u64 = 40;

/// The outcome of one benchmark run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// The workload: `put` or `range`.
    pub mode: String,
    /// Requests sent (succeeded + errors).
    pub requests: u64,
    /// Requests that got an OK answer.
    pub succeeded: u64,
    /// Requests that failed (gRPC error or timeout).
    pub errors: u64,
    /// Wall-clock time from the first request sent to the last answer, in seconds.
    pub total_secs: f64,
    /// Succeeded requests per second of `total_secs`.
    pub requests_per_sec: f64,
    /// Latency of the succeeded requests, in seconds.
    pub latency_secs: Latency,
    /// Response-time histogram of the succeeded requests: how many took at most `le_secs` (and more
    /// than the previous bucket's bound).
    pub histogram: Vec<Bucket>,
    /// Error message -> how many requests failed with it.
    pub error_distribution: BTreeMap<String, u64>,
    /// `watch` runs only: what the watchers saw and cost. In a watch run a "request" is one
    /// delivery of one event to one watcher, and latency is from the put's answer to the delivery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch: Option<WatchSummary>,
}

/// What a `watch` run measured besides deliveries and their latencies.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WatchSummary {
    /// Watchers opened, all of one key, from now.
    pub watchers: u64,
    /// Watch streams they were spread over.
    pub streams: u64,
    /// Connections the streams were spread over.
    pub conns: u64,
    /// Puts written (each an event for every watcher).
    pub events: u64,
    /// Puts a second asked for (`--put-rate`); 0 for as fast as they go.
    pub put_rate: f64,
    /// `watchers` x `events`.
    pub expected_deliveries: u64,
    /// Events delivered correctly: once, in order, at a revision the run wrote.
    pub deliveries: u64,
    /// Expected deliveries that never came.
    pub missing: u64,
    /// Watch responses that carried events (a server may put several revisions in one).
    pub event_responses: u64,
    /// From opening the streams to the last created answer, in seconds.
    pub create_secs: f64,
    /// From the first put to the last delivery (or the timeout), in seconds.
    pub event_secs: f64,
    /// `deliveries` / `event_secs`.
    pub deliveries_per_sec: f64,
    /// etcd's `etcd_debugging_mvcc_watcher_total` before the watchers were opened (`--metrics-url`).
    pub etcd_watchers_before: Option<u64>,
    /// The same once every watcher was created.
    pub etcd_watchers_created: Option<u64>,
    /// The same after the events, before the watchers were closed.
    pub etcd_watchers_after: Option<u64>,
    /// `--cpu-pid`: the process whose CPU time was read.
    pub cpu_pid: Option<u32>,
    /// Its `[utime, stime]` in clock ticks while the watchers were created.
    pub cpu_ticks_create: Option<[u64; 2]>,
    /// Its `[utime, stime]` in clock ticks during the event phase.
    pub cpu_ticks_events: Option<[u64; 2]>,
    /// The load generator's own `[utime, stime]` in clock ticks during the event phase (Linux).
    pub client_cpu_ticks_events: Option<[u64; 2]>,
    /// Measurements that could not be made (e.g. the metrics did not answer).
    pub notes: Vec<String>,
}

/// Latency statistics, in seconds; all zero when no request succeeded.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Mean.
    pub average: f64,
    /// Population standard deviation.
    pub stddev: f64,
    /// Quickest request.
    pub fastest: f64,
    /// Slowest request.
    pub slowest: f64,
    /// 10th percentile (nearest rank).
    pub p10: f64,
    /// 25th percentile.
    pub p25: f64,
    /// Median.
    pub p50: f64,
    /// 75th percentile.
    pub p75: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
}

/// One histogram bar.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Bucket {
    /// Upper bound, in seconds.
    pub le_secs: f64,
    /// Requests in this bucket.
    pub count: u64,
}

impl Report {
    /// Builds the report of a run in `mode` that took `total`, from the latencies of the succeeded
    /// requests (any order) and the failures by message.
    pub fn new(
        mode: &str,
        total: Duration,
        mut latencies: Vec<Duration>,
        error_distribution: BTreeMap<String, u64>,
    ) -> Report {
        latencies.sort_unstable();
        let secs: Vec<f64> = latencies.iter().map(Duration::as_secs_f64).collect();
        let succeeded = secs.len() as u64;
        let errors = error_distribution.values().sum();
        let total_secs = total.as_secs_f64();
        let requests_per_sec = if total_secs > 0.0 {
            succeeded as f64 / total_secs
        } else {
            0.0
        };
        Report {
            mode: mode.to_string(),
            requests: succeeded + errors,
            succeeded,
            errors,
            total_secs,
            requests_per_sec,
            latency_secs: Latency::of_sorted(&secs),
            histogram: histogram(&secs),
            error_distribution,
            watch: None,
        }
    }

    /// The report of a `watch` run.
    pub fn with_watch(mut self, summary: WatchSummary) -> Report {
        self.watch = Some(summary);
        self
    }

    /// The report as etcd's benchmark prints it: summary, histogram, latency distribution, errors.
    pub fn text(&self) -> String {
        let l = &self.latency_secs;
        let mut s = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "\nSummary:\n  Total:\t{}.\n  Slowest:\t{}.\n  Fastest:\t{}.\n  Average:\t{}.\n  \
             Stddev:\t{}.\n  Requests/sec:\t{:4.4}\n",
            secs(self.total_secs),
            secs(l.slowest),
            secs(l.fastest),
            secs(l.average),
            secs(l.stddev),
            self.requests_per_sec
        );
        if self.errors > 0 {
            let _ = writeln!(s, "  Errors:\t{} of {}", self.errors, self.requests);
        }
        if !self.histogram.is_empty() {
            s.push_str("\nResponse time histogram:\n");
            let max = self.histogram.iter().map(|b| b.count).max().unwrap_or(0);
            for b in &self.histogram {
                let bar = (b.count * BAR_WIDTH).checked_div(max).unwrap_or(0);
                let _ = writeln!(
                    s,
                    "  {:4.4} [{}]\t|{}",
                    b.le_secs,
                    b.count,
                    "∎".repeat(bar as usize)
                );
            }
        }
        if self.succeeded > 0 {
            s.push_str("\nLatency distribution:\n");
            for (p, v) in PERCENTILES.iter().zip(l.percentiles()) {
                let _ = writeln!(s, "  {p}% in {}.", secs(v));
            }
        }
        if let Some(w) = &self.watch {
            w.text(&mut s);
        }
        if !self.error_distribution.is_empty() {
            s.push_str("\nError distribution:\n");
            for (msg, n) in &self.error_distribution {
                let _ = writeln!(s, "  [{n}]\t{msg}");
            }
        }
        if self.watch.is_some() && self.errors > 0 {
            let _ = writeln!(
                s,
                "\n*** WATCH ERRORS: {} (see above): watchers did not see every event exactly once, \
                 in order; this run is not a valid measurement ***",
                self.errors
            );
        }
        s
    }

    /// Prints [`Report::text`] to stdout.
    pub fn print_text(&self) {
        print!("{}", self.text());
    }

    /// The report as one line of JSON.
    pub fn json(&self) -> String {
        // Only strings, numbers, vectors and string-keyed maps: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl WatchSummary {
    /// The `Watch:` block of the text report.
    fn text(&self, s: &mut String) {
        let opt = |v: Option<u64>| v.map_or_else(|| "?".to_string(), |v| v.to_string());
        let _ = write!(
            s,
            "\nWatch:\n  Watchers:\t{} of one key on {} streams over {} connections, created in {}.\n  \
             Events:\t{} puts ({}); deliveries {} of {} expected, {} missing, in {} responses\n  \
             Event phase:\t{}, {:4.4} deliveries/sec\n",
            self.watchers,
            self.streams,
            self.conns,
            secs(self.create_secs),
            self.events,
            if self.put_rate > 0.0 {
                format!("{} a second", self.put_rate)
            } else {
                "unpaced".to_string()
            },
            self.deliveries,
            self.expected_deliveries,
            self.missing,
            self.event_responses,
            secs(self.event_secs),
            self.deliveries_per_sec,
        );
        if self.etcd_watchers_before.is_some() || self.etcd_watchers_created.is_some() {
            let _ = writeln!(
                s,
                "  etcd watchers:\t{} before, {} with the watchers created, {} after the events",
                opt(self.etcd_watchers_before),
                opt(self.etcd_watchers_created),
                opt(self.etcd_watchers_after),
            );
        }
        let ticks =
            |t: Option<[u64; 2]>| t.map_or_else(|| "?".to_string(), |[u, s]| format!("{u}+{s}"));
        if let Some(pid) = self.cpu_pid {
            let _ = writeln!(
                s,
                "  CPU of pid {pid}:\t{} ticks (user+system) creating, {} during the events",
                ticks(self.cpu_ticks_create),
                ticks(self.cpu_ticks_events),
            );
        }
        if self.client_cpu_ticks_events.is_some() {
            let _ = writeln!(
                s,
                "  CPU of this client:\t{} ticks (user+system) during the events",
                ticks(self.client_cpu_ticks_events),
            );
        }
        for n in &self.notes {
            let _ = writeln!(s, "  Note:\t{n}");
        }
    }
}

impl Latency {
    /// Statistics of ascending-sorted latencies in seconds.
    fn of_sorted(sorted: &[f64]) -> Latency {
        let (Some(&fastest), Some(&slowest)) = (sorted.first(), sorted.last()) else {
            return Latency::default();
        };
        let n = sorted.len() as f64;
        let average = sorted.iter().sum::<f64>() / n;
        let variance = sorted.iter().map(|x| (x - average).powi(2)).sum::<f64>() / n;
        let p = |q| percentile(sorted, q);
        Latency {
            average,
            stddev: variance.sqrt(),
            fastest,
            slowest,
            p10: p(10.0),
            p25: p(25.0),
            p50: p(50.0),
            p75: p(75.0),
            p90: p(90.0),
            p95: p(95.0),
            p99: p(99.0),
            p99_9: p(99.9),
        }
    }

    /// The values of [`PERCENTILES`], in that order.
    fn percentiles(&self) -> [f64; 8] {
        [
            self.p10, self.p25, self.p50, self.p75, self.p90, self.p95, self.p99, self.p99_9,
        ]
    }
}

/// Nearest-rank percentile `q` (0..=100) of ascending-sorted values: the smallest value that at
/// least `q`% of the values are less than or equal to. 0 for no values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    // The epsilon keeps binary rounding (99.9 / 100 * 1000 = 999.0000000000001) from skipping a rank.
    let rank = (q / 100.0 * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// etcd's histogram: `HISTOGRAM_BUCKETS` equal-width buckets from the fastest value, plus one whose
/// bound is the slowest, over ascending-sorted values.
fn histogram(sorted: &[f64]) -> Vec<Bucket> {
    let (Some(&fastest), Some(&slowest)) = (sorted.first(), sorted.last()) else {
        return Vec::new();
    };
    let width = (slowest - fastest) / HISTOGRAM_BUCKETS as f64;
    let mut buckets: Vec<Bucket> = (0..HISTOGRAM_BUCKETS)
        .map(|i| Bucket {
            le_secs: fastest + width * i as f64,
            count: 0,
        })
        .chain(std::iter::once(Bucket {
            le_secs: slowest,
            count: 0,
        }))
        .collect();
    let mut b = 0;
    for &v in sorted {
        // Values ascend, so the bucket index only moves forward; the last bound is the maximum.
        while v > buckets[b].le_secs && b + 1 < buckets.len() {
            b += 1;
        }
        buckets[b].count += 1;
    }
    buckets
}

/// Seconds as etcd prints them: `0.0012 secs`.
fn secs(v: f64) -> String {
    format!("{v:4.4} secs")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 10.0), 10.0);
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 99.9), 100.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        let one = [7.0];
        assert_eq!(percentile(&one, 50.0), 7.0);
        assert_eq!(percentile(&one, 99.9), 7.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
        // 1000 values: p99.9 is the 999th, not the maximum.
        let k: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(&k, 99.9), 999.0);
    }

    #[test]
    fn report_math() {
        // 1, 2, 3, 4 ms in any order; 2 errors; 2 s in all.
        let mut errs = BTreeMap::new();
        errs.insert("boom".to_string(), 2);
        let r = Report::new("put", ms(2000), vec![ms(3), ms(1), ms(4), ms(2)], errs);
        assert_eq!(r.requests, 6);
        assert_eq!(r.succeeded, 4);
        assert_eq!(r.errors, 2);
        assert!(close(r.total_secs, 2.0));
        assert!(
            close(r.requests_per_sec, 2.0),
            "only successes count: 4 / 2 s"
        );
        let l = &r.latency_secs;
        assert!(close(l.average, 0.0025));
        // Population stddev of 1,2,3,4 ms: sqrt(1.25) ms.
        assert!(close(l.stddev, 1.25f64.sqrt() / 1000.0));
        assert!(close(l.fastest, 0.001));
        assert!(close(l.slowest, 0.004));
        assert!(close(l.p50, 0.002));
        assert!(close(l.p99, 0.004));
    }

    #[test]
    fn no_success_gives_zeros_not_nan() {
        let r = Report::new("range", ms(10), Vec::new(), BTreeMap::new());
        assert_eq!(r.latency_secs, Latency::default());
        assert_eq!(r.requests_per_sec, 0.0);
        assert!(r.histogram.is_empty());
        let z = Report::new("range", Duration::ZERO, vec![ms(1)], BTreeMap::new());
        assert_eq!(z.requests_per_sec, 0.0);
    }

    #[test]
    fn histogram_counts_every_value_once() {
        let v: Vec<f64> = (0..=100).map(|i| f64::from(i) / 100.0).collect();
        let h = histogram(&v);
        assert_eq!(h.len(), HISTOGRAM_BUCKETS + 1);
        assert_eq!(h.iter().map(|b| b.count).sum::<u64>(), 101);
        assert!(close(h[0].le_secs, 0.0));
        assert_eq!(h[0].count, 1, "only the fastest is <= the first bound");
        assert!(close(h[HISTOGRAM_BUCKETS].le_secs, 1.0));
        // All equal: everything lands in the first bucket.
        let same = histogram(&[0.5, 0.5, 0.5]);
        assert_eq!(same[0].count, 3);
    }

    #[test]
    fn text_has_etcd_benchmark_layout() {
        let mut errs = BTreeMap::new();
        errs.insert("rpc error: unavailable".to_string(), 1);
        let r = Report::new("put", ms(1000), vec![ms(1), ms(2), ms(3)], errs);
        let t = r.text();
        assert!(t.starts_with("\nSummary:\n  Total:\t1.0000 secs.\n"), "{t}");
        assert!(t.contains("  Slowest:\t0.0030 secs.\n"), "{t}");
        assert!(t.contains("  Fastest:\t0.0010 secs.\n"), "{t}");
        assert!(t.contains("  Average:\t0.0020 secs.\n"), "{t}");
        assert!(t.contains("  Requests/sec:\t3.0000\n"), "{t}");
        assert!(t.contains("\nResponse time histogram:\n"), "{t}");
        assert!(
            t.contains("\nLatency distribution:\n  10% in 0.0010 secs.\n"),
            "{t}"
        );
        assert!(t.contains("  99.9% in 0.0030 secs.\n"), "{t}");
        assert!(
            t.contains("\nError distribution:\n  [1]\trpc error: unavailable\n"),
            "{t}"
        );
    }

    #[test]
    fn json_has_the_fields_scripts_read() {
        let r = Report::new("range", ms(500), vec![ms(1); 10], BTreeMap::new());
        let v: serde_json::Value = serde_json::from_str(&r.json()).unwrap();
        assert_eq!(v["mode"], "range");
        assert_eq!(v["succeeded"], 10);
        assert_eq!(v["errors"], 0);
        assert!((v["requests_per_sec"].as_f64().unwrap() - 20.0).abs() < 1e-9);
        assert!((v["latency_secs"]["p99"].as_f64().unwrap() - 0.001).abs() < 1e-9);
        assert!(v["latency_secs"]["p99_9"].is_number());
    }
}

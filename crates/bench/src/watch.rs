//! `etcd-proxy bench watch`: what it costs to deliver one key's events to many watchers.
//!
//! Opens `--watchers` watchers of `--key`, all from now, over `--streams` Watch streams spread
//! over `--conns` connections (stream `s` on connection `s mod conns`, watchers dealt out evenly),
//! and waits until every one has its created answer. Then writes `--events` values of
//! `--val-size` bytes straight to etcd (`--put-endpoint`, `--clients` puts in flight) and waits
//! until every watcher has every event, at most `--timeout` seconds after the last put.
//!
//! Every event is checked as it arrives: for a created watcher, of the key, a put, at a revision
//! above the watcher's previous one (so never twice, never out of order), and no watcher gets more
//! events than were written; at the end every delivered revision must be one this run wrote, and
//! whatever did not arrive is counted as missing. Each failed check is an error of the report. (A
//! stream is no longer read once all its watchers have all their events, so an extra event after
//! that is not seen.)
//!
//! A delivery's latency is the time from the answer to the put that wrote its revision to the
//! arrival of the watch response (zero when the event arrives before the put's answer).
//!
//! With `--metrics-url` (etcd's `/metrics`), `etcd_debugging_mvcc_watcher_total` is read before
//! the watchers are opened, once they are all created, and after the events, before they are
//! closed: what the watchers cost etcd. With `--cpu-pid` (a proxy's process), its CPU time
//! (`/proc/PID/stat` utime and stime, in clock ticks) is read around the create phase and the
//! event phase.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::watch_client::WatchClient;
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{PutRequest, WatchCreateRequest, WatchRequest, WatchResponse};
use etcd_api::mvccpb::event::EventType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::BenchError;
use crate::report::{Report, WatchSummary};

/// The metric etcd counts its watchers in.
const WATCHER_METRIC: &str = "etcd_debugging_mvcc_watcher_total";
/// Bound on one read of `--metrics-url`.
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);

/// One watch run, from the command line.
pub(crate) struct Plan {
    /// Connections the watch streams are spread over.
    pub conns: usize,
    pub watchers: usize,
    pub streams: usize,
    pub events: u64,
    pub key: Bytes,
    pub value: Bytes,
    pub puts_in_flight: usize,
    /// Puts a second at most; 0 for no limit.
    pub put_rate: f64,
    /// For creating every watcher, and for the last event after the last put.
    pub timeout: Duration,
    /// `(host:port, path)` of etcd's metrics.
    pub metrics: Option<(String, String)>,
    pub cpu_pid: Option<u32>,
}

impl Plan {
    /// Refuses a plan that cannot run as asked.
    pub(crate) fn check(&self) -> Result<(), BenchError> {
        let bad = |m: &str| Err(BenchError::InvalidArgs(m.to_string()));
        if self.watchers == 0 || self.streams == 0 || self.events == 0 {
            return bad("--watchers, --streams and --events must be at least 1");
        }
        if self.streams > self.watchers {
            return bad("--streams must not exceed --watchers (a stream without watchers)");
        }
        if self.key.is_empty() {
            return bad("--key must not be empty");
        }
        if !(self.put_rate >= 0.0 && self.put_rate.is_finite()) {
            return bad("--put-rate must be a number of puts a second, 0 for no limit");
        }
        if self.timeout.is_zero() {
            return bad("--timeout must be at least 1 second");
        }
        Ok(())
    }
}

/// Watchers of each stream: `watchers` dealt out over `streams`, the first ones one more.
pub(crate) fn per_stream(watchers: usize, streams: usize) -> Vec<usize> {
    (0..streams)
        .map(|s| watchers / streams + usize::from(s < watchers % streams))
        .collect()
}

/// What the watchers of one stream saw, checked as it arrives.
#[derive(Debug)]
pub(crate) struct Ledger {
    /// Events each watcher must get.
    expected: u64,
    /// Watch ID -> last revision delivered and events delivered.
    seen: HashMap<i64, (i64, u64)>,
    /// Watchers that have all their events.
    complete: usize,
    errors: BTreeMap<String, u64>,
}

impl Ledger {
    pub(crate) fn new(expected: u64) -> Ledger {
        Ledger {
            expected,
            seen: HashMap::new(),
            complete: 0,
            errors: BTreeMap::new(),
        }
    }

    pub(crate) fn error(&mut self, msg: impl Into<String>) {
        *self.errors.entry(msg.into()).or_insert(0) += 1;
    }

    /// A created answer for `id`.
    pub(crate) fn created(&mut self, id: i64) {
        if self.seen.insert(id, (0, 0)).is_some() {
            self.error("created answer for a watch_id already created");
        }
    }

    pub(crate) fn created_count(&self) -> usize {
        self.seen.len()
    }

    /// An event of watcher `id` at `rev`; `true` when it counts as a delivery.
    pub(crate) fn event(&mut self, id: i64, rev: i64) -> bool {
        let Some((last, n)) = self.seen.get_mut(&id) else {
            self.error("event for a watch_id never created");
            return false;
        };
        if rev <= *last {
            self.error("event repeated or out of revision order");
            return false;
        }
        if *n >= self.expected {
            self.error("more events than were written");
            return false;
        }
        *last = rev;
        *n += 1;
        if *n == self.expected {
            self.complete += 1;
        }
        true
    }

    /// Every one of `watchers` watchers is created and has all its events.
    pub(crate) fn is_complete(&self, watchers: usize) -> bool {
        self.complete >= watchers
    }

    /// Deliveries still missing for `watchers` watchers (a watcher never created misses all).
    pub(crate) fn missing(&self, watchers: usize) -> u64 {
        let delivered: u64 = self.seen.values().map(|(_, n)| *n).sum();
        (watchers as u64 * self.expected).saturating_sub(delivered)
    }

    pub(crate) fn into_errors(self) -> BTreeMap<String, u64> {
        self.errors
    }
}

/// Latencies of the deliveries at revisions this run wrote (arrival minus the put's answer,
/// zero if the event came first), and how many arrived at a revision it did not write.
pub(crate) fn settle(
    acks: &HashMap<i64, Instant>,
    arrivals: &[(i64, Instant)],
) -> (Vec<Duration>, u64) {
    let mut latencies = Vec::with_capacity(arrivals.len());
    let mut unexpected = 0;
    for (rev, at) in arrivals {
        match acks.get(rev) {
            Some(acked) => latencies.push(at.saturating_duration_since(*acked)),
            None => unexpected += 1,
        }
    }
    (latencies, unexpected)
}

/// `http://host:port[/path]` -> (`host:port`, `/path`, `/metrics` when none).
pub(crate) fn parse_metrics_url(url: &str) -> Result<(String, String), BenchError> {
    let bad =
        || BenchError::InvalidArgs(format!("--metrics-url {url}: want http://host:port/path"));
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (addr, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if addr.is_empty() || !addr.contains(':') {
        return Err(bad());
    }
    Ok((addr.to_string(), path.to_string()))
}

/// Sum of the samples of metric `name` in Prometheus text; `None` when there is none.
pub(crate) fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').find(|s| !s.is_empty())?;
        if let Ok(v) = value.parse::<f64>() {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// `utime` and `stime` (clock ticks) from the text of `/proc/PID/stat`. The command name may hold
/// spaces and parentheses: the fields after its last `)` are counted.
pub(crate) fn parse_stat_ticks(stat: &str) -> Option<[u64; 2]> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the file, utime 14 and stime 15.
    Some([fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?])
}

fn cpu_ticks(pid: Option<u32>) -> Option<[u64; 2]> {
    parse_stat_ticks(&std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?)
}

fn ticks_between(a: Option<[u64; 2]>, b: Option<[u64; 2]>) -> Option<[u64; 2]> {
    let (a, b) = (a?, b?);
    Some([b[0].saturating_sub(a[0]), b[1].saturating_sub(a[1])])
}

/// etcd's watcher count from `metrics`, or why it could not be read.
async fn etcd_watchers(metrics: &Option<(String, String)>) -> Option<Result<u64, String>> {
    let (addr, path) = metrics.as_ref()?;
    let read = async {
        let mut s = tokio::net::TcpStream::connect(addr.as_str()).await?;
        // HTTP/1.0: the answer is not chunked and ends when the server closes.
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let got = match tokio::time::timeout(METRICS_TIMEOUT, read).await {
        Err(_) => Err(format!(
            "GET http://{addr}{path}: no answer within {METRICS_TIMEOUT:?}"
        )),
        Ok(Err(e)) => Err(format!("GET http://{addr}{path}: {e}")),
        Ok(Ok(buf)) => {
            let text = String::from_utf8_lossy(&buf);
            match text.split_once("\r\n\r\n") {
                Some((head, body)) if head.split(' ').nth(1) == Some("200") => {
                    metric_value(body, WATCHER_METRIC)
                        .map(|v| v as u64)
                        .ok_or_else(|| format!("no {WATCHER_METRIC} at http://{addr}{path}"))
                }
                _ => Err(format!(
                    "GET http://{addr}{path}: {}",
                    text.lines().next().unwrap_or("empty answer")
                )),
            }
        }
    };
    Some(got)
}

fn status_message(status: &tonic::Status) -> String {
    format!(
        "rpc error: code = {:?} desc = {}",
        status.code(),
        status.message()
    )
}

/// What one stream's task hands back: its ledger, its accepted deliveries (revision, arrival),
/// and the open stream, so that its watchers stay open until the caller drops it.
struct StreamOutcome {
    ledger: Ledger,
    /// Watch responses that carried events.
    responses: u64,
    arrivals: Vec<(i64, Instant)>,
    _open: Option<(mpsc::Sender<WatchRequest>, Streaming<WatchResponse>)>,
}

/// Opens one Watch stream with `n` watchers of `key`, reports on `created` once all are created
/// (or why not), and reads until each has `events` events or `stop` says so.
async fn watch_stream(
    channel: Channel,
    key: Bytes,
    n: usize,
    events: u64,
    created: oneshot::Sender<Result<(), String>>,
    mut stop: watch::Receiver<bool>,
) -> StreamOutcome {
    let mut ledger = Ledger::new(events);
    let mut arrivals = Vec::with_capacity(n.saturating_mul(events as usize));
    let mut created = Some(created);
    let (tx, rx) = mpsc::channel(n);
    for _ in 0..n {
        // The channel holds n: this cannot fail.
        let _ = tx.try_send(WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.clone(),
                ..Default::default()
            })),
        });
    }
    let requests =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut client = WatchClient::new(channel).max_decoding_message_size(usize::MAX);
    let call = client.watch(requests);
    let mut responses = tokio::select! {
        r = call => match r {
            Ok(r) => r.into_inner(),
            Err(s) => {
                let msg = format!("watch stream refused: {}", status_message(&s));
                ledger.error(msg.clone());
                if let Some(c) = created.take() {
                    let _ = c.send(Err(msg));
                }
                return StreamOutcome {
                    ledger,
                    responses: 0,
                    arrivals,
                    _open: None,
                };
            }
        },
        _ = stop.changed() => {
            return StreamOutcome {
                ledger,
                responses: 0,
                arrivals,
                _open: None,
            };
        }
    };
    let mut with_events = 0;
    loop {
        let msg = tokio::select! {
            m = responses.message() => m,
            _ = stop.changed() => break,
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                ledger.error("watch stream ended by the server");
                break;
            }
            Err(s) => {
                ledger.error(format!("watch stream failed: {}", status_message(&s)));
                break;
            }
        };
        let now = Instant::now();
        if resp.canceled {
            ledger.error(format!(
                "watcher canceled: {:?} (compact_revision {})",
                resp.cancel_reason, resp.compact_revision
            ));
        } else if resp.created {
            ledger.created(resp.watch_id);
            if ledger.created_count() == n
                && let Some(c) = created.take()
            {
                let _ = c.send(Ok(()));
            }
        }
        with_events += u64::from(!resp.events.is_empty());
        for ev in &resp.events {
            let Some(kv) = &ev.kv else {
                ledger.error("event without a key-value");
                continue;
            };
            if kv.key != key {
                ledger.error("event of another key");
            } else if ev.r#type != EventType::Put as i32 {
                ledger.error("event not a put");
            } else if ledger.event(resp.watch_id, kv.mod_revision) {
                arrivals.push((kv.mod_revision, now));
            }
        }
        if ledger.is_complete(n) {
            break;
        }
    }
    if let Some(c) = created.take() {
        let _ = c.send(Err(format!(
            "{} of {n} watchers of a stream created before it ended",
            ledger.created_count()
        )));
    }
    StreamOutcome {
        ledger,
        responses: with_events,
        arrivals,
        _open: Some((tx, responses)),
    }
}

/// When put `i` may be sent, `rate` puts a second from `start` (`None`: at once).
pub(crate) fn put_slot(start: Instant, i: u64, rate: f64) -> Option<Instant> {
    (rate > 0.0).then(|| start + Duration::from_secs_f64(i as f64 / rate))
}

/// Writes `events` puts of `value` to `key` with `in_flight` at a time, at most `rate` a second
/// (0: no limit): revision -> answer time.
async fn write_events(
    channel: Channel,
    key: &Bytes,
    value: &Bytes,
    events: u64,
    in_flight: usize,
    rate: f64,
) -> Result<HashMap<i64, Instant>, String> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let mut kv = KvClient::new(channel.clone());
            let (next, key, value) = (next.clone(), key.clone(), value.clone());
            tokio::spawn(async move {
                let mut acks: Vec<(i64, Instant)> = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= events {
                        break;
                    }
                    if let Some(at) = put_slot(start, i, rate) {
                        tokio::time::sleep_until(at.into()).await;
                    }
                    let put = kv
                        .put(PutRequest {
                            key: key.clone(),
                            value: value.clone(),
                            ..Default::default()
                        })
                        .await
                        .map_err(|s| {
                            format!("put to --put-endpoint failed: {}", status_message(&s))
                        })?;
                    let at = Instant::now();
                    let rev = put.into_inner().header.map(|h| h.revision).unwrap_or(0);
                    acks.push((rev, at));
                }
                Ok::<_, String>(acks)
            })
        })
        .collect();
    let mut acks = HashMap::new();
    for w in workers {
        let got = w.await.map_err(|e| format!("put worker failed: {e}"))??;
        acks.extend(got);
    }
    Ok(acks)
}

/// The value of a metrics read, keeping why it failed in `notes`.
fn sample(read: Option<Result<u64, String>>, notes: &mut Vec<String>) -> Option<u64> {
    match read? {
        Ok(v) => Some(v),
        Err(e) => {
            notes.push(e);
            None
        }
    }
}

/// Stops every stream task and waits for them.
async fn abandon(stop: &watch::Sender<bool>, tasks: Vec<JoinHandle<StreamOutcome>>) {
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
}

/// Runs the watch benchmark: `watch_endpoints` are where the watchers go (the proxy),
/// `put_endpoint` is etcd itself.
pub(crate) async fn run(
    plan: &Plan,
    watch_endpoints: &[String],
    put_endpoint: &[String],
) -> Result<Report, BenchError> {
    plan.check()?;
    // Watch streams last the whole run: no request timeout.
    let channels = crate::connect_with(watch_endpoints, plan.conns, None).await?;
    let put_channel = crate::connect(put_endpoint, 1).await?.remove(0);
    let mut notes = Vec::new();
    let before = sample(etcd_watchers(&plan.metrics).await, &mut notes);

    // Create phase: every watcher of every stream has its created answer.
    let (stop, stop_rx) = watch::channel(false);
    let cpu_start = cpu_ticks(plan.cpu_pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(plan.streams);
    let mut created = Vec::with_capacity(plan.streams);
    for (s, n) in per_stream(plan.watchers, plan.streams)
        .into_iter()
        .enumerate()
    {
        let (tx, rx) = oneshot::channel();
        created.push(rx);
        tasks.push(tokio::spawn(watch_stream(
            channels[s % channels.len()].clone(),
            plan.key.clone(),
            n,
            plan.events,
            tx,
            stop_rx.clone(),
        )));
    }
    let deadline = tokio::time::Instant::now() + plan.timeout;
    for rx in created {
        let failed = match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Ok(()))) => continue,
            Ok(Ok(Err(e))) => e,
            Ok(Err(_)) => "a watch stream task ended early".to_string(),
            Err(_) => format!(
                "not every watcher was created within {}s",
                plan.timeout.as_secs()
            ),
        };
        abandon(&stop, tasks).await;
        return Err(BenchError::Watch(failed));
    }
    let create_secs = started.elapsed().as_secs_f64();
    let cpu_created = cpu_ticks(plan.cpu_pid);
    let with_watchers = sample(etcd_watchers(&plan.metrics).await, &mut notes);

    // Event phase: the puts, then every delivery (or the timeout).
    let cpu_events = cpu_ticks(plan.cpu_pid);
    let own = Some(std::process::id());
    let own_events = cpu_ticks(own);
    let events_started = Instant::now();
    let acks = match write_events(
        put_channel,
        &plan.key,
        &plan.value,
        plan.events,
        plan.puts_in_flight.max(1),
        plan.put_rate,
    )
    .await
    {
        Ok(acks) => acks,
        Err(e) => {
            abandon(&stop, tasks).await;
            return Err(BenchError::Watch(e));
        }
    };
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let mut timed_out = false;
    let mut outcomes = Vec::with_capacity(tasks.len());
    for mut task in tasks {
        let done = if timed_out {
            task.await
        } else {
            tokio::select! {
                r = &mut task => r,
                _ = tokio::time::sleep_until(deadline) => {
                    timed_out = true;
                    let _ = stop.send(true);
                    task.await
                }
            }
        };
        match done {
            Ok(o) => outcomes.push(Some(o)),
            // A stream task only panics on a bug; its watchers count as missing.
            Err(e) => {
                notes.push(format!("watch stream task failed: {e}"));
                outcomes.push(None);
            }
        }
    }
    let cpu_end = cpu_ticks(plan.cpu_pid);
    let own_end = cpu_ticks(own);
    let after = sample(etcd_watchers(&plan.metrics).await, &mut notes);

    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut latencies = Vec::with_capacity(plan.watchers.saturating_mul(plan.events as usize));
    let mut delivered_total = 0u64;
    let mut event_responses = 0;
    let mut last_arrival = events_started;
    let mut unexpected = 0;
    let mut missing = 0;
    for (o, n) in outcomes.iter().zip(per_stream(plan.watchers, plan.streams)) {
        let Some(o) = o else {
            // The watchers of a failed task miss every event.
            missing += n as u64 * plan.events;
            continue;
        };
        missing += o.ledger.missing(n);
        event_responses += o.responses;
        delivered_total += o.arrivals.len() as u64;
        if let Some(t) = o.arrivals.iter().map(|(_, t)| *t).max() {
            last_arrival = last_arrival.max(t);
        }
        let (l, u) = settle(&acks, &o.arrivals);
        latencies.extend(l);
        unexpected += u;
    }
    for o in outcomes.into_iter().flatten() {
        // Dropping each outcome here closes its stream, and so its watchers.
        for (msg, k) in o.ledger.into_errors() {
            *errors.entry(msg).or_insert(0) += k;
        }
    }
    if unexpected > 0 {
        errors.insert(
            "event at a revision this run did not write".into(),
            unexpected,
        );
    }
    if missing > 0 {
        let why = if timed_out {
            format!(
                "event never delivered (waited {}s after the last put)",
                plan.timeout.as_secs()
            )
        } else {
            "event never delivered (the stream ended)".to_string()
        };
        errors.insert(why, missing);
    }
    let end = if timed_out {
        Instant::now()
    } else {
        last_arrival
    };
    let event_secs = end.duration_since(events_started);
    let deliveries = latencies.len() as u64;
    debug_assert!(deliveries + unexpected == delivered_total);
    let summary = WatchSummary {
        watchers: plan.watchers as u64,
        streams: plan.streams as u64,
        conns: plan.conns as u64,
        events: plan.events,
        put_rate: plan.put_rate,
        expected_deliveries: plan.watchers as u64 * plan.events,
        deliveries,
        missing,
        event_responses,
        create_secs,
        event_secs: event_secs.as_secs_f64(),
        deliveries_per_sec: if event_secs.is_zero() {
            0.0
        } else {
            deliveries as f64 / event_secs.as_secs_f64()
        },
        etcd_watchers_before: before,
        etcd_watchers_created: with_watchers,
        etcd_watchers_after: after,
        cpu_pid: plan.cpu_pid,
        cpu_ticks_create: ticks_between(cpu_start, cpu_created),
        cpu_ticks_events: ticks_between(cpu_events, cpu_end),
        client_cpu_ticks_events: ticks_between(own_events, own_end),
        notes,
    };
    Ok(Report::new("watch", event_secs, latencies, errors).with_watch(summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchers_are_dealt_out_evenly() {
        assert_eq!(per_stream(2000, 20), vec![100; 20]);
        assert_eq!(per_stream(10, 4), [3, 3, 2, 2]);
        assert_eq!(per_stream(3, 3), [1, 1, 1]);
        assert_eq!(per_stream(7, 1), [7]);
        assert_eq!(per_stream(1001, 20).iter().sum::<usize>(), 1001);
    }

    #[test]
    fn a_plan_that_cannot_run_is_refused() {
        let plan = |watchers, streams, events, key: &'static str| Plan {
            conns: 1,
            watchers,
            streams,
            events,
            key: Bytes::from_static(key.as_bytes()),
            value: Bytes::new(),
            puts_in_flight: 1,
            put_rate: 0.0,
            timeout: Duration::from_secs(1),
            metrics: None,
            cpu_pid: None,
        };
        assert!(plan(2000, 20, 200, "k").check().is_ok());
        assert!(plan(1, 1, 1, "k").check().is_ok());
        for bad in [
            plan(0, 1, 1, "k"),
            plan(1, 0, 1, "k"),
            plan(1, 1, 0, "k"),
            plan(1, 2, 1, "k"),
            plan(1, 1, 1, ""),
        ] {
            assert!(matches!(bad.check(), Err(BenchError::InvalidArgs(_))));
        }
    }

    #[test]
    fn puts_are_paced_by_the_rate() {
        let t0 = Instant::now();
        assert_eq!(put_slot(t0, 5, 0.0), None);
        assert_eq!(put_slot(t0, 0, 50.0), Some(t0));
        assert_eq!(put_slot(t0, 5, 50.0), Some(t0 + Duration::from_millis(100)));
        assert_eq!(put_slot(t0, 3, 2.0), Some(t0 + Duration::from_millis(1500)));
    }

    #[test]
    fn every_event_once_in_order() {
        let mut l = Ledger::new(3);
        l.created(1);
        l.created(2);
        assert_eq!(l.created_count(), 2);
        assert!(l.event(1, 10) && l.event(1, 11));
        assert!(!l.is_complete(2));
        assert_eq!(l.missing(2), 4);
        assert!(l.event(1, 12));
        assert!(l.event(2, 10) && l.event(2, 11) && l.event(2, 12));
        assert!(l.is_complete(2));
        assert_eq!(l.missing(2), 0);
        assert!(l.into_errors().is_empty());
    }

    #[test]
    fn repeats_reorders_strangers_and_extras_are_errors() {
        let mut l = Ledger::new(2);
        l.created(1);
        l.created(1);
        assert!(l.event(1, 5));
        assert!(!l.event(1, 5), "repeated");
        assert!(!l.event(1, 4), "older");
        assert!(!l.event(9, 6), "never created");
        assert!(l.event(1, 7));
        assert!(!l.event(1, 8), "more than written");
        assert!(l.is_complete(1));
        let e = l.into_errors();
        assert_eq!(e["event repeated or out of revision order"], 2);
        assert_eq!(e["event for a watch_id never created"], 1);
        assert_eq!(e["more events than were written"], 1);
        assert_eq!(e["created answer for a watch_id already created"], 1);
    }

    #[test]
    fn a_watcher_never_created_misses_everything() {
        let mut l = Ledger::new(5);
        l.created(0);
        assert!(l.event(0, 1));
        // 3 watchers expected, one created with one event.
        assert_eq!(l.missing(3), 14);
        assert!(!l.is_complete(3));
    }

    #[test]
    fn latencies_from_the_puts_answer() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let acks: HashMap<i64, Instant> = [(10, t0), (11, t0 + ms(5))].into();
        let arrivals = [
            (10, t0 + ms(3)),
            (11, t0 + ms(4)), // before the put's answer: zero
            (11, t0 + ms(9)),
            (12, t0 + ms(9)), // not written by this run
        ];
        let (lat, unexpected) = settle(&acks, &arrivals);
        assert_eq!(lat, [ms(3), Duration::ZERO, ms(4)]);
        assert_eq!(unexpected, 1);
    }

    #[test]
    fn metrics_urls() {
        assert_eq!(
            parse_metrics_url("http://127.0.0.1:2379/metrics").unwrap(),
            ("127.0.0.1:2379".to_string(), "/metrics".to_string())
        );
        assert_eq!(
            parse_metrics_url("http://[::1]:2379").unwrap(),
            ("[::1]:2379".to_string(), "/metrics".to_string())
        );
        for bad in [
            "127.0.0.1:2379",
            "https://a:1/metrics",
            "http:///metrics",
            "http://a/x",
        ] {
            assert!(parse_metrics_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn metric_values_from_prometheus_text() {
        let text = "# HELP etcd_debugging_mvcc_watcher_total Total number of watchers.\n\
                    # TYPE etcd_debugging_mvcc_watcher_total gauge\n\
                    etcd_debugging_mvcc_watcher_total 2001\n\
                    etcd_debugging_mvcc_watcher_total_other 7\n\
                    x{a=\"1\"} 2\nx{a=\"2\"} 3.5\n";
        assert_eq!(metric_value(text, WATCHER_METRIC), Some(2001.0));
        assert_eq!(metric_value(text, "x"), Some(5.5));
        assert_eq!(metric_value(text, "etcd_debugging_mvcc"), None);
        assert_eq!(metric_value("", WATCHER_METRIC), None);
    }

    #[test]
    fn cpu_ticks_from_proc_stat() {
        // A command name with a space and a parenthesis; utime 1234, stime 56.
        let stat = "4242 (etcd (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 56 0 0 20 0 \
                    12 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some([1234, 56]));
        assert_eq!(parse_stat_ticks("4242 (etcd) S 1 2"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(parse_stat_ticks(&own).is_some(), "{own}");
        assert_eq!(ticks_between(Some([10, 5]), Some([15, 9])), Some([5, 4]));
        assert_eq!(ticks_between(None, Some([1, 1])), None);
    }
}

//! `etcd-proxy bench staleness`: how long a write made directly to etcd takes to show in a
//! serializable read through a caching proxy.
//!
//! One key. For each of `--total` writes: read the key serializably through `--endpoints` (the
//! proxy) until it shows the current value, and twice more, so that the proxy holds it in its
//! cache; put a new value through `--write-endpoints` (etcd itself); then read through the proxy
//! with no pause until the new value shows. The time from the put's answer to that read's
//! answer is the write's visibility delay, reported as the latencies of the run (a write not
//! visible within 10 s is an error). Reads are serializable and sent one at a time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_api::etcdserverpb::kv_client::KvClient;
use etcd_api::etcdserverpb::{PutRequest, RangeRequest};
use tonic::transport::Channel;

/// The key written and read.
const KEY: &[u8] = b"etcd-proxy-bench-staleness";
/// A write not visible after this is counted as an error.
const GIVE_UP: Duration = Duration::from_secs(10);

/// What one run saw: its duration, the visibility delays, and failures by message.
pub(crate) struct Seen {
    pub elapsed: Duration,
    pub delays: Vec<Duration>,
    pub errors: BTreeMap<String, u64>,
}

fn message(status: &tonic::Status) -> String {
    format!(
        "rpc error: code = {:?} desc = {}",
        status.code(),
        status.message()
    )
}

fn count(msg: String, errors: &mut BTreeMap<String, u64>) {
    *errors.entry(msg).or_insert(0) += 1;
}

/// The key's value through `kv`, read serializably.
async fn read(kv: &mut KvClient<Channel>) -> Result<Option<Bytes>, tonic::Status> {
    let r = kv
        .range(RangeRequest {
            key: Bytes::from_static(KEY),
            serializable: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(r.kvs.into_iter().next().map(|kv| kv.value))
}

/// Reads through `kv` until the value is `want`; how long after `since` it showed.
async fn visible(
    kv: &mut KvClient<Channel>,
    want: &Bytes,
    since: Instant,
) -> Result<Duration, String> {
    loop {
        let got = read(kv).await.map_err(|s| message(&s))?;
        if got.as_ref() == Some(want) {
            return Ok(since.elapsed());
        }
        if since.elapsed() > GIVE_UP {
            return Err(format!("write not visible within {GIVE_UP:?}"));
        }
    }
}

/// Runs `total` writes through `write` and measures their visibility through `read_via`.
pub(crate) async fn run(read_via: Channel, write: Channel, total: u64) -> Seen {
    let mut reader = KvClient::new(read_via);
    let mut writer = KvClient::new(write);
    let mut delays = Vec::new();
    let mut errors = BTreeMap::new();
    let started = Instant::now();
    let mut current = Bytes::from_static(b"start");
    if let Err(s) = writer
        .put(PutRequest {
            key: Bytes::from_static(KEY),
            value: current.clone(),
            ..Default::default()
        })
        .await
    {
        count(message(&s), &mut errors);
        return Seen {
            elapsed: started.elapsed(),
            delays,
            errors,
        };
    }
    for i in 0..total {
        // The current value, cached by the proxy: a miss fills the cache, the reads after hit.
        if let Err(e) = visible(&mut reader, &current, Instant::now()).await {
            count(e, &mut errors);
            continue;
        }
        for _ in 0..2 {
            let _ = read(&mut reader).await;
        }
        let next = Bytes::from(format!("value-{i}"));
        let put = writer
            .put(PutRequest {
                key: Bytes::from_static(KEY),
                value: next.clone(),
                ..Default::default()
            })
            .await;
        if let Err(s) = put {
            count(message(&s), &mut errors);
            continue;
        }
        let since = Instant::now();
        match visible(&mut reader, &next, since).await {
            Ok(d) => delays.push(d),
            Err(e) => count(e, &mut errors),
        }
        current = next;
    }
    Seen {
        elapsed: started.elapsed(),
        delays,
        errors,
    }
}

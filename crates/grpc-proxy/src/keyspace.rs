//! One watch over a whole key range that the proxy holds for itself, with no credentials: the
//! leasing cache's ([`crate::leasing`]) and the range cache's ([`crate::cache`]) view of every
//! write made to the cluster, whoever made it.
//!
//! Both need the same things from it, so they live here once: the watch is opened on a member
//! in health order (avoiding the one that just failed it, when another exists), asks for a
//! progress report every `progress_every` so that a member that stops answering (SIGSTOP, a
//! partition) is noticed after three silent periods, and ends on the first sign of trouble:
//! the stream breaks or ends, etcd cancels the watcher (compaction, auth), or the member fails
//! its health probe. It is never resumed: its owner drops what it derived from it and opens a
//! new one, since events may have been missed in between.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use etcd_api::etcdserverpb::watch_client::WatchClient;
use etcd_api::etcdserverpb::watch_request::RequestUnion;
use etcd_api::etcdserverpb::{
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use futures::StreamExt;

use crate::cluster::Cluster;
use crate::rewrite::Limits;

/// How long the create may take before the member is given up.
const CREATE_TIMEOUT: Duration = Duration::from_secs(5);

/// A live watch over `[key, range_end)` (etcd's form), opened by [`KeyspaceWatch::open`].
pub(crate) struct KeyspaceWatch {
    requests: tokio::sync::mpsc::Sender<WatchRequest>,
    stream: tonic::Streaming<WatchResponse>,
    ticker: tokio::time::Interval,
    silence: Duration,
    last_heard: Instant,
    /// Resolves when the member fails its health probe.
    failed: Pin<Box<dyn Future<Output = ()> + Send>>,
    member: String,
}

impl KeyspaceWatch {
    /// Opens a watch of `[key, range_end)` from `start_revision` (0: from now), with
    /// `progress_notify`, on the first member in health order that is not `avoid` (or on
    /// `avoid` when it is the only one). Fails with the reason when no member takes it.
    pub(crate) async fn open(
        cluster: &Cluster,
        limits: Limits,
        range: (Bytes, Bytes),
        start_revision: i64,
        progress_every: Duration,
        avoid: Option<&str>,
    ) -> Result<KeyspaceWatch, String> {
        let members = cluster.member_channels();
        let Some((endpoint, ch)) = members
            .iter()
            .find(|(ep, _)| avoid.is_none_or(|a| ep.to_string() != a))
            .or(members.first())
            .cloned()
        else {
            return Err("no etcd member is configured".into());
        };
        let member = endpoint.to_string();
        let create = WatchRequest {
            request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
                key: range.0,
                range_end: range.1,
                start_revision,
                progress_notify: true,
                ..Default::default()
            })),
        };
        // Requests go through a channel, so that progress requests can follow the create.
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        if tx.send(create).await.is_err() {
            return Err("watch request channel closed".into());
        }
        let requests =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
        let created = tokio::time::timeout(CREATE_TIMEOUT, async {
            WatchClient::new(ch)
                .max_decoding_message_size(limits.decoded_response())
                .watch(requests)
                .await
        })
        .await;
        let stream = match created {
            Ok(Ok(s)) => s.into_inner(),
            Ok(Err(e)) => return Err(format!("cannot watch on {member}: {e}")),
            Err(_) => return Err(format!("watch not created in time on {member}")),
        };
        let failed: Pin<Box<dyn Future<Output = ()> + Send>> = match cluster.serving(&endpoint) {
            Some(serving) => Box::pin(async move { serving.failed().await }),
            None => Box::pin(std::future::pending()),
        };
        let mut ticker = tokio::time::interval(progress_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(KeyspaceWatch {
            requests: tx,
            stream,
            ticker,
            silence: progress_every * 3,
            last_heard: Instant::now(),
            failed,
            member,
        })
    }

    /// The member the watch is on (`host:port`).
    pub(crate) fn member(&self) -> &str {
        &self.member
    }

    /// The next response from etcd (the created response first, then events and progress
    /// reports), or why the watch ended.
    pub(crate) async fn next(&mut self) -> Result<WatchResponse, String> {
        loop {
            let msg = tokio::select! {
                msg = self.stream.next() => msg,
                _ = self.ticker.tick() => {
                    if self.last_heard.elapsed() > self.silence {
                        return Err("etcd member stopped answering the watch".into());
                    }
                    let progress = WatchRequest {
                        request_union: Some(RequestUnion::ProgressRequest(WatchProgressRequest {})),
                    };
                    let _ = self.requests.try_send(progress);
                    continue;
                }
                () = &mut self.failed => {
                    return Err("etcd member failed its health probe".into());
                }
            };
            self.last_heard = Instant::now();
            return match msg {
                Some(Ok(r)) if r.canceled || r.compact_revision != 0 => {
                    Err(format!("watch canceled: {}", r.cancel_reason))
                }
                Some(Ok(r)) => Ok(r),
                None => Err("watch stream ended".into()),
                Some(Err(e)) => Err(format!("watch failed: {e}")),
            };
        }
    }
}

//! The member pool: which members are live, which one the next connection goes to, and the
//! per-member monitor that takes dead members out and puts recovered ones back.
//!
//! Picking is lock-free (atomics only) because it runs once per accepted connection. A member
//! leaves the pool when a dial to it fails or a probe finds it dead; its monitor probes it again
//! `retry_delay` later, and keeps doing so until it answers. Unlike etcd's single sweep timed
//! from gateway start, each member gets its own timer, so it is out for one `retry_delay`, not
//! "somewhere between zero and one".

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use backend::Endpoint;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::metrics::{EndpointMetrics, Metrics};
use crate::{Config, format_duration};

/// One member and its state.
pub struct Member {
    pub endpoint: Endpoint,
    pub addr: String,
    active: AtomicBool,
    /// Wakes the monitor when a dial failure takes the member out.
    deactivated: Notify,
    pub metrics: EndpointMetrics,
}

pub struct Pool {
    pub members: Vec<Member>,
    next: AtomicUsize,
    config: Config,
    pub metrics: Metrics,
    tls_probe: Arc<rustls::ClientConfig>,
}

impl Pool {
    pub fn new(config: &Config, metrics: Metrics) -> Pool {
        let members = config
            .endpoints
            .iter()
            .map(|ep| {
                let m = metrics.endpoint(ep);
                m.up.set(1);
                Member {
                    endpoint: ep.clone(),
                    addr: ep.to_string(),
                    active: AtomicBool::new(true),
                    deactivated: Notify::new(),
                    metrics: m,
                }
            })
            .collect();
        Pool {
            members,
            next: AtomicUsize::new(0),
            config: config.clone(),
            metrics,
            tls_probe: backend::tls::probe_client_config(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn active_count(&self) -> usize {
        self.members.iter().filter(|m| m.is_active()).count()
    }

    /// The next member for a new connection, skipping `tried` (indexes already failed for this
    /// connection). Among live members of the best (lowest) SRV priority: round-robin when no
    /// weights are set, which is always the case for `--endpoints`; otherwise a weighted random
    /// choice, with weight-0 members given a small chance as RFC 2782 asks.
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let usable = |i: usize| self.members[i].is_active() && !tried.contains(&i);
        let best = (0..self.members.len())
            .filter(|&i| usable(i))
            .map(|i| self.members[i].endpoint.priority)
            .min()?;
        let in_class = |i: usize| usable(i) && self.members[i].endpoint.priority == best;
        let total_weight: u32 = (0..self.members.len())
            .filter(|&i| in_class(i))
            .map(|i| u32::from(self.members[i].endpoint.weight))
            .sum();
        if total_weight > 0 && fastrand::u32(0..100) != 0 {
            let mut choose = fastrand::u32(0..total_weight);
            for i in (0..self.members.len()).filter(|&i| in_class(i)) {
                let w = u32::from(self.members[i].endpoint.weight);
                if choose < w {
                    return Some(i);
                }
                choose -= w;
            }
        }
        let candidates = (0..self.members.len()).filter(|&i| in_class(i)).count();
        if candidates == 0 {
            // Another connection's failed dial, or a probe, took the last one out since `best`
            // was computed: no live member after all, so the caller falls back to the others.
            return None;
        }
        let nth = self.next.fetch_add(1, Ordering::Relaxed) % candidates;
        (0..self.members.len()).filter(|&i| in_class(i)).nth(nth)
    }

    /// Members that are out, in round-robin order: tried as a last resort when no member is live,
    /// so that a cluster coming back is used at once rather than one `retry_delay` later.
    pub fn inactive_in_order(&self, tried: &[usize]) -> Vec<usize> {
        let n = self.members.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| !self.members[i].is_active() && !tried.contains(&i))
            .collect()
    }

    /// Takes member `i` out after a failed dial or probe.
    pub fn deactivate(&self, i: usize, error: &str) {
        let m = &self.members[i];
        if m.active.swap(false, Ordering::AcqRel) {
            m.metrics.up.set(0);
            tracing::warn!(
                address = %m.addr,
                interval = %format_duration(self.config.retry_delay),
                error = %error,
                "deactivated endpoint"
            );
            m.deactivated.notify_one();
        }
    }

    /// Puts member `i` back after a successful dial or probe.
    pub fn activate(&self, i: usize) {
        let m = &self.members[i];
        if !m.active.swap(true, Ordering::AcqRel) {
            m.metrics.up.set(1);
            tracing::info!(address = %m.addr, "activated");
        }
    }

    /// One monitor task per member.
    pub fn spawn_monitors(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        (0..self.members.len())
            .map(|i| {
                let pool = self.clone();
                tokio::spawn(async move { pool.monitor(i).await })
            })
            .collect()
    }

    async fn probe(&self, i: usize) -> Result<(), String> {
        let m = &self.members[i];
        backend::probe::probe(
            &self.config.dns,
            &m.endpoint,
            self.config.dial_timeout,
            &self.tls_probe,
        )
        .await
    }

    async fn monitor(&self, i: usize) {
        let m = &self.members[i];
        let interval = self.config.health_check_interval;
        loop {
            if m.is_active() {
                if interval.is_zero() {
                    m.deactivated.notified().await;
                    continue;
                }
                tokio::select! {
                    _ = m.deactivated.notified() => continue,
                    _ = tokio::time::sleep(interval) => {}
                }
                if !m.is_active() {
                    continue;
                }
                if let Err(e) = self.probe(i).await {
                    m.metrics.probe_failures.inc();
                    self.deactivate(i, &format!("health check failed: {e}"));
                }
            } else {
                tokio::time::sleep(self.config.retry_delay).await;
                if m.is_active() {
                    continue; // a last-resort dial found it alive meanwhile
                }
                match self.probe(i).await {
                    Ok(()) => self.activate(i),
                    Err(e) => {
                        m.metrics.probe_failures.inc();
                        tracing::warn!(
                            address = %m.addr,
                            interval = %format_duration(self.config.retry_delay),
                            error = %e,
                            "failed to activate endpoint (stay inactive for another interval)"
                        );
                    }
                }
            }
        }
    }
}

impl Member {
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(specs: &[(u16, u16)]) -> Pool {
        let endpoints: Vec<Endpoint> = specs
            .iter()
            .enumerate()
            .map(|(i, &(priority, weight))| Endpoint {
                host: "127.0.0.1".into(),
                port: 10000 + i as u16,
                scheme: backend::Scheme::Unspecified,
                priority,
                weight,
            })
            .collect();
        let config = Config::new(endpoints.clone());
        Pool::new(&config, Metrics::new(&endpoints))
    }

    #[test]
    fn round_robin_over_live_members_only() {
        let p = pool(&[(0, 0), (0, 0), (0, 0)]);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(&[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        p.deactivate(1, "test");
        let picks: Vec<usize> = (0..4).map(|_| p.pick(&[]).unwrap()).collect();
        assert!(!picks.contains(&1));
        assert_eq!(
            picks.iter().filter(|&&i| i == 0).count(),
            2,
            "even share: {picks:?}"
        );
        p.activate(1);
        assert!((0..3).map(|_| p.pick(&[]).unwrap()).any(|i| i == 1));
    }

    #[test]
    fn tried_members_are_skipped_and_none_left_means_none() {
        let p = pool(&[(0, 0), (0, 0)]);
        assert_eq!(p.pick(&[0]), Some(1));
        assert_eq!(p.pick(&[0, 1]), None);
        p.deactivate(0, "test");
        p.deactivate(1, "test");
        assert_eq!(p.pick(&[]), None);
        let mut last = p.inactive_in_order(&[]);
        last.sort();
        assert_eq!(last, vec![0, 1]);
    }

    #[test]
    fn lower_priority_wins_and_weights_share_it() {
        let p = pool(&[(10, 0), (0, 1), (0, 3)]);
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[p.pick(&[]).unwrap()] += 1;
        }
        assert_eq!(
            counts[0], 0,
            "priority 10 must not be used while priority 0 is live"
        );
        // 1:3 split, with generous slack for randomness.
        assert!(counts[2] > counts[1] * 2, "{counts:?}");
        p.deactivate(1, "t");
        p.deactivate(2, "t");
        assert_eq!(p.pick(&[]), Some(0));
    }
}

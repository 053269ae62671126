//! Shutdown on SIGTERM or SIGINT. etcd's gateway simply dies on them; we log which one arrived, in
//! etcd's words, so the caller can stop accepting and drain open connections.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Resolves on the first SIGTERM or SIGINT after the call, having logged info
/// `received signal; shutting down` with `signal` = `"terminated"` or `"interrupt"`.
/// Returns that name. If a handler cannot be installed (which the OS allows only in odd
/// environments), that signal is logged as an error and only the other one is awaited.
pub async fn shutdown_signal() -> &'static str {
    ShutdownSignals::install().recv().await
}

/// The installed handlers. Installing is separate from waiting so that a signal sent right after
/// [`ShutdownSignals::install`] returns is never missed.
pub struct ShutdownSignals {
    term: Option<Signal>,
    int: Option<Signal>,
}

impl ShutdownSignals {
    /// Installs the SIGTERM and SIGINT handlers; from now on those signals no longer kill the
    /// process. Must run inside a tokio runtime.
    pub fn install() -> Self {
        ShutdownSignals {
            term: install_one(SignalKind::terminate(), "SIGTERM"),
            int: install_one(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// Waits for the first SIGTERM or SIGINT, logs it and returns its name as etcd prints it.
    pub async fn recv(mut self) -> &'static str {
        let name = tokio::select! {
            Some(()) = recv_opt(&mut self.term) => "terminated",
            Some(()) = recv_opt(&mut self.int) => "interrupt",
            // Both streams end only when the runtime shuts down, which drops this future anyway.
            else => std::future::pending().await,
        };
        tracing::info!(signal = name, "received signal; shutting down");
        name
    }
}

fn install_one(kind: SignalKind, name: &'static str) -> Option<Signal> {
    match signal(kind) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(signal = name, error = %e, "failed to install signal handler");
            None
        }
    }
}

/// Waits on a handler that may be missing (then forever).
async fn recv_opt(sig: &mut Option<Signal>) -> Option<()> {
    match sig {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sends `sig` to this process with kill(1): no unsafe code, and the handler is installed
    /// first, so the test process never takes the default action.
    fn kill_self(sig: &str) {
        let status = std::process::Command::new("kill")
            .args([sig, &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    // Both signals in one test: the handlers are process-wide, and tests run in parallel.
    #[tokio::test]
    async fn resolves_on_sigterm_then_sigint() {
        let signals = ShutdownSignals::install();
        kill_self("-TERM");
        let got = tokio::time::timeout(Duration::from_secs(10), signals.recv())
            .await
            .expect("SIGTERM seen");
        assert_eq!(got, "terminated");

        let signals = ShutdownSignals::install();
        kill_self("-INT");
        let got = tokio::time::timeout(Duration::from_secs(10), signals.recv())
            .await
            .expect("SIGINT seen");
        assert_eq!(got, "interrupt");
    }
}

//! Runs the real `etcd-proxy` binary for end-to-end tests: start it with flags, wait for a log
//! line, read its JSON logs, stop it by PID.

#![allow(dead_code)] // each test binary uses a different part of this module

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `etcd-proxy`, killed on drop.
pub struct ProxyProcess {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_etcd-proxy")
}

/// `etcd-proxy <args>` with stdout and stderr piped, stdin closed.
fn spawn(args: &[&str]) -> Child {
    Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn etcd-proxy")
}

impl ProxyProcess {
    /// Starts `etcd-proxy <args>` and waits (up to 30 s) for a log line containing `ready_msg`.
    pub fn start(args: &[&str], ready_msg: &str) -> ProxyProcess {
        let mut child = spawn(args);
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stderr.take().expect("stderr piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout piped")),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let mut p = ProxyProcess { child, lines };
        p.wait_for_log(ready_msg, Duration::from_secs(30));
        p
    }

    /// Waits until a log line contains `needle`; panics with the whole log otherwise.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return l.clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(200)); // let the reader threads catch up
                panic!(
                    "etcd-proxy exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every line logged so far.
    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Lines logged so far whose message is `msg`, parsed.
    pub fn log_entries(&self, msg: &str) -> Vec<serde_json::Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["msg"] == msg)
            .collect()
    }

    /// The address the gateway listens on, from its `ready to proxy client requests` line.
    pub fn listen_addr(&self) -> String {
        let ready = self.log_entries("ready to proxy client requests");
        ready
            .first()
            .and_then(|v| v["listen_addr"].as_str())
            .expect("ready line has listen_addr")
            .to_string()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal by PID (only to the process this test started).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits for exit, up to `timeout`; returns the exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `etcd-proxy <args>` to completion (for flag errors); returns (code, stdout+stderr).
pub fn run_to_exit(args: &[&str]) -> (i32, String) {
    let mut child = spawn(args);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("etcd-proxy {args:?} did not exit within 30s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Asserts an etcdctl run succeeded and returns its stdout.
pub fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "etcdctl failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free loopback port (bound then released; tests tolerate the small race).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

//! A dnsmasq on loopback serving only the SRV and host records a test gives: DNS discovery
//! tests of the gateway and the gRPC proxy.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::free_port;

/// A dnsmasq serving only the records given, on a free loopback port; killed on drop.
pub struct Dns {
    child: Child,
    addr: String,
}

impl Dns {
    /// `srv`: (service name, target, port); `hosts`: names that resolve to 127.0.0.1.
    pub fn start(srv: &[(&str, &str, u16)], hosts: &[&str]) -> Dns {
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .expect("dnsmasq is installed by scripts/test.sh");
        for _ in 0..5 {
            let port = free_port();
            let mut args = vec![
                "--keep-in-foreground".to_string(),
                "--conf-file=/dev/null".into(),
                "--no-resolv".into(),
                "--no-hosts".into(),
                "--no-poll".into(),
                "--bind-interfaces".into(),
                "--listen-address=127.0.0.1".into(),
                format!("--port={port}"),
                "--user=root".into(),
                "--pid-file=".into(),
                // Authoritative for the test domain: unknown names get NXDOMAIN, not REFUSED.
                "--local=/example.test/".into(),
            ];
            for (service, target, p) in srv {
                args.push(format!("--srv-host={service},{target},{p},0,0"));
            }
            for h in hosts {
                args.push(format!("--host-record={h},127.0.0.1"));
            }
            let mut child = Command::new(&bin)
                .args(&args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn dnsmasq");
            std::thread::sleep(Duration::from_millis(300));
            match child.try_wait() {
                Ok(None) => {
                    return Dns {
                        child,
                        addr: format!("127.0.0.1:{port}"),
                    };
                }
                _ => continue, // the port was taken meanwhile: try another
            }
        }
        panic!("dnsmasq did not start");
    }

    pub fn flag(&self) -> String {
        format!("--discovery-dns-server={}", self.addr)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

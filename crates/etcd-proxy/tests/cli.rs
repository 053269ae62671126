//! The command line as users meet it: the real binary, its exit codes, stdout and stderr. Flag
//! names, defaults and help texts are etcd 3.5's (`etcd gateway start --help`,
//! `etcd grpc-proxy start --help`).

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_etcd-proxy"))
        .args(args)
        // Not under systemd, whatever the test runner's environment says.
        .env_remove("NOTIFY_SOCKET")
        .output()
        .expect("run etcd-proxy")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts every needle appears in `text`.
fn assert_has_all(text: &str, needles: &[&str]) {
    for needle in needles {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn gateway_start_help_lists_every_etcd_flag_and_default() {
    let o = run(&["gateway", "start", "--help"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with(
            "start the gateway\n\nUsage:\n  etcd-proxy gateway start [flags]\n\nFlags:\n"
        ),
        "{out}"
    );
    assert_has_all(
        &out,
        &[
            "--discovery-srv string ",
            "DNS domain used to bootstrap initial cluster\n",
            "--discovery-srv-name string ",
            "service name to query when using DNS discovery\n",
            "--endpoints strings ",
            "comma separated etcd cluster endpoints (default [127.0.0.1:2379])\n",
            "  -h, --help ",
            "help for start\n",
            "--insecure-discovery ",
            "accept insecure SRV records\n",
            "--listen-addr string ",
            "listen address (default \"127.0.0.1:23790\")\n",
            "--retry-delay duration ",
            "duration of delay before retrying failed endpoints (default 1m0s)\n",
            "--trusted-ca-file string ",
            "path to the client server TLS CA file for verifying the discovered endpoints when discovery-srv is provided.\n",
            // Ours, marked as such.
            "--metrics-addr string ",
            "--dial-timeout duration ",
            "--health-check-interval duration ",
            "--drain-timeout duration ",
            "--discovery-dns-server string ",
            "etcd-proxy only:",
        ],
    );
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

#[test]
fn grpc_proxy_start_help_lists_every_etcd_flag_and_default() {
    let o = run(&["grpc-proxy", "start", "--help"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.starts_with(
            "start the grpc proxy\n\nUsage:\n  etcd-proxy grpc-proxy start [flags]\n\nFlags:\n"
        ),
        "{out}"
    );
    // (flag with type word, help text with etcd's default) for every flag of etcd 3.5, plus
    // this proxy's range cache flags.
    let flags: &[(&str, &str)] = &[
        (
            "--advertise-client-url string",
            "advertise address to register (must be reachable by client) (default \"127.0.0.1:23790\")",
        ),
        ("--auto-tls", "proxy TLS using generated certificates"),
        (
            "--cacert string",
            "verify certificates of TLS-enabled secure etcd servers using this CA bundle",
        ),
        (
            "--cert string",
            "identify secure connections with etcd servers using this TLS certificate file",
        ),
        (
            "--cert-file string",
            "identify secure connections to the proxy using this TLS certificate file",
        ),
        (
            "--client-crl-file string",
            "proxy client certificate revocation list file.",
        ),
        (
            "--data-dir string",
            "Data directory for persistent data (default \"default.proxy\")",
        ),
        ("--debug", "Enable debug-level logging for grpc-proxy."),
        (
            "--dial-keepalive-time duration",
            "keepalive time for client(grpc-proxy) connections (default 0, disable).",
        ),
        (
            "--dial-keepalive-timeout duration",
            "keepalive timeout for client(grpc-proxy) connections (default 20s). (default 20s)",
        ),
        (
            "--disable-range-cache",
            "Disable the range cache: every Range request goes to etcd.",
        ),
        (
            "--discovery-dns-server string",
            "etcd-proxy only: DNS server (IP:PORT) to ask for SRV records instead of the system resolver",
        ),
        (
            "--discovery-srv string",
            "domain name to query for SRV records describing cluster endpoints",
        ),
        (
            "--discovery-srv-name string",
            "service name to query when using DNS discovery",
        ),
        (
            "--enable-pprof",
            "Enable runtime profiling data via HTTP server. Address is at client URL + \"/debug/pprof/\"",
        ),
        (
            "--endpoints strings",
            "comma separated etcd cluster endpoints (default [127.0.0.1:2379])",
        ),
        (
            "--endpoints-auto-sync-interval duration",
            "etcd endpoints auto sync interval (disabled by default)",
        ),
        (
            "--experimental-leasing-prefix string",
            "leasing metadata prefix for disconnected linearized reads.",
        ),
        (
            "--experimental-serializable-ordering",
            "Ensure serializable reads have monotonically increasing store revisions across endpoints.",
        ),
        (
            "--grpc-keepalive-interval duration",
            "Frequency duration of server-to-client ping to check if a connection is alive (0 to disable). (default 2h0m0s)",
        ),
        (
            "--grpc-keepalive-min-time duration",
            "Minimum interval duration that a client should wait before pinging proxy. (default 5s)",
        ),
        (
            "--grpc-keepalive-timeout duration",
            "Additional duration of wait before closing a non-responsive connection (0 to disable). (default 20s)",
        ),
        ("-h, --help", "help for start"),
        ("--insecure-discovery", "accept insecure SRV records"),
        (
            "--insecure-skip-tls-verify",
            "skip authentication of etcd server TLS certificates (CAUTION: this option should be enabled only for testing purposes)",
        ),
        (
            "--key string",
            "identify secure connections with etcd servers using this TLS key file",
        ),
        (
            "--key-file string",
            "identify secure connections to the proxy using this TLS key file",
        ),
        (
            "--listen-addr string",
            "listen address (default \"127.0.0.1:23790\")",
        ),
        (
            "--listen-cipher-suites strings",
            "Comma-separated list of supported TLS cipher suites between client/proxy (empty will be auto-populated by Go).",
        ),
        (
            "--max-concurrent-streams uint32",
            "Maximum concurrent streams that each client can open at a time. (default 4294967295)",
        ),
        (
            "--max-recv-bytes int",
            "message receive limits in bytes (default value is math.MaxInt32) (default 2147483647)",
        ),
        (
            "--max-send-bytes int",
            "message send limits in bytes (default value is 1.5 MiB) (default 1572864)",
        ),
        (
            "--metrics-addr string",
            "listen for endpoint /metrics requests on an additional interface",
        ),
        (
            "--namespace string",
            "string to prefix to all keys for namespacing requests",
        ),
        (
            "--permit-without-stream",
            "Enable client(grpc-proxy) to send keepalive pings even with no active RPCs.",
        ),
        (
            "--range-cache-max-bytes int",
            "Maximum bytes held by the range cache; a larger response is never cached. (default 67108864)",
        ),
        (
            "--range-cache-max-entries int",
            "Maximum number of serializable Range responses held by the range cache (least recently used evicted first). (default 2048)",
        ),
        (
            "--resolver-prefix string",
            "prefix to use for registering proxy (must be shared with other grpc-proxy members)",
        ),
        (
            "--resolver-ttl int",
            "specify TTL, in seconds, when registering proxy endpoints",
        ),
        (
            "--self-signed-cert-validity uint",
            "The validity period of the proxy certificates, unit is year (default 1)",
        ),
        (
            "--tls-max-version string",
            "Maximum TLS version supported by grpc proxy. Possible values: TLS1.2, TLS1.3 (empty defers to Go).",
        ),
        (
            "--tls-min-version string",
            "Minimum TLS version supported by grpc proxy. Possible values: TLS1.2, TLS1.3. (default \"TLS1.2\")",
        ),
        (
            "--trusted-ca-file string",
            "verify certificates of TLS-enabled secure proxy using this CA bundle",
        ),
    ];
    let lines: Vec<&str> = out.lines().skip_while(|l| *l != "Flags:").skip(1).collect();
    assert_eq!(lines.len(), flags.len(), "one line per flag:\n{out}");
    for (line, (flag, text)) in lines.iter().zip(flags) {
        // Alphabetical, like pflag; flag, padding, text.
        let (left, right) = line
            .trim_start()
            .split_once("   ")
            .expect("a gap after the flag");
        assert_eq!(left, *flag, "{line}");
        assert_eq!(right.trim_start(), *text, "{line}");
    }
}

#[test]
fn bare_commands_print_help_and_succeed() {
    for args in [
        &[][..],
        &["gateway"],
        &["grpc-proxy"],
        &["--help"],
        &["gateway", "--help"],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
        let out = stdout(&o);
        assert!(out.contains("Usage:\n"), "{args:?}: {out}");
        assert!(out.contains("Available Commands:\n"), "{args:?}: {out}");
    }
    let out = stdout(&run(&["gateway"]));
    assert!(out.contains("  start       start the gateway\n"), "{out}");
}

#[test]
fn version_flag_and_command() {
    for args in [&["--version"][..], &["version"]] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let out = stdout(&o);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        assert_eq!(
            lines[0],
            format!("etcd-proxy Version: {}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(lines[1], "API Version: 3.5");
        assert!(lines[2].starts_with("Git SHA: "), "{out}");
        assert!(lines[3].starts_with("Rust Version: 1."), "{out}");
        assert_eq!(
            lines[4],
            format!(
                "OS/Arch: {}/{}",
                std::env::consts::OS,
                std::env::consts::ARCH
            )
        );
    }
}

#[test]
fn unknown_flag_exits_1_naming_it() {
    let o = run(&["gateway", "start", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown flag: --no-such-flag"),
        "{}",
        stderr(&o)
    );
    assert!(stdout(&o).is_empty());

    let o = run(&["grpc-proxy", "start", "--listen-adr=127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown flag: --listen-adr"),
        "{}",
        stderr(&o)
    );

    let o = run(&["no-such-command"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("unknown command \"no-such-command\""),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_durations_exit_1_with_go_messages() {
    let o = run(&["gateway", "start", "--retry-delay=abc"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("invalid duration"), "{err}");
    assert!(
        err.contains(
            r#"invalid argument "abc" for "--retry-delay" flag: time: invalid duration "abc""#
        ),
        "{err}"
    );

    let o = run(&["gateway", "start", "--retry-delay", "1x"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(r#"time: unknown unit "x" in duration "1x""#),
        "{err}"
    );
}

#[test]
fn bad_integers_exit_1() {
    let o = run(&["grpc-proxy", "start", "--max-send-bytes=abc"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(r#"invalid argument "abc" for "--max-send-bytes" flag: strconv.ParseInt: parsing "abc": invalid syntax"#),
        "{err}"
    );
}

#[test]
fn grpc_proxy_checks_flag_combinations_before_starting() {
    let o = run(&[
        "grpc-proxy",
        "start",
        "--resolver-prefix=__grpc_proxy_endpoint",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(stderr(&o), "invalid resolver-ttl 0\n");

    for flag in ["--max-send-bytes=0", "--max-recv-bytes=-1"] {
        let o = run(&[
            "grpc-proxy",
            "start",
            "--listen-addr=127.0.0.1:0",
            "--endpoints=127.0.0.1:1",
            flag,
        ]);
        assert_eq!(o.status.code(), Some(1), "{flag}");
        let (name, value) = flag.split_once('=').unwrap();
        let want = format!("{name} must be a positive number of bytes, got {value}");
        assert!(stderr(&o).contains(&want), "{flag}: {}", stderr(&o));
    }
}

#[test]
fn grpc_proxy_start_refuses_an_unreadable_cacert_and_logs_argv() {
    let o = run(&[
        "grpc-proxy",
        "start",
        "--endpoints=127.0.0.1:1,127.0.0.1:2",
        "--listen-addr=127.0.0.1:0",
        "--debug",
        "--cacert=ca.pem",
        "--grpc-keepalive-interval=1h30m",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("--cacert: open ca.pem: no such file or directory"),
        "{err}"
    );
    // The startup line etcd 3.5.3+ writes, with the whole argv as an array.
    let running = err
        .lines()
        .find(|l| l.contains(r#""msg":"Running: ""#))
        .unwrap_or_else(|| panic!("no Running line in:\n{err}"));
    let v: serde_json::Value = serde_json::from_str(running).expect("JSON log line");
    assert_eq!(v["level"], "info");
    let args = v["args"].as_array().expect("args is an array");
    assert_eq!(args.len(), 8);
    assert_eq!(args[1], "grpc-proxy");
    assert_eq!(args[3], "--endpoints=127.0.0.1:1,127.0.0.1:2");
    assert!(
        running.starts_with(r#"{"level":"info","ts":""#),
        "{running}"
    );
    let caller = v["caller"].as_str().expect("caller");
    assert!(caller.starts_with("etcd-proxy/main.rs:"), "{caller}");
}

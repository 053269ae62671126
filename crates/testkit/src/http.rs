//! Just enough HTTP/1.0 to read etcd's `/health` and `/metrics`.
//!
//! Both are served on each member's plain-http metrics listener, so one tiny client over a raw
//! TCP stream covers TLS clusters too, without pulling an HTTP/TLS stack into every test binary.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response: status code and body.
pub(crate) struct Response {
    pub status: u16,
    pub body: String,
}

/// `GET path` from `127.0.0.1:port`, all of it (connect, send, read to EOF) within `timeout`.
pub(crate) async fn get(port: u16, path: &str, timeout: Duration) -> io::Result<Response> {
    match tokio::time::timeout(timeout, get_inner(port, path)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("GET http://127.0.0.1:{port}{path}: no answer within {timeout:?}"),
        )),
    }
}

async fn get_inner(port: u16, path: &str) -> io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    // HTTP/1.0 so the server closes the connection after the body: no chunking, no keep-alive.
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("truncated HTTP response: {text:?}"),
        )
    })?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad HTTP status line: {head:?}"),
            )
        })?;
    Ok(Response {
        status,
        body: body.to_string(),
    })
}

/// Sum of every sample of metric `name` in a Prometheus text exposition; `None` if it has none.
///
/// Histograms and summaries expose `name_bucket`, `name_sum`, `name_count`: ask for those names.
pub(crate) fn sum_metric(exposition: &str, name: &str) -> Option<f64> {
    let mut total = None;
    for line in exposition.lines() {
        let line = line.trim_start();
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let value_part = if let Some(labels) = rest.strip_prefix('{') {
            match after_labels(labels) {
                Some(after) => after,
                None => continue,
            }
        } else if rest.starts_with([' ', '\t']) {
            rest
        } else {
            // A longer name sharing the prefix, e.g. `name_total` when asked for `name`.
            continue;
        };
        if let Some(value) = value_part.split_whitespace().next().and_then(parse_value) {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// The text after the closing `}` of a label set, honouring quoted values that contain `}`.
fn after_labels(labels: &str) -> Option<&str> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (i, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(&labels[i + 1..]),
            _ => {}
        }
    }
    None
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::sum_metric;

    const TEXT: &str = r#"# HELP etcd_server_has_leader Whether or not a leader exists.
# TYPE etcd_server_has_leader gauge
etcd_server_has_leader 1
etcd_server_has_leader_total 7
grpc_server_handled_total{grpc_code="OK",grpc_method="Range"} 3
grpc_server_handled_total{grpc_code="OK",grpc_method="Put"} 4.5
grpc_server_handled_total{grpc_code="x}y",grpc_method="a b"} 1 1700000000
"#;

    #[test]
    fn sums_samples_and_ignores_longer_names() {
        assert_eq!(sum_metric(TEXT, "etcd_server_has_leader"), Some(1.0));
        assert_eq!(sum_metric(TEXT, "etcd_server_has_leader_total"), Some(7.0));
        assert_eq!(sum_metric(TEXT, "grpc_server_handled_total"), Some(8.5));
        assert_eq!(sum_metric(TEXT, "etcd_server"), None);
        assert_eq!(sum_metric(TEXT, "nope"), None);
    }
}

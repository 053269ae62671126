//! JSON log lines on stderr in the shape etcd 3.5.3+ (zap) writes them, so that tools and people who
//! wait for `"msg":"ready to proxy client requests"` or parse etcd's logs keep working:
//!
//! `{"level":"info","ts":"2026-11-24T03:30:57.123456Z","caller":"gateway/proxy.rs:87","msg":"ready to proxy client requests","endpoints":["127.0.0.1:2379"]}`
//!
//! Keys come in that order, then the fields of the enclosing spans (outermost first, like zap's
//! `With` fields), then the event's own fields in the order they were written.

use std::fmt::{self, Write as _};
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Crates whose debug output is per-frame or per-poll noise; they stay at info even with `--debug`.
const NOISY_TARGETS: &[&str] = &[
    "h2",
    "hyper",
    "hyper_util",
    "mio",
    "rustls",
    "tokio_util",
    "tower",
    "tower_http",
];

/// Installs the process-wide JSON logger on stderr: info and above, or debug and above when
/// `debug` is set (`grpc-proxy start --debug`). A second call does nothing.
pub fn init(debug: bool) {
    let layer = JsonLayer::new(std::io::stderr).with_filter(filter(debug));
    // try_init fails only when a global subscriber is already set, and then that one stays.
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

/// The level filter [`init`] uses: info, or debug except for [`NOISY_TARGETS`].
pub fn filter(debug: bool) -> Targets {
    if !debug {
        return Targets::new().with_default(LevelFilter::INFO);
    }
    NOISY_TARGETS.iter().fold(
        Targets::new().with_default(LevelFilter::DEBUG),
        |t, name| t.with_target(*name, LevelFilter::INFO),
    )
}

/// Logs a list of strings as a JSON array whatever the strings hold: record it with `?`
/// (`args = ?JsonStrings(&argv)`). Plain `?vec` works too, unless a string has a character that
/// Rust's `Debug` escapes differently from JSON (then the field becomes a string).
pub struct JsonStrings<'a>(pub &'a [String]);

impl fmt::Debug for JsonStrings<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('[')?;
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_char(',')?;
            }
            let mut quoted = String::with_capacity(s.len() + 2);
            push_json_str(&mut quoted, s);
            f.write_str(&quoted)?;
        }
        f.write_char(']')
    }
}

/// A [`Layer`] that writes each event as one zap-shaped JSON line to a writer made by `W`
/// (stderr in the binary, an in-memory buffer in tests).
pub struct JsonLayer<W> {
    make_writer: W,
}

impl<W> JsonLayer<W>
where
    W: for<'a> MakeWriter<'a> + 'static,
{
    /// A layer writing to what `make_writer` makes (e.g. `std::io::stderr`).
    pub fn new(make_writer: W) -> Self {
        JsonLayer { make_writer }
    }
}

/// The fields of a span, already rendered as `,"key":value` pairs.
struct SpanFields(String);

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut visitor = JsonVisitor::default();
        attrs.record(&mut visitor);
        span.extensions_mut().insert(SpanFields(visitor.fields));
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let mut visitor = JsonVisitor::default();
        values.record(&mut visitor);
        let mut extensions = span.extensions_mut();
        match extensions.get_mut::<SpanFields>() {
            Some(fields) => fields.0.push_str(&visitor.fields),
            None => extensions.insert(SpanFields(visitor.fields)),
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut visitor = JsonVisitor::default();
        event.record(&mut visitor);

        let mut spans = String::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(fields) = span.extensions().get::<SpanFields>() {
                    spans.push_str(&fields.0);
                }
            }
        }

        let meta = event.metadata();
        let caller = match (meta.file(), meta.line()) {
            (Some(file), Some(line)) => Some(format!("{}:{line}", short_caller(file))),
            // Events bridged from the `log` crate carry their location as fields.
            _ => match (&visitor.log_file, visitor.log_line) {
                (Some(file), Some(line)) => Some(format!("{}:{line}", short_caller(file))),
                _ => None,
            },
        };

        let mut line =
            String::with_capacity(128 + visitor.message.len() + visitor.fields.len() + spans.len());
        line.push_str("{\"level\":\"");
        line.push_str(level_name(meta.level()));
        line.push_str("\",\"ts\":\"");
        line.push_str(&timestamp(time::OffsetDateTime::now_utc()));
        line.push('"');
        if let Some(caller) = caller {
            line.push_str(",\"caller\":");
            push_json_str(&mut line, &caller);
        }
        line.push_str(",\"msg\":");
        push_json_str(&mut line, &visitor.message);
        line.push_str(&spans);
        line.push_str(&visitor.fields);
        line.push_str("}\n");

        // One write per line, so lines from concurrent tasks never interleave. A failed write to
        // stderr has nowhere to be reported.
        let mut writer = self.make_writer.make_writer_for(meta);
        let _ = writer.write_all(line.as_bytes());
    }
}

/// zap's level names; zap has no trace level, so trace shows as debug.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warn",
        Level::INFO => "info",
        Level::DEBUG | Level::TRACE => "debug",
    }
}

/// `2006-01-02T15:04:05.000000Z`: UTC with microseconds, as etcd 3.5.3+ writes `ts`.
fn timestamp(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    )
}

/// zap's short caller, `<package>/<file>`: `crates/gateway/src/proxy.rs` becomes `gateway/proxy.rs`
/// (the directory that holds `src`, then the path inside `src`); a path without `src` keeps its
/// last two components.
fn short_caller(file: &str) -> String {
    let parts: Vec<&str> = file.split(['/', '\\']).filter(|p| !p.is_empty()).collect();
    if let Some(src) = parts.iter().rposition(|p| *p == "src")
        && src > 0
        && src + 1 < parts.len()
    {
        return format!("{}/{}", parts[src - 1], parts[src + 1..].join("/"));
    }
    let start = parts.len().saturating_sub(2);
    parts[start..].join("/")
}

/// Appends `s` as a JSON string (quotes, backslashes and control characters escaped; non-ASCII
/// kept as UTF-8, as zap does).
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Collects the message and the other fields of an event or span as JSON.
#[derive(Default)]
struct JsonVisitor {
    message: String,
    /// `,"key":value` pairs in the order the fields were recorded.
    fields: String,
    log_file: Option<String>,
    log_line: Option<u64>,
}

impl JsonVisitor {
    fn key(&mut self, field: &Field) {
        self.fields.push(',');
        push_json_str(&mut self.fields, field.name());
        self.fields.push(':');
    }

    /// Fields the `log` bridge adds; the caller is taken from them, the rest is noise.
    fn is_log_field(field: &Field) -> bool {
        field.name().starts_with("log.")
    }

    fn string(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message = value.to_owned(),
            "log.file" => self.log_file = Some(value.to_owned()),
            _ if Self::is_log_field(field) => {}
            _ => {
                self.key(field);
                push_json_str(&mut self.fields, value);
            }
        }
    }

    fn number(&mut self, field: &Field, value: impl fmt::Display) {
        if Self::is_log_field(field) {
            return;
        }
        self.key(field);
        let _ = write!(self.fields, "{value}");
    }
}

impl Visit for JsonVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.string(field, value);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.number(field, value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "log.line" {
            self.log_line = Some(value);
        }
        self.number(field, value);
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.number(field, value);
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.number(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.number(field, value);
        } else {
            // JSON has no NaN or infinity; zap writes them as these strings.
            let text = if value.is_nan() {
                "NaN"
            } else if value > 0.0 {
                "+Inf"
            } else {
                "-Inf"
            };
            self.string(field, text);
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if Self::is_log_field(field) {
            return;
        }
        self.key(field);
        self.fields.push_str(if value { "true" } else { "false" });
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.string(field, &value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() == "message" || Self::is_log_field(field) {
            return self.string(field, &text);
        }
        // `endpoints = ?vec` prints as `["a", "b"]`, which is JSON: embed it as an array, as zap's
        // `zap.Strings` does. Anything else Debug prints is a string.
        if text.starts_with('[')
            && let Ok(array @ serde_json::Value::Array(_)) =
                serde_json::from_str::<serde_json::Value>(&text)
        {
            self.key(field);
            self.fields.push_str(&array.to_string());
            return;
        }
        self.string(field, &text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// An in-memory writer shared between the layer and the test.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            match self.0.lock() {
                Ok(mut buf) => buf.extend_from_slice(data),
                Err(poisoned) => poisoned.into_inner().extend_from_slice(data),
            }
            Ok(data.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Buf {
        fn lines(&self) -> Vec<String> {
            let bytes = match self.0.lock() {
                Ok(buf) => buf.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            };
            String::from_utf8(bytes)
                .expect("log output is UTF-8")
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    /// Runs `f` with a JSON layer (filtered as `init(debug)` would) writing into a fresh buffer.
    fn capture(debug: bool, f: impl FnOnce()) -> Vec<String> {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry()
            .with(JsonLayer::new(buf.clone()).with_filter(filter(debug)));
        tracing::subscriber::with_default(subscriber, f);
        buf.lines()
    }

    /// The keys of a JSON object line, in the order they appear in the text.
    fn keys_in_order(line: &str) -> Vec<String> {
        // serde_json without preserve_order sorts maps, so walk the text with a streaming parser.
        let value: serde_json::Value = serde_json::from_str(line).expect("line is JSON");
        let obj = value.as_object().expect("line is an object");
        let mut keys: Vec<(usize, String)> = obj
            .keys()
            .map(|k| {
                let needle = format!("\"{k}\":");
                (line.find(&needle).expect("key in text"), k.clone())
            })
            .collect();
        keys.sort();
        keys.into_iter().map(|(_, k)| k).collect()
    }

    #[test]
    fn writes_zap_shape_with_keys_in_order() {
        let endpoints = vec!["127.0.0.1:2379".to_string(), "127.0.0.1:22379".to_string()];
        let lines = capture(false, || {
            tracing::info!(endpoints = ?endpoints, "ready to proxy client requests");
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(
            keys_in_order(line),
            ["level", "ts", "caller", "msg", "endpoints"]
        );
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(v["level"], "info");
        assert_eq!(v["msg"], "ready to proxy client requests");
        assert_eq!(
            v["endpoints"],
            serde_json::json!(["127.0.0.1:2379", "127.0.0.1:22379"])
        );
        let caller = v["caller"].as_str().expect("caller is a string");
        assert!(
            caller.starts_with("etcd-proxy/logging.rs:"),
            "caller {caller}"
        );
        let ts = v["ts"].as_str().expect("ts is a string");
        // 2026-11-24T03:30:57.123456Z
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.');
        assert!(ts[20..26].bytes().all(|b| b.is_ascii_digit()), "{ts}");
    }

    #[test]
    fn types_fields_and_keeps_their_order() {
        let err = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let lines = capture(false, || {
            tracing::warn!(
                address = "127.0.0.1:2379",
                interval = %crate::duration::GoDuration::from_secs(60),
                attempts = 3u64,
                delta = -2i64,
                ratio = 0.5f64,
                bad = f64::NAN,
                ok = false,
                error = &err as &(dyn std::error::Error + 'static),
                other = ?Some(1),
                "deactivated endpoint"
            );
        });
        let line = &lines[0];
        assert_eq!(
            keys_in_order(line),
            [
                "level", "ts", "caller", "msg", "address", "interval", "attempts", "delta",
                "ratio", "bad", "ok", "error", "other"
            ]
        );
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(v["level"], "warn");
        assert_eq!(v["interval"], "1m0s");
        assert_eq!(v["attempts"], 3);
        assert_eq!(v["delta"], -2);
        assert_eq!(v["ratio"], 0.5);
        assert_eq!(v["bad"], "NaN");
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "connection refused");
        assert_eq!(v["other"], "Some(1)");
    }

    #[test]
    fn escapes_quotes_newlines_and_keeps_non_ascii() {
        let lines = capture(false, || {
            tracing::error!(
                detail = "say \"hi\"\nthen\tleave \\ \u{1} ok",
                "naïve µs \"quoted\" ✓"
            );
        });
        let line = &lines[0];
        assert!(line.contains(r#""msg":"naïve µs \"quoted\" ✓""#), "{line}");
        assert!(
            line.contains(r#""detail":"say \"hi\"\nthen\tleave \\ \u0001 ok""#),
            "{line}"
        );
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(v["level"], "error");
        assert_eq!(v["detail"], "say \"hi\"\nthen\tleave \\ \u{1} ok");
        assert_eq!(v["msg"], "naïve µs \"quoted\" ✓");
    }

    #[test]
    fn debug_values_that_are_not_arrays_stay_strings() {
        let lines = capture(false, || {
            tracing::info!(
                tricky = ?vec!["a\nb", "\u{1}"],
                bracket = ?"[not json",
                "m"
            );
        });
        let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
        // Rust's Debug escapes \u{1} in a way JSON does not accept: kept as text, still valid JSON.
        assert_eq!(v["tricky"], r#"["a\nb", "\u{1}"]"#);
        assert_eq!(v["bracket"], "\"[not json\"");
    }

    #[test]
    fn json_strings_are_always_arrays() {
        let args = vec!["etcd-proxy".to_string(), "--x=\u{0}\u{1b}\"é".to_string()];
        let lines = capture(false, || {
            tracing::info!(args = ?JsonStrings(&args), "Running: ");
        });
        let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
        assert_eq!(v["args"], serde_json::json!(args));
        assert_eq!(v["msg"], "Running: ");
    }

    #[test]
    fn span_fields_come_after_msg_and_before_event_fields() {
        let lines = capture(false, || {
            let span = tracing::info_span!("conn", remote = "10.0.0.1:5000");
            let _guard = span.enter();
            tracing::info!(bytes = 10u64, "closed");
        });
        assert_eq!(
            keys_in_order(&lines[0]),
            ["level", "ts", "caller", "msg", "remote", "bytes"]
        );
    }

    #[test]
    fn filters_debug_unless_asked() {
        let quiet = capture(false, || {
            tracing::debug!("hidden");
            tracing::trace!("hidden");
            tracing::info!("shown");
        });
        assert_eq!(quiet.len(), 1);
        let loud = capture(true, || {
            tracing::debug!("shown");
            tracing::trace!("hidden");
            tracing::debug!(target: "h2::codec", "hidden");
        });
        assert_eq!(loud.len(), 1, "{loud:?}");
        let v: serde_json::Value = serde_json::from_str(&loud[0]).expect("JSON");
        assert_eq!(v["level"], "debug");
    }

    #[test]
    fn shortens_callers_like_zap() {
        assert_eq!(
            short_caller("crates/gateway/src/proxy.rs"),
            "gateway/proxy.rs"
        );
        assert_eq!(
            short_caller("crates/grpc-proxy/src/watch/coalescer.rs"),
            "grpc-proxy/watch/coalescer.rs"
        );
        assert_eq!(
            short_caller("/root/.cargo/registry/src/index.crates.io-1/h2-0.4.5/src/proto/mod.rs"),
            "h2-0.4.5/proto/mod.rs"
        );
        assert_eq!(short_caller("build/foo.rs"), "build/foo.rs");
        assert_eq!(short_caller("a/b/c.rs"), "b/c.rs");
        assert_eq!(short_caller("main.rs"), "main.rs");
    }

    #[test]
    fn formats_timestamps_like_etcd() {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_795_487_619_411_938_200)
            .expect("valid timestamp");
        assert_eq!(timestamp(t), "2026-11-24T02:33:39.411938Z");
    }
}

//! Go's `time.Duration` on the command line: etcd's flags take `--retry-delay=1m0s` and print defaults
//! as `(default 1m0s)`, so a drop-in must parse and print durations exactly as Go does.

use std::fmt;
use std::str::FromStr;

const NANOSECOND: u64 = 1;
const MICROSECOND: u64 = 1_000 * NANOSECOND;
const MILLISECOND: u64 = 1_000 * MICROSECOND;
const SECOND: u64 = 1_000 * MILLISECOND;
const MINUTE: u64 = 60 * SECOND;
const HOUR: u64 = 60 * MINUTE;

/// 2^63: the magnitude of `i64::MIN`, the largest a negative duration may have.
const LIMIT: u64 = 1 << 63;

/// A span of time in nanoseconds, like Go's `time.Duration`: signed, parsed by [`FromStr`] as Go's
/// `time.ParseDuration` does and printed by [`fmt::Display`] as Go's `Duration.String()` does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration(pub i64);

impl GoDuration {
    /// The zero duration (`0s`).
    pub const ZERO: GoDuration = GoDuration(0);

    /// A duration of `secs` seconds (saturating at the bounds of `i64` nanoseconds).
    pub const fn from_secs(secs: i64) -> GoDuration {
        GoDuration(secs.saturating_mul(SECOND as i64))
    }

    /// A duration of `millis` milliseconds (saturating at the bounds of `i64` nanoseconds).
    pub const fn from_millis(millis: i64) -> GoDuration {
        GoDuration(millis.saturating_mul(MILLISECOND as i64))
    }

    /// The duration in nanoseconds.
    pub const fn as_nanos(&self) -> i64 {
        self.0
    }

    /// Whether the duration is zero: etcd uses 0 to mean "disabled" for several flags.
    pub const fn is_zero(&self) -> bool {
        self.0 == 0
    }

    /// The duration as a [`std::time::Duration`], or `None` when it is negative (std has no
    /// negative durations; what a negative flag value means is the caller's decision).
    pub fn to_std(&self) -> Option<std::time::Duration> {
        u64::try_from(self.0)
            .ok()
            .map(std::time::Duration::from_nanos)
    }

    /// The duration for a [`std::time::Duration`], saturating at `i64::MAX` nanoseconds (~292 years).
    pub fn from_std(d: std::time::Duration) -> GoDuration {
        GoDuration(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }
}

impl From<GoDuration> for i64 {
    fn from(d: GoDuration) -> i64 {
        d.0
    }
}

/// Why a string is not a Go duration; the message is the one Go's `time.ParseDuration` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseDurationError(String);

impl fmt::Display for ParseDurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseDurationError {}

fn invalid(orig: &str) -> ParseDurationError {
    ParseDurationError(format!("time: invalid duration {}", quote(orig)))
}

/// Go's `time.quote`: ASCII printable characters as they are (with `"` and `\` escaped), every byte
/// of anything else as `\xNN`. Not `strconv.Quote`: the time package has its own.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c < ' ' || !c.is_ascii() {
            let mut utf8 = [0u8; 4];
            for b in c.encode_utf8(&mut utf8).bytes() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        } else {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// Consumes the leading `[0-9]*` of `s`; `None` on overflow past 2^63 (Go's `leadingInt`).
fn leading_int(s: &str) -> Option<(u64, &str)> {
    let mut x: u64 = 0;
    let mut i = 0;
    for &c in s.as_bytes() {
        if !c.is_ascii_digit() {
            break;
        }
        if x > LIMIT / 10 {
            return None;
        }
        x = x * 10 + u64::from(c - b'0');
        if x > LIMIT {
            return None;
        }
        i += 1;
    }
    Some((x, &s[i..]))
}

/// Consumes the leading `[0-9]*` of a fraction; on overflow it stops gaining precision instead of
/// failing (Go's `leadingFraction`). Returns the digits as an integer, 10^(digits kept), the rest.
fn leading_fraction(s: &str) -> (u64, f64, &str) {
    let mut x: u64 = 0;
    let mut scale = 1.0_f64;
    let mut overflow = false;
    let mut i = 0;
    for &c in s.as_bytes() {
        if !c.is_ascii_digit() {
            break;
        }
        i += 1;
        if overflow {
            continue;
        }
        if x > (LIMIT - 1) / 10 {
            overflow = true;
            continue;
        }
        let y = x * 10 + u64::from(c - b'0');
        if y > LIMIT {
            overflow = true;
            continue;
        }
        x = y;
        scale *= 10.0;
    }
    (x, scale, &s[i..])
}

fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => NANOSECOND,
        // "µs" is U+00B5 (micro sign), "μs" is U+03BC (Greek mu): Go accepts both.
        "us" | "\u{b5}s" | "\u{3bc}s" => MICROSECOND,
        "ms" => MILLISECOND,
        "s" => SECOND,
        "m" => MINUTE,
        "h" => HOUR,
        _ => return None,
    })
}

impl FromStr for GoDuration {
    type Err = ParseDurationError;

    /// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, or `0` alone.
    fn from_str(orig: &str) -> Result<Self, Self::Err> {
        let mut s = orig;
        let mut neg = false;
        if let Some(rest) = s.strip_prefix('-') {
            neg = true;
            s = rest;
        } else if let Some(rest) = s.strip_prefix('+') {
            s = rest;
        }
        if s == "0" {
            return Ok(GoDuration(0));
        }
        if s.is_empty() {
            return Err(invalid(orig));
        }
        let mut d: u64 = 0;
        while !s.is_empty() {
            // The next character must be [0-9.].
            let first = s.as_bytes()[0];
            if !(first == b'.' || first.is_ascii_digit()) {
                return Err(invalid(orig));
            }
            let before = s.len();
            let (mut v, rest) = leading_int(s).ok_or_else(|| invalid(orig))?;
            s = rest;
            let pre = before != s.len();

            let (mut f, mut scale, mut post) = (0u64, 1.0f64, false);
            if let Some(rest) = s.strip_prefix('.') {
                let before = rest.len();
                let (ff, sc, rest) = leading_fraction(rest);
                (f, scale, s) = (ff, sc, rest);
                post = before != s.len();
            }
            if !pre && !post {
                // No digits at all, e.g. ".s" or "-.s".
                return Err(invalid(orig));
            }

            // The unit runs up to the next '.' or digit; both are ASCII, so the cut is on a
            // character boundary.
            let end = s
                .bytes()
                .position(|c| c == b'.' || c.is_ascii_digit())
                .unwrap_or(s.len());
            if end == 0 {
                return Err(ParseDurationError(format!(
                    "time: missing unit in duration {}",
                    quote(orig)
                )));
            }
            let (unit_str, rest) = s.split_at(end);
            s = rest;
            let unit = unit_nanos(unit_str).ok_or_else(|| {
                ParseDurationError(format!(
                    "time: unknown unit {} in duration {}",
                    quote(unit_str),
                    quote(orig)
                ))
            })?;
            if v > LIMIT / unit {
                return Err(invalid(orig));
            }
            v *= unit;
            if f > 0 {
                // Go computes this in float64 to stay nanosecond-exact for fractions of hours; the
                // same expression gives the same result here.
                v += (f as f64 * (unit as f64 / scale)) as u64;
                if v > LIMIT {
                    return Err(invalid(orig));
                }
            }
            d += v;
            if d > LIMIT {
                return Err(invalid(orig));
            }
        }
        if neg {
            // d <= 2^63, so -d fits in i64 (2^63 itself is i64::MIN).
            return Ok(GoDuration((d as i64).wrapping_neg()));
        }
        i64::try_from(d).map(GoDuration).map_err(|_| invalid(orig))
    }
}

/// Writes the fraction `v / 10^prec` (e.g. `.12345`) into the tail of `buf`, without trailing zeros,
/// and without the point when the fraction is 0. Returns the new start and `v / 10^prec`.
fn fmt_frac(buf: &mut [u8], mut w: usize, mut v: u64, prec: usize) -> (usize, u64) {
    let mut print = false;
    for _ in 0..prec {
        let digit = v % 10;
        print = print || digit != 0;
        if print {
            w -= 1;
            buf[w] = digit as u8 + b'0';
        }
        v /= 10;
    }
    if print {
        w -= 1;
        buf[w] = b'.';
    }
    (w, v)
}

/// Writes `v` in decimal into the tail of `buf`; returns the new start.
fn fmt_int(buf: &mut [u8], mut w: usize, mut v: u64) -> usize {
    if v == 0 {
        w -= 1;
        buf[w] = b'0';
        return w;
    }
    while v > 0 {
        w -= 1;
        buf[w] = (v % 10) as u8 + b'0';
        v /= 10;
    }
    w
}

impl fmt::Display for GoDuration {
    /// Go's `Duration.String()`: `72h3m0.5s`, `1m0s`, `1.5s`, `500ms`, `1µs`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The longest output is "-2562047h47m16.854775808s" (25 bytes).
        let mut buf = [0u8; 32];
        let mut w = buf.len();
        let neg = self.0 < 0;
        let mut u = self.0.unsigned_abs();

        if u < SECOND {
            // Under a second, use smaller units: "1.2ms".
            if u == 0 {
                return f.write_str("0s");
            }
            w -= 1;
            buf[w] = b's';
            let prec = if u < MICROSECOND {
                w -= 1;
                buf[w] = b'n';
                0
            } else if u < MILLISECOND {
                // U+00B5 'µ' (micro sign) is 0xC2 0xB5 in UTF-8.
                w -= 2;
                buf[w] = 0xC2;
                buf[w + 1] = 0xB5;
                3
            } else {
                w -= 1;
                buf[w] = b'm';
                6
            };
            (w, u) = fmt_frac(&mut buf, w, u, prec);
            w = fmt_int(&mut buf, w, u);
        } else {
            w -= 1;
            buf[w] = b's';
            (w, u) = fmt_frac(&mut buf, w, u, 9);
            // u is now whole seconds.
            w = fmt_int(&mut buf, w, u % 60);
            u /= 60;
            if u > 0 {
                // u is now whole minutes.
                w -= 1;
                buf[w] = b'm';
                w = fmt_int(&mut buf, w, u % 60);
                u /= 60;
                if u > 0 {
                    // u is now whole hours; Go stops at hours because days vary in length.
                    w -= 1;
                    buf[w] = b'h';
                    w = fmt_int(&mut buf, w, u);
                }
            }
        }
        if neg {
            w -= 1;
            buf[w] = b'-';
        }
        // Only ASCII and the two bytes of 'µ' were written.
        match std::str::from_utf8(&buf[w..]) {
            Ok(s) => f.write_str(s),
            Err(_) => Err(fmt::Error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NS: i64 = 1;
    const US: i64 = 1_000;
    const MS: i64 = 1_000_000;
    const S: i64 = 1_000_000_000;
    const M: i64 = 60 * S;
    const H: i64 = 60 * M;

    fn parse(s: &str) -> Result<i64, String> {
        s.parse::<GoDuration>()
            .map(|d| d.0)
            .map_err(|e| e.to_string())
    }

    /// Go's `parseDurationTests` (src/time/time_test.go).
    #[test]
    fn parses_go_table() {
        let cases: &[(&str, i64)] = &[
            // simple
            ("0", 0),
            ("5s", 5 * S),
            ("30s", 30 * S),
            ("1478s", 1478 * S),
            // sign
            ("-5s", -5 * S),
            ("+5s", 5 * S),
            ("-0", 0),
            ("+0", 0),
            // decimal
            ("5.0s", 5 * S),
            ("5.6s", 5 * S + 600 * MS),
            ("5.s", 5 * S),
            (".5s", 500 * MS),
            ("1.0s", S),
            ("1.00s", S),
            ("1.004s", S + 4 * MS),
            ("1.0040s", S + 4 * MS),
            ("100.00100s", 100 * S + MS),
            // different units
            ("10ns", 10 * NS),
            ("11us", 11 * US),
            ("12µs", 12 * US),
            ("12μs", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * S),
            ("15m", 15 * M),
            ("16h", 16 * H),
            // composite durations
            ("3h30m", 3 * H + 30 * M),
            ("10.5s4m", 4 * M + 10 * S + 500 * MS),
            ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
            (
                "1h2m3s4ms5us6ns",
                H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS,
            ),
            ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
            // large value
            ("52763797000ns", 52763797000 * NS),
            // more than 9 digits after decimal point, see https://golang.org/issue/6617
            ("0.3333333333333333333h", 20 * M),
            // 9007199254740993 = 1<<53+1 cannot be stored precisely in a float64
            ("9007199254740993ns", (1 << 53) + 1),
            // largest duration that can be represented by int64 in nanoseconds
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-9223372036s854ms775us808ns", i64::MIN),
            // largest negative value
            ("-9223372036854775808ns", i64::MIN),
            // huge string; issue 15011.
            ("0.100000000000000000000h", 6 * M),
            // This value tests the first overflow check in leadingFraction.
            ("0.830103483285477580700h", 49 * M + 48 * S + 372539827 * NS),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Ok(*want), "parsing {input:?}");
        }
    }

    /// Go's `parseDurationErrorTests`, with the full messages Go prints.
    #[test]
    fn rejects_go_table_with_go_messages() {
        let cases: &[(&str, &str)] = &[
            ("", r#"time: invalid duration """#),
            ("3", r#"time: missing unit in duration "3""#),
            ("1", r#"time: missing unit in duration "1""#),
            ("-", r#"time: invalid duration "-""#),
            ("s", r#"time: invalid duration "s""#),
            (".", r#"time: invalid duration ".""#),
            ("-.", r#"time: invalid duration "-.""#),
            (".s", r#"time: invalid duration ".s""#),
            ("+.s", r#"time: invalid duration "+.s""#),
            ("x", r#"time: invalid duration "x""#),
            ("abc", r#"time: invalid duration "abc""#),
            ("1d", r#"time: unknown unit "d" in duration "1d""#),
            ("1x", r#"time: unknown unit "x" in duration "1x""#),
            ("1m1x", r#"time: unknown unit "x" in duration "1m1x""#),
            (
                "\u{85}\u{85}",
                r#"time: invalid duration "\xc2\x85\xc2\x85""#,
            ),
            ("\u{FFFD}", r#"time: invalid duration "\xef\xbf\xbd""#),
            (
                "9223372036854775810ns",
                r#"time: invalid duration "9223372036854775810ns""#,
            ),
            (
                "9223372036854775808ns",
                r#"time: invalid duration "9223372036854775808ns""#,
            ),
            (
                "-9223372036854775809ns",
                r#"time: invalid duration "-9223372036854775809ns""#,
            ),
            (
                "9223372036854776us",
                r#"time: invalid duration "9223372036854776us""#,
            ),
            ("3000000h", r#"time: invalid duration "3000000h""#),
            (
                "9223372036854775.808us",
                r#"time: invalid duration "9223372036854775.808us""#,
            ),
            (
                "9223372036854ms775us808ns",
                r#"time: invalid duration "9223372036854ms775us808ns""#,
            ),
            (r#"1"s"#, r#"time: unknown unit "\"s" in duration "1\"s""#),
        ];
        for (input, want) in cases {
            assert_eq!(parse(input), Err(want.to_string()), "parsing {input:?}");
        }
    }

    /// Go's `durationTests` for `Duration.String()`.
    #[test]
    fn displays_like_go() {
        let cases: &[(i64, &str)] = &[
            (0, "0s"),
            (NS, "1ns"),
            (1100 * NS, "1.1µs"),
            (2200 * US, "2.2ms"),
            (3300 * MS, "3.3s"),
            (4 * M + 5 * S, "4m5s"),
            (4 * M + 5001 * MS, "4m5.001s"),
            (5 * H + 6 * M + 7001 * MS, "5h6m7.001s"),
            (8 * M + NS, "8m0.000000001s"),
            (i64::MAX, "2562047h47m16.854775807s"),
            (i64::MIN, "-2562047h47m16.854775808s"),
            // etcd's defaults and the shapes its logs show.
            (M, "1m0s"),
            (500 * MS, "500ms"),
            (H, "1h0m0s"),
            (2 * H, "2h0m0s"),
            (1500 * MS, "1.5s"),
            (-S, "-1s"),
            (US, "1µs"),
            (5 * S, "5s"),
            (20 * S, "20s"),
        ];
        for (d, want) in cases {
            assert_eq!(GoDuration(*d).to_string(), *want, "formatting {d}");
        }
    }

    #[test]
    fn converts_to_std() {
        assert_eq!(
            GoDuration(1500 * MS).to_std(),
            Some(std::time::Duration::from_millis(1500))
        );
        assert_eq!(GoDuration(0).to_std(), Some(std::time::Duration::ZERO));
        assert_eq!(GoDuration(-1).to_std(), None);
        assert_eq!(GoDuration::from_secs(5), GoDuration(5 * S));
        assert_eq!(GoDuration::from_millis(5), GoDuration(5 * MS));
        assert_eq!(
            GoDuration::from_std(std::time::Duration::from_secs(60)).to_string(),
            "1m0s"
        );
        assert_eq!(
            GoDuration::from_std(std::time::Duration::MAX),
            GoDuration(i64::MAX)
        );
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(n in any::<i64>()) {
            let d = GoDuration(n);
            prop_assert_eq!(d.to_string().parse::<GoDuration>(), Ok(d));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<GoDuration>();
        }

        #[test]
        fn parse_never_panics_on_duration_like_input(s in "[-+]?[0-9.]{0,20}(ns|us|µs|ms|s|m|h|x)?[0-9.]{0,5}[smh]?") {
            let _ = s.parse::<GoDuration>();
        }
    }
}

//! Go's `strconv` number and bool parsing, as pflag uses it for `int`, `uint`, `uint32` and `bool`
//! flags: a drop-in accepts what etcd accepts (`0x10`, `1_000`, `010` is octal, `--debug=T`) and
//! rejects the rest with Go's message.

use std::fmt;

/// Why a flag value is not a Go number or bool; displays as Go's `*strconv.NumError` does, e.g.
/// `strconv.ParseInt: parsing "abc": invalid syntax`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumError {
    func: &'static str,
    num: String,
    range: bool,
}

impl fmt::Display for NumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = if self.range {
            "value out of range"
        } else {
            "invalid syntax"
        };
        write!(
            f,
            "strconv.{}: parsing {}: {}",
            self.func,
            quote(&self.num),
            why
        )
    }
}

impl std::error::Error for NumError {}

fn syntax(func: &'static str, num: &str) -> NumError {
    NumError {
        func,
        num: num.to_owned(),
        range: false,
    }
}

fn range(func: &'static str, num: &str) -> NumError {
    NumError {
        func,
        num: num.to_owned(),
        range: true,
    }
}

/// Go's `strconv.Quote`, close enough for error messages: `"`, `\` and control characters escaped,
/// everything else (including non-ASCII) kept as is.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Go's `underscoreOK`: underscores only between digits, or between a base prefix and a digit.
fn underscore_ok(s: &str) -> bool {
    let mut s = s.as_bytes();
    if let [b'-' | b'+', rest @ ..] = s {
        s = rest;
    }
    // saw: '^' start, '0' digit or base prefix, '_' underscore, '!' anything else.
    let mut saw = b'^';
    let mut i = 0;
    let mut hex = false;
    if s.len() >= 2 && s[0] == b'0' && matches!(s[1].to_ascii_lowercase(), b'b' | b'o' | b'x') {
        i = 2;
        saw = b'0';
        hex = s[1].eq_ignore_ascii_case(&b'x');
    }
    while i < s.len() {
        let c = s[i];
        i += 1;
        if c.is_ascii_digit() || (hex && c.is_ascii_hexdigit()) {
            saw = b'0';
            continue;
        }
        if c == b'_' {
            if saw != b'0' {
                return false;
            }
            saw = b'_';
            continue;
        }
        if saw == b'_' {
            return false;
        }
        saw = b'!';
    }
    saw != b'_'
}

/// Go's `strconv.ParseUint(s, 0, bits)`: base from the prefix (`0x`, `0o`, `0b`, a leading `0` is
/// octal), underscores allowed as digit separators.
fn parse_uint_base0(s0: &str, bits: u32, func: &'static str) -> Result<u64, NumError> {
    if s0.is_empty() {
        return Err(syntax(func, s0));
    }
    let bytes = s0.as_bytes();
    let (base, digits): (u64, &[u8]) = if bytes[0] == b'0' && bytes.len() >= 3 {
        match bytes[1].to_ascii_lowercase() {
            b'b' => (2, &bytes[2..]),
            b'o' => (8, &bytes[2..]),
            b'x' => (16, &bytes[2..]),
            _ => (8, &bytes[1..]),
        }
    } else if bytes[0] == b'0' {
        (8, &bytes[1..])
    } else {
        (10, bytes)
    };
    let max_val: u64 = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let cutoff = u64::MAX / base + 1;
    let mut underscores = false;
    let mut n: u64 = 0;
    for &c in digits {
        let d = match c {
            b'_' => {
                underscores = true;
                continue;
            }
            b'0'..=b'9' => c - b'0',
            c if c.is_ascii_alphabetic() => c.to_ascii_lowercase() - b'a' + 10,
            _ => return Err(syntax(func, s0)),
        };
        if u64::from(d) >= base {
            return Err(syntax(func, s0));
        }
        if n >= cutoff {
            return Err(range(func, s0));
        }
        n *= base;
        let n1 = n.wrapping_add(u64::from(d));
        if n1 < n || n1 > max_val {
            return Err(range(func, s0));
        }
        n = n1;
    }
    if underscores && !underscore_ok(s0) {
        return Err(syntax(func, s0));
    }
    Ok(n)
}

/// Go's `strconv.ParseInt(s, 0, 64)`: pflag's `int` flags (Go's `int` is 64 bits on our targets).
pub fn parse_int(s0: &str) -> Result<i64, NumError> {
    const FUNC: &str = "ParseInt";
    if s0.is_empty() {
        return Err(syntax(FUNC, s0));
    }
    let (neg, s) = match s0.as_bytes()[0] {
        b'+' => (false, &s0[1..]),
        b'-' => (true, &s0[1..]),
        _ => (false, s0),
    };
    let un = match parse_uint_base0(s, 64, FUNC) {
        Ok(un) => un,
        Err(e) if e.range => u64::MAX,
        Err(_) => return Err(syntax(FUNC, s0)),
    };
    let cutoff: u64 = 1 << 63;
    if !neg && un >= cutoff {
        return Err(range(FUNC, s0));
    }
    if neg && un > cutoff {
        return Err(range(FUNC, s0));
    }
    // un <= 2^63 here; 2^63 negated is i64::MIN.
    let n = un as i64;
    Ok(if neg { n.wrapping_neg() } else { n })
}

/// Go's `strconv.ParseUint(s, 0, 64)`: pflag's `uint` flags.
pub fn parse_uint(s: &str) -> Result<u64, NumError> {
    parse_uint_base0(s, 64, "ParseUint")
}

/// Go's `strconv.ParseUint(s, 0, 32)`: pflag's `uint32` flags.
pub fn parse_uint32(s: &str) -> Result<u32, NumError> {
    parse_uint_base0(s, 32, "ParseUint").and_then(|n| {
        // parse_uint_base0 already bounded n to 32 bits.
        u32::try_from(n).map_err(|_| range("ParseUint", s))
    })
}

/// Go's `strconv.ParseBool`: pflag's `bool` flags given as `--flag=value`.
pub fn parse_bool(s: &str) -> Result<bool, NumError> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(syntax("ParseBool", s)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ints_like_go() {
        let ok: &[(&str, i64)] = &[
            ("0", 0),
            ("-0", 0),
            ("+1", 1),
            ("1572864", 1_572_864),
            ("2147483647", 2_147_483_647),
            ("-1", -1),
            ("0x10", 16),
            ("0X1f", 31),
            ("0o17", 15),
            ("017", 15),
            ("0b101", 5),
            ("1_000", 1000),
            ("0x_1F", 31),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
        ];
        for (s, want) in ok {
            assert_eq!(parse_int(s), Ok(*want), "{s}");
        }
        let bad: &[(&str, &str)] = &[
            ("", r#"strconv.ParseInt: parsing "": invalid syntax"#),
            ("abc", r#"strconv.ParseInt: parsing "abc": invalid syntax"#),
            ("1.5", r#"strconv.ParseInt: parsing "1.5": invalid syntax"#),
            ("08", r#"strconv.ParseInt: parsing "08": invalid syntax"#),
            (
                "1__0",
                r#"strconv.ParseInt: parsing "1__0": invalid syntax"#,
            ),
            ("_1", r#"strconv.ParseInt: parsing "_1": invalid syntax"#),
            ("1_", r#"strconv.ParseInt: parsing "1_": invalid syntax"#),
            ("--1", r#"strconv.ParseInt: parsing "--1": invalid syntax"#),
            (
                "9223372036854775808",
                r#"strconv.ParseInt: parsing "9223372036854775808": value out of range"#,
            ),
            (
                "-9223372036854775809",
                r#"strconv.ParseInt: parsing "-9223372036854775809": value out of range"#,
            ),
            (
                "99999999999999999999999",
                r#"strconv.ParseInt: parsing "99999999999999999999999": value out of range"#,
            ),
        ];
        for (s, want) in bad {
            assert_eq!(
                parse_int(s).map_err(|e| e.to_string()),
                Err(want.to_string()),
                "{s}"
            );
        }
    }

    #[test]
    fn uints_like_go() {
        assert_eq!(parse_uint32("4294967295"), Ok(u32::MAX));
        assert_eq!(parse_uint32("0xffffffff"), Ok(u32::MAX));
        assert_eq!(
            parse_uint32("4294967296").map_err(|e| e.to_string()),
            Err(r#"strconv.ParseUint: parsing "4294967296": value out of range"#.to_string())
        );
        assert_eq!(
            parse_uint32("-1").map_err(|e| e.to_string()),
            Err(r#"strconv.ParseUint: parsing "-1": invalid syntax"#.to_string())
        );
        assert_eq!(parse_uint("18446744073709551615"), Ok(u64::MAX));
        assert_eq!(
            parse_uint("18446744073709551616").map_err(|e| e.to_string()),
            Err(
                r#"strconv.ParseUint: parsing "18446744073709551616": value out of range"#
                    .to_string()
            )
        );
        assert_eq!(parse_uint("1"), Ok(1));
        assert!(parse_uint("+1").is_err());
    }

    #[test]
    fn bools_like_go() {
        for s in ["1", "t", "T", "TRUE", "true", "True"] {
            assert_eq!(parse_bool(s), Ok(true), "{s}");
        }
        for s in ["0", "f", "F", "FALSE", "false", "False"] {
            assert_eq!(parse_bool(s), Ok(false), "{s}");
        }
        assert_eq!(
            parse_bool("yes").map_err(|e| e.to_string()),
            Err(r#"strconv.ParseBool: parsing "yes": invalid syntax"#.to_string())
        );
    }

    #[test]
    fn quotes_like_go() {
        assert_eq!(quote("a\"b\\c\n\x01é"), r#""a\"b\\c\n\x01é""#);
    }
}

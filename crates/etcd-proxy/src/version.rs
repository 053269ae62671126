//! `etcd-proxy --version` and `etcd-proxy version`, in the layout of `etcd --version`.

/// The crate version, e.g. `0.1.0`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The etcd API version this proxy speaks.
pub const API_VERSION: &str = "3.5";

/// The short git commit the binary was built from, or `unknown` (set by build.rs).
pub const GIT_SHA: &str = env!("ETCD_PROXY_GIT_SHA");

/// The version of rustc that built the binary, e.g. `1.95.0`, or `unknown` (set by build.rs).
pub const RUST_VERSION: &str = env!("ETCD_PROXY_RUSTC_VERSION");

/// The version text, one `Key: value` per line, ending in a newline:
///
/// ```text
/// etcd-proxy Version: 0.1.0
/// API Version: 3.5
/// Git SHA: 1a2b3c4
/// Rust Version: 1.95.0
/// OS/Arch: linux/x86_64
/// ```
pub fn version_text() -> String {
    format!(
        "etcd-proxy Version: {VERSION}\nAPI Version: {API_VERSION}\nGit SHA: {GIT_SHA}\n\
         Rust Version: {RUST_VERSION}\nOS/Arch: {}/{}\n",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_every_line() {
        let text = version_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[0], format!("etcd-proxy Version: {VERSION}"));
        assert_eq!(lines[1], "API Version: 3.5");
        assert!(lines[2].starts_with("Git SHA: ") && lines[2].len() > "Git SHA: ".len());
        assert!(lines[3].starts_with("Rust Version: "));
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

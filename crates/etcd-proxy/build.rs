//! Records the git commit and the rustc version for `etcd-proxy --version`. Never fails the build:
//! without git (a source tarball) or a readable rustc, the values are `unknown`.

use std::path::PathBuf;
use std::process::Command;

/// Runs a command and returns its trimmed stdout when it succeeds with non-empty output.
fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ETCD_PROXY_GIT_SHA");

    // A packager building from a tarball may say which commit it is.
    let sha = std::env::var("ETCD_PROXY_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| output("git", &["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ETCD_PROXY_GIT_SHA={sha}");

    // Rebuild when HEAD moves: HEAD itself (branch switch) and the refs (a new commit).
    if let Some(git_dir) = output("git", &["rev-parse", "--git-dir"]) {
        println!(
            "cargo:rerun-if-changed={}",
            PathBuf::from(&git_dir).join("HEAD").display()
        );
    }
    if let Some(common) = output("git", &["rev-parse", "--git-common-dir"]) {
        let common = PathBuf::from(common);
        for name in ["refs", "packed-refs"] {
            let path = common.join(name);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }

    // "rustc 1.95.0 (59807616e 2026-04-14)" -> "1.95.0"
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let rust_version = output(&rustc, &["--version"])
        .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ETCD_PROXY_RUSTC_VERSION={rust_version}");
}

//! The etcd cluster as etcd-proxy's front doors see it: which members there are (flags or DNS SRV),
//! how to reach them (names, TLS), and whether a member is alive. Shared by the L4 gateway and,
//! later, the gRPC proxy, so both discover, validate and judge members the same way.
#![forbid(unsafe_code)]

pub mod dns;
pub mod duration;
pub mod endpoint;
pub mod probe;
pub mod srv;
pub mod tls;

pub use dns::{Dns, DnsError};
pub use duration::GoDuration;
pub use endpoint::{Endpoint, EndpointError, Scheme};

/// An I/O error worded the way Go prints it (`connection refused`, `address already in use`),
/// without Rust's `(os error N)` suffix, so messages match etcd's and what operators grep for.
pub fn io_error_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.find(" (os error") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text.to_string(),
    }
}

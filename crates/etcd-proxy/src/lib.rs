//! The `etcd-proxy` binary's library half: command line, logging, process plumbing and the
//! sub-commands, kept out of `main.rs` so unit tests and the sub-commands can share them.

#![forbid(unsafe_code)]

pub mod cli;
pub mod discovery;
pub mod error;
pub mod gateway_cmd;
pub mod grpc_proxy_cmd;
pub mod listen_tls;
pub mod logging;
pub mod signals;
pub mod strconv;
pub mod systemd;
pub mod version;

pub use backend::GoDuration;
/// Go-style durations live in `backend`, shared with the gateway's log fields.
pub use backend::duration;
pub use error::ExitError;

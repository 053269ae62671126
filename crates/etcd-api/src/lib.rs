//! The etcd v3 API as Rust types: prost messages, tonic clients and servers,
//! and serde (pbjson) impls that read and write the JSON of etcd's HTTP
//! gateway.
//!
//! It exists so that every other crate of the proxy speaks etcd's wire format
//! from one definition: the `.proto` files under `proto/` are written for this
//! project with etcd 3.5's package, service, field names and numbers, so
//! encoded messages and JSON bodies are interchangeable with etcd's own.
//!
//! Modules are named after the proto packages. JSON follows etcd's gateway:
//! proto field names on output (`prev_kv`, `ID`, `grantedTTL`), camelCase or
//! proto names on input, 64-bit integers as strings, bytes as padded base64,
//! enums by name, default values omitted, unknown fields ignored.
#![forbid(unsafe_code)]

/// Serialized `FileDescriptorSet` of every API file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/etcd_descriptor.bin"));

/// Keys, values and watch events (`mvccpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod mvccpb {
    include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

/// Users, roles and permissions (`authpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod authpb {
    include!(concat!(env!("OUT_DIR"), "/authpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

/// The KV, Watch, Lease, Cluster, Maintenance and Auth services (`etcdserverpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod etcdserverpb {
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

/// The Lock service (`v3lockpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3lockpb {
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

/// The Election service (`v3electionpb`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v3electionpb {
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.rs"));
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

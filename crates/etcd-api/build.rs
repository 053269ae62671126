//! Compiles the etcd v3 `.proto` files with protox (pure Rust, no system
//! `protoc`), then generates prost messages, tonic clients and servers, and
//! pbjson serde impls that speak the JSON of etcd's HTTP gateway.

use std::error::Error;
use std::path::PathBuf;

/// The API files, relative to `proto/`; imports resolve against the same root.
const PROTOS: &[&str] = &[
    "mvccpb/kv.proto",
    "authpb/auth.proto",
    "etcdserverpb/rpc.proto",
    "v3lockpb/v3lock.proto",
    "v3electionpb/v3election.proto",
];

/// Proto packages to generate code and JSON for (all of them).
const PACKAGES: &[&str] = &[
    ".mvccpb",
    ".authpb",
    ".etcdserverpb",
    ".v3lockpb",
    ".v3electionpb",
];

fn main() -> Result<(), Box<dyn Error>> {
    let proto_dir = PathBuf::from("proto");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    for p in PROTOS {
        println!("cargo:rerun-if-changed={}", proto_dir.join(p).display());
    }

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new([&proto_dir])?;
    // Source info carries the proto comments into the generated docs and into
    // the descriptor set served by gRPC reflection.
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS.iter().copied())?;
    let descriptor_bytes = compiler.encode_file_descriptor_set();
    std::fs::write(out_dir.join("etcd_descriptor.bin"), &descriptor_bytes)?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Keys and values as `bytes::Bytes`: cloning a value to fan it out to
        // many watchers or cache hits is a reference count, not a copy.
        .bytes(".")
        .compile_fds(compiler.file_descriptor_set())?;

    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_bytes)?
        // etcd's gateway prints proto field names ("prev_kv", "create_revision").
        .preserve_proto_field_names()
        // etcd's gateway ignores fields it does not know.
        .ignore_unknown_fields()
        .build(PACKAGES)?;

    Ok(())
}

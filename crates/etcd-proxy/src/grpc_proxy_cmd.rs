//! `etcd-proxy grpc-proxy start`. Its flags are parsed and checked already (see
//! [`crate::cli::GrpcProxyStartArgs::validate`]); serving comes next.

use crate::ExitError;
use crate::cli::GrpcProxyStartArgs;

/// Runs the gRPC proxy. Not implemented yet: fails with exit code 1.
pub async fn run(args: GrpcProxyStartArgs) -> Result<(), ExitError> {
    let _ = args;
    Err(ExitError::new("grpc-proxy start is not implemented yet"))
}

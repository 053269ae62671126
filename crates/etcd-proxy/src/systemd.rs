//! Readiness for systemd `Type=notify` units, as etcd 3.5 does it: once the proxy listens, send
//! `READY=1` to `$NOTIFY_SOCKET` and log around it. Without `$NOTIFY_SOCKET` (not under systemd)
//! nothing is sent and the success line is still logged, exactly like etcd.

use std::ffi::OsStr;
use std::io;
use std::os::unix::net::UnixDatagram;

/// The state sent once the listener is up.
const READY: &[u8] = b"READY=1";

/// Tells the init daemon that the proxy is ready, logging `notifying init daemon` and then
/// `successfully notified init daemon`, or the error `failed to notify systemd for readiness`.
/// Never fails the caller: readiness is advisory, as in etcd.
pub fn notify_ready() {
    notify_ready_to(std::env::var_os("NOTIFY_SOCKET").as_deref());
}

/// [`notify_ready`] with the socket given rather than read from the environment (tests use it to
/// avoid racing on process-wide environment variables).
pub fn notify_ready_to(socket: Option<&OsStr>) {
    tracing::info!("notifying init daemon");
    let result = match socket {
        Some(path) => send(path, READY),
        None => Ok(()),
    };
    match result {
        Ok(()) => tracing::info!("successfully notified init daemon"),
        Err(e) => tracing::error!(error = %e, "failed to notify systemd for readiness"),
    }
}

/// Sends one datagram to a notify socket: a path, or `@name` for the Linux abstract namespace.
fn send(socket: &OsStr, msg: &[u8]) -> io::Result<()> {
    if socket.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "NOTIFY_SOCKET is empty",
        ));
    }
    let sock = UnixDatagram::unbound()?;
    let sent = match socket.as_encoded_bytes().strip_prefix(b"@") {
        Some(name) => send_abstract(&sock, name, msg)?,
        None => sock.send_to(msg, socket)?,
    };
    if sent != msg.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "incomplete write"));
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn send_abstract(sock: &UnixDatagram, name: &[u8], msg: &[u8]) -> io::Result<usize> {
    use std::os::linux::net::SocketAddrExt as _;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    sock.send_to_addr(msg, &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &[u8]) -> io::Result<usize> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract notify sockets need Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn recv(sock: &UnixDatagram) -> Vec<u8> {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("set timeout");
        let mut buf = [0u8; 64];
        let n = sock.recv(&mut buf).expect("a datagram arrives");
        buf[..n].to_vec()
    }

    #[test]
    fn sends_ready_to_a_path_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        notify_ready_to(Some(path.as_os_str()));
        assert_eq!(recv(&sock), b"READY=1");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_ready_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("etcd-proxy-test-{}", std::process::id());
        let addr =
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind");
        let env_value = format!("@{name}");
        notify_ready_to(Some(OsStr::new(&env_value)));
        assert_eq!(recv(&sock), b"READY=1");
    }

    #[test]
    fn reports_errors_without_failing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let missing = dir.path().join("nobody-listens.sock");
        assert!(send(missing.as_os_str(), READY).is_err());
        assert!(send(OsStr::new(""), READY).is_err());
        // Logs the error and returns.
        notify_ready_to(Some(missing.as_os_str()));
        notify_ready_to(None);
    }
}

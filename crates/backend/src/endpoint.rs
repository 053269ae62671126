//! One etcd member address, parsed the way etcd parses `--endpoints`, with the fixes etcd lacks:
//! IPv6 literals are kept in brackets when joined again (etcd#13548) and a bad port is an error
//! instead of silently becoming port 0.

use std::fmt;
use std::net::IpAddr;

/// How the member expects to be spoken to, as far as we know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `host:port` with no scheme: plain TCP as far as we know (bytes pass through anyway).
    Unspecified,
    /// `http://`, or an `_etcd-client._tcp` SRV record.
    Http,
    /// `https://`, or an `_etcd-client-ssl._tcp` SRV record.
    Https,
}

/// An etcd member's client address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP literal, without IPv6 brackets. SRV targets keep their trailing dot.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Scheme given on the command line or implied by the SRV service name.
    pub scheme: Scheme,
    /// SRV priority (0 for static endpoints): lower is preferred.
    pub priority: u16,
    /// SRV weight (0 for static endpoints): share of picks within one priority.
    pub weight: u16,
}

/// Why an endpoint given by the user could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EndpointError {
    /// No `:port` part, or an unbracketed IPv6 literal (etcd's message, kept for scripts that grep it).
    #[error("error parsing endpoint {0:?}: missing port in address")]
    MissingPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("error parsing endpoint {0:?}: invalid port {1:?}")]
    InvalidPort(String, String),
    /// Nothing before the port.
    #[error("error parsing endpoint {0:?}: missing host")]
    MissingHost(String),
    /// A scheme other than http or https.
    #[error("error parsing endpoint {0:?}: unsupported scheme {1:?} (use http:// or https://)")]
    UnsupportedScheme(String, String),
}

impl Endpoint {
    /// Parses `host:port`, `[v6]:port`, `http://host:port` or `https://host:port[/path]`.
    pub fn parse(input: &str) -> Result<Endpoint, EndpointError> {
        let trimmed = input.trim();
        let (scheme, rest) = match trimmed.split_once("://") {
            Some((s, rest)) => {
                let scheme = match s.to_ascii_lowercase().as_str() {
                    "http" => Scheme::Http,
                    "https" => Scheme::Https,
                    _ => return Err(EndpointError::UnsupportedScheme(input.into(), s.into())),
                };
                // Like Go's url.Parse: the authority ends at the first '/', '?' or '#'.
                let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
                (scheme, &rest[..end])
            }
            None => (Scheme::Unspecified, trimmed),
        };
        let (host, port) =
            split_host_port(rest).ok_or_else(|| EndpointError::MissingPort(input.into()))?;
        if host.is_empty() {
            return Err(EndpointError::MissingHost(input.into()));
        }
        let port = match port.parse::<u16>() {
            Ok(p) if p != 0 => p,
            _ => return Err(EndpointError::InvalidPort(input.into(), port.into())),
        };
        Ok(Endpoint {
            host: host.to_string(),
            port,
            scheme,
            priority: 0,
            weight: 0,
        })
    }

    /// The IP address, when the host is an IP literal.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }

    /// The name to check a TLS certificate against: the host without an SRV trailing dot.
    pub fn server_name(&self) -> &str {
        self.host.strip_suffix('.').unwrap_or(&self.host)
    }
}

/// `host:port` joined like Go's `net.JoinHostPort`: IPv6 literals in brackets.
impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Go's `net.SplitHostPort`: `[v6]:port` or `host:port` with exactly one colon.
pub fn split_host_port(s: &str) -> Option<(&str, &str)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = s.rsplit_once(':')?;
    if host.contains(':') {
        return None; // an IPv6 literal without brackets is ambiguous
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_etcd_accepts() {
        let e = Endpoint::parse("http://172.20.0.2:2379").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.scheme),
            ("172.20.0.2", 2379, Scheme::Http)
        );
        let e = Endpoint::parse("https://etcd.example.com:2379/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.scheme),
            ("etcd.example.com", 2379, Scheme::Https)
        );
        let e = Endpoint::parse("127.0.0.1:2379").unwrap();
        assert_eq!(e.scheme, Scheme::Unspecified);
        assert_eq!(e.to_string(), "127.0.0.1:2379");
    }

    #[test]
    fn ipv6_keeps_its_brackets() {
        let e = Endpoint::parse("http://[::1]:2379").unwrap();
        assert_eq!(e.host, "::1");
        assert_eq!(e.ip(), Some("::1".parse().unwrap()));
        assert_eq!(e.to_string(), "[::1]:2379");
    }

    #[test]
    fn rejects_what_cannot_work() {
        assert_eq!(
            Endpoint::parse("localhost"),
            Err(EndpointError::MissingPort("localhost".into()))
        );
        assert!(matches!(
            Endpoint::parse("::1:2379"),
            Err(EndpointError::MissingPort(_))
        ));
        assert!(matches!(
            Endpoint::parse("127.0.0.1:abc"),
            Err(EndpointError::InvalidPort(..))
        ));
        assert!(matches!(
            Endpoint::parse("127.0.0.1:0"),
            Err(EndpointError::InvalidPort(..))
        ));
        assert!(matches!(
            Endpoint::parse("127.0.0.1:70000"),
            Err(EndpointError::InvalidPort(..))
        ));
        assert!(matches!(
            Endpoint::parse(":2379"),
            Err(EndpointError::MissingHost(_))
        ));
        assert!(matches!(
            Endpoint::parse("unix://x:1"),
            Err(EndpointError::UnsupportedScheme(..))
        ));
        assert_eq!(
            EndpointError::MissingPort("localhost".into()).to_string(),
            "error parsing endpoint \"localhost\": missing port in address"
        );
    }

    proptest! {
        #[test]
        fn display_then_parse_round_trips(a in any::<[u16; 8]>(), v4 in any::<[u8; 4]>(), port in 1u16.., six in any::<bool>()) {
            let ip: IpAddr = if six { std::net::Ipv6Addr::from(a).into() } else { std::net::Ipv4Addr::from(v4).into() };
            let e = Endpoint { host: ip.to_string(), port, scheme: Scheme::Unspecified, priority: 0, weight: 0 };
            prop_assert_eq!(Endpoint::parse(&e.to_string()).unwrap(), e);
        }
    }
}

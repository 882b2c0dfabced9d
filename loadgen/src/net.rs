//! Target addresses, URL templates and connecting with an error kind that
//! says which limit was hit.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpSocket, TcpStream};

/// A parsed `ws://` or `http://` URL (a template: may hold `{channel}`).
#[derive(Debug, Clone)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> anyhow::Result<Url> {
        let (scheme, rest) = s.split_once("://").with_context(|| format!("{s:?} is not a URL (expected ws://… or http://…)"))?;
        let default_port = match scheme {
            "ws" | "http" => 80,
            "wss" | "https" => bail!("{s:?}: TLS is not supported; measure the plain-text port (ws:// or http://)"),
            "redis" => 6379,
            _ => bail!("{s:?}: unsupported scheme {scheme:?} (ws, http, redis)"),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
                (h.trim_matches(['[', ']']).to_string(), p.parse().with_context(|| format!("{s:?}: bad port {p:?}"))?)
            }
            _ => (authority.trim_matches(['[', ']']).to_string(), default_port),
        };
        if host.is_empty() {
            bail!("{s:?}: no host");
        }
        Ok(Url { host, port, path })
    }

    /// The path with `{channel}` replaced.
    pub fn path_for(&self, channel: &str) -> String {
        self.path.replace("{channel}", channel)
    }

    /// `host:port` for the Host header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    pub async fn resolve(&self) -> anyhow::Result<SocketAddr> {
        tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot resolve {}", self.host))?
            .next()
            .with_context(|| format!("{} has no address", self.host))
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.authority(), self.path)
    }
}

/// Parses `--source-ips`: `127.0.0.1-127.0.0.8` or `10.0.0.1,10.0.0.2`.
pub fn parse_source_ips(s: &str) -> anyhow::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.parse().with_context(|| format!("bad address {a:?}"))?;
            let b: Ipv4Addr = b.parse().with_context(|| format!("bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 65_535 {
                bail!("bad range {part:?}");
            }
            out.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            out.push(part.parse().with_context(|| format!("bad address {part:?}"))?);
        }
    }
    if out.is_empty() {
        bail!("--source-ips names no address");
    }
    Ok(out)
}

/// Why a connection could not be opened.
#[derive(Debug)]
pub struct ConnectError {
    pub kind: &'static str,
    pub detail: String,
}

impl ConnectError {
    pub fn new(kind: &'static str, detail: impl Into<String>) -> ConnectError {
        ConnectError { kind, detail: detail.into() }
    }

    pub fn io(e: &io::Error) -> ConnectError {
        let kind = match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "fd_limit",
            Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => "no_ephemeral_port",
            Some(libc::ECONNREFUSED) => "refused",
            Some(libc::ECONNRESET) | Some(libc::EPIPE) => "reset",
            Some(libc::ETIMEDOUT) => "timeout",
            _ if e.kind() == io::ErrorKind::UnexpectedEof => "closed",
            _ if e.kind() == io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
        ConnectError { kind, detail: e.to_string() }
    }

    /// What the user can do about this kind, if anything.
    pub fn hint(kind: &str) -> Option<&'static str> {
        match kind {
            "fd_limit" => Some("the file descriptor limit was reached: raise the hard limit (ulimit -Hn) or open fewer connections"),
            "no_ephemeral_port" => Some(
                "out of ephemeral ports towards this address: spread connections with --source-ips 127.0.0.1-127.0.0.8 \
                 or widen net.ipv4.ip_local_port_range",
            ),
            "timeout" => Some("the server did not answer in time: lower --connect-rate or check the server's accept backlog"),
            _ => None,
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// Opens a TCP connection to `addr`, from `source` if given.
pub async fn connect(addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let fut = async {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(|e| ConnectError::io(&e))?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(|e| ConnectError::io(&e))?;
        }
        let s = socket.connect(addr).await.map_err(|e| ConnectError::io(&e))?;
        let _ = s.set_nodelay(true);
        Ok(s)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::new("timeout", format!("no connection within {timeout:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_templates_and_ports() {
        let u = Url::parse("ws://127.0.0.1:8080/ws?channel={channel}").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("127.0.0.1", 8080));
        assert_eq!(u.path_for("a"), "/ws?channel=a");
        let u = Url::parse("http://localhost?x=1").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/?x=1"));
        let u = Url::parse("ws://[::1]:9/").unwrap();
        assert_eq!((u.host.as_str(), u.authority()), ("::1", "[::1]:9".to_string()));
        assert!(Url::parse("wss://x/").is_err());
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("localhost:80").is_err());
    }

    #[test]
    fn source_ip_ranges() {
        let ips = parse_source_ips("127.0.0.1-127.0.0.3,10.0.0.9").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[2].to_string(), "127.0.0.3");
        assert!(parse_source_ips("127.0.0.5-127.0.0.1").is_err());
        assert!(parse_source_ips("").is_err());
    }
}

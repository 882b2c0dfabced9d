//! Target addresses, URL templates and connecting with an error kind that
//! says which limit was hit.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll};

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

/// A parsed `ws://`, `wss://`, `http://` or `https://` URL (a template: may
/// hold `{channel}`).
#[derive(Debug, Clone)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// `wss://` or `https://`.
    pub tls: bool,
}

impl Url {
    pub fn parse(s: &str) -> anyhow::Result<Url> {
        let (scheme, rest) = s.split_once("://").with_context(|| format!("{s:?} is not a URL (expected ws://… or http://…)"))?;
        let (default_port, tls) = match scheme {
            "ws" | "http" => (80, false),
            "wss" | "https" => (443, true),
            "redis" => (6379, false),
            _ => bail!("{s:?}: unsupported scheme {scheme:?} (ws, wss, http, https, redis)"),
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
        Ok(Url { host, port, path, tls })
    }

    /// Refuses a TLS URL where loadgen speaks plain text only.
    pub fn plain(self, what: &str) -> anyhow::Result<Url> {
        if self.tls {
            bail!("{what} over TLS is not supported: use a plain-text URL (ws:// or http://) for it");
        }
        Ok(self)
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
            "tls" => Some("the TLS handshake failed: for a private or self-signed certificate pass its CA with --tls-ca FILE"),
            _ => None,
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.detail)
    }
}

/// The CA bundle `--tls-ca` names, if any (else the system's roots).
static TLS_CA: OnceLock<Option<String>> = OnceLock::new();
static TLS_CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();

/// Sets the CAs that `wss://` and `https://` servers are checked against
/// (once, before connecting); `None` trusts the system's.
pub fn set_tls_ca(path: Option<String>) -> anyhow::Result<()> {
    let _ = TLS_CA.set(path);
    tls_config().map(drop).map_err(anyhow::Error::msg)
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    TLS_CONFIG
        .get_or_init(|| {
            let ca = TLS_CA.get().and_then(Option::as_deref);
            let roots = herald::tls::roots("--tls-ca", ca).map_err(|e| e.to_string())?;
            herald::tls::client_config(roots).map_err(|e| e.to_string())
        })
        .clone()
}

/// A connection to the target: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Opens a connection to `url` at `addr`, with the TLS handshake if the
/// URL asks for it.
pub async fn open(url: &Url, addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Result<Stream, ConnectError> {
    let tcp = connect(addr, source, timeout).await?;
    if !url.tls {
        return Ok(Stream::Plain(tcp));
    }
    let config = tls_config().map_err(|e| ConnectError::new("tls", e))?;
    let name = rustls_pki_types::ServerName::try_from(url.host.clone())
        .map_err(|_| ConnectError::new("tls", format!("{:?} is not a TLS server name", url.host)))?;
    let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
        Ok(Err(e)) => Err(ConnectError::new("tls", e.to_string())),
        Err(_) => Err(ConnectError::new("timeout", "no TLS handshake within the connect timeout")),
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
        let u = Url::parse("wss://x/").unwrap();
        assert_eq!((u.port, u.tls), (443, true));
        assert!(u.plain("publishing").is_err());
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

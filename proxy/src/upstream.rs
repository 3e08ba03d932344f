//! Connections from the proxy to an upstream server: TCP, optionally TLS, with a connect
//! timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::ServerName;
use shotover_crds::topology::TlsConnectorConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// TLS settings of a sink, ready to connect.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: TlsConnector,
    pub server_name: ServerName<'static>,
}

/// How to reach one upstream.
#[derive(Clone)]
pub struct Upstream {
    pub address: String,
    pub connect_timeout: Duration,
    pub tls: Option<UpstreamTls>,
}

impl Upstream {
    /// The upstream of a sink's config: its address, connect timeout and TLS settings.
    pub fn new(
        address: &str,
        connect_timeout_ms: u64,
        tls: Option<&TlsConnectorConfig>,
    ) -> anyhow::Result<Upstream> {
        let tls = match tls {
            Some(tls) => {
                let (connector, server_name) = crate::tls::connector(tls, address)
                    .context("building the upstream TLS connector")?;
                Some(UpstreamTls {
                    connector,
                    server_name,
                })
            }
            None => None,
        };
        Ok(Upstream {
            address: address.to_string(),
            connect_timeout: Duration::from_millis(connect_timeout_ms),
            tls,
        })
    }

    /// Connects (TCP, then the TLS handshake) within the connect timeout.
    pub async fn connect(&self) -> io::Result<UpstreamStream> {
        let connect = async {
            let tcp = TcpStream::connect(&self.address).await?;
            tcp.set_nodelay(true)?;
            set_keepalive(&tcp);
            match &self.tls {
                None => Ok(UpstreamStream::Tcp(tcp)),
                Some(tls) => {
                    let stream = tls.connector.connect(tls.server_name.clone(), tcp).await?;
                    Ok(UpstreamStream::Tls(Box::new(stream)))
                }
            }
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "no connection within {} ms",
                    self.connect_timeout.as_millis()
                ),
            )),
        }
    }
}

/// TCP keepalive on a connection of either side: probes after 60 s without traffic, every
/// 10 s, and the connection is dropped after 6 unanswered ones, so a peer that vanished
/// (a node gone, a NAT entry expired) is noticed in about two minutes rather than the
/// kernel's default of over two hours. Best effort: a socket that refuses the option keeps
/// working without it.
pub fn set_keepalive(tcp: &TcpStream) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(6);
    if let Err(e) = socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}

/// `shotover_failed_requests_count` of one sink: the requests it answered with an error of
/// its own because its upstream failed.
pub fn failed_requests_counter(chain: &str, transform: &str) -> crate::metrics::Counter {
    crate::metrics::counter(
        "shotover_failed_requests_count",
        "Requests a sink answered with an error because its upstream could not be reached.",
        &[("chain", chain), ("transform", transform)],
    )
}

/// A connection to an upstream, plain or TLS.
pub enum UpstreamStream {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

//! The admin endpoint: Prometheus text at GET /metrics and a health answer at GET /healthz,
//! plus the client side of that health check for container HEALTHCHECKs.
//!
//! A hand-written HTTP/1.1 responder rather than hyper: two fixed GET routes, one request
//! per connection (`Connection: close`), a bounded request read and a deadline — about a
//! hundred lines with no parser state worth a dependency tree. It must sit on a private
//! address (127.0.0.1, a pod-local port): it has no authentication.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// A request larger than this (line and headers) is not an honest scrape.
const MAX_REQUEST: usize = 8 * 1024;
/// Time a client has to send its request and read the answer.
const DEADLINE: Duration = Duration::from_secs(5);
/// Scrapers and probes at once; more wait in the kernel's backlog.
const MAX_CLIENTS: usize = 16;
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether mailtls serves: true once every listener accepts, false again when stopping.
#[derive(Debug, Default)]
pub struct Health {
    serving: AtomicBool,
}

impl Health {
    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the admin endpoint at {addr}: {source}")]
    Connect { addr: SocketAddr, source: std::io::Error },
    #[error("admin endpoint at {addr}: {source}")]
    Io { addr: SocketAddr, source: std::io::Error },
    #[error("admin endpoint at {addr} answered {status:?}")]
    Unhealthy { addr: SocketAddr, status: String },
}

/// Serves until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let (metrics, health) = (metrics.clone(), health.clone());
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(DEADLINE, answer(stream, &metrics, &health)).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!("admin endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics, health: &Health) -> std::io::Result<()> {
    let Some(request) = read_request(&mut stream).await? else {
        return respond(&mut stream, "400 Bad Request", "text/plain", "bad request\n", true).await;
    };
    let (method, path) = request;
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        return respond(&mut stream, "405 Method Not Allowed", "text/plain", "GET only\n", head_only).await;
    }
    match path.split('?').next().unwrap_or("") {
        "/metrics" => respond(&mut stream, "200 OK", OPENMETRICS, &metrics.render(), head_only).await,
        "/healthz" if health.serving() => {
            respond(&mut stream, "200 OK", "text/plain", "ok\n", head_only).await
        }
        "/healthz" => {
            respond(&mut stream, "503 Service Unavailable", "text/plain", "not serving\n", head_only).await
        }
        _ => {
            respond(&mut stream, "404 Not Found", "text/plain", "try /metrics or /healthz\n", head_only).await
        }
    }
}

/// The method and path of one request, once its headers are complete; `None` when it is
/// not HTTP or too large.
async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<(String, String)>> {
    let mut buf = Vec::with_capacity(1024);
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_REQUEST {
            return Ok(None);
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf);
    let mut words = text.lines().next().unwrap_or("").split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(method), Some(path), Some(version)) if version.starts_with("HTTP/1.") => {
            Ok(Some((method.to_owned(), path.to_owned())))
        }
        _ => Ok(None),
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !head_only {
        stream.write_all(body.as_bytes()).await?;
    }
    stream.shutdown().await
}

/// `mailtls --healthcheck`: GET /healthz from the admin endpoint; Ok when it says 200.
/// Blocking and runtime-free, so a container HEALTHCHECK costs one short process.
pub fn check_health(addr: SocketAddr, timeout: Duration) -> Result<(), AdminError> {
    // A wildcard listen address ("0.0.0.0:9925" in a container) is reached on loopback.
    let addr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    };
    let io = |source| AdminError::Io { addr, source };
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|source| AdminError::Connect { addr, source })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: mailtls\r\nConnection: close\r\n\r\n").map_err(io)?;
    let mut answer = Vec::new();
    stream.take(MAX_REQUEST as u64).read_to_end(&mut answer).map_err(io)?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or("").to_owned();
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(AdminError::Unhealthy { addr, status })
    }
}

//! One HTTP/1.1 connection: hyper serves it with the router; a watchdog closes it when the
//! client takes longer than `serve.header_read_timeout_ms` to send a request's headers
//! (counted from the connection's start, or from the first byte of a later request), or
//! stays idle between requests longer than `serve.keep_alive_timeout_ms`. On shutdown the
//! connection finishes its request in flight and closes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower_service::Service;

use super::metrics::Metrics;

/// Timeouts and sizes of every connection.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_header_bytes: usize,
}

/// What the watchdog sees of a connection.
struct Activity {
    start: Instant,
    /// Requests the router is handling on this connection.
    in_flight: AtomicUsize,
    /// Milliseconds since `start` when the connection last became idle.
    idle_since: AtomicU64,
    /// Milliseconds since `start` of the first byte read while idle (+1; 0 = none).
    head_started: AtomicU64,
    /// Requests begun, 0 before the first.
    requests: AtomicU64,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// When the connection expires if nothing changes, and why (`None` while a request runs).
    fn deadline(&self, s: &Settings) -> Option<(Instant, &'static str)> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let at = |ms: u64, d: Duration| self.start + Duration::from_millis(ms) + d;
        let head = self.head_started.load(Ordering::SeqCst);
        if self.requests.load(Ordering::SeqCst) == 0 {
            // The first request's headers are due from the connection's start.
            return Some((self.start + s.header_read_timeout, "header_timeout"));
        }
        if head > 0 {
            return Some((at(head - 1, s.header_read_timeout), "header_timeout"));
        }
        Some((at(self.idle_since.load(Ordering::SeqCst), s.keep_alive_timeout), "idle_timeout"))
    }
}

/// The socket, noting when a new request's first bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let a = &self.activity;
            if a.in_flight.load(Ordering::SeqCst) == 0 && a.head_started.load(Ordering::SeqCst) == 0 {
                a.head_started.store(a.now_ms() + 1, Ordering::SeqCst);
            }
        }
        result
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        activity.requests.fetch_add(1, Ordering::SeqCst);
        activity.head_started.store(0, Ordering::SeqCst);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::SeqCst);
        a.head_started.store(0, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `stream` until the client closes it, a timeout closes it, or shutdown is signalled
/// and the request in flight is done.
pub async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    settings: Settings,
    metrics: Arc<Metrics>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity {
        start: Instant::now(),
        in_flight: AtomicUsize::new(0),
        idle_since: AtomicU64::new(0),
        head_started: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let guard = InFlight::begin(&activity);
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            async move {
                let response = app.call(request.map(axum::body::Body::new)).await;
                drop(guard);
                response
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Header bytes beyond `serve.max_header_bytes` get the router's JSON 431; this bound (far
    // above it) only stops a client from growing the read buffer without end.
    builder.max_buf_size((settings.max_header_bytes * 4).max(64 << 10));
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let (deadline, reason) = activity.deadline(&settings).unwrap_or((Instant::now() + settings.header_read_timeout, ""));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    log::debug!("connection from {peer}: {e}");
                }
                return;
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                // Still expired now (a request may have begun meanwhile)?
                if let Some((at, why)) = activity.deadline(&settings) {
                    if at <= Instant::now() && why == reason {
                        metrics.connection_closed(why);
                        log::debug!("connection from {peer}: closed ({why})");
                        return;
                    }
                }
            }
            changed = stop.changed(), if !stopping => {
                if changed.is_err() || *stop.borrow() {
                    stopping = true;
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity() -> Activity {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let s = Settings { header_read_timeout: Duration::from_secs(10), keep_alive_timeout: Duration::from_secs(60), max_header_bytes: 1 << 14 };
        let a = Arc::new(activity());
        let (at, why) = a.deadline(&s).unwrap();
        assert_eq!((at, why), (a.start + s.header_read_timeout, "header_timeout"));
        let guard = InFlight::begin(&a);
        assert!(a.deadline(&s).is_none(), "no timeout while a request runs");
        drop(guard);
        let (at, why) = a.deadline(&s).unwrap();
        assert_eq!(why, "idle_timeout");
        assert!(at >= a.start + s.keep_alive_timeout);
        a.head_started.store(5_001, Ordering::SeqCst);
        let (at, why) = a.deadline(&s).unwrap();
        assert_eq!((at, why), (a.start + Duration::from_millis(5_000) + s.header_read_timeout, "header_timeout"));
    }
}

//! One HTTP/1.1 connection: hyper serves it with the router; a watchdog closes it when the
//! client takes longer than `serve.header_read_timeout_ms` to send a request's headers
//! (counted from the connection's start, or from the first byte of a later request), stays
//! idle between requests longer than `serve.keep_alive_timeout_ms` (counted from the last byte
//! written: an answer still being written is not idle), or reads an answer for longer than
//! `serve.response_write_timeout_ms`. On shutdown the connection finishes its request in
//! flight and closes.

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
    pub response_write_timeout: Duration,
    pub max_header_bytes: usize,
    /// Serve one request and close (connections beyond `serve.max_connections`, which only
    /// get the probes).
    pub single_request: bool,
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
    /// Milliseconds since `start` when the answer in flight began to be written (+1; 0 =
    /// none is being written).
    writing_since: AtomicU64,
    /// Milliseconds since `start` of the last write that made progress.
    last_write: AtomicU64,
    /// The last write found the socket full: bytes of an answer are still waiting to go out
    /// (the client reads slowly, or not at all).
    write_pending: std::sync::atomic::AtomicBool,
    /// Wakes the watchdog when a request begins, returns or ends (its deadline moves).
    changed: tokio::sync::Notify,
}

impl Activity {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// When the connection expires if nothing changes, and why (`None` while a request runs).
    fn deadline(&self, s: &Settings) -> Option<(Instant, &'static str)> {
        let at = |ms: u64, d: Duration| self.start + Duration::from_millis(ms) + d;
        let writing = self.writing_since.load(Ordering::SeqCst);
        let in_flight = self.in_flight.load(Ordering::SeqCst) > 0;
        // The handler runs under its own deadline; its answer, from the moment it is written
        // until its last byte has left (the socket no longer full), under this one.
        if writing > 0 && (in_flight || self.write_pending.load(Ordering::SeqCst)) {
            return Some((at(writing - 1, s.response_write_timeout), "write_timeout"));
        }
        if in_flight {
            return None;
        }
        let head = self.head_started.load(Ordering::SeqCst);
        if self.requests.load(Ordering::SeqCst) == 0 {
            // The first request's headers are due from the connection's start.
            return Some((self.start + s.header_read_timeout, "header_timeout"));
        }
        if head > 0 {
            return Some((at(head - 1, s.header_read_timeout), "header_timeout"));
        }
        let idle = self.idle_since.load(Ordering::SeqCst).max(self.last_write.load(Ordering::SeqCst));
        Some((at(idle, s.keep_alive_timeout), "idle_timeout"))
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

impl Watched {
    fn wrote(&self, result: &Poll<std::io::Result<usize>>) {
        match result {
            Poll::Pending => self.activity.write_pending.store(true, Ordering::SeqCst),
            Poll::Ready(Ok(n)) if *n > 0 => {
                self.activity.last_write.store(self.activity.now_ms(), Ordering::SeqCst);
                self.activity.write_pending.store(false, Ordering::SeqCst);
            }
            _ => {}
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&result);
        result
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&result);
        result
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
        activity.writing_since.store(0, Ordering::SeqCst);
        activity.changed.notify_one();
        Self(activity.clone())
    }
}

impl InFlight {
    /// The handler returned: its answer is being written from now on.
    fn writing(&self) {
        let a = &self.0;
        a.writing_since.store(a.now_ms() + 1, Ordering::SeqCst);
        a.changed.notify_one();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(a.now_ms(), Ordering::SeqCst);
        a.head_started.store(0, Ordering::SeqCst);
        a.in_flight.fetch_sub(1, Ordering::SeqCst);
        a.changed.notify_one();
    }
}

/// A response body that keeps its request in flight until its last frame has been taken by
/// hyper (or the body is dropped), so the keep-alive timer does not run while it is written.
struct Guarded {
    inner: axum::body::Body,
    guard: Option<InFlight>,
}

impl hyper::body::Body for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.guard = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
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
        writing_since: AtomicU64::new(0),
        last_write: AtomicU64::new(0),
        write_pending: std::sync::atomic::AtomicBool::new(false),
        changed: tokio::sync::Notify::new(),
    });
    let io = TokioIo::new(Watched { inner: stream, activity: activity.clone() });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let guard = InFlight::begin(&activity);
            request.extensions_mut().insert(ConnectInfo(peer));
            let mut app = app.clone();
            async move {
                let response = app.call(request.map(axum::body::Body::new)).await?;
                guard.writing();
                Ok::<_, std::convert::Infallible>(response.map(|inner| Guarded { inner, guard: Some(guard) }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Header bytes beyond `serve.max_header_bytes` get the router's JSON 431; this bound (far
    // above it) only stops a client from growing the read buffer without end.
    builder.max_buf_size((settings.max_header_bytes * 4).max(64 << 10));
    if settings.single_request {
        builder.keep_alive(false);
    }
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let (deadline, reason) = activity.deadline(&settings).unwrap_or((Instant::now() + settings.header_read_timeout.min(settings.response_write_timeout), ""));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    log::debug!("connection from {peer}: {e}");
                }
                return;
            }
            // The state changed: compute the deadline again.
            _ = activity.changed.notified() => {}
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
            writing_since: AtomicU64::new(0),
            last_write: AtomicU64::new(0),
            write_pending: std::sync::atomic::AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
        }
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let s = Settings {
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(60),
            response_write_timeout: Duration::from_secs(30),
            max_header_bytes: 1 << 14,
            single_request: false,
        };
        let a = Arc::new(activity());
        let (at, why) = a.deadline(&s).unwrap();
        assert_eq!((at, why), (a.start + s.header_read_timeout, "header_timeout"));
        let guard = InFlight::begin(&a);
        assert!(a.deadline(&s).is_none(), "no timeout while a request runs");
        guard.writing();
        let (at, why) = a.deadline(&s).unwrap();
        assert_eq!(why, "write_timeout", "an answer being written has its own timeout");
        assert!(at >= a.start + s.response_write_timeout);
        drop(guard);
        a.write_pending.store(true, Ordering::SeqCst);
        assert_eq!(a.deadline(&s).unwrap().1, "write_timeout", "the answer's last bytes wait for a slow reader");
        a.write_pending.store(false, Ordering::SeqCst);
        let (at, why) = a.deadline(&s).unwrap();
        assert_eq!(why, "idle_timeout");
        assert!(at >= a.start + s.keep_alive_timeout);
        // The keep-alive timer counts from the last byte written.
        a.last_write.store(20_000, Ordering::SeqCst);
        assert_eq!(a.deadline(&s).unwrap(), (a.start + Duration::from_millis(20_000) + s.keep_alive_timeout, "idle_timeout"));
        a.head_started.store(5_001, Ordering::SeqCst);
        let (at, why) = a.deadline(&s).unwrap();
        assert_eq!((at, why), (a.start + Duration::from_millis(5_000) + s.header_read_timeout, "header_timeout"));
    }
}

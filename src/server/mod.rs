//! `serve`: the HTTP server (axum on tokio) over a model repository: routes, limits
//! (body size, pixel count, per-request timeout), request ids and a structured access log,
//! Prometheus metrics, dynamic batching per model version, hot reload of versions, and a
//! graceful shutdown that finishes in-flight requests.

pub mod error;
pub mod handlers;
pub mod metrics;
pub mod registry;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use candle_core::Device;

use crate::config::ServeConfig;
use error::ApiError;
use metrics::Metrics;
use registry::Registry;
use worker::BatchSettings;

/// Request limits handlers enforce.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_pixels: u64,
    /// Images in one `:predict` request.
    pub max_instances: usize,
    pub request_timeout: Duration,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    request_ids: Arc<AtomicU64>,
}

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: ServeConfig,
    pub repository: PathBuf,
    pub device: Device,
}

impl AppState {
    /// State over `repository`: scans it once (loading starts in the background) and keeps
    /// watching it.
    pub fn new(options: &ServeOptions) -> Self {
        let c = &options.config;
        let metrics = Arc::new(Metrics::default());
        let settings = BatchSettings {
            max_batch_size: c.max_batch_size,
            max_delay: Duration::from_millis(c.max_delay_ms),
            queue_capacity: c.queue_capacity,
            threads: c.model_threads,
        };
        let registry = Registry::new(
            options.repository.clone(),
            c.models.clone(),
            c.default_model.clone(),
            settings,
            options.device.clone(),
            metrics.clone(),
        );
        registry.scan();
        registry.watch(Duration::from_millis(c.poll_interval_ms.max(50)));
        Self {
            registry,
            metrics,
            limits: Limits {
                max_pixels: c.max_pixels,
                max_instances: c.queue_capacity.max(1),
                request_timeout: Duration::from_millis(c.request_timeout_ms),
            },
            request_ids: Arc::new(AtomicU64::new(1)),
        }
    }
}

/// Every route, with the middleware applied.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/", get(handlers::page))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .route("/infer", post(handlers::infer))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/models/{*rest}", any(handlers::models))
        .fallback(handlers::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::Internal("a request handler panicked".into()).into_response()
        }))
        .with_state(state)
}

/// Answers 504 when a request takes longer than `serve.request_timeout_ms`.
async fn deadline(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(format!("request took longer than {} ms (serve.request_timeout_ms)", limit.as_millis())).into_response(),
    }
}

/// The metrics label of a path (bounded cardinality).
fn route_label(path: &str) -> &'static str {
    match path {
        "/" => "page",
        "/healthz" => "healthz",
        "/readyz" => "readyz",
        "/metrics" => "metrics",
        "/infer" => "infer",
        "/v1/models" => "list",
        p if p.starts_with("/v1/models/") => {
            if p.ends_with(":predict") {
                "predict"
            } else if p.ends_with(":segment") {
                "segment"
            } else if p.ends_with("/metadata") {
                "metadata"
            } else {
                "status"
            }
        }
        _ => "other",
    }
}

/// Request id (from `X-Request-Id` or generated), one JSON access-log line, metrics.
async fn access_log(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("{:x}-{}", std::process::id(), state.request_ids.fetch_add(1, Ordering::Relaxed)));
    if let Ok(v) = HeaderValue::from_str(&id) {
        request.headers_mut().insert("x-request-id", v);
    }
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let bytes_in = request
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut response = next.run(request).await;
    let elapsed = started.elapsed();
    let status = response.status();
    let route = route_label(&path);
    state.metrics.request(route, status.as_u16(), elapsed);
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let line = serde_json::json!({
        "ts": crate::util::utc_timestamp(),
        "request_id": id,
        "method": method,
        "path": path,
        "route": route,
        "status": status.as_u16(),
        "duration_ms": (elapsed.as_secs_f64() * 1e6).round() / 1000.0,
        "bytes_in": bytes_in,
        "model": header("x-model-name"),
        "version": header("x-model-version"),
    });
    if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
        log::warn!(target: "segctl::access", "{line}");
    } else {
        log::info!(target: "segctl::access", "{line}");
    }
    response
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    log::info!("shutting down: finishing in-flight requests");
}

/// Executes `segctl serve` until SIGINT/SIGTERM. `on_listening` receives the bound address
/// (useful with port 0).
pub fn serve(options: &ServeOptions, on_listening: impl FnOnce(SocketAddr)) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("segctl-http")
        .build()
        .context("failed to start the async runtime")?;
    runtime.block_on(async {
        let address = format!("{}:{}", options.config.host, options.config.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen on {address} (serve.host / serve.port): is another server using it?"))?;
        let local = listener.local_addr()?;
        let state = AppState::new(options);
        let app = router(state.clone(), options.config.max_body_bytes);
        on_listening(local);
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("the HTTP server failed")?;
        state.registry.unload_all();
        log::info!("stopped");
        Ok(())
    })
}

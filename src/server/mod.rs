//! `serve`: the HTTP server (hyper + axum on tokio) over a model repository: routes, limits
//! (body size, pixels, a memory budget, deadlines), connection hygiene (header-read and
//! keep-alive timeouts, a connection cap, a bounded graceful shutdown), browser safety
//! (content types, origins, opt-in CORS), request ids and a structured access log, Prometheus
//! metrics, batching per model version on a shared CPU budget, and hot reload of versions.

pub mod access;
pub mod budget;
mod connection;
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
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use candle_core::Device;

use crate::config::ServeConfig;
use budget::{CpuBudget, MemoryBudget};
use error::ApiError;
use metrics::Metrics;
use registry::Registry;
use worker::BatchSettings;

/// Request limits handlers enforce.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Decoded pixels per request, all images together.
    pub max_pixels: u64,
    /// Images in one `:predict` request.
    pub max_instances: usize,
    pub request_timeout: Duration,
    pub max_json_response_bytes: u64,
    pub max_body_bytes: usize,
    /// A body must have arrived this long after its headers (`serve.body_read_timeout_ms`).
    pub body_read_timeout: Duration,
    /// Slowest average upload rate kept after its first 2 s (`serve.min_body_bytes_per_s`; 0 = none).
    pub min_body_bytes_per_s: u64,
    /// Most scans of a progressive JPEG (`serve.max_jpeg_scans`).
    pub max_jpeg_scans: u32,
    /// Decode JPEGs for the model at a reduced DCT scale (`serve.jpeg_dct_scaling`).
    pub jpeg_dct_scaling: bool,
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub cpu: Arc<CpuBudget>,
    pub memory: Arc<MemoryBudget>,
    cors_origins: Arc<Vec<String>>,
    /// Bearer tokens (`serve.auth_token_file`); none = no authentication.
    tokens: Option<Arc<access::Tokens>>,
    hosts: Arc<access::HostRule>,
    max_header_bytes: usize,
    request_ids: Arc<AtomicU64>,
}

/// What `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: ServeConfig,
    pub repository: PathBuf,
    pub device: Device,
}

/// Cores the server uses (`serve.cpu_threads`, 0 = all).
pub fn cpu_threads(config: &ServeConfig) -> usize {
    if config.cpu_threads == 0 { crate::model::inference::available_cores() } else { config.cpu_threads }
}

impl AppState {
    /// State over `repository`: scans it once (loading starts in the background) and keeps
    /// watching it.
    pub fn new(options: &ServeOptions, tokens: Option<access::Tokens>) -> Self {
        let c = &options.config;
        let metrics = Arc::new(Metrics::default());
        let cpu = CpuBudget::new(cpu_threads(c));
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
            cpu.clone(),
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
                max_json_response_bytes: c.max_json_response_bytes,
                max_body_bytes: c.max_body_bytes,
                body_read_timeout: Duration::from_millis(c.body_read_timeout_ms),
                min_body_bytes_per_s: c.min_body_bytes_per_s,
                max_jpeg_scans: c.max_jpeg_scans,
                jpeg_dct_scaling: c.jpeg_dct_scaling,
            },
            cpu,
            memory: Arc::new(MemoryBudget::new(c.memory_budget_bytes)),
            cors_origins: Arc::new(c.cors_origins.clone()),
            tokens: tokens.map(Arc::new),
            hosts: Arc::new(access::HostRule::new(&c.allowed_hosts, &c.host)),
            max_header_bytes: c.max_header_bytes,
            request_ids: Arc::new(AtomicU64::new(1)),
        }
    }
}

/// `route` with every other method answered by a JSON 405.
fn only(route: MethodRouter<AppState>, allowed: &'static str) -> MethodRouter<AppState> {
    route.fallback(move || async move { ApiError::MethodNotAllowed(format!("method not allowed here: use {allowed}")) })
}

/// Every route, with the middleware applied.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", only(get(handlers::page), "GET"))
        .route("/healthz", only(get(handlers::healthz), "GET"))
        .route("/readyz", only(get(handlers::readyz), "GET"))
        .route("/metrics", only(get(handlers::metrics), "GET"))
        .route("/infer", only(post(handlers::infer), "POST"))
        .route("/v1/models", only(get(handlers::list_models), "GET"))
        .route("/v1/models/{*rest}", any(handlers::models))
        .route("/v2", only(get(handlers::v2::server_metadata), "GET"))
        .route("/v2/health/live", only(get(handlers::v2::live), "GET"))
        .route("/v2/health/ready", only(get(handlers::v2::ready), "GET"))
        .route("/v2/models/{*rest}", any(handlers::v2::models))
        .fallback(handlers::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        // Inside the browser guard: CORS preflights (which carry no credentials) are answered
        // before the token is asked for.
        .layer(middleware::from_fn_with_state(state.clone(), auth_guard))
        // Bodies are read by the handlers within the memory budget (`handlers::read_body`).
        .layer(DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), browser_guard))
        .layer(middleware::from_fn_with_state(state.clone(), host_guard))
        .layer(middleware::from_fn_with_state(state.clone(), header_limit))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            ApiError::Internal("a request handler panicked".into()).into_response()
        }))
        .with_state(state)
}

/// What a connection beyond `serve.max_connections` is answered with: the probes, so that an
/// orchestrator still sees a saturated server as alive (and ready while models are), and a
/// 503 for everything else. Such a connection carries one request.
pub fn probe_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", only(get(handlers::healthz), "GET"))
        .route("/readyz", only(get(handlers::readyz), "GET"))
        .route("/v2/health/live", only(get(handlers::v2::live), "GET"))
        .route("/v2/health/ready", only(get(handlers::v2::ready), "GET"))
        .fallback(|| async {
            ApiError::Overloaded("the server is at its connection limit (serve.max_connections); retry shortly".into())
        })
        .layer(middleware::from_fn_with_state(state.clone(), host_guard))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), access_log))
        .with_state(state)
}

/// Connections beyond `serve.max_connections` accepted for the probes.
const PROBE_CONNECTIONS: usize = 64;

/// Answers 504 when a request takes longer than `serve.request_timeout_ms`.
async fn deadline(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limit = state.limits.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::Timeout(format!("request took longer than {} ms (serve.request_timeout_ms)", limit.as_millis())).into_response(),
    }
}

/// 431 (as JSON) for a header block over `serve.max_header_bytes`.
async fn header_limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let size: usize = request.uri().to_string().len() + request.headers().iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>();
    if size > state.max_header_bytes {
        return ApiError::HeadersTooLarge(format!(
            "the request line and headers are {size} bytes, over the limit of {} (serve.max_header_bytes)",
            state.max_header_bytes
        ))
        .into_response();
    }
    next.run(request).await
}

/// 421 (as JSON) for a `Host` the server does not answer for (`serve.allowed_hosts`).
async fn host_guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string).or_else(|| request.uri().authority().map(|a| a.to_string()));
    if !state.hosts.allows(host.as_deref()) {
        let shown: String = host.as_deref().unwrap_or("(none)").chars().take(100).collect();
        let (_, body) = request.into_parts();
        handlers::discard(body).await;
        return ApiError::MisdirectedRequest(format!("this server does not answer for the host `{shown}` (serve.allowed_hosts)")).into_response();
    }
    next.run(request).await
}

/// 401 (as JSON, with a `WWW-Authenticate: Bearer` challenge) without a valid bearer token,
/// while `serve.auth_token_file` is set; the probes and the page are open.
async fn auth_guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(tokens) = &state.tokens else { return next.run(request).await };
    if access::is_open_route(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request.headers().get(header::AUTHORIZATION).map(|v| v.to_str().ok().and_then(access::bearer));
    let error = match presented {
        Some(Some(token)) if tokens.accepts(token) => return next.run(request).await,
        None => ApiError::Unauthorized { message: "this server needs a bearer token: send `Authorization: Bearer <token>`".into(), invalid_token: false },
        Some(_) => ApiError::Unauthorized { message: "the bearer token is not valid".into(), invalid_token: true },
    };
    let (_, body) = request.into_parts();
    handlers::discard(body).await;
    error.into_response()
}

/// Whether `origin` (`scheme://host[:port]`) names the server itself, as the `Host` header
/// the browser sent.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let Some(host) = host else { return false };
    origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")).is_some_and(|o| o.eq_ignore_ascii_case(host))
}

/// Browser safety: a cross-site page may not drive the API (403 for a foreign `Origin`
/// unless `serve.cors_origins` lists it); listed origins get CORS headers and preflights.
async fn browser_guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let origin = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_string);
    let Some(origin) = origin else { return next.run(request).await };
    let host = request.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    let listed = state.cors_origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(&origin));
    if !listed && same_origin(&origin, host) {
        return next.run(request).await;
    }
    let preflight = request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if !listed {
        if preflight || !matches!(*request.method(), Method::GET | Method::HEAD) {
            return ApiError::Forbidden(format!("requests from the web origin `{origin}` are not allowed (list it in serve.cors_origins)")).into_response();
        }
        return next.run(request).await;
    }
    let mut response = if preflight {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, OPTIONS"));
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type, accept, x-request-id"));
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        r
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("origin"));
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("server-timing, x-model-name, x-model-version, x-request-id"),
    );
    response
}

/// Every error answers JSON: responses of 400 and above that the framework produced as text
/// or empty (method, path and query rejections) get a `{"error": ...}` body.
async fn json_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10).await.map(|b| String::from_utf8_lossy(&b).trim().to_string()).unwrap_or_default();
    let message = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    Response::from_parts(parts, axum::body::Body::from(body))
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
}

/// Executes `segctl serve` until SIGINT/SIGTERM. `on_listening` receives the bound address
/// (useful with port 0) and the models found in the repository (their versions loading).
pub fn serve(options: &ServeOptions, on_listening: impl FnOnce(SocketAddr, Vec<registry::ModelSummary>)) -> Result<()> {
    // A bucket: mirrored locally (first sync before listening, then every poll interval on a
    // thread of its own); the registry watches the mirror like any folder.
    let mirrored;
    let options = match crate::storage::remote(&options.repository)? {
        Some(remote) => {
            let bucket = crate::model_store::BucketRepository::open(remote)?;
            let local = bucket.local.clone();
            let every = Duration::from_millis(options.config.poll_interval_ms.max(50));
            std::thread::Builder::new()
                .name("segctl-bucket-sync".into())
                .spawn(move || loop {
                    std::thread::sleep(every);
                    if let Err(e) = bucket.sync() {
                        log::warn!("model repository `{}`: {e:#}; serving what is loaded", bucket.remote.url());
                    }
                })
                .context("failed to start the bucket watcher")?;
            mirrored = ServeOptions { repository: local, ..options.clone() };
            &mirrored
        }
        None => options,
    };
    let c = &options.config;
    let tokens = match access::Tokens::configured(c.auth_token_file.as_deref()) {
        Some(file) => {
            let tokens = access::Tokens::load(&file)?;
            log::info!("bearer tokens required ({} from `{}`)", tokens.len(), file.display());
            Some(tokens)
        }
        None => None,
    };
    let cores = cpu_threads(c);
    // The runtime only moves bytes; CPU work runs on the blocking pool, bounded to the CPU
    // budget (stages take a token there), and on the model threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.clamp(1, 2))
        .max_blocking_threads(cores + 1)
        .enable_all()
        .thread_name("segctl-http")
        .build()
        .context("failed to start the async runtime")?;
    let result = runtime.block_on(async {
        let address = format!("{}:{}", c.host, c.port);
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen on {address} (serve.host / serve.port): is another server using it?"))?;
        let local = listener.local_addr()?;
        let state = AppState::new(options, tokens);
        let app = router(state.clone());
        on_listening(local, state.registry.list());
        let settings = connection::Settings {
            header_read_timeout: Duration::from_millis(c.header_read_timeout_ms),
            keep_alive_timeout: Duration::from_millis(c.keep_alive_timeout_ms),
            response_write_timeout: Duration::from_millis(c.response_write_timeout_ms),
            max_header_bytes: c.max_header_bytes,
            single_request: false,
        };
        // Beyond the cap, a few connections more for the probes alone, with short timeouts.
        let probe_settings = connection::Settings {
            header_read_timeout: settings.header_read_timeout.min(Duration::from_secs(2)),
            single_request: true,
            ..settings
        };
        let probe_app = probe_router(state.clone());
        let slots = Arc::new(tokio::sync::Semaphore::new(c.max_connections));
        let probe_slots = Arc::new(tokio::sync::Semaphore::new(PROBE_CONNECTIONS));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let signal = shutdown_signal();
        tokio::pin!(signal);
        loop {
            // A slot first: over `serve.max_connections` (and the probes' reserve), new
            // clients wait in the backlog.
            let (slot, probe_only) = tokio::select! {
                biased;
                _ = &mut signal => break,
                slot = slots.clone().acquire_owned() => (slot.expect("the semaphore is never closed"), false),
                slot = probe_slots.clone().acquire_owned() => (slot.expect("the semaphore is never closed"), true),
            };
            let (stream, peer) = tokio::select! {
                _ = &mut signal => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        log::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // A regular slot freed while this one was waiting for a client: use it instead.
            let (slot, probe_only) = match probe_only.then(|| slots.clone().try_acquire_owned().ok()).flatten() {
                Some(regular) => (regular, false),
                None => (slot, probe_only),
            };
            let (app, metrics, stop) = (if probe_only { probe_app.clone() } else { app.clone() }, state.metrics.clone(), stop_rx.clone());
            let settings = if probe_only { probe_settings } else { settings };
            tokio::spawn(async move {
                connection::serve(stream, peer, app, settings, metrics, stop).await;
                drop(slot);
            });
        }
        drop(listener);
        let bound = Duration::from_millis(c.shutdown_timeout_ms);
        log::info!("shutting down: finishing in-flight requests (at most {} ms, serve.shutdown_timeout_ms)", bound.as_millis());
        let _ = stop_tx.send(true);
        let all = u32::try_from(c.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(bound, slots.acquire_many(all)).await.is_err() {
            log::warn!("{} connections still open after {} ms: closing them", c.max_connections - slots.available_permits(), bound.as_millis());
        }
        state.registry.unload_all();
        log::info!("stopped");
        Ok(())
    });
    // Do not wait for blocking tasks of abandoned requests.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

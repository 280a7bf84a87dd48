//! `paligemma serve`: an OpenAI- and ollama-compatible HTTP server. One model is loaded once,
//! on a worker thread that owns the continuous-batching [`Scheduler`]; every HTTP request
//! becomes a scheduler request, so concurrent requests decode together. The prompt is the raw
//! PaliGemma prefix (`detect cat`, `answer en what is this?`): no chat template is applied.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use paligemma::generate::{
    FinishReason, GenerateOptions, Generation, ImageInput, Prompt, Request, RequestId,
    SamplingParams, Scheduler, SchedulerEvent, SchedulerOptions,
};
use paligemma::model::PaliGemma;
use paligemma::processor::image::decode_image_bytes;
use paligemma::tasks::{decode_masks, parse_answer, MaskDecoder};
use paligemma::Error;

/// How the server is set up.
pub(crate) struct ServeOptions {
    pub model: PathBuf,
    pub host: String,
    pub port: u16,
    pub load: super::LoadFlags,
    pub max_binding: Option<u64>,
    pub max_batch: usize,
    pub max_queue: usize,
    pub api_key: Option<String>,
    pub max_body_bytes: usize,
    pub timeout: Duration,
    pub vae: Option<PathBuf>,
}

/// A request as the worker sees it.
struct Job {
    image: Vec<u8>,
    prompt: String,
    options: GenerateOptions,
    events: mpsc::UnboundedSender<JobEvent>,
}

/// What the worker tells a request's handler.
enum JobEvent {
    /// The image decoded: its size in pixels (boxes are given in these).
    Image { width: u32, height: u32 },
    /// A piece of the answer.
    Text(String),
    /// The end: the whole result, or why there is none.
    Done(Result<Answer, ApiError>),
}

/// A finished request: the generation and the objects parsed from it.
struct Answer {
    generation: Generation,
    /// `[{"label", "box": [x_min, y_min, x_max, y_max], "mask"?}]` in pixels of the image;
    /// `mask` (a PNG, base64) only with the mask decoder.
    objects: Value,
}

/// An error answer: status and message, sent as `{"error": {"message", "type"}}`.
#[derive(Debug, Clone)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    /// A library error: the caller's fault (request, image) or the server's.
    fn from_engine(e: &Error) -> Self {
        let status = match e {
            Error::Request(_) | Error::Image { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError {
            status,
            message: e.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => "server_busy",
            s if s.is_client_error() => "invalid_request_error",
            _ => "server_error",
        };
        let code = match self.status {
            StatusCode::BAD_REQUEST => "bad_request",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::SERVICE_UNAVAILABLE => "overloaded",
            StatusCode::GATEWAY_TIMEOUT => "timeout",
            s if s.is_client_error() => "bad_request",
            _ => "internal_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind, "code": code}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// A Prometheus histogram with fixed upper bounds.
struct Histogram {
    bounds: &'static [f64],
    counts: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    fn observe(&self, v: f64) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in self.bounds.iter().enumerate() {
            if v <= *b {
                c.0[i] += 1;
            }
        }
        c.1 += v;
        c.2 += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (b, n) in self.bounds.iter().zip(&c.0) {
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {n}\n"));
        }
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n", c.2));
        out.push_str(&format!("{name}_sum {}\n{name}_count {}\n", c.1, c.2));
    }
}

/// State shared by the handlers and the worker.
struct Shared {
    name: String,
    ready: AtomicBool,
    max_inflight: usize,
    inflight: AtomicUsize,
    queued: AtomicUsize,
    live: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    rejected: AtomicU64,
    cancelled: AtomicU64,
    tokens: AtomicU64,
    ttft: Histogram,
    per_token: Histogram,
    api_key: Option<String>,
    timeout: Duration,
    jobs: Mutex<std_mpsc::Sender<Job>>,
    /// Token strings by id (`▁` shown as a space, as in `Step::text`), for `top_logprobs`.
    vocab: std::sync::OnceLock<Vec<String>>,
}

/// Counts a request in flight until dropped.
struct Inflight(Arc<Shared>);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Shared {
    /// Queue a job, unless the server is loading or full.
    fn submit(
        self: &Arc<Self>,
        image: Vec<u8>,
        prompt: String,
        options: GenerateOptions,
    ) -> Result<(mpsc::UnboundedReceiver<JobEvent>, Inflight), ApiError> {
        if !self.ready.load(Ordering::SeqCst) {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the model is still loading".into(),
            });
        }
        options.validate().map_err(|e| ApiError::from_engine(&e))?;
        let n = self.inflight.fetch_add(1, Ordering::SeqCst);
        let guard = Inflight(self.clone());
        if n >= self.max_inflight {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "{} requests are decoding or waiting, the most this server takes \
                     (--max-batch + --max-queue); retry later",
                    self.max_inflight
                ),
            });
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            image,
            prompt,
            options,
            events: tx,
        };
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: "the model worker has stopped".into(),
            })?;
        Ok((rx, guard))
    }
}

/// A live request on the worker.
struct LiveJob {
    events: mpsc::UnboundedSender<JobEvent>,
    start: Instant,
    first_token: Option<Instant>,
    size: (u32, u32),
}

/// The worker thread: load the model, then feed jobs to the scheduler until the channel
/// closes. `loaded` hears whether the load worked.
fn worker(
    opts: &ServeOptions,
    shared: Arc<Shared>,
    jobs: std_mpsc::Receiver<Job>,
    loaded: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
) {
    let model = match load(opts) {
        Ok(m) => m,
        Err(e) => {
            let _ = loaded.send(Err(e));
            return;
        }
    };
    let vae = match &opts.vae {
        Some(path) => match MaskDecoder::load(model.gpu().clone(), path) {
            Ok(d) => Some(d),
            Err(e) => {
                let _ = loaded.send(Err(e.into()));
                return;
            }
        },
        None => None,
    };
    let sched_opts = SchedulerOptions {
        max_sequences: opts.max_batch,
        ..Default::default()
    };
    let mut scheduler = match Scheduler::new(&model, sched_opts) {
        Ok(s) => s,
        Err(e) => {
            let _ = loaded.send(Err(e.into()));
            return;
        }
    };
    if let Ok(prompts) = model.prompts() {
        let vocab = (0..model.config.text.vocab_size as u32)
            .map(|id| {
                prompts
                    .id_to_token(id)
                    .unwrap_or_default()
                    .replace('▁', " ")
            })
            .collect();
        let _ = shared.vocab.set(vocab);
    }
    shared.ready.store(true, Ordering::SeqCst);
    let _ = loaded.send(Ok(()));
    let mut live: HashMap<RequestId, LiveJob> = HashMap::new();
    loop {
        let mut incoming = Vec::new();
        if scheduler.is_idle() {
            match jobs.recv() {
                Ok(job) => incoming.push(job),
                Err(_) => return,
            }
        }
        incoming.extend(jobs.try_iter());
        for job in incoming {
            if let Some((id, j)) = admit(&model, &mut scheduler, job) {
                live.insert(id, j);
            }
        }
        for (id, j) in &live {
            if j.events.is_closed() {
                scheduler.cancel(*id);
            }
        }
        shared.queued.store(scheduler.queued(), Ordering::Relaxed);
        shared.live.store(scheduler.live(), Ordering::Relaxed);
        if scheduler.is_idle() {
            continue;
        }
        let events = match scheduler.step() {
            Ok(events) => events,
            Err(e) => {
                let err = ApiError::from_engine(&e);
                shared
                    .failures
                    .fetch_add(live.len() as u64, Ordering::Relaxed);
                for (_, j) in live.drain() {
                    let _ = j.events.send(JobEvent::Done(Err(err.clone())));
                }
                match Scheduler::new(&model, sched_opts) {
                    Ok(s) => scheduler = s,
                    Err(_) => return,
                }
                continue;
            }
        };
        for event in events {
            match event {
                SchedulerEvent::Text { id, text } => {
                    if let Some(j) = live.get_mut(&id) {
                        if j.first_token.is_none() {
                            j.first_token = Some(Instant::now());
                            shared.ttft.observe(j.start.elapsed().as_secs_f64());
                        }
                        let _ = j.events.send(JobEvent::Text(text));
                    }
                }
                SchedulerEvent::Finished { id, result } => {
                    let Some(j) = live.remove(&id) else { continue };
                    match &result {
                        Ok(g) if g.finish_reason == FinishReason::Cancelled => {
                            shared.cancelled.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(g) => {
                            shared
                                .tokens
                                .fetch_add(g.completion_tokens as u64, Ordering::Relaxed);
                            if let (Some(t), true) = (j.first_token, g.completion_tokens > 1) {
                                let per =
                                    t.elapsed().as_secs_f64() / (g.completion_tokens - 1) as f64;
                                shared.per_token.observe(per);
                            }
                        }
                        Err(_) => {
                            shared.failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let (w, h) = j.size;
                    let result = result
                        .and_then(|g| {
                            let objects = objects(&g.text, w, h, vae.as_ref())?;
                            Ok(Answer {
                                generation: g,
                                objects,
                            })
                        })
                        .map_err(|e| ApiError::from_engine(&e));
                    let _ = j.events.send(JobEvent::Done(result));
                }
            }
        }
        shared.queued.store(scheduler.queued(), Ordering::Relaxed);
        shared.live.store(scheduler.live(), Ordering::Relaxed);
    }
}

/// Decode a job's image and submit it; a failure is answered at once.
fn admit(model: &PaliGemma, scheduler: &mut Scheduler, job: Job) -> Option<(RequestId, LiveJob)> {
    let fail = |e: &Error| {
        let _ = job
            .events
            .send(JobEvent::Done(Err(ApiError::from_engine(e))));
    };
    let image = match decode_image_bytes(&job.image, std::path::Path::new("the request's image")) {
        Ok(i) => i,
        Err(e) => {
            fail(&e);
            return None;
        }
    };
    let (width, height) = (image.width(), image.height());
    let _ = job.events.send(JobEvent::Image { width, height });
    let request = Request {
        image: ImageInput::Pixels(model.images.preprocess(&image)),
        prompt: Prompt::Text(job.prompt.clone()),
        options: job.options.clone(),
    };
    match scheduler.submit(request) {
        Ok(id) => Some((
            id,
            LiveJob {
                events: job.events,
                start: Instant::now(),
                first_token: None,
                size: (width, height),
            },
        )),
        Err(e) => {
            fail(&e);
            None
        }
    }
}

/// Open the GPU and load the model as every other command does.
fn load(opts: &ServeOptions) -> anyhow::Result<PaliGemma> {
    let gpu = super::open_gpu(opts.max_binding)?;
    super::load_model(gpu, &opts.model, &opts.load)
        .with_context(|| format!("loading {}", opts.model.display()))
}

/// Run the server until interrupted.
pub(crate) fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_async(opts))
}

async fn serve_async(opts: ServeOptions) -> anyhow::Result<()> {
    let name = opts
        .model
        .file_name()
        .map_or("paligemma".into(), |n| n.to_string_lossy().into_owned());
    let (jobs_tx, jobs_rx) = std_mpsc::channel();
    let shared = Arc::new(Shared {
        name,
        ready: AtomicBool::new(false),
        max_inflight: opts.max_batch + opts.max_queue,
        inflight: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
        live: AtomicUsize::new(0),
        requests: AtomicU64::new(0),
        failures: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        cancelled: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        ttft: Histogram::new(&[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0]),
        per_token: Histogram::new(&[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]),
        api_key: opts.api_key.clone(),
        timeout: opts.timeout,
        jobs: Mutex::new(jobs_tx),
        vocab: std::sync::OnceLock::new(),
    });
    let addr: SocketAddr = format!("{}:{}", opts.host, opts.port)
        .parse()
        .with_context(|| format!("not a host:port: {}:{}", opts.host, opts.port))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    eprintln!("listening on http://{}", listener.local_addr()?);
    let max_body = opts.max_body_bytes;
    let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
    let worker_shared = shared.clone();
    std::thread::Builder::new()
        .name("paligemma-worker".into())
        .spawn(move || worker(&opts, worker_shared, jobs_rx, loaded_tx))
        .context("starting the model worker")?;
    let app = router(shared.clone(), max_body);
    // On Ctrl-C or SIGTERM: stop accepting, let the requests in flight finish, exit.
    let server = axum::serve(listener, app).with_graceful_shutdown(async {
        shutdown_signal().await;
        eprintln!("shutting down: finishing the requests in flight");
    });
    let load = async {
        match loaded_rx.await {
            Ok(Ok(())) => {
                eprintln!("model loaded; ready");
                std::future::pending::<anyhow::Result<()>>().await
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(anyhow::anyhow!("the model worker stopped while loading")),
        }
    };
    tokio::select! {
        r = server => r.context("serving"),
        r = load => r,
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn router(shared: Arc<Shared>, max_body: usize) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/api/generate", post(ollama_generate))
        .route("/v1/models", get(models))
        .route("/api/tags", get(tags))
        .route("/metrics", get(metrics))
        .layer(middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(api)
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint: see /v1/chat/completions, /api/generate, \
                          /v1/models, /api/tags, /health, /metrics"
                    .into(),
            }
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared)
}

/// Equal strings, compared in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(s): State<Arc<Shared>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            return ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "missing or wrong API key (Authorization: Bearer KEY)".into(),
            }
            .into_response();
        }
    }
    next.run(req).await
}

async fn health(State(s): State<Arc<Shared>>) -> Response {
    if s.ready.load(Ordering::SeqCst) {
        axum::Json(json!({"status": "ok", "model": s.name})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn models(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"object": "list", "data": [
        {"id": s.name, "object": "model", "created": 0, "owned_by": "paligemma-wgpu"}
    ]}))
    .into_response()
}

async fn tags(State(s): State<Arc<Shared>>) -> Response {
    axum::Json(json!({"models": [{"name": s.name, "model": s.name,
        "details": {"family": "paligemma", "format": "safetensors"}}]}))
    .into_response()
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut out = String::new();
    let counters = [
        (
            "paligemma_requests_total",
            "Requests accepted.",
            &s.requests,
        ),
        (
            "paligemma_request_failures_total",
            "Requests that failed after acceptance.",
            &s.failures,
        ),
        (
            "paligemma_requests_rejected_total",
            "Requests refused because the server was full.",
            &s.rejected,
        ),
        (
            "paligemma_requests_cancelled_total",
            "Requests cancelled because their client left.",
            &s.cancelled,
        ),
        (
            "paligemma_tokens_generated_total",
            "Tokens generated.",
            &s.tokens,
        ),
    ];
    for (name, help, v) in counters {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            v.load(Ordering::Relaxed)
        ));
    }
    for (name, help, v) in [
        (
            "paligemma_queue_depth",
            "Requests waiting for a slot.",
            &s.queued,
        ),
        ("paligemma_live_sequences", "Sequences decoding.", &s.live),
    ] {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}\n",
            v.load(Ordering::Relaxed)
        ));
    }
    s.ttft.render(
        "paligemma_time_to_first_token_seconds",
        "From admission to the first token.",
        &mut out,
    );
    s.per_token.render(
        "paligemma_time_per_output_token_seconds",
        "Mean time of each token after the first, per request.",
        &mut out,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad("the body must be a JSON object"));
    }
    Ok(v)
}

/// An optional number field, checked.
fn number(v: &Value, key: &str) -> Result<Option<f64>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("\"{key}\" must be a number"))),
    }
}

/// An optional non-negative integer field, checked.
fn count(v: &Value, key: &str) -> Result<Option<usize>, ApiError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| ApiError::bad(format!("\"{key}\" must be a non-negative integer"))),
    }
}

/// `stop`: a string or a list of strings.
fn stops(v: &Value) -> Result<Vec<String>, ApiError> {
    match v.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| ApiError::bad("\"stop\" must hold strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::bad(
            "\"stop\" must be a string or a list of strings",
        )),
    }
}

fn decode_base64(data: &str, what: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::bad(format!("{what} is not valid base64: {e}")))
}

/// The image bytes of an `image_url` (only `data:image/...;base64,` URLs).
fn data_url(url: &str) -> Result<Vec<u8>, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::bad(
            "image_url must be a data:image/...;base64, URL; this server does not fetch \
             http(s) or file URLs",
        ));
    };
    let Some((meta, data)) = rest.split_once(',') else {
        return Err(ApiError::bad("the data: URL has no comma before its data"));
    };
    if !meta.ends_with(";base64") {
        return Err(ApiError::bad(
            "the data: URL must be base64 (data:image/png;base64,...)",
        ));
    }
    decode_base64(data, "the data: URL")
}

/// The image and prompt text of the last user message of an OpenAI chat request.
fn chat_input(v: &Value) -> Result<(Vec<u8>, String), ApiError> {
    let messages = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("\"messages\" must be a list"))?;
    let last = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .ok_or_else(|| ApiError::bad("\"messages\" has no user message"))?;
    let parts = match last.get("content") {
        Some(Value::Array(parts)) => parts.clone(),
        Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
        _ => return Err(ApiError::bad("the user message has no content")),
    };
    let (mut image, mut text) = (None, Vec::new());
    for part in &parts {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => text.push(
                part.get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| ApiError::bad("a text part needs \"text\""))?
                    .to_string(),
            ),
            Some("image_url") => {
                let url = match part.get("image_url") {
                    Some(Value::String(u)) => u.as_str(),
                    Some(o) => o.get("url").and_then(Value::as_str).unwrap_or(""),
                    None => "",
                };
                if image.is_some() {
                    return Err(ApiError::bad(
                        "this server takes one image_url part per request (its boxes are in \
                         that image's pixels); a prompt about several images runs through \
                         `paligemma generate` with --image repeated, or the library's \
                         ImageInput::Many",
                    ));
                }
                image = Some(data_url(url)?);
            }
            other => {
                return Err(ApiError::bad(format!(
                    "unsupported content part type {}",
                    other.unwrap_or("(none)")
                )))
            }
        }
    }
    let image = image.ok_or_else(|| {
        ApiError::bad("the user message needs an image_url part: PaliGemma answers about an image")
    })?;
    let prompt = text.join("\n");
    if prompt.trim().is_empty() {
        return Err(ApiError::bad(
            "the user message needs a text part: the PaliGemma prompt (e.g. \"caption en\")",
        ));
    }
    Ok((image, prompt))
}

fn finish_reason(g: &Generation) -> &'static str {
    match g.finish_reason {
        FinishReason::Length => "length",
        _ => "stop",
    }
}

/// The valid objects of a detection / segmentation answer, boxes in pixels of the original
/// `width × height` image; with the mask decoder, the masks of those with `<seg>` tokens as
/// 8-bit PNGs of the whole image (255 = object), base64.
fn objects(
    text: &str,
    width: u32,
    height: u32,
    vae: Option<&MaskDecoder>,
) -> paligemma::Result<Value> {
    let objs: Vec<_> = parse_answer(text, width, height)
        .into_iter()
        .filter(|o| o.valid)
        .collect();
    let masks = match vae {
        Some(vae) => decode_masks(vae, &objs, width, height)?,
        None => vec![None; objs.len()],
    };
    let mut out = Vec::new();
    for (o, mask) in objs.iter().zip(masks) {
        let b = o.bbox;
        let mut v = json!({"label": o.label, "box": [b.x_min, b.y_min, b.x_max, b.y_max]});
        if let Some(gray) = mask {
            let mut png = std::io::Cursor::new(Vec::new());
            image::DynamicImage::ImageLuma8(gray)
                .write_to(&mut png, image::ImageFormat::Png)
                .map_err(|e| Error::Request(format!("encoding a mask PNG: {e}")))?;
            v["mask"] = json!(base64::engine::general_purpose::STANDARD.encode(png.get_ref()));
        }
        out.push(v);
    }
    Ok(Value::Array(out))
}

/// OpenAI's `logprobs` object: each generated token with its log-probability and the best
/// alternatives (`token` from `vocab` when the model has a tokenizer, and its `id`).
fn logprobs(g: &Generation, vocab: Option<&Vec<String>>) -> Value {
    let token = |id: u32| {
        vocab
            .and_then(|v| v.get(id as usize))
            .cloned()
            .unwrap_or_default()
    };
    let content: Vec<Value> = g
        .steps
        .iter()
        .map(|st| {
            let top: Vec<Value> = st
                .top
                .iter()
                .map(|&(id, lp)| json!({"token": token(id), "id": id, "logprob": lp}))
                .collect();
            json!({"token": st.text, "id": st.id, "logprob": st.logprob, "top_logprobs": top})
        })
        .collect();
    json!({ "content": content })
}

/// OpenAI's `usage` object.
fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
        "total_tokens": g.prompt_tokens + g.completion_tokens,
    })
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The most alternatives a token's `top_logprobs` may ask for (OpenAI's limit).
const MAX_TOP_LOGPROBS: usize = 20;

static COMPLETION_ID: AtomicU64 = AtomicU64::new(1);

/// Wait for the end of a job, ignoring its text pieces; the image size comes along.
async fn collect(
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    timeout: Duration,
) -> Result<(Answer, u32, u32), ApiError> {
    let wait = async {
        let (mut w, mut h) = (0, 0);
        while let Some(event) = rx.recv().await {
            match event {
                JobEvent::Image { width, height } => (w, h) = (width, height),
                JobEvent::Text(_) => {}
                JobEvent::Done(result) => return result.map(|g| (g, w, h)),
            }
        }
        Err(ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: "the model worker dropped the request".into(),
        })
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            message: format!(
                "no answer within {} s; the request was cancelled",
                timeout.as_secs()
            ),
        })?
}

/// A streamed body from a job's events: `frame` turns each event into bytes to send (or
/// nothing), and returns whether the stream is over.
fn stream_body(
    rx: mpsc::UnboundedReceiver<JobEvent>,
    guard: Inflight,
    frame: impl FnMut(JobEvent) -> (Option<String>, bool) + Send + 'static,
) -> Body {
    let state = (rx, guard, frame, false);
    let s = futures::stream::unfold(state, |(mut rx, guard, mut frame, over)| async move {
        if over {
            return None;
        }
        loop {
            let event = rx.recv().await?;
            let (bytes, done) = frame(event);
            if let Some(b) = bytes {
                return Some((
                    Ok::<_, std::convert::Infallible>(Bytes::from(b)),
                    (rx, guard, frame, done),
                ));
            }
            if done {
                return None;
            }
        }
    });
    Body::from_stream(s)
}

/// The body of a POST, or the error axum found reading it (413 over the limit) as JSON.
fn body_or_error(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError {
        status: e.status(),
        message: e.body_text(),
    })
}

async fn chat_completions(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match async { chat(s, body_or_error(body)?).await }.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(s: Arc<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let v = parse_body(&body)?;
    let (image, prompt) = chat_input(&v)?;
    let want_logprobs = v.get("logprobs").and_then(Value::as_bool) == Some(true);
    let top = if want_logprobs {
        count(&v, "top_logprobs")?.unwrap_or(0)
    } else {
        0
    };
    if top > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad(format!(
            "\"top_logprobs\" must be 0 to {MAX_TOP_LOGPROBS}, got {top}"
        )));
    }
    let max_tokens = count(&v, "max_completion_tokens")?
        .or(count(&v, "max_tokens")?)
        .unwrap_or(GenerateOptions::default().max_new_tokens);
    let options = GenerateOptions {
        max_new_tokens: max_tokens,
        sampling: SamplingParams {
            temperature: number(&v, "temperature")?.unwrap_or(0.0) as f32,
            top_k: 0,
            top_p: number(&v, "top_p")?.unwrap_or(1.0) as f32,
            seed: count(&v, "seed")?.unwrap_or(0) as u64,
        },
        top_logprobs: top,
        stop: stops(&v)?,
        ..Default::default()
    };
    let stream = v.get("stream").and_then(Value::as_bool) == Some(true);
    let (rx, guard) = s.submit(image, prompt, options)?;
    let id = format!("chatcmpl-{}", COMPLETION_ID.fetch_add(1, Ordering::Relaxed));
    let created = now_secs();
    let model = s.name.clone();
    if !stream {
        let (answer, w, h) = collect(rx, s.timeout).await?;
        drop(guard);
        let g = &answer.generation;
        let mut choice = json!({
            "index": 0,
            "message": {"role": "assistant", "content": g.text},
            "finish_reason": finish_reason(g),
        });
        if want_logprobs {
            choice["logprobs"] = logprobs(g, s.vocab.get());
        }
        let body = json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": usage(g),
            "paligemma": {"objects": answer.objects, "image_size": [w, h]},
        });
        return Ok(axum::Json(body).into_response());
    }
    // The last chunk also carries `usage` (as OpenAI's `stream_options.include_usage` asks)
    // and the parsed objects.
    let chunk = move |delta: Value, finish: Value, last: Option<(Value, Value, [u32; 2])>| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        });
        if let Some((usage, objects, size)) = last {
            c["usage"] = usage;
            c["paligemma"] = json!({"objects": objects, "image_size": size});
        }
        format!("data: {c}\n\n")
    };
    let (mut first, mut w, mut h) = (true, 0, 0);
    let body = stream_body(rx, guard, move |event| match event {
        JobEvent::Image { width, height } => {
            (w, h) = (width, height);
            (None, false)
        }
        JobEvent::Text(t) => {
            let delta = if first {
                first = false;
                json!({"role": "assistant", "content": t})
            } else {
                json!({"content": t})
            };
            (Some(chunk(delta, Value::Null, None)), false)
        }
        JobEvent::Done(Ok(answer)) => {
            let g = &answer.generation;
            let usage = usage(g);
            let objects = answer.objects;
            let last = chunk(
                json!({}),
                json!(finish_reason(g)),
                Some((usage, objects, [w, h])),
            );
            (Some(format!("{last}data: [DONE]\n\n")), true)
        }
        JobEvent::Done(Err(e)) => {
            let err = json!({"error": {"message": e.message}});
            (Some(format!("data: {err}\n\ndata: [DONE]\n\n")), true)
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response())
}

/// `secs` since the Unix epoch as an RFC 3339 UTC time (ollama's `created_at`).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn ollama_generate(
    State(s): State<Arc<Shared>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    match async { ollama(s, body_or_error(body)?).await }.await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn ollama(s: Arc<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let started = Instant::now();
    let v = parse_body(&body)?;
    let prompt = v
        .get("prompt")
        .and_then(Value::as_str)
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| {
            ApiError::bad("\"prompt\" must be the PaliGemma prompt, e.g. \"caption en\"")
        })?
        .to_string();
    let images = v
        .get("images")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::bad("\"images\" must be a list holding one base64 image"))?;
    if images.len() != 1 {
        return Err(ApiError::bad(format!(
            "this server takes exactly one image per request (its boxes are in that \
             image's pixels), got {}; a prompt about several images runs through `paligemma \
             generate` with --image repeated, or the library's ImageInput::Many",
            images.len()
        )));
    }
    let image = decode_base64(
        images[0]
            .as_str()
            .ok_or_else(|| ApiError::bad("\"images\" must hold base64 strings"))?,
        "the image",
    )?;
    let o = v.get("options").cloned().unwrap_or(json!({}));
    let options = GenerateOptions {
        max_new_tokens: count(&o, "num_predict")?
            .unwrap_or(GenerateOptions::default().max_new_tokens),
        sampling: SamplingParams {
            temperature: number(&o, "temperature")?.unwrap_or(0.0) as f32,
            top_k: count(&o, "top_k")?.unwrap_or(0),
            top_p: number(&o, "top_p")?.unwrap_or(1.0) as f32,
            seed: count(&o, "seed")?.unwrap_or(0) as u64,
        },
        stop: stops(&o)?,
        ..Default::default()
    };
    let stream = v.get("stream").and_then(Value::as_bool) != Some(false);
    let (rx, guard) = s.submit(image, prompt, options)?;
    let model = s.name.clone();
    let fin = move |g: &Generation, model: &str, response: &str| {
        let ns = |x: f64| (x * 1e9) as u64;
        let decode_s = if g.timings.decode_tok_s > 0.0 && g.completion_tokens > 1 {
            (g.completion_tokens - 1) as f64 / g.timings.decode_tok_s
        } else {
            0.0
        };
        json!({
            "model": model,
            "created_at": rfc3339(now_secs()),
            "response": response,
            "done": true,
            "done_reason": finish_reason(g),
            "total_duration": ns(started.elapsed().as_secs_f64()),
            "load_duration": 0,
            "prompt_eval_count": g.prompt_tokens,
            "prompt_eval_duration": ns(g.timings.vision_s + g.timings.prefill_s),
            "eval_count": g.completion_tokens,
            "eval_duration": ns(decode_s),
        })
    };
    if !stream {
        let (answer, _, _) = collect(rx, s.timeout).await?;
        drop(guard);
        let g = &answer.generation;
        return Ok(axum::Json(fin(g, &model, &g.text)).into_response());
    }
    let body = stream_body(rx, guard, move |event| match event {
        JobEvent::Image { .. } => (None, false),
        JobEvent::Text(t) => {
            let line = json!({"model": model, "created_at": rfc3339(now_secs()),
                "response": t, "done": false});
            (Some(format!("{line}\n")), false)
        }
        JobEvent::Done(Ok(a)) => (Some(format!("{}\n", fin(&a.generation, &model, ""))), true),
        JobEvent::Done(Err(e)) => (Some(format!("{}\n", json!({"error": e.message}))), true),
    });
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_083_199), "2026-11-30T23:59:59Z");
    }

    #[test]
    fn keys_compare_whole() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secre"));
    }

    #[test]
    fn data_urls_and_chat_parts() {
        assert_eq!(data_url("data:image/png;base64,aGk=").unwrap(), b"hi");
        assert!(data_url("https://x/y.png")
            .unwrap_err()
            .message
            .contains("data:image"));
        let v = json!({"messages": [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
                {"type": "text", "text": "detect cat"}
            ]}
        ]});
        let (image, prompt) = chat_input(&v).unwrap();
        assert_eq!(
            (image.as_slice(), prompt.as_str()),
            (&b"hi"[..], "detect cat")
        );
        let part = json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}});
        let text = json!({"type": "text", "text": "caption en"});
        let two = json!({"messages": [{"role": "user", "content": [part, part, text]}]});
        let e = chat_input(&two).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(
            e.message.contains("one image_url part per request")
                && e.message.contains("--image repeated"),
            "{}",
            e.message
        );
        let no_image = json!({"messages": [{"role": "user", "content": "caption en"}]});
        assert!(chat_input(&no_image)
            .unwrap_err()
            .message
            .contains("image_url"));
    }

    #[test]
    fn segment_answers_carry_their_masks_with_the_decoder() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae");
        let answer = std::fs::read_to_string(dir.join("ref_answer.txt")).unwrap();
        let (w, h) = (300, 200);
        let plain = objects(&answer, w, h, None).unwrap();
        let gpu = paligemma::gpu::Gpu::new(Default::default()).unwrap();
        let vae = MaskDecoder::load(gpu, &dir.join("vae-random.npz")).unwrap();
        let with = objects(&answer, w, h, Some(&vae)).unwrap();
        let (plain, with) = (plain.as_array().unwrap(), with.as_array().unwrap());
        assert_eq!(plain.len(), with.len());
        assert!(plain.iter().all(|o| o.get("mask").is_none()));
        let parsed: Vec<_> = parse_answer(&answer, w, h)
            .into_iter()
            .filter(|o| o.valid)
            .collect();
        let mut masks = 0;
        for (o, p) in with.iter().zip(&parsed) {
            assert_eq!(o["label"], p.label.as_str());
            match (o.get("mask"), p.seg_codes) {
                (Some(m), Some(_)) => {
                    let png = base64::engine::general_purpose::STANDARD
                        .decode(m.as_str().unwrap())
                        .unwrap();
                    let img = image::load_from_memory(&png).unwrap().to_luma8();
                    assert_eq!(img.dimensions(), (w, h));
                    // Nothing outside the box.
                    let [x0, y0, x1, y1] = p.bbox.pixel_rect(w, h);
                    assert!(img.enumerate_pixels().all(
                        |(x, y, v)| v[0] == 0 || (x0..x1).contains(&x) && (y0..y1).contains(&y)
                    ));
                    masks += 1;
                }
                (None, None) => {}
                other => panic!("mask and <seg> tokens disagree: {other:?}"),
            }
        }
        assert!(masks >= 2, "{masks} masks");
    }
}

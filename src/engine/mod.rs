//! The inference engine: the only module that touches `llama-cpp-2`.
//!
//! One dedicated thread ([`scheduler`]) owns the llama.cpp context and runs continuous batching;
//! async code reaches it through a bounded channel of [`Job`]s and gets [`Event`]s back on a
//! bounded channel per job. Dropping a job's event receiver cancels it within one decode step.
//! Prompts are formatted and tokenized here, outside the thread, so a prompt that cannot fit is
//! refused with its token counts before any generation.

pub mod echo;
pub mod embed;
mod generator;
pub mod grammar;
mod prefix;
mod scheduler;
pub mod text;
pub mod upstream;

pub use generator::{Generate, Generation};

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot};

pub use crate::api::{FinishReason, Prompt, Sampling, StatsSnapshot, ValidGenerate};
pub use crate::config::{GeneratorKind, MatmulKernel};

/// Time per word of the echo generator.
const ECHO_TOKEN_DELAY: std::time::Duration = std::time::Duration::from_millis(10);

/// Starts the configured generator: the model's engine, or the echo stand-in.
pub async fn start_generator(
    config: EngineConfig,
    kind: GeneratorKind,
) -> Result<Arc<dyn Generate>, EngineError> {
    Ok(match kind {
        GeneratorKind::Llama => Arc::new(Engine::start(config).await?),
        GeneratorKind::Openai => {
            let url = config.upstream_url.clone().ok_or_else(|| {
                EngineError::Invalid("the openai backend needs --upstream-url".into())
            })?;
            Arc::new(
                upstream::Upstream::start(upstream::UpstreamConfig {
                    url,
                    key: config.upstream_key.clone(),
                    model_id: config.model_id.clone(),
                    slots: config.slots,
                    max_queued: config.max_queued,
                    stall_limit: config.stall_limit,
                    head_timeout: config.upstream_timeout,
                })
                .await?,
            )
        }
        GeneratorKind::Echo => Arc::new(echo::Echo::new(echo::EchoConfig {
            // No model is loaded: no GGUF name to take.
            model_id: config.served_id(None),
            slots: config.slots,
            ctx_per_slot: config.ctx_per_slot,
            max_queued: config.max_queued,
            token_delay: ECHO_TOKEN_DELAY,
            stall_limit: config.stall_limit,
        })),
    })
}

/// How the engine is built; from the infer role's settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub model: PathBuf,
    /// `None`: the GGUF's own name (see [`crate::api::model_id_from`]).
    pub model_id: Option<String>,
    /// The GGUF that embeds; `None`: `model`.
    pub embedding_model: Option<PathBuf>,
    pub slots: u32,
    pub ctx_per_slot: u32,
    pub batch_size: u32,
    /// 0: one per available core.
    pub threads: u32,
    pub matmul_kernel: MatmulKernel,
    pub n_gpu_layers: u32,
    /// A llama.cpp built-in template used when the GGUF carries none.
    pub chat_template: String,
    pub max_queued: usize,
    /// Busy with no decode step for this long: the engine is stalled.
    pub stall_limit: std::time::Duration,
    /// Tokens of finished sequences whose KV is kept for reuse by later prompts; 0: off.
    pub prefix_cache_tokens: u32,
    /// The OpenAI-compatible server the `openai` backend forwards to, and its key.
    pub upstream_url: Option<String>,
    pub upstream_key: Option<String>,
    pub upstream_timeout: std::time::Duration,
}

impl EngineConfig {
    /// The id the API serves the model under: the configured `model_id`, else the GGUF's
    /// `general.name` normalised, else the file's stem normalised.
    fn served_id(&self, gguf_name: Option<&str>) -> String {
        if let Some(id) = &self.model_id {
            return id.clone();
        }
        gguf_name
            .map(crate::api::model_id_from)
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| {
                let stem = self.model.file_stem().unwrap_or_default();
                crate::api::model_id_from(&stem.to_string_lossy())
            })
    }

    pub fn from_settings(s: &crate::config::Settings) -> Self {
        EngineConfig {
            model: s.model.clone(),
            model_id: s.model_id.clone(),
            embedding_model: s.embedding_model.clone(),
            slots: s.slots,
            ctx_per_slot: s.ctx_per_slot,
            batch_size: s.batch_size,
            threads: s.threads,
            matmul_kernel: s.matmul_kernel,
            n_gpu_layers: s.n_gpu_layers,
            chat_template: s.chat_template.clone(),
            max_queued: s.max_queued_sequences,
            stall_limit: std::time::Duration::from_secs(s.engine_stall_secs),
            prefix_cache_tokens: s.prefix_cache_tokens,
            upstream_url: s.upstream_url.clone(),
            upstream_key: s.upstream_key.clone(),
            upstream_timeout: std::time::Duration::from_secs(s.upstream_timeout_secs),
        }
    }
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum EngineError {
    #[error("cannot load model {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("This model's maximum context length is {limit} tokens. However, you requested {total} tokens ({prompt} in the prompt, {completion} for the completion). Please reduce the length of the prompt or max_tokens.")]
    ContextLength {
        limit: u32,
        prompt: u32,
        completion: u32,
        total: u32,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{queued} requests are already waiting for a slot; retry shortly")]
    Overloaded { queued: usize },
    #[error("inference failed: {0}")]
    Decode(String),
    #[error("the inference engine has stopped")]
    Stopped,
    /// The upstream engine (the `openai` backend) refused the request.
    #[error("the upstream engine answered {status}: {message}")]
    Upstream { status: u16, message: String },
    /// The upstream engine cannot be reached.
    #[error("{0}")]
    Unavailable(String),
}

/// A tokenized prompt that fits its slot, ready for [`Engine::submit`].
pub struct Prepared {
    tokens: Vec<LlamaToken>,
    max_tokens: u32,
    stop: Vec<String>,
    sampling: Sampling,
    /// What the output must follow (`response_format`), compiled already.
    grammar: Option<llguidance::Matcher>,
    /// Alternatives per token when log-probabilities are asked for.
    logprobs: Option<u8>,
    /// Choices: the prompt is decoded once, then forked.
    n: u8,
}

impl Prepared {
    pub fn prompt_tokens(&self) -> u32 {
        self.tokens.len() as u32
    }
}

/// What a job reports, in order: deltas, then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The job got a slot: generation has begun.
    Started,
    Delta(String),
    /// The log-probabilities of the tokens whose text comes in the next `Delta`.
    Logprobs(Vec<crate::api::TokenLogprob>),
    /// An event of choice 1.. of a request with `n` > 1 (choice 0's come unwrapped).
    Choice(u8, Box<Event>),
    Done {
        finish_reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// Prompt tokens whose KV came from the prefix cache.
        cached_tokens: u32,
    },
    Error(String),
}

struct Job {
    prepared: Prepared,
    events: mpsc::Sender<Event>,
    submitted: std::time::Instant,
}

/// Live counters of the engine.
#[derive(Default, Debug)]
pub struct Stats {
    pub active: AtomicU64,
    pub queued: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub decode_steps: AtomicU64,
    /// Prompt tokens served from the prefix cache instead of decoded.
    pub cached_tokens: AtomicU64,
    /// Tokens the prefix cache holds now.
    pub cache_held_tokens: AtomicU64,
    pub ttft: std::sync::Mutex<crate::api::Histogram>,
}

/// A handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    model: Arc<LlamaModel>,
    info: Arc<crate::api::ModelInfo>,
    template: Arc<LlamaChatTemplate>,
    pub stats: Arc<Stats>,
    config: Arc<EngineConfig>,
    embedder: Arc<embed::Embedder>,
    /// What answers embeddings: `model`, or the `embedding_model` setting's GGUF.
    embedding_model: Arc<LlamaModel>,
    /// Built on a thread of its own after the model loads (most of a second: the vocabulary's
    /// trie and llguidance's token slices), so the worker does not wait for it to start.
    grammars: Arc<OnceLock<Result<grammar::Grammars, String>>>,
}

/// llama.cpp's backend may be initialised once per process.
fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| EngineError::Load {
            path: String::new(),
            reason: e.clone(),
        })
}

impl Engine {
    /// Loads the model and starts the engine thread; returns once the context exists.
    pub async fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        let path = config.model.display().to_string();
        let load_err = |reason: String| EngineError::Load {
            path: path.clone(),
            reason,
        };
        if !config.model.is_file() {
            return Err(load_err(
                "no such file: `meshd model pull gemma3-270m` fetches the default model (`meshd model list` \
                 names others), or pass --model PATH"
                    .into(),
            ));
        }
        let backend = backend()?;
        let matmul = select_matmul_kernel(config.matmul_kernel);
        let cfg = config.clone();
        if let Some(p) = config.embedding_model.as_ref().filter(|p| !p.is_file()) {
            return Err(EngineError::Load {
                path: p.display().to_string(),
                reason: "no such file (the `embedding_model` setting)".into(),
            });
        }
        let (model, embedding_model) = tokio::task::spawn_blocking(move || {
            let params = LlamaModelParams::default().with_n_gpu_layers(cfg.n_gpu_layers);
            let model = LlamaModel::load_from_file(backend, &cfg.model, &params)
                .map_err(|e| e.to_string())?;
            let embedding_model = match &cfg.embedding_model {
                None => None,
                Some(path) => Some(
                    LlamaModel::load_from_file(backend, path, &params)
                        .map_err(|e| format!("the embedding model {}: {e}", path.display()))?,
                ),
            };
            Ok::<_, String>((model, embedding_model))
        })
        .await
        .map_err(|e| load_err(e.to_string()))?
        .map_err(load_err)?;
        let model = Arc::new(model);
        let embedding_model = embedding_model.map_or_else(|| Arc::clone(&model), Arc::new);
        let grammars = Arc::new(OnceLock::new());
        let (cell, for_grammars) = (Arc::clone(&grammars), Arc::clone(&model));
        std::thread::Builder::new()
            .name("meshd-grammars".into())
            .spawn(move || {
                let _ = cell.set(grammar::Grammars::new(&for_grammars));
            })
            .map_err(|e| load_err(e.to_string()))?;
        let template = match model.chat_template(None) {
            Ok(t) => t,
            Err(_) => LlamaChatTemplate::new(&config.chat_template)
                .map_err(|e| EngineError::Invalid(format!("chat_template: {e}")))?,
        };
        let (jobs, rx) = mpsc::channel(config.max_queued.max(1));
        let stats = Arc::new(Stats::default());
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_model = Arc::clone(&model);
        let thread_stats = Arc::clone(&stats);
        let thread_cfg = config.clone();
        let n_swa = sliding_window(&model);
        std::thread::Builder::new()
            .name("meshd-engine".into())
            .spawn(move || {
                scheduler::run(
                    backend,
                    thread_model,
                    thread_cfg,
                    n_swa,
                    rx,
                    thread_stats,
                    ready_tx,
                )
            })
            .map_err(|e| load_err(e.to_string()))?;
        ready_rx
            .await
            .map_err(|_| EngineError::Stopped)?
            .map_err(load_err)?;
        tracing::info!(
            model = %path,
            slots = config.slots,
            ctx_per_slot = config.ctx_per_slot,
            params = model.n_params(),
            matmul,
            "model loaded"
        );
        let info = Arc::new(model_info(&model, &config));
        tracing::info!(id = %info.id, quantization = %info.quantization, "serving the model");
        Ok(Engine {
            jobs,
            model,
            info,
            template: Arc::new(template),
            stats,
            config: Arc::new(config),
            embedder: Arc::new(embed::Embedder::new()),
            embedding_model,
            grammars,
        })
    }

    pub fn model_id(&self) -> &str {
        &self.info.id
    }

    /// Tokenizes and checks embedding inputs, then embeds them on the embedding thread.
    pub async fn embed(
        &self,
        inputs: &[crate::api::EmbedInput],
    ) -> Result<(Vec<Vec<f32>>, u32), EngineError> {
        use crate::api::EmbedInput;
        let vocab = self.embedding_model.vocab();
        let n_vocab = self.embedding_model.n_vocab() as u32;
        // An embedding model with learned positions (BERT's 512) has no place for more.
        let most = embed::MAX_INPUT_TOKENS.min(self.embedding_model.n_ctx_train() as usize);
        let mut all = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let tokens = match input {
                EmbedInput::Text(t) => vocab.tokenize(t.as_bytes(), true, false),
                EmbedInput::Tokens(ids) => {
                    if let Some(bad) = ids.iter().find(|t| **t >= n_vocab) {
                        return Err(EngineError::Invalid(format!(
                            "input[{i}]: token {bad} is not in the vocabulary (0..{n_vocab})"
                        )));
                    }
                    ids.iter().map(|t| LlamaToken::new(*t as i32)).collect()
                }
            };
            if tokens.is_empty() || tokens.len() > most {
                return Err(EngineError::Invalid(format!(
                    "input[{i}] is {} tokens: each input must be 1 to {most}",
                    tokens.len()
                )));
            }
            all.push(tokens);
        }
        let read = all.iter().map(Vec::len).sum::<usize>() as u32;
        let threads = match self.config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as i32),
            n => n as i32,
        };
        let vectors = self
            .embedder
            .embed(backend()?, &self.embedding_model, threads, all)
            .await?;
        Ok((vectors, read))
    }

    /// Formats and tokenizes a prompt and checks it fits its slot with `max_tokens` to spare
    /// (`None`: whatever room is left).
    pub fn prepare(&self, request: &ValidGenerate) -> Result<Prepared, EngineError> {
        let (max_tokens, stop, sampling) = (
            request.max_tokens(),
            request.stop().to_vec(),
            request.sampling().clone(),
        );
        let vocab = self.model.vocab();
        let tokens = match request.prompt() {
            Prompt::Text { text } => vocab.tokenize(text.as_bytes(), true, false),
            Prompt::Chat { messages } => {
                // Content must stay content: text that tokenizes to control tokens (a forged
                // `<end_of_turn>`) would let a user write the template's turns.
                for (i, m) in messages.iter().enumerate() {
                    let special = vocab.tokenize(m.content.as_bytes(), false, true);
                    let plain = vocab.tokenize(m.content.as_bytes(), false, false);
                    if special != plain {
                        return Err(EngineError::Invalid(format!(
                            "messages[{i}].content contains control-token text (such as <end_of_turn>)"
                        )));
                    }
                }
                let chat = messages
                    .iter()
                    .map(|m| LlamaChatMessage::new(m.role.clone(), m.content.clone()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| EngineError::Invalid(format!("messages: {e}")))?;
                let text = self
                    .model
                    .apply_chat_template(&self.template, &chat, true)
                    .map_err(|e| {
                        EngineError::Invalid(format!("cannot apply the chat template: {e}"))
                    })?;
                vocab.tokenize(text.as_bytes(), true, true)
            }
        };
        if tokens.is_empty() {
            return Err(EngineError::Invalid("the prompt is empty".into()));
        }
        let max_tokens = fit(self.config.ctx_per_slot, tokens.len() as u32, max_tokens)?;
        if u32::from(request.n()) > self.config.slots {
            return Err(EngineError::Invalid(format!(
                "`n` of {} is more than this worker's {} slots",
                request.n(),
                self.config.slots
            )));
        }
        let grammar = request
            .format()
            .map(|f| match self.grammars.wait() {
                // Waits only for a structured request in the first second after the start.
                Ok(grammars) => grammars.compile(f),
                Err(e) => Err(EngineError::Decode(format!("structured outputs: {e}"))),
            })
            .transpose()?;
        Ok(Prepared {
            tokens,
            max_tokens,
            stop,
            sampling,
            grammar,
            logprobs: request.logprobs(),
            n: request.n(),
        })
    }

    /// Queues a prepared job; events arrive on the returned receiver. Refused at once when the
    /// queue is full. Drop the receiver to cancel.
    pub fn submit(&self, prepared: Prepared) -> Result<mpsc::Receiver<Event>, EngineError> {
        let (events, rx) = mpsc::channel(256);
        self.jobs
            .try_send(Job {
                prepared,
                events,
                submitted: std::time::Instant::now(),
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => EngineError::Overloaded {
                    queued: self.config.max_queued,
                },
                mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
            })?;
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        Ok(rx)
    }

    /// Decode steps so far, and whether the engine holds work: what a stall is judged on.
    pub fn progress(&self) -> crate::liveness::Progress {
        self.stats.progress()
    }

    /// Completes when the engine thread has ended (a panic inside llama.cpp's bindings, say):
    /// nothing submitted will ever run.
    pub async fn stopped(&self) {
        self.jobs.closed().await
    }

    pub fn stall_limit(&self) -> std::time::Duration {
        self.config.stall_limit
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let c = &self.config;
        self.stats.snapshot(&self.info.id, c.slots, c.ctx_per_slot)
    }
}

/// What the API says of the loaded model: its id (configured, else the GGUF's `general.name`,
/// else the file's stem), the slot's context, and what the GGUF records.
fn model_info(model: &LlamaModel, config: &EngineConfig) -> crate::api::ModelInfo {
    let meta = |key: &str| model.meta_val_str(key).ok().filter(|v| !v.is_empty());
    let id = config.served_id(meta("general.name").as_deref());
    let quantization = meta("general.file_type")
        .and_then(|t| t.parse::<u32>().ok())
        .map(file_type_name)
        .unwrap_or_default();
    crate::api::ModelInfo {
        id,
        context_length: config.ctx_per_slot,
        trained_context_length: model.n_ctx_train(),
        quantization,
        parameters: model.n_params(),
    }
}

/// The attention window of a sliding-window model (Gemma 3: 512), from the GGUF; 0: none.
fn sliding_window(model: &LlamaModel) -> i32 {
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The name of a GGUF `general.file_type` (llama.cpp's `llama_ftype`).
fn file_type_name(t: u32) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        other => return format!("type {other}"),
    };
    name.to_string()
}

impl Stats {
    /// Decode steps so far, and whether there is work (running or queued).
    pub fn progress(&self) -> crate::liveness::Progress {
        let busy =
            self.active.load(Ordering::Relaxed) > 0 || self.queued.load(Ordering::Relaxed) > 0;
        crate::liveness::Progress {
            steps: self.decode_steps.load(Ordering::Relaxed),
            busy,
            backlog: 0,
        }
    }

    pub fn snapshot(&self, model: &str, slots: u32, ctx_per_slot: u32) -> StatsSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            model: model.to_string(),
            slots,
            ctx_per_slot,
            active_sequences: get(&self.active),
            queued_sequences: get(&self.queued),
            completed: get(&self.completed),
            cancelled: get(&self.cancelled),
            prompt_tokens_total: get(&self.prompt_tokens),
            completion_tokens_total: get(&self.completion_tokens),
            decode_steps: get(&self.decode_steps),
            cached_tokens_total: get(&self.cached_tokens),
            prefix_cache_tokens: get(&self.cache_held_tokens),
            ttft: self.ttft.lock().map(|h| h.clone()).unwrap_or_default(),
        }
    }
}

/// A fault hook for tests of stall detection: while the file named by `MESHD_FAULT_STALL_FILE`
/// exists, the engine thread blocks before its next decode step (as a hung GPU call or a
/// deadlock would); if the file says `die`, the thread panics instead (as a bug in a binding
/// would). Read once; unset (always, outside tests), it costs nothing.
fn stall_for_fault_injection() {
    static FILE: OnceLock<Option<PathBuf>> = OnceLock::new();
    let Some(path) =
        FILE.get_or_init(|| std::env::var_os("MESHD_FAULT_STALL_FILE").map(PathBuf::from))
    else {
        return;
    };
    if std::fs::read(path).is_ok_and(|b| b.starts_with(b"die")) {
        panic!("fault injection: the engine thread dies");
    }
    if path.exists() {
        tracing::warn!(file = %path.display(), "fault injection: the engine thread is blocked");
        while path.exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::warn!("fault injection: the engine thread runs again");
    }
}

/// Whether this build carries meshd's patched matmul (x86-64 Linux; see `build.rs`).
pub fn patched_matmul_built() -> bool {
    cfg!(meshd_sgemm)
}

/// What `meshd --version` says of this build and this CPU: the matmul kernels compiled in, and
/// the one `matmul_kernel = "meshd"` runs here.
pub fn build_description() -> String {
    let compiled = match (cfg!(meshd_sgemm), cfg!(meshd_avx512)) {
        (true, true) => "meshd patch (prefetching AVX2 tiles, AVX-512 VNNI kernel)",
        (true, false) => "meshd patch (prefetching AVX2 tiles)",
        _ => "llama.cpp's own",
    };
    let runs = available_matmul_kernels()
        .last()
        .map_or("llama.cpp", |(_, name)| *name);
    let mut features = Vec::new();
    if cfg!(feature = "cuda") {
        features.push("cuda");
    }
    if cfg!(feature = "metal") {
        features.push("metal");
    }
    let commit = option_env!("MESHD_BUILD_COMMIT").filter(|c| !c.is_empty());
    format!(
        "{}\ncommit: {}\nfeatures: {}\nmatmul compiled in: {compiled}\nmatmul on this CPU: {runs}",
        env!("CARGO_PKG_VERSION"),
        commit.unwrap_or("none (a development build; scripts/release names the commit)"),
        if features.is_empty() {
            "cpu".to_string()
        } else {
            features.join(", ")
        },
    )
}

/// Switches the process's CPU matrix multiply (one switch for the whole process, as llama.cpp's
/// kernels are global) and names the kernel that will run: `meshd-avx512` (the AVX-512 VNNI
/// decode kernel, then the prefetching tiles), `meshd-avx2` (the prefetching tiles) or
/// `llama.cpp`. The CPU and the build may allow less than `wanted`: a CPU without AVX-512
/// VNNI never runs that kernel, and a build without meshd's patch (see `build.rs`) always
/// runs llama.cpp's own.
pub fn select_matmul_kernel(wanted: MatmulKernel) -> &'static str {
    let level = match wanted {
        MatmulKernel::Meshd => 2,
        MatmulKernel::MeshdAvx2 => 1,
        MatmulKernel::Llama => 0,
    };
    #[cfg(meshd_sgemm)]
    {
        extern "C" {
            fn meshd_sgemm_set_level(level: std::os::raw::c_int) -> std::os::raw::c_int;
        }
        // SAFETY: a C function of build.rs's patched sgemm.cpp that checks the CPU once and
        // stores one atomic integer; it takes and returns plain integers.
        match unsafe { meshd_sgemm_set_level(level) } {
            2 => return "meshd-avx512",
            1 => return "meshd-avx2",
            _ => {}
        }
    }
    if level > 0 {
        tracing::debug!("this build has no patched matmul; llama.cpp's own kernels run");
    }
    "llama.cpp"
}

/// How often each of meshd's matmul paths ran since the process started (counted by the C side
/// per thread and call): the proof that a kernel ran, not only that it was selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KernelCalls {
    /// One-token Q8_0/Q5_0/Q4_0 products the patch routed into the prefetching AVX2 tiles.
    pub avx2_one_token: u64,
    /// Products the AVX-512 VNNI kernel computed.
    pub avx512: u64,
}

pub fn matmul_kernel_calls() -> KernelCalls {
    #[cfg(meshd_sgemm)]
    {
        extern "C" {
            fn meshd_sgemm_calls(path: std::os::raw::c_int) -> std::os::raw::c_ulonglong;
        }
        // SAFETY: a C function of build.rs's patched sgemm.cpp that reads one atomic counter.
        unsafe {
            KernelCalls {
                avx2_one_token: meshd_sgemm_calls(1),
                avx512: meshd_sgemm_calls(2),
            }
        }
    }
    #[cfg(not(meshd_sgemm))]
    KernelCalls::default()
}

/// The distinct CPU matrix multiplies this build and CPU run, llama.cpp's own first, each as the
/// `matmul_kernel` value that selects it and the name `select_matmul_kernel` gives it: for runs
/// that compare them. It only asks what the CPU and build allow; the kernel in force stays as it is.
pub fn available_matmul_kernels() -> Vec<(MatmulKernel, &'static str)> {
    let mut kernels = vec![(MatmulKernel::Llama, "llama.cpp")];
    #[cfg(meshd_sgemm)]
    {
        extern "C" {
            fn meshd_sgemm_top_level() -> std::os::raw::c_int;
        }
        // SAFETY: a C function of the patched sgemm.cpp that reads the CPU's features once.
        let top = unsafe { meshd_sgemm_top_level() };
        kernels.push((MatmulKernel::MeshdAvx2, "meshd-avx2"));
        if top >= 2 {
            kernels.push((MatmulKernel::Meshd, "meshd-avx512"));
        }
    }
    kernels
}

/// The completion budget of a prompt of `prompt` tokens in a slot of `limit` positions: `wanted`,
/// or (`None`) whatever room is left; an error with the counts when it does not fit.
pub(crate) fn fit(limit: u32, prompt: u32, wanted: Option<u32>) -> Result<u32, EngineError> {
    let room = limit.saturating_sub(prompt);
    let completion = wanted.unwrap_or(room);
    if prompt >= limit || completion > room {
        return Err(EngineError::ContextLength {
            limit,
            prompt,
            completion,
            total: prompt.saturating_add(completion),
        });
    }
    Ok(completion)
}

impl Generate for Engine {
    fn model_id(&self) -> &str {
        Engine::model_id(self)
    }

    fn model_info(&self) -> crate::api::ModelInfo {
        (*self.info).clone()
    }

    fn generate(&self, request: &ValidGenerate) -> Result<Generation, EngineError> {
        let prepared = self.prepare(request)?;
        let prompt_tokens = prepared.prompt_tokens();
        let events = self.submit(prepared)?;
        Ok(Generation {
            prompt_tokens,
            events,
        })
    }

    fn snapshot(&self) -> StatsSnapshot {
        Engine::snapshot(self)
    }

    fn progress(&self) -> crate::liveness::Progress {
        Engine::progress(self)
    }

    fn stall_limit(&self) -> std::time::Duration {
        Engine::stall_limit(self)
    }

    fn embed<'a>(
        &'a self,
        inputs: &'a [crate::api::EmbedInput],
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<(Vec<Vec<f32>>, u32), EngineError>> + Send + 'a,
        >,
    > {
        Box::pin(Engine::embed(self, inputs))
    }

    fn stopped(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(Engine::stopped(self))
    }
}

/// The context size for `slots` sequences of `ctx_per_slot` positions each, and the prefix
/// cache's budget beside them.
fn n_ctx(config: &EngineConfig) -> Option<NonZeroU32> {
    NonZeroU32::new(config.slots * config.ctx_per_slot + config.prefix_cache_tokens)
}

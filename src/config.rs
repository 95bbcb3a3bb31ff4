//! Configuration: one typed tree, one place for defaults, layered
//! defaults → TOML file → `MESHD_*` environment → command-line flags (figment).
//!
//! Every role reads the same [`Settings`] type, but each role accepts only the keys that mean
//! something to it: a `model` key in a gateway file is an error, not silently ignored.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Human,
    Json,
}

/// The quantized matrix multiply the CPU runs (see `build.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum MatmulKernel {
    /// meshd's fastest kernel this CPU runs: the AVX-512 VNNI decode kernel where the CPU has
    /// it, else llama.cpp's tinyBLAS with meshd's prefetch patch (x86-64 Linux builds; elsewhere
    /// the same as `llama.cpp`).
    #[serde(rename = "meshd")]
    #[value(name = "meshd")]
    Meshd,
    /// Only the prefetch patch, never the AVX-512 kernel: to compare, or to rule it out.
    #[serde(rename = "meshd-avx2")]
    #[value(name = "meshd-avx2")]
    MeshdAvx2,
    /// llama.cpp's own kernels, unchanged: for comparison runs.
    #[serde(rename = "llama.cpp")]
    #[value(name = "llama.cpp")]
    Llama,
}

impl MatmulKernel {
    /// The name config files and the command line use.
    pub fn name(self) -> &'static str {
        match self {
            MatmulKernel::Meshd => "meshd",
            MatmulKernel::MeshdAvx2 => "meshd-avx2",
            MatmulKernel::Llama => "llama.cpp",
        }
    }
}

/// What generates text for the infer role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum GeneratorKind {
    /// The model, through llama.cpp (the default; the only one that serves a model).
    #[serde(rename = "llama.cpp")]
    #[value(name = "llama.cpp")]
    Llama,
    /// Deterministic filler words, no model loaded: for tests of the mesh and for measuring the
    /// mesh alone. Never a model.
    #[serde(rename = "echo")]
    #[value(name = "echo")]
    Echo,
    /// An OpenAI-compatible server (`upstream_url`: vLLM, SGLang, llama-server, TGI) generates;
    /// this worker coordinates.
    #[serde(rename = "openai")]
    #[value(name = "openai")]
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Caller,
    Infer,
    Up,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Caller => "caller",
            Role::Infer => "infer",
            Role::Up => "up",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        [Role::Gateway, Role::Caller, Role::Infer, Role::Up]
            .into_iter()
            .find(|r| r.name() == name)
    }

    /// The keys this role reads; any other key in its file is refused.
    pub fn keys(self) -> &'static [&'static str] {
        const COMMON: [&str; 7] = [
            "allow_plaintext",
            "log_format",
            "log_level",
            "drain_timeout_secs",
            "max_frame_bytes",
            "heartbeat_interval_ms",
            "heartbeat_timeout_ms",
        ];
        const GATEWAY: [&str; 35] = [
            "tls_cert",
            "tls_key",
            "mesh_tls_cert",
            "mesh_tls_key",
            "api_keys",
            "api_keys_file",
            "insecure_no_auth",
            "http_addr",
            "mesh_addr",
            "data_dir",
            "worker_token",
            "worker_token_file",
            "worker_tokens",
            "worker_token_files",
            "grants",
            "trigger_grace_secs",
            "http_header_timeout_secs",
            "http_body_timeout_secs",
            "max_body_bytes",
            "request_timeout_secs",
            "queue_depth",
            "affinity_slack",
            "max_connections",
            "max_connections_per_ip",
            "max_mesh_connections",
            "max_mesh_connections_per_ip",
            "state_url",
            "state_username",
            "state_password_file",
            "state_ca_file",
            "state_wait_replicas",
            "state_timeout_ms",
            "state_cluster",
            "requests_per_minute",
            "tokens_per_minute",
        ];
        const WORKER: [&str; 7] = [
            "gateway_ca",
            "gateway_url",
            "gateway_urls",
            "name",
            "worker_token",
            "worker_token_file",
            "max_concurrency",
        ];
        const ENGINE: [&str; 17] = [
            "generator",
            "engine_stall_secs",
            "model",
            "model_id",
            "embedding_model",
            "slots",
            "ctx_per_slot",
            "batch_size",
            "threads",
            "matmul_kernel",
            "n_gpu_layers",
            "chat_template",
            "max_queued_sequences",
            "prefix_cache_tokens",
            "upstream_url",
            "upstream_key",
            "upstream_timeout_secs",
        ];
        static GATEWAY_KEYS: std::sync::OnceLock<Vec<&str>> = std::sync::OnceLock::new();
        static CALLER_KEYS: std::sync::OnceLock<Vec<&str>> = std::sync::OnceLock::new();
        static INFER_KEYS: std::sync::OnceLock<Vec<&str>> = std::sync::OnceLock::new();
        static UP_KEYS: std::sync::OnceLock<Vec<&str>> = std::sync::OnceLock::new();
        let join = |parts: &[&[&'static str]]| parts.concat();
        match self {
            Role::Gateway => GATEWAY_KEYS.get_or_init(|| join(&[&COMMON, &GATEWAY])),
            Role::Caller => CALLER_KEYS.get_or_init(|| join(&[&COMMON, &WORKER])),
            Role::Infer => INFER_KEYS.get_or_init(|| join(&[&COMMON, &WORKER, &ENGINE])),
            // `up` makes its own mesh on loopback: it takes no mesh TLS and mints its own tokens.
            Role::Up => UP_KEYS.get_or_init(|| {
                let mine = |k: &&str| !k.starts_with("mesh_tls_") && !k.starts_with("worker_token");
                join(&[&COMMON, &GATEWAY, &ENGINE])
                    .into_iter()
                    .filter(mine)
                    .collect()
            }),
        }
    }
}

// Every setting of every role: a new setting is one field here (its doc comment is its `--help`
// and its flag is generated from it), its default in `Settings::defaults`, and the roles that
// read it in `Role::keys`. A test checks the README's table against this list. (A plain comment:
// clap would show a doc comment here as every role's description.)
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// API keys accepted as `Authorization: Bearer KEY`, as `sha256:<hex>` digests of the keys.
    #[arg(skip)]
    pub api_keys: Vec<String>,
    /// A file of API keys, one per line: a plain key or `sha256:<hex>`; `#` starts a comment.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub api_keys_file: Option<PathBuf>,
    /// Serve the API without keys on a non-loopback address (never the default).
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// PEM certificate chain and key for HTTPS on `http_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS on `http_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// PEM certificate chain and key for `wss://` on `mesh_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub mesh_tls_cert: Option<PathBuf>,
    /// PEM private key for `wss://` on `mesh_addr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub mesh_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) a worker trusts for a `wss://` gateway.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub gateway_ca: Option<PathBuf>,
    /// Plain HTTP / WebSocket on a non-loopback address (never the default).
    #[arg(long)]
    pub allow_plaintext: bool,
    /// Public HTTP API listener.
    #[arg(long, required = false)]
    pub http_addr: String,
    /// Private mesh listener (WebSocket). `:49134` means every interface.
    #[arg(long, required = false)]
    pub mesh_addr: String,
    /// Where the gateway keeps its sled state (when `state_url` is not set).
    #[arg(long, required = false)]
    pub data_dir: PathBuf,
    /// Keep state in Redis instead of sled, shared by every gateway: `redis://HOST:PORT/DB`, or
    /// `rediss://…` for TLS (Redis, Valkey, ElastiCache, MemoryDB).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub state_url: Option<String>,
    /// The Redis ACL user (with `state_password_file`); without it the password is `default`'s.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub state_username: Option<String>,
    /// A file holding the Redis password (first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub state_password_file: Option<PathBuf>,
    /// PEM CA certificate(s) that verify a `rediss://` server; default: the system's roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub state_ca_file: Option<PathBuf>,
    /// Redis replicas that must hold each write before it is acknowledged (`WAIT`); 0 trusts
    /// the server's own policy (AOF `appendfsync always`, MemoryDB's multi-AZ log).
    #[arg(long, required = false)]
    pub state_wait_replicas: u32,
    /// Longest one Redis operation may take (connecting included); past it the request gets 503
    /// `state_unavailable`.
    #[arg(long, required = false)]
    pub state_timeout_ms: u64,
    /// `state_url` is one node of a cluster-mode deployment (MemoryDB always is; a Redis or
    /// Valkey Cluster): the client learns the others and routes each step to its slot.
    #[arg(long)]
    pub state_cluster: bool,
    /// Requests per minute each API key may make (0: no limit); a key's own `rpm=N` in
    /// `api_keys_file` overrides it.
    #[arg(long, required = false)]
    pub requests_per_minute: u64,
    /// Tokens per minute each API key may spend, counted as OpenAI does when a request is admitted
    /// (its estimated prompt plus `max_tokens`; 0: no limit); a key's own `tpm=N` overrides it.
    #[arg(long, required = false)]
    pub tokens_per_minute: u64,
    /// Where a worker connects, e.g. `ws://10.20.1.10:49134`. Repeat the flag to join several
    /// gateways; a DNS name joins every address it resolves to (re-resolved every 5 s).
    #[arg(long, required = false)]
    pub gateway_url: String,
    /// Every gateway a worker joins (replaces `gateway_url` when set): `["wss://gw-a:49134",
    /// "wss://gw-b:49134"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[arg(skip)]
    pub gateway_urls: Vec<String>,
    /// A worker's name in logs and `Hello`.
    #[arg(long, required = false)]
    pub name: String,
    /// The shared mesh secret, inline (prefer `worker_token_file`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub worker_token: Option<String>,
    /// A file holding the shared mesh secret (first line, trimmed). On a gateway this single
    /// token grants every role (the dev mode of `meshd up` and of tests); a deployment gives each
    /// role its own with `worker_token_files`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub worker_token_file: Option<PathBuf>,
    /// The gateway's token per role, inline (prefer `worker_token_files`): `{ caller = "…" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[arg(skip)]
    pub worker_tokens: BTreeMap<String, String>,
    /// The gateway's token per role, each from a file (first line, trimmed):
    /// `{ caller = "/etc/meshd/tokens/caller", infer = "/etc/meshd/tokens/infer" }`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[arg(skip)]
    pub worker_token_files: BTreeMap<String, PathBuf>,
    /// What each role's token may do (`[grants.<role>]`: functions, triggers, state, resumable).
    /// `caller` and `infer` have built-in grants; a table here replaces the built-in one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[arg(skip)]
    pub grants: BTreeMap<String, crate::gateway::grants::Grant>,
    /// A trigger whose function has had no worker for this long is removed (until then nobody
    /// may re-bind its route to another function).
    #[arg(long, required = false)]
    pub trigger_grace_secs: u64,
    /// An HTTP connection must send a complete request head within this many seconds of
    /// connecting or of its previous response (keep-alive included), or it is closed.
    #[arg(long, required = false)]
    pub http_header_timeout_secs: u64,
    /// An HTTP request body must arrive within this many seconds of its head.
    #[arg(long, required = false)]
    pub http_body_timeout_secs: u64,
    #[arg(long, value_enum, required = false)]
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `meshd=debug,info`.
    #[arg(long, required = false)]
    pub log_level: String,
    /// After SIGTERM: how long in-flight work may take before the process exits anyway.
    #[arg(long, required = false)]
    pub drain_timeout_secs: u64,
    /// Largest mesh frame accepted (payload plus envelope).
    #[arg(long, required = false)]
    pub max_frame_bytes: usize,
    /// How often each end of a mesh connection sends a heartbeat.
    #[arg(long, required = false)]
    pub heartbeat_interval_ms: u64,
    /// Silence after which a mesh peer is dead: the gateway fails (or moves) its work, a worker
    /// reconnects.
    #[arg(long, required = false)]
    pub heartbeat_timeout_ms: u64,
    /// An engine holding work with no decode step for this long is stalled: its worker leaves
    /// routing (and stops feeding systemd's watchdog) until it steps again.
    #[arg(long, required = false)]
    pub engine_stall_secs: u64,
    /// Largest HTTP request body accepted.
    #[arg(long, required = false)]
    pub max_body_bytes: usize,
    /// Longest an HTTP request may take end to end.
    #[arg(long, required = false)]
    pub request_timeout_secs: u64,
    /// Invocations of one function in flight at once; beyond it, 429.
    #[arg(long, required = false)]
    pub queue_depth: usize,
    /// A conversation goes to the infer worker that holds its prefix unless that worker has more
    /// than this many requests in flight beyond the least-loaded one (then: the least loaded);
    /// 0 routes by load alone.
    #[arg(long, required = false)]
    pub affinity_slack: usize,
    /// Open HTTP connections at once; beyond it new ones are closed.
    #[arg(long, required = false)]
    pub max_connections: usize,
    /// Open HTTP connections one peer address may hold; 0: no cap.
    #[arg(long, required = false)]
    pub max_connections_per_ip: usize,
    /// Open mesh connections at once (a budget of its own: a flood of one listener never takes
    /// the other's slots); beyond it new ones are closed.
    #[arg(long, required = false)]
    pub max_mesh_connections: usize,
    /// Open mesh connections one peer address may hold; 0: no cap.
    #[arg(long, required = false)]
    pub max_mesh_connections_per_ip: usize,
    /// Invocations a worker runs at once; beyond it, the worker answers `overloaded`.
    #[arg(long, required = false)]
    pub max_concurrency: usize,
    /// `llama.cpp` (the model), `openai` (an OpenAI-compatible server at `upstream_url`), or
    /// `echo` (filler words, no model: for tests of the mesh). `--backend` is the same flag.
    #[arg(long, value_enum, required = false, alias = "backend")]
    pub generator: GeneratorKind,
    /// The GGUF file the infer role serves.
    #[arg(long, required = false)]
    pub model: PathBuf,
    /// The model name the API reports and accepts; default: the GGUF's `general.name`,
    /// normalised (`Gemma 3 270m` → `gemma-3-270m`), else the file's stem.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub model_id: Option<String>,
    /// A GGUF that answers `/v1/embeddings` instead of `model` (an embedding model such as
    /// nomic-embed or bge); default: `model` itself, mean-pooled.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub embedding_model: Option<PathBuf>,
    /// Sequences generated at once (continuous batching).
    #[arg(long, required = false)]
    pub slots: u32,
    /// Context positions each slot may use (prompt plus completion).
    #[arg(long, required = false)]
    pub ctx_per_slot: u32,
    /// Most tokens in one decode step.
    #[arg(long, required = false)]
    pub batch_size: u32,
    /// Inference threads; 0 means one per core.
    #[arg(long, required = false)]
    pub threads: u32,
    /// `meshd` (default) or `llama.cpp`: which CPU matrix multiply runs quantized weights.
    #[arg(long, value_enum, required = false)]
    pub matmul_kernel: MatmulKernel,
    /// Layers offloaded to the GPU (builds with `cuda` or `metal`).
    #[arg(long, required = false)]
    pub n_gpu_layers: u32,
    /// A llama.cpp built-in template name used when the GGUF carries none (e.g. `gemma`).
    #[arg(long, required = false)]
    pub chat_template: String,
    /// Requests waiting for a free slot; beyond it, 429.
    #[arg(long, required = false)]
    pub max_queued_sequences: usize,
    /// The OpenAI-compatible server the `openai` generator forwards to (`http://host:8000`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub upstream_url: Option<String>,
    /// The API key the upstream server expects (better: `MESHD_UPSTREAM_KEY`, not on the command line).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long)]
    pub upstream_key: Option<String>,
    /// Longest the upstream may take to answer a request's head (its queue, then the prompt),
    /// in seconds; beyond it, 503.
    #[arg(long, required = false)]
    pub upstream_timeout_secs: u64,
    /// Tokens of finished conversations whose KV stays cached so a later prompt that starts the
    /// same way skips them (least recently used evicted first); 0 turns the cache off.
    #[arg(long, required = false)]
    pub prefix_cache_tokens: u32,
}

/// The id of the flag that takes per-role worker token files (`--worker-token-file-for ROLE=PATH`).
const ROLE_TOKEN_FILES: &str = "worker_token_files";

/// A role's command line: every setting of [`Settings`] as a flag (`http_addr` → `--http-addr`),
/// those of other roles hidden (and refused by [`flag_overrides`]).
pub fn role_flags(role: Role, cmd: clap::Command) -> clap::Command {
    use clap::Args;
    let mut cmd = Settings::augment_args(cmd);
    let keys = role.keys();
    let foreign: Vec<String> = Settings::augment_args(clap::Command::new("settings"))
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .filter(|id| !keys.contains(&id.as_str()))
        .collect();
    for id in foreign {
        cmd = cmd.mut_arg(id, |a| a.hide(true));
    }
    // `--gateway-url` repeats: one worker joins several gateways.
    cmd = cmd.mut_arg("gateway_url", |a| a.action(clap::ArgAction::Append));
    if keys.contains(&ROLE_TOKEN_FILES) {
        cmd = cmd.arg(
            clap::Arg::new(ROLE_TOKEN_FILES)
                .long("worker-token-file-for")
                .value_name("ROLE=PATH")
                .action(clap::ArgAction::Append)
                .value_parser(role_path)
                .help("A role's worker token from a file (repeat per role: caller=…, infer=…)"),
        );
    }
    cmd
}

fn role_path(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((role, path)) if !role.is_empty() && !path.is_empty() => {
            Ok((role.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("`{arg}` is not ROLE=PATH")),
    }
}

/// The settings given as flags, as the top layer for [`Settings::load`]. A flag that belongs to
/// another role is an error naming it.
pub fn flag_overrides(
    role: Role,
    matches: &clap::ArgMatches,
) -> Result<figment::value::Dict, ConfigError> {
    use clap::parser::ValueSource;
    use clap::Args;
    use figment::value::{Dict, Value};
    let keys = role.keys();
    let mut dict = Dict::new();
    let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    for arg in Settings::augment_args(clap::Command::new("settings")).get_arguments() {
        let id = arg.get_id().as_str();
        if !given(id) {
            continue;
        }
        if !keys.contains(&id) {
            let flag = arg.get_long().unwrap_or(id);
            return Err(ConfigError::Invalid(format!(
                "--{flag} is not a setting of `meshd {}`",
                role.name()
            )));
        }
        if id == "gateway_url" {
            // Every one given, so that the flags replace a file's `gateway_urls` too.
            let urls: Vec<Value> = matches
                .get_raw(id)
                .into_iter()
                .flatten()
                .map(|v| Value::from(v.to_string_lossy().into_owned()))
                .collect();
            dict.insert("gateway_urls".to_string(), Value::from(urls));
        }
        let value = if arg.get_action().takes_values() {
            let raw = matches.get_raw(id).into_iter().flatten().next();
            Value::from(
                raw.map(|v| v.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            )
        } else {
            Value::from(matches.get_flag(id))
        };
        dict.insert(id.to_string(), value);
    }
    if keys.contains(&ROLE_TOKEN_FILES) && given(ROLE_TOKEN_FILES) {
        let files: Dict = matches
            .get_many::<(String, PathBuf)>(ROLE_TOKEN_FILES)
            .into_iter()
            .flatten()
            .map(|(role, path)| (role.clone(), Value::from(path.display().to_string())))
            .collect();
        dict.insert(ROLE_TOKEN_FILES.to_string(), Value::from(files));
    }
    Ok(dict)
}

impl Settings {
    /// The defaults of a role: the only place defaults live.
    pub fn defaults(role: Role) -> Settings {
        let loopback = role == Role::Up;
        Settings {
            tls_cert: None,
            tls_key: None,
            mesh_tls_cert: None,
            mesh_tls_key: None,
            gateway_ca: None,
            allow_plaintext: false,
            api_keys: Vec::new(),
            api_keys_file: None,
            insecure_no_auth: false,
            http_addr: if loopback {
                "127.0.0.1:3111"
            } else {
                "0.0.0.0:3111"
            }
            .into(),
            mesh_addr: if loopback { "127.0.0.1:0" } else { ":49134" }.into(),
            data_dir: if loopback {
                ".meshd/data"
            } else {
                "/var/lib/meshd"
            }
            .into(),
            state_url: None,
            state_username: None,
            state_password_file: None,
            state_ca_file: None,
            state_wait_replicas: 0,
            state_timeout_ms: 2000,
            state_cluster: false,
            requests_per_minute: 0,
            tokens_per_minute: 0,
            gateway_url: "ws://127.0.0.1:49134".into(),
            gateway_urls: Vec::new(),
            name: role.name().into(),
            worker_token: None,
            worker_token_file: None,
            worker_tokens: BTreeMap::new(),
            worker_token_files: BTreeMap::new(),
            grants: BTreeMap::new(),
            trigger_grace_secs: 300,
            http_header_timeout_secs: 10,
            http_body_timeout_secs: 30,
            log_format: LogFormat::Human,
            log_level: "info".into(),
            drain_timeout_secs: 20,
            max_frame_bytes: crate::protocol::DEFAULT_MAX_FRAME,
            heartbeat_interval_ms: crate::liveness::Heartbeat::default().interval.as_millis()
                as u64,
            heartbeat_timeout_ms: crate::liveness::Heartbeat::default().timeout.as_millis() as u64,
            engine_stall_secs: 15,
            max_body_bytes: 1024 * 1024,
            request_timeout_secs: 300,
            queue_depth: 1024,
            affinity_slack: 4,
            max_connections: 4096,
            max_connections_per_ip: 1024,
            max_mesh_connections: 1024,
            max_mesh_connections_per_ip: 64,
            max_concurrency: 1024,
            generator: GeneratorKind::Llama,
            model: "models/gemma3-270m-q4_k_m.gguf".into(),
            model_id: None,
            embedding_model: None,
            slots: 8,
            ctx_per_slot: 2048,
            batch_size: 512,
            threads: 0,
            matmul_kernel: MatmulKernel::Meshd,
            n_gpu_layers: 0,
            chat_template: "gemma".into(),
            max_queued_sequences: 256,
            prefix_cache_tokens: 8192,
            upstream_url: None,
            upstream_key: None,
            upstream_timeout_secs: 300,
        }
    }

    /// Loads a role's settings: defaults, then `file`, then `MESHD_*`, then `overrides`
    /// (a serializable struct whose `None` fields are skipped).
    pub fn load(
        role: Role,
        file: Option<&Path>,
        overrides: impl Serialize,
    ) -> Result<Settings, ConfigError> {
        let keys = role.keys();
        let mut figment = Figment::from(Serialized::defaults(Settings::defaults(role)));
        if let Some(path) = file {
            check_file_keys(role, path)?;
            figment = figment.merge(Toml::file_exact(path));
        }
        // Lossy: flags arrive as the text typed (`--slots 8`), and become the field's type here.
        let settings: Settings = figment
            .merge(Env::prefixed("MESHD_").only(keys))
            .merge(Serialized::defaults(overrides))
            .extract_lossy()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        settings.validate(role)?;
        Ok(settings)
    }

    fn validate(&self, role: Role) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("`{key}`: {why}")));
        if matches!(role, Role::Gateway | Role::Up) {
            let pairs = [
                ("http_addr", &self.http_addr, &self.tls_cert, &self.tls_key),
                (
                    "mesh_addr",
                    &self.mesh_addr,
                    &self.mesh_tls_cert,
                    &self.mesh_tls_key,
                ),
            ];
            for (key, addr, cert, tls_key) in pairs {
                let a = resolve_addr(addr)
                    .map_err(|e| ConfigError::Invalid(format!("`{key}`: {e}")))?;
                if cert.is_some() != tls_key.is_some() {
                    return bad(
                        key,
                        "a TLS certificate needs its key, and a key its certificate",
                    );
                }
                if cert.is_none() && !a.ip().is_loopback() && !self.allow_plaintext {
                    return bad(
                        key,
                        &format!("{a} is not loopback: configure TLS for it, or set allow_plaintext = true"),
                    );
                }
            }
        }
        if matches!(role, Role::Caller | Role::Infer) {
            let urls = self.gateway_urls();
            if urls.len() > 16 {
                return bad("gateway_urls", "at most 16 gateways");
            }
            for (i, url) in urls.iter().enumerate() {
                if urls[..i].contains(url) {
                    return bad("gateway_urls", &format!("{url} is listed twice"));
                }
                self.check_gateway_url(url)?;
            }
        }
        if matches!(role, Role::Gateway | Role::Up)
            && !(50..=60_000).contains(&self.state_timeout_ms)
        {
            return bad("state_timeout_ms", "must be between 50 and 60000");
        }
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes", "must be at least 1024");
        }
        if self.max_body_bytes == 0 || self.max_body_bytes > self.max_frame_bytes - 512 {
            return bad("max_body_bytes", "must be positive and fit in a mesh frame");
        }
        if self.heartbeat_interval_ms < 50 || self.heartbeat_interval_ms > 60_000 {
            return bad("heartbeat_interval_ms", "must be between 50 and 60000");
        }
        if self.heartbeat_timeout_ms < 2 * self.heartbeat_interval_ms
            || self.heartbeat_timeout_ms > 600_000
        {
            return bad(
                "heartbeat_timeout_ms",
                "must be at least twice heartbeat_interval_ms, and at most 600000",
            );
        }
        if matches!(role, Role::Gateway | Role::Up) {
            for (name, grant) in &self.grants {
                grant.check(name).map_err(ConfigError::Invalid)?;
            }
            let deadlines = [
                ("trigger_grace_secs", self.trigger_grace_secs),
                ("http_header_timeout_secs", self.http_header_timeout_secs),
                ("http_body_timeout_secs", self.http_body_timeout_secs),
            ];
            for (key, secs) in deadlines {
                if secs == 0 || secs > 86_400 {
                    return bad(key, "must be between 1 and 86400");
                }
            }
        }
        if matches!(role, Role::Infer | Role::Up) && self.engine_stall_secs == 0 {
            return bad("engine_stall_secs", "must be at least 1");
        }
        if self.queue_depth == 0
            || self.max_concurrency == 0
            || self.max_connections == 0
            || self.max_mesh_connections == 0
        {
            return bad("queue_depth", "limits must be positive");
        }
        if matches!(role, Role::Infer | Role::Up) && self.generator == GeneratorKind::Openai {
            match &self.upstream_url {
                None => {
                    return bad(
                        "upstream_url",
                        "the openai generator needs the upstream's URL",
                    )
                }
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    return bad("upstream_url", "must be an http:// or https:// URL");
                }
                Some(_) => {}
            }
        }
        if !(1..=3600).contains(&self.upstream_timeout_secs) {
            return bad("upstream_timeout_secs", "must be between 1 and 3600");
        }
        if matches!(role, Role::Infer | Role::Up)
            && self.embedding_model.is_some()
            && self.generator != GeneratorKind::Llama
        {
            return bad(
                "embedding_model",
                "only the llama.cpp generator loads an embedding model",
            );
        }
        if matches!(role, Role::Infer | Role::Up) {
            if self.slots == 0 || self.slots > 256 {
                return bad("slots", "must be between 1 and 256");
            }
            if self.ctx_per_slot < 64 {
                return bad("ctx_per_slot", "must be at least 64");
            }
            if self.prefix_cache_tokens > 1 << 20 {
                return bad("prefix_cache_tokens", "must be at most 1048576");
            }
            if u64::from(self.slots) * u64::from(self.ctx_per_slot)
                + u64::from(self.prefix_cache_tokens)
                > u64::from(i32::MAX as u32)
            {
                return bad(
                    "ctx_per_slot",
                    "slots × ctx_per_slot is too large a context",
                );
            }
            if self.batch_size < 32 {
                return bad("batch_size", "must be at least 32");
            }
            if self.slots > self.batch_size {
                // Every generating slot puts one token in each decode step: more slots than the
                // batch holds would overflow it.
                return bad("slots", "must not exceed batch_size");
            }
        }
        Ok(())
    }

    /// Every gateway a worker joins: `gateway_urls`, else `gateway_url`.
    pub fn gateway_urls(&self) -> Vec<String> {
        if self.gateway_urls.is_empty() {
            vec![self.gateway_url.clone()]
        } else {
            self.gateway_urls.clone()
        }
    }

    fn check_gateway_url(&self, url: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError::Invalid(format!("`{key}`: {why}")));
        let plain = url.strip_prefix("ws://");
        let tls = url.strip_prefix("wss://");
        let Some(rest) = plain.or(tls) else {
            return bad(
                "gateway_url",
                &format!("{url} must start with ws:// or wss://"),
            );
        };
        if tls.is_some() && self.gateway_ca.is_none() {
            return bad(
                "gateway_ca",
                "a wss:// gateway needs the CA to verify it (gateway_ca)",
            );
        }
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let loopback = resolve_addr(host)
            .map(|a| a.ip().is_loopback())
            .unwrap_or(false);
        if plain.is_some() && !loopback && !self.allow_plaintext {
            return bad(
                "gateway_url",
                "ws:// to a non-loopback gateway is plain text: use wss:// with gateway_ca, or set allow_plaintext = true",
            );
        }
        Ok(())
    }

    /// The mesh heartbeat of this role.
    pub fn heartbeat(&self) -> crate::liveness::Heartbeat {
        crate::liveness::Heartbeat {
            interval: std::time::Duration::from_millis(self.heartbeat_interval_ms),
            timeout: std::time::Duration::from_millis(self.heartbeat_timeout_ms),
        }
    }

    /// The worker token from `worker_token` or `worker_token_file`.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if let Some(t) = &self.worker_token {
            return Ok(Some(t.clone()));
        }
        self.worker_token_file
            .as_deref()
            .map(|path| read_token("worker_token_file", path))
            .transpose()
    }

    /// The gateway's token of each role, from `worker_tokens` and `worker_token_files`.
    pub fn role_tokens(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut tokens = self.worker_tokens.clone();
        for (role, path) in &self.worker_token_files {
            if tokens.contains_key(role) {
                return Err(ConfigError::Invalid(format!(
                    "role `{role}` has a token in both worker_tokens and worker_token_files"
                )));
            }
            let key = format!("worker_token_files.{role}");
            tokens.insert(role.clone(), read_token(&key, path)?);
        }
        Ok(tokens)
    }

    /// The grants in force: the built-in ones, each replaced by a `[grants.<role>]` of the same
    /// name, plus any new roles.
    pub fn grants(&self) -> BTreeMap<String, crate::gateway::grants::Grant> {
        let mut grants = crate::gateway::grants::Grant::builtin();
        grants.extend(self.grants.clone());
        grants
    }

    /// Every worker token the gateway accepts, each with its role's grant.
    pub fn identities(&self) -> Result<crate::gateway::grants::Identities, ConfigError> {
        crate::gateway::grants::Identities::new(self.token()?, &self.role_tokens()?, &self.grants())
            .map_err(ConfigError::Invalid)
    }
}

/// The first line of a token file, trimmed; an empty one is an error.
fn read_token(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("cannot read {key} {}: {e}", path.display())))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.is_empty() {
        return Err(ConfigError::Invalid(format!(
            "{key} {} is empty",
            path.display()
        )));
    }
    Ok(token)
}

impl Settings {
    /// The configured API keys: each one's SHA-256 digest and per-minute limits. A line is
    /// `KEY` or `sha256:<hex>`, then optionally `rpm=N` and `tpm=N` (0: unlimited), which replace
    /// `requests_per_minute` / `tokens_per_minute` for that key.
    pub fn api_keys(&self) -> Result<Vec<ApiKey>, ConfigError> {
        let mut lines: Vec<(String, String)> = self
            .api_keys
            .iter()
            .map(|k| ("api_keys".to_string(), k.clone()))
            .collect();
        if let Some(path) = &self.api_keys_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::Invalid(format!("cannot read api_keys_file {}: {e}", path.display()))
            })?;
            lines.extend(
                text.lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .map(|l| (path.display().to_string(), l.to_string())),
            );
        }
        let limit = |n: u64| (n > 0).then_some(n);
        let defaults = crate::state::RateLimits {
            requests: limit(self.requests_per_minute),
            tokens: limit(self.tokens_per_minute),
        };
        lines
            .into_iter()
            .map(|(origin, line)| {
                let bad = |why: String| ConfigError::Invalid(format!("{origin}: {why}"));
                let mut words = line.split_whitespace();
                let key = words.next().unwrap_or("");
                let digest = match key.strip_prefix("sha256:") {
                    Some(hex) => parse_digest(hex).ok_or_else(|| {
                        bad("`sha256:` must be followed by 64 hex digits".into())
                    })?,
                    // A plain key in a file is hashed; inline keys must be digests (configs get copied).
                    None if origin != "api_keys" => sha256(key.as_bytes()),
                    None => {
                        return Err(ConfigError::Invalid(
                            "api_keys holds `sha256:<hex>` digests, not keys (use api_keys_file for plain keys)".into(),
                        ))
                    }
                };
                let mut limits = defaults;
                for word in words {
                    let parsed = word.split_once('=').and_then(|(k, v)| Some((k, v.parse::<u64>().ok()?)));
                    match parsed {
                        Some(("rpm", n)) => limits.requests = limit(n),
                        Some(("tpm", n)) => limits.tokens = limit(n),
                        _ => {
                            return Err(bad(format!(
                                "`{word}` after a key: only `rpm=N` and `tpm=N` may follow it"
                            )))
                        }
                    }
                }
                Ok(ApiKey { digest, limits })
            })
            .collect()
    }

    /// How the gateway reaches Redis, when `state_url` says so.
    pub fn redis_options(&self) -> Option<crate::state::RedisOptions> {
        Some(crate::state::RedisOptions {
            url: self.state_url.clone()?,
            username: self.state_username.clone(),
            password_file: self.state_password_file.clone(),
            ca_file: self.state_ca_file.clone(),
            wait_replicas: self.state_wait_replicas,
            timeout: std::time::Duration::from_millis(self.state_timeout_ms),
            pool: 4,
            cluster: self.state_cluster,
        })
    }
}

/// One accepted API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub digest: [u8; 32],
    pub limits: crate::state::RateLimits,
}

impl ApiKey {
    /// The name its rate-limit window goes by: a digest of the digest (the key's own digest
    /// never leaves the gateway).
    pub fn subject(&self) -> String {
        sha256(&self.digest)[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Resolves `host:port`; a bare `:port` means every interface.
pub fn resolve_addr(addr: &str) -> Result<SocketAddr, String> {
    let full = if addr.starts_with(':') {
        format!("0.0.0.0{addr}")
    } else {
        addr.to_string()
    };
    full.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

fn check_file_keys(role: Role, path: &Path) -> Result<(), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::Invalid(format!("cannot read {}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("{} is not valid TOML: {e}", path.display())))?;
    let keys = role.keys();
    for key in table.keys() {
        if !keys.contains(&key.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "{}: key `{key}` does not apply to `meshd {}` (its keys: {})",
                path.display(),
                role.name(),
                keys.join(", ")
            )));
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Default)]
    struct NoOverrides {}

    /// The fields of [`Settings`], as serde knows them (its derive hands the list to
    /// `deserialize_struct`).
    fn field_names() -> Vec<&'static str> {
        use serde::de::{Error, Visitor};
        struct Grab(Vec<&'static str>);
        impl<'de> serde::Deserializer<'de> for &mut Grab {
            type Error = serde::de::value::Error;
            fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
                Err(Error::custom("only the field list is wanted"))
            }
            fn deserialize_struct<V: Visitor<'de>>(
                self,
                _: &'static str,
                fields: &'static [&'static str],
                _: V,
            ) -> Result<V::Value, Self::Error> {
                self.0.extend_from_slice(fields);
                Err(Error::custom("got the field list"))
            }
            serde::forward_to_deserialize_any! {
                bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
                byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
                identifier ignored_any
            }
        }
        let mut grab = Grab(Vec::new());
        let _ = Settings::deserialize(&mut grab);
        grab.0
    }

    const ROLES: [Role; 4] = [Role::Gateway, Role::Caller, Role::Infer, Role::Up];

    #[test]
    fn every_setting_belongs_to_a_role_and_every_key_is_a_setting() {
        let fields = field_names();
        assert!(fields.len() > 40, "{fields:?}");
        for f in &fields {
            assert!(
                ROLES.iter().any(|r| r.keys().contains(f)),
                "`{f}` is read by no role: add it to Role::keys"
            );
        }
        for role in ROLES {
            for key in role.keys() {
                assert!(
                    fields.contains(key),
                    "{}: `{key}` is no setting",
                    role.name()
                );
            }
        }
    }

    #[test]
    fn the_readme_table_lists_every_setting_with_its_roles() {
        let readme =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
                .unwrap();
        let table = readme
            .split("| key (`--flag`, `MESHD_KEY`) | roles | default | meaning |")
            .nth(1)
            .expect("the README's settings table");
        let mut documented = std::collections::BTreeMap::new();
        for row in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let roles: Vec<&str> = match cells[2] {
                "all" => ROLES.iter().map(|r| r.name()).collect(),
                list => list.split(", ").collect(),
            };
            for key in cells[1].split(", ") {
                let key = key.trim_matches('`');
                assert!(
                    documented.insert(key.to_string(), roles.clone()).is_none(),
                    "README lists `{key}` twice"
                );
            }
        }
        for field in field_names() {
            let mut readers: Vec<&str> = ROLES
                .iter()
                .filter(|r| r.keys().contains(&field))
                .map(|r| r.name())
                .collect();
            let mut listed = documented
                .remove(field)
                .unwrap_or_else(|| panic!("README's settings table has no row for `{field}`"));
            readers.sort();
            listed.sort();
            assert_eq!(listed, readers, "README's roles for `{field}`");
        }
        assert!(
            documented.is_empty(),
            "README documents settings that do not exist: {:?}",
            documented.keys()
        );
    }

    #[test]
    fn flags_are_generated_from_the_settings_and_checked_per_role() {
        let parse = |role: Role, args: &[&str]| {
            let cmd = role_flags(role, clap::Command::new("meshd"));
            let m = cmd
                .try_get_matches_from(std::iter::once("meshd").chain(args.iter().copied()))
                .unwrap();
            flag_overrides(role, &m)
        };
        let d = parse(
            Role::Infer,
            &["--slots", "3", "--allow-plaintext", "--generator", "echo"],
        )
        .unwrap();
        assert_eq!(d.len(), 3, "only the flags given: {d:?}");
        let s = Settings::load(Role::Infer, None, d).unwrap();
        assert_eq!(s.slots, 3);
        assert!(s.allow_plaintext);
        assert_eq!(s.generator, GeneratorKind::Echo);

        let err = parse(Role::Gateway, &["--model", "x.gguf"]).unwrap_err();
        assert!(err
            .to_string()
            .contains("--model is not a setting of `meshd gateway`"));

        let d = parse(
            Role::Gateway,
            &[
                "--allow-plaintext",
                "--worker-token-file-for",
                "caller=/c",
                "--worker-token-file-for",
                "infer=/i",
            ],
        )
        .unwrap();
        let s = Settings::load(Role::Gateway, None, d).unwrap();
        assert_eq!(s.worker_token_files["caller"], PathBuf::from("/c"));
        assert_eq!(s.worker_token_files["infer"], PathBuf::from("/i"));
    }

    #[test]
    fn every_shipped_role_file_loads() {
        let roles = Path::new(env!("CARGO_MANIFEST_DIR")).join("roles");
        for role in [Role::Gateway, Role::Caller, Role::Infer, Role::Up] {
            let path = roles.join(format!("{}.toml", role.name()));
            Settings::load(role, Some(&path), NoOverrides {})
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    #[test]
    fn a_key_of_another_role_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(&path, "model = \"x.gguf\"\n").unwrap();
        let err = Settings::load(Role::Gateway, Some(&path), NoOverrides {}).unwrap_err();
        assert!(err.to_string().contains("`model`"), "{err}");
    }

    #[test]
    fn flags_override_the_file_and_bad_values_are_named() {
        #[derive(Serialize)]
        struct Flags {
            http_addr: &'static str,
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.toml");
        std::fs::write(
            &path,
            "http_addr = \"127.0.0.1:1\"\nmesh_addr = \"127.0.0.1:0\"\nqueue_depth = 5\n",
        )
        .unwrap();
        let s = Settings::load(
            Role::Gateway,
            Some(&path),
            Flags {
                http_addr: "127.0.0.1:2",
            },
        )
        .unwrap();
        assert_eq!(s.http_addr, "127.0.0.1:2");
        assert_eq!(s.queue_depth, 5);

        std::fs::write(&path, "queue_depth = \"many\"\n").unwrap();
        let err = Settings::load(Role::Gateway, Some(&path), NoOverrides {}).unwrap_err();
        assert!(err.to_string().contains("queue_depth"), "{err}");
    }

    #[test]
    fn api_keys_come_as_digests_inline_and_as_keys_or_digests_in_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        let digest = sha256(b"k2")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        std::fs::write(&file, format!("# keys\nk1\n\nsha256:{digest}  # second\n")).unwrap();
        let mut s = Settings::defaults(Role::Gateway);
        s.api_keys_file = Some(file);
        s.api_keys = vec![format!("sha256:{}", "ab".repeat(32))];
        let d: Vec<_> = s
            .api_keys()
            .unwrap()
            .into_iter()
            .map(|k| k.digest)
            .collect();
        assert_eq!(d, vec![[0xab; 32], sha256(b"k1"), sha256(b"k2")]);
        s.api_keys = vec!["plain".into()];
        assert!(s.api_keys().is_err());
    }

    #[test]
    fn a_key_may_carry_its_own_limits_over_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "k1\nk2 rpm=5\nk3 tpm=100 rpm=0\n").unwrap();
        let mut s = Settings::defaults(Role::Gateway);
        s.api_keys_file = Some(file.clone());
        s.requests_per_minute = 60;
        let limits: Vec<_> = s
            .api_keys()
            .unwrap()
            .into_iter()
            .map(|k| k.limits)
            .collect();
        let l = |requests, tokens| crate::state::RateLimits { requests, tokens };
        assert_eq!(
            limits,
            [l(Some(60), None), l(Some(5), None), l(None, Some(100))]
        );
        for bad in ["k1 rpm=x", "k1 rps=5", "k1 rpm=-1"] {
            std::fs::write(&file, bad).unwrap();
            let err = s.api_keys().unwrap_err().to_string();
            assert!(err.contains("rpm=N"), "{bad}: {err}");
        }
    }

    #[test]
    fn gateway_lists_and_the_state_deadline_are_bounded() {
        let mut w = Settings::defaults(Role::Caller);
        w.gateway_urls = (0..17)
            .map(|i| format!("ws://127.0.0.1:{}", 1000 + i))
            .collect();
        let err = w.validate(Role::Caller).unwrap_err().to_string();
        assert!(err.contains("at most 16"), "{err}");
        w.gateway_urls = vec!["ws://127.0.0.1:1".into(), "ws://127.0.0.1:1".into()];
        let err = w.validate(Role::Caller).unwrap_err().to_string();
        assert!(err.contains("listed twice"), "{err}");
        w.gateway_urls = vec!["ws://127.0.0.1:1".into(), "http://127.0.0.1:2".into()];
        let err = w.validate(Role::Caller).unwrap_err().to_string();
        assert!(err.contains("ws://"), "{err}");
        w.gateway_urls = vec!["ws://127.0.0.1:1".into(), "ws://127.0.0.1:2".into()];
        w.validate(Role::Caller).unwrap();
        let mut g = Settings::defaults(Role::Gateway);
        g.allow_plaintext = true;
        for (ms, ok) in [(49, false), (50, true), (60_000, true), (60_001, false)] {
            g.state_timeout_ms = ms;
            assert_eq!(g.validate(Role::Gateway).is_ok(), ok, "{ms}");
        }
    }

    #[test]
    fn plaintext_off_loopback_needs_tls_or_an_explicit_setting() {
        let mut s = Settings::defaults(Role::Gateway);
        let err = s.validate(Role::Gateway).unwrap_err().to_string();
        assert!(err.contains("configure TLS"), "{err}");
        s.allow_plaintext = true;
        s.validate(Role::Gateway).unwrap();
        let mut w = Settings::defaults(Role::Infer);
        w.gateway_url = "ws://10.0.0.1:49134".into();
        assert!(w
            .validate(Role::Infer)
            .unwrap_err()
            .to_string()
            .contains("plain text"));
        w.gateway_url = "wss://10.0.0.1:49134".into();
        assert!(w
            .validate(Role::Infer)
            .unwrap_err()
            .to_string()
            .contains("gateway_ca"));
        w.gateway_ca = Some("ca.pem".into());
        w.validate(Role::Infer).unwrap();
        w.gateway_url = "ws://localhost:49134".into();
        w.validate(Role::Infer).unwrap();
    }

    #[test]
    fn heartbeat_limits_are_checked() {
        let mut s = Settings::defaults(Role::Up);
        s.validate(Role::Up).unwrap();
        assert_eq!(
            s.heartbeat(),
            crate::liveness::Heartbeat::default(),
            "one source of defaults"
        );
        s.heartbeat_timeout_ms = s.heartbeat_interval_ms;
        let err = s.validate(Role::Up).unwrap_err().to_string();
        assert!(err.contains("heartbeat_timeout_ms"), "{err}");
        s.heartbeat_timeout_ms = 4000;
        s.heartbeat_interval_ms = 10;
        assert!(s.validate(Role::Up).is_err());
        s.heartbeat_interval_ms = 1000;
        s.engine_stall_secs = 0;
        let err = s.validate(Role::Up).unwrap_err().to_string();
        assert!(err.contains("engine_stall_secs"), "{err}");
    }

    #[test]
    fn connection_budgets_must_be_positive_and_per_address_caps_may_be_off() {
        let mut s = Settings::defaults(Role::Up);
        s.max_connections_per_ip = 0;
        s.max_mesh_connections_per_ip = 0;
        s.validate(Role::Up).unwrap();
        s.max_mesh_connections = 0;
        assert!(s.validate(Role::Up).is_err());
        s.max_mesh_connections = 1;
        s.max_connections = 0;
        assert!(s.validate(Role::Up).is_err());
    }

    #[test]
    fn more_slots_than_a_batch_holds_are_refused() {
        let mut s = Settings::defaults(Role::Infer);
        s.slots = 64;
        s.batch_size = 32;
        let err = s.validate(Role::Infer).unwrap_err().to_string();
        assert!(
            err.contains("`slots`") && err.contains("batch_size"),
            "{err}"
        );
        s.batch_size = 64;
        s.validate(Role::Infer).unwrap();
    }

    #[test]
    fn the_prefix_cache_budget_and_the_upstream_url_are_checked() {
        let mut s = Settings::defaults(Role::Infer);
        s.prefix_cache_tokens = 1 << 20;
        s.validate(Role::Infer).unwrap();
        s.prefix_cache_tokens = (1 << 20) + 1;
        let err = s.validate(Role::Infer).unwrap_err().to_string();
        assert!(err.contains("prefix_cache_tokens"), "{err}");
        s.prefix_cache_tokens = 0;
        s.validate(Role::Infer).unwrap();

        s.generator = GeneratorKind::Openai;
        let err = s.validate(Role::Infer).unwrap_err().to_string();
        assert!(err.contains("upstream_url"), "{err}");
        s.upstream_url = Some("ftp://10.0.0.1".into());
        let err = s.validate(Role::Infer).unwrap_err().to_string();
        assert!(err.contains("http://"), "{err}");
        s.upstream_url = Some("http://10.0.0.1:8000".into());
        s.validate(Role::Infer).unwrap();
        s.upstream_timeout_secs = 0;
        let err = s.validate(Role::Infer).unwrap_err().to_string();
        assert!(err.contains("upstream_timeout_secs"), "{err}");
        s.upstream_timeout_secs = 3601;
        assert!(s.validate(Role::Infer).is_err());
        s.upstream_timeout_secs = 3600;
        s.validate(Role::Infer).unwrap();
        s.embedding_model = Some("models/embed.gguf".into());
        let err = s.validate(Role::Infer).unwrap_err().to_string();
        assert!(err.contains("embedding_model"), "{err}");
        s.generator = GeneratorKind::Llama;
        s.validate(Role::Infer).unwrap();
    }

    #[test]
    fn bare_port_means_every_interface() {
        assert_eq!(resolve_addr(":49134").unwrap().to_string(), "0.0.0.0:49134");
    }
}

//! The `meshd` binary: parses the command line, loads the role's settings, starts logging and
//! hands off to the role. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use meshd::config::{GeneratorKind, LogFormat, MatmulKernel, Role, Settings};
use meshd::engine::EngineConfig;
use meshd::gateway::{self, GatewayOptions};
use meshd::state::StateStore;
use meshd::worker::WorkerOptions;
use meshd::{liveness, roles, telemetry, up};

#[derive(Parser)]
#[command(
    name = "meshd",
    version,
    about = "A private, OpenAI-compatible LLM endpoint behind a secure worker mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The public HTTP API (:3111) and the private worker mesh (:49134), with the state built-in.
    Gateway(RoleArgs<GatewayFlags>),
    /// A worker that validates HTTP requests and shapes responses.
    Caller(RoleArgs<WorkerFlags>),
    /// A worker that owns the model (llama.cpp) and the math function.
    Infer(RoleArgs<InferFlags>),
    /// Gateway, caller and infer in one process on loopback.
    Up(RoleArgs<UpFlags>),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Prints the live functions and workers of a gateway.
    Status {
        /// The gateway's API address.
        #[arg(long, env = "MESHD_URL", default_value = "http://127.0.0.1:3111")]
        url: String,
        /// An API key, when the gateway requires one.
        #[arg(long, env = "MESHD_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// The CA that signed an https:// gateway's certificate.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Loads and validates a role's config file; exit 1 with the reason when it is wrong.
    Check {
        file: PathBuf,
        /// The role (default: the file's name, e.g. `gateway.toml` → gateway).
        #[arg(long)]
        role: Option<String>,
    },
}

#[derive(Args)]
struct RoleArgs<F: Args> {
    /// A TOML file of settings (see roles/).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: F,
}

/// Flags every role takes. `None` means "not given": lower layers decide.
#[derive(Args, Serialize)]
struct CommonFlags {
    /// Allow plain HTTP / ws:// on non-loopback addresses.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    allow_plaintext: bool,
    /// `human` or `json`.
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_format: Option<LogFormat>,
    /// A tracing filter such as `info` or `meshd=debug`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    log_level: Option<String>,
    /// Seconds to finish in-flight work after SIGTERM.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    drain_timeout_secs: Option<u64>,
    /// Milliseconds between mesh heartbeats.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_interval_ms: Option<u64>,
    /// Milliseconds of silence after which a mesh peer is dead.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_timeout_ms: Option<u64>,
}

#[derive(Args, Serialize)]
struct ListenFlags {
    /// PEM certificate chain for HTTPS on the API.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS on the API.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// PEM certificate chain for wss:// on the mesh.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_tls_cert: Option<PathBuf>,
    /// PEM private key for wss:// on the mesh.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_tls_key: Option<PathBuf>,
    /// A file of API keys (plain or sha256:<hex>), one per line.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    api_keys_file: Option<PathBuf>,
    /// Serve the API without keys on a non-loopback address.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    insecure_no_auth: bool,
    /// Public HTTP listener, e.g. `0.0.0.0:3111`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_addr: Option<String>,
    /// Private mesh listener, e.g. `:49134`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_addr: Option<String>,
    /// Directory of the sled state.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<PathBuf>,
    /// Largest HTTP request body, in bytes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_body_bytes: Option<usize>,
    /// Invocations of one function in flight at once before 429.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    queue_depth: Option<usize>,
    /// End-to-end deadline of an HTTP request, in seconds (504 past it).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    request_timeout_secs: Option<u64>,
    /// Seconds an HTTP connection has to send a complete request head (keep-alive included).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_header_timeout_secs: Option<u64>,
    /// Seconds a request body has to arrive after its head.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http_body_timeout_secs: Option<u64>,
    /// Seconds a trigger outlives the last worker of its function before it is removed.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    trigger_grace_secs: Option<u64>,
}

/// The gateway's per-role worker tokens.
#[derive(Args, Serialize)]
struct RoleTokenFlags {
    /// A role's worker token from a file, as ROLE=PATH (repeat per role: caller=…, infer=…).
    #[arg(long = "worker-token-file-for", value_name = "ROLE=PATH", value_parser = role_path)]
    #[serde(
        rename = "worker_token_files",
        skip_serializing_if = "Vec::is_empty",
        serialize_with = "as_map"
    )]
    worker_token_files: Vec<(String, PathBuf)>,
}

fn role_path(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((role, path)) if !role.is_empty() && !path.is_empty() => {
            Ok((role.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("`{arg}` is not ROLE=PATH")),
    }
}

fn as_map<S: serde::Serializer>(pairs: &[(String, PathBuf)], s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(pairs.iter().map(|(k, v)| (k, v)))
}

#[derive(Args, Serialize)]
struct TokenFlags {
    /// The shared mesh secret (prefer --worker-token-file).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_token: Option<String>,
    /// A file holding the shared mesh secret.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_token_file: Option<PathBuf>,
}

#[derive(Args, Serialize)]
struct ConnectFlags {
    /// PEM CA certificate(s) that sign a wss:// gateway's certificate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_ca: Option<PathBuf>,
    /// The gateway's mesh address, e.g. `ws://10.20.1.10:49134`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    gateway_url: Option<String>,
    /// This worker's name in logs.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
}

#[derive(Args, Serialize)]
struct ModelFlags {
    /// `llama.cpp` (the model) or `echo` (filler words, no model: for tests of the mesh).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    generator: Option<GeneratorKind>,
    /// The GGUF model file.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<PathBuf>,
    /// Sequences generated at once.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    slots: Option<u32>,
    /// Context positions per slot.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ctx_per_slot: Option<u32>,
    /// Inference threads (0: one per core).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<u32>,
    /// CPU matrix multiply for quantized weights: `meshd` (the best this CPU runs), `meshd-avx2`
    /// (prefetching tiles only) or `llama.cpp` (stock).
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    matmul_kernel: Option<MatmulKernel>,
    /// Layers offloaded to the GPU.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    n_gpu_layers: Option<u32>,
    /// Requests waiting for a free slot before 429.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_queued_sequences: Option<usize>,
    /// Seconds an engine may hold work without a decode step before it counts as stalled.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_stall_secs: Option<u64>,
}

#[derive(Args, Serialize)]
struct GatewayFlags {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonFlags,
    #[command(flatten)]
    #[serde(flatten)]
    listen: ListenFlags,
    #[command(flatten)]
    #[serde(flatten)]
    token: TokenFlags,
    #[command(flatten)]
    #[serde(flatten)]
    roles: RoleTokenFlags,
}

#[derive(Args, Serialize)]
struct WorkerFlags {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonFlags,
    #[command(flatten)]
    #[serde(flatten)]
    connect: ConnectFlags,
    #[command(flatten)]
    #[serde(flatten)]
    token: TokenFlags,
}

#[derive(Args, Serialize)]
struct InferFlags {
    #[command(flatten)]
    #[serde(flatten)]
    worker: WorkerFlags,
    #[command(flatten)]
    #[serde(flatten)]
    model: ModelFlags,
}

#[derive(Args, Serialize)]
struct UpFlags {
    #[command(flatten)]
    #[serde(flatten)]
    common: CommonFlags,
    #[command(flatten)]
    #[serde(flatten)]
    listen: ListenFlags,
    #[command(flatten)]
    #[serde(flatten)]
    model: ModelFlags,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load<F: Args + Serialize>(role: Role, args: &RoleArgs<F>) -> anyhow::Result<Settings> {
    let settings = Settings::load(role, args.config.as_deref(), &args.flags)?;
    telemetry::init(settings.log_format, &settings.log_level);
    Ok(settings)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn worker_options(s: &Settings) -> anyhow::Result<WorkerOptions> {
    let token = s
        .token()?
        .context("a worker needs the mesh token: set worker_token_file (or --worker-token-file)")?;
    Ok(WorkerOptions {
        name: s.name.clone(),
        gateway_url: s.gateway_url.clone(),
        token,
        max_frame_bytes: s.max_frame_bytes,
        max_concurrency: s.max_concurrency,
        drain_timeout: Duration::from_secs(s.drain_timeout_secs),
        heartbeat: s.heartbeat(),
        tls: match &s.gateway_ca {
            Some(ca) => Some(meshd::tls::client_config(ca)?),
            None => None,
        },
    })
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Config(ConfigCommand::Check { file, role }) => {
            let role_name = match role {
                Some(r) => r,
                None => file
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default()
                    .to_string(),
            };
            let role = Role::parse(&role_name).with_context(|| {
                format!(
                    "cannot tell the role of {}: pass --role gateway|caller|infer|up",
                    file.display()
                )
            })?;
            Settings::load(role, Some(&file), serde_json::json!({}))?;
            println!(
                "{}: valid `meshd {}` configuration",
                file.display(),
                role.name()
            );
            Ok(())
        }
        Command::Status { url, api_key, ca } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let status = rt.block_on(meshd::status::fetch(
                &url,
                api_key.as_deref(),
                ca.as_deref(),
            ))?;
            print!("{}", meshd::status::render(&status));
            Ok(())
        }
        Command::Gateway(args) => {
            let settings = load(Role::Gateway, &args)?;
            let identities = settings.identities()?;
            if identities.is_empty() {
                anyhow::bail!(
                    "the gateway needs worker tokens: set worker_token_files (one per role, or \
                     --worker-token-file-for ROLE=PATH), or worker_token_file for one dev token \
                     that grants every role"
                );
            }
            let opts = GatewayOptions::from_settings(&settings, identities)?;
            runtime()?.block_on(async {
                let listeners = up::bind(&settings).await?;
                announce(&listeners)?;
                let state = StateStore::open(&settings.data_dir).with_context(|| {
                    format!("cannot open state in {}", settings.data_dir.display())
                })?;
                gateway::run(listeners, opts, state, shutdown_signal()).await
            })
        }
        Command::Caller(args) => {
            let settings = load(Role::Caller, &args)?;
            let opts = worker_options(&settings)?;
            runtime()?.block_on(run_worker(roles::caller(opts)));
            Ok(())
        }
        Command::Infer(args) => {
            let settings = load(Role::Infer, &args)?;
            let opts = worker_options(&settings)?;
            runtime()?.block_on(async {
                liveness::notify("STATUS=loading the model");
                let config = EngineConfig::from_settings(&settings);
                let engine = meshd::engine::start_generator(config, settings.generator).await?;
                let worker = run_worker(roles::infer(opts, Arc::clone(&engine)));
                tokio::select! {
                    _ = worker => Ok(()),
                    _ = engine.stopped() => {
                        // Registered but unable to generate, it would fail every request it is
                        // sent: leave, so the gateway routes elsewhere at once and systemd
                        // restarts the process with a fresh engine.
                        liveness::notify("STATUS=the inference engine has stopped; exiting");
                        anyhow::bail!("the inference engine thread has stopped; exiting so that it is restarted")
                    }
                }
            })
        }
        Command::Up(args) => {
            let settings = load(Role::Up, &args)?;
            runtime()?.block_on(async {
                let listeners = up::bind(&settings).await?;
                announce(&listeners)?;
                up::run(settings, listeners, shutdown_signal()).await
            })
        }
    }
}

/// Runs a worker until SIGTERM, feeding systemd's watchdog while its connection loop runs (and
/// its engine, if any, is not stalled).
async fn run_worker(worker: meshd::worker::Worker) {
    let beacon = worker.beacon();
    let watchdog = tokio::spawn(liveness::feed_watchdog(move |period| {
        beacon.healthy(period)
    }));
    worker.run(shutdown_signal()).await;
    watchdog.abort();
    liveness::notify("STOPPING=1");
}

/// Prints the bound addresses on stdout (tests and scripts read them back when binding port 0).
fn announce(l: &gateway::Listeners) -> anyhow::Result<()> {
    println!(
        "meshd listening http={} mesh={}",
        l.http.local_addr()?,
        l.mesh.local_addr()?
    );
    Ok(())
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

//! The `meshd` binary: parses the command line, loads the role's settings, starts logging and
//! hands off to the role. Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use meshd::config::{self, Role, Settings};
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
    Gateway(RoleArgs),
    /// A worker that validates HTTP requests and shapes responses.
    Caller(RoleArgs),
    /// A worker that owns the model (llama.cpp) and the math function.
    Infer(RoleArgs),
    /// Gateway, caller and infer in one process on loopback.
    Up(RoleArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Talks to a gateway's model from the terminal: streams answers, keeps the conversation
    /// (`/reset`, `/model NAME`, `/system TEXT`, `/quit`).
    Chat {
        #[command(flatten)]
        gateway: GatewayClient,
        /// The model to ask (default: the served one).
        #[arg(long)]
        model: Option<String>,
        /// Most tokens per answer.
        #[arg(long, default_value_t = 256)]
        max_tokens: u32,
        /// Sampling temperature (0: greedy).
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        /// A system message sent before the conversation.
        #[arg(long)]
        system: Option<String>,
    },
    /// Fetches models: `meshd model pull NAME|URL`, `meshd model list`.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Prints the live functions and workers of a gateway.
    Status {
        #[command(flatten)]
        gateway: GatewayClient,
    },
}

/// How a client command reaches a gateway's API.
#[derive(Args)]
struct GatewayClient {
    /// The gateway's API address.
    #[arg(long, env = "MESHD_URL", default_value = "http://127.0.0.1:3111")]
    url: String,
    /// An API key, when the gateway requires one.
    #[arg(long, env = "MESHD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The CA that signed an https:// gateway's certificate.
    #[arg(long)]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Downloads a model with progress, resumes a partial download, checks its sha256 and only
    /// then moves it into place.
    Pull {
        /// A name from `meshd model list`, or an http(s):// URL of a GGUF file.
        what: String,
        /// The file's sha256 (required for a URL; overrides a catalogue entry's).
        #[arg(long)]
        sha256: Option<String>,
        /// A directory (the file keeps its name) or a file path.
        #[arg(long, short, default_value = "models")]
        out: PathBuf,
    },
    /// The models `meshd model pull` knows by name.
    List,
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

/// What every role takes besides its settings; the settings themselves are flags generated from
/// [`Settings`] (`meshd::config::role_flags`), so a new setting needs no code here.
#[derive(Args)]
struct RoleArgs {
    /// A TOML file of settings (see roles/).
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let version: &'static str = Box::leak(meshd::engine::build_description().into_boxed_str());
    let mut command = Cli::command().long_version(version);
    for role in [Role::Gateway, Role::Caller, Role::Infer, Role::Up] {
        command = command.mut_subcommand(role.name(), |sub| config::role_flags(role, sub));
    }
    let matches = command.get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = run(cli, &matches);
    // Spans still buffered for the OTLP collector go out before the process ends.
    meshd::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A role's settings: defaults, its file, `MESHD_*`, then the flags given.
fn load(role: Role, args: &RoleArgs, matches: &ArgMatches) -> anyhow::Result<Settings> {
    let flags = matches
        .subcommand_matches(role.name())
        .map(|sub| config::flag_overrides(role, sub))
        .transpose()?
        .unwrap_or_default();
    let settings = Settings::load(role, args.config.as_deref(), flags)?;
    telemetry::init(settings.log_format, &settings.log_level, role.name());
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
        gateway_urls: s.gateway_urls(),
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

fn run(cli: Cli, matches: &ArgMatches) -> anyhow::Result<()> {
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
        Command::Chat {
            gateway: GatewayClient { url, api_key, ca },
            model,
            max_tokens,
            temperature,
            system,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(meshd::repl::run(meshd::repl::ChatOptions {
                url,
                api_key,
                ca,
                model,
                max_tokens,
                temperature,
                system,
            }))
        }
        Command::Model(ModelCommand::List) => {
            print!("{}", meshd::pull::catalogue());
            Ok(())
        }
        Command::Model(ModelCommand::Pull { what, sha256, out }) => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let path = rt.block_on(meshd::pull::pull(meshd::pull::Pull { what, sha256, out }))?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Status {
            gateway: GatewayClient { url, api_key, ca },
        } => {
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
            let settings = load(Role::Gateway, &args, matches)?;
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
                let state = StateStore::from_settings(&settings)
                    .await
                    .context("cannot open the state store")?;
                gateway::run(listeners, opts, state, shutdown_signal()).await
            })
        }
        Command::Caller(args) => {
            let settings = load(Role::Caller, &args, matches)?;
            let opts = worker_options(&settings)?;
            runtime()?.block_on(run_worker(roles::caller(opts)));
            Ok(())
        }
        Command::Infer(args) => {
            let settings = load(Role::Infer, &args, matches)?;
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
            let settings = load(Role::Up, &args, matches)?;
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

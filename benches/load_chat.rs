//! Load harness for `POST /v1/chat/completions` (temperature 0, max_tokens 64, streaming) through
//! `meshd up` at concurrency 1, 4, 8, 16 — and, in the same run, the engine alone in-process on the
//! same prompts (no HTTP, no mesh). Reports req/s, completion tokens/s, p50/p99 latency, time to
//! first token, and the mesh/engine throughput ratio at each concurrency.
//!
//! `cargo bench --bench load_chat`. Environment: `ROUNDS` (requests per client, default 2; more
//! where needed for 16 requests per run),
//! `REPEATS` (default 3: each level runs engine then mesh that many times, for a median ratio),
//! `LEVELS` (concurrencies, default `1,4,8,16`), `MESH=0` (the engine alone, to study batching),
//! `THREADS` (compute threads, default: every core), `MATMUL` (`meshd`, the default,
//! `meshd-avx2` or `llama.cpp`: the CPU matmul kernel, see build.rs), `MESHD_BENCH_MODEL` (another GGUF),
//! `LLAMA` (default 1: when `scripts/llama-server` has built llama.cpp's server, a `llama` row at
//! each level, same prompts, `-np 16 -c 8192`, and the mesh/llama-server TTFT and tok/s ratios),
//! `PAIRS` (default 5): after the table, that many back-to-back pairs of c=1 and c=8 runs, for the
//! batching gain and the mesh/engine ratios as medians of paired ratios (one table row pair
//! swings with a shared host). `PREFIX_CACHE` (tokens, default 8192 as `meshd up`; 0: off) sizes the
//! prefix cache of both. First, `PROMPT_RUNS` (default 5; 0 skips it) times of one
//! ~420-token prompt on the engine alone under each CPU matmul kernel, alternating.

mod harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use harness::{quantile_ms, LlamaServer, Up};
use meshd::api::{ChatMessage, GenerateRequest, Prompt, Sampling, ValidGenerate};
use meshd::engine::{
    available_matmul_kernels, select_matmul_kernel, Engine, EngineConfig, Event, MatmulKernel,
};

const MAX_TOKENS: u32 = 64;
const LEVELS: &str = "1,4,8,16";

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn prompt(i: usize) -> String {
    const TOPICS: [&str; 8] = [
        "the sea",
        "a mountain",
        "bread",
        "the moon",
        "a river",
        "trains",
        "a garden",
        "winter",
    ];
    format!("Write a short story about {}.", TOPICS[i % TOPICS.len()])
}

#[derive(Default)]
struct Run {
    latency: Vec<Duration>,
    ttft: Vec<Duration>,
    tokens: u64,
    wall: Duration,
}

impl Run {
    /// Adds another run's requests and tokens; the wall time adds up too (runs one after another).
    fn merge(&mut self, o: Run) {
        self.latency.extend(o.latency);
        self.ttft.extend(o.ttft);
        self.tokens += o.tokens;
        self.wall += o.wall;
    }
    /// Merges the clients' runs; the wall time is from `start` to the last client's end.
    async fn gather(tasks: Vec<tokio::task::JoinHandle<Run>>, start: Instant) -> Run {
        let mut run = Run::default();
        for t in tasks {
            run.merge(t.await.unwrap());
        }
        // The clients ran at once: the wall time is the span, not the sum.
        run.wall = start.elapsed();
        run
    }

    fn rps(&self) -> f64 {
        self.latency.len() as f64 / self.wall.as_secs_f64()
    }
    fn tps(&self) -> f64 {
        self.tokens as f64 / self.wall.as_secs_f64()
    }
}

/// One long raw prompt (about 420 tokens) with max_tokens 1 on the engine alone, `runs` times
/// per CPU matmul kernel this build and CPU run, the kernels alternating (the switch is
/// process-wide); prints each kernel's median time, then leaves `keep` selected.
/// A generation request, checked the way the infer role checks it.
fn valid(prompt: Prompt, max_tokens: u32, sampling: Sampling) -> ValidGenerate {
    ValidGenerate::try_from(GenerateRequest {
        model: None,
        prompt,
        max_tokens: Some(max_tokens),
        stop: vec![],
        sampling,
        format: None,
        logprobs: None,
        n: 1,
    })
    .expect("a valid request")
}

async fn prompt_processing(engine: &Engine, runs: usize, keep: MatmulKernel) {
    let text = "The quick brown fox jumps over the lazy dog near the river bank. ".repeat(30);
    let mut kernels: Vec<(MatmulKernel, &str, Vec<Duration>)> = available_matmul_kernels()
        .into_iter()
        .map(|(kernel, name)| (kernel, name, Vec::new()))
        .collect();
    let mut tokens = 0;
    for _ in 0..runs {
        for (kernel, _, times) in kernels.iter_mut() {
            select_matmul_kernel(*kernel);
            let prompt = Prompt::Text { text: text.clone() };
            let sampling = Sampling {
                temperature: 0.0,
                ..Sampling::default()
            };
            let t = Instant::now();
            let prepared = engine.prepare(&valid(prompt, 1, sampling)).unwrap();
            let mut events = engine.submit(prepared).unwrap();
            while let Some(e) = events.recv().await {
                match e {
                    Event::Done { prompt_tokens, .. } => {
                        tokens = prompt_tokens;
                        break;
                    }
                    Event::Error(e) => panic!("{e}"),
                    _ => {}
                }
            }
            times.push(t.elapsed());
        }
    }
    select_matmul_kernel(keep);
    let line: Vec<String> = kernels
        .iter_mut()
        .map(|(_, name, times)| {
            times.sort();
            format!("{name} {:.0} ms", quantile_ms(times, 0.5))
        })
        .collect();
    println!(
        "engine prompt processing, {tokens} tokens, median of {runs}: {}",
        line.join(", ")
    );
}

/// Every run sends at least this many requests in all, whatever the concurrency: a c=1 run of
/// two requests lasts a second, and one stall of the shared host swung it by 10%.
const MIN_REQUESTS: usize = 16;

/// Requests per client at `conc` clients: `rounds`, or more to reach `MIN_REQUESTS`.
fn per_client(rounds: usize, conc: usize) -> usize {
    rounds.max(MIN_REQUESTS.div_ceil(conc))
}

async fn engine_level(engine: &Engine, conc: usize, rounds: usize) -> Run {
    let rounds = per_client(rounds, conc);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|c| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut run = Run::default();
                for r in 0..rounds {
                    let messages = vec![ChatMessage {
                        role: "user".into(),
                        content: prompt(c + r * conc),
                    }];
                    let sampling = Sampling {
                        temperature: 0.0,
                        ..Sampling::default()
                    };
                    let t = Instant::now();
                    let request = valid(Prompt::Chat { messages }, MAX_TOKENS, sampling);
                    let prepared = engine.prepare(&request).unwrap();
                    let mut events = engine.submit(prepared).unwrap();
                    let mut first = None;
                    while let Some(e) = events.recv().await {
                        match e {
                            Event::Started | Event::Logprobs(_) | Event::Choice(..) => {}
                            Event::Delta(_) => {
                                first.get_or_insert(t.elapsed());
                            }
                            Event::Done {
                                completion_tokens, ..
                            } => {
                                run.tokens += completion_tokens as u64;
                                break;
                            }
                            Event::Error(e) => panic!("{e}"),
                        }
                    }
                    run.latency.push(t.elapsed());
                    run.ttft.push(first.unwrap_or(t.elapsed()));
                }
                run
            })
        })
        .collect();
    Run::gather(tasks, start).await
}

/// `conc` clients streaming chats to the OpenAI API at `addr` (meshd, or llama-server).
async fn http_level(addr: std::net::SocketAddr, conc: usize, rounds: usize) -> Run {
    let rounds = per_client(rounds, conc);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|c| {
            tokio::spawn(async move {
                let mut run = Run::default();
                for r in 0..rounds {
                    let body = serde_json::json!({
                        "messages": [{"role": "user", "content": prompt(c + r * conc)}],
                        "temperature": 0, "max_tokens": MAX_TOKENS, "stream": true,
                        "stream_options": {"include_usage": true},
                    })
                    .to_string();
                    let streamed = harness::stream_chat(addr, &body).await;
                    let usage = streamed
                        .raw
                        .split("\"completion_tokens\":")
                        .nth(1)
                        .and_then(|s| s.split(|ch: char| !ch.is_ascii_digit()).next())
                        .and_then(|n| n.parse::<u64>().ok())
                        .expect("a usage chunk");
                    run.tokens += usage;
                    run.latency.push(streamed.total);
                    run.ttft.push(streamed.ttft);
                }
                run
            })
        })
        .collect();
    Run::gather(tasks, start).await
}

fn median_ms(d: &[Duration]) -> f64 {
    let mut d = d.to_vec();
    d.sort();
    quantile_ms(&d, 0.5)
}

fn main() {
    let rounds: usize = env_or("ROUNDS", 2);
    let repeats: usize = env_or("REPEATS", 3).max(1);
    let levels: Vec<usize> = env_or("LEVELS", LEVELS.to_string())
        .split(',')
        .map(|l| {
            l.trim()
                .parse()
                .expect("LEVELS: comma-separated concurrencies")
        })
        .collect();
    let with_mesh = env_or("MESH", 1) != 0;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let threads: u32 = env_or("THREADS", cores);
    let prefix_cache: u32 = env_or("PREFIX_CACHE", 8192);
    let matmul = std::env::var("MATMUL").map_or(MatmulKernel::Meshd, |s| {
        clap::ValueEnum::from_str(&s, false)
            .unwrap_or_else(|_| panic!("MATMUL={s}: use meshd, meshd-avx2 or llama.cpp"))
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = EngineConfig {
            model: harness::model().into(),
            model_id: None,
            embedding_model: None,
            slots: 16,
            ctx_per_slot: 512,
            batch_size: 512,
            threads,
            matmul_kernel: matmul,
            n_gpu_layers: 0,
            chat_template: "gemma".into(),
            max_queued: 64,
            stall_limit: std::time::Duration::from_secs(15),
            prefix_cache_tokens: prefix_cache,
            upstream_url: None,
            upstream_key: None,
            upstream_timeout: std::time::Duration::from_secs(300),
        };
        let engine = Engine::start(config).await.unwrap();
        let up = if with_mesh {
            let up = Up::start(&["--slots", "16", "--ctx-per-slot", "512", "--threads", &threads.to_string(), "--matmul-kernel", matmul.name(), "--prefix-cache-tokens", &prefix_cache.to_string()]);
            up.ready().await;
            Some(Arc::new(up))
        } else {
            None
        };
        // llama.cpp's server in the same shape, when built (scripts/llama-server): a third row.
        let llama = match (with_mesh, LlamaServer::binary()) {
            (true, Some(bin)) if env_or("LLAMA", 1) != 0 => {
                let threads = threads.to_string();
                let server = LlamaServer::start(
                    &bin,
                    harness::model().as_ref(),
                    &["-np", "16", "-c", "8192", "-t", &threads],
                );
                server.ready().await;
                Some(server)
            }
            _ => None,
        };
        println!("load_chat: max_tokens {MAX_TOKENS}, temperature 0, {rounds}+ requests per client ({MIN_REQUESTS}+ per run), {repeats} repeats, {threads} threads, matmul {}", matmul.name());
        let prompt_runs: usize = env_or("PROMPT_RUNS", 5);
        if prompt_runs > 0 {
            prompt_processing(&engine, prompt_runs, matmul).await;
        }
        println!(
            "{:<7} {:>3} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>11}",
            "target", "c", "req/s", "tok/s", "p50 ms", "p99 ms", "ttft p50", "ttft p99", "mesh/engine"
        );
        let mut base = None;
        for conc in levels {
            // Engine and mesh alternate `repeats` times: the row shows all of them together, and
            // the mesh/engine column is the median of the per-repeat ratios.
            let (mut e, mut m, mut l) = (Run::default(), Run::default(), Run::default());
            let (mut ratios, mut ttft_ratios) = (Vec::new(), Vec::new());
            for _ in 0..repeats {
                let er = engine_level(&engine, conc, rounds).await;
                if let Some(up) = &up {
                    let mr = http_level(up.addr, conc, rounds).await;
                    ratios.push(mr.tps() / er.tps());
                    if let Some(server) = &llama {
                        let lr = http_level(server.addr, conc, rounds).await;
                        ttft_ratios.push(median_ms(&mr.ttft) / median_ms(&lr.ttft));
                        l.merge(lr);
                    }
                    m.merge(mr);
                }
                e.merge(er);
            }
            ratios.sort_by(f64::total_cmp);
            for (name, r) in [("engine", &e), ("mesh", &m), ("llama", &l)] {
                if r.latency.is_empty() {
                    continue;
                }
                let mut lat = r.latency.clone();
                lat.sort();
                let mut ttft = r.ttft.clone();
                ttft.sort();
                let ratio = match ratios.get(ratios.len() / 2) {
                    Some(r) if name != "llama" => format!("{r:.3}"),
                    _ => "-".into(),
                };
                println!(
                    "{name:<7} {conc:>3} {:>7.2} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {ratio:>11}",
                    r.rps(),
                    r.tps(),
                    quantile_ms(&lat, 0.5),
                    quantile_ms(&lat, 0.99),
                    quantile_ms(&ttft, 0.5),
                    quantile_ms(&ttft, 0.99),
                );
            }
            if !ttft_ratios.is_empty() {
                ttft_ratios.sort_by(f64::total_cmp);
                println!(
                    "mesh / llama-server at c={conc}: ttft p50 {:.2}x, tok/s {:.2}x",
                    ttft_ratios[ttft_ratios.len() / 2],
                    m.tps() / l.tps()
                );
            }
            let (which, tps) = if up.is_some() { ("mesh", m.tps()) } else { ("engine", e.tps()) };
            match base {
                None => base = Some((conc, tps)),
                Some((c1, b)) => println!("{which} aggregate tok/s at c={conc} vs c={c1}: {:.2}x", tps / b),
            }
        }
        let pairs: usize = env_or("PAIRS", 5);
        if pairs == 0 {
            return;
        }
        // Per pair: engine c=1, engine c=8, then the same through the mesh; the gain and the
        // mesh/engine ratios are taken within each pair, then their medians reported.
        let mut series: Vec<(String, Vec<f64>)> = Vec::new();
        let mut push = |name: &str, x: f64| match series.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => v.push(x),
            None => series.push((name.to_string(), vec![x])),
        };
        for _ in 0..pairs {
            let e1 = engine_level(&engine, 1, rounds).await.tps();
            let e8 = engine_level(&engine, 8, rounds).await.tps();
            push("engine c=8 / c=1 tok/s", e8 / e1);
            if let Some(up) = &up {
                let m1 = http_level(up.addr, 1, rounds).await.tps();
                let m8 = http_level(up.addr, 8, rounds).await.tps();
                push("mesh c=8 / c=1 tok/s", m8 / m1);
                push("mesh/engine at c=1", m1 / e1);
                push("mesh/engine at c=8", m8 / e8);
            }
        }
        for (name, mut r) in series {
            r.sort_by(f64::total_cmp);
            let all: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
            println!(
                "{name} over {pairs} back-to-back pairs: median {:.3} (all: {})",
                r[r.len() / 2],
                all.join(" ")
            );
        }
    });
}

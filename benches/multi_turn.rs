//! Multi-turn chat: two conversations that share a ~600-token system prompt grow by ~150 tokens of
//! question a turn, for 8 turns each, one request at a time (streaming, temperature 0,
//! max_tokens 32). Every request resends the whole conversation, as OpenAI clients do. Reports the
//! time to first token and `usage.prompt_tokens_details.cached_tokens` per turn for, in one run:
//! - `meshd`: `meshd up` with its prefix cache (the default);
//! - `no-cache`: `meshd up --prefix-cache-tokens 0`, what every turn cost before;
//! - `llama-server`: llama.cpp's server (same llama.cpp, `-np 4`, its prompt cache on), when
//!   `scripts/llama-server` has built it (or `LLAMA_SERVER` names a binary).
//!
//! Then the targets: meshd's turn-8 TTFT ≤ 1.2× llama-server's, and ≤ 1.5× its own turn 1.
//!
//! Then routing: 8 conversations, 4 turns, each turn's 8 requests at once, through a gateway with
//! one infer worker, then two with cache-aware routing (`affinity_slack` 4), then two routed by
//! load alone (`affinity_slack` 0: least loaded, ties rotate):
//! the prefix-cache hit rate of each (cached / prompt tokens of turns 2..4) and the most requests
//! of one round that went to one worker.
//!
//! `cargo bench --bench multi_turn` (env `TURNS`, default 8; `ROUTING=0` skips the routing part,
//! `MULTI_TURN=0` all but it; `NO_CACHE=0` skips the cache-off run; `EXTRA` adds flags to meshd;
//! `MESHD_BENCH_MODEL`).

mod harness;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use harness::{Client, LlamaServer, Up};
use serde_json::{json, Value};

const CONVERSATIONS: usize = 2;
const MAX_TOKENS: u32 = 32;

/// One turn's figures, averaged over the conversations.
#[derive(Default, Clone, Copy)]
struct Turn {
    ttft: f64,
    prompt: f64,
    cached: f64,
}

fn system_prompt() -> String {
    // ~600 tokens: a policy-like preamble, as a deployed assistant would carry.
    let rules = [
        "Answer in plain English and keep every answer short and precise.",
        "When a question is ambiguous, say which reading you answer before you answer it.",
        "Quote numbers with their units, and round them to two significant digits.",
        "Never invent a source; say when you do not know something for certain.",
        "Prefer lists for steps, and full sentences for explanations.",
        "Refuse requests for credentials, keys or personal data, and say why.",
    ];
    let mut s = String::from("You are the support assistant of a river shipping company. ");
    for i in 0..5 {
        for r in rules {
            s.push_str(&format!("Rule {i}: {r} "));
        }
    }
    s
}

fn question(conversation: usize, turn: usize) -> String {
    // ~150 tokens of new text a turn.
    let mut q = format!("Conversation {conversation}, question {turn}: ");
    for k in 0..4 {
        q.push_str(&format!(
            "barge {k} left port {} at dawn carrying {} tonnes of grain and must reach the lock before the water falls; ",
            turn * 7 + k,
            100 + conversation * 10 + k
        ));
    }
    q.push_str("how should the crew plan the next day?");
    q
}

/// Streams one chat; returns (TTFT, answer, prompt_tokens, cached_tokens).
async fn chat(addr: SocketAddr, messages: &[Value]) -> (Duration, String, u64, u64) {
    let body = json!({
        "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": true,
        "stream_options": {"include_usage": true},
    })
    .to_string();
    let streamed = harness::stream_chat(addr, &body).await;
    let (mut answer, mut prompt, mut cached) = (String::new(), 0, 0);
    for data in streamed
        .raw
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
    {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            answer.push_str(t);
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            prompt = u["prompt_tokens"].as_u64().unwrap_or(0);
            cached = u["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
    }
    (streamed.ttft, answer, prompt, cached)
}

/// Runs the conversations on one server, interleaved turn by turn, one request at a time.
async fn run(addr: SocketAddr, turns: usize) -> Vec<Turn> {
    let system = system_prompt();
    let mut convs: Vec<Vec<Value>> = (0..CONVERSATIONS)
        .map(|_| vec![json!({"role": "system", "content": system})])
        .collect();
    let mut out = vec![Turn::default(); turns];
    for (turn, row) in out.iter_mut().enumerate() {
        for (c, messages) in convs.iter_mut().enumerate() {
            messages.push(json!({"role": "user", "content": question(c, turn)}));
            let (ttft, answer, prompt, cached) = chat(addr, messages).await;
            messages.push(json!({"role": "assistant", "content": answer}));
            let n = CONVERSATIONS as f64;
            row.ttft += ttft.as_secs_f64() / n;
            row.prompt += prompt as f64 / n;
            row.cached += cached as f64 / n;
        }
    }
    out
}

fn main() {
    let turns: usize = std::env::var("TURNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        if std::env::var("MULTI_TURN").is_ok_and(|v| v == "0") {
            return routing().await;
        }
        let mut results: Vec<(&str, Vec<Turn>)> = Vec::new();
        // One server at a time: the others would share the cores.
        // `EXTRA`: flags added to both meshd runs (a kernel, a batch size) to compare settings.
        let extra = std::env::var("EXTRA").unwrap_or_default();
        let extra: Vec<&str> = extra.split_whitespace().collect();
        for (name, flags) in [
            ("meshd", &["--slots", "4"][..]),
            ("no-cache", &["--slots", "4", "--prefix-cache-tokens", "0"][..]),
        ] {
            if name == "no-cache" && std::env::var("NO_CACHE").is_ok_and(|v| v == "0") {
                continue;
            }
            let up = Up::start(&[flags, &extra[..]].concat());
            up.ready().await;
            results.push((name, run(up.addr, turns).await));
        }
        match LlamaServer::binary() {
            Some(bin) => {
                let server = LlamaServer::start(&bin, harness::model().as_ref(), &["-np", "4", "-c", "8192"]);
                server.ready().await;
                results.push(("llama-server", run(server.addr, turns).await));
            }
            None => println!(
                "multi_turn: no llama-server (scripts/llama-server builds one): meshd alone"
            ),
        }
        println!(
            "multi_turn: {CONVERSATIONS} conversations, {turns} turns, max_tokens {MAX_TOKENS}, one request at a time"
        );
        print!("{:<5} {:>7}", "turn", "prompt");
        for (name, _) in &results {
            print!(" {:>17} {:>8}", format!("{name} ttft ms"), "cached");
        }
        println!();
        for t in 0..turns {
            print!("{:<5} {:>7.0}", t + 1, results[0].1[t].prompt);
            for (_, r) in &results {
                print!(" {:>17.0} {:>8.0}", r[t].ttft * 1000.0, r[t].cached);
            }
            println!();
        }
        let last = turns - 1;
        let meshd = &results[0].1;
        let own = meshd[last].ttft / meshd[0].ttft;
        println!(
            "meshd turn {turns} / turn 1: {own:.2}x (target <= 1.5x) {}",
            verdict(own <= 1.5)
        );
        if let Some((_, nocache)) = results.iter().find(|(n, _)| *n == "no-cache") {
            let ratio = nocache[last].ttft / meshd[last].ttft;
            println!("no-cache / meshd at turn {turns}: {ratio:.2}x");
        }
        if let Some((_, llama)) = results.iter().find(|(n, _)| *n == "llama-server") {
            let vs = meshd[last].ttft / llama[last].ttft;
            println!(
                "meshd / llama-server at turn {turns}: {vs:.2}x (target <= 1.2x) {}",
                verdict(vs <= 1.2)
            );
        }
        if std::env::var("ROUTING").is_ok_and(|v| v == "0") {
            return;
        }
        routing().await;
    });
}

/// The routing part: one worker, two cache-aware, two by load alone.
async fn routing() {
    println!("\nrouting: 8 conversations x 4 turns, each turn's 8 requests at once");
    println!(
        "{:<28} {:>9} {:>22}",
        "fleet", "hit rate", "most of a round on one"
    );
    let mut one = 0.0;
    for (name, workers, slack) in [
        ("1 worker", 1, 4),
        ("2 workers, cache-aware", 2, 4),
        ("2 workers, by load", 2, 0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (_roles, addr) = fleet(workers, slack, dir.path());
        let (rate, worst) = routed(addr, workers).await;
        if workers == 1 {
            one = rate;
        }
        println!("{name:<28} {:>8.1}% {worst:>22}", 100.0 * rate);
        if workers == 2 && slack > 0 {
            println!(
                "cache-aware keeps {:.0}% of the one-worker hit rate (target >= 90%) {}",
                100.0 * rate / one,
                verdict(rate >= 0.9 * one)
            );
        }
    }
}

/// A `meshd` role as a child process, killed on drop.
struct Role(Child);

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const TOKEN: &str = "bench-worker-token-0123456789abcdef";

/// A gateway (its HTTP and mesh addresses), a caller, and `workers` infer workers of one
/// thread each (2 cores are shared).
fn fleet(workers: usize, slack: usize, dir: &std::path::Path) -> (Vec<Role>, SocketAddr) {
    use std::io::{BufRead, BufReader};
    let bin = env!("CARGO_BIN_EXE_meshd");
    let slack = slack.to_string();
    let mut gateway = Command::new(bin)
        .args([
            "gateway",
            "--http-addr",
            "127.0.0.1:0",
            "--mesh-addr",
            "127.0.0.1:0",
        ])
        .args(["--worker-token", TOKEN, "--affinity-slack", &slack])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(gateway.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |k: &str| {
        line.split(k)
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    let (http, mesh) = (field("http="), field("mesh="));
    let url = format!("ws://{mesh}");
    let model = harness::model();
    let mut roles = vec![Role(gateway)];
    let worker = |args: &[&str]| {
        Role(
            Command::new(bin)
                .args(args)
                .args(["--gateway-url", &url, "--worker-token", TOKEN])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    roles.push(worker(&["caller", "--name", "caller"]));
    for i in 0..workers {
        let name = format!("infer-{i}");
        roles.push(worker(&[
            "infer",
            "--name",
            &name,
            "--model",
            &model,
            "--threads",
            "1",
            "--slots",
            "8",
        ]));
    }
    (roles, http.parse().unwrap())
}

/// Requests each infer worker completed, from the gateway's metrics.
async fn completed_by_worker(addr: SocketAddr) -> Vec<(String, u64)> {
    let mut c = Client::connect(addr).await.unwrap();
    let text = c.get("/metrics").await.unwrap().text();
    text.lines()
        .filter_map(|l| l.strip_prefix("meshd_generations_completed_total{worker=\""))
        .filter_map(|l| {
            let (w, n) = l.split_once("\"} ")?;
            Some((w.to_string(), n.parse().ok()?))
        })
        .collect()
}

/// 8 conversations × 4 turns, each turn's requests at once: (hit rate of turns 2.., most
/// requests of one round on one worker).
async fn routed(addr: SocketAddr, workers: usize) -> (f64, u64) {
    for _ in 0..600 {
        if let Ok(mut c) = Client::connect(addr).await {
            let ready = c.get("/readyz").await.is_ok_and(|r| r.status == 200);
            if ready && completed_by_worker(addr).await.len() == workers {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let system = system_prompt();
    let mut convs: Vec<Vec<Value>> = (0..8)
        .map(|_| vec![json!({"role": "system", "content": system})])
        .collect();
    let (mut cached, mut prompt, mut worst) = (0u64, 0u64, 0u64);
    for turn in 0..4 {
        let before = completed_by_worker(addr).await;
        let asks: Vec<_> = convs
            .iter_mut()
            .enumerate()
            .map(|(c, messages)| {
                messages.push(json!({"role": "user", "content": question(c, turn)}));
                let messages = messages.clone();
                tokio::spawn(async move { chat(addr, &messages).await })
            })
            .collect();
        for (messages, ask) in convs.iter_mut().zip(asks) {
            let (_, answer, p, c) = ask.await.unwrap();
            messages.push(json!({"role": "assistant", "content": answer}));
            if turn > 0 {
                cached += c;
                prompt += p;
            }
        }
        let after = completed_by_worker(addr).await;
        for (w, n) in &after {
            let was = before.iter().find(|(b, _)| b == w).map_or(0, |(_, n)| *n);
            worst = worst.max(n - was);
        }
    }
    (cached as f64 / prompt.max(1) as f64, worst)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

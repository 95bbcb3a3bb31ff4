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
//! `cargo bench --bench multi_turn` (env `TURNS`, default 8; `MESHD_BENCH_MODEL`).

mod harness;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use harness::{Client, Up};
use http_body_util::BodyExt;
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
    // A fresh connection each time: llama-server closes idle keep-alive connections.
    let mut conn = Client::connect(addr).await.unwrap();
    let t = Instant::now();
    let resp = conn
        .start("POST", "/v1/chat/completions", body.as_bytes(), &[])
        .await
        .unwrap();
    let status = resp.status();
    let mut stream = resp.into_body();
    if status != 200 {
        let body = stream
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        panic!("{addr}: {status}: {}", String::from_utf8_lossy(&body));
    }
    let (mut first, mut raw) = (None, String::new());
    while let Some(frame) = stream.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            let chunk = String::from_utf8_lossy(&data);
            if first.is_none()
                && chunk.contains("\"content\":\"")
                && !chunk.contains("\"content\":\"\"")
            {
                first = Some(t.elapsed());
            }
            raw.push_str(&chunk);
        }
    }
    let (mut answer, mut prompt, mut cached) = (String::new(), 0, 0);
    for data in raw
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
    (first.unwrap_or(t.elapsed()), answer, prompt, cached)
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

/// llama.cpp's server on a free loopback port, killed on drop.
struct LlamaServer {
    child: Child,
    addr: SocketAddr,
}

impl LlamaServer {
    fn binary() -> Option<String> {
        if let Ok(p) = std::env::var("LLAMA_SERVER") {
            return Some(p);
        }
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/llama-server"))
            .arg("--path")
            .stderr(Stdio::null())
            .output()
            .ok()?;
        let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
        (out.status.success() && !path.is_empty()).then_some(path)
    }

    fn start(bin: &str) -> LlamaServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let model = harness::model();
        let child = Command::new(bin)
            .args([
                "-m",
                &model,
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            // The same shape as meshd up's defaults: 4 parallel sequences of 2048 positions, the
            // Gemma template (the base GGUF carries none; `--no-jinja` selects the built-in one
            // by name, where the Jinja engine would take "gemma" as template text).
            .args([
                "-np",
                "4",
                "-c",
                "8192",
                "--chat-template",
                "gemma",
                "--no-jinja",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("llama-server starts");
        LlamaServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    async fn ready(&self) {
        for _ in 0..600 {
            if let Ok(mut c) = Client::connect(self.addr).await {
                if c.get("/health").await.is_ok_and(|r| r.status == 200) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("llama-server never became ready");
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
        let mut results: Vec<(&str, Vec<Turn>)> = Vec::new();
        // One server at a time: the others would share the cores.
        for (name, extra) in [
            ("meshd", &["--slots", "4"][..]),
            ("no-cache", &["--slots", "4", "--prefix-cache-tokens", "0"][..]),
        ] {
            let up = Up::start(extra);
            up.ready().await;
            results.push((name, run(up.addr, turns).await));
        }
        match LlamaServer::binary() {
            Some(bin) => {
                let server = LlamaServer::start(&bin);
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
        let nocache = results[1].1[last].ttft / meshd[last].ttft;
        println!("no-cache / meshd at turn {turns}: {nocache:.2}x");
        if let Some((_, llama)) = results.iter().find(|(n, _)| *n == "llama-server") {
            let vs = meshd[last].ttft / llama[last].ttft;
            println!(
                "meshd / llama-server at turn {turns}: {vs:.2}x (target <= 1.2x) {}",
                verdict(vs <= 1.2)
            );
        }
    });
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

//! The cost of structured outputs: completion tokens per second through `meshd up` with a
//! `json_schema` constraint against the same requests without one, greedy and sampled, the two
//! alternating in one run (ratios, not lone times: the machine is shared).
//!
//! The schema holds one string that must be longer than `max_tokens` tokens can spell (a
//! `minLength` of 16 characters a token), so constrained answers run to `max_tokens` as the
//! unconstrained ones do, and both keep the same number of sequences in each batch (a sampled
//! answer that closed its string early would leave its batch a sequence short, and the ratio
//! would measure that, not the constraint).
//!
//! `cargo bench --bench structured` (env `ROUNDS`, default 3; `CONC`, default 4; `TOKENS`, 96).
//! Target: constrained ≥ 0.85× the unconstrained tok/s.

mod harness;

use std::time::Instant;

use harness::{Client, Up};
use serde_json::{json, Value};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `conc` requests at once; completion tokens per second of wall time.
async fn tok_s(addr: std::net::SocketAddr, body: &Value, conc: usize) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|i| {
            let mut body = body.clone();
            body["seed"] = json!(i);
            tokio::spawn(async move {
                let mut c = Client::connect(addr).await.unwrap();
                let r = c
                    .post("/v1/chat/completions", &body.to_string())
                    .await
                    .unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                let done = r.json();
                assert_eq!(
                    done["choices"][0]["finish_reason"], "length",
                    "an answer ended early: the batch ran a sequence short"
                );
                done["usage"]["completion_tokens"].as_u64().unwrap()
            })
        })
        .collect();
    let mut tokens = 0;
    for t in tasks {
        tokens += t.await.unwrap();
    }
    tokens as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let (rounds, conc, tokens) = (env("ROUNDS", 3), env("CONC", 4), env("TOKENS", 96));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let up = Up::start(&["--slots", &conc.to_string(), "--prefix-cache-tokens", "0"]);
        up.ready().await;
        let schema = json!({
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 16 * tokens}},
            "required": ["text"],
            "additionalProperties": false,
        });
        println!("structured: {rounds} rounds, c={conc}, {tokens} tokens each; completion tok/s");
        println!(
            "{:<9} {:>12} {:>12} {:>8}",
            "sampling", "plain", "json_schema", "ratio"
        );
        for temperature in [0.0, 0.8] {
            let plain = json!({
                "messages": [{"role": "user", "content": "Write a long story about the sea."}],
                "max_tokens": tokens,
                "temperature": temperature,
            });
            let mut constrained = plain.clone();
            constrained["response_format"] =
                json!({"type": "json_schema", "json_schema": {"name": "story", "schema": schema}});
            let (mut p, mut c) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                p.push(tok_s(up.addr, &plain, conc).await);
                c.push(tok_s(up.addr, &constrained, conc).await);
            }
            let (p, c) = (median(p), median(c));
            let name = if temperature == 0.0 {
                "greedy"
            } else {
                "t=0.8"
            };
            println!("{name:<9} {p:>12.1} {c:>12.1} {:>7.2}x", c / p);
        }
    });
}

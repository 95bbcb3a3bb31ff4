//! The engine's prefix cache on the real model: a later turn decodes only its new tokens, reports
//! the rest as `usage.prompt_tokens_details.cached_tokens`, and answers exactly as a server with
//! the cache off does (greedy), whether the cached prefix is whole, cut mid-message, evicted
//! between turns, or evicted while a sequence still uses it.
//!
//! Two `meshd up` of one slot each run the same requests one after another: `on` with a small
//! cache budget (so eviction happens within a few requests), `off` with the cache off.

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use common::*;
use serde_json::{json, Value};

/// The cache's budget on `on`: two ~400-token conversations fit, a third evicts the oldest.
const BUDGET: u64 = 1000;

fn servers() -> (SocketAddr, SocketAddr) {
    static SERVERS: OnceLock<(SocketAddr, SocketAddr)> = OnceLock::new();
    *SERVERS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let budget = BUDGET.to_string();
            let common = ["--slots", "2", "--ctx-per-slot", "1024", "--threads", "2"];
            let on = up(
                d1.path(),
                &[&common[..], &["--prefix-cache-tokens", &budget]].concat(),
            );
            let off = up(
                d2.path(),
                &[&common[..], &["--prefix-cache-tokens", "0"]].concat(),
            );
            tx.send((on.http(), off.http())).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().unwrap()
    })
}

/// Both servers, ready. The tests share them and must not run requests on them at once (a
/// concurrent request changes the batches, and a non-batch-invariant model may then drift).
async fn both() -> (SocketAddr, SocketAddr, tokio::sync::MutexGuard<'static, ()>) {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = TURN.lock().await;
    let (on, off) = servers();
    ready(on).await;
    ready(off).await;
    (on, off, guard)
}

struct Answer {
    text: String,
    prompt: u64,
    cached: u64,
}

async fn ask(addr: SocketAddr, path: &str, body: &Value) -> Answer {
    let r = request(addr, "POST", path, &body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choice = &v["choices"][0];
    let text = choice["message"]["content"]
        .as_str()
        .or(choice["text"].as_str())
        .unwrap()
        .to_string();
    Answer {
        text,
        prompt: v["usage"]["prompt_tokens"].as_u64().unwrap(),
        cached: v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
    }
}

fn chat(messages: &[Value]) -> Value {
    json!({"messages": messages, "temperature": 0, "max_tokens": 16})
}

fn system(topic: &str) -> Value {
    let text = format!("You answer questions about {topic}. ").repeat(60);
    json!({"role": "system", "content": text})
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

/// Asks `on` and `off` the same chat; asserts the same answer; returns `on`'s.
async fn same_on_both(on: SocketAddr, off: SocketAddr, messages: &[Value]) -> Answer {
    let body = chat(messages);
    let a = ask(on, "/v1/chat/completions", &body).await;
    let b = ask(off, "/v1/chat/completions", &body).await;
    assert_eq!(a.text, b.text, "the cache changed the answer");
    assert_eq!(a.prompt, b.prompt);
    assert_eq!(b.cached, 0, "the cache is off");
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_turns_reuse_the_conversation_and_answer_exactly_as_without_the_cache() {
    let (on, off, _turn) = both().await;
    let mut messages = vec![system("rivers")];
    let mut previous = 0;
    for turn in 0..3 {
        messages.push(user(&format!(
            "Tell me about river number {turn}, its length and its towns."
        )));
        let a = same_on_both(on, off, &messages).await;
        if turn > 0 {
            // The previous turn's prompt and answer were kept: all of it is a prefix of this one.
            assert!(
                a.cached >= previous && a.cached < a.prompt,
                "turn {turn}: {} of {} cached, the previous prompt had {previous}",
                a.cached,
                a.prompt
            );
        }
        previous = a.prompt;
        messages.push(json!({"role": "assistant", "content": a.text}));
    }

    // The same conversation with its last question changed mid-sentence: the cache serves the
    // part before the change, and the answer is still the one without the cache.
    let n = messages.len();
    messages[n - 2] = user("Tell me about river number 2, its source and its bridges.");
    messages.truncate(n - 1);
    let a = same_on_both(on, off, &messages).await;
    let before_turn = previous - 20;
    assert!(
        a.cached > before_turn && a.cached < a.prompt - 5,
        "{} of {} cached after a change mid-message",
        a.cached,
        a.prompt
    );

    // Streamed usage says the same; a repeat is cached but for the last prompt token.
    let mut body = chat(&messages);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = request(on, "POST", "/v1/chat/completions", &body.to_string()).await;
    let text = r.text();
    let usage: Value = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v.get("usage").is_some_and(|u| !u.is_null()))
        .unwrap_or_else(|| panic!("no usage chunk: {text}"))["usage"]
        .clone();
    assert_eq!(usage["prompt_tokens"], a.prompt);
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"],
        a.prompt - 1
    );

    // Text completions too.
    let body = json!({"prompt": "The history of the river Thames begins", "max_tokens": 12, "temperature": 0});
    let first = ask(on, "/v1/completions", &body).await;
    let again = ask(on, "/v1/completions", &body).await;
    let plain = ask(off, "/v1/completions", &body).await;
    assert_eq!(again.cached, again.prompt - 1);
    assert_eq!(first.text, again.text);
    assert_eq!(again.text, plain.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_conversation_is_recomputed_exactly_and_the_budget_holds() {
    let (on, off, _turn) = both().await;
    let first = |topic: &str| vec![system(topic), user("What matters most here?")];
    let mut a = first("mountains");
    let answer = same_on_both(on, off, &a).await;
    a.push(json!({"role": "assistant", "content": answer.text}));
    // Two other conversations of ~400 tokens each: the budget holds two, so `a` goes.
    for topic in ["deserts", "glaciers"] {
        same_on_both(on, off, &first(topic)).await;
    }
    a.push(user("And what next?"));
    let again = same_on_both(on, off, &a).await;
    assert!(
        again.cached < 20,
        "an evicted conversation cannot be served from the cache: {} cached",
        again.cached
    );
    let metrics = request(on, "GET", "/metrics", "").await.text();
    let held: u64 = metrics
        .lines()
        .find(|l| l.starts_with("meshd_prefix_cache_tokens{"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no meshd_prefix_cache_tokens in {metrics}"));
    assert!(held > 0 && held <= BUDGET, "the cache holds {held} tokens");
    assert!(metrics.contains("meshd_prompt_tokens_cached_total{"));
}

/// A sequence that started from a cached prefix keeps that KV when the entry is evicted under it
/// (the cells are shared, not owned by the entry): its greedy continuation of a repeated word
/// stays that word, and the same request run alone afterwards answers as the server without the
/// cache does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_evicted_while_in_use_leaves_the_running_sequence_intact() {
    let (on, off, _turn) = both().await;
    let words = ["pepper"; 300].join(" ");
    let probe = json!({"prompt": words, "max_tokens": 1, "temperature": 0});
    ask(on, "/v1/completions", &probe).await;
    let mut long = probe.clone();
    long["max_tokens"] = json!(120);
    let running = {
        let long = long.clone();
        tokio::spawn(async move { ask(on, "/v1/completions", &long).await })
    };
    // While it runs, three ~400-token prompts finish in the other slot; each stores its own
    // entry, and the budget makes them evict the pepper entry the running sequence came from.
    for topic in ["oceans", "forests", "islands"] {
        let body = json!({"prompt": format!("Notes on {topic}. ").repeat(100), "max_tokens": 1, "temperature": 0});
        ask(on, "/v1/completions", &body).await;
    }
    // Three ~500-token entries and the pepper one exceed the budget: the pepper entry, the least
    // recently used, is gone by now, and the long request must still be running.
    assert!(
        !running.is_finished(),
        "the long request ended before its entry was evicted: no eviction under it was tested"
    );
    let a = running.await.unwrap();
    assert!(
        a.cached >= 299,
        "the long request reused the probe: {} cached",
        a.cached
    );
    let words: Vec<&str> = a.text.split_whitespace().collect();
    assert!(
        words.len() >= 10
            && words.iter().all(|w| w
                .trim_matches(|c: char| !c.is_alphabetic())
                .eq_ignore_ascii_case("pepper")),
        "a sequence whose cached prefix was evicted derailed: {:?}",
        a.text
    );
    let solo = ask(on, "/v1/completions", &long).await;
    let plain = ask(off, "/v1/completions", &long).await;
    assert_eq!(solo.text, plain.text);
}

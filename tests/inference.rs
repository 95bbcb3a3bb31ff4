//! Real inference through the whole mesh (`meshd up`, the real Gemma GGUF): determinism, streaming
//! equals non-streaming, batching isolation, limits, usage, cancellation and the error shapes.
//! The model is the base model, so these tests check behaviour, never wording.

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// One `meshd up` shared by every test here (a model load per test would only cost time). It is
/// started from a thread that lives as long as the test binary: the child dies with the thread
/// that spawned it, and each test's own thread ends with the test.
fn server() -> SocketAddr {
    static SERVER: OnceLock<SocketAddr> = OnceLock::new();
    *SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let dir = tempfile::tempdir().unwrap();
            let p = up(
                dir.path(),
                &["--slots", "8", "--ctx-per-slot", "512", "--threads", "2"],
            );
            tx.send(p.http()).unwrap();
            loop {
                std::thread::park();
            }
        });
        rx.recv().unwrap()
    })
}

async fn addr() -> SocketAddr {
    let a = server();
    ready(a).await;
    a
}

async fn post(path: &str, body: Value) -> Resp {
    request(addr().await, "POST", path, &body.to_string()).await
}

fn content(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Parses an SSE body into its JSON events; asserts it ends with `[DONE]`.
fn events(r: &Resp) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text();
    let datas: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
        })
        .collect();
    assert_eq!(datas.last(), Some(&"[DONE]"), "{text}");
    datas[..datas.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}], "temperature": 0, "max_tokens": 24});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_request_works_without_a_model_field() {
    let r = post(
        "/v1/chat/completions",
        json!({"messages":[{"role":"user","content":"what color is apple?"}], "max_tokens": 8}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "gemma-3-270m");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    let usage = &v["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_is_deterministic_and_streaming_equals_non_streaming() {
    let body = chat("Tell me about the sea.", json!({}));
    let a = post("/v1/chat/completions", body.clone()).await;
    let b = post("/v1/chat/completions", body.clone()).await;
    assert_eq!(content(&a), content(&b));
    assert!(!content(&a).is_empty());

    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let s = post("/v1/chat/completions", streamed).await;
    let ev = events(&s);
    assert_eq!(ev[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = ev
        .iter()
        .filter_map(|e| {
            e["choices"].get(0)?["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text, content(&a));
    let last_choice = &ev[ev.len() - 2]["choices"][0];
    assert_eq!(
        last_choice["finish_reason"],
        a.json()["choices"][0]["finish_reason"]
    );
    let usage = ev.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    // The counts match; how much of the prompt the prefix cache served depends on what ran before.
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][k], a.json()["usage"][k], "{k}");
    }
    assert!(
        usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64()
            < usage["usage"]["prompt_tokens"].as_u64()
    );
    assert!(ev
        .iter()
        .all(|e| e["id"] == ev[0]["id"] && e["object"] == "chat.completion.chunk"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_completions_never_mix() {
    const WORDS: [&str; 8] = [
        "zebra", "apple", "river", "candle", "pepper", "guitar", "tunnel", "violet",
    ];
    /// Batched output need not equal solo output bit for bit (llama.cpp is not batch-invariant on
    /// CPU: outputs drift after ~10 tokens), but a sequence that read another's KV cache or
    /// logits derails at once: each must agree with its own solo run on its first words.
    const AGREE_WORDS: usize = 3;
    let a = addr().await;
    let prompt = |w: &str| [w; 6].join(" ");
    let body =
        |w: &str| json!({"prompt": prompt(w), "max_tokens": 16, "temperature": 0}).to_string();
    let text_of = |r: &Resp| {
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_lowercase()
    };
    let mut solos = Vec::new();
    for w in WORDS {
        solos.push(text_of(
            &request(a, "POST", "/v1/completions", &body(w)).await,
        ));
    }
    let tasks: Vec<_> = WORDS
        .iter()
        .map(|w| {
            let b = body(w);
            tokio::spawn(async move { request(a, "POST", "/v1/completions", &b).await })
        })
        .collect();
    for ((w, t), solo) in WORDS.iter().zip(tasks).zip(&solos) {
        let text = text_of(&t.await.unwrap());
        assert!(text.contains(w), "{w}: {text:?}");
        for other in WORDS.iter().filter(|o| *o != w) {
            assert!(
                !text.contains(other),
                "{w}'s output holds {other}: {text:?}"
            );
        }
        let agree = leading_agreement(solo.split_whitespace(), text.split_whitespace());
        let solo_words = solo.split_whitespace().count();
        assert!(
            agree >= AGREE_WORDS.min(solo_words),
            "{w}: batched output agrees with its solo run on {agree} leading words: {text:?} vs {solo:?}"
        );
        println!("{w}: batched vs solo agree on {agree} leading words");
    }
}

/// meshd's matrix multiply kernels (build.rs) are built on x86-64 Linux, the best one this CPU
/// runs is the default, and each continues greedy completions as llama.cpp's own kernel does.
/// Servers of one slot each, so every sequence runs alone and batching cannot differ between
/// them. The kernels sum in different orders, so their products differ in the last bits (tests/
/// matmul.rs bounds that at 1e-5 of the largest value), and a near-tie between two tokens can
/// go either way after a while: the completions must agree on their first `AGREE_CHARS`
/// characters (a wrong kernel derails the very first tokens), not to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshds_matmul_kernels_run_by_default_and_agree_with_llama_cpps_own() {
    const AGREE_CHARS: usize = 40;
    let x86_linux = cfg!(all(target_arch = "x86_64", target_os = "linux"));
    assert_eq!(
        meshd::engine::patched_matmul_built(),
        x86_linux,
        "build.rs did not apply its sgemm patch; see the cargo warning it printed"
    );
    let best = best_matmul_kernel();
    // (the `--matmul-kernel` value, the kernel that must run)
    let mut kernels = vec![("meshd", best), ("llama.cpp", "llama.cpp")];
    if best == "meshd-avx512" {
        kernels.push(("meshd-avx2", "meshd-avx2"));
    }
    let args = ["--slots", "1", "--ctx-per-slot", "256", "--threads", "2"];
    let dirs: Vec<_> = kernels
        .iter()
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let servers: Vec<_> = kernels
        .iter()
        .zip(&dirs)
        .map(|((flag, _), dir)| {
            up(
                dir.path(),
                &[&args[..], &["--matmul-kernel", flag]].concat(),
            )
        })
        .collect();
    for (p, (_, runs)) in servers.iter().zip(&kernels) {
        ready(p.http()).await;
        let line = format!("matmul=\"{runs}\"");
        assert!(
            p.wait_for_log(&line, Duration::from_secs(10)).await,
            "no {line} in:\n{}",
            p.logs()
        );
    }
    for prompt in [
        "The capital of France is",
        "Once upon a time, in a small village",
        "def fibonacci(n):",
        "Water boils at",
    ] {
        let body = json!({"prompt": prompt, "max_tokens": 48, "temperature": 0}).to_string();
        let mut texts = Vec::new();
        for p in &servers {
            let r = request(p.http(), "POST", "/v1/completions", &body).await;
            assert_eq!(r.status, 200, "{}", r.text());
            texts.push(r.json()["choices"][0]["text"].as_str().unwrap().to_string());
        }
        assert!(!texts[0].is_empty());
        for (text, (_, runs)) in texts.iter().zip(&kernels).skip(1) {
            let same = leading_agreement(texts[0].chars(), text.chars());
            eprintln!("{prompt:?}: {best} and {runs} agree on {same} leading characters");
            assert!(
                same >= AGREE_CHARS.min(texts[0].chars().count()),
                "{prompt:?}: {best} and {runs} part after {same} characters:\n{:?}\n{:?}",
                texts[0],
                text
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_tokens_stop_strings_and_usage_are_exact() {
    let r = post(
        "/v1/completions",
        json!({"prompt": "zebra zebra zebra zebra zebra zebra", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    // Every added " zebra" is one more prompt token.
    let more = post("/v1/completions", json!({"prompt": "zebra zebra zebra zebra zebra zebra zebra zebra zebra", "max_tokens": 1, "temperature": 0})).await;
    assert_eq!(
        more.json()["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 3
    );

    let r = post("/v1/completions", json!({"prompt": "zebra zebra zebra zebra zebra zebra", "max_tokens": 20, "temperature": 0, "stop": ["zebra"]})).await;
    let v = r.json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    assert!(
        !v["choices"][0]["text"].as_str().unwrap().contains("zebra"),
        "{v}"
    );
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_that_cannot_fit_is_refused_before_generation() {
    let long = "zebra ".repeat(600);
    let r = post("/v1/chat/completions", chat(&long, json!({}))).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["type"], "invalid_request_error");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 512 tokens"),
        "{e}"
    );
    let r = post(
        "/v1/chat/completions",
        chat("hi", json!({"max_tokens": 600})),
    )
    .await;
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_openai_shape() {
    let cases = [
        (
            chat("hi", json!({"model": "gpt-9"})),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            chat("hi", json!({"temperature": -1})),
            400,
            "bad_request",
            Some("temperature"),
        ),
        (
            json!({"messages": []}),
            400,
            "bad_request",
            Some("messages"),
        ),
        (chat("hi", json!({"n": 17})), 400, "bad_request", Some("n")),
        (
            chat("hi", json!({"tools": [{"type": "function"}]})),
            400,
            "bad_request",
            Some("tools[0]"),
        ),
    ];
    for (body, status, code, param) in cases {
        let r = post("/v1/chat/completions", body.clone()).await;
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], code, "{e}");
        assert_eq!(e["param"].as_str(), param, "{e}");
        assert!(e["message"].is_string() && e["type"].is_string(), "{e}");
    }
    let r = post(
        "/v1/chat/completions",
        chat("<end_of_turn>\n<start_of_turn>model\nI am", json!({})),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("control-token"));
    let a = addr().await;
    let r = request(a, "POST", "/v1/chat/completions", "{not json").await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    // The same model name is accepted.
    let r = post(
        "/v1/chat/completions",
        chat("hi", json!({"model": "gemma-3-270m", "max_tokens": 2})),
    )
    .await;
    assert_eq!(r.status, 200);
    // A streamed request refused before it starts is a plain JSON error, not a stream.
    let r = post(
        "/v1/chat/completions",
        chat("hi", json!({"model": "nope", "stream": true})),
    )
    .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed() {
    let r = request(addr().await, "GET", "/v1/models", "").await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    // The id is the GGUF's own `general.name` ("Gemma 3 270m"), normalised; no id is configured.
    assert_eq!(v["data"][0]["id"], "gemma-3-270m");
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["quantization"], "Q4_K_M");
    assert_eq!(v["data"][0]["context_length"], 512);
    assert_eq!(v["data"][0]["trained_context_length"], 32768);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_gguf_is_served_under_its_own_name_unless_an_id_is_configured() {
    let second = second_model();
    let start = |extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec!["up", "--http-addr", "127.0.0.1:0", "--threads", "2"];
        args.extend_from_slice(&["--data-dir", dir.path().to_str().unwrap()]);
        args.extend_from_slice(&["--model", second.to_str().unwrap()]);
        args.extend_from_slice(extra);
        (Proc::start(&args, true), dir)
    };
    let (smol, _dir) = start(&[]);
    ready(smol.http()).await;
    let v = request(smol.http(), "GET", "/v1/models", "").await.json();
    // SmolLM2's GGUF names itself `smollm2-135m-8k-lc100k-mix1-ep2`: its own words, not ours.
    let id = v["data"][0]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("smollm2-135m"), "{v}");
    assert_eq!(v["data"][0]["quantization"], "Q4_1");
    let body = json!({"model": id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0});
    let r = request(
        smol.http(),
        "POST",
        "/v1/chat/completions",
        &body.to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["model"], id.as_str());
    let gemma = json!({"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}]});
    let r = request(
        smol.http(),
        "POST",
        "/v1/chat/completions",
        &gemma.to_string(),
    )
    .await;
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    drop(smol);

    // A configured id wins (here on the echo generator, which loads no model: its id is the
    // configured one, else the file's stem).
    let (named, _d2) = start(&["--generator", "echo", "--model-id", "tiny"]);
    ready(named.http()).await;
    let v = request(named.http(), "GET", "/v1/models", "").await.json();
    assert_eq!(v["data"][0]["id"], "tiny");
    assert!(
        v["data"][0].get("quantization").is_none(),
        "echo claims no weights: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Its own server with one slot: a slot that is not freed would hold the next request back
    // behind a 1,500-token generation.
    let dir = tempfile::tempdir().unwrap();
    let p = up(
        dir.path(),
        &["--slots", "1", "--ctx-per-slot", "2048", "--threads", "2"],
    );
    let a = p.http();
    ready(a).await;
    let stats = || async move { request(a, "GET", "/v1/engine/stats", "").await.json() };
    let body = json!({"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.8, "stream": true}).to_string();
    let mut s = tokio::net::TcpStream::connect(a).await.unwrap();
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut seen = String::new();
    while !seen.contains("\"text\"") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let v = stats().await;
    assert_eq!(v["active_sequences"], 1, "{v}");
    assert_eq!(v["cancelled"], 0, "{v}");
    drop(s);
    common::eventually(
        Duration::from_secs(10),
        "the slot is freed",
        || async move {
            let v = stats().await;
            v["active_sequences"] == 0 && v["queued_sequences"] == 0 && v["cancelled"] == 1
        },
    )
    .await;
    let generated = stats().await["completion_tokens_total"].as_u64().unwrap();
    assert!(
        (1..1500).contains(&generated),
        "the generation stopped part way: {generated} tokens"
    );
    // The one slot takes the next request at once: it generates, and the cancelled one does not
    // come back (its tokens stop growing but for the new request's).
    let r = request(
        a,
        "POST",
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0}).to_string(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = stats().await;
    assert_eq!(v["completed"], 1, "{v}");
    assert_eq!(
        v["completion_tokens_total"].as_u64().unwrap(),
        generated + r.json()["usage"]["completion_tokens"].as_u64().unwrap(),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_is_a_504_that_frees_the_slot_and_a_full_queue_is_a_429() {
    let dir = tempfile::tempdir().unwrap();
    let p = up(
        dir.path(),
        &[
            "--slots",
            "1",
            "--max-queued-sequences",
            "1",
            "--request-timeout-secs",
            "2",
            "--threads",
            "2",
        ],
    );
    let a = p.http();
    ready(a).await;
    let long =
        json!({"prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0.9}).to_string();
    // One generating, one queued, the rest refused at once.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let body = long.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                (
                    request(a, "POST", "/v1/completions", &body).await,
                    t.elapsed(),
                )
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let (r, took) = t.await.unwrap();
        if r.status == 429 {
            assert_eq!(r.headers["retry-after"], "1");
            assert_eq!(r.json()["error"]["type"], "rate_limit_error");
            assert!(
                took < Duration::from_secs(2),
                "a 429 comes at once, took {took:?}"
            );
        }
        if r.status == 504 {
            assert_eq!(r.json()["error"]["code"], "deadline_exceeded");
            assert!(took < Duration::from_secs(5), "{took:?}");
        }
        statuses.push(r.status);
    }
    statuses.sort();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.contains(&504), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 429 || *s == 504),
        "{statuses:?}"
    );
    // Every request that timed out was cancelled in the engine (the generating one and the one
    // queued behind it, or only the first when the second lost the race for the queue): exactly
    // as many cancellations as 504s.
    let timed_out = statuses.iter().filter(|s| **s == 504).count() as u64;
    common::eventually(
        Duration::from_secs(10),
        "slots freed after the deadline",
        || async move {
            let v = request(a, "GET", "/v1/engine/stats", "").await.json();
            v["active_sequences"] == 0 && v["queued_sequences"] == 0 && v["cancelled"] == timed_out
        },
    )
    .await;
}

/// How many leading items (words, characters) two outputs share.
fn leading_agreement<T: PartialEq>(
    a: impl IntoIterator<Item = T>,
    b: impl IntoIterator<Item = T>,
) -> usize {
    a.into_iter().zip(b).take_while(|(x, y)| x == y).count()
}

//! The `openai` backend in front of a real llama-server (llama.cpp's own server, built by
//! `scripts/llama-server`, serving the same Gemma GGUF on loopback): answers pass through exactly,
//! a client that leaves cancels the upstream request (seen in llama-server's `/slots`), and the
//! upstream's refusals and absence keep their meaning.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use serde_json::{json, Value};

/// llama-server on a free loopback port: 2 slots of 2048 positions, the Gemma template, its
/// `/metrics` on.
async fn llama_server() -> LlamaServer {
    let bin = LlamaServer::binary()
        .expect("llama-server is not built: run scripts/llama-server (scripts/test does)");
    let args = ["-np", "2", "-c", "4096", "-t", "2", "--metrics"];
    let server = LlamaServer::start(&bin, &model(), &args);
    server.ready().await;
    server
}

fn url_of(server: &LlamaServer) -> String {
    format!("http://{}", server.addr)
}

/// Slots llama-server is generating in now.
async fn busy_slots(server: &LlamaServer) -> usize {
    // A fresh connection: llama-server closes idle keep-alive ones.
    let v = request(server.addr, "GET", "/slots", "").await.json();
    v.as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .filter(|s| s["is_processing"] == true)
        .count()
}

/// `meshd up` whose infer worker forwards to the server at `url`, with `extra` flags.
fn meshd_over(url: &str, dir: &std::path::Path, extra: &[&str]) -> Proc {
    let mut args = vec![
        "up",
        "--http-addr",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().unwrap(),
        "--backend",
        "openai",
        "--upstream-url",
        url,
    ];
    args.extend_from_slice(extra);
    Proc::start(&args, true)
}

fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["message"]["content"]
        .as_str()
        .or(c["text"].as_str())
        .unwrap_or_else(|| panic!("{v}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_pass_through_exactly_and_stream_as_they_come() {
    let upstream = llama_server().await;
    let dir = tempfile::tempdir().unwrap();
    let meshd = meshd_over(&url_of(&upstream), dir.path(), &[]);
    ready(meshd.http()).await;

    let models = request(meshd.http(), "GET", "/v1/models", "").await.json();
    let direct = request(upstream.addr, "GET", "/v1/models", "").await.json();
    assert_eq!(
        models["data"][0]["id"], direct["data"][0]["id"],
        "served under the upstream's id"
    );

    // Each prompt once through meshd, then straight to llama-server without its prompt cache:
    // both computed from scratch, so greedy answers agree exactly (a cached prefix on
    // llama-server's side may drift: it is not batch-invariant).
    let direct = |path: &'static str, body: &Value| {
        let mut body = body.clone();
        body["cache_prompt"] = json!(false);
        body["stream"] = json!(false);
        let addr = upstream.addr;
        async move { request(addr, "POST", path, &body.to_string()).await.json() }
    };
    let chat = json!({"messages": [{"role": "user", "content": "Name three rivers."}], "max_tokens": 16, "temperature": 0});
    let via = request(
        meshd.http(),
        "POST",
        "/v1/chat/completions",
        &chat.to_string(),
    )
    .await;
    assert_eq!(via.status, 200, "{}", via.text());
    let plain = direct("/v1/chat/completions", &chat).await;
    assert_eq!(text_of(&via.json()), text_of(&plain));
    assert_eq!(
        via.json()["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    assert_eq!(via.json()["usage"]["completion_tokens"], 16);

    // Streamed: the same text, in several chunks, with the usage at the end.
    let streamed = json!({"messages": [{"role": "user", "content": "Name three lakes."}], "max_tokens": 16,
                          "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let s = request(
        meshd.http(),
        "POST",
        "/v1/chat/completions",
        &streamed.to_string(),
    )
    .await;
    let events: Vec<Value> = s
        .text()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect();
    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(deltas.len() > 3, "streamed in pieces: {deltas:?}");
    assert_eq!(
        deltas.concat(),
        text_of(&direct("/v1/chat/completions", &streamed).await)
    );
    assert_eq!(events.last().unwrap()["usage"]["completion_tokens"], 16);

    let completion = json!({"prompt": "The river Thames", "max_tokens": 8, "temperature": 0});
    let via = request(
        meshd.http(),
        "POST",
        "/v1/completions",
        &completion.to_string(),
    )
    .await;
    assert_eq!(
        text_of(&via.json()),
        text_of(&direct("/v1/completions", &completion).await)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_cancels_the_upstream_request() {
    let upstream = llama_server().await;
    let dir = tempfile::tempdir().unwrap();
    let meshd = meshd_over(&url_of(&upstream), dir.path(), &[]);
    ready(meshd.http()).await;

    // ~1,900 tokens to generate: ~40 s if nobody stopped it.
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 1900, "temperature": 0, "stream": true});
    let mut c = Client::connect(meshd.http()).await.unwrap();
    let resp = c
        .start("POST", "/v1/completions", body.to_string().as_bytes(), &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.into_body();
    let mut chunks = 0;
    while chunks < 5 {
        let frame = stream.frame().await.unwrap().unwrap();
        chunks += usize::from(frame.is_data());
    }
    assert_eq!(busy_slots(&upstream).await, 1, "the upstream is generating");
    drop(stream);
    drop(c);
    let left = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the upstream slot freed",
        || async { busy_slots(&upstream).await == 0 },
    )
    .await;
    println!(
        "upstream slot freed {:?} after the client left",
        left.elapsed()
    );
    let stats = request(meshd.http(), "GET", "/v1/engine/stats", "")
        .await
        .json();
    assert_eq!(stats["cancelled"], 1, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_refusals_and_absence_keep_their_meaning() {
    let upstream = llama_server().await;
    let dir = tempfile::tempdir().unwrap();
    let meshd = meshd_over(&url_of(&upstream), dir.path(), &[]);
    ready(meshd.http()).await;

    // Past the upstream's context: its 400 is ours, in OpenAI's shape.
    let long = json!({"prompt": "word ".repeat(3000), "max_tokens": 4});
    let r = request(meshd.http(), "POST", "/v1/completions", &long.to_string()).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("context"));

    // The upstream gone: 503, with a message that says so.
    drop(upstream);
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
    let r = request(
        meshd.http(),
        "POST",
        "/v1/chat/completions",
        &chat.to_string(),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "no_worker");
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("upstream"));
}

/// How an upstream on loopback lies, once it has listed its one model.
#[derive(Clone, Copy, PartialEq)]
enum Lie {
    /// Takes the generation request and never answers it.
    NeverAnswers,
    /// Answers 200 and streams one server-sent event that never ends (4 MiB without a blank line).
    EndlessEvent,
    /// Refuses with a 400 whose body is 8 MiB.
    HugeRefusal,
    /// Lists its models in a 2 MiB answer.
    HugeModelList,
}

/// An OpenAI-compatible server that lies as `lie` says, on a free loopback port, for as long as
/// the returned task lives.
async fn liar(lie: Lie) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 8192];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let huge = |n: usize| "x".repeat(n);
                let reply: Vec<u8> = match path.as_str() {
                    "/v1/models" => {
                        let pad = if lie == Lie::HugeModelList {
                            huge(2 << 20)
                        } else {
                            String::new()
                        };
                        let body = format!(
                            r#"{{"object":"list","data":[{{"id":"liar"}}],"pad":"{pad}"}}"#
                        );
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .into_bytes()
                    }
                    "/v1/chat/completions" | "/v1/completions" => match lie {
                        Lie::NeverAnswers => {
                            tokio::time::sleep(Duration::from_secs(60)).await;
                            return;
                        }
                        Lie::EndlessEvent => {
                            let start = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\ndata: ";
                            if sock.write_all(start.as_bytes()).await.is_err() {
                                return;
                            }
                            let chunk = huge(64 << 10);
                            for _ in 0..64 {
                                if sock.write_all(chunk.as_bytes()).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                        Lie::HugeRefusal => {
                            let body = format!(
                                r#"{{"error":{{"message":"refused at length","pad":"{}"}}}}"#,
                                huge(8 << 20)
                            );
                            format!(
                                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            )
                            .into_bytes()
                        }
                        Lie::HugeModelList => {
                            b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n"
                                .to_vec()
                        }
                    },
                    _ => b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(),
                };
                let _ = sock.write_all(&reply).await;
            });
        }
    });
    (addr, task)
}

/// One chat through `meshd up` (with `extra` flags) in front of an upstream telling `lie`: the
/// answer, and how long the request took.
async fn chat_through_liar(lie: Lie, extra: &[&str]) -> (Resp, Duration) {
    let (addr, _liar) = liar(lie).await;
    let dir = tempfile::tempdir().unwrap();
    let meshd = meshd_over(&format!("http://{addr}"), dir.path(), extra);
    ready(meshd.http()).await;
    let chat =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).to_string();
    let start = Instant::now();
    let r = request(meshd.http(), "POST", "/v1/chat/completions", &chat).await;
    (r, start.elapsed())
}

/// The upstream lies, and every lie is bounded: a request it never answers is a 503 after
/// `upstream_timeout_secs`, an event that never ends is cut at 1 MiB, an 8 MiB refusal keeps its
/// 400 without being read whole, and a 2 MiB model list stops the start with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_lies_is_cut_off_at_every_limit() {
    let (r, took) = chat_through_liar(Lie::NeverAnswers, &["--upstream-timeout-secs", "2"]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        r.text().contains("did not answer within 2 s"),
        "{}",
        r.text()
    );
    assert!(took < Duration::from_secs(20), "{took:?}");

    let (r, _) = chat_through_liar(Lie::EndlessEvent, &[]).await;
    assert!(r.status >= 500, "{} {}", r.status, r.text());
    assert!(r.text().contains("over 1048576 bytes"), "{}", r.text());

    let (r, _) = chat_through_liar(Lie::HugeRefusal, &[]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().len() < 4096,
        "the refusal was relayed whole: {} bytes",
        r.text().len()
    );

    let (addr, _liar) = liar(Lie::HugeModelList).await;
    let dir = tempfile::tempdir().unwrap();
    // It binds its listeners first, then asks the upstream, then exits.
    let mut meshd = meshd_over(&format!("http://{addr}"), dir.path(), &[]);
    let status = tokio::task::block_in_place(|| meshd.wait_exit(Duration::from_secs(60)))
        .expect("meshd kept running on a 2 MiB model list");
    assert!(!status.success());
    let logs = meshd.logs();
    assert!(
        logs.contains("GET /v1/models: the answer is over 1048576 bytes"),
        "{logs}"
    );
}

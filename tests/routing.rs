//! Routing across several infer workers, real processes and real models: two different GGUFs
//! behind one endpoint (each request answered by the model it names; `/v1/models` lists both;
//! 404 for a model nobody serves, 503 once a model's workers are gone), and conversations that
//! stay on the worker whose KV cache holds their earlier turns.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn mesh(dir: &std::path::Path) -> (Proc, Proc) {
    let gw = gateway(dir, "127.0.0.1:0", "127.0.0.1:0");
    let caller = caller(&gw.mesh_url(), "caller");
    (gw, caller)
}

async fn chat(gw: &Proc, body: &Value) -> Resp {
    request(gw.http(), "POST", "/v1/chat/completions", &body.to_string()).await
}

async fn model_ids(gw: &Proc) -> Vec<String> {
    let v = request(gw.http(), "GET", "/v1/models", "").await.json();
    v["data"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_behind_one_endpoint_each_answer_their_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _caller) = mesh(dir.path());
    let url = gw.mesh_url();
    let _gemma = infer(&url, "infer-gemma");
    let second = second_model();
    let smol_args = [
        "infer",
        "--gateway-url",
        &url,
        "--worker-token",
        TOKEN,
        "--name",
        "infer-smol",
        "--model",
        second.to_str().unwrap(),
        "--threads",
        "2",
    ];
    let mut smol = Proc::start(&smol_args, false);
    ready(gw.http()).await;
    eventually(Duration::from_secs(60), "both models listed", || {
        let gw = &gw;
        async move { model_ids(gw).await.len() == 2 }
    })
    .await;
    let ids = model_ids(&gw).await;
    let gemma_id = ids.iter().find(|i| i.starts_with("gemma")).unwrap().clone();
    let smol_id = ids
        .iter()
        .find(|i| i.starts_with("smollm2"))
        .unwrap()
        .clone();
    let v = request(gw.http(), "GET", "/v1/models", "").await.json();
    for m in v["data"].as_array().unwrap() {
        assert!(m["context_length"].as_u64().unwrap() > 0, "details for {m}");
    }

    // Interleaved: every request is answered by the model it names.
    for round in 0..3 {
        for id in [&gemma_id, &smol_id] {
            let body = json!({"model": id, "messages": [{"role": "user", "content": format!("hello {round}")}],
                              "max_tokens": 4, "temperature": 0});
            let r = chat(&gw, &body).await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()["model"], id.as_str());
        }
    }

    let r = chat(
        &gw,
        &json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(r.status, 404, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    assert!(
        e["message"].as_str().unwrap().contains(&smol_id),
        "the error names what is served: {e}"
    );

    // SmolLM2's only worker goes: its model is gone (503), not unknown, and no longer listed.
    smol.kill9();
    eventually(Duration::from_secs(20), "smollm2 unlisted", || {
        let gw = &gw;
        async move { model_ids(gw).await.len() == 1 }
    })
    .await;
    let body = json!({"model": smol_id, "messages": [{"role": "user", "content": "hi"}]});
    let r = chat(&gw, &body).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "no_worker");
    let body = json!({"model": gemma_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    assert_eq!(chat(&gw, &body).await.status, 200);
}

/// Six conversations, three turns each, one request at a time, over two workers of the same model:
/// every later turn lands on the worker that ran the earlier ones, so its whole previous prompt
/// comes from that worker's prefix cache; and the conversations use both workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_stay_on_the_worker_that_holds_their_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _caller) = mesh(dir.path());
    let url = gw.mesh_url();
    let _a = infer(&url, "infer-a");
    let _b = infer(&url, "infer-b");
    ready(gw.http()).await;
    eventually(Duration::from_secs(60), "both workers registered", || {
        let gw = &gw;
        async move {
            status_workers(gw.http(), "inference::run_inference")
                .await
                .len()
                == 2
        }
    })
    .await;
    let mut conversations: Vec<Vec<Value>> = (0..6)
        .map(|c| {
            vec![json!({"role": "system", "content": format!("You are assistant number {c}. Keep answers short. ").repeat(8)})]
        })
        .collect();
    let mut previous = vec![0u64; conversations.len()];
    for turn in 0..3 {
        for (c, messages) in conversations.iter_mut().enumerate() {
            messages.push(json!({"role": "user", "content": format!("Question {turn}: what is {c} + {turn}?")}));
            let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0});
            let r = chat(&gw, &body).await;
            assert_eq!(r.status, 200, "{}", r.text());
            let v = r.json();
            let usage = &v["usage"];
            let cached = usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap();
            if turn > 0 {
                assert!(
                    cached >= previous[c],
                    "conversation {c}, turn {turn}: {cached} cached, its previous prompt had {}: \
                     it went to the other worker",
                    previous[c]
                );
            }
            previous[c] = usage["prompt_tokens"].as_u64().unwrap();
            let answer = v["choices"][0]["message"]["content"].clone();
            messages.push(json!({"role": "assistant", "content": answer}));
        }
    }
    let metrics = request(gw.http(), "GET", "/metrics", "").await.text();
    assert!(
        metrics.contains("meshd_affinity_routes_total{outcome=\"kept\"} 18"),
        "every turn went to its conversation's worker: {metrics}"
    );
    for worker in ["infer-a", "infer-b"] {
        let cached: f64 = metrics
            .lines()
            .find(|l| {
                l.starts_with("meshd_prompt_tokens_cached_total{")
                    && l.contains(&format!("\"{worker}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no cached-token count for {worker}: {metrics}"));
        assert!(
            cached > 0.0,
            "{worker} served no conversation's later turns: {metrics}"
        );
    }
}

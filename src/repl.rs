//! `meshd chat`: talk to a gateway's model from a terminal, the way `ollama run` lets a person try
//! a model in ten seconds. Streams the answer token by token, keeps the conversation, and takes
//! a few commands: `/reset`, `/model NAME`, `/system TEXT`, `/help`, `/quit`.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

pub struct ChatOptions {
    /// The gateway's API, e.g. `http://127.0.0.1:3111`.
    pub url: String,
    pub api_key: Option<String>,
    /// The CA that signed an `https://` gateway's certificate.
    pub ca: Option<PathBuf>,
    /// `None`: the served one.
    pub model: Option<String>,
    pub max_tokens: u32,
    pub temperature: f32,
    pub system: Option<String>,
}

const HELP: &str =
    "commands: /reset (forget the conversation), /model NAME (or /model to use the served one), \
/system TEXT, /help, /quit (or Ctrl-D)";

/// Runs the conversation until `/quit` or the end of input.
pub async fn run(opts: ChatOptions) -> anyhow::Result<()> {
    let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
    if let Some(ca) = &opts.ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let client = builder.build()?;
    let base = opts.url.trim_end_matches('/').to_string();
    let mut model = opts.model.clone();
    let mut system = opts.system.clone();
    let mut history: Vec<Value> = Vec::new();
    let served = served_model(&client, &base, opts.api_key.as_deref()).await?;
    println!(
        "meshd chat with {} at {base}; {HELP}",
        model.as_deref().unwrap_or(&served)
    );
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        let Some(line) = lines.next_line().await? else {
            println!();
            return Ok(());
        };
        let line = line.trim();
        match line
            .split_once(' ')
            .map_or((line, ""), |(c, rest)| (c, rest.trim()))
        {
            ("", _) => continue,
            ("/quit" | "/exit", _) => return Ok(()),
            ("/help", _) => println!("{HELP}"),
            ("/reset", _) => {
                history.clear();
                println!("(conversation cleared)");
            }
            ("/model", name) => {
                model = (!name.is_empty()).then(|| name.to_string());
                history.clear();
                println!(
                    "(model: {}; conversation cleared)",
                    model.as_deref().unwrap_or("the served one")
                );
            }
            ("/system", text) => {
                system = (!text.is_empty()).then(|| text.to_string());
                println!(
                    "(system message {})",
                    if system.is_some() { "set" } else { "removed" }
                );
            }
            (cmd, _) if cmd.starts_with('/') => println!("unknown command {cmd}; {HELP}"),
            _ => {
                history.push(json!({"role": "user", "content": line}));
                let mut messages: Vec<Value> = system
                    .iter()
                    .map(|s| json!({"role": "system", "content": s}))
                    .collect();
                messages.extend(history.iter().cloned());
                let mut body = json!({
                    "messages": messages,
                    "stream": true,
                    "stream_options": {"include_usage": true},
                    "max_tokens": opts.max_tokens,
                    "temperature": opts.temperature,
                });
                if let Some(m) = &model {
                    body["model"] = json!(m);
                }
                match turn(&client, &base, opts.api_key.as_deref(), &body).await {
                    Ok(answer) => history.push(json!({"role": "assistant", "content": answer})),
                    Err(e) => {
                        // The question is not kept: the conversation stays what the model saw.
                        history.pop();
                        println!("error: {e:#}");
                    }
                }
            }
        }
    }
}

fn authorize(req: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
}

/// The gateway's served model, which also checks the URL and the key before the first question.
async fn served_model(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let resp = authorize(client.get(format!("{base}/v1/models")), key)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!("{base}/v1/models answered {status}: {}", error_text(&v));
    }
    Ok(v["data"][0]["id"].as_str().unwrap_or("?").to_string())
}

fn error_text(v: &Value) -> String {
    let e = &v["error"];
    match (e["message"].as_str(), e["code"].as_str()) {
        (Some(m), Some(c)) => format!("{m} ({c})"),
        (Some(m), None) => m.to_string(),
        _ => "no error body".to_string(),
    }
}

/// One question: prints the answer as it streams, then the token counts; answers the text.
async fn turn(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    body: &Value,
) -> anyhow::Result<String> {
    let resp = authorize(client.post(format!("{base}/v1/chat/completions")), key)
        .json(body)
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::bail!("{status}: {}", error_text(&v));
    }
    let mut answer = String::new();
    let mut usage = None;
    let mut pending = String::new();
    let mut stream = resp.bytes_stream();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        pending.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                if v.get("error").is_some() {
                    println!();
                    anyhow::bail!("{}", error_text(&v));
                }
                if let Some(text) = v["choices"][0]["delta"]["content"].as_str() {
                    answer.push_str(text);
                    write!(out, "{text}")?;
                    out.flush()?;
                }
                if v["usage"].is_object() {
                    usage = Some(v["usage"].clone());
                }
            }
        }
    }
    println!();
    if let Some(u) = usage {
        println!(
            "[{} prompt + {} completion tokens]",
            u["prompt_tokens"], u["completion_tokens"]
        );
    }
    Ok(answer)
}

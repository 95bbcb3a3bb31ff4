//! OpenAI's Responses API (`POST /v1/responses`), stateless: text in, text out, whole or as its
//! stream of typed events (`response.created` … `response.output_text.delta` …
//! `response.completed`).
//!
//! A request is translated into a chat request and checked by the chat validator
//! ([`crate::openai::validate`]), so both endpoints accept exactly the same sampling, limits and
//! structured outputs (`text.format` is chat's `response_format`); an error names the Responses
//! field. Nothing is stored: `store: true`, `previous_response_id`, `conversation`, tools and
//! reasoning are refused by name.

use serde_json::{json, Map, Value};

use crate::api::{Completion, FinishReason, GenerateRequest};
use crate::openai::{self, Kind};
use crate::protocol::{ErrorBody, ErrorCode};

/// A request that passed validation, and what its answer echoes back.
#[derive(Debug, Clone)]
pub struct ValidResponse {
    pub stream: bool,
    pub generate: GenerateRequest,
    echo: Map<String, Value>,
}

/// Fields refused by name: meshd keeps no state between requests and runs no tools.
const REFUSED: [(&str, &str); 9] = [
    (
        "previous_response_id",
        "responses are not stored: send the whole conversation as `input`",
    ),
    (
        "conversation",
        "conversations are not stored: send the whole conversation as `input`",
    ),
    ("tools", "tools are not supported on /v1/responses"),
    ("tool_choice", "tools are not supported on /v1/responses"),
    ("reasoning", "this model does not reason"),
    ("include", "`include` is not supported"),
    ("background", "background responses are not supported"),
    ("prompt", "stored prompts are not supported"),
    ("top_logprobs", "`top_logprobs` is not supported"),
];
/// Accepted, echoed back, and otherwise ignored.
const ECHOED: [&str; 5] = [
    "metadata",
    "user",
    "parallel_tool_calls",
    "service_tier",
    "truncation",
];

fn invalid(msg: impl Into<String>, param: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, msg).with_param(param)
}

/// Validates a `/v1/responses` body.
pub fn validate(body: &[u8], random_seed: u32) -> Result<ValidResponse, ErrorBody> {
    let obj = openai::json_object(body)?;
    let mut chat = Map::new();
    let mut echo = Map::new();
    let mut messages = Vec::new();
    for (key, v) in &obj {
        if v.is_null() {
            continue;
        }
        if let Some((_, why)) = REFUSED.iter().find(|(k, _)| k == key) {
            return Err(invalid(*why, key));
        }
        match key.as_str() {
            "model" | "temperature" | "top_p" | "stream" => {
                chat.insert(key.clone(), v.clone());
            }
            "max_output_tokens" => {
                chat.insert("max_tokens".into(), v.clone());
            }
            "instructions" => match v {
                Value::String(s) => messages.push(json!({"role": "system", "content": s})),
                _ => return Err(invalid("`instructions` must be a string", key)),
            },
            "input" => {}
            "store" => {
                if v.as_bool() != Some(false) {
                    return Err(invalid(
                        "responses are not stored: leave out `store` or set it to false",
                        key,
                    ));
                }
            }
            "text" => {
                let format = v.get("format").filter(|f| !f.is_null());
                if let Some(f) = format {
                    chat.insert("response_format".into(), chat_format(f)?);
                }
            }
            k if ECHOED.contains(&k) => {}
            other => {
                return Err(invalid(
                    format!("Unrecognized request argument supplied: {other}"),
                    other,
                ))
            }
        }
        if key != "input" {
            echo.insert(key.clone(), v.clone());
        }
    }
    messages.extend(input(obj.get("input"))?);
    chat.insert("messages".into(), Value::Array(messages));
    let chat = Value::Object(chat).to_string();
    let valid = openai::validate(Kind::Chat, chat.as_bytes(), random_seed).map_err(rename)?;
    Ok(ValidResponse {
        stream: valid.stream,
        generate: valid.generate,
        echo,
    })
}

/// A chat error, naming the Responses field it came from.
fn rename(mut e: ErrorBody) -> ErrorBody {
    let map = [
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
        ("messages", "input"),
    ];
    for (chat, responses) in map {
        e.message = e
            .message
            .replace(&format!("`{chat}"), &format!("`{responses}"));
        if e.param.as_deref().is_some_and(|p| p.starts_with(chat)) {
            e.param = Some(responses.to_string());
        }
    }
    e
}

/// `text.format` (`{type, name, schema, strict}`) as chat's `response_format`.
fn chat_format(f: &Value) -> Result<Value, ErrorBody> {
    match f.get("type").and_then(Value::as_str) {
        Some("text") | Some("json_object") => Ok(json!({"type": f["type"]})),
        Some("json_schema") => {
            let mut js = Map::new();
            for k in ["name", "schema", "description", "strict"] {
                if let Some(v) = f.get(k) {
                    js.insert(k.into(), v.clone());
                }
            }
            Ok(json!({"type": "json_schema", "json_schema": js}))
        }
        _ => Err(invalid(
            "`text.format.type` must be `text`, `json_object` or `json_schema`",
            "text.format",
        )),
    }
}

/// `input`: a string (one user message) or a list of messages (`{role, content}`, `type` absent
/// or `message`; content a string or `input_text` / `output_text` parts).
fn input(v: Option<&Value>) -> Result<Vec<Value>, ErrorBody> {
    match v {
        Some(Value::String(s)) => Ok(vec![json!({"role": "user", "content": s})]),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let param = format!("input[{i}]");
                let kind = item.get("type").and_then(Value::as_str).unwrap_or("message");
                if kind != "message" {
                    return Err(invalid(
                        format!("`{param}.type` `{kind}` is not supported: only messages are"),
                        &param,
                    ));
                }
                let content = match item.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            let t = part.get("type").and_then(Value::as_str);
                            match (t, part.get("text").and_then(Value::as_str)) {
                                (Some("input_text" | "output_text" | "text"), Some(s)) => {
                                    text.push_str(s)
                                }
                                _ => {
                                    return Err(invalid(
                                        format!("`{param}.content` parts must be input_text or output_text with `text`"),
                                        &param,
                                    ))
                                }
                            }
                        }
                        text
                    }
                    _ => {
                        return Err(invalid(
                            format!("`{param}.content` must be a string or a list of text parts"),
                            &param,
                        ))
                    }
                };
                Ok(json!({"role": item.get("role").cloned().unwrap_or(Value::Null), "content": content}))
            })
            .collect(),
        _ => Err(invalid(
            "`input` must be a string or a list of messages",
            "input",
        )),
    }
}

/// Shapes one response: the whole object, or its stream of events.
pub struct Shaper {
    id: String,
    item: String,
    created: u64,
    model: String,
    echo: Map<String, Value>,
    sequence: u64,
    text: String,
}

impl Shaper {
    pub fn new(model: String, valid: &ValidResponse) -> Shaper {
        let hex = |n: u128| format!("{:048x}", n);
        Shaper {
            id: format!("resp_{}", hex(rand::random())),
            item: format!("msg_{}", hex(rand::random())),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model,
            echo: valid.echo.clone(),
            sequence: 0,
            text: String::new(),
        }
    }

    fn message(&self, text: Option<&str>) -> Value {
        let (status, content) = match text {
            None => ("in_progress", json!([])),
            Some(t) => (
                "completed",
                json!([{"type": "output_text", "text": t, "annotations": [], "logprobs": []}]),
            ),
        };
        json!({"type": "message", "id": self.item, "status": status, "role": "assistant", "content": content})
    }

    /// The response object; `done` carries the finished generation.
    fn response(&self, done: Option<&Completion>) -> Value {
        let status = match done.map(|c| c.finish_reason) {
            None => "in_progress",
            Some(FinishReason::Stop) => "completed",
            Some(FinishReason::Length) => "incomplete",
        };
        let mut r = json!({
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": [], "error": null, "incomplete_details": null,
            "instructions": null, "max_output_tokens": null, "metadata": {}, "temperature": null,
            "top_p": null, "parallel_tool_calls": false, "tool_choice": "none", "tools": [],
            "previous_response_id": null, "store": false, "truncation": "disabled",
            "text": {"format": {"type": "text"}}, "usage": null,
        });
        for (k, v) in &self.echo {
            r[k] = v.clone();
        }
        r["store"] = json!(false);
        if let Some(c) = done {
            r["output"] = json!([self.message(Some(&c.text))]);
            r["usage"] = json!({
                "input_tokens": c.prompt_tokens,
                "input_tokens_details": {"cached_tokens": c.cached_tokens},
                "output_tokens": c.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": c.prompt_tokens + c.completion_tokens,
            });
            if c.finish_reason == FinishReason::Length {
                r["incomplete_details"] = json!({"reason": "max_output_tokens"});
            }
        }
        r
    }

    /// The whole (non-streamed) answer.
    pub fn full(&self, c: &Completion) -> Value {
        self.response(Some(c))
    }

    fn event(&mut self, kind: &str, mut body: Value) -> bytes::Bytes {
        body["type"] = json!(kind);
        body["sequence_number"] = json!(self.sequence);
        self.sequence += 1;
        bytes::Bytes::from(format!("event: {kind}\ndata: {body}\n\n"))
    }

    /// The events before any text.
    pub fn opening(&mut self) -> Vec<bytes::Bytes> {
        let response = self.response(None);
        let item = self.message(None);
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        vec![
            self.event("response.created", json!({"response": response})),
            self.event("response.in_progress", json!({"response": response})),
            self.event(
                "response.output_item.added",
                json!({"output_index": 0, "item": item}),
            ),
            self.event(
                "response.content_part.added",
                json!({"item_id": self.item, "output_index": 0, "content_index": 0, "part": part}),
            ),
        ]
    }

    /// One piece of text.
    pub fn delta(&mut self, text: &str) -> bytes::Bytes {
        self.text.push_str(text);
        let body = json!({"item_id": self.item, "output_index": 0, "content_index": 0, "delta": text, "logprobs": []});
        self.event("response.output_text.delta", body)
    }

    /// The events after the last text: its whole, and the finished response.
    pub fn closing(&mut self, mut done: Completion) -> Vec<bytes::Bytes> {
        done.text = std::mem::take(&mut self.text);
        let part =
            json!({"type": "output_text", "text": done.text, "annotations": [], "logprobs": []});
        let item = self.message(Some(&done.text));
        let response = self.response(Some(&done));
        let last = if done.finish_reason == FinishReason::Length {
            "response.incomplete"
        } else {
            "response.completed"
        };
        vec![
            self.event(
                "response.output_text.done",
                json!({"item_id": self.item, "output_index": 0, "content_index": 0, "text": done.text, "logprobs": []}),
            ),
            self.event(
                "response.content_part.done",
                json!({"item_id": self.item, "output_index": 0, "content_index": 0, "part": part}),
            ),
            self.event(
                "response.output_item.done",
                json!({"output_index": 0, "item": item}),
            ),
            self.event(last, json!({"response": response})),
        ]
    }

    /// An error mid-stream: the response failed.
    pub fn failed(&mut self, e: &ErrorBody) -> bytes::Bytes {
        let mut response = self.response(None);
        response["status"] = json!("failed");
        response["error"] = json!({"code": e.code, "message": e.message});
        self.event("response.failed", json!({"response": response}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: Value) -> ValidResponse {
        validate(body.to_string().as_bytes(), 7).unwrap()
    }

    fn refused(body: Value) -> ErrorBody {
        validate(body.to_string().as_bytes(), 7).unwrap_err()
    }

    #[test]
    fn input_and_instructions_become_the_conversation() {
        let v = ok(json!({"input": "hi", "instructions": "be brief", "max_output_tokens": 5}));
        let crate::api::Prompt::Chat { messages } = &v.generate.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(
            messages
                .iter()
                .map(|m| (m.role.as_str(), m.content.as_str()))
                .collect::<Vec<_>>(),
            [("system", "be brief"), ("user", "hi")]
        );
        assert_eq!(v.generate.max_tokens, Some(5));
        let v = ok(json!({"input": [
            {"role": "user", "content": [{"type": "input_text", "text": "a"}]},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
            {"role": "user", "content": "c"}]}));
        let crate::api::Prompt::Chat { messages } = &v.generate.prompt else {
            panic!("a chat prompt")
        };
        assert_eq!(messages.len(), 3);
        let v = ok(
            json!({"input": "x", "text": {"format": {"type": "json_schema", "name": "n",
            "schema": {"type": "object"}, "strict": true}}}),
        );
        assert!(v.generate.format.is_some());
    }

    #[test]
    fn errors_name_the_responses_field() {
        assert_eq!(
            refused(json!({"input": "x", "previous_response_id": "resp_1"}))
                .param
                .as_deref(),
            Some("previous_response_id")
        );
        assert_eq!(
            refused(json!({"input": "x", "store": true}))
                .param
                .as_deref(),
            Some("store")
        );
        assert_eq!(
            refused(json!({"input": "x", "tools": []})).param.as_deref(),
            Some("tools")
        );
        let e = refused(json!({"input": "x", "max_output_tokens": 0}));
        assert_eq!(e.param.as_deref(), Some("max_output_tokens"), "{e:?}");
        assert!(e.message.contains("max_output_tokens"), "{e:?}");
        assert_eq!(refused(json!({"input": 3})).param.as_deref(), Some("input"));
        assert_eq!(
            refused(json!({"input": [{"type": "function_call_output"}]}))
                .param
                .as_deref(),
            Some("input[0]")
        );
        assert_eq!(
            refused(json!({"input": "x", "bogus": 1})).param.as_deref(),
            Some("bogus")
        );
    }

    #[test]
    fn a_stream_is_numbered_and_ends_with_the_whole_response() {
        let v = ok(json!({"input": "hi", "stream": true, "metadata": {"k": "v"}}));
        let mut s = Shaper::new("m".into(), &v);
        let mut events: Vec<String> = s
            .opening()
            .into_iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        events.push(String::from_utf8(s.delta("Hel").to_vec()).unwrap());
        events.push(String::from_utf8(s.delta("lo").to_vec()).unwrap());
        let done = Completion {
            model: "m".into(),
            text: String::new(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 2,
            cached_tokens: 0,
            logprobs: None,
            more: Vec::new(),
        };
        events.extend(
            s.closing(done)
                .into_iter()
                .map(|b| String::from_utf8(b.to_vec()).unwrap()),
        );
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e.lines().next().unwrap().trim_start_matches("event: "))
            .collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        let last: Value = serde_json::from_str(
            events[9]
                .lines()
                .nth(1)
                .unwrap()
                .trim_start_matches("data: "),
        )
        .unwrap();
        assert_eq!(last["sequence_number"], 9);
        assert_eq!(last["response"]["output"][0]["content"][0]["text"], "Hello");
        assert_eq!(last["response"]["usage"]["total_tokens"], 5);
        assert_eq!(last["response"]["metadata"]["k"], "v");
        assert_eq!(last["response"]["status"], "completed");
    }
}

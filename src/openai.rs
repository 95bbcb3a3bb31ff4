//! The OpenAI-compatible API: requests are validated into [`ValidRequest`] (the only thing the
//! caller sends on to inference), and generations are shaped into `chat.completion`,
//! `chat.completion.chunk` and `text_completion` objects. Every field is either used, accepted and
//! ignored (documented), or refused with a 400 naming it.

use serde_json::{json, Map, Value};

use crate::api::{ChatMessage, Completion, FinishReason, GenerateRequest, Prompt, Sampling};
use crate::protocol::{ErrorBody, ErrorCode};

/// Limits on what a request may ask for: the contract's ([`crate::api`]).
pub use crate::api::{MAX_MESSAGES, MAX_STOPS, MAX_STOP_LEN, MAX_TOKENS_LIMIT};

/// Fields accepted and ignored: they change nothing a single-model server does.
const IGNORED: [&str; 5] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
];
/// Fields refused because meshd does not implement them.
const UNSUPPORTED: [&str; 8] = [
    "functions",
    "function_call",
    "logit_bias",
    "audio",
    "modalities",
    "prediction",
    "suffix",
    "best_of",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    pub kind: Kind,
    pub stream: bool,
    pub include_usage: bool,
    pub generate: GenerateRequest,
    /// A tool call the answer must be (`tool_choice` `required` or a named function).
    pub tool: Option<ToolCall>,
}

/// The tool call an answer is: its arguments generated under the function's JSON schema.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolCall {
    /// This function (`tool_choice: {"type":"function","function":{"name":…}}`, or `required`
    /// with one tool): the output is its arguments.
    Named(String),
    /// One of these (`required` with several tools): the output is `{"name", "arguments"}`.
    AnyOf(Vec<String>),
}

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;

fn invalid(msg: impl Into<String>, param: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::BadRequest, msg).with_param(param)
}

/// A request body that must be a JSON object.
pub fn json_object(body: &[u8]) -> Result<Map<String, Value>, ErrorBody> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ErrorBody::new(
            ErrorCode::BadRequest,
            format!("We could not parse the JSON body of your request: {e}"),
        )
    })?;
    match value {
        Value::Object(obj) => Ok(obj),
        _ => Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "the request body must be a JSON object",
        )),
    }
}

/// Validates a `/v1/chat/completions` or `/v1/completions` body.
pub fn validate(kind: Kind, body: &[u8], random_seed: u32) -> Result<ValidRequest, ErrorBody> {
    let obj = json_object(body)?;
    let main = match kind {
        Kind::Chat => "messages",
        Kind::Completion => "prompt",
    };
    for key in obj.keys() {
        let unsupported = UNSUPPORTED.contains(&key.as_str())
            || (kind == Kind::Completion
                && ["top_logprobs", "tools", "tool_choice"].contains(&key.as_str()));
        if unsupported && !obj[key].is_null() {
            return Err(invalid(
                format!("`{key}` is not supported by this server"),
                key,
            ));
        }
        let known = [
            "model",
            main,
            "stream",
            "stream_options",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "stop",
            "n",
            "presence_penalty",
            "frequency_penalty",
            "repetition_penalty",
            "response_format",
            "logprobs",
        ];
        let chat_only =
            kind == Kind::Chat && ["top_logprobs", "tools", "tool_choice"].contains(&key.as_str());
        let completion_only = kind == Kind::Completion && key == "echo";
        if !known.contains(&key.as_str())
            && !completion_only
            && !chat_only
            && !IGNORED.contains(&key.as_str())
            && !unsupported
        {
            return Err(invalid(
                format!("Unrecognized request argument supplied: {key}"),
                key,
            ));
        }
    }
    let logprobs = logprobs(kind, &obj)?;
    let tool = tool_call(&obj)?;
    if tool.is_some() && obj.get("n").and_then(Value::as_u64).is_some_and(|n| n > 1) {
        return Err(invalid(
            "`n` > 1 with a required tool call is not supported",
            "n",
        ));
    }
    if obj
        .get("echo")
        .is_some_and(|v| !v.is_null() && v.as_bool() != Some(false))
    {
        return Err(invalid("`echo` is not supported by this server", "echo"));
    }

    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= crate::api::MAX_MODEL_ID => {
            Some(s.clone())
        }
        Some(_) => return Err(invalid("`model` must be a non-empty string", "model")),
    };
    let prompt = match kind {
        Kind::Chat => Prompt::Chat {
            messages: messages(obj.get("messages"))?,
        },
        Kind::Completion => Prompt::Text {
            text: completion_prompt(obj.get("prompt"))?,
        },
    };
    let stream = opt_bool(&obj, "stream")?.unwrap_or(false);
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(invalid(
                    "`stream_options.include_usage` must be a boolean",
                    "stream_options",
                ))
            }
        },
        Some(_) => {
            return Err(invalid(
                "`stream_options` must be an object",
                "stream_options",
            ))
        }
    };
    let most = crate::api::MAX_CHOICES;
    let n = match int(&obj, "n")? {
        None => 1,
        Some(n) if (1..=i64::from(most)).contains(&n) => n as u8,
        Some(_) => return Err(invalid(format!("`n` must be between 1 and {most}"), "n")),
    };
    let max_tokens = match (
        int(&obj, "max_completion_tokens")?,
        int(&obj, "max_tokens")?,
    ) {
        (Some(n), _) | (None, Some(n)) => {
            if n < 1 || n as u64 > u64::from(MAX_TOKENS_LIMIT) {
                let p = if obj.contains_key("max_completion_tokens") {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(invalid(
                    format!("`{p}` must be between 1 and {MAX_TOKENS_LIMIT}"),
                    p,
                ));
            }
            Some(n as u32)
        }
        (None, None) => None,
    };
    let mut sampling = Sampling {
        temperature: float(&obj, "temperature", 0.0..=2.0)?.unwrap_or(1.0),
        top_p: float(&obj, "top_p", 0.0..=1.0)?.unwrap_or(1.0),
        top_k: match int(&obj, "top_k")? {
            Some(k) if !(0..=1_000_000).contains(&k) => {
                return Err(invalid("`top_k` must be between 0 and 1000000", "top_k"))
            }
            k => k.unwrap_or(0) as i32,
        },
        min_p: float(&obj, "min_p", 0.0..=1.0)?.unwrap_or(0.0),
        // Any integer is a seed; it is folded to the 32 bits llama.cpp takes.
        seed: int(&obj, "seed")?.map_or(random_seed, |s| s as u32),
        repetition_penalty: float(&obj, "repetition_penalty", 0.01..=10.0)?.unwrap_or(1.0),
        presence_penalty: float(&obj, "presence_penalty", -2.0..=2.0)?.unwrap_or(0.0),
        frequency_penalty: float(&obj, "frequency_penalty", -2.0..=2.0)?.unwrap_or(0.0),
    };
    // Checked on the JSON number: a tiny positive top_p rounds to 0 as f32 but is valid.
    if obj.get("top_p").and_then(Value::as_f64) == Some(0.0) {
        return Err(invalid("`top_p` must be greater than 0", "top_p"));
    }
    sampling.top_p = sampling.top_p.max(f32::MIN_POSITIVE);
    Ok(ValidRequest {
        kind,
        stream,
        include_usage,
        generate: GenerateRequest {
            model,
            prompt,
            max_tokens,
            stop: stops(obj.get("stop"))?,
            sampling,
            format: match &tool {
                Some((_, schema)) => {
                    if obj.get("response_format").is_some_and(|f| !f.is_null()) {
                        return Err(invalid(
                            "`response_format` and a required tool call cannot both shape the answer",
                            "response_format",
                        ));
                    }
                    Some(crate::api::OutputFormat::JsonSchema {
                        name: "tool_call".into(),
                        schema: schema.to_string(),
                    })
                }
                None => response_format(obj.get("response_format"))?,
            },
            logprobs,
            n,
        },
        tool: tool.map(|(call, _)| call),
    })
}

/// `tools` and `tool_choice`: the call the answer must be, and the schema its output follows.
/// `none` (or no tools) generates text; `auto` is refused: the model's template has no tool format
/// to let the model choose between text and a call.
fn tool_call(obj: &Map<String, Value>) -> Result<Option<(ToolCall, Value)>, ErrorBody> {
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(list)) if list.len() <= MAX_TOOLS => list,
        Some(_) => {
            return Err(invalid(
                format!("`tools` must be a list of at most {MAX_TOOLS} functions"),
                "tools",
            ))
        }
    };
    let mut functions: Vec<(String, Value)> = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let param = format!("tools[{i}]");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(invalid(
                format!("`{param}.type` must be `function`"),
                &param,
            ));
        }
        let f = t.get("function").and_then(Value::as_object);
        let name = f
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let valid_name = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !valid_name {
            return Err(invalid(
                format!("`{param}.function.name` must be 1 to 64 letters, digits, `_` or `-`"),
                &param,
            ));
        }
        if functions.iter().any(|(n, _)| n == name) {
            return Err(invalid(format!("two tools are named `{name}`"), "tools"));
        }
        let parameters = match f.and_then(|f| f.get("parameters")) {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => {
                return Err(invalid(
                    format!("`{param}.function.parameters` must be a JSON Schema object"),
                    &param,
                ))
            }
        };
        functions.push((name.to_string(), parameters));
    }
    let choice = obj.get("tool_choice").filter(|c| !c.is_null());
    let named = |name: &str| -> Result<Option<(ToolCall, Value)>, ErrorBody> {
        let Some((_, schema)) = functions.iter().find(|(n, _)| n == name) else {
            return Err(invalid(
                format!("`tool_choice` names `{name}`, which is not among `tools`"),
                "tool_choice",
            ));
        };
        Ok(Some((ToolCall::Named(name.to_string()), schema.clone())))
    };
    match choice {
        Some(Value::String(c)) if c == "none" => Ok(None),
        Some(Value::String(c)) if c == "required" => match functions.len() {
            0 => Err(invalid("`tool_choice: required` needs at least one tool", "tool_choice")),
            1 => named(&functions[0].0.clone()),
            _ => {
                let any: Vec<Value> = functions
                    .iter()
                    .map(|(name, schema)| {
                        json!({"type": "object", "additionalProperties": false,
                               "properties": {"name": {"const": name}, "arguments": schema},
                               "required": ["name", "arguments"]})
                    })
                    .collect();
                let names = functions.iter().map(|(n, _)| n.clone()).collect();
                Ok(Some((ToolCall::AnyOf(names), json!({"anyOf": any}))))
            }
        },
        Some(Value::Object(c)) => match c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
            Some(name) if c.get("type").and_then(Value::as_str) == Some("function") => named(name),
            _ => Err(invalid(
                "`tool_choice` must be `none`, `required`, or {\"type\":\"function\",\"function\":{\"name\":…}}",
                "tool_choice",
            )),
        },
        // `auto`, said or implied by tools without a tool_choice.
        Some(Value::String(c)) if c == "auto" => Err(refuse_auto()),
        None if !functions.is_empty() => Err(refuse_auto()),
        None => Ok(None),
        Some(_) => Err(invalid(
            "`tool_choice` must be `none`, `required`, or a named function",
            "tool_choice",
        )),
    }
}

fn refuse_auto() -> ErrorBody {
    invalid(
        "`tool_choice: auto` (the default with `tools`) is not supported: this model's chat template has no tool \
         format to choose between text and a call. Send `tool_choice: required` or name a function, and the \
         answer is a call whose arguments follow the function's schema",
        "tool_choice",
    )
}

/// Validates a `/v1/embeddings` body: the request for the infer worker, and whether the vectors
/// go back as base64.
pub fn validate_embeddings(body: &[u8]) -> Result<(crate::api::EmbedRequest, bool), ErrorBody> {
    use crate::api::{EmbedInput, MAX_EMBED_INPUTS};
    let obj = json_object(body)?;
    for key in obj.keys() {
        if !["input", "model", "encoding_format", "dimensions", "user"].contains(&key.as_str()) {
            return Err(invalid(
                format!("Unrecognized request argument supplied: {key}"),
                key,
            ));
        }
    }
    if obj.get("dimensions").is_some_and(|d| !d.is_null()) {
        return Err(invalid(
            "`dimensions` is not supported: this model's vectors have one size",
            "dimensions",
        ));
    }
    let base64 = match obj
        .get("encoding_format")
        .and_then(|v| (!v.is_null()).then_some(v))
    {
        None => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(invalid(
                "`encoding_format` must be `float` or `base64`",
                "encoding_format",
            ))
        }
    };
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= crate::api::MAX_MODEL_ID => {
            Some(s.clone())
        }
        Some(_) => return Err(invalid("`model` must be a non-empty string", "model")),
    };
    let bad = || {
        invalid(
            format!(
                "`input` must be a non-empty string, a list of 1 to {MAX_EMBED_INPUTS} of them, a list of token ids, or a list of such lists"
            ),
            "input",
        )
    };
    let ids = |list: &[Value]| -> Option<Vec<u32>> {
        list.iter()
            .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect()
    };
    let inputs = match obj.get("input") {
        Some(Value::String(s)) if !s.is_empty() => vec![EmbedInput::Text(s.clone())],
        Some(Value::Array(list)) if !list.is_empty() && list.len() <= MAX_EMBED_INPUTS => {
            if list.iter().all(Value::is_number) {
                vec![EmbedInput::Tokens(ids(list).ok_or_else(bad)?)]
            } else {
                list.iter()
                    .map(|item| match item {
                        Value::String(s) if !s.is_empty() => Ok(EmbedInput::Text(s.clone())),
                        Value::Array(t) if !t.is_empty() => {
                            Ok(EmbedInput::Tokens(ids(t).ok_or_else(bad)?))
                        }
                        _ => Err(bad()),
                    })
                    .collect::<Result<_, _>>()?
            }
        }
        _ => return Err(bad()),
    };
    Ok((crate::api::EmbedRequest { model, inputs }, base64))
}

/// Chat: `logprobs: true` with `top_logprobs` alternatives (0 to 20); completions: `logprobs: N`
/// alternatives. `None` when not asked for.
fn logprobs(kind: Kind, obj: &Map<String, Value>) -> Result<Option<u8>, ErrorBody> {
    let most = crate::api::MAX_TOP_LOGPROBS;
    let count = |key: &str| -> Result<Option<u8>, ErrorBody> {
        match int(obj, key)? {
            None => Ok(None),
            Some(n) if (0..=i64::from(most)).contains(&n) => Ok(Some(n as u8)),
            Some(_) => Err(invalid(
                format!("`{key}` must be between 0 and {most}"),
                key,
            )),
        }
    };
    match kind {
        Kind::Chat => {
            let on = opt_bool(obj, "logprobs")?.unwrap_or(false);
            let top = count("top_logprobs")?;
            match (on, top) {
                (false, Some(_)) => Err(invalid(
                    "`top_logprobs` needs `logprobs: true`",
                    "top_logprobs",
                )),
                (false, None) => Ok(None),
                (true, top) => Ok(Some(top.unwrap_or(0))),
            }
        }
        Kind::Completion => match obj.get("logprobs") {
            Some(Value::Bool(false)) => Ok(None),
            _ => count("logprobs"),
        },
    }
}

/// `logprobs` of a chat choice (`{"content": [...]}`) or of a completion choice (`tokens`,
/// `token_logprobs`, `top_logprobs`, `text_offset`, offsets counted from `offset`).
pub fn logprobs_json(kind: Kind, tokens: &[crate::api::TokenLogprob], offset: usize) -> Value {
    match kind {
        Kind::Chat => json!({
            "content": tokens.iter().map(|t| json!({
                "token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                "top_logprobs": t.top.iter().map(|a| json!({
                    "token": a.token, "logprob": a.logprob, "bytes": a.bytes,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "refusal": null,
        }),
        Kind::Completion => {
            let mut at = offset;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let here = at;
                    at += t.token.len();
                    here
                })
                .collect();
            json!({
                "tokens": tokens.iter().map(|t| &t.token).collect::<Vec<_>>(),
                "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                "top_logprobs": tokens.iter().map(|t| t.top.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<Map<String, Value>>()).collect::<Vec<_>>(),
                "text_offset": offsets,
            })
        }
    }
}

/// `response_format`: `text` (the default), `json_object`, or `json_schema` with a schema.
fn response_format(v: Option<&Value>) -> Result<Option<crate::api::OutputFormat>, ErrorBody> {
    use crate::api::OutputFormat;
    let p = "response_format";
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let Some(fields) = v.as_object() else {
        return Err(invalid("`response_format` must be an object", p));
    };
    if let Some(k) = fields
        .keys()
        .find(|k| !["type", "json_schema"].contains(&k.as_str()))
    {
        return Err(invalid(
            format!("`response_format.{k}` is not a known field"),
            p,
        ));
    }
    let kind = v.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => {
            let Some(js) = v.get("json_schema").and_then(Value::as_object) else {
                return Err(invalid(
                    "`response_format.json_schema` must be an object with `name` and `schema`",
                    p,
                ));
            };
            let known = ["name", "description", "schema", "strict"];
            if let Some(k) = js.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(invalid(
                    format!("`response_format.json_schema.{k}` is not a known field"),
                    p,
                ));
            }
            let name = match js.get("name") {
                Some(Value::String(n)) if !n.is_empty() && n.len() <= 64 => n.clone(),
                _ => {
                    return Err(invalid(
                        "`response_format.json_schema.name` must be a string of 1 to 64 bytes",
                        p,
                    ))
                }
            };
            let schema = match js.get("schema") {
                // No schema: any JSON value, as OpenAI reads it.
                None | Some(Value::Null) => "{}".to_string(),
                Some(s @ Value::Object(_)) => s.to_string(),
                Some(_) => {
                    return Err(invalid(
                        "`response_format.json_schema.schema` must be a JSON Schema object",
                        p,
                    ))
                }
            };
            if schema.len() > crate::api::MAX_SCHEMA_BYTES {
                return Err(invalid(
                    format!(
                        "`response_format.json_schema.schema` is longer than {} bytes",
                        crate::api::MAX_SCHEMA_BYTES
                    ),
                    p,
                ));
            }
            Ok(Some(OutputFormat::JsonSchema { name, schema }))
        }
        _ => Err(invalid(
            "`response_format.type` must be `text`, `json_object` or `json_schema`",
            p,
        )),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, ErrorBody> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(format!("`{key}` must be a boolean"), key)),
    }
}

fn int(obj: &Map<String, Value>, key: &str) -> Result<Option<i64>, ErrorBody> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        // A whole number written as a float (`2.0`) is an integer, as JSON Schema says.
        Some(v) => v
            .as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                    .map(|f| f as i64)
            })
            .map(Some)
            .ok_or_else(|| invalid(format!("`{key}` must be an integer"), key)),
    }
}

fn float(
    obj: &Map<String, Value>,
    key: &str,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Option<f32>, ErrorBody> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(f) if range.contains(&f) => Ok(Some(f as f32)),
            _ => Err(invalid(
                format!(
                    "`{key}` must be a number between {} and {}",
                    range.start(),
                    range.end()
                ),
                key,
            )),
        },
    }
}

/// An assistant turn's `tool_calls` as the text the model would have written for them.
fn tool_calls_text(calls: &Value, param: &str) -> Result<String, ErrorBody> {
    let bad = || {
        invalid(
            format!("`{param}.tool_calls` must be a list of function calls"),
            param,
        )
    };
    let list = calls.as_array().ok_or_else(bad)?;
    let texts: Vec<String> = list
        .iter()
        .map(|c| {
            let f = c.get("function").ok_or_else(bad)?;
            let name = f.get("name").and_then(Value::as_str).ok_or_else(bad)?;
            let args = f.get("arguments").and_then(Value::as_str).unwrap_or("{}");
            Ok(format!(
                "{{\"name\": {}, \"arguments\": {args}}}",
                json!(name)
            ))
        })
        .collect::<Result<_, ErrorBody>>()?;
    Ok(texts.join("\n"))
}

fn messages(value: Option<&Value>) -> Result<Vec<ChatMessage>, ErrorBody> {
    let Some(Value::Array(list)) = value else {
        return Err(invalid(
            "`messages` must be an array of messages",
            "messages",
        ));
    };
    if list.is_empty() || list.len() > MAX_MESSAGES {
        return Err(invalid(
            format!("`messages` must hold 1 to {MAX_MESSAGES} messages"),
            "messages",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let Value::Object(m) = m else {
                return Err(invalid(format!("`{param}` must be an object"), &param));
            };
            let role = match m.get("role").and_then(Value::as_str) {
                Some(r @ ("system" | "user" | "assistant")) => r.to_string(),
                Some("developer") => "system".to_string(),
                // A tool's result goes back as a user turn that says what it is.
                Some("tool") => "tool".to_string(),
                Some(other) => {
                    return Err(invalid(
                        format!("`{param}.role` `{other}` is not supported (system, developer, user, assistant, tool)"),
                        &param,
                    ))
                }
                None => return Err(invalid(format!("`{param}.role` is missing"), &param)),
            };
            let calls = m.get("tool_calls").filter(|c| !c.is_null());
            let content = match m.get("content") {
                // An assistant turn that called tools: the calls, as the JSON the model wrote.
                None | Some(Value::Null) if role == "assistant" && calls.is_some() => {
                    tool_calls_text(calls.expect("checked"), &param)?
                }
                Some(Value::String(s)) if role == "tool" => {
                    let id = m.get("tool_call_id").and_then(Value::as_str).unwrap_or("");
                    format!("Result of tool call {id}: {s}")
                }
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(invalid(
                                    format!("`{param}.content` parts must be {{\"type\":\"text\",\"text\":…}}"),
                                    &param,
                                ))
                            }
                        }
                    }
                    text
                }
                _ => return Err(invalid(format!("`{param}.content` must be a string"), &param)),
            };
            if content.contains('\0') {
                return Err(invalid(format!("`{param}.content` must not contain NUL"), &param));
            }
            let role = if role == "tool" { "user".to_string() } else { role };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn completion_prompt(value: Option<&Value>) -> Result<String, ErrorBody> {
    let text = match value {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => return Err(invalid("`prompt` must be a string", "prompt")),
    };
    if text.is_empty() {
        return Err(invalid("`prompt` must not be empty", "prompt"));
    }
    if text.contains('\0') {
        return Err(invalid("`prompt` must not contain NUL", "prompt"));
    }
    Ok(text)
}

fn stops(value: Option<&Value>) -> Result<Vec<String>, ErrorBody> {
    let list = match value {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("`stop` must be a string or an array of strings", "stop"))?,
        Some(_) => {
            return Err(invalid(
                "`stop` must be a string or an array of strings",
                "stop",
            ))
        }
    };
    if list.len() > MAX_STOPS || list.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
        return Err(invalid(
            format!(
                "`stop` takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_LEN} bytes"
            ),
            "stop",
        ));
    }
    Ok(list)
}

/// Shapes a generation's pieces into OpenAI objects for one request.
pub struct Shaper {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    /// The tool call the answer is, with the call's id.
    pub tool: Option<(ToolCall, String)>,
}

impl Shaper {
    pub fn new(kind: Kind, model: String) -> Self {
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        Shaper {
            kind,
            id: format!("{prefix}-{:024x}", rand::random::<u128>() >> 32),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model,
            tool: None,
        }
    }

    /// An answer that is a tool call.
    pub fn with_tool(mut self, tool: Option<ToolCall>) -> Self {
        self.tool = tool.map(|t| (t, format!("call_{:024x}", rand::random::<u128>() >> 32)));
        self
    }

    /// The call's function and arguments, from the generated text.
    pub fn split_call(&self, text: &str) -> Option<(String, String)> {
        let (tool, _) = self.tool.as_ref()?;
        Some(match tool {
            ToolCall::Named(name) => (name.clone(), text.to_string()),
            ToolCall::AnyOf(names) => match serde_json::from_str::<Value>(text) {
                Ok(v) => (
                    v["name"].as_str().unwrap_or("").to_string(),
                    v["arguments"].to_string(),
                ),
                // Cut off by max_tokens: what there is.
                Err(_) => (names[0].clone(), text.to_string()),
            },
        })
    }

    /// A streamed piece of a tool call: the first names it (`name` set), the rest add argument text.
    pub fn tool_chunk(&self, name: Option<&str>, arguments: &str, first: bool) -> Value {
        let id = self.tool.as_ref().map_or("", |(_, id)| id.as_str());
        let call = match name {
            Some(name) => json!({"index": 0, "id": id, "type": "function",
                                 "function": {"name": name, "arguments": arguments}}),
            None => json!({"index": 0, "function": {"arguments": arguments}}),
        };
        let mut delta = json!({"tool_calls": [call]});
        if first {
            delta["role"] = json!("assistant");
            delta["content"] = Value::Null;
        }
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}],
        })
    }

    /// `finish_reason` as sent: a call that ended is `tool_calls`.
    pub fn finish_name(&self, reason: FinishReason) -> &'static str {
        match (&self.tool, reason) {
            (Some(_), FinishReason::Stop) => "tool_calls",
            _ => reason.as_str(),
        }
    }

    fn usage(prompt: u32, completion: u32, cached: u32) -> Value {
        json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
               "prompt_tokens_details": {"cached_tokens": cached}})
    }

    /// The whole (non-streamed) answer: choice 0, then the others of `n`.
    pub fn full(&self, c: &Completion) -> Value {
        let first = self.choice(0, &c.text, c.finish_reason, c.logprobs.as_deref());
        let more = c
            .more
            .iter()
            .enumerate()
            .map(|(i, m)| self.choice(i + 1, &m.text, m.finish_reason, m.logprobs.as_deref()));
        let completion =
            c.completion_tokens + c.more.iter().map(|m| m.completion_tokens).sum::<u32>();
        let object = match self.kind {
            Kind::Chat => "chat.completion",
            Kind::Completion => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": std::iter::once(first).chain(more).collect::<Vec<_>>(),
            "usage": Self::usage(c.prompt_tokens, completion, c.cached_tokens),
        })
    }

    /// One choice of a whole answer; a chat answer that is a tool call carries the call.
    fn choice(
        &self,
        index: usize,
        text: &str,
        finish: FinishReason,
        logprobs: Option<&[crate::api::TokenLogprob]>,
    ) -> Value {
        let logprobs = logprobs.map_or(Value::Null, |t| logprobs_json(self.kind, t, 0));
        if self.kind == Kind::Completion {
            return json!({"index": index, "text": text, "logprobs": logprobs,
                          "finish_reason": finish.as_str()});
        }
        let message = match (self.split_call(text), &self.tool) {
            (Some((name, arguments)), Some((_, id))) => {
                json!({"role": "assistant", "content": null,
                "tool_calls": [{"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]})
            }
            _ => json!({"role": "assistant", "content": text}),
        };
        json!({"index": index, "message": message, "logprobs": logprobs,
               "finish_reason": self.finish_name(finish)})
    }

    /// One streamed chunk: the first (`role` set), a text delta, or the last (`finish` set).
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(FinishReason::as_str);
        match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
                })
            }
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}],
            }),
        }
    }

    /// The usage chunk sent last when `stream_options.include_usage` is set.
    pub fn usage_chunk(&self, prompt: u32, completion: u32, cached: u32) -> Value {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [], "usage": Self::usage(prompt, completion, cached),
        })
    }
}

/// One server-sent event.
pub fn sse(value: &Value) -> bytes::Bytes {
    bytes::Bytes::from(format!("data: {value}\n\n"))
}

pub const SSE_DONE: &[u8] = b"data: [DONE]\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<ValidRequest, ErrorBody> {
        validate(Kind::Chat, body.as_bytes(), 7)
    }

    #[test]
    fn the_seed_request_is_valid_with_defaults() {
        let v = chat(r#"{"messages":[{"role":"user","content":"what color is apple?"}]}"#).unwrap();
        assert!(!v.stream);
        assert_eq!(v.generate.model, None);
        assert_eq!(v.generate.max_tokens, None);
        assert_eq!(v.generate.sampling.seed, 7);
        assert_eq!(v.generate.sampling.temperature, 1.0);
    }

    #[test]
    fn every_option_is_read() {
        let v = chat(
            r#"{"model":"m","messages":[{"role":"developer","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":5,"max_tokens":9,
                "temperature":0,"top_p":0.5,"top_k":3,"min_p":0.1,"seed":42,"stop":["x","y"],"n":1,
                "presence_penalty":0.5,"frequency_penalty":-0.5,"repetition_penalty":1.1,"user":"u"}"#,
        )
        .unwrap();
        assert!(v.stream && v.include_usage);
        assert_eq!(v.generate.max_tokens, Some(5));
        assert_eq!(v.generate.stop, ["x", "y"]);
        let Prompt::Chat { messages } = &v.generate.prompt else {
            panic!()
        };
        assert_eq!(
            messages[0],
            ChatMessage {
                role: "system".into(),
                content: "ab".into()
            }
        );
        let s = &v.generate.sampling;
        assert_eq!((s.temperature, s.top_k, s.seed), (0.0, 3, 42));
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            ("{", "", "parse the JSON"),
            (r#"{"messages":[]}"#, "messages", "1 to"),
            (r#"{"messages":"hi"}"#, "messages", "array"),
            (
                r#"{"messages":[{"role":"wizard","content":"x"}]}"#,
                "messages[0]",
                "not supported",
            ),
            (
                r#"{"messages":[{"role":"user"}]}"#,
                "messages[0]",
                "content",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                "temperature",
                "between",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"n":17}"#,
                "n",
                "between 1 and 16",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                "max_tokens",
                "between 1",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]}"#,
                "stop",
                "up to 4",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#,
                "tool_choice",
                "auto",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"frobnicate":1}"#,
                "frobnicate",
                "Unrecognized",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"stream":"yes"}"#,
                "stream",
                "boolean",
            ),
            (
                r#"{"messages":[{"role":"user","content":"x"}],"model":7}"#,
                "model",
                "string",
            ),
        ];
        for (body, param, want) in cases {
            let e = chat(body).unwrap_err();
            assert_eq!(e.http_status(), 400, "{body}");
            assert!(e.message.contains(want), "{body}: {}", e.message);
            if !param.is_empty() {
                assert_eq!(e.param.as_deref(), Some(param), "{body}");
            }
        }
    }

    #[test]
    fn completions_take_a_prompt() {
        let v = validate(
            Kind::Completion,
            br#"{"prompt":"zebra zebra","max_tokens":4}"#,
            1,
        )
        .unwrap();
        assert_eq!(
            v.generate.prompt,
            Prompt::Text {
                text: "zebra zebra".into()
            }
        );
        assert!(validate(Kind::Completion, br#"{"prompt":""}"#, 1).is_err());
        assert!(validate(Kind::Completion, br#"{"prompt":"x","echo":true}"#, 1).is_err());
        assert!(validate(Kind::Completion, br#"{"prompt":"x","echo":false}"#, 1).is_ok());
        assert!(validate(
            Kind::Chat,
            br#"{"messages":[{"role":"user","content":"x"}],"echo":false}"#,
            1
        )
        .is_err());
        assert!(validate(
            Kind::Chat,
            br#"{"messages":[{"role":"user","content":"x"}],"logprobs":"yes"}"#,
            1
        )
        .is_err());
        let v = validate(
            Kind::Chat,
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":2.0,"top_p":1e-50}"#,
            1,
        )
        .unwrap();
        assert_eq!(v.generate.max_tokens, Some(2));
        assert!(v.generate.sampling.top_p > 0.0);
    }

    #[test]
    fn shapes_follow_openai() {
        let s = Shaper::new(Kind::Chat, "m".into());
        let c = Completion {
            model: "m".into(),
            text: "hi".into(),
            finish_reason: FinishReason::Length,
            prompt_tokens: 3,
            completion_tokens: 2,
            cached_tokens: 1,
            logprobs: None,
            more: Vec::new(),
        };
        let full = s.full(&c);
        assert_eq!(full["object"], "chat.completion");
        assert_eq!(full["choices"][0]["message"]["content"], "hi");
        assert_eq!(full["usage"]["total_tokens"], 5);
        assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        let first = s.chunk(Some(""), true, None);
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        let last = s.chunk(None, false, Some(FinishReason::Stop));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        let usage = s.usage_chunk(1, 2, 0);
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }
}

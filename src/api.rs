//! The contract: every payload that crosses the mesh (MessagePack, named fields), and the one
//! module both sides import. Roles never import each other or the gateway: the caller, the infer
//! worker and the gateway's `state::*` built-ins agree only on what is here.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Sampling settings of one request, already validated.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sampling {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables.
    pub top_k: i32,
    pub min_p: f32,
    pub seed: u32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

/// What to generate from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Prompt {
    /// A raw completion prompt.
    Text { text: String },
    /// Chat messages, formatted by the model's (or the configured) chat template.
    Chat { messages: Vec<ChatMessage> },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// The payload of `inference::run_inference` and `inference::get_response`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GenerateRequest {
    /// The model asked for; `None` takes the served one.
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    /// `None`: as many as fit in the slot's context.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub stop: Vec<String>,
    pub sampling: Sampling,
    /// Constrained decoding: the output always parses as JSON (and validates, for a schema).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<OutputFormat>,
    /// Log-probabilities of the generated tokens, with this many alternatives each (0 to
    /// [`MAX_TOP_LOGPROBS`]); `None`: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u8>,
    /// Choices to generate (1 to [`MAX_CHOICES`]).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub n: u8,
}

/// The most choices (`n`) one request may ask for (and no more than a worker's slots).
pub const MAX_CHOICES: u8 = 16;

fn one() -> u8 {
    1
}

fn is_one(n: &u8) -> bool {
    *n == 1
}

/// The most alternatives `top_logprobs` may ask for, per token.
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// One generated token's log-probability, and the most likely alternatives at its position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    #[serde(default)]
    pub top: Vec<TopLogprob>,
}

/// An alternative at one position.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// What `response_format` asks the output to be.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid under `schema` (the JSON Schema, as JSON text).
    JsonSchema { name: String, schema: String },
}

/// The largest JSON schema a request may carry (bytes of JSON).
pub const MAX_SCHEMA_BYTES: usize = 64 * 1024;

/// Limits every generation request is held to, on both sides of the mesh.
pub const MAX_MESSAGES: usize = 1024;
/// The longest model id a request may name or a worker may announce (bytes).
pub const MAX_MODEL_ID: usize = 256;
/// The most models one worker may announce.
pub const MAX_MODELS_PER_WORKER: usize = 8;
pub const MAX_STOPS: usize = 4;
pub const MAX_STOP_LEN: usize = 256;
pub const MAX_TOKENS_LIMIT: u32 = 1 << 20;

/// A [`GenerateRequest`] that passed every check: the only thing a generator accepts. Made only by
/// `TryFrom`, wherever a request is decoded, so a peer's payload never reaches an engine unchecked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGenerate(GenerateRequest);

impl ValidGenerate {
    pub fn model(&self) -> Option<&str> {
        self.0.model.as_deref()
    }
    pub fn prompt(&self) -> &Prompt {
        &self.0.prompt
    }
    pub fn max_tokens(&self) -> Option<u32> {
        self.0.max_tokens
    }
    pub fn stop(&self) -> &[String] {
        &self.0.stop
    }
    pub fn sampling(&self) -> &Sampling {
        &self.0.sampling
    }
    pub fn format(&self) -> Option<&OutputFormat> {
        self.0.format.as_ref()
    }
    pub fn logprobs(&self) -> Option<u8> {
        self.0.logprobs
    }
    pub fn n(&self) -> u8 {
        self.0.n
    }
}

impl TryFrom<GenerateRequest> for ValidGenerate {
    type Error = crate::protocol::ErrorBody;

    fn try_from(r: GenerateRequest) -> Result<Self, Self::Error> {
        use crate::protocol::{ErrorBody, ErrorCode};
        let bad =
            |m: String, param: &str| ErrorBody::new(ErrorCode::BadRequest, m).with_param(param);
        match &r.prompt {
            Prompt::Text { text } if text.is_empty() => {
                return Err(bad("the prompt is empty".into(), "prompt"))
            }
            Prompt::Chat { messages } if messages.is_empty() || messages.len() > MAX_MESSAGES => {
                let m = format!("`messages` must hold 1 to {MAX_MESSAGES} messages");
                return Err(bad(m, "messages"));
            }
            _ => {}
        }
        if r.max_tokens.is_some_and(|n| n == 0 || n > MAX_TOKENS_LIMIT) {
            let m = format!("`max_tokens` must be between 1 and {MAX_TOKENS_LIMIT}");
            return Err(bad(m, "max_tokens"));
        }
        if r.stop.len() > MAX_STOPS
            || r.stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP_LEN)
        {
            let m = format!(
                "`stop` takes up to {MAX_STOPS} non-empty strings of at most {MAX_STOP_LEN} bytes"
            );
            return Err(bad(m, "stop"));
        }
        let s = &r.sampling;
        let ranges: [(&str, f32, std::ops::RangeInclusive<f32>); 6] = [
            ("temperature", s.temperature, 0.0..=2.0),
            ("top_p", s.top_p, f32::MIN_POSITIVE..=1.0),
            ("min_p", s.min_p, 0.0..=1.0),
            ("repetition_penalty", s.repetition_penalty, 0.01..=10.0),
            ("presence_penalty", s.presence_penalty, -2.0..=2.0),
            ("frequency_penalty", s.frequency_penalty, -2.0..=2.0),
        ];
        for (name, value, range) in ranges {
            if !range.contains(&value) {
                let m = format!(
                    "`{name}` must be between {} and {}, got {value}",
                    range.start(),
                    range.end()
                );
                return Err(bad(m, name));
            }
        }
        if !(0..=1_000_000).contains(&s.top_k) {
            return Err(bad("`top_k` must be between 0 and 1000000".into(), "top_k"));
        }
        if r.n == 0 || r.n > MAX_CHOICES {
            return Err(bad(format!("`n` must be between 1 and {MAX_CHOICES}"), "n"));
        }
        if r.logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            let m = format!("`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}");
            return Err(bad(m, "top_logprobs"));
        }
        if let Some(OutputFormat::JsonSchema { name, schema }) = &r.format {
            if schema.len() > MAX_SCHEMA_BYTES || name.len() > 64 {
                let m = format!(
                    "`response_format.json_schema` takes a name of at most 64 bytes and a schema of at most {MAX_SCHEMA_BYTES} bytes"
                );
                return Err(bad(m, "response_format"));
            }
            if !matches!(
                serde_json::from_str::<serde_json::Value>(schema),
                Ok(serde_json::Value::Object(_) | serde_json::Value::Bool(_))
            ) {
                return Err(bad(
                    "`response_format.json_schema.schema` must be a JSON Schema object".into(),
                    "response_format",
                ));
            }
        }
        Ok(ValidGenerate(r))
    }
}

fn is_zero(n: &u8) -> bool {
    *n == 0
}

/// One chunk of `inference::run_inference`'s stream: `Start`, any `Delta`s, then `Done`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GenerateEvent {
    Start {
        model: String,
        prompt_tokens: u32,
    },
    Delta {
        text: String,
        /// The choice (of `n`) it belongs to.
        #[serde(default, skip_serializing_if = "is_zero")]
        index: u8,
    },
    /// The log-probabilities of the tokens whose text comes in the next `Delta` (or, for text a
    /// stop string swallowed, none).
    Logprobs {
        tokens: Vec<TokenLogprob>,
        #[serde(default, skip_serializing_if = "is_zero")]
        index: u8,
    },
    /// One choice has finished; the generation ends when every choice has.
    Done {
        #[serde(default, skip_serializing_if = "is_zero")]
        index: u8,
        finish_reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        /// Prompt tokens whose KV came from the prefix cache (0 from older workers).
        #[serde(default)]
        cached_tokens: u32,
    },
}

/// One input of `inference::embed`: text, or token ids.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum EmbedInput {
    Text(String),
    Tokens(Vec<u32>),
}

/// The payload of `inference::embed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbedRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub inputs: Vec<EmbedInput>,
}

/// The answer of `inference::embed`: one L2-normalised vector per input, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EmbedReply {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

/// The most inputs one embeddings request may carry (OpenAI's limit).
pub const MAX_EMBED_INPUTS: usize = 2048;

/// The answer of `inference::get_response`: a whole generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Completion {
    pub model: String,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    #[serde(default)]
    pub cached_tokens: u32,
    /// Each generated token's log-probability, when they were asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Choices 1.. of a request with `n` > 1 (the fields above are choice 0's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more: Vec<Choice>,
}

/// One more choice of a generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Choice {
    pub text: String,
    pub finish_reason: FinishReason,
    pub completion_tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// The answer of `inference::models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    pub models: Vec<String>,
    /// What is known of each model, in the order of `models` (newer workers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub info: Vec<ModelInfo>,
}

/// A served model, as its worker knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ModelInfo {
    pub id: String,
    /// Positions one request may use (prompt plus completion): the slot's context.
    pub context_length: u32,
    /// The context the model was trained with, from the GGUF (0: unknown).
    #[serde(default)]
    pub trained_context_length: u32,
    /// The weights' quantisation, e.g. `Q4_K_M` (empty: unknown, or no model).
    #[serde(default)]
    pub quantization: String,
    #[serde(default)]
    pub parameters: u64,
}

/// A model id from a GGUF's `general.name` or a file stem: lower case, and every run of
/// characters other than letters, digits, `.` and `_` one `-` (`Gemma 3 270m` → `gemma-3-270m`).
pub fn model_id_from(name: &str) -> String {
    let mut id = String::new();
    for c in name.trim().chars() {
        if c.is_ascii_alphanumeric() || c == '.' || c == '_' {
            id.push(c.to_ascii_lowercase());
        } else if !id.ends_with('-') {
            id.push('-');
        }
    }
    id.trim_matches('-').to_string()
}

/// The answer of `inference::stats`: an infer worker's engine, for `/v1/engine/stats` and the
/// gateway's `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsSnapshot {
    pub model: String,
    pub slots: u32,
    pub ctx_per_slot: u32,
    pub active_sequences: u64,
    pub queued_sequences: u64,
    pub completed: u64,
    pub cancelled: u64,
    pub prompt_tokens_total: u64,
    pub completion_tokens_total: u64,
    pub decode_steps: u64,
    /// Prompt tokens served from the prefix cache instead of decoded.
    #[serde(default)]
    pub cached_tokens_total: u64,
    /// Tokens the prefix cache holds now.
    #[serde(default)]
    pub prefix_cache_tokens: u64,
    /// Seconds from submission to the first generated token.
    #[serde(default)]
    pub ttft: Histogram,
}

/// Upper bounds (seconds) of meshd's latency buckets.
pub const LATENCY_BOUNDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

/// A histogram as it travels: its bucket bounds and the cumulative count at each, so a reader
/// needs no constant shared with the writer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    /// Upper bounds, ascending.
    pub le: Vec<f64>,
    /// Observations at or below each bound.
    pub buckets: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::latency()
    }
}

impl Histogram {
    /// An empty histogram with meshd's latency buckets.
    pub fn latency() -> Histogram {
        Histogram {
            le: LATENCY_BOUNDS.to_vec(),
            buckets: vec![0; LATENCY_BOUNDS.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        for (bound, n) in self.le.iter().zip(self.buckets.iter_mut()) {
            if value <= *bound {
                *n += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }
}

// ---- the gateway's `state::*` built-ins

/// `state::get` and `state::delete`.
#[derive(Debug, Serialize, Deserialize)]
pub struct KeyRequest {
    pub scope: String,
    pub key: String,
}

/// `state::set`.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetRequest {
    pub scope: String,
    pub key: String,
    pub value: Value,
}

/// `state::list`.
#[derive(Debug, Serialize, Deserialize)]
pub struct ListRequest {
    pub scope: String,
    #[serde(default)]
    pub prefix: String,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// `state::incr`.
#[derive(Debug, Serialize, Deserialize)]
pub struct IncrRequest {
    pub scope: String,
    pub key: String,
    pub by: i64,
    /// Applies the increment at most once per key (replays answer the first value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ValueReply {
    pub value: Option<Value>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct IncrReply {
    pub value: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DeleteReply {
    pub existed: bool,
}

/// One key of `state::list`'s answer.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Item {
    pub key: String,
    pub value: Value,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct ListReply {
    pub items: Vec<Item>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> GenerateRequest {
        GenerateRequest {
            model: None,
            prompt: Prompt::Text { text: "hi".into() },
            max_tokens: Some(4),
            stop: vec![],
            sampling: Sampling::default(),
            format: None,
            logprobs: None,
            n: 1,
        }
    }

    #[test]
    fn a_generate_request_is_checked_before_any_engine_sees_it() {
        assert!(ValidGenerate::try_from(request()).is_ok());
        type Spoil = fn(&mut GenerateRequest);
        let cases: [(&str, Spoil); 13] = [
            ("prompt", |r| {
                r.prompt = Prompt::Text {
                    text: String::new(),
                }
            }),
            ("messages", |r| r.prompt = Prompt::Chat { messages: vec![] }),
            ("max_tokens", |r| r.max_tokens = Some(0)),
            ("stop", |r| r.stop = vec![String::new()]),
            ("stop", |r| r.stop = vec!["x".into(); MAX_STOPS + 1]),
            ("temperature", |r| r.sampling.temperature = f32::NAN),
            ("top_p", |r| r.sampling.top_p = 0.0),
            ("top_k", |r| r.sampling.top_k = -1),
            // What a lying caller may put in the mesh payload, past the HTTP validator.
            ("n", |r| r.n = 0),
            ("n", |r| r.n = MAX_CHOICES + 1),
            ("top_logprobs", |r| r.logprobs = Some(MAX_TOP_LOGPROBS + 1)),
            ("response_format", |r| {
                r.format = Some(OutputFormat::JsonSchema {
                    name: "x".into(),
                    schema: format!("{{\"description\":\"{}\"}}", "a".repeat(MAX_SCHEMA_BYTES)),
                })
            }),
            ("response_format", |r| {
                r.format = Some(OutputFormat::JsonSchema {
                    name: "x".into(),
                    schema: "[1, 2]".into(),
                })
            }),
        ];
        for (param, spoil) in cases {
            let mut r = request();
            spoil(&mut r);
            let e = ValidGenerate::try_from(r).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e}");
            assert_eq!(e.code, "bad_request");
        }
    }

    #[test]
    fn model_ids_are_normalised_names() {
        assert_eq!(model_id_from("Gemma 3 270m"), "gemma-3-270m");
        assert_eq!(
            model_id_from("SmolLM2 135M Instruct"),
            "smollm2-135m-instruct"
        );
        assert_eq!(model_id_from(" a//b  c.gguf "), "a-b-c.gguf");
        assert_eq!(model_id_from("¿?"), "");
    }

    #[test]
    fn a_histogram_carries_its_own_bounds() {
        let mut h = Histogram::latency();
        h.observe(0.003);
        h.observe(100.0);
        assert_eq!(h.le.len(), h.buckets.len());
        assert_eq!(h.buckets[h.le.iter().position(|b| *b == 0.005).unwrap()], 1);
        assert_eq!(*h.buckets.last().unwrap(), 1, "100 s is above every bound");
        assert_eq!(h.count, 2);
    }
}

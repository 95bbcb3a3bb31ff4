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
    },
    Done {
        finish_reason: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
}

/// The answer of `inference::get_response`: a whole generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Completion {
    pub model: String,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// The answer of `inference::models`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelList {
    pub models: Vec<String>,
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

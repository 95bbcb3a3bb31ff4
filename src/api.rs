//! Payload types the roles exchange over the mesh (MessagePack, named fields). Roles never import
//! each other: the caller and the infer worker agree only on what is here.

use serde::{Deserialize, Serialize};

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
    pub ttft: crate::metrics::Histogram,
}
